//! A plain SIMD read-bandwidth probe: the baseline the quantized kernels are measured against
//! (`cargo xtask bench gemv`). It streams a buffer once, adding its 64-bit words into a few
//! independent vector accumulators, which is as close to "just read the bytes" as code gets.

use rayon::prelude::*;

use crate::isa::{self, Isa};

/// Wrapping sum of the buffer's little-endian 64-bit words (a trailing partial word is summed
/// byte-wise), on the path from [`isa::selected`].
pub fn sum_words(buf: &[u8]) -> u64 {
    let isa = isa::selected();
    let main = buf.len() / 128 * 128;
    let mut s = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 if isa.supported() => {
            // SAFETY: AVX2 is supported (Avx512 implies it); the function reads only buf[..main].
            unsafe { sum_avx2(&buf[..main]) }
        }
        _ => scalar(&buf[..main]),
    };
    for &b in &buf[main..] {
        s = s.wrapping_add(b as u64);
    }
    s
}

/// [`sum_words`] split over the current rayon pool in contiguous blocks.
pub fn par_sum_words(buf: &[u8]) -> u64 {
    let threads = rayon::current_num_threads().max(1);
    let block = buf.len().div_ceil(threads).div_ceil(4096).max(1) * 4096;
    buf.par_chunks(block)
        .map(sum_words)
        .reduce(|| 0, u64::wrapping_add)
}

fn scalar(buf: &[u8]) -> u64 {
    buf.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .fold(0u64, u64::wrapping_add)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_avx2(buf: &[u8]) -> u64 {
    use std::arch::x86_64::*;
    debug_assert!(buf.len().is_multiple_of(128));
    let mut a = [_mm256_setzero_si256(); 4];
    let p = buf.as_ptr();
    let mut i = 0;
    while i < buf.len() {
        for (k, acc) in a.iter_mut().enumerate() {
            // SAFETY: i + 32*k + 32 <= buf.len() because buf.len() is a multiple of 128.
            let v = unsafe { _mm256_loadu_si256(p.add(i + 32 * k) as *const __m256i) };
            *acc = _mm256_add_epi64(*acc, v);
        }
        i += 128;
    }
    let s = _mm256_add_epi64(_mm256_add_epi64(a[0], a[1]), _mm256_add_epi64(a[2], a[3]));
    let mut out = [0u64; 4];
    // SAFETY: out is 32 bytes.
    unsafe { _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, s) };
    out.iter().fold(0u64, |x, &y| x.wrapping_add(y))
}

#[cfg(test)]
mod tests {
    #[test]
    fn simd_sum_matches_scalar() {
        let buf: Vec<u8> = (0..1000u32).map(|i| (i * 31 + 7) as u8).collect();
        let main = 1000 / 128 * 128;
        let mut want = super::scalar(&buf[..main]);
        for &b in &buf[main..] {
            want = want.wrapping_add(b as u64);
        }
        assert_eq!(super::sum_words(&buf), want);
        assert_eq!(
            super::par_sum_words(&buf[..main]),
            super::scalar(&buf[..main])
        );
    }
}
