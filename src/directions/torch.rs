//! PyTorch `.pt` files as `torch.save` writes them since PyTorch 1.6: a ZIP archive (read
//! with the `zip` crate) of `<name>/data.pkl`, a pickle naming each tensor's storage, dtype,
//! offset, shape and stride, and the storages as `<name>/data/<key>`.
//!
//! The pickle is read by the small interpreter here rather than a crate: the Rust readers of
//! torch checkpoints (`pytorch-reader` 0.22 from Burn, candle's `pickle`) accept only a
//! dictionary at the root, and the steering repositories `torch.save` a bare tensor
//! (`pytorch-reader` says "Expected a dictionary at the root of the PyTorch file, found
//! torch.Tensor"); `serde-pickle` has no persistent ids, which is how a storage is named. It
//! understands the opcodes of protocols 2 to 5 that torch.save emits and builds only plain
//! values, tensors and placeholders: no Python object is ever called. Budgets on pickle
//! size, nesting and copied values bound what a hostile file can make it allocate.
//!
//! A container stored in the memo and fetched again reads as it was when stored (values are
//! copied, not shared); torch.save memoizes tensors only once they are built, so a tensor
//! saved twice (tied weights) reads whole both times.
//!
//! A tensor is gathered through its offset and strides, so a view saved with its whole
//! storage (refusal_direction's `direction.pt` is `mean_diffs[pos, layer]`, saved with all of
//! `mean_diffs` behind it) reads as the view.

use std::collections::HashMap;
use std::io::{Cursor, Read};

use super::import::{Foreign, Tensor, MAX_VALUES};
use crate::error::{Error, ImportProblem, Result};

/// Largest `data.pkl` read: a state dict of thousands of tensors has a pickle of a few MB.
const MAX_PICKLE: u64 = 64 << 20;
/// Deepest nesting of containers.
const MAX_DEPTH: u32 = 64;
/// Values the pickle may build or copy in all (a string counts a unit per 16 bytes).
const MAX_UNITS: u64 = 1 << 23;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Dtype {
    F32,
    F64,
    F16,
    Bf16,
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F64 => 8,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F64 => "float64",
            Dtype::F16 => "float16",
            Dtype::Bf16 => "bfloat16",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Storage {
    /// `None` for a storage class that is not floating point (its name kept for the error).
    dtype: std::result::Result<Dtype, String>,
    key: String,
    numel: u64,
}

#[derive(Debug, Clone, PartialEq)]
struct TensorRef {
    storage: Storage,
    offset: u64,
    shape: Vec<u64>,
    stride: Vec<u64>,
}

/// A value of the pickle machine. Containers cache their depth and size in units.
#[derive(Debug, Clone, PartialEq)]
enum V {
    Mark,
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes,
    Global(String, String),
    Storage(Storage),
    Tensor(TensorRef),
    Seq(Vec<V>, u32, u64),
    Dict(Vec<(V, V)>, u32, u64),
    /// Anything else, by the name of what would have built it.
    Object(String),
}

impl V {
    fn depth(&self) -> u32 {
        match self {
            V::Seq(_, d, _) | V::Dict(_, d, _) => *d,
            _ => 0,
        }
    }
    fn units(&self) -> u64 {
        match self {
            V::Seq(_, _, u) | V::Dict(_, _, u) => *u,
            V::Str(s) => 1 + s.len() as u64 / 16,
            V::Tensor(t) => 2 + t.shape.len() as u64,
            _ => 1,
        }
    }
    /// What the value is, for messages.
    fn kind(&self) -> String {
        match self {
            V::Mark => "a mark".into(),
            V::None => "None".into(),
            V::Bool(_) => "a bool".into(),
            V::Int(_) => "an int".into(),
            V::Float(_) => "a float".into(),
            V::Str(_) => "a string".into(),
            V::Bytes => "bytes".into(),
            V::Global(m, n) => format!("{m}.{n}"),
            V::Storage(_) => "a storage".into(),
            V::Tensor(_) => "a tensor".into(),
            V::Seq(..) => "a tuple or list".into(),
            V::Dict(..) => "a dict".into(),
            V::Object(n) => format!("a {n} object"),
        }
    }
}

fn seq(items: Vec<V>) -> std::result::Result<V, String> {
    let depth = 1 + items.iter().map(V::depth).max().unwrap_or(0);
    let units = 1 + items.iter().map(V::units).sum::<u64>();
    if depth > MAX_DEPTH {
        return Err(format!("containers nested deeper than {MAX_DEPTH}"));
    }
    Ok(V::Seq(items, depth, units))
}

fn dict(items: Vec<(V, V)>) -> std::result::Result<V, String> {
    let depth = 1 + items
        .iter()
        .map(|(k, v)| k.depth().max(v.depth()))
        .max()
        .unwrap_or(0);
    let units = 1 + items
        .iter()
        .map(|(k, v)| k.units() + v.units())
        .sum::<u64>();
    if depth > MAX_DEPTH {
        return Err(format!("containers nested deeper than {MAX_DEPTH}"));
    }
    Ok(V::Dict(items, depth, units))
}

struct Machine<'a> {
    b: &'a [u8],
    pos: usize,
    stack: Vec<V>,
    memo: HashMap<u32, V>,
    units: u64,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| format!("ends inside an argument of {n} bytes"))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> std::result::Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn line(&mut self) -> std::result::Result<String, String> {
        let rest = &self.b[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or("a GLOBAL name without its newline")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "a GLOBAL name that is not UTF-8")?;
        self.pos += n + 1;
        Ok(s.to_string())
    }
    fn text(&mut self, n: u64) -> std::result::Result<String, String> {
        let n = usize::try_from(n).map_err(|_| "a string longer than the pickle")?;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| "a string that is not UTF-8".into())
    }
    fn charge(&mut self, units: u64) -> std::result::Result<(), String> {
        self.units += units;
        if self.units > MAX_UNITS {
            return Err(format!(
                "builds more than {MAX_UNITS} values; not a direction file"
            ));
        }
        Ok(())
    }
    fn push(&mut self, v: V) -> std::result::Result<(), String> {
        self.charge(v.units())?;
        self.stack.push(v);
        Ok(())
    }
    fn pop(&mut self) -> std::result::Result<V, String> {
        match self.stack.pop() {
            Some(V::Mark) | None => Err("pops an empty stack".into()),
            Some(v) => Ok(v),
        }
    }
    fn pop_mark(&mut self) -> std::result::Result<Vec<V>, String> {
        let at = self
            .stack
            .iter()
            .rposition(|v| matches!(v, V::Mark))
            .ok_or("no MARK on the stack")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }
    fn top(&mut self) -> std::result::Result<&mut V, String> {
        match self.stack.last_mut() {
            Some(V::Mark) | None => Err("an empty stack".into()),
            Some(v) => Ok(v),
        }
    }
    /// A copy of `v`, charged by its size (a memo entry fetched again and again cannot grow
    /// memory without bound).
    fn copy(&mut self, v: &V) -> std::result::Result<V, String> {
        self.charge(v.units())?;
        Ok(v.clone())
    }
    fn memo_put(&mut self, i: u32) -> std::result::Result<(), String> {
        let v = self.top()?.clone();
        let v = self.copy(&v)?;
        self.memo.insert(i, v);
        Ok(())
    }
    fn memo_get(&mut self, i: u32) -> std::result::Result<(), String> {
        let v = self
            .memo
            .get(&i)
            .ok_or_else(|| format!("memo {i} was never stored"))?
            .clone();
        let v = self.copy(&v)?;
        self.stack.push(v);
        Ok(())
    }
    fn append(&mut self, items: Vec<V>) -> std::result::Result<(), String> {
        match self.top()? {
            V::Seq(v, ..) => {
                let mut all = std::mem::take(v);
                all.extend(items);
                *self.top()? = seq(all)?;
                Ok(())
            }
            V::Object(_) => Ok(()),
            other => Err(format!("appends to {}", other.kind())),
        }
    }
    fn set_items(&mut self, items: Vec<V>) -> std::result::Result<(), String> {
        if !items.len().is_multiple_of(2) {
            return Err("SETITEMS with a key and no value".into());
        }
        match self.top()? {
            V::Dict(d, ..) => {
                let mut all = std::mem::take(d);
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    all.push((k, v));
                }
                *self.top()? = dict(all)?;
                Ok(())
            }
            // Items of an object we do not build (a state dict's OrderedDict subclass, say).
            V::Object(_) => Ok(()),
            other => Err(format!("sets items of {}", other.kind())),
        }
    }

    fn run(mut self) -> std::result::Result<V, (usize, String)> {
        loop {
            let at = self.pos;
            let step = self.step();
            match step {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(why) => return Err((at, why)),
            }
        }
    }

    /// One opcode; the result at STOP.
    fn step(&mut self) -> std::result::Result<Option<V>, String> {
        let op = self.u8().map_err(|_| "ends without STOP".to_string())?;
        match op {
            0x80 => {
                let p = self.u8()?;
                if p > 5 {
                    return Err(format!("pickle protocol {p} (at most 5 exists)"));
                }
            }
            0x95 => {
                self.u64()?;
            }
            b'.' => return self.pop().map(Some),
            b'(' => self.stack.push(V::Mark),
            b')' | b']' => self.push(seq(vec![])?)?,
            b'}' => self.push(dict(vec![])?)?,
            b't' | b'l' => {
                let items = self.pop_mark()?;
                self.push(seq(items)?)?;
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.push(seq(items)?)?;
            }
            b'd' => {
                let items = self.pop_mark()?;
                self.push(dict(vec![])?)?;
                self.set_items(items)?;
            }
            b'a' => {
                let v = self.pop()?;
                self.append(vec![v])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.append(items)?;
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![k, v])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_items(items)?;
            }
            b'N' => self.push(V::None)?,
            0x88 => self.push(V::Bool(true))?,
            0x89 => self.push(V::Bool(false))?,
            b'J' => {
                let v = self.u32()? as i32;
                self.push(V::Int(i64::from(v)))?;
            }
            b'K' => {
                let v = self.u8()?;
                self.push(V::Int(i64::from(v)))?;
            }
            b'M' => {
                let v = self.u16()?;
                self.push(V::Int(i64::from(v)))?;
            }
            0x8a => {
                let n = self.u8()? as usize;
                let raw = self.take(n)?;
                if n > 8 {
                    return Err(format!("an integer of {n} bytes"));
                }
                let mut b = if raw.last().is_some_and(|&x| x & 0x80 != 0) {
                    [0xff; 8]
                } else {
                    [0; 8]
                };
                b[..n].copy_from_slice(raw);
                self.push(V::Int(i64::from_le_bytes(b)))?;
            }
            b'G' => {
                let v = f64::from_be_bytes(self.take(8)?.try_into().expect("8"));
                self.push(V::Float(v))?;
            }
            b'X' => {
                let n = self.u32()?;
                let s = self.text(u64::from(n))?;
                self.push(V::Str(s))?;
            }
            0x8c => {
                let n = self.u8()?;
                let s = self.text(u64::from(n))?;
                self.push(V::Str(s))?;
            }
            0x8d => {
                let n = self.u64()?;
                let s = self.text(n)?;
                self.push(V::Str(s))?;
            }
            b'U' | b'C' => {
                let n = self.u8()? as usize;
                self.take(n)?;
                self.push(V::Bytes)?;
            }
            b'T' | b'B' => {
                let n = self.u32()? as usize;
                self.take(n)?;
                self.push(V::Bytes)?;
            }
            0x8e => {
                let n = usize::try_from(self.u64()?).map_err(|_| "bytes longer than the pickle")?;
                self.take(n)?;
                self.push(V::Bytes)?;
            }
            b'q' => {
                let i = self.u8()?;
                self.memo_put(u32::from(i))?;
            }
            b'r' => {
                let i = self.u32()?;
                self.memo_put(i)?;
            }
            0x94 => {
                let i = u32::try_from(self.memo.len()).map_err(|_| "too many memo entries")?;
                self.memo_put(i)?;
            }
            b'h' => {
                let i = self.u8()?;
                self.memo_get(u32::from(i))?;
            }
            b'j' => {
                let i = self.u32()?;
                self.memo_get(i)?;
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.push(V::Global(module, name))?;
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (module, name) {
                    (V::Str(m), V::Str(n)) => self.push(V::Global(m, n))?,
                    _ => return Err("STACK_GLOBAL of names that are not strings".into()),
                }
            }
            b'R' => {
                let args = self.pop()?;
                let f = self.pop()?;
                let v = reduce(f, args)?;
                self.push(v)?;
            }
            0x81 => {
                let _args = self.pop()?;
                let cls = self.pop()?;
                self.push(V::Object(cls.kind()))?;
            }
            b'b' => {
                // __setstate__ of what is below: our values carry no state.
                self.pop()?;
                self.top()?;
            }
            b'Q' => {
                let pid = self.pop()?;
                let v = persistent(pid)?;
                self.push(v)?;
            }
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                let v = self.copy(&v)?;
                self.stack.push(v);
            }
            other => return Err(format!("opcode 0x{other:02x} is not one torch.save writes")),
        }
        Ok(None)
    }
}

fn int(v: &V, what: &str) -> std::result::Result<u64, String> {
    match v {
        V::Int(i) if *i >= 0 => Ok(*i as u64),
        other => Err(format!(
            "{what} is {}, not a non-negative int",
            other.kind()
        )),
    }
}

fn ints(v: &V, what: &str) -> std::result::Result<Vec<u64>, String> {
    match v {
        V::Seq(items, ..) => items.iter().map(|i| int(i, what)).collect(),
        other => Err(format!("{what} is {}, not a tuple", other.kind())),
    }
}

/// `('storage', torch.<Type>Storage, key, location, numel)`: a storage in `data/<key>`.
fn persistent(pid: V) -> std::result::Result<V, String> {
    let V::Seq(items, ..) = pid else {
        return Err(format!("a persistent id that is {}", pid.kind()));
    };
    match &items[..] {
        [V::Str(tag), V::Global(module, class), V::Str(key), _location, numel, ..]
            if tag == "storage" =>
        {
            let dtype = match (module.as_str(), class.as_str()) {
                ("torch", "FloatStorage") => Ok(Dtype::F32),
                ("torch", "DoubleStorage") => Ok(Dtype::F64),
                ("torch", "HalfStorage") => Ok(Dtype::F16),
                ("torch", "BFloat16Storage") => Ok(Dtype::Bf16),
                _ => Err(format!("{module}.{class}")),
            };
            Ok(V::Storage(Storage {
                dtype,
                key: key.clone(),
                numel: int(numel, "a storage's size")?,
            }))
        }
        _ => Err("a persistent id that is not ('storage', type, key, location, size)".into()),
    }
}

/// Calls `f(*args)` for the few callables a tensor file needs; anything else becomes a
/// placeholder [`V::Object`].
fn reduce(f: V, args: V) -> std::result::Result<V, String> {
    let V::Global(module, name) = &f else {
        return Err(format!("REDUCE calls {}", f.kind()));
    };
    let V::Seq(a, ..) = &args else {
        return Err(format!("REDUCE of {module}.{name} with {}", args.kind()));
    };
    match (module.as_str(), name.as_str(), &a[..]) {
        // _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])
        (
            "torch._utils",
            "_rebuild_tensor_v2" | "_rebuild_tensor",
            [V::Storage(s), o, size, stride, ..],
        ) => {
            let shape = ints(size, "a tensor's size")?;
            let stride = ints(stride, "a tensor's stride")?;
            if shape.len() != stride.len() {
                return Err(format!("a tensor of size {shape:?} with stride {stride:?}"));
            }
            Ok(V::Tensor(TensorRef {
                storage: s.clone(),
                offset: int(o, "a tensor's offset")?,
                shape,
                stride,
            }))
        }
        // nn.Parameter(tensor, requires_grad, hooks)
        (
            "torch._utils",
            "_rebuild_parameter" | "_rebuild_parameter_with_state",
            [t @ V::Tensor(_), ..],
        ) => Ok(t.clone()),
        // A tensor subclass: _rebuild_from_type_v2(func, type, args, state) is func(*args).
        ("torch._tensor", "_rebuild_from_type_v2", [func, _, inner, ..]) => {
            reduce(func.clone(), inner.clone())
        }
        ("collections", "OrderedDict", []) => dict(vec![]),
        _ => Ok(V::Object(format!("{module}.{name}"))),
    }
}

/// Parses a pickle into its root value (the fuzz-style tests call this on every prefix).
fn parse_pickle(b: &[u8]) -> Result<V> {
    Machine {
        b,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        units: 0,
    }
    .run()
    .map_err(|(at, why)| Error::Import(ImportProblem::Pickle { at, why }))
}

/// The tensors under `v`, named by their path through dicts and lists (`a.b`, `layers.0`);
/// a bare tensor gets `name`.
fn collect(v: &V, name: &str, out: &mut Vec<(String, TensorRef)>) {
    let join = |k: &str| {
        if name.is_empty() {
            k.to_string()
        } else {
            format!("{name}.{k}")
        }
    };
    match v {
        V::Tensor(t) => out.push((name.to_string(), t.clone())),
        V::Dict(items, ..) => {
            for (k, v) in items {
                let k = match k {
                    V::Str(s) => s.clone(),
                    V::Int(i) => i.to_string(),
                    _ => continue,
                };
                collect(v, &join(&k), out);
            }
        }
        V::Seq(items, ..) => {
            for (i, v) in items.iter().enumerate() {
                collect(v, &join(&i.to_string()), out);
            }
        }
        _ => {}
    }
}

fn archive_err(e: impl std::fmt::Display) -> Error {
    Error::Import(ImportProblem::Archive(e.to_string()))
}

fn entry(z: &mut zip::ZipArchive<Cursor<&[u8]>>, name: &str, cap: u64) -> Result<Vec<u8>> {
    let f = z
        .by_name(name)
        .map_err(|e| archive_err(format!("{name}: {e}")))?;
    if f.size() > cap {
        return Err(archive_err(format!(
            "{name} is {} bytes, more than {cap}",
            f.size()
        )));
    }
    let mut out = Vec::with_capacity(f.size() as usize);
    f.take(cap)
        .read_to_end(&mut out)
        .map_err(|e| archive_err(format!("{name}: {e}")))?;
    Ok(out)
}

/// The values of `t` in row-major order, gathered from its storage's bytes.
fn gather(name: &str, t: &TensorRef, bytes: &[u8], big_endian: bool) -> Result<Vec<f32>> {
    let bad = |why: String| {
        Error::Import(ImportProblem::Archive(format!(
            "tensor '{}': {why}",
            crate::text::shown(name)
        )))
    };
    let dtype = t.storage.dtype.clone().map_err(|class| {
        Error::Import(ImportProblem::NotFloat {
            tensor: name.to_string(),
            dtype: class,
        })
    })?;
    let numel: u128 = t.shape.iter().map(|&s| u128::from(s)).product();
    if numel > MAX_VALUES {
        return Err(Error::Import(ImportProblem::TooLarge {
            tensor: name.to_string(),
            values: numel,
        }));
    }
    let last: u128 = u128::from(t.offset)
        + t.shape
            .iter()
            .zip(&t.stride)
            .map(|(&s, &st)| u128::from(s.saturating_sub(1)) * u128::from(st))
            .sum::<u128>();
    let size = dtype.size();
    if numel > 0 && last >= u128::from(t.storage.numel) {
        return Err(bad(format!(
            "offset {} size {:?} stride {:?} reach past its storage of {} values",
            t.offset, t.shape, t.stride, t.storage.numel
        )));
    }
    if (bytes.len() as u128) < u128::from(t.storage.numel) * size as u128 {
        return Err(bad(format!(
            "storage data/{} has {} bytes, not the {} x {} its size says",
            t.storage.key,
            bytes.len(),
            t.storage.numel,
            size
        )));
    }
    let read = |i: usize| -> f32 {
        let mut raw = [0u8; 8];
        raw[..size].copy_from_slice(&bytes[i * size..(i + 1) * size]);
        if big_endian {
            raw[..size].reverse();
        }
        match dtype {
            Dtype::F32 => f32::from_le_bytes(raw[..4].try_into().expect("4")),
            Dtype::F64 => f64::from_le_bytes(raw) as f32,
            Dtype::F16 => half::f16::from_le_bytes([raw[0], raw[1]]).to_f32(),
            Dtype::Bf16 => half::bf16::from_le_bytes([raw[0], raw[1]]).to_f32(),
        }
    };
    let mut out = Vec::with_capacity(numel as usize);
    let mut idx = vec![0u64; t.shape.len()];
    for _ in 0..numel {
        let at = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<u64>();
        out.push(read(at as usize));
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < t.shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok(out)
}

/// Reads the float tensors of a torch.save ZIP archive; a bare tensor is named `name`.
///
/// # Errors
/// [`Error::Import`]: not a torch.save archive, a pickle that does not parse, no float
/// tensors, a tensor of another dtype or outside its storage.
pub(crate) fn read(bytes: &[u8], name: &str) -> Result<Foreign> {
    let mut z = zip::ZipArchive::new(Cursor::new(bytes)).map_err(archive_err)?;
    let pkls: Vec<String> = z
        .file_names()
        .filter_map(|n| n.ok().map(std::borrow::Cow::into_owned))
        .filter(|n| n == "data.pkl" || n.ends_with("/data.pkl"))
        .collect();
    let [pkl] = &pkls[..] else {
        return Err(archive_err(format!(
            "{} data.pkl entries, expected one (a ZIP that torch.save did not write?)",
            pkls.len()
        )));
    };
    let prefix = &pkl[..pkl.len() - "data.pkl".len()];
    let big_endian = match z.index_for_name(&format!("{prefix}byteorder")) {
        Some(_) => entry(&mut z, &format!("{prefix}byteorder"), 16)? == b"big",
        None => false,
    };
    let root = parse_pickle(&entry(&mut z, pkl, MAX_PICKLE)?)?;
    let mut found = Vec::new();
    collect(&root, "", &mut found);
    if found.is_empty() {
        return Err(Error::Import(ImportProblem::NoTensors {
            root: root.kind(),
        }));
    }
    let mut dtypes = Vec::new();
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut tensors = Vec::new();
    for (n, t) in found {
        let n = if n.is_empty() { name.to_string() } else { n };
        if !storages.contains_key(&t.storage.key) {
            let data = entry(
                &mut z,
                &format!("{prefix}data/{}", t.storage.key),
                bytes.len() as u64,
            )?;
            storages.insert(t.storage.key.clone(), data);
        }
        let data = gather(&n, &t, &storages[&t.storage.key], big_endian)?;
        if let Ok(d) = t.storage.dtype {
            if !dtypes.contains(&d.name()) {
                dtypes.push(d.name());
            }
        }
        tensors.push(Tensor {
            name: n,
            shape: t.shape.iter().map(|&s| s as usize).collect(),
            data,
        });
    }
    Ok(Foreign {
        format: format!("torch.save {}", dtypes.join("/")),
        tensors,
        meta: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pickle torch 2.x writes for `torch.save(torch.arange(12.).reshape(3, 4))`
    /// (as `pickletools.dis` lists it).
    fn bare_pickle(storage: &str, offset: u8, size: [u8; 2], stride: [u8; 2]) -> Vec<u8> {
        let mut p = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00((X\x07\x00\x00\x00storageq\x01ctorch\n".to_vec();
        p.extend(storage.as_bytes());
        p.extend(b"\nq\x02X\x01\x00\x00\x000q\x03X\x03\x00\x00\x00cpuq\x04K\x0ctq\x05QK");
        p.push(offset);
        p.extend([b'K', size[0], b'K', size[1], 0x86, b'q', 6]);
        p.extend([b'K', stride[0], b'K', stride[1], 0x86, b'q', 7]);
        p.extend(b"\x89ccollections\nOrderedDict\nq\x08)Rq\ttq\nRq\x0b.");
        p
    }

    #[test]
    fn a_bare_tensor_pickle_parses_to_a_tensor() {
        let v = parse_pickle(&bare_pickle("FloatStorage", 0, [3, 4], [4, 1])).unwrap();
        let V::Tensor(t) = v else { panic!("{v:?}") };
        assert_eq!(
            (t.storage.dtype, t.storage.key.as_str(), t.storage.numel),
            (Ok(Dtype::F32), "0", 12)
        );
        assert_eq!((t.offset, t.shape, t.stride), (0, vec![3, 4], vec![4, 1]));
        // Every cut is an error, not a panic.
        let p = bare_pickle("FloatStorage", 0, [3, 4], [4, 1]);
        for n in 0..p.len() {
            assert!(parse_pickle(&p[..n]).is_err(), "prefix {n}");
        }
    }

    #[test]
    fn views_are_gathered_through_offset_and_stride() {
        let bytes: Vec<u8> = (0..12).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let t = |offset, shape: Vec<u64>, stride: Vec<u64>| TensorRef {
            storage: Storage {
                dtype: Ok(Dtype::F32),
                key: "0".into(),
                numel: 12,
            },
            offset,
            shape,
            stride,
        };
        // Row 2 of a [3, 4] matrix, and its transpose [4, 3].
        assert_eq!(
            gather("x", &t(8, vec![4], vec![1]), &bytes, false).unwrap(),
            vec![8.0, 9.0, 10.0, 11.0]
        );
        assert_eq!(
            gather("x", &t(0, vec![4, 3], vec![1, 4]), &bytes, false).unwrap()[..4],
            [0.0, 4.0, 8.0, 1.0]
        );
        let e = gather("x", &t(9, vec![4], vec![1]), &bytes, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("reach past its storage of 12 values"), "{e}");
        let e = gather("x", &t(0, vec![12], vec![1]), &bytes[..40], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("has 40 bytes, not the 12 x 4"), "{e}");
    }

    #[test]
    fn hostile_pickles_are_bounded() {
        // A list appended to itself through the memo doubles each time: stopped by the budget.
        let mut p = b"\x80\x02]q\x00".to_vec();
        for _ in 0..40 {
            p.extend(b"h\x00h\x00\x86q\x00");
        }
        p.push(b'.');
        let e = parse_pickle(&p).unwrap_err().to_string();
        assert!(
            e.contains("builds more than") || e.contains("nested deeper"),
            "{e}"
        );
        let deep = [
            b"\x80\x02".to_vec(),
            vec![b']'; 100],
            vec![b'a'; 99],
            vec![b'.'],
        ]
        .concat();
        assert!(parse_pickle(&deep)
            .unwrap_err()
            .to_string()
            .contains("nested deeper than 64"));
        assert!(parse_pickle(b"\x80\x02\xff.")
            .unwrap_err()
            .to_string()
            .contains("opcode 0xff"));
        assert!(parse_pickle(b"\x80\x02.")
            .unwrap_err()
            .to_string()
            .contains("empty stack"));
        // A callable we do not know is a placeholder, never called.
        assert_eq!(
            parse_pickle(b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.").unwrap(),
            V::Object("os.system".into())
        );
    }
}
