//! `cargo xtask quantize`.

use anyhow::{bail, Result};

/// Arguments of `cargo xtask quantize`.
#[derive(clap::Args)]
pub struct Args {
    /// Emit machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

/// Run the command.
pub fn run(_args: Args) -> Result<()> {
    bail!("quantize: not implemented yet")
}
