//! Perplexity and distribution-shift metrics over non-overlapping windows.
//!
//! # Protocol (the one behind every reference figure in `shared/models/README.md`)
//! The text is tokenized in one piece, **without a BOS token**; the token stream is cut into
//! non-overlapping windows of `ctx` tokens; each window runs on its own with a fresh KV cache and
//! predicts its last `ctx - 1` tokens (token `i + 1` from the logits at `i`). PPL is
//! `exp(mean NLL)` over all predicted tokens of the windows evaluated. A final partial window
//! (fewer than `ctx` tokens) is not scored; [`EvalReport::tail_tokens`] reports its size.
//!
//! With a reference model, every window also runs through the reference, and per token:
//! `KL(ref || model) = sum_v p_ref(v) (log p_ref(v) - log p_model(v))`, top-1 agreement of the
//! two argmaxes, and the NLL increase `nll_model - nll_ref`, summarised by its percentiles, plus
//! the largest per-window PPL increase.

use crate::llama::{Logits, Model};
use crate::{Error, Result};
use rayon::prelude::*;

/// log-softmax of one row of logits, in f64.
pub fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + row.iter().map(|v| (*v as f64 - m).exp()).sum::<f64>().ln();
    row.iter().map(|v| *v as f64 - lse).collect()
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best
}

/// Negative log-likelihood of `targets[i]` under the logits row `i` (`[n][vocab]`).
pub fn token_nlls(logits: &[f32], vocab: usize, targets: &[u32]) -> Vec<f64> {
    logits
        .par_chunks_exact(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + row.iter().map(|v| (*v as f64 - m).exp()).sum::<f64>().ln();
            lse - row[t as usize] as f64
        })
        .collect()
}

/// Per-token comparison of a model's logits with a reference's on one window.
#[derive(Debug, Clone, Default)]
pub struct TokenComparison {
    /// KL(ref || model) per token.
    pub kl: Vec<f64>,
    /// Whether the argmaxes agree, per token.
    pub top1: Vec<bool>,
}

/// Compare `[n][vocab]` logits of a model with a reference's.
pub fn compare_logits(model: &[f32], reference: &[f32], vocab: usize) -> TokenComparison {
    let (kl, top1): (Vec<f64>, Vec<bool>) = model
        .par_chunks_exact(vocab)
        .zip(reference.par_chunks_exact(vocab))
        .map(|(m, r)| {
            let (lm, lr) = (log_softmax(m), log_softmax(r));
            let kl: f64 = lr.iter().zip(&lm).map(|(r, m)| r.exp() * (r - m)).sum();
            (kl.max(0.0), argmax(m) == argmax(r))
        })
        .unzip();
    TokenComparison { kl, top1 }
}

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Window length in tokens.
    pub ctx: usize,
    /// Evaluate only the first `n` windows (`None`: all full windows).
    pub max_windows: Option<usize>,
    /// KV-cache policy of the evaluated model (`f32`, ...); the reference always uses `f32`.
    pub kv_policy: String,
}

/// Metrics against the reference model.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceMetrics {
    /// Reference perplexity on the same windows.
    pub ref_ppl: f64,
    /// Mean KL(ref || model) per predicted token (nats).
    pub kl: f64,
    /// Fraction of tokens whose argmax agrees.
    pub top1: f64,
    /// Median per-token NLL increase (model - reference).
    pub nll_p50: f64,
    /// 90th percentile of the NLL increase.
    pub nll_p90: f64,
    /// 99th percentile of the NLL increase.
    pub nll_p99: f64,
    /// Maximum NLL increase.
    pub nll_max: f64,
    /// Largest per-window PPL increase (model PPL - reference PPL).
    pub worst_window_ppl_delta: f64,
    /// Index of that window.
    pub worst_window: usize,
}

/// The outcome of [`evaluate`].
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    /// exp(mean NLL).
    pub ppl: f64,
    /// Mean NLL per predicted token (nats).
    pub mean_nll: f64,
    /// Predicted tokens.
    pub tokens: usize,
    /// Windows evaluated.
    pub windows: usize,
    /// Tokens of the final partial window, which is not scored.
    pub tail_tokens: usize,
    /// Metrics against the reference model, if one was given.
    pub reference: Option<ReferenceMetrics>,
}

/// Percentile by nearest rank on a sorted slice (`q` in [0, 1]).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Evaluate `model` (and optionally `reference`) on `tokens` by the protocol in the module docs.
/// `progress(done, total)` is called after each window.
pub fn evaluate(
    model: &Model,
    reference: Option<&Model>,
    tokens: &[u32],
    opts: &EvalOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalReport> {
    if opts.ctx < 2 {
        return Err(Error::Shape(format!(
            "ctx {} is too small (need >= 2)",
            opts.ctx
        )));
    }
    let vocab = model.config.vocab_size;
    if let Some(r) = reference {
        if r.config.vocab_size != vocab {
            return Err(Error::Shape(format!(
                "reference vocabulary {} differs from the model's {vocab}",
                r.config.vocab_size
            )));
        }
    }
    let full = tokens.len() / opts.ctx;
    let n_win = opts.max_windows.map_or(full, |n| n.min(full));
    if n_win == 0 {
        return Err(Error::Shape(format!(
            "the text has {} tokens, fewer than one window of {}",
            tokens.len(),
            opts.ctx
        )));
    }
    let mut nll_sum = 0f64;
    let mut count = 0usize;
    let (mut ref_sum, mut kl_sum, mut top1_hits) = (0f64, 0f64, 0usize);
    let mut deltas = Vec::new();
    let (mut worst, mut worst_w) = (f64::NEG_INFINITY, 0);
    for w in 0..n_win {
        let win = &tokens[w * opts.ctx..(w + 1) * opts.ctx];
        let inputs = &win[..opts.ctx - 1];
        let targets = &win[1..];
        let mut cache = model.new_cache(&opts.kv_policy)?;
        let logits = model.forward(inputs, cache.as_mut(), Logits::All)?;
        drop(cache);
        let nll = token_nlls(&logits, vocab, targets);
        let win_nll: f64 = nll.iter().sum();
        nll_sum += win_nll;
        count += nll.len();
        if let Some(r) = reference {
            let mut rc = r.new_cache("f32")?;
            let rl = r.forward(inputs, rc.as_mut(), Logits::All)?;
            let rn = token_nlls(&rl, vocab, targets);
            let cmp = compare_logits(&logits, &rl, vocab);
            let rwin: f64 = rn.iter().sum();
            ref_sum += rwin;
            kl_sum += cmp.kl.iter().sum::<f64>();
            top1_hits += cmp.top1.iter().filter(|b| **b).count();
            deltas.extend(nll.iter().zip(&rn).map(|(a, b)| a - b));
            let n = nll.len() as f64;
            let d = (win_nll / n).exp() - (rwin / n).exp();
            if d > worst {
                worst = d;
                worst_w = w;
            }
        }
        progress(w + 1, n_win);
    }
    let mean_nll = nll_sum / count as f64;
    let reference = reference.map(|_| {
        deltas.sort_by(f64::total_cmp);
        ReferenceMetrics {
            ref_ppl: (ref_sum / count as f64).exp(),
            kl: kl_sum / count as f64,
            top1: top1_hits as f64 / count as f64,
            nll_p50: percentile(&deltas, 0.5),
            nll_p90: percentile(&deltas, 0.9),
            nll_p99: percentile(&deltas, 0.99),
            nll_max: *deltas.last().unwrap_or(&f64::NAN),
            worst_window_ppl_delta: worst,
            worst_window: worst_w,
        }
    });
    Ok(EvalReport {
        ppl: mean_nll.exp(),
        mean_nll,
        tokens: count,
        windows: n_win,
        tail_tokens: tokens.len() - full * opts.ctx,
        reference,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_of_uniform_logits_is_log_vocab() {
        let l = vec![0.5f32; 3 * 8];
        for v in token_nlls(&l, 8, &[0, 3, 7]) {
            assert!((v - 8f64.ln()).abs() < 1e-12);
        }
    }

    #[test]
    fn kl_is_zero_for_identical_and_matches_closed_form() {
        let a = [1.0f32, 2.0, 3.0];
        let c = compare_logits(&a, &a, 3);
        assert!(c.kl[0].abs() < 1e-12 && c.top1[0]);
        // Two-point distributions: p = softmax([0, 0]) = (1/2, 1/2), q = softmax([0, ln 3]) = (1/4, 3/4).
        let p = [0.0f32, 0.0];
        let q = [0.0f32, 3f32.ln()];
        let c = compare_logits(&q, &p, 2);
        let want = 0.5 * (0.5f64 / 0.25).ln() + 0.5 * (0.5f64 / 0.75).ln();
        assert!((c.kl[0] - want).abs() < 1e-6, "{} vs {want}", c.kl[0]);
        assert!(!c.top1[0]);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(|i| i as f64).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
    }
}
