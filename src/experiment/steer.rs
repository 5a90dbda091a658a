//! Steering as edits: an [`Intervention`] on a [`Direction`] made into the hook [`Edit`] the
//! engine runs (shared by the grid, its up-front checks and `generate`), interventions given
//! on the command line in the spec's own grammar, and llama.cpp's control-vector flags with
//! llama.cpp's meanings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::chat::Prompt;
use crate::directions::{self, cvec, Direction};
use crate::engine::Session;
use crate::error::{Error, InterventionFault, LayerOf, Result, Shaped, ValueOf};
use crate::experiment::spec::{self, Builtins, Intervention, Scale, Source};
use crate::hooks::{Capture, Edit, EditKind, HookPoint, HookSet, Position, Scope};

/// The vector an add intervention adds at one layer: `c × row` (raw) or
/// `c × resid_norm × row/‖row‖` (resid).
pub fn add_vector(row: &[f32], c: f64, scale: Scale, resid_norm: Option<f64>) -> Vec<f32> {
    match scale {
        Scale::Raw => row.iter().map(|&x| (x as f64 * c) as f32).collect(),
        Scale::Resid => {
            let n = directions::norm(row);
            let k = if n > 0.0 {
                c * resid_norm.unwrap_or(0.0) / n
            } else {
                0.0
            };
            row.iter().map(|&x| (x as f64 * k) as f32).collect()
        }
    }
}

/// The hook edit of intervention number `index` (from 1) of `id` (a condition, or the
/// command line), with `d`'s rows and the mean residual norms of the prompts it acts on (for
/// `scale = "resid"`).
///
/// # Errors
/// [`Error::Intervention`] naming `id`, the direction and the layer: an add that overflows
/// f32, or a projection direction of zero or non-finite norm.
pub fn edit(
    id: &str,
    index: usize,
    d: &Direction,
    iv: &Intervention,
    norms: Option<&[f64]>,
    scope: Scope,
) -> Result<Edit> {
    let fault = |layer: usize, fault: InterventionFault| Error::Intervention {
        id: id.to_string(),
        direction: iv.direction.clone(),
        layer,
        at: HookPoint::resid_post(layer).to_string(),
        fault,
    };
    let row = |l: usize| match iv.source {
        Source::Own => &d.rows[l],
        Source::Layer(s) => &d.rows[s],
    };
    let mut vectors = BTreeMap::new();
    for &l in &iv.layers {
        let v = match iv.op {
            EditKind::Add => {
                let v = add_vector(row(l), iv.coefficient, iv.scale, norms.map(|n| n[l]));
                if v.iter().any(|x| !x.is_finite()) {
                    return Err(fault(
                        l,
                        InterventionFault::Overflow {
                            coefficient: iv.coefficient,
                        },
                    ));
                }
                v
            }
            EditKind::Project => row(l).clone(),
        };
        vectors.insert(l, v);
    }
    Ok(match iv.op {
        EditKind::Add => Edit::add(vectors, scope),
        // Edit::project refuses a direction it cannot normalise; here that is this
        // intervention's fault, named.
        EditKind::Project => Edit::project(vectors, scope).map_err(|e| match e {
            Error::Value {
                what: ValueOf::Projection,
                layer,
                value,
            } => {
                let why = format!("has norm {value}, so it cannot be projected out");
                fault(layer, InterventionFault::Unusable { index, why })
            }
            e => e,
        })?,
    })
}

/// The mean residual norm at every layer (`resid_post`, last prompt token) over `prompts`:
/// what `scale = "resid"` coefficients are relative to.
///
/// # Errors
/// Engine errors.
pub fn resid_norms(session: &mut Session<'_>, prompts: &[Prompt]) -> Result<Vec<f64>> {
    let info = &session.model().info;
    let (nl, ne) = (info.n_layer, info.n_embd);
    let all: Vec<usize> = (0..nl).collect();
    let mut hooks = HookSet::new(nl, ne);
    hooks.add_capture(Capture::new(
        &all,
        Position::LastPrompt,
        vec![Some(0); prompts.len()],
        1,
        nl,
        ne,
    ))?;
    session.first_logits(prompts, &mut hooks)?;
    Ok((0..nl)
        .map(|l| hooks.captures[0].mean_norm(0, 0, l).unwrap_or(0.0))
        .collect())
}

/// An intervention given on the command line: the spec's keys as `key=value` words
/// (`op=add direction=FILE name=persona layers=12-14 coefficient=4 scale=resid source=own`),
/// or a TOML inline table (`{ op = "add", direction = "FILE", layers = "12" }`). `direction`
/// is a direction file here, `name` picks a direction in it.
#[derive(Debug, Clone, PartialEq)]
pub struct Given {
    pub file: PathBuf,
    pub name: Option<String>,
    pub intervention: Intervention,
}

/// The flag interventions are given with, for error messages.
pub const INTERVENTION_FLAG: &str = "--intervention";

impl Given {
    /// Parses intervention number `index` (from 1) for a model of `n_layer` layers; templates
    /// may use `{n_layer}` and `{last_layer}`, as in a spec.
    ///
    /// # Errors
    /// [`Error::Flag`] for text that is not `key=value` words or a table, and
    /// [`Error::Condition`] (`--intervention: intervention N: FIELD: problem`) for a field the
    /// spec would refuse.
    pub fn parse(text: &str, index: usize, n_layer: usize) -> Result<Given> {
        let bad = |why: String| Error::flag(INTERVENTION_FLAG, Some(text.to_string()), why);
        let mut table = if text.trim_start().starts_with('{') {
            match toml::from_str::<toml::Table>(&format!("x = {text}")) {
                Ok(mut t) => match t.remove("x") {
                    Some(toml::Value::Table(t)) => t,
                    _ => return Err(bad("is not a TOML inline table".into())),
                },
                Err(e) => return Err(bad(format!("is not a TOML inline table: {}", e.message()))),
            }
        } else {
            let mut t = toml::Table::new();
            for word in text.split_whitespace() {
                let Some((k, v)) = word.split_once('=') else {
                    return Err(bad(format!(
                        "'{word}' is not key=value (keys: op, direction, name, layers, \
                         coefficient, scale, source)"
                    )));
                };
                if t.insert(k.to_string(), word_value(v)).is_some() {
                    return Err(bad(format!("'{k}' is given twice")));
                }
            }
            t
        };
        let name = match table.remove("name") {
            None => None,
            Some(toml::Value::String(s)) => Some(s),
            Some(v) => return Err(bad(format!("name {v} is not a string"))),
        };
        let file = match table.get("direction") {
            Some(toml::Value::String(s)) => PathBuf::from(s),
            Some(v) => return Err(bad(format!("direction {v} is not a file name"))),
            None => return Err(bad("needs direction=FILE".into())),
        };
        if table.contains_key("scope") {
            return Err(bad(
                "scope is for spec prompt sets; here every prompt is steered".into(),
            ));
        }
        let b = Builtins {
            n_layer,
            ..Builtins::default()
        };
        let intervention =
            spec::resolve_given(&toml::Value::Table(table), &b, INTERVENTION_FLAG, index)?;
        Ok(Given {
            file,
            name,
            intervention,
        })
    }
}

/// A `key=value` word's value: a TOML integer, float or quoted string where it reads as one
/// (`coefficient=4`, `name="a b"`), else the text itself (`layers=3,5`, `op=add`).
fn word_value(v: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("x = {v}")) {
        Ok(mut t) => match t.remove("x") {
            Some(
                x @ (toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::String(_)),
            ) => x,
            _ => toml::Value::String(v.to_string()),
        },
        Err(_) => toml::Value::String(v.to_string()),
    }
}

/// llama.cpp's control-vector flags: `--control-vector FILE[,FILE...]` (scale 1),
/// `--control-vector-scaled FILE:SCALE[,...]` and `--control-vector-layer-range START END`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ControlVectors {
    /// Each file with its scale, in the order given.
    pub files: Vec<(PathBuf, f32)>,
    /// Inclusive layers; `<= 0` means llama.cpp's default (start 1, end n_layer).
    pub range: Option<(i32, i32)>,
}

impl ControlVectors {
    /// Collects the flags' values (each may hold a comma-separated list, as in llama.cpp).
    ///
    /// # Errors
    /// A `--control-vector-scaled` item that is not `FILE:SCALE` with a finite scale.
    pub fn from_flags(
        plain: &[String],
        scaled: &[String],
        range: Option<(i32, i32)>,
    ) -> Result<ControlVectors> {
        let mut files: Vec<(PathBuf, f32)> = Vec::new();
        for v in plain {
            files.extend(
                v.split(',')
                    .filter(|s| !s.is_empty())
                    .map(|f| (PathBuf::from(f), 1.0)),
            );
        }
        for v in scaled {
            for item in v.split(',').filter(|s| !s.is_empty()) {
                let bad = || {
                    Error::flag(
                        "--control-vector-scaled",
                        Some(item.to_string()),
                        "is not FILE:SCALE with a finite SCALE",
                    )
                };
                let (f, s) = item.rsplit_once(':').ok_or_else(bad)?;
                let s: f32 = s.trim().parse().map_err(|_| bad())?;
                if !s.is_finite() || f.is_empty() {
                    return Err(bad());
                }
                files.push((PathBuf::from(f), s));
            }
        }
        Ok(ControlVectors { files, range })
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The summed control vector as `layer → vector` over the layer range, as llama.cpp's
    /// `common_control_vector_load` and `llama_apply_adapter_cvec` build it: each file's rows
    /// times its scale added in f32 in the order given, layers from 1, layers of the range
    /// that no file has added as zero.
    ///
    /// # Errors
    /// A file that does not load (named), a width other than the model's, a layer past the
    /// model's last (llama.cpp would ignore it; here it is a mismatch), or a range that
    /// selects no layer.
    pub fn load(&self, n_layer: usize, n_embd: usize) -> Result<BTreeMap<usize, Vec<f32>>> {
        let mut sum: Vec<Vec<f32>> = vec![vec![0.0; n_embd]; n_layer];
        for (path, scale) in &self.files {
            let f = load_cvec(path)?;
            let d = f.get(None).map_err(|e| e.in_file(path))?;
            if d.n_embd() != n_embd {
                return Err(Error::Shape {
                    what: Shaped::DirectionsEmbd,
                    got: d.n_embd(),
                    want: n_embd,
                }
                .in_file(path));
            }
            if d.n_layer() > n_layer {
                return Err(Error::Layer {
                    layer: d.n_layer() - 1,
                    n_layer,
                    of: LayerOf::ControlVector,
                }
                .in_file(path));
            }
            for (l, r) in d.rows.iter().enumerate().skip(1) {
                for (acc, x) in sum[l].iter_mut().zip(r) {
                    *acc += x * scale;
                }
            }
        }
        let (start, end) = self.range.unwrap_or((0, 0));
        let start = if start <= 0 { 1 } else { start as usize };
        let end = if end <= 0 { n_layer } else { end as usize };
        let layers: Vec<usize> = (start.max(1)..=end.min(n_layer - 1)).collect();
        if layers.is_empty() {
            return Err(Error::flag(
                "--control-vector-layer-range",
                Some(format!("{start} {end}")),
                format!("selects no layer of this model (1 to {})", n_layer - 1),
            ));
        }
        Ok(layers.into_iter().map(|l| (l, sum[l].clone())).collect())
    }
}

/// A control-vector GGUF (cvector-generator, repeng, `export-cvec`).
fn load_cvec(path: &Path) -> Result<directions::DirectionFile> {
    let b = crate::fsio::read_input(path, "a control-vector .gguf file")?;
    cvec::import(&b).map_err(|e| e.in_file(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_tables_give_the_same_intervention() {
        let a = Given::parse(
            "op=add direction=d.safetensors name=persona layers=3,5 coefficient=-4.5 scale=resid",
            1,
            8,
        )
        .unwrap();
        let b = Given::parse(
            r#"{ op = "add", direction = "d.safetensors", name = "persona", layers = "3,5", coefficient = -4.5, scale = "resid" }"#,
            1,
            8,
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.file, PathBuf::from("d.safetensors"));
        assert_eq!(a.name.as_deref(), Some("persona"));
        assert_eq!(a.intervention.layers, vec![3, 5]);
        assert_eq!(a.intervention.coefficient, -4.5);
        assert_eq!(a.intervention.scale, Scale::Resid);
        assert_eq!(a.intervention.source, Source::Own);
        let p = Given::parse(
            "op=project direction=x layers={last_layer-1}.. source=2",
            1,
            8,
        )
        .unwrap()
        .intervention;
        assert_eq!(
            (p.op, p.layers, p.source),
            (EditKind::Project, vec![6, 7], Source::Layer(2))
        );
    }

    #[test]
    fn bad_interventions_name_the_field() {
        let e = |t: &str| Given::parse(t, 2, 8).unwrap_err().to_string();
        assert_eq!(
            e("op=add direction=x layers=9"),
            "--intervention: intervention 2: layers: layers '9': layer 9 out of range (8 layers, 0-7)"
        );
        assert!(
            e("op=add layers=1").contains("needs direction=FILE"),
            "{}",
            e("op=add layers=1")
        );
        assert!(e("op=add direction=x layers=1 coefficient=z")
            .contains("coefficient: 'z' is not a number"));
        assert!(e("op=mul direction=x layers=1").contains("intervention 2"));
        assert!(e("op=add direction=x layers=1 wat").contains("'wat' is not key=value"));
        assert!(e("op=add op=add direction=x layers=1").contains("'op' is given twice"));
        assert!(e("{ op = ").contains("not a TOML inline table"));
        assert!(e("op=add direction=x layers=1 colour=red").contains("colour"));
    }

    #[test]
    fn control_vector_flags_read_as_llama_cpp_reads_them() {
        let c = ControlVectors::from_flags(
            &["a.gguf,b.gguf".into()],
            &["c.gguf:0.5".into(), "/d:x/e.gguf:-2".into()],
            None,
        )
        .unwrap();
        assert_eq!(
            c.files,
            vec![
                ("a.gguf".into(), 1.0),
                ("b.gguf".into(), 1.0),
                ("c.gguf".into(), 0.5),
                ("/d:x/e.gguf".into(), -2.0)
            ]
        );
        for bad in ["c.gguf", "c.gguf:x", "c.gguf:inf", ":1"] {
            assert!(
                ControlVectors::from_flags(&[], &[bad.into()], None).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn control_vectors_sum_scaled_over_the_range() {
        let dir = std::env::temp_dir().join(format!("pg-steer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let d = Direction {
            name: "x".into(),
            rows: (0..4).map(|l| vec![l as f32, 1.0]).collect(),
        };
        let a = dir.join("a.gguf");
        std::fs::write(&a, cvec::export(&d, "llama", 1.0, &[1, 2, 3]).unwrap()).unwrap();
        let b = dir.join("b.gguf");
        std::fs::write(&b, cvec::export(&d, "llama", 2.0, &[2]).unwrap()).unwrap();
        let cv = ControlVectors {
            files: vec![(a.clone(), 1.0), (b.clone(), 0.5)],
            range: None,
        };
        let m = cv.load(5, 2).unwrap();
        assert_eq!(m.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(m[&1], vec![1.0, 1.0]);
        assert_eq!(m[&2], vec![4.0, 2.0]);
        assert_eq!(m[&4], vec![0.0, 0.0]);
        let cv = ControlVectors {
            range: Some((2, 3)),
            ..cv
        };
        assert_eq!(
            cv.load(5, 2).unwrap().keys().copied().collect::<Vec<_>>(),
            vec![2, 3]
        );
        let e = cv.load(5, 3).unwrap_err().to_string();
        assert!(e.contains("a.gguf"), "{e}");
        let e = cv.load(3, 2).unwrap_err().to_string();
        assert!(e.contains("a.gguf") && e.contains("layer 3"), "{e}");
        let none = ControlVectors {
            range: Some((9, 12)),
            ..cv
        };
        assert!(none
            .load(5, 2)
            .unwrap_err()
            .to_string()
            .contains("selects no layer"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
