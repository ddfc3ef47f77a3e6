//! GGUF v3 files: a bounds-checked reader (memory-mapped) and a writer.
//!
//! Layout (ggml `docs/gguf.md`): header (`GGUF`, version, tensor count, KV count), metadata
//! key/values, tensor infos, zero padding to the alignment (`general.alignment`, default 32),
//! then tensor data. Everything is little-endian.

mod reader;
mod writer;

pub use reader::GgufFile;
pub use writer::GgufWriter;

/// File magic `GGUF` read as a little-endian u32.
pub const GGUF_MAGIC: u32 = 0x4655_4747;
/// Default alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// GGUF metadata value type ids.
pub mod value_type {
    /// u8
    pub const U8: u32 = 0;
    /// i8
    pub const I8: u32 = 1;
    /// u16
    pub const U16: u32 = 2;
    /// i16
    pub const I16: u32 = 3;
    /// u32
    pub const U32: u32 = 4;
    /// i32
    pub const I32: u32 = 5;
    /// f32
    pub const F32: u32 = 6;
    /// bool (one byte)
    pub const BOOL: u32 = 7;
    /// string (u64 length + UTF-8 bytes)
    pub const STRING: u32 = 8;
    /// array (element type u32, count u64, elements)
    pub const ARRAY: u32 = 9;
    /// u64
    pub const U64: u32 = 10;
    /// i64
    pub const I64: u32 = 11;
    /// f64
    pub const F64: u32 = 12;
}

/// One GGUF metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 6.
    F32(f32),
    /// Type 7.
    Bool(bool),
    /// Type 8.
    String(String),
    /// Type 9: elements all of one type (nested arrays allowed).
    Array(Vec<GgufValue>),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 12.
    F64(f64),
}

impl GgufValue {
    /// The GGUF value type id of this value.
    pub fn type_id(&self) -> u32 {
        use value_type as t;
        match self {
            GgufValue::U8(_) => t::U8,
            GgufValue::I8(_) => t::I8,
            GgufValue::U16(_) => t::U16,
            GgufValue::I16(_) => t::I16,
            GgufValue::U32(_) => t::U32,
            GgufValue::I32(_) => t::I32,
            GgufValue::F32(_) => t::F32,
            GgufValue::Bool(_) => t::BOOL,
            GgufValue::String(_) => t::STRING,
            GgufValue::Array(_) => t::ARRAY,
            GgufValue::U64(_) => t::U64,
            GgufValue::I64(_) => t::I64,
            GgufValue::F64(_) => t::F64,
        }
    }

    /// Any non-negative integer (or bool) as u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            GgufValue::Bool(b) => Some(b as u64),
            _ => None,
        }
    }

    /// Any integer as i64 (None if it does not fit).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v as i64),
            GgufValue::I16(v) => Some(v as i64),
            GgufValue::I32(v) => Some(v as i64),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// Any number as f32 (floats, and integers converted).
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            GgufValue::F32(v) => Some(v),
            GgufValue::F64(v) => Some(v as f32),
            _ => self.as_i64().map(|v| v as f32),
        }
    }

    /// Any number as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// A bool value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// A string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// An array value.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lies in a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Tensor name (e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions in GGUF order: `dims[0]` = ne\[0\], the innermost (contiguous) one.
    pub dims: Vec<u64>,
    /// The ggml element type.
    pub ggml_type: GgmlType,
    /// Absolute file offset of the tensor's first byte.
    pub offset_abs: u64,
    /// Size of the tensor data in bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Number of elements (product of `dims`).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

pub use lowbit_numerics::gguf::GgmlType;

/// Dequantize `bytes` of type `ty` into `n` f32 values with the numerics GGUF codecs.
pub(crate) fn dequantize_vec(
    tensor: &str,
    ty: GgmlType,
    bytes: &[u8],
    n: usize,
) -> crate::Result<Vec<f32>> {
    if !ty.has_codec() {
        return Err(crate::Error::UnsupportedType {
            tensor: tensor.to_string(),
            ty: ty.name().to_string(),
        });
    }
    let mut out = vec![0f32; n];
    lowbit_numerics::gguf::dequantize(ty, bytes, &mut out)?;
    Ok(out)
}
