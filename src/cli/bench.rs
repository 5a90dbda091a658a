//! `persona-gate bench`: throughput beside llama.cpp's own tools (see the library's `bench`).

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use persona_gate::studies::bench::{self, BenchConfig, HookConfig, Workload};

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
    pub hooks: Vec<HookConfig>,
    /// Directory with llama.cpp's llama-batched-bench (scripts/build-llama-ref.sh prints it),
    /// to run beside persona-gate on the same shape.
    #[arg(long)]
    pub llama_bin: Option<PathBuf>,
    /// Print the results as JSON instead of the tables (the same numbers, unrounded).
    #[arg(long)]
    pub json: bool,
}

/// Runs the chosen workloads and prints their tables.
///
/// # Errors
/// Bad sizes, engine errors, a llama.cpp tool that fails.
pub fn run(a: &BenchArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let model = super::load(&a.model)?;
    let cfg = BenchConfig {
        pp: a.pp,
        npp: a.npp,
        ntg: a.ntg,
        npl: a.npl,
        conditions: a.conditions,
        shared: a.shared,
        repetitions: a.repetitions,
    };
    let mut res = bench::BenchResults::default();
    let mut sink = std::io::sink();
    bench::report(
        &model,
        &cfg,
        &a.workloads,
        &a.hooks,
        a.llama_bin.as_deref(),
        if a.json { &mut sink } else { out },
        &mut res,
    )?;
    if a.json {
        super::print_json(out, &serde_json::to_value(&res)?)?;
    }
    Ok(())
}
