//! Byte-metadata KIVI keys (`kivi2c`, `kivi4c`): per (group, channel) one metadata byte, a
//! half-octave step and a whole-step origin against per-channel references calibrated on the
//! layer's first body group.

use crate::codec::{pack_codes, unpack_codes};

/// Bytes of one compact (`kivi2c`) (group, head) record: `d` channels of one metadata byte
/// and `g` codes.
pub fn group_bytes_c(d: usize, g: usize, bits: u8) -> usize {
    d * (1 + g * bits as usize / 8)
}

/// Per-channel references of compact KIVI keys, calibrated once per (layer, head) from the first
/// body group (`rows`: `[g][d]`): `refs[c]` = the median of channel `c` (the grid anchor),
/// `refs[d + c]` = its min-max step `(max - min) / levels` (the step unit; at least
/// `|median| · 2^-8` and `1e-8`).
pub fn calibrate_c(rows: &[f32], d: usize, bits: u8, refs: &mut [f32]) {
    let g = rows.len() / d;
    let levels = ((1u32 << bits) - 1) as f32;
    let mut col = vec![0f32; g];
    for c in 0..d {
        for (t, v) in col.iter_mut().enumerate() {
            *v = rows[t * d + c];
        }
        col.sort_by(f32::total_cmp);
        let med = if g % 2 == 1 {
            col[g / 2]
        } else {
            0.5 * (col[g / 2 - 1] + col[g / 2])
        };
        let step = (col[g - 1] - col[0]) / levels;
        refs[c] = med;
        refs[d + c] = step.max(med.abs() * (1.0 / 256.0)).max(1e-8);
    }
}

/// Step and grid origin of a compact key channel with metadata byte `m` (high nibble `e`, low
/// nibble `z`) against its references `mu`, `sigma`: `step = sigma · 2^((e - 10) / 2)`
/// (`2^-5 .. 2^2.5` times the reference step), origin `mu + (z - 8) · step` (grid points are
/// whole steps from the anchor, origin `-8 .. +7` steps from it).
#[inline(always)]
pub fn grid_c(m: u8, mu: f32, sigma: f32) -> (f32, f32) {
    let h = (m >> 4) as i32 - 10;
    let half = if h & 1 == 1 {
        std::f32::consts::SQRT_2
    } else {
        1.0
    };
    let step = sigma * crate::codec::pow2(h >> 1) * half;
    (step, mu + ((m & 15) as i32 - 8) as f32 * step)
}

/// How [`encode_group_c`] chooses a channel's metadata byte (always the least squared error
/// over the channel's `g` values among the candidates).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompactSearch {
    /// Every step with the two origins around the channel minimum (values past the grid are
    /// clipped); the default.
    Near,
    /// All 256 bytes (`kfit=mse`).
    Full,
    /// Only grids that cover the channel's `[min, max]`, nothing clipped (`kfit=cover`);
    /// [`CompactSearch::Near`] when no byte covers it.
    Cover,
}

/// Encode `g` key vectors of one head (`rows`: `[g][d]`) into a compact record: per channel,
/// the metadata byte with the least squared error of the channel's `g` values among the
/// candidates of `search`, then the codes.
pub fn encode_group_c(
    rows: &[f32],
    d: usize,
    bits: u8,
    refs: &[f32],
    search: CompactSearch,
    out: &mut [u8],
) {
    let g = rows.len() / d;
    let levels = ((1u32 << bits) - 1) as f32;
    let cb = 1 + g * bits as usize / 8;
    let mut col = vec![0f32; g];
    for (c, o) in out.chunks_exact_mut(cb).enumerate().take(d) {
        for (t, v) in col.iter_mut().enumerate() {
            *v = rows[t * d + c];
        }
        let (mu, sigma) = (refs[c], refs[d + c]);
        let mn = col.iter().fold(f32::INFINITY, |a, &b| a.min(b));
        let mx = col.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let sse = |m: u8| -> f32 {
            let (step, origin) = grid_c(m, mu, sigma);
            let inv = 1.0 / step;
            col.iter()
                .map(|&x| {
                    let q = crate::codec::round_half_away((x - origin) * inv).clamp(0.0, levels);
                    let r = x - (origin + q * step);
                    r * r
                })
                .sum()
        };
        let mut best = (f32::INFINITY, 0x80u8);
        // Best covering byte (`cover` only): origin <= min and origin + levels * step >= max.
        let mut best_cov = (f32::INFINITY, None);
        for e in 0u8..16 {
            let (step, _) = grid_c(e << 4 | 8, mu, sigma);
            let z0 = (((mn - mu) / step).floor() + 8.0).clamp(0.0, 15.0) as u8;
            let (za, zb) = match search {
                CompactSearch::Full => (0, 15),
                _ => (z0, (z0 + 1).min(15)),
            };
            for z in za..=zb {
                let m = e << 4 | z;
                let err = sse(m);
                if err < best.0 {
                    best = (err, m);
                }
            }
            if search == CompactSearch::Cover {
                // Every origin between `max - levels * step` and `min` covers; try them all.
                let zlo = (((mx - mu) / step - levels).ceil() + 8.0).clamp(0.0, 15.0) as u8;
                for z in zlo.min(z0)..=z0 {
                    let m = e << 4 | z;
                    let (step, origin) = grid_c(m, mu, sigma);
                    if origin <= mn && origin + levels * step >= mx {
                        let err = sse(m);
                        if err < best_cov.0 {
                            best_cov = (err, Some(m));
                        }
                    }
                }
            }
        }
        o[0] = best_cov.1.unwrap_or(best.1);
        let (step, origin) = grid_c(o[0], mu, sigma);
        pack_codes(&col, step, origin, bits, levels, &mut o[1..]);
    }
}

/// Decode one compact record channel-major into `kt[c * ld + off..][..g]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn decode_group_cm_c(
    rec: &[u8],
    d: usize,
    g: usize,
    bits: u8,
    refs: &[f32],
    kt: &mut [f32],
    ld: usize,
    off: usize,
) {
    let cb = 1 + g * bits as usize / 8;
    for (c, r) in rec.chunks_exact(cb).enumerate().take(d) {
        let (step, origin) = grid_c(r[0], refs[c], refs[d + c]);
        unpack_codes(&r[1..], bits, step, origin, &mut kt[c * ld + off..][..g]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compact key searches against an f64 brute force over all 256 bytes: `kfit=mse` (Full)
    /// picks the least squared error of all, `kfit=cover` the least among covering bytes with
    /// nothing clipped (every value within half a step), while the MSE searches clip the
    /// outlier of this fixture.
    #[test]
    fn compact_cover_search_is_optimal_and_never_clips() {
        let (d, g, bits) = (4usize, 32usize, 2u8);
        let levels = 3.0f64;
        // Deterministic fixture: smooth channels, channel 2 with one large outlier, channel 3
        // drifting away from the calibration group.
        let row = |t: usize, shift: f32| -> Vec<f32> {
            let x = t as f32;
            vec![
                (x * 0.7).sin() + shift,
                0.1 * (x * 1.3).cos() - 2.0,
                (x * 0.45).sin() * 0.3 + if t == 17 { 4.0 } else { 0.0 },
                0.5 * (x * 0.9).cos() + 0.08 * x + 3.0 * shift,
            ]
        };
        let calib: Vec<f32> = (0..g).flat_map(|t| row(t, 0.0)).collect();
        let mut refs = vec![0f32; 2 * d];
        calibrate_c(&calib, d, bits, &mut refs);
        let rows: Vec<f32> = (0..g).flat_map(|t| row(t, 0.3)).collect();
        let cb = 1 + g * bits as usize / 8;
        let mut clipped_mse = false;
        for search in [
            CompactSearch::Near,
            CompactSearch::Full,
            CompactSearch::Cover,
        ] {
            let cover = search == CompactSearch::Cover;
            let mut rec = vec![0u8; group_bytes_c(d, g, bits)];
            encode_group_c(&rows, d, bits, &refs, search, &mut rec);
            let mut out = vec![0f32; g * d];
            let mut cm = vec![0f32; d * g];
            crate::kivi::decode(
                crate::kivi::KeyMeta::Byte,
                &rec,
                d,
                g,
                bits,
                &refs,
                &mut out,
                &mut cm,
            );
            for c in 0..d {
                let col: Vec<f64> = (0..g).map(|t| rows[t * d + c] as f64).collect();
                let (mn, mx) = col
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
                let sse = |m: u8| {
                    let (s, o) = grid_c(m, refs[c], refs[d + c]);
                    let (s, o) = (s as f64, o as f64);
                    let e: f64 = col
                        .iter()
                        .map(|&x| {
                            let q = ((x - o) / s).round().clamp(0.0, levels);
                            (x - o - q * s).powi(2)
                        })
                        .sum();
                    (e, o <= mn && o + levels * s >= mx)
                };
                let (step, _) = grid_c(rec[c * cb], refs[c], refs[d + c]);
                let worst = (0..g)
                    .map(|t| (rows[t * d + c] - out[t * d + c]).abs())
                    .fold(0f32, f32::max);
                if cover {
                    let best = (0..=255u8)
                        .map(sse)
                        .filter(|&(_, ok)| ok)
                        .map(|(e, _)| e)
                        .fold(f64::MAX, f64::min);
                    let (got, ok) = sse(rec[c * cb]);
                    assert!(ok, "channel {c}: byte does not cover");
                    assert!(got <= best * (1.0 + 1e-5) + 1e-12, "c{c}: {got} vs {best}");
                    assert!(
                        worst <= 0.5 * step * (1.0 + 1e-5),
                        "c{c}: {worst} > {step}/2"
                    );
                } else {
                    // Full: the least squared error of all 256 bytes; Near: never better.
                    let best = (0..=255u8).map(|m| sse(m).0).fold(f64::MAX, f64::min);
                    let got = sse(rec[c * cb]).0;
                    if search == CompactSearch::Full {
                        assert!(got <= best * (1.0 + 1e-5) + 1e-12, "c{c}: {got} vs {best}");
                    }
                    assert!(got >= best * (1.0 - 1e-5) - 1e-12);
                    if worst > 0.5 * step * (1.0 + 1e-5) {
                        clipped_mse = true;
                    }
                }
            }
        }
        assert!(clipped_mse, "the fixture should make the MSE search clip");
    }
}
