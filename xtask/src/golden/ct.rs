//! Checker for schemas `ct_nvfp4/v1` and `ct_mxfp4/v1`: compressed-tensors NVFP4 / MXFP4 weight
//! quantization.
//!
//! NVFP4 is quantized with `nvfp4::quantize_nvfp4(.., CompressedTensors)`, MXFP4 with
//! `mx::quantize_mx` and the compressed-tensors scale rule (`RoundUp175`) with ties-to-even
//! elements. Compared bit-exactly: the global scale, every block scale code (E4M3 / E8M0), every
//! element code, every packed byte (`weight_packed_hex`, low nibble = even column, which is
//! lowbit's own layout), the f32 dequantization and its bf16 rounding
//! (`ct_decompress_bf16_bits`). Variants with a lowbit equivalent are checked too: NVFP4
//! `transformer_engine_reference` (`Nvfp4Formula::TransformerEngine`), MXFP4 `ocp_floor_rne`
//! (`MxScaleRule::Floor`) and `ceil_amax_over_6_rne` (`MxScaleRule::Ceil`); their codes are the
//! compressed-tensors ones where `agrees_with_compressed_tensors` is true.

use super::mx_block::e8m0_code;
use super::{f32s, hex, same_f32, u64s, Report};
use anyhow::{bail, Context, Result};
use half::bf16;
use lowbit_numerics::mx::{mx_scheme, quantize_mx, MxOptions, MxScaleRule};
use lowbit_numerics::nvfp4::{quantize_nvfp4, Nvfp4Formula};
use lowbit_numerics::{ElemFormat, FloatFormat, Overflow, QuantizedTensor, Rounding};
use serde_json::Value;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Nvfp4,
    Mxfp4,
}

fn quant(
    kind: Kind,
    variant: Option<&str>,
    w: &[f32],
    rows: usize,
    cols: usize,
) -> Result<QuantizedTensor> {
    Ok(match (kind, variant) {
        (Kind::Nvfp4, None) => quantize_nvfp4(w, rows, cols, Nvfp4Formula::CompressedTensors)?,
        (Kind::Nvfp4, Some(_)) => quantize_nvfp4(w, rows, cols, Nvfp4Formula::TransformerEngine)?,
        (Kind::Mxfp4, v) => {
            let rule = match v {
                None => MxScaleRule::RoundUp175,
                Some("ocp_floor_rne") => MxScaleRule::Floor,
                Some(_) => MxScaleRule::Ceil,
            };
            let opts = MxOptions {
                rule,
                rounding: Rounding::NearestEven,
            };
            quantize_mx(
                w,
                rows,
                cols,
                &mx_scheme(ElemFormat::Float(FloatFormat::E2M1)),
                &opts,
            )?
        }
    })
}

fn scale_code(kind: Kind, s: f32) -> i64 {
    match kind {
        Kind::Nvfp4 => {
            FloatFormat::E4M3.encode(s, Rounding::NearestEven, Overflow::Saturate) as i64
        }
        Kind::Mxfp4 => e8m0_code(s),
    }
}

/// Flatten a JSON array of arrays of integers.
fn nested_i64s(v: &Value, key: &str) -> Result<Vec<i64>> {
    let rows = v
        .get(key)
        .and_then(Value::as_array)
        .with_context(|| format!("missing `{key}`"))?;
    let mut out = Vec::new();
    for r in rows {
        let r = r
            .as_array()
            .with_context(|| format!("`{key}` is not an array of arrays"))?;
        for x in r {
            out.push(
                x.as_i64()
                    .with_context(|| format!("`{key}` holds a non-integer"))?,
            );
        }
    }
    Ok(out)
}

fn compare_codes(
    rep: &mut Report,
    tag: &str,
    q: &QuantizedTensor,
    scales: &[i64],
    elems: &[i64],
    kind: Kind,
) -> Result<()> {
    rep.check(scales.len() == q.scales.len(), || {
        format!(
            "{tag}: {} scales, lowbit has {}",
            scales.len(),
            q.scales.len()
        )
    });
    for (b, (&want, &s)) in scales.iter().zip(&q.scales).enumerate() {
        let got = scale_code(kind, s);
        rep.check(got == want, || {
            format!("{tag}: block {b} scale code {got}, want {want}")
        });
    }
    rep.check(elems.len() == q.rows * q.cols, || {
        format!("{tag}: elem_codes length")
    });
    for (i, &want) in elems.iter().enumerate().take(q.rows * q.cols) {
        let got = q.code(i / q.cols, i % q.cols)? as i64;
        rep.check(got == want, || {
            format!("{tag}: element {i} code {got}, want {want}")
        });
    }
    Ok(())
}

/// Check one file of this schema.
pub fn check(v: &Value) -> Result<Report> {
    let kind = match v.get("schema").and_then(Value::as_str) {
        Some("ct_nvfp4/v1") => Kind::Nvfp4,
        Some("ct_mxfp4/v1") => Kind::Mxfp4,
        other => bail!("not a compressed-tensors schema: {other:?}"),
    };
    let (scale_key, group) = match kind {
        Kind::Nvfp4 => ("weight_scale_e4m3_codes", 16),
        Kind::Mxfp4 => ("weight_scale_e8m0", 32),
    };
    if let Some(g) = v.get("group_size").and_then(Value::as_u64) {
        if g != group {
            bail!("group_size {g}, expected {group}");
        }
    }
    let cases = v
        .get("cases")
        .and_then(Value::as_array)
        .context("no `cases`")?;
    let mut rep = Report::default();
    let mut variants_checked = 0usize;
    for case in cases {
        let name = case
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        let rows = case.get("rows").and_then(Value::as_u64).context("rows")? as usize;
        let cols = case.get("cols").and_then(Value::as_u64).context("cols")? as usize;
        let input = f32s(case, "input_f32_bits")?;
        let q =
            quant(kind, None, &input, rows, cols).with_context(|| format!("{name}: quantize"))?;
        if kind == Kind::Nvfp4 {
            let want = f32s(case, "weight_global_scale_f32_bits")?;
            let got = q.global_scale.unwrap_or(f32::NAN);
            rep.check(want.len() == 1 && same_f32(want[0], got), || {
                format!("{name}: global scale {got:e}, want {want:?}")
            });
        }
        let scales = nested_i64s(case, scale_key)?;
        let elems = nested_i64s(case, "elem_codes")?;
        compare_codes(&mut rep, &name, &q, &scales, &elems, kind)?;
        let packed = case
            .get("weight_packed_hex")
            .and_then(Value::as_array)
            .context("weight_packed_hex")?;
        rep.check(packed.len() == rows, || {
            format!("{name}: {} packed rows", packed.len())
        });
        let rb = q.row_bytes();
        for (r, h) in packed.iter().enumerate().take(rows) {
            let want = hex(h.as_str().context("packed row is not a string")?)?;
            let got = &q.data[r * rb..(r + 1) * rb];
            rep.check(want == got, || format!("{name}: packed row {r} differs"));
        }
        let deq = q.dequantize()?;
        let want = f32s(case, "dequant_f32_bits")?;
        rep.check(want.len() == deq.len(), || {
            format!("{name}: dequant length")
        });
        for (i, (&w, &g)) in want.iter().zip(&deq).enumerate() {
            rep.check(same_f32(w, g), || {
                format!("{name}: dequant[{i}] = {g:e}, want {w:e}")
            });
        }
        let want_bf = u64s(case, "ct_decompress_bf16_bits")?;
        for (i, (&w, &g)) in want_bf.iter().zip(&deq).enumerate() {
            let got = bf16::from_f32(g).to_bits() as u64;
            rep.check(got == w, || {
                format!("{name}: bf16 dequant[{i}] = {got:#06x}, want {w:#06x}")
            });
        }
        // variants lowbit implements
        let Some(vars) = case.get("variants").and_then(Value::as_object) else {
            continue;
        };
        let ours: &[&str] = match kind {
            Kind::Nvfp4 => &["transformer_engine_reference"],
            Kind::Mxfp4 => &["ocp_floor_rne", "ceil_amax_over_6_rne"],
        };
        for &vn in ours {
            let Some(var) = vars.get(vn) else { continue };
            variants_checked += 1;
            let tag = format!("{name}/{vn}");
            let qv = quant(kind, Some(vn), &input, rows, cols)
                .with_context(|| format!("{tag}: quantize"))?;
            if let Some(g) = var
                .get("global_encode_scale_f32_bits")
                .and_then(Value::as_u64)
            {
                let got = qv.global_scale.unwrap_or(f32::NAN);
                rep.check(same_f32(f32::from_bits(g as u32), got), || {
                    format!("{tag}: global scale {got:e}")
                });
            }
            let agrees = var
                .get("agrees_with_compressed_tensors")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            if agrees {
                compare_codes(&mut rep, &tag, &qv, &scales, &elems, kind)?;
            } else {
                let vs = nested_i64s(var, "scale_e4m3_codes")
                    .or_else(|_| nested_i64s(var, "scale_e8m0"))?;
                let ve = nested_i64s(var, "elem_codes")?;
                compare_codes(&mut rep, &tag, &qv, &vs, &ve, kind)?;
            }
        }
    }
    rep.note = format!("compressed-tensors formula + {variants_checked} variant case(s)");
    Ok(rep)
}
