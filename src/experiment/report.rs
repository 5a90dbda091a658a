//! Finishing a run: the per-completion CSV, the per-condition summary (Wilson intervals for
//! rates, a seeded bootstrap for the mean score), SVG plots, a Markdown report of the paper's
//! claims next to this run's numbers, and a JSON manifest. Everything is read back from the
//! plan and the group files, so a straight run, a resumed one and a merge of shards end in
//! the same bytes (the manifest's timings aside).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::json;

use super::claims::{self, Claim};
use super::plan::{done_groups, group_file, header, Plan};
use super::spec::{fmt_num, Metric};
use crate::error::{Error, Result};
use crate::fsio::write_output;
use crate::stats::{bootstrap_mean, clustered_rate_interval, spearman};

/// One condition's summary.
#[derive(Debug, Clone)]
pub struct CondSummary {
    pub experiment: String,
    pub condition: String,
    pub vars: String,
    pub prompt_set: String,
    pub n: usize,
    pub refusal: usize,
    pub bypass: usize,
    pub degenerate: usize,
    pub score_mean: f64,
    pub score_ci: (f64, f64),
    pub mean_tokens: f64,
    /// 95% intervals of the refusal, bypass and degenerate rates: Wilson with one completion
    /// per prompt, a prompt-level bootstrap with several samples per prompt (samples of one
    /// prompt are not independent trials).
    pub intervals: [(f64, f64); 3],
}

impl CondSummary {
    pub fn rate(&self, k: usize) -> f64 {
        k as f64 / self.n.max(1) as f64
    }
    pub fn refusal_rate(&self) -> f64 {
        self.rate(self.refusal)
    }
    /// The number plots and verdicts use, with its 95% interval: the refusal rate and its
    /// Wilson interval (generate), or the mean score and its bootstrap interval (score).
    pub fn estimate(&self, metric: Metric) -> (f64, (f64, f64)) {
        match metric {
            Metric::Generate => (self.refusal_rate(), self.intervals[0]),
            Metric::Score => (self.score_mean, self.score_ci),
        }
    }
}

/// The outputs of a finished run.
#[derive(Debug, Clone)]
pub struct Finished {
    pub summaries: Vec<CondSummary>,
    pub metric: Metric,
    pub files: Vec<String>,
}

/// Reads the group files of `dir` in order; fails naming the first missing group.
fn read_rows(dir: &Path, plan: &Plan) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for g in 0..plan.n_groups {
        let p = group_file(dir, g);
        let b = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
        out.extend(b);
    }
    Ok(out)
}

/// Writes completions.csv (unless it exists and `rewrite_completions` is false), summary.csv,
/// plots, report.md and manifest.json into `dir`.
///
/// # Errors
/// Missing groups, unreadable rows, I/O errors.
pub fn finish(
    dir: &Path,
    plan: &Plan,
    manifest_extra: serde_json::Value,
    rewrite_completions: bool,
) -> Result<Finished> {
    for g in 0..plan.n_groups {
        match super::plan::verify_group(plan, dir, g) {
            super::plan::GroupState::Done => {}
            super::plan::GroupState::Missing => {
                let missing = done_groups(dir, plan).iter().filter(|d| !**d).count();
                return Err(Error::file(
                    dir,
                    format!("{missing} of {} groups are not done yet", plan.n_groups),
                ));
            }
            super::plan::GroupState::Invalid(why) => {
                return Err(Error::file(group_file(dir, g), why))
            }
            super::plan::GroupState::Foreign(id) => {
                return Err(Error::file(
                    group_file(dir, g),
                    format!("holds rows of run {id}, not {}", plan.run_id),
                ))
            }
        }
    }
    let rows = read_rows(dir, plan)?;
    let head = header(plan);
    let body = with_sweep_columns(dir, plan, &head, &rows)?;
    let col = |n: &str| head.iter().position(|h| h == n).expect("known column");
    let c_prompt = col("prompt_index");
    let (c_cond, c_label, c_score, c_tok) = (
        col("condition"),
        col("label"),
        col("refusal_score"),
        col("tokens_generated"),
    );
    // Per-condition accumulation, in plan order.
    let index: BTreeMap<&str, usize> = plan
        .conditions
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.as_str(), i))
        .collect();
    let mut labels = vec![[0usize; 3]; plan.conditions.len()];
    // Per condition and prompt index: (refusal, bypass, degenerate, completions).
    let mut per_prompt: Vec<BTreeMap<usize, [usize; 4]>> =
        vec![BTreeMap::new(); plan.conditions.len()];
    let mut scores: Vec<Vec<f64>> = vec![vec![]; plan.conditions.len()];
    let mut tokens = vec![0usize; plan.conditions.len()];
    let mut r = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(rows.as_slice());
    for (i, rec) in r.records().enumerate() {
        let rec =
            rec.map_err(|e| Error::file(dir, format!("group rows, record {}: {e}", i + 1)))?;
        let c = *index.get(&rec[c_cond]).ok_or_else(|| {
            Error::file(
                dir,
                format!("record {}: unknown condition '{}'", i + 1, &rec[c_cond]),
            )
        })?;
        let slot = per_prompt[c]
            .entry(rec[c_prompt].parse().unwrap_or(usize::MAX))
            .or_default();
        slot[3] += 1;
        if let Some(l) = ["refusal", "bypass", "degenerate"]
            .iter()
            .position(|x| *x == &rec[c_label])
        {
            labels[c][l] += 1;
            slot[l] += 1;
        }
        let s: f64 = rec[c_score].parse().map_err(|_| {
            Error::file(
                dir,
                format!("record {}: bad refusal_score '{}'", i + 1, &rec[c_score]),
            )
        })?;
        scores[c].push(s);
        tokens[c] += rec[c_tok].parse::<usize>().unwrap_or(0);
    }
    let summaries: Vec<CondSummary> = plan
        .conditions
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let n = scores[i].len();
            CondSummary {
                experiment: c.experiment.clone(),
                condition: c.id.clone(),
                vars: c.vars_text(),
                prompt_set: c.prompts.clone(),
                n,
                refusal: labels[i][0],
                bypass: labels[i][1],
                degenerate: labels[i][2],
                score_mean: scores[i].iter().sum::<f64>() / n.max(1) as f64,
                score_ci: bootstrap_mean(&scores[i], plan.spec.seed.wrapping_add(i as u64)),
                mean_tokens: tokens[i] as f64 / n.max(1) as f64,
                intervals: [0, 1, 2].map(|l| {
                    let clusters: Vec<(usize, usize)> =
                        per_prompt[i].values().map(|v| (v[l], v[3])).collect();
                    clustered_rate_interval(
                        &clusters,
                        plan.spec.seed.wrapping_add((i * 3 + l) as u64),
                    )
                }),
            }
        })
        .collect();
    let metric = plan.spec.metric;
    let mut files = vec![];
    let mut put = |name: &str, bytes: &[u8]| write_output(dir, name, bytes, &mut files);
    // A finished run rerun with nothing new keeps its completions.csv as it is: columns a
    // judge appended to it survive.
    let rewrite = rewrite_completions || !dir.join("completions.csv").exists();
    if rewrite {
        put("completions.csv", &body)?;
    }
    put("summary.csv", &summary_csv(plan, &summaries)?)?;
    let figures = super::figures::plots(plan, &summaries);
    for (name, svg) in &figures {
        put(&format!("plots/{name}.svg"), svg.as_bytes())?;
    }
    let claims = verdicts(plan, &summaries);
    put("report.md", report_md(plan, &summaries, &claims).as_bytes())?;
    // The page shows completions.csv as it stands, judge columns included.
    let kept;
    let csv_now = if rewrite {
        &body
    } else {
        let p = dir.join("completions.csv");
        kept = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
        &kept
    };
    let page = super::html::run_page(plan, &summaries, &claims, &figures, csv_now)?;
    put("report.html", page.as_bytes())?;
    let manifest = json!({
        "tool": format!("persona-gate {}", crate::VERSION),
        "llama_cpp": crate::llama_cpp(),
        "run_id": plan.run_id,
        "fingerprint": plan.fingerprint,
        "model": plan.model,
        "prompt_sets": plan.sets,
        "directions_sha256": plan.direction_hashes,
        "resolved": plan.resolved,
        "spec": plan.spec,
        "conditions": plan.conditions.len(),
        "completions": plan.n_pairs,
        "groups": plan.n_groups,
        "machine": {
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        },
        "this_invocation": manifest_extra,
    });
    put(
        "manifest.json",
        &serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Json {
            what: "manifest".into(),
            reason: e.to_string(),
        })?,
    )?;
    Ok(Finished {
        summaries,
        metric,
        files,
    })
}

/// The sweep variables of every experiment, in the spec's order, each once: the
/// `sweep_<name>` columns of completions.csv and summary.csv, so a data frame needs no
/// splitting of `vars`.
pub fn sweep_names(plan: &Plan) -> Vec<String> {
    let mut out: Vec<String> = vec![];
    for e in &plan.spec.experiment {
        for k in e.sweep.keys() {
            if !out.contains(k) {
                out.push(k.clone());
            }
        }
    }
    out
}

/// A condition's value of each sweep variable (empty where its experiment has none).
fn sweep_values(plan: &Plan, cond: &str, names: &[String]) -> Vec<String> {
    let c = plan.conditions.iter().find(|c| c.id == cond);
    names
        .iter()
        .map(|n| {
            c.and_then(|c| c.var(n))
                .map(super::spec::value_text)
                .unwrap_or_default()
        })
        .collect()
}

/// completions.csv: the header and the group rows (as the group files hold them), with the
/// `sweep_<name>` columns put in after `vars`. Group files keep their own format.
fn with_sweep_columns(dir: &Path, plan: &Plan, head: &[String], rows: &[u8]) -> Result<Vec<u8>> {
    let names = sweep_names(plan);
    let at = head.iter().position(|h| h == "vars").expect("known column") + 1;
    let c_cond = head
        .iter()
        .position(|h| h == "condition")
        .expect("known column");
    let mut full: Vec<String> = head[..at].to_vec();
    full.extend(names.iter().map(|n| format!("sweep_{n}")));
    full.extend(head[at..].iter().cloned());
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(&full).map_err(Error::Csv)?;
    let mut r = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(rows);
    for (i, rec) in r.records().enumerate() {
        let rec =
            rec.map_err(|e| Error::file(dir, format!("group rows, record {}: {e}", i + 1)))?;
        let vals = sweep_values(plan, rec.get(c_cond).unwrap_or(""), &names);
        let out = rec
            .iter()
            .take(at)
            .chain(vals.iter().map(String::as_str))
            .chain(rec.iter().skip(at));
        w.write_record(out).map_err(Error::Csv)?;
    }
    w.into_inner()
        .map_err(|e| Error::Csv(e.into_error().into()))
}

fn f4(x: f64) -> String {
    format!("{x:.4}")
}

fn summary_csv(plan: &Plan, s: &[CondSummary]) -> Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let e = Error::Csv;
    let names = sweep_names(plan);
    let mut head: Vec<String> = ["run_id", "experiment", "condition", "vars"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    head.extend(names.iter().map(|n| format!("sweep_{n}")));
    head.extend(
        [
            "prompt_set",
            "metric",
            "n",
            "refusal",
            "refusal_rate",
            "refusal_lo",
            "refusal_hi",
            "bypass",
            "bypass_rate",
            "bypass_lo",
            "bypass_hi",
            "degenerate",
            "degenerate_rate",
            "degenerate_lo",
            "degenerate_hi",
            "score_mean",
            "score_lo",
            "score_hi",
            "mean_tokens",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    w.write_record(&head).map_err(e)?;
    for c in s {
        let mut rec = vec![
            plan.run_id.clone(),
            c.experiment.clone(),
            c.condition.clone(),
            c.vars.clone(),
        ];
        rec.extend(sweep_values(plan, &c.condition, &names));
        rec.extend([
            c.prompt_set.clone(),
            plan.spec.metric.to_string(),
            c.n.to_string(),
        ]);
        for (l, k) in [c.refusal, c.bypass, c.degenerate].into_iter().enumerate() {
            if plan.spec.metric == Metric::Score {
                rec.extend(std::iter::repeat_n(String::new(), 4));
            } else {
                let (lo, hi) = c.intervals[l];
                rec.extend([k.to_string(), f4(c.rate(k)), f4(lo), f4(hi)]);
            }
        }
        rec.extend([
            f4(c.score_mean),
            f4(c.score_ci.0),
            f4(c.score_ci.1),
            format!("{:.2}", c.mean_tokens),
        ]);
        w.write_record(&rec).map_err(e)?;
    }
    w.into_inner()
        .map_err(|e| Error::Csv(e.into_error().into()))
}

/// The verdict on each of the paper's claims this run has conditions for.
pub fn verdicts(plan: &Plan, s: &[CondSummary]) -> Vec<Claim> {
    let roles: Vec<_> = plan
        .conditions
        .iter()
        .zip(s)
        .map(|(c, x)| {
            let role = plan
                .spec
                .experiment
                .iter()
                .find(|e| e.id == c.experiment)
                .and_then(|e| e.role);
            (c, x, role)
        })
        .collect();
    claims::judge(
        plan.spec.metric,
        &roles,
        plan.resolved.steer_layer,
        plan.resolved.steer_coef,
        plan.model.n_layer,
    )
}

fn report_md(plan: &Plan, s: &[CondSummary], claims: &[Claim]) -> String {
    let metric = plan.spec.metric;
    let mut m = String::new();
    let _ = writeln!(m, "# persona-gate run {}\n", plan.run_id);
    let _ = writeln!(
        m,
        "Model `{}` ({}, {} layers, sha256 {}…). Spec `{}`, metric **{}**: {}.\n",
        plan.model.file,
        plan.model.quant,
        plan.model.n_layer,
        &plan.model.sha256[..12.min(plan.model.sha256.len())],
        plan.spec.name,
        metric,
        match metric {
            Metric::Generate => "refusal rate of greedy completions labelled degenerate → refusal → bypass, with Wilson 95% intervals",
            Metric::Score => "mean first-token refusal log-odds with bootstrap 95% intervals (no generation)",
        }
    );
    let r = &plan.resolved;
    if let (Some(l), Some(c)) = (r.steer_layer, r.steer_coef) {
        let _ = writeln!(
            m,
            "Steering calibrated to layer {l}, coefficient {} (see plan.json).",
            fmt_num(c)
        );
    }
    if let Some(sel) = &r.refusal_selection {
        let _ = writeln!(m, "Refusal direction layer: {sel}.");
    }
    let _ = writeln!(m, "\n## The paper's claims next to this run\n");
    let _ = writeln!(
        m,
        "| claim | paper (Llama-3.1-8B / Qwen2.5-7B) | verdict | this run |"
    );
    let _ = writeln!(m, "|---|---|---|---|");
    for c in claims {
        let _ = writeln!(
            m,
            "| {}. {} | {} | **{}** ({}) | {} |",
            c.key, c.text, c.paper, c.verdict, c.because, c.evidence
        );
    }
    let _ = writeln!(
        m,
        "\n### How the verdicts are decided\n\n{}\n",
        claims::RULES
    );
    let _ = writeln!(m, "Numbers from this run are measured, not tuned; small models and small prompt sets give wide intervals.\n");
    let plotted: Vec<&str> = plan
        .spec
        .experiment
        .iter()
        .filter(|e| e.plot.is_some())
        .map(|e| e.id.as_str())
        .collect();
    if !plotted.is_empty() {
        let _ = writeln!(m, "## Plots\n");
        for id in plotted {
            let _ = writeln!(m, "![{id}](plots/{id}.svg)\n");
        }
    }
    let _ = writeln!(m, "## Every condition\n");
    let _ = writeln!(
        m,
        "| condition | n | refusal | bypass | degenerate | score [95% CI] | tokens |"
    );
    let _ = writeln!(m, "|---|---|---|---|---|---|---|");
    for c in s {
        let r = |k| match metric {
            Metric::Generate => format!("{:.0}%", 100.0 * c.rate(k)),
            Metric::Score => "–".into(),
        };
        let _ = writeln!(
            m,
            "| `{}` | {} | {} | {} | {} | {:.2} [{:.2}, {:.2}] | {:.1} |",
            c.condition,
            c.n,
            r(c.refusal),
            r(c.bypass),
            r(c.degenerate),
            c.score_mean,
            c.score_ci.0,
            c.score_ci.1,
            c.mean_tokens
        );
    }
    m
}

/// A terminal table of the summaries.
pub fn table(metric: Metric, s: &[CondSummary]) -> String {
    let w = s
        .iter()
        .map(|c| c.condition.len())
        .max()
        .unwrap_or(9)
        .max(9);
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<w$} {:>4} {:>20} {:>8} {:>10} {:>7} {:>6}",
        "condition", "n", "refusal [95% CI]", "bypass", "degenerate", "score", "tokens"
    );
    for c in s {
        let (lo, hi) = c.intervals[0];
        let rr = match metric {
            Metric::Generate => format!(
                "{:>3.0}% [{:>3.0},{:>3.0}]",
                100.0 * c.refusal_rate(),
                100.0 * lo,
                100.0 * hi
            ),
            Metric::Score => "-".into(),
        };
        let r = |k| match metric {
            Metric::Generate => format!("{:.0}%", 100.0 * c.rate(k)),
            Metric::Score => "-".into(),
        };
        let _ = writeln!(
            t,
            "{:<w$} {:>4} {:>20} {:>8} {:>10} {:>7.2} {:>6.1}",
            c.condition,
            c.n,
            rr,
            r(c.bypass),
            r(c.degenerate),
            c.score_mean,
            c.mean_tokens
        );
    }
    t
}

/// One run's per-condition number, read from its summary.csv: the refusal rate (generate)
/// or the mean score (score).
pub fn read_summary(dir: &Path) -> Result<(Metric, Vec<(String, f64)>)> {
    let (p, rows) = summary_columns(dir, &["condition", "metric", "refusal_rate", "score_mean"])?;
    let mut metric = Metric::Generate;
    let mut out = vec![];
    for (i, r) in rows.iter().enumerate() {
        metric = if r[1] == "score" {
            Metric::Score
        } else {
            Metric::Generate
        };
        let v = if metric == Metric::Score {
            &r[3]
        } else {
            &r[2]
        };
        let y: f64 = v
            .parse()
            .map_err(|_| Error::file(&p, format!("record {}: '{v}' is not a number", i + 1)))?;
        out.push((r[0].clone(), y));
    }
    Ok((metric, out))
}

/// The mean first-token score per condition of a run's summary.
fn read_scores(dir: &Path) -> Result<Vec<(String, f64)>> {
    let (p, rows) = summary_columns(dir, &["condition", "score_mean"])?;
    rows.into_iter()
        .enumerate()
        .map(|(i, r)| {
            let y = r[1].parse().map_err(|_| {
                Error::file(&p, format!("record {}: '{}' is not a number", i + 1, r[1]))
            })?;
            Ok((r[0].clone(), y))
        })
        .collect()
}

/// The named columns of a run's `summary.csv`, record by record, with the file's path for
/// error messages. The one reader of summaries (reports, agreement, compare).
///
/// # Errors
/// An unreadable file, a missing column, a malformed record (numbered).
pub fn summary_columns(
    dir: &Path,
    cols: &[&str],
) -> Result<(std::path::PathBuf, Vec<Vec<String>>)> {
    let p = dir.join("summary.csv");
    let b = crate::fsio::read_input(&p, "a summary.csv")?;
    let mut r = csv::Reader::from_reader(b.as_slice());
    let h = r
        .headers()
        .map_err(|e| Error::file(&p, format!("{e}")))?
        .clone();
    let idx = cols
        .iter()
        .map(|n| {
            h.iter()
                .position(|x| x == *n)
                .ok_or_else(|| Error::file(&p, format!("no column '{n}'")))
        })
        .collect::<Result<Vec<usize>>>()?;
    let mut out = vec![];
    for (i, rec) in r.records().enumerate() {
        let rec = rec.map_err(|e| Error::file(&p, format!("record {}: {e}", i + 1)))?;
        out.push(idx.iter().map(|&c| rec[c].to_string()).collect());
    }
    Ok((p, out))
}

/// Matched conditions (condition, A's value, B's value), Spearman's ρ, and each run's metric.
pub type Agreement = (Vec<(String, f64, f64)>, f64, Metric, Metric);

/// What `agreement` prints: each condition's two numbers and Spearman's rho.
pub fn agreement_text(ag: &Agreement) -> String {
    let (rows, rho, ma, mb) = ag;
    let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(9);
    let mut s = format!(
        "{:<w$} {:>12} {:>12}\n",
        "condition",
        ma.to_string(),
        mb.to_string()
    );
    for (c, x, y) in rows {
        let _ = writeln!(s, "{c:<w$} {x:>12.4} {y:>12.4}");
    }
    let _ = writeln!(s, "Spearman rho over {} conditions: {rho:.3}", rows.len());
    s
}

/// How two runs of the same grid agree across conditions (e.g. generation vs score mode):
/// the matched conditions and Spearman's ρ.
///
/// # Errors
/// Unreadable summaries, fewer than three shared conditions.
pub fn agreement(a: &Path, b: Option<&Path>) -> Result<Agreement> {
    let (ma, va) = read_summary(a)?;
    // One generation run holds both metrics: its refusal rates and its first-token scores
    // (the very numbers score mode computes).
    let (mb, vb) = match b {
        Some(b) => read_summary(b)?,
        None => (Metric::Score, read_scores(a)?),
    };
    let b = b.unwrap_or(a);
    let rows: Vec<(String, f64, f64)> = va
        .iter()
        .filter_map(|(c, x)| {
            vb.iter()
                .find(|(d, _)| d == c)
                .map(|(_, y)| (c.clone(), *x, *y))
        })
        .collect();
    if rows.len() < 3 {
        return Err(Error::Agreement {
            a: a.to_path_buf(),
            b: b.to_path_buf(),
            shared: rows.len(),
        });
    }
    let (x, y): (Vec<f64>, Vec<f64>) = rows.iter().map(|r| (r.1, r.2)).unzip();
    Ok((rows, spearman(&x, &y), ma, mb))
}
