//! Minifloat element formats (FP8, FP6, FP4, E8M0): descriptions and codecs.

/// A minifloat element format, identified by its bit layout and special-value rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FloatFormat {
    /// OCP FP8 E4M3 "FN": bias 7, max 448, no Inf, NaN = S.1111.111.
    E4M3,
    /// OCP FP8 E5M2: bias 15, max 57344, IEEE-style Inf and NaN.
    E5M2,
    /// OCP FP6 E2M3: bias 1, max 7.5, no Inf/NaN.
    E2M3,
    /// OCP FP6 E3M2: bias 3, max 28, no Inf/NaN.
    E3M2,
    /// OCP FP4 E2M1: bias 1, max 6, no Inf/NaN.
    E2M1,
    /// E8M0 scale format: 2^(code-127), 0xFF = NaN, no zero, no sign.
    E8M0,
}

impl FloatFormat {
    /// Width of one code in bits.
    pub fn total_bits(&self) -> u32 {
        match self {
            FloatFormat::E4M3 | FloatFormat::E5M2 | FloatFormat::E8M0 => 8,
            FloatFormat::E2M3 | FloatFormat::E3M2 => 6,
            FloatFormat::E2M1 => 4,
        }
    }
}
