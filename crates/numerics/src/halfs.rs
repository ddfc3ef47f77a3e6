//! BF16 and FP16 conversions (through the `half` crate), with the NaN handling of the
//! reference libraries made explicit.
//!
//! Finite values and ±Inf use `half`'s IEEE round-to-nearest-even conversion (overflow → ±Inf,
//! gradual underflow, ±0 kept). `half` quiets NaNs by setting the top mantissa bit and keeping
//! the high payload bits, which is what torch does for f16 but differs from the references
//! lowbit is checked against, so NaN inputs are mapped here:
//! * [`f32_to_bf16_bits`]: ml_dtypes — every NaN becomes the canonical quiet NaN with the
//!   input's sign (`0x7FC0` / `0xFFC0`).
//! * [`f32_to_f16_bits`]: numpy — the payload's top 10 bits are kept as they are (no quiet bit
//!   forced); a payload that would become zero is replaced by 1 (`0x7C01`) so it stays NaN.
//!
//! The `_torch` variants give torch 2.x CPU `.to(dtype)` results: bf16 NaN → `0xFFFF`, f16
//! as `half` (quiet bit set, payload kept).

use crate::error::{Error, Result};
use half::{bf16, f16};

/// f32 → bf16 bit pattern, round-to-nearest-even (ml_dtypes-compatible, including NaN).
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if b & 0x7FFF_FFFF > 0x7F80_0000 {
        ((b >> 16) as u16 & 0x8000) | 0x7FC0
    } else {
        bf16::from_f32(x).to_bits()
    }
}

/// f32 → bf16 bit pattern as torch CPU does it (NaN → `0xFFFF`, otherwise RNE).
pub fn f32_to_bf16_bits_torch(x: f32) -> u16 {
    if x.is_nan() {
        0xFFFF
    } else {
        bf16::from_f32(x).to_bits()
    }
}

/// bf16 bit pattern → f32 (exact).
#[inline(always)]
pub fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 → f16 bit pattern, round-to-nearest-even (numpy-compatible, including NaN payloads).
#[inline(always)]
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if b & 0x7FFF_FFFF > 0x7F80_0000 {
        let sign = (b >> 16) as u16 & 0x8000;
        let payload = ((b & 0x7F_FFFF) >> 13) as u16;
        sign | 0x7C00 | if payload == 0 { 1 } else { payload }
    } else {
        f16::from_f32(x).to_bits()
    }
}

/// f32 → f16 bit pattern as torch CPU does it (NaN: quiet bit set, high payload bits kept).
pub fn f32_to_f16_bits_torch(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

/// f16 bit pattern → f32 (exact).
#[inline(always)]
pub fn f16_bits_to_f32(b: u16) -> f32 {
    f16::from_bits(b).to_f32()
}

fn check_len(what: &'static str, a: usize, b: usize) -> Result<()> {
    if a != b {
        return Err(Error::BufferSize {
            what,
            expected: a,
            got: b,
        });
    }
    Ok(())
}

/// Convert a slice to bf16 bit patterns ([`f32_to_bf16_bits`]); lengths must match.
pub fn encode_bf16_slice(xs: &[f32], out: &mut [u16]) -> Result<()> {
    check_len("bf16 output", xs.len(), out.len())?;
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = f32_to_bf16_bits(x);
    }
    Ok(())
}

/// Convert bf16 bit patterns to f32; lengths must match.
pub fn decode_bf16_slice(codes: &[u16], out: &mut [f32]) -> Result<()> {
    check_len("f32 output", codes.len(), out.len())?;
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = bf16_bits_to_f32(c);
    }
    Ok(())
}

/// Convert a slice to f16 bit patterns ([`f32_to_f16_bits`]); lengths must match.
pub fn encode_f16_slice(xs: &[f32], out: &mut [u16]) -> Result<()> {
    check_len("f16 output", xs.len(), out.len())?;
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = f32_to_f16_bits(x);
    }
    Ok(())
}

/// Convert f16 bit patterns to f32; lengths must match.
pub fn decode_f16_slice(codes: &[u16], out: &mut [f32]) -> Result<()> {
    check_len("f32 output", codes.len(), out.len())?;
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = f16_bits_to_f32(c);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Independent RNE reference for bf16 via f64 arithmetic on the neighbours.
    fn bf16_ref(x: f32) -> u16 {
        let b = x.to_bits();
        let lo = (b >> 16) as u16; // truncation (toward zero in magnitude)
        let hi = lo.wrapping_add(1);
        let vx = x as f64;
        let vlo = bf16_bits_to_f32(lo) as f64;
        let vhi = if hi & 0x7FFF == 0x7F80 {
            f64::INFINITY
        } else {
            bf16_bits_to_f32(hi) as f64
        };
        let (dlo, dhi) = ((vx - vlo).abs(), (vhi - vx).abs());
        // The overflow threshold: halfway between max and 2^128 rounds to Inf (IEEE).
        let vhi_eff = if vhi.is_infinite() {
            vlo + 2f64.powi(120) * vlo.signum()
        } else {
            vhi
        };
        let dhi = if vhi.is_infinite() {
            (vhi_eff - vx).abs()
        } else {
            dhi
        };
        if dlo < dhi || (dlo == dhi && lo & 1 == 0) {
            lo
        } else {
            hi
        }
    }

    #[test]
    fn bf16_matches_f64_reference_on_a_sweep() {
        let mut b: u32 = 1;
        while b < 0x7F80_0000 {
            for s in [0u32, 0x8000_0000] {
                let x = f32::from_bits(b | s);
                assert_eq!(f32_to_bf16_bits(x), bf16_ref(x), "{:#x}", b | s);
            }
            b = b.wrapping_add(0x3FFF);
        }
        // exact ties
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F80_8000)), 0x3F80);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F81_8000)), 0x3F82);
    }

    /// Independent RNE reference for f16: binary search over the ordered positive codes, then
    /// nearest in f64 (ties to the even code); 0x7C00 stands for the virtual value 65536, so a
    /// value rounding to it overflows to Inf as IEEE specifies.
    fn f16_ref(x: f32) -> u16 {
        let sign = if x.is_sign_negative() { 0x8000 } else { 0 };
        let ax = (x as f64).abs();
        let val = |c: u16| {
            if c == 0x7C00 {
                65536.0
            } else {
                f16_bits_to_f32(c) as f64
            }
        };
        if ax >= 65536.0 {
            return sign | 0x7C00;
        }
        let (mut lo, mut hi) = (0u16, 0x7C00u16); // val(lo) <= ax < val(hi)
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if val(mid) <= ax {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let (dl, dh) = (ax - val(lo), val(hi) - ax);
        sign | if dl < dh || (dl == dh && lo & 1 == 0) {
            lo
        } else {
            hi
        }
    }

    #[test]
    fn f16_matches_f64_reference_on_a_sweep() {
        let mut b: u32 = 0;
        while b < 0x7F80_0000 {
            for s in [0u32, 0x8000_0000] {
                let x = f32::from_bits(b | s);
                assert_eq!(f32_to_f16_bits(x), f16_ref(x), "{:#x}", b | s);
            }
            b += 0x1FFF;
        }
        // ties at every f16 midpoint in [1, 2) and in the subnormal range
        for c in [0x3C00u16, 0x3C01, 0x0001, 0x0002, 0x03FF, 0x7BFE] {
            let m = (f16_bits_to_f32(c) as f64 + f16_bits_to_f32(c + 1) as f64) / 2.0;
            let x = m as f32;
            assert_eq!(x as f64, m);
            assert_eq!(f32_to_f16_bits(x), f16_ref(x));
            assert_eq!(f32_to_f16_bits(x), if c & 1 == 0 { c } else { c + 1 });
        }
    }

    #[test]
    fn nan_policies() {
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x7F80_0001)), 0x7FC0);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0xFFFF_FFFF)), 0xFFC0);
        assert_eq!(f32_to_f16_bits(f32::from_bits(0x7F80_0001)), 0x7C01);
        assert_eq!(f32_to_f16_bits(f32::from_bits(0x7FC0_0000)), 0x7E00);
        assert_eq!(f32_to_bf16_bits_torch(f32::NAN), 0xFFFF);
        assert_eq!(f32_to_f16_bits(65520.0), 0x7C00); // overflow threshold rounds to Inf
        assert_eq!(f32_to_f16_bits(65519.996), 0x7BFF);
        assert_eq!(f32_to_f16_bits(-0.0), 0x8000);
        assert_eq!(f16_bits_to_f32(0x0001), 2f32.powi(-24));
    }

    #[test]
    fn slices_round_trip() {
        let xs = [1.0f32, -2.5, 1e-8, 7e4];
        let mut c = [0u16; 4];
        let mut y = [0f32; 4];
        encode_f16_slice(&xs, &mut c).unwrap();
        decode_f16_slice(&c, &mut y).unwrap();
        assert_eq!(&y[..2], &xs[..2]);
        assert!(y[3].is_infinite());
        encode_bf16_slice(&xs, &mut c).unwrap();
        decode_bf16_slice(&c, &mut y).unwrap();
        assert_eq!(&y[..2], &xs[..2]);
        assert!(encode_bf16_slice(&xs, &mut c[..3]).is_err());
    }
}
