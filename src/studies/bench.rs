//! Throughput benchmarks, laid out so each persona-gate figure sits beside llama.cpp's own
//! tool on the same model, threads, build and shape.
//!
//! Workloads:
//! - **batched**: `npl` prompts of `npp` random tokens prefilled together, then `ntg` tokens
//!   each: llama-batched-bench's shape; S_PP and S_TG are reported as it reports them;
//! - **hooks**: one prompt of `pp` tokens (llama-bench's pp) and generation at `npl`
//!   sequences under each hook configuration, as a ratio to no hooks;
//! - **grid**: the experiment grid's shape: `conditions` × `npl` prompts behind a shared
//!   prefix of `shared` tokens, each condition with its own per-sequence hooks, `ntg` new
//!   tokens; end to end, with prefix sharing on and off, against `conditions` ×
//!   llama-batched-bench's total time for one condition's shape. Every completion runs to
//!   `ntg` tokens, as in llama-batched-bench; a second run stops completions at 25-100% of
//!   `ntg`, as real ones do, and reports the padding share;
//! - **persona**: extracting the built-in compliant persona from the built-in neutral
//!   questions (every system prompt x every question, last prompt token).
//!
//! Runs are interleaved (each repetition runs every variant once) so drift in a shared VM's
//! speed hits them alike; the best repetition is reported, after one untimed warm-up.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::chat::{ChatTemplate, Prompt};
use crate::engine::{GenConfig, Session};
use crate::error::{Error, Result};
use crate::hooks::{Capture, Edit, HookSet, Position, Scope};
use crate::model::Model;
use crate::rng::Rng;

/// A hook configuration to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HookConfig {
    /// No hooks: the baseline every other configuration is compared with.
    None,
    /// Capture every layer's residual.
    #[value(name = "capture")]
    CaptureAll,
    /// llama.cpp's native control vector at every layer (no callback).
    #[value(name = "cvec")]
    CvecAll,
    /// A different vector added for each sequence, at one layer: the grid's steering.
    #[value(name = "add")]
    AddPerSeq,
    /// A projection over eight layers.
    #[value(name = "project")]
    Project8,
}

impl HookConfig {
    pub fn name(self) -> &'static str {
        match self {
            HookConfig::None => "no hooks",
            HookConfig::CaptureAll => "capture, all layers",
            HookConfig::CvecAll => "control vector, all layers",
            HookConfig::AddPerSeq => "add, one vector per sequence",
            HookConfig::Project8 => "projection, 8-layer window",
        }
    }
}

/// Sizes, named as in llama.cpp's tools.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchConfig {
    /// Prompt length of the single-prompt run (llama-bench `-p`).
    pub pp: usize,
    /// Prompt tokens per sequence (llama-batched-bench `-npp`).
    pub npp: usize,
    /// Generated tokens per sequence (`-ntg`).
    pub ntg: usize,
    /// Sequences decoded together (`-npl`).
    pub npl: usize,
    /// Conditions in the grid workload.
    pub conditions: usize,
    /// Shared prefix tokens of the grid's prompts (a system prompt and template header).
    pub shared: usize,
    pub repetitions: usize,
}

/// One batched run, as llama-batched-bench reports it.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Batched {
    pub t_pp: f64,
    pub s_pp: f64,
    pub t_tg: f64,
    pub s_tg: f64,
    pub t: f64,
}

/// One end-to-end run of a many-prompt workload.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Job {
    pub seconds: f64,
    pub prompts: usize,
    /// Prompt tokens decoded, and those copied from a shared prefix instead.
    pub prompt_tokens: u64,
    pub shared_tokens: u64,
    pub gen_tokens: u64,
    /// Prefill decode calls.
    pub prompt_calls: u64,
    /// Rows decoded for no sequence, as a share of all decoded rows.
    pub padding_share: f64,
    /// Mean sequences per generation step.
    pub occupancy: f64,
}

fn random_prompt(rng: &mut Rng, prefix: &[i32], n: usize, n_vocab: usize) -> Prompt {
    // Ordinary text tokens only: ids above 100 and below the control tokens at the end.
    let mut tokens = prefix.to_vec();
    tokens.extend(
        (prefix.len()..n).map(|_| 100 + rng.below((n_vocab.min(100_000) - 200) as u64) as i32),
    );
    Prompt {
        text: String::new(),
        instruction: 0..n,
        post_instruction: n..n,
        tokens,
    }
}

fn random_prompts(rng: &mut Rng, k: usize, shared: usize, n: usize, n_vocab: usize) -> Vec<Prompt> {
    let prefix: Vec<i32> = random_prompt(rng, &[], shared, n_vocab).tokens;
    (0..k)
        .map(|_| random_prompt(rng, &prefix, n, n_vocab))
        .collect()
}

fn unit_random(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    let v: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    v.iter().map(|x| (x / norm) as f32 * scale).collect()
}

fn hooks_for(
    model: &Model,
    cfg: HookConfig,
    n_seqs: usize,
    generating: bool,
    rng: &mut Rng,
) -> Result<HookSet> {
    let (nl, ne) = (model.info.n_layer, model.info.n_embd);
    let mut h = HookSet::new(nl, ne);
    let all: Vec<usize> = (0..nl).collect();
    match cfg {
        HookConfig::CaptureAll => {
            // The last prompt token at every layer (the refusal-score position), and the mean
            // over generated tokens; both are rows llama.cpp keeps to the last layer anyway.
            h.add_capture(Capture::new(
                &all,
                Position::LastPrompt,
                vec![Some(0); n_seqs],
                1,
                nl,
                ne,
            ))?;
            if generating {
                h.add_capture(Capture::new(
                    &all,
                    Position::GeneratedMean,
                    vec![Some(0); n_seqs],
                    1,
                    nl,
                    ne,
                ))?;
            }
        }
        HookConfig::AddPerSeq => {
            for s in 0..n_seqs {
                let v = unit_random(rng, ne, 0.01);
                h.add_edit(Edit::add([(nl / 2, v)].into(), Scope::only(vec![s])))?;
            }
        }
        HookConfig::Project8 => {
            let start = nl / 2;
            let dirs = (start..(start + 8).min(nl))
                .map(|l| (l, unit_random(rng, ne, 1.0)))
                .collect();
            h.add_edit(Edit::project(dirs, Scope::All)?)?;
        }
        HookConfig::None | HookConfig::CvecAll => {}
    }
    Ok(h)
}

fn secs(d: std::time::Duration) -> f64 {
    d.as_secs_f64().max(1e-9)
}

/// One batched run: `npl` prompts of `npp` tokens, `ntg` decode steps each.
fn batched_once(
    session: &mut Session<'_>,
    prompts: &[Prompt],
    ntg: usize,
    hooks: &mut HookSet,
) -> Result<Batched> {
    // ntg + 1 accepted tokens = ntg decode steps: the first comes from the prompt's logits,
    // as llama-batched-bench counts it.
    let gen = GenConfig {
        max_new_tokens: ntg + 1,
        ignore_eog: true,
        ..GenConfig::default()
    };
    session.stats = Default::default();
    let t0 = Instant::now();
    session.generate(prompts, &gen, hooks, &mut |_, _| false, &mut |_| {})?;
    let t = secs(t0.elapsed());
    let s = &session.stats;
    Ok(Batched {
        t_pp: secs(s.prompt_time),
        s_pp: s.prompt_tokens as f64 / secs(s.prompt_time),
        t_tg: secs(s.gen_time),
        s_tg: s.gen_tokens as f64 / secs(s.gen_time),
        t,
    })
}

/// The batched workload, best of `repetitions`.
///
/// # Errors
/// Engine errors.
pub fn batched(model: &Model, cfg: &BenchConfig) -> Result<Batched> {
    let mut rng = Rng::new(1234);
    let prompts = random_prompts(&mut rng, cfg.npl, 0, cfg.npp, model.info.n_vocab);
    let mut session = model.session()?;
    session.set_prefix_sharing(false);
    let mut best = Batched::default();
    for rep in 0..=cfg.repetitions {
        let b = batched_once(&mut session, &prompts, cfg.ntg, &mut empty(model))?;
        if rep > 0 && (best.t == 0.0 || b.t < best.t) {
            best = b;
        }
    }
    Ok(best)
}

fn empty(model: &Model) -> HookSet {
    HookSet::new(model.info.n_layer, model.info.n_embd)
}

/// A row of the hooks workload: tokens/s of one test under one configuration.
#[derive(Debug, Clone)]
pub struct HookRow {
    pub hooks: HookConfig,
    /// 0 for the single-prompt prompt-processing test.
    pub batch: usize,
    pub tokens_per_s: f64,
}

/// Every hook configuration on one `pp`-token prompt and at `npl` generating sequences.
///
/// # Errors
/// Any engine error.
pub fn hooks(
    model: &Model,
    cfg: &BenchConfig,
    configs: &[HookConfig],
    report: &mut dyn FnMut(&HookRow),
) -> Result<Vec<HookRow>> {
    let mut rng = Rng::new(1234);
    let mut session = model.session()?;
    let (nl, ne, n_vocab) = (model.info.n_layer, model.info.n_embd, model.info.n_vocab);
    let cvec: BTreeMap<usize, Vec<f32>> = (1..nl)
        .map(|l| (l, unit_random(&mut rng, ne, 0.01)))
        .collect();
    let mut rows = Vec::new();
    for b in [0, cfg.npl] {
        let prompts = if b == 0 {
            random_prompts(&mut rng, 1, 0, cfg.pp, n_vocab)
        } else {
            random_prompts(&mut rng, b, 0, cfg.npp, n_vocab)
        };
        let mut best = vec![0f64; configs.len()];
        for rep in 0..=cfg.repetitions {
            for (k, &hc) in configs.iter().enumerate() {
                session.set_control_vector((hc == HookConfig::CvecAll).then_some(&cvec))?;
                let mut h = hooks_for(model, hc, prompts.len(), b > 0, &mut rng)?;
                let r = batched_once(
                    &mut session,
                    &prompts,
                    if b == 0 { 0 } else { cfg.ntg },
                    &mut h,
                )?;
                let tps = if b == 0 { r.s_pp } else { r.s_tg };
                if rep > 0 {
                    best[k] = best[k].max(tps);
                }
            }
        }
        for (k, &hc) in configs.iter().enumerate() {
            let row = HookRow {
                hooks: hc,
                batch: b,
                tokens_per_s: best[k],
            };
            report(&row);
            rows.push(row);
        }
    }
    session.set_control_vector(None)?;
    Ok(rows)
}

/// The grid workload once: `conditions` x `npl` prompts, every condition with its own hooks
/// (an add at one layer, every third also a projection over three layers), as one job.
fn grid_once(model: &Model, cfg: &BenchConfig, share: bool, variable_stops: bool) -> Result<Job> {
    let (nl, ne) = (model.info.n_layer, model.info.n_embd);
    let mut rng = Rng::new(99);
    let one = random_prompts(&mut rng, cfg.npl, cfg.shared, cfg.npp, model.info.n_vocab);
    let mut prompts = Vec::new();
    let mut hooks = empty(model);
    for c in 0..cfg.conditions {
        let seqs: Vec<usize> = (c * one.len()..(c + 1) * one.len()).collect();
        prompts.extend(one.iter().cloned());
        let v = unit_random(&mut rng, ne, 0.01);
        hooks.add_edit(Edit::add([(c % nl, v)].into(), Scope::only(seqs.clone())))?;
        if c % 3 == 2 {
            let start = nl / 2;
            let dirs = (start..(start + 3).min(nl))
                .map(|l| (l, unit_random(&mut rng, ne, 1.0)))
                .collect();
            hooks.add_edit(Edit::project(dirs, Scope::only(seqs))?)?;
        }
    }
    // Stops spread over 25-100% of ntg, fixed per prompt.
    let stop_at: Vec<usize> = (0..prompts.len())
        .map(|i| {
            let mut r = Rng::new(i as u64);
            let lo = (cfg.ntg / 4).max(1);
            lo + r.below((cfg.ntg - lo + 1) as u64) as usize
        })
        .collect();
    let gen = GenConfig {
        max_new_tokens: cfg.ntg + 1,
        ignore_eog: true,
        ..GenConfig::default()
    };
    let mut session = model.session()?;
    session.set_prefix_sharing(share);
    let t0 = Instant::now();
    session.generate(
        &prompts,
        &gen,
        &mut hooks,
        &mut |i, t| variable_stops && t.len() >= stop_at[i],
        &mut |_| {},
    )?;
    let s = &session.stats;
    Ok(Job {
        seconds: secs(t0.elapsed()),
        prompts: prompts.len(),
        prompt_tokens: s.prompt_tokens,
        shared_tokens: s.shared_tokens,
        gen_tokens: s.gen_tokens,
        prompt_calls: s.prompt_calls,
        padding_share: s.padding_rows as f64 / (s.padding_rows + s.gen_tokens).max(1) as f64,
        occupancy: s.occupancy(),
    })
}

/// The grid workload: (shared prefixes on, off, on with variable stops), best of
/// `repetitions` each, interleaved.
///
/// # Errors
/// Engine errors.
pub fn grid(model: &Model, cfg: &BenchConfig) -> Result<[Job; 3]> {
    let mut best = [Job::default(); 3];
    let small = BenchConfig {
        conditions: 1,
        ..cfg.clone()
    };
    grid_once(model, &small, true, false)?; // warm-up
    for _ in 0..cfg.repetitions.max(1) {
        for (k, (share, var)) in [(true, false), (false, false), (true, true)]
            .iter()
            .enumerate()
        {
            let j = grid_once(model, cfg, *share, *var)?;
            if best[k].seconds == 0.0 || j.seconds < best[k].seconds {
                best[k] = j;
            }
        }
    }
    Ok(best)
}

/// Persona extraction: every positive and negative system prompt of the built-in compliant
/// persona x every built-in neutral question, last prompt token. Best of `repetitions`.
///
/// # Errors
/// Engine errors.
pub fn persona(model: &Model, repetitions: usize) -> Result<Job> {
    let tmpl = ChatTemplate::for_model(model, None)?;
    let personas = crate::prompts::parse_personas(crate::prompts::PERSONAS, "builtin")?;
    let persona = &personas["compliant"];
    let questions = crate::prompts::builtin("neutral")?;
    let n = (persona.positive.len() + persona.negative.len()) * questions.len();
    let mut best = Job::default();
    for _ in 0..repetitions.max(1) {
        let t0 = Instant::now();
        let mut stats = crate::engine::Stats::default();
        crate::directions::extract_persona_with_stats(
            model,
            &tmpl,
            "compliant",
            persona,
            &questions,
            crate::directions::PersonaPositions::Last,
            &mut stats,
        )?;
        let s = secs(t0.elapsed());
        if best.seconds == 0.0 || s < best.seconds {
            best = Job {
                seconds: s,
                prompts: n,
                prompt_tokens: stats.prompt_tokens,
                shared_tokens: stats.shared_tokens,
                prompt_calls: stats.prompt_calls,
                ..Job::default()
            };
        }
    }
    Ok(best)
}

/// llama.cpp's own llama-batched-bench on the same model and shape, from `bin_dir`
/// (scripts/build-llama-ref.sh). `same_kernels` runs it with the kernels persona-gate's
/// invariant mode uses (no repacking, the tiled K-quant matmul at every size), to separate
/// the engine from the kernel choice.
///
/// # Errors
/// The tool is missing, fails, or prints no result row.
pub fn llama_batched_bench(
    bin_dir: &Path,
    model: &Path,
    threads: i32,
    batch: u32,
    cfg: &BenchConfig,
    same_kernels: bool,
) -> Result<Batched> {
    let exe = bin_dir.join("llama-batched-bench");
    let ctx = ((cfg.npp + cfg.ntg) * cfg.npl + 256).div_ceil(256) * 256;
    let mut cmd = Command::new(&exe);
    cmd.arg("-m")
        .arg(model)
        .args(["-t", &threads.to_string(), "-c", &ctx.to_string()])
        .args(["-b", &batch.to_string(), "-ub", &batch.to_string()])
        .args(["-npp", &cfg.npp.to_string(), "-ntg", &cfg.ntg.to_string()])
        .args(["-npl", &cfg.npl.to_string(), "-fa", "off"]);
    if same_kernels {
        cmd.arg("--no-repack").env("GGML_CPU_TILED_MM_FORCE", "1");
    }
    let out = cmd.output().map_err(|e| Error::io(&exe, e))?;
    if !out.status.success() {
        return Err(Error::file(&exe, format!("exited with {}", out.status)));
    }
    parse_batched_bench(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| Error::file(&exe, "printed no result row"))
}

/// The first result row of llama-batched-bench's table:
/// `| PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |`.
pub fn parse_batched_bench(text: &str) -> Option<Batched> {
    text.lines().find_map(|l| {
        let cols: Vec<f64> = l
            .split('|')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(|c| c.parse::<f64>())
            .collect::<std::result::Result<_, _>>()
            .ok()?;
        (cols.len() == 10).then(|| Batched {
            t_pp: cols[4],
            s_pp: cols[5],
            t_tg: cols[6],
            s_tg: cols[7],
            t: cols[8],
        })
    })
}

/// The CPU's model name and the instruction sets that matter here, e.g.
/// `AMD EPYC (avx2 avx512f avx512_vnni avx512_bf16; no amx)`.
pub fn cpu_line() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |k: &str| {
        info.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let name = field("model name").unwrap_or_else(|| std::env::consts::ARCH.into());
    let flags = field("flags").unwrap_or_default();
    let f: Vec<&str> = flags.split_whitespace().collect();
    let shown: Vec<&str> = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni"]
        .into_iter()
        .filter(|x| f.contains(x))
        .collect();
    let amx = if f.iter().any(|x| x.starts_with("amx")) {
        "amx listed, unused"
    } else {
        "no amx"
    };
    format!("{name} ({}; {amx})", shown.join(" "))
}

/// The workloads `bench` can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// llama-batched-bench's shape: many prompts, then generation.
    Batched,
    /// Each hook configuration against none.
    Hooks,
    /// Conditions x prompts with shared prefixes and per-sequence hooks.
    Grid,
    /// Persona extraction.
    Persona,
}

/// What [`report`] measured (`bench --json`): the numbers of its tables, unrounded; a
/// workload not run is null.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BenchResults {
    pub model: PathBuf,
    pub file_type: String,
    pub cpu: String,
    pub threads: i32,
    pub build: String,
    pub kernels: String,
    pub batch: u32,
    pub parallel: u32,
    pub llama_cpp: String,
    pub config: Option<BenchConfig>,
    pub batched: Option<BatchedResults>,
    pub grid: Option<GridResults>,
    pub persona: Option<Job>,
    pub hooks: Option<Vec<HookResult>>,
}

/// The batched workload: ours, and llama-batched-bench's when it ran.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BatchedResults {
    pub persona_gate: Batched,
    pub llama_cpp: Option<Batched>,
    /// llama-batched-bench built with persona-gate's kernels.
    pub llama_cpp_same_kernels: Option<Batched>,
}

/// The grid workload's three runs, and llama-batched-bench's time for the same shape times
/// the conditions when it ran.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GridResults {
    pub shared_prefixes: Job,
    pub no_prefix_sharing: Job,
    /// Shared prefixes, sequences stopping at 25-100% of ntg.
    pub variable_stops: Job,
    pub llama_batched_bench_seconds: Option<f64>,
}

/// One row of the hooks workload.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HookResult {
    pub hooks: String,
    /// `pp<N>` (one prompt) or `tg<N> @ <B> seq`.
    pub test: String,
    /// Generating sequences; 0 for the prompt-processing test.
    pub batch: usize,
    pub tokens_per_s: f64,
    /// tokens/s over the no-hooks row of the same test (null for that row).
    pub ratio_to_no_hooks: Option<f64>,
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

/// Runs the chosen workloads (all when `workloads` is empty) and writes their tables, beside
/// llama.cpp's llama-batched-bench when `llama_bin` names its directory; `res` gets the same
/// numbers.
///
/// # Errors
/// Bad sizes, engine errors, a llama.cpp tool that fails, a failed write.
pub fn report(
    model: &Model,
    a: &BenchConfig,
    workloads: &[Workload],
    hook_configs: &[HookConfig],
    llama_bin: Option<&Path>,
    out: &mut dyn Write,
    res: &mut BenchResults,
) -> Result<()> {
    if !(a.pp >= 2 && a.npp >= 2 && a.ntg >= 1 && a.npl >= 1 && a.conditions >= 1) {
        return Err(Error::flag(
            "--pp and --npp",
            None,
            "must be at least 2, --ntg, --npl and --conditions at least 1",
        ));
    }
    if a.shared + 2 > a.npp {
        return Err(Error::flag(
            "--shared",
            Some(a.shared.to_string()),
            format!(
                "must leave at least two of --npp {} tokens to each prompt",
                a.npp
            ),
        ));
    }
    let opts = &model.options;
    let all = workloads.is_empty();
    let want = |w: Workload| all || workloads.contains(&w);
    let cfg = BenchConfig {
        repetitions: a.repetitions.max(1),
        ..a.clone()
    };
    *res = BenchResults {
        model: model.info.path.clone(),
        file_type: model.info.file_type.clone(),
        cpu: cpu_line(),
        threads: opts.threads,
        build: crate::cpu::built_for(),
        kernels: opts.kernels.name().to_string(),
        batch: opts.batch,
        parallel: opts.parallel,
        llama_cpp: crate::llama_cpp(),
        config: Some(cfg.clone()),
        ..BenchResults::default()
    };
    writeln!(
        out,
        "model {} ({}), CPU {}, threads {}, build {}, kernels {}, batch {}, parallel {}, {}",
        model.info.path.display(),
        model.info.file_type,
        cpu_line(),
        opts.threads,
        crate::cpu::built_for(),
        opts.kernels.name(),
        opts.batch,
        opts.parallel,
        crate::llama_cpp()
    )
    .map_err(Error::Output)?;
    let reference = |same: bool, c: &BenchConfig| -> Result<Option<Batched>> {
        let Some(dir) = llama_bin else {
            return Ok(None);
        };
        Ok(Some(llama_batched_bench(
            dir,
            &model.info.path,
            opts.threads,
            opts.batch,
            c,
            same,
        )?))
    };
    if want(Workload::Batched) {
        let ours = batched(model, &cfg)?;
        writeln!(
            out,
            "\nbatched: {} prompts x {} tokens, {} new tokens each (llama-batched-bench -npp {} -ntg {} -npl {})",
            a.npl, a.npp, a.ntg, a.npp, a.ntg, a.npl
        ).map_err(Error::Output)?;
        writeln!(
            out,
            "| tool | S_PP tok/s | S_TG tok/s | T s |\n|---|---:|---:|---:|"
        )
        .map_err(Error::Output)?;
        let row = |out: &mut dyn Write, name: &str, b: &Batched| {
            writeln!(
                out,
                "| {name} | {:.1} | {:.1} | {:.2} |",
                b.s_pp, b.s_tg, b.t
            )
        };
        row(out, "persona-gate", &ours).map_err(Error::Output)?;
        let got = res.batched.insert(BatchedResults {
            persona_gate: ours,
            ..BatchedResults::default()
        });
        for (same, name) in [
            (false, "llama.cpp"),
            (true, "llama.cpp, persona-gate's kernels"),
        ] {
            if let Some(r) = reference(same, &cfg)? {
                *(if same {
                    &mut got.llama_cpp_same_kernels
                } else {
                    &mut got.llama_cpp
                }) = Some(r);
                row(out, name, &r).map_err(Error::Output)?;
                writeln!(
                    out,
                    "  persona-gate / {name}: S_PP {}, S_TG {}, T {}",
                    ratio(ours.s_pp, r.s_pp),
                    ratio(ours.s_tg, r.s_tg),
                    ratio(r.t, ours.t)
                )
                .map_err(Error::Output)?;
            }
        }
    }
    if want(Workload::Grid) {
        let [shared, unshared, stops] = grid(model, &cfg)?;
        writeln!(
            out,
            "\ngrid: {} conditions x {} prompts of {} tokens ({} shared), {} new tokens, per-sequence hooks",
            a.conditions, a.npl, a.npp, a.shared, a.ntg
        ).map_err(Error::Output)?;
        writeln!(
            out,
            "| run | s | prompt tokens decoded | in calls | copied from a shared prefix | padding rows | sequences per step |\n|---|---:|---:|---:|---:|---:|---:|"
        ).map_err(Error::Output)?;
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
            )
            .map_err(Error::Output)?;
        }
        let got = res.grid.insert(GridResults {
            shared_prefixes: shared,
            no_prefix_sharing: unshared,
            variable_stops: stops,
            llama_batched_bench_seconds: None,
        });
        if let Some(r) = reference(false, &cfg)? {
            let t = r.t * a.conditions as f64;
            got.llama_batched_bench_seconds = Some(t);
            writeln!(
                out,
                "llama-batched-bench, same shape x {} conditions (no hooks): {:.2} s; persona-gate is {}x as fast with shared prefixes, {}x without",
                a.conditions,
                t,
                ratio(t, shared.seconds),
                ratio(t, unshared.seconds)
            ).map_err(Error::Output)?;
        }
    }
    if want(Workload::Persona) {
        let j = persona(model, cfg.repetitions)?;
        res.persona = Some(j);
        writeln!(
            out,
            "\npersona extraction: {} prompts (built-in compliant persona x neutral questions), {:.2} s; {} prompt tokens decoded in {} calls, {} copied from shared prefixes",
            j.prompts, j.seconds, j.prompt_tokens, j.prompt_calls, j.shared_tokens
        ).map_err(Error::Output)?;
    }
    if want(Workload::Hooks) {
        let configs: Vec<HookConfig> = if hook_configs.is_empty() {
            <HookConfig as clap::ValueEnum>::value_variants().to_vec()
        } else {
            let mut v: Vec<HookConfig> = hook_configs.to_vec();
            if !v.contains(&HookConfig::None) {
                v.insert(0, HookConfig::None);
            }
            v
        };
        writeln!(out, "\nhooks:\n| hooks | test | tokens/s |\n|---|---|---:|")
            .map_err(Error::Output)?;
        let test = |b: usize| {
            if b == 0 {
                format!("pp{}", a.pp)
            } else {
                format!("tg{} @ {} seq", a.ntg, b)
            }
        };
        let rows = hooks(model, &cfg, &configs, &mut |r| {
            let _ = writeln!(
                out,
                "| {} | {} | {:.1} |",
                r.hooks.name(),
                test(r.batch),
                r.tokens_per_s
            );
        })?;
        let base = |r: &HookRow| {
            rows.iter()
                .find(|b| b.hooks == HookConfig::None && b.batch == r.batch)
                .map_or(f64::NAN, |b| b.tokens_per_s)
        };
        res.hooks = Some(
            rows.iter()
                .map(|r| HookResult {
                    hooks: r.hooks.name().to_string(),
                    test: test(r.batch),
                    batch: r.batch,
                    tokens_per_s: r.tokens_per_s,
                    ratio_to_no_hooks: (r.hooks != HookConfig::None)
                        .then(|| r.tokens_per_s / base(r)),
                })
                .collect(),
        );
        writeln!(out, "\nratio to no hooks:").map_err(Error::Output)?;
        for r in rows.iter().filter(|r| r.hooks != HookConfig::None) {
            let base = base(r);
            writeln!(
                out,
                "  {:<30} {:<14} {:.3}",
                r.hooks.name(),
                test(r.batch),
                r.tokens_per_s / base
            )
            .map_err(Error::Output)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_llama_batched_bench_rows() {
        let out = "main: n_kv_max = 1536\n\n|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |\n|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|\n|    50 |     32 |   16 |   1312 |    4.088 |   195.70 |    5.772 |    88.70 |    9.860 |   133.06 |\n";
        let b = parse_batched_bench(out).unwrap();
        assert_eq!((b.s_pp, b.s_tg, b.t), (195.70, 88.70, 9.860));
        assert!(parse_batched_bench("no table here\n| a | b |").is_none());
    }
}
