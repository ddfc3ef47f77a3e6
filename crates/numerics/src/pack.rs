//! Bit packing of 1..=8-bit codes into per-row little-endian bit streams.
//!
//! The layout is the one of [`crate::QuantizedTensor`]: element `c` of a row starts at bit
//! `c * bits` of that row's bit stream, bits are filled LSB-first (bit `k` of the stream is bit
//! `k % 8` of byte `k / 8`), and every row starts on a byte boundary. Unused high bits of a row's
//! last byte are zero. For 4-bit codes element `2j` is the low nibble of byte `j`; for 8-bit codes
//! the stream is the codes themselves.
//!
//! ```
//! use lowbit_numerics::pack::{pack_row, unpack_row};
//! let codes = [1u8, 2, 3, 4, 5];
//! let mut packed = [0u8; 2]; // 5 * 3 bits = 15 bits -> 2 bytes
//! pack_row(&codes, 3, &mut packed).unwrap();
//! // byte 0 = c0 | c1 << 3 | (c2 & 3) << 6; byte 1 = c2 >> 2 | c3 << 1 | c4 << 4
//! assert_eq!(packed, [0b1101_0001, 0b0101_1000]);
//! let mut back = [0u8; 5];
//! unpack_row(&packed, 3, &mut back).unwrap();
//! assert_eq!(back, codes);
//! ```

use crate::error::{Error, Result};
use crate::tensor::{packed_row_bytes, QuantizedTensor};

fn check_bits(bits: u32) -> Result<()> {
    if (1..=8).contains(&bits) {
        Ok(())
    } else {
        Err(Error::Invalid(format!("code width {bits} not in 1..=8")))
    }
}

/// Pack `codes` (each `< 2^bits`; higher bits are masked off) into `out`, which must hold exactly
/// [`packed_row_bytes`]`(codes.len(), bits)` bytes. Unused trailing bits are written as zero.
pub fn pack_row(codes: &[u8], bits: u32, out: &mut [u8]) -> Result<()> {
    check_bits(bits)?;
    let need = packed_row_bytes(codes.len(), bits);
    if out.len() != need {
        return Err(Error::BufferSize {
            what: "packed row",
            expected: need,
            got: out.len(),
        });
    }
    pack_row_unchecked(codes, bits, out);
    Ok(())
}

/// [`pack_row`] without the argument checks (lengths must already be right).
pub(crate) fn pack_row_unchecked(codes: &[u8], bits: u32, out: &mut [u8]) {
    match bits {
        8 => out.copy_from_slice(codes),
        4 => {
            let mut pairs = codes.chunks_exact(2);
            for (o, p) in out.iter_mut().zip(&mut pairs) {
                *o = (p[0] & 15) | (p[1] << 4);
            }
            if let [last] = pairs.remainder() {
                out[codes.len() / 2] = last & 15;
            }
        }
        2 => {
            let mut quads = codes.chunks_exact(4);
            for (o, q) in out.iter_mut().zip(&mut quads) {
                *o = (q[0] & 3) | (q[1] & 3) << 2 | (q[2] & 3) << 4 | (q[3] << 6);
            }
            let rem = quads.remainder();
            if !rem.is_empty() {
                let mut b = 0u8;
                for (k, &c) in rem.iter().enumerate() {
                    b |= (c & 3) << (2 * k);
                }
                out[codes.len() / 4] = b;
            }
        }
        _ => {
            let mask = (1u32 << bits) - 1;
            let mut acc: u32 = 0;
            let mut nacc: u32 = 0;
            let mut o = 0;
            for &c in codes {
                acc |= (c as u32 & mask) << nacc;
                nacc += bits;
                while nacc >= 8 {
                    out[o] = acc as u8;
                    o += 1;
                    acc >>= 8;
                    nacc -= 8;
                }
            }
            if nacc > 0 {
                out[o] = acc as u8;
            }
        }
    }
}

/// Unpack `out.len()` codes of `bits` bits from a packed row.
pub fn unpack_row(data: &[u8], bits: u32, out: &mut [u8]) -> Result<()> {
    check_bits(bits)?;
    let need = packed_row_bytes(out.len(), bits);
    if data.len() < need {
        return Err(Error::BufferSize {
            what: "packed row",
            expected: need,
            got: data.len(),
        });
    }
    unpack_row_unchecked(&data[..need], bits, out);
    Ok(())
}

/// [`unpack_row`] without the argument checks (`data` must hold at least the needed bytes).
pub(crate) fn unpack_row_unchecked(data: &[u8], bits: u32, out: &mut [u8]) {
    match bits {
        8 => {
            let n = out.len();
            out.copy_from_slice(&data[..n]);
        }
        4 => {
            let n = out.len();
            let mut pairs = out.chunks_exact_mut(2);
            for (p, &b) in (&mut pairs).zip(data) {
                p[0] = b & 15;
                p[1] = b >> 4;
            }
            if let [last] = pairs.into_remainder() {
                *last = data[n / 2] & 15;
            }
        }
        _ => {
            let mask = (1u32 << bits) - 1;
            let mut acc: u32 = 0;
            let mut nacc: u32 = 0;
            let mut i = 0;
            for c in out.iter_mut() {
                if nacc < bits {
                    acc |= (data[i] as u32) << nacc;
                    i += 1;
                    nacc += 8;
                }
                *c = (acc & mask) as u8;
                acc >>= bits;
                nacc -= bits;
            }
        }
    }
}

/// Read code `col` of a packed row (no bounds check beyond slice indexing; see [`QuantizedTensor::code`]).
#[inline]
pub fn get_code(row: &[u8], bits: u32, col: usize) -> u8 {
    let bit = col * bits as usize;
    let byte = bit / 8;
    let shift = bit % 8;
    let lo = row[byte] as u16;
    let hi = if shift + bits as usize > 8 {
        row[byte + 1] as u16
    } else {
        0
    };
    (((lo | hi << 8) >> shift) & ((1u16 << bits) - 1)) as u8
}

/// Write code `col` of a packed row (other codes are left untouched).
#[inline]
pub fn set_code(row: &mut [u8], bits: u32, col: usize, code: u8) {
    let bit = col * bits as usize;
    let byte = bit / 8;
    let shift = bit % 8;
    let mask = ((1u16 << bits) - 1) << shift;
    let val = ((code as u16) << shift) & mask;
    row[byte] = (row[byte] & !(mask as u8)) | val as u8;
    if shift + bits as usize > 8 {
        let m = (mask >> 8) as u8;
        row[byte + 1] = (row[byte + 1] & !m) | (val >> 8) as u8;
    }
}

/// Pack a `rows x cols` row-major matrix of codes into per-row byte-aligned bit streams.
pub fn pack(codes: &[u8], rows: usize, cols: usize, bits: u32) -> Result<Vec<u8>> {
    check_bits(bits)?;
    if codes.len() != rows * cols {
        return Err(Error::Shape(format!(
            "{} codes for a {rows}x{cols} matrix",
            codes.len()
        )));
    }
    let rb = packed_row_bytes(cols, bits);
    let mut out = vec![0u8; rows * rb];
    if rb > 0 {
        for (r, o) in out.chunks_exact_mut(rb).enumerate() {
            pack_row_unchecked(&codes[r * cols..(r + 1) * cols], bits, o);
        }
    }
    Ok(out)
}

/// Inverse of [`pack`].
pub fn unpack(data: &[u8], rows: usize, cols: usize, bits: u32) -> Result<Vec<u8>> {
    check_bits(bits)?;
    let rb = packed_row_bytes(cols, bits);
    if data.len() != rows * rb {
        return Err(Error::BufferSize {
            what: "packed codes",
            expected: rows * rb,
            got: data.len(),
        });
    }
    let mut out = vec![0u8; rows * cols];
    if cols > 0 {
        for (r, o) in out.chunks_exact_mut(cols).enumerate() {
            unpack_row_unchecked(&data[r * rb..(r + 1) * rb], bits, o);
        }
    }
    Ok(out)
}

impl QuantizedTensor {
    fn code_pos(&self, row: usize, col: usize) -> Result<(usize, u32)> {
        if row >= self.rows || col >= self.cols {
            return Err(Error::Shape(format!(
                "index ({row}, {col}) outside a {}x{} tensor",
                self.rows, self.cols
            )));
        }
        let rb = self.row_bytes();
        if self.data.len() < (row + 1) * rb {
            return Err(Error::BufferSize {
                what: "packed codes",
                expected: self.rows * rb,
                got: self.data.len(),
            });
        }
        Ok((row * rb, self.scheme.elem.bits()))
    }

    /// The stored code at `(row, col)`.
    pub fn code(&self, row: usize, col: usize) -> Result<u8> {
        let (off, bits) = self.code_pos(row, col)?;
        Ok(get_code(&self.data[off..off + self.row_bytes()], bits, col))
    }

    /// Overwrite the stored code at `(row, col)` (masked to the element width).
    pub fn set_code(&mut self, row: usize, col: usize, code: u8) -> Result<()> {
        let (off, bits) = self.code_pos(row, col)?;
        let rb = self.row_bytes();
        set_code(&mut self.data[off..off + rb], bits, col, code);
        Ok(())
    }

    /// All codes of one row, unpacked to one byte each.
    pub fn row_codes(&self, row: usize, out: &mut [u8]) -> Result<()> {
        if out.len() != self.cols {
            return Err(Error::Shape(format!(
                "row buffer of {} for {} columns",
                out.len(),
                self.cols
            )));
        }
        if self.cols == 0 {
            return Ok(());
        }
        let (off, bits) = self.code_pos(row, 0)?;
        unpack_row_unchecked(&self.data[off..off + self.row_bytes()], bits, out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u8 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 33) as u8
    }

    /// Reference: one bit at a time.
    fn pack_bitwise(codes: &[u8], bits: u32) -> Vec<u8> {
        let mut out = vec![0u8; packed_row_bytes(codes.len(), bits)];
        for (i, &c) in codes.iter().enumerate() {
            for k in 0..bits as usize {
                if (c >> k) & 1 == 1 {
                    let bit = i * bits as usize + k;
                    out[bit / 8] |= 1 << (bit % 8);
                }
            }
        }
        out
    }

    #[test]
    fn pack_matches_bitwise_reference_all_widths() {
        let mut s = 7;
        for bits in 1..=8u32 {
            for n in [0usize, 1, 2, 3, 5, 8, 13, 64, 129] {
                let codes: Vec<u8> = (0..n)
                    .map(|_| lcg(&mut s) & ((1u16 << bits) - 1) as u8)
                    .collect();
                let want = pack_bitwise(&codes, bits);
                let mut got = vec![0u8; want.len()];
                pack_row(&codes, bits, &mut got).unwrap();
                assert_eq!(got, want, "bits {bits} n {n}");
                let mut back = vec![0u8; n];
                unpack_row(&got, bits, &mut back).unwrap();
                assert_eq!(back, codes);
                for (i, &c) in codes.iter().enumerate() {
                    assert_eq!(get_code(&got, bits, i), c);
                }
                let mut rebuilt = vec![0u8; want.len()];
                for (i, &c) in codes.iter().enumerate() {
                    set_code(&mut rebuilt, bits, i, c);
                }
                assert_eq!(rebuilt, want);
            }
        }
    }

    #[test]
    fn nibble_order_is_low_first() {
        let mut out = [0u8; 1];
        pack_row(&[0x3, 0xA], 4, &mut out).unwrap();
        assert_eq!(out[0], 0xA3);
    }

    #[test]
    fn bad_sizes_are_errors() {
        assert!(matches!(
            pack_row(&[1, 2], 4, &mut [0u8; 2]),
            Err(Error::BufferSize { .. })
        ));
        assert!(matches!(
            unpack_row(&[0u8; 1], 4, &mut [0u8; 3]),
            Err(Error::BufferSize { .. })
        ));
        assert!(pack_row(&[1], 9, &mut [0u8; 2]).is_err());
        assert!(matches!(
            unpack(&[0u8; 3], 2, 3, 4),
            Err(Error::BufferSize { .. })
        ));
        assert!(matches!(pack(&[0u8; 5], 2, 3, 4), Err(Error::Shape(_))));
    }
}
