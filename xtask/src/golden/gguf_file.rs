//! Checker for `gguf_file/v1`: parse the GGUF file named beside the JSON and compare.

use super::Report;
use anyhow::{bail, Result};
use serde_json::Value;
use std::path::Path;

/// Check one file of this schema.
pub fn check(_v: &Value, _json_path: &Path) -> Result<Report> {
    bail!("checker not implemented yet")
}
