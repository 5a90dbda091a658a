//! Bad input through the real binary: each case exits non-zero with one line naming the file
//! or flag and the problem, never a panic or abort, and writes no files (issue 2, check 6f).

mod common;

// Every failure here is a refusal of ours (exit 1), checked by the shared harness.
use common::{bin, fails_exit_1, gguf, random_bytes, scratch};

#[test]
fn bad_model_files() {
    let d = scratch("models");
    std::fs::write(d.join("empty.gguf"), b"").unwrap();
    std::fs::write(
        d.join("magic.gguf"),
        b"GGML\x03\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
    )
    .unwrap();
    let random = random_bytes(4096, 0x1234_5678);
    assert_ne!(&random[..4], b"GGUF");
    std::fs::write(d.join("random.gguf"), random).unwrap();
    // Well-formed headers with one string key and no tensors.
    let header_only = |arch: &str| gguf(&[("general.architecture", arch)], &[]);
    std::fs::write(d.join("foo-arch.gguf"), header_only("fooarch")).unwrap();
    std::fs::write(d.join("no-tensors.gguf"), header_only("llama")).unwrap();
    std::fs::create_dir(d.join("dir.gguf")).unwrap();
    let smol = std::fs::read(common::model_path(common::SMOL)).unwrap();
    std::fs::write(d.join("truncated.gguf"), &smol[..smol.len() / 2]).unwrap();
    std::fs::write(d.join("header-cut.gguf"), &smol[..1000]).unwrap();
    for cmd in ["info", "demo", "bench", "generate"] {
        fails_exit_1(
            &d,
            &[cmd, "-m", "missing.gguf"],
            &["missing.gguf", "no such file"],
        );
    }
    fails_exit_1(&d, &["info", "-m", "empty.gguf"], &["empty.gguf", "empty"]);
    fails_exit_1(
        &d,
        &["info", "-m", "magic.gguf"],
        &["magic.gguf", "not a GGUF"],
    );
    fails_exit_1(
        &d,
        &["info", "-m", "random.gguf"],
        &["random.gguf", "not a GGUF"],
    );
    fails_exit_1(&d, &["info", "-m", "dir.gguf"], &["dir.gguf", "directory"]);
    fails_exit_1(
        &d,
        &["info", "-m", "truncated.gguf"],
        &["truncated.gguf", "truncated"],
    );
    fails_exit_1(
        &d,
        &["info", "-m", "header-cut.gguf"],
        &["header-cut.gguf", "truncated"],
    );
    fails_exit_1(
        &d,
        &["info", "-m", "foo-arch.gguf"],
        &["foo-arch.gguf", "unknown model architecture"],
    );
    fails_exit_1(
        &d,
        &["info", "-m", "no-tensors.gguf"],
        &["no-tensors.gguf", "could not load"],
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bad_flags_with_a_real_model() {
    let d = scratch("flags");
    let m = common::model_path(common::SMOL);
    let m = m.to_str().unwrap();
    fails_exit_1(
        &d,
        &["demo", "-m", m, "--layers", "30"],
        &["--layers", "out of range (30 layers"],
    );
    fails_exit_1(
        &d,
        &["demo", "-m", m, "--layers", "-1"],
        &["--layers", "negative"],
    );
    fails_exit_1(
        &d,
        &["demo", "-m", m, "--layers", "9-3"],
        &["--layers", "empty"],
    );
    fails_exit_1(
        &d,
        &["demo", "-m", m, "--coefficients", "NaN"],
        &["--coefficients", "NaN"],
    );
    fails_exit_1(
        &d,
        &["demo", "-m", m, "--coefficients", "inf"],
        &["--coefficients", "inf"],
    );
    fails_exit_1(
        &d,
        &["info", "-m", m, "--chat-template", "nope.jinja"],
        &["--chat-template", "nope.jinja"],
    );
    std::fs::write(d.join("bad.jinja"), "{% for %}").unwrap();
    fails_exit_1(
        &d,
        &["info", "-m", m, "--chat-template", "bad.jinja"],
        &["chat template"],
    );
    fails_exit_1(
        &d,
        &[
            "generate",
            "-m",
            m,
            "--ctx",
            "16",
            "-p",
            "Tell me a story about a dragon.",
        ],
        &["--ctx 16"],
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn info_prints_metadata() {
    let out = bin()
        .args([
            "info",
            "-m",
            common::model_path(common::QWEN05).to_str().unwrap(),
            "-t",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8_lossy(&out.stdout);
    for want in [
        "arch          qwen2",
        "n_layer       24",
        "n_embd        896",
        "n_vocab       151936",
        "file_type     Q4_K_M",
        "sha256        1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "You are Qwen, created by Alibaba Cloud",
        "resid_post.0-23",
    ] {
        assert!(s.contains(want), "missing {want:?} in:\n{s}");
    }
}

#[test]
fn direction_files_for_another_model_are_refused() {
    use persona_gate::directions::{Direction, DirectionFile};
    let d = scratch("dirs");
    let m = common::model_path(common::SMOL);
    let m = m.to_str().unwrap();
    let small = Direction {
        name: "x".into(),
        rows: vec![vec![1.0, 0.0, 0.0]; 30],
    };
    let meta = [
        ("arch".to_string(), "llama".to_string()),
        ("kind".to_string(), "refusal".to_string()),
    ]
    .into();
    DirectionFile::new(vec![small], meta)
        .unwrap()
        .save(&d.join("n3.safetensors"))
        .unwrap();
    fails_exit_1(
        &d,
        &["select", "-m", m, "-d", "n3.safetensors"],
        &["n3.safetensors", "n_embd 3", "576"],
    );
    let other = Direction {
        name: "x".into(),
        rows: vec![vec![1.0; 576]; 30],
    };
    let meta = [("arch".to_string(), "qwen2".to_string())].into();
    DirectionFile::new(vec![other], meta)
        .unwrap()
        .save(&d.join("qwen.safetensors"))
        .unwrap();
    fails_exit_1(
        &d,
        &["select", "-m", m, "-d", "qwen.safetensors"],
        &["qwen.safetensors", "'qwen2'", "'llama'"],
    );
    std::fs::write(
        d.join("bad.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7f{}",
    )
    .unwrap();
    fails_exit_1(
        &d,
        &["inspect", "bad.safetensors"],
        &["bad.safetensors", "corrupt safetensors header"],
    );
    fails_exit_1(
        &d,
        &[
            "export-cvec",
            "-d",
            "qwen.safetensors",
            "--coefficient",
            "1",
            "--layers",
            "0",
            "-o",
            "x.gguf",
        ],
        &["layer 0"],
    );
    // A seeded random control is reproducible byte for byte.
    for out in ["r1.safetensors", "r2.safetensors"] {
        let o = bin()
            .current_dir(&d)
            .args([
                "directions",
                "random",
                "--like",
                "qwen.safetensors",
                "--seed",
                "7",
                "--norm-matched",
                "-o",
                out,
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(
        std::fs::read(d.join("r1.safetensors")).unwrap(),
        std::fs::read(d.join("r2.safetensors")).unwrap()
    );
    let _ = std::fs::remove_dir_all(&d);
}

// ---- researcher interfaces (issue 16: llama.cpp's flag names, --shard slurm, --json,
// completions, one-line clap errors with their suggestions) --------------------------------

/// Runs the binary with `env` set (and every SLURM_* variable of the test's own environment
/// removed); returns (exit code, stdout, stderr).
fn run_env(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut c = bin();
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SLURM_")) {
        c.env_remove(k);
    }
    let o = c.envs(env.iter().copied()).args(args).output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Exit `code` with one stderr line `persona-gate: …` holding every needle.
fn one_line(code: i32, args: &[&str], env: &[(&str, &str)], needles: &[&str]) {
    let (c, _, err) = run_env(args, env);
    assert_eq!(c, Some(code), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    assert!(
        err.starts_with("persona-gate: ") && err.ends_with('\n'),
        "{err}"
    );
    for n in needles {
        assert!(err.contains(n), "{args:?}: {n:?} not in {err}");
    }
}

#[test]
fn shard_slurm_reads_the_job_array() {
    let d = scratch("slurm");
    let spec = d.join("spec.toml");
    std::fs::write(
        &spec,
        "name = \"tiny\"\ngroup_size = 1\n[generation]\nmax_new_tokens = 2\nmin_tokens = 1\n\
         [prompts.eval]\nsource = \"builtin:harmful\"\nrange = [0, 2]\n\
         [[experiment]]\nid = \"E0\"\nprompts = \"eval\"\n",
    )
    .unwrap();
    let (spec, m) = (spec.to_str().unwrap(), common::smol());
    // Checked before the model loads: a missing model is not what is reported.
    let r = ["reproduce", "-m", "missing.gguf", "--shard", "slurm"];
    one_line(
        1,
        &r,
        &[],
        &["--shard slurm needs SLURM_ARRAY_TASK_ID, which is not set"],
    );
    one_line(
        1,
        &r,
        &[("SLURM_ARRAY_TASK_ID", "3"), ("SLURM_ARRAY_TASK_MIN", "1")],
        &["needs SLURM_ARRAY_TASK_COUNT, which is not set"],
    );
    one_line(
        1,
        &r,
        &[
            ("SLURM_ARRAY_TASK_ID", "9"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ],
        &["SLURM_ARRAY_TASK_ID=9, which is not one of"],
    );
    // --array=0-1: task 1 is shard 2/2.
    let out = d.join("run");
    let (c, so, err) = run_env(
        &[
            "reproduce",
            "-m",
            &m,
            "-t",
            "2",
            "-np",
            "2",
            "--spec",
            spec,
            "--shard",
            "slurm",
            "-o",
            out.to_str().unwrap(),
        ],
        &[
            ("SLURM_ARRAY_TASK_ID", "1"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_COUNT", "2"),
        ],
    );
    assert_eq!(c, Some(0), "{err}");
    assert!(so.contains("shard 2/2 ran 1 groups"), "{so}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn clap_errors_keep_their_suggestions_on_one_line() {
    one_line(
        2,
        &["info", "--thread", "2"],
        &[],
        &[
            "unexpected argument '--thread'",
            "tip: a similar argument exists: '--threads'",
        ],
    );
    one_line(
        2,
        &["agreemnt"],
        &[],
        &["tip: a similar subcommand exists: 'agreement'"],
    );
}

#[test]
fn llama_cpp_flags_and_completions_through_the_binary() {
    let m = common::smol();
    let (c, so, err) = run_env(
        &[
            "info",
            "-m",
            &m,
            "-t",
            "2",
            "-c",
            "256",
            "-np",
            "2",
            "-ngl",
            "0",
            "-b",
            "128",
            "-fa",
            "off",
            "-sys",
            "Be terse.",
        ],
        &[],
    );
    assert_eq!(c, Some(0), "{err}");
    assert!(so.contains("for --parallel 2 x --ctx 256"), "{so}");
    assert!(so.contains("Be terse."), "{so}");
    for (shell, want) in [
        ("bash", "--ctx-size"),
        ("zsh", "#compdef persona-gate"),
        ("fish", "complete -c persona-gate"),
    ] {
        let (c, so, err) = run_env(&["completions", shell], &[]);
        assert_eq!(c, Some(0), "{err}");
        assert!(so.contains(want), "{shell}: no {want:?}");
    }
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

/// `--json` of info, inspect, select and agreement: the text's numbers, and the text itself
/// unchanged without the flag.
#[test]
fn json_outputs_hold_the_text_numbers() {
    use persona_gate::directions::{Direction, DirectionFile};
    let d = scratch("json");
    let m = common::smol();
    let text = |args: &[&str]| {
        let (c, so, err) = run_env(args, &[]);
        assert_eq!(c, Some(0), "{args:?}: {err}");
        so
    };
    // info
    let t = text(&["info", "-m", &m, "-t", "2"]);
    let mut a = vec!["info", "-m", &m, "-t", "2", "--json"];
    let j = json(&text(&a));
    assert_eq!(j["n_layer"], 30);
    assert_eq!(j["n_embd"], 576);
    assert!(t.contains(&format!("sha256        {}", j["sha256"].as_str().unwrap())));
    assert!(t.contains(&format!("tokens        {} ", j["example"]["tokens"])));
    assert!(t.contains(&format!("{} chars", j["chat_template"]["chars"])));
    assert_eq!(j["hook_points"]["last"], "resid_post.29");
    a.push("--show-template");
    assert!(json(&text(&a))["chat_template"]["text"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    // inspect: norms to the text's two decimals.
    let rows: Vec<Vec<f32>> = (0..30)
        .map(|l| (0..576).map(|i| ((l * 7 + i) % 11) as f32 * 0.01).collect())
        .collect();
    let meta = [
        ("arch".to_string(), "llama".to_string()),
        ("kind".to_string(), "persona".to_string()),
    ]
    .into();
    let f = d.join("p.safetensors");
    DirectionFile::new(
        vec![Direction {
            name: "persona.x".into(),
            rows,
        }],
        meta,
    )
    .unwrap()
    .save(&f)
    .unwrap();
    let f = f.to_str().unwrap();
    let t = text(&["inspect", f]);
    let j = json(&text(&["inspect", f, "--json"]));
    assert_eq!(j["meta"]["kind"], "persona");
    let dir = &j["directions"][0];
    assert_eq!(
        (dir["name"].as_str(), dir["n_layer"].as_u64()),
        (Some("persona.x"), Some(30))
    );
    let norms: Vec<String> = dir["norms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| format!("{:.2}", x.as_f64().unwrap()))
        .collect();
    assert!(t.contains(&norms.join(" ")), "{t}");
    // select (persona ranking, one layer, one prompt): the CSV's numbers.
    let s = [
        "select", "-m", &m, "-t", "2", "-d", f, "--n", "1", "--layers", "6",
    ];
    let t = text(&s);
    let mut sj = s.to_vec();
    sj.push("--json");
    let j = json(&text(&sj));
    assert_eq!(j["kind"], "persona");
    assert_eq!(j["best_layer"], 6);
    let l = &j["layers"][0];
    let row = format!(
        "6,{},{:.6},{:.6}",
        j["coefficient"].as_f64().unwrap() as f32,
        l["mean_refusal_score"].as_f64().unwrap(),
        l["delta_vs_baseline"].as_f64().unwrap()
    );
    assert!(t.contains(&row), "{row} not in {t}");
    assert!(t.contains(j["verdict"].as_str().unwrap()));
    // agreement on the committed demo run.
    let run = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/results/q05-demo");
    let t = text(&["agreement", run]);
    let j = json(&text(&["agreement", run, "--json"]));
    let rows = j["conditions"].as_array().unwrap();
    assert_eq!(j["n_conditions"].as_u64(), Some(rows.len() as u64));
    assert!(t.contains(&format!(
        "Spearman rho over {} conditions: {:.3}",
        rows.len(),
        j["spearman_rho"].as_f64().unwrap()
    )));
    for r in rows {
        let line = format!(
            "{:.4} {:>12.4}",
            r["a"].as_f64().unwrap(),
            r["b"].as_f64().unwrap()
        );
        assert!(t.contains(&line), "{line} not in {t}");
    }
    assert_eq!(
        (j["a"]["metric"].as_str(), j["b"]["metric"].as_str()),
        (Some("generate"), Some("score"))
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// `bench --json` holds the numbers its tables print (one run, both filled by the same
/// measurement), on the smallest workloads.
#[test]
fn bench_json_matches_its_tables() {
    use persona_gate::studies::bench::{self, BenchConfig, BenchResults, HookConfig, Workload};
    let model = common::load(common::SMOL, 2);
    let cfg = BenchConfig {
        pp: 8,
        npp: 4,
        ntg: 2,
        npl: 2,
        conditions: 1,
        shared: 2,
        repetitions: 1,
    };
    let (mut out, mut res) = (Vec::new(), BenchResults::default());
    bench::report(
        &model,
        &cfg,
        &[Workload::Batched, Workload::Hooks],
        &[HookConfig::AddPerSeq],
        None,
        &mut out,
        &mut res,
    )
    .unwrap();
    let t = String::from_utf8(out).unwrap();
    let b = res.batched.as_ref().unwrap().persona_gate;
    assert!(
        t.contains(&format!(
            "| persona-gate | {:.1} | {:.1} | {:.2} |",
            b.s_pp, b.s_tg, b.t
        )),
        "{t}"
    );
    let hooks = res.hooks.as_ref().unwrap();
    assert_eq!(hooks.len(), 4, "{hooks:?}");
    for h in hooks {
        assert!(t.contains(&format!(
            "| {} | {} | {:.1} |",
            h.hooks, h.test, h.tokens_per_s
        )));
        if let Some(r) = h.ratio_to_no_hooks {
            assert!(
                t.contains(&format!("{:<30} {:<14} {r:.3}", h.hooks, h.test)),
                "{t}"
            );
        }
    }
    assert!(res.grid.is_none() && res.persona.is_none());
    // Through the binary: JSON alone on stdout.
    let (c, so, err) = run_env(
        &[
            "bench",
            "-m",
            &common::smol(),
            "-t",
            "2",
            "-np",
            "2",
            "--workloads",
            "batched",
            "--pp",
            "8",
            "--npp",
            "4",
            "--ntg",
            "2",
            "--npl",
            "2",
            "--shared",
            "2",
            "--repetitions",
            "1",
            "--json",
        ],
        &[],
    );
    assert_eq!(c, Some(0), "{err}");
    let j = json(&so);
    assert!(j["batched"]["persona_gate"]["s_tg"].as_f64().unwrap() > 0.0);
    assert!(j["batched"]["llama_cpp"].is_null() && j["hooks"].is_null());
    assert_eq!(j["config"]["npl"], 2);
}
