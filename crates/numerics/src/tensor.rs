//! [`QuantizedTensor`]: the one container every quantizer in lowbit produces and every kernel,
//! exporter and model loader consumes.
//!
//! # Layout contract (little-endian, documented in `docs/formats.md`)
//! * The logical tensor is 2-D, `rows x cols`, row-major; for a linear layer `rows` is the output
//!   dimension and `cols` the input dimension (the PyTorch `[out, in]` convention).
//! * `data` holds element codes, `bits` wide, packed LSB-first into a little-endian bit stream
//!   **per row**: element `c` of a row starts at bit `c * bits` of that row; every row starts on a
//!   byte boundary, so a row occupies [`QuantizedTensor::row_bytes`] bytes. For 4-bit codes this
//!   means element `2j` sits in the low nibble of byte `j` (the compressed-tensors / OCP order).
//! * Integer codes are stored unsigned: `u in [0, 2^bits)`, value `= scale * (u - zero_point)`.
//!   Symmetric schemes have the implicit zero point `2^(bits-1)` (so INT4 sym stores `q + 8`).
//! * Float element codes are the format's own bit pattern (see [`crate::FloatFormat`]).
//! * `scales` holds one f32 per scale block, already rounded to `scale_dtype` (every f16, bf16,
//!   E8M0 and E4M3 value is exact in f32), in row-major order over the block grid
//!   (`rows / block_rows` x `ceil(cols / block_cols)`).

use crate::error::{Error, Result};

/// What one stored element means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ElemFormat {
    /// Integer of `bits` (2..=8) stored unsigned with a zero point (see module docs).
    Int {
        /// Width of one code, 2..=8.
        bits: u8,
    },
    /// A minifloat, stored as its bit pattern.
    Float(crate::FloatFormat),
    /// The bitsandbytes NF4 table (16 values in [-1, 1]).
    Nf4,
    /// Ternary {-1, 0, +1}, stored in 2 bits as `q + 1`.
    Ternary,
    /// Binary {-1, +1}, stored in 1 bit (0 -> -1, 1 -> +1).
    Binary,
}

impl ElemFormat {
    /// Width in bits of one stored code.
    pub fn bits(&self) -> u32 {
        match self {
            ElemFormat::Int { bits } => *bits as u32,
            ElemFormat::Float(f) => f.total_bits(),
            ElemFormat::Nf4 => 4,
            ElemFormat::Ternary => 2,
            ElemFormat::Binary => 1,
        }
    }
}

/// Which elements share one scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Granularity {
    /// One scale for the whole tensor.
    PerTensor,
    /// One scale per row (output channel).
    PerChannel,
    /// Groups of `n` consecutive elements along a row; when `cols % n != 0` the last group of
    /// each row is shorter (the GPTQ reference rule: 576 = 4 x 128 + 64).
    PerGroup(usize),
    /// 2-D blocks of `rows x cols` elements; ragged blocks at the bottom/right edges are smaller.
    Block2d {
        /// Block height.
        rows: usize,
        /// Block width.
        cols: usize,
    },
}

impl Granularity {
    /// The block shape `(block_rows, block_cols)` this granularity induces on a `rows x cols` tensor.
    pub fn block_shape(&self, rows: usize, cols: usize) -> (usize, usize) {
        match *self {
            Granularity::PerTensor => (rows.max(1), cols.max(1)),
            Granularity::PerChannel => (1, cols.max(1)),
            Granularity::PerGroup(g) => (1, g),
            Granularity::Block2d { rows: r, cols: c } => (r, c),
        }
    }

    /// Number of scale blocks `(grid_rows, grid_cols)` on a `rows x cols` tensor.
    pub fn grid(&self, rows: usize, cols: usize) -> (usize, usize) {
        let (br, bc) = self.block_shape(rows, cols);
        (rows.div_ceil(br.max(1)), cols.div_ceil(bc.max(1)))
    }
}

/// The number format a scale is stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ScaleDtype {
    /// IEEE f32.
    F32,
    /// IEEE f16.
    F16,
    /// bfloat16.
    Bf16,
    /// E8M0 power of two (MX formats).
    E8M0,
    /// FP8 E4M3 (NVFP4 block scales).
    E4M3,
}

/// Double quantization of per-block scales (bitsandbytes NF4 `compress_statistics=True`):
/// the f32 absmax values are stored as 8-bit codes of the signed dynamic map in blocks of
/// `block`, plus one f32 absmax per nested block and a global offset. `QuantizedTensor::scales`
/// still holds the reconstructed f32 values, so dequantization never needs this.
#[derive(Debug, Clone, PartialEq)]
pub struct NestedScales {
    /// One 8-bit code per scale.
    pub codes: Vec<u8>,
    /// One f32 absmax per nested block.
    pub absmax: Vec<f32>,
    /// Mean that was subtracted before quantizing.
    pub offset: f32,
    /// Nested block size (256 in bitsandbytes).
    pub block: usize,
}

/// A complete description of how a tensor is quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scheme {
    /// Element format.
    pub elem: ElemFormat,
    /// Scale sharing.
    pub granularity: Granularity,
    /// Storage type of scales.
    pub scale_dtype: ScaleDtype,
    /// Integer formats only: store a per-block zero point (asymmetric). Must be false otherwise.
    pub asymmetric: bool,
    /// NVFP4: an extra f32 per-tensor scale (`global_scale`) divides the block scales.
    pub global_scale: bool,
}

/// A quantized 2-D tensor: codes, scales and everything needed to decode them.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedTensor {
    /// How it was quantized.
    pub scheme: Scheme,
    /// Rows (output features).
    pub rows: usize,
    /// Columns (input features).
    pub cols: usize,
    /// Packed codes, see the module docs for the bit layout.
    pub data: Vec<u8>,
    /// One scale per block, row-major over the block grid (values exact in `scheme.scale_dtype`).
    pub scales: Vec<f32>,
    /// Asymmetric integer schemes: one zero point per block, in `[0, 2^bits)`.
    pub zero_points: Option<Vec<u8>>,
    /// NVFP4-style per-tensor scale: dequantized value = elem * (scale / global_scale).
    pub global_scale: Option<f32>,
    /// Act-order (GPTQ) group index per input column: column `c` uses group `g_idx[c]` of its row
    /// instead of `c / group`. `None` means the natural order.
    pub g_idx: Option<Vec<u32>>,
    /// Optional double-quantized representation of `scales`.
    pub nested: Option<NestedScales>,
}

impl QuantizedTensor {
    /// Bytes occupied by one packed row of codes.
    pub fn row_bytes(&self) -> usize {
        packed_row_bytes(self.cols, self.scheme.elem.bits())
    }

    /// The scale-block grid `(grid_rows, grid_cols)`.
    pub fn grid(&self) -> (usize, usize) {
        self.scheme.granularity.grid(self.rows, self.cols)
    }

    /// Total storage in bytes: codes + scales (in their storage dtype) + zero points + g_idx +
    /// global scale. This is the number used for bits-per-weight reports.
    pub fn storage_bytes(&self) -> usize {
        let scale_bytes = match self.scheme.scale_dtype {
            ScaleDtype::F32 => 4,
            ScaleDtype::F16 | ScaleDtype::Bf16 => 2,
            ScaleDtype::E8M0 | ScaleDtype::E4M3 => 1,
        };
        let scales = match &self.nested {
            Some(n) => n.codes.len() + 4 * n.absmax.len() + 4,
            None => self.scales.len() * scale_bytes,
        };
        let zp_bits = self.scheme.elem.bits() as usize;
        let zps = self
            .zero_points
            .as_ref()
            .map_or(0, |z| (z.len() * zp_bits).div_ceil(8));
        self.data.len()
            + scales
            + zps
            + self.g_idx.as_ref().map_or(0, |g| 4 * g.len())
            + if self.global_scale.is_some() { 4 } else { 0 }
    }

    /// Bits per weight, all metadata counted.
    pub fn bits_per_weight(&self) -> f64 {
        8.0 * self.storage_bytes() as f64 / (self.rows * self.cols).max(1) as f64
    }

    /// Check every internal length against the scheme and shape; a tensor read from a file
    /// must pass this before it is decoded.
    pub fn validate(&self) -> Result<()> {
        let bits = self.scheme.elem.bits();
        if let ElemFormat::Int { bits } = self.scheme.elem {
            if !(2..=8).contains(&bits) {
                return Err(Error::Invalid(format!("integer width {bits} not in 2..=8")));
            }
        } else if self.scheme.asymmetric {
            return Err(Error::Invalid(
                "only integer formats can be asymmetric".into(),
            ));
        }
        if bits == 0 || bits > 8 {
            return Err(Error::Invalid(format!("element width {bits} not in 1..=8")));
        }
        if let Granularity::PerGroup(0) | Granularity::Block2d { rows: 0, .. } =
            self.scheme.granularity
        {
            return Err(Error::Invalid("group size must be positive".into()));
        }
        if let Granularity::Block2d { cols: 0, .. } = self.scheme.granularity {
            return Err(Error::Invalid("block width must be positive".into()));
        }
        let want = self.rows * self.row_bytes();
        if self.data.len() != want {
            return Err(Error::BufferSize {
                what: "packed codes",
                expected: want,
                got: self.data.len(),
            });
        }
        let (gr, gc) = self.grid();
        if self.scales.len() != gr * gc {
            return Err(Error::BufferSize {
                what: "scales (f32 entries)",
                expected: gr * gc,
                got: self.scales.len(),
            });
        }
        match (&self.zero_points, self.scheme.asymmetric) {
            (Some(z), true) if z.len() != gr * gc => {
                return Err(Error::BufferSize {
                    what: "zero points",
                    expected: gr * gc,
                    got: z.len(),
                })
            }
            (None, true) => {
                return Err(Error::Invalid(
                    "asymmetric scheme without zero points".into(),
                ))
            }
            (Some(_), false) => {
                return Err(Error::Invalid(
                    "zero points given for a symmetric scheme".into(),
                ))
            }
            _ => {}
        }
        if self.scheme.global_scale != self.global_scale.is_some() {
            return Err(Error::Invalid(
                "global scale presence does not match the scheme".into(),
            ));
        }
        if let Some(g) = &self.g_idx {
            if g.len() != self.cols {
                return Err(Error::BufferSize {
                    what: "g_idx",
                    expected: self.cols,
                    got: g.len(),
                });
            }
            if g.iter().any(|&x| x as usize >= gc) {
                return Err(Error::Invalid(format!(
                    "g_idx entry out of range (groups per row: {gc})"
                )));
            }
        }
        Ok(())
    }
}

/// Bytes needed for one row of `cols` codes of `bits` bits each.
pub fn packed_row_bytes(cols: usize, bits: u32) -> usize {
    (cols * bits as usize).div_ceil(8)
}
