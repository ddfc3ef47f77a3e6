//! The k-quant 256-element super-blocks: Q4_K, Q5_K, Q6_K.
//!
//! Quantizers follow ggml's `quantize_row_q{4,5,6}_K_ref` (no importance matrix): per
//! sub-block scale (and min) search with `make_qkx2_quants` / `make_qx_quants`, then the
//! sub-scales are themselves quantized (6-bit against max/63, or int8 against -128/max), and
//! finally every element is re-quantized against the stored (f16-rounded) scales.
//!
//! Callers have checked sizes and finiteness.

use super::{f16_bits, f16_le, f16_round, lanes, nearest_int, KQuantSearch};

const QK_K: usize = 256;
/// ggml's `GROUP_MAX_EPS`: sub-blocks whose |max| is below this count as all-zero.
pub(super) const GROUP_MAX_EPS: f32 = 1e-15;

/// Unpack sub-block `j`'s 6-bit scale and min from the 12-byte `scales` field
/// (`get_scale_min_k4`).
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Pack eight 6-bit scales and mins into the 12-byte field (inverse of [`scale_min_k4`]).
fn pack_scale_min_k4(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0x0f) | ((lm[j] & 0x0f) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
    s
}

/// ggml's `make_qkx2_quants`: asymmetric (scale, min) search for one sub-block with weights,
/// trying `nstep + 1` candidate inverse scales around `nmax / (max - min)`. Writes codes in
/// `0..=nmax` to `l`, returns `(scale, -min)`.
#[cfg(test)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32; 32],
    w: &[f32; 32],
    l: &mut [u8; 32],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = 32;
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_mad = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best_mad += w[i] * (diff * diff);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let qf = q as f32;
            sum_l += w[i] * qf;
            sum_l2 += w[i] * qf * qf;
            sum_xl += w[i] * qf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut mad = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                mad += w[i] * (diff * diff);
            }
            if mad < best_mad {
                *l = laux;
                best_mad = mad;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Per-sub-block weights `av_x + |x|` of the Q4_K/Q5_K search (`av_x` = RMS of the sub-block).
#[inline(always)]
fn k_weights(xs: &[f32; 32]) -> [f32; 32] {
    let mut sum_x2 = 0.0f32;
    for &v in xs {
        sum_x2 += v * v;
    }
    let av_x = (sum_x2 / 32.0).sqrt();
    let mut w = [0.0f32; 32];
    for (wi, &v) in w.iter_mut().zip(xs) {
        *wi = av_x + v.abs();
    }
    w
}

/// Scalar reference of the Q4_K/Q5_K sub-block search: (scales, mins, codes).
#[cfg(test)]
fn search_k_asym_ref(
    x: &[f32; QK_K],
    nmax: i32,
    rmin: f32,
    nstep: i32,
) -> ([f32; 8], [f32; 8], [u8; QK_K]) {
    let mut l = [0u8; QK_K];
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    for j in 0..8 {
        let xs: &[f32; 32] = x[32 * j..32 * j + 32].try_into().expect("32");
        let w = k_weights(xs);
        let lj: &mut [u8; 32] = (&mut l[32 * j..32 * j + 32]).try_into().expect("32");
        (scales[j], mins[j]) = make_qkx2_quants(nmax, xs, &w, lj, rmin, 0.1, nstep);
    }
    (scales, mins, l)
}

/// The same search with the sub-blocks side by side in SIMD lanes ([`lanes::qkx2_search`]),
/// `G` at a time.
#[inline(always)]
fn search_k_asym(
    x: &[f32; QK_K],
    nmax: i32,
    rmin: f32,
    nstep: i32,
) -> ([f32; 8], [f32; 8], [u8; QK_K]) {
    const G: usize = 8;
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    let mut l = [0u8; QK_K];
    for g in 0..8 / G {
        let mut xt = [[0.0f32; G]; 32];
        let mut wt = [[0.0f32; G]; 32];
        for k in 0..G {
            let j = g * G + k;
            let xs: &[f32; 32] = x[32 * j..32 * j + 32].try_into().expect("32");
            let w = k_weights(xs);
            for i in 0..32 {
                xt[i][k] = xs[i];
                wt[i][k] = w[i];
            }
        }
        let mut lt = [[0.0f32; G]; 32];
        let (s, m) = lanes::qkx2_search(nmax as f32, &xt, &wt, &mut lt, rmin, 0.1, nstep);
        for k in 0..G {
            let j = g * G + k;
            scales[j] = s[k];
            mins[j] = m[k];
            for i in 0..32 {
                l[32 * j + i] = lt[i][k] as u8;
            }
        }
    }
    (scales, mins, l)
}

/// A super-block's eight sub-blocks side by side (`xt[i][j]` = element i of sub-block j) and
/// their [`k_weights`] in the same layout.
#[inline(always)]
fn lanes_with_weights(x: &[f32; QK_K]) -> ([[f32; 8]; 32], [[f32; 8]; 32]) {
    let mut xt = [[0.0f32; 8]; 32];
    let mut wt = [[0.0f32; 8]; 32];
    for j in 0..8 {
        let xs: &[f32; 32] = x[32 * j..32 * j + 32].try_into().expect("32");
        let w = k_weights(xs);
        for i in 0..32 {
            xt[i][j] = xs[i];
            wt[i][j] = w[i];
        }
    }
    (xt, wt)
}

/// [`search_k_asym`] with the AVX2 lane search ([`lanes::avx2::qkx2_search`]); super-blocks
/// whose values leave its exact range take the portable path.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn search_k_asym_avx2(
    simd: pulp::x86::V3,
    x: &[f32; QK_K],
    nmax: i32,
    rmin: f32,
    nstep: i32,
) -> ([f32; 8], [f32; 8], [u8; QK_K]) {
    let (xt, wt) = lanes_with_weights(x);
    let mut lt = [[0.0f32; 8]; 32];
    let Some((scales, mins)) =
        lanes::avx2::qkx2_search(simd, nmax as f32, &xt, &wt, &mut lt, rmin, 0.1, nstep)
    else {
        return search_k_asym(x, nmax, rmin, nstep);
    };
    let mut l = [0u8; QK_K];
    for j in 0..8 {
        for i in 0..32 {
            l[32 * j + i] = lt[i][j] as u8;
        }
    }
    (scales, mins, l)
}

/// Shared body of the Q4_K / Q5_K quantizers: returns (d, dmin, scales[12], codes L[256]).
#[inline(always)]
/// With `exact`, elements are re-quantized as ggml does, `(x + dm) / d`; without (the Fast
/// search, which is not bit-exact anyway), as `(x + dm) * (1 / d)`, one multiply instead of
/// a divide per element.
fn quant_k_asym(
    x: &[f32; QK_K],
    nmax: i32,
    searched: ([f32; 8], [f32; 8], [u8; QK_K]),
    exact: bool,
) -> (u16, u16, [u8; 12], [u8; QK_K]) {
    let (scales, mins, mut l) = searched;
    let (d_bits, dmin_bits, packed, dv, dmv) = k_scale_mins(&scales, &mins);
    for j in 0..8 {
        let (d, dm) = (dv[j], dmv[j]);
        if d == 0.0 {
            continue;
        }
        if exact {
            for ii in 0..32 {
                let q = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, nmax);
                l[32 * j + ii] = q as u8;
            }
        } else {
            let id = 1.0 / d;
            for ii in 0..32 {
                let q = nearest_int((x[32 * j + ii] + dm) * id).clamp(0, nmax);
                l[32 * j + ii] = q as u8;
            }
        }
    }
    (
        u16::from_le_bytes(d_bits),
        u16::from_le_bytes(dmin_bits),
        packed,
        l,
    )
}

/// The 6-bit sub-block scales and mins against `max/63` (ggml's order of operations): f16 bits
/// of `d` and `dmin`, the packed 12-byte field, and each sub-block's decoded `d * sc` and
/// `dmin * m`.
#[allow(clippy::type_complexity)]
#[inline(always)]
fn k_scale_mins(
    scales: &[f32; 8],
    mins: &[f32; 8],
) -> ([u8; 2], [u8; 2], [u8; 12], [f32; 8], [f32; 8]) {
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..8 {
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        // C stores nearest_int into uint8_t, then MIN(63, .).
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    let packed = pack_scale_min_k4(&ls, &lm);
    let d_bits = f16_bits(max_scale / 63.0);
    let dmin_bits = f16_bits(max_min / 63.0);
    let d_all = f16_le(d_bits[0], d_bits[1]);
    let dmin_all = f16_le(dmin_bits[0], dmin_bits[1]);
    let mut d = [0f32; 8];
    let mut dm = [0f32; 8];
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        d[j] = d_all * sc as f32;
        dm[j] = dmin_all * m as f32;
    }
    (d_bits, dmin_bits, packed, d, dm)
}

/// Q4_K: `d`, `dmin`, `scales[12]`, `qs[128]` (per 64 elements: 32 bytes, low nibbles = first
/// 32, high nibbles = next 32); x = d·sc·q − dmin·m.
pub(super) fn dequant_q4_k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(144).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_le(b[0], b[1]);
        let dmin = f16_le(b[2], b[3]);
        let sc: &[u8; 12] = b[4..16].try_into().expect("12");
        let qs = &b[16..144];
        for c in 0..4 {
            let (s1, m1) = scale_min_k4(2 * c, sc);
            let (s2, m2) = scale_min_k4(2 * c + 1, sc);
            let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
            let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
            let q: &[u8; 32] = qs[32 * c..32 * c + 32].try_into().expect("32");
            let yc: &mut [f32; 64] = (&mut y[64 * c..64 * c + 64]).try_into().expect("64");
            let (lo, hi) = yc.split_at_mut(32);
            for l in 0..32 {
                lo[l] = d1 * (q[l] & 0x0f) as f32 - m1;
                hi[l] = d2 * (q[l] >> 4) as f32 - m2;
            }
        }
    }
}

/// A Q4_K/Q5_K sub-block search: `(x, nmax, rmin, nstep)` -> (scales, mins, codes). A trait
/// (not a function pointer) so the search is inlined into the runtime-dispatched body.
trait KSearch: Copy {
    /// Whether this is ggml's search (then the final re-quantization is ggml's too).
    const EXACT: bool;
    fn search(self, x: &[f32; QK_K], nmax: i32, rmin: f32, nstep: i32) -> SearchOut;
}

type SearchOut = ([f32; 8], [f32; 8], [u8; QK_K]);

/// The portable lane search ([`search_k_asym`]).
#[derive(Clone, Copy)]
struct Portable;

impl KSearch for Portable {
    const EXACT: bool = true;
    #[inline(always)]
    fn search(self, x: &[f32; QK_K], nmax: i32, rmin: f32, nstep: i32) -> SearchOut {
        search_k_asym(x, nmax, rmin, nstep)
    }
}

/// The AVX2 lane search ([`search_k_asym_avx2`]).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Avx2(pulp::x86::V3);

#[cfg(target_arch = "x86_64")]
impl KSearch for Avx2 {
    const EXACT: bool = true;
    #[inline(always)]
    fn search(self, x: &[f32; QK_K], nmax: i32, rmin: f32, nstep: i32) -> SearchOut {
        search_k_asym_avx2(self.0, x, nmax, rmin, nstep)
    }
}

/// One quantizer call as a `pulp` operation. A struct with an `#[inline(always)]` `call`
/// rather than a closure: a closure's `FnOnce` shim is not always-inline, and once LLVM
/// declines to inline it into the target-feature function, every intrinsic inside becomes an
/// out-of-line call (measured: 5x slower than no SIMD at all).
#[cfg(target_arch = "x86_64")]
struct KQuantRun<'a, S: KSearch> {
    x: &'a [f32],
    out: &'a mut [u8],
    search: S,
    /// Q5_K (else Q4_K).
    five: bool,
}

#[cfg(target_arch = "x86_64")]
impl<S: KSearch> pulp::NullaryFnOnce for KQuantRun<'_, S> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        if self.five {
            quant_q5_k_with(self.x, self.out, self.search)
        } else {
            quant_q4_k_with(self.x, self.out, self.search)
        }
    }
}

/// [`KQuantSearch::Fast`]: [`lanes::qkx_fast`] with this many refits.
const FAST_ITERS: usize = 2;

/// The sub-block search of [`KQuantSearch::Fast`] (not ggml's; see [`lanes::qkx_fast`]).
#[derive(Clone, Copy)]
struct Fast;

impl KSearch for Fast {
    const EXACT: bool = false;
    #[inline(always)]
    fn search(self, x: &[f32; QK_K], nmax: i32, _rmin: f32, _nstep: i32) -> SearchOut {
        let (scales, mins) = lanes::qkx_fast(nmax as f32, &lanes_of(x), FAST_ITERS);
        (scales, mins, [0u8; QK_K])
    }
}

/// [`Fast`] in explicit AVX2 ([`lanes::avx2::qkx_fast`]; same bits).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct FastAvx2(pulp::x86::V3);

#[cfg(target_arch = "x86_64")]
impl KSearch for FastAvx2 {
    const EXACT: bool = false;
    #[inline(always)]
    fn search(self, x: &[f32; QK_K], nmax: i32, _rmin: f32, _nstep: i32) -> SearchOut {
        let (scales, mins) = lanes::avx2::qkx_fast(self.0, nmax as f32, &lanes_of(x), FAST_ITERS);
        (scales, mins, [0u8; QK_K])
    }
}

/// A super-block's eight sub-blocks side by side: `xt[i][j]` = element i of sub-block j.
#[inline(always)]
fn lanes_of(x: &[f32; QK_K]) -> [[f32; 8]; 32] {
    let mut xt = [[0.0f32; 8]; 32];
    for j in 0..8 {
        for i in 0..32 {
            xt[i][j] = x[32 * j + i];
        }
    }
    xt
}

/// Q4_K (`five = false`) or Q5_K quantization of whole super-blocks with the given search,
/// under AVX2 where the CPU has it.
fn quant_k(x: &[f32], out: &mut [u8], five: bool, search: KQuantSearch) {
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = pulp::x86::V3::try_new() {
        return match search {
            KQuantSearch::Reference => simd.vectorize(KQuantRun {
                x,
                out,
                search: Avx2(simd),
                five,
            }),
            KQuantSearch::Fast if !five => {
                simd.vectorize(FastQ4kRun { simd, x, out });
            }
            KQuantSearch::Fast => simd.vectorize(KQuantRun {
                x,
                out,
                search: FastAvx2(simd),
                five,
            }),
        };
    }
    match (search, five) {
        (KQuantSearch::Reference, false) => quant_q4_k_with(x, out, Portable),
        (KQuantSearch::Reference, true) => quant_q5_k_with(x, out, Portable),
        (KQuantSearch::Fast, false) => quant_q4_k_with(x, out, Fast),
        (KQuantSearch::Fast, true) => quant_q5_k_with(x, out, Fast),
    }
}

/// Q4_K with the Fast search, all in AVX2: the super-block transposed to sub-block lanes with
/// 8x8 shuffles, [`lanes::avx2::qkx_fast`], and the final re-quantization and nibble packing
/// eight elements at a time (the same operations as [`quant_k_asym`] without `exact`, so the
/// same bits as the portable Fast path).
#[cfg(target_arch = "x86_64")]
struct FastQ4kRun<'a> {
    simd: pulp::x86::V3,
    x: &'a [f32],
    out: &'a mut [u8],
}

#[cfg(target_arch = "x86_64")]
impl pulp::NullaryFnOnce for FastQ4kRun<'_> {
    /// Largest magnitude bits of the input (`>= 0x7f80_0000`: a NaN or an infinity), the
    /// finiteness check fused into the transposes (one pass over memory instead of two).
    type Output = u32;

    #[inline(always)]
    fn call(self) -> u32 {
        use core::arch::x86_64::__m256i;
        use pulp::bytemuck::cast;
        let FastQ4kRun { simd, x, out } = self;
        let (avx, a2) = (simd.avx, simd.avx2);
        let mut mag = avx._mm256_setzero_si256();
        let abs_mask = avx._mm256_set1_epi32(0x7fff_ffff);
        for (xb, b) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(144)) {
            let (rows, _) = pulp::as_arrays::<8, f32>(xb);
            // xt[i][j] = x[32 j + i]: four 8x8 transposes (row r_j = x[32 j + 8 ib..][..8])
            let mut xt = [avx._mm256_setzero_ps(); 32];
            for ib in 0..4 {
                let mut r = [avx._mm256_setzero_ps(); 8];
                for (j, rj) in r.iter_mut().enumerate() {
                    *rj = cast(rows[4 * j + ib]);
                    let m = a2._mm256_and_si256(avx._mm256_castps_si256(*rj), abs_mask);
                    mag = a2._mm256_max_epi32(mag, m);
                }
                let t0 = avx._mm256_unpacklo_ps(r[0], r[1]);
                let t1 = avx._mm256_unpackhi_ps(r[0], r[1]);
                let t2 = avx._mm256_unpacklo_ps(r[2], r[3]);
                let t3 = avx._mm256_unpackhi_ps(r[2], r[3]);
                let t4 = avx._mm256_unpacklo_ps(r[4], r[5]);
                let t5 = avx._mm256_unpackhi_ps(r[4], r[5]);
                let t6 = avx._mm256_unpacklo_ps(r[6], r[7]);
                let t7 = avx._mm256_unpackhi_ps(r[6], r[7]);
                let u0 = avx._mm256_shuffle_ps::<0x44>(t0, t2);
                let u1 = avx._mm256_shuffle_ps::<0xEE>(t0, t2);
                let u2 = avx._mm256_shuffle_ps::<0x44>(t1, t3);
                let u3 = avx._mm256_shuffle_ps::<0xEE>(t1, t3);
                let u4 = avx._mm256_shuffle_ps::<0x44>(t4, t6);
                let u5 = avx._mm256_shuffle_ps::<0xEE>(t4, t6);
                let u6 = avx._mm256_shuffle_ps::<0x44>(t5, t7);
                let u7 = avx._mm256_shuffle_ps::<0xEE>(t5, t7);
                let o = &mut xt[8 * ib..8 * ib + 8];
                o[0] = avx._mm256_permute2f128_ps::<0x20>(u0, u4);
                o[1] = avx._mm256_permute2f128_ps::<0x20>(u1, u5);
                o[2] = avx._mm256_permute2f128_ps::<0x20>(u2, u6);
                o[3] = avx._mm256_permute2f128_ps::<0x20>(u3, u7);
                o[4] = avx._mm256_permute2f128_ps::<0x31>(u0, u4);
                o[5] = avx._mm256_permute2f128_ps::<0x31>(u1, u5);
                o[6] = avx._mm256_permute2f128_ps::<0x31>(u2, u6);
                o[7] = avx._mm256_permute2f128_ps::<0x31>(u3, u7);
            }
            let xt: [[f32; 8]; 32] = cast(xt);
            let (scales, mins) = lanes::avx2::qkx_fast(simd, 15.0, &xt, FAST_ITERS);
            let (d_bits, dmin_bits, packed, d, dm) = k_scale_mins(&scales, &mins);
            b[0..2].copy_from_slice(&d_bits);
            b[2..4].copy_from_slice(&dmin_bits);
            b[4..16].copy_from_slice(&packed);
            // qs[32 c + i] = L[64 c + i] | L[64 c + 32 + i] << 4
            let order = avx._mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            for (c, qs) in b[16..144].chunks_exact_mut(32).enumerate() {
                let (j0, j1) = (2 * c, 2 * c + 1);
                let mut v = [avx._mm256_setzero_si256(); 4];
                for (k, vk) in v.iter_mut().enumerate() {
                    let lo = q4k_code(simd, rows[4 * j0 + k], d[j0], dm[j0]);
                    let hi = q4k_code(simd, rows[4 * j1 + k], d[j1], dm[j1]);
                    *vk = a2._mm256_or_si256(lo, a2._mm256_slli_epi32::<4>(hi));
                }
                let p = a2._mm256_packus_epi16(
                    a2._mm256_packus_epi32(v[0], v[1]),
                    a2._mm256_packus_epi32(v[2], v[3]),
                );
                let p = a2._mm256_permutevar8x32_epi32(p, order);
                qs.copy_from_slice(&cast::<__m256i, [u8; 32]>(p));
            }
        }
        cast::<__m256i, [i32; 8]>(mag)
            .iter()
            .fold(0u32, |a, &v| a.max(v as u32))
    }
}

/// Q4_K with [`KQuantSearch::Fast`] in AVX2 with the finiteness check fused: `Some(true)`
/// when every input is finite (`out` then holds the blocks), `Some(false)` when some is not
/// (`out` holds garbage), `None` without AVX2 (nothing done).
pub(super) fn quant_q4_k_fast_checked(x: &[f32], out: &mut [u8]) -> Option<bool> {
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = pulp::x86::V3::try_new() {
        return Some(simd.vectorize(FastQ4kRun { simd, x, out }) < 0x7f80_0000);
    }
    let _ = (x, out);
    None
}

/// Eight Q4_K codes `nearest_int((x + dm) * (1 / d)).clamp(0, 15)` (0 when `d == 0`), as the
/// Fast path of [`quant_k_asym`] computes them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn q4k_code(simd: pulp::x86::V3, x: [f32; 8], d: f32, dm: f32) -> core::arch::x86_64::__m256i {
    let (avx, a2) = (simd.avx, simd.avx2);
    if d == 0.0 {
        return avx._mm256_setzero_si256();
    }
    let t = avx._mm256_mul_ps(
        avx._mm256_add_ps(pulp::bytemuck::cast(x), avx._mm256_set1_ps(dm)),
        avx._mm256_set1_ps(1.0 / d),
    );
    let t = avx._mm256_add_ps(t, avx._mm256_set1_ps(12_582_912.0));
    let n = a2._mm256_sub_epi32(
        a2._mm256_and_si256(
            avx._mm256_castps_si256(t),
            avx._mm256_set1_epi32(0x007f_ffff),
        ),
        avx._mm256_set1_epi32(0x0040_0000),
    );
    a2._mm256_min_epi32(
        a2._mm256_max_epi32(n, avx._mm256_setzero_si256()),
        avx._mm256_set1_epi32(15),
    )
}

pub(super) fn quant_q4_k(x: &[f32], out: &mut [u8], search: KQuantSearch) {
    quant_k(x, out, false, search)
}

#[inline(always)]
fn quant_q4_k_with<S: KSearch>(x: &[f32], out: &mut [u8], search: S) {
    for (xb, b) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(144)) {
        let xb: &[f32; QK_K] = xb.try_into().expect("256");
        let (d, dmin, scales, l) = quant_k_asym(xb, 15, search.search(xb, 15, -1.0, 20), S::EXACT);
        b[0..2].copy_from_slice(&d.to_le_bytes());
        b[2..4].copy_from_slice(&dmin.to_le_bytes());
        b[4..16].copy_from_slice(&scales);
        let qs = &mut b[16..144];
        for c in 0..4 {
            for i in 0..32 {
                qs[32 * c + i] = l[64 * c + i] | (l[64 * c + 32 + i] << 4);
            }
        }
    }
}

/// Q5_K: `d`, `dmin`, `scales[12]`, `qh[32]`, `qs[128]`; the 5th bit of element 64c+l is bit
/// 2c of qh[l], of element 64c+32+l bit 2c+1.
pub(super) fn dequant_q5_k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(176).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_le(b[0], b[1]);
        let dmin = f16_le(b[2], b[3]);
        let sc: &[u8; 12] = b[4..16].try_into().expect("12");
        let qh: &[u8; 32] = b[16..48].try_into().expect("32");
        let qs = &b[48..176];
        for c in 0..4 {
            let (s1, m1) = scale_min_k4(2 * c, sc);
            let (s2, m2) = scale_min_k4(2 * c + 1, sc);
            let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
            let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
            let q: &[u8; 32] = qs[32 * c..32 * c + 32].try_into().expect("32");
            let yc: &mut [f32; 64] = (&mut y[64 * c..64 * c + 64]).try_into().expect("64");
            let (lo, hi) = yc.split_at_mut(32);
            for l in 0..32 {
                let h1 = ((qh[l] >> (2 * c)) & 1) << 4;
                let h2 = ((qh[l] >> (2 * c + 1)) & 1) << 4;
                lo[l] = d1 * ((q[l] & 0x0f) | h1) as f32 - m1;
                hi[l] = d2 * ((q[l] >> 4) | h2) as f32 - m2;
            }
        }
    }
}

pub(super) fn quant_q5_k(x: &[f32], out: &mut [u8], search: KQuantSearch) {
    quant_k(x, out, true, search)
}

#[inline(always)]
fn quant_q5_k_with<S: KSearch>(x: &[f32], out: &mut [u8], search: S) {
    for (xb, b) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(176)) {
        let xb: &[f32; QK_K] = xb.try_into().expect("256");
        let (d, dmin, scales, l) = quant_k_asym(xb, 31, search.search(xb, 31, -0.5, 15), S::EXACT);
        b[0..2].copy_from_slice(&d.to_le_bytes());
        b[2..4].copy_from_slice(&dmin.to_le_bytes());
        b[4..16].copy_from_slice(&scales);
        let (qh, qs) = b[16..176].split_at_mut(32);
        qh.fill(0);
        for c in 0..4 {
            for i in 0..32 {
                let l1 = l[64 * c + i];
                let l2 = l[64 * c + 32 + i];
                qh[i] |= ((l1 >> 4) << (2 * c)) | ((l2 >> 4) << (2 * c + 1));
                qs[32 * c + i] = (l1 & 0x0f) | ((l2 & 0x0f) << 4);
            }
        }
    }
}

/// ggml's `make_qx_quants` with `rmse_type = 1` (weights x²) and no importance matrix:
/// symmetric scale search for one 16-element group; codes `0..2·nmax` are written to `l`
/// (offset by `nmax`), the scale is returned.
#[cfg(test)]
fn make_qx_quants(nmax: i32, x: &[f32; 16], l: &mut [u8; 16]) -> f32 {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mut iscale = -nmaxf / max;
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for i in 0..16 {
        let q = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        l[i] = (q + nmax) as u8;
        let w = x[i] * x[i];
        let qf = q as f32;
        sumlx += w * x[i] * qf;
        suml2 += w * qf * qf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmaxf + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let qf = nearest_int(iscale * v).clamp(-nmax, nmax - 1) as f32;
            let w = v * v;
            sumlx += w * v * qf;
            suml2 += w * qf * qf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for i in 0..16 {
                let q = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
                l[i] = (q + nmax) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Q6_K: `ql[128]`, `qh[64]`, `scales[16]` (int8), `d` (at the end); per 128 elements,
/// q = ql nibble | 2 bits of qh, x = d·sc·(q − 32).
pub(super) fn dequant_q6_k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(210).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_le(b[208], b[209]);
        for h in 0..2 {
            let ql: &[u8; 64] = b[64 * h..64 * h + 64].try_into().expect("64");
            let qh: &[u8; 32] = b[128 + 32 * h..160 + 32 * h].try_into().expect("32");
            let sc = &b[192 + 8 * h..200 + 8 * h];
            let yh: &mut [f32; 128] = (&mut y[128 * h..128 * h + 128]).try_into().expect("128");
            for half in 0..2 {
                let s = |k: usize| d * (sc[half + 2 * k] as i8) as f32;
                let (s0, s1, s2, s3) = (s(0), s(1), s(2), s(3));
                for l in 16 * half..16 * half + 16 {
                    let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    yh[l] = s0 * q1 as f32;
                    yh[l + 32] = s1 * q2 as f32;
                    yh[l + 64] = s2 * q3 as f32;
                    yh[l + 96] = s3 * q4 as f32;
                }
            }
        }
    }
}

/// Scalar reference of the Q6_K group search: (scales, codes).
#[cfg(test)]
fn search_q6_ref(xb: &[f32]) -> ([f32; 16], [u8; QK_K]) {
    let mut l = [0u8; QK_K];
    let mut scales = [0.0f32; 16];
    for ib in 0..16 {
        let xs: &[f32; 16] = xb[16 * ib..16 * ib + 16].try_into().expect("16");
        let lb: &mut [u8; 16] = (&mut l[16 * ib..16 * ib + 16]).try_into().expect("16");
        scales[ib] = make_qx_quants(32, xs, lb);
    }
    (scales, l)
}

/// The same search with the sixteen groups side by side ([`lanes::qx_search`]).
fn search_q6(xb: &[f32]) -> ([f32; 16], [u8; QK_K]) {
    let mut xt = [[0.0f32; 16]; 16];
    for j in 0..16 {
        for i in 0..16 {
            xt[i][j] = xb[16 * j + i];
        }
    }
    let mut lt = [[0.0f32; 16]; 16];
    let scales = lanes::qx_search(32.0, &xt, &mut lt);
    let mut l = [0u8; QK_K];
    for j in 0..16 {
        for i in 0..16 {
            l[16 * j + i] = lt[i][j] as u8;
        }
    }
    (scales, l)
}

pub(super) fn quant_q6_k(x: &[f32], out: &mut [u8]) {
    quant_q6_k_with(x, out, search_q6)
}

/// A Q6_K group search: (16 group scales, 256 codes offset by 32).
type Q6Search = fn(&[f32]) -> ([f32; 16], [u8; QK_K]);

fn quant_q6_k_with(x: &[f32], out: &mut [u8], search: Q6Search) {
    for (xb, b) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(210)) {
        let (scales, mut l) = search(xb);
        let mut max_scale = 0.0f32;
        let mut max_abs_scale = 0.0f32;
        for &s in &scales {
            if s.abs() > max_abs_scale {
                max_abs_scale = s.abs();
                max_scale = s;
            }
        }
        b.fill(0);
        if max_abs_scale < GROUP_MAX_EPS {
            continue; // all-zero block: every byte 0, d = +0
        }
        let iscale = -128.0 / max_scale;
        let d_bits = f16_bits(1.0 / iscale);
        b[208..210].copy_from_slice(&d_bits);
        let d_all = f16_round(1.0 / iscale);
        let mut sc = [0i8; 16];
        for ib in 0..16 {
            sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
            b[192 + ib] = sc[ib] as u8;
        }
        for j in 0..16 {
            let d = d_all * sc[j] as f32;
            if d == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let q = nearest_int(xb[16 * j + ii] / d).clamp(-32, 31);
                l[16 * j + ii] = (q + 32) as u8;
            }
        }
        for h in 0..2 {
            let lh = &l[128 * h..128 * h + 128];
            for i in 0..32 {
                let (q1, q2, q3, q4) = (lh[i], lh[i + 32], lh[i + 64], lh[i + 96]);
                b[64 * h + i] = (q1 & 0x0f) | ((q3 & 0x0f) << 4);
                b[64 * h + i + 32] = (q2 & 0x0f) | ((q4 & 0x0f) << 4);
                b[128 + 32 * h + i] =
                    (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Plain per-element decoders written from the layout description, which the
    //! restructured loops above must match bit for bit.
    use super::*;

    fn rnd_bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    fn ref_q4_5_k(b: &[u8], five: bool) -> Vec<f32> {
        let d = f16_le(b[0], b[1]);
        let dmin = f16_le(b[2], b[3]);
        let sc: &[u8; 12] = b[4..16].try_into().unwrap();
        let qs = if five { &b[48..176] } else { &b[16..144] };
        (0..256)
            .map(|e| {
                let sub = e / 32;
                let (s, m) = scale_min_k4(sub, sc);
                let byte = qs[32 * (e / 64) + e % 32];
                let mut q = if sub % 2 == 0 { byte & 15 } else { byte >> 4 };
                if five {
                    q |= ((b[16 + e % 32] >> sub) & 1) << 4;
                }
                d * s as f32 * q as f32 - dmin * m as f32
            })
            .collect()
    }

    fn ref_q6_k(b: &[u8]) -> Vec<f32> {
        let d = f16_le(b[208], b[209]);
        (0..256)
            .map(|e| {
                let (h, r) = (e / 128, e % 128);
                let (quarter, l) = (r / 32, r % 32);
                let ql = b[64 * h + l + 32 * (quarter % 2)];
                let low = if quarter < 2 { ql & 15 } else { ql >> 4 };
                let high = (b[128 + 32 * h + l] >> (2 * quarter)) & 3;
                let q = (low | (high << 4)) as i32 - 32;
                let sc = b[192 + e / 16] as i8;
                d * sc as f32 * q as f32
            })
            .collect()
    }

    #[test]
    fn fast_dequant_matches_plain_reference() {
        for seed in 1..6u64 {
            let mut b4 = rnd_bytes(144, seed);
            let mut b5 = rnd_bytes(176, seed + 100);
            let mut b6 = rnd_bytes(210, seed + 200);
            b4[1] &= 0x3b;
            b4[3] &= 0x3b;
            b5[1] &= 0x3b;
            b5[3] &= 0x3b;
            b6[209] &= 0x3b;
            let mut y = [0.0f32; 256];
            for (bytes, f, want) in [
                (
                    &b4,
                    dequant_q4_k as fn(&[u8], &mut [f32]),
                    ref_q4_5_k(&b4, false),
                ),
                (&b5, dequant_q5_k, ref_q4_5_k(&b5, true)),
                (&b6, dequant_q6_k, ref_q6_k(&b6)),
            ] {
                f(bytes, &mut y);
                for (i, (a, w)) in y.iter().zip(&want).enumerate() {
                    assert_eq!(a.to_bits(), w.to_bits(), "seed {seed} elem {i}");
                }
            }
        }
    }

    /// Sub-blocks of many kinds: Gaussian-like, offset, constant, zero, one spike, tiny.
    fn search_inputs() -> Vec<[f32; QK_K]> {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut unit = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut out = Vec::new();
        for case in 0..45 {
            let mut x = [0.0f32; QK_K];
            for (i, v) in x.iter_mut().enumerate() {
                let sub = i / 32;
                let g = unit() + unit() + unit();
                *v = match (case + sub) % 9 {
                    0 => g,
                    1 => 2.0 + g.abs(),
                    2 => 0.75,
                    3 => 0.0,
                    4 => {
                        if i % 32 == 5 {
                            9.0
                        } else {
                            g * 1e-3
                        }
                    }
                    5 => g * 1e-20,
                    6 => -3.0 - g.abs() * 100.0,
                    // Subnormal range: nmax / (max - min) overflows (the AVX2 search
                    // hands such super-blocks to the portable one).
                    7 => g * 1e-39,
                    // max - min overflows f32.
                    _ => {
                        if g > 0.0 {
                            3e38
                        } else {
                            -3e38
                        }
                    }
                } * if (case + sub) % 9 >= 7 {
                    1.0
                } else {
                    1.0 + case as f32
                };
            }
            out.push(x);
        }
        out
    }

    #[test]
    fn lane_parallel_searches_match_scalar_reference() {
        for x in search_inputs() {
            for (nmax, rmin, nstep) in [(15, -1.0, 20), (31, -0.5, 15)] {
                let slow = search_k_asym_ref(&x, nmax, rmin, nstep);
                let mut fast = vec![search_k_asym(&x, nmax, rmin, nstep)];
                #[cfg(target_arch = "x86_64")]
                if let Some(simd) = pulp::x86::V3::try_new() {
                    fast.push(search_k_asym_avx2(simd, &x, nmax, rmin, nstep));
                }
                for fast in fast {
                    assert_eq!(fast.0.map(f32::to_bits), slow.0.map(f32::to_bits));
                    assert_eq!(fast.1.map(f32::to_bits), slow.1.map(f32::to_bits));
                    assert_eq!(fast.2, slow.2);
                }
            }
            // The Fast search gives the same bits portable and in AVX2.
            #[cfg(target_arch = "x86_64")]
            if let Some(simd) = pulp::x86::V3::try_new() {
                for nmax in [15, 31] {
                    let a = Fast.search(&x, nmax, 0.0, 0);
                    let b = FastAvx2(simd).search(&x, nmax, 0.0, 0);
                    assert_eq!(a.0.map(f32::to_bits), b.0.map(f32::to_bits));
                    assert_eq!(a.1.map(f32::to_bits), b.1.map(f32::to_bits));
                }
            }
            let (fs, fl) = search_q6(&x);
            let (ss, sl) = search_q6_ref(&x);
            assert_eq!(fs.map(f32::to_bits), ss.map(f32::to_bits));
            assert_eq!(fl, sl);
            let (mut a, mut b) = (vec![0u8; 210], vec![0u8; 210]);
            quant_q6_k_with(&x, &mut a, search_q6);
            quant_q6_k_with(&x, &mut b, search_q6_ref);
            assert_eq!(a, b);
        }
    }

    #[test]
    fn fast_q4_k_avx2_matches_portable() {
        // the dispatched Fast Q4_K (AVX2 transpose, re-quantization and packing where the CPU
        // has it) against the portable Fast path, on random and adversarial blocks
        for x in search_inputs() {
            let mut a = vec![0u8; 144];
            let mut b = vec![0u8; 144];
            quant_q4_k(&x, &mut a, KQuantSearch::Fast);
            quant_q4_k_with(&x, &mut b, Fast);
            assert_eq!(a, b);
        }
        let x: Vec<f32> = (0..4 * QK_K)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
            .collect();
        let mut a = vec![0u8; 4 * 144];
        let mut b = vec![0u8; 4 * 144];
        quant_q4_k(&x, &mut a, KQuantSearch::Fast);
        quant_q4_k_with(&x, &mut b, Fast);
        assert_eq!(a, b);
    }

    #[test]
    fn fast_q4_k_fused_finiteness_check() {
        // finite inputs (up to f32::MAX and subnormals): the same blocks as the plain kernel
        let mut x: Vec<f32> = (0..4 * QK_K)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
            .collect();
        x[5] = 1e-42;
        x[700] = -1e-45;
        let mut a = vec![0u8; 4 * 144];
        let mut b = vec![0u8; 4 * 144];
        let Some(ok) = quant_q4_k_fast_checked(&x, &mut a) else {
            return; // no AVX2
        };
        assert!(ok);
        quant_q4_k(&x, &mut b, KQuantSearch::Fast);
        assert_eq!(a, b);
        let mut y = x.clone();
        y[1000] = f32::MAX;
        y[3] = -f32::MAX;
        assert_eq!(quant_q4_k_fast_checked(&y, &mut a), Some(true));
        // a non-finite value anywhere (first, last, middle of a block) is seen
        for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 255, 256, 517, 4 * QK_K - 1] {
                let mut y = x.clone();
                y[at] = bad;
                assert_eq!(
                    quant_q4_k_fast_checked(&y, &mut a),
                    Some(false),
                    "{bad} at {at}"
                );
            }
        }
    }

    #[test]
    fn scale_min_packing_round_trips() {
        let ls = [0u8, 63, 17, 42, 63, 1, 32, 5];
        let lm = [63u8, 0, 9, 33, 0, 62, 31, 48];
        let p = pack_scale_min_k4(&ls, &lm);
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &p), (ls[j], lm[j]));
        }
    }
}
