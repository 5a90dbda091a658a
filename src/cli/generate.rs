//! `persona-gate generate`: greedy completions, each with its refusal label.

use std::io::Write;

use clap::Args;

use persona_gate::chat::Prompt;
use persona_gate::engine::GenConfig;
use persona_gate::hooks::HookSet;
use persona_gate::{label, prompts};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: super::ModelArgs,
    #[command(flatten)]
    pub prompt: super::PromptArgs,
    /// Instructions (one per flag); none reads the built-in harmful set.
    #[arg(long = "prompt", short = 'p')]
    pub prompts: Vec<String>,
    /// New tokens per completion at most (llama.cpp's -n/--n-predict).
    #[arg(long, short = 'n', visible_alias = "n-predict", default_value_t = 64)]
    pub max_new_tokens: usize,
}

pub fn run(a: &GenerateArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let model = super::load(&a.model)?;
    let tmpl = super::template(&model, &a.prompt)?;
    let texts: Vec<String> = if a.prompts.is_empty() {
        prompts::builtin("harmful")?
            .into_iter()
            .map(|i| i.text)
            .collect()
    } else {
        a.prompts.clone()
    };
    let ps = Prompt::render_all(
        &model,
        &tmpl,
        &a.prompt.system(),
        texts.iter().map(String::as_str),
    )?;
    let cfg = GenConfig {
        max_new_tokens: a.max_new_tokens,
        keep_first_logits: false,
        ignore_eog: false,
        digest: false,
    };
    let mut h = HookSet::new(model.info.n_layer, model.info.n_embd);
    let g = model
        .session()?
        .generate(&ps, &cfg, &mut h, &mut |_, _| false, &mut |_| {})?;
    let labeler = label::Labeler::default();
    for (t, g) in texts.iter().zip(&g) {
        writeln!(
            out,
            "### {t}\n[{}] {}\n",
            labeler.label(&g.text),
            g.text.trim()
        )?;
    }
    Ok(())
}
