//! Building a [`Model`] from named tensors, whatever file they come from.
//!
//! Every loader implements [`TensorSource`], answering Hugging Face tensor names
//! (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`, ...
//! `model.norm.weight`, `lm_head.weight`) with f32 values in HF layout (`[out][in]`, Q/K rows in
//! HF head order). [`build_model`] does the rest. [`random_model`] makes small deterministic
//! models for tests.

use crate::config::ModelConfig;
use crate::linear::Linear;
use crate::llama::{Layer, Model, LAYER_LINEARS};
use crate::{Error, Result};

/// Somewhere tensors can be read from by their Hugging Face names.
pub trait TensorSource {
    /// The tensor called `name` as f32 (row-major, HF layout), or `None` when absent.
    fn get_f32(&mut self, name: &str) -> Result<Option<Vec<f32>>>;

    /// The linear layer whose weight is `{name}.weight` (and optional `{name}.bias`), shaped
    /// `out x inp`, or `None` when absent. The default reads dense f32; a loader of quantized
    /// checkpoints overrides this to return quantized layers.
    fn get_linear(&mut self, name: &str, out: usize, inp: usize) -> Result<Option<Linear>> {
        let Some(w) = self.get_f32(&format!("{name}.weight"))? else {
            return Ok(None);
        };
        let l = Linear::dense(w, out, inp).map_err(|e| Error::Shape(format!("{name}: {e}")))?;
        match self.get_f32(&format!("{name}.bias"))? {
            Some(b) => Ok(Some(l.with_bias(b)?)),
            None => Ok(Some(l)),
        }
    }
}

fn require<T>(v: Option<T>, name: &str) -> Result<T> {
    v.ok_or_else(|| Error::MissingTensor(name.to_string()))
}

/// Read every tensor the config calls for from `src` and assemble the model.
pub fn build_model(config: ModelConfig, src: &mut dyn TensorSource) -> Result<Model> {
    config.validate()?;
    let c = &config;
    let h = c.hidden_size;
    let embed = require(
        src.get_f32("model.embed_tokens.weight")?,
        "model.embed_tokens.weight",
    )?;
    let mut layers = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        layers.push(build_layer(c, src, i)?);
    }
    let norm = require(src.get_f32("model.norm.weight")?, "model.norm.weight")?;
    let lm_head = if c.tie_embeddings {
        None
    } else {
        Some(require(
            src.get_linear("lm_head", c.vocab_size, h)?,
            "lm_head.weight",
        )?)
    };
    let gemma = match config.gemma3() {
        Some(_) => Some(crate::gemma::load_layers(&config, src)?),
        None => None,
    };
    let mut model = Model::new(config, embed, layers, norm, lm_head)?;
    if let Some(g) = gemma {
        model.set_gemma_layers(g)?;
    }
    // Decode streams every dense weight once per token: one huge-page arena in reading order
    // (a speed layout; values unchanged). Without an arena the layers keep their `Vec`s.
    let _ = model.pack_dense_weights();
    Ok(model)
}

/// Read decoder layer `i` (its two norms and seven linears) from `src`. Only this layer's
/// tensors are requested, so a lazy source (a memory-mapped GGUF or safetensors file)
/// dequantizes one layer at a time: what the streaming quantization pipeline relies on.
pub fn build_layer(config: &ModelConfig, src: &mut dyn TensorSource, i: usize) -> Result<Layer> {
    let c = config;
    let h = c.hidden_size;
    if i >= c.n_layers {
        return Err(Error::Shape(format!(
            "layer {i} requested, the model has {}",
            c.n_layers
        )));
    }
    let shapes = [
        (c.q_dim(), h),
        (c.kv_dim(), h),
        (c.kv_dim(), h),
        (h, c.q_dim()),
        (c.intermediate_size, h),
        (c.intermediate_size, h),
        (h, c.intermediate_size),
    ];
    let p = format!("model.layers.{i}");
    let mut lin = Vec::with_capacity(7);
    for (n, (o, k)) in LAYER_LINEARS.iter().zip(shapes) {
        let name = format!("{p}.{n}");
        lin.push(require(
            src.get_linear(&name, o, k)?,
            &format!("{name}.weight"),
        )?);
    }
    let mut it = lin.into_iter();
    let mut next = || it.next().expect("seven linears");
    let attn_norm_name = format!("{p}.input_layernorm.weight");
    let mlp_norm_name = match c.gemma3() {
        Some(_) => format!("{p}.{}.weight", crate::gemma::GEMMA_MLP_NORM),
        None => format!("{p}.post_attention_layernorm.weight"),
    };
    let attn_norm = require(src.get_f32(&attn_norm_name)?, &attn_norm_name)?;
    let mlp_norm = require(src.get_f32(&mlp_norm_name)?, &mlp_norm_name)?;
    for (what, v) in [(&attn_norm_name, &attn_norm), (&mlp_norm_name, &mlp_norm)] {
        if v.len() != h {
            return Err(Error::Shape(format!(
                "{what} has {} values, expected {h}",
                v.len()
            )));
        }
    }
    Ok(Layer {
        attn_norm,
        q_proj: next(),
        k_proj: next(),
        v_proj: next(),
        o_proj: next(),
        mlp_norm,
        gate_proj: next(),
        up_proj: next(),
        down_proj: next(),
    })
}

/// A deterministic random model of shape `config` (weights ~ U(-a, a) with `a = 1/sqrt(in)`,
/// norms around 1, biases when the config has them): a fixture for tests that need no files.
pub fn random_model(config: ModelConfig, seed: u64) -> Result<Model> {
    struct Rand {
        s: u64,
        c: ModelConfig,
    }
    impl Rand {
        fn uni(&mut self, n: usize, a: f32, center: f32) -> Vec<f32> {
            (0..n)
                .map(|_| {
                    self.s = self
                        .s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let u = ((self.s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                    center + a * u
                })
                .collect()
        }
    }
    impl TensorSource for Rand {
        fn get_f32(&mut self, name: &str) -> Result<Option<Vec<f32>>> {
            let (h, f, v) = (
                self.c.hidden_size,
                self.c.intermediate_size,
                self.c.vocab_size,
            );
            let (q, kv) = (self.c.q_dim(), self.c.kv_dim());
            let mat = |o: usize, i: usize| (o * i, 1.0 / (i as f32).sqrt());
            let (n, a, center) = if name.ends_with("norm.weight") {
                (h, 0.2, 1.0)
            } else if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
                (v * h, 1.0, 0.0)
            } else if name.ends_with(".bias") {
                let qkv = ["q_proj", "k_proj", "v_proj"]
                    .iter()
                    .any(|p| name.contains(p));
                if !self.c.qkv_bias || !qkv {
                    return Ok(None);
                }
                (if name.contains("q_proj") { q } else { kv }, 0.5, 0.0)
            } else {
                let (n, a) = match name.rsplit('.').nth(1) {
                    Some("q_proj") => mat(q, h),
                    Some("k_proj") | Some("v_proj") => mat(kv, h),
                    Some("o_proj") => mat(h, q),
                    Some("gate_proj") | Some("up_proj") => mat(f, h),
                    Some("down_proj") => mat(h, f),
                    _ => return Ok(None),
                };
                (n, a, 0.0)
            };
            Ok(Some(self.uni(n, a, center)))
        }
    }
    let mut src = Rand {
        s: seed,
        c: config.clone(),
    };
    build_model(config, &mut src)
}
