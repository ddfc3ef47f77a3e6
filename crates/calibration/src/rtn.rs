//! Round-to-nearest (RTN): every scale block fitted from its own values (absmax, or an MSE
//! search over clipping ratios), then every weight rounded to the nearest grid point.

use crate::error::{check_finite, check_len, Result};
use crate::grid::{Clipping, Grid};
use lowbit_numerics::{QuantizedTensor, Scheme};

/// Options of [`rtn`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RtnConfig {
    /// How each block's scale is chosen (default: absmax, i.e. min/max for asymmetric).
    pub clipping: Clipping,
}

/// Round-to-nearest quantization of a `rows x cols` weight (`[out][in]`, row-major).
pub fn rtn(
    w: &[f32],
    rows: usize,
    cols: usize,
    scheme: &Scheme,
    cfg: &RtnConfig,
) -> Result<QuantizedTensor> {
    let (deq, grid, params) = rtn_parts(w, rows, cols, scheme, cfg)?;
    grid.finish(&deq, &params, None)
}

/// Round-to-nearest, returning the dequantized weight (what the quantized layer computes with)
/// instead of the packed tensor. Same validation as [`rtn`].
pub fn rtn_dequantized(
    w: &[f32],
    rows: usize,
    cols: usize,
    scheme: &Scheme,
    cfg: &RtnConfig,
) -> Result<Vec<f32>> {
    Ok(rtn_parts(w, rows, cols, scheme, cfg)?.0)
}

fn rtn_parts(
    w: &[f32],
    rows: usize,
    cols: usize,
    scheme: &Scheme,
    cfg: &RtnConfig,
) -> Result<(Vec<f32>, Grid, Vec<crate::grid::BlockParams>)> {
    check_len(w, rows, cols, "weight")?;
    check_finite(w, "weight")?;
    let grid = Grid::new(scheme, w, rows, cols, cfg.clipping)?;
    let (deq, params) = grid.rtn(w)?;
    Ok((deq, grid, params))
}
