//! Integer element codecs: signed and unsigned INT2..INT8 with a scale and an integer zero point.
//!
//! Affine quantization, as in the GPTQ / AutoGPTQ quantizer and PyTorch's fake-quant:
//!
//! ```text
//! q   = clamp(round(x / scale) + zero_point, qmin, qmax)
//! x'  = scale * (q - zero_point)
//! ```
//!
//! * `x / scale` is one f32 division (not a multiplication by a reciprocal), then rounded with
//!   [`Rounding::NearestEven`] (torch.round, GPTQ), [`Rounding::NearestAway`] (C `roundf`,
//!   ggml's Q8_0) or stochastically ([`IntFormat::quantize_stochastic`]). The zero point is
//!   added after rounding, so it never moves a tie.
//! * Range: signed `[-2^(b-1), 2^(b-1) - 1]`, unsigned `[0, 2^b - 1]`; out-of-range values and
//!   ±Inf clamp (saturate). Use [`IntFormat::symmetric`] for the symmetric range
//!   `[-(2^(b-1) - 1), 2^(b-1) - 1]` that never uses the most negative code.
//! * NaN input: [`IntFormat::quantize`] returns the zero point (the code of 0.0) — documented,
//!   because integer formats have no NaN; [`IntFormat::quantize_checked`] and
//!   [`quantize_int_slice`] return [`Error::NanInput`] instead.
//! * Scale: must be finite and > 0 (checked by the `_checked` and slice functions,
//!   [`Error::Invalid`] otherwise); a zero point must lie in `[qmin, qmax]`.
//! * Codes: [`IntFormat::to_code`] stores a value in the low `bits` of a byte, two's
//!   complement for signed formats; [`IntFormat::from_code`] sign-extends back.

use crate::error::{Error, Result};
use crate::rounding::{round_f32, round_stochastic_f32, sr_bits, Rounding};

/// An integer element format of 2..=8 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IntFormat {
    bits: u8,
    signed: bool,
    restricted: bool,
}

impl IntFormat {
    /// A format of `bits` (2..=8), signed (two's complement range) or unsigned.
    pub fn new(bits: u32, signed: bool) -> Result<Self> {
        if !(2..=8).contains(&bits) {
            return Err(Error::Invalid(format!("integer width {bits} not in 2..=8")));
        }
        Ok(IntFormat {
            bits: bits as u8,
            signed,
            restricted: false,
        })
    }

    /// Signed `bits`-bit integers, full two's-complement range `[-2^(b-1), 2^(b-1)-1]`.
    pub fn signed(bits: u32) -> Result<Self> {
        Self::new(bits, true)
    }

    /// Unsigned `bits`-bit integers `[0, 2^b - 1]`.
    pub fn unsigned(bits: u32) -> Result<Self> {
        Self::new(bits, false)
    }

    /// Signed with the symmetric (restricted) range `[-(2^(b-1)-1), 2^(b-1)-1]`.
    pub fn symmetric(bits: u32) -> Result<Self> {
        Ok(IntFormat {
            restricted: true,
            ..Self::new(bits, true)?
        })
    }

    /// Width in bits.
    pub fn bits(self) -> u32 {
        self.bits as u32
    }

    /// Whether values are signed.
    pub fn is_signed(self) -> bool {
        self.signed
    }

    /// Smallest representable integer.
    pub fn qmin(self) -> i32 {
        match (self.signed, self.restricted) {
            (false, _) => 0,
            (true, false) => -(1 << (self.bits - 1)),
            (true, true) => -(1 << (self.bits - 1)) + 1,
        }
    }

    /// Largest representable integer.
    pub fn qmax(self) -> i32 {
        if self.signed {
            (1 << (self.bits - 1)) - 1
        } else {
            (1 << self.bits) - 1
        }
    }

    /// Name such as `int4`, `uint8`, `int4sym`.
    pub fn name(self) -> String {
        match (self.signed, self.restricted) {
            (false, _) => format!("uint{}", self.bits),
            (true, false) => format!("int{}", self.bits),
            (true, true) => format!("int{}sym", self.bits),
        }
    }

    /// Quantize with a deterministic rounding mode (see module docs; NaN → `zero_point`).
    #[inline(always)]
    pub fn quantize(self, x: f32, scale: f32, zero_point: i32, rounding: Rounding) -> i32 {
        self.finish(round_f32(x / scale, rounding), zero_point)
    }

    /// Quantize with unbiased stochastic rounding of `x / scale` using 32 random bits
    /// (see [`crate::rounding::round_stochastic_f32`]); unbiased for values inside the range.
    #[inline(always)]
    pub fn quantize_stochastic(self, x: f32, scale: f32, zero_point: i32, random: u32) -> i32 {
        self.finish(round_stochastic_f32(x / scale, random), zero_point)
    }

    #[inline(always)]
    fn finish(self, r: f32, zero_point: i32) -> i32 {
        if r.is_nan() {
            return zero_point.clamp(self.qmin(), self.qmax());
        }
        // Clamp in f32 first so the cast is exact and cannot saturate at i32 bounds.
        // i64 so that a hostile zero point cannot overflow; lo <= hi always.
        let zp = zero_point as i64;
        let lo = (self.qmin() as i64 - zp) as f32;
        let hi = (self.qmax() as i64 - zp) as f32;
        (r.clamp(lo, hi) as i64 + zp).clamp(self.qmin() as i64, self.qmax() as i64) as i32
    }

    /// Like [`quantize`](Self::quantize) but rejects NaN input, non-positive / non-finite
    /// scales and zero points outside `[qmin, qmax]`.
    pub fn quantize_checked(
        self,
        x: f32,
        scale: f32,
        zero_point: i32,
        rounding: Rounding,
    ) -> Result<i32> {
        self.check_params(scale, zero_point)?;
        if x.is_nan() {
            return Err(Error::NanInput {
                format: "int",
                index: 0,
            });
        }
        Ok(self.quantize(x, scale, zero_point, rounding))
    }

    fn check_params(self, scale: f32, zero_point: i32) -> Result<()> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::Invalid(format!(
                "integer scale must be finite and > 0, got {scale}"
            )));
        }
        if zero_point < self.qmin() || zero_point > self.qmax() {
            return Err(Error::Invalid(format!(
                "zero point {zero_point} outside [{}, {}] of {}",
                self.qmin(),
                self.qmax(),
                self.name()
            )));
        }
        Ok(())
    }

    /// Reconstruct `scale * (q - zero_point)`.
    #[inline(always)]
    pub fn dequantize(self, q: i32, scale: f32, zero_point: i32) -> f32 {
        scale * (q - zero_point) as f32
    }

    /// Store `q` in the low `bits` of a byte (two's complement for signed formats).
    #[inline(always)]
    pub fn to_code(self, q: i32) -> u8 {
        (q as u8) & ((1u16 << self.bits) - 1) as u8
    }

    /// Inverse of [`to_code`](Self::to_code) (sign-extends signed formats; ignores high bits).
    #[inline(always)]
    pub fn from_code(self, code: u8) -> i32 {
        let m = ((1u16 << self.bits) - 1) as u8;
        let c = (code & m) as i32;
        if self.signed && c >= 1 << (self.bits - 1) {
            c - (1 << self.bits)
        } else {
            c
        }
    }
}

/// How a slice quantizer rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntRounding {
    /// A deterministic mode.
    Nearest(Rounding),
    /// Stochastic rounding with `sr_bits(seed, first_index + i)` for element `i`.
    Stochastic {
        /// Stream seed.
        seed: u64,
        /// Flat index of the slice's first element in the whole tensor.
        first_index: u64,
    },
}

/// Quantize a slice with one scale and zero point into integers (one `i32` per element).
/// Errors: length mismatch, invalid scale / zero point, NaN input (with its index).
pub fn quantize_int_slice(
    fmt: IntFormat,
    xs: &[f32],
    scale: f32,
    zero_point: i32,
    rounding: IntRounding,
    out: &mut [i32],
) -> Result<()> {
    if xs.len() != out.len() {
        return Err(Error::BufferSize {
            what: "integer output",
            expected: xs.len(),
            got: out.len(),
        });
    }
    fmt.check_params(scale, zero_point)?;
    if let Some(index) = xs.iter().position(|x| x.is_nan()) {
        return Err(Error::NanInput {
            format: "int",
            index,
        });
    }
    match rounding {
        IntRounding::Nearest(r) => {
            for (o, &x) in out.iter_mut().zip(xs) {
                *o = fmt.quantize(x, scale, zero_point, r);
            }
        }
        IntRounding::Stochastic { seed, first_index } => {
            for (i, (o, &x)) in out.iter_mut().zip(xs).enumerate() {
                let r = sr_bits(seed, first_index + i as u64);
                *o = fmt.quantize_stochastic(x, scale, zero_point, r);
            }
        }
    }
    Ok(())
}

/// Dequantize integers with one scale and zero point; lengths must match.
pub fn dequantize_int_slice(
    fmt: IntFormat,
    qs: &[i32],
    scale: f32,
    zero_point: i32,
    out: &mut [f32],
) -> Result<()> {
    if qs.len() != out.len() {
        return Err(Error::BufferSize {
            what: "f32 output",
            expected: qs.len(),
            got: out.len(),
        });
    }
    for (o, &q) in out.iter_mut().zip(qs) {
        *o = fmt.dequantize(q, scale, zero_point);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let i4 = IntFormat::signed(4).unwrap();
        assert_eq!((i4.qmin(), i4.qmax()), (-8, 7));
        let u4 = IntFormat::unsigned(4).unwrap();
        assert_eq!((u4.qmin(), u4.qmax()), (0, 15));
        let s4 = IntFormat::symmetric(4).unwrap();
        assert_eq!((s4.qmin(), s4.qmax()), (-7, 7));
        let i2 = IntFormat::signed(2).unwrap();
        assert_eq!((i2.qmin(), i2.qmax()), (-2, 1));
        assert!(IntFormat::signed(1).is_err());
        assert!(IntFormat::unsigned(9).is_err());
    }

    #[test]
    fn rounding_modes_and_clamping() {
        let i8f = IntFormat::signed(8).unwrap();
        let ne = Rounding::NearestEven;
        let na = Rounding::NearestAway;
        assert_eq!(i8f.quantize(2.5, 1.0, 0, ne), 2);
        assert_eq!(i8f.quantize(2.5, 1.0, 0, na), 3);
        assert_eq!(i8f.quantize(-2.5, 1.0, 0, na), -3);
        assert_eq!(i8f.quantize(1e9, 1.0, 0, ne), 127);
        assert_eq!(i8f.quantize(f32::NEG_INFINITY, 1.0, 0, ne), -128);
        assert_eq!(i8f.quantize(f32::NAN, 1.0, 3, ne), 3);
        let u4 = IntFormat::unsigned(4).unwrap();
        // zero point added after rounding: 0.5 -> 0 (even) + 8
        assert_eq!(u4.quantize(0.5, 1.0, 8, ne), 8);
        assert_eq!(u4.quantize(-100.0, 0.5, 8, ne), 0);
        assert_eq!(u4.dequantize(15, 0.5, 8), 3.5);
        assert!(u4.quantize_checked(f32::NAN, 1.0, 8, ne).is_err());
        assert!(u4.quantize_checked(1.0, 0.0, 8, ne).is_err());
        assert!(u4.quantize_checked(1.0, 1.0, 16, ne).is_err());
    }

    #[test]
    fn codes_round_trip() {
        for bits in 2..=8 {
            for signed in [false, true] {
                let f = IntFormat::new(bits, signed).unwrap();
                for q in f.qmin()..=f.qmax() {
                    let c = f.to_code(q);
                    assert!((c as u32) < (1 << bits));
                    assert_eq!(f.from_code(c), q);
                }
            }
        }
    }

    #[test]
    fn slice_errors_and_stochastic_chunking() {
        let f = IntFormat::signed(4).unwrap();
        let xs: Vec<f32> = (0..100).map(|i| (i as f32 - 50.0) * 0.037).collect();
        let mut whole = vec![0; 100];
        let sr = |first_index| IntRounding::Stochastic {
            seed: 9,
            first_index,
        };
        quantize_int_slice(f, &xs, 0.3, 0, sr(0), &mut whole).unwrap();
        let mut a = vec![0; 40];
        let mut b = vec![0; 60];
        quantize_int_slice(f, &xs[..40], 0.3, 0, sr(0), &mut a).unwrap();
        quantize_int_slice(f, &xs[40..], 0.3, 0, sr(40), &mut b).unwrap();
        a.extend(b);
        assert_eq!(a, whole);
        let mut bad = xs.clone();
        bad[7] = f32::NAN;
        assert_eq!(
            quantize_int_slice(f, &bad, 0.3, 0, sr(0), &mut whole),
            Err(Error::NanInput {
                format: "int",
                index: 7
            })
        );
        assert!(quantize_int_slice(f, &xs, 0.3, 0, sr(0), &mut whole[..3]).is_err());
    }
}
