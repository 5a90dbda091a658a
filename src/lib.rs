//! persona-gate: persona and refusal steering on quantized GGUF models through llama.cpp.
//!
//! The pieces, bottom up:
//! - [`ffi`]: the only `unsafe` code — llama.cpp model, context, batch, eval callback,
//!   control vectors — behind a small safe API;
//! - [`gguf`]: a safe reader for GGUF headers, so bad files fail with a precise message;
//! - [`model`]: loading, metadata and a cached sha256;
//! - [`chat`]: the model's own Jinja chat template and the instruction / post-instruction
//!   token spans;
//! - [`hooks`]: hook points (`resid_post.L` = llama.cpp's `l_out-L`) and the capture, add
//!   and project hooks that run there;
//! - [`engine`]: batched evaluation and greedy or sampled generation with hooks, and
//!   continuous serving (requests joining between decode steps);
//! - [`serve`]: the OpenAI-compatible HTTP server, each request with its own steering.
//!
//! ```no_run
//! use persona_gate::{chat::{ChatTemplate, Prompt, SystemPrompt}, engine::GenConfig, hooks::HookSet, model::{Model, ModelOptions}};
//! let model = Model::load("model.gguf".as_ref(), &ModelOptions::default())?;
//! let tmpl = ChatTemplate::for_model(&model, None)?;
//! let p = Prompt::new(&model, tmpl.render(&SystemPrompt::TemplateDefault, "Hello")?)?;
//! let mut hooks = HookSet::new(model.info.n_layer, model.info.n_embd);
//! let mut s = model.session()?;
//! let out = s.generate(&[p], &GenConfig { max_new_tokens: 32, ..GenConfig::default() },
//!                      &mut hooks, &mut |_, _| false, &mut |_| {})?;
//! println!("{}", out[0].text);
//! # Ok::<(), persona_gate::error::Error>(())
//! ```
#![deny(unsafe_code)]

pub mod chat;
pub mod cpu;
pub mod directions;
pub mod engine;
pub mod error;
pub mod experiment;
pub mod ffi;
pub mod fsio;
pub mod gguf;
pub mod hooks;
pub mod html;
pub mod judge;
pub mod label;
pub mod lock;
pub mod memory;
pub mod model;
pub mod plot;
pub mod prompts;
pub mod rng;
pub mod serve;
pub mod stats;
pub mod studies;
pub mod text;

/// This tool's version, written into every output.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The FFI crate that vendors and builds llama.cpp, pinned in Cargo.toml (a test checks the
/// lock file agrees).
pub const FFI_CRATE: &str = "llama-cpp-sys-2 0.1.161";

/// The llama.cpp build we drive, for provenance in every output: ggml's version and commit as
/// the linked library reports them, and the crate that built it.
pub fn llama_cpp() -> String {
    let (version, commit) = ffi::ggml_version();
    format!("ggml {version} (commit {commit}) via {FFI_CRATE}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn provenance_names_the_linked_ggml_and_the_locked_ffi_crate() {
        let lock = include_str!("../Cargo.lock");
        let (name, version) = super::FFI_CRATE.split_once(' ').unwrap();
        let entry = format!("name = \"{name}\"\nversion = \"{version}\"");
        assert!(
            lock.contains(&entry),
            "Cargo.lock does not lock {}",
            super::FFI_CRATE
        );
        let (v, _) = super::ffi::ggml_version();
        assert!(
            v.split('.').count() == 3 && v.split('.').all(|p| p.parse::<u32>().is_ok()),
            "{v}"
        );
        assert!(super::llama_cpp().starts_with(&format!("ggml {v} (commit ")));
    }
}
