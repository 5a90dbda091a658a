//! Directions in the residual stream: the refusal direction (Arditi et al. 2024) and persona
//! directions, random controls, their files, and comparisons between them.
//!
//! A [`Direction`] has one row per layer (`resid_post.L`), `[n_layer, n_embd]`. Both kinds
//! are differences of means accumulated in f64 by the engine's capture hooks, so memory stays
//! O(layers × n_embd) however many prompts are used.

pub mod cvec;
pub mod file;
pub mod select;

use std::collections::BTreeMap;

use crate::chat::{ChatTemplate, Prompt, SystemPrompt};
use crate::engine::GenConfig;
use crate::error::{Empty, Error, Result, RunError, ShapesOf, ValueOf};
use crate::hooks::{Capture, HookSet, Position};
use crate::model::Model;
use crate::prompts::{self, Instruction, Persona};
use crate::rng::Rng;

pub use file::DirectionFile;

/// One direction: a row per layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Direction {
    /// e.g. `refusal.pos-1` (post-instruction position −1), `persona.compliant`, `random.s0`.
    pub name: String,
    pub rows: Vec<Vec<f32>>,
}

impl Direction {
    pub fn n_layer(&self) -> usize {
        self.rows.len()
    }
    pub fn n_embd(&self) -> usize {
        self.rows.first().map_or(0, Vec::len)
    }
    /// L2 norm of each layer's row.
    pub fn norms(&self) -> Vec<f64> {
        self.rows.iter().map(|r| norm(r)).collect()
    }
}

pub fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt()
}

/// Cosine similarity in f64; 0 when either vector is zero.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let n = norm(a) * norm(b);
    if n > 0.0 {
        d / n
    } else {
        0.0
    }
}

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

/// A seeded random direction: each layer's row is Gaussian, scaled to unit norm or to
/// `match_norms[layer]` (norm-matched control). The same seed gives the same rows everywhere.
pub fn random(seed: u64, n_layer: usize, n_embd: usize, match_norms: Option<&[f64]>) -> Direction {
    let mut rng = Rng::new(seed);
    let rows = (0..n_layer)
        .map(|l| {
            let v: Vec<f64> = (0..n_embd).map(|_| rng.normal()).collect();
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            let target = match_norms.map_or(1.0, |m| m[l]);
            v.iter().map(|x| (x / n * target) as f32).collect()
        })
        .collect();
    Direction {
        name: format!("random.s{seed}"),
        rows,
    }
}

/// A seeded random control shaped like `like` (a direction of `file`), unit or norm-matched,
/// as a direction file carrying the model provenance of `file`.
///
/// # Errors
/// Only if the generated direction were malformed (it is not for a valid `like`).
pub fn random_like(
    file: &DirectionFile,
    like: &Direction,
    seed: u64,
    norm_matched: bool,
) -> Result<DirectionFile> {
    let norms = like.norms();
    let r = random(
        seed,
        like.n_layer(),
        like.n_embd(),
        norm_matched.then_some(&norms[..]),
    );
    let mut meta = BTreeMap::new();
    for k in ["arch", "model_sha256", "model_file", "quant"] {
        if let Some(v) = file.meta.get(k) {
            meta.insert(k.to_string(), v.clone());
        }
    }
    meta.insert("kind".into(), "random".into());
    meta.insert("seed".into(), seed.to_string());
    let how = if norm_matched {
        " (norm-matched)"
    } else {
        " (unit)"
    };
    meta.insert("like".into(), format!("{}{how}", like.name));
    meta.insert(
        "tool_version".into(),
        format!("persona-gate {}", crate::VERSION),
    );
    DirectionFile::new(vec![r], meta)
}

/// Two directions' cosine similarity at each layer, for `directions cos`.
#[derive(Debug, Clone)]
pub struct LayerCosines {
    pub a: String,
    pub b: String,
    pub cosines: Vec<f64>,
}

impl LayerCosines {
    /// # Errors
    /// Shapes differ, or a row has no direction (zero or non-finite norm).
    pub fn new(a: &Direction, b: &Direction) -> Result<LayerCosines> {
        Ok(LayerCosines {
            a: a.name.clone(),
            b: b.name.clone(),
            cosines: cosine_per_layer(a, b)?,
        })
    }

    /// layer, a, b, cosine.
    pub fn to_csv(&self) -> Vec<u8> {
        crate::text::csv_table(
            &["layer", "a", "b", "cosine"],
            self.cosines.iter().enumerate().map(|(l, c)| {
                vec![
                    l.to_string(),
                    self.a.clone(),
                    self.b.clone(),
                    format!("{c:.6}"),
                ]
            }),
        )
    }

    /// A line plot of cosine against layer.
    pub fn to_svg(&self) -> String {
        let s = crate::plot::Series {
            name: format!("{} vs {}", self.a, self.b),
            points: self
                .cosines
                .iter()
                .enumerate()
                .map(|(l, &c)| (l as f64, c))
                .collect(),
            band: None,
        };
        crate::plot::line_plot(
            "cosine similarity per layer",
            "layer (resid_post)",
            "cosine",
            &[s],
            Some((-1.0, 1.0)),
        )
    }
}

/// Per-layer cosine similarity of two directions of the same shape.
///
/// # Errors
/// Shapes differ.
pub fn cosine_per_layer(a: &Direction, b: &Direction) -> Result<Vec<f64>> {
    if a.n_layer() != b.n_layer() || a.n_embd() != b.n_embd() {
        return Err(Error::Shapes {
            what: ShapesOf::Compare,
            a: a.name.clone(),
            a_shape: [a.n_layer(), a.n_embd()],
            b: b.name.clone(),
            b_shape: [b.n_layer(), b.n_embd()],
        });
    }
    a.rows
        .iter()
        .zip(&b.rows)
        .enumerate()
        .map(|(l, (x, y))| {
            // A zero or non-finite row has no direction: say so rather than print 0 or NaN.
            for (d, r) in [(a, x), (b, y)] {
                let n = norm(r);
                if !(n.is_finite() && n > 0.0) {
                    return Err(Error::Value {
                        what: ValueOf::CosineNorm(d.name.clone()),
                        layer: l,
                        value: n,
                    });
                }
            }
            Ok(cosine(x, y))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_is_seeded_and_norm_matched() {
        let a = random(3, 4, 16, None);
        assert_eq!(a, random(3, 4, 16, None));
        assert_ne!(a.rows, random(4, 4, 16, None).rows);
        assert!(a.norms().iter().all(|n| (n - 1.0).abs() < 1e-6));
        let m = random(3, 4, 16, Some(&[1.0, 2.0, 3.0, 4.0]));
        for (l, n) in m.norms().iter().enumerate() {
            assert!((n - (l + 1) as f64).abs() < 1e-5);
        }
        assert!((cosine_per_layer(&a, &m).unwrap()[2] - 1.0).abs() < 1e-6);
    }

    // Here rather than in file.rs, whose tests module another change is editing.
    #[test]
    fn direction_files_record_their_hook_point() {
        use crate::hooks::Site;
        use file::HOOK_POINT_KEY;
        let d = Direction {
            name: "d".into(),
            rows: vec![vec![1.0, 2.0]; 3],
        };
        let f = DirectionFile::new(vec![d], BTreeMap::new()).unwrap();
        assert_eq!(f.meta[HOOK_POINT_KEY], "resid_post");
        let g = DirectionFile::from_bytes(&f.to_bytes()).unwrap();
        assert_eq!(
            (g.meta[HOOK_POINT_KEY].as_str(), g.site()),
            ("resid_post", Site::ResidPost)
        );
        // A file from before the key loads as resid_post.
        let mut old = f.clone();
        old.meta.remove(HOOK_POINT_KEY);
        let g = DirectionFile::from_bytes(&old.to_bytes()).unwrap();
        assert_eq!(
            (g.meta.get(HOOK_POINT_KEY), g.site()),
            (None, Site::ResidPost)
        );
        // Another site is refused, naming the file and the key.
        let dir = std::env::temp_dir().join(format!("pg-hook-point-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("attn.safetensors");
        let mut other = f.clone();
        other.meta.insert(HOOK_POINT_KEY.into(), "attn_out".into());
        std::fs::write(&p, other.to_bytes()).unwrap();
        let e = DirectionFile::load(&p).unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(e.contains("attn.safetensors"), "{e}");
        assert!(e.contains("metadata hook_point = 'attn_out'"), "{e}");
        assert!(e.contains("only resid_post rows"), "{e}");
    }

    #[test]
    fn cosine_basics() {
        assert!((cosine(&[1.0, 0.0], &[0.0, 2.0])).abs() < 1e-12);
        assert!((cosine(&[1.0, 1.0], &[2.0, 2.0]) - 1.0).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }
}
