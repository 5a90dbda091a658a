//! Up-front memory check: will the weights plus the KV cache plus llama.cpp's buffers fit in
//! the memory this process can see? A run that would not fit is refused with the numbers, or
//! runs with fewer sequences in parallel (results do not depend on `--parallel`: batched and
//! solo decoding are bit-identical), instead of being killed by the OOM killer an hour in.
//!
//! The estimate follows what llama.cpp allocates on the CPU backend (checked against its own
//! buffer-size log lines on SmolLM2 and Qwen2.5): weights ≈ the file; KV = f16 K and V for
//! every layer, KV head and cell; the compute buffer is dominated by the worst-case logits of
//! a full ubatch (`n_batch × n_vocab` f32); the output buffer holds one logits row per
//! sequence. GPU offload is not estimated: llama.cpp's own allocation failure is reported.

use std::path::Path;

use crate::error::{Error, Result, RunError, SizeProblem};
use crate::gguf::Gguf;
/// Memory sizes as `info` and the errors print them.
pub use crate::text::gib;

const MIB: u64 = 1 << 20;

/// The fewest spare KV streams that hold decoded shared prefixes until every member has
/// copied them. A session takes up to one per slot when memory allows (see
/// [`Footprint::prefix_streams`]): prompts of that many clusters are then
/// admitted side by side, sorted by length, so equal lengths share wide prefill calls.
pub const CACHE_STREAMS: u32 = 2;

/// Our own allocations and the runtime: prompts, kept logits, threads' stacks.
const OVERHEAD: u64 = 64 * MIB;

/// What a model needs, from its GGUF header.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Footprint {
    pub weights: u64,
    /// f16 K + V bytes per KV cell (one token of one sequence), all layers.
    pub kv_per_cell: u64,
    pub n_vocab: u64,
    pub n_embd: u64,
}

impl Footprint {
    /// From the header's attention sizes; missing keys fall back to full multi-head sizes.
    pub fn of(g: &Gguf, n_layer: usize, n_embd: usize, n_vocab: usize) -> Footprint {
        let n_head = g.arch_u64("attention.head_count").unwrap_or(1).max(1);
        // Some architectures store per-layer arrays; the scalar form is the common case and
        // the number of query heads an upper bound otherwise.
        let n_head_kv = g.arch_u64("attention.head_count_kv").unwrap_or(n_head);
        let head = n_embd as u64 / n_head;
        let k = g.arch_u64("attention.key_length").unwrap_or(head);
        let v = g.arch_u64("attention.value_length").unwrap_or(head);
        Footprint {
            weights: g.file_size,
            kv_per_cell: n_layer as u64 * n_head_kv * (k + v) * 2,
            n_vocab: n_vocab as u64,
            n_embd: n_embd as u64,
        }
    }

    /// KV-cache bytes for `parallel` sequences plus the engine's fewest prefix streams.
    pub fn kv(&self, ctx: u32, parallel: u32) -> u64 {
        self.kv_streams(ctx, parallel + CACHE_STREAMS)
    }

    /// KV-cache bytes for `streams` streams of `ctx` cells (llama.cpp rounds each up to a
    /// multiple of 256 cells).
    pub fn kv_streams(&self, ctx: u32, streams: u32) -> u64 {
        self.kv_per_cell * (ctx as u64).div_ceil(256) * 256 * streams as u64
    }

    /// Bytes for a context of `parallel` sequences of `ctx` cells, `batch` tokens per decode,
    /// with the engine's fewest shared-prefix streams.
    pub fn need(&self, ctx: u32, batch: u32, parallel: u32) -> u64 {
        self.need_with(ctx, batch, parallel, CACHE_STREAMS)
    }

    /// As [`Footprint::need`] with `prefix` shared-prefix streams.
    pub fn need_with(&self, ctx: u32, batch: u32, parallel: u32, prefix: u32) -> u64 {
        let kv = self.kv_streams(ctx, parallel + prefix);
        let compute = batch as u64 * 4 * (self.n_vocab + 8 * self.n_embd) + 16 * MIB;
        let output = parallel as u64 * self.n_vocab * 4;
        self.weights + kv + compute + output + OVERHEAD
    }

    /// The most shared-prefix streams, from the engine's fewest up to `want`, that fit
    /// `budget` beside `parallel` sequences. More streams let prompts of many clusters
    /// (conditions, system prompts) be admitted side by side, sorted by length.
    pub fn prefix_streams(
        &self,
        budget: &Budget,
        ctx: u32,
        batch: u32,
        parallel: u32,
        want: u32,
    ) -> u32 {
        let min = CACHE_STREAMS;
        (min..=want.max(min))
            .rev()
            .find(|&n| self.need_with(ctx, batch, parallel, n) <= budget.bytes)
            .unwrap_or(min)
    }
}

/// Memory this process may use and where that figure comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    pub bytes: u64,
    pub source: String,
}

/// `--max-memory` when given, else the smaller of the kernel's MemAvailable and the room
/// left under a cgroup v2 memory limit. None when neither can be read (not Linux).
pub fn budget(max_memory: Option<u64>) -> Option<Budget> {
    if let Some(b) = max_memory {
        return Some(Budget {
            bytes: b,
            source: "--max-memory".into(),
        });
    }
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| mem_available(&s))
        .map(|b| Budget {
            bytes: b,
            source: "MemAvailable in /proc/meminfo".into(),
        });
    let cg = cgroup_room(Path::new("/sys/fs/cgroup")).map(|b| Budget {
        bytes: b,
        source: "the cgroup memory limit".into(),
    });
    match (mem, cg) {
        (Some(m), Some(c)) => Some(if c.bytes < m.bytes { c } else { m }),
        (m, c) => m.or(c),
    }
}

/// `MemAvailable:  123 kB` → bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix("MemAvailable:")?;
        let kb: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// `memory.max − memory.current` of this process's cgroup (v2), if limited.
fn cgroup_room(root: &Path) -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = root.join(rel.trim_start_matches('/'));
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    room(&read("memory.max")?, &read("memory.current")?)
}

fn room(max: &str, current: &str) -> Option<u64> {
    let max: u64 = max.trim().parse().ok()?; // "max" (no limit) does not parse
    let cur: u64 = current.trim().parse().ok()?;
    Some(max.saturating_sub(cur))
}

/// `8G`, `512M`, `2.5GiB`, `1000000` (bytes) → bytes.
///
/// # Errors
/// [`Error::Size`]: not a number, an unknown unit, or not a positive size.
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = |problem| Error::Size {
        text: s.to_string(),
        problem,
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num.parse().map_err(|_| bad(SizeProblem::NotSize))?;
    let mul = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1u64,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return Err(bad(SizeProblem::Unit(unit.to_string()))),
    };
    let b = x * mul as f64;
    if !(b.is_finite() && b >= 1.0) {
        return Err(bad(SizeProblem::NotPositive));
    }
    Ok(b as u64)
}

/// The number of parallel sequences to run: `parallel` if it fits `budget`, else the most
/// that fit (with a note to print), else an error with the numbers.
///
/// # Errors
/// When even one sequence does not fit.
pub fn fit(
    fp: &Footprint,
    budget: &Budget,
    ctx: u32,
    batch: u32,
    parallel: u32,
) -> Result<(u32, Option<String>)> {
    let need = fp.need(ctx, batch, parallel);
    if need <= budget.bytes {
        return Ok((parallel, None));
    }
    let fits = (1..parallel)
        .rev()
        .find(|&p| fp.need(ctx, batch, p) <= budget.bytes);
    match fits {
        Some(p) => Ok((
            p,
            Some(format!(
                "--parallel {parallel} needs about {} (KV cache {} for {parallel} + {} x {ctx} cells) but {} allows {}; running {p} sequences at a time (results are the same, only slower)",
                gib(need),
                gib(fp.kv(ctx, parallel)),
                CACHE_STREAMS,
                budget.source,
                gib(budget.bytes)
            )),
        )),
        None => Err(Error::Run(RunError::Memory {
            weights: fp.weights,
            ctx,
            streams: CACHE_STREAMS,
            kv: fp.kv(ctx, 1),
            need: fp.need(ctx, batch, 1),
            allowed_by: budget.source.clone(),
            budget: budget.bytes,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp() -> Footprint {
        // SmolLM2-135M: 30 layers, 3 KV heads of 64, vocab 49152, n_embd 576.
        Footprint {
            weights: 90 * MIB,
            kv_per_cell: 30 * 3 * 128 * 2,
            n_vocab: 49152,
            n_embd: 576,
        }
    }

    #[test]
    fn kv_matches_llama_cpp_log() {
        // llama.cpp logged "KV buffer size = 360.00 MiB" for 16 x 1024 cells.
        assert_eq!(fp().kv_per_cell * 1024 * 16, 360 * MIB);
    }

    #[test]
    fn prefix_streams_take_what_the_budget_leaves() {
        let f = fp();
        let b = |bytes| Budget {
            bytes,
            source: "--max-memory".into(),
        };
        assert_eq!(f.prefix_streams(&b(u64::MAX), 1024, 512, 16, 16), 16);
        let five = f.need_with(1024, 512, 16, 5);
        assert_eq!(f.prefix_streams(&b(five), 1024, 512, 16, 16), 5);
        assert_eq!(f.prefix_streams(&b(five - 1), 1024, 512, 16, 16), 4);
        // Never fewer than the engine's minimum (which `fit` already counted).
        assert_eq!(f.prefix_streams(&b(0), 1024, 512, 16, 16), CACHE_STREAMS);
    }

    #[test]
    fn parallel_shrinks_to_fit_then_refuses() {
        let f = fp();
        let b = |bytes| Budget {
            bytes,
            source: "--max-memory".into(),
        };
        assert_eq!(fit(&f, &b(u64::MAX), 1024, 512, 16).unwrap(), (16, None));
        let four = f.need(1024, 512, 4);
        let (p, note) = fit(&f, &b(four), 1024, 512, 16).unwrap();
        assert_eq!(p, 4);
        assert!(note.unwrap().contains("running 4 sequences"));
        let e = fit(&f, &b(f.need(1024, 512, 1) - 1), 1024, 512, 16).unwrap_err();
        assert!(e.to_string().starts_with("not enough memory"), "{e}");
    }

    #[test]
    fn sizes_and_proc_files() {
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("8X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("0").is_err());
        let mi = "MemTotal: 24000000 kB\nMemFree: 1 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(mem_available(mi), Some(2048 * 1024));
        assert_eq!(room("max\n", "100\n"), None);
        assert_eq!(room("1000\n", "300\n"), Some(700));
    }
}
