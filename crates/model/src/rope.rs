//! Rotary position embeddings in the Hugging Face layout ("rotate half"): within each head,
//! element `i < d/2` is paired with element `i + d/2`, and the pair at frequency index `i` is
//! rotated by `pos * inv_freq[i]`.
//!
//! GGUF files of the `llama` architecture store Q/K rows permuted for the interleaved layout
//! (pairs `(2i, 2i+1)`); [`crate::load`] undoes that permutation so that one RoPE serves all.

use crate::config::{ModelConfig, RopeScaling};

/// Inverse frequencies `theta^(-2i/d)` for `i < d/2`, rescaled as the config says (f64).
pub fn inv_freqs(cfg: &ModelConfig) -> Vec<f64> {
    let d = cfg.head_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64))
        .collect();
    match &cfg.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::FreqFactors(ff) => base.iter().zip(ff).map(|(f, s)| f / *s as f64).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => base
            .iter()
            .map(|&f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / factor
                } else {
                    let smooth =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * f / factor + smooth * f
                }
            })
            .collect(),
    }
}

/// Positions whose `(cos, sin)` values [`Rope`] tabulates when it is built (fewer when the
/// model's context is shorter); later positions are computed on the fly, the same way.
pub const TABLE_POSITIONS: usize = 4096;

/// Precomputed inverse frequencies of one model, and the `(cos, sin)` values of its first
/// positions.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
    head_dim: usize,
    /// `[pos][cos (head_dim / 2) | sin (head_dim / 2)]` for positions `0..table.len() / head_dim`.
    table: Vec<f32>,
}

impl Rope {
    /// Build from a config.
    pub fn new(cfg: &ModelConfig) -> Self {
        let inv_freq = inv_freqs(cfg);
        let half = inv_freq.len();
        let n = cfg.max_ctx.clamp(1, TABLE_POSITIONS);
        let mut table = vec![0f32; n * 2 * half];
        for (pos, row) in table.chunks_exact_mut(2 * half.max(1)).enumerate() {
            let (cos, sin) = row.split_at_mut(half);
            cos_sin_of(&inv_freq, pos, cos, sin);
        }
        Rope {
            inv_freq,
            head_dim: cfg.head_dim,
            table,
        }
    }

    /// `(cos, sin)` tables for one position, `head_dim / 2` values each (angles in f64).
    pub fn cos_sin(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        match self.tabulated(pos) {
            Some((c, s)) => {
                cos.iter_mut().zip(c).for_each(|(o, v)| *o = *v);
                sin.iter_mut().zip(s).for_each(|(o, v)| *o = *v);
            }
            None => cos_sin_of(&self.inv_freq, pos, cos, sin),
        }
    }

    /// The tabulated `(cos, sin)` of `pos`, if `pos` is in the table.
    fn tabulated(&self, pos: usize) -> Option<(&[f32], &[f32])> {
        let half = self.inv_freq.len();
        if half == 0 {
            return None;
        }
        let row = self.table.get(pos * 2 * half..(pos + 1) * 2 * half)?;
        Some(row.split_at(half))
    }

    /// Rotate `x`, laid out `[n_tokens][n_heads][head_dim]`, where token `t` sits at position
    /// `pos0 + t`.
    pub fn apply(&self, x: &mut [f32], n_tokens: usize, n_heads: usize, pos0: usize) {
        let d = self.head_dim;
        let half = d / 2;
        let mut cos_buf = vec![0f32; half];
        let mut sin_buf = vec![0f32; half];
        for t in 0..n_tokens {
            let (cos, sin) = match self.tabulated(pos0 + t) {
                Some((c, s)) => (c, s),
                None => {
                    cos_sin_of(&self.inv_freq, pos0 + t, &mut cos_buf, &mut sin_buf);
                    (&cos_buf[..], &sin_buf[..])
                }
            };
            for h in 0..n_heads {
                let v = &mut x[(t * n_heads + h) * d..][..d];
                let (a, b) = v.split_at_mut(half);
                for i in 0..half {
                    let (x0, x1) = (a[i], b[i]);
                    a[i] = x0 * cos[i] - x1 * sin[i];
                    b[i] = x1 * cos[i] + x0 * sin[i];
                }
            }
        }
    }
}

/// `cos` and `sin` of `pos * inv_freq[i]` (the angle in f64, rounded to f32 at the end).
fn cos_sin_of(inv_freq: &[f64], pos: usize, cos: &mut [f32], sin: &mut [f32]) {
    for ((f, c), s) in inv_freq.iter().zip(cos.iter_mut()).zip(sin.iter_mut()) {
        let a = pos as f64 * f;
        *c = a.cos() as f32;
        *s = a.sin() as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Arch;

    fn cfg(scaling: RopeScaling) -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            vocab_size: 8,
            hidden_size: 16,
            intermediate_size: 8,
            n_layers: 1,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 8,
            rope_theta: 10000.0,
            rope_scaling: scaling,
            rms_eps: 1e-5,
            max_ctx: 64,
            tie_embeddings: true,
            qkv_bias: false,
            bos_token_id: None,
            eos_token_id: None,
        }
    }

    /// Independent f64 reference: complex multiplication of (x_i + i x_{i+d/2}) by e^{i pos f}.
    #[test]
    fn matches_f64_complex_rotation() {
        let c = cfg(RopeScaling::None);
        let rope = Rope::new(&c);
        let (n, heads, d) = (3usize, 2usize, 8usize);
        let x: Vec<f32> = (0..n * heads * d)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let mut y = x.clone();
        rope.apply(&mut y, n, heads, 1000);
        for t in 0..n {
            for h in 0..heads {
                for i in 0..d / 2 {
                    let f = 1.0 / 10000f64.powf(2.0 * i as f64 / d as f64);
                    let a = (1000 + t) as f64 * f;
                    let base = (t * heads + h) * d;
                    let (re, im) = (x[base + i] as f64, x[base + i + d / 2] as f64);
                    let (r2, i2) = (re * a.cos() - im * a.sin(), re * a.sin() + im * a.cos());
                    assert!((y[base + i] as f64 - r2).abs() < 1e-5);
                    assert!((y[base + i + d / 2] as f64 - i2).abs() < 1e-5);
                }
            }
        }
    }

    /// The table and the on-the-fly computation give the same bits, across the table's end.
    #[test]
    fn tabulated_positions_match_direct_computation() {
        let mut c = cfg(RopeScaling::None);
        c.max_ctx = 1 << 20;
        let rope = Rope::new(&c);
        let (n, heads, d) = (5usize, 2usize, 8usize);
        let x: Vec<f32> = (0..n * heads * d)
            .map(|i| ((i * 29 % 13) as f32 - 6.0) / 5.0)
            .collect();
        for pos0 in [0, 7, TABLE_POSITIONS - 3, TABLE_POSITIONS + 11] {
            let mut y = x.clone();
            rope.apply(&mut y, n, heads, pos0);
            for t in 0..n {
                let (mut cos, mut sin) = ([0f32; 4], [0f32; 4]);
                cos_sin_of(&rope.inv_freq, pos0 + t, &mut cos, &mut sin);
                let (mut tc, mut ts) = ([0f32; 4], [0f32; 4]);
                rope.cos_sin(pos0 + t, &mut tc, &mut ts);
                assert_eq!((tc, ts), (cos, sin), "position {}", pos0 + t);
                for h in 0..heads {
                    let b = (t * heads + h) * d;
                    for i in 0..d / 2 {
                        let (x0, x1) = (x[b + i], x[b + i + d / 2]);
                        assert_eq!(y[b + i], x0 * cos[i] - x1 * sin[i]);
                        assert_eq!(y[b + i + d / 2], x1 * cos[i] + x0 * sin[i]);
                    }
                }
            }
        }
        // A short context tabulates only its own positions.
        assert_eq!(Rope::new(&cfg(RopeScaling::None)).table.len(), 64 * d);
    }

    #[test]
    fn rotation_preserves_relative_dot_products() {
        // <R(p)q, R(p')k> depends only on p - p'.
        let rope = Rope::new(&cfg(RopeScaling::None));
        let q: Vec<f32> = (0..8).map(|i| (i as f32 * 0.7).sin()).collect();
        let k: Vec<f32> = (0..8).map(|i| (i as f32 * 1.3).cos()).collect();
        let dot = |p: usize, pk: usize| {
            let (mut a, mut b) = (q.clone(), k.clone());
            rope.apply(&mut a, 1, 1, p);
            rope.apply(&mut b, 1, 1, pk);
            a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()
        };
        assert!((dot(5, 2) - dot(105, 102)).abs() < 1e-4);
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64.0,
        };
        let mut c = cfg(s);
        c.rope_theta = 500000.0;
        let plain = inv_freqs(&cfg(RopeScaling::None).clone_with_theta(500000.0));
        let scaled = inv_freqs(&c);
        // i = 0: wavelength 2*pi < 64/4, kept; last: wavelength huge, divided by 8.
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[3] - plain[3] / 8.0).abs() < 1e-15);
        for (s, p) in scaled.iter().zip(&plain) {
            assert!(*s <= *p && *s >= p / 8.0 - 1e-18);
        }
    }

    impl ModelConfig {
        fn clone_with_theta(&self, t: f64) -> Self {
            let mut c = self.clone();
            c.rope_theta = t;
            c
        }
    }
}
