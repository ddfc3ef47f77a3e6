//! # lowbit-kernels
//!
//! Matrix kernels for lowbit: dense f32 GEMM (the reference path of the model), and quantized
//! GEMV/GEMM with dequantization fused into the inner loop, runtime-dispatched over AVX-512,
//! AVX2+FMA, NEON and a scalar reference, threaded with rayon. A CUDA backend lives behind the
//! `cuda` feature.
#![warn(missing_docs)]

pub mod dense;
mod error;

pub use error::{Error, Result};
