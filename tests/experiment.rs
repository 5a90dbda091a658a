//! `reproduce` end to end on SmolLM2 through the real binary: byte-identical reruns, resume
//! after SIGKILL at several points, shards + merge equal to a straight run, score mode, and
//! spec errors that name the field and write nothing.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, scratch};

const SPEC: &str = concat!(
    r#"
name = "mini"
seed = 3
group_size = 3

[generation]
max_new_tokens = 10
min_tokens = 4

"#,
    mini_sets!(),
    r#"[steer]
direction = "persona"
prompts = "train_h"
layers = "4,8"
coefficients = [2, 4]

[[experiment]]
id = "E0"
prompts = "eval"
role = "baseline"

[[experiment]]
id = "E1"
prompts = "eval"
role = "steer"
sweep = { coef = [2, 4] }
intervention = [ { direction = "persona", op = "add", layers = "{steer_layer}", coefficient = "{coef}" } ]
plot = { x = "coef", reference = ["E0"] }

[[experiment]]
id = "E3"
prompts = "eval"
role = "restore_project"
sweep = { start = [20, 24], source = ["own", "steer"] }
intervention = [
  { direction = "persona", op = "add", layers = "{steer_layer}", coefficient = "{steer_coef}" },
  { direction = "persona", op = "project", layers = "{start}+3", source = "{source}" },
]
plot = { x = "start", series = ["source"], band = "E3r", reference = ["E0"] }

[[experiment]]
id = "E3r"
prompts = "eval"
role = "random_control"
sweep = { start = [20] }
intervention = [
  { direction = "persona", op = "add", layers = "{steer_layer}", coefficient = "{steer_coef}" },
  { direction = "rand", op = "project", layers = "{start}+3" },
]

[[experiment]]
id = "A2"
prompts = "ok"
role = "sanity_induce"
intervention = [ { direction = "refusal", op = "add", layers = "{refusal_layer}", coefficient = 0.5, scale = "resid", scope = ["harmless-001"] } ]
"#
);

/// 8 conditions x 4 prompts + 1 x 2 = 34 pairs in groups of 3.
const GROUPS: usize = 12;

fn cmd(spec: &Path, out: &Path, extra: &[&str]) -> Command {
    common::reproduce_smol(spec, out, extra)
}

fn ok(o: Output) -> String {
    let (so, se) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(o.status.success(), "failed:\n{so}\n{se}");
    so
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn same_results(a: &Path, b: &Path) {
    for f in [
        "completions.csv",
        "summary.csv",
        "report.md",
        "plots/E3.svg",
    ] {
        assert!(
            read(&a.join(f)) == read(&b.join(f)),
            "{f} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

/// Every group file visible under its final name is complete: 3 records (the last group
/// may hold fewer), each a full CSV record.
fn groups_complete(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir.join("groups")) else {
        return 0;
    };
    let mut n = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with('g') {
            continue; // temp files of an interrupted write
        }
        let b = read(&e.path());
        let recs = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(b.as_slice())
            .records()
            .collect::<Result<Vec<_>, _>>()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            !recs.is_empty() && recs.len() <= 3,
            "{name}: {} records",
            recs.len()
        );
        assert!(b.ends_with(b"\n"));
        n += 1;
    }
    n
}

/// After a kill: plan.json, if there, parses; the prepared directions, if there, load; any
/// final output already written is the straight run's, byte for byte.
fn whole_after_kill(straight: &Path, d: &Path) {
    if d.join("plan.json").exists() {
        serde_json::from_slice::<serde_json::Value>(&read(&d.join("plan.json")))
            .expect("plan.json is whole");
    }
    if d.join("prepared.safetensors").exists() {
        persona_gate::directions::DirectionFile::load(&d.join("prepared.safetensors"))
            .expect("prepared.safetensors is whole");
    }
    for f in ["completions.csv", "summary.csv", "report.md"] {
        if d.join(f).exists() {
            assert!(
                read(&d.join(f)) == read(&straight.join(f)),
                "{f} after a kill differs from the straight run's"
            );
        }
    }
}

#[test]
fn reproduce_is_deterministic_resumable_and_shardable() {
    let root = scratch("main");
    let spec = root.join("mini.toml");
    std::fs::write(&spec, SPEC).unwrap();

    // Straight run.
    let a = root.join("a");
    let so = ok(cmd(&spec, &a, &[]).output().unwrap());
    assert!(so.contains(&format!("all {GROUPS} done")), "{so}");
    let csv = String::from_utf8(read(&a.join("completions.csv"))).unwrap();
    let mut r = csv::Reader::from_reader(csv.as_bytes());
    let h = r.headers().unwrap().clone();
    let rows: Vec<_> = r.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 34);
    let col = |n: &str| h.iter().position(|x| x == n).unwrap();
    for row in &rows {
        assert!(["refusal", "bypass", "degenerate"].contains(&&row[col("label")]));
        assert!(row[col("refusal_score")]
            .parse::<f64>()
            .unwrap()
            .is_finite());
        let t: usize = row[col("tokens_generated")].parse().unwrap();
        assert!((1..=10).contains(&t) || &row[col("stop")] == "eog");
    }
    // The scoped intervention appears only on its prompt's row.
    let a2: Vec<_> = rows
        .iter()
        .filter(|r| &r[col("condition")] == "A2")
        .collect();
    assert_eq!(a2.len(), 2);
    assert!(a2.iter().all(|r| &r[col("iv1_scale")] == "resid"));
    assert!(read(&a.join("plots/E1.svg")).starts_with(b"<svg"));
    let report = String::from_utf8(read(&a.join("report.md"))).unwrap();
    assert!(
        report.contains("Projecting the persona direction out"),
        "{report}"
    );
    let plan: serde_json::Value = serde_json::from_slice(&read(&a.join("plan.json"))).unwrap();
    let steer = plan["resolved"]["steer_layer"].as_u64().unwrap();
    assert!(steer == 4 || steer == 8);
    assert!(plan["resolved"]["resid_norms"]["ok"][12].as_f64().unwrap() > 0.0);

    // Rerun in place: nothing to do, same bytes.
    let before = read(&a.join("completions.csv"));
    let so = ok(cmd(&spec, &a, &[]).output().unwrap());
    assert!(so.contains("0 groups run now"), "{so}");
    assert_eq!(before, read(&a.join("completions.csv")));

    // A fresh run gives the same bytes.
    let b = root.join("b");
    let t = Instant::now();
    ok(cmd(&spec, &b, &[]).output().unwrap());
    let straight = t.elapsed();
    same_results(&a, &b);

    // Two shards in their own directories, merged.
    let (s1, s2, m) = (root.join("s1"), root.join("s2"), root.join("m"));
    let so = ok(cmd(&spec, &s1, &["--shard", "1/2"]).output().unwrap());
    assert!(so.contains("shard 1/2 ran 6 groups"), "{so}");
    assert!(!s1.join("completions.csv").exists());
    ok(cmd(&spec, &s2, &["--shard", "2/2"]).output().unwrap());
    let mut mc = bin();
    let so = ok(mc
        .arg("merge")
        .arg("-o")
        .arg(&m)
        .arg(&s1)
        .arg(&s2)
        .output()
        .unwrap());
    assert!(so.contains(&format!("merged {GROUPS} groups")), "{so}");
    same_results(&a, &m);
    // Merging one shard alone is refused: groups are missing.
    let o = bin()
        .arg("merge")
        .arg("-o")
        .arg(root.join("m2"))
        .arg(&s1)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("6 of 12 groups are in no input"));

    // Score mode: the same grid by first-token score only. Its scores are the generation
    // run's first-token scores exactly (same hooks, same logits), with no labels.
    let sc = root.join("sc");
    ok(cmd(&spec, &sc, &["--metric", "score"]).output().unwrap());
    let summary = |d: &Path| -> Vec<csv::StringRecord> {
        csv::Reader::from_path(d.join("summary.csv"))
            .unwrap()
            .records()
            .map(Result::unwrap)
            .collect()
    };
    let (gen, score) = (summary(&a), summary(&sc));
    let sh = csv::Reader::from_path(sc.join("summary.csv"))
        .unwrap()
        .headers()
        .unwrap()
        .clone();
    let sc_col = |n: &str| sh.iter().position(|x| x == n).unwrap();
    assert_eq!(gen.len(), score.len());
    for (g, s) in gen.iter().zip(&score) {
        assert_eq!(&s[sc_col("metric")], "score");
        assert_eq!(&s[sc_col("refusal_rate")], "");
        assert_eq!(&g[sc_col("condition")], &s[sc_col("condition")]);
        for c in ["score_mean", "score_lo", "score_hi"] {
            assert_eq!(
                &g[sc_col(c)],
                &s[sc_col(c)],
                "{c} of {}",
                &s[sc_col("condition")]
            );
        }
    }
    let report = String::from_utf8(read(&sc.join("report.md"))).unwrap();
    assert!(report.contains("metric **score**"));

    // SIGKILL at seeded random moments, anywhere from start-up (preparation) to the last
    // group: three seeds, two kills each, resuming after each. While it runs and after each
    // kill, every file under its final name is whole; the finished run equals the straight
    // run byte for byte.
    for seed in [1u64, 2, 3] {
        let d = root.join(format!("kill{seed}"));
        let mut rng = persona_gate::rng::Rng::new(seed);
        let mut log = Vec::new();
        for _ in 0..2 {
            let at = straight.mul_f64(rng.next_f64());
            let mut child = cmd(&spec, &d, &[])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let t0 = Instant::now();
            while t0.elapsed() < at && child.try_wait().unwrap().is_none() {
                groups_complete(&d); // asserts every visible group file is whole
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = child.kill(); // SIGKILL (a no-op if it had finished)
            let _ = child.wait();
            log.push(format!(
                "killed at {at:?} with {} groups done",
                groups_complete(&d)
            ));
            whole_after_kill(&a, &d);
        }
        eprintln!("seed {seed}: {log:?}");
        ok(cmd(&spec, &d, &[]).output().unwrap());
        same_results(&a, &d);
        assert!(
            log.iter()
                .any(|l| !l.ends_with(&format!("{GROUPS} groups done"))),
            "seed {seed}: every kill came after the run had finished: {log:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn spec_errors_name_the_field_and_write_nothing() {
    let root = scratch("bad");
    let cases: &[(&str, String, &[&str])] = &[
        (
            "unknown key",
            SPEC.replace("seed = 3", "seed = 3\nsed = 4"),
            &["line 4", "unknown field `sed`"],
        ),
        (
            "wrong type",
            SPEC.replace("group_size = 3", "group_size = \"three\""),
            &["group_size", "line 4"],
        ),
        (
            "duplicate condition id",
            format!("{SPEC}\n[[experiment]]\nid = \"E0\"\nprompts = \"eval\"\n"),
            &["duplicate id 'E0'"],
        ),
        (
            "layer out of range",
            SPEC.replace("{start}+3", "{start}+9"),
            &[
                "E3[source=own,start=24]: intervention 2: layers",
                "layer 32 out of range (30 layers",
            ],
        ),
        (
            "negative layer",
            SPEC.replace("layers = \"4,8\"", "layers = \"-1\""),
            &["steer.layers", "negative"],
        ),
        (
            "empty window",
            SPEC.replace("{start}+3", "{start}+0"),
            &["window", "empty"],
        ),
        (
            "nan coefficient",
            SPEC.replace("coefficient = 0.5", "coefficient = nan"),
            &["A2: intervention 1: coefficient", "not finite"],
        ),
        (
            "unknown direction",
            SPEC.replace("direction = \"rand\"", "direction = \"rnd\""),
            &["no direction 'rnd'"],
        ),
        (
            "unknown variable",
            SPEC.replace("{steer_coef}", "{steer_cof}"),
            &["unknown variable {steer_cof}"],
        ),
        (
            "empty prompt set",
            SPEC.replace("range = [0, 2]", "range = [2, 2]"),
            &["prompts.ok.range", "empty"],
        ),
        (
            "missing prompt file",
            SPEC.replace("builtin:harmless\"", "/nonexistent/p.csv\""),
            &["prompts.ok", "/nonexistent/p.csv", "no such file"],
        ),
    ];
    for (what, src, needles) in cases {
        let spec = root.join("bad.toml");
        std::fs::write(&spec, src).unwrap();
        let out = root.join("out");
        let o = cmd(&spec, &out, &[]).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{what}: succeeded");
        assert_eq!(err.trim_end().lines().count(), 1, "{what}: {err}");
        assert!(err.starts_with("persona-gate: "), "{what}: {err}");
        for n in *needles {
            assert!(err.contains(n), "{what}: '{n}' not in: {err}");
        }
        assert!(!out.exists(), "{what}: wrote {}", out.display());
    }
    // --shard checked before anything else.
    let spec = root.join("mini.toml");
    std::fs::write(&spec, SPEC).unwrap();
    for s in ["3/2", "0/2", "x"] {
        let o = cmd(&spec, &root.join("out"), &["--shard", s])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("--shard") && err.contains("K/N"),
            "{s}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_run_directory_refuses_another_spec() {
    let root = scratch("other");
    let spec = root.join("mini.toml");
    // A one-condition spec, cheap to prepare.
    let small = r#"
name = "tiny"
[generation]
max_new_tokens = 2
min_tokens = 1
[prompts.eval]
source = "builtin:harmful"
range = [0, 1]
[[experiment]]
id = "E0"
prompts = "eval"
"#;
    std::fs::write(&spec, small).unwrap();
    let d = root.join("r");
    ok(cmd(&spec, &d, &[]).output().unwrap());
    let before = read(&d.join("completions.csv"));
    std::fs::write(
        &spec,
        small.replace("max_new_tokens = 2", "max_new_tokens = 3"),
    )
    .unwrap();
    let o = cmd(&spec, &d, &[]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("holds a run with another spec"),
        "{err}"
    );
    assert_eq!(before, read(&d.join("completions.csv")));
    let _ = std::fs::remove_dir_all(&root);
}
