//! NVFP4: E2M1 elements in 16-element blocks, an FP8 E4M3 block scale and an FP32 per-tensor
//! global scale.
//!
//! Stored as `Scheme { elem: Float(E2M1), granularity: PerGroup(16), scale_dtype: E4M3,
//! global_scale: true }`; a code decodes to `E2M1(code) * (scale / global_scale)` computed in f32
//! in that order (the compressed-tensors dequantization), where `scale` is the E4M3 block scale
//! (held as its exact f32 value) and `global_scale` the f32 `weight_global_scale`.
//!
//! # Formulas (all f32 arithmetic)
//! * [`Nvfp4Formula::CompressedTensors`] (default; bit-exact with compressed-tensors 0.20.0):
//!   `gs = (1 / max(amax, f32::MIN_POSITIVE)) * 2688` (2688 = 448 * 6; torch's `scalar / tensor`
//!   is a reciprocal then a multiply; NaN/Inf -> 1.0);
//!   `scale = E4M3_rne(clamp(gs * (block_amax / 6), ±448))`, a scale of 0 becomes the E4M3 eps
//!   0.125; element = `E2M1_rne(x / (scale / gs))` saturated at ±6. A `-0.0` input stores `+0`
//!   (code 0) while a negative value that rounds to zero stores `-0` (code 8).
//! * [`Nvfp4Formula::TransformerEngine`] (TE's `reference_nvfp4.py`): `gs = min(2688 / amax,
//!   f32::MAX)` (0 -> 1); `scale = E4M3(clamp(block_amax * (gs * (1/6)), 448))` (0 stays 0);
//!   element = `E2M1_rne(clamp(x * min(1 / (scale * (1 / gs)), f32::MAX), ±6))`.
//!
//! # Ragged rows
//! When `cols` is not a multiple of 16 the last block of a row is shorter (equivalent to zero
//! padding: zeros do not change the block max). NaN/±Inf inputs are an [`crate::Error::NonFinite`].

use crate::error::Result;
use crate::minifloat::{FloatFormat, Overflow};
use crate::rounding::Rounding;
use crate::tensor::{ElemFormat, Granularity, QuantizedTensor, ScaleDtype, Scheme};

/// Which stack's NVFP4 scale/element formula to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Nvfp4Formula {
    /// compressed-tensors 0.20.0 (the default; what vLLM checkpoints carry).
    #[default]
    CompressedTensors,
    /// TransformerEngine's reference recipe (multiplies by reciprocals; zero blocks keep scale 0).
    TransformerEngine,
}

/// The NVFP4 [`Scheme`].
pub fn nvfp4_scheme() -> Scheme {
    Scheme {
        elem: ElemFormat::Float(FloatFormat::E2M1),
        granularity: Granularity::PerGroup(16),
        scale_dtype: ScaleDtype::E4M3,
        asymmetric: false,
        global_scale: true,
    }
}

/// Largest |x| of a slice (NaN propagates as NaN): the integer maximum of the magnitude bits
/// (`fastq::max_mag_bits_slice`, AVX2 where present), chunks of 64 Ki elements in parallel.
pub(crate) fn abs_max(w: &[f32]) -> f32 {
    use rayon::prelude::*;
    fn seq(w: &[f32]) -> f32 {
        // the largest magnitude bits (AVX2 where present): above +Inf's bits only for a NaN
        let b = crate::fastq::max_mag_bits_slice(w);
        if b > 0x7f80_0000 {
            f32::NAN
        } else {
            f32::from_bits(b)
        }
    }
    w.par_chunks(1 << 16).map(seq).reduce(
        || 0.0,
        |a, b| {
            if a.is_nan() || b.is_nan() {
                f32::NAN
            } else {
                a.max(b)
            }
        },
    )
}

/// compressed-tensors' `weight_global_scale`: `(1 / max(amax, f32::MIN_POSITIVE)) * 2688` (f32, in
/// that order, as torch evaluates it), 1.0 when that is NaN or infinite.
pub fn global_scale_ct(w: &[f32]) -> f32 {
    let amax = abs_max(w);
    // torch evaluates `scalar / tensor` as `tensor.reciprocal() * scalar`
    let gs = (1.0 / amax.max(f32::MIN_POSITIVE)) * (448.0f32 * 6.0);
    if amax.is_nan() || !gs.is_finite() {
        1.0
    } else {
        gs
    }
}

/// TransformerEngine's global encode scale: `min(2688 / amax, f32::MAX)`, 1.0 when that is 0
/// (or NaN).
pub fn global_scale_te(w: &[f32]) -> f32 {
    let amax = abs_max(w);
    let gs = ((448.0f32 * 6.0) / amax).min(f32::MAX);
    if gs == 0.0 || gs.is_nan() {
        1.0
    } else {
        gs
    }
}

/// The E4M3 value nearest to `v` (ties to even, saturating at ±448): the reference, through
/// the element codec.
#[inline]
pub(crate) fn e4m3_round_ref(v: f32) -> f32 {
    let f = FloatFormat::E4M3;
    f.decode(f.encode(v, Rounding::NearestEven, Overflow::Saturate))
}

/// [`e4m3_round_ref`] by direct rounding of the f32 bits for `|v| <= 448` (three mantissa bits
/// kept, ties to even; below 2^-6 the subnormal grid of 2^-9); NaN and larger values go
/// through the reference. Same result for every input (tested exhaustively on a bit grid).
#[inline]
pub(crate) fn e4m3_round(v: f32) -> f32 {
    let a = v.abs();
    if a.is_nan() || a > 448.0 {
        return e4m3_round_ref(v);
    }
    let r = if a < 0.015625 {
        // a * 512 < 8 is exact; adding 1.5 * 2^23 rounds it to an integer, ties to even
        ((a * 512.0 + 12_582_912.0) - 12_582_912.0) * (1.0 / 512.0)
    } else {
        let b = a.to_bits();
        f32::from_bits((b + 0x7_FFFF + ((b >> 20) & 1)) & !0xF_FFFF)
    };
    r.copysign(v)
}

/// compressed-tensors block scale (E4M3 value) for a block max `amax` and global scale `gs`,
/// with the generic element max `elem_max` (6 for E2M1).
#[inline]
pub(crate) fn block_scale_ct(amax: f32, gs: f32, elem_max: f32) -> f32 {
    let s = e4m3_round((gs * (amax / elem_max)).clamp(-448.0, 448.0));
    if s == 0.0 {
        0.125
    } else {
        s
    }
}

/// TransformerEngine block scale (E4M3 value; may be 0).
#[inline]
pub(crate) fn block_scale_te(amax: f32, gs: f32, elem_max: f32) -> f32 {
    e4m3_round((amax * (gs * (1.0 / elem_max))).min(448.0))
}

/// Quantize to NVFP4 with an explicit formula. `w` is `rows x cols`, row-major.
///
/// ```
/// use lowbit_numerics::nvfp4::{quantize_nvfp4, Nvfp4Formula};
/// let w: Vec<f32> = (0..32).map(|i| i as f32 - 16.0).collect();
/// let q = quantize_nvfp4(&w, 2, 16, Nvfp4Formula::CompressedTensors).unwrap();
/// assert_eq!(q.global_scale, Some(2688.0 / 16.0));
/// let back = q.dequantize().unwrap();
/// assert_eq!(back[0], -16.0); // the block max is exact
/// ```
pub fn quantize_nvfp4(
    w: &[f32],
    rows: usize,
    cols: usize,
    formula: Nvfp4Formula,
) -> Result<QuantizedTensor> {
    let ctx = crate::quantize::Ctx {
        nvfp4: formula,
        ..crate::quantize::Ctx::default()
    };
    crate::quantize::quantize_ctx(w, rows, cols, &nvfp4_scheme(), &ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_round_fast_matches_reference() {
        let check = |v: f32| {
            let (f, r) = (e4m3_round(v), e4m3_round_ref(v));
            assert!(
                f.to_bits() == r.to_bits() || (f.is_nan() && r.is_nan()),
                "{v:e}: {f} vs {r}"
            );
        };
        // every f32 from 0 to past 448 on a grid of 13 ulps, both signs, plus edges
        let mut b = 0u32;
        while b <= 0x43F0_0000 {
            check(f32::from_bits(b));
            check(-f32::from_bits(b));
            b += 13;
        }
        for v in [
            0.0,
            -0.0,
            448.0,
            449.0,
            464.0,
            465.0,
            1e30,
            f32::INFINITY,
            f32::NAN,
            2f32.powi(-9),
            2f32.powi(-10),
            3.0 * 2f32.powi(-10),
            0.015625,
            0.0156249,
        ] {
            check(v);
            check(-v);
        }
    }

    #[test]
    fn ct_zero_block_gets_eps_scale() {
        assert_eq!(block_scale_ct(0.0, 100.0, 6.0), 0.125);
        assert_eq!(block_scale_te(0.0, 100.0, 6.0), 0.0);
        // 448 * 6 / 448 * 6 = exact
        assert_eq!(block_scale_ct(6.0, 448.0, 6.0), 448.0);
        assert_eq!(block_scale_ct(600.0, 448.0, 6.0), 448.0);
    }

    #[test]
    fn global_scales() {
        assert_eq!(global_scale_ct(&[0.0, -2.0, 1.0]), 1344.0);
        // 1/10 rounds up in f32, so this is one ulp above f32(268.8)
        assert_eq!(global_scale_ct(&[10.0]), (0.1f32 * 2688.0));
        assert_ne!(global_scale_ct(&[10.0]), 2688.0f32 / 10.0);
        // 2688 / f32::MIN_POSITIVE overflows to Inf -> 1.0
        assert_eq!(global_scale_ct(&[0.0]), 1.0);
        assert_eq!(global_scale_ct(&[f32::NAN]), 1.0);
        assert_eq!(global_scale_te(&[0.0]), f32::MAX);
        assert_eq!(global_scale_te(&[f32::INFINITY]), 1.0);
    }
}
