//! Where hooks attach: [`HookPoint`]s and layer lists.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// A place in the residual stream: `resid_post.L`. Parses from `resid_post.L` or `L`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HookPoint {
    pub layer: usize,
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "resid_post.{}", self.layer)
    }
}

impl FromStr for HookPoint {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let n = s.strip_prefix("resid_post.").unwrap_or(s);
        n.parse::<usize>()
            .map(|layer| HookPoint { layer })
            .map_err(|_| {
                format!(
                    "'{s}' is not a hook point (expected resid_post.L or a layer number L >= 0)"
                )
            })
    }
}

/// Parses a layer list: `12`, `3,5,9`, `20-23` (inclusive) or a mix, each `< n_layer`.
///
/// # Errors
/// Names the bad part: not a number, negative, out of range, empty or reversed window.
pub fn parse_layers(s: &str, n_layer: usize) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        let part = part.strip_prefix("resid_post.").unwrap_or(part);
        let (a, b) = match part.split_once('-').filter(|(a, _)| !a.is_empty()) {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let num = |x: &str| -> Result<usize> {
            let v: i64 = x.trim().parse().map_err(|_| {
                Error::Invalid(format!("layers '{s}': '{x}' is not a layer number"))
            })?;
            if v < 0 {
                return Err(Error::Invalid(format!(
                    "layers '{s}': layer {v} is negative"
                )));
            }
            if v as usize >= n_layer {
                return Err(Error::Invalid(format!(
                    "layers '{s}': layer {v} out of range ({n_layer} layers, 0-{})",
                    n_layer - 1
                )));
            }
            Ok(v as usize)
        };
        let (a, b) = (num(a)?, num(b)?);
        if b < a {
            return Err(Error::Invalid(format!(
                "layers '{s}': window {a}-{b} is empty"
            )));
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_point_round_trips() {
        let p: HookPoint = "resid_post.12".parse().unwrap();
        assert_eq!(p.layer, 12);
        assert_eq!(p.to_string().parse::<HookPoint>().unwrap(), p);
        assert!("resid_post.-1".parse::<HookPoint>().is_err());
    }

    #[test]
    fn layer_lists() {
        assert_eq!(
            parse_layers("3,1-2,resid_post.5", 8).unwrap(),
            vec![1, 2, 3, 5]
        );
        assert!(parse_layers("8", 8)
            .unwrap_err()
            .to_string()
            .contains("out of range"));
        assert!(parse_layers("-1", 8)
            .unwrap_err()
            .to_string()
            .contains("negative"));
        assert!(parse_layers("5-3", 8)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(parse_layers("x", 8).is_err());
    }
}
