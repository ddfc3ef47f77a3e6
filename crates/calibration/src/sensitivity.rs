//! Sensitivity: the relative output error `||W X − Q(W) X|| / ||W X||` of a quantized linear
//! layer on calibration inputs (Frobenius norms over all tokens and outputs).

use crate::error::{check_finite, check_len, Error, Result};
use crate::hessian::HessianAccumulator;
use rayon::prelude::*;

const CHUNK: usize = 1024;

/// Relative output error of `wq` against `w` (both `rows x cols`, `[out][in]`) on the raw
/// input rows `x` (`[n_tokens][cols]`). Returns 0 when `W X` is exactly zero and `wq == w`,
/// and `+inf` when `W X` is zero but `wq X` is not.
pub fn relative_output_error(
    w: &[f32],
    wq: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    n_tokens: usize,
) -> Result<f64> {
    check_len(w, rows, cols, "weight")?;
    check_len(wq, rows, cols, "quantized weight")?;
    check_len(x, n_tokens, cols, "inputs")?;
    check_finite(w, "weight")?;
    check_finite(wq, "quantized weight")?;
    check_finite(x, "inputs")?;
    if n_tokens == 0 {
        return Err(Error::NoData("no input rows for the sensitivity".into()));
    }
    let dw: Vec<f32> = w.iter().zip(wq).map(|(a, b)| a - b).collect();
    let (mut num, mut den) = (0f64, 0f64);
    let mut y = vec![0f32; CHUNK.min(n_tokens) * rows];
    let mut dy = vec![0f32; CHUNK.min(n_tokens) * rows];
    let mut t0 = 0;
    while t0 < n_tokens {
        let m = (n_tokens - t0).min(CHUNK);
        let xs = &x[t0 * cols..(t0 + m) * cols];
        lowbit_kernels::dense::matmul_wt(xs, w, &mut y[..m * rows], m, cols, rows)?;
        lowbit_kernels::dense::matmul_wt(xs, &dw, &mut dy[..m * rows], m, cols, rows)?;
        den += y[..m * rows]
            .iter()
            .map(|&v| (v as f64) * (v as f64))
            .sum::<f64>();
        num += dy[..m * rows]
            .iter()
            .map(|&v| (v as f64) * (v as f64))
            .sum::<f64>();
        t0 += m;
    }
    Ok(ratio(num, den))
}

/// Same quantity computed from the input statistics alone:
/// `sqrt(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ))` with `H ∝ Σ x xᵀ` (the scale of `H` cancels), so the
/// pipeline can report it from the GPTQ Hessian without keeping the raw inputs.
pub fn relative_output_error_from_hessian(
    w: &[f32],
    wq: &[f32],
    rows: usize,
    cols: usize,
    hessian: &HessianAccumulator,
) -> Result<f64> {
    if hessian.cols() != cols {
        return Err(Error::Shape(format!(
            "Hessian width {} does not match weight columns {cols}",
            hessian.cols()
        )));
    }
    let h = hessian.hessian()?;
    relative_output_error_h(w, wq, rows, cols, &h)
}

/// [`relative_output_error_from_hessian`] with an explicit `cols x cols` row-major `H`.
pub fn relative_output_error_h(
    w: &[f32],
    wq: &[f32],
    rows: usize,
    cols: usize,
    h: &[f64],
) -> Result<f64> {
    check_len(w, rows, cols, "weight")?;
    check_len(wq, rows, cols, "quantized weight")?;
    if h.len() != cols * cols {
        return Err(Error::Shape(format!(
            "Hessian has {} entries, expected {cols}^2",
            h.len()
        )));
    }
    check_finite(w, "weight")?;
    check_finite(wq, "quantized weight")?;
    if rows == 0 || cols == 0 {
        return Ok(0.0);
    }
    // One f32 GEMM: M = [ΔW; W] · H (H is symmetric, so it serves as its own transpose), then
    // tr(ΔW H ΔWᵀ) = Σ ΔW ∘ M_top and tr(W H Wᵀ) = Σ W ∘ M_bottom, summed in f64. The f32
    // products carry ~1e-6 relative error, far below what a report needs.
    let hf: Vec<f32> = h.iter().map(|&v| v as f32).collect();
    let mut a = vec![0f32; 2 * rows * cols];
    a[..rows * cols]
        .par_chunks_mut(cols)
        .zip(w.par_chunks(cols).zip(wq.par_chunks(cols)))
        .for_each(|(d, (wr, qr))| {
            for ((d, &x), &q) in d.iter_mut().zip(wr).zip(qr) {
                *d = x - q;
            }
        });
    a[rows * cols..].copy_from_slice(w);
    let mut m = vec![0f32; 2 * rows * cols];
    lowbit_kernels::dense::matmul_wt(&a, &hf, &mut m, 2 * rows, cols, cols)?;
    // Row sums in parallel, then added in row order: a rayon `sum` associates by its dynamic
    // split, so the last bits of the report would change from run to run.
    let dot = |x: &[f32], y: &[f32]| -> f64 {
        let rows: Vec<f64> = x
            .par_chunks(cols)
            .zip(y.par_chunks(cols))
            .map(|(xr, yr)| {
                xr.iter()
                    .zip(yr)
                    .map(|(&p, &q)| p as f64 * q as f64)
                    .sum::<f64>()
            })
            .collect();
        rows.iter().sum()
    };
    let num = dot(&a[..rows * cols], &m[..rows * cols]);
    let den = dot(&a[rows * cols..], &m[rows * cols..]);
    Ok(ratio(num.max(0.0), den.max(0.0)))
}

fn ratio(num: f64, den: f64) -> f64 {
    if den > 0.0 {
        (num / den).sqrt()
    } else if num == 0.0 {
        0.0
    } else {
        f64::INFINITY
    }
}
