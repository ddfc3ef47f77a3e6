//! End-to-end SpinQuant: R1 (residual stream) and one R2 per layer (V → O, per head) learned
//! by Cayley SGD on the whole network's loss, with the weight and activation fake-quantizers in
//! the loop (straight-through estimator), as in the SpinQuant paper.
//!
//! [`E2eNet`] is a differentiable copy of the evaluation forward of a model whose norms are
//! folded ([`super::fold_norms`]): for given `(R1, [R2; layers])` it builds each layer's
//! rotated weights with the same operations as [`super::apply_rotations`] (R1, then R2, then the
//! fixed online Hadamard R4 on `down_proj`), RTN-quantizes them with the target scheme and
//! clipping ([`lowbit_calibration::rtn_dequantized`], what [`super::quantize_weights_rtn`]
//! stores), and runs the forward with the activation quantizer on every decoder linear's input
//! (after the online Hadamard for `down_proj`). The embedding is looked up and rotated
//! (`E R1`), the head applied as `x R1ᵀ Hᵀ` (the same product as the rotated head `H R1`; the
//! head is not quantized in the evaluation either).
//!
//! The backward ([`E2eNet::loss_and_grad`]) is hand-written. Fake-quantizers pass gradients
//! unchanged (STE: `∂Q(x)/∂x = I`, clipped values included), so the gradient of a rotated
//! weight `W' = Q(M R)` reaches `R` as if `Q` were absent. Loss: the mean over positions of
//! KL(teacher ‖ student) of the next-token distributions, the teacher being the unrotated f32
//! model (its log-probabilities are precomputed once).

use super::window_log_probs;
use crate::error::{Error, Result};
use crate::llama::{rms_norm, silu, Model};
use crate::rope::Rope;
use lowbit_calibration::actquant::ActQuantizer;
use lowbit_calibration::hadamard::Hadamard;
use lowbit_calibration::rotation::{
    rotate_output_side, rotate_rows, rotate_rows_blockwise, transpose,
};
use lowbit_calibration::spinquant::cayley_step;
use lowbit_calibration::{rtn_dequantized, Clipping, RtnConfig};
use lowbit_kernels::dense::matmul_wt;
use lowbit_numerics::Scheme;
use rayon::prelude::*;
use std::time::Instant;

/// `a · bᵀ` for `a: m × k`, `b: n × k`.
fn mm_t(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Result<Vec<f32>> {
    let mut y = vec![0f32; m * n];
    matmul_wt(a, b, &mut y, m, k, n)?;
    Ok(y)
}

/// `acc += aᵀ · b` for `a: n × p`, `b: n × q` (`acc: p × q`).
fn add_atb(acc: &mut [f32], a: &[f32], b: &[f32], n: usize, p: usize, q: usize) -> Result<()> {
    let y = mm_t(&transpose(a, n, p), &transpose(b, n, q), p, n, q)?;
    acc.iter_mut().zip(&y).for_each(|(s, v)| *s += v);
    Ok(())
}

/// `Σ_b a_bᵀ · b_b` over the `blocks` column blocks of width `d` of `a, b: n × (blocks·d)`.
fn add_atb_blocks(acc: &mut [f32], a: &[f32], b: &[f32], n: usize, d: usize) -> Result<()> {
    let w = a.len() / n.max(1);
    for blk in 0..w / d {
        let pick = |x: &[f32]| -> Vec<f32> {
            x.chunks_exact(w)
                .flat_map(|r| r[blk * d..(blk + 1) * d].iter().copied())
                .collect()
        };
        add_atb(acc, &pick(a), &pick(b), n, d, d)?;
    }
    Ok(())
}

fn add(a: &mut [f32], b: &[f32]) {
    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
}

/// RMSNorm backward for a unit weight: `y = x r`, `r = (mean(x²) + eps)^-1/2`.
fn rms_norm_backward(x: &[f32], dy: &[f32], d: usize, eps: f32, dx: &mut [f32]) {
    for ((xr, gr), o) in x
        .chunks_exact(d)
        .zip(dy.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d))
    {
        let ss: f64 = xr.iter().map(|v| (*v as f64).powi(2)).sum();
        let r = 1.0 / (ss / d as f64 + eps as f64).sqrt();
        let dot: f64 = xr.iter().zip(gr).map(|(a, b)| *a as f64 * *b as f64).sum();
        let c = r * r * r * dot / d as f64;
        for ((o, &xv), &g) in o.iter_mut().zip(xr).zip(gr) {
            *o += (r * g as f64 - c * xv as f64) as f32;
        }
    }
}

/// RoPE (`inverse = false`) or its transpose (`true`) on `[n][heads][hd]`.
fn rope_apply(rope: &Rope, x: &mut [f32], n: usize, heads: usize, hd: usize, inverse: bool) {
    if !inverse {
        rope.apply(x, n, heads, 0);
        return;
    }
    let half = hd / 2;
    let (mut c, mut s) = (vec![0f32; half], vec![0f32; half]);
    for t in 0..n {
        rope.cos_sin(t, &mut c, &mut s);
        for h in 0..heads {
            let v = &mut x[(t * heads + h) * hd..][..hd];
            let (a, b) = v.split_at_mut(half);
            for i in 0..half {
                let (x0, x1) = (a[i], b[i]);
                a[i] = x0 * c[i] + x1 * s[i];
                b[i] = x1 * c[i] - x0 * s[i];
            }
        }
    }
}

/// The fixed (rotation-independent) parts of one layer.
struct FixedLayer {
    /// Transposes of the unrotated (norm-folded) weights, for `dy · W`.
    qt: Vec<f32>,
    kt: Vec<f32>,
    vt: Vec<f32>,
    ot: Vec<f32>,
    gt: Vec<f32>,
    ut: Vec<f32>,
    /// `W_down · H4` (the online Hadamard folded into down_proj).
    down_h: Vec<f32>,
}

/// One layer's rotated, fake-quantized weights and their transposes.
struct RotLayer {
    w: [Vec<f32>; 7],
    wt: [Vec<f32>; 7],
}

/// Activations of one layer kept for the backward.
struct LayerAct {
    h_in: Vec<f32>,
    a_hat: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    p: Vec<f32>,
    att_hat: Vec<f32>,
    h_mid: Vec<f32>,
    m_hat: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    s_hat: Vec<f32>,
}

/// The quantizers in the loop: weight scheme + clipping (`None`: f32 weights) and activation
/// quantizer (`None`: f32 activations).
#[derive(Debug, Clone)]
pub struct E2eQuant {
    /// Weight RTN scheme and block-scale clipping.
    pub weights: Option<(Scheme, Clipping)>,
    /// Per-linear input quantizer.
    pub act: Option<ActQuantizer>,
}

/// Gradients of the loss with respect to R1 and each layer's R2.
#[derive(Debug, Clone)]
pub struct E2eGrad {
    /// Mean loss over the positions.
    pub loss: f64,
    /// `∂L/∂R1` (`hidden × hidden`).
    pub r1: Vec<f32>,
    /// `∂L/∂R2` per layer (`head_dim × head_dim`).
    pub r2: Vec<Vec<f32>>,
}

/// Differentiable rotated + quantized forward of a norm-folded Llama model (see the module
/// docs).
pub struct E2eNet<'a> {
    model: &'a Model,
    quant: E2eQuant,
    had: Hadamard,
    /// Dense `H4` when it is not symmetric (the backward needs `H4ᵀ`).
    had_dense: Option<Vec<f32>>,
    fixed: Vec<FixedLayer>,
    head: Vec<f32>,
    head_t: Vec<f32>,
    rope: Rope,
}

impl<'a> E2eNet<'a> {
    /// Prepare for `model` (norms folded, unrotated, dense f32, no biases).
    pub fn new(model: &'a Model, quant: E2eQuant) -> Result<Self> {
        let c = &model.config;
        let (h, f) = (c.hidden_size, c.intermediate_size);
        if !super::norms_foldable(c.arch) || model.lm_head.is_none() {
            return Err(Error::Quantize(
                "end-to-end SpinQuant needs a Llama-type model with folded norms".into(),
            ));
        }
        let ones = |v: &[f32]| v.iter().all(|&x| x == 1.0);
        if !ones(&model.norm)
            || model
                .layers
                .iter()
                .any(|l| !ones(&l.attn_norm) || !ones(&l.mlp_norm))
        {
            return Err(Error::Quantize(
                "end-to-end SpinQuant needs folded norms (fold_norms first)".into(),
            ));
        }
        for name in model.linear_names() {
            let l = model.linear(&name).expect("listed");
            if l.is_quantized() || l.bias.is_some() {
                return Err(Error::Quantize(format!(
                    "end-to-end SpinQuant needs dense f32 linears without bias ({name})"
                )));
            }
        }
        if let Some(a) = &quant.act {
            a.validate()?;
        }
        let had = Hadamard::new(f).map_err(|e| {
            Error::Quantize(format!(
                "online Hadamard before down_proj (FFN width {f}): {e}"
            ))
        })?;
        let mut dense = vec![0f32; f * f];
        (0..f).for_each(|i| dense[i * f + i] = 1.0);
        had.apply_rows(&mut dense)?;
        let symmetric = (0..f).all(|i| (0..i).all(|j| dense[i * f + j] == dense[j * f + i]));
        let fixed = model
            .layers
            .iter()
            .map(|l| {
                let t = |l: &crate::linear::Linear| transpose(l.weight_f32(), l.out, l.inp);
                let mut down_h = l.down_proj.weight_f32().to_vec();
                had.apply_rows(&mut down_h)?;
                Ok(FixedLayer {
                    qt: t(&l.q_proj),
                    kt: t(&l.k_proj),
                    vt: t(&l.v_proj),
                    ot: t(&l.o_proj),
                    gt: t(&l.gate_proj),
                    ut: t(&l.up_proj),
                    down_h,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head = model
            .lm_head
            .as_ref()
            .expect("checked")
            .weight_f32()
            .to_vec();
        let head_t = transpose(&head, c.vocab_size, h);
        Ok(E2eNet {
            model,
            quant,
            had,
            had_dense: (!symmetric).then_some(dense),
            fixed,
            head,
            head_t,
            rope: Rope::new(c),
        })
    }

    fn check(&self, r1: &[f32], r2: &[Vec<f32>]) -> Result<()> {
        let c = &self.model.config;
        if r1.len() != c.hidden_size * c.hidden_size
            || r2.len() != c.n_layers
            || r2.iter().any(|r| r.len() != c.head_dim * c.head_dim)
        {
            return Err(Error::Shape(format!(
                "end-to-end SpinQuant: R1 must be {0} x {0} and one {1} x {1} R2 per layer ({2})",
                c.hidden_size, c.head_dim, c.n_layers
            )));
        }
        Ok(())
    }

    /// Layer `li`'s weights rotated exactly as [`super::apply_rotations`] does (R1, then R2,
    /// then the Hadamard on down_proj), then RTN-quantized.
    fn rotated_layer(&self, li: usize, r1: &[f32], r2: &[f32]) -> Result<RotLayer> {
        let c = &self.model.config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let l = &self.model.layers[li];
        let lins = [
            &l.q_proj,
            &l.k_proj,
            &l.v_proj,
            &l.o_proj,
            &l.gate_proj,
            &l.up_proj,
            &l.down_proj,
        ];
        let mut w: [Vec<f32>; 7] = std::array::from_fn(|i| lins[i].weight_f32().to_vec());
        for i in [0, 1, 2, 4, 5] {
            rotate_rows(&mut w[i], lins[i].out, r1, h)?;
        }
        for i in [3, 6] {
            rotate_output_side(&mut w[i], lins[i].inp, r1, h)?;
        }
        for blk in w[2].chunks_exact_mut(hd * h) {
            rotate_output_side(blk, h, r2, hd)?;
        }
        rotate_rows_blockwise(&mut w[3], c.q_dim(), r2, hd)?;
        self.had.apply_rows(&mut w[6])?;
        if let Some((s, clip)) = &self.quant.weights {
            for (i, wi) in w.iter_mut().enumerate() {
                *wi = rtn_dequantized(
                    wi,
                    lins[i].out,
                    lins[i].inp,
                    s,
                    &RtnConfig { clipping: *clip },
                )?;
            }
        }
        let wt = std::array::from_fn(|i| transpose(&w[i], lins[i].out, lins[i].inp));
        Ok(RotLayer { w, wt })
    }

    fn rotated(&self, r1: &[f32], r2: &[Vec<f32>]) -> Result<Vec<RotLayer>> {
        self.check(r1, r2)?;
        (0..self.model.layers.len())
            .into_par_iter()
            .map(|li| self.rotated_layer(li, r1, &r2[li]))
            .collect()
    }

    fn act_q(&self, x: &mut [f32], n: usize, cols: usize) -> Result<()> {
        if let Some(a) = &self.quant.act {
            a.apply(x, n, cols)?;
        }
        Ok(())
    }

    /// Causal GQA attention of roped `q, k` and `v`: returns `(out, probs)`, probs laid out
    /// `[head][n][n]`.
    fn attention(&self, q: &[f32], k: &[f32], v: &[f32], n: usize) -> (Vec<f32>, Vec<f32>) {
        let c = &self.model.config;
        let (nh, nkv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let rep = nh / nkv;
        let scale = c.attn_scale();
        let per_head: Vec<(Vec<f32>, Vec<f32>)> = (0..nh)
            .into_par_iter()
            .map(|hh| {
                let kh = hh / rep;
                let mut p = vec![0f32; n * n];
                let mut o = vec![0f32; n * hd];
                for t in 0..n {
                    let qv = &q[(t * nh + hh) * hd..][..hd];
                    let row = &mut p[t * n..(t + 1) * n];
                    let mut m = f32::NEG_INFINITY;
                    for (s, rv) in row.iter_mut().enumerate().take(t + 1) {
                        let kv = &k[(s * nkv + kh) * hd..][..hd];
                        *rv = qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() * scale;
                        m = m.max(*rv);
                    }
                    let mut z = 0f32;
                    for rv in row.iter_mut().take(t + 1) {
                        *rv = (*rv - m).exp();
                        z += *rv;
                    }
                    let ov = &mut o[t * hd..(t + 1) * hd];
                    for (s, rv) in row.iter_mut().enumerate().take(t + 1) {
                        *rv /= z;
                        let vv = &v[(s * nkv + kh) * hd..][..hd];
                        ov.iter_mut().zip(vv).for_each(|(a, b)| *a += *rv * b);
                    }
                }
                (p, o)
            })
            .collect();
        let mut out = vec![0f32; n * nh * hd];
        let mut probs = Vec::with_capacity(nh * n * n);
        for (hh, (p, o)) in per_head.into_iter().enumerate() {
            for t in 0..n {
                out[(t * nh + hh) * hd..][..hd].copy_from_slice(&o[t * hd..(t + 1) * hd]);
            }
            probs.extend_from_slice(&p);
        }
        (out, probs)
    }

    /// Forward of `tokens` (positions from 0) through the rotated, quantized model; returns
    /// the logits and, when `keep`, the activations for the backward.
    fn forward_inner(
        &self,
        r1: &[f32],
        rot: &[RotLayer],
        tokens: &[u32],
        keep: bool,
    ) -> Result<(Vec<f32>, Vec<LayerAct>)> {
        let c = &self.model.config;
        let (h, f, qd, kvd) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
        let n = tokens.len();
        let eps = c.rms_eps;
        let ones = vec![1f32; h];
        let mut hs = self.model.embed(tokens)?;
        rotate_rows(&mut hs, n, r1, h)?;
        let mut acts = Vec::new();
        for rl in rot {
            let h_in = hs.clone();
            let mut a = vec![0f32; n * h];
            rms_norm(&hs, &ones, eps, &mut a);
            self.act_q(&mut a, n, h)?;
            let mut q = mm_t(&a, &rl.w[0], n, h, qd)?;
            let mut k = mm_t(&a, &rl.w[1], n, h, kvd)?;
            let v = mm_t(&a, &rl.w[2], n, h, kvd)?;
            rope_apply(&self.rope, &mut q, n, c.n_heads, c.head_dim, false);
            rope_apply(&self.rope, &mut k, n, c.n_kv_heads, c.head_dim, false);
            let (mut att, p) = self.attention(&q, &k, &v, n);
            self.act_q(&mut att, n, qd)?;
            let o = mm_t(&att, &rl.w[3], n, qd, h)?;
            add(&mut hs, &o);
            let h_mid = hs.clone();
            let mut m = vec![0f32; n * h];
            rms_norm(&hs, &ones, eps, &mut m);
            self.act_q(&mut m, n, h)?;
            let g = mm_t(&m, &rl.w[4], n, h, f)?;
            let u = mm_t(&m, &rl.w[5], n, h, f)?;
            let mut s: Vec<f32> = g.iter().zip(&u).map(|(g, u)| silu(*g) * u).collect();
            self.had.apply_rows(&mut s)?;
            self.act_q(&mut s, n, f)?;
            let d = mm_t(&s, &rl.w[6], n, f, h)?;
            add(&mut hs, &d);
            if keep {
                acts.push(LayerAct {
                    h_in,
                    a_hat: a,
                    q,
                    k,
                    v,
                    p,
                    att_hat: att,
                    h_mid,
                    m_hat: m,
                    g,
                    u,
                    s_hat: s,
                });
            }
        }
        let mut xn = vec![0f32; n * h];
        rms_norm(&hs, &ones, eps, &mut xn);
        let xr = mm_t(&xn, r1, n, h, h)?;
        let logits = mm_t(&xr, &self.head, n, h, c.vocab_size)?;
        acts.push(LayerAct {
            h_in: hs,
            a_hat: xn,
            q: Vec::new(),
            k: Vec::new(),
            v: Vec::new(),
            p: Vec::new(),
            att_hat: Vec::new(),
            h_mid: Vec::new(),
            m_hat: Vec::new(),
            g: Vec::new(),
            u: Vec::new(),
            s_hat: Vec::new(),
        });
        Ok((logits, acts))
    }

    /// Logits `[n][vocab]` of `tokens` through the model rotated by `(r1, r2)` and quantized.
    pub fn forward(&self, r1: &[f32], r2: &[Vec<f32>], tokens: &[u32]) -> Result<Vec<f32>> {
        let rot = self.rotated(r1, r2)?;
        Ok(self.forward_inner(r1, &rot, tokens, false)?.0)
    }

    /// Mean KL(teacher ‖ student) over the positions of each window and its gradient with
    /// respect to R1 and every R2, summed over `batch` (pairs of tokens and the teacher's
    /// log-probabilities `[n][vocab]`), divided by the number of windows.
    pub fn loss_and_grad(
        &self,
        r1: &[f32],
        r2: &[Vec<f32>],
        batch: &[(&[u32], &[f32])],
    ) -> Result<E2eGrad> {
        let rot = self.rotated(r1, r2)?;
        let c = &self.model.config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let mut g = E2eGrad {
            loss: 0.0,
            r1: vec![0f32; h * h],
            r2: vec![vec![0f32; hd * hd]; c.n_layers],
        };
        let nb = batch.len().max(1) as f64;
        for (toks, teacher) in batch {
            let l = self.window_grad(r1, r2, &rot, toks, teacher, 1.0 / nb, &mut g)?;
            g.loss += l / nb;
        }
        Ok(g)
    }

    /// Loss of one window (mean over positions) and its gradient times `w`, added to `g`.
    #[allow(clippy::too_many_arguments)]
    fn window_grad(
        &self,
        r1: &[f32],
        r2: &[Vec<f32>],
        rot: &[RotLayer],
        toks: &[u32],
        teacher: &[f32],
        w: f64,
        g: &mut E2eGrad,
    ) -> Result<f64> {
        let c = &self.model.config;
        let (h, f, qd, kvd, hd) = (
            c.hidden_size,
            c.intermediate_size,
            c.q_dim(),
            c.kv_dim(),
            c.head_dim,
        );
        let (nh, nkv) = (c.n_heads, c.n_kv_heads);
        let vocab = c.vocab_size;
        let n = toks.len();
        if teacher.len() != n * vocab {
            return Err(Error::Shape(format!(
                "teacher log-probs: {} values for {n} tokens x {vocab}",
                teacher.len()
            )));
        }
        let eps = c.rms_eps;
        let (logits, mut acts) = self.forward_inner(r1, rot, toks, true)?;
        let fin = acts.pop().expect("final");
        // Loss and dL/dlogits = w (softmax(student) - teacher) / n.
        let mut dlog = vec![0f32; n * vocab];
        let mut loss = 0f64;
        for ((lr, tr), dr) in logits
            .chunks_exact(vocab)
            .zip(teacher.chunks_exact(vocab))
            .zip(dlog.chunks_exact_mut(vocab))
        {
            let m = lr.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let z: f64 = lr.iter().map(|&v| ((v - m) as f64).exp()).sum();
            let lz = m as f64 + z.ln();
            for ((&lv, &tv), d) in lr.iter().zip(tr).zip(dr.iter_mut()) {
                let ls = lv as f64 - lz;
                let pt = (tv as f64).exp();
                if pt > 0.0 {
                    loss += pt * (tv as f64 - ls);
                }
                *d = ((ls.exp() - pt) * w / n as f64) as f32;
            }
        }
        loss /= n as f64;
        // Head: logits = xn R1ᵀ Hᵀ.
        let dxr = mm_t(&dlog, &self.head_t, n, vocab, h)?;
        drop(dlog);
        add_atb(&mut g.r1, &dxr, &fin.a_hat, n, h, h)?;
        let dxn = mm_t(&dxr, &transpose(r1, h, h), n, h, h)?;
        let mut dh = vec![0f32; n * h];
        rms_norm_backward(&fin.h_in, &dxn, h, eps, &mut dh);
        for (li, (a, rl)) in acts.iter().zip(rot).enumerate().rev() {
            let fx = &self.fixed[li];
            let lw = &self.model.layers[li];
            let r2t = transpose(&r2[li], hd, hd);
            // MLP: h += down(H4 silu(g) u).
            let ds_hat = mm_t(&dh, &rl.wt[6], n, h, f)?;
            // dR1 (down, W' = R1ᵀ W_d H4): (ŝ (W_d H4)ᵀ)ᵀ dh.
            let sp = mm_t(&a.s_hat, &fx.down_h, n, f, h)?;
            add_atb(&mut g.r1, &sp, &dh, n, h, h)?;
            let mut ds = match &self.had_dense {
                Some(d) => mm_t(&ds_hat, d, n, f, f)?,
                None => {
                    let mut x = ds_hat;
                    self.had.apply_rows(&mut x)?;
                    x
                }
            };
            let mut dgate = vec![0f32; n * f];
            for ((dsv, dg), (&gv, &uv)) in ds
                .iter_mut()
                .zip(dgate.iter_mut())
                .zip(a.g.iter().zip(&a.u))
            {
                let sg = 1.0 / (1.0 + (-gv).exp());
                *dg = *dsv * uv * sg * (1.0 + gv * (1.0 - sg));
                *dsv *= gv * sg; // du
            }
            let du = ds;
            let mut dm = mm_t(&dgate, &rl.wt[4], n, f, h)?;
            add(&mut dm, &mm_t(&du, &rl.wt[5], n, f, h)?);
            // dR1 (gate/up, W' = W R1): (dg W_g + du W_u)ᵀ m̂.
            let mut pw = mm_t(&dgate, &fx.gt, n, f, h)?;
            add(&mut pw, &mm_t(&du, &fx.ut, n, f, h)?);
            add_atb(&mut g.r1, &pw, &a.m_hat, n, h, h)?;
            rms_norm_backward(&a.h_mid, &dm, h, eps, &mut dh);
            // Attention: h += o(att).
            let datt = mm_t(&dh, &rl.wt[3], n, h, qd)?;
            // o_proj, W' = R1ᵀ W_o B2: dR1 += (âtt B2ᵀ W_oᵀ)ᵀ dh; dR2 += Σ_b (dh R1ᵀ W_o)_bᵀ âtt_b.
            let mut ab = a.att_hat.clone();
            rotate_rows_blockwise(&mut ab, qd, &r2t, hd)?;
            let ap = mm_t(&ab, lw.o_proj.weight_f32(), n, qd, h)?;
            add_atb(&mut g.r1, &ap, &dh, n, h, h)?;
            let dhr = mm_t(&dh, r1, n, h, h)?;
            let dq_o = mm_t(&dhr, &fx.ot, n, h, qd)?;
            add_atb_blocks(&mut g.r2[li], &dq_o, &a.att_hat, n, hd)?;
            // Attention backward per head.
            let rep = nh / nkv;
            let scale = c.attn_scale();
            let per_head: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..nh)
                .into_par_iter()
                .map(|hh| {
                    let kh = hh / rep;
                    let p = &a.p[hh * n * n..(hh + 1) * n * n];
                    let mut dq = vec![0f32; n * hd];
                    let mut dk = vec![0f32; n * hd];
                    let mut dv = vec![0f32; n * hd];
                    let mut dp = vec![0f32; n];
                    for t in 0..n {
                        let dov = &datt[(t * nh + hh) * hd..][..hd];
                        let mut dot = 0f32;
                        for (s, dps) in dp.iter_mut().enumerate().take(t + 1) {
                            let vv = &a.v[(s * nkv + kh) * hd..][..hd];
                            *dps = dov.iter().zip(vv).map(|(x, y)| x * y).sum::<f32>();
                            dot += *dps * p[t * n + s];
                            let pts = p[t * n + s];
                            dv[s * hd..(s + 1) * hd]
                                .iter_mut()
                                .zip(dov)
                                .for_each(|(d, o)| *d += pts * o);
                        }
                        let qv = &a.q[(t * nh + hh) * hd..][..hd];
                        for (s, dps) in dp.iter().enumerate().take(t + 1) {
                            let ds = p[t * n + s] * (dps - dot) * scale;
                            let kv = &a.k[(s * nkv + kh) * hd..][..hd];
                            dq[t * hd..(t + 1) * hd]
                                .iter_mut()
                                .zip(kv)
                                .for_each(|(d, x)| *d += ds * x);
                            dk[s * hd..(s + 1) * hd]
                                .iter_mut()
                                .zip(qv)
                                .for_each(|(d, x)| *d += ds * x);
                        }
                    }
                    (dq, dk, dv)
                })
                .collect();
            let mut dq = vec![0f32; n * qd];
            let mut dk = vec![0f32; n * kvd];
            let mut dv = vec![0f32; n * kvd];
            for (hh, (q_, k_, v_)) in per_head.iter().enumerate() {
                let kh = hh / rep;
                for t in 0..n {
                    dq[(t * nh + hh) * hd..][..hd].copy_from_slice(&q_[t * hd..(t + 1) * hd]);
                    add(
                        &mut dk[(t * nkv + kh) * hd..][..hd],
                        &k_[t * hd..(t + 1) * hd],
                    );
                    add(
                        &mut dv[(t * nkv + kh) * hd..][..hd],
                        &v_[t * hd..(t + 1) * hd],
                    );
                }
            }
            rope_apply(&self.rope, &mut dq, n, nh, hd, true);
            rope_apply(&self.rope, &mut dk, n, nkv, hd, true);
            let mut da = mm_t(&dq, &rl.wt[0], n, qd, h)?;
            add(&mut da, &mm_t(&dk, &rl.wt[1], n, kvd, h)?);
            add(&mut da, &mm_t(&dv, &rl.wt[2], n, kvd, h)?);
            // v_proj, W' = B2ᵀ W_v R1: dR2 += Σ_b ((â R1ᵀ) W_vᵀ)_bᵀ dv_b.
            let ar = mm_t(&a.a_hat, r1, n, h, h)?;
            let vu = mm_t(&ar, lw.v_proj.weight_f32(), n, h, kvd)?;
            add_atb_blocks(&mut g.r2[li], &vu, &dv, n, hd)?;
            // q/k/v dR1: (dq W_q + dk W_k + (dv B2ᵀ) W_v)ᵀ â.
            let mut pw = mm_t(&dq, &fx.qt, n, qd, h)?;
            add(&mut pw, &mm_t(&dk, &fx.kt, n, kvd, h)?);
            let mut dvb = dv;
            rotate_rows_blockwise(&mut dvb, kvd, &r2t, hd)?;
            add(&mut pw, &mm_t(&dvb, &fx.vt, n, kvd, h)?);
            add_atb(&mut g.r1, &pw, &a.a_hat, n, h, h)?;
            rms_norm_backward(&a.h_in, &da, h, eps, &mut dh);
        }
        // Embedding: x0 = E_tok R1.
        let e = self.model.embed(toks)?;
        add_atb(&mut g.r1, &e, &dh, n, h, h)?;
        Ok(loss)
    }
}

/// Settings of the end-to-end optimisation ([`learn`]).
#[derive(Debug, Clone)]
pub struct E2eOptions {
    /// Cayley SGD iterations (R1 and every R2 step together).
    pub iters: usize,
    /// Initial step of R1 (`‖αΩ‖_F`, see [`cayley_step`]); decays linearly to 0.
    pub lr: f64,
    /// Initial step of each R2.
    pub lr_r2: f64,
    /// Tokens per training sequence (calibration windows are cut into sequences of this
    /// length, positions from 0).
    pub seqlen: usize,
    /// Sequences per iteration.
    pub batch: usize,
    /// Seed of the sequence order.
    pub seed: u64,
}

/// What [`learn`] did.
#[derive(Debug, Clone, Default)]
pub struct E2eReport {
    /// Mean training loss (KL, nats per position) of each iteration's batch, before its step.
    pub losses: Vec<f64>,
    /// Training sequences available.
    pub sequences: usize,
    /// Wall time in seconds (teacher included).
    pub seconds: f64,
    /// Wall time of the f32 teacher's log-probabilities.
    pub teacher_seconds: f64,
}

/// Learn R1 and per-layer R2 end to end from `(r1, r2)` on calibration windows `train` (cut
/// into sequences of [`E2eOptions::seqlen`]), the teacher being `model` itself (norms folded,
/// unrotated, f32). Returns the rotations and the report. Errors on shapes, no data, or a
/// rotation that drifted off the orthogonal group.
pub fn learn(
    model: &Model,
    train: &[Vec<u32>],
    r1: &[f32],
    r2: &[Vec<f32>],
    quant: E2eQuant,
    opts: &E2eOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<(Vec<f32>, Vec<Vec<f32>>, E2eReport)> {
    let t0 = Instant::now();
    let c = &model.config;
    let (h, hd) = (c.hidden_size, c.head_dim);
    if opts.seqlen < 2 || opts.batch == 0 {
        return Err(Error::Quantize(
            "end-to-end SpinQuant needs sequences of 2 tokens or more and a batch of 1 or more"
                .into(),
        ));
    }
    let seqs: Vec<&[u32]> = train
        .iter()
        .flat_map(|w| w.chunks_exact(opts.seqlen))
        .collect();
    if seqs.is_empty() {
        return Err(Error::Quantize(format!(
            "end-to-end SpinQuant: no calibration sequence of {} tokens",
            opts.seqlen
        )));
    }
    let net = E2eNet::new(model, quant)?;
    net.check(r1, r2)?;
    // Which sequences each step sees: a seeded shuffle, cycled.
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    let mut s = opts.seed ^ 0xE2E0_5EED;
    for i in (1..order.len()).rev() {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        order.swap(i, ((s >> 33) as usize) % (i + 1));
    }
    let need = (opts.iters * opts.batch).min(seqs.len());
    progress(&format!(
        "SpinQuant e2e: f32 teacher on {need} sequences of {} tokens",
        opts.seqlen
    ));
    let mut teacher: Vec<Option<Vec<f32>>> = vec![None; seqs.len()];
    for &i in order.iter().take(need) {
        teacher[i] = Some(window_log_probs(model, seqs[i])?);
    }
    let teacher_seconds = t0.elapsed().as_secs_f64();
    let (mut r1, mut r2) = (r1.to_vec(), r2.to_vec());
    let mut losses = Vec::with_capacity(opts.iters);
    for it in 0..opts.iters {
        let batch: Vec<(&[u32], &[f32])> = (0..opts.batch)
            .map(|b| {
                let i = order[(it * opts.batch + b) % need];
                (seqs[i], teacher[i].as_deref().expect("computed"))
            })
            .collect();
        let g = net.loss_and_grad(&r1, &r2, &batch)?;
        if !g.loss.is_finite() {
            return Err(Error::Quantize(format!(
                "end-to-end SpinQuant: loss {} at iteration {it}",
                g.loss
            )));
        }
        losses.push(g.loss);
        progress(&format!(
            "SpinQuant e2e: iteration {}/{} KL {:.4} ({:.0} s)",
            it + 1,
            opts.iters,
            g.loss,
            t0.elapsed().as_secs_f64()
        ));
        let decay = 1.0 - it as f64 / opts.iters as f64;
        cayley_step(&mut r1, &g.r1, h, opts.lr * decay)?;
        for (r, gr) in r2.iter_mut().zip(&g.r2) {
            cayley_step(r, gr, hd, opts.lr_r2 * decay)?;
        }
    }
    for (r, n) in std::iter::once((&mut r1, h)).chain(r2.iter_mut().map(|r| (r, hd))) {
        let e = lowbit_calibration::rotation::orthogonality_error(r, n)?;
        if e > 1e-4 {
            return Err(Error::Quantize(format!(
                "end-to-end SpinQuant: rotation of size {n} drifted off the orthogonal group \
                 (max |R Rᵀ - I| = {e:.2e})"
            )));
        }
    }
    Ok((
        r1,
        r2,
        E2eReport {
            losses,
            sequences: seqs.len(),
            seconds: t0.elapsed().as_secs_f64(),
            teacher_seconds,
        },
    ))
}

/// Fold `r1`, one R2 per layer and the online Hadamard into `model` (norms folded): the same
/// operations, in the same order, as [`super::apply_rotations`] with a shared R2.
pub fn apply_rotations_per_layer(
    model: &mut Model,
    r1: &[f32],
    r2: &[Vec<f32>],
) -> Result<Option<std::sync::Arc<Hadamard>>> {
    let c = model.config.clone();
    let hd = c.head_dim;
    if r2.len() != c.n_layers || r2.iter().any(|r| r.len() != hd * hd) {
        return Err(Error::Shape(format!(
            "one {hd} x {hd} R2 per layer ({}) expected",
            c.n_layers
        )));
    }
    let had = super::apply_rotations(model, r1, None, true)?;
    for (layer, r2) in model.layers.iter_mut().zip(r2) {
        super::apply_r2(layer, &c, r2)?;
    }
    Ok(had)
}

/// SpinQuant with the end-to-end loss as [`super::prepare`] runs it ([`super::SpinLoss::E2e`]):
/// the last [`super::SpinOptions::select_windows`] calibration windows are held out; R1 and
/// one R2 per layer are learned by [`learn`] on the others from the seed's randomized Hadamard
/// (QuaRot's rotation), weights RTN with the target scheme and clipping and activations
/// quantized in the loop; with held-out windows, the start and the learned rotations are scored
/// end to end ([`super::score_rotation`]) and the lower-KL one is kept (recorded in
/// `rep.spin_selection`). Only calibration windows are used.
pub(super) fn search(
    model: &Model,
    opts: &super::PrepareOptions,
    ws: &Scheme,
    act: &ActQuantizer,
    samples: &[Vec<u32>],
    rep: &mut super::RotateReport,
    progress: &mut dyn FnMut(&str),
) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
    let c = &model.config;
    let sel = opts.spin.select_windows;
    if samples.len() <= sel {
        return Err(Error::Quantize(format!(
            "end-to-end SpinQuant holds out {sel} calibration windows but there are only {}: \
             draw more (--calib-samples) or hold out fewer (--spin-select)",
            samples.len()
        )));
    }
    let (train, held) = samples.split_at(samples.len() - sel);
    let q = lowbit_calibration::quarot::quarot_rotations(c.hidden_size, c.head_dim, opts.seed)?;
    let r2 = vec![q.r2.clone(); c.n_layers];
    let eo = E2eOptions {
        iters: opts.spin.iters,
        lr: opts.spin.lr,
        lr_r2: opts.spin.lr,
        seqlen: opts.spin.seqlen,
        batch: opts.spin.batch,
        seed: opts.seed,
    };
    let quant = E2eQuant {
        weights: opts
            .spin
            .weights_in_loop
            .then_some((*ws, opts.weight_clipping)),
        act: Some(act.clone()),
    };
    let (r1l, r2l, erep) = learn(model, train, &q.r1, &r2, quant, &eo, progress)?;
    rep.spin_e2e = Some(erep);
    if held.is_empty() {
        return Ok((r1l, r2l));
    }
    let t0 = Instant::now();
    progress(&format!(
        "SpinQuant e2e: scoring the start and the learned rotations on {} held-out windows",
        held.len()
    ));
    let refs = super::reference_log_probs(model, held)?;
    let mut cands = Vec::new();
    for (name, r1, r2) in [
        ("quarot", &q.r1, std::slice::from_ref(&q.r2)),
        ("spinquant-e2e", &r1l, &r2l[..]),
    ] {
        cands.push(super::score_rotation(
            model,
            name,
            r1,
            r2,
            ws,
            opts.weight_clipping,
            act,
            held,
            &refs,
        )?);
    }
    let chosen = super::lowest_kl(&cands);
    rep.spin_selection = Some(super::SpinSelection {
        candidates: cands,
        chosen,
        windows: held.len(),
        seconds: t0.elapsed().as_secs_f64(),
    });
    Ok(if chosen == 0 {
        (q.r1, vec![q.r2])
    } else {
        (r1l, r2l)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::Logits;
    use crate::rotate::{
        dense_copy, fold_norms, install_hooks, parse_wa_scheme, parse_weight_clip,
        quantize_weights_rtn,
    };
    use crate::test_util::tiny_llama;
    use crate::weights::random_model;
    use lowbit_calibration::quarot::quarot_rotations;

    const TOKS: [u32; 14] = [3, 17, 42, 0, 299, 8, 8, 23, 111, 30, 5, 1, 250, 77];

    fn folded(seed: u64) -> Model {
        let mut m = random_model(tiny_llama(true, false), seed).unwrap();
        fold_norms(&mut m).unwrap();
        m
    }

    fn w4a4() -> E2eQuant {
        let s = parse_wa_scheme("w4a4-int", 0.9).unwrap();
        let (ws, act) = s.quant.unwrap();
        E2eQuant {
            weights: Some((ws, parse_weight_clip("mse").unwrap())),
            act: Some(act),
        }
    }

    fn rotations(m: &Model) -> (Vec<f32>, Vec<Vec<f32>>) {
        let c = &m.config;
        let q = quarot_rotations(c.hidden_size, c.head_dim, 3).unwrap();
        let r2b = quarot_rotations(c.hidden_size, c.head_dim, 4).unwrap().r2;
        (q.r1, vec![q.r2, r2b])
    }

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        let s = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
            / s
    }

    /// The model crate's own forward of the rotated (per-layer R2), quantized model.
    fn eval_logits(m: &Model, r1: &[f32], r2: &[Vec<f32>], q: &E2eQuant) -> Vec<f32> {
        let mut e = dense_copy(m).unwrap();
        let r4 = apply_rotations_per_layer(&mut e, r1, r2).unwrap();
        if let Some((s, clip)) = &q.weights {
            quantize_weights_rtn(&mut e, s, *clip).unwrap();
        }
        install_hooks(&mut e, q.act.as_ref(), r4);
        let mut cache = e.new_cache("f32").unwrap();
        e.forward(&TOKS, cache.as_mut(), Logits::All).unwrap()
    }

    #[test]
    fn forward_equals_the_rotated_quantized_model() {
        let m = folded(1);
        let (r1, r2) = rotations(&m);
        for q in [
            w4a4(),
            E2eQuant {
                weights: None,
                act: None,
            },
        ] {
            let want = eval_logits(&m, &r1, &r2, &q);
            let net = E2eNet::new(&m, q.clone()).unwrap();
            let got = net.forward(&r1, &r2, &TOKS).unwrap();
            let d = max_rel(&got, &want);
            assert!(
                d < 1e-4,
                "max rel diff {d} (quantized: {})",
                q.act.is_some()
            );
        }
        // The unquantized rotated model is the original one.
        let mut cache = m.new_cache("f32").unwrap();
        let orig = m.forward(&TOKS, cache.as_mut(), Logits::All).unwrap();
        let net = E2eNet::new(
            &m,
            E2eQuant {
                weights: None,
                act: None,
            },
        )
        .unwrap();
        assert!(max_rel(&net.forward(&r1, &r2, &TOKS).unwrap(), &orig) < 1e-4);
        // A shared R2 gives apply_rotations' model.
        let shared = vec![r2[0].clone(); 2];
        let mut e = dense_copy(&m).unwrap();
        let r4 = crate::rotate::apply_rotations(&mut e, &r1, Some(&r2[0]), true).unwrap();
        install_hooks(&mut e, None, r4);
        let mut cache = e.new_cache("f32").unwrap();
        let a = e.forward(&TOKS, cache.as_mut(), Logits::All).unwrap();
        let b = eval_logits(
            &m,
            &r1,
            &shared,
            &E2eQuant {
                weights: None,
                act: None,
            },
        );
        assert_eq!(a, b);
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    #[test]
    fn rotation_gradient_matches_finite_differences() {
        let m = folded(1);
        // A peaked synthetic teacher, so that the loss and its gradient are not zero.
        let vocab = m.config.vocab_size;
        let mut teacher: Vec<f32> = crate::test_util::lcg_values(TOKS.len() * vocab, 5)
            .iter()
            .map(|v| 4.0 * v)
            .collect();
        crate::rotate::log_softmax_rows(&mut teacher, vocab);
        let (r1, r2) = rotations(&m);
        let net = E2eNet::new(
            &m,
            E2eQuant {
                weights: None,
                act: None,
            },
        )
        .unwrap();
        let batch = [(&TOKS[..], &teacher[..])];
        let g = net.loss_and_grad(&r1, &r2, &batch).unwrap();
        assert!(g.loss > 0.01, "loss {}", g.loss);
        let loss = |a: &[f32], b: &[Vec<f32>]| net.loss_and_grad(a, b, &batch).unwrap().loss;
        let eps = 3e-3f32;
        for seed in [11u64, 12] {
            // R1 direction.
            let e1 = crate::test_util::lcg_values(r1.len(), seed);
            let plus: Vec<f32> = r1.iter().zip(&e1).map(|(a, b)| a + eps * b).collect();
            let minus: Vec<f32> = r1.iter().zip(&e1).map(|(a, b)| a - eps * b).collect();
            let fd = (loss(&plus, &r2) - loss(&minus, &r2)) / (2.0 * eps as f64);
            let an = dot(&g.r1, &e1);
            assert!(
                (fd - an).abs() < 3e-3 * an.abs().max(fd.abs()) + 1e-5,
                "R1: finite difference {fd} vs gradient {an}"
            );
            // R2 direction, layer 1 only.
            let e2 = crate::test_util::lcg_values(r2[1].len(), seed + 100);
            let mut p2 = r2.clone();
            let mut m2 = r2.clone();
            for ((p, mi), d) in p2[1].iter_mut().zip(m2[1].iter_mut()).zip(&e2) {
                *p += eps * d;
                *mi -= eps * d;
            }
            let fd = (loss(&r1, &p2) - loss(&r1, &m2)) / (2.0 * eps as f64);
            let an = dot(&g.r2[1], &e2);
            assert!(
                (fd - an).abs() < 3e-3 * an.abs().max(fd.abs()) + 1e-5,
                "R2: finite difference {fd} vs gradient {an}"
            );
        }
    }

    #[test]
    fn learning_keeps_rotations_orthogonal_and_rejects_bad_settings() {
        let m = folded(1);
        let (r1, r2) = rotations(&m);
        let train = vec![TOKS.to_vec(), TOKS.iter().rev().copied().collect()];
        let opts = E2eOptions {
            iters: 8,
            lr: 0.5,
            lr_r2: 0.5,
            seqlen: TOKS.len(),
            batch: 2,
            seed: 1,
        };
        let (a, b, rep) = learn(&m, &train, &r1, &r2, w4a4(), &opts, &mut |_| {}).unwrap();
        assert_eq!(rep.losses.len(), 8);
        assert_eq!(rep.sequences, 2);
        assert!(rep.losses.iter().all(|l| l.is_finite() && *l >= -1e-6));
        assert!(a != r1 && b[0] != r2[0] && b[1] != r2[1]);
        assert!(lowbit_calibration::rotation::orthogonality_error(&a, 64).unwrap() < 1e-4);
        for r in &b {
            assert!(lowbit_calibration::rotation::orthogonality_error(r, 16).unwrap() < 1e-4);
        }
        // Bad settings are errors, not panics.
        let bad = E2eOptions {
            seqlen: 1000,
            ..opts
        };
        assert!(learn(&m, &train, &r1, &r2, w4a4(), &bad, &mut |_| {}).is_err());
        assert!(E2eNet::new(&m, w4a4())
            .unwrap()
            .forward(&r1, &r2[..1], &TOKS)
            .is_err());
    }
}
