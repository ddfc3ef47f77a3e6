//! Per-token codecs: one record per (token, KV head) holding `head_dim` values.
//!
//! * `f32`, `f16`, `bf16`: plain element arrays (4/2/2 bytes per value).
//! * FP8 (E4M3 / E5M2): one byte per value plus a dynamic power-of-two scale per token per
//!   head stored as an E8M0 exponent byte (`2^(e-127)`), chosen as the smallest power of two with
//!   `absmax / scale <= max_finite`; a power of two costs no precision in a float format.
//! * INT-b (b = 8, 4, 2) with groups of `group` values along `head_dim`: asymmetric, per group
//!   an f16 scale and an f16 minimum (4 bytes), codes packed little-end first.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use lowbit_numerics::{FloatFormat, Overflow, Rounding};

/// FP8 flavour of a [`TokenCodec::Fp8`] record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Kind {
    /// OCP E4M3 (max 448): more mantissa, the usual KV choice.
    E4M3,
    /// OCP E5M2 (max 57344): more range.
    E5M2,
}

/// How one (token, head) vector is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenCodec {
    /// 4 bytes per value.
    F32,
    /// IEEE half, 2 bytes per value.
    F16,
    /// bfloat16, 2 bytes per value.
    Bf16,
    /// FP8 values plus one E8M0 scale byte per record.
    Fp8(Fp8Kind),
    /// FP8 values with a static power-of-two scale `2^exp` fixed by the policy: no metadata in
    /// the record (`d` bytes); values beyond `max_finite · 2^exp` saturate.
    Fp8Static {
        /// E4M3 or E5M2.
        kind: Fp8Kind,
        /// Scale exponent.
        exp: i8,
    },
    /// Asymmetric `bits`-bit integers over the whole record with 2 bytes of metadata (KIVI
    /// compact values, `v=kivi2c`): a log-coded step `2^((e - 160) / 16)` (byte `e`; steps
    /// `2^-10 .. 2^5.94`, 4.4% apart) and a grid origin `(z - 128) / 16` steps from zero (byte
    /// `z`: `-8 .. +7.94` steps), `x ≈ origin + q · step`.
    IntC {
        /// 2 or 4.
        bits: u8,
    },
    /// Symmetric `bits`-bit integers, per `group` values one log-coded step byte `e` (step
    /// `2^((e - 160) / 16)`, as [`TokenCodec::IntC`]): `x ≈ (q - levels / 2) · step`, so 2-bit
    /// codes sit at ±0.5 and ±1.5 steps (`int2s`, `int2sg32`).
    IntS {
        /// 2 or 4.
        bits: u8,
        /// Values per group (divides `head_dim`).
        group: usize,
    },
    /// Asymmetric `bits`-bit integers, per `group` values an f16 scale and f16 minimum.
    Int {
        /// 2, 4 or 8.
        bits: u8,
        /// Values per group (divides `head_dim`).
        group: usize,
    },
}

/// The E4M3 byte `s.eeee.mmm` placed into an f16 (`s.eeeee.mmmmmmmmmm`) as `s.0eeee.mmm0000000`
/// is the same number times 2^-8, subnormals included (both are `2^(e-bias)·1.m` or
/// `2^(1-bias)·0.m` with biases 7 and 15). Kept as the reference the f32 decode is tested
/// against.
#[cfg(test)]
#[inline(always)]
fn e4m3_to_f16_bits(c: u8) -> u16 {
    (((c & 0x80) as u16) << 8) | (((c & 0x7f) as u16) << 7)
}

/// Exact f32 value of the E4M3 code `c` by integer arithmetic only (branch-free, so a loop
/// over it vectorizes): normal codes are the f32 with the code's 7 magnitude bits placed at
/// bit 20 and the exponent re-biased by 120; subnormals (`e = 0`) use the magic-number form
/// `2^-6·(1 + m/8) - 2^-6 = 2^-6·m/8`. The NaN codes 0x7f/0xff decode to ±480 instead (the
/// saturating encoder never writes them for finite input).
#[inline(always)]
pub(crate) fn e4m3_to_f32(c: u8) -> f32 {
    let x = (c & 0x7f) as u32;
    let sub = x < 8;
    let bits = (x << 20) + if sub { 121 << 23 } else { 120 << 23 };
    let v = f32::from_bits(bits) - if sub { 1.0 / 64.0 } else { 0.0 };
    f32::from_bits(v.to_bits() | (((c & 0x80) as u32) << 24))
}

/// Exact f32 value of the E5M2 code `c` (the same construction: bits at 21, re-bias 112,
/// subnormals `2^-14·m/4`). Infinity/NaN codes (exponent 31) decode to finite values; the
/// saturating encoder never writes them for finite input.
#[inline(always)]
pub(crate) fn e5m2_to_f32(c: u8) -> f32 {
    let x = (c & 0x7f) as u32;
    let sub = x < 4;
    let bits = (x << 21) + if sub { 113 << 23 } else { 112 << 23 };
    let v = f32::from_bits(bits) - if sub { 1.0 / 16384.0 } else { 0.0 };
    f32::from_bits(v.to_bits() | (((c & 0x80) as u32) << 24))
}

/// The SIMD level the FP8 decode may use: `Some(V3)` (AVX2, detected by the caller) or `None`
/// (the portable reference).
#[cfg(target_arch = "x86_64")]
pub(crate) type Simd = Option<pulp::x86::V3>;
/// The SIMD level the FP8 decode may use (none off x86-64).
#[cfg(not(target_arch = "x86_64"))]
pub(crate) type Simd = Option<std::convert::Infallible>;

/// `out[t * d..][..d] = FP8(record t) * 2^e(t)` for `cnt` FP8 records of `d` codes, record `t`
/// at `buf[off + t * step..]`, laid out as `header` scale bytes (E8M0 exponent, or none when
/// `exps` gives the exponent) then `d` codes. With `simd`, one AVX2 pass per record (8 codes
/// per vector, see [`fp8_x8`]); otherwise the scalar [`e4m3_to_f32`] / [`e5m2_to_f32`]. Both
/// give the same bits (tested for every code).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_fp8_records(
    kind: Fp8Kind,
    buf: &[u8],
    off: usize,
    step: usize,
    cnt: usize,
    d: usize,
    fixed_exp: Option<i32>,
    out: &mut [f32],
    simd: Simd,
) {
    let hdr = usize::from(fixed_exp.is_none());
    let rec_mul = |t: usize| -> (usize, f32) {
        let o = off + t * step;
        let e = fixed_exp.unwrap_or_else(|| buf[o] as i32 - 127);
        (o + hdr, pow2(e))
    };
    #[cfg(target_arch = "x86_64")]
    if let Some(v3) = simd {
        struct Op<'a, F> {
            v3: pulp::x86::V3,
            kind: Fp8Kind,
            buf: &'a [u8],
            cnt: usize,
            d: usize,
            out: &'a mut [f32],
            rec_mul: F,
        }
        impl<F: Fn(usize) -> (usize, f32)> pulp::WithSimd for Op<'_, F> {
            type Output = ();
            #[inline(always)]
            fn with_simd<S: pulp::Simd>(self, _s: S) {
                let Op {
                    v3,
                    kind,
                    buf,
                    cnt,
                    d,
                    out,
                    rec_mul,
                } = self;
                for t in 0..cnt {
                    let (o, mul) = rec_mul(t);
                    let codes = &buf[o..][..d];
                    let dst = &mut out[t * d..][..d];
                    let n8 = d / 8 * 8;
                    match kind {
                        Fp8Kind::E4M3 => {
                            fp8_x8::<20, 120, 8>(v3, &codes[..n8], mul, &mut dst[..n8])
                        }
                        Fp8Kind::E5M2 => {
                            fp8_x8::<21, 112, 4>(v3, &codes[..n8], mul, &mut dst[..n8])
                        }
                    }
                    fp8_scalar(kind, &codes[n8..], mul, &mut dst[n8..]);
                }
            }
        }
        pulp::Simd::vectorize(
            v3,
            Op {
                v3,
                kind,
                buf,
                cnt,
                d,
                out,
                rec_mul,
            },
        );
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = simd;
    for t in 0..cnt {
        let (o, mul) = rec_mul(t);
        fp8_scalar(kind, &buf[o..][..d], mul, &mut out[t * d..][..d]);
    }
}

/// `2^e` for `e` in `-149..=127` (exact; E8M0 exponents are `-127..=127`).
#[inline(always)]
pub(crate) fn pow2(e: i32) -> f32 {
    if e >= -126 {
        f32::from_bits(((e.min(127) + 127) as u32) << 23)
    } else {
        f32::from_bits(1u32 << (e.max(-149) + 149))
    }
}

/// The scalar reference decode: `out[i] = FP8(codes[i]) * mul`.
#[inline(always)]
fn fp8_scalar(kind: Fp8Kind, codes: &[u8], mul: f32, out: &mut [f32]) {
    let f = match kind {
        Fp8Kind::E4M3 => e4m3_to_f32,
        Fp8Kind::E5M2 => e5m2_to_f32,
    };
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = f(c) * mul;
    }
}

/// 8 codes per AVX2 vector (`codes.len()` a multiple of 8): the magnitude bits `x` placed at
/// bit `SH` with the exponent re-biased by `BIAS`; codes with `x < SUB` (zero, subnormals) get
/// one more exponent step and the format's smallest normal `2^(BIAS + 1 - 127)` subtracted
/// (magic-number subnormal); sign ORed in; times `mul`. Called in a V3 (AVX2) context.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn fp8_x8<const SH: i32, const BIAS: i32, const SUB: i32>(
    v3: pulp::x86::V3,
    codes: &[u8],
    mul: f32,
    out: &mut [f32],
) {
    use std::arch::x86_64::{__m128i, __m256};
    let (a, a2) = (v3.avx, v3.avx2);
    let min_normal = pow2(BIAS + 1 - 127);
    let m7 = a._mm256_set1_epi32(0x7f);
    let m80 = a._mm256_set1_epi32(0x80);
    let lim = a._mm256_set1_epi32(SUB);
    let one_exp = a._mm256_set1_epi32(1 << 23);
    let rebias = a._mm256_set1_epi32(BIAS << 23);
    let minn = a._mm256_set1_ps(min_normal);
    let vm = a._mm256_set1_ps(mul);
    for (c, o) in codes.chunks_exact(8).zip(out.chunks_exact_mut(8)) {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        let b: __m128i = pulp::cast([w, 0u64]);
        let x32 = a2._mm256_cvtepu8_epi32(b);
        let x = a2._mm256_and_si256(x32, m7);
        let is_sub = a2._mm256_cmpgt_epi32(lim, x);
        let shifted = if SH == 20 {
            a2._mm256_slli_epi32::<20>(x)
        } else {
            a2._mm256_slli_epi32::<21>(x)
        };
        let bits = a2._mm256_add_epi32(
            a2._mm256_add_epi32(shifted, rebias),
            a2._mm256_and_si256(is_sub, one_exp),
        );
        let v = a._mm256_sub_ps(
            a._mm256_castsi256_ps(bits),
            a._mm256_and_ps(a._mm256_castsi256_ps(is_sub), minn),
        );
        let sign = a2._mm256_slli_epi32::<24>(a2._mm256_and_si256(x32, m80));
        let v = a._mm256_mul_ps(a._mm256_or_ps(v, a._mm256_castsi256_ps(sign)), vm);
        let r: [f32; 8] = pulp::cast::<__m256, [f32; 8]>(v);
        o.copy_from_slice(&r);
    }
}

impl TokenCodec {
    /// Bytes of one record of `d` values, metadata included.
    pub fn record_bytes(&self, d: usize) -> usize {
        match *self {
            TokenCodec::F32 => 4 * d,
            TokenCodec::F16 | TokenCodec::Bf16 => 2 * d,
            TokenCodec::Fp8(_) => d + 1,
            TokenCodec::Fp8Static { .. } => d,
            TokenCodec::Int { bits, group } => d * bits as usize / 8 + 4 * (d / group),
            TokenCodec::IntC { bits } => d * bits as usize / 8 + 2,
            TokenCodec::IntS { bits, group } => d * bits as usize / 8 + d / group,
        }
    }

    /// True when a record reproduces its input exactly.
    pub fn lossless(&self) -> bool {
        matches!(self, TokenCodec::F32)
    }

    /// Short name (`f16`, `fp8`, `int4g32`, ...).
    pub fn name(&self, d: usize) -> String {
        match *self {
            TokenCodec::F32 => "f32".into(),
            TokenCodec::F16 => "f16".into(),
            TokenCodec::Bf16 => "bf16".into(),
            TokenCodec::Fp8(Fp8Kind::E4M3) => "fp8".into(),
            TokenCodec::Fp8(Fp8Kind::E5M2) => "fp8e5m2".into(),
            TokenCodec::Fp8Static { kind, exp } => {
                let k = if kind == Fp8Kind::E4M3 { "" } else { "e5m2" };
                format!("fp8s{k}{exp}")
            }
            TokenCodec::Int { bits, group } if group == d => format!("int{bits}"),
            TokenCodec::Int { bits, group } => format!("int{bits}g{group}"),
            TokenCodec::IntC { bits } => format!("kivi{bits}c"),
            TokenCodec::IntS { bits, group } if group == d => format!("int{bits}s"),
            TokenCodec::IntS { bits, group } => format!("int{bits}sg{group}"),
        }
    }

    /// Encode `x` (`d` values) into `out` (`record_bytes(d)` bytes).
    pub fn encode(&self, x: &[f32], out: &mut [u8]) {
        self.encode_fit(x, out, false);
    }

    /// [`Self::encode`]; with `mse`, INT groups take the least-squares grid of
    /// [`int_params_mse`] instead of min/max (same record format; other codecs ignore it).
    pub fn encode_fit(&self, x: &[f32], out: &mut [u8], mse: bool) {
        let d = x.len();
        debug_assert_eq!(out.len(), self.record_bytes(d));
        match *self {
            TokenCodec::F32 => {
                for (o, v) in out.chunks_exact_mut(4).zip(x) {
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
            TokenCodec::F16 => {
                for (o, v) in out.chunks_exact_mut(2).zip(x) {
                    o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
                }
            }
            TokenCodec::Bf16 => {
                for (o, v) in out.chunks_exact_mut(2).zip(x) {
                    o.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
                }
            }
            TokenCodec::Fp8(kind) => {
                let fmt = match kind {
                    Fp8Kind::E4M3 => FloatFormat::E4M3,
                    Fp8Kind::E5M2 => FloatFormat::E5M2,
                };
                let amax = x
                    .iter()
                    .fold(0f32, |m, v| if v.abs() > m { v.abs() } else { m });
                // Smallest power of two 2^e with amax / 2^e <= max_finite.
                let mut e: i32 = 0;
                if amax > 0.0 && amax.is_finite() {
                    e = (amax / fmt.max_finite()).log2().ceil() as i32;
                    while amax / 2f32.powi(e) > fmt.max_finite() {
                        e += 1;
                    }
                }
                let e = e.clamp(-127, 127);
                out[0] = (e + 127) as u8;
                let inv = 2f32.powi(-e);
                for (o, v) in out[1..].iter_mut().zip(x) {
                    *o = fmt.encode(v * inv, Rounding::NearestEven, Overflow::Saturate);
                }
            }
            TokenCodec::Fp8Static { kind, exp } => {
                let fmt = match kind {
                    Fp8Kind::E4M3 => FloatFormat::E4M3,
                    Fp8Kind::E5M2 => FloatFormat::E5M2,
                };
                let inv = pow2(-(exp as i32));
                for (o, v) in out.iter_mut().zip(x) {
                    *o = fmt.encode(v * inv, Rounding::NearestEven, Overflow::Saturate);
                }
            }
            TokenCodec::Int { bits, group } => {
                let gb = group * bits as usize / 8 + 4;
                let levels = ((1u32 << bits) - 1) as f32;
                for (xg, og) in x.chunks_exact(group).zip(out.chunks_exact_mut(gb)) {
                    let (scale, min) = if mse {
                        int_params_mse(xg, levels)
                    } else {
                        int_params(xg, levels)
                    };
                    og[0..2].copy_from_slice(&scale.to_le_bytes());
                    og[2..4].copy_from_slice(&min.to_le_bytes());
                    pack_codes(xg, scale.to_f32(), min.to_f32(), bits, levels, &mut og[4..]);
                }
            }
            TokenCodec::IntS { bits, group } => {
                let gb = group * bits as usize / 8 + 1;
                let levels = ((1u32 << bits) - 1) as f32;
                for (xg, og) in x.chunks_exact(group).zip(out.chunks_exact_mut(gb)) {
                    let e = ints_step(xg, levels);
                    og[0] = e;
                    let (step, _) = intc_grid(e, 128);
                    pack_codes(xg, step, -0.5 * levels * step, bits, levels, &mut og[1..]);
                }
            }
            TokenCodec::IntC { bits } => {
                let levels = ((1u32 << bits) - 1) as f32;
                let (e, z) = intc_params(x, levels);
                out[0] = e;
                out[1] = z;
                let (step, origin) = intc_grid(e, z);
                pack_codes(x, step, origin, bits, levels, &mut out[2..]);
            }
        }
    }

    /// Decode one record into `out` (`d` values). `tmp` is scratch of at least `d` u16.
    #[inline(always)]
    pub fn decode(&self, rec: &[u8], out: &mut [f32], tmp: &mut [u16]) {
        let d = out.len();
        match *self {
            TokenCodec::F32 => {
                for (o, b) in out.iter_mut().zip(rec.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            TokenCodec::F16 => {
                let t = &mut tmp[..d];
                for (o, b) in t.iter_mut().zip(rec.chunks_exact(2)) {
                    *o = u16::from_le_bytes([b[0], b[1]]);
                }
                half::slice::HalfBitsSliceExt::reinterpret_cast::<f16>(&*t)
                    .convert_to_f32_slice(out);
            }
            TokenCodec::Bf16 => {
                for (o, b) in out.iter_mut().zip(rec.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
                }
            }
            TokenCodec::Fp8(kind) => {
                decode_fp8_records(kind, rec, 0, 0, 1, d, None, out, None);
            }
            TokenCodec::Fp8Static { kind, exp } => {
                decode_fp8_records(kind, rec, 0, 0, 1, d, Some(exp as i32), out, None);
            }
            TokenCodec::Int { bits, group } => {
                let gb = group * bits as usize / 8 + 4;
                for (og, rg) in out.chunks_exact_mut(group).zip(rec.chunks_exact(gb)) {
                    let scale = f16::from_le_bytes([rg[0], rg[1]]).to_f32();
                    let min = f16::from_le_bytes([rg[2], rg[3]]).to_f32();
                    unpack_codes(&rg[4..], bits, scale, min, og);
                }
            }
            TokenCodec::IntC { bits } => {
                let (step, origin) = intc_grid(rec[0], rec[1]);
                unpack_codes(&rec[2..], bits, step, origin, out);
            }
            TokenCodec::IntS { bits, group } => {
                let gb = group * bits as usize / 8 + 1;
                let levels = ((1u32 << bits) - 1) as f32;
                for (og, rg) in out.chunks_exact_mut(group).zip(rec.chunks_exact(gb)) {
                    let (step, _) = intc_grid(rg[0], 128);
                    unpack_codes(&rg[1..], bits, step, -0.5 * levels * step, og);
                }
            }
        }
    }
}

/// `2^(i/16)` for `i` in `0..16`.
const POW2_16THS: [f32; 16] = [
    1.0,
    1.044_273_8,
    1.090_507_7,
    1.138_788_6,
    1.189_207_1,
    1.241_857_8,
    1.296_839_6,
    1.354_255_5,
    std::f32::consts::SQRT_2,
    1.476_826_1,
    1.542_210_8,
    1.610_490_3,
    1.681_792_8,
    1.756_252_2,
    1.834_008_1,
    1.915_206_6,
];

/// Step and grid origin of an [`TokenCodec::IntC`] record with metadata bytes `e`, `z`.
#[inline(always)]
pub(crate) fn intc_grid(e: u8, z: u8) -> (f32, f32) {
    let k = e as i32 - 160;
    let step = pow2(k >> 4) * POW2_16THS[(k & 15) as usize];
    (step, (z as i32 - 128) as f32 * (1.0 / 16.0) * step)
}

/// Step byte of an [`TokenCodec::IntS`] group: the smallest step whose symmetric grid
/// `±levels / 2 · step` covers `max |x|` (a least-squares choice among it and the six steps
/// below it measured no better on SmolLM2-135M: 21.746 vs 21.758 PPL at 4096).
pub(crate) fn ints_step(x: &[f32], levels: f32) -> u8 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if !amax.is_finite() {
        return 0;
    }
    let need = (amax / (0.5 * levels)).max(f32::MIN_POSITIVE);
    let mut e = ((need.log2() * 16.0).floor() as i32 + 160).clamp(0, 255);
    while e < 255 && intc_grid(e as u8, 128).0 < need {
        e += 1;
    }
    e as u8
}

/// Metadata bytes of an [`TokenCodec::IntC`] record for `x`: the smallest step (and for it the
/// highest origin) whose grid `origin ..= origin + levels · step` covers `[min x, max x]`;
/// values outside the largest representable grid are clamped by the encoder.
pub(crate) fn intc_params(x: &[f32], levels: f32) -> (u8, u8) {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in x {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() || !hi.is_finite() {
        return (0, 128);
    }
    let need = ((hi - lo) / levels).max(f32::MIN_POSITIVE);
    let mut e = ((need.log2() * 16.0).floor() as i32 + 160).clamp(0, 255);
    loop {
        let (step, _) = intc_grid(e as u8, 128);
        let z = ((lo / step * 16.0).floor() as i32 + 128).clamp(0, 255);
        let (_, origin) = intc_grid(e as u8, z as u8);
        if (origin <= lo && origin + levels * step >= hi) || e == 255 {
            return (e as u8, z as u8);
        }
        e += 1;
    }
}

impl TokenCodec {
    /// Decode `cnt` records `buf[off + t * step..]` into `out[t * d..][..d]`. FP8 records in
    /// one pass per record (AVX2 when `simd` is given, see [`decode_fp8_records`]); f16 records
    /// through one half-to-f32 conversion for the whole tile; other codecs record by record.
    /// `tmp` is scratch.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn decode_tile(
        &self,
        buf: &[u8],
        off: usize,
        step: usize,
        cnt: usize,
        out: &mut [f32],
        tmp: &mut Vec<u16>,
        simd: Simd,
    ) {
        let d = out.len() / cnt.max(1);
        let ru = self.record_bytes(d);
        match *self {
            TokenCodec::Fp8(kind) => {
                decode_fp8_records(kind, buf, off, step, cnt, d, None, out, simd);
            }
            TokenCodec::Fp8Static { kind, exp } => {
                decode_fp8_records(kind, buf, off, step, cnt, d, Some(exp as i32), out, simd);
            }
            TokenCodec::F16 => {
                tmp.resize(cnt * d, 0);
                for t in 0..cnt {
                    let rec = &buf[off + t * step..][..ru];
                    for (o, b) in tmp[t * d..][..d].iter_mut().zip(rec.chunks_exact(2)) {
                        *o = u16::from_le_bytes([b[0], b[1]]);
                    }
                }
                half::slice::HalfBitsSliceExt::reinterpret_cast::<f16>(&tmp[..cnt * d])
                    .convert_to_f32_slice(&mut out[..cnt * d]);
            }
            TokenCodec::IntS { bits: 2, group } if group % 16 == 0 && d % group == 0 => {
                // 2-bit symmetric values (the 2-bit KIVI policies' values): the per-record
                // decode without its per-record dispatch, 16 codes per word, the same arithmetic
                // (so the same bits); ~7% faster decode attention than the generic path in an
                // interleaved `bench kv` (docs/benchmarks.md, session 9). A fused multiply-add
                // measured no faster and would change the bits.
                let gb = group / 4 + 1;
                for t in 0..cnt {
                    let rec = &buf[off + t * step..][..ru];
                    let o = &mut out[t * d..][..d];
                    for (og, rg) in o.chunks_exact_mut(group).zip(rec.chunks_exact(gb)) {
                        let (s, _) = intc_grid(rg[0], 128);
                        let mn = -1.5 * s;
                        for (o16, w) in og.chunks_exact_mut(16).zip(rg[1..].chunks_exact(4)) {
                            let w = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
                            for (i, v) in o16.iter_mut().enumerate() {
                                *v = mn + ((w >> (2 * i)) & 3) as f32 * s;
                            }
                        }
                    }
                }
            }
            _ => {
                tmp.resize(d, 0);
                for t in 0..cnt {
                    self.decode(&buf[off + t * step..][..ru], &mut out[t * d..][..d], tmp);
                }
            }
        }
    }
}

/// Scale and minimum (both f16) of an asymmetric `levels`-step grid covering `x`.
pub(crate) fn int_params(x: &[f32], levels: f32) -> (f16, f16) {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in x {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() || !hi.is_finite() {
        return (f16::ZERO, f16::ZERO);
    }
    let min = f16::from_f32(lo.clamp(-65504.0, 65504.0));
    // Scale from the rounded minimum so the top code still reaches `hi` (up to f16 rounding).
    let scale = f16::from_f32(((hi - min.to_f32()) / levels).clamp(0.0, 65504.0));
    (scale, min)
}

/// Squared error of `x` on the grid `min + q * scale`, rounded and clamped as [`pack_codes`]
/// rounds it.
fn grid_sse(x: &[f32], scale: f32, min: f32, levels: f32) -> f32 {
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    x.iter()
        .map(|&v| {
            let q = round_half_away((v - min) * inv).clamp(0.0, levels);
            let e = v - (min + q * scale);
            e * e
        })
        .sum()
}

/// Scale and minimum (both f16) of an asymmetric `levels`-step grid chosen for the smallest
/// squared error on `x` (policy item `fit=mse`) instead of covering `[min, max]`: candidate
/// ranges `[lo + a·w/20, hi - b·w/20]` (`w = hi - lo`, `a, b` in `0..=5`, so up to a quarter of
/// the range clipped at each end), each refitted twice by least squares on its own codes
/// (the `min` and `scale` that minimize the error for fixed codes), all evaluated with
/// f16-rounded parameters exactly as [`pack_codes`] quantizes. The min/max grid of
/// [`int_params`] is one of the candidates, so the result is never worse than it.
pub(crate) fn int_params_mse(x: &[f32], levels: f32) -> (f16, f16) {
    let (s0, m0) = int_params(x, levels);
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in x {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() || !hi.is_finite() || hi <= lo || hi - lo > 65504.0 {
        return (s0, m0);
    }
    let mut best = (grid_sse(x, s0.to_f32(), m0.to_f32(), levels), s0, m0);
    let mut consider = |s: f32, m: f32| {
        if s.is_nan() || s <= 0.0 || !s.is_finite() || !m.is_finite() {
            return;
        }
        let (sf, mf) = (
            f16::from_f32(s.min(65504.0)),
            f16::from_f32(m.clamp(-65504.0, 65504.0)),
        );
        let e = grid_sse(x, sf.to_f32(), mf.to_f32(), levels);
        if e < best.0 {
            best = (e, sf, mf);
        }
    };
    let w = hi - lo;
    let n = x.len() as f32;
    for a in 0..6 {
        for b in 0..6 {
            let (l, h) = (lo + a as f32 * w / 20.0, hi - b as f32 * w / 20.0);
            let (mut scale, mut min) = ((h - l) / levels, l);
            consider(scale, min);
            for _ in 0..2 {
                let inv = 1.0 / scale;
                let (mut sq, mut sqq, mut sx, mut sqx) = (0f32, 0f32, 0f32, 0f32);
                for &v in x {
                    let q = round_half_away((v - min) * inv).clamp(0.0, levels);
                    sq += q;
                    sqq += q * q;
                    sx += v;
                    sqx += q * v;
                }
                let det = n * sqq - sq * sq;
                if det <= 0.0 {
                    break;
                }
                let s = (n * sqx - sq * sx) / det;
                if s.is_nan() || s <= 0.0 {
                    break;
                }
                let m = (sx - s * sq) / n;
                consider(s, m);
                (scale, min) = (s, m);
            }
        }
    }
    (best.1, best.2)
}

/// `v.round()` (half away from zero) without the libm call `f32::round` compiles to on
/// baseline x86-64: the encoders evaluate it for every candidate grid of every value.
/// Bit-identical to `f32::round` for every input (tested), NaN and infinities included.
#[inline(always)]
pub(crate) fn round_half_away(v: f32) -> f32 {
    // Below 2^23 the integer conversion truncates exactly; above it every float is an integer.
    if v.abs() < 8_388_608.0 {
        let t = (v as i32) as f32;
        let r = if (v - t).abs() >= 0.5 {
            t + 1f32.copysign(v)
        } else {
            t
        };
        // Keep the sign of zero as `round` does (-0.3 -> -0.0).
        r.copysign(v)
    } else {
        v
    }
}

/// Quantize `x` onto `min + q * scale` (q in 0..=levels) and pack `bits`-bit codes.
pub(crate) fn pack_codes(x: &[f32], scale: f32, min: f32, bits: u8, levels: f32, out: &mut [u8]) {
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let per = 8 / bits as usize;
    for (o, xs) in out.iter_mut().zip(x.chunks(per)) {
        let mut b = 0u8;
        for (j, &v) in xs.iter().enumerate() {
            let q = round_half_away((v - min) * inv).clamp(0.0, levels) as u8;
            b |= q << (j * bits as usize);
        }
        *o = b;
    }
}

/// Unpack `out.len()` codes and dequantize them as `min + q * scale`.
#[inline(always)]
pub(crate) fn unpack_codes(codes: &[u8], bits: u8, scale: f32, min: f32, out: &mut [f32]) {
    match bits {
        8 => {
            for (o, &c) in out.iter_mut().zip(codes) {
                *o = min + c as f32 * scale;
            }
        }
        4 => {
            for (o, &c) in out.chunks_exact_mut(2).zip(codes) {
                o[0] = min + (c & 15) as f32 * scale;
                o[1] = min + (c >> 4) as f32 * scale;
            }
        }
        _ => {
            // 16 codes per 32-bit word, one variable shift per lane: a loop LLVM vectorizes
            // (vpsrlvd + cvtdq2ps) where the caller runs with AVX2; same arithmetic as the
            // byte loop below, so the same bits.
            let n16 = out.len() / 16 * 16;
            for (o, w) in out[..n16].chunks_exact_mut(16).zip(codes.chunks_exact(4)) {
                let w = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
                for (i, v) in o.iter_mut().enumerate() {
                    *v = min + ((w >> (2 * i)) & 3) as f32 * scale;
                }
            }
            for (o, &c) in out[n16..].chunks_exact_mut(4).zip(&codes[n16 / 4..]) {
                o[0] = min + (c & 3) as f32 * scale;
                o[1] = min + ((c >> 2) & 3) as f32 * scale;
                o[2] = min + ((c >> 4) & 3) as f32 * scale;
                o[3] = min + (c >> 6) as f32 * scale;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: &mut u64) -> f32 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn fp8_decode_matches_numerics_for_every_code() {
        for c in 0..=255u8 {
            let want = FloatFormat::E4M3.decode(c);
            if c & 0x7f == 0x7f {
                assert!(want.is_nan()); // never written: the encoder saturates
                continue;
            }
            // The f16 placement trick and the integer f32 decode agree with the reference.
            let via16 = f16::from_bits(e4m3_to_f16_bits(c)).to_f32() * 256.0;
            assert_eq!(via16.to_bits(), want.to_bits(), "f16 trick, code {c:#x}");
            assert_eq!(e4m3_to_f32(c).to_bits(), want.to_bits(), "E4M3 code {c:#x}");
        }
        for c in 0..=255u8 {
            let want = FloatFormat::E5M2.decode(c);
            if want.is_finite() {
                assert_eq!(e5m2_to_f32(c).to_bits(), want.to_bits(), "E5M2 code {c:#x}");
                let via16 = f16::from_bits((c as u16) << 8).to_f32();
                assert_eq!(via16.to_bits(), want.to_bits(), "code {c:#x}");
            } else {
                assert_eq!(c & 0x7c, 0x7c); // exponent 31: never written
            }
        }
        // The record decode (portable and, where the CPU has it, AVX2; records of 8k and
        // 8k + 5 codes, so the tail runs too) times each power-of-two scale equals the reference
        // code by code, for every finite code.
        #[cfg(target_arch = "x86_64")]
        let levels: Vec<Simd> = vec![None, pulp::x86::V3::try_new()];
        #[cfg(not(target_arch = "x86_64"))]
        let levels: Vec<Simd> = vec![None];
        for kind in [Fp8Kind::E4M3, Fp8Kind::E5M2] {
            let fmt = match kind {
                Fp8Kind::E4M3 => FloatFormat::E4M3,
                Fp8Kind::E5M2 => FloatFormat::E5M2,
            };
            let codes: Vec<u8> = (0..=255u8).filter(|&c| fmt.decode(c).is_finite()).collect();
            for d in [8, 13] {
                // Records: one E8M0 byte, then `d` codes (cycling through all finite codes).
                let cnt = codes.len().div_ceil(d);
                for e in [-20i32, -3, 0, 5] {
                    let mut buf = Vec::new();
                    for t in 0..cnt {
                        buf.push((e + 127) as u8);
                        buf.extend((0..d).map(|i| codes[(t * d + i) % codes.len()]));
                    }
                    for &simd in &levels {
                        let mut out = vec![0f32; cnt * d];
                        decode_fp8_records(kind, &buf, 0, d + 1, cnt, d, None, &mut out, simd);
                        for (i, &y) in out.iter().enumerate() {
                            let c = codes[i % codes.len()];
                            let want = fmt.decode(c) * 2f32.powi(e);
                            assert_eq!(y.to_bits(), want.to_bits(), "{kind:?} {c:#x} 2^{e}");
                        }
                        // The same with the exponent given outside the record (no header).
                        let bare: Vec<u8> = buf
                            .chunks_exact(d + 1)
                            .flat_map(|r| r[1..].to_vec())
                            .collect();
                        let mut out2 = vec![0f32; cnt * d];
                        decode_fp8_records(kind, &bare, 0, d, cnt, d, Some(e), &mut out2, simd);
                        assert_eq!(out, out2);
                    }
                }
            }
        }
        assert_eq!(pow2(-149), f32::from_bits(1));
        assert_eq!(pow2(-127), 2f32.powi(-127));
        assert_eq!(pow2(127), 2f32.powi(127));
        assert_eq!(pow2(-3), 0.125);
    }

    /// `decode_tile` (its 2-bit symmetric fast path and the generic one; portable and with the
    /// AVX2 level) against `decode` record by record, bit for bit, on strided records with
    /// several group widths and steps over many octaves.
    #[test]
    fn decode_tile_matches_record_decode() {
        #[cfg(target_arch = "x86_64")]
        let levels: Vec<Simd> = vec![None, pulp::x86::V3::try_new()];
        #[cfg(not(target_arch = "x86_64"))]
        let levels: Vec<Simd> = vec![None];
        let mut seed = 0x5eed_u64;
        for (codec, d) in [
            (TokenCodec::IntS { bits: 2, group: 32 }, 64),
            (TokenCodec::IntS { bits: 2, group: 16 }, 48),
            (TokenCodec::IntS { bits: 2, group: 64 }, 64),
            (TokenCodec::IntS { bits: 2, group: 8 }, 24),
            (TokenCodec::IntS { bits: 4, group: 16 }, 32),
        ] {
            let ru = codec.record_bytes(d);
            let (cnt, step) = (13, ru + 3);
            let mut buf = vec![0u8; 5 + cnt * step];
            for t in 0..cnt {
                let x: Vec<f32> = (0..d)
                    .map(|i| rng(&mut seed) * 2f32.powi((t as i32 % 9) * 3 - 12 + (i % 3) as i32))
                    .collect();
                codec.encode(&x, &mut buf[5 + t * step..][..ru]);
            }
            let mut tmp = vec![0u16; d];
            let mut want = vec![0f32; cnt * d];
            for t in 0..cnt {
                codec.decode(
                    &buf[5 + t * step..][..ru],
                    &mut want[t * d..][..d],
                    &mut tmp,
                );
            }
            for &simd in &levels {
                let mut got = vec![f32::NAN; cnt * d];
                let mut tmp = Vec::new();
                codec.decode_tile(&buf, 5, step, cnt, &mut got, &mut tmp, simd);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        a.to_bits() == b.to_bits(),
                        "{codec:?} d {d} value {i} simd {}: {a} vs {b}",
                        simd.is_some()
                    );
                }
            }
        }
    }

    #[test]
    fn saturating_encoder_never_writes_nan_codes() {
        for kind in [Fp8Kind::E4M3, Fp8Kind::E5M2] {
            let c = TokenCodec::Fp8(kind);
            let x: Vec<f32> = (0..64)
                .map(|i| match i {
                    0 => 1e30,
                    1 => -1e30,
                    2 => 3e38,
                    _ => (i as f32 - 30.0) * 1e3,
                })
                .collect();
            let mut rec = vec![0u8; c.record_bytes(64)];
            c.encode(&x, &mut rec);
            for &b in &rec[1..] {
                let v = match kind {
                    Fp8Kind::E4M3 => FloatFormat::E4M3.decode(b),
                    Fp8Kind::E5M2 => FloatFormat::E5M2.decode(b),
                };
                assert!(v.is_finite(), "{kind:?} wrote {b:#x}");
            }
        }
    }

    #[test]
    fn roundtrip_error_within_one_step() {
        let mut s = 0x1234_5678_9abc_def1u64;
        let d = 64;
        let codecs = [
            TokenCodec::F32,
            TokenCodec::F16,
            TokenCodec::Bf16,
            TokenCodec::Fp8(Fp8Kind::E4M3),
            TokenCodec::Fp8(Fp8Kind::E5M2),
            TokenCodec::Int { bits: 8, group: 64 },
            TokenCodec::Int { bits: 4, group: 32 },
            TokenCodec::Int { bits: 2, group: 16 },
            TokenCodec::Fp8Static {
                kind: Fp8Kind::E4M3,
                exp: -2,
            },
            TokenCodec::IntC { bits: 2 },
            TokenCodec::IntC { bits: 4 },
            TokenCodec::IntS { bits: 2, group: 32 },
            TokenCodec::IntS { bits: 4, group: 16 },
            TokenCodec::IntS { bits: 2, group: 64 },
        ];
        let mut tmp = vec![0u16; d];
        for trial in 0..50 {
            let amp = 10f32.powi(trial % 5 - 2);
            let x: Vec<f32> = (0..d).map(|_| rng(&mut s) * amp).collect();
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            for c in codecs {
                // The compact codec's largest step is 2^5.94 (2-bit range 184): skip amp 100.
                if matches!(c, TokenCodec::IntC { .. } | TokenCodec::IntS { .. }) && amp > 20.0 {
                    continue;
                }
                let mut rec = vec![0u8; c.record_bytes(d)];
                c.encode(&x, &mut rec);
                let mut y = vec![0f32; d];
                c.decode(&rec, &mut y, &mut tmp);
                for (i, (a, b)) in x.iter().zip(&y).enumerate() {
                    // Per-element bound from the format's step: relative 2^-(mantissa+1) for
                    // floats (plus the subnormal step), half an integer step (+ f16 rounding of
                    // scale/min, bounded generously by 1% of the range) for ints.
                    let tol = match c {
                        TokenCodec::F32 => 0.0,
                        TokenCodec::F16 => a.abs() * 2f32.powi(-11) + 1e-7,
                        TokenCodec::Bf16 => a.abs() * 2f32.powi(-8),
                        TokenCodec::Fp8(Fp8Kind::E4M3) => a.abs() / 16.0 + amax * 2f32.powi(-15),
                        TokenCodec::Fp8(Fp8Kind::E5M2) => a.abs() / 8.0 + amax * 2f32.powi(-20),
                        // Amplitudes stay below the saturation point 448 * 2^-2; the subnormal
                        // step is 2^-9 * 2^exp.
                        TokenCodec::Fp8Static {
                            kind: Fp8Kind::E4M3,
                            exp,
                        } => a.abs() / 16.0 + 2f32.powi(exp as i32 - 10),
                        TokenCodec::Fp8Static { .. } => unreachable!(),
                        TokenCodec::Int { bits, .. } => {
                            let step = 2.0 * amax / ((1u32 << bits) - 1) as f32;
                            0.5 * step + 0.01 * 2.0 * amax
                        }
                        // Half a step; the step is at most 2^(2/16) above range / levels (log
                        // code rounded up, plus one more code when the origin rounding needs it).
                        TokenCodec::IntC { bits } => {
                            let step = 2.0 * amax / ((1u32 << bits) - 1) as f32;
                            0.5 * step * 2f32.powf(2.0 / 16.0) * 1.0001
                        }
                        // Symmetric: half a step, the step at most 2^(1/16) above
                        // max |x| / (levels / 2) (log code rounded up).
                        TokenCodec::IntS { bits, .. } => {
                            let step = 2.0 * amax / ((1u32 << bits) - 1) as f32;
                            0.5 * step * 2f32.powf(1.0 / 16.0) * 1.0001
                        }
                    };
                    assert!(
                        (a - b).abs() <= tol,
                        "{c:?} elem {i}: {a} -> {b} (tol {tol})"
                    );
                }
            }
        }
    }

    #[test]
    fn round_half_away_equals_round() {
        let mut s = 0x5eed_1234_abcd_0001u64;
        let mut xs: Vec<f32> = vec![
            0.0,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            0.49999997,
            -0.49999997,
            8388607.5,
            8388608.0,
            -8388609.0,
            1e30,
            -1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-40,
            -1e-40,
            2147483648.0,
            -2147483904.0,
            0.3,
            -0.3,
        ];
        for i in 0..20000 {
            let m = 10f32.powi(i % 9 - 2);
            xs.push(rng(&mut s) * m);
            xs.push((rng(&mut s) * 64.0).round() + 0.5);
        }
        for x in xs {
            let (a, b) = (round_half_away(x), x.round());
            assert_eq!(a.to_bits(), b.to_bits(), "{x}: {a} vs {b}");
        }
        assert!(round_half_away(f32::NAN).is_nan());
    }

    #[test]
    fn record_bytes_count_metadata() {
        assert_eq!(TokenCodec::Fp8(Fp8Kind::E4M3).record_bytes(64), 65);
        let s = TokenCodec::Fp8Static {
            kind: Fp8Kind::E4M3,
            exp: -2,
        };
        assert_eq!((s.record_bytes(64), s.name(64)), (64, "fp8s-2".to_string()));
        assert_eq!(
            TokenCodec::Int { bits: 4, group: 32 }.record_bytes(64),
            32 + 8
        );
        assert_eq!(
            TokenCodec::Int { bits: 2, group: 64 }.record_bytes(64),
            16 + 4
        );
        assert_eq!(TokenCodec::Int { bits: 8, group: 64 }.name(64), "int8");
        assert_eq!(TokenCodec::Int { bits: 4, group: 32 }.name(64), "int4g32");
        // Symmetric: codes plus one step byte per group.
        let s2 = TokenCodec::IntS { bits: 2, group: 32 };
        assert_eq!(
            (s2.record_bytes(64), s2.name(64)),
            (18, "int2sg32".to_string())
        );
        let s4 = TokenCodec::IntS { bits: 4, group: 64 };
        assert_eq!(
            (s4.record_bytes(64), s4.name(64)),
            (33, "int4s".to_string())
        );
    }

    /// `fit=mse`: the least-squares grid is never worse than min/max (measured through the real
    /// record, encode then decode), and clearly better on Gaussian-like data with a tail,
    /// where clipping pays; inputs that min/max represents exactly (constant, or two values
    /// an f16-exact step apart) stay exact.
    #[test]
    fn mse_fit_never_worse_than_minmax() {
        let mut s = 0x0bad_cafe_1234_5678u64;
        let (mut sum_mm, mut sum_mse) = (0f64, 0f64);
        for bits in [2u8, 4] {
            for group in [16usize, 32, 64] {
                let c = TokenCodec::Int { bits, group };
                for trial in 0..200 {
                    // Sum of 4 uniforms (bell-shaped), sometimes with one outlier.
                    let x: Vec<f32> = (0..64)
                        .map(|i| {
                            let b: f32 = (0..4).map(|_| rng(&mut s)).sum();
                            if trial % 3 == 0 && i == 7 {
                                b * 4.0
                            } else {
                                b + 0.5
                            }
                        })
                        .collect();
                    let err = |mse: bool| {
                        let mut rec = vec![0u8; c.record_bytes(64)];
                        c.encode_fit(&x, &mut rec, mse);
                        let mut y = vec![0f32; 64];
                        c.decode(&rec, &mut y, &mut [0u16; 64]);
                        x.iter()
                            .zip(&y)
                            .map(|(a, b)| ((a - b) as f64).powi(2))
                            .sum::<f64>()
                    };
                    let (mm, ms) = (err(false), err(true));
                    assert!(
                        ms <= mm * (1.0 + 1e-6),
                        "bits {bits} group {group}: {ms} > {mm}"
                    );
                    if bits == 2 {
                        sum_mm += mm;
                        sum_mse += ms;
                    }
                }
            }
        }
        assert!(
            sum_mse < 0.8 * sum_mm,
            "2-bit MSE fit gains too little: {sum_mse} vs {sum_mm}"
        );
        for x in [
            vec![0.75f32; 32],
            (0..32).map(|i| (i % 2) as f32 * 3.0).collect(),
        ] {
            let c = TokenCodec::Int { bits: 2, group: 32 };
            let mut rec = vec![0u8; c.record_bytes(32)];
            c.encode_fit(&x, &mut rec, true);
            let mut y = vec![0f32; 32];
            c.decode(&rec, &mut y, &mut [0u16; 32]);
            assert_eq!(x, y);
        }
    }
}
