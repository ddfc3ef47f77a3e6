//! The 4-bit table formats: IQ4_NL (non-linear int8 table, f16 scale), MXFP4 (E2M1 with an
//! E8M0 block scale) and ggml's NVFP4 (E2M1 with four UE4M3 sub-block scales).
//!
//! ggml keeps the E2M1 values doubled (`kvalues_mxfp4` = 2·E2M1, all integers) and halves the
//! block scale instead, so MXFP4/NVFP4 dequantization is `kvalue · (scale / 2)`.
//!
//! Callers have checked sizes and finiteness.

use super::{f16_bits, f16_le};

/// `kvalues_iq4nl`: the IQ4_NL code book.
pub(crate) const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// `kvalues_mxfp4`: twice the E2M1 value of each 4-bit code (sign in bit 3).
pub(crate) const KVALUES_MXFP4: [i8; 16] =
    [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// IQ4_NL: `d` f16, `qs[16]` (element j low nibble of qs[j], j+16 high nibble).
pub(super) fn dequant_iq4_nl(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(18).zip(out.chunks_exact_mut(32)) {
        let d = f16_le(b[0], b[1]);
        let qs: &[u8; 16] = b[2..18].try_into().expect("16");
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            lo[j] = d * KVALUES_IQ4NL[(qs[j] & 0x0f) as usize] as f32;
            hi[j] = d * KVALUES_IQ4NL[(qs[j] >> 4) as usize] as f32;
        }
    }
}

/// ggml's `best_index_int8`: index of the nearest table value (ties to the upper one, values
/// outside the table to its ends).
#[inline]
fn best_index_int8(val: &[i8; 16], x: f32) -> usize {
    if x <= val[0] as f32 {
        return 0;
    }
    if x >= val[15] as f32 {
        return 15;
    }
    let (mut ml, mut mu) = (0usize, 15usize);
    while mu - ml > 1 {
        let mav = (ml + mu) / 2;
        if x < val[mav] as f32 {
            mu = mav;
        } else {
            ml = mav;
        }
    }
    if x - (val[mu - 1] as f32) < val[mu] as f32 - x {
        mu - 1
    } else {
        mu
    }
}

/// IQ4_NL quantizer (`quantize_row_iq4_nl_impl` with one 32-block, no importance matrix,
/// `ntry` = 7): weights x², a least-squares scale refined over 15 candidate inverse scales.
pub(super) fn quant_iq4_nl(x: &[f32], out: &mut [u8]) {
    const NTRY: i32 = 7;
    let values = &KVALUES_IQ4NL;
    for (xb, b) in x.chunks_exact(32).zip(out.chunks_exact_mut(18)) {
        let mut w = [0.0f32; 32];
        let mut amax = 0.0f32;
        let mut max = 0.0f32;
        for (wi, &v) in w.iter_mut().zip(xb) {
            *wi = v * v;
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        let scale = if amax < 1e-15 {
            0.0
        } else {
            let mut d = -max / values[0] as f32;
            let mut id = 1.0 / d;
            let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
            for j in 0..32 {
                let q = values[best_index_int8(values, id * xb[j])] as f32;
                sumqx += w[j] * q * xb[j];
                sumq2 += w[j] * q * q;
            }
            d = sumqx / sumq2;
            let mut best = d * sumqx;
            for itry in -NTRY..=NTRY {
                id = (itry + values[0] as i32) as f32 / max;
                sumqx = 0.0;
                sumq2 = 0.0;
                for j in 0..32 {
                    let q = values[best_index_int8(values, id * xb[j])] as f32;
                    sumqx += w[j] * q * xb[j];
                    sumq2 += w[j] * q * q;
                }
                if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                    d = sumqx / sumq2;
                    best = d * sumqx;
                }
            }
            d
        };
        b[0..2].copy_from_slice(&f16_bits(scale));
        let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        for j in 0..16 {
            let l0 = best_index_int8(values, id * xb[j]) as u8;
            let l1 = best_index_int8(values, id * xb[16 + j]) as u8;
            b[2 + j] = l0 | (l1 << 4);
        }
    }
}

/// `GGML_E8M0_TO_FP32_HALF`: 2^(e−127) / 2, exact (subnormal for e < 2).
#[inline(always)]
fn e8m0_to_f32_half(e: u8) -> f32 {
    if e < 2 {
        f32::from_bits(0x0020_0000u32 << e)
    } else {
        f32::from_bits(((e as u32) - 1) << 23)
    }
}

/// MXFP4: `e` (E8M0), `qs[16]` (j / j+16 nibble order); x = kvalue · 2^(e−127) / 2.
pub(super) fn dequant_mxfp4(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(17).zip(out.chunks_exact_mut(32)) {
        let d = e8m0_to_f32_half(b[0]);
        let qs: &[u8; 16] = b[1..17].try_into().expect("16");
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            lo[j] = KVALUES_MXFP4[(qs[j] & 0x0f) as usize] as f32 * d;
            hi[j] = KVALUES_MXFP4[(qs[j] >> 4) as usize] as f32 * d;
        }
    }
}

/// ggml's `best_index_mxfp4`: nearest `kvalue·d` by absolute error, first index on ties.
#[inline]
fn best_index_fp4(x: f32, d: f32) -> u8 {
    let mut best = 0u8;
    let mut best_err = (KVALUES_MXFP4[0] as f32 * d - x).abs();
    for (i, &k) in KVALUES_MXFP4.iter().enumerate().skip(1) {
        let err = (k as f32 * d - x).abs();
        if err < best_err {
            best = i as u8;
            best_err = err;
        }
    }
    best
}

/// MXFP4 quantizer (`quantize_row_mxfp4_ref`): e = floor(log2 amax) − 2 + 127, nearest value.
pub(super) fn quant_mxfp4(x: &[f32], out: &mut [u8]) {
    for (xb, b) in x.chunks_exact(32).zip(out.chunks_exact_mut(17)) {
        let mut amax = 0.0f32;
        for &v in xb {
            if amax < v.abs() {
                amax = v.abs();
            }
        }
        let e = if amax > 0.0 {
            // log2 correctly rounded to f32 (as glibc's log2f), then floor; the float→uint8_t
            // cast of C wraps through int on x86 for the (out of range) subnormal amax.
            let l = ((amax as f64).log2() as f32).floor();
            (l - 2.0 + 127.0) as i32 as u8
        } else {
            0
        };
        let d = e8m0_to_f32_half(e);
        b[0] = e;
        for j in 0..16 {
            b[1 + j] = best_index_fp4(xb[j], d) | (best_index_fp4(xb[16 + j], d) << 4);
        }
    }
}

/// ggml's `ggml_ue4m3_to_fp32`: unsigned E4M3 (bias 7, subnormals, 0x7F read as 0), halved
/// to match the doubled `kvalues_mxfp4`.
#[inline(always)]
fn ue4m3_to_f32_half(w: u8) -> f32 {
    if w == 0 || w == 0x7f {
        return 0.0;
    }
    let exp = ((w >> 3) & 0x0f) as u32;
    let man = (w & 7) as u32;
    if exp == 0 {
        man as f32 * (1.0 / 1024.0)
    } else {
        // (1 + man/8)·2^(exp−7) / 2
        f32::from_bits(((exp + 127 - 8) << 23) | (man << 20))
    }
}

/// ggml's `ggml_fp32_to_ue4m3`: non-positive → 0, clamp to 448, round the 3-bit mantissa half
/// up (subnormals: round(x·512) clamped to 1..=7), overflow → 0x7E.
fn f32_to_ue4m3(x: f32) -> u8 {
    if x.is_nan() || x <= 0.0 {
        return 0;
    }
    let x = if x > 448.0 { 448.0 } else { x };
    let b = x.to_bits();
    let mut ue = ((b >> 23) & 0xff) as i32 - 127 + 7;
    if ue <= 0 {
        let man = ((x * 512.0 + 0.5) as i32).min(7);
        return if man < 1 { 0 } else { man as u8 };
    }
    if ue >= 15 {
        return 0x7e;
    }
    let mut man = ((b >> 20) & 7) + ((b >> 19) & 1);
    if man > 7 {
        man = 0;
        ue += 1;
        if ue >= 15 {
            return 0x7e;
        }
    }
    ((ue as u8) << 3) | man as u8
}

/// ggml NVFP4 (64 elements, 36 bytes): `d[4]` (UE4M3 per 16-element sub-block), `qs[32]`;
/// in sub-block s, byte 8s+j holds element j (low nibble) and element j+8 (high nibble).
pub(super) fn dequant_nvfp4(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(36).zip(out.chunks_exact_mut(64)) {
        for s in 0..4 {
            let d = ue4m3_to_f32_half(b[s]);
            let qs = &b[4 + 8 * s..12 + 8 * s];
            let ys = &mut y[16 * s..16 * s + 16];
            for j in 0..8 {
                ys[j] = KVALUES_MXFP4[(qs[j] & 0x0f) as usize] as f32 * d;
                ys[j + 8] = KVALUES_MXFP4[(qs[j] >> 4) as usize] as f32 * d;
            }
        }
    }
}

/// NVFP4 quantizer (`quantize_row_nvfp4_ref`): per 16 elements, scale = UE4M3(amax / 6),
/// nearest E2M1 value.
pub(super) fn quant_nvfp4(x: &[f32], out: &mut [u8]) {
    for (xb, b) in x.chunks_exact(64).zip(out.chunks_exact_mut(36)) {
        for s in 0..4 {
            let xs = &xb[16 * s..16 * s + 16];
            let mut amax = 0.0f32;
            for &v in xs {
                if amax < v.abs() {
                    amax = v.abs();
                }
            }
            let ue = f32_to_ue4m3(amax / 6.0);
            b[s] = ue;
            let d = ue4m3_to_f32_half(ue);
            for j in 0..8 {
                b[4 + 8 * s + j] = best_index_fp4(xs[j], d) | (best_index_fp4(xs[j + 8], d) << 4);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ue4m3_codes_decode_to_their_values() {
        // Every code, from the format definition (bias 7, 3 mantissa bits), halved.
        for w in 0u8..0x7f {
            let (e, m) = ((w >> 3) as i32, (w & 7) as f64);
            let v = if e == 0 {
                m / 8.0 * 2f64.powi(-6)
            } else {
                (1.0 + m / 8.0) * 2f64.powi(e - 7)
            };
            assert_eq!(ue4m3_to_f32_half(w) as f64, v / 2.0, "code {w:#x}");
            if w > 0 && w < 0x78 {
                // Encoding a code's own value gives the code back.
                assert_eq!(f32_to_ue4m3(v as f32), w, "code {w:#x}");
            } else if w >= 0x78 {
                // ggml's encoder treats biased exponent 15 as overflow: all of [256, 448] -> 0x7E.
                assert_eq!(f32_to_ue4m3(v as f32), 0x7e, "code {w:#x}");
            }
        }
        assert_eq!(f32_to_ue4m3(1e9), 0x7e);
        assert_eq!(f32_to_ue4m3(-1.0), 0);
        assert_eq!(f32_to_ue4m3(f32::NAN), 0);
    }

    #[test]
    fn e8m0_half_is_power_of_two() {
        for e in 0u8..=254 {
            assert_eq!(
                e8m0_to_f32_half(e) as f64,
                2f64.powi(e as i32 - 128),
                "e {e}"
            );
        }
    }

    #[test]
    fn best_index_int8_picks_nearest() {
        for i in -200..200 {
            let x = i as f32 * 0.75;
            let got = KVALUES_IQ4NL[best_index_int8(&KVALUES_IQ4NL, x)] as f32;
            let best = KVALUES_IQ4NL
                .iter()
                .map(|&k| (k as f32 - x).abs())
                .fold(f32::MAX, f32::min);
            assert_eq!((got - x).abs(), best, "x {x}");
        }
    }
}
