//! Dense f32 matrix products: the reference path of the forward pass.
//!
//! Weights follow the PyTorch linear convention `W[out][in]` (row-major), activations are
//! token-major `X[tokens][in]`, and [`matmul_wt`] computes `Y = X · Wᵀ`, the product every linear
//! layer needs. The heavy lifting is done by the `gemm` crate (runtime-dispatched AVX-512/AVX2/NEON
//! micro-kernels, rayon threading).

use crate::{Error, Result};

/// `y[m][n] = x[m][k] · w[n][k]ᵀ`, overwriting `y`. Threads: the current rayon pool.
///
/// ```
/// let x = [1.0f32, 2.0]; // one token, two inputs
/// let w = [1.0f32, 0.0, 0.5, 0.5, -1.0, 1.0]; // three outputs
/// let mut y = [0f32; 3];
/// lowbit_kernels::dense::matmul_wt(&x, &w, &mut y, 1, 2, 3).unwrap();
/// assert_eq!(y, [1.0, 1.5, 1.0]);
/// ```
pub fn matmul_wt(x: &[f32], w: &[f32], y: &mut [f32], m: usize, k: usize, n: usize) -> Result<()> {
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && m * n * k >= 1 << 15 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    matmul_wt_par(x, w, y, m, k, n, par)
}

/// [`matmul_wt`] on the calling thread only (for callers that already split work across
/// threads, such as the quantized GEMM's row blocks).
pub fn matmul_wt_serial(
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    matmul_wt_par(x, w, y, m, k, n, gemm::Parallelism::None)
}

fn matmul_wt_par(
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    par: gemm::Parallelism,
) -> Result<()> {
    if x.len() != m * k || w.len() != n * k || y.len() != m * n {
        return Err(Error::Shape(format!(
            "matmul_wt: x has {} (want {m}x{k}), w has {} (want {n}x{k}), y has {} (want {m}x{n})",
            x.len(),
            w.len(),
            y.len()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        y.fill(0.0);
        return Ok(());
    }
    // SAFETY: the three slices were checked above to hold exactly m*k, n*k and m*n elements;
    // the strides describe row-major x (m x k), y (m x n) and wᵀ viewed as k x n with
    // row stride 1 and column stride k, all in bounds. `read_dst = false` means y's old
    // contents are never read, and y does not alias x or w (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// Scalar reference for [`matmul_wt`], accumulating in f64; used by tests.
pub fn matmul_wt_ref(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k)
                .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                .sum();
            y[i * n + j] = s as f32;
        }
    }
    y
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic values in [-1, 1) for the kernel tests of this crate.
    pub(crate) fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn matches_reference_on_ragged_shapes() {
        let mut s = 7u64;
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 577, 33),
            (7, 64, 129),
            (33, 300, 17),
            (64, 576, 96),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
            let mut y = vec![f32::NAN; m * n];
            matmul_wt(&x, &w, &mut y, m, k, n).unwrap();
            let r = matmul_wt_ref(&x, &w, m, k, n);
            // f32 accumulation of k products of |a|,|b| <= 1: error <= k * eps * sum|ab| <= k^2 eps.
            let tol = (k as f32) * f32::EPSILON * 4.0 * (k as f32).sqrt();
            for (a, b) in y.iter().zip(&r) {
                assert!((a - b).abs() <= tol, "{m}x{k}x{n}: {a} vs {b} (tol {tol})");
            }
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(matmul_wt(&[1.0; 3], &[1.0; 4], &mut [0.0; 2], 1, 2, 2).is_err());
    }
}
