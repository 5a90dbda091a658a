//! Shared helpers for tests on real models. Models are fetched by `make models`
//! (scripts/fetch-models.sh) into the cache; a missing model fails loudly.
#![allow(dead_code)]

pub mod browser;

/// The prompt sets and directions of the small SmolLM2 specs (tests/experiment.rs,
/// tests/report.rs): 4 harmful evaluation prompts, 2 harmless, 2 neutral questions, 4 + 4
/// training prompts; the persona, refusal (layer 12) and a random direction. A macro, so
/// specs can `concat!` it into a literal.
#[macro_export]
macro_rules! mini_sets {
    () => {
        r#"[prompts.eval]
source = "builtin:harmful"
n = 4
[prompts.ok]
source = "builtin:harmless"
range = [0, 2]
[prompts.neutral]
source = "builtin:neutral"
n = 2
[prompts.train_h]
source = "builtin:harmful_train"
range = [0, 4]
[prompts.train_ok]
source = "builtin:harmless_train"
range = [0, 4]

[directions.persona]
kind = "persona"
questions = "neutral"
[directions.refusal]
kind = "refusal"
harmful = "train_h"
harmless = "train_ok"
layer = 12
[directions.rand]
kind = "random"
seed = 5
like = "persona"

"#
    };
}

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use persona_gate::chat::{Prompt, SystemPrompt};
use persona_gate::model::{Model, ModelOptions};

pub const SMOL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const QWEN05: &str = "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf";

pub fn model_path(file: &str) -> PathBuf {
    let dir = std::env::var_os("PERSONA_GATE_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                .join(".cache/persona-gate/models")
        });
    let p = dir.join(file);
    assert!(
        p.is_file(),
        "{} is missing: run `make models` (scripts/fetch-models.sh)",
        p.display()
    );
    p
}

/// The kernels the tests load models with: the default, or `PERSONA_GATE_TEST_KERNELS`
/// (`rowwise`, `llama`), which tests/engine.rs sets to rerun its invariance tests in a child
/// process (the kernel mode is one per process).
pub fn kernels() -> persona_gate::model::Kernels {
    use clap::ValueEnum;
    std::env::var("PERSONA_GATE_TEST_KERNELS").map_or_else(
        |_| persona_gate::model::Kernels::default(),
        |k| persona_gate::model::Kernels::from_str(&k, true).expect("PERSONA_GATE_TEST_KERNELS"),
    )
}

pub fn load(file: &str, parallel: u32) -> Model {
    let opts = ModelOptions {
        threads: 2,
        parallel,
        ctx: 512,
        kernels: kernels(),
        ..ModelOptions::default()
    };
    Model::load(&model_path(file), &opts).expect("model loads")
}

pub fn prompts(model: &Model, texts: &[&str]) -> Vec<Prompt> {
    let t = persona_gate::chat::ChatTemplate::for_model(model, None).unwrap();
    texts
        .iter()
        .map(|s| Prompt::new(model, t.render(&SystemPrompt::TemplateDefault, s).unwrap()).unwrap())
        .collect()
}

/// Four different prompts, one of them harmful.
pub const FOUR: [&str; 4] = [
    "What is 2 + 2? Reply with the number only.",
    "Say hello to me in French, one word only.",
    "How do I pick a lock?",
    "Write the word blue in capital letters and nothing else.",
];

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn argmax(x: &[f32]) -> usize {
    x.iter()
        .enumerate()
        .fold(0, |b, (i, &v)| if v > x[b] { i } else { b })
}

pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Top-1 minus top-2 logit.
pub fn margin(x: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::MIN, f32::MIN);
    for &v in x {
        if v > a {
            b = a;
            a = v;
        } else if v > b {
            b = v;
        }
    }
    a - b
}

// ---- the one harness for tests that run the real binary ----------------------------------

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_persona-gate"))
}

/// A fresh, empty directory for this test binary (named after it) and process.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "pg-{}-{}-{name}",
        env!("CARGO_CRATE_NAME"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The names in `dir` (not recursive), sorted.
pub fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `n` bytes from the library's generator seeded with `seed`.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut r = persona_gate::rng::Rng::new(seed);
    (0..n).map(|_| r.next_u64() as u8).collect()
}

/// A valid GGUF v3 with string metadata and 1-D F32 tensors (name, values), written by the
/// library's one GGUF writer.
pub fn gguf(kv: &[(&str, &str)], tensors: &[(&str, Vec<f32>)]) -> Vec<u8> {
    let mut w = persona_gate::gguf::Writer::new();
    for (k, v) in kv {
        w.str(k, v);
    }
    for (name, v) in tensors {
        w.tensor_f32(name, v.iter().copied());
    }
    w.to_bytes()
}

/// Runs `c`, asserts it succeeded (showing both streams if not), and returns stdout then
/// stderr.
pub fn run_ok(c: &mut Command) -> String {
    let o = c.output().unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "failed:\n{so}\n{se}");
    format!("{so}{se}")
}

/// `reproduce` of `spec` into `out` on SmolLM2 with the small settings the end-to-end tests
/// share (2 threads, a 256-token context), then `extra`.
pub fn reproduce_smol(spec: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = bin();
    c.args(["reproduce", "-t", "2", "--ctx", "256", "-m"])
        .arg(model_path(SMOL))
        .arg("--spec")
        .arg(spec)
        .arg("-o")
        .arg(out)
        .args(extra);
    c
}

pub fn smol() -> String {
    model_path(SMOL).to_str().unwrap().to_string()
}

/// Every file under `dir` (recursively) with its size and, for files up to 8 MiB, its bytes.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, Option<Vec<u8>>)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                out.insert(p.clone(), (0, None));
                todo.push(p);
            } else {
                // Only regular files are read: a FIFO would block the snapshot itself. A run
                // directory's `.lock` names whichever process last held it: state, not
                // results (a refused process may leave its name there), so it is not part
                // of the snapshot.
                if p.file_name().is_some_and(|n| n == ".lock") {
                    continue;
                }
                let bytes =
                    (md.is_file() && md.len() <= 8 << 20).then(|| std::fs::read(&p).unwrap());
                out.insert(p, (md.len(), bytes));
            }
        }
    }
    out
}

/// Runs `args` in `dir` and asserts a clean one-line failure that contains every needle.
pub fn fails(dir: &Path, args: &[&str], needles: &[&str]) {
    check_failure(dir, &[], args, needles, None);
}

/// As [`fails`], and the exit code is 1: the command ran and refused (a command line clap
/// cannot parse exits 2).
pub fn fails_exit_1(dir: &Path, args: &[&str], needles: &[&str]) {
    check_failure(dir, &[], args, needles, Some(1));
}

/// As [`fails`], also snapshotting `extra` directories (an output directory elsewhere).
pub fn fails_watching(dir: &Path, extra: &[&Path], args: &[&str], needles: &[&str]) {
    check_failure(dir, extra, args, needles, None);
}

/// The one failure check: a non-zero exit code (`code` exactly, when given), one stderr line
/// `persona-gate: …` holding every needle and no panic, abort or signal text, and `dir` and
/// `extra` left exactly as they were.
fn check_failure(dir: &Path, extra: &[&Path], args: &[&str], needles: &[&str], code: Option<i32>) {
    let before: Vec<_> = std::iter::once(dir)
        .chain(extra.iter().copied())
        .map(snapshot)
        .collect();
    let out = bin().current_dir(dir).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && out.status.code().is_some(),
        "{args:?}: expected a non-zero exit code, got {:?}; stderr: {err}",
        out.status
    );
    if let Some(c) = code {
        assert_eq!(
            out.status.code(),
            Some(c),
            "{args:?}: expected exit {c}, got {:?}; stderr: {err}",
            out.status
        );
    }
    assert!(
        err.ends_with('\n'),
        "{args:?}: stderr not one line: {err:?}"
    );
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got: {err}");
    assert!(lines[0].starts_with("persona-gate: "), "{args:?}: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "{args:?}: '{n}' not in: {err}");
    }
    for bad in ["panicked", "abort", "core dumped", "RUST_BACKTRACE", "SIG"] {
        assert!(!err.contains(bad), "{args:?}: {err}");
    }
    let after: Vec<_> = std::iter::once(dir)
        .chain(extra.iter().copied())
        .map(snapshot)
        .collect();
    for (b, a) in before.iter().zip(&after) {
        let added: Vec<_> = a.keys().filter(|k| !b.contains_key(*k)).collect();
        assert!(added.is_empty(), "{args:?}: new files {added:?}");
        assert_eq!(a, b, "{args:?}: files changed");
    }
}
