//! Checker for schema `float_conv/v1`: scalar element conversions f32 -> code -> f32.
//!
//! Per file it checks, bit-exactly:
//! * `out_code` against lowbit's encoder with the policy the file was made with (ml_dtypes /
//!   numpy default: ties-to-even, non-saturating overflow, the reference's NaN mapping);
//! * `out_f32_bits` against lowbit's decode of lowbit's own code (NaN outputs by NaN-ness);
//! * `decode_table` (every code of ≤ 8-bit formats) against lowbit's decoder;
//! * `alt_satfinite.out_code` against `Overflow::Saturate` (E4M3, E5M2);
//! * `alt_torch.out_code` where lowbit has the torch rule: E4M3 (saturating, all inputs),
//!   E5M2 (non-saturating; torch NaN code 0x7F/0xFF), E8M0 (sign ignored, zero -> 0x00),
//!   bf16 (NaN -> 0xFFFF), f16 (`half` quiet-NaN rule).

use super::{f32s, same_f32, u64s, Report};
use anyhow::{bail, Context, Result};
use lowbit_numerics::halfs;
use lowbit_numerics::{FloatFormat, Overflow, Rounding};
use serde_json::Value;

/// Which codec a file exercises.
#[derive(Clone, Copy)]
enum Codec {
    Mini(FloatFormat),
    Bf16,
    F16,
}

impl Codec {
    fn encode(self, x: f32, overflow: Overflow) -> u64 {
        match self {
            Codec::Mini(f) => f.encode(x, Rounding::NearestEven, overflow) as u64,
            Codec::Bf16 => halfs::f32_to_bf16_bits(x) as u64,
            Codec::F16 => halfs::f32_to_f16_bits(x) as u64,
        }
    }

    fn decode(self, code: u64) -> f32 {
        match self {
            Codec::Mini(f) => f.decode(code as u8),
            Codec::Bf16 => halfs::bf16_bits_to_f32(code as u16),
            Codec::F16 => halfs::f16_bits_to_f32(code as u16),
        }
    }

    /// torch 2.x CPU `.to(dtype)`, where lowbit models it.
    fn encode_torch(self, x: f32) -> Option<u64> {
        Some(match self {
            Codec::Mini(FloatFormat::E4M3) => {
                FloatFormat::E4M3.encode(x, Rounding::NearestEven, Overflow::Saturate) as u64
            }
            Codec::Mini(FloatFormat::E5M2) => {
                if x.is_nan() {
                    if x.is_sign_negative() {
                        0xFF
                    } else {
                        0x7F
                    }
                } else {
                    FloatFormat::E5M2.encode(x, Rounding::NearestEven, Overflow::NonSaturating)
                        as u64
                }
            }
            Codec::Mini(FloatFormat::E8M0) => {
                if x == 0.0 {
                    0x00
                } else {
                    FloatFormat::E8M0.encode(
                        x.abs(),
                        Rounding::NearestEven,
                        Overflow::NonSaturating,
                    ) as u64
                }
            }
            Codec::Bf16 => halfs::f32_to_bf16_bits_torch(x) as u64,
            Codec::F16 => halfs::f32_to_f16_bits_torch(x) as u64,
            Codec::Mini(_) => return None,
        })
    }
}

fn codec_for(format: &str) -> Result<Codec> {
    Ok(match format {
        "bfloat16" => Codec::Bf16,
        "float16" => Codec::F16,
        other => {
            Codec::Mini(FloatFormat::from_name(other).with_context(|| format!("format `{other}`"))?)
        }
    })
}

/// Check one file of this schema.
pub fn check(v: &Value) -> Result<Report> {
    let format = v
        .get("format")
        .and_then(Value::as_str)
        .context("missing `format`")?;
    let codec = codec_for(format)?;
    let inputs = f32s(v, "input_f32_bits")?;
    let codes = u64s(v, "out_code")?;
    let outs = f32s(v, "out_f32_bits")?;
    if let Some(n) = v.get("n").and_then(Value::as_u64) {
        if n as usize != inputs.len() {
            bail!("`n` = {n} but {} inputs", inputs.len());
        }
    }
    if codes.len() != inputs.len() || outs.len() != inputs.len() {
        bail!(
            "length mismatch: {} inputs, {} codes, {} decoded values",
            inputs.len(),
            codes.len(),
            outs.len()
        );
    }
    if let Some(meta) = v.get("meta") {
        if let (Codec::Mini(f), Some(bits)) =
            (codec, meta.get("total_bits").and_then(Value::as_u64))
        {
            if bits as u32 != f.total_bits() {
                bail!(
                    "meta.total_bits = {bits}, lowbit's {} has {}",
                    f.name(),
                    f.total_bits()
                );
            }
        }
    }
    let mut r = Report::default();
    let mut checked_variants = vec!["ml_dtypes/numpy default (RNE, non-saturating)"];
    for (i, (&x, (&want, &want_f))) in inputs.iter().zip(codes.iter().zip(&outs)).enumerate() {
        let got = codec.encode(x, Overflow::NonSaturating);
        r.check(got == want, || {
            format!(
                "[{i}] encode({x:e} = {:#010x}): got {got:#x}, want {want:#x}",
                x.to_bits()
            )
        });
        if let Codec::Mini(f) = codec {
            // The scalar reference encoder must agree too (the fast path is what `encode` uses).
            let rf = f.encode_reference(x, Rounding::NearestEven, Overflow::NonSaturating) as u64;
            r.check(rf == want, || {
                format!("[{i}] encode_reference({x:e}): got {rf:#x}, want {want:#x}")
            });
        }
        let got_f = codec.decode(got);
        r.check(same_f32(got_f, want_f), || {
            format!("[{i}] decode(encode({x:e})): got {got_f:e}, want {want_f:e}")
        });
    }
    if let Some(t) = v.get("decode_table") {
        let tc = u64s(t, "code")?;
        let tv = f32s(t, "f32_bits")?;
        if tc.len() != tv.len() {
            bail!("decode_table: {} codes vs {} values", tc.len(), tv.len());
        }
        for (&c, &want) in tc.iter().zip(&tv) {
            let got = codec.decode(c);
            r.check(same_f32(got, want), || {
                format!("decode_table[{c:#x}]: got {got:e}, want {want:e}")
            });
        }
        checked_variants.push("decode_table");
    }
    if let Some(alt) = v.get("alt_satfinite") {
        let want = u64s(alt, "out_code")?;
        if want.len() != inputs.len() {
            bail!(
                "alt_satfinite: {} codes for {} inputs",
                want.len(),
                inputs.len()
            );
        }
        for (i, (&x, &w)) in inputs.iter().zip(&want).enumerate() {
            let got = codec.encode(x, Overflow::Saturate);
            r.check(got == w, || {
                format!("[{i}] satfinite encode({x:e}): got {got:#x}, want {w:#x}")
            });
        }
        checked_variants.push("alt_satfinite (Overflow::Saturate)");
    }
    if let Some(alt) = v.get("alt_torch") {
        if codec.encode_torch(0.0).is_some() {
            let want = u64s(alt, "out_code")?;
            if want.len() != inputs.len() {
                bail!(
                    "alt_torch: {} codes for {} inputs",
                    want.len(),
                    inputs.len()
                );
            }
            for (i, (&x, &w)) in inputs.iter().zip(&want).enumerate() {
                let got = codec.encode_torch(x).unwrap_or_default();
                r.check(got == w, || {
                    format!("[{i}] torch encode({x:e}): got {got:#x}, want {w:#x}")
                });
            }
            checked_variants.push("alt_torch");
        } else {
            checked_variants.push("alt_torch NOT checked");
        }
    }
    r.note = format!("{format}: {}", checked_variants.join(", "));
    Ok(r)
}
