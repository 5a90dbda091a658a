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
    /// Direction file whose shape (and, with --norm-matched, per-layer norms) to copy; another
    /// tool's as FILE:CONVENTION (see inspect).
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
    /// First direction file (another tool's as FILE:CONVENTION, see inspect).
    pub a: PathBuf,
    /// Second direction file (same number of layers and width; a 1-D vector is used at
    /// every layer of the other).
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
    /// Direction file to export from (another tool's as FILE:CONVENTION, see inspect).
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
    /// Direction file: ours (safetensors), a llama.cpp control vector (.gguf), or another
    /// tool's safetensors, .npy or torch.save .pt as FILE:CONVENTION, CONVENTION being
    /// resid_post (row L after layer L), hidden_states (Hugging Face output_hidden_states,
    /// row 0 the embeddings) or resid_pre (row L entering layer L); a 1-D vector adds its
    /// layer, FILE:resid_pre.12, unless refusal_direction's direction_metadata.json is beside it.
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
    // A 1-D vector stands for every layer: compare it with each of the other's.
    let n = fa.n_layer().max(fb.n_layer());
    let (fa, fb) = (fa.broadcast(n)?, fb.broadcast(n)?);
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
    // A 1-D vector has no layer count of its own: explicit layers are taken as they are (up
    // to llama.cpp's largest models), but `all` or `S..` would have nothing to end at.
    let bound = if f.is_broadcast() {
        1 << 12
    } else {
        d.n_layer()
    };
    let layers = hooks::LayerSet::parse(&a.layers, bound)
        .context("--layers")?
        .into_vec();
    if f.is_broadcast() && layers.last() == Some(&(bound - 1)) {
        anyhow::bail!(
            "--layers {}: {} is one vector with no layer count; give the layers explicitly (e.g. 10-14)",
            a.layers,
            a.directions.display()
        );
    }
    let f = f.broadcast(layers.iter().max().map_or(1, |l| l + 1))?;
    let d = f
        .get(a.name.as_deref())
        .with_context(|| format!("{}", a.directions.display()))?;
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
