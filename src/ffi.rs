//! The only module with `unsafe`: llama.cpp model, context, batch, the scheduler eval
//! callback, the native control vector, tokenisation and quantisation, behind a small safe API.
//!
//! Ownership follows llama-cpp-2: each C object is a `NonNull` with `Drop`, and a context
//! borrows its model so the borrow checker fixes the free order. The eval callback never
//! unwinds into C: its body runs in `catch_unwind`, errors are stored and raised by
//! [`Context::decode`] after `llama_decode` returns.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::{Mutex, Once};

use llama_cpp_sys_2 as sys;

pub type Token = i32;

/// Errors from llama.cpp calls, with llama.cpp's own last error line where it gave one.
#[derive(Debug, thiserror::Error)]
pub enum FfiError {
    #[error("llama.cpp could not load the model{}", last_error_suffix(.0))]
    Load(Option<String>),
    #[error("llama.cpp could not create a context (n_ctx {n_ctx}, n_seq_max {n_seq}){}", last_error_suffix(.last))]
    Context {
        n_ctx: u32,
        n_seq: u32,
        last: Option<String>,
    },
    #[error("llama_decode failed with code {code}: {}", decode_reason(*.code))]
    Decode { code: i32 },
    #[error("hook failed at l_out-{layer}: {msg}")]
    Hook { layer: usize, msg: String },
    #[error("control vector rejected by llama.cpp (layers {start}..={end})")]
    Cvec { start: i32, end: i32 },
    #[error("tokenizer failed on a text of {0} bytes")]
    Tokenize(usize),
    #[error("quantization failed (llama_model_quantize returned {code}){}", last_error_suffix(.last))]
    Quantize { code: u32, last: Option<String> },
    #[error("path is not valid UTF-8 or contains NUL: {0}")]
    Path(String),
}

fn last_error_suffix(e: &Option<String>) -> String {
    e.as_ref().map(|s| format!(": {s}")).unwrap_or_default()
}

fn decode_reason(code: i32) -> &'static str {
    match code {
        1 => "no KV-cache slot for the batch (lower --parallel or raise --ctx)",
        2 => "aborted",
        -1 => "invalid batch",
        _ => "compute error",
    }
}

// ---------------------------------------------------------------------------------------
// Backend and logging

static INIT: Once = Once::new();
/// The kernel mode this process committed to (None until the first model load).
static KERNEL_MODE: Mutex<Option<KernelMode>> = Mutex::new(None);
static LAST_ERROR: Mutex<Option<String>> = Mutex::new(None);
static LOG_LINE: Mutex<String> = Mutex::new(String::new());

unsafe extern "C" fn log_cb(level: sys::ggml_log_level, text: *const c_char, _ud: *mut c_void) {
    let _ = catch_unwind(|| {
        if text.is_null() {
            return;
        }
        // SAFETY: llama.cpp passes a NUL-terminated string valid for this call.
        let s = unsafe { CStr::from_ptr(text) }.to_string_lossy();
        let Ok(mut line) = LOG_LINE.lock() else {
            return;
        };
        line.push_str(&s);
        if !line.ends_with('\n') {
            return;
        }
        let msg = line.trim().to_string();
        line.clear();
        match level {
            sys::GGML_LOG_LEVEL_ERROR => {
                tracing::debug!(target: "llama.cpp", "{msg}");
                // Keep the first error since the last reset: llama.cpp logs the specific
                // cause first and generic "failed to load" lines after it.
                if let Ok(mut e) = LAST_ERROR.lock() {
                    if e.is_none() {
                        *e = Some(clean_error(&msg));
                    }
                }
            }
            sys::GGML_LOG_LEVEL_WARN => tracing::debug!(target: "llama.cpp", "{msg}"),
            _ => tracing::trace!(target: "llama.cpp", "{msg}"),
        }
    });
}

/// Drops llama.cpp's "function_name: " and "error loading model: " prefixes.
fn clean_error(msg: &str) -> String {
    let mut m = msg;
    if let Some((head, rest)) = m.split_once(": ") {
        if head.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            m = rest;
        }
    }
    m.strip_prefix("error loading model: ")
        .unwrap_or(m)
        .to_string()
}

fn take_last_error() -> Option<String> {
    LAST_ERROR.lock().ok().and_then(|mut e| e.take())
}

/// Initialises llama.cpp's backends once per process and routes its logs to `tracing`.
pub fn init() {
    INIT.call_once(|| {
        // SAFETY: called once, before any other llama.cpp call; log_cb is 'static.
        unsafe {
            sys::llama_log_set(Some(log_cb), std::ptr::null_mut());
            sys::llama_backend_init();
        }
    });
}

/// How ggml's CPU kernels compute matrix products, chosen once per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelMode {
    /// llama.cpp's own choice, by the number of rows.
    Llama,
    /// Row-invariant: the tiled K-quant matmul forced at every row count (ggml takes it only
    /// from eight rows on, and rounds differently below).
    Tiled,
    /// Row-invariant: no tiled kernel at all, so every K-quant product element is one
    /// vec_dot of a weight row and an activation row, whatever the number of rows.
    Rowwise,
}

impl KernelMode {
    fn describe(self) -> &'static str {
        match self {
            KernelMode::Llama => "llama.cpp's default",
            KernelMode::Tiled => "row-invariant (tiled)",
            KernelMode::Rowwise => "row-invariant (row-wise)",
        }
    }
}

/// Sets the kernel mode, once per process and before any matrix product, so that in the
/// row-invariant modes each row's result is the same in any batch. Repacked weights must be
/// off too (`LoadParams::use_extra_bufts`); the engine's module docs list what else
/// invariance needs.
///
/// # Errors
/// When the process already runs in another mode (ggml reads these switches once).
pub fn set_kernel_mode(mode: KernelMode) -> Result<(), String> {
    let mut m = KERNEL_MODE
        .lock()
        .map_err(|_| "kernel mode lock poisoned".to_string())?;
    match *m {
        Some(v) if v == mode => return Ok(()),
        Some(v) => {
            return Err(format!(
            "this process already runs {} kernels; the kernel mode cannot change within a process",
            v.describe()
        ))
        }
        None => {}
    }
    // ggml-cpu's tiled.cpp reads these once, at the first K-quant matmul, which comes after
    // this (no model is loaded yet). Set unconditionally: a user's GGML_CPU_TILED_MM would
    // otherwise break invariance silently.
    match mode {
        KernelMode::Tiled => {
            std::env::set_var("GGML_CPU_TILED_MM", "1");
            std::env::set_var("GGML_CPU_TILED_MM_FORCE", "1");
        }
        KernelMode::Rowwise => {
            std::env::set_var("GGML_CPU_TILED_MM", "0");
            std::env::remove_var("GGML_CPU_TILED_MM_FORCE");
        }
        KernelMode::Llama => {}
    }
    *m = Some(mode);
    Ok(())
}

/// Whether this process runs row-invariant kernels (None: no model loaded yet).
pub fn row_invariant() -> Option<bool> {
    KERNEL_MODE
        .lock()
        .ok()
        .and_then(|m| *m)
        .map(|m| m != KernelMode::Llama)
}

/// llama.cpp's description of the compiled CPU features and backends.
pub fn system_info() -> String {
    init();
    // SAFETY: returns a static NUL-terminated string.
    unsafe { CStr::from_ptr(sys::llama_print_system_info()) }
        .to_string_lossy()
        .into_owned()
}

/// Whether this build can offload layers to a GPU (a cuda, metal or vulkan backend).
pub fn gpu_offload_supported() -> bool {
    init();
    // SAFETY: a pure query after backend init.
    unsafe { sys::llama_supports_gpu_offload() }
}

/// The linked ggml's version and commit, e.g. `("0.26.0", "d10b47d")`, read at run time.
pub fn ggml_version() -> (String, String) {
    // SAFETY: both return static NUL-terminated strings.
    unsafe {
        (
            CStr::from_ptr(sys::ggml_version())
                .to_string_lossy()
                .into_owned(),
            CStr::from_ptr(sys::ggml_commit())
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// ggml's (block size, bytes per block) for a type id, to check our own GGUF table.
pub fn ggml_type_layout(t: u32) -> (u64, u64) {
    // SAFETY: pure lookups in ggml's static type traits table; t is below GGML_TYPE_COUNT.
    unsafe { (sys::ggml_blck_size(t) as u64, sys::ggml_type_size(t) as u64) }
}

fn cpath(path: &Path) -> Result<CString, FfiError> {
    let s = path
        .to_str()
        .ok_or_else(|| FfiError::Path(path.display().to_string()))?;
    CString::new(s).map_err(|_| FfiError::Path(s.to_string()))
}

// ---------------------------------------------------------------------------------------
// Model

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadParams {
    /// Layers to offload to a GPU; negative means all.
    pub n_gpu_layers: i32,
    /// llama.cpp's extra (repacked) weight buffers. Off only as a workaround for builds
    /// whose extra kernels crash (AMX with `target-cpu=native`).
    pub use_extra_bufts: bool,
}

impl Default for LoadParams {
    fn default() -> Self {
        LoadParams {
            n_gpu_layers: 0,
            use_extra_bufts: true,
        }
    }
}

/// A loaded llama.cpp model. Freed on drop.
pub struct Model {
    ptr: NonNull<sys::llama_model>,
    vocab: NonNull<sys::llama_vocab>,
}

// SAFETY: llama_model is immutable after load and llama.cpp allows using it from any thread.
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: ptr came from llama_model_load_from_file and every Context borrowing it
        // has been dropped (lifetimes enforce this).
        unsafe { sys::llama_model_free(self.ptr.as_ptr()) }
    }
}

impl Model {
    /// Loads a GGUF file. The caller checks the file first (see `crate::model`).
    ///
    /// # Errors
    /// [`FfiError::Load`] with llama.cpp's last error line.
    pub fn load(path: &Path, p: &LoadParams) -> Result<Model, FfiError> {
        init();
        let c = cpath(path)?;
        take_last_error();
        // SAFETY: default params are plain data; the path is a valid C string for the call.
        let ptr = unsafe {
            let mut mp = sys::llama_model_default_params();
            mp.n_gpu_layers = p.n_gpu_layers;
            mp.use_extra_bufts = p.use_extra_bufts;
            sys::llama_model_load_from_file(c.as_ptr(), mp)
        };
        let ptr = NonNull::new(ptr).ok_or_else(|| FfiError::Load(take_last_error()))?;
        // SAFETY: a loaded model always has a vocab that lives as long as the model.
        let vocab = unsafe { sys::llama_model_get_vocab(ptr.as_ptr()) };
        let vocab = NonNull::new(vocab as *mut _).ok_or(FfiError::Load(None))?;
        Ok(Model { ptr, vocab })
    }

    pub fn n_layer(&self) -> usize {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_n_layer(self.ptr.as_ptr()) as usize }
    }
    pub fn n_embd(&self) -> usize {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_n_embd(self.ptr.as_ptr()) as usize }
    }
    pub fn n_vocab(&self) -> usize {
        // SAFETY: valid vocab pointer.
        unsafe { sys::llama_vocab_n_tokens(self.vocab.as_ptr()) as usize }
    }
    /// Bytes of weights as loaded.
    pub fn size(&self) -> u64 {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_size(self.ptr.as_ptr()) }
    }
    /// llama.cpp's one-line description, e.g. "qwen2 1B Q4_K - Medium".
    pub fn desc(&self) -> String {
        let mut buf = vec![0u8; 256];
        // SAFETY: buffer and its length are passed together; llama.cpp NUL-terminates.
        let n = unsafe {
            sys::llama_model_desc(
                self.ptr.as_ptr(),
                buf.as_mut_ptr() as *mut c_char,
                buf.len(),
            )
        };
        buf.truncate(n.clamp(0, 255) as usize);
        String::from_utf8_lossy(&buf).into_owned()
    }
    pub fn is_eog(&self, t: Token) -> bool {
        // SAFETY: valid vocab; any token id is accepted (out of range returns false).
        unsafe { sys::llama_vocab_is_eog(self.vocab.as_ptr(), t) }
    }
    pub fn bos(&self) -> Token {
        // SAFETY: valid vocab.
        unsafe { sys::llama_vocab_bos(self.vocab.as_ptr()) }
    }
    pub fn eos(&self) -> Token {
        // SAFETY: valid vocab.
        unsafe { sys::llama_vocab_eos(self.vocab.as_ptr()) }
    }
    pub fn add_bos(&self) -> bool {
        // SAFETY: valid vocab.
        unsafe { sys::llama_vocab_get_add_bos(self.vocab.as_ptr()) }
    }

    /// Tokenises `text`, parsing special tokens written as text (template markers).
    ///
    /// # Errors
    /// [`FfiError::Tokenize`] when llama.cpp rejects the text.
    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<Token>, FfiError> {
        self.tokenize_with(text, add_special, true)
    }

    /// Tokenises `text`; `parse_special` false reads special-token strings such as
    /// `<|im_end|>` as plain text.
    ///
    /// # Errors
    /// [`FfiError::Tokenize`] when llama.cpp rejects the text.
    pub fn tokenize_with(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<Token>, FfiError> {
        let len = i32::try_from(text.len()).map_err(|_| FfiError::Tokenize(text.len()))?;
        let mut out = vec![0 as Token; text.len() + 8];
        for _ in 0..2 {
            // SAFETY: text and out are valid for the lengths passed.
            let n = unsafe {
                sys::llama_tokenize(
                    self.vocab.as_ptr(),
                    text.as_ptr() as *const c_char,
                    len,
                    out.as_mut_ptr(),
                    out.len() as i32,
                    add_special,
                    parse_special,
                )
            };
            if n >= 0 {
                out.truncate(n as usize);
                return Ok(out);
            }
            if n == i32::MIN {
                break;
            }
            out.resize((-n) as usize, 0);
        }
        Err(FfiError::Tokenize(text.len()))
    }

    /// The bytes of one token; `special` renders control tokens as their text.
    pub fn token_bytes(&self, t: Token, special: bool) -> Vec<u8> {
        let mut buf = vec![0u8; 64];
        loop {
            // SAFETY: buf is valid for buf.len() bytes.
            let n = unsafe {
                sys::llama_token_to_piece(
                    self.vocab.as_ptr(),
                    t,
                    buf.as_mut_ptr() as *mut c_char,
                    buf.len() as i32,
                    0,
                    special,
                )
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return buf;
            }
            buf.resize((-n) as usize, 0);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The eval callback

/// Something that reads or edits the residual stream after a layer (`l_out-<layer>`).
pub trait LayerVisitor {
    /// Asked at graph-schedule time, cheaply: does this visitor want `l_out-<layer>`?
    /// Each accepted node is a sync point on GPU backends, so accept few.
    fn wants(&self, layer: usize) -> bool;
    /// The computed rows, `n_rows × n_embd` row-major. Return whether they were changed,
    /// so device buffers are written back only when needed.
    ///
    /// # Errors
    /// A message; decoding fails with [`FfiError::Hook`].
    fn visit(&mut self, layer: usize, rows: &mut [f32], n_rows: usize) -> Result<bool, String>;
}

struct CbState {
    visitor: Option<*mut (dyn LayerVisitor + 'static)>,
    n_embd: usize,
    /// Layers whose `l_out` appeared in the graph during the last decode.
    seen: Vec<bool>,
    record_seen: bool,
    error: Option<(usize, String)>,
    scratch: Vec<f32>,
}

fn l_out_layer(name: &[c_char; 64]) -> Option<usize> {
    // SAFETY: ggml tensor names are NUL-terminated within their 64-byte array.
    let s = unsafe { CStr::from_ptr(name.as_ptr()) }.to_bytes();
    let rest = s.strip_prefix(b"l_out-")?;
    std::str::from_utf8(rest).ok()?.parse().ok()
}

unsafe extern "C" fn eval_cb(t: *mut sys::ggml_tensor, ask: bool, ud: *mut c_void) -> bool {
    let r = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: ud is the Box<CbState> owned by the Context, alive for the context's life;
        // llama_decode runs the callback on the calling thread while &mut Context is held.
        let st = unsafe { &mut *(ud as *mut CbState) };
        // SAFETY: the scheduler passes a valid tensor.
        let tensor = unsafe { &mut *t };
        let Some(layer) = l_out_layer(&tensor.name) else {
            return !ask;
        };
        if ask {
            if st.record_seen {
                if let Some(s) = st.seen.get_mut(layer) {
                    *s = true;
                }
            }
            return match st.visitor {
                // SAFETY: the pointer is set only for the duration of one decode call.
                Some(v) => unsafe { (*v).wants(layer) },
                None => false,
            };
        }
        let Some(v) = st.visitor else { return true };
        if st.error.is_some() {
            return true;
        }
        let n_embd = st.n_embd;
        if tensor.type_ != sys::GGML_TYPE_F32
            || tensor.ne[0] as usize != n_embd
            || tensor.nb[0] != 4
            || tensor.nb[1] != 4 * n_embd
        {
            st.error = Some((
                layer,
                format!(
                    "unexpected tensor layout ne={:?} type={}",
                    tensor.ne, tensor.type_
                ),
            ));
            return true;
        }
        let n_rows = (tensor.ne[1] * tensor.ne[2] * tensor.ne[3]) as usize;
        let n = n_rows * n_embd;
        // SAFETY: buffer is set for computed tensors.
        let host = unsafe { sys::ggml_backend_buffer_is_host(tensor.buffer) };
        let res = if host {
            // SAFETY: a host f32 tensor, contiguous (checked above), of n elements, that
            // nothing else reads or writes until this callback returns.
            let rows = unsafe { std::slice::from_raw_parts_mut(tensor.data as *mut f32, n) };
            // SAFETY: see the visitor pointer note above.
            unsafe { (*v).visit(layer, rows, n_rows) }.map(|_| ())
        } else {
            st.scratch.resize(n, 0.0);
            // SAFETY: copies n f32 out of, and back into, a device tensor of that size.
            unsafe {
                sys::ggml_backend_tensor_get(t, st.scratch.as_mut_ptr() as *mut c_void, 0, n * 4);
                match (*v).visit(layer, &mut st.scratch, n_rows) {
                    Ok(true) => {
                        sys::ggml_backend_tensor_set(
                            t,
                            st.scratch.as_ptr() as *const c_void,
                            0,
                            n * 4,
                        );
                        Ok(())
                    }
                    Ok(false) => Ok(()),
                    Err(e) => Err(e),
                }
            }
        };
        if let Err(e) = res {
            st.error = Some((layer, e));
        }
        true
    }));
    r.unwrap_or_else(|_| {
        // SAFETY: as above; only the error slot is touched.
        let st = unsafe { &mut *(ud as *mut CbState) };
        st.error = Some((usize::MAX, "panic in hook".into()));
        !ask
    })
}

// ---------------------------------------------------------------------------------------
// Context and batch

/// How to create a context.
#[derive(Debug, Clone)]
pub struct ContextParams {
    /// KV cells per sequence; the context holds `n_ctx_seq × n_seq_max`.
    pub n_ctx_seq: u32,
    /// Tokens per decode call; n_ubatch equals it, so a decode of one sequence (or of one
    /// token from each of consecutive sequences) is one ubatch, rows in batch order.
    pub n_batch: u32,
    pub n_seq_max: u32,
    pub n_threads: i32,
    /// Flash attention: None = llama.cpp's auto choice.
    pub flash_attn: Option<bool>,
}

/// A llama.cpp context with our eval callback installed and one KV stream per sequence
/// (`kv_unified = false`): every sequence's cells start at 0, as in a run of that prompt
/// alone, which makes prompt activations independent of what else is in the batch.
pub struct Context<'m> {
    ptr: NonNull<sys::llama_context>,
    model: &'m Model,
    cb: Box<CbState>,
    pub params: ContextParams,
}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        // SAFETY: ptr from llama_init_from_model; cb outlives it (dropped after this).
        unsafe { sys::llama_free(self.ptr.as_ptr()) }
    }
}

impl<'m> Context<'m> {
    /// # Errors
    /// [`FfiError::Context`] when llama.cpp cannot allocate the context.
    pub fn new(model: &'m Model, p: ContextParams) -> Result<Context<'m>, FfiError> {
        let mut cb = Box::new(CbState {
            visitor: None,
            n_embd: model.n_embd(),
            seen: vec![false; model.n_layer()],
            record_seen: true,
            error: None,
            scratch: Vec::new(),
        });
        take_last_error();
        // SAFETY: default params are plain data; cb is boxed so its address is stable for
        // the life of the context, which frees before the box (field order in Drop).
        let ptr = unsafe {
            let mut cp = sys::llama_context_default_params();
            cp.n_ctx = p.n_ctx_seq.saturating_mul(p.n_seq_max);
            cp.n_batch = p.n_batch;
            cp.n_ubatch = p.n_batch;
            cp.n_seq_max = p.n_seq_max;
            cp.n_threads = p.n_threads;
            cp.n_threads_batch = p.n_threads;
            cp.kv_unified = false;
            cp.flash_attn_type = match p.flash_attn {
                None => sys::LLAMA_FLASH_ATTN_TYPE_AUTO,
                Some(false) => sys::LLAMA_FLASH_ATTN_TYPE_DISABLED,
                Some(true) => sys::LLAMA_FLASH_ATTN_TYPE_ENABLED,
            };
            cp.cb_eval = Some(eval_cb);
            cp.cb_eval_user_data = &mut *cb as *mut CbState as *mut c_void;
            sys::llama_init_from_model(model.ptr.as_ptr(), cp)
        };
        let ptr = NonNull::new(ptr).ok_or_else(|| FfiError::Context {
            n_ctx: p.n_ctx_seq.saturating_mul(p.n_seq_max),
            n_seq: p.n_seq_max,
            last: take_last_error(),
        })?;
        Ok(Context {
            ptr,
            model,
            cb,
            params: p,
        })
    }

    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// Runs one batch. `visitor`, if any, sees `l_out-<layer>` for the layers it wants.
    ///
    /// # Errors
    /// [`FfiError::Decode`] for llama.cpp failures, [`FfiError::Hook`] for visitor errors.
    pub fn decode(
        &mut self,
        batch: &Batch,
        visitor: Option<&mut dyn LayerVisitor>,
    ) -> Result<(), FfiError> {
        // SAFETY: the lifetime is erased only for the duration of this call; the pointer is
        // cleared before returning, so the callback never sees a dangling visitor.
        self.cb.visitor = visitor.map(|v| unsafe {
            std::mem::transmute::<*mut (dyn LayerVisitor + '_), *mut (dyn LayerVisitor + 'static)>(
                v,
            )
        });
        self.cb.error = None;
        // SAFETY: batch holds n_tokens valid entries; the context is exclusively borrowed.
        let code = unsafe { sys::llama_decode(self.ptr.as_ptr(), batch.raw) };
        self.cb.visitor = None;
        self.cb.record_seen = false;
        if code != 0 {
            return Err(FfiError::Decode { code });
        }
        if let Some((layer, msg)) = self.cb.error.take() {
            return Err(FfiError::Hook { layer, msg });
        }
        Ok(())
    }

    /// Layers whose `l_out-<il>` tensor appeared in the first decode's graph.
    pub fn l_out_layers_seen(&self) -> &[bool] {
        &self.cb.seen
    }

    /// The logits of batch entry `i`, which must have been marked as an output.
    pub fn logits(&self, i: usize) -> &[f32] {
        let n = self.model.n_vocab();
        // SAFETY: llama_get_logits_ith returns null for entries without logits; otherwise a
        // buffer of n_vocab floats valid until the next decode (we borrow &self).
        unsafe {
            let p = sys::llama_get_logits_ith(self.ptr.as_ptr(), i as i32);
            assert!(!p.is_null(), "batch entry {i} was not marked as an output");
            std::slice::from_raw_parts(p, n)
        }
    }

    /// Drops a sequence's cells from the KV cache.
    pub fn seq_rm(&mut self, seq: i32) {
        // SAFETY: valid context; removing a whole sequence always succeeds.
        unsafe {
            let mem = sys::llama_get_memory(self.ptr.as_ptr());
            sys::llama_memory_seq_rm(mem, seq, -1, -1);
        }
    }

    /// Drops a sequence's cells at positions `from` and after (a cached template header
    /// keeps only its own rows). Removing from a sequence's end always succeeds.
    pub fn seq_truncate(&mut self, seq: i32, from: usize) {
        // SAFETY: valid context; a partial removal at the end is always supported.
        unsafe {
            let mem = sys::llama_get_memory(self.ptr.as_ptr());
            sys::llama_memory_seq_rm(mem, seq, from as i32, -1);
        }
    }

    /// Copies sequence `src`'s cells to `dst` (which must be empty). With one KV stream per
    /// sequence this copies `src`'s whole stream, so `src` must hold exactly what `dst` should
    /// start with; llama.cpp performs the copy before the next decode.
    pub fn seq_cp(&mut self, src: i32, dst: i32) {
        // SAFETY: valid context; seq ids are below n_seq_max (the engine's slots).
        unsafe {
            let mem = sys::llama_get_memory(self.ptr.as_ptr());
            sys::llama_memory_seq_cp(mem, src, dst, -1, -1);
        }
    }

    /// Empties the KV cache.
    pub fn clear_kv(&mut self) {
        // SAFETY: valid context.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ptr.as_ptr()), true) }
    }

    /// Sets llama.cpp's native control vector: `data` holds one n_embd row per layer from
    /// layer 1 (llama.cpp has no slot for layer 0); rows outside `start..=end` are ignored.
    /// `None` clears it. Each change rebuilds the compute graph, so set it once per condition.
    ///
    /// # Errors
    /// [`FfiError::Cvec`] when llama.cpp rejects the vector.
    pub fn set_cvec(&mut self, data: Option<&[f32]>, start: i32, end: i32) -> Result<(), FfiError> {
        let n_embd = self.model.n_embd() as i32;
        let (p, len) = data.map_or((std::ptr::null(), 0), |d| (d.as_ptr(), d.len()));
        // SAFETY: p is valid for len floats (or null to clear).
        let r =
            unsafe { sys::llama_set_adapter_cvec(self.ptr.as_ptr(), p, len, n_embd, start, end) };
        if r != 0 {
            return Err(FfiError::Cvec { start, end });
        }
        Ok(())
    }
}

/// A `llama_batch` with capacity fixed at creation; one sequence id per token.
pub struct Batch {
    raw: sys::llama_batch,
    cap: usize,
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: raw came from llama_batch_init.
        unsafe { sys::llama_batch_free(self.raw) }
    }
}

impl Batch {
    pub fn new(cap: usize) -> Batch {
        // SAFETY: allocates arrays for cap tokens with one seq id each.
        let raw = unsafe { sys::llama_batch_init(cap as i32, 0, 1) };
        Batch { raw, cap }
    }
    pub fn clear(&mut self) {
        self.raw.n_tokens = 0;
    }
    pub fn len(&self) -> usize {
        self.raw.n_tokens as usize
    }
    pub fn is_empty(&self) -> bool {
        self.raw.n_tokens == 0
    }
    pub fn capacity(&self) -> usize {
        self.cap
    }
    /// Appends a token. Panics past capacity: the engine sizes batches itself.
    pub fn push(&mut self, token: Token, pos: i32, seq: i32, logits: bool) {
        let i = self.raw.n_tokens as usize;
        assert!(i < self.cap, "batch capacity {} exceeded", self.cap);
        // SAFETY: i < cap, and each array was allocated for cap entries (seq_id: 1 each).
        unsafe {
            *self.raw.token.add(i) = token;
            *self.raw.pos.add(i) = pos;
            *self.raw.n_seq_id.add(i) = 1;
            *(*self.raw.seq_id.add(i)) = seq;
            *self.raw.logits.add(i) = logits as i8;
        }
        self.raw.n_tokens += 1;
    }
}

// ---------------------------------------------------------------------------------------
// Sampling

/// llama.cpp's sampler chain as `llama-completion` builds it with its default sampler list
/// when only these are set (penalties, DRY, XTC, typical-p and top-n-sigma off):
/// top-k → top-p → min-p → temperature → a seeded draw. One per sequence, so a sequence's
/// draws depend on its own seed and logits alone.
pub struct Sampler {
    ptr: NonNull<sys::llama_sampler>,
    /// Candidate buffer reused across steps (one entry per vocabulary token).
    cur: Vec<sys::llama_token_data>,
}

impl Drop for Sampler {
    fn drop(&mut self) {
        // SAFETY: ptr came from llama_sampler_chain_init; the chain owns its samplers.
        unsafe { sys::llama_sampler_free(self.ptr.as_ptr()) }
    }
}

// SAFETY: a chain of top-k/top-p/min-p/temp/dist samplers holds only its own state (an RNG
// and parameters), touched through &mut self alone.
unsafe impl Send for Sampler {}

impl Sampler {
    /// `top_k <= 0` keeps every token, `top_p = 1` and `min_p = 0` are off (llama.cpp's
    /// conventions); `temperature > 0`. `seed = u32::MAX` would make llama.cpp draw a random
    /// seed, so it is taken as `u32::MAX - 1`.
    pub fn new(temperature: f32, top_k: i32, top_p: f32, min_p: f32, seed: u32) -> Sampler {
        // SAFETY: plain constructors; chain_add transfers ownership of each sampler to the
        // chain, which frees them with itself.
        unsafe {
            let chain = sys::llama_sampler_chain_init(sys::llama_sampler_chain_default_params());
            sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_top_k(top_k));
            sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_top_p(top_p, 1));
            sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_min_p(min_p, 1));
            sys::llama_sampler_chain_add(
                chain,
                sys::llama_sampler_init_temp_ext(temperature, 0.0, 1.0),
            );
            sys::llama_sampler_chain_add(
                chain,
                sys::llama_sampler_init_dist(seed.min(u32::MAX - 1)),
            );
            Sampler {
                ptr: NonNull::new(chain).expect("llama_sampler_chain_init returned null"),
                cur: Vec::new(),
            }
        }
    }

    /// Draws a token from `logits` (one per vocabulary token) and advances the chain.
    pub fn sample(&mut self, logits: &[f32]) -> Token {
        self.cur.clear();
        self.cur.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &logit)| sys::llama_token_data {
                    id: i as Token,
                    logit,
                    p: 0.0,
                }),
        );
        let mut arr = sys::llama_token_data_array {
            data: self.cur.as_mut_ptr(),
            size: self.cur.len(),
            selected: -1,
            sorted: false,
        };
        // SAFETY: arr points into self.cur, valid for size entries during the call; the
        // samplers only reorder, resize (shrink) and rescale the entries in place.
        let t = unsafe {
            sys::llama_sampler_apply(self.ptr.as_ptr(), &mut arr);
            assert!(
                arr.selected >= 0 && (arr.selected as usize) < arr.size,
                "the sampler chain selected no token"
            );
            (*arr.data.add(arr.selected as usize)).id
        };
        // SAFETY: valid chain.
        unsafe { sys::llama_sampler_accept(self.ptr.as_ptr(), t) };
        t
    }
}

// ---------------------------------------------------------------------------------------
// Quantisation

/// Quantises `input` into `output` as llama.cpp ftype `ftype`.
///
/// # Errors
/// [`FfiError::Quantize`] with llama.cpp's message.
pub fn quantize(
    input: &Path,
    output: &Path,
    ftype: u32,
    n_threads: i32,
    allow_requantize: bool,
) -> Result<(), FfiError> {
    init();
    let (i, o) = (cpath(input)?, cpath(output)?);
    take_last_error();
    // SAFETY: default params are plain data; paths are valid C strings for the call.
    let r = unsafe {
        let mut qp = sys::llama_model_quantize_default_params();
        qp.nthread = n_threads;
        qp.ftype = ftype as _;
        qp.allow_requantize = allow_requantize;
        sys::llama_model_quantize(i.as_ptr(), o.as_ptr(), &qp)
    };
    if r != 0 {
        return Err(FfiError::Quantize {
            code: r,
            last: take_last_error(),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// ggml's own GGUF reader, to prove files we write are what llama.cpp reads

/// A tensor as ggml's GGUF reader lists it: name, ggml type, bytes.
pub type GgmlTensor = (String, u32, usize);

/// Reads a GGUF file with ggml's parser (the one `--control-vector` uses): the value of
/// `general.architecture` and each tensor's (name, ggml type, bytes).
///
/// # Errors
/// [`FfiError::Load`] when ggml rejects the file.
pub fn ggml_read_gguf(path: &Path) -> Result<(Option<String>, Vec<GgmlTensor>), FfiError> {
    init();
    let c = cpath(path)?;
    take_last_error();
    // SAFETY: no_alloc with a null ctx reads metadata only; the context is freed below and
    // strings are copied out before that.
    unsafe {
        let params = sys::gguf_init_params {
            no_alloc: true,
            ctx: std::ptr::null_mut(),
        };
        let g = sys::gguf_init_from_file(c.as_ptr(), params);
        if g.is_null() {
            return Err(FfiError::Load(take_last_error()));
        }
        let key = CString::new("general.architecture").expect("no NUL");
        let k = sys::gguf_find_key(g, key.as_ptr());
        let arch = (k >= 0).then(|| {
            CStr::from_ptr(sys::gguf_get_val_str(g, k))
                .to_string_lossy()
                .into_owned()
        });
        let n = sys::gguf_get_n_tensors(g);
        let tensors = (0..n)
            .map(|i| {
                let name = CStr::from_ptr(sys::gguf_get_tensor_name(g, i))
                    .to_string_lossy()
                    .into_owned();
                (
                    name,
                    sys::gguf_get_tensor_type(g, i),
                    sys::gguf_get_tensor_size(g, i),
                )
            })
            .collect();
        sys::gguf_free(g);
        Ok((arch, tensors))
    }
}
