//! The sequential, layer-by-layer loop.
//!
//! All calibration windows are embedded once. For each decoder layer the hidden states of every
//! window enter the layer; the layer's linears are quantized in stages and the *quantized*
//! layer's outputs become the next layer's inputs, so errors of earlier layers are seen (and, by
//! GPTQ, compensated) by later ones. Memory: the hidden states of the windows plus one layer's
//! input statistics (`cols x cols` Hessians); no other layer's activations are kept.
//!
//! Stages (`true_sequential`, the default): `[q, k, v]` (input `rmsnorm(h)`, computed directly),
//! then `[o]` on the attention output of the quantized q/k/v, then `[gate, up]` on the MLP input
//! after the quantized attention block, then `[down]` on the product of the quantized gate/up.
//! Each stage after the first is one capture pass of the layer over every window. With
//! `true_sequential = false` a single capture pass feeds all seven linears (llm-compressor's
//! sequential pipeline), which is about twice as fast.

use super::act_quant_fn;
use super::parse_scheme;
use super::recipe::Recipe;
use crate::ct::ActivationQuant;
use crate::error::{Error, Result};
use crate::llama::{rms_norm, Model};
use lowbit_calibration::sensitivity::relative_output_error_h;
use lowbit_calibration::{
    gptq_prepared, prepare_hessian, rtn, ActOrder, Clipping, GptqConfig, HessianAccumulator,
    RtnConfig,
};
use lowbit_numerics::{QuantizedTensor, Scheme};
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

/// Statistics of one input group.
struct Stats {
    h: HessianAccumulator,
    abs_max: Vec<f32>,
    /// SmoothQuant scales applied after accumulation: the Hessian of the smoothed inputs is
    /// `S⁻¹ H S⁻¹`.
    smooth: Option<Vec<f32>>,
}

impl Stats {
    fn new(cols: usize) -> Self {
        Stats {
            h: HessianAccumulator::new(cols),
            abs_max: vec![0.0; cols],
            smooth: None,
        }
    }
    fn add(&mut self, x: &[f32], n: usize) -> Result<()> {
        self.h.add_rows(x, n)?;
        let c = self.abs_max.len();
        for row in x.chunks_exact(c) {
            for (m, v) in self.abs_max.iter_mut().zip(row) {
                *m = m.max(v.abs());
            }
        }
        Ok(())
    }
    fn hessian(&self) -> Result<Vec<f64>> {
        let mut hm = self.h.hessian()?;
        if let Some(s) = &self.smooth {
            let n = s.len();
            for i in 0..n {
                for j in 0..n {
                    hm[i * n + j] /= s[i] as f64 * s[j] as f64;
                }
            }
        }
        Ok(hm)
    }
}

/// Quantize `model` in place with calibration windows `samples` (token ids). Returns the
/// per-layer report; the quantized linears carry their [`QuantizedTensor`]s (and the per-token
/// activation quantizer for W8A8 schemes).
///
/// With [`Method::Rtn`] and no samples, no calibration passes run and errors are not reported.
pub fn quantize_model(
    model: &mut Model,
    samples: &[Vec<u32>],
    opts: &PipelineOptions,
    on_event: &mut dyn FnMut(&Event),
) -> Result<PipelineReport> {
    let t0 = Instant::now();
    opts.recipe.validate()?;
    let needs_calib = opts.method != Method::Rtn && opts.method != Method::Hqq;
    if needs_calib && samples.is_empty() {
        return Err(Error::Quantize(format!(
            "method {} needs calibration data (--calib FILE)",
            opts.method.name()
        )));
    }
    match opts.method {
        Method::Awq | Method::Hqq => {
            return Err(Error::Quantize(format!(
                "method {} is not available in this build yet (lowbit-calibration does not \
                 provide it); use rtn, gptq or smoothquant",
                opts.method.name()
            )))
        }
        _ => {}
    }
    let use_calib = !samples.is_empty();
    let c = model.config.clone();
    let n_layers = c.n_layers;
    let h = c.hidden_size;
    let seqlen = samples.first().map_or(0, |s| s.len());
    if samples.iter().any(|s| s.len() != seqlen || s.is_empty()) {
        return Err(Error::Quantize(
            "calibration windows must be non-empty and of equal length".into(),
        ));
    }
    let mut hidden: Vec<Vec<f32>> = Vec::with_capacity(samples.len());
    for s in samples {
        hidden.push(model.embed(s)?);
    }
    on_event(&Event::Embedded {
        samples: samples.len(),
    });
    let mut layers = Vec::with_capacity(n_layers);
    for li in 0..n_layers {
        let lt = Instant::now();
        on_event(&Event::LayerStart {
            layer: li,
            n_layers,
        });
        // Which modules of this layer are quantized, with which scheme.
        let mut plan: BTreeMap<&'static str, (String, Scheme, Option<ActivationQuant>)> =
            BTreeMap::new();
        for (_, ms) in INPUTS {
            for m in ms {
                let full = format!("model.layers.{li}.{m}");
                if let Some(sname) = opts.recipe.scheme_for(&full, Some(li), n_layers) {
                    let (s, a) = parse_scheme(&sname)?;
                    plan.insert(m, (sname, s, a));
                }
            }
        }
        let stages: Vec<Vec<&'static str>> = if opts.true_sequential {
            INPUTS.iter().map(|(_, ms)| ms.to_vec()).collect()
        } else {
            vec![INPUTS
                .iter()
                .flat_map(|(_, ms)| ms.iter().copied())
                .collect()]
        };
        let mut modules = Vec::new();
        for stage in stages {
            let todo: Vec<&str> = stage
                .iter()
                .copied()
                .filter(|m| plan.contains_key(m))
                .collect();
            if todo.is_empty() {
                continue;
            }
            let mut keys: Vec<&'static str> = todo.iter().map(|m| input_key(m)).collect();
            keys.dedup();
            let mut stats: BTreeMap<&'static str, Stats> = BTreeMap::new();
            if use_calib {
                for &k in &keys {
                    let cols = if k == "down_in" {
                        c.intermediate_size
                    } else if k == "o_in" {
                        c.q_dim()
                    } else {
                        h
                    };
                    stats.insert(k, Stats::new(cols));
                }
                if keys == ["attn_in"] {
                    // q/k/v read rmsnorm(h): no layer pass needed.
                    let norm = &model.layers[li].attn_norm;
                    let mut x = vec![0f32; seqlen * h];
                    for (si, hs) in hidden.iter().enumerate() {
                        rms_norm(hs, norm, c.rms_eps, &mut x);
                        stats
                            .get_mut("attn_in")
                            .expect("inserted")
                            .add(&x, seqlen)?;
                        on_event(&Event::Pass {
                            layer: li,
                            what: "q/k/v inputs",
                            done: si + 1,
                            total: hidden.len(),
                        });
                    }
                } else {
                    let mut err: Option<Error> = None;
                    for (si, hs) in hidden.iter().enumerate() {
                        let mut hcopy = hs.clone();
                        let mut cache = model.new_cache("f32")?;
                        let mut cb = |name: &str, x: &[f32], n: usize| {
                            let short = name.splitn(4, '.').nth(3).unwrap_or("");
                            // q/k/v and gate/up share inputs: take each input once.
                            let k = match short {
                                "self_attn.q_proj" => "attn_in",
                                "self_attn.o_proj" => "o_in",
                                "mlp.gate_proj" => "mlp_in",
                                "mlp.down_proj" => "down_in",
                                _ => return,
                            };
                            if let Some(s) = stats.get_mut(k) {
                                if let Err(e) = s.add(x, n) {
                                    err.get_or_insert(e);
                                }
                            }
                        };
                        model.layer_forward_with_capture(
                            li,
                            &mut hcopy,
                            seqlen,
                            cache.as_mut(),
                            Some(&mut cb),
                        )?;
                        on_event(&Event::Pass {
                            layer: li,
                            what: "capture",
                            done: si + 1,
                            total: hidden.len(),
                        });
                    }
                    if let Some(e) = err {
                        return Err(e);
                    }
                }
            }
            // SmoothQuant: migrate activation outliers into the weights before quantizing.
            if opts.method == Method::SmoothQuant && use_calib {
                for &k in &keys {
                    if k == "attn_in" || k == "mlp_in" {
                        smooth_group(
                            model,
                            li,
                            k,
                            stats.get_mut(k).expect("stats"),
                            opts.smooth_alpha,
                        )?;
                    }
                }
            }
            // Quantize the stage's modules; linears sharing an input share GPTQ's factorization.
            for &k in &keys {
                let hmat = match stats.get(k) {
                    Some(s) => Some(s.hessian()?),
                    None => None,
                };
                let cols = stats.get(k).map_or(0, |s| s.h.cols());
                let prep = match (&hmat, opts.method) {
                    (Some(hm), Method::Gptq | Method::SmoothQuant) => {
                        Some(prepare_hessian(hm, cols, &gptq_cfg(opts, &plan, &todo))?)
                    }
                    _ => None,
                };
                for &m in todo.iter().filter(|m| input_key(m) == k) {
                    let mt = Instant::now();
                    let (sname, scheme, act) = plan[m].clone();
                    let full = format!("model.layers.{li}.{m}");
                    let lin = model.linear_mut(&full).expect("layer linear");
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
                            let mut cfg = gptq_cfg(opts, &plan, &todo);
                            cfg.act_order = p.act_order;
                            let r =
                                gptq_prepared(&w, rows, cols, &scheme, p, &cfg).map_err(|e| {
                                    Error::Quantize(format!("{full}: GPTQ failed: {e}"))
                                })?;
                            (
                                r.tensor,
                                r.dequantized,
                                Some(r.loss),
                                Some(p.rel_damp),
                                p.dead.len(),
                            )
                        }
                        None => {
                            let q = rtn(
                                &w,
                                rows,
                                cols,
                                &scheme,
                                &RtnConfig {
                                    clipping: opts.rtn_clipping,
                                },
                            )
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
                    lin.set_quantized(q, move |_| Ok(deq))?;
                    if let Some(a) = act {
                        lin.act_quant = Some(act_quant_fn(a));
                    }
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
        }
        // Propagate the quantized layer's outputs.
        for (si, hs) in hidden.iter_mut().enumerate() {
            let mut cache = model.new_cache("f32")?;
            model.layer_forward(li, hs, seqlen, cache.as_mut())?;
            on_event(&Event::Pass {
                layer: li,
                what: "propagate",
                done: si + 1,
                total: samples.len(),
            });
        }
        let errs: Vec<f64> = modules.iter().filter_map(|m| m.rel_error).collect();
        let rep = LayerReport {
            layer: li,
            mean_rel_error: (!errs.is_empty())
                .then(|| errs.iter().sum::<f64>() / errs.len() as f64),
            modules,
            secs: lt.elapsed().as_secs_f64(),
        };
        on_event(&Event::LayerDone(rep.clone()));
        layers.push(rep);
    }
    Ok(PipelineReport {
        method: opts.method.name().into(),
        layers,
        calib_tokens: samples.len() * seqlen,
        secs: t0.elapsed().as_secs_f64(),
    })
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

/// SmoothQuant for the linears reading `key` (`attn_in` after `input_layernorm`, `mlp_in` after
/// `post_attention_layernorm`): `s_j = max|X_j|^α / max|W_j|^(1-α)`, the norm weight divided
/// by `s`, the weights' columns multiplied by `s`; the statistics are rescaled to match
/// (`H' = S⁻¹ H S⁻¹`, `max|X'| = max|X| / s`).
fn smooth_group(model: &mut Model, li: usize, key: &str, st: &mut Stats, alpha: f32) -> Result<()> {
    let names: &[&str] = INPUTS.iter().find(|(k, _)| *k == key).expect("key").1;
    let layer = &mut model.layers[li];
    let cols = st.abs_max.len();
    let mut wmax = vec![0f32; cols];
    for n in names {
        let l = layer.linear(n).expect("linear");
        for row in l.weight_f32().chunks_exact(cols) {
            for (m, v) in wmax.iter_mut().zip(row) {
                *m = m.max(v.abs());
            }
        }
    }
    let s: Vec<f32> = st
        .abs_max
        .iter()
        .zip(&wmax)
        .map(|(&a, &w)| {
            let v = a.max(1e-5).powf(alpha) / w.max(1e-5).powf(1.0 - alpha);
            if v.is_finite() && v > 0.0 {
                v
            } else {
                1.0
            }
        })
        .collect();
    let norm = if key == "attn_in" {
        &mut layer.attn_norm
    } else {
        &mut layer.mlp_norm
    };
    for (g, f) in norm.iter_mut().zip(&s) {
        *g /= f;
    }
    for n in names {
        let l = layer.linear_mut(n).expect("linear");
        let mut w = l.weight_f32().to_vec();
        for row in w.chunks_exact_mut(cols) {
            for (x, f) in row.iter_mut().zip(&s) {
                *x *= f;
            }
        }
        l.set_dense(w)?;
    }
    // Rescale the statistics to the smoothed inputs X' = X diag(1/s).
    for (m, f) in st.abs_max.iter_mut().zip(&s) {
        *m /= f;
    }
    st.smooth = Some(s);
    Ok(())
}
