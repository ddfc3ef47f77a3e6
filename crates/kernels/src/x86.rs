//! x86-64 AVX2+FMA+F16C and AVX-512 versions of the fused-dequantization kernels.
//!
//! Both follow the scalar reference (`PackedLinear::tile_scalar`) exactly in structure: per
//! segment, accumulate `v(code) * x` in vector registers for 4 rows x `NT` tokens, then fold
//! `s * acc` into a vector total and `b * sum(x)` into a scalar; one horizontal sum per output
//! at the end. Only the summation order differs from the scalar path.

#![allow(clippy::too_many_arguments)]
// Index loops over register arrays are deliberate (they unroll into named registers).
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::isa::Isa;
use crate::packed::{PackedLinear, Store, Vals, CHUNK, TB, TILE_ROWS};

/// Fully unroll a 4-iteration loop with a literal index, so accumulator arrays indexed by it
/// are promoted to registers (LLVM does not always unroll the generic loops itself).
/// `TILE_ROWS` and `TB` are both 4.
macro_rules! unroll4 {
    ($i:ident => $body:block) => {{
        {
            let $i = 0usize;
            $body
        }
        {
            let $i = 1usize;
            $body
        }
        {
            let $i = 2usize;
            $body
        }
        {
            let $i = 3usize;
            $body
        }
    }};
}
const _: () = assert!(TILE_ROWS == 4 && TB == 4);

/// Software prefetch distance in bytes of the AVX2 FP8 kernel's weight stream (4 KiB, as the
/// integer-activation kernels' `act8::avx2::PREFETCH`).
const PREFETCH: usize = 4096;

/// Decoder kinds (const-generic selector).
const K_B4_INT: u8 = 0;
const K_B4_LUT: u8 = 1;
const K_B2_INT: u8 = 2;
const K_B3_INT: u8 = 3;
const K_B8_INT: u8 = 4;
const K_B8_E4M3: u8 = 5;
const K_B8_E5M2: u8 = 6;

fn kind(pk: &PackedLinear) -> u8 {
    match (pk.store, pk.vals) {
        (Store::B4, Vals::Int) => K_B4_INT,
        (Store::B4, _) => K_B4_LUT,
        (Store::B2, _) => K_B2_INT,
        (Store::B3, _) => K_B3_INT,
        (Store::B8, Vals::E4M3) => K_B8_E4M3,
        (Store::B8, Vals::E5M2) => K_B8_E5M2,
        (Store::B8, _) => K_B8_INT,
    }
}

// ---------------------------------------------------------------------------------------------
// AVX2: a chunk of 16 codes decodes into two __m256 of 8 values.

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dec2<const K: u8>(p: *const u8, lut_lo: __m256, lut_hi: __m256) -> (__m256, __m256) {
    match K {
        K_B4_INT | K_B4_LUT => {
            // SAFETY: the caller guarantees 8 readable bytes at p (one 4-bit chunk).
            let q = _mm256_set1_epi64x(unsafe { (p as *const i64).read_unaligned() });
            let lo = _mm256_srlv_epi32(q, _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12));
            let hi = _mm256_srlv_epi32(q, _mm256_setr_epi32(16, 16, 20, 20, 24, 24, 28, 28));
            if K == K_B4_INT {
                let m = _mm256_set1_epi32(15);
                (
                    _mm256_cvtepi32_ps(_mm256_and_si256(lo, m)),
                    _mm256_cvtepi32_ps(_mm256_and_si256(hi, m)),
                )
            } else {
                // unmasked: vpermps uses index bits 0..2, the blend bit 3 (moved to the sign)
                (lut16(lut_lo, lut_hi, lo), lut16(lut_lo, lut_hi, hi))
            }
        }
        K_B2_INT | K_B3_INT => {
            // SAFETY: the caller guarantees 4 (2-bit) or 6 (3-bit) readable bytes at p.
            let q = _mm256_set1_epi32(unsafe { (p as *const i32).read_unaligned() });
            let m = _mm256_set1_epi32(3);
            let mut lo = _mm256_and_si256(
                _mm256_srlv_epi32(q, _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
                m,
            );
            let mut hi = _mm256_and_si256(
                _mm256_srlv_epi32(q, _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30)),
                m,
            );
            if K == K_B3_INT {
                // SAFETY: bytes 4..6 of a 3-bit chunk.
                let h =
                    _mm256_set1_epi32(unsafe { (p.add(4) as *const u16).read_unaligned() } as i32);
                let one = _mm256_set1_epi32(1);
                let hl = _mm256_and_si256(
                    _mm256_srlv_epi32(h, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
                    one,
                );
                let hh = _mm256_and_si256(
                    _mm256_srlv_epi32(h, _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15)),
                    one,
                );
                lo = _mm256_or_si256(lo, _mm256_slli_epi32(hl, 2));
                hi = _mm256_or_si256(hi, _mm256_slli_epi32(hh, 2));
            }
            (_mm256_cvtepi32_ps(lo), _mm256_cvtepi32_ps(hi))
        }
        K_B8_INT => {
            // SAFETY: the caller guarantees 16 readable bytes at p.
            let a = unsafe { _mm_loadl_epi64(p as *const __m128i) };
            let b = unsafe { _mm_loadl_epi64(p.add(8) as *const __m128i) };
            (
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(a)),
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)),
            )
        }
        _ => {
            // SAFETY: the caller guarantees 16 readable bytes at p.
            let v = unsafe { _mm_loadu_si128(p as *const __m128i) };
            let h = if K == K_B8_E4M3 {
                _mm256_and_si256(
                    _mm256_slli_epi16(_mm256_cvtepi8_epi16(v), 7),
                    _mm256_set1_epi16(0xBF80u16 as i16),
                )
            } else {
                _mm256_slli_epi16(_mm256_cvtepu8_epi16(v), 8)
            };
            (
                _mm256_cvtph_ps(_mm256_castsi256_si128(h)),
                _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)),
            )
        }
    }
}

/// The 16 activations at columns `col..col + 16` of tokens `t0..t0 + NT` (row stride `pcols`),
/// as two vectors of 8 per token.
///
/// # Safety
/// AVX2 available; `(t0 + NT - 1) * pcols + col + 16 <= xp.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_x16<const NT: usize>(
    xp: &[f32],
    t0: usize,
    pcols: usize,
    col: usize,
) -> ([__m256; NT], [__m256; NT]) {
    let mut xl = [_mm256_setzero_ps(); NT];
    let mut xh = [_mm256_setzero_ps(); NT];
    unroll4!(t => {
        if t < NT {
            let o = (t0 + t) * pcols + col;
            debug_assert!(o + 16 <= xp.len());
            // SAFETY: o + 16 <= xp.len() (caller).
            unsafe {
                xl[t] = _mm256_loadu_ps(xp.as_ptr().add(o));
                xh[t] = _mm256_loadu_ps(xp.as_ptr().add(o + 8));
            }
        }
    });
    (xl, xh)
}

/// 16-entry table lookup for 8 codes in `0..16`: two 8-entry `vpermps` and a blend on bit 3.
/// (A plain function, not a closure: closures do not inherit `target_feature`.)
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn lut16(lut_lo: __m256, lut_hi: __m256, i: __m256i) -> __m256 {
    let a = _mm256_permutevar8x32_ps(lut_lo, i);
    let b = _mm256_permutevar8x32_ps(lut_hi, i);
    _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(i, 28)))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// # Safety
/// AVX2, FMA and F16C must be available; `tile < pk.ntiles`; `xp` holds at least
/// `(t0 + NT) * pk.pcols` floats; `xs` holds `(t0 + NT) * nseg` floats.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile2<const K: u8, const NT: usize>(
    pk: &PackedLinear,
    tile: usize,
    xp: &[f32],
    xs: &[f32],
    t0: usize,
    out: &mut [[f32; TILE_ROWS]; TB],
) {
    let cb = pk.store.chunk_bytes();
    let hdr = pk.hdr;
    let with_bias = pk.has_bias();
    let nseg = pk.segs.len();
    let pcols = pk.pcols;
    debug_assert!(
        tile < pk.ntiles && xp.len() >= (t0 + NT) * pcols && xs.len() >= (t0 + NT) * nseg
    );
    // SAFETY: tile < ntiles, so the tile's tile_bytes bytes lie inside pk.data.
    let base = unsafe { pk.data.as_ptr().add(tile * pk.tile_bytes) };
    // SAFETY: vtab has 256 entries; the first 16 are the 4-bit table.
    let (lut_lo, lut_hi) = unsafe {
        (
            _mm256_loadu_ps(pk.vtab.as_ptr()),
            _mm256_loadu_ps(pk.vtab.as_ptr().add(8)),
        )
    };
    let mut vacc = [[_mm256_setzero_ps(); TILE_ROWS]; NT];
    let mut bias = [[0f32; TILE_ROWS]; NT];
    for (k, seg) in pk.segs.iter().enumerate() {
        let hoff = tile * pk.tile_bytes + seg.byte_off;
        // SAFETY: segment headers and chunks lie inside the tile (layout built by PackedLinear::new).
        let h = unsafe { base.add(seg.byte_off) };
        let mut g = [[_mm256_setzero_ps(); TILE_ROWS]; NT];
        for j in 0..seg.chunks {
            // SAFETY: segments tile 0..pcols, so the chunk's 16 columns lie inside every token row.
            let (xl, xh) = unsafe { load_x16::<NT>(xp, t0, pcols, seg.col0 + j * CHUNK) };
            unroll4!(r => {
                // SAFETY: chunk (j, r) of this segment is inside the tile.
                let (lo, hi) =
                    unsafe { dec2::<K>(h.add(hdr + (j * TILE_ROWS + r) * cb), lut_lo, lut_hi) };
                unroll4!(t => {
                    if t < NT {
                        g[t][r] = _mm256_fmadd_ps(lo, xl[t], g[t][r]);
                        g[t][r] = _mm256_fmadd_ps(hi, xh[t], g[t][r]);
                    }
                });
            });
        }
        let sc = pk.scales4(hoff);
        unroll4!(r => {
            let sv = _mm256_set1_ps(sc[r]);
            unroll4!(t => {
                if t < NT {
                    vacc[t][r] = _mm256_fmadd_ps(g[t][r], sv, vacc[t][r]);
                }
            });
        });
        if with_bias {
            for r in 0..TILE_ROWS {
                let (_, b) = pk.sb(hoff, r);
                for t in 0..NT {
                    bias[t][r] += b * xs[(t0 + t) * nseg + k];
                }
            }
        }
    }
    for t in 0..NT {
        for r in 0..TILE_ROWS {
            out[t][r] = hsum256(vacc[t][r]) + bias[t][r];
        }
    }
}

/// # Safety
/// AVX2, FMA and F16C must be available; `tile < pk.ntiles`; `w.len() >= 4 * pk.pcols`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequant2<const K: u8>(pk: &PackedLinear, tile: usize, w: &mut [f32]) {
    let cb = pk.store.chunk_bytes();
    let hdr = pk.hdr;
    assert!(tile < pk.ntiles && w.len() >= TILE_ROWS * pk.pcols);
    // SAFETY: as in tile2.
    let base = unsafe { pk.data.as_ptr().add(tile * pk.tile_bytes) };
    // SAFETY: vtab has 256 entries.
    let (lut_lo, lut_hi) = unsafe {
        (
            _mm256_loadu_ps(pk.vtab.as_ptr()),
            _mm256_loadu_ps(pk.vtab.as_ptr().add(8)),
        )
    };
    for seg in &pk.segs {
        let hoff = tile * pk.tile_bytes + seg.byte_off;
        // SAFETY: inside the tile.
        let h = unsafe { base.add(seg.byte_off) };
        for r in 0..TILE_ROWS {
            let (s, b) = pk.sb(hoff, r);
            let (sv, bv) = (_mm256_set1_ps(s), _mm256_set1_ps(b));
            for j in 0..seg.chunks {
                // SAFETY: chunk inside the tile; destination r*pcols + col0 + j*16 + 16 <= 4*pcols.
                unsafe {
                    let (lo, hi) = dec2::<K>(h.add(hdr + (j * TILE_ROWS + r) * cb), lut_lo, lut_hi);
                    let d = w.as_mut_ptr().add(r * pk.pcols + seg.col0 + j * CHUNK);
                    _mm256_storeu_ps(d, _mm256_fmadd_ps(lo, sv, bv));
                    _mm256_storeu_ps(d.add(8), _mm256_fmadd_ps(hi, sv, bv));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// AVX2 FP8 E4M3 without `vcvtph2ps` (2 uops at half rate on Zen): a code becomes the f32 bit
// pattern `sign << 31 | (code & 0x7f) << 20`, which equals `e4m3(code) * 2^-120` exactly (normal
// codes are normal f32, the 7 subnormal magnitudes become f32 subnormals of the same value).
// So that the products stay far from the f32 subnormal range, each token's activations are
// multiplied by a power of two `2^k` with `max|x| * 2^k` in `[2^63, 2^64)` (exact), and the
// output by `2^(112 - k)` (the packed scale already holds the factor 256 of the f16 form).

/// `2^k` for a token of activations whose largest magnitude is `amax`, and the matching output
/// factor `2^(112 - k)` (see above). Zero, NaN or Inf: `k = 0`.
pub(crate) fn e4m3_x_scale(amax: f32) -> (f32, f32) {
    if !(amax.is_finite() && amax > 0.0) {
        return (1.0, pow2(112));
    }
    let e = if amax >= f32::MIN_POSITIVE {
        ((amax.to_bits() >> 23) as i32) - 127
    } else {
        amax.log2().floor() as i32
    };
    let k = (63 - e).clamp(-15, 127);
    (pow2(k), pow2(112 - k))
}

/// `2^k` for `k` in `-126..=127` (exact).
fn pow2(k: i32) -> f32 {
    f32::from_bits(((k + 127) as u32) << 23)
}

/// 8 E4M3 codes (8 bytes at `p`) as `e4m3 * 2^-120`.
///
/// # Safety
/// AVX2 available; 8 readable bytes at `p`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dec_e4m3x8(p: *const u8) -> __m256 {
    // SAFETY: 8 readable bytes at p (caller).
    let v = unsafe { _mm_loadl_epi64(p as *const __m128i) };
    let d = _mm256_slli_epi32::<20>(_mm256_cvtepi8_epi32(v));
    _mm256_castsi256_ps(_mm256_and_si256(
        d,
        _mm256_set1_epi32(0x87F0_0000u32 as i32),
    ))
}

/// [`tile2`] for FP8 E4M3 weights with [`dec_e4m3x8`] and scaled activations: `xp` holds
/// `x * 2^k_t`, `fo[t] = 2^(112 - k_t)`; no bias terms (FP8 has none). Two accumulators
/// per row and token (low and high half of a chunk) when NT <= 2.
///
/// # Safety
/// AVX2, FMA and F16C available; `pk` is FP8 E4M3 (`Store::B8`, `Vals::E4M3`);
/// `tile < pk.ntiles`; `xp` holds at least `(t0 + NT) * pk.pcols` floats; `fo.len() >= t0 + NT`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile2_e4m3<const NT: usize>(
    pk: &PackedLinear,
    tile: usize,
    xp: &[f32],
    fo: &[f32],
    t0: usize,
    out: &mut [[f32; TILE_ROWS]; TB],
) {
    const CB: usize = 16;
    let hdr = pk.hdr;
    let pcols = pk.pcols;
    debug_assert!(tile < pk.ntiles && xp.len() >= (t0 + NT) * pcols && fo.len() >= t0 + NT);
    // SAFETY: tile < ntiles, so the tile's tile_bytes bytes lie inside pk.data.
    let base = unsafe { pk.data.as_ptr().add(tile * pk.tile_bytes) };
    let mut vacc = [[_mm256_setzero_ps(); TILE_ROWS]; NT];
    for seg in pk.segs.iter() {
        let hoff = tile * pk.tile_bytes + seg.byte_off;
        // SAFETY: segment header and chunks lie inside the tile (layout of PackedLinear::new).
        let h = unsafe { base.add(seg.byte_off + hdr) };
        let mut g = [[_mm256_setzero_ps(); TILE_ROWS]; NT];
        let mut g2 = [[_mm256_setzero_ps(); TILE_ROWS]; NT];
        for j in 0..seg.chunks {
            let c = h.wrapping_add(j * TILE_ROWS * CB);
            // one 64-byte line per chunk, PREFETCH bytes ahead (never faults)
            _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(PREFETCH) as *const i8);
            // SAFETY: segments tile 0..pcols, so the chunk's 16 columns lie inside every token row.
            let (xl, xh) = unsafe { load_x16::<NT>(xp, t0, pcols, seg.col0 + j * CHUNK) };
            unroll4!(r => {
                // SAFETY: row r of chunk j: 16 bytes inside the segment.
                let (lo, hi) = unsafe { (dec_e4m3x8(c.add(r * CB)), dec_e4m3x8(c.add(r * CB + 8))) };
                unroll4!(t => {
                    if t < NT {
                        g[t][r] = _mm256_fmadd_ps(lo, xl[t], g[t][r]);
                        if NT <= 2 {
                            g2[t][r] = _mm256_fmadd_ps(hi, xh[t], g2[t][r]);
                        } else {
                            g[t][r] = _mm256_fmadd_ps(hi, xh[t], g[t][r]);
                        }
                    }
                });
            });
        }
        let sc = pk.scales4(hoff);
        unroll4!(r => {
            let sv = _mm256_set1_ps(sc[r]);
            unroll4!(t => {
                if t < NT {
                    let gg = if NT <= 2 { _mm256_add_ps(g[t][r], g2[t][r]) } else { g[t][r] };
                    vacc[t][r] = _mm256_fmadd_ps(gg, sv, vacc[t][r]);
                }
            });
        });
    }
    for t in 0..NT {
        for r in 0..TILE_ROWS {
            // SAFETY: AVX2 available (this function's target features).
            out[t][r] = unsafe { hsum256(vacc[t][r]) } * fo[t0 + t];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// AVX-512: a chunk of 16 codes decodes into one __m512.

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[inline]
unsafe fn dec5<const K: u8>(p: *const u8, lut: __m512) -> __m512 {
    match K {
        K_B4_INT | K_B4_LUT => {
            // SAFETY: 8 readable bytes at p.
            let q = _mm512_set1_epi64(unsafe { (p as *const i64).read_unaligned() });
            let sh = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
            // No mask needed: `vpermps zmm` only looks at the low 4 bits of each index, and the
            // table (vtab[0..16]) is the code value itself for INT, so one shuffle replaces
            // mask + convert (port 5 instead of two port-0 uops).
            _mm512_permutexvar_ps(_mm512_srlv_epi32(q, sh), lut)
        }
        K_B2_INT | K_B3_INT => {
            // SAFETY: 4 (or 6) readable bytes at p.
            let q = _mm512_set1_epi32(unsafe { (p as *const i32).read_unaligned() });
            let sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let mut i = _mm512_and_si512(_mm512_srlv_epi32(q, sh), _mm512_set1_epi32(3));
            if K == K_B3_INT {
                // SAFETY: bytes 4..6 of a 3-bit chunk.
                let h =
                    _mm512_set1_epi32(unsafe { (p.add(4) as *const u16).read_unaligned() } as i32);
                let sh1 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
                let hb = _mm512_and_si512(_mm512_srlv_epi32(h, sh1), _mm512_set1_epi32(1));
                i = _mm512_or_si512(i, _mm512_slli_epi32(hb, 2));
            }
            _mm512_cvtepi32_ps(i)
        }
        K_B8_INT => {
            // SAFETY: 16 readable bytes at p.
            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(unsafe {
                _mm_loadu_si128(p as *const __m128i)
            }))
        }
        _ => {
            // SAFETY: 16 readable bytes at p.
            let v = unsafe { _mm_loadu_si128(p as *const __m128i) };
            let h = if K == K_B8_E4M3 {
                _mm256_and_si256(
                    _mm256_slli_epi16(_mm256_cvtepi8_epi16(v), 7),
                    _mm256_set1_epi16(0xBF80u16 as i16),
                )
            } else {
                _mm256_slli_epi16(_mm256_cvtepu8_epi16(v), 8)
            };
            _mm512_cvtph_ps(h)
        }
    }
}

/// # Safety
/// AVX-512 F/BW/VL, AVX2, FMA, F16C available; same bounds as [`tile2`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn tile5<const K: u8, const NT: usize>(
    pk: &PackedLinear,
    tile: usize,
    xp: &[f32],
    xs: &[f32],
    t0: usize,
    out: &mut [[f32; TILE_ROWS]; TB],
) {
    let cb = pk.store.chunk_bytes();
    let hdr = pk.hdr;
    let with_bias = pk.has_bias();
    let nseg = pk.segs.len();
    let pcols = pk.pcols;
    debug_assert!(
        tile < pk.ntiles && xp.len() >= (t0 + NT) * pcols && xs.len() >= (t0 + NT) * nseg
    );
    // SAFETY: tile < ntiles.
    let base = unsafe { pk.data.as_ptr().add(tile * pk.tile_bytes) };
    // SAFETY: vtab has 256 entries.
    let lut = unsafe { _mm512_loadu_ps(pk.vtab.as_ptr()) };
    let mut vacc = [[_mm512_setzero_ps(); TILE_ROWS]; NT];
    let mut bias = [[0f32; TILE_ROWS]; NT];
    for (k, seg) in pk.segs.iter().enumerate() {
        let hoff = tile * pk.tile_bytes + seg.byte_off;
        // SAFETY: inside the tile.
        let h = unsafe { base.add(seg.byte_off) };
        let mut g = [[_mm512_setzero_ps(); TILE_ROWS]; NT];
        for j in 0..seg.chunks {
            let mut xv = [_mm512_setzero_ps(); NT];
            unroll4!(t => {
                if t < NT {
                    // SAFETY: in bounds as in tile2.
                    xv[t] = unsafe {
                        _mm512_loadu_ps(xp.as_ptr().add((t0 + t) * pcols + seg.col0 + j * CHUNK))
                    };
                }
            });
            unroll4!(r => {
                // SAFETY: chunk inside the tile.
                let v = unsafe { dec5::<K>(h.add(hdr + (j * TILE_ROWS + r) * cb), lut) };
                unroll4!(t => {
                    if t < NT {
                        g[t][r] = _mm512_fmadd_ps(v, xv[t], g[t][r]);
                    }
                });
            });
        }
        let sc = pk.scales4(hoff);
        unroll4!(r => {
            let sv = _mm512_set1_ps(sc[r]);
            unroll4!(t => {
                if t < NT {
                    vacc[t][r] = _mm512_fmadd_ps(g[t][r], sv, vacc[t][r]);
                }
            });
        });
        if with_bias {
            for r in 0..TILE_ROWS {
                let (_, b) = pk.sb(hoff, r);
                for t in 0..NT {
                    bias[t][r] += b * xs[(t0 + t) * nseg + k];
                }
            }
        }
    }
    for t in 0..NT {
        for r in 0..TILE_ROWS {
            out[t][r] = _mm512_reduce_add_ps(vacc[t][r]) + bias[t][r];
        }
    }
}

/// # Safety
/// As [`tile5`]; `w.len() >= 4 * pk.pcols`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn dequant5<const K: u8>(pk: &PackedLinear, tile: usize, w: &mut [f32]) {
    let cb = pk.store.chunk_bytes();
    let hdr = pk.hdr;
    assert!(tile < pk.ntiles && w.len() >= TILE_ROWS * pk.pcols);
    // SAFETY: tile < ntiles.
    let base = unsafe { pk.data.as_ptr().add(tile * pk.tile_bytes) };
    // SAFETY: vtab has 256 entries.
    let lut = unsafe { _mm512_loadu_ps(pk.vtab.as_ptr()) };
    for seg in &pk.segs {
        let hoff = tile * pk.tile_bytes + seg.byte_off;
        // SAFETY: inside the tile.
        let h = unsafe { base.add(seg.byte_off) };
        for r in 0..TILE_ROWS {
            let (s, b) = pk.sb(hoff, r);
            let (sv, bv) = (_mm512_set1_ps(s), _mm512_set1_ps(b));
            for j in 0..seg.chunks {
                // SAFETY: chunk inside the tile; destination inside w (checked above).
                unsafe {
                    let v = dec5::<K>(h.add(hdr + (j * TILE_ROWS + r) * cb), lut);
                    let d = w.as_mut_ptr().add(r * pk.pcols + seg.col0 + j * CHUNK);
                    _mm512_storeu_ps(d, _mm512_fmadd_ps(v, sv, bv));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dispatch.

macro_rules! by_kind {
    ($k:expr, $f:ident, $($args:tt)*) => {
        match $k {
            K_B4_INT => $f::<K_B4_INT>($($args)*),
            K_B4_LUT => $f::<K_B4_LUT>($($args)*),
            K_B2_INT => $f::<K_B2_INT>($($args)*),
            K_B3_INT => $f::<K_B3_INT>($($args)*),
            K_B8_INT => $f::<K_B8_INT>($($args)*),
            K_B8_E4M3 => $f::<K_B8_E4M3>($($args)*),
            _ => $f::<K_B8_E5M2>($($args)*),
        }
    };
}

macro_rules! by_kind_nt {
    ($k:expr, $nt:expr, $f:ident, $($args:tt)*) => {
        match ($k, $nt) {
            (K_B4_INT, 1) => $f::<K_B4_INT, 1>($($args)*),
            (K_B4_INT, 2) => $f::<K_B4_INT, 2>($($args)*),
            (K_B4_INT, 3) => $f::<K_B4_INT, 3>($($args)*),
            (K_B4_INT, _) => $f::<K_B4_INT, 4>($($args)*),
            (K_B4_LUT, 1) => $f::<K_B4_LUT, 1>($($args)*),
            (K_B4_LUT, 2) => $f::<K_B4_LUT, 2>($($args)*),
            (K_B4_LUT, 3) => $f::<K_B4_LUT, 3>($($args)*),
            (K_B4_LUT, _) => $f::<K_B4_LUT, 4>($($args)*),
            (K_B2_INT, 1) => $f::<K_B2_INT, 1>($($args)*),
            (K_B2_INT, 2) => $f::<K_B2_INT, 2>($($args)*),
            (K_B2_INT, 3) => $f::<K_B2_INT, 3>($($args)*),
            (K_B2_INT, _) => $f::<K_B2_INT, 4>($($args)*),
            (K_B3_INT, 1) => $f::<K_B3_INT, 1>($($args)*),
            (K_B3_INT, 2) => $f::<K_B3_INT, 2>($($args)*),
            (K_B3_INT, 3) => $f::<K_B3_INT, 3>($($args)*),
            (K_B3_INT, _) => $f::<K_B3_INT, 4>($($args)*),
            (K_B8_INT, 1) => $f::<K_B8_INT, 1>($($args)*),
            (K_B8_INT, 2) => $f::<K_B8_INT, 2>($($args)*),
            (K_B8_INT, 3) => $f::<K_B8_INT, 3>($($args)*),
            (K_B8_INT, _) => $f::<K_B8_INT, 4>($($args)*),
            (K_B8_E4M3, 1) => $f::<K_B8_E4M3, 1>($($args)*),
            (K_B8_E4M3, 2) => $f::<K_B8_E4M3, 2>($($args)*),
            (K_B8_E4M3, 3) => $f::<K_B8_E4M3, 3>($($args)*),
            (K_B8_E4M3, _) => $f::<K_B8_E4M3, 4>($($args)*),
            (_, 1) => $f::<K_B8_E5M2, 1>($($args)*),
            (_, 2) => $f::<K_B8_E5M2, 2>($($args)*),
            (_, 3) => $f::<K_B8_E5M2, 3>($($args)*),
            (_, _) => $f::<K_B8_E5M2, 4>($($args)*),
        }
    };
}

/// Run one row tile on a SIMD path. `isa` must be supported (the caller clamps it).
pub(crate) fn run_tile(
    isa: Isa,
    pk: &PackedLinear,
    tile: usize,
    xp: &[f32],
    xs: &[f32],
    t0: usize,
    tb: usize,
    out: &mut [[f32; TILE_ROWS]; TB],
) {
    let nseg = pk.segs.len();
    assert!(
        isa.supported()
            && tile < pk.ntiles
            && (1..=TB).contains(&tb)
            && xp.len() >= (t0 + tb) * pk.pcols
            && xs.len() >= (t0 + tb) * nseg
    );
    let k = kind(pk);
    match isa {
        // SAFETY: the CPU supports AVX-512 (checked by isa.supported()), bounds asserted above.
        Isa::Avx512 => unsafe { by_kind_nt!(k, tb, tile5, pk, tile, xp, xs, t0, out) },
        // SAFETY: the CPU supports AVX2+FMA+F16C, bounds asserted above.
        Isa::Avx2 => unsafe { by_kind_nt!(k, tb, tile2, pk, tile, xp, xs, t0, out) },
        Isa::Scalar => pk.tile_scalar(tile, xp, xs, t0, tb, out),
    }
}

/// [`run_tile`] for FP8 E4M3 layers on the AVX2 path ([`tile2_e4m3`]): `xp` holds the
/// activations times `2^k_t` and `fo[t]` the output factors of [`e4m3_x_scale`].
pub(crate) fn run_tile_e4m3(
    pk: &PackedLinear,
    tile: usize,
    xp: &[f32],
    fo: &[f32],
    t0: usize,
    tb: usize,
    out: &mut [[f32; TILE_ROWS]; TB],
) {
    assert!(
        Isa::Avx2.supported()
            && kind(pk) == K_B8_E4M3
            && tile < pk.ntiles
            && (1..=TB).contains(&tb)
            && xp.len() >= (t0 + tb) * pk.pcols
            && fo.len() >= t0 + tb
    );
    // SAFETY: AVX2+FMA+F16C supported, E4M3 layer and bounds asserted above.
    unsafe {
        match tb {
            1 => tile2_e4m3::<1>(pk, tile, xp, fo, t0, out),
            2 => tile2_e4m3::<2>(pk, tile, xp, fo, t0, out),
            3 => tile2_e4m3::<3>(pk, tile, xp, fo, t0, out),
            _ => tile2_e4m3::<4>(pk, tile, xp, fo, t0, out),
        }
    }
}

/// Dequantize one row tile into `w[4][pcols]` on a SIMD path.
pub(crate) fn dequant_tile(isa: Isa, pk: &PackedLinear, tile: usize, w: &mut [f32]) {
    assert!(isa.supported());
    let k = kind(pk);
    match isa {
        // SAFETY: AVX-512 supported (asserted); dequant5 checks its own bounds.
        Isa::Avx512 => unsafe { by_kind!(k, dequant5, pk, tile, w) },
        // SAFETY: AVX2+FMA+F16C supported (asserted); dequant2 checks its own bounds.
        Isa::Avx2 => unsafe { by_kind!(k, dequant2, pk, tile, w) },
        Isa::Scalar => pk.dequant_tile_scalar(tile, w),
    }
}
