//! `persona-gate extract refusal|persona`: a direction file from contrasting prompt sets.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use persona_gate::directions::{self, PersonaAt, RefusalPositions};
use persona_gate::{fsio, prompts};

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
    pub model: super::ModelArgs,
    #[command(flatten)]
    pub prompt: super::PromptArgs,
    #[command(flatten)]
    pub set: super::SetArgs,
    /// Harmful instructions: a .json/.jsonl/.csv/.txt file or builtin:harmful.
    #[arg(long, default_value = "builtin:harmful")]
    pub harmful: String,
    /// Harmless instructions: a file or builtin:harmless.
    #[arg(long, default_value = "builtin:harmless")]
    pub harmless: String,
    /// post: every post-instruction token (each a candidate); last: the last prompt token.
    #[arg(long, value_enum, default_value_t = RefusalPositions::PostInstruction)]
    pub positions: RefusalPositions,
    /// Output .safetensors file.
    #[arg(long, short = 'o')]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct ExtractPersonaArgs {
    #[command(flatten)]
    pub model: super::ModelArgs,
    #[command(flatten)]
    pub prompt: super::PromptArgs,
    #[command(flatten)]
    pub set: super::SetArgs,
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
    #[arg(long, value_enum, default_value_t = PersonaAt::Last)]
    pub at: PersonaAt,
    /// Response tokens generated per question with --at response (llama.cpp's
    /// -n/--n-predict).
    #[arg(long, short = 'n', visible_alias = "n-predict", default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Output direction file (safetensors).
    #[arg(long, short = 'o')]
    pub out: PathBuf,
}

pub fn run(cmd: &ExtractCmd, out: &mut dyn Write) -> anyhow::Result<()> {
    match cmd {
        ExtractCmd::Refusal(a) => refusal(a, out),
        ExtractCmd::Persona(a) => persona(a, out),
    }
}

fn refusal(a: &ExtractRefusalArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    super::writable(&a.out)?;
    let model = super::load(&a.model)?;
    let tmpl = super::template(&model, &a.prompt)?;
    let harmful = super::load_set(&a.harmful, &a.set, "harmful")?;
    let harmless = super::load_set(&a.harmless, &a.set, "harmless")?;
    let f = directions::extract_refusal(
        &model,
        &tmpl,
        &a.prompt.system(),
        &harmful,
        &harmless,
        a.positions,
    )?;
    f.save(&a.out)?;
    writeln!(
        out,
        "wrote {} ({} directions from {} harmful and {} harmless prompts)",
        a.out.display(),
        f.directions.len(),
        harmful.len(),
        harmless.len()
    )?;
    super::print_norms(out, &f)
}

fn persona(a: &ExtractPersonaArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    super::writable(&a.out)?;
    let model = super::load(&a.model)?;
    let tmpl = super::template(&model, &a.prompt)?;
    let (src, origin) = match &a.personas {
        Some(p) => (
            fsio::read_text(p, "a personas TOML file").context("--personas")?,
            p.display().to_string(),
        ),
        None => (
            prompts::PERSONAS.to_string(),
            "built-in personas".to_string(),
        ),
    };
    let all = prompts::parse_personas(&src, &origin)?;
    let persona = all.get(&a.persona).with_context(|| {
        format!(
            "--persona: no persona '{}' in {origin} (has: {})",
            a.persona,
            all.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })?;
    let questions = super::load_set(&a.questions, &a.set, "questions")?;
    let at = a.at.positions(a.max_new_tokens);
    let f = directions::extract_persona(&model, &tmpl, &a.persona, persona, &questions, at)?;
    f.save(&a.out)?;
    writeln!(
        out,
        "wrote {} (persona '{}': {} + {} system prompts x {} questions)",
        a.out.display(),
        a.persona,
        persona.positive.len(),
        persona.negative.len(),
        questions.len()
    )?;
    super::print_norms(out, &f)
}
