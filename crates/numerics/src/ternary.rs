//! Ternary ({-1, 0, +1}, BitNet b1.58) and binary ({-1, +1}) weights with one f32 scale per block.
//!
//! * Ternary: `scale = mean(|w|)` over the block (BitNet b1.58 "absmean"), `q = clamp(round(w /
//!   scale), -1, 1)` with ties to even, stored in 2 bits as `q + 1` (code 3 is invalid and
//!   rejected by dequantization). Value = `scale * q`. An all-zero block has scale 0.
//! * Binary: `scale = mean(|w|)` (XNOR-Net), `q = +1` for `w >= 0` else `-1`, stored in 1 bit
//!   (0 -> -1, 1 -> +1). Value = `scale * q`.
//!
//! Scheme names: `ternary` (per tensor, as BitNet), `ternary-pc` (per output channel),
//! `binary` (per output channel), `binary-pt`; any granularity works through [`crate::Scheme`].

use crate::tensor::{ElemFormat, Granularity, ScaleDtype, Scheme};

/// `mean(|w|)` with an f64 accumulator, rounded once to f32 (0 for an empty slice).
pub fn absmean(w: &[f32]) -> f32 {
    if w.is_empty() {
        return 0.0;
    }
    (w.iter().map(|&x| (x as f64).abs()).sum::<f64>() / w.len() as f64) as f32
}

/// A ternary scheme with the given granularity and f32 scales.
pub fn ternary_scheme(granularity: Granularity) -> Scheme {
    Scheme {
        elem: ElemFormat::Ternary,
        granularity,
        scale_dtype: ScaleDtype::F32,
        asymmetric: false,
        global_scale: false,
    }
}

/// A binary scheme with the given granularity and f32 scales.
pub fn binary_scheme(granularity: Granularity) -> Scheme {
    Scheme {
        elem: ElemFormat::Binary,
        granularity,
        scale_dtype: ScaleDtype::F32,
        asymmetric: false,
        global_scale: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absmean_matches_definition() {
        assert_eq!(absmean(&[1.0, -3.0, 0.0, 2.0]), 1.5);
        assert_eq!(absmean(&[]), 0.0);
    }
}
