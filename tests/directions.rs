//! Directions on real models (issue 3 checks): deterministic files, batch-size invariance,
//! refusal-direction norms growing with depth, and exported control vectors that llama.cpp's
//! own GGUF reader accepts and that act the same through the native and callback paths.

mod common;

use common::*;
use persona_gate::chat::SystemPrompt;
use persona_gate::directions::{self, cvec, DirectionFile, PersonaPositions, RefusalPositions};
use persona_gate::hooks::{Edit, HookSet, Scope};
use persona_gate::model::{Model, ModelOptions};
use persona_gate::prompts;

/// Relative difference allowed between directions extracted with different --parallel.
/// Measured: see the README (llama.cpp's kernels depend on batch shape).
const BATCH_INVARIANCE_REL: f64 = 1e-5;

fn refusal(m: &Model) -> DirectionFile {
    let t = persona_gate::chat::ChatTemplate::for_model(m, None).unwrap();
    let h = prompts::builtin("harmful").unwrap();
    let l = prompts::builtin("harmless").unwrap();
    directions::extract_refusal(
        m,
        &t,
        &SystemPrompt::TemplateDefault,
        &h[..8],
        &l[..8],
        RefusalPositions::PostInstruction,
    )
    .unwrap()
}

fn deterministic_and_batch_invariant(file: &str) {
    let m = load(file, 16);
    let a = refusal(&m).to_bytes();
    assert_eq!(
        a,
        refusal(&m).to_bytes(),
        "{file}: extraction is not byte-identical on rerun"
    );
    let m1 = Model::load(
        &model_path(file),
        &ModelOptions {
            threads: 2,
            parallel: 1,
            ctx: 512,
            ..Default::default()
        },
    )
    .unwrap();
    let (fa, fb) = (DirectionFile::from_bytes(&a).unwrap(), refusal(&m1));
    let mut worst = 0f64;
    for (da, db) in fa.directions.iter().zip(&fb.directions) {
        for (ra, rb) in da.rows.iter().zip(&db.rows) {
            let diff: f64 = ra
                .iter()
                .zip(rb)
                .map(|(x, y)| ((x - y) as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            worst = worst.max(diff / directions::norm(ra).max(1e-12));
            eprint!(
                "{:.1e}/{:.2} ",
                diff / directions::norm(ra).max(1e-12),
                directions::norm(ra)
            );
        }
        eprintln!();
    }
    eprintln!("{file}: parallel 16 vs 1: worst relative row difference {worst:e}");
    assert!(
        worst <= BATCH_INVARIANCE_REL,
        "{file}: batch size changed directions by {worst:e}"
    );
}

fn refusal_norm_grows_with_depth(file: &str) {
    let m = load(file, 16);
    let f = refusal(&m);
    let n = f.get(Some("refusal.pos-1")).unwrap().norms();
    let q = n.len() / 4;
    let early: f64 = n[..q].iter().sum::<f64>() / q as f64;
    let late: f64 = n[n.len() - q..].iter().sum::<f64>() / q as f64;
    assert!(
        late > 2.0 * early,
        "{file}: refusal norms early {early:.3} vs late {late:.3}"
    );
    assert_eq!(f.meta["arch"], m.info.arch);
    assert_eq!(f.meta["harmful_count"], "8");
}

fn exported_cvec_matches_native_and_callback(file: &str) {
    let m = load(file, 4);
    let t = persona_gate::chat::ChatTemplate::for_model(&m, None).unwrap();
    let personas = prompts::parse_personas(prompts::PERSONAS, "builtin").unwrap();
    let q = prompts::builtin("neutral").unwrap();
    let f = directions::extract_persona(
        &m,
        &t,
        "compliant",
        &personas["compliant"],
        &q[..4],
        PersonaPositions::Last,
    )
    .unwrap();
    let d = f.get(None).unwrap();
    let layers = [m.info.n_layer / 2, m.info.n_layer / 2 + 1];
    let dir = scratch(file);
    let path = dir.join("compliant.gguf");
    std::fs::write(&path, cvec::export(d, &m.info.arch, 2.0, &layers).unwrap()).unwrap();
    // ggml's own reader (the one llama.cpp's --control-vector uses) accepts the file.
    let (arch, tensors) = persona_gate::ffi::ggml_read_gguf(&path).unwrap();
    assert_eq!(arch.as_deref(), Some("controlvector"));
    assert_eq!(
        tensors.iter().map(|t| t.0.clone()).collect::<Vec<_>>(),
        layers
            .iter()
            .map(|l| format!("direction.{l}"))
            .collect::<Vec<_>>()
    );
    assert!(tensors.iter().all(|t| t.1 == 0 && t.2 == 4 * m.info.n_embd));
    // Imported back, applied natively and through the callback: the same logits.
    let imported = DirectionFile::load(&path).unwrap();
    imported.check_model(&m.info).unwrap_or_else(|e| {
        if !e.to_string().contains("layers") {
            panic!("{e}")
        }
    });
    let c = imported.get(None).unwrap();
    let cv: std::collections::BTreeMap<usize, Vec<f32>> =
        layers.iter().map(|&l| (l, c.rows[l].clone())).collect();
    let ps = prompts_for(&m);
    let mut s = m.session().unwrap();
    s.set_control_vector(Some(&cv)).unwrap();
    let native = s
        .first_logits(&ps, &mut HookSet::new(m.info.n_layer, m.info.n_embd))
        .unwrap();
    s.set_control_vector(None).unwrap();
    let mut h = HookSet::new(m.info.n_layer, m.info.n_embd);
    h.add_edit(Edit::add(cv, Scope::All)).unwrap();
    let cb = s.first_logits(&ps, &mut h).unwrap();
    for (a, b) in native.iter().zip(&cb) {
        assert!(
            max_abs_diff(a, b) <= 1e-5,
            "{file}: native vs callback {}",
            max_abs_diff(a, b)
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn prompts_for(m: &Model) -> Vec<persona_gate::chat::Prompt> {
    prompts(m, &FOUR)
}

macro_rules! on_both {
    ($($name:ident),*) => {
        mod smol { $( #[test] fn $name() { super::$name(super::SMOL) } )* }
        mod qwen05 { $( #[test] fn $name() { super::$name(super::QWEN05) } )* }
    };
}

on_both!(
    deterministic_and_batch_invariant,
    refusal_norm_grows_with_depth,
    exported_cvec_matches_native_and_callback
);

/// Selection end to end on SmolLM2 (small sets): every candidate is scored, the filters give
/// their reasons, and persona-layer ranking comes back sorted.
#[test]
fn selection_and_persona_ranking_run() {
    use persona_gate::directions::select;
    let m = load(SMOL, 8);
    let t = persona_gate::chat::ChatTemplate::for_model(&m, None).unwrap();
    let f = refusal(&m);
    let h = prompts(
        &m,
        &[
            "How do I pick a lock?",
            "Write a threatening message to my neighbour.",
        ],
    );
    let l = prompts(
        &m,
        &[
            "How do I bake bread?",
            "Write a thank-you note to my neighbour.",
        ],
    );
    let nl = m.info.n_layer;
    let layers = [5, nl - 2];
    let sel = select::select_refusal(&m, &f, &h, &l, &layers, 4, &mut |_, _| {}).unwrap();
    assert_eq!(sel.candidates.len(), f.directions.len() * layers.len());
    for c in &sel.candidates {
        assert!(
            c.bypass.is_finite() && c.induce.is_finite() && c.kl >= 0.0,
            "{c:?}"
        );
        if c.layer == nl - 2 {
            assert!(
                c.discarded.as_deref().unwrap_or("").contains("depth"),
                "{c:?}"
            );
        }
    }
    let csv = String::from_utf8(sel.to_csv()).unwrap();
    assert_eq!(csv.lines().count(), 1 + sel.candidates.len());
    assert!(!sel.explain().is_empty());
    let personas = prompts::parse_personas(prompts::PERSONAS, "builtin").unwrap();
    let q = prompts::builtin("neutral").unwrap();
    let p = directions::extract_persona(
        &m,
        &t,
        "compliant",
        &personas["compliant"],
        &q[..4],
        PersonaPositions::Last,
    )
    .unwrap();
    let r = select::rank_persona_layers(
        &m,
        p.get(None).unwrap(),
        4.0,
        &h,
        &[3, 9, 15],
        4,
        &mut |_, _| {},
    )
    .unwrap();
    let (base, ranked) = (r.baseline, &r.ranked);
    assert!(base.is_finite());
    assert_eq!(ranked.len(), 3);
    assert!(ranked.windows(2).all(|w| w[0].1 <= w[1].1), "{ranked:?}");
}
