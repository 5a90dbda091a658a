//! `persona-gate serve` against real clients: curl and the official `openai` Python package,
//! on a server each test starts on a free loopback port (SmolLM2-135M, greedy unless said).
//! The `openai` package comes from `scripts/setup.sh test`'s virtual environment; without it
//! the Python tests print a SKIPPED line, unless `PERSONA_GATE_REQUIRE_PYTHON=1` (as `make
//! test` sets) makes that a failure.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{bin, model_path, run_ok, scratch, SMOL};
use serde_json::{json, Value};

/// The persona_vectors fixture for SmolLM2, as another tool's file (see tests/imports.rs).
fn pv() -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    format!(
        "{}:hidden_states",
        root.join("tests/fixtures/imports/pv_smol.pt").display()
    )
}

/// A server started by a test; killed when dropped.
struct Server {
    child: Child,
    url: String,
    /// Everything it wrote on stderr so far.
    log: Arc<Mutex<String>>,
}

impl Server {
    /// `serve` on SmolLM2 with the tests' settings and `extra` flags.
    fn start(extra: &[&str]) -> Server {
        let mut c = bin();
        c.args(["serve", "-t", "2", "--ctx", "512", "--port", "0", "-m"])
            .arg(model_path(SMOL))
            .args(["--directions", &format!("persona={}", pv())])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let err = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let l2 = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if let Some(at) = line.find("http://") {
                    let _ = tx.send(line[at..].split_whitespace().next().unwrap().to_string());
                }
                let mut g = l2.lock().unwrap();
                g.push_str(&line);
                g.push('\n');
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(u) => u,
            Err(_) => {
                let _ = child.kill();
                panic!("server did not start:\n{}", log.lock().unwrap());
            }
        };
        Server { child, url, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `curl` of `path` with a JSON body (POST) or none (GET): (status, headers, body).
fn curl(url: &str, path: &str, body: Option<&str>, extra: &[&str]) -> (u16, String, String) {
    let mut c = Command::new("curl");
    c.args(["-s", "-S", "-D", "-", "--max-time", "120"]);
    if body.is_some() {
        c.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            "@-",
        ]);
        c.stdin(Stdio::piped());
    }
    c.args(extra).arg(format!("{url}{path}"));
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c
        .spawn()
        .expect("curl is installed (scripts/setup.sh test)");
    if let Some(b) = body {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b.as_bytes()).unwrap();
    }
    let o = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_string(), body.to_string())
}

fn post(s: &Server, path: &str, body: &Value) -> (u16, Value) {
    let (st, _, b) = curl(&s.url, path, Some(&body.to_string()), &[]);
    (
        st,
        serde_json::from_str(&b).unwrap_or_else(|_| panic!("not JSON: {b}")),
    )
}

fn chat_body(user: &str, steering: Value, max_tokens: u32) -> Value {
    json!({
        "messages": [{"role": "user", "content": user}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "steering": steering,
    })
}

fn content(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content: {v}"))
        .to_string()
}

/// The data lines of an SSE body, as JSON (the final `[DONE]` checked and dropped).
fn events(body: &str) -> Vec<Value> {
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// The value of `persona_gate_<name>` in a /metrics text.
fn metric(met: &str, name: &str) -> u64 {
    met.lines()
        .find_map(|l| l.strip_prefix(&format!("persona_gate_{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {met}"))
        .parse()
        .unwrap()
}

fn streamed_text(ev: &[Value]) -> String {
    ev.iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect()
}

const USER: &str = "Name three colours.";

#[test]
fn chat_plain_and_streamed_agree_and_prompts_are_not_logged() {
    let s = Server::start(&[]);
    let (h, _, b) = curl(&s.url, "/health", None, &[]);
    assert_eq!((h, b.trim()), (200, r#"{"status":"ok"}"#));
    let (st, v) = post(&s, "/v1/chat/completions", &chat_body(USER, json!([]), 24));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    let text = content(&v);
    assert!(!text.is_empty());
    let usage = &v["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 5, "{v}");
    let mut body = chat_body(USER, json!([]), 24);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (st, head, sse) = curl(
        &s.url,
        "/v1/chat/completions",
        Some(&body.to_string()),
        &["-N"],
    );
    assert_eq!(st, 200);
    assert!(head.to_lowercase().contains("text/event-stream"), "{head}");
    let ev = events(&sse);
    assert_eq!(ev[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(
        streamed_text(&ev),
        text,
        "streamed text differs from the plain response"
    );
    let fin: Vec<&Value> = ev
        .iter()
        .filter(|e| {
            !e["choices"][0]["finish_reason"].is_null()
                && e["choices"].as_array().is_some_and(|c| !c.is_empty())
        })
        .collect();
    assert_eq!(fin.len(), 1);
    assert_eq!(
        fin[0]["choices"][0]["finish_reason"],
        v["choices"][0]["finish_reason"]
    );
    assert_eq!(ev.last().unwrap()["usage"], *usage, "stream usage differs");
    // Stop strings cut the text before the stop, plain and streamed alike.
    let stop = text.chars().skip(4).take(3).collect::<String>();
    let mut b = chat_body(USER, json!([]), 24);
    b["stop"] = json!([stop]);
    let (_, v2) = post(&s, "/v1/chat/completions", &b);
    let want = &text[..text.find(&stop).unwrap()];
    assert_eq!(content(&v2), want);
    assert_eq!(v2["choices"][0]["finish_reason"], "stop");
    b["stream"] = json!(true);
    let (_, _, sse) = curl(
        &s.url,
        "/v1/chat/completions",
        Some(&b.to_string()),
        &["-N"],
    );
    assert_eq!(streamed_text(&events(&sse)), want);
    // Text completions take the prompt as is.
    let (st, v) = post(
        &s,
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["choices"][0]["text"].as_str().unwrap().len() > 2, "{v}");
    // ignore_eos (llama-server's field) generates to max_tokens past the end of the reply.
    let (_, v) = post(
        &s,
        "/v1/chat/completions",
        &chat_body("Say hello.", json!([]), 200),
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let n = v["usage"]["completion_tokens"].as_u64().unwrap() + 10;
    let mut b = chat_body("Say hello.", json!([]), n as u32);
    b["ignore_eos"] = json!(true);
    let (_, v) = post(&s, "/v1/chat/completions", &b);
    let got = (
        v["usage"]["completion_tokens"].as_u64(),
        v["choices"][0]["finish_reason"].as_str(),
    );
    assert_eq!(got, (Some(n), Some("length")), "{v}");
    // Models and directions.
    let (_, _, m) = curl(&s.url, "/v1/models", None, &[]);
    let m: Value = serde_json::from_str(&m).unwrap();
    assert_eq!(m["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(m["data"][0]["meta"]["n_layer"], 30);
    let (_, _, d) = curl(&s.url, "/v1/directions", None, &[]);
    let d: Value = serde_json::from_str(&d).unwrap();
    assert_eq!(d["data"][0]["name"], "persona");
    assert_eq!(d["data"][0]["norms"].as_array().unwrap().len(), 30);
    assert_eq!(d["model_sha256"], m["data"][0]["meta"]["sha256"]);
    // Metrics count what was served.
    let (_, _, met) = curl(&s.url, "/metrics", None, &[]);
    assert!(
        met.contains(
            r#"persona_gate_requests_total{endpoint="/v1/chat/completions",status="200"} 6"#
        ),
        "{met}"
    );
    for name in [
        "queue_depth",
        "batch_occupancy",
        "seconds_per_token",
        "completion_tokens_total",
    ] {
        assert!(
            met.contains(&format!("\npersona_gate_{name} ")),
            "{name}: {met}"
        );
    }
    // The template header (SmolLM2's default system prompt and user header) was decoded
    // once and copied into the later requests.
    assert!(metric(&met, "prompt_tokens_cached_total") >= 4 * 8, "{met}");
    // Research data stays out of the log.
    let log = s.log();
    assert!(!log.contains(USER) && !log.contains(&text), "{log}");
}

/// `generate --format jsonl`'s text for USER under `intervention` (none: unsteered).
fn generate(intervention: Option<&str>, n: u32) -> String {
    let mut extra = vec![];
    if let Some(i) = intervention {
        extra = vec!["--intervention", i];
    }
    generate_all(n, &extra).remove(0)
}

/// Every completion `generate --format jsonl` prints for USER with `extra` flags, with the
/// server's default kernels (rowwise; generate's default is invariant).
fn generate_all(n: u32, extra: &[&str]) -> Vec<String> {
    let mut c = bin();
    c.args([
        "generate",
        "--kernels",
        "rowwise",
        "-t",
        "2",
        "--ctx",
        "512",
    ])
    .args(["--format", "jsonl", "-p", USER, "-n", &n.to_string(), "-m"])
    .arg(model_path(SMOL))
    .args(extra);
    run_ok(&mut c)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn steered_responses_equal_generate_with_the_same_intervention() {
    let s = Server::start(&[]);
    let cases = [
        (
            json!([{"direction": "persona", "op": "add", "layers": "6-10", "coefficient": 0.5}]),
            format!("op=add direction={} layers=6-10 coefficient=0.5", pv()),
        ),
        (
            json!([{"direction": "persona", "op": "project", "layers": "all"}]),
            format!("op=project direction={} layers=all", pv()),
        ),
    ];
    let (_, plain) = post(&s, "/v1/chat/completions", &chat_body(USER, json!([]), 24));
    assert_eq!(
        content(&plain),
        generate(None, 24),
        "unsteered differs from generate"
    );
    for (steer, flag) in cases {
        let (st, v) = post(
            &s,
            "/v1/chat/completions",
            &chat_body(USER, steer.clone(), 24),
        );
        assert_eq!(st, 200, "{v}");
        let got = content(&v);
        assert_eq!(got, generate(Some(&flag), 24), "{steer}");
        assert_ne!(got, content(&plain), "{steer} changed nothing");
        // Echoed, normalised.
        let echo = &v["steering"][0];
        assert_eq!(echo["direction"], "persona");
        assert!(echo["layers"].is_array(), "{v}");
        assert_eq!(echo["scale"], "raw");
    }
    // Sampled: the same seed and settings give generate's samples, choice k = sample k.
    let mut b = chat_body(USER, json!([]), 16);
    for (k, v) in [
        ("temperature", json!(0.8)),
        ("top_k", json!(40)),
        ("top_p", json!(0.95)),
        ("min_p", json!(0.05)),
        ("seed", json!(1)),
        ("n", json!(2)),
    ] {
        b[k] = v;
    }
    let (st, v) = post(&s, "/v1/chat/completions", &b);
    assert_eq!(st, 200, "{v}");
    let got: Vec<&str> = (0..2)
        .map(|i| v["choices"][i]["message"]["content"].as_str().unwrap())
        .collect();
    let want = generate_all(16, &["--temp", "0.8", "-s", "1", "--samples", "2"]);
    assert_eq!(got, want, "sampled choices differ from generate's samples");
    assert_ne!(got[0], got[1]);
}

#[test]
fn eight_concurrent_clients_each_get_their_solo_text() {
    // serve's default kernels (rowwise), and the tiled invariant ones of every other command.
    for kernels in ["rowwise", "invariant"] {
        eight_concurrent_clients_with(kernels);
    }
}

fn eight_concurrent_clients_with(kernels: &str) {
    let s = Server::start(&["--kernels", kernels]);
    let steer = |i: usize| -> Value {
        match i {
            0 => json!([]),
            1 => json!([{"direction": "persona", "op": "project", "layers": "all"}]),
            _ => json!([{"direction": "persona", "op": "add", "layers": format!("{}-{}", i, i + 4),
                         "coefficient": if i.is_multiple_of(2) { 0.5 } else { -0.5 }}]),
        }
    };
    let bodies: Vec<Value> = (0..8)
        .map(|i| chat_body(["Name three colours.", "Say hello."][i % 2], steer(i), 20))
        .collect();
    let solo: Vec<String> = bodies
        .iter()
        .map(|b| content(&post(&s, "/v1/chat/completions", b).1))
        .collect();
    let distinct: std::collections::BTreeSet<&String> = solo.iter().collect();
    assert!(
        distinct.len() >= 4,
        "steering made too little difference: {solo:?}"
    );
    for round in 0..2 {
        let url = s.url.clone();
        let handles: Vec<_> = bodies
            .iter()
            .cloned()
            .map(|b| {
                let url = url.clone();
                std::thread::spawn(move || {
                    let (st, _, body) =
                        curl(&url, "/v1/chat/completions", Some(&b.to_string()), &[]);
                    assert_eq!(st, 200, "{body}");
                    content(&serde_json::from_str(&body).unwrap())
                })
            })
            .collect();
        let together: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(
            together, solo,
            "round {round}: batched text differs from solo"
        );
    }
}

#[test]
fn bad_requests_get_400_naming_the_field() {
    let s = Server::start(&["--max-tokens", "64"]);
    let long = "word ".repeat(600);
    let cases: Vec<(String, u16, &str)> = vec![
        ("{\"messages\": [".into(), 400, "not valid JSON"),
        (json!({"messages": [{"role": "user", "content": "x"}], "temprature": 1}).to_string(), 400, "temprature"),
        (json!({"model": "x"}).to_string(), 400, "messages"),
        (json!({"messages": [{"role": "user", "content": "x"}],
                "steering": [{"direction": "nope", "op": "add", "layers": 3}]}).to_string(), 400, "steering[0].direction"),
        (json!({"messages": [{"role": "user", "content": "x"}],
                "steering": [{"direction": "persona", "op": "add", "layers": 30}]}).to_string(), 400, "steering[0].layers"),
        (json!({"messages": [{"role": "user", "content": "x"}],
                "steering": [{"direction": "persona", "op": "add", "layers": 3, "coefficient": "NaN"}]}).to_string(), 400, "steering[0].coefficient"),
        (json!({"messages": [{"role": "user", "content": "x"}],
                "steering": [{"direction": "persona", "op": "add", "layers": 3, "coefficient": 1e39}]}).to_string(), 400, "steering[0]"),
        (json!({"messages": [{"role": "user", "content": long}]}).to_string(), 400, "messages"),
        (json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 65}).to_string(), 400, "max_tokens"),
        (json!({"messages": [{"role": "wizard", "content": "x"}]}).to_string(), 400, "messages[0].role"),
        (json!({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).to_string(), 400, "invalid type"),
        (json!({"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}).to_string(), 404, "model"),
        (json!({"prompt": "", "max_tokens": 4}).to_string(), 400, "prompt"),
    ];
    for (body, want, needle) in cases {
        let path = if body.contains("\"prompt\"") {
            "/v1/completions"
        } else {
            "/v1/chat/completions"
        };
        let (st, _, b) = curl(&s.url, path, Some(&body), &[]);
        let v: Value = serde_json::from_str(&b).unwrap_or_else(|_| panic!("{body}: not JSON: {b}"));
        assert_eq!(st, want, "{body}: {b}");
        let e = &v["error"];
        let named = format!("{} {}", e["message"], e["param"]);
        assert!(named.contains(needle), "{body}: {named}");
        assert_eq!(e["type"], "invalid_request_error", "{body}");
    }
    let (st, _, b) = curl(&s.url, "/v1/nowhere", None, &[]);
    assert_eq!(st, 404, "{b}");
    // The server is still up and well after all of that.
    let (st, v) = post(&s, "/v1/chat/completions", &chat_body(USER, json!([]), 4));
    assert_eq!(st, 200, "{v}");
}

#[test]
fn limits_and_keys_413_401_and_503_with_retry_after() {
    let s = Server::start(&[
        "--max-body",
        "4K",
        "--api-key",
        "sesame",
        "--parallel",
        "1",
        "--queue",
        "1",
    ]);
    let key = ["-H", "Authorization: Bearer sesame"];
    let big = json!({"messages": [{"role": "user", "content": "y".repeat(8000)}]}).to_string();
    let (st, _, b) = curl(&s.url, "/v1/chat/completions", Some(&big), &key);
    assert_eq!(st, 413, "{b}");
    assert!(b.contains("limit of 4096 bytes"), "{b}");
    let small = chat_body(USER, json!([]), 4).to_string();
    let (st, _, b) = curl(&s.url, "/v1/chat/completions", Some(&small), &[]);
    assert_eq!(st, 401, "{b}");
    let (st, _, _) = curl(
        &s.url,
        "/v1/chat/completions",
        Some(&small),
        &["-H", "Authorization: Bearer sesamf"],
    );
    assert_eq!(st, 401);
    let (st, _, _) = curl(&s.url, "/v1/models", None, &[]);
    assert_eq!(st, 401);
    let (st, _, _) = curl(&s.url, "/health", None, &[]);
    assert_eq!(st, 200, "/health needs no key");
    // One slot and a queue of one: of six long requests at once, some wait, the rest 503.
    let long =
        json!({"prompt": "Once upon a time", "max_tokens": 120, "temperature": 0}).to_string();
    let url = s.url.clone();
    let handles: Vec<_> = (0..6)
        .map(|_| {
            let (url, long) = (url.clone(), long.clone());
            std::thread::spawn(move || {
                curl(
                    &url,
                    "/v1/completions",
                    Some(&long),
                    &["-H", "Authorization: Bearer sesame"],
                )
            })
        })
        .collect();
    let got: Vec<(u16, String, String)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = got.iter().filter(|g| g.0 == 200).count();
    let busy: Vec<&(u16, String, String)> = got.iter().filter(|g| g.0 == 503).collect();
    assert_eq!(ok + busy.len(), 6, "{got:?}");
    assert!(ok >= 1 && !busy.is_empty(), "ok {ok}, busy {}", busy.len());
    for b in busy {
        assert!(b.1.to_lowercase().contains("retry-after: 1"), "{}", b.1);
        assert!(b.2.contains("queue is full"), "{}", b.2);
    }
}

#[test]
fn a_client_that_disconnects_frees_its_slot() {
    let s = Server::start(&["--parallel", "1"]);
    // A long streamed request on the only slot, dropped after its first piece of text.
    let body = json!({"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0,
                      "stream": true})
    .to_string();
    let mut c = Command::new("curl")
        .args([
            "-s",
            "-N",
            "-H",
            "Content-Type: application/json",
            "-d",
            &body,
        ])
        .arg(format!("{}/v1/completions", s.url))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = c.stdout.take().unwrap();
    let mut buf = [0u8; 512];
    let mut seen = String::new();
    while seen.matches("data: ").count() < 3 {
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let _ = c.kill();
    let _ = c.wait();
    drop(out);
    // The next request gets the slot long before 400 tokens could have been generated.
    let t = Instant::now();
    let (st, v) = post(
        &s,
        "/v1/completions",
        &json!({"prompt": "Hi", "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(st, 200, "{v}");
    let (_, _, met) = curl(&s.url, "/metrics", None, &[]);
    assert!(
        met.contains("persona_gate_requests_cancelled_total 1\n"),
        "{met}"
    );
    let gen = metric(&met, "completion_tokens_total");
    assert!(
        gen < 200,
        "the dropped stream kept decoding: {gen} tokens, {:?}",
        t.elapsed()
    );
}

#[test]
fn sigterm_finishes_requests_in_flight_then_exits() {
    let mut s = Server::start(&[]);
    let url = s.url.clone();
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let b = json!({"prompt": format!("Story {i}: once upon a time"), "max_tokens": 300,
                               "temperature": 0, "stream": true});
                curl(&url, "/v1/completions", Some(&b.to_string()), &["-N"])
            })
        })
        .collect();
    // Until the engine holds them.
    let t = Instant::now();
    loop {
        let (_, _, met) = curl(&url, "/metrics", None, &[]);
        if met.contains("persona_gate_sequences_live 3") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{met}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = s.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    for h in handles {
        let (st, _, body) = h.join().unwrap();
        assert_eq!(st, 200);
        let ev = events(&body);
        let fin = ev
            .iter()
            .filter(|e| !e["choices"][0]["finish_reason"].is_null())
            .count();
        assert_eq!(fin, 1, "a request in flight did not finish: {body}");
    }
    let t = Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "server did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}: {}", s.log());
    assert!(s.log().contains("shutting down"), "{}", s.log());
}

// ---- the official openai client --------------------------------------------------------

/// The Python of `scripts/setup.sh test`'s environment, if it has the `openai` package.
fn python_openai(test: &str) -> Option<PathBuf> {
    let venv = PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
        .join(".cache/persona-gate/python/bin/python3");
    let py = std::env::var_os("PERSONA_GATE_PYTHON").map_or(venv, PathBuf::from);
    let ok = Command::new(&py)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(py);
    }
    let why = format!(
        "{} cannot import openai (scripts/setup.sh test installs it)",
        py.display()
    );
    assert!(
        std::env::var("PERSONA_GATE_REQUIRE_PYTHON").map_or(true, |v| v != "1"),
        "PERSONA_GATE_REQUIRE_PYTHON=1 but {why}"
    );
    common::browser::skipped(test, &why);
    None
}

fn python(py: &PathBuf, script: &str, url: &str) -> Value {
    let d = scratch("py");
    let f = d.join("client.py");
    std::fs::write(&f, script).unwrap();
    let o = Command::new(py)
        .arg(&f)
        .arg(format!("{url}/v1"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

const OPENAI_CLIENT: &str = r#"
import json, sys
from openai import OpenAI
c = OpenAI(base_url=sys.argv[1], api_key="sesame")
model = c.models.list().data[0].id
msgs = [{"role": "user", "content": "Name three colours."}]
steer = [{"direction": "persona", "op": "add", "layers": "6-10", "coefficient": 0.5}]
plain = c.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=24)
steered = c.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=24,
                                    extra_body={"steering": steer})
pieces = []
for ch in c.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=24,
                                    stream=True, extra_body={"steering": steer}):
    if ch.choices and ch.choices[0].delta.content:
        pieces.append(ch.choices[0].delta.content)
comp = c.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                            temperature=0)
sampled = [c.chat.completions.create(model=model, messages=msgs, temperature=0.9, seed=11,
                                     max_tokens=16, n=2) for _ in range(2)]
try:
    c.chat.completions.create(model=model, messages=msgs, max_tokens=4,
                              extra_body={"steering": [{"direction": "nope", "op": "add", "layers": 3}]})
    err = None
except Exception as e:
    err = {"status": e.status_code, "param": getattr(e, "param", None)}
print(json.dumps({
    "model": model,
    "plain": plain.choices[0].message.content,
    "steered": steered.choices[0].message.content,
    "echo": steered.model_extra.get("steering"),
    "streamed": "".join(pieces),
    "completion": comp.choices[0].text,
    "usage": plain.usage.total_tokens,
    "sampled": [[x.message.content for x in s.choices] for s in sampled],
    "error": err,
}))
"#;

#[test]
fn the_openai_client_chats_streams_completes_and_steers() {
    let Some(py) = python_openai("the_openai_client_chats_streams_completes_and_steers") else {
        return;
    };
    let s = Server::start(&["--api-key", "sesame"]);
    let v = python(&py, OPENAI_CLIENT, &s.url);
    assert_eq!(v["model"], "SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(v["plain"].as_str().unwrap(), generate(None, 24));
    let flag = format!("op=add direction={} layers=6-10 coefficient=0.5", pv());
    assert_eq!(v["steered"].as_str().unwrap(), generate(Some(&flag), 24));
    assert_eq!(v["streamed"], v["steered"]);
    assert_ne!(v["steered"], v["plain"]);
    assert_eq!(v["echo"][0]["layers"], json!([6, 7, 8, 9, 10]));
    assert!(v["completion"].as_str().unwrap().len() > 2, "{v}");
    assert!(v["usage"].as_u64().unwrap() > 10);
    // Sampling with a seed: the same seed gives the same choices, and its two choices differ.
    let sm = v["sampled"].as_array().unwrap();
    assert_eq!(sm[0], sm[1], "same seed, different samples");
    assert_ne!(sm[0][0], sm[0][1], "n=2 gave the same sample twice: {v}");
    assert_eq!(
        v["error"],
        json!({"status": 400, "param": "steering[0].direction"})
    );
}

const LOAD: &str = r#"
import json, sys, concurrent.futures as cf
from openai import OpenAI
c = OpenAI(base_url=sys.argv[1], api_key="none", max_retries=0, timeout=300)
def one(i):
    steer = [] if i % 2 else [{"direction": "persona", "op": "add", "layers": str(i % 20), "coefficient": 0.3}]
    r = c.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", temperature=0, max_tokens=6,
        messages=[{"role": "user", "content": f"Say the number {i}."}], extra_body={"steering": steer})
    return i, r.id, r.choices[0].finish_reason, r.usage.completion_tokens
with cf.ThreadPoolExecutor(16) as ex:
    out = list(ex.map(one, range(200)))
print(json.dumps(out))
"#;

#[test]
fn two_hundred_requests_from_sixteen_clients_all_answered() {
    let Some(py) = python_openai("two_hundred_requests_from_sixteen_clients_all_answered") else {
        return;
    };
    let s = Server::start(&[]);
    let v = python(&py, LOAD, &s.url);
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 200);
    let ids: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| r[1].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 200, "response ids repeat");
    for r in rows {
        assert!(r[3].as_u64().unwrap() >= 1, "{r}");
    }
    let (_, _, met) = curl(&s.url, "/metrics", None, &[]);
    assert!(
        met.contains(
            r#"persona_gate_requests_total{endpoint="/v1/chat/completions",status="200"} 200"#
        ),
        "{met}"
    );
    assert!(met.contains("persona_gate_queue_depth 0"), "{met}");
    assert!(met.contains("persona_gate_sequences_live 0"), "{met}");
}
