//! `cargo xtask eval`: perplexity over non-overlapping windows, and with `--reference` the
//! KL / top-1 / tail metrics against a reference model, computed in the same run.
//!
//! Protocol (`shared/models/README.md`): the text is read as UTF-8 with CRLF turned into LF,
//! tokenized in one piece with the model's tokenizer, **no BOS added** (even for models whose
//! tokenizer asks for one, so that every figure is comparable); cut into non-overlapping windows
//! of `--ctx` tokens, each run alone with a fresh KV cache, predicting its last `ctx - 1` tokens.
//! A final partial window is reported and not scored; the text is never silently truncated.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lowbit_model::eval::{evaluate, EvalOptions};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `cargo xtask eval`.
#[derive(clap::Args)]
pub struct Args {
    /// The model: a .gguf file, a Hugging Face folder, or a repo id in the HF cache.
    #[arg(long)]
    pub model: String,
    /// The text to score (e.g. SHARED/data/eval/wikitext-2-raw-test.txt).
    #[arg(long)]
    pub text: PathBuf,
    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Score only the first N windows (default: every full window).
    #[arg(long)]
    pub windows: Option<usize>,
    /// Reference model (e.g. the unquantized one) for KL, top-1 agreement and NLL tails.
    #[arg(long)]
    pub reference: Option<String>,
    /// Quantize the evaluated model's output head at load time (RTN, e.g. `int8-pc`), as the
    /// decode benchmark's `--head` does, to measure what that costs in quality.
    #[arg(long)]
    pub head: Option<String>,
    /// INT8 block activations on the quantized linears that have an integer path (INT4..INT8,
    /// MXFP4/NVFP4, NF4; integer dot products, `lowbit_kernels::ActMode::Int8Block`; changes the
    /// numerics slightly).
    #[arg(long)]
    pub act8: bool,
    /// KV-cache policy of the evaluated model (`f32`, `fp8`, ...; see docs/kv-cache.md).
    #[arg(long, default_value = "f32")]
    pub kv: String,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON object on the last stdout line.
    #[arg(long)]
    pub json: bool,
    /// Rotate the model before evaluating (in memory; docs/rotations.md): `none`, `quarot`
    /// (randomized Hadamard R1/R2 + online Hadamard before down_proj) or `spinquant` (R1/R2
    /// learned by Cayley SGD on --calib; needs a quantized --wa-scheme).
    #[arg(long, default_value = "none")]
    pub rotate: String,
    /// Weight + activation quantization applied in memory after the rotation: `f32` (none),
    /// `w4a4-int`, `w4a8-int`, `w8a8-int8`, `w4a4-nvfp4`, `w4a4-mxfp4` (INT weights g128 sym /
    /// per-channel INT8; activations per-token dynamic on every decoder linear).
    #[arg(long, default_value = "f32")]
    pub wa_scheme: String,
    /// Weight quantization for --wa-scheme: `rtn` or `gptq` (needs --calib).
    #[arg(long, default_value = "rtn")]
    pub weight_method: String,
    /// Calibration text files for GPTQ / SpinQuant (never the evaluation text).
    #[arg(long, num_args = 1..)]
    pub calib: Vec<PathBuf>,
    /// Calibration windows drawn from --calib.
    #[arg(long, default_value_t = 16)]
    pub calib_samples: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 512)]
    pub calib_seqlen: usize,
    /// Weight block scales for --wa-scheme: `absmax`, or `mse` (QuaRot's clipping search).
    #[arg(long, default_value = "absmax")]
    pub weight_clip: String,
    /// Per-token activation clipping ratio in (0, 1] (1 = no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub act_clip: f32,
    /// Static per-tensor activation scales instead of per-token dynamic ones: one scale per
    /// decoder linear, calibrated on --calib (never the evaluation text) through the rotated,
    /// weight-quantized model: `absmax`, `percentile:P` (e.g. `percentile:99.9`) or `mse`.
    /// INT / FP8 activation schemes only (not w4a4-nvfp4 / w4a4-mxfp4), without --act-clip.
    #[arg(long)]
    pub act_static: Option<String>,
    /// SpinQuant options (`--spin-loss`, `--spin-iters`, ...).
    #[command(flatten)]
    pub spin: crate::spin_args::SpinArgs,
    /// Seed of the rotations (QuaRot signs, SpinQuant sampling) and calibration windows.
    #[arg(long, default_value_t = 0)]
    pub rotate_seed: u64,
}

/// Run the command.
pub fn run(args: Args) -> Result<()> {
    if let Some(t) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()?;
    }
    let raw = std::fs::read(&args.text)
        .with_context(|| format!("reading the text file {}", args.text.display()))?;
    let text = String::from_utf8(raw)
        .with_context(|| format!("{} is not valid UTF-8", args.text.display()))?
        .replace("\r\n", "\n");
    let t0 = Instant::now();
    let (mut model, tok) = lowbit_model::load::load(&args.model, true).with_context(|| {
        format!(
            "loading model `{}` (a .gguf file, an HF folder, or a cached repo id)",
            args.model
        )
    })?;
    let tok = tok.context("the model has no tokenizer")?;
    let rot_report = rotate_in_memory(&args, &mut model, &tok)?;
    crate::model_opts::apply(&mut model, args.head.as_deref(), args.act8)?;
    let reference = match &args.reference {
        Some(r) => Some(
            lowbit_model::load::load(r, false)
                .with_context(|| format!("loading reference model `{r}`"))?
                .0,
        ),
        None => None,
    };
    let load_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let tokens = tok.encode(&text).context("tokenizing the text")?;
    let tok_s = t1.elapsed().as_secs_f64();
    if tokens.len() < args.ctx {
        bail!(
            "the text has {} tokens, fewer than one window of --ctx {}; use a smaller --ctx",
            tokens.len(),
            args.ctx
        );
    }
    let full = tokens.len() / args.ctx;
    let n_win = args.windows.map_or(full, |n| n.min(full));
    let pb = ProgressBar::new(n_win as u64);
    pb.set_style(ProgressStyle::with_template(
        "eval [{bar:30}] {pos}/{len} windows {elapsed}<{eta} {msg}",
    )?);
    let opts = EvalOptions {
        ctx: args.ctx,
        max_windows: args.windows,
        kv_policy: args.kv.clone(),
    };
    let t2 = Instant::now();
    let rep = evaluate(
        &model,
        reference.as_ref(),
        &tokens,
        &opts,
        &mut |done, _| pb.set_position(done as u64),
    )?;
    pb.finish_and_clear();
    let eval_s = t2.elapsed().as_secs_f64();

    println!(
        "model {}  text {} ({} tokens, {} windows of {}, {} tail tokens not in a full window)",
        args.model,
        args.text.display(),
        tokens.len(),
        full,
        args.ctx,
        tokens.len() - full * args.ctx
    );
    println!(
        "PPL {:.4}  mean NLL {:.5}  over {} predicted tokens in {} windows  (kv {})",
        rep.ppl, rep.mean_nll, rep.tokens, rep.windows, args.kv
    );
    if let Some(r) = &rep.reference {
        println!(
            "reference PPL {:.4}  KL(ref||model) {:.5}  top-1 {:.4}  NLL increase p50 {:.4} p90 {:.4} \
             p99 {:.4} max {:.4}  worst window {} PPL +{:.3}",
            r.ref_ppl,
            r.kl,
            r.top1,
            r.nll_p50,
            r.nll_p90,
            r.nll_p99,
            r.nll_max,
            r.worst_window,
            r.worst_window_ppl_delta
        );
    }
    println!("time: load {load_s:.1} s, tokenize {tok_s:.1} s, eval {eval_s:.1} s");
    if args.json {
        let mut o = json!({
            "model": args.model, "text": args.text, "ctx": args.ctx, "kv": args.kv,
            "ppl": rep.ppl, "mean_nll": rep.mean_nll, "tokens": rep.tokens, "windows": rep.windows,
            "text_tokens": tokens.len(), "tail_tokens": rep.tail_tokens, "bos": false,
            "eval_seconds": eval_s, "act8": args.act8,
        });
        if let Some((r, m)) = &rot_report {
            let m2 = o.as_object_mut().expect("object");
            m2.insert("rotate".into(), json!(args.rotate));
            m2.insert("wa_scheme".into(), json!(args.wa_scheme));
            m2.insert("weight_method".into(), json!(args.weight_method));
            m2.insert("act_clip".into(), json!(args.act_clip));
            m2.insert("act_static".into(), json!(args.act_static));
            m2.insert("act_static_seconds".into(), json!(r.act_static_seconds));
            m2.insert("weight_clip".into(), json!(args.weight_clip));
            m2.insert("rotate_seconds".into(), json!(r.rotate_seconds));
            m2.insert("quantize_seconds".into(), json!(r.quantize_seconds));
            m2.insert("calib_windows".into(), json!(m));
            if let Some(e) = &r.spin_e2e {
                m2.insert(
                    "spin_e2e".into(),
                    json!({"losses": e.losses, "sequences": e.sequences,
                           "seconds": e.seconds, "teacher_seconds": e.teacher_seconds,
                           "seqlen": args.spin.spin_seqlen, "batch": args.spin.spin_batch,
                           "iters": e.losses.len(), "lr": args.spin.options()?.lr}),
                );
            }
            if let Some(s) = &r.spin_selection {
                m2.insert(
                    "spin_selection".into(),
                    json!({"windows": s.windows, "seconds": s.seconds,
                           "chosen": s.candidates[s.chosen].name,
                           "candidates": s.candidates.iter().map(|c| json!({
                               "name": c.name, "kl": c.kl, "nll": c.nll})).collect::<Vec<_>>()}),
                );
            }
            for (k, sr) in [("spin_r1", &r.spin_r1), ("spin_r2", &r.spin_r2)] {
                if let Some(sr) = sr {
                    m2.insert(
                        k.into(),
                        json!({"loss_start": sr.loss_start, "loss_end": sr.loss_end,
                               "iters": sr.iters, "seconds": sr.seconds,
                               "orthogonality_error": sr.orthogonality_error}),
                    );
                }
            }
        }
        if let Some(r) = &rep.reference {
            let m = o.as_object_mut().expect("object");
            m.insert("reference".into(), json!(args.reference));
            m.insert("ref_ppl".into(), json!(r.ref_ppl));
            m.insert("kl".into(), json!(r.kl));
            m.insert("top1".into(), json!(r.top1));
            m.insert("nll_p50".into(), json!(r.nll_p50));
            m.insert("nll_p90".into(), json!(r.nll_p90));
            m.insert("nll_p99".into(), json!(r.nll_p99));
            m.insert("nll_max".into(), json!(r.nll_max));
            m.insert(
                "worst_window_ppl_delta".into(),
                json!(r.worst_window_ppl_delta),
            );
            m.insert("worst_window".into(), json!(r.worst_window));
        }
        println!("{o}");
    }
    Ok(())
}

/// `--rotate` / `--wa-scheme`: rotate and quantize `model` in memory (docs/rotations.md).
/// Returns the report and the number of calibration windows, or `None` when nothing was asked.
fn rotate_in_memory(
    args: &Args,
    model: &mut lowbit_model::Model,
    tok: &lowbit_model::tokenizer::Tokenizer,
) -> Result<Option<(lowbit_model::rotate::RotateReport, usize)>> {
    use lowbit_model::rotate::{
        parse_wa_scheme, parse_weight_clip, prepare, PrepareOptions, RotateMethod, WeightMethod,
    };
    let rotate = RotateMethod::parse(&args.rotate)?;
    let scheme = parse_wa_scheme(&args.wa_scheme, args.act_clip)?;
    let weight_method = WeightMethod::parse(&args.weight_method)?;
    if rotate == RotateMethod::None && scheme.quant.is_none() {
        return Ok(None);
    }
    let act_static = args
        .act_static
        .as_deref()
        .map(lowbit_calibration::actquant::StaticCalib::parse)
        .transpose()?;
    if act_static.is_some() && scheme.quant.is_none() {
        bail!("--act-static needs a quantized --wa-scheme (w4a4-int, w4a8-int, w8a8-int8)");
    }
    let needs_calib = rotate == RotateMethod::Spinquant
        || act_static.is_some()
        || (weight_method == WeightMethod::Gptq && scheme.quant.is_some());
    let samples = if needs_calib {
        if args.calib.is_empty() {
            bail!("--rotate spinquant, --act-static and --weight-method gptq need --calib FILE (calibration text, never the evaluation text)");
        }
        let files = lowbit_model::quantize::read_calibration_files(&args.calib, Some(&args.text))?;
        let mut toks = Vec::new();
        for (text, _) in &files {
            toks.extend(
                tok.encode(text)
                    .context("tokenizing the calibration text")?,
            );
        }
        let held_out = if rotate == RotateMethod::Spinquant {
            args.spin.spin_select
        } else {
            0
        };
        let cfg = lowbit_model::quantize::CalibConfig {
            samples: args.calib_samples + held_out,
            seqlen: args.calib_seqlen,
            seed: args.rotate_seed,
        };
        lowbit_model::quantize::sample_windows(&toks, &cfg)?
    } else {
        Vec::new()
    };
    let opts = PrepareOptions {
        rotate,
        scheme,
        weight_method,
        weight_clipping: parse_weight_clip(&args.weight_clip)?,
        spin: args.spin.options()?,
        seed: args.rotate_seed,
        act_static,
    };
    let t = Instant::now();
    let rep = prepare(model, &opts, &samples, &mut |m| {
        eprintln!("[{:6.1} s] {m}", t.elapsed().as_secs_f64())
    })?;
    for (k, sr) in [("R1", &rep.spin_r1), ("R2", &rep.spin_r2)] {
        if let Some(sr) = sr {
            eprintln!(
                "SpinQuant {k}: proxy loss {:.5} -> {:.5} in {} iterations, {:.1} s",
                sr.loss_start, sr.loss_end, sr.iters, sr.seconds
            );
        }
    }
    if let Some(e) = &rep.spin_e2e {
        eprintln!(
            "SpinQuant e2e: batch KL {:.5} -> {:.5} in {} iterations on {} sequences, {:.1} s \
             (teacher {:.1} s); per iteration: {:?}",
            e.losses.first().copied().unwrap_or(f64::NAN),
            e.losses.last().copied().unwrap_or(f64::NAN),
            e.losses.len(),
            e.sequences,
            e.seconds,
            e.teacher_seconds,
            e.losses
        );
    }
    if let Some(s) = &rep.spin_selection {
        for (i, c) in s.candidates.iter().enumerate() {
            eprintln!(
                "SpinQuant selection on {} held-out calibration windows: {} KL {:.5} NLL {:.5}{}",
                s.windows,
                c.name,
                c.kl,
                c.nll,
                if i == s.chosen { "  (kept)" } else { "" }
            );
        }
    }
    eprintln!(
        "rotate {} + {} ({}): rotation {:.1} s, weights {:.1} s",
        args.rotate, args.wa_scheme, args.weight_method, rep.rotate_seconds, rep.quantize_seconds
    );
    if let Some(sc) = &rep.act_static_scales {
        let flat: Vec<f32> = sc.iter().flatten().copied().collect();
        let (lo, hi) = flat
            .iter()
            .fold((f32::INFINITY, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
        eprintln!(
            "static activation scales ({}): {} linears, scale range {lo:.3e} .. {hi:.3e}, {:.1} s",
            args.act_static.as_deref().unwrap_or(""),
            flat.len(),
            rep.act_static_seconds
        );
    }
    Ok(Some((rep, samples.len())))
}
