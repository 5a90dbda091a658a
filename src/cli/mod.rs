//! Command-line flags (clap). No logic: each subcommand's flags become library options.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use persona_gate::chat::SystemPrompt;
use persona_gate::model::ModelOptions;

#[derive(Parser, Debug)]
#[command(name = "persona-gate", version, about = "Persona and refusal steering on quantized GGUF models through llama.cpp")]
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
    /// KV-cache cells, shared by the sequences of a batch.
    #[arg(long, default_value_t = 4096)]
    pub ctx: u32,
    /// Tokens per decode call.
    #[arg(long, default_value_t = 512)]
    pub batch: u32,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 16)]
    pub parallel: u32,
    /// Turn off llama.cpp's repacked weight buffers (workaround for builds whose extra
    /// kernels crash, e.g. AMX under target-cpu=native).
    #[arg(long)]
    pub no_extra_bufts: bool,
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
}

impl PromptArgs {
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

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens for the prompt-processing run (llama-bench -p).
    #[arg(long, default_value_t = 512)]
    pub pp: usize,
    /// Prompt tokens per sequence in generation runs (llama-batched-bench -npp).
    #[arg(long, default_value_t = 128)]
    pub npp: usize,
    /// Generated tokens per sequence (llama-batched-bench -ntg).
    #[arg(long, default_value_t = 64)]
    pub ntg: usize,
    /// Sequences generated together (llama-batched-bench -npl).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 4, 16])]
    pub batches: Vec<usize>,
    /// Timed repetitions per cell (the best is reported).
    #[arg(long, default_value_t = 2)]
    pub repetitions: usize,
}
