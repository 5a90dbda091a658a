//! A small W3C WebDriver client for tests that check a page in a real browser (headless
//! Chromium driven by chromedriver), over plain `std::net::TcpStream` and serde_json: no HTTP
//! or WebDriver crate, as the few commands a test needs are a handful of JSON requests.
//!
//! Where Chromium or chromedriver is absent, [`Browser::start`] gives `None` and
//! [`start_or_skip`] lets the test pass with a visible SKIPPED line, unless
//! `PERSONA_GATE_REQUIRE_BROWSER=1` (set by `make test`) makes that absence a failure.
//! `PERSONA_GATE_CHROMEDRIVER` and `PERSONA_GATE_CHROMIUM` name the two programs (defaults:
//! `chromedriver` on PATH or /usr/bin/chromedriver, and /usr/bin/chromium); pointing one at a
//! path that does not exist exercises the skip path.
//!
//! Every wait is bounded: the driver must be ready within [`READY_TIMEOUT`], page loads and
//! scripts time out in the browser after [`PAGE_TIMEOUT`], and a reply that never comes fails
//! the socket read after [`REPLY_TIMEOUT`]. Any WebDriver error panics, naming the command.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long chromedriver may take to answer /status with `ready: true`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// The browser's own page-load and script timeouts.
pub const PAGE_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest wait for one HTTP reply (session creation starts Chromium, the slowest step).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// The key under which W3C WebDriver returns an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver child process with one headless Chromium session. Dropping it ends the
/// session (which closes Chromium) and kills chromedriver.
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
}

/// Starts a browser for `test`, or says why not: `None` (after a SKIPPED line on the real
/// stderr) where Chromium or chromedriver is absent, a panic with the reason instead where
/// `PERSONA_GATE_REQUIRE_BROWSER=1`.
pub fn start_or_skip(test: &str) -> Option<Browser> {
    match Browser::locate() {
        Ok((driver, chromium)) => Some(Browser::launch(&driver, &chromium)),
        Err(why) if require_browser() => {
            panic!("{test}: PERSONA_GATE_REQUIRE_BROWSER=1 but {why}")
        }
        Err(why) => {
            skipped(test, &why);
            None
        }
    }
}

/// Whether `PERSONA_GATE_REQUIRE_BROWSER=1`: a missing browser is then a failure, not a skip.
pub fn require_browser() -> bool {
    std::env::var("PERSONA_GATE_REQUIRE_BROWSER").is_ok_and(|v| v == "1")
}

/// Says on the real stderr that a test did not run its check: the test harness captures
/// `eprintln!` of a passing test, so a skip written that way would never be seen.
pub fn skipped(test: &str, why: &str) {
    let _ = std::io::stderr().write_all(format!("\n{test}: SKIPPED: {why}\n").as_bytes());
}

impl Browser {
    /// A headless Chromium session, or `None` where Chromium or chromedriver is absent (the
    /// caller decides whether that is a skip; see [`start_or_skip`]). Panics when both are
    /// present but fail to start: that is a broken setup, not a missing one.
    pub fn start() -> Option<Browser> {
        let (driver, chromium) = Browser::locate().ok()?;
        Some(Browser::launch(&driver, &chromium))
    }

    /// The chromedriver and Chromium programs, or a one-line reason why one is missing.
    fn locate() -> Result<(PathBuf, PathBuf), String> {
        let driver = match std::env::var_os("PERSONA_GATE_CHROMEDRIVER") {
            Some(p) => PathBuf::from(p),
            None => on_path("chromedriver").unwrap_or_else(|| "/usr/bin/chromedriver".into()),
        };
        let chromium = std::env::var_os("PERSONA_GATE_CHROMIUM")
            .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
        for (what, p) in [("chromedriver", &driver), ("chromium", &chromium)] {
            if !p.is_file() {
                return Err(format!(
                    "{what} not found at {} (scripts/setup.sh test installs it)",
                    p.display()
                ));
            }
        }
        Ok((driver, chromium))
    }

    fn launch(driver: &Path, chromium: &Path) -> Browser {
        // The free port is found by binding port 0 and letting it go; another process may take
        // it in between, and then this chromedriver exits at once: try a few ports.
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port();
            let mut child = Command::new(driver)
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", driver.display()));
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            match wait_ready(&mut child, addr) {
                Ok(()) => {
                    let mut b = Browser {
                        driver: child,
                        addr,
                        session: String::new(),
                    };
                    b.session = b.new_session(chromium);
                    return b;
                }
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last = why;
                }
            }
        }
        panic!("{} did not start: {last}", driver.display())
    }

    fn new_session(&self, chromium: &Path) -> String {
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1600"],
            },
            // Console messages and uncaught exceptions, read back by console_errors().
            "goog:loggingPrefs": {"browser": "ALL"},
            "timeouts": {
                "implicit": 0,
                "pageLoad": PAGE_TIMEOUT.as_millis() as u64,
                "script": PAGE_TIMEOUT.as_millis() as u64,
            },
        }}});
        let v = self.call("POST", "/session", Some(&caps));
        v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("webdriver new session: no sessionId in {v}"))
            .to_owned()
    }

    /// Loads a local file (as a file:// URL) and waits for its load event.
    pub fn open(&self, path: &Path) {
        let abs = std::fs::canonicalize(path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        let url = format!("file://{}", percent_encode_path(&abs.to_string_lossy()));
        self.cmd("POST", "url", json!({ "url": url }));
    }

    /// Runs `js` as the body of a function in the page (WebDriver execute/sync) and gives back
    /// what it `return`s, as JSON (`null` without a return). A thrown exception panics.
    pub fn eval(&self, js: &str) -> Value {
        self.eval_with(js, json!([]))
    }

    fn eval_with(&self, js: &str, args: Value) -> Value {
        self.cmd(
            "POST",
            "execute/sync",
            json!({ "script": js, "args": args }),
        )
    }

    /// Clicks the first element matching `css`, as a user would (WebDriver scrolls it into
    /// view and fails if something covers it).
    pub fn click(&self, css: &str) {
        let e = self.find(css);
        self.cmd("POST", &format!("element/{e}/click"), json!({}));
    }

    /// Replaces the text of the first element matching `css` with `text`, as a user would:
    /// Ctrl+A and Backspace, then `text` key by key, so the page sees an `input` event for
    /// each change; for `<input>` and `<textarea>`, whose value is checked afterwards.
    /// (WebDriver's own Element Clear fires only `change`, on blur, so a page
    /// that filters on `input` would miss that its field was emptied.)
    pub fn type_into(&self, css: &str, text: &str) {
        const CONTROL: char = '\u{E009}';
        const RELEASE: char = '\u{E000}';
        const BACKSPACE: char = '\u{E003}';
        let e = self.find(css);
        let keys = format!("{CONTROL}a{RELEASE}{BACKSPACE}{text}");
        self.cmd(
            "POST",
            &format!("element/{e}/value"),
            json!({ "text": keys }),
        );
        let now = self.eval_with("return arguments[0].value;", json!([{ ELEMENT: e }]));
        assert_eq!(
            now, text,
            "type_into {css:?}: the field holds {now} after typing"
        );
    }

    /// Chooses the `<option>` whose value is `value` in the `<select>` matching `css`, by
    /// clicking it: WebDriver then selects it and fires `input` and `change`, as a user's
    /// choice would. Panics when no option has that value.
    pub fn select(&self, css: &str, value: &str) {
        let sel = self.find(css);
        let options = self.cmd(
            "POST",
            &format!("element/{sel}/elements"),
            json!({"using": "css selector", "value": "option"}),
        );
        let mut seen = Vec::new();
        for o in options.as_array().into_iter().flatten() {
            let id = element_id(o, "option");
            let v = self.cmd("GET", &format!("element/{id}/property/value"), Value::Null);
            if v.as_str() == Some(value) {
                self.cmd("POST", &format!("element/{id}/click"), json!({}));
                let now = self.cmd("GET", &format!("element/{sel}/property/value"), Value::Null);
                assert_eq!(
                    now, value,
                    "select {css:?}: holds {now} after clicking {value:?}"
                );
                return;
            }
            seen.push(v.to_string());
        }
        panic!(
            "select {css:?}: no option with value {value:?} (values: {})",
            seen.join(", ")
        )
    }

    /// How many elements match `css` and are rendered: they have a layout box, so neither
    /// they nor an ancestor is `display: none`. (`getClientRects()` rather than
    /// `offsetParent`, which is also null for `position: fixed` elements that are visible.)
    pub fn count_visible(&self, css: &str) -> usize {
        let n = self.eval_with(
            "return Array.from(document.querySelectorAll(arguments[0]))\
             .filter(e => e.getClientRects().length > 0).length;",
            json!([css]),
        );
        n.as_u64()
            .unwrap_or_else(|| panic!("count_visible {css:?}: not a count: {n}")) as usize
    }

    /// The browser log's SEVERE entries since the previous call (reading the log empties it):
    /// `console.error` messages, uncaught exceptions ("Uncaught Error: ...") and failed loads,
    /// each as chromedriver words it ("file:///... 12:34 \"message\"").
    pub fn console_errors(&self) -> Vec<String> {
        // chromedriver keeps the legacy log command under its own /se/ prefix.
        let log = self.cmd("POST", "se/log", json!({"type": "browser"}));
        log.as_array()
            .unwrap_or_else(|| panic!("webdriver se/log: not a list: {log}"))
            .iter()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// Writes a PNG of the current viewport to `out`.
    pub fn screenshot(&self, out: &Path) {
        let v = self.cmd("GET", "screenshot", Value::Null);
        let b64 = v
            .as_str()
            .unwrap_or_else(|| panic!("webdriver screenshot: not a string: {v}"));
        let png = base64_decode(b64).unwrap_or_else(|e| panic!("webdriver screenshot: {e}"));
        std::fs::write(out, png).unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
    }

    fn find(&self, css: &str) -> String {
        let v = self.cmd(
            "POST",
            "element",
            json!({"using": "css selector", "value": css}),
        );
        element_id(&v, css)
    }

    /// A command on this session: `path` is relative to /session/{id}/.
    fn cmd(&self, method: &str, path: &str, body: Value) -> Value {
        let full = format!("/session/{}/{path}", self.session);
        self.call(method, &full, (!body.is_null()).then_some(&body))
    }

    /// One HTTP request to chromedriver; gives the reply's `value`, panics on an error reply.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, reply) = http(self.addr, method, path, body)
            .unwrap_or_else(|e| panic!("webdriver {method} {path}: {e}"));
        let v: Value = serde_json::from_slice(&reply).unwrap_or_else(|e| {
            panic!(
                "webdriver {method} {path}: HTTP {status}, not JSON ({e}): {}",
                String::from_utf8_lossy(&reply)
            )
        });
        let value = v.get("value").cloned().unwrap_or(Value::Null);
        if let Some(err) = value.get("error").and_then(Value::as_str) {
            let msg = value["message"].as_str().unwrap_or_default();
            panic!("webdriver {method} {path}: {err}: {msg}");
        }
        if status >= 400 {
            panic!("webdriver {method} {path}: HTTP {status}: {v}");
        }
        value
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ending the session closes Chromium; killing chromedriver alone could leave it running.
        if !self.session.is_empty() {
            let _ = http(
                self.addr,
                "DELETE",
                &format!("/session/{}", self.session),
                None,
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn element_id(v: &Value, what: &str) -> String {
    v[ELEMENT]
        .as_str()
        .unwrap_or_else(|| panic!("webdriver: no element reference for {what:?} in {v}"))
        .to_owned()
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Polls /status until chromedriver says it is ready, it exits, or [`READY_TIMEOUT`] passes.
fn wait_ready(child: &mut Child, addr: SocketAddr) -> Result<(), String> {
    let start = Instant::now();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!(
                "chromedriver exited ({st}) before it was ready on {addr}"
            ));
        }
        if let Ok((200, body)) = http(addr, "GET", "/status", None) {
            let v: Value = serde_json::from_slice(&body).unwrap_or_default();
            if v["value"]["ready"] == true {
                // Another chromedriver on this port would answer too; ours must still run.
                return match child.try_wait() {
                    Ok(None) => Ok(()),
                    _ => Err(format!("port {} was taken by another process", addr.port())),
                };
            }
        }
        if start.elapsed() > READY_TIMEOUT {
            return Err(format!(
                "chromedriver not ready on {addr} within {} s",
                READY_TIMEOUT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP/1.1 request on a fresh connection; gives the status code and the body.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, Vec<u8>)> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(REPLY_TIMEOUT))?;
    s.set_write_timeout(Some(REPLY_TIMEOUT))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let bad = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(bad("connection closed before the reply's headers".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad(format!("not an HTTP reply: {head:?}")))?;
    let length = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    let mut rest = buf.split_off(head_end);
    match length {
        Some(n) => {
            while rest.len() < n {
                let k = s.read(&mut chunk)?;
                if k == 0 {
                    return Err(bad(format!("reply cut short: {} of {n} bytes", rest.len())));
                }
                rest.extend_from_slice(&chunk[..k]);
            }
            rest.truncate(n);
        }
        None => {
            s.read_to_end(&mut rest)?;
        }
    }
    Ok((status, rest))
}

/// A path as a file:// URL's path: bytes outside the unreserved set and '/' percent-encoded.
fn percent_encode_path(p: &str) -> String {
    let mut out = String::new();
    for b in p.bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Standard base64 (RFC 4648, with or without padding, whitespace ignored): screenshots come
/// back in it, and the crate has no base64 dependency.
pub fn base64_decode(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for (i, c) in s.bytes().enumerate() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            b' ' | b'\n' | b'\r' | b'\t' => continue,
            _ => return Err(format!("not base64: byte {c:#04x} at {i}")),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}
