//! Add and project edits of the residual stream, and the sequences they apply to.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EditKind {
    /// h ← h + v
    Add,
    /// h ← h − (h·d̂) d̂
    Project,
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
                return Err(Error::Invalid(format!(
                    "projection direction at layer {l} has norm {n}"
                )));
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
    /// Rows × layers this edit changed so far.
    pub fn touched(&self) -> u64 {
        self.touched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projection_of_zero_direction_is_refused() {
        assert!(Edit::project([(0, vec![0.0, 0.0])].into(), Scope::All).is_err());
    }
}
