//! GGUF block codecs: round trips with error bounds derived from each block format, typed
//! errors for bad sizes / hostile bytes / non-finite input, and no panics on garbage.
//!
//! Bit-exactness against ggml's C reference is checked by `cargo xtask golden` (the
//! `gguf_*.json` vectors); these tests need no external data.

use lowbit_numerics::gguf::{dequantize, quantize, GgmlType};
use lowbit_numerics::Error;

const CODEC_TYPES: [GgmlType; 14] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::IQ4_NL,
    GgmlType::MXFP4,
    GgmlType::NVFP4,
];

/// Deterministic xorshift generator.
struct Rng(u64);
impl Rng {
    fn u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Roughly Gaussian (sum of four uniforms), times `s`, with occasional 8x outliers.
    fn weight(&mut self, s: f32) -> f32 {
        let g = (self.unit() + self.unit() + self.unit() + self.unit() - 2.0) * 1.7;
        if self.u64() % 97 == 0 {
            g * s * 8.0
        } else {
            g * s
        }
    }
}

/// Test data: several blocks of Gaussian-like weights at different magnitudes, one
/// all-positive (offset) stretch and one all-zero stretch, 1024 elements in all.
fn data(seed: u64) -> Vec<f32> {
    let mut r = Rng(seed);
    let mut x: Vec<f32> = (0..1024)
        .map(|i| match i / 256 {
            0 => r.weight(0.02),
            1 => r.weight(1.5),
            2 => 3.0 + r.weight(0.5).abs(),
            _ => r.weight(1e-3),
        })
        .collect();
    x[768..800].fill(0.0);
    x
}

fn h(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

fn roundtrip(ty: GgmlType, x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut q = Vec::new();
    quantize(ty, x, &mut q).unwrap();
    assert_eq!(q.len(), ty.row_bytes(x.len()).unwrap());
    let mut y = vec![f32::NAN; x.len()];
    dequantize(ty, &q, &mut y).unwrap();
    (q, y)
}

/// Check |x - y| <= bound(block, index-in-block) for every element.
fn check_bound(ty: GgmlType, x: &[f32], bound: impl Fn(&[u8], &[f32], usize) -> f32) {
    let (q, y) = roundtrip(ty, x);
    let (bs, ts) = (ty.block_size(), ty.type_size());
    for (blk, (b, xb)) in q.chunks(ts).zip(x.chunks(bs)).enumerate() {
        for i in 0..bs {
            let e = (xb[i] - y[blk * bs + i]).abs();
            let lim = bound(b, xb, i);
            assert!(
                e <= lim,
                "{ty}: block {blk} elem {i}: x={} y={} err={e} > bound {lim}",
                xb[i],
                y[blk * bs + i]
            );
        }
    }
}

fn amax(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// f32 rounding slack for a value of magnitude `m`.
fn ulps(m: f32) -> f32 {
    m * 4.0 * f32::EPSILON
}

#[test]
fn q8_0_error_is_at_most_half_a_step() {
    for seed in 1..4 {
        check_bound(GgmlType::Q8_0, &data(seed), |b, xb, _| {
            // q = round(x / d) with d = amax/127 in f32; the stored d is f16-rounded, which moves
            // a code q (|q| <= 127) by at most 127·|d - dh|.
            let d = amax(xb) / 127.0;
            d / 2.0 + 127.0 * (d - h(b, 0)).abs() + ulps(amax(xb))
        });
    }
}

#[test]
fn q4_0_and_q5_0_error_within_one_step() {
    // d = max/-8 (or /-16): codes are round-half-up of x/d + 8, so |err| <= |d|/2, except the
    // side opposite to max, where code 16 (32) is clamped to 15 (31): |err| <= |d|.
    for (ty, half_range) in [(GgmlType::Q4_0, 8.0f32), (GgmlType::Q5_0, 16.0)] {
        check_bound(ty, &data(7), |b, xb, _| {
            let d = amax(xb) / half_range;
            d + half_range * (d - h(b, 0).abs()).abs() + ulps(amax(xb))
        });
    }
}

#[test]
fn q4_1_and_q5_1_error_at_most_half_a_step() {
    for (ty, levels) in [(GgmlType::Q4_1, 15.0f32), (GgmlType::Q5_1, 31.0)] {
        check_bound(ty, &data(11), |b, xb, _| {
            let min = xb.iter().copied().fold(f32::MAX, f32::min);
            let max = xb.iter().copied().fold(-f32::MAX, f32::max);
            let d = (max - min) / levels;
            // rounding to nearest code, plus the f16 rounding of d (times the code) and of min.
            d / 2.0 + levels * (d - h(b, 0)).abs() + (min - h(b, 2)).abs() + ulps(amax(xb))
        });
    }
}

/// Q4_K/Q5_K sub-block j's (scale, min) as stored (`get_scale_min_k4`).
fn k4_sub(b: &[u8], j: usize) -> (f32, f32) {
    let q = &b[4..16];
    let (sc, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    };
    (h(b, 0) * sc as f32, h(b, 2) * m as f32)
}

#[test]
fn q4_k_and_q5_k_error_at_most_half_a_sub_step_inside_the_sub_range() {
    // Final codes are nearest_int((x + m)/d) clamped to 0..=nmax against the stored sub-block
    // scale d and min m: inside [-m, nmax·d - m] the error is at most d/2.
    for (ty, nmax) in [(GgmlType::Q4_K, 15.0f32), (GgmlType::Q5_K, 31.0)] {
        let x = data(5);
        let (q, y) = roundtrip(ty, &x);
        let mut inside = 0usize;
        for (blk, b) in q.chunks(ty.type_size()).enumerate() {
            for i in 0..256 {
                let (d, m) = k4_sub(b, i / 32);
                let v = x[blk * 256 + i];
                if d > 0.0 && v >= -m && v <= nmax * d - m {
                    inside += 1;
                    let e = (v - y[blk * 256 + i]).abs();
                    assert!(
                        e <= d / 2.0 + ulps(v.abs() + m),
                        "{ty} blk {blk} {i}: err {e} d {d}"
                    );
                } else if d > 0.0 {
                    // Clipped by the (weighted-MSE) scale search: decodes to the nearer end.
                    let end = if v < -m { -m } else { nmax * d - m };
                    let got = y[blk * 256 + i];
                    assert!(
                        (got - end).abs() <= ulps(end.abs() + m),
                        "{ty} blk {blk} {i}"
                    );
                }
            }
        }
        // The scale search clips some outliers, never most of the data.
        assert!(
            inside >= 1024 * 3 / 4,
            "{ty}: only {inside} of 1024 in range"
        );
        // And the all-zero sub-block decodes to zeros.
        assert!(y[768..800].iter().all(|v| *v == 0.0), "{ty}");
    }
}

#[test]
fn q6_k_error_at_most_half_a_sub_step_inside_the_sub_range() {
    let x = data(9);
    let (q, y) = roundtrip(GgmlType::Q6_K, &x);
    let mut inside = 0usize;
    for (blk, b) in q.chunks(210).enumerate() {
        let d = h(b, 208);
        for i in 0..256 {
            let s = d * (b[192 + i / 16] as i8) as f32;
            let v = x[blk * 256 + i];
            let t = v / s;
            if s != 0.0 && (-32.0..=31.0).contains(&t) {
                inside += 1;
                let e = (v - y[blk * 256 + i]).abs();
                assert!(
                    e <= s.abs() / 2.0 + ulps(v.abs()),
                    "blk {blk} {i}: err {e} step {s}"
                );
            } else if s != 0.0 {
                // Clipped to the code range end (-32 or 31 steps).
                let end = s * t.clamp(-32.0, 31.0).round();
                let got = y[blk * 256 + i];
                assert!((got - end).abs() <= ulps(end.abs()), "blk {blk} {i}");
            }
        }
    }
    assert!(inside >= 1024 * 3 / 4, "only {inside} of 1024 in range");
    assert!(y[768..800].iter().all(|v| *v == 0.0));
}

#[test]
fn mxfp4_error_bound() {
    // scale s = 2^(floor(log2 amax) - 2), so |x|/s < 8: values up to 6s round to the nearest
    // E2M1 point (spacing <= 2s -> err <= s), values in (6s, 8s) clip to 6s (err < 2s).
    check_bound(GgmlType::MXFP4, &data(3), |b, _, _| {
        let s = 2f32.powi(b[0] as i32 - 127);
        2.0 * s
    });
}

#[test]
fn nvfp4_error_bound() {
    // Per 16 elements: s = UE4M3(amax/6) (relative rounding <= 1/16, half up); values within
    // 6s round to nearest (err <= spacing/2 <= s), larger ones clip to 6s.
    check_bound(GgmlType::NVFP4, &data(4), |b, xb, i| {
        let sub = i / 16;
        let w = b[sub];
        let (e, m) = ((w >> 3) as i32, (w & 7) as f32);
        let s = if e == 0 {
            m / 512.0
        } else {
            (1.0 + m / 8.0) * 2f32.powi(e - 7)
        };
        let a = amax(&xb[16 * sub..16 * sub + 16]);
        s.max(a - 6.0 * s) + ulps(a)
    });
}

#[test]
fn iq4_nl_error_bound() {
    // Codes are the nearest table entry for x/d with the stored d; table gaps are <= 24 and
    // the scale search keeps |x/d| within about the table range (127): err <= 12|d| inside,
    // and the clipped tail loses at most (|x| - 127|d|).
    check_bound(GgmlType::IQ4_NL, &data(6), |b, xb, i| {
        let d = h(b, 0).abs();
        // Codes are picked against the unrounded f32 scale, decoded with the f16 one
        // (relative difference <= 2^-11, times |code| <= 127).
        12.0 * d + 127.0 * d / 2048.0 + (xb[i].abs() - 113.0 * d).max(0.0) + ulps(amax(xb))
    });
}

#[test]
fn plain_float_types_round_trip() {
    let x = data(2);
    let (_, y) = roundtrip(GgmlType::F32, &x);
    assert_eq!(x, y);
    let (_, y) = roundtrip(GgmlType::F16, &x);
    for (a, b) in x.iter().zip(&y) {
        assert_eq!(*b, half::f16::from_f32(*a).to_f32());
    }
    let (_, y) = roundtrip(GgmlType::BF16, &x);
    for (a, b) in x.iter().zip(&y) {
        assert_eq!(*b, half::bf16::from_f32(*a).to_f32());
    }
}

#[test]
fn all_zero_input_decodes_to_zero() {
    for ty in CODEC_TYPES {
        let x = vec![0.0f32; 512];
        let (_, y) = roundtrip(ty, &x);
        assert!(y.iter().all(|v| *v == 0.0), "{ty}");
    }
}

#[test]
fn quantize_appends() {
    let x = data(8);
    let mut q = vec![0xAB; 3];
    quantize(GgmlType::Q8_0, &x, &mut q).unwrap();
    assert_eq!(&q[..3], &[0xAB; 3]);
    assert_eq!(q.len(), 3 + GgmlType::Q8_0.row_bytes(1024).unwrap());
}

#[test]
fn bad_sizes_are_typed_errors() {
    for ty in CODEC_TYPES {
        let bs = ty.block_size();
        let n = 4 * bs.max(32);
        let good = ty.row_bytes(n).unwrap();
        let bytes = vec![0u8; good + 1];
        let mut out = vec![0.0f32; n];
        // Truncated and over-long buffers.
        for len in [0, good - 1, good + 1] {
            assert_eq!(
                dequantize(ty, &bytes[..len], &mut out),
                Err(Error::BufferSize {
                    what: ty.name(),
                    expected: good,
                    got: len
                }),
                "{ty} len {len}"
            );
        }
        assert!(dequantize(ty, &bytes[..good], &mut out).is_ok());
        if bs > 1 {
            // Element counts that are not whole blocks.
            let mut odd = vec![0.0f32; n + 1];
            assert!(
                matches!(
                    dequantize(ty, &bytes[..good], &mut odd),
                    Err(Error::Shape(_))
                ),
                "{ty}"
            );
            let mut q = Vec::new();
            assert!(
                matches!(quantize(ty, &odd, &mut q), Err(Error::Shape(_))),
                "{ty}"
            );
            assert!(q.is_empty());
        }
    }
}

#[test]
fn non_finite_input_is_a_typed_error_for_block_types() {
    for ty in CODEC_TYPES.iter().copied().filter(|t| t.block_size() > 1) {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = data(1)[..512].to_vec();
            x[300] = bad;
            let mut q = vec![1u8];
            match quantize(ty, &x, &mut q) {
                Err(Error::NonFinite { index: 300, .. }) => {}
                other => panic!("{ty} {bad}: {other:?}"),
            }
            assert_eq!(q, vec![1u8], "{ty}: nothing appended on error");
        }
    }
}

#[test]
fn types_without_codec_give_typed_errors() {
    for ty in [
        GgmlType::Q2_K,
        GgmlType::Q8_K,
        GgmlType::IQ4_XS,
        GgmlType::TQ2_0,
    ] {
        let n = 256;
        let bytes = vec![0u8; ty.row_bytes(n).unwrap()];
        let mut out = vec![0.0; n];
        assert!(matches!(
            dequantize(ty, &bytes, &mut out),
            Err(Error::UnsupportedGgmlType { .. })
        ));
        assert!(matches!(
            quantize(ty, &out, &mut Vec::new()),
            Err(Error::UnsupportedGgmlType { .. })
        ));
    }
}

#[test]
fn hostile_bytes_decode_without_panic() {
    // Random bytes (NaN/Inf f16 scales, out-of-range codes, 0xFF E8M0/UE4M3 scales).
    let mut r = Rng(0xdead_beef);
    for ty in CODEC_TYPES {
        let n = 512.max(ty.block_size());
        let mut bytes: Vec<u8> = (0..ty.row_bytes(n).unwrap())
            .map(|_| r.u64() as u8)
            .collect();
        bytes[..4].fill(0xff);
        let mut out = vec![0.0; n];
        dequantize(ty, &bytes, &mut out).unwrap();
    }
}

#[test]
fn extreme_finite_inputs_do_not_panic() {
    let patterns: [&dyn Fn(usize) -> f32; 5] = [
        &|_| f32::MAX,
        &|i| if i % 2 == 0 { f32::MAX } else { -f32::MAX },
        &|i| f32::from_bits(1 + i as u32), // subnormals
        &|i| if i == 3 { 1e30 } else { 1e-30 },
        &|i| (i as f32) * 1e-38,
    ];
    for ty in CODEC_TYPES {
        for p in &patterns {
            let x: Vec<f32> = (0..512).map(p).collect();
            let mut q = Vec::new();
            quantize(ty, &x, &mut q).unwrap();
            let mut y = vec![0.0; 512];
            dequantize(ty, &q, &mut y).unwrap();
        }
    }
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> ProptestConfig {
        ProptestConfig {
            cases: 48,
            ..ProptestConfig::default()
        }
    }

    /// A codec type and a whole number of its blocks (1..=2 super-blocks' worth).
    fn ty_and_len() -> impl Strategy<Value = (GgmlType, usize)> {
        (0..CODEC_TYPES.len(), 1usize..3).prop_map(|(i, k)| {
            let ty = CODEC_TYPES[i];
            (ty, k * 256usize.max(ty.block_size()))
        })
    }

    proptest! {
        #![proptest_config(cfg())]

        /// Any bytes of the right length decode without panicking.
        #[test]
        fn arbitrary_bytes_decode((ty, n) in ty_and_len(), seed in any::<u64>()) {
            let mut r = Rng(seed | 1);
            let bytes: Vec<u8> = (0..ty.row_bytes(n).unwrap()).map(|_| r.u64() as u8).collect();
            let mut out = vec![0.0f32; n];
            prop_assert!(dequantize(ty, &bytes, &mut out).is_ok());
        }

        /// Any f32 bit patterns (NaN, Inf, subnormals, huge) either quantize or give the
        /// typed NonFinite error; never a panic, and what quantizes also decodes.
        #[test]
        fn arbitrary_floats_quantize_or_error((ty, n) in ty_and_len(), seed in any::<u64>(), finite in any::<bool>()) {
            let mut r = Rng(seed | 1);
            let x: Vec<f32> = (0..n)
                .map(|_| {
                    let v = f32::from_bits(r.u64() as u32);
                    if finite && !v.is_finite() { 1.0 } else { v }
                })
                .collect();
            let mut q = Vec::new();
            match quantize(ty, &x, &mut q) {
                Ok(()) => {
                    let mut y = vec![0.0f32; n];
                    prop_assert!(dequantize(ty, &q, &mut y).is_ok());
                }
                Err(Error::NonFinite { index, .. }) => {
                    prop_assert!(!x[index].is_finite());
                    prop_assert!(q.is_empty());
                }
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }

        /// Q8_0 and MXFP4 bounds on random data at random magnitudes (within the f16 range of
        /// Q8_0's scale: amax/127 must stay below 65504).
        #[test]
        fn q8_0_and_mxfp4_bounds(seed in any::<u64>(), mag in -24i32..16) {
            let mut r = Rng(seed | 1);
            let s = 2f32.powi(mag);
            let x: Vec<f32> = (0..256).map(|_| r.weight(s)).collect();
            let (q, y) = roundtrip(GgmlType::Q8_0, &x);
            for (blk, b) in q.chunks(34).enumerate() {
                let xb = &x[blk * 32..blk * 32 + 32];
                let d = amax(xb) / 127.0;
                let lim = d / 2.0 + 127.0 * (d - h(b, 0)).abs() + ulps(amax(xb));
                for i in 0..32 {
                    prop_assert!((xb[i] - y[blk * 32 + i]).abs() <= lim);
                }
            }
            let (q, y) = roundtrip(GgmlType::MXFP4, &x);
            for (blk, b) in q.chunks(17).enumerate() {
                let s = 2f32.powi(b[0] as i32 - 127);
                for i in 0..32 {
                    prop_assert!((x[blk * 32 + i] - y[blk * 32 + i]).abs() <= 2.0 * s);
                }
            }
        }
    }
}
