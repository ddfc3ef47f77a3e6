//! `cargo xtask export`.

use anyhow::{bail, Result};

/// Arguments of `cargo xtask export`.
#[derive(clap::Args)]
pub struct Args {
    /// Emit machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

/// Run the command.
pub fn run(_args: Args) -> Result<()> {
    bail!("export: not implemented yet")
}
