//! Batched evaluation and generation (greedy, or sampled per sequence) of many prompts, with
//! hooks.
//!
//! A [`Session`] decodes prompts through `--parallel` *slots* (llama.cpp sequence ids, each
//! with its own KV stream, `kv_unified = false`), continuously: a prompt enters a free slot
//! as soon as one is free, its prompt is prefilled, and it joins the one-token-per-sequence
//! generation steps; when it stops its slot is refilled with the next prompt, or, once none
//! is left, the last live sequence's stream is moved into the hole so the live slots stay
//! `0..n` and no step carries a finished sequence. Prompts that begin with the same tokens
//! under the same hooks (a system prompt and template header) have those rows decoded once,
//! into a spare *cache* stream, and copied to each (llama.cpp's sequence copy), with every
//! capture counting the shared rows for each owner.
//!
//! **Batch invariance.** A sequence's numbers do not depend on what else is decoded with it,
//! bit for bit, so a prompt's output is the same alone, in any batch, after a resume and in
//! any shard. Three things make that hold on the CPU (measured in `tests/engine.rs`, and
//! before that with a probe of every schedule shape on Qwen2.5-Coder-0.5B and -1.5B, AVX2 and
//! AVX-512 builds):
//! - **row-invariant kernels** ([`crate::model::Kernels::Invariant`], the default): no
//!   repacked weights and llama.cpp's tiled K-quant matmul forced at every row count. By
//!   default llama.cpp switches kernels with the number of rows (repacked weights run rows
//!   in groups of four and the rest one by one; K-quants take a tiled kernel from eight
//!   rows on), and those kernels round differently: a generated token's logits moved by up
//!   to 0.3 with the batch size;
//! - **one ubatch per decode call**, rows in push order: prefill calls take the same number
//!   of tokens from each of a run of consecutive slots, generation steps one token from each
//!   live slot (see [`schedule`]). llama.cpp's split for per-sequence streams makes exactly
//!   that one ubatch, so hooks know which row is which;
//! - **no one-token prompt chunks**: attention over a chunk of one token takes another
//!   kernel than over two or more, so prompts are cut into chunks of at least two tokens
//!   (a prompt of one token excepted), exactly as when they run alone.
//!
//! Flash attention is off by default for the same reason (its CPU kernel takes a different
//! path for several sequences). Per-sequence streams start at cell 0, so attention sees the
//! same cells in the same order whatever the neighbours.

pub mod schedule;
pub mod serve;

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::chat::Prompt;
use crate::error::{Empty, Error, LayerOf, Result, RunError, Shaped};
use crate::ffi::{self, Token};
use crate::hooks::{Capture, HookSet, Position, RowInfo, RowKind};
use crate::model::Model;

use schedule::Cluster;

/// Why a sequence stopped generating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// End of generation token (EOS/EOT); not included in the tokens.
    Eog,
    MaxTokens,
    /// The caller's predicate said the outcome was settled.
    Predicate,
}

impl StopReason {
    /// The name in completions.csv and `generate --format jsonl`.
    pub fn name(self) -> &'static str {
        match self {
            StopReason::Eog => "eog",
            StopReason::MaxTokens => "max_tokens",
            StopReason::Predicate => "settled",
        }
    }
}

/// Sampled decoding through llama.cpp's sampler chain (see [`ffi::Sampler`]), with
/// llama.cpp's meanings: `top_k <= 0`, `top_p = 1` and `min_p = 0` turn a filter off.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sampling {
    /// Above 0 (0 is greedy decoding: no `Sampling` at all).
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
}

impl Sampling {
    /// llama.cpp's defaults for the filters (`llama-completion` without flags): top-k 40,
    /// top-p 0.95, min-p 0.05.
    pub fn with_temperature(temperature: f32) -> Sampling {
        Sampling {
            temperature,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
        }
    }
}

/// The seed of one sequence's sampler: `seed` mixed with the sequence's own `key` (a prompt
/// and sample identity chosen by the caller, never its batch position), so its draws do not
/// depend on what else is decoded, on `--parallel` or on shards.
pub fn sequence_seed(seed: u64, key: &str) -> u32 {
    let mut h = FNV_START;
    for b in seed.to_le_bytes().iter().chain(key.as_bytes()) {
        h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    // One splitmix round: FNV's low bits alone mix poorly. u32::MAX is llama.cpp's "pick a
    // random seed" (LLAMA_DEFAULT_SEED), so it is never handed out.
    (crate::rng::Rng::new(h).next_u64() as u32).min(u32::MAX - 1)
}

/// Generation settings.
#[derive(Debug, Clone, Default)]
pub struct GenConfig {
    /// 0 evaluates prompts only (first-response logits, captures at prompt positions).
    pub max_new_tokens: usize,
    /// Keep the full logits at the first response position (for refusal scores, KL).
    pub keep_first_logits: bool,
    /// Keep generating past end-of-generation tokens (benchmarks only).
    pub ignore_eog: bool,
    /// Hash every logit vector a sequence's tokens were chosen from ([`Generation::digest`]),
    /// so tests can assert that whole trajectories are bit-identical.
    pub digest: bool,
    /// Sampled instead of greedy decoding; `seeds` then holds each prompt's sampler seed.
    pub sampling: Option<Sampling>,
    pub seeds: Vec<u32>,
}

/// One prompt's result.
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<Token>,
    pub text: String,
    pub stop: StopReason,
    /// Logits predicting the first response token, if asked for.
    pub first_logits: Option<Vec<f32>>,
    /// FNV-1a over the bits of every logit vector read for this sequence, if asked for.
    pub digest: u64,
}

/// Token, call and time counters, for the benchmark and dry-run estimates.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Prompt tokens decoded (shared prefix rows once).
    pub prompt_tokens: u64,
    /// Prompt tokens not decoded because a shared prefix was copied instead.
    pub shared_tokens: u64,
    pub prompt_calls: u64,
    pub prompt_time: Duration,
    pub gen_tokens: u64,
    pub gen_steps: u64,
    pub gen_time: Duration,
    /// KV streams copied (shared prefixes and slot moves).
    pub stream_copies: u64,
    /// Rows decoded for no sequence (none since finished sequences leave the batch; kept so
    /// the benchmark can show it).
    pub padding_rows: u64,
}

impl Stats {
    /// Mean sequences per generation step.
    pub fn occupancy(&self) -> f64 {
        self.gen_tokens as f64 / (self.gen_steps.max(1)) as f64
    }
}

pub use crate::memory::CACHE_STREAMS;

/// A decoding session over a model: one llama.cpp context, reused across calls.
pub struct Session<'m> {
    model: &'m Model,
    ctx: ffi::Context<'m>,
    batch: ffi::Batch,
    arch_checked: bool,
    /// Generation slots: sequence ids `0..slots`; the cache streams follow.
    slots: usize,
    /// Cache streams for shared prefixes: ids `slots..slots + cache_streams`.
    cache_streams: u32,
    /// Decode shared prefixes once (default on; off to measure or test without it).
    share_prefixes: bool,
    pub stats: Stats,
}

/// Tolerance for checking that the native control vector really was added: llama.cpp adds it
/// in f32 inside the graph, the probe compares two separate decodes.
const CVEC_PROBE_TOL: f32 = 1e-3;

/// The greedy choice: the first index of the largest logit.
pub fn argmax(x: &[f32]) -> Token {
    crate::stats::argmax(x) as Token
}

/// FNV-1a over f32 bit patterns, chained from `h`.
fn fnv(mut h: u64, v: &[f32]) -> u64 {
    for x in v {
        for b in x.to_bits().to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

impl Model {
    /// Opens a decoding session with this model's options.
    ///
    /// # Errors
    /// Bad sizes; llama.cpp context creation failures (usually memory).
    pub fn session(&self) -> Result<Session<'_>> {
        let o = &self.options;
        if o.parallel == 0 || o.ctx == 0 {
            return Err(Error::flag(
                "--parallel and --ctx",
                None,
                "must be at least 1",
            ));
        }
        if o.batch < 8 {
            return Err(Error::flag(
                "--batch",
                Some(o.batch.to_string()),
                "is too small: a decode call needs at least 8 tokens",
            ));
        }
        let slots = o.parallel.min(256 - CACHE_STREAMS);
        // As many prefix streams as slots when memory allows (GPU memory is not estimated:
        // the fewest there).
        let want = slots.min(256 - slots).max(CACHE_STREAMS);
        let cache_streams = match (&self.budget, o.n_gpu_layers) {
            (Some(b), 0) => self
                .footprint
                .prefix_streams(b, o.ctx, o.batch, slots, want),
            _ => CACHE_STREAMS,
        };
        let ctx = ffi::Context::new(
            &self.raw,
            ffi::ContextParams {
                n_ctx_seq: o.ctx,
                n_batch: o.batch,
                n_seq_max: slots + cache_streams,
                n_threads: o.threads,
                flash_attn: o.flash_attn.enabled(),
            },
        )?;
        Ok(Session {
            model: self,
            ctx,
            batch: ffi::Batch::new(o.batch as usize),
            arch_checked: false,
            slots: slots as usize,
            cache_streams,
            share_prefixes: true,
            stats: Stats::default(),
        })
    }
}

/// A sequence in a generation slot.
struct Live {
    prompt: usize,
    /// New tokens at most (0: score the prompt only).
    max_new: usize,
    /// Keep generating past end-of-generation tokens.
    ignore_eog: bool,
    /// The sequence's own sampler (sampled decoding), else greedy.
    sampler: Option<ffi::Sampler>,
    tokens: Vec<Token>,
    done: Option<StopReason>,
    first_logits: Option<Vec<f32>>,
    digest: u64,
}

impl Live {
    fn new(prompt: usize, cfg: &GenConfig) -> Live {
        let seed = cfg.sampling.map_or(0, |_| cfg.seeds[prompt]);
        Live::with(
            prompt,
            cfg.max_new_tokens,
            cfg.ignore_eog,
            cfg.sampling,
            seed,
        )
    }

    /// A sequence with its own length cap, end rule and sampler (the server's requests
    /// differ).
    fn with(
        prompt: usize,
        max_new: usize,
        ignore_eog: bool,
        sampling: Option<Sampling>,
        seed: u32,
    ) -> Live {
        Live {
            prompt,
            max_new,
            ignore_eog,
            sampler: sampling
                .map(|x| ffi::Sampler::new(x.temperature, x.top_k, x.top_p, x.min_p, seed)),
            tokens: vec![],
            done: None,
            first_logits: None,
            digest: FNV_START,
        }
    }
}

/// Where a cluster's shared prefix is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cached {
    NotYet,
    /// Decoded in this cache stream.
    In(i32),
    /// No cache stream was free when its first member arrived: members decode in full.
    Unshared,
    /// Every member has its copy.
    Released,
}

/// What one `generate` call decodes: the prompts, their clusters, and the callbacks.
struct Job<'a> {
    /// Borrowed for a batch; owned by the server, which puts each request in a lane.
    prompts: Cow<'a, [Prompt]>,
    cfg: &'a GenConfig,
    /// Cluster index of each prompt, if it shares a prefix.
    cluster_of: Vec<Option<usize>>,
    clusters: Vec<Cluster>,
    cached: Vec<Cached>,
    /// Members of each cluster that have copied its prefix so far.
    copied: Vec<usize>,
    /// The order prompts enter slots: see [`schedule::admission_order`].
    order: Vec<usize>,
    /// Prompts whose first rows the caller already copied into their slot, and how many
    /// (the server's template-header cache); empty for batch jobs.
    resume: Vec<usize>,
}

impl<'m> Session<'m> {
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// Turns shared-prefix decoding on or off. Results are the same bit for bit either way;
    /// off, every prompt decodes all its tokens.
    pub fn set_prefix_sharing(&mut self, on: bool) {
        self.share_prefixes = on;
    }

    /// Runs one decode call with the rows pushed so far, then checks (once) that the graph
    /// exposes `l_out-<il>` for every layer: our hooks attach nowhere else.
    fn flush(
        &mut self,
        rows: &mut Vec<RowInfo>,
        shared: Vec<Vec<usize>>,
        hooks: &mut HookSet,
    ) -> Result<()> {
        let visitor: Option<&mut dyn ffi::LayerVisitor> = if hooks.is_empty() {
            None
        } else {
            hooks.set_rows(std::mem::take(rows), shared);
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

    /// Checks every prompt against `--ctx` before any decoding.
    fn check_fits(&self, prompts: &[Prompt], max_new: usize) -> Result<()> {
        let ctx = self.model.options.ctx as usize;
        for (i, p) in prompts.iter().enumerate() {
            if p.tokens.is_empty() {
                return Err(Error::Empty(Empty::Prompt(i)));
            }
            if p.tokens.len() + max_new > ctx {
                return Err(Error::Run(RunError::PromptTooLong {
                    prompt: i,
                    tokens: p.tokens.len(),
                    max_new,
                    ctx,
                }));
            }
        }
        Ok(())
    }

    /// Greedy generation for every prompt, batched. `stop(i, tokens)` may end prompt `i`
    /// early once its outcome is settled. Hooks see every prompt and generated row.
    /// `progress(n)` is told each time `n` more prompts are finished.
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
        let mut out: Vec<Option<Generation>> = vec![None; prompts.len()];
        self.generate_each(prompts, cfg, hooks, stop, &mut |i, g| {
            out[i] = Some(g);
            progress(1);
            Ok(())
        })?;
        Ok(out
            .into_iter()
            .map(|g| g.expect("generate_each finishes every prompt"))
            .collect())
    }

    /// As [`Session::generate`], handing each prompt's result to `done(index, generation)`
    /// as soon as it finishes (prompts finish out of order). An error from `done` stops the
    /// run.
    ///
    /// # Errors
    /// As [`Session::generate`], and whatever `done` returns.
    pub fn generate_each(
        &mut self,
        prompts: &[Prompt],
        cfg: &GenConfig,
        hooks: &mut HookSet,
        stop: &mut dyn FnMut(usize, &[Token]) -> bool,
        done: &mut dyn FnMut(usize, Generation) -> Result<()>,
    ) -> Result<()> {
        assert!(
            cfg.sampling.is_none() || cfg.seeds.len() == prompts.len(),
            "GenConfig::seeds must hold one seed per prompt when sampling"
        );
        self.check_fits(prompts, cfg.max_new_tokens)?;
        hooks.prepare(prompts.len());
        let mut job = self.plan(prompts, cfg, hooks);
        self.ctx.clear_kv();
        if cfg.max_new_tokens == 0 {
            self.evaluate(&mut job, hooks, stop, done)?;
            if !hooks.is_empty() {
                hooks.check_touched()?;
            }
            return Ok(());
        }
        let mut pending: VecDeque<usize> = job.order.iter().copied().collect();
        let mut live: Vec<Live> = Vec::with_capacity(self.slots);
        loop {
            self.retire(&mut live, done)?;
            if live.len() < self.slots && !pending.is_empty() {
                let first = live.len();
                while live.len() < self.slots {
                    let Some(p) = pending.pop_front() else { break };
                    live.push(Live::new(p, cfg));
                }
                self.prefill(&mut live, first, &mut job, hooks, stop)?;
                // Prompts that are done at their first token (score mode, an immediate
                // end of generation) free their slot before any generation step.
                if live[first..].iter().any(|s| s.done.is_some()) {
                    continue;
                }
            }
            if live.is_empty() {
                break;
            }
            self.step(&mut live, &job, hooks, stop)?;
        }
        if !hooks.is_empty() {
            hooks.check_touched()?;
        }
        Ok(())
    }

    /// Finds the shared prefixes of a job.
    fn plan<'a>(&self, prompts: &'a [Prompt], cfg: &'a GenConfig, hooks: &mut HookSet) -> Job<'a> {
        let tokens: Vec<&[Token]> = prompts.iter().map(|p| p.tokens.as_slice()).collect();
        let signature: Vec<u64> = (0..prompts.len()).map(|i| hooks.signature(i)).collect();
        // Each prompt keeps its post-instruction span and at least two tokens to itself.
        let limit: Vec<usize> = prompts
            .iter()
            .map(|p| {
                p.post_instruction
                    .start
                    .min(p.tokens.len().saturating_sub(2))
            })
            .collect();
        let clusters = if self.share_prefixes {
            schedule::plan_prefixes(&tokens, &signature, &limit)
        } else {
            Vec::new()
        };
        let mut cluster_of = vec![None; prompts.len()];
        for (c, cl) in clusters.iter().enumerate() {
            for m in cl.members.clone() {
                cluster_of[m] = Some(c);
            }
        }
        let own: Vec<usize> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| p.tokens.len() - cluster_of[i].map_or(0, |c| clusters[c].len))
            .collect();
        Job {
            prompts: Cow::Borrowed(prompts),
            cfg,
            order: schedule::admission_order(
                &own,
                &clusters,
                self.cache_streams as usize,
                self.slots,
            ),
            cluster_of,
            cached: vec![Cached::NotYet; clusters.len()],
            copied: vec![0; clusters.len()],
            clusters,
            resume: Vec::new(),
        }
    }

    /// Hands finished sequences to `done` and closes their holes: the last live sequence's
    /// stream moves into each hole, so live slots stay `0..n`.
    fn retire(
        &mut self,
        live: &mut Vec<Live>,
        done: &mut dyn FnMut(usize, Generation) -> Result<()>,
    ) -> Result<()> {
        let finished: Vec<usize> = (0..live.len())
            .rev()
            .filter(|&i| live[i].done.is_some())
            .collect();
        for h in finished {
            let last = live.len() - 1;
            self.ctx.seq_rm(h as i32);
            if h != last {
                self.ctx.seq_cp(last as i32, h as i32);
                self.ctx.seq_rm(last as i32);
                self.stats.stream_copies += 1;
            }
            let s = live.swap_remove(h);
            let (p, g) = self.finished(s);
            done(p, g)?;
        }
        Ok(())
    }

    /// Decodes into cache streams the shared prefixes of the clusters whose first member is
    /// among `arrivals` (in admission order). A cluster that finds no free cache stream runs
    /// unshared.
    fn start_prefixes(
        &mut self,
        arrivals: &[usize],
        job: &mut Job<'_>,
        hooks: &mut HookSet,
    ) -> Result<()> {
        let cache_base = self.slots as i32;
        let mut to_decode: Vec<(i32, usize)> = Vec::new(); // (stream, cluster)
        for &p in arrivals {
            let Some(c) = job.cluster_of[p] else {
                continue;
            };
            if job.cached[c] != Cached::NotYet {
                continue;
            }
            let busy = |st: i32| job.cached.contains(&Cached::In(st));
            match (cache_base..cache_base + self.cache_streams as i32).find(|&st| !busy(st)) {
                Some(st) => {
                    job.cached[c] = Cached::In(st);
                    to_decode.push((st, c));
                }
                None => job.cached[c] = Cached::Unshared,
            }
        }
        to_decode.sort_unstable();
        if to_decode.is_empty() {
            return Ok(());
        }
        let items: Vec<PrefillItem> = to_decode
            .iter()
            .map(|&(st, c)| {
                let cl = &job.clusters[c];
                PrefillItem {
                    stream: st,
                    prompt: cl.members.start,
                    from: 0,
                    to: cl.len,
                    shared: cl.members.clone().skip(1).collect(),
                }
            })
            .collect();
        self.decode_prefill(items, job, hooks, &mut |_, _| Ok(()))
    }

    /// Queues the copy of prompt `p`'s shared prefix into `slot`, if it has one in a cache
    /// stream; returns where its own tokens start.
    fn copy_prefix(&mut self, slot: usize, p: usize, job: &mut Job<'_>) -> usize {
        let Some(c) = job.cluster_of[p] else {
            return job.resume.get(p).copied().unwrap_or(0);
        };
        let Cached::In(st) = job.cached[c] else {
            return 0;
        };
        self.ctx.seq_cp(st, slot as i32);
        self.stats.stream_copies += 1;
        let from = job.clusters[c].len;
        // The first copy stands for the one decode of the prefix; the others are saved.
        if job.copied[c] > 0 {
            self.stats.shared_tokens += from as u64;
        }
        job.copied[c] += 1;
        // The last member's copy frees the stream: its data is copied at the start of the
        // next decode, before that decode writes anything (into this stream or any other).
        if job.copied[c] == job.clusters[c].members.len() {
            self.ctx.seq_rm(st);
            job.cached[c] = Cached::Released;
        }
        from
    }

    /// Starts the prompts `arrived` = (slot, prompt): copies the shared prefixes already in
    /// a cache stream first (freeing the streams whose every member now has its copy), then
    /// decodes the prefixes of clusters arriving for the first time and copies those.
    /// Returns where each prompt's own tokens start.
    fn admit(
        &mut self,
        arrived: &[(usize, usize)],
        job: &mut Job<'_>,
        hooks: &mut HookSet,
    ) -> Result<Vec<usize>> {
        let mut from: Vec<Option<usize>> = vec![None; arrived.len()];
        for (k, &(slot, p)) in arrived.iter().enumerate() {
            if let Some(c) = job.cluster_of[p] {
                if matches!(job.cached[c], Cached::In(_)) {
                    from[k] = Some(self.copy_prefix(slot, p, job));
                }
            }
        }
        let rest: Vec<usize> = arrived
            .iter()
            .zip(&from)
            .filter(|(_, f)| f.is_none())
            .map(|(a, _)| a.1)
            .collect();
        self.start_prefixes(&rest, job, hooks)?;
        Ok(arrived
            .iter()
            .zip(from)
            .map(|(&(slot, p), f)| f.unwrap_or_else(|| self.copy_prefix(slot, p, job)))
            .collect())
    }

    /// Prefills the prompts that just entered slots `first..`: shared prefixes not yet in a
    /// cache stream are decoded there, copied into the new slots, then every prompt's own
    /// tokens are decoded in as few calls as the rules in [`schedule`] allow.
    fn prefill(
        &mut self,
        live: &mut [Live],
        first: usize,
        job: &mut Job<'_>,
        hooks: &mut HookSet,
        stop: &mut dyn FnMut(usize, &[Token]) -> bool,
    ) -> Result<()> {
        let t0 = Instant::now();
        let arrived: Vec<(usize, usize)> = live
            .iter()
            .enumerate()
            .skip(first)
            .map(|(slot, s)| (slot, s.prompt))
            .collect();
        let starts = self.admit(&arrived, job, hooks)?;
        let mut items = Vec::new();
        for ((slot, s), from) in live.iter().enumerate().skip(first).zip(starts) {
            items.push(PrefillItem {
                stream: slot as i32,
                prompt: s.prompt,
                from,
                to: job.prompts[s.prompt].tokens.len(),
                shared: vec![],
            });
        }
        let mut firsts: Vec<(usize, Vec<f32>)> = Vec::new();
        self.decode_prefill(items, job, hooks, &mut |stream, logits| {
            firsts.push((stream as usize, logits.to_vec()));
            Ok(())
        })?;
        self.stats.prompt_time += t0.elapsed();
        for (slot, logits) in firsts {
            self.accept(&mut live[slot], &logits, job.cfg, hooks, stop)?;
        }
        Ok(())
    }

    /// Prompts only (no generation): every slot prefills continuously, and a slot whose
    /// prompt is done is refilled before the next call, so each call takes the same number
    /// of tokens from every slot, many rows at once. (Rounds that must finish every prompt
    /// before refilling end in a staircase of tiny calls: measured on persona extraction,
    /// 136 calls of 14 rows on average for 128 prompts.)
    fn evaluate(
        &mut self,
        job: &mut Job<'_>,
        hooks: &mut HookSet,
        stop: &mut dyn FnMut(usize, &[Token]) -> bool,
        done: &mut dyn FnMut(usize, Generation) -> Result<()>,
    ) -> Result<()> {
        let n = self.slots;
        let mut pending: VecDeque<usize> = job.order.iter().copied().collect();
        let mut slots: Vec<Option<(Live, PrefillItem)>> = (0..n).map(|_| None).collect();
        loop {
            let t0 = Instant::now();
            let mut arrived: Vec<(usize, usize)> = Vec::new();
            for (i, s) in slots.iter().enumerate() {
                if s.is_none() {
                    match pending.pop_front() {
                        Some(p) => arrived.push((i, p)),
                        None => break,
                    }
                }
            }
            let starts = self.admit(&arrived, job, hooks)?;
            for (&(i, p), from) in arrived.iter().zip(starts) {
                slots[i] = Some((
                    Live::new(p, job.cfg),
                    PrefillItem {
                        stream: i as i32,
                        prompt: p,
                        from,
                        to: job.prompts[p].tokens.len(),
                        shared: vec![],
                    },
                ));
            }
            let active: Vec<usize> = (0..n).filter(|&i| slots[i].is_some()).collect();
            if active.is_empty() {
                break;
            }
            let items: Vec<PrefillItem> = active
                .iter()
                .map(|&i| slots[i].as_ref().expect("active").1.clone())
                .collect();
            let mut next: Vec<usize> = items.iter().map(|it| it.from).collect();
            let outs = self.prefill_call(&items, &mut next, job, hooks)?;
            for (k, &i) in active.iter().enumerate() {
                slots[i].as_mut().expect("active").1.from = next[k];
            }
            self.stats.prompt_time += t0.elapsed();
            for (k, logits) in outs {
                let i = active[k];
                let (mut live, _) = slots[i].take().expect("active");
                self.accept(&mut live, &logits, job.cfg, hooks, stop)?;
                self.ctx.seq_rm(i as i32);
                let g = self.finished(live);
                done(g.0, g.1)?;
            }
        }
        Ok(())
    }

    /// A finished sequence's (prompt, result).
    fn finished(&self, s: Live) -> (usize, Generation) {
        (
            s.prompt,
            Generation {
                text: self.model.detokenize(&s.tokens),
                tokens: s.tokens,
                stop: s.done.unwrap_or(StopReason::MaxTokens),
                first_logits: s.first_logits,
                digest: s.digest,
            },
        )
    }

    /// Decodes prompt tokens `from..to` of each item into its stream, packed into calls by
    /// [`schedule::next_prefill`]; `last(stream, logits)` gets each item's last-token logits
    /// when `to` is the prompt's end.
    fn decode_prefill(
        &mut self,
        items: Vec<PrefillItem>,
        job: &Job<'_>,
        hooks: &mut HookSet,
        last: &mut dyn FnMut(i32, &[f32]) -> Result<()>,
    ) -> Result<()> {
        let mut next: Vec<usize> = items.iter().map(|it| it.from).collect();
        while items.iter().zip(&next).any(|(it, &n)| n < it.to) {
            for (k, logits) in self.prefill_call(&items, &mut next, job, hooks)? {
                last(items[k].stream, &logits)?;
            }
        }
        Ok(())
    }

    /// One prefill call over the items with tokens left (`next[k]` is where item `k` is),
    /// shaped by [`schedule::next_prefill`]; returns (item, last-token logits) for each item
    /// whose prompt ended in this call.
    fn prefill_call(
        &mut self,
        items: &[PrefillItem],
        next: &mut [usize],
        job: &Job<'_>,
        hooks: &mut HookSet,
    ) -> Result<Vec<(usize, Vec<f32>)>> {
        let open: Vec<usize> = (0..items.len())
            .filter(|&k| next[k] < items[k].to)
            .collect();
        let pending: Vec<(usize, usize)> = open
            .iter()
            .map(|&k| (items[k].stream as usize, items[k].to - next[k]))
            .collect();
        let (a, n, take) = schedule::next_prefill(&pending, self.batch.capacity());
        self.batch.clear();
        let mut rows = Vec::new();
        let mut shared_sets = Vec::new();
        let mut outputs = Vec::new();
        for &k in &open[a..a + n] {
            let it = &items[k];
            let p = &job.prompts[it.prompt];
            let len = p.tokens.len();
            let shared = if it.shared.is_empty() {
                RowInfo::OWN
            } else {
                shared_sets.push(it.shared.clone());
                (shared_sets.len() - 1) as u32
            };
            for idx in next[k]..next[k] + take {
                let kind = RowKind::Prompt {
                    idx: idx as u32,
                    len: len as u32,
                    post_start: p.post_instruction.start as u32,
                };
                let is_last = idx + 1 == len;
                let output = is_last
                    || hooks.needs_row_at_last_layer(it.prompt, kind)
                    || it
                        .shared
                        .iter()
                        .any(|&m| hooks.needs_row_at_last_layer(m, kind));
                if is_last {
                    outputs.push((k, self.batch.len()));
                }
                self.batch
                    .push(p.tokens[idx], idx as i32, it.stream, output);
                rows.push(RowInfo {
                    seq: it.prompt,
                    kind,
                    output,
                    shared,
                });
            }
            next[k] += take;
        }
        self.flush(&mut rows, shared_sets, hooks)?;
        self.stats.prompt_tokens += (n * take) as u64;
        self.stats.prompt_calls += 1;
        Ok(outputs
            .into_iter()
            .map(|(k, b)| (k, self.ctx.logits(b).to_vec()))
            .collect())
    }

    /// One generation step: the last accepted token of every live sequence, in slot order.
    fn step(
        &mut self,
        live: &mut [Live],
        job: &Job<'_>,
        hooks: &mut HookSet,
        stop: &mut dyn FnMut(usize, &[Token]) -> bool,
    ) -> Result<()> {
        let t1 = Instant::now();
        self.batch.clear();
        let mut rows = Vec::with_capacity(live.len());
        for (slot, s) in live.iter().enumerate() {
            let k = s.tokens.len() - 1;
            let pos = job.prompts[s.prompt].tokens.len() + k;
            self.batch.push(s.tokens[k], pos as i32, slot as i32, true);
            rows.push(RowInfo::own(
                s.prompt,
                RowKind::Generated { idx: k as u32 },
                true,
            ));
        }
        self.flush(&mut rows, Vec::new(), hooks)?;
        self.stats.gen_steps += 1;
        for (i, s) in live.iter_mut().enumerate() {
            let logits = self.ctx.logits(i).to_vec();
            self.accept(s, &logits, job.cfg, hooks, stop)?;
            self.stats.gen_tokens += 1;
        }
        self.stats.gen_time += t1.elapsed();
        Ok(())
    }

    /// Takes the greedy token from a sequence's logits. Non-finite logits (an overflowing
    /// edit, a broken model file) end the run with the sequence's name rather than letting
    /// argmax pick a token from NaNs.
    fn accept(
        &mut self,
        s: &mut Live,
        logits: &[f32],
        cfg: &GenConfig,
        hooks: &HookSet,
        stop: &mut dyn FnMut(usize, &[Token]) -> bool,
    ) -> Result<()> {
        if let Some(bad) = logits.iter().position(|x| !x.is_finite()) {
            return Err(Error::Run(RunError::NonFiniteLogit {
                value: logits[bad],
                token: bad,
                step: s.tokens.len(),
                prompt: s.prompt,
                label: hooks.seq_label(s.prompt).map(str::to_string),
            }));
        }
        if cfg.digest {
            s.digest = fnv(s.digest, logits);
        }
        if cfg.keep_first_logits && s.first_logits.is_none() {
            s.first_logits = Some(logits.to_vec());
        }
        if s.max_new == 0 {
            s.done = Some(StopReason::MaxTokens);
            return Ok(());
        }
        let t = match &mut s.sampler {
            Some(x) => x.sample(logits),
            None => argmax(logits),
        };
        if self.model.is_eog(t) && !s.ignore_eog {
            s.done = Some(StopReason::Eog);
            return Ok(());
        }
        s.tokens.push(t);
        if s.tokens.len() >= s.max_new {
            s.done = Some(StopReason::MaxTokens);
        } else if stop(s.prompt, &s.tokens) {
            s.done = Some(StopReason::Predicate);
        }
        Ok(())
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
            ..GenConfig::default()
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
                return Err(Error::Layer {
                    layer: l,
                    n_layer,
                    of: LayerOf::ControlVector,
                });
            }
            if v.len() != n_embd {
                return Err(Error::Shape {
                    what: Shaped::ControlVector { layer: l },
                    got: v.len(),
                    want: n_embd,
                });
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

/// Prompt tokens `from..to` of `prompt` to decode into `stream`; `shared` lists the other
/// prompts that own these rows (a cluster's prefix).
#[derive(Clone)]
struct PrefillItem {
    stream: i32,
    prompt: usize,
    from: usize,
    to: usize,
    shared: Vec<usize>,
}
