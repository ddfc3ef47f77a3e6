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
/// `2^(1-bias)·0.m` with biases 7 and 15).
#[inline(always)]
fn e4m3_to_f16_bits(c: u8) -> u16 {
    (((c & 0x80) as u16) << 8) | (((c & 0x7f) as u16) << 7)
}

impl TokenCodec {
    /// Bytes of one record of `d` values, metadata included.
    pub fn record_bytes(&self, d: usize) -> usize {
        match *self {
            TokenCodec::F32 => 4 * d,
            TokenCodec::F16 | TokenCodec::Bf16 => 2 * d,
            TokenCodec::Fp8(_) => d + 1,
            TokenCodec::Int { bits, group } => d * bits as usize / 8 + 4 * (d / group),
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
            TokenCodec::Int { bits, group } if group == d => format!("int{bits}"),
            TokenCodec::Int { bits, group } => format!("int{bits}g{group}"),
        }
    }

    /// Encode `x` (`d` values) into `out` (`record_bytes(d)` bytes).
    pub fn encode(&self, x: &[f32], out: &mut [u8]) {
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
            TokenCodec::Int { bits, group } => {
                let gb = group * bits as usize / 8 + 4;
                let levels = ((1u32 << bits) - 1) as f32;
                for (xg, og) in x.chunks_exact(group).zip(out.chunks_exact_mut(gb)) {
                    let (scale, min) = int_params(xg, levels);
                    og[0..2].copy_from_slice(&scale.to_le_bytes());
                    og[2..4].copy_from_slice(&min.to_le_bytes());
                    pack_codes(xg, scale.to_f32(), min.to_f32(), bits, levels, &mut og[4..]);
                }
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
                let e = rec[0] as i32 - 127;
                let t = &mut tmp[..d];
                let mul = match kind {
                    Fp8Kind::E4M3 => {
                        for (o, &c) in t.iter_mut().zip(&rec[1..]) {
                            *o = e4m3_to_f16_bits(c);
                        }
                        2f32.powi(e + 8)
                    }
                    Fp8Kind::E5M2 => {
                        for (o, &c) in t.iter_mut().zip(&rec[1..]) {
                            *o = (c as u16) << 8;
                        }
                        2f32.powi(e)
                    }
                };
                half::slice::HalfBitsSliceExt::reinterpret_cast::<f16>(&*t)
                    .convert_to_f32_slice(out);
                for o in out.iter_mut() {
                    *o *= mul;
                }
            }
            TokenCodec::Int { bits, group } => {
                let gb = group * bits as usize / 8 + 4;
                for (og, rg) in out.chunks_exact_mut(group).zip(rec.chunks_exact(gb)) {
                    let scale = f16::from_le_bytes([rg[0], rg[1]]).to_f32();
                    let min = f16::from_le_bytes([rg[2], rg[3]]).to_f32();
                    unpack_codes(&rg[4..], bits, scale, min, og);
                }
            }
        }
    }
}

impl TokenCodec {
    /// Decode `cnt` records `buf[off + t * step..]` into `out[t * d..][..d]`. FP8 and f16
    /// records go through one half-to-f32 conversion for the whole tile (one call instead of
    /// one per record); other codecs decode record by record. `tmp` is scratch.
    #[inline(always)]
    pub(crate) fn decode_tile(
        &self,
        buf: &[u8],
        off: usize,
        step: usize,
        cnt: usize,
        out: &mut [f32],
        tmp: &mut Vec<u16>,
    ) {
        let d = out.len() / cnt.max(1);
        let ru = self.record_bytes(d);
        match *self {
            TokenCodec::Fp8(kind) => {
                tmp.resize(cnt * d, 0);
                for t in 0..cnt {
                    let rec = &buf[off + t * step..][..ru];
                    let dst = &mut tmp[t * d..][..d];
                    match kind {
                        Fp8Kind::E4M3 => {
                            for (o, &c) in dst.iter_mut().zip(&rec[1..]) {
                                *o = e4m3_to_f16_bits(c);
                            }
                        }
                        Fp8Kind::E5M2 => {
                            for (o, &c) in dst.iter_mut().zip(&rec[1..]) {
                                *o = (c as u16) << 8;
                            }
                        }
                    }
                }
                half::slice::HalfBitsSliceExt::reinterpret_cast::<f16>(&tmp[..cnt * d])
                    .convert_to_f32_slice(&mut out[..cnt * d]);
                let bias = match kind {
                    Fp8Kind::E4M3 => 8,
                    Fp8Kind::E5M2 => 0,
                };
                for t in 0..cnt {
                    let e = buf[off + t * step] as i32 - 127;
                    let mul = 2f32.powi(e + bias);
                    for o in &mut out[t * d..][..d] {
                        *o *= mul;
                    }
                }
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

/// Quantize `x` onto `min + q * scale` (q in 0..=levels) and pack `bits`-bit codes.
pub(crate) fn pack_codes(x: &[f32], scale: f32, min: f32, bits: u8, levels: f32, out: &mut [u8]) {
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let per = 8 / bits as usize;
    for (o, xs) in out.iter_mut().zip(x.chunks(per)) {
        let mut b = 0u8;
        for (j, &v) in xs.iter().enumerate() {
            let q = ((v - min) * inv).round().clamp(0.0, levels) as u8;
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
            for (o, &c) in out.chunks_exact_mut(4).zip(codes) {
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
    fn e4m3_bit_trick_matches_numerics_decode_for_all_finite_codes() {
        for c in 0..=255u8 {
            if c & 0x7f == 0x7f {
                continue; // NaN codes are never produced by the saturating encoder.
            }
            let via = f16::from_bits(e4m3_to_f16_bits(c)).to_f32() * 256.0;
            let want = FloatFormat::E4M3.decode(c);
            assert_eq!(via.to_bits(), want.to_bits(), "code {c:#x}");
        }
        for c in 0..=255u8 {
            let want = FloatFormat::E5M2.decode(c);
            let via = f16::from_bits((c as u16) << 8).to_f32();
            if want.is_nan() {
                assert!(via.is_nan());
            } else {
                assert_eq!(via.to_bits(), want.to_bits(), "code {c:#x}");
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
        ];
        let mut tmp = vec![0u16; d];
        for trial in 0..50 {
            let amp = 10f32.powi(trial % 5 - 2);
            let x: Vec<f32> = (0..d).map(|_| rng(&mut s) * amp).collect();
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            for c in codecs {
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
                        TokenCodec::Int { bits, .. } => {
                            let step = 2.0 * amax / ((1u32 << bits) - 1) as f32;
                            0.5 * step + 0.01 * 2.0 * amax
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
    fn record_bytes_count_metadata() {
        assert_eq!(TokenCodec::Fp8(Fp8Kind::E4M3).record_bytes(64), 65);
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
    }
}
