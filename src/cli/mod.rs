//! Command-line flags (clap). No logic: each subcommand's flags become library options.

pub mod bench;
pub mod judge;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use persona_gate::chat::SystemPrompt;
use persona_gate::model::{Kernels, ModelOptions};

#[derive(Parser, Debug)]
#[command(
    name = "persona-gate",
    version,
    about = "Persona and refusal steering on quantized GGUF models through llama.cpp"
)]
pub struct Cli {
    /// More log output (-v: debug, -vv: llama.cpp's own logs). RUST_LOG also works.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print a GGUF model's metadata, sha256, chat template and hook coverage.
    Info(InfoArgs),
    /// Greedy completions for instructions, formatted with the model's chat template.
    Generate(GenerateArgs),
    /// Extract the compliant-persona direction and show baseline vs steered completions.
    Demo(DemoArgs),
    /// Throughput with and without hooks (prompt and generated tokens/s).
    Bench(BenchArgs),
    /// Extract a refusal or persona direction into a safetensors file.
    #[command(subcommand)]
    Extract(ExtractCmd),
    /// Score refusal-direction candidates (position x layer) and choose one, or rank the
    /// steering layers of a persona direction.
    Select(SelectArgs),
    /// Compare direction files.
    #[command(subcommand)]
    Directions(DirectionsCmd),
    /// Write a direction x coefficient x layers as a llama.cpp control-vector GGUF.
    ExportCvec(ExportCvecArgs),
    /// Print a direction file's metadata, directions and per-layer norms.
    Inspect(InspectArgs),
    /// Run the paper's experiment grid (or your --spec) and write CSVs, plots and a report;
    /// rerunning the same command resumes.
    Reproduce(ReproduceArgs),
    /// Join the run directories of `reproduce --shard` runs and write the outputs.
    Merge(MergeArgs),
    /// Quantize a GGUF to several types with llama.cpp (outputs named by type, reused when
    /// their recorded hash matches).
    Quantize(QuantizeArgs),
    /// Compare quantized models with a reference: direction cosines, next-token KL and
    /// top-1 agreement, and refusal gating per condition (two-proportion tests).
    Compare(CompareArgs),
    /// Judge a run directory's completions with a local GGUF judge (StrongREJECT rubric or
    /// Llama-Guard labels).
    Judge(judge::JudgeArgs),
    /// How two finished runs of one grid agree across conditions (Spearman's rho), e.g.
    /// --metric generate against --metric score.
    Agreement(AgreementArgs),
}

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// Input GGUF (F32/F16/BF16, or a quantized one: then results are relative to it).
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// Types, e.g. F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K.
    #[arg(long, value_delimiter = ',', required = true)]
    pub types: Vec<String>,
    #[arg(long)]
    pub out_dir: PathBuf,
    #[arg(long, short = 't')]
    pub threads: Option<i32>,
}

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// The reference model (e.g. F16).
    #[arg(long)]
    pub reference: PathBuf,
    /// Models to compare with it.
    #[arg(long, num_args = 1.., required = true)]
    pub models: Vec<PathBuf>,
    /// Experiment spec (default: the paper's preset, demo size, for the reference's depth).
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Output directory (one resumable run directory per model inside).
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    /// CPU threads.
    #[arg(long, short = 't')]
    pub threads: Option<i32>,
    /// Context per sequence.
    #[arg(long, default_value_t = 1024)]
    pub ctx: u32,
    /// Memory each model's run may use, e.g. 8G (default: what the system reports available).
    #[arg(long, value_parser = persona_gate::memory::parse_size)]
    pub max_memory: Option<u64>,
    /// Skip the runs that apply the reference's directions to each model.
    #[arg(long)]
    pub no_cross: bool,
}

#[derive(Args, Debug)]
pub struct AgreementArgs {
    pub a: PathBuf,
    /// A second run; without it, A's refusal rates are compared with A's own first-token
    /// scores (what --metric score computes).
    pub b: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ReproduceArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Experiment spec (TOML). Default: the paper's preset for this model (see --print-spec).
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Print the spec that would run (the preset, or --spec as parsed) and exit.
    #[arg(long)]
    pub print_spec: bool,
    /// Preset size: demo (strided layers, minutes on a 0.5B model) or full.
    #[arg(long, default_value = "demo", value_parser = ["demo", "full"])]
    pub size: String,
    /// Preset: harmful evaluation prompts (a file such as StrongREJECT's CSV, or builtin:harmful).
    #[arg(long, default_value = "builtin:harmful")]
    pub harmful: String,
    /// Preset: a seeded sample of this many harmful prompts.
    #[arg(long)]
    pub n: Option<usize>,
    /// Preset: harmless prompts for the induction check.
    #[arg(long, default_value = "builtin:harmless")]
    pub harmless: String,
    /// Preset: a seeded sample of this many harmless prompts.
    #[arg(long)]
    pub harmless_n: Option<usize>,
    /// Override the spec's metric: generate (labels) or score (first-token refusal score only).
    #[arg(long, value_parser = ["generate", "score"])]
    pub metric: Option<String>,
    /// Run directory (default: runs/<model file stem>/<spec name>[-score]).
    #[arg(long, short = 'o')]
    pub out: Option<PathBuf>,
    /// Run only groups K, K+N, ... (1-based K of N); join the directories with `merge`.
    #[arg(long)]
    pub shard: Option<String>,
    /// Print the grid size and a time estimate measured on this machine, run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Jinja chat template file instead of the GGUF's.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// Special-token strings inside instructions: literal (default: read as plain text, so
    /// an instruction cannot close its own turn) or parse (as control tokens, like Hugging
    /// Face's apply_chat_template; for injection research).
    #[arg(long, value_enum, default_value_t = SpecialArg::Literal)]
    pub special_tokens: SpecialArg,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialArg {
    Literal,
    Parse,
}

impl SpecialArg {
    pub fn mode(self) -> persona_gate::chat::SpecialTokens {
        match self {
            SpecialArg::Literal => persona_gate::chat::SpecialTokens::Literal,
            SpecialArg::Parse => persona_gate::chat::SpecialTokens::Parse,
        }
    }
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

#[derive(Args, Debug, Clone)]
pub struct SetArgs {
    /// JSON/JSONL field or CSV column holding the instruction (default: instruction,
    /// forbidden_prompt, goal or prompt, whichever exists).
    #[arg(long)]
    pub field: Option<String>,
    /// Use a seeded sample of this many instructions from each set.
    #[arg(long)]
    pub n: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Subcommand, Debug)]
pub enum ExtractCmd {
    /// Mean(harmful) - mean(harmless) at the post-instruction tokens (Arditi et al.).
    Refusal(ExtractRefusalArgs),
    /// Mean(positive persona) - mean(negative persona) over neutral questions.
    Persona(ExtractPersonaArgs),
}

#[derive(Args, Debug)]
pub struct ExtractRefusalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[command(flatten)]
    pub set: SetArgs,
    /// Harmful instructions: a .json/.jsonl/.csv/.txt file or builtin:harmful.
    #[arg(long, default_value = "builtin:harmful")]
    pub harmful: String,
    /// Harmless instructions: a file or builtin:harmless.
    #[arg(long, default_value = "builtin:harmless")]
    pub harmless: String,
    /// post: every post-instruction token (each a candidate); last: the last prompt token.
    #[arg(long, default_value = "post", value_parser = ["post", "last"])]
    pub positions: String,
    /// Output .safetensors file.
    #[arg(long, short = 'o')]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct ExtractPersonaArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[command(flatten)]
    pub set: SetArgs,
    /// Persona name in the personas file.
    #[arg(long, default_value = "compliant")]
    pub persona: String,
    /// Personas TOML file (default: the built-in one).
    #[arg(long)]
    pub personas: Option<PathBuf>,
    /// Neutral questions: a file or builtin:neutral.
    #[arg(long, default_value = "builtin:neutral")]
    pub questions: String,
    /// last: the last prompt token; response: mean over generated response tokens.
    #[arg(long, default_value = "last", value_parser = ["last", "response"])]
    pub at: String,
    /// Response tokens generated per question with --at response.
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    #[arg(long, short = 'o')]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct SelectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[command(flatten)]
    pub set: SetArgs,
    /// Direction file from `extract`.
    #[arg(long, short = 'd')]
    pub directions: PathBuf,
    /// Harmful validation instructions.
    #[arg(long, default_value = "builtin:harmful")]
    pub harmful_val: String,
    /// Harmless validation instructions (refusal selection only).
    #[arg(long, default_value = "builtin:harmless")]
    pub harmless_val: String,
    /// Candidate layers (default: all).
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

#[derive(Subcommand, Debug)]
pub enum DirectionsCmd {
    /// Per-layer cosine similarity between two directions (CSV on stdout or --csv, SVG plot).
    Cos(CosArgs),
    /// A seeded random control direction, unit or norm-matched to a direction file.
    Random(RandomArgs),
}

#[derive(Args, Debug)]
pub struct RandomArgs {
    /// Direction file whose shape (and, with --norm-matched, per-layer norms) to copy.
    #[arg(long)]
    pub like: PathBuf,
    /// Direction name in --like (needed when it holds several).
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Scale each layer's row to the norm of --like's row (default: unit rows).
    #[arg(long)]
    pub norm_matched: bool,
    #[arg(long, short = 'o')]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct CosArgs {
    pub a: PathBuf,
    pub b: PathBuf,
    /// Direction name in A (needed when A holds several).
    #[arg(long)]
    pub a_name: Option<String>,
    #[arg(long)]
    pub b_name: Option<String>,
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Write a line plot of cosine vs layer.
    #[arg(long)]
    pub svg: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ExportCvecArgs {
    #[arg(long, short = 'd')]
    pub directions: PathBuf,
    /// Direction name (needed when the file holds several).
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, allow_hyphen_values = true)]
    pub coefficient: f32,
    /// Layers, e.g. "10-14" (each >= 1: llama.cpp control vectors start at layer 1).
    #[arg(long, allow_hyphen_values = true)]
    pub layers: String,
    #[arg(long, short = 'o')]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    pub file: PathBuf,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelsArg {
    Invariant,
    Llama,
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// GGUF model file.
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// CPU threads.
    #[arg(long, short = 't')]
    pub threads: Option<i32>,
    /// Layers to offload to the GPU (-1: all). Needs a cuda/metal/vulkan build.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub n_gpu_layers: i32,
    /// Context per sequence (prompt + generated tokens); KV memory is ctx x parallel.
    #[arg(long, default_value_t = 1024)]
    pub ctx: u32,
    /// Tokens per decode call.
    #[arg(long, default_value_t = 512)]
    pub batch: u32,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 16)]
    pub parallel: u32,
    /// Turn off llama.cpp's repacked weight buffers with --kernels llama (workaround for
    /// builds whose extra kernels crash, e.g. AMX under target-cpu=native).
    #[arg(long)]
    pub no_extra_bufts: bool,
    /// CPU matrix kernels: invariant (default: every sequence's numbers are the same bit
    /// for bit in any batch, alone, resumed or sharded) or llama (llama.cpp's own choice:
    /// faster for one to seven sequences on K-quant models, but results then depend in the
    /// last bits on what else is in the batch).
    #[arg(long, value_enum, default_value_t = KernelsArg::Invariant)]
    pub kernels: KernelsArg,
    /// Flash attention: off (default; batched and solo runs then agree bit for bit), on, or
    /// auto (llama.cpp decides).
    #[arg(long, default_value = "off", value_parser = ["off", "on", "auto"])]
    pub flash_attn: String,
    /// Memory the run may use, e.g. 8G (default: what the system reports available). A run
    /// that would not fit uses fewer parallel sequences, or is refused up front.
    #[arg(long, value_parser = persona_gate::memory::parse_size)]
    pub max_memory: Option<u64>,
}

impl ModelArgs {
    pub fn options(&self) -> ModelOptions {
        let d = ModelOptions::default();
        ModelOptions {
            threads: self.threads.unwrap_or(d.threads),
            n_gpu_layers: self.n_gpu_layers,
            ctx: self.ctx,
            batch: self.batch,
            parallel: self.parallel,
            use_extra_bufts: !self.no_extra_bufts,
            kernels: match self.kernels {
                KernelsArg::Invariant => Kernels::Invariant,
                KernelsArg::Llama => Kernels::Llama,
            },
            flash_attn: match self.flash_attn.as_str() {
                "on" => Some(true),
                "auto" => None,
                _ => Some(false),
            },
            max_memory: self.max_memory,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct PromptArgs {
    /// System prompt for every conversation.
    #[arg(long, conflicts_with = "no_system")]
    pub system: Option<String>,
    /// Render an explicitly empty system turn (suppresses a template's default one).
    #[arg(long)]
    pub no_system: bool,
    /// Jinja chat template file to use instead of the GGUF's tokenizer.chat_template.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// Special-token strings inside instructions: literal (default: plain text, so an
    /// instruction cannot close its own turn) or parse (as control tokens, like Hugging
    /// Face's apply_chat_template; for injection research).
    #[arg(long, value_enum, default_value_t = SpecialArg::Literal)]
    pub special_tokens: SpecialArg,
}

impl PromptArgs {
    pub fn special(&self) -> persona_gate::chat::SpecialTokens {
        self.special_tokens.mode()
    }

    pub fn system(&self) -> SystemPrompt {
        match (&self.system, self.no_system) {
            (Some(t), _) => SystemPrompt::Text(t.clone()),
            (None, true) => SystemPrompt::Empty,
            (None, false) => SystemPrompt::TemplateDefault,
        }
    }
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Print the whole chat template.
    #[arg(long)]
    pub show_template: bool,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Instructions (one per flag); none reads the built-in harmful set.
    #[arg(long = "prompt", short = 'p')]
    pub prompts: Vec<String>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Steering layers, e.g. "6,12" (default: 1/4, 1/2 and 3/4 depth).
    #[arg(long, allow_hyphen_values = true)]
    pub layers: Option<String>,
    /// Multiples of the persona direction to add.
    #[arg(long, value_delimiter = ',', default_values_t = vec![4.0f32], allow_hyphen_values = true)]
    pub coefficients: Vec<f32>,
    /// Built-in harmful prompts to use (at most 16).
    #[arg(long, default_value_t = 16)]
    pub n: usize,
    #[arg(long, default_value_t = 48)]
    pub max_new_tokens: usize,
}

pub use bench::BenchArgs;
