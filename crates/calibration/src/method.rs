//! A compact driver over the algorithms: [`Method`] names one with its options, and
//! [`quantize_linear`] / [`quantize_group`] run it on one linear or on a group of linears that
//! share an input.
//!
//! # What the pipeline provides
//! * For every group of linears sharing an input (q/k/v; o; gate/up; down), an [`InputStats`]
//!   fed with the layer inputs of the calibration tokens (`add_rows`, any chunking). With
//!   true-sequential quantization these are the inputs produced by the already-quantized
//!   earlier linears of the layer.
//! * GPTQ: nothing else ([`quantize_group`] prepares the Hessian once per group).
//! * AWQ: nothing else: the output-error objective is evaluated exactly from the Gram matrix
//!   in the stats, and the mean `|x|` per channel from the same pass. The pipeline must fold
//!   `1 / scales` into the producer of the input ([`crate::fold`]: the norm weight for q/k/v
//!   and gate/up, `up_proj`'s rows for down, `v_proj`'s rows for o when there is no GQA;
//!   with GQA skip the v→o group, as AutoAWQ does) and use the returned (scaled-space)
//!   tensors. Clipping is skipped for q/k (their outputs go through a softmax) by passing
//!   `clip = false` for them.
//! * SmoothQuant: the caller folds the scales the same way, then the stats describe the
//!   smoothed inputs after [`InputStats::divide_channels`]; the weights are quantized with
//!   RTN or GPTQ, and the forward pass calls
//!   [`crate::smoothquant::fake_quant_activations_per_token`] on the inputs of every W8A8
//!   linear.
//! * RTN and HQQ need no statistics (they are only used for the error report).

use crate::awq::{awq, AwqConfig, LinearWeight};
use crate::error::{Error, Result};
use crate::gptq::{gptq_prepared, prepare_hessian, GptqConfig};
use crate::hqq::{hqq, HqqConfig};
use crate::rtn::{rtn, RtnConfig};
use crate::smoothquant::{smoothquant_scales, SqConfig};
use crate::stats::InputStats;
use lowbit_numerics::{QuantizedTensor, Scheme};

/// An algorithm and its options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    /// Round to nearest.
    Rtn(RtnConfig),
    /// GPTQ.
    Gptq(GptqConfig),
    /// AWQ (scales + clipping, then RTN).
    Awq(AwqConfig),
    /// SmoothQuant scales, then RTN (or GPTQ with `Some`) of the smoothed weights.
    SmoothQuant(SqConfig, Option<GptqConfig>),
    /// HQQ.
    Hqq(HqqConfig),
}

impl Method {
    /// Parse `rtn`, `gptq`, `awq`, `smoothquant` (`sq`) or `hqq`, with default options.
    pub fn from_name(s: &str) -> Result<Method> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "rtn" => Method::Rtn(RtnConfig::default()),
            "gptq" => Method::Gptq(GptqConfig::default()),
            "awq" => Method::Awq(AwqConfig::default()),
            "smoothquant" | "sq" => Method::SmoothQuant(SqConfig::default(), None),
            "hqq" => Method::Hqq(HqqConfig::default()),
            _ => {
                return Err(Error::Invalid(format!(
                    "unknown method `{s}`; known: rtn, gptq, awq, smoothquant, hqq"
                )))
            }
        })
    }

    /// Short name.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Rtn(_) => "rtn",
            Method::Gptq(_) => "gptq",
            Method::Awq(_) => "awq",
            Method::SmoothQuant(..) => "smoothquant",
            Method::Hqq(_) => "hqq",
        }
    }

    /// Whether the method needs calibration statistics.
    pub fn needs_calibration(&self) -> bool {
        !matches!(self, Method::Rtn(_) | Method::Hqq(_))
    }
}

/// One quantized linear.
#[derive(Debug, Clone)]
pub struct QuantizedLinear {
    /// The quantized weight (for AWQ/SmoothQuant in the scaled space).
    pub tensor: QuantizedTensor,
    /// The same, dequantized, `[out][in]`.
    pub dequantized: Vec<f32>,
    /// GPTQ's loss, when GPTQ ran.
    pub gptq_loss: Option<f64>,
}

/// Result of [`quantize_group`].
#[derive(Debug, Clone)]
pub struct GroupResult {
    /// Input-channel scales the caller must fold (AWQ, SmoothQuant): the returned weights are
    /// `W diag(s)`, the producer of the input must be divided by `s`. `None`: nothing to fold.
    pub scales: Option<Vec<f32>>,
    /// The quantized linears, in the order given.
    pub linears: Vec<QuantizedLinear>,
}

/// Quantize a group of linears that read the same input (`stats.cols()` columns each) with
/// `method`. `clip[i]` enables AWQ's clipping search for linear `i` (ignored otherwise).
/// `stats` may be `None` only for RTN and HQQ.
pub fn quantize_group(
    linears: &[LinearWeight],
    cols: usize,
    stats: Option<&InputStats>,
    scheme: &Scheme,
    clip: &[bool],
    method: &Method,
) -> Result<GroupResult> {
    let need = || {
        stats.ok_or_else(|| {
            Error::NoData(format!(
                "method {} needs calibration statistics",
                method.name()
            ))
        })
    };
    if let Some(s) = stats {
        if s.cols() != cols {
            return Err(Error::Shape(format!(
                "stats width {} vs {cols} columns",
                s.cols()
            )));
        }
    }
    let plain = |w: &[f32], rows: usize| -> Result<QuantizedLinear> {
        let tensor = rtn(w, rows, cols, scheme, &RtnConfig::default())?;
        let dequantized = tensor.dequantize()?;
        Ok(QuantizedLinear {
            tensor,
            dequantized,
            gptq_loss: None,
        })
    };
    let gptq_all =
        |ws: &[Vec<f32>], st: &InputStats, cfg: &GptqConfig| -> Result<Vec<QuantizedLinear>> {
            let prep = prepare_hessian(&st.hessian.hessian()?, cols, cfg)?;
            ws.iter()
                .zip(linears)
                .map(|(w, l)| {
                    let r = gptq_prepared(w, l.rows, cols, scheme, &prep, cfg)?;
                    Ok(QuantizedLinear {
                        tensor: r.tensor,
                        dequantized: r.dequantized,
                        gptq_loss: Some(r.loss),
                    })
                })
                .collect()
        };
    match method {
        Method::Rtn(cfg) => Ok(GroupResult {
            scales: None,
            linears: linears
                .iter()
                .map(|l| {
                    let tensor = rtn(l.w, l.rows, cols, scheme, cfg)?;
                    let dequantized = tensor.dequantize()?;
                    Ok(QuantizedLinear {
                        tensor,
                        dequantized,
                        gptq_loss: None,
                    })
                })
                .collect::<Result<_>>()?,
        }),
        Method::Hqq(cfg) => Ok(GroupResult {
            scales: None,
            linears: linears
                .iter()
                .map(|l| {
                    let r = hqq(l.w, l.rows, cols, scheme, cfg)?;
                    Ok(QuantizedLinear {
                        tensor: r.tensor,
                        dequantized: r.dequantized,
                        gptq_loss: None,
                    })
                })
                .collect::<Result<_>>()?,
        }),
        Method::Gptq(cfg) => {
            let ws: Vec<Vec<f32>> = linears.iter().map(|l| l.w.to_vec()).collect();
            Ok(GroupResult {
                scales: None,
                linears: gptq_all(&ws, need()?, cfg)?,
            })
        }
        Method::Awq(cfg) => {
            let r = awq(linears, need()?, scheme, clip, cfg)?;
            Ok(GroupResult {
                scales: Some(r.scales.scales),
                linears: r
                    .linears
                    .into_iter()
                    .map(|l| QuantizedLinear {
                        tensor: l.tensor,
                        dequantized: l.dequantized,
                        gptq_loss: None,
                    })
                    .collect(),
            })
        }
        Method::SmoothQuant(cfg, gptq_cfg) => {
            let st = need()?;
            let s = smoothquant_scales(linears, &st.abs_max()?, cfg)?;
            let ws: Vec<Vec<f32>> = linears
                .iter()
                .map(|l| {
                    let mut w = l.w.to_vec();
                    crate::fold::scale_columns(&mut w, l.rows, cols, &s)?;
                    Ok(w)
                })
                .collect::<Result<_>>()?;
            let out = match gptq_cfg {
                Some(gc) => {
                    let mut smoothed = st.clone();
                    smoothed.divide_channels(&s)?;
                    gptq_all(&ws, &smoothed, gc)?
                }
                None => ws
                    .iter()
                    .zip(linears)
                    .map(|(w, l)| plain(w, l.rows))
                    .collect::<Result<_>>()?,
            };
            Ok(GroupResult {
                scales: Some(s),
                linears: out,
            })
        }
    }
}

/// Quantize one linear (a group of one; no clipping restriction).
pub fn quantize_linear(
    w: &[f32],
    rows: usize,
    cols: usize,
    stats: Option<&InputStats>,
    scheme: &Scheme,
    method: &Method,
) -> Result<GroupResult> {
    quantize_group(
        &[LinearWeight { w, rows }],
        cols,
        stats,
        scheme,
        &[true],
        method,
    )
}
