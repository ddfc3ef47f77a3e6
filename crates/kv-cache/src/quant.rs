//! [`QuantCache`]: the cache behind every policy except the plain `f32` reference.
//!
//! Per layer, tokens live in three regions, in position order:
//! 1. the sink: the first `sink` tokens, f32;
//! 2. the quantized body: K and V records (see [`crate::codec`], [`crate::kivi`]);
//! 3. the residual window: the most recent tokens, f32; once it holds `residual + flush`
//!    tokens, its oldest `flush` tokens (1, or the KIVI group `g`) are quantized into the body.
//!
//! Attention walks the regions in blocks of at most 32 tokens (one KIVI group in the body),
//! dequantizes one block of one KV head into a small scratch buffer and folds it into an online
//! (streaming) softmax of every query of the GQA group, so the f32 cache is never materialised.
//! Work is split over (KV head, chunk of queries) and run with rayon when large enough. The
//! same code is compiled twice, once with AVX2+FMA enabled (chosen at run time).

use crate::codec::TokenCodec;
use crate::policy::{Policy, Side};
use crate::{check_attend_args, kivi, Error, KvCache, KvShape, Result};
use rayon::prelude::*;

/// Tokens per attention block outside KIVI key groups.
const BLOCK: usize = 32;
/// Queries per parallel task in prefill.
const Q_CHUNK: usize = 32;

#[derive(Debug, Clone, Default)]
struct Layer {
    sink_k: Vec<f32>,
    sink_v: Vec<f32>,
    /// Tokens in the quantized body.
    nq: usize,
    qk: Vec<u8>,
    qv: Vec<u8>,
    rk: Vec<f32>,
    rv: Vec<f32>,
}

/// A cache storing K and V as a [`Policy`] says (FP8, INT, KIVI, sinks, residual window).
#[derive(Debug, Clone)]
pub struct QuantCache {
    shape: KvShape,
    policy: Policy,
    layers: Vec<Layer>,
    /// Force the portable code path (tests compare it with the AVX2 one).
    force_scalar: bool,
}

/// Bytes of the K records of `n` body tokens of one head group layout; K uses
/// `[token][head][rec]` (token codecs) or `[group][head][group record]` (KIVI).
fn k_unit(p: &Policy, d: usize) -> usize {
    match p.k {
        Side::Token(c) => c.record_bytes(d),
        Side::KiviChannel { bits } => kivi::group_bytes(d, p.group, bits),
    }
}

fn v_codec(p: &Policy) -> TokenCodec {
    match p.v {
        Side::Token(c) => c,
        // parse() maps `v=kiviB` to a token codec; keep a sane fallback.
        Side::KiviChannel { bits } => TokenCodec::Int { bits, group: 32 },
    }
}

impl QuantCache {
    /// An empty cache for `shape` storing tokens as `policy` says.
    pub fn new(shape: KvShape, policy: Policy) -> Self {
        Self {
            shape,
            policy,
            layers: vec![Layer::default(); shape.n_layers],
            force_scalar: false,
        }
    }

    /// The policy this cache follows.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    #[cfg(test)]
    pub(crate) fn set_force_scalar(&mut self, on: bool) {
        self.force_scalar = on;
    }

    fn row(&self) -> usize {
        self.shape.n_kv_heads * self.shape.head_dim
    }

    /// Quantize the oldest `n` tokens of the residual window of `layer` into the body.
    fn flush(&mut self, layer: usize, n: usize) {
        let (d, nh, row) = (self.shape.head_dim, self.shape.n_kv_heads, self.row());
        let p = &self.policy;
        let l = &mut self.layers[layer];
        let (ku, vc) = (k_unit(p, d), v_codec(p));
        let vu = vc.record_bytes(d);
        match p.k {
            Side::Token(c) => {
                let base = l.qk.len();
                l.qk.resize(base + n * nh * ku, 0);
                for (x, o) in l.rk[..n * row]
                    .chunks_exact(d)
                    .zip(l.qk[base..].chunks_exact_mut(ku))
                {
                    c.encode(x, o);
                }
            }
            Side::KiviChannel { bits } => {
                let g = p.group;
                let mut rows = vec![0f32; g * d];
                for grp in 0..n / g {
                    for h in 0..nh {
                        for t in 0..g {
                            let src = &l.rk[(grp * g + t) * row + h * d..][..d];
                            rows[t * d..][..d].copy_from_slice(src);
                        }
                        let base = l.qk.len();
                        l.qk.resize(base + ku, 0);
                        kivi::encode_group(&rows, d, bits, &mut l.qk[base..]);
                    }
                }
            }
        }
        let base = l.qv.len();
        l.qv.resize(base + n * nh * vu, 0);
        for (x, o) in l.rv[..n * row]
            .chunks_exact(d)
            .zip(l.qv[base..].chunks_exact_mut(vu))
        {
            vc.encode(x, o);
        }
        l.rk.drain(..n * row);
        l.rv.drain(..n * row);
        l.nq += n;
    }
}

/// Online-softmax state of one (query, head) pair.
struct Acc<'a> {
    m: &'a mut f32,
    l: &'a mut f32,
    acc: &'a mut [f32],
}

/// Dot product with 8 independent accumulators so the compiler can vectorize it (a plain
/// `sum()` is a serial dependency chain). Shared with the f32 reference cache.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Fold `cnt` keys/values of a block (`kb`, `vb`: `[cnt][d]`) into one query's state.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fold_block(
    q: &[f32],
    kb: &[f32],
    vb: &[f32],
    cnt: usize,
    d: usize,
    scale: f32,
    s: Acc<'_>,
    sc: &mut [f32],
) {
    let mut bm = f32::NEG_INFINITY;
    for j in 0..cnt {
        let x = dot(q, &kb[j * d..][..d]) * scale;
        sc[j] = x;
        bm = bm.max(x);
    }
    let m_new = s.m.max(bm);
    let corr = (*s.m - m_new).exp();
    if corr != 1.0 {
        *s.l *= corr;
        for a in s.acc.iter_mut() {
            *a *= corr;
        }
    }
    *s.m = m_new;
    let mut sum = 0f32;
    for j in 0..cnt {
        let w = (sc[j] - m_new).exp();
        sum += w;
        for (a, v) in s.acc.iter_mut().zip(&vb[j * d..][..d]) {
            *a += w * v;
        }
    }
    *s.l += sum;
}

/// Everything one attention task reads.
struct Job<'a> {
    p: &'a Policy,
    l: &'a Layer,
    d: usize,
    nh_kv: usize,
    n_heads: usize,
    group: usize,
    len: usize,
    n_q: usize,
    q: &'a [f32],
    scale: f32,
}

/// Attention of queries `qs` of the query heads of KV head `kvh`; returns
/// `[qs.len()][group][d]`.
#[inline(always)]
fn attend_task(j: &Job<'_>, kvh: usize, qs: std::ops::Range<usize>) -> Vec<f32> {
    let (d, g) = (j.d, j.group);
    let row = j.nh_kv * d;
    let nqh = qs.len() * g;
    let mut m = vec![f32::NEG_INFINITY; nqh];
    let mut l = vec![0f32; nqh];
    let mut acc = vec![0f32; nqh * d];
    let bmax = BLOCK.max(j.p.flush_tokens());
    let mut kb = vec![0f32; bmax * d];
    let mut vb = vec![0f32; bmax * d];
    let mut sc = vec![0f32; bmax];
    let mut tmp = vec![0u16; d];
    let mut col = vec![0f32; bmax];
    let last_pos = j.len - j.n_q + qs.end - 1; // the furthest any query of this task sees
    let n_sink = j.l.sink_k.len() / row;
    let vc = v_codec(j.p);
    let (ku, vu) = (k_unit(j.p, d), vc.record_bytes(d));

    let mut fold = |t0: usize, cnt: usize, kb: &[f32], vb: &[f32]| {
        for (qi, i) in qs.clone().enumerate() {
            let pos = j.len - j.n_q + i;
            if pos < t0 {
                continue;
            }
            let c = cnt.min(pos + 1 - t0);
            for hg in 0..g {
                let h = kvh * g + hg;
                let s = qi * g + hg;
                let qv = &j.q[(i * j.n_heads + h) * d..][..d];
                let st = Acc {
                    m: &mut m[s],
                    l: &mut l[s],
                    acc: &mut acc[s * d..][..d],
                };
                fold_block(qv, kb, vb, c, d, j.scale, st, &mut sc);
            }
        }
    };
    let copy_f32 = |src: &[f32], t0: usize, cnt: usize, dst: &mut [f32]| {
        for t in 0..cnt {
            dst[t * d..][..d].copy_from_slice(&src[(t0 + t) * row + kvh * d..][..d]);
        }
    };

    // 1. Sink.
    let mut t = 0;
    while t < n_sink && t <= last_pos {
        let cnt = BLOCK.min(n_sink - t);
        copy_f32(&j.l.sink_k, t, cnt, &mut kb);
        copy_f32(&j.l.sink_v, t, cnt, &mut vb);
        fold(t, cnt, &kb, &vb);
        t += cnt;
    }
    // 2. Quantized body.
    let body_blk = match j.p.k {
        Side::KiviChannel { .. } => j.p.group,
        Side::Token(_) => BLOCK,
    };
    let mut b = 0;
    while b < j.l.nq && n_sink + b <= last_pos {
        let cnt = body_blk.min(j.l.nq - b);
        match j.p.k {
            Side::Token(c) => {
                for tt in 0..cnt {
                    let rec = &j.l.qk[((b + tt) * j.nh_kv + kvh) * ku..][..ku];
                    c.decode(rec, &mut kb[tt * d..][..d], &mut tmp);
                }
            }
            Side::KiviChannel { bits } => {
                let rec = &j.l.qk[((b / j.p.group) * j.nh_kv + kvh) * ku..][..ku];
                kivi::decode_group(rec, d, j.p.group, bits, &mut kb, &mut col);
            }
        }
        for tt in 0..cnt {
            let rec = &j.l.qv[((b + tt) * j.nh_kv + kvh) * vu..][..vu];
            vc.decode(rec, &mut vb[tt * d..][..d], &mut tmp);
        }
        fold(n_sink + b, cnt, &kb, &vb);
        b += cnt;
    }
    // 3. Residual window.
    let n_res = j.l.rk.len() / row;
    let r0 = n_sink + j.l.nq;
    let mut t = 0;
    while t < n_res && r0 + t <= last_pos {
        let cnt = BLOCK.min(n_res - t);
        copy_f32(&j.l.rk, t, cnt, &mut kb);
        copy_f32(&j.l.rv, t, cnt, &mut vb);
        fold(r0 + t, cnt, &kb, &vb);
        t += cnt;
    }
    for s in 0..nqh {
        let inv = 1.0 / l[s];
        for a in &mut acc[s * d..][..d] {
            *a *= inv;
        }
    }
    acc
}

/// [`attend_task`] compiled with AVX2 and FMA enabled.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_task_avx2(j: &Job<'_>, kvh: usize, qs: std::ops::Range<usize>) -> Vec<f32> {
    attend_task(j, kvh, qs)
}

fn run_task(j: &Job<'_>, kvh: usize, qs: std::ops::Range<usize>, scalar: bool) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if !scalar && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA were detected on this CPU just above.
        return unsafe { attend_task_avx2(j, kvh, qs) };
    }
    let _ = scalar;
    attend_task(j, kvh, qs)
}

impl KvCache for QuantCache {
    fn shape(&self) -> KvShape {
        self.shape
    }

    fn len(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| {
            let row = self.row();
            l.sink_k.len() / row + l.nq + l.rk.len() / row
        })
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], n_tokens: usize) -> Result<()> {
        if layer >= self.shape.n_layers {
            return Err(Error::Layer {
                layer,
                n_layers: self.shape.n_layers,
            });
        }
        let row = self.row();
        let want = n_tokens * row;
        if k.len() != want || v.len() != want {
            return Err(Error::Shape(format!(
                "append of {n_tokens} tokens needs {want} values, got k={} v={}",
                k.len(),
                v.len()
            )));
        }
        let l = &mut self.layers[layer];
        let have_sink = l.sink_k.len() / row;
        let to_sink = self.policy.sink.saturating_sub(have_sink).min(n_tokens);
        l.sink_k.extend_from_slice(&k[..to_sink * row]);
        l.sink_v.extend_from_slice(&v[..to_sink * row]);
        l.rk.extend_from_slice(&k[to_sink * row..]);
        l.rv.extend_from_slice(&v[to_sink * row..]);
        let f = self.policy.flush_tokens();
        let n_res = self.layers[layer].rk.len() / row;
        if n_res >= self.policy.residual + f {
            let n = (n_res - self.policy.residual) / f * f;
            self.flush(layer, n);
        }
        Ok(())
    }

    fn attend(
        &self,
        layer: usize,
        q: &[f32],
        n_q: usize,
        n_heads: usize,
        scale: f32,
        out: &mut [f32],
    ) -> Result<()> {
        if layer >= self.shape.n_layers {
            return Err(Error::Layer {
                layer,
                n_layers: self.shape.n_layers,
            });
        }
        let len = self.len(layer);
        check_attend_args(&self.shape, len, q, n_q, n_heads, out)?;
        if n_q == 0 {
            return Ok(());
        }
        let d = self.shape.head_dim;
        let nh_kv = self.shape.n_kv_heads;
        let group = n_heads / nh_kv;
        let job = Job {
            p: &self.policy,
            l: &self.layers[layer],
            d,
            nh_kv,
            n_heads,
            group,
            len,
            n_q,
            q,
            scale,
        };
        let tasks: Vec<(usize, std::ops::Range<usize>)> = (0..nh_kv)
            .flat_map(|h| {
                (0..n_q)
                    .step_by(Q_CHUNK)
                    .map(move |s| (h, s..(s + Q_CHUNK).min(n_q)))
            })
            .collect();
        let work = n_q * len * n_heads * d;
        let scalar = self.force_scalar;
        let results: Vec<Vec<f32>> = if work >= 1 << 16 && tasks.len() > 1 {
            tasks
                .par_iter()
                .map(|(h, r)| run_task(&job, *h, r.clone(), scalar))
                .collect()
        } else {
            tasks
                .iter()
                .map(|(h, r)| run_task(&job, *h, r.clone(), scalar))
                .collect()
        };
        for ((kvh, qs), res) in tasks.iter().zip(&results) {
            for (qi, i) in qs.clone().enumerate() {
                for hg in 0..group {
                    let h = kvh * group + hg;
                    out[(i * n_heads + h) * d..][..d]
                        .copy_from_slice(&res[(qi * group + hg) * d..][..d]);
                }
            }
        }
        Ok(())
    }

    fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                4 * (l.sink_k.len() + l.sink_v.len() + l.rk.len() + l.rv.len())
                    + l.qk.len()
                    + l.qv.len()
            })
            .sum()
    }

    fn clear(&mut self) {
        for l in &mut self.layers {
            l.sink_k.clear();
            l.sink_v.clear();
            l.rk.clear();
            l.rv.clear();
            l.qk.clear();
            l.qv.clear();
            l.nq = 0;
        }
    }

    fn policy_name(&self) -> String {
        self.policy.name.clone()
    }
}
