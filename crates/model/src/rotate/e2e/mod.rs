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
use crate::llama::Model;
use lowbit_calibration::actquant::ActQuantizer;
use lowbit_calibration::hadamard::Hadamard;
use lowbit_calibration::spinquant::cayley_step;
use lowbit_numerics::Scheme;
use std::time::Instant;

mod net;
#[cfg(test)]
mod tests;

pub use net::{E2eGrad, E2eNet, E2eQuant};

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
