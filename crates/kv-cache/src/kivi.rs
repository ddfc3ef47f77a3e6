//! KIVI keys: quantized per channel over groups of `G` tokens (KIVI, Liu et al. 2024: key
//! outliers live in fixed channels, so a per-channel grid fits keys far better than a per-token
//! one). One group record of one KV head holds, for each of the `head_dim` channels, an f16
//! scale, an f16 minimum and `G` packed `bits`-bit codes (`G * bits / 8` bytes).
//! Values use the per-token INT codec of [`crate::codec`]; the residual window of recent
//! full-precision tokens is managed by [`crate::QuantCache`].

use crate::codec::{int_params, pack_codes, unpack_codes};
use half::f16;

/// Bytes of one (group, head) record of keys: `d` channels of scale + min + `g` codes.
pub fn group_bytes(d: usize, g: usize, bits: u8) -> usize {
    d * (4 + g * bits as usize / 8)
}

/// Encode `g` key vectors of one head (`rows`: `[g][d]`) channel by channel into `out`.
pub fn encode_group(rows: &[f32], d: usize, bits: u8, out: &mut [u8]) {
    let g = rows.len() / d;
    let levels = ((1u32 << bits) - 1) as f32;
    let cb = 4 + g * bits as usize / 8;
    let mut col = vec![0f32; g];
    for (c, o) in out.chunks_exact_mut(cb).enumerate().take(d) {
        for (t, v) in col.iter_mut().enumerate() {
            *v = rows[t * d + c];
        }
        let (scale, min) = int_params(&col, levels);
        o[0..2].copy_from_slice(&scale.to_le_bytes());
        o[2..4].copy_from_slice(&min.to_le_bytes());
        pack_codes(
            &col,
            scale.to_f32(),
            min.to_f32(),
            bits,
            levels,
            &mut o[4..],
        );
    }
}

/// Decode one (group, head) record into `out` (`[g][d]`, token-major). `col` is scratch of
/// `g` floats.
#[inline(always)]
pub fn decode_group(rec: &[u8], d: usize, g: usize, bits: u8, out: &mut [f32], col: &mut [f32]) {
    let cb = 4 + g * bits as usize / 8;
    for (c, r) in rec.chunks_exact(cb).enumerate().take(d) {
        let scale = f16::from_le_bytes([r[0], r[1]]).to_f32();
        let min = f16::from_le_bytes([r[2], r[3]]).to_f32();
        unpack_codes(&r[4..], bits, scale, min, &mut col[..g]);
        for (t, v) in col[..g].iter().enumerate() {
            out[t * d + c] = *v;
        }
    }
}

/// Decode one (group, head) record channel-major: channel `c`'s `g` tokens go to
/// `kt[c * ld + off..][..g]` (the layout the attention kernel's KIVI score block reads).
#[inline(always)]
pub fn decode_group_cm(
    rec: &[u8],
    d: usize,
    g: usize,
    bits: u8,
    kt: &mut [f32],
    ld: usize,
    off: usize,
) {
    let cb = 4 + g * bits as usize / 8;
    for (c, r) in rec.chunks_exact(cb).enumerate().take(d) {
        let scale = f16::from_le_bytes([r[0], r[1]]).to_f32();
        let min = f16::from_le_bytes([r[2], r[3]]).to_f32();
        unpack_codes(&r[4..], bits, scale, min, &mut kt[c * ld + off..][..g]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_channel_grid_follows_each_channel() {
        // Channel 0 lives around 100, channel 1 around -0.01: a per-channel grid keeps both.
        let (d, g) = (2, 8);
        let rows: Vec<f32> = (0..g)
            .flat_map(|t| [100.0 + t as f32 * 0.1, -0.01 + t as f32 * 1e-3])
            .collect();
        for bits in [2u8, 4] {
            let mut rec = vec![0u8; group_bytes(d, g, bits)];
            encode_group(&rows, d, bits, &mut rec);
            let mut out = vec![0f32; g * d];
            let mut col = vec![0f32; g];
            decode_group(&rec, d, g, bits, &mut out, &mut col);
            let levels = ((1u32 << bits) - 1) as f32;
            for c in 0..d {
                let range = rows[(g - 1) * d + c] - rows[c];
                // Half a step plus f16 rounding of min (|x| 2^-11) and scale.
                let tol = 0.5 * range / levels + rows[c].abs() * 2f32.powi(-10) + range * 0.01;
                for t in 0..g {
                    let (a, b) = (rows[t * d + c], out[t * d + c]);
                    assert!(
                        (a - b).abs() <= tol,
                        "bits {bits} c{c} t{t}: {a} vs {b} tol {tol}"
                    );
                }
            }
        }
    }
}
