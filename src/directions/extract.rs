//! Extraction: differences of mean activations at chosen positions, harmful minus harmless
//! prompts (the refusal direction) or a persona's positive minus negative system prompts over
//! neutral questions (a persona direction).

use std::collections::BTreeMap;

use crate::chat::{ChatTemplate, Prompt, SystemPrompt};
use crate::engine::GenConfig;
use crate::error::{Empty, Error, Result, RunError, ValueOf};
use crate::hooks::{Capture, HookSet, Position};
use crate::model::Model;
use crate::prompts::{self, Instruction, Persona};

use super::{Direction, DirectionFile};

/// Where refusal-direction activations are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RefusalPositions {
    /// Every post-instruction template token, each a candidate (Arditi et al.).
    #[value(name = "post")]
    PostInstruction,
    /// The last prompt token only.
    Last,
}

/// Where persona-direction activations are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PersonaPositions {
    /// The last prompt token.
    Last,
    /// The mean over response tokens the model generates under each persona.
    Response { max_new_tokens: usize },
}

/// Where persona activations are read, as a choice without its parameter (a flag's value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PersonaAt {
    /// The last prompt token.
    Last,
    /// The mean over generated response tokens.
    Response,
}

impl PersonaAt {
    /// The positions, with the response length `Response` needs.
    pub fn positions(self, max_new_tokens: usize) -> PersonaPositions {
        match self {
            PersonaAt::Last => PersonaPositions::Last,
            PersonaAt::Response => PersonaPositions::Response { max_new_tokens },
        }
    }
}

fn render_all(
    model: &Model,
    tmpl: &ChatTemplate,
    system: &SystemPrompt,
    v: &[Instruction],
) -> Result<Vec<Prompt>> {
    Prompt::render_all(model, tmpl, system, v.iter().map(|i| i.text.as_str()))
}

fn diff_rows(c: &Capture, slot: usize, n_layer: usize, what: &str) -> Result<Vec<Vec<f32>>> {
    (0..n_layer)
        .map(|l| {
            let (a, b) = (c.mean(0, slot, l), c.mean(1, slot, l));
            let (Some(a), Some(b)) = (a, b) else {
                return Err(Error::Run(RunError::NoActivations {
                    what: what.to_string(),
                    layer: l,
                    slot,
                }));
            };
            let row: Vec<f32> = a.iter().zip(&b).map(|(x, y)| (x - y) as f32).collect();
            if let Some(&x) = row.iter().find(|x| !x.is_finite()) {
                return Err(Error::Value {
                    what: ValueOf::NonFinite(what.to_string()),
                    layer: l,
                    value: f64::from(x),
                });
            }
            Ok(row)
        })
        .collect()
}

/// Metadata shared by every extracted direction file.
fn base_meta(model: &Model, kind: &str) -> Result<BTreeMap<String, String>> {
    let mut m = BTreeMap::new();
    m.insert("kind".into(), kind.into());
    m.insert("arch".into(), model.info.arch.clone());
    m.insert("n_layer".into(), model.info.n_layer.to_string());
    m.insert("n_embd".into(), model.info.n_embd.to_string());
    m.insert(
        "model_file".into(),
        model
            .info
            .path
            .file_name()
            .map_or(String::new(), |f| f.to_string_lossy().into_owned()),
    );
    m.insert("model_sha256".into(), model.sha256()?);
    m.insert("quant".into(), model.info.file_type.clone());
    m.insert(
        "tool_version".into(),
        format!("persona-gate {}", crate::VERSION),
    );
    m.insert("llama_cpp".into(), crate::llama_cpp());
    Ok(m)
}

/// The refusal direction: mean over harmful instructions minus mean over harmless ones, per
/// layer, at each post-instruction position (`refusal.pos-1` is the last token) or at the
/// last token only.
///
/// # Errors
/// Empty sets, engine errors, non-finite results.
pub fn extract_refusal(
    model: &Model,
    tmpl: &ChatTemplate,
    system: &SystemPrompt,
    harmful: &[Instruction],
    harmless: &[Instruction],
    positions: RefusalPositions,
) -> Result<DirectionFile> {
    if harmful.is_empty() || harmless.is_empty() {
        return Err(Error::Empty(Empty::RefusalSets));
    }
    let (nl, ne) = (model.info.n_layer, model.info.n_embd);
    let mut ps = render_all(model, tmpl, system, harmful)?;
    ps.extend(render_all(model, tmpl, system, harmless)?);
    let groups: Vec<Option<usize>> = (0..ps.len())
        .map(|i| Some(usize::from(i >= harmful.len())))
        .collect();
    let n_post = ps
        .iter()
        .map(|p| p.post_instruction.len())
        .min()
        .unwrap_or(1)
        .max(1);
    let (pos, n_slots) = match positions {
        RefusalPositions::PostInstruction => (Position::PostInstruction, n_post),
        RefusalPositions::Last => (Position::LastPrompt, 1),
    };
    let all: Vec<usize> = (0..nl).collect();
    let mut hooks = HookSet::new(nl, ne);
    hooks.add_capture(Capture::new(&all, pos, groups, n_slots, nl, ne))?;
    model.session()?.first_logits(&ps, &mut hooks)?;
    let c = &hooks.captures[0];
    let mut directions = Vec::new();
    for slot in 0..c.n_slots() {
        directions.push(Direction {
            name: format!("refusal.pos-{}", slot + 1),
            rows: diff_rows(c, slot, nl, "refusal direction")?,
        });
    }
    let mut meta = base_meta(model, "refusal")?;
    meta.insert(
        "positions".into(),
        match positions {
            RefusalPositions::PostInstruction => format!("post-instruction -1..-{n_post}"),
            RefusalPositions::Last => "last prompt token".into(),
        },
    );
    meta.insert("system".into(), format!("{system:?}"));
    meta.insert("harmful_count".into(), harmful.len().to_string());
    meta.insert("harmful_sha256".into(), prompts::load::hash(harmful));
    meta.insert("harmless_count".into(), harmless.len().to_string());
    meta.insert("harmless_sha256".into(), prompts::load::hash(harmless));
    DirectionFile::new(directions, meta)
}

/// A persona direction: mean over the positive system prompts minus mean over the negative
/// ones, each applied to the same neutral questions.
///
/// # Errors
/// Empty sets, engine errors, non-finite results.
pub fn extract_persona(
    model: &Model,
    tmpl: &ChatTemplate,
    name: &str,
    persona: &Persona,
    questions: &[Instruction],
    at: PersonaPositions,
) -> Result<DirectionFile> {
    let mut stats = crate::engine::Stats::default();
    extract_persona_with_stats(model, tmpl, name, persona, questions, at, &mut stats)
}

/// As [`extract_persona`], also returning the engine's counters (for the benchmark).
///
/// # Errors
/// As [`extract_persona`].
pub fn extract_persona_with_stats(
    model: &Model,
    tmpl: &ChatTemplate,
    name: &str,
    persona: &Persona,
    questions: &[Instruction],
    at: PersonaPositions,
    stats: &mut crate::engine::Stats,
) -> Result<DirectionFile> {
    if questions.is_empty() {
        return Err(Error::Empty(Empty::PersonaQuestions));
    }
    let (nl, ne) = (model.info.n_layer, model.info.n_embd);
    let mut ps = Vec::new();
    let mut groups = Vec::new();
    for (g, side) in [&persona.positive, &persona.negative]
        .into_iter()
        .enumerate()
    {
        for sys in side {
            ps.extend(render_all(
                model,
                tmpl,
                &SystemPrompt::Text(sys.clone()),
                questions,
            )?);
            groups.extend(std::iter::repeat_n(Some(g), questions.len()));
        }
    }
    let all: Vec<usize> = (0..nl).collect();
    let mut hooks = HookSet::new(nl, ne);
    let (pos, max_new) = match at {
        PersonaPositions::Last => (Position::LastPrompt, 0),
        PersonaPositions::Response { max_new_tokens } => {
            (Position::GeneratedMean, max_new_tokens.max(2))
        }
    };
    hooks.add_capture(Capture::new(&all, pos, groups, 1, nl, ne))?;
    let cfg = GenConfig {
        max_new_tokens: max_new,
        keep_first_logits: false,
        ignore_eog: false,
        digest: false,
        ..GenConfig::default()
    };
    let mut session = model.session()?;
    session.generate(&ps, &cfg, &mut hooks, &mut |_, _| false, &mut |_| {})?;
    *stats = session.stats.clone();
    let rows = diff_rows(&hooks.captures[0], 0, nl, "persona direction")?;
    let mut meta = base_meta(model, "persona")?;
    meta.insert("persona".into(), name.into());
    meta.insert(
        "positions".into(),
        match at {
            PersonaPositions::Last => "last prompt token".into(),
            PersonaPositions::Response { max_new_tokens } => {
                format!("mean over up to {max_new_tokens} response tokens")
            }
        },
    );
    meta.insert("positive_count".into(), persona.positive.len().to_string());
    meta.insert("negative_count".into(), persona.negative.len().to_string());
    meta.insert("questions_count".into(), questions.len().to_string());
    meta.insert("questions_sha256".into(), prompts::load::hash(questions));
    DirectionFile::new(
        vec![Direction {
            name: format!("persona.{name}"),
            rows,
        }],
        meta,
    )
}
