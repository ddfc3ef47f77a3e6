//! `cargo xtask bench cuda` (build with `--features cuda`): quantized GEMV on the GPU, weight
//! bandwidth against a device-to-device copy of the same number of bytes measured in the same run.

use anyhow::{Context, Result};
use lowbit_kernels::cuda::{CudaBackend, CudaLinear};
use lowbit_numerics::{quantize, QuantOptions, Scheme};
use std::time::Instant;

/// Arguments of `cargo xtask bench cuda`.
#[derive(clap::Args)]
pub struct Args {
    /// Output features of the weight matrix.
    #[arg(long, default_value_t = 4096)]
    pub rows: usize,
    /// Input features of the weight matrix.
    #[arg(long, default_value_t = 11008)]
    pub cols: usize,
    /// Tokens per call (1 = decode GEMV).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Comma-separated scheme names (see `cargo xtask quantize --help`).
    #[arg(
        long,
        default_value = "int4-g128-sym,int8-pc,fp8-pc,nvfp4,mxfp4,nf4-g64"
    )]
    pub formats: String,
    /// Timed repetitions (median reported).
    #[arg(long, default_value_t = 50)]
    pub reps: usize,
    /// Bytes (MiB) cycled through per timed pass: enough copies of the weight matrix are
    /// uploaded that each pass streams from device memory, not the GPU's L2 (50 MB on an
    /// H100). 0 = one copy, re-read from L2 after the first call.
    #[arg(long, default_value_t = 1024)]
    pub cycle_mib: usize,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Run the benchmark.
pub fn run(a: Args) -> Result<()> {
    let be = CudaBackend::new(a.device).context("CUDA backend unavailable")?;
    let (rows, cols, m) = (a.rows, a.cols, a.batch);
    let mut seed = 0x1234_5678u64;
    let mut rnd = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let w: Vec<f32> = (0..rows * cols).map(|_| rnd()).collect();
    let x: Vec<f32> = (0..m * cols).map(|_| rnd()).collect();
    let xd = be.upload(&x)?;
    let mut yd = be.zeros(m * rows)?;
    if !a.json {
        println!(
            "device: {}  shape {rows}x{cols}  batch {m}",
            be.device_name()
        );
        println!(
            "{:<16} {:>10} {:>12} {:>12} {:>8}",
            "format", "us/call", "weight GB/s", "copy GB/s", "ratio"
        );
    }
    for name in a
        .formats
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let scheme = Scheme::from_name(name)?;
        let q = quantize(&w, rows, cols, &scheme, &QuantOptions::default())?;
        let bytes = q.storage_bytes();
        // One pass launches the GEMV once per copy, back to back, so launch gaps overlap the
        // previous kernel and the per-call time is pass time / copies.
        let copies = (a.cycle_mib << 20).div_ceil(bytes).max(1);
        let lins = (0..copies)
            .map(|_| CudaLinear::new(&be, &q))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        // Baseline: one device-to-device copy of the same total bytes (read + write).
        let n = (bytes * copies).div_ceil(4);
        let src = be.zeros(n)?;
        let mut dst = be.zeros(n)?;
        let mut t_lin = Vec::new();
        let mut t_copy = Vec::new();
        for i in 0..a.reps + 3 {
            be.synchronize()?;
            let t = Instant::now();
            for lin in &lins {
                lin.forward_device(&xd, m, &mut yd)?;
            }
            be.synchronize()?;
            let dt = t.elapsed().as_secs_f64() / copies as f64;
            let t = Instant::now();
            be.copy(&src, &mut dst)?;
            be.synchronize()?;
            let dc = t.elapsed().as_secs_f64();
            if i >= 3 {
                t_lin.push(dt);
                t_copy.push(dc);
            }
        }
        let lin = &lins[0];
        let (tl, tc) = (median(t_lin), median(t_copy));
        let gbps = bytes as f64 / tl / 1e9;
        // A copy reads and writes each byte: count both directions as traffic.
        let copy_gbps = 2.0 * (n * 4) as f64 / tc / 1e9;
        let kernel = if lin.uses_word_kernel() {
            "word"
        } else {
            "generic"
        };
        let ratio = gbps / copy_gbps;
        if a.json {
            println!(
                "{}",
                serde_json::json!({"format": name, "rows": rows, "cols": cols, "batch": m,
                    "device": be.device_name(), "us_per_call": tl * 1e6, "weight_bytes": bytes,
                    "weight_gbps": gbps, "copy_gbps": copy_gbps, "ratio_to_copy": ratio,
                    "copies": copies, "kernel": if lin.uses_word_kernel() { "word" } else { "generic" }})
            );
        } else {
            println!(
                "{name:<16} {:>10.1} {gbps:>12.1} {copy_gbps:>12.1} {ratio:>8.2}  {kernel} x{copies}",
                tl * 1e6
            );
        }
    }
    Ok(())
}
