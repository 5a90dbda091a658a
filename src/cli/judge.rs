//! `persona-gate judge`: judge a run directory's completions with a local GGUF judge model.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;

use persona_gate::judge::{self, JudgeKind};

#[derive(Args, Debug)]
// The judge model is --judge-model (-m and --model also work); judge prompts are long, so the
// default context per sequence is 2048 tokens here.
#[command(
    mut_arg("model", |a| a.long("judge-model").visible_alias("model").help("Judge model (GGUF)")),
    mut_arg("ctx", |a| a.default_value("2048"))
)]
pub struct JudgeArgs {
    /// Run directory of `reproduce` (completions.csv and plan.json).
    #[arg(long)]
    pub run: PathBuf,
    /// Judge model flags (--judge-model, --threads, --ctx, --parallel, ...).
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// strongreject (rubric: refused, convincing, specific; score and logit score) or
    /// llamaguard (safe/unsafe, categories, P(unsafe)).
    #[arg(long, value_enum, default_value_t = JudgeKind::StrongReject)]
    pub kind: JudgeKind,
    /// Judge prompt template (default: the built-in one for --kind; see
    /// src/judge/templates/).
    #[arg(long)]
    pub template: Option<PathBuf>,
}

/// Runs the judge and prints the per-condition judged rates.
///
/// # Errors
/// Model loading, run directory and judging errors.
pub fn run(a: &JudgeArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let kind = a.kind;
    if let Some(t) = &a.template {
        judge::Template::load(t).context("--template")?;
    }
    // Whether it holds completions is checked under the directory's lock (a run still
    // writing there is named as such).
    anyhow::ensure!(
        a.run.is_dir(),
        "--run {}: not a directory (a `reproduce` run directory?)",
        a.run.display()
    );
    let model = super::load(&a.model)?;
    let pb = super::progress::bar(0, &format!("judge {kind}"));
    let plain = pb.is_hidden();
    let started = Instant::now();
    let mut last = usize::MAX;
    // Counts only: judge prompts and answers never reach the terminal or the logs.
    let mut progress = |done: usize, total: usize| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
        let tenth = done * 10 / total.max(1);
        if plain && tenth != last && total > 0 {
            last = tenth;
            eprintln!(
                "[{:>6.0}s] judge {kind}: {done}/{total} prompts",
                started.elapsed().as_secs_f64()
            );
        }
    };
    let s = persona_gate::experiment::judged::judge_run(
        &a.run,
        &model,
        kind,
        a.template.as_deref(),
        &mut progress,
    )?;
    pb.finish_and_clear();
    write!(out, "{}", s.table())?;
    writeln!(
        out,
        "judge {} ({}, id {}): {} rows, {} judged now, {} already judged by this judge, {} without a completion, {} unparseable; {:.1}s",
        kind,
        s.judge_model,
        s.judge_id,
        s.rows,
        s.judged_now,
        s.already_judged,
        s.no_completion,
        s.unparseable,
        s.seconds
    )?;
    writeln!(
        out,
        "wrote {}/completions.csv (judge columns), judge_summary.csv, judge.json",
        a.run.display()
    )?;
    Ok(())
}
