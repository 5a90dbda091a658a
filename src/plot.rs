//! Small deterministic SVG line plots, with no plotting dependency: every point may carry
//! its 95% interval (drawn as an error bar), a band series is drawn under the lines, flat
//! reference lines carry their own interval as a light band, and vertical marks name
//! layers (the steering layer). Series that coincide stay apart: each has its own colour,
//! marker and dash pattern, and its points are nudged sideways by a few pixels.
//!
//! Elements carry classes (`series`, `interval`, `legend-entry`) and `data-series` names so a
//! test can count what a reader sees.

use std::fmt::Write;

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Points joined by a line, each with its interval as an error bar.
    Line,
    /// A shaded area from the intervals' lows to highs, with the points as a thin line:
    /// drawn first, under every line (e.g. the random-direction controls).
    Band,
    /// A flat line over the whole x range at its one point's y, its interval a light band
    /// (e.g. the baseline).
    Reference,
}

/// One curve: a name, its points, and optionally a (low, high) interval per point and an
/// x extent per point (the layers a projection window covers).
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub kind: Kind,
    pub points: Vec<(f64, f64)>,
    pub intervals: Option<Vec<(f64, f64)>>,
    pub spans: Option<Vec<(f64, f64)>>,
}

impl Series {
    pub fn line(name: impl Into<String>, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.into(),
            kind: Kind::Line,
            points,
            intervals: None,
            spans: None,
        }
    }

    /// A band series: `points` are its centre line, `intervals` its extent at each x.
    pub fn band(name: impl Into<String>, points: Vec<(f64, f64)>, lohi: Vec<(f64, f64)>) -> Series {
        Series {
            kind: Kind::Band,
            intervals: Some(lohi),
            ..Series::line(name, points)
        }
    }

    /// A flat reference at `y`, with its interval.
    pub fn reference(name: impl Into<String>, y: f64, interval: Option<(f64, f64)>) -> Series {
        Series {
            kind: Kind::Reference,
            intervals: interval.map(|i| vec![i]),
            ..Series::line(name, vec![(f64::NAN, y)])
        }
    }

    pub fn with_intervals(mut self, iv: Vec<(f64, f64)>) -> Series {
        self.intervals = Some(iv);
        self
    }

    pub fn with_spans(mut self, spans: Vec<(f64, f64)>) -> Series {
        self.spans = Some(spans);
        self
    }
}

/// A vertical mark at `x` (e.g. the steering layer), labelled.
#[derive(Debug, Clone)]
pub struct Mark {
    pub x: f64,
    pub label: String,
}

/// The x axis: linear, or log2 (for geometric values such as coefficients 1, 2, 4, 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XScale {
    Linear,
    Log2,
}

impl XScale {
    /// Log2 when the values are positive and geometric (at least three distinct values,
    /// constant ratio ≥ 1.5 between neighbours), linear otherwise.
    pub fn for_values(xs: &[f64]) -> XScale {
        let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        v.dedup();
        if v.len() < 3 || v[0] <= 0.0 {
            return XScale::Linear;
        }
        let r: Vec<f64> = v.windows(2).map(|w| w[1] / w[0]).collect();
        let geometric = r.iter().all(|q| *q >= 1.5 && (q / r[0] - 1.0).abs() < 0.05);
        if geometric {
            XScale::Log2
        } else {
            XScale::Linear
        }
    }
}

/// A plot's frame: titles, axis ranges and scale, vertical marks.
#[derive(Debug, Clone)]
pub struct Plot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Fixes the y axis (0..1 for rates, -1..1 for cosines).
    pub y_range: Option<(f64, f64)>,
    pub x_scale: XScale,
    pub marks: Vec<Mark>,
}

const COLORS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#bcbd22",
];
/// Dash patterns, one per line series in turn ("" is solid).
const DASHES: &[&str] = &["", "7,4", "2,3", "9,3,2,3", "4,2", "12,4"];
/// Reference lines are grey-ish and dashed so they never read as a measured curve.
const REF_COLORS: &[&str] = &["#444444", "#8c564b", "#7f7f7f"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= 6.0)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut v = Vec::new();
    while t <= hi + 1e-9 * step {
        v.push(if t.abs() < 1e-12 { 0.0 } else { t });
        t += step;
    }
    v
}

fn tick_text(t: f64) -> String {
    let r = (t * 1000.0).round() / 1000.0;
    format!("{r}")
}

/// A marker of shape `i` centred at (x, y), filled with `c`.
fn marker(i: usize, x: f64, y: f64, c: &str) -> String {
    let r = 4.0;
    match i % 5 {
        0 => format!(r#"<circle cx="{x:.1}" cy="{y:.1}" r="{r}" fill="{c}"/>"#),
        1 => format!(
            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{c}"/>"#,
            x - r,
            y - r,
            2.0 * r,
            2.0 * r
        ),
        2 => format!(
            r#"<path d="M{x:.1},{:.1}L{:.1},{:.1}L{:.1},{:.1}Z" fill="{c}"/>"#,
            y - r - 1.0,
            x + r + 1.0,
            y + r,
            x - r - 1.0,
            y + r
        ),
        3 => format!(
            r#"<path d="M{x:.1},{:.1}L{:.1},{y:.1}L{x:.1},{:.1}L{:.1},{y:.1}Z" fill="{c}"/>"#,
            y - r - 1.0,
            x + r + 1.0,
            y + r + 1.0,
            x - r - 1.0
        ),
        _ => format!(
            r#"<circle cx="{x:.1}" cy="{y:.1}" r="{r}" fill="white" stroke="{c}" stroke-width="2"/>"#
        ),
    }
}

fn dash_attr(d: &str) -> String {
    if d.is_empty() {
        String::new()
    } else {
        format!(r#" stroke-dasharray="{d}""#)
    }
}

impl Plot {
    pub fn new(
        title: impl Into<String>,
        x_label: impl Into<String>,
        y_label: impl Into<String>,
    ) -> Plot {
        Plot {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            y_range: None,
            x_scale: XScale::Linear,
            marks: vec![],
        }
    }

    /// The plot as an SVG document. Same series, same bytes.
    pub fn svg(&self, series: &[Series]) -> String {
        let (w, h, ml, mr, mt, mb) = (780.0, 440.0, 64.0, 230.0, 40.0, 54.0);
        let log = self.x_scale == XScale::Log2;
        let fx = |x: f64| if log { x.max(1e-12).log2() } else { x };
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for s in series {
            for (k, &(x, y)) in s.points.iter().enumerate() {
                let iv = s.intervals.as_ref().and_then(|v| v.get(k)).copied();
                if y.is_finite() {
                    y0 = y0.min(y);
                    y1 = y1.max(y);
                }
                if let Some((lo, hi)) = iv.filter(|(a, b)| a.is_finite() && b.is_finite()) {
                    y0 = y0.min(lo);
                    y1 = y1.max(hi);
                }
                if x.is_finite() && s.kind != Kind::Reference {
                    x0 = x0.min(fx(x));
                    x1 = x1.max(fx(x));
                }
                if let Some(&(a, b)) = s.spans.as_ref().and_then(|v| v.get(k)) {
                    x0 = x0.min(fx(a));
                    x1 = x1.max(fx(b));
                }
            }
        }
        for m in &self.marks {
            if m.x.is_finite() {
                x0 = x0.min(fx(m.x));
                x1 = x1.max(fx(m.x));
            }
        }
        if let Some((a, b)) = self.y_range {
            (y0, y1) = (a, b);
        }
        if x0 > x1 {
            (x0, x1) = (0.0, 1.0);
        }
        if y0 > y1 {
            (y0, y1) = (0.0, 1.0);
        }
        // A little room either side so end points and their bars are not on the frame.
        let pad = ((x1 - x0) * 0.04).max(0.25);
        if x1 - x0 < 1e-12 {
            (x0, x1) = (x0 - 1.0, x1 + 1.0);
        } else {
            (x0, x1) = (x0 - pad, x1 + pad);
        }
        if y1 - y0 < 1e-12 {
            (y0, y1) = (y0 - 1.0, y1 + 1.0);
        }
        let (pw, ph) = (w - ml - mr, h - mt - mb);
        let sx = |x: f64| ml + (fx(x) - x0) / (x1 - x0) * pw;
        let sy = |y: f64| mt + ph - (y.clamp(y0, y1) - y0) / (y1 - y0) * ph;
        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="13">"#
        );
        let _ = write!(
            s,
            r#"<title>{}</title><rect width="{w}" height="{h}" fill="white"/><text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
            esc(&self.title),
            ml + pw / 2.0,
            esc(&self.title)
        );
        // Ticks: log2 axes tick at the powers of two in range, linear ones at round steps.
        let xt: Vec<f64> = if log {
            let (a, b) = (x0.ceil() as i64, x1.floor() as i64);
            (a..=b).map(|e| 2f64.powi(e as i32)).collect()
        } else {
            ticks(x0, x1)
        };
        for t in xt {
            let _ = write!(
                s,
                r##"<line x1="{0:.1}" x2="{0:.1}" y1="{1:.1}" y2="{2:.1}" stroke="#eee"/><text x="{0:.1}" y="{3:.1}" text-anchor="middle">{4}</text>"##,
                sx(t),
                mt,
                mt + ph,
                mt + ph + 17.0,
                tick_text(t)
            );
        }
        for t in ticks(y0, y1) {
            let _ = write!(
                s,
                r##"<line x1="{1:.1}" x2="{2:.1}" y1="{0:.1}" y2="{0:.1}" stroke="#eee"/><text x="{3:.1}" y="{4:.1}" text-anchor="end">{5}</text>"##,
                sy(t),
                ml,
                ml + pw,
                ml - 6.0,
                sy(t) + 4.0,
                tick_text(t)
            );
        }
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}{}</text>"#,
            ml + pw / 2.0,
            h - 12.0,
            esc(&self.x_label),
            if log { " (log scale)" } else { "" }
        );
        let _ = write!(
            s,
            r#"<text transform="translate(16,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
            mt + ph / 2.0,
            esc(&self.y_label)
        );
        let mut legend: Vec<String> = vec![];
        // Bands first, under everything.
        for se in series.iter().filter(|s| s.kind == Kind::Band) {
            let c = "#999999";
            let name = esc(&se.name);
            let b = se.intervals.as_deref().unwrap_or(&[]);
            let pts: Vec<(f64, (f64, f64))> = se
                .points
                .iter()
                .zip(b)
                .filter(|(p, iv)| p.0.is_finite() && iv.0.is_finite() && iv.1.is_finite())
                .map(|(p, iv)| (p.0, *iv))
                .collect();
            let mut d = String::new();
            for (k, (x, (_, hi))) in pts.iter().enumerate() {
                let _ = write!(
                    d,
                    "{}{:.1},{:.1} ",
                    if k == 0 { "M" } else { "L" },
                    sx(*x),
                    sy(*hi)
                );
            }
            for (x, (lo, _)) in pts.iter().rev() {
                let _ = write!(d, "L{:.1},{:.1} ", sx(*x), sy(*lo));
            }
            let _ = write!(s, r#"<g class="series band" data-series="{name}">"#);
            if pts.len() == 1 {
                let (x, (lo, hi)) = pts[0];
                let _ = write!(
                    s,
                    r#"<rect class="interval" x="{:.1}" y="{:.1}" width="12" height="{:.1}" fill="{c}" fill-opacity="0.3"/>"#,
                    sx(x) - 6.0,
                    sy(hi),
                    (sy(lo) - sy(hi)).max(1.0)
                );
            } else if !pts.is_empty() {
                let _ = write!(
                    s,
                    r#"<path class="interval" d="{d}Z" fill="{c}" fill-opacity="0.3" stroke="{c}" stroke-width="1" stroke-dasharray="3,2"/>"#
                );
            }
            let line: Vec<String> = se
                .points
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
                .collect();
            let _ = write!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="1"/></g>"#,
                line.join(" ")
            );
            legend.push(format!(
                r#"<rect x="0" y="-6" width="24" height="12" fill="{c}" fill-opacity="0.3" stroke="{c}" stroke-dasharray="3,2"/><text x="30" y="4" data-series="{name}">{name}</text>"#
            ));
        }
        // References: flat dashed lines across the frame, their interval a light band.
        for (r, se) in series
            .iter()
            .filter(|s| s.kind == Kind::Reference)
            .enumerate()
        {
            let c = REF_COLORS[r % REF_COLORS.len()];
            let name = esc(&se.name);
            let Some(&(_, y)) = se.points.first() else {
                continue;
            };
            if !y.is_finite() {
                continue;
            }
            let _ = write!(s, r#"<g class="series reference" data-series="{name}">"#);
            if let Some(&(lo, hi)) = se.intervals.as_ref().and_then(|v| v.first()) {
                let _ = write!(
                    s,
                    r#"<rect class="interval" x="{ml}" y="{:.1}" width="{pw}" height="{:.1}" fill="{c}" fill-opacity="0.08"/>"#,
                    sy(hi),
                    (sy(lo) - sy(hi)).max(0.5)
                );
            }
            let _ = write!(
                s,
                r#"<line x1="{ml}" x2="{0}" y1="{1:.1}" y2="{1:.1}" stroke="{c}" stroke-width="1.5" stroke-dasharray="{2}"/></g>"#,
                ml + pw,
                sy(y),
                if r % 2 == 0 { "6,4" } else { "2,3" }
            );
            legend.push(format!(
                r#"<line x1="0" x2="24" y1="0" y2="0" stroke="{c}" stroke-width="1.5" stroke-dasharray="{}"/><text x="30" y="4" data-series="{name}">{name}</text>"#,
                if r % 2 == 0 { "6,4" } else { "2,3" }
            ));
        }
        // Vertical marks.
        for m in &self.marks {
            if !m.x.is_finite() {
                continue;
            }
            let x = sx(m.x);
            let _ = write!(
                s,
                r##"<g class="mark"><line x1="{x:.1}" x2="{x:.1}" y1="{mt}" y2="{:.1}" stroke="#000" stroke-width="1" stroke-dasharray="1,3"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text></g>"##,
                mt + ph,
                x + 3.0,
                mt + 12.0,
                esc(&m.label)
            );
        }
        // Lines, nudged apart: series j of n sits (j - (n-1)/2) * 5 px from its x.
        let lines: Vec<&Series> = series.iter().filter(|s| s.kind == Kind::Line).collect();
        let n = lines.len() as f64;
        for (j, se) in lines.iter().enumerate() {
            let c = COLORS[j % COLORS.len()];
            let dash = DASHES[j % DASHES.len()];
            let dx = (j as f64 - (n - 1.0) / 2.0) * 5.0;
            let name = esc(&se.name);
            let _ = write!(s, r#"<g class="series line" data-series="{name}">"#);
            let mut order: Vec<usize> = (0..se.points.len())
                .filter(|&k| se.points[k].0.is_finite() && se.points[k].1.is_finite())
                .collect();
            order.sort_by(|&a, &b| se.points[a].0.total_cmp(&se.points[b].0));
            if let Some(spans) = &se.spans {
                for &k in &order {
                    if let Some(&(a, b)) = spans.get(k) {
                        let y = sy(se.points[k].1) + dx * 0.6;
                        let _ = write!(
                            s,
                            r#"<line class="span" x1="{:.1}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="{c}" stroke-width="5" stroke-opacity="0.18" stroke-linecap="round"/>"#,
                            sx(a),
                            sx(b)
                        );
                    }
                }
            }
            if let Some(iv) = &se.intervals {
                for &k in &order {
                    let Some(&(lo, hi)) = iv.get(k) else { continue };
                    if !(lo.is_finite() && hi.is_finite()) {
                        continue;
                    }
                    let x = sx(se.points[k].0) + dx;
                    let _ = write!(
                        s,
                        r#"<path class="interval" d="M{:.1},{:.1}H{:.1}M{x:.1},{:.1}V{:.1}M{:.1},{:.1}H{:.1}" stroke="{c}" stroke-width="1.2" fill="none"/>"#,
                        x - 3.0,
                        sy(hi),
                        x + 3.0,
                        sy(hi),
                        sy(lo),
                        x - 3.0,
                        sy(lo),
                        x + 3.0
                    );
                }
            }
            let pts: Vec<(f64, f64)> = order
                .iter()
                .map(|&k| (sx(se.points[k].0) + dx, sy(se.points[k].1)))
                .collect();
            let poly: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let _ = write!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"{}/>"#,
                poly.join(" "),
                dash_attr(dash)
            );
            for &(x, y) in &pts {
                s.push_str(&marker(j, x, y, c));
            }
            s.push_str("</g>");
            legend.push(format!(
                r#"<line x1="0" x2="24" y1="0" y2="0" stroke="{c}" stroke-width="2"{}/>{}<text x="30" y="4" data-series="{name}">{name}</text>"#,
                dash_attr(dash),
                marker(j, 12.0, 0.0, c)
            ));
        }
        let _ = write!(
            s,
            r##"<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
        );
        // The legend, in drawing order: bands, references, lines.
        for (i, e) in legend.iter().enumerate() {
            let _ = write!(
                s,
                r#"<g class="legend-entry" transform="translate({:.1},{:.1})">{e}</g>"#,
                w - mr + 14.0,
                mt + 10.0 + i as f64 * 20.0
            );
        }
        let _ = write!(
            s,
            r##"<text x="{:.1}" y="{:.1}" font-size="11" fill="#555">bars and bands: 95% intervals</text>"##,
            w - mr + 14.0,
            mt + 16.0 + legend.len() as f64 * 20.0
        );
        s.push_str("</svg>\n");
        s
    }
}

/// A plain line plot (cosine against layer and the like).
pub fn line_plot(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    y_range: Option<(f64, f64)>,
) -> String {
    Plot {
        y_range,
        ..Plot::new(title, x_label, y_label)
    }
    .svg(series)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(s: &str, needle: &str) -> usize {
        s.matches(needle).count()
    }

    #[test]
    fn plots_are_well_formed_and_deterministic() {
        let s = vec![
            Series::line("a<b", vec![(0.0, 0.1), (1.0, 0.5), (2.0, f64::NAN)])
                .with_intervals(vec![(0.0, 0.2), (0.4, 0.6), (0.0, 0.0)]),
        ];
        let a = line_plot("t", "x", "y", &s, Some((0.0, 1.0)));
        assert_eq!(a, line_plot("t", "x", "y", &s, Some((0.0, 1.0))));
        assert!(a.starts_with("<svg") && a.trim_end().ends_with("</svg>"));
        assert!(a.contains("a&lt;b"));
        assert!(!a.contains("NaN"));
        let t = ticks(0.0, 1.0);
        assert_eq!(t.len(), 6);
        assert!(t[0] == 0.0 && (t[5] - 1.0).abs() < 1e-9);
        let _ = line_plot("empty", "x", "y", &[], None);
    }

    #[test]
    fn every_series_has_a_legend_entry_and_every_point_an_interval() {
        let pts = vec![(1.0, 0.1), (2.0, 0.1), (4.0, 0.3), (8.0, 0.0)];
        let iv = vec![(0.0, 0.3), (0.0, 0.3), (0.1, 0.6), (0.0, 0.2)];
        let series = vec![
            Series::band("random", pts.clone(), iv.clone()),
            Series::reference("E0", 0.4, Some((0.2, 0.6))),
            Series::line("one", pts.clone()).with_intervals(iv.clone()),
            Series::line("two", pts.clone()).with_intervals(iv.clone()),
        ];
        let p = Plot {
            x_scale: XScale::for_values(&[1.0, 2.0, 4.0, 8.0]),
            marks: vec![Mark {
                x: 2.0,
                label: "steering layer".into(),
            }],
            ..Plot::new("t", "coefficient", "rate")
        };
        assert_eq!(p.x_scale, XScale::Log2);
        let svg = p.svg(&series);
        assert_eq!(count(&svg, r#"class="legend-entry""#), 4);
        // 4 + 4 error bars, the band's area, the reference's band.
        assert_eq!(count(&svg, r#"class="interval""#), 10);
        assert!(svg.contains("(log scale)") && svg.contains("steering layer"));
        // Coinciding series are drawn apart: their first points differ in x.
        let first = |name: &str| {
            let g = &svg[svg
                .find(&format!(r#"class="series line" data-series="{name}""#))
                .unwrap()..];
            let p = &g[g.find("<polyline points=\"").unwrap() + 18..];
            p[..p.find(',').unwrap()].parse::<f64>().unwrap()
        };
        assert!((first("one") - first("two")).abs() >= 4.0);
        // Different dash patterns.
        assert!(svg.contains("stroke-dasharray=\"7,4\""));
    }

    #[test]
    fn only_geometric_values_get_a_log_axis() {
        assert_eq!(XScale::for_values(&[1.0, 2.0, 4.0, 8.0]), XScale::Log2);
        assert_eq!(XScale::for_values(&[0.5, 1.5, 4.5]), XScale::Log2);
        assert_eq!(XScale::for_values(&[1.0, 2.0, 3.0, 4.0]), XScale::Linear);
        assert_eq!(XScale::for_values(&[0.0, 2.0, 4.0]), XScale::Linear);
        assert_eq!(XScale::for_values(&[2.0, 4.0]), XScale::Linear);
    }
}
