//! Reading a compressed-tensors folder back into a [`Checkpoint`].

use super::config::{scheme_from_args, scheme_from_json, ActivationQuant, CtFormat, SCHEMES_FILE};
use super::{e4m3_to_f32, e8m0_to_f32, Checkpoint};
use crate::error::{Error, Result};
use lowbit_numerics::{QuantizedTensor, ScaleDtype, Scheme};
use safetensors::tensor::{Dtype, SafeTensors};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

fn bad(path: &Path, what: impl Into<String>) -> Error {
    Error::Safetensors {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// A raw tensor read from a file.
#[derive(Debug, Clone)]
pub struct RawTensor {
    /// dtype.
    pub dtype: Dtype,
    /// shape.
    pub shape: Vec<usize>,
    /// bytes.
    pub data: Vec<u8>,
}

/// Read `config.json` of a checkpoint folder.
pub fn read_config(dir: &Path) -> Result<Value> {
    let p = dir.join("config.json");
    let s = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    serde_json::from_str(&s).map_err(|e| bad(&p, format!("invalid JSON: {e}")))
}

/// The `.safetensors` files of a folder (from the index when sharded).
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let idx = dir.join("model.safetensors.index.json");
    if idx.exists() {
        let s = std::fs::read_to_string(&idx).map_err(|e| Error::io(&idx, e))?;
        let v: Value =
            serde_json::from_str(&s).map_err(|e| bad(&idx, format!("invalid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| bad(&idx, "no weight_map"))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|x| x.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(bad(
        dir,
        "no model.safetensors or model.safetensors.index.json",
    ))
}

/// Read every tensor of every shard.
pub fn read_all_tensors(dir: &Path) -> Result<BTreeMap<String, RawTensor>> {
    let mut out = BTreeMap::new();
    for f in safetensors_files(dir)? {
        let bytes = std::fs::read(&f).map_err(|e| Error::io(&f, e))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(&f, e.to_string()))?;
        for (name, v) in st.iter() {
            out.insert(
                name.to_string(),
                RawTensor {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    data: v.data().to_vec(),
                },
            );
        }
    }
    Ok(out)
}

/// Convert a float tensor (F32, F16, BF16, F64) to f32 values.
pub fn to_f32(t: &RawTensor) -> Option<Vec<f32>> {
    Some(match t.dtype {
        Dtype::F32 => t
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => t
            .data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => t
            .data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => t
            .data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        Dtype::F8_E4M3 => t.data.iter().map(|&b| e4m3_to_f32(b)).collect(),
        _ => return None,
    })
}

fn i32s(t: &RawTensor) -> Option<Vec<i32>> {
    match t.dtype {
        Dtype::I32 | Dtype::U32 => Some(
            t.data
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        Dtype::I64 => Some(
            t.data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as i32)
                .collect(),
        ),
        _ => None,
    }
}

/// Unpack `[ceil(rows*bits/32), cols]` int32 words (packed along dim 0) into `rows x cols` codes.
pub fn unpack_dim0_i32(words: &[i32], rows: usize, cols: usize, bits: u32) -> Vec<u8> {
    let bits = bits as usize;
    let mask = (1u64 << bits) - 1;
    let mut out = vec![0u8; rows * cols];
    let wrows = words.len() / cols.max(1);
    for i in 0..rows {
        let bit = i * bits;
        let w = bit / 32;
        let off = bit % 32;
        for j in 0..cols {
            let lo = words[w * cols + j] as u32 as u64;
            let hi = if w + 1 < wrows {
                words[(w + 1) * cols + j] as u32 as u64
            } else {
                0
            };
            out[i * cols + j] = (((lo | (hi << 32)) >> off) & mask) as u8;
        }
    }
    out
}

/// Decode one quantized module from its tensors.
pub fn decode_module(
    name: &str,
    scheme: Scheme,
    format: CtFormat,
    get: &dyn Fn(&str) -> Option<RawTensor>,
    shape_hint: Option<(usize, usize)>,
) -> std::result::Result<QuantizedTensor, String> {
    let need = |s: &str| get(s).ok_or_else(|| format!("{name}: missing tensor `{name}.{s}`"));
    let bits = scheme.elem.bits();
    // Shape: weight_shape if present, else from the weight tensor.
    let shape = if let Some(t) = get("weight_shape") {
        let v = i32s(&t).ok_or_else(|| format!("{name}.weight_shape: not an integer tensor"))?;
        if v.len() != 2 || v[0] < 0 || v[1] < 0 {
            return Err(format!(
                "{name}.weight_shape: expected 2 non-negative entries, got {v:?}"
            ));
        }
        (v[0] as usize, v[1] as usize)
    } else if let Some(t) = get("weight") {
        if t.shape.len() != 2 {
            return Err(format!("{name}.weight: expected 2-D, got {:?}", t.shape));
        }
        (t.shape[0], t.shape[1])
    } else if let Some(s) = shape_hint {
        s
    } else if let Some(t) = get("weight_packed") {
        // u8 packs: two FP4 codes per byte.
        (t.shape[0], t.shape[1] * 8 / bits as usize)
    } else {
        return Err(format!("{name}: cannot tell the weight shape"));
    };
    let (rows, cols) = shape;
    let rb = lowbit_numerics::tensor::packed_row_bytes(cols, bits);
    let (gr, gc) = scheme.granularity.grid(rows, cols);
    let nblocks = gr * gc;
    let mut data = match format {
        CtFormat::PackQuantized => {
            let t = need("weight_packed")?;
            let words = (cols * bits as usize).div_ceil(32);
            if t.data.len() != rows * words * 4 {
                return Err(format!(
                    "{name}.weight_packed: {} bytes, expected {}",
                    t.data.len(),
                    rows * words * 4
                ));
            }
            let mut d = vec![0u8; rows * rb];
            for r in 0..rows {
                d[r * rb..(r + 1) * rb].copy_from_slice(&t.data[r * words * 4..r * words * 4 + rb]);
            }
            d
        }
        CtFormat::IntQuantized | CtFormat::FloatQuantized => {
            let t = need("weight")?;
            if t.data.len() != rows * cols {
                return Err(format!(
                    "{name}.weight: {} bytes, expected {}",
                    t.data.len(),
                    rows * cols
                ));
            }
            if format == CtFormat::IntQuantized {
                t.data.iter().map(|&b| b ^ 0x80).collect()
            } else {
                t.data
            }
        }
        _ => {
            let t = need("weight_packed")?;
            if t.data.len() != rows * rb {
                return Err(format!(
                    "{name}.weight_packed: {} bytes, expected {}",
                    t.data.len(),
                    rows * rb
                ));
            }
            t.data
        }
    };
    // Clear padding bits past the last code of each row (canonical form).
    let used = cols * bits as usize;
    if used % 8 != 0 && rb > 0 {
        let keep = (1u16 << (used % 8)) as u8 - 1;
        for r in 0..rows {
            data[r * rb + rb - 1] &= keep;
        }
    }
    let st = need("weight_scale")?;
    let scales: Vec<f32> = match (format, scheme.scale_dtype) {
        (CtFormat::LowbitPacked, _) => {
            to_f32(&st).ok_or_else(|| format!("{name}.weight_scale: bad dtype"))?
        }
        (_, ScaleDtype::E8M0) => st.data.iter().map(|&b| e8m0_to_f32(b)).collect(),
        _ => to_f32(&st)
            .ok_or_else(|| format!("{name}.weight_scale: unsupported dtype {:?}", st.dtype))?,
    };
    if scales.len() != nblocks {
        return Err(format!(
            "{name}.weight_scale: {} values, expected {nblocks}",
            scales.len()
        ));
    }
    let zero_points = if scheme.asymmetric {
        let t = need("weight_zero_point")?;
        Some(match format {
            CtFormat::PackQuantized => {
                let w = i32s(&t).ok_or_else(|| format!("{name}.weight_zero_point: not int32"))?;
                if w.len() != (gr * bits as usize).div_ceil(32) * gc {
                    return Err(format!(
                        "{name}.weight_zero_point: {} words, wrong for {gr}x{gc} groups",
                        w.len()
                    ));
                }
                unpack_dim0_i32(&w, gr, gc, bits)
            }
            CtFormat::IntQuantized => t.data.iter().map(|&b| b ^ 0x80).collect(),
            _ => t.data,
        })
    } else {
        None
    };
    let global_scale = if scheme.global_scale {
        let t = need("weight_global_scale")?;
        Some(
            *to_f32(&t)
                .and_then(|v| v.first().copied())
                .as_ref()
                .ok_or_else(|| format!("{name}.weight_global_scale: empty"))?,
        )
    } else {
        None
    };
    let g_idx = match get("weight_g_idx") {
        Some(t) => Some(
            i32s(&t)
                .ok_or_else(|| format!("{name}.weight_g_idx: not int32"))?
                .into_iter()
                .map(|x| x.max(0) as u32)
                .collect(),
        ),
        None => None,
    };
    let q = QuantizedTensor {
        scheme,
        rows,
        cols,
        data,
        scales,
        zero_points,
        global_scale,
        g_idx,
        nested: None,
    };
    q.validate().map_err(|e| format!("{name}: {e}"))?;
    Ok(q)
}

const SUFFIXES: [&str; 7] = [
    "weight_packed",
    "weight_scale",
    "weight_zero_point",
    "weight_g_idx",
    "weight_shape",
    "weight_global_scale",
    "weight",
];

/// Read a compressed-tensors checkpoint folder. Dense tensors are converted to f32; quantized
/// modules are decoded into [`QuantizedTensor`]s (exact schemes from the lowbit sidecar when
/// present, else derived from the standard `quantization_config`).
pub fn read_checkpoint(dir: &Path) -> Result<Checkpoint> {
    let mut cfg = read_config(dir)?;
    let qc = cfg
        .as_object_mut()
        .and_then(|m| m.remove("quantization_config"));
    let side: Option<Value> = {
        let p = dir.join(SCHEMES_FILE);
        if p.exists() {
            let s = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            Some(serde_json::from_str(&s).map_err(|e| bad(&p, format!("invalid JSON: {e}")))?)
        } else {
            None
        }
    };
    let mut tensors = read_all_tensors(dir)?;
    // Which modules are quantized: every `X.weight_scale`.
    let modules: Vec<String> = tensors
        .keys()
        .filter_map(|k| k.strip_suffix(".weight_scale").map(String::from))
        .collect();
    let mut ck = Checkpoint::default();
    let groups: Vec<(String, Value)> = qc
        .as_ref()
        .and_then(|q| q.get("config_groups"))
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let ignore: Vec<String> = qc
        .as_ref()
        .and_then(|q| q.get("ignore"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let top_format = qc
        .as_ref()
        .and_then(|q| q.get("format"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let mut act: Option<ActivationQuant> = None;
    let mut assigned: HashMap<String, (Scheme, CtFormat)> = HashMap::new();
    for (gname, g) in &groups {
        let fmt_name = g
            .get("format")
            .and_then(Value::as_str)
            .unwrap_or(top_format);
        let format = CtFormat::from_name(fmt_name).ok_or_else(|| {
            bad(
                dir,
                format!("config group {gname}: unsupported format `{fmt_name}`"),
            )
        })?;
        let exact = side
            .as_ref()
            .and_then(|s| s.get("groups"))
            .and_then(|s| s.get(gname))
            .and_then(|s| s.get("scheme"))
            .and_then(scheme_from_json);
        let scheme = match exact {
            Some(s) => s,
            None => g
                .get("weights")
                .and_then(|w| scheme_from_args(format, w))
                .ok_or_else(|| {
                    bad(
                        dir,
                        format!("config group {gname}: weight arguments not understood"),
                    )
                })?,
        };
        if let Some(a) = g.get("input_activations").filter(|v| !v.is_null()) {
            act = Some(ActivationQuant::from_args(a).ok_or_else(|| {
                bad(dir, format!("config group {gname}: only per-token dynamic 8-bit input activations are supported"))
            })?);
        }
        let targets: Vec<String> = g
            .get("targets")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        for m in &modules {
            if assigned.contains_key(m) {
                continue;
            }
            let short = m.rsplit('.').next().unwrap_or(m);
            let hit = targets.iter().any(|t| {
                t == m
                    || t == "Linear"
                    || t.strip_prefix("re:").is_some_and(|r| {
                        let r = r.trim_start_matches(".*").trim_end_matches('$');
                        m.ends_with(r) || short == r
                    })
            }) && !ignore.iter().any(|i| i == m);
            if hit {
                assigned.insert(m.clone(), (scheme, format));
            }
        }
    }
    for m in &modules {
        let (scheme, format) = *assigned.get(m).ok_or_else(|| {
            bad(
                dir,
                format!("module `{m}` has quantized tensors but no config group targets it"),
            )
        })?;
        let lookup = |s: &str| tensors.get(&format!("{m}.{s}")).cloned();
        let q = decode_module(m, scheme, format, &lookup, None).map_err(|e| bad(dir, e))?;
        ck.quantized.push((m.clone(), q));
    }
    for (m, _) in &ck.quantized {
        for s in SUFFIXES {
            tensors.remove(&format!("{m}.{s}"));
        }
    }
    for (name, t) in tensors {
        if name.ends_with(".input_scale") || name.ends_with(".input_zero_point") {
            continue;
        }
        let v = to_f32(&t).ok_or_else(|| {
            bad(
                dir,
                format!("{name}: unsupported dense dtype {:?}", t.dtype),
            )
        })?;
        ck.dense.push((name, t.shape, v));
    }
    ck.hf_config = cfg;
    ck.ignore = ignore;
    ck.input_activations = act;
    ck.quantized.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(ck)
}
