//! Byte-level BPE (GPT-2 style, `tokenizer.ggml.model = "gpt2"`): regex pre-tokenization chosen
//! by `tokenizer.ggml.pre`, bytes mapped to printable characters, then merges by rank.

use super::Vocab;
use crate::{Error, Result};
use std::collections::HashMap;

/// GPT-2's pre-tokenizer pattern (llama.cpp keeps unmatched spans, so no trailing `\s+`).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's pattern (digits in groups of up to three).
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pattern (single digits).
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer regex chain for a `tokenizer.ggml.pre` name: each pattern splits the
/// pieces left by the previous one (unmatched spans are kept as pieces). Returns the chain and
/// whether whole words found in the vocabulary skip the merges (Llama 3's `ignore_merges`).
pub(crate) fn pre_patterns(pre: &str) -> Result<(Vec<&'static str>, bool)> {
    Ok(match pre {
        "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "jina-v2-es" | "jina-v2-de" | "roberta-bpe" => {
            (vec![GPT2], false)
        }
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            (vec![r"\p{N}", GPT2], false)
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "smaug-bpe" => (vec![LLAMA3], true),
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "megrez" => (vec![QWEN2], false),
        "default" | "" => (vec![r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"], false),
        other => {
            return Err(Error::Tokenizer(format!(
                "unsupported BPE pre-tokenizer `{other}` (tokenizer.ggml.pre); supported: gpt-2, smollm, \
                 starcoder, llama-bpe/llama3, qwen2, default"
            )))
        }
    })
}

/// GPT-2's reversible byte -> char map (printable bytes map to themselves, the rest to U+0100..).
fn byte_to_char_table() -> [char; 256] {
    let mut t = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable =
            (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        t[b as usize] = if printable {
            b as char
        } else {
            n += 1;
            char::from_u32(255 + n).expect("valid")
        };
    }
    t
}

/// A byte-level BPE model.
pub(crate) struct Bpe {
    regexes: Vec<fancy_regex::Regex>,
    ignore_merges: bool,
    byte_char: [char; 256],
    char_byte: HashMap<char, u8>,
    /// Token id of each byte's single-character token (None if missing from the vocabulary).
    byte_token: [Option<u32>; 256],
    /// (left id, right id) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
}

impl Bpe {
    pub(crate) fn new(vocab: &Vocab, merges: &[String], pre: &str) -> Result<Self> {
        let (pats, ignore_merges) = pre_patterns(pre)?;
        let regexes = pats
            .iter()
            .map(|p| {
                fancy_regex::Regex::new(p).map_err(|e| Error::Tokenizer(format!("regex {p}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let byte_char = byte_to_char_table();
        let char_byte = byte_char
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let mut byte_token = [None; 256];
        for (b, c) in byte_char.iter().enumerate() {
            byte_token[b] = vocab.id(&c.to_string());
        }
        let mut map = HashMap::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            // Split at the first space after the first character (a token may be a lone space).
            let first = m.chars().next().map_or(0, char::len_utf8);
            let Some(sp) = m[first..].find(' ').map(|i| i + first) else {
                return Err(Error::Tokenizer(format!(
                    "merge #{rank} `{m}` has no space"
                )));
            };
            let (a, b) = (&m[..sp], &m[sp + 1..]);
            let merged = format!("{a}{b}");
            if let (Some(ia), Some(ib), Some(im)) = (vocab.id(a), vocab.id(b), vocab.id(&merged)) {
                map.entry((ia, ib)).or_insert((rank as u32, im));
            }
        }
        Ok(Bpe {
            regexes,
            ignore_merges,
            byte_char,
            char_byte,
            byte_token,
            merges: map,
        })
    }

    /// Split text into pre-tokenizer words (borrowed slices of `text`).
    fn split<'t>(&self, text: &'t str) -> Result<Vec<&'t str>> {
        let mut pieces = vec![text];
        for re in &self.regexes {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for p in pieces {
                let mut last = 0;
                for m in re.find_iter(p) {
                    let m = m.map_err(|e| {
                        Error::Tokenizer(format!("pre-tokenizer regex failed: {e}"))
                    })?;
                    if m.start() > last {
                        next.push(&p[last..m.start()]);
                    }
                    if m.end() > m.start() {
                        next.push(m.as_str());
                    }
                    last = m.end();
                }
                if last < p.len() {
                    next.push(&p[last..]);
                }
            }
            pieces = next;
        }
        Ok(pieces)
    }

    /// Encode plain text (no special tokens), caching the ids of repeated words.
    pub(crate) fn encode(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut cache: HashMap<&str, Vec<u32>> = HashMap::new();
        for w in self.split(text)? {
            if let Some(ids) = cache.get(w) {
                out.extend_from_slice(ids);
                continue;
            }
            let ids = self.encode_word(vocab, w);
            out.extend_from_slice(&ids);
            cache.insert(w, ids);
        }
        Ok(())
    }

    fn encode_word(&self, vocab: &Vocab, word: &str) -> Vec<u32> {
        let mapped: String = word.bytes().map(|b| self.byte_char[b as usize]).collect();
        if self.ignore_merges {
            if let Some(id) = vocab.id(&mapped) {
                return vec![id];
            }
        }
        // Symbols as token ids; a byte without a token is dropped (as llama.cpp does).
        let mut syms: Vec<u32> = word
            .bytes()
            .filter_map(|b| self.byte_token[b as usize])
            .collect();
        loop {
            let mut best: Option<(u32, usize, u32)> = None;
            for i in 0..syms.len().saturating_sub(1) {
                if let Some(&(rank, id)) = self.merges.get(&(syms[i], syms[i + 1])) {
                    if best.is_none_or(|(r, _, _)| rank < r) {
                        best = Some((rank, i, id));
                    }
                }
            }
            let Some((rank, _, _)) = best else { break };
            // Apply every occurrence of this merge, left to right (same result as one at a time).
            let mut i = 0;
            let mut merged = Vec::with_capacity(syms.len());
            while i < syms.len() {
                if i + 1 < syms.len() {
                    if let Some(&(r, id)) = self.merges.get(&(syms[i], syms[i + 1])) {
                        if r == rank {
                            merged.push(id);
                            i += 2;
                            continue;
                        }
                    }
                }
                merged.push(syms[i]);
                i += 1;
            }
            syms = merged;
        }
        syms
    }

    /// Bytes of one normal token's text (byte-level characters mapped back).
    pub(crate) fn token_bytes(&self, text: &str, out: &mut Vec<u8>) {
        for c in text.chars() {
            match self.char_byte.get(&c) {
                Some(&b) => out.push(b),
                None => {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
    }
}
