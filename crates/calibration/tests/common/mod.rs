//! Synthetic layers for the calibration tests: correlated inputs with a few outlier channels
//! (as in real LLM activations) and Gaussian-ish weights.
#![allow(dead_code)]

use lowbit_numerics::rounding::SplitMix64;
use lowbit_numerics::Scheme;

/// SplitMix64-based deterministic generator (the seed whitened once).
pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(SplitMix64(seed ^ 0x9E37_79B9_7F4A_7C15))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    pub fn uniform(&mut self) -> f64 {
        self.0.uniform()
    }
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

/// A synthetic linear layer and its calibration inputs.
pub struct Layer {
    pub rows: usize,
    pub cols: usize,
    pub w: Vec<f32>,
    pub n: usize,
    pub x: Vec<f32>,
}

/// `rows x cols` weights (Gaussian, std 0.05, a few heavy entries) and `n` input rows that are
/// correlated (low-rank mixing plus noise) with `n_outliers` channels scaled by `outlier_gain`.
pub fn layer(
    rows: usize,
    cols: usize,
    n: usize,
    n_outliers: usize,
    outlier_gain: f32,
    seed: u64,
) -> Layer {
    let mut rng = Rng::new(seed);
    let mut w: Vec<f32> = (0..rows * cols).map(|_| 0.05 * rng.normal()).collect();
    for _ in 0..rows * cols / 200 {
        let i = (rng.next_u64() % (rows * cols) as u64) as usize;
        w[i] *= 4.0;
    }
    let rank = 16.min(cols);
    let mix: Vec<f32> = (0..rank * cols).map(|_| rng.normal()).collect();
    let gains: Vec<f32> = (0..cols).map(|_| 0.5 + rng.uniform() as f32).collect();
    let mut outliers = Vec::new();
    while outliers.len() < n_outliers {
        let j = (rng.next_u64() % cols as u64) as usize;
        if !outliers.contains(&j) {
            outliers.push(j);
        }
    }
    let mut x = vec![0f32; n * cols];
    let mut z = vec![0f32; rank];
    for t in 0..n {
        for v in z.iter_mut() {
            *v = rng.normal();
        }
        for j in 0..cols {
            let mut s = 0.3 * rng.normal();
            for k in 0..rank {
                s += z[k] * mix[k * cols + j] * 0.25;
            }
            x[t * cols + j] = s * gains[j];
        }
        for &j in &outliers {
            x[t * cols + j] *= outlier_gain;
        }
    }
    Layer {
        rows,
        cols,
        w,
        n,
        x,
    }
}

/// A scheme by its short name.
pub fn scheme(name: &str) -> Scheme {
    Scheme::from_name(name).unwrap()
}
