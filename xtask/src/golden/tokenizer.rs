//! Tokenizer checks against llama.cpp's `test-tokenizer-0` files: for a vocabulary-only
//! `NAME.gguf`, `NAME.gguf.inp` holds texts separated by `\n__ggml_vocab_test__\n` and
//! `NAME.gguf.out` one line of space-separated token ids per text (no BOS, specials not parsed).

use super::Report;
use anyhow::{bail, Context, Result};
use lowbit_model::gguf::GgufFile;
use lowbit_model::tokenizer::Tokenizer;
use std::path::Path;

const SEP: &str = "\n__ggml_vocab_test__\n";

/// Check one `*.gguf.inp` file against its `.out` using the vocabulary beside it.
pub fn check(inp_path: &Path) -> Result<Report> {
    let gguf_path = inp_path.with_extension(""); // strip ".inp"
    let f = GgufFile::open(&gguf_path)
        .with_context(|| format!("opening vocabulary {}", gguf_path.display()))?;
    let tok = Tokenizer::from_gguf(&f)
        .with_context(|| format!("building the tokenizer of {}", gguf_path.display()))?;
    let inp = std::fs::read_to_string(inp_path)
        .with_context(|| format!("reading {}", inp_path.display()))?;
    let out_path = gguf_path.with_extension("gguf.out");
    let out = std::fs::read_to_string(&out_path)
        .with_context(|| format!("reading {}", out_path.display()))?;
    let mut texts: Vec<&str> = inp.split(SEP).collect();
    if texts.last() == Some(&"") {
        texts.pop();
    }
    let expected: Vec<&str> = out.split('\n').collect();
    if expected.len() < texts.len() {
        bail!(
            "{} has {} lines for {} texts",
            out_path.display(),
            expected.len(),
            texts.len()
        );
    }
    let mut r = Report::default();
    let mut roundtrip = 0usize;
    for (text, line) in texts.iter().zip(&expected) {
        let want: Vec<u32> = line
            .split_whitespace()
            .map(|t| {
                t.parse()
                    .with_context(|| format!("bad id `{t}` in {}", out_path.display()))
            })
            .collect::<Result<_>>()?;
        let got = tok.encode_with(text, false)?;
        r.check(got == want, || {
            format!("{text:?}: expected {want:?}, got {got:?}")
        });
        if tok.decode(&got).is_ok_and(|d| d == *text) {
            roundtrip += 1;
        }
    }
    r.note = format!("{} texts, {roundtrip} decode back exactly", texts.len());
    Ok(r)
}
