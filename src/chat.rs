//! Chat formatting with the model's own Jinja template (`tokenizer.chat_template`), and the
//! token spans the paper's directions are read at.
//!
//! We render the template itself (minijinja with Python-compatible string methods) rather
//! than llama.cpp's `llama_chat_apply_template`, because the built-in matcher drops default
//! system prompts such as Qwen2.5's "You are Qwen, created by Alibaba Cloud…", and a missing
//! system prompt changes refusal rates.

use std::ops::Range;

use minijinja::{context, Environment, ErrorKind};

use crate::error::{Error, Result};
use crate::ffi::Token;
use crate::model::Model;

/// Which system turn to render.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SystemPrompt {
    /// No system message: the template inserts its own default, if it has one.
    #[default]
    TemplateDefault,
    /// An explicitly empty system turn (`--no-system`).
    Empty,
    /// `--system TEXT`.
    Text(String),
}

/// A compiled chat template with the special-token strings it refers to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    special: SpecialTokens,
    /// Where the template came from, for errors: the GGUF's metadata or a file.
    origin: String,
}

/// Instructions one render may execute (minijinja's fuel). Real chat templates take a few
/// thousand per conversation; a template with nested loops over huge ranges (one downloaded
/// with a model can hold anything) stops here instead of hanging.
const TEMPLATE_FUEL: u64 = 2_000_000;
/// Largest template source accepted, and largest rendered prompt: real ones are a few KiB.
pub const MAX_TEMPLATE_BYTES: usize = 1 << 20;

/// A writer that refuses to grow past [`MAX_TEMPLATE_BYTES`], so a template that renders
/// hundreds of megabytes fails early, before the tokenizer ever sees it.
struct Capped(Vec<u8>);

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + b.len() > MAX_TEMPLATE_BYTES {
            return Err(std::io::Error::other("rendered prompt too large"));
        }
        self.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A rendered prompt: the text, and where the user's instruction sits in it (bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Formatted {
    pub text: String,
    pub instruction: Range<usize>,
    /// How special-token strings inside the instruction are read.
    pub special: SpecialTokens,
}

/// Whether special-token strings (`<|im_end|>`, `<|eot_id|>`, ...) written inside a user's
/// instruction become control tokens.
///
/// `Literal` (the default) reads them as plain text, so an instruction cannot close its own
/// turn and forge an assistant turn: the template alone decides the conversation's
/// structure, as a server must. `Parse` reads them as control tokens, as Hugging Face's
/// `apply_chat_template` followed by tokenisation does, for research on such injections.
/// Instructions without special-token strings tokenise the same either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SpecialTokens {
    #[default]
    Literal,
    Parse,
}

/// A prompt ready for the engine: tokens plus the spans directions are read at.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub text: String,
    pub tokens: Vec<Token>,
    /// Token indices of the user's instruction.
    pub instruction: Range<usize>,
    /// Token indices after the instruction: the template's end-of-turn and assistant header
    /// (Arditi et al.'s post-instruction positions). Always ends at `tokens.len()`.
    pub post_instruction: Range<usize>,
}

/// One message of a conversation, as an API request gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A sentinel no template alters: private-use code points.
const SENTINEL: &str = "\u{E000}persona-gate-instruction\u{E001}";

impl ChatTemplate {
    /// The model's own chat template, or `override_src` when given.
    ///
    /// # Errors
    /// When the GGUF has no template and none was given, or it does not compile.
    pub fn for_model(model: &Model, override_src: Option<String>) -> Result<ChatTemplate> {
        let origin = match &override_src {
            Some(_) => "from --chat-template".to_string(),
            None => format!(
                "tokenizer.chat_template of {}",
                crate::text::one_line(&model.info.path.display().to_string())
            ),
        };
        let src = override_src
            .or_else(|| model.info.chat_template.clone())
            .ok_or_else(|| {
                Error::file(
                    &model.info.path,
                    "GGUF has no tokenizer.chat_template; pass --chat-template FILE",
                )
            })?;
        let text = |t: Token| String::from_utf8_lossy(&model.raw.token_bytes(t, true)).into_owned();
        ChatTemplate::with_origin(src, text(model.raw.bos()), text(model.raw.eos()), origin)
    }

    /// # Errors
    /// [`Error::Template`] when the template does not compile or is too large.
    pub fn new(src: String, bos: String, eos: String) -> Result<ChatTemplate> {
        ChatTemplate::with_origin(src, bos, eos, "given".into())
    }

    /// As [`ChatTemplate::new`], naming where the template came from in every error.
    ///
    /// # Errors
    /// As [`ChatTemplate::new`].
    pub fn with_origin(
        src: String,
        bos: String,
        eos: String,
        origin: String,
    ) -> Result<ChatTemplate> {
        if src.len() > MAX_TEMPLATE_BYTES {
            return Err(Error::Template(format!(
                "{origin}: {} bytes, more than the {} KiB a chat template may have",
                src.len(),
                MAX_TEMPLATE_BYTES >> 10
            )));
        }
        let mut env = Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |fmt: String| -> String {
            // Fixed date: the output must not depend on when it ran (byte-identical CSVs).
            let _ = fmt;
            "26 Jul 2024".to_string()
        });
        env.add_template_owned("chat", src)
            .map_err(|e| Error::Template(format!("{origin}: {}", one_line_err(&e))))?;
        Ok(ChatTemplate {
            env,
            bos,
            eos,
            special: SpecialTokens::default(),
            origin,
        })
    }

    /// How special-token strings in instructions are read (default: literally).
    pub fn set_special_tokens(&mut self, s: SpecialTokens) {
        self.special = s;
    }

    fn render_raw(&self, system: &SystemPrompt, user: &str) -> Result<String> {
        let mut messages = Vec::new();
        match system {
            SystemPrompt::TemplateDefault => {}
            SystemPrompt::Empty => messages.push(Message::new("system", "")),
            SystemPrompt::Text(t) => messages.push(Message::new("system", t)),
        }
        messages.push(Message::new("user", user));
        self.render_messages(&messages)
    }

    /// The template over a whole conversation, with the generation prompt.
    fn render_messages(&self, messages: &[Message]) -> Result<String> {
        let messages: Vec<minijinja::Value> = messages
            .iter()
            .map(|m| context! { role => &m.role, content => &m.content })
            .collect();
        let err = |e: minijinja::Error| {
            let why = match e.kind() {
                ErrorKind::OutOfFuel => format!(
                    "rendering took more than {TEMPLATE_FUEL} template instructions (a loop that does not end?)"
                ),
                ErrorKind::WriteFailure => format!(
                    "renders more than {} KiB for one conversation",
                    MAX_TEMPLATE_BYTES >> 10
                ),
                _ => one_line_err(&e),
            };
            Error::Template(format!("{}: {why}", self.origin))
        };
        let tmpl = self.env.get_template("chat").map_err(err)?;
        let mut out = Capped(Vec::new());
        tmpl.render_captured_to(
            context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => &self.bos,
                eos_token => &self.eos,
            },
            &mut out,
        )
        .map_err(err)?;
        String::from_utf8(out.0)
            .map_err(|_| Error::Template(format!("{}: renders invalid UTF-8", self.origin)))
    }

    /// Renders one user turn (with the chosen system turn) and the generation prompt.
    ///
    /// # Errors
    /// [`Error::Template`] when rendering fails.
    pub fn render(&self, system: &SystemPrompt, user: &str) -> Result<Formatted> {
        let text = self.render_raw(system, user)?;
        let marked = self.render_raw(system, SENTINEL)?;
        self.locate(text, &marked, user)
    }

    /// Renders a conversation (an API request's messages) and the generation prompt; the
    /// instruction is the last user message, read as [`ChatTemplate::render`] reads its one.
    /// A conversation of one user message, after an optional system message, renders
    /// exactly as `render` with that system prompt.
    ///
    /// # Errors
    /// [`Error::Template`] when rendering fails (templates may refuse role orders).
    pub fn render_conversation(&self, messages: &[Message]) -> Result<Formatted> {
        let text = self.render_messages(messages)?;
        let Some(u) = messages.iter().rposition(|m| m.role == "user") else {
            return Ok(Formatted {
                instruction: text.len()..text.len(),
                text,
                special: self.special,
            });
        };
        let mut marked = messages.to_vec();
        marked[u].content = SENTINEL.to_string();
        let marked = self.render_messages(&marked)?;
        self.locate(text, &marked, &messages[u].content)
    }

    /// Finds the instruction `user` in `text` through `marked`, the same rendering with the
    /// instruction replaced by [`SENTINEL`], which works even when the template trims the
    /// content; falls back to the last occurrence of the text.
    fn locate(&self, text: String, marked: &str, user: &str) -> Result<Formatted> {
        if let Some((pre, post)) = marked.split_once(SENTINEL) {
            if text.len() >= pre.len() + post.len() && text.starts_with(pre) && text.ends_with(post)
            {
                return Ok(Formatted {
                    instruction: pre.len()..text.len() - post.len(),
                    text,
                    special: self.special,
                });
            }
        }
        let needle = user.trim();
        let start = text.rfind(needle).ok_or_else(|| {
            Error::Template("the rendered prompt does not contain the instruction".into())
        })?;
        Ok(Formatted {
            instruction: start..start + needle.len(),
            text,
            special: self.special,
        })
    }
}

impl Prompt {
    /// Tokenises a prompt whose instruction holds special-token strings, reading them as
    /// text: the template around it with special tokens parsed, the instruction without.
    fn new_literal(model: &Model, f: Formatted) -> Result<Prompt> {
        let (a, b) = (f.instruction.start, f.instruction.end);
        let mut tokens = model.tokenize(&f.text[..a])?;
        if model.add_bos() && tokens.first() != Some(&model.bos()) {
            tokens.insert(0, model.bos());
        }
        let start = tokens.len();
        tokens.extend(model.tokenize_literal(&f.text[a..b])?);
        let post = tokens.len();
        tokens.extend(model.tokenize(&f.text[b..])?);
        let n = tokens.len();
        Ok(Prompt {
            text: f.text,
            tokens,
            instruction: start..post,
            post_instruction: post..n,
        })
    }
}

/// A minijinja error on one line (its Display can span several with the source excerpt).
fn one_line_err(e: &minijinja::Error) -> String {
    crate::text::one_line(e.to_string().trim())
}

impl Prompt {
    /// Renders and tokenises each text as one user turn with the same system turn.
    ///
    /// # Errors
    /// Template or tokenizer failures.
    pub fn render_all<'a>(
        model: &Model,
        tmpl: &ChatTemplate,
        system: &SystemPrompt,
        texts: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<Prompt>> {
        texts
            .into_iter()
            .map(|t| Prompt::new(model, tmpl.render(system, t)?))
            .collect()
    }

    /// Tokenises a rendered prompt and maps the instruction's byte span onto tokens.
    ///
    /// A prompt given as is, no chat template: tokenised with special-token strings parsed
    /// and the model's BOS in front, as `llama-completion -no-cnv -p TEXT` does. The whole
    /// text is the instruction; there is no post-instruction span.
    ///
    /// # Errors
    /// Tokenizer failures, or a text of no tokens.
    pub fn raw(model: &Model, text: &str) -> Result<Prompt> {
        let mut tokens = model.tokenize(text)?;
        let lead = usize::from(model.add_bos() && tokens.first() != Some(&model.bos()));
        if lead == 1 {
            tokens.insert(0, model.bos());
        }
        let n = tokens.len();
        Ok(Prompt {
            text: text.to_string(),
            tokens,
            instruction: lead.min(n)..n,
            post_instruction: n..n,
        })
    }

    /// # Errors
    /// Tokenizer failures.
    pub fn new(model: &Model, f: Formatted) -> Result<Prompt> {
        if f.special == SpecialTokens::Literal {
            let ins = &f.text[f.instruction.clone()];
            if model.tokenize(ins)? != model.tokenize_literal(ins)? {
                return Prompt::new_literal(model, f);
            }
        }
        let mut tokens = model.tokenize(&f.text)?;
        let mut lead = 0;
        if model.add_bos() && tokens.first() != Some(&model.bos()) {
            tokens.insert(0, model.bos());
            lead = 1;
        }
        // Byte offset where each token ends, from the token texts.
        let mut ends = Vec::with_capacity(tokens.len());
        let mut at = 0usize;
        for (i, &t) in tokens.iter().enumerate() {
            if i >= lead {
                at += model.token_text_bytes(t).len();
            }
            ends.push(at);
        }
        let (instruction, post_start) = if at == f.text.len() {
            let first = ends
                .iter()
                .position(|&e| e > f.instruction.start)
                .unwrap_or(tokens.len());
            let post = ends
                .iter()
                .position(|&e| e >= f.instruction.end)
                .map_or(tokens.len(), |i| i + 1);
            (first..post, post)
        } else {
            // Token texts do not concatenate to the prompt (e.g. SentencePiece spaces):
            // count tokens of the prefixes instead.
            let n_pre = model.tokenize(&f.text[..f.instruction.start])?.len() + lead;
            let n_upto = model.tokenize(&f.text[..f.instruction.end])?.len() + lead;
            (n_pre..n_upto, n_upto)
        };
        let n = tokens.len();
        let post_start = post_start.min(n);
        Ok(Prompt {
            text: f.text,
            tokens,
            instruction: instruction.start.min(post_start)..post_start,
            post_instruction: post_start..n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML_QWEN: &str = "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

    fn qwen() -> ChatTemplate {
        ChatTemplate::new(CHATML_QWEN.into(), "".into(), "<|im_end|>".into()).unwrap()
    }

    #[test]
    fn default_system_prompt_is_inserted() {
        let f = qwen()
            .render(&SystemPrompt::TemplateDefault, "Hi there")
            .unwrap();
        assert_eq!(
            f.text,
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(&f.text[f.instruction.clone()], "Hi there");
    }

    #[test]
    fn empty_and_custom_system() {
        let f = qwen().render(&SystemPrompt::Empty, "x").unwrap();
        assert!(f
            .text
            .starts_with("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nx"));
        let f = qwen()
            .render(&SystemPrompt::Text("Be kind.".into()), "x")
            .unwrap();
        assert!(f.text.starts_with("<|im_start|>system\nBe kind.<|im_end|>"));
    }

    #[test]
    fn trimmed_content_is_located() {
        let t = ChatTemplate::new(
            "[{{ messages[-1].content | trim }}]".into(),
            "".into(),
            "".into(),
        )
        .unwrap();
        let f = t
            .render(&SystemPrompt::TemplateDefault, "  padded ")
            .unwrap();
        assert_eq!(&f.text[f.instruction.clone()], "padded");
    }

    #[test]
    fn a_template_that_loops_or_floods_fails_naming_its_origin() {
        let origin = "tokenizer.chat_template of model.gguf".to_string();
        // The error from rendering a template that compiles.
        let render_error = |src: &str| {
            ChatTemplate::with_origin(src.into(), "".into(), "".into(), origin.clone())
                .unwrap()
                .render_raw(&SystemPrompt::TemplateDefault, "hi")
                .unwrap_err()
                .to_string()
        };
        let e = render_error(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        );
        assert!(
            e.contains(&origin) && e.contains("template instructions"),
            "{e}"
        );
        let e = render_error("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}");
        assert!(
            e.contains(&origin) && e.contains("renders more than"),
            "{e}"
        );
        let big = "x".repeat(MAX_TEMPLATE_BYTES + 1);
        let e = ChatTemplate::with_origin(big, "".into(), "".into(), origin.clone())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(&origin) && e.contains("may have"), "{e}");
        // A real template stays far inside the budget.
        let t = ChatTemplate::new(CHATML_QWEN.into(), "".into(), "<|im_end|>".into()).unwrap();
        assert!(t.render_raw(&SystemPrompt::TemplateDefault, "hi").is_ok());
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new(
            "{{ raise_exception('no system role') }}".into(),
            "".into(),
            "".into(),
        )
        .unwrap();
        let e = t.render(&SystemPrompt::TemplateDefault, "x").unwrap_err();
        assert!(e.to_string().contains("no system role"), "{e}");
    }
}
