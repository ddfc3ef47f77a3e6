//! Fine-metadata KIVI keys (`kivi2f`, `kivi4f`): per (group, channel) an `e`-bit step code and
//! a `z`-bit origin code against the per-channel references of [`super::calibrate_c`] (the
//! first body group's median `mu` and min/max step `sigma`), packed as a bit stream in front
//! of the codes. With the default 5 + 5 bits the step moves in quarter octaves and the origin
//! in half steps (the one-byte `kivi2c` record: half octaves, whole steps).
//!
//! Choosing the codes (measured on SmolLM2-135M at 4096 context, docs/benchmarks.md): the
//! smallest *covering* grid (`kfit=cover`) inflates the step by ~19% on average at 5 + 5 bits,
//! and 2-bit keys are very sensitive to that (+10.9% PPL vs +5.1% for f16 min/max metadata).
//! The default instead searches the 5 x 5 codes around the ones nearest to the channel's own
//! min/max grid for the least squared error over the group plus the squared errors of the
//! group's minimum and maximum weighted by `g` (an extreme token's key is often the one
//! attention looks for, and min/max grids keep it exact); `kfit=mse` drops the extreme term.
//! That search matches f16 min/max metadata at a third of the bits.
//!
//! Record of one (group, head): `ceil(d · (e + z) / 8)` metadata bytes (channel `c`'s step code
//! in bits `c · (e + z) ..`, then its origin code, little-end first), then `d` channels of
//! `g · bits / 8` code bytes.

use super::CompactSearch;
use crate::codec::{pack_codes, pow2, round_half_away, unpack_codes};

/// Bit widths of the fine metadata: `e` step bits (`2^e / 8` codes per octave over 8
/// octaves, `2^-5 .. 2^3` times the reference step) and `z` origin bits (`2^z / 16` codes per
/// step over `-8 .. +8` steps from the anchor). Both in `4..=8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FineSpec {
    /// Step code bits.
    pub e: u8,
    /// Origin code bits.
    pub z: u8,
}

impl Default for FineSpec {
    fn default() -> Self {
        FineSpec { e: 5, z: 5 }
    }
}

impl FineSpec {
    /// Metadata bits per (group, channel).
    pub fn bits(self) -> usize {
        (self.e + self.z) as usize
    }

    /// Step codes per octave.
    fn per_octave(self) -> i32 {
        (1i32 << self.e) / 8
    }

    /// Origin codes per step.
    fn per_step(self) -> f32 {
        ((1u32 << self.z) / 16) as f32
    }

    /// The step code, before rounding, whose step is `step` against the reference `sigma`.
    fn step_code(self, step: f32, sigma: f32) -> f32 {
        let r = self.per_octave() as f32;
        (step / sigma).log2() * r + 5.0 * r
    }

    /// The origin code, before rounding and re-centring (add `2^(z-1)`), whose origin is `lo`
    /// for a grid of step `step` anchored at `mu`.
    fn origin_code(self, lo: f32, mu: f32, step: f32) -> f32 {
        (lo - mu) / step * self.per_step()
    }

    /// Step and origin of codes `(ec, zc)` against references `mu`, `sigma`: step `sigma ·
    /// 2^((ec - 5r) / r)` (`r` = [`Self::per_octave`], a power of two, so the octave is a shift
    /// and the fraction a table entry), origin `mu + (zc - 2^(z-1)) · step / 2^(z-4)`.
    #[inline(always)]
    pub fn grid(self, ec: u32, zc: u32, mu: f32, sigma: f32) -> (f32, f32) {
        let lr = self.e as i32 - 3; // log2 of the codes per octave
        let k = ec as i32 - (5 << lr);
        let step = sigma * pow2(k >> lr) * POW2_32NDS[((k & ((1 << lr) - 1)) << (5 - lr)) as usize];
        let origin =
            mu + (zc as i32 - (1i32 << (self.z - 1))) as f32 * (step * pow2(4 - self.z as i32));
        (step, origin)
    }
}

/// `2^(k/32)` for `k` in `0..32` (f32).
#[allow(clippy::excessive_precision)]
const POW2_32NDS: [f32; 32] = [
    1.0, 1.0218972, 1.04427373, 1.06714046, 1.09050775, 1.1143868, 1.13878858, 1.1637249,
    1.18920708, 1.21524739, 1.24185777, 1.26905096, 1.29683959, 1.32523668, 1.35425556, 1.38390994,
    1.41421354, 1.44518077, 1.47682619, 1.50916445, 1.54221082, 1.5759809, 1.61049032, 1.64575553,
    1.68179286, 1.71861935, 1.75625217, 1.79470909, 1.8340081, 1.87416768, 1.91520655, 1.95714414,
];

/// `2^(i / r)` for `0 <= i < r`, `r` a power of two up to 32.
#[cfg(test)]
fn frac_pow2(i: i32, r: i32) -> f32 {
    POW2_32NDS[(i * (32 / r)) as usize]
}

/// Bytes of one (group, head) record.
pub fn group_bytes_f(d: usize, g: usize, bits: u8, spec: FineSpec) -> usize {
    (d * spec.bits()).div_ceil(8) + d * g * bits as usize / 8
}

/// Write `n` bits of `v` at bit offset `at` of `buf` (little-end first).
fn put_bits(buf: &mut [u8], at: usize, n: usize, v: u32) {
    for i in 0..n {
        let b = at + i;
        if v >> i & 1 == 1 {
            buf[b / 8] |= 1 << (b % 8);
        } else {
            buf[b / 8] &= !(1 << (b % 8));
        }
    }
}

/// Read `n <= 24` bits at bit offset `at` of `buf` (one unaligned 4-byte load when the buffer
/// extends that far, as it does inside a record: the codes follow the metadata).
#[inline(always)]
fn get_bits(buf: &[u8], at: usize, n: usize) -> u32 {
    let (i, sh) = (at / 8, at % 8);
    if let Some(b) = buf.get(i..i + 4) {
        let w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        return (w >> sh) & ((1u32 << n) - 1);
    }
    let mut w = 0u32;
    for (k, &b) in buf[i..].iter().take((sh + n).div_ceil(8)).enumerate() {
        w |= (b as u32) << (8 * k);
    }
    (w >> sh) & ((1u32 << n) - 1)
}

/// Covering codes (`kfit=cover`) of a channel with range `[lo, hi]`: the smallest step whose
/// grid, with the highest origin at or below `lo`, still reaches `hi` (nothing clipped); the
/// largest step with the origin clamped when no code covers the range.
fn cover(spec: FineSpec, lo: f32, hi: f32, levels: f32, mu: f32, sigma: f32) -> (u32, u32) {
    let (emax, zmax) = ((1u32 << spec.e) - 1, (1u32 << spec.z) - 1);
    let half = 1i64 << (spec.z - 1);
    if !(lo.is_finite() && hi.is_finite()) {
        return (0, half as u32);
    }
    let need = ((hi - lo) / levels).max(f32::MIN_POSITIVE);
    // First step code at or above the needed step (one below, against rounding).
    let e0 = spec.step_code(need, sigma).floor() as i64 - 1;
    let zcode = |step: f32| -> i64 {
        (spec.origin_code(lo, mu, step).floor() as i64 + half).clamp(0, zmax as i64)
    };
    for ec in e0.clamp(0, emax as i64) as u32..=emax {
        let (step, _) = spec.grid(ec, 0, mu, sigma);
        let zc = zcode(step) as u32;
        let (_, origin) = spec.grid(ec, zc, mu, sigma);
        if origin <= lo && origin + levels * step >= hi {
            return (ec, zc);
        }
    }
    let (step, _) = spec.grid(emax, 0, mu, sigma);
    (emax, zcode(step) as u32)
}

/// Codes nearest to the channel's own min/max grid (step `(hi - lo) / levels`, origin `lo`).
fn nearest(spec: FineSpec, lo: f32, hi: f32, levels: f32, mu: f32, sigma: f32) -> (u32, u32) {
    let (emax, zmax) = ((1i64 << spec.e) - 1, (1i64 << spec.z) - 1);
    let half = 1i64 << (spec.z - 1);
    if !(lo.is_finite() && hi.is_finite()) {
        return (0, half as u32);
    }
    let need = ((hi - lo) / levels).max(f32::MIN_POSITIVE);
    let ec = (spec.step_code(need, sigma).round() as i64).clamp(0, emax) as u32;
    let (step, _) = spec.grid(ec, 0, mu, sigma);
    let zc = (spec.origin_code(lo, mu, step).round() as i64 + half).clamp(0, zmax);
    (ec, zc as u32)
}

/// Squared error of `col` on the grid `(step, origin)` as [`pack_codes`] rounds, plus (with
/// `extremes`) the squared errors of the channel's minimum and maximum weighted by the number of
/// values.
fn objective(
    col: &[f32],
    lo: f32,
    hi: f32,
    levels: f32,
    step: f32,
    origin: f32,
    extremes: bool,
) -> f32 {
    let inv = 1.0 / step;
    let q = |x: f32| {
        let k = round_half_away((x - origin) * inv).clamp(0.0, levels);
        let e = x - (origin + k * step);
        e * e
    };
    let mut err: f32 = col.iter().map(|&x| q(x)).sum();
    if extremes {
        err += col.len() as f32 * (q(lo) + q(hi));
    }
    err
}

/// Step codes tried on each side of the nearest one (and origin codes around each step's
/// nearest origin).
const RADIUS: i64 = 2;

/// The least [`objective`] among the codes within [`RADIUS`] of [`nearest`] (per step code, the
/// origins around that step's nearest origin).
#[allow(clippy::too_many_arguments)]
fn search(
    spec: FineSpec,
    col: &[f32],
    lo: f32,
    hi: f32,
    levels: f32,
    mu: f32,
    sigma: f32,
    extremes: bool,
) -> (u32, u32) {
    let (e0, z0) = nearest(spec, lo, hi, levels, mu, sigma);
    if !(lo.is_finite() && hi.is_finite()) {
        return (e0, z0);
    }
    let (emax, zmax) = ((1i64 << spec.e) - 1, (1i64 << spec.z) - 1);
    let half = 1i64 << (spec.z - 1);
    let mut best = (f32::INFINITY, (e0, z0));
    for de in -RADIUS..=RADIUS {
        let ec = (e0 as i64 + de).clamp(0, emax) as u32;
        let (step, _) = spec.grid(ec, 0, mu, sigma);
        let zn = spec.origin_code(lo, mu, step).round() as i64 + half;
        for dz in -RADIUS..=RADIUS {
            let zc = (zn + dz).clamp(0, zmax) as u32;
            let (step, origin) = spec.grid(ec, zc, mu, sigma);
            let err = objective(col, lo, hi, levels, step, origin, extremes);
            if err < best.0 {
                best = (err, (ec, zc));
            }
        }
    }
    best.1
}

/// Encode `g` key vectors of one head (`rows`: `[g][d]`) into a fine record (see the module
/// docs) against `refs` (`mu` of channel `c` at `refs[c]`, `sigma` at `refs[d + c]`). The
/// searches run 8 channels at a time on AVX2 where the CPU has it ([`search_x8`], the same
/// records bit for bit as the scalar [`search`]).
pub fn encode_group_f(
    rows: &[f32],
    d: usize,
    bits: u8,
    refs: &[f32],
    spec: FineSpec,
    how: CompactSearch,
    out: &mut [u8],
) {
    #[cfg(target_arch = "x86_64")]
    let simd = pulp::x86::V3::try_new();
    #[cfg(not(target_arch = "x86_64"))]
    let simd = None;
    encode_group_f_with(rows, d, bits, refs, spec, how, out, simd);
}

/// [`encode_group_f`] at SIMD level `simd` (`None`: the scalar reference).
#[allow(clippy::too_many_arguments)]
fn encode_group_f_with(
    rows: &[f32],
    d: usize,
    bits: u8,
    refs: &[f32],
    spec: FineSpec,
    how: CompactSearch,
    out: &mut [u8],
    simd: crate::codec::Simd,
) {
    let g = rows.len() / d;
    let levels = ((1u32 << bits) - 1) as f32;
    let mb = (d * spec.bits()).div_ceil(8);
    let cb = g * bits as usize / 8;
    let (meta, codes) = out.split_at_mut(mb);
    // Codes of the channels the 8-lane search did and packed (the first `d / 8 * 8`, as far
    // as `out` holds their codes; none without it).
    let picks: Vec<(u32, u32)> = match (simd, how) {
        #[cfg(target_arch = "x86_64")]
        (Some(v3), CompactSearch::Near | CompactSearch::Full) if cb > 0 => {
            let n8 = (d / 8).min(codes.len() / (8 * cb)) * 8;
            let mut picks = vec![(0, 0); n8];
            pulp::Simd::vectorize(
                v3,
                SearchX8 {
                    v3,
                    spec,
                    rows: &rows[..g * d],
                    d,
                    g,
                    levels,
                    refs,
                    extremes: how == CompactSearch::Near,
                    bits,
                    cb,
                    codes: &mut codes[..n8 * cb],
                    picks: &mut picks,
                },
            );
            picks
        }
        _ => Vec::new(),
    };
    for (c, &(ec, zc)) in picks.iter().enumerate() {
        put_bits(meta, c * spec.bits(), spec.e as usize, ec);
        put_bits(meta, c * spec.bits() + spec.e as usize, spec.z as usize, zc);
    }
    let mut col = vec![0f32; g];
    let done = picks.len();
    for (c, o) in codes.chunks_exact_mut(cb).enumerate().take(d).skip(done) {
        for (t, v) in col.iter_mut().enumerate() {
            *v = rows[t * d + c];
        }
        let (mu, sigma) = (refs[c], refs[d + c]);
        let lo = col.iter().fold(f32::INFINITY, |a, &b| a.min(b));
        let hi = col.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let (ec, zc) = match how {
            CompactSearch::Cover => cover(spec, lo, hi, levels, mu, sigma),
            CompactSearch::Near => search(spec, &col, lo, hi, levels, mu, sigma, true),
            CompactSearch::Full => search(spec, &col, lo, hi, levels, mu, sigma, false),
        };
        put_bits(meta, c * spec.bits(), spec.e as usize, ec);
        put_bits(meta, c * spec.bits() + spec.e as usize, spec.z as usize, zc);
        let (step, origin) = spec.grid(ec, zc, mu, sigma);
        pack_codes(&col, step, origin, bits, levels, o);
    }
}

/// Candidate grids of one [`search`]: `(2 RADIUS + 1)^2`.
const CANDS: usize = ((2 * RADIUS + 1) * (2 * RADIUS + 1)) as usize;

/// [`search_x8`] over every block of 8 channels, inside pulp's V3 dispatch.
#[cfg(target_arch = "x86_64")]
struct SearchX8<'a> {
    v3: pulp::x86::V3,
    spec: FineSpec,
    rows: &'a [f32],
    d: usize,
    g: usize,
    levels: f32,
    refs: &'a [f32],
    extremes: bool,
    bits: u8,
    /// Code bytes per channel.
    cb: usize,
    /// The code bytes of the channels of `picks`.
    codes: &'a mut [u8],
    /// The metadata codes of the first channels (a multiple of 8).
    picks: &'a mut [(u32, u32)],
}

#[cfg(target_arch = "x86_64")]
impl pulp::WithSimd for SearchX8<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _s: S) {
        let SearchX8 {
            v3,
            spec,
            rows,
            d,
            g,
            levels,
            refs,
            extremes,
            bits,
            cb,
            codes,
            picks,
        } = self;
        for (b, (p, o)) in picks
            .chunks_exact_mut(8)
            .zip(codes.chunks_exact_mut(8 * cb))
            .enumerate()
        {
            search_x8(v3, spec, rows, d, g, 8 * b, levels, refs, extremes, p);
            let (mut step, mut origin, mut inv) = ([0f32; 8], [0f32; 8], [0f32; 8]);
            for l in 0..8 {
                let c = 8 * b + l;
                (step[l], origin[l]) = spec.grid(p[l].0, p[l].1, refs[c], refs[d + c]);
                inv[l] = if step[l] > 0.0 { 1.0 / step[l] } else { 0.0 };
            }
            pack_x8(v3, rows, d, 8 * b, origin, inv, bits, levels, cb, o);
        }
    }
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::__m256;

/// Lanes `c0..c0 + 8` of token `t` of `rows` (`[g][d]`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn load8(rows: &[f32], at: usize) -> __m256 {
    let mut v = [0f32; 8];
    v.copy_from_slice(&rows[at..at + 8]);
    pulp::cast(v)
}

/// `round_half_away(v).clamp(0.0, levels)` in each lane (`levels` a whole number), up to the
/// sign of a zero code: `v` clamped first (NaN stays NaN: `max(0, v)` and `min(levels, v)`
/// return their second operand when it is NaN), then rounded half away from zero as the
/// scalar one does below `2^23` (truncate; add 1 where the fraction is at least a half).
/// Clamping first gives the same codes: the scalar rounding is monotone and fixes whole
/// numbers, so values below 0 give codes of at most 0 and values past `levels` codes of at
/// least `levels`. The scalar code is `-0.0` for values in `(-0.5, 0]` with the sign bit set
/// where this one is `+0.0`; neither the error of a value (`x - (origin + 0 * step)` changes
/// only in the sign of a zero, which squaring drops) nor a packed code (`as u8`) tells them
/// apart.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn code_x8(v3: pulp::x86::V3, v: __m256, levels: __m256) -> __m256 {
    use std::arch::x86_64::{_CMP_GE_OQ, _MM_FROUND_NO_EXC, _MM_FROUND_TO_ZERO};
    let a = v3.avx;
    let w = a._mm256_min_ps(levels, a._mm256_max_ps(a._mm256_setzero_ps(), v));
    let t = a._mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(w);
    let up = a._mm256_cmp_ps::<_CMP_GE_OQ>(a._mm256_sub_ps(w, t), a._mm256_set1_ps(0.5));
    a._mm256_add_ps(t, a._mm256_and_ps(up, a._mm256_set1_ps(1.0)))
}

/// The squared error of one value per lane as [`objective`]'s `q`: the code of
/// `(x - origin) * inv` ([`code_x8`]), then `(x - (origin + k * step))^2`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn sq_err_x8(
    v3: pulp::x86::V3,
    x: __m256,
    origin: __m256,
    step: __m256,
    inv: __m256,
    levels: __m256,
) -> __m256 {
    let a = v3.avx;
    let k = code_x8(v3, a._mm256_mul_ps(a._mm256_sub_ps(x, origin), inv), levels);
    let e = a._mm256_sub_ps(x, a._mm256_add_ps(origin, a._mm256_mul_ps(k, step)));
    a._mm256_mul_ps(e, e)
}

/// [`pack_codes`] for the 8 channels `c0..c0 + 8` (channel `c0 + l` on the grid `origin[l]`,
/// `1 / step` as `inv[l]`, into `out[l * cb..][..cb]`), one per lane: the same code per value
/// ([`code_x8`] of `(x - origin) * inv`, then truncated: a NaN code converts to
/// `0x8000_0000`, whose low byte is the 0 of the scalar `as u8`), ORed into the same bytes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pack_x8(
    v3: pulp::x86::V3,
    rows: &[f32],
    d: usize,
    c0: usize,
    origin: [f32; 8],
    inv: [f32; 8],
    bits: u8,
    levels: f32,
    cb: usize,
    out: &mut [u8],
) {
    let (a, a2) = (v3.avx, v3.avx2);
    let (origin, inv): (__m256, __m256) = (pulp::cast(origin), pulp::cast(inv));
    let lv = a._mm256_set1_ps(levels);
    let per = 8 / bits as usize;
    for byte in 0..cb {
        let mut acc = a._mm256_setzero_si256();
        for j in 0..per {
            let x = load8(rows, (byte * per + j) * d + c0);
            let k = code_x8(v3, a._mm256_mul_ps(a._mm256_sub_ps(x, origin), inv), lv);
            let k = a2._mm256_sllv_epi32(
                a._mm256_cvttps_epi32(k),
                a._mm256_set1_epi32((j * bits as usize) as i32),
            );
            acc = a2._mm256_or_si256(acc, k);
        }
        let acc: [i32; 8] = pulp::cast(acc);
        for (l, &w) in acc.iter().enumerate() {
            out[l * cb + byte] = w as u8;
        }
    }
}

/// [`search`] for the 8 channels `c0..c0 + 8`, one per lane, each lane doing the scalar
/// operations in the scalar order: the channel's minimum and maximum (min/max skip NaN as
/// `f32::min`/`max` do), [`nearest`] and the 25 candidate grids per lane in scalar code, then
/// per candidate the [`objective`] summed token by token, the extremes term, and the first
/// strictly smaller error kept. Writes the 8 channels' codes to `out`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn search_x8(
    v3: pulp::x86::V3,
    spec: FineSpec,
    rows: &[f32],
    d: usize,
    g: usize,
    c0: usize,
    levels: f32,
    refs: &[f32],
    extremes: bool,
    out: &mut [(u32, u32)],
) {
    use std::arch::x86_64::_CMP_LT_OQ;
    let a = v3.avx;
    let (mut lo, mut hi) = (
        a._mm256_set1_ps(f32::INFINITY),
        a._mm256_set1_ps(f32::NEG_INFINITY),
    );
    for t in 0..g {
        let x = load8(rows, t * d + c0);
        // `minps(x, lo)` is `x < lo ? x : lo`: a NaN `x` leaves `lo`.
        lo = a._mm256_min_ps(x, lo);
        hi = a._mm256_max_ps(x, hi);
    }
    let (lo_a, hi_a): ([f32; 8], [f32; 8]) = (pulp::cast(lo), pulp::cast(hi));
    let (emax, zmax) = ((1i64 << spec.e) - 1, (1i64 << spec.z) - 1);
    let half = 1i64 << (spec.z - 1);
    let mut steps = [[0f32; 8]; CANDS];
    let mut origins = [[0f32; 8]; CANDS];
    let mut codes = [[(0u32, 0u32); 8]; CANDS];
    let mut near = [(0u32, 0u32); 8];
    let mut searched = [false; 8];
    for l in 0..8 {
        let (lo, hi) = (lo_a[l], hi_a[l]);
        let (mu, sigma) = (refs[c0 + l], refs[d + c0 + l]);
        near[l] = nearest(spec, lo, hi, levels, mu, sigma);
        searched[l] = lo.is_finite() && hi.is_finite();
        let mut i = 0;
        for de in -RADIUS..=RADIUS {
            let ec = (near[l].0 as i64 + de).clamp(0, emax) as u32;
            let (step, _) = spec.grid(ec, 0, mu, sigma);
            // Unsearched lanes (their result is `near`) skip the origin arithmetic.
            let zn = if searched[l] {
                spec.origin_code(lo, mu, step).round() as i64 + half
            } else {
                near[l].1 as i64
            };
            for dz in -RADIUS..=RADIUS {
                let zc = (zn + dz).clamp(0, zmax) as u32;
                let (step, origin) = spec.grid(ec, zc, mu, sigma);
                steps[i][l] = step;
                origins[i][l] = origin;
                codes[i][l] = (ec, zc);
                i += 1;
            }
        }
    }
    let lv = a._mm256_set1_ps(levels);
    let n = a._mm256_set1_ps(g as f32);
    let one = a._mm256_set1_ps(1.0);
    let mut best = a._mm256_set1_ps(f32::INFINITY);
    // Index of the best candidate per lane; -1: none below infinity (the scalar keeps `near`).
    let mut pick = a._mm256_set1_ps(-1.0);
    // Two candidates per pass over the tokens (two independent sums in flight); the picks
    // are then updated in candidate order. The last pass of an odd count evaluates its
    // candidate twice; the second copy never passes the strict `<` of the first.
    for i in (0..CANDS).step_by(2) {
        let j = (i + 1).min(CANDS - 1);
        let (s0, s1): (__m256, __m256) = (pulp::cast(steps[i]), pulp::cast(steps[j]));
        let (o0, o1): (__m256, __m256) = (pulp::cast(origins[i]), pulp::cast(origins[j]));
        let (i0, i1) = (a._mm256_div_ps(one, s0), a._mm256_div_ps(one, s1));
        let (mut e0, mut e1) = (a._mm256_setzero_ps(), a._mm256_setzero_ps());
        for t in 0..g {
            let x = load8(rows, t * d + c0);
            e0 = a._mm256_add_ps(e0, sq_err_x8(v3, x, o0, s0, i0, lv));
            e1 = a._mm256_add_ps(e1, sq_err_x8(v3, x, o1, s1, i1, lv));
        }
        for (k, step, origin, inv, mut err) in [(i, s0, o0, i0, e0), (j, s1, o1, i1, e1)] {
            if extremes {
                let ql = sq_err_x8(v3, lo, origin, step, inv, lv);
                let qh = sq_err_x8(v3, hi, origin, step, inv, lv);
                err = a._mm256_add_ps(err, a._mm256_mul_ps(n, a._mm256_add_ps(ql, qh)));
            }
            let better = a._mm256_cmp_ps::<_CMP_LT_OQ>(err, best);
            best = a._mm256_blendv_ps(best, err, better);
            pick = a._mm256_blendv_ps(pick, a._mm256_set1_ps(k as f32), better);
        }
    }
    let pick: [f32; 8] = pulp::cast(pick);
    for l in 0..8 {
        out[l] = if searched[l] && pick[l] >= 0.0 {
            codes[pick[l] as usize][l]
        } else {
            near[l]
        };
    }
}

/// Step and origin of channel `c` of a fine record's metadata.
#[inline(always)]
fn channel_grid(rec: &[u8], c: usize, d: usize, refs: &[f32], spec: FineSpec) -> (f32, f32) {
    let w = get_bits(rec, c * spec.bits(), spec.bits());
    let ec = w & ((1u32 << spec.e) - 1);
    let zc = w >> spec.e;
    spec.grid(ec, zc, refs[c], refs[d + c])
}

/// Decode one fine record channel-major into `kt[c * ld + off..][..g]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn decode_group_cm_f(
    rec: &[u8],
    d: usize,
    g: usize,
    bits: u8,
    refs: &[f32],
    spec: FineSpec,
    kt: &mut [f32],
    ld: usize,
    off: usize,
) {
    let mb = (d * spec.bits()).div_ceil(8);
    let cb = g * bits as usize / 8;
    let codes = &rec[mb..];
    for (c, r) in codes.chunks_exact(cb).enumerate().take(d) {
        let (step, origin) = channel_grid(rec, c, d, refs, spec);
        unpack_codes(r, bits, step, origin, &mut kt[c * ld + off..][..g]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pow2_table_matches_exp2() {
        for (k, &v) in POW2_32NDS.iter().enumerate() {
            let want = (k as f64 / 32.0).exp2();
            assert!((v as f64 - want).abs() <= want * 2f64.powi(-24), "k {k}");
        }
        assert_eq!(frac_pow2(3, 4), POW2_32NDS[24]);
    }

    #[test]
    fn bit_fields_round_trip() {
        let mut buf = vec![0xA5u8; 9];
        let fields: Vec<(usize, u32)> = (0..7).map(|i| (i * 10, (i as u32 * 137) & 1023)).collect();
        for &(at, v) in &fields {
            put_bits(&mut buf, at, 10, v);
        }
        for &(at, v) in &fields {
            assert_eq!(get_bits(&buf, at, 10), v, "field at {at}");
        }
    }

    /// Every channel's grid covers its values (nothing clipped: each value within half a step
    /// of its decoded value) and its step is within one step code (plus the origin's
    /// resolution) of the channel's own min/max step, for channels near and far from the
    /// references.
    #[test]
    fn covering_grid_is_tight() {
        let (d, g, bits) = (8usize, 32usize, 2u8);
        let levels = 3.0f32;
        let row = |t: usize, shift: f32| -> Vec<f32> {
            let x = t as f32;
            (0..d)
                .map(|c| {
                    let amp = 0.05 * (c as f32 + 1.0).powi(2);
                    amp * (x * (0.3 + 0.1 * c as f32)).sin() + shift * c as f32 - 1.0
                })
                .collect()
        };
        let calib: Vec<f32> = (0..g).flat_map(|t| row(t, 0.0)).collect();
        let mut refs = vec![0f32; 2 * d];
        super::super::calibrate_c(&calib, d, bits, &mut refs);
        for spec in [
            FineSpec { e: 5, z: 5 },
            FineSpec { e: 6, z: 6 },
            FineSpec { e: 4, z: 4 },
        ] {
            for shift in [0.0f32, 0.02, -0.05] {
                let rows: Vec<f32> = (0..g).flat_map(|t| row(t, shift)).collect();
                let mut rec = vec![0u8; group_bytes_f(d, g, bits, spec)];
                encode_group_f(&rows, d, bits, &refs, spec, CompactSearch::Cover, &mut rec);
                let mut out = vec![0f32; g * d];
                let mut cm = vec![0f32; d * g];
                let meta = crate::kivi::KeyMeta::Fine(spec);
                crate::kivi::decode(meta, &rec, d, g, bits, &refs, &mut out, &mut cm);
                for c in 0..d {
                    let (step, _) = channel_grid(&rec, c, d, &refs, spec);
                    let col: Vec<f32> = (0..g).map(|t| rows[t * d + c]).collect();
                    let lo = col.iter().cloned().fold(f32::INFINITY, f32::min);
                    let hi = col.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let own = (hi - lo) / levels;
                    let slack = 2f32.powf(1.0 / spec.per_octave() as f32)
                        / (1.0 - 1.0 / (levels * spec.per_step()));
                    assert!(
                        step <= own * slack * 1.0001,
                        "{spec:?} shift {shift} c{c}: step {step} vs own {own}"
                    );
                    for t in 0..g {
                        let err = (rows[t * d + c] - out[t * d + c]).abs();
                        assert!(err <= 0.5 * step * 1.0001, "c{c} t{t}: {err} > {step}/2");
                    }
                }
            }
        }
    }

    /// The default search against a brute force over every code pair: its pick is the best
    /// of the 5 x 5 neighbourhood of the nearest codes, never worse than the nearest codes
    /// themselves, and on these smooth channels the best of all 1024 code pairs.
    #[test]
    fn search_is_best_of_its_neighbourhood() {
        let (d, g, bits) = (6usize, 32usize, 2u8);
        let levels = 3.0f32;
        let spec = FineSpec::default();
        let rows: Vec<f32> = (0..g)
            .flat_map(|t| {
                let x = t as f32;
                (0..d)
                    .map(move |c| (0.2 + c as f32) * (x * (0.2 + 0.13 * c as f32)).cos() + c as f32)
            })
            .collect();
        let mut refs = vec![0f32; 2 * d];
        super::super::calibrate_c(&rows, d, bits, &mut refs);
        let shifted: Vec<f32> = rows
            .iter()
            .enumerate()
            .map(|(i, v)| v * 1.1 + 0.03 * (i % d) as f32)
            .collect();
        let mut rec = vec![0u8; group_bytes_f(d, g, bits, spec)];
        encode_group_f(
            &shifted,
            d,
            bits,
            &refs,
            spec,
            CompactSearch::Near,
            &mut rec,
        );
        let mb = (d * spec.bits()).div_ceil(8);
        for c in 0..d {
            let col: Vec<f32> = (0..g).map(|t| shifted[t * d + c]).collect();
            let lo = col.iter().cloned().fold(f32::INFINITY, f32::min);
            let hi = col.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let (mu, sigma) = (refs[c], refs[d + c]);
            let f = |ec: u32, zc: u32| {
                let (step, origin) = spec.grid(ec, zc, mu, sigma);
                objective(&col, lo, hi, levels, step, origin, true)
            };
            let at = c * spec.bits();
            let got = f(get_bits(&rec[..mb], at, 5), get_bits(&rec[..mb], at + 5, 5));
            let (e0, z0) = nearest(spec, lo, hi, levels, mu, sigma);
            assert!(got <= f(e0, z0), "c{c}: {got} vs nearest {}", f(e0, z0));
            let all = (0..32u32)
                .flat_map(|e| (0..32u32).map(move |z| (e, z)))
                .map(|(e, z)| f(e, z))
                .fold(f32::INFINITY, f32::min);
            assert!(
                got <= all * 1.0001 + 1e-9,
                "c{c}: {got} vs best of all {all}"
            );
        }
    }

    /// A xorshift generator of floats in `[-1, 1)`.
    fn rng(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// The lane codes are the scalar clamped [`round_half_away`]'s bits (up to the sign of a
    /// zero code) for ties, signs, zeros, values around and past `2^23`, NaN and infinities,
    /// for 2-, 4- and 8-bit codes.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn code_x8_matches_scalar() {
        let Some(v3) = pulp::x86::V3::try_new() else {
            eprintln!("no AVX2: lane codes not tested");
            return;
        };
        let mut r = rng(0x1234_5678_9abc_def1);
        let mut xs: Vec<f32> = vec![
            0.0,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            -2.5,
            0.49999997,
            -0.49999997,
            0.3,
            -0.3,
            8388607.5,
            -8388607.5,
            8388608.0,
            -8388609.0,
            16777217.0,
            1e30,
            -1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            1e-40,
            -1e-40,
            f32::MIN_POSITIVE,
            2147483648.0,
            -2147483904.0,
            f32::MAX,
            f32::MIN,
            2.5,
            3.5,
            14.5,
            15.5,
            254.5,
            255.5,
            256.0,
            -0.50000006,
        ];
        for i in 0..40000 {
            let m = 10f32.powi(i % 10 - 3);
            xs.push(r() * m);
            xs.push((r() * 64.0).round() + 0.5);
        }
        while xs.len() % 8 != 0 {
            xs.push(0.25);
        }
        for levels in [3.0f32, 15.0, 255.0] {
            for c in xs.chunks_exact(8) {
                let v: [f32; 8] = c.try_into().unwrap();
                let lv = pulp::cast([levels; 8]);
                let got: [f32; 8] = pulp::cast(code_x8(v3, pulp::cast(v), lv));
                for (x, y) in v.iter().zip(got) {
                    let want = round_half_away(*x).clamp(0.0, levels);
                    assert!(
                        y.to_bits() == want.to_bits() || (y == 0.0 && want == 0.0),
                        "{x} levels {levels}: {y} vs {want}"
                    );
                }
            }
        }
    }

    /// The 8-lane search writes the scalar reference's records byte for byte: random groups
    /// and groups built for ties (constant channels, values on grid points and half-way
    /// between them), signed zeros, subnormals, large values, NaN and infinite entries; head
    /// widths with and without a scalar tail; several metadata widths, code widths, both
    /// searches (and the cover fit, which stays scalar).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_search_matches_scalar() {
        let Some(v3) = pulp::x86::V3::try_new() else {
            eprintln!("no AVX2: the 8-lane search not tested");
            return;
        };
        let mut r = rng(0x0ddc_0ffe_e123_4567);
        let mut groups = 0;
        for &d in &[64usize, 24, 40, 20, 8, 5] {
            for &g in &[32usize, 16] {
                for kind in 0..8 {
                    // References: mu around 0, sigma spread over two decades.
                    let mut refs = vec![0f32; 2 * d];
                    for c in 0..d {
                        refs[c] = 0.5 * r();
                        refs[d + c] = 0.1 * 10f32.powf(r());
                    }
                    let mut rows = vec![0f32; g * d];
                    for (i, v) in rows.iter_mut().enumerate() {
                        let c = i % d;
                        let (mu, sigma) = (refs[c], refs[d + c]);
                        *v = match kind {
                            // Around the references.
                            0 => mu + 1.5 * sigma * r(),
                            // Shifted and scaled channels.
                            1 => mu * 2.0 + sigma * (1.0 + c as f32 * 0.3) * 3.0 * r(),
                            // Constant channels (every candidate with the clamped step code
                            // ties) and channels of two alternating values.
                            2 => match c % 3 {
                                0 => mu,
                                1 => (0.25 * (c % 5) as f32 - 0.5) * sigma,
                                _ => mu + sigma * (i / d % 2) as f32,
                            },
                            // Values on quarter-step points of the reference grid: grid points
                            // and half-way ties of the rounding.
                            3 => mu + sigma * 0.25 * (r() * 8.0).round(),
                            // Signed zeros and subnormals among ordinary values.
                            4 => match i % 4 {
                                0 => 0.0,
                                1 => -0.0,
                                2 => 1e-40 * r(),
                                _ => sigma * r(),
                            },
                            // An outlier per channel.
                            5 => {
                                if i / d == c % g {
                                    mu + 1e4 * sigma * r()
                                } else {
                                    mu + sigma * r()
                                }
                            }
                            // NaN entries (skipped by min/max, poisoning the errors) and
                            // infinite ones (no search).
                            6 => match (c % 4, i / d) {
                                (1, 3) => f32::NAN,
                                (2, 0) => f32::INFINITY,
                                (3, 5) => f32::NEG_INFINITY,
                                _ => mu + sigma * r(),
                            },
                            // Tiny and large spreads against the references.
                            _ => mu + sigma * 10f32.powf(3.0 * r()) * r(),
                        };
                    }
                    for spec in [
                        FineSpec { e: 5, z: 5 },
                        FineSpec { e: 4, z: 4 },
                        FineSpec { e: 6, z: 7 },
                        FineSpec { e: 8, z: 8 },
                    ] {
                        for bits in [2u8, 4, 8] {
                            if g * bits as usize % 8 != 0 {
                                continue;
                            }
                            for how in [
                                CompactSearch::Near,
                                CompactSearch::Full,
                                CompactSearch::Cover,
                            ] {
                                let n = group_bytes_f(d, g, bits, spec);
                                // Two fills of the output: bytes neither path writes (the
                                // metadata's padding bits) keep the fill.
                                for fill in [0x00u8, 0xff] {
                                    let mut want = vec![fill; n];
                                    let mut got = vec![fill; n];
                                    encode_group_f_with(
                                        &rows, d, bits, &refs, spec, how, &mut want, None,
                                    );
                                    encode_group_f_with(
                                        &rows,
                                        d,
                                        bits,
                                        &refs,
                                        spec,
                                        how,
                                        &mut got,
                                        Some(v3),
                                    );
                                    assert_eq!(
                                        got, want,
                                        "d {d} g {g} kind {kind} {spec:?} bits {bits} {how:?}"
                                    );
                                }
                                groups += 1;
                            }
                        }
                    }
                }
            }
        }
        assert!(groups > 1000);
    }
}
