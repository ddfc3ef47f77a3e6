//! RoPE and Hadamard helpers of pre-RoPE KIVI keys (`rope=pre`): the per-group position
//! tables, undoing RoPE before quantization, and re-applying it (and un-rotating) to decoded
//! channel-major groups in the attention kernel.

/// RoPE table of one body group of `g` tokens at absolute positions `pos0..pos0 + g`, for
/// the "rotate half" layout (channel `i < d/2` paired with `i + d/2`, rotated by
/// `pos * inv_freq[i]`): `out[i * g + t] = cos`, `out[(half + i) * g + t] = sin` (angles in f64).
pub fn rope_block(inv_freq: &[f64], g: usize, pos0: usize, out: &mut [f32]) {
    let half = inv_freq.len();
    for (i, &f) in inv_freq.iter().enumerate() {
        for t in 0..g {
            let a = (pos0 + t) as f64 * f;
            out[i * g + t] = a.cos() as f32;
            out[(half + i) * g + t] = a.sin() as f32;
        }
    }
}

/// Undo RoPE on `g` token-major key rows (`rows`: `[g][d]`) with a [`rope_block`] table:
/// `(a, b) -> (a cos + b sin, b cos - a sin)`.
pub fn unrope_rows(rows: &mut [f32], d: usize, g: usize, tab: &[f32]) {
    let half = d / 2;
    for t in 0..g {
        let r = &mut rows[t * d..][..d];
        for i in 0..half {
            let (c, s) = (tab[i * g + t], tab[(half + i) * g + t]);
            let (a, b) = (r[i], r[half + i]);
            r[i] = a * c + b * s;
            r[half + i] = b * c - a * s;
        }
    }
}

/// Normalized Walsh-Hadamard transform (its own inverse) of one decoded group stored
/// channel-major (`kt[c * ld + off..][..g]`): the butterflies run across channels on whole
/// token rows.
#[inline(always)]
pub fn hadamard_cm(kt: &mut [f32], d: usize, g: usize, ld: usize, off: usize) {
    let mut h = 1;
    while h < d {
        for i in (0..d).step_by(2 * h) {
            for j in i..i + h {
                let (lo, hi) = kt.split_at_mut((j + h) * ld);
                let a = &mut lo[j * ld + off..][..g];
                let b = &mut hi[off..][..g];
                for t in 0..g {
                    let (x, y) = (a[t], b[t]);
                    a[t] = x + y;
                    b[t] = x - y;
                }
            }
        }
        h *= 2;
    }
    let s = 1.0 / (d as f32).sqrt();
    for c in 0..d {
        kt[c * ld + off..][..g].iter_mut().for_each(|v| *v *= s);
    }
}

/// Apply RoPE to one decoded group stored channel-major (`kt[c * ld + off..][..g]`, as
/// [`decode_group_cm`] writes it) with a [`rope_block`] table: `(a, b) -> (a cos - b sin,
/// b cos + a sin)`.
#[inline(always)]
pub fn rope_cm(kt: &mut [f32], d: usize, g: usize, ld: usize, off: usize, tab: &[f32]) {
    let half = d / 2;
    for i in 0..half {
        let (lo, hi) = kt.split_at_mut((half + i) * ld);
        let a = &mut lo[i * ld + off..][..g];
        let b = &mut hi[off..][..g];
        let c = &tab[i * g..][..g];
        let s = &tab[(half + i) * g..][..g];
        for t in 0..g {
            let (x, y) = (a[t], b[t]);
            a[t] = x * c[t] - y * s[t];
            b[t] = y * c[t] + x * s[t];
        }
    }
}
