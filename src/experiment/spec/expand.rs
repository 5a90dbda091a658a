//! Expanding a spec's experiments into conditions: each sweep's combinations, templates
//! (`{var}`) substituted from the sweep and the built-in values preparation resolved, and
//! every intervention resolved to layers, coefficients and scopes.

use std::collections::{BTreeMap, BTreeSet};

use super::{value_text, Condition, Intervention, InterventionSpec, Source, Spec};
use crate::error::{Error, Result};
use crate::hooks::LayerSet;

/// Where an error of the expansion is: a condition's id and one of its interventions.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ctx<'a> {
    pub id: &'a str,
    /// From 1.
    pub intervention: usize,
}

impl Ctx<'_> {
    /// `id: intervention N: field: problem`, or without the field.
    fn err(&self, field: Option<&str>, problem: impl std::fmt::Display) -> Error {
        Error::Condition {
            id: self.id.to_string(),
            intervention: Some(self.intervention),
            field: field.map(str::to_string),
            problem: problem.to_string(),
        }
    }
}

/// Values known when expanding the grid besides the sweep variables.
#[derive(Debug, Clone, Default)]
pub struct Builtins {
    pub n_layer: usize,
    pub steer_layer: Option<usize>,
    pub steer_coef: Option<f64>,
    pub refusal_layer: Option<usize>,
}

impl Builtins {
    fn get(&self, k: &str) -> Option<toml::Value> {
        let int = |v: usize| toml::Value::Integer(v as i64);
        match k {
            "n_layer" => Some(int(self.n_layer)),
            "last_layer" => Some(int(self.n_layer.saturating_sub(1))),
            "steer_layer" => self.steer_layer.map(int),
            "steer_coef" => self.steer_coef.map(toml::Value::Float),
            "refusal_layer" => self.refusal_layer.map(int),
            _ => None,
        }
    }
}

impl Spec {
    /// Expands every experiment's sweep into conditions, resolving templates with `b`.
    /// `prompt_ids[set]` lists each set's prompt ids, to check scopes.
    ///
    /// # Errors
    /// Unknown variables, bad fields, layers out of range, duplicate condition ids.
    pub fn expand(
        &self,
        b: &Builtins,
        prompt_ids: &BTreeMap<String, Vec<String>>,
    ) -> Result<Vec<Condition>> {
        self.expand_inner(b, prompt_ids)
            .map_err(|e| self.located(e))
    }

    /// Prefixes an error with where the spec came from.
    pub fn located(&self, e: Error) -> Error {
        if self.origin.is_empty() {
            e
        } else {
            Error::Located {
                origin: self.origin.clone(),
                err: Box::new(e),
            }
        }
    }

    fn expand_inner(
        &self,
        b: &Builtins,
        prompt_ids: &BTreeMap<String, Vec<String>>,
    ) -> Result<Vec<Condition>> {
        let mut out: Vec<Condition> = Vec::new();
        let mut seen = BTreeSet::new();
        for e in &self.experiment {
            let keys: Vec<&String> = e.sweep.keys().collect();
            let mut idx = vec![0usize; keys.len()];
            loop {
                let vars: Vec<(String, toml::Value)> = keys
                    .iter()
                    .zip(&idx)
                    .map(|(k, &i)| ((*k).clone(), e.sweep[*k][i].clone()))
                    .collect();
                let id = if vars.is_empty() {
                    e.id.clone()
                } else {
                    format!(
                        "{}[{}]",
                        e.id,
                        vars.iter()
                            .map(|(k, v)| format!("{k}={}", value_text(v)))
                            .collect::<Vec<_>>()
                            .join(",")
                    )
                };
                if !seen.insert(id.clone()) {
                    return Err(Error::Condition {
                        id,
                        intervention: None,
                        field: None,
                        problem: "duplicate condition id (two sweep values print the same)".into(),
                    });
                }
                let mut ivs = Vec::new();
                for (i, t) in e.intervention.iter().enumerate() {
                    let ctx = Ctx {
                        id: &id,
                        intervention: i + 1,
                    };
                    let t = substitute(t, &vars, b, ctx)?;
                    let iv: InterventionSpec = t
                        .try_into()
                        .map_err(|x: toml::de::Error| ctx.err(None, x.message()))?;
                    ivs.push(self.resolve(iv, b, ctx, prompt_ids.get(&e.prompts))?);
                }
                out.push(Condition {
                    id,
                    experiment: e.id.clone(),
                    prompts: e.prompts.clone(),
                    vars,
                    interventions: ivs,
                });
                // Odometer over the sweep, last key fastest.
                let mut k = keys.len();
                let mut wrapped = true;
                while k > 0 {
                    k -= 1;
                    idx[k] += 1;
                    if idx[k] < e.sweep[keys[k]].len() {
                        wrapped = false;
                        break;
                    }
                    idx[k] = 0;
                }
                if wrapped {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn resolve(
        &self,
        s: InterventionSpec,
        b: &Builtins,
        ctx: Ctx<'_>,
        ids: Option<&Vec<String>>,
    ) -> Result<Intervention> {
        if !self.directions.contains_key(&s.direction) {
            return Err(ctx.err(
                Some("direction"),
                format!(
                    "no direction '{}' (defined: {})",
                    s.direction,
                    self.directions
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        resolve_fields(s, b, ctx, ids)
    }
}

/// One intervention given outside a spec (`generate --intervention`): the template `t`
/// substituted with the built-ins and resolved as a spec's would be, its errors under `id`
/// and `index` (from 1). `direction` is kept as given.
///
/// # Errors
/// As a spec's intervention: [`Error::Condition`] naming the field.
pub fn resolve_given(
    t: &toml::Value,
    b: &Builtins,
    id: &str,
    index: usize,
) -> Result<Intervention> {
    let ctx = Ctx {
        id,
        intervention: index,
    };
    let t = substitute(t, &[], b, ctx)?;
    let iv: InterventionSpec = t
        .try_into()
        .map_err(|x: toml::de::Error| ctx.err(None, x.message()))?;
    resolve_fields(iv, b, ctx, None)
}

/// Layers, coefficient, source and scope of an intervention whose direction is known.
fn resolve_fields(
    s: InterventionSpec,
    b: &Builtins,
    ctx: Ctx<'_>,
    ids: Option<&Vec<String>>,
) -> Result<Intervention> {
    let nl = b.n_layer;
    let layers = LayerSet::from_toml(&s.layers, nl)
        .map_err(|e| ctx.err(Some("layers"), e))?
        .into_vec();
    if layers.is_empty() {
        return Err(ctx.err(Some("layers"), "empty"));
    }
    let coefficient = match &s.coefficient {
        toml::Value::Integer(i) => *i as f64,
        toml::Value::Float(f) => *f,
        toml::Value::String(t) => t
            .trim()
            .parse::<f64>()
            .map_err(|_| ctx.err(Some("coefficient"), format!("'{t}' is not a number")))?,
        other => return Err(ctx.err(Some("coefficient"), format!("{other} is not a number"))),
    };
    if !coefficient.is_finite() {
        return Err(ctx.err(Some("coefficient"), format!("{coefficient} is not finite")));
    }
    let source = match &s.source {
        None => Source::Own,
        Some(toml::Value::String(t)) if t == "own" => Source::Own,
        Some(toml::Value::String(t)) if t == "steer" => match b.steer_layer {
            Some(l) => Source::Layer(l),
            None => return Err(ctx.err(Some("source"), "\"steer\" needs a [steer] table")),
        },
        Some(v) => {
            let l = match v {
                toml::Value::Integer(i) => Some(*i),
                toml::Value::String(t) => t.trim().parse::<i64>().ok(),
                _ => None,
            };
            match l {
                Some(l) if l >= 0 && (l as usize) < nl => Source::Layer(l as usize),
                Some(l) => {
                    return Err(ctx.err(
                        Some("source"),
                        format!("layer {l} out of range ({nl} layers)"),
                    ))
                }
                None => {
                    return Err(ctx.err(
                        Some("source"),
                        format!("{v} is neither \"own\" nor a layer number"),
                    ))
                }
            }
        }
    };
    if let (Some(sc), Some(ids)) = (&s.scope, ids) {
        if sc.is_empty() {
            return Err(ctx.err(Some("scope"), "empty list (omit it for all prompts)"));
        }
        for p in sc {
            if !ids.contains(p) {
                return Err(ctx.err(
                    Some("scope"),
                    format!("no prompt '{p}' in the condition's prompt set"),
                ));
            }
        }
    }
    Ok(Intervention {
        direction: s.direction,
        op: s.op,
        layers,
        coefficient,
        scale: s.scale,
        source,
        scope: s.scope,
    })
}

/// Replaces `{var}` in every string of a template: a string that is exactly `{var}` takes the
/// variable's value and type, otherwise the text is spliced in. `{a + b - 1}` is integer
/// arithmetic over sweep variables, built-ins and integer literals (spaces optional); a body
/// that is itself a variable's name is that variable, so `{var}` reads as it always has.
pub(super) fn substitute(
    t: &toml::Value,
    vars: &[(String, toml::Value)],
    b: &Builtins,
    ctx: Ctx<'_>,
) -> Result<toml::Value> {
    let lookup = |k: &str| -> Result<toml::Value> {
        if let Some((_, v)) = vars.iter().find(|(n, _)| n == k) {
            return Ok(v.clone());
        }
        b.get(k).ok_or_else(|| {
            let known: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
            let why = match k {
                "steer_layer" | "steer_coef" => " (needs a [steer] table)",
                "refusal_layer" => " (needs a refusal direction with select or layer)",
                _ => "",
            };
            ctx.err(
                None,
                format!(
                    "unknown variable {{{k}}}{why}; known: {} n_layer last_layer steer_layer steer_coef refusal_layer",
                    known.join(" ")
                ),
            )
        })
    };
    // A `{...}` body: a variable, or a sum of integer terms.
    let eval = |k: &str| -> Result<toml::Value> {
        let known = vars.iter().any(|(n, _)| n == k) || b.get(k).is_some();
        if known || !k.contains(['+', '-']) {
            return lookup(k);
        }
        arithmetic(k, &lookup, ctx).map(toml::Value::Integer)
    };
    Ok(match t {
        toml::Value::String(s) => {
            if let Some(k) = s.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
                if !k.contains(['{', '}']) {
                    return eval(k);
                }
            }
            let mut out = String::new();
            let mut rest = s.as_str();
            while let Some(i) = rest.find('{') {
                out.push_str(&rest[..i]);
                let Some(j) = rest[i..].find('}') else {
                    return Err(ctx.err(None, format!("unclosed '{{' in '{s}'")));
                };
                out.push_str(&value_text(&eval(&rest[i + 1..i + j])?));
                rest = &rest[i + j + 1..];
            }
            out.push_str(rest);
            toml::Value::String(out)
        }
        toml::Value::Array(a) => toml::Value::Array(
            a.iter()
                .map(|x| substitute(x, vars, b, ctx))
                .collect::<Result<_>>()?,
        ),
        toml::Value::Table(m) => toml::Value::Table(
            m.iter()
                .map(|(k, x)| Ok((k.clone(), substitute(x, vars, b, ctx)?)))
                .collect::<Result<_>>()?,
        ),
        other => other.clone(),
    })
}

/// The value of `{expr}`, terms joined by `+` and `-` (the first may carry a sign): each an
/// integer literal or a variable (`lookup`) whose value is an integer.
fn arithmetic(
    expr: &str,
    lookup: &dyn Fn(&str) -> Result<toml::Value>,
    ctx: Ctx<'_>,
) -> Result<i64> {
    let bad = |why: String| ctx.err(None, format!("{{{expr}}}: {why}"));
    let mut total: i64 = 0;
    let mut sign = 1i64;
    let mut rest = expr.trim();
    // A leading sign belongs to the first term.
    if let Some(r) = rest.strip_prefix('-') {
        sign = -1;
        rest = r;
    } else if let Some(r) = rest.strip_prefix('+') {
        rest = r;
    }
    loop {
        let end = rest.find(['+', '-']).unwrap_or(rest.len());
        let term = rest[..end].trim();
        if term.is_empty() {
            return Err(bad("a term is missing (terms are joined by + and -)".into()));
        }
        let v = match term.parse::<i64>() {
            Ok(v) => v,
            Err(_) => match lookup(term)? {
                toml::Value::Integer(v) => v,
                other => {
                    return Err(bad(format!(
                        "term '{term}' is {}, not an integer",
                        crate::text::shown(&other.to_string())
                    )))
                }
            },
        };
        total = v
            .checked_mul(sign)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| bad("overflows".into()))?;
        if end == rest.len() {
            return Ok(total);
        }
        sign = if rest[end..].starts_with('-') { -1 } else { 1 };
        rest = &rest[end + 1..];
    }
}
