//! Batched evaluation and greedy generation of many prompts, with hooks.
//!
//! Prompts run in *waves* of up to `--parallel` sequences, in prompt order, so a batch's
//! composition depends only on the inputs (deterministic output). Each sequence has its own
//! KV stream (`kv_unified = false`), so its cells start at 0 exactly as when it runs alone.
//!
//! The eval callback sees rows, not sequences, so every decode call is shaped to be exactly
//! one llama.cpp ubatch with rows in the order we pushed them:
//! - prefill: one sequence per call, at most `n_batch` = `n_ubatch` tokens. A prompt's
//!   activations are then bit-identical whatever else is in the wave (measured: with a
//!   unified KV cache they moved by up to 0.24 at `resid_post.10` of SmolLM2, depending on
//!   where the prompt's cells landed);
//! - generation: one token from each of a run of consecutive sequence ids (llama.cpp's split
//!   for per-sequence streams takes consecutive ids only). Finished sequences inside the run
//!   are fed as padding rows that hooks skip, so the run never breaks into several ubatches.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::chat::Prompt;
use crate::error::{Error, Result};
use crate::ffi::{self, Token};
use crate::hooks::{Capture, HookSet, Position, RowInfo, RowKind};
use crate::model::Model;

/// Why a sequence stopped generating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// End of generation token (EOS/EOT); not included in the tokens.
    Eog,
    MaxTokens,
    /// The caller's predicate said the outcome was settled.
    Predicate,
}

/// Greedy generation settings.
#[derive(Debug, Clone)]
pub struct GenConfig {
    /// 0 evaluates prompts only (first-response logits, captures at prompt positions).
    pub max_new_tokens: usize,
    /// Keep the full logits at the first response position (for refusal scores, KL).
    pub keep_first_logits: bool,
    /// Keep generating past end-of-generation tokens (benchmarks only).
    pub ignore_eog: bool,
}

/// One prompt's result.
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<Token>,
    pub text: String,
    pub stop: StopReason,
    /// Logits predicting the first response token, if asked for.
    pub first_logits: Option<Vec<f32>>,
}

/// Token and time counters, for the benchmark.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub prompt_tokens: u64,
    pub prompt_time: Duration,
    pub gen_tokens: u64,
    pub gen_time: Duration,
}

/// A decoding session over a model: one llama.cpp context, reused across calls.
pub struct Session<'m> {
    model: &'m Model,
    ctx: ffi::Context<'m>,
    batch: ffi::Batch,
    arch_checked: bool,
    pub stats: Stats,
}

/// Tolerance for checking that the native control vector really was added: llama.cpp adds it
/// in f32 inside the graph, the probe compares two separate decodes.
const CVEC_PROBE_TOL: f32 = 1e-3;

/// The greedy choice: the first index of the largest logit.
pub fn argmax(x: &[f32]) -> Token {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as Token
}

impl Model {
    /// Opens a decoding session with this model's options.
    ///
    /// # Errors
    /// llama.cpp context creation failures (usually memory).
    pub fn session(&self) -> Result<Session<'_>> {
        let o = &self.options;
        if o.parallel == 0 || o.batch == 0 || o.ctx == 0 {
            return Err(Error::Invalid(
                "--parallel, --batch and --ctx must be at least 1".into(),
            ));
        }
        let ctx = ffi::Context::new(
            &self.raw,
            ffi::ContextParams {
                n_ctx_seq: o.ctx,
                n_batch: o.batch,
                n_seq_max: o.parallel.min(256),
                n_threads: o.threads,
                flash_attn: o.flash_attn,
            },
        )?;
        Ok(Session {
            model: self,
            ctx,
            batch: ffi::Batch::new(o.batch as usize),
            arch_checked: false,
            stats: Stats::default(),
        })
    }
}

struct SeqState {
    global: usize,
    tokens: Vec<Token>,
    done: Option<StopReason>,
    first_logits: Option<Vec<f32>>,
}

impl<'m> Session<'m> {
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// Runs one decode call with the rows pushed so far, then checks (once) that the graph
    /// exposes `l_out-<il>` for every layer: our hooks attach nowhere else.
    fn flush(&mut self, rows: &mut Vec<RowInfo>, hooks: &mut HookSet) -> Result<()> {
        let visitor: Option<&mut dyn ffi::LayerVisitor> = if hooks.is_empty() {
            None
        } else {
            hooks.set_rows(std::mem::take(rows));
            Some(hooks)
        };
        let res = self.ctx.decode(&self.batch, visitor);
        rows.clear();
        res?;
        if !self.arch_checked {
            let missing: Vec<usize> = self
                .ctx
                .l_out_layers_seen()
                .iter()
                .enumerate()
                .filter(|(_, s)| !**s)
                .map(|(i, _)| i)
                .collect();
            if !missing.is_empty() {
                return Err(Error::Arch {
                    arch: self.model.info.arch.clone(),
                    msg: format!("its llama.cpp graph has no l_out-<il> tensor for layers {missing:?}; residual hooks cannot attach"),
                });
            }
            self.arch_checked = true;
        }
        Ok(())
    }

    /// Picks the next wave: up to `--parallel` prompts from `start`, each fitting `--ctx`.
    fn wave(&self, prompts: &[Prompt], start: usize, max_new: usize) -> Result<usize> {
        let o = &self.model.options;
        let end = (start + o.parallel as usize).min(prompts.len());
        for (i, p) in prompts.iter().enumerate().take(end).skip(start) {
            // Padding steps never run past the wave's last step, so this bounds every stream.
            if p.tokens.len() + max_new > o.ctx as usize {
                return Err(Error::Invalid(format!(
                    "prompt {i} needs {} tokens + {max_new} new > --ctx {} per sequence; shorten it or raise --ctx",
                    p.tokens.len(),
                    o.ctx
                )));
            }
        }
        Ok(end)
    }

    /// Greedy generation for every prompt, batched. `stop(i, tokens)` may end prompt `i`
    /// early once its outcome is settled. Hooks see every prompt and generated row.
    ///
    /// # Errors
    /// Decode or hook failures, a prompt that does not fit the context, or a registered hook
    /// that touched nothing.
    pub fn generate(
        &mut self,
        prompts: &[Prompt],
        cfg: &GenConfig,
        hooks: &mut HookSet,
        stop: &mut dyn FnMut(usize, &[Token]) -> bool,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<Generation>> {
        let mut out = Vec::with_capacity(prompts.len());
        let mut start = 0;
        while start < prompts.len() {
            let end = self.wave(prompts, start, cfg.max_new_tokens)?;
            out.extend(self.run_wave(prompts, start..end, cfg, hooks, stop)?);
            progress(end - start);
            start = end;
        }
        if !hooks.is_empty() {
            hooks.check_touched()?;
        }
        Ok(out)
    }

    /// Takes the greedy token from a sequence's logits. Non-finite logits (an overflowing
    /// edit, a broken model file) end the run with the sequence's name rather than letting
    /// argmax pick a token from NaNs.
    fn accept(
        &mut self,
        s: &mut SeqState,
        logits: &[f32],
        cfg: &GenConfig,
        hooks: &HookSet,
        stop: &mut dyn FnMut(usize, &[Token]) -> bool,
    ) -> Result<()> {
        if let Some(bad) = logits.iter().position(|x| !x.is_finite()) {
            let whose = match hooks.seq_label(s.global) {
                Some(n) => n.to_string(),
                None => format!("prompt {}", s.global),
            };
            return Err(Error::Invalid(format!(
                "non-finite logit {} (token id {bad}) at generated token {} of {whose}",
                logits[bad],
                s.tokens.len(),
            )));
        }
        if cfg.keep_first_logits && s.first_logits.is_none() {
            s.first_logits = Some(logits.to_vec());
        }
        if cfg.max_new_tokens == 0 {
            s.done = Some(StopReason::MaxTokens);
            return Ok(());
        }
        let t = argmax(logits);
        if self.model.is_eog(t) && !cfg.ignore_eog {
            s.done = Some(StopReason::Eog);
            return Ok(());
        }
        s.tokens.push(t);
        if s.tokens.len() >= cfg.max_new_tokens {
            s.done = Some(StopReason::MaxTokens);
        } else if stop(s.global, &s.tokens) {
            s.done = Some(StopReason::Predicate);
        }
        Ok(())
    }

    fn run_wave(
        &mut self,
        prompts: &[Prompt],
        range: std::ops::Range<usize>,
        cfg: &GenConfig,
        hooks: &mut HookSet,
        stop: &mut dyn FnMut(usize, &[Token]) -> bool,
    ) -> Result<Vec<Generation>> {
        self.ctx.clear_kv();
        let mut seqs: Vec<SeqState> = range
            .clone()
            .map(|g| SeqState {
                global: g,
                tokens: vec![],
                done: None,
                first_logits: None,
            })
            .collect();
        // Prefill: one sequence per decode call, in chunks of n_batch tokens.
        let t0 = Instant::now();
        let mut rows = Vec::new();
        for (slot, g) in range.clone().enumerate() {
            let p = &prompts[g];
            let len = p.tokens.len();
            if len == 0 {
                return Err(Error::Invalid(format!("prompt {g} is empty")));
            }
            for (c, chunk) in p.tokens.chunks(self.batch.capacity()).enumerate() {
                self.batch.clear();
                let base = c * self.batch.capacity();
                for (k, &t) in chunk.iter().enumerate() {
                    let idx = base + k;
                    let kind = RowKind::Prompt {
                        idx: idx as u32,
                        len: len as u32,
                        post_start: p.post_instruction.start as u32,
                    };
                    let output = idx + 1 == len || hooks.needs_row_at_last_layer(g, kind);
                    self.batch.push(t, idx as i32, slot as i32, output);
                    rows.push(RowInfo {
                        seq: g,
                        kind,
                        output,
                    });
                }
                self.flush(&mut rows, hooks)?;
                self.stats.prompt_tokens += chunk.len() as u64;
            }
            let logits = self.ctx.logits(self.batch.len() - 1).to_vec();
            self.accept(&mut seqs[slot], &logits, cfg, hooks, stop)?;
        }
        self.stats.prompt_time += t0.elapsed();
        // Generation: one token per sequence per step, over the run of slots from the first to
        // the last live one; finished slots inside the run are padding.
        let t1 = Instant::now();
        // The next free KV position of each sequence: a finished sequence's padding goes
        // there (positions within a sequence must stay consecutive). A token accepted but
        // not yet fed back does not occupy a position.
        let mut pad_pos: Vec<usize> = seqs
            .iter()
            .map(|s| prompts[s.global].tokens.len())
            .collect();
        loop {
            let live: Vec<usize> = (0..seqs.len())
                .filter(|&i| seqs[i].done.is_none())
                .collect();
            let (Some(&first), Some(&last)) = (live.first(), live.last()) else {
                break;
            };
            self.batch.clear();
            for (slot, s) in seqs.iter().enumerate().take(last + 1).skip(first) {
                if s.done.is_none() {
                    let k = s.tokens.len() - 1;
                    let pos = prompts[s.global].tokens.len() + k;
                    self.batch.push(s.tokens[k], pos as i32, slot as i32, true);
                    pad_pos[slot] = pos + 1;
                    rows.push(RowInfo {
                        seq: s.global,
                        kind: RowKind::Generated { idx: k as u32 },
                        output: true,
                    });
                } else {
                    self.batch
                        .push(self.model.bos(), pad_pos[slot] as i32, slot as i32, true);
                    pad_pos[slot] += 1;
                    rows.push(RowInfo {
                        seq: s.global,
                        kind: RowKind::Padding,
                        output: true,
                    });
                }
            }
            self.flush(&mut rows, hooks)?;
            for &slot in &live {
                let logits = self.ctx.logits(slot - first).to_vec();
                self.accept(&mut seqs[slot], &logits, cfg, hooks, stop)?;
                self.stats.gen_tokens += 1;
            }
        }
        self.stats.gen_time += t1.elapsed();
        Ok(seqs
            .into_iter()
            .map(|s| Generation {
                text: self.model.detokenize(&s.tokens),
                tokens: s.tokens,
                stop: s.done.unwrap_or(StopReason::MaxTokens),
                first_logits: s.first_logits,
            })
            .collect())
    }

    /// Logits at the first response position for every prompt (no generation).
    ///
    /// # Errors
    /// As [`Session::generate`].
    pub fn first_logits(
        &mut self,
        prompts: &[Prompt],
        hooks: &mut HookSet,
    ) -> Result<Vec<Vec<f32>>> {
        let cfg = GenConfig {
            max_new_tokens: 0,
            keep_first_logits: true,
            ignore_eog: false,
        };
        let g = self.generate(prompts, &cfg, hooks, &mut |_, _| false, &mut |_| {})?;
        Ok(g.into_iter()
            .map(|g| g.first_logits.expect("keep_first_logits was set"))
            .collect())
    }

    /// Sets llama.cpp's native control vector (`layer → vector`, layers ≥ 1), uniform over
    /// the batch, or clears it with `None`. The first layer is probed once: a model whose
    /// graph ignores control vectors fails here instead of silently running unsteered.
    ///
    /// # Errors
    /// Layer 0 or out of range, wrong vector size, or a probe that shows no effect.
    pub fn set_control_vector(&mut self, cv: Option<&BTreeMap<usize, Vec<f32>>>) -> Result<()> {
        let Some(cv) = cv.filter(|c| !c.is_empty()) else {
            self.ctx.set_cvec(None, -1, -1)?;
            return Ok(());
        };
        let (n_layer, n_embd) = (self.model.info.n_layer, self.model.info.n_embd);
        let mut data = vec![0f32; n_embd * (n_layer - 1)];
        for (&l, v) in cv {
            if l == 0 || l >= n_layer {
                return Err(Error::Invalid(format!(
                    "native control vector at layer {l}: llama.cpp has slots for layers 1-{} only (use a hook add for layer 0)",
                    n_layer - 1
                )));
            }
            if v.len() != n_embd {
                return Err(Error::Invalid(format!(
                    "control vector at layer {l} has {} dims, n_embd is {n_embd}",
                    v.len()
                )));
            }
            data[(l - 1) * n_embd..l * n_embd].copy_from_slice(v);
        }
        let (&first, v) = cv.iter().next().expect("non-empty");
        let (&last, _) = cv.iter().next_back().expect("non-empty");
        self.ctx.set_cvec(None, -1, -1)?;
        let before = self.probe(first)?;
        self.ctx.set_cvec(Some(&data), first as i32, last as i32)?;
        let after = self.probe(first)?;
        let err = before
            .iter()
            .zip(&after)
            .zip(v)
            .map(|((b, a), x)| (a - b - x).abs())
            .fold(0f32, f32::max);
        let scale = v.iter().fold(1f32, |m, x| m.max(x.abs()));
        if err > CVEC_PROBE_TOL * scale {
            self.ctx.set_cvec(None, -1, -1)?;
            return Err(Error::Arch {
                arch: self.model.info.arch.clone(),
                msg: format!("the native control vector did not reach l_out-{first} (max error {err}); this graph ignores control vectors"),
            });
        }
        Ok(())
    }

    /// `l_out-<layer>` of a one-token prompt (the BOS token).
    fn probe(&mut self, layer: usize) -> Result<Vec<f32>> {
        let (n_layer, n_embd) = (self.model.info.n_layer, self.model.info.n_embd);
        let p = Prompt {
            text: String::new(),
            tokens: vec![self.model.bos()],
            instruction: 0..0,
            post_instruction: 1..1,
        };
        let mut hooks = HookSet::new(n_layer, n_embd);
        hooks.add_capture(Capture::new(
            &[layer],
            Position::LastPrompt,
            vec![Some(0)],
            1,
            n_layer,
            n_embd,
        ))?;
        let saved = std::mem::take(&mut self.stats);
        let r = self.first_logits(std::slice::from_ref(&p), &mut hooks);
        self.stats = saved;
        r?;
        self.ctx.clear_kv();
        Ok(hooks.captures[0]
            .sum(0, 0, layer)
            .iter()
            .map(|&x| x as f32)
            .collect())
    }
}
