//! The run directory's format: `plan.json` (everything the grid was resolved to), the
//! per-completion CSV header, and the group files `groups/gNNNNNN.csv`, each checked against
//! the plan before it counts as done.
//!
//! The run directory holds:
//! - `plan.json`: everything the grid was resolved to (conditions, calibrated layers and
//!   coefficients, residual norms, hashes). A rerun with a different spec, model or prompt
//!   files refuses to mix into it.
//! - `prepared.safetensors`: the directions used, exactly as applied.
//! - `groups/gNNNNNN.csv`: the rows of one group, written atomically when the group is done.
//!
//! Groups are fixed chunks of the (condition, prompt) pairs in plan order, so a batch never
//! depends on what already ran: a killed run loses only the group in flight, and a resumed,
//! sharded or straight run writes the same bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::spec::{Condition, Spec};
use crate::error::{Error, Result, ShardProblem};

/// Progress callback: (phase, done, total, current item).
pub type Progress<'a> = dyn FnMut(&str, usize, usize, &str) + 'a;

/// One row of the steering calibration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CalibrationRow {
    pub layer: usize,
    pub coefficient: f64,
    pub mean_score: f64,
}

/// What preparation resolved, recorded in `plan.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Resolved {
    pub steer_layer: Option<usize>,
    pub steer_coef: Option<f64>,
    pub refusal_layer: Option<usize>,
    /// How `refusal_layer` was chosen.
    pub refusal_selection: Option<String>,
    pub calibration: Vec<CalibrationRow>,
    /// Mean refusal score of the steering prompts without steering.
    pub calibration_baseline: Option<f64>,
    /// Prompt set → mean residual norm per layer at the last prompt token (when measured).
    pub resid_norms: BTreeMap<String, Vec<f64>>,
}

/// A prompt set as loaded, recorded by source, count and hash.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SetRecord {
    pub source: String,
    pub count: usize,
    pub sha256: String,
}

/// The model a run used.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelRecord {
    pub file: String,
    pub sha256: String,
    pub quant: String,
    pub arch: String,
    pub n_layer: usize,
    pub n_embd: usize,
}

/// Everything a run resolved to; `plan.json`. Finishing and merging need only this and the
/// group files, not the model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub run_id: String,
    pub fingerprint: String,
    pub tool_version: String,
    pub spec: Spec,
    pub model: ModelRecord,
    pub sets: BTreeMap<String, SetRecord>,
    pub resolved: Resolved,
    pub conditions: Vec<Condition>,
    /// Prompt count per condition (its set's size).
    pub n_pairs: usize,
    pub n_groups: usize,
    /// Direction name → sha256 of its rows as applied.
    pub direction_hashes: BTreeMap<String, String>,
    /// Random directions' seeds, for the CSV.
    pub direction_seeds: BTreeMap<String, u64>,
}

impl Plan {
    /// Reads `DIR/plan.json`: its bytes (shards are compared by them) and the plan.
    ///
    /// # Errors
    /// A missing or unreadable file, or one that is not a plan.
    pub fn read(dir: &Path) -> Result<(Vec<u8>, Plan)> {
        let p = dir.join("plan.json");
        let b = crate::fsio::read_input(&p, "a plan.json")?;
        let plan = serde_json::from_slice(&b)
            .map_err(|e| Error::file(&p, format!("not a plan file: {e}")))?;
        Ok((b, plan))
    }

    /// The (condition, row) pairs of group `g`.
    pub fn group_pairs(&self, g: usize) -> Vec<(usize, usize)> {
        let gs = self.spec.group_size;
        self.pairs().into_iter().skip(g * gs).take(gs).collect()
    }

    /// Completions per prompt and condition (`generation.samples`).
    pub fn samples(&self) -> usize {
        self.spec.generation.samples.max(1)
    }

    /// The prompt index and sample number of a pair's row: row `r` is sample `r % samples`
    /// of prompt `r / samples` (with one sample, the row is the prompt).
    pub fn prompt_sample(&self, row: usize) -> (usize, usize) {
        (row / self.samples(), row % self.samples())
    }

    /// Every (condition, row) pair in plan order: each condition's prompts in order, each
    /// prompt's samples in order.
    pub fn pairs(&self) -> Vec<(usize, usize)> {
        let n = self.samples();
        self.conditions
            .iter()
            .enumerate()
            .flat_map(|(c, cond)| (0..self.sets[&cond.prompts].count * n).map(move |r| (c, r)))
            .collect()
    }

    /// Most interventions in any condition: the number of `ivK_*` column blocks.
    pub fn max_interventions(&self) -> usize {
        self.conditions
            .iter()
            .map(|c| c.interventions.len())
            .max()
            .unwrap_or(0)
    }
}

/// `K/N`: run groups with index ≡ K−1 (mod N).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub k: usize,
    pub n: usize,
}

impl std::str::FromStr for Shard {
    type Err = Error;
    /// # Errors
    /// [`Error::Shard`] with the text and why it is not `K/N`.
    fn from_str(s: &str) -> Result<Shard> {
        let bad = |problem| Error::Shard {
            text: s.to_string(),
            problem,
        };
        let (k, n) = s.split_once('/').ok_or_else(|| bad(ShardProblem::NotKN))?;
        let (k, n): (usize, usize) = (
            k.trim().parse().map_err(|_| bad(ShardProblem::NotNumber))?,
            n.trim().parse().map_err(|_| bad(ShardProblem::NotNumber))?,
        );
        if k == 0 || n == 0 || k > n {
            return Err(bad(ShardProblem::Range { k, n }));
        }
        Ok(Shard { k, n })
    }
}

impl Shard {
    /// K/N of a SLURM job-array task (`--shard slurm`), read through `var` (the environment):
    /// K = (SLURM_ARRAY_TASK_ID − SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP + 1 and
    /// N = SLURM_ARRAY_TASK_COUNT, so `--array=1-4`, `--array=0-3` and `--array=0-6:2` all
    /// give shards 1/4 … 4/4. STEP defaults to 1 when unset.
    ///
    /// # Errors
    /// [`Error::Flag`] naming the variable that is missing, not a number, or at odds with the
    /// others (a task outside MIN + STEP × (0..COUNT), as a list such as `--array=1,5,9` gives).
    pub fn from_slurm(var: impl Fn(&str) -> Option<String>) -> Result<Shard> {
        let bad = |why: String| Error::flag("--shard", Some("slurm".into()), why);
        let get = |name: &str| -> Result<u64> {
            let v = var(name).ok_or_else(|| {
                bad(format!(
                    "needs {name}, which is not set (run it as a task of `sbatch --array`, or give --shard K/N)"
                ))
            })?;
            v.trim()
                .parse()
                .map_err(|_| bad(format!("needs {name} to be a whole number, got '{v}'")))
        };
        let (id, min, count) = (
            get("SLURM_ARRAY_TASK_ID")?,
            get("SLURM_ARRAY_TASK_MIN")?,
            get("SLURM_ARRAY_TASK_COUNT")?,
        );
        let step = match var("SLURM_ARRAY_TASK_STEP") {
            Some(_) => get("SLURM_ARRAY_TASK_STEP")?,
            None => 1,
        };
        let off = id.checked_sub(min).filter(|_| step > 0 && count > 0);
        match off {
            Some(off) if off % step == 0 && off / step < count => Ok(Shard {
                k: (off / step + 1) as usize,
                n: count as usize,
            }),
            _ => Err(bad(format!(
                "got SLURM_ARRAY_TASK_ID={id}, which is not one of MIN + STEP x (0..COUNT) for SLURM_ARRAY_TASK_MIN={min}, _STEP={step}, _COUNT={count}; use an evenly stepped --array range such as 1-4"
            ))),
        }
    }
}

impl Default for Shard {
    fn default() -> Self {
        Shard { k: 1, n: 1 }
    }
}

/// Options of one invocation (not part of the plan: they do not change results).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub shard: Shard,
    /// Chat-template override.
    pub template: Option<String>,
    /// How special-token strings in instructions are read.
    pub special: crate::chat::SpecialTokens,
}

/// Whether `dir/groups` holds any entry.
pub(crate) fn has_group_files(dir: &Path) -> bool {
    std::fs::read_dir(dir.join("groups")).is_ok_and(|mut d| d.next().is_some())
}

pub(crate) fn group_file(dir: &Path, g: usize) -> PathBuf {
    dir.join("groups").join(format!("g{g:06}.csv"))
}

/// The per-completion CSV header for a plan.
pub fn header(plan: &Plan) -> Vec<String> {
    let mut h: Vec<String> = [
        "run_id",
        "model_file",
        "model_sha256",
        "quant",
        "experiment",
        "condition",
        "vars",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for k in 1..=plan.max_interventions() {
        for f in [
            "direction",
            "op",
            "layers",
            "coefficient",
            "scale",
            "source",
            "seed",
        ] {
            h.push(format!("iv{k}_{f}"));
        }
    }
    h.extend(
        [
            "prompt_set",
            "prompt_index",
            "prompt_id",
            "sample",
            "category",
            "source",
            "metric",
            "label",
            "degenerate_reason",
            "refusal_score",
            "tokens_generated",
            "stop",
            "completion",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    h
}

/// What a group file holds, checked against the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupState {
    Missing,
    /// Exactly this group's pairs, in plan order, from this run.
    Done,
    /// Unreadable, truncated, or not this group's rows; why.
    Invalid(String),
    /// Rows from another run (another run id): results that must not be mixed in.
    Foreign(String),
}

/// Verifies group `g`'s file in `dir`: it parses as CSV with the plan's columns and holds
/// exactly the group's (condition, prompt) pairs in plan order, each row carrying this run's
/// id. A file that merely exists proves nothing (an empty or truncated one, or one copied in
/// from another run).
pub fn verify_group(plan: &Plan, dir: &Path, g: usize) -> GroupState {
    let p = group_file(dir, g);
    let bytes = match std::fs::symlink_metadata(&p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return GroupState::Missing,
        Err(e) => return GroupState::Invalid(e.to_string()),
        Ok(md) if !md.is_file() => return GroupState::Invalid("not a regular file".into()),
        Ok(_) => match crate::fsio::read_input(&p, "a group file") {
            Ok(b) => b,
            Err(e) => return GroupState::Invalid(e.to_string()),
        },
    };
    verify_group_bytes(plan, g, &bytes)
}

/// [`verify_group`] on a group file's bytes (the fuzz target's entry).
pub fn verify_group_bytes(plan: &Plan, g: usize, bytes: &[u8]) -> GroupState {
    if g >= plan.n_groups {
        return GroupState::Invalid(format!("group {g} is not in the plan"));
    }
    let want = plan.group_pairs(g);
    let head = header(plan);
    let col = |n: &str| head.iter().position(|h| h == n).expect("known column");
    let (c_run, c_cond, c_idx, c_sample) = (
        col("run_id"),
        col("condition"),
        col("prompt_index"),
        col("sample"),
    );
    let mut r = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(bytes);
    let mut n = 0;
    for (i, rec) in r.records().enumerate() {
        let rec = match rec {
            Ok(rec) => rec,
            Err(e) => return GroupState::Invalid(format!("row {}: {e}", i + 1)),
        };
        if rec.len() != head.len() {
            return GroupState::Invalid(format!(
                "row {} has {} fields, the plan's header {}",
                i + 1,
                rec.len(),
                head.len()
            ));
        }
        if rec[c_run] != plan.run_id {
            return GroupState::Foreign(crate::text::shown(&rec[c_run]));
        }
        let Some(&(c, row)) = want.get(i) else {
            return GroupState::Invalid(format!("more than the group's {} rows", want.len()));
        };
        let (pi, k) = plan.prompt_sample(row);
        if rec[c_cond] != plan.conditions[c].id
            || rec[c_idx] != pi.to_string()
            || rec[c_sample] != k.to_string()
        {
            return GroupState::Invalid(format!(
                "row {} is {} prompt {} sample {}, expected {} prompt {pi} sample {k}",
                i + 1,
                crate::text::shown(&rec[c_cond]),
                crate::text::shown(&rec[c_idx]),
                crate::text::shown(&rec[c_sample]),
                plan.conditions[c].id
            ));
        }
        n += 1;
    }
    if n != want.len() {
        return GroupState::Invalid(format!("{n} rows, the group has {}", want.len()));
    }
    GroupState::Done
}

/// Which groups are done (verified) in `dir`.
pub fn done_groups(dir: &Path, plan: &Plan) -> Vec<bool> {
    (0..plan.n_groups)
        .map(|g| verify_group(plan, dir, g) == GroupState::Done)
        .collect()
}

/// Verifies every group file in `dir`: foreign rows are an error (results of two runs must
/// not mix); an invalid file is reported through `note` and counts as not done, so it is
/// computed again.
///
/// # Errors
/// A group holding another run's rows.
pub fn check_groups(dir: &Path, plan: &Plan, note: &mut dyn FnMut(String)) -> Result<Vec<bool>> {
    let mut done = Vec::with_capacity(plan.n_groups);
    for g in 0..plan.n_groups {
        done.push(match verify_group(plan, dir, g) {
            GroupState::Done => true,
            GroupState::Missing => false,
            GroupState::Invalid(why) => {
                note(format!(
                    "{}: {why}; computing group {g} again",
                    group_file(dir, g).display()
                ));
                false
            }
            GroupState::Foreign(id) => {
                return Err(Error::file(
                    group_file(dir, g),
                    format!(
                        "holds rows of run {id}, not of this run ({}); use a new --out directory",
                        plan.run_id
                    ),
                ))
            }
        });
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::Shard;

    fn slurm(vars: &[(&str, &str)]) -> Result<Shard, String> {
        Shard::from_slurm(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
        .map_err(|e| e.to_string())
    }

    #[test]
    fn shard_from_a_slurm_array() {
        let t = |id, min, count| {
            slurm(&[
                ("SLURM_ARRAY_TASK_ID", id),
                ("SLURM_ARRAY_TASK_MIN", min),
                ("SLURM_ARRAY_TASK_COUNT", count),
            ])
        };
        // --array=1-4 and --array=0-3 both give 1/4 ... 4/4.
        assert_eq!(t("1", "1", "4"), Ok(Shard { k: 1, n: 4 }));
        assert_eq!(t("4", "1", "4"), Ok(Shard { k: 4, n: 4 }));
        assert_eq!(t("0", "0", "4"), Ok(Shard { k: 1, n: 4 }));
        assert_eq!(t("3", "0", "4"), Ok(Shard { k: 4, n: 4 }));
        assert_eq!(t(" 12 ", "10", "3"), Ok(Shard { k: 3, n: 3 }));
        // --array=0-6:2: tasks 0, 2, 4, 6.
        let stepped = |id| {
            slurm(&[
                ("SLURM_ARRAY_TASK_ID", id),
                ("SLURM_ARRAY_TASK_MIN", "0"),
                ("SLURM_ARRAY_TASK_STEP", "2"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ])
        };
        assert_eq!(stepped("6"), Ok(Shard { k: 4, n: 4 }));
        assert!(stepped("3").unwrap_err().contains("SLURM_ARRAY_TASK_ID=3"));
        // Missing, not a number, inconsistent: one line naming the variable.
        for (vars, needle) in [
            (&[][..], "needs SLURM_ARRAY_TASK_ID, which is not set"),
            (
                &[("SLURM_ARRAY_TASK_ID", "2"), ("SLURM_ARRAY_TASK_MIN", "1")][..],
                "needs SLURM_ARRAY_TASK_COUNT, which is not set",
            ),
            (
                &[
                    ("SLURM_ARRAY_TASK_ID", "2"),
                    ("SLURM_ARRAY_TASK_COUNT", "4"),
                ][..],
                "needs SLURM_ARRAY_TASK_MIN, which is not set",
            ),
            (
                &[
                    ("SLURM_ARRAY_TASK_ID", "x"),
                    ("SLURM_ARRAY_TASK_MIN", "1"),
                    ("SLURM_ARRAY_TASK_COUNT", "4"),
                ][..],
                "needs SLURM_ARRAY_TASK_ID to be a whole number, got 'x'",
            ),
            (
                &[
                    ("SLURM_ARRAY_TASK_ID", "5"),
                    ("SLURM_ARRAY_TASK_MIN", "1"),
                    ("SLURM_ARRAY_TASK_COUNT", "4"),
                ][..],
                "SLURM_ARRAY_TASK_ID=5, which is not one of",
            ),
            (
                &[
                    ("SLURM_ARRAY_TASK_ID", "0"),
                    ("SLURM_ARRAY_TASK_MIN", "1"),
                    ("SLURM_ARRAY_TASK_COUNT", "4"),
                ][..],
                "SLURM_ARRAY_TASK_ID=0",
            ),
            (
                &[
                    ("SLURM_ARRAY_TASK_ID", "1"),
                    ("SLURM_ARRAY_TASK_MIN", "1"),
                    ("SLURM_ARRAY_TASK_COUNT", "0"),
                ][..],
                "_COUNT=0",
            ),
        ] {
            let e = slurm(vars).unwrap_err();
            assert!(e.starts_with("--shard slurm "), "{e}");
            assert!(e.contains(needle), "{needle:?} not in {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
