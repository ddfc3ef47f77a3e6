//! Folding per-input-channel scales (AWQ, SmoothQuant) into the model.
//!
//! Both methods rewrite `y = W x` as `y = (W diag(s)) (diag(s)⁻¹ x)`: the linears that read
//! `x` get their columns multiplied by `s` ([`scale_columns`]), and the op that produces `x`
//! gets its output channels divided by `s`: an RMSNorm/LayerNorm weight
//! ([`divide_norm_weight`]) or the output rows of a preceding linear whose output feeds `x`
//! elementwise-linearly ([`divide_rows`]: `v_proj` before `o_proj` without GQA, `up_proj`
//! before `down_proj`).

use crate::error::{Error, Result};

fn check_scales(s: &[f32], n: usize) -> Result<()> {
    if s.len() != n {
        return Err(Error::Shape(format!("{} scales for {n} channels", s.len())));
    }
    if let Some(i) = s.iter().position(|&v| !(v.is_finite() && v > 0.0)) {
        return Err(Error::Invalid(format!(
            "scale {i} = {} is not finite and positive",
            s[i]
        )));
    }
    Ok(())
}

/// `W diag(s)`: multiply column `j` of a `rows x cols` weight by `s[j]`, in place.
pub fn scale_columns(w: &mut [f32], rows: usize, cols: usize, s: &[f32]) -> Result<()> {
    crate::error::check_len(w, rows, cols, "weight")?;
    check_scales(s, cols)?;
    for row in w.chunks_exact_mut(cols) {
        for (x, &f) in row.iter_mut().zip(s) {
            *x *= f;
        }
    }
    Ok(())
}

/// Divide a norm's per-channel weight by `s` (in place).
pub fn divide_norm_weight(gamma: &mut [f32], s: &[f32]) -> Result<()> {
    check_scales(s, gamma.len())?;
    for (g, &f) in gamma.iter_mut().zip(s) {
        *g /= f;
    }
    Ok(())
}

/// Divide output row `j` of a preceding `rows x cols` linear (and its bias, if any) by `s[j]`
/// (in place); `rows` must equal `s.len()`.
pub fn divide_rows(
    w: &mut [f32],
    rows: usize,
    cols: usize,
    bias: Option<&mut [f32]>,
    s: &[f32],
) -> Result<()> {
    crate::error::check_len(w, rows, cols, "weight")?;
    check_scales(s, rows)?;
    for (row, &f) in w.chunks_exact_mut(cols).zip(s) {
        for x in row {
            *x /= f;
        }
    }
    if let Some(b) = bias {
        divide_norm_weight(b, s)?;
    }
    Ok(())
}
