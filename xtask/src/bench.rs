//! `cargo xtask bench ...`: throughput measurements, always against a baseline in the same run.
//! Each benchmark lives in its own module under `bench/`.

mod convert;
#[cfg(feature = "cuda")]
mod cuda;
mod gemv;
mod kv;
mod model;

use anyhow::Result;

/// The benchmark to run.
#[derive(clap::Subcommand)]
pub enum BenchCmd {
    /// Quantize/dequantize throughput of each format vs a plain copy of the same buffer.
    Convert(convert::Args),
    /// Quantized GEMV/GEMM weight bandwidth vs measured read bandwidth and vs f32.
    Gemv(gemv::Args),
    /// Model prefill and decode tokens/s.
    Model(model::Args),
    /// Quantized GEMV on the GPU vs a device copy (needs `--features cuda` and a CUDA device).
    #[cfg(feature = "cuda")]
    Cuda(cuda::Args),
    /// KV-cache decode step (append + attention) per policy at a long context, vs f32.
    Kv(kv::Args),
}

/// Dispatch a benchmark.
pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Convert(a) => convert::run(a),
        BenchCmd::Gemv(a) => gemv::run(a),
        BenchCmd::Model(a) => model::run(a),
        BenchCmd::Kv(a) => kv::run(a),
        #[cfg(feature = "cuda")]
        BenchCmd::Cuda(a) => cuda::run(a),
    }
}
