//! Checker for schema `mx_block/v1`: OCP MX block quantization (MXFP8/6/4, MXINT8).
//!
//! Each case is quantized with `lowbit_numerics::mx::quantize_mx` using the OCP floor rule and
//! the case's rounding mode (`"nearest"` = half away from zero, `"even"` = half to even), then
//! compared bit-exactly: every block's E8M0 code (`scale_e8m0`, 255 = NaN block), every element
//! code (`elem_codes`; MXINT8 as the int8 two's-complement byte; `-1` = undefined in a NaN block,
//! skipped) and every dequantized value (`dequant_f32_bits`, NaN by NaN-ness; for MXINT8 a
//! reference -0.0 with element code 0 is accepted as +0.0, since int8 codes have no -0). The
//! `microxcaling_py_*` fields record where microxcaling's float-log2 path differs; they are
//! counted in the note, not checked (the golden primary values use the exact exponent).

use super::{f32s, same_f32, Report};
use anyhow::{bail, Context, Result};
use lowbit_numerics::mx::{floor_log2, mx_scheme, quantize_mx, MxOptions, MxScaleRule};
use lowbit_numerics::{ElemFormat, FloatFormat, Rounding};
use serde_json::Value;

/// Read a JSON array of signed integers.
pub fn i64s(v: &Value, key: &str) -> Result<Vec<i64>> {
    v.get(key)
        .and_then(Value::as_array)
        .with_context(|| format!("missing array `{key}`"))?
        .iter()
        .map(|x| {
            x.as_i64()
                .with_context(|| format!("`{key}` holds a non-integer: {x}"))
        })
        .collect()
}

/// E8M0 code of a stored MX scale (255 for NaN).
pub fn e8m0_code(scale: f32) -> i64 {
    if scale.is_nan() || scale <= 0.0 {
        255
    } else {
        (floor_log2(scale) + 127) as i64
    }
}

fn elem_of(format: &str) -> Result<ElemFormat> {
    Ok(match format {
        "MXFP4_E2M1" => ElemFormat::Float(FloatFormat::E2M1),
        "MXFP6_E2M3" => ElemFormat::Float(FloatFormat::E2M3),
        "MXFP6_E3M2" => ElemFormat::Float(FloatFormat::E3M2),
        "MXFP8_E4M3" => ElemFormat::Float(FloatFormat::E4M3),
        "MXFP8_E5M2" => ElemFormat::Float(FloatFormat::E5M2),
        "MXINT8" => ElemFormat::Int { bits: 8 },
        other => bail!("unknown MX format `{other}`"),
    })
}

/// Check one file of this schema.
pub fn check(v: &Value) -> Result<Report> {
    let format = v
        .get("format")
        .and_then(Value::as_str)
        .context("no `format`")?;
    let elem = elem_of(format)?;
    let block = v.get("block_size").and_then(Value::as_u64).unwrap_or(32) as usize;
    if block != 32 {
        bail!("block_size {block}: only 32 is defined by OCP MX");
    }
    let cases = v
        .get("cases")
        .and_then(Value::as_array)
        .context("no `cases`")?;
    let mut rep = Report::default();
    let mut mxpy_diff = 0usize;
    let mut neg_zero = 0usize;
    for case in cases {
        let name = case.get("name").and_then(Value::as_str).unwrap_or("?");
        let rounding = match case.get("rounding").and_then(Value::as_str) {
            Some("nearest") => Rounding::NearestAway,
            Some("even") => Rounding::NearestEven,
            other => bail!("{name}: unknown rounding {other:?}"),
        };
        let tag = format!(
            "{name}/{}",
            if rounding == Rounding::NearestAway {
                "nearest"
            } else {
                "even"
            }
        );
        let rows = case.get("rows").and_then(Value::as_u64).context("rows")? as usize;
        let cols = case.get("cols").and_then(Value::as_u64).context("cols")? as usize;
        let input = f32s(case, "input_f32_bits")?;
        let opts = MxOptions {
            rule: MxScaleRule::Floor,
            rounding,
        };
        let q = quantize_mx(&input, rows, cols, &mx_scheme(elem), &opts)
            .with_context(|| format!("{tag}: quantize"))?;
        let scales = i64s(case, "scale_e8m0")?;
        rep.check(scales.len() == q.scales.len(), || {
            format!(
                "{tag}: {} scales, lowbit has {}",
                scales.len(),
                q.scales.len()
            )
        });
        for (b, (&want, &s)) in scales.iter().zip(&q.scales).enumerate() {
            let got = e8m0_code(s);
            rep.check(got == want, || {
                format!("{tag}: block {b} scale code {got}, want {want}")
            });
        }
        let codes = i64s(case, "elem_codes")?;
        rep.check(codes.len() == rows * cols, || {
            format!("{tag}: elem_codes length")
        });
        for (i, &want) in codes.iter().enumerate().take(rows * cols) {
            if want < 0 {
                continue;
            }
            let mut got = q.code(i / cols, i % cols)? as i64;
            if matches!(elem, ElemFormat::Int { .. }) {
                got ^= 0x80; // stored q + 128 -> two's complement byte of q
            }
            rep.check(got == want, || {
                format!("{tag}: element {i} code {got}, want {want}")
            });
        }
        let deq = q.dequantize()?;
        let want = f32s(case, "dequant_f32_bits")?;
        rep.check(want.len() == deq.len(), || format!("{tag}: dequant length"));
        let is_int = matches!(elem, ElemFormat::Int { .. });
        for (i, (&w, &g)) in want.iter().zip(&deq).enumerate() {
            // MXINT8 codes have no negative zero: the reference's fake-quantized -0.0 (a small
            // negative input rounded to q = 0) is stored as the byte 0 and decodes to +0.0.
            let int_neg_zero = is_int && w == 0.0 && g == 0.0 && codes.get(i) == Some(&0);
            neg_zero += usize::from(int_neg_zero && w.is_sign_negative() && g.is_sign_positive());
            rep.check(same_f32(w, g) || int_neg_zero, || {
                format!("{tag}: dequant[{i}] = {g:e}, want {w:e}")
            });
        }
        if let Some(a) = case
            .get("microxcaling_py_block_agrees")
            .and_then(Value::as_array)
        {
            mxpy_diff += a.iter().filter(|x| x.as_bool() == Some(false)).count();
        }
    }
    rep.note = format!(
        "exact-exponent OCP rule; {mxpy_diff} block(s) where microxcaling's float log2 differs"
    );
    if neg_zero > 0 {
        rep.note += &format!("; {neg_zero} reference -0.0 decoded as +0.0 (int8 codes have no -0)");
    }
    Ok(rep)
}
