//! Writing a [`Checkpoint`] as a compressed-tensors folder (atomically: into a temporary sibling
//! folder that is renamed into place only once every file is complete).

use super::config::{format_for, scheme_to_json, weights_args, CtFormat, SCHEMES_FILE};
use super::{e4m3_from_f32_exact, e8m0_from_f32_exact, Checkpoint};
use crate::error::{Error, Result};
use lowbit_numerics::{Granularity, QuantizedTensor, ScaleDtype, Scheme};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Options of [`write_checkpoint`].
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Start a new `.safetensors` shard when the current one would exceed this many bytes
    /// (default 2 GB, as Hugging Face does).
    pub shard_bytes: usize,
    /// Replace an existing output folder (only if it is empty or was written by lowbit, i.e.
    /// holds `lowbit-report.json` or the lowbit sidecar).
    pub overwrite: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            shard_bytes: 2_000_000_000,
            overwrite: true,
        }
    }
}

/// One tensor ready to be serialized.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedTensor {
    /// safetensors dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub data: Vec<u8>,
}

impl OwnedTensor {
    fn f32s(shape: Vec<usize>, v: &[f32]) -> Self {
        Self {
            dtype: Dtype::F32,
            shape,
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
    fn i32s(shape: Vec<usize>, v: &[i32]) -> Self {
        Self {
            dtype: Dtype::I32,
            shape,
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

fn bad(path: &Path, what: impl Into<String>) -> Error {
    Error::Safetensors {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// Shape of `weight_scale` / `weight_zero_point` on the block grid.
fn scale_shape(q: &QuantizedTensor) -> Vec<usize> {
    let (gr, gc) = q.grid();
    match q.scheme.granularity {
        Granularity::PerTensor => vec![1],
        _ => vec![gr, gc],
    }
}

/// Scales in a standard float dtype.
fn encode_scales(q: &QuantizedTensor, name: &str) -> std::result::Result<OwnedTensor, String> {
    let shape = scale_shape(q);
    let s = &q.scales;
    Ok(match q.scheme.scale_dtype {
        ScaleDtype::F16 => OwnedTensor {
            dtype: Dtype::F16,
            shape,
            data: s
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
        },
        ScaleDtype::Bf16 => OwnedTensor {
            dtype: Dtype::BF16,
            shape,
            data: s
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
        },
        ScaleDtype::E4M3 => {
            let mut data = Vec::with_capacity(s.len());
            for &x in s {
                data.push(e4m3_from_f32_exact(x).ok_or_else(|| {
                    format!("{name}: scale {x} is not exactly representable in E4M3")
                })?);
            }
            OwnedTensor {
                dtype: Dtype::F8_E4M3,
                shape,
                data,
            }
        }
        ScaleDtype::E8M0 => {
            let mut data = Vec::with_capacity(s.len());
            for &x in s {
                data.push(
                    e8m0_from_f32_exact(x)
                        .ok_or_else(|| format!("{name}: scale {x} is not a power of two (E8M0)"))?,
                );
            }
            OwnedTensor {
                dtype: Dtype::U8,
                shape,
                data,
            }
        }
        _ => OwnedTensor::f32s(shape, s),
    })
}

/// Repack per-row byte streams into int32 words per row (compressed-tensors `pack_to_int32`
/// along the last dim: element `i` at bit `i * bits`, LSB first, rows padded to whole words).
pub fn rows_to_i32_words(data: &[u8], rows: usize, row_bytes: usize, words: usize) -> Vec<u8> {
    let mut out = vec![0u8; rows * words * 4];
    for r in 0..rows {
        out[r * words * 4..r * words * 4 + row_bytes]
            .copy_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
    }
    out
}

/// Pack a `rows x cols` matrix of `bits`-wide codes along dim 0 into int32 words:
/// output `[ceil(rows*bits/32), cols]`, element `(i, j)` at bit `i * bits` of column `j`'s stream.
pub fn pack_dim0_i32(codes: &[u8], rows: usize, cols: usize, bits: u32) -> (Vec<i32>, usize) {
    let bits = bits as usize;
    let out_rows = (rows * bits).div_ceil(32);
    let mut out = vec![0u32; out_rows * cols];
    for i in 0..rows {
        let bit = i * bits;
        for j in 0..cols {
            let v = (codes[i * cols + j] as u64) & ((1u64 << bits) - 1);
            let w = bit / 32;
            let off = bit % 32;
            let wide = v << off;
            out[w * cols + j] |= wide as u32;
            if off + bits > 32 {
                out[(w + 1) * cols + j] |= (wide >> 32) as u32;
            }
        }
    }
    (out.into_iter().map(|x| x as i32).collect(), out_rows)
}

/// The tensors (suffix, tensor) that store one quantized module in `format`.
pub fn encode_module(
    name: &str,
    q: &QuantizedTensor,
    format: CtFormat,
) -> std::result::Result<Vec<(String, OwnedTensor)>, String> {
    q.validate().map_err(|e| format!("{name}: {e}"))?;
    let bits = q.scheme.elem.bits();
    let (rows, cols) = (q.rows, q.cols);
    let rb = q.row_bytes();
    let mut out: Vec<(String, OwnedTensor)> = Vec::new();
    let shape_t = OwnedTensor {
        dtype: Dtype::I64,
        shape: vec![2],
        data: [rows as i64, cols as i64]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
    };
    let (gr, gc) = q.grid();
    match format {
        CtFormat::PackQuantized => {
            let words = (cols * bits as usize).div_ceil(32);
            out.push((
                "weight_packed".into(),
                OwnedTensor {
                    dtype: Dtype::I32,
                    shape: vec![rows, words],
                    data: rows_to_i32_words(&q.data, rows, rb, words),
                },
            ));
            out.push(("weight_scale".into(), encode_scales(q, name)?));
            if let Some(z) = &q.zero_points {
                let (packed, prow) = pack_dim0_i32(z, gr, gc, bits);
                out.push((
                    "weight_zero_point".into(),
                    OwnedTensor::i32s(vec![prow, gc], &packed),
                ));
            }
            out.push(("weight_shape".into(), shape_t));
        }
        CtFormat::IntQuantized => {
            out.push((
                "weight".into(),
                OwnedTensor {
                    dtype: Dtype::I8,
                    shape: vec![rows, cols],
                    data: q.data.iter().map(|&u| u ^ 0x80).collect(),
                },
            ));
            out.push(("weight_scale".into(), encode_scales(q, name)?));
            if let Some(z) = &q.zero_points {
                out.push((
                    "weight_zero_point".into(),
                    OwnedTensor {
                        dtype: Dtype::I8,
                        shape: scale_shape(q),
                        data: z.iter().map(|&u| u ^ 0x80).collect(),
                    },
                ));
            }
        }
        CtFormat::FloatQuantized => {
            let dtype = if bits == 8
                && matches!(
                    q.scheme.elem,
                    lowbit_numerics::ElemFormat::Float(lowbit_numerics::FloatFormat::E5M2)
                ) {
                Dtype::F8_E5M2
            } else {
                Dtype::F8_E4M3
            };
            out.push((
                "weight".into(),
                OwnedTensor {
                    dtype,
                    shape: vec![rows, cols],
                    data: q.data.clone(),
                },
            ));
            out.push(("weight_scale".into(), encode_scales(q, name)?));
        }
        CtFormat::Nvfp4PackQuantized | CtFormat::Mxfp4PackQuantized => {
            out.push((
                "weight_packed".into(),
                OwnedTensor {
                    dtype: Dtype::U8,
                    shape: vec![rows, rb],
                    data: q.data.clone(),
                },
            ));
            out.push(("weight_scale".into(), encode_scales(q, name)?));
            if let Some(g) = q.global_scale {
                out.push((
                    "weight_global_scale".into(),
                    OwnedTensor::f32s(vec![1], &[g]),
                ));
            }
        }
        CtFormat::LowbitPacked => {
            out.push((
                "weight_packed".into(),
                OwnedTensor {
                    dtype: Dtype::U8,
                    shape: vec![rows, rb],
                    data: q.data.clone(),
                },
            ));
            out.push((
                "weight_scale".into(),
                OwnedTensor::f32s(vec![gr, gc], &q.scales),
            ));
            if let Some(z) = &q.zero_points {
                out.push((
                    "weight_zero_point".into(),
                    OwnedTensor {
                        dtype: Dtype::U8,
                        shape: vec![gr, gc],
                        data: z.clone(),
                    },
                ));
            }
            if let Some(g) = q.global_scale {
                out.push((
                    "weight_global_scale".into(),
                    OwnedTensor::f32s(vec![1], &[g]),
                ));
            }
            out.push(("weight_shape".into(), shape_t));
        }
    }
    if let Some(g) = &q.g_idx {
        let v: Vec<i32> = g.iter().map(|&x| x as i32).collect();
        out.push(("weight_g_idx".into(), OwnedTensor::i32s(vec![cols], &v)));
    }
    Ok(out)
}

/// Group quantized modules by (scheme, act-order) into compressed-tensors config groups.
/// Returns the `quantization_config` value and the lowbit sidecar (exact schemes per group).
pub fn build_quantization_config(ck: &Checkpoint) -> (Value, Value) {
    let modules: Vec<ModuleEntry> = ck
        .quantized
        .iter()
        .map(|(n, q)| ModuleEntry::of(n, q))
        .collect();
    quantization_config_of(&modules, &ck.ignore, ck.input_activations)
}

/// What the `quantization_config` needs to know of one quantized module (so that a streaming
/// writer need not keep the tensors).
#[derive(Debug, Clone)]
pub struct ModuleEntry {
    /// Module name.
    pub name: String,
    /// Its scheme.
    pub scheme: Scheme,
    /// Whether it stores a `g_idx` (GPTQ group act-order).
    pub actorder: bool,
    /// `rows * cols`.
    pub numel: usize,
    /// Bytes of codes and metadata.
    pub storage_bytes: usize,
}

impl ModuleEntry {
    /// The entry of module `name` quantized as `q`.
    pub fn of(name: &str, q: &QuantizedTensor) -> Self {
        ModuleEntry {
            name: name.to_string(),
            scheme: q.scheme,
            actorder: q.g_idx.is_some(),
            numel: q.rows * q.cols,
            storage_bytes: q.storage_bytes(),
        }
    }
}

/// [`build_quantization_config`] from module entries (in checkpoint order), the ignore list and
/// the activation quantization.
pub fn quantization_config_of(
    modules: &[ModuleEntry],
    ignore: &[String],
    input_activations: Option<super::ActivationQuant>,
) -> (Value, Value) {
    let mut groups: Vec<(Scheme, bool, Vec<String>)> = Vec::new();
    for m in modules {
        let (name, act) = (&m.name, m.actorder);
        match groups
            .iter_mut()
            .find(|(s, a, _)| *s == m.scheme && *a == act)
        {
            Some(g) => g.2.push(name.clone()),
            None => groups.push((m.scheme, act, vec![name.clone()])),
        }
    }
    let mut cg = Map::new();
    let mut side = Map::new();
    let mut formats = Vec::new();
    for (i, (s, act, targets)) in groups.iter().enumerate() {
        let gname = format!("group_{i}");
        let fmt = format_for(s);
        formats.push(fmt.name());
        let mut g = json!({
            "targets": targets,
            "weights": weights_args(s, *act),
            "input_activations": input_activations.map(|a| a.args()),
            "output_activations": null,
            "format": fmt.name(),
        });
        if input_activations.is_none() {
            g["input_activations"] = Value::Null;
        }
        cg.insert(gname.clone(), g);
        side.insert(
            gname,
            json!({ "scheme": scheme_to_json(s), "format": fmt.name(), "actorder": act }),
        );
    }
    formats.dedup();
    let top_format = if formats.len() == 1 {
        formats[0]
    } else {
        "mixed-precision"
    };
    let total: usize = modules.iter().map(|m| m.numel).sum();
    let bytes: usize = modules.iter().map(|m| m.storage_bytes).sum();
    let ratio = if bytes > 0 {
        (total * 2) as f64 / bytes as f64
    } else {
        1.0
    };
    let qc = json!({
        "quant_method": "compressed-tensors",
        "format": top_format,
        "config_groups": Value::Object(cg),
        "ignore": ignore,
        "kv_cache_scheme": null,
        "quantization_status": "compressed",
        "global_compression_ratio": ratio,
        "version": "0.14.0",
        "producer": "lowbit",
    });
    let sidecar = json!({ "lowbit_schemes_version": 1, "groups": Value::Object(side) });
    (qc, sidecar)
}

fn is_replaceable(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(mut it) => {
            it.next().is_none()
                || dir.join("lowbit-report.json").exists()
                || dir.join(SCHEMES_FILE).exists()
        }
        Err(_) => false,
    }
}

/// Write `ck` to the folder `out`. Files are first written to a temporary sibling folder
/// (`.{name}.partial-{pid}`) which is renamed to `out` only after the last file is closed, so an
/// interrupted run never leaves a folder that looks complete.
pub fn write_checkpoint(out: &Path, ck: &Checkpoint, opts: &WriteOptions) -> Result<()> {
    let tmp = begin_tmp(out, opts)?;
    let r = write_into(&tmp, ck, opts);
    if let Err(e) = r {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    commit_tmp(&tmp, out)
}

/// Check that `out` may be (re)placed and create the empty temporary sibling folder
/// (`.{name}.partial-{pid}`) the files are written into.
fn begin_tmp(out: &Path, opts: &WriteOptions) -> Result<PathBuf> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let fname = out
        .file_name()
        .ok_or_else(|| bad(out, "output path has no folder name"))?
        .to_string_lossy()
        .to_string();
    if out.exists() && (!opts.overwrite || !is_replaceable(out)) {
        return Err(bad(
            out,
            "output folder exists and was not written by lowbit; choose another --out or remove it",
        ));
    }
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = parent.join(format!(".{fname}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    Ok(tmp)
}

/// Move the finished temporary folder into place.
fn commit_tmp(tmp: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
    }
    std::fs::rename(tmp, out).map_err(|e| Error::io(out, e))?;
    Ok(())
}

fn write_into(dir: &Path, ck: &Checkpoint, opts: &WriteOptions) -> Result<()> {
    // Collect every tensor.
    let mut tensors: Vec<(String, OwnedTensor)> = Vec::new();
    for (name, shape, data) in &ck.dense {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(bad(
                dir,
                format!("{name}: shape {shape:?} but {} values", data.len()),
            ));
        }
        tensors.push((name.clone(), OwnedTensor::f32s(shape.clone(), data)));
    }
    for (name, q) in &ck.quantized {
        let fmt = format_for(&q.scheme);
        for (suffix, t) in encode_module(name, q, fmt).map_err(|e| bad(dir, e))? {
            tensors.push((format!("{name}.{suffix}"), t));
        }
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    // Shard.
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut cur = 0usize;
    for (i, (_, t)) in tensors.iter().enumerate() {
        let sz = t.data.len();
        if cur > 0 && cur + sz > opts.shard_bytes {
            shards.push(Vec::new());
            cur = 0;
        }
        shards.last_mut().expect("non-empty").push(i);
        cur += sz;
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0usize;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    for (k, idx) in shards.iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
        };
        let mut views = Vec::with_capacity(idx.len());
        for &i in idx {
            let (name, t) = &tensors[i];
            let v = TensorView::new(t.dtype, t.shape.clone(), &t.data)
                .map_err(|e| bad(dir, format!("{name}: {e}")))?;
            views.push((name.clone(), v));
            weight_map.insert(name.clone(), file.clone());
            total += t.data.len();
        }
        let path = dir.join(&file);
        safetensors::tensor::serialize_to_file(views, Some(meta.clone()), &path)
            .map_err(|e| bad(&path, e.to_string()))?;
    }
    if n > 1 {
        let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        write_json(&dir.join("model.safetensors.index.json"), &index)?;
    }
    write_metadata(
        dir,
        &ck.hf_config,
        build_quantization_config(ck),
        !ck.quantized.is_empty(),
        &ck.extra_files,
    )
}

/// `config.json` (the model config plus the `quantization_config` when anything is quantized),
/// the lowbit sidecar, and the extra files.
fn write_metadata(
    dir: &Path,
    hf_config: &Value,
    (qc, sidecar): (Value, Value),
    any_quantized: bool,
    extra_files: &[(String, Vec<u8>)],
) -> Result<()> {
    let mut cfg = match hf_config {
        Value::Object(m) => Value::Object(m.clone()),
        Value::Null => json!({}),
        _ => return Err(bad(dir, "the model config must be a JSON object")),
    };
    if any_quantized {
        cfg["quantization_config"] = qc;
    }
    write_json(&dir.join("config.json"), &cfg)?;
    write_json(&dir.join(SCHEMES_FILE), &sidecar)?;
    for (name, bytes) in extra_files {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let s = serde_json::to_string_pretty(v).expect("serializable");
    std::fs::write(path, s).map_err(|e| Error::io(path, e))
}

/// Tensor data waiting in a [`StreamingWriter`]: f32 values (written without a byte copy) or
/// encoded bytes.
#[derive(Debug)]
enum Pending {
    F32(Vec<f32>),
    Bytes(Vec<u8>),
}

impl Pending {
    fn len(&self) -> usize {
        match self {
            Pending::F32(v) => v.len() * 4,
            Pending::Bytes(b) => b.len(),
        }
    }

    /// Little-endian bytes, borrowed where the platform allows.
    fn bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            Pending::Bytes(b) => std::borrow::Cow::Borrowed(b),
            Pending::F32(v) if cfg!(target_endian = "little") => {
                std::borrow::Cow::Borrowed(bytemuck::cast_slice(v))
            }
            Pending::F32(v) => {
                std::borrow::Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
        }
    }
}

/// A compressed-tensors folder written piece by piece, for the streaming quantization
/// pipeline: tensors are added as they become final and written out as safetensors shards
/// ([`Self::flush`]), so only the tensors of the current shard are in memory. The folder is
/// built in a temporary sibling (as [`write_checkpoint`] does) and renamed into place by
/// [`Self::finish`]; dropping an unfinished writer removes it. The result is the same checkpoint
/// [`write_checkpoint`] writes for the same tensors (same `config.json`, same tensor bytes),
/// sharded as `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json` (one
/// `model.safetensors` when everything fit one shard).
#[derive(Debug)]
pub struct StreamingWriter {
    out: PathBuf,
    tmp: PathBuf,
    pending: Vec<(String, Dtype, Vec<usize>, Pending)>,
    pending_bytes: usize,
    /// Temporary file name of each written shard.
    shards: Vec<String>,
    /// Tensor name -> shard index.
    weight_map: BTreeMap<String, usize>,
    total: usize,
    modules: Vec<ModuleEntry>,
    finished: bool,
}

impl StreamingWriter {
    /// Start writing the folder `out` (checked and replaced as by [`write_checkpoint`]).
    pub fn create(out: &Path, opts: &WriteOptions) -> Result<Self> {
        let tmp = begin_tmp(out, opts)?;
        Ok(StreamingWriter {
            out: out.to_path_buf(),
            tmp,
            pending: Vec::new(),
            pending_bytes: 0,
            shards: Vec::new(),
            weight_map: BTreeMap::new(),
            total: 0,
            modules: Vec::new(),
            finished: false,
        })
    }

    fn push(&mut self, name: String, dtype: Dtype, shape: Vec<usize>, data: Pending) -> Result<()> {
        if self.weight_map.contains_key(&name) || self.pending.iter().any(|p| p.0 == name) {
            return Err(bad(&self.tmp, format!("tensor {name} written twice")));
        }
        self.pending_bytes += data.len();
        self.pending.push((name, dtype, shape, data));
        Ok(())
    }

    /// Add an unquantized f32 tensor (taken by value: it is written from this buffer).
    pub fn add_dense(&mut self, name: &str, shape: Vec<usize>, data: Vec<f32>) -> Result<()> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(bad(
                &self.tmp,
                format!("{name}: shape {shape:?} but {} values", data.len()),
            ));
        }
        self.push(name.to_string(), Dtype::F32, shape, Pending::F32(data))
    }

    /// Add a quantized module (its tensors in the format [`format_for`] its scheme); modules
    /// form the `quantization_config` groups in the order they are added.
    pub fn add_quantized(&mut self, name: &str, q: &QuantizedTensor) -> Result<()> {
        let fmt = format_for(&q.scheme);
        for (suffix, t) in encode_module(name, q, fmt).map_err(|e| bad(&self.tmp, e))? {
            self.push(
                format!("{name}.{suffix}"),
                t.dtype,
                t.shape,
                Pending::Bytes(t.data),
            )?;
        }
        self.modules.push(ModuleEntry::of(name, q));
        Ok(())
    }

    /// Bytes of tensor data added since the last [`Self::flush`].
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// Shards written so far.
    pub fn shards_written(&self) -> usize {
        self.shards.len()
    }

    /// Write the pending tensors as one shard and free them (nothing when none are pending).
    pub fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let k = self.shards.len();
        let file = format!("shard-{k:05}.safetensors.partial");
        let bytes: Vec<std::borrow::Cow<'_, [u8]>> = pending.iter().map(|p| p.3.bytes()).collect();
        let mut views = Vec::with_capacity(pending.len());
        for ((name, dtype, shape, _), b) in pending.iter().zip(&bytes) {
            let v = TensorView::new(*dtype, shape.clone(), b)
                .map_err(|e| bad(&self.tmp, format!("{name}: {e}")))?;
            views.push((name.clone(), v));
            self.total += b.len();
        }
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let path = self.tmp.join(&file);
        safetensors::tensor::serialize_to_file(views, Some(meta), &path)
            .map_err(|e| bad(&path, e.to_string()))?;
        drop(bytes);
        // Flush the shard to disk now: written-back pages are clean page cache the kernel can
        // reclaim at once, so a memory-limited run (a cgroup) is not charged for dirty pages of
        // every shard written so far.
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&path, e))?;
        for (name, ..) in &pending {
            self.weight_map.insert(name.clone(), k);
        }
        self.shards.push(file);
        Ok(())
    }

    /// Write the last shard, name the shards `model-0000i-of-0000N.safetensors` (or
    /// `model.safetensors` when there is one) with their index, write `config.json` (the model
    /// config plus the `quantization_config` of the added modules, `ignore` and
    /// `input_activations`), the sidecar and the extra files, and move the folder into place.
    pub fn finish(
        mut self,
        hf_config: &Value,
        ignore: &[String],
        input_activations: Option<super::ActivationQuant>,
        extra_files: &[(String, Vec<u8>)],
    ) -> Result<()> {
        self.flush()?;
        let n = self.shards.len().max(1);
        if self.shards.is_empty() {
            // No tensors at all: an empty safetensors file keeps the folder loadable.
            let path = self.tmp.join("model.safetensors");
            let none: Vec<(String, TensorView<'_>)> = Vec::new();
            safetensors::tensor::serialize_to_file(none, None, &path)
                .map_err(|e| bad(&path, e.to_string()))?;
        }
        let names: Vec<String> = (0..self.shards.len())
            .map(|k| {
                if n == 1 {
                    "model.safetensors".to_string()
                } else {
                    format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
                }
            })
            .collect();
        for (from, to) in self.shards.iter().zip(&names) {
            let (a, b) = (self.tmp.join(from), self.tmp.join(to));
            std::fs::rename(&a, &b).map_err(|e| Error::io(&b, e))?;
        }
        if n > 1 {
            let weight_map: BTreeMap<&String, &String> = self
                .weight_map
                .iter()
                .map(|(t, &k)| (t, &names[k]))
                .collect();
            let index =
                json!({ "metadata": { "total_size": self.total }, "weight_map": weight_map });
            write_json(&self.tmp.join("model.safetensors.index.json"), &index)?;
        }
        write_metadata(
            &self.tmp,
            hf_config,
            quantization_config_of(&self.modules, ignore, input_activations),
            !self.modules.is_empty(),
            extra_files,
        )?;
        commit_tmp(&self.tmp, &self.out)?;
        self.finished = true;
        Ok(())
    }
}

impl Drop for StreamingWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}
