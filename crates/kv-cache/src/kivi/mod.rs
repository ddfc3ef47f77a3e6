//! KIVI keys: quantized per channel over groups of `G` tokens (KIVI, Liu et al. 2024: key
//! outliers live in fixed channels, so a per-channel grid fits keys far better than a per-token
//! one). Three record formats differ only in the per-(group, channel) metadata ([`KeyMeta`]):
//! an f16 scale and minimum (this module, `kivi2`), one byte against per-channel references
//! ([`byte`], `kivi2c`) or `e + z` bits against them ([`fine`], `kivi2f`); each is followed by
//! the channel's `G` packed `bits`-bit codes. [`rope`] holds the pre-RoPE key helpers.
//! Values use the per-token codecs of [`crate::codec`]; the residual window of recent
//! full-precision tokens is managed by [`crate::QuantCache`].

pub mod byte;
pub mod fine;
pub mod rope;

pub use byte::{
    calibrate_c, decode_group_cm_c, encode_group_c, grid_c, group_bytes_c, CompactSearch,
};
pub use fine::{decode_group_cm_f, encode_group_f, group_bytes_f, FineSpec};
pub use rope::{hadamard_cm, rope_block, rope_cm, unrope_rows};

use crate::codec::{int_params, int_params_mse, pack_codes, unpack_codes};
use half::f16;

/// Per-(group, channel) metadata of a KIVI key record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyMeta {
    /// f16 scale and f16 minimum (`kivi2`, `kivi4`).
    F16,
    /// One byte against per-channel references (`kivi2c`, `kivi4c`; see [`byte`]).
    Byte,
    /// `e + z` bits against per-channel references (`kivi2f`, `kivi4f`; see [`fine`]).
    Fine(FineSpec),
}

impl KeyMeta {
    /// Whether records need per-channel references ([`calibrate_c`]) taken from the layer's
    /// first body group.
    pub fn needs_refs(self) -> bool {
        !matches!(self, KeyMeta::F16)
    }
}

/// How [`encode`] fits a record's grids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fit {
    /// f16 records: least-squares grids instead of min/max (`kfit=mse`).
    pub mse: bool,
    /// Byte records: the metadata search.
    pub search: CompactSearch,
}

/// Bytes of one (group, head) record of keys: `d` channels of scale + min + `g` codes.
pub fn group_bytes(d: usize, g: usize, bits: u8) -> usize {
    d * (4 + g * bits as usize / 8)
}

/// Bytes of one (group, head) key record with metadata `meta`.
pub fn record_bytes(d: usize, g: usize, bits: u8, meta: KeyMeta) -> usize {
    match meta {
        KeyMeta::F16 => group_bytes(d, g, bits),
        KeyMeta::Byte => group_bytes_c(d, g, bits),
        KeyMeta::Fine(s) => group_bytes_f(d, g, bits, s),
    }
}

/// Encode `g` key vectors of one head (`rows`: `[g][d]`) into a record of format `meta`
/// (`refs`: the head's references, unused by f16 records).
pub fn encode(
    meta: KeyMeta,
    rows: &[f32],
    d: usize,
    bits: u8,
    refs: &[f32],
    fit: Fit,
    out: &mut [u8],
) {
    match meta {
        KeyMeta::F16 => encode_group(rows, d, bits, fit.mse, out),
        KeyMeta::Byte => encode_group_c(rows, d, bits, refs, fit.search, out),
        KeyMeta::Fine(s) => encode_group_f(rows, d, bits, refs, s, fit.search, out),
    }
}

/// Decode one record of format `meta` into `out` (`[g][d]`, token-major) through
/// [`decode_cm`]; `cm` is scratch of `d · g` floats.
#[allow(clippy::too_many_arguments)]
pub fn decode(
    meta: KeyMeta,
    rec: &[u8],
    d: usize,
    g: usize,
    bits: u8,
    refs: &[f32],
    out: &mut [f32],
    cm: &mut [f32],
) {
    decode_cm(meta, rec, d, g, bits, refs, cm, g, 0);
    for (c, col) in cm.chunks_exact(g).take(d).enumerate() {
        for (t, v) in col.iter().enumerate() {
            out[t * d + c] = *v;
        }
    }
}

/// Decode one record of format `meta` channel-major into `kt[c * ld + off..][..g]` (the
/// layout the attention kernel's KIVI score block reads).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn decode_cm(
    meta: KeyMeta,
    rec: &[u8],
    d: usize,
    g: usize,
    bits: u8,
    refs: &[f32],
    kt: &mut [f32],
    ld: usize,
    off: usize,
) {
    match meta {
        KeyMeta::F16 => decode_group_cm(rec, d, g, bits, kt, ld, off),
        KeyMeta::Byte => decode_group_cm_c(rec, d, g, bits, refs, kt, ld, off),
        KeyMeta::Fine(s) => decode_group_cm_f(rec, d, g, bits, refs, s, kt, ld, off),
    }
}

/// Encode `g` key vectors of one head (`rows`: `[g][d]`) channel by channel into `out`; with
/// `mse`, each channel's grid is the least-squares one ([`crate::codec`]'s `int_params_mse`,
/// policy item `fit=mse`) instead of its min/max.
pub fn encode_group(rows: &[f32], d: usize, bits: u8, mse: bool, out: &mut [u8]) {
    let g = rows.len() / d;
    let levels = ((1u32 << bits) - 1) as f32;
    let cb = 4 + g * bits as usize / 8;
    let mut col = vec![0f32; g];
    for (c, o) in out.chunks_exact_mut(cb).enumerate().take(d) {
        for (t, v) in col.iter_mut().enumerate() {
            *v = rows[t * d + c];
        }
        let (scale, min) = if mse {
            int_params_mse(&col, levels)
        } else {
            int_params(&col, levels)
        };
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
            encode_group(&rows, d, bits, false, &mut rec);
            let mut out = vec![0f32; g * d];
            let mut col = vec![0f32; g * d];
            decode(KeyMeta::F16, &rec, d, g, bits, &[], &mut out, &mut col);
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
