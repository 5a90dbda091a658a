//! Integrity under hostile input (issue 14), class by class, through the real binary: run
//! directories that cannot mix or lose results, names that cannot become paths, chat
//! templates that cannot hang or exhaust memory, input that cannot reach llama.cpp's
//! assertions, no NaN or inf in any output, no terminal control from file text, no
//! unbounded reads. Each refusal is one line, exit 1, and leaves the directory unchanged
//! (`common::fails`).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, fails, scratch, smol};

/// A small run: two conditions of two prompts, groups of two, a few tokens.
const TINY: &str = r#"
name = "tiny"
seed = 1
group_size = 2

[generation]
max_new_tokens = 4
min_tokens = 4

[prompts.eval]
source = "builtin:harmful"
n = 2

[[experiment]]
id = "E0"
prompts = "eval"
role = "baseline"

[[experiment]]
id = "E1"
prompts = "eval"
role = "baseline"
"#;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// `reproduce` with `spec` into `out`, extra flags; returns (success, stdout, stderr).
fn reproduce(dir: &Path, spec: &Path, out: &Path, extra: &[&str]) -> (bool, String, String) {
    let m = smol();
    let mut args = vec![
        "reproduce",
        "-m",
        &m,
        "--spec",
        spec.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    if !extra.contains(&"-t") {
        args.extend(["-t", "2"]);
    }
    args.extend_from_slice(extra);
    let o = bin().current_dir(dir).args(&args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn ok(r: (bool, String, String)) -> String {
    assert!(r.0, "run failed: {}", r.2);
    r.1
}

// ---- 1. run directories -------------------------------------------------------------------

/// Everything that changes a completion is in the fingerprint: resuming with another chat
/// template, system prompt, kernel mode or flash attention is refused, and so is merging
/// shards made two ways.
#[test]
fn resume_and_merge_refuse_a_changed_way_of_computing() {
    let d = scratch("fp");
    let spec = write(&d, "tiny.toml", TINY);
    let run = d.join("run");
    ok(reproduce(&d, &spec, &run, &[]));
    let tmpl = write(
        &d,
        "t.jinja",
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n",
    );
    let m = smol();
    let base = |extra: &[&str]| {
        let mut a = vec!["reproduce", "-m", &m, "--spec", "tiny.toml", "-o", "run"];
        if !extra.contains(&"-t") {
            a.extend(["-t", "2"]);
        }
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    for (extra, what) in [
        (
            vec!["--chat-template", tmpl.to_str().unwrap()],
            "chat template",
        ),
        (vec!["--kernels", "llama"], "kernels llama"),
        (vec!["--flash-attn", "on"], "flash-attn"),
    ] {
        let a = base(&extra);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        fails(&d, &a, &["holds a run with another", what]);
    }
    // What cannot change a result does not block a resume: threads and batch shape.
    let (good, _, err) = reproduce(
        &d,
        &spec,
        &run,
        &["-t", "1", "--parallel", "3", "--batch", "64"],
    );
    assert!(good && err.contains("plan.json matches"), "{err}");
    // Shards made with two templates do not merge.
    let (s1, s2) = (d.join("s1"), d.join("s2"));
    ok(reproduce(&d, &spec, &s1, &["--shard", "1/2"]));
    ok(reproduce(
        &d,
        &spec,
        &s2,
        &["--shard", "2/2", "--chat-template", tmpl.to_str().unwrap()],
    ));
    fails(
        &d,
        &["merge", "-o", "merged", "s1", "s2"],
        &["plan.json", "not shards of one run"],
    );
}

/// A group file counts only once verified against the plan: an empty or truncated one is
/// computed again (and the result is the same as a straight run), merge and finish name
/// it, a group copied from another run and group files without a plan are refused.
#[test]
fn group_files_are_verified_before_they_count() {
    let d = scratch("groups");
    let spec = write(&d, "tiny.toml", TINY);
    let run = d.join("run");
    ok(reproduce(&d, &spec, &run, &[]));
    let summary = std::fs::read(run.join("completions.csv")).unwrap();
    let g0 = run.join("groups/g000000.csv");
    let whole = std::fs::read(&g0).unwrap();
    // Empty, then cut in the middle of a row: each is recomputed, with a note naming it.
    for cut in [0, whole.len() / 2] {
        std::fs::write(&g0, &whole[..cut]).unwrap();
        let (good, _, err) = reproduce(&d, &spec, &run, &[]);
        assert!(good, "{err}");
        assert!(
            err.contains("g000000.csv") && err.contains("computing group 0 again"),
            "{err}"
        );
        assert_eq!(std::fs::read(&g0).unwrap(), whole);
        assert_eq!(std::fs::read(run.join("completions.csv")).unwrap(), summary);
    }
    // Rows of another group in this group's file: not this group.
    std::fs::copy(run.join("groups/g000001.csv"), &g0).unwrap();
    let (good, _, err) = reproduce(&d, &spec, &run, &[]);
    assert!(good && err.contains("expected E0 prompt 0"), "{err}");
    // merge names the bad file of an input.
    std::fs::write(&g0, &whole[..whole.len() / 2]).unwrap();
    fails(&d, &["merge", "-o", "m", "run"], &["g000000.csv", "rows"]);
    std::fs::write(&g0, &whole).unwrap();
    // A group from another run (another seed: another run id) is refused, not adopted.
    let other = d.join("other");
    let spec2 = write(&d, "tiny2.toml", &TINY.replace("seed = 1", "seed = 2"));
    ok(reproduce(&d, &spec2, &other, &[]));
    std::fs::copy(other.join("groups/g000000.csv"), &g0).unwrap();
    fails(
        &d,
        &[
            "reproduce",
            "-m",
            &smol(),
            "-t",
            "2",
            "--spec",
            "tiny.toml",
            "-o",
            "run",
        ],
        &["g000000.csv", "holds rows of run", "not of this run"],
    );
    // Group files in a directory without plan.json.
    let bare = d.join("bare/groups");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(run.join("groups/g000001.csv"), bare.join("g000000.csv")).unwrap();
    fails(
        &d,
        &[
            "reproduce",
            "-m",
            &smol(),
            "-t",
            "2",
            "--spec",
            "tiny.toml",
            "-o",
            "bare",
        ],
        &["bare", "group files but no plan.json"],
    );
}

/// Starts `reproduce --spec slow.toml -o OUT` in `d` and returns once `OUT/.lock` names it.
fn spawn_holding_lock(d: &Path, m: &str, out: &str, io: fn() -> Stdio) -> std::process::Child {
    let child = bin()
        .current_dir(d)
        .args([
            "reproduce",
            "-m",
            m,
            "-t",
            "1",
            "--spec",
            "slow.toml",
            "-o",
            out,
        ])
        .stdout(io())
        .stderr(io())
        .spawn()
        .unwrap();
    let lock = d.join(out).join(".lock");
    let pid = child.id().to_string();
    let t0 = Instant::now();
    while !std::fs::read_to_string(&lock).is_ok_and(|s| s.contains(&pid)) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no lock file appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Two processes on one run directory: the second is refused, naming the holder (pid and
/// host), whether its spec is the same or another; the first finishes with its results
/// intact. A killed run's lock is stale by construction and does not block the next run.
#[test]
fn a_second_process_on_a_run_directory_is_refused() {
    let d = scratch("lock");
    // Long enough to still be running when the second process starts.
    let slow = TINY
        .replace("max_new_tokens = 4", "max_new_tokens = 48")
        .replace("min_tokens = 4", "min_tokens = 48")
        .replace("n = 2", "n = 8");
    let spec = write(&d, "slow.toml", &slow);
    let other = write(&d, "other.toml", &slow.replace("seed = 1", "seed = 9"));
    let m = smol();
    let a = spawn_holding_lock(&d, &m, "run", Stdio::piped);
    let pid = a.id().to_string();
    for s in ["slow.toml", "other.toml"] {
        let o = bin()
            .current_dir(&d)
            .args(["reproduce", "-m", &m, "-t", "1", "--spec", s, "-o", "run"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains("is in use by another persona-gate process"),
            "{err}"
        );
        assert!(err.contains(&format!("pid {pid}")), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    let _ = other;
    // Nor can a judge (it rewrites completions.csv) or a quantizer write there meanwhile.
    for args in [
        vec!["judge", "--run", "run", "-m", m.as_str(), "-t", "1"],
        vec![
            "quantize",
            "-m",
            m.as_str(),
            "--types",
            "Q8_0",
            "--out-dir",
            "run",
        ],
    ] {
        let o = bin().current_dir(&d).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("is in use by another persona-gate process") && err.contains(&pid),
            "{args:?}: {err}"
        );
    }
    let out = a.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = std::fs::read(d.join("run/completions.csv")).unwrap();
    assert!(first.iter().filter(|&&b| b == b'\n').count() > 16);
    // A run killed while holding the lock: the next one takes over and resumes.
    let mut k = spawn_holding_lock(&d, &m, "killed", Stdio::null);
    k.kill().unwrap();
    k.wait().unwrap();
    let r = reproduce(&d, &spec, &d.join("killed"), &["-t", "1"]);
    assert!(r.0, "{}", r.2);
    assert_eq!(
        std::fs::read(d.join("killed/completions.csv")).unwrap(),
        first
    );
}

/// A model edited in place with its mtime set back is hashed again: the cached sha256 is
/// keyed on the inode change time too, which cannot be set back.
#[test]
fn a_model_edited_in_place_is_rehashed() {
    let d = scratch("rehash");
    let m = d.join("m.gguf");
    std::fs::copy(smol(), &m).unwrap();
    let sha = |d: &Path| {
        let o = bin()
            .current_dir(d)
            .args(["info", "-m", "m.gguf"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find(|l| l.starts_with("sha256"))
            .unwrap()
            .to_string()
    };
    let before = sha(&d);
    let mtime = std::fs::metadata(&m).unwrap().modified().unwrap();
    // One byte near the end: tensor data, so the model still loads.
    let mut f = std::fs::OpenOptions::new().write(true).open(&m).unwrap();
    let len = f.metadata().unwrap().len();
    use std::io::{Seek, SeekFrom};
    f.seek(SeekFrom::Start(len - 10)).unwrap();
    f.write_all(&[0x5a]).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    assert_eq!(std::fs::metadata(&m).unwrap().modified().unwrap(), mtime);
    assert_ne!(
        sha(&d),
        before,
        "an in-place edit with the mtime restored kept its old hash"
    );
}

// ---- 2. names from a spec never become paths -----------------------------------------------

#[test]
fn names_from_a_spec_cannot_leave_the_run_directory() {
    let d = scratch("paths");
    let m = smol();
    for (from, to, needle) in [
        ("name = \"tiny\"", "name = \"../../../../x\"", "name"),
        ("name = \"tiny\"", "name = \"/tmp/x\"", "name"),
        ("name = \"tiny\"", "name = \".hidden\"", "starts with a dot"),
        ("id = \"E1\"", "id = \"../../../../x\"", "experiment.id"),
        ("id = \"E1\"", "id = \"a/b\"", "experiment.id"),
        ("id = \"E1\"", "id = \"e\\u0000x\"", "experiment.id"),
    ] {
        write(&d, "s.toml", &TINY.replace(from, to));
        // Not --dry-run: a run that got past the check would write its directory.
        fails(
            &d,
            &["reproduce", "-m", &m, "--spec", "s.toml", "-o", "out"],
            &[needle],
        );
        std::fs::remove_file(d.join("s.toml")).unwrap();
    }
    // A direction name becomes plots/cosine-<name>.svg in compare.
    write(
        &d,
        "s.toml",
        &format!("{TINY}\n[directions.\"../x\"]\nkind = \"random\"\nseed = 1\n"),
    );
    fails(
        &d,
        &["reproduce", "-m", &m, "--spec", "s.toml", "-o", "out"],
        &["directions", "../x"],
    );
}

// ---- 3. chat templates: a step budget and an output cap ----------------------------------

#[test]
fn hostile_chat_templates_fail_in_one_line_naming_their_origin() {
    let d = scratch("tmpl");
    let m = smol();
    let cases = [
        (
            "loops.jinja",
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages[0].content }}".to_string(),
            "template instructions",
        ),
        (
            "big.jinja",
            "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}".to_string(),
            "renders more than",
        ),
        ("syntax.jinja", "{% for %}".to_string(), "from --chat-template"),
        (
            "huge.jinja",
            format!("{{# {} #}}", "x".repeat(2 << 20)),
            "a chat template may have",
        ),
    ];
    let t0 = Instant::now();
    for (name, text, needle) in cases {
        write(&d, name, &text);
        fails(&d, &["info", "-m", &m, "--chat-template", name], &[needle]);
        std::fs::remove_file(d.join(name)).unwrap();
    }
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "template budget too slow"
    );
}

// ---- 4. flags and files that would reach llama.cpp's assertions ---------------------------

/// A GGUF header: `general.architecture` and u32 keys, no tensors.
fn gguf_u32(arch: &str, kv: &[(&str, u32)]) -> Vec<u8> {
    let mut w = persona_gate::gguf::Writer::new();
    w.str("general.architecture", arch);
    for (k, v) in kv {
        w.u32(k, *v);
    }
    w.to_bytes()
}

#[test]
fn values_llama_cpp_would_assert_on_are_refused_first() {
    let d = scratch("asserts");
    let m = smol();
    for (args, needle) in [
        (
            vec!["--batch", "8", "--parallel", "16"],
            "--batch 8 is below --parallel 16",
        ),
        (
            vec!["--threads", "100000"],
            "--threads 100000 is out of range",
        ),
        (vec!["--threads", "0"], "--threads 0"),
        (vec!["--parallel", "0"], "--parallel 0"),
        (vec!["--parallel", "300"], "--parallel 300"),
        (vec!["--batch", "2"], "--batch 2"),
        (vec!["--ctx", "0"], "--ctx 0"),
        (vec!["--max-memory", "1K"], "--max-memory"),
        (vec!["--max-memory", "999999T"], "--max-memory"),
    ] {
        let mut a = vec!["generate", "-m", &m, "-p", "hi"];
        a.extend(args);
        fails(&d, &a, &[needle]);
    }
    for n in [0u32, 100_000] {
        std::fs::write(
            d.join("layers.gguf"),
            gguf_u32("llama", &[("llama.block_count", n)]),
        )
        .unwrap();
        fails(
            &d,
            &["info", "-m", "layers.gguf"],
            &[&format!("llama.block_count is {n}")],
        );
        std::fs::remove_file(d.join("layers.gguf")).unwrap();
    }
    // --n-gpu-layers on a build without a GPU backend is said, not ignored.
    if !cfg!(any(feature = "cuda", feature = "vulkan", feature = "metal")) {
        let o = bin()
            .args([
                "generate",
                "-m",
                &m,
                "-p",
                "hi",
                "--max-new-tokens",
                "2",
                "--n-gpu-layers",
                "5",
            ])
            .output()
            .unwrap();
        assert!(o.status.success());
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("--n-gpu-layers 5 has no effect"),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

// ---- 5. no NaN or inf in any output -------------------------------------------------------

/// A safetensors direction file written by hand (so it can hold NaN): one tensor.
fn safetensors(name: &str, rows: &[Vec<f32>]) -> Vec<u8> {
    let (nl, ne) = (rows.len(), rows[0].len());
    let header = format!(
        "{{\"{name}\":{{\"dtype\":\"F32\",\"shape\":[{nl},{ne}],\"data_offsets\":[0,{}]}},\"__metadata__\":{{\"arch\":\"llama\",\"hook_point\":\"resid_post\"}}}}",
        nl * ne * 4
    );
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header.as_bytes());
    for r in rows {
        for x in r {
            b.extend(x.to_le_bytes());
        }
    }
    b
}

#[test]
fn no_command_writes_or_prints_nan() {
    let d = scratch("nan");
    let good: Vec<Vec<f32>> = (0..4).map(|l| vec![1.0 + l as f32, 2.0, 3.0]).collect();
    let mut nan = good.clone();
    nan[2][1] = f32::NAN;
    let mut inf = good.clone();
    inf[1][0] = f32::INFINITY;
    let mut zero = good.clone();
    zero[3] = vec![0.0; 3];
    std::fs::write(d.join("good.safetensors"), safetensors("d", &good)).unwrap();
    std::fs::write(d.join("nan.safetensors"), safetensors("d", &nan)).unwrap();
    std::fs::write(d.join("inf.safetensors"), safetensors("d", &inf)).unwrap();
    std::fs::write(d.join("zero.safetensors"), safetensors("d", &zero)).unwrap();
    for f in ["nan.safetensors", "inf.safetensors"] {
        fails(&d, &["inspect", f], &[f, "layer", "NaN or inf"]);
        fails(
            &d,
            &["directions", "cos", f, "good.safetensors"],
            &[f, "NaN or inf"],
        );
        fails(
            &d,
            &[
                "directions",
                "random",
                "--like",
                f,
                "--norm-matched",
                "-o",
                "r.safetensors",
            ],
            &[f, "NaN or inf"],
        );
        fails(
            &d,
            &[
                "export-cvec",
                "-d",
                f,
                "--coefficient",
                "1",
                "--layers",
                "1-3",
                "-o",
                "c.gguf",
            ],
            &[f, "NaN or inf"],
        );
    }
    fails(
        &d,
        &["directions", "cos", "zero.safetensors", "good.safetensors"],
        &["norm 0 at layer 3", "undefined"],
    );
    fails(
        &d,
        &[
            "export-cvec",
            "-d",
            "good.safetensors",
            "--coefficient",
            "1e38",
            "--layers",
            "1-3",
            "-o",
            "c.gguf",
        ],
        &["overflows f32"],
    );
}

// ---- 6. text from files never drives the terminal; special tokens are literal by default --

#[test]
fn file_text_is_escaped_when_printed() {
    let d = scratch("escape");
    // A tensor name with an escape sequence, and metadata that clears the screen and fakes a
    // second line.
    let header = "{\"d\\u001b[31m\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]},\"__metadata__\":{\"hook_point\":\"resid_post\",\"arch\":\"llama\\u001b[2J\\nfake: line\"}}";
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header.as_bytes());
    for x in [1f32, 2.0, 3.0, 4.0] {
        b.extend(x.to_le_bytes());
    }
    std::fs::write(d.join("esc.safetensors"), &b).unwrap();
    let o = bin()
        .current_dir(&d)
        .args(["inspect", "esc.safetensors"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!o.stdout.contains(&0x1b), "an escape byte reached stdout");
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(!s.lines().any(|l| l.starts_with("fake: line")), "{s}");
    assert!(s.contains("\\u{1b}"), "{s}");
}

// ---- 7. no unbounded reads ----------------------------------------------------------------

#[test]
fn inputs_that_are_not_regular_files_are_refused() {
    let d = scratch("fifo");
    let m = smol();
    assert!(Command::new("mkfifo")
        .arg(d.join("p.txt"))
        .status()
        .unwrap()
        .success());
    let t0 = Instant::now();
    fails(
        &d,
        &[
            "extract",
            "refusal",
            "-m",
            &m,
            "--harmful",
            "p.txt",
            "--harmless",
            "builtin:harmless",
            "-o",
            "x.safetensors",
        ],
        &["p.txt", "not a regular file"],
    );
    fails(
        &d,
        &[
            "extract",
            "refusal",
            "-m",
            &m,
            "--harmful",
            "/dev/zero",
            "--harmless",
            "builtin:harmless",
            "-o",
            "x.safetensors",
        ],
        &["/dev/zero", "not a regular file"],
    );
    fails(
        &d,
        &["info", "-m", &m, "--chat-template", "p.txt"],
        &["p.txt", "not a regular file"],
    );
    // A sparse 2 GiB file: over the cap, refused without reading it.
    let f = std::fs::File::create(d.join("big.txt")).unwrap();
    f.set_len(2 << 30).unwrap();
    fails(
        &d,
        &["inspect", "big.txt"],
        &["big.txt", "MiB an input may have"],
    );
    assert!(t0.elapsed() < Duration::from_secs(30));
}

// ---- 8. the smaller ones ------------------------------------------------------------------

#[test]
fn smaller_silent_failures_are_errors() {
    let d = scratch("small");
    let m = smol();
    // --n beyond the set: refused, not clamped.
    fails(
        &d,
        &[
            "extract",
            "refusal",
            "-m",
            &m,
            "--harmful",
            "builtin:harmful",
            "--harmless",
            "builtin:harmless",
            "--n",
            "500",
            "-o",
            "x.safetensors",
        ],
        &["--n", "500", "16 prompts"],
    );
    // An unterminated CSV quote, which the csv crate would read to the end of the file.
    write(&d, "q.csv", "forbidden_prompt\n\"one\n\"two\"\nthree\n");
    fails(
        &d,
        &[
            "extract",
            "refusal",
            "-m",
            &m,
            "--harmful",
            "q.csv",
            "--harmless",
            "builtin:harmless",
            "-o",
            "x.safetensors",
        ],
        &["q.csv", "never closed"],
    );
    // A tensor name twice in a safetensors header.
    let good: Vec<Vec<f32>> = (0..4).map(|l| vec![1.0 + l as f32, 2.0, 3.0]).collect();
    let b = safetensors("d", &good);
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let h = String::from_utf8(b[8..8 + n].to_vec()).unwrap();
    let dup = h.replacen(
        '{',
        "{\"d\":{\"dtype\":\"F32\",\"shape\":[4,3],\"data_offsets\":[0,48]},",
        1,
    );
    let mut b2 = (dup.len() as u64).to_le_bytes().to_vec();
    b2.extend(dup.as_bytes());
    b2.extend(&b[8 + n..]);
    std::fs::write(d.join("dup.safetensors"), b2).unwrap();
    fails(
        &d,
        &["inspect", "dup.safetensors"],
        &["dup.safetensors", "appears twice"],
    );
    // A projection of a zero-norm direction is refused before anything is written.
    let ne = 576;
    let rows: Vec<Vec<f32>> = (0..30)
        .map(|l| {
            if l == 20 {
                vec![0.0; ne]
            } else {
                vec![0.01; ne]
            }
        })
        .collect();
    std::fs::write(d.join("z.safetensors"), safetensors("z", &rows)).unwrap();
    let z = format!(
        "{TINY}\n[directions.z]\nkind = \"file\"\npath = \"z.safetensors\"\n\n[[experiment]]\nid = \"P\"\nprompts = \"eval\"\nrole = \"steer\"\nintervention = [ {{ direction = \"z\", op = \"project\", layers = \"18-22\" }} ]\n"
    );
    write(&d, "z.toml", &z);
    fails(
        &d,
        &["reproduce", "-m", &m, "--spec", "z.toml", "-o", "zr"],
        &[
            "condition P",
            "resid_post.20",
            "norm 0",
            "cannot be projected out",
        ],
    );
}
