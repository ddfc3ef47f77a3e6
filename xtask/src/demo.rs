//! `cargo xtask demo`: lowbit's main job on the default model. Quantize SmolLM2-135M-Instruct with
//! GPTQ INT4 g128 (and plain RTN at the same format, for comparison), write the checkpoint, and
//! print PPL, KL and top-1 agreement against the unquantized model on wikitext-2.

use crate::quantize::{peak_rss_mib, quantize_to_folder, Args as QArgs};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lowbit_model::eval::{evaluate, EvalOptions};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `cargo xtask demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Calibration windows of --seqlen tokens (the full-quality run uses 128; the demo default
    /// keeps the whole demo to a few minutes on 2 cores).
    #[arg(long, default_value_t = 32)]
    pub samples: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 512)]
    pub seqlen: usize,
    /// Evaluation windows of 512 tokens of wikitext-2 (the reference figures use 40).
    #[arg(long, default_value_t = 10)]
    pub windows: usize,
    /// Where the quantized checkpoints go.
    #[arg(long, default_value = "target/lowbit-demo")]
    pub out: PathBuf,
    /// The model (default: SmolLM2-135M-Instruct from $LOWBIT_SHARED/models).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Skip the RTN comparison row.
    #[arg(long)]
    pub no_rtn: bool,
    /// Emit machine-readable JSON (one object on the last stdout line).
    #[arg(long)]
    pub json: bool,
}

fn default_model() -> Result<PathBuf> {
    if let Ok(shared) = crate::shared::shared_dir() {
        let p = shared.join("models/smollm2-135m-instruct-q4_1.gguf");
        if p.is_file() {
            return Ok(p);
        }
    }
    // A user's machine: the Hugging Face cache (`cargo xtask fetch HuggingFaceTB/SmolLM2-135M-Instruct`).
    let home = std::env::var_os("HF_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface")));
    if let Some(h) = home {
        let snaps = h.join("hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots");
        if let Ok(rd) = std::fs::read_dir(&snaps) {
            for e in rd.flatten() {
                if e.path().join("config.json").is_file() {
                    return Ok(e.path());
                }
            }
        }
    }
    bail!(
        "the default model was not found: set LOWBIT_SHARED=/path/to/shared (with \
         models/smollm2-135m-instruct-q4_1.gguf), or run `cargo xtask fetch \
         HuggingFaceTB/SmolLM2-135M-Instruct`, or pass --model"
    )
}

/// Run the command.
pub fn run(args: Args) -> Result<()> {
    let t0 = Instant::now();
    let model = match &args.model {
        Some(m) => m.clone(),
        None => default_model()?,
    };
    let shared = crate::shared::shared_dir()
        .context("the demo needs the calibration and evaluation texts of the shared folder")?;
    let eval_text = shared.join("data/eval/wikitext-2-raw-test.txt");
    let calib: Vec<PathBuf> = [
        "en_sherlock_holmes.txt",
        "en_pride_and_prejudice.txt",
        "en_tinyshakespeare.txt",
    ]
    .iter()
    .map(|f| shared.join("data/calib").join(f))
    .collect();
    for f in calib.iter().chain(std::iter::once(&eval_text)) {
        if !f.is_file() {
            bail!("{} is missing from the shared folder", f.display());
        }
    }
    let mut runs = vec![("gptq", "int4-g128-sym")];
    if !args.no_rtn {
        runs.insert(0, ("rtn", "int4-g128-sym"));
    }
    let mut quantized = Vec::new();
    for (method, scheme) in &runs {
        let qa = QArgs {
            model: model.clone(),
            method: method.to_string(),
            scheme: scheme.to_string(),
            calib: if *method == "rtn" {
                Vec::new()
            } else {
                calib.clone()
            },
            out: args.out.join(format!("smollm2-135m-{method}-{scheme}")),
            samples: args.samples,
            seqlen: args.seqlen,
            seed: 0,
            config: None,
            eval: Some(eval_text.clone()),
            act_order: "static".into(),
            damp: 0.01,
            clip: "absmax".into(),
            alpha: 0.8,
            layer_sequential: false,
            json: false,
            in_memory: true,
            rot: Default::default(),
        };
        eprintln!("quantizing with {method} {scheme} ...");
        let out = quantize_to_folder(&qa, false)?;
        quantized.push((method.to_string(), scheme.to_string(), out));
    }
    // Evaluate against the unquantized model.
    let src = crate::quantize::load_source(&model)?;
    let text = std::fs::read_to_string(&eval_text)?.replace("\r\n", "\n");
    let tokens = src.tokenizer.encode(&text)?;
    let opts = EvalOptions {
        ctx: 512,
        max_windows: Some(args.windows),
        kv_policy: "f32".into(),
    };
    let mut rows = Vec::new();
    let mut ref_ppl = f64::NAN;
    for (method, scheme, out) in &quantized {
        let pb = ProgressBar::new(args.windows as u64);
        pb.set_style(
            ProgressStyle::with_template("eval {prefix} {bar:30} {pos}/{len} windows")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb.set_prefix(method.clone());
        let r = evaluate(&out.model, Some(&src.model), &tokens, &opts, &mut |d, _| {
            pb.set_position(d as u64)
        })?;
        pb.finish_and_clear();
        let m = r.reference.clone().context("reference metrics")?;
        ref_ppl = m.ref_ppl;
        rows.push(json!({
            "method": method, "scheme": scheme, "ppl": r.ppl, "kl": m.kl, "top1": m.top1,
            "quantize_secs": out.summary["timings"]["quantize_secs"],
            "mean_rel_error": out.summary["mean_rel_error"],
            "out": out.summary["out"],
        }));
    }
    let total = t0.elapsed().as_secs_f64();
    println!(
        "SmolLM2-135M-Instruct, wikitext-2 test, {} windows of 512 tokens ({} predicted tokens)",
        args.windows,
        args.windows * 511
    );
    println!("calibration: {} x {} tokens of English prose (Sherlock Holmes, Pride and Prejudice, tiny-shakespeare)", args.samples, args.seqlen);
    println!(
        "{:<28} {:>8} {:>10} {:>8} {:>12}",
        "weights", "PPL", "KL", "top-1", "quantize s"
    );
    println!(
        "{:<28} {:>8.3} {:>10} {:>8} {:>12}",
        "unquantized (f32 reference)", ref_ppl, "-", "-", "-"
    );
    for r in &rows {
        println!(
            "{:<28} {:>8.3} {:>10.5} {:>7.2}% {:>12.1}",
            format!(
                "{} {}",
                r["method"].as_str().unwrap_or(""),
                r["scheme"].as_str().unwrap_or("")
            ),
            r["ppl"].as_f64().unwrap_or(f64::NAN),
            r["kl"].as_f64().unwrap_or(f64::NAN),
            100.0 * r["top1"].as_f64().unwrap_or(f64::NAN),
            r["quantize_secs"].as_f64().unwrap_or(f64::NAN),
        );
    }
    println!(
        "total {:.0} s, peak RSS {:.0} MiB; checkpoints under {}",
        total,
        peak_rss_mib().unwrap_or(f64::NAN),
        args.out.display()
    );
    if args.json {
        let s = json!({
            "command": "demo", "model": model, "eval_windows": args.windows, "ctx": 512,
            "calib_samples": args.samples, "seqlen": args.seqlen, "reference_ppl": ref_ppl,
            "rows": rows, "total_secs": total, "peak_rss_mib": peak_rss_mib(),
        });
        println!("{}", serde_json::to_string(&s)?);
    }
    Ok(())
}
