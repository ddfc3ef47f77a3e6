//! Manual throughput probe (ignored; no timing assertions):
//! `cargo test --release -p lowbit-numerics --test block_speed -- --ignored --nocapture`.
//! The real benchmark is `cargo xtask bench convert`.

use lowbit_numerics::quantize::{quantize, QuantOptions};
use lowbit_numerics::Scheme;
use std::time::Instant;

fn best<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    let mut b = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f();
        b = b.min(t.elapsed().as_secs_f64());
    }
    b
}

#[test]
#[ignore]
fn probe() {
    let (rows, cols) = (1024usize, 4096usize);
    let mut s = 0x1234_5678u64;
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            if i % 1024 == 7 {
                u * 0.4
            } else {
                u * 0.04
            }
        })
        .collect();
    let bytes = (w.len() * 4) as f64;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    pool.install(|| {
        let mut dst = vec![0f32; w.len()];
        let copy = best(7, || dst.copy_from_slice(std::hint::black_box(&w)));
        let cg = bytes / copy / 1e9;
        println!("copy {cg:.2} GB/s");
        let names = std::env::var("PROBE")
            .unwrap_or_else(|_| "fp8-pc,int4-g128-asym,nvfp4,mxfp4,nf4-g64".into());
        for name in names.split(',') {
            let sc = Scheme::from_name(name).unwrap();
            let o = QuantOptions::default();
            let mut q = None;
            let tq = best(5, || q = Some(quantize(&w, rows, cols, &sc, &o).unwrap()));
            let q = q.unwrap();
            let mut out = vec![0f32; cols];
            let td = best(5, || {
                for r in 0..rows {
                    q.dequantize_row(r, &mut out).unwrap();
                    std::hint::black_box(&out);
                }
            });
            println!(
                "{name:16} quant {:.2} GB/s ({:.3})  dequant {:.2} GB/s ({:.3})",
                bytes / tq / 1e9,
                bytes / tq / 1e9 / cg,
                bytes / td / 1e9,
                bytes / td / 1e9 / cg
            );
        }
    });
}
