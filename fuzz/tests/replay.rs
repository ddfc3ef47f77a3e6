//! Stable-toolchain replay of every fuzz target: the local corpus (`corpus/<target>/*`, if any)
//! plus seeds built here (a valid GGUF file, valid packed tensors) and deterministic mutations
//! of them (truncations, byte flips, splices). Bounded so it runs in seconds.

use lowbit_model::gguf::{GgufValue, GgufWriter};
use lowbit_numerics::gguf::GgmlType;
use lowbit_numerics::rounding::SplitMix64 as Rng;
use lowbit_numerics::{quantize, QuantOptions, Scheme};
use safetensors::{tensor::TensorView, Dtype};
use std::path::Path;

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("gguf_file", lowbit_fuzz::gguf_file),
    ("gguf_blocks", lowbit_fuzz::gguf_blocks),
    ("packed_decode", lowbit_fuzz::packed_decode),
    ("block_quantize", lowbit_fuzz::block_quantize),
    ("minifloat", lowbit_fuzz::minifloat),
    ("safetensors_file", lowbit_fuzz::safetensors_file),
    ("ct_module", lowbit_fuzz::ct_module),
];

fn tiny_gguf() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", GgufValue::String("llama".into()));
    w.add_kv("llama.block_count", GgufValue::U32(1));
    w.add_kv(
        "tokenizer.ggml.tokens",
        GgufValue::Array(vec![
            GgufValue::String("a".into()),
            GgufValue::String("b".into()),
        ]),
    );
    let f: Vec<f32> = (0..15).map(|i| i as f32 * 0.25 - 1.0).collect();
    let bytes: Vec<u8> = f.iter().flat_map(|x| x.to_le_bytes()).collect();
    w.add_tensor("t.f32", &[5, 3], GgmlType::F32, bytes)
        .expect("f32 tensor");
    let mut q = Vec::new();
    let x: Vec<f32> = (0..64).map(|i| (i as f32).sin()).collect();
    lowbit_numerics::gguf::quantize(GgmlType::Q8_0, &x, &mut q).expect("q8_0");
    w.add_tensor("t.q8", &[64, 1], GgmlType::Q8_0, q)
        .expect("q8 tensor");
    w.to_bytes().expect("serialize")
}

/// A safetensors file holding `tensors` (name, dtype, shape, bytes).
fn safetensors_bytes(tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                TensorView::new(*d, s.clone(), b).expect("valid view"),
            )
        })
        .collect();
    safetensors::serialize(views, None).expect("serialize")
}

fn tiny_safetensors() -> Vec<u8> {
    let f32s: Vec<u8> = (0..6)
        .flat_map(|i| (i as f32 - 2.5).to_le_bytes())
        .collect();
    let f16s: Vec<u8> = (0..4).flat_map(|i| half_bits(i as f32)).collect();
    safetensors_bytes(&[
        ("a.weight".into(), Dtype::F32, vec![2, 3], f32s),
        ("b.bias".into(), Dtype::F16, vec![4], f16s.clone()),
        ("c.bf".into(), Dtype::BF16, vec![2, 2], f16s),
        ("d.i8".into(), Dtype::I8, vec![3], vec![1, 2, 3]),
    ])
}

/// f16 bits of small integers (exact), little-endian.
fn half_bits(x: f32) -> [u8; 2] {
    let bits: u16 = if x == 0.0 {
        0
    } else {
        let e = x.log2().floor() as i32;
        let m = ((x / 2f32.powi(e) - 1.0) * 1024.0) as u16;
        (((e + 15) as u16) << 10) | m
    };
    bits.to_le_bytes()
}

/// One selector byte (the scheme index in `lowbit_fuzz::SCHEMES`) plus a safetensors file
/// holding a real module of that scheme, as the checkpoint writer stores it.
fn ct_seeds() -> Vec<Vec<u8>> {
    use lowbit_model::ct::{config::format_for, writer::encode_module};
    let (rows, cols) = (4, 96);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 60.0)
        .collect();
    let mut out = Vec::new();
    for (i, name) in lowbit_fuzz::SCHEMES.iter().enumerate() {
        let scheme = Scheme::from_name(name).expect("known");
        let Ok(q) = quantize(&w, rows, cols, &scheme, &QuantOptions::default()) else {
            continue;
        };
        let Ok(ts) = encode_module("m", &q, format_for(&scheme)) else {
            continue;
        };
        let tensors: Vec<_> = ts
            .into_iter()
            .map(|(n, t)| (format!("m.{n}"), t.dtype, t.shape, t.data))
            .collect();
        let mut v = vec![i as u8];
        v.extend(safetensors_bytes(&tensors));
        out.push(v);
    }
    out
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let mut s: Vec<Vec<u8>> = vec![vec![], vec![0], vec![0xFF; 64]];
    if target == "gguf_file" {
        s.push(tiny_gguf());
    }
    if target == "safetensors_file" {
        s.push(tiny_safetensors());
    }
    if target == "ct_module" {
        s.extend(ct_seeds());
    }
    let mut r = Rng(0x5EED);
    for len in [7usize, 40, 300, 2000] {
        s.push((0..len).map(|_| r.next_u64() as u8).collect());
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    if let Ok(rd) = std::fs::read_dir(&dir) {
        let mut files: Vec<_> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for f in files {
            s.push(std::fs::read(&f).expect("corpus file readable"));
        }
    }
    s
}

fn mutate(r: &mut Rng, base: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    match r.next_u64() % 4 {
        0 if !v.is_empty() => v.truncate(r.next_u64() as usize % v.len()),
        1 if !v.is_empty() => {
            for _ in 0..1 + r.next_u64() % 4 {
                let i = r.next_u64() as usize % v.len();
                v[i] ^= 1 << (r.next_u64() % 8);
            }
        }
        2 if !v.is_empty() => {
            let i = r.next_u64() as usize % v.len();
            let val = [0u8, 0xFF, 0x7F, 0x80][r.next_u64() as usize % 4];
            for b in v.iter_mut().skip(i).take(8) {
                *b = val;
            }
        }
        _ => v.extend((0..r.next_u64() % 16).map(|_| r.next_u64() as u8)),
    }
    v
}

#[test]
fn replay_all_targets() {
    let per_seed = std::env::var("LOWBIT_FUZZ_MUTATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    for (name, f) in TARGETS {
        let seeds = seeds(name);
        let mut r = Rng(name.len() as u64);
        let mut runs = 0usize;
        for s in &seeds {
            f(s);
            runs += 1;
            for _ in 0..per_seed {
                f(&mutate(&mut r, s));
                runs += 1;
            }
        }
        eprintln!("{name}: {runs} inputs, no panic");
        // CI sets this before the libFuzzer runs so they start from valid files (a real GGUF,
        // real compressed-tensors modules) instead of random bytes.
        if std::env::var_os("LOWBIT_FUZZ_WRITE_SEEDS").is_some() {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("corpus")
                .join(name);
            std::fs::create_dir_all(&dir).expect("corpus dir");
            for (i, s) in seeds.iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i:03}")), s).expect("write seed");
            }
        }
    }
}

#[test]
fn valid_gguf_seed_parses() {
    // The replay is only meaningful if the seed is a real file the reader accepts.
    let f = lowbit_model::gguf::GgufFile::from_bytes(tiny_gguf()).expect("seed must parse");
    assert_eq!(f.tensors().len(), 2);
    assert_eq!(f.tensor_f32("t.f32").unwrap()[4], 0.0);
}

#[test]
fn valid_safetensors_and_ct_seeds_parse() {
    let f = lowbit_model::hf::SafetensorsFile::from_bytes("seed", tiny_safetensors())
        .expect("seed must parse");
    assert_eq!(f.tensor_f32("a.weight").unwrap().1[5], 2.5);
    assert_eq!(f.tensor_f32("b.bias").unwrap().1, vec![0.0, 1.0, 2.0, 3.0]);
    assert!(f.tensor_f32("d.i8").is_err(), "I8 does not convert to f32");
    // Every ct seed must decode back to its module, else the mutations test only the header.
    let seeds = ct_seeds();
    assert!(
        seeds.len() >= 10,
        "only {} schemes made ct seeds",
        seeds.len()
    );
    for s in &seeds {
        let scheme = Scheme::from_name(lowbit_fuzz::SCHEMES[s[0] as usize]).unwrap();
        let st = safetensors::SafeTensors::deserialize(&s[1..]).unwrap();
        let get = |suffix: &str| {
            let v = st.tensor(&format!("m.{suffix}")).ok()?;
            Some(lowbit_model::ct::reader::RawTensor {
                dtype: v.dtype(),
                shape: v.shape().to_vec(),
                data: v.data().to_vec(),
            })
        };
        let fmt = lowbit_model::ct::config::format_for(&scheme);
        let q = lowbit_model::ct::reader::decode_module("m", scheme, fmt, &get, None)
            .unwrap_or_else(|e| panic!("{}: {e}", lowbit_fuzz::SCHEMES[s[0] as usize]));
        assert_eq!((q.rows, q.cols), (4, 96));
    }
}
