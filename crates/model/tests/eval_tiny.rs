//! Evaluation tests on tiny random models (no files needed).

use lowbit_model::config::{Arch, ModelConfig, RopeScaling};
use lowbit_model::eval::{evaluate, EvalOptions};
use lowbit_model::llama::Logits;
use lowbit_model::weights::random_model;

fn cfg() -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        vocab_size: 40,
        hidden_size: 16,
        intermediate_size: 24,
        n_layers: 2,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 8,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::None,
        rms_eps: 1e-5,
        max_ctx: 64,
        tie_embeddings: true,
        qkv_bias: false,
        bos_token_id: None,
        eos_token_id: None,
    }
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7 + i * i) % 40) as u32).collect()
}

fn opts(ctx: usize, w: Option<usize>) -> EvalOptions {
    EvalOptions {
        ctx,
        max_windows: w,
        kv_policy: "f32".into(),
    }
}

/// PPL recomputed independently: each window decoded token by token, softmax in f64.
#[test]
fn ppl_matches_token_by_token_computation() {
    let m = random_model(cfg(), 4).unwrap();
    let toks = tokens(3 * 9 + 5); // 3 full windows of 9, 5 tail tokens
    let rep = evaluate(&m, None, &toks, &opts(9, None), &mut |_, _| {}).unwrap();
    assert_eq!((rep.windows, rep.tokens, rep.tail_tokens), (3, 24, 5));
    let mut sum = 0f64;
    for w in 0..3 {
        let win = &toks[w * 9..(w + 1) * 9];
        let mut cache = m.new_cache("f32").unwrap();
        for i in 0..8 {
            let l = m
                .forward(&win[i..i + 1], cache.as_mut(), Logits::Last)
                .unwrap();
            let z: f64 = l.iter().map(|v| (*v as f64).exp()).sum();
            sum -= (l[win[i + 1] as usize] as f64).exp().ln() - z.ln();
        }
    }
    let want = (sum / 24.0).exp();
    assert!(
        (rep.ppl - want).abs() < 1e-4 * want,
        "{} vs {want}",
        rep.ppl
    );
    let first = evaluate(&m, None, &toks, &opts(9, Some(1)), &mut |_, _| {}).unwrap();
    assert_eq!((first.windows, first.tokens), (1, 8));
}

#[test]
fn reference_against_itself_is_lossless_and_against_another_is_not() {
    let m = random_model(cfg(), 4).unwrap();
    let toks = tokens(40);
    let rep = evaluate(&m, Some(&m), &toks, &opts(10, None), &mut |_, _| {}).unwrap();
    let r = rep.reference.unwrap();
    assert!(r.kl.abs() < 1e-9 && r.top1 == 1.0 && r.nll_max.abs() < 1e-9);
    assert!((r.ref_ppl - rep.ppl).abs() < 1e-9);
    let other = random_model(cfg(), 5).unwrap();
    let rep = evaluate(&other, Some(&m), &toks, &opts(10, None), &mut |_, _| {}).unwrap();
    let r = rep.reference.unwrap();
    assert!(r.kl > 1e-3 && r.top1 < 1.0);
    assert!(r.nll_p50 <= r.nll_p90 && r.nll_p90 <= r.nll_p99 && r.nll_p99 <= r.nll_max);
}

#[test]
fn too_short_text_is_an_error() {
    let m = random_model(cfg(), 4).unwrap();
    assert!(evaluate(&m, None, &tokens(5), &opts(10, None), &mut |_, _| {}).is_err());
    assert!(evaluate(&m, None, &tokens(50), &opts(1, None), &mut |_, _| {}).is_err());
}
