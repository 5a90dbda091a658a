//! `persona-gate directions cos|random`, `export-cvec` and `inspect`: working with direction
//! files.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use persona_gate::directions::{self, cvec, DirectionFile, LayerCosines};
use persona_gate::{fsio, hooks, text};

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
    /// Seed of the random direction (random.s<SEED>).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Scale each layer's row to the norm of --like's row (default: unit rows).
    #[arg(long)]
    pub norm_matched: bool,
    /// Output direction file (safetensors).
    #[arg(long, short = 'o')]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct CosArgs {
    /// First direction file.
    pub a: PathBuf,
    /// Second direction file (same number of layers and width).
    pub b: PathBuf,
    /// Direction name in A (needed when A holds several).
    #[arg(long)]
    pub a_name: Option<String>,
    /// Direction name in B (needed when B holds several).
    #[arg(long)]
    pub b_name: Option<String>,
    /// Write the CSV here instead of stdout.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Write a line plot of cosine vs layer.
    #[arg(long)]
    pub svg: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ExportCvecArgs {
    /// Direction file (safetensors) to export from.
    #[arg(long, short = 'd')]
    pub directions: PathBuf,
    /// Direction name (needed when the file holds several).
    #[arg(long)]
    pub name: Option<String>,
    /// Multiple of the direction written at each layer (llama.cpp scales it again by
    /// --control-vector-scaled, 1 by default).
    #[arg(long, allow_hyphen_values = true)]
    pub coefficient: f32,
    /// Layers, e.g. "10-14" or "10+5" (start+width; each >= 1: llama.cpp control vectors
    /// start at layer 1).
    #[arg(long, allow_hyphen_values = true)]
    pub layers: String,
    /// Output control-vector GGUF.
    #[arg(long, short = 'o')]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Direction file (safetensors).
    pub file: PathBuf,
    /// Print JSON instead: the metadata, and each direction's shape and per-layer norms.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: &DirectionsCmd, out: &mut dyn Write) -> anyhow::Result<()> {
    match cmd {
        DirectionsCmd::Cos(a) => cos(a, out),
        DirectionsCmd::Random(a) => random(a, out),
    }
}

fn cos(a: &CosArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let (fa, fb) = (DirectionFile::load(&a.a)?, DirectionFile::load(&a.b)?);
    let da = fa
        .get(a.a_name.as_deref())
        .with_context(|| format!("{}", a.a.display()))?;
    let db = fb
        .get(a.b_name.as_deref())
        .with_context(|| format!("{}", a.b.display()))?;
    let cos = LayerCosines::new(da, db)
        .with_context(|| format!("{} vs {}", a.a.display(), a.b.display()))?;
    // Check every output before writing any, so a bad --svg leaves no CSV behind.
    for p in a.csv.iter().chain(&a.svg) {
        fsio::check_writable(p).with_context(|| format!("{}", p.display()))?;
    }
    let bytes = cos.to_csv();
    match &a.csv {
        Some(p) => super::write_file(p, &bytes)?,
        None => out.write_all(&bytes)?,
    }
    if let Some(p) = &a.svg {
        super::write_file(p, cos.to_svg().as_bytes())?;
    }
    Ok(())
}

fn random(a: &RandomArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let f = DirectionFile::load(&a.like)?;
    let d = f
        .get(a.name.as_deref())
        .with_context(|| format!("{}", a.like.display()))?;
    let r = directions::random_like(&f, d, a.seed, a.norm_matched)?;
    r.save(&a.out)?;
    writeln!(
        out,
        "wrote {}: random.s{} shaped like {}",
        a.out.display(),
        a.seed,
        d.name
    )?;
    Ok(())
}

pub fn export_cvec(a: &ExportCvecArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    super::writable(&a.out)?;
    let f = DirectionFile::load(&a.directions)?;
    let d = f
        .get(a.name.as_deref())
        .with_context(|| format!("{}", a.directions.display()))?;
    let layers = hooks::LayerSet::parse(&a.layers, d.n_layer())
        .context("--layers")?
        .into_vec();
    let arch = f.meta.get("arch").cloned().unwrap_or_else(|| "any".into());
    let bytes = cvec::export(d, &arch, a.coefficient, &layers).context("export-cvec")?;
    super::write_file(&a.out, &bytes)?;
    writeln!(
        out,
        "wrote {}: {} x {} at layers {:?} ({} for llama.cpp --control-vector)",
        a.out.display(),
        a.coefficient,
        d.name,
        layers,
        arch
    )?;
    Ok(())
}

pub fn inspect(a: &InspectArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let f = DirectionFile::load(&a.file)?;
    if a.json {
        let meta: serde_json::Map<String, serde_json::Value> = f
            .meta
            .iter()
            .filter(|(k, _)| !k.starts_with("norms."))
            .map(|(k, v)| (k.clone(), v.clone().into()))
            .collect();
        let dirs: Vec<serde_json::Value> = f
            .directions
            .iter()
            .map(|d| {
                serde_json::json!({
                    "name": d.name,
                    "n_layer": d.n_layer(),
                    "n_embd": d.n_embd(),
                    "norms": d.norms(),
                })
            })
            .collect();
        let v = serde_json::json!({"file": a.file, "meta": meta, "directions": dirs});
        return super::print_json(out, &v);
    }
    for (k, v) in f.meta.iter().filter(|(k, _)| !k.starts_with("norms.")) {
        writeln!(out, "{:<18} {}", text::one_line(k), text::one_line(v))?;
    }
    super::print_norms(out, &f)
}
