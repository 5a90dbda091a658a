//! Directions in the residual stream: the refusal direction (Arditi et al. 2024) and persona
//! directions, random controls, their files, and comparisons between them.
//!
//! A [`Direction`] has one row per layer (`resid_post.L`), `[n_layer, n_embd]`. Both kinds
//! are differences of means accumulated in f64 by the engine's capture hooks, so memory stays
//! O(layers × n_embd) however many prompts are used.

pub mod cvec;
pub mod extract;
pub mod file;
pub mod import;
mod npy;
pub mod random;
pub mod select;
mod torch;

use crate::error::{Error, Result, ShapesOf, ValueOf};

pub use extract::{
    extract_persona, extract_persona_with_stats, extract_refusal, PersonaAt, PersonaPositions,
    RefusalPositions,
};
pub use file::DirectionFile;
pub use import::{Convention, Stated};
pub use random::{random, random_like};

/// One direction: a row per layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Direction {
    /// e.g. `refusal.pos-1` (post-instruction position −1), `persona.compliant`, `random.s0`.
    pub name: String,
    pub rows: Vec<Vec<f32>>,
}

impl Direction {
    pub fn n_layer(&self) -> usize {
        self.rows.len()
    }
    pub fn n_embd(&self) -> usize {
        self.rows.first().map_or(0, Vec::len)
    }
    /// L2 norm of each layer's row.
    pub fn norms(&self) -> Vec<f64> {
        self.rows.iter().map(|r| norm(r)).collect()
    }
}

pub fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt()
}

/// Cosine similarity in f64; 0 when either vector is zero.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let n = norm(a) * norm(b);
    if n > 0.0 {
        d / n
    } else {
        0.0
    }
}

/// Two directions' cosine similarity at each layer, for `directions cos`.
#[derive(Debug, Clone)]
pub struct LayerCosines {
    pub a: String,
    pub b: String,
    pub cosines: Vec<f64>,
}

impl LayerCosines {
    /// # Errors
    /// Shapes differ, or a row has no direction (zero or non-finite norm).
    pub fn new(a: &Direction, b: &Direction) -> Result<LayerCosines> {
        Ok(LayerCosines {
            a: a.name.clone(),
            b: b.name.clone(),
            cosines: cosine_per_layer(a, b)?,
        })
    }

    /// layer, a, b, cosine.
    pub fn to_csv(&self) -> Vec<u8> {
        crate::text::csv_table(
            &["layer", "a", "b", "cosine"],
            self.cosines.iter().enumerate().map(|(l, c)| {
                vec![
                    l.to_string(),
                    self.a.clone(),
                    self.b.clone(),
                    format!("{c:.6}"),
                ]
            }),
        )
    }

    /// A line plot of cosine against layer.
    pub fn to_svg(&self) -> String {
        let s = crate::plot::Series::line(
            format!("{} vs {}", self.a, self.b),
            self.cosines
                .iter()
                .enumerate()
                .map(|(l, &c)| (l as f64, c))
                .collect(),
        );
        crate::plot::line_plot(
            "cosine similarity per layer",
            "layer (resid_post)",
            "cosine",
            &[s],
            Some((-1.0, 1.0)),
        )
    }
}

/// Per-layer cosine similarity of two directions of the same shape.
///
/// # Errors
/// Shapes differ.
pub fn cosine_per_layer(a: &Direction, b: &Direction) -> Result<Vec<f64>> {
    if a.n_layer() != b.n_layer() || a.n_embd() != b.n_embd() {
        return Err(Error::Shapes {
            what: ShapesOf::Compare,
            a: a.name.clone(),
            a_shape: [a.n_layer(), a.n_embd()],
            b: b.name.clone(),
            b_shape: [b.n_layer(), b.n_embd()],
        });
    }
    a.rows
        .iter()
        .zip(&b.rows)
        .enumerate()
        .map(|(l, (x, y))| {
            // A zero or non-finite row has no direction: say so rather than print 0 or NaN.
            for (d, r) in [(a, x), (b, y)] {
                let n = norm(r);
                if !(n.is_finite() && n > 0.0) {
                    return Err(Error::Value {
                        what: ValueOf::CosineNorm(d.name.clone()),
                        layer: l,
                        value: n,
                    });
                }
            }
            Ok(cosine(x, y))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn direction_files_record_their_hook_point() {
        use crate::hooks::Site;
        use file::HOOK_POINT_KEY;
        let d = Direction {
            name: "d".into(),
            rows: vec![vec![1.0, 2.0]; 3],
        };
        let f = DirectionFile::new(vec![d], BTreeMap::new()).unwrap();
        assert_eq!(f.meta[HOOK_POINT_KEY], "resid_post");
        let g = DirectionFile::from_bytes(&f.to_bytes()).unwrap();
        assert_eq!(
            (g.meta[HOOK_POINT_KEY].as_str(), g.site()),
            ("resid_post", Site::ResidPost)
        );
        // A file of ours from before the key (it has our tool_version) loads as resid_post.
        let mut old = f.clone();
        old.meta.remove(HOOK_POINT_KEY);
        old.meta
            .insert("tool_version".into(), "persona-gate 0.1.0".into());
        let g = DirectionFile::from_bytes(&old.to_bytes()).unwrap();
        assert_eq!(
            (g.meta.get(HOOK_POINT_KEY), g.site()),
            (None, Site::ResidPost)
        );
        // Another site is refused, naming the file and the key.
        let dir = std::env::temp_dir().join(format!("pg-hook-point-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("attn.safetensors");
        let mut other = f.clone();
        other.meta.insert(HOOK_POINT_KEY.into(), "attn_out".into());
        std::fs::write(&p, other.to_bytes()).unwrap();
        let e = DirectionFile::load(&p).unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(e.contains("attn.safetensors"), "{e}");
        assert!(e.contains("metadata hook_point = 'attn_out'"), "{e}");
        assert!(e.contains("only resid_post rows"), "{e}");
    }

    #[test]
    fn cosine_basics() {
        assert!((cosine(&[1.0, 0.0], &[0.0, 2.0])).abs() < 1e-12);
        assert!((cosine(&[1.0, 1.0], &[2.0, 2.0]) - 1.0).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }
}
