//! # lowbit-calibration
//!
//! Quantization algorithms that work on one linear layer at a time, given its weight and
//! statistics of its inputs: round-to-nearest, GPTQ, AWQ, SmoothQuant, HQQ, and the rotation
//! methods (QuaRot Hadamard, SpinQuant). The layer-by-layer pipeline that feeds them real
//! activations lives in `lowbit-model`.
//!
//! Conventions: weights are f32 `[out][in]` row-major (`rows = out`, `cols = in`), inputs are
//! token-major `[n_tokens][in]`. Every algorithm works for every `lowbit_numerics::Scheme`
//! through [`grid::Grid`]. See `docs/algorithms.md` for the objectives and defaults.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod actquant;
pub mod awq;
pub mod error;
pub mod fold;
pub mod gptq;
pub mod grid;
pub mod hadamard;
pub mod hessian;
pub mod hqq;
pub mod linalg;
pub mod method;
pub mod quarot;
pub mod rotation;
pub mod rtn;
pub mod sensitivity;
pub mod smoothquant;
pub mod spinquant;
pub mod stats;

pub use awq::{awq, awq_clip, awq_search_scales, AwqConfig, AwqResult, AwqScales, LinearWeight};
pub use error::{Error, Result};
pub use gptq::{gptq, gptq_prepared, prepare_hessian, ActOrder, GptqConfig, GptqResult};
pub use grid::{BlockParams, Clipping, Grid};
pub use hessian::HessianAccumulator;
pub use hqq::{hqq, HqqConfig, HqqResult};
pub use method::{quantize_group, quantize_linear, GroupResult, Method, QuantizedLinear};
pub use rtn::{rtn, rtn_dequantized, RtnConfig};
pub use sensitivity::{relative_output_error, relative_output_error_from_hessian};
pub use smoothquant::{fake_quant_activations_per_token, smoothquant_scales, ActQuant, SqConfig};
pub use stats::InputStats;
