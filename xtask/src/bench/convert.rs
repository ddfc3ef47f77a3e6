//! `cargo xtask bench convert`: quantize (f32 -> packed) and dequantize (packed -> f32)
//! throughput of each format on one f32 buffer, next to a plain copy of the same buffer measured
//! in the same run, at one thread and at all threads.
//!
//! Throughput is "GB/s of f32": bytes of the f32 side (input of quantize, output of dequantize)
//! divided by the best wall time over `--reps` runs after one warm-up run. The copy baseline is
//! `copy_from_slice` of the same f32 buffer into another preallocated one, with the same thread
//! count (split into the same chunks).
//!
//! Symmetric with the copy, every quantizer writes into the output of the previous run (the
//! warm-up run allocates it): `encode_slice` into a reused code buffer, `quantize_into` into
//! the reused `QuantizedTensor`, the GGUF codec into reused row buffers. So no timed run pays
//! first-touch page faults on its output, and none on its input (the buffer is written once
//! before the runs).
//!
//! Formats:
//! * `fp8_e4m3`: the bare element codec (`encode_slice` / `decode_slice`, RNE, saturating; one
//!   code per byte, no scale);
//! * `fp8-pc`, `int4-g128-asym`, `nvfp4`, `mxfp4`, `nf4-g64`: `lowbit_numerics::quantize` /
//!   `QuantizedTensor::dequantize_row` (scales computed and stored, codes packed);
//! * `q4_k`: the GGUF block codec (`lowbit_numerics::gguf::{quantize, dequantize}`), rows of
//!   the matrix in parallel; `q4_k-fast`: the same with `KQuantSearch::Fast` (not bit-exact
//!   with ggml; same dequantizer).

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lowbit_numerics::gguf::{self, GgmlType, KQuantSearch};
use lowbit_numerics::quantize::{quantize, quantize_into, QuantOptions};
use lowbit_numerics::{decode_slice, encode_slice, sr_bits, FloatFormat, Overflow, Rounding};
use lowbit_numerics::{QuantizedTensor, Scheme};
use rayon::prelude::*;
use std::time::Instant;

/// Columns of the benchmark matrix (a multiple of every block size: 16, 32, 64, 128, 256).
const COLS: usize = 4096;
/// Elements per parallel chunk of the bare FP8 codec.
const CHUNK: usize = 1 << 16;

/// Every format this benchmark knows, in report order.
const ALL: &[&str] = &[
    "fp8_e4m3",
    "fp8-pc",
    "int4-g128-asym",
    "nvfp4",
    "mxfp4",
    "nf4-g64",
    "q4_k",
    "q4_k-fast",
];

/// Arguments of `cargo xtask bench convert`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// One JSON object per line (format, direction, threads, gbps, copy_gbps, ratio_to_copy,
    /// mib, reps) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Size of the f32 buffer in MiB (rounded down to whole rows of 4096 floats).
    #[arg(long, default_value_t = 64)]
    pub mib: usize,
    /// "All threads" count (default: the machine's available parallelism). One thread is
    /// always measured too.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timed runs per measurement (the best is reported), after one warm-up run.
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Comma-separated subset of formats (fp8_e4m3, fp8-pc, int4-g128-asym, nvfp4, mxfp4,
    /// nf4-g64, q4_k, q4_k-fast). Default: all.
    #[arg(long)]
    pub formats: Option<String>,
}

/// One measured line.
struct Row {
    format: String,
    direction: &'static str,
    threads: usize,
    gbps: f64,
    copy_gbps: f64,
}

/// Best wall time in seconds of `reps` runs after one warm-up.
fn best_of(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Deterministic weight-like data: approximately normal (sum of four uniforms), sd 0.02, with
/// one outlier per 1024 elements at ~10x, as in LLM weight matrices.
fn make_data(n: usize) -> Vec<f32> {
    (0..n)
        .into_par_iter()
        .map(|i| {
            let i = i as u64;
            let u: f32 = (0..4)
                .map(|k| sr_bits(0xBE7C, i * 4 + k) as f32 * (1.0 / 4_294_967_296.0))
                .sum();
            let x = (u - 2.0) * 0.02 * 1.732;
            if sr_bits(0x0071, i) % 1024 == 0 {
                x * 10.0
            } else {
                x
            }
        })
        .collect()
}

/// What one format's quantized form looks like, kept between runs.
enum Packed {
    Codes(Vec<u8>),
    Tensor(Box<QuantizedTensor>),
    Gguf(Vec<Vec<u8>>),
}

struct Bench<'a> {
    x: &'a [f32],
    rows: usize,
    out: Vec<f32>,
}

impl Bench<'_> {
    fn copy(&mut self, threads: usize) {
        if threads == 1 {
            self.out.copy_from_slice(self.x);
        } else {
            self.out
                .par_chunks_mut(CHUNK)
                .zip(self.x.par_chunks(CHUNK))
                .for_each(|(o, i)| o.copy_from_slice(i));
        }
    }

    /// Quantize once (into `packed`).
    fn quantize(&self, fmt: &str, packed: &mut Option<Packed>) -> Result<()> {
        match fmt {
            "fp8_e4m3" => {
                let mut codes = match packed.take() {
                    Some(Packed::Codes(c)) => c,
                    _ => vec![0u8; self.x.len()],
                };
                codes
                    .par_chunks_mut(CHUNK)
                    .zip(self.x.par_chunks(CHUNK))
                    .try_for_each(|(o, i)| {
                        encode_slice(
                            FloatFormat::E4M3,
                            i,
                            o,
                            Rounding::NearestEven,
                            Overflow::Saturate,
                        )
                    })?;
                *packed = Some(Packed::Codes(codes));
            }
            "q4_k" | "q4_k-fast" => {
                let ty = GgmlType::from_name("Q4_K")?;
                let search = if fmt == "q4_k" {
                    KQuantSearch::Reference
                } else {
                    KQuantSearch::Fast
                };
                let row_bytes = ty.row_bytes(COLS)?;
                // One output Vec per chunk of rows, reused across runs.
                let per = rows_per_task(self.rows);
                let mut bufs = match packed.take() {
                    Some(Packed::Gguf(b)) => b,
                    _ => (0..self.rows.div_ceil(per))
                        .map(|_| Vec::with_capacity(per * row_bytes))
                        .collect(),
                };
                bufs.par_iter_mut()
                    .zip(self.x.par_chunks(per * COLS))
                    .try_for_each(|(buf, xs)| {
                        buf.clear();
                        xs.chunks(COLS)
                            .try_for_each(|row| gguf::quantize_with(ty, row, buf, search))
                    })?;
                *packed = Some(Packed::Gguf(bufs));
            }
            scheme => {
                let s = Scheme::from_name(scheme)?;
                let opts = QuantOptions::default();
                // the warm-up run allocates; the timed runs reuse its buffers (`quantize_into`)
                let q = match packed.take() {
                    Some(Packed::Tensor(mut q)) => {
                        quantize_into(self.x, self.rows, COLS, &s, &opts, &mut q)
                            .with_context(|| format!("quantize {scheme}"))?;
                        q
                    }
                    _ => Box::new(
                        quantize(self.x, self.rows, COLS, &s, &opts)
                            .with_context(|| format!("quantize {scheme}"))?,
                    ),
                };
                *packed = Some(Packed::Tensor(q));
            }
        }
        Ok(())
    }

    fn dequantize(&mut self, packed: &Packed) -> Result<()> {
        match packed {
            Packed::Codes(codes) => {
                self.out
                    .par_chunks_mut(CHUNK)
                    .zip(codes.par_chunks(CHUNK))
                    .try_for_each(|(o, c)| decode_slice(FloatFormat::E4M3, c, o))?;
            }
            Packed::Tensor(q) => {
                self.out
                    .par_chunks_mut(COLS)
                    .enumerate()
                    .try_for_each(|(r, o)| q.dequantize_row(r, o))?;
            }
            Packed::Gguf(bufs) => {
                let ty = GgmlType::Q4_K;
                let per = rows_per_task(self.rows);
                self.out
                    .par_chunks_mut(per * COLS)
                    .zip(bufs.par_iter())
                    .try_for_each(|(o, b)| gguf::dequantize(ty, b, o))?;
            }
        }
        Ok(())
    }
}

/// Rows per parallel task for the GGUF codec (enough tasks to balance 2..64 threads).
fn rows_per_task(rows: usize) -> usize {
    rows.div_ceil(256).max(1)
}

/// Run the benchmark.
pub fn run(args: Args) -> Result<()> {
    let formats: Vec<String> = match &args.formats {
        None => ALL.iter().map(|s| s.to_string()).collect(),
        Some(list) => {
            let v: Vec<String> = list
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .collect();
            for f in &v {
                if !ALL.contains(&f.as_str()) {
                    bail!(
                        "unknown format `{f}` for --formats; choose from: {}",
                        ALL.join(", ")
                    );
                }
            }
            v
        }
    };
    let all_threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if all_threads == 0 {
        bail!("--threads must be at least 1");
    }
    let rows = (args.mib << 20) / (4 * COLS);
    if rows == 0 {
        bail!(
            "--mib {} is smaller than one row of {COLS} floats; use --mib 1 or more",
            args.mib
        );
    }
    let n = rows * COLS;
    let bytes = (n * 4) as f64;
    let thread_counts: Vec<usize> = if all_threads == 1 {
        vec![1]
    } else {
        vec![1, all_threads]
    };

    let x = make_data(n);
    let mut b = Bench {
        x: &x,
        rows,
        out: vec![0f32; n],
    };
    let steps = thread_counts.len() * (1 + 2 * formats.len());
    let pb = ProgressBar::new(steps as u64);
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rows_out = Vec::new();
    for &t in &thread_counts {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .context("cannot build the rayon thread pool")?;
        pool.install(|| -> Result<()> {
            pb.set_message(format!("copy, {t} thread(s)"));
            let copy_s = best_of(args.reps, || {
                b.copy(t);
                Ok(())
            })?;
            let copy_gbps = bytes / copy_s / 1e9;
            pb.inc(1);
            for fmt in &formats {
                pb.set_message(format!("{fmt} quantize, {t} thread(s)"));
                let mut packed = None;
                let q_s = best_of(args.reps, || b.quantize(fmt, &mut packed))?;
                pb.inc(1);
                rows_out.push(Row {
                    format: fmt.clone(),
                    direction: "quantize",
                    threads: t,
                    gbps: bytes / q_s / 1e9,
                    copy_gbps,
                });
                pb.set_message(format!("{fmt} dequantize, {t} thread(s)"));
                let packed = packed.context("quantize produced nothing")?;
                let d_s = best_of(args.reps, || b.dequantize(&packed))?;
                pb.inc(1);
                // Sanity: the round trip must be close to the input (catches broken wiring,
                // not a precision test): relative RMS error below 25%.
                let (mut se, mut ss) = (0f64, 0f64);
                for (a, y) in x.iter().zip(&b.out).step_by(97) {
                    se += ((a - y) as f64).powi(2);
                    ss += (*a as f64).powi(2);
                }
                let plausible = se <= 0.0625 * ss; // false for NaN too
                if !plausible {
                    bail!(
                        "{fmt}: round trip relative RMS error {:.3} is implausible",
                        (se / ss).sqrt()
                    );
                }
                rows_out.push(Row {
                    format: fmt.clone(),
                    direction: "dequantize",
                    threads: t,
                    gbps: bytes / d_s / 1e9,
                    copy_gbps,
                });
            }
            Ok(())
        })?;
    }
    pb.finish_and_clear();

    if args.json {
        for r in &rows_out {
            println!(
                "{}",
                serde_json::json!({
                    "format": r.format,
                    "direction": r.direction,
                    "threads": r.threads,
                    "gbps": round3(r.gbps),
                    "copy_gbps": round3(r.copy_gbps),
                    "ratio_to_copy": round3(r.gbps / r.copy_gbps),
                    "mib": args.mib,
                    "reps": args.reps,
                })
            );
        }
    } else {
        println!(
            "{} MiB of f32 ({} x {}), best of {} runs; GB/s of f32",
            args.mib, rows, COLS, args.reps
        );
        println!(
            "{:<16} {:<11} {:>7} {:>9} {:>9} {:>8}",
            "format", "direction", "threads", "GB/s", "copy GB/s", "ratio"
        );
        for r in &rows_out {
            println!(
                "{:<16} {:<11} {:>7} {:>9.2} {:>9.2} {:>8.3}",
                r.format,
                r.direction,
                r.threads,
                r.gbps,
                r.copy_gbps,
                r.gbps / r.copy_gbps
            );
        }
    }
    Ok(())
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
