//! GGUF v3 writer: metadata key/values and tensors, data aligned to `general.alignment`.

use super::{value_type as vt, GgmlType, GgufValue, DEFAULT_ALIGNMENT, GGUF_MAGIC};
use crate::{Error, Result};
use std::io::Write;
use std::path::Path;

/// Builds a GGUF v3 file in memory order: add metadata and tensors, then write.
///
/// Tensors are written in the order added, each at an offset that is a multiple of the
/// alignment (`general.alignment` if that key was added as an integer, else 32).
/// Empty arrays are written with element type u32 (an empty [`GgufValue::Array`] carries no type).
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add (or replace) one metadata key.
    pub fn add_kv(&mut self, key: impl Into<String>, value: GgufValue) -> &mut Self {
        let key = key.into();
        if let Some(slot) = self.metadata.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = value;
        } else {
            self.metadata.push((key, value));
        }
        self
    }

    /// Add one tensor: `dims` in GGUF order (ne\[0\] first), `data` its encoded bytes.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
        data: Vec<u8>,
    ) -> Result<&mut Self> {
        let name = name.into();
        let n: u64 = dims.iter().product();
        let expected = usize::try_from(n)
            .ok()
            .and_then(|n| ty.row_bytes(n).ok())
            .map(|b| b as u64);
        let expected = expected.ok_or_else(|| Error::UnsupportedType {
            tensor: name.clone(),
            ty: format!("{ty} with {n} elements (unknown type or not a whole number of blocks)"),
        })?;
        if expected != data.len() as u64 {
            return Err(Error::GgufInvalid {
                what: format!(
                    "tensor `{name}`: {} data bytes given, {ty} {dims:?} needs {expected}",
                    data.len()
                ),
                offset: 0,
            });
        }
        if self.tensors.iter().any(|t| t.0 == name) {
            return Err(Error::GgufInvalid {
                what: format!("duplicate tensor `{name}`"),
                offset: 0,
            });
        }
        self.tensors.push((name, dims.to_vec(), ty, data));
        Ok(self)
    }

    fn alignment(&self) -> Result<u64> {
        match self.metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => Ok(DEFAULT_ALIGNMENT),
            Some((_, v)) => v
                .as_u64()
                .filter(|a| *a > 0 && a.is_power_of_two())
                .ok_or_else(|| Error::Metadata {
                    key: "general.alignment".into(),
                    what: format!("{v:?} is not a power of two"),
                }),
        }
    }

    /// Serialize the whole file.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.write_to(&mut out)
            .map_err(|e| Error::io("<memory>", e))?;
        Ok(out)
    }

    /// Write the file to `path`.
    pub fn write_file(&self, path: &Path) -> Result<()> {
        let f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        let mut w = std::io::BufWriter::new(f);
        self.write_to(&mut w).map_err(|e| Error::io(path, e))?;
        w.flush().map_err(|e| Error::io(path, e))
    }

    /// Write the file to any writer.
    pub fn write_to(&self, w: &mut impl Write) -> std::io::Result<()> {
        let align = self
            .alignment()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        if let Some((k, _)) = self.metadata.iter().find(|(_, v)| !homogeneous(v)) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("metadata key `{k}`: array elements must all have one type"),
            ));
        }
        let mut head = Vec::new();
        head.extend_from_slice(&GGUF_MAGIC.to_le_bytes());
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut head, k);
            head.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut head, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for (name, dims, ty, data) in &self.tensors {
            put_str(&mut head, name);
            head.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&ty.id().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len() as u64).div_ceil(align) * align;
        }
        let pad = (head.len() as u64).div_ceil(align) * align - head.len() as u64;
        head.resize(head.len() + pad as usize, 0);
        w.write_all(&head)?;
        let mut pos = 0u64;
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            w.write_all(&vec![0u8; (off - pos) as usize])?;
            w.write_all(data)?;
            pos = off + data.len() as u64;
        }
        if !self.tensors.is_empty() {
            // Pad the last tensor too, as gguf-py does.
            w.write_all(&vec![0u8; (offset - pos) as usize])?;
        }
        Ok(())
    }
}

/// Whether every array in `v` holds elements of a single type (GGUF arrays are typed).
fn homogeneous(v: &GgufValue) -> bool {
    match v {
        GgufValue::Array(a) => {
            a.iter().all(|x| x.type_id() == a[0].type_id()) && a.iter().all(homogeneous)
        }
        _ => true,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Array(a) => {
            let elem = a.first().map_or(vt::U32, GgufValue::type_id);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for x in a {
                put_value(out, x);
            }
        }
    }
}
