//! Layer and position selection for the refusal direction (Arditi et al. 2024, §C), and the
//! same scoring used to rank persona-direction steering layers.
//!
//! The *refusal score* is the log-odds of the probability mass on refusal-opening tokens
//! ("I", "As", "Sorry", … found in the model's vocabulary) at the first response position.
//! Each candidate (position, layer) gets: a bypass score (harmful validation prompts, the
//! candidate projected out at every layer), an induce score (harmless prompts, the raw vector
//! added at its own layer), and the KL divergence of the next-token distribution on harmless
//! prompts under the projection. Candidates at layers ≥ 0.8·n_layer, with KL > 0.1 or with
//! induce < 0 are discarded; the lowest bypass score wins. Many candidates run in one batch
//! through per-sequence hooks.

use std::collections::BTreeMap;

use super::{Direction, DirectionFile};
use crate::chat::Prompt;
use crate::engine::{GenConfig, Session};
use crate::error::{Empty, Error, Result};
use crate::ffi::Token;
use crate::hooks::{Edit, HookSet, Scope};
use crate::model::Model;
use crate::stats::{kl, log_softmax, mean};
use crate::text::csv_table;

/// Words whose first token opens a refusal.
pub const REFUSAL_OPENERS: &[&str] = &[
    "I",
    "As",
    "Sorry",
    "Unfortunately",
    "My",
    "Apologies",
    "Unable",
];
/// Arditi et al.'s filters.
pub const MAX_LAYER_FRACTION: f64 = 0.8;
pub const MAX_KL: f64 = 0.1;

/// The distinct first tokens of the refusal openers, with and without a leading space.
///
/// # Errors
/// Tokenizer failures.
pub fn refusal_tokens(model: &Model) -> Result<Vec<Token>> {
    let mut v = Vec::new();
    for w in REFUSAL_OPENERS {
        for s in [w.to_string(), format!(" {w}")] {
            if let Some(&t) = model.tokenize(&s)?.first() {
                v.push(t);
            }
        }
    }
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

/// Log-odds are capped at ±this, so a certain answer stays a finite number in CSVs.
pub const MAX_LOG_ODDS: f64 = 100.0;

/// log p(refusal) − log(1 − p(refusal)) at one position, computed in log space so that tiny
/// and near-certain probabilities keep their precision.
pub fn refusal_score(logits: &[f32], tokens: &[Token]) -> f64 {
    let lp = log_softmax(logits);
    let sel: Vec<f64> = tokens
        .iter()
        .filter_map(|&t| lp.get(t as usize).copied())
        .collect();
    if sel.is_empty() {
        return -MAX_LOG_ODDS;
    }
    let m = sel.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
    let log_p = (m + sel.iter().map(|x| (x - m).exp()).sum::<f64>().ln()).min(0.0);
    // log(1 - p) from log p, stable on both sides of p = 1/2.
    let log_q = if log_p > -std::f64::consts::LN_2 {
        (-log_p.exp_m1()).ln()
    } else {
        (-log_p.exp()).ln_1p()
    };
    (log_p - log_q).clamp(-MAX_LOG_ODDS, MAX_LOG_ODDS)
}

/// One grid point for [`score_conditions`]: edits applied to that condition's copy of the prompts.
pub type EditsFor<'a> = dyn Fn(usize) -> Result<Vec<Edit>> + 'a;

/// Evaluates `n_cond` conditions on `prompts` with first-token logits only, `chunk`
/// conditions per batch through per-sequence hooks. `metric(cond, prompt, logits)` reduces each
/// logit vector at once, so memory does not grow with the grid.
///
/// # Errors
/// Engine errors.
pub fn score_conditions(
    session: &mut Session<'_>,
    prompts: &[Prompt],
    n_cond: usize,
    edits_for: &EditsFor<'_>,
    chunk: usize,
    metric: &mut dyn FnMut(usize, usize, &[f32]) -> f64,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Vec<f64>>> {
    let info = &session.model().info;
    let (nl, ne) = (info.n_layer, info.n_embd);
    let n = prompts.len();
    let mut out = vec![vec![0.0; n]; n_cond];
    let cfg = GenConfig {
        max_new_tokens: 0,
        keep_first_logits: true,
        ignore_eog: false,
        digest: false,
        ..GenConfig::default()
    };
    let mut start = 0;
    while start < n_cond {
        let end = (start + chunk.max(1)).min(n_cond);
        let mut batch = Vec::with_capacity((end - start) * n);
        let mut hooks = HookSet::new(nl, ne);
        for (k, c) in (start..end).enumerate() {
            batch.extend_from_slice(prompts);
            let seqs: Vec<usize> = (k * n..(k + 1) * n).collect();
            for mut e in edits_for(c)? {
                e.scope = Scope::only(seqs.clone());
                hooks.add_edit(e)?;
            }
        }
        let g = session.generate(&batch, &cfg, &mut hooks, &mut |_, _| false, &mut |_| {})?;
        for (i, g) in g.iter().enumerate() {
            let (c, p) = (start + i / n, i % n);
            out[c][p] = metric(
                c,
                p,
                g.first_logits
                    .as_deref()
                    .expect("keep_first_logits was set"),
            );
        }
        progress(end - start);
        start = end;
    }
    Ok(out)
}

/// Scores of one refusal-direction candidate.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub direction: String,
    pub layer: usize,
    pub bypass: f64,
    pub induce: f64,
    pub kl: f64,
    /// Why it was discarded, if it was.
    pub discarded: Option<String>,
}

/// The result of selection: every candidate, the baselines, and the choice.
#[derive(Debug, Clone)]
pub struct Selection {
    pub candidates: Vec<Candidate>,
    pub baseline_harmful: f64,
    pub baseline_harmless: f64,
    pub chosen: Option<usize>,
}

impl Selection {
    /// One row per candidate; `chosen` marks the winner.
    pub fn to_csv(&self) -> Vec<u8> {
        csv_table(
            &[
                "direction",
                "layer",
                "bypass_score",
                "induce_score",
                "kl",
                "discarded",
                "chosen",
            ],
            self.candidates.iter().enumerate().map(|(i, c)| {
                vec![
                    c.direction.clone(),
                    c.layer.to_string(),
                    format!("{:.6}", c.bypass),
                    format!("{:.6}", c.induce),
                    format!("{:.6}", c.kl),
                    c.discarded.clone().unwrap_or_default(),
                    (Some(i) == self.chosen).to_string(),
                ]
            }),
        )
    }

    /// Says which candidate was chosen and why, in one sentence.
    pub fn explain(&self) -> String {
        let kept = self
            .candidates
            .iter()
            .filter(|c| c.discarded.is_none())
            .count();
        match self.chosen.map(|i| &self.candidates[i]) {
            Some(c) => format!(
                "chose {} at layer {}: lowest bypass score {:.3} (baseline harmful {:.3}) among {kept} of {} candidates kept (layer < {:.0}% depth, KL ≤ {MAX_KL}, induce ≥ 0); its induce score is {:.3} (baseline harmless {:.3}), KL {:.4}",
                c.direction, c.layer, c.bypass, self.baseline_harmful, self.candidates.len(), MAX_LAYER_FRACTION * 100.0, c.induce, self.baseline_harmless, c.kl
            ),
            None => format!("no candidate passed the filters ({} scored); see the CSV for each one's reason", self.candidates.len()),
        }
    }
}

/// Scores every (direction, layer) candidate of a refusal-direction file on validation sets.
///
/// # Errors
/// Shape mismatch, empty validation sets, engine errors.
pub fn select_refusal(
    model: &Model,
    file: &DirectionFile,
    harmful_val: &[Prompt],
    harmless_val: &[Prompt],
    layers: &[usize],
    chunk: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Selection> {
    file.check_model(&model.info)?;
    if harmful_val.is_empty() || harmless_val.is_empty() {
        return Err(Error::Empty(Empty::SelectionSets));
    }
    let nl = model.info.n_layer;
    let toks = refusal_tokens(model)?;
    let mut session = model.session()?;
    let empty = HookSet::new(nl, model.info.n_embd);
    let base_h = session.first_logits(harmful_val, &mut empty.clone())?;
    let base_l = session.first_logits(harmless_val, &mut empty.clone())?;
    let baseline_harmful = mean(
        &base_h
            .iter()
            .map(|l| refusal_score(l, &toks))
            .collect::<Vec<_>>(),
    );
    let baseline_harmless = mean(
        &base_l
            .iter()
            .map(|l| refusal_score(l, &toks))
            .collect::<Vec<_>>(),
    );
    let cands: Vec<(&Direction, usize)> = file
        .directions
        .iter()
        .flat_map(|d| layers.iter().map(move |&l| (d, l)))
        .collect();
    let nc = cands.len();
    let total = 3 * nc;
    let mut done = 0;
    let all: Vec<usize> = (0..nl).collect();
    let project_all = |c: usize| -> Result<Vec<Edit>> {
        let (d, l) = cands[c];
        Ok(vec![Edit::project(
            all.iter().map(|&k| (k, d.rows[l].clone())).collect(),
            Scope::All,
        )?])
    };
    let add_own = |c: usize| -> Result<Vec<Edit>> {
        let (d, l) = cands[c];
        Ok(vec![Edit::add(
            BTreeMap::from([(l, d.rows[l].clone())]),
            Scope::All,
        )])
    };
    let mut tick = |k: usize| {
        done += k;
        progress(done, total);
    };
    let bypass = score_conditions(
        &mut session,
        harmful_val,
        nc,
        &project_all,
        chunk,
        &mut |_, _, lg| refusal_score(lg, &toks),
        &mut tick,
    )?;
    let induce = score_conditions(
        &mut session,
        harmless_val,
        nc,
        &add_own,
        chunk,
        &mut |_, _, lg| refusal_score(lg, &toks),
        &mut tick,
    )?;
    let kls = score_conditions(
        &mut session,
        harmless_val,
        nc,
        &project_all,
        chunk,
        &mut |_, p, lg| kl(&base_l[p], lg),
        &mut tick,
    )?;
    let mut candidates = Vec::with_capacity(nc);
    for (c, &(d, l)) in cands.iter().enumerate() {
        let (b, i, k) = (mean(&bypass[c]), mean(&induce[c]), mean(&kls[c]));
        let discarded = if l as f64 >= MAX_LAYER_FRACTION * nl as f64 {
            Some(format!(
                "layer >= {:.0}% of depth",
                MAX_LAYER_FRACTION * 100.0
            ))
        } else if k.is_nan() || k > MAX_KL {
            Some(format!("KL {k:.3} > {MAX_KL}"))
        } else if i < 0.0 {
            Some(format!("induce {i:.3} < 0"))
        } else if !b.is_finite() {
            Some("non-finite bypass score".into())
        } else {
            None
        };
        candidates.push(Candidate {
            direction: d.name.clone(),
            layer: l,
            bypass: b,
            induce: i,
            kl: k,
            discarded,
        });
    }
    // Lowest bypass; ties broken by order (direction name, then layer) for determinism.
    let chosen = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.discarded.is_none())
        .min_by(|a, b| a.1.bypass.total_cmp(&b.1.bypass))
        .map(|(i, _)| i);
    Ok(Selection {
        candidates,
        baseline_harmful,
        baseline_harmless,
        chosen,
    })
}

/// How far adding a multiple of a persona direction at each layer lowers the mean refusal
/// score on harmful prompts.
#[derive(Debug, Clone)]
pub struct PersonaRanking {
    pub direction: String,
    pub coefficient: f32,
    /// The mean refusal score without steering.
    pub baseline: f64,
    /// `(layer, mean score)`, best (lowest) first; never empty.
    pub ranked: Vec<(usize, f64)>,
}

impl PersonaRanking {
    /// One row per layer: layer, coefficient, mean score, difference from the baseline.
    pub fn to_csv(&self) -> Vec<u8> {
        csv_table(
            &[
                "layer",
                "coefficient",
                "mean_refusal_score",
                "delta_vs_baseline",
            ],
            self.ranked.iter().map(|(l, sc)| {
                vec![
                    l.to_string(),
                    self.coefficient.to_string(),
                    format!("{sc:.6}"),
                    format!("{:.6}", sc - self.baseline),
                ]
            }),
        )
    }

    /// The one-line verdict: which layer lowers the score most.
    pub fn explain(&self) -> String {
        let (l, sc) = self.ranked[0];
        format!(
            "baseline mean refusal score {:.3}; steering with {} x {} lowers it most at layer {l} ({sc:.3})",
            self.baseline, self.coefficient, self.direction
        )
    }
}

/// Ranks the steering layers of a persona direction: `coefficient` × its row added at each
/// of `layers` in turn, scored by the mean first-token refusal score on `harmful`.
///
/// # Errors
/// Shape mismatch, engine errors.
pub fn rank_persona_layers(
    model: &Model,
    persona: &Direction,
    coefficient: f32,
    harmful: &[Prompt],
    layers: &[usize],
    chunk: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PersonaRanking> {
    if layers.is_empty() {
        return Err(Error::Empty(Empty::RankLayers));
    }
    let toks = refusal_tokens(model)?;
    let mut session = model.session()?;
    let base = session.first_logits(
        harmful,
        &mut HookSet::new(model.info.n_layer, model.info.n_embd),
    )?;
    let baseline = mean(
        &base
            .iter()
            .map(|l| refusal_score(l, &toks))
            .collect::<Vec<_>>(),
    );
    let add = |c: usize| -> Result<Vec<Edit>> {
        let l = layers[c];
        Ok(vec![Edit::add(
            BTreeMap::from([(l, persona.rows[l].iter().map(|x| x * coefficient).collect())]),
            Scope::All,
        )])
    };
    let mut done = 0;
    let scores = score_conditions(
        &mut session,
        harmful,
        layers.len(),
        &add,
        chunk,
        &mut |_, _, lg| refusal_score(lg, &toks),
        &mut |k| {
            done += k;
            progress(done, layers.len());
        },
    )?;
    let mut ranked: Vec<(usize, f64)> = layers
        .iter()
        .zip(&scores)
        .map(|(&l, s)| (l, mean(s)))
        .collect();
    ranked.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    Ok(PersonaRanking {
        direction: persona.name.clone(),
        coefficient,
        baseline,
        ranked,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_is_log_odds() {
        // Two tokens, equal logits: p = 0.5 -> 0.
        assert!(refusal_score(&[1.0, 1.0], &[0]).abs() < 1e-12);
        // p = e^2/(e^2+1) -> log-odds 2.
        assert!((refusal_score(&[2.0, 0.0], &[0]) - 2.0).abs() < 1e-9);
        assert!(refusal_score(&[0.0, 50.0], &[0]) < -40.0);
    }
}
