//! Studies built on the pipeline rather than part of it: quantized against full-precision
//! gating (`quant`, `compare`), throughput beside llama.cpp's own tools (`bench`) and the
//! quick persona demo (`demo`).

pub mod bench;
pub mod compare;
pub mod demo;
pub mod quant;
