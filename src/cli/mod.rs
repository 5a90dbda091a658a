//! The command line: flags (clap) and one file per subcommand that parses its flags, calls
//! one library function and prints. No pipeline logic lives here.

pub mod agreement;
pub mod bench;
pub mod compare;
pub mod demo;
pub mod directions;
pub mod extract;
pub mod generate;
pub mod info;
pub mod judge;
pub mod progress;
pub mod reproduce;
pub mod select;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use persona_gate::chat::{ChatTemplate, Prompt, SpecialTokens, SystemPrompt};
use persona_gate::directions::DirectionFile;
use persona_gate::model::{FlashAttn, Kernels, Model, ModelOptions};
use persona_gate::prompts::{self, load as sets};
use persona_gate::{fsio, text};

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
    Info(info::InfoArgs),
    /// Greedy completions for instructions, formatted with the model's chat template.
    Generate(generate::GenerateArgs),
    /// Extract the compliant-persona direction and show baseline vs steered completions.
    Demo(demo::DemoArgs),
    /// Throughput with and without hooks (prompt and generated tokens/s).
    Bench(bench::BenchArgs),
    /// Extract a refusal or persona direction into a safetensors file.
    #[command(subcommand)]
    Extract(extract::ExtractCmd),
    /// Score refusal-direction candidates (position x layer) and choose one, or rank the
    /// steering layers of a persona direction.
    Select(select::SelectArgs),
    /// Compare direction files.
    #[command(subcommand)]
    Directions(directions::DirectionsCmd),
    /// Write a direction x coefficient x layers as a llama.cpp control-vector GGUF.
    ExportCvec(directions::ExportCvecArgs),
    /// Print a direction file's metadata, directions and per-layer norms.
    Inspect(directions::InspectArgs),
    /// Run the paper's experiment grid (or your --spec) and write CSVs, plots and a report;
    /// rerunning the same command resumes.
    Reproduce(reproduce::ReproduceArgs),
    /// Join the run directories of `reproduce --shard` runs and write the outputs.
    Merge(reproduce::MergeArgs),
    /// Quantize a GGUF to several types with llama.cpp (outputs named by type, reused when
    /// their recorded hash matches).
    Quantize(compare::QuantizeArgs),
    /// Compare quantized models with a reference: direction cosines, next-token KL and
    /// top-1 agreement, and refusal gating per condition (two-proportion tests).
    Compare(compare::CompareArgs),
    /// Judge a run directory's completions with a local GGUF judge (StrongREJECT rubric or
    /// Llama-Guard labels).
    Judge(judge::JudgeArgs),
    /// How two finished runs of one grid agree across conditions (Spearman's rho), e.g.
    /// --metric generate against --metric score.
    Agreement(agreement::AgreementArgs),
}

/// Runs one subcommand, printing its results to `out`.
///
/// # Errors
/// Whatever the subcommand reports; the binary prints it on one line.
pub fn dispatch(command: &Command, out: &mut dyn Write) -> Result<()> {
    match command {
        Command::Info(a) => info::run(a, out),
        Command::Generate(a) => generate::run(a, out),
        Command::Demo(a) => demo::run(a, out),
        Command::Bench(a) => bench::run(a, out),
        Command::Extract(c) => extract::run(c, out),
        Command::Select(a) => select::run(a, out),
        Command::Directions(c) => directions::run(c, out),
        Command::ExportCvec(a) => directions::export_cvec(a, out),
        Command::Inspect(a) => directions::inspect(a, out),
        Command::Reproduce(a) => reproduce::run(a, out),
        Command::Merge(a) => reproduce::merge(a, out),
        Command::Quantize(a) => compare::quantize(a, out),
        Command::Compare(a) => compare::run(a, out),
        Command::Judge(a) => judge::run(a, out),
        Command::Agreement(a) => agreement::run(a, out),
    }
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
    #[arg(long, value_enum, default_value_t = Kernels::Invariant)]
    pub kernels: Kernels,
    /// Flash attention: off (default; batched and solo runs then agree bit for bit), on, or
    /// auto (llama.cpp decides).
    #[arg(long, value_enum, default_value_t = FlashAttn::Off)]
    pub flash_attn: FlashAttn,
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
            kernels: self.kernels,
            flash_attn: self.flash_attn,
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
    #[arg(long, value_enum, default_value_t = SpecialTokens::Literal)]
    pub special_tokens: SpecialTokens,
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

fn load(m: &ModelArgs) -> Result<Model> {
    Ok(Model::load(&m.model, &m.options())?)
}

fn template(model: &Model, p: &PromptArgs) -> Result<ChatTemplate> {
    let src = match &p.chat_template {
        Some(f) => Some(fsio::read_text(f, "a Jinja chat template").context("--chat-template")?),
        None => None,
    };
    let mut t = ChatTemplate::for_model(model, src)?;
    t.set_special_tokens(p.special_tokens);
    Ok(t)
}

fn load_set(spec: &str, a: &SetArgs, flag: &str) -> Result<Vec<prompts::Instruction>> {
    let v = sets::resolve(spec, a.field.as_deref()).with_context(|| format!("--{flag}"))?;
    sets::sample(v, a.n, a.seed).map_err(|e| anyhow::anyhow!("--{flag} {spec}: --n: {e}"))
}

fn render_set(
    model: &Model,
    tmpl: &ChatTemplate,
    p: &PromptArgs,
    v: &[prompts::Instruction],
) -> Result<Vec<Prompt>> {
    Ok(Prompt::render_all(
        model,
        tmpl,
        &p.system(),
        v.iter().map(|i| i.text.as_str()),
    )?)
}

/// Fails before a long job when its output could not be written.
fn writable(p: &Path) -> Result<()> {
    fsio::check_writable(p).with_context(|| format!("{}", p.display()))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    fsio::write_atomic(path, bytes).with_context(|| format!("{}", path.display()))
}

fn print_norms(out: &mut dyn Write, f: &DirectionFile) -> Result<()> {
    for d in &f.directions {
        let n: Vec<String> = d.norms().iter().map(|x| format!("{x:.2}")).collect();
        writeln!(
            out,
            "{:<18} [{} x {}] norms by layer: {}",
            text::one_line(&d.name),
            d.n_layer(),
            d.n_embd(),
            n.join(" ")
        )?;
    }
    Ok(())
}
