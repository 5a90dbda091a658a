//! A small, safe GGUF reader: header, metadata and tensor table, no weights.
//!
//! We read GGUF ourselves before llama.cpp ever sees a file so that a missing, truncated or
//! foreign file gets a precise one-line error instead of a failed load, so that `info` can
//! answer without loading weights, and so that control-vector GGUFs can be imported. Every
//! length and count read from the file is bounded by the file's size before it is used.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

/// Why a file is not a usable GGUF. Each variant names what to look at.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("not a GGUF file (magic {0:02x?}, expected \"GGUF\")")]
    BadMagic([u8; 4]),
    #[error("unsupported GGUF version {0} (1 is obsolete; 2 and 3 are read)")]
    Version(u32),
    #[error("truncated: {what} runs past the end of the file ({size} bytes)")]
    Truncated { what: String, size: u64 },
    #[error("corrupt header: {0}")]
    Corrupt(String),
    #[error("truncated: tensor '{name}' needs bytes up to {end} but the file has {size}")]
    TensorOutOfBounds { name: String, end: u64, size: u64 },
}

/// A metadata value. Arrays keep their elements so vocabularies and templates can be read.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Absolute offset of the tensor data in the file.
    pub offset: u64,
    /// Byte size, when the type is one we know the block layout of.
    pub n_bytes: Option<u64>,
}

/// The parsed header of a GGUF file.
#[derive(Debug, Clone)]
pub struct Gguf {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub file_size: u64,
}

/// (block size in elements, bytes per block) for ggml types, by type id (ggml.h `ggml_type`).
/// Checked against ggml's own `ggml_blck_size`/`ggml_type_size` in the FFI tests.
pub fn ggml_type_layout(t: u32) -> Option<(u64, u64)> {
    Some(match t {
        0 => (1, 4),      // F32
        1 => (1, 2),      // F16
        2 => (32, 18),    // Q4_0
        3 => (32, 20),    // Q4_1
        6 => (32, 22),    // Q5_0
        7 => (32, 24),    // Q5_1
        8 => (32, 34),    // Q8_0
        9 => (32, 36),    // Q8_1
        10 => (256, 84),  // Q2_K
        11 => (256, 110), // Q3_K
        12 => (256, 144), // Q4_K
        13 => (256, 176), // Q5_K
        14 => (256, 210), // Q6_K
        15 => (256, 292), // Q8_K
        16 => (256, 66),  // IQ2_XXS
        17 => (256, 74),  // IQ2_XS
        18 => (256, 98),  // IQ3_XXS
        19 => (256, 50),  // IQ1_S
        20 => (32, 18),   // IQ4_NL
        21 => (256, 110), // IQ3_S
        22 => (256, 82),  // IQ2_S
        23 => (256, 136), // IQ4_XS
        24 => (1, 1),     // I8
        25 => (1, 2),     // I16
        26 => (1, 4),     // I32
        27 => (1, 8),     // I64
        28 => (1, 8),     // F64
        29 => (256, 56),  // IQ1_M
        30 => (1, 2),     // BF16
        34 => (256, 54),  // TQ1_0
        35 => (256, 66),  // TQ2_0
        _ => return None,
    })
}

/// Name of a `general.file_type` value (llama.h `llama_ftype`).
pub fn file_type_name(ftype: u64) -> &'static str {
    match ftype {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        _ => "unknown",
    }
}

struct Reader<R> {
    r: R,
    pos: u64,
    size: u64,
}

impl<R: Read> Reader<R> {
    fn need(&self, n: u64, what: &str) -> Result<(), GgufError> {
        if self.pos.checked_add(n).is_none_or(|end| end > self.size) {
            return Err(GgufError::Truncated {
                what: crate::text::shown(what),
                size: self.size,
            });
        }
        Ok(())
    }
    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        self.need(N as u64, what)?;
        let mut b = [0u8; N];
        self.r.read_exact(&mut b)?;
        self.pos += N as u64;
        Ok(b)
    }
    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }
    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let n = self.u64(what)?;
        self.need(n, what)?;
        let mut v = vec![0u8; n as usize];
        self.r.read_exact(&mut v)?;
        self.pos += n;
        String::from_utf8(v)
            .map_err(|_| GgufError::Corrupt(format!("{} is not UTF-8", crate::text::shown(what))))
    }
    fn value(&mut self, ty: u32, key: &str, depth: u8) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::U64(self.bytes::<1>(key)?[0] as u64),
            1 => Value::I64(self.bytes::<1>(key)?[0] as i8 as i64),
            2 => Value::U64(u16::from_le_bytes(self.bytes(key)?) as u64),
            3 => Value::I64(i16::from_le_bytes(self.bytes(key)?) as i64),
            4 => Value::U64(self.u32(key)? as u64),
            5 => Value::I64(i32::from_le_bytes(self.bytes(key)?) as i64),
            6 => Value::F64(f32::from_le_bytes(self.bytes(key)?) as f64),
            7 => Value::Bool(self.bytes::<1>(key)?[0] != 0),
            8 => Value::Str(self.string(key)?),
            9 => {
                if depth > 0 {
                    return Err(GgufError::Corrupt(format!(
                        "'{}': nested arrays",
                        crate::text::shown(key)
                    )));
                }
                let et = self.u32(key)?;
                let n = self.u64(key)?;
                // Every element takes at least one byte, so the count is bounded by the file.
                self.need(n, key)?;
                let mut v = Vec::with_capacity(n.min(1 << 20) as usize);
                for _ in 0..n {
                    v.push(self.value(et, key, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(self.u64(key)? as i64),
            12 => Value::F64(f64::from_le_bytes(self.bytes(key)?)),
            t => {
                return Err(GgufError::Corrupt(format!(
                    "'{}': unknown value type {t}",
                    crate::text::shown(key)
                )))
            }
        })
    }
}

impl Gguf {
    /// Reads the header of the GGUF file at `path` and checks that every tensor of a known
    /// type lies inside the file.
    ///
    /// # Errors
    /// I/O errors, a wrong magic, an unknown version, or a header or tensor that runs past
    /// the end of the file.
    pub fn open(path: &Path) -> Result<Gguf, GgufError> {
        let f = File::open(path)?;
        let size = f.metadata()?.len();
        Self::parse(BufReader::new(f), size)
    }

    /// Parses a GGUF header from any reader of `size` bytes (used by the fuzz targets).
    ///
    /// # Errors
    /// As [`Gguf::open`].
    pub fn parse<R: Read + Seek>(r: R, size: u64) -> Result<Gguf, GgufError> {
        let mut rd = Reader { r, pos: 0, size };
        let magic: [u8; 4] = rd.bytes("magic")?;
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic(magic));
        }
        let version = rd.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version(version));
        }
        let n_tensors = rd.u64("tensor count")?;
        let n_kv = rd.u64("metadata count")?;
        // Each key-value pair takes at least 12 bytes, each tensor entry at least 24.
        rd.need(n_kv.saturating_mul(12), "metadata table")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = rd.string("metadata key")?;
            let ty = rd.u32(&key)?;
            let v = rd.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        rd.need(n_tensors.saturating_mul(24), "tensor table")?;
        let mut tensors = Vec::with_capacity(n_tensors.min(1 << 16) as usize);
        for _ in 0..n_tensors {
            let name = rd.string("tensor name")?;
            let n_dims = rd.u32(&name)?;
            if n_dims > 4 {
                return Err(GgufError::Corrupt(format!(
                    "tensor '{}' has {n_dims} dims",
                    crate::text::shown(&name)
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(rd.u64(&name)?);
            }
            let ggml_type = rd.u32(&name)?;
            let offset = rd.u64(&name)?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                n_bytes: None,
            });
        }
        let align = match metadata.get("general.alignment").and_then(Value::as_u64) {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            Some(a) => return Err(GgufError::Corrupt(format!("general.alignment = {a}"))),
            None => DEFAULT_ALIGNMENT,
        };
        let data_start = rd.pos.div_ceil(align) * align;
        for t in &mut tensors {
            t.offset = data_start.checked_add(t.offset).ok_or_else(|| {
                GgufError::Corrupt(format!("tensor '{}' offset", crate::text::shown(&t.name)))
            })?;
            if let Some((blck, tsize)) = ggml_type_layout(t.ggml_type) {
                let n: Option<u64> = t.dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
                let bytes = n.and_then(|n| (n / blck).checked_mul(tsize));
                let end = bytes.and_then(|b| t.offset.checked_add(b));
                match end {
                    Some(end) if end <= size => t.n_bytes = bytes,
                    _ => {
                        return Err(GgufError::TensorOutOfBounds {
                            name: crate::text::shown(&t.name),
                            end: end.unwrap_or(u64::MAX),
                            size,
                        })
                    }
                }
            }
        }
        Ok(Gguf {
            version,
            metadata,
            tensors,
            file_size: size,
        })
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(Value::as_str)
    }
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.metadata.get(key).and_then(Value::as_u64)
    }
    /// `general.architecture`, e.g. "llama" or "qwen2".
    pub fn arch(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }
    /// An architecture-scoped key such as `<arch>.block_count`.
    pub fn arch_u64(&self, suffix: &str) -> Option<u64> {
        self.get_u64(&format!("{}.{suffix}", self.arch()?))
    }
}

/// Where tensor data is aligned when a file has no `general.alignment` key (GGUF's default).
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// The one GGUF writer: version 3, metadata of the types this crate writes (string, u32,
/// i32) and 1-D F32 tensors, each kept in the order given. Tensor data starts at the next
/// multiple of [`DEFAULT_ALIGNMENT`] after the tensor table and each tensor's data is padded
/// to it, as llama.cpp's own writer does (no `general.alignment` key is written). A file
/// without tensors has no data section and ends with its last key-value pair.
///
/// Control-vector export writes its files with it, and the tests craft their GGUF files with
/// it; what [`Gguf::parse`] reads back from its bytes is what was put in.
#[derive(Debug, Clone, Default)]
pub struct Writer {
    n_kv: u64,
    kv: Vec<u8>,
    /// Name, element count and little-endian F32 bytes of each tensor.
    tensors: Vec<(String, u64, Vec<u8>)>,
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn pad(b: &mut Vec<u8>) {
    while !(b.len() as u64).is_multiple_of(DEFAULT_ALIGNMENT) {
        b.push(0);
    }
}

impl Writer {
    pub fn new() -> Writer {
        Writer::default()
    }

    fn key(&mut self, key: &str, ty: u32) -> &mut Vec<u8> {
        self.n_kv += 1;
        put_str(&mut self.kv, key);
        self.kv.extend(ty.to_le_bytes());
        &mut self.kv
    }

    /// A string value (GGUF type 8).
    pub fn str(&mut self, key: &str, value: &str) -> &mut Writer {
        put_str(self.key(key, 8), value);
        self
    }

    /// A u32 value (GGUF type 4).
    pub fn u32(&mut self, key: &str, value: u32) -> &mut Writer {
        self.key(key, 4).extend(value.to_le_bytes());
        self
    }

    /// An i32 value (GGUF type 5).
    pub fn i32(&mut self, key: &str, value: i32) -> &mut Writer {
        self.key(key, 5).extend(value.to_le_bytes());
        self
    }

    /// A 1-D F32 tensor holding `values`.
    pub fn tensor_f32(&mut self, name: &str, values: impl IntoIterator<Item = f32>) -> &mut Writer {
        let data: Vec<u8> = values.into_iter().flat_map(f32::to_le_bytes).collect();
        self.tensors
            .push((name.to_string(), data.len() as u64 / 4, data));
        self
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend(self.n_kv.to_le_bytes());
        b.extend(&self.kv);
        let mut offset = 0u64;
        for (name, n, data) in &self.tensors {
            put_str(&mut b, name);
            b.extend(1u32.to_le_bytes());
            b.extend(n.to_le_bytes());
            b.extend(0u32.to_le_bytes()); // GGML_TYPE_F32
            b.extend(offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
        }
        if !self.tensors.is_empty() {
            pad(&mut b);
        }
        for (_, _, data) in &self.tensors {
            b.extend(data);
            pad(&mut b);
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A minimal valid GGUF with one string key and one 4-element F32 tensor (data padded
    /// to 32 bytes at the end), and where its tensor data ends.
    fn tiny() -> (Vec<u8>, usize) {
        let b = Writer::new()
            .str("general.architecture", "llama")
            .tensor_f32("direction.1", [0.0; 4])
            .to_bytes();
        let g = Gguf::parse(Cursor::new(&b), b.len() as u64).unwrap();
        let end = g.tensors[0].offset + g.tensors[0].n_bytes.unwrap();
        (b, end as usize)
    }

    #[test]
    fn reads_a_tiny_file() {
        let (b, _) = tiny();
        let g = Gguf::parse(Cursor::new(&b), b.len() as u64).unwrap();
        assert_eq!(g.arch(), Some("llama"));
        assert_eq!(g.tensors[0].n_bytes, Some(16));
    }

    #[test]
    fn truncated_tensor_data_is_named() {
        let (b, end) = tiny();
        let b = &b[..end - 8];
        let e = Gguf::parse(Cursor::new(b), b.len() as u64).unwrap_err();
        assert!(e.to_string().contains("direction.1"), "{e}");
    }

    #[test]
    fn every_prefix_is_an_error_not_a_panic() {
        // Every cut into the header or the tensor data (only trailing padding may go).
        let (b, end) = tiny();
        for n in 0..end {
            assert!(
                Gguf::parse(Cursor::new(&b[..n]), n as u64).is_err(),
                "prefix {n}"
            );
        }
    }

    /// Found by `make fuzz` (run 3): a key holding control characters whose string value is
    /// not UTF-8 was echoed raw into the error. Minimal equivalent of the artifact.
    #[test]
    fn fuzz_regression_key_of_a_non_utf8_value_is_escaped() {
        let mut b = Writer::new().str("gener\u{1}\r.finetune", "xx").to_bytes();
        // The value is the file's last two bytes: make them not UTF-8.
        let n = b.len();
        b[n - 2..].copy_from_slice(&[0xdb, 0xff]);
        let e = Gguf::parse(Cursor::new(&b), b.len() as u64)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not UTF-8"), "{e}");
        assert!(!e.contains(char::is_control), "{e:?}");
    }

    /// What the writer puts in, the reader reads back: every value type, tensors of sizes
    /// that do and do not fill the alignment, each tensor's data where the table says.
    #[test]
    fn writer_and_reader_agree() {
        let tensors: [(&str, Vec<f32>); 3] = [
            ("a", vec![1.5, -2.0, f32::MAX]),
            ("bb", (0..8).map(|i| i as f32 * 0.1).collect()),
            ("c.d", vec![f32::MIN_POSITIVE]),
        ];
        let mut w = Writer::new();
        w.str("general.architecture", "llama")
            .u32("llama.block_count", 4_000_000_000)
            .i32("x.signed", -7)
            .str("x.empty", "");
        for (name, v) in &tensors {
            w.tensor_f32(name, v.iter().copied());
        }
        let b = w.to_bytes();
        let g = Gguf::parse(Cursor::new(&b), b.len() as u64).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.file_size, b.len() as u64);
        assert_eq!(g.metadata.len(), 4);
        assert_eq!(g.arch(), Some("llama"));
        assert_eq!(g.arch_u64("block_count"), Some(4_000_000_000));
        assert_eq!(g.metadata["x.signed"], Value::I64(-7));
        assert_eq!(g.get_str("x.empty"), Some(""));
        assert_eq!(g.tensors.len(), tensors.len());
        for (t, (name, v)) in g.tensors.iter().zip(&tensors) {
            assert_eq!(t.name, *name);
            assert_eq!(t.dims, [v.len() as u64]);
            assert_eq!(t.ggml_type, 0);
            assert_eq!(t.offset % DEFAULT_ALIGNMENT, 0, "{name}");
            assert_eq!(t.n_bytes, Some(4 * v.len() as u64));
            let at = t.offset as usize;
            let back: Vec<f32> = b[at..at + 4 * v.len()]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(back, *v, "{name}");
        }
        assert_eq!(b.len() as u64 % DEFAULT_ALIGNMENT, 0);
        // Without tensors the file ends with its last key-value pair.
        let b = Writer::new().u32("k", 1).to_bytes();
        assert_eq!(b.len(), 24 + 8 + 1 + 4 + 4);
        let g = Gguf::parse(Cursor::new(&b), b.len() as u64).unwrap();
        assert_eq!(g.get_u64("k"), Some(1));
        assert!(g.tensors.is_empty());
    }

    #[test]
    fn wrong_magic() {
        let b = b"GGML\x03\0\0\0".to_vec();
        assert!(matches!(
            Gguf::parse(Cursor::new(&b), 8),
            Err(GgufError::BadMagic(_))
        ));
    }
}

#[cfg(test)]
mod ggml_tests {
    /// Our block table must agree with ggml's own for every type we know.
    #[test]
    fn type_table_matches_ggml() {
        for t in 0..40u32 {
            if let Some(ours) = super::ggml_type_layout(t) {
                assert_eq!(ours, crate::ffi::ggml_type_layout(t), "ggml type {t}");
            }
        }
    }
}
