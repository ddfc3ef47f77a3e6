//! Dense f32 GEMV for decode: `y[n] = W[n][k] · x[k]`, one token.
//!
//! Decode reads every weight once per token, so this product is bound by memory bandwidth, not
//! arithmetic. The AVX2 path walks the rows one after another, so a block of rows is read as one
//! sequential stream (four FMA chains per row, `x` stays in L1), and the rayon pool splits the
//! rows into contiguous blocks. On Zen 3 this single stream keeps the hardware prefetcher ahead
//! better than four interleaved row streams (2.3 KB apart for k = 576) or software prefetch did
//! (docs/benchmarks.md, "f32 decode GEMV"). The scalar path is the reference the SIMD path is tested
//! against; both accumulate in f32, so results differ from an f64 dot product by the usual
//! `k · eps · Σ|w·x|` accumulation-order bound (see the tests).

use crate::{isa, Error, Isa, Result};
use rayon::prelude::*;

/// `y[j] = Σ_p w[j][p] · x[p]` for `j < n` (`w` is `[n][k]` row-major), on the path
/// [`isa::selected`] picks, threaded over the current rayon pool.
///
/// ```
/// let w = [1.0f32, 0.0, 0.5, 0.5, -1.0, 1.0]; // three rows of two
/// let mut y = [0f32; 3];
/// lowbit_kernels::gemv_f32::gemv(&[1.0, 2.0], &w, &mut y).unwrap();
/// assert_eq!(y, [1.0, 1.5, 1.0]);
/// ```
pub fn gemv(x: &[f32], w: &[f32], y: &mut [f32]) -> Result<()> {
    gemv_with(isa::selected(), x, w, y)
}

/// [`gemv`] on an explicit instruction-set path (clamped to what the CPU supports).
pub fn gemv_with(isa: Isa, x: &[f32], w: &[f32], y: &mut [f32]) -> Result<()> {
    let (k, n) = (x.len(), y.len());
    if w.len() != n * k {
        return Err(Error::Shape(format!(
            "gemv: w has {} values, want {n} rows x {k} = {}",
            w.len(),
            n * k
        )));
    }
    if n == 0 {
        return Ok(());
    }
    if k == 0 {
        y.fill(0.0);
        return Ok(());
    }
    let isa = Isa::clamp(isa);
    let threads = rayon::current_num_threads();
    // Blocks of at least 64 rows (and 64 KiB of weights) so the split never costs more than it
    // saves; 4 blocks per thread for balance.
    let min_rows = 64usize.max((16384 / k).next_multiple_of(4));
    if threads > 1 && n >= 2 * min_rows {
        let rows = n.div_ceil(4 * threads).next_multiple_of(4).max(min_rows);
        y.par_chunks_mut(rows).enumerate().for_each(|(c, yc)| {
            let r0 = c * rows;
            block(isa, x, &w[r0 * k..(r0 + yc.len()) * k], yc);
        });
    } else {
        block(isa, x, w, y);
    }
    Ok(())
}

/// Ask Linux to back the memory of a weight matrix with transparent huge pages (2 MiB), now:
/// `MADV_HUGEPAGE` then `MADV_COLLAPSE` on the 2 MiB-aligned range around `w`. Decode streams
/// every weight once per token, and with 4 KiB pages each 4 KiB is a new TLB entry and a new
/// page for the hardware prefetcher to train on; on huge pages the SmolLM2-shaped GEMV sequence
/// ran 5-25% faster on Zen 3 (docs/benchmarks.md, "f32 decode GEMV"). Both advices are semantically transparent: contents
/// never change, so rounding the range out to 2 MiB (which may cover neighbouring allocations)
/// only changes how memory is backed. Returns whether the collapse succeeded; failure (other
/// OS, THP disabled, kernel before 6.1, no huge page free) only means the weights stay on
/// small pages.
pub fn advise_huge_pages(w: &[f32]) -> bool {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        const MADV_HUGEPAGE: i32 = 14;
        const MADV_COLLAPSE: i32 = 25;
        extern "C" {
            fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
        }
        if w.is_empty() {
            return false;
        }
        let start = w.as_ptr() as usize;
        let lo = start / HUGE * HUGE;
        let hi = (start + std::mem::size_of_val(w)).div_ceil(HUGE) * HUGE;
        let addr = lo as *mut std::ffi::c_void;
        // SAFETY: `madvise` with MADV_HUGEPAGE / MADV_COLLAPSE never changes the contents of
        // memory nor its protections (it only changes how pages are backed), so it cannot break
        // this or any other allocation in [lo, hi); unmapped parts of the range only make it
        // return an error, which is ignored or reported as `false`.
        unsafe {
            madvise(addr, hi - lo, MADV_HUGEPAGE);
            madvise(addr, hi - lo, MADV_COLLAPSE) == 0
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = w;
        false
    }
}

/// `MADV_HUGEPAGE` (only) on the 2 MiB-aligned range around a not yet written buffer (e.g. a
/// `Vec`'s spare capacity), so that its pages are backed by transparent huge pages as they are
/// first written, which does not depend on a later collapse finding free huge pages. A hint with
/// the same transparency argument as [`advise_huge_pages`]; returns whether the kernel took it.
pub fn advise_huge_pages_before_write(buf: &[std::mem::MaybeUninit<f32>]) -> bool {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        const MADV_HUGEPAGE: i32 = 14;
        extern "C" {
            fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
        }
        if buf.is_empty() {
            return false;
        }
        let start = buf.as_ptr() as usize;
        let lo = start / HUGE * HUGE;
        let hi = (start + std::mem::size_of_val(buf)).div_ceil(HUGE) * HUGE;
        // SAFETY: MADV_HUGEPAGE never changes the contents or protections of memory, only how
        // pages are backed, so it cannot affect this or any other allocation in [lo, hi);
        // unmapped parts of the range only make it return an error.
        unsafe { madvise(lo as *mut std::ffi::c_void, hi - lo, MADV_HUGEPAGE) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = buf;
        false
    }
}

/// One contiguous block of rows (`w.len() == y.len() * x.len()`, checked by the caller).
fn block(isa: Isa, x: &[f32], w: &[f32], y: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => {
            // SAFETY: `Isa::clamp` returned a path the CPU supports, and AVX-512 implies
            // AVX2+FMA (see `Isa::supported`); the kernel reads `w` and `x` only within the
            // lengths the caller checked (`w.len() == y.len() * x.len()`).
            unsafe { avx2::block(x, w, y) }
        }
        _ => block_scalar(x, w, y),
    }
}

/// The scalar reference: one f32 accumulator per row, in index order.
pub fn block_scalar(x: &[f32], w: &[f32], y: &mut [f32]) {
    let k = x.len();
    for (j, yj) in y.iter_mut().enumerate() {
        let row = &w[j * k..(j + 1) * k];
        *yj = row.iter().zip(x).map(|(a, b)| a * b).sum();
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Horizontal sum of 8 lanes (shared with the packed kernels).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn hsum(v: __m256) -> f32 {
        // SAFETY: hsum256 needs AVX2+FMA+F16C, the same features this function is compiled
        // for (and that `Isa::Avx2` checks before any of this module runs).
        unsafe { crate::x86::hsum256(v) }
    }

    /// Mask of the first `r` (< 8) lanes for `maskload`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn tail_mask(r: usize) -> __m256i {
        let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(r as i32), idx)
    }

    /// # Safety
    /// AVX2, FMA and F16C must be available (as `Isa::Avx2` checks) and `w.len() == y.len() * x.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn block(x: &[f32], w: &[f32], y: &mut [f32]) {
        let k = x.len();
        let k64 = k - k % 64;
        let k32 = k - k % 32;
        let k8 = k - k % 8;
        let mask = tail_mask(k % 8);
        let xp = x.as_ptr();
        for (j, yj) in y.iter_mut().enumerate() {
            // SAFETY: row j exists (j < y.len() and w.len() == y.len() * k), so every offset
            // below is < k past its start; x offsets stay below k; the masked loads read only
            // lanes < k.
            unsafe {
                let r = w.as_ptr().add(j * k);
                let mut a = [_mm256_setzero_ps(); 4];
                let mut p = 0;
                // 64 values per iteration (two rounds of the four chains): fewer loop
                // instructions per byte keep more loads in flight; the accumulation order is
                // the same as 32 per iteration.
                while p < k64 {
                    for q in 0..8 {
                        a[q % 4] = _mm256_fmadd_ps(
                            _mm256_loadu_ps(r.add(p + 8 * q)),
                            _mm256_loadu_ps(xp.add(p + 8 * q)),
                            a[q % 4],
                        );
                    }
                    p += 64;
                }
                if p < k32 {
                    for (q, acc) in a.iter_mut().enumerate() {
                        *acc = _mm256_fmadd_ps(
                            _mm256_loadu_ps(r.add(p + 8 * q)),
                            _mm256_loadu_ps(xp.add(p + 8 * q)),
                            *acc,
                        );
                    }
                    p += 32;
                }
                while p < k8 {
                    a[0] = _mm256_fmadd_ps(
                        _mm256_loadu_ps(r.add(p)),
                        _mm256_loadu_ps(xp.add(p)),
                        a[0],
                    );
                    p += 8;
                }
                if p < k {
                    let x0 = _mm256_maskload_ps(xp.add(p), mask);
                    a[1] = _mm256_fmadd_ps(_mm256_maskload_ps(r.add(p), mask), x0, a[1]);
                }
                *yj = hsum(_mm256_add_ps(
                    _mm256_add_ps(a[0], a[1]),
                    _mm256_add_ps(a[2], a[3]),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dense::tests::lcg;

    /// Every supported path against an f64 dot product, on shapes with ragged row counts and
    /// ragged k (8-wide steps and masked tails of 1..7 past a 32-multiple), single- and
    /// multi-block. Tolerance: f32 accumulation of k products, |error| <= k * eps * Σ|w x|
    /// (a loose form of the standard bound γ_k Σ|w_i x_i|).
    #[test]
    fn every_path_matches_f64_on_ragged_shapes() {
        let mut s = 11u64;
        for &(n, k) in &[
            (1, 1),
            (3, 7),
            (4, 16),
            (5, 17),
            (9, 31),
            (130, 576),
            (257, 1536),
            (1031, 203),
            (64, 8),
            (7, 40),
            (6, 63),
            (2, 100),
        ] {
            let x: Vec<f32> = (0..k).map(|_| lcg(&mut s)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
            for isa in Isa::all_supported() {
                let mut y = vec![f32::NAN; n];
                gemv_with(isa, &x, &w, &mut y).unwrap();
                for j in 0..n {
                    let row = &w[j * k..(j + 1) * k];
                    let exact: f64 = row.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let mag: f64 = row
                        .iter()
                        .zip(&x)
                        .map(|(a, b)| (*a * *b).abs() as f64)
                        .sum();
                    let tol = k as f64 * f32::EPSILON as f64 * mag + 1e-30;
                    assert!(
                        (y[j] as f64 - exact).abs() <= tol,
                        "{isa:?} n={n} k={k} row {j}: {} vs {exact} (tol {tol})",
                        y[j]
                    );
                }
            }
        }
    }

    /// The AVX2 kernel's exact order, emulated lane by lane: 8-value chunk `q` of a row goes to
    /// chain `q % 4` while whole 32-value rounds remain, further 8-value chunks to chain 0, the
    /// masked tail to chain 1; the chains are added as `(a0 + a1) + (a2 + a3)` and the 8 lanes
    /// as `hsum256` does. Unrolling (64 values per iteration) must not change any bit.
    #[test]
    fn avx2_order_is_bit_exact() {
        fn emulate(x: &[f32], row: &[f32]) -> f32 {
            let k = x.len();
            let (k32, k8) = (k - k % 32, k - k % 8);
            let mut a = [[0f32; 8]; 4];
            for p in (0..k).step_by(8) {
                let c = if p < k32 {
                    (p / 8) % 4
                } else if p < k8 {
                    0
                } else {
                    1
                };
                for l in 0..8 {
                    let (w, v) = if p + l < k {
                        (row[p + l], x[p + l])
                    } else {
                        (0.0, 0.0)
                    };
                    a[c][l] = w.mul_add(v, a[c][l]);
                }
            }
            let v: Vec<f32> = (0..8)
                .map(|l| (a[0][l] + a[1][l]) + (a[2][l] + a[3][l]))
                .collect();
            let s: Vec<f32> = (0..4).map(|i| v[i] + v[i + 4]).collect();
            (s[0] + s[2]) + (s[1] + s[3])
        }
        let mut st = 17u64;
        for &(n, k) in &[
            (3, 576),
            (2, 1536),
            (4, 64),
            (5, 96),
            (3, 100),
            (2, 7),
            (3, 200),
        ] {
            let x: Vec<f32> = (0..k).map(|_| lcg(&mut st)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut st)).collect();
            for isa in Isa::all_supported() {
                if !matches!(isa, Isa::Avx2 | Isa::Avx512) {
                    continue;
                }
                let mut y = vec![f32::NAN; n];
                gemv_with(isa, &x, &w, &mut y).unwrap();
                for j in 0..n {
                    let want = emulate(&x, &w[j * k..(j + 1) * k]);
                    assert_eq!(
                        y[j].to_bits(),
                        want.to_bits(),
                        "{isa:?} n={n} k={k} row {j}"
                    );
                }
            }
        }
    }

    #[test]
    fn threaded_equals_single_block() {
        let mut s = 5u64;
        let (n, k) = (777, 300);
        let x: Vec<f32> = (0..k).map(|_| lcg(&mut s)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let mut a = vec![0f32; n];
        pool.install(|| gemv(&x, &w, &mut a)).unwrap();
        let mut b = vec![0f32; n];
        block(Isa::clamp(isa::selected()), &x, &w, &mut b);
        assert_eq!(
            a, b,
            "row blocks compute each row exactly as one block does"
        );
    }

    /// The huge-page advice leaves every value as it was (a wrong advice constant, e.g.
    /// MADV_DONTNEED, would zero the pages), on a buffer larger than one 2 MiB page.
    #[test]
    fn huge_page_advice_keeps_the_weights() {
        let mut s = 3u64;
        let w: Vec<f32> = (0..(3 << 20) / 4 + 13).map(|_| lcg(&mut s)).collect();
        let copy = w.clone();
        let _ = advise_huge_pages(&w);
        assert!(w == copy);
        let x: Vec<f32> = (0..(3 << 20) / 4 / 64).map(|_| lcg(&mut s)).collect();
        let n = w.len() / x.len();
        let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
        gemv(&x, &w[..n * x.len()], &mut a).unwrap();
        gemv(&x, &copy[..n * x.len()], &mut b).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(gemv(&[1.0; 3], &[1.0; 5], &mut [0.0; 2]).is_err());
        let mut y = [f32::NAN; 2];
        gemv(&[], &[], &mut y).unwrap();
        assert_eq!(y, [0.0, 0.0]);
    }
}
