//! `ActMode::Int8Block` (W4A8 integer dot products): every path against an f64 evaluation of
//! the same math, SIMD against the scalar reference, and against dequantize-then-f64-matmul on
//! the unquantized activations within the INT8 rounding bound; ragged groups, odd batches,
//! act-order, asymmetric zero points.
//!
//! # Tolerances
//! The activation contract (`act8` module docs): blocks of 32 consecutive columns of a scale
//! group (the group's columns in increasing order; the last block may be shorter),
//! `sx = max|x| / 127`, `q = clamp(round_ties_even(x / sx), -127, 127)`.
//!
//! *Same math.* `y = sum_g [ s_g sum_b sx_b I_b + b_g X_g ]` with exact integers
//! `I_b = sum_{j in b} code_j q_j`, `b_g = -s_g zp_g` and `X_g = sum_b sx_b sum_{j in b} q_j`.
//! Each path converts the (exact, `< 2^24`) integers to f32 and performs at most
//! `m = blocks + groups + 8` rounded multiplications/additions between any term and the output
//! (the SIMD kernel also splits each `I_b` into two lane halves and adds them at the end, and
//! rounds `b_g = -(s_g zp_g)` once), so by the recursive-summation bound
//! `|y - exact| <= gamma_m * M ~ m u M`, `u = 2^-24`, with
//! `M = sum_g sum_b sx_b (|s_g| sum_j |code_j q_j| + |b_g| sum_j |q_j|)` (an upper bound on the
//! magnitudes of every partial term, both lane halves included). We allow `2 m u M` against the
//! f64 value, `4 m u M` between SIMD and scalar.
//!
//! *Against f32 activations.* `x_j = sx_b q_j + e_j` with `|e_j| <= sx_b / 2 + |x_j| u`
//! (rounding of the division `x / sx`, `|x_j| <= 127 sx_b`), so per block
//! `|sum_j w_j x_j - sum_j w_j sx_b q_j| <= sx_b (1/2 + 127 u) sum_{j in b} |w_j|`; the test allows
//! that sum plus the accumulation bound above.

use lowbit_kernels::{ActMode, Isa, PackedLinear};
use lowbit_numerics::{ElemFormat, Granularity, QuantizedTensor, ScaleDtype, Scheme};

mod common;
use common::Rng;

const U: f64 = f32::EPSILON as f64 / 2.0;

fn int4_tensor(
    gran: Granularity,
    asym: bool,
    rows: usize,
    cols: usize,
    act_order: bool,
    rng: &mut Rng,
) -> QuantizedTensor {
    let scheme = Scheme {
        elem: ElemFormat::Int { bits: 4 },
        granularity: gran,
        scale_dtype: ScaleDtype::F32,
        asymmetric: asym,
        global_scale: false,
    };
    let rb = cols.div_ceil(2);
    let mut data = vec![0u8; rows * rb];
    for r in 0..rows {
        for c in 0..cols {
            let code = (rng.next() % 16) as u8;
            data[r * rb + c / 2] |= code << (4 * (c % 2));
        }
    }
    let (gr, gc) = gran.grid(rows, cols);
    let g_idx = act_order.then(|| {
        let (_, bc) = gran.block_shape(rows, cols);
        let mut g: Vec<u32> = (0..cols).map(|c| (c / bc) as u32).collect();
        for i in (1..cols).rev() {
            let j = (rng.next() as usize) % (i + 1);
            g.swap(i, j);
        }
        g
    });
    let q = QuantizedTensor {
        scheme,
        rows,
        cols,
        data,
        scales: (0..gr * gc).map(|_| 0.01 + 0.1 * rng.f().abs()).collect(),
        zero_points: asym.then(|| (0..gr * gc).map(|_| (rng.next() % 16) as u8).collect()),
        global_scale: None,
        g_idx,
        nested: None,
    };
    q.validate().unwrap();
    q
}

fn code(q: &QuantizedTensor, r: usize, c: usize) -> u8 {
    (q.data[r * q.cols.div_ceil(2) + c / 2] >> (4 * (c % 2))) & 15
}

/// Columns of each scale group, increasing.
fn groups(q: &QuantizedTensor) -> Vec<Vec<usize>> {
    let (_, bc) = q.scheme.granularity.block_shape(q.rows, q.cols);
    let mut g = vec![Vec::new(); q.grid().1];
    for c in 0..q.cols {
        g[q.g_idx.as_ref().map_or(c / bc, |g| g[c] as usize)].push(c);
    }
    g
}

/// The activation contract, independently of the kernel: per group, blocks of 32 columns;
/// returns per token the list of (columns, sx, codes).
#[allow(clippy::type_complexity)]
fn quantize(q: &QuantizedTensor, x: &[f32], n: usize) -> Vec<Vec<(Vec<usize>, f32, Vec<i32>)>> {
    let gs = groups(q);
    (0..n)
        .map(|t| {
            let xr = &x[t * q.cols..(t + 1) * q.cols];
            let mut out = Vec::new();
            for g in &gs {
                for cols in g.chunks(32) {
                    let amax = cols.iter().map(|&c| xr[c].abs()).fold(0f32, f32::max);
                    let sx = amax / 127.0;
                    let codes = cols
                        .iter()
                        .map(|&c| {
                            if sx == 0.0 {
                                0
                            } else {
                                (xr[c] / sx).round_ties_even().clamp(-127.0, 127.0) as i32
                            }
                        })
                        .collect();
                    out.push((cols.to_vec(), sx, codes));
                }
            }
            out
        })
        .collect()
}

/// (scale, zero point) of weight (r, c).
fn sz(q: &QuantizedTensor, r: usize, c: usize) -> (f64, f64) {
    let (br, bc) = q.scheme.granularity.block_shape(q.rows, q.cols);
    let gc = q.grid().1;
    let g = q.g_idx.as_ref().map_or(c / bc, |g| g[c] as usize);
    let blk = (r / br) * gc + g;
    let zp = q.zero_points.as_ref().map_or(8.0, |z| z[blk] as f64);
    (q.scales[blk] as f64, zp)
}

fn check(q: &QuantizedTensor, batches: &[usize], rng: &mut Rng, what: &str) {
    let mut pk = PackedLinear::new(q).unwrap();
    assert!(pk.supports_int8_act());
    pk.set_act_mode(ActMode::Int8Block).unwrap();
    assert_eq!(pk.act_mode(), ActMode::Int8Block);
    let ngroups = q.grid().1;
    for &n in batches {
        // activations with a wide dynamic range across blocks
        let x: Vec<f32> = (0..n * q.cols)
            .map(|i| rng.f() * if (i / 37) % 3 == 0 { 8.0 } else { 0.5 })
            .collect();
        let qa = quantize(q, &x, n);
        let nblk = qa[0].len();
        let m_steps = (nblk + ngroups + 8) as f64;
        let mut outs = Vec::new();
        for isa in Isa::all_supported() {
            let mut y = vec![f32::NAN; n * q.rows];
            pk.forward_with(isa, &x, n, &mut y).unwrap();
            outs.push((isa, y));
        }
        for t in 0..n {
            for r in 0..q.rows {
                let (mut same, mut m, mut exact_f, mut act_bound) = (0f64, 0f64, 0f64, 0f64);
                for (cols, sx, codes) in &qa[t] {
                    let sx = *sx as f64;
                    let (mut wsum_abs, mut dot) = (0f64, 0f64);
                    let (mut ci, mut qi) = (0f64, 0f64);
                    let mut s_b = (0f64, 0f64);
                    for (&c, &qc) in cols.iter().zip(codes) {
                        let (s, zp) = sz(q, r, c);
                        let cd = code(q, r, c) as f64;
                        let w = s * (cd - zp);
                        dot += w * qc as f64;
                        wsum_abs += w.abs();
                        ci += (cd * qc as f64).abs();
                        qi += (qc as f64).abs();
                        s_b = (s, zp);
                        exact_f += w * x[t * q.cols + c] as f64;
                    }
                    same += sx * dot;
                    m += sx * (s_b.0 * ci + (s_b.0 * s_b.1) * qi);
                    act_bound += sx * (0.5 + 127.0 * U) * wsum_abs;
                }
                let tol = 2.0 * m_steps * U * m + 1e-30;
                for (isa, y) in &outs {
                    let got = y[t * q.rows + r] as f64;
                    assert!(
                        (got - same).abs() <= tol,
                        "{what} {isa:?} batch {n} token {t} row {r}: {got} vs same-math {same} (tol {tol:e})"
                    );
                    assert!(
                        (got - exact_f).abs() <= act_bound + tol,
                        "{what} {isa:?} batch {n} token {t} row {r}: {got} vs f32-activation {exact_f} (bound {:e})",
                        act_bound + tol
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

const BATCHES: &[usize] = &[1, 2, 3, 4, 5, 7, 8, 17];

#[test]
fn int4_groups_sym_asym_ragged() {
    let mut rng = Rng(11);
    for g in [32, 64, 128] {
        for asym in [false, true] {
            // 576 = 4 x 128 + 64 (ragged last g128 group); 100 and 577 ragged everywhere;
            // 64 x 576 has > 256 distinct scales (f32 header), asym uses scale + bias headers.
            for &(rows, cols) in &[(7, 576), (5, 100), (1, 16), (9, 577), (64, 576), (6, 48)] {
                let q = int4_tensor(Granularity::PerGroup(g), asym, rows, cols, false, &mut rng);
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
fn int4_per_channel_group_48_and_act_order() {
    let mut rng = Rng(12);
    let q = int4_tensor(Granularity::PerChannel, false, 5, 1000, false, &mut rng);
    check(&q, &[1, 3, 8], &mut rng, "int4 per-channel");
    let q = int4_tensor(Granularity::PerGroup(48), true, 6, 200, false, &mut rng);
    check(
        &q,
        &[1, 2, 5],
        &mut rng,
        "int4 g48 asym (odd chunk count per group)",
    );
    let q = int4_tensor(Granularity::PerGroup(128), false, 6, 576, true, &mut rng);
    check(&q, &[1, 4, 9], &mut rng, "int4 g128 act-order");
    let q = int4_tensor(Granularity::PerGroup(32), true, 5, 100, true, &mut rng);
    check(&q, &[1, 2, 17], &mut rng, "int4 g32 asym act-order");
}

/// The same-math tolerance sees one wrong code (a code off by 4 at an activation of 1.0).
#[test]
fn tolerance_detects_a_single_wrong_code() {
    let mut rng = Rng(13);
    let q = int4_tensor(Granularity::PerGroup(128), false, 4, 576, false, &mut rng);
    let mut pk = PackedLinear::new(&q).unwrap();
    pk.set_act_mode(ActMode::Int8Block).unwrap();
    let mut q2 = q.clone();
    q2.data[q.cols.div_ceil(2) + 100] ^= 0x04; // row 1, column 200
    let x: Vec<f32> = (0..q.cols)
        .map(|c| if c == 200 { 1.0 } else { rng.f() })
        .collect();
    let qa = quantize(&q2, &x, 1);
    let (mut same, mut m) = (0f64, 0f64);
    for (cols, sx, codes) in &qa[0] {
        for (&c, &qc) in cols.iter().zip(codes) {
            let (s, zp) = sz(&q2, 1, c);
            let cd = code(&q2, 1, c) as f64;
            same += *sx as f64 * s * (cd - zp) * qc as f64;
            m += *sx as f64 * (s * cd * qc.abs() as f64 + s * zp * qc.abs() as f64);
        }
    }
    let tol = 2.0 * (qa[0].len() + 5 + 8) as f64 * U * m;
    for isa in Isa::all_supported() {
        let mut y = vec![0f32; q.rows];
        pk.forward_with(isa, &x, 1, &mut y).unwrap();
        assert!(
            (y[1] as f64 - same).abs() > tol,
            "{isa:?}: wrong code not detected"
        );
    }
}

#[test]
fn mode_is_explicit_and_checked() {
    let mut rng = Rng(14);
    let q = int4_tensor(Granularity::PerGroup(32), false, 3, 64, false, &mut rng);
    let mut pk = PackedLinear::new(&q).unwrap();
    assert_eq!(pk.act_mode(), ActMode::F32);
    // f32 mode and int8 mode differ on generic inputs (the activations are rounded)
    let x: Vec<f32> = (0..64).map(|_| rng.f()).collect();
    let (mut a, mut b) = (vec![0f32; 3], vec![0f32; 3]);
    pk.forward(&x, 1, &mut a).unwrap();
    pk.set_act_mode(ActMode::Int8Block).unwrap();
    pk.forward(&x, 1, &mut b).unwrap();
    assert_ne!(a, b);
    // non-finite activations reach the output instead of being rounded away
    let mut xn = x.clone();
    xn[5] = f32::INFINITY;
    pk.forward(&xn, 1, &mut b).unwrap();
    assert!(b.iter().all(|v| v.is_nan()), "{b:?}");
    // shape errors still reported
    assert!(pk.forward(&x[..63], 1, &mut b).is_err());
    // FP8 codes have no integer-dot kernel: a typed error, mode unchanged
    let scheme = Scheme::from_name("fp8-pc").unwrap();
    let q8 = QuantizedTensor {
        scheme,
        rows: 2,
        cols: 16,
        data: vec![0x38; 32],
        scales: vec![0.1, 0.2],
        zero_points: None,
        global_scale: None,
        g_idx: None,
        nested: None,
    };
    let mut p8 = PackedLinear::new(&q8).unwrap();
    assert!(!p8.supports_int8_act());
    let e = p8.set_act_mode(ActMode::Int8Block).unwrap_err();
    assert!(matches!(e, lowbit_kernels::Error::Unsupported(_)), "{e}");
    assert_eq!(p8.act_mode(), ActMode::F32);
}

/// The tiled prefill (tokens split in blocks over the pool, quantization split over tokens)
/// gives every token exactly what a one-token call (the decode path) gives it: the same integer
/// math in the same order, bit for bit, on every path (INT4 prefill: 8 tokens per kernel pass,
/// the rest in passes of up to 4); ragged row tiles, odd token counts, token counts above and
/// below the 64-token block, 1 and 3 threads.
#[test]
fn prefill_equals_per_token_bitwise() {
    let mut rng = Rng(15);
    let cases: &[(Granularity, bool, usize, usize, bool)] = &[
        (Granularity::PerGroup(128), false, 7, 576, false),
        (Granularity::PerGroup(128), false, 70, 577, false),
        (Granularity::PerGroup(32), true, 9, 100, false),
        (Granularity::PerGroup(64), true, 33, 200, true),
        (Granularity::PerChannel, false, 130, 48, false),
    ];
    for &(gran, asym, rows, cols, act_order) in cases {
        let q = int4_tensor(gran, asym, rows, cols, act_order, &mut rng);
        let mut pk = PackedLinear::new(&q).unwrap();
        pk.set_act_mode(ActMode::Int8Block).unwrap();
        // 12 and 46: 8-token passes plus a 4-token and a 4 + 2 rest
        for &n in &[5usize, 12, 17, 46, 67, 131] {
            let x: Vec<f32> = (0..n * cols)
                .map(|i| rng.f() * if (i / 29) % 4 == 0 { 6.0 } else { 0.3 })
                .collect();
            for isa in Isa::all_supported() {
                let mut single = vec![0f32; n * rows];
                for t in 0..n {
                    pk.forward_with(
                        isa,
                        &x[t * cols..(t + 1) * cols],
                        1,
                        &mut single[t * rows..(t + 1) * rows],
                    )
                    .unwrap();
                }
                for threads in [1, 3] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut y = vec![f32::NAN; n * rows];
                    pool.install(|| pk.forward_with(isa, &x, n, &mut y))
                        .unwrap();
                    for (i, (a, b)) in y.iter().zip(&single).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{gran:?} asym={asym} {rows}x{cols} {isa:?} n={n} threads={threads} token {} row {}: {a} vs {b}",
                            i / rows,
                            i % rows
                        );
                    }
                }
            }
        }
    }
}

/// Large odd batches against the f64 evaluation of the same math (the prefill scheduler's
/// ragged token blocks and row blocks).
#[test]
fn int4_prefill_batches_same_math() {
    let mut rng = Rng(16);
    let q = int4_tensor(Granularity::PerGroup(128), false, 37, 576, false, &mut rng);
    check(&q, &[65, 131], &mut rng, "int4 g128 prefill");
    let q = int4_tensor(Granularity::PerGroup(32), true, 11, 100, true, &mut rng);
    check(&q, &[67], &mut rng, "int4 g32 asym act-order prefill");
}
