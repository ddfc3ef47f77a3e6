//! The sequential, layer-by-layer loop.
//!
//! All calibration windows are embedded once and kept as one token-major activation buffer. For
//! each decoder layer the hidden states of every window enter the layer; its linears are
//! quantized in stages and the *quantized* layer's outputs become the next layer's inputs, so
//! errors of earlier layers are seen (and, by GPTQ, compensated) by later ones. Memory: the
//! activations of one layer for all windows (hidden, attention output, residual, MLP product)
//! plus one input group's statistics (`cols x cols` Hessian).
//!
//! The layer's forward is split into steps ([`Step`]), each run over all windows with
//! window-batched GEMMs (attention per window). True-sequential (the default): statistics of
//! `rmsnorm(h)` -> quantize q/k/v -> attention with the quantized q/k/v -> quantize o ->
//! residual, MLP input -> quantize gate/up -> MLP product -> quantize down -> layer output. Each
//! step's output is exactly what the next layer needs, so the whole schedule costs **one**
//! forward of the layer plus the Hessians. With `true_sequential = false` (and always for AWQ,
//! whose scales fold into still-dense producers) one pass with the original weights feeds all
//! seven linears and a second pass propagates through the quantized layer.

use super::act_quant_fn;
use super::parse_scheme;
use super::recipe::Recipe;
use crate::config::ModelConfig;
use crate::ct::ActivationQuant;
use crate::error::{Error, Result};
use crate::linear::Linear;
use crate::llama::{rms_norm, silu, Layer, Model};
use crate::rope::Rope;
use crate::weights::{build_layer, TensorSource};
use lowbit_calibration::sensitivity::relative_output_error_h;
use lowbit_calibration::{
    awq, gptq_prepared, hqq, prepare_hessian, rtn, smoothquant_scales, ActOrder, AwqConfig,
    Clipping, GptqConfig, HqqConfig, InputStats, LinearWeight, RtnConfig, SqConfig,
};
use lowbit_numerics::{QuantizedTensor, Scheme};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::time::Instant;

/// The quantization algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Round to nearest (absmax or MSE clipping); calibration only feeds the error report.
    Rtn,
    /// GPTQ with the damped Hessian of the calibration inputs.
    Gptq,
    /// Activation-aware scaling search, folded into the preceding norm, then RTN.
    Awq,
    /// SmoothQuant migration (alpha) folded into the preceding norms, then the weights with
    /// GPTQ, for W8A8.
    SmoothQuant,
    /// Half-quadratic (calibration-free) scale/zero optimisation.
    Hqq,
}

impl Method {
    /// Parse `rtn`, `gptq`, `awq`, `smoothquant`, `hqq`.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "rtn" => Method::Rtn,
            "gptq" => Method::Gptq,
            "awq" => Method::Awq,
            "smoothquant" | "sq" => Method::SmoothQuant,
            "hqq" => Method::Hqq,
            _ => {
                return Err(Error::Quantize(format!(
                    "unknown method `{s}`; choose rtn, gptq, awq, smoothquant or hqq"
                )))
            }
        })
    }

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Gptq => "gptq",
            Method::Awq => "awq",
            Method::SmoothQuant => "smoothquant",
            Method::Hqq => "hqq",
        }
    }
}

/// Options of [`quantize_model`].
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// The algorithm.
    pub method: Method,
    /// Which modules, with which scheme.
    pub recipe: Recipe,
    /// GPTQ settings (damping, block size, act-order).
    pub gptq: GptqConfig,
    /// RTN clipping.
    pub rtn_clipping: Clipping,
    /// Quantize q/k/v, o, gate/up, down in separate stages (see the module docs).
    pub true_sequential: bool,
    /// SmoothQuant migration strength (default 0.8).
    pub smooth_alpha: f32,
}

impl PipelineOptions {
    /// Defaults for a method and a recipe.
    pub fn new(method: Method, recipe: Recipe) -> Self {
        PipelineOptions {
            method,
            recipe,
            gptq: GptqConfig::default(),
            rtn_clipping: Clipping::AbsMax,
            true_sequential: true,
            smooth_alpha: 0.8,
        }
    }
}

/// Progress notifications (the command line turns them into progress bars).
#[derive(Debug, Clone)]
pub enum Event {
    /// Calibration windows embedded.
    Embedded {
        /// Number of windows.
        samples: usize,
    },
    /// A layer starts.
    LayerStart {
        /// Layer index.
        layer: usize,
        /// Number of layers.
        n_layers: usize,
    },
    /// A calibration pass over the windows progressed.
    Pass {
        /// Layer index.
        layer: usize,
        /// What the pass is for.
        what: &'static str,
        /// Windows done.
        done: usize,
        /// Windows in total.
        total: usize,
    },
    /// One module was quantized.
    Module(ModuleReport),
    /// A layer finished.
    LayerDone(LayerReport),
}

/// Per-module outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModuleReport {
    /// Canonical name.
    pub name: String,
    /// Scheme name.
    pub scheme: String,
    /// Method name.
    pub method: String,
    /// `||W X − Q(W) X|| / ||W X||` on the calibration inputs (`None` without calibration).
    pub rel_error: Option<f64>,
    /// GPTQ's own loss estimate.
    pub gptq_loss: Option<f64>,
    /// Relative damping GPTQ used.
    pub damp: Option<f64>,
    /// Dead input channels (zero Hessian diagonal) whose weights were zeroed.
    pub dead_channels: usize,
    /// Bits per weight, all metadata counted.
    pub bits_per_weight: f64,
    /// Seconds spent quantizing it.
    pub secs: f64,
}

/// Per-layer outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerReport {
    /// Layer index.
    pub layer: usize,
    /// Modules of the layer.
    pub modules: Vec<ModuleReport>,
    /// Mean relative output error of the quantized modules (when measured).
    pub mean_rel_error: Option<f64>,
    /// Wall time of the layer (calibration passes + quantization + propagation).
    pub secs: f64,
    /// Of which the calibration passes (layer forward steps and input statistics).
    pub pass_secs: f64,
}

/// The whole run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PipelineReport {
    /// Method name.
    pub method: String,
    /// Per layer.
    pub layers: Vec<LayerReport>,
    /// Calibration windows x tokens.
    pub calib_tokens: usize,
    /// Wall time of the whole loop.
    pub secs: f64,
}

/// Input groups of a decoder layer: linears that read the same activations.
const INPUTS: [(&str, &[&str]); 4] = [
    (
        "attn_in",
        &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ),
    ("o_in", &["self_attn.o_proj"]),
    ("mlp_in", &["mlp.gate_proj", "mlp.up_proj"]),
    ("down_in", &["mlp.down_proj"]),
];

fn input_key(module: &str) -> &'static str {
    INPUTS
        .iter()
        .find(|(_, ms)| ms.contains(&module))
        .map(|(k, _)| *k)
        .expect("layer linear")
}

/// Statistics of one input group (Gram matrix / Hessian, mean and max |x| per channel).
type Stats = InputStats;

/// Effective weights of the current layer's quantized linears (their dequantization), kept
/// until the layer is done so the calibration passes run them as one dense GEMM each.
type Deq = BTreeMap<&'static str, Vec<f32>>;

/// The calibration activations of one layer, every window concatenated token-major.
struct Acts {
    /// Windows.
    ns: usize,
    /// Tokens per window.
    seqlen: usize,
    /// The layer's input hidden states (`[ns * seqlen][hidden]`); the layer's output at the end.
    h: Vec<f32>,
    /// Attention output (the input of `o_proj`).
    att: Vec<f32>,
    /// Hidden state after the attention block's residual add.
    h1: Vec<f32>,
    /// `silu(gate) * up` (the input of `down_proj`).
    act: Vec<f32>,
    /// Tokens per GEMM (whole windows, at least one).
    pass_tokens: usize,
}

impl Acts {
    /// Buffers for `ns` windows of `seqlen` tokens of `model`, inputs zero.
    fn new(c: &crate::config::ModelConfig, ns: usize, seqlen: usize) -> Self {
        let tokens = ns * seqlen;
        Acts {
            ns,
            seqlen,
            h: Vec::with_capacity(tokens * c.hidden_size),
            att: vec![0f32; tokens * c.q_dim()],
            h1: vec![0f32; tokens * c.hidden_size],
            act: vec![0f32; tokens * c.intermediate_size],
            pass_tokens: PASS_TOKENS,
        }
    }
}

/// One step of the decoder layer's forward, in order. Each step reads what the earlier steps
/// left in [`Acts`] and recomputes the cheap RMSNorms, so a step run after some linears were
/// quantized (or after AWQ / SmoothQuant folded scales into a norm) sees the current weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    /// `rmsnorm(h)`: only gathers the q/k/v input statistics.
    AttnIn,
    /// q/k/v, RoPE and causal attention per window -> `att`.
    Attn,
    /// `h1 = h + o_proj(att)`; gathers the gate/up input statistics.
    Resid1,
    /// `act = silu(gate(x2)) * up(x2)`, `x2 = rmsnorm(h1)`.
    Mlp,
    /// `h = h1 + down_proj(act)`: the layer's output.
    Out,
}

const STEPS: [Step; 5] = [Step::AttnIn, Step::Attn, Step::Resid1, Step::Mlp, Step::Out];

/// Tokens per GEMM in the calibration passes (whole windows, at least one).
const PASS_TOKENS: usize = 2048;

/// `y = act_quant(x) · Wᵀ + b` with the layer's current effective weight `w`.
fn lin_apply(lin: &Linear, w: &[f32], x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
    let xq;
    let x = match &lin.act_quant {
        Some(f) => {
            xq = {
                let mut b = x.to_vec();
                f(&mut b, n);
                b
            };
            &xq[..]
        }
        None => x,
    };
    lowbit_kernels::dense::matmul_wt(x, w, y, n, lin.inp, lin.out)?;
    if let Some(b) = &lin.bias {
        y.par_chunks_mut(lin.out).for_each(|row| {
            row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
        });
    }
    Ok(())
}

fn par_rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    x.par_chunks(d * 64)
        .zip(out.par_chunks_mut(d * 64))
        .for_each(|(xr, or)| rms_norm(xr, w, eps, or));
}

fn par_add(acc: &mut [f32], x: &[f32]) {
    acc.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
}

thread_local! {
    /// Seconds spent in [`run_steps`] on this thread since the last reset (the layer report's
    /// `pass_secs`).
    static PASS_SECS: std::cell::Cell<f64> = const { std::cell::Cell::new(0.0) };
}

/// Adds the time from its creation to its drop to [`PASS_SECS`], whichever way the pass ends.
struct PassTimer(Instant);

impl Drop for PassTimer {
    fn drop(&mut self) {
        let secs = self.0.elapsed().as_secs_f64();
        PASS_SECS.with(|p| p.set(p.get() + secs));
    }
}

/// Run `steps` of layer `li` over every window (chunks of whole windows), gathering the input
/// statistics of the keys present in `stats`.
#[allow(clippy::too_many_arguments)]
fn run_steps(
    c: &ModelConfig,
    layer: &Layer,
    rope: &Rope,
    li: usize,
    deq: &Deq,
    acts: &mut Acts,
    steps: &[Step],
    stats: &mut BTreeMap<&'static str, Stats>,
    what: &'static str,
    on_event: &mut dyn FnMut(&Event),
) -> Result<()> {
    let _timer = PassTimer(Instant::now());
    let (h, qd, kvd, f) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    let l = acts.seqlen;
    let eff = |name: &'static str| -> (&Linear, &[f32]) {
        let lin = layer.linear(name).expect("layer linear");
        let w = deq.get(name).map_or_else(|| lin.weight_f32(), |w| &w[..]);
        (lin, w)
    };
    let cs = (acts.pass_tokens / l.max(1)).max(1);
    let mut s0 = 0;
    while s0 < acts.ns {
        let s1 = (s0 + cs).min(acts.ns);
        let n = (s1 - s0) * l;
        let hr = s0 * l * h..s1 * l * h;
        for &step in steps {
            match step {
                Step::AttnIn => {
                    if let Some(st) = stats.get_mut("attn_in") {
                        let mut x = vec![0f32; n * h];
                        par_rms_norm(&acts.h[hr.clone()], &layer.attn_norm, c.rms_eps, &mut x);
                        st.add_rows(&x, n)?;
                    }
                }
                Step::Attn => {
                    let mut x = vec![0f32; n * h];
                    par_rms_norm(&acts.h[hr.clone()], &layer.attn_norm, c.rms_eps, &mut x);
                    let mut q = vec![0f32; n * qd];
                    let mut k = vec![0f32; n * kvd];
                    let mut v = vec![0f32; n * kvd];
                    let (lq, wq) = eff("self_attn.q_proj");
                    lin_apply(lq, wq, &x, n, &mut q)?;
                    let (lk, wk) = eff("self_attn.k_proj");
                    lin_apply(lk, wk, &x, n, &mut k)?;
                    let (lv, wv) = eff("self_attn.v_proj");
                    lin_apply(lv, wv, &x, n, &mut v)?;
                    let scale = 1.0 / (c.head_dim as f32).sqrt();
                    let att = &mut acts.att[s0 * l * qd..s1 * l * qd];
                    att.par_chunks_mut(l * qd)
                        .zip(q.par_chunks_mut(l * qd))
                        .zip(k.par_chunks_mut(l * kvd).zip(v.par_chunks(l * kvd)))
                        .try_for_each(|((a, q), (k, v))| -> Result<()> {
                            rope.apply(q, l, c.n_heads, 0);
                            rope.apply(k, l, c.n_kv_heads, 0);
                            let mut cache = attn_cache(c)?;
                            cache.append(li, k, v, l)?;
                            cache.attend(li, q, l, c.n_heads, scale, a)?;
                            Ok(())
                        })?;
                    if let Some(st) = stats.get_mut("o_in") {
                        st.add_rows(&acts.att[s0 * l * qd..s1 * l * qd], n)?;
                    }
                }
                Step::Resid1 => {
                    let (lo, wo) = eff("self_attn.o_proj");
                    let h1 = &mut acts.h1[hr.clone()];
                    lin_apply(lo, wo, &acts.att[s0 * l * qd..s1 * l * qd], n, h1)?;
                    par_add(h1, &acts.h[hr.clone()]);
                    if let Some(st) = stats.get_mut("mlp_in") {
                        let mut x = vec![0f32; n * h];
                        par_rms_norm(h1, &layer.mlp_norm, c.rms_eps, &mut x);
                        st.add_rows(&x, n)?;
                    }
                }
                Step::Mlp => {
                    let mut x = vec![0f32; n * h];
                    par_rms_norm(&acts.h1[hr.clone()], &layer.mlp_norm, c.rms_eps, &mut x);
                    let mut u = vec![0f32; n * f];
                    let (lg, wg) = eff("mlp.gate_proj");
                    let act = &mut acts.act[s0 * l * f..s1 * l * f];
                    lin_apply(lg, wg, &x, n, act)?;
                    let (lu, wu) = eff("mlp.up_proj");
                    lin_apply(lu, wu, &x, n, &mut u)?;
                    act.par_chunks_mut(4096)
                        .zip(u.par_chunks(4096))
                        .for_each(|(g, u)| {
                            g.iter_mut().zip(u).for_each(|(g, u)| *g = silu(*g) * u)
                        });
                    if let Some(st) = stats.get_mut("down_in") {
                        st.add_rows(act, n)?;
                    }
                }
                Step::Out => {
                    let (ld, wd) = eff("mlp.down_proj");
                    let mut y = vec![0f32; n * h];
                    lin_apply(ld, wd, &acts.act[s0 * l * f..s1 * l * f], n, &mut y)?;
                    let out = &mut acts.h[hr.clone()];
                    out.copy_from_slice(&acts.h1[hr.clone()]);
                    par_add(out, &y);
                }
            }
        }
        s0 = s1;
        on_event(&Event::Pass {
            layer: li,
            what,
            done: s0,
            total: acts.ns,
        });
    }
    Ok(())
}

/// Check the calibration windows and allocate the activation buffers for them.
fn prepare_acts(c: &ModelConfig, samples: &[Vec<u32>], opts: &PipelineOptions) -> Result<Acts> {
    opts.recipe.validate()?;
    let needs_calib = opts.method != Method::Rtn && opts.method != Method::Hqq;
    if needs_calib && samples.is_empty() {
        return Err(Error::Quantize(format!(
            "method {} needs calibration data (--calib FILE)",
            opts.method.name()
        )));
    }
    let seqlen = samples.first().map_or(0, |s| s.len());
    if samples.iter().any(|s| s.len() != seqlen || s.is_empty()) {
        return Err(Error::Quantize(
            "calibration windows must be non-empty and of equal length".into(),
        ));
    }
    Ok(Acts::new(c, samples.len(), seqlen))
}

/// Append the embedding rows of `tokens` (from the `[vocab][hidden]` table `embed`) to `out`.
fn embed_rows(c: &ModelConfig, embed: &[f32], tokens: &[u32], out: &mut Vec<f32>) -> Result<()> {
    let h = c.hidden_size;
    for &t in tokens {
        let t = t as usize;
        if t >= c.vocab_size {
            return Err(Error::Shape(format!(
                "token id {t} out of range (vocabulary {})",
                c.vocab_size
            )));
        }
        out.extend_from_slice(&embed[t * h..][..h]);
    }
    Ok(())
}

/// Quantize `model` in place with calibration windows `samples` (token ids). Returns the
/// per-layer report; the quantized linears carry their [`QuantizedTensor`]s (and the per-token
/// activation quantizer for W8A8 schemes).
///
/// With [`Method::Rtn`] or [`Method::Hqq`] and no samples, no calibration passes run and errors
/// are not reported. [`quantize_streaming`] runs the same per-layer code on one layer at a time.
pub fn quantize_model(
    model: &mut Model,
    samples: &[Vec<u32>],
    opts: &PipelineOptions,
    on_event: &mut dyn FnMut(&Event),
) -> Result<PipelineReport> {
    let t0 = Instant::now();
    let c = model.config.clone();
    let mut acts = prepare_acts(&c, samples, opts)?;
    for s in samples {
        acts.h.extend_from_slice(&model.embed(s)?);
    }
    on_event(&Event::Embedded {
        samples: samples.len(),
    });
    let rope = Rope::new(&c);
    let mut layers = Vec::with_capacity(c.n_layers);
    for (li, layer) in model.layers.iter_mut().enumerate() {
        layers.push(quantize_layer(
            &c, &rope, layer, li, &mut acts, opts, on_event,
        )?);
    }
    Ok(PipelineReport {
        method: opts.method.name().into(),
        layers,
        calib_tokens: acts.ns * acts.seqlen,
        secs: t0.elapsed().as_secs_f64(),
    })
}

/// Where [`quantize_streaming`] hands each piece of the model once it is final. Each piece is
/// passed by value: the sink writes it out and drops it, which is what keeps the pipeline's
/// memory to one decoder layer.
pub trait LayerSink {
    /// The token embedding (`[vocab][hidden]` f32), before the first layer.
    fn embedding(&mut self, config: &ModelConfig, embed: Vec<f32>) -> Result<()>;
    /// Decoder layer `li`, its planned linears quantized.
    fn layer(&mut self, config: &ModelConfig, li: usize, layer: Layer) -> Result<()>;
    /// The final norm and the untied LM head (`None` when tied): its `[vocab][hidden]` f32
    /// weight and optional bias, after the last layer.
    fn head(
        &mut self,
        config: &ModelConfig,
        norm: Vec<f32>,
        lm_head: Option<DenseHead>,
    ) -> Result<()>;
}

/// An unquantized LM head: `[vocab][hidden]` weight and optional bias.
pub type DenseHead = (Vec<f32>, Option<Vec<f32>>);

fn required<T>(v: Option<T>, name: &str) -> Result<T> {
    v.ok_or_else(|| Error::MissingTensor(name.to_string()))
}

/// The streaming form of [`quantize_model`]: the weights come from `src` one decoder layer at
/// a time (a [`TensorSource`] over a memory-mapped GGUF or safetensors file dequantizes only
/// the tensors asked for), each layer is quantized by the same code as [`quantize_model`] and
/// handed to `sink` as soon as it is done, so the f32 weights alive at any time are one
/// layer's (plus the embedding while the calibration windows are embedded, and the final norm
/// and untied head at the end). The calibration activations of the next layer are computed
/// through the quantized layer, exactly as in memory: the quantized tensors are bit-identical.
pub fn quantize_streaming(
    config: &ModelConfig,
    src: &mut dyn TensorSource,
    samples: &[Vec<u32>],
    opts: &PipelineOptions,
    sink: &mut dyn LayerSink,
    on_event: &mut dyn FnMut(&Event),
) -> Result<PipelineReport> {
    let t0 = Instant::now();
    config.validate()?;
    let c = config;
    let mut acts = prepare_acts(c, samples, opts)?;
    let embed = required(
        src.get_f32("model.embed_tokens.weight")?,
        "model.embed_tokens.weight",
    )?;
    if embed.len() != c.vocab_size * c.hidden_size {
        return Err(Error::Shape(format!(
            "embedding has {} values, expected {} x {}",
            embed.len(),
            c.vocab_size,
            c.hidden_size
        )));
    }
    for s in samples {
        embed_rows(c, &embed, s, &mut acts.h)?;
    }
    sink.embedding(c, embed)?;
    on_event(&Event::Embedded {
        samples: samples.len(),
    });
    let rope = Rope::new(c);
    let mut layers = Vec::with_capacity(c.n_layers);
    for li in 0..c.n_layers {
        let mut layer = build_layer(c, src, li)?;
        layers.push(quantize_layer(
            c, &rope, &mut layer, li, &mut acts, opts, on_event,
        )?);
        sink.layer(c, li, layer)?;
    }
    drop(acts);
    let norm = required(src.get_f32("model.norm.weight")?, "model.norm.weight")?;
    if norm.len() != c.hidden_size {
        return Err(Error::Shape(format!(
            "final norm has {} values, expected {}",
            norm.len(),
            c.hidden_size
        )));
    }
    let lm_head = if c.tie_embeddings {
        None
    } else {
        let w = required(src.get_f32("lm_head.weight")?, "lm_head.weight")?;
        if w.len() != c.vocab_size * c.hidden_size {
            return Err(Error::Shape(format!(
                "lm_head has {} values, expected {} x {}",
                w.len(),
                c.vocab_size,
                c.hidden_size
            )));
        }
        Some((w, src.get_f32("lm_head.bias")?))
    };
    sink.head(c, norm, lm_head)?;
    Ok(PipelineReport {
        method: opts.method.name().into(),
        layers,
        calib_tokens: samples.len() * samples.first().map_or(0, |s| s.len()),
        secs: t0.elapsed().as_secs_f64(),
    })
}

/// What the calibration passes and quantize stages of one layer share: the layer's plan, the
/// dequantized weights quantized so far (which later passes run through) and the reports.
struct LayerJob<'a> {
    c: &'a ModelConfig,
    rope: &'a Rope,
    li: usize,
    opts: &'a PipelineOptions,
    plan: Plan,
    deq: Deq,
    modules: Vec<ModuleReport>,
}

impl LayerJob<'_> {
    /// [`run_steps`] with the layer's current weights.
    fn pass(
        &self,
        layer: &Layer,
        acts: &mut Acts,
        steps: &[Step],
        stats: &mut BTreeMap<&'static str, Stats>,
        what: &'static str,
        on_event: &mut dyn FnMut(&Event),
    ) -> Result<()> {
        let (c, rope, li) = (self.c, self.rope, self.li);
        run_steps(
            c, layer, rope, li, &self.deq, acts, steps, stats, what, on_event,
        )
    }
}

/// Quantize decoder layer `li` (`layer`) with the calibration activations `acts` (its input
/// hidden states; on return, the quantized layer's outputs, i.e. the next layer's inputs).
/// Without calibration windows (`acts.ns == 0`) every planned linear is rounded directly.
#[allow(clippy::too_many_arguments)]
fn quantize_layer(
    c: &ModelConfig,
    rope: &Rope,
    layer: &mut Layer,
    li: usize,
    acts: &mut Acts,
    opts: &PipelineOptions,
    on_event: &mut dyn FnMut(&Event),
) -> Result<LayerReport> {
    let n_layers = c.n_layers;
    let h = c.hidden_size;
    let use_calib = acts.ns > 0;
    let lt = Instant::now();
    PASS_SECS.with(|p| p.set(0.0));
    on_event(&Event::LayerStart {
        layer: li,
        n_layers,
    });
    // Which modules of this layer are quantized, with which scheme.
    let mut plan: Plan = BTreeMap::new();
    for (_, ms) in INPUTS {
        for m in ms {
            let full = format!("model.layers.{li}.{m}");
            if let Some(sname) = opts.recipe.scheme_for(&full, Some(li), n_layers) {
                let (s, a) = parse_scheme(&sname)?;
                plan.insert(m, (sname, s, a));
            }
        }
    }
    let mut job = LayerJob {
        c,
        rope,
        li,
        opts,
        plan,
        deq: BTreeMap::new(),
        modules: Vec::new(),
    };
    let new_stats = |plan: &Plan, keys: &[&'static str]| -> BTreeMap<&'static str, Stats> {
        keys.iter()
            .filter(|k| {
                INPUTS
                    .iter()
                    .find(|(kk, _)| kk == *k)
                    .is_some_and(|(_, ms)| ms.iter().any(|m| plan.contains_key(m)))
            })
            .map(|&k| {
                let cols = match k {
                    "down_in" => c.intermediate_size,
                    "o_in" => c.q_dim(),
                    _ => h,
                };
                (k, Stats::new(cols))
            })
            .collect()
    };
    if !use_calib {
        // Calibration-free: quantize every planned linear; nothing to propagate.
        let todo: Vec<&'static str> = INPUTS
            .iter()
            .flat_map(|(_, ms)| ms.iter().copied())
            .filter(|m| job.plan.contains_key(m))
            .collect();
        let mut none = BTreeMap::new();
        job.stage(layer, &todo, &mut none, on_event)?;
    } else if opts.method == Method::Awq || !opts.true_sequential {
        // One capture pass with the layer's original weights feeds all seven linears, then
        // one pass through the quantized layer. AWQ needs this order: its scales fold into
        // producers (norms, up_proj rows) that must still be dense, down_proj first.
        let mut stats = new_stats(&job.plan, &["attn_in", "o_in", "mlp_in", "down_in"]);
        job.pass(layer, acts, &STEPS[..4], &mut stats, "capture", on_event)?;
        let todo: Vec<&'static str> = if opts.method == Method::Awq {
            vec![
                "mlp.down_proj",
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
            ]
        } else {
            INPUTS
                .iter()
                .flat_map(|(_, ms)| ms.iter().copied())
                .collect()
        };
        let todo: Vec<&'static str> = todo
            .into_iter()
            .filter(|m| job.plan.contains_key(m))
            .collect();
        job.stage(layer, &todo, &mut stats, on_event)?;
        drop(stats);
        job.pass(
            layer,
            acts,
            &STEPS[1..],
            &mut BTreeMap::new(),
            "propagate",
            on_event,
        )?;
    } else {
        // True-sequential in one forward: each step's inputs come from the already
        // quantized linears before it, which is also what the next layer must see.
        for (si, (key, ms)) in INPUTS.iter().enumerate() {
            let mut stats = new_stats(&job.plan, &[key]);
            job.pass(layer, acts, &STEPS[si..si + 1], &mut stats, key, on_event)?;
            let todo: Vec<&'static str> = ms
                .iter()
                .copied()
                .filter(|m| job.plan.contains_key(m))
                .collect();
            job.stage(layer, &todo, &mut stats, on_event)?;
        }
        job.pass(
            layer,
            acts,
            &STEPS[4..],
            &mut BTreeMap::new(),
            "propagate",
            on_event,
        )?;
    }
    let modules = job.modules;
    let errs: Vec<f64> = modules.iter().filter_map(|m| m.rel_error).collect();
    let rep = LayerReport {
        layer: li,
        mean_rel_error: (!errs.is_empty()).then(|| errs.iter().sum::<f64>() / errs.len() as f64),
        modules,
        secs: lt.elapsed().as_secs_f64(),
        pass_secs: PASS_SECS.with(|p| p.get()),
    };
    on_event(&Event::LayerDone(rep.clone()));
    Ok(rep)
}

/// A fresh f32 KV cache for the attention of one calibration window (what
/// [`Model::new_cache`]`("f32")` builds, from the config alone).
fn attn_cache(c: &ModelConfig) -> Result<Box<dyn lowbit_kv_cache::KvCache>> {
    let mut cache = lowbit_kv_cache::build("f32", c.kv_shape())?;
    cache.set_rope(&crate::rope::inv_freqs(c))?;
    Ok(cache)
}

impl LayerJob<'_> {
    /// Quantize the planned modules `todo` of this layer (in that order) from the input
    /// statistics `stats` (empty without calibration). Linears sharing an input share GPTQ's
    /// factorization. Their dequantized weights go into `deq` for the calibration passes that
    /// follow, their reports into `modules`.
    fn stage(
        &mut self,
        layer: &mut Layer,
        todo: &[&'static str],
        stats: &mut BTreeMap<&'static str, Stats>,
        on_event: &mut dyn FnMut(&Event),
    ) -> Result<()> {
        let (li, opts, plan) = (self.li, self.opts, &self.plan);
        let (deq_out, modules) = (&mut self.deq, &mut self.modules);
        if todo.is_empty() {
            return Ok(());
        }
        let mut keys: Vec<&'static str> = todo.iter().map(|m| input_key(m)).collect();
        keys.dedup();
        // SmoothQuant: migrate activation outliers into the weights before quantizing.
        if opts.method == Method::SmoothQuant {
            for &k in &keys {
                if k == "attn_in" || k == "mlp_in" {
                    if let Some(st) = stats.get_mut(k) {
                        smooth_group(layer, li, k, st, opts.smooth_alpha)?;
                    }
                }
            }
        }
        for &k in &keys {
            if opts.method == Method::Awq && k != "o_in" {
                if let Some(st) = stats.get(k) {
                    for rep in awq_group(layer, li, k, st, plan, todo, deq_out)? {
                        on_event(&Event::Module(rep.clone()));
                        modules.push(rep);
                    }
                    continue;
                }
            }
            let hmat = match stats.get(k) {
                Some(s) => Some(s.hessian.hessian()?),
                None => None,
            };
            let cols = stats.get(k).map_or(0, |s| s.cols());
            let prep = match (&hmat, opts.method) {
                (Some(hm), Method::Gptq | Method::SmoothQuant) => {
                    Some(prepare_hessian(hm, cols, &gptq_cfg(opts, plan, todo))?)
                }
                _ => None,
            };
            for &m in todo.iter().filter(|m| input_key(m) == k) {
                let mt = Instant::now();
                let (sname, scheme, act) = plan[m].clone();
                let full = format!("model.layers.{li}.{m}");
                let lin = layer.linear_mut(m).expect("layer linear");
                let (rows, cols) = (lin.out, lin.inp);
                let w = lin.weight_f32().to_vec();
                let (q, deq, loss, damp, dead): (
                    QuantizedTensor,
                    Vec<f32>,
                    Option<f64>,
                    Option<f64>,
                    usize,
                ) = match &prep {
                    Some(p) => {
                        let mut cfg = gptq_cfg(opts, plan, todo);
                        cfg.act_order = p.act_order;
                        let r = gptq_prepared(&w, rows, cols, &scheme, p, &cfg)
                            .map_err(|e| Error::Quantize(format!("{full}: GPTQ failed: {e}")))?;
                        (
                            r.tensor,
                            r.dequantized,
                            Some(r.loss),
                            Some(p.rel_damp),
                            p.dead.len(),
                        )
                    }
                    None if opts.method == Method::Hqq => {
                        let r = hqq(&w, rows, cols, &scheme, &HqqConfig::default())
                            .map_err(|e| Error::Quantize(format!("{full}: HQQ: {e}")))?;
                        (r.tensor, r.dequantized, None, None, 0)
                    }
                    None => {
                        // AWQ cannot fold o_proj's scales into v_proj under GQA (AutoAWQ skips it
                        // too): plain rounding with an MSE clipping search.
                        let clipping = if opts.method == Method::Awq {
                            Clipping::Mse {
                                grid: 20,
                                min_ratio: 0.5,
                            }
                        } else {
                            opts.rtn_clipping
                        };
                        let q = rtn(&w, rows, cols, &scheme, &RtnConfig { clipping })
                            .map_err(|e| Error::Quantize(format!("{full}: {e}")))?;
                        let d = q.dequantize()?;
                        (q, d, None, None, 0)
                    }
                };
                let rel_error = match &hmat {
                    Some(hm) => Some(relative_output_error_h(&w, &deq, rows, cols, hm)?),
                    None => None,
                };
                let bpw = q.bits_per_weight();
                let keep = deq.clone();
                lin.set_quantized(q, move |_| Ok(deq))?;
                if let Some(a) = act {
                    lin.act_quant = Some(act_quant_fn(a));
                }
                deq_out.insert(m, keep);
                let rep = ModuleReport {
                    name: full,
                    scheme: sname,
                    method: opts.method.name().into(),
                    rel_error,
                    gptq_loss: loss,
                    damp,
                    dead_channels: dead,
                    bits_per_weight: bpw,
                    secs: mt.elapsed().as_secs_f64(),
                };
                on_event(&Event::Module(rep.clone()));
                modules.push(rep);
            }
        }
        Ok(())
    }
}

/// GPTQ settings for a stage: group act-order needs row-local blocks; fall back to static.
fn gptq_cfg(
    opts: &PipelineOptions,
    plan: &BTreeMap<&'static str, (String, Scheme, Option<ActivationQuant>)>,
    todo: &[&str],
) -> GptqConfig {
    let mut cfg = opts.gptq;
    if cfg.act_order == ActOrder::Group
        && todo.iter().any(|m| {
            !matches!(
                plan[m].1.granularity,
                lowbit_numerics::Granularity::PerGroup(_)
            )
        })
    {
        cfg.act_order = ActOrder::Static;
    }
    cfg
}

/// Names, weights and row counts of a group of linears sharing an input.
type GroupWeights = (Vec<&'static str>, Vec<Vec<f32>>, Vec<usize>);

type Plan = BTreeMap<&'static str, (String, Scheme, Option<ActivationQuant>)>;

/// The linears of `key` that the stage quantizes, their weights and the group's one scheme.
fn group_weights(
    layer: &Layer,
    li: usize,
    key: &str,
    plan: &Plan,
    todo: &[&str],
) -> Result<GroupWeights> {
    let names: Vec<&'static str> = INPUTS
        .iter()
        .find(|(k, _)| *k == key)
        .expect("key")
        .1
        .iter()
        .copied()
        .filter(|m| todo.contains(m) && plan.contains_key(m))
        .collect();
    if let Some(first) = names.first() {
        if names.iter().any(|n| plan[n].1 != plan[first].1) {
            return Err(Error::Quantize(format!(
                "layer {li}: {} share an input and must share one scheme for AWQ",
                names.join(", ")
            )));
        }
    }
    let ws: Vec<Vec<f32>> = names
        .iter()
        .map(|n| layer.linear(n).expect("linear").weight_f32().to_vec())
        .collect();
    let rows: Vec<usize> = names
        .iter()
        .map(|n| layer.linear(n).expect("linear").out)
        .collect();
    Ok((names, ws, rows))
}

/// Divide the producer of input `key` by `s` (norm weight, or `up_proj`'s rows for `down_in`).
fn fold_into_producer(layer: &mut Layer, li: usize, key: &str, s: &[f32]) -> Result<()> {
    match key {
        "attn_in" => lowbit_calibration::fold::divide_norm_weight(&mut layer.attn_norm, s)?,
        "mlp_in" => lowbit_calibration::fold::divide_norm_weight(&mut layer.mlp_norm, s)?,
        "down_in" => {
            let up = &mut layer.up_proj;
            if up.is_quantized() {
                return Err(Error::Quantize(format!(
                    "layer {li}: cannot fold down_proj scales into an already quantized up_proj"
                )));
            }
            let (rows, cols) = (up.out, up.inp);
            let mut w = up.weight_f32().to_vec();
            let mut b = up.bias.clone();
            lowbit_calibration::fold::divide_rows(&mut w, rows, cols, b.as_deref_mut(), s)?;
            up.set_dense(w)?;
            up.bias = b;
        }
        _ => {
            return Err(Error::Quantize(format!(
                "no producer to fold scales into for {key}"
            )))
        }
    }
    Ok(())
}

/// AWQ of the linears reading `key`: scale search + clipping (not for q/k), scales folded into
/// the producer, scaled-space tensors installed.
fn awq_group(
    layer: &mut Layer,
    li: usize,
    key: &str,
    st: &Stats,
    plan: &Plan,
    todo: &[&str],
    deq_out: &mut Deq,
) -> Result<Vec<ModuleReport>> {
    let t = Instant::now();
    let (names, ws, rows) = group_weights(layer, li, key, plan, todo)?;
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let (sname, scheme, act) = plan[names[0]].clone();
    let lws: Vec<LinearWeight> = ws
        .iter()
        .zip(&rows)
        .map(|(w, &r)| LinearWeight { w, rows: r })
        .collect();
    let clip: Vec<bool> = names
        .iter()
        .map(|n| !(n.ends_with("q_proj") || n.ends_with("k_proj")))
        .collect();
    let r = awq(&lws, st, &scheme, &clip, &AwqConfig::default())
        .map_err(|e| Error::Quantize(format!("layer {li} {key}: AWQ: {e}")))?;
    fold_into_producer(layer, li, key, &r.scales.scales)?;
    let secs = t.elapsed().as_secs_f64() / names.len() as f64;
    let mut reps = Vec::new();
    for (n, l) in names.iter().zip(r.linears) {
        let full = format!("model.layers.{li}.{n}");
        let lin = layer.linear_mut(n).expect("linear");
        let bpw = l.tensor.bits_per_weight();
        let deq = l.dequantized;
        deq_out.insert(n, deq.clone());
        lin.set_quantized(l.tensor, move |_| Ok(deq))?;
        if let Some(a) = act {
            lin.act_quant = Some(act_quant_fn(a));
        }
        reps.push(ModuleReport {
            name: full,
            scheme: sname.clone(),
            method: "awq".into(),
            rel_error: Some(l.rel_error),
            gptq_loss: None,
            damp: None,
            dead_channels: 0,
            bits_per_weight: bpw,
            secs,
        });
    }
    Ok(reps)
}

/// SmoothQuant for the linears reading `key` (`attn_in` after `input_layernorm`, `mlp_in` after
/// `post_attention_layernorm`): migration scales from the activation and weight maxima, the norm
/// weight divided by `s`, the weights' columns multiplied by `s`, and the statistics rescaled to
/// the smoothed inputs.
fn smooth_group(layer: &mut Layer, li: usize, key: &str, st: &mut Stats, alpha: f32) -> Result<()> {
    let names: Vec<&'static str> = INPUTS
        .iter()
        .find(|(k, _)| *k == key)
        .expect("key")
        .1
        .to_vec();
    let ws: Vec<Vec<f32>> = names
        .iter()
        .map(|n| layer.linear(n).expect("linear").weight_f32().to_vec())
        .collect();
    let rows: Vec<usize> = names
        .iter()
        .map(|n| layer.linear(n).expect("linear").out)
        .collect();
    let lws: Vec<LinearWeight> = ws
        .iter()
        .zip(&rows)
        .map(|(w, &r)| LinearWeight { w, rows: r })
        .collect();
    let s = smoothquant_scales(&lws, &st.abs_max()?, &SqConfig { alpha })?;
    fold_into_producer(layer, li, key, &s)?;
    let cols = s.len();
    for (n, mut w) in names.iter().zip(ws) {
        let l = layer.linear_mut(n).expect("linear");
        lowbit_calibration::fold::scale_columns(&mut w, l.out, cols, &s)?;
        l.set_dense(w)?;
    }
    st.divide_channels(&s)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Arch, ModelConfig, RopeScaling};
    use crate::weights::random_model;

    fn model() -> Model {
        let cfg = ModelConfig {
            arch: Arch::Llama,
            vocab_size: 61,
            hidden_size: 48,
            intermediate_size: 80,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 12,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            rms_eps: 1e-5,
            max_ctx: 64,
            tie_embeddings: true,
            qkv_bias: true,
            bos_token_id: None,
            eos_token_id: None,
        };
        random_model(cfg, 7).unwrap()
    }

    /// The staged, window-batched forward of the pipeline equals the model's own layer forward
    /// (run window by window), whether the steps run in one call or one at a time (as the
    /// true-sequential schedule does), and whatever the chunking of windows into GEMMs.
    #[test]
    fn staged_forward_matches_layer_forward() {
        let m = model();
        let (ns, l, h) = (5, 9, m.config.hidden_size);
        let windows: Vec<Vec<u32>> = (0..ns)
            .map(|s| (0..l).map(|t| ((s * 17 + t * 5) % 61) as u32).collect())
            .collect();
        let mut want: Vec<f32> = Vec::new();
        for w in &windows {
            let mut x = m.embed(w).unwrap();
            for li in 0..2 {
                let mut cache = m.new_cache("f32").unwrap();
                m.layer_forward(li, &mut x, l, cache.as_mut()).unwrap();
            }
            want.extend_from_slice(&x);
        }
        let rope = Rope::new(&m.config);
        for (pass_tokens, one_by_one) in [(1000, false), (2 * l, true), (1, false)] {
            let mut acts = Acts::new(&m.config, ns, l);
            acts.pass_tokens = pass_tokens;
            for w in &windows {
                acts.h.extend_from_slice(&m.embed(w).unwrap());
            }
            for li in 0..2 {
                let mut stats = BTreeMap::new();
                if one_by_one {
                    for st in STEPS {
                        run_steps(
                            &m.config,
                            &m.layers[li],
                            &rope,
                            li,
                            &Deq::new(),
                            &mut acts,
                            &[st],
                            &mut stats,
                            "t",
                            &mut |_| {},
                        )
                        .unwrap();
                    }
                } else {
                    run_steps(
                        &m.config,
                        &m.layers[li],
                        &rope,
                        li,
                        &Deq::new(),
                        &mut acts,
                        &STEPS[1..],
                        &mut stats,
                        "t",
                        &mut |_| {},
                    )
                    .unwrap();
                }
            }
            assert_eq!(acts.h.len(), ns * l * h);
            for (i, (a, b)) in acts.h.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "pass_tokens {pass_tokens}: value {i}: {a} vs {b}"
                );
            }
        }
    }

    /// Statistics gathered by the staged passes are those of the inputs the model's own forward
    /// hands to each linear.
    #[test]
    fn staged_statistics_match_captured_inputs() {
        let m = model();
        let (ns, l) = (3, 7);
        let windows: Vec<Vec<u32>> = (0..ns)
            .map(|s| (0..l).map(|t| ((s * 11 + t * 3 + 1) % 61) as u32).collect())
            .collect();
        let keys = ["attn_in", "o_in", "mlp_in", "down_in"];
        let cols = |k: &str| match k {
            "down_in" => m.config.intermediate_size,
            "o_in" => m.config.q_dim(),
            _ => m.config.hidden_size,
        };
        let mut want: BTreeMap<&'static str, Stats> =
            keys.iter().map(|&k| (k, Stats::new(cols(k)))).collect();
        for w in &windows {
            let mut x = m.embed(w).unwrap();
            let mut cache = m.new_cache("f32").unwrap();
            let mut cb = |name: &str, x: &[f32], n: usize| {
                let k = match name.rsplit_once("layers.0.").map(|p| p.1) {
                    Some("self_attn.q_proj") => "attn_in",
                    Some("self_attn.o_proj") => "o_in",
                    Some("mlp.gate_proj") => "mlp_in",
                    Some("mlp.down_proj") => "down_in",
                    _ => return,
                };
                want.get_mut(k).unwrap().add_rows(x, n).unwrap();
            };
            m.layer_forward_with_capture(0, &mut x, l, cache.as_mut(), Some(&mut cb))
                .unwrap();
        }
        let mut acts = Acts::new(&m.config, ns, l);
        for w in &windows {
            acts.h.extend_from_slice(&m.embed(w).unwrap());
        }
        let mut got: BTreeMap<&'static str, Stats> =
            keys.iter().map(|&k| (k, Stats::new(cols(k)))).collect();
        let rope = Rope::new(&m.config);
        run_steps(
            &m.config,
            &m.layers[0],
            &rope,
            0,
            &Deq::new(),
            &mut acts,
            &STEPS[..4],
            &mut got,
            "t",
            &mut |_| {},
        )
        .unwrap();
        for k in keys {
            let (a, b) = (
                got[k].hessian.hessian().unwrap(),
                want[k].hessian.hessian().unwrap(),
            );
            assert_eq!(got[k].n_samples(), ns * l, "{k}");
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{k}: {x} vs {y}");
            }
        }
    }
}
