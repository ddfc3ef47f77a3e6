//! Lane-parallel versions of ggml's k-quant scale searches.
//!
//! `make_qkx2_quants` (Q4_K/Q5_K) and `make_qx_quants` (Q6_K) are sequential f32 reductions;
//! reordering them would change the rounding and break bit-exactness with ggml. Instead these
//! versions run the independent sub-blocks of a super-block side by side: lane `j` of every
//! `[f32; N]` belongs to sub-block `j`, and each lane performs exactly the scalar algorithm's
//! operations in the scalar order, so the results are identical while the compiler can use
//! SIMD across lanes. Data-dependent branches become per-lane selects. The scalar versions in
//! `kquants.rs` are kept as the reference the tests compare against.

use super::nearest_int;

/// `nearest_int` then clamp to `lo..=hi`, as an exact small-integer f32.
#[inline(always)]
fn q_clamped(v: f32, lo: f32, hi: f32) -> f32 {
    // nearest_int's result always has |value| < 2^23, so the f32 conversion is exact and
    // clamping in f32 equals clamping the int.
    (nearest_int(v) as f32).max(lo).min(hi)
}

/// [`make_qkx2_quants`](super::kquants) over `N` sub-blocks of 32 at once (`use_mad = false`).
/// `x[i][j]`, `w[i][j]` = element i of sub-block j. Writes codes to `l` (same layout),
/// returns per-lane `(scale, -min)`.
#[inline(always)]
pub(super) fn qkx2_search<const N: usize>(
    nmax: f32,
    x: &[[f32; N]; 32],
    w: &[[f32; N]; 32],
    l: &mut [[f32; N]; 32],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> ([f32; N], [f32; N]) {
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = w[0];
    let mut sum_x = [0.0f32; N];
    for j in 0..N {
        sum_x[j] = sum_w[j] * x[0][j];
    }
    for i in 1..32 {
        for j in 0..N {
            let v = x[i][j];
            min[j] = if v < min[j] { v } else { min[j] };
            max[j] = if v > max[j] { v } else { max[j] };
            sum_w[j] += w[i][j];
            sum_x[j] += w[i][j] * v;
        }
    }
    let mut iscale = [0.0f32; N];
    let mut scale = [0.0f32; N];
    for j in 0..N {
        if min[j] > 0.0 {
            min[j] = 0.0;
        }
        iscale[j] = nmax / (max[j] - min[j]);
        scale[j] = 1.0 / iscale[j];
    }
    let min0 = min;
    let mut best_mad = [0.0f32; N];
    for i in 0..32 {
        for j in 0..N {
            let q = q_clamped(iscale[j] * (x[i][j] - min[j]), 0.0, nmax);
            l[i][j] = q;
            let diff = scale[j] * q + min[j] - x[i][j];
            best_mad[j] += w[i][j] * (diff * diff);
        }
    }
    let mut laux = [[0.0f32; N]; 32];
    for is in 0..=nstep {
        let step = rmin + rdelta * is as f32 + nmax;
        let mut sum_l = [0.0f32; N];
        let mut sum_l2 = [0.0f32; N];
        let mut sum_xl = [0.0f32; N];
        // As in ggml, a candidate accepted earlier moves `min` for the following ones.
        for j in 0..N {
            iscale[j] = step / (max[j] - min[j]);
        }
        for i in 0..32 {
            for j in 0..N {
                let q = q_clamped(iscale[j] * (x[i][j] - min[j]), 0.0, nmax);
                laux[i][j] = q;
                let wi = w[i][j];
                sum_l[j] += wi * q;
                sum_l2[j] += wi * q * q;
                sum_xl[j] += wi * q * x[i][j];
            }
        }
        let mut this_scale = [0.0f32; N];
        let mut this_min = [0.0f32; N];
        let mut ok = [false; N];
        for j in 0..N {
            let det = sum_w[j] * sum_l2[j] - sum_l[j] * sum_l[j];
            ok[j] = det > 0.0;
            let mut s = (sum_w[j] * sum_xl[j] - sum_x[j] * sum_l[j]) / det;
            let mut m = (sum_l2[j] * sum_x[j] - sum_l[j] * sum_xl[j]) / det;
            if m > 0.0 {
                m = 0.0;
                s = sum_xl[j] / sum_l2[j];
            }
            this_scale[j] = s;
            this_min[j] = m;
        }
        let mut mad = [0.0f32; N];
        for i in 0..32 {
            for j in 0..N {
                let diff = this_scale[j] * laux[i][j] + this_min[j] - x[i][j];
                mad[j] += w[i][j] * (diff * diff);
            }
        }
        let mut take = [false; N];
        for j in 0..N {
            take[j] = ok[j] && mad[j] < best_mad[j];
            if take[j] {
                best_mad[j] = mad[j];
                scale[j] = this_scale[j];
                min[j] = this_min[j];
            }
        }
        if take.iter().any(|&t| t) {
            for i in 0..32 {
                for j in 0..N {
                    l[i][j] = if take[j] { laux[i][j] } else { l[i][j] };
                }
            }
        }
    }
    let mut the_min = [0.0f32; N];
    for j in 0..N {
        if max[j] == min0[j] {
            // Constant sub-block: the scalar algorithm returns before any search.
            scale[j] = 0.0;
            the_min[j] = -min0[j];
            for row in l.iter_mut() {
                row[j] = 0.0;
            }
        } else {
            the_min[j] = -min[j];
        }
    }
    (scale, the_min)
}

/// [`make_qx_quants`](super::kquants) with `rmse_type = 1` over `N` groups of 16 at once.
/// `x[i][j]` = element i of group j. Writes codes (offset by `nmax`) to `l`, returns the
/// per-lane scales.
pub(super) fn qx_search<const N: usize>(
    nmax: f32,
    x: &[[f32; N]; 16],
    l: &mut [[f32; N]; 16],
) -> [f32; N] {
    let mut max = [0.0f32; N];
    let mut amax = [0.0f32; N];
    for row in x {
        for j in 0..N {
            let a = row[j].abs();
            if a > amax[j] {
                amax[j] = a;
                max[j] = row[j];
            }
        }
    }
    let mut w = [[0.0f32; N]; 16];
    for i in 0..16 {
        for j in 0..N {
            w[i][j] = x[i][j] * x[i][j];
        }
    }
    let (lo, hi) = (-nmax, nmax - 1.0);
    let mut iscale = [0.0f32; N];
    let mut sumlx = [0.0f32; N];
    let mut suml2 = [0.0f32; N];
    for j in 0..N {
        iscale[j] = -nmax / max[j];
    }
    for i in 0..16 {
        for j in 0..N {
            let q = q_clamped(iscale[j] * x[i][j], lo, hi);
            l[i][j] = q + nmax;
            sumlx[j] += w[i][j] * x[i][j] * q;
            suml2[j] += w[i][j] * q * q;
        }
    }
    let mut scale = [0.0f32; N];
    let mut best = [0.0f32; N];
    for j in 0..N {
        scale[j] = if suml2[j] != 0.0 {
            sumlx[j] / suml2[j]
        } else {
            0.0
        };
        best[j] = scale[j] * sumlx[j];
    }
    let mut laux = [[0.0f32; N]; 16];
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let step = nmax + 0.1 * is as f32;
        for j in 0..N {
            iscale[j] = -step / max[j];
            sumlx[j] = 0.0;
            suml2[j] = 0.0;
        }
        for i in 0..16 {
            for j in 0..N {
                let q = q_clamped(iscale[j] * x[i][j], lo, hi);
                laux[i][j] = q + nmax;
                sumlx[j] += w[i][j] * x[i][j] * q;
                suml2[j] += w[i][j] * q * q;
            }
        }
        let mut take = [false; N];
        for j in 0..N {
            take[j] = suml2[j] > 0.0 && sumlx[j] * sumlx[j] > best[j] * suml2[j];
            if take[j] {
                scale[j] = sumlx[j] / suml2[j];
                best[j] = scale[j] * sumlx[j];
            }
        }
        if take.iter().any(|&t| t) {
            for i in 0..16 {
                for j in 0..N {
                    l[i][j] = if take[j] { laux[i][j] } else { l[i][j] };
                }
            }
        }
    }
    for j in 0..N {
        if amax[j] < super::kquants::GROUP_MAX_EPS {
            scale[j] = 0.0;
            for row in l.iter_mut() {
                row[j] = 0.0;
            }
        }
    }
    scale
}

/// Explicit AVX2 version of [`qkx2_search`] for `N = 8` (one super-block's eight sub-blocks,
/// one per lane of a 256-bit vector), entered through `pulp`'s safe runtime dispatch.
///
/// Every lane performs the scalar algorithm's f32 operations in the scalar order (no fused
/// multiply-add), with one substitution: `nearest_int(v)` clamped to `0..=nmax` becomes
/// `min(max(round_half_even(v), 0), nmax)` in f32. The two agree whenever |v| <= 2^22 (the
/// magic-number trick is exact there, and the `max` turns round's -0.0 into the +0.0 the
/// integer path yields). Before each pass the function checks, per lane, that bound: every
/// rounded value is `iscale * (x - min)` with `x` between the sub-block's data minimum and
/// maximum, and both f32 subtraction and multiplication are monotone, so the two end points
/// bound all of them. If any non-constant lane fails (ranges that overflow or underflow f32,
/// which ggml maps to wrapped integers), the function returns `None` and the caller uses the
/// portable [`qkx2_search`], which reproduces ggml's integer semantics exactly.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use core::arch::x86_64::{__m256, _CMP_EQ_OQ, _CMP_GT_OQ, _CMP_LE_OQ, _CMP_LT_OQ};
    use pulp::bytemuck::cast;
    use pulp::x86::V3;

    /// Round to nearest, ties to even, no exceptions (`_MM_FROUND_TO_NEAREST_INT |
    /// _MM_FROUND_NO_EXC`).
    const RNE: i32 = 0x08;
    /// Largest |v| for which the f32 rounding equals ggml's `nearest_int`.
    const EXACT_LIMIT: f32 = 4_194_304.0;

    #[derive(Clone, Copy)]
    struct Ops(V3);

    impl Ops {
        #[inline(always)]
        fn add(self, a: __m256, b: __m256) -> __m256 {
            self.0.avx._mm256_add_ps(a, b)
        }
        #[inline(always)]
        fn sub(self, a: __m256, b: __m256) -> __m256 {
            self.0.avx._mm256_sub_ps(a, b)
        }
        #[inline(always)]
        fn mul(self, a: __m256, b: __m256) -> __m256 {
            self.0.avx._mm256_mul_ps(a, b)
        }
        /// `a * b + c` rounded once.
        #[inline(always)]
        fn fma(self, a: __m256, b: __m256, c: __m256) -> __m256 {
            self.0.fma._mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        fn div(self, a: __m256, b: __m256) -> __m256 {
            self.0.avx._mm256_div_ps(a, b)
        }
        #[inline(always)]
        fn splat(self, v: f32) -> __m256 {
            self.0.avx._mm256_set1_ps(v)
        }
        /// `if a < b { a } else { b }` per lane (MINPS returns the second operand otherwise).
        #[inline(always)]
        fn min_first(self, a: __m256, b: __m256) -> __m256 {
            self.0.avx._mm256_min_ps(a, b)
        }
        /// `if a > b { a } else { b }` per lane.
        #[inline(always)]
        fn max_first(self, a: __m256, b: __m256) -> __m256 {
            self.0.avx._mm256_max_ps(a, b)
        }
        #[inline(always)]
        fn gt(self, a: __m256, b: __m256) -> __m256 {
            self.0.avx._mm256_cmp_ps::<_CMP_GT_OQ>(a, b)
        }
        #[inline(always)]
        fn lt(self, a: __m256, b: __m256) -> __m256 {
            self.0.avx._mm256_cmp_ps::<_CMP_LT_OQ>(a, b)
        }
        #[inline(always)]
        fn le(self, a: __m256, b: __m256) -> __m256 {
            self.0.avx._mm256_cmp_ps::<_CMP_LE_OQ>(a, b)
        }
        #[inline(always)]
        fn eq(self, a: __m256, b: __m256) -> __m256 {
            self.0.avx._mm256_cmp_ps::<_CMP_EQ_OQ>(a, b)
        }
        #[inline(always)]
        fn and(self, a: __m256, b: __m256) -> __m256 {
            self.0.avx._mm256_and_ps(a, b)
        }
        /// `if mask { t } else { f }` per lane.
        #[inline(always)]
        fn select(self, mask: __m256, t: __m256, f: __m256) -> __m256 {
            self.0.avx._mm256_blendv_ps(f, t, mask)
        }
        /// Bit j set iff lane j of the mask is set.
        #[inline(always)]
        fn bits(self, mask: __m256) -> i32 {
            self.0.avx._mm256_movemask_ps(mask)
        }
        /// `-a` (sign flip, as in scalar code).
        #[inline(always)]
        fn neg(self, a: __m256) -> __m256 {
            self.0.avx._mm256_xor_ps(a, self.splat(-0.0))
        }
        #[inline(always)]
        fn abs(self, a: __m256) -> __m256 {
            self.0.avx._mm256_andnot_ps(self.splat(-0.0), a)
        }
        /// `clamp(nearest_int(v), 0, nmax)` as f32, valid for |v| <= 2^22.
        #[inline(always)]
        fn quant(self, v: __m256, zero: __m256, nmax: __m256) -> __m256 {
            let r = self.0.avx._mm256_round_ps::<RNE>(v);
            self.min_first(self.max_first(r, zero), nmax)
        }
    }

    /// Lanes (bit mask) whose pass `iscale * (x - min)` stays within the exact range.
    #[inline(always)]
    fn in_range(o: Ops, iscale: __m256, dmin: __m256, max: __m256, min: __m256) -> i32 {
        let lim = o.splat(EXACT_LIMIT);
        let lo = o.abs(o.mul(iscale, o.sub(dmin, min)));
        let hi = o.abs(o.mul(iscale, o.sub(max, min)));
        o.bits(o.and(o.le(lo, lim), o.le(hi, lim)))
    }

    /// [`super::qkx2_search`] with `N = 8`; `None` where the exact-range check fails (the
    /// caller then runs the portable version). On `Some`, `l` holds the codes.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(in crate::gguf) fn qkx2_search(
        simd: V3,
        nmax: f32,
        x: &[[f32; 8]; 32],
        w: &[[f32; 8]; 32],
        l: &mut [[f32; 8]; 32],
        rmin: f32,
        rdelta: f32,
        nstep: i32,
    ) -> Option<([f32; 8], [f32; 8])> {
        let o = Ops(simd);
        let xv: [__m256; 32] = cast(*x);
        let wv: [__m256; 32] = cast(*w);
        let zero = o.splat(0.0);
        let nmaxv = o.splat(nmax);

        let mut min = xv[0];
        let mut max = xv[0];
        let mut sum_w = wv[0];
        let mut sum_x = o.mul(wv[0], xv[0]);
        for i in 1..32 {
            min = o.min_first(xv[i], min);
            max = o.max_first(xv[i], max);
            sum_w = o.add(sum_w, wv[i]);
            sum_x = o.add(sum_x, o.mul(wv[i], xv[i]));
        }
        let dmin = min;
        min = o.select(o.gt(min, zero), zero, min);
        let min0 = min;
        let constant = o.bits(o.eq(max, min0));
        // Lanes that must pass the range check: all but the constant ones, whose result is
        // overwritten at the end as in the scalar early return.
        let need = !constant & 0xff;

        let mut iscale = o.div(nmaxv, o.sub(max, min));
        if in_range(o, iscale, dmin, max, min) & need != need {
            return None;
        }
        let mut scale = o.div(o.splat(1.0), iscale);
        let mut lv = [zero; 32];
        let mut xm = [zero; 32];
        let mut best_mad = zero;
        for i in 0..32 {
            xm[i] = o.sub(xv[i], min);
            let q = o.quant(o.mul(iscale, xm[i]), zero, nmaxv);
            lv[i] = q;
            let diff = o.sub(o.add(o.mul(scale, q), min), xv[i]);
            best_mad = o.add(best_mad, o.mul(wv[i], o.mul(diff, diff)));
        }

        let mut laux = [zero; 32];
        for is in 0..=nstep {
            let step = rmin + rdelta * is as f32 + nmax;
            iscale = o.div(o.splat(step), o.sub(max, min));
            if in_range(o, iscale, dmin, max, min) & need != need {
                return None;
            }
            let mut sum_l = zero;
            let mut sum_l2 = zero;
            let mut sum_xl = zero;
            for i in 0..32 {
                let q = o.quant(o.mul(iscale, xm[i]), zero, nmaxv);
                laux[i] = q;
                let wq = o.mul(wv[i], q);
                sum_l = o.add(sum_l, wq);
                sum_l2 = o.add(sum_l2, o.mul(wq, q));
                sum_xl = o.add(sum_xl, o.mul(wq, xv[i]));
            }
            let det = o.sub(o.mul(sum_w, sum_l2), o.mul(sum_l, sum_l));
            let ok = o.gt(det, zero);
            if o.bits(ok) == 0 {
                continue;
            }
            let s = o.div(o.sub(o.mul(sum_w, sum_xl), o.mul(sum_x, sum_l)), det);
            let m = o.div(o.sub(o.mul(sum_l2, sum_x), o.mul(sum_l, sum_xl)), det);
            let pos = o.gt(m, zero);
            let this_min = o.select(pos, zero, m);
            let this_scale = o.select(pos, o.div(sum_xl, sum_l2), s);
            let mut mad = zero;
            for i in 0..32 {
                let diff = o.sub(o.add(o.mul(this_scale, laux[i]), this_min), xv[i]);
                mad = o.add(mad, o.mul(wv[i], o.mul(diff, diff)));
            }
            let take = o.and(ok, o.lt(mad, best_mad));
            if o.bits(take) != 0 {
                best_mad = o.select(take, mad, best_mad);
                scale = o.select(take, this_scale, scale);
                min = o.select(take, this_min, min);
                for i in 0..32 {
                    lv[i] = o.select(take, laux[i], lv[i]);
                    xm[i] = o.sub(xv[i], min);
                }
            }
        }
        *l = cast(lv);
        let scale: [f32; 8] = cast(scale);
        let min: [f32; 8] = cast(min);
        let min0: [f32; 8] = cast(min0);
        let mut out_scale = [0.0f32; 8];
        let mut the_min = [0.0f32; 8];
        for j in 0..8 {
            if constant >> j & 1 == 1 {
                out_scale[j] = 0.0;
                the_min[j] = -min0[j];
                for row in l.iter_mut() {
                    row[j] = 0.0;
                }
            } else {
                out_scale[j] = scale[j];
                the_min[j] = -min[j];
            }
        }
        Some((out_scale, the_min))
    }

    /// [`super::qkx_fast`] with `N = 8` in explicit AVX2: the same operations in the same
    /// order, so the same bits.
    #[inline(always)]
    pub(in crate::gguf) fn qkx_fast(
        simd: V3,
        nmax: f32,
        x: &[[f32; 8]; 32],
        iters: usize,
    ) -> ([f32; 8], [f32; 8]) {
        let o = Ops(simd);
        let xv: [__m256; 32] = cast(*x);
        let zero = o.splat(0.0);
        let nmaxv = o.splat(nmax);
        let (mut sx2a, mut sx2b) = (zero, zero);
        for v in xv.chunks_exact(2) {
            sx2a = o.fma(v[0], v[0], sx2a);
            sx2b = o.fma(v[1], v[1], sx2b);
        }
        let av = simd
            .avx
            ._mm256_sqrt_ps(o.div(o.add(sx2a, sx2b), o.splat(32.0)));
        let mut wv = [zero; 32];
        for i in 0..32 {
            wv[i] = o.add(av, o.abs(xv[i]));
        }
        let mut min = xv[0];
        let mut max = xv[0];
        let (mut swa, mut swb, mut sxa, mut sxb) = (zero, zero, zero, zero);
        for i in (0..32).step_by(2) {
            min = o.min_first(xv[i], min);
            max = o.max_first(xv[i], max);
            swa = o.add(swa, wv[i]);
            sxa = o.fma(wv[i], xv[i], sxa);
            min = o.min_first(xv[i + 1], min);
            max = o.max_first(xv[i + 1], max);
            swb = o.add(swb, wv[i + 1]);
            sxb = o.fma(wv[i + 1], xv[i + 1], sxb);
        }
        let sum_w = o.add(swa, swb);
        let sum_x = o.add(sxa, sxb);
        min = o.min_first(min, zero);
        let min0 = min;
        let mut scale = o.div(o.sub(max, min), nmaxv);
        let mut iscale = o.div(nmaxv, o.sub(max, min));
        for _ in 0..iters {
            let off = o.neg(o.mul(min, iscale));
            // (sum_l, sum_l2, sum_xl) of even and odd i
            let mut acc = [[zero; 3]; 2];
            for i in (0..32).step_by(2) {
                for (h, a) in acc.iter_mut().enumerate() {
                    let x = xv[i + h];
                    let v = o.fma(x, iscale, off);
                    let q = o.min_first(o.max_first(v, zero), nmaxv);
                    let q = simd.avx._mm256_round_ps::<RNE>(q);
                    let wq = o.mul(wv[i + h], q);
                    a[0] = o.add(a[0], wq);
                    a[1] = o.fma(wq, q, a[1]);
                    a[2] = o.fma(wq, x, a[2]);
                }
            }
            let sum_l = o.add(acc[0][0], acc[1][0]);
            let sum_l2 = o.add(acc[0][1], acc[1][1]);
            let sum_xl = o.add(acc[0][2], acc[1][2]);
            let det = o.sub(o.mul(sum_w, sum_l2), o.mul(sum_l, sum_l));
            let s = o.div(o.sub(o.mul(sum_w, sum_xl), o.mul(sum_x, sum_l)), det);
            let m = o.div(o.sub(o.mul(sum_l2, sum_x), o.mul(sum_l, sum_xl)), det);
            let pos = o.gt(m, zero);
            let m = o.select(pos, zero, m);
            let s = o.select(pos, o.div(sum_xl, sum_l2), s);
            let ok = o.and(
                o.and(o.gt(det, zero), o.gt(s, zero)),
                o.and(
                    o.lt(s, o.splat(f32::INFINITY)),
                    o.gt(m, o.splat(f32::NEG_INFINITY)),
                ),
            );
            scale = o.select(ok, s, scale);
            min = o.select(ok, m, min);
            iscale = o.select(ok, o.div(o.splat(1.0), s), iscale);
        }
        let constant = o.eq(max, min0);
        let scale = o.select(constant, zero, scale);
        let the_min = o.neg(o.select(constant, min0, min));
        (cast(scale), cast(the_min))
    }
}

/// `if a > b { a } else { b }` (one MAXPS; a NaN `a` gives `b`).
#[inline(always)]
fn max_first(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// `if a < b { a } else { b }` (one MINPS; a NaN `a` gives `b`).
#[inline(always)]
fn min_first(a: f32, b: f32) -> f32 {
    if a < b {
        a
    } else {
        b
    }
}

/// The Q4_K/Q5_K sub-block search of [`KQuantSearch::Fast`](super::KQuantSearch::Fast), `N`
/// sub-blocks side by side: start from the min/max grid (`scale = (max - min) / nmax`,
/// `min = min(data min, 0)`), then `iters` times quantize to the nearest code in `0..=nmax`
/// and refit `(scale, min)` by weighted least squares with `min <= 0`, the same closed form
/// ggml's search uses for each of its candidates. Each refit can only lower the weighted
/// squared error for the current codes and each re-quantization can only lower it for the
/// current `(scale, min)`, so the error never rises (up to f32 rounding), but the result is
/// generally not ggml's. Returns `(scale, -min)` per lane; constant sub-blocks give
/// `(0, -min)` as in ggml. Codes are not returned: the caller re-quantizes every element
/// against the stored 6-bit scales, and a sub-block whose stored scale is 0 decodes to
/// `-dmin·m` whatever its codes.
#[inline(always)]
pub(super) fn qkx_fast<const N: usize>(
    nmax: f32,
    x: &[[f32; N]; 32],
    iters: usize,
) -> ([f32; N], [f32; N]) {
    // The weights `av_x + |x|` of the reference search (`av_x` = RMS of the sub-block).
    // Sums are fused multiply-adds into two partial sums (even / odd `i`), added at the end.
    let mut sx2 = [[0.0f32; N]; 2];
    for (i, row) in x.iter().enumerate() {
        for j in 0..N {
            sx2[i & 1][j] = row[j].mul_add(row[j], sx2[i & 1][j]);
        }
    }
    let mut w = [[0.0f32; N]; 32];
    for i in 0..32 {
        for j in 0..N {
            w[i][j] = ((sx2[0][j] + sx2[1][j]) / 32.0).sqrt() + x[i][j].abs();
        }
    }
    let mut min = x[0];
    let mut max = x[0];
    let mut sw = [[0.0f32; N]; 2];
    let mut sx = [[0.0f32; N]; 2];
    for i in 0..32 {
        for j in 0..N {
            let v = x[i][j];
            min[j] = min_first(v, min[j]);
            max[j] = max_first(v, max[j]);
            sw[i & 1][j] += w[i][j];
            sx[i & 1][j] = w[i][j].mul_add(v, sx[i & 1][j]);
        }
    }
    let mut sum_w = [0.0f32; N];
    let mut sum_x = [0.0f32; N];
    let mut scale = [0.0f32; N];
    let mut iscale = [0.0f32; N];
    for j in 0..N {
        sum_w[j] = sw[0][j] + sw[1][j];
        sum_x[j] = sx[0][j] + sx[1][j];
        min[j] = min_first(min[j], 0.0);
        scale[j] = (max[j] - min[j]) / nmax;
        iscale[j] = nmax / (max[j] - min[j]);
    }
    let min0 = min;
    for _ in 0..iters {
        // v = x * iscale - min * iscale in one fused multiply-add
        let mut off = [0.0f32; N];
        for j in 0..N {
            off[j] = -(min[j] * iscale[j]);
        }
        let mut sl = [[0.0f32; N]; 2];
        let mut sl2 = [[0.0f32; N]; 2];
        let mut sxl = [[0.0f32; N]; 2];
        for i in 0..32 {
            let h = i & 1;
            for j in 0..N {
                let v = x[i][j].mul_add(iscale[j], off[j]);
                let q = min_first(max_first(v, 0.0), nmax).round_ties_even();
                let wq = w[i][j] * q;
                sl[h][j] += wq;
                sl2[h][j] = wq.mul_add(q, sl2[h][j]);
                sxl[h][j] = wq.mul_add(x[i][j], sxl[h][j]);
            }
        }
        for j in 0..N {
            let sum_l = sl[0][j] + sl[1][j];
            let sum_l2 = sl2[0][j] + sl2[1][j];
            let sum_xl = sxl[0][j] + sxl[1][j];
            let det = sum_w[j] * sum_l2 - sum_l * sum_l;
            let mut s = (sum_w[j] * sum_xl - sum_x[j] * sum_l) / det;
            let mut m = (sum_l2 * sum_x[j] - sum_l * sum_xl) / det;
            if m > 0.0 {
                m = 0.0;
                s = sum_xl / sum_l2;
            }
            // det > 0 (at least two distinct codes), a positive finite scale and a finite
            // min; otherwise keep the current grid.
            if det > 0.0 && s > 0.0 && s < f32::INFINITY && m > f32::NEG_INFINITY {
                scale[j] = s;
                min[j] = m;
                iscale[j] = 1.0 / s;
            }
        }
    }
    let mut the_min = [0.0f32; N];
    for j in 0..N {
        if max[j] == min0[j] {
            scale[j] = 0.0;
            the_min[j] = -min0[j];
        } else {
            the_min[j] = -min[j];
        }
    }
    (scale, the_min)
}
