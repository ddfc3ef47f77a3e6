//! The one error type of the model crate.

use std::path::PathBuf;

/// Everything that can go wrong when loading, tokenizing or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file being read or written.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A GGUF file ends before a structure it declares.
    #[error("GGUF truncated: {what} at offset {offset} needs {needed} bytes, but the file has {file_size}")]
    GgufTruncated {
        /// The structure being read (e.g. "value of key `general.name`").
        what: String,
        /// Absolute file offset where it starts.
        offset: u64,
        /// Bytes it needs from `offset`.
        needed: u64,
        /// Total file size.
        file_size: u64,
    },
    /// A GGUF file holds an invalid value.
    #[error("GGUF invalid at offset {offset}: {what}")]
    GgufInvalid {
        /// What is wrong, naming the key or tensor.
        what: String,
        /// Absolute file offset of the offending field.
        offset: u64,
    },
    /// A tensor name that the file does not contain.
    #[error("no tensor named `{0}`")]
    MissingTensor(String),
    /// A metadata key that is required but absent (or of the wrong type).
    #[error("metadata key `{key}`: {what}")]
    Metadata {
        /// The key.
        key: String,
        /// What is wrong with it.
        what: String,
    },
    /// A tensor whose element type this operation cannot handle.
    #[error("tensor `{tensor}`: unsupported type {ty}")]
    UnsupportedType {
        /// The tensor name.
        tensor: String,
        /// The type as a name or id.
        ty: String,
    },
    /// A safetensors file or folder is malformed.
    #[error("safetensors {path}: {what}")]
    Safetensors {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Tokenizer construction, encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A model spec (path or repo id) could not be resolved.
    #[error("{0}")]
    Resolve(String),
    /// A model configuration that is missing a field, inconsistent, or of an unsupported
    /// architecture.
    #[error("model config: {0}")]
    Config(String),
    /// A buffer or tensor of the wrong shape handed to the forward pass.
    #[error("shape: {0}")]
    Shape(String),
    /// A non-finite value (NaN/Inf) where a finite one is required.
    #[error("non-finite value: {0}")]
    NonFinite(String),
    /// A kernel error (matrix products).
    #[error("kernel: {0}")]
    Kernel(#[from] lowbit_kernels::Error),
    /// A KV-cache error.
    #[error("kv cache: {0}")]
    KvCache(#[from] lowbit_kv_cache::Error),
    /// A numerics codec error (dequantization).
    #[error("numerics: {0}")]
    Numerics(#[from] lowbit_numerics::Error),
    /// A calibration algorithm failed on a layer (GPTQ, AWQ, ...).
    #[error("calibration: {0}")]
    Calibration(#[from] lowbit_calibration::Error),
    /// The quantization pipeline was given unusable input (calibration text, recipe, targets).
    #[error("quantize: {0}")]
    Quantize(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wrap an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
