//! Continuous serving: requests join the running batch between decode steps and leave it as
//! soon as they stop, each with its own edits, length cap and sampler.
//!
//! The batch engine's rules hold unchanged (one ubatch per call, rows in slot order, no
//! one-token prompt chunks, finished sequences moved out of the batch), so a request's
//! tokens are the same bit for bit whatever else is decoded beside it, and equal to a
//! [`Session::generate`] of the same prompt under the same edits. Each live request holds a
//! *lane*: its sequence index for the hooks, reused by the next request once it is done.
//! Requests arrive one by one, so instead of the batch engine's planned prefix clusters the
//! server keeps *template headers*: the rows before a request's last user message (system
//! prompt, earlier turns, the user header), decoded once into a cache stream and copied into
//! the slot of each later request that begins with the same tokens under edits with the same
//! fingerprint (llama-server's prompt cache, made exact: the copied rows are the rows that
//! request would have computed, so results are the same with or without the cache).

use std::borrow::Cow;

use super::schedule::MIN_SHARED;
use super::{GenConfig, Generation, Job, Live, Sampling, Session, Stats};
use crate::chat::Prompt;
use crate::error::Result;
use crate::ffi::Token;
use crate::hooks::{Edit, HookSet};

/// One request for the engine.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Prompt,
    /// At least 1.
    pub max_new_tokens: usize,
    /// `None`: greedy.
    pub sampling: Option<Sampling>,
    pub seed: u32,
    /// Generate past end-of-generation tokens, to `max_new_tokens` (llama-server's
    /// `ignore_eos`; benchmarks).
    pub ignore_eos: bool,
    /// This request's edits (their scopes are set to its lane).
    pub edits: Vec<Edit>,
}

/// Where requests come from and results go: the server's side of [`Session::serve`].
pub trait Feed {
    /// Up to `room` new requests, each with the caller's id. `idle` says nothing is being
    /// decoded, so the feed may block until a request comes. `None` ends serving: every
    /// request still live is finished with [`CANCELLED`].
    fn take(&mut self, room: usize, idle: bool) -> Option<Vec<(u64, Request)>>;
    /// A request's tokens so far, after each new one; `true` stops it there (a stop
    /// string, a client that went away).
    fn token(&mut self, id: u64, tokens: &[Token]) -> bool;
    /// A request's end: its generation, or why it failed.
    fn finish(&mut self, id: u64, result: std::result::Result<Generation, String>);
    /// Called once per engine loop turn with the session's counters and the live count.
    fn tick(&mut self, _stats: &Stats, _live: usize) {}
}

/// A template header kept in a cache stream.
struct Header {
    tokens: Vec<Token>,
    /// The fingerprint of the edits it was decoded under.
    sig: u64,
    stream: i32,
    /// When it was last copied (for least-recently-used eviction).
    used: u64,
}

/// The cache streams' headers.
struct Headers {
    entries: Vec<Header>,
    streams: Vec<i32>,
    clock: u64,
}

impl Headers {
    /// The longest header that `tokens` begins with under `sig`, leaving at least two
    /// tokens of its own (a one-token chunk would take another attention kernel).
    fn find(&mut self, tokens: &[Token], sig: u64) -> Option<(i32, usize)> {
        self.clock += 1;
        let now = self.clock;
        let e = self
            .entries
            .iter_mut()
            .filter(|e| e.sig == sig && e.tokens.len() + 2 <= tokens.len())
            .filter(|e| tokens.starts_with(&e.tokens))
            .max_by_key(|e| e.tokens.len())?;
        e.used = now;
        Some((e.stream, e.tokens.len()))
    }

    fn has(&self, tokens: &[Token], sig: u64) -> bool {
        self.entries
            .iter()
            .any(|e| e.sig == sig && e.tokens == tokens)
    }

    /// A stream for a new header: a free one, or the least recently used one's.
    fn stream_for_new(&mut self) -> Option<i32> {
        if let Some(&st) = self
            .streams
            .iter()
            .find(|st| !self.entries.iter().any(|e| e.stream == **st))
        {
            return Some(st);
        }
        let (i, _) = self
            .entries
            .iter()
            .enumerate()
            .min_by_key(|(_, e)| e.used)?;
        Some(self.entries.swap_remove(i).stream)
    }
}

/// The fingerprint of a request's edits, in order.
fn edits_sig(edits: &[Edit]) -> u64 {
    edits.iter().fold(0x9e37_79b9_7f4a_7c15, |h, e| {
        (h ^ e.fingerprint()).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The error text of a request still live when serving ends.
pub const CANCELLED: &str = "the server is shutting down";

impl<'m> Session<'m> {
    /// Serves requests from `feed` until it returns `None`. A decode failure (an edit that
    /// overflows, non-finite logits) fails the requests in that batch, not the server: their
    /// sequences are dropped and serving goes on.
    ///
    /// # Errors
    /// None from requests; only a failure to reset the context after a failed batch.
    pub fn serve(&mut self, feed: &mut dyn Feed) -> Result<()> {
        let info = &self.model.info;
        let mut hooks = HookSet::new(info.n_layer, info.n_embd);
        let lanes = self.slots;
        let empty = Prompt {
            text: String::new(),
            tokens: Vec::new(),
            instruction: 0..0,
            post_instruction: 0..0,
        };
        let cfg = GenConfig::default();
        let mut job = Job {
            prompts: Cow::Owned(vec![empty; lanes]),
            cfg: &cfg,
            cluster_of: vec![None; lanes],
            clusters: Vec::new(),
            cached: Vec::new(),
            copied: Vec::new(),
            order: Vec::new(),
            resume: vec![0; lanes],
        };
        let cache_base = lanes as i32;
        let mut headers = Headers {
            entries: Vec::new(),
            streams: (cache_base..cache_base + self.cache_streams as i32).collect(),
            clock: 0,
        };
        // Headers to keep once their request's prompt is decoded: (slot, tokens, sig).
        let mut to_save: Vec<(usize, Vec<Token>, u64)> = Vec::new();
        let ctx_len = self.model.options.ctx as usize;
        let mut ids: Vec<Option<u64>> = vec![None; lanes];
        let mut free: Vec<usize> = (0..lanes).rev().collect();
        let mut live: Vec<Live> = Vec::with_capacity(lanes);
        self.ctx.clear_kv();
        // The counters describe serving alone (not what the session did before).
        self.stats = Stats::default();
        loop {
            let mut ended = Vec::new();
            self.retire(&mut live, &mut |lane, g| {
                ended.push((lane, g));
                Ok(())
            })?;
            for (lane, g) in ended {
                let id = ids[lane].take().expect("a live lane has an id");
                hooks.set_seq_edits(lane, Vec::new())?;
                free.push(lane);
                feed.finish(id, Ok(g));
            }
            feed.tick(&self.stats, live.len());
            let room = lanes - live.len();
            let first = live.len();
            if room > 0 {
                let Some(reqs) = feed.take(room, live.is_empty()) else {
                    for s in live.drain(..) {
                        let id = ids[s.prompt].take().expect("a live lane has an id");
                        feed.finish(id, Err(CANCELLED.to_string()));
                    }
                    self.ctx.clear_kv();
                    return Ok(());
                };
                for (id, r) in reqs.into_iter().take(room) {
                    let n = r.prompt.tokens.len();
                    if n == 0 || n + r.max_new_tokens > ctx_len || r.max_new_tokens == 0 {
                        feed.finish(
                            id,
                            Err(format!(
                                "a prompt of {n} tokens and {} new tokens do not fit the context of {ctx_len}",
                                r.max_new_tokens
                            )),
                        );
                        continue;
                    }
                    let lane = free.pop().expect("room means a free lane");
                    let sig = edits_sig(&r.edits);
                    if let Err(e) = hooks.set_seq_edits(lane, r.edits) {
                        free.push(lane);
                        feed.finish(id, Err(e.to_string()));
                        continue;
                    }
                    ids[lane] = Some(id);
                    let slot = live.len();
                    let toks = &r.prompt.tokens;
                    job.resume[lane] = match headers.find(toks, sig) {
                        Some((st, len)) => {
                            self.ctx.seq_cp(st, slot as i32);
                            self.stats.stream_copies += 1;
                            self.stats.shared_tokens += len as u64;
                            len
                        }
                        None => {
                            let h = r.prompt.instruction.start.min(n.saturating_sub(2));
                            if h >= MIN_SHARED && !headers.streams.is_empty() {
                                to_save.push((slot, toks[..h].to_vec(), sig));
                            }
                            0
                        }
                    };
                    job.prompts.to_mut()[lane] = r.prompt;
                    live.push(Live::with(
                        lane,
                        r.max_new_tokens,
                        r.ignore_eos,
                        r.sampling,
                        r.seed,
                    ));
                }
            }
            let res = if live.len() > first {
                let mut stop = |lane: usize, t: &[Token]| feed.token(ids[lane].expect("live"), t);
                let r = self.prefill(&mut live, first, &mut job, &mut hooks, &mut stop);
                if r.is_ok() {
                    // Keep the new headers: each slot's stream (its prompt, decoded by the
                    // call above) copied, cut back to the header. The copy runs at the start
                    // of the next decode, before anything is written.
                    for (slot, tokens, sig) in to_save.drain(..) {
                        if headers.has(&tokens, sig) {
                            continue;
                        }
                        let Some(st) = headers.stream_for_new() else {
                            break;
                        };
                        self.ctx.seq_rm(st);
                        self.ctx.seq_cp(slot as i32, st);
                        self.ctx.seq_truncate(st, tokens.len());
                        self.stats.stream_copies += 1;
                        headers.entries.push(Header {
                            tokens,
                            sig,
                            stream: st,
                            used: headers.clock,
                        });
                    }
                }
                to_save.clear();
                r
            } else if !live.is_empty() {
                let mut stop = |lane: usize, t: &[Token]| feed.token(ids[lane].expect("live"), t);
                self.step(&mut live, &job, &mut hooks, &mut stop)
            } else {
                Ok(())
            };
            if let Err(e) = res {
                // The whole call failed: every sequence in it (all live ones) ends with the
                // error, the rest of the server goes on from an empty cache.
                let why = e.to_string();
                for s in live.drain(..) {
                    let lane = s.prompt;
                    let id = ids[lane].take().expect("a live lane has an id");
                    hooks.set_seq_edits(lane, Vec::new())?;
                    free.push(lane);
                    feed.finish(id, Err(why.clone()));
                }
                self.ctx.clear_kv();
                headers.entries.clear();
            }
        }
    }
}
