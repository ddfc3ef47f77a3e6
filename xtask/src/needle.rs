//! `cargo xtask needle`.

use anyhow::{bail, Result};

/// Arguments of `cargo xtask needle`.
#[derive(clap::Args)]
pub struct Args {
    /// Emit machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

/// Run the command.
pub fn run(_args: Args) -> Result<()> {
    bail!("needle: not implemented yet")
}
