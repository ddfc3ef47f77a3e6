//! [`Grid`]: the one place where this crate talks to the numerics quantizers.
//!
//! Every algorithm here needs the same three operations on a target [`Scheme`]: fit the
//! parameters (scale, zero point) of one scale block from some values, quantize-dequantize one
//! value with given parameters, and finally pack a weight matrix whose values already sit on the
//! grid into a [`QuantizedTensor`]. [`Grid`] wraps them, plus the block geometry (which scale
//! block a weight belongs to), so GPTQ/AWQ/HQQ are written once for every format.

use crate::error::{Error, Result};
use lowbit_numerics::quantize::{self as nq, QuantOptions};
use lowbit_numerics::{Granularity, QuantizedTensor, Scheme};

pub use lowbit_numerics::quantize::{BlockParams, ScaleSearch as Clipping};

/// A target scheme bound to one weight matrix shape (and its global scale, for NVFP4).
#[derive(Debug, Clone)]
pub struct Grid {
    /// The target scheme.
    pub scheme: Scheme,
    /// Rows of the weight (output features).
    pub rows: usize,
    /// Columns of the weight (input features).
    pub cols: usize,
    /// Block height.
    pub block_rows: usize,
    /// Block width.
    pub block_cols: usize,
    /// Number of block columns per block row.
    pub grid_cols: usize,
    /// NVFP4-style per-tensor scale, computed once from the weight the grid was built for.
    pub global_scale: Option<f32>,
    clipping: Clipping,
}

impl Grid {
    /// Bind `scheme` to a `rows x cols` weight `w` (used only for the per-tensor global scale).
    pub fn new(
        scheme: &Scheme,
        w: &[f32],
        rows: usize,
        cols: usize,
        clipping: Clipping,
    ) -> Result<Self> {
        if rows == 0 || cols == 0 {
            return Err(Error::Shape(format!("empty weight {rows} x {cols}")));
        }
        let (br, bc) = scheme.granularity.block_shape(rows, cols);
        if br == 0 || bc == 0 {
            return Err(Error::Invalid("block size must be positive".into()));
        }
        if let Clipping::Mse { grid, min_ratio } = clipping {
            if grid == 0 || !(min_ratio > 0.0 && min_ratio <= 1.0) {
                return Err(Error::Invalid(format!(
                    "MSE clipping needs grid >= 1 and min_ratio in (0, 1], got {grid}, {min_ratio}"
                )));
            }
        }
        // Validates the scheme once (an invalid scheme fails here, not per element).
        nq::fit_block(&[0.0], scheme, Some(1.0), &QuantOptions::default())?;
        let global_scale = if scheme.global_scale {
            Some(nq::nvfp4_global_scale(w))
        } else {
            None
        };
        Ok(Grid {
            scheme: *scheme,
            rows,
            cols,
            block_rows: br,
            block_cols: bc,
            grid_cols: cols.div_ceil(bc),
            global_scale,
            clipping,
        })
    }

    /// Same grid with another clipping rule.
    pub fn with_clipping(&self, clipping: Clipping) -> Grid {
        Grid {
            clipping,
            ..self.clone()
        }
    }

    /// Whether each scale block lies inside one row (per-group / per-channel granularity).
    pub fn blocks_are_row_local(&self) -> bool {
        self.block_rows == 1
    }

    /// Index (into the row-major block grid) of the block of weight `(r, c)`.
    #[inline]
    pub fn block_of(&self, r: usize, c: usize) -> usize {
        (r / self.block_rows) * self.grid_cols + c / self.block_cols
    }

    /// Number of scale blocks.
    pub fn num_blocks(&self) -> usize {
        self.rows.div_ceil(self.block_rows) * self.grid_cols
    }

    /// Whether the granularity groups columns (so act-order needs group bookkeeping).
    pub fn is_grouped(&self) -> bool {
        matches!(
            self.scheme.granularity,
            Granularity::PerGroup(_) | Granularity::Block2d { .. }
        ) && self.block_cols < self.cols
    }

    /// Fit the parameters of one block from its values.
    pub fn fit(&self, vals: &[f32]) -> Result<BlockParams> {
        let opts = QuantOptions {
            scale_search: self.clipping,
            ..Default::default()
        };
        Ok(nq::fit_block(vals, &self.scheme, self.global_scale, &opts)?)
    }

    /// Quantize then dequantize one value.
    #[inline]
    pub fn quant(&self, x: f32, p: &BlockParams) -> f32 {
        nq::quantize_value(x, &self.scheme, p, self.global_scale).1
    }

    /// Fit every block of `w` (natural order) and return the parameters in block-grid order.
    pub fn fit_all(&self, w: &[f32]) -> Result<Vec<BlockParams>> {
        use rayon::prelude::*;
        let n_br = self.rows.div_ceil(self.block_rows);
        (0..n_br * self.grid_cols)
            .into_par_iter()
            .map_init(Vec::new, |buf, b| {
                let (br, bc) = (b / self.grid_cols, b % self.grid_cols);
                buf.clear();
                let r1 = ((br + 1) * self.block_rows).min(self.rows);
                let c0 = bc * self.block_cols;
                let c1 = (c0 + self.block_cols).min(self.cols);
                for r in br * self.block_rows..r1 {
                    buf.extend_from_slice(&w[r * self.cols + c0..r * self.cols + c1]);
                }
                self.fit(buf)
            })
            .collect()
    }

    /// Quantize-dequantize a whole matrix with per-block parameters (`g_idx` maps a column to
    /// its block column when given), through the numerics batch path.
    pub fn fake_quant(
        &self,
        w: &[f32],
        params: &[BlockParams],
        g_idx: Option<&[u32]>,
    ) -> Result<Vec<f32>> {
        let qt = self.finish(w, params, g_idx.map(|g| g.to_vec()))?;
        Ok(qt.dequantize()?)
    }

    /// Round-to-nearest of `w` with this grid's clipping: the dequantized weight and parameters.
    pub fn rtn(&self, w: &[f32]) -> Result<(Vec<f32>, Vec<BlockParams>)> {
        let opts = QuantOptions {
            scale_search: self.clipping,
            ..Default::default()
        };
        let qt = nq::quantize(w, self.rows, self.cols, &self.scheme, &opts)?;
        if qt.global_scale != self.global_scale {
            // `w` is not the weight this grid was built for: fit with this grid's global scale.
            let p = self.fit_all(w)?;
            return Ok((self.fake_quant(w, &p, None)?, p));
        }
        let params = qt
            .scales
            .iter()
            .enumerate()
            .map(|(b, &scale)| BlockParams {
                scale,
                zero_point: qt.zero_points.as_ref().map(|z| z[b]),
            })
            .collect();
        Ok((qt.dequantize()?, params))
    }

    /// Pack a weight whose values were produced by [`Grid::quant`] with `params` into a
    /// [`QuantizedTensor`].
    pub fn finish(
        &self,
        deq: &[f32],
        params: &[BlockParams],
        g_idx: Option<Vec<u32>>,
    ) -> Result<QuantizedTensor> {
        let scales: Vec<f32> = params.iter().map(|p| p.scale).collect();
        let zps: Option<Vec<u8>> = if self.scheme.asymmetric {
            Some(params.iter().map(|p| p.zero_point.unwrap_or(0)).collect())
        } else {
            None
        };
        Ok(nq::quantize_with_params(
            deq,
            self.rows,
            self.cols,
            &self.scheme,
            &scales,
            zps.as_deref(),
            self.global_scale,
            g_idx.as_deref(),
        )?)
    }
}
