//! W8A8 on AMX tiles: the tile packing, the zero padding of ragged tails and the blocked
//! product with emulated `tdpbssd` run everywhere and must equal the exact integer reference;
//! the hardware path runs where AMX is usable and is skipped with a message otherwise, unless
//! `LOWBIT_REQUIRE_AMX=1`, which turns a missing AMX into a failure (set it on AMX machines).
#![allow(clippy::needless_range_loop)]

use lowbit_kernels::amx::{
    self, b_tile_offset, pad_activations, tdpbssd_emulated, AmxPackedB, TILE_BYTES, TILE_COLSB,
    TILE_K, TILE_N, TILE_ROWS,
};
use lowbit_kernels::w8a8::{W8A8Linear, W8A8Path};
use lowbit_kernels::{quantize_activations_int8_per_token, Error};
use lowbit_numerics::{ElemFormat, Granularity, QuantizedTensor, ScaleDtype, Scheme};

mod common;
use common::Rng;

fn int8_tensor(rows: usize, cols: usize, rng: &mut Rng) -> QuantizedTensor {
    QuantizedTensor {
        scheme: Scheme {
            elem: ElemFormat::Int { bits: 8 },
            granularity: Granularity::PerChannel,
            scale_dtype: ScaleDtype::F32,
            asymmetric: false,
            global_scale: false,
        },
        rows,
        cols,
        // code 0 (= -128, the one weight value activations never take) included on purpose
        data: (0..rows * cols)
            .map(|i| if i % 89 == 0 { 0 } else { rng.next() as u8 })
            .collect(),
        scales: (0..rows).map(|_| 0.001 + 0.01 * rng.f().abs()).collect(),
        zero_points: None,
        global_scale: None,
        g_idx: None,
        nested: None,
    }
}

/// Activations with the extremes +-127 forced in, quantized per token.
fn activations(t: usize, cols: usize, rng: &mut Rng) -> (Vec<i8>, Vec<f32>) {
    let x: Vec<f32> = (0..t * cols)
        .map(|i| match i % 53 {
            0 => 4.0,
            1 => -4.0,
            _ => rng.f(),
        })
        .collect();
    quantize_activations_int8_per_token(&x, t, cols)
}

/// Ragged in every dimension: tokens, channels and columns around the 16 / 32 / 64 tile edges.
const SHAPES: &[(usize, usize, usize)] = &[
    // (rows, cols, tokens)
    (1, 1, 1),
    (16, 64, 16),
    (17, 65, 17),
    (15, 63, 15),
    (33, 128, 33),
    (31, 127, 31),
    (48, 200, 48),
    (100, 576, 50),
    (64, 192, 64),
    (7, 1000, 3),
    (130, 129, 70),
];

#[test]
fn tdpbssd_emulation_follows_the_instruction_definition() {
    let mut rng = Rng(21);
    let mut a = [[0i8; TILE_COLSB]; TILE_ROWS];
    let mut b = [[0i8; TILE_COLSB]; TILE_ROWS];
    for r in 0..TILE_ROWS {
        for c in 0..TILE_COLSB {
            a[r][c] = rng.next() as i8;
            b[r][c] = if (r + c) % 7 == 0 {
                -128
            } else {
                rng.next() as i8
            };
        }
    }
    // start near the int32 limits so the 32-bit wrap-around is exercised too
    let mut c = [[0i32; TILE_N]; TILE_ROWS];
    for m in 0..TILE_ROWS {
        for n in 0..TILE_N {
            c[m][n] = if (m + n) % 2 == 0 {
                i32::MAX - 3
            } else {
                i32::MIN + 2
            };
        }
    }
    let c0 = c;
    tdpbssd_emulated(&mut c, &a, &b);
    let mut wrapped = 0;
    for m in 0..TILE_ROWS {
        for n in 0..TILE_N {
            // C[m][n] += sum_k A[m][k] * B[k / 4][4n + k % 4], modulo 2^32
            let s: i64 = (0..TILE_K)
                .map(|k| a[m][k] as i64 * b[k / 4][4 * n + k % 4] as i64)
                .sum();
            let want = (c0[m][n] as i64 + s) as i32;
            wrapped += usize::from(c0[m][n] as i64 + s != want as i64);
            assert_eq!(c[m][n], want, "({m},{n})");
        }
    }
    assert!(wrapped > 0, "the start values should make some sums wrap");
}

#[test]
fn b_packing_is_the_tile_layout_with_zero_padding() {
    let mut rng = Rng(22);
    for &(rows, cols) in &[(1, 1), (17, 65), (16, 64), (40, 130)] {
        let stride = cols + 3;
        let w: Vec<i8> = (0..rows * stride).map(|_| rng.next() as i8).collect();
        let b = AmxPackedB::new(&w, rows, cols, stride).unwrap();
        let (nblk, kblk) = (rows.div_ceil(TILE_N), cols.div_ceil(TILE_K));
        assert_eq!(b.bytes(), nblk * kblk * TILE_BYTES);
        for nb in 0..nblk {
            for kb in 0..kblk {
                let tile = b.tile(nb, kb);
                for n in 0..TILE_N {
                    for k in 0..TILE_K {
                        let (r, c) = (nb * TILE_N + n, kb * TILE_K + k);
                        let want = if r < rows && c < cols {
                            w[r * stride + c]
                        } else {
                            0
                        };
                        // byte 4n + k%4 of row k/4
                        assert_eq!(tile[(k / 4) * TILE_COLSB + 4 * n + k % 4], want);
                        assert_eq!(b_tile_offset(n, k), (k / 4) * TILE_COLSB + 4 * n + k % 4);
                    }
                }
            }
        }
    }
    assert!(AmxPackedB::new(&[0; 10], 2, 6, 5).is_err());
    assert!(AmxPackedB::new(&[0; 10], 2, 6, 6).is_err());
}

#[test]
fn activation_padding_is_zero() {
    let mut rng = Rng(23);
    let (t, cols) = (17, 70);
    let xq: Vec<i8> = (0..t * cols).map(|_| rng.next() as i8 | 1).collect();
    let (a, mp, lda) = pad_activations(&xq, t, cols);
    assert_eq!((mp, lda, a.len()), (32, 192, 32 * 192));
    for r in 0..mp {
        for c in 0..lda {
            let want = if r < t && c < cols {
                xq[r * cols + c]
            } else {
                0
            };
            assert_eq!(a[r * lda + c], want, "({r},{c})");
        }
    }
}

#[test]
fn emulated_amx_product_is_exact_on_ragged_shapes() {
    let mut rng = Rng(24);
    for &(rows, cols, t) in SHAPES {
        let lin = W8A8Linear::new(&int8_tensor(rows, cols, &mut rng)).unwrap();
        let (xq, _) = activations(t, cols, &mut rng);
        let want = lin.int_dot_reference(&xq, t);
        let got = lin.amx_int_dot_emulated(&xq, t).unwrap();
        assert_eq!(got, want, "{rows}x{cols} tokens {t}");
    }
    let lin = W8A8Linear::new(&int8_tensor(5, 40, &mut rng)).unwrap();
    assert!(matches!(
        lin.amx_int_dot_emulated(&[0; 39], 1),
        Err(Error::Shape(_))
    ));
    assert_eq!(lin.amx_int_dot_emulated(&[], 0).unwrap(), Vec::<i32>::new());
}

#[test]
fn amx_hardware_matches_reference_and_vnni() {
    if let Err(e) = amx::detect() {
        if std::env::var("LOWBIT_REQUIRE_AMX").as_deref() == Ok("1") {
            panic!("LOWBIT_REQUIRE_AMX=1 but AMX is not usable: {e}");
        }
        eprintln!("######## AMX TEST NOT RUN: {e} (set LOWBIT_REQUIRE_AMX=1 to make this fatal)");
        // without AMX the explicit path must be a typed error, not a crash
        let mut rng = Rng(25);
        let lin = W8A8Linear::new(&int8_tensor(3, 64, &mut rng)).unwrap();
        let mut y = [0f32; 3];
        assert!(matches!(
            lin.forward_quantized_path(W8A8Path::Amx, &[1; 64], &[1.0], 1, &mut y),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(
            lin.amx_int_dot(&[1; 64], 1),
            Err(Error::Unsupported(_))
        ));
        return;
    }
    eprintln!(
        "AMX usable; W8A8 path for 64 tokens: {}",
        W8A8Path::selected(64).name()
    );
    let mut rng = Rng(26);
    let shapes = SHAPES
        .iter()
        .copied()
        .chain([(4096, 4096, 64), (1000, 3000, 37)]);
    for (rows, cols, t) in shapes {
        let q = int8_tensor(rows, cols, &mut rng);
        let lin = W8A8Linear::new(&q).unwrap();
        let (xq, xs) = activations(t, cols, &mut rng);
        let want = lin.int_dot_reference(&xq, t);
        assert_eq!(
            lin.amx_int_dot(&xq, t).unwrap(),
            want,
            "{rows}x{cols} tokens {t}"
        );
        if !amx::available() {
            eprintln!("LOWBIT_AMX=0: layer built without AMX weights, f32 outputs not compared");
            continue;
        }
        let mut ya = vec![f32::NAN; t * rows];
        lin.forward_quantized_path(W8A8Path::Amx, &xq, &xs, t, &mut ya)
            .unwrap();
        for tok in 0..t {
            for r in 0..rows {
                let v = want[tok * rows + r] as f32 * (xs[tok] * q.scales[r]);
                assert_eq!(ya[tok * rows + r].to_bits(), v.to_bits(), "({tok},{r})");
            }
        }
        let mut yv = vec![f32::NAN; t * rows];
        if lin
            .forward_quantized_path(W8A8Path::Avx512Vnni, &xq, &xs, t, &mut yv)
            .is_ok()
        {
            let same = ya.iter().zip(&yv).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{rows}x{cols} tokens {t}: AMX and VNNI f32 outputs differ"
            );
        }
    }
}
