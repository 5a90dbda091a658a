//! Add and project edits of the residual stream, and the sequences they apply to.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, ValueOf};

/// Which sequences a hook acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    /// Sorted prompt indices.
    Only(Vec<usize>),
}

impl Scope {
    pub fn only(mut seqs: Vec<usize>) -> Scope {
        seqs.sort_unstable();
        seqs.dedup();
        Scope::Only(seqs)
    }
}

/// What an edit does to a row: also the spec's `op` (`"add"` or `"project"`, the same text in
/// plan.json and the CSVs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EditKind {
    /// h ← h + v
    Add,
    /// h ← h − (h·d̂) d̂
    Project,
}

impl fmt::Display for EditKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EditKind::Add => "add",
            EditKind::Project => "project",
        })
    }
}

/// An edit of the residual stream at some layers, for some sequences.
#[derive(Debug, Clone)]
pub struct Edit {
    pub kind: EditKind,
    /// Per layer: the vector added (already scaled), or the unit direction projected out.
    pub(super) vectors: BTreeMap<usize, Vec<f32>>,
    pub scope: Scope,
    pub(super) touched: u64,
}

impl Edit {
    /// Adds `vectors[layer]` (already scaled by the caller) at each layer given.
    pub fn add(vectors: BTreeMap<usize, Vec<f32>>, scope: Scope) -> Edit {
        Edit {
            kind: EditKind::Add,
            vectors,
            scope,
            touched: 0,
        }
    }

    /// Projects each layer's direction out of the rows at that layer.
    ///
    /// # Errors
    /// A zero or non-finite direction cannot be normalised.
    pub fn project(directions: BTreeMap<usize, Vec<f32>>, scope: Scope) -> Result<Edit> {
        let mut vectors = BTreeMap::new();
        for (l, d) in directions {
            let n = d.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
            if !(n.is_finite() && n > 0.0) {
                return Err(Error::Value {
                    what: ValueOf::Projection,
                    layer: l,
                    value: n,
                });
            }
            vectors.insert(l, d.iter().map(|&x| (x as f64 / n) as f32).collect());
        }
        Ok(Edit {
            kind: EditKind::Project,
            vectors,
            scope,
            touched: 0,
        })
    }

    pub fn layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.vectors.keys().copied()
    }
    /// A hash of what the edit does (kind, layers, vector bits), not whom it acts on: two
    /// requests with equal fingerprints get identical activations from identical tokens.
    pub fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut mix = |x: u64| h = (h ^ x).wrapping_mul(0x0100_0000_01b3);
        mix(self.kind as u64);
        for (l, v) in &self.vectors {
            mix(*l as u64);
            v.iter().for_each(|x| mix(x.to_bits() as u64));
        }
        h
    }

    /// Rows × layers this edit changed so far.
    pub fn touched(&self) -> u64 {
        self.touched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_spelled_as_in_the_spec() {
        for (k, t) in [(EditKind::Add, "add"), (EditKind::Project, "project")] {
            assert_eq!(k.to_string(), t);
            assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{t}\""));
            let v: toml::Value = toml::from_str(&format!("op = \"{t}\"")).unwrap();
            assert_eq!(v["op"].clone().try_into::<EditKind>().unwrap(), k);
        }
        assert!(serde_json::from_str::<EditKind>("\"Add\"").is_err());
    }

    #[test]
    fn projection_of_zero_direction_is_refused() {
        assert!(Edit::project([(0, vec![0.0, 0.0])].into(), Scope::All).is_err());
    }
}
