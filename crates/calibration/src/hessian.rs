//! [`HessianAccumulator`]: the GPTQ proxy Hessian `H = 2/n Σ x xᵀ` of a linear layer's inputs,
//! accumulated over calibration rows streamed in chunks.

use crate::error::{check_finite, Error, Result};
use rayon::prelude::*;

/// Largest number of rows multiplied in f32 before the partial sum is added to the f64 total.
const CHUNK: usize = 2048;

/// Rows of `H` per lower-triangle block (a multiple of the GEMM micro-kernel's 16 rows).
const TRI: usize = 64;

/// Running sum of `x xᵀ` over input rows `x` (length `cols`) of one linear layer (or of several
/// linears that share the same input, e.g. q/k/v).
///
/// Each chunk's `XᵀX` is computed as one f32 GEMM (`lowbit_kernels::dense::matmul_wt`, at most
/// 2048 rows per product) and added into an f64 total, so accumulating 65k tokens loses no
/// precision to long f32 sums.
#[derive(Debug, Clone)]
pub struct HessianAccumulator {
    cols: usize,
    n: usize,
    sum: Vec<f64>,
}

impl HessianAccumulator {
    /// An empty accumulator for inputs of width `cols`.
    pub fn new(cols: usize) -> Self {
        HessianAccumulator {
            cols,
            n: 0,
            sum: vec![0.0; cols * cols],
        }
    }

    /// Input width.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Number of input rows (tokens) seen so far.
    pub fn n_samples(&self) -> usize {
        self.n
    }

    /// Add `x`, a row-major `[n_rows][cols]` block of layer inputs.
    pub fn add_rows(&mut self, x: &[f32], n_rows: usize) -> Result<()> {
        let c = self.cols;
        if x.len() != n_rows * c {
            return Err(Error::Shape(format!(
                "input block has {} values, expected {n_rows} x {c}",
                x.len()
            )));
        }
        check_finite(x, "calibration inputs")?;
        let mut xt = vec![0f32; c * CHUNK.min(n_rows.max(1))];
        // Only the lower triangle is needed (H is symmetric): block row `b` of H (rows
        // r0..r1, `TRI` wide) against columns 0..r1, about 52-56% of the full product's work
        // at the widths of real models. Blocks run in parallel, each as one serial GEMM.
        let blocks: Vec<(usize, usize)> = (0..c.div_ceil(TRI))
            .map(|b| (b * TRI, ((b + 1) * TRI).min(c)))
            .rev()
            .collect();
        let mut r0 = 0;
        while r0 < n_rows {
            let m = (n_rows - r0).min(CHUNK);
            let xt = &mut xt[..c * m];
            // Transpose the chunk: xt[j][t] = x[r0 + t][j].
            // Tiles of 32 columns x 32 rows keep both sides in cache.
            xt.par_chunks_mut(32 * m)
                .enumerate()
                .for_each(|(jb, cols)| {
                    let j0 = jb * 32;
                    let nj = cols.len() / m;
                    for t0 in (0..m).step_by(32) {
                        for t in t0..(t0 + 32).min(m) {
                            let xr = &x[(r0 + t) * c + j0..(r0 + t) * c + j0 + nj];
                            for (dj, &v) in xr.iter().enumerate() {
                                cols[dj * m + t] = v;
                            }
                        }
                    }
                });
            let xt = &*xt;
            // Split the f64 sum into the blocks' row ranges so each block adds into its own.
            let mut rows_of: Vec<&mut [f64]> = Vec::with_capacity(blocks.len());
            let mut rest: &mut [f64] = &mut self.sum;
            let mut taken = 0;
            for &(i0, i1) in blocks.iter().rev() {
                let (head, tail) = std::mem::take(&mut rest).split_at_mut((i1 - taken) * c);
                debug_assert_eq!(i0, taken);
                rows_of.push(head);
                rest = tail;
                taken = i1;
            }
            rows_of.reverse();
            blocks
                .par_iter()
                .zip(rows_of.into_par_iter())
                .try_for_each(|(&(i0, i1), srows)| -> Result<()> {
                    let (bi, bj) = (i1 - i0, i1);
                    let mut prod = vec![0f32; bi * bj];
                    // prod[a][b] = Σ_t x[t][i0 + a] x[t][b] for b < i1.
                    lowbit_kernels::dense::matmul_wt_serial(
                        &xt[i0 * m..i1 * m],
                        &xt[..i1 * m],
                        &mut prod,
                        bi,
                        m,
                        bj,
                    )?;
                    for (srow, prow) in srows.chunks_exact_mut(c).zip(prod.chunks_exact(bj)) {
                        for (s, &p) in srow[..bj].iter_mut().zip(prow) {
                            *s += p as f64;
                        }
                    }
                    Ok(())
                })?;
            r0 += m;
        }
        self.n += n_rows;
        Ok(())
    }

    /// Merge another accumulator of the same width (e.g. from another thread or shard).
    pub fn merge(&mut self, other: &HessianAccumulator) -> Result<()> {
        if other.cols != self.cols {
            return Err(Error::Shape(format!(
                "cannot merge Hessians of widths {} and {}",
                self.cols, other.cols
            )));
        }
        for (s, o) in self.sum.iter_mut().zip(&other.sum) {
            *s += o;
        }
        self.n += other.n;
        Ok(())
    }

    /// `H = 2/n Σ x xᵀ` (row-major `cols x cols`, f64). Errors when no rows were added.
    pub fn hessian(&self) -> Result<Vec<f64>> {
        if self.n == 0 {
            return Err(Error::NoData(
                "Hessian accumulator saw no input rows".into(),
            ));
        }
        let f = 2.0 / self.n as f64;
        // Only the lower triangle (j <= i) of `sum` is accumulated.
        let c = self.cols;
        let mut h = vec![0f64; c * c];
        for i in 0..c {
            for j in 0..=i {
                let v = f * self.sum[i * c + j];
                h[i * c + j] = v;
                h[j * c + i] = v;
            }
        }
        Ok(h)
    }

    /// Rescale to the statistics of `X diag(s)⁻¹`: `sum_ij /= s_i s_j` (lengths and positivity
    /// of `s` are the caller's responsibility; see [`crate::stats::InputStats::divide_channels`]).
    pub(crate) fn divide_channels(&mut self, s: &[f32]) {
        let c = self.cols;
        for i in 0..c {
            for j in 0..c {
                self.sum[i * c + j] /= s[i] as f64 * s[j] as f64;
            }
        }
    }

    /// Diagonal of `H` (the mean squared activation per input channel, times 2).
    pub fn diag(&self) -> Vec<f64> {
        let f = if self.n == 0 {
            0.0
        } else {
            2.0 / self.n as f64
        };
        (0..self.cols)
            .map(|i| f * self.sum[i * self.cols + i])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_f64_reference_across_chunks() {
        // 7: one triangle block; 150: blocks of 64, 64 and 22.
        for c in [7, 150] {
            check_against_f64(2500, c);
        }
    }

    fn check_against_f64(n: usize, c: usize) {
        let x: Vec<f32> = (0..n * c)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        let mut acc = HessianAccumulator::new(c);
        acc.add_rows(&x[..1000 * c], 1000).unwrap();
        acc.add_rows(&x[1000 * c..], n - 1000).unwrap();
        let h = acc.hessian().unwrap();
        for i in 0..c {
            for j in 0..c {
                let r: f64 = (0..n)
                    .map(|t| x[t * c + i] as f64 * x[t * c + j] as f64)
                    .sum::<f64>()
                    * 2.0
                    / n as f64;
                assert!(
                    (h[i * c + j] - r).abs() <= 1e-5 * r.abs().max(1.0),
                    "{i},{j}"
                );
            }
        }
        assert_eq!(acc.n_samples(), n);
    }

    #[test]
    fn bad_input_is_rejected() {
        let mut acc = HessianAccumulator::new(3);
        assert!(matches!(acc.hessian(), Err(Error::NoData(_))));
        assert!(matches!(acc.add_rows(&[1.0; 5], 2), Err(Error::Shape(_))));
        assert!(matches!(
            acc.add_rows(&[1.0, f32::NAN, 0.0], 1),
            Err(Error::NonFinite { index: 1, .. })
        ));
    }
}
