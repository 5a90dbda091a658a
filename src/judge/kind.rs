//! Which judge, and the prompt template it reads: `=== system/user/assistant ===` sections
//! with `{{prompt}}` and `{{response}}` placeholders.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::error::{Error, Named, Result, TemplateProblem};

/// The built-in StrongREJECT rubric template (`src/judge/templates/strongreject.txt`).
pub const STRONGREJECT_TEMPLATE: &str = include_str!("templates/strongreject.txt");
/// The built-in Llama Guard 3 template (`src/judge/templates/llamaguard.txt`).
pub const LLAMAGUARD_TEMPLATE: &str = include_str!("templates/llamaguard.txt");

/// Which judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum JudgeKind {
    /// The StrongREJECT rubric: refused, convincing, specific; score and logit score.
    #[value(name = "strongreject")]
    StrongReject,
    /// Llama-Guard: safe/unsafe, categories, P(unsafe).
    #[value(name = "llamaguard")]
    LlamaGuard,
}

impl JudgeKind {
    pub fn name(self) -> &'static str {
        match self {
            JudgeKind::StrongReject => "strongreject",
            JudgeKind::LlamaGuard => "llamaguard",
        }
    }

    /// The columns this judge adds to `completions.csv`, in order.
    pub fn columns(self) -> &'static [&'static str] {
        match self {
            JudgeKind::StrongReject => &[
                "sr_judge",
                "sr_refused",
                "sr_convincing",
                "sr_specific",
                "sr_score",
                "sr_p_refused",
                "sr_convincing_ev",
                "sr_specific_ev",
                "sr_score_logit",
                "sr_status",
                "sr_answer",
                "leakage",
            ],
            JudgeKind::LlamaGuard => &[
                "lg_judge",
                "lg_unsafe",
                "lg_categories",
                "lg_p_unsafe",
                "lg_status",
                "lg_answer",
            ],
        }
    }

    /// The prefix of this judge's columns in `completions.csv` (`sr_`, `lg_`).
    pub fn prefix(self) -> &'static str {
        match self {
            JudgeKind::StrongReject => "sr",
            JudgeKind::LlamaGuard => "lg",
        }
    }

    /// The built-in template's source.
    pub fn builtin_template(self) -> &'static str {
        match self {
            JudgeKind::StrongReject => STRONGREJECT_TEMPLATE,
            JudgeKind::LlamaGuard => LLAMAGUARD_TEMPLATE,
        }
    }

    /// Tokens generated for the free-text answer.
    pub fn max_new_tokens(self) -> usize {
        match self {
            JudgeKind::StrongReject => 48,
            JudgeKind::LlamaGuard => 24,
        }
    }
}

impl fmt::Display for JudgeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for JudgeKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<JudgeKind> {
        match s.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "strongreject" | "sr" => Ok(JudgeKind::StrongReject),
            "llamaguard" | "lg" => Ok(JudgeKind::LlamaGuard),
            _ => Err(Error::Unknown {
                what: Named::JudgeKind,
                name: Some(s.to_string()),
                known: vec!["strongreject".into(), "llamaguard".into()],
            }),
        }
    }
}

/// A judge prompt template: optional system turn, the user turn with `{{prompt}}` and
/// `{{response}}`, and an assistant prefill.
#[derive(Debug, Clone)]
pub struct Template {
    pub system: Option<String>,
    pub user: String,
    pub assistant: String,
    /// "builtin" or the file it was read from.
    pub source: String,
    /// sha256 of the whole template file.
    pub sha256: String,
}

impl Template {
    pub fn builtin(kind: JudgeKind) -> Template {
        Template::parse(kind.builtin_template(), "builtin").expect("built-in templates parse")
    }

    /// Reads a template file.
    ///
    /// # Errors
    /// Unreadable file, or see [`Template::parse`].
    pub fn load(path: &Path) -> Result<Template> {
        let bytes = crate::fsio::read_input(path, "a judge template")?;
        let src = String::from_utf8(bytes).map_err(|_| Error::file(path, "not UTF-8"))?;
        Template::parse(&src, &path.display().to_string())
    }

    /// Parses sections (`=== system ===`, `=== user ===`, `=== assistant ===`; text before
    /// the first is a comment).
    ///
    /// # Errors
    /// No user section, a repeated or unknown section, or a user turn without both
    /// placeholders.
    pub fn parse(src: &str, origin: &str) -> Result<Template> {
        let err = |problem| Error::JudgeTemplate {
            origin: origin.to_string(),
            problem,
        };
        let mut sections: BTreeMap<String, String> = BTreeMap::new();
        let mut cur: Option<String> = None;
        for line in src.lines() {
            let t = line.trim();
            if let Some(name) = t
                .strip_prefix("===")
                .and_then(|r| r.strip_suffix("==="))
                .map(str::trim)
            {
                if !["system", "user", "assistant"].contains(&name) {
                    return Err(err(TemplateProblem::UnknownSection(name.to_string())));
                }
                if sections.contains_key(name) {
                    return Err(err(TemplateProblem::RepeatedSection(name.to_string())));
                }
                sections.insert(name.to_string(), String::new());
                cur = Some(name.to_string());
                continue;
            }
            if let Some(c) = &cur {
                let s = sections.get_mut(c).expect("current section");
                s.push_str(line);
                s.push('\n');
            }
        }
        let user = sections
            .get("user")
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| err(TemplateProblem::NoUser))?;
        for p in ["prompt", "response"] {
            if !has_placeholder(&user, p) {
                return Err(err(TemplateProblem::NoPlaceholder(p)));
            }
        }
        let system = sections
            .get("system")
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        let assistant = match sections.get("assistant").map(|s| s.trim_end()) {
            Some(s) if !s.trim().is_empty() => format!("{s}\n"),
            _ => String::new(),
        };
        Ok(Template {
            system,
            user,
            assistant,
            source: origin.to_string(),
            sha256: format!("{:x}", Sha256::digest(src.as_bytes())),
        })
    }
}

fn has_placeholder(s: &str, name: &str) -> bool {
    let mut rest = s;
    while let Some(i) = rest.find("{{") {
        let after = &rest[i + 2..];
        match after.find("}}") {
            Some(j) if after[..j].trim() == name => return true,
            _ => rest = after,
        }
    }
    false
}

/// Replaces `{{prompt}}` / `{{response}}` in one pass (substituted text is not re-scanned).
pub fn fill(s: &str, prompt: &str, response: &str) -> String {
    let mut out = String::with_capacity(s.len() + prompt.len() + response.len());
    let mut rest = s;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let val = after.find("}}").and_then(|j| match after[..j].trim() {
            "prompt" => Some((prompt, j)),
            "response" => Some((response, j)),
            _ => None,
        });
        match val {
            Some((v, j)) => {
                out.push_str(v);
                rest = &after[j + 2..];
            }
            None => {
                out.push_str("{{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_templates_parse() {
        for k in [JudgeKind::StrongReject, JudgeKind::LlamaGuard] {
            let t = Template::builtin(k);
            assert!(t.user.contains("{{prompt}}") && t.user.contains("{{response}}"));
            assert_eq!(t.assistant, "");
        }
        assert!(Template::builtin(JudgeKind::StrongReject).system.is_some());
        assert!(Template::builtin(JudgeKind::LlamaGuard)
            .user
            .contains("S14: Code Interpreter Abuse."));
    }

    #[test]
    fn template_errors_and_prefill() {
        let e = |s: &str| Template::parse(s, "t.txt").unwrap_err().to_string();
        assert_eq!(
            e("=== user ===\n{{prompt}}"),
            "judge template t.txt: the user section has no {{response}}"
        );
        assert_eq!(
            e("just text"),
            "judge template t.txt: no '=== user ===' section"
        );
        assert_eq!(
            e("=== user ===\n{{prompt}} {{response}}\n=== users ==="),
            "judge template t.txt: unknown section 'users' (system, user, assistant)"
        );
        let t = Template::parse(
            "comment\n=== user ===\nQ: {{ prompt }}\nA: {{response}}\n=== assistant ===\n#scores\n",
            "t",
        )
        .unwrap();
        assert_eq!(t.assistant, "#scores\n");
        assert_eq!(t.system, None);
        assert_eq!(
            fill(&t.user, "p {{response}}", "r"),
            "Q: p {{response}}\nA: r"
        );
        assert_eq!(fill("{{x}} {{prompt", "p", "r"), "{{x}} {{prompt");
    }

    #[test]
    fn kinds_parse() {
        assert_eq!(
            "strongreject".parse::<JudgeKind>().unwrap(),
            JudgeKind::StrongReject
        );
        assert_eq!(
            "Llama-Guard".parse::<JudgeKind>().unwrap(),
            JudgeKind::LlamaGuard
        );
        assert!("gpt".parse::<JudgeKind>().is_err());
    }
}
