//! The library's error type. Each variant carries what a user needs to fix the input: the
//! file, the field or layer, and the reason. The binary prints it on one line.
//!
//! The typed variants hold the values their message is made of (a layer and the model's
//! layer count, a flag and its range, a tensor and what is wrong with it, a file and the line
//! in it), so a caller can tell the cases apart and a test can check the values, while the
//! printed text stays the one line the binary shows. None of them has a `source`: the binary
//! prints the whole error chain, and a source would repeat the cause.

use std::fmt;
use std::path::PathBuf;

use crate::ffi::FfiError;
use crate::gguf::GgufError;
use crate::text::shown;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The cause is shown in the message and is not also a `source`: the binary prints the
    // whole error chain on one line, and a source would repeat it ("x: No space …: No space …").
    #[error("{}: {err}", .path.display())]
    Gguf { path: PathBuf, err: GgufError },
    #[error("{}: {msg}", .path.display())]
    File { path: PathBuf, msg: String },
    #[error("{}: {err}", .path.display())]
    Io { path: PathBuf, err: std::io::Error },
    /// An error in the contents of the file `path` (a record, a tensor, a value in it).
    #[error("{}: {err}", .path.display())]
    In { path: PathBuf, err: Box<Error> },
    #[error(transparent)]
    Ffi(#[from] FfiError),
    #[error("chat template: {0}")]
    Template(String),
    #[error("model '{arch}': {msg}")]
    Arch { arch: String, msg: String },
    /// Writing a report to stdout (or another stream) failed; the cause is the source, so a
    /// closed pipe can be told apart.
    #[error("writing output")]
    Output(#[source] std::io::Error),
    /// The server could not start or run (bind, runtime, engine thread).
    #[error("serve: {0}")]
    Serve(String),

    /// A layer outside the model's `n_layer` layers (or outside llama.cpp's control-vector
    /// slots, 1 to `n_layer - 1`), and what the layer was for.
    #[error(fmt = fmt_layer)]
    Layer {
        layer: usize,
        n_layer: usize,
        of: LayerOf,
    },
    /// A layer list (`--layers`, the spec's `layers`) that does not parse: the list as given
    /// and the part that is wrong.
    #[error(fmt = fmt_layers)]
    Layers {
        list: String,
        problem: LayersProblem,
    },
    /// A name that is none of the `known` ones; `name: None` when several are known and a
    /// name is needed to choose.
    #[error(fmt = fmt_unknown)]
    Unknown {
        what: Named,
        name: Option<String>,
        known: Vec<String>,
    },
    /// A flag (or parameter) whose value is out of range or at odds with another flag.
    /// `flag` names it as the user types it (`--threads`); `value` is shown as given.
    #[error(fmt = fmt_flag)]
    Flag {
        flag: String,
        value: Option<String>,
        problem: FlagProblem,
    },
    /// A size (`8G`, `512MiB`) that does not parse.
    #[error(fmt = fmt_size)]
    Size { text: String, problem: SizeProblem },
    /// An input that must not be empty.
    #[error("{0}")]
    Empty(Empty),
    /// A size that must match another: `got`, where `want` is what it must be.
    #[error(fmt = fmt_shape)]
    Shape {
        what: Shaped,
        got: usize,
        want: usize,
    },
    /// Two named `[n_layer, n_embd]` matrices (directions, tensors) whose shapes differ.
    #[error(fmt = fmt_shapes)]
    Shapes {
        what: ShapesOf,
        a: String,
        a_shape: [usize; 2],
        b: String,
        b_shape: [usize; 2],
    },
    /// Directions made for another architecture than the model's.
    #[error("directions are for arch '{}', the model is '{model}'", shown(.directions))]
    ArchMismatch { directions: String, model: String },
    /// A value at a layer that cannot be used (non-finite, zero norm, overflowing).
    #[error(fmt = fmt_value)]
    Value {
        what: ValueOf,
        layer: usize,
        value: f64,
    },
    /// A tensor of a direction file or control vector, by name, and what is wrong with it.
    #[error(fmt = fmt_tensor)]
    Tensor {
        tensor: String,
        problem: TensorProblem,
    },
    /// A direction file of another tool that cannot be imported as given: why (wrapped in
    /// [`Error::In`] naming the file).
    #[error("{0}")]
    Import(ImportProblem),
    /// An imported direction file that does not fit the model (boxed: it holds several
    /// strings, and every `Result` carries the largest variant).
    #[error("{0}")]
    ImportFit(Box<Misfit>),
    /// A record of an input that does not parse: where in the input (a line, an element,
    /// a CSV record) and why. Wrapped in [`Error::In`] when the input is a file.
    #[error(fmt = fmt_record)]
    Record { at: At, reason: String },
    /// GGUF bytes that do not parse (not read from a file; see [`Error::Gguf`]).
    #[error("{0}")]
    GgufData(GgufError),
    /// A TOML input (`origin`: a file or "built-in personas"), the `[table]` at fault when
    /// there is one, the line when the parser gave one, and why.
    #[error(fmt = fmt_toml)]
    Toml {
        origin: String,
        table: Option<String>,
        line: Option<usize>,
        reason: String,
    },
    /// A judge template file (`origin`) that does not parse.
    #[error("judge template {origin}: {problem}")]
    JudgeTemplate {
        origin: String,
        problem: TemplateProblem,
    },
    /// A sample of `n` prompts from a set of `have`.
    #[error("n = {n} but the set has {have} prompts")]
    Sample { n: usize, have: usize },
    /// A run that cannot go on: the engine, a hook or the machine.
    #[error("{0}")]
    Run(RunError),
    /// A spec field that fails a check made without a model: the spec's origin (its file,
    /// or the built-in spec's name), the field as the user reads it (`group_size`,
    /// `experiment E: sweep.x`) and why.
    #[error("{origin}: {field}: {problem}")]
    Spec {
        origin: String,
        field: String,
        problem: String,
    },
    /// A spec whose TOML does not parse: the line (from 1) and the key on it, when known.
    #[error(fmt = fmt_spec_toml)]
    SpecToml {
        origin: String,
        line: Option<usize>,
        key: Option<String>,
        reason: String,
    },
    /// An error in a spec, after the spec's origin.
    #[error("{origin}: {err}")]
    Located { origin: String, err: Box<Error> },
    /// An error in a field of a spec (`prompts.harmful`, `steer.layers`), after the field.
    #[error("{field}: {err}")]
    Field { field: String, err: Box<Error> },
    /// An error in the condition `id` of an experiment, after its id.
    #[error("{id}: {err}")]
    InCondition { id: String, err: Box<Error> },
    /// A condition that does not expand: its id, the intervention (from 1) and its field
    /// when the problem is in one, and why.
    #[error(fmt = fmt_condition)]
    Condition {
        id: String,
        intervention: Option<usize>,
        field: Option<String>,
        problem: String,
    },
    /// An intervention of condition `id` that cannot act on `layer` (`at`: its hook point,
    /// as shown), for the direction `direction`.
    #[error(fmt = fmt_intervention)]
    Intervention {
        id: String,
        direction: String,
        layer: usize,
        at: String,
        fault: InterventionFault,
    },
    /// A prompt set of a spec (`set`, read `from` a source) that has too few prompts.
    #[error(fmt = fmt_prompts)]
    Prompts {
        set: String,
        from: String,
        problem: PromptsProblem,
    },
    /// `--shard` as given (`text`) that is not `K/N` with 1 ≤ K ≤ N.
    #[error("--shard '{text}': expected K/N with 1 <= K <= N, e.g. 2/4")]
    Shard { text: String, problem: ShardProblem },
    /// Run directories that cannot be merged.
    #[error("{0}")]
    Merge(MergeProblem),
    /// Two runs (`a`, `b`) that share too few conditions (`shared`) to compare judges.
    #[error("agreement: {} and {} share {shared} conditions; need at least 3", .a.display(), .b.display())]
    Agreement {
        a: PathBuf,
        b: PathBuf,
        shared: usize,
    },
    /// Serializing `what` (`plan`, `manifest`, …) to JSON failed.
    #[error("{what}: {reason}")]
    Json { what: String, reason: String },
    /// Writing a CSV into memory failed.
    #[error("csv: {0}")]
    Csv(csv::Error),
    /// Flushing a CSV written into memory failed.
    #[error("{0}")]
    CsvBuffer(std::io::Error),
}

/// What a layer of [`Error::Layer`] is for; it decides the range and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerOf {
    /// A layer of a layer list, quoted as given (a window `S+W` as the range it stands for).
    List(String),
    /// A hook's layer.
    Hook,
    /// A layer of an exported control vector (1 to `n_layer - 1`).
    CvecExport,
    /// A layer of llama.cpp's native control vector (1 to `n_layer - 1`).
    ControlVector,
    /// The `layer` of a spec's refusal direction.
    Refusal,
}

/// What is wrong with a layer list ([`Error::Layers`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayersProblem {
    /// `S+W` where S or W is not an integer.
    NotWindow,
    /// `S+W` with W ≤ 0.
    EmptyWindow,
    /// A part that is not a layer number.
    NotNumber(String),
    /// A negative layer.
    Negative(i64),
    /// A range `A-B` with B < A.
    Reversed { from: usize, to: usize },
    /// A spec value (shown as TOML) in a list that is not an integer.
    NotLayerValue,
    /// A spec value (shown as TOML) that is neither an integer, a list nor a string.
    NotListValue,
}

/// What kind of name [`Error::Unknown`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Named {
    HookSite,
    HookPoint,
    PromptSet,
    JudgeKind,
    QuantType,
    Direction,
    /// A persona of a personas file (the list shown as it is, not escaped).
    Persona,
}

/// Why a flag's value is refused ([`Error::Flag`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlagProblem {
    /// Outside `lo` to `hi` (as shown, e.g. `16 MiB`).
    Range { lo: String, hi: String },
    /// Another condition, in words ("is too small (at least 8 tokens per decode call)").
    Other(String),
}

/// Why a size does not parse ([`Error::Size`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeProblem {
    NotSize,
    Unit(String),
    NotPositive,
}

/// Which input is empty ([`Error::Empty`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Empty {
    /// The harmful or harmless set of a refusal direction.
    RefusalSets,
    /// The questions of a persona direction.
    PersonaQuestions,
    /// The harmful or harmless validation set of a selection.
    SelectionSets,
    /// The layers to rank.
    RankLayers,
    /// The directions to save.
    Directions,
    /// The layers to export as a control vector.
    ExportLayers,
    /// `--types` of quantize.
    QuantTypes,
    /// A prompt of a batch, by index.
    Prompt(usize),
    /// The spec's `steer.layers`.
    SteerLayers,
}

impl fmt::Display for Empty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Empty::RefusalSets => f.write_str(
                "refusal direction: the harmful and harmless sets must both be non-empty",
            ),
            Empty::PersonaQuestions => f.write_str("persona direction: the question set is empty"),
            Empty::SelectionSets => {
                f.write_str("selection needs non-empty harmful and harmless validation sets")
            }
            Empty::RankLayers => f.write_str("no layers to rank"),
            Empty::Directions => f.write_str("no directions to save"),
            Empty::ExportLayers => f.write_str("no layers to export"),
            Empty::QuantTypes => f.write_str("--types: no types given"),
            Empty::Prompt(i) => write!(f, "prompt {i} is empty"),
            Empty::SteerLayers => f.write_str("steer.layers: empty"),
        }
    }
}

/// Which size [`Error::Shape`] compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shaped {
    /// A hook's vector against the model's n_embd.
    HookVector,
    /// A native control vector's row at `layer` against the model's n_embd.
    ControlVector { layer: usize },
    /// A direction file's n_embd against the model's.
    DirectionsEmbd,
    /// A direction file's layer count against the model's.
    DirectionsLayers,
}

/// Why two shapes must agree ([`Error::Shapes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShapesOf {
    /// Comparing direction `a` with `b` layer by layer.
    Compare,
    /// Saving direction `a` in one file with `b` (the first).
    Save,
    /// Tensors `a` and `b` (the first) of one direction file.
    Tensors,
}

/// What the value of [`Error::Value`] is.
#[derive(Debug, Clone, PartialEq)]
pub enum ValueOf {
    /// The norm of a direction to project out.
    Projection,
    /// A non-finite value of direction `0`, which is not written.
    Saved(String),
    /// A non-finite value of direction `0`, read from a file.
    Loaded(String),
    /// The norm of direction `0`, which makes its cosine undefined.
    CosineNorm(String),
    /// A non-finite value of the direction extracted as `0` ("refusal direction", …).
    NonFinite(String),
    /// A value of direction `name` that overflows f32 times `coefficient`.
    Overflow { name: String, coefficient: f32 },
    /// Direction `0` is zero at the layer (value 0).
    Zero(String),
    /// A non-finite value of the spec's direction `0`, prepared for a run.
    Prepared(String),
    /// A non-finite mean refusal score of the steering calibration at `coefficient`.
    CalibrationScore { coefficient: f64 },
}

/// What is wrong with a tensor ([`Error::Tensor`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorProblem {
    NoDtype,
    /// Its dtype, which is not a float type.
    Dtype(String),
    BadShape,
    /// A shape that is not `[n_layer, n_embd]`.
    Shape(Vec<u64>),
    BadOffsets,
    /// `start..end` do not hold `shape` in the `data` bytes of the file.
    Offsets {
        start: u64,
        end: u64,
        shape: Vec<u64>,
        data: usize,
    },
    /// A control-vector tensor not named `direction.<layer>`.
    NotDirection,
    /// A control-vector tensor for layer 0.
    Layer0,
    /// A control-vector tensor for a layer at or above `max`.
    Beyond {
        layer: usize,
        max: usize,
    },
    /// A control-vector tensor that is not one F32 row.
    NotF32Row,
    /// `got` elements where the other tensors have `want`.
    Elements {
        got: usize,
        want: usize,
    },
    /// Its data runs past the end of the file.
    PastEnd,
}

/// An imported file (`file`, `shape` read as `convention`) that does not fit the model
/// ([`Error::ImportFit`]): what the file amounts to (`gives`), the model's sizes, and a hint
/// when the shape would fit another convention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Misfit {
    pub file: String,
    pub shape: String,
    pub convention: String,
    pub gives: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub hint: Option<String>,
}

impl fmt::Display for Misfit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: shape {} read as {} is {}, but the model has n_layer {}, n_embd {}",
            shown(&self.file),
            self.shape,
            self.convention,
            self.gives,
            self.n_layer,
            self.n_embd
        )?;
        if let Some(h) = &self.hint {
            write!(f, "; {h}")?;
        }
        Ok(())
    }
}

/// Why a direction file of another tool cannot be imported ([`Error::Import`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportProblem {
    /// No persona-gate metadata and no stated convention; `format` as detected.
    NoConvention { format: String },
    /// A convention or layer stated for a file that records its own hook point.
    Ours { stated: String },
    /// A control vector (llama.cpp's layer numbering) with another convention stated.
    ControlVector { stated: String },
    /// The convention given both in the path (`FILE:CONV`) and in the spec.
    StatedTwice,
    /// A path suffix `:CONV.L` whose layer is not a number.
    BadLayer { suffix: String },
    /// A 1-D vector of `width` values and no layer for it.
    NoLayer { width: usize },
    /// A layer stated for a tensor of `shape`, which has one row per layer already.
    LayerFor2d { shape: Vec<usize> },
    /// Layer 0 of a convention whose layer 0 is the embedding output.
    Embeddings { convention: String },
    /// A layer stated in the path or spec that differs from the one in `sidecar`.
    LayerConflict {
        stated: usize,
        sidecar: String,
        file_layer: usize,
    },
    /// Two file directions whose 1-D vectors have different layers, neither with an explicit
    /// `refusal_layer`: which is `{refusal_layer}` is not guessed.
    LayerDefault {
        layer: usize,
        other: String,
        other_layer: usize,
    },
    /// A tensor that is neither `[rows, n_embd]` nor `[n_embd]`.
    Rank { tensor: String, shape: Vec<usize> },
    /// hidden_states with fewer than two rows (it needs the embedding output and a layer).
    TooFewRows { tensor: String, rows: usize },
    /// A tensor of a dtype that is not floating point.
    NotFloat { tensor: String, dtype: String },
    /// More values than any direction file has.
    TooLarge { tensor: String, values: u128 },
    /// The torch.save pickle: where (byte offset) and why.
    Pickle { at: usize, why: String },
    /// The torch.save ZIP archive: why.
    Archive(String),
    /// No float tensors at all; `root` says what the file holds instead.
    NoTensors { root: String },
}

impl fmt::Display for ImportProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImportProblem::NoConvention { format } => write!(
                f,
                "a {format} file without persona-gate's hook_point metadata: say which residual stream its rows are, FILE:resid_post (row L after layer L, llama.cpp's l_out-L), FILE:hidden_states (Hugging Face output_hidden_states: row 0 the embeddings, row L+1 after layer L) or FILE:resid_pre (row L entering layer L), or convention = \"...\" in a spec"
            ),
            ImportProblem::Ours { stated } => write!(
                f,
                "records its own hook_point (resid_post); drop the stated '{stated}'"
            ),
            ImportProblem::ControlVector { stated } => write!(
                f,
                "a llama.cpp control vector (direction.L acts after layer L, resid_post); '{stated}' does not apply"
            ),
            ImportProblem::StatedTwice => f.write_str(
                "the path states a convention (FILE:CONVENTION) and the spec gives convention or layer too; keep one",
            ),
            ImportProblem::BadLayer { suffix } => {
                write!(f, "'{}': the layer after the dot is not a number", shown(suffix))
            }
            ImportProblem::NoLayer { width } => write!(
                f,
                "a 1-D vector [{width}] needs the layer it was taken at: FILE:CONVENTION.LAYER (e.g. :resid_pre.12), layer = N in a spec, or refusal_direction's direction_metadata.json beside it"
            ),
            ImportProblem::LayerFor2d { shape } => write!(
                f,
                "shape {shape:?} has a row per layer; a layer applies to 1-D vectors only"
            ),
            ImportProblem::Embeddings { convention } => write!(
                f,
                "{convention} layer 0 is the embedding output, before any decoder layer; no resid_post row holds it"
            ),
            ImportProblem::LayerConflict {
                stated,
                sidecar,
                file_layer,
            } => write!(
                f,
                "layer {stated} was stated but {sidecar} says layer {file_layer}"
            ),
            ImportProblem::LayerDefault {
                layer,
                other,
                other_layer,
            } => write!(
                f,
                "its 1-D vector is at layer {layer} and directions.{other}'s at {other_layer}; set refusal_layer to say which {{refusal_layer}} is"
            ),
            ImportProblem::Rank { tensor, shape } => write!(
                f,
                "tensor '{}': shape {shape:?}, expected [rows, n_embd] (a row per layer) or [n_embd] (one vector)",
                shown(tensor)
            ),
            ImportProblem::TooFewRows { tensor, rows } => write!(
                f,
                "tensor '{}': {rows} row(s) as hidden_states, which needs the embedding output and at least one layer",
                shown(tensor)
            ),
            ImportProblem::NotFloat { tensor, dtype } => write!(
                f,
                "tensor '{}': dtype {}, expected a float type (F32, F16, BF16, F64)",
                shown(tensor),
                shown(dtype)
            ),
            ImportProblem::TooLarge { tensor, values } => write!(
                f,
                "tensor '{}': {values} values, more than any direction file holds",
                shown(tensor)
            ),
            ImportProblem::Pickle { at, why } => {
                write!(f, "torch.save pickle, byte {at}: {why}")
            }
            ImportProblem::Archive(why) => write!(f, "torch.save archive: {why}"),
            ImportProblem::NoTensors { root } => {
                write!(f, "holds no float tensors (its root is {root})")
            }
        }
    }
}

/// Where in an input a [`Error::Record`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum At {
    /// The input as a whole.
    Whole,
    /// A line, from 1.
    Line(usize),
    /// An element of a JSON array, from 0.
    Element(usize),
    /// The header of a CSV file.
    CsvHeader,
    /// A CSV record, from 1.
    CsvRecord(usize),
    /// An instruction of a prompt set, from 1.
    Instruction(usize),
    /// A metadata entry of a direction file, by key.
    Metadata(String),
    /// A metadata entry of a direction file with its value.
    MetadataValue { key: String, value: String },
}

/// Why a judge template does not parse ([`Error::JudgeTemplate`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateProblem {
    UnknownSection(String),
    RepeatedSection(String),
    NoUser,
    /// The user section lacks `{{name}}`.
    NoPlaceholder(&'static str),
}

impl fmt::Display for TemplateProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateProblem::UnknownSection(n) => {
                write!(f, "unknown section '{n}' (system, user, assistant)")
            }
            TemplateProblem::RepeatedSection(n) => write!(f, "section '{n}' appears twice"),
            TemplateProblem::NoUser => f.write_str("no '=== user ===' section"),
            TemplateProblem::NoPlaceholder(p) => {
                write!(f, "the user section has no {{{{{p}}}}}")
            }
        }
    }
}

/// Why an intervention cannot act on a layer ([`Error::Intervention`]).
#[derive(Debug, Clone, PartialEq)]
pub enum InterventionFault {
    /// Intervention `index` (from 1) of the condition, and why, in words.
    Unusable { index: usize, why: String },
    /// An add whose `coefficient` times the direction overflows f32.
    Overflow { coefficient: f64 },
}

/// Why a spec's prompt set is refused ([`Error::Prompts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptsProblem {
    /// `range = [start, end)` reaches past the `have` prompts of the source.
    Range {
        start: usize,
        end: usize,
        have: usize,
    },
    /// The source has no prompts.
    Empty,
}

/// Why `--shard` does not parse ([`Error::Shard`]); the message is the same for all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardProblem {
    /// No `/`.
    NotKN,
    /// K or N is not a number.
    NotNumber,
    /// K or N is 0, or K > N.
    Range { k: usize, n: usize },
}

/// Why run directories cannot be merged ([`Error::Merge`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeProblem {
    NoInputs,
    /// `missing` of the plan's `groups` groups are in no input, the first being `first`.
    Missing {
        missing: usize,
        groups: usize,
        first: usize,
    },
}

impl fmt::Display for MergeProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MergeProblem::NoInputs => f.write_str("merge: no input run directories"),
            MergeProblem::Missing {
                missing,
                groups,
                first,
            } => write!(
                f,
                "merge: {missing} of {groups} groups are in no input (first: group {first}); run the missing shards first"
            ),
        }
    }
}

/// Why a run cannot go on ([`Error::Run`]).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Prompt `prompt` of `tokens` tokens and `max_new` to generate does not fit `ctx`.
    #[error("prompt {prompt} needs {tokens} tokens + {max_new} new > --ctx {ctx} per sequence; shorten it or raise --ctx")]
    PromptTooLong {
        prompt: usize,
        tokens: usize,
        max_new: usize,
        ctx: usize,
    },
    /// A non-finite logit `value` for `token` at generation step `step` of prompt `prompt`
    /// (named `label` when the batch's sequences were named).
    #[error(fmt = fmt_logit)]
    NonFiniteLogit {
        value: f32,
        token: usize,
        step: usize,
        prompt: usize,
        label: Option<String>,
    },
    /// Hook `index` (an edit or a capture) at `layers` touched no row.
    #[error(fmt = fmt_idle)]
    HookIdle {
        index: usize,
        layers: Vec<usize>,
        hook: IdleHook,
    },
    /// No activations were captured for `what` at `layer`, `slot`.
    #[error("{what}: no activations captured at layer {layer}, slot {slot}")]
    NoActivations {
        what: String,
        layer: usize,
        slot: usize,
    },
    /// Even one sequence does not fit the memory budget: the model's weights, the KV cache
    /// for one sequence of `ctx` and `streams` prefix streams, the total `need`, and the
    /// `budget` that `allowed_by` gives (all in bytes).
    #[error(fmt = fmt_memory)]
    Memory {
        weights: u64,
        ctx: u32,
        streams: u32,
        kv: u64,
        need: u64,
        allowed_by: String,
        budget: u64,
    },
    /// The longest judge prompt needs `need` tokens, more than the judge model's `ctx`.
    #[error("the longest judge prompt needs {need} tokens (prompt + answer) > --ctx {ctx} of the judge model; raise --ctx to {need}")]
    JudgeContext { need: usize, ctx: usize },
    /// Quantizing to type `ty` failed.
    #[error("{ty}: {err}")]
    Quantize { ty: String, err: FfiError },
    /// This process or CPU cannot run it (missing CPU features, a kernel mode already set).
    #[error("{0}")]
    Unsupported(String),
}

/// The hook of [`RunError::HookIdle`], as the hooks module describes it (error sits below
/// hooks, so it holds their names, not their types).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdleHook {
    /// An edit: its kind (`Add`, `Project`) and scope (`All`, `Only([..])`).
    Edit { kind: String, scope: String },
    /// A capture at this position (`LastPrompt`, ...).
    Capture(String),
}

fn fmt_layer(
    layer: &usize,
    n_layer: &usize,
    of: &LayerOf,
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    match of {
        LayerOf::List(s) => write!(
            f,
            "layers '{s}': layer {layer} out of range ({n_layer} layers, 0-{})",
            n_layer - 1
        ),
        LayerOf::Hook => write!(f, "hook at layer {layer}: out of range ({n_layer} layers)"),
        LayerOf::CvecExport if *layer == 0 => f.write_str(
            "layer 0 cannot be exported: llama.cpp control vectors start at layer 1",
        ),
        LayerOf::CvecExport => write!(f, "layer {layer} out of range ({n_layer} layers)"),
        LayerOf::ControlVector => write!(
            f,
            "native control vector at layer {layer}: llama.cpp has slots for layers 1-{} only (use a hook add for layer 0)",
            n_layer - 1
        ),
        LayerOf::Refusal => write!(
            f,
            "refusal direction layer {layer} out of range ({n_layer} layers)"
        ),
    }
}

fn fmt_layers(list: &str, problem: &LayersProblem, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match problem {
        LayersProblem::NotWindow => write!(f, "'{list}' is not a window S+W"),
        LayersProblem::EmptyWindow => write!(f, "window '{list}' is empty"),
        LayersProblem::NotNumber(x) => write!(f, "layers '{list}': '{x}' is not a layer number"),
        LayersProblem::Negative(v) => write!(f, "layers '{list}': layer {v} is negative"),
        LayersProblem::Reversed { from, to } => {
            write!(f, "layers '{list}': window {from}-{to} is empty")
        }
        LayersProblem::NotLayerValue => write!(f, "{list} is not a layer number"),
        LayersProblem::NotListValue => write!(f, "{list} is not a layer list"),
    }
}

fn fmt_unknown(
    what: &Named,
    name: &Option<String>,
    known: &[String],
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    let list = |sep: &str| known.iter().map(|k| shown(k)).collect::<Vec<_>>().join(sep);
    let Some(name) = name else {
        let what = match what {
            Named::HookSite => "hook sites",
            Named::HookPoint => "hook points",
            Named::PromptSet => "prompt sets",
            Named::JudgeKind => "judge kinds",
            Named::QuantType => "quantization types",
            Named::Direction => "directions",
            Named::Persona => "personas",
        };
        return write!(f, "several {what} ({}); name one", list(", "));
    };
    match what {
        Named::HookSite => write!(f, "'{name}' is not a hook site (known: {})", list(", ")),
        Named::HookPoint => write!(
            f,
            "'{name}' is not a hook point (expected {})",
            list(" or ")
        ),
        Named::PromptSet => write!(f, "no built-in prompt set '{name}' ({})", list(", ")),
        Named::JudgeKind => write!(f, "unknown judge kind '{name}', expected {}", list(" or ")),
        Named::QuantType => write!(
            f,
            "unknown quantization type '{name}' (known: {})",
            list(", ")
        ),
        Named::Direction => write!(f, "no direction '{name}' (has: {})", list(", ")),
        Named::Persona => write!(f, "no persona '{name}' (has: {})", known.join(", ")),
    }
}

fn fmt_flag(
    flag: &str,
    value: &Option<String>,
    problem: &FlagProblem,
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    f.write_str(flag)?;
    if let Some(v) = value {
        write!(f, " {v}")?;
    }
    match problem {
        FlagProblem::Range { lo, hi } => write!(f, " is out of range ({lo} to {hi})"),
        FlagProblem::Other(why) => write!(f, " {why}"),
    }
}

fn fmt_size(text: &str, problem: &SizeProblem, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match problem {
        SizeProblem::NotSize => write!(f, "'{text}' is not a size (e.g. 8G, 512M)"),
        SizeProblem::Unit(u) => write!(f, "'{text}': unknown unit '{u}' (use K, M, G or T)"),
        SizeProblem::NotPositive => write!(f, "'{text}' is not a positive size"),
    }
}

fn fmt_shape(what: &Shaped, got: &usize, want: &usize, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match what {
        Shaped::HookVector => write!(f, "hook vector has {got} dims, the model has n_embd {want}"),
        Shaped::ControlVector { layer } => write!(
            f,
            "control vector at layer {layer} has {got} dims, n_embd is {want}"
        ),
        Shaped::DirectionsEmbd => write!(f, "directions have n_embd {got}, the model has {want}"),
        Shaped::DirectionsLayers => write!(f, "directions have {got} layers, the model has {want}"),
    }
}

fn fmt_shapes(
    what: &ShapesOf,
    a: &str,
    a_shape: &[usize; 2],
    b: &str,
    b_shape: &[usize; 2],
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    let ([a0, a1], [b0, b1]) = (a_shape, b_shape);
    match what {
        ShapesOf::Compare => write!(f, "cannot compare {a} [{a0}x{a1}] with {b} [{b0}x{b1}]"),
        ShapesOf::Save => write!(f, "direction {a} is not [{b0} x {b1}]"),
        ShapesOf::Tensors => f.write_str("tensors have different shapes"),
    }
}

fn fmt_value(
    what: &ValueOf,
    layer: &usize,
    value: &f64,
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    match what {
        ValueOf::Projection => write!(f, "projection direction at layer {layer} has norm {value}"),
        ValueOf::Saved(d) => write!(
            f,
            "direction {d} holds {value} at layer {layer}: not written"
        ),
        ValueOf::Loaded(d) => write!(f, "{}: layer {layer} holds NaN or inf", shown(d)),
        ValueOf::CosineNorm(d) => write!(
            f,
            "{d} has norm {value} at layer {layer}: its cosine is undefined"
        ),
        ValueOf::NonFinite(what) => write!(f, "{what}: non-finite direction at layer {layer}"),
        ValueOf::Overflow { name, coefficient } => write!(
            f,
            "{coefficient} x {name} overflows f32 at layer {layer}; use a smaller coefficient"
        ),
        ValueOf::Zero(d) => write!(
            f,
            "{d} is zero at layer {layer} (a layer missing from the control vector it came from?)"
        ),
        ValueOf::Prepared(d) => write!(f, "directions.{d}: non-finite value at layer {layer}"),
        ValueOf::CalibrationScore { coefficient } => write!(
            f,
            "steer calibration: non-finite refusal score at layer {layer} coefficient {coefficient}"
        ),
    }
}

fn fmt_tensor(tensor: &str, problem: &TensorProblem, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let t = shown(tensor);
    match problem {
        TensorProblem::NoDtype => write!(f, "tensor '{t}': no dtype"),
        TensorProblem::Dtype(d) => write!(
            f,
            "tensor '{t}': dtype {}, expected F32 (or, from another tool, F16, BF16 or F64)",
            shown(d)
        ),
        TensorProblem::BadShape => write!(f, "tensor '{t}': bad shape"),
        TensorProblem::Shape(s) => {
            write!(f, "tensor '{t}': shape {s:?}, expected [n_layer, n_embd]")
        }
        TensorProblem::BadOffsets => write!(f, "tensor '{t}': bad data_offsets"),
        TensorProblem::Offsets {
            start,
            end,
            shape,
            data,
        } => write!(
            f,
            "tensor '{t}': offsets {start}..{end} do not fit shape {shape:?} in {data} data bytes"
        ),
        TensorProblem::NotDirection => write!(f, "tensor '{t}' is not named direction.<layer>"),
        TensorProblem::Layer0 => write!(f, "tensor '{t}': layer 0 has no control-vector slot"),
        TensorProblem::Beyond { layer, max } => write!(
            f,
            "tensor '{t}': layer {layer} is beyond any model (at most {max} layers)"
        ),
        TensorProblem::NotF32Row => write!(f, "tensor '{t}': expected a 1-D F32 tensor"),
        TensorProblem::Elements { got, want } => {
            write!(f, "tensor '{t}' has {got} elements, others have {want}")
        }
        TensorProblem::PastEnd => write!(f, "tensor '{t}' runs past the end of the file"),
    }
}

fn fmt_record(at: &At, reason: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match at {
        At::Whole => f.write_str(reason),
        At::Line(n) => write!(f, "line {n}: {reason}"),
        At::Element(i) => write!(f, "element {i}: {reason}"),
        At::CsvHeader => write!(f, "CSV header: {reason}"),
        At::CsvRecord(n) => write!(f, "CSV record {n}: {reason}"),
        At::Instruction(n) => write!(f, "instruction {n} {reason}"),
        At::Metadata(k) => write!(f, "metadata '{}' {reason}", shown(k)),
        At::MetadataValue { key, value } => {
            write!(f, "metadata {key} = '{}': {reason}", shown(value))
        }
    }
}

fn fmt_toml(
    origin: &str,
    table: &Option<String>,
    _line: &Option<usize>,
    reason: &str,
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    match table {
        Some(t) => write!(f, "{origin}: [{t}]: {reason}"),
        None => write!(f, "{origin}: {reason}"),
    }
}

fn fmt_spec_toml(
    origin: &str,
    line: &Option<usize>,
    key: &Option<String>,
    reason: &str,
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    write!(f, "{origin}: ")?;
    if let Some(n) = line {
        write!(f, "line {n}: ")?;
        if let Some(k) = key {
            write!(f, "{k}: ")?;
        }
    }
    f.write_str(reason)
}

fn fmt_condition(
    id: &str,
    intervention: &Option<usize>,
    field: &Option<String>,
    problem: &str,
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    f.write_str(id)?;
    if let Some(i) = intervention {
        write!(f, ": intervention {i}")?;
    }
    if let Some(x) = field {
        write!(f, ": {x}")?;
    }
    write!(f, ": {problem}")
}

fn fmt_intervention(
    id: &str,
    direction: &str,
    _layer: &usize,
    at: &str,
    fault: &InterventionFault,
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    match fault {
        InterventionFault::Unusable { index, why } => write!(
            f,
            "condition {id}: intervention {index}: {direction} at {at} {why}"
        ),
        InterventionFault::Overflow { coefficient } => write!(
            f,
            "condition {id}: {coefficient:e} x {direction} at {at} overflows f32; use a smaller coefficient"
        ),
    }
}

fn fmt_prompts(
    set: &str,
    from: &str,
    problem: &PromptsProblem,
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    match problem {
        PromptsProblem::Range { start, end, have } => write!(
            f,
            "prompts.{set}.range: [{start}, {end}) but {from} has {have} prompts"
        ),
        PromptsProblem::Empty => write!(f, "prompts.{set}: {from} has no prompts"),
    }
}

fn fmt_logit(
    value: &f32,
    token: &usize,
    step: &usize,
    prompt: &usize,
    label: &Option<String>,
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    write!(
        f,
        "non-finite logit {value} (token id {token}) at generated token {step} of "
    )?;
    match label {
        Some(l) => f.write_str(l),
        None => write!(f, "prompt {prompt}"),
    }
}

fn fmt_idle(
    index: &usize,
    layers: &[usize],
    hook: &IdleHook,
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    match hook {
        IdleHook::Edit { kind, scope } => write!(
            f,
            "{kind} hook #{index} at layers {layers:?} touched no rows (scope {scope})"
        ),
        IdleHook::Capture(p) => {
            write!(f, "capture #{index} ({p}) at layers {layers:?} saw no rows")
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn fmt_memory(
    weights: &u64,
    ctx: &u32,
    streams: &u32,
    kv: &u64,
    need: &u64,
    allowed_by: &str,
    budget: &u64,
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    use crate::text::gib;
    write!(
        f,
        "not enough memory: the model ({}) plus a KV cache for one sequence of --ctx {ctx} and {streams} prefix streams ({}) and llama.cpp's buffers need about {}, but {allowed_by} allows {}; lower --ctx or --batch, or use a smaller quantization",
        gib(*weights),
        gib(*kv),
        gib(*need),
        gib(*budget)
    )
}

impl Error {
    pub fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Error {
        Error::File {
            path: path.into(),
            msg: msg.into(),
        }
    }
    /// An I/O error on `path`; a missing file reads "no such file".
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Error {
        match err.kind() {
            std::io::ErrorKind::NotFound => Error::file(path, "no such file"),
            _ => Error::Io {
                path: path.into(),
                err,
            },
        }
    }
    /// This error, found in the contents of the file `path`.
    pub fn in_file(self, path: impl Into<PathBuf>) -> Error {
        Error::In {
            path: path.into(),
            err: Box::new(self),
        }
    }
    /// A record of an input at `at` that does not parse.
    pub fn record(at: At, reason: impl Into<String>) -> Error {
        Error::Record {
            at,
            reason: reason.into(),
        }
    }
    /// `flag` = `value` refused for `why`.
    pub fn flag(flag: &str, value: Option<String>, why: impl Into<String>) -> Error {
        Error::Flag {
            flag: flag.to_string(),
            value,
            problem: FlagProblem::Other(why.into()),
        }
    }
    /// `flag` = `value` outside `lo` to `hi`.
    pub fn flag_range(
        flag: &str,
        value: impl ToString,
        lo: impl ToString,
        hi: impl ToString,
    ) -> Error {
        Error::Flag {
            flag: flag.to_string(),
            value: Some(value.to_string()),
            problem: FlagProblem::Range {
                lo: lo.to_string(),
                hi: hi.to_string(),
            },
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    //! Each typed variant comes from a real failure, carries its values, and prints the text
    //! the untyped message had (the `format!` calls here are the ones the sites used).

    use std::collections::BTreeMap;

    use super::*;
    use crate::directions::{cosine_per_layer, cvec, Direction, DirectionFile};
    use crate::hooks::{Edit, EditKind, HookPoint, HookSet, LayerSet, Scope, Site};
    use crate::prompts::load::{self, Format};

    /// No typed variant has a source: the binary's one-line chain prints each cause once.
    fn one_line(e: &Error) -> String {
        assert!(std::error::Error::source(e).is_none(), "{e:?}");
        e.to_string()
    }

    #[test]
    fn a_layer_out_of_range_carries_the_layer_the_count_and_the_list() {
        let e = LayerSet::parse("3,9", 8).unwrap_err();
        let Error::Layer {
            layer,
            n_layer,
            of: LayerOf::List(ref list),
        } = e
        else {
            panic!("{e:?}")
        };
        assert_eq!((layer, n_layer, list.as_str()), (9, 8, "3,9"));
        let (s, v) = ("3,9", 9);
        assert_eq!(
            one_line(&e),
            format!(
                "layers '{s}': layer {v} out of range ({n_layer} layers, 0-{})",
                n_layer - 1
            )
        );
        // A window is reported as the range it stands for.
        let e = LayerSet::parse("6+3", 8).unwrap_err();
        assert!(
            matches!(e, Error::Layer { layer: 8, n_layer: 8, of: LayerOf::List(ref l) } if l == "6-8")
        );

        let mut hs = HookSet::new(2, 3);
        let e = hs
            .add_edit(Edit::add([(5, vec![0.0; 3])].into(), Scope::All))
            .unwrap_err();
        assert!(matches!(
            e,
            Error::Layer {
                layer: 5,
                n_layer: 2,
                of: LayerOf::Hook
            }
        ));
        assert_eq!(
            one_line(&e),
            format!("hook at layer {}: out of range ({} layers)", 5, 2)
        );

        let d = Direction {
            name: "x".into(),
            rows: vec![vec![1.0, 2.0]; 4],
        };
        let e = cvec::export(&d, "llama", 1.0, &[0]).unwrap_err();
        assert!(matches!(
            e,
            Error::Layer {
                layer: 0,
                n_layer: 4,
                of: LayerOf::CvecExport
            }
        ));
        assert_eq!(
            one_line(&e),
            "layer 0 cannot be exported: llama.cpp control vectors start at layer 1"
        );
        let e = cvec::export(&d, "llama", 1.0, &[4]).unwrap_err();
        assert!(matches!(
            e,
            Error::Layer {
                layer: 4,
                n_layer: 4,
                ..
            }
        ));
        assert_eq!(
            one_line(&e),
            format!("layer {} out of range ({} layers)", 4, d.n_layer())
        );
        let e = Error::Layer {
            layer: 0,
            n_layer: 30,
            of: LayerOf::ControlVector,
        };
        assert_eq!(
            one_line(&e),
            format!("native control vector at layer {}: llama.cpp has slots for layers 1-{} only (use a hook add for layer 0)", 0, 30 - 1)
        );
    }

    #[test]
    fn a_bad_layer_list_names_the_list_and_the_part() {
        let cases: [(&str, LayersProblem, String); 5] = [
            (
                "5-3",
                LayersProblem::Reversed { from: 5, to: 3 },
                format!("layers '{}': window {}-{} is empty", "5-3", 5, 3),
            ),
            (
                "3,x",
                LayersProblem::NotNumber("x".into()),
                format!("layers '{}': '{}' is not a layer number", "3,x", "x"),
            ),
            (
                "-1",
                LayersProblem::Negative(-1),
                format!("layers '{}': layer {} is negative", "-1", -1),
            ),
            (
                "a+2",
                LayersProblem::NotWindow,
                format!("'{}' is not a window S+W", "a+2"),
            ),
            (
                "3+0",
                LayersProblem::EmptyWindow,
                format!("window '{}' is empty", "3+0"),
            ),
        ];
        for (s, want, text) in cases {
            let e = LayerSet::parse(s, 8).unwrap_err();
            match &e {
                Error::Layers { list, problem } => {
                    assert_eq!((list.as_str(), problem), (s, &want))
                }
                _ => panic!("{e:?}"),
            }
            assert_eq!(one_line(&e), text);
        }
        let v: toml::Value = toml::from_str("x = [1, \"2\"]\ny = 1.5").unwrap();
        let e = LayerSet::from_toml(&v["x"], 8).unwrap_err();
        assert!(matches!(
            e,
            Error::Layers { ref list, problem: LayersProblem::NotLayerValue } if list == "\"2\""
        ));
        assert_eq!(one_line(&e), format!("{} is not a layer number", v["x"][1]));
        let e = LayerSet::from_toml(&v["y"], 8).unwrap_err();
        assert_eq!(one_line(&e), format!("{} is not a layer list", v["y"]));
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let e = "attn_out".parse::<Site>().unwrap_err();
        assert!(matches!(
            e,
            Error::Unknown { what: Named::HookSite, name: Some(ref n), ref known }
                if n == "attn_out" && known == &["resid_post"]
        ));
        let known = ["resid_post"];
        assert_eq!(
            one_line(&e),
            format!(
                "'{}' is not a hook site (known: {})",
                "attn_out",
                known.join(", ")
            )
        );
        let e = "resid_pre.3".parse::<HookPoint>().unwrap_err();
        assert!(matches!(
            e,
            Error::Unknown {
                what: Named::HookPoint,
                ..
            }
        ));
        assert_eq!(
            one_line(&e),
            format!(
                "'{}' is not a hook point (expected resid_post.L or a layer number L >= 0)",
                "resid_pre.3"
            )
        );
        let e = crate::prompts::builtin("nope").unwrap_err();
        assert!(
            matches!(e, Error::Unknown { what: Named::PromptSet, ref known, .. } if known.len() == 5)
        );
        assert_eq!(
            one_line(&e),
            format!("no built-in prompt set '{}' (harmful, harmless, neutral, harmful_train, harmless_train)", "nope")
        );
        let e = "x".parse::<crate::judge::JudgeKind>().unwrap_err();
        assert!(matches!(
            e,
            Error::Unknown {
                what: Named::JudgeKind,
                ..
            }
        ));
        assert_eq!(
            one_line(&e),
            format!(
                "unknown judge kind '{}', expected strongreject or llamaguard",
                "x"
            )
        );
        let e = crate::studies::quant::ftype("Q9").unwrap_err();
        assert!(
            matches!(e, Error::Unknown { what: Named::QuantType, name: Some(ref n), .. } if n == "Q9")
        );
        assert!(one_line(&e).starts_with("unknown quantization type 'Q9' (known: F32, "));

        let d = |n: &str| Direction {
            name: n.into(),
            rows: vec![vec![1.0, 2.0]],
        };
        let f = DirectionFile::new(vec![d("a"), d("b\n")], BTreeMap::new()).unwrap();
        let e = f.get(Some("zzz")).unwrap_err();
        assert!(
            matches!(e, Error::Unknown { what: Named::Direction, name: Some(ref n), ref known } if n == "zzz" && known == &["a", "b\n"])
        );
        let names = || {
            f.directions
                .iter()
                .map(|d| shown(&d.name))
                .collect::<Vec<_>>()
                .join(", ")
        };
        assert_eq!(
            one_line(&e),
            format!("no direction '{}' (has: {})", "zzz", names())
        );
        let e = f.get(None).unwrap_err();
        assert!(matches!(e, Error::Unknown { name: None, .. }));
        assert_eq!(
            one_line(&e),
            format!("several directions ({}); name one", names())
        );
    }

    #[test]
    fn flags_and_sizes_carry_the_flag_the_value_and_the_range() {
        let o = crate::model::ModelOptions {
            threads: 0,
            ..Default::default()
        };
        let e = o.validate().unwrap_err();
        assert!(matches!(
            e,
            Error::Flag { ref flag, value: Some(ref v), problem: FlagProblem::Range { ref lo, ref hi } }
                if flag == "--threads" && v == "0" && lo == "1" && hi == "512"
        ));
        assert_eq!(
            one_line(&e),
            format!("--threads {} is out of range (1 to {})", 0, 512)
        );
        let o = crate::model::ModelOptions {
            max_memory: Some(1),
            ..Default::default()
        };
        assert_eq!(
            one_line(&o.validate().unwrap_err()),
            format!(
                "--max-memory {} is out of range (16 MiB to 1 PiB)",
                crate::memory::gib(1)
            )
        );
        let o = crate::model::ModelOptions {
            batch: 8,
            parallel: 16,
            ..Default::default()
        };
        assert_eq!(
            one_line(&o.validate().unwrap_err()),
            format!("--batch {} is below --parallel {}: a generation step decodes one token of every sequence in one call", 8, 16)
        );
        let d = Direction {
            name: "x".into(),
            rows: vec![vec![1.0]; 2],
        };
        let e = cvec::export(&d, "any", f32::NAN, &[1]).unwrap_err();
        assert_eq!(
            one_line(&e),
            format!("coefficient {} is not finite", f32::NAN)
        );

        let e = crate::memory::parse_size("8X").unwrap_err();
        assert!(matches!(
            e,
            Error::Size { ref text, problem: SizeProblem::Unit(ref u) } if text == "8X" && u == "X"
        ));
        let (s, unit) = ("8X", "X");
        assert_eq!(
            one_line(&e),
            format!("'{s}': unknown unit '{unit}' (use K, M, G or T)")
        );
        let s = "G";
        assert_eq!(
            one_line(&crate::memory::parse_size(s).unwrap_err()),
            format!("'{s}' is not a size (e.g. 8G, 512M)")
        );
        let s = "0";
        assert_eq!(
            one_line(&crate::memory::parse_size(s).unwrap_err()),
            format!("'{s}' is not a positive size")
        );
    }

    #[test]
    fn shapes_and_values_name_both_sides_and_the_layer() {
        let mut hs = HookSet::new(2, 3);
        let e = hs
            .add_edit(Edit::add([(1, vec![0.0; 2])].into(), Scope::All))
            .unwrap_err();
        assert!(matches!(
            e,
            Error::Shape {
                what: Shaped::HookVector,
                got: 2,
                want: 3
            }
        ));
        assert_eq!(
            one_line(&e),
            format!("hook vector has {} dims, the model has n_embd {}", 2, 3)
        );

        let a = Direction {
            name: "a".into(),
            rows: vec![vec![1.0, 0.0, 0.0], vec![0.0; 3]],
        };
        let b = Direction {
            name: "b".into(),
            rows: vec![vec![1.0, 0.0, 0.0]],
        };
        let e = cosine_per_layer(&a, &b).unwrap_err();
        assert!(matches!(
            e,
            Error::Shapes {
                what: ShapesOf::Compare,
                a_shape: [2, 3],
                b_shape: [1, 3],
                ..
            }
        ));
        assert_eq!(
            one_line(&e),
            format!(
                "cannot compare {} [{}x{}] with {} [{}x{}]",
                a.name,
                a.n_layer(),
                a.n_embd(),
                b.name,
                b.n_layer(),
                b.n_embd()
            )
        );
        let e = cosine_per_layer(&a, &a).unwrap_err();
        assert!(matches!(
            e,
            Error::Value { what: ValueOf::CosineNorm(ref n), layer: 1, value } if n == "a" && value == 0.0
        ));
        assert_eq!(
            one_line(&e),
            format!(
                "{} has norm {} at layer {}: its cosine is undefined",
                "a", 0f64, 1
            )
        );
        let e = DirectionFile::new(vec![a.clone(), b.clone()], BTreeMap::new()).unwrap_err();
        assert!(matches!(
            e,
            Error::Shapes { what: ShapesOf::Save, ref a, ref b, b_shape: [2, 3], .. } if a == "b" && b == "a"
        ));
        assert_eq!(
            one_line(&e),
            format!("direction {} is not [{} x {}]", "b", 2, 3)
        );
        let mut c = a.clone();
        c.rows[1][2] = f32::INFINITY;
        let e = DirectionFile::new(vec![c], BTreeMap::new()).unwrap_err();
        assert!(matches!(
            e,
            Error::Value {
                what: ValueOf::Saved(_),
                layer: 1,
                ..
            }
        ));
        assert_eq!(
            one_line(&e),
            format!(
                "direction {} holds {} at layer {}: not written",
                "a",
                f32::INFINITY,
                1
            )
        );
        let e = Edit::project([(4, vec![0.0, 0.0])].into(), Scope::All).unwrap_err();
        assert!(matches!(
            e,
            Error::Value {
                what: ValueOf::Projection,
                layer: 4,
                ..
            }
        ));
        assert_eq!(
            one_line(&e),
            format!("projection direction at layer {} has norm {}", 4, 0f64)
        );
        let d = Direction {
            name: "x".into(),
            rows: vec![vec![3e38, 1.0]; 2],
        };
        let e = cvec::export(&d, "any", 2.0, &[1]).unwrap_err();
        assert!(matches!(
            e,
            Error::Value { what: ValueOf::Overflow { coefficient, .. }, layer: 1, .. } if coefficient == 2.0
        ));
        assert_eq!(
            one_line(&e),
            format!(
                "{} x {} overflows f32 at layer {}; use a smaller coefficient",
                2f32, "x", 1
            )
        );
        let e = Error::ArchMismatch {
            directions: "qwen\n2".into(),
            model: "llama".into(),
        };
        assert_eq!(
            one_line(&e),
            format!(
                "directions are for arch '{}', the model is '{}'",
                shown("qwen\n2"),
                "llama"
            )
        );
    }

    #[test]
    fn records_and_tensors_carry_where_they_are_and_the_file_wraps_them() {
        let e = load::parse(
            b"{\"instruction\":\"a\"}\n\n{bad\n",
            Format::Jsonl,
            None,
            "t",
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                Error::Record {
                    at: At::Line(3),
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(one_line(&e).starts_with("line 3: invalid JSON: "));
        let e = load::parse(b"[1]", Format::Json, None, "t").unwrap_err();
        assert!(matches!(
            e,
            Error::Record {
                at: At::Element(0),
                ..
            }
        ));
        assert_eq!(
            one_line(&e),
            format!("element {}: expected an object or a string", 0)
        );
        let e = load::parse(b"[\"a\", \" \"]", Format::Json, None, "t").unwrap_err();
        assert!(matches!(
            e,
            Error::Record {
                at: At::Instruction(2),
                ..
            }
        ));
        assert_eq!(one_line(&e), format!("instruction {} is empty", 1 + 1));

        // A file puts its path in front, around the same record.
        let dir = std::env::temp_dir().join(format!("pg-error-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("set.jsonl");
        std::fs::write(&path, "{\"x\": 1}\n").unwrap();
        let e = load::load(&path, None).unwrap_err();
        match &e {
            Error::In { path: p, err } => {
                assert_eq!(p, &path);
                assert!(
                    matches!(
                        **err,
                        Error::Record {
                            at: At::Line(1),
                            ..
                        }
                    ),
                    "{err:?}"
                );
            }
            _ => panic!("{e:?}"),
        }
        assert!(one_line(&e).starts_with(&format!(
            "{}: line 1: no instruction field (looked for ",
            path.display()
        )));

        // A tensor of a direction file, by name.
        let f = DirectionFile::new(
            vec![Direction {
                name: "a".into(),
                rows: vec![vec![1.0, 2.0]],
            }],
            BTreeMap::new(),
        )
        .unwrap();
        let b = f.to_bytes();
        let at = b.windows(5).position(|w| w == b"\"F32\"").unwrap();
        let mut c = b.clone();
        c[at + 1..at + 4].copy_from_slice(b"I32");
        let e = DirectionFile::from_bytes(&c).unwrap_err();
        assert!(matches!(
            e,
            Error::Tensor { ref tensor, problem: TensorProblem::Dtype(ref d) } if tensor == "a" && d == "I32"
        ));
        assert_eq!(
            one_line(&e),
            format!(
                "tensor '{}': dtype {}, expected F32 (or, from another tool, F16, BF16 or F64)",
                "a", "I32"
            )
        );
        let path = dir.join("d.safetensors");
        std::fs::write(&path, &c).unwrap();
        let e = DirectionFile::load(&path).unwrap_err();
        assert!(matches!(e, Error::In { ref err, .. } if matches!(**err, Error::Tensor { .. })));
        assert_eq!(
            one_line(&e),
            format!(
                "{}: tensor '{}': dtype {}, expected F32 (or, from another tool, F16, BF16 or F64)",
                path.display(),
                "a",
                "I32"
            )
        );
        let e = DirectionFile::from_bytes(&b[..4]).unwrap_err();
        assert!(matches!(e, Error::Record { at: At::Whole, .. }));
        assert_eq!(
            one_line(&e),
            format!("too short for safetensors ({} bytes)", 4)
        );
        let e = cvec::import(b"GGUF").unwrap_err();
        assert!(matches!(e, Error::GgufData(_)), "{e:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn toml_templates_and_samples() {
        let e = crate::prompts::parse_personas(
            "[x]\ndescription='d'\npositive=[]\nnegative=['n']",
            "t",
        )
        .unwrap_err();
        assert!(matches!(
            e,
            Error::Toml { ref origin, table: Some(ref t), .. } if origin == "t" && t == "x"
        ));
        let (origin, name) = ("t", "x");
        assert_eq!(
            one_line(&e),
            format!("{origin}: [{name}]: positive and negative must each have at least one prompt")
        );
        let src = "[x]\ndescription='d'\npositive=['p']\nnegative=['n']\nextra=1";
        let e = crate::prompts::parse_personas(src, "t").unwrap_err();
        assert!(
            matches!(
                e,
                Error::Toml {
                    table: None,
                    line: Some(1..=5),
                    ..
                }
            ),
            "{e:?}"
        );
        let msg = toml::from_str::<BTreeMap<String, crate::prompts::Persona>>(src)
            .unwrap_err()
            .message()
            .to_string();
        assert_eq!(one_line(&e), format!("{origin}: {msg}"));

        let e = crate::judge::Template::parse("=== user ===\n{{prompt}}\n", "j.txt").unwrap_err();
        assert!(matches!(
            e,
            Error::JudgeTemplate { ref origin, problem: TemplateProblem::NoPlaceholder("response") } if origin == "j.txt"
        ));
        let (origin, p) = ("j.txt", "response");
        let m = format!("the user section has no {{{{{p}}}}}");
        assert_eq!(one_line(&e), format!("judge template {origin}: {m}"));
        let e = crate::judge::Template::parse("=== bogus ===\n", "j").unwrap_err();
        assert_eq!(
            one_line(&e),
            "judge template j: unknown section 'bogus' (system, user, assistant)"
        );

        let v = crate::prompts::builtin("harmful").unwrap();
        let e = load::sample(v, Some(99), 1).unwrap_err();
        assert!(matches!(e, Error::Sample { n: 99, have: 16 }));
        assert_eq!(
            one_line(&e),
            format!("n = {} but the set has {} prompts", 99, 16)
        );
    }

    #[test]
    fn run_failures_carry_their_numbers() {
        let mut hs = HookSet::new(2, 2);
        hs.add_edit(Edit::add(
            [(1, vec![1.0, 1.0])].into(),
            Scope::only(vec![1]),
        ))
        .unwrap();
        let e = hs.check_touched().unwrap_err();
        assert!(matches!(
            e,
            Error::Run(RunError::HookIdle { index: 0, ref layers, hook: IdleHook::Edit { ref kind, .. } }) if layers == &[1] && kind == "Add"
        ));
        assert_eq!(
            one_line(&e),
            format!(
                "{:?} hook #{} at layers {:?} touched no rows (scope {:?})",
                EditKind::Add,
                0,
                vec![1usize],
                Scope::only(vec![1])
            )
        );

        let fp = crate::memory::Footprint {
            weights: 700 << 20,
            kv_per_cell: 1 << 14,
            n_vocab: 32000,
            n_embd: 1024,
        };
        let budget = crate::memory::Budget {
            bytes: 1 << 20,
            source: "--max-memory".into(),
        };
        let (ctx, batch) = (1024, 512);
        let e = crate::memory::fit(&fp, &budget, ctx, batch, 16).unwrap_err();
        assert!(matches!(
            e,
            Error::Run(RunError::Memory {
                ctx: 1024,
                budget: 1048576,
                ..
            })
        ));
        use crate::memory::gib;
        assert_eq!(
            one_line(&e),
            format!(
                "not enough memory: the model ({}) plus a KV cache for one sequence of --ctx {ctx} and {} prefix streams ({}) and llama.cpp's buffers need about {}, but {} allows {}; lower --ctx or --batch, or use a smaller quantization",
                gib(fp.weights),
                crate::memory::CACHE_STREAMS,
                gib(fp.kv(ctx, 1)),
                gib(fp.need(ctx, batch, 1)),
                budget.source,
                gib(budget.bytes)
            )
        );

        let e = Error::Run(RunError::PromptTooLong {
            prompt: 2,
            tokens: 900,
            max_new: 200,
            ctx: 1024,
        });
        let (i, max_new, ctx) = (2, 200, 1024);
        assert_eq!(
            one_line(&e),
            format!(
                "prompt {i} needs {} tokens + {max_new} new > --ctx {ctx} per sequence; shorten it or raise --ctx",
                900,
            )
        );
        for (label, whose) in [
            (None, "prompt 3".to_string()),
            (
                Some("condition A, prompt 3".to_string()),
                "condition A, prompt 3".into(),
            ),
        ] {
            let e = Error::Run(RunError::NonFiniteLogit {
                value: f32::NAN,
                token: 7,
                step: 4,
                prompt: 3,
                label,
            });
            assert_eq!(
                one_line(&e),
                format!(
                    "non-finite logit {} (token id {}) at generated token {} of {whose}",
                    f32::NAN,
                    7,
                    4
                )
            );
        }
    }

    #[test]
    fn spec_and_shard_errors_carry_their_fields() {
        use crate::experiment::plan::Shard;
        use crate::experiment::spec::Spec;

        let spec = "name = \"t\"\ngroup_size = 0\n[prompts.h]\nsource = \"builtin:harmful\"\n[[experiment]]\nid = \"E\"\nprompts = \"h\"\n";
        let e = Spec::parse(spec, "t.toml").unwrap_err();
        assert!(
            matches!(
                e,
                Error::Spec { ref origin, ref field, ref problem }
                    if origin == "t.toml" && field == "group_size" && problem == "must be at least 1"
            ),
            "{e:?}"
        );
        let (origin, field) = ("t.toml", "group_size");
        assert_eq!(
            one_line(&e),
            format!("{origin}: {field}: {}", "must be at least 1")
        );

        let e = Spec::parse(
            &spec.replace("group_size = 0", "group_size = \"x\""),
            "t.toml",
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                Error::SpecToml { ref origin, line: Some(2), key: Some(ref k), .. }
                    if origin == "t.toml" && k == "group_size"
            ),
            "{e:?}"
        );
        assert!(
            one_line(&e).starts_with("t.toml: line 2: group_size: "),
            "{e}"
        );

        let e = "x/y".parse::<Shard>().unwrap_err();
        assert!(
            matches!(
                e,
                Error::Shard { ref text, problem: ShardProblem::NotNumber } if text == "x/y"
            ),
            "{e:?}"
        );
        let s = "x/y";
        assert_eq!(
            one_line(&e),
            format!("--shard '{s}': expected K/N with 1 <= K <= N, e.g. 2/4")
        );
        let e = "3/2".parse::<Shard>().unwrap_err();
        assert!(matches!(
            e,
            Error::Shard {
                problem: ShardProblem::Range { k: 3, n: 2 },
                ..
            }
        ));
        assert!(matches!(
            "2".parse::<Shard>().unwrap_err(),
            Error::Shard {
                problem: ShardProblem::NotKN,
                ..
            }
        ));

        // A condition that does not expand names its id, intervention and field.
        let spec = "name = \"t\"\n[prompts.h]\nsource = \"builtin:harmful\"\n[directions.p]\nkind = \"random\"\nseed = 1\n[[experiment]]\nid = \"E\"\nprompts = \"h\"\nintervention = [ { direction = \"p\", op = \"add\", layers = 1, coefficient = \"z\" } ]\n";
        let s = Spec::parse(spec, "t.toml").unwrap();
        let b = crate::experiment::spec::Builtins {
            n_layer: 4,
            ..Default::default()
        };
        let e = s.expand(&b, &BTreeMap::new()).unwrap_err();
        let Error::Located {
            ref origin,
            ref err,
        } = e
        else {
            panic!("{e:?}")
        };
        assert_eq!(origin, "t.toml");
        assert!(
            matches!(
                **err,
                Error::Condition { ref id, intervention: Some(1), field: Some(ref f), .. }
                    if id == "E" && f == "coefficient"
            ),
            "{err:?}"
        );
        let (id, i, t) = ("E", 1, "z");
        assert_eq!(
            one_line(&e),
            format!("{origin}: {id}: intervention {i}: coefficient: '{t}' is not a number")
        );

        let e = Error::Merge(MergeProblem::Missing {
            missing: 2,
            groups: 5,
            first: 3,
        });
        assert_eq!(
            one_line(&e),
            format!("merge: {} of {} groups are in no input (first: group {}); run the missing shards first", 2, 5, 3)
        );
        let e = Error::Intervention {
            id: "E".into(),
            direction: "p".into(),
            layer: 2,
            at: HookPoint::resid_post(2).to_string(),
            fault: InterventionFault::Overflow { coefficient: 1e38 },
        };
        assert_eq!(
            one_line(&e),
            format!(
                "condition {}: {:e} x {} at {} overflows f32; use a smaller coefficient",
                "E",
                1e38f64,
                "p",
                HookPoint::resid_post(2)
            )
        );
    }
}
