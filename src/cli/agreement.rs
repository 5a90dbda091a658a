//! `persona-gate agreement`: how two finished runs of one grid agree across conditions.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use persona_gate::experiment::report;

#[derive(Args, Debug)]
pub struct AgreementArgs {
    pub a: PathBuf,
    /// A second run; without it, A's refusal rates are compared with A's own first-token
    /// scores (what --metric score computes).
    pub b: Option<PathBuf>,
}

pub fn run(a: &AgreementArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let ag = report::agreement(&a.a, a.b.as_deref())?;
    write!(out, "{}", report::agreement_text(&ag))?;
    Ok(())
}
