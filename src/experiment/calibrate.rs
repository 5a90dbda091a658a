//! Steering calibration: the steering layer and coefficient chosen by first-token refusal
//! scores (score mode), the largest coefficient at every candidate layer first, then the
//! other coefficients at the best layer; the smallest coefficient reaching the target wins.

use std::collections::BTreeMap;

use super::plan::{CalibrationRow, Progress, Resolved};
use super::spec::{fmt_num, SteerSpec};
use crate::chat::Prompt;
use crate::directions::select::{refusal_score, refusal_tokens, score_conditions};
use crate::directions::Direction;
use crate::error::{Error, Result, ValueOf};
use crate::experiment::steer::add_vector;
use crate::hooks::{Edit, HookSet, LayerSet, Scope};
use crate::model::Model;
use crate::stats::mean;

/// Calibrates `s` with direction `d` on the rendered prompts `ps` (with their residual norms
/// when the scale is relative), and records layer, coefficient, rows and baseline in
/// `resolved`.
///
/// # Errors
/// A bad layer list, engine errors, non-finite scores.
#[allow(clippy::too_many_arguments)]
pub fn calibrate(
    s: &SteerSpec,
    model: &Model,
    d: &Direction,
    ps: &[Prompt],
    norms: Option<Vec<f64>>,
    resolved: &mut Resolved,
    progress: &mut Progress<'_>,
    note: &mut dyn FnMut(String),
) -> Result<()> {
    let nl = model.info.n_layer;
    let ne = model.info.n_embd;
    let layers = LayerSet::parse(&s.layers, nl).map_err(|e| Error::Field {
        field: "steer.layers".into(),
        err: Box::new(e),
    })?;
    let toks = refusal_tokens(model)?;
    let mut session = model.session()?;
    let cmax = s.coefficients.iter().copied().fold(f64::MIN, f64::max);
    let vec_at = |l: usize, c: f64| -> Vec<f32> {
        add_vector(&d.rows[l], c, s.scale, norms.as_ref().map(|n| n[l]))
    };
    let base = session.first_logits(ps, &mut HookSet::new(nl, ne))?;
    let baseline = mean(
        &base
            .iter()
            .map(|l| refusal_score(l, &toks))
            .collect::<Vec<_>>(),
    );
    let total = layers.len() + s.coefficients.len();
    let mut done = 0;
    // Mean scores of the prompts under each (layer, coefficient) add, counted into one
    // progress bar across both passes.
    let mut score = |points: &[(usize, f64)]| -> Result<Vec<Vec<f64>>> {
        score_conditions(
            &mut session,
            ps,
            points.len(),
            &|c| {
                let (l, coef) = points[c];
                Ok(vec![Edit::add(
                    BTreeMap::from([(l, vec_at(l, coef))]),
                    Scope::All,
                )])
            },
            4,
            &mut |_, _, lg| refusal_score(lg, &toks),
            &mut |k| {
                done += k;
                progress("calibrate", done, total, &s.direction);
            },
        )
    };
    let by_layer = score(&layers.iter().map(|&l| (l, cmax)).collect::<Vec<_>>())?;
    let mut rows: Vec<CalibrationRow> = layers
        .iter()
        .zip(&by_layer)
        .map(|(&l, v)| CalibrationRow {
            layer: l,
            coefficient: cmax,
            mean_score: mean(v),
        })
        .collect();
    let best = rows
        .iter()
        .min_by(|a, b| {
            a.mean_score
                .total_cmp(&b.mean_score)
                .then(a.layer.cmp(&b.layer))
        })
        .map(|r| r.layer)
        .expect("layers are non-empty");
    let others: Vec<f64> = s
        .coefficients
        .iter()
        .copied()
        .filter(|&c| c != cmax)
        .collect();
    let by_coef = score(&others.iter().map(|&c| (best, c)).collect::<Vec<_>>())?;
    for (&c, v) in others.iter().zip(&by_coef) {
        rows.push(CalibrationRow {
            layer: best,
            coefficient: c,
            mean_score: mean(v),
        });
    }
    let mut at_best: Vec<&CalibrationRow> = rows.iter().filter(|r| r.layer == best).collect();
    at_best.sort_by(|a, b| a.coefficient.total_cmp(&b.coefficient));
    let coef = at_best
        .iter()
        .find(|r| r.mean_score <= s.target)
        .unwrap_or(at_best.last().expect("at least the largest coefficient"))
        .coefficient;
    for r in &rows {
        if !r.mean_score.is_finite() {
            return Err(Error::Value {
                what: ValueOf::CalibrationScore {
                    coefficient: r.coefficient,
                },
                layer: r.layer,
                value: r.mean_score,
            });
        }
    }
    let why = if layers.len() == 1 && s.coefficients.len() == 1 {
        let score = at_best.first().map_or(f64::NAN, |r| r.mean_score);
        format!("fixed by the spec; mean refusal score {score:.2}")
    } else {
        format!("smallest with mean refusal score <= {}", fmt_num(s.target))
    };
    note(format!(
        "steering: {} at layer {best}, coefficient {} ({why}; baseline {baseline:.2})",
        s.direction,
        fmt_num(coef),
    ));
    resolved.steer_layer = Some(best);
    resolved.steer_coef = Some(coef);
    resolved.calibration = rows;
    resolved.calibration_baseline = Some(baseline);
    Ok(())
}
