//! Throughput with and without hooks: prompt tokens/s and generated tokens/s at several
//! batch sizes, laid out like llama.cpp's `llama-bench` (pp) and `llama-batched-bench` (tg),
//! so the two can be compared on one machine.

use std::collections::BTreeMap;

use crate::chat::Prompt;
use crate::engine::GenConfig;
use crate::error::Result;
use crate::hooks::{Capture, Edit, HookSet, Position, Scope};
use crate::model::Model;
use crate::util::Rng;

/// A hook configuration to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookConfig {
    None,
    CaptureAll,
    CvecAll,
    Project8,
}

impl HookConfig {
    pub const ALL: [HookConfig; 4] = [
        HookConfig::None,
        HookConfig::CaptureAll,
        HookConfig::CvecAll,
        HookConfig::Project8,
    ];
    pub fn name(self) -> &'static str {
        match self {
            HookConfig::None => "no hooks",
            HookConfig::CaptureAll => "capture, all layers",
            HookConfig::CvecAll => "control vector, all layers",
            HookConfig::Project8 => "projection, 8-layer window",
        }
    }
}

/// Sizes of the runs, named as in llama.cpp's tools.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Prompt length for the prompt-processing run (llama-bench `-p`).
    pub pp: usize,
    /// Prompt length per sequence for the generation runs (batched-bench `-npp`).
    pub npp: usize,
    /// Generated tokens per sequence (batched-bench `-ntg`).
    pub ntg: usize,
    /// Sequences generated together (batched-bench `-npl`).
    pub batches: Vec<usize>,
    pub repetitions: usize,
}

#[derive(Debug, Clone)]
pub struct BenchRow {
    pub hooks: HookConfig,
    /// 0 for the prompt-processing row.
    pub batch: usize,
    pub tokens_per_s: f64,
}

fn random_prompt(rng: &mut Rng, n: usize, n_vocab: usize) -> Prompt {
    // Ordinary text tokens only: ids above 100 and below the control tokens at the end.
    let tokens = (0..n)
        .map(|_| 100 + rng.below((n_vocab.min(100_000) - 200) as u64) as i32)
        .collect();
    Prompt {
        text: String::new(),
        tokens,
        instruction: 0..n,
        post_instruction: n..n,
    }
}

fn unit_random(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    let v: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    v.iter().map(|x| (x / norm) as f32 * scale).collect()
}

fn hooks_for(
    model: &Model,
    cfg: HookConfig,
    n_seqs: usize,
    generating: bool,
    rng: &mut Rng,
) -> Result<HookSet> {
    let (nl, ne) = (model.info.n_layer, model.info.n_embd);
    let mut h = HookSet::new(nl, ne);
    let all: Vec<usize> = (0..nl).collect();
    match cfg {
        HookConfig::CaptureAll => {
            // The last prompt token at every layer (the refusal-score position), and the mean
            // over generated tokens; both are rows llama.cpp keeps to the last layer anyway.
            h.add_capture(Capture::new(
                &all,
                Position::LastPrompt,
                vec![Some(0); n_seqs],
                1,
                nl,
                ne,
            ))?;
            if generating {
                h.add_capture(Capture::new(
                    &all,
                    Position::GeneratedMean,
                    vec![Some(0); n_seqs],
                    1,
                    nl,
                    ne,
                ))?;
            }
        }
        HookConfig::Project8 => {
            let start = nl / 2;
            let dirs = (start..(start + 8).min(nl))
                .map(|l| (l, unit_random(rng, ne, 1.0)))
                .collect();
            h.add_edit(Edit::project(dirs, Scope::All)?)?;
        }
        HookConfig::None | HookConfig::CvecAll => {}
    }
    Ok(h)
}

/// Runs every hook configuration at every size; `report` gets each row as it is measured.
///
/// Configurations are interleaved: each repetition runs every configuration once, on the same
/// prompts, so drift in the machine's speed (frequent on shared VMs) hits them all alike.
/// The best of the repetitions is reported; one untimed warm-up pass runs first.
///
/// # Errors
/// Any engine error.
pub fn run(
    model: &Model,
    cfg: &BenchConfig,
    configs: &[HookConfig],
    report: &mut dyn FnMut(&BenchRow),
) -> Result<Vec<BenchRow>> {
    let mut rng = Rng::new(1234);
    let mut session = model.session()?;
    let (nl, ne, n_vocab) = (model.info.n_layer, model.info.n_embd, model.info.n_vocab);
    let cvec: BTreeMap<usize, Vec<f32>> = (1..nl)
        .map(|l| (l, unit_random(&mut rng, ne, 0.01)))
        .collect();
    // Test 0 is prompt processing (one sequence of `pp` tokens); then generation at each size.
    let tests: Vec<usize> = std::iter::once(0)
        .chain(cfg.batches.iter().copied())
        .collect();
    let mut rows = Vec::new();
    for &b in &tests {
        let (prompts, gen): (Vec<Prompt>, GenConfig) = if b == 0 {
            (
                vec![random_prompt(&mut rng, cfg.pp, n_vocab)],
                GenConfig {
                    max_new_tokens: 0,
                    keep_first_logits: false,
                    ignore_eog: true,
                    digest: false,
                },
            )
        } else {
            (
                (0..b)
                    .map(|_| random_prompt(&mut rng, cfg.npp, n_vocab))
                    .collect(),
                GenConfig {
                    max_new_tokens: cfg.ntg + 1,
                    keep_first_logits: false,
                    ignore_eog: true,
                    digest: false,
                },
            )
        };
        let mut best = vec![0f64; configs.len()];
        for rep in 0..=cfg.repetitions {
            for (k, &hc) in configs.iter().enumerate() {
                session.set_control_vector((hc == HookConfig::CvecAll).then_some(&cvec))?;
                let mut h = hooks_for(model, hc, prompts.len(), b > 0, &mut rng)?;
                session.stats = Default::default();
                session.generate(&prompts, &gen, &mut h, &mut |_, _| false, &mut |_| {})?;
                let s = &session.stats;
                let tps = if b == 0 {
                    s.prompt_tokens as f64 / s.prompt_time.as_secs_f64()
                } else {
                    s.gen_tokens as f64 / s.gen_time.as_secs_f64()
                };
                // Repetition 0 warms caches and is not counted.
                if rep > 0 {
                    best[k] = best[k].max(tps);
                }
            }
        }
        for (k, &hc) in configs.iter().enumerate() {
            let row = BenchRow {
                hooks: hc,
                batch: b,
                tokens_per_s: best[k],
            };
            report(&row);
            rows.push(row);
        }
    }
    session.set_control_vector(None)?;
    Ok(rows)
}
