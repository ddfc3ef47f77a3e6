//! Scalar math the kernels' callers share, written so that loops over it vectorize.

/// `exp(x)` for f32 without a libm call or a branch, so that loops over it vectorize:
/// inputs are clamped to `[-87, 88]` (the normal range of the result; NaN reads as -87),
/// reduced to `r` in `[-ln2/2, ln2/2]`, a degree-7 Taylor polynomial of `r` is scaled by
/// `2^n` through the exponent bits. Relative error below 5e-7 over the whole range.
///
/// ```
/// let e = lowbit_kernels::math::exp_f32(1.0);
/// assert!((e - std::f32::consts::E).abs() < 1e-6);
/// ```
#[inline(always)]
// `max` then `min`, not `clamp`: a NaN input must read as -87 (an attention row whose scores
// are all -inf gives -inf - -inf), where `clamp` would pass the NaN on.
#[allow(clippy::manual_clamp)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer.
    let x = x.max(-87.0).min(88.0);
    let z = x * LOG2E + MAGIC;
    let n = z - MAGIC;
    let ni = (z.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    p * f32::from_bits(((ni + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_f64_over_its_range() {
        let mut worst = 0f64;
        for i in 0..=400_000 {
            let x = -87.0 + (i as f32) * (175.0 / 400_000.0);
            let e = (x as f64).exp();
            worst = worst.max((exp_f32(x) as f64 - e).abs() / e);
        }
        assert!(worst < 5e-7, "exp relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NEG_INFINITY) < 1e-37);
        assert!(exp_f32(f32::NAN) < 1e-37);
        assert!(exp_f32(1000.0) > 1e38);
    }
}
