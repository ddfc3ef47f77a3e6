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

use lowbit_numerics::{ElemFormat, FloatFormat, QuantizedTensor};

use crate::codes;
use crate::packed::{decode_chunk, HdrMode, PackedLinear, Store, Vals, CHUNK, TB, TILE_ROWS};

/// Columns per activation quantization block.
pub const ACT_BLOCK: usize = 32;
const CHUNKS_PER_BLOCK: usize = ACT_BLOCK / CHUNK;
const _: () = assert!(ACT_BLOCK.is_multiple_of(CHUNK) && CHUNKS_PER_BLOCK == 2);

/// NF4 on the integer path: every NF4 value is rounded to the nearest multiple of
/// `1 / NF4_ACT8_SCALE` (`(NF4[c] * 64).round() / 64`, an approximation of at most 1/128 of the
/// group's absmax per weight; the other formats are exact in the weights).
pub const NF4_ACT8_SCALE: f32 = 64.0;

/// How [`PackedLinear`] treats the activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActMode {
    /// f32 activations, fused weight dequantization (exact up to f32 rounding; the default).
    #[default]
    F32,
    /// Activations quantized to INT8 per block of [`ACT_BLOCK`] columns (dynamic, per token),
    /// integer dot products with the weight codes. INT4 (sym or asym, any group), INT5..INT8,
    /// FP4 E2M1 (MXFP4, NVFP4) and NF4 (table rounded, see [`NF4_ACT8_SCALE`]) weights.
    Int8Block,
}

/// Integer form of the weight codes on the INT8-activation path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum A8Kind {
    /// No integer path for this layer.
    None,
    /// 4-bit codes, each through the 16-entry `u8` table `lut` (the identity for INT4).
    /// `PAIRS` `vpmaddubsw` products are summed in i16 before widening: `lut <= 32` allows 4
    /// (INT4, E2M1), `<= 128` only 1 (NF4).
    B4 { pairs: u8 },
    /// 5..8-bit integer codes, widened to i16 (`vpmovzxbw` + `vpmaddwd`).
    B8,
}

/// The integer weights of the INT8-activation path: `w = s * mul * (lut[code] + off)`, plus `b`
/// for scale-and-bias headers (asymmetric integers, where `mul = 1`, `off = 0`). In the group
/// fold the `off` and symmetric zero-point terms combine into `c = bmul / mul + off`, the
/// coefficient of `X_g = sum_b sx_b sum q`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct A8 {
    pub(crate) kind: A8Kind,
    pub(crate) lut: [u8; 16],
    pub(crate) mul: f32,
    pub(crate) c: f32,
}

impl A8 {
    pub(crate) fn new(store: Store, vals: Vals, bmul: f32) -> A8 {
        let mut lut: [u8; 16] = std::array::from_fn(|i| i as u8);
        let (kind, mul, c) = match (store, vals) {
            (Store::B4, Vals::Int) => (A8Kind::B4 { pairs: 4 }, 1.0, bmul),
            (Store::B4, Vals::E2M1) => {
                // 2 * E2M1 is an integer in [-12, 12]: lut = 2v + 12 in [0, 24], exact
                for (l, v) in lut.iter_mut().zip(codes::E2M1) {
                    *l = (2.0 * v + 12.0) as u8;
                }
                (A8Kind::B4 { pairs: 4 }, 0.5, -12.0)
            }
            (Store::B4, Vals::Nf4) => {
                for (l, v) in lut.iter_mut().zip(codes::NF4) {
                    *l = ((v * NF4_ACT8_SCALE).round() + NF4_ACT8_SCALE) as u8;
                }
                (
                    A8Kind::B4 { pairs: 1 },
                    1.0 / NF4_ACT8_SCALE,
                    -NF4_ACT8_SCALE,
                )
            }
            (Store::B8, Vals::Int) => (A8Kind::B8, 1.0, bmul),
            _ => (A8Kind::None, 1.0, 0.0),
        };
        A8 { kind, lut, mul, c }
    }
}

/// Position within a 16-column chunk of the activation code for packed byte slot `i`: slots
/// 0..8 pair with the low nibbles of a row's 8 code bytes, slots 8..16 with the high nibbles.
pub(crate) const NIBBLE_ORDER: [usize; CHUNK] =
    [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15];

/// Activations quantized for one call.
pub(crate) struct QuantAct {
    /// Codes `[t][pcols]` in packed column order (natural order inside each chunk).
    pub(crate) xq: Vec<i8>,
    /// The same codes with every chunk in [`NIBBLE_ORDER`] (SIMD paths, 4-bit layers).
    pub(crate) xperm: Vec<i8>,
    /// The same codes as i16 (SIMD paths, 8-bit layers).
    pub(crate) x16: Vec<i16>,
    /// Block scales `[t][nblk]`.
    pub(crate) sx: Vec<f32>,
    /// `[t][nblk]`: the block's sum of codes times [`PackedLinear::a8_half_off`] (0 when the
    /// layer has none), the per-lane offset term of the code-scaled 4-bit kernel.
    pub(crate) qoff: Vec<i32>,
    /// Per token and segment, `sum_b sx_b * sum_{j in b} q_j`.
    pub(crate) xsum: Vec<f32>,
    /// Blocks per token.
    pub(crate) nblk: usize,
    /// First block of each segment.
    pub(crate) blk0: Vec<usize>,
}

/// Whether a quantized tensor's packed form can run with [`ActMode::Int8Block`].
pub fn supports_int8_act(q: &QuantizedTensor) -> bool {
    matches!(
        q.scheme.elem,
        ElemFormat::Int { bits: 4..=8 } | ElemFormat::Nf4 | ElemFormat::Float(FloatFormat::E2M1)
    )
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

/// From this many tokens on, [`PackedLinear::quantize_act`] splits the tokens over the pool.
const PAR_QUANT_TOKENS: usize = 16;

/// `buf` as `n` rows of `len` values (`len == 0`: `n` empty rows).
fn split_rows(buf: &mut [i8], len: usize, n: usize) -> Vec<&mut [i8]> {
    if len == 0 {
        (0..n).map(|_| <&mut [i8]>::default()).collect()
    } else {
        buf.chunks_exact_mut(len).collect()
    }
}

impl PackedLinear {
    /// Whether [`ActMode::Int8Block`] is available for this layer: INT4..INT8 codes (sym or
    /// asym), FP4 E2M1 (MXFP4, NVFP4) or NF4.
    pub fn supports_int8_act(&self) -> bool {
        self.a8.kind != A8Kind::None
    }

    /// The code-scaled 4-bit kernel ([`avx2::tile_b4s`]) applies: a 4-bit layer with an integer
    /// path summing 4 products in i16, `Coded` headers holding E8M0/E4M3 scale codes, and an
    /// offset `c` (see [`A8`]) that is an even integer; returns `c / 2` (each of a row's two
    /// lanes carries half of the offset term `c * sum q`).
    pub(crate) fn a8_half_off(&self) -> Option<i32> {
        let h = 0.5 * self.a8.c;
        (self.store == Store::B4
            && self.a8.kind == (A8Kind::B4 { pairs: 4 })
            && self.hmode == HdrMode::Coded
            && self.scode != crate::packed::ScaleCode::Table
            && h == h.round()
            && h.abs() <= 64.0)
            .then_some(h as i32)
    }

    /// Quantize `xp` (`n_tokens x pcols`, packed column order) per block; `simd` also builds
    /// the SIMD kernels' copy of the codes (nibble order for 4-bit layers, i16 for 8-bit) and
    /// quantizes whole 32-column blocks with AVX2 (bit-identical to [`quantize_block`]). The
    /// tokens are split over the rayon pool from [`PAR_QUANT_TOKENS`] tokens on.
    pub(crate) fn quantize_act(&self, xp: &[f32], n_tokens: usize, simd: bool) -> QuantAct {
        let pc = self.pcols;
        let nseg = self.segs.len();
        let mut blk0 = Vec::with_capacity(nseg);
        let mut nblk = 0;
        for s in &self.segs {
            blk0.push(nblk);
            nblk += s.chunks.div_ceil(CHUNKS_PER_BLOCK);
        }
        #[cfg(target_arch = "x86_64")]
        let simd = simd && crate::isa::Isa::Avx2.supported();
        let b4 = simd && self.store == Store::B4;
        let b8 = simd && self.store == Store::B8;
        // The scalar reference reads `xq`; the 4-bit SIMD kernel only `xperm`, the 8-bit one
        // only `x16`.
        let keep_xq = !simd || b8;
        let mut xq = vec![0i8; if keep_xq { n_tokens * pc } else { 0 }];
        let mut xperm = vec![0i8; if b4 { n_tokens * pc } else { 0 }];
        let mut sx = vec![0f32; n_tokens * nblk];
        let mut qoff = vec![0i32; n_tokens * nblk];
        let half_off = self.a8_half_off().unwrap_or(0);
        let mut xsum = vec![0f32; n_tokens * nseg];
        let one = |t: usize,
                   xq: &mut [i8],
                   xperm: &mut [i8],
                   sx: &mut [f32],
                   qoff: &mut [i32],
                   xsum: &mut [f32]| {
            let xr = &xp[t * pc..(t + 1) * pc];
            let mut tmp = [0i8; ACT_BLOCK];
            for (k, seg) in self.segs.iter().enumerate() {
                let end = seg.col0 + seg.chunks * CHUNK;
                let mut acc = 0f32;
                for bi in 0..seg.chunks.div_ceil(CHUNKS_PER_BLOCK) {
                    let c0 = seg.col0 + bi * ACT_BLOCK;
                    let c1 = (c0 + ACT_BLOCK).min(end);
                    let x = &xr[c0..c1];
                    let (s, isum) = match () {
                        #[cfg(target_arch = "x86_64")]
                        () if simd && c1 - c0 == ACT_BLOCK => {
                            let x: &[f32; ACT_BLOCK] = x.try_into().expect("32 columns");
                            // SAFETY: AVX2 is available (checked above).
                            let (s, isum, nat, perm) = unsafe { avx2::quantize_block32(x) };
                            if keep_xq {
                                xq[c0..c1].copy_from_slice(&nat);
                            }
                            if b4 {
                                xperm[c0..c1].copy_from_slice(&perm);
                            }
                            (s, isum)
                        }
                        _ => {
                            let q = &mut tmp[..c1 - c0];
                            let r = quantize_block(x, q);
                            if keep_xq {
                                xq[c0..c1].copy_from_slice(q);
                            }
                            if b4 {
                                for (d, s) in xperm[c0..c1]
                                    .chunks_exact_mut(CHUNK)
                                    .zip(q.chunks_exact(CHUNK))
                                {
                                    for (i, &o) in NIBBLE_ORDER.iter().enumerate() {
                                        d[i] = s[o];
                                    }
                                }
                            }
                            r
                        }
                    };
                    sx[blk0[k] + bi] = s;
                    qoff[blk0[k] + bi] = isum * half_off;
                    acc += s * isum as f32;
                }
                xsum[k] = acc;
            }
        };
        let xq_len = if keep_xq { pc } else { 0 };
        let xp_len = if b4 { pc } else { 0 };
        if n_tokens >= PAR_QUANT_TOKENS && rayon::current_num_threads() > 1 {
            use rayon::prelude::*;
            // per-token rows; an empty buffer gives empty rows (`chunks` of len 0 needs a
            // non-zero size, so those are built as empty slices)
            let xq_rows: Vec<&mut [i8]> = split_rows(&mut xq, xq_len, n_tokens);
            let xp_rows: Vec<&mut [i8]> = split_rows(&mut xperm, xp_len, n_tokens);
            xq_rows
                .into_par_iter()
                .zip(xp_rows)
                .zip(sx.par_chunks_mut(nblk.max(1)))
                .zip(qoff.par_chunks_mut(nblk.max(1)))
                .zip(xsum.par_chunks_mut(nseg.max(1)))
                .enumerate()
                .with_min_len(8)
                .for_each(|(t, ((((a, b), s), qs), x))| one(t, a, b, s, qs, x));
        } else {
            let mut xq_rows = split_rows(&mut xq, xq_len, n_tokens);
            let mut xp_rows = split_rows(&mut xperm, xp_len, n_tokens);
            for t in 0..n_tokens {
                one(
                    t,
                    xq_rows[t],
                    xp_rows[t],
                    &mut sx[t * nblk..(t + 1) * nblk],
                    &mut qoff[t * nblk..(t + 1) * nblk],
                    &mut xsum[t * nseg..(t + 1) * nseg],
                );
            }
        }
        let x16 = if b8 {
            xq.iter().map(|&v| v as i16).collect()
        } else {
            Vec::new()
        };
        QuantAct {
            xq,
            xperm,
            x16,
            sx,
            qoff,
            xsum,
            nblk,
            blk0,
        }
    }

    #[allow(clippy::needless_range_loop)]
    /// The scalar reference of the integer-dot path: exact `i32` block dot products of the
    /// integer weights with the activation codes, then the same f32 steps as the SIMD kernels.
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
        let a8 = self.a8;
        let b8 = self.store == Store::B8;
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
                                let v = if b8 {
                                    code
                                } else {
                                    a8.lut[(code & 15) as usize]
                                };
                                idot += v as i32 * xr[j * CHUNK + e] as i32;
                            }
                        }
                        g += idot as f32 * qa.sx[tok * qa.nblk + qa.blk0[k] + bi];
                    }
                    let x = qa.xsum[tok * nseg + k];
                    *o += if self.hmode == HdrMode::ScaleBias {
                        s * g + b * x
                    } else {
                        (s * a8.mul) * (g + a8.c * x)
                    };
                }
            }
        }
    }
}

/// AVX2 kernels (see the module docs).
#[cfg(target_arch = "x86_64")]
// Index loops over register arrays are deliberate (they unroll into named registers).
#[allow(clippy::needless_range_loop)]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::QuantAct;
    use crate::packed::{HdrMode, PackedLinear, CHUNK, TB, TILE_ROWS};

    /// Software prefetch distance in bytes of the weight stream. 4 KiB (session 7; was 1 KiB):
    /// with the weights in L3 at two threads, 1 KiB ahead left the loads waiting (GEMV
    /// 4096 x 11008 INT4 / NVFP4 `--act8`: +5-15% in alternating runs, DRAM-bound no worse).
    const PREFETCH: usize = 4096;

    /// [`super::quantize_block`] of one full 32-column block, bit-identical (the same IEEE
    /// division, round-half-even by `vroundps`, which equals the scalar 1.5 * 2^23 trick for
    /// `|v / scale| <= 127.0001`, the same clamp): `(scale, sum of codes, codes, codes with
    /// each 16-column chunk in [`super::NIBBLE_ORDER`])`.
    ///
    /// # Safety
    /// AVX2 available.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn quantize_block32(
        x: &[f32; super::ACT_BLOCK],
    ) -> (f32, i32, [i8; super::ACT_BLOCK], [i8; super::ACT_BLOCK]) {
        let zero = [0i8; super::ACT_BLOCK];
        let p = x.as_ptr();
        // SAFETY: x holds 32 f32, read as 4 unaligned vectors of 8.
        let v: [__m256; 4] = unsafe {
            [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ]
        };
        let absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let mut a = [_mm256_setzero_ps(); 4];
        for i in 0..4 {
            a[i] = _mm256_and_ps(v[i], absm);
        }
        // finite <=> |v| < inf (false for NaN)
        let inf = _mm256_set1_ps(f32::INFINITY);
        let fin = _mm256_and_ps(
            _mm256_and_ps(
                _mm256_cmp_ps::<_CMP_LT_OQ>(a[0], inf),
                _mm256_cmp_ps::<_CMP_LT_OQ>(a[1], inf),
            ),
            _mm256_and_ps(
                _mm256_cmp_ps::<_CMP_LT_OQ>(a[2], inf),
                _mm256_cmp_ps::<_CMP_LT_OQ>(a[3], inf),
            ),
        );
        if _mm256_movemask_ps(fin) != 0xff {
            return (f32::NAN, 0, zero, zero);
        }
        let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
        let amax = _mm_cvtss_f32(m);
        if amax == 0.0 {
            return (0.0, 0, zero, zero);
        }
        let scale = amax / 127.0;
        let sv = _mm256_set1_ps(scale);
        let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        let mut q = [_mm256_setzero_si256(); 4];
        for i in 0..4 {
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_div_ps(v[i], sv),
            );
            q[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
        }
        let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<1>(s));
        let isum = _mm_cvtsi128_si32(s);
        // [q0 0-3, q1 0-3 | q0 4-7, q1 4-7] -> i8 [q0 0-3, q1 0-3, q2 0-3, q3 0-3 | 4-7 ...]
        let p = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let nat = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        const O: [usize; CHUNK] = super::NIBBLE_ORDER;
        let idx = _mm256_broadcastsi128_si256(_mm_setr_epi8(
            O[0] as i8,
            O[1] as i8,
            O[2] as i8,
            O[3] as i8,
            O[4] as i8,
            O[5] as i8,
            O[6] as i8,
            O[7] as i8,
            O[8] as i8,
            O[9] as i8,
            O[10] as i8,
            O[11] as i8,
            O[12] as i8,
            O[13] as i8,
            O[14] as i8,
            O[15] as i8,
        ));
        let perm = _mm256_shuffle_epi8(nat, idx);
        let (mut a0, mut a1) = (zero, zero);
        // SAFETY: a0 and a1 hold 32 bytes each.
        unsafe {
            _mm256_storeu_si256(a0.as_mut_ptr() as *mut __m256i, nat);
            _mm256_storeu_si256(a1.as_mut_ptr() as *mut __m256i, perm);
        }
        (scale, isum, a0, a1)
    }

    /// `[v0, v0, v1, v1, v2, v2, v3, v3]`: a per-row value on both lanes of its row.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn dup_rows(v: __m128) -> __m256 {
        _mm256_permutevar8x32_ps(
            _mm256_castps128_ps256(v),
            _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
        )
    }

    /// `[v0, v1, v2, v3, v0, v1, v2, v3]`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn twice(v: __m128) -> __m256 {
        _mm256_set_m128(v, v)
    }

    /// Per-row values on the two lanes of each row: [`dup_rows`] (4-bit kernel) or [`twice`]
    /// (8-bit kernel).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn place<const DUP: bool>(v: __m128) -> __m256 {
        if DUP {
            dup_rows(v)
        } else {
            twice(v)
        }
    }

    /// The 4 row scales of a segment header, times `mul`, as an `__m128`.
    ///
    /// # Safety
    /// AVX2 available; `hoff` is the byte offset of a segment header of `pk`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn scales(pk: &PackedLinear, hoff: usize, mul: f32) -> __m128 {
        let sv = match pk.hmode {
            // SAFETY: the header holds 4 f32 scales (caller: hoff is a header offset).
            HdrMode::Scale | HdrMode::ScaleBias => unsafe {
                _mm_loadu_ps(pk.data.as_ptr().add(hoff) as *const f32)
            },
            HdrMode::Coded => {
                let sc = pk.scales4(hoff);
                _mm_setr_ps(sc[0], sc[1], sc[2], sc[3])
            }
        };
        _mm_mul_ps(sv, _mm_set1_ps(mul))
    }

    /// Fold one group into the accumulators: `acc += s * g + b * X` (scale-and-bias headers)
    /// or `acc += s * mul * (g + c * X)`. Each row owns 2 lanes (`DUP`: see [`place`]), so the `X` terms are added as halves (exact) on both.
    ///
    /// # Safety
    /// AVX2 + FMA available; `hoff` is the byte offset of a segment header of `pk`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn fold<const NT: usize, const DUP: bool>(
        pk: &PackedLinear,
        hoff: usize,
        g: &[__m256; NT],
        xs: &[f32],
        acc: &mut [__m256; NT],
    ) {
        let a8 = pk.a8;
        // SAFETY: hoff is a header offset (caller).
        let sv = place::<DUP>(unsafe { scales(pk, hoff, a8.mul) });
        if pk.hmode == HdrMode::ScaleBias {
            // SAFETY: scale-and-bias headers hold 4 f32 biases after the 4 scales.
            let bv = place::<DUP>(unsafe {
                _mm_loadu_ps(pk.data.as_ptr().add(hoff + 16) as *const f32)
            });
            let bv = _mm256_mul_ps(bv, _mm256_set1_ps(0.5));
            for t in 0..NT {
                acc[t] = _mm256_fmadd_ps(g[t], sv, acc[t]);
                acc[t] = _mm256_fmadd_ps(bv, _mm256_set1_ps(xs[t]), acc[t]);
            }
        } else if a8.c != 0.0 {
            let hc = _mm256_set1_ps(0.5 * a8.c);
            for t in 0..NT {
                let gx = _mm256_fmadd_ps(hc, _mm256_set1_ps(xs[t]), g[t]);
                acc[t] = _mm256_fmadd_ps(gx, sv, acc[t]);
            }
        } else {
            for t in 0..NT {
                acc[t] = _mm256_fmadd_ps(g[t], sv, acc[t]);
            }
        }
    }

    /// Sum of `vpmaddubsw(w, x)` for a 4-bit chunk: `lo`/`hi` are the 4 rows' low/high nibble
    /// values, `x` 16 activation codes in nibble order (one 64-bit broadcast per half).
    /// `PAIRS >= 2`: the two products are added in i16; `PAIRS == 1`: each is widened to i32
    /// first (the result is then i32).
    ///
    /// # Safety
    /// AVX2 available; 16 readable bytes at `x`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn chunk_dot<const PAIRS: u8>(lo: __m256i, hi: __m256i, x: *const i8) -> __m256i {
        // SAFETY: 16 readable bytes at x (caller).
        let (a, b) = unsafe {
            (
                (x as *const i64).read_unaligned(),
                (x.add(8) as *const i64).read_unaligned(),
            )
        };
        let pa = _mm256_maddubs_epi16(lo, _mm256_set1_epi64x(a));
        let pb = _mm256_maddubs_epi16(hi, _mm256_set1_epi64x(b));
        if PAIRS == 1 {
            let ones = _mm256_set1_epi16(1);
            _mm256_add_epi32(_mm256_madd_epi16(pa, ones), _mm256_madd_epi16(pb, ones))
        } else {
            _mm256_add_epi16(pa, pb)
        }
    }

    /// Code values of one 4-bit chunk (32 bytes = 4 rows x 8): low and high nibbles, through
    /// the table `lut` unless `LUT` is false (INT4: the codes themselves).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn unpack4<const LUT: bool>(w: __m256i, lut: __m256i) -> (__m256i, __m256i) {
        let m4 = _mm256_set1_epi8(0x0F);
        let lo = _mm256_and_si256(w, m4);
        let hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
        if LUT {
            (_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi))
        } else {
            (lo, hi)
        }
    }

    /// One 32-column activation block of a 4-bit row tile (chunks at `w` and `w + 32`; with
    /// `TWO == false` only the chunk at `w`, the odd last chunk of a segment) for `NT` tokens:
    /// `g[t] += f32(I_b(t)) * sx_b(t)`. `x` points at token 0's codes of the block in
    /// `xperm` (token `t` at `x + t * pcols`), `s` at token 0's block scale in `sx` (token `t`
    /// at `s + t * nblk`).
    ///
    /// # Safety
    /// AVX2 + FMA available; the chunk bytes at `w` (64, or 32 when `!TWO`), `NT` tokens'
    /// 32 (16 when `!TWO`) codes at `x + t * pcols` and scales at `s + t * nblk` are readable.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block_b4<const LUT: bool, const PAIRS: u8, const NT: usize, const TWO: bool>(
        w: *const u8,
        lut: __m256i,
        x: *const i8,
        pcols: usize,
        s: *const f32,
        nblk: usize,
        g: &mut [__m256; NT],
    ) {
        let ones = _mm256_set1_epi16(1);
        // SAFETY: the block's chunks are readable (caller).
        let (w0, w1) = unsafe {
            (
                _mm256_loadu_si256(w as *const __m256i),
                if TWO {
                    _mm256_loadu_si256(w.add(32) as *const __m256i)
                } else {
                    _mm256_setzero_si256()
                },
            )
        };
        // The stream is sequential, but the decode leaves few loads in flight: ask for the line
        // PREFETCH bytes ahead (one 64-byte line per block). Prefetches never fault, and the
        // address is only formed with wrapping arithmetic.
        if TWO {
            _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(PREFETCH) as *const i8);
        }
        let (lo0, hi0) = unpack4::<LUT>(w0, lut);
        let (lo1, hi1) = unpack4::<LUT>(w1, lut);
        for t in 0..NT {
            // SAFETY: token t's codes and scale of this block are readable (caller).
            let (i, sc) = unsafe {
                let xt = x.add(t * pcols);
                let i = if TWO {
                    let (p0, p1) = (
                        chunk_dot::<PAIRS>(lo0, hi0, xt),
                        chunk_dot::<PAIRS>(lo1, hi1, xt.add(CHUNK)),
                    );
                    if PAIRS == 4 {
                        _mm256_madd_epi16(_mm256_add_epi16(p0, p1), ones)
                    } else if PAIRS == 1 {
                        _mm256_add_epi32(p0, p1)
                    } else {
                        _mm256_add_epi32(_mm256_madd_epi16(p0, ones), _mm256_madd_epi16(p1, ones))
                    }
                } else {
                    let p = chunk_dot::<PAIRS>(lo0, hi0, xt);
                    if PAIRS == 1 {
                        p
                    } else {
                        _mm256_madd_epi16(p, ones)
                    }
                };
                (i, *s.add(t * nblk))
            };
            g[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(sc), g[t]);
        }
    }

    /// 4-bit layers. `PAIRS`: products summed in i16 before widening (4 when the table values
    /// are <= 32, 1 when <= 128: a `vpmaddubsw` pair sum is then <= 2 * 128 * 127 = 32512).
    ///
    /// `NB` (1, 2 or 4; 0: none): the leading segments of `2 NB` chunks (32/64/128-column
    /// groups) run a loop with fixed strides and the `NB` blocks of a group unrolled; the
    /// other segments (and every segment when `NB == 0`) the generic loop. Both do the same
    /// operations in the same order ([`block_b4`] per block, [`fold`] per group).
    ///
    /// `NT` (1..=8) tokens share each unpacked weight register; every token's output is computed
    /// by the same instructions in the same order whatever `NT` (per-token accumulators, no
    /// cross-token operation), so the 8-token prefill pass ([`crate::packed::TB_WIDE`]) is bit-identical to
    /// the one-token calls. `out` holds at least `NT` rows.
    ///
    /// # Safety
    /// AVX2 + FMA available; `pk` is 4-bit (`Store::B4`) with an integer path (`pk.a8`);
    /// `tile < pk.ntiles`; `qa` was built by `pk.quantize_act(.., n, true)` with
    /// `t0 + NT <= n`.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn tile_b4<
        const LUT: bool,
        const PAIRS: u8,
        const NB: usize,
        const NT: usize,
    >(
        pk: &PackedLinear,
        tile: usize,
        qa: &QuantAct,
        t0: usize,
        out: &mut [[f32; TILE_ROWS]],
    ) {
        assert!(out.len() >= NT);
        let pcols = pk.pcols;
        let nseg = pk.segs.len();
        let nblk = qa.nblk;
        debug_assert!(
            tile < pk.ntiles
                && qa.xperm.len() >= (t0 + NT) * pcols
                && qa.sx.len() >= (t0 + NT) * nblk
                && qa.xsum.len() >= (t0 + NT) * nseg
        );
        // SAFETY: the table is 16 bytes.
        let lut = _mm256_broadcastsi128_si256(unsafe {
            _mm_loadu_si128(pk.a8.lut.as_ptr() as *const __m128i)
        });
        let tbase = tile * pk.tile_bytes;
        // SAFETY: tile < ntiles, so the tile's tile_bytes bytes lie inside pk.data.
        let base = unsafe { pk.data.as_ptr().add(tbase) };
        // token t0's codes, block scales and segment sums
        // SAFETY: t0 * pcols <= xperm.len(), t0 * nblk <= sx.len(), t0 * nseg <= xsum.len().
        let (xq0, sx0, xs0) = unsafe {
            (
                qa.xperm.as_ptr().add(t0 * pcols),
                qa.sx.as_ptr().add(t0 * nblk),
                qa.xsum.as_ptr().add(t0 * nseg),
            )
        };
        let mut acc = [_mm256_setzero_ps(); NT];
        let mut xs = [0f32; NT];
        let segs = &pk.segs;
        // Fast loop: segment k of the leading 2 NB-chunk segments is header k at `k * stride`,
        // blocks `NB k..`, columns `32 NB k..` (checked below).
        let stride = pk.hdr + NB * 64;
        let nfast = if NB == 0 {
            0
        } else {
            segs.iter().take_while(|s| s.chunks == 2 * NB).count()
        };
        debug_assert!(segs.iter().take(nfast).enumerate().all(|(k, s)| {
            s.col0 == k * NB * 2 * CHUNK && s.byte_off == k * stride && qa.blk0[k] == k * NB
        }));
        for k in 0..nfast {
            let mut g = [_mm256_setzero_ps(); NT];
            for b in 0..NB {
                // SAFETY: segment k's block b (64 bytes after the header) is in the tile; its
                // codes (32 per token) and scales are in xperm and sx for tokens t0..t0+NT.
                unsafe {
                    block_b4::<LUT, PAIRS, NT, true>(
                        base.add(k * stride + pk.hdr + b * 64),
                        lut,
                        xq0.add((k * NB + b) * 2 * CHUNK),
                        pcols,
                        sx0.add(k * NB + b),
                        nblk,
                        &mut g,
                    )
                };
            }
            for t in 0..NT {
                // SAFETY: k < nseg, t < NT.
                xs[t] = unsafe { *xs0.add(t * nseg + k) };
            }
            // SAFETY: segment k's header starts at this offset.
            unsafe { fold::<NT, true>(pk, tbase + k * stride, &g, &xs, &mut acc) };
        }
        // SAFETY: as for this function (same tile, tokens and activations).
        unsafe { b4_tail::<LUT, PAIRS, NT>(pk, tile, qa, t0, nfast, &mut acc) };
        for t in 0..NT {
            let mut a = [0f32; 8];
            // SAFETY: a has 8 f32.
            unsafe { _mm256_storeu_ps(a.as_mut_ptr(), acc[t]) };
            for r in 0..TILE_ROWS {
                out[t][r] = a[2 * r] + a[2 * r + 1];
            }
        }
    }

    /// [`tile_b4`] for one token (`t0 = 0`) on INT4 codes (`LUT = false`, `PAIRS = 4`) and two
    /// row tiles, `tile` and `tile + 1`, in one pass: the 4 activation broadcasts and the block
    /// scale of each block serve both tiles. Per tile the same operations in the same order as
    /// `tile_b4::<false, 4, NB, 1>` (integer sums are exact in any order), so the outputs are
    /// bit-identical to it.
    ///
    /// # Safety
    /// AVX2 + FMA available; `pk` is INT4 (`Store::B4`, integer codes, 4-pair integer path);
    /// `NB > 0`; `tile + 1 < pk.ntiles`; `qa` was built by `pk.quantize_act(.., n, true)`
    /// with `n >= 1`.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn tile_b4_pair<const NB: usize>(
        pk: &PackedLinear,
        tile: usize,
        qa: &QuantAct,
        out: &mut [[f32; TILE_ROWS]; 2],
    ) {
        debug_assert!(
            NB > 0
                && tile + 1 < pk.ntiles
                && qa.xperm.len() >= pk.pcols
                && qa.sx.len() >= qa.nblk
                && qa.xsum.len() >= pk.segs.len()
        );
        let ones = _mm256_set1_epi16(1);
        let nolut = _mm256_setzero_si256(); // INT4: the codes are the values
        let tb = pk.tile_bytes;
        // SAFETY: tile + 1 < ntiles: both tiles' bytes lie inside pk.data.
        let base = unsafe { pk.data.as_ptr().add(tile * tb) };
        let (xq, sx, xsum) = (qa.xperm.as_ptr(), qa.sx.as_ptr(), qa.xsum.as_ptr());
        let segs = &pk.segs;
        let stride = pk.hdr + NB * 64;
        let nfast = segs.iter().take_while(|s| s.chunks == 2 * NB).count();
        debug_assert!(segs.iter().take(nfast).enumerate().all(|(k, s)| {
            s.col0 == k * NB * 2 * CHUNK && s.byte_off == k * stride && qa.blk0[k] == k * NB
        }));
        let mut acc0 = [_mm256_setzero_ps(); 1];
        let mut acc1 = [_mm256_setzero_ps(); 1];
        for k in 0..nfast {
            let mut g = [_mm256_setzero_ps(); 2];
            for b in 0..NB {
                let blk = k * NB + b;
                // SAFETY: block blk's 32 codes and its scale are inside xperm and sx (token 0).
                let (xa, xb, xc, xd, s) = unsafe {
                    let x = xq.add(blk * 2 * CHUNK) as *const i64;
                    (
                        _mm256_set1_epi64x(x.read_unaligned()),
                        _mm256_set1_epi64x(x.add(1).read_unaligned()),
                        _mm256_set1_epi64x(x.add(2).read_unaligned()),
                        _mm256_set1_epi64x(x.add(3).read_unaligned()),
                        _mm256_set1_ps(*sx.add(blk)),
                    )
                };
                for j in 0..2 {
                    // SAFETY: segment k's block b of tile `tile + j` (64 bytes after the
                    // header) is inside that tile.
                    let w = unsafe { base.add(j * tb + k * stride + pk.hdr + b * 64) };
                    // SAFETY: as above.
                    let (w0, w1) = unsafe {
                        (
                            _mm256_loadu_si256(w as *const __m256i),
                            _mm256_loadu_si256(w.add(32) as *const __m256i),
                        )
                    };
                    // prefetch as in block_b4 (wrapping address, never faults)
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(PREFETCH) as *const i8);
                    let (lo0, hi0) = unpack4::<false>(w0, nolut);
                    let (lo1, hi1) = unpack4::<false>(w1, nolut);
                    let p = _mm256_add_epi16(
                        _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo0, xa),
                            _mm256_maddubs_epi16(hi0, xb),
                        ),
                        _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo1, xc),
                            _mm256_maddubs_epi16(hi1, xd),
                        ),
                    );
                    let i = _mm256_madd_epi16(p, ones);
                    g[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), s, g[j]);
                }
            }
            // SAFETY: k < nseg.
            let xs = [unsafe { *xsum.add(k) }];
            // SAFETY: segment k's headers of both tiles start at these offsets.
            unsafe {
                fold::<1, true>(pk, tile * tb + k * stride, &[g[0]], &xs, &mut acc0);
                fold::<1, true>(pk, (tile + 1) * tb + k * stride, &[g[1]], &xs, &mut acc1);
            }
        }
        // SAFETY: as for this function; each tile's remaining segments.
        unsafe {
            b4_tail::<false, 4, 1>(pk, tile, qa, 0, nfast, &mut acc0);
            b4_tail::<false, 4, 1>(pk, tile + 1, qa, 0, nfast, &mut acc1);
        }
        for (o, acc) in out.iter_mut().zip([acc0[0], acc1[0]]) {
            let mut a = [0f32; 8];
            // SAFETY: a has 8 f32.
            unsafe { _mm256_storeu_ps(a.as_mut_ptr(), acc) };
            for r in 0..TILE_ROWS {
                o[r] = a[2 * r] + a[2 * r + 1];
            }
        }
    }

    /// The generic loop of [`tile_b4`] over segments `from..` of `tile` (any chunk count),
    /// folded into `acc`.
    ///
    /// # Safety
    /// As [`tile_b4`].
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn b4_tail<const LUT: bool, const PAIRS: u8, const NT: usize>(
        pk: &PackedLinear,
        tile: usize,
        qa: &QuantAct,
        t0: usize,
        from: usize,
        acc: &mut [__m256; NT],
    ) {
        let pcols = pk.pcols;
        let nseg = pk.segs.len();
        let nblk = qa.nblk;
        // SAFETY: the table is 16 bytes.
        let lut = _mm256_broadcastsi128_si256(unsafe {
            _mm_loadu_si128(pk.a8.lut.as_ptr() as *const __m128i)
        });
        let tbase = tile * pk.tile_bytes;
        // SAFETY: tile < ntiles (caller), so the tile's bytes lie inside pk.data; token t0's
        // codes and block scales start inside xperm and sx.
        let (base, xq0, sx0) = unsafe {
            (
                pk.data.as_ptr().add(tbase),
                qa.xperm.as_ptr().add(t0 * pcols),
                qa.sx.as_ptr().add(t0 * nblk),
            )
        };
        let mut xs = [0f32; NT];
        let segs = &pk.segs;
        for (k, seg) in segs.iter().enumerate().skip(from) {
            // SAFETY: the segment's chunks follow its header inside the tile.
            let w = unsafe { base.add(seg.byte_off + pk.hdr) };
            let mut g = [_mm256_setzero_ps(); NT];
            let full = seg.chunks / 2;
            let b0 = qa.blk0[k];
            for bi in 0..full {
                // SAFETY: chunks 2bi and 2bi+1 (32 bytes each: 4 rows x 8) are in the segment;
                // their codes (o + 32 <= (t0 + NT) * pcols) and the block scales (block index
                // below nblk) exist for tokens t0..t0+NT.
                unsafe {
                    block_b4::<LUT, PAIRS, NT, true>(
                        w.add(bi * 64),
                        lut,
                        xq0.add(seg.col0 + bi * 2 * CHUNK),
                        pcols,
                        sx0.add(b0 + bi),
                        nblk,
                        &mut g,
                    )
                };
            }
            if seg.chunks % 2 == 1 {
                let bi = full;
                // SAFETY: the last chunk (index 2 full) is in the segment, its 16 codes and
                // block scale exist for tokens t0..t0+NT.
                unsafe {
                    block_b4::<LUT, PAIRS, NT, false>(
                        w.add(bi * 64),
                        lut,
                        xq0.add(seg.col0 + bi * 2 * CHUNK),
                        pcols,
                        sx0.add(b0 + bi),
                        nblk,
                        &mut g,
                    )
                };
            }
            for t in 0..NT {
                xs[t] = qa.xsum[(t0 + t) * nseg + k];
            }
            // SAFETY: the segment header starts at this offset.
            unsafe { fold::<NT, true>(pk, tbase + seg.byte_off, &g, &xs, acc) };
        }
    }

    /// [`tile_b4s`]'s scale decoders.
    pub(crate) const SC_E8M0: u8 = 0;
    pub(crate) const SC_E4M3: u8 = 1;
    /// E4M3 codes that are all normal (exponent field >= 1; see
    /// `PackedLinear::e4m3_normal`).
    pub(crate) const SC_E4M3N: u8 = 2;

    /// The 4 row scales of a code-scaled header (4 code bytes at `p`) as
    /// `[s0, s0, s1, s1, s2, s2, s3, s3]`: E8M0 `2^(code - 127)` as the f32 `code << 23`,
    /// E4M3 `e4m3(code) / 256` as the f16 `code << 7`, or (`SC_E4M3N`, normal codes only) as
    /// the f32 `(code << 20) + (112 << 23)`: exponent field `e + 112`, mantissa `m << 20`, i.e.
    /// `2^(e - 15) (1 + m / 8)`, the same value as the f16 (all exact). The f32 route needs no
    /// `vcvtph2ps` (2 uops on Zen 3).
    ///
    /// # Safety
    /// AVX2 + F16C available; 4 readable bytes at `p`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn code_scales<const SC: u8>(p: *const u8) -> __m256 {
        // SAFETY: 4 readable bytes at p (caller).
        let c = unsafe { (p as *const i32).read_unaligned() };
        const Z: i8 = -128; // pshufb: zero byte
        if SC == SC_E8M0 || SC == SC_E4M3N {
            // code k into byte 2 of dwords 2k, 2k+1 (lane 0: rows 0, 1; lane 1: rows 2, 3)
            let m = _mm256_setr_epi8(
                Z, Z, 0, Z, Z, Z, 0, Z, Z, Z, 1, Z, Z, Z, 1, Z, Z, Z, 2, Z, Z, Z, 2, Z, Z, Z, 3, Z,
                Z, Z, 3, Z,
            );
            let v = _mm256_shuffle_epi8(_mm256_set1_epi32(c), m);
            if SC == SC_E8M0 {
                _mm256_castsi256_ps(_mm256_slli_epi32::<7>(v))
            } else {
                _mm256_castsi256_ps(_mm256_add_epi32(
                    _mm256_slli_epi32::<4>(v),
                    _mm256_set1_epi32(112 << 23),
                ))
            }
        } else {
            // code k into the high byte of words 2k, 2k+1, then >> 1 (codes are <= 0x7E)
            let m = _mm_setr_epi8(Z, 0, Z, 0, Z, 1, Z, 1, Z, 2, Z, 2, Z, 3, Z, 3);
            _mm256_cvtph_ps(_mm_srli_epi16::<1>(_mm_shuffle_epi8(_mm_set1_epi32(c), m)))
        }
    }

    /// 4-bit layers with E8M0/E4M3 scale codes in their headers (MXFP4, NVFP4; see
    /// [`PackedLinear::a8_half_off`]): per 32-column block (or the 16-column rest of a group)
    /// and token, the `vpmaddwd` result keeps 2 lanes per row, gets the offset term
    /// `(c / 2) * sum q` added in i32 (exact), is converted and FMA'd with the lane scales
    /// `code_scale(row) * sx_b` into one vector accumulator: no per-group fold, one
    /// lane-pair sum per row at the end, times `mul * sfin`. `G` (1 or 2; 0: none): the
    /// leading segments of `G` chunks run a loop with fixed strides.
    ///
    /// # Safety
    /// AVX2 + FMA + F16C available; `pk.a8_half_off()` is `Some` and `pk.scode` matches `SC`;
    /// `tile < pk.ntiles`; `qa` was built by `pk.quantize_act(.., n, true)` with
    /// `t0 + NT <= n`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn tile_b4s<
        const LUT: bool,
        const SC: u8,
        const G: usize,
        const NT: usize,
    >(
        pk: &PackedLinear,
        tile: usize,
        qa: &QuantAct,
        t0: usize,
        out: &mut [[f32; TILE_ROWS]; TB],
    ) {
        let pcols = pk.pcols;
        let nblk = qa.nblk;
        debug_assert!(
            tile < pk.ntiles
                && qa.xperm.len() >= (t0 + NT) * pcols
                && qa.sx.len() >= (t0 + NT) * nblk
                && qa.qoff.len() >= (t0 + NT) * nblk
                && pk.hdr == 4
        );
        let ones = _mm256_set1_epi16(1);
        // SAFETY: the table is 16 bytes.
        let lut = _mm256_broadcastsi128_si256(unsafe {
            _mm_loadu_si128(pk.a8.lut.as_ptr() as *const __m128i)
        });
        // SAFETY: tile < ntiles, so the tile's tile_bytes bytes lie inside pk.data.
        let base = unsafe { pk.data.as_ptr().add(tile * pk.tile_bytes) };
        let mut acc = [_mm256_setzero_ps(); NT];
        let segs = &pk.segs;
        // Fast loop: the leading segments of G whole chunks (G = 1: NVFP4's 16-column groups,
        // G = 2: 32-column groups) are one activation block each and lie `4 + 32 G` bytes
        // apart, so segment k is header k, block k, columns 16 G k.. (checked below).
        let nfast = if G == 0 {
            0
        } else {
            segs.iter().take_while(|s| s.chunks == G).count()
        };
        debug_assert!(segs.iter().take(nfast).enumerate().all(|(k, s)| {
            s.col0 == k * G * CHUNK && s.byte_off == k * (4 + G * 32) && qa.blk0[k] == k
        }));
        // Even segments go to `acc`, odd ones to `acc2` (two FMA chains: at one token the
        // loop is otherwise bound by the FMA latency).
        let mut acc2 = [_mm256_setzero_ps(); NT];
        macro_rules! fast_seg {
            ($k:expr, $acc:ident) => {{
                let k = $k;
                let h = base.wrapping_add(k * (4 + G * 32));
                // SAFETY: segment k (header + G chunks, `4 + 32 G` bytes from h) is in the tile.
                let (wsv, w0, w1) = unsafe {
                    (
                        code_scales::<SC>(h),
                        _mm256_loadu_si256(h.add(4) as *const __m256i),
                        if G == 2 {
                            _mm256_loadu_si256(h.add(36) as *const __m256i)
                        } else {
                            _mm256_setzero_si256()
                        },
                    )
                };
                // prefetch as in tile_b4 (wrapping address, never faults)
                _mm_prefetch::<_MM_HINT_T0>(h.wrapping_add(PREFETCH) as *const i8);
                let (lo0, hi0) = unpack4::<LUT>(w0, lut);
                let (lo1, hi1) = unpack4::<LUT>(w1, lut);
                for t in 0..NT {
                    let o = (t0 + t) * pcols + k * G * CHUNK;
                    let bx = (t0 + t) * nblk + k;
                    // SAFETY: o + 16 G <= (t0 + NT) * pcols <= xperm.len() (segment k's
                    // columns); bx < (t0 + NT) * nblk <= sx.len(), qoff.len().
                    let (p, s, q) = unsafe {
                        let x = qa.xperm.as_ptr().add(o);
                        let p0 = chunk_dot::<4>(lo0, hi0, x);
                        (
                            if G == 2 {
                                _mm256_add_epi16(p0, chunk_dot::<4>(lo1, hi1, x.add(CHUNK)))
                            } else {
                                p0
                            },
                            *qa.sx.get_unchecked(bx),
                            *qa.qoff.get_unchecked(bx),
                        )
                    };
                    let i = _mm256_add_epi32(_mm256_madd_epi16(p, ones), _mm256_set1_epi32(q));
                    let sc = _mm256_mul_ps(wsv, _mm256_set1_ps(s));
                    $acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), sc, $acc[t]);
                }
            }};
        }
        let mut k = 0;
        while k + 1 < nfast {
            fast_seg!(k, acc);
            fast_seg!(k + 1, acc2);
            k += 2;
        }
        if k < nfast {
            fast_seg!(k, acc);
        }
        for t in 0..NT {
            acc[t] = _mm256_add_ps(acc[t], acc2[t]);
        }
        for (k, seg) in segs.iter().enumerate().skip(nfast) {
            // SAFETY: the segment header (4 code bytes) and its chunks lie inside the tile.
            let (wsv, w) = unsafe {
                let h = base.add(seg.byte_off);
                (code_scales::<SC>(h), h.add(4))
            };
            let b0 = qa.blk0[k];
            for bi in 0..seg.chunks.div_ceil(2) {
                let two = 2 * bi + 1 < seg.chunks;
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(bi * 64 + PREFETCH) as *const i8);
                // SAFETY: chunk 2bi (and 2bi+1 when `two`) of the segment: 32 bytes each.
                let (w0, w1) = unsafe {
                    (
                        _mm256_loadu_si256(w.add(bi * 64) as *const __m256i),
                        if two {
                            _mm256_loadu_si256(w.add(bi * 64 + 32) as *const __m256i)
                        } else {
                            _mm256_setzero_si256()
                        },
                    )
                };
                let (lo0, hi0) = unpack4::<LUT>(w0, lut);
                let (lo1, hi1) = unpack4::<LUT>(w1, lut);
                for t in 0..NT {
                    let o = (t0 + t) * pcols + seg.col0 + bi * 2 * CHUNK;
                    let bx = (t0 + t) * nblk + b0 + bi;
                    // SAFETY: o + 16 (o + 32 when `two`) <= (t0 + NT) * pcols <= xperm.len();
                    // bx < (t0 + NT) * nblk <= sx.len(), qoff.len().
                    let (p, s, q) = unsafe {
                        let x = qa.xperm.as_ptr().add(o);
                        let p0 = chunk_dot::<4>(lo0, hi0, x);
                        (
                            if two {
                                _mm256_add_epi16(p0, chunk_dot::<4>(lo1, hi1, x.add(CHUNK)))
                            } else {
                                p0
                            },
                            *qa.sx.get_unchecked(bx),
                            *qa.qoff.get_unchecked(bx),
                        )
                    };
                    let i = _mm256_add_epi32(_mm256_madd_epi16(p, ones), _mm256_set1_epi32(q));
                    let sc = _mm256_mul_ps(wsv, _mm256_set1_ps(s));
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), sc, acc[t]);
                }
            }
        }
        let fin = pk.a8.mul * pk.sfin;
        for t in 0..NT {
            let mut a = [0f32; 8];
            // SAFETY: a has 8 f32.
            unsafe { _mm256_storeu_ps(a.as_mut_ptr(), acc[t]) };
            for r in 0..TILE_ROWS {
                out[t][r] = (a[2 * r] + a[2 * r + 1]) * fin;
            }
        }
    }

    /// 8-bit layers (INT5..INT8 codes stored one per byte, chunk = 4 rows x 16 bytes): codes
    /// zero-extended to i16 (`vpmovzxbw`), `vpmaddwd` with the i16 activation codes (pair sums
    /// <= 2 * 255 * 127, exact in i32), per 32-column block the 4 rows' vectors reduced with
    /// three `vphaddd` to `[r0, r1, r2, r3, r0, r1, r2, r3]`, then one convert + FMA per token.
    ///
    /// # Safety
    /// AVX2 + FMA available; `pk` is 8-bit (`Store::B8`) with integer codes; `tile < pk.ntiles`;
    /// `qa` was built by `pk.quantize_act(.., n, true)` with `t0 + NT <= n`.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn tile_b8<const NT: usize>(
        pk: &PackedLinear,
        tile: usize,
        qa: &QuantAct,
        t0: usize,
        out: &mut [[f32; TILE_ROWS]; TB],
    ) {
        let pcols = pk.pcols;
        let nseg = pk.segs.len();
        debug_assert!(
            tile < pk.ntiles
                && qa.x16.len() >= (t0 + NT) * pcols
                && qa.sx.len() >= (t0 + NT) * qa.nblk
        );
        // SAFETY: tile < ntiles, so the tile's tile_bytes bytes lie inside pk.data.
        let base = unsafe { pk.data.as_ptr().add(tile * pk.tile_bytes) };
        let mut acc = [_mm256_setzero_ps(); NT];
        let mut xs = [0f32; NT];
        for (k, seg) in pk.segs.iter().enumerate() {
            // SAFETY: the segment's chunks follow its header inside the tile.
            let w = unsafe { base.add(seg.byte_off + pk.hdr) };
            let mut g = [_mm256_setzero_ps(); NT];
            let b0 = qa.blk0[k];
            for bi in 0..seg.chunks.div_ceil(2) {
                let j = 2 * bi;
                let two = j + 1 < seg.chunks;
                // chunk j row r at w + (j * 4 + r) * 16; chunk j + 1 follows (64 bytes later)
                // SAFETY: chunk j is in the segment, and chunk j + 1 when `two`.
                let p = unsafe { w.add(j * 64) };
                // two lines per block, PREFETCH bytes ahead (see tile_b4)
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + 64) as *const i8);
                let mut w0 = [_mm256_setzero_si256(); 4];
                let mut w1 = [_mm256_setzero_si256(); 4];
                for r in 0..TILE_ROWS {
                    // SAFETY: row r of chunk j (and of chunk j + 1 when `two`): 16 bytes each.
                    unsafe {
                        w0[r] =
                            _mm256_cvtepu8_epi16(_mm_loadu_si128(p.add(16 * r) as *const __m128i));
                        if two {
                            w1[r] = _mm256_cvtepu8_epi16(_mm_loadu_si128(
                                p.add(64 + 16 * r) as *const __m128i
                            ));
                        }
                    }
                }
                for t in 0..NT {
                    let o = (t0 + t) * pcols + seg.col0 + j * CHUNK;
                    // SAFETY: o + 16 (o + 32 when `two`) <= (t0 + NT) * pcols <= x16.len();
                    // the block index is below nblk.
                    let (x0, x1, s) = unsafe {
                        let x = qa.x16.as_ptr().add(o);
                        (
                            _mm256_loadu_si256(x as *const __m256i),
                            if two {
                                _mm256_loadu_si256(x.add(CHUNK) as *const __m256i)
                            } else {
                                _mm256_setzero_si256()
                            },
                            *qa.sx.get_unchecked((t0 + t) * qa.nblk + b0 + bi),
                        )
                    };
                    let mut d = [_mm256_setzero_si256(); 4];
                    for r in 0..TILE_ROWS {
                        d[r] = _mm256_madd_epi16(w0[r], x0);
                        if two {
                            d[r] = _mm256_add_epi32(d[r], _mm256_madd_epi16(w1[r], x1));
                        }
                    }
                    let i = _mm256_hadd_epi32(
                        _mm256_hadd_epi32(d[0], d[1]),
                        _mm256_hadd_epi32(d[2], d[3]),
                    );
                    g[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(s), g[t]);
                }
            }
            for t in 0..NT {
                xs[t] = qa.xsum[(t0 + t) * nseg + k];
            }
            // SAFETY: the segment header starts at this offset.
            unsafe {
                fold::<NT, false>(pk, tile * pk.tile_bytes + seg.byte_off, &g, &xs, &mut acc)
            };
        }
        for t in 0..NT {
            let mut a = [0f32; 8];
            // SAFETY: a has 8 f32.
            unsafe { _mm256_storeu_ps(a.as_mut_ptr(), acc[t]) };
            for r in 0..TILE_ROWS {
                out[t][r] = a[r] + a[r + 4];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 4-bit layers whose scales are E8M0 / E4M3 values keep the scale codes in their
    /// headers (`stab[code]` = the same f32 `scale / global_scale` as the table header), and
    /// the code-scaled AVX2 kernel (fixed-stride loop for 16/32-column groups, generic loop
    /// for longer groups and ragged last groups) agrees with the scalar reference on ragged
    /// shapes at batches 1..=8; scales outside those sets fall back to the index table.
    #[test]
    fn code_scaled_headers_and_kernel() {
        use crate::packed::{ScaleCode, CHUNK, TILE_ROWS};
        use lowbit_numerics::{Granularity, ScaleDtype, Scheme};
        let mut seed = 11u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            seed >> 33
        };
        let e2m1 = |g: usize, dt: ScaleDtype, gs: bool| Scheme {
            elem: ElemFormat::Float(FloatFormat::E2M1),
            granularity: Granularity::PerGroup(g),
            scale_dtype: dt,
            asymmetric: false,
            global_scale: gs,
        };
        let int4_e8 = Scheme {
            elem: ElemFormat::Int { bits: 4 },
            granularity: Granularity::PerGroup(32),
            scale_dtype: ScaleDtype::E8M0,
            asymmetric: false,
            global_scale: false,
        };
        // (scheme, header code, E4M3 scales drawn from the normal codes only: the f32-pattern
        // decoder `SC_E4M3N`; otherwise subnormal codes occur and the f16 route runs)
        let cases = [
            (Scheme::from_name("mxfp4").unwrap(), ScaleCode::E8M0, false),
            (Scheme::from_name("nvfp4").unwrap(), ScaleCode::E4M3, false),
            (Scheme::from_name("nvfp4").unwrap(), ScaleCode::E4M3, true),
            (e2m1(64, ScaleDtype::E8M0, false), ScaleCode::E8M0, false),
            (e2m1(16, ScaleDtype::E4M3, false), ScaleCode::E4M3, false),
            (e2m1(48, ScaleDtype::E4M3, false), ScaleCode::E4M3, true),
            (int4_e8, ScaleCode::E8M0, false),
        ];
        let shapes = [
            (1, 16),
            (7, 576),
            (5, 100),
            (9, 577),
            (6, 48),
            (13, 300),
            (4, 33),
        ];
        for (scheme, want, normal) in cases {
            for &(rows, cols) in &shapes {
                let bits = scheme.elem.bits();
                let rb = lowbit_numerics::tensor::packed_row_bytes(cols, bits);
                let mut data = vec![0u8; rows * rb];
                for r in 0..rows {
                    for c in 0..cols {
                        codes::put_code(&mut data[r * rb..], bits, c, (next() % 16) as u8);
                    }
                }
                let (gr, gc) = scheme.granularity.grid(rows, cols);
                let scales: Vec<f32> = (0..gr * gc)
                    .map(|_| match want {
                        ScaleCode::E8M0 => 2f32.powi(3 - (next() % 12) as i32),
                        _ if normal => codes::e4m3(8 + (next() % 0x77) as u8),
                        _ => codes::e4m3((next() % 0x7F) as u8),
                    })
                    .collect();
                let mut scales = scales;
                if want == ScaleCode::E4M3 {
                    // not a power of two: the scales cannot all pass as E8M0
                    scales[0] = codes::e4m3(0x09);
                }
                let mut q = QuantizedTensor {
                    scheme,
                    rows,
                    cols,
                    data,
                    scales,
                    zero_points: None,
                    global_scale: scheme.global_scale.then_some(3.0),
                    g_idx: None,
                    nested: None,
                };
                let what = format!("{scheme:?} {rows}x{cols}");
                let mut pk = PackedLinear::new(&q).unwrap();
                assert_eq!(pk.scode, want, "{what}");
                // the random draws include a subnormal code at these sizes unless `normal`
                assert_eq!(
                    pk.e4m3_normal,
                    want == ScaleCode::E4M3 && q.scales.iter().all(|&s| s >= codes::e4m3(8)),
                    "{what}"
                );
                if normal {
                    assert!(pk.e4m3_normal, "{what}");
                }
                assert!(pk.a8_half_off().is_some(), "{what}");
                let gs = q.global_scale.unwrap_or(1.0);
                let (_, bc) = scheme.granularity.block_shape(rows, cols);
                for r in 0..rows {
                    let (tile, rr) = (r / TILE_ROWS, r % TILE_ROWS);
                    for (k, seg) in pk.segs.iter().enumerate() {
                        let h = tile * pk.tile_bytes + seg.byte_off;
                        let s = q.scales[r * gc + k];
                        let code = pk.data[h + rr];
                        match want {
                            ScaleCode::E8M0 => assert_eq!(code as u32, s.to_bits() >> 23),
                            _ => assert_eq!(codes::e4m3(code).to_bits(), s.to_bits()),
                        }
                        assert_eq!(pk.sb(h, rr).0.to_bits(), (s / gs).to_bits(), "{what}");
                        assert_eq!(seg.col0, k * bc.div_ceil(CHUNK) * CHUNK, "{what}");
                    }
                }
                pk.set_act_mode(ActMode::Int8Block).unwrap();
                for n in 1..=8 {
                    let x: Vec<f32> = (0..n * cols)
                        .map(|i| (next() % 2001) as f32 / 1000.0 - 1.0 + (i % 5) as f32)
                        .collect();
                    let mut ys = vec![0f32; n * rows];
                    pk.forward_with(crate::isa::Isa::Scalar, &x, n, &mut ys)
                        .unwrap();
                    for isa in crate::isa::Isa::all_supported() {
                        let mut y = vec![f32::NAN; n * rows];
                        pk.forward_with(isa, &x, n, &mut y).unwrap();
                        for t in 0..n {
                            for r in 0..rows {
                                // a bound on every partial term: |s| 13 |x| per weight
                                let m: f64 = (0..cols)
                                    .map(|c| {
                                        let s = q.scales[r * gc + c / bc] / gs;
                                        13.0 * s as f64 * (x[t * cols + c].abs() as f64 + 1e-3)
                                    })
                                    .sum();
                                let tol = 4.0 * (cols as f64 / 16.0 + 16.0) * m * 6e-8;
                                let (a, b) = (y[t * rows + r] as f64, ys[t * rows + r] as f64);
                                assert!(
                                    (a - b).abs() <= tol,
                                    "{what} {isa:?} batch {n} token {t} row {r}: {a} vs {b}"
                                );
                            }
                        }
                    }
                }
                // f32 scales, one outside both code sets: the index table
                q.scheme.scale_dtype = ScaleDtype::F32;
                q.scheme.global_scale = false;
                q.global_scale = None;
                q.scales[0] = 0.3;
                let pk = PackedLinear::new(&q).unwrap();
                assert_eq!(pk.scode, ScaleCode::Table, "{what}");
                assert!(pk.a8_half_off().is_none(), "{what}");
            }
        }
    }

    /// The AVX2 block quantizer is bit-identical to the scalar one: random blocks over a wide
    /// range of magnitudes, exact ties at the scale, zero, tiny and subnormal blocks, and
    /// blocks with an infinity or a NaN.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_block_quantizer_matches_scalar() {
        if !crate::isa::Isa::Avx2.supported() {
            return;
        }
        let mut s = 7u64;
        let mut next = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let mut blocks: Vec<[f32; ACT_BLOCK]> = Vec::new();
        for k in 0..2000 {
            let mag = [1.0f32, 1e-3, 1e3, 1e-30, 1e30, 3e-39][k % 6];
            blocks.push(std::array::from_fn(|_| next() * mag));
        }
        // ties: amax 127 gives scale 1, so the halves sit exactly between two codes
        blocks.push(std::array::from_fn(|i| {
            if i == 0 {
                127.0
            } else {
                (i as f32 - 16.0) + 0.5
            }
        }));
        blocks.push([0.0; ACT_BLOCK]);
        blocks.push(std::array::from_fn(|i| if i == 3 { -0.0 } else { 0.0 }));
        for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
            for pos in [0, 13, 31] {
                let mut b: [f32; ACT_BLOCK] = std::array::from_fn(|_| next());
                b[pos] = bad;
                blocks.push(b);
            }
        }
        for b in &blocks {
            let mut q = [0i8; ACT_BLOCK];
            let (sc, sum) = quantize_block(b, &mut q);
            // SAFETY: AVX2 checked above.
            let (sv, sumv, nat, perm) = unsafe { avx2::quantize_block32(b) };
            assert_eq!(sc.to_bits(), sv.to_bits(), "{b:?}");
            assert_eq!((sum, q), (sumv, nat), "{b:?}");
            for (c, (p, n)) in perm.chunks(CHUNK).zip(nat.chunks(CHUNK)).enumerate() {
                for (i, &o) in NIBBLE_ORDER.iter().enumerate() {
                    assert_eq!(p[i], n[o], "chunk {c} slot {i}");
                }
            }
        }
    }
}
