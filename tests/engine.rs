//! The engine's hook properties on real models (issue 2, checks 6a-6e), on both a llama-arch
//! (SmolLM2-135M Q4_1) and a qwen2-arch (Qwen2.5-Coder-0.5B Q4_K_M) model.

mod common;

use std::collections::BTreeMap;

use common::*;
use persona_gate::chat::Prompt;
use persona_gate::hooks::{Capture, Edit, HookSet, Position, Scope};
use persona_gate::model::Model;
use persona_gate::rng::Rng;

/// Native control vector vs the same vector added from the eval callback (6b).
const CVEC_VS_CALLBACK_TOL: f32 = 1e-5;
/// Batched vs solo first-token logits (6d). With one KV stream per sequence, row-invariant
/// kernels, no one-token prompt chunks and flash attention off, they are bit-identical
/// (measured: 0). Before those choices, with a unified KV cache and llama.cpp's auto flash
/// attention, they differed by up to 1.01 (SmolLM2) and 0.49 (Qwen 0.5B); with llama.cpp's
/// default kernels a generated token's logits move by up to 0.3 with the batch size.
const BATCH_VS_SOLO_TOL: f32 = 0.0;

fn empty(m: &Model) -> HookSet {
    HookSet::new(m.info.n_layer, m.info.n_embd)
}

fn random_vec(seed: u64, n: usize, norm: f32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    let v: Vec<f32> = (0..n).map(|_| r.normal() as f32).collect();
    let s = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / s * norm).collect()
}

fn logits(m: &Model, ps: &[Prompt], h: &mut HookSet) -> Vec<Vec<f32>> {
    m.session().unwrap().first_logits(ps, h).unwrap()
}

/// Mean residual norm at a layer over the prompts' last tokens, to scale test vectors.
fn resid_norm(m: &Model, ps: &[Prompt], layer: usize) -> f32 {
    let mut h = empty(m);
    h.add_capture(Capture::new(
        &[layer],
        Position::LastPrompt,
        vec![Some(0); ps.len()],
        1,
        m.info.n_layer,
        m.info.n_embd,
    ))
    .unwrap();
    logits(m, ps, &mut h);
    let mean = h.captures[0].mean(0, 0, layer).unwrap();
    mean.iter().map(|x| x * x).sum::<f64>().sqrt() as f32
}

fn observe_only_is_bit_identical(file: &str) {
    let m = load(file, 4);
    let ps = prompts(&m, &FOUR);
    let base = logits(&m, &ps, &mut empty(&m));
    let all: Vec<usize> = (0..m.info.n_layer).collect();
    let mut h = empty(&m);
    for pos in [
        Position::LastPrompt,
        Position::PostInstruction,
        Position::PromptMean,
    ] {
        h.add_capture(Capture::new(
            &all,
            pos,
            vec![Some(0); 4],
            8,
            m.info.n_layer,
            m.info.n_embd,
        ))
        .unwrap();
    }
    let hooked = logits(&m, &ps, &mut h);
    for (a, b) in base.iter().zip(&hooked) {
        assert_eq!(bits(a), bits(b), "{file}: observing changed the logits");
    }
    // A zero-scaled add touches every row yet changes nothing.
    let mut h = empty(&m);
    let zero: BTreeMap<usize, Vec<f32>> =
        all.iter().map(|&l| (l, vec![0.0; m.info.n_embd])).collect();
    h.add_edit(Edit::add(zero, Scope::All)).unwrap();
    let hooked = logits(&m, &ps, &mut h);
    assert!(h.edits[0].touched() > 0);
    for (a, b) in base.iter().zip(&hooked) {
        assert_eq!(bits(a), bits(b), "{file}: adding 0·v changed the logits");
    }
}

fn callback_add_equals_native_cvec(file: &str) {
    let m = load(file, 4);
    let ps = prompts(&m, &FOUR);
    let l = m.info.n_layer / 2;
    let v = random_vec(7, m.info.n_embd, 0.5 * resid_norm(&m, &ps, l));
    let mut s = m.session().unwrap();
    let base = s.first_logits(&ps, &mut empty(&m)).unwrap();
    s.set_control_vector(Some(&[(l, v.clone())].into()))
        .unwrap();
    let native = s.first_logits(&ps, &mut empty(&m)).unwrap();
    s.set_control_vector(None).unwrap();
    let mut h = empty(&m);
    h.add_edit(Edit::add([(l, v)].into(), Scope::All)).unwrap();
    let cb = s.first_logits(&ps, &mut h).unwrap();
    for i in 0..ps.len() {
        let d = max_abs_diff(&native[i], &cb[i]);
        assert!(
            d <= CVEC_VS_CALLBACK_TOL,
            "{file}: prompt {i}: native vs callback differ by {d}"
        );
        assert!(
            max_abs_diff(&base[i], &native[i]) > 1e-2,
            "{file}: the control vector had no effect"
        );
    }
}

fn projection_removes_the_direction(file: &str) {
    let m = load(file, 4);
    let ps = prompts(&m, &FOUR);
    let (nl, ne) = (m.info.n_layer, m.info.n_embd);
    let window: Vec<usize> = (nl / 2..nl / 2 + 4).collect();
    // The direction: the mean residual itself at each layer, so there is much to remove.
    let mut h = empty(&m);
    h.add_capture(Capture::new(
        &window,
        Position::PromptMean,
        vec![Some(0); 4],
        1,
        nl,
        ne,
    ))
    .unwrap();
    let base = logits(&m, &ps, &mut h);
    let dirs: BTreeMap<usize, Vec<f32>> = window
        .iter()
        .map(|&l| {
            (
                l,
                h.captures[0]
                    .mean(0, 0, l)
                    .unwrap()
                    .iter()
                    .map(|&x| x as f32)
                    .collect(),
            )
        })
        .collect();
    let units: BTreeMap<usize, Vec<f64>> = dirs
        .iter()
        .map(|(&l, d)| {
            let n = d.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
            (l, d.iter().map(|&x| x as f64 / n).collect())
        })
        .collect();
    let mut h = empty(&m);
    h.add_edit(Edit::project(dirs, Scope::All).unwrap())
        .unwrap();
    // One group per prompt: each post-instruction slot is then a single row.
    let per_seq: Vec<Option<usize>> = (0..4).map(Some).collect();
    h.add_capture(Capture::new(
        &window,
        Position::PostInstruction,
        per_seq,
        5,
        nl,
        ne,
    ))
    .unwrap();
    let projected = logits(&m, &ps, &mut h);
    let c = &h.captures[0];
    let mut checked = 0;
    for &l in &window {
        for g in 0..4 {
            for slot in 0..5 {
                if c.count(g, slot, l) != 1 {
                    continue;
                }
                let row = c.sum(g, slot, l);
                let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
                let dot: f64 = row.iter().zip(&units[&l]).map(|(a, b)| a * b).sum();
                assert!(
                    dot.abs() <= 1e-4 * norm,
                    "{file}: layer {l}, seq {g}, slot {slot}: |h·d| = {dot}, |h| = {norm}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 4 * 4 * 4, "{file}: only {checked} rows checked");
    assert!(
        base.iter()
            .zip(&projected)
            .any(|(a, b)| max_abs_diff(a, b) > 1e-2),
        "{file}: projection changed nothing"
    );
}

/// Prompts with a clear first token for each model (solo top-1 margin 1.7-4.8 logits,
/// measured), since batched-vs-solo noise can flip near ties.
fn clear_prompts(file: &str) -> [&'static str; 4] {
    let common = ["Hi!", "Explain photosynthesis in one sentence."];
    if file == SMOL {
        [
            common[0],
            common[1],
            "Who wrote Romeo and Juliet?",
            "Write a Python function that adds two numbers.",
        ]
    } else {
        [
            common[0],
            common[1],
            "What is the capital of France?",
            "What is 2 + 2? Reply with the number only.",
        ]
    }
}

fn batch_matches_solo(file: &str) {
    let m = load(file, 4);
    let ps = prompts(&m, &clear_prompts(file));
    let l = m.info.n_layer / 2;
    let v = random_vec(11, m.info.n_embd, 0.3 * resid_norm(&m, &ps, l));
    let hooked = || {
        let mut h = empty(&m);
        h.add_edit(Edit::add([(l, v.clone())].into(), Scope::All))
            .unwrap();
        h
    };
    for (name, mk) in [
        (
            "no hooks",
            Box::new(|| empty(&m)) as Box<dyn Fn() -> HookSet>,
        ),
        ("add hook", Box::new(hooked)),
    ] {
        let batch = logits(&m, &ps, &mut mk());
        let again = logits(&m, &ps, &mut mk());
        let mut worst = 0f32;
        for i in 0..ps.len() {
            assert_eq!(
                bits(&batch[i]),
                bits(&again[i]),
                "{file} {name}: same batch twice differs"
            );
            let solo = logits(&m, &ps[i..=i], &mut mk());
            eprintln!(
                "{file} {name} prompt {i}: margin {} diff {}",
                margin(&solo[0]),
                max_abs_diff(&solo[0], &batch[i])
            );
            assert_eq!(
                argmax(&solo[0]),
                argmax(&batch[i]),
                "{file} {name}: prompt {i} argmax differs batched vs solo"
            );
            worst = worst.max(max_abs_diff(&solo[0], &batch[i]));
        }
        eprintln!("{file} {name}: max |batched - solo| logit = {worst}");
        assert!(
            worst <= BATCH_VS_SOLO_TOL,
            "{file} {name}: batched vs solo differ by {worst}"
        );
    }
    // Greedy generation: each prompt's text batched equals its text alone.
    let cfg = persona_gate::engine::GenConfig {
        max_new_tokens: 24,
        keep_first_logits: false,
        ignore_eog: false,
        digest: false,
        ..persona_gate::engine::GenConfig::default()
    };
    let mut s = m.session().unwrap();
    let batched = s
        .generate(&ps, &cfg, &mut empty(&m), &mut |_, _| false, &mut |_| {})
        .unwrap();
    for (i, b) in batched.iter().enumerate() {
        let solo = s
            .generate(
                &ps[i..=i],
                &cfg,
                &mut empty(&m),
                &mut |_, _| false,
                &mut |_| {},
            )
            .unwrap();
        assert_eq!(
            solo[0].tokens, b.tokens,
            "{file}: prompt {i} generates differently batched"
        );
    }
    // Early stop at different steps (prompt i after 2 + 3i tokens): the finished sequences
    // become padding at their next free position while the others go on. (A gap in a
    // padding sequence's positions once made llama_decode reject the batch.)
    let mut stop = |i: usize, t: &[persona_gate::ffi::Token]| t.len() >= 2 + 3 * (i % 4);
    let batched = s
        .generate(&ps, &cfg, &mut empty(&m), &mut stop, &mut |_| {})
        .unwrap();
    for (i, b) in batched.iter().enumerate() {
        let mut solo_stop = |_: usize, t: &[persona_gate::ffi::Token]| t.len() >= 2 + 3 * i;
        let solo = s
            .generate(
                &ps[i..=i],
                &cfg,
                &mut empty(&m),
                &mut solo_stop,
                &mut |_| {},
            )
            .unwrap();
        assert_eq!(
            solo[0].tokens, b.tokens,
            "{file}: prompt {i} with early stop"
        );
    }
}

fn per_sequence_hook_touches_only_its_sequence(file: &str) {
    let m = load(file, 4);
    let ps = prompts(&m, &FOUR);
    let l = m.info.n_layer / 3;
    let v = random_vec(3, m.info.n_embd, 0.5 * resid_norm(&m, &ps, l));
    let base = logits(&m, &ps, &mut empty(&m));
    let mut h = empty(&m);
    h.add_edit(Edit::add([(l, v)].into(), Scope::only(vec![1])))
        .unwrap();
    let steered = logits(&m, &ps, &mut h);
    for i in 0..4 {
        if i == 1 {
            assert!(
                max_abs_diff(&base[i], &steered[i]) > 1e-2,
                "{file}: the scoped hook did nothing to its sequence"
            );
        } else {
            assert_eq!(
                bits(&base[i]),
                bits(&steered[i]),
                "{file}: sequence {i} changed by a hook scoped to 1"
            );
        }
    }
    // Generation too: only sequence 1's text may change.
    let cfg = persona_gate::engine::GenConfig {
        max_new_tokens: 12,
        keep_first_logits: false,
        ignore_eog: false,
        digest: false,
        ..persona_gate::engine::GenConfig::default()
    };
    let mut s = m.session().unwrap();
    let g0 = s
        .generate(&ps, &cfg, &mut empty(&m), &mut |_, _| false, &mut |_| {})
        .unwrap();
    let mut h = empty(&m);
    h.add_edit(Edit::add(
        [(l, random_vec(3, m.info.n_embd, 0.0))].into(),
        Scope::only(vec![1]),
    ))
    .unwrap();
    let g1 = s
        .generate(&ps, &cfg, &mut h, &mut |_, _| false, &mut |_| {})
        .unwrap();
    for i in [0, 2, 3] {
        assert_eq!(
            g0[i].tokens, g1[i].tokens,
            "{file}: sequence {i} text changed"
        );
    }
}

/// Prompts of different lengths behind the template's shared system prompt, so a schedule
/// has shared prefixes, staircase prefill calls, refills and slot moves to get wrong.
const SEVEN: [&str; 7] = [
    "Hi!",
    "Explain photosynthesis in one sentence.",
    "What is the capital of France?",
    "Write a haiku about the sea, then explain its imagery line by line.",
    "How do I pick a lock?",
    "List three prime numbers.",
    "Describe, step by step and in detail, how a bicycle gear system works and why it helps.",
];

struct Run {
    digest: Vec<u64>,
    tokens: Vec<Vec<i32>>,
    /// Per prompt and layer, the bits of the captured prompt-mean row.
    means: Vec<Vec<Vec<u64>>>,
    shared: u64,
}

/// Generates SEVEN (in `order`) with `parallel` slots, an add hook scoped to two prompts, a
/// per-prompt capture and early stops at different steps.
fn run_schedule(file: &str, parallel: u32, order: &[usize], share: bool) -> Run {
    let m = load(file, parallel);
    let texts: Vec<&str> = order.iter().map(|&i| SEVEN[i]).collect();
    let ps = prompts(&m, &texts);
    let (nl, ne) = (m.info.n_layer, m.info.n_embd);
    let l = nl / 2;
    // Scaled by the norm over all seven prompts, so the vector is the same in every run.
    let v = random_vec(5, ne, 0.4 * resid_norm(&m, &prompts(&m, &SEVEN), l));
    let mut h = empty(&m);
    let scoped: Vec<usize> = (0..order.len())
        .filter(|&k| order[k] == 1 || order[k] == 4)
        .collect();
    if !scoped.is_empty() {
        h.add_edit(Edit::add([(l, v)].into(), Scope::only(scoped)))
            .unwrap();
    }
    let layers = [1, l, nl - 1];
    h.add_capture(Capture::new(
        &layers,
        Position::PromptMean,
        (0..order.len()).map(Some).collect(),
        1,
        nl,
        ne,
    ))
    .unwrap();
    let cfg = persona_gate::engine::GenConfig {
        max_new_tokens: 14,
        keep_first_logits: true,
        digest: true,
        ..Default::default()
    };
    let mut s = m.session().unwrap();
    s.set_prefix_sharing(share);
    let mut stop = |k: usize, t: &[persona_gate::ffi::Token]| t.len() >= 3 + 2 * order[k];
    let g = s
        .generate(&ps, &cfg, &mut h, &mut stop, &mut |_| {})
        .unwrap();
    let mut run = Run {
        digest: vec![0; 7],
        tokens: vec![vec![]; 7],
        means: vec![vec![]; 7],
        shared: s.stats.shared_tokens,
    };
    for (k, &i) in order.iter().enumerate() {
        run.digest[i] = g[k].digest;
        run.tokens[i] = g[k].tokens.clone();
        run.means[i] = layers
            .iter()
            .map(|&l| {
                h.captures[0]
                    .mean(k, 0, l)
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            })
            .collect();
    }
    run
}

/// Batch invariance over whole trajectories (issue 12): every prompt's logits at every step
/// (chained in a digest), its tokens and its captured activations are bit-identical alone,
/// with 2, 3 and 16 slots (refills, slot moves), in reverse order, and with shared-prefix
/// decoding off.
fn schedules_are_bit_identical(file: &str) {
    let fwd: Vec<usize> = (0..7).collect();
    let rev: Vec<usize> = (0..7).rev().collect();
    let base = run_schedule(file, 16, &fwd, true);
    assert!(base.shared > 0, "{file}: no prefix was shared");
    let mut runs = vec![
        ("3 slots", run_schedule(file, 3, &fwd, true)),
        ("2 slots, reversed", run_schedule(file, 2, &rev, true)),
        ("16 slots, no sharing", run_schedule(file, 16, &fwd, false)),
    ];
    for i in 0..7 {
        runs.push((
            [
                "alone 0", "alone 1", "alone 2", "alone 3", "alone 4", "alone 5", "alone 6",
            ][i],
            run_schedule(file, 1, &[i], true),
        ));
    }
    for (name, r) in &runs {
        for i in 0..7 {
            if r.tokens[i].is_empty() && r.digest[i] == 0 {
                continue; // not in this run
            }
            assert_eq!(
                r.tokens[i], base.tokens[i],
                "{file} {name}: prompt {i} tokens"
            );
            assert_eq!(
                r.digest[i], base.digest[i],
                "{file} {name}: prompt {i} logits"
            );
            assert_eq!(
                r.means[i], base.means[i],
                "{file} {name}: prompt {i} capture"
            );
        }
    }
}

/// The thread count changes nothing either (a run resumed with another --threads is the
/// same run): every prompt's whole logit trajectory with 1 and 2 threads.
fn threads_do_not_change_results(file: &str) {
    let mut digests = vec![];
    for t in [1, 2] {
        let m = persona_gate::model::Model::load(
            &model_path(file),
            &persona_gate::model::ModelOptions {
                threads: t,
                parallel: 4,
                ctx: 512,
                ..Default::default()
            },
        )
        .unwrap();
        let ps = prompts(&m, &FOUR);
        let cfg = persona_gate::engine::GenConfig {
            max_new_tokens: 8,
            digest: true,
            ..Default::default()
        };
        let g = m
            .session()
            .unwrap()
            .generate(&ps, &cfg, &mut empty(&m), &mut |_, _| false, &mut |_| {})
            .unwrap();
        digests.push(g.iter().map(|g| g.digest).collect::<Vec<_>>());
    }
    assert_eq!(digests[0], digests[1], "{file}: 1 vs 2 threads");
}

/// One prompt's result as bits: first logits, trajectory digest, tokens, capture per layer.
type Seen = (Vec<u32>, u64, Vec<i32>, Vec<Vec<u64>>);

/// Prompts of many clusters (five system prompts x four questions, so more clusters than a
/// two-slot session has prefix streams and streams are freed and reused), prompt-only and
/// generating: first logits, whole trajectories and prompt-mean captures are the same bits
/// with 2 or 16 slots (windows of two clusters or one window of all five), without prefix
/// sharing, and for a prompt alone.
fn clusters_are_bit_identical(file: &str) {
    const SYSTEMS: [&str; 5] = [
        "You are a helpful assistant.",
        "You are a pirate. Answer every question in a pirate's voice, with nautical words.",
        "You are terse.",
        "You are a careful scientist who explains the reasoning behind every answer you give.",
        "Answer as a poet would.",
    ];
    let run = |parallel: u32, share: bool, max_new: usize, only: Option<usize>| {
        let m = load(file, parallel);
        let t = persona_gate::chat::ChatTemplate::for_model(&m, None).unwrap();
        let mut ps = vec![];
        for sys in SYSTEMS {
            for q in FOUR {
                let f = t
                    .render(&persona_gate::chat::SystemPrompt::Text(sys.into()), q)
                    .unwrap();
                ps.push(Prompt::new(&m, f).unwrap());
            }
        }
        if let Some(i) = only {
            ps = vec![ps[i].clone()];
        }
        let (nl, ne) = (m.info.n_layer, m.info.n_embd);
        let layers = [0, nl / 2, nl - 1];
        let mut h = empty(&m);
        h.add_capture(Capture::new(
            &layers,
            Position::PromptMean,
            (0..ps.len()).map(Some).collect(),
            1,
            nl,
            ne,
        ))
        .unwrap();
        let cfg = persona_gate::engine::GenConfig {
            max_new_tokens: max_new,
            keep_first_logits: true,
            digest: true,
            ..Default::default()
        };
        let mut s = m.session().unwrap();
        s.set_prefix_sharing(share);
        let g = s
            .generate(&ps, &cfg, &mut h, &mut |_, _| false, &mut |_| {})
            .unwrap();
        let out: Vec<Seen> = g
            .iter()
            .enumerate()
            .map(|(k, g)| {
                let first = g.first_logits.as_ref().unwrap();
                let means = layers
                    .iter()
                    .map(|&l| {
                        let v = h.captures[0].mean(k, 0, l).unwrap();
                        v.iter().map(|x| x.to_bits()).collect()
                    })
                    .collect();
                (
                    first.iter().map(|x| x.to_bits()).collect(),
                    g.digest,
                    g.tokens.clone(),
                    means,
                )
            })
            .collect();
        (out, s.stats.shared_tokens)
    };
    for max_new in [0, 6] {
        let (base, shared) = run(16, true, max_new, None);
        assert!(shared > 0, "{file}: no prefix was shared");
        let (two, shared2) = run(2, true, max_new, None);
        assert!(shared2 > 0, "{file}: no prefix was shared with two slots");
        let (none, _) = run(16, false, max_new, None);
        assert_eq!(two, base, "{file}: 2 slots vs 16, max_new {max_new}");
        assert_eq!(
            none, base,
            "{file}: no sharing vs sharing, max_new {max_new}"
        );
        for i in [5, 18] {
            let (alone, _) = run(1, true, max_new, Some(i));
            assert_eq!(
                alone[0], base[i],
                "{file}: prompt {i} alone, max_new {max_new}"
            );
        }
    }
}

macro_rules! on_both {
    ($($name:ident),*) => {
        mod smol { $( #[test] fn $name() { super::$name(super::SMOL) } )* }
        mod qwen05 { $( #[test] fn $name() { super::$name(super::QWEN05) } )* }
    };
}

on_both!(
    observe_only_is_bit_identical,
    callback_add_equals_native_cvec,
    projection_removes_the_direction,
    batch_matches_solo,
    per_sequence_hook_touches_only_its_sequence,
    schedules_are_bit_identical,
    clusters_are_bit_identical,
    threads_do_not_change_results
);

/// `--kernels rowwise` is row-invariant too: the batch-versus-solo and schedule tests, rerun
/// in a child process of this binary that loads every model with those kernels (ggml reads
/// its kernel switches once per process).
#[test]
fn rowwise_kernels_are_row_invariant_too() {
    if std::env::var_os("PERSONA_GATE_TEST_KERNELS").is_some() {
        return; // the child itself
    }
    let tests = [
        "the_child_runs_the_kernels_asked_for",
        "smol::batch_matches_solo",
        "qwen05::batch_matches_solo",
        "smol::schedules_are_bit_identical",
        "qwen05::schedules_are_bit_identical",
        "qwen05::clusters_are_bit_identical",
        "qwen05::per_sequence_hook_touches_only_its_sequence",
    ];
    let o = std::process::Command::new(std::env::current_exe().unwrap())
        .args(tests)
        .args(["--exact", "--test-threads=1"])
        .env("PERSONA_GATE_TEST_KERNELS", "rowwise")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains(&format!("test result: ok. {} passed", tests.len())),
        "{out}"
    );
}

/// In the child of the test above: its models really were loaded with row-wise kernels
/// (ggml's tiled kernel switched off); elsewhere, the default forces it on.
#[test]
fn the_child_runs_the_kernels_asked_for() {
    let _m = load(SMOL, 1);
    let want = match std::env::var("PERSONA_GATE_TEST_KERNELS").as_deref() {
        Ok("rowwise") => Some("0"),
        Ok("llama") => None,
        _ => Some("1"),
    };
    assert_eq!(std::env::var("GGML_CPU_TILED_MM").ok().as_deref(), want);
}
