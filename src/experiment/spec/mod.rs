//! The experiment spec: a TOML file that says which prompts, which directions, and which grid
//! of conditions to run. Grids are data: an experiment's `sweep` table expands its
//! intervention templates over every combination of values, so the paper's E0–E3 are one
//! file (see [`super::preset`]), not code paths.
//!
//! Parsing is strict (unknown keys are errors) and errors name the field:
//! `E3[after=9,source=own,width=4]: intervention 2: layers: layers '22-25': layer 24 out of range (24 layers, 0-23)`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

mod check;
mod expand;

pub use expand::{resolve_given, Builtins};

use crate::error::{Error, Result};
use crate::hooks::{EditKind, LayerSet};

/// What each grid point is scored by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// Greedy completions labelled refusal / bypass / degenerate, plus the first-token score.
    #[default]
    Generate,
    /// The logit refusal score at the first response token only: one forward pass per prompt.
    Score,
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Metric::Generate => "generate",
            Metric::Score => "score",
        })
    }
}

fn d_group() -> usize {
    16
}
fn d_max_new() -> usize {
    64
}
fn d_min_tokens() -> usize {
    16
}
fn d_true() -> bool {
    true
}
fn d_window() -> usize {
    80
}
fn d_one() -> toml::Value {
    toml::Value::Float(1.0)
}
fn d_target() -> f64 {
    -2.0
}

/// The whole spec file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub metric: Metric,
    /// System prompt: "default" (the template's own), "empty", or literal text.
    #[serde(default)]
    pub system: Option<String>,
    /// (condition, prompt) pairs per resumable group; fixed by the spec, never by what ran.
    #[serde(default = "d_group")]
    pub group_size: usize,
    #[serde(default)]
    pub generation: GenerationSpec,
    #[serde(default)]
    pub labels: LabelSpec,
    pub prompts: BTreeMap<String, PromptSetSpec>,
    #[serde(default)]
    pub directions: BTreeMap<String, DirectionSpec>,
    /// Calibrates the persona steering layer and coefficient (`{steer_layer}`, `{steer_coef}`).
    #[serde(default)]
    pub steer: Option<SteerSpec>,
    pub experiment: Vec<ExperimentSpec>,
    /// Judge the completions once the grid is done (see `persona-gate judge`). Not part of
    /// the run's fingerprint: adding or changing a judge never invalidates a finished grid.
    #[serde(default, skip_serializing)]
    pub judge: Option<JudgeSpec>,
    /// Where the spec came from (a path or "preset"), for messages; not part of results.
    #[serde(skip)]
    pub origin: String,
}

/// A local GGUF judge run over the finished grid.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeSpec {
    /// The judge model (GGUF).
    pub model: String,
    /// `strongreject` and/or `llamaguard`.
    pub kinds: Vec<String>,
    /// Template file overriding the built-in one (applies to every kind listed).
    #[serde(default)]
    pub template: Option<String>,
    /// Context per sequence for the judge (rubric prompt + completion).
    #[serde(default = "d_judge_ctx")]
    pub ctx: u32,
}

fn d_judge_ctx() -> u32 {
    2048
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSpec {
    #[serde(default = "d_max_new")]
    pub max_new_tokens: usize,
    /// Early stop needs at least this many tokens, so that loops can still show up.
    #[serde(default = "d_min_tokens")]
    pub min_tokens: usize,
    /// Stop a completion once its label cannot change (see `Labeler::settled`).
    #[serde(default = "d_true")]
    pub early_stop: bool,
    /// Sampling temperature; 0 (the default, and the paper's) decodes greedily.
    #[serde(default)]
    pub temperature: f64,
    /// llama.cpp's sampler filters, used when sampling (llama.cpp's defaults; `top_k = 0`,
    /// `top_p = 1`, `min_p = 0` turn them off).
    #[serde(default = "d_top_k")]
    pub top_k: i32,
    #[serde(default = "d_top_p")]
    pub top_p: f64,
    #[serde(default = "d_min_p")]
    pub min_p: f64,
    /// Completions per prompt and condition (sampled: each with its own seed, from the spec's
    /// `seed`, the condition, the prompt id and the sample number).
    #[serde(default = "d_samples")]
    pub samples: usize,
}

fn d_top_k() -> i32 {
    40
}
fn d_top_p() -> f64 {
    0.95
}
fn d_min_p() -> f64 {
    0.05
}
fn d_samples() -> usize {
    1
}

impl Default for GenerationSpec {
    fn default() -> Self {
        GenerationSpec {
            max_new_tokens: d_max_new(),
            min_tokens: d_min_tokens(),
            early_stop: true,
            temperature: 0.0,
            top_k: d_top_k(),
            top_p: d_top_p(),
            min_p: d_min_p(),
            samples: d_samples(),
        }
    }
}

impl GenerationSpec {
    /// The engine's sampling settings, or `None` for greedy decoding.
    pub fn sampling(&self) -> Option<crate::engine::Sampling> {
        (self.temperature > 0.0).then_some(crate::engine::Sampling {
            temperature: self.temperature as f32,
            top_k: self.top_k,
            top_p: self.top_p as f32,
            min_p: self.min_p as f32,
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LabelSpec {
    /// Refusal phrases (default: the built-in list in `label.rs`).
    #[serde(default)]
    pub phrases: Option<Vec<String>>,
    /// A phrase within this many characters of the start is a refusal.
    #[serde(default = "d_window")]
    pub window: usize,
    /// Also count a phrase anywhere in the answer.
    #[serde(default)]
    pub anywhere: bool,
}

impl Default for LabelSpec {
    fn default() -> Self {
        LabelSpec {
            phrases: None,
            window: d_window(),
            anywhere: false,
        }
    }
}

/// A prompt set: `builtin:NAME` or a file, optionally a `[start, end)` slice, then a seeded
/// sample of `n`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSetSpec {
    pub source: String,
    #[serde(default)]
    pub field: Option<String>,
    #[serde(default)]
    pub range: Option<[usize; 2]>,
    #[serde(default)]
    pub n: Option<usize>,
    #[serde(default)]
    pub seed: u64,
}

/// Where a direction comes from.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum DirectionSpec {
    /// A direction file from `extract` (safetensors), a control-vector GGUF, or another
    /// tool's safetensors, `.npy` or torch.save `.pt` (with `convention`).
    File {
        path: String,
        #[serde(default)]
        name: Option<String>,
        /// For a refusal direction from a file: the layer `{refusal_layer}` names (default: a
        /// 1-D vector's own layer).
        #[serde(default)]
        refusal_layer: Option<usize>,
        /// Where another tool's rows are: `resid_post`, `hidden_states` or `resid_pre`.
        /// Left out of the serialized spec when absent, so older runs keep their fingerprint.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        convention: Option<crate::directions::Convention>,
        /// A 1-D vector's layer in that convention (refusal_direction's
        /// `direction_metadata.json` gives it when absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        layer: Option<usize>,
    },
    /// Extracted now: mean(harmful) − mean(harmless) at the last prompt token.
    Refusal {
        harmful: String,
        harmless: String,
        /// Choose the layer `{refusal_layer}` by Arditi et al.'s selection.
        #[serde(default)]
        select: Option<SelectSpec>,
        /// Or fix it.
        #[serde(default)]
        layer: Option<usize>,
    },
    /// Extracted now: mean(positive persona) − mean(negative persona) over questions.
    Persona {
        #[serde(default = "d_compliant")]
        persona: String,
        /// A personas TOML file (default: built-in).
        #[serde(default)]
        personas: Option<String>,
        /// Prompt-set name of the neutral questions.
        questions: String,
    },
    /// A seeded Gaussian direction, norm-matched per layer to `like` if given.
    Random {
        seed: u64,
        #[serde(default)]
        like: Option<String>,
    },
}

fn d_compliant() -> String {
    "compliant".into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SelectSpec {
    pub harmful: String,
    pub harmless: String,
    /// Candidate layers (layer-list syntax); default every layer below 80% depth.
    #[serde(default)]
    pub layers: Option<String>,
}

/// Steering calibration: rank `layers` by the mean refusal score on `prompts` when adding
/// the largest coefficient, then take the smallest coefficient whose mean score at the best
/// layer is at most `target` (log-odds; the largest if none is).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SteerSpec {
    pub direction: String,
    pub prompts: String,
    pub layers: String,
    pub coefficients: Vec<f64>,
    #[serde(default)]
    pub scale: Scale,
    #[serde(default = "d_target")]
    pub target: f64,
}

/// How a coefficient is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Scale {
    /// coefficient × the direction's row as extracted.
    #[default]
    Raw,
    /// coefficient × the mean residual norm at the layer × the unit direction, so a setting
    /// transfers between models (norms measured on the condition's prompts and recorded).
    Resid,
}

/// What an experiment stands for in the report (the paper's claims).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Baseline,
    Steer,
    RestoreAdd,
    RestoreProject,
    RandomControl,
    HarmlessBaseline,
    SanityAblate,
    SanityInduce,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PlotSpec {
    pub x: String,
    /// Sweep variables that split the lines.
    #[serde(default)]
    pub series: Vec<String>,
    /// Another experiment drawn as a min–max band at each x (random controls).
    #[serde(default)]
    pub band: Option<String>,
    /// Experiments drawn as flat reference lines (e.g. the baseline).
    #[serde(default)]
    pub reference: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSpec {
    pub id: String,
    #[serde(default)]
    pub title: String,
    pub prompts: String,
    #[serde(default)]
    pub role: Option<Role>,
    /// Variable → values; the grid is their product, in key order, values in given order.
    #[serde(default)]
    pub sweep: BTreeMap<String, Vec<toml::Value>>,
    /// Intervention templates: strings may use `{var}` (sweep variables, `steer_layer`,
    /// `steer_coef`, `refusal_layer`, `n_layer`, `last_layer`) and integer arithmetic over
    /// them and integer literals, `{steer_layer + after}`, `{last_layer - 2}`.
    #[serde(default)]
    pub intervention: Vec<toml::Value>,
    #[serde(default)]
    pub plot: Option<PlotSpec>,
}

/// One intervention after substitution.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InterventionSpec {
    pub direction: String,
    pub op: EditKind,
    /// An int, a list, or a string: `all`, `12`, `3,5`, `20-23`, `S+W` (W layers from S),
    /// `S+tail` or `S..` (S through the last layer).
    pub layers: toml::Value,
    #[serde(default = "d_one")]
    pub coefficient: toml::Value,
    #[serde(default)]
    pub scale: Scale,
    /// Which row of the direction: `own` (each layer's own row), a layer whose row is used at
    /// every layer, or `steer` (the calibrated steering layer's row: the very vector added).
    /// The two can give opposite answers for projection.
    #[serde(default)]
    pub source: Option<toml::Value>,
    /// Prompt ids this intervention applies to (default: all prompts of the condition).
    #[serde(default)]
    pub scope: Option<Vec<String>>,
}

/// Which row of a direction an intervention uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Own,
    Layer(usize),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Own => f.write_str("own"),
            Source::Layer(l) => write!(f, "{l}"),
        }
    }
}

/// A fully resolved intervention.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Intervention {
    pub direction: String,
    pub op: EditKind,
    pub layers: Vec<usize>,
    pub coefficient: f64,
    pub scale: Scale,
    pub source: Source,
    pub scope: Option<Vec<String>>,
}

impl Intervention {
    /// Compact layer text: `12`, `18-21`, or a comma list.
    pub fn layers_text(&self) -> String {
        LayerSet::text(&self.layers)
    }
}

/// One grid point: an experiment's condition.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Condition {
    /// `E3[after=1,source=own,width=4]`, unique in the plan.
    pub id: String,
    pub experiment: String,
    pub prompts: String,
    /// Sweep variable values, in key order.
    pub vars: Vec<(String, toml::Value)>,
    pub interventions: Vec<Intervention>,
}

impl Condition {
    /// `after=1;source=own;width=4`.
    pub fn vars_text(&self) -> String {
        self.vars
            .iter()
            .map(|(k, v)| format!("{k}={}", value_text(v)))
            .collect::<Vec<_>>()
            .join(";")
    }
    pub fn var(&self, k: &str) -> Option<&toml::Value> {
        self.vars.iter().find(|(n, _)| n == k).map(|(_, v)| v)
    }
}

/// A TOML scalar as plain text (strings unquoted).
pub fn value_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Float(f) => fmt_num(*f),
        other => other.to_string(),
    }
}

/// Shortest text for a number that reads back the same: `4`, `0.5`.
pub fn fmt_num(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e15 {
        format!("{}", f as i64)
    } else {
        format!("{f}")
    }
}

/// Names of the variables [`Builtins`] provides.
pub const BUILTIN_VARS: &[&str] = &[
    "n_layer",
    "last_layer",
    "steer_layer",
    "steer_coef",
    "refusal_layer",
];

/// Most conditions a spec may expand to (the full paper preset on an 80-layer model has a
/// few hundred); beyond this a sweep is almost surely a mistake.
pub const MAX_CONDITIONS: usize = 100_000;

/// Why `s` cannot name a file in a run directory, if it cannot: names from a spec become
/// file and directory names, so they are limited to one plain path component.
pub fn bad_file_name(s: &str) -> Option<&'static str> {
    if s.is_empty() {
        return Some("is empty");
    }
    if s.len() > 64 {
        return Some("is longer than 64 characters");
    }
    if s.starts_with('.') {
        return Some("starts with a dot");
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '+'))
    {
        return Some("may hold only letters, digits and _ - . +");
    }
    None
}

impl Spec {
    /// Parses and checks what can be checked without a model: names refer to defined prompt
    /// sets and directions, ids are unique, sweeps are non-empty, values are finite.
    ///
    /// # Errors
    /// The TOML error (with its line) or the first failed check, naming the field.
    pub fn parse(src: &str, origin: &str) -> Result<Spec> {
        let mut spec: Spec = toml::from_str(src).map_err(|e| {
            // "line N: key: message", the key read from the offending line when it has one.
            let at = e.span().map(|s| {
                let n = src[..s.start].matches('\n').count() + 1;
                let line = src.lines().nth(n - 1).unwrap_or("");
                let key = match line.split_once('=') {
                    Some((k, _)) if !line.trim_start().starts_with('[') => {
                        Some(k.trim().to_string())
                    }
                    _ => None,
                };
                (n, key)
            });
            let (line, key) = at.map_or((None, None), |(n, k)| (Some(n), k));
            Error::SpecToml {
                origin: origin.to_string(),
                line,
                key,
                reason: e.message().to_string(),
            }
        })?;
        spec.check(origin)?;
        spec.origin = origin.to_string();
        Ok(spec)
    }

    /// Whether any coefficient is relative to the residual norm (which then gets measured).
    pub fn uses_scale_resid(&self) -> bool {
        self.experiment.iter().any(|e| {
            e.intervention
                .iter()
                .any(|t| t.get("scale").and_then(toml::Value::as_str) == Some("resid"))
        }) || self.steer.as_ref().is_some_and(|s| s.scale == Scale::Resid)
    }
}

#[cfg(test)]
mod tests {
    use super::expand::substitute;
    use super::*;

    const MINI: &str = r#"
name = "t"
[prompts.h]
source = "builtin:harmful"
[directions.p]
kind = "random"
seed = 1
[[experiment]]
id = "E"
prompts = "h"
sweep = { w = [2, 4], s = [10, 12] }
intervention = [ { direction = "p", op = "project", layers = "{s}+{w}", source = "own" } ]
"#;

    fn b() -> Builtins {
        Builtins {
            n_layer: 16,
            ..Default::default()
        }
    }

    #[test]
    fn sweeps_expand_in_key_order_with_windows() {
        let s = Spec::parse(MINI, "t.toml").unwrap();
        let c = s.expand(&b(), &BTreeMap::new()).unwrap();
        let ids: Vec<_> = c.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(
            ids,
            ["E[s=10,w=2]", "E[s=10,w=4]", "E[s=12,w=2]", "E[s=12,w=4]"]
        );
        assert_eq!(c[1].interventions[0].layers, vec![10, 11, 12, 13]);
        // 12+4 = 12..15 fits 16 layers; the window text is compact.
        assert_eq!(c[3].interventions[0].layers_text(), "12-15");
    }

    #[test]
    fn errors_name_the_field() {
        let e = |src: &str| Spec::parse(src, "t.toml").unwrap_err().to_string();
        assert!(e(&MINI.replace("name = \"t\"", "name = \"t\"\nbogus = 1"))
            .contains("unknown field `bogus`"));
        assert!(e(&MINI.replace("prompts = \"h\"", "prompts = \"x\""))
            .contains("experiment E: prompts: no prompt set 'x'"));
        assert!(e(&format!(
            "{MINI}\n[[experiment]]\nid = \"E\"\nprompts = \"h\"\n"
        ))
        .contains("duplicate id 'E'"));
        assert!(e(&MINI.replace("seed = 1", "seed = \"x\"")).contains("line"));
        let s = Spec::parse(&MINI.replace("{s}+{w}", "{s}+{w}0"), "t.toml").unwrap();
        let x = s.expand(&b(), &BTreeMap::new()).unwrap_err().to_string();
        assert!(
            x.contains("E[s=10,w=2]: intervention 1: layers") && x.contains("out of range"),
            "{x}"
        );
        let s = Spec::parse(&MINI.replace("{s}+{w}", "{steer_layer}"), "t.toml").unwrap();
        let x = s.expand(&b(), &BTreeMap::new()).unwrap_err().to_string();
        assert!(
            x.contains("unknown variable {steer_layer} (needs a [steer] table)"),
            "{x}"
        );
        let s = Spec::parse(
            &MINI.replace("source = \"own\"", "coefficient = nan"),
            "t.toml",
        )
        .unwrap();
        assert!(s
            .expand(&b(), &BTreeMap::new())
            .unwrap_err()
            .to_string()
            .contains("not finite"));
    }

    #[test]
    fn exact_template_keeps_the_type() {
        let vars = vec![("c".to_string(), toml::Value::Float(0.5))];
        let t: toml::Value = toml::from_str("x = \"{c}\"\ny = \"a{c}b\"").unwrap();
        let ctx = expand::Ctx {
            id: "ctx",
            intervention: 1,
        };
        let r = substitute(&t, &vars, &b(), ctx).unwrap();
        assert_eq!(r.get("x"), Some(&toml::Value::Float(0.5)));
        assert_eq!(r.get("y").and_then(|v| v.as_str()), Some("a0.5b"));
    }

    #[test]
    fn template_arithmetic() {
        let vars = vec![
            ("after".to_string(), toml::Value::Integer(2)),
            ("width".to_string(), toml::Value::String("tail".into())),
            ("c".to_string(), toml::Value::Float(0.5)),
            ("a-b".to_string(), toml::Value::Integer(7)),
        ];
        let b = Builtins {
            n_layer: 24,
            steer_layer: Some(12),
            steer_coef: Some(4.0),
            refusal_layer: None,
        };
        let ctx = expand::Ctx {
            id: "E3[x]",
            intervention: 2,
        };
        let sub = |t: &str| {
            let v = toml::Value::String(t.to_string());
            substitute(&v, &vars, &b, ctx)
        };
        let ok = |t: &str| sub(t).unwrap();
        let int = toml::Value::Integer;
        assert_eq!(ok("{steer_layer + after}"), int(14));
        assert_eq!(ok("{steer_layer+after}"), int(14));
        assert_eq!(ok("{ last_layer - after - 1 }"), int(20));
        assert_eq!(ok("{n_layer - steer_layer + 3}"), int(15));
        assert_eq!(ok("{-1 + after}"), int(1));
        assert_eq!(ok("{after - 5}"), int(-3));
        // A name that is itself a variable stays that variable.
        assert_eq!(ok("{a-b}"), int(7));
        assert_eq!(ok("{after}"), int(2));
        let s = |t: &str| ok(t).as_str().map(str::to_string);
        assert_eq!(
            s("{steer_layer + after}+{width}").as_deref(),
            Some("14+tail")
        );
        assert_eq!(
            s("{steer_layer + 1}-{last_layer}").as_deref(),
            Some("13-23")
        );
        // The result lands in a layer list as usual.
        let v = toml::Value::String(s("{steer_layer + after}+{width}").unwrap());
        assert_eq!(
            crate::hooks::LayerSet::from_toml(&v, 24)
                .unwrap()
                .as_slice(),
            (14..24).collect::<Vec<_>>()
        );
        let err = |t: &str| sub(t).unwrap_err().to_string();
        assert_eq!(
            err("{steer_layer + steer_coef}"),
            "E3[x]: intervention 2: {steer_layer + steer_coef}: term 'steer_coef' is 4.0, not an integer"
        );
        assert_eq!(
            err("{width + 1}"),
            "E3[x]: intervention 2: {width + 1}: term 'width' is \"tail\", not an integer"
        );
        assert_eq!(
            err("{c-1}"),
            "E3[x]: intervention 2: {c-1}: term 'c' is 0.5, not an integer"
        );
        assert!(err("{steer_layer + aftr}").contains("unknown variable {aftr}; known: after"));
        assert!(err("{after + }").contains("{after + }: a term is missing"));
        assert!(err("{after ++ 1}").contains("a term is missing"));
        assert!(err("{after + 9223372036854775807}").contains("overflows"));
        let none = Builtins {
            n_layer: 24,
            ..Default::default()
        };
        let v = toml::Value::String("{steer_layer + 1}".into());
        let x = substitute(&v, &vars, &none, ctx).unwrap_err().to_string();
        assert!(
            x.contains("unknown variable {steer_layer} (needs a [steer] table)"),
            "{x}"
        );
    }
}
