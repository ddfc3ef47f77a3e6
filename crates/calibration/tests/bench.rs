//! Timing probe for the SmolLM2-135M shapes (ignored by default; prints, never asserts times):
//! `cargo test --release -p lowbit-calibration --test bench -- --ignored --nocapture`

mod common;

use common::{scheme, Rng};
use lowbit_calibration::*;
use std::time::Instant;

#[test]
#[ignore]
fn smollm2_layer_shapes() {
    let mut rng = Rng::new(9);
    let tokens = 8192;
    for &(rows, cols) in &[(576usize, 576usize), (1536, 576), (576, 1536)] {
        let x: Vec<f32> = (0..tokens * cols).map(|_| rng.normal()).collect();
        let w: Vec<f32> = (0..rows * cols).map(|_| 0.05 * rng.normal()).collect();
        let t = Instant::now();
        let mut h = HessianAccumulator::new(cols);
        for c in x.chunks(512 * cols) {
            h.add_rows(c, c.len() / cols).unwrap();
        }
        let t_h = t.elapsed().as_secs_f64();
        let cfg = GptqConfig::default();
        let t = Instant::now();
        let prep = prepare_hessian(&h.hessian().unwrap(), cols, &cfg).unwrap();
        let t_p = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let r = gptq_prepared(&w, rows, cols, &scheme("int4-g128-sym"), &prep, &cfg).unwrap();
        let t_q = t.elapsed().as_secs_f64();
        eprintln!(
            "{rows}x{cols}: hessian {tokens} tokens {t_h:.3}s ({:.1} s per 65536), prepare {t_p:.3}s, \
             gptq {t_q:.3}s, loss {:.3}",
            t_h * 65536.0 / tokens as f64,
            r.loss
        );
    }
}

#[test]
#[ignore]
fn gemm_shapes() {
    let mut rng = Rng::new(10);
    for &(c, m) in &[(1536usize, 2048usize), (576, 2048)] {
        let xt: Vec<f32> = (0..c * m).map(|_| rng.normal()).collect();
        for round in 0..2 {
            let mut y = vec![0f32; c * c];
            let t = Instant::now();
            lowbit_kernels::dense::matmul_wt(&xt, &xt, &mut y, c, m, c).unwrap();
            let full = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let mut h = HessianAccumulator::new(c);
            let x: Vec<f32> = vec![0.5; c * m];
            h.add_rows(&x, m).unwrap();
            let acc = t.elapsed().as_secs_f64();
            eprintln!(
                "c={c} m={m} round {round}: full gemm {full:.3}s ({:.1} GFLOPS), accumulator {acc:.3}s",
                2.0 * (c * c * m) as f64 / full / 1e9
            );
        }
    }
}

#[test]
#[ignore]
fn linalg_1536() {
    let n = 1536;
    let mut rng = Rng::new(11);
    let x: Vec<f32> = (0..4096 * n).map(|_| rng.normal()).collect();
    let mut h = HessianAccumulator::new(n);
    h.add_rows(&x, 4096).unwrap();
    let hm = h.hessian().unwrap();
    for round in 0..2 {
        let mut a = hm.clone();
        let t = Instant::now();
        linalg::cholesky_in_place(&mut a, n).unwrap();
        let tc = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _ = linalg::lower_inverse_transposed(&a, n).unwrap();
        let ti = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _ = linalg::inverse_cholesky_upper(&hm, n).unwrap();
        let tu = t.elapsed().as_secs_f64();
        eprintln!(
            "n={n} round {round}: cholesky {tc:.3}s, tri-inverse {ti:.3}s, full factor {tu:.3}s"
        );
    }
}

#[test]
#[ignore]
fn awq_and_hqq_shapes() {
    let mut rng = Rng::new(12);
    let (cols, tokens) = (576usize, 4096usize);
    let x: Vec<f32> = (0..tokens * cols).map(|_| rng.normal()).collect();
    let mut st = InputStats::new(cols);
    st.add_rows(&x, tokens).unwrap();
    let g: Vec<f32> = (0..1536 * cols).map(|_| 0.05 * rng.normal()).collect();
    let u: Vec<f32> = (0..1536 * cols).map(|_| 0.05 * rng.normal()).collect();
    let lin = [
        LinearWeight { w: &g, rows: 1536 },
        LinearWeight { w: &u, rows: 1536 },
    ];
    let s = scheme("int4-g128-asym");
    let t = Instant::now();
    let r = awq(&lin, &st, &s, &[true, true], &AwqConfig::default()).unwrap();
    eprintln!(
        "awq gate/up 2x1536x576: {:.2}s alpha {:?}",
        t.elapsed().as_secs_f64(),
        r.scales.alpha
    );
    let t = Instant::now();
    hqq(&g, 1536, cols, &s, &HqqConfig::default()).unwrap();
    eprintln!("hqq 1536x576: {:.2}s", t.elapsed().as_secs_f64());
}
