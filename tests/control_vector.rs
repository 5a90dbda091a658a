//! `generate --control-vector` against llama.cpp's own `llama-completion --control-vector`:
//! same model, prompt, threads, kernels and control vectors, greedy, so the completions must
//! be identical. llama-completion comes from `scripts/build-llama-ref.sh` (the same
//! instruction set as this build); where it has not been built the comparison prints a
//! visible SKIPPED line, unless `PERSONA_GATE_REQUIRE_LLAMA=1` makes that a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bin, gguf, run_ok, scratch, smol};

/// SmolLM2's ChatML turn, given raw so both tools tokenise the same text.
const PROMPT: &str =
    "<|im_start|>user\nWrite two sentences about the sea.<|im_end|>\n<|im_start|>assistant\n";
const N: &str = "32";

/// llama.cpp's bin directory, if its tools are built for this instruction set.
fn llama_bin() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = Command::new(root.join("scripts/build-llama-ref.sh"))
        .arg("--built")
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
}

/// A control vector with seeded random rows at `layers`, each of norm `norm`.
fn cvec(path: &Path, layers: &[usize], norm: f32, seed: u64) {
    let mut r = persona_gate::rng::Rng::new(seed);
    let tensors: Vec<(String, Vec<f32>)> = layers
        .iter()
        .map(|&l| {
            let v: Vec<f32> = (0..576).map(|_| r.normal() as f32).collect();
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            (
                format!("direction.{l}"),
                v.iter().map(|x| x * norm / n).collect(),
            )
        })
        .collect();
    let t: Vec<(&str, Vec<f32>)> = tensors
        .iter()
        .map(|(n, v)| (n.as_str(), v.clone()))
        .collect();
    let b = gguf(
        &[
            ("general.architecture", "controlvector"),
            ("controlvector.model_hint", "llama"),
        ],
        &t,
    );
    std::fs::write(path, b).unwrap();
}

/// Our completion (greedy, raw prompt, llama.cpp's kernels, one sequence).
fn ours(steer: &[&str]) -> String {
    let mut c = bin();
    c.args([
        "generate",
        "-m",
        &smol(),
        "--raw",
        "-p",
        PROMPT,
        "-n",
        N,
        "-t",
        "2",
    ])
    .args(["--kernels", "llama", "--parallel", "1", "--format", "jsonl"])
    .args(steer);
    let out = run_ok(&mut c);
    let line = out
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("a JSON line");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    v["text"].as_str().unwrap().to_string()
}

/// llama-completion's, with the same settings.
fn theirs(dir: &Path, steer: &[&str]) -> String {
    let o = Command::new(dir.join("llama-completion"))
        .args([
            "-m",
            &smol(),
            "-p",
            PROMPT,
            "-n",
            N,
            "-t",
            "2",
            "-c",
            "1024",
        ])
        .args([
            "--temp",
            "0",
            "-fa",
            "off",
            "-no-cnv",
            "--no-display-prompt",
            "-s",
            "1",
        ])
        .args(steer)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "llama-completion failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let s = String::from_utf8_lossy(&o.stdout).into_owned();
    s.trim_end()
        .strip_suffix("[end of text]")
        .unwrap_or(&s)
        .to_string()
}

#[test]
fn greedy_output_equals_llama_completion_with_the_same_control_vectors() {
    let d = scratch("cvec");
    let (a, b) = (d.join("a.gguf"), d.join("b.gguf"));
    cvec(&a, &(1..30).collect::<Vec<_>>(), 3.0, 1);
    cvec(&b, &[4, 8, 12, 16], 6.0, 2);
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let plain = ours(&[]);
    let cases: Vec<Vec<String>> = vec![
        vec!["--control-vector".into(), a.into()],
        vec![
            "--control-vector-scaled".into(),
            format!("{a}:-1.5,{b}:0.75"),
            "--control-vector-layer-range".into(),
            "4".into(),
            "14".into(),
        ],
    ];
    let dir = llama_bin();
    for case in &cases {
        let args: Vec<&str> = case.iter().map(String::as_str).collect();
        let steered = ours(&args);
        // The vectors are strong enough to change the text, so equality below says something.
        assert_ne!(steered.trim(), plain.trim(), "{args:?} did not steer");
        match &dir {
            Some(dir) => {
                let want = theirs(dir, &args);
                assert_eq!(steered.trim(), want.trim(), "{args:?}");
            }
            None if std::env::var_os("PERSONA_GATE_REQUIRE_LLAMA").is_some() => {
                panic!("llama-completion is not built: run scripts/build-llama-ref.sh")
            }
            None => {
                common::browser::skipped(
                    "control_vector",
                    "llama-completion not built (scripts/build-llama-ref.sh); compared only steered != unsteered",
                );
                break;
            }
        }
    }
}

#[test]
fn control_vector_flags_fail_clearly() {
    let d = scratch("bad");
    let f = d.join("x.gguf");
    std::fs::write(&f, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let f = f.to_str().unwrap();
    let w = d.join("wide.gguf");
    cvec(&w, &[3], 1.0, 3);
    let w = w.to_str().unwrap();
    let m = smol();
    let cases: &[(&[&str], &[&str])] = &[
        (&["--control-vector", f], &[f]),
        (
            &["--control-vector-scaled", "y.gguf"],
            &["--control-vector-scaled", "FILE:SCALE"],
        ),
        (
            &[
                "--control-vector",
                w,
                "--control-vector-layer-range",
                "40",
                "50",
            ],
            &["--control-vector-layer-range", "selects no layer"],
        ),
    ];
    for (extra, needles) in cases {
        let mut a = vec!["generate", "-m", &m, "-p", "hi"];
        a.extend_from_slice(extra);
        common::fails(&d, &a, needles);
    }
}
