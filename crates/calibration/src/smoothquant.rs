//! SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights so that both
//! can be quantized to 8 bits (W8A8), plus the per-token dynamic activation quantizer that a
//! W8A8 kernel applies, simulated in f32 for evaluation.
//!
//! For linears sharing an input `X`, the migration scale of input channel `j` is
//! `s_j = max|X_j|^α / max|W_:,j|^(1−α)` (the weight maximum taken over every linear of the
//! group); the linears use `W diag(s)` and the producer of `X` is divided by `s`
//! ([`crate::fold`]). The weights are then quantized per output channel (RTN or GPTQ), and at
//! inference every token's activation row is quantized with its own scale
//! ([`fake_quant_activations_per_token`]).

use crate::awq::LinearWeight;
use crate::error::{check_finite, check_len, Error, Result};
use lowbit_numerics::{FloatFormat, Overflow, Rounding};
use rayon::prelude::*;

/// Options of SmoothQuant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SqConfig {
    /// Migration strength `α` in `[0, 1]` (default 0.8, the strength of the llm-compressor
    /// W8A8 reference run on SmolLM2; the paper uses 0.5 for most models and up to 0.85).
    pub alpha: f32,
}

impl Default for SqConfig {
    fn default() -> Self {
        SqConfig { alpha: 0.8 }
    }
}

/// Smallest scale allowed (and the scale of channels whose activation or weight maximum is 0).
const MIN_SCALE: f32 = 1e-5;

/// Migration scales for a group of linears that read the same input, from the per-channel
/// activation maxima `act_absmax` (e.g. [`crate::stats::InputStats::abs_max`]).
///
/// Channels that never activate or have all-zero weights get `s = 1` (nothing to migrate).
pub fn smoothquant_scales(
    linears: &[LinearWeight],
    act_absmax: &[f32],
    cfg: &SqConfig,
) -> Result<Vec<f32>> {
    let cols = act_absmax.len();
    if linears.is_empty() || cols == 0 {
        return Err(Error::Invalid(
            "SmoothQuant needs at least one linear and one channel".into(),
        ));
    }
    if !(0.0..=1.0).contains(&cfg.alpha) {
        return Err(Error::Invalid(format!("alpha {} not in [0, 1]", cfg.alpha)));
    }
    check_finite(act_absmax, "activation maxima")?;
    let mut wmax = vec![0f32; cols];
    for l in linears {
        check_len(l.w, l.rows, cols, "weight")?;
        check_finite(l.w, "weight")?;
        for row in l.w.chunks_exact(cols) {
            for (m, &x) in wmax.iter_mut().zip(row) {
                *m = m.max(x.abs());
            }
        }
    }
    Ok(act_absmax
        .iter()
        .zip(&wmax)
        .map(|(&a, &w)| {
            let a = a.abs();
            if a == 0.0 || w == 0.0 {
                return 1.0;
            }
            let s = a.powf(cfg.alpha) / w.powf(1.0 - cfg.alpha);
            if s.is_finite() {
                s.max(MIN_SCALE)
            } else {
                1.0
            }
        })
        .collect())
}

/// Activation format of a W8A8 scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ActQuant {
    /// Symmetric INT8, `scale = max|x| / 127`, codes in `[-127, 127]`, ties to even.
    Int8,
    /// FP8 E4M3 (OCP "FN"), `scale = max|x| / 448`, round to nearest even, saturating.
    Fp8E4m3,
}

/// Simulate per-token dynamic activation quantization in place: every row of the
/// `[n_tokens][cols]` matrix `x` is quantized with its own scale (its absmax over the format's
/// maximum) and dequantized back. All-zero rows stay zero. NaN/Inf inputs are an error (the
/// row is left untouched).
pub fn fake_quant_activations_per_token(
    x: &mut [f32],
    n_tokens: usize,
    cols: usize,
    kind: ActQuant,
) -> Result<()> {
    check_len(x, n_tokens, cols, "activations")?;
    check_finite(x, "activations")?;
    if cols == 0 {
        return Ok(());
    }
    x.par_chunks_mut(cols).for_each(|row| {
        let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        if amax == 0.0 {
            return;
        }
        match kind {
            ActQuant::Int8 => {
                let scale = amax / 127.0;
                let inv = 1.0 / scale;
                for v in row.iter_mut() {
                    *v = (*v * inv).round_ties_even().clamp(-127.0, 127.0) * scale;
                }
            }
            ActQuant::Fp8E4m3 => {
                let fmt = FloatFormat::E4M3;
                let scale = amax / fmt.max_finite();
                for v in row.iter_mut() {
                    let code = fmt.encode(*v / scale, Rounding::NearestEven, Overflow::Saturate);
                    *v = fmt.decode(code) * scale;
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_per_token_matches_definition() {
        let mut x = vec![1.0f32, -0.5, 0.25, 0.0, 3.0, 2.0, 0.0, 0.0, 0.0];
        let orig = x.clone();
        fake_quant_activations_per_token(&mut x, 3, 3, ActQuant::Int8).unwrap();
        for t in 0..3 {
            let row = &orig[t * 3..t * 3 + 3];
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            for j in 0..3 {
                let want = if amax == 0.0 {
                    0.0
                } else {
                    let s = amax / 127.0;
                    (row[j] / s).round_ties_even() * s
                };
                assert!((x[t * 3 + j] - want).abs() <= 1e-6 * amax.max(1.0));
            }
            // The row maximum is exactly representable.
            if amax > 0.0 {
                assert!(x[t * 3..t * 3 + 3]
                    .iter()
                    .any(|v| (v.abs() - amax).abs() < 1e-6 * amax));
            }
        }
    }

    #[test]
    fn fp8_per_token_is_on_the_e4m3_grid() {
        // Brute-force reference: the nearest of all 256 scaled E4M3 values.
        let n = 200;
        let mut x: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 37.0)
            .collect();
        let orig = x.clone();
        fake_quant_activations_per_token(&mut x, 2, n / 2, ActQuant::Fp8E4m3).unwrap();
        for t in 0..2 {
            let row = &orig[t * n / 2..(t + 1) * n / 2];
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = amax / 448.0;
            let grid: Vec<f32> = (0..=255u8)
                .map(|c| FloatFormat::E4M3.decode(c))
                .filter(|v| v.is_finite())
                .collect();
            for (j, &v) in row.iter().enumerate() {
                let got = x[t * n / 2 + j];
                let best = grid
                    .iter()
                    .map(|g| ((g * s - v).abs(), g * s))
                    .fold((f32::INFINITY, 0.0), |a, b| if b.0 < a.0 { b } else { a });
                assert!(
                    (got - v).abs() <= best.0 * (1.0 + 1e-5) + 1e-9,
                    "{v}: got {got}, best {}",
                    best.1
                );
            }
        }
    }

    #[test]
    fn scales_follow_the_formula() {
        let w = [0.5f32, -2.0, 0.0, 1.0, 0.25, 0.0];
        let lin = [LinearWeight { w: &w, rows: 2 }];
        let act = [4.0f32, 1.0, 3.0];
        let s = smoothquant_scales(&lin, &act, &SqConfig { alpha: 0.5 }).unwrap();
        assert!((s[0] - (4f32.sqrt() / 1f32.sqrt())).abs() < 1e-6);
        assert!((s[1] - (1f32.sqrt() / 2f32.sqrt())).abs() < 1e-6);
        assert_eq!(s[2], 1.0); // all-zero weight column
        assert!(smoothquant_scales(&lin, &act, &SqConfig { alpha: 1.5 }).is_err());
        let mut bad = vec![f32::NAN; 3];
        assert!(fake_quant_activations_per_token(&mut bad, 1, 3, ActQuant::Int8).is_err());
    }
}
