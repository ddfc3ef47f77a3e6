//! `cargo xtask bench ...`: throughput measurements, always against a baseline in the same run.
//! Each benchmark lives in its own module under `bench/`.

mod gemv;

use anyhow::{bail, Result};

/// The benchmark to run.
#[derive(clap::Subcommand)]
pub enum BenchCmd {
    /// Quantize/dequantize throughput of each format vs a plain copy of the same buffer.
    Convert {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Quantized GEMV/GEMM weight bandwidth vs measured read bandwidth and vs f32.
    Gemv(gemv::Args),
    /// Model prefill and decode tokens/s.
    Model {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Dispatch a benchmark.
pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Convert { .. } => bail!("bench convert: not implemented yet"),
        BenchCmd::Gemv(a) => gemv::run(a),
        BenchCmd::Model { .. } => bail!("bench model: not implemented yet"),
    }
}
