//! The layer-by-layer pipeline on a tiny random model: RTN, GPTQ and SmoothQuant W8A8, the
//! checkpoint round trip (write -> load -> identical logits), recipes and bad input.

use lowbit_model::config::ModelConfig;
use lowbit_model::ct::{self, WriteOptions};
use lowbit_model::quantize::{
    load_ct_model, model_to_checkpoint, quantize_model, sample_windows, CalibConfig, Method,
    ModelToCheckpoint, PipelineOptions, Recipe,
};
use lowbit_model::weights::random_model;
use lowbit_model::{Logits, Model};

mod common;

fn cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 97,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        ..common::tiny_cfg()
    }
}

fn model() -> Model {
    random_model(cfg(), 42).unwrap()
}

fn windows() -> Vec<Vec<u32>> {
    common::windows(97, 4000)
}

fn logits(m: &Model, toks: &[u32]) -> Vec<f32> {
    let mut cache = m.new_cache("f32").unwrap();
    m.forward(toks, cache.as_mut(), Logits::All).unwrap()
}

fn mean_err(r: &lowbit_model::quantize::PipelineReport) -> f64 {
    let e: Vec<f64> = r
        .layers
        .iter()
        .flat_map(|l| l.modules.iter().filter_map(|m| m.rel_error))
        .collect();
    assert!(!e.is_empty());
    e.iter().sum::<f64>() / e.len() as f64
}

#[test]
fn rtn_and_gptq_quantize_every_linear_and_gptq_is_better() {
    let w = windows();
    let mut a = model();
    let ra = quantize_model(
        &mut a,
        &w,
        &PipelineOptions::new(Method::Rtn, Recipe::new("int3-g32-sym")),
        &mut |_| {},
    )
    .unwrap();
    let mut b = model();
    let rb = quantize_model(
        &mut b,
        &w,
        &PipelineOptions::new(Method::Gptq, Recipe::new("int3-g32-sym")),
        &mut |_| {},
    )
    .unwrap();
    for m in [&a, &b] {
        for n in m.linear_names() {
            assert!(m.linear(&n).unwrap().is_quantized(), "{n}");
        }
    }
    assert_eq!(ra.layers.len(), 2);
    assert_eq!(ra.layers[0].modules.len(), 7);
    let (ea, eb) = (mean_err(&ra), mean_err(&rb));
    assert!(ea > 0.0 && eb > 0.0);
    assert!(
        eb < ea,
        "GPTQ mean relative error {eb} should beat RTN {ea}"
    );
    // And the final logits on calibration text are closer to the original model's.
    let orig = model();
    let toks: Vec<u32> = w[0].clone();
    let lo = logits(&orig, &toks);
    let d = |x: &[f32]| {
        x.iter()
            .zip(&lo)
            .map(|(p, q)| ((p - q) as f64).powi(2))
            .sum::<f64>()
    };
    assert!(d(&logits(&b, &toks)) < d(&logits(&a, &toks)));
}

#[test]
fn checkpoint_round_trip_gives_identical_logits() {
    let w = windows();
    for (method, scheme) in [
        (Method::Gptq, "int4-g32-asym"),
        (Method::Rtn, "nvfp4"),
        (Method::Rtn, "mxfp4"),
        (Method::Rtn, "fp8-pc"),
        (Method::SmoothQuant, "w8a8-int8"),
        (Method::Rtn, "nf4-g64"),
    ] {
        let mut m = model();
        let opts = PipelineOptions::new(method, Recipe::new(scheme));
        quantize_model(&mut m, &w, &opts, &mut |_| {}).unwrap();
        let act = lowbit_model::quantize::parse_scheme(scheme).unwrap().1;
        let ck = model_to_checkpoint(
            &m,
            &ModelToCheckpoint {
                input_activations: act,
                extra_files: vec![],
            },
        )
        .unwrap();
        let dir = std::env::temp_dir().join(format!("lowbit-qp-{}-{scheme}", std::process::id()));
        ct::write_checkpoint(&dir, &ck, &WriteOptions::default()).unwrap();
        let back = load_ct_model(&dir).unwrap();
        for n in m.linear_names() {
            assert_eq!(
                back.linear(&n).unwrap().quantized(),
                m.linear(&n).unwrap().quantized(),
                "{scheme} {n}"
            );
            assert_eq!(back.linear(&n).unwrap().act_quant.is_some(), act.is_some());
        }
        let toks: Vec<u32> = (0..17).map(|i| (i * 11) % 97).collect();
        assert_eq!(logits(&back, &toks), logits(&m, &toks), "{scheme}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn smoothquant_w8a8_stays_close() {
    let w = windows();
    let mut m = model();
    quantize_model(
        &mut m,
        &w,
        &PipelineOptions::new(Method::SmoothQuant, Recipe::new("w8a8-int8")),
        &mut |_| {},
    )
    .unwrap();
    assert!(m
        .linear("model.layers.0.self_attn.q_proj")
        .unwrap()
        .act_quant
        .is_some());
    let orig = model();
    let toks: Vec<u32> = (0..20).map(|i| (i * 5) % 97).collect();
    let (a, b) = (logits(&orig, &toks), logits(&m, &toks));
    let num: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum();
    let den: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    assert!(
        (num / den).sqrt() < 0.05,
        "relative logit error {}",
        (num / den).sqrt()
    );
}

#[test]
fn recipe_overrides_and_skips() {
    let w = windows();
    let mut m = model();
    let r = Recipe::from_json(
        r#"{"overrides":[{"layers":[-1],"scheme":"int8-pc"},{"modules":"*.k_proj","skip":true}]}"#,
        "int4-g32-sym",
    )
    .unwrap();
    let rep = quantize_model(
        &mut m,
        &w,
        &PipelineOptions::new(Method::Rtn, r),
        &mut |_| {},
    )
    .unwrap();
    assert!(!m
        .linear("model.layers.0.self_attn.k_proj")
        .unwrap()
        .is_quantized());
    let q = m
        .linear("model.layers.1.mlp.up_proj")
        .unwrap()
        .quantized()
        .unwrap();
    assert_eq!(q.scheme.elem.bits(), 8);
    let q = m
        .linear("model.layers.0.mlp.up_proj")
        .unwrap()
        .quantized()
        .unwrap();
    assert_eq!(q.scheme.elem.bits(), 4);
    assert_eq!(rep.layers[0].modules.len(), 6);
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let mut m = model();
    // GPTQ without calibration data.
    assert!(quantize_model(
        &mut m,
        &[],
        &PipelineOptions::new(Method::Gptq, Recipe::new("int4-g32-sym")),
        &mut |_| {}
    )
    .is_err());
    // Unknown scheme.
    assert!(quantize_model(
        &mut m,
        &windows(),
        &PipelineOptions::new(Method::Rtn, Recipe::new("int4-g0-sym")),
        &mut |_| {}
    )
    .is_err());
    // A 2-D block that is fine, and a scheme whose block does not fit is reported per module.
    let toks: Vec<u32> = vec![1, 2, 3];
    assert!(sample_windows(
        &toks,
        &CalibConfig {
            samples: 2,
            seqlen: 2,
            seed: 0
        }
    )
    .is_err());
    // Token ids out of range.
    let bad = vec![vec![1000u32; 8]];
    assert!(quantize_model(
        &mut m,
        &bad,
        &PipelineOptions::new(Method::Gptq, Recipe::new("int4-g32-sym")),
        &mut |_| {}
    )
    .is_err());
}

fn rel_logit_err(m: &Model) -> f64 {
    let orig = model();
    let toks: Vec<u32> = windows()[1].clone();
    let (a, b) = (logits(&orig, &toks), logits(m, &toks));
    let num: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum();
    let den: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn awq_folds_scales_so_the_function_is_kept() {
    // At 8 bits the quantization error is tiny, so any folding mistake (scales applied to the
    // weights but not divided out of the norms / up_proj) would show as a large logit error.
    let w = windows();
    let mut m = model();
    let rep = quantize_model(
        &mut m,
        &w,
        &PipelineOptions::new(Method::Awq, Recipe::new("int8-g32-sym")),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(rep.layers[0].modules.len(), 7);
    for n in m.linear_names() {
        assert!(m.linear(&n).unwrap().is_quantized(), "{n}");
    }
    let e = rel_logit_err(&m);
    assert!(e < 0.02, "AWQ int8 relative logit error {e}");
    // At 4 bits AWQ is never worse than plain rounding on its own objective (the unscaled
    // weights and the unclipped range are candidates). down_proj of layer 0 is alone in its
    // group and, with one capture pass per layer, sees identical inputs in both runs.
    let mut r = model();
    let mut ro = PipelineOptions::new(Method::Rtn, Recipe::new("int4-g32-sym"));
    ro.true_sequential = false;
    let rr = quantize_model(&mut r, &w, &ro, &mut |_| {}).unwrap();
    let mut a = model();
    let ra = quantize_model(
        &mut a,
        &w,
        &PipelineOptions::new(Method::Awq, Recipe::new("int4-g32-sym")),
        &mut |_| {},
    )
    .unwrap();
    let down = |r: &lowbit_model::quantize::PipelineReport| -> f64 {
        r.layers[0]
            .modules
            .iter()
            .find(|m| m.name.ends_with("down_proj"))
            .unwrap()
            .rel_error
            .unwrap()
    };
    assert!(
        down(&ra) <= down(&rr) * (1.0 + 1e-6),
        "AWQ {} vs RTN {}",
        down(&ra),
        down(&rr)
    );
}

#[test]
fn hqq_runs_without_calibration() {
    let mut m = model();
    let rep = quantize_model(
        &mut m,
        &[],
        &PipelineOptions::new(Method::Hqq, Recipe::new("int4-g32-asym")),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(rep.layers.len(), 2);
    assert!(rep.layers[0].modules.iter().all(|m| m.rel_error.is_none()));
    assert!(rel_logit_err(&m) < 0.5);
    for n in m.linear_names() {
        assert!(m.linear(&n).unwrap().quantized().unwrap().scheme.asymmetric);
    }
}

/// A dead input channel (the attention norm's weight is zero there, so q/k/v's Hessian has a zero
/// row and column): GPTQ reports it, zeroes those weights and still quantizes every linear.
#[test]
fn dead_input_channel_is_zeroed_and_reported() {
    let mut m = model();
    m.layers[0].attn_norm[5] = 0.0;
    let r = quantize_model(
        &mut m,
        &windows(),
        &PipelineOptions::new(Method::Gptq, Recipe::new("int4-g32-sym")),
        &mut |_| {},
    )
    .unwrap();
    for md in &r.layers[0].modules {
        let want = usize::from(
            md.name.contains("q_proj") || md.name.contains("k_proj") || md.name.contains("v_proj"),
        );
        assert_eq!(md.dead_channels, want, "{}", md.name);
        assert!(md.rel_error.unwrap().is_finite(), "{}", md.name);
    }
    let q = m.linear("model.layers.0.self_attn.q_proj").unwrap();
    assert!(q.is_quantized());
    let (rows, cols) = (q.out, q.inp);
    let w = q.weight_f32();
    assert!((0..rows).all(|r| w[r * cols + 5] == 0.0));
    assert!(r.layers[1].modules.iter().all(|md| md.dead_channels == 0));
}
