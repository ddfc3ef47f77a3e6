//! The Llama-family forward pass (Llama 1/2/3, Mistral, Qwen2, SmolLM, Gemma-3) in plain f32
//! slices. Gemma-3's extra norms, GeGLU, embedding scale and sliding-window layers are switched
//! on by its config (see [`crate::gemma`]).
//!
//! One decoder layer, pre-norm:
//! ```text
//! h += o_proj(attention(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)))   n1 = rmsnorm(h)
//! h += down_proj(silu(gate_proj(n2)) * up_proj(n2))                        n2 = rmsnorm(h)
//! ```
//! Activations are token-major (`[n_tokens][width]`). The same code runs a whole prompt
//! (batched prefill: every linear is one GEMM over all tokens) and single-token decode; the
//! position of a chunk's first token is the number of tokens the KV cache already holds for that
//! layer. Attention itself is computed by the [`KvCache`] (append, then attend).
//!
//! Linear layers are addressed by their Hugging Face names (`model.layers.{i}.self_attn.q_proj`,
//! ..., `model.layers.{i}.mlp.down_proj`, `lm_head`), see [`Model::linear_mut`].

use crate::config::ModelConfig;
use crate::gemma::GemmaLayer;
use crate::linear::Linear;
use crate::rope::Rope;
use crate::{Error, Result};
use lowbit_kernels::math::exp_f32;
use lowbit_kv_cache::KvCache;
use rayon::prelude::*;

/// Names of the seven linear layers of a decoder layer, relative to `model.layers.{i}.`.
pub const LAYER_LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// A callback that receives the input rows of a linear layer: `(canonical name, rows
/// [n_tokens][in], n_tokens)`. q/k/v (and gate/up) share one input and are reported once each.
pub type Capture<'a> = &'a mut dyn FnMut(&str, &[f32], usize);

/// One decoder layer.
#[derive(Debug)]
pub struct Layer {
    /// RMSNorm weight before attention (`input_layernorm`).
    pub attn_norm: Vec<f32>,
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Attention output projection.
    pub o_proj: Linear,
    /// RMSNorm weight before the MLP (`post_attention_layernorm`).
    pub mlp_norm: Vec<f32>,
    /// SwiGLU gate.
    pub gate_proj: Linear,
    /// SwiGLU up.
    pub up_proj: Linear,
    /// SwiGLU down.
    pub down_proj: Linear,
}

impl Layer {
    /// The linear layer called `name` (one of [`LAYER_LINEARS`]).
    pub fn linear(&self, name: &str) -> Option<&Linear> {
        Some(match name {
            "self_attn.q_proj" => &self.q_proj,
            "self_attn.k_proj" => &self.k_proj,
            "self_attn.v_proj" => &self.v_proj,
            "self_attn.o_proj" => &self.o_proj,
            "mlp.gate_proj" => &self.gate_proj,
            "mlp.up_proj" => &self.up_proj,
            "mlp.down_proj" => &self.down_proj,
            _ => return None,
        })
    }

    /// Mutable access to the linear layer called `name` (one of [`LAYER_LINEARS`]).
    pub fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        Some(match name {
            "self_attn.q_proj" => &mut self.q_proj,
            "self_attn.k_proj" => &mut self.k_proj,
            "self_attn.v_proj" => &mut self.v_proj,
            "self_attn.o_proj" => &mut self.o_proj,
            "mlp.gate_proj" => &mut self.gate_proj,
            "mlp.up_proj" => &mut self.up_proj,
            "mlp.down_proj" => &mut self.down_proj,
            _ => return None,
        })
    }
}

/// A loaded model: config, embedding, decoder layers, final norm, LM head.
#[derive(Debug)]
pub struct Model {
    /// The shape.
    pub config: ModelConfig,
    /// Token embedding `[vocab][hidden]`.
    pub embed: Vec<f32>,
    /// Decoder layers.
    pub layers: Vec<Layer>,
    /// Final RMSNorm weight.
    pub norm: Vec<f32>,
    /// The LM head; `None` when tied to the embedding.
    pub lm_head: Option<Linear>,
    /// Gemma-3's extra norms, one entry per layer (empty for other architectures); set with
    /// [`Model::set_gemma_layers`].
    pub gemma: Vec<GemmaLayer>,
    rope: Rope,
    /// RoPE of Gemma-3's local (sliding-window) layers.
    rope_local: Option<Rope>,
}

/// The activations of one decoder layer (`[n_tokens][width]` each), kept across layers.
#[derive(Default)]
struct LayerBufs {
    x: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
}

/// Which positions [`Model::forward`] returns logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every input token: `[n_tokens][vocab]`.
    All,
    /// Only the last input token: `[vocab]`.
    Last,
}

/// RMSNorm of each `w.len()`-wide row of `x` into `out`: `out = x / sqrt(mean(x²) + eps) * w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let inv = (1.0 / (sum_sq_f64(xr) / d as f64 + eps as f64).sqrt()) as f32;
        for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
            *o = g * (v * inv);
        }
    }
}

/// `Σ x²` in f64, in four interleaved partial sums (so the loop is not one long chain of
/// dependent additions); the order differs from a left-to-right sum only in f64 rounding.
#[inline]
fn sum_sq_f64(x: &[f32]) -> f64 {
    let mut acc = [0f64; 4];
    let mut it = x.chunks_exact(4);
    for c in &mut it {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += (*v as f64) * (*v as f64);
        }
    }
    for (a, v) in acc.iter_mut().zip(it.remainder()) {
        *a += (*v as f64) * (*v as f64);
    }
    (acc[0] + acc[2]) + (acc[1] + acc[3])
}

/// Token rows per task of the element-wise glue (norms, residuals, SwiGLU, RoPE) in a long
/// chunk; chunks of fewer than two such tasks (decode) stay on the calling thread.
const GLUE_ROWS: usize = 16;

/// Whether the glue over `n_tokens` rows is worth splitting across the rayon pool.
fn glue_parallel(n_tokens: usize) -> bool {
    n_tokens >= 2 * GLUE_ROWS && rayon::current_num_threads() > 1
}

/// Run `f(row0, a_rows, b_rows)` over matching blocks of [`GLUE_ROWS`] token rows of `a`
/// (`wa` values a row) and `b` (`wb` a row), in parallel for long chunks. Each row is computed
/// by the same code either way, so the result does not depend on the split.
fn for_row_blocks<F>(a: &mut [f32], wa: usize, b: &mut [f32], wb: usize, n_tokens: usize, f: F)
where
    F: Fn(usize, &mut [f32], &mut [f32]) + Sync,
{
    if glue_parallel(n_tokens) {
        a.par_chunks_mut(GLUE_ROWS * wa)
            .zip(b.par_chunks_mut(GLUE_ROWS * wb))
            .enumerate()
            .for_each(|(i, (a, b))| f(i * GLUE_ROWS, a, b));
    } else {
        f(0, a, b);
    }
}

/// `hidden += delta`, then `out = rms_norm(hidden)` (rows of `w.len()`), in one pass over
/// row blocks.
fn add_and_norm(hidden: &mut [f32], delta: &mut [f32], w: &[f32], eps: f32, n_tokens: usize) {
    let d = w.len();
    for_row_blocks(hidden, d, delta, d, n_tokens, |_, h, x| {
        h.iter_mut().zip(x.iter()).for_each(|(a, b)| *a += b);
        rms_norm(h, w, eps, x);
    });
}

/// `silu(x) = x * sigmoid(x)`, as `x / (1 + exp(-x))` with the branch-free [`exp_f32`] (so a
/// loop over it vectorizes).
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp_f32(-x))
}

impl Model {
    /// Assemble a model, checking every tensor's shape against `config`.
    pub fn new(
        config: ModelConfig,
        embed: Vec<f32>,
        layers: Vec<Layer>,
        norm: Vec<f32>,
        lm_head: Option<Linear>,
    ) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let (h, f) = (c.hidden_size, c.intermediate_size);
        let shape_err = |what: String| Err(Error::Shape(what));
        if embed.len() != c.vocab_size * h {
            return shape_err(format!(
                "embedding has {} values, expected {} x {h}",
                embed.len(),
                c.vocab_size
            ));
        }
        if norm.len() != h {
            return shape_err(format!(
                "final norm has {} values, expected {h}",
                norm.len()
            ));
        }
        if layers.len() != c.n_layers {
            return shape_err(format!(
                "{} layers, config says {}",
                layers.len(),
                c.n_layers
            ));
        }
        if let Some(l) = &lm_head {
            if (l.out, l.inp) != (c.vocab_size, h) {
                return shape_err(format!(
                    "lm_head is {}x{}, expected {}x{h}",
                    l.out, l.inp, c.vocab_size
                ));
            }
        } else if !c.tie_embeddings {
            return shape_err("no lm_head and the embeddings are not tied".into());
        }
        let want = [
            (c.q_dim(), h),
            (c.kv_dim(), h),
            (c.kv_dim(), h),
            (h, c.q_dim()),
            (f, h),
            (f, h),
            (h, f),
        ];
        for (i, layer) in layers.iter().enumerate() {
            if layer.attn_norm.len() != h || layer.mlp_norm.len() != h {
                return shape_err(format!("layer {i}: norm weights must have {h} values"));
            }
            for (name, (o, n)) in LAYER_LINEARS.iter().zip(want) {
                let l = layer.linear(name).expect("known name");
                if (l.out, l.inp) != (o, n) {
                    return shape_err(format!(
                        "model.layers.{i}.{name} is {}x{}, expected {o}x{n}",
                        l.out, l.inp
                    ));
                }
            }
        }
        // The (tied) head streams the embedding once per decoded token: huge pages (a hint,
        // advised before the copy is written; see `arena::huge_page_vec`).
        let embed = crate::arena::huge_page_vec(embed);
        let rope = Rope::new(&config);
        let rope_local = config.gemma3().map(|g| {
            let mut local = config.clone();
            local.rope_theta = g.rope_local_theta;
            local.rope_scaling = crate::config::RopeScaling::None;
            Rope::new(&local)
        });
        Ok(Model {
            config,
            embed,
            layers,
            norm,
            lm_head,
            gemma: Vec::new(),
            rope,
            rope_local,
        })
    }

    /// Attach Gemma-3's extra norms (one [`GemmaLayer`] per layer; Gemma-3 configs only).
    pub fn set_gemma_layers(&mut self, layers: Vec<GemmaLayer>) -> Result<()> {
        if self.config.gemma3().is_none() {
            return Err(Error::Config(format!(
                "{:?} has no Gemma-3 layer norms",
                self.config.arch
            )));
        }
        if layers.len() != self.config.n_layers {
            return Err(Error::Shape(format!(
                "{} Gemma layers, config says {}",
                layers.len(),
                self.config.n_layers
            )));
        }
        for (i, l) in layers.iter().enumerate() {
            l.validate(&self.config, i)?;
        }
        self.gemma = layers;
        Ok(())
    }

    /// Canonical (HF) names of every linear layer, layer by layer, `lm_head` last if untied.
    pub fn linear_names(&self) -> Vec<String> {
        let mut v: Vec<String> = (0..self.layers.len())
            .flat_map(|i| {
                LAYER_LINEARS
                    .iter()
                    .map(move |n| format!("model.layers.{i}.{n}"))
            })
            .collect();
        if self.lm_head.is_some() {
            v.push("lm_head".into());
        }
        v
    }

    fn split_name(name: &str) -> Option<(usize, &str)> {
        let rest = name.strip_prefix("model.layers.")?;
        let (i, n) = rest.split_once('.')?;
        Some((i.parse().ok()?, n))
    }

    /// The linear layer with canonical name `name` (e.g. `model.layers.3.mlp.up_proj`).
    pub fn linear(&self, name: &str) -> Option<&Linear> {
        if name == "lm_head" {
            return self.lm_head.as_ref();
        }
        let (i, n) = Self::split_name(name)?;
        self.layers.get(i)?.linear(n)
    }

    /// Mutable access by canonical name: swap a weight dense <-> quantized, set an input
    /// quantizer, without touching the forward code.
    pub fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        if name == "lm_head" {
            return self.lm_head.as_mut();
        }
        let (i, n) = Self::split_name(name)?;
        self.layers.get_mut(i)?.linear_mut(n)
    }

    /// A fresh KV cache for this model from a policy string (`f32`, ... see `lowbit-kv-cache`).
    /// The cache gets the model's RoPE frequencies (used by policies that quantize keys before
    /// RoPE, `rope=pre`).
    pub fn new_cache(&self, policy: &str) -> Result<Box<dyn KvCache>> {
        // One table of frequencies per cache: Gemma-3's local and global layers differ.
        if self.rope_local.is_some() && policy.contains("rope=pre") {
            return Err(Error::Config(
                "KV policies with rope=pre are not supported for gemma3 (two RoPE bases)".into(),
            ));
        }
        let mut c = lowbit_kv_cache::build(policy, self.config.kv_shape())?;
        c.set_rope(&crate::rope::inv_freqs(&self.config))?;
        Ok(c)
    }

    /// Embedding rows of `tokens`: `[n_tokens][hidden]` (Gemma-3: times `sqrt(hidden)`).
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let h = self.config.hidden_size;
        let mut out = Vec::with_capacity(tokens.len() * h);
        for &t in tokens {
            let t = t as usize;
            if t >= self.config.vocab_size {
                return Err(Error::Shape(format!(
                    "token id {t} out of range (vocabulary {})",
                    self.config.vocab_size
                )));
            }
            out.extend_from_slice(&self.embed[t * h..][..h]);
        }
        if self.config.gemma3().is_some() {
            // HF: `embed_tokens(ids) * hidden_size**0.5`, the scale rounded to the dtype (f32).
            let s = (h as f64).sqrt() as f32;
            out.iter_mut().for_each(|x| *x *= s);
        }
        Ok(out)
    }

    /// Run decoder layer `i` on `hidden` (`[n_tokens][hidden]`, updated in place). The chunk's
    /// positions start at `cache.len(i)`; its keys/values are appended to the cache.
    pub fn layer_forward(
        &self,
        i: usize,
        hidden: &mut [f32],
        n_tokens: usize,
        cache: &mut dyn KvCache,
    ) -> Result<()> {
        self.layer_forward_with_capture(i, hidden, n_tokens, cache, None)
    }

    /// [`Self::layer_forward`], reporting every linear layer's input to `capture`.
    pub fn layer_forward_with_capture(
        &self,
        i: usize,
        hidden: &mut [f32],
        n_tokens: usize,
        cache: &mut dyn KvCache,
        capture: Option<Capture<'_>>,
    ) -> Result<()> {
        let mut bufs = LayerBufs::default();
        self.layer_forward_bufs(i, hidden, n_tokens, cache, capture, &mut bufs)
    }

    /// The decoder layer, with its activations in `bufs` (reused from layer to layer by
    /// [`Self::forward`], so that a long chunk does not map and zero fresh pages per layer).
    fn layer_forward_bufs(
        &self,
        i: usize,
        hidden: &mut [f32],
        n_tokens: usize,
        cache: &mut dyn KvCache,
        mut capture: Option<Capture<'_>>,
        bufs: &mut LayerBufs,
    ) -> Result<()> {
        let c = &self.config;
        let layer = self
            .layers
            .get(i)
            .ok_or_else(|| Error::Shape(format!("layer {i} of {}", self.layers.len())))?;
        let h = c.hidden_size;
        if hidden.len() != n_tokens * h {
            return Err(Error::Shape(format!(
                "hidden has {} values, expected {n_tokens} x {h}",
                hidden.len()
            )));
        }
        let n = n_tokens;
        let gemma = match c.gemma3() {
            None => None,
            Some(_) => Some(self.gemma.get(i).ok_or_else(|| {
                Error::Shape(format!("gemma3 layer {i} has no q/k/post norms loaded"))
            })?),
        };
        let mut report = |name: &str, x: &[f32]| {
            if let Some(cb) = capture.as_deref_mut() {
                cb(&format!("model.layers.{i}.{name}"), x, n);
            }
        };
        let f = c.intermediate_size;
        let LayerBufs {
            x,
            q,
            k,
            v,
            att,
            g,
            u,
        } = bufs;
        // Every buffer is overwritten whole before it is read (linears and attention write
        // all of their outputs), so stale values from the previous layer never leak.
        for (b, len) in [
            (&mut *x, n * h),
            (&mut *q, n * c.q_dim()),
            (&mut *k, n * c.kv_dim()),
            (&mut *v, n * c.kv_dim()),
            (&mut *att, n * c.q_dim()),
            (&mut *g, n * f),
            (&mut *u, n * f),
        ] {
            b.resize(len, 0.0);
        }
        let (x, q, k, v, att, g, u) = (
            &mut x[..n * h],
            &mut q[..n * c.q_dim()],
            &mut k[..n * c.kv_dim()],
            &mut v[..n * c.kv_dim()],
            &mut att[..n * c.q_dim()],
            &mut g[..n * f],
            &mut u[..n * f],
        );

        // Attention block.
        {
            let w = &layer.attn_norm;
            for_row_blocks(hidden, h, x, h, n, |_, hr, xr| {
                rms_norm(hr, w, c.rms_eps, xr)
            });
        }
        report("self_attn.q_proj", x);
        report("self_attn.k_proj", x);
        report("self_attn.v_proj", x);
        layer.q_proj.forward(x, n, q)?;
        layer.k_proj.forward(x, n, k)?;
        layer.v_proj.forward(x, n, v)?;
        if let Some(g) = gemma {
            // Per-head RMSNorm of queries and keys, before RoPE.
            let (qs, ks) = (q.to_vec(), k.to_vec());
            rms_norm(&qs, &g.q_norm, c.rms_eps, q);
            rms_norm(&ks, &g.k_norm, c.rms_eps, k);
        }
        let pos0 = cache.len(i);
        let window = c.sliding_window(i);
        let rope = match (&self.rope_local, window) {
            (Some(local), Some(_)) => local,
            _ => &self.rope,
        };
        let (qd, kd) = (c.q_dim(), c.kv_dim());
        for_row_blocks(q, qd, k, kd, n, |t0, qr, kr| {
            let nt = qr.len() / qd;
            rope.apply(qr, nt, c.n_heads, pos0 + t0);
            rope.apply(kr, nt, c.n_kv_heads, pos0 + t0);
        });
        cache.append(i, k, v, n)?;
        let scale = c.attn_scale();
        match window {
            None => cache.attend(i, q, n, c.n_heads, scale, att)?,
            Some(w) => cache.attend_window(i, q, n, c.n_heads, scale, w, att)?,
        }
        report("self_attn.o_proj", att);
        layer.o_proj.forward(att, n, x)?;
        if let Some(g) = gemma {
            let o = x.to_vec();
            rms_norm(&o, &g.post_attn_norm, c.rms_eps, x);
        }

        // MLP block: hidden += attention output; x = rmsnorm(hidden).
        add_and_norm(hidden, x, &layer.mlp_norm, c.rms_eps, n);
        report("mlp.gate_proj", x);
        report("mlp.up_proj", x);
        layer.gate_proj.forward(x, n, g)?;
        layer.up_proj.forward(x, n, u)?;
        let gelu = gemma.is_some();
        for_row_blocks(g, f, u, f, n, |_, gr, ur| {
            if gelu {
                gr.iter_mut()
                    .zip(ur.iter())
                    .for_each(|(g, u)| *g = crate::gemma::gelu_tanh(*g) * u);
            } else {
                gr.iter_mut()
                    .zip(ur.iter())
                    .for_each(|(g, u)| *g = silu(*g) * u);
            }
        });
        report("mlp.down_proj", g);
        layer.down_proj.forward(g, n, x)?;
        if let Some(gl) = gemma {
            let o = x.to_vec();
            rms_norm(&o, &gl.post_ffw_norm, c.rms_eps, x);
        }
        for_row_blocks(hidden, h, x, h, n, |_, hr, xr| {
            hr.iter_mut().zip(xr.iter()).for_each(|(a, b)| *a += b)
        });
        Ok(())
    }

    /// Final RMSNorm and LM head over `hidden` (`[n_tokens][hidden]`): logits `[n_tokens][vocab]`.
    pub fn final_norm_and_head(&self, hidden: &[f32], n_tokens: usize) -> Result<Vec<f32>> {
        let c = &self.config;
        if hidden.len() != n_tokens * c.hidden_size {
            return Err(Error::Shape(format!(
                "hidden has {} values, expected {n_tokens} x {}",
                hidden.len(),
                c.hidden_size
            )));
        }
        let mut x = vec![0f32; hidden.len()];
        rms_norm(hidden, &self.norm, c.rms_eps, &mut x);
        let mut logits = vec![0f32; n_tokens * c.vocab_size];
        match &self.lm_head {
            Some(l) => l.forward(&x, n_tokens, &mut logits)?,
            None if n_tokens == 1 => lowbit_kernels::gemv_f32::gemv(&x, &self.embed, &mut logits)?,
            None => lowbit_kernels::dense::matmul_wt(
                &x,
                &self.embed,
                &mut logits,
                n_tokens,
                c.hidden_size,
                c.vocab_size,
            )?,
        }
        Ok(logits)
    }

    /// Run `tokens` through the model as one chunk (batched), continuing from what `cache`
    /// holds, and return logits for every token or only the last one.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut dyn KvCache,
        which: Logits,
    ) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(Error::Shape("forward of zero tokens".into()));
        }
        if cache.shape() != self.config.kv_shape() {
            return Err(Error::Shape(format!(
                "cache shape {:?} does not match the model's {:?}",
                cache.shape(),
                self.config.kv_shape()
            )));
        }
        let n = tokens.len();
        let mut hidden = self.embed(tokens)?;
        let mut bufs = LayerBufs::default();
        for i in 0..self.layers.len() {
            self.layer_forward_bufs(i, &mut hidden, n, cache, None, &mut bufs)?;
        }
        match which {
            Logits::All => self.final_norm_and_head(&hidden, n),
            Logits::Last => {
                let h = self.config.hidden_size;
                self.final_norm_and_head(&hidden[(n - 1) * h..], 1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silu_matches_f64() {
        let mut worst = 0f64;
        for i in 0..=400_000 {
            let x = -87.0 + (i as f32) * (175.0 / 400_000.0);
            let s = x as f64 / (1.0 + (-x as f64).exp());
            let got = silu(x) as f64;
            worst = worst.max((got - s).abs() / s.abs().max(1e-30));
        }
        assert!(worst < 1e-6, "silu relative error {worst}");
        assert_eq!(silu(0.0), 0.0);
        assert!(silu(-1000.0).abs() < 1e-30 && silu(1000.0) == 1000.0);
    }

    #[test]
    fn rms_norm_matches_f64_and_split_rows_agree() {
        let d = 37;
        let n = 70;
        let x: Vec<f32> = (0..n * d)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0)
            .collect();
        let w: Vec<f32> = (0..d).map(|i| 0.5 + i as f32 / d as f32).collect();
        let mut out = vec![0f32; n * d];
        rms_norm(&x, &w, 1e-5, &mut out);
        for t in 0..n {
            let xr = &x[t * d..][..d];
            let ms: f64 = xr.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / d as f64;
            let inv = 1.0 / (ms + 1e-5).sqrt();
            for c in 0..d {
                let want = w[c] as f64 * xr[c] as f64 * inv;
                assert!((out[t * d + c] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()));
            }
        }
        // The row-block split used for long chunks gives the same bits as one pass.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let mut h = x.clone();
        let mut delta: Vec<f32> = x.iter().map(|v| v * 0.25).collect();
        pool.install(|| add_and_norm(&mut h, &mut delta, &w, 1e-5, n));
        let h_want: Vec<f32> = x.iter().map(|v| v + v * 0.25).collect();
        let mut want = vec![0f32; n * d];
        rms_norm(&h_want, &w, 1e-5, &mut want);
        assert_eq!(h, h_want);
        assert_eq!(delta, want);
    }
}
