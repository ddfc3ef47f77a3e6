//! compressed-tensors writer -> reader round trips on small random tensors, for every format.

use lowbit_model::ct::{self, ActivationQuant, Checkpoint, CtFormat, WriteOptions};
use lowbit_numerics::rounding::SplitMix64 as Rng;
use lowbit_numerics::{ElemFormat, FloatFormat, Granularity, QuantizedTensor, ScaleDtype, Scheme};
use serde_json::json;
use std::path::PathBuf;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lowbit-ct-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A random, valid tensor of `scheme` (codes in range, scales exact in the scale dtype).
fn random_tensor(
    scheme: Scheme,
    rows: usize,
    cols: usize,
    act_order: bool,
    seed: u64,
) -> QuantizedTensor {
    let mut r = Rng(seed);
    let bits = scheme.elem.bits();
    let rb = lowbit_numerics::tensor::packed_row_bytes(cols, bits);
    let mut data = vec![0u8; rows * rb];
    for row in 0..rows {
        for c in 0..cols {
            let mut code = (r.next_u64() % (1u64 << bits)) as u8;
            if scheme.elem == ElemFormat::Float(FloatFormat::E4M3) && code & 0x7F == 0x7F {
                code &= 0xFE; // avoid NaN codes
            }
            let bit = c * bits as usize;
            let v = (code as u32) << (bit % 8);
            data[row * rb + bit / 8] |= v as u8;
            if bit % 8 + bits as usize > 8 {
                data[row * rb + bit / 8 + 1] |= (v >> 8) as u8;
            }
        }
    }
    let (gr, gc) = scheme.granularity.grid(rows, cols);
    let scales: Vec<f32> = (0..gr * gc)
        .map(|_| {
            let u = r.next_u64();
            match scheme.scale_dtype {
                ScaleDtype::E8M0 => 2f32.powi((u % 20) as i32 - 10),
                // 1.m * 2^e with 3 mantissa bits: exact in E4M3, f16, bf16.
                ScaleDtype::E4M3 => {
                    (1.0 + (u % 8) as f32 / 8.0) * 2f32.powi(((u >> 8) % 8) as i32 - 4)
                }
                ScaleDtype::F16 => half::f16::from_f32((u % 10000) as f32 * 1e-5 + 1e-4).to_f32(),
                ScaleDtype::Bf16 => half::bf16::from_f32((u % 10000) as f32 * 1e-5 + 1e-4).to_f32(),
                _ => (u % 100000) as f32 * 1.234e-6 + 1e-5,
            }
        })
        .collect();
    let zero_points = scheme.asymmetric.then(|| {
        (0..gr * gc)
            .map(|_| (r.next_u64() % (1u64 << bits)) as u8)
            .collect()
    });
    let g_idx = act_order.then(|| {
        let g = match scheme.granularity {
            Granularity::PerGroup(g) => g,
            _ => cols,
        };
        // A permuted assignment: column c -> group of a shuffled position.
        let mut perm: Vec<usize> = (0..cols).collect();
        for i in (1..cols).rev() {
            let j = (r.next_u64() % (i as u64 + 1)) as usize;
            perm.swap(i, j);
        }
        perm.iter().map(|&p| (p / g) as u32).collect()
    });
    let q = QuantizedTensor {
        scheme,
        rows,
        cols,
        data,
        scales,
        zero_points,
        global_scale: scheme.global_scale.then_some(448.0 * 6.0 / 3.7),
        g_idx,
        nested: None,
    };
    q.validate().unwrap();
    q
}

fn int(bits: u8, g: Granularity, asym: bool, sd: ScaleDtype) -> Scheme {
    Scheme {
        elem: ElemFormat::Int { bits },
        granularity: g,
        scale_dtype: sd,
        asymmetric: asym,
        global_scale: false,
    }
}

fn all_schemes() -> Vec<(Scheme, CtFormat, bool)> {
    use Granularity::*;
    vec![
        (
            int(4, PerGroup(128), false, ScaleDtype::F16),
            CtFormat::PackQuantized,
            false,
        ),
        (
            int(4, PerGroup(128), false, ScaleDtype::F16),
            CtFormat::PackQuantized,
            true,
        ),
        (
            int(4, PerGroup(128), true, ScaleDtype::F16),
            CtFormat::PackQuantized,
            false,
        ),
        (
            int(3, PerGroup(128), false, ScaleDtype::F16),
            CtFormat::PackQuantized,
            false,
        ),
        (
            int(3, PerGroup(64), true, ScaleDtype::Bf16),
            CtFormat::PackQuantized,
            true,
        ),
        (
            int(2, PerGroup(64), true, ScaleDtype::F16),
            CtFormat::PackQuantized,
            false,
        ),
        (
            int(8, PerChannel, false, ScaleDtype::F32),
            CtFormat::IntQuantized,
            false,
        ),
        (
            int(8, PerGroup(32), true, ScaleDtype::F16),
            CtFormat::IntQuantized,
            false,
        ),
        (
            int(4, PerTensor, false, ScaleDtype::F32),
            CtFormat::PackQuantized,
            false,
        ),
        (
            int(4, Block2d { rows: 16, cols: 16 }, false, ScaleDtype::F32),
            CtFormat::LowbitPacked,
            false,
        ),
        (
            Scheme {
                elem: ElemFormat::Float(FloatFormat::E4M3),
                granularity: PerChannel,
                scale_dtype: ScaleDtype::F32,
                asymmetric: false,
                global_scale: false,
            },
            CtFormat::FloatQuantized,
            false,
        ),
        (
            Scheme {
                elem: ElemFormat::Float(FloatFormat::E4M3),
                granularity: Block2d {
                    rows: 128,
                    cols: 128,
                },
                scale_dtype: ScaleDtype::F32,
                asymmetric: false,
                global_scale: false,
            },
            CtFormat::FloatQuantized,
            false,
        ),
        (
            Scheme {
                elem: ElemFormat::Float(FloatFormat::E2M1),
                granularity: PerGroup(16),
                scale_dtype: ScaleDtype::E4M3,
                asymmetric: false,
                global_scale: true,
            },
            CtFormat::Nvfp4PackQuantized,
            false,
        ),
        (
            Scheme {
                elem: ElemFormat::Float(FloatFormat::E2M1),
                granularity: PerGroup(32),
                scale_dtype: ScaleDtype::E8M0,
                asymmetric: false,
                global_scale: false,
            },
            CtFormat::Mxfp4PackQuantized,
            false,
        ),
        (
            Scheme {
                elem: ElemFormat::Nf4,
                granularity: PerGroup(64),
                scale_dtype: ScaleDtype::F32,
                asymmetric: false,
                global_scale: false,
            },
            CtFormat::LowbitPacked,
            false,
        ),
        (
            Scheme {
                elem: ElemFormat::Ternary,
                granularity: PerChannel,
                scale_dtype: ScaleDtype::F16,
                asymmetric: false,
                global_scale: false,
            },
            CtFormat::LowbitPacked,
            false,
        ),
    ]
}

#[test]
fn every_format_round_trips_exactly() {
    for (i, (scheme, fmt, act)) in all_schemes().into_iter().enumerate() {
        assert_eq!(ct::config::format_for(&scheme), fmt, "scheme {scheme:?}");
        // 576 columns: not a multiple of 128 (ragged last group), like SmolLM2.
        let q = random_tensor(scheme, 24, 576, act, 100 + i as u64);
        let dir = tmpdir(&format!("fmt{i}"));
        let out = dir.join("ckpt");
        let ck = Checkpoint {
            hf_config: json!({"model_type": "llama", "hidden_size": 576}),
            dense: vec![(
                "model.norm.weight".into(),
                vec![4],
                vec![1.0, 2.0, -3.5, 0.25],
            )],
            quantized: vec![("model.layers.0.mlp.down_proj".into(), q.clone())],
            ignore: vec!["lm_head".into()],
            input_activations: None,
            extra_files: vec![],
        };
        ct::write_checkpoint(&out, &ck, &WriteOptions::default()).unwrap();
        let back = ct::read_checkpoint(&out).unwrap();
        assert_eq!(back.quantized.len(), 1);
        assert_eq!(back.quantized[0].1, q, "format {fmt:?} scheme {scheme:?}");
        assert_eq!(back.dense, ck.dense);
        let cfg = ct::read_config(&out).unwrap();
        assert_eq!(cfg["quantization_config"]["format"], fmt.name());
        assert_eq!(
            cfg["quantization_config"]["quant_method"],
            "compressed-tensors"
        );

        // Standard formats also read back without the lowbit sidecar (as a third-party file).
        if fmt != CtFormat::LowbitPacked {
            std::fs::remove_file(out.join(ct::config::SCHEMES_FILE)).unwrap();
            let back = ct::read_checkpoint(&out).unwrap();
            assert_eq!(
                back.quantized[0].1, q,
                "without sidecar: {fmt:?} {scheme:?}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn int4_pack_layout_matches_compressed_tensors() {
    // One row of 8 codes 0..7 (values -8..-1 after the offset) -> one int32 word, nibble i = code i.
    let scheme = int(4, Granularity::PerGroup(8), false, ScaleDtype::F16);
    let q = QuantizedTensor {
        scheme,
        rows: 1,
        cols: 8,
        data: vec![0x10, 0x32, 0x54, 0x76],
        scales: vec![1.0],
        zero_points: None,
        global_scale: None,
        g_idx: None,
        nested: None,
    };
    let t = ct::writer::encode_module("m", &q, CtFormat::PackQuantized).unwrap();
    let packed = &t.iter().find(|(n, _)| n == "weight_packed").unwrap().1;
    assert_eq!(packed.shape, vec![1, 1]);
    assert_eq!(
        i32::from_le_bytes(packed.data[..4].try_into().unwrap()),
        0x7654_3210
    );
}

#[test]
fn zero_points_pack_along_dim0() {
    // 9 rows of 4-bit zero points in one column: rows 0..7 fill word 0, row 8 starts word 1.
    let codes: Vec<u8> = (0..9).map(|i| (i % 16) as u8).collect();
    let (w, n) = ct::writer::pack_dim0_i32(&codes, 9, 1, 4);
    assert_eq!(n, 2);
    assert_eq!(w[0] as u32, 0x7654_3210);
    assert_eq!(w[1], 8);
    assert_eq!(ct::reader::unpack_dim0_i32(&w, 9, 1, 4), codes);
    // 3-bit codes straddle word boundaries.
    let codes: Vec<u8> = (0..23).map(|i| (i * 5 % 8) as u8).collect();
    let (w, n) = ct::writer::pack_dim0_i32(&codes, 23, 1, 3);
    assert_eq!(n, 3);
    assert_eq!(ct::reader::unpack_dim0_i32(&w, 23, 1, 3), codes);
}

#[test]
fn sharding_and_activation_config() {
    let dir = tmpdir("shard");
    let out = dir.join("ckpt");
    let s = int(8, Granularity::PerChannel, false, ScaleDtype::F32);
    let ck = Checkpoint {
        hf_config: json!({"model_type": "llama"}),
        dense: vec![(
            "model.embed_tokens.weight".into(),
            vec![64, 8],
            (0..512).map(|x| x as f32).collect(),
        )],
        quantized: (0..4)
            .map(|i| {
                (
                    format!("model.layers.{i}.mlp.up_proj"),
                    random_tensor(s, 16, 64, false, i),
                )
            })
            .collect(),
        ignore: vec!["lm_head".into()],
        input_activations: Some(ActivationQuant::Int8PerToken),
        extra_files: vec![("tokenizer.json".into(), b"{}".to_vec())],
    };
    ct::write_checkpoint(
        &out,
        &ck,
        &WriteOptions {
            shard_bytes: 1500,
            overwrite: true,
        },
    )
    .unwrap();
    assert!(out.join("model.safetensors.index.json").exists());
    assert!(!out.join("model.safetensors").exists());
    assert!(out.join("tokenizer.json").exists());
    let back = ct::read_checkpoint(&out).unwrap();
    assert_eq!(back.input_activations, Some(ActivationQuant::Int8PerToken));
    let mut want = ck.quantized.clone();
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(back.quantized, want);
    assert_eq!(back.dense, ck.dense);
    let cfg = ct::read_config(&out).unwrap();
    let g = &cfg["quantization_config"]["config_groups"]["group_0"];
    assert_eq!(g["input_activations"]["strategy"], "token");
    assert_eq!(g["input_activations"]["dynamic"], true);
    // No temporary folder left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn refuses_to_replace_foreign_folder_and_bad_tensors() {
    let dir = tmpdir("foreign");
    let out = dir.join("ckpt");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("precious.txt"), b"x").unwrap();
    let ck = Checkpoint {
        hf_config: json!({}),
        ..Default::default()
    };
    assert!(ct::write_checkpoint(&out, &ck, &WriteOptions::default()).is_err());
    assert!(out.join("precious.txt").exists());
    // An invalid tensor (wrong number of scales) is an error and leaves nothing behind.
    let out2 = dir.join("ckpt2");
    let mut q = random_tensor(
        int(4, Granularity::PerGroup(32), false, ScaleDtype::F16),
        4,
        64,
        false,
        1,
    );
    q.scales.pop();
    let ck = Checkpoint {
        hf_config: json!({}),
        quantized: vec![("m".into(), q)],
        ..Default::default()
    };
    assert!(ct::write_checkpoint(&out2, &ck, &WriteOptions::default()).is_err());
    assert!(!out2.exists());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}
