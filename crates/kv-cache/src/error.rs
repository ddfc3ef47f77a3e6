//! Errors of the KV-cache crate.

/// What can go wrong when building or using a cache.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// Slice lengths that do not match the cache shape.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A layer index past the model's layers.
    #[error("layer {layer} out of range (cache has {n_layers} layers)")]
    Layer {
        /// Requested layer.
        layer: usize,
        /// Layers in the cache.
        n_layers: usize,
    },
    /// A policy string that does not parse or is inconsistent with the model.
    #[error("bad KV policy `{policy}`: {reason}")]
    Policy {
        /// The string that was given.
        policy: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An error from the numerics crate.
    #[error(transparent)]
    Numerics(#[from] lowbit_numerics::Error),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
