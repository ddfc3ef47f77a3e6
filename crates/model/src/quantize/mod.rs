//! The layer-by-layer quantization pipeline: calibration windows, targets and overrides, the
//! sequential loop that drives `lowbit-calibration` (RTN, GPTQ, ...), the sensitivity report, and
//! the conversion of a quantized [`crate::Model`] to and from a compressed-tensors checkpoint.

pub mod calib;
pub mod checkpoint;
pub mod pipeline;
pub mod recipe;
pub mod sha256;

pub use calib::{read_calibration_files, sample_windows, CalibConfig, CalibSource};
pub use checkpoint::{load_ct_model, model_to_checkpoint, CheckpointSink, ModelToCheckpoint};
pub use pipeline::{
    quantize_model, quantize_streaming, Event, LayerReport, LayerSink, Method, ModuleReport,
    PipelineOptions, PipelineReport,
};
pub use recipe::Recipe;

use crate::ct::ActivationQuant;
use crate::error::{Error, Result};
use crate::linear::ActQuant;
use lowbit_numerics::Scheme;

/// Every scheme name `cargo xtask quantize --scheme` documents (any other name
/// `lowbit_numerics::Scheme::from_name` accepts works too).
pub const SCHEME_NAMES: [&str; 12] = [
    "int4-g128-sym",
    "int4-g128-asym",
    "int3-g128-sym",
    "int2-g64-asym",
    "int8-pc",
    "fp8-pc",
    "fp8-b128",
    "nvfp4",
    "mxfp4",
    "nf4-g64",
    "w8a8-int8",
    "w8a8-fp8",
];

/// Parse a scheme name into the weight scheme and, for W8A8 names, the per-token dynamic
/// activation quantization. INT2..INT7 per-group schemes get f16 scales (the compressed-tensors
/// / vLLM convention); everything else keeps the numerics default.
pub fn parse_scheme(name: &str) -> Result<(Scheme, Option<ActivationQuant>)> {
    let lower = name.trim().to_ascii_lowercase();
    let (wname, act) = match lower.as_str() {
        "w8a8-int8" | "w8a8" => ("int8-pc", Some(ActivationQuant::Int8PerToken)),
        "w8a8-fp8" => ("fp8-pc", Some(ActivationQuant::Fp8PerToken)),
        other => (other, None),
    };
    let s = Scheme::from_name(wname).map_err(|e| {
        Error::Quantize(format!(
            "{e}; the documented names are {}",
            SCHEME_NAMES.join(", ")
        ))
    })?;
    Ok((s, act))
}

/// The activation quantizer that simulates a W8A8 kernel: each token's row is quantized with
/// its own scale (`absmax / 127` for INT8, `absmax / 448` for FP8 E4M3) and dequantized in place.
pub fn act_quant_fn(a: ActivationQuant) -> ActQuant {
    match a {
        ActivationQuant::Int8PerToken => Box::new(|x: &mut [f32], n: usize| {
            if n == 0 {
                return;
            }
            let w = x.len() / n;
            for row in x.chunks_mut(w.max(1)) {
                let m = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                if m == 0.0 || !m.is_finite() {
                    continue;
                }
                let s = m / 127.0;
                for v in row.iter_mut() {
                    *v = (*v / s).round_ties_even().clamp(-127.0, 127.0) * s;
                }
            }
        }),
        ActivationQuant::Fp8PerToken => Box::new(|x: &mut [f32], n: usize| {
            use lowbit_numerics::{FloatFormat, Overflow, Rounding};
            if n == 0 {
                return;
            }
            let w = x.len() / n;
            for row in x.chunks_mut(w.max(1)) {
                let m = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                if m == 0.0 || !m.is_finite() {
                    continue;
                }
                let s = m / 448.0;
                for v in row.iter_mut() {
                    let c =
                        FloatFormat::E4M3.encode(*v / s, Rounding::default(), Overflow::Saturate);
                    *v = FloatFormat::E4M3.decode(c) * s;
                }
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_schemes_parse() {
        for n in SCHEME_NAMES {
            parse_scheme(n).unwrap_or_else(|e| panic!("{n}: {e}"));
        }
        assert_eq!(
            parse_scheme("w8a8-int8").unwrap().1,
            Some(ActivationQuant::Int8PerToken)
        );
        assert!(parse_scheme("int4-g128-sym").unwrap().1.is_none());
        assert!(parse_scheme("int17").is_err());
    }

    #[test]
    fn int8_token_quant_is_per_row() {
        let f = act_quant_fn(ActivationQuant::Int8PerToken);
        let mut x = vec![1.0, -0.5, 0.3, 100.0, 50.0, 0.1];
        f(&mut x, 2);
        // row 0: scale 1/127
        assert!((x[2] - (0.3f32 * 127.0).round() / 127.0).abs() < 1e-6);
        assert_eq!(x[0], 1.0);
        // row 1: scale 100/127: 0.1 rounds to 0
        assert_eq!(x[5], 0.0);
        assert_eq!(x[3], 100.0);
    }
}
