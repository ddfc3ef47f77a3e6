//! Cross-check against the numerics crate: quantize real-valued weights with
//! `lowbit_numerics::quantize`, dequantize them with `QuantizedTensor::dequantize`, and require
//! `PackedLinear::forward` to match the f64 product with those weights, for every scheme the
//! kernels support. This pins the kernels to the numerics engineer's reading of the layout
//! contract (zero points, NVFP4 global scale, NF4 / E2M1 tables, FP8, 2-D blocks, ragged groups).
//!
//! Tolerance as in `tests/packed.rs`, with `|s v| + |b| <= |w| + 2 max_row |w|` bounding the
//! per-weight magnitude (the zero-point term of asymmetric schemes is at most the row's range).

#![allow(clippy::needless_range_loop)]

use lowbit_kernels::{Isa, PackedLinear};
use lowbit_numerics::{quantize, QuantOptions, Scheme};

struct Rng(u64);
impl Rng {
    fn f(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

#[test]
fn packed_forward_matches_numerics_dequantize() {
    let mut rng = Rng(42);
    let (rows, cols) = (9, 576);
    for name in [
        "int4-g128-sym",
        "int4-g128-asym",
        "int4-g64-sym",
        "int4-g32-asym",
        "int8-pc",
        "int3-g128-sym",
        "int2-g64-asym",
        "fp8-pc",
        "fp8-b128",
        "fp8-e5m2-pc",
        "nvfp4",
        "mxfp4",
        "nf4-g64",
    ] {
        let scheme = Scheme::from_name(name).unwrap();
        // weights with a few large input channels, like real checkpoints
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| rng.f() * if i % cols % 97 == 0 { 8.0 } else { 1.0 })
            .collect();
        let q = quantize(&w, rows, cols, &scheme, &QuantOptions::default()).unwrap();
        let wd = q.dequantize().unwrap();
        let pk = PackedLinear::new(&q).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(pk.to_quantized(), q, "{name}: round trip");
        let groups = q.grid().1;
        let u = f32::EPSILON as f64 / 2.0;
        for t in [1usize, 3, 17] {
            let x: Vec<f32> = (0..t * cols).map(|_| rng.f()).collect();
            for isa in Isa::all_supported() {
                let mut y = vec![f32::NAN; t * rows];
                pk.forward_with(isa, &x, t, &mut y).unwrap();
                for tok in 0..t {
                    for r in 0..rows {
                        let wr = &wd[r * cols..(r + 1) * cols];
                        let rmax = wr.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
                        let (mut exact, mut m) = (0f64, 0f64);
                        for c in 0..cols {
                            let xv = x[tok * cols + c] as f64;
                            exact += xv * wr[c] as f64;
                            m += xv.abs() * (wr[c].abs() as f64 + 2.0 * rmax);
                        }
                        let tol = 2.0 * (cols + groups + 4) as f64 * u * m + exact.abs() * u;
                        let got = y[tok * rows + r] as f64;
                        assert!(
                            (got - exact).abs() <= tol,
                            "{name} {isa:?} batch {t} ({tok},{r}): {got} vs {exact} (tol {tol:e})"
                        );
                    }
                }
            }
        }
    }
}
