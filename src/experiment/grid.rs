//! Running the grid: the plan's groups as one continuously batched job, each sequence with
//! its own hooks, each group's file written as soon as its rows are complete.

use std::collections::BTreeMap;
use std::path::Path;

use super::spec::{Condition, Intervention, Metric, Scale, Spec};
use crate::chat::Prompt;
use crate::directions::select::{refusal_score, refusal_tokens};
use crate::engine::{GenConfig, Generation};
use crate::error::{Error, Result};
use crate::ffi::Token;
use crate::fsio::write_atomic;
use crate::hooks::{Edit, HookSet, Scope};
use crate::label::{degenerate_reason, Labeler, REFUSAL_PHRASES};

use super::plan::{check_groups, group_file, Progress, Shard};
use super::prepare::Ready;

impl Ready<'_> {
    /// The hook edit of intervention `index` (from 1) of `cond` for the batch rows `seqs`.
    fn edit(
        &self,
        cond: &Condition,
        index: usize,
        iv: &Intervention,
        seqs: Vec<usize>,
    ) -> Result<Edit> {
        let norms = self.plan.resolved.resid_norms.get(&cond.prompts);
        crate::experiment::steer::edit(
            &cond.id,
            index,
            &self.directions[&iv.direction],
            iv,
            norms.map(Vec::as_slice),
            Scope::only(seqs),
        )
    }

    /// The engine job for `pairs` = (condition, prompt) in plan order: one prompt per pair,
    /// and one hook set holding every condition's edits, each scoped to its own pairs.
    ///
    /// # Errors
    /// A direction or intervention that cannot become an edit.
    pub fn job(
        &self,
        pairs: &[(usize, usize)],
        label: &dyn Fn(usize) -> String,
    ) -> Result<(Vec<Prompt>, HookSet)> {
        let plan = &self.plan;
        let mut batch = Vec::with_capacity(pairs.len());
        let mut hooks = HookSet::new(self.model.info.n_layer, self.model.info.n_embd);
        let mut by_cond: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, &(c, row)) in pairs.iter().enumerate() {
            let p = plan.prompt_sample(row).0;
            batch.push(self.prompts[&plan.conditions[c].prompts][p].clone());
            by_cond.entry(c).or_default().push(i);
        }
        for (&c, seqs) in &by_cond {
            let cond = &plan.conditions[c];
            let ins = &self.instructions[&cond.prompts];
            for (k, iv) in cond.interventions.iter().enumerate() {
                let s: Vec<usize> = match &iv.scope {
                    None => seqs.clone(),
                    Some(ids) => seqs
                        .iter()
                        .copied()
                        .filter(|&i| ids.contains(&ins[plan.prompt_sample(pairs[i].1).0].id))
                        .collect(),
                };
                if !s.is_empty() {
                    hooks.add_edit(self.edit(cond, k + 1, iv, s)?)?;
                }
            }
        }
        hooks.name_sequences((0..pairs.len()).map(label).collect());
        Ok((batch, hooks))
    }

    /// The generation settings of this plan's grid for `pairs`: when sampling, each pair's
    /// sampler is seeded from the spec's seed, its condition, prompt id and sample number
    /// alone, so its completion is the same in any batch, shard or resume.
    pub fn gen_config(&self, pairs: &[(usize, usize)]) -> GenConfig {
        let plan = &self.plan;
        let sampling = match plan.spec.metric {
            Metric::Generate => plan.spec.generation.sampling(),
            Metric::Score => None,
        };
        let seeds = match sampling {
            None => Vec::new(),
            Some(_) => pairs
                .iter()
                .map(|&(c, row)| {
                    let cond = &plan.conditions[c];
                    let (p, k) = plan.prompt_sample(row);
                    let id = &self.instructions[&cond.prompts][p].id;
                    crate::engine::sequence_seed(
                        plan.spec.seed,
                        &format!("{}\u{1f}{id}\u{1f}{k}", cond.id),
                    )
                })
                .collect(),
        };
        GenConfig {
            max_new_tokens: match plan.spec.metric {
                Metric::Generate => plan.spec.generation.max_new_tokens,
                Metric::Score => 0,
            },
            keep_first_logits: true,
            sampling,
            seeds,
            ..GenConfig::default()
        }
    }

    /// One pair's CSV record.
    fn record(
        &self,
        c: usize,
        row: usize,
        o: &Generation,
        labeler: &Labeler,
        toks: &[Token],
    ) -> Vec<String> {
        let plan = &self.plan;
        let cond = &plan.conditions[c];
        // The engine has checked every logit for finiteness, naming the condition.
        let logits = o
            .first_logits
            .as_deref()
            .expect("keep_first_logits was set");
        let score = refusal_score(logits, toks);
        let (p, sample) = plan.prompt_sample(row);
        let ins = &self.instructions[&cond.prompts][p];
        let (label, reason, ntok, stop) = match plan.spec.metric {
            Metric::Score => (String::new(), String::new(), 0, String::new()),
            Metric::Generate => (
                labeler.label(&o.text).to_string(),
                degenerate_reason(&o.text).unwrap_or("").to_string(),
                o.tokens.len(),
                o.stop.name().to_string(),
            ),
        };
        let mut rec = vec![
            plan.run_id.clone(),
            plan.model.file.clone(),
            plan.model.sha256.clone(),
            plan.model.quant.clone(),
            cond.experiment.clone(),
            cond.id.clone(),
            cond.vars_text(),
        ];
        for k in 0..plan.max_interventions() {
            match cond.interventions.get(k) {
                Some(iv) => rec.extend([
                    iv.direction.clone(),
                    iv.op.to_string(),
                    iv.layers_text(),
                    super::spec::fmt_num(iv.coefficient),
                    match iv.scale {
                        Scale::Raw => "raw".into(),
                        Scale::Resid => "resid".into(),
                    },
                    iv.source.to_string(),
                    plan.direction_seeds
                        .get(&iv.direction)
                        .map_or(String::new(), u64::to_string),
                ]),
                None => rec.extend(std::iter::repeat_n(String::new(), 7)),
            }
        }
        rec.extend([
            cond.prompts.clone(),
            p.to_string(),
            ins.id.clone(),
            sample.to_string(),
            ins.category.clone().unwrap_or_default(),
            ins.source.clone().unwrap_or_default(),
            plan.spec.metric.to_string(),
            label,
            reason,
            format!("{score:.4}"),
            ntok.to_string(),
            stop,
            match plan.spec.metric {
                Metric::Score => String::new(),
                Metric::Generate => o.text.clone(),
            },
        ]);
        rec
    }

    /// Runs `groups` as one continuously batched job and hands each group's CSV rows (no
    /// header, plan order) to `written(group, bytes)` as soon as its last pair is done.
    /// Batch invariance makes every row the same as when its group runs alone.
    ///
    /// # Errors
    /// Engine errors; non-finite logits, naming the condition; whatever `written` returns.
    pub fn run_groups_streaming(
        &self,
        session: &mut crate::engine::Session<'_>,
        groups: &[usize],
        toks: &[Token],
        written: &mut dyn FnMut(usize, Vec<u8>) -> Result<()>,
    ) -> Result<()> {
        let plan = &self.plan;
        let mut pairs = Vec::new();
        let mut slot_of = Vec::new(); // (group index in `groups`, position in the group)
        for (gi, &g) in groups.iter().enumerate() {
            for (k, pair) in plan.group_pairs(g).into_iter().enumerate() {
                pairs.push(pair);
                slot_of.push((gi, k));
            }
        }
        let label = |i: usize| {
            let (c, row) = pairs[i];
            let (p, k) = plan.prompt_sample(row);
            let sample = if plan.samples() > 1 {
                format!(" sample {k}")
            } else {
                String::new()
            };
            format!(
                "condition {}, prompt {p}{sample}, group {}",
                plan.conditions[c].id, groups[slot_of[i].0]
            )
        };
        let (batch, mut hooks) = self.job(&pairs, &label)?;
        let labeler = labeler(&plan.spec);
        let gen = &plan.spec.generation;
        let cfg = self.gen_config(&pairs);
        let model = self.model;
        let mut stop = |_: usize, t: &[Token]| {
            gen.early_stop && t.len() >= gen.min_tokens && labeler.settled(&model.detokenize(t))
        };
        let mut rows: Vec<Vec<Option<Vec<String>>>> = groups
            .iter()
            .map(|&g| vec![None; plan.group_pairs(g).len()])
            .collect();
        let mut left: Vec<usize> = rows.iter().map(Vec::len).collect();
        let labeler2 = labeler.clone();
        session.generate_each(&batch, &cfg, &mut hooks, &mut stop, &mut |i, o| {
            let (c, p) = pairs[i];
            let (gi, k) = slot_of[i];
            rows[gi][k] = Some(self.record(c, p, &o, &labeler2, toks));
            left[gi] -= 1;
            if left[gi] == 0 {
                let mut w = csv::WriterBuilder::new()
                    .has_headers(false)
                    .from_writer(Vec::new());
                for r in rows[gi].drain(..) {
                    w.write_record(r.expect("every pair of the group is done"))
                        .map_err(Error::Csv)?;
                }
                let bytes = w
                    .into_inner()
                    .map_err(|e| Error::Csv(e.into_error().into()))?;
                written(groups[gi], bytes)?;
            }
            Ok(())
        })
    }
}

/// The labeler a spec asks for.
pub fn labeler(spec: &Spec) -> Labeler {
    Labeler::new(
        spec.labels
            .phrases
            .clone()
            .unwrap_or_else(|| REFUSAL_PHRASES.iter().map(|s| s.to_string()).collect()),
        spec.labels.window,
        spec.labels.anywhere,
    )
}

/// Runs this shard's groups that are not done yet, all in one continuously batched job,
/// writing each group's file as soon as it completes. Returns how many ran now.
///
/// # Errors
/// Engine or I/O errors; a group's rows are written only once it completes.
pub fn run_groups(
    ready: &Ready<'_>,
    dir: &Path,
    shard: Shard,
    progress: &mut Progress<'_>,
    note: &mut dyn FnMut(String),
) -> Result<usize> {
    let plan = &ready.plan;
    let done = check_groups(dir, plan, note)?;
    let todo: Vec<usize> = (0..plan.n_groups)
        .filter(|&g| g % shard.n == shard.k - 1 && !done[g])
        .collect();
    if todo.is_empty() {
        return Ok(0);
    }
    let toks = refusal_tokens(ready.model)?;
    let mut session = ready.model.session()?;
    let total_pairs: usize = todo.iter().map(|&g| plan.group_pairs(g).len()).sum();
    let mut pairs_done = 0;
    let first = plan.conditions[plan.group_pairs(todo[0])[0].0].id.clone();
    progress("run", 0, total_pairs, &first);
    ready.run_groups_streaming(&mut session, &todo, &toks, &mut |g, rows| {
        let path = group_file(dir, g);
        write_atomic(&path, &rows).map_err(|e| Error::io(&path, e))?;
        pairs_done += plan.group_pairs(g).len();
        let cond = &plan.conditions[plan.group_pairs(g)[0].0].id;
        progress("run", pairs_done, total_pairs, cond);
        Ok(())
    })?;
    Ok(todo.len())
}

/// Prompt tokens per prompt set (for estimates).
pub fn token_counts(ready_prompts: &BTreeMap<String, Vec<Prompt>>) -> BTreeMap<String, usize> {
    ready_prompts
        .iter()
        .map(|(k, v)| (k.clone(), v.iter().map(|p| p.tokens.len()).sum()))
        .collect()
}
