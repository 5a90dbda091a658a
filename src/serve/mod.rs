//! `persona-gate serve`: an OpenAI-compatible HTTP server in which every request carries its
//! own steering, all requests decoded together on one model.
//!
//! Two halves joined by a channel: the HTTP side (tokio + axum, [`http`]) checks and
//! tokenises each request and queues one engine job per choice; the engine thread owns the
//! llama.cpp session and runs [`Session::serve`](crate::engine::Session::serve), taking jobs
//! between decode steps and sending each job's text back as it grows. The engine stays
//! synchronous; a job's output does not depend on what else is decoded (batch invariance).

pub mod api;
pub mod http;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::chat::ChatTemplate;
use crate::directions::Direction;
use crate::engine::serve::{Feed, Request};
use crate::engine::{Generation, Stats, StopReason};
use crate::error::{Error, Result};
use crate::ffi::Token;
use crate::model::Model;

use api::Finish;

/// The server's settings (`persona-gate serve`'s flags).
#[derive(Debug, Clone)]
pub struct Config {
    pub host: String,
    pub port: u16,
    /// Requests must carry `Authorization: Bearer KEY` (all but `/health`).
    pub api_key: Option<String>,
    /// The largest `max_tokens` a request may ask for, and the most a request without one
    /// gets (less where the context ends first).
    pub max_tokens: usize,
    /// The largest `n`.
    pub max_n: usize,
    /// Choices that may wait for a slot; beyond it requests get 503 with `Retry-After`.
    pub queue: usize,
    /// The largest request body, bytes (beyond it 413).
    pub max_body: usize,
    /// How long SIGTERM waits for requests in flight before cancelling them.
    pub grace: Duration,
    /// The model's id in the API.
    pub model_id: String,
}

/// A direction the server was started with, under the name requests use.
#[derive(Debug, Clone)]
pub struct Named {
    pub name: String,
    pub file: PathBuf,
    pub direction: Direction,
    /// The file's metadata (`model_sha256`, `kind`, … where it has them).
    pub meta: std::collections::BTreeMap<String, String>,
}

/// What every request reads: the model, its template, the directions.
pub struct Served {
    pub model: Model,
    pub template: ChatTemplate,
    pub directions: Vec<Named>,
    /// The prompts `scale = "resid"` is relative to (the built-in harmless set).
    pub reference: Vec<crate::chat::Prompt>,
    /// Mean residual norm per layer over `reference`, measured by the engine thread before
    /// the server listens (fixed, so a request's output does not depend on other requests).
    pub resid_norms: std::sync::OnceLock<Vec<f64>>,
    pub model_sha256: String,
}

/// One piece of a choice's output, to the handler waiting for it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Text to append (streaming).
    Delta(String),
    Done {
        text: String,
        finish: Finish,
        tokens: usize,
    },
    Failed(String),
}

/// One choice of one request, for the engine.
pub struct Job {
    pub id: u64,
    pub choice: usize,
    pub request: Request,
    pub stream: bool,
    pub stops: Vec<String>,
    pub tx: UnboundedSender<(usize, Event)>,
}

/// Counters for `/metrics`, shared by both halves.
#[derive(Default)]
pub struct Metrics {
    pub requests: Mutex<HashMap<(&'static str, u16), u64>>,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub queue_depth: AtomicUsize,
    pub live: AtomicUsize,
    pub cancelled: AtomicU64,
    /// The engine session's counters as of its last loop turn (decode steps, tokens, time,
    /// prompt tokens decoded and copied from template headers).
    pub engine: Mutex<Stats>,
    pub request_micros: AtomicU64,
    pub request_count: AtomicU64,
}

impl Metrics {
    /// One more request answered, `t0` being when it came.
    pub fn answered(&self, t0: Instant) {
        self.request_micros
            .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.request_count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self, endpoint: &'static str, status: u16) {
        *self
            .requests
            .lock()
            .expect("metrics lock")
            .entry((endpoint, status))
            .or_default() += 1;
    }
}

/// The state both halves share.
pub struct Shared {
    pub served: Served,
    pub config: Config,
    pub metrics: Metrics,
    /// Set by SIGTERM: no new requests; the engine finishes what it has.
    pub draining: AtomicBool,
    /// Set when the grace period is over: the engine cancels what is left.
    pub stop_now: AtomicBool,
    /// Set when the engine thread has ended, however (a panic included): /health says so
    /// and requests get 503 instead of waiting.
    pub engine_down: AtomicBool,
    pub next_id: AtomicU64,
    pub slots: usize,
    pub queue: Mutex<Option<mpsc::Sender<Job>>>,
}

impl Shared {
    /// Queues `jobs` (one request's choices) all together, or none when the queue would
    /// pass its bound.
    ///
    /// # Errors
    /// `false` when the queue is full or the server is draining.
    pub fn enqueue(&self, jobs: Vec<Job>) -> bool {
        let n = jobs.len();
        if self.draining.load(Ordering::SeqCst) || self.engine_down.load(Ordering::SeqCst) {
            return false;
        }
        let q = &self.metrics.queue_depth;
        let mut cur = q.load(Ordering::SeqCst);
        loop {
            if cur + n > self.config.queue {
                return false;
            }
            match q.compare_exchange(cur, cur + n, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => break,
                Err(c) => cur = c,
            }
        }
        let guard = self.queue.lock().expect("queue lock");
        let Some(tx) = guard.as_ref() else {
            q.fetch_sub(n, Ordering::SeqCst);
            return false;
        };
        for j in jobs {
            if tx.send(j).is_err() {
                q.fetch_sub(1, Ordering::SeqCst);
            }
        }
        true
    }
}

/// A job being decoded.
struct Active {
    choice: usize,
    stream: bool,
    stops: Vec<String>,
    tx: UnboundedSender<(usize, Event)>,
    /// Bytes of text already sent.
    sent: usize,
    /// Where a stop string begins, once one appeared.
    cut: Option<usize>,
}

/// The engine's side of the queue.
struct EngineFeed<'a> {
    rx: mpsc::Receiver<Job>,
    model: &'a Model,
    shared: &'a Shared,
    active: HashMap<u64, Active>,
}

/// The byte where the first stop string begins, if one occurs.
pub fn stop_at(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// How much of `text` may be streamed now: all but a trailing incomplete character (shown
/// as U+FFFD until its last byte comes) and a tail that could begin a stop string.
pub fn safe_end(text: &str, stops: &[String]) -> usize {
    let mut end = text.len();
    while text[..end].ends_with('\u{FFFD}') {
        end -= '\u{FFFD}'.len_utf8();
    }
    let held = stops
        .iter()
        .map(|s| {
            (1..s.len())
                .rev()
                .filter(|&k| s.is_char_boundary(k))
                .find(|&k| text[..end].ends_with(&s[..k]))
                .unwrap_or(0)
        })
        .max()
        .unwrap_or(0);
    end - held
}

impl EngineFeed<'_> {
    fn admit(&mut self, j: Job, out: &mut Vec<(u64, Request)>) {
        self.shared
            .metrics
            .queue_depth
            .fetch_sub(1, Ordering::SeqCst);
        if j.tx.is_closed() {
            self.shared
                .metrics
                .cancelled
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.shared.draining.load(Ordering::SeqCst) {
            let _ = j.tx.send((
                j.choice,
                Event::Failed(crate::engine::serve::CANCELLED.into()),
            ));
            return;
        }
        self.active.insert(
            j.id,
            Active {
                choice: j.choice,
                stream: j.stream,
                stops: j.stops,
                tx: j.tx,
                sent: 0,
                cut: None,
            },
        );
        out.push((j.id, j.request));
    }
}

impl Feed for EngineFeed<'_> {
    fn take(&mut self, room: usize, idle: bool) -> Option<Vec<(u64, Request)>> {
        let mut out = Vec::new();
        loop {
            if self.shared.stop_now.load(Ordering::SeqCst)
                || (idle && self.shared.draining.load(Ordering::SeqCst) && out.is_empty())
            {
                // Drain what is queued so its clients hear why.
                while let Ok(j) = self.rx.try_recv() {
                    let mut none = Vec::new();
                    self.admit(j, &mut none);
                }
                return None;
            }
            while out.len() < room {
                match self.rx.try_recv() {
                    Ok(j) => self.admit(j, &mut out),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        return if out.is_empty() && idle {
                            None
                        } else {
                            Some(out)
                        }
                    }
                }
            }
            if !out.is_empty() || !idle {
                return Some(out);
            }
            match self.rx.recv_timeout(Duration::from_millis(100)) {
                Ok(j) => self.admit(j, &mut out),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    fn token(&mut self, id: u64, tokens: &[Token]) -> bool {
        let Some(a) = self.active.get_mut(&id) else {
            return true;
        };
        if a.tx.is_closed() || self.shared.stop_now.load(Ordering::SeqCst) {
            return true;
        }
        if !a.stream && a.stops.is_empty() {
            return false;
        }
        let text = self.model.detokenize(tokens);
        if let Some(p) = stop_at(&text, &a.stops) {
            a.cut = Some(p);
            return true;
        }
        if a.stream {
            let end = safe_end(&text, &a.stops);
            if end > a.sent {
                let piece = text[a.sent..end].to_string();
                a.sent = end;
                return a.tx.send((a.choice, Event::Delta(piece))).is_err();
            }
        }
        false
    }

    fn finish(&mut self, id: u64, result: std::result::Result<Generation, String>) {
        let Some(a) = self.active.remove(&id) else {
            return;
        };
        let m = &self.shared.metrics;
        let ev = match result {
            Ok(g) => {
                m.completion_tokens
                    .fetch_add(g.tokens.len() as u64, Ordering::Relaxed);
                let text = match a.cut {
                    Some(p) => g.text.get(..p).unwrap_or(&g.text).to_string(),
                    None => g.text.clone(),
                };
                let finish = match (a.cut, g.stop) {
                    (None, StopReason::MaxTokens) => Finish::Length,
                    _ => Finish::Stop,
                };
                if a.stream {
                    let rest = text.get(a.sent..).unwrap_or("");
                    if !rest.is_empty() {
                        let _ = a.tx.send((a.choice, Event::Delta(rest.to_string())));
                    }
                }
                Event::Done {
                    text,
                    finish,
                    tokens: g.tokens.len(),
                }
            }
            Err(why) => Event::Failed(why),
        };
        if a.tx.send((a.choice, ev)).is_err() {
            m.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn tick(&mut self, stats: &Stats, live: usize) {
        let m = &self.shared.metrics;
        m.live.store(live, Ordering::Relaxed);
        m.engine.lock().expect("metrics lock").clone_from(stats);
    }
}

/// Runs the server until SIGTERM or SIGINT: binds, prints one line with the address to
/// stderr, serves, drains.
///
/// # Errors
/// The address cannot be bound; the engine fails outside any request.
pub fn run(served: Served, config: Config) -> Result<()> {
    let (tx, rx) = mpsc::channel::<Job>();
    let slots = served.model.options.parallel as usize;
    let shared = Arc::new(Shared {
        served,
        config,
        metrics: Metrics::default(),
        draining: AtomicBool::new(false),
        stop_now: AtomicBool::new(false),
        engine_down: AtomicBool::new(false),
        next_id: AtomicU64::new(1),
        slots,
        queue: Mutex::new(Some(tx)),
    });
    // All llama.cpp work runs on the engine thread: a second OpenMP team (on the main
    // thread) measurably slowed every decode step of the engine's.
    let (ready_tx, ready_rx) = mpsc::channel::<std::result::Result<(), String>>();
    let engine = {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || -> Result<()> {
                /// Marks the engine down when the thread ends, by return or by panic.
                struct Down<'a>(&'a AtomicBool);
                impl Drop for Down<'_> {
                    fn drop(&mut self) {
                        self.0.store(true, Ordering::SeqCst);
                    }
                }
                let _down = Down(&shared.engine_down);
                let model = &shared.served.model;
                let start = model.session().and_then(|mut session| {
                    let norms = crate::experiment::steer::resid_norms(
                        &mut session,
                        &shared.served.reference,
                    )?;
                    let _ = shared.served.resid_norms.set(norms);
                    Ok(session)
                });
                let mut session = match start {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return Err(e);
                    }
                };
                let mut feed = EngineFeed {
                    rx,
                    model,
                    shared: &shared,
                    active: HashMap::new(),
                };
                session.serve(&mut feed)
            })
            .map_err(|e| Error::Serve(format!("cannot start the engine thread: {e}")))?
    };
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        _ => {
            return match engine.join() {
                Ok(Err(e)) => Err(e),
                _ => Err(Error::Serve("the engine thread failed to start".into())),
            }
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Serve(format!("cannot start the HTTP runtime: {e}")))?;
    let served_at = Instant::now();
    let res = rt.block_on(http::serve(Arc::clone(&shared)));
    // Whatever ended the HTTP side, the engine finishes or cancels and exits.
    shared.draining.store(true, Ordering::SeqCst);
    shared.stop_now.store(true, Ordering::SeqCst);
    *shared.queue.lock().expect("queue lock") = None;
    let eng = engine
        .join()
        .map_err(|_| Error::Serve("the engine thread panicked".into()))?;
    tracing::debug!("served for {:?}", served_at.elapsed());
    res.and(eng)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn the_first_stop_string_cuts_the_text() {
        assert_eq!(stop_at("a\nb END c", &s(&["END", "\n"])), Some(1));
        assert_eq!(stop_at("abc", &s(&["x"])), None);
        assert_eq!(stop_at("abc", &[]), None);
    }

    #[test]
    fn streaming_holds_back_what_may_begin_a_stop_or_a_character() {
        // "EN" may become "END": held; "E" alone too; text without a stop prefix goes out.
        assert_eq!(safe_end("hello EN", &s(&["END"])), 6);
        assert_eq!(safe_end("hello E", &s(&["END"])), 6);
        assert_eq!(safe_end("hello", &s(&["END"])), 5);
        // A character whose last byte has not come yet shows as U+FFFD.
        assert_eq!(safe_end("ok\u{FFFD}", &[]), 2);
        // Multi-byte stops are cut on character boundaries only.
        assert_eq!(safe_end("café é", &s(&["éx"])), "café ".len());
    }
}
