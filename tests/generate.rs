//! `generate` steering and sampling on SmolLM2: an `--intervention` add equals the same vector
//! as a llama.cpp control vector, projection and scales resolve as in a spec, and sampled
//! completions depend on their own seed alone (not on the other prompts, --parallel or a
//! rerun).

mod common;

use std::path::Path;

use common::{bin, run_ok, scratch, smol};
use persona_gate::directions::{Direction, DirectionFile};

const N_LAYER: usize = 30;
const N_EMBD: usize = 576;

/// A direction file of seeded Gaussian rows, each of norm `norm`.
fn direction(path: &Path, norm: f32, seed: u64) {
    let mut r = persona_gate::rng::Rng::new(seed);
    let rows = (0..N_LAYER)
        .map(|_| {
            let v: Vec<f32> = (0..N_EMBD).map(|_| r.normal() as f32).collect();
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter().map(|x| x * norm / n).collect()
        })
        .collect();
    let d = Direction {
        name: "d".into(),
        rows,
    };
    DirectionFile::new(vec![d], [("kind".to_string(), "test".to_string())].into())
        .unwrap()
        .save(path)
        .unwrap();
}

/// The completions as JSON objects.
fn generate(args: &[&str]) -> Vec<serde_json::Value> {
    let mut c = bin();
    c.args([
        "generate",
        "-m",
        &smol(),
        "-n",
        "24",
        "-t",
        "2",
        "--format",
        "jsonl",
    ])
    .args(args);
    run_ok(&mut c)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn texts(v: &[serde_json::Value]) -> Vec<String> {
    v.iter()
        .map(|x| x["text"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn an_added_intervention_equals_the_same_control_vector() {
    let d = scratch("add");
    let f = d.join("d.safetensors");
    direction(&f, 1.0, 7);
    let cv = d.join("d.gguf");
    let f = f.to_str().unwrap();
    run_ok(bin().args([
        "export-cvec",
        "-d",
        f,
        "--coefficient",
        "6",
        "--layers",
        "5-9",
        "-o",
        cv.to_str().unwrap(),
    ]));
    let p = ["-p", "Describe a forest.", "-p", "How do I bake bread?"];
    let plain = texts(&generate(&p));
    let iv = format!("op=add direction={f} layers=5-9 coefficient=6");
    let hooked = texts(&generate(&[&p[..], &["--intervention", &iv]].concat()));
    let native = texts(&generate(
        &[&p[..], &["--control-vector", cv.to_str().unwrap()]].concat(),
    ));
    assert_ne!(hooked, plain, "the intervention changed nothing");
    assert_eq!(hooked, native);
    // The same as a TOML inline table, and through a template.
    let t = format!(r#"{{ op = "add", direction = "{f}", layers = "5+5", coefficient = 6.0 }}"#);
    assert_eq!(
        texts(&generate(&[&p[..], &["--steer", &t]].concat())),
        hooked
    );
    // Projecting the direction out is an edit too; an add scaled to the residual norm is
    // another vector than the raw one.
    let pr = format!("op=project direction={f} layers=all");
    assert_eq!(
        generate(&[&p[..], &["--intervention", &pr]].concat()).len(),
        2
    );
    let rs = format!("op=add direction={f} layers=5-9 coefficient=6 scale=resid");
    assert_ne!(
        texts(&generate(&[&p[..], &["--intervention", &rs]].concat())),
        hooked
    );
}

#[test]
fn sampled_completions_depend_on_their_own_seed_alone() {
    let s = ["--temp", "1.0", "--samples", "3", "-s", "11"];
    let a = generate(
        &[
            &s[..],
            &["-p", "Name an animal.", "-p", "Write a line of poetry."],
        ]
        .concat(),
    );
    assert_eq!(a.len(), 6);
    // Alone, one sequence at a time, in the other order: the same texts per (prompt, sample).
    let alone = generate(
        &[
            &s[..],
            &["-p", "Write a line of poetry.", "--parallel", "1"],
        ]
        .concat(),
    );
    assert_eq!(texts(&alone), texts(&a[3..]));
    let swapped = generate(
        &[
            &s[..],
            &["-p", "Write a line of poetry.", "-p", "Name an animal."],
        ]
        .concat(),
    );
    assert_eq!(texts(&swapped[..3]), texts(&a[3..]));
    assert_eq!(texts(&swapped[3..]), texts(&a[..3]));
    // Samples differ from each other and from another seed; seeds are recorded.
    let t = texts(&a);
    assert!(
        t[0] != t[1] || t[1] != t[2],
        "three samples were identical: {t:?}"
    );
    let other = generate(&[
        "--temp",
        "1.0",
        "--samples",
        "3",
        "-s",
        "12",
        "-p",
        "Name an animal.",
    ]);
    assert_ne!(texts(&other), texts(&a[..3]));
    assert!(a.iter().all(|x| x["seed"].is_u64()));
    // Greedy: no seed, and the samples are one completion.
    let g = generate(&["--samples", "2", "-p", "Name an animal."]);
    assert!(g[0]["seed"].is_null());
    assert_eq!(g[0]["text"], g[1]["text"]);
}

#[test]
fn bad_steering_and_sampling_flags_fail_clearly() {
    let d = scratch("bad");
    let f = d.join("d.safetensors");
    direction(&f, 1.0, 1);
    let f = f.to_str().unwrap();
    let m = smol();
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--intervention", &format!("op=add direction={f} layers=30")],
            &["--intervention: intervention 1: layers", "out of range"],
        ),
        (
            &["--intervention", "op=add layers=3"],
            &["needs direction=FILE"],
        ),
        (
            &[
                "--intervention",
                "op=add direction=nope.safetensors layers=3",
            ],
            &["nope.safetensors"],
        ),
        (&["--temp", "-1"], &["--temp"]),
        (&["--temp", "0.5", "--top-p", "0"], &["--top-p"]),
        (&["--samples", "0"], &["--samples"]),
    ];
    for (extra, needles) in cases {
        let mut a = vec!["generate", "-m", &m, "-p", "hi"];
        a.extend_from_slice(extra);
        common::fails(&d, &a, needles);
    }
}
