//! Rounding modes and the counter-based random source used for stochastic rounding.
//!
//! * [`Rounding::NearestEven`]: IEEE round-to-nearest, ties to the even code (the default of
//!   every reference library lowbit matches: ml_dtypes, numpy, torch, `half`).
//! * [`Rounding::NearestAway`]: round-to-nearest, ties away from zero (microxcaling's
//!   `"nearest"` mode, the MX reference default; C `roundf`).
//! * Stochastic rounding is not a [`Rounding`] variant because it needs random bits per
//!   element: the codecs take them explicitly (`encode_stochastic(x, random, ..)`), and
//!   [`sr_bits`] derives them as a pure function of `(seed, element index)`, so a parallel
//!   quantizer gives the same bits whatever the thread count or chunking.

/// Deterministic round-to-nearest mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Rounding {
    /// Round to nearest, ties to even (IEEE 754 default).
    #[default]
    NearestEven,
    /// Round to nearest, ties away from zero (microxcaling `"nearest"`, C `roundf`).
    NearestAway,
}

/// The SplitMix64 finaliser (Steele, Lea & Flood 2014): a bijective 64-bit mix with full
/// avalanche, used as the hash behind [`sr_bits`].
#[inline(always)]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A sequential SplitMix64 generator (a Weyl sequence through [`mix64`]): small, fast and
/// identical on every platform, for deterministic sampling (calibration windows, random
/// signs, test fixtures). Not for cryptography.
///
/// ```
/// use lowbit_numerics::rounding::SplitMix64;
/// let (mut a, mut b) = (SplitMix64(7), SplitMix64(7));
/// assert_eq!(a.next_u64(), b.next_u64());
/// assert!(a.below(10) < 10);
/// ```
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// Next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform integer in `0..n` (`n > 0`), by rejection (no modulo bias).
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// Uniform `f64` in `[0, 1)` from the top 53 bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// 32 uniformly distributed random bits for element `index` of a stream identified by `seed`.
///
/// Counter-based: a pure hash of `(seed, index)` (two SplitMix64 rounds, the seed hashed
/// first so that `(seed, index)` pairs do not alias as they would with `seed + index`).
/// Results therefore depend only on the element's flat index, never on thread count or
/// traversal order.
#[inline(always)]
pub fn sr_bits(seed: u64, index: u64) -> u32 {
    let s = mix64(seed ^ 0x6A09_E667_F3BC_C909);
    (mix64(s.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15))) >> 32) as u32
}

/// Round `x` to an integer-valued f32 with the given deterministic mode.
/// NaN and ±Inf are returned unchanged.
#[inline(always)]
pub fn round_f32(x: f32, rounding: Rounding) -> f32 {
    match rounding {
        Rounding::NearestEven => x.round_ties_even(),
        Rounding::NearestAway => x.round(),
    }
}

/// Stochastically round `x` to an integer-valued f32 using 32 random bits:
/// returns `floor(x) + 1` with probability `frac(x)`, else `floor(x)`.
///
/// Exactly unbiased (E = x) whenever `frac(x) * 2^32` is an integer, which holds for every
/// f32 with `|x| >= 2^-8` (its fraction is a multiple of 2^-32 or coarser); for smaller
/// fractions the probability is rounded up to the next multiple of 2^-32, a bias below
/// 2^-32. NaN and ±Inf are returned unchanged.
#[inline(always)]
pub fn round_stochastic_f32(x: f32, random: u32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    let fl = x.floor();
    // Exact: x and floor(x) share an exponent range, so the difference is representable.
    let frac = (x - fl) as f64;
    // u = random / 2^32 is uniform on [0, 1) in steps of 2^-32; P(u < frac) = frac.
    if (random as f64) < frac * 4_294_967_296.0 {
        fl + 1.0
    } else {
        fl
    }
}

/// Shift `v` right by `s` bits (`s <= 63`), rounding the discarded bits with `mode`.
/// `random` is only used by [`RoundBits::Stochastic`].
#[inline(always)]
pub(crate) fn round_shift(v: u64, s: u32, mode: RoundBits) -> u64 {
    if s == 0 {
        return v;
    }
    let s = s.min(63);
    let q = v >> s;
    let mask = (1u64 << s) - 1;
    let rem = v & mask;
    let half = 1u64 << (s - 1);
    let up = match mode {
        RoundBits::Even => rem > half || (rem == half && (q & 1) == 1),
        RoundBits::Away => rem >= half,
        RoundBits::Stochastic(r) => {
            // Add a uniform random integer in [0, 2^s) to the discarded bits and truncate:
            // the carry happens with probability exactly rem / 2^s when s <= 32 (all s
            // discarded bits get a random partner). For s > 32 the 32 random bits are
            // aligned to the top of the discarded field; the probability is then
            // floor(rem / 2^(s-32)) / 2^32, low by less than 2^-32 of a step.
            let noise = if s <= 32 {
                (r as u64) >> (32 - s)
            } else {
                (r as u64) << (s - 32)
            };
            rem + noise > mask
        }
    };
    q + up as u64
}

/// How [`round_shift`] rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RoundBits {
    Even,
    Away,
    Stochastic(u32),
}

impl From<Rounding> for RoundBits {
    fn from(r: Rounding) -> Self {
        match r {
            Rounding::NearestEven => RoundBits::Even,
            Rounding::NearestAway => RoundBits::Away,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_shift_modes() {
        // 0b1011 >> 2: rem 0b11 > half -> 3
        assert_eq!(round_shift(0b1011, 2, RoundBits::Even), 3);
        // ties: 0b1010 >> 2 = 2.5 -> even 2, away 3; 0b1110 -> 3.5 -> 4 both
        assert_eq!(round_shift(0b1010, 2, RoundBits::Even), 2);
        assert_eq!(round_shift(0b1010, 2, RoundBits::Away), 3);
        assert_eq!(round_shift(0b1110, 2, RoundBits::Even), 4);
        assert_eq!(round_shift(0b1110, 2, RoundBits::Away), 4);
        assert_eq!(round_shift(7, 0, RoundBits::Even), 7);
    }

    #[test]
    fn stochastic_round_shift_counts_exactly() {
        // s = 4: for every rem, exactly rem of the 16 top-4-bit random values round up.
        for rem in 0u64..16 {
            let ups = (0u32..16)
                .filter(|&t| round_shift(rem, 4, RoundBits::Stochastic(t << 28)) == 1)
                .count();
            assert_eq!(ups as u64, rem);
        }
    }

    #[test]
    fn sr_bits_is_pure_and_spreads() {
        assert_eq!(sr_bits(1, 2), sr_bits(1, 2));
        assert_ne!(sr_bits(1, 2), sr_bits(2, 1));
        assert_ne!(sr_bits(0, 0), sr_bits(0, 1));
        // Mean of 4096 draws of the top bit is near 1/2 (binomial sd = 32).
        let ones: u32 = (0..4096).map(|i| sr_bits(7, i) >> 31).sum();
        assert!((ones as i64 - 2048).abs() < 6 * 32, "{ones}");
    }

    #[test]
    fn stochastic_f32_extremes() {
        assert_eq!(round_stochastic_f32(2.25, 0), 3.0); // u = 0 < 0.25 -> up
        assert_eq!(round_stochastic_f32(2.25, u32::MAX), 2.0);
        assert_eq!(round_stochastic_f32(-2.25, u32::MAX), -3.0); // frac 0.75 vs u ~ 1
        assert_eq!(round_stochastic_f32(5.0, 0), 5.0);
        assert!(round_stochastic_f32(f32::NAN, 0).is_nan());
    }
}
