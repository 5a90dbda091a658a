//! What a spec can be checked for without a model: names refer to defined prompt sets and
//! directions, ids are unique, sweeps are non-empty and bounded, values are finite. Each
//! error names its field, prefixed with where the spec came from.

use std::collections::BTreeSet;

use std::fmt;

use super::{bad_file_name, DirectionSpec, Metric, Spec, BUILTIN_VARS, MAX_CONDITIONS};
use crate::error::{Error, Result};

/// The error of a check: the spec's `origin`, the `field` at fault and why
/// ("origin: field: problem").
fn err(origin: &str, field: &str, problem: impl fmt::Display) -> Error {
    Error::Spec {
        origin: origin.to_string(),
        field: field.to_string(),
        problem: problem.to_string(),
    }
}

impl Spec {
    /// Every check, in the order a reader meets the sections of a spec file.
    pub(super) fn check(&self, origin: &str) -> Result<()> {
        self.check_top(origin)?;
        self.check_directions(origin)?;
        self.check_steer(origin)?;
        self.check_judge(origin)?;
        self.check_experiments(origin)
    }

    /// The name, group size, generation length and prompt sets.
    fn check_top(&self, origin: &str) -> Result<()> {
        if let Some(why) = bad_file_name(&self.name) {
            return Err(err(
                origin,
                "name",
                format!(
                    "'{}' {why} (it names the default run directory runs/<model>/<name>)",
                    crate::text::shown(&self.name)
                ),
            ));
        }
        if self.group_size == 0 {
            return Err(err(origin, "group_size", "must be at least 1"));
        }
        if self.generation.max_new_tokens == 0 && self.metric == Metric::Generate {
            return Err(err(
                origin,
                "generation.max_new_tokens",
                "must be at least 1 (or use metric = \"score\")",
            ));
        }
        let g = &self.generation;
        if !(g.temperature.is_finite() && g.temperature >= 0.0) {
            return Err(err(
                origin,
                "generation.temperature",
                "must be 0 (greedy) or more",
            ));
        }
        if !(g.top_p.is_finite() && g.top_p > 0.0 && g.top_p <= 1.0) {
            return Err(err(
                origin,
                "generation.top_p",
                "must be above 0 and at most 1",
            ));
        }
        if !(g.min_p.is_finite() && (0.0..=1.0).contains(&g.min_p)) {
            return Err(err(origin, "generation.min_p", "must be from 0 to 1"));
        }
        if g.samples == 0 {
            return Err(err(origin, "generation.samples", "must be at least 1"));
        }
        if g.samples > 1 && (g.temperature == 0.0 || self.metric == Metric::Score) {
            return Err(err(
                origin,
                "generation.samples",
                "more than one sample needs sampling (temperature > 0, metric = \"generate\"): greedy samples are identical",
            ));
        }
        if self.prompts.is_empty() {
            return Err(err(origin, "prompts", "no prompt sets defined"));
        }
        for name in self.directions.keys() {
            if let Some(why) = bad_file_name(name) {
                return Err(err(
                    origin,
                    &format!("directions.{}", crate::text::shown(name)),
                    format!("the name {why} (it names plot files)"),
                ));
            }
        }
        for (k, p) in &self.prompts {
            if let Some([a, b]) = p.range {
                if b <= a {
                    return Err(err(
                        origin,
                        &format!("prompts.{k}.range"),
                        format!("[{a}, {b}) is empty"),
                    ));
                }
            }
            if p.n == Some(0) {
                return Err(err(origin, &format!("prompts.{k}.n"), "must be at least 1"));
            }
        }
        Ok(())
    }

    /// Each direction's prompt sets and `like`; at most one defines `{refusal_layer}`.
    fn check_directions(&self, origin: &str) -> Result<()> {
        let mut refusal_defined = false;
        for (k, d) in &self.directions {
            let f = format!("directions.{k}");
            match d {
                DirectionSpec::Refusal {
                    harmful,
                    harmless,
                    select,
                    layer,
                } => {
                    self.need_set(origin, &format!("{f}.harmful"), harmful)?;
                    self.need_set(origin, &format!("{f}.harmless"), harmless)?;
                    if let Some(s) = select {
                        self.need_set(origin, &format!("{f}.select.harmful"), &s.harmful)?;
                        self.need_set(origin, &format!("{f}.select.harmless"), &s.harmless)?;
                        if layer.is_some() {
                            return Err(err(origin, &f, "give select or layer, not both"));
                        }
                    }
                    if select.is_some() || layer.is_some() {
                        if refusal_defined {
                            return Err(err(
                                origin,
                                &f,
                                "only one refusal direction may define {refusal_layer}",
                            ));
                        }
                        refusal_defined = true;
                    }
                }
                DirectionSpec::Persona { questions, .. } => {
                    self.need_set(origin, &format!("{f}.questions"), questions)?
                }
                DirectionSpec::Random { like, .. } => {
                    if let Some(l) = like {
                        self.need_direction(origin, &format!("{f}.like"), l)?;
                        if matches!(self.directions.get(l), Some(DirectionSpec::Random { .. })) {
                            return Err(err(
                                origin,
                                &format!("{f}.like"),
                                "cannot be another random direction",
                            ));
                        }
                    }
                }
                DirectionSpec::File { refusal_layer, .. } => {
                    if refusal_layer.is_some() {
                        if refusal_defined {
                            return Err(err(
                                origin,
                                &f,
                                "only one direction may define {refusal_layer}",
                            ));
                        }
                        refusal_defined = true;
                    }
                }
            }
        }
        Ok(())
    }

    /// The steering calibration's direction, prompts, coefficients and target.
    fn check_steer(&self, origin: &str) -> Result<()> {
        if let Some(s) = &self.steer {
            self.need_direction(origin, "steer.direction", &s.direction)?;
            self.need_set(origin, "steer.prompts", &s.prompts)?;
            if s.coefficients.is_empty() || s.coefficients.iter().any(|c| !c.is_finite()) {
                return Err(err(
                    origin,
                    "steer.coefficients",
                    "need at least one finite value",
                ));
            }
            if !s.target.is_finite() {
                return Err(err(origin, "steer.target", "must be finite"));
            }
        }
        Ok(())
    }

    /// The judge kinds.
    fn check_judge(&self, origin: &str) -> Result<()> {
        if let Some(j) = &self.judge {
            if j.kinds.is_empty() {
                return Err(err(
                    origin,
                    "judge.kinds",
                    "list at least one of strongreject, llamaguard",
                ));
            }
            for k in &j.kinds {
                k.parse::<crate::judge::JudgeKind>()
                    .map_err(|e| err(origin, "judge.kinds", e))?;
            }
        }
        Ok(())
    }

    /// Experiment ids, sweeps (bounded in size, finite values), interventions and plots.
    fn check_experiments(&self, origin: &str) -> Result<()> {
        if self.experiment.is_empty() {
            return Err(err(origin, "experiment", "no experiments defined"));
        }
        let mut ids = BTreeSet::new();
        let mut total = 0usize;
        for e in &self.experiment {
            let f = format!("experiment {}", e.id);
            // A sweep's grid is the product of its value lists: a typo can make it huge.
            let n = e
                .sweep
                .values()
                .fold(1usize, |a, v| a.saturating_mul(v.len()));
            total = total.saturating_add(n);
            if total > MAX_CONDITIONS {
                return Err(err(origin, &format!("{f}: sweep"), format!("the grid reaches more than {MAX_CONDITIONS} conditions; split it into several specs")));
            }
            if let Some(why) = bad_file_name(&e.id) {
                return Err(err(
                    origin,
                    "experiment.id",
                    format!(
                        "'{}' {why} (it names plots/<id>.svg)",
                        crate::text::shown(&e.id)
                    ),
                ));
            }
            if !ids.insert(e.id.clone()) {
                return Err(err(
                    origin,
                    "experiment.id",
                    format!("duplicate id '{}'", e.id),
                ));
            }
            self.need_set(origin, &format!("{f}: prompts"), &e.prompts)?;
            for (k, v) in &e.sweep {
                if v.is_empty() {
                    return Err(err(origin, &format!("{f}: sweep.{k}"), "has no values"));
                }
                if BUILTIN_VARS.contains(&k.as_str()) {
                    return Err(err(
                        origin,
                        &format!("{f}: sweep.{k}"),
                        "is a built-in variable name",
                    ));
                }
                for x in v {
                    match x {
                        toml::Value::Float(f) if !f.is_finite() => {
                            return Err(err(
                                origin,
                                &format!("{f}: sweep.{k}"),
                                format!("{x} is not finite"),
                            ))
                        }
                        toml::Value::Integer(_)
                        | toml::Value::Float(_)
                        | toml::Value::String(_) => {}
                        _ => {
                            return Err(err(
                                origin,
                                &format!("{f}: sweep.{k}"),
                                format!("{x} is not a number or string"),
                            ))
                        }
                    }
                }
            }
            for (i, t) in e.intervention.iter().enumerate() {
                if !t.is_table() {
                    return Err(err(
                        origin,
                        &format!("{f}: intervention {}", i + 1),
                        "must be a table",
                    ));
                }
            }
            if let Some(p) = &e.plot {
                if !e.sweep.contains_key(&p.x) {
                    return Err(err(
                        origin,
                        &format!("{f}: plot.x"),
                        format!("'{}' is not a sweep variable", p.x),
                    ));
                }
                for s in &p.series {
                    if !e.sweep.contains_key(s) {
                        return Err(err(
                            origin,
                            &format!("{f}: plot.series"),
                            format!("'{s}' is not a sweep variable"),
                        ));
                    }
                }
                for r in p.band.iter().chain(&p.reference) {
                    if !self.experiment.iter().any(|x| &x.id == r) {
                        return Err(err(
                            origin,
                            &format!("{f}: plot"),
                            format!("no experiment '{r}'"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// `name` is a defined prompt set, or an error at `field` listing the defined ones.
    fn need_set(&self, origin: &str, field: &str, name: &str) -> Result<()> {
        need(origin, field, name, "prompt set", self.prompts.keys())
    }

    /// `name` is a defined direction, or an error at `field` listing the defined ones.
    fn need_direction(&self, origin: &str, field: &str, name: &str) -> Result<()> {
        need(origin, field, name, "direction", self.directions.keys())
    }
}

/// `name` is among `defined`, or an error at `field`: "no <what> 'name' (defined: ...)".
fn need<'a>(
    origin: &str,
    field: &str,
    name: &str,
    what: &str,
    defined: impl Iterator<Item = &'a String>,
) -> Result<()> {
    let all: Vec<&str> = defined.map(String::as_str).collect();
    if all.contains(&name) {
        return Ok(());
    }
    Err(err(
        origin,
        field,
        format!("no {what} '{name}' (defined: {})", all.join(", ")),
    ))
}
