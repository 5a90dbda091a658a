//! The command line: flags (clap) and one file per subcommand that parses its flags, calls
//! one library function and prints. No pipeline logic lives here.

pub mod agreement;
pub mod argv;
pub mod bench;
pub mod compare;
pub mod completions;
pub mod demo;
pub mod directions;
pub mod extract;
pub mod generate;
pub mod info;
pub mod judge;
pub mod progress;
pub mod reproduce;
pub mod select;
pub mod serve;

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
    /// Serve the model over an OpenAI-compatible HTTP API, each request with its own
    /// steering (`steering` in the request body), all requests batched together.
    Serve(serve::ServeArgs),
    /// Print a shell completion script: bash, zsh, fish, elvish or powershell (e.g.
    /// `persona-gate completions bash > ~/.local/share/bash-completion/completions/persona-gate`).
    Completions(completions::CompletionsArgs),
}

/// Runs one subcommand, printing its results to `out`.
///
/// # Errors
/// Whatever the subcommand reports; the binary prints it on one line.
pub fn dispatch(command: &Command, out: &mut dyn Write) -> Result<()> {
    match command {
        Command::Info(a) => info::run(a, out),
        Command::Generate(a) => generate::run(a, out),
        Command::Serve(a) => serve::run(a, out),
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
        Command::Completions(a) => completions::run(a, out),
    }
}

#[derive(Args, Debug, Clone)]
pub struct SetArgs {
    /// JSON/JSONL field or CSV column holding the instruction (default: instruction,
    /// forbidden_prompt, goal or prompt, whichever exists).
    #[arg(long)]
    pub field: Option<String>,
    /// Use a seeded sample of this many instructions from each set. Not llama.cpp's -n (new
    /// tokens), which is -n/--n-predict where a command generates.
    #[arg(long)]
    pub n: Option<usize>,
    /// Seed of the --n sample. Not llama.cpp's -s/--seed (the token sampler's seed), which is
    /// generate's -s/--seed.
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
    /// Layers to offload to the GPU (-1: all). Needs a cuda/metal/vulkan build. llama.cpp's
    /// -ngl and --gpu-layers work too.
    #[arg(
        long,
        visible_alias = "gpu-layers",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub n_gpu_layers: i32,
    /// Context PER SEQUENCE (prompt + generated tokens); KV memory is ctx x parallel.
    /// -c/--ctx-size are llama.cpp's names with this per-sequence meaning: llama.cpp splits
    /// its -c across -np, so its `-c 8192 -np 4` is `-c 2048 -np 4` here (the same with -np 1).
    #[arg(long, short = 'c', visible_alias = "ctx-size", default_value_t = 1024)]
    pub ctx: u32,
    /// Tokens per decode call. Each call is one ubatch here (n_batch = n_ubatch), so
    /// llama.cpp's -b/--batch-size and -ub/--ubatch-size both name this one value (give one).
    #[arg(
        long,
        short = 'b',
        visible_aliases = ["batch-size", "ubatch-size"],
        default_value_t = 512
    )]
    pub batch: u32,
    /// Sequences decoded together (llama.cpp's -np/--parallel).
    #[arg(long, default_value_t = 16)]
    pub parallel: u32,
    /// Turn off llama.cpp's repacked weight buffers with --kernels llama (workaround for
    /// builds whose extra kernels crash, e.g. AMX under target-cpu=native).
    #[arg(long)]
    pub no_extra_bufts: bool,
    /// CPU matrix kernels: invariant (the default, `serve` excepted: every sequence's
    /// numbers are the same bit for bit in any batch, alone, resumed or sharded), rowwise
    /// (as invariant, through plain per-row dot products: fast for few sequences, slower
    /// prompts; `serve`'s default) or llama (llama.cpp's own choice: fast for few
    /// sequences, but results then depend in the last bits on what else is in the batch).
    #[arg(long, value_enum)]
    pub kernels: Option<Kernels>,
    /// Flash attention: off (default; batched and solo runs then agree bit for bit), on, or
    /// auto (llama.cpp decides; llama.cpp's own default). llama.cpp's -fa works too.
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
            kernels: self.kernels.unwrap_or_default(),
            flash_attn: self.flash_attn,
            max_memory: self.max_memory,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct PromptArgs {
    /// System prompt for every conversation (llama.cpp's -sys/--system-prompt work too).
    #[arg(long, visible_alias = "system-prompt", conflicts_with = "no_system")]
    pub system: Option<String>,
    /// Render an explicitly empty system turn (suppresses a template's default one).
    #[arg(long)]
    pub no_system: bool,
    /// Jinja chat template FILE to use instead of the GGUF's tokenizer.chat_template
    /// (llama.cpp's --chat-template-file; llama.cpp's --chat-template takes the template text
    /// or a built-in name instead).
    #[arg(long, visible_alias = "chat-template-file")]
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
    let mut t = template_file(model, p.chat_template.as_deref())?;
    t.set_special_tokens(p.special_tokens);
    Ok(t)
}

/// The model's chat template, or the `--chat-template` FILE's.
fn template_file(model: &Model, file: Option<&Path>) -> Result<ChatTemplate> {
    let src = match file {
        Some(f) => Some(fsio::read_text(f, "a Jinja chat template").context("--chat-template")?),
        None => None,
    };
    Ok(ChatTemplate::for_model(model, src)?)
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

/// `v` as pretty-printed JSON and a newline (`--json`). Non-finite numbers print as null
/// (JSON has no NaN).
fn print_json(out: &mut dyn Write, v: &serde_json::Value) -> Result<()> {
    // Rendered first: written through serde_json, a closed pipe (`| head`) would come back
    // as a serde_json error, which main does not see as the io::Error it is.
    let mut bytes = serde_json::to_vec_pretty(v)?;
    bytes.push(b'\n');
    out.write_all(&bytes)?;
    Ok(())
}

/// clap's error on one line: its first line, then its tips ("a similar argument exists:
/// '--threads'"), without the usage block.
pub fn one_line_error(e: &clap::Error) -> String {
    let text = e.to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ")
        .to_string();
    let tips: Vec<&str> = lines.filter(|l| l.starts_with("tip: ")).collect();
    std::iter::once(first.as_str())
        .chain(tips)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Parses as the binary does: llama.cpp's multi-letter shorts rewritten, then clap.
    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let v = std::iter::once("persona-gate")
            .chain(args.iter().copied())
            .map(std::ffi::OsString::from);
        Cli::try_parse_from(argv::rewrite(v, &Cli::command()))
    }

    fn info(extra: &[&str]) -> (ModelArgs, PromptArgs) {
        let mut a = vec!["info", "-m", "x.gguf"];
        a.extend(extra);
        match parse(&a).unwrap_or_else(|e| panic!("{a:?}: {e}")).command {
            Command::Info(i) => (i.model, i.prompt),
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn llama_cpp_names_parse_to_our_flags() {
        for f in [
            &["--ctx", "2048"][..],
            &["-c", "2048"],
            &["--ctx-size", "2048"],
        ] {
            assert_eq!(info(f).0.ctx, 2048, "{f:?}");
        }
        for f in [
            &["--batch", "256"][..],
            &["-b", "256"],
            &["--batch-size", "256"],
            &["--ubatch-size", "256"],
            &["-ub", "256"],
            &["-ub=256"],
        ] {
            assert_eq!(info(f).0.batch, 256, "{f:?}");
        }
        for (f, want) in [
            (&["--n-gpu-layers", "5"][..], 5),
            (&["--gpu-layers", "5"], 5),
            (&["-ngl", "5"], 5),
            (&["-ngl=5"], 5),
            (&["-ngl", "-1"], -1),
        ] {
            assert_eq!(info(f).0.n_gpu_layers, want, "{f:?}");
        }
        for f in [&["--parallel", "4"][..], &["-np", "4"], &["-np=4"]] {
            assert_eq!(info(f).0.parallel, 4, "{f:?}");
        }
        for f in [&["--flash-attn", "on"][..], &["-fa", "on"], &["-fa=on"]] {
            assert_eq!(info(f).0.flash_attn, FlashAttn::On, "{f:?}");
        }
        for f in [
            &["--system", "Be terse."][..],
            &["--system-prompt", "Be terse."],
            &["-sys", "Be terse."],
        ] {
            assert_eq!(info(f).1.system.as_deref(), Some("Be terse."), "{f:?}");
        }
        for f in [
            &["--chat-template", "t.jinja"][..],
            &["--chat-template-file", "t.jinja"],
        ] {
            assert_eq!(
                info(f).1.chat_template,
                Some(PathBuf::from("t.jinja")),
                "{f:?}"
            );
        }
        // Together, as a llama.cpp command line would have them.
        let (m, p) = info(&[
            "-c", "512", "-b", "64", "-ngl", "99", "-np", "2", "-fa", "auto", "-t", "3", "-sys",
            "S",
        ]);
        assert_eq!(
            (m.ctx, m.batch, m.n_gpu_layers, m.parallel, m.threads),
            (512, 64, 99, 2, Some(3))
        );
        assert_eq!(
            (m.flash_attn, p.system.as_deref()),
            (FlashAttn::Auto, Some("S"))
        );
        match parse(&[
            "reproduce",
            "-m",
            "x",
            "--chat-template-file",
            "t.jinja",
            "-c",
            "99",
        ])
        .unwrap()
        .command
        {
            Command::Reproduce(r) => {
                assert_eq!(r.chat_template, Some(PathBuf::from("t.jinja")));
                assert_eq!(r.model.ctx, 99);
            }
            c => panic!("{c:?}"),
        }
        match parse(&[
            "compare",
            "--reference",
            "r",
            "--models",
            "a",
            "-o",
            "o",
            "-c",
            "99",
        ])
        .unwrap()
        .command
        {
            Command::Compare(c) => assert_eq!(c.ctx, 99),
            c => panic!("{c:?}"),
        }
    }

    /// -n is llama.cpp's n-predict (new tokens) wherever a command generates; --n stays the
    /// size of a prompt sample, and no flag means both.
    #[test]
    fn n_predict_and_the_sample_size_do_not_clash() {
        for f in [
            &["--max-new-tokens", "7"][..],
            &["-n", "7"],
            &["--n-predict", "7"],
        ] {
            let mut a = vec!["generate", "-m", "x"];
            a.extend(f);
            match parse(&a).unwrap().command {
                Command::Generate(g) => assert_eq!(g.max_new_tokens, 7, "{f:?}"),
                c => panic!("{c:?}"),
            }
            let mut a = vec!["extract", "persona", "-m", "x", "-o", "o", "--n", "3"];
            a.extend(f);
            match parse(&a).unwrap().command {
                Command::Extract(extract::ExtractCmd::Persona(p)) => {
                    assert_eq!((p.max_new_tokens, p.set.n), (7, Some(3)), "{f:?}")
                }
                c => panic!("{c:?}"),
            }
        }
        match parse(&["demo", "-m", "x", "--n", "3", "-n", "7"])
            .unwrap()
            .command
        {
            Command::Demo(d) => assert_eq!((d.n, d.max_new_tokens), (3, 7)),
            c => panic!("{c:?}"),
        }
        // Where nothing is generated, -n is no flag at all; -s is only generate's (the token
        // sampler's seed; --seed elsewhere seeds the prompt sample); -b and -ub are one value.
        for bad in [
            &["extract", "refusal", "-m", "x", "-o", "o", "-n", "3"][..],
            &["select", "-m", "x", "-d", "d", "-n", "3"],
            &["reproduce", "-m", "x", "-n", "3"],
            &["extract", "refusal", "-m", "x", "-o", "o", "-s", "3"],
            &["info", "-m", "x", "-b", "64", "-ub", "64"],
            &["info", "-m", "x", "--ctx", "64", "-c", "64"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        match parse(&["generate", "-m", "x", "-s", "3", "--temp", "0.7"])
            .unwrap()
            .command
        {
            Command::Generate(g) => assert_eq!((g.sample.seed, g.sample.temperature), (3, 0.7)),
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn help_names_the_llama_cpp_flags() {
        let help = |path: &[&str]| {
            let mut c = Cli::command();
            c.build();
            let mut c = &mut c;
            for p in path {
                c = c.find_subcommand_mut(p).unwrap();
            }
            c.render_long_help().to_string()
        };
        let h = help(&["info"]);
        for want in [
            "-c, --ctx <CTX>",
            "--ctx-size",
            "PER SEQUENCE",
            "`-c 8192 -np 4` is `-c 2048 -np 4` here",
            "-b, --batch <BATCH>",
            "--batch-size",
            "--ubatch-size",
            "-ub/--ubatch-size",
            "-ngl",
            "--gpu-layers",
            "-np/--parallel",
            "-fa",
            "-sys/--system-prompt",
            "--chat-template-file",
        ] {
            assert!(h.contains(want), "info --help lacks {want:?}");
        }
        let h = help(&["generate"]);
        for want in ["-n, --max-new-tokens", "--n-predict", "-n/--n-predict"] {
            assert!(h.contains(want), "generate --help lacks {want:?}");
        }
        let h = help(&["extract", "refusal"]);
        for want in ["Not llama.cpp's -n", "Not llama.cpp's -s/--seed"] {
            assert!(h.contains(want), "extract refusal --help lacks {want:?}");
        }
    }

    /// Every flag and operand of every subcommand says what it is in --help.
    #[test]
    fn every_argument_has_help() {
        fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in c.get_arguments() {
                let helped = a
                    .get_help()
                    .is_some_and(|h| !h.to_string().trim().is_empty());
                if !helped && !["help", "version"].contains(&a.get_id().as_str()) {
                    missing.push(format!("{path} {}", a.get_id()));
                }
            }
            for s in c.get_subcommands() {
                if s.get_about().is_none() && s.get_name() != "help" {
                    missing.push(format!("{path} {} (no about)", s.get_name()));
                }
                walk(s, &format!("{path} {}", s.get_name()), missing);
            }
        }
        let mut cmd = Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, "persona-gate", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }
}
