//! The original ggml 32-element blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.
//!
//! Callers (`super::quantize` / `super::dequantize`) have checked that `bytes.len()` equals
//! the row size of `out.len()` / `x.len()` elements, and that quantizer input is finite.

use super::{f16_bits, f16_le};

const QK: usize = 32;

/// Split `bytes` into `N`-byte blocks paired with 32-element output blocks.
#[inline(always)]
fn blocks<'a, const N: usize>(
    bytes: &'a [u8],
    out: &'a mut [f32],
) -> impl Iterator<Item = (&'a [u8; N], &'a mut [f32; QK])> {
    bytes
        .chunks_exact(N)
        .zip(out.chunks_exact_mut(QK))
        .map(|(b, o)| {
            (
                b.try_into().expect("N-byte chunk"),
                o.try_into().expect("32-element chunk"),
            )
        })
}

/// Input blocks paired with output byte blocks.
#[inline(always)]
fn qblocks<'a, const N: usize>(
    x: &'a [f32],
    out: &'a mut [u8],
) -> impl Iterator<Item = (&'a [f32; QK], &'a mut [u8; N])> {
    x.chunks_exact(QK)
        .zip(out.chunks_exact_mut(N))
        .map(|(v, o)| {
            (
                v.try_into().expect("32-element chunk"),
                o.try_into().expect("N-byte chunk"),
            )
        })
}

/// Signed value of the largest |x| (first strict maximum, starting from +0.0).
#[inline(always)]
fn signed_absmax(x: &[f32; QK]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

#[inline(always)]
fn min_max(x: &[f32; QK]) -> (f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// C `roundf` (round half away from zero) for |v| < 2^23, the range Q8_0 codes live in,
/// without the libm call: `v - trunc(v)` is exact there. Saturates like `as` outside it.
#[inline(always)]
fn round_half_away(v: f32) -> i32 {
    if v.is_nan() || v.abs() >= 8_388_608.0 {
        // Already integral (or NaN / out of range): saturate like `as`.
        return v as i32;
    }
    let t = v as i32;
    let frac = v - t as f32;
    t + (frac >= 0.5) as i32 - (frac <= -0.5) as i32
}

/// Q4_0: `d`, `qs[16]`; element j in the low nibble of qs[j], j+16 in the high nibble.
pub(super) fn dequant_q4_0(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in blocks::<18>(bytes, out) {
        let d = f16_le(b[0], b[1]);
        let qs = &b[2..18];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            lo[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
            hi[j] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

pub(super) fn quant_q4_0(x: &[f32], out: &mut [u8]) {
    for (v, b) in qblocks::<18>(x, out) {
        let max = signed_absmax(v);
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b[0..2].copy_from_slice(&f16_bits(d));
        for j in 0..16 {
            let x0 = v[j] * id;
            let x1 = v[16 + j] * id;
            // (int8_t) truncation, then MIN(15, .) stored as uint8_t.
            let q0 = ((x0 + 8.5) as i8).min(15) as u8;
            let q1 = ((x1 + 8.5) as i8).min(15) as u8;
            b[2 + j] = q0 | (q1 << 4);
        }
    }
}

/// Q4_1: `d`, `m`, `qs[16]`; x = d·q + m.
pub(super) fn dequant_q4_1(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in blocks::<20>(bytes, out) {
        let d = f16_le(b[0], b[1]);
        let m = f16_le(b[2], b[3]);
        let qs = &b[4..20];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            lo[j] = (qs[j] & 0x0f) as f32 * d + m;
            hi[j] = (qs[j] >> 4) as f32 * d + m;
        }
    }
}

pub(super) fn quant_q4_1(x: &[f32], out: &mut [u8]) {
    for (v, b) in qblocks::<20>(x, out) {
        let (min, max) = min_max(v);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b[0..2].copy_from_slice(&f16_bits(d));
        b[2..4].copy_from_slice(&f16_bits(min));
        for j in 0..16 {
            let x0 = (v[j] - min) * id;
            let x1 = (v[16 + j] - min) * id;
            let q0 = ((x0 + 0.5) as i8).min(15) as u8;
            let q1 = ((x1 + 0.5) as i8).min(15) as u8;
            b[4 + j] = q0 | (q1 << 4);
        }
    }
}

/// Q5_0: `d`, `qh[4]` (bit j = 5th bit of element j, little-endian u32), `qs[16]`.
pub(super) fn dequant_q5_0(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in blocks::<22>(bytes, out) {
        let d = f16_le(b[0], b[1]);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            lo[j] = (((qs[j] & 0x0f) as u32 | h0) as i32 - 16) as f32 * d;
            hi[j] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
        }
    }
}

pub(super) fn quant_q5_0(x: &[f32], out: &mut [u8]) {
    for (v, b) in qblocks::<22>(x, out) {
        let max = signed_absmax(v);
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b[0..2].copy_from_slice(&f16_bits(d));
        let mut qh = 0u32;
        for j in 0..16 {
            let x0 = v[j] * id;
            let x1 = v[16 + j] * id;
            let q0 = ((x0 + 16.5) as i8).min(31) as u8;
            let q1 = ((x1 + 16.5) as i8).min(31) as u8;
            b[6 + j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
            qh |= (((q0 & 0x10) >> 4) as u32) << j;
            qh |= (((q1 & 0x10) >> 4) as u32) << (j + 16);
        }
        b[2..6].copy_from_slice(&qh.to_le_bytes());
    }
}

/// Q5_1: `d`, `m`, `qh[4]`, `qs[16]`; x = d·q + m.
pub(super) fn dequant_q5_1(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in blocks::<24>(bytes, out) {
        let d = f16_le(b[0], b[1]);
        let m = f16_le(b[2], b[3]);
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let qs = &b[8..24];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            lo[j] = ((qs[j] & 0x0f) as u32 | h0) as f32 * d + m;
            hi[j] = ((qs[j] >> 4) as u32 | h1) as f32 * d + m;
        }
    }
}

pub(super) fn quant_q5_1(x: &[f32], out: &mut [u8]) {
    for (v, b) in qblocks::<24>(x, out) {
        let (min, max) = min_max(v);
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b[0..2].copy_from_slice(&f16_bits(d));
        b[2..4].copy_from_slice(&f16_bits(min));
        let mut qh = 0u32;
        for j in 0..16 {
            let x0 = (v[j] - min) * id;
            let x1 = (v[16 + j] - min) * id;
            let q0 = (x0 + 0.5) as u8;
            let q1 = (x1 + 0.5) as u8;
            b[8 + j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
            qh |= (((q0 & 0x10) >> 4) as u32) << j;
            qh |= (((q1 & 0x10) >> 4) as u32) << (j + 16);
        }
        b[4..8].copy_from_slice(&qh.to_le_bytes());
    }
}

/// Q8_0: `d`, `qs[32]` int8; x = d·q.
pub(super) fn dequant_q8_0(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in blocks::<34>(bytes, out) {
        let d = f16_le(b[0], b[1]);
        let qs: &[u8; 32] = b[2..34].try_into().expect("32 bytes");
        for j in 0..32 {
            y[j] = (qs[j] as i8) as f32 * d;
        }
    }
}

pub(super) fn quant_q8_0(x: &[f32], out: &mut [u8]) {
    for (v, b) in qblocks::<34>(x, out) {
        let mut amax = 0.0f32;
        for &e in v {
            amax = amax.max(e.abs());
        }
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b[0..2].copy_from_slice(&f16_bits(d));
        let q: &mut [u8; 32] = (&mut b[2..34]).try_into().expect("32 bytes");
        for j in 0..32 {
            q[j] = round_half_away(v[j] * id) as i8 as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    //! Plain per-element reference decoders (written straight from the block layout) that
    //! the vectorizable loops above must match bit for bit.
    use super::*;

    fn refdeq(ty: usize, b: &[u8], n: usize) -> Vec<f32> {
        let h = |i: usize| half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32();
        let mut y = vec![0.0; n];
        let tsz = [18, 20, 22, 24, 34][ty];
        for blk in 0..n / 32 {
            let o = blk * tsz;
            for e in 0..32 {
                let nib = |qs: usize| {
                    let byte = b[o + qs + (e % 16)];
                    if e < 16 {
                        byte & 15
                    } else {
                        byte >> 4
                    }
                };
                let high = |qh: usize| {
                    let w = u32::from_le_bytes(b[o + qh..o + qh + 4].try_into().unwrap());
                    ((w >> e) & 1) as u8
                };
                y[blk * 32 + e] = match ty {
                    0 => h(o) * (nib(2) as f32 - 8.0),
                    1 => h(o) * nib(4) as f32 + h(o + 2),
                    2 => h(o) * ((nib(6) | (high(2) << 4)) as f32 - 16.0),
                    3 => h(o) * (nib(8) | (high(4) << 4)) as f32 + h(o + 2),
                    _ => h(o) * (b[o + 2 + e] as i8) as f32,
                };
            }
        }
        y
    }

    #[test]
    fn round_half_away_matches_roundf() {
        let mut v = -130.0f32;
        while v <= 130.0 {
            for x in [
                v,
                f32::from_bits(v.to_bits() + 1),
                f32::from_bits(v.to_bits().wrapping_sub(1)),
            ] {
                assert_eq!(round_half_away(x), x.round() as i32, "{x}");
            }
            v += 0.25;
        }
        for x in [
            0.49999997f32,
            -0.49999997,
            0.5,
            -0.5,
            1e-30,
            -0.0,
            126.5,
            -127.5,
        ] {
            assert_eq!(round_half_away(x), x.round() as i32, "{x}");
        }
    }

    #[test]
    fn fast_dequant_matches_plain_reference() {
        // Deterministic pseudo-random bytes; scales forced to finite f16 values.
        let mut s = 0x1234_5678_9abc_def0u64;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        };
        type Deq = fn(&[u8], &mut [f32]);
        let fns: [Deq; 5] = [
            dequant_q4_0,
            dequant_q4_1,
            dequant_q5_0,
            dequant_q5_1,
            dequant_q8_0,
        ];
        for (ty, f) in fns.iter().enumerate() {
            let tsz = [18, 20, 22, 24, 34][ty];
            let mut b: Vec<u8> = (0..tsz * 8).map(|_| rnd()).collect();
            for blk in 0..8 {
                b[blk * tsz + 1] &= 0x3b; // keep d (and m) finite
                if ty == 1 || ty == 3 {
                    b[blk * tsz + 3] &= 0xbb;
                }
            }
            let mut y = vec![0.0; 256];
            f(&b, &mut y);
            let want = refdeq(ty, &b, 256);
            for (a, w) in y.iter().zip(&want) {
                assert_eq!(a.to_bits(), w.to_bits(), "type {ty}");
            }
        }
    }
}
