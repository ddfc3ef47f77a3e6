//! [`PackedLinear`]: a quantized linear layer repacked for SIMD, with fused-dequantization
//! GEMV/GEMM.
//!
//! # Packed layout
//! * Rows (output channels) are grouped in **row tiles** of [`TILE_ROWS`] = 4; the last tile is
//!   padded with all-zero rows. Each tile is one contiguous byte range, so a thread that owns a
//!   row block streams a single region and the kernel reuses every activation load for 4 rows.
//! * Columns are split into **segments**, one per scale group (per-channel and per-tensor:
//!   one segment; 2-D blocks: one per block column). Each segment is padded to a multiple of
//!   [`CHUNK`] = 16 columns. Act-order (`g_idx`) tensors are handled by **permuting columns at
//!   pack time**: segment `k` holds the columns with `g_idx == k` in increasing order, and the
//!   activations are gathered into the same order (`O(tokens x cols)` per call).
//! * Inside a tile, segment `k` is `[s_0..s_3: f32][b_0..b_3: f32]` (scale and bias of the 4
//!   rows, next to their data) followed by its chunks; chunk `j` stores the 16 codes of row 0,
//!   then row 1, 2, 3. A weight decodes as `w = s * v(code) + b`, where `v` is the code's value
//!   (`code` for integers, a table for NF4/E2M1, an f16 reinterpretation for FP8) and
//!   `b = -s * zero_point` for integers, 0 otherwise.
//! * Chunk encodings (16 codes), chosen so one broadcast + one variable shift + one mask
//!   yields 8 (AVX2) or 16 (AVX-512) lane-aligned codes:
//!   - 4-bit: a `u64` with code `e` at bit `32*(e&1) + 4*(e>>1)` (interleaved nibbles);
//!   - 2-bit: a `u32` with code `e` at bit `2e`;
//!   - 3-bit: that 2-bit plane of the low bits plus a `u16` with bit 2 of code `e` at bit `e`;
//!   - 8-bit (and 5..7-bit integers): 16 plain bytes.
//! * Headers: 4 f32 scales + 4 f32 biases (asymmetric integers), 4 f32 scales, or 4 one-byte
//!   codes (`Coded`, at most 256 distinct scales): for 4-bit layers whose stored scales are all
//!   E8M0 powers of two (MXFP4) or all non-negative E4M3 values (NVFP4) the byte is the scale's
//!   own E8M0/E4M3 code (the integer-activation kernel decodes it with a shift, or the f16 trick
//!   below), otherwise an index into the sorted distinct scales; either way a table maps the
//!   byte to the same f32 `scale / global_scale`.
//! * FP8 E4M3 codes are decoded as the f16 `sign<<15 | (code & 0x7f)<<7`, which equals the
//!   E4M3 value / 256 exactly for every finite code, so the scale is stored multiplied by 256
//!   (NaN codes are not preserved by the kernel; quantizers never emit them).
//!
//! The kernel computes, per row and segment, `s * sum(v * x) + b * sum(x)`; the per-segment
//! activation sums are computed once per call.

use std::borrow::Cow;

use lowbit_numerics::{ElemFormat, FloatFormat, NestedScales, QuantizedTensor, Scheme};
use rayon::prelude::*;

use crate::act8::{A8Kind, ActMode, A8};
use crate::codes;
use crate::isa::{self, Isa};
use crate::{Error, Result};

/// Rows per row tile.
pub const TILE_ROWS: usize = 4;
/// Columns per chunk.
pub const CHUNK: usize = 16;
/// How the per-row scale (and bias) of a segment is stored in its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HdrMode {
    /// 4 f32 scales + 4 f32 biases (asymmetric integers): 32 bytes.
    ScaleBias,
    /// 4 f32 scales, bias `= s * bmul`: 16 bytes.
    Scale,
    /// 4 u8 codes or indices (see [`ScaleCode`]) into a per-layer table of at most 256
    /// scales (E8M0/E4M3 block scales: MXFP4, NVFP4), bias `= s * bmul`: 4 bytes.
    Coded,
}

/// What the bytes of a [`HdrMode::Coded`] header are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScaleCode {
    /// Indices into the sorted distinct scales (`stab`).
    Table,
    /// E8M0 exponent codes: the stored scale is `2^(code - 127)` (codes 1..=254), `stab[code]`
    /// is that divided by the global scale. The SIMD kernels decode it as the f32 `code << 23`.
    E8M0,
    /// E4M3 codes of non-negative scales (codes 0..=0x7E): the stored scale is `e4m3(code)`,
    /// `stab[code]` is that divided by the global scale. The SIMD kernels decode it as the f16
    /// `code << 7` (`= e4m3(code) / 256`, see [`codes::e4m3_as_f16_bits`]).
    E4M3,
}

impl ScaleCode {
    /// The code of every stored scale if they all are E8M0 powers of two (normal f32), or all
    /// non-negative finite E4M3 values; `None` otherwise.
    fn detect(scales: &[f32]) -> Option<(ScaleCode, Vec<u8>)> {
        let e8 = |s: f32| {
            let b = s.to_bits();
            let e = b >> 23;
            (b & 0x007F_FFFF == 0 && (1..=254).contains(&e)).then_some(e as u8)
        };
        if let Some(c) = scales.iter().map(|&s| e8(s)).collect::<Option<Vec<u8>>>() {
            return Some((ScaleCode::E8M0, c));
        }
        // e4m3 is increasing on codes 0..=0x7E (non-negative finite values)
        let vals: Vec<f32> = (0..=0x7Eu8).map(codes::e4m3).collect();
        let e4 = |s: f32| {
            let i = vals.partition_point(|&v| v < s);
            (i < vals.len() && vals[i].to_bits() == s.to_bits()).then_some(i as u8)
        };
        scales
            .iter()
            .map(|&s| e4(s))
            .collect::<Option<Vec<u8>>>()
            .map(|c| (ScaleCode::E4M3, c))
    }

    /// The stored scale of a code.
    fn value(self, code: u8) -> f32 {
        match self {
            ScaleCode::E8M0 if (1..=254).contains(&code) => f32::from_bits((code as u32) << 23),
            ScaleCode::E4M3 if code <= 0x7E => codes::e4m3(code),
            _ => 0.0,
        }
    }
}

impl HdrMode {
    fn bytes(self) -> usize {
        match self {
            HdrMode::ScaleBias => 32,
            HdrMode::Scale => 16,
            HdrMode::Coded => 4,
        }
    }
}
/// Tokens processed per pass of the fused kernel.
pub(crate) const TB: usize = 4;
/// Tokens per pass of the INT8-activation prefill on INT4 layers
/// ([`PackedLinear::run_tile_act8_wide`]): the 4 unpacked weight registers of a block serve 8
/// tokens (8 accumulators), halving the unpack and the per-group and per-call overhead per
/// token against [`TB`].
pub(crate) const TB_WIDE: usize = 8;
const _: () = assert!(TOKEN_BLOCK.is_multiple_of(TB_WIDE) && TB_WIDE >= TB);
/// Tokens per task of the INT8-activation prefill ([`PackedLinear::run_tiles_2d`]).
const TOKEN_BLOCK: usize = 64;
/// Most row tiles per task of the INT8-activation prefill.
const ROW_BLOCK_TILES: usize = 16;
/// From this many tokens on, the SIMD paths dequantize a row block into an f32 tile and run
/// the dense GEMM micro-kernel on it.
pub const GEMM_MIN_TOKENS: usize = 16;

/// How a chunk of 16 codes is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Store {
    B2,
    B3,
    B4,
    B8,
}

impl Store {
    pub(crate) fn chunk_bytes(self) -> usize {
        match self {
            Store::B2 => 4,
            Store::B3 => 6,
            Store::B4 => 8,
            Store::B8 => 16,
        }
    }
}

/// What a code means before scaling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Vals {
    /// The code itself, as an unsigned integer.
    Int,
    /// The NF4 table.
    Nf4,
    /// FP4 E2M1.
    E2M1,
    /// FP8 E4M3 as f16 (value / 256).
    E4M3,
    /// FP8 E5M2 as f16 (exact).
    E5M2,
}

impl Vals {
    fn value(self, code: u8) -> f32 {
        match self {
            Vals::Int => code as f32,
            Vals::Nf4 => codes::NF4[(code & 15) as usize],
            Vals::E2M1 => codes::E2M1[(code & 15) as usize],
            Vals::E4M3 => half::f16::from_bits(codes::e4m3_as_f16_bits(code)).to_f32(),
            Vals::E5M2 => half::f16::from_bits((code as u16) << 8).to_f32(),
        }
    }
}

/// One column segment (a scale group, padded to whole chunks).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seg {
    /// Number of 16-column chunks.
    pub(crate) chunks: usize,
    /// First padded column of the segment.
    pub(crate) col0: usize,
    /// Byte offset of the segment header within a tile.
    pub(crate) byte_off: usize,
}

#[derive(Debug, Clone)]
struct Orig {
    scheme: Scheme,
    scales: Vec<f32>,
    zero_points: Option<Vec<u8>>,
    global_scale: Option<f32>,
    g_idx: Option<Vec<u32>>,
    nested: Option<NestedScales>,
}

/// A quantized linear layer `y = x · Wᵀ` (`W` is `rows x cols`, `[out][in]`) in the packed
/// layout described in the module docs.
#[derive(Debug, Clone)]
pub struct PackedLinear {
    rows: usize,
    cols: usize,
    pub(crate) store: Store,
    pub(crate) vals: Vals,
    pub(crate) segs: Vec<Seg>,
    /// Padded column count (sum of segment widths).
    pub(crate) pcols: usize,
    /// Padded position -> source column (`u32::MAX` for padding); `None` when identity.
    col_map: Option<Vec<u32>>,
    /// Source column -> padded position.
    col_pos: Vec<u32>,
    pub(crate) tile_bytes: usize,
    pub(crate) ntiles: usize,
    pub(crate) hmode: HdrMode,
    /// Header bytes per segment.
    pub(crate) hdr: usize,
    /// Bias multiplier for `Scale`/`Coded` headers (`-zero_point` of symmetric integers, else 0).
    pub(crate) bmul: f32,
    /// Scale table of `Coded` headers.
    stab: Box<[f32; 256]>,
    /// What the bytes of `Coded` headers are (indices into `stab` in every case).
    pub(crate) scode: ScaleCode,
    /// `E8M0`/`E4M3` header codes: the factor from the kernels' decoded code to `stab[code]`
    /// (`1 / global_scale`, resp. `256 / global_scale`, rounded once to f32).
    pub(crate) sfin: f32,
    /// `E4M3` header codes that are all normal (>= 8: exponent field >= 1), so the SIMD
    /// kernel may decode them as f32 bit patterns (`act8::avx2::SC_E4M3N`).
    pub(crate) e4m3_normal: bool,
    pub(crate) data: Vec<u8>,
    /// `v(code)` for all 256 codes (scalar path).
    pub(crate) vtab: Box<[f32; 256]>,
    /// Activation handling of `forward` (see [`ActMode`]).
    act: ActMode,
    /// Integer weights of the INT8-activation path (`act8`).
    pub(crate) a8: A8,
    orig: Orig,
}

fn encode_chunk(store: Store, c: &[u8; CHUNK], out: &mut [u8]) {
    match store {
        Store::B4 => {
            let mut v = 0u64;
            for (e, &code) in c.iter().enumerate() {
                v |= ((code & 15) as u64) << (32 * (e & 1) + 4 * (e >> 1));
            }
            out[..8].copy_from_slice(&v.to_le_bytes());
        }
        Store::B2 | Store::B3 => {
            let mut lo = 0u32;
            let mut hi = 0u16;
            for (e, &code) in c.iter().enumerate() {
                lo |= ((code & 3) as u32) << (2 * e);
                hi |= (((code >> 2) & 1) as u16) << e;
            }
            out[..4].copy_from_slice(&lo.to_le_bytes());
            if store == Store::B3 {
                out[4..6].copy_from_slice(&hi.to_le_bytes());
            }
        }
        Store::B8 => out[..16].copy_from_slice(c),
    }
}

pub(crate) fn decode_chunk(store: Store, b: &[u8]) -> [u8; CHUNK] {
    let mut c = [0u8; CHUNK];
    match store {
        Store::B4 => {
            let v = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
            for (e, code) in c.iter_mut().enumerate() {
                *code = ((v >> (32 * (e & 1) + 4 * (e >> 1))) & 15) as u8;
            }
        }
        Store::B2 | Store::B3 => {
            let lo = u32::from_le_bytes(b[..4].try_into().expect("4 bytes"));
            let hi = if store == Store::B3 {
                u16::from_le_bytes(b[4..6].try_into().expect("2 bytes"))
            } else {
                0
            };
            for (e, code) in c.iter_mut().enumerate() {
                *code = (((lo >> (2 * e)) & 3) as u8) | ((((hi >> e) & 1) as u8) << 2);
            }
        }
        Store::B8 => c.copy_from_slice(&b[..16]),
    }
    c
}

fn rd_f32(d: &[u8], off: usize) -> f32 {
    f32::from_le_bytes(d[off..off + 4].try_into().expect("4 bytes"))
}

impl PackedLinear {
    /// Repack a quantized tensor. Supported: integer codes of 2..=8 bits (sym or asym, any
    /// granularity), ternary, NF4, FP4 E2M1 (NVFP4 with its global scale, MXFP4), FP8 E4M3 and
    /// E5M2; per-tensor, per-channel, per-group (any group size, ragged last group) and 2-D
    /// block scales; act-order `g_idx`. Anything else (binary, FP6, ...) is
    /// [`Error::Unsupported`], so callers can fall back to the dequantized dense path.
    pub fn new(q: &QuantizedTensor) -> Result<Self> {
        q.validate()?;
        let (store, vals, sym_zp) = match q.scheme.elem {
            ElemFormat::Int { bits } => {
                let store = match bits {
                    2 => Store::B2,
                    3 => Store::B3,
                    4 => Store::B4,
                    5..=8 => Store::B8,
                    b => return Err(Error::Unsupported(format!("integer width {b}"))),
                };
                (store, Vals::Int, 1u32 << (bits - 1))
            }
            ElemFormat::Ternary => (Store::B2, Vals::Int, 1),
            ElemFormat::Nf4 => (Store::B4, Vals::Nf4, 0),
            ElemFormat::Float(FloatFormat::E2M1) => (Store::B4, Vals::E2M1, 0),
            ElemFormat::Float(FloatFormat::E4M3) => (Store::B8, Vals::E4M3, 0),
            ElemFormat::Float(FloatFormat::E5M2) => (Store::B8, Vals::E5M2, 0),
            other => {
                return Err(Error::Unsupported(format!(
                    "PackedLinear has no kernel for element format {other:?}; use the dequantized dense path"
                )))
            }
        };
        let (rows, cols) = (q.rows, q.cols);
        let bits = q.scheme.elem.bits();
        let (br, bc) = q.scheme.granularity.block_shape(rows, cols);
        let (_, gc) = q.grid();
        let gs = q.global_scale.unwrap_or(1.0);

        // Column membership of each scale group, in increasing column order.
        let mut members: Vec<Vec<u32>> = vec![Vec::new(); gc];
        for c in 0..cols {
            let g = match &q.g_idx {
                Some(g) => g[c] as usize,
                None => c / bc.max(1),
            };
            members[g].push(c as u32);
        }
        // Scale and bias of every (row, group), and the most compact header that holds them.
        let mut sv = vec![0f32; rows * gc];
        let mut bv = vec![0f32; rows * gc];
        for r in 0..rows {
            for k in 0..gc {
                let blk = (r / br.max(1)) * gc + k;
                let mut s = q.scales[blk] / gs;
                let b = match vals {
                    Vals::Int => {
                        let zp = match &q.zero_points {
                            Some(z) => z[blk] as u32,
                            None => sym_zp,
                        };
                        -(s * zp as f32)
                    }
                    _ => 0.0,
                };
                if vals == Vals::E4M3 {
                    s *= 256.0;
                }
                sv[r * gc + k] = s;
                bv[r * gc + k] = b;
            }
        }
        let bmul = if vals == Vals::Int && q.zero_points.is_none() {
            -(sym_zp as f32)
        } else {
            0.0
        };
        let mut distinct: Vec<u32> = sv.iter().map(|s| s.to_bits()).collect();
        distinct.sort_unstable();
        distinct.dedup();
        // 4-bit codes whose stored scales are E8M0 / E4M3 values keep those codes in the header
        // (the SIMD integer kernel decodes them arithmetically); `stab[code]` is the same f32
        // `scale / global_scale` as in the other header modes
        let coded = if q.zero_points.is_none() && store == Store::B4 {
            ScaleCode::detect(&q.scales)
        } else {
            None
        };
        let hmode = if q.zero_points.is_some() {
            HdrMode::ScaleBias
        } else if coded.is_some() || distinct.len() <= 256 {
            HdrMode::Coded
        } else {
            HdrMode::Scale
        };
        let hdr = hmode.bytes();
        let mut stab = Box::new([0f32; 256]);
        let scode = match &coded {
            Some((sc, _)) => {
                for (c, d) in stab.iter_mut().enumerate() {
                    *d = sc.value(c as u8) / gs;
                }
                *sc
            }
            None => {
                if hmode == HdrMode::Coded {
                    for (d, &b) in stab.iter_mut().zip(&distinct) {
                        *d = f32::from_bits(b);
                    }
                }
                ScaleCode::Table
            }
        };
        let cb = store.chunk_bytes();
        let mut segs = Vec::with_capacity(gc);
        let (mut col0, mut byte_off) = (0usize, 0usize);
        for m in &members {
            let chunks = m.len().div_ceil(CHUNK);
            segs.push(Seg {
                chunks,
                col0,
                byte_off,
            });
            col0 += chunks * CHUNK;
            byte_off += hdr + chunks * TILE_ROWS * cb;
        }
        let pcols = col0;
        let tile_bytes = byte_off;
        let mut col_map = vec![u32::MAX; pcols];
        let mut col_pos = vec![0u32; cols];
        for (k, m) in members.iter().enumerate() {
            for (i, &c) in m.iter().enumerate() {
                col_map[segs[k].col0 + i] = c;
                col_pos[c as usize] = (segs[k].col0 + i) as u32;
            }
        }
        let identity = pcols == cols && col_map.iter().enumerate().all(|(i, &c)| c as usize == i);
        let ntiles = rows.div_ceil(TILE_ROWS);
        let mut data = vec![0u8; ntiles * tile_bytes];
        let rb = q.row_bytes();
        let mut codes_buf = vec![0u8; cols];
        for r in 0..rows {
            let row = &q.data[r * rb..(r + 1) * rb];
            for (c, code) in codes_buf.iter_mut().enumerate() {
                *code = codes::get_code(row, bits, c);
            }
            let (tile, rr) = (r / TILE_ROWS, r % TILE_ROWS);
            let tbase = tile * tile_bytes;
            for (k, seg) in segs.iter().enumerate() {
                let (s, b) = (sv[r * gc + k], bv[r * gc + k]);
                let h = tbase + seg.byte_off;
                match hmode {
                    HdrMode::ScaleBias => {
                        data[h + 4 * rr..h + 4 * rr + 4].copy_from_slice(&s.to_le_bytes());
                        data[h + 16 + 4 * rr..h + 20 + 4 * rr].copy_from_slice(&b.to_le_bytes());
                    }
                    HdrMode::Scale => {
                        data[h + 4 * rr..h + 4 * rr + 4].copy_from_slice(&s.to_le_bytes())
                    }
                    HdrMode::Coded => {
                        data[h + rr] = match &coded {
                            Some((_, c)) => c[(r / br.max(1)) * gc + k],
                            None => distinct
                                .binary_search(&s.to_bits())
                                .expect("scale in table") as u8,
                        };
                    }
                }
                for j in 0..seg.chunks {
                    let mut chunk = [0u8; CHUNK];
                    for (e, slot) in chunk.iter_mut().enumerate() {
                        let src = col_map[seg.col0 + j * CHUNK + e];
                        if src != u32::MAX {
                            *slot = codes_buf[src as usize];
                        }
                    }
                    let off = h + hdr + (j * TILE_ROWS + rr) * cb;
                    encode_chunk(store, &chunk, &mut data[off..off + cb]);
                }
            }
        }
        let mut vtab = Box::new([0f32; 256]);
        for (c, v) in vtab.iter_mut().enumerate() {
            *v = vals.value(c as u8);
        }
        Ok(PackedLinear {
            rows,
            cols,
            store,
            vals,
            segs,
            pcols,
            col_map: if identity { None } else { Some(col_map) },
            col_pos,
            tile_bytes,
            ntiles,
            hmode,
            hdr,
            bmul,
            stab,
            scode,
            sfin: match scode {
                ScaleCode::E4M3 => (256.0 / gs as f64) as f32,
                _ => (1.0 / gs as f64) as f32,
            },
            e4m3_normal: matches!(&coded, Some((ScaleCode::E4M3, c)) if c.iter().all(|&v| v >= 8)),
            data,
            vtab,
            act: ActMode::F32,
            a8: A8::new(store, vals, bmul),
            orig: Orig {
                scheme: q.scheme,
                scales: q.scales.clone(),
                zero_points: q.zero_points.clone(),
                global_scale: q.global_scale,
                g_idx: q.g_idx.clone(),
                nested: q.nested.clone(),
            },
        })
    }

    /// Convert back to the `QuantizedTensor` it was built from (codes are read back out of the
    /// packed layout; scales, zero points and the other metadata are kept verbatim).
    pub fn to_quantized(&self) -> QuantizedTensor {
        let bits = self.orig.scheme.elem.bits();
        let rb = lowbit_numerics::tensor::packed_row_bytes(self.cols, bits);
        let mut data = vec![0u8; self.rows * rb];
        let cb = self.store.chunk_bytes();
        // segment of each padded chunk
        let mut seg_of_chunk = Vec::with_capacity(self.pcols / CHUNK);
        for (k, s) in self.segs.iter().enumerate() {
            seg_of_chunk.extend(std::iter::repeat_n(k, s.chunks));
        }
        for r in 0..self.rows {
            let (tile, rr) = (r / TILE_ROWS, r % TILE_ROWS);
            let row = &mut data[r * rb..(r + 1) * rb];
            for c in 0..self.cols {
                let p = self.col_pos[c] as usize;
                let seg = &self.segs[seg_of_chunk[p / CHUNK]];
                let j = (p - seg.col0) / CHUNK;
                let off =
                    tile * self.tile_bytes + seg.byte_off + self.hdr + (j * TILE_ROWS + rr) * cb;
                let chunk = decode_chunk(self.store, &self.data[off..off + cb]);
                codes::put_code(row, bits, c, chunk[p % CHUNK]);
            }
        }
        QuantizedTensor {
            scheme: self.orig.scheme,
            rows: self.rows,
            cols: self.cols,
            data,
            scales: self.orig.scales.clone(),
            zero_points: self.orig.zero_points.clone(),
            global_scale: self.orig.global_scale,
            g_idx: self.orig.g_idx.clone(),
            nested: self.orig.nested.clone(),
        }
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes the kernel streams per full pass over the weights (codes, inline scales/biases and
    /// padding).
    pub fn weight_bytes(&self) -> usize {
        self.data.len()
    }

    /// `y[t][out] = sum_in x[t][in] * W[out][in]` for `n_tokens` token rows, on the path chosen
    /// by [`isa::selected`] (`LOWBIT_KERNEL` to force one), threaded over the current rayon pool.
    /// With [`ActMode::Int8Block`] (see [`PackedLinear::set_act_mode`]) the activations are
    /// first quantized to INT8 per 32-column block and the products are integer dot products
    /// (module `act8`), at every batch size.
    pub fn forward(&self, x: &[f32], n_tokens: usize, y: &mut [f32]) -> Result<()> {
        self.forward_with(isa::selected(), x, n_tokens, y)
    }

    /// [`PackedLinear::forward`] on an explicit path (clamped to what the CPU supports).
    pub fn forward_with(&self, isa: Isa, x: &[f32], n_tokens: usize, y: &mut [f32]) -> Result<()> {
        if x.len() != n_tokens * self.cols || y.len() != n_tokens * self.rows {
            return Err(Error::Shape(format!(
                "PackedLinear::forward: x has {} (want {n_tokens}x{}), y has {} (want {n_tokens}x{})",
                x.len(),
                self.cols,
                y.len(),
                self.rows
            )));
        }
        if n_tokens == 0 || self.rows == 0 {
            return Ok(());
        }
        let isa = Isa::clamp(isa);
        let xp = self.gather(x, n_tokens);
        if self.act == ActMode::Int8Block {
            let qa = self.quantize_act(&xp, n_tokens, isa != Isa::Scalar);
            if n_tokens > TB {
                self.run_tiles_2d(n_tokens, y, |tile, tok, tb, buf| {
                    self.run_tile_act8_wide(isa, tile, &qa, tok, tb, buf)
                });
            } else if n_tokens == 1 && isa != Isa::Scalar && self.b4_pair_nb() > 0 {
                self.run_row_pairs_b1(y, |tile, out| self.run_pair_act8(isa, tile, &qa, out));
            } else {
                self.run_row_blocks(n_tokens, y, |tile, tok, tb, buf| {
                    self.run_tile_act8(isa, tile, &qa, tok, tb, buf)
                });
            }
            return Ok(());
        }
        let nseg = self.segs.len();
        let mut xs = vec![0f32; n_tokens * nseg];
        for t in 0..n_tokens {
            let xr = &xp[t * self.pcols..(t + 1) * self.pcols];
            for (k, s) in self.segs.iter().enumerate() {
                xs[t * nseg + k] = xr[s.col0..s.col0 + s.chunks * CHUNK].iter().sum();
            }
        }
        if isa != Isa::Scalar && n_tokens >= GEMM_MIN_TOKENS {
            return self.forward_gemm(isa, &xp, n_tokens, y);
        }
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx2 && self.store == Store::B8 && self.vals == Vals::E4M3 {
            // activations scaled by a power of two per token (crate::x86::e4m3_x_scale)
            let mut xsc = vec![0f32; n_tokens * self.pcols];
            let mut fo = vec![0f32; n_tokens];
            for t in 0..n_tokens {
                let src = &xp[t * self.pcols..(t + 1) * self.pcols];
                let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
                let amax = if src.iter().all(|v| v.is_finite()) {
                    amax
                } else {
                    f32::NAN
                };
                let (k, f) = crate::x86::e4m3_x_scale(amax);
                fo[t] = f;
                for (d, &v) in xsc[t * self.pcols..(t + 1) * self.pcols]
                    .iter_mut()
                    .zip(src)
                {
                    *d = v * k;
                }
            }
            self.run_row_blocks(n_tokens, y, |tile, tok, tb, buf| {
                crate::x86::run_tile_e4m3(self, tile, &xsc, &fo, tok, tb, buf)
            });
            return Ok(());
        }
        self.run_row_blocks(n_tokens, y, |tile, tok, tb, buf| {
            self.run_tile(isa, tile, &xp, &xs, tok, tb, buf)
        });
        Ok(())
    }

    /// The activation handling of [`PackedLinear::forward`].
    pub fn act_mode(&self) -> ActMode {
        self.act
    }

    /// Choose the activation handling of [`PackedLinear::forward`]. [`ActMode::Int8Block`]
    /// needs INT4..INT8, E2M1 or NF4 codes ([`PackedLinear::supports_int8_act`]); otherwise
    /// [`Error::Unsupported`] and the mode is unchanged.
    pub fn set_act_mode(&mut self, mode: ActMode) -> Result<()> {
        if mode == ActMode::Int8Block && !self.supports_int8_act() {
            return Err(Error::Unsupported(format!(
                "INT8 block activations need INT4..INT8, FP4 E2M1 or NF4 weight codes, this layer is {:?}",
                self.orig.scheme
            )));
        }
        self.act = mode;
        Ok(())
    }

    /// Threads over row blocks (about 8 tasks per thread): `tile_fn(tile, tok, tb, buf)` fills
    /// `buf[t][row]` for tokens `tok..tok+tb` (`tb <= TB`) of one row tile.
    fn run_row_blocks<F>(&self, n_tokens: usize, y: &mut [f32], tile_fn: F)
    where
        F: Fn(usize, usize, usize, &mut [[f32; TILE_ROWS]; TB]) + Sync,
    {
        let threads = rayon::current_num_threads().max(1);
        let tiles_per_task = self.ntiles.div_ceil(threads * 8).max(1);
        let blocks: Vec<(usize, Vec<f32>)> = (0..self.ntiles.div_ceil(tiles_per_task))
            .into_par_iter()
            .map(|bi| {
                let t0 = bi * tiles_per_task;
                let t1 = (t0 + tiles_per_task).min(self.ntiles);
                let nrows = (t1 - t0) * TILE_ROWS;
                let mut out = vec![0f32; n_tokens * nrows];
                let mut buf = [[0f32; TILE_ROWS]; TB];
                for tile in t0..t1 {
                    let mut tok = 0;
                    while tok < n_tokens {
                        let tb = (n_tokens - tok).min(TB);
                        tile_fn(tile, tok, tb, &mut buf);
                        for (t, b) in buf.iter().enumerate().take(tb) {
                            let o = (tok + t) * nrows + (tile - t0) * TILE_ROWS;
                            out[o..o + TILE_ROWS].copy_from_slice(b);
                        }
                        tok += tb;
                    }
                }
                (t0, out)
            })
            .collect();
        for (t0, out) in blocks {
            let r0 = t0 * TILE_ROWS;
            let nrows = out.len() / n_tokens;
            let take = nrows.min(self.rows - r0);
            for t in 0..n_tokens {
                y[t * self.rows + r0..t * self.rows + r0 + take]
                    .copy_from_slice(&out[t * nrows..t * nrows + take]);
            }
        }
    }

    /// One-token scheduler of INT4 layers on the INT8-activation path: row blocks as in
    /// [`Self::run_row_blocks`] (an even number of tiles each), `pair_fn(tile, out)` filling the
    /// rows of tiles `tile` and `tile + 1`, and the odd last tile of the layer through
    /// [`Self::run_tile_act8`]'s kernel (via `pair_fn`'s caller, [`Self::run_pair_act8`]).
    fn run_row_pairs_b1<F>(&self, y: &mut [f32], pair_fn: F)
    where
        F: Fn(usize, &mut [[f32; TILE_ROWS]; 2]) + Sync,
    {
        let threads = rayon::current_num_threads().max(1);
        let tiles_per_task = self.ntiles.div_ceil(threads * 8).max(1).next_multiple_of(2);
        y.par_chunks_mut(tiles_per_task * TILE_ROWS)
            .enumerate()
            .for_each(|(bi, ys)| {
                let t0 = bi * tiles_per_task;
                let t1 = (t0 + tiles_per_task).min(self.ntiles);
                let mut buf = [[0f32; TILE_ROWS]; 2];
                for tile in (t0..t1).step_by(2) {
                    pair_fn(tile, &mut buf);
                    let r = (tile - t0) * TILE_ROWS;
                    let take = (ys.len() - r).min(2 * TILE_ROWS);
                    ys[r..r + take].copy_from_slice(&buf.as_flattened()[..take]);
                }
            });
    }

    /// Rows of tiles `tile` and `tile + 1` (if it exists) for one token on the INT8-activation
    /// path of an INT4 layer ([`Self::b4_pair_nb`] > 0).
    fn run_pair_act8(
        &self,
        isa: Isa,
        tile: usize,
        qa: &crate::act8::QuantAct,
        out: &mut [[f32; TILE_ROWS]; 2],
    ) {
        #[cfg(target_arch = "x86_64")]
        if isa != Isa::Scalar && tile + 1 < self.ntiles {
            assert!(
                isa.supported()
                    && qa.xperm.len() >= self.pcols
                    && qa.sx.len() >= qa.nblk
                    && qa.xsum.len() >= self.segs.len()
            );
            use crate::act8::avx2::tile_b4_pair;
            // SAFETY: isa is a supported SIMD path (AVX2+FMA at least, checked above); the
            // layer is INT4 with the 4-pair integer path and NB > 0 (b4_pair_nb, checked by
            // the caller); tile + 1 < ntiles; qa holds one token.
            unsafe {
                match self.b4_pair_nb() {
                    1 => tile_b4_pair::<1>(self, tile, qa, out),
                    2 => tile_b4_pair::<2>(self, tile, qa, out),
                    _ => tile_b4_pair::<4>(self, tile, qa, out),
                }
            }
            return;
        }
        let mut buf = [[0f32; TILE_ROWS]; TB];
        for (j, o) in out.iter_mut().enumerate() {
            if tile + j < self.ntiles {
                self.run_tile_act8(isa, tile + j, qa, 0, 1, &mut buf);
                *o = buf[0];
            }
        }
    }

    /// Prefill scheduler: the `(row tiles) x (tokens)` output is cut into tasks of up to
    /// [`ROW_BLOCK_TILES`] row tiles x [`TOKEN_BLOCK`] tokens, split over the pool in both
    /// directions (so that short layers still give every thread work), each written straight
    /// into `y`. Inside a task the tokens go in groups of [`TB_WIDE`] and, per group, every row
    /// tile of the block: the group's activation codes stay in L1 and the block's weights in L2.
    /// `tile_fn(tile, tok, tb, buf)` (`tb <= TB_WIDE`) computes every output value by the same
    /// instructions in the same order as [`Self::run_row_blocks`]'s per-tile kernel (see
    /// [`Self::run_tile_act8_wide`]).
    fn run_tiles_2d<F>(&self, n_tokens: usize, y: &mut [f32], tile_fn: F)
    where
        F: Fn(usize, usize, usize, &mut [[f32; TILE_ROWS]; TB_WIDE]) + Sync,
    {
        /// Wraps the output pointer so that the tasks can share it.
        #[derive(Clone, Copy)]
        struct OutPtr(*mut f32);
        // SAFETY: the tasks write disjoint (token, row) ranges of `y` (see below) and `y`
        // outlives the parallel loop, which joins before this function returns.
        unsafe impl Send for OutPtr {}
        // SAFETY: as above.
        unsafe impl Sync for OutPtr {}
        impl OutPtr {
            // a method, so that closures capture the wrapper and not its raw-pointer field
            fn at(self, i: usize) -> *mut f32 {
                self.0.wrapping_add(i)
            }
        }
        debug_assert_eq!(y.len(), n_tokens * self.rows);
        let threads = rayon::current_num_threads().max(1);
        let ntb = n_tokens.div_ceil(TOKEN_BLOCK);
        let want_rb = (threads * 8).div_ceil(ntb).max(1);
        let tiles_per_rb = self.ntiles.div_ceil(want_rb).clamp(1, ROW_BLOCK_TILES);
        let nrb = self.ntiles.div_ceil(tiles_per_rb);
        let out = OutPtr(y.as_mut_ptr());
        let rows = self.rows;
        (0..nrb * ntb).into_par_iter().for_each(|task| {
            let (rb, kb) = (task / ntb, task % ntb);
            let tile0 = rb * tiles_per_rb;
            let tile1 = (tile0 + tiles_per_rb).min(self.ntiles);
            let tok1 = ((kb + 1) * TOKEN_BLOCK).min(n_tokens);
            let mut tok = kb * TOKEN_BLOCK;
            let mut buf = [[0f32; TILE_ROWS]; TB_WIDE];
            while tok < tok1 {
                let tb = (tok1 - tok).min(TB_WIDE);
                for tile in tile0..tile1 {
                    tile_fn(tile, tok, tb, &mut buf);
                    let r0 = tile * TILE_ROWS;
                    let take = TILE_ROWS.min(rows - r0);
                    for (t, b) in buf.iter().enumerate().take(tb) {
                        // SAFETY: tok + t < n_tokens and r0 + take <= rows, so the range lies
                        // inside y (n_tokens x rows); task (rb, kb) alone owns tokens
                        // kb*TOKEN_BLOCK.. x rows of tiles tile0..tile1, so no two tasks write
                        // the same element and nothing reads y meanwhile.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                b.as_ptr(),
                                out.at((tok + t) * rows + r0),
                                take,
                            )
                        };
                    }
                }
                tok += tb;
            }
        });
    }

    /// [`Self::run_tile_act8`] for up to [`TB_WIDE`] tokens: INT4 layers on the AVX2 path run
    /// 8 tokens in one [`crate::act8::avx2::tile_b4`] pass (bit-identical per token to the
    /// 4- and 1-token passes, see there), everything else in groups of [`TB`].
    fn run_tile_act8_wide(
        &self,
        isa: Isa,
        tile: usize,
        qa: &crate::act8::QuantAct,
        t0: usize,
        tb: usize,
        out: &mut [[f32; TILE_ROWS]; TB_WIDE],
    ) {
        #[cfg(target_arch = "x86_64")]
        if tb == TB_WIDE && isa != Isa::Scalar && self.is_int4_pairs4() {
            assert!(
                tile < self.ntiles
                    && qa.xperm.len() >= (t0 + tb) * self.pcols
                    && qa.sx.len() >= (t0 + tb) * qa.nblk
                    && isa.supported()
            );
            // SAFETY: isa is a supported SIMD path (AVX2+FMA at least, checked above); the
            // layer is INT4 with the 4-pair integer path, as tile_b4::<false, 4, _> needs;
            // tile and token bounds asserted; out holds TB_WIDE rows.
            unsafe {
                use crate::act8::avx2::tile_b4;
                match self.b4_nb() {
                    1 => tile_b4::<false, 4, 1, TB_WIDE>(self, tile, qa, t0, out),
                    2 => tile_b4::<false, 4, 2, TB_WIDE>(self, tile, qa, t0, out),
                    4 => tile_b4::<false, 4, 4, TB_WIDE>(self, tile, qa, t0, out),
                    _ => tile_b4::<false, 4, 0, TB_WIDE>(self, tile, qa, t0, out),
                }
            };
            return;
        }
        let mut buf = [[0f32; TILE_ROWS]; TB];
        let mut t = 0;
        while t < tb {
            let n = (tb - t).min(TB);
            self.run_tile_act8(isa, tile, qa, t0 + t, n, &mut buf);
            out[t..t + n].copy_from_slice(&buf[..n]);
            t += n;
        }
    }

    /// One row tile of the INT8-activation path.
    fn run_tile_act8(
        &self,
        isa: Isa,
        tile: usize,
        qa: &crate::act8::QuantAct,
        t0: usize,
        tb: usize,
        out: &mut [[f32; TILE_ROWS]; TB],
    ) {
        #[cfg(target_arch = "x86_64")]
        if isa != Isa::Scalar {
            let xlen = match self.store {
                Store::B4 => qa.xperm.len(),
                _ => qa.x16.len(),
            };
            assert!(
                tile < self.ntiles
                    && (1..=TB).contains(&tb)
                    && xlen >= (t0 + tb) * self.pcols
                    && qa.sx.len() >= (t0 + tb) * qa.nblk
                    && isa.supported()
            );
            use crate::act8::avx2::{tile_b4, tile_b4s, tile_b8, SC_E4M3, SC_E4M3N, SC_E8M0};
            macro_rules! by_tb {
                ($f:ident $(, $g:expr)*) => {
                    match tb {
                        1 => $f::<$({ $g },)* 1>(self, tile, qa, t0, out),
                        2 => $f::<$({ $g },)* 2>(self, tile, qa, t0, out),
                        3 => $f::<$({ $g },)* 3>(self, tile, qa, t0, out),
                        _ => $f::<$({ $g },)* 4>(self, tile, qa, t0, out),
                    }
                };
            }
            // SAFETY: isa was clamped to a supported SIMD path (AVX2+FMA+F16C at least, checked
            // above); the kernel matches the layer's store and integer path (set_act_mode
            // only accepts layers with one); tile and token bounds asserted.
            unsafe {
                let lut = self.vals != Vals::Int;
                match (self.store, self.a8.kind) {
                    _ if self.a8_half_off().is_some() => {
                        // the segments' chunk count decides the fixed-stride loop
                        let g = match self.segs.first().map_or(0, |s| s.chunks) {
                            1 => 1,
                            2 => 2,
                            _ => 0,
                        };
                        let sc = if self.scode == ScaleCode::E8M0 {
                            SC_E8M0
                        } else if self.e4m3_normal {
                            SC_E4M3N
                        } else {
                            SC_E4M3
                        };
                        match (lut, sc, g) {
                            (true, SC_E8M0, 1) => by_tb!(tile_b4s, true, SC_E8M0, 1),
                            (true, SC_E8M0, 2) => by_tb!(tile_b4s, true, SC_E8M0, 2),
                            (true, SC_E8M0, _) => by_tb!(tile_b4s, true, SC_E8M0, 0),
                            (true, SC_E4M3N, 1) => by_tb!(tile_b4s, true, SC_E4M3N, 1),
                            (true, SC_E4M3N, 2) => by_tb!(tile_b4s, true, SC_E4M3N, 2),
                            (true, SC_E4M3N, _) => by_tb!(tile_b4s, true, SC_E4M3N, 0),
                            (true, _, 1) => by_tb!(tile_b4s, true, SC_E4M3, 1),
                            (true, _, 2) => by_tb!(tile_b4s, true, SC_E4M3, 2),
                            (true, _, _) => by_tb!(tile_b4s, true, SC_E4M3, 0),
                            (false, SC_E8M0, _) => by_tb!(tile_b4s, false, SC_E8M0, 0),
                            (false, SC_E4M3N, _) => by_tb!(tile_b4s, false, SC_E4M3N, 0),
                            (false, _, _) => by_tb!(tile_b4s, false, SC_E4M3, 0),
                        }
                    }
                    (Store::B4, A8Kind::B4 { pairs: 1 }) => by_tb!(tile_b4, true, 1, 0),
                    (Store::B4, A8Kind::B4 { .. }) if self.vals == Vals::Int => {
                        match self.b4_nb() {
                            1 => by_tb!(tile_b4, false, 4, 1),
                            2 => by_tb!(tile_b4, false, 4, 2),
                            4 => by_tb!(tile_b4, false, 4, 4),
                            _ => by_tb!(tile_b4, false, 4, 0),
                        }
                    }
                    (Store::B4, A8Kind::B4 { .. }) => by_tb!(tile_b4, true, 4, 0),
                    (Store::B8, A8Kind::B8) => by_tb!(tile_b8),
                    _ => unreachable!("set_act_mode admits only layers with an integer path"),
                }
            }
            return;
        }
        let _ = isa;
        self.tile_act8_scalar(tile, qa, t0, tb, out)
    }

    /// Blocks per group of the fixed-stride loop of [`crate::act8::avx2::tile_b4`]: 1, 2 or
    /// 4 when the first segment has 2, 4 or 8 chunks (32/64/128-column groups), else 0.
    fn b4_nb(&self) -> usize {
        match self.segs.first().map_or(0, |s| s.chunks) {
            2 => 1,
            4 => 2,
            8 => 4,
            _ => 0,
        }
    }

    /// An INT4 layer with the 4-pair integer path and no code-scaled headers: what
    /// [`crate::act8::avx2::tile_b4`]`::<false, 4, ..>` and `tile_b4_pair` run.
    fn is_int4_pairs4(&self) -> bool {
        self.store == Store::B4
            && self.vals == Vals::Int
            && self.a8.kind == (A8Kind::B4 { pairs: 4 })
            && self.a8_half_off().is_none()
    }

    /// [`Self::b4_nb`] for the layers of [`Self::is_int4_pairs4`] (those
    /// [`crate::act8::avx2::tile_b4_pair`] runs), else 0.
    fn b4_pair_nb(&self) -> usize {
        if self.is_int4_pairs4() {
            self.b4_nb()
        } else {
            0
        }
    }

    /// Activations in packed column order (zero in padding), `n_tokens x pcols`.
    fn gather<'a>(&self, x: &'a [f32], n_tokens: usize) -> Cow<'a, [f32]> {
        match &self.col_map {
            None => Cow::Borrowed(x),
            Some(map) => {
                let mut xp = vec![0f32; n_tokens * self.pcols];
                for t in 0..n_tokens {
                    let src = &x[t * self.cols..(t + 1) * self.cols];
                    for (d, &c) in xp[t * self.pcols..(t + 1) * self.pcols].iter_mut().zip(map) {
                        if c != u32::MAX {
                            *d = src[c as usize];
                        }
                    }
                }
                Cow::Owned(xp)
            }
        }
    }

    /// One row tile for tokens `t0..t0+tb` (tb <= TB) into `out[t][row]`.
    #[allow(clippy::too_many_arguments)]
    fn run_tile(
        &self,
        isa: Isa,
        tile: usize,
        xp: &[f32],
        xs: &[f32],
        t0: usize,
        tb: usize,
        out: &mut [[f32; TILE_ROWS]; TB],
    ) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512 => crate::x86::run_tile(isa, self, tile, xp, xs, t0, tb, out),
            _ => self.tile_scalar(tile, xp, xs, t0, tb, out),
        }
    }

    /// Scale and bias of row `rr` of the segment whose header starts at byte `h` of `data`.
    #[inline]
    pub(crate) fn sb(&self, h: usize, rr: usize) -> (f32, f32) {
        match self.hmode {
            HdrMode::ScaleBias => (
                rd_f32(&self.data, h + 4 * rr),
                rd_f32(&self.data, h + 16 + 4 * rr),
            ),
            HdrMode::Scale => {
                let s = rd_f32(&self.data, h + 4 * rr);
                (s, s * self.bmul)
            }
            HdrMode::Coded => {
                let s = self.stab[self.data[h + rr] as usize]; // u8 index: in bounds
                (s, s * self.bmul)
            }
        }
    }

    /// Scales of the 4 rows of the segment whose header starts at byte `h`.
    #[inline]
    pub(crate) fn scales4(&self, h: usize) -> [f32; TILE_ROWS] {
        match self.hmode {
            HdrMode::Coded => {
                let c: [u8; 4] = self.data[h..h + 4].try_into().expect("4 bytes");
                [
                    self.stab[c[0] as usize],
                    self.stab[c[1] as usize],
                    self.stab[c[2] as usize],
                    self.stab[c[3] as usize],
                ]
            }
            _ => std::array::from_fn(|r| rd_f32(&self.data, h + 4 * r)),
        }
    }

    /// Whether weights carry a bias term (integers: zero points), i.e. `b != 0` is possible.
    #[inline]
    pub(crate) fn has_bias(&self) -> bool {
        self.hmode == HdrMode::ScaleBias || self.bmul != 0.0
    }

    /// The scalar reference kernel.
    #[allow(clippy::needless_range_loop)]
    pub(crate) fn tile_scalar(
        &self,
        tile: usize,
        xp: &[f32],
        xs: &[f32],
        t0: usize,
        tb: usize,
        out: &mut [[f32; TILE_ROWS]; TB],
    ) {
        let cb = self.store.chunk_bytes();
        let base = tile * self.tile_bytes;
        let nseg = self.segs.len();
        for o in out.iter_mut().take(tb) {
            *o = [0.0; TILE_ROWS];
        }
        for (k, seg) in self.segs.iter().enumerate() {
            let h = base + seg.byte_off;
            for t in 0..tb {
                let tok = t0 + t;
                let xr = &xp[tok * self.pcols + seg.col0..];
                for rr in 0..TILE_ROWS {
                    let (s, b) = self.sb(h, rr);
                    let mut acc = 0f32;
                    for j in 0..seg.chunks {
                        let off = h + self.hdr + (j * TILE_ROWS + rr) * cb;
                        let c = decode_chunk(self.store, &self.data[off..off + cb]);
                        for e in 0..CHUNK {
                            acc += self.vtab[c[e] as usize] * xr[j * CHUNK + e];
                        }
                    }
                    out[t][rr] += s * acc + b * xs[tok * nseg + k];
                }
            }
        }
    }

    /// Dequantize rows `tile*4 .. tile*4+4` into `w[4][pcols]` (padded column order).
    pub(crate) fn dequant_tile_scalar(&self, tile: usize, w: &mut [f32]) {
        let cb = self.store.chunk_bytes();
        let base = tile * self.tile_bytes;
        for seg in &self.segs {
            let h = base + seg.byte_off;
            for rr in 0..TILE_ROWS {
                let (s, b) = self.sb(h, rr);
                let wr = &mut w[rr * self.pcols + seg.col0..];
                for j in 0..seg.chunks {
                    let off = h + self.hdr + (j * TILE_ROWS + rr) * cb;
                    let c = decode_chunk(self.store, &self.data[off..off + cb]);
                    for e in 0..CHUNK {
                        wr[j * CHUNK + e] = s * self.vtab[c[e] as usize] + b;
                    }
                }
            }
        }
    }

    /// Large batches: per row block, dequantize a tile of rows to f32 and run the dense GEMM
    /// micro-kernel on it (only `GEMM_ROWS x pcols` weights are ever dequantized per task).
    fn forward_gemm(&self, isa: Isa, xp: &[f32], n_tokens: usize, y: &mut [f32]) -> Result<()> {
        const TILES: usize = 8; // 32 rows per block
        let nblocks = self.ntiles.div_ceil(TILES);
        let results: Vec<Result<(usize, Vec<f32>)>> = (0..nblocks)
            .into_par_iter()
            .map(|bi| {
                let t0 = bi * TILES;
                let t1 = (t0 + TILES).min(self.ntiles);
                let nrows = (t1 - t0) * TILE_ROWS;
                let mut w = vec![0f32; nrows * self.pcols];
                for tile in t0..t1 {
                    let dst =
                        &mut w[(tile - t0) * TILE_ROWS * self.pcols..][..TILE_ROWS * self.pcols];
                    match isa {
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx2 | Isa::Avx512 => crate::x86::dequant_tile(isa, self, tile, dst),
                        _ => self.dequant_tile_scalar(tile, dst),
                    }
                }
                let mut out = vec![0f32; n_tokens * nrows];
                crate::dense::matmul_wt_serial(xp, &w, &mut out, n_tokens, self.pcols, nrows)?;
                Ok((t0, out))
            })
            .collect();
        for r in results {
            let (t0, out) = r?;
            let r0 = t0 * TILE_ROWS;
            let nrows = out.len() / n_tokens;
            let take = nrows.min(self.rows - r0);
            for t in 0..n_tokens {
                y[t * self.rows + r0..t * self.rows + r0 + take]
                    .copy_from_slice(&out[t * nrows..t * nrows + take]);
            }
        }
        Ok(())
    }
}
