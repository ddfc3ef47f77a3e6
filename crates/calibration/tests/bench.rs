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
