//! Scale selection: absmax, percentile clipping and MSE-optimal clipping search.
//!
//! Every element format derives its block parameters from a *clipping range* `[lo, hi]` of the
//! block's values (for symmetric formats only `c = max(-lo, hi)` matters):
//! * [`crate::quantize::ScaleSearch::AbsMax`]: the full range (`min`, `max`).
//! * [`crate::quantize::ScaleSearch::Percentile`]`(p)`: `c` = the `p`-th percentile (in percent,
//!   `0 < p <= 100`) of `|x|` for symmetric formats; `lo`/`hi` = the `(100-p)`-th / `p`-th
//!   percentiles of `x` for asymmetric ones (nearest-rank, no interpolation).
//! * [`crate::quantize::ScaleSearch::Mse`]`{ grid, min_ratio }`: the range is shrunk by each of
//!   `grid` ratios evenly spaced from 1 down to `min_ratio` (inclusive); the ratio whose
//!   quantize-dequantize reconstruction has the smallest squared error wins (the first, i.e. the
//!   largest ratio, on ties). This is the search of GPTQ's/llm-compressor's MSE observer.
//!
//! For ternary/binary blocks the "range" is replaced by the absmean: the ratio multiplies it, and
//! a percentile does not apply (absmean is used).

/// The `p`-th percentile (percent) of `|x|`, nearest rank (`p >= 100` gives the max).
pub fn percentile_abs(values: &[f32], p: f32) -> f32 {
    if values.is_empty() {
        return 0.0;
    }
    let mut a: Vec<f32> = values.iter().map(|x| x.abs()).collect();
    let k = rank(values.len(), p);
    *a.select_nth_unstable_by(k, f32::total_cmp).1
}

/// `(lo, hi)` = the `(100-p)`-th and `p`-th percentiles of `x` (nearest rank, symmetric ranks).
pub fn percentile_range(values: &[f32], p: f32) -> (f32, f32) {
    if values.is_empty() {
        return (0.0, 0.0);
    }
    let mut a = values.to_vec();
    let n = a.len();
    let hi = *a.select_nth_unstable_by(rank(n, p), f32::total_cmp).1;
    let lo = *a
        .select_nth_unstable_by(n - 1 - rank(n, p), f32::total_cmp)
        .1;
    (lo, hi)
}

fn rank(n: usize, p: f32) -> usize {
    let p = if p.is_nan() {
        100.0
    } else {
        p.clamp(0.0, 100.0)
    } as f64;
    // nearest rank: ceil(p/100 * n) - 1, within [0, n-1]
    (((p / 100.0) * n as f64).ceil() as usize).clamp(1, n) - 1
}

/// The shrink ratios of an MSE search: `grid` values from 1 down to `min_ratio` inclusive
/// (just `[1.0]` when `grid <= 1`).
pub fn shrink_ratios(grid: usize, min_ratio: f32) -> Vec<f32> {
    if grid <= 1 {
        return vec![1.0];
    }
    let lo = if min_ratio.is_finite() {
        min_ratio.clamp(0.0, 1.0)
    } else {
        1.0
    };
    (0..grid)
        .map(|i| 1.0 - (1.0 - lo) * i as f32 / (grid - 1) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<f32> = (1..=100).map(|i| i as f32).collect();
        assert_eq!(percentile_abs(&v, 100.0), 100.0);
        assert_eq!(percentile_abs(&v, 99.0), 99.0);
        assert_eq!(percentile_abs(&v, 50.0), 50.0);
        let neg: Vec<f32> = v.iter().map(|x| x - 50.5).collect();
        assert_eq!(percentile_range(&neg, 99.0), (-48.5, 48.5));
    }

    #[test]
    fn ratios() {
        assert_eq!(shrink_ratios(1, 0.5), vec![1.0]);
        assert_eq!(shrink_ratios(3, 0.5), vec![1.0, 0.75, 0.5]);
    }
}
