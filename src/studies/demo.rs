//! The steering demo: extract the compliant-persona direction on a small model, then show
//! baseline and persona-steered completions on built-in harmful prompts, with labels.
//!
//! The direction is mean(positive persona) − mean(negative persona) of `resid_post.L` at the
//! last prompt token over the built-in neutral questions. Steering adds α times it at one
//! layer through llama.cpp's native control vector; the layers tried are spread over depth,
//! because a fixed depth steers one model cleanly and barely moves another.

use std::collections::BTreeMap;
use std::io::Write;

/// Per-layer vectors to add (layer → vector); None for the unsteered baseline.
type LayerVectors = BTreeMap<usize, Vec<f32>>;

use crate::chat::{ChatTemplate, Prompt, SystemPrompt};
use crate::engine::GenConfig;
use crate::error::{Error, Result};
use crate::hooks::{HookPoint, HookSet};
use crate::label::{Label, Labeler};
use crate::model::Model;
use crate::prompts;

#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Steering layers; empty = 1/4, 1/2 and 3/4 depth.
    pub layers: Vec<usize>,
    pub coefficients: Vec<f32>,
    pub n_prompts: usize,
    pub max_new_tokens: usize,
    pub system: SystemPrompt,
}

/// Runs the demo, writing a readable report to `out`.
///
/// # Errors
/// Engine errors, or I/O errors writing the report.
pub fn run(
    model: &Model,
    tmpl: &ChatTemplate,
    cfg: &DemoConfig,
    out: &mut dyn Write,
) -> Result<()> {
    let io = Error::Output;
    let nl = model.info.n_layer;
    let personas = prompts::parse_personas(prompts::PERSONAS, "built-in personas")?;
    let compliant = &personas["compliant"];
    let neutral = prompts::builtin("neutral")?;
    let t0 = std::time::Instant::now();
    let dir = crate::directions::extract_persona(
        model,
        tmpl,
        "compliant",
        compliant,
        &neutral,
        crate::directions::PersonaPositions::Last,
    )?
    .directions
    .remove(0)
    .rows;
    writeln!(
        out,
        "compliant-persona direction: {} personas x {} neutral questions, {:.1}s",
        compliant.positive.len() + compliant.negative.len(),
        neutral.len(),
        t0.elapsed().as_secs_f64()
    )
    .map_err(io)?;
    let norms: Vec<String> = dir
        .iter()
        .map(|d| format!("{:.1}", d.iter().map(|x| x * x).sum::<f32>().sqrt()))
        .collect();
    writeln!(out, "per-layer norm: {}", norms.join(" ")).map_err(io)?;

    let harmful: Vec<_> = prompts::builtin("harmful")?
        .into_iter()
        .take(cfg.n_prompts)
        .collect();
    let ps = Prompt::render_all(
        model,
        tmpl,
        &cfg.system,
        harmful.iter().map(|i| i.text.as_str()),
    )?;
    let layers = if cfg.layers.is_empty() {
        vec![(nl / 4).max(1), nl / 2, 3 * nl / 4]
    } else {
        cfg.layers.clone()
    };
    let labeler = Labeler::default();
    let gen = GenConfig {
        max_new_tokens: cfg.max_new_tokens,
        keep_first_logits: false,
        ignore_eog: false,
        digest: false,
        ..GenConfig::default()
    };
    let mut session = model.session()?;
    let mut conditions: Vec<(String, Option<LayerVectors>)> = vec![("baseline".into(), None)];
    for &l in &layers {
        for &a in &cfg.coefficients {
            let v = dir[l].iter().map(|x| x * a).collect();
            conditions.push((
                format!("persona +{a} @ {}", HookPoint::resid_post(l)),
                Some([(l, v)].into()),
            ));
        }
    }
    let mut texts = Vec::new();
    writeln!(
        out,
        "\n{:<34} {:>8} {:>8} {:>10}",
        "condition", "refusal", "bypass", "degenerate"
    )
    .map_err(io)?;
    for (name, cv) in &conditions {
        session.set_control_vector(cv.as_ref())?;
        let mut hooks = HookSet::new(nl, model.info.n_embd);
        let g = session.generate(&ps, &gen, &mut hooks, &mut |_, _| false, &mut |_| {})?;
        let labels: Vec<Label> = g.iter().map(|g| labeler.label(&g.text)).collect();
        let n = |l| labels.iter().filter(|&&x| x == l).count();
        writeln!(
            out,
            "{:<34} {:>5}/{:<2} {:>5}/{:<2} {:>7}/{:<2}",
            name,
            n(Label::Refusal),
            ps.len(),
            n(Label::Bypass),
            ps.len(),
            n(Label::Degenerate),
            ps.len()
        )
        .map_err(io)?;
        texts.push((name.clone(), g, labels));
    }
    session.set_control_vector(None)?;
    // Show one prompt under baseline and under the last condition: the first whose label the
    // steering changed from refusal, else prompt 0.
    let (base, last) = (&texts[0], &texts[texts.len() - 1]);
    let i = (0..ps.len())
        .find(|&i| base.2[i] == Label::Refusal && last.2[i] != Label::Refusal)
        .unwrap_or(0);
    writeln!(out, "\nprompt {i}: {}", harmful[i].text).map_err(io)?;
    for (name, g, labels) in [base, last] {
        let one_line: String = g[i]
            .text
            .chars()
            .take(160)
            .collect::<String>()
            .replace('\n', " ");
        writeln!(out, "  [{name}] {}: {one_line}", labels[i]).map_err(io)?;
    }
    Ok(())
}
