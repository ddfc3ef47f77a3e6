//! Property and exhaustive tests of the minifloat codecs against an independent brute-force
//! reference (nearest value of the decode table, computed in f64), plus fast == reference.

use lowbit_numerics::minifloat::{encode_slice_stochastic, ALL_FLOAT_FORMATS};
use lowbit_numerics::{decode_slice, encode_slice, sr_bits, FloatFormat, Overflow, Rounding};
use proptest::prelude::*;

const SIGNED: [FloatFormat; 5] = [
    FloatFormat::E4M3,
    FloatFormat::E5M2,
    FloatFormat::E2M3,
    FloatFormat::E3M2,
    FloatFormat::E2M1,
];
const POLICIES: [Overflow; 2] = [Overflow::Saturate, Overflow::NonSaturating];
const MODES: [Rounding; 2] = [Rounding::NearestEven, Rounding::NearestAway];

/// Non-negative finite values of a signed format with their magnitude codes, ascending.
fn positive_grid(f: FloatFormat) -> Vec<(f64, u8)> {
    (0..=f.max_code())
        .map(|c| (f.decode(c) as f64, c))
        .collect()
}

/// Brute-force reference for signed formats: nearest grid value in f64, ties by `mode`
/// (even = code with LSB 0, away = larger magnitude). Overflow is decided IEEE-style: beyond
/// max there is a virtual next value max + (max - prev) with code max_code + 1; rounding to it
/// means overflow.
fn brute(f: FloatFormat, x: f32, mode: Rounding, overflow: Overflow) -> Option<u8> {
    if x.is_nan() {
        return None;
    }
    let sign = if x.is_sign_negative() {
        f.sign_mask()
    } else {
        0
    };
    let ax = (x as f64).abs();
    let mut grid = positive_grid(f);
    let n = grid.len();
    let top = grid[n - 1].0 + (grid[n - 1].0 - grid[n - 2].0);
    grid.push((top, f.max_code() + 1));
    let ovf = || {
        let sat = sign | f.max_code();
        match (overflow, f) {
            (Overflow::NonSaturating, FloatFormat::E4M3) => sign | 0x7F,
            (Overflow::NonSaturating, FloatFormat::E5M2) => sign | 0x7C,
            _ => sat,
        }
    };
    if ax.is_infinite() || ax > top {
        return Some(ovf());
    }
    // first grid point >= ax
    let hi = grid.iter().position(|&(v, _)| v >= ax).unwrap();
    let pick = if grid[hi].0 == ax || hi == 0 {
        grid[hi].1
    } else {
        let (lv, lc) = grid[hi - 1];
        let (hv, hc) = grid[hi];
        let (dl, dh) = (ax - lv, hv - ax);
        if dl < dh {
            lc
        } else if dh < dl {
            hc
        } else {
            match mode {
                Rounding::NearestEven => {
                    if lc & 1 == 0 {
                        lc
                    } else {
                        hc
                    }
                }
                Rounding::NearestAway => hc,
            }
        }
    };
    if pick > f.max_code() {
        Some(ovf())
    } else {
        Some(sign | pick)
    }
}

fn next_up(x: f32) -> f32 {
    let b = x.to_bits();
    if x == 0.0 {
        f32::from_bits(1)
    } else if x > 0.0 {
        f32::from_bits(b + 1)
    } else {
        f32::from_bits(b - 1)
    }
}
fn next_down(x: f32) -> f32 {
    -next_up(-x)
}

/// Every value, every midpoint, their f32 neighbours, both signs, overflow thresholds,
/// f32 subnormals and specials.
fn interesting(f: FloatFormat) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::new();
    let grid: Vec<f32> = (0..=f.max_code()).map(|c| f.decode(c)).collect();
    let mut pts = grid.clone();
    for w in grid.windows(2) {
        pts.push(((w[0] as f64 + w[1] as f64) / 2.0) as f32);
    }
    let max = f.max_finite();
    let step = grid[grid.len() - 1] - grid[grid.len() - 2];
    pts.extend([
        max + step / 2.0,
        max + step,
        max * 4.0,
        f.min_subnormal() / 2.0,
        1e30,
        1e-30,
    ]);
    for p in pts {
        let mut a = p;
        let mut b = p;
        for _ in 0..3 {
            a = next_up(a);
            b = next_down(b);
            v.extend([a, b]);
        }
        v.push(p);
    }
    v.extend([
        f32::from_bits(1),
        f32::from_bits(0x007F_FFFF),
        f32::from_bits(0x0040_0000),
        f32::MIN_POSITIVE,
        f32::MAX,
        f32::INFINITY,
        0.0,
    ]);
    let mut out: Vec<f32> = v.iter().flat_map(|&x| [x, -x]).collect();
    out.extend([
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7F80_0001),
        f32::from_bits(0xFFFF_FFFF),
    ]);
    out
}

#[test]
fn encode_matches_brute_force_on_edges() {
    for f in SIGNED {
        for ov in POLICIES {
            for mode in MODES {
                for x in interesting(f) {
                    let got = f.encode(x, mode, ov);
                    let reference = f.encode_reference(x, mode, ov);
                    assert_eq!(
                        got,
                        reference,
                        "{f:?} {ov:?} {mode:?} x={x:e} ({:#x})",
                        x.to_bits()
                    );
                    if let Some(want) = brute(f, x, mode, ov) {
                        assert_eq!(
                            got,
                            want,
                            "{f:?} {ov:?} {mode:?} x={x:e} ({:#x})",
                            x.to_bits()
                        );
                    } else {
                        // NaN input: NaN code where one exists, else the documented ∓0.
                        if f.has_nan() {
                            assert!(f.decode(got).is_nan());
                        } else {
                            assert_eq!(f.decode(got), 0.0);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn fast_equals_reference_on_a_strided_sweep_of_all_f32() {
    // 2^32 / 4099 ~ 1M bit patterns per format and policy, all exponents and signs.
    for f in ALL_FLOAT_FORMATS {
        for ov in POLICIES {
            let mut b: u64 = 0;
            while b < 1 << 32 {
                let x = f32::from_bits(b as u32);
                let fast = f.encode(x, Rounding::NearestEven, ov);
                let reference = f.encode_reference(x, Rounding::NearestEven, ov);
                assert_eq!(fast, reference, "{f:?} {ov:?} {:#x}", b);
                b += 4099;
            }
        }
    }
}

#[test]
fn slice_codec_matches_scalar() {
    for f in ALL_FLOAT_FORMATS {
        for ov in POLICIES {
            for mode in MODES {
                let xs = interesting(f);
                let mut codes = vec![0u8; xs.len()];
                encode_slice(f, &xs, &mut codes, mode, ov).unwrap();
                for (x, c) in xs.iter().zip(&codes) {
                    assert_eq!(*c, f.encode_reference(*x, mode, ov), "{f:?} {x:e}");
                }
                let mut back = vec![0f32; xs.len()];
                decode_slice(f, &codes, &mut back).unwrap();
                for (c, y) in codes.iter().zip(&back) {
                    let d = f.decode_reference(*c);
                    assert!(d.to_bits() == y.to_bits() || (d.is_nan() && y.is_nan()));
                }
            }
        }
    }
}

#[test]
fn every_code_round_trips() {
    for f in ALL_FLOAT_FORMATS {
        for c in 0..(1u32 << f.total_bits()) {
            let c = c as u8;
            let x = f.decode(c);
            assert_eq!(x.to_bits(), f.decode_reference(c).to_bits());
            if x.is_nan() {
                continue; // NaN payloads are not preserved
            }
            for ov in POLICIES {
                for mode in MODES {
                    // E5M2 ±Inf under Saturate becomes ±max by design.
                    if x.is_infinite() && ov == Overflow::Saturate {
                        continue;
                    }
                    assert_eq!(f.encode(x, mode, ov), c, "{f:?} code {c:#x}");
                }
            }
        }
    }
}

#[test]
fn e8m0_rules() {
    let f = FloatFormat::E8M0;
    let ne = Rounding::NearestEven;
    for c in 0u8..=254 {
        let x = f.decode(c);
        assert_eq!(x as f64, 2f64.powi(c as i32 - 127));
        assert_eq!(f.encode(x, ne, Overflow::NonSaturating), c);
    }
    for x in [0.0, -0.0, -1.0, f32::NEG_INFINITY, f32::NAN] {
        assert_eq!(f.encode(x, ne, Overflow::NonSaturating), 0xFF, "{x}");
    }
    assert_eq!(f.encode(-1.0, ne, Overflow::Saturate), 0x00);
    assert_eq!(f.encode(f32::INFINITY, ne, Overflow::Saturate), 0xFE);
    assert_eq!(f.encode(f32::MAX, ne, Overflow::NonSaturating), 0xFF);
    // Ties (significand 1.5) round up; just below rounds down.
    assert_eq!(f.encode(3.0, ne, Overflow::NonSaturating), 129);
    assert_eq!(f.encode(next_down(3.0), ne, Overflow::NonSaturating), 128);
}

fn finite_in_range(f: FloatFormat) -> impl Strategy<Value = f32> {
    let m = f.max_finite();
    prop_oneof![
        -m..=m,
        (-1.0f32..=1.0).prop_map(move |u| u * f.min_normal() * 2.0),
        any::<u32>()
            .prop_map(f32::from_bits)
            .prop_filter("in range", move |x| x.abs() <= m),
    ]
}

fn signed_format() -> impl Strategy<Value = FloatFormat> {
    prop::sample::select(SIGNED.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn monotone(f in signed_format(), a in any::<u32>(), b in any::<u32>()) {
        let (x, y) = (f32::from_bits(a), f32::from_bits(b));
        prop_assume!(!x.is_nan() && !y.is_nan());
        let (x, y) = if x <= y { (x, y) } else { (y, x) };
        for ov in POLICIES {
            for mode in MODES {
                let qx = f.decode(f.encode(x, mode, ov));
                let qy = f.decode(f.encode(y, mode, ov));
                if !qx.is_nan() && !qy.is_nan() {
                    prop_assert!(qx <= qy, "{:?} {} -> {}, {} -> {}", f, x, qx, y, qy);
                }
            }
        }
    }

    #[test]
    fn error_at_most_half_a_step(x in (0usize..5).prop_flat_map(|i| finite_in_range(SIGNED[i]).prop_map(move |x| (i, x)))) {
        let (i, x) = x;
        let f = SIGNED[i];
        let grid = positive_grid(f);
        let ax = (x as f64).abs();
        let hi = grid.iter().position(|&(v, _)| v >= ax).unwrap();
        let step = if hi == 0 { 0.0 } else { grid[hi].0 - grid[hi - 1].0 };
        for mode in MODES {
            let q = f.decode(f.encode(x, mode, Overflow::Saturate)) as f64;
            prop_assert!((q - x as f64).abs() <= step / 2.0, "{:?} {} -> {} step {}", f, x, q, step);
            prop_assert!(q == 0.0 || q.signum() == (x as f64).signum());
        }
    }

    #[test]
    fn saturation_at_max(f in signed_format(), k in 1.0f32..1e30) {
        let m = f.max_finite();
        let step = m - f.decode(f.max_code() - 1);
        let x = m + step / 2.0 + k * step; // strictly beyond the rounding threshold
        let mx = f.max_code();
        prop_assert_eq!(f.encode(x, Rounding::NearestEven, Overflow::Saturate), mx);
        prop_assert_eq!(f.encode(-x, Rounding::NearestEven, Overflow::Saturate), mx | f.sign_mask());
        let ns = f.encode(x, Rounding::NearestEven, Overflow::NonSaturating);
        match f {
            FloatFormat::E4M3 => prop_assert!(f.decode(ns).is_nan()),
            FloatFormat::E5M2 => prop_assert_eq!(f.decode(ns), f32::INFINITY),
            _ => prop_assert_eq!(ns, mx),
        }
    }

    #[test]
    fn stochastic_result_is_a_neighbour(x in (0usize..5).prop_flat_map(|i| finite_in_range(SIGNED[i]).prop_map(move |x| (i, x))), r in any::<u32>()) {
        let (i, x) = x;
        let f = SIGNED[i];
        let q = f.decode(f.encode_stochastic(x, r, Overflow::Saturate)) as f64;
        let down = f.decode(f.encode(x, Rounding::NearestEven, Overflow::Saturate)) as f64;
        // q must be one of the two neighbours of x: |q - x| < one step around x.
        let grid = positive_grid(f);
        let ax = (x as f64).abs();
        let hi = grid.iter().position(|&(v, _)| v >= ax).unwrap();
        let step = if hi == 0 { 0.0 } else { grid[hi].0 - grid[hi - 1].0 };
        prop_assert!((q - x as f64).abs() <= step, "{:?} x={} q={} rne={}", f, x, q, down);
    }
}

/// The stochastic mean converges to x.
///
/// Tolerance derivation: for x between neighbours a < b (step h = b - a, p = (x - a) / h), one
/// draw is a + h·Bernoulli(p), with variance h²·p(1-p) ≤ h²/4. The mean of N independent draws
/// has standard deviation σ = h·sqrt(p(1-p)/N). We accept |mean - x| ≤ 6σ (+ 1e-12·h for
/// floating-point summation): for a correct, unbiased generator the probability of a failure
/// is ~2e-9 per check (normal tail; N is large enough for the CLT). A rounding that is biased
/// by as little as 2% of a step at N = 40000 fails it (6σ ≤ 6·h/(2·200) = 0.015h). The seed is
/// fixed, so the test is deterministic.
#[test]
fn stochastic_mean_converges() {
    const N: usize = 40_000;
    let cases: &[(FloatFormat, f32)] = &[
        (FloatFormat::E4M3, 1.3),
        (FloatFormat::E4M3, -0.0123),
        (FloatFormat::E4M3, 300.0),
        (FloatFormat::E4M3, 0.0009), // subnormal range
        (FloatFormat::E5M2, 3.3e-5),
        (FloatFormat::E5M2, 1000.0),
        (FloatFormat::E2M1, 0.3),
        (FloatFormat::E2M1, -5.1),
        (FloatFormat::E2M3, 2.71),
        (FloatFormat::E3M2, 0.07),
        (FloatFormat::E8M0, 3.0),
        (FloatFormat::E8M0, 1e-3),
    ];
    for (k, &(f, x)) in cases.iter().enumerate() {
        let xs = vec![x; N];
        let mut codes = vec![0u8; N];
        encode_slice_stochastic(
            f,
            &xs,
            &mut codes,
            0xC0FFEE + k as u64,
            0,
            Overflow::Saturate,
        )
        .unwrap();
        let vals: Vec<f64> = codes.iter().map(|&c| f.decode(c) as f64).collect();
        let mean = vals.iter().sum::<f64>() / N as f64;
        let (a, b) = vals
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        let xd = x as f64;
        assert!(a <= xd && xd <= b, "{f:?} x={x}: draws in [{a}, {b}]");
        let h = b - a;
        let p = (xd - a) / h;
        let sigma = h * (p * (1.0 - p) / N as f64).sqrt();
        assert!(
            (mean - xd).abs() <= 6.0 * sigma + 1e-12 * h,
            "{f:?} x={x}: mean {mean}, |err| {} > 6σ = {}",
            (mean - xd).abs(),
            6.0 * sigma
        );
    }
}

#[test]
fn stochastic_slices_do_not_depend_on_chunking() {
    let xs: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.731).sin() * 10.0).collect();
    let mut whole = vec![0u8; xs.len()];
    encode_slice_stochastic(FloatFormat::E2M1, &xs, &mut whole, 5, 0, Overflow::Saturate).unwrap();
    let mut parts = vec![0u8; xs.len()];
    for (ci, (chunk, out)) in xs.chunks(77).zip(parts.chunks_mut(77)).enumerate() {
        encode_slice_stochastic(
            FloatFormat::E2M1,
            chunk,
            out,
            5,
            (ci * 77) as u64,
            Overflow::Saturate,
        )
        .unwrap();
    }
    assert_eq!(whole, parts);
    // and it is really random: the same x gets both neighbours
    let r0 = FloatFormat::E2M1.encode_stochastic(0.75, sr_bits(5, 0), Overflow::Saturate);
    let differs = (1..64).any(|i| {
        FloatFormat::E2M1.encode_stochastic(0.75, sr_bits(5, i), Overflow::Saturate) != r0
    });
    assert!(differs);
}
