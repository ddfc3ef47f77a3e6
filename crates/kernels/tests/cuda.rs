//! CUDA backend against the CPU reference (dequantize, then f64 matmul). Runs only with
//! `--features cuda`. Without a GPU the test reports the reason and returns, unless
//! `LOWBIT_REQUIRE_CUDA=1`, which turns a missing device into a failure (set it on GPU machines).
#![cfg(feature = "cuda")]

use lowbit_kernels::cuda::{CudaBackend, CudaLinear};
use lowbit_numerics::{quantize, QuantOptions, Scheme};

fn lcg(s: &mut u64) -> f32 {
    *s = s
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

#[test]
fn cuda_matches_dequantized_reference() {
    let backend = match CudaBackend::new(0) {
        Ok(b) => b,
        Err(e) if std::env::var("LOWBIT_REQUIRE_CUDA").as_deref() != Ok("1") => {
            eprintln!("CUDA test not run: {e} (set LOWBIT_REQUIRE_CUDA=1 to make this fatal)");
            return;
        }
        Err(e) => panic!("LOWBIT_REQUIRE_CUDA=1 but no usable CUDA device: {e}"),
    };
    eprintln!("CUDA device: {}", backend.device_name());
    let mut seed = 11u64;
    let schemes = [
        "int4-g128-sym",
        "int4-g32-asym",
        "int3-g128-sym",
        "int2-g64-asym",
        "int8-pc",
        "fp8-pc",
        "fp8-b128",
        "nvfp4",
        "mxfp4",
        "nf4-g64",
        "ternary",
    ];
    for name in schemes {
        let scheme = Scheme::from_name(name).unwrap();
        // Ragged rows, columns that are not a multiple of 4 or of the group (75: scalar x
        // tail in the word kernel), token counts that split into 8/4/2/1 launches.
        let shapes = [
            (37usize, 576usize, 1usize),
            (130, 1536, 3),
            (9, 160, 11),
            (5, 75, 5),
            (64, 2048, 8),
        ];
        for &(rows, cols, m) in &shapes {
            let w: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
            let x: Vec<f32> = (0..m * cols).map(|_| lcg(&mut seed)).collect();
            let q = match quantize(&w, rows, cols, &scheme, &QuantOptions::default()) {
                Ok(q) => q,
                // Block formats refuse column counts their block does not divide (a typed
                // error, tested in numerics); every scheme runs on the other shapes.
                Err(e) if cols == 75 => {
                    eprintln!("{name} {rows}x{cols}: not quantizable ({e}), shape skipped");
                    continue;
                }
                Err(e) => panic!("{name} {rows}x{cols}: {e}"),
            };
            let wd = q.dequantize().unwrap();
            let lin = CudaLinear::new(&backend, &q).unwrap();
            let bits = scheme.elem.bits();
            if matches!(bits, 4 | 8) {
                assert!(
                    lin.uses_word_kernel(),
                    "{name}: expected the word-wide kernel"
                );
            }
            let mut y = vec![f32::NAN; m * rows];
            lin.forward(&x, m, &mut y).unwrap();
            for t in 0..m {
                for r in 0..rows {
                    let (mut exact, mut mag) = (0f64, 0f64);
                    for c in 0..cols {
                        let p = x[t * cols + c] as f64 * wd[r * cols + c] as f64;
                        exact += p;
                        mag += p.abs();
                    }
                    // f32 accumulation in any order: |err| <= (cols + 8) * u * sum|x w|, plus the
                    // rounding of each dequantized weight product (one more u per term).
                    let tol = (cols as f64 + 10.0) * f32::EPSILON as f64 * mag + 1e-30;
                    let got = y[t * rows + r] as f64;
                    assert!(
                        (got - exact).abs() <= tol,
                        "{name} {rows}x{cols} m={m} t={t} r={r}: {got} vs {exact} (tol {tol})"
                    );
                }
            }
        }
    }
}

#[test]
fn nvrtc_compiles_every_kernel() {
    // Needs only libnvrtc, not a GPU: catches CUDA C errors on machines without a device.
    // NVRTC's default architecture and Hopper (which takes the FP8-conversion branch).
    for arch in [None, Some("compute_90")] {
        match lowbit_kernels::cuda::compile_kernels_ptx(arch) {
            Ok(ptx) => {
                if let Ok(path) = std::env::var("LOWBIT_DUMP_PTX") {
                    std::fs::write(&path, &ptx).unwrap();
                }
                for name in lowbit_kernels::cuda::kernel_names() {
                    assert!(
                        ptx.contains(&format!(".entry {name}(")),
                        "kernel {name} missing from the PTX"
                    );
                }
            }
            Err(e) if std::env::var("LOWBIT_REQUIRE_CUDA").as_deref() != Ok("1") => {
                eprintln!(
                "NVRTC compile check not run: {e} (set LOWBIT_REQUIRE_CUDA=1 to make this fatal)"
            );
            }
            Err(e) => panic!("LOWBIT_REQUIRE_CUDA=1 but NVRTC failed: {e}"),
        }
    }
}

#[test]
fn missing_device_is_an_error_not_a_panic() {
    // On a machine without CUDA this must be Err; with CUDA, a bogus ordinal must be Err.
    assert!(CudaBackend::new(4096).is_err());
}
