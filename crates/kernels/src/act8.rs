//! Integer-dot path of [`PackedLinear`]: activations quantized to INT8 per block of
//! [`ACT_BLOCK`] columns, 4-bit integer weights multiplied with `vpmaddubsw` (W4A8, as
//! llama.cpp's `Q4_x x Q8_x` dot products do).
//!
//! Enabled per layer with [`PackedLinear::set_act_mode`]`(`[`ActMode::Int8Block`]`)`; it changes
//! the numerics (the activations are rounded to 8 bits), so it is never chosen silently.
//!
//! # Math
//! Activation blocks are runs of [`ACT_BLOCK`] = 32 consecutive columns of one scale group (in
//! the packed column order, i.e. the group's columns in increasing order; the last block of a
//! group may be shorter, e.g. 16 columns for a group of 112 padded columns). Per token and block
//! `b`: `sx_b = max|x| / 127`, `q_j = clamp(round_ties_even(x_j / sx_b), -127, 127)` (a zero
//! block gets `sx_b = 0`, a block with a non-finite value `sx_b = NaN`, so NaN/Inf still
//! reach the output). Then `|x_j - sx_b q_j| <= sx_b / 2`.
//!
//! With weights `w = s * code + b` (`b = -s * zero_point`), output row `r` is
//! `y = sum_groups [ s * sum_b sx_b * I_b  +  b * X_g ]` where `I_b = sum_{j in b} code_j q_j` is
//! an exact integer (`|I_b| <= 32 * 15 * 127`) and `X_g = sum_b sx_b * sum_{j in b} q_j` is
//! computed once per token and group. The scalar reference ([`PackedLinear`]'s
//! `tile_act8_scalar`) and the AVX2 kernel compute the same integers exactly and differ only in
//! the order of the f32 additions.
//!
//! # AVX2 kernel
//! A 4-bit chunk of the packed layout is 4 rows x 8 bytes = one 256-bit load. `and 0x0F` gives
//! the low nibbles (columns `0,4,8,12,1,5,9,13` of each row, see the nibble order in
//! `packed.rs`), `srli 4` + `and` the high nibbles (`2,6,10,14,3,7,11,15`); the activation codes
//! are stored per chunk in that same order, so one 64-bit broadcast serves all 4 rows.
//! `vpmaddubsw(code u8, q i8)` gives i16 pair sums (`<= 2 * 15 * 127`); the 4 products of a
//! 32-column block are added in i16 (`<= 15240`, no saturation), `vpmaddwd` with ones widens to
//! i32 (2 lanes per row), `vcvtdq2ps` and one FMA with `sx_b` per block and token; at the end of
//! a group one FMA with the 4 row scales. Up to 4 tokens share each unpacked weight register.

use lowbit_numerics::QuantizedTensor;

use crate::packed::{decode_chunk, PackedLinear, Store, Vals, CHUNK, TB, TILE_ROWS};

/// Columns per activation quantization block.
pub const ACT_BLOCK: usize = 32;
const CHUNKS_PER_BLOCK: usize = ACT_BLOCK / CHUNK;
const _: () = assert!(ACT_BLOCK.is_multiple_of(CHUNK) && CHUNKS_PER_BLOCK == 2);

/// How [`PackedLinear`] treats the activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActMode {
    /// f32 activations, fused weight dequantization (exact up to f32 rounding; the default).
    #[default]
    F32,
    /// Activations quantized to INT8 per block of [`ACT_BLOCK`] columns (dynamic, per token),
    /// integer dot products with the weight codes. INT4 weights only (sym or asym, any group).
    Int8Block,
}

/// Position within a 16-column chunk of the activation code for packed byte slot `i`: slots
/// 0..8 pair with the low nibbles of a row's 8 code bytes, slots 8..16 with the high nibbles.
pub(crate) const NIBBLE_ORDER: [usize; CHUNK] =
    [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15];

/// Activations quantized for one call.
pub(crate) struct QuantAct {
    /// Codes `[t][pcols]` in packed column order (natural order inside each chunk).
    pub(crate) xq: Vec<i8>,
    /// The same codes with every chunk in [`NIBBLE_ORDER`] (SIMD paths; empty for scalar).
    pub(crate) xperm: Vec<i8>,
    /// Block scales `[t][nblk]`.
    pub(crate) sx: Vec<f32>,
    /// Per token and segment, `sum_b sx_b * sum_{j in b} q_j`.
    pub(crate) xsum: Vec<f32>,
    /// Blocks per token.
    pub(crate) nblk: usize,
    /// First block of each segment.
    pub(crate) blk0: Vec<usize>,
}

/// Whether a quantized tensor's packed form can run with [`ActMode::Int8Block`].
pub fn supports_int8_act(q: &QuantizedTensor) -> bool {
    matches!(q.scheme.elem, lowbit_numerics::ElemFormat::Int { bits: 4 })
}

/// Quantize one block of activations into `q`; returns `(scale, sum of codes)`.
fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if !x.iter().all(|v| v.is_finite()) {
        q.fill(0);
        return (f32::NAN, 0);
    }
    if amax == 0.0 {
        q.fill(0);
        return (0.0, 0);
    }
    let scale = amax / 127.0;
    // round-half-even of |v / scale| <= 127.0001 by the 1.5 * 2^23 trick (exactly
    // `round_ties_even` in the default rounding mode; no libm call, vectorizes)
    const MAGIC: f32 = 12_582_912.0;
    let mut sum = 0i32;
    for (d, &v) in q.iter_mut().zip(x) {
        let c = (((v / scale) + MAGIC) - MAGIC).clamp(-127.0, 127.0) as i8;
        sum += c as i32;
        *d = c;
    }
    (scale, sum)
}

impl PackedLinear {
    /// Whether [`ActMode::Int8Block`] is available for this layer (INT4 codes).
    pub fn supports_int8_act(&self) -> bool {
        self.store == Store::B4 && self.vals == Vals::Int
    }

    /// Quantize `xp` (`n_tokens x pcols`, packed column order) per block.
    pub(crate) fn quantize_act(&self, xp: &[f32], n_tokens: usize, perm: bool) -> QuantAct {
        let pc = self.pcols;
        let nseg = self.segs.len();
        let mut blk0 = Vec::with_capacity(nseg);
        let mut nblk = 0;
        for s in &self.segs {
            blk0.push(nblk);
            nblk += s.chunks.div_ceil(CHUNKS_PER_BLOCK);
        }
        let mut xq = vec![0i8; n_tokens * pc];
        let mut sx = vec![0f32; n_tokens * nblk];
        let mut xsum = vec![0f32; n_tokens * nseg];
        for t in 0..n_tokens {
            for (k, seg) in self.segs.iter().enumerate() {
                let end = seg.col0 + seg.chunks * CHUNK;
                let mut acc = 0f32;
                for bi in 0..seg.chunks.div_ceil(CHUNKS_PER_BLOCK) {
                    let c0 = seg.col0 + bi * ACT_BLOCK;
                    let c1 = (c0 + ACT_BLOCK).min(end);
                    let (s, isum) = quantize_block(
                        &xp[t * pc + c0..t * pc + c1],
                        &mut xq[t * pc + c0..t * pc + c1],
                    );
                    sx[t * nblk + blk0[k] + bi] = s;
                    acc += s * isum as f32;
                }
                xsum[t * nseg + k] = acc;
            }
        }
        let xperm = if perm {
            let mut p = vec![0i8; xq.len()];
            for (d, s) in p.chunks_exact_mut(CHUNK).zip(xq.chunks_exact(CHUNK)) {
                for (i, &o) in NIBBLE_ORDER.iter().enumerate() {
                    d[i] = s[o];
                }
            }
            p
        } else {
            Vec::new()
        };
        QuantAct {
            xq,
            xperm,
            sx,
            xsum,
            nblk,
            blk0,
        }
    }

    #[allow(clippy::needless_range_loop)]
    /// The scalar reference of the integer-dot path: exact `i32` block dot products of the
    /// codes with the activation codes, then the same f32 steps as the SIMD kernel.
    pub(crate) fn tile_act8_scalar(
        &self,
        tile: usize,
        qa: &QuantAct,
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
                let xr = &qa.xq[tok * self.pcols + seg.col0..];
                for (rr, o) in out[t].iter_mut().enumerate() {
                    let (s, b) = self.sb(h, rr);
                    let mut g = 0f32;
                    for bi in 0..seg.chunks.div_ceil(CHUNKS_PER_BLOCK) {
                        let mut idot = 0i32;
                        let j1 = ((bi + 1) * CHUNKS_PER_BLOCK).min(seg.chunks);
                        for j in bi * CHUNKS_PER_BLOCK..j1 {
                            let off = h + self.hdr + (j * TILE_ROWS + rr) * cb;
                            let c = decode_chunk(self.store, &self.data[off..off + cb]);
                            for (e, &code) in c.iter().enumerate() {
                                idot += code as i32 * xr[j * CHUNK + e] as i32;
                            }
                        }
                        g += idot as f32 * qa.sx[tok * qa.nblk + qa.blk0[k] + bi];
                    }
                    *o += s * g + b * qa.xsum[tok * nseg + k];
                }
            }
        }
    }
}

/// AVX2 kernel (see the module docs).
#[cfg(target_arch = "x86_64")]
// Index loops over register arrays are deliberate (they unroll into named registers).
#[allow(clippy::needless_range_loop)]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::QuantAct;
    use crate::packed::{HdrMode, PackedLinear, CHUNK, TB, TILE_ROWS};

    /// `[v0, v0, v1, v1, v2, v2, v3, v3]`: a per-row value on both lanes of its row.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn dup_rows(v: __m128) -> __m256 {
        _mm256_permutevar8x32_ps(
            _mm256_castps128_ps256(v),
            _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
        )
    }

    /// i16 sum of the 4-row products of one 4-bit chunk (`w` = 32 code bytes) with the
    /// activation codes at `x` (16 bytes in nibble order).
    ///
    /// # Safety
    /// AVX2 available; 16 readable bytes at `x`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn chunk_dot(lo: __m256i, hi: __m256i, x: *const i8) -> __m256i {
        // SAFETY: 16 readable bytes at x (caller).
        let (a, b) = unsafe {
            (
                (x as *const i64).read_unaligned(),
                (x.add(8) as *const i64).read_unaligned(),
            )
        };
        _mm256_add_epi16(
            _mm256_maddubs_epi16(lo, _mm256_set1_epi64x(a)),
            _mm256_maddubs_epi16(hi, _mm256_set1_epi64x(b)),
        )
    }

    /// # Safety
    /// AVX2 + FMA available; `pk` is 4-bit (`Store::B4`); `tile < pk.ntiles`;
    /// `qa` was built by `pk.quantize_act(.., n, true)` with `t0 + NT <= n`.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn tile_b4<const NT: usize>(
        pk: &PackedLinear,
        tile: usize,
        qa: &QuantAct,
        t0: usize,
        out: &mut [[f32; TILE_ROWS]; TB],
    ) {
        let pcols = pk.pcols;
        let nseg = pk.segs.len();
        let with_bias = pk.has_bias();
        debug_assert!(
            tile < pk.ntiles
                && qa.xperm.len() >= (t0 + NT) * pcols
                && qa.sx.len() >= (t0 + NT) * qa.nblk
        );
        let m4 = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        // SAFETY: tile < ntiles, so the tile's tile_bytes bytes lie inside pk.data.
        let base = unsafe { pk.data.as_ptr().add(tile * pk.tile_bytes) };
        let mut acc = [_mm256_setzero_ps(); NT];
        for (k, seg) in pk.segs.iter().enumerate() {
            let hoff = tile * pk.tile_bytes + seg.byte_off;
            // SAFETY: the segment's chunks follow its header inside the tile.
            let w = unsafe { base.add(seg.byte_off + pk.hdr) };
            let mut g = [_mm256_setzero_ps(); NT];
            let full = seg.chunks / 2;
            let b0 = qa.blk0[k];
            for bi in 0..full {
                // SAFETY: chunks 2bi and 2bi+1 (32 bytes each: 4 rows x 8) are in the segment.
                let (w0, w1) = unsafe {
                    (
                        _mm256_loadu_si256(w.add(bi * 64) as *const __m256i),
                        _mm256_loadu_si256(w.add(bi * 64 + 32) as *const __m256i),
                    )
                };
                let lo0 = _mm256_and_si256(w0, m4);
                let hi0 = _mm256_and_si256(_mm256_srli_epi16(w0, 4), m4);
                let lo1 = _mm256_and_si256(w1, m4);
                let hi1 = _mm256_and_si256(_mm256_srli_epi16(w1, 4), m4);
                for t in 0..NT {
                    let o = (t0 + t) * pcols + seg.col0 + bi * 2 * CHUNK;
                    // SAFETY: o + 32 <= (t0 + NT) * pcols <= xperm.len(); the block index is
                    // below nblk, so the scale index is inside sx.
                    let (p, s) = unsafe {
                        let x = qa.xperm.as_ptr().add(o);
                        (
                            _mm256_add_epi16(
                                chunk_dot(lo0, hi0, x),
                                chunk_dot(lo1, hi1, x.add(CHUNK)),
                            ),
                            *qa.sx.get_unchecked((t0 + t) * qa.nblk + b0 + bi),
                        )
                    };
                    let i = _mm256_madd_epi16(p, ones);
                    g[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(s), g[t]);
                }
            }
            if seg.chunks % 2 == 1 {
                let bi = full;
                // SAFETY: the last chunk (index 2*full) is in the segment.
                let w0 = unsafe { _mm256_loadu_si256(w.add(bi * 64) as *const __m256i) };
                let lo0 = _mm256_and_si256(w0, m4);
                let hi0 = _mm256_and_si256(_mm256_srli_epi16(w0, 4), m4);
                for t in 0..NT {
                    let o = (t0 + t) * pcols + seg.col0 + bi * 2 * CHUNK;
                    // SAFETY: o + 16 <= xperm.len(); block index below nblk.
                    let (p, s) = unsafe {
                        (
                            chunk_dot(lo0, hi0, qa.xperm.as_ptr().add(o)),
                            *qa.sx.get_unchecked((t0 + t) * qa.nblk + b0 + bi),
                        )
                    };
                    let i = _mm256_madd_epi16(p, ones);
                    g[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(s), g[t]);
                }
            }
            // Fold the group: acc += s * g + b * X. Each row owns 2 lanes, so the bias term
            // is added as b/2 (exact) to both of them.
            let xs = |t: usize| _mm256_set1_ps(qa.xsum[(t0 + t) * nseg + k]);
            match pk.hmode {
                HdrMode::ScaleBias => {
                    // SAFETY: the header holds 4 f32 scales then 4 f32 biases.
                    let (sv, bv) = unsafe {
                        let p = pk.data.as_ptr().add(hoff) as *const f32;
                        (dup_rows(_mm_loadu_ps(p)), dup_rows(_mm_loadu_ps(p.add(4))))
                    };
                    let bv = _mm256_mul_ps(bv, _mm256_set1_ps(0.5));
                    for t in 0..NT {
                        acc[t] = _mm256_fmadd_ps(g[t], sv, acc[t]);
                        acc[t] = _mm256_fmadd_ps(bv, xs(t), acc[t]);
                    }
                }
                _ => {
                    let sv = match pk.hmode {
                        // SAFETY: the header holds 4 f32 scales.
                        HdrMode::Scale => unsafe {
                            dup_rows(_mm_loadu_ps(pk.data.as_ptr().add(hoff) as *const f32))
                        },
                        _ => {
                            let sc = pk.scales4(hoff);
                            _mm256_setr_ps(sc[0], sc[0], sc[1], sc[1], sc[2], sc[2], sc[3], sc[3])
                        }
                    };
                    if with_bias {
                        // b = s * bmul: acc += s * (g + bmul * X)
                        let hb = _mm256_set1_ps(0.5 * pk.bmul);
                        for t in 0..NT {
                            acc[t] = _mm256_fmadd_ps(_mm256_fmadd_ps(hb, xs(t), g[t]), sv, acc[t]);
                        }
                    } else {
                        for t in 0..NT {
                            acc[t] = _mm256_fmadd_ps(g[t], sv, acc[t]);
                        }
                    }
                }
            }
        }
        for t in 0..NT {
            let mut a = [0f32; 8];
            // SAFETY: a has 8 f32.
            unsafe { _mm256_storeu_ps(a.as_mut_ptr(), acc[t]) };
            for r in 0..TILE_ROWS {
                out[t][r] = a[2 * r] + a[2 * r + 1];
            }
        }
    }
}
