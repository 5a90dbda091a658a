//! The bad-input suite (issue 6, part 1): every case runs the real binary and must exit
//! non-zero with exactly one stderr line `persona-gate: …` naming the file or flag and the
//! problem, with no panic, abort or core-dump text, and must leave the scratch directory
//! exactly as it was (no new, changed or half-written files).
//!
//! Most cases fail before a model is loaded; those that need one use SmolLM2-135M (loads in
//! well under a second). What happens today, where the issue asks for a documented choice:
//! - a prompt longer than `--ctx` is refused, naming `--ctx N` and the prompt's size (not
//!   truncated);
//! - a control vector without some layer is read with zeros there (llama.cpp does the same),
//!   so a file missing its top layers has fewer layers than the model and is refused, and
//!   exporting a missing layer again is refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bin, fails, fails_watching, files, gguf, random_bytes, scratch, smol, snapshot};

// ---- crafted files ------------------------------------------------------------------------

/// A safetensors direction file `[n_layer, n_embd]` named `name` with string metadata.
fn safetensors(name: &str, n_layer: usize, n_embd: usize, meta: &[(&str, &str)]) -> Vec<u8> {
    let data: Vec<u8> = (0..n_layer * n_embd)
        .flat_map(|i| (((i % 7) as f32 + 1.0) * 0.01).to_le_bytes())
        .collect();
    // A file of ours: it records its hook point (another tool's file would need a convention).
    let meta: serde_json::Map<String, serde_json::Value> = [("hook_point", "resid_post")]
        .iter()
        .chain(meta)
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect();
    let header = serde_json::json!({
        name: {"dtype": "F32", "shape": [n_layer, n_embd], "data_offsets": [0, data.len()]},
        "__metadata__": meta,
    });
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

/// A SmolLM2-shaped persona direction (llama, 30 x 576) as `good.safetensors` in `d`.
fn good_direction(d: &Path) -> &'static str {
    std::fs::write(
        d.join("good.safetensors"),
        safetensors(
            "persona.compliant",
            30,
            576,
            &[("arch", "llama"), ("kind", "persona")],
        ),
    )
    .unwrap();
    "good.safetensors"
}

// ---- model files --------------------------------------------------------------------------

#[test]
fn missing_model() {
    let d = scratch("missing-model");
    for cmd in ["info", "generate", "demo", "bench"] {
        fails(
            &d,
            &[cmd, "-m", "missing.gguf"],
            &["missing.gguf", "no such file"],
        );
    }
    for cmd in [&["extract", "refusal"][..], &["extract", "persona"]] {
        let mut a = cmd.to_vec();
        a.extend(["-m", "missing.gguf", "-o", "out.safetensors"]);
        fails(&d, &a, &["missing.gguf", "no such file"]);
    }
    fails(
        &d,
        &["select", "-m", "missing.gguf", "-d", "x.safetensors"],
        &["missing.gguf", "no such file"],
    );
}

#[test]
fn empty_model() {
    let d = scratch("empty-model");
    std::fs::write(d.join("empty.gguf"), b"").unwrap();
    fails(&d, &["info", "-m", "empty.gguf"], &["empty.gguf", "empty"]);
}

#[test]
fn truncated_model() {
    let d = scratch("truncated-model");
    // The header (metadata, vocabulary, tensor table) is whole; the weights are cut.
    let mut f = std::fs::File::open(common::model_path(common::SMOL)).unwrap();
    let mut head = vec![0u8; 4 << 20];
    std::io::Read::read_exact(&mut f, &mut head).unwrap();
    std::fs::write(d.join("cut.gguf"), &head).unwrap();
    fails(
        &d,
        &["info", "-m", "cut.gguf"],
        &["cut.gguf", "truncated", "needs bytes up to"],
    );
    // Cut inside the header.
    std::fs::write(d.join("cut-header.gguf"), &head[..5000]).unwrap();
    fails(
        &d,
        &["generate", "-m", "cut-header.gguf"],
        &["cut-header.gguf", "truncated"],
    );
}

#[test]
fn random_bytes_model() {
    let d = scratch("random-model");
    std::fs::write(d.join("random.gguf"), random_bytes(4096, 1)).unwrap();
    fails(
        &d,
        &["info", "-m", "random.gguf"],
        &["random.gguf", "not a GGUF"],
    );
}

#[test]
fn wrong_magic_model() {
    let d = scratch("magic-model");
    let mut b = gguf(&[("general.architecture", "llama")], &[]);
    b[..4].copy_from_slice(b"GGML");
    std::fs::write(d.join("ggml.gguf"), b).unwrap();
    fails(
        &d,
        &["bench", "-m", "ggml.gguf"],
        &["ggml.gguf", "not a GGUF", "magic"],
    );
    // A right magic with a version nobody writes.
    let mut b = gguf(&[("general.architecture", "llama")], &[]);
    b[4..8].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(d.join("v99.gguf"), b).unwrap();
    fails(
        &d,
        &["info", "-m", "v99.gguf"],
        &["v99.gguf", "unsupported GGUF version 99"],
    );
}

#[test]
fn unsupported_architecture() {
    let d = scratch("arch");
    let b = gguf(
        &[("general.architecture", "fooformer")],
        &[("token_embd.weight", vec![0.0; 64])],
    );
    std::fs::write(d.join("foo.gguf"), b).unwrap();
    fails(
        &d,
        &["info", "-m", "foo.gguf"],
        &["foo.gguf", "unknown model architecture", "fooformer"],
    );
}

#[test]
fn directory_as_model() {
    let d = scratch("dir-model");
    std::fs::create_dir(d.join("model.gguf")).unwrap();
    fails(
        &d,
        &["info", "-m", "model.gguf"],
        &["model.gguf", "is a directory"],
    );
}

// ---- direction files ----------------------------------------------------------------------

#[test]
fn directory_as_direction_file() {
    let d = scratch("dir-direction");
    std::fs::create_dir(d.join("dirs.safetensors")).unwrap();
    fails(
        &d,
        &["inspect", "dirs.safetensors"],
        &["dirs.safetensors", "is a directory"],
    );
    fails(
        &d,
        &[
            "export-cvec",
            "-d",
            "dirs.safetensors",
            "--coefficient",
            "1",
            "--layers",
            "3",
            "-o",
            "x.gguf",
        ],
        &["dirs.safetensors", "is a directory"],
    );
}

#[test]
fn direction_file_for_another_n_embd() {
    let d = scratch("n-embd");
    std::fs::write(
        d.join("n896.safetensors"),
        safetensors("refusal.pos-1", 30, 896, &[("arch", "llama")]),
    )
    .unwrap();
    fails(
        &d,
        &["select", "-m", &smol(), "-d", "n896.safetensors"],
        &["n896.safetensors", "n_embd 896", "576"],
    );
}

#[test]
fn direction_file_for_another_arch() {
    let d = scratch("other-arch");
    std::fs::write(
        d.join("qwen.safetensors"),
        safetensors("refusal.pos-1", 30, 576, &[("arch", "qwen2")]),
    )
    .unwrap();
    fails(
        &d,
        &["select", "-m", &smol(), "-d", "qwen.safetensors"],
        &["qwen.safetensors", "'qwen2'", "'llama'"],
    );
}

#[test]
fn corrupted_safetensors_header() {
    let d = scratch("st-header");
    let mut b = safetensors("x", 2, 4, &[]);
    b[9] = b'!'; // inside the JSON
    std::fs::write(d.join("json.safetensors"), &b).unwrap();
    fails(
        &d,
        &["inspect", "json.safetensors"],
        &["json.safetensors", "corrupt safetensors header"],
    );
    let mut b = safetensors("x", 2, 4, &[]);
    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(d.join("len.safetensors"), &b).unwrap();
    fails(
        &d,
        &[
            "directions",
            "random",
            "--like",
            "len.safetensors",
            "-o",
            "r.safetensors",
        ],
        &["len.safetensors", "exceeds the file"],
    );
    std::fs::write(d.join("random.safetensors"), random_bytes(3000, 2)).unwrap();
    fails(
        &d,
        &["inspect", "random.safetensors"],
        &["random.safetensors", "corrupt safetensors header"],
    );
    std::fs::write(d.join("empty.safetensors"), b"").unwrap();
    fails(
        &d,
        &["inspect", "empty.safetensors"],
        &["empty.safetensors", "too short"],
    );
}

#[test]
fn truncated_safetensors_data() {
    let d = scratch("st-data");
    let b = safetensors("x", 30, 576, &[("arch", "llama")]);
    std::fs::write(d.join("cut.safetensors"), &b[..b.len() - 100]).unwrap();
    fails(
        &d,
        &["directions", "cos", "cut.safetensors", "cut.safetensors"],
        &["cut.safetensors", "tensor 'x'", "do not fit"],
    );
}

#[test]
fn direction_files_of_different_shapes() {
    let d = scratch("cos-shapes");
    good_direction(&d);
    std::fs::write(
        d.join("small.safetensors"),
        safetensors("other", 24, 576, &[]),
    )
    .unwrap();
    fails(
        &d,
        &[
            "directions",
            "cos",
            "good.safetensors",
            "small.safetensors",
            "--csv",
            "cos.csv",
        ],
        &["persona.compliant", "other", "[24x576]"],
    );
}

#[test]
fn control_vector_with_a_missing_layer() {
    let d = scratch("cvec-hole");
    let row = |k: f32| vec![k; 576];
    // Layers 1, 3 and 4 of a 30-layer model: 2 is missing in the middle, 5-29 at the top.
    let b = gguf(
        &[
            ("general.architecture", "controlvector"),
            ("controlvector.model_hint", "llama"),
        ],
        &[
            ("direction.1", row(0.1)),
            ("direction.3", row(0.3)),
            ("direction.4", row(0.4)),
        ],
    );
    std::fs::write(d.join("hole.gguf"), b).unwrap();
    fails(
        &d,
        &[
            "export-cvec",
            "-d",
            "hole.gguf",
            "--coefficient",
            "2",
            "--layers",
            "1-3",
            "-o",
            "again.gguf",
        ],
        &["export-cvec", "cvec is zero at layer 2"],
    );
    fails(
        &d,
        &["select", "-m", &smol(), "-d", "hole.gguf"],
        &["hole.gguf", "5 layers", "the model has 30"],
    );
    // A tensor that is not direction.<layer>, and a layer index no model has.
    let b = gguf(
        &[("general.architecture", "controlvector")],
        &[("direction.x", row(0.1))],
    );
    std::fs::write(d.join("name.gguf"), b).unwrap();
    fails(
        &d,
        &["inspect", "name.gguf"],
        &["name.gguf", "'direction.x' is not named direction.<layer>"],
    );
    let b = gguf(
        &[("general.architecture", "controlvector")],
        &[("direction.4000000000", row(0.1))],
    );
    std::fs::write(d.join("far.gguf"), b).unwrap();
    fails(
        &d,
        &["inspect", "far.gguf"],
        &["far.gguf", "layer 4000000000 is beyond any model"],
    );
}

// ---- flags --------------------------------------------------------------------------------

fn export(d: &Path, coefficient: &str, layers: &str, out: &str, needles: &[&str]) {
    let f = good_direction(d);
    fails(
        d,
        &[
            "export-cvec",
            "-d",
            f,
            "--coefficient",
            coefficient,
            "--layers",
            layers,
            "-o",
            out,
        ],
        needles,
    );
}

#[test]
fn layer_out_of_range() {
    let d = scratch("layer-range");
    export(
        &d,
        "1",
        "30",
        "x.gguf",
        &["--layers", "layer 30 out of range (30 layers, 0-29)"],
    );
    export(&d, "1", "0", "x.gguf", &["layer 0"]);
    export(
        &d,
        "1",
        "3,x",
        "x.gguf",
        &["--layers", "'x' is not a layer number"],
    );
}

#[test]
fn layer_negative() {
    let d = scratch("layer-negative");
    export(
        &d,
        "1",
        "-2",
        "x.gguf",
        &["--layers", "layer -2 is negative"],
    );
    export(&d, "1", "-3-5", "x.gguf", &["--layers", "'-3-5'"]);
}

#[test]
fn empty_window() {
    let d = scratch("layer-window");
    export(
        &d,
        "1",
        "5-3",
        "x.gguf",
        &["--layers", "window 5-3 is empty"],
    );
    export(
        &d,
        "1",
        "",
        "x.gguf",
        &["--layers", "is not a layer number"],
    );
}

#[test]
fn coefficient_nan() {
    let d = scratch("coef-nan");
    export(&d, "NaN", "3", "x.gguf", &["coefficient NaN is not finite"]);
    fails(
        &d,
        &[
            "select",
            "-m",
            &smol(),
            "-d",
            "good.safetensors",
            "--coefficient",
            "nan",
        ],
        &["--coefficient", "NaN is not a finite number"],
    );
}

#[test]
fn coefficient_inf() {
    let d = scratch("coef-inf");
    export(&d, "inf", "3", "x.gguf", &["coefficient inf is not finite"]);
    export(
        &d,
        "-inf",
        "3",
        "x.gguf",
        &["coefficient -inf is not finite"],
    );
    fails(
        &d,
        &["demo", "-m", &smol(), "--coefficients", "4,inf"],
        &["--coefficients", "inf is not a finite number"],
    );
}

// ---- prompt sets --------------------------------------------------------------------------

/// `extract refusal` on SmolLM2 with `--harmful FILE`, writing into the scratch dir.
fn extract_with(d: &Path, harmful: &str, extra: &[&str], needles: &[&str]) {
    let m = smol();
    let mut a = vec![
        "extract",
        "refusal",
        "-m",
        &m,
        "-t",
        "2",
        "--harmful",
        harmful,
        "-o",
        "out.safetensors",
    ];
    a.extend(extra);
    fails(d, &a, needles);
}

#[test]
fn empty_prompt_set() {
    let d = scratch("set-empty");
    std::fs::write(d.join("empty.txt"), "\n  \n\n").unwrap();
    extract_with(
        &d,
        "empty.txt",
        &[],
        &["--harmful", "empty.txt", "the prompt set is empty"],
    );
    std::fs::write(d.join("empty.json"), "[]").unwrap();
    extract_with(&d, "empty.json", &[], &["empty.json", "empty"]);
    std::fs::write(
        d.join("blank.jsonl"),
        "{\"instruction\": \"a\"}\n{\"instruction\": \"  \"}\n",
    )
    .unwrap();
    extract_with(
        &d,
        "blank.jsonl",
        &[],
        &["blank.jsonl", "instruction 2 is empty"],
    );
    extract_with(
        &d,
        "builtin:nope",
        &[],
        &["--harmful", "no built-in prompt set 'nope'"],
    );
}

#[test]
fn csv_without_the_named_column() {
    let d = scratch("set-csv");
    std::fs::write(
        d.join("sr.csv"),
        "category,source,forbidden_prompt\nViolence,custom,\"Do x, then y\"\n",
    )
    .unwrap();
    extract_with(
        &d,
        "sr.csv",
        &["--field", "goal"],
        &["sr.csv", "no field or column 'goal'", "forbidden_prompt"],
    );
    std::fs::write(d.join("none.csv"), "a,b\n1,2\n").unwrap();
    extract_with(&d, "none.csv", &[], &["none.csv", "no instruction field"]);
    std::fs::write(d.join("ragged.csv"), "goal,x\nfine,1\nbroken\n").unwrap();
    extract_with(&d, "ragged.csv", &[], &["ragged.csv", "CSV record 2"]);
}

#[test]
fn invalid_json_reports_the_line() {
    let d = scratch("set-json");
    std::fs::write(
        d.join("bad.json"),
        "[\n  {\"instruction\": \"a\"},\n  {\"instruction\": \"b\",,}\n]\n",
    )
    .unwrap();
    extract_with(&d, "bad.json", &[], &["bad.json", "line 3", "invalid JSON"]);
    std::fs::write(d.join("obj.json"), "{\"instruction\": \"a\"}").unwrap();
    extract_with(&d, "obj.json", &[], &["obj.json", "expected a JSON array"]);
}

#[test]
fn invalid_jsonl_reports_the_line() {
    let d = scratch("set-jsonl");
    std::fs::write(
        d.join("bad.jsonl"),
        "{\"instruction\": \"a\"}\n\n{\"instruction\": \"b\"\n",
    )
    .unwrap();
    extract_with(
        &d,
        "bad.jsonl",
        &[],
        &["bad.jsonl", "line 3", "invalid JSON"],
    );
    std::fs::write(d.join("arr.jsonl"), "{\"goal\": \"a\"}\n[1, 2]\n").unwrap();
    extract_with(
        &d,
        "arr.jsonl",
        &[],
        &["arr.jsonl", "line 2", "expected a JSON object"],
    );
    std::fs::write(d.join("num.jsonl"), "{\"goal\": \"a\"}\n{\"goal\": 7}\n").unwrap();
    extract_with(
        &d,
        "num.jsonl",
        &[],
        &["num.jsonl", "line 2", "'goal' is not a string"],
    );
}

#[test]
fn non_utf8_prompts() {
    let d = scratch("set-utf8");
    std::fs::write(d.join("latin1.txt"), b"fine\ncaf\xe9 au lait\n").unwrap();
    extract_with(
        &d,
        "latin1.txt",
        &[],
        &["latin1.txt", "line 2", "not valid UTF-8"],
    );
    std::fs::write(d.join("latin1.csv"), b"goal\nok\n\xff\xfe\n").unwrap();
    extract_with(
        &d,
        "latin1.csv",
        &[],
        &["latin1.csv", "line 3", "not valid UTF-8"],
    );
}

#[test]
fn non_utf8_prompt_argument() {
    use std::os::unix::ffi::OsStrExt;
    let d = scratch("arg-utf8");
    let arg = std::ffi::OsStr::from_bytes(b"caf\xe9");
    let before = snapshot(&d);
    let out = bin()
        .current_dir(&d)
        .args(["generate", "-m", "x.gguf", "-p"])
        .arg(arg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("persona-gate: ") && err.contains("UTF-8"),
        "{err}"
    );
    assert_eq!(snapshot(&d), before);
}

#[test]
fn directory_as_prompt_set() {
    let d = scratch("set-dir");
    std::fs::create_dir(d.join("prompts.json")).unwrap();
    extract_with(
        &d,
        "prompts.json",
        &[],
        &["--harmful", "prompts.json", "is a directory"],
    );
}

#[test]
fn bad_personas_file() {
    let d = scratch("personas");
    std::fs::write(
        d.join("p.toml"),
        "[kind]\ndescription = 'd'\npositive = ['p']\nnegative = ['n']\nextra = 1\n",
    )
    .unwrap();
    let m = smol();
    fails(
        &d,
        &[
            "extract",
            "persona",
            "-m",
            &m,
            "--personas",
            "p.toml",
            "--persona",
            "kind",
            "-o",
            "out.safetensors",
        ],
        &["p.toml", "extra"],
    );
}

#[test]
fn prompt_longer_than_the_context() {
    // Refused with the sizes, not truncated (README "Tests").
    let d = scratch("ctx");
    fails(
        &d,
        &[
            "generate",
            "-m",
            &smol(),
            "--ctx",
            "16",
            "-p",
            "Tell me a long story about a dragon who learns to read.",
        ],
        &["--ctx 16"],
    );
}

// ---- outputs ------------------------------------------------------------------------------

#[test]
fn unwritable_output_directory() {
    let d = scratch("unwritable");
    std::fs::write(d.join("file"), b"not a directory").unwrap();
    export(
        &d,
        "1",
        "3",
        "file/sub/out.gguf",
        &["file/sub/out.gguf", "cannot create a file in 'file/sub'"],
    );
    let f = good_direction(&d);
    fails(
        &d,
        &[
            "directions",
            "random",
            "--like",
            f,
            "-o",
            "file/sub/r.safetensors",
        ],
        &[
            "file/sub/r.safetensors",
            "cannot create a file in 'file/sub'",
        ],
    );
    fails(
        &d,
        &[
            "directions",
            "random",
            "--like",
            f,
            "-o",
            "no/such/dir/r.safetensors",
        ],
        &[
            "no/such/dir/r.safetensors",
            "cannot create a file in 'no/such/dir'",
        ],
    );
    fails(
        &d,
        &[
            "directions",
            "random",
            "--like",
            f,
            "-o",
            "/proc/pg-r.safetensors",
        ],
        &["/proc/pg-r.safetensors", "cannot create a file in '/proc'"],
    );
    std::fs::create_dir(d.join("out.gguf")).unwrap();
    export(&d, "1", "3", "out.gguf", &["out.gguf", "is a directory"]);
}

#[test]
fn a_failed_second_output_leaves_no_first_output() {
    let d = scratch("cos-two-outputs");
    let f = good_direction(&d);
    std::fs::write(d.join("file"), b"not a directory").unwrap();
    fails(
        &d,
        &[
            "directions",
            "cos",
            f,
            f,
            "--csv",
            "cos.csv",
            "--svg",
            "file/cos.svg",
        ],
        &["file/cos.svg"],
    );
}

/// A 64 KiB tmpfs (root only), unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts one at `at`, or says why not.
    fn mount(at: &Path) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(at).map_err(|e| format!("{}: {e}", at.display()))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
            ));
        }
        Ok(Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Says on the real stderr that a test did not run its check: the test harness captures
/// `eprintln!` of a passing test, so a skip written that way would never be seen.
fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("\n{test}: SKIPPED: {why}\n").as_bytes());
}

/// Where root can mount a tmpfs, this runs; elsewhere it passes with a SKIPPED line in the
/// test output.
#[test]
fn full_disk() {
    let d = scratch("full");
    let f = good_direction(&d);
    let fs = match Tmpfs::mount(&d.join("full")) {
        Ok(fs) => fs,
        Err(why) => {
            skipped("full_disk", &format!("needs root and a tmpfs mount: {why}"));
            return;
        }
    };
    // 30 x 576 floats (69 KB) do not fit in 64 KiB: the write fails part-way, and the
    // temp file must be gone afterwards.
    fails_watching(
        &d,
        &[&fs.0],
        &[
            "directions",
            "random",
            "--like",
            f,
            "-o",
            "full/r.safetensors",
        ],
        &["full/r.safetensors", "No space left on device"],
    );
    fails_watching(
        &d,
        &[&fs.0],
        &[
            "export-cvec",
            "-d",
            f,
            "--coefficient",
            "1",
            "--layers",
            "1-29",
            "-o",
            "full/c.gguf",
        ],
        &["full/c.gguf", "No space left on device"],
    );
    assert_eq!(files(&fs.0), Vec::<String>::new());
}

// ---- numerical guards (issue 6, part 4) ----------------------------------------------------

/// SmolLM2 with its final norm's weights set to NaN, as a broken file might have: every
/// logit is NaN while every residual activation stays finite.
fn nan_model(d: &Path) -> PathBuf {
    let src = common::model_path(common::SMOL);
    let g = persona_gate::gguf::Gguf::open(&src).unwrap();
    let t = g
        .tensors
        .iter()
        .find(|t| t.name == "output_norm.weight")
        .unwrap();
    assert_eq!(t.ggml_type, 0, "output_norm.weight is F32");
    let mut bytes = std::fs::read(&src).unwrap();
    for i in 0..t.dims.iter().product::<u64>() as usize {
        let o = t.offset as usize + 4 * i;
        bytes[o..o + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    }
    let p = d.join("nan.gguf");
    std::fs::write(&p, bytes).unwrap();
    p
}

const BASELINE_SPEC: &str = r#"
name = "nan"
[generation]
max_new_tokens = 4
min_tokens = 1
[prompts.eval]
source = "builtin:harmful"
n = 2
[directions.noise]
kind = "random"
seed = 0
[[experiment]]
id = "E0"
prompts = "eval"
[[experiment]]
id = "big"
prompts = "eval"
intervention = [{ direction = "noise", op = "add", layers = 3, coefficient = COEF }]
"#;

#[test]
fn non_finite_logits_name_the_prompt() {
    let d = scratch("nan-logits");
    nan_model(&d);
    fails(
        &d,
        &["generate", "-m", "nan.gguf", "-t", "2", "-p", "Hello"],
        &["non-finite logit NaN", "at generated token 0 of prompt 0"],
    );
}

/// Runs `reproduce` with [`BASELINE_SPEC`] and asserts a one-line failure with `needles`
/// and that no results (group CSVs, summary) were written.
fn reproduce_fails_without_results(d: &Path, model: &str, coef: &str, needles: &[&str]) {
    std::fs::write(d.join("s.toml"), BASELINE_SPEC.replace("COEF", coef)).unwrap();
    let out = bin()
        .current_dir(d)
        .args([
            "reproduce",
            "-m",
            model,
            "-t",
            "2",
            "--spec",
            "s.toml",
            "-o",
            "run",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && out.status.code().is_some(),
        "{err}"
    );
    let last = err.lines().last().unwrap_or("");
    assert!(last.starts_with("persona-gate: "), "{err}");
    for n in needles {
        assert!(last.contains(n), "'{n}' not in: {err}");
    }
    for bad in ["panicked", "abort", "core dumped"] {
        assert!(!err.contains(bad), "{err}");
    }
    let groups: Vec<_> = std::fs::read_dir(d.join("run/groups"))
        .map(|r| r.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(groups.is_empty(), "results written: {groups:?}");
    assert!(!d.join("run/summary.csv").exists());
    assert!(!d.join("run/completions.csv").exists());
}

#[test]
fn non_finite_logits_in_a_run_name_the_condition() {
    let d = scratch("nan-run");
    nan_model(&d);
    reproduce_fails_without_results(
        &d,
        "nan.gguf",
        "1",
        &[
            "non-finite logit NaN",
            "at generated token 0 of condition E0, prompt 0, group 0",
        ],
    );
}

#[test]
fn overflowing_coefficient_names_the_condition_and_layer() {
    let d = scratch("overflow");
    reproduce_fails_without_results(
        &d,
        &smol(),
        "1e300",
        &["condition big: 1e300 x noise at resid_post.3 overflows f32"],
    );
}

// ---- resource bounds (issue 6, part 5) -----------------------------------------------------

#[test]
fn a_model_that_does_not_fit_is_refused_up_front() {
    let d = scratch("memory");
    fails(
        &d,
        &[
            "generate",
            "-m",
            &smol(),
            "-t",
            "2",
            "--max-memory",
            "200M",
            "-p",
            "Hi",
        ],
        &[
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "not enough memory",
            "--max-memory allows 200 MiB",
            "lower --ctx",
        ],
    );
    fails(
        &d,
        &[
            "generate",
            "-m",
            &smol(),
            "--max-memory",
            "lots",
            "-p",
            "Hi",
        ],
        &["--max-memory", "'lots' is not a size"],
    );
}

/// A budget that fits fewer sequences than `--parallel` runs fewer at a time, with a
/// warning, and gives the same completions (batched equals solo).
#[test]
fn parallel_adapts_to_the_memory_budget() {
    let run = |extra: &[&str]| {
        let m = smol();
        let mut args = vec!["generate", "-m", &m, "-t", "2", "--max-new-tokens", "12"];
        args.extend_from_slice(extra);
        for p in [
            "Name a colour.",
            "What is 2+2?",
            "Say hello.",
            "Name a fruit.",
            "Why is the sky blue?",
            "Count to three.",
        ] {
            args.extend(["-p", p]);
        }
        let out = bin().args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (free, free_err) = run(&[]);
    // 2 + 2 streams (two sequences and the prefix cache) of 22 MiB fit, a third does not.
    let (tight, tight_err) = run(&["--max-memory", "374M"]);
    assert!(!free_err.contains("running"), "{free_err}");
    assert!(
        tight_err.contains("--parallel 16 needs about"),
        "{tight_err}"
    );
    assert!(
        tight_err.contains("running 2 sequences at a time"),
        "{tight_err}"
    );
    assert_eq!(free, tight);
}

/// A binary started on a CPU that lacks what it was built for says so in one line and exits 1
/// before llama.cpp runs (issue 12); simulated by hiding one compiled-in feature.
#[test]
fn a_cpu_without_the_build_s_instruction_set_is_refused_in_one_line() {
    let compiled = persona_gate::cpu::compiled();
    let Some(feature) = compiled.last() else {
        skipped(
            "a_cpu_without_the_build_s_instruction_set_is_refused_in_one_line",
            "this build enables no target features to hide",
        );
        return;
    };
    let out = bin()
        .args(["info", "-m", &smol()])
        .env("PERSONA_GATE_TEST_CPU_LACKS", feature)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&format!("this CPU lacks {feature}")), "{err}");
    assert!(err.contains(&persona_gate::cpu::built_for()), "{err}");
    assert!(out.stdout.is_empty());
}
