//! Minimal SVG line plots: axes, ticks, a legend, optional shaded bands. Enough for
//! cosine-vs-layer and refusal-vs-coefficient curves, with no plotting dependency.

use std::fmt::Write;

/// One curve: a name, its points, and an optional band (lower, upper) per point.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub band: Option<Vec<(f64, f64)>>,
}

const COLORS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#17becf",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
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

/// An SVG line plot. `y_range` fixes the y axis (e.g. 0..1 for rates, -1..1 for cosines).
pub fn line_plot(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    y_range: Option<(f64, f64)>,
) -> String {
    let (w, h, ml, mr, mt, mb) = (720.0, 420.0, 64.0, 180.0, 40.0, 52.0);
    let pts = series
        .iter()
        .flat_map(|s| s.points.iter().chain(s.band.iter().flatten()));
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        if x.is_finite() && y.is_finite() {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    for s in series {
        for (&(x, _), &(lo, hi)) in s.points.iter().zip(s.band.iter().flatten()) {
            if x.is_finite() {
                (y0, y1) = (y0.min(lo), y1.max(hi));
            }
        }
    }
    if let Some((a, b)) = y_range {
        (y0, y1) = (a, b);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        (x0, x1) = (x0 - 1.0, x1 + 1.0);
    }
    if y1 - y0 < 1e-12 {
        (y0, y1) = (y0 - 1.0, y1 + 1.0);
    }
    let (pw, ph) = (w - ml - mr, h - mt - mb);
    let sx = |x: f64| ml + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| mt + ph - (y - y0) / (y1 - y0) * ph;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        s,
        r#"<rect width="{w}" height="{h}" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        ml + pw / 2.0,
        esc(title)
    );
    for t in ticks(x0, x1) {
        let _ = write!(
            s,
            r##"<line x1="{0:.1}" x2="{0:.1}" y1="{1:.1}" y2="{2:.1}" stroke="#eee"/><text x="{0:.1}" y="{3:.1}" text-anchor="middle">{4}</text>"##,
            sx(t),
            mt,
            mt + ph,
            mt + ph + 16.0,
            t
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
            (t * 1000.0).round() / 1000.0
        );
    }
    let _ = write!(
        s,
        r##"<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        ml + pw / 2.0,
        h - 12.0,
        esc(x_label)
    );
    let _ = write!(
        s,
        r#"<text transform="translate(16,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
        mt + ph / 2.0,
        esc(y_label)
    );
    for (i, se) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        if let Some(b) = &se.band {
            let mut d = String::new();
            for (k, (&(x, _), &(_, hi))) in se.points.iter().zip(b).enumerate() {
                let _ = write!(
                    d,
                    "{}{:.1},{:.1} ",
                    if k == 0 { "M" } else { "L" },
                    sx(x),
                    sy(hi)
                );
            }
            for (&(x, _), &(lo, _)) in se.points.iter().zip(b).rev() {
                let _ = write!(d, "L{:.1},{:.1} ", sx(x), sy(lo));
            }
            let _ = write!(
                s,
                r#"<path d="{d}Z" fill="{c}" fill-opacity="0.15" stroke="none"/>"#
            );
        }
        let pts: Vec<String> = se
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = write!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
            pts.join(" ")
        );
        for p in &pts {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = write!(s, r#"<circle cx="{x}" cy="{y}" r="2.5" fill="{c}"/>"#);
        }
        let ly = mt + 10.0 + i as f64 * 18.0;
        let _ = write!(
            s,
            r#"<line x1="{0}" x2="{1}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="3"/><text x="{2}" y="{3}">{4}</text>"#,
            w - mr + 12.0,
            w - mr + 32.0,
            w - mr + 38.0,
            ly + 4.0,
            esc(&se.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_well_formed_and_deterministic() {
        let s = vec![Series {
            name: "a<b".into(),
            points: vec![(0.0, 0.1), (1.0, 0.5), (2.0, f64::NAN)],
            band: Some(vec![(0.0, 0.2), (0.4, 0.6), (0.0, 0.0)]),
        }];
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
}
