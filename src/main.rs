//! The `persona-gate` binary: parse flags, set up logging, dispatch, print errors on one line.

mod cli;

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

use cli::{Cli, Command};
use persona_gate::chat::{ChatTemplate, Prompt};
use persona_gate::engine::GenConfig;
use persona_gate::hooks::HookSet;
use persona_gate::model::Model;
use persona_gate::{bench, demo, ffi, hooks, label, prompts};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default = match cli.verbose {
        0 => "warn",
        1 => "persona_gate=debug,warn",
        _ => "debug,llama.cpp=trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("persona-gate: {}", msg.join(": ").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn load(m: &cli::ModelArgs) -> Result<Model> {
    Ok(Model::load(&m.model, &m.options())?)
}

fn template(model: &Model, p: &cli::PromptArgs) -> Result<ChatTemplate> {
    let src = match &p.chat_template {
        Some(f) => Some(
            std::fs::read_to_string(f).with_context(|| format!("--chat-template {}", f.display()))?,
        ),
        None => None,
    };
    Ok(model.chat_template(src)?)
}

fn run(cli: Cli) -> Result<()> {
    let out = &mut std::io::stdout().lock();
    match cli.command {
        Command::Info(a) => {
            let model = load(&a.model)?;
            let tmpl = template(&model, &a.prompt)?;
            writeln!(out, "{}", model.info)?;
            writeln!(out, "sha256        {}", model.sha256()?)?;
            let src = model.info.chat_template.as_deref().unwrap_or("");
            writeln!(out, "chat_template {} chars{}", src.len(), if a.show_template { "" } else { " (--show-template prints it)" })?;
            if a.show_template {
                writeln!(out, "{src}")?;
            }
            let f = tmpl.render(&a.prompt.system(), "Hello!")?;
            let p = Prompt::new(&model, f)?;
            writeln!(out, "example       {:?}", p.text)?;
            writeln!(out, "tokens        {} (instruction {:?}, post-instruction {:?})", p.tokens.len(), p.instruction, p.post_instruction)?;
            // The first decode checks that every layer exposes l_out-<il>.
            let mut h = HookSet::new(model.info.n_layer, model.info.n_embd);
            model.session()?.first_logits(std::slice::from_ref(&p), &mut h)?;
            writeln!(out, "hook points   resid_post.0-{} (l_out-<il> present in every layer)", model.info.n_layer - 1)?;
            writeln!(out, "llama.cpp     {}", persona_gate::LLAMA_CPP)?;
            writeln!(out, "system        {}", ffi::system_info().trim())?;
        }
        Command::Generate(a) => {
            let model = load(&a.model)?;
            let tmpl = template(&model, &a.prompt)?;
            let texts: Vec<String> = if a.prompts.is_empty() {
                prompts::builtin("harmful")?.into_iter().map(|i| i.text).collect()
            } else {
                a.prompts.clone()
            };
            let ps = texts.iter().map(|t| Ok(Prompt::new(&model, tmpl.render(&a.prompt.system(), t)?)?)).collect::<Result<Vec<_>>>()?;
            let cfg = GenConfig { max_new_tokens: a.max_new_tokens, keep_first_logits: false, ignore_eog: false };
            let mut h = HookSet::new(model.info.n_layer, model.info.n_embd);
            let g = model.session()?.generate(&ps, &cfg, &mut h, &mut |_, _| false, &mut |_| {})?;
            let labeler = label::Labeler::default();
            for (t, g) in texts.iter().zip(&g) {
                writeln!(out, "### {t}\n[{}] {}\n", labeler.label(&g.text), g.text.trim())?;
            }
        }
        Command::Demo(a) => {
            let model = load(&a.model)?;
            let tmpl = template(&model, &a.prompt)?;
            let layers = match &a.layers {
                Some(s) => hooks::parse_layers(s, model.info.n_layer).context("--layers")?,
                None => vec![],
            };
            for c in &a.coefficients {
                anyhow::ensure!(c.is_finite(), "--coefficients: {c} is not a finite number");
            }
            anyhow::ensure!(a.n >= 1, "--n: must be at least 1");
            writeln!(out, "model: {} ({}, {} layers, {})", model.info.path.display(), model.info.arch, model.info.n_layer, model.info.file_type)?;
            let cfg = demo::DemoConfig { layers, coefficients: a.coefficients.clone(), n_prompts: a.n.min(16), max_new_tokens: a.max_new_tokens, system: a.prompt.system() };
            demo::run(&model, &tmpl, &cfg, out)?;
        }
        Command::Bench(a) => {
            let model = load(&a.model)?;
            anyhow::ensure!(a.pp >= 1 && a.npp >= 1 && a.ntg >= 1 && a.repetitions >= 1, "--pp, --npp, --ntg and --repetitions must be at least 1");
            let opts = a.model.options();
            writeln!(out, "model {} ({}), threads {}, batch {}, {}", model.info.path.display(), model.info.file_type, opts.threads, opts.batch, persona_gate::LLAMA_CPP)?;
            writeln!(out, "| hooks | test | tokens/s |\n|---|---|---:|")?;
            let cfg = bench::BenchConfig { pp: a.pp, npp: a.npp, ntg: a.ntg, batches: a.batches.clone(), repetitions: a.repetitions };
            let rows = bench::run(&model, &cfg, &bench::HookConfig::ALL, &mut |r| {
                let test = if r.batch == 0 { format!("pp{}", a.pp) } else { format!("tg{} @ {} seq", a.ntg, r.batch) };
                let _ = writeln!(std::io::stdout(), "| {} | {} | {:.1} |", r.hooks.name(), test, r.tokens_per_s);
            })?;
            writeln!(out, "\nratio to no hooks:")?;
            for r in rows.iter().filter(|r| r.hooks != bench::HookConfig::None) {
                let base = rows.iter().find(|b| b.hooks == bench::HookConfig::None && b.batch == r.batch).map_or(f64::NAN, |b| b.tokens_per_s);
                let test = if r.batch == 0 { format!("pp{}", a.pp) } else { format!("tg{} @ {} seq", a.ntg, r.batch) };
                writeln!(out, "  {:<28} {:<14} {:.3}", r.hooks.name(), test, r.tokens_per_s / base)?;
            }
        }
    }
    Ok(())
}
