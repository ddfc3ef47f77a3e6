//! A rotated W4A4 / W4A8 / W8A8 model written as a compressed-tensors checkpoint and loaded
//! back computes the same logits as the in-memory model: the folded weights, the untied head
//! and the `lowbit-rotation.json` sidecar (online Hadamard before `down_proj`, activation
//! quantizers) all round-trip. Without the sidecar the loaded model differs.

use lowbit_model::ct::{self, WriteOptions};
use lowbit_model::llama::{Logits, Model, LAYER_LINEARS};
use lowbit_model::quantize::load_ct_model;
use lowbit_model::rotate::{
    parse_wa_scheme, prepare, rotated_checkpoint, PrepareOptions, RotateMethod, RotationSidecar,
    SpinOptions, WeightMethod, ROTATION_FILE,
};

mod common;
use common::outlier_model as model;

fn logits(m: &Model) -> Vec<f32> {
    let toks: Vec<u32> = (0..19).map(|i| (i * 13 + 5) % 61).collect();
    let mut cache = m.new_cache("f32").unwrap();
    m.forward(&toks, cache.as_mut(), Logits::All).unwrap()
}

#[test]
fn rotated_checkpoints_round_trip_with_their_forward_hooks() {
    let samples: Vec<Vec<u32>> = (0..3)
        .map(|s| (0..16).map(|i| (i * 5 + s * 11) % 61).collect())
        .collect();
    for (scheme, rot, wm) in [
        ("w4a4-int", RotateMethod::Quarot, WeightMethod::Rtn),
        ("w4a4-int", RotateMethod::Quarot, WeightMethod::Gptq),
        ("w4a8-int", RotateMethod::None, WeightMethod::Rtn),
        ("w8a8-int8", RotateMethod::Quarot, WeightMethod::Rtn),
        ("w4a4-nvfp4", RotateMethod::Quarot, WeightMethod::Rtn),
        ("w4a4-mxfp4", RotateMethod::Spinquant, WeightMethod::Rtn),
    ] {
        let mut m = model();
        let opts = PrepareOptions {
            rotate: rot,
            scheme: parse_wa_scheme(scheme, 0.9).unwrap(),
            weight_method: wm,
            weight_clipping: Default::default(),
            spin: SpinOptions {
                iters: 6,
                tokens_per_layer: 32,
                tokens_per_iter: 16,
                select_windows: 2,
                starts: 3,
                ..SpinOptions::default()
            },
            seed: 3,
            act_static: None,
        };
        let rep = prepare(&mut m, &opts, &samples, &mut |_| {}).unwrap();
        let want = logits(&m);
        let ck = rotated_checkpoint(&m, &opts, &rep, vec![]).unwrap();
        let dir = std::env::temp_dir().join(format!(
            "lowbit-rotck-{}-{scheme}-{}",
            std::process::id(),
            rot.name()
        ));
        ct::write_checkpoint(&dir, &ck, &WriteOptions::default()).unwrap();
        let side: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(ROTATION_FILE)).unwrap()).unwrap();
        let sc = RotationSidecar::from_json(&side).unwrap();
        assert_eq!(sc, RotationSidecar::new(&m, &opts, &rep), "{scheme}");
        let back = load_ct_model(&dir).unwrap();
        for l in &back.layers {
            for n in LAYER_LINEARS {
                let lin = l.linear(n).unwrap();
                assert!(
                    lin.is_quantized() && lin.act_quant.is_some(),
                    "{scheme} {n}"
                );
            }
        }
        let got = logits(&back);
        assert_eq!(got, want, "{scheme} {}", rot.name());
        // The sidecar matters: without it the loaded model computes something else.
        std::fs::remove_file(dir.join(ROTATION_FILE)).unwrap();
        let bare = load_ct_model(&dir).unwrap();
        let d = logits(&bare)
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d > 1e-3, "{scheme} {}: {d}", rot.name());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn bad_sidecars_are_errors() {
    let ok = serde_json::json!({"rotate": "quarot", "wa_scheme": "w4a4-int",
        "activations": {"format": "int4", "clip": 0.9},
        "online_hadamard": {"modules": ["mlp.down_proj"], "size": 96, "normalized": true}});
    let sc = RotationSidecar::from_json(&ok).unwrap();
    let mut m = model();
    sc.install(&mut m).unwrap();
    // Wrong Hadamard size for this model, unknown formats, unsupported hook sites.
    let mut wrong = ok.clone();
    wrong["online_hadamard"]["size"] = 128.into();
    let e = RotationSidecar::from_json(&wrong)
        .unwrap()
        .install(&mut model())
        .unwrap_err()
        .to_string();
    assert!(e.contains("128") && e.contains("96"), "{e}");
    let mut wrong = ok.clone();
    wrong["activations"]["format"] = "int11".into();
    assert!(RotationSidecar::from_json(&wrong).is_err());
    let mut wrong = ok.clone();
    wrong["activations"]["clip"] = 1.5.into();
    assert!(RotationSidecar::from_json(&wrong).is_err());
    let mut wrong = ok;
    wrong["online_hadamard"]["modules"] = serde_json::json!(["self_attn.o_proj"]);
    assert!(RotationSidecar::from_json(&wrong).is_err());
}
