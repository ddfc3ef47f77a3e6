//! Dense symmetric linear algebra in f64 for GPTQ: a blocked, rayon-parallel Cholesky
//! factorisation, a blocked lower-triangular inverse, and the upper Cholesky factor of `H⁻¹`
//! that GPTQ's column updates use.
//!
//! Matrices are square, row-major `Vec<f64>`. Only sizes up to a few thousand are expected
//! (the input width of one linear layer), so a cache-blocked hand-written implementation with
//! vectorisable dot products is fast enough and avoids a heavy linear-algebra dependency.
//!
//! # The `H⁻¹` factor without forming `H⁻¹`
//! GPTQ needs the upper-triangular `U` with `H⁻¹ = Uᵀ U`. With `J` the reversal permutation,
//! factor the reversed matrix `J H J = L Lᵀ` (lower `L`); then `H = R Rᵀ` with the *upper*
//! `R = J L J`, hence `H⁻¹ = R⁻ᵀ R⁻¹ = Uᵀ U` with `U = R⁻¹ = J L⁻¹ J`. One Cholesky and one
//! triangular inverse, instead of Cholesky, inverse, Cholesky.

use crate::error::{Error, Result};
use rayon::prelude::*;

/// Panel width of the blocked algorithms.
const NB: usize = 64;

#[inline(always)]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f64; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = 0.0;
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s + ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// `out[k] = dot(x, ws[k])` for four rows at once (one pass over `x`).
#[inline(always)]
fn dot4(x: &[f64], w0: &[f64], w1: &[f64], w2: &[f64], w3: &[f64]) -> [f64; 4] {
    let n = x.len();
    let (w0, w1, w2, w3) = (&w0[..n], &w1[..n], &w2[..n], &w3[..n]);
    let mut a0 = [0f64; 4];
    let mut a1 = [0f64; 4];
    let mut a2 = [0f64; 4];
    let mut a3 = [0f64; 4];
    let it = x
        .chunks_exact(4)
        .zip(w0.chunks_exact(4))
        .zip(w1.chunks_exact(4))
        .zip(w2.chunks_exact(4))
        .zip(w3.chunks_exact(4));
    for ((((xv, v0), v1), v2), v3) in it {
        for k in 0..4 {
            a0[k] += xv[k] * v0[k];
            a1[k] += xv[k] * v1[k];
            a2[k] += xv[k] * v2[k];
            a3[k] += xv[k] * v3[k];
        }
    }
    let mut out = [
        (a0[0] + a0[2]) + (a0[1] + a0[3]),
        (a1[0] + a1[2]) + (a1[1] + a1[3]),
        (a2[0] + a2[2]) + (a2[1] + a2[3]),
        (a3[0] + a3[2]) + (a3[1] + a3[3]),
    ];
    for q in n / 4 * 4..n {
        out[0] += x[q] * w0[q];
        out[1] += x[q] * w1[q];
        out[2] += x[q] * w2[q];
        out[3] += x[q] * w3[q];
    }
    out
}

/// `row[k0 + t] -= dot(row[..k0], panel[t])` for every panel row `t < tmax`.
///
/// Runs under `pulp`'s runtime dispatch so the dot products are compiled for the best
/// instruction set the CPU has (AVX2+FMA / AVX-512) instead of the baseline SSE2.
fn panel_update(row: &mut [f64], panel: &[f64], k0: usize, tmax: usize) {
    pulp::Arch::new().dispatch(
        #[inline(always)]
        || panel_update_impl(row, panel, k0, tmax),
    )
}

#[inline(always)]
fn panel_update_impl(row: &mut [f64], panel: &[f64], k0: usize, tmax: usize) {
    let (left, right) = row.split_at_mut(k0);
    let left = &*left;
    let mut t = 0;
    while t + 4 <= tmax {
        let d = dot4(
            left,
            &panel[t * k0..(t + 1) * k0],
            &panel[(t + 1) * k0..(t + 2) * k0],
            &panel[(t + 2) * k0..(t + 3) * k0],
            &panel[(t + 3) * k0..(t + 4) * k0],
        );
        for k in 0..4 {
            right[t + k] -= d[k];
        }
        t += 4;
    }
    while t < tmax {
        right[t] -= dot(left, &panel[t * k0..(t + 1) * k0]);
        t += 1;
    }
}

/// In-place lower Cholesky factorisation `A = L Lᵀ` of a symmetric positive-definite `n x n`
/// row-major matrix (only the lower triangle is read; the strict upper triangle is zeroed).
///
/// Errors with [`Error::NotPositiveDefinite`] (with `damp = 0`) at the first pivot that is not
/// strictly positive and finite.
pub fn cholesky_in_place(a: &mut [f64], n: usize) -> Result<()> {
    if a.len() != n * n {
        return Err(Error::Shape(format!(
            "matrix has {} entries, expected {n}^2",
            a.len()
        )));
    }
    let mut k0 = 0;
    while k0 < n {
        let k1 = (k0 + NB).min(n);
        let w = k1 - k0;
        // Copy of the panel rows' already-final left part L[k0..k1][0..k0].
        let mut panel = vec![0f64; w * k0];
        for t in 0..w {
            panel[t * k0..(t + 1) * k0].copy_from_slice(&a[(k0 + t) * n..(k0 + t) * n + k0]);
        }
        // 1. Left-looking update of the diagonal block rows.
        for t in 0..w {
            let i = k0 + t;
            panel_update(&mut a[i * n..i * n + k1], &panel, k0, t + 1);
        }
        // 2. Unblocked factorisation of the diagonal block.
        for j in k0..k1 {
            let mut d = a[j * n + j];
            for p in k0..j {
                d -= a[j * n + p] * a[j * n + p];
            }
            if !(d > 0.0 && d.is_finite()) {
                return Err(Error::NotPositiveDefinite {
                    damp: 0.0,
                    rel_damp: 0.0,
                    pivot: j,
                    value: d,
                });
            }
            let ljj = d.sqrt();
            a[j * n + j] = ljj;
            for i in j + 1..k1 {
                let mut s = a[i * n + j];
                for p in k0..j {
                    s -= a[i * n + p] * a[j * n + p];
                }
                a[i * n + j] = s / ljj;
            }
        }
        // Diagonal block (lower part) for the panel solve.
        let mut diag = vec![0f64; w * w];
        for t in 0..w {
            for u in 0..=t {
                diag[t * w + u] = a[(k0 + t) * n + k0 + u];
            }
        }
        // 3. Rows below: left-looking update, then triangular solve against the block.
        let (_, below) = a.split_at_mut(k1 * n);
        below.par_chunks_mut(n).for_each(|row| {
            pulp::Arch::new().dispatch(
                #[inline(always)]
                || {
                    panel_update_impl(&mut row[..k1], &panel, k0, w);
                    for t in 0..w {
                        let s = row[k0 + t] - dot(&row[k0..k0 + t], &diag[t * w..t * w + t]);
                        row[k0 + t] = s / diag[t * w + t];
                    }
                },
            )
        });
        k0 = k1;
    }
    for i in 0..n {
        for j in i + 1..n {
            a[i * n + j] = 0.0;
        }
    }
    Ok(())
}

/// Inverse of a lower-triangular `n x n` matrix with non-zero diagonal, returned **transposed**
/// (`out = L⁻ᵀ`, upper triangular, row-major), which is the layout the column-by-column
/// forward substitution produces contiguously.
pub fn lower_inverse_transposed(l: &[f64], n: usize) -> Result<Vec<f64>> {
    if l.len() != n * n {
        return Err(Error::Shape(format!(
            "matrix has {} entries, expected {n}^2",
            l.len()
        )));
    }
    if let Some(i) = (0..n).find(|&i| l[i * n + i] == 0.0 || !l[i * n + i].is_finite()) {
        return Err(Error::Invalid(format!(
            "triangular matrix has a zero pivot at {i}"
        )));
    }
    // Columns j of L⁻¹ are independent: x = L⁻¹ e_j. Process them in blocks of 8 so every row
    // of L is read once per block; each block writes rows j of the output (out[j][i] = x[i]).
    const CB: usize = 8;
    let mut out = vec![0f64; n * n];
    out.par_chunks_mut(n * CB)
        .enumerate()
        .for_each(|(blk, outb)| {
            pulp::Arch::new().dispatch(
                #[inline(always)]
                || inverse_block(l, n, blk * CB, outb),
            )
        });
    Ok(out)
}

/// Columns `j0 .. j0 + outb.len() / n` of `L⁻¹`, written as rows of `outb`.
#[inline(always)]
fn inverse_block(l: &[f64], n: usize, j0: usize, outb: &mut [f64]) {
    let nb = outb.len() / n;
    // xs[c][i - j0] for column j0 + c; entries above the diagonal stay 0, so every dot product
    // can start at j0.
    let len = n - j0;
    let mut xs = vec![0f64; nb * len];
    let mut s = [0f64; 8];
    for i in j0..n {
        let ii = i - j0;
        let lrow = &l[i * n + j0..i * n + i];
        let inv = 1.0 / l[i * n + i];
        if nb == 8 {
            let x = |c: usize| &xs[c * len..c * len + ii];
            let a = dot4(lrow, x(0), x(1), x(2), x(3));
            let b = dot4(lrow, x(4), x(5), x(6), x(7));
            s[..4].copy_from_slice(&a);
            s[4..].copy_from_slice(&b);
        } else {
            for (c, sc) in s.iter_mut().enumerate().take(nb) {
                *sc = dot(lrow, &xs[c * len..c * len + ii]);
            }
        }
        for (c, &sc) in s.iter().enumerate().take(nb.min(ii + 1)) {
            let delta = if c == ii { 1.0 } else { 0.0 };
            xs[c * len + ii] = (delta - sc) * inv;
        }
    }
    for c in 0..nb {
        outb[c * n + j0..c * n + n].copy_from_slice(&xs[c * len..(c + 1) * len]);
    }
}

/// The upper-triangular `U` with `H⁻¹ = Uᵀ U` for a symmetric positive-definite `H`
/// (see the module docs), row-major `n x n`.
pub fn inverse_cholesky_upper(h: &[f64], n: usize) -> Result<Vec<f64>> {
    if h.len() != n * n {
        return Err(Error::Shape(format!(
            "matrix has {} entries, expected {n}^2",
            h.len()
        )));
    }
    let mut a = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            a[i * n + j] = h[(n - 1 - i) * n + (n - 1 - j)];
        }
    }
    cholesky_in_place(&mut a, n).map_err(|e| match e {
        Error::NotPositiveDefinite {
            damp,
            rel_damp,
            pivot,
            value,
        } => Error::NotPositiveDefinite {
            damp,
            rel_damp,
            pivot: n - 1 - pivot,
            value,
        },
        e => e,
    })?;
    // mt = L⁻ᵀ: mt[j][i] = (L⁻¹)[i][j]. U[i][j] = (L⁻¹)[n-1-i][n-1-j] = mt[n-1-j][n-1-i].
    let mt = lower_inverse_transposed(&a, n)?;
    let mut u = vec![0f64; n * n];
    for i in 0..n {
        for j in i..n {
            u[i * n + j] = mt[(n - 1 - j) * n + (n - 1 - i)];
        }
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spd(n: usize, seed: u64) -> Vec<f64> {
        // B Bᵀ + n I with a deterministic pseudo-random B.
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        };
        let b: Vec<f64> = (0..n * n).map(|_| next()).collect();
        let mut h = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                let mut acc = 0.0;
                for k in 0..n {
                    acc += b[i * n + k] * b[j * n + k];
                }
                h[i * n + j] = acc + if i == j { 0.1 * n as f64 } else { 0.0 };
            }
        }
        h
    }

    /// Textbook unblocked Cholesky–Banachiewicz, the independent reference.
    fn chol_ref(h: &[f64], n: usize) -> Vec<f64> {
        let mut l = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..=i {
                let mut s = h[i * n + j];
                for k in 0..j {
                    s -= l[i * n + k] * l[j * n + k];
                }
                l[i * n + j] = if i == j { s.sqrt() } else { s / l[j * n + j] };
            }
        }
        l
    }

    /// Gauss–Jordan inverse with partial pivoting, the independent reference for H⁻¹.
    fn inv_ref(h: &[f64], n: usize) -> Vec<f64> {
        let mut a = h.to_vec();
        let mut inv = vec![0f64; n * n];
        for i in 0..n {
            inv[i * n + i] = 1.0;
        }
        for c in 0..n {
            let p = (c..n)
                .max_by(|&x, &y| a[x * n + c].abs().total_cmp(&a[y * n + c].abs()))
                .unwrap();
            for k in 0..n {
                a.swap(c * n + k, p * n + k);
                inv.swap(c * n + k, p * n + k);
            }
            let d = a[c * n + c];
            for k in 0..n {
                a[c * n + k] /= d;
                inv[c * n + k] /= d;
            }
            for r in 0..n {
                if r != c {
                    let f = a[r * n + c];
                    for k in 0..n {
                        a[r * n + k] -= f * a[c * n + k];
                        inv[r * n + k] -= f * inv[c * n + k];
                    }
                }
            }
        }
        inv
    }

    #[test]
    fn cholesky_matches_reference() {
        for &n in &[1usize, 5, 63, 64, 65, 150] {
            let h = spd(n, n as u64);
            let mut a = h.clone();
            cholesky_in_place(&mut a, n).unwrap();
            let r = chol_ref(&h, n);
            let err = a
                .iter()
                .zip(&r)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-9, "n={n} max err {err}");
        }
    }

    #[test]
    fn triangular_inverse_matches_reference() {
        let n = 77;
        let h = spd(n, 3);
        let l = chol_ref(&h, n);
        let mt = lower_inverse_transposed(&l, n).unwrap();
        // L · (L⁻¹) = I, with (L⁻¹)[i][j] = mt[j][i].
        for i in 0..n {
            for j in 0..n {
                let s: f64 = (0..n).map(|k| l[i * n + k] * mt[j * n + k]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((s - want).abs() < 1e-10, "({i},{j}) {s}");
            }
        }
    }

    #[test]
    fn inverse_factor_reproduces_inverse() {
        for &n in &[3usize, 70, 130] {
            let h = spd(n, 7 + n as u64);
            let u = inverse_cholesky_upper(&h, n).unwrap();
            let hinv = inv_ref(&h, n);
            let scale = hinv.iter().fold(0f64, |m, x| m.max(x.abs()));
            for i in 0..n {
                for j in 0..n {
                    if j < i {
                        assert_eq!(u[i * n + j], 0.0);
                    }
                    let s: f64 = (0..n).map(|k| u[k * n + i] * u[k * n + j]).sum();
                    assert!(
                        (s - hinv[i * n + j]).abs() < 1e-10 * scale,
                        "n={n} ({i},{j})"
                    );
                }
                assert!(u[i * n + i] > 0.0);
            }
        }
    }

    #[test]
    fn not_positive_definite_is_reported() {
        let n = 4;
        let mut h = vec![0f64; n * n];
        for i in 0..n {
            h[i * n + i] = 1.0;
        }
        h[2 * n + 2] = -1.0;
        let err = inverse_cholesky_upper(&h, n).unwrap_err();
        assert!(
            matches!(err, Error::NotPositiveDefinite { pivot: 2, .. }),
            "{err:?}"
        );
    }
}
