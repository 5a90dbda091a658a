//! Issue 5 end to end on SmolLM2: quantize the Q4_1 file to F16 (the dequantized reference),
//! Q8_0, Q4_K_M and Q2_K with llama.cpp, then `compare` them on a small grid.

mod common;

use std::path::Path;

use common::{bin, run_ok, scratch};

const SPEC: &str = r#"
name = "cmp"
group_size = 8

[generation]
max_new_tokens = 8
min_tokens = 4

[prompts.eval]
source = "builtin:harmful"
n = 4
[prompts.neutral]
source = "builtin:neutral"
n = 4
[prompts.train_h]
source = "builtin:harmful_train"
range = [0, 8]
[prompts.train_ok]
source = "builtin:harmless_train"
range = [0, 8]

[directions.persona]
kind = "persona"
questions = "neutral"
[directions.refusal]
kind = "refusal"
harmful = "train_h"
harmless = "train_ok"
layer = 12

[steer]
direction = "persona"
prompts = "train_h"
layers = "6,10"
coefficients = [4]

[[experiment]]
id = "E0"
prompts = "eval"
role = "baseline"

[[experiment]]
id = "E2"
prompts = "eval"
role = "restore_add"
sweep = { layer = [4, 20] }
intervention = [
  { direction = "persona", op = "add", layers = "{steer_layer}", coefficient = "{steer_coef}" },
  { direction = "refusal", op = "add", layers = "{layer}" },
]
plot = { x = "layer", reference = ["E0"] }
"#;

fn cosines(dir: &Path) -> Vec<(String, String, usize, f64)> {
    let mut r = csv::Reader::from_path(dir.join("cosines.csv")).unwrap();
    r.records()
        .map(|x| {
            let x = x.unwrap();
            (
                x[1].to_string(),
                x[2].to_string(),
                x[3].parse().unwrap(),
                x[4].parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn quantize_then_compare_against_the_f16_reference() {
    let root = scratch("cmp");
    let q = root.join("q");
    let src = common::model_path(common::SMOL);
    let so = run_ok(
        bin()
            .args([
                "quantize",
                "-t",
                "2",
                "--types",
                "F16,Q8_0,Q4_K_M,Q2_K",
                "-m",
            ])
            .arg(&src)
            .arg("--out-dir")
            .arg(&q),
    );
    assert!(
        so.contains("already Q4_1"),
        "requantization warning missing: {so}"
    );
    let f = |t: &str| q.join(format!("SmolLM2-135M-Instruct.{t}.gguf"));
    for t in ["F16", "Q8_0", "Q4_K_M", "Q2_K"] {
        assert!(f(t).is_file(), "{t}");
    }
    // A second call reuses every output (hash recorded and matching).
    let so = run_ok(
        bin()
            .args(["quantize", "--types", "F16,Q8_0", "-m"])
            .arg(&src)
            .arg("--out-dir")
            .arg(&q),
    );
    assert_eq!(so.matches("reused").count(), 2, "{so}");

    let spec = root.join("cmp.toml");
    std::fs::write(&spec, SPEC).unwrap();
    let out = root.join("cmp");
    let compare = || {
        run_ok(
            bin()
                .args(["compare", "-t", "2", "--ctx", "256", "--reference"])
                .arg(f("F16"))
                .arg("--models")
                .args([f("Q8_0"), f("Q4_K_M"), f("Q2_K")])
                .arg("--spec")
                .arg(&spec)
                .arg("-o")
                .arg(&out),
        )
    };
    let so = compare();
    for file in [
        "cosines.csv",
        "kl.csv",
        "rates.csv",
        "compare.md",
        "compare.html",
        "plots/cosine-persona.svg",
        "plots/cosine-refusal.svg",
        "plots/gating-E2.svg",
    ] {
        assert!(out.join(file).is_file(), "{file} missing: {so}");
    }
    // compare.html: the table, every plot inline, a link to each model's report, and in a
    // real browser no console errors and a row per compared model.
    let html = std::fs::read_to_string(out.join("compare.html")).unwrap();
    assert_eq!(html.matches("<svg").count(), 3, "three plots inline");
    for q in ["F16", "Q8_0", "Q4_K_M", "Q2_K"] {
        assert!(
            html.contains(&format!("<td>{q}</td>")),
            "{q} in compare.html"
        );
    }
    if let Some(b) =
        common::browser::start_or_skip("quantize_then_compare_against_the_f16_reference")
    {
        b.open(&out.join("compare.html"));
        assert_eq!(b.console_errors(), Vec::<String>::new());
        assert_eq!(b.count_visible("#quantizations tbody tr"), 3);
        assert_eq!(b.count_visible(".plots svg"), 3);
    }
    let cos = cosines(&out);
    for dir in ["persona", "refusal"] {
        let at = |q: &str| -> Vec<f64> {
            cos.iter()
                .filter(|c| c.0 == q && c.1 == dir)
                .map(|c| c.3)
                .collect()
        };
        let (q8, q2) = (at("Q8_0"), at("Q2_K"));
        assert_eq!(q8.len(), 30);
        // Measured with these small prompt sets (4 questions, 8 + 8 training prompts):
        // Q8_0 > Q4_K_M > Q2_K at (nearly) every layer; Q8_0 is above 0.99 from mid-depth on
        // (0.993-0.998) but only 0.84-0.99 in the first half, where the rows are small and
        // the few prompts make the direction noisy.
        let better = q8.iter().zip(&q2).filter(|(a, b)| a > b).count();
        let min = q8.iter().cloned().fold(1.0, f64::min);
        eprintln!("{dir}: Q8_0 min cosine {min:.4}, Q8_0 > Q2_K at {better}/30 layers");
        assert!(
            better >= 28,
            "{dir}: Q8_0 beats Q2_K at only {better} layers"
        );
        assert!(
            q8[15..].iter().all(|&c| c > 0.99),
            "{dir}: Q8_0 cosine <= 0.99 in the second half: {q8:?}"
        );
        assert!(min > 0.8, "{dir}: Q8_0 cosine {min}");
    }
    let mut r = csv::Reader::from_path(out.join("kl.csv")).unwrap();
    let kl: Vec<(String, f64, f64)> = r
        .records()
        .map(|x| {
            let x = x.unwrap();
            (
                x[1].to_string(),
                x[3].parse().unwrap(),
                x[5].parse().unwrap(),
            )
        })
        .collect();
    let get = |q: &str| kl.iter().find(|k| k.0 == q).unwrap().clone();
    assert!(
        get("Q8_0").1 < get("Q2_K").1,
        "KL: Q8_0 {:?} vs Q2_K {:?}",
        get("Q8_0"),
        get("Q2_K")
    );
    // Rates: own and reference-direction runs for each model, each with p-values.
    let rates = std::fs::read_to_string(out.join("rates.csv")).unwrap();
    assert!(rates.contains(",reference,E2[layer=20],refusal,"));
    assert!(out
        .join("runs/SmolLM2-135M-Instruct.Q2_K-refdirs/summary.csv")
        .is_file());
    // Rerun: every model's run resumes with nothing to do, same tables.
    let before = std::fs::read(out.join("rates.csv")).unwrap();
    compare();
    assert_eq!(before, std::fs::read(out.join("rates.csv")).unwrap());
    let _ = std::fs::remove_dir_all(&root);
}
