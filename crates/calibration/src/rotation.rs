//! Dense orthogonal rotations (`n × n`, row-major f32) and the products the model surgery
//! needs: `X · R` for rows, `Rᵀ · W`, orthogonality checks, Gaussian-QR-free constructions.
//!
//! Convention: a rotation `R` acts on row vectors, `x ↦ x R`. A weight `W` (`[out][in]`) that
//! reads the rotated input gets `W ← W R`; one that writes into the rotated space gets
//! `W ← Rᵀ W`.

use crate::error::{Error, Result};
use crate::hadamard::Hadamard;

/// Check `r` is `n × n` and finite.
fn check_square(r: &[f32], n: usize) -> Result<()> {
    if r.len() != n * n {
        return Err(Error::Shape(format!(
            "rotation has {} values, expected {n} x {n}",
            r.len()
        )));
    }
    crate::error::check_finite(r, "rotation")
}

/// `max |R Rᵀ - I|` computed in f64.
pub fn orthogonality_error(r: &[f32], n: usize) -> Result<f64> {
    check_square(r, n)?;
    let mut worst = 0f64;
    for i in 0..n {
        for j in 0..n {
            let d: f64 = (0..n)
                .map(|k| r[i * n + k] as f64 * r[j * n + k] as f64)
                .sum();
            worst = worst.max((d - f64::from(u8::from(i == j))).abs());
        }
    }
    Ok(worst)
}

/// The identity `n × n`.
pub fn identity(n: usize) -> Vec<f32> {
    let mut r = vec![0f32; n * n];
    (0..n).for_each(|i| r[i * n + i] = 1.0);
    r
}

/// Transpose of a `rows × cols` matrix.
pub fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; a.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = a[i * cols + j];
        }
    }
    t
}

/// `C = A · B` for `A: m × k`, `B: k × n` (f32 GEMM).
pub fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Result<Vec<f32>> {
    crate::error::check_len(a, m, k, "matmul lhs")?;
    crate::error::check_len(b, k, n, "matmul rhs")?;
    let bt = transpose(b, k, n);
    let mut c = vec![0f32; m * n];
    lowbit_kernels::dense::matmul_wt(a, &bt, &mut c, m, k, n)?;
    Ok(c)
}

/// Replace every `n`-wide row `x` of `x_rows` (`rows × n`) by `x R`.
pub fn rotate_rows(x_rows: &mut [f32], rows: usize, r: &[f32], n: usize) -> Result<()> {
    check_square(r, n)?;
    crate::error::check_len(x_rows, rows, n, "rows to rotate")?;
    let y = matmul(x_rows, r, rows, n, n)?;
    x_rows.copy_from_slice(&y);
    Ok(())
}

/// `W ← Rᵀ W` for `W: n × cols` (rotate the output side of a weight).
pub fn rotate_output_side(w: &mut [f32], cols: usize, r: &[f32], n: usize) -> Result<()> {
    check_square(r, n)?;
    crate::error::check_len(w, n, cols, "weight")?;
    // Rᵀ W = (Wᵀ R)ᵀ.
    let mut wt = transpose(w, n, cols);
    rotate_rows(&mut wt, cols, r, n)?;
    w.copy_from_slice(&transpose(&wt, cols, n));
    Ok(())
}

/// Apply `r` (`n × n`) block-diagonally: each row of width `blocks * n` has each of its
/// `blocks` contiguous chunks multiplied by `r` (`x_b ↦ x_b R`).
pub fn rotate_rows_blockwise(x_rows: &mut [f32], width: usize, r: &[f32], n: usize) -> Result<()> {
    if n == 0 || width % n != 0 || x_rows.len() % width.max(1) != 0 {
        return Err(Error::Shape(format!(
            "block rotation of size {n} over rows of width {width} ({} values)",
            x_rows.len()
        )));
    }
    let chunks = x_rows.len() / n;
    rotate_rows(x_rows, chunks, r, n)
}

/// The dense orthogonal matrix `D · H / sqrt(n)` with `D = diag(signs)` (QuaRot's randomized
/// Hadamard when the signs are random ±1; the plain normalised Hadamard when all are +1).
pub fn signed_hadamard(signs: &[f32]) -> Result<Vec<f32>> {
    let n = signs.len();
    let h = Hadamard::new(n)?;
    let mut r = vec![0f32; n * n];
    for (i, s) in signs.iter().enumerate() {
        r[i * n + i] = *s;
    }
    h.apply_rows(&mut r)?;
    Ok(r)
}

/// `n` random signs ±1 from a SplitMix64 stream seeded with `seed`.
pub fn random_signs(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            if (z ^ (z >> 31)) & 1 == 0 {
                1.0
            } else {
                -1.0
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_hadamard_is_orthogonal_and_rotations_compose() {
        for n in [12, 64, 96] {
            let r = signed_hadamard(&random_signs(n, 3)).unwrap();
            assert!(orthogonality_error(&r, n).unwrap() < 1e-5);
            // (x R) Rᵀ... via W ← Rᵀ W on a vector: x R · (Rᵀ w) = x · w.
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let w: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let mut xr = x.clone();
            rotate_rows(&mut xr, 1, &r, n).unwrap();
            let mut rw = w.clone();
            rotate_output_side(&mut rw, 1, &r, n).unwrap();
            let a: f32 = x.iter().zip(&w).map(|(a, b)| a * b).sum();
            let b: f32 = xr.iter().zip(&rw).map(|(a, b)| a * b).sum();
            assert!((a - b).abs() < 1e-4, "{a} {b}");
        }
        assert!(signed_hadamard(&[1.0; 9]).is_err());
        assert!(orthogonality_error(&[1.0, 0.0, 0.0], 2).is_err());
        let mut bad = vec![0.0; 10];
        assert!(rotate_rows_blockwise(&mut bad, 5, &identity(2), 2).is_err());
    }
}
