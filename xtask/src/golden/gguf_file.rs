//! Checker for `gguf_file/v1`: parse the GGUF file named beside the JSON and compare its header,
//! every metadata KV (key, value type ids, value), tensor infos, data offsets and data prefixes.

use super::{hex, Report};
use anyhow::{Context, Result};
use lowbit_model::gguf::{GgufFile, GgufValue};
use serde_json::Value;
use std::path::Path;

/// Check one file of this schema.
pub fn check(v: &Value, json_path: &Path) -> Result<Report> {
    let name = v
        .get("file")
        .and_then(Value::as_str)
        .context("missing `file`")?;
    let gguf_path = json_path.parent().unwrap_or(Path::new(".")).join(name);
    let f =
        GgufFile::open(&gguf_path).with_context(|| format!("parsing {}", gguf_path.display()))?;
    let bytes = f.file_bytes();
    let mut r = Report::default();

    let size = v
        .get("file_size")
        .and_then(Value::as_u64)
        .context("missing `file_size`")?;
    r.check(size == bytes.len() as u64, || {
        format!("file_size: json {size}, file {}", bytes.len())
    });
    let head = hex(v
        .get("header_hex")
        .and_then(Value::as_str)
        .context("missing `header_hex`")?)?;
    r.check(bytes.starts_with(&head), || {
        "header_hex differs from the file's first bytes".into()
    });

    let kvs = v
        .get("kv")
        .and_then(Value::as_array)
        .context("missing `kv`")?;
    let mut ours: Vec<(String, Vec<u32>, GgufValue)> = vec![
        ("GGUF.version".into(), vec![4], GgufValue::U32(f.version())),
        (
            "GGUF.tensor_count".into(),
            vec![10],
            GgufValue::U64(f.tensors().len() as u64),
        ),
        (
            "GGUF.kv_count".into(),
            vec![10],
            GgufValue::U64(f.metadata().len() as u64),
        ),
    ];
    for ((k, val), types) in f.metadata().iter().zip(f.metadata_types()) {
        ours.push((k.clone(), types.clone(), val.clone()));
    }
    r.check(kvs.len() == ours.len(), || {
        format!("kv count: json {}, parsed {}", kvs.len(), ours.len())
    });
    for (j, (k, types, val)) in kvs.iter().zip(&ours) {
        let jk = j.get("key").and_then(Value::as_str).unwrap_or("?");
        r.check(jk == k, || format!("kv key: json `{jk}`, parsed `{k}`"));
        let jt: Vec<u32> = j
            .get("types")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_u64)
                    .map(|x| x as u32)
                    .collect()
            })
            .unwrap_or_default();
        r.check(&jt == types, || {
            format!("kv `{k}` types: json {jt:?}, parsed {types:?}")
        });
        let jv = j.get("value").unwrap_or(&Value::Null);
        r.check(value_eq(jv, val), || {
            format!("kv `{k}` value: json {jv}, parsed {val:?}")
        });
    }

    let ts = v
        .get("tensors")
        .and_then(Value::as_array)
        .context("missing `tensors`")?;
    r.check(ts.len() == f.tensors().len(), || {
        format!(
            "tensor count: json {}, parsed {}",
            ts.len(),
            f.tensors().len()
        )
    });
    for (j, t) in ts.iter().zip(f.tensors()) {
        let n = &t.name;
        let field = |k: &str| j.get(k).cloned().unwrap_or(Value::Null);
        r.check(field("name") == n.as_str(), || {
            format!("tensor name: json {}, parsed `{n}`", field("name"))
        });
        r.check(field("ggml_type") == t.ggml_type.name(), || {
            format!(
                "`{n}` ggml_type: json {}, parsed {}",
                field("ggml_type"),
                t.ggml_type
            )
        });
        r.check(field("ggml_type_id") == t.ggml_type.id(), || {
            format!(
                "`{n}` ggml_type_id: json {}, parsed {}",
                field("ggml_type_id"),
                t.ggml_type.id()
            )
        });
        r.check(
            field("dims_ne_order") == Value::from(t.dims.clone()),
            || {
                format!(
                    "`{n}` dims: json {}, parsed {:?}",
                    field("dims_ne_order"),
                    t.dims
                )
            },
        );
        r.check(field("n_elements") == t.n_elements(), || {
            format!(
                "`{n}` n_elements: json {}, parsed {}",
                field("n_elements"),
                t.n_elements()
            )
        });
        r.check(field("n_bytes") == t.n_bytes, || {
            format!(
                "`{n}` n_bytes: json {}, parsed {}",
                field("n_bytes"),
                t.n_bytes
            )
        });
        r.check(field("data_offset_abs") == t.offset_abs, || {
            format!(
                "`{n}` data_offset_abs: json {}, parsed {}",
                field("data_offset_abs"),
                t.offset_abs
            )
        });
        let prefix = hex(field("data_hex_prefix").as_str().unwrap_or(""))?;
        let data = &bytes[t.offset_abs as usize..];
        r.check(data.starts_with(&prefix) && !prefix.is_empty(), || {
            format!("`{n}` data prefix differs")
        });
        // The data must also be readable through the public accessors.
        r.check(
            f.tensor_f32(n)
                .map(|x| x.len() as u64 == t.n_elements())
                .unwrap_or(false),
            || format!("`{n}` does not dequantize"),
        );
    }
    let start = v
        .get("tensor_data_start_abs")
        .and_then(Value::as_u64)
        .context("missing `tensor_data_start_abs`")?;
    r.check(start == f.data_start(), || {
        format!(
            "tensor_data_start_abs: json {start}, parsed {}",
            f.data_start()
        )
    });
    r.note = format!(
        "{} kv, {} tensors, alignment {}",
        f.metadata().len(),
        f.tensors().len(),
        f.alignment()
    );
    Ok(r)
}

/// A JSON value equals a GGUF value: integers exactly, floats as the stored width, arrays
/// element-wise.
fn value_eq(j: &Value, v: &GgufValue) -> bool {
    match v {
        GgufValue::Array(a) => j
            .as_array()
            .is_some_and(|ja| ja.len() == a.len() && ja.iter().zip(a).all(|(x, y)| value_eq(x, y))),
        GgufValue::String(s) => j.as_str() == Some(s.as_str()),
        GgufValue::Bool(b) => j.as_bool() == Some(*b),
        GgufValue::F32(x) => j
            .as_f64()
            .is_some_and(|y| (y as f32).to_bits() == x.to_bits()),
        GgufValue::F64(x) => j.as_f64().is_some_and(|y| y.to_bits() == x.to_bits()),
        GgufValue::U64(x) => j.as_u64() == Some(*x),
        GgufValue::I64(x) => j.as_i64() == Some(*x),
        other => match (other.as_i64(), j.as_i64()) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        },
    }
}
