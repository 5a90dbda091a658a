//! `persona-gate info`: a model's metadata, memory estimate, chat template and hook coverage.

use std::io::Write;

use clap::Args;

use persona_gate::chat::{ChatTemplate, Prompt};
use persona_gate::hooks::{HookPoint, HookSet};
use persona_gate::model::Model;
use persona_gate::{cpu, ffi, memory, text};

#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: super::ModelArgs,
    #[command(flatten)]
    pub prompt: super::PromptArgs,
    /// Print the whole chat template.
    #[arg(long)]
    pub show_template: bool,
    /// Print the same facts as JSON (sizes in bytes; the template's text with
    /// --show-template).
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &InfoArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let model = Model::load_with(&a.model.model, &a.model.options(), false)?;
    let tmpl = super::template(&model, &a.prompt)?;
    if a.json {
        return json(a, &model, &tmpl, out);
    }
    writeln!(out, "{}", model.info)?;
    let o = &model.options;
    let need = model.footprint.need(o.ctx, o.batch, o.parallel);
    writeln!(
        out,
        "memory        about {} for --parallel {} x --ctx {} ({} available: {})",
        memory::gib(need),
        o.parallel,
        o.ctx,
        model
            .budget
            .as_ref()
            .map_or("unknown".into(), |b| memory::gib(b.bytes)),
        model
            .budget
            .as_ref()
            .map_or("not readable here", |b| b.source.as_str()),
    )?;
    writeln!(
        out,
        "build         {}, kernels {}",
        cpu::built_for(),
        o.kernels.name()
    )?;
    writeln!(out, "sha256        {}", model.sha256()?)?;
    let src = model.info.chat_template.as_deref().unwrap_or("");
    writeln!(
        out,
        "chat_template {} chars{}",
        src.len(),
        if a.show_template {
            ""
        } else {
            " (--show-template prints it)"
        }
    )?;
    if a.show_template {
        writeln!(out, "{}", text::printable(src))?;
    }
    let f = tmpl.render(&a.prompt.system(), "Hello!")?;
    let p = Prompt::new(&model, f)?;
    writeln!(out, "example       {:?}", p.text)?;
    writeln!(
        out,
        "tokens        {} (instruction {:?}, post-instruction {:?})",
        p.tokens.len(),
        p.instruction,
        p.post_instruction
    )?;
    // The first decode checks that every layer exposes l_out-<il>.
    let mut h = HookSet::new(model.info.n_layer, model.info.n_embd);
    model
        .session()?
        .first_logits(std::slice::from_ref(&p), &mut h)?;
    writeln!(
        out,
        "hook points   {}-{} (l_out-<il> present in every layer)",
        HookPoint::resid_post(0),
        model.info.n_layer - 1
    )?;
    writeln!(out, "llama.cpp     {}", persona_gate::llama_cpp())?;
    writeln!(out, "system        {}", ffi::system_info().trim())?;
    Ok(())
}

/// `info --json`: what the text prints, as one object.
fn json(
    a: &InfoArgs,
    model: &Model,
    tmpl: &ChatTemplate,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let i = &model.info;
    let o = &model.options;
    let src = i.chat_template.as_deref().unwrap_or("");
    let f = tmpl.render(&a.prompt.system(), "Hello!")?;
    let p = Prompt::new(model, f)?;
    let mut h = HookSet::new(i.n_layer, i.n_embd);
    model
        .session()?
        .first_logits(std::slice::from_ref(&p), &mut h)?;
    let v = serde_json::json!({
        "path": i.path,
        "name": i.name,
        "arch": i.arch,
        "description": i.desc,
        "n_layer": i.n_layer,
        "n_embd": i.n_embd,
        "n_vocab": i.n_vocab,
        "file_type": i.file_type,
        "file_size": i.file_size,
        "memory": {
            "need_bytes": model.footprint.need(o.ctx, o.batch, o.parallel),
            "parallel": o.parallel,
            "ctx": o.ctx,
            "available_bytes": model.budget.as_ref().map(|b| b.bytes),
            "available_source": model.budget.as_ref().map(|b| b.source.as_str()),
        },
        "build": cpu::built_for(),
        "kernels": o.kernels.name(),
        "sha256": model.sha256()?,
        "chat_template": {
            "chars": src.len(),
            "text": a.show_template.then_some(src),
        },
        "example": {
            "text": p.text,
            "tokens": p.tokens.len(),
            "instruction": [p.instruction.start, p.instruction.end],
            "post_instruction": [p.post_instruction.start, p.post_instruction.end],
        },
        "hook_points": {
            "first": HookPoint::resid_post(0).to_string(),
            "last": HookPoint::resid_post(i.n_layer - 1).to_string(),
        },
        "llama_cpp": persona_gate::llama_cpp(),
        "system": ffi::system_info().trim(),
    });
    super::print_json(out, &v)
}
