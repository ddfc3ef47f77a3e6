//! Fixtures shared by integration tests (each test file that needs them says `mod common;`).
#![allow(dead_code)]

use lowbit_model::config::{Arch, ModelConfig, RopeScaling};
use lowbit_model::llama::Model;
use lowbit_model::quantize::{sample_windows, CalibConfig};
use lowbit_model::weights::random_model;

/// A tiny Llama: 2 layers, hidden 64, MLP 96, 4 query heads over 2 KV heads of 16, vocab 61,
/// tied embeddings.
pub fn tiny_cfg() -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        vocab_size: 61,
        hidden_size: 64,
        intermediate_size: 96,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 16,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::None,
        rms_eps: 1e-5,
        max_ctx: 128,
        tie_embeddings: true,
        qkv_bias: false,
        bos_token_id: None,
        eos_token_id: None,
    }
}

/// A random [`tiny_cfg`] model (seed 7) with two residual outlier channels (3 and 40), as real
/// LLMs have: what rotations and activation quantizers are tested against.
pub fn outlier_model() -> Model {
    let mut m = random_model(tiny_cfg(), 7).unwrap();
    for row in m.embed.chunks_exact_mut(64) {
        row[3] *= 30.0;
        row[40] *= 20.0;
    }
    m
}

/// Six calibration windows of 24 tokens from a deterministic repetitive token stream of
/// `len` tokens below `vocab`.
pub fn windows(vocab: u32, len: u32) -> Vec<Vec<u32>> {
    let toks: Vec<u32> = (0..len).map(|i| (i * 7 + i / 13) % vocab).collect();
    sample_windows(
        &toks,
        &CalibConfig {
            samples: 6,
            seqlen: 24,
            seed: 3,
        },
    )
    .unwrap()
}
