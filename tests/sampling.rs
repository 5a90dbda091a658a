//! Sampled `reproduce` on SmolLM2: several samples per prompt, each with its own seeded
//! sampler, the same bytes in a straight run, one sequence at a time, and shards + merge;
//! a prompt-level interval in summary.csv; greedy "samples" refused.

mod common;

use std::path::Path;
use std::process::Command;

use common::{bin, run_ok, scratch};

const SPEC: &str = r#"
name = "sampled"
seed = 9
group_size = 5

[generation]
max_new_tokens = 8
min_tokens = 4
early_stop = false
temperature = 1.0
samples = 3

[prompts.eval]
source = "builtin:harmful"
n = 4

[directions.rand]
kind = "random"
seed = 2

[[experiment]]
id = "E0"
prompts = "eval"
role = "baseline"

[[experiment]]
id = "E1"
prompts = "eval"
role = "steer"
sweep = { coef = [2] }
intervention = [ { direction = "rand", op = "add", layers = "10", coefficient = "{coef}" } ]
"#;

fn cmd(spec: &Path, out: &Path, extra: &[&str]) -> Command {
    common::reproduce_smol(spec, out, extra)
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn samples_are_seeded_per_sequence_and_summarised_per_prompt() {
    let root = scratch("main");
    let spec = root.join("s.toml");
    std::fs::write(&spec, SPEC).unwrap();
    let a = root.join("a");
    run_ok(&mut cmd(&spec, &a, &[]));
    let mut r = csv::Reader::from_path(a.join("completions.csv")).unwrap();
    let h = r.headers().unwrap().clone();
    let col = |n: &str| h.iter().position(|x| x == n).unwrap();
    let rows: Vec<_> = r.records().map(Result::unwrap).collect();
    // 2 conditions x 4 prompts x 3 samples, prompt-major, samples in order.
    assert_eq!(rows.len(), 24);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row[col("prompt_index")], ((i % 12) / 3).to_string());
        assert_eq!(row[col("sample")], (i % 3).to_string());
    }
    let distinct = rows
        .chunks(3)
        .filter(|s| s[0][col("completion")] != s[1][col("completion")])
        .count();
    assert!(distinct >= 4, "samples of a prompt were mostly identical");

    // One sequence at a time: the same bytes (each sampler depends on its own seed alone).
    let b = root.join("b");
    run_ok(&mut cmd(&spec, &b, &["--parallel", "1"]));
    assert!(read(&a.join("completions.csv")) == read(&b.join("completions.csv")));
    // Shards + merge: the same bytes.
    let (s1, s2, m) = (root.join("s1"), root.join("s2"), root.join("m"));
    run_ok(&mut cmd(&spec, &s1, &["--shard", "1/2"]));
    run_ok(&mut cmd(&spec, &s2, &["--shard", "2/2"]));
    run_ok(bin().arg("merge").arg("-o").arg(&m).arg(&s1).arg(&s2));
    for f in ["completions.csv", "summary.csv"] {
        assert!(
            read(&a.join(f)) == read(&m.join(f)),
            "{f} differs after merge"
        );
    }
    // Another seed draws other completions.
    let other = root.join("other.toml");
    std::fs::write(&other, SPEC.replace("seed = 9", "seed = 10")).unwrap();
    let c = root.join("c");
    run_ok(&mut cmd(&other, &c, &[]));
    assert!(read(&a.join("completions.csv")) != read(&c.join("completions.csv")));

    // summary.csv: 12 completions per condition, the rate inside its interval.
    let mut s = csv::Reader::from_path(a.join("summary.csv")).unwrap();
    let sh = s.headers().unwrap().clone();
    let sc = |n: &str| sh.iter().position(|x| x == n).unwrap();
    for row in s.records().map(Result::unwrap) {
        assert_eq!(&row[sc("n")], "12");
        let (rate, lo, hi): (f64, f64, f64) = (
            row[sc("refusal_rate")].parse().unwrap(),
            row[sc("refusal_lo")].parse().unwrap(),
            row[sc("refusal_hi")].parse().unwrap(),
        );
        assert!(lo <= rate && rate <= hi, "{rate} [{lo}, {hi}]");
    }
}

#[test]
fn greedy_samples_are_refused() {
    let root = scratch("greedy");
    let spec = root.join("g.toml");
    std::fs::write(&spec, SPEC.replace("temperature = 1.0", "temperature = 0")).unwrap();
    let spec = spec.to_str().unwrap().to_string();
    let m = common::smol();
    common::fails(
        &root,
        &["reproduce", "-m", &m, "--spec", &spec, "-o", "out"],
        &["generation.samples", "greedy samples are identical"],
    );
}
