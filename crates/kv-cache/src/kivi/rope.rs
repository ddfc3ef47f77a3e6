//! RoPE and Hadamard helpers of pre-RoPE KIVI keys (`rope=pre`): the per-group position
//! tables, undoing RoPE before quantization, and re-applying it (and un-rotating) to decoded
//! channel-major groups in the attention kernel (`rope_group_cm`: one fused pass per group,
//! AVX2 columns, [`RopeTables`] of `d` floats per group).

/// RoPE table of one body group of `g` tokens at absolute positions `pos0..pos0 + g`, for
/// the "rotate half" layout (channel `i < d/2` paired with `i + d/2`, rotated by
/// `pos * inv_freq[i]`): `out[i * g + t] = cos`, `out[(half + i) * g + t] = sin` (angles in f64).
pub fn rope_block(inv_freq: &[f64], g: usize, pos0: usize, out: &mut [f32]) {
    let half = inv_freq.len();
    for (i, &f) in inv_freq.iter().enumerate() {
        for t in 0..g {
            let a = (pos0 + t) as f64 * f;
            out[i * g + t] = a.cos() as f32;
            out[(half + i) * g + t] = a.sin() as f32;
        }
    }
}

/// Undo RoPE on `g` token-major key rows (`rows`: `[g][d]`) with a [`rope_block`] table:
/// `(a, b) -> (a cos + b sin, b cos - a sin)`.
pub fn unrope_rows(rows: &mut [f32], d: usize, g: usize, tab: &[f32]) {
    let half = d / 2;
    for t in 0..g {
        let r = &mut rows[t * d..][..d];
        for i in 0..half {
            let (c, s) = (tab[i * g + t], tab[(half + i) * g + t]);
            let (a, b) = (r[i], r[half + i]);
            r[i] = a * c + b * s;
            r[half + i] = b * c - a * s;
        }
    }
}

/// Normalized Walsh-Hadamard transform (its own inverse) of one decoded group stored
/// channel-major (`kt[c * ld + off..][..g]`): the butterflies run across channels on whole
/// token rows. The straightforward reference of `rope_group_cm` (with [`rope_cm`]).
#[inline(always)]
pub fn hadamard_cm(kt: &mut [f32], d: usize, g: usize, ld: usize, off: usize) {
    let mut h = 1;
    while h < d {
        for i in (0..d).step_by(2 * h) {
            for j in i..i + h {
                let (lo, hi) = kt.split_at_mut((j + h) * ld);
                let a = &mut lo[j * ld + off..][..g];
                let b = &mut hi[off..][..g];
                for t in 0..g {
                    let (x, y) = (a[t], b[t]);
                    a[t] = x + y;
                    b[t] = x - y;
                }
            }
        }
        h *= 2;
    }
    let s = 1.0 / (d as f32).sqrt();
    for c in 0..d {
        kt[c * ld + off..][..g].iter_mut().for_each(|v| *v *= s);
    }
}

/// Apply RoPE to one decoded group stored channel-major (`kt[c * ld + off..][..g]`, as
/// [`decode_group_cm`] writes it) with a [`rope_block`] table: `(a, b) -> (a cos - b sin,
/// b cos + a sin)`. The straightforward reference of `rope_group_cm` (with
/// [`hadamard_cm`]).
#[inline(always)]
pub fn rope_cm(kt: &mut [f32], d: usize, g: usize, ld: usize, off: usize, tab: &[f32]) {
    let half = d / 2;
    for i in 0..half {
        let (lo, hi) = kt.split_at_mut((half + i) * ld);
        let a = &mut lo[i * ld + off..][..g];
        let b = &mut hi[off..][..g];
        let c = &tab[i * g..][..g];
        let s = &tab[(half + i) * g..][..g];
        for t in 0..g {
            let (x, y) = (a[t], b[t]);
            a[t] = x * c[t] - y * s[t];
            b[t] = y * c[t] + x * s[t];
        }
    }
}

/// Compact RoPE tables of pre-RoPE keys for the attention kernel: the rotation at position
/// `pos0 + t` of a body group is the one at `pos0` (per group: `d` floats) composed with the
/// one at offset `t` (one [`rope_block`] table at `pos0 = 0`, shared by every group), so the
/// kernel reads `d` floats per group instead of a `d * g` table that does not fit in L1/L2 at
/// long contexts.
#[derive(Debug, Clone, Default)]
pub struct RopeTables {
    /// Head width.
    d: usize,
    /// [`rope_block`] table of offsets `0..g` (`d * g` floats).
    offs: Vec<f32>,
    /// Per body group: `cos(pos0 * f_i)` at `i`, `sin(pos0 * f_i)` at `d/2 + i`.
    base: Vec<f32>,
}

impl RopeTables {
    /// Empty tables for groups of `g` tokens and frequencies `inv_freq` (`d / 2` values).
    pub fn new(inv_freq: &[f64], g: usize) -> Self {
        let d = 2 * inv_freq.len();
        let mut offs = vec![0f32; d * g];
        rope_block(inv_freq, g, 0, &mut offs);
        Self {
            d,
            offs,
            base: Vec::new(),
        }
    }

    /// Groups covered.
    pub fn groups(&self) -> usize {
        self.base.len().checked_div(self.d).unwrap_or(0)
    }

    /// Append the base rotation of one more group whose first token sits at `pos0`.
    pub fn push_group(&mut self, inv_freq: &[f64], pos0: usize) {
        let half = inv_freq.len();
        let b = self.base.len();
        self.base.resize(b + 2 * half, 0.0);
        for (i, &f) in inv_freq.iter().enumerate() {
            let (s, c) = (pos0 as f64 * f).sin_cos();
            self.base[b + i] = c as f32;
            self.base[b + half + i] = s as f32;
        }
    }

    /// The tables of body group `grp` (which must be covered).
    pub fn group(&self, grp: usize) -> RopeGroup<'_> {
        RopeGroup {
            offs: &self.offs,
            base: &self.base[grp * self.d..][..self.d],
        }
    }
}

/// One group's view of [`RopeTables`].
#[derive(Debug, Clone, Copy)]
pub struct RopeGroup<'a> {
    /// [`rope_block`] table of offsets `0..g`.
    pub offs: &'a [f32],
    /// `cos(pos0 * f_i)` at `i`, `sin(pos0 * f_i)` at `d/2 + i`.
    pub base: &'a [f32],
}

/// Lane operations of the pre-RoPE kernel: `W` token columns as one value (a `[f32; W]` in
/// the portable build, an AVX2 register in the V3 one); `fmadd` is fused in the AVX2+FMA
/// builds and a multiply and an add in the portable one, so the two agree to f32 rounding.
trait Lanes: Copy {
    /// One value.
    type V: Copy;
    fn load(self, s: &[f32]) -> Self::V;
    fn store(self, v: Self::V, d: &mut [f32]);
    fn splat(self, x: f32) -> Self::V;
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a * b + c`.
    fn fmadd(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `c - a * b`.
    fn fnmadd(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
}

/// Portable lanes (`FMA`: fused multiply-adds, as the AVX2+FMA build of the kernel).
#[derive(Clone, Copy)]
struct Port<const W: usize, const FMA: bool>;

impl<const W: usize, const FMA: bool> Lanes for Port<W, FMA> {
    type V = [f32; W];
    #[inline(always)]
    fn load(self, s: &[f32]) -> [f32; W] {
        let mut v = [0f32; W];
        v.copy_from_slice(&s[..W]);
        v
    }
    #[inline(always)]
    fn store(self, v: [f32; W], d: &mut [f32]) {
        d[..W].copy_from_slice(&v);
    }
    #[inline(always)]
    fn splat(self, x: f32) -> [f32; W] {
        [x; W]
    }
    #[inline(always)]
    fn add(self, a: [f32; W], b: [f32; W]) -> [f32; W] {
        std::array::from_fn(|t| a[t] + b[t])
    }
    #[inline(always)]
    fn sub(self, a: [f32; W], b: [f32; W]) -> [f32; W] {
        std::array::from_fn(|t| a[t] - b[t])
    }
    #[inline(always)]
    fn mul(self, a: [f32; W], b: [f32; W]) -> [f32; W] {
        std::array::from_fn(|t| a[t] * b[t])
    }
    #[inline(always)]
    fn fmadd(self, a: [f32; W], b: [f32; W], c: [f32; W]) -> [f32; W] {
        std::array::from_fn(|t| {
            if FMA {
                a[t].mul_add(b[t], c[t])
            } else {
                a[t] * b[t] + c[t]
            }
        })
    }
    #[inline(always)]
    fn fnmadd(self, a: [f32; W], b: [f32; W], c: [f32; W]) -> [f32; W] {
        std::array::from_fn(|t| {
            if FMA {
                (-a[t]).mul_add(b[t], c[t])
            } else {
                c[t] - a[t] * b[t]
            }
        })
    }
}

/// AVX2+FMA lanes (8 columns).
#[cfg(target_arch = "x86_64")]
impl Lanes for pulp::x86::V3 {
    type V = std::arch::x86_64::__m256;
    #[inline(always)]
    fn load(self, s: &[f32]) -> Self::V {
        let mut v = [0f32; 8];
        v.copy_from_slice(&s[..8]);
        pulp::cast(v)
    }
    #[inline(always)]
    fn store(self, v: Self::V, d: &mut [f32]) {
        let a: [f32; 8] = pulp::cast(v);
        d[..8].copy_from_slice(&a);
    }
    #[inline(always)]
    fn splat(self, x: f32) -> Self::V {
        self.avx._mm256_set1_ps(x)
    }
    #[inline(always)]
    fn add(self, a: Self::V, b: Self::V) -> Self::V {
        self.avx._mm256_add_ps(a, b)
    }
    #[inline(always)]
    fn sub(self, a: Self::V, b: Self::V) -> Self::V {
        self.avx._mm256_sub_ps(a, b)
    }
    #[inline(always)]
    fn mul(self, a: Self::V, b: Self::V) -> Self::V {
        self.avx._mm256_mul_ps(a, b)
    }
    #[inline(always)]
    fn fmadd(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        self.fma._mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    fn fnmadd(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        self.fma._mm256_fnmadd_ps(a, b, c)
    }
}

/// One butterfly stage in registers: `x[j], x[j + h] -> x[j] + x[j + h], x[j] - x[j + h]` for
/// every `j` with bit `h` clear (`h` a constant power of two after inlining; `R` rows).
#[inline(always)]
fn stage<L: Lanes, const R: usize>(l: L, x: &mut [L::V; R], h: usize) {
    for j in 0..R {
        if j & h == 0 && j + h < R {
            let (a, b) = (x[j], x[j + h]);
            x[j] = l.add(a, b);
            x[j + h] = l.sub(a, b);
        }
    }
}

/// Butterflies of strides `1, 2, .., top / 2` (`top` = `R` or `R / 2`) on `R` rows.
#[inline(always)]
fn butterflies<L: Lanes, const R: usize>(l: L, x: &mut [L::V; R], top: usize) {
    if top >= 2 {
        stage::<L, R>(l, x, 1);
    }
    if top >= 4 {
        stage::<L, R>(l, x, 2);
    }
    if top >= 8 {
        stage::<L, R>(l, x, 4);
    }
}

/// `R` rows `kt[at.0 + k * at.1..]` (one value each).
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn load_rows<L: Lanes, const R: usize>(l: L, kt: &[f32], at: (usize, usize)) -> [L::V; R] {
    let mut x = [l.splat(0.0); R];
    for k in 0..R {
        x[k] = l.load(&kt[at.0 + k * at.1..]);
    }
    x
}

/// Store `R` rows loaded by [`load_rows`].
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn store_rows<L: Lanes, const R: usize>(l: L, x: &[L::V; R], kt: &mut [f32], at: (usize, usize)) {
    for k in 0..R {
        l.store(x[k], &mut kt[at.0 + k * at.1..]);
    }
}

/// One radix-`R` pass of the Walsh-Hadamard transform on the columns starting at `col`: the
/// butterflies of channel strides `h0, 2 h0, .., R h0 / 2` on rows `j + k * h0`.
#[inline(always)]
fn wht_pass<L: Lanes, const R: usize>(
    l: L,
    kt: &mut [f32],
    d: usize,
    ld: usize,
    col: usize,
    h0: usize,
) {
    for blk in (0..d).step_by(R * h0) {
        for j in blk..blk + h0 {
            let mut x = load_rows::<L, R>(l, kt, (j * ld + col, h0 * ld));
            butterflies::<L, R>(l, &mut x, R);
            store_rows::<L, R>(l, &x, kt, (j * ld + col, h0 * ld));
        }
    }
}

/// The last radix-`R` pass (channel stride `h0 = d / R`): butterflies of strides
/// `h0 .. d / 4`, then for each pair `(i, i + d/2)` the last Hadamard stage, the `1/sqrt(d)`
/// scaling and RoPE at once (`rotate`), or RoPE alone (`!rotate`, `R = 2`); `t0` is the
/// columns' token offset in the group.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn last_pass<L: Lanes, const R: usize>(
    l: L,
    kt: &mut [f32],
    d: usize,
    g: usize,
    ld: usize,
    col: usize,
    t0: usize,
    tab: RopeGroup<'_>,
    rotate: bool,
) {
    let (half, h0) = (d / 2, d / R);
    let sc = 1.0 / (d as f32).sqrt();
    for j in 0..h0 {
        let mut x = load_rows::<L, R>(l, kt, (j * ld + col, h0 * ld));
        if rotate {
            butterflies::<L, R>(l, &mut x, R / 2);
        }
        for k in 0..R / 2 {
            let i = j + k * h0;
            let (cb, sb) = (tab.base[i], tab.base[half + i]);
            // Per-pair coefficients: with the rotation, `(a, b) = sc (x + y, x - y)` rotated by
            // angle `A` is `(P x + Q y, Q x - P y)` with `P = sc (cos A - sin A)` and
            // `Q = sc (cos A + sin A)`; `(P, Q)` (or `(cos A, sin A)`) is the group's base pair
            // `(X, Y)` rotated by the token's offset angle.
            let (bx, by) = if rotate {
                (sc * (cb - sb), sc * (cb + sb))
            } else {
                (cb, sb)
            };
            let (bx, by) = (l.splat(bx), l.splat(by));
            let co = l.load(&tab.offs[i * g + t0..]);
            let so = l.load(&tab.offs[(half + i) * g + t0..]);
            let p = l.fnmadd(by, so, l.mul(bx, co));
            let q = l.fmadd(bx, so, l.mul(by, co));
            let (u, v) = (x[k], x[k + R / 2]);
            let (a, b) = if rotate {
                (l.fmadd(p, u, l.mul(q, v)), l.fnmadd(p, v, l.mul(q, u)))
            } else {
                (l.fnmadd(q, v, l.mul(p, u)), l.fmadd(q, u, l.mul(p, v)))
            };
            // Stored at once: fewer live registers.
            l.store(a, &mut kt[i * ld + col..]);
            l.store(b, &mut kt[(half + i) * ld + col..]);
        }
    }
}

/// All passes on the columns at `col` (token offset `t0` in the group).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn columns<L: Lanes>(
    l: L,
    kt: &mut [f32],
    d: usize,
    g: usize,
    ld: usize,
    col: usize,
    t0: usize,
    tab: RopeGroup<'_>,
    rotate: bool,
) {
    if !rotate {
        return last_pass::<L, 2>(l, kt, d, g, ld, col, t0, tab, false);
    }
    let n = d.trailing_zeros() as usize;
    // The last pass takes the top (up to) 3 stages; radix-8 passes (and one smaller) before.
    let s_last = n.saturating_sub(3);
    let mut s = 0;
    while s < s_last {
        let h0 = 1 << s;
        match s_last - s {
            1 => wht_pass::<L, 2>(l, kt, d, ld, col, h0),
            2 => wht_pass::<L, 4>(l, kt, d, ld, col, h0),
            _ => wht_pass::<L, 8>(l, kt, d, ld, col, h0),
        }
        s += 3;
    }
    match n - s_last {
        1 => last_pass::<L, 2>(l, kt, d, g, ld, col, t0, tab, true),
        2 => last_pass::<L, 4>(l, kt, d, g, ld, col, t0, tab, true),
        _ => last_pass::<L, 8>(l, kt, d, g, ld, col, t0, tab, true),
    }
}

/// Un-rotate (`rotate`: the normalized Walsh-Hadamard transform, `d` a power of two) and
/// re-apply RoPE to one decoded group stored channel-major (`kt[c * ld + off..][..g]`), with
/// the tables of that group: the same map as [`hadamard_cm`] then [`rope_cm`] up to f32
/// rounding, in 8-token columns that stay in registers across up to 3 butterfly stages, with
/// the last stage and the scaling folded into the rotation. `simd`: AVX2+FMA registers (the
/// caller runs inside pulp's V3 dispatch); otherwise portable lanes, with fused
/// multiply-adds when `FMA`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope_group_cm<const FMA: bool>(
    kt: &mut [f32],
    d: usize,
    g: usize,
    ld: usize,
    off: usize,
    tab: RopeGroup<'_>,
    rotate: bool,
    simd: crate::codec::Simd,
) {
    // Common shapes with constant sizes (the loops unroll and most index checks fold away).
    match (d, g, ld) {
        (64, 32, 64) => group::<FMA>(kt, 64, 32, 64, off, tab, rotate, simd),
        (128, 32, 64) => group::<FMA>(kt, 128, 32, 64, off, tab, rotate, simd),
        _ => group::<FMA>(kt, d, g, ld, off, tab, rotate, simd),
    }
}

/// [`rope_group_cm`] for one shape.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn group<const FMA: bool>(
    kt: &mut [f32],
    d: usize,
    g: usize,
    ld: usize,
    off: usize,
    tab: RopeGroup<'_>,
    rotate: bool,
    simd: crate::codec::Simd,
) {
    let kt = &mut kt[..d * ld];
    let mut t = 0;
    while t + 8 <= g {
        #[cfg(target_arch = "x86_64")]
        if let Some(v3) = simd {
            columns(v3, kt, d, g, ld, off + t, t, tab, rotate);
            t += 8;
            continue;
        }
        columns(Port::<8, FMA>, kt, d, g, ld, off + t, t, tab, rotate);
        t += 8;
    }
    let _ = simd;
    while t < g {
        columns(Port::<1, FMA>, kt, d, g, ld, off + t, t, tab, rotate);
        t += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2+FMA level when the CPU has it.
    fn v3() -> crate::codec::Simd {
        #[cfg(target_arch = "x86_64")]
        return pulp::x86::V3::try_new();
        #[cfg(not(target_arch = "x86_64"))]
        None
    }

    /// [`rope_group_cm`] (both builds, 8-column and ragged tails, with and without the
    /// rotation, several head widths and offsets in a wider buffer) against
    /// [`hadamard_cm`] + [`rope_cm`] with the full [`rope_block`] table.
    #[test]
    fn rope_group_cm_matches_reference() {
        let mut seed = 0x2545_f491_u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for &(d, g) in &[
            (64usize, 32usize),
            (64, 8),
            (128, 16),
            (32, 13),
            (16, 4),
            (8, 3),
            (2, 9),
            (4, 1),
        ] {
            let freqs: Vec<f64> = (0..d / 2)
                .map(|i| 10000f64.powf(-2.0 * i as f64 / d as f64))
                .collect();
            let ld = (2 * g).div_ceil(16) * 16 + 16;
            let mut tabs = RopeTables::new(&freqs, g);
            let sink = 5;
            for grp in 0..4 {
                tabs.push_group(&freqs, sink + grp * g);
            }
            assert_eq!(tabs.groups(), 4);
            for grp in [0, 3] {
                let mut full = vec![0f32; d * g];
                rope_block(&freqs, g, sink + grp * g, &mut full);
                for rotate in [false, true] {
                    for off in [0, g, ld - g] {
                        let kt: Vec<f32> = (0..d * ld).map(|_| 4.0 * rnd()).collect();
                        let mut want = kt.clone();
                        if rotate {
                            hadamard_cm(&mut want, d, g, ld, off);
                        }
                        rope_cm(&mut want, d, g, ld, off, &full);
                        for path in 0..3 {
                            let mut got = kt.clone();
                            let tg = tabs.group(grp);
                            let k = &mut got;
                            match path {
                                0 => rope_group_cm::<false>(k, d, g, ld, off, tg, rotate, None),
                                1 => rope_group_cm::<true>(k, d, g, ld, off, tg, rotate, None),
                                _ => match v3() {
                                    Some(v) => {
                                        rope_group_cm::<true>(k, d, g, ld, off, tg, rotate, Some(v))
                                    }
                                    None => continue,
                                },
                            }
                            for c in 0..d {
                                for t in 0..ld {
                                    let (a, b) = (want[c * ld + t], got[c * ld + t]);
                                    if t < off || t >= off + g {
                                        // Columns outside the group are left alone.
                                        assert_eq!(a.to_bits(), b.to_bits());
                                    } else {
                                        assert!(
                                            (a - b).abs() <= 2e-5 * (d as f32).sqrt(),
                                            "d{d} g{g} grp{grp} rot{rotate} off{off} path{path} c{c} t{t}: {a} vs {b}"
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
