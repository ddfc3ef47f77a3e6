//! Loading a [`Model`] from a GGUF file (and, through [`crate::weights::TensorSource`], from any
//! other container).
//!
//! # GGUF
//! Config from `general.architecture` and the `{arch}.*` keys; tensors mapped from llama.cpp
//! names (`token_embd`, `blk.N.attn_q`, ..., `output_norm`, `output`) to Hugging Face names,
//! every tensor dequantized to f32 (the "exact f32 dequantization" is the reference model).
//!
//! llama.cpp's converter permutes the rows of Q and K of `llama`-architecture models so that
//! its RoPE can rotate adjacent pairs `(2i, 2i+1)`; HF rotates `(i, i + d/2)`. The loader undoes
//! the permutation so that the model always holds HF-ordered weights (what calibration,
//! exporters and safetensors checkpoints expect). `qwen2` files are not permuted.

use crate::config::{Arch, ModelConfig, RopeScaling};
use crate::gguf::GgufFile;
use crate::llama::Model;
use crate::weights::{build_model, TensorSource};
use crate::{Error, Result};
use std::path::Path;

fn meta_err(key: &str, what: &str) -> Error {
    Error::Metadata {
        key: key.to_string(),
        what: what.to_string(),
    }
}

/// Read a [`ModelConfig`] from GGUF metadata (`llama.*`, `qwen2.*` keys).
pub fn config_from_gguf(g: &GgufFile) -> Result<ModelConfig> {
    let arch_name = g.get_str("general.architecture")?;
    let arch = Arch::parse(arch_name)?;
    let a = arch_name;
    let u = |k: &str| -> Result<usize> { Ok(g.get_u64(&format!("{a}.{k}"))? as usize) };
    let opt_u = |k: &str| {
        g.get(&format!("{a}.{k}"))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
    };
    let opt_f = |k: &str| g.get(&format!("{a}.{k}")).and_then(|v| v.as_f64());
    let hidden_size = u("embedding_length")?;
    let n_heads = u("attention.head_count")?;
    let n_kv_heads = opt_u("attention.head_count_kv").unwrap_or(n_heads);
    let head_dim = opt_u("attention.key_length")
        .or_else(|| opt_u("rope.dimension_count"))
        .unwrap_or(hidden_size.checked_div(n_heads).unwrap_or(0));
    let embd = g.tensor_info("token_embd.weight")?;
    let vocab_size = match opt_u("vocab_size") {
        Some(v) => v,
        None => *embd
            .dims
            .get(1)
            .ok_or_else(|| meta_err("token_embd.weight", "not 2-D"))? as usize,
    };
    let rope_scaling = if g.tensor_info("rope_freqs.weight").is_ok() {
        RopeScaling::FreqFactors(g.tensor_f32("rope_freqs.weight")?)
    } else {
        match g
            .get(&format!("{a}.rope.scaling.type"))
            .and_then(|v| v.as_str())
        {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: opt_f("rope.scaling.factor")
                    .ok_or_else(|| meta_err(&format!("{a}.rope.scaling.factor"), "missing"))?,
            },
            Some(other) => {
                return Err(Error::Config(format!(
                    "GGUF rope scaling `{other}` is not supported (none, linear, rope_freqs)"
                )))
            }
        }
    };
    let tok_id = |k: &str| g.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
    let n_layers = u("block_count")?;
    let arch = match arch {
        // llama.cpp (src/llama-model.cpp, LLM_ARCH_GEMMA3) hard-codes what GGUF does not carry:
        // every 6th layer global, local RoPE base 10000, query scale 1/sqrt(head_dim) except
        // for the 27B model (62 layers), which uses 1/sqrt(hidden / heads).
        Arch::Gemma3(d) => Arch::Gemma3(crate::config::Gemma3Params {
            sliding_window: opt_u("attention.sliding_window").unwrap_or(d.sliding_window),
            sliding_window_pattern: opt_u("attention.sliding_window_pattern")
                .unwrap_or(d.sliding_window_pattern),
            rope_local_theta: d.rope_local_theta,
            query_pre_attn_scalar: if n_layers == 62 {
                (hidden_size / n_heads.max(1)) as f64
            } else {
                head_dim as f64
            },
        }),
        a => a,
    };
    let cfg = ModelConfig {
        arch,
        vocab_size,
        hidden_size,
        intermediate_size: u("feed_forward_length")?,
        n_layers,
        n_heads,
        n_kv_heads,
        head_dim,
        rope_theta: opt_f("rope.freq_base").unwrap_or(10000.0),
        rope_scaling,
        rms_eps: opt_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f32,
        max_ctx: opt_u("context_length").unwrap_or(2048),
        tie_embeddings: g.tensor_info("output.weight").is_err(),
        qkv_bias: g.tensor_info("blk.0.attn_q.bias").is_ok(),
        bos_token_id: tok_id("tokenizer.ggml.bos_token_id"),
        eos_token_id: tok_id("tokenizer.ggml.eos_token_id"),
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The llama.cpp name of an HF tensor name (None for names GGUF does not have).
pub fn gguf_tensor_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (i, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let g = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{i}.{g}.{kind}"))
}

/// Undo llama.cpp's Q/K row permutation: within each head of `head_dim` rows, GGUF row
/// `2j + s` holds HF row `s * head_dim/2 + j`. Works for weights (`cols` = input width) and
/// biases (`cols` = 1).
pub fn unpermute_rows(w: &[f32], n_heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    let half = head_dim / 2;
    for h in 0..n_heads {
        for j in 0..half {
            for s in 0..2 {
                let src = (h * head_dim + 2 * j + s) * cols;
                let dst = (h * head_dim + s * half + j) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// [`TensorSource`] over a GGUF file.
pub struct GgufSource<'a> {
    file: &'a GgufFile,
    config: ModelConfig,
}

impl<'a> GgufSource<'a> {
    /// Wrap an open file whose config was read with [`config_from_gguf`].
    pub fn new(file: &'a GgufFile, config: ModelConfig) -> Self {
        GgufSource { file, config }
    }
}

impl TensorSource for GgufSource<'_> {
    fn get_f32(&mut self, name: &str) -> Result<Option<Vec<f32>>> {
        let gemma_name = match self.config.arch {
            Arch::Gemma3(_) => crate::gemma::gguf_tensor_name(name),
            _ => None,
        };
        let Some(gname) = gemma_name.or_else(|| gguf_tensor_name(name)) else {
            return Ok(None);
        };
        if self.file.tensor_info(&gname).is_err() {
            return Ok(None);
        }
        let v = self.file.tensor_f32(&gname)?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite(format!(
                "tensor `{gname}` element {i} is {}",
                v[i]
            )));
        }
        // Q/K rows of llama-arch GGUF files are permuted for interleaved RoPE.
        let c = &self.config;
        if c.arch.gguf_name() == "llama" {
            let cols = if name.ends_with(".bias") {
                1
            } else {
                c.hidden_size
            };
            if name.contains(".self_attn.q_proj.") {
                return Ok(Some(unpermute_rows(&v, c.n_heads, c.head_dim, cols)));
            }
            if name.contains(".self_attn.k_proj.") {
                return Ok(Some(unpermute_rows(&v, c.n_kv_heads, c.head_dim, cols)));
            }
        }
        Ok(Some(v))
    }
}

/// Load a model from an open GGUF file (all tensors dequantized to f32).
pub fn model_from_gguf(file: &GgufFile) -> Result<Model> {
    let config = config_from_gguf(file)?;
    let mut src = GgufSource::new(file, config.clone());
    build_model(config, &mut src)
}

/// Load a model from a GGUF file path.
pub fn load_gguf(path: &Path) -> Result<Model> {
    let file = GgufFile::open(path)?;
    model_from_gguf(&file)
}

/// [`TensorSource`] over a Hugging Face safetensors folder (f32/f16/bf16 tensors, HF names).
pub struct HfSource<'a> {
    folder: &'a crate::hf::SafetensorsFolder,
}

impl<'a> HfSource<'a> {
    /// Wrap an open folder.
    pub fn new(folder: &'a crate::hf::SafetensorsFolder) -> Self {
        HfSource { folder }
    }
}

impl TensorSource for HfSource<'_> {
    fn get_f32(&mut self, name: &str) -> Result<Option<Vec<f32>>> {
        if !self.folder.contains(name) {
            return Ok(None);
        }
        let (_, v) = self.folder.tensor_f32(name)?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite(format!(
                "tensor `{name}` element {i} is {}",
                v[i]
            )));
        }
        Ok(Some(v))
    }
}

/// Load a model from a Hugging Face folder (`config.json` + safetensors, single or sharded).
pub fn load_hf_folder(dir: &Path) -> Result<Model> {
    let config = ModelConfig::from_hf_file(&dir.join("config.json"))?;
    let folder = crate::hf::SafetensorsFolder::open(dir)?;
    let mut src = HfSource::new(&folder);
    if config.gemma3().is_some() {
        // HF Gemma stores `w` for a `1 + w` norm multiplier; the model holds `1 + w`.
        return build_model(config, &mut crate::gemma::PlusOneNorms::new(&mut src));
    }
    build_model(config, &mut src)
}

/// Load a model from a path: a GGUF file or a Hugging Face folder.
pub fn load_model(path: &Path) -> Result<Model> {
    Ok(load(&path.to_string_lossy(), false)?.0)
}

/// Resolve `spec` (a `.gguf` file, a Hugging Face folder, or a repo id in the HF cache; see
/// [`crate::resolve::resolve_model`]) and load the model, and its tokenizer when `tokenizer` is
/// true (from GGUF metadata, or the folder's `tokenizer.json`).
pub fn load(spec: &str, tokenizer: bool) -> Result<(Model, Option<crate::tokenizer::Tokenizer>)> {
    use crate::resolve::{resolve_model, ModelSource};
    match resolve_model(spec, None)? {
        ModelSource::Gguf(p) => {
            let file = GgufFile::open(&p)?;
            let model = model_from_gguf(&file)?;
            let tok = if tokenizer {
                Some(crate::tokenizer::Tokenizer::from_gguf(&file)?)
            } else {
                None
            };
            Ok((model, tok))
        }
        ModelSource::HfFolder(dir) => {
            // compressed-tensors folders (lowbit / llm-compressor output) keep their quantized
            // tensors; a lowbit folder made from a GGUF carries its tokenizer as a vocab-only GGUF.
            let model = if crate::quantize::checkpoint::is_compressed_tensors(&dir) {
                crate::quantize::load_ct_model(&dir)?
            } else {
                load_hf_folder(&dir)?
            };
            let gguf_tok = dir.join("lowbit-tokenizer.gguf");
            let tok = if !tokenizer {
                None
            } else if gguf_tok.is_file() && !dir.join("tokenizer.json").is_file() {
                Some(crate::tokenizer::Tokenizer::from_gguf(&GgufFile::open(
                    &gguf_tok,
                )?)?)
            } else {
                Some(crate::tokenizer::Tokenizer::from_hf_file(
                    &dir.join("tokenizer.json"),
                )?)
            };
            Ok((model, tok))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        assert_eq!(
            gguf_tensor_name("model.layers.3.mlp.down_proj.weight").unwrap(),
            "blk.3.ffn_down.weight"
        );
        assert_eq!(
            gguf_tensor_name("model.layers.0.self_attn.q_proj.bias").unwrap(),
            "blk.0.attn_q.bias"
        );
        assert_eq!(
            gguf_tensor_name("model.layers.0.input_layernorm.weight").unwrap(),
            "blk.0.attn_norm.weight"
        );
        assert!(gguf_tensor_name("model.layers.0.foo.weight").is_none());
    }

    /// Apply llama.cpp's permutation as its converter does
    /// (`reshape(n_head, 2, d/2, cols).swapaxes(1, 2)`) and check that we invert it.
    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        let (heads, d, cols) = (3, 8, 5);
        let hf: Vec<f32> = (0..heads * d * cols).map(|i| i as f32).collect();
        let mut gg = vec![0f32; hf.len()];
        for h in 0..heads {
            for s in 0..2 {
                for j in 0..d / 2 {
                    // hf index [h][s][j] goes to gguf index [h][j][s]
                    let src = (h * d + s * d / 2 + j) * cols;
                    let dst = (h * d + j * 2 + s) * cols;
                    gg[dst..dst + cols].copy_from_slice(&hf[src..src + cols]);
                }
            }
        }
        assert_ne!(gg, hf);
        assert_eq!(unpermute_rows(&gg, heads, d, cols), hf);
    }
}
