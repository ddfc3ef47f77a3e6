//! Rotations on tiny random models built in code: the rotated, unquantized model computes the
//! same logits as the original (norm folding, R1, R2, online R4), for tied and untied heads,
//! MHA and GQA, with and without q/k/v bias; bad input gives clear errors; W4A4 runs.

use lowbit_model::config::{Arch, ModelConfig, RopeScaling};
use lowbit_model::llama::{Logits, Model};
use lowbit_model::rotate::{
    apply_rotations, fold_norms, install_hooks, parse_wa_scheme, prepare, PrepareOptions,
    RotateMethod, SpinOptions, WeightMethod,
};
use lowbit_model::weights::random_model;

fn cfg(
    hidden: usize,
    heads: usize,
    kv: usize,
    hd: usize,
    ffn: usize,
    bias: bool,
    tie: bool,
) -> ModelConfig {
    ModelConfig {
        arch: if bias { Arch::Qwen2 } else { Arch::Llama },
        vocab_size: 50,
        hidden_size: hidden,
        intermediate_size: ffn,
        n_layers: 2,
        n_heads: heads,
        n_kv_heads: kv,
        head_dim: hd,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::None,
        rms_eps: 1e-5,
        max_ctx: 128,
        tie_embeddings: tie,
        qkv_bias: bias,
        bos_token_id: None,
        eos_token_id: None,
    }
}

const TOKENS: [u32; 12] = [3, 17, 42, 0, 49, 8, 8, 23, 11, 30, 5, 1];

fn logits(m: &Model) -> Vec<f32> {
    let mut cache = m.new_cache("f32").unwrap();
    m.forward(&TOKENS, cache.as_mut(), Logits::All).unwrap()
}

fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

fn quarot(m: &mut Model, seed: u64) {
    let c = m.config.clone();
    fold_norms(m).unwrap();
    let q = lowbit_calibration::quarot::quarot_rotations(c.hidden_size, c.head_dim, seed).unwrap();
    let r4 = apply_rotations(m, &q.r1, Some(&q.r2), true).unwrap();
    install_hooks(m, None, r4);
}

#[test]
fn rotated_f32_model_computes_the_same_logits() {
    // hidden 24 = 12 * 2 (Paley I), head_dim 8, FFN 40 = 20 * 2 / 48 = 12 * 4.
    for (heads, kv, bias, tie, ffn) in [
        (3, 3, false, true, 48),
        (3, 1, false, false, 40),
        (3, 1, true, true, 48),
    ] {
        let c = cfg(24, heads, kv, 8, ffn, bias, tie);
        let orig = random_model(c.clone(), 7).unwrap();
        let want = logits(&orig);
        let mut folded = random_model(c.clone(), 7).unwrap();
        fold_norms(&mut folded).unwrap();
        let d0 = rel_diff(&logits(&folded), &want);
        assert!(d0 < 1e-5, "fold only: {d0}");
        let mut rot = random_model(c.clone(), 7).unwrap();
        quarot(&mut rot, 3);
        let got = logits(&rot);
        let d = rel_diff(&got, &want);
        assert!(d < 1e-4, "heads {heads}/{kv} bias {bias} tie {tie}: {d}");
        // The rotation really changed the weights (not an identity).
        assert!(rot.embed != orig.embed);
        assert!(rot.layers[0].down_proj.weight_f32() != orig.layers[0].down_proj.weight_f32());
        // Without the online Hadamard the model is NOT equivalent: the hook matters.
        let mut broken = random_model(c, 7).unwrap();
        quarot(&mut broken, 3);
        install_hooks(&mut broken, None, None);
        assert!(rel_diff(&logits(&broken), &want) > 1e-3);
    }
}

#[test]
fn w4a4_pipelines_run_and_rotation_helps_with_outliers() {
    let c = cfg(24, 3, 1, 8, 48, false, true);
    let mut base = random_model(c.clone(), 11).unwrap();
    // Outlier channels in the residual stream (as in real LLMs): scale two embedding columns.
    for row in base.embed.chunks_exact_mut(24) {
        row[5] *= 40.0;
        row[17] *= 25.0;
    }
    let want = logits(&base);
    let samples: Vec<Vec<u32>> = (0..4)
        .map(|s| (0..16).map(|i| (i * 7 + s * 13) % 50).collect())
        .collect();
    let mut errs = Vec::new();
    for (rot, wm) in [
        (RotateMethod::None, WeightMethod::Rtn),
        (RotateMethod::Quarot, WeightMethod::Rtn),
        (RotateMethod::Quarot, WeightMethod::Gptq),
        (RotateMethod::Spinquant, WeightMethod::Rtn),
    ] {
        let mut m = random_model(c.clone(), 11).unwrap();
        m.embed.copy_from_slice(&base.embed);
        let opts = PrepareOptions {
            rotate: rot,
            scheme: parse_wa_scheme("w4a4-int", 1.0).unwrap(),
            weight_method: wm,
            weight_clipping: Default::default(),
            spin: SpinOptions {
                iters: 20,
                tokens_per_layer: 64,
                tokens_per_iter: 32,
                select_windows: 2,
                starts: 1,
                ..SpinOptions::default()
            },
            seed: 1,
            act_static: None,
        };
        let rep = prepare(&mut m, &opts, &samples, &mut |_| {}).unwrap();
        if rot == RotateMethod::Spinquant {
            // The learned rotations stay orthogonal and lower the proxy loss they optimise.
            for r in [rep.spin_r1.unwrap(), rep.spin_r2.unwrap()] {
                assert!(r.orthogonality_error < 1e-4, "{r:?}");
                assert!(r.loss_end < r.loss_start, "{r:?}");
            }
        }
        let got = logits(&m);
        assert!(got.iter().all(|v| v.is_finite()));
        errs.push(rel_diff(&got, &want));
    }
    // Rotation must reduce the W4A4 error on a model with residual outliers.
    assert!(errs[1] < errs[0], "{errs:?}");
    assert!(errs[3] < errs[0], "{errs:?}");
}

#[test]
fn bad_input_gives_clear_errors() {
    // hidden 18 has no Hadamard order: the error names the size.
    let c = cfg(18, 3, 3, 6, 24, false, true);
    let mut m = random_model(c, 1).unwrap();
    let opts = PrepareOptions {
        rotate: RotateMethod::Quarot,
        scheme: parse_wa_scheme("f32", 1.0).unwrap(),
        weight_method: WeightMethod::Rtn,
        weight_clipping: Default::default(),
        spin: SpinOptions::default(),
        seed: 0,
        act_static: None,
    };
    let e = prepare(&mut m, &opts, &[], &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("18"), "{e}");
    // Rotating an already quantized model is refused.
    let c = cfg(24, 3, 1, 8, 48, false, true);
    let mut m = random_model(c, 1).unwrap();
    let s = lowbit_numerics::Scheme::from_name("int4-g128-sym").unwrap();
    lowbit_model::rotate::quantize_weights_rtn(&mut m, &s, Default::default()).unwrap();
    let e = fold_norms(&mut m).unwrap_err().to_string();
    assert!(e.contains("already quantized"), "{e}");
    // Rotations before folding are refused.
    let mut m = random_model(cfg(24, 3, 1, 8, 48, false, false), 1).unwrap();
    assert!(apply_rotations(&mut m, &vec![0.0; 24 * 24], None, false).is_err());
    assert!(parse_wa_scheme("w3a3", 1.0).is_err());
    assert!(parse_wa_scheme("w4a4-int", 1.5).is_err());
    assert!(RotateMethod::parse("hadamard").is_err());
}
