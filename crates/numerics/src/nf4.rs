//! bitsandbytes 4-bit formats: NF4 (and bnb's own "fp4" table) with blockwise absmax scaling and
//! optional double quantization of the absmax values.
//!
//! # NF4 in a [`QuantizedTensor`]
//! `Scheme { elem: Nf4, granularity: PerGroup(64), scale_dtype: F32 }`: per block of 64 elements
//! of a row `absmax = max|x|`, code = the table entry nearest to `x / absmax` (an exact midpoint
//! between two entries goes to the lower code, as bitsandbytes' bucketize does), value =
//! `NF4[code] * absmax`. An all-zero block has absmax 0 and codes 7 (the 0.0 entry). Codes are
//! packed low-nibble-first like every other 4-bit format here; bitsandbytes packs the first
//! element in the HIGH nibble: [`QuantizedTensor::to_bnb_packed`] converts.
//!
//! bitsandbytes blocks run over the *flattened* tensor; they coincide with per-row groups when
//! `cols` is a multiple of the block size, which [`quantize_bnb`] requires (generic
//! [`crate::quantize::quantize`] with `nf4-gN` accepts any `cols`, the last group of a row being
//! shorter).
//!
//! # Double quantization (`compress_statistics=True`)
//! `offset = mean(absmax)`; `absmax - offset` is quantized blockwise (blocks of 256) with bnb's
//! signed 8-bit dynamic map ([`dynamic_map_signed`]): per nested block `m = max|v|`, code =
//! nearest map entry to `v / m`. The reconstructed absmax `map[code] * m + offset` is what
//! `QuantizedTensor::scales` holds (the 4-bit codes are computed with the exact absmax, as bnb does),
//! and [`NestedScales`] keeps the codes.

use crate::error::{Error, Result};
use crate::tensor::{ElemFormat, Granularity, NestedScales, QuantizedTensor, ScaleDtype, Scheme};

/// The NF4 table (bitsandbytes `create_normal_map(offset=0.9677083)`), by code.
pub const NF4_TABLE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' "fp4" table by code: `[0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4,
/// -6, -2, -3] / 12` (not the OCP E2M1 order; code 8 is a second +0, as in bnb's map). As in
/// bitsandbytes' CPU path (bucketize on the midpoints of the sorted map, equal entries in code
/// order), `x/absmax` in `(-0.0026, 0]` gets code 0 and in `(0, 0.0026]` code 8.
pub fn bnb_fp4_table() -> [f32; 16] {
    let raw = [
        0.0f32, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0,
        -3.0,
    ];
    raw.map(|v| v / 12.0)
}

/// Which bitsandbytes 4-bit table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BnbType {
    /// NormalFloat4.
    Nf4,
    /// bnb's own FP4 table ([`bnb_fp4_table`]).
    Fp4,
}

impl BnbType {
    /// The 16-entry table of this type.
    pub fn table(self) -> [f32; 16] {
        match self {
            BnbType::Nf4 => NF4_TABLE,
            BnbType::Fp4 => bnb_fp4_table(),
        }
    }
}

/// Encoder for one 16-entry table: sorted values with their codes and f32 midpoints.
#[derive(Debug, Clone)]
pub(crate) struct TableEncoder {
    pub(crate) mids: [f32; 15],
    pub(crate) code_of_rank: [u8; 16],
}

impl TableEncoder {
    pub(crate) fn new(table: &[f32; 16]) -> Self {
        let mut idx: Vec<u8> = (0..16).collect();
        // equal values (bnb fp4's two zeros) keep code order, like bnb's stable sort
        idx.sort_by(|&a, &b| {
            let (x, y) = (table[a as usize], table[b as usize]);
            x.partial_cmp(&y)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(&b))
        });
        let mut mids = [0f32; 15];
        for (i, m) in mids.iter_mut().enumerate() {
            *m = (table[idx[i] as usize] + table[idx[i + 1] as usize]) / 2.0;
        }
        let mut code_of_rank = [0u8; 16];
        code_of_rank.copy_from_slice(&idx);
        TableEncoder { mids, code_of_rank }
    }

    /// Code of the entry nearest to `y` (exact midpoint -> lower entry).
    #[inline(always)]
    pub(crate) fn encode(&self, y: f32) -> u8 {
        let mut r = 0u8;
        for &m in &self.mids {
            r += (y > m) as u8;
        }
        self.code_of_rank[r as usize]
    }
}

/// The NF4 [`Scheme`] with blocks of `block` elements along a row.
pub fn nf4_scheme(block: usize) -> Scheme {
    Scheme {
        elem: ElemFormat::Nf4,
        granularity: Granularity::PerGroup(block),
        scale_dtype: ScaleDtype::F32,
        asymmetric: false,
        global_scale: false,
    }
}

/// Blockwise 4-bit quantization of a flat slice exactly as bitsandbytes `quantize_4bit` does:
/// returns one code per element (unpacked) and one absmax per block of `blocksize` (the last
/// block may be shorter). Non-finite input is an error.
pub fn bnb_quantize_4bit(x: &[f32], blocksize: usize, ty: BnbType) -> Result<(Vec<u8>, Vec<f32>)> {
    if blocksize == 0 {
        return Err(Error::Invalid("block size must be positive".into()));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            format: "bnb 4-bit",
            index: i,
            value: x[i],
        });
    }
    let table = ty.table();
    let enc = TableEncoder::new(&table);
    let mut codes = vec![0u8; x.len()];
    let mut absmax = Vec::with_capacity(x.len().div_ceil(blocksize));
    for (xb, cb) in x.chunks(blocksize).zip(codes.chunks_mut(blocksize)) {
        let m = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        absmax.push(m);
        encode_table_block(&enc, xb, m, cb);
    }
    Ok((codes, absmax))
}

/// Codes of one block with scale `m` (0 -> every value maps as 0).
#[inline]
pub(crate) fn encode_table_block(enc: &TableEncoder, xs: &[f32], m: f32, codes: &mut [u8]) {
    if m == 0.0 || !m.is_finite() {
        let z = enc.encode(0.0);
        codes.fill(z);
        return;
    }
    // chunked with the threshold loop outermost, so the comparisons vectorize
    const CH: usize = 64;
    let mut y = [0f32; CH];
    let mut r = [0u32; CH];
    for (xc, cc) in xs.chunks(CH).zip(codes.chunks_mut(CH)) {
        let n = xc.len();
        let (y, r) = (&mut y[..n], &mut r[..n]);
        for (y, &x) in y.iter_mut().zip(xc) {
            *y = x / m;
        }
        r.fill(0);
        for &t in &enc.mids {
            for (r, &y) in r.iter_mut().zip(y.iter()) {
                *r += u32::from(y > t);
            }
        }
        for (c, &r) in cc.iter_mut().zip(r.iter()) {
            *c = enc.code_of_rank[(r & 15) as usize];
        }
    }
}

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`), sorted ascending:
/// for `i` in 0..7, the `2^i` midpoints of `linspace(0.1, 1, 2^i + 1)` times `10^(i-6)` and their
/// negatives, plus 0 and 1.
///
/// Bit-exact emulation of torch's f32 CPU `linspace` (scalar kernel, f32 `step = (end - start) /
/// (n - 1)`, `start + step*k` below the halfway index and `end - step*(n-1-k)` above, each a
/// fused multiply-add, i.e. rounded once), f32 midpoints `(a + b) / 2`, and an f32 multiply by
/// `f32(10^(i-6))` (torch converts the Python scalar to the tensor dtype).
pub fn dynamic_map_signed() -> [f32; 256] {
    const POW10: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1e0];
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for (i, &p) in POW10.iter().enumerate() {
        let n = (1usize << i) + 1;
        let b = linspace_f32(0.1, 1.0, n);
        let pf = p as f32;
        for k in 0..n - 1 {
            let mean = (b[k] + b[k + 1]) / 2.0;
            data.push(pf * mean);
            data.push(-pf * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// torch's two-sided f32 linspace with fused multiply-adds. The f64 expression is exact before
/// its final rounding (a 24-bit step times a small integer plus a nearby f32), so it equals the
/// single-rounded FMA.
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = ((end - start) / (n - 1) as f32) as f64;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                (start as f64 + step * i as f64) as f32
            } else {
                (end as f64 - step * (n - 1 - i) as f64) as f32
            }
        })
        .collect()
}

/// Nearest entry of a sorted map (ties -> lower entry).
fn nearest_in_sorted(map: &[f32; 256], y: f32) -> u8 {
    let i = map.partition_point(|&m| m < y);
    if i == 0 {
        return 0;
    }
    if i == 256 {
        return 255;
    }
    let (lo, hi) = (map[i - 1], map[i]);
    if (y - lo).abs() <= (hi - y).abs() {
        (i - 1) as u8
    } else {
        i as u8
    }
}

/// bitsandbytes `quantize_blockwise` with the signed dynamic map: codes and one absmax per
/// block of `block` values.
pub fn quantize_blockwise_dynamic(v: &[f32], block: usize) -> Result<(Vec<u8>, Vec<f32>)> {
    if block == 0 {
        return Err(Error::Invalid("nested block size must be positive".into()));
    }
    let map = dynamic_map_signed();
    let mut codes = Vec::with_capacity(v.len());
    let mut absmax = Vec::new();
    for b in v.chunks(block) {
        let m = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        absmax.push(m);
        for &x in b {
            let y = if m == 0.0 {
                0.0
            } else {
                (x / m).clamp(-1.0, 1.0)
            };
            codes.push(nearest_in_sorted(&map, y));
        }
    }
    Ok((codes, absmax))
}

/// The mean bitsandbytes subtracts before double quantization (f64 sum, rounded once).
fn mean_f32(v: &[f32]) -> f32 {
    if v.is_empty() {
        return 0.0;
    }
    (v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64) as f32
}

/// Double-quantize per-block absmax values (bnb `compress_statistics=True`).
pub fn double_quantize(absmax: &[f32], block: usize) -> Result<NestedScales> {
    let offset = mean_f32(absmax);
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let (codes, nested) = quantize_blockwise_dynamic(&centered, block)?;
    Ok(NestedScales {
        codes,
        absmax: nested,
        offset,
        block,
    })
}

impl NestedScales {
    /// Reconstruct the f32 scales: `map[code] * absmax[i / block] + offset`.
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        if self.block == 0 {
            return Err(Error::Invalid("nested block size must be positive".into()));
        }
        let need = self.codes.len().div_ceil(self.block);
        if self.absmax.len() != need {
            return Err(Error::BufferSize {
                what: "nested absmax",
                expected: need,
                got: self.absmax.len(),
            });
        }
        let map = dynamic_map_signed();
        Ok(self
            .codes
            .iter()
            .enumerate()
            .map(|(i, &c)| map[c as usize] * self.absmax[i / self.block] + self.offset)
            .collect())
    }
}

/// Quantize to NF4 exactly as bitsandbytes `quantize_4bit(quant_type="nf4", blocksize,
/// compress_statistics=double_quant)` on the flattened tensor. Requires `cols % blocksize == 0`
/// when `rows > 1` (so bnb's flattened blocks are row groups; pass a `1 x n` shape to quantize any
/// flat tensor, whose last block may then be shorter, as in bitsandbytes). With `double_quant` the tensor's `scales` are the
/// reconstructed absmax values and `nested` holds the 8-bit codes.
pub fn quantize_bnb(
    w: &[f32],
    rows: usize,
    cols: usize,
    blocksize: usize,
    double_quant: bool,
) -> Result<QuantizedTensor> {
    if blocksize == 0 || (rows > 1 && cols % blocksize != 0) {
        return Err(Error::Shape(format!(
            "bitsandbytes layout needs cols ({cols}) to be a multiple of the block size ({blocksize})"
        )));
    }
    let mut q = crate::quantize::quantize(
        w,
        rows,
        cols,
        &nf4_scheme(blocksize),
        &crate::quantize::QuantOptions::default(),
    )?;
    if double_quant {
        let n = double_quantize(&q.scales, 256)?;
        q.scales = n.dequantize()?;
        q.nested = Some(n);
    }
    Ok(q)
}

impl QuantizedTensor {
    /// The codes of a 4-bit tensor in bitsandbytes' byte order: the flattened row-major codes,
    /// byte `k = code[2k] << 4 | code[2k+1]` (first element in the HIGH nibble). Errors for other
    /// widths; an odd element count pads the last low nibble with 0.
    pub fn to_bnb_packed(&self) -> Result<Vec<u8>> {
        if self.scheme.elem.bits() != 4 {
            return Err(Error::Invalid(
                "bitsandbytes packing needs 4-bit codes".into(),
            ));
        }
        self.validate()?;
        let n = self.rows * self.cols;
        let mut flat = vec![0u8; n];
        if self.cols > 0 {
            for (r, row) in flat.chunks_mut(self.cols).enumerate() {
                self.row_codes(r, row)?;
            }
        }
        Ok(flat
            .chunks(2)
            .map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(0))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_encoder_is_nearest_with_low_ties() {
        let enc = TableEncoder::new(&NF4_TABLE);
        for (c, &v) in NF4_TABLE.iter().enumerate() {
            assert_eq!(enc.encode(v) as usize, c);
        }
        let mut y = -1.2f32;
        while y < 1.2 {
            let c = enc.encode(y) as usize;
            let d = (y as f64 - NF4_TABLE[c] as f64).abs();
            for &t in &NF4_TABLE {
                assert!(d <= (y as f64 - t as f64).abs() + 1e-7, "y {y}");
            }
            y += 0.001;
        }
        // a midpoint goes to the lower code
        let mid = (NF4_TABLE[8] + NF4_TABLE[9]) / 2.0;
        assert_eq!(enc.encode(mid), 8);
    }

    #[test]
    fn fp4_zero_maps_to_code_zero() {
        let enc = TableEncoder::new(&bnb_fp4_table());
        assert_eq!(enc.encode(0.0), 0);
        assert_eq!(bnb_fp4_table()[enc.encode(1.0) as usize], 1.0);
        assert_eq!(bnb_fp4_table()[enc.encode(-0.25) as usize], -0.25);
    }

    #[test]
    fn dynamic_map_shape() {
        let m = dynamic_map_signed();
        assert_eq!(m[255], 1.0);
        assert!(m.contains(&0.0));
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert!((m[0] + 0.9928).abs() < 1e-3, "{}", m[0]);
    }

    #[test]
    fn double_quant_reconstructs_closely() {
        let absmax: Vec<f32> = (0..300)
            .map(|i| 0.5 + (i as f32 * 0.37).sin().abs())
            .collect();
        let n = double_quantize(&absmax, 256).unwrap();
        let back = n.dequantize().unwrap();
        for (a, b) in absmax.iter().zip(&back) {
            assert!((a - b).abs() < 0.02, "{a} {b}");
        }
    }
}
