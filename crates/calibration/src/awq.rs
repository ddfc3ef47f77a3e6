//! AWQ (Lin et al., 2023): activation-aware per-input-channel scaling, then weight clipping.
//!
//! For a group of linears that read the same input `X` (q/k/v after the attention norm;
//! gate/up after the FFN norm; `down_proj` after `up_proj`; `o_proj` after `v_proj` when there
//! is no GQA), AWQ searches scales `s` (one per input channel) minimising the output error
//! `Σ_linears ||X Wᵀ − X (Q(W diag(s)) diag(s)⁻¹)ᵀ||²` over a grid of exponents `α ∈ [0, 1)`:
//! `s = mean|X|^α` (with duo scaling `mean|X|^α / mean_w^(1−α)`, `mean_w` the per-channel mean
//! of the group-normalised `|W|`), normalised by `sqrt(max(s) min(s))`. The unscaled weights
//! (`s = 1`) are always a candidate, so the chosen scales never do worse than RTN on the
//! calibration objective. Then, per linear and per (row, scale block), a clipping search over
//! shrink ratios `1 − i/clip_grid` of the block's absmax minimises the block's output error.
//!
//! The output error is computed exactly over every calibration token from the Gram matrix `G`
//! (`||X Δᵀ||² = Σ_r Δ_r G Δ_rᵀ`), which is cheaper than replaying the inputs once the number
//! of tokens exceeds the input width, and uses all tokens instead of a subsample.

use crate::error::{check_finite, check_len, Error, Result};
use crate::grid::{BlockParams, Clipping, Grid};
use crate::stats::InputStats;
use lowbit_numerics::{QuantizedTensor, Scheme};
use rayon::prelude::*;

/// Options of AWQ.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AwqConfig {
    /// Number of exponents `α = i / n_grid`, `i = 0..n_grid` (default 20, as AutoAWQ).
    pub n_grid: usize,
    /// Divide by the weight magnitude term (`mean_w^(1−α)`), as AutoAWQ and llm-compressor
    /// do by default (default true).
    pub duo_scaling: bool,
    /// Run the clipping search (default true; the caller chooses which linears via `clip`
    /// masks, AutoAWQ skips q/k because their outputs pass through a softmax).
    pub clip: bool,
    /// Clipping grid: ratios `1 − i/clip_grid` (default 20).
    pub clip_grid: usize,
    /// Largest shrink tried: ratios down to `1 − clip_max_shrink` (default 0.5).
    pub clip_max_shrink: f32,
}

impl Default for AwqConfig {
    fn default() -> Self {
        AwqConfig {
            n_grid: 20,
            duo_scaling: true,
            clip: true,
            clip_grid: 20,
            clip_max_shrink: 0.5,
        }
    }
}

/// One linear layer's weight, `rows x cols` row-major (`[out][in]`).
#[derive(Debug, Clone, Copy)]
pub struct LinearWeight<'a> {
    /// The weight.
    pub w: &'a [f32],
    /// Output features.
    pub rows: usize,
}

/// Result of the scale search for a group of linears.
#[derive(Debug, Clone, PartialEq)]
pub struct AwqScales {
    /// Per-input-channel scales `s`: the linears use `W diag(s)`, the producer of their input
    /// must be divided by `s` (see [`crate::fold`]). All ones when scaling did not help.
    pub scales: Vec<f32>,
    /// The chosen exponent, `None` when the unscaled weights won.
    pub alpha: Option<f32>,
    /// Relative output error `sqrt(Σ ||X Δᵀ||² / Σ ||X Wᵀ||²)` of RTN with the chosen scales.
    pub rel_error: f64,
    /// The same for plain RTN (no scaling).
    pub rel_error_rtn: f64,
}

/// One quantized linear of an AWQ group.
#[derive(Debug, Clone)]
pub struct AwqLinear {
    /// The quantized weight, in the scaled space (`Q(clip(W diag(s)))`).
    pub tensor: QuantizedTensor,
    /// The same, dequantized (`[out][in]`, scaled space).
    pub dequantized: Vec<f32>,
    /// Relative output error of this linear on the calibration inputs (original space).
    pub rel_error: f64,
}

/// Result of [`awq`] for a group of linears sharing one input.
#[derive(Debug, Clone)]
pub struct AwqResult {
    /// The scales to fold (see [`AwqScales::scales`]).
    pub scales: AwqScales,
    /// The quantized linears, in the order given.
    pub linears: Vec<AwqLinear>,
}

/// `Σ_r d_r G d_rᵀ` for a `rows x cols` matrix `d` and a symmetric `cols x cols` `G` (f32).
fn quad_sum(d: &[f32], rows: usize, cols: usize, g: &[f32], scratch: &mut Vec<f32>) -> Result<f64> {
    scratch.clear();
    scratch.resize(rows * cols, 0.0);
    lowbit_kernels::dense::matmul_wt(d, g, scratch, rows, cols, cols)?;
    Ok(d.par_iter()
        .zip(scratch.par_iter())
        .map(|(&a, &b)| a as f64 * b as f64)
        .sum())
}

fn validate(linears: &[LinearWeight], stats: &InputStats) -> Result<usize> {
    let cols = stats.cols();
    if linears.is_empty() {
        return Err(Error::Invalid("AWQ needs at least one linear".into()));
    }
    for l in linears {
        check_len(l.w, l.rows, cols, "weight")?;
        check_finite(l.w, "weight")?;
    }
    if stats.n_samples() == 0 {
        return Err(Error::NoData("AWQ needs calibration inputs".into()));
    }
    Ok(cols)
}

/// Per-channel mean of `|W|` normalised by each scale block's absmax, over all linears
/// (AutoAWQ's `w_mean`).
fn weight_mean(linears: &[LinearWeight], cols: usize, scheme: &Scheme) -> Vec<f32> {
    let mut acc = vec![0f64; cols];
    let mut n = 0usize;
    for l in linears {
        let (_, bc) = scheme.granularity.block_shape(l.rows, cols);
        let bc = bc.clamp(1, cols);
        for row in l.w.chunks_exact(cols) {
            for (blk, a) in row.chunks(bc).zip(acc.chunks_mut(bc)) {
                let m = blk.iter().fold(0f32, |m, x| m.max(x.abs()));
                if m > 0.0 {
                    for (x, s) in blk.iter().zip(a) {
                        *s += (x.abs() / m) as f64;
                    }
                }
            }
        }
        n += l.rows;
    }
    acc.iter().map(|&s| (s / n.max(1) as f64) as f32).collect()
}

/// Search the AWQ scales of a group of linears that share one input.
pub fn awq_search_scales(
    linears: &[LinearWeight],
    stats: &InputStats,
    scheme: &Scheme,
    cfg: &AwqConfig,
) -> Result<AwqScales> {
    let cols = validate(linears, stats)?;
    if cfg.n_grid == 0 {
        return Err(Error::Invalid("n_grid must be positive".into()));
    }
    let g: Vec<f32> = stats.hessian.hessian()?.iter().map(|&v| v as f32).collect();
    let x_mean = stats.abs_mean()?;
    let w_mean = if cfg.duo_scaling {
        Some(weight_mean(linears, cols, scheme))
    } else {
        None
    };
    let mut scratch = Vec::new();
    let mut denom = 0f64;
    for l in linears {
        denom += quad_sum(l.w, l.rows, cols, &g, &mut scratch)?;
    }
    // Output error of RTN after scaling by s (s = None: unscaled).
    let eval = |s: Option<&[f32]>, scratch: &mut Vec<f32>| -> Result<f64> {
        let mut num = 0f64;
        for l in linears {
            let mut ws = l.w.to_vec();
            if let Some(s) = s {
                crate::fold::scale_columns(&mut ws, l.rows, cols, s)?;
            }
            let grid = Grid::new(scheme, &ws, l.rows, cols, Clipping::AbsMax)?;
            let (mut dq, _) = grid.rtn(&ws)?;
            dq.par_chunks_mut(cols)
                .zip(l.w.par_chunks(cols))
                .for_each(|(drow, wrow)| {
                    for (j, (d, &w)) in drow.iter_mut().zip(wrow).enumerate() {
                        let back = match s {
                            Some(s) => *d / s[j],
                            None => *d,
                        };
                        *d = back - w;
                    }
                });
            num += quad_sum(&dq, l.rows, cols, &g, scratch)?;
        }
        Ok(num)
    };
    let rel = |num: f64| {
        if denom > 0.0 {
            (num.max(0.0) / denom).sqrt()
        } else {
            0.0
        }
    };
    let base = eval(None, &mut scratch)?;
    let mut best = (base, None, vec![1f32; cols]);
    for i in 0..cfg.n_grid {
        let alpha = i as f32 / cfg.n_grid as f32;
        let mut s: Vec<f32> = (0..cols)
            .map(|j| {
                let xs = x_mean[j].powf(alpha);
                let v = match &w_mean {
                    Some(wm) => xs / (wm[j].powf(1.0 - alpha) + 1e-4),
                    None => xs,
                };
                v.max(1e-4)
            })
            .collect();
        let mx = s.iter().fold(0f32, |m, &v| m.max(v));
        let mn = s.iter().fold(f32::INFINITY, |m, &v| m.min(v));
        let norm = (mx * mn).sqrt();
        if !(norm.is_finite() && norm > 0.0) {
            continue;
        }
        for v in &mut s {
            *v /= norm;
        }
        if s.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
            continue;
        }
        let e = eval(Some(&s), &mut scratch)?;
        if e < best.0 {
            best = (e, Some(alpha), s);
        }
    }
    Ok(AwqScales {
        scales: best.2,
        alpha: best.1,
        rel_error: rel(best.0),
        rel_error_rtn: rel(base),
    })
}

/// AWQ clipping search on a weight already in the scaled space (`W diag(s)`, `rows x cols`),
/// in place: per row and scale block, the block is clamped to `±r·absmax` (asymmetric
/// schemes: `[r·min, r·max]`) with the ratio `r`
/// that minimises the block's output error on the inputs `X diag(s)⁻¹` (whose Gram matrix is
/// derived from `stats` and `scales`). Only schemes whose scale blocks lie in one row are
/// clipped (2-D block and per-tensor scales are left unchanged: one clamp per row would not
/// match a scale shared by many rows).
pub fn awq_clip(
    w_scaled: &mut [f32],
    rows: usize,
    stats: &InputStats,
    scales: &[f32],
    scheme: &Scheme,
    cfg: &AwqConfig,
) -> Result<()> {
    let cols = stats.cols();
    check_len(w_scaled, rows, cols, "weight")?;
    check_finite(w_scaled, "weight")?;
    if scales.len() != cols {
        return Err(Error::Shape(format!(
            "{} scales for {cols} channels",
            scales.len()
        )));
    }
    let grid = Grid::new(scheme, w_scaled, rows, cols, Clipping::AbsMax)?;
    if !grid.blocks_are_row_local() {
        return Ok(());
    }
    let n_shrink = ((cfg.clip_max_shrink * cfg.clip_grid as f32) as usize).max(1);
    let h = stats.hessian.hessian()?;
    let bc = grid.block_cols;
    // Clamp range of candidate k: ±r·absmax (symmetric), [r·min, r·max] (asymmetric).
    let asym = scheme.asymmetric;
    let bounds = |w: &[f32], k: usize| -> (f32, f32) {
        let r = 1.0 - k as f32 / cfg.clip_grid as f32;
        if asym {
            let lo = w.iter().fold(0f32, |m, &x| m.min(x));
            let hi = w.iter().fold(0f32, |m, &x| m.max(x));
            (r * lo, r * hi)
        } else {
            let m = r * w.iter().fold(0f32, |m, x| m.max(x.abs()));
            (-m, m)
        }
    };
    let mut blk_g = Vec::new();
    let mut cand = Vec::new();
    let mut prod = Vec::new();
    let mut c0 = 0;
    while c0 < cols {
        let c1 = (c0 + bc).min(cols);
        let gw = c1 - c0;
        // Gram block of the scaled inputs: G'_ij = G_ij / (s_i s_j).
        blk_g.clear();
        for i in c0..c1 {
            for j in c0..c1 {
                blk_g.push((h[i * cols + j] / (scales[i] as f64 * scales[j] as f64)) as f32);
            }
        }
        // Candidates: row r, shrink k -> Δ = Q(clamp(w)) − w.
        cand.clear();
        cand.resize(rows * n_shrink * gw, 0f32);
        let fit_err = std::sync::Mutex::new(None);
        cand.par_chunks_mut(n_shrink * gw)
            .enumerate()
            .for_each(|(r, crow)| {
                let w = &w_scaled[r * cols + c0..r * cols + c1];
                let mut clamped = vec![0f32; gw];
                for k in 0..n_shrink {
                    let (lo, hi) = bounds(w, k);
                    for (c, &x) in clamped.iter_mut().zip(w) {
                        *c = x.clamp(lo, hi);
                    }
                    let p: BlockParams = match grid.fit(&clamped) {
                        Ok(p) => p,
                        Err(e) => {
                            *fit_err.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                            return;
                        }
                    };
                    for ((d, &c), &x) in crow[k * gw..(k + 1) * gw].iter_mut().zip(&clamped).zip(w)
                    {
                        *d = grid.quant(c, &p) - x;
                    }
                }
            });
        if let Some(e) = fit_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        prod.clear();
        prod.resize(rows * n_shrink * gw, 0f32);
        lowbit_kernels::dense::matmul_wt(&cand, &blk_g, &mut prod, rows * n_shrink, gw, gw)?;
        w_scaled
            .par_chunks_mut(cols)
            .enumerate()
            .for_each(|(r, wrow)| {
                let mut best = (f64::INFINITY, 0usize);
                for k in 0..n_shrink {
                    let o = (r * n_shrink + k) * gw;
                    let e: f64 = cand[o..o + gw]
                        .iter()
                        .zip(&prod[o..o + gw])
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum();
                    if e < best.0 {
                        best = (e, k);
                    }
                }
                if best.1 > 0 {
                    let w = &mut wrow[c0..c1];
                    let (lo, hi) = bounds(w, best.1);
                    for x in w {
                        *x = x.clamp(lo, hi);
                    }
                }
            });
        c0 = c1;
    }
    Ok(())
}

/// Full AWQ of a group of linears sharing one input: scale search, scaling, clipping search
/// (for the linears with `clip[i] == true` when `cfg.clip`), and RTN of the result.
///
/// The returned tensors are in the scaled space; the caller must fold `1 / scales` into the
/// producer of the shared input (see [`crate::fold`]) for the model to compute the same function.
pub fn awq(
    linears: &[LinearWeight],
    stats: &InputStats,
    scheme: &Scheme,
    clip: &[bool],
    cfg: &AwqConfig,
) -> Result<AwqResult> {
    let cols = validate(linears, stats)?;
    if clip.len() != linears.len() {
        return Err(Error::Shape(format!(
            "{} clip flags for {} linears",
            clip.len(),
            linears.len()
        )));
    }
    let scales = awq_search_scales(linears, stats, scheme, cfg)?;
    let h: Vec<f32> = stats.hessian.hessian()?.iter().map(|&v| v as f32).collect();
    let mut out = Vec::with_capacity(linears.len());
    let mut scratch = Vec::new();
    for (l, &do_clip) in linears.iter().zip(clip) {
        let mut ws = l.w.to_vec();
        crate::fold::scale_columns(&mut ws, l.rows, cols, &scales.scales)?;
        if cfg.clip && do_clip {
            awq_clip(&mut ws, l.rows, stats, &scales.scales, scheme, cfg)?;
        }
        let grid = Grid::new(scheme, &ws, l.rows, cols, Clipping::AbsMax)?;
        let (dq, params) = grid.rtn(&ws)?;
        let tensor = grid.finish(&dq, &params, None)?;
        let delta: Vec<f32> = dq
            .chunks_exact(cols)
            .zip(l.w.chunks_exact(cols))
            .flat_map(|(d, w)| {
                d.iter()
                    .zip(w)
                    .zip(&scales.scales)
                    .map(|((&d, &w), &s)| d / s - w)
            })
            .collect();
        let num = quad_sum(&delta, l.rows, cols, &h, &mut scratch)?;
        let den = quad_sum(l.w, l.rows, cols, &h, &mut scratch)?;
        let rel_error = if den > 0.0 {
            (num.max(0.0) / den).sqrt()
        } else {
            0.0
        };
        out.push(AwqLinear {
            tensor,
            dequantized: dq,
            rel_error,
        });
    }
    Ok(AwqResult {
        scales,
        linears: out,
    })
}
