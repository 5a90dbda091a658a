//! Seeded random control directions, unit or norm-matched to another direction.

use std::collections::BTreeMap;

use crate::error::Result;
use crate::rng::Rng;

use super::{Direction, DirectionFile};

/// A seeded random direction: each layer's row is Gaussian, scaled to unit norm or to
/// `match_norms[layer]` (norm-matched control). The same seed gives the same rows everywhere.
pub fn random(seed: u64, n_layer: usize, n_embd: usize, match_norms: Option<&[f64]>) -> Direction {
    let mut rng = Rng::new(seed);
    let rows = (0..n_layer)
        .map(|l| {
            let v: Vec<f64> = (0..n_embd).map(|_| rng.normal()).collect();
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            let target = match_norms.map_or(1.0, |m| m[l]);
            v.iter().map(|x| (x / n * target) as f32).collect()
        })
        .collect();
    Direction {
        name: format!("random.s{seed}"),
        rows,
    }
}

/// A seeded random control shaped like `like` (a direction of `file`), unit or norm-matched,
/// as a direction file carrying the model provenance of `file`.
///
/// # Errors
/// Only if the generated direction were malformed (it is not for a valid `like`).
pub fn random_like(
    file: &DirectionFile,
    like: &Direction,
    seed: u64,
    norm_matched: bool,
) -> Result<DirectionFile> {
    let norms = like.norms();
    let r = random(
        seed,
        like.n_layer(),
        like.n_embd(),
        norm_matched.then_some(&norms[..]),
    );
    let mut meta = BTreeMap::new();
    for k in ["arch", "model_sha256", "model_file", "quant"] {
        if let Some(v) = file.meta.get(k) {
            meta.insert(k.to_string(), v.clone());
        }
    }
    // A control for a 1-D vector is one too: its row stands for every layer.
    if file.is_broadcast() {
        meta.insert(super::import::BROADCAST.into(), "every layer".into());
    }
    meta.insert("kind".into(), "random".into());
    meta.insert("seed".into(), seed.to_string());
    let how = if norm_matched {
        " (norm-matched)"
    } else {
        " (unit)"
    };
    meta.insert("like".into(), format!("{}{how}", like.name));
    meta.insert(
        "tool_version".into(),
        format!("persona-gate {}", crate::VERSION),
    );
    DirectionFile::new(vec![r], meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directions::cosine_per_layer;

    #[test]
    fn random_is_seeded_and_norm_matched() {
        let a = random(3, 4, 16, None);
        assert_eq!(a, random(3, 4, 16, None));
        assert_ne!(a.rows, random(4, 4, 16, None).rows);
        assert!(a.norms().iter().all(|n| (n - 1.0).abs() < 1e-6));
        let m = random(3, 4, 16, Some(&[1.0, 2.0, 3.0, 4.0]));
        for (l, n) in m.norms().iter().enumerate() {
            assert!((n - (l + 1) as f64).abs() < 1e-5);
        }
        assert!((cosine_per_layer(&a, &m).unwrap()[2] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn a_control_for_a_one_d_vector_is_broadcast_too() {
        let one = DirectionFile::new(
            vec![super::Direction {
                name: "v".into(),
                rows: vec![vec![3.0, 4.0]],
            }],
            [(
                super::super::import::BROADCAST.to_string(),
                "every layer".to_string(),
            )]
            .into(),
        )
        .unwrap();
        let r = random_like(&one, &one.directions[0], 1, true).unwrap();
        assert!(r.is_broadcast());
        let r = DirectionFile::from_bytes(&r.to_bytes())
            .unwrap()
            .broadcast(4)
            .unwrap();
        assert_eq!(r.n_layer(), 4);
        assert!((r.directions[0].norms()[3] - 5.0).abs() < 1e-6);
    }
}
