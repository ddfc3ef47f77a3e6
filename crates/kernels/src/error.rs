//! Errors of the kernels crate.

/// What can go wrong when preparing or running a kernel.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// Slice lengths or dimensions that do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A quantized format this kernel does not handle.
    #[error("unsupported format for this kernel: {0}")]
    Unsupported(String),
    /// The CUDA backend is unavailable or a CUDA call failed.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// An error from the numerics crate.
    #[error(transparent)]
    Numerics(#[from] lowbit_numerics::Error),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
