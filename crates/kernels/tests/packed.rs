//! PackedLinear: round trips, agreement with dequantize-then-f64-matmul, and every SIMD path
//! against the scalar reference, on ragged shapes and odd batch sizes.
//!
//! # Tolerance
//! Every output is a sum of `n = cols` products `w_i * x_i` with `w_i = s * v_i + b` (b the
//! zero-point term). The kernels evaluate it as `s * sum(v_i x_i) + b * sum(x_i)` per scale group
//! and then sum the groups (or, on the GEMM path, round `w_i` once and sum the products); the
//! order differs by path. Whatever the order, the standard recursive-summation bound gives
//! `|computed - exact| <= gamma_m * M` with `gamma_m = m*u/(1-m*u)`, `u = 2^-24`,
//! `M = sum_i |x_i| * (|s v_i| + |b|)` and `m <= cols + groups + 3` rounding steps on any path from
//! an input product to the output. We allow `2 * (cols + groups + 4) * u * M` plus half an ulp
//! of the result for the final f64 -> f32 rounding of the reference. A single wrong code changes
//! the output by `|s| * |x_i|`, far above this bound for the shapes tested here.

use lowbit_kernels::{Isa, PackedLinear};
use lowbit_numerics::{ElemFormat, FloatFormat, Granularity, QuantizedTensor, ScaleDtype, Scheme};

mod common;
use common::Rng;

fn scheme(
    elem: ElemFormat,
    granularity: Granularity,
    asymmetric: bool,
    global_scale: bool,
) -> Scheme {
    Scheme {
        elem,
        granularity,
        scale_dtype: ScaleDtype::F32,
        asymmetric,
        global_scale,
    }
}

fn bits_of(e: ElemFormat) -> u32 {
    e.bits()
}

fn valid_code(e: ElemFormat, c: u8) -> u8 {
    let m = ((1u16 << bits_of(e)) - 1) as u8;
    let c = c & m;
    match e {
        ElemFormat::Float(FloatFormat::E4M3) if c & 0x7f == 0x7f => c & 0xfe,
        ElemFormat::Float(FloatFormat::E5M2) if c & 0x7c == 0x7c => c & 0x83,
        ElemFormat::Ternary if c == 3 => 2,
        _ => c,
    }
}

fn put(row: &mut [u8], bits: u32, col: usize, code: u8) {
    for b in 0..bits as usize {
        if code >> b & 1 == 1 {
            let bit = col * bits as usize + b;
            row[bit / 8] |= 1 << (bit % 8);
        }
    }
}

fn get(row: &[u8], bits: u32, col: usize) -> u8 {
    let mut v = 0u8;
    for b in 0..bits as usize {
        let bit = col * bits as usize + b;
        v |= ((row[bit / 8] >> (bit % 8)) & 1) << b;
    }
    v
}

fn random_tensor(
    s: Scheme,
    rows: usize,
    cols: usize,
    act_order: bool,
    rng: &mut Rng,
) -> QuantizedTensor {
    let bits = bits_of(s.elem);
    let rb = (cols * bits as usize).div_ceil(8);
    let mut data = vec![0u8; rows * rb];
    for r in 0..rows {
        for c in 0..cols {
            let code = valid_code(s.elem, rng.next() as u8);
            put(&mut data[r * rb..(r + 1) * rb], bits, c, code);
        }
    }
    let (gr, gc) = s.granularity.grid(rows, cols);
    let scales: Vec<f32> = (0..gr * gc).map(|_| 0.01 + 0.1 * rng.f().abs()).collect();
    let zero_points = s.asymmetric.then(|| {
        (0..gr * gc)
            .map(|_| (rng.next() % (1 << bits)) as u8)
            .collect()
    });
    let g_idx = act_order.then(|| {
        // a random permutation of the natural group assignment
        let (_, bc) = s.granularity.block_shape(rows, cols);
        let mut g: Vec<u32> = (0..cols).map(|c| (c / bc) as u32).collect();
        for i in (1..cols).rev() {
            let j = (rng.next() as usize) % (i + 1);
            g.swap(i, j);
        }
        g
    });
    let q = QuantizedTensor {
        scheme: s,
        rows,
        cols,
        data,
        scales,
        zero_points,
        global_scale: s.global_scale.then_some(3.0),
        g_idx,
        nested: None,
    };
    q.validate().unwrap();
    q
}

fn elem_value(e: ElemFormat, code: u8) -> f64 {
    match e {
        ElemFormat::Nf4 => lowbit_kernels::codes::NF4[code as usize] as f64,
        ElemFormat::Float(FloatFormat::E2M1) => lowbit_kernels::codes::E2M1[code as usize] as f64,
        ElemFormat::Float(FloatFormat::E4M3) => lowbit_kernels::codes::e4m3(code) as f64,
        ElemFormat::Float(FloatFormat::E5M2) => lowbit_kernels::codes::e5m2(code) as f64,
        _ => code as f64,
    }
}

/// Dequantize straight from the QuantizedTensor layout contract: returns (w, |s v| + |b|).
fn dequant(q: &QuantizedTensor) -> (Vec<f64>, Vec<f64>) {
    let bits = bits_of(q.scheme.elem);
    let rb = q.row_bytes();
    let (br, bc) = q.scheme.granularity.block_shape(q.rows, q.cols);
    let (_, gc) = q.grid();
    let mut w = vec![0f64; q.rows * q.cols];
    let mut mag = vec![0f64; q.rows * q.cols];
    for r in 0..q.rows {
        for c in 0..q.cols {
            let code = get(&q.data[r * rb..], bits, c);
            let g = q.g_idx.as_ref().map_or(c / bc, |g| g[c] as usize);
            let blk = (r / br) * gc + g;
            let s = (q.scales[blk] / q.global_scale.unwrap_or(1.0)) as f64;
            let (v, zp) = match q.scheme.elem {
                ElemFormat::Int { bits } => {
                    let zp = q
                        .zero_points
                        .as_ref()
                        .map_or(1u32 << (bits - 1), |z| z[blk] as u32);
                    (code as f64, zp as f64)
                }
                ElemFormat::Ternary => (code as f64, 1.0),
                e => (elem_value(e, code), 0.0),
            };
            w[r * q.cols + c] = s * (v - zp);
            mag[r * q.cols + c] = (s * v).abs() + (s * zp).abs();
        }
    }
    (w, mag)
}

fn check(q: &QuantizedTensor, batches: &[usize], rng: &mut Rng, what: &str) {
    let pk = PackedLinear::new(q).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(pk.to_quantized(), *q, "{what}: round trip");
    assert_eq!((pk.rows(), pk.cols()), (q.rows, q.cols));
    assert!(pk.weight_bytes() >= q.data.len());
    let (w, mag) = dequant(q);
    let groups = q.grid().1;
    let u = f32::EPSILON as f64 / 2.0;
    for &t in batches {
        let x: Vec<f32> = (0..t * q.cols).map(|_| rng.f()).collect();
        let mut outs = Vec::new();
        for isa in Isa::all_supported() {
            let mut y = vec![f32::NAN; t * q.rows];
            pk.forward_with(isa, &x, t, &mut y).unwrap();
            for tok in 0..t {
                for r in 0..q.rows {
                    let (mut exact, mut m) = (0f64, 0f64);
                    for c in 0..q.cols {
                        let xv = x[tok * q.cols + c] as f64;
                        exact += xv * w[r * q.cols + c];
                        m += xv.abs() * mag[r * q.cols + c];
                    }
                    let tol = 2.0 * (q.cols + groups + 4) as f64 * u * m + exact.abs() * u + 1e-30;
                    let got = y[tok * q.rows + r] as f64;
                    assert!(
                        (got - exact).abs() <= tol,
                        "{what} {isa:?} batch {t} token {tok} row {r}: {got} vs {exact} (tol {tol:e})"
                    );
                }
            }
            outs.push((isa, y));
        }
        // every SIMD path against the scalar reference (twice the bound: both sides err)
        let (_, ys) = &outs[0];
        for (isa, y) in &outs[1..] {
            for (i, (a, b)) in y.iter().zip(ys).enumerate() {
                let tok = i / q.rows;
                let r = i % q.rows;
                let m: f64 = (0..q.cols)
                    .map(|c| (x[tok * q.cols + c] as f64).abs() * mag[r * q.cols + c])
                    .sum();
                let tol = 4.0 * (q.cols + groups + 4) as f64 * u * m + 1e-30;
                assert!(
                    ((a - b) as f64).abs() <= tol,
                    "{what} {isa:?} vs scalar at {i}: {a} vs {b}"
                );
            }
        }
    }
}

const BATCHES: &[usize] = &[1, 2, 3, 5, 8, 17];

fn int(bits: u8) -> ElemFormat {
    ElemFormat::Int { bits }
}

#[test]
fn int4_groups_sym_asym_ragged() {
    let mut rng = Rng(1);
    for g in [32, 64, 128] {
        for asym in [false, true] {
            // (64, 576) has > 256 distinct scales: the f32 `Scale` header; the small ones use
            // the coded (u8 index) header; asym uses the scale+bias header.
            for &(rows, cols) in &[(7, 576), (5, 100), (1, 16), (9, 577), (64, 576)] {
                let q = random_tensor(
                    scheme(int(4), Granularity::PerGroup(g), asym, false),
                    rows,
                    cols,
                    false,
                    &mut rng,
                );
                check(
                    &q,
                    BATCHES,
                    &mut rng,
                    &format!("int4 g{g} asym={asym} {rows}x{cols}"),
                );
            }
        }
    }
}

#[test]
fn int8_and_fp8_per_channel_and_blocks() {
    let mut rng = Rng(2);
    for asym in [false, true] {
        let q = random_tensor(
            scheme(int(8), Granularity::PerChannel, asym, false),
            11,
            300,
            false,
            &mut rng,
        );
        check(&q, BATCHES, &mut rng, &format!("int8 pc asym={asym}"));
    }
    let q = random_tensor(
        scheme(int(8), Granularity::PerTensor, false, false),
        6,
        130,
        false,
        &mut rng,
    );
    check(&q, &[1, 4], &mut rng, "int8 per-tensor");
    let fp8 = ElemFormat::Float(FloatFormat::E4M3);
    let q = random_tensor(
        scheme(fp8, Granularity::PerChannel, false, false),
        13,
        577,
        false,
        &mut rng,
    );
    check(&q, BATCHES, &mut rng, "fp8 pc");
    let q = random_tensor(
        scheme(
            fp8,
            Granularity::Block2d { rows: 8, cols: 128 },
            false,
            false,
        ),
        19,
        300,
        false,
        &mut rng,
    );
    check(&q, BATCHES, &mut rng, "fp8 block 8x128");
    let e5 = ElemFormat::Float(FloatFormat::E5M2);
    let q = random_tensor(
        scheme(e5, Granularity::PerChannel, false, false),
        5,
        70,
        false,
        &mut rng,
    );
    check(&q, &[1, 3, 17], &mut rng, "e5m2 pc");
}

#[test]
fn fp4_and_nf4() {
    let mut rng = Rng(3);
    let e2m1 = ElemFormat::Float(FloatFormat::E2M1);
    let q = random_tensor(
        scheme(e2m1, Granularity::PerGroup(16), false, true),
        9,
        200,
        false,
        &mut rng,
    );
    check(&q, BATCHES, &mut rng, "nvfp4");
    let q = random_tensor(
        scheme(e2m1, Granularity::PerGroup(32), false, false),
        6,
        576,
        false,
        &mut rng,
    );
    check(&q, BATCHES, &mut rng, "mxfp4");
    let q = random_tensor(
        scheme(ElemFormat::Nf4, Granularity::PerGroup(64), false, false),
        7,
        576,
        false,
        &mut rng,
    );
    check(&q, BATCHES, &mut rng, "nf4 g64");
}

#[test]
fn low_bit_ints_and_odd_widths() {
    let mut rng = Rng(4);
    for bits in [2u8, 3] {
        for asym in [false, true] {
            let q = random_tensor(
                scheme(int(bits), Granularity::PerGroup(128), asym, false),
                7,
                576,
                false,
                &mut rng,
            );
            check(
                &q,
                BATCHES,
                &mut rng,
                &format!("int{bits} g128 asym={asym}"),
            );
        }
    }
    let q = random_tensor(
        scheme(int(5), Granularity::PerGroup(48), true, false),
        3,
        100,
        false,
        &mut rng,
    );
    check(
        &q,
        &[1, 2, 17],
        &mut rng,
        "int5 g48 (group not a multiple of 16)",
    );
    let q = random_tensor(
        scheme(ElemFormat::Ternary, Granularity::PerChannel, false, false),
        5,
        90,
        false,
        &mut rng,
    );
    check(&q, &[1, 3], &mut rng, "ternary");
}

#[test]
fn act_order_g_idx() {
    let mut rng = Rng(5);
    let q = random_tensor(
        scheme(int(4), Granularity::PerGroup(128), false, false),
        6,
        576,
        true,
        &mut rng,
    );
    check(&q, BATCHES, &mut rng, "int4 g128 act-order");
    let q = random_tensor(
        scheme(int(4), Granularity::PerGroup(32), true, false),
        5,
        100,
        true,
        &mut rng,
    );
    check(&q, &[1, 2, 17], &mut rng, "int4 g32 asym act-order");
}

#[test]
fn unsupported_and_bad_shapes_are_errors() {
    let mut rng = Rng(6);
    let q = random_tensor(
        scheme(ElemFormat::Binary, Granularity::PerChannel, false, false),
        2,
        16,
        false,
        &mut rng,
    );
    let e = PackedLinear::new(&q).unwrap_err();
    assert!(matches!(e, lowbit_kernels::Error::Unsupported(_)), "{e}");
    let q = random_tensor(
        scheme(int(4), Granularity::PerGroup(32), false, false),
        3,
        64,
        false,
        &mut rng,
    );
    let pk = PackedLinear::new(&q).unwrap();
    let mut y = vec![0f32; 3];
    assert!(pk.forward(&[0.0; 63], 1, &mut y).is_err());
    assert!(pk.forward(&[0.0; 64], 1, &mut [0.0; 2]).is_err());
    let mut bad = q.clone();
    bad.scales.pop();
    assert!(PackedLinear::new(&bad).is_err());
}

#[test]
fn zero_tokens_is_a_no_op() {
    let mut rng = Rng(7);
    let q = random_tensor(
        scheme(int(4), Granularity::PerGroup(32), false, false),
        3,
        64,
        false,
        &mut rng,
    );
    let pk = PackedLinear::new(&q).unwrap();
    pk.forward(&[], 0, &mut []).unwrap();
}

/// The tolerance is tight enough to see one wrong code: flip a code in the tensor after
/// packing and the kernel output must disagree with the new reference beyond the bound.
#[test]
fn tolerance_detects_a_single_wrong_code() {
    let mut rng = Rng(8);
    let q = random_tensor(
        scheme(int(4), Granularity::PerGroup(128), false, false),
        4,
        576,
        false,
        &mut rng,
    );
    let pk = PackedLinear::new(&q).unwrap();
    let mut q2 = q.clone();
    q2.data[q.row_bytes() + 100] ^= 0x04; // row 1, column 200, code +-4
    let (w, mag) = dequant(&q2);
    let x: Vec<f32> = (0..q.cols)
        .map(|c| if c == 200 { 1.0 } else { rng.f() })
        .collect();
    let u = f32::EPSILON as f64 / 2.0;
    for isa in Isa::all_supported() {
        let mut y = vec![0f32; q.rows];
        pk.forward_with(isa, &x, 1, &mut y).unwrap();
        let (mut exact, mut m) = (0f64, 0f64);
        for c in 0..q.cols {
            exact += x[c] as f64 * w[q.cols + c];
            m += (x[c] as f64).abs() * mag[q.cols + c];
        }
        let tol = 2.0 * (q.cols + 5 + 4) as f64 * u * m;
        assert!(
            (y[1] as f64 - exact).abs() > tol,
            "{isa:?}: wrong code not detected"
        );
    }
}

/// The AVX2 FP8 E4M3 kernel decodes codes to `e4m3 * 2^-120` (f32 bit patterns, subnormal
/// codes included) and multiplies each token's activations by a power of two so that the
/// largest lands in `[2^63, 2^64)`: tiny, huge and mixed-magnitude tokens, odd batches and
/// ragged shapes stay within the f32-rounding bound of the exact f64 product, and NaN / Inf
/// activations give the same non-finite outputs as the scalar reference.
#[test]
fn fp8_e4m3_activation_scaling() {
    let mut rng = Rng(9);
    let fp8 = ElemFormat::Float(FloatFormat::E4M3);
    let u = f32::EPSILON as f64 / 2.0;
    for &(rows, cols) in &[(13, 577), (4, 16), (7, 100), (5, 300)] {
        let q = random_tensor(
            scheme(fp8, Granularity::PerChannel, false, false),
            rows,
            cols,
            false,
            &mut rng,
        );
        let pk = PackedLinear::new(&q).unwrap();
        let (w, mag) = dequant(&q);
        for n in 1..=8 {
            // per token: one magnitude, or half the columns 1e20 and half 1e-20
            let mags = [1e-30f32, 1e30, 1.0, 3e-7, 0.0, 1e20, 5e-39, 2e12];
            let x: Vec<f32> = (0..n * cols)
                .map(|i| {
                    let (t, c) = (i / cols, i % cols);
                    let m = match mags[t % mags.len()] {
                        1e20 if c % 2 == 1 => 1e-20,
                        m => m,
                    };
                    rng.f() * m
                })
                .collect();
            for isa in Isa::all_supported() {
                let mut y = vec![f32::NAN; n * rows];
                pk.forward_with(isa, &x, n, &mut y).unwrap();
                for t in 0..n {
                    for r in 0..rows {
                        let (mut exact, mut m) = (0f64, 0f64);
                        for c in 0..cols {
                            let xv = x[t * cols + c] as f64;
                            exact += xv * w[r * cols + c];
                            m += xv.abs() * mag[r * cols + c];
                        }
                        let tol = 2.0 * (cols + 5) as f64 * u * m + exact.abs() * u + 1e-37;
                        let got = y[t * rows + r] as f64;
                        assert!(
                            (got - exact).abs() <= tol,
                            "{isa:?} {rows}x{cols} batch {n} token {t} row {r}: {got} vs {exact}"
                        );
                    }
                }
            }
        }
        // non-finite activations: NaN, +Inf, -Inf at one column
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x: Vec<f32> = (0..cols).map(|_| rng.f()).collect();
            x[cols / 2] = bad;
            let mut ys = vec![0f32; rows];
            pk.forward_with(Isa::Scalar, &x, 1, &mut ys).unwrap();
            for isa in Isa::all_supported() {
                let mut y = vec![0f32; rows];
                pk.forward_with(isa, &x, 1, &mut y).unwrap();
                // (the scalar reference adds `0 * sum(x)` for the absent bias, so it can give
                // NaN where the kernels give an infinity)
                for (a, b) in y.iter().zip(&ys) {
                    assert!(!b.is_finite(), "{bad}: scalar {b}");
                    assert!(!a.is_finite(), "{isa:?} {bad}: {a} vs scalar {b}");
                }
            }
        }
    }
}
