//! Quantize f32 matrices to [`QuantizedTensor`]s and back, for every element format and
//! granularity of [`Scheme`].
//!
//! # Conventions
//! * **INTk symmetric** (`bits` 2..=8): `scale = c / (2^(b-1) - 1)` where `c` is the block's
//!   clipping value (absmax by default), rounded to the scale dtype; `q = clamp(round_even(x /
//!   scale), -2^(b-1), 2^(b-1) - 1)`, stored as `q + 2^(b-1)`. For 4 bits: `scale = absmax / 7`,
//!   codes in `[-8, 7]` (the RTN reference of `shared/models/README.md`).
//! * **INTk asymmetric**: `lo = min(min(x), 0)`, `hi = max(max(x), 0)`, `scale = (hi - lo) /
//!   (2^b - 1)` (rounded to the scale dtype), `zero_point = clamp(round_even(-lo / scale), 0,
//!   2^b - 1)`, `u = clamp(round_even(x / scale) + zero_point, 0, 2^b - 1)` (GPTQ's quantizer).
//! * An all-zero block has scale 0 and decodes to exact zeros.
//! * **Float elements with an f32/f16/bf16 scale** (FP8 per channel / 2-D block): `scale = c /
//!   max_finite`, element = `FloatFormat::encode(x / scale, rounding, Saturate)`.
//! * **E8M0 scales** are MX (see [`crate::mx`]), **E4M3 scales** NVFP4 (see [`crate::nvfp4`]),
//!   [`ElemFormat::Nf4`] see [`crate::nf4`], ternary/binary see [`crate::ternary`].
//! * Dequantization of every format is `(elem(code) - zero) * s` in f32 with `s` the block's
//!   multiplier (`scale`; `scale / global_scale` for E4M3 scales; `scale / 2^(b-2)` for MXINT).
//!
//! # Bad input
//! Shapes that do not match, empty tensors, invalid schemes and (for every format except MX, whose
//! spec defines NaN blocks) NaN or infinite inputs are typed errors; nothing panics.
//!
//! ```
//! use lowbit_numerics::quantize::{quantize, QuantOptions};
//! use lowbit_numerics::Scheme;
//! let w: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 - 50.0) / 10.0).collect();
//! let scheme = Scheme::from_name("int4-g128-sym").unwrap();
//! let q = quantize(&w, 2, 128, &scheme, &QuantOptions::default()).unwrap();
//! let back = q.dequantize().unwrap();
//! for (g, (x, y)) in w.chunks(128).zip(back.chunks(128)).enumerate() {
//!     let s = q.scales[g];
//!     assert!(x.iter().zip(y).all(|(a, b)| (a - b).abs() <= s / 2.0 + 1e-6));
//! }
//! ```

use crate::error::{Error, Result};
use crate::fastq::RowKernel;
use crate::minifloat::{encode_slice, FloatFormat, Overflow};
use crate::mx::{self, MxScaleRule};
use crate::nf4::{self, TableEncoder};
use crate::nvfp4::{self, Nvfp4Formula};
use crate::rounding::{round_stochastic_f32, sr_bits, Rounding};
use crate::scale_search;
use crate::tensor::{
    packed_row_bytes, ElemFormat, Granularity, QuantizedTensor, ScaleDtype, Scheme,
};
use half::{bf16, f16};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// How each block's clipping range (and so its scale) is chosen; see [`crate::scale_search`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum ScaleSearch {
    /// The block's full range (absmax / min-max).
    #[default]
    AbsMax,
    /// Clip at the given percentile (percent, `0 < p <= 100`) of the block's values.
    Percentile(f32),
    /// Try `grid` shrink ratios from 1 down to `min_ratio` and keep the one with the smallest
    /// reconstruction MSE.
    Mse {
        /// Number of ratios tried (>= 1).
        grid: usize,
        /// Smallest ratio tried (e.g. 0.5 or 0.8).
        min_ratio: f32,
    },
}

/// Options of [`quantize`] and [`fit_block`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct QuantOptions {
    /// Scale selection.
    pub scale_search: ScaleSearch,
    /// Element rounding (default ties-to-even).
    pub rounding: Rounding,
    /// `Some(seed)`: unbiased stochastic rounding of elements (INT, minifloat, ternary), with
    /// random bits from [`crate::rounding::sr_bits`]`(seed, row * cols + col)`, so results do not
    /// depend on thread count. Scale search still uses deterministic rounding.
    pub stochastic_seed: Option<u64>,
}

/// The parameters of one scale block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockParams {
    /// The stored scale (exact in the scheme's scale dtype; for E8M0 the power of two `2^e`,
    /// NaN for an MX NaN block; for NVFP4 the E4M3 block scale).
    pub scale: f32,
    /// Asymmetric integer schemes: the zero point in `[0, 2^bits)`.
    pub zero_point: Option<u8>,
}

/// Internal options: [`QuantOptions`] plus the per-format formula variants.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Ctx {
    pub(crate) search: ScaleSearch,
    pub(crate) rounding: Rounding,
    pub(crate) seed: Option<u64>,
    pub(crate) mx_rule: MxScaleRule,
    pub(crate) nvfp4: Nvfp4Formula,
}

impl From<&QuantOptions> for Ctx {
    fn from(o: &QuantOptions) -> Self {
        Ctx {
            search: o.scale_search,
            rounding: o.rounding,
            seed: o.stochastic_seed,
            ..Ctx::default()
        }
    }
}

/// What a scheme means operationally (validated once, then matched once per block).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    Int {
        bits: u8,
        asym: bool,
        dt: ScaleDtype,
    },
    IntPow2 {
        bits: u8,
    },
    Float {
        fmt: FloatFormat,
        dt: ScaleDtype,
    },
    FloatPow2 {
        fmt: FloatFormat,
    },
    FloatE4m3 {
        fmt: FloatFormat,
    },
    Nf4 {
        dt: ScaleDtype,
    },
    Ternary {
        dt: ScaleDtype,
    },
    Binary {
        dt: ScaleDtype,
    },
}

fn is_float_dt(dt: ScaleDtype) -> bool {
    matches!(dt, ScaleDtype::F32 | ScaleDtype::F16 | ScaleDtype::Bf16)
}

impl Kind {
    pub(crate) fn of(s: &Scheme) -> Result<Kind> {
        let dt = s.scale_dtype;
        let bad = |m: &str| Err(Error::Invalid(format!("{m} (scheme {s:?})")));
        match s.granularity {
            Granularity::PerGroup(0) => return bad("group size must be positive"),
            Granularity::Block2d { rows, cols } if rows == 0 || cols == 0 => {
                return bad("block dimensions must be positive")
            }
            _ => {}
        }
        if s.asymmetric && !(matches!(s.elem, ElemFormat::Int { .. }) && is_float_dt(dt)) {
            return bad("only integer formats with f32/f16/bf16 scales can be asymmetric");
        }
        if s.global_scale && dt != ScaleDtype::E4M3 {
            return bad("a global scale is only defined for E4M3 block scales (NVFP4)");
        }
        let k = match s.elem {
            ElemFormat::Int { bits } => {
                if !(2..=8).contains(&bits) {
                    return bad("integer width must be in 2..=8");
                }
                match dt {
                    d if is_float_dt(d) => Kind::Int {
                        bits,
                        asym: s.asymmetric,
                        dt,
                    },
                    ScaleDtype::E8M0 => Kind::IntPow2 { bits },
                    _ => return bad("integer elements need an f32/f16/bf16 or E8M0 scale"),
                }
            }
            ElemFormat::Float(fmt) => {
                if fmt == FloatFormat::E8M0 || mx::emax_elem(s.elem).is_none() {
                    return bad("E8M0 is a scale format, not an element format");
                }
                match dt {
                    d if is_float_dt(d) => Kind::Float { fmt, dt },
                    ScaleDtype::E8M0 => Kind::FloatPow2 { fmt },
                    ScaleDtype::E4M3 => Kind::FloatE4m3 { fmt },
                    _ => return bad("unsupported scale dtype"),
                }
            }
            ElemFormat::Nf4 if is_float_dt(dt) => Kind::Nf4 { dt },
            ElemFormat::Ternary if is_float_dt(dt) => Kind::Ternary { dt },
            ElemFormat::Binary if is_float_dt(dt) => Kind::Binary { dt },
            _ => return bad("NF4/ternary/binary need an f32/f16/bf16 scale"),
        };
        Ok(k)
    }

    fn allows_non_finite(self) -> bool {
        matches!(self, Kind::IntPow2 { .. } | Kind::FloatPow2 { .. })
    }

    fn is_asym(self) -> bool {
        matches!(self, Kind::Int { asym: true, .. })
    }

    /// Element value of a code before zero point and scale.
    #[inline]
    fn decode(self, code: u8) -> f32 {
        match self {
            Kind::Int { .. } | Kind::IntPow2 { .. } => code as f32,
            Kind::Float { fmt, .. } | Kind::FloatPow2 { fmt } | Kind::FloatE4m3 { fmt } => {
                fmt.decode(code)
            }
            Kind::Nf4 { .. } => NF4_TABLE_REF[(code & 15) as usize],
            Kind::Ternary { .. } => [-1.0, 0.0, 1.0, f32::NAN][(code & 3) as usize],
            Kind::Binary { .. } => [-1.0, 1.0][(code & 1) as usize],
        }
    }

    /// `(zero, multiplier)` of a block: value = `(decode(code) - zero) * multiplier`.
    #[inline]
    fn mult(self, scale: f32, zp: Option<u8>, gs: f32) -> (f32, f32) {
        match self {
            Kind::Int { bits, .. } => (zp.map_or((1u32 << (bits - 1)) as f32, |z| z as f32), scale),
            Kind::IntPow2 { bits } => (
                (1u32 << (bits - 1)) as f32,
                scale * mx::pow2(-(bits as i32 - 2)),
            ),
            Kind::FloatE4m3 { .. } => (0.0, scale / gs),
            _ => (0.0, scale),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Int { .. } => "INT",
            Kind::IntPow2 { .. } => "MXINT",
            Kind::Float { fmt, .. } | Kind::FloatPow2 { fmt } | Kind::FloatE4m3 { fmt } => {
                fmt.name()
            }
            Kind::Nf4 { .. } => "NF4",
            Kind::Ternary { .. } => "ternary",
            Kind::Binary { .. } => "binary",
        }
    }
}

const NF4_TABLE_REF: [f32; 16] = nf4::NF4_TABLE;

pub(crate) fn nf4_encoder() -> &'static TableEncoder {
    static ENC: OnceLock<TableEncoder> = OnceLock::new();
    ENC.get_or_init(|| TableEncoder::new(&nf4::NF4_TABLE))
}

/// Round a positive scale to a float scale dtype (saturating at its max finite value).
#[inline]
pub(crate) fn round_scale(s: f32, dt: ScaleDtype) -> f32 {
    match dt {
        ScaleDtype::F16 => {
            let h = f16::from_f32(s).to_f32();
            if h.is_infinite() {
                f16::MAX.to_f32().copysign(s)
            } else {
                h
            }
        }
        ScaleDtype::Bf16 => {
            let h = bf16::from_f32(s).to_f32();
            if h.is_infinite() {
                bf16::MAX.to_f32().copysign(s)
            } else {
                h
            }
        }
        _ => s,
    }
}

/// Round to an integer-valued f32 (ties to even) for `|y| < 2^22`, vectorizable on SSE2.
#[inline(always)]
fn rne_small(y: f32) -> f32 {
    const M: f32 = 12_582_912.0; // 1.5 * 2^23
    (y + M) - M
}

/// Block statistics needed by every scale rule.
struct Stats {
    lo: f32,
    hi: f32,
    amax: f32,
    absmean: f32,
    /// No NaN or infinity in the block.
    finite: bool,
}

fn stats(xs: &[f32], kind: Kind) -> Stats {
    // 8 independent lanes of compare-select (NaN never selected, flagged separately) so that
    // the reduction vectorizes; the result is the same as a sequential min/max
    let mut mnv = [f32::INFINITY; 8];
    let mut mxv = [f32::NEG_INFINITY; 8];
    let mut nanv = [0u32; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for j in 0..8 {
            let v = c[j];
            mnv[j] = if v < mnv[j] { v } else { mnv[j] };
            mxv[j] = if v > mxv[j] { v } else { mxv[j] };
            nanv[j] |= u32::from(v.is_nan());
        }
    }
    for (j, &v) in chunks.remainder().iter().enumerate() {
        mnv[j] = if v < mnv[j] { v } else { mnv[j] };
        mxv[j] = if v > mxv[j] { v } else { mxv[j] };
        nanv[j] |= u32::from(v.is_nan());
    }
    let mn = mnv
        .iter()
        .fold(f32::INFINITY, |a, &b| if b < a { b } else { a });
    let mx_ = mxv
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    let nan = nanv.iter().any(|&b| b != 0);
    let (lo, hi) = if xs.is_empty() { (0.0, 0.0) } else { (mn, mx_) };
    // abs(): max(-0.0, 0.0) may be -0.0, which would make a -0 scale
    let amax = if nan { f32::NAN } else { (-lo).max(hi).abs() };
    let finite = !nan && lo != f32::NEG_INFINITY && hi != f32::INFINITY;
    let absmean = match kind {
        Kind::Ternary { .. } | Kind::Binary { .. } => crate::ternary::absmean(xs),
        _ => 0.0,
    };
    Stats {
        lo,
        hi,
        amax,
        absmean,
        finite,
    }
}

/// Block parameters from a clipping range. `c` is the symmetric clip (absmax), `(lo, hi)` the
/// asymmetric one, `am` the absmean (ternary/binary).
pub(crate) fn params_from_range(
    kind: Kind,
    lo: f32,
    hi: f32,
    c: f32,
    am: f32,
    gs: f32,
    ctx: &Ctx,
) -> BlockParams {
    let sym = |scale| BlockParams {
        scale,
        zero_point: None,
    };
    match kind {
        Kind::Int {
            bits,
            asym: false,
            dt,
        } => sym(round_scale(c / ((1u32 << (bits - 1)) - 1) as f32, dt)),
        Kind::Int {
            bits,
            asym: true,
            dt,
        } => {
            let qmax = ((1u32 << bits) - 1) as f32;
            let (lo, hi) = (lo.min(0.0), hi.max(0.0));
            let mut raw = (hi - lo) / qmax;
            if raw.is_infinite() {
                // hi - lo overflowed f32 (|values| near f32::MAX): take the range in f64
                raw = ((hi as f64 - lo as f64) / qmax as f64) as f32;
            }
            let s = round_scale(raw, dt);
            let zp = if s > 0.0 {
                rne_small((-lo / s).clamp(0.0, qmax))
            } else {
                0.0
            };
            BlockParams {
                scale: s,
                zero_point: Some(zp as u8),
            }
        }
        Kind::IntPow2 { .. } | Kind::FloatPow2 { .. } => {
            let elem = match kind {
                Kind::IntPow2 { bits } => ElemFormat::Int { bits },
                Kind::FloatPow2 { fmt } => ElemFormat::Float(fmt),
                _ => unreachable!(),
            };
            let emax = mx::emax_elem(elem).unwrap_or(0);
            let maxn = mx::elem_max(elem).unwrap_or(1.0);
            sym(match mx::shared_exponent(c, emax, maxn, ctx.mx_rule) {
                Some(e) => mx::pow2(e),
                None => f32::NAN,
            })
        }
        Kind::Float { fmt, dt } => sym(round_scale(c / fmt.max_finite(), dt)),
        Kind::FloatE4m3 { fmt } => sym(match ctx.nvfp4 {
            Nvfp4Formula::CompressedTensors => nvfp4::block_scale_ct(c, gs, fmt.max_finite()),
            Nvfp4Formula::TransformerEngine => nvfp4::block_scale_te(c, gs, fmt.max_finite()),
        }),
        Kind::Nf4 { dt } => sym(round_scale(c, dt)),
        Kind::Ternary { dt } | Kind::Binary { dt } => sym(round_scale(am, dt)),
    }
}

/// Fit one block's parameters with the context's scale search.
fn fit_ctx(kind: Kind, xs: &[f32], gs: f32, ctx: &Ctx, scratch: &mut Vec<u8>) -> BlockParams {
    fit_ctx_flag(kind, xs, gs, ctx, scratch, &mut false)
}

/// [`fit_ctx`] that also sets `nonfinite` when the block holds a NaN or an infinity (the
/// finiteness check fused into the statistics pass).
fn fit_ctx_flag(
    kind: Kind,
    xs: &[f32],
    gs: f32,
    ctx: &Ctx,
    scratch: &mut Vec<u8>,
    nonfinite: &mut bool,
) -> BlockParams {
    let st = stats(xs, kind);
    *nonfinite |= !st.finite;
    let am_ratio = |r: f32| st.absmean * r;
    match ctx.search {
        ScaleSearch::AbsMax => params_from_range(kind, st.lo, st.hi, st.amax, st.absmean, gs, ctx),
        ScaleSearch::Percentile(p) => {
            if !st.amax.is_finite() {
                return params_from_range(kind, st.lo, st.hi, st.amax, st.absmean, gs, ctx);
            }
            if kind.is_asym() {
                let (lo, hi) = scale_search::percentile_range(xs, p);
                params_from_range(kind, lo, hi, (-lo).max(hi), st.absmean, gs, ctx)
            } else {
                let c = scale_search::percentile_abs(xs, p);
                params_from_range(kind, -c, c, c, st.absmean, gs, ctx)
            }
        }
        ScaleSearch::Mse { grid, min_ratio } => {
            if !st.amax.is_finite() || xs.is_empty() {
                return params_from_range(kind, st.lo, st.hi, st.amax, st.absmean, gs, ctx);
            }
            let det = Ctx { seed: None, ..*ctx };
            scratch.resize(xs.len(), 0);
            let mut best: Option<(f64, BlockParams)> = None;
            for r in scale_search::shrink_ratios(grid, min_ratio) {
                let p = params_from_range(
                    kind,
                    st.lo * r,
                    st.hi * r,
                    st.amax * r,
                    am_ratio(r),
                    gs,
                    &det,
                );
                encode_block(kind, xs, &p, gs, &det, 0, scratch);
                let (z, s) = kind.mult(p.scale, p.zero_point, gs);
                let err: f64 = xs
                    .iter()
                    .zip(scratch.iter())
                    .map(|(&x, &c)| {
                        let d = (x - (kind.decode(c) - z) * s) as f64;
                        d * d
                    })
                    .sum();
                let err = if err.is_nan() { f64::INFINITY } else { err };
                if best.is_none_or(|(e, _)| err < e) {
                    best = Some((err, p));
                }
            }
            best.map_or(
                BlockParams {
                    scale: 0.0,
                    zero_point: None,
                },
                |b| b.1,
            )
        }
    }
}

/// Largest `|x|` of a block of exactly `G` values via the integer order of the magnitude bits
/// (8 lanes, vectorizes); `None` when the block holds a NaN or an infinity. Equals the
/// reference [`stats`]' `amax` on finite blocks (`max(-min, max)`, `+0` for all-zero blocks).
#[inline(always)]
fn amax_finite<const G: usize>(xs: &[f32]) -> Option<f32> {
    let xs: &[f32; G] = xs.try_into().ok()?;
    let mut m = [0i32; 8];
    for c in xs.chunks_exact(8) {
        for j in 0..8 {
            let b = (c[j].to_bits() & 0x7fff_ffff) as i32;
            m[j] = if b > m[j] { b } else { m[j] };
        }
    }
    let b = m.iter().fold(0i32, |a, &v| if v > a { v } else { a });
    // magnitudes at or above the infinity pattern are Inf/NaN
    (b < 0x7f80_0000).then(|| f32::from_bits(b as u32))
}

/// Absmax block fit for the symmetric formats whose parameters depend on the block's absmax
/// alone, on whole 16/32/64 groups of finite values; `None` means "use [`fit_ctx_flag`]" (the
/// reference, which also flags non-finite blocks).
#[inline]
fn fit_absmax_fast(kind: Kind, xs: &[f32], gs: f32, ctx: &Ctx) -> Option<BlockParams> {
    if ctx.search != ScaleSearch::AbsMax {
        return None;
    }
    match kind {
        Kind::FloatE4m3 { .. }
        | Kind::FloatPow2 { .. }
        | Kind::Nf4 { .. }
        | Kind::Float { .. }
        | Kind::Int { asym: false, .. } => {}
        _ => return None,
    }
    let c = match xs.len() {
        16 => amax_finite::<16>(xs),
        32 => amax_finite::<32>(xs),
        64 => amax_finite::<64>(xs),
        _ => None,
    }?;
    Some(params_from_range(kind, -c, c, c, 0.0, gs, ctx))
}

/// E2M1 codes of one whole 16- or 32-group, written packed (two per byte, low nibble first):
/// `#(thr < |f(x)|) | sign << 3` with the same scaling `f`, thresholds and sign rule as
/// [`encode_block`] (the reference). Returns `false` (nothing written) for the cases it leaves
/// to the reference: other group sizes, a non-finite or zero scale, stochastic rounding.
fn e2m1_group_fast(
    kind: Kind,
    ctx: &Ctx,
    p: &BlockParams,
    gs: f32,
    xs: &[f32],
    out: &mut [u8],
) -> bool {
    let s = p.scale;
    if ctx.seed.is_some() || !(s.is_finite() && s > 0.0) {
        return false;
    }
    if let Kind::Nf4 { .. } = kind {
        let enc = nf4_encoder();
        match xs.len() {
            16 => table_pack_group::<16, 8>(xs, out, s, enc),
            32 => table_pack_group::<32, 16>(xs, out, s, enc),
            64 => table_pack_group::<64, 32>(xs, out, s, enc),
            _ => return false,
        }
        return true;
    }
    let thr = match ctx.rounding {
        Rounding::NearestEven => &mx::E2M1_EVEN_T,
        Rounding::NearestAway => &mx::E2M1_AWAY_T,
    };
    macro_rules! go {
        ($sign:expr, $f:expr) => {
            match xs.len() {
                16 => e2m1_pack_group::<16, 8>(xs, out, $f, thr, $sign),
                32 => e2m1_pack_group::<32, 16>(xs, out, $f, thr, $sign),
                _ => return false,
            }
        };
    }
    match kind {
        Kind::FloatPow2 {
            fmt: FloatFormat::E2M1,
        } => {
            let inv = 1.0 / s;
            if ctx.mx_rule == MxScaleRule::RoundUp175 {
                go!(mx::SignRule::Less, |x| x * inv)
            } else {
                go!(mx::SignRule::Bit, |x| x * inv)
            }
        }
        Kind::FloatE4m3 {
            fmt: FloatFormat::E2M1,
        } if ctx.rounding == Rounding::NearestEven => match ctx.nvfp4 {
            Nvfp4Formula::CompressedTensors => {
                let d = s / gs;
                go!(mx::SignRule::Less, |x| x / d)
            }
            Nvfp4Formula::TransformerEngine => {
                let m = (1.0 / (s * (1.0 / gs))).min(f32::MAX);
                let maxf = FloatFormat::E2M1.max_finite();
                go!(mx::SignRule::Bit, |x| (x * m).clamp(-maxf, maxf))
            }
        },
        _ => return false,
    }
    true
}

/// NF4 codes of one whole group, packed: rank of `x / s` among the table midpoints (strictly
/// above), mapped to its code; the same as [`nf4::encode_table_block`] (the reference).
#[inline(always)]
fn table_pack_group<const G: usize, const B: usize>(
    xs: &[f32],
    out: &mut [u8],
    s: f32,
    enc: &TableEncoder,
) {
    let (Ok(xs), Ok(out)) = (<&[f32; G]>::try_from(xs), <&mut [u8; B]>::try_from(out)) else {
        return;
    };
    let mut y = [0f32; G];
    let mut r = [0u32; G];
    for i in 0..G {
        y[i] = xs[i] / s;
    }
    for &t in &enc.mids {
        for i in 0..G {
            r[i] += u32::from(y[i] > t);
        }
    }
    let c: [u8; G] = std::array::from_fn(|i| enc.code_of_rank[(r[i] & 15) as usize]);
    for k in 0..B {
        out[k] = (c[2 * k] & 15) | (c[2 * k + 1] << 4);
    }
}

#[inline(always)]
fn e2m1_pack_group<const G: usize, const B: usize>(
    xs: &[f32],
    out: &mut [u8],
    f: impl Fn(f32) -> f32,
    thr: &[f32; 7],
    sign: mx::SignRule,
) {
    let (Ok(xs), Ok(out)) = (<&[f32; G]>::try_from(xs), <&mut [u8; B]>::try_from(out)) else {
        return;
    };
    let mut a = [0f32; G];
    let mut c = [0u32; G];
    for i in 0..G {
        let y = f(xs[i]);
        a[i] = y.abs();
        c[i] = match sign {
            mx::SignRule::Bit => y.to_bits() >> 31,
            mx::SignRule::Less => u32::from(y < 0.0),
        } << 3;
    }
    for &t in thr {
        for i in 0..G {
            c[i] += u32::from(a[i] > t);
        }
    }
    for k in 0..B {
        out[k] = (c[2 * k] | c[2 * k + 1] << 4) as u8;
    }
}

/// Encode one block of values with given parameters. `idx0` is the flat index of `xs[0]`
/// (stochastic rounding only).
pub(crate) fn encode_block(
    kind: Kind,
    xs: &[f32],
    p: &BlockParams,
    gs: f32,
    ctx: &Ctx,
    idx0: u64,
    codes: &mut [u8],
) {
    let codes = &mut codes[..xs.len()];
    let rounding = ctx.rounding;
    match kind {
        Kind::Int { bits, asym, .. } => {
            let zp = if asym {
                p.zero_point.unwrap_or(0)
            } else {
                1u8 << (bits - 1)
            };
            let s = p.scale;
            if s.is_nan() || s <= 0.0 || s.is_infinite() {
                codes.fill(zp);
                return;
            }
            let zpf = zp as f32;
            let (lo, hi) = (-zpf, ((1u32 << bits) - 1) as f32 - zpf);
            if let Some(seed) = ctx.seed {
                for (i, (c, &x)) in codes.iter_mut().zip(xs).enumerate() {
                    let r = round_stochastic_f32(x / s, sr_bits(seed, idx0 + i as u64));
                    *c = (r.max(lo).min(hi) + zpf) as i32 as u8;
                }
            } else if rounding == Rounding::NearestEven {
                // x/s clamped to [-zp, qmax-zp], rounded to even by adding 1.5 * 2^23; the
                // integer is then read from the low mantissa bits (no saturating cast, so
                // the loop vectorizes)
                let zpi = zp as i32;
                for (c, &x) in codes.iter_mut().zip(xs) {
                    let v = (x / s).max(lo).min(hi) + 12_582_912.0;
                    *c = ((v.to_bits() as i32 - 0x4B40_0000) + zpi) as u8;
                }
            } else {
                for (c, &x) in codes.iter_mut().zip(xs) {
                    *c = ((x / s).max(lo).min(hi).round() + zpf) as i32 as u8;
                }
            }
        }
        Kind::IntPow2 { bits } => {
            let (zpf, s) = kind.mult(p.scale, None, gs);
            if !s.is_finite() {
                codes.fill(0);
                return;
            }
            // exact division by a power of two (1/s may overflow: s can be 2^-133)
            let qm = ((1u32 << (bits - 1)) - 1) as f32;
            for (i, (c, &x)) in codes.iter_mut().zip(xs).enumerate() {
                let y = x / s;
                let r = match (ctx.seed, rounding) {
                    (Some(seed), _) => round_stochastic_f32(y, sr_bits(seed, idx0 + i as u64)),
                    (None, Rounding::NearestEven) => y.round_ties_even(),
                    (None, Rounding::NearestAway) => y.round(),
                };
                *c = (r.max(-qm).min(qm) + zpf) as u8;
            }
        }
        Kind::Float { fmt, .. } | Kind::FloatPow2 { fmt } => {
            let s = p.scale;
            if !s.is_finite() {
                codes.fill(0);
                return;
            }
            if s == 0.0 {
                for (c, &x) in codes.iter_mut().zip(xs) {
                    *c = if x.is_sign_negative() {
                        fmt.sign_mask()
                    } else {
                        0
                    };
                }
                return;
            }
            let pow2 = matches!(kind, Kind::FloatPow2 { .. });
            let inv = 1.0 / s;
            let scaled = |x: f32| if pow2 { x * inv } else { x / s };
            if let Some(seed) = ctx.seed {
                for (i, (c, &x)) in codes.iter_mut().zip(xs).enumerate() {
                    let r = sr_bits(seed, idx0 + i as u64);
                    *c = fmt.encode_stochastic(scaled(x), r, Overflow::Saturate);
                }
            } else if fmt == FloatFormat::E2M1 {
                let thr = match rounding {
                    Rounding::NearestEven => &mx::E2M1_EVEN_T,
                    Rounding::NearestAway => &mx::E2M1_AWAY_T,
                };
                // compressed-tensors' cast (its MXFP4 scale rule) packs -0.0 as +0
                let sign = if ctx.mx_rule == MxScaleRule::RoundUp175 {
                    mx::SignRule::Less
                } else {
                    mx::SignRule::Bit
                };
                if pow2 {
                    mx::e2m1_encode_block(xs, codes, |x| x * inv, thr, sign);
                } else {
                    mx::e2m1_encode_block(xs, codes, |x| x / s, thr, sign);
                }
            } else {
                // scale a chunk, then the vectorized slice codec (same codes as `fmt.encode`)
                const CH: usize = 64;
                let mut buf = [0f32; CH];
                for (xc, cc) in xs.chunks(CH).zip(codes.chunks_mut(CH)) {
                    let y = &mut buf[..xc.len()];
                    if pow2 {
                        for (y, &x) in y.iter_mut().zip(xc) {
                            *y = x * inv;
                        }
                    } else {
                        for (y, &x) in y.iter_mut().zip(xc) {
                            *y = x / s;
                        }
                    }
                    // lengths match, so this cannot fail
                    let _ = encode_slice(fmt, y, cc, rounding, Overflow::Saturate);
                }
            }
        }
        Kind::FloatE4m3 { fmt } => {
            let mul = match ctx.nvfp4 {
                Nvfp4Formula::CompressedTensors => None,
                Nvfp4Formula::TransformerEngine => {
                    Some((1.0 / (p.scale * (1.0 / gs))).min(f32::MAX))
                }
            };
            let d = p.scale / gs;
            let maxf = fmt.max_finite();
            let scaled = |x: f32| match mul {
                None => x / d,
                Some(m) => (x * m).clamp(-maxf, maxf),
            };
            if let Some(seed) = ctx.seed {
                for (i, (c, &x)) in codes.iter_mut().zip(xs).enumerate() {
                    let r = sr_bits(seed, idx0 + i as u64);
                    *c = fmt.encode_stochastic(scaled(x) + 0.0, r, Overflow::Saturate);
                }
            } else if fmt == FloatFormat::E2M1 && rounding == Rounding::NearestEven {
                // compressed-tensors packs -0.0 as +0; TE keeps the sign bit
                match mul {
                    None => mx::e2m1_encode_block(
                        xs,
                        codes,
                        |x| x / d,
                        &mx::E2M1_EVEN_T,
                        mx::SignRule::Less,
                    ),
                    Some(m) => mx::e2m1_encode_block(
                        xs,
                        codes,
                        |x| (x * m).clamp(-maxf, maxf),
                        &mx::E2M1_EVEN_T,
                        mx::SignRule::Bit,
                    ),
                }
            } else {
                for (c, &x) in codes.iter_mut().zip(xs) {
                    let y = scaled(x);
                    let code = fmt.encode(y.abs(), rounding, Overflow::Saturate);
                    *c = if y < 0.0 {
                        code | fmt.sign_mask()
                    } else {
                        code
                    };
                }
            }
        }
        Kind::Nf4 { .. } => nf4::encode_table_block(nf4_encoder(), xs, p.scale, codes),
        Kind::Ternary { .. } => {
            let s = p.scale;
            if s.is_nan() || s <= 0.0 || s.is_infinite() {
                codes.fill(1);
                return;
            }
            for (i, (c, &x)) in codes.iter_mut().zip(xs).enumerate() {
                let y = x / s;
                let r = match ctx.seed {
                    Some(seed) => round_stochastic_f32(y, sr_bits(seed, idx0 + i as u64)),
                    None if rounding == Rounding::NearestAway => y.round(),
                    None => rne_small(y.clamp(-2.0, 2.0)),
                };
                *c = (r.clamp(-1.0, 1.0) + 1.0) as u8;
            }
        }
        Kind::Binary { .. } => {
            for (c, &x) in codes.iter_mut().zip(xs) {
                *c = (x >= 0.0) as u8;
            }
        }
    }
}

/// Row-level encoders for the threshold formats (E2M1, NF4): same codes as [`encode_block`].
enum RowMode {
    E2m1 {
        thr: &'static [f32; 7],
        sign: mx::SignRule,
    },
    Table,
}

fn row_mode(kind: Kind, ctx: &Ctx) -> Option<RowMode> {
    if ctx.seed.is_some() {
        return None;
    }
    let thr = match ctx.rounding {
        Rounding::NearestEven => &mx::E2M1_EVEN_T,
        Rounding::NearestAway => &mx::E2M1_AWAY_T,
    };
    match kind {
        Kind::FloatPow2 {
            fmt: FloatFormat::E2M1,
        } => {
            let sign = if ctx.mx_rule == MxScaleRule::RoundUp175 {
                mx::SignRule::Less
            } else {
                mx::SignRule::Bit
            };
            Some(RowMode::E2m1 { thr, sign })
        }
        Kind::Float {
            fmt: FloatFormat::E2M1,
            ..
        } => Some(RowMode::E2m1 {
            thr,
            sign: mx::SignRule::Bit,
        }),
        Kind::FloatE4m3 {
            fmt: FloatFormat::E2M1,
        } if ctx.rounding == Rounding::NearestEven => {
            let sign = match ctx.nvfp4 {
                Nvfp4Formula::CompressedTensors => mx::SignRule::Less,
                Nvfp4Formula::TransformerEngine => mx::SignRule::Bit,
            };
            Some(RowMode::E2m1 { thr, sign })
        }
        Kind::Nf4 { .. } => Some(RowMode::Table),
        _ => None,
    }
}

/// Per-thread buffers of the row encoders.
#[derive(Default)]
struct RowScratch {
    y: Vec<f32>,
    acc: Vec<u32>,
}

impl RowScratch {
    fn prepare(&mut self, cols: usize) {
        self.y.resize(cols, 0.0);
        self.acc.resize(cols, 0);
    }

    /// Scaled values (and sign bits for E2M1) of one group.
    #[allow(clippy::too_many_arguments)]
    fn scale_group(
        &mut self,
        mode: &RowMode,
        kind: Kind,
        xs: &[f32],
        c0: usize,
        p: &BlockParams,
        gs: f32,
        ctx: &Ctx,
    ) {
        let y = &mut self.y[c0..c0 + xs.len()];
        let acc = &mut self.acc[c0..c0 + xs.len()];
        let s = p.scale;
        match mode {
            RowMode::Table => {
                if s == 0.0 || !s.is_finite() {
                    y.fill(0.0);
                } else {
                    for (y, &x) in y.iter_mut().zip(xs) {
                        *y = x / s;
                    }
                }
                acc.fill(0);
            }
            RowMode::E2m1 { sign, .. } => {
                let f = |y: &mut [f32], acc: &mut [u32], g: &dyn Fn(f32) -> f32| {
                    for ((y, a), &x) in y.iter_mut().zip(acc.iter_mut()).zip(xs) {
                        let v = g(x);
                        *a = match sign {
                            mx::SignRule::Bit => v.to_bits() >> 31,
                            mx::SignRule::Less => u32::from(v < 0.0),
                        } << 3;
                        *y = v.abs();
                    }
                };
                match kind {
                    Kind::FloatE4m3 { fmt } => match ctx.nvfp4 {
                        Nvfp4Formula::CompressedTensors => {
                            let d = s / gs;
                            scale_abs_sign(y, acc, xs, *sign, |x| x / d);
                        }
                        Nvfp4Formula::TransformerEngine => {
                            let m = (1.0 / (s * (1.0 / gs))).min(f32::MAX);
                            let maxf = fmt.max_finite();
                            scale_abs_sign(y, acc, xs, *sign, |x| (x * m).clamp(-maxf, maxf));
                        }
                    },
                    _ if !s.is_finite() => {
                        // MX NaN block: every code 0 (decodes to NaN through the scale)
                        y.fill(0.0);
                        acc.fill(0);
                    }
                    _ if s == 0.0 => f(y, acc, &|x| x),
                    Kind::FloatPow2 { .. } => {
                        let inv = 1.0 / s;
                        scale_abs_sign(y, acc, xs, *sign, |x| x * inv);
                    }
                    _ => scale_abs_sign(y, acc, xs, *sign, |x| x / s),
                }
            }
        }
    }

    /// Threshold counts over the whole row -> codes.
    fn finish(&mut self, mode: &RowMode, codes: &mut [u8]) {
        let (y, acc) = (&self.y[..codes.len()], &mut self.acc[..codes.len()]);
        match mode {
            RowMode::E2m1 { thr, .. } => {
                for &t in thr.iter() {
                    for (a, &v) in acc.iter_mut().zip(y) {
                        *a += u32::from(v > t);
                    }
                }
                for (c, &a) in codes.iter_mut().zip(acc.iter()) {
                    *c = a as u8;
                }
            }
            RowMode::Table => {
                let enc = nf4_encoder();
                for &t in enc.mids.iter() {
                    for (a, &v) in acc.iter_mut().zip(y) {
                        *a += u32::from(v > t);
                    }
                }
                for (c, &a) in codes.iter_mut().zip(acc.iter()) {
                    *c = enc.code_of_rank[(a & 15) as usize];
                }
            }
        }
    }
}

#[inline(always)]
fn scale_abs_sign(
    y: &mut [f32],
    acc: &mut [u32],
    xs: &[f32],
    sign: mx::SignRule,
    g: impl Fn(f32) -> f32,
) {
    match sign {
        mx::SignRule::Bit => {
            for ((y, a), &x) in y.iter_mut().zip(acc.iter_mut()).zip(xs) {
                let v = g(x);
                *a = (v.to_bits() >> 31) << 3;
                *y = v.abs();
            }
        }
        mx::SignRule::Less => {
            for ((y, a), &x) in y.iter_mut().zip(acc.iter_mut()).zip(xs) {
                let v = g(x);
                *a = u32::from(v < 0.0) << 3;
                *y = v.abs();
            }
        }
    }
}

fn check_shape(w: &[f32], rows: usize, cols: usize) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Err(Error::Shape(format!("empty tensor {rows}x{cols}")));
    }
    let n = rows
        .checked_mul(cols)
        .ok_or_else(|| Error::Shape(format!("{rows}x{cols} overflows")))?;
    if w.len() != n {
        return Err(Error::Shape(format!(
            "{} values for a {rows}x{cols} tensor",
            w.len()
        )));
    }
    Ok(())
}

fn check_finite(w: &[f32], kind: Kind) -> Result<()> {
    if kind.allows_non_finite() {
        return Ok(());
    }
    // chunked all() is cheap and vectorizes; locate only on failure
    if w.par_chunks(1 << 16)
        .all(|c| c.iter().fold(true, |a, x| a & x.is_finite()))
    {
        return Ok(());
    }
    let index = w.iter().position(|x| !x.is_finite()).unwrap_or(0);
    Err(Error::NonFinite {
        format: kind.name(),
        index,
        value: w[index],
    })
}

/// Quantize a `rows x cols` row-major f32 matrix with `scheme`.
///
/// Blocks that do not divide the matrix are ragged at the right/bottom edge (the last group of a
/// row is shorter: 576 = 4 x 128 + 64), for every format; see the module docs for each format's
/// padding equivalence. Errors: [`Error::Shape`] for a wrong `w.len()` or an empty matrix,
/// [`Error::Invalid`] for an invalid scheme, [`Error::NonFinite`] for NaN/Inf inputs (except MX).
pub fn quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    scheme: &Scheme,
    opts: &QuantOptions,
) -> Result<QuantizedTensor> {
    quantize_ctx(w, rows, cols, scheme, &Ctx::from(opts))
}

/// [`quantize`] into an existing tensor, reusing its buffers (`data`, `scales`, zero points):
/// repeated quantization of same-shaped matrices then allocates nothing and writes into
/// memory that is already mapped. `out` is overwritten entirely (its old scheme and shape do
/// not matter); the result is identical to [`quantize`]'s. Errors are [`quantize`]'s; `out` is
/// then unchanged when the input is rejected before any work (shape, scheme), otherwise left
/// as an empty `0 x 0` tensor (non-finite values found while quantizing).
pub fn quantize_into(
    w: &[f32],
    rows: usize,
    cols: usize,
    scheme: &Scheme,
    opts: &QuantOptions,
    out: &mut QuantizedTensor,
) -> Result<()> {
    quantize_ctx_into(w, rows, cols, scheme, &Ctx::from(opts), out)
}

pub(crate) fn quantize_ctx(
    w: &[f32],
    rows: usize,
    cols: usize,
    scheme: &Scheme,
    ctx: &Ctx,
) -> Result<QuantizedTensor> {
    let mut q = empty_tensor(scheme);
    quantize_ctx_into(w, rows, cols, scheme, ctx, &mut q)?;
    Ok(q)
}

/// A `0 x 0` tensor of `scheme` with no buffers.
fn empty_tensor(scheme: &Scheme) -> QuantizedTensor {
    QuantizedTensor {
        scheme: *scheme,
        rows: 0,
        cols: 0,
        data: Vec::new(),
        scales: Vec::new(),
        zero_points: None,
        global_scale: None,
        g_idx: None,
        nested: None,
    }
}

/// Set `v` to `n` elements, keeping (not re-zeroing) the existing ones when the length already
/// matches: every quantizer path below overwrites every element.
fn reuse<T: Copy + Default>(v: &mut Vec<T>, n: usize) {
    if v.len() != n {
        v.clear();
        v.resize(n, T::default());
    }
}

pub(crate) fn quantize_ctx_into(
    w: &[f32],
    rows: usize,
    cols: usize,
    scheme: &Scheme,
    ctx: &Ctx,
    out: &mut QuantizedTensor,
) -> Result<()> {
    let kind = Kind::of(scheme)?;
    check_shape(w, rows, cols)?;
    let (br, bc) = scheme.granularity.block_shape(rows, cols);
    // one-row blocks: the finiteness check is fused into each block's statistics pass (every
    // value is in exactly one block); a failure is reported by `check_finite` at the end
    let fused_check = br == 1;
    if !fused_check {
        check_finite(w, kind)?;
    }
    if ctx.seed.is_some() && matches!(kind, Kind::Nf4 { .. } | Kind::Binary { .. }) {
        return Err(Error::Invalid(
            "stochastic rounding is not defined for NF4/binary".into(),
        ));
    }
    let gs = if scheme.global_scale {
        Some(match ctx.nvfp4 {
            Nvfp4Formula::CompressedTensors => nvfp4::global_scale_ct(w),
            Nvfp4Formula::TransformerEngine => nvfp4::global_scale_te(w),
        })
    } else {
        None
    };
    let g = gs.unwrap_or(1.0);
    let bits = scheme.elem.bits();
    let (gr, gc) = scheme.granularity.grid(rows, cols);
    let rb = packed_row_bytes(cols, bits);
    let asym = kind.is_asym();
    let mut data = std::mem::take(&mut out.data);
    reuse(&mut data, rows * rb);
    let mut scales = std::mem::take(&mut out.scales);
    reuse(&mut scales, gr * gc);
    // zero points only for asymmetric schemes (the row kernels get a scratch row otherwise)
    let mut zps = out.zero_points.take().unwrap_or_default();
    reuse(&mut zps, if asym { gr * gc } else { 0 });
    let nonfinite_seen = AtomicBool::new(false);
    let fused_e2m1 = matches!(
        kind,
        Kind::FloatE4m3 {
            fmt: FloatFormat::E2M1
        } | Kind::FloatPow2 {
            fmt: FloatFormat::E2M1
        }
    ) && matches!(row_mode(kind, ctx), Some(RowMode::E2m1 { .. }))
        && (bc == 16 || bc == 32)
        || matches!(kind, Kind::Nf4 { .. })
            && matches!(row_mode(kind, ctx), Some(RowMode::Table))
            && (bc == 16 || bc == 32 || bc == 64);

    if br == 1 {
        // dispatched SIMD row kernels (same bits as the reference below) where one exists
        let kernel = RowKernel::select(kind, scheme, ctx, bc);
        let zrows = if asym {
            rayon::iter::Either::Left(zps.par_chunks_mut(gc).map(Some))
        } else {
            rayon::iter::Either::Right((0..rows).into_par_iter().map(|_| None))
        };
        data.par_chunks_mut(rb)
            .zip(scales.par_chunks_mut(gc))
            .zip(zrows)
            .enumerate()
            .for_each_init(
                || {
                    (
                        vec![0u8; cols],
                        Vec::new(),
                        RowScratch::default(),
                        Vec::new(),
                        vec![0u8; gc],
                    )
                },
                |(codes, scratch, rs, pending, zscratch), (r, ((drow, srow), zrow))| {
                    let zrow = match zrow {
                        Some(z) => z,
                        None => &mut zscratch[..],
                    };
                    let x = &w[r * cols..(r + 1) * cols];
                    let mut nonfinite = false;
                    if let Some(k) = &kernel {
                        pending.clear();
                        k.run(x, g, ctx, drow, srow, zrow, pending);
                        // groups the kernel left (non-finite, zero scale) and the ragged
                        // tail: the reference fit and encoder
                        let full = cols / k.group();
                        for j in pending.iter().copied().chain(full..gc) {
                            let (c0, c1) = (j * bc, ((j + 1) * bc).min(cols));
                            let xs = &x[c0..c1];
                            let p = fit_ctx_flag(kind, xs, g, ctx, scratch, &mut nonfinite);
                            let cs = &mut codes[c0..c1];
                            encode_block(kind, xs, &p, g, ctx, (r * cols + c0) as u64, cs);
                            let b = bits as usize;
                            let ob = &mut drow[c0 * b / 8..(c1 * b).div_ceil(8)];
                            crate::pack::pack_row_unchecked(cs, bits, ob);
                            srow[j] = p.scale;
                            zrow[j] = p.zero_point.unwrap_or(0);
                        }
                        if nonfinite {
                            nonfinite_seen.store(true, Ordering::Relaxed);
                        }
                        return;
                    }
                    if fused_e2m1 {
                        // NVFP4 / MXFP4: each whole group fitted, encoded and packed in
                        // registers; other groups (ragged tail, non-finite, zero scale) go
                        // through the reference block encoder
                        for j in 0..gc {
                            let (c0, c1) = (j * bc, ((j + 1) * bc).min(cols));
                            let xs = &x[c0..c1];
                            let fast = fit_absmax_fast(kind, xs, g, ctx);
                            let p = match fast {
                                Some(p) => p,
                                None => fit_ctx_flag(kind, xs, g, ctx, scratch, &mut nonfinite),
                            };
                            srow[j] = p.scale;
                            zrow[j] = 0;
                            let ob = &mut drow[c0 / 2..c1.div_ceil(2)];
                            if fast.is_none() || !e2m1_group_fast(kind, ctx, &p, g, xs, ob) {
                                let cs = &mut codes[c0..c1];
                                encode_block(kind, xs, &p, g, ctx, (r * cols + c0) as u64, cs);
                                crate::pack::pack_row_unchecked(cs, 4, ob);
                            }
                        }
                        if nonfinite {
                            nonfinite_seen.store(true, Ordering::Relaxed);
                        }
                        return;
                    }
                    if let Some(mode) = row_mode(kind, ctx) {
                        // fit every group, scale the row, then one long threshold pass
                        rs.prepare(cols);
                        for j in 0..gc {
                            let (c0, c1) = (j * bc, ((j + 1) * bc).min(cols));
                            let xs = &x[c0..c1];
                            let p = match fit_absmax_fast(kind, xs, g, ctx) {
                                Some(p) => p,
                                None => fit_ctx_flag(kind, xs, g, ctx, scratch, &mut nonfinite),
                            };
                            rs.scale_group(&mode, kind, &x[c0..c1], c0, &p, g, ctx);
                            srow[j] = p.scale;
                            zrow[j] = 0;
                        }
                        rs.finish(&mode, codes);
                        crate::pack::pack_row_unchecked(codes, bits, drow);
                        if nonfinite {
                            nonfinite_seen.store(true, Ordering::Relaxed);
                        }
                        return;
                    }
                    for j in 0..gc {
                        let (c0, c1) = (j * bc, ((j + 1) * bc).min(cols));
                        let xs = &x[c0..c1];
                        let p = match fit_absmax_fast(kind, xs, g, ctx) {
                            Some(p) => p,
                            None => fit_ctx_flag(kind, xs, g, ctx, scratch, &mut nonfinite),
                        };
                        encode_block(
                            kind,
                            xs,
                            &p,
                            g,
                            ctx,
                            (r * cols + c0) as u64,
                            &mut codes[c0..c1],
                        );
                        srow[j] = p.scale;
                        zrow[j] = p.zero_point.unwrap_or(0);
                    }
                    crate::pack::pack_row_unchecked(codes, bits, drow);
                    if nonfinite {
                        nonfinite_seen.store(true, Ordering::Relaxed);
                    }
                },
            );
        if fused_check && nonfinite_seen.load(Ordering::Relaxed) {
            if let Err(e) = check_finite(w, kind) {
                // a consistent (empty) tensor rather than half-written buffers
                *out = empty_tensor(scheme);
                return Err(e);
            }
        }
    } else {
        // phase 1: parameters of each 2-D block
        let params: Vec<BlockParams> = (0..gr * gc)
            .into_par_iter()
            .map_init(Vec::new, |scratch, b| {
                let (bi, bj) = (b / gc, b % gc);
                let (r0, r1) = (bi * br, ((bi + 1) * br).min(rows));
                let (c0, c1) = (bj * bc, ((bj + 1) * bc).min(cols));
                let mut vals = Vec::with_capacity((r1 - r0) * (c1 - c0));
                for r in r0..r1 {
                    vals.extend_from_slice(&w[r * cols + c0..r * cols + c1]);
                }
                fit_ctx(kind, &vals, g, ctx, scratch)
            })
            .collect();
        for (b, p) in params.iter().enumerate() {
            scales[b] = p.scale;
            if asym {
                zps[b] = p.zero_point.unwrap_or(0);
            }
        }
        // phase 2: codes
        data.par_chunks_mut(rb).enumerate().for_each_init(
            || vec![0u8; cols],
            |codes, (r, drow)| {
                let x = &w[r * cols..(r + 1) * cols];
                let bi = r / br;
                for j in 0..gc {
                    let (c0, c1) = (j * bc, ((j + 1) * bc).min(cols));
                    let p = &params[bi * gc + j];
                    encode_block(
                        kind,
                        &x[c0..c1],
                        p,
                        g,
                        ctx,
                        (r * cols + c0) as u64,
                        &mut codes[c0..c1],
                    );
                }
                crate::pack::pack_row_unchecked(codes, bits, drow);
            },
        );
    }
    *out = QuantizedTensor {
        scheme: *scheme,
        rows,
        cols,
        data,
        scales,
        zero_points: Some(zps).filter(|_| asym),
        global_scale: gs,
        g_idx: None,
        nested: None,
    };
    Ok(())
}

/// Round a caller-supplied scale to the scheme's scale dtype (E8M0: must be a power of two in
/// `[2^-127, 2^127]` or NaN; E4M3: rounded to nearest-even, saturating).
fn normalize_scale(kind: Kind, s: f32, dt: ScaleDtype) -> Result<f32> {
    match dt {
        ScaleDtype::E8M0 => {
            if s.is_nan() {
                return Ok(s);
            }
            let ok = s > 0.0
                && s.is_finite()
                && (-127..=127).contains(&mx::floor_log2(s))
                && mx::pow2(mx::floor_log2(s)) == s;
            if ok {
                Ok(s)
            } else {
                Err(Error::Invalid(format!(
                    "E8M0 scale {s} is not a power of two in [2^-127, 2^127]"
                )))
            }
        }
        ScaleDtype::E4M3 => Ok(nvfp4::e4m3_round(s)),
        _ => {
            if !s.is_finite() {
                return Err(Error::NonFinite {
                    format: kind.name(),
                    index: 0,
                    value: s,
                });
            }
            Ok(round_scale(s, dt))
        }
    }
}

/// Codes for given per-block parameters (GPTQ/AWQ/HQQ compute the parameters themselves).
///
/// `scales` (and `zero_points` for asymmetric schemes) are row-major over the block grid, as in
/// [`QuantizedTensor`]; scales are rounded to the scheme's scale dtype first and the codes are
/// computed with the rounded values. `global_scale` is required iff `scheme.global_scale`.
/// `g_idx` (act-order) maps each column to the group of its row whose parameters it uses; it
/// needs a per-group (one-row block) granularity and is stored in the result.
#[allow(clippy::too_many_arguments)]
pub fn quantize_with_params(
    w: &[f32],
    rows: usize,
    cols: usize,
    scheme: &Scheme,
    scales: &[f32],
    zero_points: Option<&[u8]>,
    global_scale: Option<f32>,
    g_idx: Option<&[u32]>,
) -> Result<QuantizedTensor> {
    let kind = Kind::of(scheme)?;
    check_shape(w, rows, cols)?;
    check_finite(w, kind)?;
    let (br, bc) = scheme.granularity.block_shape(rows, cols);
    let (gr, gc) = scheme.granularity.grid(rows, cols);
    if scales.len() != gr * gc {
        return Err(Error::BufferSize {
            what: "scales",
            expected: gr * gc,
            got: scales.len(),
        });
    }
    let asym = kind.is_asym();
    let bits = scheme.elem.bits();
    let zps: Option<Vec<u8>> = match (zero_points, asym) {
        (Some(z), true) => {
            if z.len() != gr * gc {
                return Err(Error::BufferSize {
                    what: "zero points",
                    expected: gr * gc,
                    got: z.len(),
                });
            }
            if let Some(&bad) = z.iter().find(|&&v| u32::from(v) >= 1u32 << bits) {
                return Err(Error::Invalid(format!(
                    "zero point {bad} does not fit {bits} bits"
                )));
            }
            Some(z.to_vec())
        }
        (None, false) => None,
        (None, true) => return Err(Error::Invalid("asymmetric scheme needs zero points".into())),
        (Some(_), false) => {
            return Err(Error::Invalid(
                "zero points given for a symmetric scheme".into(),
            ))
        }
    };
    if scheme.global_scale != global_scale.is_some() {
        return Err(Error::Invalid(
            "global scale presence does not match the scheme".into(),
        ));
    }
    if let Some(gsv) = global_scale {
        if !(gsv.is_finite() && gsv > 0.0) {
            return Err(Error::Invalid(format!(
                "global scale {gsv} must be finite and positive"
            )));
        }
    }
    if let Some(gi) = g_idx {
        if br != 1 {
            return Err(Error::Invalid(
                "g_idx needs per-group (one-row) blocks".into(),
            ));
        }
        if gi.len() != cols {
            return Err(Error::BufferSize {
                what: "g_idx",
                expected: cols,
                got: gi.len(),
            });
        }
        if gi.iter().any(|&x| x as usize >= gc) {
            return Err(Error::Invalid(format!(
                "g_idx entry out of range (groups per row: {gc})"
            )));
        }
    }
    let scales: Vec<f32> = scales
        .iter()
        .map(|&s| normalize_scale(kind, s, scheme.scale_dtype))
        .collect::<Result<_>>()?;
    let g = global_scale.unwrap_or(1.0);
    let ctx = Ctx::default();
    let rb = packed_row_bytes(cols, bits);
    let mut data = vec![0u8; rows * rb];
    let params: Vec<BlockParams> = scales
        .iter()
        .enumerate()
        .map(|(b, &scale)| BlockParams {
            scale,
            zero_point: zps.as_ref().map(|z| z[b]),
        })
        .collect();
    data.par_chunks_mut(rb).enumerate().for_each_init(
        || vec![0u8; cols],
        |codes, (r, drow)| {
            let x = &w[r * cols..(r + 1) * cols];
            let bi = r / br;
            match g_idx {
                None => {
                    for j in 0..gc {
                        let (c0, c1) = (j * bc, ((j + 1) * bc).min(cols));
                        let p = &params[bi * gc + j];
                        encode_block(kind, &x[c0..c1], p, g, &ctx, 0, &mut codes[c0..c1]);
                    }
                }
                Some(gi) => {
                    for c in 0..cols {
                        let p = &params[bi * gc + gi[c] as usize];
                        encode_block(kind, &x[c..c + 1], p, g, &ctx, 0, &mut codes[c..c + 1]);
                    }
                }
            }
            crate::pack::pack_row_unchecked(codes, bits, drow);
        },
    );
    Ok(QuantizedTensor {
        scheme: *scheme,
        rows,
        cols,
        data,
        scales,
        zero_points: zps,
        global_scale,
        g_idx: g_idx.map(|g| g.to_vec()),
        nested: None,
    })
}

/// Parameters of one block of values (one row-group, or a flattened 2-D block) for the scheme's
/// element format, with the options' scale search. `global_scale` is the NVFP4 tensor scale
/// (ignored by other formats; 1.0 when `None`).
pub fn fit_block(
    values: &[f32],
    scheme: &Scheme,
    global_scale: Option<f32>,
    opts: &QuantOptions,
) -> Result<BlockParams> {
    let kind = Kind::of(scheme)?;
    check_finite(values, kind)?;
    let mut scratch = Vec::new();
    Ok(fit_ctx(
        kind,
        values,
        global_scale.unwrap_or(1.0),
        &Ctx::from(opts),
        &mut scratch,
    ))
}

/// Quantize one value with given parameters: `(code, dequantized value)`, round-to-nearest-even.
/// An invalid scheme gives `(0, NaN)`. Cheap enough to call per element (no allocation).
pub fn quantize_value(
    x: f32,
    scheme: &Scheme,
    params: &BlockParams,
    global_scale: Option<f32>,
) -> (u8, f32) {
    let Ok(kind) = Kind::of(scheme) else {
        return (0, f32::NAN);
    };
    let g = global_scale.unwrap_or(1.0);
    let mut c = [0u8];
    encode_block(kind, &[x], params, g, &Ctx::default(), 0, &mut c);
    let (z, s) = kind.mult(params.scale, params.zero_point, g);
    (c[0], (kind.decode(c[0]) - z) * s)
}

/// compressed-tensors' NVFP4 `weight_global_scale` of a tensor: `448 * 6 / amax` (see
/// [`crate::nvfp4::global_scale_ct`]).
pub fn nvfp4_global_scale(w: &[f32]) -> f32 {
    nvfp4::global_scale_ct(w)
}

impl QuantizedTensor {
    /// Dequantize the whole tensor to a row-major f32 matrix (rows in parallel).
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        self.validate()?;
        let kind = Kind::of(&self.scheme)?;
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols == 0 {
            return Ok(out);
        }
        let lut = lut256(kind, self.scheme.elem.bits());
        out.par_chunks_mut(self.cols)
            .enumerate()
            .try_for_each_init(Vec::new, |codes, (r, o)| {
                self.dequant_row_impl(kind, &lut, r, o, codes)
            })?;
        Ok(out)
    }

    /// Dequantize one row into `out` (`out.len() == cols`).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<()> {
        let kind = Kind::of(&self.scheme)?;
        if row >= self.rows {
            return Err(Error::Shape(format!(
                "row {row} of a {}-row tensor",
                self.rows
            )));
        }
        if out.len() != self.cols {
            return Err(Error::Shape(format!(
                "output of {} for {} columns",
                out.len(),
                self.cols
            )));
        }
        // The same length/consistency checks as every other decode path.
        self.validate()?;
        let lut = lut256(kind, self.scheme.elem.bits());
        // the buffer is only allocated by the paths that unpack codes first
        let mut codes = Vec::new();
        self.dequant_row_impl(kind, &lut, row, out, &mut codes)
    }

    fn dequant_row_impl(
        &self,
        kind: Kind,
        lut: &[f32; 256],
        r: usize,
        out: &mut [f32],
        codes: &mut Vec<u8>,
    ) -> Result<()> {
        let cols = self.cols;
        let bits = self.scheme.elem.bits();
        let rb = self.row_bytes();
        let row = &self.data[r * rb..(r + 1) * rb];
        let (br, bc) = self.scheme.granularity.block_shape(self.rows, cols);
        let (_, gc) = self.grid();
        let bi = r / br;
        let srow = &self.scales[bi * gc..(bi + 1) * gc];
        let zrow = self
            .zero_points
            .as_ref()
            .map(|z| &z[bi * gc..(bi + 1) * gc]);
        let gs = self.global_scale.unwrap_or(1.0);
        let m = |j: usize| kind.mult(srow[j], zrow.map(|z| z[j]), gs);
        if let Some(gi) = &self.g_idx {
            codes.resize(cols, 0);
            crate::pack::unpack_row_unchecked(row, bits, codes);
            let mults: Vec<(f32, f32)> = (0..gc).map(m).collect();
            for ((o, &c), &g) in out.iter_mut().zip(codes.iter()).zip(gi.iter()) {
                let (z, s) = *mults.get(g as usize).ok_or_else(|| {
                    Error::Invalid(format!(
                        "g_idx entry {g} out of range (groups per row: {gc})"
                    ))
                })?;
                *o = (lut[c as usize] - z) * s;
            }
            return Ok(());
        }
        if bits == 4 && bc % 2 == 0 {
            // whole groups of a fixed size: monomorphised, no per-group slicing
            let full = cols / bc;
            let done = match bc {
                16 => deq4_groups::<16, 8>(row, out, full, &m, lut),
                32 => deq4_groups::<32, 16>(row, out, full, &m, lut),
                64 => deq4_groups::<64, 32>(row, out, full, &m, lut),
                128 => deq4_groups::<128, 64>(row, out, full, &m, lut),
                _ => 0,
            };
            for j in done..gc {
                let (c0, c1) = (j * bc, ((j + 1) * bc).min(cols));
                let (z, s) = m(j);
                let t: [f32; 16] = std::array::from_fn(|i| (lut[i] - z) * s);
                let bytes = &row[c0 / 2..c1.div_ceil(2)];
                let o = &mut out[c0..c1];
                let mut pairs = o.chunks_exact_mut(2);
                for (op, &b) in (&mut pairs).zip(bytes) {
                    op[0] = t[(b & 15) as usize];
                    op[1] = t[(b >> 4) as usize];
                }
                if let [last] = pairs.into_remainder() {
                    *last = t[(bytes[bytes.len() - 1] & 15) as usize];
                }
            }
            return Ok(());
        }
        if let (
            8,
            Kind::Float {
                fmt: FloatFormat::E4M3,
                ..
            }
            | Kind::FloatPow2 {
                fmt: FloatFormat::E4M3,
            }
            | Kind::FloatE4m3 {
                fmt: FloatFormat::E4M3,
            },
        ) = (bits, kind)
        {
            // E4M3 decoded from its bits, eight lanes at a time (same values as the table)
            let nan = (lut[0x7f], lut[0xff]);
            crate::fastq::dequant_e4m3_row(row, out, bc, nan, m);
            return Ok(());
        }
        codes.resize(cols, 0);
        crate::pack::unpack_row_unchecked(row, bits, codes);
        for j in 0..gc {
            let (c0, c1) = (j * bc, ((j + 1) * bc).min(cols));
            let (z, s) = m(j);
            for (o, &c) in out[c0..c1].iter_mut().zip(&codes[c0..c1]) {
                *o = (lut[c as usize] - z) * s;
            }
        }
        Ok(())
    }
}

/// Dequantize the first `n` whole 4-bit groups of `G` values (`B = G / 2` bytes) of a row;
/// returns `n`. Same arithmetic as the generic path: `(lut[code] - z) * s` per value.
#[inline(always)]
fn deq4_groups<const G: usize, const B: usize>(
    row: &[u8],
    out: &mut [f32],
    n: usize,
    m: &impl Fn(usize) -> (f32, f32),
    lut: &[f32; 256],
) -> usize {
    let lut16: [f32; 16] = std::array::from_fn(|i| lut[i]);
    for (j, (o, b)) in out
        .chunks_exact_mut(G)
        .zip(row.chunks_exact(B))
        .take(n)
        .enumerate()
    {
        let (z, s) = m(j);
        let t: [f32; 16] = std::array::from_fn(|i| (lut16[i] - z) * s);
        let o: &mut [f32; G] = o.try_into().expect("chunk of G");
        let b: &[u8; B] = b.try_into().expect("chunk of B");
        for k in 0..B {
            o[2 * k] = t[(b[k] & 15) as usize];
            o[2 * k + 1] = t[(b[k] >> 4) as usize];
        }
    }
    n
}

/// Decoded element values of the `2^bits` codes (the rest of the table is 0).
fn lut256(kind: Kind, bits: u32) -> [f32; 256] {
    let mut t = [0f32; 256];
    for (c, v) in t.iter_mut().enumerate().take(1 << bits) {
        *v = kind.decode(c as u8);
    }
    t
}

const KNOWN_SCHEMES: &str = "int8-pc, int4-g128-sym, int4-g128-asym, int4-g64-sym, int4-g32-asym, \
int3-g128-sym, int2-g64-asym (any intK-gN-{sym,asym}, intK-pc-{sym,asym}, intK-pt-{sym,asym}, \
intK-bN-{sym,asym}; optional -f16/-bf16 scale suffix), fp8-pc, fp8-pt, fp8-b128 (also fp8-e5m2-*), \
nvfp4, mxfp4, mxfp6-e2m3, mxfp6-e3m2, mxfp8-e4m3, mxfp8-e5m2, mxint8, nf4-g64 (any nf4-gN), \
ternary, ternary-pc, binary, binary-pt";

fn parse_gran(t: &str) -> Option<Granularity> {
    match t {
        "pc" => Some(Granularity::PerChannel),
        "pt" => Some(Granularity::PerTensor),
        _ => {
            if let Some(n) = t.strip_prefix('g') {
                let n: usize = n.parse().ok()?;
                (n > 0).then_some(Granularity::PerGroup(n))
            } else if let Some(b) = t.strip_prefix('b') {
                let (r, c) = match b.split_once('x') {
                    Some((r, c)) => (r.parse().ok()?, c.parse().ok()?),
                    None => {
                        let n: usize = b.parse().ok()?;
                        (n, n)
                    }
                };
                (r > 0 && c > 0).then_some(Granularity::Block2d { rows: r, cols: c })
            } else {
                None
            }
        }
    }
}

fn gran_name(g: Granularity) -> String {
    match g {
        Granularity::PerChannel => "pc".into(),
        Granularity::PerTensor => "pt".into(),
        Granularity::PerGroup(n) => format!("g{n}"),
        Granularity::Block2d { rows, cols } if rows == cols => format!("b{rows}"),
        Granularity::Block2d { rows, cols } => format!("b{rows}x{cols}"),
    }
}

fn plain(elem: ElemFormat, granularity: Granularity) -> Scheme {
    Scheme {
        elem,
        granularity,
        scale_dtype: ScaleDtype::F32,
        asymmetric: false,
        global_scale: false,
    }
}

impl Scheme {
    /// Parse a short scheme name (as typed to `cargo xtask quantize --scheme`); see the list in
    /// the [`Error::UnknownFormat`] message. Case-insensitive.
    ///
    /// ```
    /// use lowbit_numerics::{Scheme, Granularity};
    /// let s = Scheme::from_name("int4-g128-asym").unwrap();
    /// assert_eq!(s.granularity, Granularity::PerGroup(128));
    /// assert!(s.asymmetric);
    /// assert_eq!(s.name(), "int4-g128-asym");
    /// assert!(Scheme::from_name("int4-g0-sym").is_err());
    /// ```
    pub fn from_name(s: &str) -> Result<Scheme> {
        let lower = s.trim().to_ascii_lowercase();
        parse_scheme(&lower).ok_or_else(|| Error::UnknownFormat {
            name: s.to_string(),
            known: KNOWN_SCHEMES.to_string(),
        })
    }

    /// The short name of this scheme ([`Scheme::from_name`] parses it back); schemes with no
    /// short name get a descriptive `custom(...)` string.
    pub fn name(&self) -> String {
        use FloatFormat as F;
        let dt_suffix = match self.scale_dtype {
            ScaleDtype::F16 => "-f16",
            ScaleDtype::Bf16 => "-bf16",
            _ => "",
        };
        let g = self.granularity;
        let n = match (self.elem, self.scale_dtype) {
            (ElemFormat::Int { bits: 8 }, ScaleDtype::E8M0)
                if g == Granularity::PerGroup(32) && !self.asymmetric =>
            {
                Some("mxint8".to_string())
            }
            (ElemFormat::Int { bits }, d) if is_float_dt(d) && (2..=8).contains(&bits) => {
                if bits == 8
                    && g == Granularity::PerChannel
                    && !self.asymmetric
                    && d == ScaleDtype::F32
                {
                    Some("int8-pc".to_string())
                } else {
                    let sa = if self.asymmetric { "asym" } else { "sym" };
                    Some(format!("int{bits}-{}-{sa}{dt_suffix}", gran_name(g)))
                }
            }
            (ElemFormat::Float(f @ (F::E4M3 | F::E5M2)), d)
                if is_float_dt(d) && !self.asymmetric =>
            {
                let e = if f == F::E5M2 { "-e5m2" } else { "" };
                Some(format!("fp8{e}-{}{dt_suffix}", gran_name(g)))
            }
            (ElemFormat::Float(f), ScaleDtype::E8M0) if g == Granularity::PerGroup(32) => match f {
                F::E2M1 => Some("mxfp4".into()),
                F::E2M3 => Some("mxfp6-e2m3".into()),
                F::E3M2 => Some("mxfp6-e3m2".into()),
                F::E4M3 => Some("mxfp8-e4m3".into()),
                F::E5M2 => Some("mxfp8-e5m2".into()),
                _ => None,
            },
            (ElemFormat::Float(F::E2M1), ScaleDtype::E4M3)
                if g == Granularity::PerGroup(16) && self.global_scale =>
            {
                Some("nvfp4".into())
            }
            (ElemFormat::Nf4, d) if is_float_dt(d) => match g {
                Granularity::PerGroup(n) => Some(format!("nf4-g{n}{dt_suffix}")),
                _ => None,
            },
            (ElemFormat::Ternary, ScaleDtype::F32) => match g {
                Granularity::PerTensor => Some("ternary".into()),
                Granularity::PerChannel => Some("ternary-pc".into()),
                _ => None,
            },
            (ElemFormat::Binary, ScaleDtype::F32) => match g {
                Granularity::PerChannel => Some("binary".into()),
                Granularity::PerTensor => Some("binary-pt".into()),
                _ => None,
            },
            _ => None,
        };
        match n {
            Some(n) if parse_scheme(&n) == Some(*self) => n,
            _ => format!(
                "custom({:?}, {:?}, {:?}{}{})",
                self.elem,
                self.granularity,
                self.scale_dtype,
                if self.asymmetric { ", asym" } else { "" },
                if self.global_scale { ", global" } else { "" }
            ),
        }
    }
}

fn parse_scheme(s: &str) -> Option<Scheme> {
    use FloatFormat as F;
    let mx = |f| Some(mx::mx_scheme(ElemFormat::Float(f)));
    match s {
        "int8-pc" => return Some(plain(ElemFormat::Int { bits: 8 }, Granularity::PerChannel)),
        "nvfp4" => return Some(nvfp4::nvfp4_scheme()),
        "mxfp4" => return mx(F::E2M1),
        "mxfp6-e2m3" => return mx(F::E2M3),
        "mxfp6-e3m2" => return mx(F::E3M2),
        "mxfp8-e4m3" => return mx(F::E4M3),
        "mxfp8-e5m2" => return mx(F::E5M2),
        "mxint8" => return Some(mx::mx_scheme(ElemFormat::Int { bits: 8 })),
        "nf4" => return Some(nf4::nf4_scheme(64)),
        "ternary" => return Some(plain(ElemFormat::Ternary, Granularity::PerTensor)),
        "ternary-pc" => return Some(plain(ElemFormat::Ternary, Granularity::PerChannel)),
        "binary" => return Some(plain(ElemFormat::Binary, Granularity::PerChannel)),
        "binary-pt" => return Some(plain(ElemFormat::Binary, Granularity::PerTensor)),
        _ => {}
    }
    let mut parts: Vec<&str> = s.split('-').collect();
    let dt = match parts.last() {
        Some(&"f16") => Some(ScaleDtype::F16),
        Some(&"bf16") => Some(ScaleDtype::Bf16),
        Some(&"f32") => Some(ScaleDtype::F32),
        _ => None,
    };
    if dt.is_some() {
        parts.pop();
    }
    let dt = dt.unwrap_or(ScaleDtype::F32);
    let head = *parts.first()?;
    if let Some(b) = head.strip_prefix("int") {
        let bits: u8 = b.parse().ok()?;
        if !(2..=8).contains(&bits) || parts.len() != 3 {
            return None;
        }
        let g = parse_gran(parts[1])?;
        let asym = match parts[2] {
            "sym" => false,
            "asym" => true,
            _ => return None,
        };
        return Some(Scheme {
            elem: ElemFormat::Int { bits },
            granularity: g,
            scale_dtype: dt,
            asymmetric: asym,
            global_scale: false,
        });
    }
    if head == "fp8" {
        let (fmt, rest) = match parts.get(1) {
            Some(&"e4m3") => (F::E4M3, &parts[2..]),
            Some(&"e5m2") => (F::E5M2, &parts[2..]),
            _ => (F::E4M3, &parts[1..]),
        };
        if rest.len() != 1 {
            return None;
        }
        let g = parse_gran(rest[0])?;
        return Some(Scheme {
            scale_dtype: dt,
            ..plain(ElemFormat::Float(fmt), g)
        });
    }
    if head == "nf4" && parts.len() == 2 {
        if let Some(Granularity::PerGroup(n)) = parse_gran(parts[1]) {
            return Some(Scheme {
                scale_dtype: dt,
                ..nf4::nf4_scheme(n)
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    #[test]
    fn names_round_trip() {
        for n in [
            "int8-pc",
            "int4-g128-sym",
            "int4-g128-asym",
            "int4-g64-sym",
            "int4-g32-asym",
            "int3-g128-sym",
            "int2-g64-asym",
            "int4-pc-asym",
            "int8-pt-sym",
            "int4-b64-sym",
            "int4-g128-sym-f16",
            "int4-g128-asym-bf16",
            "fp8-pc",
            "fp8-b128",
            "fp8-pt",
            "fp8-e5m2-pc",
            "nvfp4",
            "mxfp4",
            "mxfp6-e2m3",
            "mxfp6-e3m2",
            "mxfp8-e4m3",
            "mxfp8-e5m2",
            "mxint8",
            "nf4-g64",
            "ternary",
            "ternary-pc",
            "binary",
            "binary-pt",
        ] {
            let s = Scheme::from_name(n).unwrap_or_else(|e| panic!("{n}: {e}"));
            assert_eq!(s.name(), n);
            Kind::of(&s).unwrap();
        }
        assert_eq!(
            Scheme::from_name("fp8-b128").unwrap().granularity,
            Granularity::Block2d {
                rows: 128,
                cols: 128
            }
        );
        for bad in [
            "int9-g128-sym",
            "int4-g128",
            "fp4",
            "int4-gx-sym",
            "",
            "nf4-pc",
            "int1-pc-sym",
        ] {
            assert!(
                matches!(Scheme::from_name(bad), Err(Error::UnknownFormat { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn int4_sym_matches_f64_reference() {
        let (rows, cols) = (3, 576);
        let w = data(rows * cols, 1);
        let q = quantize(
            &w,
            rows,
            cols,
            &Scheme::from_name("int4-g128-sym").unwrap(),
            &QuantOptions::default(),
        )
        .unwrap();
        assert_eq!(q.scales.len(), rows * 5);
        let back = q.dequantize().unwrap();
        for r in 0..rows {
            for g in 0..5 {
                let (c0, c1) = (g * 128, ((g + 1) * 128).min(cols));
                let xs = &w[r * cols + c0..r * cols + c1];
                let amax = xs.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
                let scale = (amax / 7.0) as f32;
                assert_eq!(q.scales[r * 5 + g], scale);
                for (i, &x) in xs.iter().enumerate() {
                    let qv = ((x as f64) / scale as f64)
                        .round_ties_even()
                        .clamp(-8.0, 7.0);
                    assert_eq!(q.code(r, c0 + i).unwrap() as f64, qv + 8.0);
                    assert_eq!(back[r * cols + c0 + i], (qv as f32) * scale);
                }
            }
        }
    }

    #[test]
    fn int_asym_zero_points_follow_gptq() {
        let w = [0.5f32, 1.0, 2.0, 3.0];
        let s = Scheme::from_name("int4-pc-asym").unwrap();
        let q = quantize(&w, 1, 4, &s, &QuantOptions::default()).unwrap();
        // lo = min(0.5, 0) = 0, hi = 3 -> scale 0.2, zero 0
        assert_eq!(q.scales[0], 3.0f32 / 15.0);
        assert_eq!(q.zero_points.as_deref(), Some(&[0u8][..]));
        let w = [-1.0f32, 0.0, 2.0];
        let q = quantize(&w, 1, 3, &s, &QuantOptions::default()).unwrap();
        assert_eq!(q.zero_points.as_deref(), Some(&[5u8][..]));
        let back = q.dequantize().unwrap();
        assert_eq!(back[1], 0.0);
    }

    #[test]
    fn quantize_with_params_matches_quantize() {
        let (rows, cols) = (4, 200);
        let w = data(rows * cols, 2);
        for n in [
            "int4-g64-asym",
            "int3-g128-sym",
            "nvfp4",
            "mxfp4",
            "nf4-g64",
            "fp8-pc",
        ] {
            let s = Scheme::from_name(n).unwrap();
            let q = quantize(&w, rows, cols, &s, &QuantOptions::default()).unwrap();
            let q2 = quantize_with_params(
                &w,
                rows,
                cols,
                &s,
                &q.scales,
                q.zero_points.as_deref(),
                q.global_scale,
                None,
            )
            .unwrap();
            assert_eq!(q.data, q2.data, "{n}");
            // quantize_value agrees element by element
            let (gc, bc) = (q.grid().1, s.granularity.block_shape(rows, cols).1);
            for r in 0..rows {
                for c in 0..cols {
                    let b = r * gc + c / bc;
                    let p = BlockParams {
                        scale: q.scales[b],
                        zero_point: q.zero_points.as_ref().map(|z| z[b]),
                    };
                    let (code, v) = quantize_value(w[r * cols + c], &s, &p, q.global_scale);
                    assert_eq!(code, q.code(r, c).unwrap(), "{n} ({r},{c})");
                    let mut row = vec![0f32; cols];
                    if c == 0 {
                        q.dequantize_row(r, &mut row).unwrap();
                        assert_eq!(row, q.dequantize().unwrap()[r * cols..(r + 1) * cols]);
                    }
                    let _ = v;
                }
            }
        }
    }

    #[test]
    fn g_idx_permutes_groups() {
        let (rows, cols) = (2, 8);
        let w = data(rows * cols, 3);
        let s = Scheme::from_name("int4-g4-sym").unwrap();
        let gi: Vec<u32> = vec![1, 0, 1, 0, 1, 0, 1, 0];
        let scales = [0.1f32, 0.2, 0.3, 0.4];
        let q = quantize_with_params(&w, rows, cols, &s, &scales, None, None, Some(&gi)).unwrap();
        let back = q.dequantize().unwrap();
        for r in 0..rows {
            for c in 0..cols {
                let sc = scales[r * 2 + gi[c] as usize];
                let qv = (w[r * cols + c] / sc).round_ties_even().clamp(-8.0, 7.0);
                assert_eq!(back[r * cols + c], qv * sc);
            }
        }
        let bad = [5u32; 8];
        assert!(quantize_with_params(&w, rows, cols, &s, &scales, None, None, Some(&bad)).is_err());
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let s = Scheme::from_name("int4-g128-sym").unwrap();
        let o = QuantOptions::default();
        assert!(matches!(
            quantize(&[1.0; 10], 2, 4, &s, &o),
            Err(Error::Shape(_))
        ));
        assert!(matches!(quantize(&[], 0, 4, &s, &o), Err(Error::Shape(_))));
        assert!(matches!(
            quantize(&[1.0, f32::NAN], 1, 2, &s, &o),
            Err(Error::NonFinite { index: 1, .. })
        ));
        assert!(matches!(
            quantize(
                &[1.0, f32::INFINITY],
                1,
                2,
                &Scheme::from_name("nvfp4").unwrap(),
                &o
            ),
            Err(Error::NonFinite { .. })
        ));
        let mut q = quantize(&[1.0; 8], 1, 8, &s, &o).unwrap();
        q.data.pop();
        assert!(matches!(q.dequantize(), Err(Error::BufferSize { .. })));
        let mut row = [0f32; 8];
        assert!(q.dequantize_row(0, &mut row).is_err());
        let bad = Scheme {
            asymmetric: true,
            ..Scheme::from_name("mxfp4").unwrap()
        };
        assert!(matches!(
            quantize(&[1.0; 32], 1, 32, &bad, &o),
            Err(Error::Invalid(_))
        ));
    }

    #[test]
    fn mse_search_never_worse_than_absmax() {
        let (rows, cols) = (4, 256);
        let mut w = data(rows * cols, 4);
        w[5] = 40.0; // an outlier makes clipping pay
        for n in [
            "int4-g128-sym",
            "int3-g128-asym",
            "nf4-g64",
            "mxfp4",
            "nvfp4",
            "fp8-pc",
            "ternary-pc",
        ] {
            let s = Scheme::from_name(n).unwrap();
            let err = |o: &QuantOptions| {
                let q = quantize(&w, rows, cols, &s, o).unwrap();
                let b = q.dequantize().unwrap();
                w.iter()
                    .zip(&b)
                    .map(|(x, y)| ((x - y) as f64).powi(2))
                    .sum::<f64>()
            };
            let base = err(&QuantOptions::default());
            let mse = err(&QuantOptions {
                scale_search: ScaleSearch::Mse {
                    grid: 20,
                    min_ratio: 0.5,
                },
                ..Default::default()
            });
            assert!(mse <= base * (1.0 + 1e-9), "{n}: {mse} > {base}");
            let pct = err(&QuantOptions {
                scale_search: ScaleSearch::Percentile(99.0),
                ..Default::default()
            });
            assert!(pct.is_finite());
        }
    }
}
