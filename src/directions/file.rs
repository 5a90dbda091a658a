//! Direction files in safetensors format: one F32 tensor `[n_layer, n_embd]` per direction,
//! metadata as string pairs (kind, arch, n_embd, the hook point the rows are at, model sha256,
//! positions, prompt-set hashes and counts, per-layer norms, tool version).
//!
//! We write the format ourselves with sorted keys, so the same directions give byte-identical
//! files, and read it with every offset checked against the file size. [`DirectionFile::load`]
//! also reads the files of other tools (safetensors of any float type, `.npy`, torch.save
//! `.pt`, llama.cpp control vectors) by their first bytes; see [`super::import`].

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use super::import::{self, Foreign, Stated, Tensor};
use super::Direction;
use crate::error::{At, Empty, Error, Named, Result, Shaped, ShapesOf, TensorProblem, ValueOf};
use crate::hooks::Site;
use crate::model::ModelInfo;
use crate::text::shown;

/// A set of directions extracted together, with their provenance.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectionFile {
    pub directions: Vec<Direction>,
    pub meta: BTreeMap<String, String>,
}

/// A JSON object's entries in file order, refusing a key given twice: a JSON map would keep
/// the last and silently drop the first (two tensors of one name).
struct Entries(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut seen = std::collections::BTreeSet::new();
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, Value>()? {
                    if !seen.insert(k.clone()) {
                        return Err(serde::de::Error::custom(format!(
                            "tensor name '{}' appears twice",
                            shown(&k)
                        )));
                    }
                    out.push((k, v));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// The metadata key naming the hook site of the rows, `resid_post`: row L is `resid_post.L`
/// (llama.cpp's `l_out-L`). A file without it, written before the key existed, is resid_post.
pub const HOOK_POINT_KEY: &str = "hook_point";

/// Largest header we accept (the format's own reference limit is 100 MB).
const MAX_HEADER: u64 = 100 << 20;

impl DirectionFile {
    /// # Errors
    /// No directions, or rows of unequal shapes.
    pub fn new(
        directions: Vec<Direction>,
        mut meta: BTreeMap<String, String>,
    ) -> Result<DirectionFile> {
        let first = directions.first().ok_or(Error::Empty(Empty::Directions))?;
        let (nl, ne) = (first.n_layer(), first.n_embd());
        for d in &directions {
            if d.n_layer() != nl || d.rows.iter().any(|r| r.len() != ne) || ne == 0 {
                return Err(Error::Shapes {
                    what: ShapesOf::Save,
                    a: d.name.clone(),
                    a_shape: [d.n_layer(), d.n_embd()],
                    b: first.name.clone(),
                    b_shape: [nl, ne],
                });
            }
            // No writer of direction files puts NaN or inf in one (README, "Reliability").
            if let Some((l, r)) = d
                .rows
                .iter()
                .enumerate()
                .find(|(_, r)| r.iter().any(|x| !x.is_finite()))
            {
                let bad = r.iter().find(|x| !x.is_finite()).expect("found");
                return Err(Error::Value {
                    what: ValueOf::Saved(d.name.clone()),
                    layer: l,
                    value: f64::from(*bad),
                });
            }
            let norms: Vec<String> = d.norms().iter().map(|n| format!("{n:.6}")).collect();
            meta.insert(format!("norms.{}", d.name), norms.join(","));
        }
        meta.insert("n_layer".into(), nl.to_string());
        meta.insert("n_embd".into(), ne.to_string());
        meta.insert(HOOK_POINT_KEY.into(), Site::ResidPost.to_string());
        Ok(DirectionFile { directions, meta })
    }

    pub fn n_layer(&self) -> usize {
        self.directions[0].n_layer()
    }
    pub fn n_embd(&self) -> usize {
        self.directions[0].n_embd()
    }

    /// The hook site the rows are at: [`HOOK_POINT_KEY`], resid_post when absent.
    pub fn site(&self) -> Site {
        self.meta
            .get(HOOK_POINT_KEY)
            .and_then(|v| v.parse().ok())
            .unwrap_or_default()
    }

    /// A direction by name; `None` picks the only one, or fails listing the choices.
    ///
    /// # Errors
    /// An unknown name, or several directions and no name.
    pub fn get(&self, name: Option<&str>) -> Result<&Direction> {
        let unknown = |name: Option<&str>| Error::Unknown {
            what: Named::Direction,
            name: name.map(str::to_string),
            known: self.directions.iter().map(|d| d.name.clone()).collect(),
        };
        match name {
            Some(n) => self
                .directions
                .iter()
                .find(|d| d.name == n)
                .ok_or_else(|| unknown(Some(n))),
            None if self.directions.len() == 1 => Ok(&self.directions[0]),
            None => Err(unknown(None)),
        }
    }

    /// Checks that these directions were made for a model of this shape. A 1-D vector must
    /// have been broadcast first: commands with a model call [`DirectionFile::fit_model`].
    ///
    /// # Errors
    /// A different architecture, n_embd or n_layer, named with both values; for an imported
    /// file, [`Error::ImportFit`] naming the file, its shape and convention.
    pub fn check_model(&self, m: &ModelInfo) -> Result<()> {
        if let Some(e) = self.import_misfit(m) {
            return Err(e);
        }
        if let Some(arch) = self.meta.get("arch") {
            if arch != &m.arch && arch != "any" {
                return Err(Error::ArchMismatch {
                    directions: arch.clone(),
                    model: m.arch.clone(),
                });
            }
        }
        if self.n_embd() != m.n_embd {
            return Err(Error::Shape {
                what: Shaped::DirectionsEmbd,
                got: self.n_embd(),
                want: m.n_embd,
            });
        }
        if self.n_layer() != m.n_layer {
            return Err(Error::Shape {
                what: Shaped::DirectionsLayers,
                got: self.n_layer(),
                want: m.n_layer,
            });
        }
        Ok(())
    }

    /// The safetensors bytes: sorted keys, 8-byte aligned header, tensors in name order.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut dirs: Vec<&Direction> = self.directions.iter().collect();
        dirs.sort_by(|a, b| a.name.cmp(&b.name));
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for d in dirs {
            let start = data.len();
            for r in &d.rows {
                for x in r {
                    data.extend(x.to_le_bytes());
                }
            }
            header.insert(d.name.clone(), json!({"dtype": "F32", "shape": [d.n_layer(), d.n_embd()], "data_offsets": [start, data.len()]}));
        }
        header.insert("__metadata__".into(), json!(self.meta));
        let mut h =
            serde_json::to_vec(&Value::Object(header)).expect("JSON of strings and numbers");
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend(h);
        out.extend(data);
        out
    }

    /// Parses safetensors bytes (the fuzz target calls this): one of our files, or one of
    /// another tool's, which then needs a stated convention (see [`DirectionFile::load`]).
    ///
    /// # Errors
    /// [`Error::Record`] for the header (size, JSON, metadata, no tensors, the hook site),
    /// [`Error::Tensor`] naming a tensor and its dtype, shape or offsets, [`Error::Shapes`]
    /// for tensors of different shapes, [`Error::Import`] for another tool's file.
    pub fn from_bytes(b: &[u8]) -> Result<DirectionFile> {
        Self::from_safetensors(b, &Stated::default(), Path::new("safetensors bytes"))
    }

    /// Our files record `hook_point`; those from before the key have our `tool_version`.
    fn is_ours(meta: &BTreeMap<String, String>) -> bool {
        meta.contains_key(HOOK_POINT_KEY)
            || meta
                .get("tool_version")
                .is_some_and(|v| v.starts_with("persona-gate"))
    }

    fn from_safetensors(b: &[u8], stated: &Stated, path: &Path) -> Result<DirectionFile> {
        let Parsed {
            tensors,
            meta,
            dtypes,
        } = parse_safetensors(b)?;
        if !Self::is_ours(&meta) {
            let foreign = Foreign {
                format: format!("safetensors {}", dtypes.join("/")),
                tensors,
                meta,
            };
            return import::assemble(path, foreign, stated);
        }
        import::check_own(stated, false)?;
        let mut directions = Vec::new();
        for t in tensors {
            let [_, ne] = t.shape[..] else {
                return Err(Error::Tensor {
                    tensor: t.name,
                    problem: TensorProblem::Shape(t.shape.iter().map(|&x| x as u64).collect()),
                });
            };
            let rows = t.data.chunks(ne).map(<[f32]>::to_vec).collect();
            directions.push(Direction { name: t.name, rows });
        }
        let f = DirectionFile { directions, meta };
        let first = &f.directions[0];
        let (nl, ne) = (first.n_layer(), first.n_embd());
        if let Some(d) = f
            .directions
            .iter()
            .find(|d| d.n_layer() != nl || d.n_embd() != ne)
        {
            return Err(Error::Shapes {
                what: ShapesOf::Tensors,
                a: d.name.clone(),
                a_shape: [d.n_layer(), d.n_embd()],
                b: first.name.clone(),
                b_shape: [nl, ne],
            });
        }
        if let Some(v) = f.meta.get(HOOK_POINT_KEY) {
            match v.parse::<Site>() {
                Ok(Site::ResidPost) => {}
                Err(_) => {
                    return Err(Error::record(
                        At::MetadataValue {
                            key: HOOK_POINT_KEY.to_string(),
                            value: v.clone(),
                        },
                        format!(
                            "rows at another hook site; only {} rows (one per layer) can be used",
                            Site::ResidPost
                        ),
                    ))
                }
            }
        }
        Ok(f)
    }

    /// Writes the file atomically.
    ///
    /// # Errors
    /// I/O errors, naming the path.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::fsio::write_atomic(path, &self.to_bytes())
            .map_err(|e| Error::file(path, e.to_string()))
    }

    /// Reads a direction file, telling the format by its first bytes: ours (safetensors), a
    /// llama.cpp control-vector GGUF, or another tool's safetensors, `.npy` or torch.save
    /// `.pt`. Another tool's file states its convention in the path, `FILE:CONVENTION` or
    /// `FILE:CONVENTION.LAYER` ([`import::split_stated`]); every command that takes a
    /// direction file reads it here, so all of them take that syntax.
    ///
    /// # Errors
    /// Missing file; corrupt contents, as [`Error::In`] the path around the error of
    /// [`DirectionFile::from_bytes`], [`super::cvec::import`] or the importers, or a NaN or
    /// inf ([`Error::Value`]).
    pub fn load(path: &Path) -> Result<DirectionFile> {
        let (file, stated) = import::split_stated(path)?;
        Self::load_stated(&file, &stated)
    }

    /// [`DirectionFile::load`] of `path` as it is, with what the caller states about it (a
    /// spec's `convention` and `layer`).
    ///
    /// # Errors
    /// As [`DirectionFile::load`].
    pub fn load_stated(path: &Path, stated: &Stated) -> Result<DirectionFile> {
        let b = crate::fsio::read_input(
            path,
            "a direction file (.safetensors, .npy, torch.save .pt or control-vector .gguf)",
        )?;
        let stem = path
            .file_stem()
            .map_or_else(|| "direction".into(), |s| s.to_string_lossy().into_owned());
        let f = if b.starts_with(b"GGUF") {
            import::check_own(stated, true).and_then(|()| super::cvec::import(&b))
        } else if b.starts_with(b"\x93NUMPY") {
            super::npy::read(&b, &stem).and_then(|f| import::assemble(path, f, stated))
        } else if b.starts_with(b"PK\x03\x04") {
            super::torch::read(&b, &stem).and_then(|f| import::assemble(path, f, stated))
        } else if b.starts_with(b"\x80\x02\x8a\x0a") {
            Err(Error::record(
                At::Whole,
                "a torch.save file in the format of PyTorch before 1.6; load and save it again with a current PyTorch",
            ))
        } else {
            Self::from_safetensors(&b, stated, path)
        }
        .map_err(|e| e.in_file(path))?;
        for d in &f.directions {
            if let Some((l, x)) = d
                .rows
                .iter()
                .enumerate()
                .find_map(|(l, r)| r.iter().find(|x| !x.is_finite()).map(|&x| (l, x)))
            {
                return Err(Error::Value {
                    what: ValueOf::Loaded(d.name.clone()),
                    layer: l,
                    value: f64::from(x),
                }
                .in_file(path));
            }
        }
        Ok(f)
    }
}

/// The safetensors dtypes we read, with their size in bytes.
fn float_dtype(d: &str) -> Option<usize> {
    match d {
        "F32" => Some(4),
        "F16" | "BF16" => Some(2),
        "F64" => Some(8),
        _ => None,
    }
}

/// The tensors of safetensors bytes in name order, as f32, with the metadata and the dtypes
/// seen (for messages).
struct Parsed {
    tensors: Vec<Tensor>,
    meta: BTreeMap<String, String>,
    dtypes: Vec<String>,
}

/// # Errors
/// As [`DirectionFile::from_bytes`].
fn parse_safetensors(b: &[u8]) -> Result<Parsed> {
    let whole = |reason: String| Error::record(At::Whole, reason);
    let tensor = |name: &str, problem| Error::Tensor {
        tensor: name.to_string(),
        problem,
    };
    if b.len() < 8 {
        return Err(whole(format!(
            "too short for safetensors ({} bytes)",
            b.len()
        )));
    }
    let n = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER || n > (b.len() - 8) as u64 {
        return Err(whole(format!(
            "corrupt safetensors header: length {n} exceeds the file ({} bytes)",
            b.len()
        )));
    }
    let data = &b[8 + n as usize..];
    let header: Entries = serde_json::from_slice(&b[8..8 + n as usize])
        .map_err(|e| whole(format!("corrupt safetensors header: {e}")))?;
    let mut header = header.0;
    header.sort_by(|a, b| a.0.cmp(&b.0));
    let mut meta = BTreeMap::new();
    let mut tensors = Vec::new();
    let mut dtypes: Vec<String> = Vec::new();
    for (name, v) in &header {
        if *name == "__metadata__" {
            let m = v
                .as_object()
                .ok_or_else(|| whole("__metadata__ is not an object".into()))?;
            for (k, v) in m {
                meta.insert(
                    k.clone(),
                    v.as_str()
                        .ok_or_else(|| Error::record(At::Metadata(k.clone()), "is not a string"))?
                        .to_string(),
                );
            }
            continue;
        }
        let dtype = v
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| tensor(name, TensorProblem::NoDtype))?;
        let size = float_dtype(dtype)
            .ok_or_else(|| tensor(name, TensorProblem::Dtype(dtype.to_string())))?;
        let shape: Vec<u64> = v
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_u64).collect())
            .ok_or_else(|| tensor(name, TensorProblem::BadShape))?;
        let off: Vec<u64> = v
            .get("data_offsets")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_u64).collect())
            .ok_or_else(|| tensor(name, TensorProblem::BadOffsets))?;
        let [s, e] = off[..] else {
            return Err(tensor(name, TensorProblem::BadOffsets));
        };
        let need = shape
            .iter()
            .try_fold(1u64, |a, &x| a.checked_mul(x))
            .and_then(|x| x.checked_mul(size as u64));
        if e < s
            || e > data.len() as u64
            || Some(e - s) != need
            || shape.contains(&0)
            || shape.len() > 2
        {
            if shape.len() > 2 {
                return Err(tensor(name, TensorProblem::Shape(shape)));
            }
            return Err(tensor(
                name,
                TensorProblem::Offsets {
                    start: s,
                    end: e,
                    shape,
                    data: data.len(),
                },
            ));
        }
        let raw = &data[s as usize..e as usize];
        let vals: Vec<f32> = match dtype {
            "F32" => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
            "F64" => raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
            "F16" => raw
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => raw
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        };
        if !dtypes.iter().any(|d| d == dtype) {
            dtypes.push(dtype.to_string());
        }
        tensors.push(Tensor {
            name: name.clone(),
            shape: shape.iter().map(|&x| x as usize).collect(),
            data: vals,
        });
    }
    if tensors.is_empty() {
        return Err(whole("no tensors in the file".into()));
    }
    Ok(Parsed {
        tensors,
        meta,
        dtypes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DirectionFile {
        let d = |n: &str, k: f32| Direction {
            name: n.into(),
            rows: vec![vec![k, 2.0, 3.0], vec![4.0, 5.0, k]],
        };
        DirectionFile::new(
            vec![d("b", 1.0), d("a", -1.5)],
            [("kind".to_string(), "test".to_string())].into(),
        )
        .unwrap()
    }

    #[test]
    fn round_trip_is_exact_and_bytes_are_stable() {
        let f = sample();
        let b = f.to_bytes();
        let g = DirectionFile::from_bytes(&b).unwrap();
        assert_eq!(g.get(Some("a")).unwrap(), f.get(Some("a")).unwrap());
        assert_eq!(g.meta, f.meta);
        assert_eq!(
            DirectionFile::new(g.directions.clone(), g.meta.clone())
                .unwrap()
                .to_bytes()
                .len(),
            b.len()
        );
        assert_eq!(sample().to_bytes(), b);
    }

    #[test]
    fn corrupt_headers_are_errors() {
        let b = sample().to_bytes();
        assert!(DirectionFile::from_bytes(&b[..4]).is_err());
        let mut c = b.clone();
        c[0] = 0xff;
        c[5] = 0x7f;
        assert!(DirectionFile::from_bytes(&c)
            .unwrap_err()
            .to_string()
            .contains("exceeds"));
        let mut c = b.clone();
        c[9] = b'!';
        assert!(DirectionFile::from_bytes(&c)
            .unwrap_err()
            .to_string()
            .contains("corrupt"));
        for n in 0..b.len() {
            let _ = DirectionFile::from_bytes(&b[..n]);
        }
        assert!(DirectionFile::from_bytes(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn names_are_required_when_ambiguous() {
        let f = sample();
        // The choices are listed in the order the directions were given (b, then a).
        assert_eq!(
            f.get(None).unwrap_err().to_string(),
            "several directions (b, a); name one"
        );
        assert_eq!(
            f.get(Some("zzz")).unwrap_err().to_string(),
            "no direction 'zzz' (has: b, a)"
        );
        assert_eq!(f.get(Some("a")).unwrap().name, "a");
    }
}
