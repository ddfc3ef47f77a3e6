//! W8A8: activation quantization and integer GEMV/GEMM, every path against the exact integer
//! reference (integer sums are exact, so results must match bit for bit).
#![allow(clippy::needless_range_loop)]

use lowbit_kernels::w8a8::{try_quantize_activations_int8_per_token, W8A8Linear};
use lowbit_kernels::{quantize_activations_int8_per_token, Isa};
use lowbit_numerics::{ElemFormat, Granularity, QuantizedTensor, ScaleDtype, Scheme};

mod common;
use common::Rng;

fn int8_tensor(rows: usize, cols: usize, gran: Granularity, rng: &mut Rng) -> QuantizedTensor {
    let scheme = Scheme {
        elem: ElemFormat::Int { bits: 8 },
        granularity: gran,
        scale_dtype: ScaleDtype::F32,
        asymmetric: false,
        global_scale: false,
    };
    let (gr, gc) = gran.grid(rows, cols);
    QuantizedTensor {
        scheme,
        rows,
        cols,
        // code 0 (= -128) included on purpose
        data: (0..rows * cols)
            .map(|i| if i % 97 == 0 { 0 } else { rng.next() as u8 })
            .collect(),
        scales: (0..gr * gc).map(|_| 0.001 + 0.01 * rng.f().abs()).collect(),
        zero_points: None,
        global_scale: None,
        g_idx: None,
        nested: None,
    }
}

#[test]
fn activation_quantization_error_is_at_most_half_a_step() {
    let mut rng = Rng(11);
    let (t, c) = (5, 77);
    let mut x: Vec<f32> = (0..t * c).map(|_| rng.f() * 3.0).collect();
    x[2 * c..3 * c].fill(0.0);
    let (q, s) = quantize_activations_int8_per_token(&x, t, c);
    assert_eq!(s[2], 0.0);
    for tok in 0..t {
        let amax = x[tok * c..(tok + 1) * c]
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(s[tok], amax / 127.0);
        for i in 0..c {
            let v = q[tok * c + i];
            assert!(v != i8::MIN);
            let err = (v as f32 * s[tok] - x[tok * c + i]).abs();
            assert!(
                err <= s[tok] * 0.5001 + 1e-30,
                "token {tok} col {i}: err {err} step {}",
                s[tok]
            );
        }
    }
    assert!(try_quantize_activations_int8_per_token(&x, t, c + 1).is_err());
}

#[test]
fn integer_gemm_is_exact_on_every_path() {
    let mut rng = Rng(12);
    for &(rows, cols) in &[(1, 1), (7, 576), (5, 100), (13, 129), (4, 64)] {
        for gran in [Granularity::PerChannel, Granularity::PerTensor] {
            let q = int8_tensor(rows, cols, gran, &mut rng);
            let lin = W8A8Linear::new(&q).unwrap();
            for &t in &[1usize, 2, 3, 5, 8, 17] {
                let x: Vec<f32> = (0..t * cols).map(|_| rng.f()).collect();
                let (xq, xs) = quantize_activations_int8_per_token(&x, t, cols);
                let iref = lin.int_dot_reference(&xq, t);
                for isa in Isa::all_supported() {
                    let mut y = vec![f32::NAN; t * rows];
                    lin.forward_quantized_with(isa, &xq, &xs, t, &mut y)
                        .unwrap();
                    for tok in 0..t {
                        for r in 0..rows {
                            let ws = match gran {
                                Granularity::PerTensor => q.scales[0],
                                _ => q.scales[r],
                            };
                            let want = iref[tok * rows + r] as f32 * (xs[tok] * ws);
                            assert_eq!(
                                y[tok * rows + r].to_bits(),
                                want.to_bits(),
                                "{isa:?} {rows}x{cols} batch {t} at ({tok},{r})"
                            );
                        }
                    }
                }
                // the integer reference itself against a direct f64 product of the codes
                for r in 0..rows {
                    let d: i64 = (0..cols)
                        .map(|c| xq[c] as i64 * (q.data[r * cols + c] as i64 - 128))
                        .sum();
                    assert_eq!(d, iref[r] as i64);
                }
            }
        }
    }
}

#[test]
fn rejects_other_schemes_and_bad_inputs() {
    let mut rng = Rng(13);
    let mut q = int8_tensor(3, 32, Granularity::PerChannel, &mut rng);
    let lin = W8A8Linear::new(&q).unwrap();
    assert!(lin
        .forward_quantized_with(Isa::Scalar, &[i8::MIN; 32], &[1.0], 1, &mut [0.0; 3])
        .is_err());
    assert!(lin.forward(&[0.0; 31], 1, &mut [0.0; 3]).is_err());
    q.scheme.elem = ElemFormat::Int { bits: 4 };
    q.data.truncate(3 * 16);
    assert!(matches!(
        W8A8Linear::new(&q),
        Err(lowbit_kernels::Error::Unsupported(_))
    ));
}
