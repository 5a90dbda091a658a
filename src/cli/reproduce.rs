//! `persona-gate reproduce` and `merge`: the paper's grid (or a spec) into a resumable run
//! directory, and the join of its shards.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use persona_gate::experiment::{self, plan, preset, spec::Metric, spec::Spec};
use persona_gate::fsio;

#[derive(Args, Debug)]
pub struct ReproduceArgs {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// Experiment spec (TOML). Default: the paper's preset for this model (see --print-spec).
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Print the spec that would run (the preset, or --spec as parsed) and exit.
    #[arg(long)]
    pub print_spec: bool,
    /// Preset size: demo (strided layers, minutes on a 0.5B model) or full.
    #[arg(long, value_enum, default_value_t = preset::Size::Demo)]
    pub size: preset::Size,
    /// Preset: harmful evaluation prompts (a file such as StrongREJECT's CSV, or builtin:harmful).
    #[arg(long, default_value = "builtin:harmful")]
    pub harmful: String,
    /// Preset: a seeded sample of this many harmful prompts (not llama.cpp's -n, new
    /// tokens: the spec's [generation] table sets those here).
    #[arg(long)]
    pub n: Option<usize>,
    /// Preset: harmless prompts for the induction check.
    #[arg(long, default_value = "builtin:harmless")]
    pub harmless: String,
    /// Preset: a seeded sample of this many harmless prompts.
    #[arg(long)]
    pub harmless_n: Option<usize>,
    /// Override the spec's metric: generate (labels) or score (first-token refusal score only).
    #[arg(long, value_enum)]
    pub metric: Option<Metric>,
    /// Run directory (default: runs/<model file stem>/<spec name>[-score]).
    #[arg(long, short = 'o')]
    pub out: Option<PathBuf>,
    /// Run only groups K, K+N, ... (1-based K of N); join the directories with `merge`.
    /// `slurm` takes K and N from a SLURM job array: K = SLURM_ARRAY_TASK_ID -
    /// SLURM_ARRAY_TASK_MIN + 1 (stepped by SLURM_ARRAY_TASK_STEP), N = SLURM_ARRAY_TASK_COUNT.
    #[arg(long)]
    pub shard: Option<String>,
    /// Print the grid size and a time estimate measured on this machine, run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Jinja chat template FILE instead of the GGUF's (llama.cpp's --chat-template-file;
    /// llama.cpp's --chat-template takes the template text or a built-in name instead).
    #[arg(long, visible_alias = "chat-template-file")]
    pub chat_template: Option<PathBuf>,
    /// Special-token strings inside instructions: literal (default: read as plain text, so
    /// an instruction cannot close its own turn) or parse (as control tokens, like Hugging
    /// Face's apply_chat_template; for injection research).
    #[arg(long, value_enum, default_value_t = persona_gate::chat::SpecialTokens::Literal)]
    pub special_tokens: persona_gate::chat::SpecialTokens,
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Output run directory.
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    /// Shard run directories.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
}

pub fn run(a: &ReproduceArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    // Flags that need no model are checked first.
    let shard: plan::Shard = match &a.shard {
        Some(s) if s == "slurm" => plan::Shard::from_slurm(|k| std::env::var(k).ok())?,
        Some(s) => s.parse()?,
        None => plan::Shard::default(),
    };
    if a.n == Some(0) || a.harmless_n == Some(0) {
        anyhow::bail!("--n / --harmless-n: must be at least 1");
    }
    // A --spec is read and checked before the model loads; the preset needs the model's depth.
    let given = match &a.spec {
        Some(p) => {
            let src = experiment::read_spec(p)?;
            let spec = Spec::parse(&src, &p.display().to_string())?;
            Some((src, spec))
        }
        None => None,
    };
    let template_src = match &a.chat_template {
        Some(f) => Some(fsio::read_text(f, "a Jinja chat template").context("--chat-template")?),
        None => None,
    };
    let model = super::load(&a.model)?;
    let (src, mut spec) = match given {
        Some(g) => g,
        None => {
            let p = preset::PresetPrompts {
                harmful: a.harmful.clone(),
                n: a.n,
                harmless: a.harmless.clone(),
                harmless_n: a.harmless_n,
            };
            let src = preset::preset(model.info.n_layer, a.size, &p);
            let spec = Spec::parse(&src, "preset")?;
            (src, spec)
        }
    };
    if let Some(m) = a.metric {
        spec.metric = m;
    }
    if a.print_spec {
        write!(out, "{src}")?;
        if a.metric.is_some() {
            writeln!(out, "# --metric {}: overrides metric above", spec.metric)?;
        }
        return Ok(());
    }
    if a.dry_run {
        let e = experiment::estimate(&model, &spec, template_src)?;
        writeln!(out, "{}", e.explain(&spec, shard.n, model.options.parallel))?;
        return Ok(());
    }
    let dir = a
        .out
        .clone()
        .unwrap_or_else(|| experiment::default_run_dir(&model.info.path, &spec));
    let mut phases = super::progress::Phases::new("prepare");
    let bar = phases.bar.clone();
    // Notes (chosen layers, resume) always reach stderr; they never contain prompt text.
    let mut note = |s: String| super::progress::note(&bar, &s);
    let opts = plan::RunOptions {
        shard,
        template: template_src,
        special: a.special_tokens,
    };
    let o = experiment::reproduce(
        &model,
        &spec,
        &dir,
        &opts,
        &mut |p, d, t, i| phases.update(p, d, t, i),
        &mut note,
    )?;
    phases.bar.finish_and_clear();
    match &o.finished {
        Some(f) => {
            writeln!(out, "{}", experiment::report::table(f.metric, &f.summaries))?;
            writeln!(
                out,
                "run {} in {}: {} groups run now, all {} done",
                o.plan.run_id,
                dir.display(),
                o.groups_run,
                o.plan.n_groups
            )?;
            writeln!(out, "wrote {}", f.files.join(", "))?;
        }
        None => writeln!(
            out,
            "run {} in {}: shard {}/{} ran {} groups; {} of {} done. Merge shard directories with `persona-gate merge --out DIR DIRS...`",
            o.plan.run_id, dir.display(), shard.k, shard.n, o.groups_run, o.groups_done, o.plan.n_groups
        )?,
    }
    Ok(())
}

pub fn merge(a: &MergeArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let (plan, f) = experiment::merge(&a.out, &a.inputs)?;
    writeln!(out, "{}", experiment::report::table(f.metric, &f.summaries))?;
    writeln!(
        out,
        "merged {} groups into {}",
        plan.n_groups,
        a.out.display()
    )?;
    Ok(())
}
