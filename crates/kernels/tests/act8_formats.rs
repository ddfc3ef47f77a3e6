//! `ActMode::Int8Block` on the formats beyond INT4: INT8 / INT5..7 (sym, asym, per-channel,
//! per-group, MXINT8), FP4 E2M1 (MXFP4 with E8M0 scales, NVFP4 with E4M3 scales and a global
//! scale) and NF4 (table rounded to multiples of 1/64). Every path (scalar reference, AVX2) is
//! checked against an f64 evaluation of the same math, SIMD against scalar, and against
//! dequantize-then-f64-matmul on the unquantized activations within the rounding bounds below.
//!
//! # The integer contract (docs/kernels.md, "INT8 block activations")
//! A weight is `w = s * mul * (v + off)` with an exact small integer `v` per code: INT codes
//! `v = code`, `off = -zero_point`, `mul = 1`; E2M1 `v = 2 * value + 12` (in `[0, 24]`),
//! `off = -12`, `mul = 1/2` (exact: `2 * value` is an integer); NF4
//! `v = round(64 * NF4[code]) + 64` (in `[0, 128]`), `off = -64`, `mul = 1/64`, i.e. the NF4
//! value rounded to a multiple of 1/64 (error <= 1/128 of the group scale per weight).
//! `s` is the packed row/group scale (NVFP4: `scale / global_scale` rounded to f32, as the
//! dequantizer computes it).
//!
//! # Tolerances
//! Activations: per token, blocks of 32 consecutive columns of a scale group (the last block
//! of a group may be shorter; NVFP4's 16-column groups are 16-column blocks), `sx = max|x|/127`,
//! `q = clamp(round_ties_even(x / sx), -127, 127)`.
//!
//! *Same math.* `y = sum_g s_g mul (sum_b sx_b I_b + off_g X_g)` with exact integers
//! `I_b = sum_{j in b} v_j q_j` (`|I_b| < 2^24`, so converting them to f32 is exact) and
//! `X_g = sum_b sx_b sum_j q_j`. Each path then performs at most `m = blocks + groups + 8`
//! rounded f32 operations between any term and the output (block FMAs, the group fold, the
//! lane-pair and cross-group sums; `mul` is a power of two, so `s * mul` is exact), hence
//! `|y - exact| <= gamma_m M ~ m u M`, `u = 2^-24`, with
//! `M = sum_b sx_b |s| mul (sum_j |v_j q_j| + |off| sum_j |q_j|)` bounding every partial term.
//! Allowed: `2 m u M` against the f64 value, twice that between SIMD and scalar.
//!
//! *Against f32 activations and the exact weights.* `x_j = sx_b q_j + e_j`,
//! `|e_j| <= sx_b / 2 + |x_j| u`, so per block the activation rounding moves the result by at
//! most `sx_b (1/2 + 127 u) sum_{j in b} |w_j|`; NF4 adds the table rounding
//! `sum_j |s| |x_j| / 128`. The test allows the sum of those plus the same-math bound.

use lowbit_kernels::{codes, ActMode, Isa, PackedLinear};
use lowbit_numerics::{ElemFormat, FloatFormat, QuantizedTensor, ScaleDtype, Scheme};

mod common;
use common::Rng;

const U: f64 = f32::EPSILON as f64 / 2.0;

/// A tensor of `scheme` with uniformly random codes and scales of the scheme's scale dtype.
fn tensor(scheme: Scheme, rows: usize, cols: usize, rng: &mut Rng) -> QuantizedTensor {
    let bits = scheme.elem.bits();
    let rb = lowbit_numerics::tensor::packed_row_bytes(cols, bits);
    let mut data = vec![0u8; rows * rb];
    for r in 0..rows {
        for c in 0..cols {
            let code = (rng.next() % (1 << bits)) as u8;
            codes::put_code(&mut data[r * rb..(r + 1) * rb], bits, c, code);
        }
    }
    let (gr, gc) = scheme.granularity.grid(rows, cols);
    let q = QuantizedTensor {
        scheme,
        rows,
        cols,
        data,
        scales: (0..gr * gc)
            .map(|_| match scheme.scale_dtype {
                ScaleDtype::E8M0 => 2f32.powi(-((rng.next() % 12) as i32)),
                ScaleDtype::E4M3 => codes::e4m3(0x08 + (rng.next() % 0x70) as u8),
                _ => 0.01 + 0.1 * rng.f().abs(),
            })
            .collect(),
        zero_points: scheme.asymmetric.then(|| {
            (0..gr * gc)
                .map(|_| (rng.next() % (1 << bits)) as u8)
                .collect()
        }),
        global_scale: scheme.global_scale.then_some(3.0),
        g_idx: None,
        nested: None,
    };
    q.validate().unwrap();
    q
}

/// Per weight: (exact value w, integer-path value w8, magnitude bound of its two terms per
/// unit |q|: `|s| mul |v|` and `|s| mul |off|`).
fn weight(q: &QuantizedTensor, r: usize, c: usize) -> (f64, f64, f64, f64) {
    let bits = q.scheme.elem.bits();
    let rb = lowbit_numerics::tensor::packed_row_bytes(q.cols, bits);
    let code = codes::get_code(&q.data[r * rb..(r + 1) * rb], bits, c);
    let (br, bc) = q.scheme.granularity.block_shape(q.rows, q.cols);
    let gc = q.grid().1;
    let blk = (r / br) * gc + c / bc;
    let s = (q.scales[blk] / q.global_scale.unwrap_or(1.0)) as f64;
    match q.scheme.elem {
        ElemFormat::Int { bits } => {
            let zp = q
                .zero_points
                .as_ref()
                .map_or(1u32 << (bits - 1), |z| z[blk] as u32) as f64;
            let w = s * (code as f64 - zp);
            (w, w, s.abs() * code as f64, s.abs() * zp)
        }
        ElemFormat::Float(FloatFormat::E2M1) => {
            let v = codes::E2M1[code as usize] as f64;
            let w = s * v;
            (w, w, s.abs() * 0.5 * (2.0 * v + 12.0), s.abs() * 6.0)
        }
        ElemFormat::Nf4 => {
            let v = codes::NF4[code as usize] as f64;
            let v8 = (v * 64.0).round();
            (s * v, s * v8 / 64.0, s.abs() / 64.0 * (v8 + 64.0), s.abs())
        }
        e => panic!("no integer path for {e:?}"),
    }
}

/// The activation contract: per token, per scale group (column blocks of the scheme), blocks
/// of 32 columns; returns per token the list of (first column, sx, codes).
#[allow(clippy::type_complexity)]
fn quantize(q: &QuantizedTensor, x: &[f32], n: usize) -> Vec<Vec<(usize, f32, Vec<i32>)>> {
    let (_, bc) = q.scheme.granularity.block_shape(q.rows, q.cols);
    (0..n)
        .map(|t| {
            let xr = &x[t * q.cols..(t + 1) * q.cols];
            let mut out = Vec::new();
            for g0 in (0..q.cols).step_by(bc) {
                let g1 = (g0 + bc).min(q.cols);
                for b0 in (g0..g1).step_by(32) {
                    let b1 = (b0 + 32).min(g1);
                    let amax = xr[b0..b1].iter().map(|v| v.abs()).fold(0f32, f32::max);
                    let sx = amax / 127.0;
                    let codes = xr[b0..b1]
                        .iter()
                        .map(|&v| {
                            if sx == 0.0 {
                                0
                            } else {
                                (v / sx).round_ties_even().clamp(-127.0, 127.0) as i32
                            }
                        })
                        .collect();
                    out.push((b0, sx, codes));
                }
            }
            out
        })
        .collect()
}

fn check(q: &QuantizedTensor, batches: &[usize], rng: &mut Rng, what: &str) {
    let mut pk = PackedLinear::new(q).unwrap();
    assert!(pk.supports_int8_act(), "{what}");
    assert!(lowbit_kernels::act8::supports_int8_act(q), "{what}");
    pk.set_act_mode(ActMode::Int8Block).unwrap();
    let nf4 = q.scheme.elem == ElemFormat::Nf4;
    let ngroups = q.grid().1;
    for &n in batches {
        let x: Vec<f32> = (0..n * q.cols)
            .map(|i| rng.f() * if (i / 37) % 3 == 0 { 8.0 } else { 0.5 })
            .collect();
        let qa = quantize(q, &x, n);
        let m_steps = (qa[0].len() + ngroups + 8) as f64;
        let mut outs = Vec::new();
        for isa in Isa::all_supported() {
            let mut y = vec![f32::NAN; n * q.rows];
            pk.forward_with(isa, &x, n, &mut y).unwrap();
            outs.push((isa, y));
        }
        for t in 0..n {
            for r in 0..q.rows {
                let (mut same, mut m, mut exact_f, mut bound) = (0f64, 0f64, 0f64, 0f64);
                for (b0, sx, codes) in &qa[t] {
                    let sx = *sx as f64;
                    let (mut dot, mut mb, mut wabs) = (0f64, 0f64, 0f64);
                    for (i, &qc) in codes.iter().enumerate() {
                        let c = b0 + i;
                        let (w, w8, mv, moff) = weight(q, r, c);
                        let xv = x[t * q.cols + c] as f64;
                        dot += w8 * qc as f64;
                        mb += (mv + moff) * (qc as f64).abs();
                        wabs += w.abs();
                        exact_f += w * xv;
                        if nf4 {
                            // |s| / 128 per weight (the 1/64 table rounding)
                            bound += moff / 128.0 * xv.abs();
                        }
                    }
                    same += sx * dot;
                    m += sx * mb;
                    bound += sx * (0.5 + 127.0 * U) * wabs;
                }
                let tol = 2.0 * m_steps * U * m + 1e-30;
                for (isa, y) in &outs {
                    let got = y[t * q.rows + r] as f64;
                    assert!(
                        (got - same).abs() <= tol,
                        "{what} {isa:?} batch {n} token {t} row {r}: {got} vs same-math {same} (tol {tol:e})"
                    );
                    assert!(
                        (got - exact_f).abs() <= bound + tol,
                        "{what} {isa:?} batch {n} token {t} row {r}: {got} vs exact weights and f32 activations {exact_f} (bound {:e})",
                        bound + tol
                    );
                }
                let ys = outs[0].1[t * q.rows + r];
                for (isa, y) in &outs[1..] {
                    let d = (y[t * q.rows + r] - ys).abs() as f64;
                    assert!(
                        d <= 2.0 * tol,
                        "{what} {isa:?} vs scalar, batch {n} token {t} row {r}: diff {d:e}"
                    );
                }
            }
        }
    }
}

const BATCHES: &[usize] = &[1, 2, 3, 4, 5, 6, 7, 8, 17];
/// Row counts not a multiple of the 4-row tile, column counts with ragged chunks, blocks and
/// groups (577 = 18 x 32 + 1).
const SHAPES: &[(usize, usize)] = &[(1, 16), (7, 576), (5, 100), (9, 577), (6, 48), (13, 300)];

#[test]
fn int8_and_narrower_integers() {
    let mut rng = Rng(21);
    for name in [
        "int8-pc",
        "int8-g32-sym",
        "int8-g128-asym",
        "int8-g48-sym",
        "mxint8",
        "int5-g64-sym",
        "int6-pc-asym",
        "int7-g32-asym",
    ] {
        let scheme = Scheme::from_name(name).unwrap();
        for &(rows, cols) in SHAPES {
            let q = tensor(scheme, rows, cols, &mut rng);
            check(&q, BATCHES, &mut rng, &format!("{name} {rows}x{cols}"));
        }
    }
}

#[test]
fn fp4_e2m1_mxfp4_nvfp4() {
    let mut rng = Rng(22);
    for name in ["mxfp4", "nvfp4"] {
        let scheme = Scheme::from_name(name).unwrap();
        for &(rows, cols) in SHAPES {
            let q = tensor(scheme, rows, cols, &mut rng);
            check(&q, BATCHES, &mut rng, &format!("{name} {rows}x{cols}"));
        }
    }
    // E2M1 with f32 scales (> 256 distinct: the f32 header) and per-channel
    for gran in [
        lowbit_numerics::Granularity::PerGroup(32),
        lowbit_numerics::Granularity::PerChannel,
    ] {
        let scheme = Scheme {
            elem: ElemFormat::Float(FloatFormat::E2M1),
            granularity: gran,
            scale_dtype: ScaleDtype::F32,
            asymmetric: false,
            global_scale: false,
        };
        let q = tensor(scheme, 70, 300, &mut rng);
        check(&q, &[1, 3], &mut rng, &format!("e2m1 f32 scales {gran:?}"));
    }
}

#[test]
fn nf4_table_rounded() {
    let mut rng = Rng(23);
    for name in ["nf4-g64", "nf4-g32", "nf4-g128"] {
        let scheme = Scheme::from_name(name).unwrap();
        for &(rows, cols) in SHAPES {
            let q = tensor(scheme, rows, cols, &mut rng);
            check(&q, BATCHES, &mut rng, &format!("{name} {rows}x{cols}"));
        }
    }
}

/// The same-math tolerance sees one wrong code, for each kernel family (8-bit, E2M1, NF4).
#[test]
fn tolerance_detects_a_single_wrong_code() {
    let mut rng = Rng(24);
    for (name, cols) in [
        ("int8-pc", 300),
        ("mxfp4", 576),
        ("nf4-g64", 576),
        ("nvfp4", 100),
    ] {
        let scheme = Scheme::from_name(name).unwrap();
        let q = tensor(scheme, 5, cols, &mut rng);
        let mut pk = PackedLinear::new(&q).unwrap();
        pk.set_act_mode(ActMode::Int8Block).unwrap();
        let bits = scheme.elem.bits();
        let rb = lowbit_numerics::tensor::packed_row_bytes(cols, bits);
        let mut q2 = q.clone();
        // row 1, column 40: flip code bit 1 (E2M1 1.0 <-> 3.0 class changes, INT by 2, NF4 by
        // two table steps)
        let row = &mut q2.data[rb..2 * rb];
        let c = codes::get_code(row, bits, 40);
        // bit 1 sits inside one byte for 4- and 8-bit codes: XOR it in place
        row[40 * bits as usize / 8] ^= 0b10 << (40 * bits as usize % 8);
        assert_eq!(codes::get_code(row, bits, 40), c ^ 0b10);
        let x: Vec<f32> = (0..cols)
            .map(|c| if c == 40 { 1.0 } else { rng.f() })
            .collect();
        let qa = quantize(&q2, &x, 1);
        let (mut same, mut m) = (0f64, 0f64);
        for (b0, sx, codes) in &qa[0] {
            for (i, &qc) in codes.iter().enumerate() {
                let (_, w8, mv, moff) = weight(&q2, 1, b0 + i);
                same += *sx as f64 * w8 * qc as f64;
                m += *sx as f64 * (mv + moff) * (qc as f64).abs();
            }
        }
        let tol = 2.0 * (qa[0].len() + q.grid().1 + 8) as f64 * U * m;
        for isa in Isa::all_supported() {
            let mut y = vec![0f32; q.rows];
            pk.forward_with(isa, &x, 1, &mut y).unwrap();
            assert!(
                (y[1] as f64 - same).abs() > tol,
                "{name} {isa:?}: wrong code not detected: {} vs {same} tol {tol:e}",
                y[1]
            );
        }
    }
}

#[test]
fn formats_without_an_integer_path_are_refused() {
    let mut rng = Rng(25);
    for name in ["fp8-pc", "int3-g128-sym", "int2-g64-asym", "fp8-e5m2-pc"] {
        let q = tensor(Scheme::from_name(name).unwrap(), 3, 64, &mut rng);
        let mut pk = PackedLinear::new(&q).unwrap();
        assert!(!pk.supports_int8_act(), "{name}");
        assert!(!lowbit_kernels::act8::supports_int8_act(&q), "{name}");
        let e = pk.set_act_mode(ActMode::Int8Block).unwrap_err();
        assert!(matches!(e, lowbit_kernels::Error::Unsupported(_)), "{e}");
        assert_eq!(pk.act_mode(), ActMode::F32);
    }
}
