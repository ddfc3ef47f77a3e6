//! `cargo xtask bench gemv`: quantized GEMV/GEMM (lowbit-kernels `PackedLinear`, or the W8A8
//! path with `--format w8a8`) against two baselines measured in the same run and the same
//! cache state: a plain SIMD sum over buffers of the same total size (the read bandwidth), and
//! the f32 GEMV/GEMM of the same shape (`dense::matmul_wt`).
//!
//! Regimes: `cache` (one matrix, warmed up, re-read) and `dram` (enough copies to cycle through
//! at least 256 MiB, so every pass streams from DRAM). Each measurement is the median of `--reps`
//! rounds; the three kernels are interleaved round by round so background load hits them alike.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use lowbit_kernels::w8a8::W8A8Path;
use lowbit_kernels::{dense, membw, ActMode, PackedLinear, W8A8Linear};
use lowbit_numerics::{ElemFormat, FloatFormat, QuantizedTensor, ScaleDtype, Scheme};

/// Arguments of `cargo xtask bench gemv`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output features (rows of W).
    #[arg(long, default_value_t = 4096)]
    pub rows: usize,
    /// Input features (columns of W).
    #[arg(long, default_value_t = 11008)]
    pub cols: usize,
    /// Weight scheme by its lowbit name (int4-g128-sym, int4-g32-asym, int8-pc, fp8-pc, nvfp4,
    /// mxfp4, nf4-g64, int3-g128-sym, ...), `w8a8` for INT8 weights x per-token INT8
    /// activations, or `f32` for the dense decode GEMV (`lowbit_kernels::gemv_f32`; its `vs f32`
    /// column is then the speed-up over the `gemm`-crate product of the same shape).
    #[arg(long, default_value = "int4-g128-sym")]
    pub format: String,
    /// Tokens per call (1..8 is the decode GEMV regime, larger is prefill GEMM).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Threads (default: the machine's available parallelism).
    #[arg(long)]
    pub threads: Option<usize>,
    /// `cache`, `dram` or `both`.
    #[arg(long, default_value = "both")]
    pub regime: String,
    /// Timed rounds per measurement (median reported), after one warm-up round.
    #[arg(long, default_value_t = 7)]
    pub reps: usize,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Formats with an integer path (INT4..INT8, MXFP4, NVFP4, NF4): run `PackedLinear` with
    /// INT8 block activations (`ActMode::Int8Block`, integer dot products) and also time, in the
    /// same rounds, the f32-activation kernel of the same weights and the dense f32 GEMV
    /// (`gemv_f32`, one call per token).
    #[arg(long)]
    pub act8: bool,
}

/// Uniform-ish pseudo-random bytes (xorshift), enough for codes and activations.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// A tensor of the scheme with random (finite) codes and scales: speed does not depend on the
/// values, and building it this way keeps the benchmark independent of quantizer speed.
fn random_tensor(scheme: Scheme, rows: usize, cols: usize, rng: &mut Rng) -> QuantizedTensor {
    let bits = scheme.elem.bits();
    let rb = (cols * bits as usize).div_ceil(8);
    let mut data: Vec<u8> = (0..rows * rb).map(|_| rng.next() as u8).collect();
    if matches!(
        scheme.elem,
        ElemFormat::Float(FloatFormat::E4M3 | FloatFormat::E5M2)
    ) {
        for b in &mut data {
            *b &= 0xBB; // clears an exponent bit: no NaN/Inf codes
        }
    }
    let (gr, gc) = scheme.granularity.grid(rows, cols);
    QuantizedTensor {
        scheme,
        rows,
        cols,
        data,
        // scales take values of the scheme's scale dtype, as a real quantizer's would (this
        // decides the packed header: E8M0/E4M3 scales pack as one-byte codes)
        scales: (0..gr * gc)
            .map(|_| {
                let v = 0.5 + rng.f().abs();
                match scheme.scale_dtype {
                    ScaleDtype::E8M0 => 2f32.powi(-((rng.next() % 8) as i32)),
                    ScaleDtype::E4M3 => {
                        lowbit_kernels::codes::e4m3(0x08 + (rng.next() % 0x70) as u8)
                    }
                    ScaleDtype::F16 => half::f16::from_f32(v).to_f32(),
                    ScaleDtype::Bf16 => half::bf16::from_f32(v).to_f32(),
                    _ => v,
                }
            })
            .collect(),
        zero_points: scheme.asymmetric.then(|| {
            (0..gr * gc)
                .map(|_| (rng.next() % (1 << bits)) as u8)
                .collect()
        }),
        global_scale: scheme.global_scale.then_some(2.0),
        g_idx: None,
        nested: None,
    }
}

enum Kernel {
    Packed(Vec<PackedLinear>),
    W8a8(Vec<W8A8Linear>),
    /// `--format f32`: the dense decode GEMV (`gemv_f32`) on f32 weights `[rows][cols]`.
    F32(Vec<Vec<f32>>),
}

impl Kernel {
    fn bytes(&self) -> usize {
        match self {
            Kernel::Packed(v) => v[0].weight_bytes(),
            Kernel::W8a8(v) => v[0].weight_bytes(),
            Kernel::F32(v) => v[0].len() * 4,
        }
    }
    fn run(&self, i: usize, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        match self {
            Kernel::Packed(v) => v[i % v.len()].forward(x, n, y)?,
            Kernel::W8a8(v) => v[i % v.len()].forward(x, n, y)?,
            Kernel::F32(v) => {
                let k = x.len() / n;
                for (xt, yt) in x.chunks_exact(k).zip(y.chunks_exact_mut(v[0].len() / k)) {
                    lowbit_kernels::gemv_f32::gemv(xt, &v[i % v.len()], yt)?;
                }
            }
        }
        Ok(())
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One measured line.
struct Line {
    regime: &'static str,
    copies: usize,
    weight_bytes: usize,
    kernel_s: f64,
    read_s: f64,
    f32_s: f64,
    /// `--act8`: the f32-activation kernel of the same weights, and `gemv_f32`.
    act8_base: Option<(f64, f64)>,
    /// `w8a8` on AMX: the non-AMX integer path of the same weights (name, seconds per pass).
    w8a8_alt: Option<(&'static str, f64)>,
}

/// Seconds per pass of `f` over `passes` consecutive buffers (cycling), median of rounds.
fn time_passes(
    reps: usize,
    passes: usize,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        for i in 0..passes {
            f(i)?;
        }
        out.push(t.elapsed().as_secs_f64() / passes as f64);
    }
    Ok(out)
}

fn measure(args: &Args, scheme: Option<Scheme>, regime: &'static str) -> Result<Line> {
    let f32_gemv = args.format.eq_ignore_ascii_case("f32");
    const DRAM_BYTES: usize = 256 << 20;
    let (rows, cols, batch) = (args.rows, args.cols, args.batch);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let w8 = || Scheme::from_name("int8-pc").context("int8-pc scheme");
    let q = random_tensor(scheme.map_or_else(w8, Ok)?, rows, cols, &mut rng);
    let one = match scheme {
        _ if f32_gemv => Kernel::F32(vec![(0..rows * cols).map(|_| rng.f()).collect()]),
        Some(_) => Kernel::Packed(vec![PackedLinear::new(&q).context("packing the weights")?]),
        None => Kernel::W8a8(vec![
            W8A8Linear::new(&q).context("packing the W8A8 weights")?
        ]),
    };
    let wb = one.bytes();
    let copies = if regime == "dram" {
        DRAM_BYTES.div_ceil(wb).max(2)
    } else {
        1
    };
    // --act8: the measured kernel runs on INT8 activations, `base` is the same weights on the
    // f32-activation kernel
    let base = match (&one, args.act8) {
        (Kernel::Packed(v), true) => {
            let b = v[0].clone();
            Some(Kernel::Packed(vec![b; copies]))
        }
        (_, true) => bail!("--act8 needs a packed format with an integer path (int4-g128-sym, int8-pc, mxfp4, nvfp4, nf4-g64, ...)"),
        _ => None,
    };
    let one = match one {
        Kernel::Packed(mut v) if args.act8 => {
            v[0].set_act_mode(ActMode::Int8Block)
                .context("--act8 needs INT4..INT8, E2M1 (MXFP4/NVFP4) or NF4 codes")?;
            Kernel::Packed(v)
        }
        k => k,
    };
    let kern = match one {
        Kernel::Packed(v) => Kernel::Packed(vec![v[0].clone(); copies]),
        Kernel::W8a8(v) => Kernel::W8a8(vec![v[0].clone(); copies]),
        Kernel::F32(v) => Kernel::F32(vec![v[0].clone(); copies]),
    };
    // w8a8 on AMX: also time the path it replaces (VNNI/AVX2) on the same weights and rounds
    let w8a8_alt = match &kern {
        Kernel::W8a8(v) if v[0].path_for(batch) == W8A8Path::Amx => {
            Some(W8A8Path::from_isa(lowbit_kernels::isa::selected()))
        }
        _ => None,
    };
    let reads: Vec<Vec<u8>> = (0..copies).map(|i| vec![i as u8 | 1; wb]).collect();
    let f32_bytes = rows * cols * 4;
    let f32_copies = if regime == "dram" {
        DRAM_BYTES.div_ceil(f32_bytes).max(2)
    } else {
        1
    };
    let wf: Vec<Vec<f32>> = (0..f32_copies)
        .map(|_| (0..rows * cols).map(|_| rng.f()).collect())
        .collect();
    let x: Vec<f32> = (0..batch * cols).map(|_| rng.f()).collect();
    let mut y = vec![0f32; batch * rows];
    let run_alt = |p: W8A8Path, i: usize, y: &mut [f32]| -> Result<()> {
        if let Kernel::W8a8(v) = &kern {
            v[i % v.len()].forward_path(p, &x, batch, y)?;
        }
        Ok(())
    };
    let mut sink = 0u64;
    // Per round: every copy once (dram) or the same buffer `copies`=1 times after warm-up.
    let passes_k = copies.max(if regime == "cache" { 5 } else { 1 });
    let passes_f = f32_copies.max(if regime == "cache" { 3 } else { 1 });
    // warm-up round
    for (i, r) in reads.iter().enumerate().take(copies) {
        kern.run(i, &x, batch, &mut y)?;
        sink = sink.wrapping_add(membw::par_sum_words(r));
        if let Some(p) = w8a8_alt {
            run_alt(p, i, &mut y)?;
        }
    }
    dense::matmul_wt(&x, &wf[0], &mut y, batch, cols, rows)?;
    let (mut tk, mut tr, mut tf) = (Vec::new(), Vec::new(), Vec::new());
    let (mut tb, mut tg, mut ta) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.reps.max(1) {
        tr.extend(time_passes(1, passes_k, |i| {
            sink = sink.wrapping_add(membw::par_sum_words(&reads[i % copies]));
            Ok(())
        })?);
        tk.extend(time_passes(1, passes_k, |i| {
            kern.run(i, &x, batch, &mut y)
        })?);
        tf.extend(time_passes(1, passes_f, |i| {
            dense::matmul_wt(&x, &wf[i % f32_copies], &mut y, batch, cols, rows)?;
            Ok(())
        })?);
        if let Some(p) = w8a8_alt {
            ta.extend(time_passes(1, passes_k, |i| run_alt(p, i, &mut y))?);
        }
        if let Some(b) = &base {
            tb.extend(time_passes(1, passes_k, |i| b.run(i, &x, batch, &mut y))?);
            tg.extend(time_passes(1, passes_f, |i| {
                let w = &wf[i % f32_copies];
                for (xt, yt) in x.chunks_exact(cols).zip(y.chunks_exact_mut(rows)) {
                    lowbit_kernels::gemv_f32::gemv(xt, w, yt)?;
                }
                Ok(())
            })?);
        }
    }
    std::hint::black_box(sink);
    std::hint::black_box(&y);
    Ok(Line {
        regime,
        copies,
        weight_bytes: wb,
        kernel_s: median(tk),
        read_s: median(tr),
        f32_s: median(tf),
        act8_base: base.map(|_| (median(tb), median(tg))),
        w8a8_alt: w8a8_alt.map(|p| (p.name(), median(ta))),
    })
}

/// Run the benchmark.
pub fn run(args: Args) -> Result<()> {
    if args.rows == 0 || args.cols == 0 || args.batch == 0 {
        bail!("--rows, --cols and --batch must be positive");
    }
    let scheme = if args.format.eq_ignore_ascii_case("w8a8")
        || args.format.eq_ignore_ascii_case("f32")
    {
        None
    } else {
        Some(Scheme::from_name(&args.format).with_context(|| {
            format!("unknown --format `{}`: use a lowbit scheme name such as int4-g128-sym, int8-pc, fp8-pc, nvfp4, mxfp4, nf4-g64, w8a8 or f32", args.format)
        })?)
    };
    let regimes: Vec<&'static str> = match args.regime.as_str() {
        "cache" => vec!["cache"],
        "dram" => vec!["dram"],
        "both" => vec!["cache", "dram"],
        r => bail!("--regime must be cache, dram or both (got `{r}`)"),
    };
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let isa = lowbit_kernels::isa::selected().name();
    // the W8A8 implementation (amx / avx512-vnni / avx2 / scalar); `LOWBIT_AMX=0` turns AMX off
    let w8a8_path = (scheme.is_none() && args.format.eq_ignore_ascii_case("w8a8"))
        .then(|| W8A8Path::selected(args.batch).name());
    if !args.json {
        println!(
            "bench gemv: {} {}x{} batch {} threads {} kernel path {isa}{} (LOWBIT_KERNEL / LOWBIT_AMX=0 to force)",
            args.format,
            args.rows,
            args.cols,
            args.batch,
            threads,
            w8a8_path.map_or(String::new(), |p| format!(", w8a8 path {p}"))
        );
        println!(
            "{:<6} {:>7} {:>10} {:>10} {:>10} {:>10} {:>9} {:>10} {:>9}",
            "regime",
            "copies",
            "weight MB",
            "kernel ms",
            "weight GB/s",
            "read GB/s",
            "ratio",
            "f32 ms",
            "vs f32"
        );
    }
    for regime in regimes {
        let l = pool.install(|| measure(&args, scheme, regime))?;
        let gbps = l.weight_bytes as f64 / l.kernel_s / 1e9;
        let read = l.weight_bytes as f64 / l.read_s / 1e9;
        let speedup = l.f32_s / l.kernel_s;
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "format": args.format, "rows": args.rows, "cols": args.cols, "batch": args.batch,
                    "threads": threads, "regime": l.regime, "weight_gbps": gbps, "read_bw_gbps": read,
                    "ratio_to_read_bw": gbps / read, "speedup_vs_f32": speedup, "isa": isa,
                    "weight_bytes": l.weight_bytes, "copies": l.copies, "kernel_ms": l.kernel_s * 1e3,
                    "f32_ms": l.f32_s * 1e3, "reps": args.reps, "act8": args.act8,
                    "f32_act_kernel_ms": l.act8_base.map(|b| b.0 * 1e3),
                    "speedup_vs_f32_act": l.act8_base.map(|b| b.0 / l.kernel_s),
                    "gemv_f32_ms": l.act8_base.map(|b| b.1 * 1e3),
                    "speedup_vs_gemv_f32": l.act8_base.map(|b| b.1 / l.kernel_s),
                    "w8a8_path": w8a8_path, "alt_path": l.w8a8_alt.map(|a| a.0),
                    "alt_ms": l.w8a8_alt.map(|a| a.1 * 1e3),
                    "speedup_vs_alt": l.w8a8_alt.map(|a| a.1 / l.kernel_s),
                })
            );
        } else {
            println!(
                "{:<6} {:>7} {:>10.1} {:>10.3} {:>10.2} {:>10.2} {:>9.2} {:>10.3} {:>8.2}x",
                l.regime,
                l.copies,
                l.weight_bytes as f64 / 1e6,
                l.kernel_s * 1e3,
                gbps,
                read,
                gbps / read,
                l.f32_s * 1e3,
                speedup
            );
            if let Some((p, a)) = l.w8a8_alt {
                println!(
                    "       w8a8: {p} path on the same weights {:.3} ms ({:.2}x slower than {})",
                    a * 1e3,
                    a / l.kernel_s,
                    w8a8_path.unwrap_or("?")
                );
            }
            if let Some((b, g)) = l.act8_base {
                println!(
                    "       act8: f32-activation kernel {:.3} ms ({:.2}x slower), gemv_f32 {:.3} ms ({:.2}x slower)",
                    b * 1e3,
                    b / l.kernel_s,
                    g * 1e3,
                    g / l.kernel_s
                );
            }
        }
    }
    Ok(())
}
