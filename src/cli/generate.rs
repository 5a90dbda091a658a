//! `persona-gate generate`: completions, each with its refusal label, greedy or sampled,
//! steered by interventions in the spec's grammar and by llama.cpp control vectors.

use std::io::Write;

use clap::{Args, ValueEnum};

use persona_gate::chat::Prompt;
use persona_gate::directions::DirectionFile;
use persona_gate::engine::{sequence_seed, GenConfig, Sampling};
use persona_gate::error::Error;
use persona_gate::experiment::steer::{self, ControlVectors, Given};
use persona_gate::hooks::{HookSet, Scope};
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
    /// Use each prompt as is, without the chat template (special-token strings parsed, BOS
    /// added: llama-completion's -no-cnv -p).
    #[arg(long)]
    pub raw: bool,
    /// New tokens per completion at most (llama.cpp's -n/--n-predict).
    #[arg(long, short = 'n', visible_alias = "n-predict", default_value_t = 64)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub steer: SteerArgs,
    #[command(flatten)]
    pub sample: SampleArgs,
    /// Output: text (a heading per prompt, the label and the completion) or jsonl (one JSON
    /// object per completion: prompt, sample, seed, label, stop, tokens, text).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Jsonl,
}

/// Steering: the spec's interventions and llama.cpp's control vectors, together or alone.
#[derive(Args, Debug, Clone, Default)]
pub struct SteerArgs {
    /// An intervention in the spec's grammar, as key=value words: "op=add|project
    /// direction=FILE [name=NAME] layers=LAYERS [coefficient=C] [scale=raw|resid]
    /// [source=own|LAYER]" (or the same as a TOML inline table). FILE is a direction file;
    /// layers take the spec's layer lists and {n_layer}/{last_layer}. Repeatable; applied in
    /// the order given.
    #[arg(long = "intervention", visible_alias = "steer", value_name = "SPEC")]
    pub interventions: Vec<String>,
    /// llama.cpp control-vector GGUF(s) added at scale 1 (llama.cpp's --control-vector; a
    /// comma-separated list or repeated). Applied by llama.cpp's own control-vector code.
    #[arg(long = "control-vector", value_name = "FILE")]
    pub control_vector: Vec<String>,
    /// Control vector(s) with a scale: FILE:SCALE, comma-separated or repeated (llama.cpp's
    /// --control-vector-scaled). Scaled files are summed.
    #[arg(long = "control-vector-scaled", value_name = "FILE:SCALE")]
    pub control_vector_scaled: Vec<String>,
    /// Layers the control vectors act on, inclusive (llama.cpp's meaning: default 1 to the
    /// last; 0 or less keeps that default).
    #[arg(
        long = "control-vector-layer-range",
        num_args = 2,
        value_names = ["START", "END"],
        allow_negative_numbers = true
    )]
    pub control_vector_layer_range: Option<Vec<i32>>,
}

/// Sampling: off (greedy) unless the temperature is above 0.
#[derive(Args, Debug, Clone)]
pub struct SampleArgs {
    /// Sampling temperature (llama.cpp's --temp); 0 decodes greedily (the default here;
    /// llama.cpp's default is 0.8).
    #[arg(
        long = "temp",
        visible_alias = "temperature",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub temperature: f32,
    /// Keep the K most likely tokens (0: all), when sampling.
    #[arg(long, default_value_t = 40, allow_negative_numbers = true)]
    pub top_k: i32,
    /// Nucleus: keep the most likely tokens up to this probability mass (1: off).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens below this fraction of the most likely one's probability (0: off).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// The token sampler's seed (llama.cpp's -s/--seed; elsewhere in persona-gate --seed
    /// seeds a prompt sample or a random direction, as each command's help says). Each
    /// completion's sampler is seeded from it, the prompt's text and the sample number, so a
    /// completion does not depend on the other prompts or on --parallel.
    #[arg(long, short = 's', default_value_t = 0)]
    pub seed: u64,
    /// Completions per prompt (sampled: each has its own seed; greedy: all the same).
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
}

impl SampleArgs {
    /// The engine's sampling settings, or `None` for greedy decoding.
    ///
    /// # Errors
    /// Values outside their ranges.
    pub fn sampling(&self) -> persona_gate::error::Result<Option<Sampling>> {
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 {
            return Err(Error::flag(
                "--temp",
                Some(t.to_string()),
                "must be 0 or more",
            ));
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::flag_range("--top-p", self.top_p, "above 0", 1));
        }
        if !(self.min_p.is_finite() && (0.0..=1.0).contains(&self.min_p)) {
            return Err(Error::flag_range("--min-p", self.min_p, 0, 1));
        }
        if self.samples == 0 {
            return Err(Error::flag_range("--samples", 0, 1, "any"));
        }
        Ok((t > 0.0).then_some(Sampling {
            temperature: t,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
        }))
    }
}

pub fn run(a: &GenerateArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let sampling = a.sample.sampling()?;
    let cvecs = ControlVectors::from_flags(
        &a.steer.control_vector,
        &a.steer.control_vector_scaled,
        a.steer
            .control_vector_layer_range
            .as_deref()
            .map(|r| (r[0], r[1])),
    )?;
    let model = super::load(&a.model)?;
    let (nl, ne) = (model.info.n_layer, model.info.n_embd);
    let given = a
        .steer
        .interventions
        .iter()
        .enumerate()
        .map(|(i, t)| Given::parse(t, i + 1, nl))
        .collect::<persona_gate::error::Result<Vec<_>>>()?;
    let texts: Vec<String> = if a.prompts.is_empty() {
        prompts::builtin("harmful")?
            .into_iter()
            .map(|i| i.text)
            .collect()
    } else {
        a.prompts.clone()
    };
    let ps = if a.raw {
        texts
            .iter()
            .map(|t| Prompt::raw(&model, t))
            .collect::<persona_gate::error::Result<Vec<_>>>()?
    } else {
        let tmpl = super::template(&model, &a.prompt)?;
        Prompt::render_all(
            &model,
            &tmpl,
            &a.prompt.system(),
            texts.iter().map(String::as_str),
        )?
    };
    let mut session = model.session()?;
    if !cvecs.is_empty() {
        session.set_control_vector(Some(&cvecs.load(nl, ne)?))?;
    }
    let mut hooks = HookSet::new(nl, ne);
    let norms = if given
        .iter()
        .any(|g| g.intervention.scale == persona_gate::experiment::spec::Scale::Resid)
    {
        Some(steer::resid_norms(&mut session, &ps)?)
    } else {
        None
    };
    for (i, g) in given.iter().enumerate() {
        let f = DirectionFile::load_fitted(&g.file, &model.info)?;
        let d = f.get(g.name.as_deref()).map_err(|e| e.in_file(&g.file))?;
        let id = format!("{} {}", steer::INTERVENTION_FLAG, i + 1);
        hooks.add_edit(steer::edit(
            &id,
            i + 1,
            d,
            &g.intervention,
            norms.as_deref(),
            Scope::All,
        )?)?;
    }
    // Every prompt `samples` times, prompt-major; sample k of a prompt is seeded by the
    // prompt's text and k.
    let n = a.sample.samples;
    let batch: Vec<Prompt> = ps
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), n))
        .collect();
    let seeds: Vec<u32> = match sampling {
        None => Vec::new(),
        Some(_) => texts
            .iter()
            .flat_map(|t| {
                (0..n).map(move |k| sequence_seed(a.sample.seed, &format!("{k}\u{1f}{t}")))
            })
            .collect(),
    };
    let cfg = GenConfig {
        max_new_tokens: a.max_new_tokens,
        sampling,
        seeds,
        ..GenConfig::default()
    };
    let g = session.generate(&batch, &cfg, &mut hooks, &mut |_, _| false, &mut |_| {})?;
    let labeler = label::Labeler::default();
    for (j, g) in g.iter().enumerate() {
        let (i, k) = (j / n, j % n);
        let lab = labeler.label(&g.text);
        match a.format {
            Format::Text => {
                let head = if n > 1 {
                    format!("### {} (sample {k})", texts[i])
                } else {
                    format!("### {}", texts[i])
                };
                writeln!(out, "{head}\n[{lab}] {}\n", g.text.trim())?;
            }
            Format::Jsonl => {
                let row = serde_json::json!({
                    "prompt_index": i,
                    "prompt": texts[i],
                    "sample": k,
                    "seed": cfg.seeds.get(j),
                    "label": lab.to_string(),
                    "stop": g.stop.name(),
                    "tokens": g.tokens.len(),
                    "text": g.text,
                });
                writeln!(out, "{row}")?;
            }
        }
    }
    Ok(())
}
