//! llama.cpp control-vector GGUF files: export a direction × coefficient × layer range in the
//! format `llama-cli --control-vector` and `cvector-generator` use (tensors `direction.<il>`,
//! F32, one per layer from 1, `general.architecture = controlvector`), and import such files
//! (from cvector-generator or repeng) as directions.

use std::collections::BTreeMap;
use std::io::Cursor;

use super::{Direction, DirectionFile};
use crate::error::{At, Empty, Error, LayerOf, Result, TensorProblem, ValueOf};
use crate::gguf::{Gguf, Writer};

/// Bounds on an imported control vector, far above any model (the largest have ~130 layers
/// and n_embd ~16k), so a corrupt layer index cannot make us allocate gigabytes of zero rows.
const MAX_LAYERS: usize = 4096;
const MAX_ELEMENTS: usize = 1 << 26;

/// The control vector α·d[l] for `layers` (each ≥ 1), as GGUF bytes; other layers are left
/// out (llama.cpp treats them as zero).
///
/// # Errors
/// Layer 0 (llama.cpp has no slot for it) or a layer out of range ([`Error::Layer`]), a row
/// of zeros (such as a layer missing from the control vector the direction was imported
/// from) or one that overflows times the coefficient ([`Error::Value`]), a non-finite
/// coefficient ([`Error::Flag`]), no layers.
pub fn export(d: &Direction, arch: &str, coefficient: f32, layers: &[usize]) -> Result<Vec<u8>> {
    if !coefficient.is_finite() {
        return Err(Error::flag(
            "coefficient",
            Some(coefficient.to_string()),
            "is not finite",
        ));
    }
    if layers.is_empty() {
        return Err(Error::Empty(Empty::ExportLayers));
    }
    for &l in layers {
        if l == 0 || l >= d.n_layer() {
            return Err(Error::Layer {
                layer: l,
                n_layer: d.n_layer(),
                of: LayerOf::CvecExport,
            });
        }
        if let Some(&x) = d.rows[l].iter().find(|&&x| !(x * coefficient).is_finite()) {
            return Err(Error::Value {
                what: ValueOf::Overflow {
                    name: d.name.clone(),
                    coefficient,
                },
                layer: l,
                value: f64::from(x),
            });
        }
        if d.rows[l].iter().all(|&x| x == 0.0) {
            return Err(Error::Value {
                what: ValueOf::Zero(d.name.clone()),
                layer: l,
                value: 0.0,
            });
        }
    }
    let mut w = Writer::new();
    w.str("general.architecture", "controlvector")
        .str("controlvector.model_hint", arch)
        .i32("controlvector.layer_count", layers.len() as i32);
    for &l in layers {
        w.tensor_f32(
            &format!("direction.{l}"),
            d.rows[l].iter().map(|&x| x * coefficient),
        );
    }
    Ok(w.to_bytes())
}

/// Reads a control-vector GGUF as one direction (`cvec`), zero rows where the file has no
/// tensor. The number of layers is the highest tensor index + 1 unless the caller checks it
/// against a model (`DirectionFile::check_model` does).
///
/// # Errors
/// Not a GGUF ([`Error::GgufData`]); a tensor not named `direction.<il>` with il ≥ 1, not
/// F32 1-D, of another size than the others, or past the end ([`Error::Tensor`]); no
/// tensors or too many values ([`Error::Record`]); a NaN or inf ([`Error::Value`]).
pub fn import(bytes: &[u8]) -> Result<DirectionFile> {
    let g = Gguf::parse(Cursor::new(bytes), bytes.len() as u64).map_err(Error::GgufData)?;
    let mut rows: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
    let mut n_embd = None;
    for t in &g.tensors {
        let bad = |problem| Error::Tensor {
            tensor: t.name.clone(),
            problem,
        };
        let il: usize = t
            .name
            .strip_prefix("direction.")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(TensorProblem::NotDirection))?;
        if il == 0 {
            return Err(bad(TensorProblem::Layer0));
        }
        if il >= MAX_LAYERS {
            return Err(bad(TensorProblem::Beyond {
                layer: il,
                max: MAX_LAYERS,
            }));
        }
        if t.ggml_type != 0 || t.dims.len() != 1 {
            return Err(bad(TensorProblem::NotF32Row));
        }
        let ne = t.dims[0] as usize;
        if *n_embd.get_or_insert(ne) != ne {
            return Err(bad(TensorProblem::Elements {
                got: ne,
                want: n_embd.unwrap_or(0),
            }));
        }
        let start = t.offset as usize;
        let raw = bytes
            .get(start..start + ne * 4)
            .ok_or_else(|| bad(TensorProblem::PastEnd))?;
        rows.insert(
            il,
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
        );
    }
    let n_embd =
        n_embd.ok_or_else(|| Error::record(At::Whole, "no direction tensors in the file"))?;
    let n_layer = rows.keys().next_back().map_or(0, |l| l + 1);
    if n_layer.saturating_mul(n_embd) > MAX_ELEMENTS {
        return Err(Error::record(
            At::Whole,
            format!(
                "{n_layer} layers x {n_embd} is larger than any model (at most {MAX_ELEMENTS} values)"
            ),
        ));
    }
    let layers: Vec<String> = rows.keys().map(usize::to_string).collect();
    let full: Vec<Vec<f32>> = (0..n_layer)
        .map(|l| rows.remove(&l).unwrap_or_else(|| vec![0.0; n_embd]))
        .collect();
    let mut meta = BTreeMap::new();
    meta.insert("kind".into(), "control-vector".into());
    meta.insert(
        "arch".into(),
        g.get_str("controlvector.model_hint")
            .unwrap_or("any")
            .to_string(),
    );
    meta.insert("cvec_layers".into(), layers.join(","));
    DirectionFile::new(
        vec![Direction {
            name: "cvec".into(),
            rows: full,
        }],
        meta,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_import_round_trip() {
        let d = Direction {
            name: "x".into(),
            rows: (0..4).map(|l| vec![l as f32, 1.0, -2.0]).collect(),
        };
        let b = export(&d, "llama", 2.0, &[1, 3]).unwrap();
        let f = import(&b).unwrap();
        let c = f.get(None).unwrap();
        assert_eq!(
            c.rows,
            vec![
                vec![0.0; 3],
                vec![2.0, 2.0, -4.0],
                vec![0.0; 3],
                vec![6.0, 2.0, -4.0]
            ]
        );
        assert_eq!(f.meta["arch"], "llama");
        assert!(export(&d, "llama", 1.0, &[0]).is_err());
        assert!(export(&d, "llama", f32::NAN, &[1]).is_err());
        assert!(export(&d, "llama", 1.0, &[4]).is_err());
        // A layer the imported file did not have is zero, and is not exported again.
        let e = export(f.get(None).unwrap(), "llama", 1.0, &[2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("zero at layer 2"), "{e}");
        // Every cut into the header or tensor data is an error (only trailing padding may go).
        let data_end = b.len() - (crate::gguf::DEFAULT_ALIGNMENT as usize - 12);
        for n in 0..data_end {
            assert!(import(&b[..n]).is_err(), "prefix {n}");
        }
    }

    /// The bytes `export` writes are fixed: the SHA-256 below is of what the hand-written
    /// exporter (before `gguf::Writer`) produced for these inputs, so a change to the writer
    /// that changes a control vector's bytes is seen here.
    #[test]
    fn export_bytes_are_unchanged() {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (ne, arch, coefficient, layers) in [
            (5usize, "llama", 2.0f32, &[1usize, 3][..]),
            (8, "qwen2", -0.5, &[2]),
            (3, "a-much-longer-architecture-name", 1.0, &[1, 2, 3]),
        ] {
            let d = Direction {
                name: "x".into(),
                rows: (0..4)
                    .map(|l| (0..ne).map(|i| (l * 10 + i) as f32 * 0.25 - 1.0).collect())
                    .collect(),
            };
            let b = export(&d, arch, coefficient, layers).unwrap();
            h.update((b.len() as u64).to_le_bytes());
            h.update(&b);
        }
        let hex: String = h.finalize().iter().map(|x| format!("{x:02x}")).collect();
        assert_eq!(
            hex,
            "95c68624bbc9cd2da66450451f737b508efe9393d60efddf96a8110244405858"
        );
    }

    /// An exported file as the GGUF reader (not `import`) sees it: its keys, and each
    /// layer's tensor holding α·d[l] at the offset the table gives.
    #[test]
    fn export_reads_back_through_the_gguf_reader() {
        let d = Direction {
            name: "x".into(),
            rows: (0..5)
                .map(|l| (0..7).map(|i| (l * 7 + i) as f32 - 3.5).collect())
                .collect(),
        };
        let b = export(&d, "qwen2", -1.5, &[4, 1, 2]).unwrap();
        let g = Gguf::parse(Cursor::new(&b), b.len() as u64).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.arch(), Some("controlvector"));
        assert_eq!(g.get_str("controlvector.model_hint"), Some("qwen2"));
        assert_eq!(
            g.metadata["controlvector.layer_count"],
            crate::gguf::Value::I64(3)
        );
        assert_eq!(g.metadata.len(), 3);
        let names: Vec<&str> = g.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["direction.4", "direction.1", "direction.2"]);
        for (t, l) in g.tensors.iter().zip([4, 1, 2]) {
            assert_eq!((t.ggml_type, t.dims.as_slice()), (0, &[7u64][..]));
            let at = t.offset as usize;
            let got: Vec<f32> = b[at..at + 28]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let want: Vec<f32> = d.rows[l].iter().map(|x| x * -1.5).collect();
            assert_eq!(got, want, "layer {l}");
        }
    }

    #[test]
    fn missing_layers_read_as_zero_rows() {
        let d = Direction {
            name: "x".into(),
            rows: vec![vec![1.0; 4]; 3],
        };
        let mut b = export(&d, "llama", 1.0, &[2]).unwrap();
        let at = b.windows(11).position(|w| w == b"direction.2").unwrap();
        b[at + 10] = b'9'; // same length, so every offset stays valid
        let f = import(&b).unwrap();
        assert_eq!(f.n_layer(), 10);
        assert_eq!(f.meta["cvec_layers"], "9");
        assert!(f.directions[0].rows[..9]
            .iter()
            .flatten()
            .all(|&x| x == 0.0));
    }
}
