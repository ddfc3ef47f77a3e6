//! Element-code decoding shared by the packer, the scalar reference kernel and the tests.
//!
//! These are independent of `lowbit_numerics`' codecs on purpose: the kernels only need the
//! decode direction, and the tests compare the two implementations against each other through
//! the dequantize-then-matmul reference.

/// The bitsandbytes NF4 table (code `i` decodes to `NF4[i]`, in `[-1, 1]`).
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// OCP FP4 E2M1 values by code (sign bit 3).
pub const E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Decode an OCP FP8 E4M3 (FN) code exactly (NaN codes `S.1111.111` decode to NaN).
pub fn e4m3(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = ((code >> 3) & 0xF) as i32;
    let m = (code & 7) as f32;
    if e == 15 && code & 7 == 7 {
        return f32::NAN;
    }
    if e == 0 {
        sign * m * (2.0f32).powi(-9)
    } else {
        sign * (1.0 + m / 8.0) * (2.0f32).powi(e - 7)
    }
}

/// Decode an OCP FP8 E5M2 code exactly (IEEE-style Inf/NaN).
pub fn e5m2(code: u8) -> f32 {
    half::f16::from_bits((code as u16) << 8).to_f32()
}

/// The f16 bit pattern the SIMD kernels build from an E4M3 code: `sign<<15 | (code&0x7f)<<7`.
/// As an f16 it equals `e4m3(code) / 256` for every finite code (normals and subnormals), so
/// the kernels fold the factor 256 into the scale.
pub fn e4m3_as_f16_bits(code: u8) -> u16 {
    (((code as i8 as i16) << 7) as u16) & 0xBF80
}

/// Read element `col` (of width `bits`) of a row packed LSB-first (the `QuantizedTensor` layout).
pub fn get_code(row: &[u8], bits: u32, col: usize) -> u8 {
    let bit = col * bits as usize;
    let byte = bit / 8;
    let shift = bit % 8;
    let mut v = row[byte] as u16 >> shift;
    if shift + bits as usize > 8 {
        v |= (row[byte + 1] as u16) << (8 - shift);
    }
    (v & ((1u16 << bits) - 1)) as u8
}

/// Write element `col` (of width `bits`) into a row packed LSB-first. The target bits must be 0.
pub fn put_code(row: &mut [u8], bits: u32, col: usize, code: u8) {
    let bit = col * bits as usize;
    let byte = bit / 8;
    let shift = bit % 8;
    let v = ((code as u16) & ((1u16 << bits) - 1)) << shift;
    row[byte] |= v as u8;
    if shift + bits as usize > 8 {
        row[byte + 1] |= (v >> 8) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_f16_trick_matches_exact_decode() {
        for c in 0..=255u8 {
            let exact = e4m3(c);
            if exact.is_nan() {
                continue;
            }
            let via = half::f16::from_bits(e4m3_as_f16_bits(c)).to_f32() * 256.0;
            assert_eq!(via.to_bits(), exact.to_bits(), "code {c:#x}");
        }
        assert_eq!(e4m3(0x7e), 448.0);
        assert_eq!(e4m3(0x01), 2f32.powi(-9));
    }

    #[test]
    fn get_put_roundtrip_all_widths() {
        for bits in 1..=8u32 {
            let n = 37;
            let mut row = vec![0u8; (n * bits as usize).div_ceil(8)];
            for c in 0..n {
                put_code(&mut row, bits, c, (c * 7 + 3) as u8);
            }
            for c in 0..n {
                assert_eq!(
                    get_code(&row, bits, c),
                    ((c * 7 + 3) as u8) & ((1u16 << bits) - 1) as u8
                );
            }
        }
    }
}
