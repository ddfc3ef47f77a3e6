//! HQQ, half-quadratic quantization (Badri & Shaji, 2023): calibration-free optimisation of
//! each group's scale and zero point against a sparsity-promoting `lp` (`p < 1`) norm of the
//! weight reconstruction error.
//!
//! Per scale block with values `w`, starting from the min/max parameters `(s, z)`, iterate
//! (half-quadratic splitting with an auxiliary error variable `e`):
//! 1. `q = clamp(round(w / s + z), 0, 2^b − 1)`;
//! 2. `e = shrink_p(w − s (q − z), β)` with the generalised soft threshold
//!    `shrink_p(x, β) = sign(x) · max(|x| − |x|^(p−1) / β, 0)`;
//! 3. `z = mean(q − (w − e) / s)` (closed form), and, with `optimize_scale`, the least-squares
//!    scale `s = Σ (w − e)(q − z) / Σ (q − z)²`;
//! 4. `β ← κ β`; stop early when the mean absolute reconstruction error stops improving.
//!
//! lowbit stores integer zero points (the compressed-tensors layout), so `z` is optimised as a
//! real number and rounded at the end, followed by one least-squares refit of the scale for the
//! rounded zero point; the min/max start is kept if it is better on the same criterion.
//! Symmetric schemes have no zero point: only the scale is optimised.

use crate::error::{check_finite, check_len, Error, Result};
use crate::grid::{BlockParams, Clipping, Grid};
use lowbit_numerics::{ElemFormat, QuantizedTensor, ScaleDtype, Scheme};
use rayon::prelude::*;

/// Options of HQQ (defaults from the HQQ reference implementation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HqqConfig {
    /// Iterations (default 20).
    pub iters: usize,
    /// The `p` of the `lp` error norm, `0 < p <= 1` (default 0.7).
    pub lp_norm: f32,
    /// Initial half-quadratic penalty `β` (default 10).
    pub beta: f32,
    /// Penalty growth per iteration `κ` (default 1.01).
    pub kappa: f32,
    /// Stop when the error stops improving (default true).
    pub early_stop: bool,
    /// Also update the scale by least squares (default true); HQQ's reference updates only
    /// the zero point.
    pub optimize_scale: bool,
}

impl Default for HqqConfig {
    fn default() -> Self {
        HqqConfig {
            iters: 20,
            lp_norm: 0.7,
            beta: 10.0,
            kappa: 1.01,
            early_stop: true,
            optimize_scale: true,
        }
    }
}

/// Result of [`hqq`].
#[derive(Debug, Clone)]
pub struct HqqResult {
    /// The quantized weight.
    pub tensor: QuantizedTensor,
    /// The same, dequantized (`[out][in]`).
    pub dequantized: Vec<f32>,
}

#[inline]
fn shrink_lp(x: f32, beta: f32, p: f32) -> f32 {
    let a = x.abs();
    if a == 0.0 {
        return 0.0;
    }
    let t = a - a.powf(p - 1.0) / beta;
    if t > 0.0 {
        t.copysign(x)
    } else {
        0.0
    }
}

fn round_scale(s: f32, dt: ScaleDtype) -> f32 {
    match dt {
        ScaleDtype::F16 => half::f16::from_f32(s).to_f32(),
        ScaleDtype::Bf16 => half::bf16::from_f32(s).to_f32(),
        _ => s,
    }
}

/// Integer code range `(lo, hi)` and whether the scheme has a zero point.
fn code_range(scheme: &Scheme) -> Result<(f32, f32, bool)> {
    let bits = match scheme.elem {
        ElemFormat::Int { bits } => bits,
        e => {
            return Err(Error::Unsupported(format!(
                "HQQ needs an integer format, got {e:?}"
            )))
        }
    };
    if !matches!(
        scheme.scale_dtype,
        ScaleDtype::F32 | ScaleDtype::F16 | ScaleDtype::Bf16
    ) {
        return Err(Error::Unsupported(format!(
            "HQQ needs f32/f16/bf16 scales, got {:?}",
            scheme.scale_dtype
        )));
    }
    if scheme.asymmetric {
        Ok((0.0, ((1u32 << bits) - 1) as f32, true))
    } else {
        let h = (1u32 << (bits - 1)) as f32;
        Ok((-h, h - 1.0, false))
    }
}

/// Mean absolute reconstruction error of `w` with real `(s, z)`.
fn l1_err(w: &[f32], s: f32, z: f32, lo: f32, hi: f32) -> f64 {
    w.iter()
        .map(|&x| {
            let q = (x / s + z).round_ties_even().clamp(lo, hi);
            (x - s * (q - z)).abs() as f64
        })
        .sum::<f64>()
        / w.len().max(1) as f64
}

/// Optimise the parameters of one block, starting from `init`.
fn optimize_block(
    w: &[f32],
    init: BlockParams,
    scheme: &Scheme,
    lo: f32,
    hi: f32,
    asym: bool,
    cfg: &HqqConfig,
) -> BlockParams {
    let dt = scheme.scale_dtype;
    let z0 = init.zero_point.map_or(0.0, |z| z as f32);
    if !(init.scale > 0.0 && init.scale.is_finite()) {
        return init;
    }
    let init_err = l1_err(w, init.scale, z0, lo, hi);
    let (mut s, mut z) = (init.scale, z0);
    let (mut best_s, mut best_z, mut best_err) = (s, z, init_err);
    let mut beta = cfg.beta;
    let n = w.len() as f32;
    let mut q = vec![0f32; w.len()];
    let mut e = vec![0f32; w.len()];
    for _ in 0..cfg.iters {
        for ((qi, ei), &x) in q.iter_mut().zip(e.iter_mut()).zip(w) {
            *qi = (x / s + z).round_ties_even().clamp(lo, hi);
            *ei = shrink_lp(x - s * (*qi - z), beta, cfg.lp_norm);
        }
        if asym {
            z = q
                .iter()
                .zip(&e)
                .zip(w)
                .map(|((&qi, &ei), &x)| qi - (x - ei) / s)
                .sum::<f32>()
                / n;
        }
        if cfg.optimize_scale {
            let (num, den) =
                q.iter()
                    .zip(&e)
                    .zip(w)
                    .fold((0f64, 0f64), |(a, b), ((&qi, &ei), &x)| {
                        let t = (qi - z) as f64;
                        (a + (x - ei) as f64 * t, b + t * t)
                    });
            let ns = (num / den) as f32;
            if den > 0.0 && ns.is_finite() && ns > 0.0 {
                s = ns;
            }
        }
        beta *= cfg.kappa;
        let err = l1_err(w, s, z, lo, hi);
        if err < best_err {
            (best_s, best_z, best_err) = (s, z, err);
        } else if cfg.early_stop {
            break;
        }
    }
    // Integer zero point, then a least-squares scale refit for it.
    let zi = if asym {
        best_z.round_ties_even().clamp(lo, hi)
    } else {
        0.0
    };
    let mut si = round_scale(best_s, dt);
    let (num, den) = w.iter().fold((0f64, 0f64), |(a, b), &x| {
        let t = ((x / si + zi).round_ties_even().clamp(lo, hi) - zi) as f64;
        (a + x as f64 * t, b + t * t)
    });
    let refit = round_scale((num / den) as f32, dt);
    if den > 0.0
        && refit.is_finite()
        && refit > 0.0
        && l1_err(w, refit, zi, lo, hi) < l1_err(w, si, zi, lo, hi)
    {
        si = refit;
    }
    if !(si > 0.0 && si.is_finite()) || l1_err(w, si, zi, lo, hi) >= init_err {
        return init;
    }
    BlockParams {
        scale: si,
        zero_point: if asym { Some(zi as u8) } else { None },
    }
}

/// HQQ of a `rows x cols` weight (`[out][in]`) for an integer scheme whose scale blocks lie in
/// one row (per-group or per-channel).
pub fn hqq(
    w: &[f32],
    rows: usize,
    cols: usize,
    scheme: &Scheme,
    cfg: &HqqConfig,
) -> Result<HqqResult> {
    check_len(w, rows, cols, "weight")?;
    check_finite(w, "weight")?;
    let (lo, hi, asym) = code_range(scheme)?;
    if !(cfg.lp_norm > 0.0 && cfg.lp_norm <= 1.0 && cfg.beta > 0.0 && cfg.kappa >= 1.0) {
        return Err(Error::Invalid(format!(
            "HQQ needs 0 < p <= 1, beta > 0, kappa >= 1 (got {}, {}, {})",
            cfg.lp_norm, cfg.beta, cfg.kappa
        )));
    }
    let grid = Grid::new(scheme, w, rows, cols, Clipping::AbsMax)?;
    if !grid.blocks_are_row_local() {
        return Err(Error::Unsupported(format!(
            "HQQ needs per-group or per-channel scales, got {:?}",
            scheme.granularity
        )));
    }
    let init = grid.fit_all(w)?;
    let bc = grid.block_cols;
    let gc = grid.grid_cols;
    let params: Vec<BlockParams> = (0..rows * gc)
        .into_par_iter()
        .map(|b| {
            let (r, j) = (b / gc, b % gc);
            let c0 = j * bc;
            let c1 = (c0 + bc).min(cols);
            optimize_block(
                &w[r * cols + c0..r * cols + c1],
                init[b],
                scheme,
                lo,
                hi,
                asym,
                cfg,
            )
        })
        .collect();
    let tensor = grid.finish(w, &params, None)?;
    let dequantized = tensor.dequantize()?;
    Ok(HqqResult {
        tensor,
        dequantized,
    })
}
