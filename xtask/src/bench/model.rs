//! `cargo xtask bench model`: prefill tokens/s (one prompt of `--prompt` tokens, logits of the
//! last token only, as llama-bench's pp test) and decode tokens/s (`--gen` tokens one at a time
//! from an empty cache, as llama-bench's tg test), per thread count, each in its own rayon pool.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lowbit_model::llama::Logits;
use lowbit_model::sampling::argmax;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `cargo xtask bench model`.
#[derive(clap::Args)]
pub struct Args {
    /// Model: a .gguf file, a (quantized) checkpoint folder written by `cargo xtask quantize`, or
    /// a cached repo id (default: SHARED/models/smollm2-135m-instruct-q4_1.gguf).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Quantize the output head at load time to this scheme (e.g. `int8-pc`), as serving stacks
    /// store it; the head otherwise dominates the bytes a small quantized model reads per token.
    #[arg(long)]
    pub head: Option<String>,
    /// INT8 block activations on the quantized linears that have an integer path (INT4..INT8,
    /// MXFP4/NVFP4, NF4; integer dot products, `lowbit_kernels::ActMode::Int8Block`; changes the
    /// numerics slightly).
    #[arg(long)]
    pub act8: bool,
    /// Comma-separated thread counts (default: 1 and all cores).
    #[arg(long, value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// Prompt length of the prefill test.
    #[arg(long, default_value_t = 512)]
    pub prompt: usize,
    /// Tokens of the decode test.
    #[arg(long, default_value_t = 128)]
    pub gen: usize,
    /// Repetitions per setting; the median is reported.
    #[arg(long, default_value_t = 1)]
    pub reps: usize,
    /// KV-cache policy.
    #[arg(long, default_value = "f32")]
    pub kv: String,
    /// Benchmark a random model of SmolLM2-135M's shape instead of loading a file (speed does not
    /// depend on the weight values; for machines without the shared folder).
    #[arg(long, conflicts_with = "model")]
    pub random: bool,
    /// Decode after the prompt: the --gen timed tokens continue from the prompt's KV cache
    /// (decode at a context of --prompt tokens, where the KV cache's bytes show), instead of
    /// from an empty cache as llama-bench's tg does.
    #[arg(long)]
    pub decode_after_prompt: bool,
    /// With --decode-after-prompt: also prefill a second cache with this policy (e.g. `f32`)
    /// and alternate decode steps between the two caches in the same process (the first cache
    /// first on even steps, the baseline first on odd ones), so that load changes on a shared
    /// machine hit both alike; reports both rates and their ratio.
    #[arg(long, requires = "decode_after_prompt")]
    pub baseline_kv: Option<String>,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// SmolLM2-135M's shape (shared/models/README.md).
fn smollm2_config() -> lowbit_model::ModelConfig {
    lowbit_model::ModelConfig {
        arch: lowbit_model::Arch::Llama,
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        n_layers: 30,
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
        rope_theta: 100000.0,
        rope_scaling: lowbit_model::RopeScaling::None,
        rms_eps: 1e-5,
        max_ctx: 8192,
        tie_embeddings: true,
        qkv_bias: false,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Run the benchmark.
pub fn run(args: Args) -> Result<()> {
    let (path, mut model) = if args.random {
        (
            PathBuf::from("random:smollm2-135m"),
            lowbit_model::weights::random_model(smollm2_config(), 1)?,
        )
    } else {
        let path = match &args.model {
            Some(p) => p.clone(),
            None => crate::shared::shared_dir()?.join("models/smollm2-135m-instruct-q4_1.gguf"),
        };
        let model = lowbit_model::load::load_model(&path)
            .with_context(|| format!("loading {} (pass --model FILE.gguf)", path.display()))?;
        (path, model)
    };
    crate::model_opts::apply(&mut model, args.head.as_deref(), args.act8)?;
    let vocab = model.config.vocab_size as u64;
    // Deterministic pseudo-random tokens (content does not change the cost).
    let mut s = 0x9e3779b97f4a7c15u64;
    let tokens: Vec<u32> = (0..args.prompt.max(1))
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % vocab) as u32
        })
        .collect();
    let threads = if args.threads.is_empty() {
        let all = std::thread::available_parallelism().map_or(1, |n| n.get());
        if all > 1 {
            vec![1, all]
        } else {
            vec![1]
        }
    } else {
        args.threads.clone()
    };
    let reps = args.reps.max(1);
    let pb = ProgressBar::new((threads.len() * reps) as u64);
    pb.set_style(ProgressStyle::with_template(
        "bench model [{bar:30}] {pos}/{len} {elapsed} {msg}",
    )?);
    if !args.json {
        println!(
            "model: {} ({} layers, hidden {})",
            path.display(),
            model.config.n_layers,
            model.config.hidden_size
        );
        println!(
            "| threads | pp{} tok/s | prefill GFLOP/s | GEMM GFLOP/s | vs GEMM | tg{} tok/s | weight MB/token | decode GB/s | read GB/s | ratio |",
            args.prompt, args.gen
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
    }
    // Bytes of weights streamed per decoded token: every linear as stored (packed or f32) + the
    // output head; compared with a plain read of as many bytes, measured in the same run.
    let weight_bytes = model.streamed_weight_bytes() as f64;
    // Arithmetic of the prefill (logits of the last token only): 2 flops per weight of every
    // decoder linear per token, causal attention (q·k and p·v over on average (n+1)/2 keys), the
    // head once. Compared below with this machine's dense f32 GEMM rate measured in the same run.
    let c = &model.config;
    let n = tokens.len() as f64;
    let layer_w =
        c.hidden_size * (2 * c.q_dim() + 2 * c.kv_dim()) + 3 * c.hidden_size * c.intermediate_size;
    let prefill_flops = n * 2.0 * (c.n_layers * layer_w) as f64
        + c.n_layers as f64 * 4.0 * c.q_dim() as f64 * n * (n + 1.0) / 2.0
        + 2.0 * (c.vocab_size * c.hidden_size) as f64;
    let read_buf = vec![1u8; (model.streamed_weight_bytes() * 2).max(256 << 20)];
    for &t in &threads {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(t.max(1))
            .build()?;
        let (mut pp, mut tg, mut tgb) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..reps {
            pb.set_message(format!("{t} thread(s)"));
            let (p, g, gb) = pool.install(|| -> Result<(f64, f64, f64)> {
                let mut cache = model.new_cache(&args.kv)?;
                let t0 = Instant::now();
                let last = model.forward(&tokens, cache.as_mut(), Logits::Last)?;
                let pp = tokens.len() as f64 / t0.elapsed().as_secs_f64();
                let mut tok = tokens[0];
                if args.decode_after_prompt {
                    tok = argmax(&last) as u32;
                } else {
                    cache = model.new_cache(&args.kv)?;
                }
                if let Some(base) = &args.baseline_kv {
                    // Interleaved: each cache continues its own greedy sequence.
                    let mut cb = model.new_cache(base)?;
                    let mut tb = argmax(&model.forward(&tokens, cb.as_mut(), Logits::Last)?) as u32;
                    let (mut sm, mut sb) = (0f64, 0f64);
                    for i in 0..args.gen {
                        for first in [i % 2 == 0, i % 2 == 1] {
                            let t0 = Instant::now();
                            if first {
                                tok =
                                    argmax(&model.forward(&[tok], cache.as_mut(), Logits::Last)?)
                                        as u32;
                                sm += t0.elapsed().as_secs_f64();
                            } else {
                                tb = argmax(&model.forward(&[tb], cb.as_mut(), Logits::Last)?)
                                    as u32;
                                sb += t0.elapsed().as_secs_f64();
                            }
                        }
                    }
                    return Ok((pp, args.gen as f64 / sm, args.gen as f64 / sb));
                }
                let t0 = Instant::now();
                for _ in 0..args.gen {
                    let l = model.forward(&[tok], cache.as_mut(), Logits::Last)?;
                    tok = argmax(&l) as u32;
                }
                Ok((pp, args.gen as f64 / t0.elapsed().as_secs_f64(), f64::NAN))
            })?;
            pp.push(p);
            tg.push(g);
            tgb.push(gb);
            pb.inc(1);
        }
        let (pp, tg) = (median(pp), median(tg));
        let tgb = if args.baseline_kv.is_some() {
            Some(median(tgb))
        } else {
            None
        };
        // Read bandwidth at this thread count over a buffer larger than the weights (DRAM).
        let read_gbs = pool.install(|| {
            let mut best = 0f64;
            for _ in 0..3 {
                let t0 = Instant::now();
                std::hint::black_box(lowbit_kernels::membw::par_sum_words(&read_buf));
                best = best.max(read_buf.len() as f64 / t0.elapsed().as_secs_f64() / 1e9);
            }
            best
        });
        let dec_gbs = tg * weight_bytes / 1e9;
        // Dense f32 GEMM rate of this machine at this thread count (1024^3, best of 3).
        let gemm_gflops = pool.install(|| -> Result<f64> {
            let d = 1024;
            let a = vec![0.5f32; d * d];
            let mut o = vec![0f32; d * d];
            let mut best = f64::MAX;
            for _ in 0..3 {
                let t0 = Instant::now();
                lowbit_kernels::dense::matmul_wt(&a, &a, &mut o, d, d, d)?;
                best = best.min(t0.elapsed().as_secs_f64());
            }
            Ok(2.0 * (d * d * d) as f64 / best / 1e9)
        })?;
        let pp_gflops = pp * prefill_flops / n / 1e9;
        pb.suspend(|| {
            if args.json {
                println!(
                    "{}",
                    json!({"bench": "model", "model": path, "threads": t, "prompt_tokens": args.prompt,
                           "gen_tokens": args.gen, "prefill_tok_s": pp, "decode_tok_s": tg,
                           "weight_bytes_per_token": weight_bytes, "decode_gb_s": dec_gbs,
                           "read_bw_gbps": read_gbs, "ratio_to_read_bw": dec_gbs / read_gbs,
                           "prefill_gflops": pp_gflops, "gemm_gflops": gemm_gflops,
                           "prefill_vs_gemm": pp_gflops / gemm_gflops,
                           "head": args.head, "act8": args.act8, "kv": args.kv, "reps": reps,
                           "decode_after_prompt": args.decode_after_prompt,
                           "baseline_kv": args.baseline_kv, "baseline_decode_tok_s": tgb,
                           "decode_vs_baseline": tgb.map(|b| tg / b)})
                );
            } else {
                println!(
                    "| {t} | {pp:.1} | {pp_gflops:.1} | {gemm_gflops:.1} | {:.2} | {tg:.2} | {:.1} | {dec_gbs:.2} | {read_gbs:.2} | {:.2} |",
                    pp_gflops / gemm_gflops,
                    weight_bytes / 1e6,
                    dec_gbs / read_gbs
                );
                if let (Some(b), Some(base)) = (tgb, &args.baseline_kv) {
                    println!(
                        "decode interleaved with KV `{base}`: {tg:.2} vs {b:.2} tok/s ({:.2}x)",
                        tg / b
                    );
                }
            }
        });
    }
    pb.finish_and_clear();
    Ok(())
}
