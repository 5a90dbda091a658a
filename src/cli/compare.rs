//! `persona-gate quantize` and `compare`: quantized models against a reference.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use persona_gate::experiment::{self, spec::Spec};
use persona_gate::model::ModelOptions;
use persona_gate::studies::{compare, quant};

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// Input GGUF (F32/F16/BF16, or a quantized one: then results are relative to it).
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// Types, e.g. F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K.
    #[arg(long, value_delimiter = ',', required = true)]
    pub types: Vec<String>,
    /// Directory for the outputs, one <model name>.<TYPE>.gguf per type.
    #[arg(long)]
    pub out_dir: PathBuf,
    /// CPU threads.
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
    /// Context PER SEQUENCE, as everywhere here (-c/--ctx-size are llama.cpp's names; its
    /// -c is split across -np, ours is not).
    #[arg(long, short = 'c', visible_alias = "ctx-size", default_value_t = 1024)]
    pub ctx: u32,
    /// Memory each model's run may use, e.g. 8G (default: what the system reports available).
    #[arg(long, value_parser = persona_gate::memory::parse_size)]
    pub max_memory: Option<u64>,
    /// Skip the runs that apply the reference's directions to each model.
    #[arg(long)]
    pub no_cross: bool,
}

pub fn quantize(a: &QuantizeArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let threads = a.threads.unwrap_or(ModelOptions::default().threads);
    let pb = super::progress::bar(0, "quantize");
    let r = quant::quantize(
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
    Ok(())
}

pub fn run(a: &CompareArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let spec = match &a.spec {
        Some(p) => Spec::parse(&experiment::read_spec(p)?, &p.display().to_string())?,
        None => compare::default_spec(&a.reference)?,
    };
    let opts = ModelOptions {
        threads: a.threads.unwrap_or(ModelOptions::default().threads),
        ctx: a.ctx,
        max_memory: a.max_memory,
        ..Default::default()
    };
    let pb = super::progress::bar(0, "compare");
    let mut progress = |p: &str, done: usize, total: usize, item: &str| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
        pb.set_message(format!("{p} {item}"));
    };
    let mut note = |s: String| super::progress::note(&pb, &s);
    let r = compare::compare(
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
    Ok(())
}
