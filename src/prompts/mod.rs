//! Prompt sets: the built-in sets written for this project, and personas.
//!
//! The built-in sets are small on purpose (16 each) so the default run needs no files; the
//! harmful set is written in the style of AdvBench/StrongREJECT requests, and the harmless
//! set mirrors it sentence by sentence with benign tasks, so the two differ in harm, not in
//! form.

pub mod load;

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::{Error, Named, Result};

/// One instruction with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    pub id: String,
    pub text: String,
    pub category: Option<String>,
    pub source: Option<String>,
}

const HARMFUL: &str = include_str!("builtin/harmful.txt");
const HARMLESS: &str = include_str!("builtin/harmless.txt");
const NEUTRAL: &str = include_str!("builtin/neutral.txt");
const HARMFUL_TRAIN: &str = include_str!("builtin/harmful_train.txt");
const HARMLESS_TRAIN: &str = include_str!("builtin/harmless_train.txt");
/// The built-in personas file (editable copy: `src/prompts/builtin/personas.toml`).
pub const PERSONAS: &str = include_str!("builtin/personas.toml");

/// A built-in set by name: `harmful`, `harmless`, `neutral`, or the disjoint
/// `harmful_train` / `harmless_train` (24 each) for extracting and selecting directions.
///
/// # Errors
/// An unknown name.
pub fn builtin(name: &str) -> Result<Vec<Instruction>> {
    const SETS: [(&str, &str); 5] = [
        ("harmful", HARMFUL),
        ("harmless", HARMLESS),
        ("neutral", NEUTRAL),
        ("harmful_train", HARMFUL_TRAIN),
        ("harmless_train", HARMLESS_TRAIN),
    ];
    let Some(&(_, src)) = SETS.iter().find(|(n, _)| *n == name) else {
        return Err(Error::Unknown {
            what: Named::PromptSet,
            name: Some(name.to_string()),
            known: SETS.iter().map(|(n, _)| n.to_string()).collect(),
        });
    };
    Ok(src
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| Instruction {
            id: format!("{name}-{i:03}"),
            text: l.trim().to_string(),
            category: None,
            source: Some(format!("builtin:{name}")),
        })
        .collect())
}

/// A contrastive persona: positive and negative system prompts.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Persona {
    pub description: String,
    pub positive: Vec<String>,
    pub negative: Vec<String>,
}

/// Parses a personas TOML file (`[name] description, positive = [..], negative = [..]`).
///
/// # Errors
/// [`Error::Toml`]: TOML errors with their line; a persona (the table) with an empty side.
pub fn parse_personas(src: &str, origin: &str) -> Result<BTreeMap<String, Persona>> {
    let map: BTreeMap<String, Persona> = toml::from_str(src).map_err(|e| Error::Toml {
        origin: origin.to_string(),
        table: None,
        line: e.span().map(|r| {
            src.as_bytes()[..r.start.min(src.len())]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1
        }),
        reason: e.message().to_string(),
    })?;
    for (name, p) in &map {
        if p.positive.is_empty() || p.negative.is_empty() {
            return Err(Error::Toml {
                origin: origin.to_string(),
                table: Some(name.clone()),
                line: None,
                reason: "positive and negative must each have at least one prompt".into(),
            });
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_sets_are_sixteen_each() {
        for n in ["harmful", "harmless", "neutral"] {
            assert_eq!(builtin(n).unwrap().len(), 16, "{n}");
        }
        assert!(builtin("nope").is_err());
    }

    #[test]
    fn builtin_personas_parse() {
        let p = parse_personas(PERSONAS, "builtin").unwrap();
        for k in ["compliant", "evil", "callous", "hostile", "arrogant"] {
            assert!(p.contains_key(k), "{k}");
        }
        assert!(parse_personas("[x]\ndescription='d'\npositive=[]\nnegative=['n']", "t").is_err());
        assert!(parse_personas(
            "[x]\ndescription='d'\npositive=['p']\nnegative=['n']\nextra=1",
            "t"
        )
        .is_err());
    }
}
