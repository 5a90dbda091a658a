//! The OpenAI request and response shapes the server speaks, and their checks: every bad
//! field becomes an [`ApiError`] naming it, before anything reaches the engine.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::Error;
use crate::experiment::spec::{self, Builtins, Intervention, Scale, Source};

/// An OpenAI-style error: HTTP status, message, the offending parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub param: Option<String>,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `server_error`, …
    pub kind: &'static str,
}

impl ApiError {
    pub fn bad(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        let param = param.into();
        let message = message.into();
        ApiError {
            status: 400,
            message: if param.is_empty() {
                message
            } else {
                format!("{param}: {message}")
            },
            param: (!param.is_empty()).then_some(param),
            kind: "invalid_request_error",
        }
    }

    pub fn status(status: u16, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            param: None,
            kind,
        }
    }

    pub fn body(&self) -> Value {
        json!({ "error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": Value::Null,
        }})
    }
}

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A message's content: text, or OpenAI's list of parts (text parts only).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// What chat and text completions share: every field of a request but its `messages` or
/// `prompt`.
#[derive(Debug, Clone, Deserialize)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// llama.cpp's extensions.
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Interventions for this request alone, in the spec's grammar.
    pub steering: Option<Vec<Value>>,
    /// Accepted and ignored, as OpenAI's own end-user tag.
    pub user: Option<String>,
    /// llama-server's extension: generate to max_tokens past end-of-generation tokens.
    #[serde(default)]
    pub ignore_eos: bool,
}

impl Common {
    /// Its field names: any other key of a request (besides `messages` or `prompt`) is
    /// refused, so a misspelt option is an error instead of silently ignored.
    const FIELDS: &'static [&'static str] = &[
        "model",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "n",
        "stream",
        "stream_options",
        "steering",
        "user",
        "ignore_eos",
    ];
}

/// A text completion's `prompt`: one text or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptText {
    One(String),
    Many(Vec<String>),
}

/// `value` as `T`, a failure named by where in the request it is (`messages[0].role`).
fn typed<T: serde::de::DeserializeOwned>(value: Value, at: &str) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let param = match (at, path.as_str()) {
            (a, ".") => a.to_string(),
            ("", p) => p.to_string(),
            (a, p) if p.starts_with('[') => format!("{a}{p}"),
            (a, p) => format!("{a}.{p}"),
        };
        ApiError::bad(param, e.into_inner().to_string())
    })
}

/// A request body: its own field `own` (`messages` or `prompt`) as `T` and the rest as
/// [`Common`], every problem an OpenAI-style error naming the field.
///
/// # Errors
/// Malformed JSON, a body that is not an object, an unknown or missing field, a field of
/// the wrong type.
pub fn parse_request<T: serde::de::DeserializeOwned>(
    body: &[u8],
    own: &str,
) -> Result<(T, Common), ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad("", format!("the body is not valid JSON: {e}")))?;
    let Value::Object(mut m) = v else {
        return Err(ApiError::bad("", "the body must be a JSON object"));
    };
    if let Some(k) = m
        .keys()
        .find(|k| *k != own && !Common::FIELDS.contains(&k.as_str()))
    {
        return Err(ApiError::bad(k.clone(), "unknown field"));
    }
    let x = m
        .remove(own)
        .ok_or_else(|| ApiError::bad(own, "missing field"))?;
    Ok((typed(x, own)?, typed(Value::Object(m), "")?))
}

/// The limits a request is checked against.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The largest `max_tokens` accepted (`--max-tokens`).
    pub max_tokens: usize,
    /// The largest `n`.
    pub max_n: usize,
}

/// Decoding settings of a request, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoding {
    /// `None`: the remaining context, up to the cap.
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
    pub seed: Option<u64>,
    pub stops: Vec<String>,
    pub n: usize,
    pub ignore_eos: bool,
}

/// Most stop strings a request may give (OpenAI allows 4; llama.cpp more).
pub const MAX_STOPS: usize = 16;

/// Checks the decoding fields of `c`.
///
/// # Errors
/// The first field out of range, named.
pub fn decoding(c: &Common, lim: &Limits) -> Result<Decoding, ApiError> {
    let max = match (c.max_tokens, c.max_completion_tokens) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad(
                "max_completion_tokens",
                "give max_tokens or max_completion_tokens, not both",
            ))
        }
        (Some(m), None) => Some(("max_tokens", m)),
        (None, Some(m)) => Some(("max_completion_tokens", m)),
        (None, None) => None,
    };
    let max_tokens = match max {
        None => None,
        Some((f, m)) if m < 1 => return Err(ApiError::bad(f, format!("{m} is below 1"))),
        Some((f, m)) if m as u64 > lim.max_tokens as u64 => {
            return Err(ApiError::bad(
                f,
                format!("{m} is above this server's cap of {}", lim.max_tokens),
            ))
        }
        Some((_, m)) => Some(m as usize),
    };
    let t = c.temperature.unwrap_or(1.0);
    if !(t.is_finite() && (0.0..=2.0).contains(&t)) {
        return Err(ApiError::bad(
            "temperature",
            format!("{t} is not in [0, 2]"),
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p.is_finite() && top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad("top_p", format!("{top_p} is not in (0, 1]")));
    }
    let min_p = c.min_p.unwrap_or(0.0);
    if !(min_p.is_finite() && (0.0..=1.0).contains(&min_p)) {
        return Err(ApiError::bad("min_p", format!("{min_p} is not in [0, 1]")));
    }
    let top_k = c.top_k.unwrap_or(0);
    if !(0..=i32::MAX as i64).contains(&top_k) {
        return Err(ApiError::bad(
            "top_k",
            format!("{top_k} is negative or too large"),
        ));
    }
    let n = c.n.unwrap_or(1);
    if n < 1 || n as u64 > lim.max_n as u64 {
        return Err(ApiError::bad(
            "n",
            format!("{n} is not between 1 and {}", lim.max_n),
        ));
    }
    let seed = match c.seed {
        Some(s) if s < 0 => return Err(ApiError::bad("seed", format!("{s} is negative"))),
        s => s.map(|s| s as u64),
    };
    let stops = match &c.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stops.len() > MAX_STOPS {
        return Err(ApiError::bad(
            "stop",
            format!("{} strings, at most {MAX_STOPS}", stops.len()),
        ));
    }
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::bad("stop", "an empty stop string"));
    }
    Ok(Decoding {
        max_tokens,
        temperature: t as f32,
        top_k: top_k as i32,
        top_p: top_p as f32,
        min_p: min_p as f32,
        seed,
        stops,
        n: n as usize,
        ignore_eos: c.ignore_eos,
    })
}

/// Most interventions one request may carry.
pub const MAX_STEERING: usize = 32;

/// Resolves `steering` in the spec's grammar for a model of `n_layer` layers (direction
/// names are checked by the caller, who knows them).
///
/// # Errors
/// The first bad intervention, its field named as `steering[i].field`.
pub fn steering(items: &[Value], n_layer: usize) -> Result<Vec<Intervention>, ApiError> {
    if items.len() > MAX_STEERING {
        return Err(ApiError::bad(
            "steering",
            format!("{} interventions, at most {MAX_STEERING}", items.len()),
        ));
    }
    let b = Builtins {
        n_layer,
        ..Builtins::default()
    };
    let mut out = Vec::new();
    for (i, v) in items.iter().enumerate() {
        let at = format!("steering[{i}]");
        let Some(obj) = v.as_object() else {
            return Err(ApiError::bad(at, "is not an object"));
        };
        if obj.contains_key("scope") {
            return Err(ApiError::bad(
                format!("{at}.scope"),
                "is for spec prompt sets; a request's steering acts on the whole request",
            ));
        }
        if let Some((k, _)) = obj.iter().find(|(_, x)| x.is_null()) {
            return Err(ApiError::bad(format!("{at}.{k}"), "is null"));
        }
        let t: toml::Value = serde_json::from_value(v.clone())
            .map_err(|e| ApiError::bad(at.clone(), e.to_string()))?;
        let iv = spec::resolve_given(&t, &b, "steering", i + 1).map_err(|e| match e {
            Error::Condition {
                field: Some(f),
                problem,
                ..
            } => ApiError::bad(format!("{at}.{f}"), problem),
            Error::Condition { problem, .. } => ApiError::bad(at.clone(), problem),
            e => ApiError::bad(at.clone(), e.to_string()),
        })?;
        if let Source::Layer(s) = iv.source {
            if s >= n_layer {
                return Err(ApiError::bad(
                    format!("{at}.source"),
                    format!("layer {s} is out of range (the model has {n_layer} layers)"),
                ));
            }
        }
        out.push(iv);
    }
    Ok(out)
}

/// An intervention as responses echo it: normalised (layers as a list, every default
/// written out).
pub fn echo(iv: &Intervention) -> Value {
    json!({
        "direction": iv.direction,
        "op": iv.op.to_string(),
        "layers": iv.layers,
        "coefficient": iv.coefficient,
        "scale": match iv.scale { Scale::Raw => "raw", Scale::Resid => "resid" },
        "source": match iv.source { Source::Own => json!("own"), Source::Layer(l) => json!(l) },
    })
}

/// One choice's end, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    Stop,
    Length,
}

impl Finish {
    pub fn name(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim() -> Limits {
        Limits {
            max_tokens: 100,
            max_n: 8,
        }
    }

    fn chat(body: &str) -> Result<Common, ApiError> {
        parse_request::<Vec<ChatMessage>>(body.as_bytes(), "messages").map(|(_, c)| c)
    }

    #[test]
    fn unknown_and_missing_fields_are_named() {
        let e = chat(r#"{"messages": [], "temprature": 1}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temprature"), "{e:?}");
        let e = chat(r#"{"model": "x"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"), "{e:?}");
        let e = chat(r#"{"messages": [{"role": "user", "content": 3}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content"), "{e:?}");
        let e = chat(r#"{"messages": [], "temperature": "hot"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"), "{e:?}");
        let e = chat(r#"{"messages": [], "stream_options": {"include_usage": 1}}"#).unwrap_err();
        assert_eq!(
            e.param.as_deref(),
            Some("stream_options.include_usage"),
            "{e:?}"
        );
        let e = chat("{not json").unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{e:?}");
        assert_eq!(chat("[1]").unwrap_err().status, 400);
    }

    #[test]
    fn decoding_fields_out_of_range_are_named() {
        for (body, param) in [
            (r#"{"messages": [], "max_tokens": 101}"#, "max_tokens"),
            (r#"{"messages": [], "max_tokens": 0}"#, "max_tokens"),
            (r#"{"messages": [], "temperature": -1}"#, "temperature"),
            (r#"{"messages": [], "top_p": 0}"#, "top_p"),
            (r#"{"messages": [], "n": 9}"#, "n"),
            (r#"{"messages": [], "seed": -3}"#, "seed"),
            (r#"{"messages": [], "stop": [""]}"#, "stop"),
        ] {
            let e = decoding(&chat(body).unwrap(), &lim()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
            assert_eq!(e.status, 400);
        }
        let d = decoding(
            &chat(r#"{"messages": [], "stop": "\n", "seed": 7}"#).unwrap(),
            &lim(),
        )
        .unwrap();
        assert_eq!((d.stops, d.seed, d.n), (vec!["\n".to_string()], Some(7), 1));
    }

    #[test]
    fn steering_errors_name_the_intervention_and_field() {
        let bad = |v: Value| steering(&[v], 8).unwrap_err().param.unwrap();
        assert_eq!(
            bad(json!({"direction": "p", "op": "add", "layers": 9})),
            "steering[0].layers"
        );
        assert_eq!(
            bad(json!({"direction": "p", "op": "add", "layers": 3, "coefficient": "NaN"})),
            "steering[0].coefficient"
        );
        assert_eq!(
            bad(json!({"direction": "p", "op": "add", "layers": 3, "colour": 1})),
            "steering[0]"
        );
        assert_eq!(
            bad(json!({"direction": "p", "op": "add", "layers": 3, "source": 8})),
            "steering[0].source"
        );
        let ok = steering(
            &[json!({"direction": "p", "op": "project", "layers": "2-4"})],
            8,
        )
        .unwrap();
        assert_eq!(
            echo(&ok[0]),
            json!({"direction": "p", "op": "project", "layers": [2, 3, 4],
                   "coefficient": 1.0, "scale": "raw", "source": "own"})
        );
    }
}
