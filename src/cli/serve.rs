//! `persona-gate serve`: parse the flags, load the model and directions, hand over to
//! [`persona_gate::serve::run`].

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use persona_gate::chat::{Prompt, SystemPrompt};
use persona_gate::directions::DirectionFile;
use persona_gate::error::Error;
use persona_gate::prompts;
use persona_gate::serve::{self, Config, Named, Served};

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// Directions requests may steer with: a direction file (ours, a control-vector GGUF,
    /// or another tool's with FILE:CONVENTION) whose directions are served under their own
    /// names, or NAME=FILE for a file of one direction, served as NAME. Repeatable.
    #[arg(long = "directions", short = 'd', value_name = "[NAME=]FILE")]
    pub directions: Vec<String>,
    /// Address to listen on (loopback by default: put a proxy in front to serve others).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free one; the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health (also read from
    /// PERSONA_GATE_API_KEY).
    #[arg(long, env = "PERSONA_GATE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The model's id in the API (llama-server's --alias); default: the file's stem.
    #[arg(long)]
    pub alias: Option<String>,
    /// Largest max_tokens a request may ask for; requests without one get this much, or
    /// what is left of the context.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Largest n (choices per request).
    #[arg(long, default_value_t = 16)]
    pub max_n: usize,
    /// Choices that may wait for a free slot; more get 503 with Retry-After.
    #[arg(long, default_value_t = 256)]
    pub queue: usize,
    /// Largest request body, e.g. 1M; larger ones get 413.
    #[arg(long, default_value = "1M", value_parser = persona_gate::memory::parse_size)]
    pub max_body: u64,
    /// Seconds SIGTERM waits for requests in flight before cancelling them.
    #[arg(long, default_value_t = 30.0)]
    pub grace: f64,
    /// Jinja chat template FILE instead of the GGUF's own.
    #[arg(long, visible_alias = "chat-template-file")]
    pub chat_template: Option<PathBuf>,
}

/// Loads the `--directions` files, each direction under its request name.
fn load_directions(
    specs: &[String],
    info: &persona_gate::model::ModelInfo,
) -> anyhow::Result<Vec<Named>> {
    let mut out: Vec<Named> = Vec::new();
    for s in specs {
        let (name, file) = match s.split_once('=') {
            Some((n, f)) if !n.is_empty() && !n.contains(['/', '\\']) => (Some(n), f),
            _ => (None, s.as_str()),
        };
        let path = PathBuf::from(file);
        let f = DirectionFile::load_fitted(&path, info)?;
        if name.is_some() && f.directions.len() != 1 {
            anyhow::bail!(
                "--directions {s}: {} holds {} directions; NAME= renames a file of one (give the file alone to serve them under their own names)",
                path.display(),
                f.directions.len()
            );
        }
        for d in &f.directions {
            let n = name.map_or_else(|| d.name.clone(), str::to_string);
            if let Some(o) = out.iter().find(|o| o.name == n) {
                anyhow::bail!(
                    "--directions: the name '{n}' is in both {} and {}; serve one as NAME=FILE",
                    o.file.display(),
                    path.display()
                );
            }
            out.push(Named {
                name: n,
                file: path.clone(),
                direction: d.clone(),
                meta: f.meta.clone(),
            });
        }
    }
    Ok(out)
}

pub fn run(a: &ServeArgs, _out: &mut dyn Write) -> anyhow::Result<()> {
    if !(a.grace.is_finite() && a.grace >= 0.0) {
        return Err(Error::flag("--grace", Some(a.grace.to_string()), "must be 0 or more").into());
    }
    for (flag, v) in [
        ("--max-tokens", a.max_tokens),
        ("--max-n", a.max_n),
        ("--queue", a.queue),
    ] {
        if v == 0 {
            return Err(Error::flag(flag, Some("0".into()), "must be at least 1").into());
        }
    }
    if a.api_key.as_deref() == Some("") {
        return Err(Error::flag("--api-key", Some(String::new()), "is empty").into());
    }
    // Few clients at a time is the common case here: row-wise invariant kernels generate one
    // sequence at llama.cpp's speed and keep every response independent of the batch.
    let mut opts = a.model.options();
    opts.kernels = a
        .model
        .kernels
        .unwrap_or(persona_gate::model::Kernels::Rowwise);
    let model = persona_gate::model::Model::load(&a.model.model, &opts)?;
    let directions = load_directions(&a.directions, &model.info)?;
    let template = super::template_file(&model, a.chat_template.as_deref())?;
    // `scale = "resid"` is relative to a fixed reference: the built-in harmless prompts.
    let reference: Vec<String> = prompts::builtin("harmless")?
        .into_iter()
        .map(|i| i.text)
        .collect();
    let reference = Prompt::render_all(
        &model,
        &template,
        &SystemPrompt::TemplateDefault,
        reference.iter().map(String::as_str),
    )?;
    let model_sha256 = model.sha256()?;
    let model_id = a.alias.clone().unwrap_or_else(|| {
        a.model
            .model
            .file_stem()
            .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
    });
    let config = Config {
        host: a.host.clone(),
        port: a.port,
        api_key: a.api_key.clone(),
        max_tokens: a.max_tokens,
        max_n: a.max_n,
        queue: a.queue,
        max_body: usize::try_from(a.max_body).unwrap_or(usize::MAX),
        grace: Duration::from_secs_f64(a.grace),
        model_id,
    };
    serve::run(
        Served {
            model,
            template,
            directions,
            reference,
            resid_norms: std::sync::OnceLock::new(),
            model_sha256,
        },
        config,
    )?;
    Ok(())
}
