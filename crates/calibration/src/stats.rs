//! [`InputStats`]: every statistic of a linear layer's calibration inputs that the algorithms of
//! this crate need, gathered in one streaming pass: the Gram matrix / GPTQ Hessian, the mean
//! absolute value per channel (AWQ) and the maximum absolute value per channel (SmoothQuant).

use crate::error::{check_finite, Error, Result};
use crate::hessian::HessianAccumulator;

/// Streaming statistics of the inputs of one linear layer, or of several linears that read the
/// same input (q/k/v; gate/up).
#[derive(Debug, Clone)]
pub struct InputStats {
    /// `H = 2/n Σ x xᵀ` (GPTQ, AWQ's output-error objective, sensitivity).
    pub hessian: HessianAccumulator,
    abs_sum: Vec<f64>,
    abs_max: Vec<f32>,
}

impl InputStats {
    /// Empty statistics for inputs of width `cols`.
    pub fn new(cols: usize) -> Self {
        InputStats {
            hessian: HessianAccumulator::new(cols),
            abs_sum: vec![0.0; cols],
            abs_max: vec![0.0; cols],
        }
    }

    /// Input width.
    pub fn cols(&self) -> usize {
        self.abs_sum.len()
    }

    /// Number of input rows (tokens) seen.
    pub fn n_samples(&self) -> usize {
        self.hessian.n_samples()
    }

    /// Add a row-major `[n_rows][cols]` block of inputs.
    pub fn add_rows(&mut self, x: &[f32], n_rows: usize) -> Result<()> {
        let c = self.cols();
        if x.len() != n_rows * c {
            return Err(Error::Shape(format!(
                "input block has {} values, expected {n_rows} x {c}",
                x.len()
            )));
        }
        check_finite(x, "calibration inputs")?;
        self.hessian.add_rows(x, n_rows)?;
        for row in x.chunks_exact(c.max(1)) {
            for ((s, m), &v) in self
                .abs_sum
                .iter_mut()
                .zip(self.abs_max.iter_mut())
                .zip(row)
            {
                *s += v.abs() as f64;
                *m = m.max(v.abs());
            }
        }
        Ok(())
    }

    /// Merge statistics of the same width.
    pub fn merge(&mut self, other: &InputStats) -> Result<()> {
        self.hessian.merge(&other.hessian)?;
        for (a, b) in self.abs_sum.iter_mut().zip(&other.abs_sum) {
            *a += b;
        }
        for (a, b) in self.abs_max.iter_mut().zip(&other.abs_max) {
            *a = a.max(*b);
        }
        Ok(())
    }

    /// Turn these into the statistics of the inputs `X diag(s)⁻¹` (after the producer of the
    /// input was divided by `s`, as AWQ/SmoothQuant folding does).
    pub fn divide_channels(&mut self, s: &[f32]) -> Result<()> {
        let c = self.cols();
        if s.len() != c {
            return Err(Error::Shape(format!("{} scales for {c} channels", s.len())));
        }
        if let Some(i) = s.iter().position(|&v| !(v.is_finite() && v > 0.0)) {
            return Err(Error::Invalid(format!(
                "scale {i} = {} is not finite and positive",
                s[i]
            )));
        }
        self.hessian.divide_channels(s);
        for ((a, m), &f) in self.abs_sum.iter_mut().zip(self.abs_max.iter_mut()).zip(s) {
            *a /= f as f64;
            *m /= f;
        }
        Ok(())
    }

    /// Mean `|x_j|` per channel. Errors when no rows were added.
    pub fn abs_mean(&self) -> Result<Vec<f32>> {
        let n = self.n_samples();
        if n == 0 {
            return Err(Error::NoData("input statistics saw no rows".into()));
        }
        Ok(self
            .abs_sum
            .iter()
            .map(|&s| (s / n as f64) as f32)
            .collect())
    }

    /// Max `|x_j|` per channel. Errors when no rows were added.
    pub fn abs_max(&self) -> Result<Vec<f32>> {
        if self.n_samples() == 0 {
            return Err(Error::NoData("input statistics saw no rows".into()));
        }
        Ok(self.abs_max.clone())
    }
}
