//! Per-linear static activation scales (`PrepareOptions::act_static`) on a tiny random model built
//! in code: every decoder linear gets its own calibrated per-tensor scale, its hook quantizes with
//! exactly that scale, absmax scales equal the recorded inputs' max, and the scales round-trip
//! through the `lowbit-rotation.json` sidecar of a compressed-tensors checkpoint. Bad requests
//! (block formats, no calibration windows, per-token clipping) are clear errors.

use lowbit_calibration::actquant::{ActFormat, ActQuantizer, StaticCalib};
use lowbit_model::ct::{self, WriteOptions};
use lowbit_model::llama::{Logits, Model, LAYER_LINEARS};
use lowbit_model::quantize::load_ct_model;
use lowbit_model::rotate::{
    parse_wa_scheme, prepare, rotated_checkpoint, spin_start_seed, PrepareOptions, RotateMethod,
    RotationSidecar, SpinOptions, WeightMethod, ROTATION_FILE,
};

mod common;
use common::outlier_model as model;

fn samples() -> Vec<Vec<u32>> {
    (0..3)
        .map(|s| (0..16).map(|i| (i * 5 + s * 11) % 61).collect())
        .collect()
}

fn logits(m: &Model) -> Vec<f32> {
    // Not the calibration windows.
    let toks: Vec<u32> = (0..19).map(|i| (i * 13 + 5) % 61).collect();
    let mut cache = m.new_cache("f32").unwrap();
    m.forward(&toks, cache.as_mut(), Logits::All).unwrap()
}

fn opts(scheme: &str, clip: f32, act_static: Option<StaticCalib>) -> PrepareOptions {
    PrepareOptions {
        rotate: RotateMethod::Quarot,
        scheme: parse_wa_scheme(scheme, clip).unwrap(),
        weight_method: WeightMethod::Rtn,
        weight_clipping: Default::default(),
        spin: SpinOptions::default(),
        seed: 3,
        act_static,
    }
}

#[test]
fn each_linear_gets_its_own_calibrated_scale() {
    let samples = samples();
    for scheme in ["w8a8-int8", "w4a8-int", "w4a4-int"] {
        let o = opts(scheme, 1.0, Some(StaticCalib::AbsMax));
        let mut m = model();
        let rep = prepare(&mut m, &o, &samples, &mut |_| {}).unwrap();
        let sc = rep.act_static_scales.clone().unwrap();
        assert_eq!(sc.len(), 2);
        let act = o.scheme.quant.as_ref().unwrap().1.clone();
        let qmax = match act.format {
            ActFormat::Int { bits } => ((1u32 << (bits - 1)) - 1) as f32,
            _ => unreachable!(),
        };

        // Layer 0's inputs do not depend on any activation quantizer: the absmax scale of each
        // site is max|input| / qmax over the calibration windows, recorded independently on the
        // same rotated, weight-quantized model with per-token activations.
        let mut dynm = model();
        prepare(&mut dynm, &opts(scheme, 1.0, None), &samples, &mut |_| {}).unwrap();
        let mut amax = std::collections::BTreeMap::<String, f32>::new();
        for s in &samples {
            let mut h = dynm.embed(s).unwrap();
            let mut cache = dynm.new_cache("f32").unwrap();
            let mut cb = |name: &str, x: &[f32], _n: usize| {
                let short = name.trim_start_matches("model.layers.0.").to_string();
                let mut y = x.to_vec();
                if short == "mlp.down_proj" {
                    // The online Hadamard comes first: the scale is of its output.
                    let hm = lowbit_calibration::hadamard::Hadamard::new(96).unwrap();
                    hm.apply_rows(&mut y).unwrap();
                }
                let a = y.iter().fold(0f32, |m, v| m.max(v.abs()));
                let e = amax.entry(short).or_insert(0.0);
                *e = e.max(a);
            };
            dynm.layer_forward_with_capture(0, &mut h, s.len(), cache.as_mut(), Some(&mut cb))
                .unwrap();
        }
        for (i, name) in LAYER_LINEARS.iter().enumerate() {
            let want = amax[*name] / qmax;
            if name.starts_with("self_attn.") && *name != "self_attn.o_proj" {
                // q/k/v read the normalised embedding: no dependence on any quantizer.
                assert!(
                    (sc[0][i] - want).abs() <= 1e-6 * want,
                    "{scheme} {name}: {} vs {want}",
                    sc[0][i]
                );
            } else {
                // o_proj, gate/up and down_proj inputs come after static-quantized linears of
                // the same layer in the calibrated model, but after per-token ones here: close,
                // not equal.
                assert!(
                    (sc[0][i] - want).abs() <= 0.2 * want,
                    "{scheme} {name}: {} vs {want}",
                    sc[0][i]
                );
            }
        }
        // Shared inputs share their scale; different sites and layers do not.
        for l in &sc {
            assert_eq!(l[0], l[1]);
            assert_eq!(l[0], l[2]);
            assert_eq!(l[4], l[5]);
            assert_ne!(l[0], l[3]);
            assert_ne!(l[0], l[6]);
            assert_ne!(l[3], l[6]);
        }
        assert_ne!(sc[0][6], sc[1][6]);

        // Each hook quantizes with its own scale: a probe input comes out on that linear's grid.
        for (li, layer) in m.layers.iter().enumerate() {
            for (i, name) in LAYER_LINEARS.iter().enumerate() {
                if *name == "mlp.down_proj" {
                    continue; // Hadamard first; checked through the logits below.
                }
                let l = layer.linear(name).unwrap();
                let probe: Vec<f32> = (0..2 * l.inp)
                    .map(|k| ((k * 37 % 101) as f32 - 50.0) * sc[li][i] * 0.09)
                    .collect();
                let mut got = probe.clone();
                (l.act_quant.as_ref().unwrap())(&mut got, 2);
                let mut want = probe.clone();
                ActQuantizer {
                    static_scale: Some(sc[li][i]),
                    ..act.clone()
                }
                .apply(&mut want, 2, l.inp)
                .unwrap();
                assert_eq!(got, want, "{scheme} layer {li} {name}");
                let mut per_token = probe.clone();
                act.apply(&mut per_token, 2, l.inp).unwrap();
                assert_ne!(got, per_token, "{scheme} layer {li} {name}");
            }
        }
        // Static and dynamic activations give different models.
        let (a, b) = (logits(&m), logits(&dynm));
        assert!(a.iter().all(|v| v.is_finite()));
        assert_ne!(a, b, "{scheme}");
    }
}

#[test]
fn static_scales_round_trip_through_the_sidecar() {
    let samples = samples();
    for (scheme, how) in [
        ("w8a8-int8", StaticCalib::AbsMax),
        ("w4a8-int", StaticCalib::Percentile(99.0)),
        ("w4a4-int", StaticCalib::Mse),
    ] {
        let o = opts(scheme, 1.0, Some(how));
        let mut m = model();
        let rep = prepare(&mut m, &o, &samples, &mut |_| {}).unwrap();
        let want = logits(&m);
        let ck = rotated_checkpoint(&m, &o, &rep, vec![]).unwrap();
        // A static W8A8 model must not claim per-token activations in config.json.
        assert!(ck.input_activations.is_none(), "{scheme}");
        let dir =
            std::env::temp_dir().join(format!("lowbit-rotstatic-{}-{scheme}", std::process::id()));
        ct::write_checkpoint(&dir, &ck, &WriteOptions::default()).unwrap();
        let side: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(ROTATION_FILE)).unwrap()).unwrap();
        assert_eq!(side["activations"]["strategy"], "tensor");
        let sc = RotationSidecar::from_json(&side).unwrap();
        assert_eq!(sc, RotationSidecar::new(&m, &o, &rep), "{scheme}");
        assert_eq!(sc.act_scales.as_ref(), rep.act_static_scales.as_ref());
        assert_eq!(sc.act_static, Some(how));
        let back = load_ct_model(&dir).unwrap();
        assert_eq!(logits(&back), want, "{scheme} {}", how.name());

        // Corrupted sidecars: wrong layer count, a non-positive scale, wrong module list.
        let mut bad = side.clone();
        bad["activations"]["static_scales"]["layers"]
            .as_array_mut()
            .unwrap()
            .pop();
        let e = RotationSidecar::from_json(&bad)
            .unwrap()
            .install(&mut load_ct_model(&dir).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("layers"), "{e}");
        let mut bad = side.clone();
        bad["activations"]["static_scales"]["layers"][0][2] = (-1.0).into();
        assert!(RotationSidecar::from_json(&bad).is_err());
        let mut bad = side.clone();
        bad["activations"]["static_scales"]["modules"][0] = "self_attn.k_proj".into();
        assert!(RotationSidecar::from_json(&bad).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn bad_static_requests_are_clear_errors() {
    let samples = samples();
    for scheme in ["w4a4-nvfp4", "w4a4-mxfp4"] {
        let e = prepare(
            &mut model(),
            &opts(scheme, 1.0, Some(StaticCalib::AbsMax)),
            &samples,
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        let f = &scheme[5..];
        assert!(e.contains(f) && e.contains("static"), "{e}");
    }
    let e = prepare(
        &mut model(),
        &opts("w8a8-int8", 1.0, Some(StaticCalib::Mse)),
        &[],
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("calibration") && e.contains("--calib"), "{e}");
    let e = prepare(
        &mut model(),
        &opts("w4a4-int", 0.9, Some(StaticCalib::AbsMax)),
        &samples,
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("clip"), "{e}");
    let e = prepare(
        &mut model(),
        &opts("f32", 1.0, Some(StaticCalib::AbsMax)),
        &samples,
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("scheme"), "{e}");
    // A report without scales cannot make a static checkpoint.
    let o = opts("w8a8-int8", 1.0, Some(StaticCalib::AbsMax));
    let mut m = model();
    let mut rep = prepare(&mut m, &o, &samples, &mut |_| {}).unwrap();
    rep.act_static_scales = None;
    assert!(rotated_checkpoint(&m, &o, &rep, vec![]).is_err());
}

/// Five 16-token windows and a short SpinQuant run (2 held-out windows, `starts` starts) on
/// the W4A4 INT scheme with act clip 0.9.
fn spin_setup(starts: usize) -> (Vec<Vec<u32>>, PrepareOptions) {
    let windows = (0..5)
        .map(|s| (0..16).map(|i| (i * 7 + s * 13 + 1) % 61).collect())
        .collect();
    let o = PrepareOptions {
        rotate: RotateMethod::Spinquant,
        spin: SpinOptions {
            iters: 6,
            tokens_per_layer: 32,
            tokens_per_iter: 16,
            select_windows: 2,
            starts,
            ..SpinOptions::default()
        },
        ..opts("w4a4-int", 0.9, None)
    };
    (windows, o)
}

#[test]
fn spinquant_selection_keeps_the_better_of_start_and_learned() {
    let (windows, o) = spin_setup(1);
    let spin = o.spin.clone();
    let mut m = model();
    let rep = prepare(&mut m, &o, &windows, &mut |_| {}).unwrap();
    let s = rep.spin_selection.clone().unwrap();
    assert_eq!(s.windows, 2);
    let names: Vec<&str> = s.candidates.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["quarot", "spinquant"]);
    for c in &s.candidates {
        assert!(c.kl.is_finite() && c.kl > 0.0 && c.nll.is_finite(), "{c:?}");
    }
    let best = if s.candidates[0].kl <= s.candidates[1].kl {
        0
    } else {
        1
    };
    assert_eq!(s.chosen, best);
    // The QuaRot candidate is exactly the QuaRot model (same seed).
    let mut q = model();
    prepare(&mut q, &opts("w4a4-int", 0.9, None), &windows, &mut |_| {}).unwrap();
    if s.chosen == 0 {
        assert_eq!(logits(&m), logits(&q));
    }
    // Forcing the learned rotations (no selection) gives the other model when it lost.
    let o0 = PrepareOptions {
        spin: SpinOptions {
            select_windows: 0,
            ..spin.clone()
        },
        ..o.clone()
    };
    let mut l = model();
    let rep0 = prepare(&mut l, &o0, &windows[..3], &mut |_| {}).unwrap();
    assert!(rep0.spin_selection.is_none());
    if s.chosen == 1 {
        assert_eq!(logits(&m), logits(&l));
    } else {
        assert_ne!(logits(&m), logits(&l));
    }
    // Too few windows to hold any out: a clear error.
    let e = prepare(&mut model(), &o, &windows[..2], &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("--spin-select"), "{e}");
}

#[test]
fn spinquant_multi_start_keeps_the_lowest_held_out_kl() {
    let (windows, o) = spin_setup(3);
    let spin = o.spin.clone();
    let mut m = model();
    let rep = prepare(&mut m, &o, &windows, &mut |_| {}).unwrap();
    let s = rep.spin_selection.clone().unwrap();
    assert_eq!(s.windows, 2);
    let names: Vec<&str> = s.candidates.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(&names[..3], ["quarot", "quarot#1", "quarot#2"]);
    // The refined candidate starts from the best of the three starts.
    let best_start = (0..3)
        .min_by(|&a, &b| s.candidates[a].kl.total_cmp(&s.candidates[b].kl))
        .unwrap();
    let want = if best_start == 0 {
        "spinquant".to_string()
    } else {
        format!("spinquant#{best_start}")
    };
    assert_eq!(names[3], want);
    let best = (0..4)
        .min_by(|&a, &b| s.candidates[a].kl.total_cmp(&s.candidates[b].kl))
        .unwrap();
    assert_eq!(s.chosen, best);
    for c in &s.candidates {
        assert!(c.kl.is_finite() && c.kl > 0.0 && c.nll.is_finite(), "{c:?}");
    }
    // The starts are distinct rotations: their KLs differ.
    assert!(s.candidates[0].kl != s.candidates[1].kl && s.candidates[1].kl != s.candidates[2].kl);
    // A kept start is exactly QuaRot's model for that start's seed.
    if best < 3 {
        let mut q = model();
        let oq = PrepareOptions {
            seed: spin_start_seed(o.seed, best),
            ..opts("w4a4-int", 0.9, None)
        };
        prepare(&mut q, &oq, &windows, &mut |_| {}).unwrap();
        assert_eq!(logits(&m), logits(&q));
    }
    // Start 0 is the seed itself; the others are not shifts of it.
    assert_eq!(spin_start_seed(7, 0), 7);
    let seeds: Vec<u64> = (0..4).map(|k| spin_start_seed(7, k)).collect();
    for (i, a) in seeds.iter().enumerate() {
        for b in &seeds[i + 1..] {
            assert!(a != b && a.abs_diff(*b) > 1 << 20, "{seeds:?}");
        }
    }
    // No starts: a clear error.
    let o0 = PrepareOptions {
        spin: SpinOptions { starts: 0, ..spin },
        ..o
    };
    let e = prepare(&mut model(), &o0, &windows, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("--spin-starts"), "{e}");
}
