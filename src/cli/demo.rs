//! `persona-gate demo`: the compliant-persona direction and baseline vs steered completions.

use std::io::Write;

use anyhow::Context;
use clap::Args;

use persona_gate::hooks;
use persona_gate::studies::demo;

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    pub model: super::ModelArgs,
    #[command(flatten)]
    pub prompt: super::PromptArgs,
    /// Steering layers, e.g. "6,12", "10-14", "10+5" or all (default: 1/4, 1/2 and 3/4 depth).
    #[arg(long, allow_hyphen_values = true)]
    pub layers: Option<String>,
    /// Multiples of the persona direction to add.
    #[arg(long, value_delimiter = ',', default_values_t = vec![4.0f32], allow_hyphen_values = true)]
    pub coefficients: Vec<f32>,
    /// Built-in harmful prompts to use (at most 16). Not llama.cpp's -n: that is
    /// -n/--n-predict, new tokens.
    #[arg(long, default_value_t = 16)]
    pub n: usize,
    /// New tokens per completion at most (llama.cpp's -n/--n-predict).
    #[arg(long, short = 'n', visible_alias = "n-predict", default_value_t = 48)]
    pub max_new_tokens: usize,
}

pub fn run(a: &DemoArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let model = super::load(&a.model)?;
    let tmpl = super::template(&model, &a.prompt)?;
    let layers = match &a.layers {
        Some(s) => hooks::LayerSet::parse(s, model.info.n_layer)
            .context("--layers")?
            .into_vec(),
        None => vec![],
    };
    for c in &a.coefficients {
        anyhow::ensure!(c.is_finite(), "--coefficients: {c} is not a finite number");
    }
    anyhow::ensure!(a.n >= 1, "--n: must be at least 1");
    writeln!(
        out,
        "model: {} ({}, {} layers, {})",
        model.info.path.display(),
        model.info.arch,
        model.info.n_layer,
        model.info.file_type
    )?;
    let cfg = demo::DemoConfig {
        layers,
        coefficients: a.coefficients.clone(),
        n_prompts: a.n.min(16),
        max_new_tokens: a.max_new_tokens,
        system: a.prompt.system(),
    };
    demo::run(&model, &tmpl, &cfg, out)?;
    Ok(())
}
