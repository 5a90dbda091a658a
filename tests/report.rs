//! A run's report as a reader meets it: a verdict per claim in report.md, plots with a
//! legend entry per series and an interval per point, byte-identical on rerun, and
//! report.html in headless Chromium: it loads with no console errors, its filters and
//! search change the rows shown, its tables sort, and a screenshot is taken.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::browser::start_or_skip;
use common::{run_ok, scratch};

/// Every role the claims read, small enough for SmolLM2 in well under a minute.
const SPEC: &str = concat!(
    r#"
name = "report-mini"
seed = 7
group_size = 4

[generation]
max_new_tokens = 8
min_tokens = 4

"#,
    mini_sets!(),
    r#"[steer]
direction = "persona"
prompts = "train_h"
layers = "6"
coefficients = [2, 4]

[[experiment]]
id = "E0"
prompts = "eval"
role = "baseline"

[[experiment]]
id = "E1"
prompts = "eval"
role = "steer"
sweep = { coef = [1, 2, 4] }
intervention = [ { direction = "persona", op = "add", layers = "{steer_layer}", coefficient = "{coef}" } ]
plot = { x = "coef", reference = ["E0"] }

[[experiment]]
id = "S"
prompts = "eval"
role = "steer"
intervention = [ { direction = "persona", op = "add", layers = "{steer_layer}", coefficient = "{steer_coef}" } ]

[[experiment]]
id = "E2"
prompts = "eval"
role = "restore_add"
sweep = { layer = [2, 20] }
intervention = [
  { direction = "persona", op = "add", layers = "{steer_layer}", coefficient = "{steer_coef}" },
  { direction = "refusal", op = "add", layers = "{layer}", coefficient = 1, source = "own" },
]
plot = { x = "layer", reference = ["E0", "S"] }

[[experiment]]
id = "E3"
prompts = "eval"
role = "restore_project"
sweep = { start = [10, 20], source = ["own", "steer"] }
intervention = [
  { direction = "persona", op = "add", layers = "{steer_layer}", coefficient = "{steer_coef}" },
  { direction = "persona", op = "project", layers = "{start}+3", source = "{source}" },
]
plot = { x = "start", series = ["source"], band = "E3r", reference = ["E0", "S"] }

[[experiment]]
id = "E3r"
prompts = "eval"
role = "random_control"
sweep = { start = [10, 20] }
intervention = [
  { direction = "persona", op = "add", layers = "{steer_layer}", coefficient = "{steer_coef}" },
  { direction = "rand", op = "project", layers = "{start}+3" },
]

[[experiment]]
id = "A1"
prompts = "eval"
role = "sanity_ablate"
intervention = [ { direction = "refusal", op = "project", layers = "all" } ]

[[experiment]]
id = "A0"
prompts = "ok"
role = "harmless_baseline"

[[experiment]]
id = "A2"
prompts = "ok"
role = "sanity_induce"
intervention = [ { direction = "refusal", op = "add", layers = "{refusal_layer}", coefficient = 1 } ]
"#
);

fn reproduce(spec: &Path, out: &Path) {
    run_ok(&mut common::reproduce_smol(spec, out, &[]));
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The `data-series` names of an SVG's groups of one class, with how many error bars each
/// carries and how many markers (points) it draws.
fn series_of(svg: &str, class: &str) -> Vec<(String, usize, usize)> {
    let tag = format!(r#"<g class="series {class}" data-series=""#);
    let mut out = vec![];
    let mut rest = svg;
    while let Some(i) = rest.find(&tag) {
        rest = &rest[i + tag.len()..];
        let name = rest[..rest.find('"').unwrap()].to_string();
        let g = &rest[..rest.find("</g>").unwrap()];
        let bars = g.matches(r#"class="interval""#).count();
        let points = g.find("<polyline points=\"").map_or(0, |i| {
            let p = &g[i + 18..];
            p[..p.find('"').unwrap()].split_whitespace().count()
        });
        out.push((name, bars, points));
    }
    out
}

fn legend_names(svg: &str) -> Vec<String> {
    svg.split(r#"<g class="legend-entry""#)
        .skip(1)
        .map(|g| {
            let t = &g[g.find("data-series=\"").unwrap() + 13..];
            t[..t.find('"').unwrap()].to_string()
        })
        .collect()
}

#[test]
fn a_report_gives_verdicts_intervals_and_a_page_that_works_in_a_browser() {
    let dir = scratch("report");
    let spec = dir.join("spec.toml");
    std::fs::write(&spec, SPEC).unwrap();
    let out = dir.join("run");
    reproduce(&spec, &out);

    // A verdict per claim, each one of the three words, with the rule printed.
    let md = read(&out.join("report.md"));
    let verdicts: BTreeMap<&str, &str> = md
        .lines()
        .filter(|l| l.starts_with("| ") && l.contains("**"))
        .map(|l| {
            let key = l[2..].split('.').next().unwrap();
            let v = l.split("**").nth(1).unwrap();
            (key, v)
        })
        .collect();
    assert_eq!(
        verdicts.keys().copied().collect::<Vec<_>>(),
        ["1", "2", "3", "4", "A1", "A2"],
        "{md}"
    );
    for v in verdicts.values() {
        assert!(
            ["reproduced", "not reproduced", "inconclusive"].contains(v),
            "{v}"
        );
    }
    assert!(md.contains("How the verdicts are decided") && md.contains("![E3](plots/E3.svg)"));

    // Plots: a legend entry per drawn series, an error bar per point of every line.
    for (id, lines, others) in [("E1", 1, 1), ("E2", 1, 2), ("E3", 2, 3)] {
        let svg = read(&out.join(format!("plots/{id}.svg")));
        let l = series_of(&svg, "line");
        assert_eq!(l.len(), lines, "{id}: {l:?}");
        for (name, bars, points) in &l {
            assert!(*points > 0, "{id} {name}");
            assert_eq!(bars, points, "{id} {name}: an interval per point");
        }
        let names = legend_names(&svg);
        assert_eq!(names.len(), lines + others, "{id}: {names:?}");
        for (name, _, _) in &l {
            assert!(names.contains(name), "{id}: no legend entry for {name}");
        }
        for r in series_of(&svg, "reference") {
            assert!(names.contains(&r.0), "{id}: no legend entry for {}", r.0);
            assert_eq!(r.1, 1, "{id}: the reference {} has its interval", r.0);
        }
    }
    // The steering layer is marked where x counts layers; a geometric sweep is on a log axis.
    let e2 = read(&out.join("plots/E2.svg"));
    assert!(
        e2.contains("steering layer 6"),
        "E2 marks the steering layer"
    );
    assert!(read(&out.join("plots/E1.svg")).contains("(log scale)"));
    let e3 = read(&out.join("plots/E3.svg"));
    assert_eq!(series_of(&e3, "band").len(), 1, "E3 draws the random band");
    assert!(
        e3.contains(r#"class="span""#),
        "E3 draws the windows' spans"
    );

    // Rerunning a finished run rewrites the same bytes.
    let before: Vec<String> = ["report.html", "report.md", "plots/E1.svg", "plots/E3.svg"]
        .iter()
        .map(|f| read(&out.join(f)))
        .collect();
    reproduce(&spec, &out);
    for (f, b) in ["report.html", "report.md", "plots/E1.svg", "plots/E3.svg"]
        .iter()
        .zip(&before)
    {
        assert!(&read(&out.join(f)) == b, "{f} changed on rerun");
    }

    // Tidy columns: one `sweep_<var>` column per sweep variable, in completions.csv and
    // summary.csv, holding what `vars` packs into one string.
    for file in ["completions.csv", "summary.csv"] {
        let mut r = csv::Reader::from_path(out.join(file)).unwrap();
        let h = r.headers().unwrap().clone();
        let sweep: Vec<&str> = h.iter().filter(|c| c.starts_with("sweep_")).collect();
        assert_eq!(
            sweep,
            ["sweep_coef", "sweep_layer", "sweep_source", "sweep_start"],
            "{file}"
        );
        let vars = h.iter().position(|c| c == "vars").unwrap();
        let mut seen = 0;
        for rec in r.records().map(Result::unwrap) {
            let packed: BTreeMap<&str, &str> = rec[vars]
                .split(';')
                .filter(|kv| !kv.is_empty())
                .map(|kv| kv.split_once('=').unwrap())
                .collect();
            for (i, c) in h
                .iter()
                .enumerate()
                .filter(|(_, c)| c.starts_with("sweep_"))
            {
                let want = packed.get(&c["sweep_".len()..]).copied().unwrap_or("");
                assert_eq!(&rec[i], want, "{file}: {c} of {:?}", &rec[vars]);
                seen += usize::from(!want.is_empty());
            }
        }
        assert!(seen > 0, "{file}: no sweep values");
    }

    // The page is self-contained.
    let html = read(&out.join("report.html"));
    for bad in ["<script src", "<link", "@import", "url(http", "src=\"http"] {
        assert!(
            !html.contains(bad),
            "report.html refers outside itself: {bad}"
        );
    }

    // In a real browser.
    let Some(b) =
        start_or_skip("a_report_gives_verdicts_intervals_and_a_page_that_works_in_a_browser")
    else {
        return;
    };
    let csv = std::fs::read(out.join("completions.csv")).unwrap();
    let mut r = csv::Reader::from_reader(csv.as_slice());
    let h = r.headers().unwrap().clone();
    let col = |n: &str| h.iter().position(|x| x == n).unwrap();
    let (c_exp, c_cond, c_label, c_text) = (
        col("experiment"),
        col("condition"),
        col("label"),
        col("completion"),
    );
    let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
    b.open(&out.join("report.html"));
    assert_eq!(b.console_errors(), Vec::<String>::new(), "console errors");
    assert!(b.count_visible("#banner") == 1, "the warning banner shows");
    assert_eq!(b.count_visible("tr.completion"), rows.len());
    assert_eq!(b.count_visible("#claims tbody tr"), 6);
    assert_eq!(b.count_visible(".plots svg"), 3);

    b.select("#f-experiment", "E1");
    let e1 = rows.iter().filter(|x| &x[c_exp] == "E1").count();
    assert_eq!(b.count_visible("tr.completion"), e1);
    b.select("#f-condition", "E1[coef=2]");
    let e1c2 = rows.iter().filter(|x| &x[c_cond] == "E1[coef=2]").count();
    assert!(e1c2 > 0 && e1c2 < e1);
    assert_eq!(b.count_visible("tr.completion"), e1c2);
    b.select("#f-experiment", "");
    b.select("#f-condition", "");
    // A word from one completion: exactly the rows whose completion or prompt id holds it.
    let word: String = rows
        .iter()
        .flat_map(|x| {
            x[c_text]
                .split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|w| w.len() >= 6 && w.chars().all(|c| c.is_ascii_alphabetic()))
        .min_by_key(|w| {
            rows.iter()
                .filter(|x| x[c_text].to_lowercase().contains(&w.to_lowercase()))
                .count()
        })
        .expect("a word to search for");
    let hits = rows
        .iter()
        .filter(|x| {
            x[c_text].to_lowercase().contains(&word.to_lowercase())
                || x[col("prompt_id")]
                    .to_lowercase()
                    .contains(&word.to_lowercase())
        })
        .count();
    b.type_into("#f-search", &word);
    assert!(hits > 0 && hits < rows.len(), "{word}: {hits}");
    assert_eq!(b.count_visible("tr.completion"), hits, "search '{word}'");
    b.type_into("#f-search", "");
    let label = rows[0][c_label].to_string();
    b.select("#f-label", &label);
    let with_label = rows.iter().filter(|x| x[c_label] == label).count();
    assert_eq!(b.count_visible("tr.completion"), with_label);
    b.select("#f-label", "");
    assert_eq!(b.count_visible("tr.completion"), rows.len());

    // Sorting: a click on "n" then on "condition" reorders the conditions table.
    let first = || {
        b.eval("return document.querySelector('#conditions tbody tr td').textContent;")
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(first(), "E0");
    b.click("#conditions th:nth-child(1)");
    let asc = first();
    b.click("#conditions th:nth-child(1)");
    let desc = first();
    assert!(asc != desc && asc == "A0" && desc == "S", "{asc} {desc}");
    assert_eq!(b.console_errors(), Vec::<String>::new(), "console errors");
    let shot = dir.join("report.png");
    b.screenshot(&shot);
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
}
