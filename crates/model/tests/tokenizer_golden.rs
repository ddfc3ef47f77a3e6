//! Token ids of the shared golden vocabularies (llama.cpp test-tokenizer-0 files) and of
//! SmolLM2's embedded tokenizer (the HF-tokenized texts of the golden logits file).
//! Runs only when `LOWBIT_SHARED` points at the shared folder; `cargo xtask golden
//! $LOWBIT_SHARED/golden/tokenizer` is the command-line form of the first check.

use lowbit_model::gguf::GgufFile;
use lowbit_model::tokenizer::Tokenizer;
use std::path::PathBuf;

fn shared() -> Option<PathBuf> {
    std::env::var_os("LOWBIT_SHARED").map(PathBuf::from)
}

#[test]
fn llama_cpp_vocab_files() {
    let Some(sh) = shared() else { return };
    let dir = sh.join("golden/tokenizer");
    let mut failures = Vec::new();
    for name in ["gpt-2", "llama-bpe", "qwen2", "llama-spm", "phi-3"] {
        let g = dir.join(format!("ggml-vocab-{name}.gguf"));
        let tok = Tokenizer::from_gguf(&GgufFile::open(&g).unwrap()).unwrap();
        let inp = std::fs::read_to_string(g.with_extension("gguf.inp")).unwrap();
        let out = std::fs::read_to_string(g.with_extension("gguf.out")).unwrap();
        let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
        for (text, line) in texts.iter().zip(out.split('\n')) {
            let want: Vec<u32> = line
                .split_whitespace()
                .map(|t| t.parse().unwrap())
                .collect();
            let got = tok.encode_with(text, false).unwrap();
            if got != want {
                failures.push(format!("{name} {text:?}: want {want:?} got {got:?}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn smollm2_matches_hf_token_ids() {
    let Some(sh) = shared() else { return };
    let f = GgufFile::open(&sh.join("models/smollm2-135m-instruct-q4_1.gguf")).unwrap();
    let tok = Tokenizer::from_gguf(&f).unwrap();
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.add_bos()),
        (Some(1), Some(2), false)
    );
    assert!(tok.chat_template().unwrap().contains("<|im_start|>"));
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(sh.join("golden/model/smollm2-135m-logits.json")).unwrap(),
    )
    .unwrap();
    for c in v["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        // Long texts store only the first tokens (one model window).
        let got = tok.encode(text).unwrap();
        assert!(
            got.len() >= want.len(),
            "case {}: {} tokens, golden has {}",
            c["name"],
            got.len(),
            want.len()
        );
        assert_eq!(got[..want.len()], want[..], "case {}", c["name"]);
        assert!(
            text.starts_with(&tok.decode(&want).unwrap()),
            "decode of case {}",
            c["name"]
        );
        assert_eq!(
            tok.decode(&got).unwrap(),
            text,
            "decode of case {}",
            c["name"]
        );
    }
}

/// The whole wikitext-2 test text (CRLF -> LF, no BOS) tokenized by our SmolLM2 tokenizer equals
/// what the `tokenizers` crate (an independent implementation) gives for a tokenizer.json built
/// from the same GGUF vocabulary and merges with SmolLM2's pre-tokenizer (Digits + ByteLevel).
#[test]
fn smollm2_wikitext_agrees_with_hf_tokenizers() {
    let Some(sh) = shared() else { return };
    let f = GgufFile::open(&sh.join("models/smollm2-135m-instruct-q4_1.gguf")).unwrap();
    let ours = Tokenizer::from_gguf(&f).unwrap();
    let strings = |k: &str| -> Vec<String> {
        f.get(k)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let toks = strings("tokenizer.ggml.tokens");
    let vocab: serde_json::Map<String, serde_json::Value> = toks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i.into()))
        .collect();
    let json = serde_json::json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
      "normalizer": null,
      "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true},
          {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
      "post_processor": null, "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
      "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
          "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
          "vocab": vocab, "merges": strings("tokenizer.ggml.merges")}});
    let hf = tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes()).unwrap();
    let text = std::fs::read_to_string(sh.join("data/eval/wikitext-2-raw-test.txt"))
        .unwrap()
        .replace("\r\n", "\n");
    let t0 = std::time::Instant::now();
    let ids = ours.encode(&text).unwrap();
    eprintln!(
        "wikitext-2 test: {} bytes -> {} tokens in {:.2?}",
        text.len(),
        ids.len(),
        t0.elapsed()
    );
    let want = hf.encode(text.as_str(), false).unwrap();
    assert_eq!(ids, want.get_ids());
}
