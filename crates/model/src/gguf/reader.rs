//! Bounds-checked GGUF v3 parser over a memory map or an owned buffer.
//!
//! Every length, count and offset read from the file is checked against the bytes that remain
//! before anything is allocated, so hostile headers (e.g. 2^60 KVs) fail with a typed error.

use super::{value_type as vt, GgmlType, GgufValue, TensorInfo, DEFAULT_ALIGNMENT, GGUF_MAGIC};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Deepest nesting of arrays inside arrays that the reader accepts.
const MAX_ARRAY_DEPTH: usize = 8;
/// Most dimensions a tensor may have (ggml's GGML_MAX_DIMS is 4).
const MAX_DIMS: u32 = 8;

enum Backing {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file: metadata, tensor infos and access to the (memory-mapped) tensor data.
pub struct GgufFile {
    data: Backing,
    path: Option<PathBuf>,
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    kv_types: Vec<Vec<u32>>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_start: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("kv_count", &self.metadata.len())
            .field("tensor_count", &self.tensors.len())
            .field("alignment", &self.alignment)
            .finish()
    }
}

impl GgufFile {
    /// Memory-map and parse a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and private to this struct; the file is not modified
        // by this process. A concurrent external truncation could fault, which is the accepted
        // contract of memory-mapped model files (llama.cpp and safetensors do the same).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mut f = Self::parse(Backing::Mmap(map))?;
        f.path = Some(path.to_path_buf());
        Ok(f)
    }

    /// Parse a GGUF file held in memory (tests, fuzzing).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::parse(Backing::Owned(bytes))
    }

    fn parse(data: Backing) -> Result<Self> {
        let bytes = data.bytes();
        let mut c = Cursor { b: bytes, pos: 0 };
        let magic = c.u32("magic")?;
        if magic != GGUF_MAGIC {
            return Err(Error::GgufInvalid {
                what: format!("bad magic {magic:#010x} (expected \"GGUF\"): not a GGUF file"),
                offset: 0,
            });
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::GgufInvalid {
                what: format!("unsupported GGUF version {version} (this reader handles 2 and 3)"),
                offset: 4,
            });
        }
        let n_tensors = c.u64("tensor_count")?;
        let n_kv = c.u64("metadata_kv_count")?;
        // Each KV needs at least 8 (key len) + 4 (type) + 1 (value) bytes.
        c.check_count(n_kv, 13, "metadata_kv_count")?;
        // Each tensor info needs at least 8 (name len) + 4 (n_dims) + 4 (type) + 8 (offset).
        c.check_count(n_tensors, 24, "tensor_count")?;

        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut kv_types = Vec::with_capacity(n_kv as usize);
        for i in 0..n_kv {
            let key = c.string(&format!("key of KV #{i}"))?;
            let ty = c.u32(&format!("value type of key `{key}`"))?;
            let mut types = vec![ty];
            let value = c.value(ty, &key, 0, &mut types)?;
            metadata.push((key, value));
            kv_types.push(types);
        }

        let mut alignment = DEFAULT_ALIGNMENT;
        if let Some((_, v)) = metadata.iter().find(|(k, _)| k == "general.alignment") {
            let a = v
                .as_u64()
                .filter(|&a| a > 0 && a.is_power_of_two() && a <= 1 << 30);
            alignment = a.ok_or_else(|| Error::GgufInvalid {
                what: format!("general.alignment = {v:?} is not a power of two"),
                offset: 0,
            })?;
        }

        let file_size = bytes.len() as u64;
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = c.string(&format!("name of tensor #{i}"))?;
            let nd_off = c.pos as u64;
            let n_dims = c.u32(&format!("n_dims of tensor `{name}`"))?;
            if n_dims > MAX_DIMS {
                return Err(Error::GgufInvalid {
                    what: format!("tensor `{name}` has {n_dims} dims (at most {MAX_DIMS})"),
                    offset: nd_off,
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(c.u64(&format!("dim {d} of tensor `{name}`"))?);
            }
            let ty_off = c.pos as u64;
            let ty_id = c.u32(&format!("type of tensor `{name}`"))?;
            let offset = c.u64(&format!("data offset of tensor `{name}`"))?;
            let n_el = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| Error::GgufInvalid {
                    what: format!("tensor `{name}`: element count of dims {dims:?} overflows"),
                    offset: nd_off,
                })?;
            let ty = GgmlType::from_id(ty_id).map_err(|_| Error::GgufInvalid {
                what: format!("tensor `{name}` has unknown ggml type id {ty_id}"),
                offset: ty_off,
            })?;
            let block = ty.block_size() as u64;
            let ne0 = dims.first().copied().unwrap_or(1);
            if ne0 % block != 0 {
                return Err(Error::GgufInvalid {
                    what: format!("tensor `{name}`: ne[0] = {ne0} is not a multiple of the {ty} block size {block}"),
                    offset: nd_off,
                });
            }
            let n_bytes = usize::try_from(n_el)
                .ok()
                .and_then(|n| ty.row_bytes(n).ok())
                .map(|b| b as u64);
            let n_bytes = n_bytes.ok_or_else(|| Error::GgufInvalid {
                what: format!("tensor `{name}`: size of {n_el} {ty} elements overflows"),
                offset: nd_off,
            })?;
            if offset % alignment != 0 {
                return Err(Error::GgufInvalid {
                    what: format!("tensor `{name}`: data offset {offset} is not a multiple of the alignment {alignment}"),
                    offset: ty_off + 4,
                });
            }
            raw.push((name, dims, ty, offset, n_bytes));
        }
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, ty, offset, n_bytes) in raw {
            let abs = data_start.checked_add(offset);
            let end = abs.and_then(|a| a.checked_add(n_bytes));
            match (abs, end) {
                (Some(abs), Some(end)) if end <= file_size => tensors.push(TensorInfo {
                    name,
                    dims,
                    ggml_type: ty,
                    offset_abs: abs,
                    n_bytes,
                }),
                _ => {
                    return Err(Error::GgufTruncated {
                        what: format!("data of tensor `{name}` ({n_bytes} bytes of {ty})"),
                        offset: data_start.saturating_add(offset),
                        needed: n_bytes,
                        file_size,
                    })
                }
            }
        }
        Ok(GgufFile {
            data,
            path: None,
            version,
            metadata,
            kv_types,
            tensors,
            alignment,
            data_start,
        })
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// All metadata key/values in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    /// The value type ids of each metadata value, parallel to [`Self::metadata`]: `[t]` for a
    /// scalar, `[9, elem, ...]` for arrays (nested arrays add one level each; empty arrays keep
    /// their declared element type).
    pub fn metadata_types(&self) -> &[Vec<u32>] {
        &self.kv_types
    }

    /// Look up a metadata value by key.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// A metadata string, or a typed error naming the key.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key)
            .and_then(GgufValue::as_str)
            .ok_or_else(|| Error::Metadata {
                key: key.to_string(),
                what: "missing or not a string".into(),
            })
    }

    /// A metadata integer, or a typed error naming the key.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.get(key)
            .and_then(GgufValue::as_u64)
            .ok_or_else(|| Error::Metadata {
                key: key.to_string(),
                what: "missing or not a non-negative integer".into(),
            })
    }

    /// A metadata number as f32, or a typed error naming the key.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        self.get(key)
            .and_then(GgufValue::as_f32)
            .ok_or_else(|| Error::Metadata {
                key: key.to_string(),
                what: "missing or not a number".into(),
            })
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor info of one tensor.
    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| Error::MissingTensor(name.to_string()))
    }

    /// Alignment of tensor data (from `general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset where tensor data starts.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// The whole file's bytes.
    pub fn file_bytes(&self) -> &[u8] {
        self.data.bytes()
    }

    /// The path this file was opened from (None for [`Self::from_bytes`]).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The raw bytes of one tensor.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.tensor_info(name)?;
        // Bounds were checked at parse time.
        Ok(&self.data.bytes()[t.offset_abs as usize..(t.offset_abs + t.n_bytes) as usize])
    }

    /// One tensor dequantized to f32 (row-major over `dims` reversed, i.e. ne\[0\] fastest).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor_info(name)?;
        let bytes = self.tensor_bytes(name)?;
        super::dequantize_vec(name, t.ggml_type, bytes, t.n_elements() as usize)
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.b.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(Error::GgufTruncated {
                what: what.to_string(),
                offset: self.pos as u64,
                needed: n,
                file_size: self.b.len() as u64,
            });
        }
        let s = &self.b[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    /// Fail unless `count` items of at least `min_size` bytes each can fit in what remains.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<()> {
        if count
            .checked_mul(min_size)
            .is_none_or(|need| need > self.remaining())
        {
            return Err(Error::GgufTruncated {
                what: format!("{what} = {count}"),
                offset: self.pos as u64,
                needed: count.saturating_mul(min_size),
                file_size: self.b.len() as u64,
            });
        }
        Ok(())
    }

    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let off = self.pos as u64;
        let len = self.u64(&format!("length of {what}"))?;
        let s = self.take(len, what)?;
        String::from_utf8(s.to_vec()).map_err(|e| Error::GgufInvalid {
            what: format!("{what} is not valid UTF-8: {e}"),
            offset: off,
        })
    }

    /// Minimum encoded size of one value of type `ty` (for pre-allocation checks).
    fn min_size(ty: u32) -> u64 {
        match ty {
            vt::U8 | vt::I8 | vt::BOOL => 1,
            vt::U16 | vt::I16 => 2,
            vt::U32 | vt::I32 | vt::F32 => 4,
            vt::U64 | vt::I64 | vt::F64 | vt::STRING => 8,
            _ => 12, // array: elem type + count
        }
    }

    fn value(
        &mut self,
        ty: u32,
        key: &str,
        depth: usize,
        types: &mut Vec<u32>,
    ) -> Result<GgufValue> {
        let what = || format!("value of key `{key}`");
        Ok(match ty {
            vt::U8 => GgufValue::U8(self.arr::<1>(&what())?[0]),
            vt::I8 => GgufValue::I8(self.arr::<1>(&what())?[0] as i8),
            vt::U16 => GgufValue::U16(u16::from_le_bytes(self.arr(&what())?)),
            vt::I16 => GgufValue::I16(i16::from_le_bytes(self.arr(&what())?)),
            vt::U32 => GgufValue::U32(u32::from_le_bytes(self.arr(&what())?)),
            vt::I32 => GgufValue::I32(i32::from_le_bytes(self.arr(&what())?)),
            vt::F32 => GgufValue::F32(f32::from_le_bytes(self.arr(&what())?)),
            vt::U64 => GgufValue::U64(u64::from_le_bytes(self.arr(&what())?)),
            vt::I64 => GgufValue::I64(i64::from_le_bytes(self.arr(&what())?)),
            vt::F64 => GgufValue::F64(f64::from_le_bytes(self.arr(&what())?)),
            vt::BOOL => {
                let off = self.pos as u64;
                match self.arr::<1>(&what())?[0] {
                    0 => GgufValue::Bool(false),
                    1 => GgufValue::Bool(true),
                    b => {
                        return Err(Error::GgufInvalid {
                            what: format!("bool value {b} of key `{key}`"),
                            offset: off,
                        })
                    }
                }
            }
            vt::STRING => GgufValue::String(self.string(&what())?),
            vt::ARRAY => {
                let off = self.pos as u64;
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(Error::GgufInvalid {
                        what: format!("key `{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH}"),
                        offset: off,
                    });
                }
                let elem = self.u32(&format!("array element type of key `{key}`"))?;
                if elem > vt::F64 {
                    return Err(Error::GgufInvalid {
                        what: format!("key `{key}`: unknown array element type {elem}"),
                        offset: off,
                    });
                }
                let count = self.u64(&format!("array length of key `{key}`"))?;
                self.check_count(
                    count,
                    Self::min_size(elem),
                    &format!("array length of key `{key}`"),
                )?;
                types.push(elem);
                let mut v = Vec::with_capacity(count as usize);
                let mut sub = Vec::new();
                for _ in 0..count {
                    sub.clear();
                    v.push(self.value(elem, key, depth + 1, &mut sub)?);
                }
                if elem == vt::ARRAY {
                    // Record the nested element types of the first element (or none if empty).
                    types.extend_from_slice(&sub);
                }
                GgufValue::Array(v)
            }
            other => {
                return Err(Error::GgufInvalid {
                    what: format!("key `{key}` has unknown value type {other}"),
                    offset: self.pos.saturating_sub(4) as u64,
                })
            }
        })
    }
}
