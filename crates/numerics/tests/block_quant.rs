//! Property tests of the block quantizers against independent f64 bounds and references.

use lowbit_numerics::mx::{floor_log2, mx_scheme, quantize_mx, MxOptions, MxScaleRule};
use lowbit_numerics::nf4::NF4_TABLE;
use lowbit_numerics::quantize::{quantize, quantize_with_params, QuantOptions, ScaleSearch};
use lowbit_numerics::{
    ElemFormat, Error, FloatFormat, Granularity, QuantizedTensor, Rounding, Scheme,
};
use proptest::prelude::*;

fn cfg() -> ProptestConfig {
    ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    }
}

fn matrix() -> impl Strategy<Value = (usize, usize, Vec<f32>)> {
    (1usize..5, 1usize..300, 0.001f32..100.0)
        .prop_flat_map(|(r, c, a)| (Just(r), Just(c), proptest::collection::vec(-a..a, r * c)))
}

fn block_of(q: &QuantizedTensor, r: usize, c: usize) -> usize {
    let (br, bc) = q.scheme.granularity.block_shape(q.rows, q.cols);
    let (_, gc) = q.grid();
    (r / br) * gc + c / bc
}

proptest! {
    #![proptest_config(cfg())]

    /// INT: every element within half a step (scale/2) of its input; the tiny slack covers the
    /// f32 rounding of the scale itself.
    #[test]
    fn int_error_within_half_step((rows, cols, w) in matrix(), bits in 2u8..=8, g in prop_oneof![Just(0usize), Just(7), Just(32), Just(128)], asym in any::<bool>()) {
        let gran = if g == 0 { Granularity::PerChannel } else { Granularity::PerGroup(g) };
        let s = Scheme { elem: ElemFormat::Int { bits }, granularity: gran, scale_dtype: lowbit_numerics::ScaleDtype::F32, asymmetric: asym, global_scale: false };
        let q = quantize(&w, rows, cols, &s, &QuantOptions::default()).unwrap();
        let d = q.dequantize().unwrap();
        for r in 0..rows {
            for c in 0..cols {
                let i = r * cols + c;
                let sc = q.scales[block_of(&q, r, c)] as f64;
                let err = (w[i] as f64 - d[i] as f64).abs();
                prop_assert!(err <= sc * 0.5 * (1.0 + 1e-5) + 1e-30, "bits {} asym {} err {} scale {}", bits, asym, err, sc);
            }
        }
        // idempotence: re-quantizing the dequantized values with the same parameters is exact
        let q2 = quantize_with_params(&d, rows, cols, &s, &q.scales, q.zero_points.as_deref(), None, None).unwrap();
        prop_assert_eq!(q2.dequantize().unwrap(), d);
    }

    /// MX (OCP floor rule): in-range elements within half an element step times the block scale;
    /// elements above max_norm * X are saturated exactly to it.
    #[test]
    fn mx_error_bound((rows, cols, w) in matrix(), f in 0usize..5, away in any::<bool>()) {
        let fmt = [FloatFormat::E2M1, FloatFormat::E2M3, FloatFormat::E3M2, FloatFormat::E4M3, FloatFormat::E5M2][f];
        let mbits = fmt.mantissa_bits() as i32;
        let emin = 1 - fmt.bias();
        let maxn = fmt.max_finite() as f64;
        let rounding = if away { Rounding::NearestAway } else { Rounding::NearestEven };
        let s = mx_scheme(ElemFormat::Float(fmt));
        let q = quantize_mx(&w, rows, cols, &s, &MxOptions { rule: MxScaleRule::Floor, rounding }).unwrap();
        let d = q.dequantize().unwrap();
        for r in 0..rows {
            for c in 0..cols {
                let i = r * cols + c;
                let x = q.scales[block_of(&q, r, c)] as f64;
                let y = w[i] as f64 / x;
                let err = (w[i] as f64 - d[i] as f64).abs();
                if y.abs() <= maxn {
                    let e = if y == 0.0 { emin } else { (y.abs().log2().floor() as i32).max(emin) };
                    let half = 2f64.powi(e - mbits) / 2.0 * x;
                    prop_assert!(err <= half * (1.0 + 1e-12), "{:?} x {} y {} err {} half {}", fmt, x, y, err, half);
                } else {
                    prop_assert_eq!(d[i].abs() as f64, maxn * x);
                }
            }
        }
        // re-quantizing the dequantized tensor reproduces it (same shared exponents)
        let q2 = quantize_mx(&d, rows, cols, &s, &MxOptions { rule: MxScaleRule::Floor, rounding }).unwrap();
        prop_assert_eq!(q2.dequantize().unwrap(), d);
    }

    /// NVFP4 and NF4: each element decodes to the nearest representable value of its block
    /// (f64 brute force over the 16 values), up to saturation.
    #[test]
    fn fp4_tables_nearest((rows, cols, w) in matrix(), nv in any::<bool>()) {
        let s = Scheme::from_name(if nv { "nvfp4" } else { "nf4-g64" }).unwrap();
        let q = quantize(&w, rows, cols, &s, &QuantOptions::default()).unwrap();
        let d = q.dequantize().unwrap();
        let e2m1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0f64];
        for r in 0..rows {
            for c in 0..cols {
                let i = r * cols + c;
                let sc = q.scales[block_of(&q, r, c)] as f64;
                let mult = if nv { sc / q.global_scale.unwrap() as f64 } else { sc };
                let cands: Vec<f64> = if nv {
                    e2m1.iter().flat_map(|&v| [v * mult, -v * mult]).collect()
                } else {
                    NF4_TABLE.iter().map(|&v| v as f64 * mult).collect()
                };
                let x = w[i] as f64;
                let best = cands.iter().map(|v| (x - v).abs()).fold(f64::INFINITY, f64::min);
                let err = (x - d[i] as f64).abs();
                prop_assert!(err <= best * (1.0 + 1e-5) + 1e-6 * mult, "x {} got {} best err {}", x, d[i], best);
            }
        }
        let q2 = quantize_with_params(&d, rows, cols, &s, &q.scales, None, q.global_scale, None).unwrap();
        prop_assert_eq!(q2.dequantize().unwrap(), d);
    }

    /// Arbitrary f32 bit patterns (NaN, Inf, subnormals) never panic, for every scheme: either a
    /// typed error or a tensor that validates and dequantizes.
    #[test]
    fn arbitrary_bits_never_panic(bits in proptest::collection::vec(any::<u32>(), 1..200), k in 0usize..12) {
        let names = ["int4-g128-asym", "int8-pc", "int3-g32-sym", "fp8-pc", "fp8-b128", "nvfp4", "mxfp4", "mxfp8-e5m2", "mxint8", "nf4-g64", "ternary", "binary"];
        let w: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let s = Scheme::from_name(names[k]).unwrap();
        for opts in [QuantOptions::default(), QuantOptions { scale_search: ScaleSearch::Mse { grid: 5, min_ratio: 0.5 }, ..Default::default() }] {
            if let Ok(q) = quantize(&w, 1, w.len(), &s, &opts) {
                q.validate().unwrap();
                let d = q.dequantize().unwrap();
                prop_assert_eq!(d.len(), w.len());
                if w.iter().all(|x| x.is_finite()) && !names[k].starts_with("mx") {
                    prop_assert!(d.iter().all(|x| !x.is_nan()));
                }
            } else {
                prop_assert!(w.iter().any(|x| !x.is_finite()));
            }
        }
    }
}

#[test]
fn ragged_2d_blocks_use_their_own_values() {
    let (rows, cols) = (200usize, 300usize);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0 + (i / cols) as f32 * 0.01)
        .collect();
    let s = Scheme::from_name("fp8-b128").unwrap();
    let q = quantize(&w, rows, cols, &s, &QuantOptions::default()).unwrap();
    assert_eq!(q.grid(), (2, 3));
    for bi in 0..2 {
        for bj in 0..3 {
            let mut amax = 0f32;
            for r in bi * 128..((bi + 1) * 128).min(rows) {
                for c in bj * 128..((bj + 1) * 128).min(cols) {
                    amax = amax.max(w[r * cols + c].abs());
                }
            }
            assert_eq!(q.scales[bi * 3 + bj], amax / 448.0);
        }
    }
    let d = q.dequantize().unwrap();
    for (i, (&x, &y)) in w.iter().zip(&d).enumerate() {
        let s = q.scales[(i / cols / 128) * 3 + (i % cols) / 128];
        let code = FloatFormat::E4M3.encode(
            x / s,
            Rounding::NearestEven,
            lowbit_numerics::Overflow::Saturate,
        );
        assert_eq!(y, FloatFormat::E4M3.decode(code) * s);
    }
}

#[test]
fn gptq_ragged_576() {
    let w: Vec<f32> = (0..576).map(|i| ((i * 37) % 97) as f32 - 48.0).collect();
    let q = quantize(
        &w,
        1,
        576,
        &Scheme::from_name("int4-g128-asym").unwrap(),
        &QuantOptions::default(),
    )
    .unwrap();
    assert_eq!(q.scales.len(), 5);
    let last = &w[512..];
    let (lo, hi) = last
        .iter()
        .fold((0f32, 0f32), |(a, b), &x| (a.min(x), b.max(x)));
    assert_eq!(q.scales[4], (hi - lo) / 15.0);
}

#[test]
fn truncated_and_hostile_tensors_are_errors() {
    let w: Vec<f32> = (0..256).map(|i| i as f32 / 10.0 - 12.0).collect();
    for n in [
        "int4-g64-asym",
        "nvfp4",
        "mxfp4",
        "nf4-g64",
        "int3-g128-sym",
    ] {
        let q = quantize(
            &w,
            2,
            128,
            &Scheme::from_name(n).unwrap(),
            &QuantOptions::default(),
        )
        .unwrap();
        let mut t = q.clone();
        t.data.truncate(t.data.len() - 1);
        assert!(
            matches!(t.dequantize(), Err(Error::BufferSize { .. })),
            "{n}"
        );
        let mut t = q.clone();
        t.scales.pop();
        assert!(t.dequantize().is_err());
        let mut out = vec![0f32; 128];
        assert!(t.dequantize_row(0, &mut out).is_err());
        let mut t = q.clone();
        t.g_idx = Some(vec![99; 128]);
        assert!(t.dequantize().is_err());
        assert!(t.dequantize_row(1, &mut out).is_err());
        let mut t = q.clone();
        if t.zero_points.is_some() {
            t.zero_points = None;
            assert!(t.dequantize().is_err());
            assert!(t.dequantize_row(0, &mut out).is_err());
        }
        assert!(q.dequantize_row(2, &mut out).is_err());
        assert!(q.dequantize_row(0, &mut out[..5]).is_err());
    }
}

#[test]
fn mx_nan_and_inf_make_nan_blocks() {
    let mut w = vec![1.0f32; 64];
    w[3] = f32::INFINITY;
    w[40] = f32::NAN;
    let q = quantize(
        &w,
        1,
        64,
        &Scheme::from_name("mxfp8-e4m3").unwrap(),
        &QuantOptions::default(),
    )
    .unwrap();
    assert!(q.scales[0].is_nan() && q.scales[1].is_nan());
    assert!(q.dequantize().unwrap().iter().all(|x| x.is_nan()));
    w[40] = 1.0;
    w[3] = 1.0;
    w[63] = 3.0e38;
    let q = quantize(
        &w,
        1,
        64,
        &Scheme::from_name("mxfp4").unwrap(),
        &QuantOptions::default(),
    )
    .unwrap();
    assert_eq!(q.scales[0], 0.25); // amax 1: floor(log2 1) - emax(E2M1) = -2
    assert_eq!(floor_log2(q.scales[1]), 127 - 2);
}

/// Stochastic rounding is unbiased: the mean of N rounded copies of x is within 5 sigma of x,
/// sigma = step * sqrt(f (1 - f) / N) with f the fractional position of x between two codes.
#[test]
fn stochastic_rounding_mean_converges() {
    let n = 20_000;
    let mut w = vec![0.3f32; n + 1];
    w[0] = 1.0; // amax -> scale 1/7, 0.3 * 7 = 2.1 -> f = 0.1
    let s = Scheme::from_name("int4-pc-sym").unwrap();
    let q = quantize(
        &w,
        1,
        n + 1,
        &s,
        &QuantOptions {
            stochastic_seed: Some(42),
            ..Default::default()
        },
    )
    .unwrap();
    let d = q.dequantize().unwrap();
    let mean = d[1..].iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let step = q.scales[0] as f64;
    let f = 0.3 / step - (0.3 / step).floor();
    let sigma = step * (f * (1.0 - f) / n as f64).sqrt();
    assert!(
        (mean - 0.3).abs() < 5.0 * sigma,
        "mean {mean} sigma {sigma}"
    );
    // the same seed gives the same codes whatever the thread count
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let q1 = pool.install(|| {
        quantize(
            &w,
            1,
            n + 1,
            &s,
            &QuantOptions {
                stochastic_seed: Some(42),
                ..Default::default()
            },
        )
        .unwrap()
    });
    assert_eq!(q1.data, q.data);
}

#[test]
fn bnb_packing_puts_first_element_high() {
    let w: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) / 31.5).collect();
    let q = lowbit_numerics::nf4::quantize_bnb(&w, 1, 64, 64, false).unwrap();
    let p = q.to_bnb_packed().unwrap();
    for (k, &b) in p.iter().enumerate() {
        assert_eq!(b >> 4, q.code(0, 2 * k).unwrap());
        assert_eq!(b & 15, q.code(0, 2 * k + 1).unwrap());
        assert_eq!(q.data[k] & 15, q.code(0, 2 * k).unwrap());
    }
    // -1 and +1 are exact table entries
    assert_eq!(q.code(0, 0).unwrap(), 0);
    assert_eq!(q.code(0, 63).unwrap(), 15);
    assert!(matches!(
        lowbit_numerics::nf4::quantize_bnb(&w, 2, 32, 64, false),
        Err(Error::Shape(_))
    ));
}

#[test]
fn quantize_with_params_rejects_bad_parameters() {
    let w = vec![0.5f32; 64];
    let s = Scheme::from_name("int4-g32-asym").unwrap();
    let ok = quantize_with_params(&w, 1, 64, &s, &[0.1, 0.1], Some(&[3, 4]), None, None);
    assert!(ok.is_ok());
    assert!(matches!(
        quantize_with_params(&w, 1, 64, &s, &[0.1], Some(&[3]), None, None),
        Err(Error::BufferSize { .. })
    ));
    assert!(quantize_with_params(&w, 1, 64, &s, &[0.1, 0.1], Some(&[3, 16]), None, None).is_err());
    assert!(quantize_with_params(&w, 1, 64, &s, &[0.1, 0.1], None, None, None).is_err());
    assert!(
        quantize_with_params(&w, 1, 64, &s, &[0.1, f32::NAN], Some(&[3, 4]), None, None).is_err()
    );
    let mx = Scheme::from_name("mxfp4").unwrap();
    assert!(quantize_with_params(&w, 1, 64, &mx, &[0.5, 0.3], None, None, None).is_err());
    assert!(quantize_with_params(&w, 1, 64, &mx, &[0.5, 0.25], None, None, None).is_ok());
    let nv = Scheme::from_name("nvfp4").unwrap();
    assert!(quantize_with_params(&w, 1, 64, &nv, &[1.0; 4], None, None, None).is_err());
    assert!(quantize_with_params(&w, 1, 64, &nv, &[1.0; 4], None, Some(448.0), None).is_ok());
}

#[test]
fn unknown_names_list_the_known_ones() {
    match Scheme::from_name("int4-g128-symmetric") {
        Err(Error::UnknownFormat { name, known }) => {
            assert_eq!(name, "int4-g128-symmetric");
            for n in [
                "int4-g128-sym",
                "nvfp4",
                "mxfp4",
                "nf4-g64",
                "fp8-b128",
                "ternary",
                "mxint8",
            ] {
                assert!(known.contains(n), "{n} missing from {known}");
            }
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn percentile_clipping_shrinks_scales_of_outlier_blocks() {
    let mut w: Vec<f32> = (0..128)
        .map(|i| ((i * 13) % 29) as f32 / 29.0 - 0.5)
        .collect();
    w[7] = 50.0;
    let s = Scheme::from_name("int4-pc-sym").unwrap();
    let base = quantize(&w, 1, 128, &s, &QuantOptions::default()).unwrap();
    let pct = quantize(
        &w,
        1,
        128,
        &s,
        &QuantOptions {
            scale_search: ScaleSearch::Percentile(99.0),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(base.scales[0], 50.0 / 7.0);
    // the 99th percentile (nearest rank 127 of 128) of |w| excludes the outlier
    assert!(pct.scales[0] < 0.5 / 7.0 + 1e-6, "{}", pct.scales[0]);
    // and the clipped outlier saturates at 7 * scale
    assert_eq!(pct.dequantize().unwrap()[7], 7.0 * pct.scales[0]);
}

#[test]
fn transformer_engine_nvfp4_keeps_zero_scales() {
    use lowbit_numerics::nvfp4::{quantize_nvfp4, Nvfp4Formula};
    let mut w = vec![0.0f32; 32];
    for (i, v) in w.iter_mut().enumerate().skip(16) {
        *v = i as f32 - 24.0;
    }
    let te = quantize_nvfp4(&w, 1, 32, Nvfp4Formula::TransformerEngine).unwrap();
    let ct = quantize_nvfp4(&w, 1, 32, Nvfp4Formula::CompressedTensors).unwrap();
    assert_eq!(te.scales[0], 0.0);
    assert_eq!(ct.scales[0], 0.125);
    assert_eq!(te.global_scale, Some(2688.0 / 8.0));
    // the non-zero block agrees between the two formulas here (exact powers of two)
    assert_eq!(
        te.dequantize().unwrap()[16..],
        ct.dequantize().unwrap()[16..]
    );
}
