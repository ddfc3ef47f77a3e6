//! # lowbit-kernels
//!
//! Matrix kernels for lowbit: dense f32 GEMM (the reference path of the model), and quantized
//! GEMV/GEMM with dequantization fused into the inner loop ([`PackedLinear`]), runtime-dispatched
//! over AVX-512, AVX2+FMA and a scalar reference ([`isa`]), threaded with rayon; plus a W8A8
//! INT8 x INT8 path ([`w8a8`]). Design notes: `docs/kernels.md`.
#![warn(missing_docs)]

pub mod act8;
pub mod amx;
pub mod codes;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dense;
mod error;
pub mod gemv_f32;
pub mod isa;
pub mod math;
pub mod membw;
pub mod packed;
pub mod w8a8;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use act8::ActMode;
pub use error::{Error, Result};
pub use isa::Isa;
pub use packed::PackedLinear;
pub use w8a8::{quantize_activations_int8_per_token, W8A8Linear};
