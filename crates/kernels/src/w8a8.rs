//! W8A8: INT8 per-channel weights x per-token dynamic INT8 activations, int32 accumulation,
//! scales applied once per output.
//!
//! `y[t][r] = sx[t] * sw[r] * sum_k xq[t][k] * wq[r][k]` with `xq, wq` in `[-127, 127]` (weights
//! may also be -128). Paths:
//! * AVX-512 VNNI: `vpdpbusd` on `u8(xq + 128) x i8(wq)`, corrected by `128 * sum_k wq[r][k]`
//!   (precomputed per row); 64 multiply-adds per instruction.
//! * AVX2: `vpmaddubsw(|wq|, sign(xq, wq))` then `vpmaddwd` with ones: with `|xq| <= 127` and
//!   `|wq| <= 128` a pair sum is at most 32512, so the i16 stage never saturates.
//! * AMX-INT8 ([`crate::amx`]), for batches of at least [`amx_min_tokens`] tokens where the
//!   CPU and OS allow it: `tdpbssd` on 16 x 64-byte tiles, s8 x s8 directly (no offset), the
//!   weights packed a second time into tile layout when the layer is built. `LOWBIT_AMX=0`
//!   turns it off (and skips that packing); so does forcing `LOWBIT_KERNEL` below `avx512`.
//! * scalar reference.
//!
//! The integer sums are exact (|sum| <= cols * 127 * 128 < 2^31 for cols < 131072), so every path
//! returns bit-identical integers; only the final `f32` scaling rounds.

use lowbit_numerics::{ElemFormat, Granularity, QuantizedTensor};
use rayon::prelude::*;

use crate::amx::{self, AmxPackedB};
use crate::isa::{self, Isa};
use crate::{Error, Result};

/// The W8A8 implementation that runs a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum W8A8Path {
    /// Portable integer reference.
    Scalar,
    /// AVX2 `vpmaddubsw` / `vpmaddwd`.
    Avx2,
    /// AVX-512 VNNI `vpdpbusd`.
    Avx512Vnni,
    /// AMX-INT8 tiles (`tdpbssd`).
    Amx,
}

impl W8A8Path {
    /// Lower-case name (`scalar`, `avx2`, `avx512-vnni`, `amx`).
    pub fn name(self) -> &'static str {
        match self {
            W8A8Path::Scalar => "scalar",
            W8A8Path::Avx2 => "avx2",
            W8A8Path::Avx512Vnni => "avx512-vnni",
            W8A8Path::Amx => "amx",
        }
    }

    /// The non-AMX path an [`Isa`] gives (clamped to the CPU).
    pub fn from_isa(isa: Isa) -> W8A8Path {
        match Isa::clamp(isa) {
            Isa::Scalar => W8A8Path::Scalar,
            Isa::Avx512 if isa::has_avx512_vnni() => W8A8Path::Avx512Vnni,
            _ => W8A8Path::Avx2,
        }
    }

    /// The path [`W8A8Linear::forward`] takes for `n_tokens` tokens in this process: AMX when
    /// [`amx::available`], `n_tokens >= amx_min_tokens()` and [`isa::selected`] is AVX-512,
    /// else the path of [`isa::selected`].
    pub fn selected(n_tokens: usize) -> W8A8Path {
        let sel = isa::selected();
        if sel == Isa::Avx512 && n_tokens >= amx_min_tokens() && amx::available() {
            W8A8Path::Amx
        } else {
            W8A8Path::from_isa(sel)
        }
    }
}

/// Fewest tokens per call for which [`W8A8Linear::forward`] uses AMX (a tile holds 16 tokens,
/// fewer are zero padding): `LOWBIT_AMX_MIN_TOKENS` if set to a number, else 4. Read once.
pub fn amx_min_tokens() -> usize {
    static MIN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| {
        std::env::var("LOWBIT_AMX_MIN_TOKENS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4)
    })
}

/// Rows per tile and the column padding unit of the packed weights.
const TR: usize = 4;
const KPAD: usize = 64;
/// Largest supported `cols` (keeps every int32 sum exact).
pub const MAX_COLS: usize = 1 << 17;

/// Quantize activations per token: `scale[t] = max|x[t]| / 127`, `q = round_ties_even(x / scale)`
/// clamped to `[-127, 127]` (a zero row gets scale 0 and codes 0).
///
/// # Panics
/// If `x.len() != n_tokens * cols`; use [`try_quantize_activations_int8_per_token`] for a typed error.
pub fn quantize_activations_int8_per_token(
    x: &[f32],
    n_tokens: usize,
    cols: usize,
) -> (Vec<i8>, Vec<f32>) {
    try_quantize_activations_int8_per_token(x, n_tokens, cols).expect("x.len() == n_tokens * cols")
}

/// [`quantize_activations_int8_per_token`] returning [`Error::Shape`] on a length mismatch.
pub fn try_quantize_activations_int8_per_token(
    x: &[f32],
    n_tokens: usize,
    cols: usize,
) -> Result<(Vec<i8>, Vec<f32>)> {
    if x.len() != n_tokens * cols {
        return Err(Error::Shape(format!(
            "activation quantization: x has {} values, want {n_tokens} x {cols}",
            x.len()
        )));
    }
    let mut q = vec![0i8; x.len()];
    let mut s = vec![0f32; n_tokens];
    if cols == 0 {
        return Ok((q, s));
    }
    q.par_chunks_mut(cols)
        .zip(s.par_iter_mut())
        .zip(x.par_chunks(cols))
        .for_each(|((qr, sc), row)| {
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            if amax == 0.0 || !amax.is_finite() {
                return;
            }
            let scale = amax / 127.0;
            *sc = scale;
            let inv = 1.0 / scale;
            for (d, &v) in qr.iter_mut().zip(row) {
                *d = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
            }
        });
    Ok((q, s))
}

/// An INT8 per-channel (or per-tensor) symmetric weight matrix packed for the W8A8 kernels.
#[derive(Debug, Clone)]
pub struct W8A8Linear {
    rows: usize,
    cols: usize,
    kp: usize,
    /// `[rows rounded up to 4][kp]` signed codes, zero padded.
    w: Vec<i8>,
    /// Per (padded) row: `128 * sum_k w[r][k]` (the VNNI unsigned-offset correction).
    wsum128: Vec<i32>,
    /// Per row weight scale.
    ws: Vec<f32>,
    /// The same codes in AMX tile layout, built when [`amx::available`].
    amx: Option<AmxPackedB>,
}

impl W8A8Linear {
    /// Pack an INT8 symmetric per-channel or per-tensor tensor (no `g_idx`); anything else is
    /// [`Error::Unsupported`].
    pub fn new(q: &QuantizedTensor) -> Result<Self> {
        q.validate()?;
        let ok_gran = matches!(
            q.scheme.granularity,
            Granularity::PerChannel | Granularity::PerTensor
        );
        if q.scheme.elem != (ElemFormat::Int { bits: 8 })
            || q.scheme.asymmetric
            || !ok_gran
            || q.g_idx.is_some()
        {
            return Err(Error::Unsupported(format!(
                "W8A8 needs INT8 symmetric per-channel/per-tensor weights without g_idx, got {:?}",
                q.scheme
            )));
        }
        if q.cols > MAX_COLS {
            return Err(Error::Unsupported(format!(
                "W8A8 supports at most {MAX_COLS} columns"
            )));
        }
        let (rows, cols) = (q.rows, q.cols);
        let kp = cols.div_ceil(KPAD) * KPAD;
        let rp = rows.div_ceil(TR) * TR;
        let mut w = vec![0i8; rp * kp];
        let mut wsum128 = vec![0i32; rp];
        let mut ws = vec![0f32; rows];
        for r in 0..rows {
            let mut sum = 0i32;
            for c in 0..cols {
                let v = (q.data[r * cols + c] as i32 - 128) as i8;
                w[r * kp + c] = v;
                sum += v as i32;
            }
            wsum128[r] = 128 * sum;
            ws[r] = match q.scheme.granularity {
                Granularity::PerTensor => q.scales[0],
                _ => q.scales[r],
            };
        }
        let amx = if amx::available() {
            Some(AmxPackedB::new(&w, rows, cols, kp)?)
        } else {
            None
        };
        Ok(W8A8Linear {
            rows,
            cols,
            kp,
            w,
            wsum128,
            ws,
            amx,
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of packed weights read per call (the row-major codes; the AMX tile copy, where
    /// built, is [`W8A8Linear::amx_weight_bytes`] more in memory).
    pub fn weight_bytes(&self) -> usize {
        self.w.len()
    }

    /// Bytes of the AMX tile-layout copy of the weights (0 where AMX is not used).
    pub fn amx_weight_bytes(&self) -> usize {
        self.amx.as_ref().map_or(0, AmxPackedB::bytes)
    }

    /// The path [`W8A8Linear::forward`] takes for `n_tokens` tokens ([`W8A8Path::selected`]).
    pub fn path_for(&self, n_tokens: usize) -> W8A8Path {
        match W8A8Path::selected(n_tokens) {
            W8A8Path::Amx if self.amx.is_none() => W8A8Path::from_isa(isa::selected()),
            p => p,
        }
    }

    /// Quantize `x` per token and compute `y = x · Wᵀ` with integer dot products
    /// (path from [`W8A8Linear::path_for`]).
    pub fn forward(&self, x: &[f32], n_tokens: usize, y: &mut [f32]) -> Result<()> {
        self.forward_path(self.path_for(n_tokens), x, n_tokens, y)
    }

    /// [`W8A8Linear::forward`] on an explicit path; [`Error::Unsupported`] if this CPU (or
    /// this layer, built without the AMX copy) cannot run it.
    pub fn forward_path(
        &self,
        path: W8A8Path,
        x: &[f32],
        n_tokens: usize,
        y: &mut [f32],
    ) -> Result<()> {
        let (xq, xs) = try_quantize_activations_int8_per_token(x, n_tokens, self.cols)?;
        self.forward_quantized_path(path, &xq, &xs, n_tokens, y)
    }

    /// [`W8A8Linear::forward_quantized_with`] on an explicit [`W8A8Path`]; [`Error::Unsupported`]
    /// if this CPU (or this layer, built without the AMX copy) cannot run it.
    pub fn forward_quantized_path(
        &self,
        path: W8A8Path,
        xq: &[i8],
        xs: &[f32],
        n_tokens: usize,
        y: &mut [f32],
    ) -> Result<()> {
        let isa = match path {
            W8A8Path::Amx => {
                self.check_quantized(xq, xs, n_tokens, y)?;
                let Some(b) = &self.amx else {
                    return Err(Error::Unsupported(format!(
                        "W8A8 AMX path: this layer has no AMX weights ({})",
                        amx::detect().err().unwrap_or_else(|| "LOWBIT_AMX=0".into())
                    )));
                };
                let acc = amx::gemm_i32(b, xq, n_tokens)?;
                self.scale_rows(&acc, xs, n_tokens, y);
                return Ok(());
            }
            W8A8Path::Scalar => Isa::Scalar,
            W8A8Path::Avx2 => Isa::Avx2,
            W8A8Path::Avx512Vnni => Isa::Avx512,
        };
        if W8A8Path::from_isa(isa) != path {
            return Err(Error::Unsupported(format!(
                "W8A8 path {} not supported by this CPU",
                path.name()
            )));
        }
        self.forward_quantized_with(isa, xq, xs, n_tokens, y)
    }

    /// `y[t][r] = acc[t][r] * (xs[t] * ws[r])`, the same rounding as the SIMD paths.
    fn scale_rows(&self, acc: &[i32], xs: &[f32], n_tokens: usize, y: &mut [f32]) {
        if self.rows == 0 {
            return;
        }
        y[..n_tokens * self.rows]
            .par_chunks_mut(self.rows)
            .zip(acc.par_chunks(self.rows))
            .zip(xs.par_iter())
            .for_each(|((yt, at), &s)| {
                for ((d, &a), &w) in yt.iter_mut().zip(at).zip(&self.ws) {
                    *d = a as f32 * (s * w);
                }
            });
    }

    fn check_quantized(&self, xq: &[i8], xs: &[f32], n_tokens: usize, y: &[f32]) -> Result<()> {
        if xq.len() != n_tokens * self.cols
            || xs.len() != n_tokens
            || y.len() != n_tokens * self.rows
        {
            return Err(Error::Shape(format!(
                "W8A8 forward: xq {} (want {n_tokens}x{}), scales {} (want {n_tokens}), y {} (want {n_tokens}x{})",
                xq.len(),
                self.cols,
                xs.len(),
                y.len(),
                self.rows
            )));
        }
        if xq.contains(&i8::MIN) {
            return Err(Error::Shape(
                "W8A8 activations must lie in [-127, 127]".into(),
            ));
        }
        Ok(())
    }

    /// The int32 sums `sum_k xq[t][k] * wq[r][k]` (`[n_tokens][rows]`) of the AMX blocked
    /// product with emulated tiles (runs anywhere; packs the tile layout if this layer has none).
    pub fn amx_int_dot_emulated(&self, xq: &[i8], n_tokens: usize) -> Result<Vec<i32>> {
        match &self.amx {
            Some(b) => amx::gemm_i32_emulated(b, xq, n_tokens),
            None => amx::gemm_i32_emulated(
                &AmxPackedB::new(&self.w, self.rows, self.cols, self.kp)?,
                xq,
                n_tokens,
            ),
        }
    }

    /// The int32 sums of the AMX product on the hardware tiles (packs the tile layout if this
    /// layer has none); [`Error::Unsupported`] where AMX is missing ([`amx::detect`]).
    pub fn amx_int_dot(&self, xq: &[i8], n_tokens: usize) -> Result<Vec<i32>> {
        match &self.amx {
            Some(b) => amx::gemm_i32(b, xq, n_tokens),
            None => amx::gemm_i32(
                &AmxPackedB::new(&self.w, self.rows, self.cols, self.kp)?,
                xq,
                n_tokens,
            ),
        }
    }

    /// `y[t][r] = xs[t] * ws[r] * sum_k xq[t][k] * wq[r][k]` on an explicit path (clamped to
    /// what the CPU supports; never AMX, see [`W8A8Linear::forward_quantized_path`]). `xq`
    /// values must be in `[-127, 127]`.
    pub fn forward_quantized_with(
        &self,
        isa: Isa,
        xq: &[i8],
        xs: &[f32],
        n_tokens: usize,
        y: &mut [f32],
    ) -> Result<()> {
        self.check_quantized(xq, xs, n_tokens, y)?;
        if n_tokens == 0 || self.rows == 0 {
            return Ok(());
        }
        let isa = Isa::clamp(isa);
        let vnni = isa == Isa::Avx512 && isa::has_avx512_vnni();
        // padded activations: signed for AVX2/scalar, +128 (as u8 bits) for VNNI
        let mut xp = vec![if vnni { -128i8 } else { 0 }; n_tokens * self.kp];
        xp.par_chunks_mut(self.kp)
            .zip(xq.par_chunks(self.cols.max(1)))
            .for_each(|(d, src)| {
                for (d, &v) in d.iter_mut().zip(src) {
                    *d = if vnni { (v as u8 ^ 0x80) as i8 } else { v };
                }
            });
        let ntiles = self.rows.div_ceil(TR);
        let threads = rayon::current_num_threads().max(1);
        let per = ntiles.div_ceil(threads * 4).max(1);
        let blocks: Vec<(usize, Vec<i32>)> = (0..ntiles.div_ceil(per))
            .into_par_iter()
            .map(|bi| {
                let (t0, t1) = (bi * per, ((bi + 1) * per).min(ntiles));
                let mut out = vec![0i32; (t1 - t0) * TR * n_tokens];
                for tile in t0..t1 {
                    let w = &self.w[tile * TR * self.kp..(tile + 1) * TR * self.kp];
                    let mut tok = 0;
                    while tok < n_tokens {
                        let nt = (n_tokens - tok).min(4);
                        let mut acc = [[0i32; TR]; 4];
                        let x = &xp[tok * self.kp..(tok + nt) * self.kp];
                        dot_tile(isa, vnni, w, x, self.kp, nt, &mut acc);
                        for (t, a) in acc.iter().enumerate().take(nt) {
                            for (r, &v) in a.iter().enumerate() {
                                let corr = if vnni { self.wsum128[tile * TR + r] } else { 0 };
                                out[(tok + t) * (t1 - t0) * TR + (tile - t0) * TR + r] = v - corr;
                            }
                        }
                        tok += nt;
                    }
                }
                (t0, out)
            })
            .collect();
        for (t0, out) in blocks {
            let r0 = t0 * TR;
            let nrows = out.len() / n_tokens;
            let take = nrows.min(self.rows - r0);
            for t in 0..n_tokens {
                for i in 0..take {
                    y[t * self.rows + r0 + i] =
                        out[t * nrows + i] as f32 * (xs[t] * self.ws[r0 + i]);
                }
            }
        }
        Ok(())
    }

    /// The exact int32 sums `sum_k xq[t][k] * wq[r][k]` (scalar), for tests.
    pub fn int_dot_reference(&self, xq: &[i8], n_tokens: usize) -> Vec<i32> {
        let mut out = vec![0i32; n_tokens * self.rows];
        for t in 0..n_tokens {
            for r in 0..self.rows {
                out[t * self.rows + r] = (0..self.cols)
                    .map(|c| xq[t * self.cols + c] as i32 * self.w[r * self.kp + c] as i32)
                    .sum();
            }
        }
        out
    }
}

fn dot_tile(
    isa: Isa,
    vnni: bool,
    w: &[i8],
    x: &[i8],
    kp: usize,
    nt: usize,
    acc: &mut [[i32; TR]; 4],
) {
    assert!(
        w.len() == TR * kp
            && x.len() == nt * kp
            && kp.is_multiple_of(KPAD)
            && (1..=4).contains(&nt)
    );
    #[cfg(target_arch = "x86_64")]
    {
        if vnni {
            // SAFETY: AVX-512 F/BW + VNNI present (`vnni` is only true when detected); lengths asserted.
            unsafe { x86w::dot_vnni(w, x, kp, nt, acc) };
            return;
        }
        if isa != Isa::Scalar {
            // SAFETY: isa was clamped to a supported path, so AVX2 is present; lengths asserted.
            unsafe { x86w::dot_avx2(w, x, kp, nt, acc) };
            return;
        }
    }
    let _ = (isa, vnni);
    for t in 0..nt {
        for r in 0..TR {
            acc[t][r] = w[r * kp..(r + 1) * kp]
                .iter()
                .zip(&x[t * kp..(t + 1) * kp])
                .map(|(&a, &b)| a as i32 * b as i32)
                .sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // index loops over register arrays are deliberate
mod x86w {
    use super::{KPAD, TR};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn hsum_i32_256(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }

    /// # Safety
    /// AVX2 present; `w.len() == 4*kp`, `x.len() == nt*kp`, `kp % 64 == 0`, `nt <= 4`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot_avx2(
        w: &[i8],
        x: &[i8],
        kp: usize,
        nt: usize,
        acc: &mut [[i32; TR]; 4],
    ) {
        let ones = _mm256_set1_epi16(1);
        let mut a = [[_mm256_setzero_si256(); TR]; 4];
        let mut k = 0;
        while k < kp {
            let mut wa = [_mm256_setzero_si256(); TR];
            let mut wv = [_mm256_setzero_si256(); TR];
            for r in 0..TR {
                // SAFETY: r*kp + k + 32 <= 4*kp = w.len().
                wv[r] = unsafe { _mm256_loadu_si256(w.as_ptr().add(r * kp + k) as *const __m256i) };
                wa[r] = _mm256_abs_epi8(wv[r]);
            }
            for t in 0..nt {
                // SAFETY: t*kp + k + 32 <= nt*kp = x.len().
                let xv =
                    unsafe { _mm256_loadu_si256(x.as_ptr().add(t * kp + k) as *const __m256i) };
                for r in 0..TR {
                    let p = _mm256_maddubs_epi16(wa[r], _mm256_sign_epi8(xv, wv[r]));
                    a[t][r] = _mm256_add_epi32(a[t][r], _mm256_madd_epi16(p, ones));
                }
            }
            k += 32;
        }
        debug_assert!(kp.is_multiple_of(KPAD));
        for t in 0..nt {
            for r in 0..TR {
                acc[t][r] = hsum_i32_256(a[t][r]);
            }
        }
    }

    /// # Safety
    /// AVX-512 F/BW and VNNI present; same bounds as [`dot_avx2`]; `x` holds `xq + 128` as u8 bits.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn dot_vnni(
        w: &[i8],
        x: &[i8],
        kp: usize,
        nt: usize,
        acc: &mut [[i32; TR]; 4],
    ) {
        let mut a = [[_mm512_setzero_si512(); TR]; 4];
        let mut k = 0;
        while k < kp {
            let mut wv = [_mm512_setzero_si512(); TR];
            for (r, v) in wv.iter_mut().enumerate() {
                // SAFETY: r*kp + k + 64 <= w.len() (kp is a multiple of 64).
                *v = unsafe { _mm512_loadu_si512(w.as_ptr().add(r * kp + k) as *const _) };
            }
            for t in 0..nt {
                // SAFETY: t*kp + k + 64 <= x.len().
                let xv = unsafe { _mm512_loadu_si512(x.as_ptr().add(t * kp + k) as *const _) };
                for r in 0..TR {
                    a[t][r] = _mm512_dpbusd_epi32(a[t][r], xv, wv[r]);
                }
            }
            k += 64;
        }
        for t in 0..nt {
            for r in 0..TR {
                acc[t][r] = _mm512_reduce_add_epi32(a[t][r]);
            }
        }
    }
}
