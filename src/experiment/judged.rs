//! A judge's verdicts written into a run directory: judge columns added to
//! `completions.csv` (existing fields stay byte-identical; rows already judged by the same
//! judge are skipped), judged rates per condition with Wilson intervals in
//! `judge_summary.csv`, and the judged columns of `summary.csv`.
//!
//! Judge prompts and answers are research data: they go into the CSV, never into logs.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use super::plan::Plan;
use super::prepare::load_sets;
use crate::error::{Error, Result, RunError};
use crate::fsio::write_atomic;
use crate::judge::{f4, verdict_fields, Judge, JudgeItem, JudgeKind, Template, FORMAT};
use crate::model::Model;
use crate::stats::{bootstrap_mean, wilson};

/// Status of a row that has no completion to judge (`metric = score`).
pub const SKIPPED_SCORE: &str = "skipped: metric=score (no completion)";

/// One line of `judge_summary.csv`.
#[derive(Debug, Clone)]
pub struct SummaryRow {
    pub experiment: String,
    pub condition: String,
    pub vars: String,
    pub prompt_set: String,
    pub judge: JudgeKind,
    pub judge_id: String,
    pub metric: String,
    /// Successes, for rates.
    pub k: Option<usize>,
    pub n: usize,
    pub value: Option<f64>,
    pub ci: Option<(f64, f64)>,
    /// "wilson" for rates, "bootstrap" for means.
    pub interval: &'static str,
    /// Rows of the condition whose answer was unparseable.
    pub unparseable: usize,
    /// Rows of the condition with no judgement (no completion, or not judged yet).
    pub not_judged: usize,
}

/// What [`judge_run`] did.
#[derive(Debug, Clone)]
pub struct JudgeSummary {
    pub kind: JudgeKind,
    pub judge_id: String,
    pub judge_model: String,
    pub template: String,
    /// Rows in completions.csv.
    pub rows: usize,
    /// Rows judged by this call.
    pub judged_now: usize,
    /// Rows skipped because the same judge had judged them.
    pub already_judged: usize,
    /// Rows without a completion (metric = score).
    pub no_completion: usize,
    /// Rows whose answer (now or before) was unparseable.
    pub unparseable: usize,
    pub seconds: f64,
    /// This judge's rows of judge_summary.csv.
    pub summary: Vec<SummaryRow>,
}

impl JudgeSummary {
    /// A per-condition table of the judged rates, for the terminal.
    pub fn table(&self) -> String {
        let mut conds: Vec<(&str, BTreeMap<&str, &SummaryRow>)> = vec![];
        for r in &self.summary {
            match conds.iter_mut().find(|(c, _)| *c == r.condition) {
                Some((_, m)) => {
                    m.insert(r.metric.as_str(), r);
                }
                None => conds.push((
                    r.condition.as_str(),
                    BTreeMap::from([(r.metric.as_str(), r)]),
                )),
            }
        }
        let metrics: &[&str] = match self.kind {
            JudgeKind::StrongReject => &["sr_refused", "sr_score", "sr_score_logit", "leakage"],
            JudgeKind::LlamaGuard => &["lg_unsafe", "lg_p_unsafe"],
        };
        let w = conds.iter().map(|c| c.0.len()).max().unwrap_or(9).max(9);
        let mut s = format!("{:<w$} {:>4} {:>5}", "condition", "n", "unp.");
        for m in metrics {
            s.push_str(&format!(" {m:>22}"));
        }
        s.push('\n');
        for (c, m) in &conds {
            let any = m.values().next().expect("a metric");
            s.push_str(&format!(
                "{c:<w$} {:>4} {:>5}",
                any.n + any.unparseable,
                any.unparseable
            ));
            for name in metrics {
                let cell = match m.get(name) {
                    Some(SummaryRow {
                        value: Some(v),
                        ci: Some((lo, hi)),
                        ..
                    }) => format!("{v:.3} [{lo:.3}, {hi:.3}]"),
                    _ => "-".into(),
                };
                s.push_str(&format!(" {cell:>22}"));
            }
            s.push('\n');
        }
        s
    }
}

fn csv_err(path: &Path) -> impl Fn(csv::Error) -> Error + '_ {
    move |e| Error::file(path, format!("csv: {e}"))
}

fn write_csv(recs: &[csv::StringRecord]) -> Result<Vec<u8>> {
    let mut w = csv::WriterBuilder::new()
        .flexible(false)
        .from_writer(Vec::new());
    for r in recs {
        w.write_record(r).map_err(Error::Csv)?;
    }
    w.into_inner()
        .map_err(|e| Error::Csv(e.into_error().into()))
}

/// Reads `completions.csv` as records (header first), checking that rewriting it reproduces
/// it byte for byte, so that appending columns cannot alter the existing ones.
///
/// # Errors
/// Unreadable or malformed CSV; a file our CSV writer would not reproduce.
pub fn read_completions(path: &Path) -> Result<Vec<csv::StringRecord>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut r = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(bytes.as_slice());
    let recs = r
        .records()
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(csv_err(path))?;
    if recs.is_empty() {
        return Err(Error::file(path, "empty, expected a header line"));
    }
    if write_csv(&recs)? != bytes {
        return Err(Error::file(
            path,
            "rewriting it would change existing bytes (not written by persona-gate?); refusing to add judge columns",
        ));
    }
    Ok(recs)
}

const NEEDED: [&str; 9] = [
    "experiment",
    "condition",
    "vars",
    "prompt_set",
    "prompt_index",
    "prompt_id",
    "metric",
    "label",
    "completion",
];

fn col(head: &csv::StringRecord, name: &str, path: &Path) -> Result<usize> {
    head.iter()
        .position(|h| h == name)
        .ok_or_else(|| Error::file(path, format!("no '{name}' column")))
}

/// Judges every row of `DIR/completions.csv` not yet judged by this judge (same judge-model
/// sha256 and template hash) and writes the judge columns back, then `DIR/judge_summary.csv`
/// and `DIR/judge.json`. `progress(done, total)` counts judge prompts.
///
/// # Errors
/// A missing or foreign completions.csv or plan.json, prompt sets that changed since the
/// run, prompts longer than the judge's `--ctx`, engine and I/O errors. Rows judged before an
/// error are already written (a rerun continues).
pub fn judge_run(
    dir: &Path,
    judge_model: &Model,
    kind: JudgeKind,
    template_override: Option<&Path>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<JudgeSummary> {
    // A judge rewrites completions.csv: never beside a reproduce or another judge there.
    let _lock = crate::lock::DirLock::acquire(dir)?;
    if !dir.join("completions.csv").is_file() {
        return Err(Error::file(
            dir,
            "no completions.csv (a finished `reproduce` run directory?)",
        ));
    }
    let template = match template_override {
        Some(p) => Template::load(p)?,
        None => Template::builtin(kind),
    };
    let judge = Judge::new(judge_model, kind, template)?;
    judge_run_with(dir, &judge, progress)
}

/// [`judge_run`] with a judge already built (e.g. by `reproduce`, to judge as it goes).
///
/// # Errors
/// As [`judge_run`].
pub fn judge_run_with(
    dir: &Path,
    judge: &Judge<'_>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<JudgeSummary> {
    let t0 = Instant::now();
    let kind = judge.kind;
    let path = dir.join("completions.csv");
    let mut recs = read_completions(&path)?;
    let n_cols0 = recs[0].len();
    let c: BTreeMap<&str, usize> = NEEDED
        .iter()
        .map(|n| Ok((*n, col(&recs[0], n, &path)?)))
        .collect::<Result<_>>()?;
    // This judge's columns: in place if present, else appended.
    let ours: Vec<Option<usize>> = kind
        .columns()
        .iter()
        .map(|n| recs[0].iter().position(|h| h == *n))
        .collect();
    let cols: Vec<usize> = if ours.iter().all(Option::is_some) {
        ours.into_iter().flatten().collect()
    } else if ours.iter().all(Option::is_none) {
        let mut out = Vec::with_capacity(recs.len());
        for (i, r) in recs.iter().enumerate() {
            let mut r = r.clone();
            for n in kind.columns() {
                r.push_field(if i == 0 { n } else { "" });
            }
            out.push(r);
        }
        recs = out;
        (n_cols0..n_cols0 + kind.columns().len()).collect()
    } else {
        return Err(Error::file(
            &path,
            format!(
                "has some of the {kind} judge columns but not all ({})",
                kind.columns().join(", ")
            ),
        ));
    };
    let get = |r: &csv::StringRecord, name: &str| -> String {
        let i = kind
            .columns()
            .iter()
            .position(|c| *c == name)
            .expect("known column");
        r[cols[i]].to_string()
    };
    let id_col = format!("{}_judge", kind.prefix());
    let status_col = format!("{}_status", kind.prefix());
    // Which rows to judge.
    let mut todo = vec![];
    let (mut already, mut no_completion) = (0, 0);
    for (i, r) in recs.iter_mut().enumerate().skip(1) {
        if &r[c["metric"]] != "generate" {
            no_completion += 1;
            if get(r, &status_col) != SKIPPED_SCORE {
                let mut f: Vec<String> = r.iter().map(str::to_string).collect();
                for (k, &ci) in cols.iter().enumerate() {
                    f[ci] = if kind.columns()[k] == status_col {
                        SKIPPED_SCORE.to_string()
                    } else {
                        String::new()
                    };
                }
                *r = csv::StringRecord::from(f);
            }
        } else if get(r, &id_col) == judge.id && !get(r, &status_col).is_empty() {
            already += 1;
        } else {
            todo.push(i);
        }
    }
    // The prompts, from the run's own plan.
    let prompts: Vec<String> = if todo.is_empty() {
        vec![]
    } else {
        let plan = read_plan(dir)?;
        let sets = load_sets(&plan.spec).map_err(|e| {
            Error::file(
                dir,
                format!("reading the run's prompt sets for the judge: {e}"),
            )
        })?;
        for (name, v) in &sets {
            if let Some(rec) = plan.sets.get(name) {
                if crate::prompts::load::hash(v) != rec.sha256 {
                    return Err(Error::file(
                        dir,
                        format!("prompt set '{name}' ({}) changed since the run", rec.source),
                    ));
                }
            }
        }
        todo.iter()
            .map(|&i| {
                let r = &recs[i];
                let set = &r[c["prompt_set"]];
                let idx: usize = r[c["prompt_index"]].parse().map_err(|_| {
                    Error::file(
                        &path,
                        format!("record {i}: bad prompt_index '{}'", &r[c["prompt_index"]]),
                    )
                })?;
                let ins = sets.get(set).and_then(|v| v.get(idx)).ok_or_else(|| {
                    Error::file(
                        &path,
                        format!("record {i}: no prompt {set}[{idx}] in the plan"),
                    )
                })?;
                if ins.id != r[c["prompt_id"]] {
                    return Err(Error::file(
                        &path,
                        format!(
                            "record {i}: prompt id '{}' but {set}[{idx}] is '{}'",
                            &r[c["prompt_id"]], ins.id
                        ),
                    ));
                }
                Ok(ins.text.clone())
            })
            .collect::<Result<_>>()?
    };
    let items_all: Vec<JudgeItem<'_>> = todo
        .iter()
        .zip(&prompts)
        .map(|(&i, p)| JudgeItem {
            prompt: p,
            response: &recs[i][c["completion"]],
        })
        .collect();
    if !items_all.is_empty() {
        let need = judge.max_tokens_needed(&items_all)?;
        let ctx = judge.model.options.ctx as usize;
        if need > ctx {
            return Err(Error::Run(RunError::JudgeContext { need, ctx }));
        }
    }
    let total = items_all.len() * judge.passes();
    tracing::debug!(rows = recs.len() - 1, todo = todo.len(), already, "judging");
    progress(0, total);
    let mut results: Vec<(usize, Vec<String>)> = vec![];
    if !items_all.is_empty() {
        let mut session = judge.model.session()?;
        let chunk = (judge.model.options.parallel as usize * 4).max(16);
        let mut done = 0;
        for (ch, ids) in items_all.chunks(chunk).zip(todo.chunks(chunk)) {
            let v = judge.judge(&mut session, ch, &mut |n| {
                done += n;
                progress(done, total);
            })?;
            for (&i, v) in ids.iter().zip(&v) {
                results.push((i, verdict_fields(&judge.id, v, &recs[i][c["label"]])));
            }
            // Written after each chunk: an interrupted run keeps what it judged.
            let snapshot = apply(&recs, &cols, &results);
            let bytes = write_csv(&snapshot)?;
            write_atomic(&path, &bytes).map_err(|e| Error::io(&path, e))?;
        }
    }
    drop(items_all);
    let recs = apply(&recs, &cols, &results);
    let bytes = write_csv(&recs)?;
    let on_disk = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    if bytes != on_disk {
        write_atomic(&path, &bytes).map_err(|e| Error::io(&path, e))?;
    }
    // Provenance of each judge's columns.
    let jpath = dir.join("judge.json");
    let mut prov: serde_json::Map<String, serde_json::Value> = std::fs::read(&jpath)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    prov.insert(
        kind.name().into(),
        serde_json::json!({
            "judge_id": judge.id,
            "model_file": judge.model.info.path.file_name().map(|f| f.to_string_lossy().into_owned()),
            "model_sha256": judge.model.sha256()?,
            "template": judge.template.source,
            "template_sha256": judge.template.sha256,
            "format": FORMAT,
            "llama_guard_turns": judge.is_llama_guard,
            "logit_form": judge.logits,
            "tool": format!("persona-gate {}", crate::VERSION),
        }),
    );
    let pbytes =
        serde_json::to_vec_pretty(&serde_json::Value::Object(prov)).map_err(|e| Error::Json {
            what: "json".into(),
            reason: e.to_string(),
        })?;
    write_atomic(&jpath, &pbytes).map_err(|e| Error::io(&jpath, e))?;
    let seed = read_plan(dir).map_or(0, |p| p.spec.seed);
    let all = summarize(&recs, seed);
    let spath = dir.join("judge_summary.csv");
    write_atomic(&spath, &summary_csv(&all)?).map_err(|e| Error::io(&spath, e))?;
    add_to_run_summary(dir, &all)?;
    let unparseable = recs
        .iter()
        .skip(1)
        .filter(|r| get(r, &status_col).starts_with("unparseable"))
        .count();
    Ok(JudgeSummary {
        kind,
        judge_id: judge.id.clone(),
        judge_model: judge.model.info.path.display().to_string(),
        template: judge.template.source.clone(),
        rows: recs.len() - 1,
        judged_now: todo.len(),
        already_judged: already,
        no_completion,
        unparseable,
        seconds: t0.elapsed().as_secs_f64(),
        summary: all.into_iter().filter(|r| r.judge == kind).collect(),
    })
}

/// Prefix of the columns `judge` appends to the run's `summary.csv`.
pub const SUMMARY_PREFIX: &str = "judged_";

/// Appends every judged metric to the run's `summary.csv` as `judged_<metric>`, `_lo`, `_hi`
/// and `_n` per condition. The run's own columns are kept as they are; earlier `judged_`
/// columns are replaced.
fn add_to_run_summary(dir: &Path, all: &[SummaryRow]) -> Result<()> {
    let p = dir.join("summary.csv");
    let Ok(b) = std::fs::read(&p) else {
        return Ok(());
    };
    let recs: Vec<csv::StringRecord> = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(b.as_slice())
        .records()
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::file(&p, e.to_string()))?;
    let Some(head) = recs.first() else {
        return Ok(());
    };
    let keep: Vec<usize> = (0..head.len())
        .filter(|&i| !head[i].starts_with(SUMMARY_PREFIX))
        .collect();
    let cond_col = head
        .iter()
        .position(|h| h == "condition")
        .ok_or_else(|| Error::file(&p, "no column 'condition'"))?;
    let mut metrics: Vec<String> = vec![];
    for r in all {
        if !metrics.contains(&r.metric) {
            metrics.push(r.metric.clone());
        }
    }
    let fmt = |x: Option<f64>| x.map_or(String::new(), |v| format!("{v:.4}"));
    let mut w = csv::Writer::from_writer(Vec::new());
    for (i, r) in recs.iter().enumerate() {
        let mut v: Vec<String> = keep.iter().map(|&c| r[c].to_string()).collect();
        for m in &metrics {
            if i == 0 {
                for suffix in ["", "_lo", "_hi", "_n"] {
                    v.push(format!("{SUMMARY_PREFIX}{m}{suffix}"));
                }
                continue;
            }
            match all
                .iter()
                .find(|s| &s.metric == m && s.condition == r[cond_col])
            {
                Some(s) => v.extend([
                    fmt(s.value),
                    fmt(s.ci.map(|c| c.0)),
                    fmt(s.ci.map(|c| c.1)),
                    s.n.to_string(),
                ]),
                None => v.extend(std::iter::repeat_n(String::new(), 4)),
            }
        }
        w.write_record(&v).map_err(Error::Csv)?;
    }
    let out = w
        .into_inner()
        .map_err(|e| Error::Csv(e.into_error().into()))?;
    write_atomic(&p, &out).map_err(|e| Error::io(&p, e))
}

fn apply(
    recs: &[csv::StringRecord],
    cols: &[usize],
    results: &[(usize, Vec<String>)],
) -> Vec<csv::StringRecord> {
    let mut out = recs.to_vec();
    for (i, f) in results {
        let mut v: Vec<String> = out[*i].iter().map(str::to_string).collect();
        for (&ci, x) in cols.iter().zip(f) {
            v[ci] = x.clone();
        }
        out[*i] = csv::StringRecord::from(v);
    }
    out
}

fn read_plan(dir: &Path) -> Result<Plan> {
    Plan::read(dir).map(|(_, p)| p)
}

/// Judged rates per condition, for every judge whose columns the CSV has.
fn summarize(recs: &[csv::StringRecord], seed: u64) -> Vec<SummaryRow> {
    let head = &recs[0];
    let ix = |n: &str| head.iter().position(|h| h == n);
    let mut conds: Vec<(String, Vec<usize>)> = vec![];
    let cc = ix("condition").expect("checked");
    for (i, r) in recs.iter().enumerate().skip(1) {
        match conds.iter_mut().find(|(c, _)| c == &r[cc]) {
            Some((_, v)) => v.push(i),
            None => conds.push((r[cc].to_string(), vec![i])),
        }
    }
    let mut out = vec![];
    for kind in [JudgeKind::StrongReject, JudgeKind::LlamaGuard] {
        let p = kind.prefix();
        let Some(status) = ix(&format!("{p}_status")) else {
            continue;
        };
        let idc = ix(&format!("{p}_judge")).expect("complete column set");
        for (ci, (cond, rows)) in conds.iter().enumerate() {
            let first = &recs[rows[0]];
            let ok: Vec<usize> = rows
                .iter()
                .copied()
                .filter(|&i| &recs[i][status] == "ok")
                .collect();
            let unparseable = rows
                .iter()
                .filter(|&&i| recs[i][status].starts_with("unparseable"))
                .count();
            let mut ids: Vec<&str> = ok.iter().map(|&i| &recs[i][idc]).collect();
            ids.sort_unstable();
            ids.dedup();
            let base = SummaryRow {
                experiment: ix("experiment").map_or(String::new(), |j| first[j].to_string()),
                condition: cond.clone(),
                vars: ix("vars").map_or(String::new(), |j| first[j].to_string()),
                prompt_set: ix("prompt_set").map_or(String::new(), |j| first[j].to_string()),
                judge: kind,
                judge_id: ids.join(" "),
                metric: String::new(),
                k: None,
                n: 0,
                value: None,
                ci: None,
                interval: "wilson",
                unparseable,
                not_judged: rows.len() - ok.len() - unparseable,
            };
            let num = |i: usize, name: &str| -> Option<f64> {
                ix(name).and_then(|j| recs[i][j].parse::<f64>().ok())
            };
            let rate = |metric: &str, among: &[usize], hit: &dyn Fn(usize) -> bool| {
                let n = among.len();
                let k = among.iter().filter(|&&i| hit(i)).count();
                SummaryRow {
                    metric: metric.into(),
                    k: Some(k),
                    n,
                    value: (n > 0).then(|| k as f64 / n as f64),
                    ci: (n > 0).then(|| wilson(k, n)),
                    ..base.clone()
                }
            };
            let mean = |metric: &str, col: &str, s: u64| {
                let v: Vec<f64> = ok.iter().filter_map(|&i| num(i, col)).collect();
                SummaryRow {
                    metric: metric.into(),
                    n: v.len(),
                    value: (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64),
                    ci: (!v.is_empty()).then(|| bootstrap_mean(&v, s)),
                    interval: "bootstrap",
                    ..base.clone()
                }
            };
            let s = seed.wrapping_add(ci as u64);
            match kind {
                JudgeKind::StrongReject => {
                    let is1 = |name: &'static str| move |i: usize| num(i, name) == Some(1.0);
                    out.push(rate("sr_refused", &ok, &is1("sr_refused")));
                    out.push(mean("sr_score", "sr_score", s));
                    out.push(mean("sr_score_logit", "sr_score_logit", s));
                    out.push(rate("leakage", &ok, &is1("leakage")));
                    let lab = ix("label").expect("checked");
                    let refusals: Vec<usize> = ok
                        .iter()
                        .copied()
                        .filter(|&i| &recs[i][lab] == "refusal")
                        .collect();
                    out.push(rate("leakage_among_refusals", &refusals, &is1("leakage")));
                }
                JudgeKind::LlamaGuard => {
                    out.push(rate("lg_unsafe", &ok, &|i| {
                        num(i, "lg_unsafe") == Some(1.0)
                    }));
                    out.push(mean("lg_p_unsafe", "lg_p_unsafe", s));
                }
            }
        }
    }
    out
}

/// `judge_summary.csv`'s columns.
pub const SUMMARY_HEADER: [&str; 15] = [
    "experiment",
    "condition",
    "vars",
    "prompt_set",
    "judge",
    "judge_id",
    "metric",
    "k",
    "n",
    "value",
    "ci_low",
    "ci_high",
    "interval",
    "unparseable",
    "not_judged",
];

fn summary_csv(rows: &[SummaryRow]) -> Result<Vec<u8>> {
    let mut recs = vec![csv::StringRecord::from(SUMMARY_HEADER.to_vec())];
    for r in rows {
        let o = |x: Option<f64>| x.map_or(String::new(), f4);
        recs.push(csv::StringRecord::from(vec![
            r.experiment.clone(),
            r.condition.clone(),
            r.vars.clone(),
            r.prompt_set.clone(),
            r.judge.name().to_string(),
            r.judge_id.clone(),
            r.metric.clone(),
            r.k.map_or(String::new(), |k| k.to_string()),
            r.n.to_string(),
            o(r.value),
            o(r.ci.map(|c| c.0)),
            o(r.ci.map(|c| c.1)),
            r.interval.to_string(),
            r.unparseable.to_string(),
            r.not_judged.to_string(),
        ]));
    }
    write_csv(&recs)
}
