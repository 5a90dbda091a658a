//! `persona-gate select`: score refusal-direction candidates and choose one, or rank a persona
//! direction's steering layers.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use persona_gate::directions::{select, DirectionFile};
use persona_gate::hooks;

#[derive(Args, Debug)]
pub struct SelectArgs {
    #[command(flatten)]
    pub model: super::ModelArgs,
    #[command(flatten)]
    pub prompt: super::PromptArgs,
    #[command(flatten)]
    pub set: super::SetArgs,
    /// Direction file from `extract`.
    #[arg(long, short = 'd')]
    pub directions: PathBuf,
    /// Harmful validation instructions.
    #[arg(long, default_value = "builtin:harmful")]
    pub harmful_val: String,
    /// Harmless validation instructions (refusal selection only).
    #[arg(long, default_value = "builtin:harmless")]
    pub harmless_val: String,
    /// Candidate layers, e.g. "4,8,12", "10-14", "10+5" (default: all).
    #[arg(long, allow_hyphen_values = true)]
    pub layers: Option<String>,
    /// Persona ranking: the multiple of the persona row added at each layer.
    #[arg(long, default_value_t = 4.0, allow_hyphen_values = true)]
    pub coefficient: f32,
    /// Conditions evaluated together through per-sequence hooks.
    #[arg(long, default_value_t = 4)]
    pub chunk: usize,
    /// Write every candidate's scores here (CSV).
    #[arg(long)]
    pub csv: Option<PathBuf>,
}

pub fn run(a: &SelectArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    if let Some(p) = &a.csv {
        super::writable(p)?;
    }
    let model = super::load(&a.model)?;
    let tmpl = super::template(&model, &a.prompt)?;
    let f = DirectionFile::load(&a.directions)?;
    f.check_model(&model.info)
        .with_context(|| format!("{}", a.directions.display()))?;
    let layers = match &a.layers {
        Some(s) => hooks::LayerSet::parse(s, model.info.n_layer)
            .context("--layers")?
            .into_vec(),
        None => (0..model.info.n_layer).collect(),
    };
    anyhow::ensure!(
        a.coefficient.is_finite(),
        "--coefficient: {} is not a finite number",
        a.coefficient
    );
    let set = |spec: &str, flag: &str| {
        super::render_set(
            &model,
            &tmpl,
            &a.prompt,
            &super::load_set(spec, &a.set, flag)?,
        )
    };
    let harmful = set(&a.harmful_val, "harmful-val")?;
    let (bytes, verdict) = if f.meta.get("kind").map(String::as_str) == Some("persona") {
        let d = f.get(None)?;
        let b = super::progress::bar(layers.len(), "layers");
        let r = select::rank_persona_layers(
            &model,
            d,
            a.coefficient,
            &harmful,
            &layers,
            a.chunk,
            &mut |k, _| b.set_position(k as u64),
        )?;
        b.finish_and_clear();
        (r.to_csv(), r.explain())
    } else {
        let harmless = set(&a.harmless_val, "harmless-val")?;
        let b = super::progress::bar(f.directions.len() * layers.len() * 3, "candidates");
        let sel = select::select_refusal(
            &model,
            &f,
            &harmful,
            &harmless,
            &layers,
            a.chunk,
            &mut |k, _| b.set_position(k as u64),
        )?;
        b.finish_and_clear();
        (sel.to_csv(), sel.explain())
    };
    match &a.csv {
        Some(p) => super::write_file(p, &bytes)?,
        None => out.write_all(&bytes)?,
    }
    writeln!(out, "{verdict}")?;
    Ok(())
}
