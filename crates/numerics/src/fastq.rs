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

/// One row for [`pulp::Arch::dispatch`]: `with_simd` is monomorphised per instruction set and
/// everything below it is `#[inline(always)]`, so the whole kernel is compiled for that set.
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

/// NF4's table is sorted, so the rank among the midpoints is the code.
fn nf4_rank_is_code() -> bool {
    let enc = crate::quantize::nf4_encoder();
    enc.code_of_rank
        .iter()
        .enumerate()
        .all(|(i, &c)| c as usize == i)
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

#[cfg(test)]
mod tests {
    use super::*;

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
