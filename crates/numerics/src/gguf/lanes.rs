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
