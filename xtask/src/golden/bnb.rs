//! Checker for schema `bnb_4bit/v1`: bitsandbytes `quantize_4bit` (NF4 and bnb's FP4 table),
//! with and without double quantization of the absmax (`compress_statistics`).
//!
//! Every case is quantized on the flattened tensor (bitsandbytes' blocks run over the flattened
//! elements) with `nf4::bnb_quantize_4bit` (+ `nf4::double_quantize`), and compared bit-exactly:
//! the 16-entry `quant_map`, every packed byte (first element in the HIGH nibble), the absmax
//! values or, with double quantization, the 8-bit codes, nested absmax, offset and the nested
//! 256-entry dynamic map, and every dequantized value. NF4 cases are also run through the
//! library's `QuantizedTensor` path (`nf4::quantize_bnb` + `to_bnb_packed` + `dequantize`).

use super::{f32s, hex, same_f32, u64s, Report};
use anyhow::{bail, Context, Result};
use lowbit_numerics::nf4::{
    bnb_quantize_4bit, double_quantize, dynamic_map_signed, quantize_bnb, BnbType,
};
use serde_json::Value;

fn pack_high_first(codes: &[u8]) -> Vec<u8> {
    codes
        .chunks(2)
        .map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(0))
        .collect()
}

/// Check one file of this schema.
pub fn check(v: &Value) -> Result<Report> {
    let ty = match v.get("quant_type").and_then(Value::as_str) {
        Some("nf4") => BnbType::Nf4,
        Some("fp4") => BnbType::Fp4,
        other => bail!("unknown bnb quant_type {other:?}"),
    };
    let table = ty.table();
    let mut rep = Report::default();
    let map = f32s(v, "quant_map_f32_bits")?;
    rep.check(map.len() == 16, || {
        format!("quant_map has {} entries", map.len())
    });
    for (i, (&w, &g)) in map.iter().zip(&table).enumerate() {
        rep.check(same_f32(w, g), || {
            format!("quant_map[{i}] = {g:e}, want {w:e}")
        });
    }
    let dmap = dynamic_map_signed();
    let cases = v
        .get("cases")
        .and_then(Value::as_array)
        .context("no `cases`")?;
    for case in cases {
        let name = case
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        let rows = case.get("rows").and_then(Value::as_u64).context("rows")? as usize;
        let cols = case.get("cols").and_then(Value::as_u64).context("cols")? as usize;
        let bs = case
            .get("blocksize")
            .and_then(Value::as_u64)
            .context("blocksize")? as usize;
        let dq = case
            .get("compress_statistics")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let x = f32s(case, "input_f32_bits")?;
        if x.len() != rows * cols {
            bail!("{name}: {} inputs for {rows}x{cols}", x.len());
        }
        let (codes, absmax) = bnb_quantize_4bit(&x, bs, ty)?;
        let want_packed = hex(case
            .get("packed_hex")
            .and_then(Value::as_str)
            .context("packed_hex")?)?;
        let got_packed = pack_high_first(&codes);
        rep.check(want_packed.len() == got_packed.len(), || {
            format!("{name}: packed length")
        });
        for (i, (&w, &g)) in want_packed.iter().zip(&got_packed).enumerate() {
            rep.check(w == g, || {
                format!("{name}: packed byte {i} = {g:#04x}, want {w:#04x}")
            });
        }
        let used_absmax: Vec<f32> = if dq {
            let n = double_quantize(&absmax, 256)?;
            let nb = case
                .get("nested_blocksize")
                .and_then(Value::as_u64)
                .unwrap_or(256) as usize;
            rep.check(nb == n.block, || format!("{name}: nested block {nb}"));
            let want_u8 = u64s(case, "absmax_u8")?;
            rep.check(want_u8.len() == n.codes.len(), || {
                format!("{name}: absmax_u8 length")
            });
            for (i, (&w, &g)) in want_u8.iter().zip(&n.codes).enumerate() {
                rep.check(w == g as u64, || {
                    format!("{name}: absmax_u8[{i}] = {g}, want {w}")
                });
            }
            let want_na = f32s(case, "nested_absmax_f32_bits")?;
            rep.check(want_na.len() == n.absmax.len(), || {
                format!("{name}: nested absmax length")
            });
            for (i, (&w, &g)) in want_na.iter().zip(&n.absmax).enumerate() {
                rep.check(same_f32(w, g), || {
                    format!("{name}: nested_absmax[{i}] = {g:e}, want {w:e}")
                });
            }
            let want_off = f32s(case, "nested_offset_f32_bits")?;
            rep.check(
                want_off.len() == 1 && same_f32(want_off[0], n.offset),
                || format!("{name}: nested offset {:e}, want {want_off:?}", n.offset),
            );
            let want_map = f32s(case, "nested_quant_map_f32_bits")?;
            for (i, (&w, &g)) in want_map.iter().zip(&dmap).enumerate() {
                rep.check(same_f32(w, g), || {
                    format!("{name}: nested map[{i}] = {g:e}, want {w:e}")
                });
            }
            n.dequantize()?
        } else {
            let want = f32s(case, "absmax_f32_bits")?;
            rep.check(want.len() == absmax.len(), || {
                format!("{name}: absmax length")
            });
            for (i, (&w, &g)) in want.iter().zip(&absmax).enumerate() {
                rep.check(same_f32(w, g), || {
                    format!("{name}: absmax[{i}] = {g:e}, want {w:e}")
                });
            }
            absmax.clone()
        };
        let want_deq = f32s(case, "dequant_f32_bits")?;
        rep.check(want_deq.len() == x.len(), || {
            format!("{name}: dequant length")
        });
        for (i, &w) in want_deq.iter().enumerate().take(x.len()) {
            let g = table[codes[i] as usize] * used_absmax[i / bs];
            rep.check(same_f32(w, g), || {
                format!("{name}: dequant[{i}] = {g:e}, want {w:e}")
            });
        }
        if ty == BnbType::Nf4 {
            // the QuantizedTensor path, on the flattened tensor (1 x n)
            let q = quantize_bnb(&x, 1, x.len(), bs, dq)?;
            let p = q.to_bnb_packed()?;
            rep.check(p == want_packed, || {
                format!("{name}: QuantizedTensor::to_bnb_packed differs")
            });
            let d = q.dequantize()?;
            let bad = d.iter().zip(&want_deq).position(|(&g, &w)| !same_f32(g, w));
            rep.check(bad.is_none() && d.len() == want_deq.len(), || {
                let i = bad.unwrap_or(0);
                format!(
                    "{name}: QuantizedTensor::dequantize[{i}] = {:e}, want {:e}",
                    d[i], want_deq[i]
                )
            });
        }
    }
    rep.note = format!("{:?}", ty);
    Ok(rep)
}
