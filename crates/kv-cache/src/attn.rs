//! The attention kernel shared by every cache ([`crate::F32Cache`] and [`crate::QuantCache`]).
//!
//! A cache describes what it stores as a few *regions* of consecutive token positions (f32
//! rows, or quantized records) and, for each query position `p`, which tokens of each region
//! the query sees (see [`Vis`]). The kernel then computes, per KV head, a tiled attention:
//!
//! * work is split into tasks = (KV head, tile of [`QT`] query positions, range of keys); key
//!   ranges are split only when there are too few (head, query-tile) tasks for the threads
//!   (the decode step), and partial results are merged with their softmax maxima (split-K);
//! * a task walks its keys in tiles of [`TILE`] tokens (a multiple of the KIVI group in a KIVI
//!   body), dequantizes a quantized tile of its KV head once into a small scratch buffer shared
//!   by all its query rows (f32 regions are read in place), computes a score block for 3 query
//!   rows at a time (register-blocked: 3 rows x 4 keys for row-major keys, 3 rows x 16 keys for
//!   KIVI's channel-major keys), and folds it into each row's online softmax (running max, sum,
//!   rescaled accumulator) with a polynomial `exp` and a `P·V` accumulation over `head_dim`;
//! * the task function is compiled twice, portable and for AVX2+FMA (pulp's V3, runtime
//!   dispatch, no `unsafe`); both use the same operation order, so they agree to the last bit
//!   in practice. FP8 tiles are decoded by explicit AVX2 code in the V3 build
//!   ([`crate::codec::decode_fp8_records`], bit-identical to the scalar decode).

use crate::codec::{Simd, TokenCodec};
use crate::kivi;
use crate::policy::{Policy, Side};
use lowbit_kernels::math::exp_f32;
use rayon::prelude::*;
use std::ops::Range;

/// Keys per tile outside KIVI bodies (a KIVI body tile is a whole number of groups).
pub(crate) const TILE: usize = 64;
/// Query positions per task.
const QT: usize = 32;
/// Query rows per score block.
const RB: usize = 3;

/// Where one region's keys and values live.
pub(crate) enum Store<'a> {
    /// f32 rows `[token][kv_head][head_dim]` (token 0 = the region's first token).
    F32 {
        /// Keys.
        k: &'a [f32],
        /// Values.
        v: &'a [f32],
    },
    /// Quantized body records, laid out as [`crate::QuantCache`] stores them.
    Quant {
        /// The policy (codecs, KIVI group).
        p: &'a Policy,
        /// Key records.
        qk: &'a [u8],
        /// Value records.
        qv: &'a [u8],
        /// Compact KIVI keys: per KV head, `2 * d` channel references.
        kref: &'a [f32],
        /// `rope=pre`: RoPE tables of the body groups; decoded key groups are rotated with
        /// them ([`kivi::rope::rope_group_cm`]).
        rope: Option<&'a kivi::rope::RopeTables>,
    },
}

/// Which tokens of a region the query at position `p` sees (always intersected with the
/// region and with `..=p`). `b(p)` is [`Boundary::at`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Vis {
    /// Every token `<= p`.
    All,
    /// Tokens below `max(b(p), recent_start)`: the quantized body as decode saw it.
    Body,
    /// Tokens at or above `b(p)`: full precision as decode saw them.
    Recent,
}

/// A run of consecutive token positions stored one way.
pub(crate) struct Region<'a> {
    /// Absolute position of the region's first token.
    pub start: usize,
    /// Tokens in the region.
    pub n: usize,
    /// Storage.
    pub store: Store<'a>,
    /// Visibility rule.
    pub vis: Vis,
}

/// The quantized-body boundary that decode saw: after token `p` was appended (so `p + 1`
/// tokens in the cache), positions `sink..at(p)` were in the body and `at(p)..=p` in f32.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Boundary {
    /// Sink tokens (f32, never in the body).
    pub sink: usize,
    /// Residual window.
    pub residual: usize,
    /// Flush granularity (1, or the KIVI group).
    pub flush: usize,
}

impl Boundary {
    /// First position not in the quantized body when the cache held `p + 1` tokens.
    pub fn at(&self, p: usize) -> usize {
        let m = (p + 1).saturating_sub(self.sink);
        self.sink + m.saturating_sub(self.residual) / self.flush * self.flush
    }

    /// True when no token is ever read in f32 by a later query after it entered the body
    /// (`at(t) > t` for every `t`: no residual window and per-token flushing).
    pub fn never_recent(&self) -> bool {
        self.residual == 0 && self.flush == 1
    }
}

/// One attention call.
pub(crate) struct Job<'a> {
    /// Regions in position order.
    pub regions: Vec<Region<'a>>,
    /// Body boundary as decode saw it.
    pub bound: Boundary,
    /// First position of the `Recent` region (tokens below it are only available quantized).
    pub recent_start: usize,
    /// Head width.
    pub d: usize,
    /// KV heads.
    pub nh_kv: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Stored tokens.
    pub len: usize,
    /// Queries (the last `n_q` positions).
    pub n_q: usize,
    /// `[n_q][n_heads][d]`.
    pub q: &'a [f32],
    /// Score scale.
    pub scale: f32,
}

/// Online-softmax state of a task's rows.
struct Partial {
    m: Vec<f32>,
    l: Vec<f32>,
    acc: Vec<f32>,
}

impl Job<'_> {
    /// Visible absolute range `[lo, hi)` of region `r` for the query at position `p` that sees
    /// at most `window` tokens (itself included; `usize::MAX`: no window).
    #[inline(always)]
    fn visible(&self, r: &Region<'_>, p: usize, window: usize) -> (usize, usize) {
        let end = (r.start + r.n).min(p + 1);
        let (lo, hi) = match r.vis {
            Vis::All => (r.start, end),
            Vis::Body => (r.start, end.min(self.bound.at(p).max(self.recent_start))),
            Vis::Recent => (r.start.max(self.bound.at(p)), end),
        };
        let lo = lo.max((p + 1).saturating_sub(window));
        (lo, hi.max(lo))
    }
}

/// `a * b + c`: one fused multiply-add in the AVX2+FMA build (`FMA`), a multiply and an add in
/// the portable one (so the two builds agree up to f32 rounding, not to the last bit).
#[inline(always)]
fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Largest value of `x` (`-inf` when empty), in 8 lanes (a maximum does not depend on the order).
#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for i in 0..8 {
            m[i] = m[i].max(c[i]);
        }
    }
    for (i, &v) in it.remainder().iter().enumerate() {
        m[i] = m[i].max(v);
    }
    ((m[0].max(m[4])).max(m[1].max(m[5]))).max((m[2].max(m[6])).max(m[3].max(m[7])))
}

/// `w[t] = exp(s[t] - mx)` and their sum (8 lane sums, then a fixed tree). Two loops: each
/// vectorizes on its own.
#[inline(always)]
fn exp_sum(sr: &[f32], mx: f32, w: &mut [f32]) -> f32 {
    for (x, &y) in w.iter_mut().zip(sr) {
        *x = exp_f32(y - mx);
    }
    let mut a = [0f32; 8];
    let mut it = w.chunks_exact(8);
    for c in &mut it {
        for i in 0..8 {
            a[i] += c[i];
        }
    }
    for (i, &e) in it.remainder().iter().enumerate() {
        a[i] += e;
    }
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// Scores of `RB` query rows (`q`: `[RB][d]`) against keys `t0..t1` stored row-major
/// (`k[t * ks..][..d]`), written to `s[r * ld + t]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn scores_rm<const FMA: bool>(
    q: &[f32],
    d: usize,
    k: &[f32],
    ks: usize,
    t0: usize,
    t1: usize,
    s: &mut [f32],
    ld: usize,
) {
    let nd8 = d / 8 * 8;
    let qr: [&[f32]; RB] = std::array::from_fn(|r| &q[r * d..][..d]);
    let mut t = t0;
    while t + 4 <= t1 {
        let kr: [&[f32]; 4] = std::array::from_fn(|u| &k[(t + u) * ks..][..d]);
        let mut acc = [[[0f32; 8]; 4]; RB];
        for c in (0..nd8).step_by(8) {
            let qv: [[f32; 8]; RB] = std::array::from_fn(|r| {
                let mut a = [0f32; 8];
                a.copy_from_slice(&qr[r][c..c + 8]);
                a
            });
            let kv: [[f32; 8]; 4] = std::array::from_fn(|u| {
                let mut a = [0f32; 8];
                a.copy_from_slice(&kr[u][c..c + 8]);
                a
            });
            for r in 0..RB {
                for u in 0..4 {
                    for x in 0..8 {
                        acc[r][u][x] = fmadd::<FMA>(qv[r][x], kv[u][x], acc[r][u][x]);
                    }
                }
            }
        }
        for r in 0..RB {
            for u in 0..4 {
                let a = &acc[r][u];
                let mut v = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
                for c in nd8..d {
                    v = fmadd::<FMA>(qr[r][c], kr[u][c], v);
                }
                s[r * ld + t + u] = v;
            }
        }
        t += 4;
    }
    while t < t1 {
        let kr = &k[t * ks..][..d];
        for r in 0..RB {
            let mut a = [0f32; 8];
            for c in (0..nd8).step_by(8) {
                for x in 0..8 {
                    a[x] = fmadd::<FMA>(qr[r][c + x], kr[c + x], a[x]);
                }
            }
            let mut v = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
            for c in nd8..d {
                v = fmadd::<FMA>(qr[r][c], kr[c], v);
            }
            s[r * ld + t] = v;
        }
        t += 1;
    }
}

/// Scores of `RB` query rows against keys stored channel-major (`kt[c * ld + t]`, KIVI),
/// for key columns covering `t0..t1` (computed in blocks of 16 columns, 6 accumulators;
/// `ld` is a multiple of 16).
#[inline(always)]
fn scores_cm<const FMA: bool>(
    q: &[f32],
    d: usize,
    kt: &[f32],
    t0: usize,
    t1: usize,
    s: &mut [f32],
    ld: usize,
) {
    let mut tb = t0 / 16 * 16;
    while tb < t1 {
        scores_cm_block::<FMA, 16>(q, d, kt, tb, s, ld);
        tb += 16;
    }
}

/// One `RB x W` block of [`scores_cm`]: columns `tb..tb + W` (`tb + W <= ld`).
#[inline(always)]
fn scores_cm_block<const FMA: bool, const W: usize>(
    q: &[f32],
    d: usize,
    kt: &[f32],
    tb: usize,
    s: &mut [f32],
    ld: usize,
) {
    let mut acc = [[0f32; W]; RB];
    let q: [&[f32]; RB] = std::array::from_fn(|r| &q[r * d..][..d]);
    for (c, kc) in kt.chunks(ld).take(d).enumerate() {
        let mut kv = [0f32; W];
        kv.copy_from_slice(&kc[tb..tb + W]);
        for r in 0..RB {
            let qc = q[r][c];
            for x in 0..W {
                acc[r][x] = fmadd::<FMA>(qc, kv[x], acc[r][x]);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        s[r * ld + tb..][..W].copy_from_slice(a);
    }
}

/// `kt[c * ld + t] = k[t * ks + c]` for keys `t0..t1` and channels `c < d`: 8x8 blocks
/// through AVX2 shuffles in the V3 build, element by element otherwise (the same values).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn transpose_keys(
    simd: Simd,
    k: &[f32],
    ks: usize,
    d: usize,
    t0: usize,
    t1: usize,
    kt: &mut [f32],
    ld: usize,
) {
    let mut t = t0;
    #[cfg(target_arch = "x86_64")]
    if let Some(v3) = simd {
        let d8 = d / 8 * 8;
        while t + 8 <= t1 {
            let mut c = 0;
            while c < d8 {
                let blk: [[f32; 8]; 8] = std::array::from_fn(|u| {
                    let mut r = [0f32; 8];
                    r.copy_from_slice(&k[(t + u) * ks + c..][..8]);
                    r
                });
                for (cc, col) in transpose8(v3, blk).iter().enumerate() {
                    kt[(c + cc) * ld + t..][..8].copy_from_slice(col);
                }
                c += 8;
            }
            for c in d8..d {
                for u in 0..8 {
                    kt[c * ld + t + u] = k[(t + u) * ks + c];
                }
            }
            t += 8;
        }
    }
    let _ = simd;
    for t in t..t1 {
        let kr = &k[t * ks..][..d];
        for (c, &x) in kr.iter().enumerate() {
            kt[c * ld + t] = x;
        }
    }
}

/// Transpose of an 8x8 block (`out[c][u] = rows[u][c]`) with AVX2 unpacks and shuffles.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn transpose8(v3: pulp::x86::V3, rows: [[f32; 8]; 8]) -> [[f32; 8]; 8] {
    use std::arch::x86_64::__m256;
    let a = v3.avx;
    let r: [__m256; 8] = std::array::from_fn(|u| pulp::cast(rows[u]));
    let t: [__m256; 8] = std::array::from_fn(|i| {
        let (x, y) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            a._mm256_unpacklo_ps(x, y)
        } else {
            a._mm256_unpackhi_ps(x, y)
        }
    });
    // tt[0..4] from rows 0-3, tt[4..8] from rows 4-7: [lo: ch j of rows, hi: ch j + 4].
    let tt: [__m256; 8] = std::array::from_fn(|i| {
        let base = i / 4 * 4;
        let (x, y) = match i % 4 {
            0 | 1 => (t[base], t[base + 2]),
            _ => (t[base + 1], t[base + 3]),
        };
        if i % 2 == 0 {
            a._mm256_shuffle_ps::<0x44>(x, y)
        } else {
            a._mm256_shuffle_ps::<0xEE>(x, y)
        }
    });
    std::array::from_fn(|c| {
        let v = if c < 4 {
            a._mm256_permute2f128_ps::<0x20>(tt[c], tt[c + 4])
        } else {
            a._mm256_permute2f128_ps::<0x31>(tt[c - 4], tt[c])
        };
        pulp::cast(v)
    })
}

/// `o += Σ_j w[j] · v[j]` over rows `v[j * vs..][..d]`; `o` kept in registers for `D`-wide
/// heads.
#[inline(always)]
fn pv_fixed<const FMA: bool, const D: usize>(w: &[f32], v: &[f32], vs: usize, o: &mut [f32]) {
    let mut acc = [0f32; D];
    acc.copy_from_slice(&o[..D]);
    for (j, &wj) in w.iter().enumerate() {
        let vr = &v[j * vs..][..D];
        for x in 0..D {
            acc[x] = fmadd::<FMA>(wj, vr[x], acc[x]);
        }
    }
    o[..D].copy_from_slice(&acc);
}

#[inline(always)]
fn pv<const FMA: bool>(w: &[f32], v: &[f32], vs: usize, o: &mut [f32]) {
    match o.len() {
        64 => pv_fixed::<FMA, 64>(w, v, vs, o),
        128 => pv_fixed::<FMA, 128>(w, v, vs, o),
        32 => pv_fixed::<FMA, 32>(w, v, vs, o),
        d => {
            for (j, &wj) in w.iter().enumerate() {
                for (a, x) in o.iter_mut().zip(&v[j * vs..][..d]) {
                    *a = fmadd::<FMA>(wj, *x, *a);
                }
            }
        }
    }
}

/// One task: query positions `qs` (indices into the job's queries) of the query heads of KV
/// head `kvh`, keys `keys` (absolute positions), each query seeing at most `window` keys.
#[inline(always)]
fn task<const FMA: bool>(
    j: &Job<'_>,
    kvh: usize,
    qs: Range<usize>,
    keys: Range<usize>,
    window: usize,
    simd: Simd,
) -> Partial {
    let d = j.d;
    let g = j.n_heads / j.nh_kv;
    let row = j.nh_kv * d;
    let rows = qs.len() * g;
    let rpad = rows.div_ceil(RB) * RB;
    // Query rows (position-major, then GQA head), pre-scaled; padding rows are zero.
    let mut qb = vec![0f32; rpad * d];
    let mut pos = vec![0usize; rows];
    for (qi, i) in qs.clone().enumerate() {
        for hg in 0..g {
            let r = qi * g + hg;
            pos[r] = j.len - j.n_q + i;
            let src = &j.q[(i * j.n_heads + kvh * g + hg) * d..][..d];
            for (a, b) in qb[r * d..][..d].iter_mut().zip(src) {
                *a = b * j.scale;
            }
        }
    }
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut l = vec![0f32; rows];
    let mut acc = vec![0f32; rows * d];
    let last = pos.last().copied().unwrap_or(0);
    let kivi_g = match j.regions.iter().find_map(|r| match r.store {
        Store::Quant { p, .. } => Some(p),
        _ => None,
    }) {
        Some(p) if matches!(p.k, Side::KiviChannel { .. }) => p.group,
        _ => 1,
    };
    let tmax = if kivi_g > 1 {
        kivi_g * (TILE / kivi_g).max(1)
    } else {
        TILE
    };
    let ld = tmax.div_ceil(16) * 16;
    let mut s = vec![0f32; RB * ld];
    let mut w = vec![0f32; ld];
    let mut kb = Vec::new();
    let mut vb = Vec::new();
    let mut kt = Vec::new();
    let mut ktr = Vec::new();
    let mut tmp: Vec<u16> = Vec::with_capacity(tmax_hint(d));
    let mut ranges = vec![(0usize, 0usize); rows];

    for reg in &j.regions {
        let tile = match reg.store {
            Store::Quant { .. } => tmax,
            Store::F32 { .. } => TILE,
        };
        let mut ts = 0;
        while ts < reg.n {
            let a = reg.start + ts;
            let cnt = tile.min(reg.n - ts);
            ts += cnt;
            let (u0, u1) = (a.max(keys.start), (a + cnt).min(keys.end));
            if u0 >= u1 || u0 > last {
                continue;
            }
            // Each row's visible columns of this tile, relative to `a`.
            let mut any = false;
            for (r, rg) in ranges.iter_mut().enumerate() {
                let (lo, hi) = j.visible(reg, pos[r], window);
                let (lo, hi) = (lo.max(u0), hi.min(u1));
                *rg = if lo < hi {
                    any = true;
                    (lo - a, hi - a)
                } else {
                    (0, 0)
                };
            }
            if !any {
                continue;
            }
            // Load the tile: (keys, key stride, channel-major?, values, value stride).
            let (kref, ks, cm, vref, vs): (&[f32], usize, bool, &[f32], usize) = match reg.store {
                Store::F32 { k, v } => {
                    let o = (a - reg.start) * row + kvh * d;
                    (&k[o..], row, false, &v[o..], row)
                }
                Store::Quant {
                    p,
                    qk,
                    qv,
                    kref,
                    rope,
                } => {
                    let b0 = a - reg.start; // body index of the tile's first token
                    let vc = v_codec(p);
                    let vu = vc.record_bytes(d);
                    vb.resize(tmax * d, 0.0);
                    let step = j.nh_kv * vu;
                    vc.decode_tile(
                        qv,
                        (b0 * j.nh_kv + kvh) * vu,
                        step,
                        cnt,
                        &mut vb[..cnt * d],
                        &mut tmp,
                        simd,
                    );
                    match p.k {
                        Side::Token(c) => {
                            let ku = c.record_bytes(d);
                            kb.resize(tmax * d, 0.0);
                            let step = j.nh_kv * ku;
                            c.decode_tile(
                                qk,
                                (b0 * j.nh_kv + kvh) * ku,
                                step,
                                cnt,
                                &mut kb[..cnt * d],
                                &mut tmp,
                                simd,
                            );
                            (&kb[..], d, false, &vb[..], d)
                        }
                        Side::KiviChannel { bits, meta } => {
                            let gb = kivi::record_bytes(d, p.group, bits, meta);
                            kt.resize(d * ld, 0.0);
                            let refs = kref.get(kvh * 2 * d..).unwrap_or(&[]);
                            for gi in 0..cnt / p.group {
                                let grp = b0 / p.group + gi;
                                let rec = &qk[(grp * j.nh_kv + kvh) * gb..][..gb];
                                kivi::decode_cm(
                                    meta,
                                    rec,
                                    d,
                                    p.group,
                                    bits,
                                    refs,
                                    &mut kt,
                                    ld,
                                    gi * p.group,
                                );
                                if let Some(tab) = rope {
                                    kivi::rope::rope_group_cm::<FMA>(
                                        &mut kt,
                                        d,
                                        p.group,
                                        ld,
                                        gi * p.group,
                                        tab.group(grp),
                                        p.rotate,
                                        simd,
                                    );
                                }
                            }
                            (&kt[..], 0, true, &vb[..], d)
                        }
                    }
                }
            };
            // With many query rows, transpose row-major keys once per tile so every score
            // block runs the broadcast-FMA (channel-major) kernel; with few rows (decode) the
            // transpose would cost more than it saves.
            let transposed = !cm && rows >= 4 * RB;
            if transposed {
                ktr.resize(d * ld, 0.0);
                transpose_keys(simd, kref, ks, d, u0 - a, u1 - a, &mut ktr, ld);
            }
            for rb in (0..rows).step_by(RB) {
                let rend = (rb + RB).min(rows);
                let (mut c0, mut c1) = (usize::MAX, 0);
                for &(lo, hi) in &ranges[rb..rend] {
                    if lo < hi {
                        c0 = c0.min(lo);
                        c1 = c1.max(hi);
                    }
                }
                if c0 >= c1 {
                    continue;
                }
                let qblk = &qb[rb * d..][..RB * d];
                if cm {
                    scores_cm::<FMA>(qblk, d, kref, c0, c1, &mut s, ld);
                } else if transposed {
                    scores_cm::<FMA>(qblk, d, &ktr, c0, c1, &mut s, ld);
                } else {
                    scores_rm::<FMA>(qblk, d, kref, ks, c0, c1, &mut s, ld);
                }
                for r in rb..rend {
                    let (lo, hi) = ranges[r];
                    if lo >= hi {
                        continue;
                    }
                    let sr = &s[(r - rb) * ld..][lo..hi];
                    let bm = max_lanes(sr);
                    let mn = m[r].max(bm);
                    let corr = if m[r] == f32::NEG_INFINITY {
                        0.0
                    } else {
                        exp_f32(m[r] - mn)
                    };
                    m[r] = mn;
                    let wr = &mut w[..hi - lo];
                    let sum = exp_sum(sr, mn, wr);
                    l[r] = l[r] * corr + sum;
                    let o = &mut acc[r * d..][..d];
                    if corr != 1.0 {
                        for x in o.iter_mut() {
                            *x *= corr;
                        }
                    }
                    pv::<FMA>(wr, &vref[lo * vs..], vs, o);
                }
            }
        }
    }
    Partial { m, l, acc }
}

fn tmax_hint(d: usize) -> usize {
    TILE * d
}

fn v_codec(p: &Policy) -> TokenCodec {
    match p.v {
        Side::Token(c) => c,
        // parse() maps `v=kiviB` to a token codec; keep a sane fallback.
        Side::KiviChannel { bits, .. } => TokenCodec::Int { bits, group: 32 },
    }
}

/// [`task`] for [`pulp`]'s runtime dispatch: `with_simd` runs inside pulp's AVX2+FMA (V3)
/// `target_feature` function and everything below it is `#[inline(always)]`, so the whole task
/// is compiled for V3 (safe code: pulp checked the CPU when it made the token).
#[cfg(target_arch = "x86_64")]
struct V3Task<'a, 'b> {
    j: &'b Job<'a>,
    kvh: usize,
    qs: Range<usize>,
    keys: Range<usize>,
    window: usize,
    v3: pulp::x86::V3,
}

#[cfg(target_arch = "x86_64")]
impl pulp::WithSimd for V3Task<'_, '_> {
    type Output = Partial;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> Partial {
        task::<true>(
            self.j,
            self.kvh,
            self.qs,
            self.keys,
            self.window,
            Some(self.v3),
        )
    }
}

fn run_task(
    j: &Job<'_>,
    kvh: usize,
    qs: Range<usize>,
    keys: Range<usize>,
    window: usize,
    scalar: bool,
) -> Partial {
    #[cfg(target_arch = "x86_64")]
    if !scalar {
        if let Some(v3) = pulp::x86::V3::try_new() {
            return pulp::Simd::vectorize(
                v3,
                V3Task {
                    j,
                    kvh,
                    qs,
                    keys,
                    window,
                    v3,
                },
            );
        }
    }
    let _ = scalar;
    task::<false>(j, kvh, qs, keys, window, None)
}

/// Run the attention described by `j` into `out` (`[n_q][n_heads][d]`). The caller has
/// validated shapes; `n_q >= 1`.
pub(crate) fn attend(j: &Job<'_>, out: &mut [f32], scalar: bool) {
    attend_window(j, usize::MAX, out, scalar)
}

/// [`attend`] with a sliding window: the query at position `p` sees only keys
/// `p + 1 - window ..= p` (`window >= 1`; `usize::MAX`: plain causal attention).
pub(crate) fn attend_window(j: &Job<'_>, window: usize, out: &mut [f32], scalar: bool) {
    let (d, g) = (j.d, j.n_heads / j.nh_kv);
    let n_qt = j.n_q.div_ceil(QT);
    let base = j.nh_kv * n_qt;
    let threads = rayon::current_num_threads().max(1);
    // Keys below `k0` are outside every query's window.
    let k0 = (j.len - j.n_q + 1).saturating_sub(window);
    let nk = j.len - k0;
    // Split the keys only when (head, query tile) tasks cannot keep the threads busy.
    let n_split = if base < 2 * threads && nk >= 512 {
        (2 * threads).div_ceil(base).min(nk / 256).max(1)
    } else {
        1
    };
    let span = nk.div_ceil(n_split);
    let mut tasks = Vec::with_capacity(base * n_split);
    for h in 0..j.nh_kv {
        for qt in 0..n_qt {
            let qs = qt * QT..((qt + 1) * QT).min(j.n_q);
            for sp in 0..n_split {
                let keys = k0 + sp * span..(k0 + (sp + 1) * span).min(j.len);
                tasks.push((h, qs.clone(), keys));
            }
        }
    }
    let work = j.n_q * j.len * j.n_heads * d;
    let run = |(h, qs, keys): &(usize, Range<usize>, Range<usize>)| {
        run_task(j, *h, qs.clone(), keys.clone(), window, scalar)
    };
    let parts: Vec<Partial> = if work >= 1 << 16 && tasks.len() > 1 && threads > 1 {
        tasks.par_iter().map(run).collect()
    } else {
        tasks.iter().map(run).collect()
    };
    for (chunk, tk) in parts.chunks(n_split).zip(tasks.chunks(n_split)) {
        let (kvh, qs) = (tk[0].0, tk[0].1.clone());
        for (qi, i) in qs.enumerate() {
            for hg in 0..g {
                let r = qi * g + hg;
                let mx = chunk.iter().fold(f32::NEG_INFINITY, |a, p| a.max(p.m[r]));
                let o = &mut out[(i * j.n_heads + kvh * g + hg) * d..][..d];
                o.fill(0.0);
                let mut lsum = 0f32;
                for p in chunk {
                    if p.m[r] == f32::NEG_INFINITY {
                        continue;
                    }
                    let c = exp_f32(p.m[r] - mx);
                    lsum += p.l[r] * c;
                    for (a, b) in o.iter_mut().zip(&p.acc[r * d..][..d]) {
                        *a += b * c;
                    }
                }
                let inv = 1.0 / lsum;
                for a in o.iter_mut() {
                    *a *= inv;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive causal (windowed) attention in f64 over f32 rows `[token][kv_head][d]`.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        k: &[f32],
        v: &[f32],
        q: &[f32],
        (nh_kv, n_heads, d): (usize, usize, usize),
        len: usize,
        n_q: usize,
        scale: f32,
        window: usize,
    ) -> Vec<f64> {
        let g = n_heads / nh_kv;
        let mut out = vec![0f64; n_q * n_heads * d];
        for i in 0..n_q {
            let p = len - n_q + i;
            let lo = (p + 1).saturating_sub(window);
            for h in 0..n_heads {
                let kvh = h / g;
                let qr = &q[(i * n_heads + h) * d..][..d];
                let sc: Vec<f64> = (lo..=p)
                    .map(|t| {
                        let kr = &k[(t * nh_kv + kvh) * d..][..d];
                        let dot: f64 = qr.iter().zip(kr).map(|(a, b)| *a as f64 * *b as f64).sum();
                        dot * scale as f64
                    })
                    .collect();
                let mx = sc.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                let ws: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
                let z: f64 = ws.iter().sum();
                let o = &mut out[(i * n_heads + h) * d..][..d];
                for (t, w) in (lo..=p).zip(&ws) {
                    let vr = &v[(t * nh_kv + kvh) * d..][..d];
                    for (a, b) in o.iter_mut().zip(vr) {
                        *a += w / z * *b as f64;
                    }
                }
            }
        }
        out
    }

    /// The tiled kernel (AVX2+FMA build and portable build) against the naive f64 attention on
    /// ragged shapes: head widths off the SIMD width, query counts off the tile sizes, prefill
    /// and decode, sliding windows.
    #[test]
    fn tiled_paths_match_naive_reference() {
        let mut seed = 0x9e37_79b9_u64;
        let mut rnd = move || {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let cases: &[(usize, usize, usize, usize, usize, usize)] = &[
            // (kv heads, query heads, d, stored tokens, queries, window)
            (1, 1, 4, 3, 3, usize::MAX),
            (1, 3, 12, 45, 1, usize::MAX),
            (2, 4, 20, 67, 13, usize::MAX),
            (3, 9, 64, 200, 200, usize::MAX),
            (3, 9, 64, 300, 77, usize::MAX),
            (1, 2, 72, 131, 131, 50),
            (2, 2, 36, 97, 1, 17),
            (1, 3, 64, 1100, 1, usize::MAX),
            (1, 1, 8, 70, 70, 1),
        ];
        for &(nh_kv, n_heads, d, len, n_q, window) in cases {
            let k: Vec<f32> = (0..len * nh_kv * d).map(|_| rnd()).collect();
            let v: Vec<f32> = (0..len * nh_kv * d).map(|_| rnd()).collect();
            let q: Vec<f32> = (0..n_q * n_heads * d).map(|_| 2.0 * rnd()).collect();
            let scale = 1.0 / (d as f32).sqrt();
            let job = Job {
                regions: vec![Region {
                    start: 0,
                    n: len,
                    store: Store::F32 { k: &k, v: &v },
                    vis: Vis::All,
                }],
                bound: Boundary {
                    sink: 0,
                    residual: 0,
                    flush: 1,
                },
                recent_start: len,
                d,
                nh_kv,
                n_heads,
                len,
                n_q,
                q: &q,
                scale,
            };
            let want = naive(&k, &v, &q, (nh_kv, n_heads, d), len, n_q, scale, window);
            let mut outs = Vec::new();
            for scalar in [false, true] {
                let mut out = vec![f32::NAN; n_q * n_heads * d];
                attend_window(&job, window, &mut out, scalar);
                let err = out
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (*a as f64 - b).abs())
                    .fold(0f64, f64::max);
                assert!(
                    err < 2e-5,
                    "kv {nh_kv} heads {n_heads} d {d} len {len} n_q {n_q} window {window} \
                     scalar {scalar}: error {err}"
                );
                outs.push(out);
            }
            let diff = outs[0]
                .iter()
                .zip(&outs[1])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "simd vs portable {diff}");
        }
    }

    #[test]
    fn boundary_matches_incremental_flushing() {
        // Simulate token-by-token appends with the cache's flush rule.
        for &(sink, residual, flush) in &[(0, 0, 1), (0, 128, 32), (4, 8, 8), (3, 5, 4), (2, 0, 4)]
        {
            let b = Boundary {
                sink,
                residual,
                flush,
            };
            let (mut nres, mut nq) = (0usize, 0usize);
            for p in 0..300 {
                if p >= sink {
                    nres += 1;
                    if nres >= residual + flush {
                        let n = (nres - residual) / flush * flush;
                        nq += n;
                        nres -= n;
                    }
                }
                assert_eq!(b.at(p), sink + nq, "{sink} {residual} {flush} p {p}");
            }
        }
    }
}
