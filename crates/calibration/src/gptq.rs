//! GPTQ (Frantar et al., 2022): quantize a linear layer column by column, spreading each
//! column's rounding error over the not-yet-quantized columns through the inverse Hessian of
//! the layer-wise objective `||W X − Q(W) X||²`.
//!
//! Steps as implemented (see `docs/algorithms.md`):
//! 1. `H = 2/n Σ x xᵀ` from [`HessianAccumulator`].
//! 2. Dead input channels (`H_ii == 0`): the weight column is zeroed and `H_ii = 1`.
//! 3. Act-order: columns sorted by descending `diag(H)` (stable sort).
//! 4. Damping: `H += λ I`, `λ = damp_percent · mean(diag H)`; if `H` is still not positive
//!    definite the relative damping is multiplied by 10 (up to `damp_retries` times), then a
//!    typed [`Error::NotPositiveDefinite`].
//! 5. `U` = upper Cholesky factor of `H⁻¹` (f64, [`crate::linalg`]), used in f32.
//! 6. Blocks of `block_size` columns: inside a block each column is rounded and its scaled error
//!    `e = (w − q) / U_ii` is subtracted from the block's later columns (`w_j −= e U_ij`); after
//!    the block the accumulated errors update all later columns at once with one GEMM
//!    ("lazy batch" updates).
//! 7. Group parameters: computed up front from the original weights ("static"; always so for
//!    per-channel, per-tensor and 2-D block scales), or when the sweep reaches the first column
//!    of a group from the current (error-compensated) weights ("dynamic": no act-order, or
//!    act-order with `g_idx`).

use crate::error::{check_finite, check_len, Error, Result};
use crate::grid::{BlockParams, Clipping, Grid};
use crate::hessian::HessianAccumulator;
use crate::linalg;
use lowbit_numerics::{QuantizedTensor, Scheme};
use rayon::prelude::*;

/// Column order and group bookkeeping of GPTQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActOrder {
    /// Natural column order; group parameters computed when the sweep reaches each group.
    Off,
    /// Columns processed by descending `diag(H)`; group parameters computed up front from the
    /// original weights in the natural grouping, so no `g_idx` is stored (llm-compressor's
    /// `actorder="static"`, used by the reference GPTQ W4A16 figure).
    #[default]
    Static,
    /// Columns processed by descending `diag(H)`; groups are consecutive runs of the permuted
    /// order with parameters computed when reached, and `g_idx` maps each column to its group
    /// (the original GPTQ `act_order=True` + `desc_act`, llm-compressor `actorder="group"`).
    /// Needs row-local scale blocks (per-group granularity).
    Group,
}

/// Options of GPTQ.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqConfig {
    /// Relative damping `λ / mean(diag H)` (default 0.01, as in the paper and llm-compressor).
    pub damp_percent: f64,
    /// How many times the relative damping is multiplied by 10 when `H + λI` is not positive
    /// definite before giving up (default 3: 0.01 → 0.1 → 1 → 10).
    pub damp_retries: usize,
    /// Columns per lazy-update block (default 128).
    pub block_size: usize,
    /// Column order (default [`ActOrder::Static`]).
    pub act_order: ActOrder,
    /// How block scales are fitted (default absmax; GPTQ's error feedback already
    /// compensates rounding, clipping search is rarely worth it).
    pub clipping: Clipping,
}

impl Default for GptqConfig {
    fn default() -> Self {
        GptqConfig {
            damp_percent: 0.01,
            damp_retries: 3,
            block_size: 128,
            act_order: ActOrder::Static,
            clipping: Clipping::AbsMax,
        }
    }
}

/// The layer-independent part of GPTQ for one input: dead channels, column order and the
/// inverse-Hessian factor. Linears that share an input (q/k/v; gate/up) share one of these.
#[derive(Debug, Clone)]
pub struct PreparedHessian {
    n: usize,
    /// Processing order: position `i` handles input column `perm[i]`.
    pub perm: Vec<usize>,
    /// Input channels whose Hessian diagonal was zero (their weights are zeroed).
    pub dead: Vec<usize>,
    /// Upper Cholesky factor of the damped `H⁻¹`, permuted, row-major f32.
    u: Vec<f32>,
    /// Absolute damping that succeeded.
    pub damp: f64,
    /// Relative damping that succeeded (`damp / mean(diag H)`).
    pub rel_damp: f64,
    /// The act-order mode the column order was built for.
    pub act_order: ActOrder,
}

impl PreparedHessian {
    /// Input width.
    pub fn cols(&self) -> usize {
        self.n
    }
}

/// Result of GPTQ on one linear layer.
#[derive(Debug, Clone)]
pub struct GptqResult {
    /// The quantized weight.
    pub tensor: QuantizedTensor,
    /// The same weight dequantized (`[out][in]`), for the next layer's calibration inputs.
    pub dequantized: Vec<f32>,
    /// GPTQ's own loss `Σ (w − q)² / (2 U_ii²)` over all weights (the increase of the
    /// layer-wise objective as estimated by the OBS update).
    pub loss: f64,
}

/// Prepare a Hessian for GPTQ: dead channels, act-order permutation, damping with retries and
/// the `H⁻¹` factor. `h` is the `n x n` row-major matrix from [`HessianAccumulator::hessian`].
pub fn prepare_hessian(h: &[f64], n: usize, cfg: &GptqConfig) -> Result<PreparedHessian> {
    if h.len() != n * n || n == 0 {
        return Err(Error::Shape(format!(
            "Hessian has {} entries, expected {n}^2",
            h.len()
        )));
    }
    if let Some(index) = h.iter().position(|x| !x.is_finite()) {
        return Err(Error::NonFinite {
            what: "Hessian",
            index,
        });
    }
    if !(cfg.damp_percent >= 0.0 && cfg.damp_percent.is_finite()) || cfg.block_size == 0 {
        return Err(Error::Invalid(format!(
            "damp_percent must be finite and >= 0 and block_size > 0 (got {}, {})",
            cfg.damp_percent, cfg.block_size
        )));
    }
    let mut h = h.to_vec();
    let mut dead = Vec::new();
    for i in 0..n {
        if h[i * n + i] <= 0.0 {
            // A channel that is always zero: its row/column of H is zero too.
            dead.push(i);
            for j in 0..n {
                h[i * n + j] = 0.0;
                h[j * n + i] = 0.0;
            }
            h[i * n + i] = 1.0;
        }
    }
    let diag: Vec<f64> = (0..n).map(|i| h[i * n + i]).collect();
    let mut perm: Vec<usize> = (0..n).collect();
    if cfg.act_order != ActOrder::Off {
        perm.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]));
    }
    let mut hp = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            hp[i * n + j] = h[perm[i] * n + perm[j]];
        }
    }
    let mean_diag = diag.iter().sum::<f64>() / n as f64;
    let mut rel = cfg.damp_percent;
    let mut attempt = 0;
    loop {
        let damp = rel * mean_diag;
        let mut hd = hp.clone();
        for i in 0..n {
            hd[i * n + i] += damp;
        }
        match linalg::inverse_cholesky_upper(&hd, n) {
            Ok(u) => {
                let u = u.iter().map(|&x| x as f32).collect();
                return Ok(PreparedHessian {
                    n,
                    perm,
                    dead,
                    u,
                    damp,
                    rel_damp: rel,
                    act_order: cfg.act_order,
                });
            }
            Err(Error::NotPositiveDefinite { pivot, value, .. }) => {
                if attempt >= cfg.damp_retries {
                    return Err(Error::NotPositiveDefinite {
                        damp,
                        rel_damp: rel,
                        pivot: perm[pivot],
                        value,
                    });
                }
                attempt += 1;
                rel = if rel > 0.0 { rel * 10.0 } else { 0.01 };
            }
            Err(e) => return Err(e),
        }
    }
}

/// GPTQ of one linear layer from its input statistics (convenience wrapper around
/// [`prepare_hessian`] + [`gptq_prepared`]).
pub fn gptq(
    w: &[f32],
    rows: usize,
    cols: usize,
    scheme: &Scheme,
    hessian: &HessianAccumulator,
    cfg: &GptqConfig,
) -> Result<GptqResult> {
    if hessian.cols() != cols {
        return Err(Error::Shape(format!(
            "Hessian width {} does not match weight columns {cols}",
            hessian.cols()
        )));
    }
    let prep = prepare_hessian(&hessian.hessian()?, cols, cfg)?;
    gptq_prepared(w, rows, cols, scheme, &prep, cfg)
}

/// GPTQ of one `rows x cols` linear layer (`[out][in]`) with a prepared Hessian of its input.
/// `cfg.act_order` must match the one `prep` was built with.
pub fn gptq_prepared(
    w: &[f32],
    rows: usize,
    cols: usize,
    scheme: &Scheme,
    prep: &PreparedHessian,
    cfg: &GptqConfig,
) -> Result<GptqResult> {
    check_len(w, rows, cols, "weight")?;
    check_finite(w, "weight")?;
    let n = cols;
    if prep.n != n {
        return Err(Error::Shape(format!(
            "prepared Hessian width {} does not match weight columns {n}",
            prep.n
        )));
    }
    if prep.act_order != cfg.act_order {
        return Err(Error::Invalid(format!(
            "Hessian prepared for act-order {:?}, config asks {:?}",
            prep.act_order, cfg.act_order
        )));
    }
    if cfg.block_size == 0 {
        return Err(Error::Invalid("block_size must be positive".into()));
    }
    // Original weights with dead columns zeroed.
    let mut w0 = w.to_vec();
    for &d in &prep.dead {
        for r in 0..rows {
            w0[r * n + d] = 0.0;
        }
    }
    let grid = Grid::new(scheme, &w0, rows, cols, cfg.clipping)?;
    let dynamic =
        grid.is_grouped() && cfg.act_order != ActOrder::Static && grid.blocks_are_row_local();
    if cfg.act_order == ActOrder::Group && grid.is_grouped() && !grid.blocks_are_row_local() {
        return Err(Error::Unsupported(format!(
            "act-order {:?} computes group parameters during the sweep, which needs row-local \
             scale blocks; use ActOrder::Static with {:?}",
            cfg.act_order, scheme.granularity
        )));
    }
    let g = grid.block_cols;
    let gc = grid.grid_cols;
    let perm = &prep.perm;
    // Static parameters (natural grouping), or placeholders to be filled during the sweep.
    let mut params: Vec<BlockParams> = if dynamic {
        vec![
            BlockParams {
                scale: 1.0,
                zero_point: None
            };
            grid.num_blocks()
        ]
    } else {
        grid.fit_all(&w0)?
    };
    // Column block (of the natural grid) used by permuted position i, for static parameters.
    let static_bc: Vec<usize> = perm.iter().map(|&c| c / g).collect();

    let mut wp = vec![0f32; rows * n];
    wp.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
        for (i, v) in row.iter_mut().enumerate() {
            *v = w0[r * n + perm[i]];
        }
    });
    let mut qp = vec![0f32; rows * n];
    let mut row_loss = vec![0f64; rows];
    let u = &prep.u;
    let bs = cfg.block_size;
    let mut b0 = 0;
    let mut err = Vec::new();
    let mut ut = Vec::new();
    let mut upd = Vec::new();
    while b0 < n {
        let b1 = (b0 + bs).min(n);
        let w_blk = b1 - b0;
        err.clear();
        err.resize(rows * w_blk, 0f32);
        let fit_err = std::sync::Mutex::new(None);
        if dynamic {
            // Row-local blocks: each row carries its own parameters.
            wp.par_chunks_mut(n)
                .zip(qp.par_chunks_mut(n))
                .zip(err.par_chunks_mut(w_blk))
                .zip(params.par_chunks_mut(gc))
                .zip(row_loss.par_iter_mut())
                .for_each(|((((wrow, qrow), erow), prow), loss)| {
                    for i in b0..b1 {
                        if i % g == 0 {
                            let end = (i + g).min(n);
                            match grid.fit(&wrow[i..end]) {
                                Ok(p) => prow[i / g] = p,
                                Err(e) => {
                                    *fit_err.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                                    return;
                                }
                            }
                        }
                        let p = prow[i / g];
                        sweep_column(&grid, wrow, qrow, erow, loss, u, n, i, b0, b1, &p);
                    }
                });
        } else {
            let params = &params;
            let grid = &grid;
            wp.par_chunks_mut(n)
                .zip(qp.par_chunks_mut(n))
                .zip(err.par_chunks_mut(w_blk))
                .zip(row_loss.par_iter_mut())
                .enumerate()
                .for_each(|(r, (((wrow, qrow), erow), loss))| {
                    let rb = (r / grid.block_rows) * gc;
                    for i in b0..b1 {
                        let p = params[rb + static_bc[i]];
                        sweep_column(grid, wrow, qrow, erow, loss, u, n, i, b0, b1, &p);
                    }
                });
        }
        if let Some(e) = fit_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        // Lazy batch update of all later columns: W[:, b1..] -= E · U[b0..b1, b1..].
        if b1 < n {
            let rest = n - b1;
            ut.clear();
            ut.resize(rest * w_blk, 0f32);
            for t in 0..w_blk {
                let urow = &u[(b0 + t) * n + b1..(b0 + t + 1) * n];
                for (j, &v) in urow.iter().enumerate() {
                    ut[j * w_blk + t] = v;
                }
            }
            upd.clear();
            upd.resize(rows * rest, 0f32);
            lowbit_kernels::dense::matmul_wt(&err, &ut, &mut upd, rows, w_blk, rest)?;
            wp.par_chunks_mut(n)
                .zip(upd.par_chunks(rest))
                .for_each(|(wrow, urow)| {
                    for (x, d) in wrow[b1..].iter_mut().zip(urow) {
                        *x -= d;
                    }
                });
        }
        b0 = b1;
    }
    // Back to the natural column order.
    let mut deq = vec![0f32; rows * n];
    deq.par_chunks_mut(n)
        .zip(qp.par_chunks(n))
        .for_each(|(drow, qrow)| {
            for (i, &q) in qrow.iter().enumerate() {
                drow[perm[i]] = q;
            }
        });
    let g_idx = if dynamic && cfg.act_order == ActOrder::Group {
        let mut gi = vec![0u32; n];
        for (i, &c) in perm.iter().enumerate() {
            gi[c] = (i / g) as u32;
        }
        Some(gi)
    } else {
        None
    };
    let tensor = grid.finish(&deq, &params, g_idx)?;
    Ok(GptqResult {
        tensor,
        dequantized: deq,
        loss: row_loss.iter().sum(),
    })
}

/// Quantize permuted column `i` of one row and propagate its error inside the block.
#[allow(clippy::too_many_arguments)]
#[inline]
fn sweep_column(
    grid: &Grid,
    wrow: &mut [f32],
    qrow: &mut [f32],
    erow: &mut [f32],
    loss: &mut f64,
    u: &[f32],
    n: usize,
    i: usize,
    b0: usize,
    b1: usize,
    p: &BlockParams,
) {
    let x = wrow[i];
    let q = grid.quant(x, p);
    qrow[i] = q;
    let d = u[i * n + i];
    let e = (x - q) / d;
    *loss += 0.5 * (e as f64) * (e as f64);
    erow[i - b0] = e;
    let urow = &u[i * n + i + 1..i * n + b1];
    for (wj, &uij) in wrow[i + 1..b1].iter_mut().zip(urow) {
        *wj -= e * uij;
    }
}
