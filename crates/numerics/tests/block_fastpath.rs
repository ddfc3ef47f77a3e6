//! The fast (fused, chunked, monomorphised) quantize/dequantize paths against straightforward
//! scalar references built from the per-value API: `fit_block` (the reference statistics pass)
//! for each block's parameters, `quantize_value` / `FloatFormat::encode` for each code, and
//! `(elem(code) - zero) * multiplier` for each dequantized value. Bit-exact comparisons.

use lowbit_numerics::quantize::{fit_block, quantize, quantize_value, QuantOptions};
use lowbit_numerics::{Error, FloatFormat, Overflow, QuantizedTensor, Rounding, Scheme};

const SCHEMES: &[&str] = &[
    "fp8-pc",
    "fp8-e5m2-pc",
    "int4-g128-asym",
    "int4-g128-sym",
    "int8-pc",
    "nvfp4",
    "mxfp4",
    "mxfp8-e4m3",
    "nf4-g64",
    "int4-g32-asym",
    "nf4-g16",
    // more shapes of the dispatched row kernels (src/fastq.rs)
    "nf4-g32",
    "int4-g16-asym",
    "int4-g64-sym-f16",
    "fp8-pc-bf16",
    "mxfp8-e5m2",
];

/// Deterministic varied data: weight-like values, exact zeros and -0.0, small integers and
/// halves (ties when the scale is a power of two), one large outlier per 97 values.
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            match (s >> 8) % 11 {
                0 => 0.0,
                1 => -0.0,
                2 => ((s >> 20) % 13) as f32 * 0.5 - 3.0,
                3 => ((s >> 20) % 9) as f32 - 4.0,
                _ if i % 97 == 5 => u * 40.0,
                _ => u * 0.05,
            }
        })
        .collect()
}

fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn check(name: &str, rows: usize, cols: usize, w: &[f32]) {
    let scheme = Scheme::from_name(name).unwrap();
    let opts = QuantOptions::default();
    let q = quantize(w, rows, cols, &scheme, &opts).unwrap();
    let (br, bc) = scheme.granularity.block_shape(rows, cols);
    assert_eq!(br, 1, "{name}: one-row blocks only here");
    let (_, gc) = q.grid();
    let bits = scheme.elem.bits();
    let codes = lowbit_numerics::pack::unpack(&q.data, rows, cols, bits).unwrap();
    let full = q.dequantize().unwrap();
    let mut row_out = vec![0f32; cols];
    for r in 0..rows {
        q.dequantize_row(r, &mut row_out).unwrap();
        for j in 0..gc {
            let (c0, c1) = (j * bc, ((j + 1) * bc).min(cols));
            let xs = &w[r * cols + c0..r * cols + c1];
            let p = fit_block(xs, &scheme, q.global_scale, &opts).unwrap();
            let b = r * gc + j;
            assert!(
                same(p.scale, q.scales[b]),
                "{name} r{r} g{j}: scale {} vs {}",
                q.scales[b],
                p.scale
            );
            if let Some(z) = &q.zero_points {
                assert_eq!(Some(z[b]), p.zero_point, "{name} r{r} g{j}: zero point");
            }
            for (k, &x) in xs.iter().enumerate() {
                let c = r * cols + c0 + k;
                let want = if let lowbit_numerics::ElemFormat::Float(
                    f @ (FloatFormat::E4M3 | FloatFormat::E5M2),
                ) = scheme.elem
                {
                    if scheme.scale_dtype == lowbit_numerics::ScaleDtype::F32 && p.scale > 0.0 {
                        // the per-element scalar codec
                        f.encode(x / p.scale, Rounding::NearestEven, Overflow::Saturate)
                    } else {
                        quantize_value(x, &scheme, &p, q.global_scale).0
                    }
                } else {
                    quantize_value(x, &scheme, &p, q.global_scale).0
                };
                assert_eq!(codes[c], want, "{name} r{r} c{}: x = {x:e}", c0 + k);
                let v = reference_value(&q, codes[c], b);
                assert!(
                    same(full[c], v),
                    "{name} ({r},{}) dequantize {} vs {v}",
                    c0 + k,
                    full[c]
                );
                assert!(
                    same(row_out[c0 + k], v),
                    "{name} ({r},{}) dequantize_row",
                    c0 + k
                );
            }
        }
    }
}

/// `(elem(code) - zero) * multiplier`, written out per format.
fn reference_value(q: &QuantizedTensor, code: u8, b: usize) -> f32 {
    use lowbit_numerics::{ElemFormat, ScaleDtype};
    let s = q.scales[b];
    let s = match q.scheme.scale_dtype {
        ScaleDtype::E4M3 => s / q.global_scale.unwrap(),
        _ => s,
    };
    match q.scheme.elem {
        ElemFormat::Int { bits } => {
            let z = match &q.zero_points {
                Some(z) => z[b] as f32,
                None => (1u32 << (bits - 1)) as f32,
            };
            (code as f32 - z) * s
        }
        ElemFormat::Float(f) => (f.decode(code) - 0.0) * s,
        ElemFormat::Nf4 => (lowbit_numerics::nf4::NF4_TABLE[code as usize] - 0.0) * s,
        _ => unreachable!(),
    }
}

#[test]
fn fast_paths_match_scalar_reference() {
    for (i, &(rows, cols)) in [
        (3usize, 576usize),
        (2, 16),
        (4, 31),
        (2, 100),
        (3, 129),
        (1, 1),
        (2, 4096),
    ]
    .iter()
    .enumerate()
    {
        let w = data(rows * cols, 0x9E37_79B9_7F4A_7C15 ^ i as u64);
        for name in SCHEMES {
            check(name, rows, cols, &w);
        }
    }
}

#[test]
fn all_zero_and_tiny_blocks() {
    let mut w = vec![0f32; 2 * 160];
    w[170] = -0.0;
    w[200] = 1e-40; // subnormal
    w[201] = -3e-39;
    for name in SCHEMES {
        check(name, 2, 160, &w);
    }
}

#[test]
fn non_finite_reports_first_index() {
    for name in [
        "fp8-pc",
        "int4-g128-asym",
        "nvfp4",
        "nf4-g64",
        "int4-g128-sym",
    ] {
        let scheme = Scheme::from_name(name).unwrap();
        for (bad_at, bad) in [
            (0usize, f32::NAN),
            (300, f32::INFINITY),
            (1000, f32::NEG_INFINITY),
        ] {
            let mut w = data(4 * 300, 7);
            w[bad_at] = bad;
            w[1100] = f32::NAN; // a later one must not be the reported one
            match quantize(&w, 4, 300, &scheme, &QuantOptions::default()) {
                Err(Error::NonFinite { index, value, .. }) => {
                    assert_eq!(index, bad_at, "{name}");
                    assert!(same(value, bad), "{name}");
                }
                other => panic!("{name}: expected NonFinite, got {other:?}"),
            }
        }
    }
    // MX keeps NaN blocks (spec): NaN scale, same as the block fit
    let mut w = data(2 * 64, 3);
    w[40] = f32::NAN;
    w[70] = f32::INFINITY;
    check("mxfp4", 2, 64, &w);
    check("mxfp8-e4m3", 2, 64, &w);
}

/// Random shapes (ragged last groups included) with huge (near f32::MAX) and subnormal
/// values mixed in, for every scheme; and NaN/Inf blocks for the MX schemes that keep them.
#[test]
fn random_shapes_with_extreme_values() {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let mut next = |m: u64| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s % m
    };
    for case in 0..12u64 {
        let rows = 1 + next(3) as usize;
        let cols = 1 + next(700) as usize;
        let mut w = data(rows * cols, 0xABCD ^ case);
        for _ in 0..(rows * cols / 50 + 1) {
            let i = next((rows * cols) as u64) as usize;
            w[i] = match next(4) {
                0 => 3.0e38,
                1 => -1.7e38,
                2 => 1e-42,
                _ => -2.5e-39,
            };
        }
        for name in SCHEMES {
            check(name, rows, cols, &w);
        }
        let mut wn = w.clone();
        for _ in 0..3 {
            let i = next((rows * cols) as u64) as usize;
            wn[i] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][next(3) as usize];
        }
        check("mxfp4", rows, cols, &wn);
        check("mxfp8-e4m3", rows, cols, &wn);
    }
}
