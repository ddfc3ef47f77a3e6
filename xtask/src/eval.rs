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
    /// KV-cache policy of the evaluated model (`f32`, `fp8`, ...; see docs/kv-cache.md).
    #[arg(long, default_value = "f32")]
    pub kv: String,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON object on the last stdout line.
    #[arg(long)]
    pub json: bool,
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
    let (model, tok) = lowbit_model::load::load(&args.model, true).with_context(|| {
        format!(
            "loading model `{}` (a .gguf file, an HF folder, or a cached repo id)",
            args.model
        )
    })?;
    let tok = tok.context("the model has no tokenizer")?;
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
            "eval_seconds": eval_s,
        });
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
