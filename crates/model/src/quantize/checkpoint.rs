//! A quantized [`Model`] <-> a compressed-tensors [`Checkpoint`].

use crate::config::{Arch, ModelConfig, RopeScaling};
use crate::ct::{self, ActivationQuant, Checkpoint};
use crate::error::{Error, Result};
use crate::linear::Linear;
use crate::llama::{Layer, Model};
use crate::weights::{build_model, TensorSource};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

/// The Hugging Face `config.json` fields of a model config (what `ModelConfig::from_hf_json`
/// reads back).
pub fn hf_config_json(c: &ModelConfig) -> Result<Value> {
    let arch = match c.arch {
        Arch::Llama => ("LlamaForCausalLM", "llama"),
        Arch::Mistral => ("MistralForCausalLM", "mistral"),
        Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        #[allow(unreachable_patterns)]
        _ => {
            return Err(Error::Config(
                "architecture has no Hugging Face name".into(),
            ))
        }
    };
    let rope_scaling = match &c.rope_scaling {
        RopeScaling::None => Value::Null,
        RopeScaling::Linear { factor } => json!({ "rope_type": "linear", "factor": factor }),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            })
        }
        other => {
            return Err(Error::Config(format!(
                "RoPE scaling {other:?} has no Hugging Face config.json form"
            )))
        }
    };
    Ok(json!({
        "architectures": [arch.0],
        "model_type": arch.1,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "rope_theta": c.rope_theta,
        "rope_scaling": rope_scaling,
        "rms_norm_eps": c.rms_eps as f64,
        "max_position_embeddings": c.max_ctx,
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": c.qkv_bias,
        "hidden_act": "silu",
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "torch_dtype": "float32",
    }))
}

/// Options of [`model_to_checkpoint`].
#[derive(Debug, Clone, Default)]
pub struct ModelToCheckpoint {
    /// W8A8: per-token dynamic activation quantization of every quantized linear.
    pub input_activations: Option<ActivationQuant>,
    /// Extra files (tokenizer, report, recipe).
    pub extra_files: Vec<(String, Vec<u8>)>,
}

/// Collect a model's tensors: quantized linears as [`lowbit_numerics::QuantizedTensor`]s,
/// everything else dense f32 under its Hugging Face name.
pub fn model_to_checkpoint(model: &Model, opts: &ModelToCheckpoint) -> Result<Checkpoint> {
    let c = &model.config;
    let mut ck = Checkpoint {
        hf_config: hf_config_json(c)?,
        input_activations: opts.input_activations,
        extra_files: opts.extra_files.clone(),
        ..Default::default()
    };
    ck.dense.push((
        "model.embed_tokens.weight".into(),
        vec![c.vocab_size, c.hidden_size],
        model.embed.clone(),
    ));
    ck.dense.push((
        "model.norm.weight".into(),
        vec![c.hidden_size],
        model.norm.clone(),
    ));
    for (i, l) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        ck.dense.push((
            format!("{p}.input_layernorm.weight"),
            vec![c.hidden_size],
            l.attn_norm.clone(),
        ));
        ck.dense.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![c.hidden_size],
            l.mlp_norm.clone(),
        ));
    }
    for name in model.linear_names() {
        let lin = model.linear(&name).expect("listed");
        match lin.quantized() {
            Some(q) => ck.quantized.push((name.clone(), q.clone())),
            None => {
                ck.dense.push((
                    format!("{name}.weight"),
                    vec![lin.out, lin.inp],
                    lin.weight_f32().to_vec(),
                ));
                ck.ignore.push(name.clone());
            }
        }
        if let Some(b) = &lin.bias {
            ck.dense
                .push((format!("{name}.bias"), vec![b.len()], b.clone()));
        }
    }
    if c.tie_embeddings && !ck.ignore.iter().any(|n| n == "lm_head") {
        ck.ignore.push("lm_head".into());
    }
    Ok(ck)
}

struct CtSource {
    dense: HashMap<String, Vec<f32>>,
    quantized: HashMap<String, lowbit_numerics::QuantizedTensor>,
    act: Option<ActivationQuant>,
}

impl TensorSource for CtSource {
    fn get_f32(&mut self, name: &str) -> Result<Option<Vec<f32>>> {
        Ok(self.dense.remove(name))
    }

    fn get_linear(&mut self, name: &str, out: usize, inp: usize) -> Result<Option<Linear>> {
        let mut lin = match self.quantized.remove(name) {
            Some(q) => {
                if (q.rows, q.cols) != (out, inp) {
                    return Err(Error::Shape(format!(
                        "{name}: quantized weight is {}x{}, expected {out}x{inp}",
                        q.rows, q.cols
                    )));
                }
                let mut l = Linear::quantized_with(q, |q| Ok(q.dequantize()?))?;
                if let Some(a) = self.act {
                    l.act_quant = Some(super::act_quant_fn(a));
                }
                l
            }
            None => match self.dense.remove(&format!("{name}.weight")) {
                Some(w) => {
                    Linear::dense(w, out, inp).map_err(|e| Error::Shape(format!("{name}: {e}")))?
                }
                None => return Ok(None),
            },
        };
        if let Some(b) = self.dense.remove(&format!("{name}.bias")) {
            lin = lin.with_bias(b)?;
        }
        Ok(Some(lin))
    }
}

/// Whether `dir` holds a compressed-tensors checkpoint (a `quantization_config` with
/// `quant_method = compressed-tensors`, or lowbit's sidecar).
pub fn is_compressed_tensors(dir: &Path) -> bool {
    if dir.join(crate::ct::config::SCHEMES_FILE).is_file() {
        return true;
    }
    crate::ct::read_config(dir).is_ok_and(|c| {
        c.get("quantization_config")
            .and_then(|q| q.get("quant_method"))
            .and_then(Value::as_str)
            == Some("compressed-tensors")
    })
}

/// Load a compressed-tensors folder (written by lowbit or llm-compressor) as a [`Model`] whose
/// linears keep their quantized tensors; W8A8 checkpoints get the per-token activation
/// quantizer on every quantized linear. A rotated / W4A4 checkpoint's sidecar
/// (`lowbit-rotation.json`, see `docs/rotations.md`) installs its online Hadamard and
/// activation quantizers.
pub fn load_ct_model(dir: &Path) -> Result<Model> {
    let ck = ct::read_checkpoint(dir)?;
    let mut model = checkpoint_to_model(ck)?;
    crate::rotate::install_from_dir(&mut model, dir)?;
    Ok(model)
}

/// Build a [`Model`] from an in-memory checkpoint.
pub fn checkpoint_to_model(ck: Checkpoint) -> Result<Model> {
    let config = ModelConfig::from_hf_json(&ck.hf_config.to_string())?;
    let mut src = CtSource {
        dense: ck.dense.into_iter().map(|(n, _, v)| (n, v)).collect(),
        quantized: ck.quantized.into_iter().collect(),
        act: ck.input_activations,
    };
    build_model(config, &mut src)
}

/// A [`super::pipeline::LayerSink`] that writes the compressed-tensors folder while
/// [`super::quantize_streaming`] runs: the embedding goes to a shard of its own as soon as the
/// calibration windows are embedded, each quantized layer is encoded and dropped, and a shard is
/// closed whenever `flush_bytes` of tensors are waiting. [`Self::finish`] writes the rest.
/// The folder holds the same tensors and `config.json` as [`model_to_checkpoint`] +
/// [`ct::write_checkpoint`] of the in-memory pipeline's model.
#[derive(Debug)]
pub struct CheckpointSink {
    writer: ct::StreamingWriter,
    ignore: Vec<String>,
    flush_bytes: usize,
    input_activations: Option<ActivationQuant>,
}

impl CheckpointSink {
    /// Write through `writer`, closing a shard once `flush_bytes` are waiting; `input_activations`
    /// as in [`ModelToCheckpoint`].
    pub fn new(
        writer: ct::StreamingWriter,
        flush_bytes: usize,
        input_activations: Option<ActivationQuant>,
    ) -> Self {
        CheckpointSink {
            writer,
            ignore: Vec::new(),
            flush_bytes: flush_bytes.max(1),
            input_activations,
        }
    }

    /// Shards written so far.
    pub fn shards_written(&self) -> usize {
        self.writer.shards_written()
    }

    fn add_linear(&mut self, name: &str, lin: &Linear) -> Result<()> {
        match lin.quantized() {
            Some(q) => self.writer.add_quantized(name, q)?,
            None => {
                self.writer.add_dense(
                    &format!("{name}.weight"),
                    vec![lin.out, lin.inp],
                    lin.weight_f32().to_vec(),
                )?;
                self.ignore.push(name.to_string());
            }
        }
        if let Some(b) = &lin.bias {
            self.writer
                .add_dense(&format!("{name}.bias"), vec![b.len()], b.clone())?;
        }
        Ok(())
    }

    /// Write the last shard, `config.json` (from `config`), the sidecar and `extra_files`, and
    /// move the folder into place.
    pub fn finish(mut self, config: &ModelConfig, extra_files: &[(String, Vec<u8>)]) -> Result<()> {
        if config.tie_embeddings && !self.ignore.iter().any(|n| n == "lm_head") {
            self.ignore.push("lm_head".into());
        }
        self.writer.finish(
            &hf_config_json(config)?,
            &self.ignore,
            self.input_activations,
            extra_files,
        )
    }
}

impl super::pipeline::LayerSink for CheckpointSink {
    fn embedding(&mut self, c: &ModelConfig, embed: Vec<f32>) -> Result<()> {
        self.writer.add_dense(
            "model.embed_tokens.weight",
            vec![c.vocab_size, c.hidden_size],
            embed,
        )?;
        self.writer.flush()
    }

    fn layer(&mut self, c: &ModelConfig, li: usize, layer: Layer) -> Result<()> {
        let p = format!("model.layers.{li}");
        for name in crate::llama::LAYER_LINEARS {
            let lin = layer.linear(name).expect("layer linear");
            self.add_linear(&format!("{p}.{name}"), lin)?;
        }
        let Layer {
            attn_norm,
            mlp_norm,
            ..
        } = layer;
        let h = c.hidden_size;
        self.writer
            .add_dense(&format!("{p}.input_layernorm.weight"), vec![h], attn_norm)?;
        self.writer.add_dense(
            &format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            mlp_norm,
        )?;
        if self.writer.pending_bytes() >= self.flush_bytes {
            self.writer.flush()?;
        }
        Ok(())
    }

    fn head(
        &mut self,
        c: &ModelConfig,
        norm: Vec<f32>,
        lm_head: Option<super::pipeline::DenseHead>,
    ) -> Result<()> {
        self.writer
            .add_dense("model.norm.weight", vec![c.hidden_size], norm)?;
        if let Some((w, b)) = lm_head {
            self.writer
                .add_dense("lm_head.weight", vec![c.vocab_size, c.hidden_size], w)?;
            self.ignore.push("lm_head".into());
            if let Some(b) = b {
                self.writer.add_dense("lm_head.bias", vec![b.len()], b)?;
            }
        }
        Ok(())
    }
}
