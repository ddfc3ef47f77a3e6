//! Rotations applied to a [`Model`] (QuaRot / SpinQuant) and activation quantization in its
//! forward pass. See `docs/rotations.md` for the math.
//!
//! Order of operations ([`prepare`]):
//! 1. [`fold_norms`]: every RMSNorm weight is folded into the linears that read it (q/k/v,
//!    gate/up, the LM head, which is untied from the embedding), norm weights become 1;
//! 2. R1 (residual stream) is folded into the embedding, every input projection (`W ← W R1`),
//!    every output projection (`W ← R1ᵀ W`) and the head; R2 (per head, V → O) into `v_proj`
//!    rows and `o_proj` columns; R4 (Hadamard of the FFN width) into `down_proj` columns with the
//!    matching transform run online on `down_proj`'s input;
//! 3. weights quantized (RTN or GPTQ, in the rotated basis), then per-token activation
//!    quantizers installed on every decoder linear (after the online Hadamard on `down_proj`);
//! 4. optionally ([`PrepareOptions::act_static`]), per-tensor static activation scales, one per
//!    decoder linear, calibrated layer by layer on the calibration windows through the rotated,
//!    weight-quantized model ([`calibrate_static_act_scales`]) and installed instead.
//!
//! The rotated, unquantized model computes the same function as the original up to f32 rounding.
//! R3 (Q/K Hadamard after RoPE, for KV-cache quantization) is not implemented here.

use crate::config::{Arch, ModelConfig};
use crate::error::{Error, Result};
use crate::linear::{ActQuant, Linear};
use crate::llama::{Layer, Model, LAYER_LINEARS};
use lowbit_calibration::actquant::{calibrate_static_scale, ActFormat, ActQuantizer, StaticCalib};
use lowbit_calibration::hadamard::Hadamard;
use lowbit_calibration::quarot::quarot_rotations;
use lowbit_calibration::rotation::{rotate_output_side, rotate_rows, rotate_rows_blockwise};
use lowbit_calibration::spinquant::{spinquant_optimise, SpinConfig, SpinProblem, SpinReport};
use lowbit_calibration::{gptq, Clipping, GptqConfig, HessianAccumulator, RtnConfig};
use lowbit_numerics::Scheme;
use std::sync::Arc;
use std::time::Instant;

pub mod e2e;

/// Which rotation to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotateMethod {
    /// No rotation.
    None,
    /// QuaRot: randomized Hadamard R1/R2, Hadamard R4 online.
    Quarot,
    /// SpinQuant: R1/R2 learned by Cayley SGD (from QuaRot's), Hadamard R4 online.
    Spinquant,
}

impl RotateMethod {
    /// Parse `none`, `quarot`, `spinquant`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(RotateMethod::None),
            "quarot" => Ok(RotateMethod::Quarot),
            "spinquant" => Ok(RotateMethod::Spinquant),
            _ => Err(Error::Quantize(format!(
                "unknown rotation `{s}`; choose none, quarot or spinquant"
            ))),
        }
    }

    /// The name.
    pub fn name(self) -> &'static str {
        match self {
            RotateMethod::None => "none",
            RotateMethod::Quarot => "quarot",
            RotateMethod::Spinquant => "spinquant",
        }
    }
}

/// Weight + activation scheme names handled here.
pub const WA_SCHEMES: [&str; 6] = [
    "f32",
    "w4a4-int",
    "w4a8-int",
    "w8a8-int8",
    "w4a4-nvfp4",
    "w4a4-mxfp4",
];

/// A weight scheme plus an activation quantizer (`None` for `f32`: nothing quantized).
#[derive(Debug, Clone)]
pub struct WaScheme {
    /// The name (one of [`WA_SCHEMES`]).
    pub name: String,
    /// Weight scheme and activation quantizer; `None` = unquantized.
    pub quant: Option<(Scheme, ActQuantizer)>,
}

/// Parse one of [`WA_SCHEMES`]; `act_clip` is the per-token clipping ratio (1 = none).
pub fn parse_wa_scheme(name: &str, act_clip: f32) -> Result<WaScheme> {
    let l = name.trim().to_ascii_lowercase();
    let (w, a) = match l.as_str() {
        "f32" | "none" => {
            return Ok(WaScheme {
                name: "f32".into(),
                quant: None,
            })
        }
        "w4a4-int" => ("int4-g128-sym", ActFormat::Int { bits: 4 }),
        "w4a8-int" => ("int4-g128-sym", ActFormat::Int { bits: 8 }),
        "w8a8-int8" => ("int8-pc", ActFormat::Int { bits: 8 }),
        "w4a4-nvfp4" => ("nvfp4", ActFormat::Nvfp4),
        "w4a4-mxfp4" => ("mxfp4", ActFormat::Mxfp4),
        _ => {
            return Err(Error::Quantize(format!(
                "unknown weight+activation scheme `{name}`; choose one of {}",
                WA_SCHEMES.join(", ")
            )))
        }
    };
    let act = ActQuantizer {
        clip: act_clip,
        ..ActQuantizer::per_token(a)
    };
    act.validate()?;
    Ok(WaScheme {
        name: l,
        quant: Some((Scheme::from_name(w)?, act)),
    })
}

/// Whether this architecture's norms can be folded into the following linears (RMSNorm with
/// a per-channel weight and no bias/offset). Not Gemma-3: its post-attention/post-MLP norms sit
/// between the output projections and the residual stream, so a rotation of the residual
/// stream does not commute with them.
pub fn norms_foldable(arch: Arch) -> bool {
    match arch {
        Arch::Llama | Arch::Mistral | Arch::Qwen2 => true,
        Arch::Gemma3(_) => false,
    }
}

fn dense_weight(l: &Linear, name: &str) -> Result<Vec<f32>> {
    if l.is_quantized() {
        return Err(Error::Quantize(format!(
            "{name} is already quantized: rotations must be applied to the unquantized model \
             (rotate first, then quantize)"
        )));
    }
    Ok(l.weight_f32().to_vec())
}

fn scale_columns(w: &mut [f32], cols: usize, g: &[f32]) {
    for row in w.chunks_exact_mut(cols) {
        row.iter_mut().zip(g).for_each(|(v, s)| *v *= s);
    }
}

/// Fold every RMSNorm weight into the linears that read the normalised stream (q/k/v, gate/up,
/// head) and set the norm weights to 1. A tied head is untied into a dense `lm_head`
/// (`E · diag(final norm)`). Same function, up to f32 rounding. Errors: quantized linears, an
/// architecture whose norms cannot be folded.
pub fn fold_norms(model: &mut Model) -> Result<()> {
    if !norms_foldable(model.config.arch) {
        return Err(Error::Quantize(format!(
            "cannot fold the norms of architecture {:?} into its linears; rotations need \
             RMSNorm without bias",
            model.config.arch
        )));
    }
    for name in model.linear_names() {
        let l = model.linear(&name).expect("listed");
        dense_weight(l, &name)?;
    }
    let h = model.config.hidden_size;
    for layer in &mut model.layers {
        let an = std::mem::replace(&mut layer.attn_norm, vec![1.0; h]);
        for l in [&mut layer.q_proj, &mut layer.k_proj, &mut layer.v_proj] {
            let mut w = l.weight_f32().to_vec();
            scale_columns(&mut w, h, &an);
            l.set_dense(w)?;
        }
        let mn = std::mem::replace(&mut layer.mlp_norm, vec![1.0; h]);
        for l in [&mut layer.gate_proj, &mut layer.up_proj] {
            let mut w = l.weight_f32().to_vec();
            scale_columns(&mut w, h, &mn);
            l.set_dense(w)?;
        }
    }
    let fnorm = std::mem::replace(&mut model.norm, vec![1.0; h]);
    let mut head = match &model.lm_head {
        Some(l) => l.weight_f32().to_vec(),
        None => model.embed.clone(),
    };
    scale_columns(&mut head, h, &fnorm);
    let bias = model.lm_head.as_ref().and_then(|l| l.bias.clone());
    let mut lin = Linear::dense(head, model.config.vocab_size, h)?;
    if let Some(b) = bias {
        lin = lin.with_bias(b)?;
    }
    model.lm_head = Some(lin);
    model.config.tie_embeddings = false;
    Ok(())
}

/// Fold a per-head rotation `R2` (`head_dim²`) between a layer's V and O projections:
/// v_proj rows of each KV head `W_head ← R2ᵀ W_head` (bias per head `b ← b R2`), o_proj columns
/// of each query head `W[:, head] ← W[:, head] R2`; the layer computes the same function.
pub(crate) fn apply_r2(layer: &mut Layer, c: &ModelConfig, r2: &[f32]) -> Result<()> {
    let (h, hd) = (c.hidden_size, c.head_dim);
    let mut w = layer.v_proj.weight_f32().to_vec();
    for blk in w.chunks_exact_mut(hd * h) {
        rotate_output_side(blk, h, r2, hd)?;
    }
    layer.v_proj.set_dense(w)?;
    if let Some(b) = &mut layer.v_proj.bias {
        rotate_rows_blockwise(b, c.kv_dim(), r2, hd)?;
    }
    let mut w = layer.o_proj.weight_f32().to_vec();
    rotate_rows_blockwise(&mut w, c.q_dim(), r2, hd)?;
    layer.o_proj.set_dense(w)
}

/// Fold R1 (`hidden × hidden`), optionally R2 (`head_dim × head_dim`), and optionally the R4
/// Hadamard (returned; install it online with [`install_hooks`]) into a model whose norms are
/// folded ([`fold_norms`]). Errors on unfolded norms, quantized weights, wrong sizes and
/// unsupported Hadamard sizes (naming the size).
pub fn apply_rotations(
    model: &mut Model,
    r1: &[f32],
    r2: Option<&[f32]>,
    r4: bool,
) -> Result<Option<Arc<Hadamard>>> {
    let c = model.config.clone();
    let (h, hd, f) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let folded = model.lm_head.is_some()
        && model.norm.iter().all(|&v| v == 1.0)
        && model
            .layers
            .iter()
            .all(|l| l.attn_norm.iter().chain(&l.mlp_norm).all(|&v| v == 1.0));
    if !folded {
        return Err(Error::Quantize(
            "apply_rotations needs a model whose norms are folded (call fold_norms first)".into(),
        ));
    }
    if r1.len() != h * h || r2.is_some_and(|r| r.len() != hd * hd) {
        return Err(Error::Shape(format!(
            "R1 must be {h} x {h} and R2 {hd} x {hd}"
        )));
    }
    for name in model.linear_names() {
        dense_weight(model.linear(&name).expect("listed"), &name)?;
    }
    let had = if r4 {
        Some(Arc::new(Hadamard::new(f).map_err(|e| {
            Error::Quantize(format!(
                "online Hadamard before down_proj (FFN width {f}): {e}"
            ))
        })?))
    } else {
        None
    };
    rotate_rows(&mut model.embed, c.vocab_size, r1, h)?;
    {
        let head = model.lm_head.as_mut().expect("folded");
        let mut w = head.weight_f32().to_vec();
        rotate_rows(&mut w, c.vocab_size, r1, h)?;
        head.set_dense(w)?;
    }
    for layer in &mut model.layers {
        for l in [
            &mut layer.q_proj,
            &mut layer.k_proj,
            &mut layer.v_proj,
            &mut layer.gate_proj,
            &mut layer.up_proj,
        ] {
            let mut w = l.weight_f32().to_vec();
            rotate_rows(&mut w, l.out, r1, h)?;
            l.set_dense(w)?;
        }
        for l in [&mut layer.o_proj, &mut layer.down_proj] {
            let mut w = l.weight_f32().to_vec();
            rotate_output_side(&mut w, l.inp, r1, h)?;
            l.set_dense(w)?;
            if let Some(b) = &mut l.bias {
                rotate_rows(b, 1, r1, h)?;
            }
        }
        if let Some(r2) = r2 {
            apply_r2(layer, &c, r2)?;
        }
        if let Some(hm) = &had {
            let mut w = layer.down_proj.weight_f32().to_vec();
            hm.apply_rows(&mut w)?;
            layer.down_proj.set_dense(w)?;
        }
    }
    Ok(had)
}

fn hook(q: Option<ActQuantizer>, hm: Option<Arc<Hadamard>>, inp: usize) -> Option<ActQuant> {
    if q.is_none() && hm.is_none() {
        return None;
    }
    let f: ActQuant = Box::new(move |x: &mut [f32], n: usize| {
        if let Some(hm) = &hm {
            let _ = hm.apply_rows(x);
        }
        if let Some(q) = &q {
            let _ = q.apply(x, n, inp);
        }
    });
    Some(f)
}

/// Install one layer's hooks: `act(i)` is the quantizer of `LAYER_LINEARS[i]`.
fn install_layer_hooks(
    layer: &mut Layer,
    act: &dyn Fn(usize) -> Option<ActQuantizer>,
    r4: Option<&Arc<Hadamard>>,
) {
    for (i, name) in LAYER_LINEARS.iter().enumerate() {
        let l = layer.linear_mut(name).expect("known name");
        let hm = if *name == "mlp.down_proj" {
            r4.cloned()
        } else {
            None
        };
        l.act_quant = hook(act(i), hm, l.inp);
    }
}

/// Install the forward-pass hooks on every decoder linear: the online Hadamard on
/// `down_proj`'s input (when `r4` is given) followed by the activation quantizer (when given).
/// Replaces any previous hook. A quantizer error (a NaN input) leaves the rows unquantized; the
/// NaN then shows in the logits.
pub fn install_hooks(model: &mut Model, act: Option<&ActQuantizer>, r4: Option<Arc<Hadamard>>) {
    for layer in &mut model.layers {
        install_layer_hooks(layer, &|_| act.cloned(), r4.as_ref());
    }
}

/// Per-linear static activation scales: `scales[layer][i]` is the per-tensor scale of the
/// input of `LAYER_LINEARS[i]` in that layer (after the online Hadamard for `down_proj`).
pub type StaticScales = Vec<Vec<f32>>;

fn check_static(act: &ActQuantizer, scales: &[Vec<f32>], n_layers: usize) -> Result<()> {
    if scales.len() != n_layers || scales.iter().any(|l| l.len() != LAYER_LINEARS.len()) {
        return Err(Error::Quantize(format!(
            "static activation scales: expected {n_layers} layers x {} linears",
            LAYER_LINEARS.len()
        )));
    }
    for (li, l) in scales.iter().enumerate() {
        for (i, &s) in l.iter().enumerate() {
            ActQuantizer {
                static_scale: Some(s),
                ..act.clone()
            }
            .validate()
            .map_err(|e| {
                Error::Quantize(format!(
                    "static activation scale of layer {li} {}: {e}",
                    LAYER_LINEARS[i]
                ))
            })?;
        }
    }
    Ok(())
}

/// Install per-linear static activation quantizers (`act` with each linear's own scale from
/// `scales`, see [`StaticScales`]) after the online Hadamard `r4` on `down_proj`. Errors on a
/// wrong number of layers / linears, or a scale `act`'s format cannot take (NVFP4 / MXFP4,
/// non-positive).
pub fn install_static_hooks(
    model: &mut Model,
    act: &ActQuantizer,
    scales: &[Vec<f32>],
    r4: Option<Arc<Hadamard>>,
) -> Result<()> {
    check_static(act, scales, model.layers.len())?;
    for (layer, sc) in model.layers.iter_mut().zip(scales) {
        install_layer_hooks(
            layer,
            &|i| {
                Some(ActQuantizer {
                    static_scale: Some(sc[i]),
                    ..act.clone()
                })
            },
            r4.as_ref(),
        );
    }
    Ok(())
}

/// Reject static activation settings that cannot work, before any expensive step.
fn check_static_request(act: &ActQuantizer) -> Result<()> {
    if matches!(act.format, ActFormat::Nvfp4 | ActFormat::Mxfp4) {
        return Err(Error::Quantize(format!(
            "static per-tensor activation scales are not supported for {} activations (a block \
             format with its own per-block scales); use a per-token scheme or w4a8-int / \
             w8a8-int8 / w4a4-int",
            act.format.name()
        )));
    }
    if act.clip != 1.0 {
        return Err(Error::Quantize(format!(
            "activation clip ratio {} applies to per-token dynamic scales; static scales are \
             clipped by their calibration (percentile:P or mse)",
            act.clip
        )));
    }
    Ok(())
}

/// Calibrate one static activation scale per decoder linear (`how`: absmax, percentile, MSE over
/// every value of the linear's calibration inputs) and install the static quantizers, layer by
/// layer: layer `l`'s inputs are recorded by running `samples` through the model as it is (the
/// weights already quantized, layers `< l` already with their static quantizers, layer `l`
/// with only the online Hadamard), its scales computed with [`calibrate_static_scale`] and
/// installed, and the calibration hidden states propagated through the now fully quantized
/// layer. q/k/v share their input, hence their scale; so do gate/up. Returns the scales.
/// `samples` are calibration windows (never the evaluation text).
pub fn calibrate_static_act_scales(
    model: &mut Model,
    act: &ActQuantizer,
    how: StaticCalib,
    samples: &[Vec<u32>],
    r4: Option<Arc<Hadamard>>,
    on_layer: &mut dyn FnMut(usize, usize),
) -> Result<StaticScales> {
    check_static_request(act)?;
    if samples.is_empty() {
        return Err(Error::Quantize(
            "static activation scales need calibration windows (--calib FILE, never the \
             evaluation text)"
                .into(),
        ));
    }
    let seqlen = samples[0].len();
    let mut hidden: Vec<Vec<f32>> = samples
        .iter()
        .map(|s| model.embed(s))
        .collect::<Result<_>>()?;
    let n_layers = model.layers.len();
    let mut all = Vec::with_capacity(n_layers);
    for li in 0..n_layers {
        on_layer(li, n_layers);
        install_layer_hooks(&mut model.layers[li], &|_| None, r4.as_ref());
        let mut rec: std::collections::BTreeMap<&'static str, Vec<f32>> = Default::default();
        let mut hs_copy = hidden.clone();
        capture_layer(
            model,
            li,
            &mut hs_copy,
            seqlen,
            r4.as_deref(),
            &mut |name, x, _| {
                if let Some(k) = [
                    "self_attn.q_proj",
                    "self_attn.o_proj",
                    "mlp.gate_proj",
                    "mlp.down_proj",
                ]
                .into_iter()
                .find(|k| *k == name)
                {
                    rec.entry(k).or_default().extend_from_slice(x);
                }
            },
        )?;
        drop(hs_copy);
        let mut site_scale = std::collections::BTreeMap::new();
        for (k, x) in &rec {
            let s = calibrate_static_scale(x, act.format, how)
                .map_err(|e| Error::Quantize(format!("layer {li} {k} static scale: {e}")))?;
            site_scale.insert(*k, s);
        }
        drop(rec);
        let mut scales = Vec::with_capacity(LAYER_LINEARS.len());
        for name in LAYER_LINEARS {
            let key = match name {
                "self_attn.k_proj" | "self_attn.v_proj" => "self_attn.q_proj",
                "mlp.up_proj" => "mlp.gate_proj",
                k => k,
            };
            scales.push(*site_scale.get(key).ok_or_else(|| {
                Error::Quantize(format!("layer {li}: no calibration inputs for {key}"))
            })?);
        }
        check_static(act, std::slice::from_ref(&scales), 1)?;
        let sc = scales.clone();
        install_layer_hooks(
            &mut model.layers[li],
            &|i| {
                Some(ActQuantizer {
                    static_scale: Some(sc[i]),
                    ..act.clone()
                })
            },
            r4.as_ref(),
        );
        for hs in hidden.iter_mut() {
            let mut cache = model.new_cache("f32")?;
            model.layer_forward(li, hs, seqlen, cache.as_mut())?;
        }
        all.push(scales);
    }
    Ok(all)
}

/// How the weights are quantized after the rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightMethod {
    /// Round to nearest (absmax).
    Rtn,
    /// GPTQ (damp 0.01, block 128, static act-order) with Hessians of the rotated inputs.
    Gptq,
}

impl WeightMethod {
    /// Parse `rtn` / `gptq`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "rtn" => Ok(WeightMethod::Rtn),
            "gptq" => Ok(WeightMethod::Gptq),
            _ => Err(Error::Quantize(format!(
                "unknown weight method `{s}`; choose rtn or gptq"
            ))),
        }
    }
}

/// Parse a weight clipping mode: `absmax` (scale from the group's max) or `mse` (QuaRot's
/// `w_clip`: the scale shrunk over a grid of 20 ratios down to 0.5, the one with the least
/// squared rounding error kept, per group).
pub fn parse_weight_clip(s: &str) -> Result<Clipping> {
    match s.trim().to_ascii_lowercase().as_str() {
        "absmax" | "none" => Ok(Clipping::AbsMax),
        "mse" => Ok(Clipping::Mse {
            grid: 20,
            min_ratio: 0.5,
        }),
        _ => Err(Error::Quantize(format!(
            "unknown weight clipping `{s}`; choose absmax or mse"
        ))),
    }
}

/// RTN-quantize every decoder linear with `scheme` (block scales by `clipping`).
pub fn quantize_weights_rtn(model: &mut Model, scheme: &Scheme, clipping: Clipping) -> Result<()> {
    for layer in &mut model.layers {
        for name in LAYER_LINEARS {
            let l = layer.linear_mut(name).expect("known name");
            let q = lowbit_calibration::rtn(
                l.weight_f32(),
                l.out,
                l.inp,
                scheme,
                &RtnConfig { clipping },
            )?;
            l.set_quantized(q, |q| Ok(q.dequantize()?))?;
        }
    }
    Ok(())
}

fn capture_layer(
    model: &Model,
    li: usize,
    hidden: &mut [Vec<f32>],
    seqlen: usize,
    r4: Option<&Hadamard>,
    sink: &mut dyn FnMut(&str, &[f32], usize),
) -> Result<()> {
    for hs in hidden.iter_mut() {
        let mut cache = model.new_cache("f32")?;
        let mut cb = |name: &str, x: &[f32], n: usize| {
            let short = name.rsplit_once("layers.").map_or(name, |(_, r)| r);
            let short = short.split_once('.').map_or(short, |(_, r)| r);
            if short == "mlp.down_proj" {
                if let Some(hm) = r4 {
                    let mut y = x.to_vec();
                    let _ = hm.apply_rows(&mut y);
                    sink(short, &y, n);
                    return;
                }
            }
            sink(short, x, n);
        };
        model.layer_forward_with_capture(li, hs, seqlen, cache.as_mut(), Some(&mut cb))?;
    }
    Ok(())
}

/// GPTQ every decoder linear, layer by layer, on calibration windows `samples`. Hessians are
/// taken over each linear's input as the rotated model computes it (the online Hadamard
/// applied for `down_proj`), before activation quantization; each layer's output for the next
/// layer comes from the already-quantized layer (with the installed hooks).
pub fn quantize_weights_gptq(
    model: &mut Model,
    scheme: &Scheme,
    clipping: Clipping,
    samples: &[Vec<u32>],
    r4: Option<&Hadamard>,
    on_layer: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    if samples.is_empty() {
        return Err(Error::Quantize(
            "GPTQ needs calibration windows (--calib FILE)".into(),
        ));
    }
    let seqlen = samples[0].len();
    let mut hidden: Vec<Vec<f32>> = samples
        .iter()
        .map(|s| model.embed(s))
        .collect::<Result<_>>()?;
    let cfg = GptqConfig {
        clipping,
        ..GptqConfig::default()
    };
    for li in 0..model.layers.len() {
        on_layer(li, model.layers.len());
        let mut accs: std::collections::BTreeMap<String, HessianAccumulator> = Default::default();
        let keys = [
            "self_attn.q_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.down_proj",
        ];
        let mut err = None;
        let mut hs_copy = hidden.clone();
        capture_layer(model, li, &mut hs_copy, seqlen, r4, &mut |name, x, n| {
            if !keys.contains(&name) {
                return;
            }
            let acc = accs
                .entry(name.to_string())
                .or_insert_with(|| HessianAccumulator::new(x.len() / n.max(1)));
            if let Err(e) = acc.add_rows(x, n) {
                err = Some(e);
            }
        })?;
        if let Some(e) = err {
            return Err(e.into());
        }
        let layer = &mut model.layers[li];
        for name in LAYER_LINEARS {
            let key = match name {
                "self_attn.k_proj" | "self_attn.v_proj" => "self_attn.q_proj",
                "mlp.up_proj" => "mlp.gate_proj",
                k => k,
            };
            let acc = accs.get(key).ok_or_else(|| {
                Error::Quantize(format!("layer {li}: no calibration inputs for {key}"))
            })?;
            let l = layer.linear_mut(name).expect("known name");
            let res = gptq(l.weight_f32(), l.out, l.inp, scheme, acc, &cfg)?;
            let deq = res.dequantized;
            l.set_quantized(res.tensor, move |_| Ok(deq))?;
        }
        // Propagate through the quantized layer.
        for hs in hidden.iter_mut() {
            let mut cache = model.new_cache("f32")?;
            model.layer_forward(li, hs, seqlen, cache.as_mut())?;
        }
    }
    Ok(())
}

/// Settings of the SpinQuant optimisation ([`spinquant_rotations`]).
#[derive(Debug, Clone)]
pub struct SpinOptions {
    /// Cayley SGD iterations for R1 (R2 gets half as many).
    pub iters: usize,
    /// Initial step.
    pub lr: f64,
    /// Calibration token rows kept per layer and site.
    pub tokens_per_layer: usize,
    /// Token rows sampled per problem per iteration.
    pub tokens_per_iter: usize,
    /// Problems (layer sites) sampled per iteration (of 2 per layer for R1, 1 for R2).
    pub problems_per_iter: usize,
    /// RNG seed (also QuaRot's initial signs).
    pub seed: u64,
    /// Quantize the weights (RTN, the target scheme) inside the loss while learning; `false`
    /// learns against full-precision weights (SpinQuant's W16 setting).
    pub weights_in_loop: bool,
    /// Calibration windows (the last ones of `samples`) held out of the optimisation, on
    /// which the QuaRot start and the learned rotations are compared end to end: the mean
    /// KL(f32 ‖ quantized) of the next-token distributions of the whole model, weights RTN with
    /// the target scheme, activations quantized. The lower one is kept, so that the learned
    /// rotation never replaces a start that is better on held-out calibration text. 0 = always
    /// keep the learned rotations.
    pub select_windows: usize,
    /// Randomized-Hadamard starts compared on the held-out windows (with
    /// [`SpinOptions::select_windows`] > 0): the seed's own (QuaRot's rotation for that seed)
    /// and `starts - 1` more drawn from the seed ([`spin_start_seed`]). The start with the
    /// lowest held-out KL is refined by Cayley SGD, and the lowest-KL of all candidates (every
    /// start and the refined rotation) is kept. 1 = only the seed's start.
    pub starts: usize,
    /// What R1/R2 are learned on: the per-layer output-error proxy, or the whole network's
    /// loss ([`e2e`]).
    pub loss: SpinLoss,
    /// End-to-end loss only: tokens per training sequence.
    pub seqlen: usize,
    /// End-to-end loss only: sequences per Cayley step.
    pub batch: usize,
}

/// SpinQuant's training loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpinLoss {
    /// Per-layer output error of the quantized linears ([`spinquant_rotations`]).
    Layer,
    /// KL(f32 ‖ rotated quantized model) of the next-token distributions, R1 and one R2 per
    /// layer learned through the whole network ([`e2e::learn`]); one start (the seed's).
    E2e,
}

impl SpinLoss {
    /// Parse `layer` / `e2e`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "layer" => Ok(SpinLoss::Layer),
            "e2e" => Ok(SpinLoss::E2e),
            _ => Err(Error::Quantize(format!(
                "unknown SpinQuant loss `{s}`; choose layer or e2e"
            ))),
        }
    }
}

/// Seed of SpinQuant's `k`-th randomized-Hadamard start for `seed`: `seed` itself for `k = 0`
/// (QuaRot's rotation for that seed), a SplitMix64 hash of `(seed, k)` otherwise (not a shift
/// of the seed: [`lowbit_calibration::rotation::random_signs`] of `seed + c` is the sequence of
/// `seed` shifted by one for SplitMix's increment `c`).
pub fn spin_start_seed(seed: u64, k: usize) -> u64 {
    if k == 0 {
        return seed;
    }
    let mut z = seed ^ (k as u64).wrapping_mul(0xD1B5_4A32_D192_ED03) ^ 0x5A17_5EED_0000_0000;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Default for SpinOptions {
    /// 40 R1 iterations (20 for R2) on 8 layer sites x 64 tokens per step, initial step 0.2,
    /// 3 starts ranked on 6 held-out windows: the setting measured in docs/benchmarks.md
    /// ("Rotations and activation quantization", Session 6).
    fn default() -> Self {
        SpinOptions {
            iters: 40,
            lr: 0.2,
            tokens_per_layer: 256,
            tokens_per_iter: 64,
            problems_per_iter: 8,
            seed: 0,
            weights_in_loop: true,
            select_windows: 6,
            starts: 3,
            loss: SpinLoss::Layer,
            seqlen: 128,
            batch: 2,
        }
    }
}

/// What [`prepare`] did.
#[derive(Debug, Clone, Default)]
pub struct RotateReport {
    /// SpinQuant's R1 optimisation, if run.
    pub spin_r1: Option<SpinReport>,
    /// SpinQuant's R2 optimisation, if run.
    pub spin_r2: Option<SpinReport>,
    /// Seconds spent rotating (folding, optimising, applying).
    pub rotate_seconds: f64,
    /// Seconds spent quantizing weights.
    pub quantize_seconds: f64,
    /// The per-linear static activation scales, when [`PrepareOptions::act_static`] asked
    /// for them.
    pub act_static_scales: Option<StaticScales>,
    /// Seconds spent calibrating static activation scales.
    pub act_static_seconds: f64,
    /// SpinQuant's end-to-end selection on held-out calibration windows, if run.
    pub spin_selection: Option<SpinSelection>,
    /// SpinQuant's end-to-end optimisation ([`SpinLoss::E2e`]), if run.
    pub spin_e2e: Option<e2e::E2eReport>,
}

/// One candidate of SpinQuant's held-out selection ([`SpinOptions::select_windows`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SelectionCandidate {
    /// `quarot` (the start) or `spinquant` (the learned R1/R2).
    pub name: String,
    /// Mean KL(f32 ‖ quantized) over the held-out predicted tokens (nats).
    pub kl: f64,
    /// Mean NLL of the quantized model on the held-out next tokens (nats).
    pub nll: f64,
}

/// What SpinQuant's held-out selection measured and chose.
#[derive(Debug, Clone, PartialEq)]
pub struct SpinSelection {
    /// Every candidate, in the order tried.
    pub candidates: Vec<SelectionCandidate>,
    /// Index of the kept candidate (lowest KL).
    pub chosen: usize,
    /// Held-out windows used.
    pub windows: usize,
    /// Wall time of the selection in seconds.
    pub seconds: f64,
}

fn copy_linear(l: &Linear) -> Result<Linear> {
    let mut n = Linear::dense(l.weight_f32().to_vec(), l.out, l.inp)?;
    if let Some(b) = &l.bias {
        n = n.with_bias(b.clone())?;
    }
    Ok(n)
}

/// A dense copy of `model`'s weights (quantized weights decoded), without hooks.
pub(crate) fn dense_copy(model: &Model) -> Result<Model> {
    let layers = model
        .layers
        .iter()
        .map(|l| {
            Ok(Layer {
                attn_norm: l.attn_norm.clone(),
                q_proj: copy_linear(&l.q_proj)?,
                k_proj: copy_linear(&l.k_proj)?,
                v_proj: copy_linear(&l.v_proj)?,
                o_proj: copy_linear(&l.o_proj)?,
                mlp_norm: l.mlp_norm.clone(),
                gate_proj: copy_linear(&l.gate_proj)?,
                up_proj: copy_linear(&l.up_proj)?,
                down_proj: copy_linear(&l.down_proj)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Model::new(
        model.config.clone(),
        model.embed.clone(),
        layers,
        model.norm.clone(),
        model.lm_head.as_ref().map(copy_linear).transpose()?,
    )
}

pub(crate) fn log_softmax_rows(x: &mut [f32], vocab: usize) {
    for row in x.chunks_exact_mut(vocab) {
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let z: f64 = row.iter().map(|&v| ((v - m) as f64).exp()).sum();
        let lz = m + z.ln() as f32;
        row.iter_mut().for_each(|v| *v -= lz);
    }
}

fn window_log_probs(model: &Model, toks: &[u32]) -> Result<Vec<f32>> {
    let mut cache = model.new_cache("f32")?;
    let mut lp = model.forward(toks, cache.as_mut(), crate::llama::Logits::All)?;
    log_softmax_rows(&mut lp, model.config.vocab_size);
    Ok(lp)
}

/// Compare rotation pairs `(name, R1, R2)` end to end on held-out calibration windows `held`:
/// each candidate is applied to a dense copy of `model` (norms folded, unrotated, f32), its
/// weights RTN-quantized with `ws`, the activation quantizer `act` installed (with the online
/// Hadamard), and the mean KL(f32 ‖ quantized) of its next-token distributions measured
/// against `model`'s own. Returns the selection (lowest KL chosen).
pub fn select_rotations(
    model: &Model,
    candidates: &[(&str, &[f32], &[f32])],
    ws: &Scheme,
    clipping: Clipping,
    act: &ActQuantizer,
    held: &[Vec<u32>],
    progress: &mut dyn FnMut(&str),
) -> Result<SpinSelection> {
    let t0 = Instant::now();
    if held.is_empty() || candidates.is_empty() {
        return Err(Error::Quantize(
            "rotation selection needs held-out windows and candidates".into(),
        ));
    }
    let refs = reference_log_probs(model, held)?;
    let mut out = Vec::new();
    for (name, r1, r2) in candidates {
        progress(&format!(
            "SpinQuant selection: {name} on {} held-out calibration windows",
            held.len()
        ));
        out.push(score_rotation(
            model,
            name,
            r1,
            &[r2.to_vec()],
            ws,
            clipping,
            act,
            held,
            &refs,
        )?);
    }
    let chosen = lowest_kl(&out);
    Ok(SpinSelection {
        candidates: out,
        chosen,
        windows: held.len(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn lowest_kl(c: &[SelectionCandidate]) -> usize {
    c.iter()
        .enumerate()
        .min_by(|a, b| a.1.kl.total_cmp(&b.1.kl))
        .map_or(0, |(i, _)| i)
}

/// The f32 model's next-token log-probabilities on each held-out window.
fn reference_log_probs(model: &Model, held: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
    held.iter().map(|w| window_log_probs(model, w)).collect()
}

/// Apply `(r1, r2)` to a dense copy of `model` (norms folded, unrotated, f32), RTN-quantize its
/// weights with `ws`, install `act` (after the online Hadamard), and measure the mean
/// KL(f32 ‖ quantized) and NLL over the held-out windows against `refs`
/// ([`reference_log_probs`]).
#[allow(clippy::too_many_arguments)]
fn score_rotation(
    model: &Model,
    name: &str,
    r1: &[f32],
    r2: &[Vec<f32>],
    ws: &Scheme,
    clipping: Clipping,
    act: &ActQuantizer,
    held: &[Vec<u32>],
    refs: &[Vec<f32>],
) -> Result<SelectionCandidate> {
    let vocab = model.config.vocab_size;
    let mut m = dense_copy(model)?;
    let r4 = match r2 {
        [one] => apply_rotations(&mut m, r1, Some(one), true)?,
        per_layer => e2e::apply_rotations_per_layer(&mut m, r1, per_layer)?,
    };
    quantize_weights_rtn(&mut m, ws, clipping)?;
    install_hooks(&mut m, Some(act), r4);
    let (mut kl, mut nll, mut n) = (0f64, 0f64, 0usize);
    for (w, rl) in held.iter().zip(refs) {
        let ql = window_log_probs(&m, w)?;
        for (i, (p, q)) in rl
            .chunks_exact(vocab)
            .zip(ql.chunks_exact(vocab))
            .enumerate()
            .take(w.len().saturating_sub(1))
        {
            kl += p
                .iter()
                .zip(q)
                .map(|(&a, &b)| (a as f64).exp() * (a - b) as f64)
                .sum::<f64>();
            nll -= q[w[i + 1] as usize] as f64;
            n += 1;
        }
    }
    let n = n.max(1) as f64;
    Ok(SelectionCandidate {
        name: name.to_string(),
        kl: kl / n,
        nll: nll / n,
    })
}

/// SpinQuant as [`prepare`] runs it: the last [`SpinOptions::select_windows`] of `samples` are
/// held out. Without held-out windows, R1/R2 are learned from the seed's randomized Hadamard
/// and kept. With them: [`SpinOptions::starts`] randomized Hadamards ([`spin_start_seed`]) are
/// scored end to end on the held-out windows ([`score_rotation`]: RTN weights, quantized
/// activations, KL to f32), the best start is refined by Cayley SGD on the other windows
/// ([`spinquant_rotations`]), the refined pair is scored the same way, and the candidate with
/// the lowest KL is returned (recorded in `rep.spin_selection`). Only calibration windows are
/// used.
fn spin_search(
    model: &Model,
    opts: &PrepareOptions,
    ws: &Scheme,
    act: &ActQuantizer,
    samples: &[Vec<u32>],
    rep: &mut RotateReport,
    progress: &mut dyn FnMut(&str),
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (h, hd) = (model.config.hidden_size, model.config.head_dim);
    let sel = opts.spin.select_windows;
    if sel > 0 && samples.len() <= sel {
        return Err(Error::Quantize(format!(
            "SpinQuant holds out {sel} of the calibration windows to choose between its \
             randomized-Hadamard starts and the learned rotations, but there are only {}: draw \
             more (--calib-samples) or turn the selection off (--spin-select 0)",
            samples.len()
        )));
    }
    if opts.spin.starts == 0 {
        return Err(Error::Quantize(
            "SpinQuant needs at least one start (--spin-starts 1 or more)".into(),
        ));
    }
    let (train, held) = samples.split_at(samples.len() - sel);
    let learn = |seed: u64, rep: &mut RotateReport, progress: &mut dyn FnMut(&str)| {
        progress("SpinQuant: capturing calibration activations and optimising R1/R2");
        let spin = SpinOptions {
            seed,
            ..opts.spin.clone()
        };
        let (r1, r2, a, b) = spinquant_rotations(model, train, ws, act, &spin)?;
        rep.spin_r1 = Some(a);
        rep.spin_r2 = Some(b);
        Ok::<_, Error>((r1, r2))
    };
    if held.is_empty() {
        return learn(opts.seed, rep, progress);
    }
    let t0 = Instant::now();
    progress(&format!(
        "SpinQuant: f32 reference on {} held-out calibration windows",
        held.len()
    ));
    let refs = reference_log_probs(model, held)?;
    let mut cands = Vec::new();
    let mut pairs = Vec::new();
    for k in 0..opts.spin.starts {
        let seed = spin_start_seed(opts.seed, k);
        let q = quarot_rotations(h, hd, seed)?;
        let name = if k == 0 {
            "quarot".to_string()
        } else {
            format!("quarot#{k}")
        };
        progress(&format!(
            "SpinQuant selection: start {name} (seed {seed:#x}) on {} held-out windows",
            held.len()
        ));
        cands.push(score_rotation(
            model,
            &name,
            &q.r1,
            std::slice::from_ref(&q.r2),
            ws,
            opts.weight_clipping,
            act,
            held,
            &refs,
        )?);
        pairs.push((q.r1, q.r2));
    }
    let best = lowest_kl(&cands);
    let t_sel = t0.elapsed().as_secs_f64();
    let (r1, r2) = learn(spin_start_seed(opts.seed, best), rep, progress)?;
    let t1 = Instant::now();
    let name = if best == 0 {
        "spinquant".to_string()
    } else {
        format!("spinquant#{best}")
    };
    progress(&format!(
        "SpinQuant selection: {name} on {} held-out windows",
        held.len()
    ));
    cands.push(score_rotation(
        model,
        &name,
        &r1,
        std::slice::from_ref(&r2),
        ws,
        opts.weight_clipping,
        act,
        held,
        &refs,
    )?);
    pairs.push((r1, r2));
    let chosen = lowest_kl(&cands);
    rep.spin_selection = Some(SpinSelection {
        candidates: cands,
        chosen,
        windows: held.len(),
        seconds: t_sel + t1.elapsed().as_secs_f64(),
    });
    Ok(pairs.swap_remove(chosen))
}

fn rows_of(x: &[f32], width: usize, keep: usize) -> (Vec<f32>, usize) {
    let n = x.len() / width;
    if n <= keep {
        return (x.to_vec(), n);
    }
    let mut out = Vec::with_capacity(keep * width);
    for i in 0..keep {
        let r = i * n / keep;
        out.extend_from_slice(&x[r * width..(r + 1) * width]);
    }
    (out, keep)
}

/// Learn R1 and R2 for a model whose norms are folded: capture the normalised residual inputs
/// (attention and MLP sites) and the attention outputs of every layer on `samples`, then run
/// [`spinquant_optimise`] from QuaRot's randomized Hadamards, R1 on the stacked q/k/v and
/// gate/up weights, R2 on `R1ᵀ W_o` (blocks of `head_dim`).
pub fn spinquant_rotations(
    model: &Model,
    samples: &[Vec<u32>],
    weight_scheme: &Scheme,
    act: &ActQuantizer,
    opts: &SpinOptions,
) -> Result<(Vec<f32>, Vec<f32>, SpinReport, SpinReport)> {
    if samples.is_empty() {
        return Err(Error::Quantize(
            "SpinQuant needs calibration windows (--calib FILE)".into(),
        ));
    }
    let c = &model.config;
    let (h, hd) = (c.hidden_size, c.head_dim);
    let init = quarot_rotations(h, hd, opts.seed)?;
    let seqlen = samples[0].len();
    let mut hidden: Vec<Vec<f32>> = samples
        .iter()
        .map(|s| model.embed(s))
        .collect::<Result<_>>()?;
    let mut p1 = Vec::new();
    let mut att_sites = Vec::new();
    for li in 0..model.layers.len() {
        let (mut xa, mut xm, mut xo) = (Vec::new(), Vec::new(), Vec::new());
        capture_layer(
            model,
            li,
            &mut hidden,
            seqlen,
            None,
            &mut |name, x, _| match name {
                "self_attn.q_proj" => xa.extend_from_slice(x),
                "mlp.gate_proj" => xm.extend_from_slice(x),
                "self_attn.o_proj" => xo.extend_from_slice(x),
                _ => {}
            },
        )?;
        let l = &model.layers[li];
        let stack = |ls: &[&Linear]| -> (Vec<f32>, usize) {
            let mut w = Vec::new();
            let mut o = 0;
            for l in ls {
                w.extend_from_slice(l.weight_f32());
                o += l.out;
            }
            (w, o)
        };
        let (wa, oa) = stack(&[&l.q_proj, &l.k_proj, &l.v_proj]);
        let (wm, om) = stack(&[&l.gate_proj, &l.up_proj]);
        let (xa, ta) = rows_of(&xa, h, opts.tokens_per_layer);
        let (xm, tm) = rows_of(&xm, h, opts.tokens_per_layer);
        let (xo, to) = rows_of(&xo, c.q_dim(), opts.tokens_per_layer);
        p1.push(SpinProblem {
            x: xa,
            tokens: ta,
            w: wa,
            out: oa,
            width: h,
        });
        p1.push(SpinProblem {
            x: xm,
            tokens: tm,
            w: wm,
            out: om,
            width: h,
        });
        att_sites.push((xo, to, l.o_proj.weight_f32().to_vec()));
    }
    let cfg = SpinConfig {
        iters: opts.iters,
        lr: opts.lr,
        act: act.clone(),
        weight_scheme: opts.weights_in_loop.then_some(*weight_scheme),
        tokens_per_iter: opts.tokens_per_iter,
        problems_per_iter: opts.problems_per_iter,
        seed: opts.seed,
    };
    let (r1, rep1) = spinquant_optimise(&init.r1, h, &p1, &cfg)?;
    drop(p1);
    let mut p2 = Vec::new();
    for (xo, to, mut wo) in att_sites {
        rotate_output_side(&mut wo, c.q_dim(), &r1, h)?;
        p2.push(SpinProblem {
            x: xo,
            tokens: to,
            w: wo,
            out: h,
            width: c.q_dim(),
        });
    }
    let cfg2 = SpinConfig {
        iters: opts.iters / 2,
        ..cfg
    };
    let (r2, rep2) = spinquant_optimise(&init.r2, hd, &p2, &cfg2)?;
    Ok((r1, r2, rep1, rep2))
}

/// Everything [`prepare`] needs.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Rotation.
    pub rotate: RotateMethod,
    /// Weight + activation scheme.
    pub scheme: WaScheme,
    /// Weight quantization method.
    pub weight_method: WeightMethod,
    /// How weight block scales are chosen (absmax, or QuaRot's MSE clipping search).
    pub weight_clipping: Clipping,
    /// SpinQuant settings.
    pub spin: SpinOptions,
    /// Seed of QuaRot's random signs.
    pub seed: u64,
    /// `Some(how)`: per-tensor static activation scales, one per decoder linear, calibrated on
    /// the calibration windows ([`calibrate_static_act_scales`]) instead of per-token dynamic
    /// ones. INT / FP8 activations only, without per-token clipping.
    pub act_static: Option<StaticCalib>,
}

/// Rotate (fold norms, R1, R2, R4), quantize the weights and install the activation quantizers,
/// in that order. `samples` are calibration windows (needed by GPTQ and SpinQuant).
pub fn prepare(
    model: &mut Model,
    opts: &PrepareOptions,
    samples: &[Vec<u32>],
    progress: &mut dyn FnMut(&str),
) -> Result<RotateReport> {
    let mut rep = RotateReport::default();
    if let Some(how) = opts.act_static {
        let act = match &opts.scheme.quant {
            Some((_, a)) => a,
            None => {
                return Err(Error::Quantize(
                    "static activation scales need a weight+activation scheme (not f32)".into(),
                ))
            }
        };
        check_static_request(act)?;
        if samples.is_empty() {
            return Err(Error::Quantize(format!(
                "static activation scales ({}) need calibration windows (--calib FILE, never \
                 the evaluation text)",
                how.name()
            )));
        }
    }
    let t0 = Instant::now();
    let (h, hd) = (model.config.hidden_size, model.config.head_dim);
    let mut r4 = None;
    if opts.rotate != RotateMethod::None {
        progress("folding norms");
        fold_norms(model)?;
        // R2: one shared by every layer, or one per layer (end-to-end SpinQuant).
        let (r1, r2): (Vec<f32>, Vec<Vec<f32>>) = match opts.rotate {
            RotateMethod::Quarot => {
                let q = quarot_rotations(h, hd, opts.seed)?;
                (q.r1, vec![q.r2])
            }
            _ => {
                let (ws, act) = match &opts.scheme.quant {
                    Some(q) => q.clone(),
                    None => {
                        return Err(Error::Quantize(
                            "SpinQuant optimises against quantizers: choose a quantized scheme"
                                .into(),
                        ))
                    }
                };
                if opts.spin.loss == SpinLoss::E2e {
                    e2e::search(model, opts, &ws, &act, samples, &mut rep, progress)?
                } else {
                    let (r1, r2) =
                        spin_search(model, opts, &ws, &act, samples, &mut rep, progress)?;
                    (r1, vec![r2])
                }
            }
        };
        progress("applying rotations");
        r4 = match r2.as_slice() {
            [one] => apply_rotations(model, &r1, Some(one), true)?,
            per_layer => e2e::apply_rotations_per_layer(model, &r1, per_layer)?,
        };
    }
    rep.rotate_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    if let Some((ws, act)) = &opts.scheme.quant {
        match opts.weight_method {
            WeightMethod::Rtn => {
                progress("RTN weights");
                quantize_weights_rtn(model, ws, opts.weight_clipping)?;
                install_hooks(model, Some(act), r4.clone());
            }
            WeightMethod::Gptq => {
                // Hooks first, so that each layer's output for the next layer is what the
                // quantized model computes (activation quantization included).
                install_hooks(model, Some(act), r4.clone());
                let mut cb = |i: usize, n: usize| progress(&format!("GPTQ layer {}/{n}", i + 1));
                quantize_weights_gptq(
                    model,
                    ws,
                    opts.weight_clipping,
                    samples,
                    r4.as_deref(),
                    &mut cb,
                )?;
            }
        }
    } else {
        install_hooks(model, None, r4.clone());
    }
    rep.quantize_seconds = t1.elapsed().as_secs_f64();
    if let (Some(how), Some((_, act))) = (opts.act_static, &opts.scheme.quant) {
        let t2 = Instant::now();
        let mut cb = |i: usize, n: usize| {
            progress(&format!(
                "static activation scales ({}): layer {}/{n}",
                how.name(),
                i + 1
            ))
        };
        rep.act_static_scales = Some(calibrate_static_act_scales(
            model, act, how, samples, r4, &mut cb,
        )?);
        rep.act_static_seconds = t2.elapsed().as_secs_f64();
    }
    Ok(rep)
}

/// File name of the rotation sidecar in a checkpoint folder written by `cargo xtask quantize
/// --rotate ...` (or with a W4A4 / W4A8 scheme): what the forward pass needs beyond the stored
/// weights (the rotations themselves are folded into the weights).
pub const ROTATION_FILE: &str = "lowbit-rotation.json";

/// The load-time part of a rotated / activation-quantized checkpoint ([`ROTATION_FILE`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RotationSidecar {
    /// The rotation that was folded into the weights (informational).
    pub rotate: RotateMethod,
    /// The weight + activation scheme name (informational).
    pub wa_scheme: String,
    /// The activation quantizer on every decoder linear's input, if any (with
    /// [`RotationSidecar::act_scales`], the format of the per-linear static quantizers).
    pub act: Option<ActQuantizer>,
    /// How the static scales were calibrated (informational).
    pub act_static: Option<StaticCalib>,
    /// Per-linear static activation scales ([`StaticScales`]), if the activations are static.
    pub act_scales: Option<StaticScales>,
    /// Size of the online Hadamard applied to `down_proj`'s input (the FFN width), if any.
    pub online_hadamard: Option<usize>,
}

impl RotationSidecar {
    /// The sidecar of a model prepared with `opts` ([`prepare`], which returned `rep`).
    pub fn new(model: &Model, opts: &PrepareOptions, rep: &RotateReport) -> Self {
        RotationSidecar {
            rotate: opts.rotate,
            wa_scheme: opts.scheme.name.clone(),
            act: opts.scheme.quant.as_ref().map(|(_, a)| a.clone()),
            act_static: rep.act_static_scales.as_ref().and(opts.act_static),
            act_scales: rep.act_static_scales.clone(),
            online_hadamard: (opts.rotate != RotateMethod::None)
                .then_some(model.config.intermediate_size),
        }
    }

    /// JSON form.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "rotate": self.rotate.name(),
            "wa_scheme": self.wa_scheme,
            "activations": self.act.as_ref().map(|a| {
                let mut o = serde_json::json!({
                    "format": a.format.name(),
                    "strategy": if a.static_scale.is_some() || self.act_scales.is_some() {
                        "tensor"
                    } else {
                        "token"
                    },
                    "clip": a.clip,
                    "static_scale": a.static_scale,
                });
                if let Some(sc) = &self.act_scales {
                    o["static_calibration"] = serde_json::json!(self.act_static.map(|h| h.name()));
                    o["static_scales"] = serde_json::json!({
                        "modules": LAYER_LINEARS,
                        "layers": sc,
                    });
                }
                o
            }),
            "online_hadamard": self.online_hadamard.map(|n| serde_json::json!({
                "modules": ["mlp.down_proj"], "size": n, "normalized": true,
            })),
        })
    }

    /// Parse [`RotationSidecar::to_json`]'s form; anything not understood is an error.
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let bad = |m: &str| Error::Quantize(format!("{ROTATION_FILE}: {m}"));
        let rotate = RotateMethod::parse(
            v.get("rotate")
                .and_then(|x| x.as_str())
                .ok_or_else(|| bad("missing `rotate`"))?,
        )?;
        let wa_scheme = v
            .get("wa_scheme")
            .and_then(|x| x.as_str())
            .unwrap_or("")
            .to_string();
        let mut act_static = None;
        let mut act_scales = None;
        let act = match v.get("activations").filter(|a| !a.is_null()) {
            None => None,
            Some(a) => {
                let format = ActFormat::parse(
                    a.get("format")
                        .and_then(|x| x.as_str())
                        .ok_or_else(|| bad("activations without `format`"))?,
                )
                .map_err(|e| bad(&e.to_string()))?;
                let clip = a.get("clip").and_then(|x| x.as_f64()).unwrap_or(1.0) as f32;
                let static_scale = a
                    .get("static_scale")
                    .and_then(|x| x.as_f64())
                    .map(|x| x as f32);
                let q = ActQuantizer {
                    format,
                    clip,
                    static_scale,
                };
                q.validate().map_err(|e| bad(&e.to_string()))?;
                if let Some(how) = a.get("static_calibration").filter(|h| !h.is_null()) {
                    let how = how
                        .as_str()
                        .ok_or_else(|| bad("`static_calibration` must be a string"))?;
                    act_static = Some(StaticCalib::parse(how).map_err(|e| bad(&e.to_string()))?);
                }
                if let Some(ss) = a.get("static_scales").filter(|h| !h.is_null()) {
                    let mods = ss.get("modules").and_then(|m| m.as_array());
                    let same = mods.is_some_and(|m| {
                        m.len() == LAYER_LINEARS.len()
                            && m.iter()
                                .zip(LAYER_LINEARS)
                                .all(|(a, b)| a.as_str() == Some(b))
                    });
                    if !same {
                        return Err(bad(&format!(
                            "static_scales.modules must be {LAYER_LINEARS:?}"
                        )));
                    }
                    let layers = ss
                        .get("layers")
                        .and_then(|l| l.as_array())
                        .ok_or_else(|| bad("static_scales without `layers`"))?;
                    let mut sc = Vec::with_capacity(layers.len());
                    for (li, l) in layers.iter().enumerate() {
                        let row: Option<Vec<f32>> = l.as_array().and_then(|r| {
                            r.iter()
                                .map(|x| x.as_f64().map(|x| x as f32))
                                .collect::<Option<Vec<f32>>>()
                        });
                        sc.push(row.ok_or_else(|| {
                            bad(&format!(
                                "static_scales.layers[{li}] is not a list of numbers"
                            ))
                        })?);
                    }
                    check_static(&q, &sc, sc.len()).map_err(|e| bad(&e.to_string()))?;
                    act_scales = Some(sc);
                }
                Some(q)
            }
        };
        let online_hadamard = match v.get("online_hadamard").filter(|a| !a.is_null()) {
            None => None,
            Some(h) => {
                let mods = h.get("modules").and_then(|m| m.as_array());
                let only_down =
                    mods.is_some_and(|m| m.len() == 1 && m[0].as_str() == Some("mlp.down_proj"));
                if !only_down || h.get("normalized").and_then(|x| x.as_bool()) != Some(true) {
                    return Err(bad(
                        "only a normalized online Hadamard on mlp.down_proj is supported",
                    ));
                }
                Some(
                    h.get("size")
                        .and_then(|x| x.as_u64())
                        .ok_or_else(|| bad("online_hadamard without `size`"))?
                        as usize,
                )
            }
        };
        Ok(RotationSidecar {
            rotate,
            wa_scheme,
            act,
            act_static,
            act_scales,
            online_hadamard,
        })
    }

    /// Install the sidecar's forward-pass hooks on a loaded model. Errors when the Hadamard
    /// size is not the model's FFN width or has no supported order.
    pub fn install(&self, model: &mut Model) -> Result<()> {
        let had = match self.online_hadamard {
            None => None,
            Some(n) => {
                if n != model.config.intermediate_size {
                    return Err(Error::Quantize(format!(
                        "{ROTATION_FILE}: online Hadamard of size {n} but the model's FFN width \
                         is {}",
                        model.config.intermediate_size
                    )));
                }
                Some(Arc::new(Hadamard::new(n).map_err(|e| {
                    Error::Quantize(format!("{ROTATION_FILE}: online Hadamard: {e}"))
                })?))
            }
        };
        match (&self.act_scales, &self.act) {
            (Some(sc), Some(a)) => install_static_hooks(model, a, sc, had).map_err(|e| {
                Error::Quantize(format!(
                    "{ROTATION_FILE}: {e} (model has {} layers)",
                    model.layers.len()
                ))
            })?,
            _ => install_hooks(model, self.act.as_ref(), had),
        }
        Ok(())
    }
}

/// If `dir` holds a [`ROTATION_FILE`], install its hooks on `model` (loaded from `dir`).
/// Returns whether a sidecar was found.
pub fn install_from_dir(model: &mut Model, dir: &std::path::Path) -> Result<bool> {
    let p = dir.join(ROTATION_FILE);
    if !p.is_file() {
        return Ok(false);
    }
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Quantize(format!("{}: {e}", p.display())))?;
    RotationSidecar::from_json(&v)?.install(model)?;
    Ok(true)
}

/// The compressed-tensors checkpoint of a model prepared with `opts` ([`prepare`]): the
/// quantized (rotated) weights, the untied f32 head, and the [`ROTATION_FILE`] sidecar (with the
/// per-linear static activation scales of `rep`, [`prepare`]'s report, when there are any) that
/// [`crate::quantize::load_ct_model`] reads back to install the online Hadamard and the
/// activation quantizers. `w8a8-int8` also sets the standard `input_activations` (per-token
/// INT8); the 4-bit activation formats have no compressed-tensors field, so other readers see
/// only the weights (and would need the Hadamard on `down_proj`'s input for rotated models).
pub fn rotated_checkpoint(
    model: &Model,
    opts: &PrepareOptions,
    rep: &RotateReport,
    extra_files: Vec<(String, Vec<u8>)>,
) -> Result<crate::ct::Checkpoint> {
    use crate::ct::ActivationQuant;
    if opts.act_static.is_some() && rep.act_static_scales.is_none() {
        return Err(Error::Quantize(
            "static activation scales were asked for but the report holds none (pass the \
             report of prepare)"
                .into(),
        ));
    }
    let input_activations = match &opts.scheme.quant {
        Some((_, a))
            if a.format == (ActFormat::Int { bits: 8 })
                && a.clip == 1.0
                && rep.act_static_scales.is_none() =>
        {
            Some(ActivationQuant::Int8PerToken)
        }
        _ => None,
    };
    let side = RotationSidecar::new(model, opts, rep).to_json();
    let mut extra = extra_files;
    extra.push((
        ROTATION_FILE.to_string(),
        serde_json::to_vec_pretty(&side)
            .map_err(|e| Error::Quantize(format!("{ROTATION_FILE}: {e}")))?,
    ));
    crate::quantize::model_to_checkpoint(
        model,
        &crate::quantize::ModelToCheckpoint {
            input_activations,
            extra_files: extra,
        },
    )
}
