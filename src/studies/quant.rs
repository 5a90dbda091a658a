//! Quantization through llama.cpp's own `llama_model_quantize`, with outputs named by type,
//! written atomically and reused only when their recorded hash still matches.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{Empty, Error, Named, Result, RunError};
use crate::fsio::write_atomic;
use crate::gguf::file_type_name;
use crate::model::{check_gguf, file_sha256};

/// The llama.h `llama_ftype` values we offer, by name.
pub const TYPES: &[(&str, u32)] = &[
    ("F32", 0),
    ("F16", 1),
    ("BF16", 32),
    ("Q8_0", 7),
    ("Q6_K", 18),
    ("Q5_K_M", 17),
    ("Q5_K_S", 16),
    ("Q5_0", 8),
    ("Q5_1", 9),
    ("Q4_K_M", 15),
    ("Q4_K_S", 14),
    ("Q4_0", 2),
    ("Q4_1", 3),
    ("Q3_K_L", 13),
    ("Q3_K_M", 12),
    ("Q3_K_S", 11),
    ("Q2_K", 10),
];

/// A type name (case-insensitive) as a llama.h ftype.
///
/// # Errors
/// An unknown name, listing the known ones.
pub fn ftype(name: &str) -> Result<u32> {
    TYPES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name.trim()))
        .map(|(_, t)| *t)
        .ok_or_else(|| Error::Unknown {
            what: Named::QuantType,
            name: Some(name.to_string()),
            known: TYPES.iter().map(|(n, _)| n.to_string()).collect(),
        })
}

/// `SmolLM2-135M-Instruct.Q4_1.gguf` + `Q8_0` → `SmolLM2-135M-Instruct.Q8_0.gguf`: the input's
/// own type suffix is replaced, so names carry exactly one type.
pub fn output_name(input: &Path, ty: &str) -> String {
    let stem = input
        .file_stem()
        .map_or("model".to_string(), |s| s.to_string_lossy().into_owned());
    let mut base = stem.as_str();
    for (n, _) in TYPES {
        for sep in ['.', '-', '_'] {
            let suffix = format!("{sep}{n}");
            if base.len() > suffix.len()
                && base
                    .to_ascii_uppercase()
                    .ends_with(&suffix.to_ascii_uppercase())
            {
                base = &base[..base.len() - suffix.len()];
            }
        }
    }
    format!("{base}.{}.gguf", ty.to_ascii_uppercase())
}

/// One output of [`quantize`].
#[derive(Debug, Clone)]
pub struct Quantized {
    pub ty: String,
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
    /// Reused from an earlier run (hash matched), not requantized.
    pub reused: bool,
    pub seconds: f64,
}

/// Whether a llama.h ftype is a quantized one (requantizing from it compounds the error).
pub fn is_quantized(ftype_name: &str) -> bool {
    !matches!(ftype_name, "F32" | "F16" | "BF16")
}

/// Quantizes `input` to each type into `out_dir`. A sidecar `NAME.gguf.sha256` records the
/// input's hash and the output's; an existing output is reused only when both still match.
/// `note` gets one-line warnings (requantization), `progress(i, n, type)` each step.
///
/// # Errors
/// Bad input, unknown types, llama.cpp failures, I/O errors.
pub fn quantize(
    input: &Path,
    types: &[String],
    out_dir: &Path,
    threads: i32,
    note: &mut dyn FnMut(String),
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<Vec<Quantized>> {
    let g = check_gguf(input)?;
    let in_type = file_type_name(g.get_u64("general.file_type").unwrap_or(u64::MAX)).to_string();
    let wanted: Vec<(String, u32)> = types
        .iter()
        .map(|t| Ok((t.trim().to_ascii_uppercase(), ftype(t)?)))
        .collect::<Result<_>>()?;
    if wanted.is_empty() {
        return Err(Error::Empty(Empty::QuantTypes));
    }
    // Two quantizers writing one directory would race on the same outputs.
    let _lock = crate::lock::DirLock::acquire(out_dir)?;
    let probe = out_dir.join(output_name(input, &wanted[0].0));
    crate::fsio::check_writable(&probe).map_err(|e| Error::io(out_dir, e))?;
    let in_sha = file_sha256(input)?;
    if is_quantized(&in_type) {
        note(format!(
            "{} is already {in_type}: outputs are requantized from it, so every result is relative to that {in_type} model, not to the original weights",
            input.display()
        ));
    }
    let mut out = vec![];
    for (i, (ty, ft)) in wanted.iter().enumerate() {
        progress(i, wanted.len(), ty);
        let path = out_dir.join(output_name(input, ty));
        let side = PathBuf::from(format!("{}.sha256", path.display()));
        let t0 = Instant::now();
        let recorded = std::fs::read_to_string(&side).ok();
        if let (Some(rec), true) = (recorded, path.is_file()) {
            let mut it = rec.split_whitespace();
            if let (Some(i_sha), Some(o_sha)) = (it.next(), it.next()) {
                if i_sha == in_sha && file_sha256(&path)? == o_sha {
                    out.push(Quantized {
                        ty: ty.clone(),
                        bytes: std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
                        path,
                        sha256: o_sha.to_string(),
                        reused: true,
                        seconds: t0.elapsed().as_secs_f64(),
                    });
                    continue;
                }
            }
        }
        let tmp = out_dir.join(format!(
            ".{}.tmp.{}",
            output_name(input, ty),
            std::process::id()
        ));
        let r = crate::ffi::quantize(input, &tmp, *ft, threads, true);
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::Run(RunError::Quantize {
                ty: ty.clone(),
                err: e,
            }));
        }
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        let sha = file_sha256(&path)?;
        write_atomic(&side, format!("{in_sha} {sha}\n").as_bytes())
            .map_err(|e| Error::io(&side, e))?;
        out.push(Quantized {
            ty: ty.clone(),
            bytes: std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
            path,
            sha256: sha,
            reused: false,
            seconds: t0.elapsed().as_secs_f64(),
        });
    }
    progress(wanted.len(), wanted.len(), "done");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_one_type() {
        let p = Path::new("/m/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert_eq!(output_name(p, "q8_0"), "SmolLM2-135M-Instruct.Q8_0.gguf");
        assert_eq!(output_name(Path::new("x-f16.gguf"), "Q2_K"), "x.Q2_K.gguf");
        assert_eq!(
            output_name(Path::new("plain.gguf"), "F16"),
            "plain.F16.gguf"
        );
        assert_eq!(ftype("q4_k_m").unwrap(), 15);
        assert!(ftype("Q9").unwrap_err().to_string().contains("known: F32"));
    }

    #[test]
    fn type_table_agrees_with_the_gguf_names() {
        for (n, t) in TYPES {
            assert_eq!(file_type_name(*t as u64), *n);
        }
    }
}
