//! [`QuantCache`]: the cache behind every policy except the plain `f32` reference.
//!
//! Per layer, tokens live in three regions, in position order:
//! 1. the sink: the first `sink` tokens, f32;
//! 2. the quantized body: K and V records (see [`crate::codec`], [`crate::kivi`]);
//! 3. the residual window: the most recent tokens, f32; once it holds `residual + flush`
//!    tokens, its oldest `flush` tokens (1, or the KIVI group `g`) are quantized into the body.
//!
//! Attention ([`crate::attn`]) computes what token-by-token decode would compute: the query at
//! position `p` sees the tokens that were in the body when `p` was decoded in quantized form
//! and the rest in f32. So that a multi-token append (prefill) can do this, the f32 copies of
//! the tokens its own queries still need in f32 (the *shadow*: tokens flushed by that append at
//! or above the boundary its first query saw) are kept until the next append of the layer.

use crate::attn::{self, Boundary, Job, Region, Store, Vis};
use crate::codec::TokenCodec;
use crate::policy::{Policy, Side};
use crate::{check_attend_args, kivi, Error, KvCache, KvShape, Result};

#[derive(Debug, Clone, Default)]
struct Layer {
    sink_k: Vec<f32>,
    sink_v: Vec<f32>,
    /// Tokens in the quantized body.
    nq: usize,
    qk: Vec<u8>,
    qv: Vec<u8>,
    /// f32 keys/values of the last `shadow + residual-window` tokens.
    rk: Vec<f32>,
    rv: Vec<f32>,
    /// Leading tokens of `rk`/`rv` that are already in the body (prefill scratch, see the
    /// module docs); dropped at the next append.
    shadow: usize,
    /// Compact KIVI keys: per head, the `2 * head_dim` channel references
    /// ([`kivi::calibrate_c`]) taken from the layer's first body group; empty before it.
    kref: Vec<f32>,
}

/// In-place normalized Walsh-Hadamard transform of one head vector (length a power of two,
/// checked by [`Policy::parse`]): orthogonal, so rotating both `q` and `k` keeps `q·k`.
pub(crate) fn hadamard(x: &mut [f32]) {
    let n = x.len();
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (x[j], x[j + h]);
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
        h *= 2;
    }
    let s = 1.0 / (n as f32).sqrt();
    x.iter_mut().for_each(|v| *v *= s);
}

/// A cache storing K and V as a [`Policy`] says (FP8, INT, KIVI, sinks, residual window).
#[derive(Debug, Clone)]
pub struct QuantCache {
    shape: KvShape,
    policy: Policy,
    /// `policy.for_layer(l)` for every layer (`hi=` layers store 4-bit codes).
    lpol: Vec<Policy>,
    layers: Vec<Layer>,
    /// Force the portable code path (tests compare it with the AVX2 one).
    force_scalar: bool,
    /// RoPE inverse frequencies (`rope=pre` policies, see [`KvCache::set_rope`]).
    inv_freq: Option<Vec<f64>>,
    /// `rope=pre`: [`kivi::rope_block`] tables of body groups 0, 1, ... (`head_dim * g` floats
    /// each; positions `sink + i * g ..`), shared by all layers, grown as the body grows. A
    /// position table, not stored tokens: not part of [`KvCache::bytes`].
    rope_tab: Vec<f32>,
    /// `rope=pre`: the same rotations in the compact form the attention kernel reads (per
    /// group `head_dim` floats, see [`kivi::rope::RopeTables`]).
    rope_cm: kivi::rope::RopeTables,
}

/// Bytes of the K records of `n` body tokens of one head group layout; K uses
/// `[token][head][rec]` (token codecs) or `[group][head][group record]` (KIVI).
fn k_unit(p: &Policy, d: usize) -> usize {
    match p.k {
        Side::Token(c) => c.record_bytes(d),
        Side::KiviChannel { bits, meta } => kivi::record_bytes(d, p.group, bits, meta),
    }
}

fn v_codec(p: &Policy) -> TokenCodec {
    match p.v {
        Side::Token(c) => c,
        // parse() maps `v=kiviB` to a token codec; keep a sane fallback.
        Side::KiviChannel { bits, .. } => TokenCodec::Int { bits, group: 32 },
    }
}

impl QuantCache {
    /// An empty cache for `shape` storing tokens as `policy` says.
    pub fn new(shape: KvShape, policy: Policy) -> Self {
        Self {
            shape,
            lpol: (0..shape.n_layers).map(|l| policy.for_layer(l)).collect(),
            policy,
            layers: vec![Layer::default(); shape.n_layers],
            force_scalar: false,
            inv_freq: None,
            rope_tab: Vec::new(),
            rope_cm: kivi::rope::RopeTables::default(),
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

    fn boundary(&self) -> Boundary {
        Boundary {
            sink: self.policy.sink,
            residual: self.policy.residual,
            flush: self.policy.flush_tokens(),
        }
    }

    /// Extend the RoPE table to cover body groups `0..n_groups`.
    fn grow_rope(&mut self, n_groups: usize) {
        let (d, g) = (self.shape.head_dim, self.policy.group);
        let Some(f) = &self.inv_freq else { return };
        let have = self.rope_tab.len() / (d * g);
        for grp in have..n_groups {
            let base = self.rope_tab.len();
            self.rope_tab.resize(base + d * g, 0.0);
            kivi::rope_block(f, g, self.policy.sink + grp * g, &mut self.rope_tab[base..]);
        }
        for grp in self.rope_cm.groups()..n_groups {
            self.rope_cm.push_group(f, self.policy.sink + grp * g);
        }
    }

    /// Quantize the oldest `n` tokens of the residual window of `layer` into the body (their f32
    /// rows stay in `rk`/`rv`; the caller drops or keeps them as shadow).
    fn flush(&mut self, layer: usize, n: usize) {
        let (d, nh, row) = (self.shape.head_dim, self.shape.n_kv_heads, self.row());
        if self.policy.pre_rope {
            let g = self.policy.group;
            self.grow_rope((self.layers[layer].nq + n) / g);
        }
        let p = &self.lpol[layer];
        let tab = &self.rope_tab;
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
                    c.encode_fit(x, o, p.kfit_mse);
                }
            }
            Side::KiviChannel { bits, meta } => {
                let g = p.group;
                let mut rows = vec![0f32; g * d];
                for grp in 0..n / g {
                    let gabs = l.nq / g + grp;
                    for h in 0..nh {
                        for t in 0..g {
                            let src = &l.rk[(grp * g + t) * row + h * d..][..d];
                            rows[t * d..][..d].copy_from_slice(src);
                        }
                        if p.pre_rope {
                            kivi::unrope_rows(&mut rows, d, g, &tab[gabs * d * g..][..d * g]);
                            if p.rotate {
                                rows.chunks_exact_mut(d).for_each(hadamard);
                            }
                        }
                        // References of reference-based formats: from this head's rows of the
                        // layer's first body group.
                        if meta.needs_refs() && l.kref.len() < (h + 1) * 2 * d {
                            l.kref.resize((h + 1) * 2 * d, 0.0);
                            kivi::calibrate_c(&rows, d, bits, &mut l.kref[h * 2 * d..]);
                        }
                        let refs = l.kref.get(h * 2 * d..).unwrap_or(&[]);
                        let base = l.qk.len();
                        l.qk.resize(base + ku, 0);
                        kivi::encode(meta, &rows, d, bits, refs, p.key_fit(), &mut l.qk[base..]);
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
            vc.encode_fit(x, o, p.vfit_mse);
        }
        l.nq += n;
    }
}

impl KvCache for QuantCache {
    fn shape(&self) -> KvShape {
        self.shape
    }

    fn len(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| {
            let row = self.row();
            l.sink_k.len() / row + l.nq + l.rk.len() / row - l.shadow
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
        if self.policy.pre_rope && self.inv_freq.is_none() {
            return Err(Error::Policy {
                policy: self.policy.name.clone(),
                reason: "`rope=pre` needs the model's RoPE frequencies (KvCache::set_rope)".into(),
            });
        }
        let len_before = self.len(layer);
        let rotated;
        let k = if self.policy.rotate && !self.policy.pre_rope {
            let mut x = k.to_vec();
            x.chunks_exact_mut(self.shape.head_dim).for_each(hadamard);
            rotated = x;
            &rotated[..]
        } else {
            k
        };
        let rotated_v;
        let v = if self.policy.rotate_v {
            let mut x = v.to_vec();
            x.chunks_exact_mut(self.shape.head_dim).for_each(hadamard);
            rotated_v = x;
            &rotated_v[..]
        } else {
            v
        };
        let l = &mut self.layers[layer];
        // The previous append's shadow is no longer needed.
        if l.shadow > 0 {
            l.rk.drain(..l.shadow * row);
            l.rv.drain(..l.shadow * row);
            l.shadow = 0;
            if l.rk.capacity() > 2 * l.rk.len() + 1024 {
                l.rk.shrink_to_fit();
                l.rv.shrink_to_fit();
            }
        }
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
            let body_end_before = self.policy.sink.min(have_sink + to_sink) + self.layers[layer].nq;
            self.flush(layer, n);
            // Keep the f32 rows of flushed tokens that this append's queries saw in f32 when
            // decoded one by one: positions at or above the boundary of its first query.
            let b = self.boundary();
            let keep_from = if b.never_recent() || n_tokens == 0 {
                body_end_before + n
            } else {
                b.at(len_before).clamp(body_end_before, body_end_before + n)
            };
            let drop = keep_from - body_end_before;
            let l = &mut self.layers[layer];
            l.rk.drain(..drop * row);
            l.rv.drain(..drop * row);
            l.shadow = n - drop;
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
        let row = self.row();
        let rotated;
        let q = if self.policy.rotate && !self.policy.pre_rope {
            let mut x = q.to_vec();
            x.chunks_exact_mut(self.shape.head_dim).for_each(hadamard);
            rotated = x;
            &rotated[..]
        } else {
            q
        };
        let l = &self.layers[layer];
        let n_sink = l.sink_k.len() / row;
        let body0 = n_sink;
        let recent_start = body0 + l.nq - l.shadow;
        let job = Job {
            regions: vec![
                Region {
                    start: 0,
                    n: n_sink,
                    store: Store::F32 {
                        k: &l.sink_k,
                        v: &l.sink_v,
                    },
                    vis: Vis::All,
                },
                Region {
                    start: body0,
                    n: l.nq,
                    store: Store::Quant {
                        p: &self.lpol[layer],
                        qk: &l.qk,
                        qv: &l.qv,
                        kref: &l.kref,
                        rope: if self.policy.pre_rope {
                            Some(&self.rope_cm)
                        } else {
                            None
                        },
                    },
                    vis: Vis::Body,
                },
                Region {
                    start: recent_start,
                    n: l.rk.len() / row,
                    store: Store::F32 { k: &l.rk, v: &l.rv },
                    vis: Vis::Recent,
                },
            ],
            bound: self.boundary(),
            recent_start,
            d: self.shape.head_dim,
            nh_kv: self.shape.n_kv_heads,
            n_heads,
            len,
            n_q,
            q,
            scale,
        };
        attn::attend(&job, out, self.force_scalar);
        if self.policy.rotate_v {
            // The output is a convex combination of rotated values: rotate it back.
            out[..n_q * n_heads * self.shape.head_dim]
                .chunks_exact_mut(self.shape.head_dim)
                .for_each(hadamard);
        }
        Ok(())
    }

    fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                4 * (l.sink_k.len() + l.sink_v.len() + l.rk.len() + l.rv.len()
                    - 2 * l.shadow * self.row()
                    + l.kref.len())
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
            l.kref.clear();
            l.nq = 0;
            l.shadow = 0;
        }
    }

    fn policy_name(&self) -> String {
        self.policy.name.clone()
    }

    fn set_rope(&mut self, inv_freq: &[f64]) -> Result<()> {
        if !self.policy.pre_rope {
            return Ok(());
        }
        if inv_freq.len() * 2 != self.shape.head_dim {
            return Err(Error::Shape(format!(
                "RoPE needs head_dim / 2 = {} frequencies, got {}",
                self.shape.head_dim / 2,
                inv_freq.len()
            )));
        }
        if self.inv_freq.as_deref() != Some(inv_freq) {
            if self.layers.iter().any(|l| l.nq > 0) {
                return Err(Error::Shape(
                    "RoPE frequencies changed after keys were quantized".into(),
                ));
            }
            self.inv_freq = Some(inv_freq.to_vec());
            self.rope_tab.clear();
            self.rope_cm = kivi::rope::RopeTables::new(inv_freq, self.policy.group);
        }
        Ok(())
    }
}
