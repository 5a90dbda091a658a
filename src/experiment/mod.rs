//! Experiments: the paper's intervention grid as data ([`spec`]), run in resumable groups
//! ([`run`]), summarised with intervals, plots and a report ([`report`]); [`preset`] writes
//! the paper's E0–E3 as a spec.
//!
//! ```text
//! spec.toml ──parse──▶ Spec ──prepare (extract, select, calibrate)──▶ Plan (plan.json)
//!     Plan ──fixed groups of (condition, prompt)──▶ groups/g*.csv ──finish──▶ CSVs, SVGs, report.md
//! ```

pub mod calibrate;
pub mod claims;
pub mod figures;
pub mod grid;
pub mod html;
pub mod judged;
pub mod plan;
pub mod prepare;
pub mod preset;
pub mod report;
pub mod spec;
pub mod steer;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;

use crate::chat::ChatTemplate;
use crate::engine::GenConfig;
use crate::error::{Error, MergeProblem, Result};
use crate::hooks::{HookSet, LayerSet};
use crate::model::Model;
use plan::{Plan, Progress, RunOptions};
use report::Finished;
use spec::{DirectionSpec, Metric, Spec};

/// What one `reproduce` invocation did.
#[derive(Debug)]
pub struct Outcome {
    pub plan: Plan,
    pub groups_run: usize,
    pub groups_done: usize,
    /// Set once every group is done and the outputs are written.
    pub finished: Option<Finished>,
}

/// Prepares (or resumes) the run in `dir`, runs this shard's remaining groups, and writes
/// the outputs once every group is done.
///
/// # Errors
/// Spec, model, I/O and engine errors, each naming what failed.
pub fn reproduce(
    model: &Model,
    spec: &Spec,
    dir: &Path,
    opts: &RunOptions,
    progress: &mut Progress<'_>,
    note: &mut dyn FnMut(String),
) -> Result<Outcome> {
    if let Some(j) = &spec.judge {
        // A missing or broken judge model fails now, not after hours of grid.
        crate::model::check_gguf(Path::new(&j.model)).map_err(|e| Error::Field {
            field: "judge.model".into(),
            err: Box::new(e),
        })?;
    }
    // One process per run directory: a second one would silently replace this one's results.
    let _lock = crate::lock::DirLock::acquire(dir)?;
    let t0 = Instant::now();
    let ready = prepare::prepare(spec, model, dir, opts, progress, note)?;
    let t_prep = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let groups_run = grid::run_groups(&ready, dir, opts.shard, progress, note)?;
    let t_run = t1.elapsed().as_secs_f64();
    let plan = ready.plan;
    let groups_done = plan::done_groups(dir, &plan).iter().filter(|d| **d).count();
    let finished = if groups_done == plan.n_groups {
        let extra = json!({
            "shard": format!("{}/{}", opts.shard.k, opts.shard.n),
            "prepare_s": t_prep,
            "run_s": t_run,
            "groups_run": groups_run,
            "threads": model.options.threads,
            "parallel": model.options.parallel,
        });
        Some(report::finish(dir, &plan, extra, groups_run > 0)?)
    } else {
        None
    };
    if let (Some(j), Some(_)) = (&spec.judge, &finished) {
        if plan.spec.metric == Metric::Generate {
            judge_finished(model, j, dir, progress, note)?;
        }
    }
    Ok(Outcome {
        plan,
        groups_run,
        groups_done,
        finished,
    })
}

/// Runs the spec's judges over a finished run directory; rows already judged by the same
/// judge are skipped, so rerunning `reproduce` only judges what is new.
fn judge_finished(
    model: &Model,
    j: &spec::JudgeSpec,
    dir: &Path,
    progress: &mut Progress<'_>,
    note: &mut dyn FnMut(String),
) -> Result<()> {
    let opts = crate::model::ModelOptions {
        ctx: j.ctx,
        ..model.options.clone()
    };
    let jm = Model::load(Path::new(&j.model), &opts)?;
    for k in &j.kinds {
        let kind: crate::judge::JudgeKind = k.parse()?;
        // This process holds the run directory's lock already.
        let template = match &j.template {
            Some(p) => crate::judge::Template::load(Path::new(p))?,
            None => crate::judge::Template::builtin(kind),
        };
        let judge = crate::judge::Judge::new(&jm, kind, template)?;
        let s = judged::judge_run_with(dir, &judge, &mut |d, t| progress("judge", d, t, k))?;
        note(s.table());
    }
    Ok(())
}

/// Joins shard run directories into `out` and writes the outputs. Every input must hold the
/// same plan; a group present in several inputs must have the same bytes in each.
///
/// # Errors
/// Different plans, conflicting or missing groups, I/O errors.
pub fn merge(out: &Path, inputs: &[PathBuf]) -> Result<(Plan, Finished)> {
    if inputs.is_empty() {
        return Err(Error::Merge(MergeProblem::NoInputs));
    }
    let (bytes, plan) = Plan::read(&inputs[0])?;
    let _lock = crate::lock::DirLock::acquire(out)?;
    for d in &inputs[1..] {
        let (b, _) = Plan::read(d)?;
        if b != bytes {
            return Err(Error::file(
                d.join("plan.json"),
                format!(
                    "differs from {}: not shards of one run",
                    inputs[0].join("plan.json").display()
                ),
            ));
        }
    }
    if out.join("plan.json").exists() {
        let (b, _) = Plan::read(out)?;
        if b != bytes {
            return Err(Error::file(
                out,
                "holds another run; use an empty --out directory",
            ));
        }
    }
    // Check everything before writing anything.
    let mut sources: Vec<Option<PathBuf>> = vec![None; plan.n_groups];
    for d in inputs {
        for (g, src) in sources.iter_mut().enumerate() {
            let p = plan::group_file(d, g);
            match plan::verify_group(&plan, d, g) {
                plan::GroupState::Missing => continue,
                plan::GroupState::Done => {}
                plan::GroupState::Invalid(why) => return Err(Error::file(&p, why)),
                plan::GroupState::Foreign(id) => {
                    return Err(Error::file(
                        &p,
                        format!("holds rows of run {id}, not {}", plan.run_id),
                    ))
                }
            }
            match src {
                None => *src = Some(p),
                Some(q) => {
                    let (a, b) = (
                        std::fs::read(&p).map_err(|e| Error::io(&p, e))?,
                        std::fs::read(&*q).map_err(|e| Error::io(&*q, e))?,
                    );
                    if a != b {
                        return Err(Error::file(
                            &p,
                            format!("group {g} differs from {}", q.display()),
                        ));
                    }
                }
            }
        }
    }
    let missing: Vec<usize> = sources
        .iter()
        .enumerate()
        .filter(|(g, s)| {
            s.is_none() && plan::verify_group(&plan, out, *g) != plan::GroupState::Done
        })
        .map(|(g, _)| g)
        .collect();
    if !missing.is_empty() {
        return Err(Error::Merge(MergeProblem::Missing {
            missing: missing.len(),
            groups: plan.n_groups,
            first: missing[0],
        }));
    }
    std::fs::create_dir_all(out.join("groups")).map_err(|e| Error::io(out, e))?;
    let copy = |from: &Path, to: &Path| -> Result<()> {
        let b = std::fs::read(from).map_err(|e| Error::io(from, e))?;
        crate::fsio::write_atomic(to, &b).map_err(|e| Error::io(to, e))
    };
    for (g, s) in sources.iter().enumerate() {
        if let Some(s) = s {
            let to = plan::group_file(out, g);
            if to != *s {
                copy(s, &to)?;
            }
        }
    }
    let src_dirs = inputs[0].join("prepared.safetensors");
    if src_dirs.exists() && src_dirs != out.join("prepared.safetensors") {
        copy(&src_dirs, &out.join("prepared.safetensors"))?;
    }
    crate::fsio::write_atomic(&out.join("plan.json"), &bytes).map_err(|e| Error::io(out, e))?;
    let extra = json!({ "merged_from": inputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>() });
    let f = report::finish(out, &plan, extra, true)?;
    Ok((plan, f))
}

/// A dry run's numbers.
#[derive(Debug, Clone)]
pub struct Estimate {
    pub conditions: usize,
    pub completions: usize,
    pub groups: usize,
    pub prep_prompt_tokens: usize,
    pub run_prompt_tokens: usize,
    /// Generated tokens if every completion stops at `min_tokens` / runs to `max_new_tokens`.
    pub gen_tokens: (usize, usize),
    /// Measured here on the first group's prompts.
    pub prompt_tps: f64,
    pub gen_tps: f64,
}

impl Estimate {
    /// (low, high) seconds.
    pub fn seconds(&self) -> (f64, f64) {
        let p =
            (self.prep_prompt_tokens + self.run_prompt_tokens) as f64 / self.prompt_tps.max(1e-9);
        let g = |n: usize| n as f64 / self.gen_tps.max(1e-9);
        (p + g(self.gen_tokens.0), p + g(self.gen_tokens.1))
    }

    /// What `reproduce --dry-run` prints: the grid's size, its tokens, the speeds measured
    /// here and the time range, for `shards` shards of `spec` at `parallel` sequences.
    pub fn explain(&self, spec: &Spec, shards: usize, parallel: u32) -> String {
        let (lo, hi) = self.seconds();
        let per_shard = if shards > 1 {
            format!(", about {} per shard", self.groups.div_ceil(shards))
        } else {
            String::new()
        };
        format!(
            "{}: {} conditions, {} completions in {} groups of {}{per_shard}\n\
             tokens: {} prompt tokens to prepare (extraction, selection, calibration), {} to run, {}-{} to generate\n\
             measured here: {:.0} prompt tok/s, {:.0} generated tok/s at {} sequences\n\
             estimate: {:.0}-{:.0} min (early stop at min_tokens .. every completion to max_new_tokens)",
            spec.name,
            self.conditions,
            self.completions,
            self.groups,
            spec.group_size,
            self.prep_prompt_tokens,
            self.run_prompt_tokens,
            self.gen_tokens.0,
            self.gen_tokens.1,
            self.prompt_tps,
            self.gen_tps,
            spec.group_size.min(parallel as usize),
            lo / 60.0,
            hi / 60.0
        )
    }
}

/// A spec file's text, checked to be UTF-8 (parse it with [`Spec::parse`]).
///
/// # Errors
/// The file cannot be read, or is not UTF-8.
pub fn read_spec(path: &Path) -> Result<String> {
    String::from_utf8(crate::fsio::read_input(path, "a spec TOML file")?)
        .map_err(|_| Error::file(path, "not UTF-8"))
}

/// The run directory `reproduce` uses without `--out`:
/// `runs/<model file stem>/<spec name>[-score]`.
pub fn default_run_dir(model: &Path, spec: &Spec) -> PathBuf {
    let stem = model
        .file_stem()
        .map_or("model".into(), |s| s.to_string_lossy().into_owned());
    let suffix = if spec.metric == Metric::Score {
        "-score"
    } else {
        ""
    };
    PathBuf::from("runs")
        .join(stem)
        .join(format!("{}{suffix}", spec.name))
}

/// Counts the grid and measures this machine's speed on a few prompts, without running the
/// grid. The estimate of preparation counts extraction, selection and calibration passes.
///
/// # Errors
/// Spec and engine errors.
pub fn estimate(model: &Model, spec: &Spec, template: Option<String>) -> Result<Estimate> {
    let (sets, conds) = prepare::check(spec, model)?;
    let tmpl = ChatTemplate::for_model(model, template)?;
    let sys = prepare::system_of(spec);
    let mut toks = std::collections::BTreeMap::new();
    let mut rendered = std::collections::BTreeMap::new();
    for (k, v) in &sets {
        let ps =
            crate::chat::Prompt::render_all(model, &tmpl, &sys, v.iter().map(|i| i.text.as_str()))?;
        toks.insert(k.clone(), ps.iter().map(|p| p.tokens.len()).sum::<usize>());
        rendered.insert(k.clone(), ps);
    }
    let nl = model.info.n_layer;
    let mut prep = 0usize;
    for d in spec.directions.values() {
        match d {
            DirectionSpec::Refusal {
                harmful,
                harmless,
                select,
                ..
            } => {
                prep += toks[harmful] + toks[harmless];
                if let Some(s) = select {
                    let n = match &s.layers {
                        Some(l) => LayerSet::parse(l, nl)?.len(),
                        None => (nl as f64 * 0.8) as usize,
                    };
                    prep += 2 + n * (toks[&s.harmful] + 2 * toks[&s.harmless]);
                }
            }
            DirectionSpec::Persona {
                questions,
                personas,
                persona,
            } => {
                let src = match personas {
                    Some(p) => {
                        crate::fsio::read_text(std::path::Path::new(p), "a personas TOML file")?
                    }
                    None => crate::prompts::PERSONAS.to_string(),
                };
                let all = crate::prompts::parse_personas(&src, "personas")?;
                let k = all
                    .get(persona)
                    .map_or(0, |p| p.positive.len() + p.negative.len());
                // The persona system prompts replace the default one: about the same length.
                prep += k * toks[questions];
            }
            _ => {}
        }
    }
    if let Some(s) = &spec.steer {
        let n = LayerSet::parse(&s.layers, nl)?.len() + s.coefficients.len();
        prep += n * toks[&s.prompts];
    }
    // Samples of one prompt share its prompt rows (a shared prefix), but each is a completion.
    let samples = spec.generation.samples.max(1);
    let run_prompt: usize = conds.iter().map(|c| toks[&c.prompts]).sum();
    let completions: usize = conds.iter().map(|c| sets[&c.prompts].len()).sum::<usize>() * samples;
    let g = &spec.generation;
    let gen = match spec.metric {
        Metric::Generate => (
            completions * g.min_tokens.min(g.max_new_tokens),
            completions * g.max_new_tokens,
        ),
        Metric::Score => (0, 0),
    };
    // Measure: a batch of the first condition's prompts (--parallel of them), 16 tokens each.
    let first = &rendered[&conds[0].prompts];
    let probe: Vec<_> = first
        .iter()
        .take(model.options.parallel as usize)
        .cloned()
        .collect();
    let mut session = model.session()?;
    let mut hooks = HookSet::new(nl, model.info.n_embd);
    // Warm up first: the first decode pages the weights in from disk (seconds for a GB model),
    // which is not the steady speed a long run sees.
    let cfg = |max_new_tokens| GenConfig {
        max_new_tokens,
        keep_first_logits: false,
        ignore_eog: true,
        digest: false,
        ..GenConfig::default()
    };
    session.generate(
        &probe[..1],
        &cfg(2),
        &mut hooks,
        &mut |_, _| false,
        &mut |_| {},
    )?;
    session.stats = Default::default();
    session.generate(&probe, &cfg(16), &mut hooks, &mut |_, _| false, &mut |_| {})?;
    let st = &session.stats;
    Ok(Estimate {
        conditions: conds.len(),
        completions,
        groups: completions.div_ceil(spec.group_size),
        prep_prompt_tokens: prep,
        run_prompt_tokens: run_prompt,
        gen_tokens: gen,
        // Tokens copied from a shared prefix count as processed: the estimate's token counts
        // include them, and the probe's prompts share a prefix as the run's do.
        prompt_tps: (st.prompt_tokens + st.shared_tokens) as f64
            / st.prompt_time.as_secs_f64().max(1e-9),
        gen_tps: st.gen_tokens as f64 / st.gen_time.as_secs_f64().max(1e-9),
    })
}
