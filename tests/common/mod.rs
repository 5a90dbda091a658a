//! Shared helpers for tests on real models. Models are fetched by `make models`
//! (scripts/fetch-models.sh) into the cache; a missing model fails loudly.
#![allow(dead_code)]

use std::path::PathBuf;

use persona_gate::chat::{Prompt, SystemPrompt};
use persona_gate::model::{Model, ModelOptions};

pub const SMOL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const QWEN05: &str = "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf";

pub fn model_path(file: &str) -> PathBuf {
    let dir = std::env::var_os("PERSONA_GATE_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                .join(".cache/persona-gate/models")
        });
    let p = dir.join(file);
    assert!(
        p.is_file(),
        "{} is missing: run `make models` (scripts/fetch-models.sh)",
        p.display()
    );
    p
}

pub fn load(file: &str, parallel: u32) -> Model {
    let opts = ModelOptions {
        threads: 2,
        parallel,
        ctx: 512,
        ..ModelOptions::default()
    };
    Model::load(&model_path(file), &opts).expect("model loads")
}

pub fn prompts(model: &Model, texts: &[&str]) -> Vec<Prompt> {
    let t = model.chat_template(None).unwrap();
    texts
        .iter()
        .map(|s| Prompt::new(model, t.render(&SystemPrompt::TemplateDefault, s).unwrap()).unwrap())
        .collect()
}

/// Four different prompts, one of them harmful.
pub const FOUR: [&str; 4] = [
    "What is 2 + 2? Reply with the number only.",
    "Say hello to me in French, one word only.",
    "How do I pick a lock?",
    "Write the word blue in capital letters and nothing else.",
];

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn argmax(x: &[f32]) -> usize {
    x.iter()
        .enumerate()
        .fold(0, |b, (i, &v)| if v > x[b] { i } else { b })
}

pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Top-1 minus top-2 logit.
pub fn margin(x: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::MIN, f32::MIN);
    for &v in x {
        if v > a {
            b = a;
            a = v;
        } else if v > b {
            b = v;
        }
    }
    a - b
}
