use super::*;
use crate::llama::Logits;
use crate::rotate::{
    dense_copy, fold_norms, install_hooks, parse_wa_scheme, parse_weight_clip, quantize_weights_rtn,
};
use crate::test_util::tiny_llama;
use crate::weights::random_model;
use lowbit_calibration::quarot::quarot_rotations;

const TOKS: [u32; 14] = [3, 17, 42, 0, 299, 8, 8, 23, 111, 30, 5, 1, 250, 77];

fn folded(seed: u64) -> Model {
    let mut m = random_model(tiny_llama(true, false), seed).unwrap();
    fold_norms(&mut m).unwrap();
    m
}

fn w4a4() -> E2eQuant {
    let s = parse_wa_scheme("w4a4-int", 0.9).unwrap();
    let (ws, act) = s.quant.unwrap();
    E2eQuant {
        weights: Some((ws, parse_weight_clip("mse").unwrap())),
        act: Some(act),
    }
}

fn rotations(m: &Model) -> (Vec<f32>, Vec<Vec<f32>>) {
    let c = &m.config;
    let q = quarot_rotations(c.hidden_size, c.head_dim, 3).unwrap();
    let r2b = quarot_rotations(c.hidden_size, c.head_dim, 4).unwrap().r2;
    (q.r1, vec![q.r2, r2b])
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let s = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / s
}

/// The model crate's own forward of the rotated (per-layer R2), quantized model.
fn eval_logits(m: &Model, r1: &[f32], r2: &[Vec<f32>], q: &E2eQuant) -> Vec<f32> {
    let mut e = dense_copy(m).unwrap();
    let r4 = apply_rotations_per_layer(&mut e, r1, r2).unwrap();
    if let Some((s, clip)) = &q.weights {
        quantize_weights_rtn(&mut e, s, *clip).unwrap();
    }
    install_hooks(&mut e, q.act.as_ref(), r4);
    let mut cache = e.new_cache("f32").unwrap();
    e.forward(&TOKS, cache.as_mut(), Logits::All).unwrap()
}

#[test]
fn forward_equals_the_rotated_quantized_model() {
    let m = folded(1);
    let (r1, r2) = rotations(&m);
    for q in [
        w4a4(),
        E2eQuant {
            weights: None,
            act: None,
        },
    ] {
        let want = eval_logits(&m, &r1, &r2, &q);
        let net = E2eNet::new(&m, q.clone()).unwrap();
        let got = net.forward(&r1, &r2, &TOKS).unwrap();
        let d = max_rel(&got, &want);
        assert!(
            d < 1e-4,
            "max rel diff {d} (quantized: {})",
            q.act.is_some()
        );
    }
    // The unquantized rotated model is the original one.
    let mut cache = m.new_cache("f32").unwrap();
    let orig = m.forward(&TOKS, cache.as_mut(), Logits::All).unwrap();
    let net = E2eNet::new(
        &m,
        E2eQuant {
            weights: None,
            act: None,
        },
    )
    .unwrap();
    assert!(max_rel(&net.forward(&r1, &r2, &TOKS).unwrap(), &orig) < 1e-4);
    // A shared R2 gives apply_rotations' model.
    let shared = vec![r2[0].clone(); 2];
    let mut e = dense_copy(&m).unwrap();
    let r4 = crate::rotate::apply_rotations(&mut e, &r1, Some(&r2[0]), true).unwrap();
    install_hooks(&mut e, None, r4);
    let mut cache = e.new_cache("f32").unwrap();
    let a = e.forward(&TOKS, cache.as_mut(), Logits::All).unwrap();
    let b = eval_logits(
        &m,
        &r1,
        &shared,
        &E2eQuant {
            weights: None,
            act: None,
        },
    );
    assert_eq!(a, b);
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

#[test]
fn rotation_gradient_matches_finite_differences() {
    let m = folded(1);
    // A peaked synthetic teacher, so that the loss and its gradient are not zero.
    let vocab = m.config.vocab_size;
    let mut teacher: Vec<f32> = crate::test_util::lcg_values(TOKS.len() * vocab, 5)
        .iter()
        .map(|v| 4.0 * v)
        .collect();
    crate::rotate::log_softmax_rows(&mut teacher, vocab);
    let (r1, r2) = rotations(&m);
    let net = E2eNet::new(
        &m,
        E2eQuant {
            weights: None,
            act: None,
        },
    )
    .unwrap();
    let batch = [(&TOKS[..], &teacher[..])];
    let g = net.loss_and_grad(&r1, &r2, &batch).unwrap();
    assert!(g.loss > 0.01, "loss {}", g.loss);
    let loss = |a: &[f32], b: &[Vec<f32>]| net.loss_and_grad(a, b, &batch).unwrap().loss;
    let eps = 3e-3f32;
    for seed in [11u64, 12] {
        // R1 direction.
        let e1 = crate::test_util::lcg_values(r1.len(), seed);
        let plus: Vec<f32> = r1.iter().zip(&e1).map(|(a, b)| a + eps * b).collect();
        let minus: Vec<f32> = r1.iter().zip(&e1).map(|(a, b)| a - eps * b).collect();
        let fd = (loss(&plus, &r2) - loss(&minus, &r2)) / (2.0 * eps as f64);
        let an = dot(&g.r1, &e1);
        assert!(
            (fd - an).abs() < 3e-3 * an.abs().max(fd.abs()) + 1e-5,
            "R1: finite difference {fd} vs gradient {an}"
        );
        // R2 direction, layer 1 only.
        let e2 = crate::test_util::lcg_values(r2[1].len(), seed + 100);
        let mut p2 = r2.clone();
        let mut m2 = r2.clone();
        for ((p, mi), d) in p2[1].iter_mut().zip(m2[1].iter_mut()).zip(&e2) {
            *p += eps * d;
            *mi -= eps * d;
        }
        let fd = (loss(&r1, &p2) - loss(&r1, &m2)) / (2.0 * eps as f64);
        let an = dot(&g.r2[1], &e2);
        assert!(
            (fd - an).abs() < 3e-3 * an.abs().max(fd.abs()) + 1e-5,
            "R2: finite difference {fd} vs gradient {an}"
        );
    }
}

#[test]
fn learning_keeps_rotations_orthogonal_and_rejects_bad_settings() {
    let m = folded(1);
    let (r1, r2) = rotations(&m);
    let train = vec![TOKS.to_vec(), TOKS.iter().rev().copied().collect()];
    let opts = E2eOptions {
        iters: 8,
        lr: 0.5,
        lr_r2: 0.5,
        seqlen: TOKS.len(),
        batch: 2,
        seed: 1,
    };
    let (a, b, rep) = learn(&m, &train, &r1, &r2, w4a4(), &opts, &mut |_| {}).unwrap();
    assert_eq!(rep.losses.len(), 8);
    assert_eq!(rep.sequences, 2);
    assert!(rep.losses.iter().all(|l| l.is_finite() && *l >= -1e-6));
    assert!(a != r1 && b[0] != r2[0] && b[1] != r2[1]);
    assert!(lowbit_calibration::rotation::orthogonality_error(&a, 64).unwrap() < 1e-4);
    for r in &b {
        assert!(lowbit_calibration::rotation::orthogonality_error(r, 16).unwrap() < 1e-4);
    }
    // Bad settings are errors, not panics.
    let bad = E2eOptions {
        seqlen: 1000,
        ..opts
    };
    assert!(learn(&m, &train, &r1, &r2, w4a4(), &bad, &mut |_| {}).is_err());
    assert!(E2eNet::new(&m, w4a4())
        .unwrap()
        .forward(&r1, &r2[..1], &TOKS)
        .is_err());
}
