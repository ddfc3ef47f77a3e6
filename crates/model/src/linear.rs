//! [`Linear`]: one linear layer `y = x · Wᵀ (+ b)` whose weight is dense f32 or a numerics
//! [`QuantizedTensor`].
//!
//! Layouts: `W` is `[out][in]` row-major (the PyTorch convention), activations are token-major
//! `[n_tokens][in]` -> `[n_tokens][out]`.
//!
//! A quantized weight runs on the fused-dequantization kernels of
//! [`lowbit_kernels::PackedLinear`] (prefill GEMM and decode GEMV; the f32 weight matrix is
//! never kept) whenever the format has a kernel. Formats without one, and every layer when
//! `LOWBIT_LINEAR=dense` is set at load time (or after [`Linear::set_use_kernels`]`(false)`),
//! are decoded to f32 once and run on the dense GEMM: the reference path. The codes stay
//! attached either way so that exporters and reports see the quantized tensor.

use crate::arena::DenseF32;
use crate::{Error, Result};
use lowbit_kernels::PackedLinear;
use lowbit_numerics::QuantizedTensor;
use std::sync::OnceLock;

/// A quantizer applied to a linear layer's input before the product (W8A8, rotations):
/// called with the `[n_tokens][in]` input rows and `n_tokens`; it rewrites the rows in place.
pub type ActQuant = Box<dyn Fn(&mut [f32], usize) + Send + Sync>;

/// The weight of a linear layer.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Dense f32 `[out][in]`: a `Vec`, or a slice of the decode arena after
    /// [`crate::arena::pack`] (see [`crate::Model::pack_dense_weights`]).
    Dense(DenseF32),
    /// Quantized codes, run through `packed` when set, else through their f32 decoding.
    Quantized {
        /// The quantized tensor.
        q: Box<QuantizedTensor>,
        /// `q` dequantized (`[out][in]`). Filled when the layer is built on the reference path;
        /// on the packed path only on the first [`Linear::weight_f32`] call (then kept).
        dense: OnceLock<Vec<f32>>,
        /// The SIMD layout the products use, when the format has a kernel and the reference
        /// path is not forced.
        packed: Option<Box<PackedLinear>>,
    },
}

/// Whether quantized layers built now use the packed kernels: yes unless `LOWBIT_LINEAR` is
/// `dense` (or `reference`).
fn kernels_enabled() -> bool {
    !matches!(
        std::env::var("LOWBIT_LINEAR").as_deref(),
        Ok("dense" | "reference")
    )
}

/// A linear layer.
pub struct Linear {
    /// Output features (rows of `W`).
    pub out: usize,
    /// Input features (columns of `W`).
    pub inp: usize,
    weight: Weight,
    /// Optional bias, `out` values.
    pub bias: Option<Vec<f32>>,
    /// Optional input quantizer (see [`ActQuant`]).
    pub act_quant: Option<ActQuant>,
}

impl std::fmt::Debug for Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linear")
            .field("out", &self.out)
            .field("inp", &self.inp)
            .field("quantized", &self.is_quantized())
            .field("kernels", &self.uses_kernels())
            .field("bias", &self.bias.is_some())
            .field("act_quant", &self.act_quant.is_some())
            .finish()
    }
}

fn check_finite(what: &str, v: &[f32]) -> Result<()> {
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::NonFinite(format!("{what}: element {i} is {}", v[i])));
    }
    Ok(())
}

impl Linear {
    /// A dense layer from `w` (`[out][in]`). Fails on a length mismatch or non-finite weights.
    pub fn dense(w: Vec<f32>, out: usize, inp: usize) -> Result<Self> {
        if w.len() != out * inp {
            return Err(Error::Shape(format!(
                "dense weight has {} values, expected {out} x {inp}",
                w.len()
            )));
        }
        check_finite("dense weight", &w)?;
        // Decode streams this matrix once per token: back it with huge pages (a hint; see
        // `advise_huge_pages`). A model's layers are moved into one huge-page arena after
        // loading ([`crate::Model::pack_dense_weights`]), which covers them better.
        lowbit_kernels::gemv_f32::advise_huge_pages(&w);
        Ok(Linear {
            out,
            inp,
            weight: Weight::Dense(DenseF32::Heap(w)),
            bias: None,
            act_quant: None,
        })
    }

    /// A layer over a quantized weight. `dequantize` (which returns `rows * cols` values,
    /// `[out][in]`) is called once to check the decoding; its result is kept for the reference
    /// path, and dropped when the packed kernels take the products (see the module docs). The
    /// tensor's own `rows`/`cols` give the shape.
    pub fn quantized_with(
        q: QuantizedTensor,
        dequantize: impl FnOnce(&QuantizedTensor) -> Result<Vec<f32>>,
    ) -> Result<Self> {
        q.validate()?;
        let dense = dequantize(&q)?;
        let (out, inp) = (q.rows, q.cols);
        if dense.len() != out * inp {
            return Err(Error::Shape(format!(
                "dequantized weight has {} values, expected {out} x {inp}",
                dense.len()
            )));
        }
        check_finite("dequantized weight", &dense)?;
        let packed = if kernels_enabled() {
            PackedLinear::new(&q).ok().map(Box::new)
        } else {
            None
        };
        let dense = match packed {
            Some(_) => OnceLock::new(),
            None => OnceLock::from(dense),
        };
        Ok(Linear {
            out,
            inp,
            weight: Weight::Quantized {
                q: Box::new(q),
                dense,
                packed,
            },
            bias: None,
            act_quant: None,
        })
    }

    /// Bytes of weight data one product streams: the packed layout's bytes (codes, scales and
    /// padding) on the kernels, else the f32 matrix (4 bytes per weight).
    pub fn streamed_bytes(&self) -> usize {
        match &self.weight {
            Weight::Quantized {
                packed: Some(p), ..
            } => p.weight_bytes(),
            _ => self.out * self.inp * 4,
        }
    }

    /// True when the products run on the packed quantized kernels.
    pub fn uses_kernels(&self) -> bool {
        matches!(
            self.weight,
            Weight::Quantized {
                packed: Some(_),
                ..
            }
        )
    }

    /// Choose the product path of a quantized layer: `true` the packed kernels (when the format
    /// has one; the f32 decoding is dropped), `false` the dequantized f32 reference GEMM.
    /// Returns [`Self::uses_kernels`]; dense layers are unaffected.
    pub fn set_use_kernels(&mut self, on: bool) -> Result<bool> {
        if let Weight::Quantized { q, dense, packed } = &mut self.weight {
            if on && packed.is_none() {
                if let Ok(p) = PackedLinear::new(q) {
                    *packed = Some(Box::new(p));
                    *dense = OnceLock::new();
                }
            } else if !on && packed.is_some() {
                if dense.get().is_none() {
                    let d = q.dequantize()?;
                    check_finite("dequantized weight", &d)?;
                    *dense = OnceLock::from(d);
                }
                *packed = None;
            }
        }
        Ok(self.uses_kernels())
    }

    /// INT8 block activations for this layer's packed kernel
    /// ([`lowbit_kernels::ActMode::Int8Block`]: the input is rounded to 8 bits per 32 columns
    /// and the products are integer dot products), or back to f32 activations. It changes the
    /// numerics, so it is off unless asked for. Only layers whose packed kernel has the mode
    /// (INT4..INT8, MXFP4/NVFP4 and NF4 codes; NF4 also rounds its table to multiples of
    /// 1/64, see `lowbit_kernels::act8`) take it; returns whether this layer now runs it.
    /// An INT8 output head (`--head int8-pc`) takes it too. Rebuilding the packed
    /// layout ([`Self::set_use_kernels`]) resets it.
    pub fn set_act8(&mut self, on: bool) -> Result<bool> {
        if let Weight::Quantized {
            packed: Some(p), ..
        } = &mut self.weight
        {
            if p.supports_int8_act() {
                let mode = if on {
                    lowbit_kernels::ActMode::Int8Block
                } else {
                    lowbit_kernels::ActMode::F32
                };
                p.set_act_mode(mode)?;
                return Ok(on);
            }
        }
        Ok(false)
    }

    /// Attach a bias of `out` values.
    pub fn with_bias(mut self, b: Vec<f32>) -> Result<Self> {
        if b.len() != self.out {
            return Err(Error::Shape(format!(
                "bias has {} values, expected {}",
                b.len(),
                self.out
            )));
        }
        check_finite("bias", &b)?;
        self.bias = Some(b);
        Ok(self)
    }

    /// The weight.
    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    /// The dense f32 storage of a dense layer (for [`crate::arena::pack`]); `None` when
    /// quantized.
    pub fn dense_storage_mut(&mut self) -> Option<&mut DenseF32> {
        match &mut self.weight {
            Weight::Dense(w) => Some(w),
            Weight::Quantized { .. } => None,
        }
    }

    /// True when the weight is a quantized tensor.
    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, Weight::Quantized { .. })
    }

    /// The weight as f32 (`[out][in]`): the dense weight, or the decoded codes. On the packed
    /// path the codes are decoded on the first call and the copy is kept from then on.
    pub fn weight_f32(&self) -> &[f32] {
        match &self.weight {
            Weight::Dense(w) => w,
            Weight::Quantized { q, dense, .. } => dense.get_or_init(|| {
                // `q` was validated and decoded when the layer was built.
                q.dequantize().expect("quantized weight decodes")
            }),
        }
    }

    /// The quantized tensor, if any.
    pub fn quantized(&self) -> Option<&QuantizedTensor> {
        match &self.weight {
            Weight::Quantized { q, .. } => Some(q),
            Weight::Dense(_) => None,
        }
    }

    /// Replace the weight with a dense one of the same shape (keeps bias and input quantizer).
    pub fn set_dense(&mut self, w: Vec<f32>) -> Result<()> {
        let new = Linear::dense(w, self.out, self.inp)?;
        self.weight = new.weight;
        Ok(())
    }

    /// Replace the weight with a quantized one of the same shape (see [`Self::quantized_with`]).
    pub fn set_quantized(
        &mut self,
        q: QuantizedTensor,
        dequantize: impl FnOnce(&QuantizedTensor) -> Result<Vec<f32>>,
    ) -> Result<()> {
        if (q.rows, q.cols) != (self.out, self.inp) {
            return Err(Error::Shape(format!(
                "quantized weight is {}x{}, the layer is {}x{}",
                q.rows, q.cols, self.out, self.inp
            )));
        }
        let new = Linear::quantized_with(q, dequantize)?;
        self.weight = new.weight;
        Ok(())
    }

    /// `y[n_tokens][out] = x[n_tokens][in] · Wᵀ + b`, after the input quantizer if any.
    pub fn forward(&self, x: &[f32], n_tokens: usize, y: &mut [f32]) -> Result<()> {
        if x.len() != n_tokens * self.inp || y.len() != n_tokens * self.out {
            return Err(Error::Shape(format!(
                "linear {}x{}: input has {} values and output {}, for {n_tokens} tokens",
                self.out,
                self.inp,
                x.len(),
                y.len()
            )));
        }
        let quantized_input;
        let x = match &self.act_quant {
            Some(f) => {
                let mut buf = x.to_vec();
                f(&mut buf, n_tokens);
                quantized_input = buf;
                &quantized_input[..]
            }
            None => x,
        };
        if let Weight::Quantized {
            packed: Some(p), ..
        } = &self.weight
        {
            p.forward(x, n_tokens, y)?;
            self.add_bias(y);
            return Ok(());
        }
        // Decode (one token) streams the weight through the bandwidth-bound f32 GEMV kernel
        // (row blocks over the rayon pool); longer chunks run one GEMM.
        let w = self.weight_f32();
        if n_tokens == 1 {
            lowbit_kernels::gemv_f32::gemv(x, w, y)?;
        } else {
            lowbit_kernels::dense::matmul_wt(x, w, y, n_tokens, self.inp, self.out)?;
        }
        self.add_bias(y);
        Ok(())
    }

    fn add_bias(&self, y: &mut [f32]) {
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(self.out) {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        crate::test_util::lcg_values(n, seed)
    }

    fn reference(w: &[f32], x: &[f32], n: usize, inp: usize, out: usize) -> Vec<f64> {
        (0..n * out)
            .map(|i| {
                let (t, o) = (i / out, i % out);
                (0..inp)
                    .map(|k| x[t * inp + k] as f64 * w[o * inp + k] as f64)
                    .sum()
            })
            .collect()
    }

    #[test]
    fn products_match_f64() {
        for &(n, inp, out) in &[
            (1, 37, 5),
            (1, 576, 300),
            (1, 64, 1000),
            (3, 64, 17),
            (1, 1, 1),
        ] {
            let w = data(out * inp, 1);
            let x = data(n * inp, 2);
            let b = data(out, 3);
            let l = Linear::dense(w.clone(), out, inp)
                .unwrap()
                .with_bias(b.clone())
                .unwrap();
            let mut y = vec![0f32; n * out];
            l.forward(&x, n, &mut y).unwrap();
            let r = reference(&w, &x, n, inp, out);
            for (i, (a, r)) in y.iter().zip(&r).enumerate() {
                let want = r + b[i % out] as f64;
                assert!(
                    (*a as f64 - want).abs() < 1e-4 * (inp as f64).sqrt(),
                    "{a} vs {want}"
                );
            }
        }
    }

    #[test]
    fn act_quant_hook_sees_input() {
        let mut l = Linear::dense(vec![1.0, 1.0], 1, 2).unwrap();
        l.act_quant = Some(Box::new(|x: &mut [f32], _n| {
            x.iter_mut().for_each(|v| *v = v.round())
        }));
        let mut y = [0f32];
        l.forward(&[0.4, 1.6], 1, &mut y).unwrap();
        assert_eq!(y[0], 2.0);
    }

    #[test]
    fn act8_is_opt_in_and_close_to_f32_activations() {
        let (out, inp) = (12, 200);
        let w = data(out * inp, 4);
        let scheme = lowbit_numerics::Scheme::from_name("int4-g64-asym").unwrap();
        let q = lowbit_numerics::quantize(
            &w,
            out,
            inp,
            &scheme,
            &lowbit_numerics::QuantOptions::default(),
        )
        .unwrap();
        let mut l = Linear::quantized_with(q, |q| Ok(q.dequantize()?)).unwrap();
        if !l.uses_kernels() {
            return; // LOWBIT_LINEAR=dense: no packed kernel, nothing to switch
        }
        let x = data(inp, 5);
        let (mut a, mut b) = (vec![0f32; out], vec![0f32; out]);
        l.forward(&x, 1, &mut a).unwrap();
        assert!(l.set_act8(true).unwrap());
        l.forward(&x, 1, &mut b).unwrap();
        assert_ne!(a, b);
        // per 32-column block the rounding moves the output by at most sum|w| * max|x| / 254
        let bound: f32 = l
            .weight_f32()
            .chunks(inp)
            .map(|r| r.iter().map(|v| v.abs()).sum::<f32>())
            .fold(0.0, f32::max)
            / 254.0;
        for (u, v) in a.iter().zip(&b) {
            assert!(
                (u - v).abs() <= bound * 1.01 + 1e-5,
                "{u} vs {v} (bound {bound})"
            );
        }
        assert!(!l.set_act8(false).unwrap());
        l.forward(&x, 1, &mut b).unwrap();
        assert_eq!(a, b);
        let mut d = Linear::dense(w, out, inp).unwrap();
        assert!(!d.set_act8(true).unwrap());
    }

    #[test]
    fn bad_shapes_and_nan_are_errors() {
        assert!(Linear::dense(vec![0.0; 5], 2, 3).is_err());
        assert!(Linear::dense(vec![f32::NAN; 6], 2, 3).is_err());
        let l = Linear::dense(vec![0.0; 6], 2, 3).unwrap();
        assert!(l.forward(&[0.0; 3], 2, &mut [0.0; 4]).is_err());
        assert!(l.with_bias(vec![0.0; 3]).is_err());
    }
}
