//! Minifloat element formats (FP8, FP6, FP4, E8M0): descriptions and codecs.
//!
//! Every format is described by one [`Spec`]-like set of parameters (exponent bits, mantissa
//! bits, bias, special-value rules) and shares one generic reference encoder,
//! [`FloatFormat::encode_reference`], which follows the ml_dtypes 0.6.0 conversion algorithm
//! step by step (normalise the f32, align the significand to the target grid with the
//! requested rounding, let a rounding carry flow into the exponent, then check overflow). The
//! hot path [`FloatFormat::encode`] (ties-to-even) is a branch-free bit-manipulation version of
//! the same function that the compiler vectorizes; the tests check it against the reference on
//! every code, every midpoint and their f32 neighbours.
//!
//! # Policies (see `docs/formats.md`)
//! * Rounding: [`Rounding::NearestEven`] (all reference libraries) or
//!   [`Rounding::NearestAway`]; stochastic via [`FloatFormat::encode_stochastic`].
//! * Overflow ([`Overflow`]): `NonSaturating` is the ml_dtypes `astype` default: a value that
//!   rounds beyond the largest finite value (and ±Inf) becomes NaN for E4M3 (`S.1111.111`),
//!   ±Inf for E5M2, the saturated ±max for FP6/FP4 (they have neither Inf nor NaN), and NaN
//!   (0xFF) for E8M0. `Saturate` clamps to ±max for every format, ±Inf included
//!   (`__NV_SATFINITE`; torch ≥ 2.12 on CPU for E4M3); E8M0 saturates below to 0x00 (2^-127).
//! * NaN input: E4M3 → `S.1111.111` (sign kept), E5M2 → `S.11111.10` (quiet NaN, sign kept),
//!   E8M0 → 0xFF. FP6/FP4 have no NaN: ml_dtypes maps +NaN → −0 and −NaN → +0 (its
//!   `quiet_NaN()` is the −0 pattern, then the sign is applied); [`FloatFormat::encode`]
//!   reproduces that for bit-exactness, [`FloatFormat::encode_checked`] returns
//!   [`Error::NanInput`] instead. NaN stays NaN under `Saturate`.
//! * Signed zero: ±0 encode to ±0 (`S.000...`), E8M0 has no zero: 0 and negatives → 0xFF
//!   (NaN) when non-saturating, 0x00 (2^-127, its smallest value) when saturating.
//! * Subnormals: all signed formats have gradual underflow (exponent field 0, value
//!   `m * 2^(1 - bias - mbits)`); f32 subnormal inputs are normalised first, so they round to
//!   ±0. E8M0 follows ml_dtypes: values below 2^-126 round on a 2^-126 grid (so `x > 2^-127`
//!   gives code 1, `x <= 2^-127` gives code 0).
//! * Code layout: the code lives in the low `total_bits` bits of a `u8` (FP4 in the low
//!   nibble, FP6 in the low six bits), sign in the top bit of the code.

use crate::error::{Error, Result};
use crate::rounding::{round_shift, RoundBits, Rounding};

/// A minifloat element format, identified by its bit layout and special-value rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FloatFormat {
    /// OCP FP8 E4M3 "FN": bias 7, max 448, no Inf, NaN = S.1111.111.
    E4M3,
    /// OCP FP8 E5M2: bias 15, max 57344, IEEE-style Inf and NaN.
    E5M2,
    /// OCP FP6 E2M3: bias 1, max 7.5, no Inf/NaN.
    E2M3,
    /// OCP FP6 E3M2: bias 3, max 28, no Inf/NaN.
    E3M2,
    /// OCP FP4 E2M1: bias 1, max 6, no Inf/NaN.
    E2M1,
    /// E8M0 scale format: 2^(code-127), 0xFF = NaN, no zero, no sign.
    E8M0,
}

/// What happens to values whose magnitude rounds above the largest finite value (and to ±Inf).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Overflow {
    /// Clamp to ±max finite (±Inf included); NaN stays NaN (`__NV_SATFINITE`).
    Saturate,
    /// The ml_dtypes default cast: NaN for E4M3 and E8M0, ±Inf for E5M2; FP6/FP4 have
    /// neither, so they still saturate.
    #[default]
    NonSaturating,
}

/// How NaN is represented (if at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NanRule {
    /// No NaN code (FP6, FP4).
    None,
    /// Only exponent and mantissa all ones (E4M3 "FN").
    AllOnes,
    /// IEEE: exponent all ones, mantissa non-zero; mantissa zero is Inf (E5M2).
    Ieee,
    /// 0xFF (E8M0).
    E8M0,
}

/// Static description of a format.
#[derive(Debug, Clone, Copy)]
struct Spec {
    mbits: u32,
    bias: i32,
    signed: bool,
    nan: NanRule,
    /// Largest finite magnitude code (code without sign bit).
    max_mag: u32,
    total: u32,
}

const fn spec(f: FloatFormat) -> Spec {
    match f {
        FloatFormat::E4M3 => Spec {
            mbits: 3,
            bias: 7,
            signed: true,
            nan: NanRule::AllOnes,
            max_mag: 0x7E,
            total: 8,
        },
        FloatFormat::E5M2 => Spec {
            mbits: 2,
            bias: 15,
            signed: true,
            nan: NanRule::Ieee,
            max_mag: 0x7B,
            total: 8,
        },
        FloatFormat::E2M3 => Spec {
            mbits: 3,
            bias: 1,
            signed: true,
            nan: NanRule::None,
            max_mag: 0x1F,
            total: 6,
        },
        FloatFormat::E3M2 => Spec {
            mbits: 2,
            bias: 3,
            signed: true,
            nan: NanRule::None,
            max_mag: 0x1F,
            total: 6,
        },
        FloatFormat::E2M1 => Spec {
            mbits: 1,
            bias: 1,
            signed: true,
            nan: NanRule::None,
            max_mag: 0x7,
            total: 4,
        },
        FloatFormat::E8M0 => Spec {
            mbits: 0,
            bias: 127,
            signed: false,
            nan: NanRule::E8M0,
            max_mag: 0xFE,
            total: 8,
        },
    }
}

/// Every format, in a fixed order (for tables, docs and name lookup).
pub const ALL_FLOAT_FORMATS: [FloatFormat; 6] = [
    FloatFormat::E4M3,
    FloatFormat::E5M2,
    FloatFormat::E2M3,
    FloatFormat::E3M2,
    FloatFormat::E2M1,
    FloatFormat::E8M0,
];

/// Decode one code to f32 bits (const so that the 8-bit lookup tables are built at compile time).
const fn decode_bits(f: FloatFormat, code: u8) -> u32 {
    let s = spec(f);
    let code = (code as u32) & ((1u32 << s.total) - 1);
    if let NanRule::E8M0 = s.nan {
        return if code == 0xFF {
            0x7FC0_0000
        } else if code == 0 {
            // 2^-127 is an f32 subnormal.
            0x0040_0000
        } else {
            code << 23
        };
    }
    let sign = if s.signed {
        (code >> (s.total - 1)) & 1
    } else {
        0
    };
    let mag = code & ((1u32 << (s.total - 1)) - 1);
    let e = mag >> s.mbits;
    let m = mag & ((1u32 << s.mbits) - 1);
    let emax_field = (1u32 << (s.total - 1 - s.mbits)) - 1;
    let sign_bits = sign << 31;
    match s.nan {
        NanRule::AllOnes if mag == (1u32 << (s.total - 1)) - 1 => return sign_bits | 0x7FC0_0000,
        NanRule::Ieee if e == emax_field => {
            return if m == 0 {
                sign_bits | 0x7F80_0000
            } else {
                sign_bits | 0x7FC0_0000
            };
        }
        _ => {}
    }
    if e == 0 {
        if m == 0 {
            return sign_bits;
        }
        // Subnormal m * 2^(1 - bias - mbits): normalise (always an f32 normal here).
        let p = 31 - m.leading_zeros(); // position of the leading one
        let exp = p as i32 + 1 - s.bias - s.mbits as i32;
        let frac = (m - (1 << p)) << (23 - p);
        return sign_bits | (((exp + 127) as u32) << 23) | frac;
    }
    let exp = e as i32 - s.bias;
    sign_bits | (((exp + 127) as u32) << 23) | (m << (23 - s.mbits))
}

const fn build_lut(f: FloatFormat) -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = f32::from_bits(decode_bits(f, i as u8));
        i += 1;
    }
    t
}

static LUT_E4M3: [f32; 256] = build_lut(FloatFormat::E4M3);
static LUT_E5M2: [f32; 256] = build_lut(FloatFormat::E5M2);
static LUT_E2M3: [f32; 256] = build_lut(FloatFormat::E2M3);
static LUT_E3M2: [f32; 256] = build_lut(FloatFormat::E3M2);
static LUT_E2M1: [f32; 256] = build_lut(FloatFormat::E2M1);
static LUT_E8M0: [f32; 256] = build_lut(FloatFormat::E8M0);

impl FloatFormat {
    /// Width of one code in bits.
    pub fn total_bits(&self) -> u32 {
        match self {
            FloatFormat::E4M3 | FloatFormat::E5M2 | FloatFormat::E8M0 => 8,
            FloatFormat::E2M3 | FloatFormat::E3M2 => 6,
            FloatFormat::E2M1 => 4,
        }
    }

    /// Exponent field width in bits.
    pub fn exponent_bits(self) -> u32 {
        let s = spec(self);
        s.total - s.mbits - s.signed as u32
    }

    /// Mantissa (trailing significand) field width in bits.
    pub fn mantissa_bits(self) -> u32 {
        spec(self).mbits
    }

    /// Exponent bias.
    pub fn bias(self) -> i32 {
        spec(self).bias
    }

    /// Whether the format has a sign bit (all but E8M0).
    pub fn is_signed(self) -> bool {
        spec(self).signed
    }

    /// Whether the format has infinities (only E5M2).
    pub fn has_inf(self) -> bool {
        matches!(spec(self).nan, NanRule::Ieee)
    }

    /// Whether the format has a NaN code (E4M3, E5M2, E8M0).
    pub fn has_nan(self) -> bool {
        !matches!(spec(self).nan, NanRule::None)
    }

    /// The 256-entry decode table (codes are masked to `total_bits`, so the table repeats for
    /// FP6/FP4 above `2^total_bits`).
    pub fn decode_table(self) -> &'static [f32; 256] {
        match self {
            FloatFormat::E4M3 => &LUT_E4M3,
            FloatFormat::E5M2 => &LUT_E5M2,
            FloatFormat::E2M3 => &LUT_E2M3,
            FloatFormat::E3M2 => &LUT_E3M2,
            FloatFormat::E2M1 => &LUT_E2M1,
            FloatFormat::E8M0 => &LUT_E8M0,
        }
    }

    /// Decode a code (in the low `total_bits` bits; higher bits are ignored) to f32. Exact:
    /// every value of every format is an f32.
    #[inline(always)]
    pub fn decode(self, code: u8) -> f32 {
        self.decode_table()[code as usize]
    }

    /// The same as [`decode`](Self::decode), computed from the bit fields instead of a table.
    pub fn decode_reference(self, code: u8) -> f32 {
        f32::from_bits(decode_bits(self, code))
    }

    /// Largest finite value.
    pub fn max_finite(self) -> f32 {
        self.decode_reference(spec(self).max_mag as u8)
    }

    /// Smallest positive normal value (E8M0: 2^-127, its smallest value).
    pub fn min_normal(self) -> f32 {
        match self {
            FloatFormat::E8M0 => self.decode_reference(0),
            _ => self.decode_reference(1 << spec(self).mbits),
        }
    }

    /// Smallest positive subnormal value (E8M0 has none: 2^-127, its smallest value).
    pub fn min_subnormal(self) -> f32 {
        match self {
            FloatFormat::E8M0 => self.decode_reference(0),
            _ => self.decode_reference(1),
        }
    }

    /// Largest finite code magnitude (without the sign bit).
    pub fn max_code(self) -> u8 {
        spec(self).max_mag as u8
    }

    /// Mask of the sign bit within the code (0 for E8M0).
    pub fn sign_mask(self) -> u8 {
        let s = spec(self);
        if s.signed {
            1 << (s.total - 1)
        } else {
            0
        }
    }

    /// Whether `code` is a NaN code.
    pub fn is_nan_code(self, code: u8) -> bool {
        self.decode(code).is_nan()
    }

    /// Short canonical name: `e4m3`, `e5m2`, `e2m3`, `e3m2`, `e2m1`, `e8m0`.
    pub fn name(self) -> &'static str {
        match self {
            FloatFormat::E4M3 => "e4m3",
            FloatFormat::E5M2 => "e5m2",
            FloatFormat::E2M3 => "e2m3",
            FloatFormat::E3M2 => "e3m2",
            FloatFormat::E2M1 => "e2m1",
            FloatFormat::E8M0 => "e8m0",
        }
    }

    /// The ml_dtypes dtype name (`float8_e4m3fn`, ..., `float8_e8m0fnu`).
    pub fn ml_dtypes_name(self) -> &'static str {
        match self {
            FloatFormat::E4M3 => "float8_e4m3fn",
            FloatFormat::E5M2 => "float8_e5m2",
            FloatFormat::E2M3 => "float6_e2m3fn",
            FloatFormat::E3M2 => "float6_e3m2fn",
            FloatFormat::E2M1 => "float4_e2m1fn",
            FloatFormat::E8M0 => "float8_e8m0fnu",
        }
    }

    /// Parse a format name, case-insensitively: the short name (`e4m3`), the ml_dtypes name
    /// (`float8_e4m3fn`), or `fp8_e4m3` / `fp8_e5m2` / `fp6_e2m3` / `fp6_e3m2` / `fp4` /
    /// `fp4_e2m1` / `ue8m0`.
    pub fn from_name(s: &str) -> Result<Self> {
        let l = s.trim().to_ascii_lowercase();
        let f = match l.as_str() {
            "e4m3" | "e4m3fn" | "float8_e4m3fn" | "fp8_e4m3" | "fp8_e4m3fn" | "fp8" => {
                FloatFormat::E4M3
            }
            "e5m2" | "float8_e5m2" | "fp8_e5m2" => FloatFormat::E5M2,
            "e2m3" | "float6_e2m3fn" | "fp6_e2m3" => FloatFormat::E2M3,
            "e3m2" | "float6_e3m2fn" | "fp6_e3m2" => FloatFormat::E3M2,
            "e2m1" | "float4_e2m1fn" | "fp4" | "fp4_e2m1" => FloatFormat::E2M1,
            "e8m0" | "float8_e8m0fnu" | "ue8m0" | "e8m0fnu" => FloatFormat::E8M0,
            _ => {
                return Err(Error::UnknownFormat {
                    name: s.to_string(),
                    known: ALL_FLOAT_FORMATS
                        .iter()
                        .map(|f| format!("{} ({})", f.name(), f.ml_dtypes_name()))
                        .collect::<Vec<_>>()
                        .join(", "),
                })
            }
        };
        Ok(f)
    }

    /// Encode with a deterministic rounding mode and overflow policy; the code is in the low
    /// `total_bits` bits. NaN input maps as documented in the module docs (FP6/FP4: the
    /// ml_dtypes ∓0 mapping; use [`encode_checked`](Self::encode_checked) to get an error).
    #[inline(always)]
    pub fn encode(self, x: f32, rounding: Rounding, overflow: Overflow) -> u8 {
        if rounding == Rounding::NearestEven {
            if let Some(p) = fast_params(self, overflow) {
                return encode_fast(&p, x);
            }
        }
        self.encode_reference(x, rounding, overflow)
    }

    /// Like [`encode`](Self::encode) but a NaN input for a format without a NaN code (FP6,
    /// FP4) is an [`Error::NanInput`] (with `index` 0).
    pub fn encode_checked(self, x: f32, rounding: Rounding, overflow: Overflow) -> Result<u8> {
        if x.is_nan() && !self.has_nan() {
            return Err(Error::NanInput {
                format: self.name(),
                index: 0,
            });
        }
        Ok(self.encode(x, rounding, overflow))
    }

    /// Unbiased stochastic rounding: for `x` between neighbouring codes with values `a < b`,
    /// returns `b` with probability `(x - a) / (b - a)` (exactly, as a multiple of 2^-32, when
    /// at most 32 bits are discarded, which covers every f32 input that does not round to
    /// zero), using the 32 bits of `random` (e.g. [`crate::rounding::sr_bits`]).
    /// Values above max may round into the overflow region and then follow `overflow`, so
    /// the mean is only unbiased for `|x| <= max_finite`.
    #[inline]
    pub fn encode_stochastic(self, x: f32, random: u32, overflow: Overflow) -> u8 {
        self.encode_with(x, RoundBits::Stochastic(random), overflow)
    }

    /// The straightforward scalar encoder (the ml_dtypes algorithm). [`encode`](Self::encode)
    /// must agree with it bit for bit; it is public so that tests and users can check that.
    ///
    /// E8M0 rounds identically under both deterministic modes: its kept LSB is the implicit
    /// bit (always 1), so a significand of exactly 1.5 rounds up either way; the one place
    /// where they could differ (the f32 subnormal 2^-127 itself, a tie on ml_dtypes' 2^-126
    /// grid below 2^-126) keeps ties-to-even so that every code round-trips.
    pub fn encode_reference(self, x: f32, rounding: Rounding, overflow: Overflow) -> u8 {
        let mode = if self == FloatFormat::E8M0 {
            RoundBits::Even
        } else {
            rounding.into()
        };
        self.encode_with(x, mode, overflow)
    }

    fn encode_with(self, x: f32, mode: RoundBits, overflow: Overflow) -> u8 {
        let s = spec(self);
        let bits = x.to_bits();
        let neg = bits >> 31 == 1;
        let a = bits & 0x7FFF_FFFF;
        let sign_code: u32 = if neg && s.signed {
            1 << (s.total - 1)
        } else {
            0
        };

        if a > 0x7F80_0000 {
            return nan_code(self, neg);
        }
        if self == FloatFormat::E8M0 && (neg || a == 0) {
            // No zero, no sign. -Inf is negative too.
            return match overflow {
                Overflow::NonSaturating => 0xFF,
                Overflow::Saturate => 0x00,
            };
        }
        if a == 0x7F80_0000 {
            return overflow_code(self, neg, overflow);
        }
        if a == 0 {
            return sign_code as u8;
        }
        // Normalise: value = sig * 2^(e - 23), sig in [2^23, 2^24).
        let (e, sig) = if a >> 23 != 0 {
            ((a >> 23) as i32 - 127, (a & 0x7F_FFFF) | 0x80_0000)
        } else {
            let sh = a.leading_zeros() - 8;
            (-126 - sh as i32, a << sh)
        };
        // Target biased exponent minus one; the implicit bit of the rounded significand adds
        // the one back (and a rounding carry bumps the exponent).
        let base = e + s.bias - 1;
        let adj = (-base).max(0) as u32;
        let shift = 23 - s.mbits + adj;
        let q = round_shift(sig as u64, shift, mode);
        let mag = q + ((base.max(0) as u64) << s.mbits);
        if mag > s.max_mag as u64 {
            return overflow_code(self, neg, overflow);
        }
        (sign_code | mag as u32) as u8
    }
}

/// The code for NaN input (ml_dtypes mapping).
fn nan_code(f: FloatFormat, neg: bool) -> u8 {
    let s = spec(f);
    let sign = if neg && s.signed {
        1u8 << (s.total - 1)
    } else {
        0
    };
    match s.nan {
        NanRule::AllOnes => sign | 0x7F,
        NanRule::Ieee => sign | 0x7E,
        NanRule::E8M0 => 0xFF,
        // ml_dtypes: quiet_NaN() is the -0 pattern, then negated for -NaN.
        NanRule::None => {
            if neg {
                0
            } else {
                1 << (s.total - 1)
            }
        }
    }
}

/// The code for a finite overflow or ±Inf.
fn overflow_code(f: FloatFormat, neg: bool, overflow: Overflow) -> u8 {
    let s = spec(f);
    let sign = if neg && s.signed {
        1u8 << (s.total - 1)
    } else {
        0
    };
    match (overflow, s.nan) {
        (Overflow::NonSaturating, NanRule::AllOnes) => sign | 0x7F,
        (Overflow::NonSaturating, NanRule::Ieee) => sign | 0x7C,
        (Overflow::NonSaturating, NanRule::E8M0) => 0xFF,
        _ => sign | s.max_mag as u8,
    }
}

/// Loop-invariant constants of the branch-free ties-to-even encoder.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FastParams {
    /// 23 - mantissa bits.
    shift: u32,
    /// (127 - bias) << mbits: re-biases the rounded f32 exponent/mantissa field.
    rebias: u32,
    /// f32 bits of the smallest normal of the target; below it the subnormal path is used.
    min_normal_bits: u32,
    /// A power of two whose f32 ulp is the target's smallest subnormal.
    magic: f32,
    max_mag: u32,
    /// Magnitude code used on overflow (without the sign).
    ovf_mag: u32,
    /// Codes for +NaN and -NaN.
    nan_pos: u32,
    nan_neg: u32,
    /// Shift that moves the f32 sign bit to the code's sign bit.
    sign_shift: u32,
}

const fn make_fast(f: FloatFormat, overflow: Overflow) -> FastParams {
    let s = spec(f);
    let ovf_mag = match (overflow, s.nan) {
        (Overflow::NonSaturating, NanRule::AllOnes) => 0x7F,
        (Overflow::NonSaturating, NanRule::Ieee) => 0x7C,
        _ => s.max_mag,
    };
    let sign_bit = 1u32 << (s.total - 1);
    let (nan_pos, nan_neg) = match s.nan {
        NanRule::AllOnes => (0x7F, 0xFF),
        NanRule::Ieee => (0x7E, 0xFE),
        _ => (sign_bit, 0),
    };
    let min_sub_exp = 1 - s.bias - s.mbits as i32; // log2 of the smallest subnormal
    FastParams {
        shift: 23 - s.mbits,
        rebias: ((127 - s.bias) as u32) << s.mbits,
        min_normal_bits: ((1 - s.bias + 127) as u32) << 23,
        magic: f32::from_bits(((min_sub_exp + 23 + 127) as u32) << 23),
        max_mag: s.max_mag,
        ovf_mag,
        nan_pos,
        nan_neg,
        sign_shift: 32 - s.total,
    }
}

pub(crate) const FAST_E4M3_SAT: FastParams = make_fast(FloatFormat::E4M3, Overflow::Saturate);
const FAST_E4M3_NONSAT: FastParams = make_fast(FloatFormat::E4M3, Overflow::NonSaturating);
pub(crate) const FAST_E5M2_SAT: FastParams = make_fast(FloatFormat::E5M2, Overflow::Saturate);
const FAST_E5M2_NONSAT: FastParams = make_fast(FloatFormat::E5M2, Overflow::NonSaturating);
const FAST_E2M3: FastParams = make_fast(FloatFormat::E2M3, Overflow::Saturate);
const FAST_E3M2: FastParams = make_fast(FloatFormat::E3M2, Overflow::Saturate);
const FAST_E2M1: FastParams = make_fast(FloatFormat::E2M1, Overflow::Saturate);

#[inline(always)]
fn fast_params(f: FloatFormat, overflow: Overflow) -> Option<FastParams> {
    Some(match (f, overflow) {
        (FloatFormat::E4M3, Overflow::Saturate) => FAST_E4M3_SAT,
        (FloatFormat::E4M3, Overflow::NonSaturating) => FAST_E4M3_NONSAT,
        (FloatFormat::E5M2, Overflow::Saturate) => FAST_E5M2_SAT,
        (FloatFormat::E5M2, Overflow::NonSaturating) => FAST_E5M2_NONSAT,
        // FP6/FP4 saturate under both policies.
        (FloatFormat::E2M3, _) => FAST_E2M3,
        (FloatFormat::E3M2, _) => FAST_E3M2,
        (FloatFormat::E2M1, _) => FAST_E2M1,
        (FloatFormat::E8M0, _) => return None,
    })
}

/// Branch-free ties-to-even encoder (selects only, so loops over it vectorize). Works in i32
/// so that every comparison is a plain signed SIMD compare (all compared values are
/// non-negative where they are used).
#[inline(always)]
pub(crate) fn encode_fast(p: &FastParams, x: f32) -> u8 {
    let bits = x.to_bits();
    let a = (bits & 0x7FFF_FFFF) as i32;
    let sign = ((bits >> 31) << (31 - p.sign_shift)) as i32;
    // Normal range: round the f32 bits at the target's last mantissa bit (ties to even via
    // adding the kept LSB), the carry flows into the exponent; then re-bias.
    let lsb = (a >> p.shift) & 1;
    let norm =
        (a.wrapping_add((1 << (p.shift - 1)) - 1 + lsb) >> p.shift).wrapping_sub(p.rebias as i32);
    // Subnormal range: adding `magic` makes the FPU round |x| to a multiple of the smallest
    // subnormal (ties to even); the low bits of the sum are then the code.
    let sub = ((f32::from_bits(a as u32) + p.magic).to_bits() as i32)
        .wrapping_sub(p.magic.to_bits() as i32);
    let mut mag = if a < p.min_normal_bits as i32 {
        sub
    } else {
        norm
    };
    mag = if mag > p.max_mag as i32 {
        p.ovf_mag as i32
    } else {
        mag
    };
    let code = sign | mag;
    let nan = if sign != 0 { p.nan_neg } else { p.nan_pos } as i32;
    (if a > 0x7F80_0000 { nan } else { code }) as u8
}

#[inline(always)]
fn encode_fast_loop(p: &FastParams, xs: &[f32], out: &mut [u8]) {
    // Blocks of 16 let the compiler narrow four 4-lane vectors into one 16-byte store.
    let mut xb = xs.chunks_exact(16);
    let mut ob = out.chunks_exact_mut(16);
    for (o, x) in (&mut ob).zip(&mut xb) {
        let mut tmp = [0u8; 16];
        for (t, &v) in tmp.iter_mut().zip(x) {
            *t = encode_fast(p, v);
        }
        o.copy_from_slice(&tmp);
    }
    for (o, &x) in ob.into_remainder().iter_mut().zip(xb.remainder()) {
        *o = encode_fast(p, x);
    }
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

/// Encode a slice, one code per output byte (low `total_bits` bits). `out` must have the
/// same length as `xs` ([`Error::BufferSize`] otherwise). Ties-to-even uses the vectorizable
/// fast path.
pub fn encode_slice(
    fmt: FloatFormat,
    xs: &[f32],
    out: &mut [u8],
    rounding: Rounding,
    overflow: Overflow,
) -> Result<()> {
    check_len("encode_slice output codes", xs.len(), out.len())?;
    if rounding == Rounding::NearestEven {
        // Each arm passes a constant so that the loop is specialised and vectorized.
        match (fmt, overflow) {
            (FloatFormat::E4M3, Overflow::Saturate) => encode_fast_loop(&FAST_E4M3_SAT, xs, out),
            (FloatFormat::E4M3, Overflow::NonSaturating) => {
                encode_fast_loop(&FAST_E4M3_NONSAT, xs, out)
            }
            (FloatFormat::E5M2, Overflow::Saturate) => encode_fast_loop(&FAST_E5M2_SAT, xs, out),
            (FloatFormat::E5M2, Overflow::NonSaturating) => {
                encode_fast_loop(&FAST_E5M2_NONSAT, xs, out)
            }
            (FloatFormat::E2M3, _) => encode_fast_loop(&FAST_E2M3, xs, out),
            (FloatFormat::E3M2, _) => encode_fast_loop(&FAST_E3M2, xs, out),
            (FloatFormat::E2M1, _) => encode_fast_loop(&FAST_E2M1, xs, out),
            (FloatFormat::E8M0, _) => {
                for (o, &x) in out.iter_mut().zip(xs) {
                    *o = fmt.encode_reference(x, rounding, overflow);
                }
            }
        }
    } else {
        for (o, &x) in out.iter_mut().zip(xs) {
            *o = fmt.encode_reference(x, rounding, overflow);
        }
    }
    Ok(())
}

/// Like [`encode_slice`], but a NaN input for a format without NaN (FP6/FP4) is an
/// [`Error::NanInput`] carrying the element's index.
pub fn encode_slice_checked(
    fmt: FloatFormat,
    xs: &[f32],
    out: &mut [u8],
    rounding: Rounding,
    overflow: Overflow,
) -> Result<()> {
    if !fmt.has_nan() {
        if let Some(index) = xs.iter().position(|x| x.is_nan()) {
            return Err(Error::NanInput {
                format: fmt.name(),
                index,
            });
        }
    }
    encode_slice(fmt, xs, out, rounding, overflow)
}

/// Stochastically encode a slice: element `i` uses `sr_bits(seed, first_index + i)`, so
/// splitting a tensor into chunks (pass each chunk's flat offset as `first_index`) gives the
/// same codes as one call over the whole tensor.
pub fn encode_slice_stochastic(
    fmt: FloatFormat,
    xs: &[f32],
    out: &mut [u8],
    seed: u64,
    first_index: u64,
    overflow: Overflow,
) -> Result<()> {
    check_len("encode_slice_stochastic output codes", xs.len(), out.len())?;
    for (i, (o, &x)) in out.iter_mut().zip(xs).enumerate() {
        let r = crate::rounding::sr_bits(seed, first_index + i as u64);
        *o = fmt.encode_stochastic(x, r, overflow);
    }
    Ok(())
}

/// Decode a slice of codes (one per byte, low `total_bits` bits) with the 256-entry table.
/// `out` must have the same length as `codes`.
pub fn decode_slice(fmt: FloatFormat, codes: &[u8], out: &mut [f32]) -> Result<()> {
    check_len("decode_slice output values", codes.len(), out.len())?;
    let lut = fmt.decode_table();
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = lut[c as usize];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_values_match_the_ocp_table() {
        use FloatFormat::*;
        let want = [
            (E4M3, 448.0, 2f32.powi(-6), 2f32.powi(-9)),
            (E5M2, 57344.0, 2f32.powi(-14), 2f32.powi(-16)),
            (E2M3, 7.5, 1.0, 0.125),
            (E3M2, 28.0, 0.25, 0.0625),
            (E2M1, 6.0, 1.0, 0.5),
        ];
        for (f, max, mn, ms) in want {
            assert_eq!(f.max_finite(), max, "{f:?}");
            assert_eq!(f.min_normal(), mn, "{f:?}");
            assert_eq!(f.min_subnormal(), ms, "{f:?}");
        }
        assert_eq!(E8M0.max_finite(), 2f32.powi(127));
        assert_eq!(E8M0.min_normal(), 2f32.powi(-127));
        assert!(E8M0.decode(0xFF).is_nan());
        assert_eq!(E8M0.decode(127), 1.0);
    }

    #[test]
    fn e2m1_table() {
        let want = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        for (c, w) in want.iter().enumerate() {
            assert_eq!(FloatFormat::E2M1.decode(c as u8), *w);
            assert_eq!(FloatFormat::E2M1.decode(c as u8 | 8), -*w);
        }
    }

    #[test]
    fn known_conversions() {
        use FloatFormat::*;
        let ne = Rounding::NearestEven;
        let ns = Overflow::NonSaturating;
        assert_eq!(E4M3.encode(464.0, ne, ns), 0x7E); // tie to even (448)
        assert_eq!(
            E4M3.encode(f32::from_bits(464f32.to_bits() + 1), ne, ns),
            0x7F
        );
        assert_eq!(E4M3.encode(f32::INFINITY, ne, Overflow::Saturate), 0x7E);
        assert_eq!(E4M3.encode(f32::NEG_INFINITY, ne, ns), 0xFF);
        assert_eq!(E5M2.encode(61440.0, ne, ns), 0x7C);
        assert_eq!(E5M2.encode(f32::NAN, ne, ns), 0x7E);
        assert_eq!(E2M1.encode(f32::NAN, ne, ns), 0x8);
        assert_eq!(E2M1.encode(-f32::NAN, ne, ns), 0x0);
        assert_eq!(E2M1.encode(0.25, ne, ns), 0x0); // tie to even: 0
        assert_eq!(E2M1.encode(0.75, ne, ns), 0x2); // tie: 0.5 (odd) vs 1.0 -> 1.0
        assert_eq!(E2M1.encode(0.25, Rounding::NearestAway, ns), 0x1);
        assert_eq!(E2M1.encode(-100.0, ne, ns), 0xF);
        assert_eq!(E8M0.encode(0.0, ne, ns), 0xFF);
        assert_eq!(E8M0.encode(1.5, ne, ns), 128); // ties up
        assert_eq!(E8M0.encode(f32::from_bits(0x5F_FFFF), ne, ns), 1);
        assert!(E2M3.encode_checked(f32::NAN, ne, ns).is_err());
        assert_eq!(E4M3.encode_checked(f32::NAN, ne, ns), Ok(0x7F));
    }

    #[test]
    fn names_round_trip() {
        for f in ALL_FLOAT_FORMATS {
            assert_eq!(FloatFormat::from_name(f.name()).unwrap(), f);
            assert_eq!(FloatFormat::from_name(f.ml_dtypes_name()).unwrap(), f);
        }
        assert!(matches!(
            FloatFormat::from_name("e9m9"),
            Err(Error::UnknownFormat { .. })
        ));
    }

    #[test]
    fn slices_check_lengths() {
        let mut out = [0u8; 2];
        assert!(encode_slice(
            FloatFormat::E4M3,
            &[1.0],
            &mut out,
            Rounding::NearestEven,
            Overflow::Saturate
        )
        .is_err());
        let mut f = [0f32; 1];
        assert!(decode_slice(FloatFormat::E4M3, &out, &mut f).is_err());
        let e = encode_slice_checked(
            FloatFormat::E2M1,
            &[1.0, f32::NAN],
            &mut out,
            Rounding::NearestEven,
            Overflow::Saturate,
        );
        assert_eq!(
            e,
            Err(Error::NanInput {
                format: "e2m1",
                index: 1
            })
        );
    }
}
