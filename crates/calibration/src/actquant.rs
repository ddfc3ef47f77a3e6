//! Activation fake-quantization for the forward pass of a W4A4 / W4A8 / W8A8 model: each
//! `[n_tokens][cols]` input of a linear layer is quantized and dequantized in place, so that
//! evaluation measures what a low-bit kernel computes.
//!
//! Granularities:
//! - per-token dynamic: one scale per row (`clip * max|x| / qmax`), INT2..INT8 symmetric or FP8;
//! - per-tensor static: one scale fixed in advance from calibration activations
//!   ([`calibrate_static_scale`]: absmax, percentile or MSE search), INT or FP8;
//! - block formats NVFP4 (16-element blocks, E4M3 scales, per-tensor global scale) and MXFP4
//!   (32-element blocks, E8M0 scales) along the row, through `lowbit_numerics`.

use crate::error::{check_finite, check_len, Error, Result};
use lowbit_numerics::{quantize, FloatFormat, Overflow, QuantOptions, Rounding, Scheme};

/// The number format of an activation quantizer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ActFormat {
    /// Symmetric integer with `bits` bits (2..=8): codes `[-2^(b-1), 2^(b-1) - 1]`,
    /// `scale = range / (2^(b-1) - 1)`.
    Int {
        /// Bit width.
        bits: u32,
    },
    /// FP8 E4M3, saturating, `scale = range / 448`.
    Fp8E4m3,
    /// NVFP4 blocks of 16 along each row.
    Nvfp4,
    /// MXFP4 blocks of 32 along each row.
    Mxfp4,
}

impl ActFormat {
    /// Parse `int4`, `int8` (any `intB`, B in 2..=8), `fp8`, `nvfp4`, `mxfp4`.
    pub fn parse(s: &str) -> Result<Self> {
        let l = s.trim().to_ascii_lowercase();
        Ok(match l.as_str() {
            "fp8" | "fp8-e4m3" | "e4m3" => ActFormat::Fp8E4m3,
            "nvfp4" => ActFormat::Nvfp4,
            "mxfp4" => ActFormat::Mxfp4,
            _ => match l.strip_prefix("int").and_then(|b| b.parse::<u32>().ok()) {
                Some(bits) if (2..=8).contains(&bits) => ActFormat::Int { bits },
                _ => {
                    return Err(Error::Invalid(format!(
                        "unknown activation format `{s}` (int2..int8, fp8, nvfp4, mxfp4)"
                    )))
                }
            },
        })
    }

    /// The name [`ActFormat::parse`] reads back (`int4`, `fp8`, `nvfp4`, ...).
    pub fn name(self) -> String {
        match self {
            ActFormat::Int { bits } => format!("int{bits}"),
            ActFormat::Fp8E4m3 => "fp8".into(),
            ActFormat::Nvfp4 => "nvfp4".into(),
            ActFormat::Mxfp4 => "mxfp4".into(),
        }
    }

    /// Largest representable magnitude of the format's codes (before scaling), for the
    /// scalar-scale formats.
    pub(crate) fn qmax(self) -> f32 {
        match self {
            ActFormat::Int { bits } => ((1u32 << (bits - 1)) - 1) as f32,
            ActFormat::Fp8E4m3 => FloatFormat::E4M3.max_finite(),
            ActFormat::Nvfp4 | ActFormat::Mxfp4 => 6.0,
        }
    }

    /// Quantize-dequantize `v` with scale `s` (`s > 0`).
    fn qdq(self, v: f32, s: f32) -> f32 {
        match self {
            ActFormat::Int { bits } => {
                let hi = ((1i32 << (bits - 1)) - 1) as f32;
                (v / s).round_ties_even().clamp(-hi - 1.0, hi) * s
            }
            _ => {
                let f = FloatFormat::E4M3;
                f.decode(f.encode(v / s, Rounding::NearestEven, Overflow::Saturate)) * s
            }
        }
    }
}

/// An activation quantizer: format, granularity and clipping.
#[derive(Debug, Clone, PartialEq)]
pub struct ActQuantizer {
    /// The format.
    pub format: ActFormat,
    /// Per-token dynamic ranges are `clip * max|x|` (1.0 = no clipping; QuaRot uses 0.9).
    pub clip: f32,
    /// `Some(scale)`: per-tensor static scale (INT / FP8 only); `None`: dynamic.
    pub static_scale: Option<f32>,
}

impl ActQuantizer {
    /// A per-token dynamic quantizer (block-wise for NVFP4/MXFP4), no clipping.
    pub fn per_token(format: ActFormat) -> Self {
        ActQuantizer {
            format,
            clip: 1.0,
            static_scale: None,
        }
    }

    /// Check the settings.
    pub fn validate(&self) -> Result<()> {
        if !(self.clip > 0.0 && self.clip <= 1.0) {
            return Err(Error::Invalid(format!(
                "activation clip ratio {} must be in (0, 1]",
                self.clip
            )));
        }
        if let Some(s) = self.static_scale {
            if !(s > 0.0 && s.is_finite()) {
                return Err(Error::Invalid(format!("static activation scale {s}")));
            }
            if matches!(self.format, ActFormat::Nvfp4 | ActFormat::Mxfp4) {
                return Err(Error::Unsupported(
                    "static per-tensor scales for NVFP4/MXFP4 activations (they are block formats)"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    /// Quantize-dequantize `x` (`[n_tokens][cols]`) in place.
    pub fn apply(&self, x: &mut [f32], n_tokens: usize, cols: usize) -> Result<()> {
        self.validate()?;
        check_len(x, n_tokens, cols, "activations")?;
        check_finite(x, "activations")?;
        if cols == 0 || n_tokens == 0 {
            return Ok(());
        }
        match self.format {
            ActFormat::Nvfp4 | ActFormat::Mxfp4 => {
                let name = if self.format == ActFormat::Nvfp4 {
                    "nvfp4"
                } else {
                    "mxfp4"
                };
                let scheme = Scheme::from_name(name)?;
                let q = quantize(x, n_tokens, cols, &scheme, &QuantOptions::default())?;
                x.copy_from_slice(&q.dequantize()?);
            }
            fmt => {
                if let Some(s) = self.static_scale {
                    x.iter_mut().for_each(|v| *v = fmt.qdq(*v, s));
                } else {
                    let qmax = fmt.qmax();
                    for row in x.chunks_exact_mut(cols) {
                        let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                        if amax == 0.0 {
                            continue;
                        }
                        let s = self.clip * amax / qmax;
                        row.iter_mut().for_each(|v| *v = fmt.qdq(*v, s));
                    }
                }
            }
        }
        Ok(())
    }
}

/// How a per-tensor static activation scale is chosen from calibration activations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StaticCalib {
    /// `max|x| / qmax`.
    AbsMax,
    /// The `p`-th percentile (0 < p <= 100) of `|x|`, over `qmax`.
    Percentile(f64),
    /// The scale among 100 candidates `k/100 * max|x| / qmax` minimising the squared error.
    Mse,
}

impl StaticCalib {
    /// Parse `absmax`, `percentile:P` (0 < P <= 100, e.g. `percentile:99.9`) or `mse`.
    pub fn parse(s: &str) -> Result<Self> {
        let l = s.trim().to_ascii_lowercase();
        let how = match l.as_str() {
            "absmax" | "max" => StaticCalib::AbsMax,
            "mse" => StaticCalib::Mse,
            _ => match l.strip_prefix("percentile:").map(|p| p.parse::<f64>()) {
                Some(Ok(p)) if p > 0.0 && p <= 100.0 => StaticCalib::Percentile(p),
                _ => {
                    return Err(Error::Invalid(format!(
                        "unknown static activation calibration `{s}` (absmax, percentile:P with \
                         0 < P <= 100, mse)"
                    )))
                }
            },
        };
        Ok(how)
    }

    /// The name [`StaticCalib::parse`] reads back.
    pub fn name(self) -> String {
        match self {
            StaticCalib::AbsMax => "absmax".into(),
            StaticCalib::Percentile(p) => format!("percentile:{p}"),
            StaticCalib::Mse => "mse".into(),
        }
    }
}

/// Above this many values, [`StaticCalib::Mse`] scores its candidates on a histogram (per-bin
/// count, sum and sum of squares over [`MSE_BINS`] bins of `[-max|x|, max|x|]`, every value of a
/// bin sent to the code of the bin's mean) instead of on every value.
pub const MSE_EXACT_MAX: usize = 1 << 16;
/// Histogram bins of the large-input MSE search ([`MSE_EXACT_MAX`]).
pub const MSE_BINS: usize = 1 << 15;

/// Squared quantization error of `x` with scale `s`, exactly or on the histogram `hist`
/// (`(count, sum, sum of squares)` per bin).
fn mse_error(format: ActFormat, x: &[f32], hist: Option<&[(f64, f64, f64)]>, s: f32) -> f64 {
    match hist {
        None => x
            .iter()
            .map(|&v| {
                let d = (format.qdq(v, s) - v) as f64;
                d * d
            })
            .sum(),
        Some(h) => h
            .iter()
            .filter(|b| b.0 > 0.0)
            .map(|&(n, s1, s2)| {
                let q = format.qdq((s1 / n) as f32, s) as f64;
                (s2 - 2.0 * q * s1 + n * q * q).max(0.0)
            })
            .sum(),
    }
}

/// Choose a per-tensor static scale for `format` (INT or FP8) from calibration values `x`.
pub fn calibrate_static_scale(x: &[f32], format: ActFormat, how: StaticCalib) -> Result<f32> {
    check_finite(x, "calibration activations")?;
    if x.is_empty() {
        return Err(Error::NoData(
            "no activations to calibrate a static scale".into(),
        ));
    }
    if matches!(format, ActFormat::Nvfp4 | ActFormat::Mxfp4) {
        return Err(Error::Unsupported(
            "static scales for NVFP4/MXFP4 activations".into(),
        ));
    }
    let qmax = format.qmax();
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 {
        return Err(Error::Invalid(
            "calibration activations are all zero".into(),
        ));
    }
    Ok(match how {
        StaticCalib::AbsMax => amax / qmax,
        StaticCalib::Percentile(p) => {
            if !(p > 0.0 && p <= 100.0) {
                return Err(Error::Invalid(format!(
                    "percentile {p} must be in (0, 100]"
                )));
            }
            let mut a: Vec<f32> = x.iter().map(|v| v.abs()).collect();
            let k = (((p / 100.0) * a.len() as f64).ceil() as usize).clamp(1, a.len()) - 1;
            let (_, v, _) = a.select_nth_unstable_by(k, f32::total_cmp);
            (*v).max(f32::MIN_POSITIVE) / qmax
        }
        StaticCalib::Mse => {
            let hist = (x.len() > MSE_EXACT_MAX).then(|| {
                let mut h = vec![(0f64, 0f64, 0f64); MSE_BINS];
                let w = MSE_BINS as f32 / (2.0 * amax);
                for &v in x {
                    let i = (((v + amax) * w) as usize).min(MSE_BINS - 1);
                    let b = &mut h[i];
                    let v = v as f64;
                    b.0 += 1.0;
                    b.1 += v;
                    b.2 += v * v;
                }
                h
            });
            let mut best = (f64::INFINITY, amax / qmax);
            for k in 1..=100 {
                let s = k as f32 / 100.0 * amax / qmax;
                let e = mse_error(format, x, hist.as_deref(), s);
                if e < best.0 {
                    best = (e, s);
                }
            }
            best.1
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_mse_matches_the_exact_search() {
        // Heavy-tailed values: the MSE scale clips well below the max.
        let mut state = 12345u64;
        let x: Vec<f32> = (0..MSE_EXACT_MAX + 1000)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((state >> 40) as f32 + 0.5) / (1u64 << 24) as f32;
                let g = (u - 0.5) * 2.0;
                g * g * g * 10.0
            })
            .collect();
        for f in [ActFormat::Int { bits: 4 }, ActFormat::Int { bits: 8 }] {
            let big = calibrate_static_scale(&x, f, StaticCalib::Mse).unwrap();
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            // Exact search on the same data, candidate by candidate.
            let (mut be, mut bs) = (f64::INFINITY, 0f32);
            for k in 1..=100 {
                let s = k as f32 / 100.0 * amax / f.qmax();
                let e = mse_error(f, &x, None, s);
                if e < be {
                    (be, bs) = (e, s);
                }
            }
            let eb = mse_error(f, &x, None, big);
            assert!(eb <= be * 1.01, "{f:?}: {eb} vs {be} ({big} vs {bs})");
            assert!(big < amax / f.qmax(), "{f:?}");
        }
    }

    #[test]
    fn int4_per_token_rows_use_own_scale() {
        let q = ActQuantizer::per_token(ActFormat::Int { bits: 4 });
        let mut x = vec![7.0, 3.5, -7.0, 0.7, 0.35, -0.7];
        q.apply(&mut x, 2, 3).unwrap();
        // Row 0: scale 1 -> 3.5 rounds to 4 (ties to even); row 1: scale 0.1 -> 0.35 -> 0.4.
        assert_eq!(&x[..3], &[7.0, 4.0, -7.0]);
        assert!((x[4] - 0.4).abs() < 1e-6);
    }

    #[test]
    fn clipping_saturates_the_max() {
        let q = ActQuantizer {
            clip: 0.5,
            ..ActQuantizer::per_token(ActFormat::Int { bits: 8 })
        };
        let mut x = vec![127.0, 10.0];
        q.apply(&mut x, 1, 2).unwrap();
        // scale 0.5: 127 -> 254 clamps to 127 codes -> 63.5
        assert_eq!(x, vec![63.5, 10.0]);
    }

    #[test]
    fn block_formats_and_static() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) / 8.0).collect();
        for f in [ActFormat::Nvfp4, ActFormat::Mxfp4, ActFormat::Fp8E4m3] {
            let mut y = x.clone();
            ActQuantizer::per_token(f).apply(&mut y, 2, 32).unwrap();
            let err: f32 = y
                .iter()
                .zip(&x)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(err > 0.0 && err < 0.3 * 31.5 / 8.0, "{f:?} {err}");
        }
        let s =
            calibrate_static_scale(&x, ActFormat::Int { bits: 8 }, StaticCalib::AbsMax).unwrap();
        assert!((s - 31.5 / 8.0 / 127.0).abs() < 1e-7);
        let p = calibrate_static_scale(
            &x,
            ActFormat::Int { bits: 8 },
            StaticCalib::Percentile(50.0),
        )
        .unwrap();
        assert!(p < s);
        let m = calibrate_static_scale(&x, ActFormat::Int { bits: 4 }, StaticCalib::Mse).unwrap();
        assert!(m <= 31.5 / 8.0 / 7.0 + 1e-6);
        assert!(ActQuantizer {
            static_scale: Some(1.0),
            ..ActQuantizer::per_token(ActFormat::Nvfp4)
        }
        .validate()
        .is_err());
        assert!(ActFormat::parse("int9").is_err());
        for f in [
            ActFormat::Int { bits: 4 },
            ActFormat::Int { bits: 8 },
            ActFormat::Fp8E4m3,
            ActFormat::Nvfp4,
            ActFormat::Mxfp4,
        ] {
            assert_eq!(ActFormat::parse(&f.name()).unwrap(), f);
        }
        assert_eq!(
            ActFormat::parse("INT4").unwrap(),
            ActFormat::Int { bits: 4 }
        );
        for how in [
            StaticCalib::AbsMax,
            StaticCalib::Mse,
            StaticCalib::Percentile(99.9),
        ] {
            assert_eq!(StaticCalib::parse(&how.name()).unwrap(), how);
        }
        assert!(StaticCalib::parse("percentile:0").is_err());
        assert!(StaticCalib::parse("percentile:101").is_err());
        assert!(StaticCalib::parse("minmax").is_err());
        let mut bad = vec![f32::NAN];
        assert!(ActQuantizer::per_token(ActFormat::Fp8E4m3)
            .apply(&mut bad, 1, 1)
            .is_err());
    }
}
