//! The HTTP side: routes, authentication, request checks and tokenisation, responses and
//! server-sent events. Everything a request asks for is checked here, so the engine only
//! ever sees requests it can run.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::api::{self, ApiError, Common, Decoding, Finish, Limits};
use super::{Event, Job, Shared};
use crate::chat::{Message, Prompt};
use crate::engine::serve::{Request, CANCELLED};
use crate::engine::{sequence_seed, Sampling};
use crate::error::{Error, Result};
use crate::experiment::steer;
use crate::hooks::{Edit, Scope};

type App = Arc<Shared>;

/// Binds and serves until SIGTERM/SIGINT, then drains (see [`super::Config::grace`]).
///
/// # Errors
/// The address cannot be bound.
pub async fn serve(shared: App) -> Result<()> {
    let addr = format!("{}:{}", shared.config.host, shared.config.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| Error::Serve(format!("cannot listen on {addr}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::Serve(format!("{addr}: {e}")))?;
    let app = router(Arc::clone(&shared));
    eprintln!(
        "persona-gate serve: {} on http://{local} ({} slots, {} directions)",
        shared.config.model_id,
        shared.slots,
        shared.served.directions.len()
    );
    let s = Arc::clone(&shared);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            s.draining.store(true, Ordering::SeqCst);
            eprintln!(
                "persona-gate serve: shutting down: finishing requests in flight (up to {:?})",
                s.config.grace
            );
            let s2 = Arc::clone(&s);
            tokio::spawn(async move {
                tokio::time::sleep(s2.config.grace).await;
                s2.stop_now.store(true, Ordering::SeqCst);
            });
        })
        .await
        .map_err(|e| Error::Serve(e.to_string()))
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

/// The routes.
pub fn router(shared: App) -> Router {
    let limit = shared.config.max_body;
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/directions", get(directions))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(shared)
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, Json(e.body())).into_response();
    if e.status == 503 {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

async fn not_found() -> Response {
    error_response(&ApiError::status(
        404,
        "invalid_request_error",
        "no such route (see /v1/chat/completions, /v1/completions, /v1/models, /v1/directions, /health, /metrics)",
    ))
}

/// Checks `Authorization: Bearer KEY` when the server has a key (in time independent of
/// where the given key differs).
fn authorize(s: &Shared, headers: &HeaderMap) -> std::result::Result<(), ApiError> {
    let Some(key) = &s.config.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let (a, b) = (given.as_bytes(), key.as_bytes());
    let diff = a.len() ^ b.len()
        | a.iter()
            .zip(b.iter().cycle())
            .fold(0usize, |d, (x, y)| d | (x ^ y) as usize);
    if diff == 0 && !b.is_empty() {
        Ok(())
    } else {
        Err(ApiError::status(
            401,
            "authentication_error",
            "missing or wrong API key: send Authorization: Bearer KEY",
        ))
    }
}

fn body_bytes(
    b: std::result::Result<Bytes, BytesRejection>,
    limit: usize,
) -> std::result::Result<Bytes, ApiError> {
    b.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::status(
                413,
                "invalid_request_error",
                format!("the request body is larger than this server's limit of {limit} bytes"),
            )
        } else {
            ApiError::bad("", r.body_text())
        }
    })
}

async fn models(State(s): State<App>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&s, &headers) {
        return error_response(&e);
    }
    let info = &s.served.model.info;
    Json(json!({
        "object": "list",
        "data": [{
            "id": s.config.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "persona-gate",
            "meta": {
                "arch": info.arch,
                "n_layer": info.n_layer,
                "n_embd": info.n_embd,
                "n_vocab": info.n_vocab,
                "file_type": info.file_type,
                "sha256": s.served.model_sha256,
                "n_ctx": s.served.model.options.ctx,
                "slots": s.slots,
            }
        }]
    }))
    .into_response()
}

async fn directions(State(s): State<App>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&s, &headers) {
        return error_response(&e);
    }
    let data: Vec<Value> = s
        .served
        .directions
        .iter()
        .map(|d| {
            json!({
                "name": d.name,
                "file": d.file.display().to_string(),
                "n_layer": d.direction.n_layer(),
                "n_embd": d.direction.n_embd(),
                "norms": d.direction.norms(),
                "model_sha256": d.meta.get("model_sha256"),
                "meta": d.meta,
            })
        })
        .collect();
    Json(json!({
        "object": "list",
        "data": data,
        "model_sha256": s.served.model_sha256,
        "resid_norms": s.served.resid_norms.get(),
    }))
    .into_response()
}

async fn health(State(s): State<App>) -> Response {
    let down = s.engine_down.load(Ordering::SeqCst);
    if down || s.draining.load(Ordering::SeqCst) {
        let status = if down {
            "engine stopped"
        } else {
            "shutting down"
        };
        let mut r = (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": status })),
        )
            .into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    }
    Json(json!({"status": "ok"})).into_response()
}

async fn metrics(State(s): State<App>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&s, &headers) {
        return error_response(&e);
    }
    let body = metrics_text(&s);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// `/metrics` in Prometheus' text format.
pub fn metrics_text(s: &Shared) -> String {
    let m = &s.metrics;
    let mut o = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, v: String| {
        let _ = writeln!(o, "# HELP persona_gate_{name} {help}");
        let _ = writeln!(o, "# TYPE persona_gate_{name} {kind}");
        let _ = writeln!(o, "persona_gate_{name} {v}");
    };
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let e = m.engine.lock().expect("metrics lock").clone();
    let gen_s = e.gen_time.as_secs_f64();
    metric(
        "prompt_tokens_total",
        "counter",
        "Prompt tokens of accepted requests.",
        ld(&m.prompt_tokens).to_string(),
    );
    metric(
        "completion_tokens_total",
        "counter",
        "Tokens generated for requests.",
        ld(&m.completion_tokens).to_string(),
    );
    metric(
        "queue_depth",
        "gauge",
        "Choices waiting for a slot.",
        m.queue_depth.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "sequences_live",
        "gauge",
        "Sequences being decoded now.",
        m.live.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "slots",
        "gauge",
        "Sequences the engine decodes together at most.",
        s.slots.to_string(),
    );
    metric(
        "decode_steps_total",
        "counter",
        "Generation steps (one decode call each).",
        e.gen_steps.to_string(),
    );
    metric(
        "generation_seconds_total",
        "counter",
        "Time in generation steps.",
        format!("{gen_s:.6}"),
    );
    metric(
        "prompt_tokens_decoded_total",
        "counter",
        "Prompt tokens decoded by the engine.",
        e.prompt_tokens.to_string(),
    );
    metric(
        "prompt_tokens_cached_total",
        "counter",
        "Prompt tokens copied from cached template headers.",
        e.shared_tokens.to_string(),
    );
    metric(
        "prompt_seconds_total",
        "counter",
        "Time in prompt decoding.",
        format!("{:.6}", e.prompt_time.as_secs_f64()),
    );
    metric(
        "batch_occupancy",
        "gauge",
        "Mean sequences per generation step over slots, since start.",
        format!("{:.4}", e.occupancy() / s.slots as f64),
    );
    metric(
        "seconds_per_token",
        "gauge",
        "Mean generation time per generated token, since start.",
        format!("{:.6}", gen_s / e.gen_tokens.max(1) as f64),
    );
    metric(
        "requests_cancelled_total",
        "counter",
        "Choices whose client went away.",
        ld(&m.cancelled).to_string(),
    );
    let _ = writeln!(
        o,
        "# HELP persona_gate_request_duration_seconds Completed request durations."
    );
    let _ = writeln!(o, "# TYPE persona_gate_request_duration_seconds summary");
    let _ = writeln!(
        o,
        "persona_gate_request_duration_seconds_sum {:.6}",
        ld(&m.request_micros) as f64 / 1e6
    );
    let _ = writeln!(
        o,
        "persona_gate_request_duration_seconds_count {}",
        ld(&m.request_count)
    );
    let _ = writeln!(
        o,
        "# HELP persona_gate_requests_total HTTP requests by endpoint and status."
    );
    let _ = writeln!(o, "# TYPE persona_gate_requests_total counter");
    let mut reqs: Vec<_> = m
        .requests
        .lock()
        .expect("metrics lock")
        .iter()
        .map(|(k, v)| (*k, *v))
        .collect();
    reqs.sort();
    for ((ep, st), n) in reqs {
        let _ = writeln!(
            o,
            "persona_gate_requests_total{{endpoint=\"{ep}\",status=\"{st}\"}} {n}"
        );
    }
    o
}

/// What a completion request's inputs are.
enum Inputs {
    Chat(Vec<api::ChatMessage>),
    Text(Vec<String>),
}

/// A request checked and tokenised, ready to queue.
struct Prepared {
    /// Each prompt, with the text its sampler seeds are keyed by.
    prompts: Vec<(Prompt, String)>,
    max_new: Vec<usize>,
    dec: Decoding,
    edits: Vec<Edit>,
    echo: Vec<Value>,
}

impl Prepared {
    /// Prompt tokens of the request (each prompt once, whatever `n`), as `usage` counts them.
    fn prompt_tokens(&self) -> usize {
        self.prompts.iter().map(|(q, _)| q.tokens.len()).sum()
    }
}

/// Checks the fields, builds the edits, renders and tokenises the prompts.
fn prepare(s: &Shared, c: &Common, inputs: Inputs) -> std::result::Result<Prepared, ApiError> {
    if let Some(m) = &c.model {
        if *m != s.config.model_id {
            return Err(ApiError {
                status: 404,
                param: Some("model".into()),
                ..ApiError::bad(
                    "model",
                    format!("this server serves '{}', not '{m}'", s.config.model_id),
                )
            });
        }
    }
    let model = &s.served.model;
    let ctx = model.options.ctx as usize;
    let lim = Limits {
        max_tokens: s.config.max_tokens,
        max_n: s.config.max_n,
    };
    let dec = api::decoding(c, &lim)?;
    let ivs = api::steering(c.steering.as_deref().unwrap_or(&[]), model.info.n_layer)?;
    let mut edits = Vec::new();
    for (i, iv) in ivs.iter().enumerate() {
        let at = format!("steering[{i}]");
        let Some(d) = s.served.directions.iter().find(|d| d.name == iv.direction) else {
            let known: Vec<&str> = s
                .served
                .directions
                .iter()
                .map(|d| d.name.as_str())
                .collect();
            return Err(ApiError::bad(
                format!("{at}.direction"),
                format!(
                    "unknown direction '{}' (this server has: {})",
                    iv.direction,
                    if known.is_empty() {
                        "none; start it with --directions FILE".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        };
        let e = steer::edit(
            &at,
            i + 1,
            &d.direction,
            iv,
            s.served.resid_norms.get().map(Vec::as_slice),
            Scope::All,
        )
        .map_err(|e| ApiError::bad(at.clone(), e.to_string()))?;
        edits.push(e);
    }
    let (prompts, what) = match inputs {
        Inputs::Chat(msgs) => (vec![chat_prompt(s, &msgs)?], "messages"),
        Inputs::Text(texts) => {
            if texts.is_empty() {
                return Err(ApiError::bad("prompt", "no prompt"));
            }
            let mut v = Vec::new();
            for (i, t) in texts.iter().enumerate() {
                if t.is_empty() {
                    return Err(ApiError::bad(format!("prompt[{i}]"), "is empty"));
                }
                let p =
                    Prompt::raw(model, t).map_err(|e| ApiError::bad("prompt", e.to_string()))?;
                v.push((p, t.clone()));
            }
            (v, "prompt")
        }
    };
    let mut max_new = Vec::new();
    for (p, _) in &prompts {
        let n = p.tokens.len();
        let m = match dec.max_tokens {
            Some(m) => m,
            None => s.config.max_tokens.min(ctx.saturating_sub(n)),
        };
        if n + m.max(1) > ctx {
            return Err(ApiError::bad(
                what,
                format!(
                    "the prompt is {n} tokens; with {} new tokens that is more than the context of {ctx} tokens per sequence",
                    m.max(1)
                ),
            ));
        }
        max_new.push(m);
    }
    Ok(Prepared {
        prompts,
        max_new,
        dec,
        edits,
        echo: ivs.iter().map(api::echo).collect(),
    })
}

/// The prompt of a chat request: the messages through the model's template. Only the last
/// user message may hold special-token strings (read as plain text, as `generate` reads an
/// instruction); anywhere else they would forge the conversation's structure.
fn chat_prompt(
    s: &Shared,
    msgs: &[api::ChatMessage],
) -> std::result::Result<(Prompt, String), ApiError> {
    if msgs.is_empty() {
        return Err(ApiError::bad("messages", "is empty"));
    }
    let model = &s.served.model;
    let last_user = msgs.iter().rposition(|m| m.role == "user");
    let mut out = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer"
        ) {
            return Err(ApiError::bad(
                format!("messages[{i}].role"),
                format!("'{}' is not system, developer, user or assistant", m.role),
            ));
        }
        let content = match &m.content {
            None if m.role == "assistant" => String::new(),
            None => {
                return Err(ApiError::bad(
                    format!("messages[{i}].content"),
                    "is missing",
                ))
            }
            Some(api::Content::Text(t)) => t.clone(),
            Some(api::Content::Parts(parts)) => {
                let mut t = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(x)) => t.push_str(x),
                        _ => return Err(ApiError::bad(
                            format!("messages[{i}].content[{j}]"),
                            "only text parts ({\"type\": \"text\", \"text\": ...}) are supported",
                        )),
                    }
                }
                t
            }
        };
        if Some(i) != last_user {
            let lit = model.tokenize_literal(&content);
            let parsed = model.tokenize(&content);
            if let (Ok(a), Ok(b)) = (lit, parsed) {
                if a != b {
                    return Err(ApiError::bad(
                        format!("messages[{i}].content"),
                        "holds special-token text (such as <|im_end|>); only the last user message may, read as plain text",
                    ));
                }
            }
        }
        let role = if m.role == "developer" {
            "system"
        } else {
            m.role.as_str()
        };
        out.push(Message::new(role, &content));
    }
    let f = s
        .served
        .template
        .render_conversation(&out)
        .map_err(|e| ApiError::bad("messages", e.to_string()))?;
    let p = Prompt::new(model, f).map_err(|e| ApiError::bad("messages", e.to_string()))?;
    let key = last_user
        .map(|u| out[u].content.clone())
        .unwrap_or_default();
    Ok((p, key))
}

/// A random sampler seed for a request that gave none.
fn fresh_seed(s: &Shared) -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ s
        .next_id
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Queues one job per choice; returns the receiver of their events.
fn submit(
    s: &Shared,
    p: &Prepared,
    stream: bool,
) -> std::result::Result<(UnboundedReceiver<(usize, Event)>, usize), ApiError> {
    let (tx, rx) = unbounded_channel();
    let n = p.dec.n;
    let sampling = (p.dec.temperature > 0.0).then_some(Sampling {
        temperature: p.dec.temperature,
        top_k: p.dec.top_k,
        top_p: p.dec.top_p,
        min_p: p.dec.min_p,
    });
    let base = p.dec.seed.unwrap_or_else(|| fresh_seed(s));
    let mut jobs = Vec::new();
    for (pi, (prompt, key)) in p.prompts.iter().enumerate() {
        for k in 0..n {
            let seed = match sampling {
                // As `generate` seeds sample k of a prompt, so the two agree.
                Some(_) => sequence_seed(base, &format!("{k}\u{1f}{key}")),
                None => 0,
            };
            jobs.push(Job {
                id: s.next_id.fetch_add(1, Ordering::Relaxed),
                choice: pi * n + k,
                request: Request {
                    prompt: prompt.clone(),
                    max_new_tokens: p.max_new[pi],
                    sampling,
                    seed,
                    ignore_eos: p.dec.ignore_eos,
                    edits: p.edits.clone(),
                },
                stream,
                stops: p.dec.stops.clone(),
                tx: tx.clone(),
            });
        }
    }
    let total = jobs.len();
    if !s.enqueue(jobs) {
        let why = if s.draining.load(Ordering::SeqCst) {
            "the server is shutting down"
        } else if s.engine_down.load(Ordering::SeqCst) {
            "the engine has stopped (see the server's log)"
        } else {
            "the server's queue is full; retry later"
        };
        return Err(ApiError::status(503, "server_error", why));
    }
    s.metrics
        .prompt_tokens
        .fetch_add(p.prompt_tokens() as u64, Ordering::Relaxed);
    Ok((rx, total))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

impl Kind {
    fn endpoint(self) -> &'static str {
        match self {
            Kind::Chat => "/v1/chat/completions",
            Kind::Text => "/v1/completions",
        }
    }
}

async fn chat(
    State(s): State<App>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let r = parse(&s, &headers, body, "messages").map(|(m, c)| (c, Inputs::Chat(m)));
    complete(s, Kind::Chat, r).await
}

async fn completions(
    State(s): State<App>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let r = parse(&s, &headers, body, "prompt").map(|(p, c)| {
        let texts = match p {
            api::PromptText::One(t) => vec![t],
            api::PromptText::Many(v) => v,
        };
        (c, Inputs::Text(texts))
    });
    complete(s, Kind::Text, r).await
}

/// The key, the body's size, then the body as `own` (`messages` or `prompt`) and the rest.
fn parse<T: serde::de::DeserializeOwned>(
    s: &Shared,
    headers: &HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
    own: &str,
) -> std::result::Result<(T, Common), ApiError> {
    authorize(s, headers)?;
    let body = body_bytes(body, s.config.max_body)?;
    api::parse_request(&body, own)
}

async fn complete(
    s: App,
    kind: Kind,
    parsed: std::result::Result<(Common, Inputs), ApiError>,
) -> Response {
    let t0 = Instant::now();
    let ep = kind.endpoint();
    let (c, inputs) = match parsed {
        Ok(x) => x,
        Err(e) => {
            s.metrics.count(ep, e.status);
            return error_response(&e);
        }
    };
    // Rendering and tokenising take a few milliseconds of CPU: off the async workers.
    let s2 = Arc::clone(&s);
    let c2 = c.clone();
    let prepared = tokio::task::spawn_blocking(move || prepare(&s2, &c2, inputs))
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::status(
                500,
                "server_error",
                "request preparation failed",
            ))
        });
    let p = match prepared {
        Ok(p) => p,
        Err(e) => {
            s.metrics.count(ep, e.status);
            return error_response(&e);
        }
    };
    let (rx, total) = match submit(&s, &p, c.stream) {
        Ok(x) => x,
        Err(e) => {
            s.metrics.count(ep, e.status);
            return error_response(&e);
        }
    };
    let id = format!(
        "{}-{:016x}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        fresh_seed(&s)
    );
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let head = Head {
        id,
        created,
        model: s.config.model_id.clone(),
        kind,
        echo: p.echo.clone(),
        prompt_tokens: p.prompt_tokens(),
    };
    if c.stream {
        s.metrics.count(ep, 200);
        let usage = c.stream_options.as_ref().is_some_and(|o| o.include_usage);
        return stream_response(s, head, rx, total, usage, t0);
    }
    let r = collect(head, rx, total).await;
    let status = match &r {
        Ok(_) => 200,
        Err(e) => e.status,
    };
    s.metrics.count(ep, status);
    s.metrics.answered(t0);
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => error_response(&e),
    }
}

/// What every response of one request repeats.
struct Head {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    echo: Vec<Value>,
    prompt_tokens: usize,
}

fn failure(why: &str) -> ApiError {
    if why == CANCELLED {
        ApiError::status(503, "server_error", why)
    } else {
        ApiError::status(500, "server_error", format!("decoding failed: {why}"))
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// Waits for every choice and builds the whole response.
async fn collect(
    h: Head,
    mut rx: UnboundedReceiver<(usize, Event)>,
    total: usize,
) -> std::result::Result<Value, ApiError> {
    let mut done: Vec<Option<(String, Finish, usize)>> = vec![None; total];
    let mut left = total;
    while left > 0 {
        match rx.recv().await {
            Some((_, Event::Delta(_))) => {}
            Some((
                i,
                Event::Done {
                    text,
                    finish,
                    tokens,
                },
            )) => {
                done[i] = Some((text, finish, tokens));
                left -= 1;
            }
            Some((_, Event::Failed(why))) => return Err(failure(&why)),
            None => return Err(failure(CANCELLED)),
        }
    }
    let done: Vec<(String, Finish, usize)> =
        done.into_iter().map(|d| d.expect("all done")).collect();
    let completion: usize = done.iter().map(|d| d.2).sum();
    let choices: Vec<Value> = done
        .into_iter()
        .enumerate()
        .map(|(i, (text, finish, _))| match h.kind {
            Kind::Chat => json!({
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish.name(),
                "logprobs": Value::Null,
            }),
            Kind::Text => json!({
                "index": i,
                "text": text,
                "finish_reason": finish.name(),
                "logprobs": Value::Null,
            }),
        })
        .collect();
    Ok(json!({
        "id": h.id,
        "object": if h.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": h.created,
        "model": h.model,
        "system_fingerprint": concat!("persona-gate-", env!("CARGO_PKG_VERSION")),
        "choices": choices,
        "usage": usage(h.prompt_tokens, completion),
        "steering": h.echo,
    }))
}

impl Head {
    /// One streamed chunk with one choice.
    fn chunk(
        &self,
        index: usize,
        delta: Option<&str>,
        role: bool,
        finish: Option<Finish>,
    ) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let mut d = serde_json::Map::new();
                if role {
                    d.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = delta {
                    d.insert("content".into(), json!(t));
                }
                json!({"index": index, "delta": d, "finish_reason": finish.map(Finish::name), "logprobs": Value::Null})
            }
            Kind::Text => json!({
                "index": index,
                "text": delta.unwrap_or(""),
                "finish_reason": finish.map(Finish::name),
                "logprobs": Value::Null,
            }),
        };
        json!({
            "id": self.id,
            "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": concat!("persona-gate-", env!("CARGO_PKG_VERSION")),
            "choices": [choice],
        })
    }
}

/// Server-sent events: a first chunk per choice (the role, and the steering echoed), a
/// chunk per piece of text, a last chunk per choice with its finish reason, the usage if
/// asked for, then `[DONE]`. A client that goes away closes the channel, which the engine
/// sees at its next step.
fn stream_response(
    s: App,
    h: Head,
    mut rx: UnboundedReceiver<(usize, Event)>,
    total: usize,
    with_usage: bool,
    t0: Instant,
) -> Response {
    let (tx, out) = tokio::sync::mpsc::channel::<SseEvent>(64);
    tokio::spawn(async move {
        let send = |v: Value| SseEvent::default().data(v.to_string());
        for i in 0..total {
            let mut first = h.chunk(i, Some(""), h.kind == Kind::Chat, None);
            if i == 0 {
                first["steering"] = json!(h.echo);
            }
            if tx.send(send(first)).await.is_err() {
                return;
            }
        }
        let mut left = total;
        let mut completion = 0;
        while left > 0 {
            let ev = match rx.recv().await {
                Some((i, Event::Delta(t))) => h.chunk(i, Some(&t), false, None),
                Some((i, Event::Done { finish, tokens, .. })) => {
                    left -= 1;
                    completion += tokens;
                    h.chunk(i, None, false, Some(finish))
                }
                Some((_, Event::Failed(why))) => {
                    let _ = tx.send(send(failure(&why).body())).await;
                    break;
                }
                None => {
                    let _ = tx.send(send(failure(CANCELLED).body())).await;
                    break;
                }
            };
            if tx.send(send(ev)).await.is_err() {
                return;
            }
        }
        if with_usage && left == 0 {
            let mut u = h.chunk(0, None, false, None);
            u["choices"] = json!([]);
            u["usage"] = usage(h.prompt_tokens, completion);
            if tx.send(send(u)).await.is_err() {
                return;
            }
        }
        let _ = tx.send(SseEvent::default().data("[DONE]")).await;
        s.metrics.answered(t0);
    });
    Sse::new(ReceiverStream::new(out).map(Ok::<_, Infallible>)).into_response()
}
