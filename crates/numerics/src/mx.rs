//! OCP Microscaling (MX v1.0) block formats: MXFP8 (E4M3, E5M2), MXFP6 (E2M3, E3M2), MXFP4
//! (E2M1) and MXINT8, with 32-element blocks sharing one E8M0 power-of-two scale.
//!
//! # Shared exponent
//! The default rule is the spec / microxcaling algorithm: `shared_exp = floor(log2(amax)) -
//! emax_elem`, where `floor(log2(amax))` is read **exactly from the f32 bits** (also for f32
//! subnormals), `amax == 0` gives `-127`, the result is clamped below at `-127`, and a block whose
//! exponent would exceed `127` (any ±Inf or NaN in the block, or an f32 overflow) is a NaN block
//! (E8M0 code `0xFF`, every element decodes to NaN). Elements are `V / 2^shared_exp` rounded to
//! the element format (subnormals kept) and **saturated** to ±max_norm. Two rounding modes
//! ([`Rounding::NearestAway`] = microxcaling `"nearest"`, [`Rounding::NearestEven`] = `"even"`).
//!
//! Two round-the-scale-up variants used in practice are options ([`MxScaleRule`]):
//! TransformerEngine's `2^ceil(log2(amax / elem_max))` and compressed-tensors' / vLLM's rule that
//! rounds `amax` up to the next power of two when its significand is `>= 1.75`.
//!
//! # Storage
//! In a [`QuantizedTensor`] an MX tensor is `Scheme { elem, granularity: PerGroup(32),
//! scale_dtype: E8M0, .. }`; `scales` holds `2^shared_exp` as f32 (NaN for a NaN block). MXINT8 is
//! `ElemFormat::Int { bits: 8 }` with an E8M0 scale: code `u = q + 128` with `q` in `[-127, 127]`
//! and value `X * q / 64` (microxcaling's 1.6 fixed point).
//!
//! # Ragged rows
//! When `cols` is not a multiple of 32 the last block of each row is shorter; this is exactly
//! what zero padding to a multiple of 32 would give (zeros do not change a block's amax), so an
//! exporter may pad with zeros.

use crate::error::Result;
use crate::minifloat::FloatFormat;
use crate::rounding::Rounding;
use crate::tensor::{ElemFormat, Granularity, QuantizedTensor, ScaleDtype, Scheme};

/// How the shared E8M0 exponent of a block is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MxScaleRule {
    /// OCP MX / microxcaling: `floor(log2(amax)) - emax_elem` (the block max may be clipped).
    #[default]
    Floor,
    /// TransformerEngine (and ModelOpt MXFP4): `ceil(log2(amax / elem_max))` computed from the f32
    /// quotient's bits; never clips the block max.
    Ceil,
    /// compressed-tensors / vLLM: `amax` rounded up to the next power of two when its significand
    /// is `>= 1.75` (adds `1 << 21` to its bits and masks the mantissa), then `floor(log2) - emax_elem`.
    /// With this rule E2M1 elements also follow compressed-tensors' sign rule: a `-0.0` input
    /// stores `+0` (a negative value that rounds to zero still stores `-0`).
    RoundUp175,
}

/// Options of [`quantize_mx`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MxOptions {
    /// Shared-exponent rule.
    pub rule: MxScaleRule,
    /// Element rounding (microxcaling `"nearest"` = [`Rounding::NearestAway`], `"even"` = NearestEven).
    pub rounding: Rounding,
}

/// `floor(log2(|x|))` of a finite non-zero f32, exact from its bits (subnormals included).
#[inline]
pub fn floor_log2(x: f32) -> i32 {
    let b = x.to_bits() & 0x7FFF_FFFF;
    let e = (b >> 23) as i32;
    if e == 0 {
        let m = b & 0x7F_FFFF;
        // subnormal: value = m * 2^-149
        -149 + (31 - m.leading_zeros() as i32)
    } else {
        e - 127
    }
}

/// `2^e` as an f32 for `e` in `[-149, 127]` (exact; subnormal below -126).
#[inline]
pub fn pow2(e: i32) -> f32 {
    if e >= -126 {
        f32::from_bits(((e + 127) as u32) << 23)
    } else {
        f32::from_bits(1u32 << (e + 149))
    }
}

/// Largest exponent of the element format's normal range (`floor(log2(max_norm))`).
pub fn emax_elem(elem: ElemFormat) -> Option<i32> {
    match elem {
        ElemFormat::Float(FloatFormat::E2M1) | ElemFormat::Float(FloatFormat::E2M3) => Some(2),
        ElemFormat::Float(FloatFormat::E3M2) => Some(4),
        ElemFormat::Float(FloatFormat::E4M3) => Some(8),
        ElemFormat::Float(FloatFormat::E5M2) => Some(15),
        ElemFormat::Int { .. } => Some(0),
        _ => None,
    }
}

/// Largest element magnitude (`max_norm`): the float format's max finite, or `127/64` for MXINT8
/// (generally `(2^(b-1)-1) / 2^(b-2)`).
pub fn elem_max(elem: ElemFormat) -> Option<f32> {
    match elem {
        ElemFormat::Float(f) if f != FloatFormat::E8M0 => Some(f.max_finite()),
        ElemFormat::Int { bits } if (2..=8).contains(&bits) => {
            Some(((1u32 << (bits - 1)) - 1) as f32 / (1u32 << (bits - 2)) as f32)
        }
        _ => None,
    }
}

/// The shared exponent of a block with absolute maximum `amax` under `rule`, or `None` for a
/// NaN block (`amax` NaN/Inf, or an exponent above 127). The result is in `[-127, 127]`.
pub fn shared_exponent(amax: f32, emax: i32, max_norm: f32, rule: MxScaleRule) -> Option<i32> {
    if !amax.is_finite() {
        return None;
    }
    let amax = amax.abs();
    let e = match rule {
        MxScaleRule::Floor => {
            if amax == 0.0 {
                -127
            } else {
                floor_log2(amax) - emax
            }
        }
        MxScaleRule::RoundUp175 => {
            let r = f32::from_bits((amax.to_bits() + (1 << 21)) & 0xFF80_0000);
            if r == 0.0 {
                -127
            } else if r.is_infinite() {
                128 - emax
            } else {
                floor_log2(r) - emax
            }
        }
        MxScaleRule::Ceil => {
            let q = amax / max_norm;
            let b = q.to_bits();
            let biased = (b >> 23) as i32 + i32::from(b & 0x7F_FFFF != 0);
            // satfinite: at most 254 (2^127); 0 -> 2^-127
            biased.min(254) - 127
        }
    };
    if e > 127 {
        None
    } else {
        Some(e.max(-127))
    }
}

/// E2M1 code of `y` (already divided by the block scale), round-to-nearest-even with saturation
/// to ±6. `neg` gives the sign bit. Branch-free so that loops over it vectorize.
#[cfg(test)]
#[inline(always)]
pub(crate) fn e2m1_even(y: f32, neg: bool) -> u8 {
    let a = y.abs();
    let m = (a > 0.25) as u8
        + (a >= 0.75) as u8
        + (a > 1.25) as u8
        + (a >= 1.75) as u8
        + (a > 2.5) as u8
        + (a >= 3.5) as u8
        + (a > 5.0) as u8;
    m | (neg as u8) << 3
}

/// E2M1 code of `y`, round-to-nearest with ties away from zero, saturating.
#[cfg(test)]
#[inline(always)]
pub(crate) fn e2m1_away(y: f32, neg: bool) -> u8 {
    let a = y.abs();
    let m = (a >= 0.25) as u8
        + (a >= 0.75) as u8
        + (a >= 1.25) as u8
        + (a >= 1.75) as u8
        + (a >= 2.5) as u8
        + (a >= 3.5) as u8
        + (a >= 5.0) as u8;
    m | (neg as u8) << 3
}

const fn pred(x: f32) -> f32 {
    f32::from_bits(x.to_bits() - 1)
}

/// E2M1 magnitude code = number of these thresholds strictly below `|y|` (ties to even).
pub(crate) const E2M1_EVEN_T: [f32; 7] = [0.25, pred(0.75), 1.25, pred(1.75), 2.5, pred(3.5), 5.0];
/// E2M1 magnitude code thresholds for ties away from zero.
pub(crate) const E2M1_AWAY_T: [f32; 7] = [
    pred(0.25),
    pred(0.75),
    pred(1.25),
    pred(1.75),
    pred(2.5),
    pred(3.5),
    pred(5.0),
];

/// How the E2M1 sign bit is chosen.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum SignRule {
    /// The f32 sign bit (ml_dtypes / OCP: `-0.0` and negatives rounding to 0 give `-0`).
    Bit,
    /// `y < 0` (compressed-tensors: `-0.0` gives `+0`).
    Less,
}

/// Vectorizable E2M1 encoding of a block: `y = f(x)`, code = `#(thr < |y|) | sign << 3`.
/// Works in chunks of 64 with the threshold loop outermost so that the compiler vectorizes the
/// comparisons across elements.
#[inline(always)]
pub(crate) fn e2m1_encode_block(
    xs: &[f32],
    codes: &mut [u8],
    f: impl Fn(f32) -> f32,
    thr: &[f32; 7],
    sign: SignRule,
) {
    const CH: usize = 64;
    let mut a = [0f32; CH];
    let mut s = [0u32; CH];
    for (xc, cc) in xs.chunks(CH).zip(codes.chunks_mut(CH)) {
        let n = xc.len();
        let (a, s) = (&mut a[..n], &mut s[..n]);
        for ((a, s), &x) in a.iter_mut().zip(s.iter_mut()).zip(xc) {
            let y = f(x);
            *a = y.abs();
            *s = match sign {
                SignRule::Bit => y.to_bits() >> 31,
                SignRule::Less => u32::from(y < 0.0),
            } << 3;
        }
        for &t in thr {
            for (s, &a) in s.iter_mut().zip(a.iter()) {
                *s += u32::from(a > t);
            }
        }
        for (c, &s) in cc.iter_mut().zip(s.iter()) {
            *c = s as u8;
        }
    }
}

/// The [`Scheme`] of an MX format with 32-blocks: `elem` is a float element (E4M3, E5M2, E2M3,
/// E3M2, E2M1) or `Int { bits: 8 }` (MXINT8).
pub fn mx_scheme(elem: ElemFormat) -> Scheme {
    Scheme {
        elem,
        granularity: Granularity::PerGroup(32),
        scale_dtype: ScaleDtype::E8M0,
        asymmetric: false,
        global_scale: false,
    }
}

/// Quantize a `rows x cols` f32 matrix to an MX scheme (any [`Scheme`] with an E8M0 scale) with
/// explicit rule and rounding options. NaN and ±Inf inputs are allowed: they make their block a
/// NaN block. [`crate::quantize::quantize`] uses [`MxOptions::default`] with its own rounding.
///
/// ```
/// use lowbit_numerics::mx::{quantize_mx, mx_scheme, MxOptions};
/// use lowbit_numerics::{ElemFormat, FloatFormat};
/// let w: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) / 8.0).collect();
/// let q = quantize_mx(&w, 1, 64, &mx_scheme(ElemFormat::Float(FloatFormat::E2M1)), &MxOptions::default()).unwrap();
/// assert_eq!(q.scales.len(), 2);
/// // amax 3.9375 -> floor(log2) = 1, shared exponent 1 - 2 = -1
/// assert_eq!(q.scales[0], 0.5);
/// ```
pub fn quantize_mx(
    w: &[f32],
    rows: usize,
    cols: usize,
    scheme: &Scheme,
    opts: &MxOptions,
) -> Result<QuantizedTensor> {
    if scheme.scale_dtype != ScaleDtype::E8M0 {
        return Err(crate::Error::Invalid(format!(
            "quantize_mx needs an E8M0-scaled scheme, got {:?}",
            scheme.scale_dtype
        )));
    }
    let ctx = crate::quantize::Ctx {
        rounding: opts.rounding,
        mx_rule: opts.rule,
        ..crate::quantize::Ctx::default()
    };
    crate::quantize::quantize_ctx(w, rows, cols, scheme, &ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_log2_is_exact_at_binade_edges() {
        for k in -149..=127 {
            let p = pow2(k);
            assert_eq!(floor_log2(p), k, "2^{k}");
            if k > -149 {
                let below = f32::from_bits(p.to_bits() - 1);
                assert_eq!(floor_log2(below), k - 1, "prevfloat(2^{k})");
            }
            // f64 reference
            assert_eq!((p as f64).log2().floor() as i32, k);
        }
    }

    #[test]
    fn shared_exponent_rules() {
        // amax = 1.75 * 2^3 = 14 for E2M1 (emax 2, max 6)
        let r = |a: f32, rule| shared_exponent(a, 2, 6.0, rule);
        assert_eq!(r(14.0, MxScaleRule::Floor), Some(1));
        assert_eq!(r(14.0, MxScaleRule::RoundUp175), Some(2));
        assert_eq!(r(13.9, MxScaleRule::RoundUp175), Some(1));
        // ceil(log2(14/6)) = ceil(1.22) = 2
        assert_eq!(r(14.0, MxScaleRule::Ceil), Some(2));
        // exactly 6 * 2^k -> k
        assert_eq!(r(12.0, MxScaleRule::Ceil), Some(1));
        assert_eq!(r(0.0, MxScaleRule::Floor), Some(-127));
        assert_eq!(r(f32::INFINITY, MxScaleRule::Floor), None);
        assert_eq!(r(f32::NAN, MxScaleRule::Floor), None);
        assert_eq!(r(f32::MAX, MxScaleRule::Floor), Some(125));
        assert_eq!(
            shared_exponent(1e-45, 2, 6.0, MxScaleRule::Floor),
            Some(-127)
        );
    }

    #[test]
    fn e2m1_thresholds_match_f64_nearest() {
        let grid = [0.0f64, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        let mut y = 0.0f32;
        while y < 8.0 {
            // f64 reference: nearest grid point, ties to even code index
            let yd = y as f64;
            let mut best = 0;
            for (i, &g) in grid.iter().enumerate() {
                let d = (yd - g).abs();
                let db = (yd - grid[best]).abs();
                if d < db || (d == db && i % 2 == 0 && best % 2 == 1) {
                    best = i;
                }
            }
            assert_eq!(e2m1_even(y, false) as usize, best, "y = {y}");
            let mut away = 0;
            for (i, &g) in grid.iter().enumerate() {
                if (yd - g).abs() <= (yd - grid[away]).abs() {
                    away = i;
                }
            }
            assert_eq!(e2m1_away(y, false) as usize, away, "y = {y}");
            assert_eq!(e2m1_even(-y, true), best as u8 | 8);
            // the chunked block encoder agrees, also just beside every threshold
            for v in [
                y,
                f32::from_bits(y.to_bits() + 1),
                f32::from_bits(y.to_bits().max(1) - 1),
            ] {
                let mut c = [0u8; 2];
                e2m1_encode_block(&[v, -v], &mut c, |x| x, &E2M1_EVEN_T, SignRule::Bit);
                assert_eq!(c, [e2m1_even(v, false), e2m1_even(v, true)], "{v}");
                e2m1_encode_block(&[v, -v], &mut c, |x| x, &E2M1_AWAY_T, SignRule::Less);
                assert_eq!(c, [e2m1_away(v, false), e2m1_away(v, v != 0.0)], "{v}");
            }
            y += 0.125;
        }
    }
}
