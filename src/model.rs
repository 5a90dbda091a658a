//! GGUF model loading and metadata: architecture, sizes, quantisation, chat template, and a
//! sha256 cached outside the repo (keyed by path, size and mtime; hashing GBs is slow).

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result, RunError};
use crate::ffi;
use crate::gguf::{self, Gguf};
use crate::memory;

/// How to load and run a model; the CLI's `--threads`, `--n-gpu-layers`, `--ctx`, … .
#[derive(Debug, Clone)]
pub struct ModelOptions {
    pub threads: i32,
    pub n_gpu_layers: i32,
    /// KV-cache cells per sequence: prompt plus generated tokens must fit.
    pub ctx: u32,
    /// Tokens per decode call (= n_ubatch).
    pub batch: u32,
    /// Maximum sequences decoded together.
    pub parallel: u32,
    /// llama.cpp's repacked weight buffers (see `ffi::LoadParams`); only with
    /// [`Kernels::Llama`], as repacked weights are not row-invariant.
    pub use_extra_bufts: bool,
    /// Which CPU matrix kernels run; see [`Kernels`].
    pub kernels: Kernels,
    /// Flash attention. Off by default: measured here,
    /// llama.cpp's CPU flash-attention kernel takes a different path when a batch holds
    /// several sequences, which moved resid_post.0 by ~1.5% and logits by up to ~1 between a
    /// prompt run alone and in a batch; without it, batched and solo are bit-identical.
    pub flash_attn: FlashAttn,
    /// Memory the run may use (`--max-memory`); None: what the system reports available.
    pub max_memory: Option<u64>,
}

impl Default for ModelOptions {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(8)) as i32;
        ModelOptions {
            threads,
            n_gpu_layers: 0,
            ctx: 1024,
            batch: 512,
            parallel: 16,
            use_extra_bufts: true,
            kernels: Kernels::Invariant,
            flash_attn: FlashAttn::Off,
            max_memory: None,
        }
    }
}

/// Flash attention, as `--flash-attn` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FlashAttn {
    /// Off (default): batched and solo runs then agree bit for bit.
    #[default]
    Off,
    On,
    /// llama.cpp decides.
    Auto,
}

impl FlashAttn {
    /// What llama.cpp is asked for: `None` lets it decide.
    pub fn enabled(self) -> Option<bool> {
        match self {
            FlashAttn::Off => Some(false),
            FlashAttn::On => Some(true),
            FlashAttn::Auto => None,
        }
    }

    /// The flag's spelling (`off`, `on`, `auto`), as a run's fingerprint records it.
    pub fn name(self) -> &'static str {
        match self {
            FlashAttn::Off => "off",
            FlashAttn::On => "on",
            FlashAttn::Auto => "auto",
        }
    }
}

/// Which CPU matrix kernels llama.cpp runs. One per process: ggml reads its switches once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Kernels {
    /// Row-invariant (default): a sequence's numbers are the same bit for bit whatever else
    /// is in the batch. Weights stay in their file layout (no repacking) and K-quant
    /// matrices use ggml's tiled kernel at every row count. As fast as llama.cpp's own choice
    /// from eight sequences on (faster at prompt processing on the machines measured), up to
    /// several times slower for one to seven sequences on K-quant models.
    #[default]
    Invariant,
    /// Row-invariant too, through llama.cpp's plain per-row dot products: no tiled kernel, no
    /// repacking. One to a few sequences generate at llama.cpp's own speed (the server's
    /// case: measured 1.5x the default at one sequence); prompts and many sequences are
    /// slower than the tiled kernel.
    Rowwise,
    /// llama.cpp's own choice: repacked weights, kernels picked by the number of rows. The
    /// fastest for a single sequence; results then move in the last bits with the batch, so
    /// greedy text can differ between a prompt run alone and in a batch.
    Llama,
}

impl Kernels {
    pub fn name(self) -> &'static str {
        match self {
            Kernels::Invariant => "invariant",
            Kernels::Rowwise => "rowwise",
            Kernels::Llama => "llama",
        }
    }
}

/// llama.cpp's LLAMA_MAX_LAYERS: a GGUF claiming more layers trips an assertion.
const LLAMA_MAX_LAYERS: u64 = 512;
/// ggml's GGML_MAX_N_THREADS.
const MAX_THREADS: i32 = 512;
/// llama.cpp's LLAMA_MAX_SEQ, less the engine's shared-prefix streams.
const MAX_PARALLEL: u32 = 256 - crate::memory::CACHE_STREAMS;

impl ModelOptions {
    /// Checks the values llama.cpp would otherwise meet with an assertion, a crash or a
    /// silent clamp.
    ///
    /// # Errors
    /// Names the flag and its range.
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_THREADS).contains(&self.threads) {
            return Err(Error::flag_range("--threads", self.threads, 1, MAX_THREADS));
        }
        if !(1..=MAX_PARALLEL).contains(&self.parallel) {
            return Err(Error::flag_range(
                "--parallel",
                self.parallel,
                1,
                MAX_PARALLEL,
            ));
        }
        let batch = || Some(self.batch.to_string());
        if self.batch < 8 {
            return Err(Error::flag(
                "--batch",
                batch(),
                "is too small (at least 8 tokens per decode call)",
            ));
        }
        if self.batch < self.parallel {
            return Err(Error::flag(
                "--batch",
                batch(),
                format!(
                    "is below --parallel {}: a generation step decodes one token of every sequence in one call",
                    self.parallel
                ),
            ));
        }
        if self.ctx == 0 || self.ctx > 1 << 20 {
            return Err(Error::flag_range("--ctx", self.ctx, 1, 1 << 20));
        }
        if let Some(m) = self.max_memory {
            if !(16 << 20..=1 << 50).contains(&m) {
                return Err(Error::flag_range(
                    "--max-memory",
                    memory::gib(m),
                    "16 MiB",
                    "1 PiB",
                ));
            }
        }
        Ok(())
    }

    /// Everything about how this process computes that can change a completion's numbers:
    /// the linked ggml, the instruction set the binary was built for, the kernel mode, flash
    /// attention and GPU offload. (`--parallel`, `--batch`, `--ctx` and `--threads` cannot:
    /// the engine is batch- and thread-invariant, tested.) Part of a run's fingerprint, so a
    /// run directory never mixes completions computed two ways.
    pub fn numerics(&self) -> String {
        let (v, c) = ffi::ggml_version();
        format!(
            "ggml {v} ({c}); build {}; kernels {}; flash-attn {}; gpu-layers {}",
            crate::cpu::built_for(),
            self.kernels.name(),
            self.flash_attn.name(),
            self.n_gpu_layers,
        )
    }
}

/// What `info` prints: read from the GGUF header and from llama.cpp after loading.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub arch: String,
    pub name: Option<String>,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_vocab: usize,
    /// `general.file_type` as llama.cpp names it, e.g. "Q4_K_M".
    pub file_type: String,
    pub file_size: u64,
    pub chat_template: Option<String>,
    pub desc: String,
}

/// A loaded model: llama.cpp's handle plus what we read from the file.
pub struct Model {
    pub(crate) raw: ffi::Model,
    pub info: ModelInfo,
    pub gguf: Gguf,
    /// What the memory check estimated from the header.
    pub footprint: memory::Footprint,
    /// The memory budget seen when loading (None where it cannot be read).
    pub budget: Option<memory::Budget>,
    /// As given, except `parallel`, which the memory check may have lowered.
    pub options: ModelOptions,
}

/// Checks that `path` is a readable, complete GGUF file and returns its header.
///
/// # Errors
/// A one-line error naming the path: missing, a directory, not GGUF, truncated.
pub fn check_gguf(path: &Path) -> Result<Gguf> {
    let md = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if md.is_dir() {
        return Err(Error::file(path, "is a directory, expected a .gguf file"));
    }
    if md.len() == 0 {
        return Err(Error::file(path, "is empty, expected a .gguf file"));
    }
    Gguf::open(path).map_err(|err| Error::Gguf {
        path: path.to_path_buf(),
        err,
    })
}

impl Model {
    /// Checks and loads a GGUF model.
    ///
    /// # Errors
    /// See [`check_gguf`]; llama.cpp load failures carry llama.cpp's own message.
    pub fn load(path: &Path, options: &ModelOptions) -> Result<Model> {
        Model::load_with(path, options, true)
    }

    /// As [`Model::load`]; `check_memory` false skips the memory check (for `info`, which
    /// decodes nothing and should describe a model too big to run here).
    ///
    /// # Errors
    /// As [`Model::load`].
    pub fn load_with(path: &Path, options: &ModelOptions, check_memory: bool) -> Result<Model> {
        options.validate()?;
        // Measured before the weights are mapped, so they are not counted twice.
        let budget = memory::budget(options.max_memory);
        let gguf = check_gguf(path)?;
        let arch = gguf
            .arch()
            .ok_or_else(|| Error::file(path, "GGUF has no general.architecture key"))?
            .to_string();
        // llama.cpp asserts on these instead of failing: check them first.
        match gguf.arch_u64("block_count") {
            Some(n) if (1..=LLAMA_MAX_LAYERS).contains(&n) => {}
            Some(n) => {
                return Err(Error::file(
                    path,
                    format!(
                    "{arch}.block_count is {n}; llama.cpp supports 1 to {LLAMA_MAX_LAYERS} layers"
                ),
                ))
            }
            // llama.cpp itself reports a missing key (or an unknown architecture).
            None => {}
        }
        if options.n_gpu_layers != 0 && !ffi::gpu_offload_supported() {
            tracing::warn!(
                "--n-gpu-layers {} has no effect: this build has no GPU backend (build with --features cuda, metal or vulkan)",
                options.n_gpu_layers
            );
        }
        if let Some(msg) = crate::cpu::refusal() {
            return Err(Error::Run(RunError::Unsupported(
                msg.trim_start_matches("persona-gate: ").to_string(),
            )));
        }
        ffi::set_kernel_mode(match options.kernels {
            Kernels::Invariant => ffi::KernelMode::Tiled,
            Kernels::Rowwise => ffi::KernelMode::Rowwise,
            Kernels::Llama => ffi::KernelMode::Llama,
        })
        .map_err(|e| Error::Run(RunError::Unsupported(e)))?;
        let raw = ffi::Model::load(
            path,
            &ffi::LoadParams {
                n_gpu_layers: options.n_gpu_layers,
                use_extra_bufts: options.use_extra_bufts && options.kernels == Kernels::Llama,
            },
        )
        .map_err(|e| Error::file(path, crate::text::one_line(e.to_string().trim())))?;
        let info = ModelInfo {
            path: path.to_path_buf(),
            name: gguf.get_str("general.name").map(str::to_string),
            n_layer: raw.n_layer(),
            n_embd: raw.n_embd(),
            n_vocab: raw.n_vocab(),
            file_type: gguf
                .get_u64("general.file_type")
                .map_or("unknown", gguf::file_type_name)
                .to_string(),
            file_size: gguf.file_size,
            chat_template: gguf.get_str("tokenizer.chat_template").map(str::to_string),
            desc: raw.desc(),
            arch,
        };
        let footprint = memory::Footprint::of(&gguf, info.n_layer, info.n_embd, info.n_vocab);
        let mut options = options.clone();
        // GPU memory is not estimated; llama.cpp's own allocation failure is reported.
        if let (true, 0, Some(b)) = (check_memory, options.n_gpu_layers, &budget) {
            let (p, note) =
                memory::fit(&footprint, b, options.ctx, options.batch, options.parallel)
                    .map_err(|e| Error::file(path, e.to_string()))?;
            if let Some(n) = note {
                tracing::warn!("{n}");
            }
            options.parallel = p;
        }
        Ok(Model {
            raw,
            info,
            gguf,
            footprint,
            budget,
            options,
        })
    }

    /// The model file's sha256, from the cache when path, size and mtime match.
    ///
    /// # Errors
    /// I/O errors reading the file.
    pub fn sha256(&self) -> Result<String> {
        file_sha256(&self.info.path)
    }

    pub fn tokenize(&self, text: &str) -> Result<Vec<ffi::Token>> {
        Ok(self.raw.tokenize(text, false)?)
    }

    /// Tokenises text with special-token strings read as plain text.
    pub fn tokenize_literal(&self, text: &str) -> Result<Vec<ffi::Token>> {
        Ok(self.raw.tokenize_with(text, false, false)?)
    }

    /// The text of generated tokens (control tokens dropped), lossily decoded as UTF-8.
    pub fn detokenize(&self, tokens: &[ffi::Token]) -> String {
        let mut bytes = Vec::new();
        for &t in tokens {
            bytes.extend(self.raw.token_bytes(t, false));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The bytes of one token as it appears in rendered template text.
    pub fn token_text_bytes(&self, t: ffi::Token) -> Vec<u8> {
        self.raw.token_bytes(t, true)
    }

    pub fn is_eog(&self, t: ffi::Token) -> bool {
        self.raw.is_eog(t)
    }
    pub fn bos(&self) -> ffi::Token {
        self.raw.bos()
    }
    pub fn add_bos(&self) -> bool {
        self.raw.add_bos()
    }
}

impl fmt::Display for ModelInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Every string here comes from the file: escaped, so metadata cannot drive the
        // terminal (escape sequences) or fake extra lines.
        let esc = crate::text::one_line;
        writeln!(f, "path          {}", esc(&self.path.display().to_string()))?;
        if let Some(n) = &self.name {
            writeln!(f, "name          {}", esc(n))?;
        }
        writeln!(f, "arch          {}", esc(&self.arch))?;
        writeln!(f, "description   {}", esc(&self.desc))?;
        writeln!(f, "n_layer       {}", self.n_layer)?;
        writeln!(f, "n_embd        {}", self.n_embd)?;
        writeln!(f, "n_vocab       {}", self.n_vocab)?;
        writeln!(f, "file_type     {}", self.file_type)?;
        write!(
            f,
            "file_size     {} bytes ({:.1} MiB)",
            self.file_size,
            self.file_size as f64 / 1048576.0
        )
    }
}

fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PERSONA_GATE_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("persona-gate")
}

/// sha256 of a file, cached in `<cache>/sha256.tsv` by (canonical path, size, mtime).
///
/// # Errors
/// I/O errors reading the file. Cache write failures are ignored (the hash is still right).
pub fn file_sha256(path: &Path) -> Result<String> {
    let canon = path.canonicalize().map_err(|e| Error::io(path, e))?;
    let md = std::fs::metadata(&canon).map_err(|e| Error::io(path, e))?;
    let mtime = md
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    // mtime alone can be set back after an in-place edit (touch -d); the inode change time
    // cannot, and a file replaced by another has a new inode.
    #[cfg(unix)]
    let (ino, ctime) = {
        use std::os::unix::fs::MetadataExt;
        (
            md.ino(),
            md.ctime() as i128 * 1_000_000_000 + md.ctime_nsec() as i128,
        )
    };
    #[cfg(not(unix))]
    let (ino, ctime) = (0u64, 0i128);
    let key = format!("{}\t{}\t{mtime}\t{ino}\t{ctime}", canon.display(), md.len());
    let cache = cache_dir().join("sha256.tsv");
    let cached = std::fs::read_to_string(&cache).unwrap_or_default();
    for line in cached.lines() {
        if let Some((k, h)) = line.rsplit_once('\t') {
            if k == key {
                return Ok(h.to_string());
            }
        }
    }
    let mut f = std::fs::File::open(&canon).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let hex = format!("{:x}", h.finalize());
    // Keep other files' entries, drop stale ones for this path, write atomically.
    let prefix = format!("{}\t", canon.display());
    let mut out: String = cached
        .lines()
        .filter(|l| !l.starts_with(&prefix))
        .map(|l| format!("{l}\n"))
        .collect();
    out.push_str(&format!("{key}\t{hex}\n"));
    let _ = std::fs::create_dir_all(cache_dir())
        .and_then(|_| crate::fsio::write_atomic(&cache, out.as_bytes()));
    Ok(hex)
}
