//! `cargo xtask`: lowbit's command line. Every subcommand lives in its own module with its own
//! `Args` (clap) and `run`; this file only dispatches.

mod bench;
mod check_logits;
mod demo;
mod eval;
mod export;
mod fetch;
mod generate;
mod golden;
mod model_opts;
mod needle;
mod quantize;
mod shared;
mod spin_args;

use clap::{Parser, Subcommand};

/// lowbit: quantize LLM checkpoints to low-bit formats, measure what was lost, run them fast.
#[derive(Parser)]
#[command(name = "cargo xtask", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Quantize the default model (SmolLM2-135M) with GPTQ INT4 g128 and compare it with the original.
    Demo(demo::Args),
    /// Download a model from the Hugging Face Hub into the standard HF cache.
    Fetch(fetch::Args),
    /// Quantize a model layer by layer (RTN, GPTQ, AWQ, SmoothQuant, HQQ) and write a checkpoint.
    Quantize(quantize::Args),
    /// Perplexity, and KL / top-1 / tail metrics against a reference model.
    Eval(eval::Args),
    /// Generate text from a prompt.
    Generate(generate::Args),
    /// Passkey retrieval ("needle in a haystack") accuracy per KV-cache policy.
    Needle(needle::Args),
    /// Convert a model to another checkpoint format (GGUF for llama.cpp, compressed-tensors for vLLM).
    Export(export::Args),
    /// Check every golden-vector file in a folder bit-exactly (schema: shared/golden/README.md).
    Golden(golden::Args),
    /// Compare the model's logits with the golden reference logits (transformers, f32).
    CheckLogits(check_logits::Args),
    /// Benchmarks: format conversion, kernels, model speed.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Demo(a) => demo::run(a),
        Cmd::Fetch(a) => fetch::run(a),
        Cmd::Quantize(a) => quantize::run(a),
        Cmd::Eval(a) => eval::run(a),
        Cmd::Generate(a) => generate::run(a),
        Cmd::Needle(a) => needle::run(a),
        Cmd::Export(a) => export::run(a),
        Cmd::Golden(a) => golden::run(a),
        Cmd::CheckLogits(a) => check_logits::run(a),
        Cmd::Bench(b) => bench::run(b),
    }
}
