//! # lowbit-numerics
//!
//! Bit-exact low-bit number formats for LLM quantization: integer codes with per-tensor,
//! per-channel, per-group and 2-D block scales; FP8 (E4M3, E5M2), FP6 (E2M3, E3M2), FP4 (E2M1)
//! and E8M0 minifloats; the OCP MX block formats; NVFP4; bitsandbytes NF4 with double
//! quantization; ternary/binary; and the GGUF block codecs. Every codec is verified against the
//! reference libraries' outputs (`cargo xtask golden`).
#![warn(missing_docs)]

pub mod error;
mod fastq;
pub mod gguf;
pub mod halfs;
pub mod int;
pub mod minifloat;
pub mod mx;
pub mod nf4;
pub mod nvfp4;
pub mod pack;
pub mod quantize;
pub mod rounding;
pub mod scale_search;
pub mod tensor;
pub mod ternary;

pub use error::{Error, Result};
pub use int::IntFormat;
pub use minifloat::{decode_slice, encode_slice, FloatFormat, Overflow};
pub use quantize::{quantize, BlockParams, QuantOptions, ScaleSearch};
pub use rounding::{sr_bits, Rounding};
pub use tensor::{ElemFormat, Granularity, NestedScales, QuantizedTensor, ScaleDtype, Scheme};
