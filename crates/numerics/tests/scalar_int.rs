//! Integer element codec properties against an f64 reference.

use lowbit_numerics::int::{quantize_int_slice, IntRounding};
use lowbit_numerics::{sr_bits, IntFormat, Rounding};
use proptest::prelude::*;

fn formats() -> impl Strategy<Value = IntFormat> {
    (2u32..=8, any::<bool>()).prop_map(|(b, s)| IntFormat::new(b, s).unwrap())
}

/// f64 reference: round(x / s) with the given tie rule, plus zero point, clamped.
fn reference(f: IntFormat, x: f32, s: f32, zp: i32, mode: Rounding) -> i32 {
    let v = (x / s) as f64; // the codec divides in f32; reproduce that one rounding
    let fl = v.floor();
    let r = if v - fl > 0.5 {
        fl + 1.0
    } else if v - fl < 0.5 {
        fl
    } else {
        match mode {
            Rounding::NearestEven => {
                if fl % 2.0 == 0.0 {
                    fl
                } else {
                    fl + 1.0
                }
            }
            Rounding::NearestAway => {
                if v > 0.0 {
                    fl + 1.0
                } else {
                    fl
                }
            }
        }
    };
    (r + zp as f64).clamp(f.qmin() as f64, f.qmax() as f64) as i32
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn matches_f64_reference(f in formats(), x in -300.0f32..300.0, s in 0.01f32..10.0, zp_frac in 0.0f64..1.0) {
        let zp = f.qmin() + ((f.qmax() - f.qmin()) as f64 * zp_frac).round() as i32;
        for mode in [Rounding::NearestEven, Rounding::NearestAway] {
            prop_assert_eq!(f.quantize(x, s, zp, mode), reference(f, x, s, zp, mode));
        }
    }

    #[test]
    fn ties_follow_the_mode(f in formats(), k in -20i32..20) {
        // x = k + 0.5 with scale 1: exact ties
        let x = k as f32 + 0.5;
        let zp = if f.is_signed() { 0 } else { 1 << (f.bits() - 1) };
        prop_assert_eq!(f.quantize(x, 1.0, zp, Rounding::NearestEven), reference(f, x, 1.0, zp, Rounding::NearestEven));
        prop_assert_eq!(f.quantize(x, 1.0, zp, Rounding::NearestAway), reference(f, x, 1.0, zp, Rounding::NearestAway));
    }

    #[test]
    fn error_at_most_half_a_step_in_range(f in formats(), u in 0.0f64..1.0, s in 0.01f32..10.0) {
        let zp = if f.is_signed() { 0 } else { (f.qmax() + 1) / 2 };
        let lo = (f.qmin() - zp) as f64 * s as f64;
        let hi = (f.qmax() - zp) as f64 * s as f64;
        let x = (lo + u * (hi - lo)) as f32;
        let q = f.quantize(x, s, zp, Rounding::NearestEven);
        let y = f.dequantize(q, s, zp) as f64;
        // half a step plus the f32 rounding of x / s and of the reconstruction
        prop_assert!((y - x as f64).abs() <= s as f64 * (0.5 + 1e-5), "{} -> {}", x, y);
    }

    #[test]
    fn saturates(f in formats(), big in 1.0f32..1e30) {
        let zp = 0;
        let x = (f.qmax() as f32 + 1.0) * big;
        prop_assert_eq!(f.quantize(x, 1.0, zp, Rounding::NearestEven), f.qmax());
        prop_assert_eq!(f.quantize(-x, 1.0, zp, Rounding::NearestEven), f.qmin());
    }

    #[test]
    fn monotone(f in formats(), a in -1e3f32..1e3, b in -1e3f32..1e3, s in 0.01f32..10.0) {
        let (a, b) = if a <= b { (a, b) } else { (b, a) };
        let zp = if f.is_signed() { 0 } else { 3.min(f.qmax()) };
        prop_assert!(f.quantize(a, s, zp, Rounding::NearestEven) <= f.quantize(b, s, zp, Rounding::NearestEven));
    }
}

/// Stochastic rounding mean → x. Each draw is floor(v) + Bernoulli(p), p = frac(v), variance
/// p(1-p) ≤ 1/4 (in steps); the mean of N draws has σ = sqrt(p(1-p)/N) steps. Accept 6σ
/// (false-failure probability ~2e-9 for a correct generator; fixed seed, deterministic).
#[test]
fn stochastic_mean_converges() {
    const N: usize = 40_000;
    let f = IntFormat::signed(4).unwrap();
    for (k, &(x, s)) in [(0.37f32, 0.1f32), (-0.51, 0.1), (0.2, 0.3), (-0.04, 0.05)]
        .iter()
        .enumerate()
    {
        let xs = vec![x; N];
        let mut q = vec![0i32; N];
        let mode = IntRounding::Stochastic {
            seed: 42 + k as u64,
            first_index: 0,
        };
        quantize_int_slice(f, &xs, s, 0, mode, &mut q).unwrap();
        let mean = q.iter().map(|&v| v as f64).sum::<f64>() / N as f64;
        let v = (x / s) as f64;
        let p = v - v.floor();
        let sigma = (p * (1.0 - p) / N as f64).sqrt();
        assert!(
            (mean - v).abs() <= 6.0 * sigma,
            "x={x} s={s}: mean {mean} vs {v}, σ {sigma}"
        );
        assert!(q
            .iter()
            .all(|&z| z == v.floor() as i32 || z == v.floor() as i32 + 1));
    }
    // counter-based: the same (seed, index) gives the same rounding
    assert_eq!(
        f.quantize_stochastic(0.5, 1.0, 0, sr_bits(1, 2)),
        f.quantize_stochastic(0.5, 1.0, 0, sr_bits(1, 2))
    );
}
