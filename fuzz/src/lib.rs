//! Fuzz target bodies. Each function takes arbitrary bytes and must never panic, hang or
//! allocate without bound; the `fuzz_targets/*.rs` binaries wrap them for cargo-fuzz, and
//! `tests/replay.rs` runs them over the corpus and generated inputs on the stable toolchain.

use lowbit_model::ct::{
    config::format_for,
    reader::{decode_module, RawTensor},
};
use lowbit_model::gguf::GgufFile;
use lowbit_model::hf::SafetensorsFile;
use lowbit_numerics::gguf::{self as gg, GgmlType};
use lowbit_numerics::{
    quantize, FloatFormat, Overflow, QuantOptions, QuantizedTensor, Rounding, Scheme,
};

/// Every scheme short name exercised by the tensor targets.
pub const SCHEMES: &[&str] = &[
    "int8-pc",
    "int4-g128-sym",
    "int4-g32-asym",
    "int3-g128-sym",
    "int2-g64-asym",
    "int4-b16-asym",
    "fp8-pc",
    "fp8-b128",
    "nvfp4",
    "mxfp4",
    "mxfp6-e2m3",
    "mxfp6-e3m2",
    "mxfp8-e4m3",
    "mxfp8-e5m2",
    "mxint8",
    "nf4-g64",
    "ternary",
    "binary",
];

/// Largest element count a target will decode (keeps each run fast and memory-bounded).
const MAX_ELEMS: u64 = 1 << 20;

/// Parse a GGUF file from bytes; when it parses, dequantize every small tensor.
pub fn gguf_file(data: &[u8]) {
    let Ok(f) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    for kv in f.metadata() {
        let _ = kv.1.as_str();
    }
    let names: Vec<String> = f.tensors().iter().map(|t| t.name.clone()).collect();
    for (name, info) in names.iter().zip(f.tensors()) {
        if info.n_elements() <= MAX_ELEMS {
            let _ = f.tensor_f32(name);
        }
    }
}

fn codec_types() -> Vec<GgmlType> {
    (0u32..64)
        .filter_map(|id| GgmlType::from_id(id).ok())
        .filter(|t| t.has_codec())
        .collect()
}

/// Decode arbitrary bytes as blocks of a GGUF type chosen by the first byte; also call the
/// decoder with deliberately wrong lengths.
pub fn gguf_blocks(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let types = codec_types();
    let ty = types[sel as usize % types.len()];
    let blocks = rest.len() / ty.type_size();
    let n = blocks * ty.block_size();
    let mut out = vec![0f32; n];
    let _ = gg::dequantize(ty, &rest[..blocks * ty.type_size()], &mut out);
    let mut wrong = vec![0f32; n + ty.block_size()];
    let _ = gg::dequantize(ty, rest, &mut wrong);
}

/// Little reader over fuzz bytes that never runs out (wraps around, zeros when empty).
struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        if self.data.is_empty() {
            return 0;
        }
        let b = self.data[self.pos % self.data.len()];
        self.pos += 1;
        b
    }
    fn f32(&mut self) -> f32 {
        f32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
}

/// Build a [`QuantizedTensor`] of a fuzz-chosen scheme and shape whose codes, scales, zero
/// points, global scale and g_idx come from the fuzz bytes (NaN/Inf scales included), then
/// validate and dequantize it. Also feeds a tensor with inconsistent lengths to `validate`.
pub fn packed_decode(data: &[u8]) {
    let mut b = Bytes { data, pos: 0 };
    let scheme = Scheme::from_name(SCHEMES[b.u8() as usize % SCHEMES.len()]).expect("known");
    let rows = 1 + b.u8() as usize % 9;
    let cols = 1 + (b.u8() as usize | (b.u8() as usize) << 8) % 700;
    let (gr, gc) = scheme.granularity.grid(rows, cols);
    let row_bytes = lowbit_numerics::tensor::packed_row_bytes(cols, scheme.elem.bits());
    let mut t = QuantizedTensor {
        scheme,
        rows,
        cols,
        data: (0..rows * row_bytes).map(|_| b.u8()).collect(),
        scales: (0..gr * gc).map(|_| b.f32()).collect(),
        zero_points: scheme
            .asymmetric
            .then(|| (0..gr * gc).map(|_| b.u8()).collect()),
        global_scale: scheme.global_scale.then(|| b.f32()),
        g_idx: None,
        nested: None,
    };
    if b.u8() & 1 == 1 {
        t.g_idx = Some((0..cols).map(|_| b.u8() as u32 % (gc as u32 + 1)).collect());
    }
    if t.validate().is_ok() {
        let _ = t.dequantize();
        let mut row = vec![0f32; cols];
        let _ = t.dequantize_row(rows - 1, &mut row);
        let _ = t.dequantize_row(rows, &mut row);
    }
    // A truncated copy must be rejected, not decoded.
    t.data.pop();
    if t.validate().is_ok() {
        let _ = t.dequantize();
    }
}

/// Quantize fuzz-chosen f32 values (NaN, Inf and subnormals included) with every scheme and
/// every GGUF codec, then dequantize the result.
pub fn block_quantize(data: &[u8]) {
    let mut b = Bytes { data, pos: 0 };
    let rows = 1 + b.u8() as usize % 4;
    let cols = 1 + b.u8() as usize % 300;
    let w: Vec<f32> = (0..rows * cols).map(|_| b.f32()).collect();
    let opts = QuantOptions::default();
    for name in SCHEMES {
        let scheme = Scheme::from_name(name).expect("known");
        if let Ok(q) = quantize(&w, rows, cols, &scheme, &opts) {
            let _ = q.validate();
            let _ = q.dequantize();
        }
    }
    for ty in codec_types() {
        let n = cols / ty.block_size() * ty.block_size();
        let mut bytes = Vec::new();
        if gg::quantize(ty, &w[..n], &mut bytes).is_ok() {
            let mut out = vec![0f32; n];
            let _ = gg::dequantize(ty, &bytes, &mut out);
        }
    }
}

/// Encode arbitrary f32 values in every minifloat under every rounding/overflow policy, and
/// decode arbitrary codes.
pub fn minifloat(data: &[u8]) {
    let fmts = [
        FloatFormat::E4M3,
        FloatFormat::E5M2,
        FloatFormat::E2M3,
        FloatFormat::E3M2,
        FloatFormat::E2M1,
        FloatFormat::E8M0,
    ];
    for chunk in data.chunks(4) {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        let x = f32::from_le_bytes(w);
        for f in fmts {
            for r in [Rounding::NearestEven, Rounding::NearestAway] {
                for o in [Overflow::Saturate, Overflow::NonSaturating] {
                    let c = f.encode(x, r, o);
                    let _ = f.decode(c);
                    let _ = f.encode_checked(x, r, o);
                }
            }
            let _ =
                f.encode_stochastic(x, u32::from_le_bytes(w).rotate_left(7), Overflow::Saturate);
            let _ = f.decode(chunk[0]);
        }
    }
}

/// Parse a safetensors file from bytes with lowbit's reader (header JSON, dtype, shape and
/// offset checks); when it parses, read the metadata and convert every small tensor to f32.
pub fn safetensors_file(data: &[u8]) {
    let Ok(f) = SafetensorsFile::from_bytes("fuzz.safetensors", data.to_vec()) else {
        return;
    };
    let _ = f.metadata();
    for name in f.names() {
        if let Ok((_, shape, _)) = f.tensor_raw(&name) {
            let n = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64));
            if n.is_some_and(|n| n <= MAX_ELEMS) {
                let _ = f.tensor_f32(&name);
            }
        }
    }
    let _ = f.tensor_f32("not-there");
}

/// Decode one compressed-tensors module (`m.weight_packed`, `m.weight_scale`, ...) from a
/// safetensors file in the fuzz bytes: the first byte picks the scheme (and so the
/// compressed-tensors format), the rest is the file. Exercises every length, dtype and shape
/// check of the checkpoint reader on hostile tensors.
pub fn ct_module(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let scheme = Scheme::from_name(SCHEMES[sel as usize % SCHEMES.len()]).expect("known");
    let Ok(st) = safetensors::SafeTensors::deserialize(rest) else {
        return;
    };
    let get = |suffix: &str| -> Option<RawTensor> {
        let v = st.tensor(&format!("m.{suffix}")).ok()?;
        Some(RawTensor {
            dtype: v.dtype(),
            shape: v.shape().to_vec(),
            data: v.data().to_vec(),
        })
    };
    let hint = if sel & 0x80 != 0 {
        Some((1 + (sel as usize & 7), 32))
    } else {
        None
    };
    if let Ok(q) = decode_module("m", scheme, format_for(&scheme), &get, hint) {
        if (q.rows as u64) * (q.cols as u64) <= MAX_ELEMS {
            let _ = q.dequantize();
        }
    }
}
