//! `persona-gate bench`: throughput beside llama.cpp's own tools (see the library's `bench`).

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use persona_gate::bench::{self, BenchConfig, HookConfig};
use persona_gate::model::Model;

/// The workloads `bench` can run.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Batched,
    Hooks,
    Grid,
    Persona,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookArg {
    None,
    Capture,
    Cvec,
    Add,
    Project,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// Workloads to run (default: all): batched (llama-batched-bench's shape), hooks (each hook
    /// configuration against none), grid (conditions x prompts with shared prefixes and
    /// per-sequence hooks), persona (persona extraction).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub workloads: Vec<Workload>,
    /// Prompt tokens of the single-prompt run (llama-bench -p).
    #[arg(long, default_value_t = 512)]
    pub pp: usize,
    /// Prompt tokens per sequence (llama-batched-bench -npp).
    #[arg(long, default_value_t = 50)]
    pub npp: usize,
    /// Generated tokens per sequence (llama-batched-bench -ntg).
    #[arg(long, default_value_t = 32)]
    pub ntg: usize,
    /// Sequences decoded together (llama-batched-bench -npl); also the grid's prompts per
    /// condition. Use the same --parallel (default 16).
    #[arg(long, default_value_t = 16)]
    pub npl: usize,
    /// Conditions in the grid workload.
    #[arg(long, default_value_t = 8)]
    pub conditions: usize,
    /// Shared prefix tokens of the grid's prompts (system prompt and template header).
    #[arg(long, default_value_t = 20)]
    pub shared: usize,
    /// Timed repetitions per cell (the best is reported, after an untimed warm-up).
    #[arg(long, default_value_t = 2)]
    pub repetitions: usize,
    /// Hook configurations for the hooks workload (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub hooks: Vec<HookArg>,
    /// Directory with llama.cpp's llama-batched-bench (scripts/build-llama-ref.sh prints it),
    /// to run beside persona-gate on the same shape.
    #[arg(long)]
    pub llama_bin: Option<PathBuf>,
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

/// Runs the chosen workloads and prints their tables.
///
/// # Errors
/// Bad sizes, engine errors, a llama.cpp tool that fails.
pub fn run(a: &BenchArgs, model: Model, out: &mut dyn Write) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.pp >= 2 && a.npp >= 2 && a.ntg >= 1 && a.npl >= 1 && a.conditions >= 1,
        "--pp and --npp must be at least 2, --ntg, --npl and --conditions at least 1"
    );
    anyhow::ensure!(
        a.shared + 2 <= a.npp,
        "--shared {} must leave at least two of --npp {} tokens to each prompt",
        a.shared,
        a.npp
    );
    let opts = &model.options;
    let all = a.workloads.is_empty();
    let want = |w: Workload| all || a.workloads.contains(&w);
    let cfg = BenchConfig {
        pp: a.pp,
        npp: a.npp,
        ntg: a.ntg,
        npl: a.npl,
        conditions: a.conditions,
        shared: a.shared,
        repetitions: a.repetitions.max(1),
    };
    writeln!(
        out,
        "model {} ({}), CPU {}, threads {}, build {}, kernels {}, batch {}, parallel {}, {}",
        model.info.path.display(),
        model.info.file_type,
        bench::cpu_line(),
        opts.threads,
        persona_gate::cpu::built_for(),
        opts.kernels.name(),
        opts.batch,
        opts.parallel,
        persona_gate::llama_cpp()
    )?;
    let reference = |same: bool, c: &BenchConfig| -> anyhow::Result<Option<bench::Batched>> {
        let Some(dir) = &a.llama_bin else {
            return Ok(None);
        };
        Ok(Some(bench::llama_batched_bench(
            dir,
            &model.info.path,
            opts.threads,
            opts.batch,
            c,
            same,
        )?))
    };
    if want(Workload::Batched) {
        let ours = bench::batched(&model, &cfg)?;
        writeln!(
            out,
            "\nbatched: {} prompts x {} tokens, {} new tokens each (llama-batched-bench -npp {} -ntg {} -npl {})",
            a.npl, a.npp, a.ntg, a.npp, a.ntg, a.npl
        )?;
        writeln!(
            out,
            "| tool | S_PP tok/s | S_TG tok/s | T s |\n|---|---:|---:|---:|"
        )?;
        let row = |out: &mut dyn Write, name: &str, b: &bench::Batched| {
            writeln!(
                out,
                "| {name} | {:.1} | {:.1} | {:.2} |",
                b.s_pp, b.s_tg, b.t
            )
        };
        row(out, "persona-gate", &ours)?;
        for (same, name) in [
            (false, "llama.cpp"),
            (true, "llama.cpp, persona-gate's kernels"),
        ] {
            if let Some(r) = reference(same, &cfg)? {
                row(out, name, &r)?;
                writeln!(
                    out,
                    "  persona-gate / {name}: S_PP {}, S_TG {}, T {}",
                    ratio(ours.s_pp, r.s_pp),
                    ratio(ours.s_tg, r.s_tg),
                    ratio(r.t, ours.t)
                )?;
            }
        }
    }
    if want(Workload::Grid) {
        let [shared, unshared, stops] = bench::grid(&model, &cfg)?;
        writeln!(
            out,
            "\ngrid: {} conditions x {} prompts of {} tokens ({} shared), {} new tokens, per-sequence hooks",
            a.conditions, a.npl, a.npp, a.shared, a.ntg
        )?;
        writeln!(
            out,
            "| run | s | prompt tokens decoded | in calls | copied from a shared prefix | padding rows | sequences per step |\n|---|---:|---:|---:|---:|---:|---:|"
        )?;
        for (name, j) in [
            ("shared prefixes", &shared),
            ("no prefix sharing", &unshared),
            ("shared, stops at 25-100% of ntg", &stops),
        ] {
            writeln!(
                out,
                "| {name} | {:.2} | {} | {} | {} | {:.1}% | {:.1} |",
                j.seconds,
                j.prompt_tokens,
                j.prompt_calls,
                j.shared_tokens,
                100.0 * j.padding_share,
                j.occupancy
            )?;
        }
        if let Some(r) = reference(false, &cfg)? {
            let t = r.t * a.conditions as f64;
            writeln!(
                out,
                "llama-batched-bench, same shape x {} conditions (no hooks): {:.2} s; persona-gate is {}x as fast with shared prefixes, {}x without",
                a.conditions,
                t,
                ratio(t, shared.seconds),
                ratio(t, unshared.seconds)
            )?;
        }
    }
    if want(Workload::Persona) {
        let j = bench::persona(&model, cfg.repetitions)?;
        writeln!(
            out,
            "\npersona extraction: {} prompts (built-in compliant persona x neutral questions), {:.2} s; {} prompt tokens decoded in {} calls, {} copied from shared prefixes",
            j.prompts, j.seconds, j.prompt_tokens, j.prompt_calls, j.shared_tokens
        )?;
    }
    if want(Workload::Hooks) {
        let configs: Vec<HookConfig> = if a.hooks.is_empty() {
            HookConfig::ALL.to_vec()
        } else {
            let mut v: Vec<HookConfig> = a
                .hooks
                .iter()
                .map(|h| match h {
                    HookArg::None => HookConfig::None,
                    HookArg::Capture => HookConfig::CaptureAll,
                    HookArg::Cvec => HookConfig::CvecAll,
                    HookArg::Add => HookConfig::AddPerSeq,
                    HookArg::Project => HookConfig::Project8,
                })
                .collect();
            if !v.contains(&HookConfig::None) {
                v.insert(0, HookConfig::None);
            }
            v
        };
        writeln!(out, "\nhooks:\n| hooks | test | tokens/s |\n|---|---|---:|")?;
        let test = |b: usize| {
            if b == 0 {
                format!("pp{}", a.pp)
            } else {
                format!("tg{} @ {} seq", a.ntg, b)
            }
        };
        let rows = bench::hooks(&model, &cfg, &configs, &mut |r| {
            let _ = writeln!(
                std::io::stdout(),
                "| {} | {} | {:.1} |",
                r.hooks.name(),
                test(r.batch),
                r.tokens_per_s
            );
        })?;
        writeln!(out, "\nratio to no hooks:")?;
        for r in rows.iter().filter(|r| r.hooks != HookConfig::None) {
            let base = rows
                .iter()
                .find(|b| b.hooks == HookConfig::None && b.batch == r.batch)
                .map_or(f64::NAN, |b| b.tokens_per_s);
            writeln!(
                out,
                "  {:<30} {:<14} {:.3}",
                r.hooks.name(),
                test(r.batch),
                r.tokens_per_s / base
            )?;
        }
    }
    Ok(())
}
