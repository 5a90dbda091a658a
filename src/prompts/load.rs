//! Prompt-set loaders for outside data: JSON arrays of objects, JSONL, CSV with a named
//! column, and plain text (one instruction per line). The format comes from the extension
//! (`.json`, `.jsonl`, `.csv`, anything else is text) unless given. `category` and `source`
//! fields are kept when present. Every error names the file, and the line or field.

use std::path::Path;

use serde_json::Value;

use super::Instruction;
use crate::error::{At, Error, Result};
use crate::rng::Rng;
use crate::text::shown;

/// The file formats we read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Jsonl,
    Csv,
    Text,
}

impl Format {
    pub fn from_path(p: &Path) -> Format {
        match p
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("json") => Format::Json,
            Some("jsonl") | Some("ndjson") => Format::Jsonl,
            Some("csv") => Format::Csv,
            _ => Format::Text,
        }
    }
}

/// Where to find the instruction: the JSON field or CSV column. `None` tries `instruction`,
/// `forbidden_prompt`, `goal`, `prompt` in that order.
pub const DEFAULT_FIELDS: &[&str] = &["instruction", "forbidden_prompt", "goal", "prompt"];

/// Loads a prompt set from a file.
///
/// # Errors
/// Unreadable or non-UTF-8 files, bad JSON (with line number), a missing field or column,
/// or an empty set.
pub fn load(path: &Path, field: Option<&str>) -> Result<Vec<Instruction>> {
    let bytes = crate::fsio::read_input(path, "a prompt-set file (.json, .jsonl, .csv, .txt)")?;
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("prompts")
        .to_string();
    parse(&bytes, Format::from_path(path), field, &name).map_err(|e| e.in_file(path))
}

fn utf8(bytes: &[u8]) -> Result<&str> {
    std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        Error::record(At::Line(line), "not valid UTF-8")
    })
}

/// The keys or column names found, for a message: escaped, each cut short, at most 10.
fn found(keys: &[&str]) -> String {
    let mut v: Vec<String> = keys.iter().take(10).map(|k| shown(k)).collect();
    if keys.len() > 10 {
        v.push(format!("… {} in all", keys.len()));
    }
    v.join(", ")
}

fn pick_field<'a>(
    keys: &[&'a str],
    field: Option<&'a str>,
) -> std::result::Result<&'a str, String> {
    match field {
        Some(f) if keys.contains(&f) => Ok(f),
        Some(f) => Err(format!(
            "no field or column '{}' (found: {})",
            shown(f),
            found(keys)
        )),
        None => DEFAULT_FIELDS
            .iter()
            .find(|d| keys.contains(d))
            .copied()
            .ok_or_else(|| {
                format!(
                    "no instruction field (looked for {}; found: {}); name it with --field",
                    DEFAULT_FIELDS.join(", "),
                    found(keys)
                )
            }),
    }
}

fn from_object(
    obj: &serde_json::Map<String, Value>,
    field: Option<&str>,
    at: At,
    id: String,
) -> Result<Instruction> {
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    let f = pick_field(&keys, field).map_err(|e| Error::record(at.clone(), e))?;
    let text = obj[f]
        .as_str()
        .ok_or_else(|| Error::record(at, format!("field '{}' is not a string", shown(f))))?;
    let s = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_string);
    Ok(Instruction {
        id,
        text: text.to_string(),
        category: s("category"),
        source: s("source"),
    })
}

/// Parses prompt-set bytes in a known format (the fuzz targets call this).
///
/// # Errors
/// [`Error::Record`], naming the line, element or CSV record, and the field.
pub fn parse(
    bytes: &[u8],
    format: Format,
    field: Option<&str>,
    name: &str,
) -> Result<Vec<Instruction>> {
    let text = utf8(bytes)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let id = |i: usize| format!("{name}-{i:04}");
    let out = match format {
        Format::Json => {
            let v: Value = serde_json::from_str(text)
                .map_err(|e| Error::record(At::Line(e.line()), format!("invalid JSON: {e}")))?;
            let arr = v
                .as_array()
                .ok_or_else(|| Error::record(At::Whole, "expected a JSON array of objects"))?;
            arr.iter()
                .enumerate()
                .map(|(i, x)| match x {
                    Value::Object(o) => from_object(o, field, At::Element(i), id(i)),
                    Value::String(s) => Ok(Instruction {
                        id: id(i),
                        text: s.clone(),
                        category: None,
                        source: None,
                    }),
                    _ => Err(Error::record(
                        At::Element(i),
                        "expected an object or a string",
                    )),
                })
                .collect::<Result<Vec<_>>>()?
        }
        Format::Jsonl => {
            let mut v = Vec::new();
            for (n, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let x: Value = serde_json::from_str(line)
                    .map_err(|e| Error::record(At::Line(n + 1), format!("invalid JSON: {e}")))?;
                let o = x
                    .as_object()
                    .ok_or_else(|| Error::record(At::Line(n + 1), "expected a JSON object"))?;
                v.push(from_object(o, field, At::Line(n + 1), id(v.len()))?);
            }
            v
        }
        Format::Csv => {
            // The csv crate reads an unterminated quote to the end of the file, silently
            // merging every later row into one field. In valid CSV quotes come in pairs
            // (opening/closing, and "" inside a field), so an odd count is always an error.
            if let Some(line) = unterminated_quote(text) {
                return Err(Error::record(
                    At::Line(line),
                    "a quoted field is never closed",
                ));
            }
            let mut rd = csv::ReaderBuilder::new()
                .flexible(false)
                .from_reader(text.as_bytes());
            let headers: Vec<String> = rd
                .headers()
                .map_err(|e| Error::record(At::CsvHeader, e.to_string()))?
                .iter()
                .map(str::to_string)
                .collect();
            let keys: Vec<&str> = headers.iter().map(String::as_str).collect();
            let f = pick_field(&keys, field).map_err(|e| Error::record(At::Whole, e))?;
            let col = |k: &str| headers.iter().position(|h| h == k);
            let (fi, ci, si) = (
                col(f).expect("picked from headers"),
                col("category"),
                col("source"),
            );
            let mut v = Vec::new();
            for (n, rec) in rd.records().enumerate() {
                let rec = rec.map_err(|e| Error::record(At::CsvRecord(n + 1), e.to_string()))?;
                let get = |i: Option<usize>| i.and_then(|i| rec.get(i)).map(str::to_string);
                v.push(Instruction {
                    id: id(n),
                    text: get(Some(fi)).unwrap_or_default(),
                    category: get(ci),
                    source: get(si),
                });
            }
            v
        }
        Format::Text => text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .enumerate()
            .map(|(i, l)| Instruction {
                id: id(i),
                text: l.to_string(),
                category: None,
                source: None,
            })
            .collect(),
    };
    if let Some((i, _)) = out
        .iter()
        .enumerate()
        .find(|(_, x)| x.text.trim().is_empty())
    {
        return Err(Error::record(At::Instruction(i + 1), "is empty"));
    }
    if out.is_empty() {
        return Err(Error::record(At::Whole, "the prompt set is empty"));
    }
    Ok(out)
}

/// The line where the last quoted field opens if a CSV text's quotes are unbalanced.
fn unterminated_quote(text: &str) -> Option<usize> {
    let mut open: Option<usize> = None;
    let mut line = 1;
    for c in text.chars() {
        match c {
            '"' => open = if open.is_some() { None } else { Some(line) },
            '\n' => line += 1,
            _ => {}
        }
    }
    open
}

/// A deterministic sample of `n` instructions (all of them, in order, when `n` ≥ len):
/// a seeded Fisher–Yates shuffle, then the first `n`, kept in file order.
///
/// # Errors
/// [`Error::Sample`] when `n` is more than the set has.
pub fn sample(v: Vec<Instruction>, n: Option<usize>, seed: u64) -> Result<Vec<Instruction>> {
    if let Some(n) = n.filter(|&n| n > v.len()) {
        // Silently taking fewer would report a 313-prompt run that used 60.
        return Err(Error::Sample { n, have: v.len() });
    }
    let Some(n) = n.filter(|&n| n < v.len()) else {
        return Ok(v);
    };
    let mut idx: Vec<usize> = (0..v.len()).collect();
    let mut rng = Rng::new(seed);
    for i in (1..idx.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        idx.swap(i, j);
    }
    let mut keep: Vec<usize> = idx[..n].to_vec();
    keep.sort_unstable();
    let mut v: Vec<Option<Instruction>> = v.into_iter().map(Some).collect();
    Ok(keep
        .into_iter()
        .map(|i| v[i].take().expect("indices are distinct"))
        .collect())
}

/// A prompt set by spec: `builtin:NAME` or a file path.
///
/// # Errors
/// As [`load`] and [`super::builtin`].
pub fn resolve(spec: &str, field: Option<&str>) -> Result<Vec<Instruction>> {
    match spec.strip_prefix("builtin:") {
        Some(name) => super::builtin(name),
        None => load(Path::new(spec), field),
    }
}

/// sha256 of the instruction texts in order, to record which prompts made a result.
pub fn hash(v: &[Instruction]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for i in v {
        h.update(i.text.as_bytes());
        h.update([0u8]);
    }
    format!("{:x}", h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_array_with_category() {
        let v = parse(
            br#"[{"instruction":"a","category":"c"},{"instruction":"b"}]"#,
            Format::Json,
            None,
            "t",
        )
        .unwrap();
        assert_eq!(v[0].text, "a");
        assert_eq!(v[0].category.as_deref(), Some("c"));
        assert_eq!(v[1].id, "t-0001");
    }

    #[test]
    fn jsonl_reports_line_numbers() {
        let e = parse(
            b"{\"instruction\":\"a\"}\n\n{bad\n",
            Format::Jsonl,
            None,
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("line 3: invalid JSON"), "{e}");
        let e = parse(b"{\"goal\":\"a\"}\n{\"x\":1}\n", Format::Jsonl, None, "t")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 2") && e.contains("no instruction field"),
            "{e}"
        );
    }

    #[test]
    fn csv_named_and_default_columns() {
        let src = b"category,source,forbidden_prompt\nViolence,custom,\"Do x, then y\"\n";
        let v = parse(src, Format::Csv, None, "sr").unwrap();
        assert_eq!(v[0].text, "Do x, then y");
        assert_eq!(v[0].source.as_deref(), Some("custom"));
        let e = parse(src, Format::Csv, Some("goal"), "sr")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no field or column 'goal'"), "{e}");
    }

    #[test]
    fn text_empty_and_non_utf8() {
        assert_eq!(
            parse(b"a\n\n b \n", Format::Text, None, "t").unwrap().len(),
            2
        );
        assert_eq!(
            parse(b"\n  \n", Format::Text, None, "t")
                .unwrap_err()
                .to_string(),
            "the prompt set is empty"
        );
        assert_eq!(
            parse(b"ok\nbad \xff\n", Format::Text, None, "t")
                .unwrap_err()
                .to_string(),
            "line 2: not valid UTF-8"
        );
        assert!(parse(b"[]", Format::Json, None, "t")
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(parse(b"{}", Format::Json, None, "t")
            .unwrap_err()
            .to_string()
            .contains("array"));
    }

    /// Fuzzing found this (cargo fuzz, target `prompts`): CSV column names with a newline and
    /// a NUL were echoed raw into the error, which must stay one printable line.
    #[test]
    fn fuzz_regression_column_names_are_escaped_in_errors() {
        let src = b"\"a\n[\0b\",c\nx,y\n";
        let e = parse(src, Format::Csv, None, "t").unwrap_err().to_string();
        assert!(e.contains(r"a\n[\u{0}b"), "{e}");
        assert!(!e.contains(char::is_control), "{e:?}");
        let e = parse(src, Format::Csv, Some("z\u{1b}"), "t")
            .unwrap_err()
            .to_string();
        assert!(!e.contains(char::is_control), "{e:?}");
        let long = format!("{{\"{}\": 1}}\n", "k".repeat(500));
        let e = parse(long.as_bytes(), Format::Jsonl, None, "t")
            .unwrap_err()
            .to_string();
        assert!(e.len() < 300, "{e}");
    }

    #[test]
    fn sampling_is_seeded_and_ordered() {
        let v: Vec<Instruction> = (0..50)
            .map(|i| Instruction {
                id: i.to_string(),
                text: i.to_string(),
                category: None,
                source: None,
            })
            .collect();
        let a = sample(v.clone(), Some(10), 1).unwrap();
        assert_eq!(a, sample(v.clone(), Some(10), 1).unwrap());
        assert_ne!(a, sample(v.clone(), Some(10), 2).unwrap());
        assert!(a
            .windows(2)
            .all(|w| w[0].id.parse::<u32>().unwrap() < w[1].id.parse::<u32>().unwrap()));
        assert_eq!(sample(v.clone(), Some(50), 1).unwrap().len(), 50);
        let e = sample(v.clone(), Some(99), 1).unwrap_err().to_string();
        assert!(e.contains("n = 99 but the set has 50"), "{e}");
    }

    #[test]
    fn real_shared_files_load() {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
        if !base.exists() {
            return; // shared/ is beside the checkout in CI and sessions; not in a packaged crate.
        }
        assert_eq!(
            load(&base.join("strongreject/strongreject.csv"), None)
                .unwrap()
                .len(),
            313
        );
        assert_eq!(
            load(&base.join("strongreject/strongreject_small.csv"), None)
                .unwrap()
                .len(),
            60
        );
        assert_eq!(
            load(&base.join("refusal_direction/harmful_val.json"), None)
                .unwrap()
                .len(),
            39
        );
    }
}
