//! compressed-tensors checkpoints (the layout vLLM and llm-compressor use): a writer and a
//! reader that round-trip lowbit's [`QuantizedTensor`] exactly.
//!
//! A checkpoint folder holds `config.json` (the model's Hugging Face config plus a
//! `quantization_config`), `model.safetensors` (or `model-0000i-of-0000N.safetensors` shards
//! with `model.safetensors.index.json` when larger than the shard limit), the tokenizer files,
//! the lowbit sidecar [`config::SCHEMES_FILE`] and `lowbit-report.json`. The per-format tensor
//! layouts are documented in `docs/checkpoints.md`.

pub mod config;
pub mod reader;
pub mod writer;

pub use config::{ActivationQuant, CtFormat};
pub use reader::{read_checkpoint, read_config};
pub use writer::{write_checkpoint, StreamingWriter, WriteOptions};

use lowbit_numerics::QuantizedTensor;
use serde_json::Value;

/// Everything a compressed-tensors checkpoint holds, in memory.
#[derive(Debug, Clone, Default)]
pub struct Checkpoint {
    /// The model's Hugging Face `config.json` (without `quantization_config`, which the writer
    /// builds from the quantized modules).
    pub hf_config: Value,
    /// Unquantized tensors by full name (`model.embed_tokens.weight`, norms, `lm_head.weight`):
    /// shape and f32 values.
    pub dense: Vec<(String, Vec<usize>, Vec<f32>)>,
    /// Quantized linear layers by module name (`model.layers.0.self_attn.q_proj`); their
    /// tensors are stored as `{module}.weight_packed`, `{module}.weight_scale`, ...
    pub quantized: Vec<(String, QuantizedTensor)>,
    /// Linear modules left unquantized (listed in `quantization_config.ignore`).
    pub ignore: Vec<String>,
    /// Per-token dynamic activation quantization applied to every quantized module (W8A8).
    pub input_activations: Option<ActivationQuant>,
    /// Extra files copied into the folder verbatim (file name, bytes): tokenizer files, the
    /// report, the quantization recipe.
    pub extra_files: Vec<(String, Vec<u8>)>,
}

/// Decode an FP8 E4M3 ("FN") byte.
pub(crate) fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = ((b >> 3) & 0x0F) as i32;
    let m = (b & 0x07) as f32;
    if e == 0x0F && (b & 0x07) == 0x07 {
        return f32::NAN;
    }
    if e == 0 {
        sign * m / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + m / 8.0) * 2f32.powi(e - 7)
    }
}

/// Encode an f32 that is exactly representable in E4M3; `None` otherwise.
pub(crate) fn e4m3_from_f32_exact(x: f32) -> Option<u8> {
    (0u8..=255).find(|&b| {
        let v = e4m3_to_f32(b);
        v == x && (v != 0.0 || v.is_sign_negative() == x.is_sign_negative())
    })
}

/// Decode an E8M0 byte (2^(b-127); 0xFF is NaN).
pub(crate) fn e8m0_to_f32(b: u8) -> f32 {
    if b == 0xFF {
        f32::NAN
    } else {
        2f32.powi(b as i32 - 127)
    }
}

/// Encode an exact power of two as E8M0; `None` otherwise.
pub(crate) fn e8m0_from_f32_exact(x: f32) -> Option<u8> {
    if x.is_nan() || x <= 0.0 || !x.is_finite() {
        return None;
    }
    let e = x.log2().round() as i32;
    if !(-127..=127).contains(&e) || 2f32.powi(e) != x {
        return None;
    }
    Some((e + 127) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_exact_roundtrip_all_codes() {
        for b in 0u8..=255 {
            let v = e4m3_to_f32(b);
            if v.is_nan() {
                continue;
            }
            assert_eq!(e4m3_from_f32_exact(v), Some(b), "code {b:#x} value {v}");
        }
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_from_f32_exact(0.3), None);
    }

    #[test]
    fn e8m0_exact() {
        assert_eq!(e8m0_from_f32_exact(1.0), Some(127));
        assert_eq!(e8m0_from_f32_exact(0.25), Some(125));
        assert_eq!(e8m0_from_f32_exact(3.0), None);
        assert_eq!(e8m0_to_f32(130), 8.0);
    }
}
