//! `cargo xtask golden DIR`: bit-exact checks against reference-library vectors.
//!
//! Every `*.json` file in DIR is dispatched on its `schema` field to one checker module under
//! `golden/`. Each checker returns a [`Report`]; the command prints one line per file and ends
//! with `N passed, M failed`, exiting non-zero on any failure. A file whose schema no checker
//! knows counts as failed (the runner must never pass a file silently).

mod bnb;
mod ct;
mod float_conv;
mod gguf_file;
mod gguf_quant;
mod mx_block;
mod tokenizer;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Arguments of `cargo xtask golden`.
#[derive(clap::Args)]
pub struct Args {
    /// Folder of golden JSON files (e.g. ../shared/golden/public).
    pub dir: PathBuf,
    /// Print every mismatch, not just the first few per file.
    #[arg(long)]
    pub verbose: bool,
}

/// Outcome of checking one golden file.
#[derive(Default)]
pub struct Report {
    /// Individual comparisons made (elements, blocks, fields).
    pub checked: usize,
    /// Human-readable mismatch descriptions (empty = pass).
    pub mismatches: Vec<String>,
    /// Extra information printed after the verdict (e.g. which policy was used).
    pub note: String,
}

impl Report {
    /// Record one comparison; `what` is only evaluated on mismatch.
    pub fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        self.checked += 1;
        if !ok {
            self.mismatches.push(what());
        }
    }
}

/// Read a JSON array of unsigned integers (bit patterns, codes).
pub fn u64s(v: &Value, key: &str) -> Result<Vec<u64>> {
    v.get(key)
        .and_then(Value::as_array)
        .with_context(|| format!("missing array `{key}`"))?
        .iter()
        .map(|x| {
            x.as_u64()
                .with_context(|| format!("`{key}` holds a non-integer: {x}"))
        })
        .collect()
}

/// Read a JSON array of f32 bit patterns as f32 values.
pub fn f32s(v: &Value, key: &str) -> Result<Vec<f32>> {
    Ok(u64s(v, key)?
        .into_iter()
        .map(|b| f32::from_bits(b as u32))
        .collect())
}

/// Decode a lowercase hex string.
pub fn hex(s: &str) -> Result<Vec<u8>> {
    if s.len() % 2 != 0 {
        bail!("odd-length hex string");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("bad hex digit"))
        .collect()
}

/// f32 equality for golden comparisons: identical bits, or both NaN.
pub fn same_f32(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn check_file(path: &Path) -> Result<Report> {
    let text = std::fs::read_to_string(path)?;
    let v: Value = serde_json::from_str(&text).context("not valid JSON")?;
    let schema = v
        .get("schema")
        .and_then(Value::as_str)
        .context("no `schema` field")?;
    match schema {
        "float_conv/v1" => float_conv::check(&v),
        "gguf_quant/v1" => gguf_quant::check(&v),
        "gguf_file/v1" => gguf_file::check(&v, path),
        "mx_block/v1" => mx_block::check(&v),
        "ct_nvfp4/v1" | "ct_mxfp4/v1" => ct::check(&v),
        "bnb_4bit/v1" => bnb::check(&v),
        other => bail!("unknown schema `{other}`"),
    }
}

/// Run every check found in the folder.
pub fn run(args: Args) -> Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(&args.dir)
        .with_context(|| format!("cannot read golden folder {}", args.dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    // Tokenizer vocabularies (llama.cpp test-tokenizer-0 layout): NAME.gguf + .inp + .out.
    files.extend(
        std::fs::read_dir(&args.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.to_string_lossy().ends_with(".gguf.inp")),
    );
    files.sort();
    if files.is_empty() {
        bail!(
            "no *.json golden files or *.gguf.inp tokenizer tests in {}",
            args.dir.display()
        );
    }
    let (mut passed, mut failed) = (0usize, 0usize);
    for f in &files {
        let name = f.file_name().unwrap_or_default().to_string_lossy();
        let result = if name.ends_with(".gguf.inp") {
            tokenizer::check(f)
        } else {
            check_file(f)
        };
        match result {
            Ok(r) if r.mismatches.is_empty() && r.checked > 0 => {
                passed += 1;
                println!("PASS {name}: {} checks{}", r.checked, fmt_note(&r.note));
            }
            Ok(r) => {
                failed += 1;
                println!(
                    "FAIL {name}: {} of {} checks differ{}",
                    r.mismatches.len(),
                    r.checked,
                    fmt_note(&r.note)
                );
                let show = if args.verbose { usize::MAX } else { 5 };
                for m in r.mismatches.iter().take(show) {
                    println!("     {m}");
                }
            }
            Err(e) => {
                failed += 1;
                println!("FAIL {name}: {e:#}");
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} golden file(s) failed");
    }
    Ok(())
}

fn fmt_note(n: &str) -> String {
    if n.is_empty() {
        String::new()
    } else {
        format!(" ({n})")
    }
}
