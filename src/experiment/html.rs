//! `report.html`: one self-contained page per run directory: the claims with their
//! verdicts and the rule that decided them, the plots inline, every condition in a sortable
//! table, and a completions browser (experiment, condition, label, text search). It holds
//! the completions, so it is written into the run directory only, and says so at the top.

use std::fmt::Write as _;

use serde_json::json;

use super::claims::{Claim, Verdict, RULES};
use super::plan::Plan;
use super::report::CondSummary;
use super::spec::{fmt_num, Metric};
use crate::error::{Error, Result};
use crate::html::{completions_browser, esc, page, raw, table};

/// The warning at the top of every page that shows completions.
pub const BANNER: &str = "This page shows model completions to harmful prompts: research data. \
It is written only into its run directory; keep it there (do not publish or serve it).";

/// Columns of completions.csv the browser shows, in order (judge columns follow).
const SHOWN: &[&str] = &[
    "condition",
    "prompt_id",
    "category",
    "label",
    "degenerate_reason",
    "refusal_score",
    "stop",
    "tokens_generated",
    "completion",
];

fn verdict_class(v: Verdict) -> &'static str {
    match v {
        Verdict::Reproduced => "v-reproduced",
        Verdict::NotReproduced => "v-not-reproduced",
        Verdict::Inconclusive => "v-inconclusive",
    }
}

/// Markdown's `code` and **bold** spans in a claim's evidence, as HTML.
fn inline_md(s: &str) -> String {
    let mut out = String::new();
    for (i, part) in esc(s).split('`').enumerate() {
        if i % 2 == 1 {
            let _ = write!(out, "<code>{part}</code>");
        } else {
            out.push_str(part);
        }
    }
    out
}

/// The page for a finished run. `completions_csv` is the run's completions.csv as it is now
/// (judge columns included).
///
/// # Errors
/// A completions.csv that does not parse.
pub fn run_page(
    plan: &Plan,
    s: &[CondSummary],
    claims: &[Claim],
    figures: &[(String, String)],
    completions_csv: &[u8],
) -> Result<String> {
    let metric = plan.spec.metric;
    let mut b = String::new();
    let _ = write!(b, "<h1>persona-gate run {}</h1>", esc(&plan.run_id));
    let _ = write!(
        b,
        "<p>Model <code>{}</code> ({}, {} layers, sha256 {}…). Spec <code>{}</code>, metric <b>{}</b>.",
        esc(&plan.model.file),
        esc(&plan.model.quant),
        plan.model.n_layer,
        esc(&plan.model.sha256[..12.min(plan.model.sha256.len())]),
        esc(&plan.spec.name),
        metric
    );
    let r = &plan.resolved;
    if let (Some(l), Some(c)) = (r.steer_layer, r.steer_coef) {
        let _ = write!(
            b,
            " Steering calibrated to layer {l}, coefficient {}.",
            fmt_num(c)
        );
    }
    if let Some(sel) = &r.refusal_selection {
        let _ = write!(b, " Refusal direction layer: {}.", esc(sel));
    }
    b.push_str("</p>");
    b.push_str("<h2>Does this run reproduce the paper?</h2>");
    let rows: Vec<Vec<String>> = claims
        .iter()
        .map(|c| {
            vec![
                format!("{}. {}", c.key, c.text),
                c.paper.to_string(),
                raw(format!(
                    r#"<span class="{}">{}</span><br><span class="muted">{}</span>"#,
                    verdict_class(c.verdict),
                    c.verdict,
                    esc(&c.because)
                )),
                raw(inline_md(&c.evidence)),
            ]
        })
        .collect();
    b.push_str(&table(
        "claims",
        "claims",
        &[
            "claim",
            "paper (Llama-3.1-8B / Qwen2.5-7B)",
            "verdict",
            "this run (95% intervals)",
        ],
        &rows,
    ));
    let _ = write!(
        b,
        "<details><summary>How the verdicts are decided (fixed before the data)</summary><p>{}</p></details>",
        inline_md(&RULES.replace("*", "")).replace("\n\n", "</p><p>").replace('\n', "<br>")
    );
    if !figures.is_empty() {
        b.push_str(r#"<h2>Plots</h2><div class="plots">"#);
        for (_, svg) in figures {
            b.push_str(svg);
        }
        b.push_str("</div>");
    }
    b.push_str("<h2>Every condition</h2><p class=\"muted\">Click a header to sort.</p>");
    let rows: Vec<Vec<String>> = s
        .iter()
        .map(|c| {
            let (lo, hi) = c.intervals[0];
            let pct = |x: f64| match metric {
                Metric::Generate => format!("{:.1}%", 100.0 * x),
                Metric::Score => "-".into(),
            };
            vec![
                c.condition.clone(),
                c.experiment.clone(),
                c.n.to_string(),
                pct(c.refusal_rate()),
                pct(lo),
                pct(hi),
                pct(c.rate(c.bypass)),
                pct(c.rate(c.degenerate)),
                format!("{:.3}", c.score_mean),
                format!("{:.3}", c.score_ci.0),
                format!("{:.3}", c.score_ci.1),
                format!("{:.1}", c.mean_tokens),
            ]
        })
        .collect();
    b.push_str(&table(
        "conditions",
        "sortable",
        &[
            "condition",
            "experiment",
            "n",
            "refusal",
            "refusal lo",
            "refusal hi",
            "bypass",
            "degenerate",
            "score",
            "score lo",
            "score hi",
            "tokens",
        ],
        &rows,
    ));
    b.push_str("<h2>Completions</h2>");
    b.push_str(&completions_browser(&completions_json(completions_csv)?));
    Ok(page(
        &format!("persona-gate run {}", plan.run_id),
        Some(BANNER),
        &b,
    ))
}

/// completions.csv as the browser's data: the shown columns, any judge columns after
/// `completion`, and `experiment` for the filter.
fn completions_json(csv_bytes: &[u8]) -> Result<serde_json::Value> {
    let what = "completions.csv";
    let mut r = csv::Reader::from_reader(csv_bytes);
    let head: Vec<String> = r
        .headers()
        .map_err(|e| Error::file(what, e.to_string()))?
        .iter()
        .map(str::to_string)
        .collect();
    let after = head
        .iter()
        .position(|h| h == "completion")
        .map_or(0, |i| i + 1);
    let mut cols: Vec<String> = vec!["experiment".into()];
    cols.extend(SHOWN.iter().map(|s| s.to_string()));
    cols.extend(head[after.min(head.len())..].iter().cloned());
    let idx: Vec<Option<usize>> = cols
        .iter()
        .map(|c| head.iter().position(|h| h == c))
        .collect();
    let mut rows = vec![];
    for (i, rec) in r.records().enumerate() {
        let rec = rec.map_err(|e| Error::file(what, format!("record {}: {e}", i + 1)))?;
        let row: Vec<String> = idx
            .iter()
            .map(|k| k.and_then(|k| rec.get(k)).unwrap_or("").to_string())
            .collect();
        rows.push(row);
    }
    let show: Vec<&String> = cols.iter().skip(1).collect();
    Ok(json!({"columns": cols, "show": show, "rows": rows, "limit": 500}))
}
