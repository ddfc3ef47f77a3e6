//! [`ModelConfig`]: the shape and hyper-parameters of a Llama-family model, read from a Hugging
//! Face `config.json` or (in [`crate::load`]) from GGUF metadata.

use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// The architectures this crate runs. All are "Llama family": pre-norm decoder, RMSNorm, RoPE,
/// GQA attention, gated MLP. Gemma-3 adds post-norms, q/k norms, GeGLU, a scaled embedding and
/// sliding-window attention on its local layers (see [`Gemma3Params`] and `docs/gemma3.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Arch {
    /// Llama 1/2/3 and SmolLM (`LlamaForCausalLM`, GGUF `llama`).
    Llama,
    /// Mistral (`MistralForCausalLM`; same graph as Llama, sliding window ignored).
    Mistral,
    /// Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`, GGUF `qwen2`): bias on q/k/v projections.
    Qwen2,
    /// Gemma-3 text models (`Gemma3ForCausalLM`, model_type `gemma3_text`, GGUF `gemma3`).
    Gemma3(Gemma3Params),
}

/// What Gemma-3 needs beyond [`ModelConfig`]'s Llama fields.
///
/// Layer `i` is *global* (full causal attention, RoPE base [`ModelConfig::rope_theta`] with
/// [`ModelConfig::rope_scaling`]) when `(i + 1) % sliding_window_pattern == 0`, else *local*:
/// the query at position `p` sees keys `p - sliding_window < k <= p`, RoPE base
/// `rope_local_theta`, no scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemma3Params {
    /// Keys a local layer's query sees (itself included).
    pub sliding_window: usize,
    /// Every `sliding_window_pattern`-th layer is global.
    pub sliding_window_pattern: usize,
    /// RoPE base of the local layers.
    pub rope_local_theta: f64,
    /// Attention scores are scaled by `query_pre_attn_scalar^-0.5` (not `head_dim^-0.5`).
    pub query_pre_attn_scalar: f64,
}

impl Default for Gemma3Params {
    /// Hugging Face `Gemma3TextConfig` defaults.
    fn default() -> Self {
        Gemma3Params {
            sliding_window: 4096,
            sliding_window_pattern: 6,
            rope_local_theta: 10_000.0,
            query_pre_attn_scalar: 256.0,
        }
    }
}

// The float fields are validated finite, so bitwise equality is an equivalence.
impl Eq for Gemma3Params {}

impl std::hash::Hash for Gemma3Params {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.sliding_window.hash(h);
        self.sliding_window_pattern.hash(h);
        self.rope_local_theta.to_bits().hash(h);
        self.query_pre_attn_scalar.to_bits().hash(h);
    }
}

/// Names accepted for [`Arch`], listed in error messages.
pub const SUPPORTED_ARCHS: &str = "HF: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, \
     Gemma3ForCausalLM (model_type llama, mistral, qwen2, gemma3_text); \
     GGUF general.architecture: llama, qwen2, gemma3";

impl Arch {
    /// Parse an HF `model_type` / `architectures[0]` or a GGUF `general.architecture`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "llama" | "LlamaForCausalLM" | "smollm" => Ok(Arch::Llama),
            "mistral" | "MistralForCausalLM" => Ok(Arch::Mistral),
            "qwen2" | "Qwen2ForCausalLM" => Ok(Arch::Qwen2),
            "gemma3" | "gemma3_text" | "Gemma3ForCausalLM" => {
                Ok(Arch::Gemma3(Gemma3Params::default()))
            }
            other => Err(Error::Config(format!(
                "unsupported architecture `{other}`; supported: {SUPPORTED_ARCHS}"
            ))),
        }
    }

    /// The GGUF `general.architecture` string (Mistral is written as `llama`).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama | Arch::Mistral => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3(_) => "gemma3",
        }
    }
}

/// How RoPE frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub enum RopeScaling {
    /// Plain RoPE.
    #[default]
    None,
    /// Position interpolation: every inverse frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1 scaling (HF `rope_type = "llama3"`): long wavelengths divided by `factor`,
    /// short ones kept, a smooth blend in between.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The pre-training context.
        original_max_position_embeddings: f64,
    },
    /// Explicit per-frequency divisors (llama.cpp's `rope_freqs.weight`, `head_dim / 2` values).
    FreqFactors(Vec<f32>),
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Architecture.
    pub arch: Arch,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Residual stream width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (GQA; equal to `n_heads` for plain MHA).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE rescaling.
    pub rope_scaling: RopeScaling,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Maximum context the model was trained for.
    pub max_ctx: usize,
    /// The LM head shares the embedding matrix.
    pub tie_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    pub qkv_bias: bool,
    /// Beginning-of-sequence token, if the model has one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token, if the model has one.
    pub eos_token_id: Option<u32>,
}

fn get_usize(v: &Value, key: &str) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| Error::Config(format!("config.json: missing or non-integer `{key}`")))
}

fn get_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn first_id(v: Option<&Value>) -> Option<u32> {
    match v? {
        Value::Number(n) => n.as_u64().map(|x| x as u32),
        Value::Array(a) => a.first().and_then(Value::as_u64).map(|x| x as u32),
        _ => None,
    }
}

/// The Gemma-3 fields of a `Gemma3TextConfig` JSON (absent ones take transformers' defaults).
/// Refuses what the forward pass does not implement: logit soft-capping, activations other than
/// tanh-GELU, bidirectional attention, layer types off the `sliding_window_pattern` rhythm.
fn gemma3_from_hf(v: &Value) -> Result<Gemma3Params> {
    let d = Gemma3Params::default();
    let err = |what: String| Err(Error::Config(format!("gemma3 config.json: {what}")));
    for key in ["final_logit_softcapping", "attn_logit_softcapping"] {
        if v.get(key).is_some_and(|x| !x.is_null()) {
            return err(format!("`{key}` is not supported"));
        }
    }
    if v.get("use_bidirectional_attention")
        .and_then(Value::as_bool)
        == Some(true)
    {
        return err("bidirectional attention is not supported".into());
    }
    match v.get("hidden_activation").and_then(Value::as_str) {
        None | Some("gelu_pytorch_tanh") | Some("gelu_tanh") => {}
        Some(other) => return err(format!("hidden_activation `{other}` is not supported")),
    }
    let local_theta = get_f64(v, "rope_local_base_freq").or_else(|| {
        v.get("rope_parameters")
            .and_then(|r| r.get("sliding_attention"))
            .and_then(|r| get_f64(r, "rope_theta"))
    });
    let p = Gemma3Params {
        sliding_window: v
            .get("sliding_window")
            .and_then(Value::as_u64)
            .map_or(d.sliding_window, |w| w as usize),
        sliding_window_pattern: v
            .get("sliding_window_pattern")
            .and_then(Value::as_u64)
            .map_or(d.sliding_window_pattern, |w| w as usize),
        rope_local_theta: local_theta.unwrap_or(d.rope_local_theta),
        query_pre_attn_scalar: get_f64(v, "query_pre_attn_scalar")
            .unwrap_or(d.query_pre_attn_scalar),
    };
    if let Some(types) = v.get("layer_types").and_then(Value::as_array) {
        for (i, t) in types.iter().enumerate() {
            let global = p.sliding_window_pattern > 0 && (i + 1) % p.sliding_window_pattern == 0;
            let want = if global {
                "full_attention"
            } else {
                "sliding_attention"
            };
            if t.as_str() != Some(want) {
                return err(format!(
                    "layer_types[{i}] is {t}, expected {want} (pattern of {})",
                    p.sliding_window_pattern
                ));
            }
        }
    }
    Ok(p)
}

impl ModelConfig {
    /// Parse the text of a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("config.json is not valid JSON: {e}")))?;
        let arch_name = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .or_else(|| v.get("model_type").and_then(Value::as_str))
            .ok_or_else(|| Error::Config("config.json names no architecture".into()))?;
        let arch = Arch::parse(arch_name)?;
        let hidden_size = get_usize(&v, "hidden_size")?;
        let n_heads = get_usize(&v, "num_attention_heads")?;
        let n_kv_heads = get_usize(&v, "num_key_value_heads").unwrap_or(n_heads);
        let head_dim = match v.get("head_dim").and_then(Value::as_u64) {
            Some(h) => h as usize,
            None => hidden_size.checked_div(n_heads).unwrap_or(0),
        };
        let rope_scaling = match v.get("rope_scaling").filter(|r| !r.is_null()) {
            None => RopeScaling::None,
            Some(r) => {
                let ty = r
                    .get("rope_type")
                    .or_else(|| r.get("type"))
                    .and_then(Value::as_str);
                let factor = get_f64(r, "factor").unwrap_or(1.0);
                match ty {
                    Some("llama3") => RopeScaling::Llama3 {
                        factor,
                        low_freq_factor: get_f64(r, "low_freq_factor").unwrap_or(1.0),
                        high_freq_factor: get_f64(r, "high_freq_factor").unwrap_or(4.0),
                        original_max_position_embeddings: get_f64(
                            r,
                            "original_max_position_embeddings",
                        )
                        .unwrap_or(8192.0),
                    },
                    Some("linear") => RopeScaling::Linear { factor },
                    Some("default") | None => RopeScaling::None,
                    Some(other) => {
                        return Err(Error::Config(format!(
                            "unsupported rope_scaling type `{other}` (supported: linear, llama3)"
                        )))
                    }
                }
            }
        };
        let arch = match arch {
            Arch::Gemma3(_) => Arch::Gemma3(gemma3_from_hf(&v)?),
            a => a,
        };
        // transformers 5 writes per-layer-type RoPE parameters; the global layers' base is
        // `full_attention.rope_theta`.
        let rope_theta = get_f64(&v, "rope_theta")
            .or_else(|| {
                v.get("rope_parameters")
                    .and_then(|r| r.get("full_attention").or(Some(r)))
                    .and_then(|r| get_f64(r, "rope_theta"))
            })
            .unwrap_or(match arch {
                Arch::Gemma3(_) => 1_000_000.0,
                _ => 10000.0,
            });
        let cfg = ModelConfig {
            arch,
            vocab_size: get_usize(&v, "vocab_size")?,
            hidden_size,
            intermediate_size: get_usize(&v, "intermediate_size")?,
            n_layers: get_usize(&v, "num_hidden_layers")?,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_theta,
            rope_scaling,
            rms_eps: get_f64(&v, "rms_norm_eps").unwrap_or(1e-6) as f32,
            max_ctx: get_usize(&v, "max_position_embeddings").unwrap_or(2048),
            tie_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(matches!(arch, Arch::Gemma3(_))),
            qkv_bias: match arch {
                Arch::Qwen2 => true,
                _ => v
                    .get("attention_bias")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            },
            bos_token_id: first_id(v.get("bos_token_id")),
            eos_token_id: first_id(v.get("eos_token_id")),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read a `config.json` file.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_hf_json(&text)
    }

    /// Check the shape for consistency (non-zero sizes, heads divide evenly, even head width).
    pub fn validate(&self) -> Result<()> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
        ];
        for (name, v) in nonzero {
            if v == 0 {
                return Err(Error::Config(format!("{name} is 0")));
            }
        }
        if self.n_heads % self.n_kv_heads != 0 {
            return Err(Error::Config(format!(
                "{} query heads is not a multiple of {} KV heads",
                self.n_heads, self.n_kv_heads
            )));
        }
        if self.head_dim % 2 != 0 {
            return Err(Error::Config(format!(
                "head_dim {} is odd (RoPE needs pairs)",
                self.head_dim
            )));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(Error::Config(format!(
                "rope_theta {} is not positive",
                self.rope_theta
            )));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return Err(Error::Config(format!(
                "rms_eps {} is invalid",
                self.rms_eps
            )));
        }
        if let Arch::Gemma3(g) = &self.arch {
            if g.sliding_window == 0 || g.sliding_window_pattern == 0 {
                return Err(Error::Config(format!(
                    "gemma3: sliding window {} and pattern {} must be positive",
                    g.sliding_window, g.sliding_window_pattern
                )));
            }
            for (name, x) in [
                ("rope_local_theta", g.rope_local_theta),
                ("query_pre_attn_scalar", g.query_pre_attn_scalar),
            ] {
                if !(x.is_finite() && x > 0.0) {
                    return Err(Error::Config(format!("gemma3: {name} {x} is not positive")));
                }
            }
        }
        if let RopeScaling::FreqFactors(f) = &self.rope_scaling {
            if f.len() != self.head_dim / 2 {
                return Err(Error::Config(format!(
                    "rope frequency factors: {} values, expected head_dim/2 = {}",
                    f.len(),
                    self.head_dim / 2
                )));
            }
        }
        Ok(())
    }

    /// The Gemma-3 parameters, when this is a Gemma-3 model.
    pub fn gemma3(&self) -> Option<&Gemma3Params> {
        match &self.arch {
            Arch::Gemma3(g) => Some(g),
            _ => None,
        }
    }

    /// The attention window of layer `layer`: `Some(w)` for a sliding-window (local) layer,
    /// whose query at position `p` sees keys `p - w < k <= p`; `None` for full causal attention.
    pub fn sliding_window(&self, layer: usize) -> Option<usize> {
        let g = self.gemma3()?;
        ((layer + 1) % g.sliding_window_pattern != 0).then_some(g.sliding_window)
    }

    /// The factor attention scores are scaled by before the softmax: `head_dim^-0.5`, or
    /// Gemma-3's `query_pre_attn_scalar^-0.5`.
    pub fn attn_scale(&self) -> f32 {
        match self.gemma3() {
            Some(g) => (1.0 / g.query_pre_attn_scalar.sqrt()) as f32,
            None => 1.0 / (self.head_dim as f32).sqrt(),
        }
    }

    /// Width of the query projection output (`n_heads * head_dim`).
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of the key/value projection outputs (`n_kv_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// The KV-cache shape of this model.
    pub fn kv_shape(&self) -> lowbit_kv_cache::KvShape {
        lowbit_kv_cache::KvShape {
            n_layers: self.n_layers,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM: &str = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama",
      "hidden_size":576,"intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,
      "num_key_value_heads":3,"rope_theta":100000,"rms_norm_eps":1e-5,"vocab_size":49152,
      "max_position_embeddings":8192,"tie_word_embeddings":true,"bos_token_id":1,"eos_token_id":2}"#;

    #[test]
    fn parses_smollm() {
        let c = ModelConfig::from_hf_json(SMOLLM).unwrap();
        assert_eq!(c.arch, Arch::Llama);
        assert_eq!(
            (c.head_dim, c.n_kv_heads, c.q_dim(), c.kv_dim()),
            (64, 3, 576, 192)
        );
        assert!(c.tie_embeddings && !c.qkv_bias);
        assert_eq!(c.rope_theta, 100000.0);
        assert_eq!(c.eos_token_id, Some(2));
    }

    #[test]
    fn parses_llama3_scaling_and_qwen_bias() {
        let t = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
          "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":10,
          "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
          "high_freq_factor":4.0,"original_max_position_embeddings":8192},"eos_token_id":[5,6]}"#;
        let c = ModelConfig::from_hf_json(t).unwrap();
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(c.eos_token_id, Some(5));
        let q = t.replace("LlamaForCausalLM", "Qwen2ForCausalLM");
        assert!(ModelConfig::from_hf_json(&q).unwrap().qkv_bias);
    }

    #[test]
    fn rejects_unknown_arch_listing_supported() {
        let t = SMOLLM.replace("LlamaForCausalLM", "GPT2LMHeadModel");
        let e = ModelConfig::from_hf_json(&t).unwrap_err().to_string();
        assert!(
            e.contains("GPT2LMHeadModel")
                && e.contains("Qwen2ForCausalLM")
                && e.contains("gemma3")
                && e.contains("Gemma3ForCausalLM"),
            "{e}"
        );
    }

    #[test]
    fn parses_gemma3_text_config() {
        // The fields transformers 5.17 writes for Gemma-3-270M (abridged layer list: 6 layers).
        let t = r#"{"architectures":["Gemma3ForCausalLM"],"model_type":"gemma3_text",
          "hidden_size":640,"intermediate_size":2048,"num_hidden_layers":6,"num_attention_heads":4,
          "num_key_value_heads":1,"head_dim":256,"vocab_size":262144,"rms_norm_eps":1e-6,
          "query_pre_attn_scalar":256,"sliding_window":512,"final_logit_softcapping":null,
          "hidden_activation":"gelu_pytorch_tanh","max_position_embeddings":32768,
          "layer_types":["sliding_attention","sliding_attention","sliding_attention",
            "sliding_attention","sliding_attention","full_attention"],
          "rope_parameters":{"full_attention":{"rope_type":"default","rope_theta":1000000.0},
            "sliding_attention":{"rope_type":"default","rope_theta":10000.0}}}"#;
        let c = ModelConfig::from_hf_json(t).unwrap();
        let g = c.gemma3().unwrap();
        assert_eq!((g.sliding_window, g.sliding_window_pattern), (512, 6));
        assert_eq!((g.rope_local_theta, c.rope_theta), (10000.0, 1e6));
        assert!(c.tie_embeddings);
        assert_eq!(c.sliding_window(4), Some(512));
        assert_eq!(c.sliding_window(5), None);
        assert_eq!(c.attn_scale(), 1.0 / 16.0);
        let capped = t.replace(
            r#""final_logit_softcapping":null"#,
            r#""final_logit_softcapping":30.0"#,
        );
        assert!(ModelConfig::from_hf_json(&capped).is_err());
        let off_pattern = t.replacen("sliding_attention", "full_attention", 1);
        assert!(ModelConfig::from_hf_json(&off_pattern).is_err());
    }

    #[test]
    fn rejects_inconsistent_heads() {
        let t = SMOLLM.replace("\"num_key_value_heads\":3", "\"num_key_value_heads\":4");
        assert!(ModelConfig::from_hf_json(&t).is_err());
    }
}
