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
    /// A ggml tensor type id that this crate does not know (GGUF files name types by id).
    #[error("unknown ggml type id {id}")]
    UnknownGgmlType {
        /// The id read from the file.
        id: u32,
    },
    /// A known ggml type whose codec this crate does not implement (e.g. Q2_K dequantize).
    #[error("ggml type {name}: {op} is not supported")]
    UnsupportedGgmlType {
        /// ggml's name of the type.
        name: &'static str,
        /// `quantize` or `dequantize`.
        op: &'static str,
    },
    /// A NaN or infinite input to a block quantizer that cannot represent it.
    #[error("non-finite input {value} at index {index} cannot be quantized to {format}")]
    NonFinite {
        /// Format being encoded.
        format: &'static str,
        /// Flat index of the offending element.
        index: usize,
        /// The offending value.
        value: f32,
    },
    /// Any other invalid argument (bits out of range, group size zero, ...).
    #[error("invalid argument: {0}")]
    Invalid(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
