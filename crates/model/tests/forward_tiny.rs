//! Forward-pass tests on tiny random models built in code (no files needed).

use lowbit_model::config::{Arch, ModelConfig, RopeScaling};
use lowbit_model::llama::{Logits, Model, LAYER_LINEARS};
use lowbit_model::weights::random_model;

fn cfg(n_heads: usize, n_kv_heads: usize, qkv_bias: bool, tie: bool) -> ModelConfig {
    ModelConfig {
        arch: if qkv_bias { Arch::Qwen2 } else { Arch::Llama },
        vocab_size: 50,
        hidden_size: 32,
        intermediate_size: 48,
        n_layers: 2,
        n_heads,
        n_kv_heads,
        head_dim: 8,
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

const TOKENS: [u32; 11] = [3, 17, 42, 0, 49, 8, 8, 23, 11, 30, 5];

fn all_logits(m: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut cache = m.new_cache("f32").unwrap();
    m.forward(tokens, cache.as_mut(), Logits::All).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// An independent f64 implementation of the same network, written from the equations with
/// its own attention and "interleaved halves" RoPE, no KV cache: the reference.
fn reference_f64(m: &Model, tokens: &[u32]) -> Vec<f64> {
    let c = &m.config;
    let (h, d, nh, nkv) = (c.hidden_size, c.head_dim, c.n_heads, c.n_kv_heads);
    let n = tokens.len();
    let lin = |w: &[f32], b: Option<&Vec<f32>>, x: &[f64], inp: usize| -> Vec<f64> {
        let out = w.len() / inp;
        (0..out)
            .map(|o| {
                (0..inp).map(|k| w[o * inp + k] as f64 * x[k]).sum::<f64>()
                    + b.map_or(0.0, |b| b[o] as f64)
            })
            .collect()
    };
    let norm = |x: &[f64], g: &[f32]| -> Vec<f64> {
        let r = (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + c.rms_eps as f64).sqrt();
        x.iter().zip(g).map(|(v, g)| v / r * *g as f64).collect()
    };
    let rope = |v: &mut [f64], pos: usize| {
        for i in 0..d / 2 {
            let a = pos as f64 / c.rope_theta.powf(2.0 * i as f64 / d as f64);
            let (x0, x1) = (v[i], v[i + d / 2]);
            v[i] = x0 * a.cos() - x1 * a.sin();
            v[i + d / 2] = x1 * a.cos() + x0 * a.sin();
        }
    };
    let mut hs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| {
            m.embed[t as usize * h..][..h]
                .iter()
                .map(|&v| v as f64)
                .collect()
        })
        .collect();
    for layer in &m.layers {
        let (mut qs, mut ks, mut vs) = (vec![], vec![], vec![]);
        for (p, x) in hs.iter().enumerate() {
            let xn = norm(x, &layer.attn_norm);
            let mut q = lin(
                layer.q_proj.weight_f32(),
                layer.q_proj.bias.as_ref(),
                &xn,
                h,
            );
            let mut k = lin(
                layer.k_proj.weight_f32(),
                layer.k_proj.bias.as_ref(),
                &xn,
                h,
            );
            for hh in 0..nh {
                rope(&mut q[hh * d..][..d], p);
            }
            for hh in 0..nkv {
                rope(&mut k[hh * d..][..d], p);
            }
            qs.push(q);
            ks.push(k);
            vs.push(lin(
                layer.v_proj.weight_f32(),
                layer.v_proj.bias.as_ref(),
                &xn,
                h,
            ));
        }
        for t in 0..n {
            let mut att = vec![0f64; nh * d];
            for hh in 0..nh {
                let kh = hh / (nh / nkv);
                let s: Vec<f64> = (0..=t)
                    .map(|u| {
                        (0..d)
                            .map(|j| qs[t][hh * d + j] * ks[u][kh * d + j])
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for u in 0..=t {
                    for j in 0..d {
                        att[hh * d + j] += e[u] / z * vs[u][kh * d + j];
                    }
                }
            }
            let o = lin(layer.o_proj.weight_f32(), None, &att, nh * d);
            hs[t].iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let xn = norm(&hs[t], &layer.mlp_norm);
            let g = lin(layer.gate_proj.weight_f32(), None, &xn, h);
            let u = lin(layer.up_proj.weight_f32(), None, &xn, h);
            let a: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let dn = lin(layer.down_proj.weight_f32(), None, &a, c.intermediate_size);
            hs[t].iter_mut().zip(&dn).for_each(|(a, b)| *a += b);
        }
    }
    let head = m.lm_head.as_ref().map_or(&m.embed[..], |l| l.weight_f32());
    hs.iter()
        .flat_map(|x| lin(head, None, &norm(x, &m.norm), h))
        .collect()
}

#[test]
fn matches_independent_f64_reference() {
    for (heads, kv, bias, tie) in [
        (4, 4, false, true),
        (4, 2, false, false),
        (4, 1, true, true),
    ] {
        let m = random_model(cfg(heads, kv, bias, tie), 11).unwrap();
        let got = all_logits(&m, &TOKENS);
        let want = reference_f64(&m, &TOKENS);
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        let scale = want.iter().map(|v| v.abs()).fold(0.0, f64::max);
        assert!(
            err < 1e-4 * scale.max(1.0),
            "{heads}/{kv} bias={bias}: max error {err}"
        );
    }
}

#[test]
fn prefill_equals_token_by_token_decode() {
    let m = random_model(cfg(4, 2, true, false), 5).unwrap();
    let batched = all_logits(&m, &TOKENS);
    let mut cache = m.new_cache("f32").unwrap();
    let mut stepped = Vec::new();
    for t in TOKENS {
        stepped.extend(m.forward(&[t], cache.as_mut(), Logits::All).unwrap());
    }
    assert!(max_diff(&batched, &stepped) < 1e-4);
    // Chunked prefill (4 + 7) and `Logits::Last` agree as well.
    let mut cache = m.new_cache("f32").unwrap();
    m.forward(&TOKENS[..4], cache.as_mut(), Logits::Last)
        .unwrap();
    let last = m
        .forward(&TOKENS[4..], cache.as_mut(), Logits::Last)
        .unwrap();
    let v = m.config.vocab_size;
    assert!(max_diff(&last, &batched[(TOKENS.len() - 1) * v..]) < 1e-4);
}

#[test]
fn gqa_equals_mha_with_repeated_kv_heads() {
    let gqa = random_model(cfg(4, 2, false, true), 9).unwrap();
    let mut mha = random_model(cfg(4, 4, false, true), 9).unwrap();
    mha.embed = gqa.embed.clone();
    mha.norm = gqa.norm.clone();
    let (h, d) = (32, 8);
    for (lg, lm) in gqa.layers.iter().zip(mha.layers.iter_mut()) {
        for name in LAYER_LINEARS {
            let wg = lg.linear(name).unwrap().weight_f32();
            let w = if name == "self_attn.k_proj" || name == "self_attn.v_proj" {
                // KV head j serves query heads 2j and 2j+1: repeat each head's rows twice.
                (0..4)
                    .flat_map(|qh| wg[(qh / 2) * d * h..][..d * h].to_vec())
                    .collect()
            } else {
                wg.to_vec()
            };
            lm.linear_mut(name).unwrap().set_dense(w).unwrap();
        }
        lm.attn_norm = lg.attn_norm.clone();
        lm.mlp_norm = lg.mlp_norm.clone();
    }
    assert!(max_diff(&all_logits(&gqa, &TOKENS), &all_logits(&mha, &TOKENS)) < 1e-4);
}

#[test]
fn capture_reports_every_linear_input_with_its_shape() {
    let m = random_model(cfg(4, 2, false, true), 3).unwrap();
    let mut cache = m.new_cache("f32").unwrap();
    let mut hidden = m.embed(&TOKENS).unwrap();
    let mut seen = Vec::new();
    let mut cb = |name: &str, x: &[f32], n: usize| seen.push((name.to_string(), x.len() / n, n));
    m.layer_forward_with_capture(1, &mut hidden, TOKENS.len(), cache.as_mut(), Some(&mut cb))
        .unwrap();
    let names: Vec<&str> = seen.iter().map(|s| s.0.as_str()).collect();
    let want: Vec<String> = LAYER_LINEARS
        .iter()
        .map(|n| format!("model.layers.1.{n}"))
        .collect();
    assert_eq!(names, want);
    for (name, width, n) in &seen {
        assert_eq!(*n, TOKENS.len());
        assert_eq!(*width, m.linear(name).unwrap().inp, "{name}");
    }
    // The captured q_proj input really is that layer's input: rerunning the product from it
    // reproduces the layer's behaviour is covered by the reference test; here check the norm.
    assert!(seen.iter().all(|s| s.1 > 0));
}

#[test]
fn layer_by_layer_equals_forward() {
    let m = random_model(cfg(4, 2, false, false), 21).unwrap();
    let full = all_logits(&m, &TOKENS);
    let mut cache = m.new_cache("f32").unwrap();
    let mut hidden = m.embed(&TOKENS).unwrap();
    for i in 0..m.layers.len() {
        m.layer_forward(i, &mut hidden, TOKENS.len(), cache.as_mut())
            .unwrap();
    }
    let l = m.final_norm_and_head(&hidden, TOKENS.len()).unwrap();
    assert_eq!(l, full);
}

#[test]
fn swapping_a_weight_changes_the_output_and_bad_tokens_error() {
    let mut m = random_model(cfg(4, 2, false, true), 2).unwrap();
    let before = all_logits(&m, &TOKENS);
    let l = m.linear_mut("model.layers.0.mlp.down_proj").unwrap();
    let zeros = vec![0.0; l.out * l.inp];
    l.set_dense(zeros).unwrap();
    assert!(max_diff(&before, &all_logits(&m, &TOKENS)) > 1e-3);
    assert!(m.linear_mut("model.layers.9.mlp.down_proj").is_none());
    let mut cache = m.new_cache("f32").unwrap();
    assert!(m.forward(&[50], cache.as_mut(), Logits::All).is_err());
    assert!(m.forward(&[], cache.as_mut(), Logits::All).is_err());
    assert_eq!(m.linear_names().len(), 14);
}
