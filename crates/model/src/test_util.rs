//! Small deterministic fixtures shared by the crate's unit tests (integration tests have their
//! own in `tests/common`).

use crate::config::{Arch, ModelConfig, RopeScaling};

/// `n` values uniform in [-1, 1) from a 64-bit LCG seeded with `seed`.
pub(crate) fn lcg_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A two-layer Llama config small enough for exact comparisons (GQA 4:2, head_dim 16).
pub(crate) fn tiny_llama(tie_embeddings: bool, qkv_bias: bool) -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        vocab_size: 300,
        hidden_size: 64,
        intermediate_size: 96,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 16,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::None,
        rms_eps: 1e-5,
        max_ctx: 64,
        tie_embeddings,
        qkv_bias,
        bos_token_id: None,
        eos_token_id: None,
    }
}
