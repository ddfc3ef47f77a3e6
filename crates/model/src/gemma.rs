//! Gemma-3 pieces that the Llama-family forward pass ([`crate::llama`]) switches on when the
//! config's architecture is [`Arch::Gemma3`](crate::config::Arch::Gemma3); see
//! `docs/gemma3.md` for the whole list and how each was checked.
//!
//! Per decoder layer Gemma-3 has four norms more than Llama, kept in [`GemmaLayer`]:
//! ```text
//! h += post_attn_norm(o_proj(attention(rope(q_norm(q)), rope(k_norm(k)), v)))  (input: attn_norm(h))
//! h += post_ffw_norm(down_proj(gelu_tanh(gate_proj(n)) * up_proj(n)))          n = mlp_norm(h)
//! ```
//! (`q_norm`/`k_norm` are RMSNorms over each head's `head_dim` values.)
//!
//! Norm weights: Gemma's RMSNorm multiplies by `1 + w`. llama.cpp's converter stores `w + 1` in
//! GGUF, so the model holds the *effective* multiplier everywhere (every RMSNorm of this crate
//! is `x / rms(x) * weight`); a Hugging Face folder stores `w`, and [`PlusOneNorms`] adds the 1
//! when such a folder is loaded.

use crate::config::ModelConfig;
use crate::weights::TensorSource;
use crate::{Error, Result};

/// Hugging Face names (relative to `model.layers.{i}.`) of a Gemma-3 layer's extra norms, in
/// [`GemmaLayer`] field order.
pub const GEMMA_LAYER_NORMS: [&str; 4] = [
    "self_attn.q_norm",
    "self_attn.k_norm",
    "post_attention_layernorm",
    "post_feedforward_layernorm",
];

/// Hugging Face name (relative to `model.layers.{i}.`) of Gemma-3's pre-MLP norm (Llama calls
/// it `post_attention_layernorm`, which in Gemma-3 is the norm *after* attention).
pub const GEMMA_MLP_NORM: &str = "pre_feedforward_layernorm";

/// The extra norms of one Gemma-3 decoder layer (effective multipliers, see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct GemmaLayer {
    /// RMSNorm of each query head (`head_dim` values).
    pub q_norm: Vec<f32>,
    /// RMSNorm of each key head (`head_dim` values).
    pub k_norm: Vec<f32>,
    /// RMSNorm of the attention output before the residual add (`hidden` values).
    pub post_attn_norm: Vec<f32>,
    /// RMSNorm of the MLP output before the residual add (`hidden` values).
    pub post_ffw_norm: Vec<f32>,
}

impl GemmaLayer {
    /// Check the widths against `config`.
    pub fn validate(&self, config: &ModelConfig, layer: usize) -> Result<()> {
        let (d, h) = (config.head_dim, config.hidden_size);
        let got = [
            self.q_norm.len(),
            self.k_norm.len(),
            self.post_attn_norm.len(),
            self.post_ffw_norm.len(),
        ];
        for ((name, n), want) in GEMMA_LAYER_NORMS.iter().zip(got).zip([d, d, h, h]) {
            if n != want {
                return Err(Error::Shape(format!(
                    "model.layers.{layer}.{name}.weight has {n} values, expected {want}"
                )));
            }
        }
        Ok(())
    }
}

/// Read the extra norms of every layer from `src` (Hugging Face names).
pub fn load_layers(config: &ModelConfig, src: &mut dyn TensorSource) -> Result<Vec<GemmaLayer>> {
    (0..config.n_layers)
        .map(|i| {
            let mut get = |n: &str| {
                let name = format!("model.layers.{i}.{n}.weight");
                src.get_f32(&name)?.ok_or(Error::MissingTensor(name))
            };
            let l = GemmaLayer {
                q_norm: get(GEMMA_LAYER_NORMS[0])?,
                k_norm: get(GEMMA_LAYER_NORMS[1])?,
                post_attn_norm: get(GEMMA_LAYER_NORMS[2])?,
                post_ffw_norm: get(GEMMA_LAYER_NORMS[3])?,
            };
            l.validate(config, i)?;
            Ok(l)
        })
        .collect()
}

/// GELU, tanh approximation (PyTorch `gelu(approximate="tanh")`, HF `gelu_pytorch_tanh`):
/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x³)))`.
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    0.5 * x * (1.0 + (C * (x + 0.044_715 * x * x * x)).tanh())
}

/// A [`TensorSource`] that adds 1 to every RMSNorm weight (`*norm.weight`) of the source it
/// wraps: Hugging Face Gemma checkpoints store `w` for a `1 + w` multiplier.
pub struct PlusOneNorms<'a> {
    inner: &'a mut dyn TensorSource,
}

impl<'a> PlusOneNorms<'a> {
    /// Wrap `inner`.
    pub fn new(inner: &'a mut dyn TensorSource) -> Self {
        PlusOneNorms { inner }
    }
}

impl TensorSource for PlusOneNorms<'_> {
    fn get_f32(&mut self, name: &str) -> Result<Option<Vec<f32>>> {
        let v = self.inner.get_f32(name)?;
        Ok(match v {
            Some(mut w) if name.ends_with("norm.weight") => {
                w.iter_mut().for_each(|x| *x += 1.0);
                Some(w)
            }
            other => other,
        })
    }

    fn get_linear(
        &mut self,
        name: &str,
        out: usize,
        inp: usize,
    ) -> Result<Option<crate::linear::Linear>> {
        self.inner.get_linear(name, out, inp)
    }
}

/// The GGUF (llama.cpp) name of a Gemma-3 tensor's Hugging Face name, for the names whose
/// mapping differs from Llama's (`None`: use [`crate::load::gguf_tensor_name`]).
pub fn gguf_tensor_name(hf: &str) -> Option<String> {
    let rest = hf.strip_prefix("model.layers.")?;
    let (i, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let g = match module {
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "post_attention_layernorm" => "post_attention_norm",
        "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        _ => return None,
    };
    Some(format!("blk.{i}.{g}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_tanh_matches_closed_form_and_limits() {
        // Values of torch.nn.functional.gelu(x, approximate="tanh") in float64.
        for (x, want) in [
            (0.0f32, 0.0f64),
            (1.0, 0.841_191_990_608_276_8),
            (-1.0, -0.158_808_009_391_723_24),
            (3.0, 2.996_362_607_918_227),
        ] {
            assert!((gelu_tanh(x) as f64 - want).abs() < 1e-6, "{x}");
        }
        assert_eq!(gelu_tanh(-20.0), 0.0);
        assert_eq!(gelu_tanh(20.0), 20.0);
    }

    #[test]
    fn gemma_names_map_to_llama_cpp() {
        let m = |s: &str| gguf_tensor_name(s).unwrap();
        assert_eq!(
            m("model.layers.2.post_attention_layernorm.weight"),
            "blk.2.post_attention_norm.weight"
        );
        assert_eq!(
            m("model.layers.0.pre_feedforward_layernorm.weight"),
            "blk.0.ffn_norm.weight"
        );
        assert_eq!(
            m("model.layers.7.self_attn.k_norm.weight"),
            "blk.7.attn_k_norm.weight"
        );
        assert!(gguf_tensor_name("model.layers.0.mlp.up_proj.weight").is_none());
    }
}
