//! Tokenizers: the one embedded in GGUF metadata (byte-level BPE `gpt2` with the pre-tokenizer
//! named by `tokenizer.ggml.pre`, or SentencePiece-style `llama` BPE over scores with byte
//! fallback), or a Hugging Face `tokenizer.json` through the `tokenizers` crate.
//!
//! [`Tokenizer::encode`] never adds BOS/EOS; callers that want the model's BOS check
//! [`Tokenizer::add_bos`] and prepend [`Tokenizer::bos_id`].

mod bpe;
mod spm;

use crate::gguf::{GgufFile, GgufValue};
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

/// GGUF token types (`tokenizer.ggml.token_type`).
pub mod token_type {
    /// An ordinary token.
    pub const NORMAL: i32 = 1;
    /// The unknown token.
    pub const UNKNOWN: i32 = 2;
    /// A control token (BOS, EOS, chat markers).
    pub const CONTROL: i32 = 3;
    /// A user-defined token (always matched literally in text).
    pub const USER_DEFINED: i32 = 4;
    /// An unused slot.
    pub const UNUSED: i32 = 5;
    /// A `<0xXX>` byte-fallback token.
    pub const BYTE: i32 = 6;
}

/// Token strings, ids, scores and types.
pub(crate) struct Vocab {
    tokens: Vec<String>,
    ids: HashMap<String, u32>,
    scores: Vec<f32>,
    types: Vec<i32>,
    unk: Option<u32>,
    /// Special tokens to split out of text: (text, id, only when parsing specials).
    specials: Vec<(String, u32, bool)>,
    /// Indices into `specials` by first byte, longest first (Gemma-3 has 6 414 specials: a
    /// linear scan at every byte of a long text is too slow).
    by_first: Vec<Vec<u32>>,
}

impl Vocab {
    fn new(tokens: Vec<String>, scores: Vec<f32>, types: Vec<i32>, unk: Option<u32>) -> Self {
        let mut ids = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            ids.entry(t.clone()).or_insert(i as u32);
        }
        let mut specials: Vec<(String, u32, bool)> = types
            .iter()
            .enumerate()
            .filter(|(i, t)| {
                (**t == token_type::CONTROL || **t == token_type::USER_DEFINED)
                    && !tokens[*i].is_empty()
            })
            .map(|(i, t)| (tokens[i].clone(), i as u32, *t == token_type::CONTROL))
            .collect();
        // Longest first, so that a special token that contains another wins.
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let mut by_first = vec![Vec::new(); 256];
        for (i, (s, _, _)) in specials.iter().enumerate() {
            by_first[s.as_bytes()[0] as usize].push(i as u32);
        }
        Vocab {
            tokens,
            ids,
            scores,
            types,
            unk,
            specials,
            by_first,
        }
    }

    pub(crate) fn id(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }

    /// Split text into plain fragments and special-token ids.
    fn partition<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        let mut out = Vec::new();
        let mut plain_start = 0;
        let mut i = 0;
        let bytes = text.as_bytes();
        while i < text.len() {
            let found = if text.is_char_boundary(i) {
                self.by_first[bytes[i] as usize]
                    .iter()
                    .map(|&k| &self.specials[k as usize])
                    .find(|(s, _, ctrl)| {
                        (parse_special || !ctrl) && bytes[i..].starts_with(s.as_bytes())
                    })
            } else {
                None
            };
            match found {
                Some((s, id, _)) => {
                    if plain_start < i {
                        out.push(Fragment::Text(&text[plain_start..i]));
                    }
                    out.push(Fragment::Special(*id));
                    i += s.len();
                    plain_start = i;
                }
                None => i += 1,
            }
        }
        if plain_start < text.len() {
            out.push(Fragment::Text(&text[plain_start..]));
        }
        out
    }
}

enum Fragment<'t> {
    Text(&'t str),
    Special(u32),
}

enum Model {
    Bpe(Box<bpe::Bpe>),
    Spm(Box<spm::Spm>),
}

enum Inner {
    Gguf { vocab: Box<Vocab>, model: Model },
    Hf(Box<tokenizers::Tokenizer>),
}

/// A tokenizer built from GGUF metadata or a Hugging Face `tokenizer.json`.
pub struct Tokenizer {
    inner: Inner,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.inner {
            Inner::Gguf {
                model: Model::Bpe(_),
                ..
            } => "gguf-bpe",
            Inner::Gguf {
                model: Model::Spm(_),
                ..
            } => "gguf-spm",
            Inner::Hf(_) => "hf",
        };
        f.debug_struct("Tokenizer")
            .field("kind", &kind)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

fn meta_err(key: &str, what: impl Into<String>) -> Error {
    Error::Metadata {
        key: key.to_string(),
        what: what.into(),
    }
}

fn string_array(f: &GgufFile, key: &str) -> Result<Vec<String>> {
    let a = f
        .get(key)
        .and_then(GgufValue::as_array)
        .ok_or_else(|| meta_err(key, "missing or not an array"))?;
    a.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| meta_err(key, format!("element {i} is not a string")))
        })
        .collect()
}

impl Tokenizer {
    /// Build the tokenizer embedded in a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let model_name = f.get_str("tokenizer.ggml.model")?;
        let tokens = string_array(f, "tokenizer.ggml.tokens")?;
        let n = tokens.len();
        if n == 0 {
            return Err(meta_err("tokenizer.ggml.tokens", "empty vocabulary"));
        }
        let scores = match f.get("tokenizer.ggml.scores").and_then(GgufValue::as_array) {
            Some(a) if a.len() == n => a.iter().map(|v| v.as_f32().unwrap_or(0.0)).collect(),
            Some(a) => {
                return Err(meta_err(
                    "tokenizer.ggml.scores",
                    format!("{} scores for {n} tokens", a.len()),
                ));
            }
            None => vec![0.0; n],
        };
        let types = match f
            .get("tokenizer.ggml.token_type")
            .and_then(GgufValue::as_array)
        {
            Some(a) if a.len() == n => a.iter().map(|v| v.as_i64().unwrap_or(1) as i32).collect(),
            Some(a) => {
                return Err(meta_err(
                    "tokenizer.ggml.token_type",
                    format!("{} types for {n} tokens", a.len()),
                ));
            }
            None => vec![token_type::NORMAL; n],
        };
        let id_key = |k: &str| -> Result<Option<u32>> {
            match f.get(k) {
                None => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(id) if (id as usize) < n => Ok(Some(id as u32)),
                    _ => Err(meta_err(k, format!("{v:?} is not a token id below {n}"))),
                },
            }
        };
        let bos = id_key("tokenizer.ggml.bos_token_id")?;
        let eos = id_key("tokenizer.ggml.eos_token_id")?;
        let unk = id_key("tokenizer.ggml.unknown_token_id")?;
        let flag = |k: &str, d: bool| f.get(k).and_then(GgufValue::as_bool).unwrap_or(d);
        let vocab = Vocab::new(tokens, scores, types, unk);
        let (model, add_bos_default) = match model_name {
            "gpt2" => {
                let merges = string_array(f, "tokenizer.ggml.merges")?;
                let pre = f
                    .get("tokenizer.ggml.pre")
                    .and_then(GgufValue::as_str)
                    .unwrap_or("default");
                (
                    Model::Bpe(Box::new(bpe::Bpe::new(&vocab, &merges, pre)?)),
                    false,
                )
            }
            "llama" => (
                Model::Spm(Box::new(spm::Spm::new(
                    &vocab,
                    flag("tokenizer.ggml.add_space_prefix", true),
                ))),
                true,
            ),
            other => {
                return Err(meta_err(
                    "tokenizer.ggml.model",
                    format!("unsupported tokenizer model `{other}` (supported: gpt2, llama)"),
                ))
            }
        };
        Ok(Tokenizer {
            inner: Inner::Gguf {
                vocab: Box::new(vocab),
                model,
            },
            bos,
            eos,
            add_bos: flag("tokenizer.ggml.add_bos_token", add_bos_default),
            chat_template: f
                .get("tokenizer.chat_template")
                .and_then(GgufValue::as_str)
                .map(str::to_string),
        })
    }

    /// Load a Hugging Face `tokenizer.json`; BOS/EOS and the chat template come from a
    /// `tokenizer_config.json` beside it when present.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let tok = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let mut t = Tokenizer {
            inner: Inner::Hf(Box::new(tok)),
            bos: None,
            eos: None,
            add_bos: false,
            chat_template: None,
        };
        let cfg_path = path.with_file_name("tokenizer_config.json");
        if let Ok(text) = std::fs::read_to_string(&cfg_path) {
            let cfg: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", cfg_path.display())))?;
            let tok_id = |k: &str| -> Option<u32> {
                let v = cfg.get(k)?;
                let s = v
                    .as_str()
                    .or_else(|| v.get("content").and_then(|c| c.as_str()))?;
                t.token_to_id(s)
            };
            let (bos, eos) = (tok_id("bos_token"), tok_id("eos_token"));
            t.bos = bos;
            t.eos = eos;
            t.add_bos = cfg
                .get("add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            t.chat_template = cfg
                .get("chat_template")
                .and_then(|v| v.as_str())
                .map(str::to_string);
        }
        Ok(t)
    }

    /// Encode text to token ids, matching special tokens (e.g. `<|im_start|>`) written in the
    /// text. Never adds BOS/EOS.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// Encode text; with `parse_special = false` control tokens written in the text are
    /// tokenized as ordinary text (user-defined tokens are always matched, as llama.cpp does).
    pub fn encode_with(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        match &self.inner {
            Inner::Hf(t) => {
                if !parse_special {
                    return Err(Error::Tokenizer(
                        "parse_special = false is not supported for tokenizer.json".into(),
                    ));
                }
                let enc = t
                    .encode(text, false)
                    .map_err(|e| Error::Tokenizer(e.to_string()))?;
                Ok(enc.get_ids().to_vec())
            }
            Inner::Gguf { vocab, model } => {
                let mut out = Vec::with_capacity(text.len() / 3);
                let mut prev_special = true;
                for frag in vocab.partition(text, parse_special) {
                    match frag {
                        Fragment::Special(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                        Fragment::Text(s) => {
                            match model {
                                Model::Bpe(b) => b.encode(vocab, s, &mut out)?,
                                Model::Spm(m) => {
                                    let mut t = String::with_capacity(s.len() + 3);
                                    if m.add_space_prefix && prev_special {
                                        t.push(spm::SPACE);
                                    }
                                    t.extend(
                                        s.chars().map(|c| if c == ' ' { spm::SPACE } else { c }),
                                    );
                                    m.encode(vocab, &t, &mut out);
                                }
                            }
                            prev_special = false;
                        }
                    }
                }
                Ok(out)
            }
        }
    }

    /// Decode token ids to text (special tokens rendered as their text; invalid UTF-8
    /// sequences replaced by U+FFFD). Ids outside the vocabulary are an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.inner {
            Inner::Hf(t) => t
                .decode(ids, false)
                .map_err(|e| Error::Tokenizer(e.to_string())),
            Inner::Gguf { vocab, model } => {
                let mut bytes = Vec::new();
                for &id in ids {
                    let text = vocab.tokens.get(id as usize).ok_or_else(|| {
                        Error::Tokenizer(format!(
                            "token id {id} is outside the vocabulary of {}",
                            vocab.tokens.len()
                        ))
                    })?;
                    let ty = vocab.types[id as usize];
                    match model {
                        _ if ty == token_type::CONTROL || ty == token_type::USER_DEFINED => {
                            bytes.extend_from_slice(text.as_bytes())
                        }
                        Model::Bpe(b) => b.token_bytes(text, &mut bytes),
                        Model::Spm(_) => {
                            match spm::Spm::byte_of(text).filter(|_| ty == token_type::BYTE) {
                                Some(b) => bytes.push(b),
                                None => bytes.extend(text.replace(spm::SPACE, " ").bytes()),
                            }
                        }
                    }
                }
                let mut s = String::from_utf8_lossy(&bytes).into_owned();
                if let Model::Spm(m) = model {
                    if m.add_space_prefix && s.starts_with(' ') {
                        s.remove(0);
                    }
                }
                Ok(s)
            }
        }
    }

    /// The text of one token (byte-level characters / `▁` as stored), if the id exists.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.inner {
            Inner::Hf(t) => t.id_to_token(id),
            Inner::Gguf { vocab, .. } => vocab.tokens.get(id as usize).cloned(),
        }
    }

    /// The id of a token given its stored text.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.inner {
            Inner::Hf(t) => t.token_to_id(token),
            Inner::Gguf { vocab, .. } => vocab.id(token),
        }
    }

    /// Number of tokens in the vocabulary (including added/special tokens).
    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Inner::Hf(t) => t.get_vocab_size(true),
            Inner::Gguf { vocab, .. } => vocab.tokens.len(),
        }
    }

    /// Beginning-of-sequence token id.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence token id.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether the model expects BOS to be prepended (`tokenizer.ggml.add_bos_token`).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The Jinja chat template shipped with the model, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
}
