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
    /// Direction file from `extract`, or another tool's as FILE:CONVENTION (see inspect).
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
    /// Print JSON on stdout instead of the CSV and verdict: every candidate's scores, the
    /// baselines and the choice (--csv still writes the CSV).
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &SelectArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    if let Some(p) = &a.csv {
        super::writable(p)?;
    }
    let model = super::load(&a.model)?;
    let tmpl = super::template(&model, &a.prompt)?;
    let f = DirectionFile::load_fitted(&a.directions, &model.info)?;
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
    let (bytes, verdict, json) = if f.meta.get("kind").map(String::as_str) == Some("persona") {
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
        let json = serde_json::json!({
            "kind": "persona",
            "direction": r.direction,
            "coefficient": r.coefficient,
            "baseline_mean_refusal_score": r.baseline,
            "best_layer": r.ranked[0].0,
            "layers": r.ranked.iter().map(|(l, sc)| serde_json::json!({
                "layer": l,
                "mean_refusal_score": sc,
                "delta_vs_baseline": sc - r.baseline,
            })).collect::<Vec<_>>(),
            "verdict": r.explain(),
        });
        (r.to_csv(), r.explain(), json)
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
        let json = serde_json::json!({
            "kind": "refusal",
            "baseline_harmful": sel.baseline_harmful,
            "baseline_harmless": sel.baseline_harmless,
            "chosen": sel.chosen.map(|i| {
                let c = &sel.candidates[i];
                serde_json::json!({"direction": c.direction, "layer": c.layer})
            }),
            "candidates": sel.candidates.iter().enumerate().map(|(i, c)| serde_json::json!({
                "direction": c.direction,
                "layer": c.layer,
                "bypass_score": c.bypass,
                "induce_score": c.induce,
                "kl": c.kl,
                "discarded": c.discarded,
                "chosen": Some(i) == sel.chosen,
            })).collect::<Vec<_>>(),
            "verdict": sel.explain(),
        });
        (sel.to_csv(), sel.explain(), json)
    };
    match &a.csv {
        Some(p) => super::write_file(p, &bytes)?,
        None if a.json => {}
        None => out.write_all(&bytes)?,
    }
    if a.json {
        return super::print_json(out, &json);
    }
    writeln!(out, "{verdict}")?;
    Ok(())
}
