//! Tokenizers on tiny vocabularies built in the test (GGUF metadata and a tokenizer.json).

use lowbit_model::gguf::{GgufFile, GgufValue, GgufWriter};
use lowbit_model::tokenizer::Tokenizer;

fn s(x: &str) -> GgufValue {
    GgufValue::String(x.to_string())
}

/// GPT-2's byte -> printable char map, written out independently of the crate.
fn byte_char(b: u8) -> char {
    let keep: Vec<u8> = (b'!'..=b'~')
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    if keep.contains(&b) {
        return b as char;
    }
    let k = (0..=255u8)
        .filter(|x| !keep.contains(x))
        .position(|x| x == b)
        .unwrap();
    char::from_u32(256 + k as u32).unwrap()
}

/// A byte-level BPE vocabulary: 256 byte tokens, then the merge results, then specials.
struct Bpe {
    tokens: Vec<String>,
    merges: Vec<String>,
}

impl Bpe {
    fn new(merges: &[(&str, &str)]) -> Self {
        let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
        let mut ms = Vec::new();
        for (a, b) in merges {
            let m = format!("{a}{b}");
            if !tokens.contains(&m) {
                tokens.push(m);
            }
            ms.push(format!("{a} {b}"));
        }
        tokens.push("<|im_start|>".into());
        tokens.push("<|endoftext|>".into());
        Bpe { tokens, merges: ms }
    }

    fn id(&self, t: &str) -> u32 {
        self.tokens
            .iter()
            .position(|x| x == t)
            .unwrap_or_else(|| panic!("no token {t}")) as u32
    }

    fn gguf(&self, pre: &str) -> GgufFile {
        let mut w = GgufWriter::new();
        let n = self.tokens.len();
        let types: Vec<GgufValue> = (0..n)
            .map(|i| GgufValue::I32(if i >= n - 2 { 3 } else { 1 }))
            .collect();
        w.add_kv("tokenizer.ggml.model", s("gpt2"))
            .add_kv("tokenizer.ggml.pre", s(pre))
            .add_kv(
                "tokenizer.ggml.tokens",
                GgufValue::Array(self.tokens.iter().map(|t| s(t)).collect()),
            )
            .add_kv("tokenizer.ggml.token_type", GgufValue::Array(types))
            .add_kv(
                "tokenizer.ggml.merges",
                GgufValue::Array(self.merges.iter().map(|m| s(m)).collect()),
            )
            .add_kv("tokenizer.ggml.bos_token_id", GgufValue::U32(n as u32 - 1))
            .add_kv("tokenizer.ggml.eos_token_id", GgufValue::U32(n as u32 - 1))
            .add_kv("tokenizer.chat_template", s("{{ messages }}"));
        GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap()
    }
}

const G: &str = "\u{120}"; // 'Ġ', the byte-level space

fn hello_vocab() -> Bpe {
    Bpe::new(&[
        ("h", "e"),
        ("l", "l"),
        ("he", "ll"),
        ("hell", "o"),
        (G, "w"),
        ("1", "2"),
        ("o", "r"),
    ])
}

#[test]
fn bpe_merges_by_rank_and_splits_words() {
    let v = hello_vocab();
    let t = Tokenizer::from_gguf(&v.gguf("gpt-2")).unwrap();
    let ids = t.encode("hello world").unwrap();
    let want: Vec<u32> = ["hello", &format!("{G}w"), "or", "l", "d"]
        .iter()
        .map(|x| v.id(x))
        .collect();
    assert_eq!(ids, want);
    assert_eq!(t.decode(&ids).unwrap(), "hello world");
    // gpt-2 keeps digit runs together, so "12" merges; smollm splits digits first.
    assert_eq!(t.encode("12").unwrap(), vec![v.id("12")]);
    let smol = Tokenizer::from_gguf(&v.gguf("smollm")).unwrap();
    assert_eq!(smol.encode("12").unwrap(), vec![v.id("1"), v.id("2")]);
    assert_eq!(t.chat_template(), Some("{{ messages }}"));
    assert_eq!(t.bos_id(), Some(v.tokens.len() as u32 - 1));
}

#[test]
fn lower_rank_wins() {
    let a = Bpe::new(&[("e", "l"), ("l", "l")]);
    let ta = Tokenizer::from_gguf(&a.gguf("gpt-2")).unwrap();
    assert_eq!(ta.encode("ell").unwrap(), vec![a.id("el"), a.id("l")]);
    let b = Bpe::new(&[("l", "l"), ("e", "l")]);
    let tb = Tokenizer::from_gguf(&b.gguf("gpt-2")).unwrap();
    assert_eq!(tb.encode("ell").unwrap(), vec![b.id("e"), b.id("ll")]);
}

#[test]
fn byte_level_round_trips_any_utf8() {
    let v = hello_vocab();
    let t = Tokenizer::from_gguf(&v.gguf("llama-bpe")).unwrap();
    for text in ["héllo wörld", "🦙\n\n\t x", "  spaces   ", "a'sb'll 123456"] {
        let ids = t.encode(text).unwrap();
        let bytes: usize = ids
            .iter()
            .map(|&i| v.tokens[i as usize].chars().count())
            .sum();
        assert_eq!(bytes, text.len());
        assert_eq!(t.decode(&ids).unwrap(), text);
    }
    assert!(t.decode(&[9_999_999]).is_err());
}

#[test]
fn special_tokens_are_parsed_only_when_asked() {
    let v = hello_vocab();
    let t = Tokenizer::from_gguf(&v.gguf("gpt-2")).unwrap();
    let im = v.id("<|im_start|>");
    assert_eq!(
        t.encode("<|im_start|>hello").unwrap(),
        vec![im, v.id("hello")]
    );
    let plain = t.encode_with("<|im_start|>hello", false).unwrap();
    assert!(!plain.contains(&im));
    assert_eq!(t.decode(&plain).unwrap(), "<|im_start|>hello");
}

#[test]
fn pre_tokenizer_patterns_differ_as_specified() {
    // Qwen2 splits digits one by one, Llama 3 in groups of up to three: "1234" has no merges
    // here, so both give four byte tokens; with merge "1 2" Llama 3 merges inside "123".
    let v = Bpe::new(&[("1", "2")]);
    let q = Tokenizer::from_gguf(&v.gguf("qwen2")).unwrap();
    let l = Tokenizer::from_gguf(&v.gguf("llama-bpe")).unwrap();
    assert_eq!(
        q.encode("1234").unwrap(),
        vec![v.id("1"), v.id("2"), v.id("3"), v.id("4")]
    );
    assert_eq!(
        l.encode("1234").unwrap(),
        vec![v.id("12"), v.id("3"), v.id("4")]
    );
    let unknown = v.gguf("no-such-pre");
    let e = Tokenizer::from_gguf(&unknown).unwrap_err();
    assert!(e.to_string().contains("no-such-pre"), "{e}");
}

fn spm_gguf(add_space_prefix: Option<bool>) -> (GgufFile, Vec<String>) {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0f32; 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    // Higher score = merged first.
    for (t, sc) in [
        ("\u{2581}", -1.0),
        ("h", -2.0),
        ("e", -2.0),
        ("l", -2.0),
        ("o", -2.0),
        ("ll", -3.0),
        ("he", -4.0),
        ("\u{2581}he", -5.0),
        ("llo", -6.0),
        ("\u{2581}hello", -7.0),
        ("\u{2581}\u{2581}", -8.0),
    ] {
        tokens.push(t.into());
        types.push(1);
        scores.push(sc);
    }
    let mut w = GgufWriter::new();
    w.add_kv("tokenizer.ggml.model", s("llama"))
        .add_kv(
            "tokenizer.ggml.tokens",
            GgufValue::Array(tokens.iter().map(|t| s(t)).collect()),
        )
        .add_kv(
            "tokenizer.ggml.scores",
            GgufValue::Array(scores.into_iter().map(GgufValue::F32).collect()),
        )
        .add_kv(
            "tokenizer.ggml.token_type",
            GgufValue::Array(types.into_iter().map(GgufValue::I32).collect()),
        )
        .add_kv("tokenizer.ggml.bos_token_id", GgufValue::U32(1))
        .add_kv("tokenizer.ggml.eos_token_id", GgufValue::U32(2))
        .add_kv("tokenizer.ggml.unknown_token_id", GgufValue::U32(0));
    if let Some(a) = add_space_prefix {
        w.add_kv("tokenizer.ggml.add_space_prefix", GgufValue::Bool(a));
    }
    (GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap(), tokens)
}

#[test]
fn spm_merges_by_score_with_byte_fallback() {
    let (f, tokens) = spm_gguf(None);
    let id = |t: &str| tokens.iter().position(|x| x == t).unwrap() as u32;
    let t = Tokenizer::from_gguf(&f).unwrap();
    assert!(t.add_bos());
    // "hello" -> "▁hello" (space prefix): ll, he, ▁he, llo, ▁hello by descending score.
    assert_eq!(t.encode("hello").unwrap(), vec![id("\u{2581}hello")]);
    // 'é' is not a token: UTF-8 bytes C3 A9 as byte tokens.
    let ids = t.encode("hé").unwrap();
    assert_eq!(
        ids,
        vec![id("\u{2581}"), id("h"), id("<0xC3>"), id("<0xA9>")]
    );
    assert_eq!(t.decode(&ids).unwrap(), "hé");
    // Two spaces: "▁▁hello" -> "▁▁" merges before "▁he"? No: "▁▁"(-8) is lower than "▁he"(-5).
    assert_eq!(
        t.encode(" hello").unwrap(),
        vec![id("\u{2581}"), id("\u{2581}hello")]
    );
    assert_eq!(t.decode(&t.encode(" hello").unwrap()).unwrap(), " hello");
    assert_eq!(t.encode("").unwrap(), Vec::<u32>::new());

    let (f, _) = spm_gguf(Some(false));
    let t = Tokenizer::from_gguf(&f).unwrap();
    assert_eq!(t.encode("hello").unwrap(), vec![id("he"), id("llo")]);
}

#[test]
fn bad_tokenizer_metadata_is_a_typed_error() {
    let mut w = GgufWriter::new();
    w.add_kv("tokenizer.ggml.model", s("gpt2"));
    let e =
        Tokenizer::from_gguf(&GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap()).unwrap_err();
    assert!(e.to_string().contains("tokenizer.ggml.tokens"), "{e}");
    w.add_kv("tokenizer.ggml.tokens", GgufValue::Array(vec![s("a")]));
    w.add_kv("tokenizer.ggml.model", s("wordpiece"));
    let e =
        Tokenizer::from_gguf(&GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap()).unwrap_err();
    assert!(e.to_string().contains("wordpiece"), "{e}");
    w.add_kv("tokenizer.ggml.model", s("llama"));
    w.add_kv("tokenizer.ggml.bos_token_id", GgufValue::U32(5));
    let e =
        Tokenizer::from_gguf(&GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap()).unwrap_err();
    assert!(e.to_string().contains("bos_token_id"), "{e}");
}

#[test]
fn hf_tokenizer_json_agrees_with_the_gguf_bpe() {
    let v = hello_vocab();
    let vocab: serde_json::Map<String, serde_json::Value> = v
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::Value::from(i)))
        .collect();
    let n = v.tokens.len();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [
            {"id": n - 2, "content": "<|im_start|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": n - 1, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": v.merges}
    });
    let dir = std::env::temp_dir().join(format!("lowbit-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": "<|endoftext|>", "eos_token": {"content": "<|im_start|>"}, "chat_template": "T"}"#,
    )
    .unwrap();
    let hf = Tokenizer::from_hf_file(&dir.join("tokenizer.json")).unwrap();
    let gg = Tokenizer::from_gguf(&v.gguf("gpt-2")).unwrap();
    for text in [
        "hello world",
        "hello  world 12 héllo!",
        "<|im_start|>hello\n\n",
        "  x",
    ] {
        assert_eq!(
            hf.encode(text).unwrap(),
            gg.encode(text).unwrap(),
            "{text:?}"
        );
        assert_eq!(hf.decode(&hf.encode(text).unwrap()).unwrap(), text);
    }
    assert_eq!(hf.bos_id(), Some(n as u32 - 1));
    assert_eq!(hf.eos_id(), Some(n as u32 - 2));
    assert_eq!(hf.chat_template(), Some("T"));
    assert!(Tokenizer::from_hf_file(&dir.join("missing.json")).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn long_whitespace_runs_and_long_words_encode() {
    let v = hello_vocab();
    for pre in ["gpt-2", "llama-bpe", "qwen2", "smollm", "default"] {
        let t = Tokenizer::from_gguf(&v.gguf(pre)).unwrap();
        let text = format!(
            "{}x{}\n{}",
            " ".repeat(50_000),
            "ab".repeat(2_000),
            "\t \n".repeat(5_000)
        );
        let ids = t.encode(&text).unwrap();
        assert_eq!(t.decode(&ids).unwrap(), text, "{pre}");
    }
}
