//! Quantized linears run through the packed kernels (`lowbit_kernels::PackedLinear`); these
//! tests check that the model's logits through the kernels equal the dequantized f32 reference
//! path (`Linear::set_use_kernels(false)`), for prefill (a GEMM-sized chunk) and token-by-token
//! decode (GEMV), on tiny random models whose linears are quantized to int4-g32-sym, int8-pc and
//! nvfp4.
//!
//! # Tolerance (f32 accumulation-order error)
//! Both paths compute the exact product of the same decoded weights `w` with the same inputs,
//! in f32 and in different orders (the kernel also factors the group scale out of each group
//! sum: `s * sum(v * x)` instead of `sum((s * v) * x)`, and folds the NVFP4 global scale into
//! it). By the standard bound for a recursively/blockwise summed dot product of length `n`,
//! each differs from the exact value by at most `gamma(n + 3) * sum_k |w_k x_k|` with
//! `gamma(m) = m u / (1 - m u)`, `u = 2^-24` (`+3`: the scale product, the scale
//! multiplication and the final add). So one output of one layer may differ between the paths
//! by at most `2 gamma(n + 3) sum_k |w_k x_k|`: `per_linear_outputs_within_the_bound` checks
//! exactly that, with the layer's own `|w| . |x|`.
//!
//! For the logits that per-product error propagates through the network, and the worst-case
//! bound (linear in `n`) is far from what rounding errors do in practice; the logit tolerance
//! uses the probabilistic form of the same bound (Higham and Mary, 2019): with rounding errors
//! modelled as independent, `|error| <= lambda sqrt(n) u sum_k |w_k x_k|` holds with probability
//! at least `1 - 2n exp(-lambda^2 / 2)`; `lambda = 5` (failure probability < 1e-3 per product
//! even with no cancellation between products). It is taken at the widest product (`n_max`,
//! the intermediate size, + 3 as above), doubled for the two paths, applied once per quantized
//! product on the longest chain (`depth = 2 n_layers + 1`: attention and MLP of every block, then
//! the head, which is quantized or is a dense f32 product of an already-perturbed input;
//! q/k/v and gate/up are side by side, not in sequence) with unit gain, relative to the logit
//! scale `S = max |logit|`:
//! `tol = depth * 2 * lambda * sqrt(n_max + 3) * u * S`, about `5 * 2 * 5 * 9.1 * 6e-8 * S =
//! 2.7e-5 * S` here. Measured: decode differs by ~1e-7 * S (a few ulps of the logits); prefill
//! (the kernels' GEMM decodes a row block to f32 and runs the same dense GEMM) by 0. The test
//! also checks the tolerance is discriminating: quantization changes the logits by more than
//! 10x `tol`.

use lowbit_model::config::{Arch, ModelConfig, RopeScaling};
use lowbit_model::llama::{Logits, Model};
use lowbit_model::weights::random_model;
use lowbit_numerics::{quantize, QuantOptions, Scheme};

const SCHEMES: [&str; 3] = ["int4-g32-sym", "int8-pc", "nvfp4"];

fn cfg(qkv_bias: bool, tie: bool) -> ModelConfig {
    ModelConfig {
        arch: if qkv_bias { Arch::Qwen2 } else { Arch::Llama },
        vocab_size: 72,
        hidden_size: 64,
        // 80 = 2.5 groups of 32: a ragged last group and a column count that is not a
        // multiple of the kernel's 16-column chunk padding after grouping.
        intermediate_size: 80,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 16,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::None,
        rms_eps: 1e-5,
        max_ctx: 128,
        tie_embeddings: tie,
        qkv_bias,
        bos_token_id: None,
        eos_token_id: None,
    }
}

/// 24 prompt tokens (>= the kernels' GEMM threshold of 16) then 8 decode steps.
fn tokens(vocab: u32) -> Vec<u32> {
    (0..32u32).map(|i| (i * 37 + 11) % vocab).collect()
}
const PROMPT: usize = 24;

/// Unit roundoff of f32.
const U: f64 = f32::EPSILON as f64 / 2.0;
/// Confidence parameter of the probabilistic bound (see the module docs).
const LAMBDA: f64 = 5.0;

/// The worst-case factor `gamma(m) = m u / (1 - m u)`.
fn gamma(m: usize) -> f64 {
    m as f64 * U / (1.0 - m as f64 * U)
}

/// Quantize every linear of `m` (the decoder linears, and `lm_head` when untied) to `scheme`.
fn quantize_all(m: &mut Model, scheme: &str) {
    let scheme = Scheme::from_name(scheme).unwrap();
    for name in m.linear_names() {
        let l = m.linear_mut(&name).unwrap();
        let q = quantize(
            l.weight_f32(),
            l.out,
            l.inp,
            &scheme,
            &QuantOptions::default(),
        )
        .unwrap();
        l.set_quantized(q, |q| Ok(q.dequantize()?)).unwrap();
    }
}

fn set_kernels(m: &mut Model, on: bool) {
    for name in m.linear_names() {
        let l = m.linear_mut(&name).unwrap();
        assert_eq!(l.set_use_kernels(on).unwrap(), on, "{name}");
    }
}

/// Prefill logits of the first `PROMPT` tokens (one chunk) followed by the logits of each
/// decode step.
fn prefill_and_decode(m: &Model, toks: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let mut cache = m.new_cache("f32").unwrap();
    let pre = m
        .forward(&toks[..PROMPT], cache.as_mut(), Logits::All)
        .unwrap();
    let mut dec = Vec::new();
    for &t in &toks[PROMPT..] {
        dec.extend(m.forward(&[t], cache.as_mut(), Logits::All).unwrap());
    }
    (pre, dec)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max)
}

fn scale(a: &[f32]) -> f64 {
    a.iter().map(|v| v.abs() as f64).fold(0.0, f64::max)
}

#[test]
fn logits_through_kernels_match_dequantized_reference() {
    for (bias, tie) in [(false, true), (true, false)] {
        let base = random_model(cfg(bias, tie), 17).unwrap();
        let toks = tokens(base.config.vocab_size as u32);
        let (f32_pre, f32_dec) = prefill_and_decode(&base, &toks);
        for scheme in SCHEMES {
            let mut m = random_model(cfg(bias, tie), 17).unwrap();
            quantize_all(&mut m, scheme);
            // Packed kernels are the default for these formats.
            for name in m.linear_names() {
                assert!(m.linear(&name).unwrap().uses_kernels(), "{scheme} {name}");
            }
            let (k_pre, k_dec) = prefill_and_decode(&m, &toks);
            set_kernels(&mut m, false);
            let (r_pre, r_dec) = prefill_and_decode(&m, &toks);
            // Back to the kernels: the same numbers again (the switch is lossless).
            set_kernels(&mut m, true);
            let (k2_pre, k2_dec) = prefill_and_decode(&m, &toks);
            assert_eq!((&k_pre, &k_dec), (&k2_pre, &k2_dec), "{scheme}");

            let c = &m.config;
            let depth = 2 * c.n_layers + 1;
            let n_max = c.hidden_size.max(c.intermediate_size).max(c.q_dim());
            for (what, k, r, f) in [
                ("prefill", &k_pre, &r_pre, &f32_pre),
                ("decode", &k_dec, &r_dec, &f32_dec),
            ] {
                let tol = depth as f64 * 2.0 * LAMBDA * ((n_max + 3) as f64).sqrt() * U * scale(r);
                let err = max_abs_diff(k, r);
                eprintln!(
                    "bias={bias} tie={tie} {scheme} {what}: kernels vs reference max |d| = \
                     {err:.3e}, tol {tol:.3e} (scale {:.3}); quantization moved logits by {:.3e}",
                    scale(r),
                    max_abs_diff(r, f)
                );
                assert!(
                    k.iter().all(|v| v.is_finite()),
                    "{scheme} {what}: non-finite"
                );
                assert!(err <= tol, "{scheme} {what}: {err:e} > {tol:e}");
                // The tolerance can tell a right product from a wrong one.
                assert!(max_abs_diff(r, f) > 10.0 * tol, "{scheme} {what}");
            }
        }
    }
}

#[test]
fn per_linear_outputs_within_the_bound() {
    let mut m = random_model(cfg(true, false), 3).unwrap();
    for scheme in SCHEMES {
        quantize_all(&mut m, scheme);
        for name in m.linear_names() {
            let l = m.linear_mut(&name).unwrap();
            let (out, inp) = (l.out, l.inp);
            for n in [1usize, 3, 8, 16, 21] {
                let x: Vec<f32> = (0..n * inp)
                    .map(|i| (((i * 2654435761usize) % 1000) as f32 / 500.0 - 1.0) * 1.7)
                    .collect();
                let mut yk = vec![0f32; n * out];
                assert!(l.set_use_kernels(true).unwrap());
                l.forward(&x, n, &mut yk).unwrap();
                let mut yr = vec![0f32; n * out];
                assert!(!l.set_use_kernels(false).unwrap());
                l.forward(&x, n, &mut yr).unwrap();
                let w = l.weight_f32();
                for t in 0..n {
                    for o in 0..out {
                        let abs: f64 = (0..inp)
                            .map(|k| (w[o * inp + k] as f64 * x[t * inp + k] as f64).abs())
                            .sum();
                        let tol = 2.0 * gamma(inp + 3) * abs;
                        let d = (yk[t * out + o] as f64 - yr[t * out + o] as f64).abs();
                        assert!(
                            d <= tol,
                            "{scheme} {name} n={n} t={t} o={o}: {d:e} > {tol:e}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn unsupported_formats_fall_back_to_the_dense_path() {
    // FP6 has no packed kernel: the layer keeps its f32 decoding and still runs.
    let mut m = random_model(cfg(false, true), 5).unwrap();
    quantize_all(&mut m, "mxfp6-e2m3");
    for name in m.linear_names() {
        let l = m.linear_mut(&name).unwrap();
        assert!(l.is_quantized() && !l.uses_kernels(), "{name}");
        assert!(!l.set_use_kernels(true).unwrap(), "{name}");
    }
    let toks = tokens(m.config.vocab_size as u32);
    let (pre, dec) = prefill_and_decode(&m, &toks);
    assert!(pre.iter().chain(&dec).all(|v| v.is_finite()));
}

#[test]
fn packed_layers_decode_their_weight_on_demand() {
    let mut m = random_model(cfg(false, true), 9).unwrap();
    quantize_all(&mut m, "int4-g32-sym");
    let l = m.linear("model.layers.0.mlp.down_proj").unwrap();
    assert!(l.uses_kernels());
    // Exporters and the calibration pipeline still get the f32 decoding of the codes.
    let want = l.quantized().unwrap().dequantize().unwrap();
    assert_eq!(l.weight_f32(), &want[..]);
}
