//! Compare the GGUF-embedded tokenizer with reference token ids (e.g. from transformers).
//!
//! ```text
//! cargo run --release -p lowbit-model --example tokenizer_check -- MODEL.gguf REF.json
//! ```
//! `REF.json`: `{"texts": [..], "ids": [[..], ..], "wiki_ids": [..] (optional)}`; with
//! `wiki_ids`, a third argument names the text file they encode. Every text is encoded without
//! BOS (special tokens written in the text are parsed); prints each mismatch and a summary, and
//! exits non-zero on any mismatch.

use lowbit_model::gguf::GgufFile;
use lowbit_model::tokenizer::Tokenizer;
use serde_json::Value;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_u64)
                .map(|x| x as u32)
                .collect()
        })
        .unwrap_or_default()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: tokenizer_check MODEL.gguf REF.json [WIKI.txt]".into());
    }
    let tok = Tokenizer::from_gguf(&GgufFile::open(std::path::Path::new(&args[1]))?)?;
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&args[2])?)?;
    let texts = r["texts"].as_array().ok_or("no `texts`")?;
    let refs = r["ids"].as_array().ok_or("no `ids`")?;
    let mut bad = 0;
    for (t, want) in texts.iter().zip(refs) {
        let t = t.as_str().ok_or("text is not a string")?;
        let (ours, want) = (tok.encode(t)?, ids(want));
        if ours != want {
            bad += 1;
            println!("MISMATCH {t:?}\n  ours {ours:?}\n  ref  {want:?}");
        }
    }
    println!("{} of {} texts identical", texts.len() - bad, texts.len());
    if let (Some(w), Some(path)) = (r.get("wiki_ids"), args.get(3)) {
        let want = ids(w);
        let t0 = std::time::Instant::now();
        let ours = tok.encode(&std::fs::read_to_string(path)?)?;
        let secs = t0.elapsed().as_secs_f64();
        let first = ours.iter().zip(&want).position(|(a, b)| a != b);
        println!(
            "wiki: ours {} tokens, ref {} tokens, first difference at {:?} ({secs:.2} s to encode)",
            ours.len(),
            want.len(),
            first
        );
        if let Some(i) = first {
            let lo = i.saturating_sub(5);
            println!(
                "  ours {:?}\n  ref  {:?}",
                &ours[lo..(i + 10).min(ours.len())],
                &want[lo..(i + 10).min(want.len())]
            );
            bad += 1;
        } else if ours.len() != want.len() {
            bad += 1;
        }
    }
    if bad > 0 {
        return Err(format!("{bad} mismatch(es)").into());
    }
    Ok(())
}
