//! `cargo xtask check-logits`: run the model on the golden logits file
//! (`golden/model/*-logits.json`, schema `model_logits/v1`) and compare with the stated tolerance:
//! `|diff| <= 2e-3 + 1e-4 * |logit|` at every stored value, and top-1 agreement wherever the
//! reference's top-1/top-2 gap exceeds 1e-2. The stored `token_ids` are fed to the model, so the
//! logit comparison does not depend on the tokenizer; the tokenizer is checked separately
//! (`token_ids` must be reproduced exactly from `text`, or be its leading window when the case
//! stores one window of a longer text), and a mismatch fails the case.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lowbit_model::llama::Logits;
use serde_json::{json, Value};
use std::path::PathBuf;

/// Arguments of `cargo xtask check-logits`.
#[derive(clap::Args)]
pub struct Args {
    /// The shared data folder (default: LOWBIT_SHARED, else ../shared).
    #[arg(long)]
    pub shared: Option<PathBuf>,
    /// Model file (default: SHARED/models/smollm2-135m-instruct-q4_1.gguf).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Golden logits file (default: SHARED/golden/model/smollm2-135m-logits.json).
    #[arg(long)]
    pub golden: Option<PathBuf>,
    /// Absolute tolerance.
    #[arg(long, default_value_t = 2e-3)]
    pub atol: f32,
    /// Relative tolerance.
    #[arg(long, default_value_t = 1e-4)]
    pub rtol: f32,
    /// One JSON object per case and a summary object on the last line.
    #[arg(long)]
    pub json: bool,
}

fn f32s(v: &Value, key: &str) -> Result<Vec<f32>> {
    v.get(key)
        .and_then(Value::as_array)
        .with_context(|| format!("missing array `{key}`"))?
        .iter()
        .map(|x| {
            x.as_u64()
                .map(|b| f32::from_bits(b as u32))
                .with_context(|| format!("`{key}`: {x}"))
        })
        .collect()
}

fn u32s(v: &Value, key: &str) -> Result<Vec<u32>> {
    v.get(key)
        .and_then(Value::as_array)
        .with_context(|| format!("missing array `{key}`"))?
        .iter()
        .map(|x| {
            x.as_u64()
                .map(|b| b as u32)
                .with_context(|| format!("`{key}`: {x}"))
        })
        .collect()
}

fn rows<T>(
    v: &Value,
    key: &str,
    f: impl Fn(&Value, &str) -> Result<Vec<T>>,
) -> Result<Vec<Vec<T>>> {
    v.get(key)
        .and_then(Value::as_array)
        .with_context(|| format!("missing array `{key}`"))?
        .iter()
        .map(|r| f(&json!({ "r": r }), "r"))
        .collect()
}

/// Result of one case.
struct CaseReport {
    name: String,
    max_abs: f32,
    /// max over values of |diff| / tolerance (<= 1 passes).
    max_ratio: f32,
    compared: usize,
    top1_checked: usize,
    top1_mismatch: usize,
    worst: String,
    /// The tokenizer reproduced `token_ids`.
    tokens_match: bool,
}

/// Run the command.
pub fn run(args: Args) -> Result<()> {
    let shared = match &args.shared {
        Some(p) => p.clone(),
        None => crate::shared::shared_dir()?,
    };
    let model_path = args
        .model
        .clone()
        .unwrap_or_else(|| shared.join("models/smollm2-135m-instruct-q4_1.gguf"));
    let golden_path = args
        .golden
        .clone()
        .unwrap_or_else(|| shared.join("golden/model/smollm2-135m-logits.json"));
    let text = std::fs::read_to_string(&golden_path)
        .with_context(|| format!("reading {}", golden_path.display()))?;
    let g: Value = serde_json::from_str(&text).context("golden file is not JSON")?;
    if g.get("schema").and_then(Value::as_str) != Some("model_logits/v1") {
        bail!("{}: schema is not model_logits/v1", golden_path.display());
    }
    let (model, tok) = lowbit_model::load::load(&model_path.to_string_lossy(), true)
        .with_context(|| format!("loading {}", model_path.display()))?;
    let tok = tok.context("the model has no tokenizer")?;
    let vocab = model.config.vocab_size;
    let cases = g
        .get("cases")
        .and_then(Value::as_array)
        .context("missing `cases`")?;
    let tol = |r: f32| args.atol + args.rtol * r.abs();

    let pb = ProgressBar::new(cases.len() as u64);
    pb.set_style(ProgressStyle::with_template(
        "{msg} [{bar:30}] {pos}/{len} {elapsed}",
    )?);
    pb.set_message("check-logits");
    let mut reports = Vec::new();
    for case in cases {
        let name = case
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        let ids = u32s(case, "token_ids")?;
        // Tokenizer check: the model's tokenizer must reproduce the stored ids exactly.
        let text = case
            .get("text")
            .and_then(Value::as_str)
            .context("missing `text`")?;
        let ours = tok.encode(text)?;
        // A case may store only the first window of a longer text (wikitext_head: 2000
        // characters, 256 ids), so the ids must equal the leading ids of our encoding.
        let tokens_match = ours.len() >= ids.len() && ours[..ids.len()] == ids[..];
        let n = ids.len();
        let mut cache = model.new_cache("f32")?;
        let logits = model.forward(&ids, cache.as_mut(), Logits::All)?;
        let mut r = CaseReport {
            name: name.clone(),
            max_abs: 0.0,
            max_ratio: 0.0,
            compared: 0,
            top1_checked: 0,
            top1_mismatch: 0,
            worst: String::new(),
            tokens_match,
        };
        let mut cmp = |what: &dyn Fn() -> String, ours: f32, reference: f32| {
            let d = (ours - reference).abs();
            let ratio = if d.is_nan() {
                f32::INFINITY
            } else {
                d / tol(reference)
            };
            r.compared += 1;
            r.max_abs = r.max_abs.max(d);
            if ratio > r.max_ratio {
                r.max_ratio = ratio;
                r.worst = format!("{}: ours {ours} reference {reference}", what());
            }
        };
        let row = |p: usize| &logits[p * vocab..(p + 1) * vocab];
        // Full logits at a few positions.
        let positions = u32s(case, "full_logits_positions")?;
        let full = rows(case, "full_logits_f32_bits", f32s)?;
        for (p, vals) in positions.iter().zip(&full) {
            let p = *p as usize;
            if vals.len() != vocab || p >= n {
                bail!(
                    "case {name}: full logits at {p} have {} values (vocab {vocab})",
                    vals.len()
                );
            }
            for (t, (o, rf)) in row(p).iter().zip(vals).enumerate() {
                cmp(&|| format!("pos {p} token {t}"), *o, *rf);
            }
        }
        // Top-10 logits and top-1 agreement at every position.
        let top_ids = rows(case, "top10_ids", u32s)?;
        let top_vals = rows(case, "top10_logits_f32_bits", f32s)?;
        let lse = f32s(case, "logsumexp_f32_bits")?;
        let next = f32s(case, "next_token_logit_f32_bits")?;
        if top_ids.len() != n || lse.len() != n || next.len() + 1 != n {
            bail!("case {name}: per-position arrays do not match {n} tokens");
        }
        for p in 0..n {
            let lr = row(p);
            for (id, v) in top_ids[p].iter().zip(&top_vals[p]) {
                cmp(&|| format!("pos {p} top token {id}"), lr[*id as usize], *v);
            }
            let m = lr.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let s: f64 = lr.iter().map(|v| ((v - m) as f64).exp()).sum();
            cmp(&|| format!("pos {p} logsumexp"), m + s.ln() as f32, lse[p]);
            if p + 1 < n {
                cmp(
                    &|| format!("pos {p} next-token logit"),
                    lr[ids[p + 1] as usize],
                    next[p],
                );
            }
            if top_vals[p].len() >= 2 && top_vals[p][0] - top_vals[p][1] > 1e-2 {
                r.top1_checked += 1;
                let ours = lr
                    .iter()
                    .enumerate()
                    .fold(
                        (0, f32::NEG_INFINITY),
                        |b, (i, v)| if *v > b.1 { (i, *v) } else { b },
                    )
                    .0;
                if ours != top_ids[p][0] as usize {
                    r.top1_mismatch += 1;
                }
            }
        }
        reports.push(r);
        pb.inc(1);
    }
    pb.finish_and_clear();

    let mut passed = 0;
    for r in &reports {
        let ok = r.max_ratio <= 1.0 && r.top1_mismatch == 0 && r.tokens_match;
        passed += ok as usize;
        if args.json {
            println!(
                "{}",
                json!({"case": r.name, "pass": ok, "max_abs_err": r.max_abs,
                       "max_err_over_tol": r.max_ratio, "values_compared": r.compared,
                       "top1_checked": r.top1_checked, "top1_mismatches": r.top1_mismatch,
                       "token_ids_match": r.tokens_match,
                       "worst": r.worst})
            );
        } else {
            println!(
                "{:<24} max |diff| {:.3e}  max diff/tol {:.3}  top-1 {}/{}  token ids {}  {}  (worst: {})",
                r.name,
                r.max_abs,
                r.max_ratio,
                r.top1_checked - r.top1_mismatch,
                r.top1_checked,
                if r.tokens_match { "match" } else { "DIFFER" },
                if ok { "PASS" } else { "FAIL" },
                r.worst
            );
        }
    }
    let failed = reports.len() - passed;
    if args.json {
        println!(
            "{}",
            json!({"passed": passed, "failed": failed, "model": model_path})
        );
    } else {
        println!("{passed} passed, {failed} failed");
    }
    if failed > 0 {
        bail!("{failed} case(s) outside the tolerance");
    }
    Ok(())
}
