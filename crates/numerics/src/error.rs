//! The one error type of the numerics crate.

/// Everything that can go wrong when encoding, decoding or packing low-bit data.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// A shape does not fit the requested granularity or buffer.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A packed buffer is shorter (or longer) than its header says.
    #[error("packed buffer has {got} bytes, expected {expected} ({what})")]
    BufferSize {
        /// What the buffer holds.
        what: &'static str,
        /// Bytes required.
        expected: usize,
        /// Bytes present.
        got: usize,
    },
    /// A format name that no codec knows.
    #[error("unknown format `{name}`; known formats: {known}")]
    UnknownFormat {
        /// The name that was asked for.
        name: String,
        /// A comma separated list of accepted names.
        known: String,
    },
    /// A NaN input for a format that has no NaN code, under the `Error` NaN policy.
    #[error("NaN input at index {index} cannot be encoded in {format} (it has no NaN code)")]
    NanInput {
        /// Format being encoded.
        format: &'static str,
        /// Flat index of the offending element.
        index: usize,
    },
    /// Any other invalid argument (bits out of range, group size zero, ...).
    #[error("invalid argument: {0}")]
    Invalid(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
