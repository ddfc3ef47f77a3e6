//! The one error type of the calibration crate.

/// Everything that can go wrong while calibrating or quantizing one layer.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// Slice lengths or dimensions that do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A NaN or infinite value in an input (weights, activations or statistics).
    #[error("non-finite value in {what} at index {index}")]
    NonFinite {
        /// Which input holds it.
        what: &'static str,
        /// Flat index of the first offending element.
        index: usize,
    },
    /// The damped Hessian stayed non positive-definite after every damping retry.
    #[error(
        "Hessian is not positive definite even with damping {damp:e} (relative {rel_damp}); \
         pivot {pivot} = {value:e}"
    )]
    NotPositiveDefinite {
        /// Last absolute damping tried.
        damp: f64,
        /// Last relative damping tried (fraction of mean(diag H)).
        rel_damp: f64,
        /// Index of the failing pivot.
        pivot: usize,
        /// Value of the failing pivot before the square root.
        value: f64,
    },
    /// No calibration data where some was needed.
    #[error("no calibration data: {0}")]
    NoData(String),
    /// An option or scheme this algorithm cannot use.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Any other invalid argument.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// An error from the numerics crate (scheme, packing, encoding).
    #[error(transparent)]
    Numerics(#[from] lowbit_numerics::Error),
    /// An error from the kernels crate (matrix products).
    #[error(transparent)]
    Kernels(#[from] lowbit_kernels::Error),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Return `Err(NonFinite)` at the first NaN/Inf of `v`.
pub(crate) fn check_finite(v: &[f32], what: &'static str) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(Error::NonFinite { what, index }),
        None => Ok(()),
    }
}

/// Return `Err(Shape)` unless `v.len() == rows * cols`.
pub(crate) fn check_len(v: &[f32], rows: usize, cols: usize, what: &str) -> Result<()> {
    if v.len() != rows * cols {
        return Err(Error::Shape(format!(
            "{what} has {} elements, expected {rows} x {cols} = {}",
            v.len(),
            rows * cols
        )));
    }
    Ok(())
}
