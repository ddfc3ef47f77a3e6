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
//!    quantizers installed on every decoder linear (after the online Hadamard on `down_proj`).
//!
//! The rotated, unquantized model computes the same function as the original up to f32 rounding.
//! R3 (Q/K Hadamard after RoPE, for KV-cache quantization) is not implemented here.

use crate::config::Arch;
use crate::error::{Error, Result};
use crate::linear::{ActQuant, Linear};
use crate::llama::{Model, LAYER_LINEARS};
use lowbit_calibration::actquant::{ActFormat, ActQuantizer};
use lowbit_calibration::hadamard::Hadamard;
use lowbit_calibration::quarot::quarot_rotations;
use lowbit_calibration::rotation::{rotate_output_side, rotate_rows, rotate_rows_blockwise};
use lowbit_calibration::spinquant::{spinquant_optimise, SpinConfig, SpinProblem, SpinReport};
use lowbit_calibration::{gptq, Clipping, GptqConfig, HessianAccumulator, RtnConfig};
use lowbit_numerics::Scheme;
use std::sync::Arc;
use std::time::Instant;

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
/// a per-channel weight and no bias/offset: every architecture this crate runs).
pub fn norms_foldable(arch: Arch) -> bool {
    match arch {
        Arch::Llama | Arch::Mistral | Arch::Qwen2 => true,
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
            // v_proj rows of each KV head: W_head ← R2ᵀ W_head; bias per head b ← b R2.
            let mut w = layer.v_proj.weight_f32().to_vec();
            for blk in w.chunks_exact_mut(hd * h) {
                rotate_output_side(blk, h, r2, hd)?;
            }
            layer.v_proj.set_dense(w)?;
            if let Some(b) = &mut layer.v_proj.bias {
                rotate_rows_blockwise(b, c.kv_dim(), r2, hd)?;
            }
            // o_proj columns of each query head: W[:, head] ← W[:, head] R2.
            let mut w = layer.o_proj.weight_f32().to_vec();
            rotate_rows_blockwise(&mut w, c.q_dim(), r2, hd)?;
            layer.o_proj.set_dense(w)?;
        }
        if let Some(hm) = &had {
            let mut w = layer.down_proj.weight_f32().to_vec();
            hm.apply_rows(&mut w)?;
            layer.down_proj.set_dense(w)?;
        }
    }
    Ok(had)
}

/// Install the forward-pass hooks on every decoder linear: the online Hadamard on
/// `down_proj`'s input (when `r4` is given) followed by the activation quantizer (when given).
/// Replaces any previous hook. A quantizer error (a NaN input) leaves the rows unquantized; the
/// NaN then shows in the logits.
pub fn install_hooks(model: &mut Model, act: Option<&ActQuantizer>, r4: Option<Arc<Hadamard>>) {
    for layer in &mut model.layers {
        for name in LAYER_LINEARS {
            let l = layer.linear_mut(name).expect("known name");
            let inp = l.inp;
            let q = act.cloned();
            let hm = if name == "mlp.down_proj" {
                r4.clone()
            } else {
                None
            };
            l.act_quant = if q.is_none() && hm.is_none() {
                None
            } else {
                let f: ActQuant = Box::new(move |x: &mut [f32], n: usize| {
                    if let Some(hm) = &hm {
                        let _ = hm.apply_rows(x);
                    }
                    if let Some(q) = &q {
                        let _ = q.apply(x, n, inp);
                    }
                });
                Some(f)
            };
        }
    }
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
}

impl Default for SpinOptions {
    /// 40 R1 iterations (20 for R2) on 8 layer sites x 64 tokens per step, initial step 0.2:
    /// the setting measured in docs/benchmarks.md ("Rotations and activation quantization").
    fn default() -> Self {
        SpinOptions {
            iters: 40,
            lr: 0.2,
            tokens_per_layer: 256,
            tokens_per_iter: 64,
            problems_per_iter: 8,
            seed: 0,
            weights_in_loop: true,
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
    let t0 = Instant::now();
    let (h, hd) = (model.config.hidden_size, model.config.head_dim);
    let mut r4 = None;
    if opts.rotate != RotateMethod::None {
        progress("folding norms");
        fold_norms(model)?;
        let (r1, r2) = match opts.rotate {
            RotateMethod::Quarot => {
                let q = quarot_rotations(h, hd, opts.seed)?;
                (q.r1, q.r2)
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
                progress("SpinQuant: capturing calibration activations and optimising R1/R2");
                let spin = SpinOptions {
                    seed: opts.seed,
                    ..opts.spin.clone()
                };
                let (r1, r2, a, b) = spinquant_rotations(model, samples, &ws, &act, &spin)?;
                rep.spin_r1 = Some(a);
                rep.spin_r2 = Some(b);
                (r1, r2)
            }
        };
        progress("applying rotations");
        r4 = apply_rotations(model, &r1, Some(&r2), true)?;
    }
    rep.rotate_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    if let Some((ws, act)) = &opts.scheme.quant {
        match opts.weight_method {
            WeightMethod::Rtn => {
                progress("RTN weights");
                quantize_weights_rtn(model, ws, opts.weight_clipping)?;
                install_hooks(model, Some(act), r4);
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
        install_hooks(model, None, r4);
    }
    rep.quantize_seconds = t1.elapsed().as_secs_f64();
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
    /// The activation quantizer on every decoder linear's input, if any.
    pub act: Option<ActQuantizer>,
    /// Size of the online Hadamard applied to `down_proj`'s input (the FFN width), if any.
    pub online_hadamard: Option<usize>,
}

impl RotationSidecar {
    /// The sidecar of a model prepared with `opts` ([`prepare`]).
    pub fn new(model: &Model, opts: &PrepareOptions) -> Self {
        RotationSidecar {
            rotate: opts.rotate,
            wa_scheme: opts.scheme.name.clone(),
            act: opts.scheme.quant.as_ref().map(|(_, a)| a.clone()),
            online_hadamard: (opts.rotate != RotateMethod::None)
                .then_some(model.config.intermediate_size),
        }
    }

    /// JSON form.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "rotate": self.rotate.name(),
            "wa_scheme": self.wa_scheme,
            "activations": self.act.as_ref().map(|a| serde_json::json!({
                "format": a.format.name(),
                "strategy": if a.static_scale.is_some() { "tensor" } else { "token" },
                "clip": a.clip,
                "static_scale": a.static_scale,
            })),
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
        install_hooks(model, self.act.as_ref(), had);
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
/// quantized (rotated) weights, the untied f32 head, and the [`ROTATION_FILE`] sidecar that
/// [`crate::quantize::load_ct_model`] reads back to install the online Hadamard and the
/// activation quantizers. `w8a8-int8` also sets the standard `input_activations` (per-token
/// INT8); the 4-bit activation formats have no compressed-tensors field, so other readers see
/// only the weights (and would need the Hadamard on `down_proj`'s input for rotated models).
pub fn rotated_checkpoint(
    model: &Model,
    opts: &PrepareOptions,
    extra_files: Vec<(String, Vec<u8>)>,
) -> Result<crate::ct::Checkpoint> {
    use crate::ct::ActivationQuant;
    let input_activations = match &opts.scheme.quant {
        Some((_, a)) if a.format == (ActFormat::Int { bits: 8 }) && a.clip == 1.0 => {
            Some(ActivationQuant::Int8PerToken)
        }
        _ => None,
    };
    let side = RotationSidecar::new(model, opts).to_json();
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
