//! `cargo xtask bench kv`: decode-step cost of the KV cache alone (append one token + attend
//! one query, every layer) after a prefill of `--ctx` tokens, per policy, against f32 in the
//! same run (the caches are filled first, then the steps of all policies interleaved, so a
//! load change on a shared machine hits every policy alike); and (`--prefill N`, default 512) the attention of an N-token prefill (append N +
//! attend N queries, every layer) per policy against a naive one-query-at-a-time attention
//! (the pre-tiling algorithm, kept here only as the baseline) in the same run. Shape:
//! SmolLM2-135M (30 layers, 9 query heads, 3 KV heads, head_dim 64). K/V are random (speed
//! does not depend on the values).

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lowbit_kv_cache::{build, KvShape, Policy};
use serde_json::json;
use std::time::Instant;

/// Arguments of `cargo xtask bench kv`.
#[derive(clap::Args)]
pub struct Args {
    /// Policies separated by commas (mixed policies stay together, `;` also separates; `f32`
    /// is always measured first, as the baseline).
    #[arg(long, default_value = "f32;k=f32,v=f32;f16;fp8;int8;int4;kivi4;kivi2")]
    pub kv: String,
    /// Tokens in the cache before the decode steps.
    #[arg(long, default_value_t = 4096)]
    pub ctx: usize,
    /// Decode steps timed per policy (the median step is reported; steps of the policies are
    /// interleaved).
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Prefill length for the prefill-attention table (0: skip it).
    #[arg(long, default_value_t = 512)]
    pub prefill: usize,
    /// One JSON object per policy per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Run the benchmark.
pub fn run(args: Args) -> Result<()> {
    let shape = KvShape {
        n_layers: 30,
        n_kv_heads: 3,
        head_dim: 64,
    };
    let n_heads = 9;
    let row = shape.n_kv_heads * shape.head_dim;
    let mut pols = lowbit_kv_cache::split_policies(&args.kv);
    pols.retain(|p| p != "f32");
    pols.insert(0, "f32".into());
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    };
    let chunk = 512.min(args.ctx.max(1));
    let pre_k = rnd(chunk * row);
    let pre_v = rnd(chunk * row);
    let step_k = rnd(row);
    let step_v = rnd(row);
    let q = rnd(n_heads * shape.head_dim);
    let mut out = vec![0f32; q.len()];
    let pb = ProgressBar::new(pols.len() as u64);
    pb.set_style(ProgressStyle::with_template(
        "bench kv [{bar:30}] {pos}/{len} {elapsed} {msg}",
    )?);
    if !args.json {
        println!(
            "KV cache decode step at ctx {} (30 layers x append 1 + attend 1, SmolLM2-135M shape)",
            args.ctx
        );
        println!(
            "| policy | ms/token | tokens/s | vs f32 | KV bytes/token (steady) | bytes at ctx |"
        );
        println!("|---|---|---|---|---|---|");
    }
    // Fill every cache first, then time the steps interleaved (step i of every policy, then
    // step i + 1, ...), so load changes on a shared machine hit every policy alike.
    let mut caches = Vec::new();
    for p in &pols {
        pb.set_message(format!("fill {p}"));
        let mut cache = build(p, shape).with_context(|| format!("--kv {p}"))?;
        // SmolLM2-135M's RoPE (theta 100000), for policies that quantize keys before RoPE.
        let inv: Vec<f64> = (0..shape.head_dim / 2)
            .map(|i| 1.0 / 100_000f64.powf((2 * i) as f64 / shape.head_dim as f64))
            .collect();
        cache.set_rope(&inv)?;
        let mut filled = 0;
        while filled < args.ctx {
            let n = chunk.min(args.ctx - filled);
            for l in 0..shape.n_layers {
                cache.append(l, &pre_k[..n * row], &pre_v[..n * row], n)?;
            }
            filled += n;
        }
        caches.push(cache);
        pb.inc(1);
    }
    let mut times = vec![Vec::new(); pols.len()];
    for _ in 0..args.steps.max(1) {
        for (cache, ts) in caches.iter_mut().zip(&mut times) {
            let t0 = Instant::now();
            for l in 0..shape.n_layers {
                cache.append(l, &step_k, &step_v, 1)?;
                cache.attend(l, &q, 1, n_heads, 0.125, &mut out)?;
            }
            ts.push(t0.elapsed().as_secs_f64());
        }
    }
    let mut base = None;
    for ((p, cache), mut times) in pols.iter().zip(&caches).zip(times) {
        // Mean as well as median: the median hides periodic work (KIVI groups are quantized
        // every g-th step), which the model's tokens/s pays.
        let mean_ms = times.iter().sum::<f64>() / times.len() as f64 * 1e3;
        times.sort_by(f64::total_cmp);
        let ms = times[times.len() / 2] * 1e3;
        let tps = 1e3 / ms;
        let base_tps = *base.get_or_insert(tps);
        let steady = if p == "f32" {
            (8 * row * shape.n_layers) as f64
        } else {
            Policy::parse(p, shape, None)?.bytes_per_token(shape)
        };
        let bytes = cache.bytes();
        pb.suspend(|| {
            if args.json {
                println!(
                    "{}",
                    json!({"policy": p, "ctx": args.ctx, "ms_per_token": ms, "mean_ms_per_token": mean_ms, "tokens_per_s": tps,
                           "speedup_vs_f32": tps / base_tps, "bytes_per_token_steady": steady,
                           "bytes_total": bytes})
                );
            } else {
                println!(
                    "| {p} | {ms:.2} | {tps:.1} | {:.2}x | {steady:.0} | {bytes} |",
                    tps / base_tps
                );
            }
        });
    }
    drop(caches);
    pb.finish_and_clear();
    if args.prefill > 0 {
        prefill_table(&args, &pols, shape, n_heads, &mut rnd)?;
    }
    Ok(())
}

/// The pre-tiling attention (one query and head at a time, scores then softmax then values,
/// single thread), as the baseline of the prefill table.
#[allow(clippy::too_many_arguments)]
fn naive_attend(
    k: &[f32],
    v: &[f32],
    len: usize,
    q: &[f32],
    n_q: usize,
    n_heads: usize,
    nh_kv: usize,
    d: usize,
    scale: f32,
    out: &mut [f32],
) {
    let row = nh_kv * d;
    let g = n_heads / nh_kv;
    let mut sc = vec![0f32; len];
    for i in 0..n_q {
        let vis = len - n_q + i + 1;
        for h in 0..n_heads {
            let kvh = h / g;
            let qv = &q[(i * n_heads + h) * d..][..d];
            let mut mx = f32::NEG_INFINITY;
            for (t, s) in sc[..vis].iter_mut().enumerate() {
                let kr = &k[t * row + kvh * d..][..d];
                *s = qv.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale;
                mx = mx.max(*s);
            }
            let mut sum = 0f32;
            for s in &mut sc[..vis] {
                *s = (*s - mx).exp();
                sum += *s;
            }
            let o = &mut out[(i * n_heads + h) * d..][..d];
            o.fill(0.0);
            for (t, s) in sc[..vis].iter().enumerate() {
                let w = s / sum;
                for (a, b) in o.iter_mut().zip(&v[t * row + kvh * d..][..d]) {
                    *a += w * b;
                }
            }
        }
    }
}

fn prefill_table(
    args: &Args,
    pols: &[String],
    shape: KvShape,
    n_heads: usize,
    rnd: &mut impl FnMut(usize) -> Vec<f32>,
) -> Result<()> {
    let n = args.prefill;
    let row = shape.n_kv_heads * shape.head_dim;
    let k = rnd(n * row);
    let v = rnd(n * row);
    let q = rnd(n * n_heads * shape.head_dim);
    let mut out = vec![0f32; q.len()];
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    // Baseline: naive attention over the same data, all layers.
    let t0 = Instant::now();
    for _ in 0..shape.n_layers {
        naive_attend(
            &k,
            &v,
            n,
            &q,
            n,
            n_heads,
            shape.n_kv_heads,
            shape.head_dim,
            scale,
            &mut out,
        );
    }
    let base = t0.elapsed().as_secs_f64();
    let reference = out.clone();
    if !args.json {
        println!();
        println!(
            "Prefill attention of {n} tokens (30 layers x append {n} + attend {n} queries), {} rayon threads",
            rayon::current_num_threads()
        );
        println!("| policy | ms | vs naive single-thread attention | max |out - naive| |");
        println!("|---|---|---|---|");
        println!("| naive (baseline) | {:.1} | 1.00x | 0 |", base * 1e3);
    }
    for p in pols {
        let mut cache = build(p, shape).with_context(|| format!("--kv {p}"))?;
        let t0 = Instant::now();
        for l in 0..shape.n_layers {
            cache.append(l, &k, &v, n)?;
            cache.attend(l, &q, n, n_heads, scale, &mut out)?;
        }
        let t = t0.elapsed().as_secs_f64();
        let diff = out
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        if args.json {
            println!(
                "{}",
                json!({"policy": p, "prefill": n, "ms": t * 1e3, "naive_ms": base * 1e3,
                       "speedup_vs_naive": base / t, "max_abs_diff_vs_naive": diff})
            );
        } else {
            println!("| {p} | {:.1} | {:.2}x | {diff:.2e} |", t * 1e3, base / t);
        }
    }
    Ok(())
}
