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
    let quad = |v: &[f64]| -> f64 {
        let mut s = 0.0;
        for i in 0..cols {
            let hrow = &h[i * cols..(i + 1) * cols];
            let hv: f64 = hrow.iter().zip(v).map(|(a, b)| a * b).sum();
            s += v[i] * hv;
        }
        s
    };
    let (num, den) = (0..rows)
        .into_par_iter()
        .map(|r| {
            let wr: Vec<f64> = w[r * cols..(r + 1) * cols]
                .iter()
                .map(|&x| x as f64)
                .collect();
            let dr: Vec<f64> = w[r * cols..(r + 1) * cols]
                .iter()
                .zip(&wq[r * cols..(r + 1) * cols])
                .map(|(&a, &b)| a as f64 - b as f64)
                .collect();
            (quad(&dr), quad(&wr))
        })
        .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
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
