//! # lowbit-model
//!
//! A Llama-family forward pass (Llama, Mistral, Qwen2, SmolLM, Gemma-3) over dense or quantized
//! linear layers, loaders for Hugging Face safetensors folders and GGUF files, the tokenizers, the
//! evaluation metrics (perplexity, KL to a reference, top-1 agreement, tail statistics), and the
//! layer-by-layer quantization pipeline that drives `lowbit-calibration`.
#![warn(missing_docs)]

pub mod arena;
pub mod config;
pub mod ct;
pub mod error;
pub mod eval;
pub mod gemma;
pub mod generate;
pub mod gguf;
mod head;
pub mod hf;
pub mod linear;
pub mod llama;
pub mod load;
pub mod quantize;
pub mod resolve;
pub mod rope;
pub mod rotate;
pub mod sampling;
#[cfg(test)]
mod test_util;
pub mod tokenizer;
pub mod weights;

pub use config::{Arch, Gemma3Params, ModelConfig, RopeScaling};
pub use error::{Error, Result};
pub use linear::Linear;
pub use llama::{Logits, Model};
