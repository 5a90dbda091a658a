//! Where hooks attach: a [`Site`] of the residual stream at a layer ([`HookPoint`]), and the
//! one layer-list grammar ([`LayerSet`]) that `--layers`, the spec's `layers` and written
//! CSVs share.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, LayerOf, LayersProblem, Named, Result};

/// Which tensor of a layer a hook reads or edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Site {
    /// The residual stream after the layer, control vector included: llama.cpp's `l_out-<il>`.
    #[default]
    ResidPost,
}

impl Site {
    /// Every site there is.
    pub const ALL: [Site; 1] = [Site::ResidPost];

    /// The name in hook points, layer lists and direction-file metadata: `resid_post`.
    pub fn name(self) -> &'static str {
        match self {
            Site::ResidPost => "resid_post",
        }
    }

    /// llama.cpp's name of the site's tensor at layer `il`: `l_out-<il>`.
    pub fn tensor(self, il: usize) -> String {
        match self {
            Site::ResidPost => format!("l_out-{il}"),
        }
    }

    /// This site at `layer`.
    pub fn at(self, layer: usize) -> HookPoint {
        HookPoint { site: self, layer }
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Site {
    type Err = Error;
    /// # Errors
    /// [`Error::Unknown`] naming the known sites.
    fn from_str(s: &str) -> Result<Self> {
        Site::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| Error::Unknown {
                what: Named::HookSite,
                name: Some(s.to_string()),
                known: Site::ALL.iter().map(|x| x.name().to_string()).collect(),
            })
    }
}

/// A place in the residual stream: `resid_post.L`. Parses from `resid_post.L` or `L`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HookPoint {
    pub site: Site,
    pub layer: usize,
}

impl HookPoint {
    /// `resid_post.L`.
    pub fn resid_post(layer: usize) -> HookPoint {
        Site::ResidPost.at(layer)
    }
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.site, self.layer)
    }
}

impl FromStr for HookPoint {
    type Err = Error;
    /// # Errors
    /// [`Error::Unknown`] naming the two accepted forms.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Unknown {
            what: Named::HookPoint,
            name: Some(s.to_string()),
            known: vec![
                format!("{}.L", Site::ResidPost),
                "a layer number L >= 0".to_string(),
            ],
        };
        let (site, n) = match s.split_once('.') {
            Some((site, n)) => (site.parse::<Site>().map_err(|_| bad())?, n),
            None => (Site::ResidPost, s),
        };
        n.parse::<usize>()
            .map(|layer| site.at(layer))
            .map_err(|_| bad())
    }
}

/// A sorted set of distinct layers, each below the model's layer count.
///
/// The one grammar for layers, whether from a flag (`--layers`), the spec (`layers`, a
/// string, an integer or a list of integers) or read back from a written CSV:
/// - `all`: every layer;
/// - `S+W`: the window of W layers from S (`18+4` is 18-21);
/// - `S+tail` or `S..`: from S through the last layer (`20+tail` is 20-23 in 24 layers);
/// - a comma list of layers `12`, inclusive ranges `20-23` and hook points `resid_post.5`,
///   in any order, repeats allowed.
///
/// The text form ([`fmt::Display`]) is the compact one: `12`, `18-21` or `3,5,9`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct LayerSet(Vec<usize>);

impl LayerSet {
    /// Parses a layer list for a model of `n_layer` layers.
    ///
    /// # Errors
    /// Names the bad part: not a number, negative, out of range, empty or reversed window,
    /// or a malformed `S+W` or `S+tail`.
    pub fn parse(s: &str, n_layer: usize) -> Result<LayerSet> {
        let t = s.trim();
        if t == "all" {
            return Ok(LayerSet::all(n_layer));
        }
        let tail = t.strip_suffix("..").or_else(|| {
            t.split_once('+')
                .filter(|(_, w)| w.trim() == "tail")
                .map(|(a, _)| a)
        });
        if let Some(a) = tail {
            let a: i64 = a
                .trim()
                .parse()
                .map_err(|_| layers(s, LayersProblem::NotWindow))?;
            return Ok(LayerSet((in_range(s, a, n_layer)?..n_layer).collect()));
        }
        if let Some((a, w)) = t.split_once('+') {
            let (a, w): (i64, i64) = match (a.trim().parse(), w.trim().parse()) {
                (Ok(a), Ok(w)) => (a, w),
                _ => return Err(layers(s, LayersProblem::NotWindow)),
            };
            if w <= 0 {
                return Err(layers(s, LayersProblem::EmptyWindow));
            }
            // Reported as the window it stands for: `24+9` is `layers '24-32': …`.
            return list(&format!("{a}-{}", a.saturating_add(w - 1)), n_layer);
        }
        list(t, n_layer)
    }

    /// Parses a spec's `layers` value: an integer, a list of integers, or a string in the
    /// [`LayerSet::parse`] grammar.
    ///
    /// # Errors
    /// As [`LayerSet::parse`], or a value of another type (a list element that is not an
    /// integer is named).
    pub fn from_toml(v: &toml::Value, n_layer: usize) -> Result<LayerSet> {
        match v {
            toml::Value::Integer(i) => LayerSet::parse(&i.to_string(), n_layer),
            toml::Value::Array(a) => {
                let mut out = Vec::new();
                for x in a {
                    match x.as_integer() {
                        Some(i) => out.extend(LayerSet::parse(&i.to_string(), n_layer)?.0),
                        None => return Err(layers(&x.to_string(), LayersProblem::NotLayerValue)),
                    }
                }
                Ok(LayerSet::from_layers(out))
            }
            toml::Value::String(t) => LayerSet::parse(t, n_layer),
            other => Err(layers(&other.to_string(), LayersProblem::NotListValue)),
        }
    }

    /// Layers `0..n_layer`.
    pub fn all(n_layer: usize) -> LayerSet {
        LayerSet((0..n_layer).collect())
    }

    /// The given layers, sorted and without repeats (not checked against a model).
    pub fn from_layers(layers: impl IntoIterator<Item = usize>) -> LayerSet {
        let mut v: Vec<usize> = layers.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        LayerSet(v)
    }

    pub fn as_slice(&self) -> &[usize] {
        &self.0
    }

    pub fn into_vec(self) -> Vec<usize> {
        self.0
    }

    /// The hook points of `site` at these layers.
    pub fn points(&self, site: Site) -> impl Iterator<Item = HookPoint> + '_ {
        self.0.iter().map(move |&l| site.at(l))
    }

    /// The compact text of a sorted layer list: `12`, `18-21` for a contiguous run, or
    /// `3,5,9`; empty for none.
    pub fn text(layers: &[usize]) -> String {
        match (layers.first(), layers.last()) {
            (Some(a), Some(_)) if layers.len() == 1 => format!("{a}"),
            (Some(a), Some(b)) if b - a + 1 == layers.len() => format!("{a}-{b}"),
            _ => layers
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

impl std::ops::Deref for LayerSet {
    type Target = [usize];
    fn deref(&self) -> &[usize] {
        &self.0
    }
}

impl From<LayerSet> for Vec<usize> {
    fn from(s: LayerSet) -> Vec<usize> {
        s.0
    }
}

impl IntoIterator for LayerSet {
    type Item = usize;
    type IntoIter = std::vec::IntoIter<usize>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a LayerSet {
    type Item = &'a usize;
    type IntoIter = std::slice::Iter<'a, usize>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Display for LayerSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&LayerSet::text(&self.0))
    }
}

/// [`Error::Layers`] for the list `list`.
fn layers(list: &str, problem: LayersProblem) -> Error {
    Error::Layers {
        list: list.to_string(),
        problem,
    }
}

/// Layer `v` of the list `s` as an index: not negative, below `n_layer`.
fn in_range(s: &str, v: i64, n_layer: usize) -> Result<usize> {
    if v < 0 {
        return Err(layers(s, LayersProblem::Negative(v)));
    }
    if v as usize >= n_layer {
        return Err(Error::Layer {
            layer: v as usize,
            n_layer,
            of: LayerOf::List(s.to_string()),
        });
    }
    Ok(v as usize)
}

/// A comma list of layers, ranges and hook points; errors quote `s`.
fn list(s: &str, n_layer: usize) -> Result<LayerSet> {
    let mut out = Vec::new();
    let prefix = format!("{}.", Site::ResidPost);
    for part in s.split(',').map(str::trim) {
        let part = part.strip_prefix(prefix.as_str()).unwrap_or(part);
        let (a, b) = match part.split_once('-').filter(|(a, _)| !a.is_empty()) {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let num = |x: &str| -> Result<usize> {
            let v: i64 = x
                .trim()
                .parse()
                .map_err(|_| layers(s, LayersProblem::NotNumber(x.to_string())))?;
            in_range(s, v, n_layer)
        };
        let (a, b) = (num(a)?, num(b)?);
        if b < a {
            return Err(layers(s, LayersProblem::Reversed { from: a, to: b }));
        }
        out.extend(a..=b);
    }
    Ok(LayerSet::from_layers(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<usize> {
        LayerSet::parse(s, 8).unwrap().into_vec()
    }

    fn e(s: &str) -> String {
        LayerSet::parse(s, 8).unwrap_err().to_string()
    }

    #[test]
    fn hook_point_round_trips() {
        let h: HookPoint = "resid_post.12".parse().unwrap();
        assert_eq!(h, HookPoint::resid_post(12));
        assert_eq!((h.site, h.layer), (Site::ResidPost, 12));
        assert_eq!(h.to_string(), "resid_post.12");
        for l in [0, 1, 23, 79, usize::MAX] {
            let h = HookPoint::resid_post(l);
            assert_eq!(h.to_string().parse::<HookPoint>().unwrap(), h);
        }
        // A bare layer number is a resid_post point.
        assert_eq!("7".parse::<HookPoint>().unwrap(), HookPoint::resid_post(7));
        for bad in [
            "resid_post.-1",
            "resid_post.",
            "resid_pre.3",
            "x",
            "",
            "3.5",
            ".3",
        ] {
            let e = bad.parse::<HookPoint>().unwrap_err().to_string();
            assert_eq!(
                e,
                format!(
                    "'{bad}' is not a hook point (expected resid_post.L or a layer number L >= 0)"
                )
            );
        }
    }

    #[test]
    fn sites_are_named_as_in_files_and_in_llama_cpp() {
        assert_eq!(Site::ResidPost.to_string(), "resid_post");
        assert_eq!("resid_post".parse::<Site>().unwrap(), Site::ResidPost);
        assert_eq!(Site::ResidPost.tensor(5), "l_out-5");
        assert_eq!(
            "attn_out".parse::<Site>().unwrap_err().to_string(),
            "'attn_out' is not a hook site (known: resid_post)"
        );
    }

    #[test]
    fn every_accepted_form() {
        assert_eq!(p("3"), [3]);
        assert_eq!(p("0"), [0]);
        assert_eq!(p("7"), [7]);
        assert_eq!(p("3,5,1"), [1, 3, 5]);
        assert_eq!(p("2-4"), [2, 3, 4]);
        assert_eq!(p("4-4"), [4]);
        assert_eq!(p("3,1-2,resid_post.5"), [1, 2, 3, 5]);
        assert_eq!(p("resid_post.2-4"), [2, 3, 4]);
        assert_eq!(p(" 3 , 5 "), [3, 5]);
        assert_eq!(p("5,5,4-6"), [4, 5, 6]);
        assert_eq!(p("all"), (0..8).collect::<Vec<_>>());
        assert_eq!(p(" all "), (0..8).collect::<Vec<_>>());
        assert_eq!(p("2+3"), [2, 3, 4]);
        assert_eq!(p(" 2 + 3 "), [2, 3, 4]);
        assert_eq!(p("7+1"), [7]);
        assert_eq!(p("5+tail"), [5, 6, 7]);
        assert_eq!(p(" 5 + tail "), [5, 6, 7]);
        assert_eq!(p("5.."), [5, 6, 7]);
        assert_eq!(p("7+tail"), [7]);
        assert_eq!(p("0.."), (0..8).collect::<Vec<_>>());
        assert_eq!(LayerSet::parse("all", 0).unwrap(), LayerSet::default());
    }

    #[test]
    fn toml_values() {
        let t = |src: &str| -> Result<LayerSet> {
            let v: toml::Value = toml::from_str(&format!("x = {src}")).unwrap();
            LayerSet::from_toml(&v["x"], 8)
        };
        assert_eq!(t("5").unwrap().as_slice(), [5]);
        assert_eq!(t("[6, 1, 6]").unwrap().as_slice(), [1, 6]);
        assert_eq!(t("[]").unwrap().as_slice(), [] as [usize; 0]);
        assert_eq!(t("\"1+2\"").unwrap().as_slice(), [1, 2]);
        assert_eq!(t("\"all\"").unwrap().len(), 8);
        let err = |src: &str| t(src).unwrap_err().to_string();
        assert_eq!(err("8"), "layers '8': layer 8 out of range (8 layers, 0-7)");
        assert_eq!(err("-1"), "layers '-1': layer -1 is negative");
        assert_eq!(err("[1, \"2\"]"), "\"2\" is not a layer number");
        assert_eq!(
            err("[1, 9]"),
            "layers '9': layer 9 out of range (8 layers, 0-7)"
        );
        assert_eq!(err("1.5"), "1.5 is not a layer list");
        assert_eq!(err("true"), "true is not a layer list");
    }

    #[test]
    fn errors_name_the_bad_part() {
        for (input, message) in [
            ("8", "layers '8': layer 8 out of range (8 layers, 0-7)"),
            ("3-9", "layers '3-9': layer 9 out of range (8 layers, 0-7)"),
            ("-1", "layers '-1': layer -1 is negative"),
            ("-3-5", "layers '-3-5': '-3-5' is not a layer number"),
            ("5-3", "layers '5-3': window 5-3 is empty"),
            ("x", "layers 'x': 'x' is not a layer number"),
            ("3,x", "layers '3,x': 'x' is not a layer number"),
            ("", "layers '': '' is not a layer number"),
            ("3,", "layers '3,': '' is not a layer number"),
            ("3-", "layers '3-': '' is not a layer number"),
            (
                "resid_pre.3",
                "layers 'resid_pre.3': 'resid_pre.3' is not a layer number",
            ),
            ("All", "layers 'All': 'All' is not a layer number"),
            ("6+3", "layers '6-8': layer 8 out of range (8 layers, 0-7)"),
            ("3+0", "window '3+0' is empty"),
            ("3+-2", "window '3+-2' is empty"),
            ("a+2", "'a+2' is not a window S+W"),
            ("3+", "'3+' is not a window S+W"),
            ("1,5+2", "'1,5+2' is not a window S+W"),
            ("1,all", "layers '1,all': 'all' is not a layer number"),
            (
                "8+tail",
                "layers '8+tail': layer 8 out of range (8 layers, 0-7)",
            ),
            ("9..", "layers '9..': layer 9 out of range (8 layers, 0-7)"),
            ("-1+tail", "layers '-1+tail': layer -1 is negative"),
            ("x+tail", "'x+tail' is not a window S+W"),
            ("+tail", "'+tail' is not a window S+W"),
            ("..", "'..' is not a window S+W"),
            ("3+Tail", "'3+Tail' is not a window S+W"),
        ] {
            assert_eq!(e(input), message, "{input}");
        }
        // Windows are reported as the range they stand for; `all` and `S+W` stand alone,
        // not inside a comma list (both among the cases above).
        // An absurd window does not overflow.
        assert!(e(&format!("1+{}", i64::MAX)).contains("out of range"));
    }

    #[test]
    fn text_is_compact_and_parses_back() {
        for (layers, text) in [
            (vec![], ""),
            (vec![3], "3"),
            (vec![18, 19, 20, 21], "18-21"),
            (vec![3, 5, 7], "3,5,7"),
            (vec![0, 1, 3], "0,1,3"),
        ] {
            let s = LayerSet::from_layers(layers.clone());
            assert_eq!(s.to_string(), text);
            assert_eq!(LayerSet::text(&layers), text);
            if !layers.is_empty() {
                assert_eq!(LayerSet::parse(text, 24).unwrap(), s);
            }
        }
        let s = LayerSet::parse("2,4", 8).unwrap();
        let pts: Vec<String> = s.points(Site::ResidPost).map(|h| h.to_string()).collect();
        assert_eq!(pts, ["resid_post.2", "resid_post.4"]);
    }
}
