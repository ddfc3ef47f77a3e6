//! # lowbit-model
//!
//! A Llama-family forward pass (Llama, Mistral, Qwen2, SmolLM) over dense or quantized linear
//! layers, loaders for Hugging Face safetensors folders and GGUF files, the tokenizers, the
//! evaluation metrics (perplexity, KL to a reference, top-1 agreement, tail statistics), and the
//! layer-by-layer quantization pipeline that drives `lowbit-calibration`.
#![warn(missing_docs)]

pub mod error;
pub mod gguf;

pub use error::{Error, Result};
