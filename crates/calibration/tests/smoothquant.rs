//! SmoothQuant W8A8: migrating outliers into the weights lowers the output error of per-token
//! 8-bit activations x per-channel 8-bit weights.

mod common;

use common::{layer, scheme};
use lowbit_calibration::*;

/// Output error of (fake-quantized X / s) · Q(W diag(s))ᵀ against X Wᵀ, computed directly.
fn w8a8_error(l: &common::Layer, s: &[f32], wscheme: &str, act: ActQuant) -> f64 {
    let mut ws = l.w.clone();
    fold::scale_columns(&mut ws, l.rows, l.cols, s).unwrap();
    let wq = rtn_dequantized(&ws, l.rows, l.cols, &scheme(wscheme), &RtnConfig::default()).unwrap();
    let mut xs: Vec<f32> =
        l.x.chunks(l.cols)
            .flat_map(|r| r.iter().zip(s).map(|(a, b)| a / b))
            .collect();
    fake_quant_activations_per_token(&mut xs, l.n, l.cols, act).unwrap();
    let (mut num, mut den) = (0f64, 0f64);
    for t in 0..l.n {
        for r in 0..l.rows {
            let y: f64 = (0..l.cols)
                .map(|j| l.x[t * l.cols + j] as f64 * l.w[r * l.cols + j] as f64)
                .sum();
            let yq: f64 = (0..l.cols)
                .map(|j| xs[t * l.cols + j] as f64 * wq[r * l.cols + j] as f64)
                .sum();
            num += (y - yq).powi(2);
            den += y * y;
        }
    }
    (num / den).sqrt()
}

#[test]
fn smoothing_helps_w8a8_with_outlier_channels() {
    let l = layer(32, 128, 256, 4, 50.0, 31);
    let mut st = InputStats::new(l.cols);
    st.add_rows(&l.x, l.n).unwrap();
    let lin = [LinearWeight {
        w: &l.w,
        rows: l.rows,
    }];
    let s = smoothquant_scales(&lin, &st.abs_max().unwrap(), &SqConfig::default()).unwrap();
    let ones = vec![1f32; l.cols];
    for (ws, act) in [("int8-pc", ActQuant::Int8), ("fp8-pc", ActQuant::Fp8E4m3)] {
        let plain = w8a8_error(&l, &ones, ws, act);
        let smooth = w8a8_error(&l, &s, ws, act);
        eprintln!("{ws} {act:?}: plain {plain:.5} smoothed {smooth:.5}");
        // FP8's relative precision makes it far less sensitive to outlier channels than INT8.
        let need = if act == ActQuant::Int8 { 0.8 } else { 1.0 };
        assert!(smooth < need * plain, "{ws}: {smooth} vs {plain}");
    }
}

#[test]
fn sensitivity_from_hessian_matches_replay() {
    let l = layer(24, 96, 500, 2, 5.0, 32);
    let mut h = HessianAccumulator::new(l.cols);
    h.add_rows(&l.x, l.n).unwrap();
    let q = rtn_dequantized(
        &l.w,
        l.rows,
        l.cols,
        &scheme("int3-g32-sym"),
        &RtnConfig::default(),
    )
    .unwrap();
    let a = relative_output_error(&l.w, &q, l.rows, l.cols, &l.x, l.n).unwrap();
    let b = relative_output_error_from_hessian(&l.w, &q, l.rows, l.cols, &h).unwrap();
    assert!((a - b).abs() < 1e-4 * a, "{a} vs {b}");
    assert!(a > 0.01);
    assert_eq!(
        relative_output_error(&l.w, &l.w, l.rows, l.cols, &l.x, l.n).unwrap(),
        0.0
    );
}
