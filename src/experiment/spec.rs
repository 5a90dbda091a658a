//! The experiment spec: a TOML file that says which prompts, which directions, and which grid
//! of conditions to run. Grids are data: an experiment's `sweep` table expands its
//! intervention templates over every combination of values, so the paper's E0–E3 are one
//! file (see [`super::preset`]), not code paths.
//!
//! Parsing is strict (unknown keys are errors) and errors name the field:
//! `experiment E3 [start=18,width=4]: intervention 2: layers: layer 30 out of range (24 layers)`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

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
}

impl Default for GenerationSpec {
    fn default() -> Self {
        GenerationSpec {
            max_new_tokens: d_max_new(),
            min_tokens: d_min_tokens(),
            early_stop: true,
        }
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
    /// A direction file from `extract` (safetensors) or a control-vector GGUF.
    File {
        path: String,
        #[serde(default)]
        name: Option<String>,
        /// For a refusal direction from a file: the layer `{refusal_layer}` names.
        #[serde(default)]
        refusal_layer: Option<usize>,
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
    /// `steer_coef`, `refusal_layer`, `n_layer`, `last_layer`).
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
    /// An int, a list, or a string: `all`, `12`, `3,5`, `20-23`, `S+W` (W layers from S).
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
    /// `E3[source=own,start=18,width=4]`, unique in the plan.
    pub id: String,
    pub experiment: String,
    pub prompts: String,
    /// Sweep variable values, in key order.
    pub vars: Vec<(String, toml::Value)>,
    pub interventions: Vec<Intervention>,
}

impl Condition {
    /// `start=18;width=4`.
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

/// Values known when expanding the grid besides the sweep variables.
#[derive(Debug, Clone, Default)]
pub struct Builtins {
    pub n_layer: usize,
    pub steer_layer: Option<usize>,
    pub steer_coef: Option<f64>,
    pub refusal_layer: Option<usize>,
}

impl Builtins {
    fn get(&self, k: &str) -> Option<toml::Value> {
        let int = |v: usize| toml::Value::Integer(v as i64);
        match k {
            "n_layer" => Some(int(self.n_layer)),
            "last_layer" => Some(int(self.n_layer.saturating_sub(1))),
            "steer_layer" => self.steer_layer.map(int),
            "steer_coef" => self.steer_coef.map(toml::Value::Float),
            "refusal_layer" => self.refusal_layer.map(int),
            _ => None,
        }
    }
}

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

fn err(ctx: &str, msg: impl fmt::Display) -> Error {
    Error::Invalid(format!("{ctx}: {msg}"))
}

impl Spec {
    /// Parses and checks what can be checked without a model: names refer to defined prompt
    /// sets and directions, ids are unique, sweeps are non-empty, values are finite.
    ///
    /// # Errors
    /// The TOML error (with its line) or the first failed check, naming the field.
    pub fn parse(src: &str, origin: &str) -> Result<Spec> {
        let mut spec: Spec = toml::from_str(src).map_err(|e| {
            let msg = e.message().to_string();
            // "line N: key: message", the key read from the offending line when it has one.
            let at = e
                .span()
                .map(|s| {
                    let n = src[..s.start].matches('\n').count() + 1;
                    let line = src.lines().nth(n - 1).unwrap_or("");
                    match line.split_once('=') {
                        Some((k, _)) if !line.trim_start().starts_with('[') => {
                            format!("line {n}: {}: ", k.trim())
                        }
                        _ => format!("line {n}: "),
                    }
                })
                .unwrap_or_default();
            Error::Invalid(format!("{origin}: {at}{msg}"))
        })?;
        spec.check(origin)?;
        spec.origin = origin.to_string();
        Ok(spec)
    }

    fn check(&self, origin: &str) -> Result<()> {
        let o = |f: &str| format!("{origin}: {f}");
        if let Some(why) = bad_file_name(&self.name) {
            return Err(err(
                &o("name"),
                format!(
                    "'{}' {why} (it names the default run directory runs/<model>/<name>)",
                    crate::text::shown(&self.name)
                ),
            ));
        }
        if self.group_size == 0 {
            return Err(err(&o("group_size"), "must be at least 1"));
        }
        if self.generation.max_new_tokens == 0 && self.metric == Metric::Generate {
            return Err(err(
                &o("generation.max_new_tokens"),
                "must be at least 1 (or use metric = \"score\")",
            ));
        }
        if self.prompts.is_empty() {
            return Err(err(&o("prompts"), "no prompt sets defined"));
        }
        for name in self.directions.keys() {
            if let Some(why) = bad_file_name(name) {
                return Err(err(
                    &o(&format!("directions.{}", crate::text::shown(name))),
                    format!("the name {why} (it names plot files)"),
                ));
            }
        }
        for (k, p) in &self.prompts {
            if let Some([a, b]) = p.range {
                if b <= a {
                    return Err(err(
                        &o(&format!("prompts.{k}.range")),
                        format!("[{a}, {b}) is empty"),
                    ));
                }
            }
            if p.n == Some(0) {
                return Err(err(&o(&format!("prompts.{k}.n")), "must be at least 1"));
            }
        }
        let set = |f: &str, name: &str| -> Result<()> {
            if self.prompts.contains_key(name) {
                Ok(())
            } else {
                Err(err(
                    &o(f),
                    format!(
                        "no prompt set '{name}' (defined: {})",
                        self.prompts.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ))
            }
        };
        let dir = |f: &str, name: &str| -> Result<()> {
            if self.directions.contains_key(name) {
                Ok(())
            } else {
                Err(err(
                    &o(f),
                    format!(
                        "no direction '{name}' (defined: {})",
                        self.directions
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ))
            }
        };
        let mut refusal_defined = false;
        for (k, d) in &self.directions {
            let f = format!("directions.{k}");
            match d {
                DirectionSpec::Refusal {
                    harmful,
                    harmless,
                    select,
                    layer,
                } => {
                    set(&format!("{f}.harmful"), harmful)?;
                    set(&format!("{f}.harmless"), harmless)?;
                    if let Some(s) = select {
                        set(&format!("{f}.select.harmful"), &s.harmful)?;
                        set(&format!("{f}.select.harmless"), &s.harmless)?;
                        if layer.is_some() {
                            return Err(err(&o(&f), "give select or layer, not both"));
                        }
                    }
                    if select.is_some() || layer.is_some() {
                        if refusal_defined {
                            return Err(err(
                                &o(&f),
                                "only one refusal direction may define {refusal_layer}",
                            ));
                        }
                        refusal_defined = true;
                    }
                }
                DirectionSpec::Persona { questions, .. } => {
                    set(&format!("{f}.questions"), questions)?
                }
                DirectionSpec::Random { like, .. } => {
                    if let Some(l) = like {
                        dir(&format!("{f}.like"), l)?;
                        if matches!(self.directions.get(l), Some(DirectionSpec::Random { .. })) {
                            return Err(err(
                                &o(&format!("{f}.like")),
                                "cannot be another random direction",
                            ));
                        }
                    }
                }
                DirectionSpec::File { refusal_layer, .. } => {
                    if refusal_layer.is_some() {
                        if refusal_defined {
                            return Err(err(
                                &o(&f),
                                "only one direction may define {refusal_layer}",
                            ));
                        }
                        refusal_defined = true;
                    }
                }
            }
        }
        if let Some(s) = &self.steer {
            dir("steer.direction", &s.direction)?;
            set("steer.prompts", &s.prompts)?;
            if s.coefficients.is_empty() || s.coefficients.iter().any(|c| !c.is_finite()) {
                return Err(err(
                    &o("steer.coefficients"),
                    "need at least one finite value",
                ));
            }
            if !s.target.is_finite() {
                return Err(err(&o("steer.target"), "must be finite"));
            }
        }
        if let Some(j) = &self.judge {
            if j.kinds.is_empty() {
                return Err(err(
                    &o("judge.kinds"),
                    "list at least one of strongreject, llamaguard",
                ));
            }
            for k in &j.kinds {
                k.parse::<crate::judge::JudgeKind>()
                    .map_err(|e| err(&o("judge.kinds"), e))?;
            }
        }
        if self.experiment.is_empty() {
            return Err(err(&o("experiment"), "no experiments defined"));
        }
        let mut ids = BTreeSet::new();
        let mut total = 0usize;
        for e in &self.experiment {
            let f = format!("experiment {}", e.id);
            // A sweep's grid is the product of its value lists: a typo can make it huge.
            let n = e
                .sweep
                .values()
                .fold(1usize, |a, v| a.saturating_mul(v.len()));
            total = total.saturating_add(n);
            if total > MAX_CONDITIONS {
                return Err(err(&o(&format!("{f}: sweep")), format!("the grid reaches more than {MAX_CONDITIONS} conditions; split it into several specs")));
            }
            if let Some(why) = bad_file_name(&e.id) {
                return Err(err(
                    &o("experiment.id"),
                    format!(
                        "'{}' {why} (it names plots/<id>.svg)",
                        crate::text::shown(&e.id)
                    ),
                ));
            }
            if !ids.insert(e.id.clone()) {
                return Err(err(&o("experiment.id"), format!("duplicate id '{}'", e.id)));
            }
            set(&format!("{f}: prompts"), &e.prompts)?;
            for (k, v) in &e.sweep {
                if v.is_empty() {
                    return Err(err(&o(&format!("{f}: sweep.{k}")), "has no values"));
                }
                if BUILTIN_VARS.contains(&k.as_str()) {
                    return Err(err(
                        &o(&format!("{f}: sweep.{k}")),
                        "is a built-in variable name",
                    ));
                }
                for x in v {
                    match x {
                        toml::Value::Float(f) if !f.is_finite() => {
                            return Err(err(
                                &o(&format!("{f}: sweep.{k}")),
                                format!("{x} is not finite"),
                            ))
                        }
                        toml::Value::Integer(_)
                        | toml::Value::Float(_)
                        | toml::Value::String(_) => {}
                        _ => {
                            return Err(err(
                                &o(&format!("{f}: sweep.{k}")),
                                format!("{x} is not a number or string"),
                            ))
                        }
                    }
                }
            }
            for (i, t) in e.intervention.iter().enumerate() {
                if !t.is_table() {
                    return Err(err(
                        &o(&format!("{f}: intervention {}", i + 1)),
                        "must be a table",
                    ));
                }
            }
            if let Some(p) = &e.plot {
                if !e.sweep.contains_key(&p.x) {
                    return Err(err(
                        &o(&format!("{f}: plot.x")),
                        format!("'{}' is not a sweep variable", p.x),
                    ));
                }
                for s in &p.series {
                    if !e.sweep.contains_key(s) {
                        return Err(err(
                            &o(&format!("{f}: plot.series")),
                            format!("'{s}' is not a sweep variable"),
                        ));
                    }
                }
                for r in p.band.iter().chain(&p.reference) {
                    if !self.experiment.iter().any(|x| &x.id == r) {
                        return Err(err(
                            &o(&format!("{f}: plot")),
                            format!("no experiment '{r}'"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether any coefficient is relative to the residual norm (which then gets measured).
    pub fn uses_scale_resid(&self) -> bool {
        self.experiment.iter().any(|e| {
            e.intervention
                .iter()
                .any(|t| t.get("scale").and_then(toml::Value::as_str) == Some("resid"))
        }) || self.steer.as_ref().is_some_and(|s| s.scale == Scale::Resid)
    }

    /// Expands every experiment's sweep into conditions, resolving templates with `b`.
    /// `prompt_ids[set]` lists each set's prompt ids, to check scopes.
    ///
    /// # Errors
    /// Unknown variables, bad fields, layers out of range, duplicate condition ids.
    pub fn expand(
        &self,
        b: &Builtins,
        prompt_ids: &BTreeMap<String, Vec<String>>,
    ) -> Result<Vec<Condition>> {
        self.expand_inner(b, prompt_ids)
            .map_err(|e| self.located(e))
    }

    /// Prefixes an error with where the spec came from.
    pub fn located(&self, e: Error) -> Error {
        if self.origin.is_empty() {
            e
        } else {
            Error::Invalid(format!("{}: {e}", self.origin))
        }
    }

    fn expand_inner(
        &self,
        b: &Builtins,
        prompt_ids: &BTreeMap<String, Vec<String>>,
    ) -> Result<Vec<Condition>> {
        let mut out: Vec<Condition> = Vec::new();
        let mut seen = BTreeSet::new();
        for e in &self.experiment {
            let keys: Vec<&String> = e.sweep.keys().collect();
            let mut idx = vec![0usize; keys.len()];
            loop {
                let vars: Vec<(String, toml::Value)> = keys
                    .iter()
                    .zip(&idx)
                    .map(|(k, &i)| ((*k).clone(), e.sweep[*k][i].clone()))
                    .collect();
                let id = if vars.is_empty() {
                    e.id.clone()
                } else {
                    format!(
                        "{}[{}]",
                        e.id,
                        vars.iter()
                            .map(|(k, v)| format!("{k}={}", value_text(v)))
                            .collect::<Vec<_>>()
                            .join(",")
                    )
                };
                if !seen.insert(id.clone()) {
                    return Err(err(
                        &id,
                        "duplicate condition id (two sweep values print the same)",
                    ));
                }
                let mut ivs = Vec::new();
                for (i, t) in e.intervention.iter().enumerate() {
                    let ctx = format!("{id}: intervention {}", i + 1);
                    let t = substitute(t, &vars, b, &ctx)?;
                    let iv: InterventionSpec = t
                        .try_into()
                        .map_err(|x: toml::de::Error| err(&ctx, x.message()))?;
                    ivs.push(self.resolve(iv, b, &ctx, prompt_ids.get(&e.prompts))?);
                }
                out.push(Condition {
                    id,
                    experiment: e.id.clone(),
                    prompts: e.prompts.clone(),
                    vars,
                    interventions: ivs,
                });
                // Odometer over the sweep, last key fastest.
                let mut k = keys.len();
                let mut wrapped = true;
                while k > 0 {
                    k -= 1;
                    idx[k] += 1;
                    if idx[k] < e.sweep[keys[k]].len() {
                        wrapped = false;
                        break;
                    }
                    idx[k] = 0;
                }
                if wrapped {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn resolve(
        &self,
        s: InterventionSpec,
        b: &Builtins,
        ctx: &str,
        ids: Option<&Vec<String>>,
    ) -> Result<Intervention> {
        if !self.directions.contains_key(&s.direction) {
            return Err(err(
                &format!("{ctx}: direction"),
                format!(
                    "no direction '{}' (defined: {})",
                    s.direction,
                    self.directions
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let nl = b.n_layer;
        let layers = LayerSet::from_toml(&s.layers, nl)
            .map_err(|e| err(&format!("{ctx}: layers"), e))?
            .into_vec();
        if layers.is_empty() {
            return Err(err(&format!("{ctx}: layers"), "empty"));
        }
        let coefficient = match &s.coefficient {
            toml::Value::Integer(i) => *i as f64,
            toml::Value::Float(f) => *f,
            toml::Value::String(t) => t.trim().parse::<f64>().map_err(|_| {
                err(
                    &format!("{ctx}: coefficient"),
                    format!("'{t}' is not a number"),
                )
            })?,
            other => {
                return Err(err(
                    &format!("{ctx}: coefficient"),
                    format!("{other} is not a number"),
                ))
            }
        };
        if !coefficient.is_finite() {
            return Err(err(
                &format!("{ctx}: coefficient"),
                format!("{coefficient} is not finite"),
            ));
        }
        let source = match &s.source {
            None => Source::Own,
            Some(toml::Value::String(t)) if t == "own" => Source::Own,
            Some(toml::Value::String(t)) if t == "steer" => match b.steer_layer {
                Some(l) => Source::Layer(l),
                None => {
                    return Err(err(
                        &format!("{ctx}: source"),
                        "\"steer\" needs a [steer] table",
                    ))
                }
            },
            Some(v) => {
                let l = match v {
                    toml::Value::Integer(i) => Some(*i),
                    toml::Value::String(t) => t.trim().parse::<i64>().ok(),
                    _ => None,
                };
                match l {
                    Some(l) if l >= 0 && (l as usize) < nl => Source::Layer(l as usize),
                    Some(l) => {
                        return Err(err(
                            &format!("{ctx}: source"),
                            format!("layer {l} out of range ({nl} layers)"),
                        ))
                    }
                    None => {
                        return Err(err(
                            &format!("{ctx}: source"),
                            format!("{v} is neither \"own\" nor a layer number"),
                        ))
                    }
                }
            }
        };
        if let (Some(sc), Some(ids)) = (&s.scope, ids) {
            if sc.is_empty() {
                return Err(err(
                    &format!("{ctx}: scope"),
                    "empty list (omit it for all prompts)",
                ));
            }
            for p in sc {
                if !ids.contains(p) {
                    return Err(err(
                        &format!("{ctx}: scope"),
                        format!("no prompt '{p}' in the condition's prompt set"),
                    ));
                }
            }
        }
        Ok(Intervention {
            direction: s.direction,
            op: s.op,
            layers,
            coefficient,
            scale: s.scale,
            source,
            scope: s.scope,
        })
    }
}

/// Replaces `{var}` in every string of a template: a string that is exactly `{var}` takes the
/// variable's value and type, otherwise the text is spliced in.
fn substitute(
    t: &toml::Value,
    vars: &[(String, toml::Value)],
    b: &Builtins,
    ctx: &str,
) -> Result<toml::Value> {
    let lookup = |k: &str| -> Result<toml::Value> {
        if let Some((_, v)) = vars.iter().find(|(n, _)| n == k) {
            return Ok(v.clone());
        }
        b.get(k).ok_or_else(|| {
            let known: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
            let why = match k {
                "steer_layer" | "steer_coef" => " (needs a [steer] table)",
                "refusal_layer" => " (needs a refusal direction with select or layer)",
                _ => "",
            };
            err(
                ctx,
                format!(
                    "unknown variable {{{k}}}{why}; known: {} n_layer last_layer steer_layer steer_coef refusal_layer",
                    known.join(" ")
                ),
            )
        })
    };
    Ok(match t {
        toml::Value::String(s) => {
            if let Some(k) = s.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
                if !k.contains(['{', '}']) {
                    return lookup(k);
                }
            }
            let mut out = String::new();
            let mut rest = s.as_str();
            while let Some(i) = rest.find('{') {
                out.push_str(&rest[..i]);
                let Some(j) = rest[i..].find('}') else {
                    return Err(err(ctx, format!("unclosed '{{' in '{s}'")));
                };
                out.push_str(&value_text(&lookup(&rest[i + 1..i + j])?));
                rest = &rest[i + j + 1..];
            }
            out.push_str(rest);
            toml::Value::String(out)
        }
        toml::Value::Array(a) => toml::Value::Array(
            a.iter()
                .map(|x| substitute(x, vars, b, ctx))
                .collect::<Result<_>>()?,
        ),
        toml::Value::Table(m) => toml::Value::Table(
            m.iter()
                .map(|(k, x)| Ok((k.clone(), substitute(x, vars, b, ctx)?)))
                .collect::<Result<_>>()?,
        ),
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
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
        let r = substitute(&t, &vars, &b(), "ctx").unwrap();
        assert_eq!(r.get("x"), Some(&toml::Value::Float(0.5)));
        assert_eq!(r.get("y").and_then(|v| v.as_str()), Some("a0.5b"));
    }
}
