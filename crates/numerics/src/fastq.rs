//! Row kernels of the block quantizers, compiled for the best instruction set the CPU has
//! (AVX2+FMA where present) through `pulp`'s safe runtime dispatch; the scalar reference in
//! [`crate::quantize`] stays the definition.
//!
//! Every kernel produces the same bits as the reference ([`crate::quantize::encode_block`] after
//! the reference block fit): the same f32 operations in the same order (exact divisions where
//! the reference divides), only evaluated eight lanes at a time. Lane-structured reductions
//! (the 8-lane min/max of the statistics pass) keep the reference's lane assignment, so even
//! the sign of a zero minimum is the same. A kernel handles the whole groups of finite values
//! with a positive finite scale; it leaves every other group (ragged tail, NaN/Inf, all-zero
//! blocks) to the reference, listed in `pending`. `tests/block_fastpath.rs` checks each kernel
//! against the per-value reference API.
//!
//! The kernels are plain safe Rust written so that LLVM vectorizes them (fixed-size lane
//! arrays, `chunks_exact`, branch-free selects); `pulp::Arch::dispatch` compiles the
//! `#[inline(always)]` bodies once per instruction-set level and picks one at run time.

use crate::minifloat::{encode_fast, FastParams, FloatFormat, FAST_E4M3_SAT, FAST_E5M2_SAT};
use crate::mx::{self, MxScaleRule, SignRule};
use crate::nvfp4::Nvfp4Formula;
use crate::quantize::{params_from_range, Ctx, Kind, ScaleSearch};
use crate::rounding::Rounding;
use crate::tensor::{Granularity, ScaleDtype, Scheme};

/// A row kernel and its constants (chosen once per tensor).
#[derive(Clone, Copy)]
pub(crate) enum RowKernel {
    /// FP8 (E4M3/E5M2) elements with an f32/f16/bf16 scale, one code per byte, groups of `g`.
    Fp8 { kind: Kind, p: FastParams, g: usize },
    /// 4-bit integers (sym or asym), float scale, groups of `g` (a multiple of 16).
    Int4 { kind: Kind, g: usize },
    /// NVFP4 with the compressed-tensors formula, 16-groups, ties to even.
    Nvfp4Ct,
    /// MXFP4: E2M1 in 32-groups with an E8M0 scale.
    Mxfp4 {
        kind: Kind,
        thr: &'static [f32; 7],
        sign: SignRule,
    },
    /// NF4 (identity rank -> code table) with an f32 absmax scale, groups of `g` (16/32/64).
    Nf4 { g: usize },
}

impl RowKernel {
    /// The kernel for a scheme with one-row blocks of `bc` columns, if there is one.
    pub(crate) fn select(kind: Kind, scheme: &Scheme, ctx: &Ctx, bc: usize) -> Option<Self> {
        if ctx.seed.is_some() || ctx.search != ScaleSearch::AbsMax {
            return None;
        }
        let one_row = matches!(
            scheme.granularity,
            Granularity::PerGroup(_) | Granularity::PerChannel
        );
        if !one_row {
            return None;
        }
        let ne = ctx.rounding == Rounding::NearestEven;
        match kind {
            Kind::Float {
                fmt: fmt @ (FloatFormat::E4M3 | FloatFormat::E5M2),
                ..
            } if ne => Some(RowKernel::Fp8 {
                kind,
                p: if fmt == FloatFormat::E4M3 {
                    FAST_E4M3_SAT
                } else {
                    FAST_E5M2_SAT
                },
                g: bc,
            }),
            Kind::Int { bits: 4, .. } if ne && bc % 16 == 0 => {
                Some(RowKernel::Int4 { kind, g: bc })
            }
            Kind::FloatE4m3 {
                fmt: FloatFormat::E2M1,
            } if ne && bc == 16 && ctx.nvfp4 == Nvfp4Formula::CompressedTensors => {
                Some(RowKernel::Nvfp4Ct)
            }
            Kind::FloatPow2 {
                fmt: FloatFormat::E2M1,
            } if bc == 32 => Some(RowKernel::Mxfp4 {
                kind,
                thr: if ne {
                    &mx::E2M1_EVEN_T
                } else {
                    &mx::E2M1_AWAY_T
                },
                sign: if ctx.mx_rule == MxScaleRule::RoundUp175 {
                    SignRule::Less
                } else {
                    SignRule::Bit
                },
            }),
            Kind::Nf4 {
                dt: ScaleDtype::F32,
            } if matches!(bc, 16 | 32 | 64) && nf4_rank_is_code() => Some(RowKernel::Nf4 { g: bc }),
            _ => None,
        }
    }

    /// Group size along the row.
    pub(crate) fn group(&self) -> usize {
        match *self {
            RowKernel::Fp8 { g, .. } | RowKernel::Int4 { g, .. } | RowKernel::Nf4 { g, .. } => g,
            RowKernel::Nvfp4Ct => 16,
            RowKernel::Mxfp4 { .. } => 32,
        }
    }

    /// Quantize the whole groups of one row: packed codes into `drow`, scales into `srow`,
    /// zero points into `zrow`. Groups it leaves to the reference are pushed to `pending`
    /// (indices); the ragged tail group (if any) is never touched.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run(
        &self,
        x: &[f32],
        gs: f32,
        ctx: &Ctx,
        drow: &mut [u8],
        srow: &mut [f32],
        zrow: &mut [u8],
        pending: &mut Vec<usize>,
    ) {
        let job = RowJob {
            k: *self,
            x,
            gs,
            ctx,
            drow,
            srow,
            zrow,
            pending,
        };
        #[cfg(target_arch = "x86_64")]
        let Some(job) = avx2::run(job) else {
            return;
        };
        pulp::Arch::new().dispatch(job);
    }

    /// [`Self::run`] through the portable (auto-vectorized) kernels only (tests).
    #[cfg(test)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run_portable(
        &self,
        x: &[f32],
        gs: f32,
        ctx: &Ctx,
        drow: &mut [u8],
        srow: &mut [f32],
        zrow: &mut [u8],
        pending: &mut Vec<usize>,
    ) {
        pulp::Arch::new().dispatch(RowJob {
            k: *self,
            x,
            gs,
            ctx,
            drow,
            srow,
            zrow,
            pending,
        });
    }
}

/// One row of a [`RowKernel`]: run by [`pulp::Arch::dispatch`] for the portable kernels
/// (`with_simd` is monomorphised per instruction set and everything below it is
/// `#[inline(always)]`, so the whole kernel is compiled for that set), or wrapped with the
/// AVX2 token for the explicit AVX2 kernels.
struct RowJob<'a> {
    k: RowKernel,
    x: &'a [f32],
    gs: f32,
    ctx: &'a Ctx,
    drow: &'a mut [u8],
    srow: &'a mut [f32],
    zrow: &'a mut [u8],
    pending: &'a mut Vec<usize>,
}

impl pulp::WithSimd for RowJob<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let RowJob {
            k,
            x,
            gs,
            ctx,
            drow,
            srow,
            zrow,
            pending,
        } = self;
        match k {
            RowKernel::Fp8 { kind, p, g } => fp8_row(kind, &p, g, x, ctx, drow, srow, pending),
            RowKernel::Int4 { kind, g } => int4_row(kind, g, x, ctx, drow, srow, zrow, pending),
            RowKernel::Nvfp4Ct => nvfp4_ct_row(x, gs, drow, srow, pending),
            RowKernel::Mxfp4 { kind, thr, sign } => {
                mxfp4_row(kind, thr, sign, x, ctx, drow, srow, pending)
            }
            RowKernel::Nf4 { g } => match g {
                16 => nf4_row::<16, 8>(x, drow, srow, pending),
                32 => nf4_row::<32, 16>(x, drow, srow, pending),
                _ => nf4_row::<64, 32>(x, drow, srow, pending),
            },
        }
    }
}

/// NF4's table is sorted, so the rank among the midpoints is the code; the midpoints strictly
/// increase (the AVX2 kernel's binary search relies on it).
fn nf4_rank_is_code() -> bool {
    let enc = crate::quantize::nf4_encoder();
    enc.code_of_rank
        .iter()
        .enumerate()
        .all(|(i, &c)| c as usize == i)
        && enc.mids.windows(2).all(|w| w[0] < w[1])
}

/// Largest magnitude (as f32 bits) of a slice, 8 lanes; `>= 0x7f80_0000` means a NaN or an
/// infinity is present. For finite data `f32::from_bits` of it equals the reference `amax`.
#[inline(always)]
fn max_mag_bits(xs: &[f32]) -> u32 {
    let mut m = [0i32; 8];
    let mut ch = xs.chunks_exact(8);
    for c in &mut ch {
        for j in 0..8 {
            let b = (c[j].to_bits() & 0x7fff_ffff) as i32;
            m[j] = if b > m[j] { b } else { m[j] };
        }
    }
    for (j, &v) in ch.remainder().iter().enumerate() {
        let b = (v.to_bits() & 0x7fff_ffff) as i32;
        m[j] = if b > m[j] { b } else { m[j] };
    }
    m.iter().fold(0i32, |a, &v| if v > a { v } else { a }) as u32
}

/// Largest magnitude of a slice as f32 bits (`> 0x7f80_0000`: a NaN is present), with AVX2
/// where the CPU has it.
pub(crate) fn max_mag_bits_slice(xs: &[f32]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if let Some(b) = avx2::max_mag_bits_slice(xs) {
        return b;
    }
    max_mag_bits(xs)
}

/// Eight 4-bit codes (u32 lanes, each < 16) packed into four bytes, low nibble first:
/// code `l` lands in bits `4l..4l+4` of a little-endian u32.
#[inline(always)]
fn nib8(c: &[u32; 8], out: &mut [u8]) {
    let mut p = 0u32;
    for (l, &v) in c.iter().enumerate() {
        p |= v << (4 * l);
    }
    out.copy_from_slice(&p.to_le_bytes());
}

/// `c[i] += #(t < a[i])` over the thresholds, threshold loop outermost over a run-time length
/// so that the loop vectorizer (not the SLP vectorizer) handles the comparisons.
#[inline(always)]
fn count_above(a: &[f32], c: &mut [u32], thr: &[f32]) {
    let n = a.len().min(c.len());
    let (a, c) = (&a[..n], &mut c[..n]);
    for &t in thr {
        for (c, &a) in c.iter_mut().zip(a) {
            *c += u32::from(a > t);
        }
    }
}

/// Pack 4-bit codes (u32 lanes) eight at a time (`c.len()` a multiple of 8).
#[inline(always)]
fn pack_nibbles(c: &[u32], out: &mut [u8]) {
    for (c8, o4) in c.chunks_exact(8).zip(out.chunks_exact_mut(4)) {
        if let Ok(c8) = <&[u32; 8]>::try_from(c8) {
            nib8(c8, o4);
        }
    }
}

/// Scaled magnitude and sign bit (`<< 3`) of E2M1 inputs `y = f(x)`.
#[inline(always)]
fn e2m1_prep(xs: &[f32], a: &mut [f32], c: &mut [u32], f: impl Fn(f32) -> f32, sign: SignRule) {
    for ((a, c), &x) in a.iter_mut().zip(c.iter_mut()).zip(xs) {
        let y = f(x);
        *a = y.abs();
        *c = match sign {
            SignRule::Bit => y.to_bits() >> 31,
            SignRule::Less => u32::from(y < 0.0),
        } << 3;
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn fp8_row(
    kind: Kind,
    p: &FastParams,
    g: usize,
    x: &[f32],
    ctx: &Ctx,
    drow: &mut [u8],
    srow: &mut [f32],
    pending: &mut Vec<usize>,
) {
    let full = x.len() / g;
    for j in 0..full {
        let xs = &x[j * g..(j + 1) * g];
        let b = max_mag_bits(xs);
        if b >= 0x7f80_0000 {
            pending.push(j);
            continue;
        }
        let c = f32::from_bits(b);
        let s = params_from_range(kind, -c, c, c, 0.0, 1.0, ctx).scale;
        if !(s > 0.0 && s.is_finite()) {
            pending.push(j);
            continue;
        }
        srow[j] = s;
        let out = &mut drow[j * g..(j + 1) * g];
        let mut xb = xs.chunks_exact(16);
        let mut ob = out.chunks_exact_mut(16);
        for (o, xc) in (&mut ob).zip(&mut xb) {
            let mut t = [0u8; 16];
            for i in 0..16 {
                t[i] = encode_fast(p, xc[i] / s);
            }
            o.copy_from_slice(&t);
        }
        for (o, &v) in ob.into_remainder().iter_mut().zip(xb.remainder()) {
            *o = encode_fast(p, v / s);
        }
    }
}

/// The reference statistics pass (`quantize::stats`) on a group whose length is a multiple
/// of 8: `(min, max, no NaN)` with the same 8-lane compare-select order.
#[inline(always)]
fn min_max_lanes(xs: &[f32]) -> (f32, f32, bool) {
    let mut mnv = [f32::INFINITY; 8];
    let mut mxv = [f32::NEG_INFINITY; 8];
    let mut nanv = [0u32; 8];
    for c in xs.chunks_exact(8) {
        for j in 0..8 {
            let v = c[j];
            mnv[j] = if v < mnv[j] { v } else { mnv[j] };
            mxv[j] = if v > mxv[j] { v } else { mxv[j] };
            nanv[j] |= u32::from(v.is_nan());
        }
    }
    let mn = mnv
        .iter()
        .fold(f32::INFINITY, |a, &b| if b < a { b } else { a });
    let mx = mxv
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    (mn, mx, nanv.iter().all(|&b| b == 0))
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn int4_row(
    kind: Kind,
    g: usize,
    x: &[f32],
    ctx: &Ctx,
    drow: &mut [u8],
    srow: &mut [f32],
    zrow: &mut [u8],
    pending: &mut Vec<usize>,
) {
    let full = x.len() / g;
    for j in 0..full {
        let xs = &x[j * g..(j + 1) * g];
        let (lo, hi, no_nan) = min_max_lanes(xs);
        if !no_nan || lo == f32::NEG_INFINITY || hi == f32::INFINITY {
            pending.push(j);
            continue;
        }
        // as the reference `stats`: abs() so that an all-zero block has a +0 absmax
        let amax = (-lo).max(hi).abs();
        let p = params_from_range(kind, lo, hi, amax, 0.0, 1.0, ctx);
        let s = p.scale;
        if !(s > 0.0 && s.is_finite()) {
            pending.push(j);
            continue;
        }
        let zp = p.zero_point.unwrap_or(8);
        srow[j] = s;
        zrow[j] = p.zero_point.unwrap_or(0);
        let zpf = zp as f32;
        let (qlo, qhi) = (-zpf, 15.0 - zpf);
        let zpi = zp as i32;
        let out = &mut drow[j * g / 2..(j + 1) * g / 2];
        for (xc, oc) in xs.chunks_exact(8).zip(out.chunks_exact_mut(4)) {
            let mut c = [0u32; 8];
            for i in 0..8 {
                let v = (xc[i] / s).max(qlo).min(qhi) + 12_582_912.0;
                c[i] = ((v.to_bits() as i32 - 0x4B40_0000) + zpi) as u32;
            }
            nib8(&c, oc);
        }
    }
}

/// [`crate::nvfp4::e4m3_round`] on eight non-NaN values of magnitude at most 448 (the same
/// arithmetic, both branches evaluated and selected).
#[inline(always)]
fn e4m3_round_lanes(v: [f32; 8]) -> [f32; 8] {
    let mut r = [0f32; 8];
    for i in 0..8 {
        let a = v[i].abs();
        let sub = ((a * 512.0 + 12_582_912.0) - 12_582_912.0) * (1.0 / 512.0);
        let b = a.to_bits();
        let norm = f32::from_bits((b + 0x7_FFFF + ((b >> 20) & 1)) & !0xF_FFFF);
        let m = if a < 0.015625 { sub } else { norm };
        r[i] = f32::from_bits(m.to_bits() | (v[i].to_bits() & 0x8000_0000));
    }
    r
}

#[inline(always)]
fn nvfp4_ct_row(x: &[f32], gs: f32, drow: &mut [u8], srow: &mut [f32], pending: &mut Vec<usize>) {
    const G: usize = 16;
    let full = x.len() / G;
    let mut j0 = 0;
    // eight groups at a time: the eight block scales are computed in one vector
    while j0 < full {
        let n = (full - j0).min(8);
        let mut amax = [0f32; 8];
        let mut ok = [true; 8];
        for k in 0..n {
            let b = max_mag_bits(&x[(j0 + k) * G..(j0 + k + 1) * G]);
            ok[k] = b < 0x7f80_0000;
            amax[k] = if ok[k] { f32::from_bits(b) } else { 0.0 };
        }
        // nvfp4::block_scale_ct, lane-wise
        let mut v = [0f32; 8];
        for i in 0..8 {
            v[i] = (gs * (amax[i] / 6.0)).clamp(-448.0, 448.0);
        }
        let r = e4m3_round_lanes(v);
        let mut s = [0f32; 8];
        let mut d = [0f32; 8];
        for i in 0..8 {
            s[i] = if r[i] == 0.0 { 0.125 } else { r[i] };
            d[i] = s[i] / gs;
        }
        let mut a = [0f32; 8 * G];
        let mut c = [0u32; 8 * G];
        for k in 0..n {
            let j = j0 + k;
            let (a, c) = (&mut a[k * G..(k + 1) * G], &mut c[k * G..(k + 1) * G]);
            if !ok[k] {
                // left to the reference (which rewrites these bytes)
                pending.push(j);
                continue;
            }
            srow[j] = s[k];
            let dk = d[k];
            e2m1_prep(&x[j * G..(j + 1) * G], a, c, |v| v / dk, SignRule::Less);
        }
        count_above(&a[..n * G], &mut c[..n * G], &mx::E2M1_EVEN_T);
        pack_nibbles(&c[..n * G], &mut drow[j0 * G / 2..(j0 + n) * G / 2]);
        j0 += n;
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn mxfp4_row(
    kind: Kind,
    thr: &[f32; 7],
    sign: SignRule,
    x: &[f32],
    ctx: &Ctx,
    drow: &mut [u8],
    srow: &mut [f32],
    pending: &mut Vec<usize>,
) {
    const G: usize = 32;
    const NB: usize = 4;
    let full = x.len() / G;
    let mut j0 = 0;
    while j0 < full {
        let n = (full - j0).min(NB);
        let mut a = [0f32; NB * G];
        let mut c = [0u32; NB * G];
        for k in 0..n {
            let j = j0 + k;
            let (a, c) = (&mut a[k * G..(k + 1) * G], &mut c[k * G..(k + 1) * G]);
            let xs = &x[j * G..(j + 1) * G];
            let b = max_mag_bits(xs);
            if b >= 0x7f80_0000 {
                pending.push(j);
                continue;
            }
            let cm = f32::from_bits(b);
            let s = params_from_range(kind, -cm, cm, cm, 0.0, 1.0, ctx).scale;
            if !(s > 0.0 && s.is_finite()) {
                pending.push(j);
                continue;
            }
            srow[j] = s;
            let inv = 1.0 / s;
            match sign {
                SignRule::Bit => e2m1_prep(xs, a, c, |v| v * inv, SignRule::Bit),
                SignRule::Less => e2m1_prep(xs, a, c, |v| v * inv, SignRule::Less),
            }
        }
        count_above(&a[..n * G], &mut c[..n * G], thr);
        pack_nibbles(&c[..n * G], &mut drow[j0 * G / 2..(j0 + n) * G / 2]);
        j0 += n;
    }
}

#[inline(always)]
fn nf4_row<const G: usize, const B: usize>(
    x: &[f32],
    drow: &mut [u8],
    srow: &mut [f32],
    pending: &mut Vec<usize>,
) {
    const CH: usize = 128;
    let mids = &crate::quantize::nf4_encoder().mids;
    let nb = CH / G;
    let full = x.len() / G;
    let mut j0 = 0;
    while j0 < full {
        let n = (full - j0).min(nb);
        let mut y = [0f32; CH];
        let mut c = [0u32; CH];
        for k in 0..n {
            let j = j0 + k;
            let xs = &x[j * G..(j + 1) * G];
            let b = max_mag_bits(xs);
            // NaN/Inf and all-zero groups: reference (which rewrites these bytes)
            if b >= 0x7f80_0000 || b == 0 {
                pending.push(j);
                continue;
            }
            // scale = round_scale(amax, F32) = amax
            let s = f32::from_bits(b);
            srow[j] = s;
            for (y, &v) in y[k * G..(k + 1) * G].iter_mut().zip(xs) {
                *y = v / s;
            }
        }
        count_above(&y[..n * G], &mut c[..n * G], mids);
        pack_nibbles(&c[..n * G], &mut drow[j0 * B..(j0 + n) * B]);
        j0 += n;
    }
}

/// E4M3 value of a code by its bits (the f32 exponent re-biased by 120; the subnormals
/// `m * 2^-9` exact), with the two NaN codes taken from the reference table `nan = (lut[0x7f],
/// lut[0xff])`. Equal to [`FloatFormat::decode`] for all 256 codes (tested).
#[inline(always)]
pub(crate) fn e4m3_decode_bits(c: u8, nan: (f32, f32)) -> f32 {
    let c = c as u32;
    let m = c & 0x7f;
    let sign = (c & 0x80) << 24;
    let norm = f32::from_bits((m << 20) + (120 << 23));
    let sub = (m as f32) * (1.0 / 512.0);
    let v = f32::from_bits((if m < 8 { sub } else { norm }).to_bits() | sign);
    let n = if sign != 0 { nan.1 } else { nan.0 };
    if m == 0x7f {
        n
    } else {
        v
    }
}

/// Dequantize one row of E4M3 codes (one per byte) in groups of `g`: `(E4M3(code) - z) * s`
/// with `(z, s) = mult(j)` for group `j`, the same arithmetic as the table path.
pub(crate) fn dequant_e4m3_row(
    row: &[u8],
    out: &mut [f32],
    g: usize,
    nan: (f32, f32),
    mult: impl Fn(usize) -> (f32, f32),
) {
    struct Job<'a, M> {
        row: &'a [u8],
        out: &'a mut [f32],
        g: usize,
        nan: (f32, f32),
        mult: M,
    }
    impl<M: Fn(usize) -> (f32, f32)> pulp::WithSimd for Job<'_, M> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _simd: S) {
            let Job {
                row,
                out,
                g,
                nan,
                mult,
            } = self;
            for (j, (o, c)) in out.chunks_mut(g).zip(row.chunks(g)).enumerate() {
                let (z, s) = mult(j);
                let mut oc = o.chunks_exact_mut(8);
                let mut cc = c.chunks_exact(8);
                for (o8, c8) in (&mut oc).zip(&mut cc) {
                    for l in 0..8 {
                        o8[l] = (e4m3_decode_bits(c8[l], nan) - z) * s;
                    }
                }
                for (o1, &c1) in oc.into_remainder().iter_mut().zip(cc.remainder()) {
                    *o1 = (e4m3_decode_bits(c1, nan) - z) * s;
                }
            }
        }
    }
    pulp::Arch::new().dispatch(Job {
        row,
        out,
        g,
        nan,
        mult,
    });
}

/// AVX2 kernels with explicit intrinsics, called through `pulp`'s `V3` token: `V3::try_new`
/// checks the CPU once, and `V3::vectorize` runs the `#[inline(always)]` body inside a function
/// compiled with AVX2+FMA, so the token's (safe) intrinsic methods become single instructions.
/// Each kernel computes exactly what the portable kernel above computes (same f32 operations,
/// no FMA contraction, the same 8-lane reduction order), eight lanes per instruction; codes
/// are packed to nibbles in registers.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Ctx, Kind, RowJob, RowKernel, SignRule};
    use crate::mx::MxScaleRule;
    use crate::quantize::params_from_range;
    use bytemuck::cast;
    use core::arch::x86_64::{__m128i, __m256, __m256i, _CMP_GT_OQ, _CMP_LT_OQ, _CMP_UNORD_Q};
    use pulp::x86::V3;

    /// Thin wrappers over the token's intrinsics (all inlined into the AVX2 body).
    #[derive(Clone, Copy)]
    struct K(V3);

    impl K {
        #[inline(always)]
        fn ld(self, a: &[f32; 8]) -> __m256 {
            cast(*a)
        }
        #[inline(always)]
        fn splat(self, v: f32) -> __m256 {
            self.0.avx._mm256_set1_ps(v)
        }
        #[inline(always)]
        fn splati(self, v: i32) -> __m256i {
            self.0.avx._mm256_set1_epi32(v)
        }
        #[inline(always)]
        fn bits(self, v: __m256) -> __m256i {
            self.0.avx._mm256_castps_si256(v)
        }
        #[inline(always)]
        fn flt(self, v: __m256i) -> __m256 {
            self.0.avx._mm256_castsi256_ps(v)
        }
        #[inline(always)]
        fn div(self, a: __m256, b: __m256) -> __m256 {
            self.0.avx._mm256_div_ps(a, b)
        }
        #[inline(always)]
        fn mul(self, a: __m256, b: __m256) -> __m256 {
            self.0.avx._mm256_mul_ps(a, b)
        }
        #[inline(always)]
        fn add(self, a: __m256, b: __m256) -> __m256 {
            self.0.avx._mm256_add_ps(a, b)
        }
        #[inline(always)]
        fn sub(self, a: __m256, b: __m256) -> __m256 {
            self.0.avx._mm256_sub_ps(a, b)
        }
        /// `if a < b { a } else { b }` per lane (b when either is NaN).
        #[inline(always)]
        fn min(self, a: __m256, b: __m256) -> __m256 {
            self.0.avx._mm256_min_ps(a, b)
        }
        /// `if a > b { a } else { b }` per lane (b when either is NaN).
        #[inline(always)]
        fn max(self, a: __m256, b: __m256) -> __m256 {
            self.0.avx._mm256_max_ps(a, b)
        }
        /// All-ones lanes where `a > b` (false on NaN).
        #[inline(always)]
        fn gt(self, a: __m256, b: __m256) -> __m256i {
            self.bits(self.0.avx._mm256_cmp_ps::<_CMP_GT_OQ>(a, b))
        }
        /// All-ones lanes where `a < b` (false on NaN).
        #[inline(always)]
        fn lt(self, a: __m256, b: __m256) -> __m256i {
            self.bits(self.0.avx._mm256_cmp_ps::<_CMP_LT_OQ>(a, b))
        }
        /// All-ones lanes where `a` is NaN.
        #[inline(always)]
        fn isnan(self, a: __m256) -> __m256i {
            self.bits(self.0.avx._mm256_cmp_ps::<_CMP_UNORD_Q>(a, a))
        }
        /// `m ? b : a` per lane (`m` all-ones or zero).
        #[inline(always)]
        fn sel(self, a: __m256, b: __m256, m: __m256i) -> __m256 {
            self.0.avx._mm256_blendv_ps(a, b, self.flt(m))
        }
        #[inline(always)]
        fn and(self, a: __m256i, b: __m256i) -> __m256i {
            self.0.avx2._mm256_and_si256(a, b)
        }
        #[inline(always)]
        fn or(self, a: __m256i, b: __m256i) -> __m256i {
            self.0.avx2._mm256_or_si256(a, b)
        }
        #[inline(always)]
        fn addi(self, a: __m256i, b: __m256i) -> __m256i {
            self.0.avx2._mm256_add_epi32(a, b)
        }
        #[inline(always)]
        fn subi(self, a: __m256i, b: __m256i) -> __m256i {
            self.0.avx2._mm256_sub_epi32(a, b)
        }
        #[inline(always)]
        fn maxi(self, a: __m256i, b: __m256i) -> __m256i {
            self.0.avx2._mm256_max_epi32(a, b)
        }
        /// Magnitude bits `bits(v) & 0x7fff_ffff` (as non-negative i32).
        #[inline(always)]
        fn mag(self, v: __m256) -> __m256i {
            self.and(self.bits(v), self.splati(0x7fff_ffff))
        }
        /// `max(unpacklo32(a, b), unpackhi32(a, b))` (a transpose-reduce step).
        #[inline(always)]
        fn max_lo_hi32(self, a: __m256i, b: __m256i) -> __m256i {
            let a2 = self.0.avx2;
            self.maxi(
                a2._mm256_unpacklo_epi32(a, b),
                a2._mm256_unpackhi_epi32(a, b),
            )
        }
        /// `max(unpacklo64(a, b), unpackhi64(a, b))`.
        #[inline(always)]
        fn max_lo_hi64(self, a: __m256i, b: __m256i) -> __m256i {
            let a2 = self.0.avx2;
            self.maxi(
                a2._mm256_unpacklo_epi64(a, b),
                a2._mm256_unpackhi_epi64(a, b),
            )
        }
        /// Lane `k` = the largest lane of `m[k]` (non-negative i32 lanes): an 8x8
        /// transpose-reduce.
        #[inline(always)]
        fn max8(self, m: [__m256i; 8]) -> __m256i {
            let a2 = self.0.avx2;
            let (t01, t23) = (self.max_lo_hi32(m[0], m[1]), self.max_lo_hi32(m[2], m[3]));
            let (t45, t67) = (self.max_lo_hi32(m[4], m[5]), self.max_lo_hi32(m[6], m[7]));
            let (u03, u47) = (self.max_lo_hi64(t01, t23), self.max_lo_hi64(t45, t67));
            self.maxi(
                a2._mm256_permute2x128_si256::<0x20>(u03, u47),
                a2._mm256_permute2x128_si256::<0x31>(u03, u47),
            )
        }
        /// Largest lane of non-negative i32 lanes.
        #[inline(always)]
        fn hmax(self, v: __m256i) -> u32 {
            let (sse2, sse41) = (self.0.sse2, self.0.sse4_1);
            let h = sse41._mm_max_epi32(
                self.0.avx._mm256_castsi256_si128(v),
                self.0.avx2._mm256_extracti128_si256::<1>(v),
            );
            let h = sse41._mm_max_epi32(h, sse2._mm_shuffle_epi32::<0b01_00_11_10>(h));
            let h = sse41._mm_max_epi32(h, sse2._mm_shuffle_epi32::<0b10_11_00_01>(h));
            sse2._mm_cvtsi128_si32(h) as u32
        }
        /// [`super::max_mag_bits`] of whole vectors.
        #[inline(always)]
        fn max_mag(self, xs: &[[f32; 8]]) -> u32 {
            let mut m = self.0.avx._mm256_setzero_si256();
            for v in xs {
                m = self.maxi(m, self.mag(self.ld(v)));
            }
            self.hmax(m)
        }
        /// `#(t < a)` over the thresholds (as i32 lanes).
        #[inline(always)]
        fn count(self, a: __m256, thr: &[f32]) -> __m256i {
            let mut c = self.0.avx._mm256_setzero_si256();
            for &t in thr {
                c = self.subi(c, self.gt(a, self.splat(t)));
            }
            c
        }
        /// Thirty-two 4-bit codes (i32 lanes, each < 16) as sixteen bytes, low nibble first.
        #[inline(always)]
        fn pack32(self, c: [__m256i; 4]) -> [u8; 16] {
            let a2 = self.0.avx2;
            let a = a2._mm256_packus_epi32(c[0], c[1]);
            let b = a2._mm256_packus_epi32(c[2], c[3]);
            // per 128-bit lane: bytes 0..4 of c0, c1, c2, c3 (low lane) / 4..8 (high lane)
            let p = a2._mm256_packus_epi16(a, b);
            // u16: even byte + 16 * odd byte
            let m = a2._mm256_maddubs_epi16(p, self.0.avx._mm256_set1_epi16(0x1001));
            let r = a2._mm256_packus_epi16(m, m);
            let lo = self.0.avx._mm256_castsi256_si128(r);
            let hi = a2._mm256_extracti128_si256::<1>(r);
            cast::<__m128i, [u8; 16]>(self.0.sse2._mm_unpacklo_epi16(lo, hi))
        }
        /// Sixteen 4-bit codes as eight bytes, low nibble first.
        #[inline(always)]
        fn pack16(self, c0: __m256i, c1: __m256i) -> [u8; 8] {
            let a2 = self.0.avx2;
            let a = a2._mm256_packus_epi32(c0, c1);
            let p = a2._mm256_packus_epi16(a, a);
            let m = a2._mm256_maddubs_epi16(p, self.0.avx._mm256_set1_epi16(0x1001));
            let r = a2._mm256_packus_epi16(m, m);
            let lo = self.0.avx._mm256_castsi256_si128(r);
            let hi = a2._mm256_extracti128_si256::<1>(r);
            let o = cast::<__m128i, [u8; 16]>(self.0.sse2._mm_unpacklo_epi16(lo, hi));
            let mut r8 = [0u8; 8];
            r8.copy_from_slice(&o[..8]);
            r8
        }
        /// E2M1 magnitude code of `a = |y|` (not NaN) rounded to nearest, ties to even: the
        /// same as `#(t < a)` over `E2M1_EVEN_T`, by arithmetic. Below 1 the code is `2a`
        /// rounded to an integer (adding 1.5 * 2^23); from 1 up it is the f32 exponent and
        /// top mantissa bit, rounded at bit 22 with ties to even, re-based so that 1.0 is 2;
        /// then saturated at 7.
        #[inline(always)]
        fn e2m1_even_mag(self, a: __m256) -> __m256i {
            let a2 = self.0.avx2;
            let sub = self.subi(
                self.bits(self.add(self.add(a, a), self.splat(12_582_912.0))),
                self.splati(0x4B40_0000),
            );
            let b = self.bits(a);
            let lsb = self.and(a2._mm256_srli_epi32::<22>(b), self.splati(1));
            let r = self.addi(self.addi(b, self.splati(0x1F_FFFF - (252 << 22))), lsb);
            let norm = a2._mm256_srli_epi32::<22>(r);
            let c = self.bits(self.sel(self.flt(norm), self.flt(sub), self.lt(a, self.splat(1.0))));
            a2._mm256_min_epi32(c, self.splati(7))
        }
        /// E2M1 code (magnitude count | sign << 3) of `y`, with the rounding (`EVEN`: ties to
        /// even, else ties away: `#(t < |y|)` over `E2M1_AWAY_T`) and the sign rule (`BIT`:
        /// [`SignRule::Bit`], else [`SignRule::Less`]) fixed at compile time.
        #[inline(always)]
        fn e2m1c<const EVEN: bool, const BIT: bool>(self, y: __m256) -> __m256i {
            let a2 = self.0.avx2;
            let a = self.flt(self.mag(y));
            let c = if EVEN {
                self.e2m1_even_mag(a)
            } else {
                self.count(a, &crate::mx::E2M1_AWAY_T)
            };
            let sgn = if BIT {
                a2._mm256_srli_epi32::<31>(self.bits(y))
            } else {
                self.and(self.lt(y, self.0.avx._mm256_setzero_ps()), self.splati(1))
            };
            self.or(c, a2._mm256_slli_epi32::<3>(sgn))
        }
    }

    /// [`K::e2m1_even_mag`] of each value (for tests), `None` without AVX2.
    #[cfg(test)]
    pub(super) fn e2m1_even_mags(xs: &[f32]) -> Option<Vec<u32>> {
        let s = K(V3::try_new()?);
        let mut out = Vec::with_capacity(xs.len() + 8);
        for c in xs.chunks(8) {
            let mut v = [0f32; 8];
            v[..c.len()].copy_from_slice(c);
            let r = cast::<__m256i, [u32; 8]>(s.e2m1_even_mag(s.ld(&v)));
            out.extend_from_slice(&r[..c.len()]);
        }
        Some(out)
    }

    /// [`super::max_mag_bits`] of any slice, `None` without AVX2.
    pub(super) fn max_mag_bits_slice(xs: &[f32]) -> Option<u32> {
        let simd = V3::try_new()?;
        Some(simd.vectorize(MaxMag { s: K(simd), xs }))
    }

    struct MaxMag<'a> {
        s: K,
        xs: &'a [f32],
    }

    impl pulp::NullaryFnOnce for MaxMag<'_> {
        type Output = u32;

        #[inline(always)]
        fn call(self) -> u32 {
            let MaxMag { s, xs } = self;
            let (v, tail) = pulp::as_arrays::<8, f32>(xs);
            // four accumulators (the max has a latency of one, loads come two per cycle)
            let z = s.0.avx._mm256_setzero_si256();
            let mut m = [z; 4];
            let mut c4 = v.chunks_exact(4);
            for c in &mut c4 {
                for (mk, x) in m.iter_mut().zip(c) {
                    *mk = s.maxi(*mk, s.mag(s.ld(x)));
                }
            }
            for x in c4.remainder() {
                m[0] = s.maxi(m[0], s.mag(s.ld(x)));
            }
            let mut b = s.hmax(s.maxi(s.maxi(m[0], m[1]), s.maxi(m[2], m[3])));
            for t in tail {
                b = b.max(t.to_bits() & 0x7fff_ffff);
            }
            b
        }
    }

    /// Run the job with AVX2 if the CPU has it and there is a kernel for it here; otherwise
    /// hand it back (for the portable kernels).
    pub(super) fn run(job: RowJob<'_>) -> Option<RowJob<'_>> {
        if matches!(job.k, RowKernel::Fp8 { .. }) {
            return Some(job);
        }
        let Some(simd) = V3::try_new() else {
            return Some(job);
        };
        simd.vectorize(Job { s: K(simd), job });
        None
    }

    /// A [`RowJob`] with the AVX2 token, for `V3::vectorize`.
    struct Job<'a> {
        s: K,
        job: RowJob<'a>,
    }

    impl pulp::NullaryFnOnce for Job<'_> {
        type Output = ();

        #[inline(always)]
        fn call(self) {
            let Job {
                s,
                job:
                    RowJob {
                        k,
                        x,
                        gs,
                        ctx,
                        drow,
                        srow,
                        zrow,
                        pending,
                    },
            } = self;
            match k {
                RowKernel::Fp8 { .. } => {}
                RowKernel::Int4 { kind, g } => {
                    int4_row(s, kind, g, x, ctx, drow, srow, zrow, pending)
                }
                RowKernel::Nvfp4Ct => nvfp4_ct_row(s, x, gs, drow, srow, pending),
                RowKernel::Mxfp4 { thr, sign, .. } => {
                    let rule = ctx.mx_rule;
                    let even = *thr == crate::mx::E2M1_EVEN_T;
                    match (even, sign) {
                        (true, SignRule::Bit) => {
                            mxfp4_row::<true, true>(s, rule, x, drow, srow, pending)
                        }
                        (true, SignRule::Less) => {
                            mxfp4_row::<true, false>(s, rule, x, drow, srow, pending)
                        }
                        (false, SignRule::Bit) => {
                            mxfp4_row::<false, true>(s, rule, x, drow, srow, pending)
                        }
                        (false, SignRule::Less) => {
                            mxfp4_row::<false, false>(s, rule, x, drow, srow, pending)
                        }
                    }
                }
                RowKernel::Nf4 { g } => nf4_row(s, g, x, drow, srow, pending),
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn int4_row(
        s: K,
        kind: Kind,
        g: usize,
        x: &[f32],
        ctx: &Ctx,
        drow: &mut [u8],
        srow: &mut [f32],
        zrow: &mut [u8],
        pending: &mut Vec<usize>,
    ) {
        for (j, ((xs, out), (sj, zj))) in x
            .chunks_exact(g)
            .zip(drow.chunks_exact_mut(g / 2))
            .zip(srow.iter_mut().zip(zrow.iter_mut()))
            .enumerate()
        {
            let (xv, _) = pulp::as_arrays::<8, f32>(xs);
            // the reference's 8-lane statistics pass
            let mut mnv = s.splat(f32::INFINITY);
            let mut mxv = s.splat(f32::NEG_INFINITY);
            let mut nan = s.0.avx._mm256_setzero_si256();
            for v in xv {
                let v = s.ld(v);
                mnv = s.min(v, mnv);
                mxv = s.max(v, mxv);
                nan = s.or(nan, s.isnan(v));
            }
            if s.0.avx._mm256_movemask_ps(s.flt(nan)) != 0 {
                pending.push(j);
                continue;
            }
            let (mnv, mxv) = (cast::<__m256, [f32; 8]>(mnv), cast::<__m256, [f32; 8]>(mxv));
            let lo = mnv
                .iter()
                .fold(f32::INFINITY, |a, &b| if b < a { b } else { a });
            let hi = mxv
                .iter()
                .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
            if lo == f32::NEG_INFINITY || hi == f32::INFINITY {
                pending.push(j);
                continue;
            }
            let amax = (-lo).max(hi).abs();
            let p = params_from_range(kind, lo, hi, amax, 0.0, 1.0, ctx);
            let sc = p.scale;
            if !(sc > 0.0 && sc.is_finite()) {
                pending.push(j);
                continue;
            }
            let zp = p.zero_point.unwrap_or(8);
            *sj = sc;
            *zj = p.zero_point.unwrap_or(0);
            let zpf = zp as f32;
            let (qlo, qhi) = (s.splat(-zpf), s.splat(15.0 - zpf));
            let (vs, magic) = (s.splat(sc), s.splat(12_582_912.0));
            let off = s.splati((zp as i32).wrapping_sub(0x4B40_0000));
            let p = Int4Code {
                vs,
                qlo,
                qhi,
                magic,
                off,
            };
            let mut oc = out.chunks_exact_mut(16);
            let mut xc = xv.chunks_exact(4);
            for (o, v) in (&mut oc).zip(&mut xc) {
                o.copy_from_slice(&s.pack32([
                    p.code(s, &v[0]),
                    p.code(s, &v[1]),
                    p.code(s, &v[2]),
                    p.code(s, &v[3]),
                ]));
            }
            if let ([v0, v1], o) = (xc.remainder(), oc.into_remainder()) {
                o.copy_from_slice(&s.pack16(p.code(s, v0), p.code(s, v1)));
            }
        }
    }

    /// Constants of one INT4 group: `clamp(x / s) + 1.5 * 2^23`, re-based bits + zero point.
    #[derive(Clone, Copy)]
    struct Int4Code {
        vs: __m256,
        qlo: __m256,
        qhi: __m256,
        magic: __m256,
        off: __m256i,
    }

    impl Int4Code {
        #[inline(always)]
        fn code(&self, s: K, v: &[f32; 8]) -> __m256i {
            let q = s.add(
                s.min(s.max(s.div(s.ld(v), self.vs), self.qlo), self.qhi),
                self.magic,
            );
            s.addi(s.bits(q), self.off)
        }
    }

    /// Eight NVFP4 groups (128 values): codes into `out`, block scales and "finite" flags.
    #[inline(always)]
    fn nvfp4_batch(s: K, xv: &[[f32; 8]], gs: f32, out: &mut [u8]) -> ([f32; 8], i32) {
        let (a2, avx) = (s.0.avx2, s.0.avx);
        // per-group magnitude maxima, then an 8x8 transpose-reduce: lane k = group k
        let mut m = [avx._mm256_setzero_si256(); 8];
        for (mk, v) in m.iter_mut().zip(xv.chunks_exact(2)) {
            *mk = s.maxi(s.mag(s.ld(&v[0])), s.mag(s.ld(&v[1])));
        }
        let amb = s.max8(m);
        // finite: bits < 0x7f80_0000; the others get amax 0 (scale unused)
        let ok = a2._mm256_cmpgt_epi32(s.splati(0x7f80_0000), amb);
        let amax = s.flt(s.and(amb, ok));
        // nvfp4::block_scale_ct lane-wise: clamp(gs * (amax / 6)), e4m3_round, 0 -> 0.125
        let vg = s.splat(gs);
        let v = s.min(
            s.max(s.mul(vg, s.div(amax, s.splat(6.0))), s.splat(-448.0)),
            s.splat(448.0),
        );
        let a = s.flt(s.mag(v));
        let m512 = s.splat(12_582_912.0);
        let sub = s.mul(
            s.sub(s.add(s.mul(a, s.splat(512.0)), m512), m512),
            s.splat(1.0 / 512.0),
        );
        let b = s.bits(a);
        let lsb = s.and(a2._mm256_srli_epi32::<20>(b), s.splati(1));
        let nb = s.and(
            s.addi(s.addi(b, s.splati(0x7_FFFF)), lsb),
            s.splati(!0xF_FFFF),
        );
        let r = s.sel(s.flt(nb), sub, s.lt(a, s.splat(0.015625)));
        let r = s.flt(s.or(s.bits(r), s.and(s.bits(v), s.splati(i32::MIN))));
        let zero = avx._mm256_setzero_ps();
        let sc = s.sel(
            r,
            s.splat(0.125),
            s.bits(avx._mm256_cmp_ps::<{ core::arch::x86_64::_CMP_EQ_OQ }>(r, zero)),
        );
        let d = cast::<__m256, [f32; 8]>(s.div(sc, vg));
        let okm = avx._mm256_movemask_ps(s.flt(ok));
        for ((v, o), dk) in xv.chunks_exact(4).zip(out.chunks_exact_mut(16)).zip(
            // two groups per 32 values
            d.chunks_exact(2),
        ) {
            let (d0, d1) = (s.splat(dk[0]), s.splat(dk[1]));
            let c = [
                s.e2m1c::<true, false>(s.div(s.ld(&v[0]), d0)),
                s.e2m1c::<true, false>(s.div(s.ld(&v[1]), d0)),
                s.e2m1c::<true, false>(s.div(s.ld(&v[2]), d1)),
                s.e2m1c::<true, false>(s.div(s.ld(&v[3]), d1)),
            ];
            o.copy_from_slice(&s.pack32(c));
        }
        (cast::<__m256, [f32; 8]>(sc), okm)
    }

    #[inline(always)]
    fn nvfp4_ct_row(
        s: K,
        x: &[f32],
        gs: f32,
        drow: &mut [u8],
        srow: &mut [f32],
        pending: &mut Vec<usize>,
    ) {
        batched_row(16, x, drow, srow, pending, |xv, out| {
            nvfp4_batch(s, xv, gs, out)
        });
    }

    /// One row of a 16- or 32-value-group FP4 format, eight groups at a time: `batch` writes
    /// eight groups' codes and returns their scales and a bit mask of the groups it encoded
    /// (finite values). The last groups of a row go through it zero-padded; the groups it
    /// leaves are queued in `pending` for the reference (which rewrites their bytes).
    #[inline(always)]
    fn batched_row(
        g: usize,
        x: &[f32],
        drow: &mut [u8],
        srow: &mut [f32],
        pending: &mut Vec<usize>,
        mut batch: impl FnMut(&[[f32; 8]], &mut [u8]) -> ([f32; 8], i32),
    ) {
        debug_assert!(g == 16 || g == 32);
        let full = x.len() / g;
        let mut j0 = 0;
        while j0 < full {
            let n = (full - j0).min(8);
            let xs = &x[j0 * g..(j0 + n) * g];
            let out = &mut drow[j0 * g / 2..(j0 + n) * g / 2];
            let (sc, ok) = if n == 8 {
                batch(pulp::as_arrays::<8, f32>(xs).0, out)
            } else {
                let mut xt = [0f32; 8 * 32];
                xt[..n * g].copy_from_slice(xs);
                let mut ot = [0u8; 8 * 32 / 2];
                let r = batch(
                    pulp::as_arrays::<8, f32>(&xt[..8 * g]).0,
                    &mut ot[..8 * g / 2],
                );
                out.copy_from_slice(&ot[..n * g / 2]);
                r
            };
            for k in 0..n {
                if ok & (1 << k) != 0 {
                    srow[j0 + k] = sc[k];
                } else {
                    pending.push(j0 + k);
                }
            }
            j0 += n;
        }
    }

    /// The E8M0 scale exponent of [`crate::mx::shared_exponent`] for E2M1 elements (`emax`
    /// 2, largest value 6) lane-wise, for finite magnitude bits `amb`; always in `-127..=127`
    /// (so the scale is positive and finite, as the scalar kernel requires).
    #[inline(always)]
    fn e8m0_exponent(s: K, amb: __m256i, rule: MxScaleRule) -> __m256i {
        let a2 = s.0.avx2;
        let biased = match rule {
            // floor(log2(amax)) - 2; a zero or subnormal amax gives at most -129 -> -127
            MxScaleRule::Floor => a2._mm256_srli_epi32::<23>(amb),
            // amax rounded up at significand 1.75 (to +Inf's bits at the top: 128 - 2)
            MxScaleRule::RoundUp175 => a2._mm256_srli_epi32::<23>(s.and(
                s.addi(amb, s.splati(1 << 21)),
                s.splati(0xFF80_0000u32 as i32),
            )),
            MxScaleRule::Ceil => {
                // ceil(log2(amax / 6)) from the quotient's bits, at most 254; then the
                // common "- 2" below is undone by adding it here
                let q = s.bits(s.div(s.flt(amb), s.splat(6.0)));
                let m = s.and(q, s.splati(0x7F_FFFF));
                let nz =
                    s.0.avx2
                        ._mm256_cmpeq_epi32(m, s.0.avx._mm256_setzero_si256());
                // + 1 unless the quotient's mantissa is zero (nz: -1 there)
                let b = s.addi(s.addi(a2._mm256_srli_epi32::<23>(q), s.splati(1)), nz);
                s.addi(a2._mm256_min_epi32(b, s.splati(254)), s.splati(2))
            }
        };
        a2._mm256_max_epi32(s.subi(biased, s.splati(129)), s.splati(-127))
    }

    /// Eight MXFP4 groups (256 values): E8M0 scales lane-wise, codes into `out` (128 bytes).
    /// Returns the scales and a bit mask of the groups with finite values (the others are left
    /// to the reference; their bytes are garbage).
    #[inline(always)]
    fn mxfp4_batch<const EVEN: bool, const BIT: bool>(
        s: K,
        xv: &[[f32; 8]],
        rule: MxScaleRule,
        out: &mut [u8],
    ) -> ([f32; 8], i32) {
        let (a2, avx) = (s.0.avx2, s.0.avx);
        let mut m = [avx._mm256_setzero_si256(); 8];
        for (mk, v) in m.iter_mut().zip(xv.chunks_exact(4)) {
            *mk = s.maxi(
                s.maxi(s.mag(s.ld(&v[0])), s.mag(s.ld(&v[1]))),
                s.maxi(s.mag(s.ld(&v[2])), s.mag(s.ld(&v[3]))),
            );
        }
        let amb = s.max8(m);
        let ok = a2._mm256_cmpgt_epi32(s.splati(0x7f80_0000), amb);
        let e = e8m0_exponent(s, s.and(amb, ok), rule);
        // mx::pow2(e): normal for e >= -126, 2^-127 is the subnormal 1 << 22
        let eb = s.addi(e, s.splati(127));
        let sub = a2._mm256_cmpeq_epi32(eb, avx._mm256_setzero_si256());
        let sc = s.flt(s.or(
            a2._mm256_slli_epi32::<23>(eb),
            s.and(sub, s.splati(1 << 22)),
        ));
        let inv = cast::<__m256, [f32; 8]>(s.div(s.splat(1.0), sc));
        for ((v, o), &iv) in xv.chunks_exact(4).zip(out.chunks_exact_mut(16)).zip(&inv) {
            let iv = s.splat(iv);
            let c = [
                s.e2m1c::<EVEN, BIT>(s.mul(s.ld(&v[0]), iv)),
                s.e2m1c::<EVEN, BIT>(s.mul(s.ld(&v[1]), iv)),
                s.e2m1c::<EVEN, BIT>(s.mul(s.ld(&v[2]), iv)),
                s.e2m1c::<EVEN, BIT>(s.mul(s.ld(&v[3]), iv)),
            ];
            o.copy_from_slice(&s.pack32(c));
        }
        (
            cast::<__m256, [f32; 8]>(sc),
            avx._mm256_movemask_ps(s.flt(ok)),
        )
    }

    /// MXFP4 rows eight groups at a time ([`mxfp4_batch`] through [`batched_row`]).
    #[inline(always)]
    fn mxfp4_row<const EVEN: bool, const BIT: bool>(
        s: K,
        rule: MxScaleRule,
        x: &[f32],
        drow: &mut [u8],
        srow: &mut [f32],
        pending: &mut Vec<usize>,
    ) {
        batched_row(32, x, drow, srow, pending, |xv, out| {
            mxfp4_batch::<EVEN, BIT>(s, xv, rule, out)
        });
    }

    /// NF4 codes by a four-step binary search over the 15 sorted midpoints (the same count
    /// `#(mid < y)` as the portable threshold count, since the midpoints strictly increase).
    #[inline(always)]
    fn nf4_row(
        s: K,
        g: usize,
        x: &[f32],
        drow: &mut [u8],
        srow: &mut [f32],
        pending: &mut Vec<usize>,
    ) {
        let avx = s.0.avx;
        let m = &crate::quantize::nf4_encoder().mids;
        let t = Nf4Search {
            m7: s.splat(m[7]),
            m3: s.splat(m[3]),
            m11: s.splat(m[11]),
            t3: avx._mm256_setr_ps(m[1], m[5], m[9], m[13], 0.0, 0.0, 0.0, 0.0),
            t4: avx._mm256_setr_ps(m[0], m[2], m[4], m[6], m[8], m[10], m[12], m[14]),
        };
        for (j, ((xs, out), sj)) in x
            .chunks_exact(g)
            .zip(drow.chunks_exact_mut(g / 2))
            .zip(srow.iter_mut())
            .enumerate()
        {
            let (xv, _) = pulp::as_arrays::<8, f32>(xs);
            let b = s.max_mag(xv);
            // NaN/Inf and all-zero groups: reference (which writes these bytes)
            if b >= 0x7f80_0000 || b == 0 {
                pending.push(j);
                continue;
            }
            let sc = f32::from_bits(b);
            *sj = sc;
            let vs = s.splat(sc);
            let mut oc = out.chunks_exact_mut(16);
            let mut xc = xv.chunks_exact(4);
            for (o, v) in (&mut oc).zip(&mut xc) {
                o.copy_from_slice(&s.pack32([
                    t.code(s, s.div(s.ld(&v[0]), vs)),
                    t.code(s, s.div(s.ld(&v[1]), vs)),
                    t.code(s, s.div(s.ld(&v[2]), vs)),
                    t.code(s, s.div(s.ld(&v[3]), vs)),
                ]));
            }
            if let ([v0, v1], o) = (xc.remainder(), oc.into_remainder()) {
                o.copy_from_slice(&s.pack16(
                    t.code(s, s.div(s.ld(v0), vs)),
                    t.code(s, s.div(s.ld(v1), vs)),
                ));
            }
        }
    }

    /// The NF4 midpoints laid out for the binary search.
    #[derive(Clone, Copy)]
    struct Nf4Search {
        m7: __m256,
        m3: __m256,
        m11: __m256,
        /// mids 1, 5, 9, 13 (indexed by code / 4)
        t3: __m256,
        /// mids 0, 2, .., 14 (indexed by code / 2)
        t4: __m256,
    }

    impl Nf4Search {
        #[inline(always)]
        fn code(&self, s: K, y: __m256) -> __m256i {
            let a2 = s.0.avx2;
            let g1 = s.gt(y, self.m7);
            let g2 = s.gt(y, s.sel(self.m3, self.m11, g1));
            let i = s.or(s.and(g1, s.splati(8)), s.and(g2, s.splati(4)));
            let t3 = a2._mm256_permutevar8x32_ps(self.t3, a2._mm256_srli_epi32::<2>(i));
            let i = s.or(i, s.and(s.gt(y, t3), s.splati(2)));
            let t4 = a2._mm256_permutevar8x32_ps(self.t4, a2._mm256_srli_epi32::<1>(i));
            s.or(i, s.and(s.gt(y, t4), s.splati(1)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantize::QuantOptions;

    /// Weight-like values with exact zeros, -0.0, halves/integers (ties), huge and tiny
    /// (subnormal) magnitudes and, when `bad`, NaN/Inf sprinkled in.
    fn row(n: usize, seed: u64, bad: bool) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                match (s >> 8) % 23 {
                    0 => 0.0,
                    1 => -0.0,
                    2 => ((s >> 20) % 13) as f32 * 0.5 - 3.0,
                    3 => u * 3e38,
                    4 => u * 1e-39,
                    5 if bad => f32::NAN,
                    6 if bad => f32::INFINITY,
                    7 if bad => f32::NEG_INFINITY,
                    8 => u * 40.0,
                    _ => u * 0.05,
                }
            })
            .collect()
    }

    /// The dispatched kernels (AVX2 where present) against the portable kernels, on rows with
    /// whole groups, ragged tails, all-zero groups, NaN/Inf and huge values: same codes, scales,
    /// zero points and pending groups.
    #[test]
    fn dispatched_kernels_match_portable() {
        let mx_rules = [
            MxScaleRule::Floor,
            MxScaleRule::Ceil,
            MxScaleRule::RoundUp175,
        ];
        let mut cases = 0;
        for name in [
            "int4-g128-asym",
            "int4-g128-sym",
            "int4-g16-asym",
            "int4-g48-sym",
            "nvfp4",
            "mxfp4",
            "nf4-g64",
            "nf4-g32",
            "nf4-g16",
        ] {
            let scheme = crate::Scheme::from_name(name).unwrap();
            let kind = Kind::of(&scheme).unwrap();
            for rounding in [Rounding::NearestEven, Rounding::NearestAway] {
                for &mx_rule in &mx_rules {
                    let mut ctx = Ctx::from(&QuantOptions {
                        rounding,
                        ..QuantOptions::default()
                    });
                    ctx.mx_rule = mx_rule;
                    let cols = 4096;
                    let (_, bc) = scheme.granularity.block_shape(1, cols);
                    let Some(k) = RowKernel::select(kind, &scheme, &ctx, bc) else {
                        continue;
                    };
                    let g = k.group();
                    for (len, seed) in [(cols, 1u64), (g * 9 + 5, 2), (g - 1, 3), (g * 17, 4)] {
                        for bad in [false, true] {
                            let mut x = row(len, seed * 31 + u64::from(bad), bad);
                            if len > 2 * g {
                                x[g..2 * g].iter_mut().for_each(|v| *v = 0.0);
                            }
                            let gs = if bad {
                                1.0
                            } else {
                                crate::nvfp4::global_scale_ct(&x)
                            };
                            let full = len / g;
                            let run = |portable: bool| {
                                let mut d = vec![0xA5u8; full * g * 4 / 8 + g];
                                let mut sc = vec![-1f32; full + 1];
                                let mut z = vec![0x5Au8; full + 1];
                                let mut p = Vec::new();
                                if portable {
                                    k.run_portable(&x, gs, &ctx, &mut d, &mut sc, &mut z, &mut p);
                                } else {
                                    k.run(&x, gs, &ctx, &mut d, &mut sc, &mut z, &mut p);
                                }
                                p.sort_unstable();
                                // bytes of pending groups are rewritten by the reference
                                for &j in &p {
                                    d[j * g / 2..(j + 1) * g / 2].fill(0);
                                    sc[j] = 0.0;
                                    z[j] = 0;
                                }
                                (d, sc.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), z, p)
                            };
                            let (a, b) = (run(false), run(true));
                            assert_eq!(
                                a.3, b.3,
                                "{name} {rounding:?} {mx_rule:?} len {len}: pending"
                            );
                            assert_eq!(
                                a.1, b.1,
                                "{name} {rounding:?} {mx_rule:?} len {len}: scales"
                            );
                            assert_eq!(
                                a.2, b.2,
                                "{name} {rounding:?} {mx_rule:?} len {len}: zero points"
                            );
                            assert_eq!(
                                a.0, b.0,
                                "{name} {rounding:?} {mx_rule:?} len {len}: codes"
                            );
                            cases += 1;
                        }
                    }
                }
            }
        }
        assert!(cases >= 50, "{cases} cases");
    }

    /// The arithmetic E2M1 encoder against the threshold count, on every f32 in [0, 8] with a
    /// stride of 61 ulps, the 64 floats around each threshold and grid value, huge values and
    /// infinity.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn e2m1_even_arithmetic_matches_threshold_count() {
        let Some(v) = avx2::e2m1_even_mags(&[1.0]) else {
            return;
        };
        assert_eq!(v, [2]);
        let mut xs: Vec<f32> = (0..=8.0f32.to_bits())
            .step_by(61)
            .map(f32::from_bits)
            .collect();
        for c in [
            0.25f32, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0,
        ] {
            let b = c.to_bits();
            xs.extend((b - 32..b + 32).map(f32::from_bits));
        }
        xs.extend([8.5, 1e10, 3e38, f32::MAX, f32::INFINITY, 1e-45, 1e-39]);
        let got = avx2::e2m1_even_mags(&xs).unwrap();
        for (&x, &g) in xs.iter().zip(&got) {
            let want = mx::E2M1_EVEN_T.iter().filter(|&&t| x > t).count() as u32;
            assert_eq!(g, want, "{x:e}");
        }
    }

    #[test]
    fn max_mag_bits_slice_matches_portable() {
        for (n, bad) in [
            (0usize, false),
            (7, false),
            (33, true),
            (1000, false),
            (4099, true),
        ] {
            let x = row(n, n as u64 + 11, bad);
            assert_eq!(max_mag_bits_slice(&x), max_mag_bits(&x), "n {n}");
        }
    }

    #[test]
    fn e4m3_decode_bits_matches_the_codec() {
        let f = FloatFormat::E4M3;
        let nan = (f.decode(0x7f), f.decode(0xff));
        for c in 0..=255u8 {
            assert_eq!(
                e4m3_decode_bits(c, nan).to_bits(),
                f.decode(c).to_bits(),
                "code {c:#x}"
            );
        }
    }
}
