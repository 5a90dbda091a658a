//! A run's plots, one per experiment with a `plot` table: every point with its 95% interval,
//! the band experiment (random controls) pooled into one band under the lines, reference
//! experiments as flat lines with their interval, the steering layer marked when the x axis
//! counts layers, projection windows drawn as the span of layers each point covers, and a
//! log axis for geometric sweeps (coefficients 1, 2, 4, 8).

use std::collections::BTreeMap;

use super::plan::Plan;
use super::report::CondSummary;
use super::spec::{value_text, Condition, Metric};
use crate::hooks::EditKind;
use crate::plot::{Mark, Plot, Series, XScale};
use crate::stats::wilson;

/// How the x variable relates to layers, read off the conditions themselves.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Axis {
    /// x is the first layer of intervention `k` (E2's `layer`, a window's `start`).
    Layer(usize),
    /// x is intervention `k`'s first layer counted from the steering layer (E3's `after`).
    AfterSteer(usize),
    /// Anything else (a coefficient, a seed index).
    Other,
}

fn num(v: &toml::Value, i: usize) -> f64 {
    match v {
        toml::Value::Integer(x) => *x as f64,
        toml::Value::Float(x) => *x,
        _ => i as f64,
    }
}

fn axis(conds: &[&Condition], x: &str, steer: Option<usize>) -> Axis {
    let xs: Vec<Option<i64>> = conds
        .iter()
        .map(|c| c.var(x).and_then(toml::Value::as_integer))
        .collect();
    if conds.is_empty() || xs.iter().any(Option::is_none) {
        return Axis::Other;
    }
    let n = conds
        .iter()
        .map(|c| c.interventions.len())
        .min()
        .unwrap_or(0);
    for k in (0..n).rev() {
        let first = |c: &Condition| c.interventions[k].layers.first().map(|&l| l as i64);
        if conds.iter().zip(&xs).all(|(c, x)| first(c) == *x) {
            return Axis::Layer(k);
        }
        if let Some(s) = steer {
            if conds
                .iter()
                .zip(&xs)
                .all(|(c, x)| first(c).map(|f| f - s as i64) == *x)
            {
                return Axis::AfterSteer(k);
            }
        }
    }
    Axis::Other
}

/// `(name, svg)` for each plotted experiment.
pub fn plots(plan: &Plan, s: &[CondSummary]) -> Vec<(String, String)> {
    let metric = plan.spec.metric;
    let steer = plan.resolved.steer_layer;
    let y_label = match metric {
        Metric::Generate => "refusal rate",
        Metric::Score => "mean refusal score (log-odds)",
    };
    let mut out = vec![];
    for e in &plan.spec.experiment {
        let Some(p) = &e.plot else { continue };
        let conds: Vec<(usize, &Condition)> = plan
            .conditions
            .iter()
            .enumerate()
            .filter(|(_, c)| c.experiment == e.id)
            .collect();
        let xs = &e.sweep[&p.x];
        let xpos = |c: &Condition| {
            let v = c.var(&p.x).expect("plot.x is a sweep variable");
            num(v, xs.iter().position(|x| x == v).unwrap_or(0))
        };
        let ax = axis(&conds.iter().map(|x| x.1).collect::<Vec<_>>(), &p.x, steer);
        // Series in first-seen order; each point with its interval and, for projections
        // over several layers, the span of x it covers.
        type Pts = Vec<(f64, f64, (f64, f64), Option<(f64, f64)>)>;
        let mut series: BTreeMap<String, Pts> = BTreeMap::new();
        let mut order: Vec<String> = vec![];
        for &(i, c) in &conds {
            let key = if p.series.is_empty() {
                e.id.clone()
            } else {
                p.series
                    .iter()
                    .map(|k| format!("{k}={}", c.var(k).map(value_text).unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if !series.contains_key(&key) {
                order.push(key.clone());
            }
            let x = xpos(c);
            let span = match ax {
                Axis::Layer(k) | Axis::AfterSteer(k)
                    if c.interventions[k].op == EditKind::Project =>
                {
                    let l = &c.interventions[k].layers;
                    (l.len() > 1).then(|| (x, x + (l[l.len() - 1] - l[0]) as f64))
                }
                _ => None,
            };
            let (y, iv) = s[i].estimate(metric);
            series.entry(key).or_default().push((x, y, iv, span));
        }
        let mut list: Vec<Series> = vec![];
        if let Some(b) = &p.band {
            // The band experiment pooled at each x: refusals over all its conditions there
            // (Wilson), or the mean of their scores and the extremes of their intervals.
            let mut at: BTreeMap<i64, (usize, usize, f64, f64, f64, usize)> = BTreeMap::new();
            for (i, c) in plan
                .conditions
                .iter()
                .enumerate()
                .filter(|(_, c)| &c.experiment == b)
            {
                let Some(v) = c.var(&p.x) else { continue };
                let x = num(v, xs.iter().position(|x| x == v).unwrap_or(0));
                let k = (x * 1e6).round() as i64;
                let e = at.entry(k).or_insert((0, 0, 0.0, f64::MAX, f64::MIN, 0));
                let c = &s[i];
                *e = (
                    e.0 + c.refusal,
                    e.1 + c.n,
                    e.2 + c.score_mean,
                    e.3.min(c.score_ci.0),
                    e.4.max(c.score_ci.1),
                    e.5 + 1,
                );
            }
            if !at.is_empty() {
                let n = at.values().map(|v| v.5).max().unwrap_or(0);
                let pts: Vec<(f64, f64)> = at
                    .iter()
                    .map(|(k, v)| {
                        let y = match metric {
                            Metric::Generate => v.0 as f64 / v.1.max(1) as f64,
                            Metric::Score => v.2 / v.5 as f64,
                        };
                        (*k as f64 / 1e6, y)
                    })
                    .collect();
                let band = at
                    .values()
                    .map(|v| match metric {
                        Metric::Generate => wilson(v.0, v.1),
                        Metric::Score => (v.3, v.4),
                    })
                    .collect();
                list.push(Series::band(
                    format!("{b} (random, {n} dirs pooled)"),
                    pts,
                    band,
                ));
            }
        }
        for r in &p.reference {
            if let Some((i, _)) = plan
                .conditions
                .iter()
                .enumerate()
                .find(|(_, c)| &c.experiment == r)
            {
                let (y, iv) = s[i].estimate(metric);
                list.push(Series::reference(r.to_string(), y, Some(iv)));
            }
        }
        for k in order {
            let mut pts = series.remove(&k).unwrap_or_default();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let spans: Vec<(f64, f64)> = pts
                .iter()
                .map(|p| p.3.unwrap_or((f64::NAN, f64::NAN)))
                .collect();
            let mut se = Series::line(k, pts.iter().map(|p| (p.0, p.1)).collect())
                .with_intervals(pts.iter().map(|p| p.2).collect());
            if spans.iter().any(|s| s.0.is_finite()) {
                se = se.with_spans(spans);
            }
            list.push(se);
        }
        let title = if e.title.is_empty() {
            e.id.clone()
        } else {
            format!("{}: {}", e.id, e.title)
        };
        let (x_label, marks) = match (ax, steer) {
            (Axis::Layer(_), Some(l)) => (
                if p.x == "layer" {
                    p.x.clone()
                } else {
                    format!("{} (layer)", p.x)
                },
                vec![Mark {
                    x: l as f64,
                    label: format!("steering layer {l}"),
                }],
            ),
            (Axis::AfterSteer(_), Some(l)) => (
                format!("{}: window start, layers after the steering layer {l}", p.x),
                vec![Mark {
                    x: 0.0,
                    label: format!("steering layer {l}"),
                }],
            ),
            _ => (p.x.clone(), vec![]),
        };
        let x_values: Vec<f64> = conds.iter().map(|(_, c)| xpos(c)).collect();
        let plot = Plot {
            y_range: (metric == Metric::Generate).then_some((0.0, 1.0)),
            x_scale: if ax == Axis::Other {
                XScale::for_values(&x_values)
            } else {
                XScale::Linear
            },
            marks,
            ..Plot::new(title, x_label, y_label)
        };
        out.push((e.id.clone(), plot.svg(&list)));
    }
    out
}
