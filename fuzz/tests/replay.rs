//! Stable-toolchain replay of every fuzz target: the checked-in corpus (`corpus/<target>/*`)
//! plus seeds built here (a valid GGUF file, valid packed tensors) and deterministic mutations
//! of them (truncations, byte flips, splices). Bounded so it runs in seconds.

use lowbit_model::gguf::{GgufValue, GgufWriter};
use lowbit_numerics::gguf::GgmlType;
use std::path::Path;

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("gguf_file", lowbit_fuzz::gguf_file),
    ("gguf_blocks", lowbit_fuzz::gguf_blocks),
    ("packed_decode", lowbit_fuzz::packed_decode),
    ("block_quantize", lowbit_fuzz::block_quantize),
    ("minifloat", lowbit_fuzz::minifloat),
];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn tiny_gguf() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", GgufValue::String("llama".into()));
    w.add_kv("llama.block_count", GgufValue::U32(1));
    w.add_kv(
        "tokenizer.ggml.tokens",
        GgufValue::Array(vec![GgufValue::String("a".into()), GgufValue::String("b".into())]),
    );
    let f: Vec<f32> = (0..15).map(|i| i as f32 * 0.25 - 1.0).collect();
    let bytes: Vec<u8> = f.iter().flat_map(|x| x.to_le_bytes()).collect();
    w.add_tensor("t.f32", &[5, 3], GgmlType::F32, bytes).expect("f32 tensor");
    let mut q = Vec::new();
    let x: Vec<f32> = (0..64).map(|i| (i as f32).sin()).collect();
    lowbit_numerics::gguf::quantize(GgmlType::Q8_0, &x, &mut q).expect("q8_0");
    w.add_tensor("t.q8", &[64, 1], GgmlType::Q8_0, q).expect("q8 tensor");
    w.to_bytes().expect("serialize")
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let mut s: Vec<Vec<u8>> = vec![vec![], vec![0], vec![0xFF; 64]];
    if target == "gguf_file" {
        s.push(tiny_gguf());
    }
    let mut r = Rng(0x5EED);
    for len in [7usize, 40, 300, 2000] {
        s.push((0..len).map(|_| r.next() as u8).collect());
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
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
    match r.next() % 4 {
        0 if !v.is_empty() => v.truncate(r.next() as usize % v.len()),
        1 if !v.is_empty() => {
            for _ in 0..1 + r.next() % 4 {
                let i = r.next() as usize % v.len();
                v[i] ^= 1 << (r.next() % 8);
            }
        }
        2 if !v.is_empty() => {
            let i = r.next() as usize % v.len();
            let val = [0u8, 0xFF, 0x7F, 0x80][r.next() as usize % 4];
            for b in v.iter_mut().skip(i).take(8) {
                *b = val;
            }
        }
        _ => v.extend((0..r.next() % 16).map(|_| r.next() as u8)),
    }
    v
}

#[test]
fn replay_all_targets() {
    let per_seed = std::env::var("LOWBIT_FUZZ_MUTATIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(150);
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
    }
}

#[test]
fn valid_gguf_seed_parses() {
    // The replay is only meaningful if the seed is a real file the reader accepts.
    let f = lowbit_model::gguf::GgufFile::from_bytes(tiny_gguf()).expect("seed must parse");
    assert_eq!(f.tensors().len(), 2);
    assert_eq!(f.tensor_f32("t.f32").unwrap()[4], 0.0);
}
