//! SpinQuant's command-line options, shared by `cargo xtask quantize` and `cargo xtask eval`
//! (flattened into both), and their translation into [`SpinOptions`].

use anyhow::{bail, Result};
use lowbit_model::rotate::{SpinLoss, SpinOptions};

/// `--spin-*`: how `--rotate spinquant` learns its rotations (docs/rotations.md).
#[derive(clap::Args, Debug, Clone)]
pub struct SpinArgs {
    /// SpinQuant loss: `e2e` (KL of the whole rotated, quantized network to f32, R1 and one R2
    /// per layer by Cayley SGD through a hand-written backward; --spin-iters steps of
    /// --spin-lr from the seed's randomized Hadamard, then start vs learned on the held-out
    /// windows; the default, measured in docs/benchmarks.md Session 7) or `layer` (per-layer
    /// output error of the quantized linears, with the multi-start search of --spin-starts).
    #[arg(long, default_value = "e2e")]
    pub spin_loss: String,
    /// Cayley SGD iterations (e2e: R1 and every R2 together, default 12; layer: R1, R2 gets
    /// half, default 40).
    #[arg(long)]
    pub spin_iters: Option<usize>,
    /// Initial Cayley step, decaying linearly to 0 (default 1.0 with e2e, 0.2 with layer).
    #[arg(long)]
    pub spin_lr: Option<f64>,
    /// e2e: tokens per training sequence (calibration windows are cut into these).
    #[arg(long, default_value_t = 128)]
    pub spin_seqlen: usize,
    /// e2e: sequences per Cayley step.
    #[arg(long, default_value_t = 2)]
    pub spin_batch: usize,
    /// Calibration windows drawn in addition to the training ones and held out of the
    /// optimisation; on them the starts and the learned rotations are compared end to end
    /// (KL of the RTN-quantized model to f32) and the best one is kept. 0 = keep the learned
    /// rotations unconditionally.
    #[arg(long, default_value_t = 6)]
    pub spin_select: usize,
    /// layer: randomized-Hadamard starts scored on the held-out windows (the seed's own =
    /// QuaRot's, plus N-1 drawn from the seed); the best is refined by Cayley SGD.
    #[arg(long, default_value_t = 3)]
    pub spin_starts: usize,
    /// layer: problems (layer sites) per iteration.
    #[arg(long, default_value_t = 8)]
    pub spin_problems: usize,
    /// layer: token rows per problem per iteration.
    #[arg(long, default_value_t = 64)]
    pub spin_tokens: usize,
    /// layer: weights inside the loss while learning, `rtn` (the target scheme) or `f32`
    /// (SpinQuant's W16 setting).
    #[arg(long, default_value = "rtn")]
    pub spin_weights: String,
}

impl Default for SpinArgs {
    fn default() -> Self {
        SpinArgs {
            spin_loss: "e2e".into(),
            spin_iters: None,
            spin_lr: None,
            spin_seqlen: 128,
            spin_batch: 2,
            spin_select: 6,
            spin_starts: 3,
            spin_problems: 8,
            spin_tokens: 64,
            spin_weights: "rtn".into(),
        }
    }
}

impl SpinArgs {
    /// The library options these flags ask for (per-loss defaults filled in).
    pub fn options(&self) -> Result<SpinOptions> {
        let loss = SpinLoss::parse(&self.spin_loss)?;
        let e2e = loss == SpinLoss::E2e;
        Ok(SpinOptions {
            iters: self.spin_iters.unwrap_or(if e2e { 12 } else { 40 }),
            lr: self.spin_lr.unwrap_or(if e2e { 1.0 } else { 0.2 }),
            problems_per_iter: self.spin_problems,
            tokens_per_iter: self.spin_tokens,
            weights_in_loop: match self.spin_weights.as_str() {
                "rtn" => true,
                "f32" => false,
                w => bail!("unknown --spin-weights `{w}` (rtn or f32)"),
            },
            select_windows: self.spin_select,
            starts: self.spin_starts,
            loss,
            seqlen: self.spin_seqlen,
            batch: self.spin_batch,
            ..SpinOptions::default()
        })
    }
}
