//! GGUF / ggml block codecs.
//!
//! ggml stores a tensor row as a sequence of fixed-size blocks (`block_size` elements packed
//! into `type_size` bytes, C struct byte order, little-endian). This module knows the ggml type
//! ids ([`GgmlType`]) and implements, bit-exactly against ggml's C reference
//! (`quantize_row_*_ref` with no importance matrix, and the `to_float` dequantizers):
//!
//! | type | quantize | dequantize |
//! |------|----------|------------|
//! | F32, F16, BF16 | yes (plain casts, RNE) | yes |
//! | Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 | yes | yes |
//! | Q4_K, Q5_K, Q6_K | yes | yes |
//! | IQ4_NL, MXFP4, NVFP4 (ggml's 64-element block) | yes | yes |
//!
//! Other known types (Q2_K, Q3_K, the IQ2/IQ3/IQ1 families, TQ*, ...) have their sizes
//! ([`GgmlType::block_size`], [`GgmlType::type_size`]) so a GGUF reader can walk past them, and
//! return [`Error::UnsupportedGgmlType`] from [`quantize`] / [`dequantize`].
//!
//! Arithmetic follows ggml exactly: f32 math in the C evaluation order with no fused
//! multiply-add, fp16 storage through `half` (round to nearest even), `roundf` (half away from
//! zero) in Q8_0, truncating casts in Q4_0/Q4_1/Q5_0/Q5_1 and the round-half-even "magic
//! number" `nearest_int` in the k-quants. Quantizers reject NaN/Inf input with
//! [`Error::NonFinite`] (ggml's own output for such input is unspecified).

mod fp4;
mod kquants;
mod lanes;
mod legacy;

use crate::error::{Error, Result};

/// A ggml tensor element type, with ggml's numeric id (`enum ggml_type`, as stored in GGUF).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
#[non_exhaustive]
pub enum GgmlType {
    /// 32-bit IEEE float (id 0).
    F32,
    /// 16-bit IEEE half (id 1).
    F16,
    /// 32-block, f16 scale, 4-bit codes `d*(q-8)` (id 2).
    Q4_0,
    /// 32-block, f16 scale and min, 4-bit codes `d*q+m` (id 3).
    Q4_1,
    /// 32-block, f16 scale, 5-bit codes `d*(q-16)` (id 6).
    Q5_0,
    /// 32-block, f16 scale and min, 5-bit codes `d*q+m` (id 7).
    Q5_1,
    /// 32-block, f16 scale, int8 codes (id 8).
    Q8_0,
    /// 32-block, f16 scale and sum, int8 codes (id 9; activation type, no codec here).
    Q8_1,
    /// 256-superblock 2-bit k-quant (id 10; sizes only).
    Q2_K,
    /// 256-superblock 3-bit k-quant (id 11; sizes only).
    Q3_K,
    /// 256-superblock 4-bit k-quant with 6-bit sub-scales and mins (id 12).
    Q4_K,
    /// 256-superblock 5-bit k-quant with 6-bit sub-scales and mins (id 13).
    Q5_K,
    /// 256-superblock 6-bit k-quant with int8 sub-scales (id 14).
    Q6_K,
    /// 256-superblock 8-bit activation type (id 15; sizes only).
    Q8_K,
    /// IQ2_XXS (id 16; sizes only).
    IQ2_XXS,
    /// IQ2_XS (id 17; sizes only).
    IQ2_XS,
    /// IQ3_XXS (id 18; sizes only).
    IQ3_XXS,
    /// IQ1_S (id 19; sizes only).
    IQ1_S,
    /// 32-block, f16 scale, 4-bit indices into a fixed non-linear table (id 20).
    IQ4_NL,
    /// IQ3_S (id 21; sizes only).
    IQ3_S,
    /// IQ2_S (id 22; sizes only).
    IQ2_S,
    /// IQ4_XS (id 23; sizes only).
    IQ4_XS,
    /// 8-bit integer (id 24).
    I8,
    /// 16-bit integer (id 25).
    I16,
    /// 32-bit integer (id 26).
    I32,
    /// 64-bit integer (id 27).
    I64,
    /// 64-bit float (id 28).
    F64,
    /// IQ1_M (id 29; sizes only).
    IQ1_M,
    /// bfloat16 (id 30).
    BF16,
    /// Ternary TQ1_0 (id 34; sizes only).
    TQ1_0,
    /// Ternary TQ2_0 (id 35; sizes only).
    TQ2_0,
    /// OCP MXFP4 block: E8M0 scale + 32 E2M1 codes (id 39).
    MXFP4,
    /// ggml's NVFP4 block: 64 elements, four UE4M3 sub-block scales, E2M1 codes (id 40).
    NVFP4,
}

/// Every known type, in id order (used for lookups and error messages).
const ALL: [GgmlType; 33] = {
    use GgmlType::*;
    [
        F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, IQ2_XXS,
        IQ2_XS, IQ3_XXS, IQ1_S, IQ4_NL, IQ3_S, IQ2_S, IQ4_XS, I8, I16, I32, I64, F64, IQ1_M, BF16,
        TQ1_0, TQ2_0, MXFP4, NVFP4,
    ]
};

impl GgmlType {
    /// Look a type up by its ggml id; unknown (or retired) ids give [`Error::UnknownGgmlType`].
    pub fn from_id(id: u32) -> Result<Self> {
        ALL.iter()
            .copied()
            .find(|t| t.id() == id)
            .ok_or(Error::UnknownGgmlType { id })
    }

    /// Look a type up by ggml's name (`"Q4_K"`, `"F16"`, ...; case-insensitive).
    pub fn from_name(name: &str) -> Result<Self> {
        ALL.iter()
            .copied()
            .find(|t| t.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| Error::UnknownFormat {
                name: name.to_string(),
                known: ALL.iter().map(|t| t.name()).collect::<Vec<_>>().join(", "),
            })
    }

    /// ggml's numeric id of this type.
    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            Q8_K => 15,
            IQ2_XXS => 16,
            IQ2_XS => 17,
            IQ3_XXS => 18,
            IQ1_S => 19,
            IQ4_NL => 20,
            IQ3_S => 21,
            IQ2_S => 22,
            IQ4_XS => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            IQ1_M => 29,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            MXFP4 => 39,
            NVFP4 => 40,
        }
    }

    /// ggml's name of this type (`ggml_type_name`).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            IQ2_XXS => "IQ2_XXS",
            IQ2_XS => "IQ2_XS",
            IQ3_XXS => "IQ3_XXS",
            IQ1_S => "IQ1_S",
            IQ4_NL => "IQ4_NL",
            IQ3_S => "IQ3_S",
            IQ2_S => "IQ2_S",
            IQ4_XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1_M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
            NVFP4 => "NVFP4",
        }
    }

    /// Elements per block (1 for the plain scalar types).
    pub fn block_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 | I8 | I16 | I32 | I64 | F64 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 | IQ4_NL | MXFP4 => 32,
            NVFP4 => 64,
            Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | Q8_K | IQ2_XXS | IQ2_XS | IQ3_XXS | IQ1_S
            | IQ3_S | IQ2_S | IQ4_XS | IQ1_M | TQ1_0 | TQ2_0 => 256,
        }
    }

    /// Bytes per block (`sizeof(block_*)`, gguf-py `GGML_QUANT_SIZES`).
    pub fn type_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 => 4,
            F16 => 2,
            BF16 => 2,
            I8 => 1,
            I16 => 2,
            I32 => 4,
            I64 => 8,
            F64 => 8,
            Q4_0 => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            Q8_0 => 34,
            Q8_1 => 36,
            Q2_K => 84,
            Q3_K => 110,
            Q4_K => 144,
            Q5_K => 176,
            Q6_K => 210,
            Q8_K => 292,
            IQ2_XXS => 66,
            IQ2_XS => 74,
            IQ3_XXS => 98,
            IQ1_S => 50,
            IQ4_NL => 18,
            IQ3_S => 110,
            IQ2_S => 82,
            IQ4_XS => 136,
            IQ1_M => 56,
            TQ1_0 => 54,
            TQ2_0 => 66,
            MXFP4 => 17,
            NVFP4 => 36,
        }
    }

    /// Bytes needed for `n_elements` values of this type; an error when `n_elements` is not a
    /// multiple of [`block_size`](Self::block_size) (ggml rows always hold whole blocks).
    pub fn row_bytes(self, n_elements: usize) -> Result<usize> {
        let bs = self.block_size();
        if n_elements % bs != 0 {
            return Err(Error::Shape(format!(
                "{} elements is not a multiple of the {} block size {bs}",
                n_elements,
                self.name()
            )));
        }
        (n_elements / bs)
            .checked_mul(self.type_size())
            .ok_or_else(|| {
                Error::Shape(format!(
                    "{n_elements} {} elements overflow usize bytes",
                    self.name()
                ))
            })
    }

    /// Whether [`quantize`] and [`dequantize`] implement this type.
    pub fn has_codec(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16
                | BF16
                | Q4_0
                | Q4_1
                | Q5_0
                | Q5_1
                | Q8_0
                | Q4_K
                | Q5_K
                | Q6_K
                | IQ4_NL
                | MXFP4
                | NVFP4
        )
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Dequantize `bytes` (whole blocks of `ty`, C struct byte order) into `out`, bit-exactly as
/// ggml's `to_float`. `out.len()` is the number of elements; it must be a multiple of the
/// block size and `bytes.len()` must equal `ty.row_bytes(out.len())`.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let expected = ty.row_bytes(out.len())?;
    if bytes.len() != expected {
        return Err(Error::BufferSize {
            what: ty.name(),
            expected,
            got: bytes.len(),
        });
    }
    use GgmlType::*;
    match ty {
        F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        F16 => {
            use half::slice::HalfFloatSliceExt;
            // Bounded chunks keep the temporary small; `half` converts with F16C when present.
            let mut tmp = [half::f16::ZERO; 1024];
            for (o, c) in out.chunks_mut(1024).zip(bytes.chunks(2048)) {
                let t = &mut tmp[..o.len()];
                for (h, b) in t.iter_mut().zip(c.chunks_exact(2)) {
                    *h = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
                }
                t.convert_to_f32_slice(o);
            }
        }
        BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        Q4_0 => legacy::dequant_q4_0(bytes, out),
        Q4_1 => legacy::dequant_q4_1(bytes, out),
        Q5_0 => legacy::dequant_q5_0(bytes, out),
        Q5_1 => legacy::dequant_q5_1(bytes, out),
        Q8_0 => legacy::dequant_q8_0(bytes, out),
        Q4_K => kquants::dequant_q4_k(bytes, out),
        Q5_K => kquants::dequant_q5_k(bytes, out),
        Q6_K => kquants::dequant_q6_k(bytes, out),
        IQ4_NL => fp4::dequant_iq4_nl(bytes, out),
        MXFP4 => fp4::dequant_mxfp4(bytes, out),
        NVFP4 => fp4::dequant_nvfp4(bytes, out),
        _ => {
            return Err(Error::UnsupportedGgmlType {
                name: ty.name(),
                op: "dequantize",
            })
        }
    }
    Ok(())
}

/// How the Q4_K and Q5_K quantizers choose each 32-element sub-block's scale and min.
/// Other types ignore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KQuantSearch {
    /// ggml's `make_qkx2_quants` search (21 candidate grids for Q4_K, 16 for Q5_K, each with
    /// a weighted least-squares fit and a weighted error): bit-exact with ggml's
    /// `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref`. The default, and what the golden
    /// vectors and the GGUF exporter use.
    #[default]
    Reference,
    /// Min/max grid followed by two quantize + weighted least-squares refits (no candidate
    /// grids): about a tenth of the arithmetic, same block layout, not bit-exact with ggml;
    /// its reconstruction error is close to the reference's (`docs/benchmarks.md`).
    Fast,
}

/// Quantize `x` to `ty` with ggml's reference quantizer (`quantize_row_*_ref`, no importance
/// matrix) and append the blocks to `out`. `x.len()` must be a multiple of the block size;
/// NaN/Inf inputs give [`Error::NonFinite`] (F32/F16/BF16 accept them and store them as is).
pub fn quantize(ty: GgmlType, x: &[f32], out: &mut Vec<u8>) -> Result<()> {
    quantize_with(ty, x, out, KQuantSearch::Reference)
}

/// [`quantize`] with a choice of Q4_K/Q5_K sub-block search ([`KQuantSearch`]); with
/// [`KQuantSearch::Reference`] it is exactly [`quantize`].
pub fn quantize_with(
    ty: GgmlType,
    x: &[f32],
    out: &mut Vec<u8>,
    search: KQuantSearch,
) -> Result<()> {
    let nbytes = ty.row_bytes(x.len())?;
    use GgmlType::*;
    match ty {
        F32 => {
            out.reserve(nbytes);
            for v in x {
                out.extend_from_slice(&v.to_le_bytes());
            }
            return Ok(());
        }
        F16 => {
            out.reserve(nbytes);
            for v in x {
                out.extend_from_slice(&half::f16::from_f32(*v).to_bits().to_le_bytes());
            }
            return Ok(());
        }
        BF16 => {
            out.reserve(nbytes);
            for v in x {
                out.extend_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes());
            }
            return Ok(());
        }
        _ => {}
    }
    if !ty.has_codec() {
        return Err(Error::UnsupportedGgmlType {
            name: ty.name(),
            op: "quantize",
        });
    }
    if ty == Q4_K && search == KQuantSearch::Fast {
        // the AVX2 kernel checks finiteness in its own pass over the data; on a non-finite
        // value (or without AVX2) the blocks are dropped and the path below reports it
        let start = out.len();
        out.resize(start + nbytes, 0);
        if kquants::quant_q4_k_fast_checked(x, &mut out[start..]) == Some(true) {
            return Ok(());
        }
        out.truncate(start);
    }
    // one vectorized pass (magnitude bits at or above +Inf's); locate only on failure
    if crate::fastq::max_mag_bits_slice(x) >= 0x7f80_0000 {
        if let Some(index) = x.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                format: ty.name(),
                index,
                value: x[index],
            });
        }
    }
    let start = out.len();
    out.resize(start + nbytes, 0);
    let dst = &mut out[start..];
    match ty {
        Q4_0 => legacy::quant_q4_0(x, dst),
        Q4_1 => legacy::quant_q4_1(x, dst),
        Q5_0 => legacy::quant_q5_0(x, dst),
        Q5_1 => legacy::quant_q5_1(x, dst),
        Q8_0 => legacy::quant_q8_0(x, dst),
        Q4_K => kquants::quant_q4_k(x, dst, search),
        Q5_K => kquants::quant_q5_k(x, dst, search),
        Q6_K => kquants::quant_q6_k(x, dst),
        IQ4_NL => fp4::quant_iq4_nl(x, dst),
        MXFP4 => fp4::quant_mxfp4(x, dst),
        NVFP4 => fp4::quant_nvfp4(x, dst),
        _ => unreachable!("has_codec() covers exactly the types matched above"),
    }
    Ok(())
}

/// f16 bits (little-endian bytes) to f32.
#[inline(always)]
fn f16_le(b0: u8, b1: u8) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b0, b1])).to_f32()
}

/// f32 to f16 bits, round to nearest even (`GGML_FP32_TO_FP16`).
#[inline(always)]
fn f16_bits(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_bits().to_le_bytes()
}

/// f32 rounded through f16 and back (what ggml reads after storing a scale).
#[inline(always)]
fn f16_round(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// ggml's `nearest_int`: round half to even via the 1.5·2^23 magic number. Exact for
/// |v| <= 2^22; outside that range it returns the same (meaningless) value ggml does.
#[inline(always)]
fn nearest_int(v: f32) -> i32 {
    let t = v + 12_582_912.0;
    ((t.to_bits() & 0x007f_ffff) as i32) - 0x0040_0000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_unknown_ids_are_typed_errors() {
        for t in ALL {
            assert_eq!(GgmlType::from_id(t.id()).unwrap(), t);
            assert_eq!(GgmlType::from_name(t.name()).unwrap(), t);
        }
        for id in [4u32, 5, 31, 32, 33, 36, 37, 38, 41, 1000, u32::MAX] {
            assert_eq!(GgmlType::from_id(id), Err(Error::UnknownGgmlType { id }));
        }
        assert!(GgmlType::from_name("Q9_9").is_err());
    }

    #[test]
    fn row_bytes_checks_block_multiple() {
        assert_eq!(GgmlType::Q8_0.row_bytes(64).unwrap(), 68);
        assert_eq!(GgmlType::Q4_K.row_bytes(512).unwrap(), 288);
        assert_eq!(GgmlType::NVFP4.row_bytes(128).unwrap(), 72);
        assert_eq!(GgmlType::F16.row_bytes(7).unwrap(), 14);
        assert!(matches!(GgmlType::Q4_1.row_bytes(33), Err(Error::Shape(_))));
        assert!(matches!(
            GgmlType::Q6_K.row_bytes(128),
            Err(Error::Shape(_))
        ));
    }

    #[test]
    fn nearest_int_is_round_half_even() {
        for (v, want) in [
            (0.5f32, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (-2.5, -2),
            (3.49, 3),
            (-3.51, -4),
            (4_194_303.0, 4_194_303),
        ] {
            assert_eq!(nearest_int(v), want, "{v}");
        }
    }
}
