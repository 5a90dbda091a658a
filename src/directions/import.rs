//! Direction files of other tools: safetensors of any float type, numpy `.npy`, and PyTorch
//! `.pt` (torch.save's ZIP archive), read as [`DirectionFile`]s whose rows follow ours: row L
//! is `resid_post.L`, llama.cpp's `l_out-L`, the residual stream after layer L.
//!
//! Such a file does not say where in the residual stream its rows were read, so the user says
//! it (`FILE:CONVENTION`, or `convention` in a spec) and nothing is guessed. The conventions,
//! as the steering repositories use them:
//!
//! - `hidden_states`: Hugging Face's `output_hidden_states`, `n_layer + 1` rows: row 0 is the
//!   embedding output and row L+1 the output of decoder layer L, so row L+1 is our row L.
//!   safety-research/persona_vectors saves these: `generate_vec.py` stacks
//!   `outputs.hidden_states[layer]` for every layer 0..=n_layer (lines 14-29) and
//!   `torch.save`s the `[n_layer + 1, d]` differences (lines 70-78); it steers with row L at
//!   the output of `model.model.layers[L-1]` (`eval/eval_persona.py:45,255`,
//!   `activation_steer.py:121`), the same mapping (read at its first public commit, 10facfd,
//!   through the fork dxnlp/persona_vectors). Hugging Face applies the final norm before it
//!   appends the last hidden state (`LlamaModel.forward`: `hidden_states =
//!   self.norm(hidden_states)`, then "add hidden states from the last decoder layer"), so our
//!   last row from such a file is the final norm's output, not `l_out-(n_layer-1)`: it is
//!   kept, since dropping it would leave the last layer without a row, and the metadata
//!   (`source_rows`) says so.
//! - `resid_pre`: the residual stream entering layer L, `resid_post.(L-1)`; layer 0 is the
//!   embedding output. andyrdt/refusal_direction reads its activations with forward
//!   *pre*-hooks on `model.model.layers[L]` (`pipeline/submodules/generate_directions.py:12-15,29`,
//!   `pipeline/model_utils/llama3_model.py:126-127`) and saves the chosen direction as a 1-D
//!   `direction.pt` beside `direction_metadata.json` `{"pos": p, "layer": L}`
//!   (`pipeline/run_pipeline.py:91,93`, commit 9d852fa). Its ablation uses the one vector at
//!   every layer (`pipeline/utils/hook_utils.py:80-88`), so a 1-D vector is broadcast to every
//!   row, its layer recorded (`layer`, ours) for `{refusal_layer}`.
//! - `resid_post`: ours.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{Direction, DirectionFile};
use crate::error::{At, Error, ImportProblem, Misfit, Result, ShapesOf};
use crate::model::ModelInfo;

/// Where in the residual stream a file's rows were read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Convention {
    /// Row L is the output of layer L (ours; llama.cpp's `l_out-L`).
    ResidPost,
    /// Row L is the input of layer L: row 0 the embedding output.
    ResidPre,
    /// Hugging Face `output_hidden_states`: row 0 the embedding output, row L+1 the output of
    /// layer L (the last after the model's final norm).
    HiddenStates,
}

impl Convention {
    pub const ALL: [Convention; 3] = [
        Convention::ResidPost,
        Convention::HiddenStates,
        Convention::ResidPre,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Convention::ResidPost => "resid_post",
            Convention::ResidPre => "resid_pre",
            Convention::HiddenStates => "hidden_states",
        }
    }

    /// Our resid_post layer for this convention's layer `l`; `None` for the embedding output.
    fn to_ours(self, l: usize) -> Option<usize> {
        match self {
            Convention::ResidPost => Some(l),
            Convention::ResidPre | Convention::HiddenStates => l.checked_sub(1),
        }
    }
}

impl fmt::Display for Convention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Convention {
    type Err = ();
    fn from_str(s: &str) -> std::result::Result<Self, ()> {
        Convention::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or(())
    }
}

/// What the user says about a file: its convention and, for a 1-D vector, its layer in that
/// convention.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stated {
    pub convention: Option<Convention>,
    pub layer: Option<usize>,
}

impl Stated {
    fn text(&self) -> String {
        match (self.convention, self.layer) {
            (Some(c), Some(l)) => format!("{c}.{l}"),
            (Some(c), None) => c.to_string(),
            (None, Some(l)) => format!("layer {l}"),
            (None, None) => String::new(),
        }
    }
}

/// Splits `FILE:CONVENTION` or `FILE:CONVENTION.LAYER` (`vec.npy:resid_pre.12`) into the file
/// and what it states. Any other path, `:` and all, is a plain file name, so only a suffix
/// naming a convention is read this way.
///
/// # Errors
/// A convention suffix whose layer is not a number (`:resid_pre.x`).
pub fn split_stated(path: &Path) -> Result<(PathBuf, Stated)> {
    let Some(s) = path.to_str() else {
        return Ok((path.to_path_buf(), Stated::default()));
    };
    let Some((file, suffix)) = s.rsplit_once(':') else {
        return Ok((path.to_path_buf(), Stated::default()));
    };
    let (conv, layer) = match suffix.split_once('.') {
        Some((c, l)) => (c, Some(l)),
        None => (suffix, None),
    };
    let Ok(convention) = conv.parse::<Convention>() else {
        return Ok((path.to_path_buf(), Stated::default()));
    };
    let layer = match layer {
        None => None,
        Some(l) => Some(l.parse::<usize>().map_err(|_| {
            Error::Import(ImportProblem::BadLayer {
                suffix: suffix.to_string(),
            })
            .in_file(file)
        })?),
    };
    Ok((
        PathBuf::from(file),
        Stated {
            convention: Some(convention),
            layer,
        },
    ))
}

/// Metadata keys of an imported file. `hook_point` (resid_post) is set as for every file.
pub const SOURCE_FILE: &str = "source_file";
pub const SOURCE_FORMAT: &str = "source_format";
pub const SOURCE_CONVENTION: &str = "source_convention";
pub const SOURCE_SHAPE: &str = "source_shape";
/// How the file's rows became ours.
pub const SOURCE_ROWS: &str = "source_rows";
/// A 1-D vector's layer as the source gave it (`resid_pre.14`) and where from.
pub const SOURCE_LAYER: &str = "source_layer";
/// Our resid_post layer of a 1-D vector: `{refusal_layer}` of a spec's file direction.
pub const LAYER: &str = "layer";
/// Set on a 1-D vector: its one row stands for every layer (see [`DirectionFile::fit_model`]).
pub const BROADCAST: &str = "broadcast";
/// Where refusal_direction records a `direction.pt`'s layer and position.
pub const SIDECAR: &str = "direction_metadata.json";

/// One tensor read from a file of another tool, as f32 in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Most values one imported tensor may have (as many as a control vector: 64 Mi).
pub(crate) const MAX_VALUES: u128 = 1 << 26;

/// What a reader found in a file of another tool.
#[derive(Debug)]
pub(crate) struct Foreign {
    /// `safetensors F16`, `npy <f8`, `torch.save float64`.
    pub format: String,
    pub tensors: Vec<Tensor>,
    /// The file's own metadata (safetensors `__metadata__`), kept under `source_meta.`.
    pub meta: BTreeMap<String, String>,
}

/// The layer and position a refusal_direction `direction_metadata.json` beside `file` gives.
fn sidecar(file: &Path) -> Result<Option<(PathBuf, usize, Option<i64>)>> {
    let p = file.parent().unwrap_or(Path::new(".")).join(SIDECAR);
    if !p.is_file() {
        return Ok(None);
    }
    let text = crate::fsio::read_text(&p, "refusal_direction's direction_metadata.json")?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::record(At::Whole, format!("invalid JSON: {e}")).in_file(&p))?;
    let layer = v
        .get("layer")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| {
            Error::record(
                At::Metadata("layer".into()),
                "is missing or not a non-negative integer",
            )
            .in_file(&p)
        })?;
    let pos = v.get("pos").and_then(serde_json::Value::as_i64);
    Ok(Some((p, layer as usize, pos)))
}

/// How a tensor's rows become ours.
#[derive(Debug, Clone, Copy)]
enum RowMap {
    /// A 1-D vector: one row (broadcast later).
    One,
    /// resid_post: row L is ours L.
    Same,
    /// hidden_states: row L+1 is ours L, row 0 (the embeddings) dropped.
    SkipFirst,
    /// resid_pre: as hidden_states, and the last layer's output, which it lacks, zero.
    SkipFirstZeroLast,
}

impl RowMap {
    fn rows(self, data: &[f32], width: usize) -> Vec<Vec<f32>> {
        let rows = data.chunks(width).map(<[f32]>::to_vec);
        match self {
            RowMap::One | RowMap::Same => rows.collect(),
            RowMap::SkipFirst => rows.skip(1).collect(),
            RowMap::SkipFirstZeroLast => rows.skip(1).chain([vec![0.0; width]]).collect(),
        }
    }
}

/// Maps the tensors of a file of another tool onto our rows under the stated convention.
///
/// # Errors
/// No convention stated, a tensor of another rank, a 1-D vector without a layer, layer 0 of
/// the embeddings, tensors of different shapes, a malformed `direction_metadata.json`.
pub(crate) fn assemble(path: &Path, f: Foreign, stated: &Stated) -> Result<DirectionFile> {
    let convention = stated.convention.ok_or_else(|| {
        Error::Import(ImportProblem::NoConvention {
            format: f.format.clone(),
        })
    })?;
    let first = f.tensors.first().ok_or_else(|| {
        Error::Import(ImportProblem::NoTensors {
            root: "empty".into(),
        })
    })?;
    let shape = first.shape.clone();
    for t in &f.tensors {
        if t.shape.len() != 1 && t.shape.len() != 2 || t.shape.contains(&0) {
            return Err(Error::Import(ImportProblem::Rank {
                tensor: t.name.clone(),
                shape: t.shape.clone(),
            }));
        }
        if t.shape != shape {
            let two = |s: &[usize]| [s[0], s.get(1).copied().unwrap_or(1)];
            return Err(Error::Shapes {
                what: ShapesOf::Tensors,
                a: t.name.clone(),
                a_shape: two(&t.shape),
                b: first.name.clone(),
                b_shape: two(&shape),
            });
        }
    }
    let mut meta: BTreeMap<String, String> = f
        .meta
        .iter()
        .map(|(k, v)| (format!("source_meta.{k}"), v.clone()))
        .collect();
    meta.insert("kind".into(), "imported".into());
    meta.insert(SOURCE_FILE.into(), path.display().to_string());
    meta.insert(SOURCE_FORMAT.into(), f.format.clone());
    meta.insert(SOURCE_CONVENTION.into(), convention.to_string());
    meta.insert(SOURCE_SHAPE.into(), format!("{shape:?}"));
    let width = *shape.last().expect("rank 1 or 2");
    let rows_of = if shape.len() == 1 {
        let (layer, from) = match (stated.layer, sidecar(path)?) {
            (Some(l), Some((p, sl, _))) if l != sl => {
                return Err(Error::Import(ImportProblem::LayerConflict {
                    stated: l,
                    sidecar: p.display().to_string(),
                    file_layer: sl,
                }))
            }
            (Some(l), _) => (l, "stated".to_string()),
            (None, Some((p, l, pos))) => {
                if let Some(pos) = pos {
                    meta.insert("source_pos".into(), pos.to_string());
                }
                (l, p.display().to_string())
            }
            (None, None) => return Err(Error::Import(ImportProblem::NoLayer { width })),
        };
        let ours = convention.to_ours(layer).ok_or_else(|| {
            Error::Import(ImportProblem::Embeddings {
                convention: convention.to_string(),
            })
        })?;
        meta.insert(
            SOURCE_LAYER.into(),
            format!("{convention}.{layer} ({from})"),
        );
        meta.insert(LAYER.into(), ours.to_string());
        meta.insert(BROADCAST.into(), "every layer".into());
        meta.insert(
            SOURCE_ROWS.into(),
            format!("one vector, {convention}.{layer} = resid_post.{ours}, used at every layer"),
        );
        RowMap::One
    } else {
        if stated.layer.is_some() {
            return Err(Error::Import(ImportProblem::LayerFor2d { shape }));
        }
        let rows = shape[0];
        match convention {
            Convention::ResidPost => {
                meta.insert(SOURCE_ROWS.into(), "row L = resid_post.L".into());
                RowMap::Same
            }
            Convention::HiddenStates => {
                if rows < 2 {
                    return Err(Error::Import(ImportProblem::TooFewRows {
                        tensor: first.name.clone(),
                        rows,
                    }));
                }
                meta.insert(
                    SOURCE_ROWS.into(),
                    format!(
                        "hidden_states row L+1 = resid_post.L; row 0 (the embedding output) dropped; row {} is after the model's final norm",
                        rows - 1
                    ),
                );
                RowMap::SkipFirst
            }
            Convention::ResidPre => {
                meta.insert(
                    SOURCE_ROWS.into(),
                    format!(
                        "resid_pre row L+1 = resid_post.L; row 0 (the embedding output) dropped; resid_post.{} (after the last layer) has no row here and is zero",
                        rows - 1
                    ),
                );
                RowMap::SkipFirstZeroLast
            }
        }
    };
    let directions = f
        .tensors
        .iter()
        .map(|t| Direction {
            name: t.name.clone(),
            rows: rows_of.rows(&t.data, width),
        })
        .collect();
    DirectionFile::new(directions, meta)
}

/// Checks a file's statement against what it records itself (ours, or a control vector):
/// only `resid_post` with no layer agrees.
///
/// # Errors
/// Another convention, or a layer.
pub(crate) fn check_own(stated: &Stated, control_vector: bool) -> Result<()> {
    if *stated == Stated::default()
        || (stated.convention == Some(Convention::ResidPost) && stated.layer.is_none())
    {
        return Ok(());
    }
    let stated = stated.text();
    Err(Error::Import(if control_vector {
        ImportProblem::ControlVector { stated }
    } else {
        ImportProblem::Ours { stated }
    }))
}

impl DirectionFile {
    /// Whether this file was imported from another tool (it records its convention).
    pub fn imported(&self) -> bool {
        self.meta.contains_key(SOURCE_CONVENTION)
    }

    /// Whether its one row stands for every layer (a 1-D vector) and is not yet broadcast.
    pub fn is_broadcast(&self) -> bool {
        self.meta.contains_key(BROADCAST) && self.n_layer() == 1
    }

    /// A 1-D vector's resid_post layer, as recorded on import.
    pub fn layer(&self) -> Option<usize> {
        self.meta.get(LAYER).and_then(|v| v.parse().ok())
    }

    /// This file with a 1-D vector's row repeated for `n_layer` layers; any other unchanged.
    ///
    /// # Errors
    /// Only if the rows were malformed (they are not for a loaded file).
    pub fn broadcast(self, n_layer: usize) -> Result<DirectionFile> {
        if !self.is_broadcast() || n_layer == 1 {
            return Ok(self);
        }
        let dirs = self
            .directions
            .into_iter()
            .map(|d| Direction {
                rows: vec![d.rows[0].clone(); n_layer],
                name: d.name,
            })
            .collect();
        DirectionFile::new(dirs, self.meta)
    }

    /// This file ready for the model: a 1-D vector broadcast to its layers, then
    /// [`DirectionFile::check_model`]. Every command that has a model calls this.
    ///
    /// # Errors
    /// As `check_model`; for a 1-D vector, a layer the model does not have.
    pub fn fit_model(self, m: &ModelInfo) -> Result<DirectionFile> {
        if let (true, Some(l)) = (self.is_broadcast(), self.layer()) {
            if l >= m.n_layer {
                return Err(self.misfit(m, String::new(), None));
            }
        }
        let f = self.broadcast(m.n_layer)?;
        f.check_model(m)?;
        Ok(f)
    }

    /// [`DirectionFile::load`] then [`DirectionFile::fit_model`], as every command that takes
    /// a direction file for its model reads it.
    ///
    /// # Errors
    /// As `load`; a misfit, named by the imported file itself ([`Error::ImportFit`]) or,
    /// for one of ours, with `path` in front.
    pub fn load_fitted(path: &Path, m: &ModelInfo) -> Result<DirectionFile> {
        DirectionFile::load(path)?
            .fit_model(m)
            .map_err(|e| match e {
                Error::ImportFit(_) => e,
                e => e.in_file(path),
            })
    }

    /// For an imported file that does not fit `m`: the error naming the file, its shape and
    /// convention, the model's sizes, and a hint when another convention would fit.
    pub(crate) fn import_misfit(&self, m: &ModelInfo) -> Option<Error> {
        if !self.imported() || (self.n_layer() == m.n_layer && self.n_embd() == m.n_embd) {
            return None;
        }
        let gives = if self.is_broadcast() && self.n_embd() == m.n_embd {
            "one vector for every layer, not broadcast to the model's layers (fit_model does)"
                .to_string()
        } else {
            format!("{} layers of width {}", self.n_layer(), self.n_embd())
        };
        let convention = self.meta[SOURCE_CONVENTION].parse::<Convention>().ok();
        let rows: Option<usize> = self.meta[SOURCE_SHAPE]
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .next()
            .and_then(|r| r.trim().parse().ok());
        let hint = match (convention, rows) {
            _ if self.n_embd() != m.n_embd => None,
            (Some(Convention::ResidPost | Convention::ResidPre), Some(r)) if r == m.n_layer + 1 => {
                Some("n_layer + 1 rows is the hidden_states convention (row 0 the embedding output)".to_string())
            }
            (Some(Convention::HiddenStates), Some(r)) if r == m.n_layer => Some(
                "n_layer rows is the resid_post or resid_pre convention (hidden_states has n_layer + 1)"
                    .to_string(),
            ),
            _ => None,
        };
        Some(self.misfit(m, gives, hint))
    }

    fn misfit(&self, m: &ModelInfo, gives: String, hint: Option<String>) -> Error {
        let get = |k: &str| self.meta.get(k).cloned().unwrap_or_default();
        let gives = match (self.meta.contains_key(BROADCAST), self.layer()) {
            (true, Some(l)) => format!("one vector of width {} for resid_post.{l}", self.n_embd()),
            _ => gives,
        };
        Error::ImportFit(Box::new(Misfit {
            file: get(SOURCE_FILE),
            shape: get(SOURCE_SHAPE),
            convention: self
                .meta
                .get(SOURCE_LAYER)
                .and_then(|l| l.split(' ').next().map(str::to_string))
                .unwrap_or_else(|| get(SOURCE_CONVENTION)),
            gives,
            n_layer: m.n_layer,
            n_embd: m.n_embd,
            hint,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> (PathBuf, Stated) {
        split_stated(Path::new(s)).unwrap()
    }

    #[test]
    fn path_suffixes_state_the_convention_and_nothing_else_does() {
        let st = |c, l| Stated {
            convention: Some(c),
            layer: l,
        };
        assert_eq!(
            p("a/evil.pt:hidden_states"),
            ("a/evil.pt".into(), st(Convention::HiddenStates, None))
        );
        assert_eq!(
            p("v.npy:resid_pre.12"),
            ("v.npy".into(), st(Convention::ResidPre, Some(12)))
        );
        assert_eq!(
            p("x:y.safetensors:resid_post"),
            ("x:y.safetensors".into(), st(Convention::ResidPost, None))
        );
        // Not a convention: the whole string is the file.
        for s in ["plain.pt", "a:b.pt", "v.npy:resid", "v.npy:hidden_states2"] {
            assert_eq!(p(s), (s.into(), Stated::default()), "{s}");
        }
        let e = split_stated(Path::new("v.npy:resid_pre.x"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "v.npy: 'resid_pre.x': the layer after the dot is not a number"
        );
    }

    fn foreign(shape: &[usize]) -> Foreign {
        let n: usize = shape.iter().product();
        Foreign {
            format: "test".into(),
            tensors: vec![Tensor {
                name: "t".into(),
                shape: shape.to_vec(),
                data: (0..n).map(|i| i as f32).collect(),
            }],
            meta: BTreeMap::new(),
        }
    }

    fn conv(c: Convention) -> Stated {
        Stated {
            convention: Some(c),
            layer: None,
        }
    }

    #[test]
    fn rows_map_by_convention() {
        let path = Path::new("/nonexistent/x.pt");
        // hidden_states [4, 2]: row L+1 is ours L; row 0 dropped.
        let f = assemble(path, foreign(&[4, 2]), &conv(Convention::HiddenStates)).unwrap();
        assert_eq!(
            f.directions[0].rows,
            vec![vec![2.0, 3.0], vec![4.0, 5.0], vec![6.0, 7.0]]
        );
        assert_eq!(f.meta[SOURCE_CONVENTION], "hidden_states");
        assert_eq!(f.meta[SOURCE_SHAPE], "[4, 2]");
        assert_eq!(f.meta["hook_point"], "resid_post");
        assert!(f.meta[SOURCE_ROWS].contains("row 3 is after the model's final norm"));
        // resid_post: as is.
        let f = assemble(path, foreign(&[3, 2]), &conv(Convention::ResidPost)).unwrap();
        assert_eq!(f.directions[0].rows[2], vec![4.0, 5.0]);
        // resid_pre [3, 2]: row L+1 is ours L, the last layer's output has no row.
        let f = assemble(path, foreign(&[3, 2]), &conv(Convention::ResidPre)).unwrap();
        assert_eq!(
            f.directions[0].rows,
            vec![vec![2.0, 3.0], vec![4.0, 5.0], vec![0.0, 0.0]]
        );
        // A 1-D vector: one row, its layer mapped, broadcast on demand.
        let s = Stated {
            convention: Some(Convention::ResidPre),
            layer: Some(3),
        };
        let f = assemble(path, foreign(&[2]), &s).unwrap();
        assert_eq!(
            (f.n_layer(), f.layer(), f.is_broadcast()),
            (1, Some(2), true)
        );
        assert_eq!(f.meta[SOURCE_LAYER], "resid_pre.3 (stated)");
        let g = f.broadcast(5).unwrap();
        assert_eq!(g.directions[0].rows, vec![vec![0.0, 1.0]; 5]);
        assert!(!g.is_broadcast());
        assert_eq!(g.meta["n_layer"], "5");
    }

    #[test]
    fn what_cannot_be_mapped_is_an_error() {
        let path = Path::new("/nonexistent/x.pt");
        let e = |shape: &[usize], s: Stated| {
            assemble(path, foreign(shape), &s).unwrap_err().to_string()
        };
        assert!(e(&[3, 2], Stated::default()).starts_with(
            "a test file without persona-gate's hook_point metadata: say which residual stream"
        ));
        assert!(e(&[2], conv(Convention::ResidPre)).starts_with("a 1-D vector [2] needs the layer"));
        let at0 = |c| Stated {
            convention: Some(c),
            layer: Some(0),
        };
        assert_eq!(
            e(&[2], at0(Convention::ResidPre)),
            "resid_pre layer 0 is the embedding output, before any decoder layer; no resid_post row holds it"
        );
        assert!(e(&[2], at0(Convention::HiddenStates)).starts_with("hidden_states layer 0"));
        // resid_post layer 0 is a real layer.
        assert!(assemble(path, foreign(&[2]), &at0(Convention::ResidPost)).is_ok());
        assert!(e(&[2, 2, 2], conv(Convention::ResidPost)).contains("shape [2, 2, 2], expected"));
        assert!(e(&[1, 2], conv(Convention::HiddenStates)).contains("1 row(s) as hidden_states"));
        assert_eq!(
            e(
                &[3, 2],
                Stated {
                    convention: Some(Convention::ResidPost),
                    layer: Some(1)
                }
            ),
            "shape [3, 2] has a row per layer; a layer applies to 1-D vectors only"
        );
    }

    #[test]
    fn a_mismatch_names_file_shape_convention_and_model() {
        let path = Path::new("/nonexistent/pv.pt");
        let m = ModelInfo {
            path: "m.gguf".into(),
            arch: "llama".into(),
            name: None,
            n_layer: 3,
            n_embd: 2,
            n_vocab: 8,
            file_type: "F32".into(),
            file_size: 0,
            chat_template: None,
            desc: String::new(),
        };
        // [4, 2] fits as hidden_states, not as resid_post: the hint says so.
        let f = assemble(path, foreign(&[4, 2]), &conv(Convention::ResidPost)).unwrap();
        assert_eq!(
            f.fit_model(&m).unwrap_err().to_string(),
            "/nonexistent/pv.pt: shape [4, 2] read as resid_post is 4 layers of width 2, but the model has n_layer 3, n_embd 2; n_layer + 1 rows is the hidden_states convention (row 0 the embedding output)"
        );
        let f = assemble(path, foreign(&[3, 2]), &conv(Convention::HiddenStates)).unwrap();
        assert!(f
            .fit_model(&m)
            .unwrap_err()
            .to_string()
            .ends_with("n_layer rows is the resid_post or resid_pre convention (hidden_states has n_layer + 1)"));
        let f = assemble(path, foreign(&[4, 3]), &conv(Convention::HiddenStates)).unwrap();
        assert_eq!(
            f.fit_model(&m).unwrap_err().to_string(),
            "/nonexistent/pv.pt: shape [4, 3] read as hidden_states is 3 layers of width 3, but the model has n_layer 3, n_embd 2"
        );
        let one = |l| Stated {
            convention: Some(Convention::ResidPre),
            layer: Some(l),
        };
        let f = assemble(path, foreign(&[2]), &one(4)).unwrap();
        assert_eq!(
            f.fit_model(&m).unwrap_err().to_string(),
            "/nonexistent/pv.pt: shape [2] read as resid_pre.4 is one vector of width 2 for resid_post.3, but the model has n_layer 3, n_embd 2"
        );
        let f = assemble(path, foreign(&[3]), &one(2)).unwrap();
        assert!(f
            .fit_model(&m)
            .unwrap_err()
            .to_string()
            .contains("read as resid_pre.2 is one vector of width 3 for resid_post.1, but"));
        let f = assemble(path, foreign(&[2]), &one(3))
            .unwrap()
            .fit_model(&m)
            .unwrap();
        assert_eq!((f.n_layer(), f.layer()), (3, Some(2)));
    }
}
