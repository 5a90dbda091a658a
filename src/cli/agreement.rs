//! `persona-gate agreement`: how two finished runs of one grid agree across conditions.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use persona_gate::experiment::report;

#[derive(Args, Debug)]
pub struct AgreementArgs {
    /// A finished run directory (its summary.csv).
    pub a: PathBuf,
    /// A second run; without it, A's refusal rates are compared with A's own first-token
    /// scores (what --metric score computes).
    pub b: Option<PathBuf>,
    /// Print JSON instead of the table: each shared condition's two numbers, the metrics and
    /// Spearman's rho.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &AgreementArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let ag = report::agreement(&a.a, a.b.as_deref())?;
    if a.json {
        let (rows, rho, ma, mb) = &ag;
        let v = serde_json::json!({
            "a": {"run": a.a, "metric": ma.to_string()},
            "b": {"run": a.b.as_ref().unwrap_or(&a.a), "metric": mb.to_string()},
            "conditions": rows
                .iter()
                .map(|(c, x, y)| serde_json::json!({"condition": c, "a": x, "b": y}))
                .collect::<Vec<_>>(),
            "n_conditions": rows.len(),
            "spearman_rho": rho,
        });
        return super::print_json(out, &v);
    }
    write!(out, "{}", report::agreement_text(&ag))?;
    Ok(())
}
