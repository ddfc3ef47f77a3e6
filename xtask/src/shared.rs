//! Locating `../shared` (models, data, golden vectors): from an explicit path, else the
//! `LOWBIT_SHARED` environment variable, else `../shared` beside the workspace root.

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// The workspace root (the folder holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

/// Find the shared folder, or fail loudly saying how to provide it.
pub fn shared_dir() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("LOWBIT_SHARED") {
        let p = PathBuf::from(p);
        if !p.is_dir() {
            bail!("LOWBIT_SHARED={} is not a directory", p.display());
        }
        return Ok(p);
    }
    let p = workspace_root().join("..").join("shared");
    if p.is_dir() {
        return Ok(p);
    }
    bail!(
        "the shared data folder was not found: set LOWBIT_SHARED=/path/to/shared \
         (it holds models/, data/ and golden/) or place it beside the workspace as ../shared"
    )
}
