//! Attention of the quantized caches against the f32 reference.

use crate::codec::TokenCodec;
use crate::policy::{Policy, Side};
use crate::{build, kivi, F32Cache, KvCache, KvShape, QuantCache};

struct Rng(u64);
impl Rng {
    fn f(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| self.f() * amp).collect()
    }
}

/// Feed the same K/V (in chunks of `chunks`) to both caches; return the attention outputs of
/// `n_q` final queries.
fn run_pair(
    a: &mut dyn KvCache,
    b: &mut dyn KvCache,
    kv: &(Vec<f32>, Vec<f32>),
    chunks: &[usize],
    q: &[f32],
    n_q: usize,
    n_heads: usize,
) -> (Vec<f32>, Vec<f32>) {
    let row = a.shape().n_kv_heads * a.shape().head_dim;
    let mut t = 0;
    for &c in chunks {
        for layer in 0..a.shape().n_layers {
            let (k, v) = (&kv.0[t * row..(t + c) * row], &kv.1[t * row..(t + c) * row]);
            a.append(layer, k, v, c).unwrap();
            b.append(layer, k, v, c).unwrap();
        }
        t += c;
    }
    let layer = a.shape().n_layers - 1;
    let scale = 1.0 / (a.shape().head_dim as f32).sqrt();
    let mut oa = vec![0f32; q.len()];
    let mut ob = vec![0f32; q.len()];
    a.attend(layer, q, n_q, n_heads, scale, &mut oa).unwrap();
    b.attend(layer, q, n_q, n_heads, scale, &mut ob).unwrap();
    (oa, ob)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Round-trip K and V the way a cache with `p` stores `len` tokens (sink and residual window
/// in f32, the body through the codecs), computed independently of `QuantCache`.
fn roundtrip(p: &Policy, shape: KvShape, k: &[f32], v: &[f32], len: usize) -> (Vec<f32>, Vec<f32>) {
    let (d, nh) = (shape.head_dim, shape.n_kv_heads);
    let row = nh * d;
    let f = p.flush_tokens();
    let after_sink = len.saturating_sub(p.sink);
    let nq = if after_sink >= p.residual {
        (after_sink - p.residual) / f * f
    } else {
        0
    };
    let (mut k2, mut v2) = (k.to_vec(), v.to_vec());
    let mut tmp = vec![0u16; d];
    let tok = |c: TokenCodec, x: &[f32], y: &mut [f32], tmp: &mut [u16], mse: bool| {
        let mut rec = vec![0u8; c.record_bytes(d)];
        c.encode_fit(x, &mut rec, mse);
        c.decode(&rec, y, tmp);
    };
    for t in p.sink..p.sink + nq {
        for h in 0..nh {
            let o = t * row + h * d;
            if let Side::Token(c) = p.k {
                tok(c, &k[o..o + d], &mut k2[o..o + d], &mut tmp, p.kfit_mse);
            }
            if let Side::Token(c) = p.v {
                // `rot=v`: values are stored rotated and the output rotated back, i.e. each
                // body value is read as H·dequant(quant(H·v)).
                let mut x = v[o..o + d].to_vec();
                if p.rotate_v {
                    crate::quant::hadamard(&mut x);
                }
                tok(c, &x, &mut v2[o..o + d], &mut tmp, p.vfit_mse);
                if p.rotate_v {
                    crate::quant::hadamard(&mut v2[o..o + d]);
                }
            }
        }
    }
    if let Side::KiviChannel { bits, meta } = p.k {
        let g = p.group;
        let freqs = test_freqs(d);
        let mut refs = vec![0f32; nh * 2 * d];
        for grp in 0..nq / g {
            for h in 0..nh {
                let pos0 = p.sink + grp * g;
                let mut rows: Vec<f32> = (0..g)
                    .flat_map(|t| k[(pos0 + t) * row + h * d..][..d].to_vec())
                    .collect();
                if p.pre_rope {
                    for t in 0..g {
                        rope_f64(&mut rows[t * d..][..d], &freqs, pos0 + t, -1.0);
                        if p.rotate {
                            crate::quant::hadamard(&mut rows[t * d..][..d]);
                        }
                    }
                }
                let mut out = vec![0f32; g * d];
                let rb = &mut refs[h * 2 * d..][..2 * d];
                if grp == 0 && meta.needs_refs() {
                    kivi::calibrate_c(&rows, d, bits, rb);
                }
                let mut rec = vec![0u8; kivi::record_bytes(d, g, bits, meta)];
                kivi::encode(meta, &rows, d, bits, rb, p.key_fit(), &mut rec);
                kivi::decode(meta, &rec, d, g, bits, rb, &mut out, &mut vec![0f32; g * d]);
                if p.pre_rope {
                    for t in 0..g {
                        if p.rotate {
                            crate::quant::hadamard(&mut out[t * d..][..d]);
                        }
                        rope_f64(&mut out[t * d..][..d], &freqs, pos0 + t, 1.0);
                    }
                }
                for t in 0..g {
                    k2[(pos0 + t) * row + h * d..][..d].copy_from_slice(&out[t * d..][..d]);
                }
            }
        }
    }
    (k2, v2)
}

/// RoPE frequencies the tests give the caches (`10000^(-2i/d)`).
fn test_freqs(d: usize) -> Vec<f64> {
    (0..d / 2)
        .map(|i| 10000f64.powf(-2.0 * i as f64 / d as f64))
        .collect()
}

/// Rotate one head vector by RoPE at `pos` ("rotate half" layout) in f64; `sign = -1` undoes it.
fn rope_f64(x: &mut [f32], freqs: &[f64], pos: usize, sign: f64) {
    let half = freqs.len();
    for (i, f) in freqs.iter().enumerate() {
        let (s, c) = (sign * pos as f64 * f).sin_cos();
        let (a, b) = (x[i] as f64, x[half + i] as f64);
        x[i] = (a * c - b * s) as f32;
        x[half + i] = (b * c + a * s) as f32;
    }
}

/// [`build`] with the test RoPE frequencies set (needed by `rope=pre`, ignored otherwise).
fn build_r(pol: &str, shape: KvShape) -> Box<dyn KvCache> {
    let mut c = build(pol, shape).unwrap();
    c.set_rope(&test_freqs(shape.head_dim)).unwrap();
    c
}

const POLICIES: &[&str] = &[
    "kivi2c,r=8,g=8",
    "kivi2,rope=pre,r=8,g=8,sink=2",
    "kivi4c,rope=pre,r=5,g=4,sink=3",
    "kivi2c,rope=pre,rot=h,r=8,g=8,sink=1",
    "k=kivi2c,v=fp8,g=16,r=0",
    "f16",
    "bf16",
    "fp8",
    "fp8e5m2",
    "int8",
    "int4",
    "k=int2g4,v=int4g4",
    "kivi2,r=8,g=8",
    "kivi4,r=5,g=4,sink=3",
    "k=fp8,v=int4g4,sink=4",
    "k=kivi2,v=fp8,g=16,r=0",
    "fp8s",
    "k=fp8s-1,v=int4g4,sink=2",
    "kivi2,fit=mse,rot=v,r=8,g=8,sink=2",
    // (Not with `fit=mse`: the reference undoes RoPE in f64, the cache in f32, and the MSE
    // search may pick another grid for inputs that differ by rounding.)
    "kivi2,rope=pre,rot=hv,r=8,g=8,sink=1",
    "k=int2g16,v=int4g4,fit=mse",
    "k=fp8,v=int2g16,rot=v",
    // Layer 1 at 4 bits (the test attends both layers), values-only MSE grids.
    "kivi2,hi=0,r=8,g=8,sink=2",
    "kivi2c,rope=pre,rot=hv,hi=0,r=8,g=8,sink=1",
    "k=kivi2,v=int2g4,vfit=mse,rot=v,r=8,g=8",
    "k=int2g4,v=int4g4,kfit=mse",
    "kivi2c,kfit=cover,rot=v,r=8,g=8,sink=1",
    "kivi2c,kfit=mse,r=8,g=8,sink=1",
    // Fine key metadata, symmetric values.
    "kivi2f,rope=pre,rot=hv,r=8,g=8,sink=1",
    "k=kivi2f,v=int2sg4,rot=v,r=8,g=8,sink=2",
    "k=fp8,v=int2s,sink=1",
    "kivi4f,kmeta=7.7,kfit=cover,r=5,g=4,sink=3",
    "k=int2sg16,v=int4sg4",
];

/// f64 causal GQA attention: query `i` sits at position `len - n_q + i` and reads token `t`'s
/// key and value from `view(position, t)` (each `[n_kv_heads][d]`).
#[allow(clippy::too_many_arguments)]
fn ref_attend<'a>(
    len: usize,
    n_q: usize,
    n_heads: usize,
    nh: usize,
    d: usize,
    q: &[f32],
    scale: f32,
    view: impl Fn(usize, usize) -> (&'a [f32], &'a [f32]),
) -> Vec<f32> {
    let g = n_heads / nh;
    let mut out = vec![0f32; n_q * n_heads * d];
    for i in 0..n_q {
        let p = len - n_q + i;
        for h in 0..n_heads {
            let kvh = h / g;
            let qv = &q[(i * n_heads + h) * d..][..d];
            let sc: Vec<f64> = (0..=p)
                .map(|t| {
                    let k = &view(p, t).0[kvh * d..][..d];
                    qv.iter()
                        .zip(k)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
            let sum: f64 = w.iter().sum();
            for c in 0..d {
                let o: f64 = (0..=p)
                    .map(|t| w[t] * view(p, t).1[kvh * d + c] as f64)
                    .sum();
                out[(i * n_heads + h) * d + c] = (o / sum) as f32;
            }
        }
    }
    out
}

/// Max |a - b| relative to max |b| (at least 1).
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(1f32, |m, x| m.max(x.abs()));
    max_abs_diff(a, b) / scale
}

/// The f32 cache against an f64 reference on ragged shapes: GQA, head widths that are not
/// multiples of 8, lengths that are not multiples of the tile, several queries with causal
/// offsets, chunked appends, and a long decode (keys split across tasks).
#[test]
fn f32_cache_matches_f64_reference() {
    let mut r = Rng(0x5eed_1234_abcd_0001);
    for &(nh, d, n_heads, chunks, n_q) in &[
        (1usize, 4usize, 1usize, &[3usize][..], 3usize),
        (1, 12, 3, &[45], 1),
        (2, 20, 4, &[30, 37], 13),
        (3, 64, 9, &[129], 129),
        (3, 64, 9, &[100, 31], 31),
        (2, 128, 2, &[70, 1], 1),
        (3, 64, 9, &[1500], 1),
        (3, 64, 9, &[700, 5], 5),
        (1, 32, 4, &[65], 40),
    ] {
        let shape = KvShape {
            n_layers: 1,
            n_kv_heads: nh,
            head_dim: d,
        };
        let len: usize = chunks.iter().sum();
        let row = nh * d;
        let k = r.vec(len * row, 2.0);
        let v = r.vec(len * row, 1.0);
        let q = r.vec(n_q * n_heads * d, 1.0);
        let mut c = F32Cache::new(shape);
        let mut t = 0;
        for &n in chunks {
            c.append(0, &k[t * row..(t + n) * row], &v[t * row..(t + n) * row], n)
                .unwrap();
            t += n;
        }
        let scale = 1.0 / (d as f32).sqrt();
        let mut o = vec![0f32; q.len()];
        c.attend(0, &q, n_q, n_heads, scale, &mut o).unwrap();
        let want = ref_attend(len, n_q, n_heads, nh, d, &q, scale, |_, t| {
            (&k[t * row..][..row], &v[t * row..][..row])
        });
        let err = rel_err(&o, &want);
        assert!(err < 2e-6, "nh {nh} d {d} len {len} n_q {n_q}: {err}");
    }
}

/// Tokens in the quantized body when the cache holds `n` tokens, by replaying the flush rule
/// of docs/kv-cache.md one token at a time (independent of the cache's closed form).
fn body_end_after(p: &Policy, n: usize) -> usize {
    let f = p.flush_tokens();
    let (mut nres, mut nq) = (0usize, 0usize);
    for t in 0..n {
        if t >= p.sink {
            nres += 1;
            if nres >= p.residual + f {
                nq += f;
                nres -= f;
            }
        }
    }
    p.sink.min(n) + nq
}

/// Every policy's attention equals an f64 attention in which the query at position `p` reads
/// tokens in the body *as decode saw it* (`sink..body_end_after(p + 1)`) round-tripped
/// through the codecs and every other token in f32, for one-shot prefill, ragged chunks and
/// single-token decode.
#[test]
fn attention_matches_decode_view_reference() {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    for (si, &(nh, d, n_heads)) in [(1usize, 8usize, 2usize), (3, 16, 9), (2, 12, 4)]
        .iter()
        .enumerate()
    {
        let shape = KvShape {
            n_layers: 2,
            n_kv_heads: nh,
            head_dim: d,
        };
        for pol in POLICIES {
            let p = match Policy::parse(pol, shape, None) {
                Ok(p) => p,
                Err(_) => continue, // e.g. a group that does not divide this head_dim
            };
            for (len, chunks, n_q) in [
                (70usize, vec![70usize], 70usize),
                (75, vec![40, 1, 1, 33], 33),
                (75, vec![40, 1, 1, 33], 1),
                (37, vec![30, 7], 7),
                (200, vec![150, 50], 50),
            ] {
                let k = r.vec(len * nh * d, 2.0);
                let v = r.vec(len * nh * d, 1.0);
                let q = r.vec(n_q * n_heads * d, 1.0);
                let mut qc = QuantCache::new(shape, p.clone());
                qc.set_rope(&test_freqs(d)).unwrap();
                let row = nh * d;
                let mut t = 0;
                for &c in &chunks {
                    for layer in 0..2 {
                        let s = t * row..(t + c) * row;
                        qc.append(layer, &k[s.clone()], &v[s], c).unwrap();
                    }
                    t += c;
                }
                let scale = 1.0 / (d as f32).sqrt();
                for layer in 0..2 {
                    // `hi=` layers round-trip through their own (4-bit) codecs.
                    let (k2, v2) = roundtrip(&p.for_layer(layer), shape, &k, &v, len);
                    let mut oa = vec![0f32; q.len()];
                    qc.attend(layer, &q, n_q, n_heads, scale, &mut oa).unwrap();
                    let want = ref_attend(len, n_q, n_heads, nh, d, &q, scale, |pos, t| {
                        let quantized = t >= p.sink && t < body_end_after(&p, pos + 1);
                        let (kk, vv) = if quantized { (&k2, &v2) } else { (&k, &v) };
                        (&kk[t * row..][..row], &vv[t * row..][..row])
                    });
                    let err = rel_err(&oa, &want);
                    // `rot=v` rotates every value and the output in f32 (two more roundings
                    // than the reference, which rotates only the body values).
                    let tol = if p.rotate_v { 1e-5 } else { 3e-6 };
                    assert!(
                        err < tol,
                        "shape {si} {pol} layer {layer} len {len} chunks {chunks:?} n_q {n_q}: {err}"
                    );
                    assert_eq!(qc.len(layer), len);
                }
            }
        }
    }
}

/// A multi-token prefill computes what token-by-token decode computes, for every policy:
/// prefill attention outputs equal the outputs of appending one token and attending its
/// query at a time (same inputs), up to f32 summation order.
#[test]
fn prefill_equals_token_by_token_decode() {
    let mut r = Rng(0xdec0_de00_1111_2222);
    let (nh, d, n_heads) = (3usize, 16usize, 9usize);
    let shape = KvShape {
        n_layers: 1,
        n_kv_heads: nh,
        head_dim: d,
    };
    let row = nh * d;
    let len = 300;
    let k = r.vec(len * row, 2.0);
    let v = r.vec(len * row, 1.0);
    let q = r.vec(len * n_heads * d, 1.0);
    let qd = n_heads * d;
    let scale = 0.25;
    for pol in POLICIES.iter().chain(&[
        "kivi2",
        "kivi4,sink=4",
        "f32",
        "fp8,sink=4",
        "kivi2c,rope=pre,sink=4",
    ]) {
        // Token by token.
        let mut dec = build_r(pol, shape);
        let mut want = vec![0f32; len * qd];
        for t in 0..len {
            dec.append(0, &k[t * row..][..row], &v[t * row..][..row], 1)
                .unwrap();
            dec.attend(
                0,
                &q[t * qd..][..qd],
                1,
                n_heads,
                scale,
                &mut want[t * qd..][..qd],
            )
            .unwrap();
        }
        // Prefill in two chunks (the second one starts mid KIVI group and mid window).
        let mut pre = build_r(pol, shape);
        let mut got = vec![0f32; len * qd];
        for (a, b) in [(0usize, 173usize), (173, len)] {
            pre.append(0, &k[a * row..b * row], &v[a * row..b * row], b - a)
                .unwrap();
            pre.attend(
                0,
                &q[a * qd..b * qd],
                b - a,
                n_heads,
                scale,
                &mut got[a * qd..b * qd],
            )
            .unwrap();
        }
        let err = rel_err(&got, &want);
        assert!(err < 2e-6, "{pol}: prefill vs decode {err}");
        assert_eq!(
            pre.bytes(),
            dec.bytes(),
            "{pol}: prefill scratch is not counted"
        );
    }
}

/// Against the *unquantized* f32 attention, with a tolerance derived from each codec's step:
/// a value error `ev` moves the output by at most `ev` (a convex combination), a key error
/// `ek` moves every score by at most `scale * |q|_1 * ek`, which moves the softmax weights by
/// at most `exp(2 * ds) - 1` in L1 and the output by that times `max |v|`.
#[test]
fn attention_within_step_derived_tolerance_of_f32() {
    let mut r = Rng(0x0123_4567_89ab_cdef);
    let (nh, d, n_heads) = (3usize, 64usize, 9usize);
    let shape = KvShape {
        n_layers: 1,
        n_kv_heads: nh,
        head_dim: d,
    };
    let ka = 1.0f32;
    let va = 1.0f32;
    let qa = 0.25f32;
    // Per-element error bounds (amplitude a): fp8 E4M3 relative 2^-4, E5M2 2^-3; INT half a
    // step over the range 2a plus f16 rounding of scale and minimum (3 a 2^-11).
    let f16r = 3.0 * 2f32.powi(-11);
    let cases: &[(&str, f32, f32)] = &[
        ("f16", ka * 2f32.powi(-11), va * 2f32.powi(-11)),
        ("fp8", ka / 16.0, va / 16.0),
        ("fp8e5m2", ka / 8.0, va / 8.0),
        // Static scales 2^-2 / 2^-4: amplitude 1 is far from saturation; subnormal steps.
        (
            "fp8s",
            ka / 16.0 + 2f32.powi(-12),
            va / 16.0 + 2f32.powi(-14),
        ),
        ("int8", ka * (1.0 / 255.0 + f16r), va * (1.0 / 255.0 + f16r)),
        ("int4", ka * (1.0 / 15.0 + f16r), va * (1.0 / 15.0 + f16r)),
    ];
    let len = 300;
    let k = r.vec(len * nh * d, ka);
    let v = r.vec(len * nh * d, va);
    for n_q in [1usize, 5] {
        let q = r.vec(n_q * n_heads * d, qa);
        let q1 = q
            .chunks(d)
            .map(|x| x.iter().map(|y| y.abs()).sum::<f32>())
            .fold(0.0, f32::max);
        for &(pol, ek, ev) in cases {
            let mut a = build(pol, shape).unwrap();
            let mut b = F32Cache::new(shape);
            let (oa, ob) = run_pair(
                a.as_mut(),
                &mut b,
                &(k.clone(), v.clone()),
                &[len],
                &q,
                n_q,
                n_heads,
            );
            let ds = q1 * ek / (d as f32).sqrt();
            let tol = ev + ((2.0 * ds).exp() - 1.0) * va;
            let err = max_abs_diff(&oa, &ob);
            assert!(
                tol < 0.5 * va,
                "{pol}: tolerance {tol} too loose to mean anything"
            );
            assert!(err <= tol, "{pol} n_q {n_q}: max diff {err} > tol {tol}");
            assert!(
                err > 0.0,
                "{pol}: a lossy codec gave exactly the f32 result"
            );
        }
    }
}

/// Lossless cases are bit-exact: all tokens still in the KIVI residual window, or in the sink,
/// give exactly what the f32-through-the-same-kernel policy gives; and that kernel agrees with
/// the reference [`F32Cache`] up to summation order.
#[test]
fn lossless_windows_are_exact() {
    let mut r = Rng(42);
    let (nh, d, n_heads) = (3usize, 64usize, 9usize);
    let shape = KvShape {
        n_layers: 1,
        n_kv_heads: nh,
        head_dim: d,
    };
    let len = 128;
    let k = r.vec(len * nh * d, 1.0);
    let v = r.vec(len * nh * d, 1.0);
    let q = r.vec(n_heads * d, 1.0);
    let run = |pol: &str| {
        let mut c = build_r(pol, shape);
        c.append(0, &k, &v, len).unwrap();
        let mut o = vec![0f32; q.len()];
        c.attend(0, &q, 1, n_heads, 0.125, &mut o).unwrap();
        (o, c.bytes())
    };
    let (exact, bytes) = run("k=f32,v=f32");
    assert_eq!(bytes, len * nh * d * 8);
    for pol in [
        "kivi2",
        "kivi4",
        "fp8,sink=128",
        "int4,sink=128",
        "k=fp8,v=int2,r=128",
        "kivi2c",
        "kivi2,rope=pre",
        "kivi2c,rope=pre",
    ] {
        let (o, b) = run(pol);
        assert_eq!(
            o, exact,
            "{pol} must be lossless while every token is full precision"
        );
        assert_eq!(
            b, bytes,
            "{pol}: full-precision tokens cost 8 bytes per value pair"
        );
    }
    let (reference, _) = {
        let mut c = F32Cache::new(shape);
        c.append(0, &k, &v, len).unwrap();
        let mut o = vec![0f32; q.len()];
        c.attend(0, &q, 1, n_heads, 0.125, &mut o).unwrap();
        (o, ())
    };
    assert!(max_abs_diff(&exact, &reference) < 1e-6);
    // One more token pushes the oldest KIVI group out of the window: no longer exact.
    let mut c = build("kivi2", shape).unwrap();
    c.append(0, &k, &v, len).unwrap();
    let (k1, v1) = (r.vec(nh * d, 1.0), r.vec(nh * d, 1.0));
    for _ in 0..32 {
        c.append(0, &k1, &v1, 1).unwrap();
    }
    assert!(c.bytes() < (len + 32) * nh * d * 8);
}

/// The AVX2 build of the attention kernel agrees with the portable one on ragged shapes.
#[test]
fn simd_path_matches_portable_path() {
    let mut r = Rng(7);
    for &(nh, d, n_heads, len, n_q) in &[
        (1usize, 12usize, 3usize, 45usize, 1usize),
        (2, 20, 4, 67, 13),
        (3, 64, 9, 129, 40),
        (1, 4, 1, 3, 3),
    ] {
        let shape = KvShape {
            n_layers: 1,
            n_kv_heads: nh,
            head_dim: d,
        };
        for pol in [
            "fp8",
            "int8",
            "f16",
            "bf16",
            "kivi2,r=8,g=4,sink=2",
            "k=fp8e5m2,v=int2g4",
            "kivi2c,rope=pre,r=8,g=4,sink=2",
            "kivi2,rope=pre,rot=h,r=8,g=4,sink=2",
        ] {
            let Ok(p) = Policy::parse(pol, shape, None) else {
                continue;
            };
            let mut a = QuantCache::new(shape, p.clone());
            a.set_rope(&test_freqs(d)).unwrap();
            let k = r.vec(len * nh * d, 1.0);
            let v = r.vec(len * nh * d, 1.0);
            a.append(0, &k, &v, len).unwrap();
            let mut b = a.clone();
            b.set_force_scalar(true);
            let q = r.vec(n_q * n_heads * d, 1.0);
            let mut oa = vec![0f32; q.len()];
            let mut ob = vec![0f32; q.len()];
            a.attend(0, &q, n_q, n_heads, 0.3, &mut oa).unwrap();
            b.attend(0, &q, n_q, n_heads, 0.3, &mut ob).unwrap();
            let err = max_abs_diff(&oa, &ob);
            assert!(err < 1e-5, "{pol} d={d}: simd vs portable {err}");
        }
    }
}

/// `bytes()` counts exactly what the regions hold, metadata included.
#[test]
fn byte_accounting_is_exact() {
    let (nh, d) = (3usize, 64usize);
    let shape = KvShape {
        n_layers: 2,
        n_kv_heads: nh,
        head_dim: d,
    };
    let len = 1000;
    let k = vec![0.5f32; len * nh * d];
    for (pol, sink, body_k, body_v, res, refs) in [
        // (policy, sink tokens, K body bytes, V body bytes, residual tokens)
        // (policy, sink tokens, K body bytes, V body bytes, residual tokens, reference bytes
        // per layer)
        (
            "fp8",
            0usize,
            1000 * nh * 65,
            1000 * nh * 65,
            0usize,
            0usize,
        ),
        ("int4", 0, 1000 * nh * (32 + 8), 1000 * nh * (32 + 8), 0, 0),
        ("fp8,sink=4", 4, 996 * nh * 65, 996 * nh * 65, 0, 0),
        ("fp8s", 0, 1000 * nh * 64, 1000 * nh * 64, 0, 0),
        // KIVI-2: 1000 - 128 = 872 -> 27 groups of 32 (864 tokens), 136 in the window.
        (
            "kivi2",
            0,
            27 * nh * 64 * (4 + 8),
            864 * nh * (16 + 4),
            136,
            0,
        ),
        (
            "kivi2,sink=4",
            4,
            27 * nh * 64 * (4 + 8),
            864 * nh * (16 + 4),
            132,
            0,
        ),
        // Compact KIVI-2: K 1 metadata byte + 8 code bytes per (group, channel), V 2 + 16
        // bytes per (token, head); per layer and head 2 x 64 f32 channel references.
        (
            "kivi2c,rope=pre,sink=4",
            4,
            27 * nh * 64 * (1 + 8),
            864 * nh * (16 + 2),
            132,
            nh * 2 * d * 4,
        ),
        ("kivi2c", 0, 27 * nh * 64 * 9, 864 * nh * 18, 136, nh * 512),
        // Fine KIVI-2: K 80 metadata bytes (64 x 10 bits) + 512 code bytes per (group, head), V
        // 16 code bytes + 2 step bytes per (token, head); the same references as kivi2c.
        (
            "kivi2f,rope=pre,sink=4",
            4,
            27 * nh * (80 + 512),
            864 * nh * (16 + 2),
            132,
            nh * 2 * d * 4,
        ),
    ] {
        let mut c = build_r(pol, shape);
        for l in 0..2 {
            for chunk in k.chunks(nh * d * 100) {
                c.append(l, chunk, chunk, 100).unwrap();
            }
        }
        let want = 2 * ((sink + res) * nh * d * 8 + body_k + body_v + refs);
        assert_eq!(c.bytes(), want, "{pol}");
        assert_eq!(c.len(1), len);
        c.clear();
        assert_eq!((c.bytes(), c.len(0)), (0, 0));
        assert!(c.is_empty());
    }
    // `hi=0`: layer 0 stores kivi4 records (K 4 + 16 bytes per (group, channel), V int4 over
    // 64 = 32 + 4 bytes per (token, head)), layer 1 kivi2; both hold 136 f32 tokens.
    let mut c = build_r("kivi2,hi=0", shape);
    for l in 0..2 {
        for chunk in k.chunks(nh * d * 100) {
            c.append(l, chunk, chunk, 100).unwrap();
        }
    }
    let win = 136 * nh * d * 8;
    let l0 = win + 27 * nh * 64 * (4 + 16) + 864 * nh * (32 + 4);
    let l1 = win + 27 * nh * 64 * (4 + 8) + 864 * nh * (16 + 4);
    assert_eq!(c.bytes(), l0 + l1);
}

/// `rot=h` rotates keys and queries by the same orthogonal transform: lossless K/V through the
/// rotation give the unrotated attention (up to rounding), and `rot=h` on a lossy codec
/// changes what is stored (so the option is not a no-op).
#[test]
fn hadamard_rotation_keeps_attention() {
    let mut r = Rng(99);
    let (nh, d, n_heads) = (3usize, 64usize, 9usize);
    let shape = KvShape {
        n_layers: 1,
        n_kv_heads: nh,
        head_dim: d,
    };
    let len = 90;
    let k = r.vec(len * nh * d, 2.0);
    let v = r.vec(len * nh * d, 1.0);
    let q = r.vec(5 * n_heads * d, 1.0);
    let run = |pol: &str| {
        let mut c = build(pol, shape).unwrap();
        c.append(0, &k, &v, len).unwrap();
        let mut o = vec![0f32; q.len()];
        c.attend(0, &q, 5, n_heads, 0.125, &mut o).unwrap();
        o
    };
    let plain = run("k=f32,v=f32");
    let rot = run("k=f32,v=f32,rot=h");
    assert!(max_abs_diff(&plain, &rot) < 1e-5);
    assert_ne!(run("fp8"), run("fp8,rot=h"));
    assert!(build("fp8,rot=x", shape).is_err());
    let odd = KvShape {
        n_layers: 1,
        n_kv_heads: 1,
        head_dim: 12,
    };
    let e = build("fp8,rot=h", odd).err().unwrap().to_string();
    assert!(e.contains("power-of-two"), "{e}");
}

#[test]
fn bad_arguments_are_errors() {
    let shape = KvShape {
        n_layers: 1,
        n_kv_heads: 2,
        head_dim: 8,
    };
    let mut c = build("fp8", shape).unwrap();
    assert!(c.append(1, &[0.0; 16], &[0.0; 16], 1).is_err());
    assert!(c.append(0, &[0.0; 15], &[0.0; 16], 1).is_err());
    c.append(0, &[0.0; 16], &[0.0; 16], 1).unwrap();
    assert!(c.attend(0, &[0.0; 24], 1, 3, 1.0, &mut [0.0; 24]).is_err());
    assert!(c.attend(0, &[0.0; 32], 2, 2, 1.0, &mut [0.0; 32]).is_err());
    assert!(c.attend(3, &[0.0; 16], 1, 2, 1.0, &mut [0.0; 16]).is_err());
    assert!(build("int4g3", shape).is_err());
    assert_eq!(
        build("kivi2,sink=4", shape).unwrap().policy_name(),
        "kivi2,sink=4"
    );
}

/// `rope=pre` stores keys before RoPE and rotates them back when read: keys that are constant
/// per channel before RoPE (plus small noise) and rotated at their positions are reproduced
/// almost exactly by 2-bit KIVI with `rope=pre` (each channel is nearly constant within a
/// group), while post-RoPE KIVI sees channels swinging with the position and loses far more.
/// A policy without the frequencies refuses to append.
#[test]
fn pre_rope_keys_undo_and_redo_the_rotation() {
    let mut r = Rng(0xabcd);
    let (nh, d, n_heads) = (2usize, 16usize, 4usize);
    let shape = KvShape {
        n_layers: 1,
        n_kv_heads: nh,
        head_dim: d,
    };
    let freqs = test_freqs(d);
    let len = 200;
    let base = r.vec(nh * d, 2.0);
    let mut k = vec![0f32; len * nh * d];
    for t in 0..len {
        for h in 0..nh {
            let x = &mut k[(t * nh + h) * d..][..d];
            for (c, v) in x.iter_mut().enumerate() {
                *v = base[h * d + c] + 0.01 * r.f();
            }
            rope_f64(x, &freqs, t, 1.0);
        }
    }
    let v = r.vec(len * nh * d, 1.0);
    let q = r.vec(n_heads * d, 1.0);
    let err = |pol: &str| {
        let mut a = build_r(&format!("{pol},r=0,g=8"), shape);
        let mut b = F32Cache::new(shape);
        let (oa, ob) = run_pair(
            a.as_mut(),
            &mut b,
            &(k.clone(), v.clone()),
            &[len],
            &q,
            1,
            n_heads,
        );
        max_abs_diff(&oa, &ob)
    };
    // Values in f32 so that only the keys differ. Bound for the pre-RoPE case: the channel
    // noise 0.02 wide is one grid step at most ~0.007 -> key error < 0.004 (+ f16 rounding
    // 2^-11 of |key| <= 2), score error < |q|_1 * 0.006 / 4 < 0.02, output error < 0.04.
    let pre = err("k=kivi2,v=f32,rope=pre");
    let post = err("k=kivi2,v=f32");
    let pre_c = err("k=kivi2c,v=f32,rope=pre");
    let pre_f = err("k=kivi2f,v=f32,rope=pre");
    assert!(pre_f < 0.04, "pre-RoPE fine 2-bit keys: {pre_f}");
    assert!(pre < 0.04, "pre-RoPE 2-bit keys: {pre}");
    assert!(pre_c < 0.04, "pre-RoPE compact 2-bit keys: {pre_c}");
    // Hadamard-rotated pre-RoPE keys: still (nearly) constant channels, noise spread evenly.
    let pre_h = err("k=kivi2,v=f32,rope=pre,rot=h");
    assert!(pre_h < 0.04, "pre-RoPE Hadamard 2-bit keys: {pre_h}");
    assert!(post > 4.0 * pre, "post-RoPE {post} vs pre-RoPE {pre}");
    let mut c = build("kivi2,rope=pre", shape).unwrap();
    let e = c.append(0, &k[..nh * d], &v[..nh * d], 1).unwrap_err();
    assert!(e.to_string().contains("set_rope"), "{e}");
    assert!(c.set_rope(&freqs[1..]).is_err());
    for bad in ["fp8,rope=pre", "kivi2,rope=x"] {
        assert!(build(bad, shape).is_err(), "{bad}");
    }
}
