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
