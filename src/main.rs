//! The `persona-gate` binary: parse flags, set up logging, dispatch, print errors on one line.

mod cli;

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;

use cli::{Cli, Command};
use persona_gate::chat::{ChatTemplate, Prompt};
use persona_gate::directions::{
    self, cvec, select, DirectionFile, PersonaPositions, RefusalPositions,
};
use persona_gate::engine::GenConfig;
use persona_gate::hooks::HookSet;
use persona_gate::model::Model;
use persona_gate::prompts::load as sets;
use persona_gate::{demo, experiment, ffi, hooks, label, plot, prompts, util};

/// Checks the CPU before any other code of the binary runs, including llama.cpp's C++ static
/// constructors (prioritised `.init_array` entries run before unprioritised ones).
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array.00101"]
static CPU_CHECK: extern "C" fn() = {
    extern "C" fn check() {
        persona_gate::cpu::check_or_exit();
    }
    check
};

fn main() -> ExitCode {
    #[cfg(not(target_os = "linux"))]
    persona_gate::cpu::check_or_exit();
    // Flag errors are one line too (clap's own usage text is multi-line); help and version
    // print as usual.
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let text = e.to_string();
            let first = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments");
            eprintln!(
                "persona-gate: {} (see --help)",
                first.trim_start_matches("error: ").trim()
            );
            return ExitCode::from(2);
        }
    };
    let default = match cli.verbose {
        0 => "warn",
        1 => "persona_gate=debug,warn",
        _ => "debug,llama.cpp=trace",
    };
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    // Plain warnings by default; timestamps only when debugging.
    if cli.verbose == 0 {
        fmt.without_time().init();
    } else {
        fmt.init();
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that went away (`| head`) is not an error of ours.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
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
        Some(f) => Some(util::read_text(f, "a Jinja chat template").context("--chat-template")?),
        None => None,
    };
    let mut t = model.chat_template(src)?;
    t.set_special_tokens(p.special());
    Ok(t)
}

/// A progress bar on stderr; hidden when stderr is not a terminal.
fn bar(total: usize, what: &str) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(total as u64);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    b.set_message(what.to_string());
    b
}

fn load_set(spec: &str, a: &cli::SetArgs, flag: &str) -> Result<Vec<prompts::Instruction>> {
    let v = sets::resolve(spec, a.field.as_deref()).with_context(|| format!("--{flag}"))?;
    sets::sample(v, a.n, a.seed).map_err(|e| anyhow::anyhow!("--{flag} {spec}: --n: {e}"))
}

fn render_set(
    model: &Model,
    tmpl: &ChatTemplate,
    p: &cli::PromptArgs,
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
fn writable(p: &std::path::Path) -> Result<()> {
    util::check_writable(p).with_context(|| format!("{}", p.display()))
}

fn write_file(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    util::write_atomic(path, bytes).with_context(|| format!("{}", path.display()))
}

fn run(cli: Cli) -> Result<()> {
    let out = &mut std::io::stdout().lock();
    match cli.command {
        Command::Info(a) => {
            let model = Model::load_with(&a.model.model, &a.model.options(), false)?;
            let tmpl = template(&model, &a.prompt)?;
            writeln!(out, "{}", model.info)?;
            let o = &model.options;
            let need = model.footprint.need(o.ctx, o.batch, o.parallel);
            writeln!(
                out,
                "memory        about {} for --parallel {} x --ctx {} ({} available: {})",
                persona_gate::memory::gib(need),
                o.parallel,
                o.ctx,
                model
                    .budget
                    .as_ref()
                    .map_or("unknown".into(), |b| persona_gate::memory::gib(b.bytes)),
                model
                    .budget
                    .as_ref()
                    .map_or("not readable here", |b| b.source.as_str()),
            )?;
            writeln!(
                out,
                "build         {}, kernels {}",
                persona_gate::cpu::built_for(),
                o.kernels.name()
            )?;
            writeln!(out, "sha256        {}", model.sha256()?)?;
            let src = model.info.chat_template.as_deref().unwrap_or("");
            writeln!(
                out,
                "chat_template {} chars{}",
                src.len(),
                if a.show_template {
                    ""
                } else {
                    " (--show-template prints it)"
                }
            )?;
            if a.show_template {
                writeln!(out, "{}", util::printable(src))?;
            }
            let f = tmpl.render(&a.prompt.system(), "Hello!")?;
            let p = Prompt::new(&model, f)?;
            writeln!(out, "example       {:?}", p.text)?;
            writeln!(
                out,
                "tokens        {} (instruction {:?}, post-instruction {:?})",
                p.tokens.len(),
                p.instruction,
                p.post_instruction
            )?;
            // The first decode checks that every layer exposes l_out-<il>.
            let mut h = HookSet::new(model.info.n_layer, model.info.n_embd);
            model
                .session()?
                .first_logits(std::slice::from_ref(&p), &mut h)?;
            writeln!(
                out,
                "hook points   resid_post.0-{} (l_out-<il> present in every layer)",
                model.info.n_layer - 1
            )?;
            writeln!(out, "llama.cpp     {}", persona_gate::LLAMA_CPP)?;
            writeln!(out, "system        {}", ffi::system_info().trim())?;
        }
        Command::Generate(a) => {
            let model = load(&a.model)?;
            let tmpl = template(&model, &a.prompt)?;
            let texts: Vec<String> = if a.prompts.is_empty() {
                prompts::builtin("harmful")?
                    .into_iter()
                    .map(|i| i.text)
                    .collect()
            } else {
                a.prompts.clone()
            };
            let ps = Prompt::render_all(
                &model,
                &tmpl,
                &a.prompt.system(),
                texts.iter().map(String::as_str),
            )?;
            let cfg = GenConfig {
                max_new_tokens: a.max_new_tokens,
                keep_first_logits: false,
                ignore_eog: false,
                digest: false,
            };
            let mut h = HookSet::new(model.info.n_layer, model.info.n_embd);
            let g = model
                .session()?
                .generate(&ps, &cfg, &mut h, &mut |_, _| false, &mut |_| {})?;
            let labeler = label::Labeler::default();
            for (t, g) in texts.iter().zip(&g) {
                writeln!(
                    out,
                    "### {t}\n[{}] {}\n",
                    labeler.label(&g.text),
                    g.text.trim()
                )?;
            }
        }
        Command::Demo(a) => {
            let model = load(&a.model)?;
            let tmpl = template(&model, &a.prompt)?;
            let layers = match &a.layers {
                Some(s) => hooks::LayerSet::parse(s, model.info.n_layer)
                    .context("--layers")?
                    .into_vec(),
                None => vec![],
            };
            for c in &a.coefficients {
                anyhow::ensure!(c.is_finite(), "--coefficients: {c} is not a finite number");
            }
            anyhow::ensure!(a.n >= 1, "--n: must be at least 1");
            writeln!(
                out,
                "model: {} ({}, {} layers, {})",
                model.info.path.display(),
                model.info.arch,
                model.info.n_layer,
                model.info.file_type
            )?;
            let cfg = demo::DemoConfig {
                layers,
                coefficients: a.coefficients.clone(),
                n_prompts: a.n.min(16),
                max_new_tokens: a.max_new_tokens,
                system: a.prompt.system(),
            };
            demo::run(&model, &tmpl, &cfg, out)?;
        }
        Command::Bench(a) => cli::bench::run(&a, load(&a.model)?, out)?,
        Command::Extract(cli::ExtractCmd::Refusal(a)) => {
            writable(&a.out)?;
            let model = load(&a.model)?;
            let tmpl = template(&model, &a.prompt)?;
            let harmful = load_set(&a.harmful, &a.set, "harmful")?;
            let harmless = load_set(&a.harmless, &a.set, "harmless")?;
            let pos = if a.positions == "last" {
                RefusalPositions::Last
            } else {
                RefusalPositions::PostInstruction
            };
            let f = directions::extract_refusal(
                &model,
                &tmpl,
                &a.prompt.system(),
                &harmful,
                &harmless,
                pos,
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
            print_norms(out, &f)?;
        }
        Command::Extract(cli::ExtractCmd::Persona(a)) => {
            writable(&a.out)?;
            let model = load(&a.model)?;
            let tmpl = template(&model, &a.prompt)?;
            let (src, origin) = match &a.personas {
                Some(p) => (
                    util::read_text(p, "a personas TOML file").context("--personas")?,
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
            let questions = load_set(&a.questions, &a.set, "questions")?;
            let at = if a.at == "response" {
                PersonaPositions::Response {
                    max_new_tokens: a.max_new_tokens,
                }
            } else {
                PersonaPositions::Last
            };
            let f =
                directions::extract_persona(&model, &tmpl, &a.persona, persona, &questions, at)?;
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
            print_norms(out, &f)?;
        }
        Command::Select(a) => {
            if let Some(p) = &a.csv {
                writable(p)?;
            }
            let model = load(&a.model)?;
            let tmpl = template(&model, &a.prompt)?;
            let f = DirectionFile::load(&a.directions)?;
            f.check_model(&model.info)
                .with_context(|| format!("{}", a.directions.display()))?;
            let layers = match &a.layers {
                Some(s) => hooks::LayerSet::parse(s, model.info.n_layer)
                    .context("--layers")?
                    .into_vec(),
                None => (0..model.info.n_layer).collect(),
            };
            anyhow::ensure!(
                a.coefficient.is_finite(),
                "--coefficient: {} is not a finite number",
                a.coefficient
            );
            let harmful = render_set(
                &model,
                &tmpl,
                &a.prompt,
                &load_set(&a.harmful_val, &a.set, "harmful-val")?,
            )?;
            if f.meta.get("kind").map(String::as_str) == Some("persona") {
                let d = f.get(None)?;
                let b = bar(layers.len(), "layers");
                let (base, ranked) = select::rank_persona_layers(
                    &model,
                    d,
                    a.coefficient,
                    &harmful,
                    &layers,
                    a.chunk,
                    &mut |k, _| b.set_position(k as u64),
                )?;
                b.finish_and_clear();
                let mut w = csv::Writer::from_writer(Vec::new());
                w.write_record([
                    "layer",
                    "coefficient",
                    "mean_refusal_score",
                    "delta_vs_baseline",
                ])?;
                for (l, sc) in &ranked {
                    w.write_record([
                        l.to_string(),
                        a.coefficient.to_string(),
                        format!("{sc:.6}"),
                        format!("{:.6}", sc - base),
                    ])?;
                }
                let bytes = w.into_inner()?;
                match &a.csv {
                    Some(p) => write_file(p, &bytes)?,
                    None => out.write_all(&bytes)?,
                }
                let (l, sc) = ranked[0];
                writeln!(out, "baseline mean refusal score {base:.3}; steering with {} x {} lowers it most at layer {l} ({sc:.3})", a.coefficient, d.name)?;
            } else {
                let harmless = render_set(
                    &model,
                    &tmpl,
                    &a.prompt,
                    &load_set(&a.harmless_val, &a.set, "harmless-val")?,
                )?;
                let n = f.directions.len() * layers.len() * 3;
                let b = bar(n, "candidates");
                let sel = select::select_refusal(
                    &model,
                    &f,
                    &harmful,
                    &harmless,
                    &layers,
                    a.chunk,
                    &mut |k, _| b.set_position(k as u64),
                )?;
                b.finish_and_clear();
                let bytes = sel.to_csv();
                match &a.csv {
                    Some(p) => write_file(p, &bytes)?,
                    None => out.write_all(&bytes)?,
                }
                writeln!(out, "{}", sel.explain())?;
            }
        }
        Command::Directions(cli::DirectionsCmd::Cos(a)) => {
            let (fa, fb) = (DirectionFile::load(&a.a)?, DirectionFile::load(&a.b)?);
            let da = fa
                .get(a.a_name.as_deref())
                .with_context(|| format!("{}", a.a.display()))?;
            let db = fb
                .get(a.b_name.as_deref())
                .with_context(|| format!("{}", a.b.display()))?;
            let cos = directions::cosine_per_layer(da, db)
                .with_context(|| format!("{} vs {}", a.a.display(), a.b.display()))?;
            // Check every output before writing any, so a bad --svg leaves no CSV behind.
            for p in a.csv.iter().chain(&a.svg) {
                util::check_writable(p).with_context(|| format!("{}", p.display()))?;
            }
            let mut w = csv::Writer::from_writer(Vec::new());
            w.write_record(["layer", "a", "b", "cosine"])?;
            for (l, c) in cos.iter().enumerate() {
                w.write_record([
                    l.to_string(),
                    da.name.clone(),
                    db.name.clone(),
                    format!("{c:.6}"),
                ])?;
            }
            let bytes = w.into_inner()?;
            match &a.csv {
                Some(p) => write_file(p, &bytes)?,
                None => out.write_all(&bytes)?,
            }
            if let Some(p) = &a.svg {
                let s = plot::Series {
                    name: format!("{} vs {}", da.name, db.name),
                    points: cos
                        .iter()
                        .enumerate()
                        .map(|(l, &c)| (l as f64, c))
                        .collect(),
                    band: None,
                };
                write_file(
                    p,
                    plot::line_plot(
                        "cosine similarity per layer",
                        "layer (resid_post)",
                        "cosine",
                        &[s],
                        Some((-1.0, 1.0)),
                    )
                    .as_bytes(),
                )?;
            }
        }
        Command::Directions(cli::DirectionsCmd::Random(a)) => {
            let f = DirectionFile::load(&a.like)?;
            let d = f
                .get(a.name.as_deref())
                .with_context(|| format!("{}", a.like.display()))?;
            let norms = d.norms();
            let r = directions::random(
                a.seed,
                d.n_layer(),
                d.n_embd(),
                a.norm_matched.then_some(&norms[..]),
            );
            let mut meta = std::collections::BTreeMap::new();
            for k in ["arch", "model_sha256", "model_file", "quant"] {
                if let Some(v) = f.meta.get(k) {
                    meta.insert(k.to_string(), v.clone());
                }
            }
            meta.insert("kind".into(), "random".into());
            meta.insert("seed".into(), a.seed.to_string());
            meta.insert(
                "like".into(),
                format!(
                    "{}{}",
                    d.name,
                    if a.norm_matched {
                        " (norm-matched)"
                    } else {
                        " (unit)"
                    }
                ),
            );
            meta.insert(
                "tool_version".into(),
                format!("persona-gate {}", persona_gate::VERSION),
            );
            let out_file = DirectionFile::new(vec![r], meta)?;
            out_file.save(&a.out)?;
            writeln!(
                out,
                "wrote {}: random.s{} shaped like {}",
                a.out.display(),
                a.seed,
                d.name
            )?;
        }
        Command::ExportCvec(a) => {
            writable(&a.out)?;
            let f = DirectionFile::load(&a.directions)?;
            let d = f
                .get(a.name.as_deref())
                .with_context(|| format!("{}", a.directions.display()))?;
            let layers = hooks::LayerSet::parse(&a.layers, d.n_layer())
                .context("--layers")?
                .into_vec();
            let arch = f.meta.get("arch").cloned().unwrap_or_else(|| "any".into());
            let bytes = cvec::export(d, &arch, a.coefficient, &layers)
                .map_err(anyhow::Error::msg)
                .context("export-cvec")?;
            write_file(&a.out, &bytes)?;
            writeln!(
                out,
                "wrote {}: {} x {} at layers {:?} ({} for llama.cpp --control-vector)",
                a.out.display(),
                a.coefficient,
                d.name,
                layers,
                arch
            )?;
        }
        Command::Reproduce(a) => reproduce(&a, out)?,
        Command::Merge(a) => {
            let (plan, f) = experiment::merge(&a.out, &a.inputs)?;
            writeln!(out, "{}", experiment::report::table(f.metric, &f.summaries))?;
            writeln!(
                out,
                "merged {} groups into {}",
                plan.n_groups,
                a.out.display()
            )?;
        }
        Command::Quantize(a) => {
            let threads = a
                .threads
                .unwrap_or(persona_gate::model::ModelOptions::default().threads);
            let pb = bar(0, "quantize");
            let r = persona_gate::quant::quantize(
                &a.model,
                &a.types,
                &a.out_dir,
                threads,
                &mut |s| pb.suspend(|| eprintln!("warning: {s}")),
                &mut |i, n, t| {
                    pb.set_length(n as u64);
                    pb.set_position(i as u64);
                    pb.set_message(t.to_string());
                },
            )?;
            pb.finish_and_clear();
            for q in &r {
                writeln!(
                    out,
                    "{:<7} {} ({:.1} MiB, sha256 {}…){}",
                    q.ty,
                    q.path.display(),
                    q.bytes as f64 / 1048576.0,
                    &q.sha256[..12],
                    if q.reused {
                        ", reused".to_string()
                    } else {
                        format!(", {:.1}s", q.seconds)
                    }
                )?;
            }
        }
        Command::Compare(a) => {
            use experiment::{preset, spec::Spec};
            let spec = match &a.spec {
                Some(p) => Spec::parse(
                    &String::from_utf8(util::read_input(p, "a spec TOML file")?)
                        .map_err(|_| anyhow::anyhow!("{}: not UTF-8", p.display()))?,
                    &p.display().to_string(),
                )?,
                None => {
                    let g = persona_gate::model::check_gguf(&a.reference)?;
                    let nl = g.arch_u64("block_count").unwrap_or(0) as usize;
                    Spec::parse(
                        &preset::preset(nl, preset::Size::Demo, &Default::default()),
                        "preset",
                    )?
                }
            };
            let opts = persona_gate::model::ModelOptions {
                threads: a
                    .threads
                    .unwrap_or(persona_gate::model::ModelOptions::default().threads),
                ctx: a.ctx,
                max_memory: a.max_memory,
                ..Default::default()
            };
            let pb = bar(0, "compare");
            let mut progress = |p: &str, done: usize, total: usize, item: &str| {
                pb.set_length(total as u64);
                pb.set_position(done as u64);
                pb.set_message(format!("{p} {item}"));
            };
            let mut note = |s: String| pb.suspend(|| eprintln!("{s}"));
            let r = persona_gate::compare::compare(
                &a.reference,
                &a.models,
                &spec,
                &a.out,
                &opts,
                !a.no_cross,
                &mut progress,
                &mut note,
            )?;
            pb.finish_and_clear();
            write!(out, "{}", r.summary)?;
            writeln!(out, "wrote {} in {}", r.files.join(", "), a.out.display())?;
        }
        Command::Judge(a) => cli::judge::run(&a, out)?,
        Command::Agreement(a) => {
            let (rows, rho, ma, mb) = experiment::report::agreement(&a.a, a.b.as_deref())?;
            let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(9);
            writeln!(
                out,
                "{:<w$} {:>12} {:>12}",
                "condition",
                ma.to_string(),
                mb.to_string()
            )?;
            for (c, x, y) in &rows {
                writeln!(out, "{c:<w$} {x:>12.4} {y:>12.4}")?;
            }
            writeln!(out, "Spearman rho over {} conditions: {rho:.3}", rows.len())?;
        }
        Command::Inspect(a) => {
            let f = DirectionFile::load(&a.file)?;
            for (k, v) in f.meta.iter().filter(|(k, _)| !k.starts_with("norms.")) {
                writeln!(out, "{:<18} {}", util::one_line(k), util::one_line(v))?;
            }
            print_norms(out, &f)?;
        }
    }
    Ok(())
}

fn reproduce(a: &cli::ReproduceArgs, out: &mut dyn Write) -> Result<()> {
    use experiment::{preset, run, spec::Metric, spec::Spec};
    // Flags that need no model are checked first.
    let shard: run::Shard = match &a.shard {
        Some(s) => s.parse().map_err(anyhow::Error::msg)?,
        None => run::Shard::default(),
    };
    if a.n == Some(0) || a.harmless_n == Some(0) {
        anyhow::bail!("--n / --harmless-n: must be at least 1");
    }
    let spec_src = match &a.spec {
        Some(p) => Some(
            String::from_utf8(util::read_input(p, "a spec TOML file")?)
                .map_err(|_| anyhow::anyhow!("{}: not UTF-8", p.display()))?,
        ),
        None => None,
    };
    if let (Some(src), Some(p)) = (&spec_src, &a.spec) {
        Spec::parse(src, &p.display().to_string())?;
    }
    let template_src = match &a.chat_template {
        Some(f) => Some(util::read_text(f, "a Jinja chat template").context("--chat-template")?),
        None => None,
    };
    let model = load(&a.model)?;
    let (src, origin) = match (spec_src, &a.spec) {
        (Some(s), Some(p)) => (s, p.display().to_string()),
        _ => {
            let size = if a.size == "full" {
                preset::Size::Full
            } else {
                preset::Size::Demo
            };
            let p = preset::PresetPrompts {
                harmful: a.harmful.clone(),
                n: a.n,
                harmless: a.harmless.clone(),
                harmless_n: a.harmless_n,
            };
            (
                preset::preset(model.info.n_layer, size, &p),
                "preset".to_string(),
            )
        }
    };
    let mut spec = Spec::parse(&src, &origin)?;
    if let Some(m) = &a.metric {
        spec.metric = if m == "score" {
            Metric::Score
        } else {
            Metric::Generate
        };
    }
    if a.print_spec {
        write!(out, "{src}")?;
        if a.metric.is_some() {
            writeln!(out, "# --metric {}: overrides metric above", spec.metric)?;
        }
        return Ok(());
    }
    if a.dry_run {
        let e = experiment::estimate(&model, &spec, template_src)?;
        let (lo, hi) = e.seconds();
        writeln!(
            out,
            "{}: {} conditions, {} completions in {} groups of {}{}",
            spec.name,
            e.conditions,
            e.completions,
            e.groups,
            spec.group_size,
            if shard.n > 1 {
                format!(", about {} per shard", e.groups.div_ceil(shard.n))
            } else {
                String::new()
            }
        )?;
        writeln!(
            out,
            "tokens: {} prompt tokens to prepare (extraction, selection, calibration), {} to run, {}-{} to generate",
            e.prep_prompt_tokens, e.run_prompt_tokens, e.gen_tokens.0, e.gen_tokens.1
        )?;
        writeln!(
            out,
            "measured here: {:.0} prompt tok/s, {:.0} generated tok/s at {} sequences",
            e.prompt_tps,
            e.gen_tps,
            spec.group_size.min(model.options.parallel as usize)
        )?;
        writeln!(
            out,
            "estimate: {:.0}-{:.0} min (early stop at min_tokens .. every completion to max_new_tokens)",
            lo / 60.0,
            hi / 60.0
        )?;
        return Ok(());
    }
    let dir = a.out.clone().unwrap_or_else(|| {
        let stem = model
            .info
            .path
            .file_stem()
            .map_or("model".into(), |s| s.to_string_lossy().into_owned());
        let suffix = if spec.metric == Metric::Score {
            "-score"
        } else {
            ""
        };
        std::path::PathBuf::from("runs")
            .join(stem)
            .join(format!("{}{suffix}", spec.name))
    });
    let pb = bar(0, "prepare");
    let mut phase = String::new();
    // Without a terminal the bar is hidden: print a line per phase and per 10% of the run.
    let plain = pb.is_hidden();
    let mut last_tenth = usize::MAX;
    let started = Instant::now();
    let mut progress = |p: &str, done: usize, total: usize, item: &str| {
        if p != phase {
            phase = p.to_string();
            pb.reset();
            last_tenth = usize::MAX;
        }
        let tenth = done * 10 / total.max(1);
        if plain && tenth != last_tenth {
            last_tenth = tenth;
            eprintln!(
                "[{:>6.0}s] {p} {item}: {done}/{total}",
                started.elapsed().as_secs_f64()
            );
        }
        pb.set_length(total as u64);
        pb.set_position(done as u64);
        pb.set_message(format!("{p} {item}"));
    };
    // Notes (chosen layers, resume) always reach stderr; they never contain prompt text.
    let mut note = |s: String| pb.suspend(|| eprintln!("{s}"));
    let opts = run::RunOptions {
        shard,
        template: template_src,
        special: a.special_tokens.mode(),
    };
    let o = experiment::reproduce(&model, &spec, &dir, &opts, &mut progress, &mut note)?;
    pb.finish_and_clear();
    match &o.finished {
        Some(f) => {
            writeln!(out, "{}", experiment::report::table(f.metric, &f.summaries))?;
            writeln!(out, "run {} in {}: {} groups run now, all {} done", o.plan.run_id, dir.display(), o.groups_run, o.plan.n_groups)?;
            writeln!(out, "wrote {}", f.files.join(", "))?;
        }
        None => writeln!(
            out,
            "run {} in {}: shard {}/{} ran {} groups; {} of {} done. Merge shard directories with `persona-gate merge --out DIR DIRS...`",
            o.plan.run_id, dir.display(), shard.k, shard.n, o.groups_run, o.groups_done, o.plan.n_groups
        )?,
    }
    Ok(())
}

fn print_norms(out: &mut dyn Write, f: &DirectionFile) -> Result<()> {
    for d in &f.directions {
        let n: Vec<String> = d.norms().iter().map(|x| format!("{x:.2}")).collect();
        writeln!(
            out,
            "{:<18} [{} x {}] norms by layer: {}",
            util::one_line(&d.name),
            d.n_layer(),
            d.n_embd(),
            n.join(" ")
        )?;
    }
    Ok(())
}
