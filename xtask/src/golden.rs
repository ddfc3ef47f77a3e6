//! `cargo xtask golden DIR`: bit-exact checks against reference-library vectors.

use anyhow::{bail, Result};
use std::path::PathBuf;

/// Arguments of `cargo xtask golden`.
#[derive(clap::Args)]
pub struct Args {
    /// Folder of golden JSON files (e.g. ../shared/golden/public).
    pub dir: PathBuf,
}

/// Run every check found in the folder.
pub fn run(args: Args) -> Result<()> {
    bail!("golden: not implemented yet ({})", args.dir.display())
}
