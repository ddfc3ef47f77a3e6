//! Gemma-3 wiring on a tiny deterministic model built in code: the forward pass against an
//! independent naive implementation of Hugging Face's `Gemma3ForCausalLM` (embedding scale,
//! `1 + w` norms stored as effective weights, q/k norms, post-attention / post-MLP norms,
//! tanh-GELU, `query_pre_attn_scalar`, local/global RoPE bases, sliding-window mask, tied head),
//! plus the sliding-window invariants.

use lowbit_model::config::{Arch, Gemma3Params, ModelConfig, RopeScaling};
use lowbit_model::llama::{Logits, Model};
use lowbit_model::weights::{build_model, TensorSource};
use lowbit_model::Result;

fn cfg(window: usize, pattern: usize, local_theta: f64) -> ModelConfig {
    ModelConfig {
        arch: Arch::Gemma3(Gemma3Params {
            sliding_window: window,
            sliding_window_pattern: pattern,
            rope_local_theta: local_theta,
            query_pre_attn_scalar: 24.0,
        }),
        vocab_size: 37,
        hidden_size: 24,
        intermediate_size: 40,
        n_layers: 3,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
        rope_theta: 1_000_000.0,
        rope_scaling: RopeScaling::None,
        rms_eps: 1e-6,
        max_ctx: 128,
        tie_embeddings: true,
        qkv_bias: false,
        bos_token_id: Some(2),
        eos_token_id: Some(1),
    }
}

/// Deterministic pseudo-random tensors by HF name; norms (effective weights) around 1 with a
/// wide spread so that a norm applied in the wrong place changes the logits.
struct Src {
    c: ModelConfig,
}

fn values(name: &str, n: usize, a: f32, center: f32) -> Vec<f32> {
    let mut s: u64 = name.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            center + a * (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        })
        .collect()
}

impl TensorSource for Src {
    fn get_f32(&mut self, name: &str) -> Result<Option<Vec<f32>>> {
        let c = &self.c;
        let (h, f, d) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let (q, kv) = (c.q_dim(), c.kv_dim());
        let v = if name.ends_with("q_norm.weight") || name.ends_with("k_norm.weight") {
            values(name, d, 0.6, 1.0)
        } else if name.ends_with("norm.weight") {
            values(name, h, 0.6, 1.0)
        } else if name == "model.embed_tokens.weight" {
            values(name, c.vocab_size * h, 0.2, 0.0)
        } else if name.ends_with(".bias") || name == "lm_head.weight" {
            return Ok(None);
        } else {
            let (o, i) = match name.rsplit('.').nth(1) {
                Some("q_proj") => (q, h),
                Some("k_proj") | Some("v_proj") => (kv, h),
                Some("o_proj") => (h, q),
                Some("gate_proj") | Some("up_proj") => (f, h),
                Some("down_proj") => (h, f),
                _ => return Ok(None),
            };
            values(name, o * i, 1.5 / (i as f32).sqrt(), 0.0)
        };
        Ok(Some(v))
    }
}

fn model(c: ModelConfig) -> Model {
    build_model(c.clone(), &mut Src { c }).unwrap()
}

// ---- naive reference (f64, straight from the HF modeling code) ----

fn rms(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * inv * g).collect()
}

fn matvec(w: &[f64], x: &[f64]) -> Vec<f64> {
    w.chunks(x.len())
        .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn rope(x: &mut [f64], pos: usize, theta: f64) {
    let d = x.len();
    for i in 0..d / 2 {
        let a = pos as f64 / theta.powf(2.0 * i as f64 / d as f64);
        let (x0, x1) = (x[i], x[i + d / 2]);
        x[i] = x0 * a.cos() - x1 * a.sin();
        x[i + d / 2] = x1 * a.cos() + x0 * a.sin();
    }
}

fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

fn naive_logits(c: &ModelConfig, tokens: &[u32]) -> Vec<Vec<f64>> {
    let g = *c.gemma3().unwrap();
    let mut s = Src { c: c.clone() };
    let mut t = |n: &str| -> Vec<f64> {
        s.get_f32(n)
            .unwrap()
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .collect()
    };
    let (h, d, nh, nkv) = (c.hidden_size, c.head_dim, c.n_heads, c.n_kv_heads);
    let eps = c.rms_eps as f64;
    let emb = t("model.embed_tokens.weight");
    let mut hs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&id| {
            emb[id as usize * h..][..h]
                .iter()
                .map(|v| v * (h as f64).sqrt())
                .collect()
        })
        .collect();
    let n = tokens.len();
    for l in 0..c.n_layers {
        let p = |s: &str| format!("model.layers.{l}.{s}.weight");
        let sliding = (l + 1) % g.sliding_window_pattern != 0;
        let theta = if sliding {
            g.rope_local_theta
        } else {
            c.rope_theta
        };
        let (wq, wk, wv, wo) = (
            t(&p("self_attn.q_proj")),
            t(&p("self_attn.k_proj")),
            t(&p("self_attn.v_proj")),
            t(&p("self_attn.o_proj")),
        );
        let (qn, kn) = (t(&p("self_attn.q_norm")), t(&p("self_attn.k_norm")));
        let (n_in, n_post, n_pre_ff, n_post_ff) = (
            t(&p("input_layernorm")),
            t(&p("post_attention_layernorm")),
            t(&p("pre_feedforward_layernorm")),
            t(&p("post_feedforward_layernorm")),
        );
        let (wg, wu, wd) = (
            t(&p("mlp.gate_proj")),
            t(&p("mlp.up_proj")),
            t(&p("mlp.down_proj")),
        );
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, x) in hs.iter().enumerate() {
            let xn = rms(x, &n_in, eps);
            let (q, k, v) = (matvec(&wq, &xn), matvec(&wk, &xn), matvec(&wv, &xn));
            let mut q: Vec<Vec<f64>> = q.chunks(d).map(|r| rms(r, &qn, eps)).collect();
            let mut k: Vec<Vec<f64>> = k.chunks(d).map(|r| rms(r, &kn, eps)).collect();
            q.iter_mut().for_each(|r| rope(r, pos, theta));
            k.iter_mut().for_each(|r| rope(r, pos, theta));
            qs.push(q);
            ks.push(k);
            vs.push(v.chunks(d).map(|r| r.to_vec()).collect::<Vec<_>>());
        }
        let scale = 1.0 / g.query_pre_attn_scalar.sqrt();
        for i in 0..n {
            let mut att = vec![0f64; nh * d];
            for hh in 0..nh {
                let kh = hh / (nh / nkv);
                // HF sliding mask: kv_idx > q_idx - sliding_window, and causal.
                let keys: Vec<usize> = (0..=i)
                    .filter(|&j| !sliding || (j as i64) > i as i64 - g.sliding_window as i64)
                    .collect();
                let sc: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        qs[i][hh]
                            .iter()
                            .zip(&ks[j][kh])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|s| (s - m).exp()).sum();
                for (s, &j) in sc.iter().zip(&keys) {
                    let w = (s - m).exp() / z;
                    for e in 0..d {
                        att[hh * d + e] += w * vs[j][kh][e];
                    }
                }
            }
            let o = rms(&matvec(&wo, &att), &n_post, eps);
            hs[i].iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let xn = rms(&hs[i], &n_pre_ff, eps);
            let act: Vec<f64> = matvec(&wg, &xn)
                .iter()
                .zip(matvec(&wu, &xn))
                .map(|(g, u)| gelu_tanh(*g) * u)
                .collect();
            let o = rms(&matvec(&wd, &act), &n_post_ff, eps);
            hs[i].iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        }
    }
    let fnorm = t("model.norm.weight");
    hs.iter()
        .map(|x| matvec(&emb, &rms(x, &fnorm, eps)))
        .collect()
}

fn logits(m: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut cache = m.new_cache("f32").unwrap();
    m.forward(tokens, cache.as_mut(), Logits::All).unwrap()
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7 + 3) % 37).collect()
}

#[test]
fn config_pattern_scale_and_windows() {
    let c = cfg(4, 3, 10_000.0);
    assert_eq!(
        (0..6).map(|i| c.sliding_window(i)).collect::<Vec<_>>(),
        [Some(4), Some(4), None, Some(4), Some(4), None]
    );
    assert_eq!(c.attn_scale(), (1.0 / 24f64.sqrt()) as f32);
    let mut llama = cfg(4, 3, 10_000.0);
    llama.arch = Arch::Llama;
    assert_eq!(llama.sliding_window(0), None);
    assert_eq!(llama.attn_scale(), 1.0 / 8f32.sqrt());
}

#[test]
fn forward_matches_naive_gemma3_with_window_shorter_than_prompt() {
    let c = cfg(4, 3, 10_000.0);
    let m = model(c.clone());
    let toks = tokens(11);
    let ours = logits(&m, &toks);
    let want = naive_logits(&c, &toks);
    let mut worst = 0f64;
    for (row, w) in ours.chunks(c.vocab_size).zip(&want) {
        for (a, b) in row.iter().zip(w) {
            worst = worst.max((*a as f64 - b).abs() / (1.0 + b.abs()));
        }
    }
    assert!(worst < 2e-4, "max relative diff {worst}");
}

#[test]
fn window_at_least_the_sequence_equals_global_attention() {
    // Same RoPE base on every layer, so the only local/global difference is the mask.
    let toks = tokens(9);
    let global = logits(&model(cfg(9, 1, 1_000_000.0)), &toks);
    let wide = logits(&model(cfg(9, 3, 1_000_000.0)), &toks);
    assert_eq!(
        global, wide,
        "window >= sequence must be full causal attention"
    );
    let narrow = logits(&model(cfg(3, 3, 1_000_000.0)), &toks);
    let v = 37;
    // Positions 0..3 see the same (at most 3) keys; later ones lose keys to the window.
    assert_eq!(global[..3 * v], narrow[..3 * v]);
    assert!(global[3 * v..]
        .iter()
        .zip(&narrow[3 * v..])
        .any(|(a, b)| (a - b).abs() > 1e-3));
}

#[test]
fn decode_step_by_step_matches_prefill_across_the_window() {
    let c = cfg(4, 3, 10_000.0);
    let m = model(c.clone());
    let toks = tokens(12);
    let full = logits(&m, &toks);
    let mut cache = m.new_cache("f32").unwrap();
    let mut last = Vec::new();
    // A 5-token chunk, then one token at a time.
    last.extend(m.forward(&toks[..5], cache.as_mut(), Logits::All).unwrap());
    for t in &toks[5..] {
        last.extend(m.forward(&[*t], cache.as_mut(), Logits::Last).unwrap());
    }
    let worst = full
        .iter()
        .zip(&last)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "decode vs prefill max diff {worst}");
}

#[test]
fn missing_gemma_norms_and_pre_rope_policies_are_errors() {
    struct NoQNorm(Src);
    impl TensorSource for NoQNorm {
        fn get_f32(&mut self, name: &str) -> Result<Option<Vec<f32>>> {
            if name.ends_with("q_norm.weight") {
                return Ok(None);
            }
            self.0.get_f32(name)
        }
    }
    let c = cfg(4, 3, 10_000.0);
    let e = build_model(c.clone(), &mut NoQNorm(Src { c: c.clone() })).unwrap_err();
    assert!(e.to_string().contains("q_norm"), "{e}");
    assert!(model(c.clone()).new_cache("kivi2,rope=pre").is_err());
    let mut llama = c;
    llama.arch = Arch::Llama;
    let l = lowbit_model::weights::random_model(llama, 1).unwrap();
    assert!(l.new_cache("kivi2,rope=pre").is_ok());
}
