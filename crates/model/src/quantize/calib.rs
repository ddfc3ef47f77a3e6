//! Calibration data: `N` windows of `L` tokens drawn with a seeded RNG from the token streams
//! of one or more text files, and the guard that refuses calibrating on the evaluation text.

use super::sha256::sha256_hex;
use crate::error::{Error, Result};
use lowbit_numerics::rounding::SplitMix64;
use std::path::{Path, PathBuf};

/// How calibration windows are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CalibConfig {
    /// Number of windows (default 128).
    pub samples: usize,
    /// Tokens per window (default 512).
    pub seqlen: usize,
    /// RNG seed (default 0).
    pub seed: u64,
}

impl Default for CalibConfig {
    fn default() -> Self {
        Self {
            samples: 128,
            seqlen: 512,
            seed: 0,
        }
    }
}

/// Draw `cfg.samples` windows of `cfg.seqlen` consecutive tokens from `tokens` (the
/// concatenated token streams of the calibration files). Start positions are uniform over the
/// stream with a SplitMix64 generator seeded by `cfg.seed`, sorted, so the set of windows
/// depends only on the seed and the text.
///
/// Errors: zero samples or length, and fewer than `samples x seqlen` tokens (the stream must be
/// able to hold every window without overlap, so small texts are not silently over-sampled).
pub fn sample_windows(tokens: &[u32], cfg: &CalibConfig) -> Result<Vec<Vec<u32>>> {
    if cfg.samples == 0 || cfg.seqlen == 0 {
        return Err(Error::Quantize(
            "--samples and --seqlen must be positive".into(),
        ));
    }
    let need = cfg.samples * cfg.seqlen;
    if tokens.len() < need {
        return Err(Error::Quantize(format!(
            "calibration text has {} tokens, fewer than --samples {} x --seqlen {} = {need}; \
             add more --calib files or lower --samples/--seqlen",
            tokens.len(),
            cfg.samples,
            cfg.seqlen
        )));
    }
    let mut rng = SplitMix64(cfg.seed ^ 0x6C6F_7762_6974_0001);
    let span = (tokens.len() - cfg.seqlen + 1) as u64;
    let mut starts: Vec<usize> = (0..cfg.samples).map(|_| rng.below(span) as usize).collect();
    starts.sort_unstable();
    Ok(starts
        .into_iter()
        .map(|s| tokens[s..s + cfg.seqlen].to_vec())
        .collect())
}

/// One calibration source as recorded in the report.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibSource {
    /// The path as given.
    pub path: PathBuf,
    /// SHA-256 of the file's bytes.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: usize,
}

/// Read the calibration files (UTF-8, CRLF -> LF), refusing any that is the evaluation text
/// (same canonical path or same SHA-256). Returns each file's text and its report entry.
pub fn read_calibration_files(
    files: &[PathBuf],
    eval: Option<&Path>,
) -> Result<Vec<(String, CalibSource)>> {
    if files.is_empty() {
        return Err(Error::Quantize(
            "no calibration text: pass one or more --calib FILE (never the evaluation text)".into(),
        ));
    }
    let eval_info = match eval {
        Some(e) => {
            let bytes = std::fs::read(e).map_err(|err| Error::io(e, err))?;
            Some((std::fs::canonicalize(e).ok(), sha256_hex(&bytes)))
        }
        None => None,
    };
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let bytes = std::fs::read(f).map_err(|e| Error::io(f, e))?;
        let sha = sha256_hex(&bytes);
        if let Some((canon, esha)) = &eval_info {
            let same_path = canon.is_some() && std::fs::canonicalize(f).ok() == *canon;
            if same_path || &sha == esha {
                return Err(Error::Quantize(format!(
                    "refusing to calibrate on {}: it is the evaluation text (same {}); \
                     calibrating on the text you evaluate on makes the numbers meaningless",
                    f.display(),
                    if same_path { "file" } else { "sha256" }
                )));
            }
        }
        let text = String::from_utf8(bytes.clone())
            .map_err(|_| Error::Quantize(format!("{}: not valid UTF-8 text", f.display())))?;
        let text = text.replace("\r\n", "\n");
        if text.trim().is_empty() {
            return Err(Error::Quantize(format!(
                "{}: calibration file is empty",
                f.display()
            )));
        }
        out.push((
            text,
            CalibSource {
                path: f.clone(),
                sha256: sha,
                bytes: bytes.len(),
            },
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_seeded_and_in_range() {
        let toks: Vec<u32> = (0..10_000).collect();
        let cfg = CalibConfig {
            samples: 8,
            seqlen: 100,
            seed: 7,
        };
        let a = sample_windows(&toks, &cfg).unwrap();
        let b = sample_windows(&toks, &cfg).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 8);
        for w in &a {
            assert_eq!(w.len(), 100);
            // consecutive tokens of the stream
            assert!(w.windows(2).all(|p| p[1] == p[0] + 1));
        }
        let c = sample_windows(&toks, &CalibConfig { seed: 8, ..cfg }).unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn too_few_tokens_is_an_error() {
        let toks: Vec<u32> = (0..999).collect();
        let e = sample_windows(
            &toks,
            &CalibConfig {
                samples: 10,
                seqlen: 100,
                seed: 0,
            },
        );
        assert!(matches!(e, Err(Error::Quantize(m)) if m.contains("999 tokens")));
    }

    #[test]
    fn refuses_eval_text() {
        let d = std::env::temp_dir().join(format!("lowbit-calib-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let eval = d.join("eval.txt");
        let copy = d.join("copy.txt");
        let other = d.join("other.txt");
        std::fs::write(&eval, "the evaluation text\r\n").unwrap();
        std::fs::write(&copy, "the evaluation text\r\n").unwrap();
        std::fs::write(&other, "something else\r\n").unwrap();
        assert!(read_calibration_files(std::slice::from_ref(&eval), Some(&eval)).is_err());
        assert!(read_calibration_files(std::slice::from_ref(&copy), Some(&eval)).is_err());
        let ok = read_calibration_files(std::slice::from_ref(&other), Some(&eval)).unwrap();
        assert_eq!(ok[0].0, "something else\n");
        assert_eq!(ok[0].1.sha256.len(), 64);
        assert!(read_calibration_files(&[], None).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
