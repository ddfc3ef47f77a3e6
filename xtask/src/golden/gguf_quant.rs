//! Checker for `gguf_quant/v1`: ggml block quantize + dequantize, bit-exact.
//!
//! For every case and row: our `quantize` of the input must equal `quant_hex`, and our
//! `dequantize` of the *golden* bytes must equal `dequant_f32_bits` (NaN compared by NaN-ness).

use super::{f32s, hex, same_f32, Report};
use anyhow::{bail, Context, Result};
use lowbit_numerics::gguf::{dequantize, quantize, GgmlType};
use serde_json::Value;

/// Check one file of this schema.
pub fn check(v: &Value) -> Result<Report> {
    let id = v
        .get("ggml_type_id")
        .and_then(Value::as_u64)
        .context("missing `ggml_type_id`")?;
    let ty = GgmlType::from_id(u32::try_from(id).context("type id out of range")?)?;
    if let Some(name) = v.get("ggml_type").and_then(Value::as_str) {
        if name != ty.name() {
            bail!("ggml_type `{name}` does not match id {id} ({})", ty.name());
        }
    }
    let mut rep = Report::default();
    let bs = v.get("block_size").and_then(Value::as_u64);
    rep.check(bs == Some(ty.block_size() as u64), || {
        format!("block_size {bs:?}, ours {}", ty.block_size())
    });
    let ts = v.get("type_size").and_then(Value::as_u64);
    rep.check(ts == Some(ty.type_size() as u64), || {
        format!("type_size {ts:?}, ours {}", ty.type_size())
    });
    let cases = v
        .get("cases")
        .and_then(Value::as_array)
        .context("missing `cases`")?;
    for case in cases {
        let name = case.get("name").and_then(Value::as_str).unwrap_or("?");
        let rows = case
            .get("rows")
            .and_then(Value::as_u64)
            .context("missing rows")? as usize;
        let cols = case
            .get("cols")
            .and_then(Value::as_u64)
            .context("missing cols")? as usize;
        let input = f32s(case, "input_f32_bits")?;
        let want_deq = f32s(case, "dequant_f32_bits")?;
        let qhex = case
            .get("quant_hex")
            .and_then(Value::as_array)
            .context("missing quant_hex")?;
        if input.len() != rows * cols || want_deq.len() != rows * cols || qhex.len() != rows {
            bail!("{name}: array lengths do not match rows×cols = {rows}×{cols}");
        }
        let mut got_deq = vec![0.0f32; cols];
        for r in 0..rows {
            let want_q = hex(qhex[r].as_str().context("quant_hex entry not a string")?)?;
            let x = &input[r * cols..(r + 1) * cols];
            let mut got_q = Vec::new();
            match quantize(ty, x, &mut got_q) {
                Ok(()) => {
                    let bad: Vec<usize> = (0..want_q.len().max(got_q.len()))
                        .filter(|&i| want_q.get(i) != got_q.get(i))
                        .collect();
                    rep.check(bad.is_empty(), || {
                        let i = bad[0];
                        format!(
                            "{name} row {r}: quantized bytes differ at {} byte(s), first at byte {i} (block {}): ours {:02x?} want {:02x?}",
                            bad.len(),
                            i / ty.type_size(),
                            got_q.get(i),
                            want_q.get(i)
                        )
                    });
                }
                Err(e) => rep.check(false, || format!("{name} row {r}: quantize failed: {e}")),
            }
            match dequantize(ty, &want_q, &mut got_deq) {
                Ok(()) => {
                    let w = &want_deq[r * cols..(r + 1) * cols];
                    for (i, (a, b)) in got_deq.iter().zip(w).enumerate() {
                        rep.check(same_f32(*a, *b), || {
                            format!("{name} row {r} elem {i}: dequant ours {a:e} ({:#010x}) want {b:e} ({:#010x})", a.to_bits(), b.to_bits())
                        });
                    }
                }
                Err(e) => rep.check(false, || format!("{name} row {r}: dequantize failed: {e}")),
            }
        }
    }
    rep.note = format!(
        "{} ({} cases, quantize + dequantize vs ggml C reference)",
        ty.name(),
        cases.len()
    );
    Ok(rep)
}
