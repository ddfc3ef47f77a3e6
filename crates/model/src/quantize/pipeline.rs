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
    awq, gptq_prepared, hqq, prepare_hessian, rtn, smoothquant_scales, ActOrder, AwqConfig,
    Clipping, GptqConfig, HqqConfig, InputStats, LinearWeight, RtnConfig, SqConfig,
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

/// Statistics of one input group (Gram matrix / Hessian, mean and max |x| per channel).
type Stats = InputStats;

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
        // AWQ folds scales into producers (norms, up_proj rows), which must still be dense:
        // one capture pass per layer, down_proj first (its scales go into up_proj).
        let stages: Vec<Vec<&'static str>> = if opts.method == Method::Awq {
            vec![vec![
                "mlp.down_proj",
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
            ]]
        } else if opts.true_sequential {
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
                            .add_rows(&x, seqlen)?;
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
                                if let Err(e) = s.add_rows(x, n) {
                                    err.get_or_insert(e.into());
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
                if opts.method == Method::Awq && k != "o_in" {
                    if let Some(st) = stats.get(k) {
                        for rep in awq_group(model, li, k, st, &plan, &todo)? {
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
                        None if opts.method == Method::Hqq => {
                            let r = hqq(&w, rows, cols, &scheme, &HqqConfig::default())
                                .map_err(|e| Error::Quantize(format!("{full}: HQQ: {e}")))?;
                            (r.tensor, r.dequantized, None, None, 0)
                        }
                        None => {
                            // AWQ cannot fold o_proj's scales into v_proj under GQA (AutoAWQ
                            // skips it too): plain rounding with an MSE clipping search.
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

/// Names, weights and row counts of a group of linears sharing an input.
type GroupWeights = (Vec<&'static str>, Vec<Vec<f32>>, Vec<usize>);

type Plan = BTreeMap<&'static str, (String, Scheme, Option<ActivationQuant>)>;

/// The linears of `key` that the stage quantizes, their weights and the group's one scheme.
fn group_weights(
    model: &Model,
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
    let layer = &model.layers[li];
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
fn fold_into_producer(model: &mut Model, li: usize, key: &str, s: &[f32]) -> Result<()> {
    let layer = &mut model.layers[li];
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
    model: &mut Model,
    li: usize,
    key: &str,
    st: &Stats,
    plan: &Plan,
    todo: &[&str],
) -> Result<Vec<ModuleReport>> {
    let t = Instant::now();
    let (names, ws, rows) = group_weights(model, li, key, plan, todo)?;
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
    fold_into_producer(model, li, key, &r.scales.scales)?;
    let secs = t.elapsed().as_secs_f64() / names.len() as f64;
    let mut reps = Vec::new();
    for (n, l) in names.iter().zip(r.linears) {
        let full = format!("model.layers.{li}.{n}");
        let lin = model.linear_mut(&full).expect("linear");
        let bpw = l.tensor.bits_per_weight();
        let deq = l.dequantized;
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
fn smooth_group(model: &mut Model, li: usize, key: &str, st: &mut Stats, alpha: f32) -> Result<()> {
    let names: Vec<&'static str> = INPUTS
        .iter()
        .find(|(k, _)| *k == key)
        .expect("key")
        .1
        .to_vec();
    let layer = &model.layers[li];
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
    fold_into_producer(model, li, key, &s)?;
    let cols = s.len();
    for (n, mut w) in names.iter().zip(ws) {
        let l = model.layers[li].linear_mut(n).expect("linear");
        lowbit_calibration::fold::scale_columns(&mut w, l.out, cols, &s)?;
        l.set_dense(w)?;
    }
    st.divide_channels(&s)?;
    Ok(())
}
