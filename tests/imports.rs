//! Direction files of other tools (tests/fixtures/imports, written by make_imports.py with
//! real torch.save, numpy.save and safetensors): each format's exact numbers, the row mapping
//! of each convention, each misfit as a one-line error, a spec over persona_vectors' and
//! refusal_direction's files run on SmolLM2, and Python's safetensors and numpy reading our
//! files back to the same numbers.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bin, fails_exit_1, run_ok, scratch, smol};
use persona_gate::directions::{cvec, DirectionFile};

/// make_imports.py's `value(r, c)`: multiples of 1/4, exact in every float type.
fn value(r: usize, c: usize) -> f32 {
    ((r * 7 + c * 3) % 17) as f32 / 4.0 - 2.0
}

fn matrix(rows: usize, cols: usize) -> Vec<Vec<f32>> {
    (0..rows)
        .map(|r| (0..cols).map(|c| value(r, c)).collect())
        .collect()
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/imports")
}

/// Where fixture `name` (file name first, `:CONVENTION` after) is: the safetensors ones
/// (`s_*`) are written here at test time rather than committed, the rest are in tests/fixtures.
fn fixture_dir(name: &str) -> PathBuf {
    if name.starts_with("s_") {
        safetensors_fixtures().clone()
    } else {
        fixtures()
    }
}

fn fixture(name: &str) -> String {
    fixture_dir(name).join(name).display().to_string()
}

/// A safetensors file as the format defines it (what make_imports.py's `save_file` wrote
/// before these were generated here): an 8-byte little-endian header length, a JSON header
/// of dtype, shape and data offsets per tensor (and `__metadata__`), padded with spaces to 8
/// bytes, then the tensors' bytes.
fn safetensors(tensors: &[(&str, &str, Vec<usize>, Vec<u8>)], meta: &[(&str, &str)]) -> Vec<u8> {
    let mut head = serde_json::Map::new();
    if !meta.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> = meta
            .iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect();
        head.insert("__metadata__".into(), m.into());
    }
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let start = data.len();
        data.extend_from_slice(bytes);
        head.insert(
            name.to_string(),
            serde_json::json!({ "dtype": dtype, "shape": shape, "data_offsets": [start, data.len()] }),
        );
    }
    let mut h = serde_json::to_vec(&head).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

/// s_f16 (`x` = value, `y` = -value, F16, another tool's metadata), s_bf16 (`x`, BF16) and
/// s_1d (`v` = row 1, F32), all [4, 8] or [8].
fn safetensors_fixtures() -> &'static PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = scratch("safetensors-fixtures");
        let m = matrix(4, 8);
        let flat = |neg: bool| {
            m.concat()
                .into_iter()
                .map(move |x| if neg { -x } else { x })
        };
        let f16 = |neg| -> Vec<u8> {
            flat(neg)
                .flat_map(|x| half::f16::from_f32(x).to_le_bytes())
                .collect()
        };
        let bf16: Vec<u8> = flat(false)
            .flat_map(|x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        let row1: Vec<u8> = m[1].iter().flat_map(|x| x.to_le_bytes()).collect();
        let files = [
            (
                "s_f16.safetensors",
                safetensors(
                    &[
                        ("x", "F16", vec![4, 8], f16(false)),
                        ("y", "F16", vec![4, 8], f16(true)),
                    ],
                    &[("tool", "some other steering tool")],
                ),
            ),
            (
                "s_bf16.safetensors",
                safetensors(&[("x", "BF16", vec![4, 8], bf16)], &[]),
            ),
            (
                "s_1d.safetensors",
                safetensors(&[("v", "F32", vec![8], row1)], &[]),
            ),
        ];
        for (name, bytes) in files {
            std::fs::write(d.join(name), bytes).unwrap();
        }
        d
    })
}

fn load(spec: &str) -> DirectionFile {
    DirectionFile::load(Path::new(&fixture(spec))).unwrap_or_else(|e| panic!("{spec}: {e}"))
}

fn load_err(spec: &str) -> String {
    DirectionFile::load(Path::new(&fixture(spec)))
        .unwrap_err()
        .to_string()
}

#[test]
fn every_format_reads_its_exact_numbers() {
    let m = matrix(4, 8);
    for (file, name) in [
        ("t_f16.pt:resid_post", "t_f16"),
        ("t_param.pt:resid_post", "t_param"),
        ("t_state_dict.pt:resid_post", "weight"),
        ("t_dict.pt:resid_post", "a"),
        ("n_f32.npy:resid_post", "n_f32"),
        ("n_f16.npy:resid_post", "n_f16"),
        ("n_fortran.npy:resid_post", "n_fortran"),
        ("s_f16.safetensors:resid_post", "x"),
        ("s_bf16.safetensors:resid_post", "x"),
    ] {
        let f = load(file);
        assert_eq!(f.get(Some(name)).unwrap().rows, m, "{file}");
        assert_eq!(f.meta["hook_point"], "resid_post", "{file}");
        assert_eq!(f.meta["source_shape"], "[4, 8]", "{file}");
        assert_eq!(f.meta["source_convention"], "resid_post", "{file}");
    }
    let neg: Vec<Vec<f32>> = m.iter().map(|r| r.iter().map(|x| -x).collect()).collect();
    assert_eq!(
        load("t_dict.pt:resid_post").get(Some("b")).unwrap().rows,
        neg
    );
    assert_eq!(
        load("s_f16.safetensors:resid_post")
            .get(Some("y"))
            .unwrap()
            .rows,
        neg
    );
    // The dict's string beside its tensors is not a direction.
    assert_eq!(load("t_dict.pt:resid_post").directions.len(), 2);
    // The formats as detected, and another tool's own metadata kept under source_meta.
    let s = load("s_f16.safetensors:resid_post");
    assert_eq!(s.meta["source_format"], "safetensors F16");
    assert_eq!(s.meta["source_meta.tool"], "some other steering tool");
    assert_eq!(
        load("s_bf16.safetensors:resid_post").meta["source_format"],
        "safetensors BF16"
    );
    assert_eq!(
        load("t_f16.pt:resid_post").meta["source_format"],
        "torch.save float16"
    );
    assert_eq!(
        load("n_f16.npy:resid_post").meta["source_format"],
        "numpy .npy <f2"
    );
    // A transposed view reads as the view: [4, 8] with element (r, c) = value(c, r).
    let t = load("t_transposed.pt:resid_post");
    let want: Vec<Vec<f32>> = (0..4)
        .map(|r| (0..8).map(|c| value(c, r)).collect())
        .collect();
    assert_eq!(t.directions[0].rows, want);
    // 1-D vectors: one row, their layer mapped onto resid_post and recorded.
    let v = load("n_f64_1d.npy:resid_post.3");
    assert_eq!(v.directions[0].rows, vec![m[2].clone()]);
    assert_eq!((v.layer(), v.is_broadcast()), (Some(3), true));
    let v = load("s_1d.safetensors:resid_pre.5");
    assert_eq!(v.directions[0].rows, vec![m[1].clone()]);
    assert_eq!(v.layer(), Some(4));
    assert_eq!(v.meta["source_layer"], "resid_pre.5 (stated)");
    assert_eq!(v.meta["broadcast"], "every layer");
}

#[test]
fn each_convention_maps_rows_onto_resid_post() {
    // persona_vectors: hidden_states row L+1 is our row L; row 0 (embeddings) is gone.
    let pv = load("pv_smol.pt:hidden_states");
    let rows = &pv.directions[0].rows;
    assert_eq!((pv.n_layer(), pv.n_embd()), (30, 576));
    for (l, row) in rows.iter().enumerate() {
        assert_eq!(row, &matrix(31, 576)[l + 1], "layer {l}");
    }
    assert_eq!(pv.directions[0].name, "pv_smol");
    assert!(pv.meta["source_rows"].contains("row 30 is after the model's final norm"));
    // resid_pre: row L+1 is our row L; the last layer's output has no row and is zero.
    let pre = load("pv_narrow_bf16.pt:resid_pre");
    let r = &pre.directions[0].rows;
    assert_eq!(r.len(), 31);
    assert_eq!(r[0], matrix(2, 8)[1]);
    assert_eq!(r[29], matrix(31, 8)[30]);
    assert_eq!(r[30], vec![0.0; 8]);
    // refusal_direction: a float64 view into mean_diffs, its layer from the metadata beside
    // it: resid_pre.14 is resid_post.13; mean_diffs[1, 2] is value(2, c) + 1.
    let rd = load("refusal_direction/direction.pt:resid_pre");
    let want: Vec<f32> = (0..576).map(|c| value(2, c) + 1.0).collect();
    assert_eq!(rd.directions[0].rows, vec![want]);
    assert_eq!(rd.layer(), Some(13));
    assert_eq!(rd.meta["source_pos"], "-1");
    assert_eq!(rd.meta["source_format"], "torch.save float64");
    assert!(
        rd.meta["source_layer"].starts_with("resid_pre.14 ("),
        "{:?}",
        rd.meta
    );
    // The same vector read as resid_post is at layer 14.
    assert_eq!(
        load("refusal_direction/direction.pt:resid_post").layer(),
        Some(14)
    );
}

#[test]
fn what_cannot_be_imported_says_why_in_one_line() {
    let e = load_err("pv_smol.pt");
    assert!(
        e.ends_with("pv_smol.pt: a torch.save float32 file without persona-gate's hook_point metadata: say which residual stream its rows are, FILE:resid_post (row L after layer L, llama.cpp's l_out-L), FILE:hidden_states (Hugging Face output_hidden_states: row 0 the embeddings, row L+1 after layer L) or FILE:resid_pre (row L entering layer L), or convention = \"...\" in a spec"),
        "{e}"
    );
    assert!(load_err("t_int.pt:resid_post")
        .ends_with("t_int.pt: tensor 't_int': dtype torch.LongStorage, expected a float type (F32, F16, BF16, F64)"));
    assert!(load_err("n_f64_1d.npy:resid_pre").contains("a 1-D vector [8] needs the layer"));
    assert!(load_err("n_f64_1d.npy:hidden_states.0")
        .ends_with("hidden_states layer 0 is the embedding output, before any decoder layer; no resid_post row holds it"));
    let e = load_err("refusal_direction/direction.pt:resid_pre.12");
    assert!(
        e.contains("direction.pt: layer 12 was stated but ")
            && e.ends_with("direction_metadata.json says layer 14"),
        "{e}"
    );
    assert!(load_err("t_f16.pt:resid_post.3")
        .ends_with("has a row per layer; a layer applies to 1-D vectors only"));
    // Our own files say where their rows are; another convention for them is refused.
    let d = scratch("own");
    let ours = d.join("ours.safetensors");
    load("t_f16.pt:resid_post").save(&ours).unwrap();
    let e = DirectionFile::load(Path::new(&format!("{}:hidden_states", ours.display())))
        .unwrap_err()
        .to_string();
    assert!(
        e.ends_with("records its own hook_point (resid_post); drop the stated 'hidden_states'"),
        "{e}"
    );
    // A saved import is one of ours: it loads without a convention, and records its source.
    let g = DirectionFile::load(&ours).unwrap();
    assert_eq!(g.directions[0].rows, matrix(4, 8));
    assert_eq!(g.meta["source_convention"], "resid_post");
    assert_eq!(g.meta["hook_point"], "resid_post");
    // Every cut of each fixture is an error, and every flipped byte an error or a file,
    // never a panic (the test would abort).
    for f in ["t_dict.pt", "n_fortran.npy", "s_f16.safetensors"] {
        let b = std::fs::read(fixture_dir(f).join(f)).unwrap();
        let p = d.join(format!("bad-{f}"));
        let at = format!("{}:resid_post", p.display());
        for n in (0..b.len()).step_by(7) {
            std::fs::write(&p, &b[..n]).unwrap();
            assert!(
                DirectionFile::load(Path::new(&at)).is_err(),
                "{f} cut at {n}"
            );
        }
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0xa5;
            std::fs::write(&p, &c).unwrap();
            let _ = DirectionFile::load(Path::new(&at));
        }
    }
}

#[test]
fn misfits_with_the_model_name_file_shape_convention_and_model() {
    let d = scratch("misfit");
    let m = smol();
    // refusal_direction's vector without its metadata, so the stated layer is the only one.
    std::fs::copy(
        fixtures().join("refusal_direction/direction.pt"),
        d.join("alone.pt"),
    )
    .unwrap();
    let sel = |file: &str| {
        vec![
            "select", "-m", &m, "-t", "2", "--n", "1", "--layers", "10", "-d", file,
        ]
        .into_iter()
        .map(str::to_string)
        .collect::<Vec<_>>()
    };
    for (file, needles) in [
        (
            fixture("pv_smol.pt:resid_post"),
            vec!["pv_smol.pt: shape [31, 576] read as resid_post is 31 layers of width 576, but the model has n_layer 30, n_embd 576; n_layer + 1 rows is the hidden_states convention (row 0 the embedding output)"],
        ),
        (
            fixture("pv_narrow_bf16.pt:hidden_states"),
            vec!["pv_narrow_bf16.pt: shape [31, 8] read as hidden_states is 30 layers of width 8, but the model has n_layer 30, n_embd 576"],
        ),
        (
            fixture("refusal_direction/direction.pt:resid_post.31"),
            vec!["layer 31 was stated but", "says layer 14"],
        ),
        (
            fixture("s_1d.safetensors:resid_pre.31"),
            vec!["s_1d.safetensors: shape [8] read as resid_pre.31 is one vector of width 8 for resid_post.30, but the model has n_layer 30, n_embd 576"],
        ),
        (
            d.join("alone.pt:resid_pre.31").display().to_string(),
            vec!["alone.pt: shape [576] read as resid_pre.31 is one vector of width 576 for resid_post.30, but the model has n_layer 30, n_embd 576"],
        ),
        (
            fixture("t_f16.pt"),
            vec!["t_f16.pt: a torch.save float16 file without persona-gate's hook_point metadata"],
        ),
    ] {
        let args = sel(&file);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_exit_1(&d, &args, &needles);
    }
}

/// A spec whose directions are persona_vectors' `.pt` (hidden_states) and refusal_direction's
/// `direction.pt` (resid_pre, layer from its metadata) on SmolLM2.
fn spec(extra_rd: &str) -> String {
    format!(
        r#"name = "imports"
seed = 1
group_size = 4
metric = "score"

[prompts.eval]
source = "builtin:harmful"
n = 2

[directions.pv]
kind = "file"
path = "{pv}"
convention = "hidden_states"

[directions.rd]
kind = "file"
path = "{rd}"
convention = "resid_pre"
{extra_rd}
[[experiment]]
id = "B"
prompts = "eval"

[[experiment]]
id = "A"
prompts = "eval"
intervention = [ {{ direction = "rd", op = "project", layers = "all", source = "own" }}, {{ direction = "pv", op = "add", layers = "{{refusal_layer}}", coefficient = 2.0 }} ]
"#,
        pv = fixture("pv_smol.pt"),
        rd = fixture("refusal_direction/direction.pt"),
    )
}

fn reproduce(d: &Path, spec: &Path, out: &str, extra: &[&str]) -> Command {
    let mut c = bin();
    c.current_dir(d)
        .args([
            "reproduce",
            "-t",
            "2",
            "--ctx",
            "256",
            "-m",
            &smol(),
            "--spec",
        ])
        .arg(spec)
        .args(["-o", out])
        .args(extra);
    c
}

#[test]
fn a_spec_over_persona_vectors_and_refusal_direction_files_runs_on_smollm2() {
    let d = scratch("spec");
    let s = d.join("imports.toml");
    std::fs::write(&s, spec("")).unwrap();
    let dry = run_ok(&mut reproduce(&d, &s, "dry", &["--dry-run"]));
    assert!(
        dry.contains("imports: 2 conditions, 4 completions"),
        "{dry}"
    );
    run_ok(&mut reproduce(&d, &s, "run", &[]));
    // {refusal_layer} came from direction_metadata.json: resid_pre.14 = resid_post.13.
    let plan: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("run/plan.json")).unwrap()).unwrap();
    assert_eq!(
        plan["resolved"]["refusal_layer"], 13,
        "{}",
        plan["resolved"]
    );
    let why = plan["resolved"]["refusal_selection"].as_str().unwrap();
    assert!(
        why.starts_with("the layer of directions.rd's 1-D vector: resid_post.13, resid_pre.14 ("),
        "{why}"
    );
    let a = plan["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "A")
        .unwrap();
    assert_eq!(a["interventions"][1]["layers"], serde_json::json!([13]));
    // The prepared directions are the files' rows on resid_post: pv row L = hidden_states
    // row L+1, rd broadcast to every layer.
    let p = DirectionFile::load(&d.join("run/prepared.safetensors")).unwrap();
    let pv = p.get(Some("pv")).unwrap();
    for l in 0..30 {
        assert_eq!(pv.rows[l], matrix(31, 576)[l + 1], "pv layer {l}");
    }
    let rd: Vec<f32> = (0..576).map(|c| value(2, c) + 1.0).collect();
    assert_eq!(p.get(Some("rd")).unwrap().rows, vec![rd; 30]);
    // An explicit refusal_layer wins over the file's.
    let s2 = d.join("explicit.toml");
    std::fs::write(&s2, spec("refusal_layer = 20\n")).unwrap();
    run_ok(&mut reproduce(&d, &s2, "run2", &[]));
    let plan: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("run2/plan.json")).unwrap()).unwrap();
    assert_eq!(plan["resolved"]["refusal_layer"], 20);
    // The convention in the path and in the spec at once is refused, as is a spec whose
    // file does not fit the model, both before anything runs.
    let twice = spec("").replace(
        "direction.pt\"\nconvention = \"resid_pre\"",
        "direction.pt:resid_pre\"\nconvention = \"resid_pre\"",
    );
    std::fs::write(d.join("twice.toml"), twice).unwrap();
    fails_exit_1(
        &d,
        &["reproduce", "-m", &smol(), "--spec", "twice.toml", "-o", "t", "--dry-run"],
        &["directions.rd", "the path states a convention (FILE:CONVENTION) and the spec gives convention or layer too; keep one"],
    );
    let misfit = spec("").replace(
        "convention = \"hidden_states\"",
        "convention = \"resid_post\"",
    );
    std::fs::write(d.join("misfit.toml"), misfit).unwrap();
    fails_exit_1(
        &d,
        &[
            "reproduce",
            "-m",
            &smol(),
            "--spec",
            "misfit.toml",
            "-o",
            "m",
            "--dry-run",
        ],
        &[
            "directions.pv",
            "pv_smol.pt: shape [31, 576] read as resid_post is 31 layers",
        ],
    );
}

#[test]
fn inspect_select_cos_and_export_take_imported_files() {
    let d = scratch("cli");
    let pv = fixture("pv_smol.pt:hidden_states");
    let rd = fixture("refusal_direction/direction.pt:resid_pre");
    let j: serde_json::Value =
        serde_json::from_str(&run_ok(bin().args(["inspect", "--json", &pv]))).unwrap();
    assert_eq!(j["meta"]["source_convention"], "hidden_states");
    assert_eq!(j["meta"]["hook_point"], "resid_post");
    assert_eq!(j["directions"][0]["n_layer"], 30);
    // cos: the 1-D vector against every layer of the other.
    let out = run_ok(bin().args(["directions", "cos", &pv, &rd]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 31, "{out}");
    let rdv: Vec<f32> = (0..576).map(|c| value(2, c) + 1.0).collect();
    let want = persona_gate::directions::cosine(&matrix(31, 576)[8], &rdv);
    assert_eq!(lines[8], format!("7,pv_smol,direction,{want:.6}"));
    // export-cvec of the 1-D vector at explicit layers.
    run_ok(bin().current_dir(&d).args([
        "export-cvec",
        "-d",
        &rd,
        "--coefficient",
        "2",
        "--layers",
        "10-12",
        "-o",
        "rd.gguf",
    ]));
    let c = cvec::import(&std::fs::read(d.join("rd.gguf")).unwrap()).unwrap();
    let twice: Vec<f32> = rdv.iter().map(|x| 2.0 * x).collect();
    assert_eq!(
        c.directions[0].rows[10..13],
        [twice.clone(), twice.clone(), twice]
    );
    fails_exit_1(
        &d,
        &[
            "export-cvec",
            "-d",
            &rd,
            "--coefficient",
            "2",
            "--layers",
            "10..",
            "-o",
            "x.gguf",
        ],
        &[
            "--layers 10..",
            "is one vector with no layer count; give the layers explicitly",
        ],
    );
    // select over the persona_vectors file (refusal selection: it is not our persona file).
    let out = run_ok(bin().current_dir(&d).args([
        "select",
        "-m",
        &smol(),
        "-t",
        "2",
        "-d",
        &pv,
        "--n",
        "1",
        "--layers",
        "10",
        "--csv",
        "s.csv",
    ]));
    let csv = std::fs::read_to_string(d.join("s.csv")).unwrap();
    assert!(
        csv.lines().nth(1).unwrap().starts_with("pv_smol,10,"),
        "{csv}\n{out}"
    );
}

// ---- Python reads our files ------------------------------------------------------------

/// The Python the read-back test uses: `PERSONA_GATE_PYTHON`, the virtual environment
/// `scripts/setup.sh test` makes, or `python3`.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("PERSONA_GATE_PYTHON") {
        return p.into();
    }
    let venv = PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
        .join(".cache/persona-gate/python/bin/python3");
    if venv.is_file() {
        venv
    } else {
        "python3".into()
    }
}

const READ_BACK: &str = r#"
import json, sys
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file
out = {}
for path in sys.argv[1:]:
    with safe_open(path, "np") as f:
        meta = f.metadata()
    out[path] = {
        "meta": meta,
        "tensors": {
            k: {
                "dtype": str(v.dtype),
                "shape": list(v.shape),
                "bits": v.view(np.uint32).ravel().tolist(),
                "norms": [float(np.sqrt(np.sum(r.astype(np.float64) ** 2))) for r in v],
            }
            for k, v in load_file(path).items()
        },
    }
print(json.dumps(out))
"#;

#[test]
fn python_reads_our_files_and_gets_the_same_numbers() {
    let py = python();
    let have = Command::new(&py)
        .args(["-c", "import safetensors, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        let why = format!(
            "{} cannot import safetensors and numpy (scripts/setup.sh test installs them)",
            py.display()
        );
        assert!(
            std::env::var("PERSONA_GATE_REQUIRE_PYTHON").map_or(true, |v| v != "1"),
            "PERSONA_GATE_REQUIRE_PYTHON=1 but {why}"
        );
        common::browser::skipped("python_reads_our_files_and_gets_the_same_numbers", &why);
        return;
    }
    let d = scratch("python");
    // Our files: a seeded random control norm-matched to persona_vectors' rows (so its norms
    // are the imported rows' norms), and an import saved as one of ours.
    run_ok(bin().current_dir(&d).args([
        "directions",
        "random",
        "--like",
        &fixture("pv_smol.pt:hidden_states"),
        "--seed",
        "7",
        "--norm-matched",
        "-o",
        "random.safetensors",
    ]));
    load("refusal_direction/direction.pt:resid_pre")
        .fit_model(
            &persona_gate::model::Model::load(
                Path::new(&smol()),
                &persona_gate::model::ModelOptions::default(),
            )
            .unwrap()
            .info,
        )
        .unwrap()
        .save(&d.join("rd.safetensors"))
        .unwrap();
    let files = ["random.safetensors", "rd.safetensors"];
    let o = Command::new(&py)
        .current_dir(&d)
        .args(["-c", READ_BACK])
        .args(files)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for f in files {
        let ours = DirectionFile::load(&d.join(f)).unwrap();
        let theirs = &got[f];
        // The metadata, hook point included, is what we wrote.
        let meta: std::collections::BTreeMap<String, String> =
            serde_json::from_value(theirs["meta"].clone()).unwrap();
        assert_eq!(meta, ours.meta, "{f}");
        assert_eq!(meta["hook_point"], "resid_post");
        let inspect: serde_json::Value = serde_json::from_str(&run_ok(
            bin().current_dir(&d).args(["inspect", "--json", f]),
        ))
        .unwrap();
        for (i, dir) in ours.directions.iter().enumerate() {
            let t = &theirs["tensors"][&dir.name];
            assert_eq!(t["dtype"], "float32");
            assert_eq!(t["shape"], serde_json::json!([30, 576]));
            // Bit for bit the same values.
            let bits: Vec<u32> = serde_json::from_value(t["bits"].clone()).unwrap();
            let want: Vec<u32> = dir.rows.iter().flatten().map(|x| x.to_bits()).collect();
            assert_eq!(bits, want, "{f} {}", dir.name);
            // numpy's norms are inspect's, to the last bits of f64 summation order.
            let norms: Vec<f64> = serde_json::from_value(t["norms"].clone()).unwrap();
            let printed: Vec<f64> =
                serde_json::from_value(inspect["directions"][i]["norms"].clone()).unwrap();
            for (a, b) in norms.iter().zip(&printed) {
                assert!(
                    (a - b).abs() <= 1e-12 * b.abs(),
                    "{f}: numpy {a} vs inspect {b}"
                );
            }
        }
    }
    // The random control's norms are persona_vectors' rows' (hidden_states row L+1).
    let norms: Vec<f64> =
        serde_json::from_value(got["random.safetensors"]["tensors"]["random.s7"]["norms"].clone())
            .unwrap();
    for (l, n) in norms.iter().enumerate() {
        let want = persona_gate::directions::norm(&matrix(31, 576)[l + 1]);
        assert!((n - want).abs() < 1e-5 * want, "layer {l}: {n} vs {want}");
    }
}
