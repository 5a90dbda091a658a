//! Quantized against reference: the same spec run on every model, one model in memory at a
//! time, then
//! - per-layer cosine of each extracted direction with the reference's;
//! - next-token KL divergence to the reference and top-1 agreement on the evaluation prompts;
//! - per-condition refusal / bypass / degenerate rates against the reference's, with a
//!   two-proportion z-test; once with each model's own directions and once with the
//!   reference's directions applied to it (same steering layer and coefficient), which
//!   separates "the direction moved" from "the model responds differently".
//!
//! Each model's grid is an ordinary `reproduce` run directory under `OUT/runs/`, so a
//! comparison resumes like any run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::chat::{ChatTemplate, Prompt};
use crate::directions::{cosine, DirectionFile};
use crate::error::{Error, Result};
use crate::experiment::plan::{Plan, Progress, RunOptions};
use crate::experiment::spec::{DirectionSpec, Metric, Spec};
use crate::fsio::write_output;
use crate::hooks::HookSet;
use crate::html::{esc, page, raw, table};
use crate::model::{Model, ModelOptions};
use crate::plot::{line_plot, Plot, Series, XScale};
use crate::stats::{argmax, kl, two_proportion_p, wilson};
use crate::text::csv_table;

/// One model's rates per condition, read from its summary.csv.
#[derive(Debug, Clone)]
pub struct Counts {
    pub n: usize,
    /// refusal, bypass, degenerate
    pub k: [usize; 3],
    pub score: f64,
}

fn read_counts(dir: &Path) -> Result<Vec<(String, Counts)>> {
    let cols = [
        "condition",
        "n",
        "refusal",
        "bypass",
        "degenerate",
        "score_mean",
    ];
    let (_, rows) = crate::experiment::report::summary_columns(dir, &cols)?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let u = |i: usize| r[i].parse::<usize>().unwrap_or(0);
            let c = Counts {
                n: u(1),
                k: [u(2), u(3), u(4)],
                score: r[5].parse().unwrap_or(f64::NAN),
            };
            (r[0].clone(), c)
        })
        .collect())
}

/// The spec with every extracted direction replaced by the reference run's copy, and the
/// steering layer and coefficient fixed to the reference's.
fn cross_spec(spec: &Spec, ref_dir: &Path) -> Result<Spec> {
    let (_, plan) = Plan::read(ref_dir)?;
    let file = ref_dir.join("prepared.safetensors").display().to_string();
    let mut s = spec.clone();
    s.name = format!("{}-refdirs", spec.name);
    for (name, d) in s.directions.iter_mut() {
        let refusal_layer = match d {
            DirectionSpec::Refusal { .. } => plan.resolved.refusal_layer,
            DirectionSpec::Random { .. } => continue,
            _ => None,
        };
        *d = DirectionSpec::File {
            path: file.clone(),
            name: Some(name.clone()),
            refusal_layer,
            convention: None,
            layer: None,
        };
    }
    if let (Some(st), Some(l), Some(c)) = (
        s.steer.as_mut(),
        plan.resolved.steer_layer,
        plan.resolved.steer_coef,
    ) {
        st.layers = l.to_string();
        st.coefficients = vec![c];
        st.target = f64::MAX;
    }
    Ok(s)
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .map_or("model".into(), |s| s.to_string_lossy().into_owned())
}

/// What the comparison wrote.
#[derive(Debug, Clone)]
pub struct Compared {
    pub files: Vec<String>,
    pub summary: String,
}

/// The spec `compare` runs without `--spec`: the paper's preset at demo size for the
/// reference's depth (read from its GGUF header, before any model is loaded).
///
/// # Errors
/// The reference is not a readable GGUF.
pub fn default_spec(reference: &Path) -> Result<Spec> {
    let g = crate::model::check_gguf(reference)?;
    let nl = g.arch_u64("block_count").unwrap_or(0) as usize;
    Spec::parse(
        &crate::experiment::preset::preset(
            nl,
            crate::experiment::preset::Size::Demo,
            &Default::default(),
        ),
        "preset",
    )
}

/// Runs `spec` on the reference and every model and writes the comparison into `out`.
#[allow(clippy::too_many_arguments)]
///
/// # Errors
/// Load, spec, engine or I/O errors; models with another vocabulary or depth.
pub fn compare(
    reference: &Path,
    models: &[PathBuf],
    spec: &Spec,
    out: &Path,
    options: &ModelOptions,
    cross: bool,
    progress: &mut Progress<'_>,
    note: &mut dyn FnMut(String),
) -> Result<Compared> {
    let _lock = crate::lock::DirLock::acquire(out)?;
    let runs = out.join("runs");
    let mut paths = vec![reference.to_path_buf()];
    paths.extend(models.iter().cloned());
    let mut names: Vec<String> = vec![];
    for p in &paths {
        let n = stem(p);
        if names.contains(&n) {
            return Err(Error::file(
                p,
                format!("two models share the name '{n}'; give them distinct file names"),
            ));
        }
        names.push(n);
    }
    let eval_set = spec.experiment[0].prompts.clone();
    let sets = crate::experiment::prepare::load_sets(spec)?;
    let mut ref_logits: Vec<Vec<f32>> = vec![];
    let mut ref_shape = (0, 0, 0);
    let mut quant: Vec<String> = vec![];
    let mut kl_rows: Vec<(String, String, usize, f64, f64, f64)> = vec![];
    for (i, p) in paths.iter().enumerate() {
        note(format!("model {}/{}: {}", i + 1, paths.len(), p.display()));
        // One model in memory at a time: dropped at the end of this iteration.
        let model = Model::load(p, options)?;
        let shape = (model.info.n_layer, model.info.n_embd, model.info.n_vocab);
        if i == 0 {
            ref_shape = shape;
        } else if shape != ref_shape {
            return Err(Error::file(p, format!(
                "{} layers x {} dims x {} tokens, the reference has {} x {} x {}: not the same model",
                shape.0, shape.1, shape.2, ref_shape.0, ref_shape.1, ref_shape.2
            )));
        }
        quant.push(model.info.file_type.clone());
        let dir = runs.join(&names[i]);
        let o = crate::experiment::reproduce(
            &model,
            spec,
            &dir,
            &RunOptions::default(),
            progress,
            note,
        )?;
        if o.finished.is_none() {
            return Err(Error::file(&dir, "the run did not finish"));
        }
        if cross && i > 0 {
            let cs = cross_spec(spec, &runs.join(&names[0]))?;
            let cdir = runs.join(format!("{}-refdirs", names[i]));
            crate::experiment::reproduce(
                &model,
                &cs,
                &cdir,
                &RunOptions::default(),
                progress,
                note,
            )?;
        }
        // Next-token distributions on the evaluation prompts, unsteered.
        let tmpl = ChatTemplate::for_model(&model, None)?;
        let sys = crate::experiment::prepare::system_of(spec);
        let ps = Prompt::render_all(
            &model,
            &tmpl,
            &sys,
            sets[&eval_set].iter().map(|x| x.text.as_str()),
        )?;
        progress("logits", 0, 1, &names[i]);
        let lg = model
            .session()?
            .first_logits(&ps, &mut HookSet::new(shape.0, shape.1))?;
        if i == 0 {
            ref_logits = lg;
        } else {
            let mut kls: Vec<f64> = ref_logits.iter().zip(&lg).map(|(a, b)| kl(a, b)).collect();
            let top1 = ref_logits
                .iter()
                .zip(&lg)
                .filter(|(a, b)| argmax(a) == argmax(b))
                .count() as f64
                / lg.len().max(1) as f64;
            let mean = kls.iter().sum::<f64>() / kls.len().max(1) as f64;
            kls.sort_by(f64::total_cmp);
            let p95 = kls[((0.95 * (kls.len() - 1) as f64).round() as usize).min(kls.len() - 1)];
            kl_rows.push((
                names[i].clone(),
                quant[i].clone(),
                kls.len(),
                mean,
                p95,
                top1,
            ));
        }
    }
    write_outputs(out, spec, &names, &quant, &kl_rows, cross)
}

fn write_outputs(
    out: &Path,
    spec: &Spec,
    names: &[String],
    quant: &[String],
    kl_rows: &[(String, String, usize, f64, f64, f64)],
    cross: bool,
) -> Result<Compared> {
    let runs = out.join("runs");
    let e = Error::Csv;
    let mut files = vec![];
    let put = |name: &str, b: &[u8], files: &mut Vec<String>| write_output(out, name, b, files);
    // Cosines per direction and layer.
    let load = |n: &str| DirectionFile::load(&runs.join(n).join("prepared.safetensors"));
    let reff = load(&names[0])?;
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "model",
        "quant",
        "direction",
        "layer",
        "cosine_to_reference",
    ])
    .map_err(e)?;
    let mut cos: BTreeMap<String, Vec<Series>> = BTreeMap::new();
    // Every plot, in order, for compare.html.
    let mut figures: Vec<String> = vec![];
    let kinds: Vec<String> = spec
        .directions
        .iter()
        .filter(|(_, d)| !matches!(d, DirectionSpec::Random { .. }))
        .map(|(k, _)| k.clone())
        .collect();
    let mut min_cos: Vec<(String, String, f64, f64)> = vec![];
    for (i, n) in names.iter().enumerate().skip(1) {
        let f = load(n)?;
        for d in &kinds {
            let (a, b) = (reff.get(Some(d))?, f.get(Some(d))?);
            let mut pts = vec![];
            for l in 0..a.n_layer() {
                let c = cosine(&a.rows[l], &b.rows[l]);
                w.write_record([
                    n.clone(),
                    quant[i].clone(),
                    d.clone(),
                    l.to_string(),
                    format!("{c:.6}"),
                ])
                .map_err(e)?;
                pts.push((l as f64, c));
            }
            let (mn, mean) = (
                pts.iter().map(|p| p.1).fold(f64::MAX, f64::min),
                pts.iter().map(|p| p.1).sum::<f64>() / pts.len().max(1) as f64,
            );
            min_cos.push((quant[i].clone(), d.clone(), mean, mn));
            cos.entry(d.clone())
                .or_default()
                .push(Series::line(format!("{} ({})", quant[i], n), pts));
        }
    }
    put(
        "cosines.csv",
        &w.into_inner()
            .map_err(|e| Error::CsvBuffer(e.into_error()))?,
        &mut files,
    )?;
    for (d, s) in &cos {
        let svg = line_plot(
            &format!("{d} direction: cosine to the {} reference", quant[0]),
            "layer",
            "cosine",
            s,
            None,
        );
        put(&format!("plots/cosine-{d}.svg"), svg.as_bytes(), &mut files)?;
        figures.push(svg);
    }
    // KL and top-1.
    let kl_csv = csv_table(
        &["model", "quant", "n", "kl_mean", "kl_p95", "top1_agreement"],
        kl_rows.iter().map(|r| {
            vec![
                r.0.clone(),
                r.1.clone(),
                r.2.to_string(),
                format!("{:.6}", r.3),
                format!("{:.6}", r.4),
                format!("{:.4}", r.5),
            ]
        }),
    );
    put("kl.csv", &kl_csv, &mut files)?;
    // Rates per condition against the reference.
    let ref_counts = read_counts(&runs.join(&names[0]))?;
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "model",
        "quant",
        "directions",
        "condition",
        "label",
        "n",
        "k",
        "rate",
        "lo",
        "hi",
        "ref_n",
        "ref_k",
        "ref_rate",
        "diff",
        "p_two_proportion",
    ])
    .map_err(e)?;
    let labels = ["refusal", "bypass", "degenerate"];
    let mut sig = 0usize;
    let mut tests = 0usize;
    let mut curves: BTreeMap<String, Vec<Series>> = BTreeMap::new();
    for (i, n) in names.iter().enumerate() {
        let mut variants = vec![("own", runs.join(n))];
        if cross && i > 0 {
            variants.push(("reference", runs.join(format!("{n}-refdirs"))));
        }
        for (which, dir) in variants {
            let counts = read_counts(&dir)?;
            for (cond, c) in &counts {
                let Some((_, r)) = ref_counts.iter().find(|(x, _)| x == cond) else {
                    continue;
                };
                for (li, l) in labels.iter().enumerate() {
                    let (lo, hi) = wilson(c.k[li], c.n);
                    let (rate, rr) = (
                        c.k[li] as f64 / c.n.max(1) as f64,
                        r.k[li] as f64 / r.n.max(1) as f64,
                    );
                    let p = two_proportion_p(c.k[li], c.n, r.k[li], r.n);
                    if i > 0 && li == 0 && spec.metric == Metric::Generate {
                        tests += 1;
                        sig += usize::from(p < 0.05);
                    }
                    w.write_record([
                        n.clone(),
                        quant[i].clone(),
                        which.to_string(),
                        cond.clone(),
                        l.to_string(),
                        c.n.to_string(),
                        c.k[li].to_string(),
                        format!("{rate:.4}"),
                        format!("{lo:.4}"),
                        format!("{hi:.4}"),
                        r.n.to_string(),
                        r.k[li].to_string(),
                        format!("{rr:.4}"),
                        format!("{:.4}", rate - rr),
                        format!("{p:.4}"),
                    ])
                    .map_err(e)?;
                }
            }
            // Gating curves: every plotted experiment, refusal rate against its x, per model.
            if which == "own" {
                let (_, plan) = Plan::read(&dir)?;
                for ex in spec.experiment.iter().filter(|x| x.plot.is_some()) {
                    let x = &ex.plot.as_ref().expect("filtered").x;
                    // Several series vars share an x: pool their counts per x (refusals
                    // over prompts, with a Wilson interval), or average their scores.
                    let mut m: BTreeMap<i64, (usize, usize, f64, usize)> = BTreeMap::new();
                    for c in plan.conditions.iter().filter(|c| c.experiment == ex.id) {
                        let Some((_, k)) = counts.iter().find(|(id, _)| id == &c.id) else {
                            continue;
                        };
                        let xv = match c.var(x) {
                            Some(toml::Value::Integer(v)) => *v as f64,
                            Some(toml::Value::Float(v)) => *v,
                            _ => m.len() as f64,
                        };
                        let e = m.entry((xv * 1e6).round() as i64).or_insert((0, 0, 0.0, 0));
                        *e = (e.0 + k.k[0], e.1 + k.n, e.2 + k.score, e.3 + 1);
                    }
                    let xs = m.keys().map(|k| *k as f64 / 1e6);
                    let series = match spec.metric {
                        Metric::Generate => Series::line(
                            quant[i].clone(),
                            xs.zip(m.values())
                                .map(|(x, v)| (x, v.0 as f64 / v.1.max(1) as f64))
                                .collect(),
                        )
                        .with_intervals(m.values().map(|v| wilson(v.0, v.1)).collect()),
                        Metric::Score => Series::line(
                            quant[i].clone(),
                            xs.zip(m.values())
                                .map(|(x, v)| (x, v.2 / v.3 as f64))
                                .collect(),
                        ),
                    };
                    curves.entry(ex.id.clone()).or_default().push(series);
                }
            }
        }
    }
    put(
        "rates.csv",
        &w.into_inner()
            .map_err(|e| Error::CsvBuffer(e.into_error()))?,
        &mut files,
    )?;
    for (id, s) in &curves {
        let y = if spec.metric == Metric::Generate {
            "refusal rate"
        } else {
            "mean refusal score"
        };
        let range = (spec.metric == Metric::Generate).then_some((0.0, 1.0));
        let x = spec
            .experiment
            .iter()
            .find(|e| &e.id == id)
            .and_then(|e| e.plot.as_ref())
            .map_or("x", |p| p.x.as_str());
        let xs: Vec<f64> = s
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .collect();
        let svg = Plot {
            y_range: range,
            x_scale: XScale::for_values(&xs),
            ..Plot::new(format!("{id} by quantization"), x, y)
        }
        .svg(s);
        put(
            &format!("plots/gating-{id}.svg"),
            svg.as_bytes(),
            &mut files,
        )?;
        figures.push(svg);
    }
    // The summary table, once: compare.md and compare.html both show it.
    let mut head: Vec<String> = ["model", "quant", "KL mean", "KL p95", "top-1 agree"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    head.extend(kinds.iter().map(|k| format!("cos {k} mean / min")));
    let rows: Vec<Vec<String>> = kl_rows
        .iter()
        .map(|r| {
            let mut v = vec![
                r.0.clone(),
                r.1.clone(),
                format!("{:.4}", r.3),
                format!("{:.4}", r.4),
                format!("{:.0}%", 100.0 * r.5),
            ];
            v.extend(kinds.iter().map(|k| {
                min_cos
                    .iter()
                    .find(|(q, d, _, _)| q == &r.1 && d == k)
                    .map_or("–".into(), |(_, _, m, mn)| format!("{m:.4} / {mn:.4}"))
            }));
            v
        })
        .collect();
    // Markdown summary.
    let mut md = String::new();
    let _ = writeln!(md, "# Quantization comparison\n\nReference: `{}` ({}). Spec `{}`. Each model's run is in `runs/`.\n", names[0], quant[0], spec.name);
    let _ = writeln!(md, "| {} |", head.join(" | "));
    let _ = writeln!(md, "|{}", "---|".repeat(head.len()));
    for r in &rows {
        let _ = writeln!(md, "| `{}` | {} |", r[0], r[1..].join(" | "));
    }
    if tests > 0 {
        let _ = writeln!(md, "\n{sig} of {tests} (model, condition) refusal rates differ from the reference at p < 0.05 (two-proportion z-test, uncorrected); see `rates.csv`.");
    }
    let _ = writeln!(
        md,
        "\nPlots: {}.",
        files
            .iter()
            .filter(|f| f.ends_with(".svg"))
            .map(|f| format!("`{f}`"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    put("compare.md", md.as_bytes(), &mut files)?;
    let page = compare_page(spec, names, quant, (&head, &rows), (sig, tests), &figures);
    put("compare.html", page.as_bytes(), &mut files)?;
    Ok(Compared { files, summary: md })
}

/// compare.html: the table of compare.md (KL, top-1 agreement, cosines per direction), the
/// significance count, every plot inline, and links to each model's own report.html.
fn compare_page(
    spec: &Spec,
    names: &[String],
    quant: &[String],
    (head, rows): (&[String], &[Vec<String>]),
    (sig, tests): (usize, usize),
    figures: &[String],
) -> String {
    let mut b = format!(
        "<h1>Quantization comparison</h1><p>Reference <code>{}</code> ({}). Spec <code>{}</code>.</p>",
        esc(&names[0]),
        esc(&quant[0]),
        esc(&spec.name)
    );
    let head: Vec<&str> = head.iter().map(String::as_str).collect();
    b.push_str(&table("quantizations", "sortable", &head, rows));
    if tests > 0 {
        b.push_str(&format!("<p>{sig} of {tests} (model, condition) refusal rates differ from the reference at p &lt; 0.05 (two-proportion z-test, uncorrected); see <code>rates.csv</code>.</p>"));
    }
    b.push_str("<h2>Each model's run</h2>");
    let links: Vec<Vec<String>> = names
        .iter()
        .zip(quant)
        .map(|(n, q)| {
            vec![
                q.clone(),
                raw(format!(
                    r#"<a href="runs/{0}/report.html">runs/{0}/report.html</a>"#,
                    esc(n)
                )),
            ]
        })
        .collect();
    b.push_str(&table("runs", "runs", &["quant", "report"], &links));
    b.push_str(r#"<h2>Plots</h2><div class="plots">"#);
    for f in figures {
        b.push_str(f);
    }
    b.push_str("</div>");
    page(
        "persona-gate quantization comparison",
        Some("The run reports linked here show model completions to harmful prompts: research data. Keep this directory private (do not publish or serve it)."),
        &b,
    )
}
