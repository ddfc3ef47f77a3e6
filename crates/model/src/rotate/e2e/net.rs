//! The differentiable network of [`super`]: [`E2eNet`], its forward with the fake-quantizers
//! and its hand-written backward to `R1` and every layer's `R2`.

use crate::error::{Error, Result};
use crate::llama::{rms_norm, silu, Model};
use crate::rope::Rope;
use lowbit_calibration::actquant::ActQuantizer;
use lowbit_calibration::hadamard::Hadamard;
use lowbit_calibration::rotation::{
    rotate_output_side, rotate_rows, rotate_rows_blockwise, transpose,
};
use lowbit_calibration::{rtn_dequantized, Clipping, RtnConfig};
use lowbit_kernels::dense::matmul_wt;
use lowbit_numerics::Scheme;
use rayon::prelude::*;

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
        if !super::super::norms_foldable(c.arch) || model.lm_head.is_none() {
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

    pub(super) fn check(&self, r1: &[f32], r2: &[Vec<f32>]) -> Result<()> {
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

    /// Layer `li`'s weights rotated exactly as [`super::super::apply_rotations`] does (R1, then R2,
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
