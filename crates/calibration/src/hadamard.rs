//! Hadamard matrices and the fast Walsh-Hadamard transform, for sizes `n = m * 2^k` where a
//! Hadamard matrix of order `m` is known.
//!
//! Orders: `m = 1` (pure Sylvester, `n` a power of two), and every `m` given by one of Paley's
//! constructions over a prime field:
//! - Paley I: `q` prime, `q ≡ 3 (mod 4)`, gives order `q + 1` (12, 20, 24, 32, 44, 48, ...);
//! - Paley II: `q` prime, `q ≡ 1 (mod 4)`, gives order `2 (q + 1)` (12, 28, 36, 60, 76, ...).
//!
//! The full matrix is `H_m ⊗ S_{2^k}` (Kronecker product with the Sylvester matrix), so the
//! transform costs `O(n (k + m))`: a butterfly pass over each contiguous block of `2^k` values,
//! then a dense `m × m` product across blocks. The decomposition prefers the largest power of
//! two. Examples: 576 = 36 · 16 (Paley II, q = 17), 1536 = 12 · 128 (Paley I, q = 11),
//! 64 = 1 · 64.
//!
//! Sizes with no supported order are an error ([`Error::Unsupported`] naming the size); there is
//! no silent fallback to a random orthogonal matrix.

use crate::error::{Error, Result};

/// Largest prime tried for Paley constructions (orders up to 2 * (PALEY_MAX_Q + 1)).
const PALEY_MAX_Q: usize = 2000;

fn is_prime(q: usize) -> bool {
    if q < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= q {
        if q % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

/// Quadratic character of `x` modulo the prime `q`: 0, +1 or -1.
fn chi(x: usize, q: usize) -> i8 {
    let x = x % q;
    if x == 0 {
        return 0;
    }
    // Euler's criterion: x^((q-1)/2) mod q.
    let (mut r, mut b, mut e) = (1u64, x as u64, ((q - 1) / 2) as u64);
    let qm = q as u64;
    while e > 0 {
        if e & 1 == 1 {
            r = r * b % qm;
        }
        b = b * b % qm;
        e >>= 1;
    }
    if r == 1 {
        1
    } else {
        -1
    }
}

/// Which Paley construction (if any) gives a Hadamard matrix of order `m` (`m > 2`).
fn paley_kind(m: usize) -> Option<(u8, usize)> {
    if m < 4 || m % 4 != 0 {
        return None;
    }
    let q1 = m - 1;
    if q1 <= PALEY_MAX_Q && is_prime(q1) && q1 % 4 == 3 {
        return Some((1, q1));
    }
    if m % 2 == 0 {
        let q2 = m / 2 - 1;
        if q2 <= PALEY_MAX_Q && is_prime(q2) && q2 % 4 == 1 {
            return Some((2, q2));
        }
    }
    None
}

/// A Hadamard matrix of small order `m` (entries ±1, row-major `m × m`), from a Paley
/// construction, or `None` when neither construction gives order `m`. `m = 1` and `m = 2`
/// return the trivial matrices.
pub fn small_hadamard(m: usize) -> Option<Vec<i8>> {
    match m {
        0 => return None,
        1 => return Some(vec![1]),
        2 => return Some(vec![1, 1, 1, -1]),
        _ => {}
    }
    let (kind, q) = paley_kind(m)?;
    // Jacobsthal matrix Q[i][j] = chi(j - i).
    let jac = |i: usize, j: usize| chi(j + q - i, q);
    let mut h = vec![0i8; m * m];
    if kind == 1 {
        // H = I + S, S = [[0, 1ᵀ], [-1, Q]] (skew-symmetric since q ≡ 3 mod 4).
        let n = q + 1;
        for i in 0..n {
            for j in 0..n {
                let s = match (i, j) {
                    (0, 0) => 0,
                    (0, _) => 1,
                    (_, 0) => -1,
                    _ => jac(i - 1, j - 1),
                };
                h[i * n + j] = s + i8::from(i == j);
            }
        }
    } else {
        // Symmetric conference matrix C = [[0, 1ᵀ], [1, Q]] of order q + 1; each 0 becomes
        // [[1, -1], [-1, -1]] and each ±1 becomes ±[[1, 1], [1, -1]].
        let c = q + 1;
        for i in 0..c {
            for j in 0..c {
                let s = match (i, j) {
                    (0, 0) => 0,
                    (0, _) | (_, 0) => 1,
                    _ => jac(i - 1, j - 1),
                };
                let blk: [i8; 4] = if s == 0 {
                    [1, -1, -1, -1]
                } else {
                    [s, s, s, -s]
                };
                for (bi, bj, v) in [
                    (0, 0, blk[0]),
                    (0, 1, blk[1]),
                    (1, 0, blk[2]),
                    (1, 1, blk[3]),
                ] {
                    h[(2 * i + bi) * m + 2 * j + bj] = v;
                }
            }
        }
    }
    Some(h)
}

/// A normalised Hadamard transform of size `n = m * 2^k`: the orthogonal matrix
/// `H / sqrt(n)` with `H = H_m ⊗ S_{2^k}`.
#[derive(Debug, Clone)]
pub struct Hadamard {
    n: usize,
    m: usize,
    p: usize,
    hm: Vec<f32>,
    norm: f32,
}

impl Hadamard {
    /// The transform of size `n`; [`Error::Unsupported`] (naming `n`) when `n` is not
    /// `m * 2^k` for a supported order `m` (see the module docs).
    pub fn new(n: usize) -> Result<Self> {
        if n == 0 {
            return Err(Error::Invalid("Hadamard size 0".into()));
        }
        let tz = n.trailing_zeros() as usize;
        for k in (0..=tz).rev() {
            let m = n >> k;
            if let Some(h) = small_hadamard(m) {
                return Ok(Hadamard {
                    n,
                    m,
                    p: 1 << k,
                    hm: h.into_iter().map(f32::from).collect(),
                    norm: 1.0 / (n as f32).sqrt(),
                });
            }
        }
        Err(Error::Unsupported(format!(
            "no Hadamard matrix of size {n}: it must be m * 2^k with m = 1 or a Paley order \
             (q + 1 for a prime q ≡ 3 mod 4, 2(q + 1) for a prime q ≡ 1 mod 4; e.g. 12, 20, 28, 36)"
        )))
    }

    /// Size `n`.
    pub fn n(&self) -> usize {
        self.n
    }

    /// `(m, 2^k)` with `n = m * 2^k`.
    pub fn factors(&self) -> (usize, usize) {
        (self.m, self.p)
    }

    /// The unnormalised matrix `H` (entries ±1), row-major `n × n`, in f64.
    pub fn matrix_f64(&self) -> Vec<f64> {
        let n = self.n;
        let mut out = vec![0f64; n * n];
        for i in 0..n {
            let (ai, bi) = (i / self.p, i % self.p);
            for j in 0..n {
                let (aj, bj) = (j / self.p, j % self.p);
                let s = if (bi & bj).count_ones() % 2 == 0 {
                    1.0
                } else {
                    -1.0
                };
                out[i * n + j] = self.hm[ai * self.m + aj] as f64 * s;
            }
        }
        out
    }

    /// Replace every `n`-wide row `x` of `rows` by `x · H / sqrt(n)` (row vector times the
    /// orthogonal matrix). Shape error if `rows.len()` is not a multiple of `n`.
    pub fn apply_rows(&self, rows: &mut [f32]) -> Result<()> {
        if rows.len() % self.n != 0 {
            return Err(Error::Shape(format!(
                "Hadamard of size {} applied to {} values (not a whole number of rows)",
                self.n,
                rows.len()
            )));
        }
        let mut tmp = vec![0f32; self.n];
        for row in rows.chunks_exact_mut(self.n) {
            self.apply_one(row, &mut tmp);
        }
        Ok(())
    }

    fn apply_one(&self, x: &mut [f32], tmp: &mut [f32]) {
        let (m, p) = (self.m, self.p);
        // Sylvester butterflies inside each block of p (S is symmetric).
        for blk in x.chunks_exact_mut(p) {
            let mut h = 1;
            while h < p {
                for i in (0..p).step_by(2 * h) {
                    for j in i..i + h {
                        let (a, b) = (blk[j], blk[j + h]);
                        blk[j] = a + b;
                        blk[j + h] = a - b;
                    }
                }
                h *= 2;
            }
        }
        if m > 1 {
            // y[a][b] = sum_a' x[a'][b] * Hm[a'][a].
            tmp.iter_mut().for_each(|v| *v = 0.0);
            for a2 in 0..m {
                let src = &x[a2 * p..(a2 + 1) * p];
                for a in 0..m {
                    let s = self.hm[a2 * m + a];
                    let dst = &mut tmp[a * p..(a + 1) * p];
                    if s > 0.0 {
                        dst.iter_mut().zip(src).for_each(|(d, v)| *d += v);
                    } else {
                        dst.iter_mut().zip(src).for_each(|(d, v)| *d -= v);
                    }
                }
            }
            x.copy_from_slice(tmp);
        }
        x.iter_mut().for_each(|v| *v *= self.norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_orthogonal(h: &[f64], n: usize) {
        for i in 0..n {
            for j in 0..n {
                let d: f64 = (0..n).map(|k| h[i * n + k] * h[j * n + k]).sum();
                let want = if i == j { n as f64 } else { 0.0 };
                assert_eq!(d, want, "n={n} ({i},{j})");
            }
        }
    }

    #[test]
    fn small_orders_are_hadamard() {
        for m in [1, 2, 4, 12, 20, 24, 28, 36, 44, 60] {
            let h = small_hadamard(m).unwrap_or_else(|| panic!("order {m}"));
            assert!(h.iter().all(|&v| v == 1 || v == -1));
            let hf: Vec<f64> = h.iter().map(|&v| v as f64).collect();
            check_orthogonal(&hf, m);
        }
        assert!(small_hadamard(3).is_none());
        assert!(small_hadamard(9).is_none());
    }

    #[test]
    fn full_matrices_are_hadamard() {
        for n in [1, 2, 8, 12, 24, 40, 56, 64, 72, 144, 576] {
            let h = Hadamard::new(n).unwrap();
            check_orthogonal(&h.matrix_f64(), n);
        }
        assert_eq!(Hadamard::new(576).unwrap().factors(), (36, 16));
        assert_eq!(Hadamard::new(1536).unwrap().factors(), (12, 128));
    }

    #[test]
    fn fast_equals_dense() {
        for n in [4, 12, 28, 96, 576, 1536] {
            let h = Hadamard::new(n).unwrap();
            let dense = h.matrix_f64();
            let mut s = 7u64;
            let x: Vec<f32> = (0..2 * n)
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                    ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
                })
                .collect();
            let mut y = x.clone();
            h.apply_rows(&mut y).unwrap();
            for r in 0..2 {
                for j in 0..n {
                    let want: f64 = (0..n)
                        .map(|i| x[r * n + i] as f64 * dense[i * n + j])
                        .sum::<f64>()
                        / (n as f64).sqrt();
                    assert!((y[r * n + j] as f64 - want).abs() < 1e-5, "n={n}");
                }
            }
        }
    }

    #[test]
    fn unsupported_sizes_name_the_size() {
        for n in [3, 6, 9, 10, 18] {
            let e = Hadamard::new(n).unwrap_err().to_string();
            assert!(e.contains(&n.to_string()), "{e}");
        }
        assert!(Hadamard::new(0).is_err());
        assert!(Hadamard::new(12)
            .unwrap()
            .apply_rows(&mut [0.0; 13])
            .is_err());
    }
}
