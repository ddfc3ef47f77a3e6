//! Policy strings: presets (`f32`, `f16`, `bf16`, `fp8`, `fp8e5m2`, `int8`, `int4`, `kivi2`,
//! `kivi4`) or comma-separated items `k=CODEC`, `v=CODEC`, `sink=S`, `g=G` (KIVI key group),
//! `r=R` (residual window). A bare codec name sets both K and V.
//!
//! Codecs: `f32`, `f16`, `bf16`, `fp8` (= `fp8e4m3`), `fp8e5m2`, `int8`, `int4`, `int2`
//! (one group = `head_dim`), `intBgG` (e.g. `int4g32`), `kivi2` / `kivi4` (on K: per-channel
//! over G tokens; on V: per-token INT over `head_dim`). `int4` alone means `int4g32`.

use crate::codec::{Fp8Kind, TokenCodec};
use crate::kivi::{FineSpec, KeyMeta};
use crate::{Error, KvShape, Result};

/// Scale exponent of `fp8s` keys: SmolLM2-135M's per-token key absmax is 1.75-28 (E8M0
/// exponents -8..-4 of the dynamic codec over a 512-token window, every layer), so `2^-2`
/// (saturation at 112) leaves 4x headroom.
pub const FP8S_K_EXP: i8 = -2;
/// Scale exponent of `fp8s` values: value absmax 0.05-14 (exponents -13..-5), so `2^-4`
/// (saturation at 28) leaves 2x headroom, and values down to `2^-10` stay normal.
pub const FP8S_V_EXP: i8 = -4;

/// How one side (K or V) is stored once it leaves the full-precision regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// One record per (token, head).
    Token(TokenCodec),
    /// KIVI keys: per channel over groups of `g` tokens.
    KiviChannel {
        /// 2 or 4.
        bits: u8,
        /// Per-(group, channel) metadata: f16 scale and min (`kivi2`), one byte (`kivi2c`) or
        /// `e + z` bits (`kivi2f`) against per-channel references calibrated on the layer's
        /// first body group.
        meta: KeyMeta,
    },
}

/// A parsed KV-cache policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The string as given (trimmed), used as the policy name.
    pub name: String,
    /// Key storage.
    pub k: Side,
    /// Value storage.
    pub v: Side,
    /// First tokens kept in f32 (attention sinks).
    pub sink: usize,
    /// Most recent tokens kept in f32 (KIVI residual window).
    pub residual: usize,
    /// Tokens per KIVI key group (also the flush granularity when K is KIVI).
    pub group: usize,
    /// Rotate keys (and queries) per head by the normalized Walsh-Hadamard transform before
    /// storing (`rot=h`): `q·k` is unchanged, outlier channels are spread over all channels.
    /// With `rope=pre` only the quantized body keys are rotated (after RoPE is undone) and
    /// the kernel rotates each decoded group back before re-applying RoPE; queries are not
    /// rotated.
    pub rotate: bool,
    /// Quantize KIVI keys before RoPE (`rope=pre`): the body stores pre-RoPE keys (RoPE undone
    /// with the model's frequencies, see [`crate::KvCache::set_rope`]) and the attention kernel
    /// re-applies RoPE to each decoded group.
    pub pre_rope: bool,
    /// Rotate values per head by the normalized Walsh-Hadamard transform before storing
    /// (`rot=hv`: keys and values, `rot=v`: values only); the attention output, a convex
    /// combination of rotated values, is rotated back (the transform is its own inverse).
    /// Spreads value outlier channels before per-token quantization.
    pub rotate_v: bool,
    /// Key INT grids (KIVI keys with f16 metadata, INT keys) chosen for the least squared
    /// error instead of min/max (`fit=mse` or `kfit=mse`; `minmax` is the default). Same
    /// records.
    pub kfit_mse: bool,
    /// Value INT grids (INT/KIVI values) chosen for the least squared error (`fit=mse` or
    /// `vfit=mse`). Same records.
    pub vfit_mse: bool,
    /// Compact KIVI keys (`kivi2c`, `kivi4c`): restrict the per-channel metadata search to
    /// grids that cover the group's `[min, max]` (`kfit=cover`; no clipping of the extremes).
    /// Plain KIVI keys cover by construction (min/max); no effect on other codecs.
    pub kcover: bool,
    /// Layers whose codes are 4-bit instead of 2-bit (`hi=0+1`, `hi=0-3`): in these layers
    /// `kivi2` keys become `kivi4`, `kivi2c` keys `kivi4c`, `int2` values `int4` (same groups
    /// and metadata). Sorted, deduplicated, each below `n_layers`. See [`Policy::for_layer`].
    pub hi_layers: Vec<usize>,
}

fn bad(policy: &str, reason: impl Into<String>) -> Error {
    Error::Policy {
        policy: policy.to_string(),
        reason: reason.into(),
    }
}

/// What a codec token means for K and for V, and whether it is KIVI.
fn parse_codec(policy: &str, s: &str, d: usize) -> Result<(Side, Side, bool)> {
    let tok = |c| Ok((Side::Token(c), Side::Token(c), false));
    match s {
        "f32" => tok(TokenCodec::F32),
        "f16" => tok(TokenCodec::F16),
        "bf16" => tok(TokenCodec::Bf16),
        "fp8" | "fp8e4m3" | "e4m3" => tok(TokenCodec::Fp8(Fp8Kind::E4M3)),
        "fp8e5m2" | "e5m2" => tok(TokenCodec::Fp8(Fp8Kind::E5M2)),
        // Static scale: K 2^-2 (saturates at 112), V 2^-4 (at 28); see docs/kv-cache.md.
        "fp8s" => Ok((
            Side::Token(TokenCodec::Fp8Static {
                kind: Fp8Kind::E4M3,
                exp: FP8S_K_EXP,
            }),
            Side::Token(TokenCodec::Fp8Static {
                kind: Fp8Kind::E4M3,
                exp: FP8S_V_EXP,
            }),
            false,
        )),
        _ if s.starts_with("fp8s") => {
            let e: i8 = s[4..]
                .parse()
                .ok()
                .filter(|e: &i8| (-20..=20).contains(e))
                .ok_or_else(|| {
                    bad(
                        policy,
                        format!("`{s}`: expected fp8s or fp8sE with a scale exponent E in -20..=20, e.g. fp8s-3"),
                    )
                })?;
            tok(TokenCodec::Fp8Static {
                kind: Fp8Kind::E4M3,
                exp: e,
            })
        }
        "kivi2" | "kivi4" => {
            let bits = if s == "kivi2" { 2 } else { 4 };
            Ok((
                Side::KiviChannel {
                    bits,
                    meta: KeyMeta::F16,
                },
                Side::Token(TokenCodec::Int { bits, group: d }),
                true,
            ))
        }
        "kivi2c" | "kivi4c" => {
            let bits = if s == "kivi2c" { 2 } else { 4 };
            Ok((
                Side::KiviChannel {
                    bits,
                    meta: KeyMeta::Byte,
                },
                Side::Token(TokenCodec::IntC { bits }),
                true,
            ))
        }
        // Keys with fine metadata; values symmetric per 32 with one step byte (the pair
        // measured best at 7x, docs/kv-cache.md).
        "kivi2f" | "kivi4f" => {
            let bits = if s == "kivi2f" { 2 } else { 4 };
            Ok((
                Side::KiviChannel {
                    bits,
                    meta: KeyMeta::Fine(FineSpec::default()),
                },
                Side::Token(TokenCodec::IntS {
                    bits,
                    group: 32.min(d),
                }),
                true,
            ))
        }
        _ if s.starts_with("int") && s[3..].contains('s') => {
            let (b, g) = s[3..].split_once('s').unwrap_or(("", ""));
            let bits: u8 = b.parse().ok().filter(|b| [2u8, 4].contains(b)).ok_or_else(|| {
                bad(policy, format!("`{s}`: expected intBs or intBsgG with B 2 or 4, e.g. int2sg32"))
            })?;
            let group = match g.strip_prefix('g') {
                Some(g) => g
                    .parse::<usize>()
                    .map_err(|_| bad(policy, format!("`{s}`: group `{g}` is not a number")))?,
                None if g.is_empty() => d,
                None => return Err(bad(policy, format!("`{s}`: expected intBs or intBsgG"))),
            };
            if group == 0 || d % group != 0 || group * bits as usize % 8 != 0 {
                return Err(bad(
                    policy,
                    format!("`{s}`: group {group} must divide head_dim {d} in whole bytes"),
                ));
            }
            tok(TokenCodec::IntS { bits, group })
        }
        _ if s.starts_with("int") => {
            let rest = &s[3..];
            let (b, g) = match rest.split_once('g') {
                Some((b, g)) => (b, Some(g)),
                None => (rest, None),
            };
            let bits: u8 = b.parse().map_err(|_| {
                bad(
                    policy,
                    format!("`{s}`: expected intB or intBgG, e.g. int4g32"),
                )
            })?;
            if ![2u8, 4, 8].contains(&bits) {
                return Err(bad(
                    policy,
                    format!("`{s}`: integer codecs have 2, 4 or 8 bits"),
                ));
            }
            let group = match g {
                Some(g) => g
                    .parse::<usize>()
                    .map_err(|_| bad(policy, format!("`{s}`: group `{g}` is not a number")))?,
                None if bits == 4 => 32.min(d),
                None => d,
            };
            if group == 0 || d % group != 0 {
                return Err(bad(
                    policy,
                    format!("`{s}`: group {group} does not divide head_dim {d}"),
                ));
            }
            if group * bits as usize % 8 != 0 {
                return Err(bad(
                    policy,
                    format!("`{s}`: group {group} is not a whole number of bytes"),
                ));
            }
            tok(TokenCodec::Int { bits, group })
        }
        _ => Err(bad(
            policy,
            format!(
                "unknown codec `{s}`; known: f32, f16, bf16, fp8, fp8e5m2, fp8s, fp8sE, int8, int4, int2, \
                 intBgG (e.g. int4g32), kivi2, kivi4, kivi2c, kivi4c, kivi2f, kivi4f"
            ),
        )),
    }
}

/// `hi=` layer lists: indices and inclusive ranges joined by `+` (`0`, `0+29`, `0-3+29`).
fn parse_layers(policy: &str, s: &str, n_layers: usize) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.split('+') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (parse_num(policy, "hi", a)?, parse_num(policy, "hi", b)?),
            None => {
                let a = parse_num(policy, "hi", part)?;
                (a, a)
            }
        };
        if a > b || b >= n_layers {
            return Err(bad(
                policy,
                format!("`hi={s}`: layers {a}..={b} are not within 0..{n_layers}"),
            ));
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn parse_num(policy: &str, key: &str, v: &str) -> Result<usize> {
    v.parse().map_err(|_| {
        bad(
            policy,
            format!("`{key}={v}`: `{v}` is not a non-negative integer"),
        )
    })
}

impl Policy {
    /// Parse `policy` for a cache of `shape`; `max_ctx` (when known) bounds the full-precision
    /// windows.
    pub fn parse(policy: &str, shape: KvShape, max_ctx: Option<usize>) -> Result<Policy> {
        let p = policy.trim().to_ascii_lowercase();
        if p.is_empty() {
            return Err(bad(policy, "empty policy string"));
        }
        let d = shape.head_dim;
        if d == 0 || shape.n_kv_heads == 0 || shape.n_layers == 0 {
            return Err(bad(policy, format!("degenerate cache shape {shape:?}")));
        }
        let (mut k, mut v) = (None, None);
        let (mut sink, mut residual, mut group) = (0usize, None, None);
        let mut kivi = false;
        let mut rotate = false;
        let mut pre_rope = false;
        let mut rotate_v = false;
        let (mut kfit_mse, mut vfit_mse, mut kcover) = (false, false, false);
        let mut hi_layers = Vec::new();
        let mut kmeta = None;
        for item in p.split(',').map(str::trim) {
            if item.is_empty() {
                return Err(bad(policy, "empty item (two commas in a row?)"));
            }
            match item.split_once('=') {
                None => {
                    let (a, b, kv) = parse_codec(policy, item, d)?;
                    if k.is_some() || v.is_some() {
                        return Err(bad(policy, format!("`{item}`: K/V codec given twice")));
                    }
                    (k, v) = (Some(a), Some(b));
                    kivi |= kv;
                }
                Some((key, val)) => match key.trim() {
                    "k" | "v" => {
                        let (a, b, kv) = parse_codec(policy, val.trim(), d)?;
                        let slot = if key.trim() == "k" { &mut k } else { &mut v };
                        if slot.is_some() {
                            return Err(bad(policy, format!("`{key}` given twice")));
                        }
                        *slot = Some(if key.trim() == "k" { a } else { b });
                        kivi |= kv;
                    }
                    "sink" | "s" => sink = parse_num(policy, key, val.trim())?,
                    "rot" => {
                        let o = val.trim();
                        (rotate, rotate_v) = match o {
                            "h" | "hadamard" | "hk" => (true, false),
                            "hv" => (true, true),
                            "v" => (false, true),
                            "none" | "0" => (false, false),
                            _ => {
                                return Err(bad(
                                    policy,
                                    format!(
                                        "`rot={o}`: known rotations are h (Hadamard on keys), \
                                         hv (keys and values), v (values only) and none"
                                    ),
                                ))
                            }
                        };
                        if (rotate || rotate_v) && !d.is_power_of_two() {
                            return Err(bad(
                                policy,
                                format!("`rot={o}` needs a power-of-two head_dim, not {d}"),
                            ));
                        }
                    }
                    "kfit" if val.trim() == "cover" => {
                        (kfit_mse, kcover) = (false, true);
                    }
                    "fit" | "kfit" | "vfit" => match val.trim() {
                        "mse" | "minmax" => {
                            if key.trim() != "vfit" {
                                kcover = false;
                            }
                            let on = val.trim() == "mse";
                            if key.trim() != "vfit" {
                                kfit_mse = on;
                            }
                            if key.trim() != "kfit" {
                                vfit_mse = on;
                            }
                        }
                        o => {
                            return Err(bad(
                                policy,
                                format!(
                                    "`{}={o}`: expected mse (least-squares INT grids) or \
                                     minmax (kfit also: cover)",
                                    key.trim()
                                ),
                            ))
                        }
                    },
                    "rope" => match val.trim() {
                        "pre" => pre_rope = true,
                        "post" => pre_rope = false,
                        o => {
                            return Err(bad(
                                policy,
                                format!(
                                    "`rope={o}`: expected pre (quantize keys before RoPE) or post"
                                ),
                            ))
                        }
                    },
                    "hi" => hi_layers = parse_layers(policy, val.trim(), shape.n_layers)?,
                    "kmeta" => {
                        let o = val.trim();
                        let spec = o
                            .split_once('.')
                            .and_then(|(e, z)| Some((e.parse().ok()?, z.parse().ok()?)))
                            .filter(|&(e, z): &(u8, u8)| (4..=8).contains(&e) && (4..=8).contains(&z))
                            .ok_or_else(|| {
                                bad(
                                    policy,
                                    format!(
                                        "`kmeta={o}`: expected E.Z, the step and origin bits of \
                                         kivi2f keys, each 4..=8 (e.g. kmeta=5.5)"
                                    ),
                                )
                            })?;
                        kmeta = Some(FineSpec {
                            e: spec.0,
                            z: spec.1,
                        });
                    }
                    "r" | "residual" => residual = Some(parse_num(policy, key, val.trim())?),
                    "g" | "group" => {
                        let g = parse_num(policy, key, val.trim())?;
                        if g == 0 {
                            return Err(bad(policy, "KIVI group g must be at least 1"));
                        }
                        group = Some(g);
                    }
                    other => {
                        return Err(bad(
                            policy,
                            format!(
                                "unknown key `{other}`; known: k, v, sink, r, g, rot, rope, fit, kfit, \
                                 vfit, hi, kmeta"
                            ),
                        ))
                    }
                },
            }
        }
        let (k, v) = match (k, v) {
            (Some(k), Some(v)) => (k, v),
            _ => {
                return Err(bad(
                    policy,
                    "both K and V codecs are needed (e.g. `k=fp8,v=int4g32`)",
                ))
            }
        };
        let mut k = k;
        if let Some(spec) = kmeta {
            match &mut k {
                Side::KiviChannel {
                    meta: KeyMeta::Fine(s),
                    ..
                } => *s = spec,
                _ => {
                    return Err(bad(
                        policy,
                        "`kmeta=` sets the metadata bits of kivi2f/kivi4f keys only",
                    ))
                }
            }
        }
        let group = group.unwrap_or(32);
        if let Side::KiviChannel { bits, .. } = k {
            if group * bits as usize % 8 != 0 {
                return Err(bad(
                    policy,
                    format!("KIVI group {group} is not a whole number of bytes"),
                ));
            }
        }
        if pre_rope {
            if !matches!(k, Side::KiviChannel { .. }) {
                return Err(bad(
                    policy,
                    "`rope=pre` needs KIVI keys (k=kivi2 or k=kivi4)",
                ));
            }
            if d % 2 != 0 {
                return Err(bad(
                    policy,
                    format!("`rope=pre` needs an even head_dim, not {d}"),
                ));
            }
        }
        let residual = residual.unwrap_or(if kivi { 128 } else { 0 });
        if let Some(ctx) = max_ctx {
            if sink + residual > ctx {
                return Err(bad(
                    policy,
                    format!(
                        "full-precision window larger than the context: sink {sink} + residual \
                         {residual} > {ctx}"
                    ),
                ));
            }
        }
        Ok(Policy {
            name: p,
            k,
            v,
            sink,
            residual,
            group,
            rotate,
            pre_rope,
            rotate_v,
            kfit_mse,
            vfit_mse,
            kcover,
            hi_layers,
        })
    }

    /// Tokens moved out of the residual window at once (KIVI keys need whole groups).
    pub fn flush_tokens(&self) -> usize {
        match self.k {
            Side::KiviChannel { .. } => self.group,
            Side::Token(_) => 1,
        }
    }

    /// How KIVI key grids are fitted ([`crate::kivi::encode`]).
    pub fn key_fit(&self) -> crate::kivi::Fit {
        crate::kivi::Fit {
            mse: self.kfit_mse,
            search: self.compact_search(),
        }
    }

    /// Metadata search of compact KIVI keys: `kfit=cover`, `kfit=mse` (all 256 bytes) or the
    /// default near-minimum search.
    pub fn compact_search(&self) -> crate::kivi::CompactSearch {
        use crate::kivi::CompactSearch;
        if self.kcover {
            CompactSearch::Cover
        } else if self.kfit_mse {
            CompactSearch::Full
        } else {
            CompactSearch::Near
        }
    }

    /// True when nothing is ever rounded (f32 on both sides).
    pub fn lossless(&self) -> bool {
        self.k == Side::Token(TokenCodec::F32) && self.v == Side::Token(TokenCodec::F32)
    }

    /// The policy layer `layer` follows: `self` with 2-bit codes raised to 4 bits when the
    /// layer is listed in `hi=` (and no `hi=` list of its own).
    pub fn for_layer(&self, layer: usize) -> Policy {
        let mut p = self.clone();
        p.hi_layers = Vec::new();
        if self.hi_layers.binary_search(&layer).is_ok() {
            let up = |b: u8| if b == 2 { 4 } else { b };
            let side = |s: Side| match s {
                Side::KiviChannel { bits, meta } => Side::KiviChannel {
                    bits: up(bits),
                    meta,
                },
                Side::Token(TokenCodec::Int { bits, group }) => Side::Token(TokenCodec::Int {
                    bits: up(bits),
                    group,
                }),
                Side::Token(TokenCodec::IntC { bits }) => {
                    Side::Token(TokenCodec::IntC { bits: up(bits) })
                }
                Side::Token(TokenCodec::IntS { bits, group }) => Side::Token(TokenCodec::IntS {
                    bits: up(bits),
                    group,
                }),
                other => other,
            };
            p.k = side(self.k);
            p.v = side(self.v);
        }
        p
    }

    /// Bytes one quantized token costs in steady state over all layers and heads, K and V,
    /// metadata included (KIVI key groups amortized over their `g` tokens; `hi=` layers at
    /// their 4-bit cost). Tokens in the sink or the residual window cost
    /// `2 * 4 * n_kv_heads * head_dim` bytes per layer instead.
    pub fn bytes_per_token(&self, shape: KvShape) -> f64 {
        let d = shape.head_dim;
        let side = |s: Side| match s {
            Side::Token(c) => c.record_bytes(d) as f64,
            Side::KiviChannel { bits, meta } => {
                crate::kivi::record_bytes(d, self.group, bits, meta) as f64 / self.group as f64
            }
        };
        (0..shape.n_layers)
            .map(|l| {
                let p = self.for_layer(l);
                side(p.k) + side(p.v)
            })
            .sum::<f64>()
            * shape.n_kv_heads as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: KvShape = KvShape {
        n_layers: 30,
        n_kv_heads: 3,
        head_dim: 64,
    };

    #[test]
    fn presets_and_items() {
        let p = Policy::parse("kivi2", S, None).unwrap();
        assert_eq!((p.residual, p.group, p.sink), (128, 32, 0));
        assert_eq!(
            p.k,
            Side::KiviChannel {
                bits: 2,
                meta: KeyMeta::F16
            }
        );
        assert_eq!(p.v, Side::Token(TokenCodec::Int { bits: 2, group: 64 }));
        let p = Policy::parse("k=fp8, v=int4g32, sink=4", S, None).unwrap();
        assert_eq!(p.k, Side::Token(TokenCodec::Fp8(Fp8Kind::E4M3)));
        assert_eq!(p.v, Side::Token(TokenCodec::Int { bits: 4, group: 32 }));
        assert_eq!((p.sink, p.residual), (4, 0));
        let p = Policy::parse("fp8s", S, None).unwrap();
        assert_eq!(
            (p.k, p.v),
            (
                Side::Token(TokenCodec::Fp8Static {
                    kind: Fp8Kind::E4M3,
                    exp: -2
                }),
                Side::Token(TokenCodec::Fp8Static {
                    kind: Fp8Kind::E4M3,
                    exp: -4
                })
            )
        );
        let p = Policy::parse("k=fp8s-3,v=f32", S, None).unwrap();
        assert_eq!(
            p.k,
            Side::Token(TokenCodec::Fp8Static {
                kind: Fp8Kind::E4M3,
                exp: -3
            })
        );
        let p = Policy::parse("int4", S, None).unwrap();
        assert_eq!(p.k, Side::Token(TokenCodec::Int { bits: 4, group: 32 }));
        let p = Policy::parse("kivi4,sink=4,r=64,g=16", S, Some(8192)).unwrap();
        assert_eq!(
            (p.residual, p.group, p.sink, p.flush_tokens()),
            (64, 16, 4, 16)
        );
        // Fine-metadata keys, symmetric values, the value mean.
        let p = Policy::parse("k=kivi2f,v=int2sg32,kmeta=6.5", S, None).unwrap();
        assert_eq!(
            (p.k, p.v, p.residual),
            (
                Side::KiviChannel {
                    bits: 2,
                    meta: KeyMeta::Fine(FineSpec { e: 6, z: 5 })
                },
                Side::Token(TokenCodec::IntS { bits: 2, group: 32 }),
                128
            )
        );
        let p = Policy::parse("kivi2f", S, None).unwrap();
        assert_eq!(
            (p.k, p.v),
            (
                Side::KiviChannel {
                    bits: 2,
                    meta: KeyMeta::Fine(FineSpec { e: 5, z: 5 })
                },
                Side::Token(TokenCodec::IntS { bits: 2, group: 32 })
            )
        );
        // 7x: per token and head K 64 · (8 + 10/8) / 32 = 18.5 bytes, V 16 + 2 = 18.
        let b = p.bytes_per_token(S);
        assert_eq!(b, 90.0 * 36.5);
        assert!(23040.0 / b > 7.0);
        let p = Policy::parse("k=fp8,v=int4s", S, None).unwrap();
        assert_eq!(p.v, Side::Token(TokenCodec::IntS { bits: 4, group: 64 }));
    }

    #[test]
    fn bad_strings_name_the_problem() {
        let err = |s: &str, ctx| match Policy::parse(s, S, ctx) {
            Err(Error::Policy { reason, .. }) => reason,
            other => panic!("{s}: expected a policy error, got {other:?}"),
        };
        assert!(err("nonsense", None).contains("unknown codec `nonsense`"));
        assert!(err("int4g48", None).contains("does not divide head_dim 64"));
        assert!(err("int2sg48", None).contains("must divide head_dim 64"));
        assert!(err("int8s", None).contains("expected intBs or intBsgG"));
        assert!(err("int2sx", None).contains("expected intBs or intBsgG"));
        assert!(err("kivi2f,kmeta=9.5", None).contains("`kmeta=9.5`: expected E.Z"));
        assert!(err("kivi2f,kmeta=5", None).contains("`kmeta=5`"));
        assert!(err("kivi2,kmeta=5.5", None).contains("kivi2f/kivi4f keys only"));
        assert!(err("int3", None).contains("2, 4 or 8 bits"));
        assert!(err("k=fp8", None).contains("both K and V"));
        assert!(err("fp8,sink=x", None).contains("not a non-negative integer"));
        assert!(err("kivi2", Some(100)).contains("larger than the context"));
        assert!(err("fp8,sink=9000", Some(8192)).contains("larger than the context"));
        assert!(err("fp8,,sink=1", None).contains("empty item"));
        assert!(err("fp8,q=3", None).contains("unknown key `q`"));
        assert!(err("", None).contains("empty"));
        assert!(err("fp8,int8", None).contains("twice"));
        assert!(err("fp8s+x", None).contains("scale exponent"));
        assert!(err("k=fp8s99,v=fp8", None).contains("-20..=20"));
        assert!(err("kivi2,rot=x", None).contains("`rot=x`: known rotations"));
        assert!(err("kivi2,fit=l1", None).contains("`fit=l1`: expected mse"));
        let odd = KvShape { head_dim: 48, ..S };
        assert!(matches!(
            Policy::parse("fp8,rot=v", odd, None),
            Err(Error::Policy { reason, .. }) if reason.contains("power-of-two head_dim")
        ));
        let p = Policy::parse("kivi2,rot=hv,fit=mse", S, None).unwrap();
        assert!(p.rotate && p.rotate_v && p.kfit_mse && p.vfit_mse);
        let p = Policy::parse("kivi2,rot=v", S, None).unwrap();
        assert!(!p.rotate && p.rotate_v && !p.kfit_mse && !p.vfit_mse);
        let p = Policy::parse("kivi2c,kfit=cover", S, None).unwrap();
        assert!(p.kcover && !p.kfit_mse && !p.vfit_mse);
        let p = Policy::parse("kivi2c,kfit=cover,fit=mse", S, None).unwrap();
        assert!(!p.kcover && p.kfit_mse);
        assert!(err("kivi2,vfit=cover", None).contains("`vfit=cover`"));
        let p = Policy::parse("kivi2,vfit=mse", S, None).unwrap();
        assert!(!p.kfit_mse && p.vfit_mse);
        let p = Policy::parse("kivi2,fit=mse,kfit=minmax", S, None).unwrap();
        assert!(!p.kfit_mse && p.vfit_mse);
        assert!(err("kivi2,hi=30", None).contains("not within 0..30"));
        assert!(err("kivi2,hi=3-1", None).contains("not within"));
        assert!(err("kivi2,hi=a", None).contains("not a non-negative integer"));
        let p = Policy::parse("kivi2,hi=29+0-2+1", S, None).unwrap();
        assert_eq!(p.hi_layers, vec![0, 1, 2, 29]);
        assert_eq!(
            p.for_layer(3),
            Policy {
                hi_layers: vec![],
                ..p.clone()
            }
        );
        let l0 = p.for_layer(0);
        assert_eq!(
            (l0.k, l0.v, l0.residual, l0.group),
            (
                Side::KiviChannel {
                    bits: 4,
                    meta: KeyMeta::F16
                },
                Side::Token(TokenCodec::Int { bits: 4, group: 64 }),
                128,
                32
            )
        );
        let c = Policy::parse("k=kivi2c,v=fp8,hi=0", S, None)
            .unwrap()
            .for_layer(0);
        assert_eq!(
            (c.k, c.v),
            (
                Side::KiviChannel {
                    bits: 4,
                    meta: KeyMeta::Byte
                },
                Side::Token(TokenCodec::Fp8(Fp8Kind::E4M3))
            )
        );
    }

    #[test]
    fn steady_state_bytes_per_token() {
        let f16 = Policy::parse("f16", S, None).unwrap().bytes_per_token(S);
        assert_eq!(f16, (2 * 2 * 64 * 3 * 30) as f64);
        let fp8 = Policy::parse("fp8", S, None).unwrap().bytes_per_token(S);
        assert_eq!(fp8, (2 * 65 * 3 * 30) as f64);
        // Static-scale FP8: exactly half of f16.
        let fp8s = Policy::parse("fp8s", S, None).unwrap().bytes_per_token(S);
        assert_eq!(fp8s * 2.0, f16);
        // KIVI-2: K = 64 channels x (4 + 8) bytes per 32 tokens, V = 16 + 4 bytes per token-head.
        let k2 = Policy::parse("kivi2", S, None).unwrap().bytes_per_token(S);
        assert_eq!(k2, (64.0 * 12.0 / 32.0 + 20.0) * 90.0);
        // Compact KIVI-2: K = 64 channels x (1 + 8) bytes per 32 tokens, V = 16 + 2 bytes per
        // token-head: 3240 bytes, 7.11x smaller than f16.
        let k2c = Policy::parse("kivi2c,rope=pre,sink=4", S, None)
            .unwrap()
            .bytes_per_token(S);
        assert_eq!(k2c, (64.0 * 9.0 / 32.0 + 18.0) * 90.0);
        assert_eq!(k2c, 3240.0);
        assert!(f16 / k2c >= 7.0);
        // `hi=`: listed layers at the 4-bit cost (kivi4: K 64 x (4 + 16) / 32 = 40, V int4
        // over 64 = 32 + 4 = 36 bytes per token-head), the others at 2-bit (24 + 20).
        let hi = Policy::parse("kivi2,hi=0+29", S, None)
            .unwrap()
            .bytes_per_token(S);
        assert_eq!(hi, (2.0 * (40.0 + 36.0) + 28.0 * (24.0 + 20.0)) * 3.0);
        let k4 = Policy::parse("kivi4", S, None).unwrap().bytes_per_token(S);
        let all = Policy::parse("kivi2,hi=0-29", S, None)
            .unwrap()
            .bytes_per_token(S);
        assert_eq!(all, k4);
    }
}
