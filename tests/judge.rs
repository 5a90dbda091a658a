//! Judges on a real (tiny) run directory, with SmolLM2-135M as a stand-in judge: a mechanical
//! test of the plumbing (columns, statuses, summary, skipping, byte-identity), not of judging
//! quality.

mod common;

use std::path::Path;

use persona_gate::experiment::judged::{self, SKIPPED_SCORE, SUMMARY_HEADER};
use persona_gate::experiment::{self, plan::RunOptions, spec::Spec};
use persona_gate::judge::{self, JudgeKind};
use persona_gate::model::{Model, ModelOptions};

use common::scratch;

fn smol(ctx: u32) -> Model {
    let opts = ModelOptions {
        threads: 2,
        parallel: 8,
        ctx,
        ..ModelOptions::default()
    };
    Model::load(&common::model_path(common::SMOL), &opts).unwrap()
}

/// Two conditions (harmful, harmless) x 3 and 2 prompts, short greedy completions.
const SPEC: &str = r#"
name = "judge-test"
[generation]
max_new_tokens = 24
min_tokens = 24
[prompts.bad]
source = "builtin:harmful"
range = [0, 3]
[prompts.ok]
source = "builtin:harmless"
range = [0, 2]
[[experiment]]
id = "E0"
prompts = "bad"
[[experiment]]
id = "H0"
prompts = "ok"
"#;

fn make_run(dir: &Path, src: &str) {
    let model = smol(256);
    let spec = Spec::parse(src, "test").unwrap();
    experiment::reproduce(
        &model,
        &spec,
        dir,
        &RunOptions::default(),
        &mut |_, _, _, _| {},
        &mut |_| {},
    )
    .unwrap();
}

fn records(bytes: &[u8]) -> Vec<csv::StringRecord> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(bytes)
        .records()
        .map(Result::unwrap)
        .collect()
}

/// The first `n` fields of every record, written back as CSV.
fn first_columns(bytes: &[u8], n: usize) -> Vec<u8> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in records(bytes) {
        w.write_record(r.iter().take(n)).unwrap();
    }
    w.into_inner().unwrap()
}

fn field<'a>(recs: &'a [csv::StringRecord], row: usize, name: &str) -> &'a str {
    let i = recs[0]
        .iter()
        .position(|h| h == name)
        .unwrap_or_else(|| panic!("no column {name}"));
    &recs[row][i]
}

#[test]
fn judges_a_run_directory_and_skips_judged_rows() {
    let root = scratch("run");
    let dir = root.join("r");
    make_run(&dir, SPEC);
    let original = std::fs::read(dir.join("completions.csv")).unwrap();
    let summary_before = std::fs::read(dir.join("summary.csv")).unwrap();
    let n_cols = records(&original)[0].len();
    let n_rows = records(&original).len() - 1;
    assert_eq!(n_rows, 5);

    let judge_model = smol(1024);
    let mut calls = 0;
    let s = judged::judge_run(
        &dir,
        &judge_model,
        JudgeKind::StrongReject,
        None,
        &mut |_, _| calls += 1,
    )
    .unwrap();
    assert!(calls > 1);
    assert_eq!(
        (s.rows, s.judged_now, s.already_judged, s.no_completion),
        (5, 5, 0, 0)
    );
    let after = std::fs::read(dir.join("completions.csv")).unwrap();
    // Existing columns byte for byte.
    assert_eq!(first_columns(&after, n_cols), original);
    // summary.csv: its own columns byte for byte, judged rates appended with intervals.
    let summary_after = std::fs::read(dir.join("summary.csv")).unwrap();
    let s_cols = records(&summary_before)[0].len();
    assert_eq!(first_columns(&summary_after, s_cols), summary_before);
    let sh = records(&summary_after);
    let at = sh[0]
        .iter()
        .position(|h| h == "judged_sr_refused")
        .expect("judged rates in summary.csv");
    assert_eq!(&sh[0][at + 1], "judged_sr_refused_lo");
    assert!(sh[1..].iter().all(|r| r[at + 3].parse::<usize>().is_ok()));
    let recs = records(&after);
    assert_eq!(
        recs[0].len(),
        n_cols + JudgeKind::StrongReject.columns().len()
    );
    for row in 1..=n_rows {
        let status = field(&recs, row, "sr_status");
        assert_eq!(field(&recs, row, "sr_judge"), s.judge_id);
        if status == "ok" {
            for c in [
                "sr_refused",
                "sr_convincing",
                "sr_specific",
                "sr_score",
                "leakage",
            ] {
                assert!(!field(&recs, row, c).is_empty(), "row {row}: {c} empty");
            }
            let leak = field(&recs, row, "leakage") == "1";
            let spec3 = field(&recs, row, "sr_specific").parse::<u8>().unwrap() >= 3;
            assert_eq!(leak, field(&recs, row, "label") == "refusal" && spec3);
        } else {
            assert!(
                status.starts_with("unparseable: "),
                "row {row}: status '{status}'"
            );
            assert_eq!(field(&recs, row, "sr_score"), "");
        }
        // The logit form needs no parsing: always there.
        let sl: f64 = field(&recs, row, "sr_score_logit").parse().unwrap();
        assert!((0.0..=1.0).contains(&sl));
        let p: f64 = field(&recs, row, "sr_p_refused").parse().unwrap();
        assert!((0.0..=1.0).contains(&p));
    }
    // judge_summary.csv: per condition, Wilson intervals for rates.
    let js = records(&std::fs::read(dir.join("judge_summary.csv")).unwrap());
    assert_eq!(js[0].iter().collect::<Vec<_>>(), SUMMARY_HEADER.to_vec());
    let refused: Vec<_> = js.iter().filter(|r| &r[6] == "sr_refused").collect();
    assert_eq!(
        refused.iter().map(|r| &r[1]).collect::<Vec<_>>(),
        ["E0", "H0"]
    );
    for r in &refused {
        assert_eq!(&r[12], "wilson");
        let n: usize = r[8].parse().unwrap();
        let unp: usize = r[13].parse().unwrap();
        assert_eq!(n + unp, if &r[1] == "E0" { 3 } else { 2 });
        if n > 0 {
            let (v, lo, hi): (f64, f64, f64) = (
                r[9].parse().unwrap(),
                r[10].parse().unwrap(),
                r[11].parse().unwrap(),
            );
            assert!(lo <= v && v <= hi && lo >= 0.0 && hi <= 1.0, "{r:?}");
        }
    }
    assert!(js.iter().any(|r| &r[6] == "leakage" && &r[12] == "wilson"));
    assert!(js
        .iter()
        .any(|r| &r[6] == "sr_score" && &r[12] == "bootstrap"));
    assert!(s.table().contains("E0"));

    // A rerun with the same judge judges nothing and changes nothing.
    let again = judged::judge_run(
        &dir,
        &judge_model,
        JudgeKind::StrongReject,
        None,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!((again.judged_now, again.already_judged), (0, 5));
    assert_eq!(std::fs::read(dir.join("completions.csv")).unwrap(), after);

    // Llama-Guard columns go after the StrongREJECT ones, which stay as they were.
    let g = judged::judge_run(
        &dir,
        &judge_model,
        JudgeKind::LlamaGuard,
        None,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(g.judged_now, 5);
    let both = std::fs::read(dir.join("completions.csv")).unwrap();
    assert_eq!(first_columns(&both, recs[0].len()), after);
    let recs2 = records(&both);
    for row in 1..=n_rows {
        let status = field(&recs2, row, "lg_status");
        assert!(
            status == "ok" || status.starts_with("unparseable: "),
            "{status}"
        );
        if status == "ok" {
            assert!(["0", "1"].contains(&field(&recs2, row, "lg_unsafe")));
        }
        let p: f64 = field(&recs2, row, "lg_p_unsafe").parse().unwrap();
        assert!((0.0..=1.0).contains(&p));
    }
    let js = std::fs::read_to_string(dir.join("judge_summary.csv")).unwrap();
    assert!(
        js.contains(",llamaguard,") && js.contains(",strongreject,"),
        "{js}"
    );
    let prov = std::fs::read_to_string(dir.join("judge.json")).unwrap();
    assert!(prov.contains("\"strongreject\"") && prov.contains("\"llamaguard\""));

    // Another template is another judge: every row is judged again, in place.
    let t = root.join("lg.txt");
    std::fs::write(
        &t,
        judge::LLAMAGUARD_TEMPLATE.replace("Task:", "Task (edited):"),
    )
    .unwrap();
    let g2 = judged::judge_run(
        &dir,
        &judge_model,
        JudgeKind::LlamaGuard,
        Some(&t),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!((g2.judged_now, g2.already_judged), (5, 0));
    assert_ne!(g2.judge_id, g.judge_id);
    let edited = std::fs::read(dir.join("completions.csv")).unwrap();
    assert_eq!(records(&edited)[0].len(), recs2[0].len());
    assert_eq!(first_columns(&edited, n_cols), original);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn score_runs_have_nothing_to_judge() {
    let root = scratch("score");
    let dir = root.join("r");
    make_run(
        &dir,
        &SPEC.replace(
            "name = \"judge-test\"",
            "name = \"judge-test\"\nmetric = \"score\"",
        ),
    );
    let original = std::fs::read(dir.join("completions.csv")).unwrap();
    let s = judged::judge_run(
        &dir,
        &smol(1024),
        JudgeKind::StrongReject,
        None,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!((s.judged_now, s.no_completion), (0, 5));
    let after = std::fs::read(dir.join("completions.csv")).unwrap();
    let recs = records(&after);
    assert!((1..recs.len()).all(|r| field(&recs, r, "sr_status") == SKIPPED_SCORE));
    assert_eq!(first_columns(&after, records(&original)[0].len()), original);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn foreign_csv_and_short_context_are_refused() {
    let root = scratch("bad");
    // Quotes our writer would not add: rewriting would change existing bytes.
    let p = root.join("completions.csv");
    std::fs::write(&p, "\"condition\",completion\nE0,hi\n").unwrap();
    let e = judged::read_completions(&p).unwrap_err().to_string();
    assert!(e.contains("refusing to add judge columns"), "{e}");
    // A judge context too small for the prompts fails before judging anything.
    let dir = root.join("r");
    make_run(&dir, SPEC);
    let before = std::fs::read(dir.join("completions.csv")).unwrap();
    let e = judged::judge_run(
        &dir,
        &smol(256),
        JudgeKind::StrongReject,
        None,
        &mut |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("raise --ctx to"), "{e}");
    assert_eq!(std::fs::read(dir.join("completions.csv")).unwrap(), before);
    let _ = std::fs::remove_dir_all(&root);
}

/// A `[judge]` table in the spec: `reproduce` judges once the grid is done, and a rerun of
/// the finished run judges nothing new and changes nothing.
#[test]
fn reproduce_judges_as_it_goes() {
    let root = scratch("spec-judge");
    let dir = root.join("r");
    let src = format!(
        "{SPEC}\n[judge]\nmodel = \"{}\"\nkinds = [\"strongreject\"]\nctx = 1024\n",
        common::model_path(common::SMOL).display()
    );
    make_run(&dir, &src);
    let first = std::fs::read(dir.join("completions.csv")).unwrap();
    let recs = records(&first);
    let status = recs[0]
        .iter()
        .position(|h| h == "sr_status")
        .expect("judge columns added");
    for r in &recs[1..] {
        assert!(!r[status].is_empty(), "row without a judge status");
    }
    let summary = std::fs::read(dir.join("judge_summary.csv")).unwrap();
    make_run(&dir, &src);
    assert_eq!(std::fs::read(dir.join("completions.csv")).unwrap(), first);
    assert_eq!(
        std::fs::read(dir.join("judge_summary.csv")).unwrap(),
        summary
    );
    let _ = std::fs::remove_dir_all(&root);
}
