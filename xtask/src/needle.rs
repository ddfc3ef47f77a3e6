//! `cargo xtask needle`: passkey retrieval ("needle in a haystack") per KV-cache policy.
//!
//! Each trial builds, in tokens, a prompt of exactly `length` tokens: an instruction, filler
//! sentences, a needle sentence `The pass key is NNNNN. Remember it. NNNNN is the pass key.`
//! (a random 5-digit number) inserted at `depth`% of the filler (at a sentence boundary), and
//! the question `What is the pass key? The pass key is`. The model decodes greedily a few
//! tokens; the trial passes when the decoded text contains the number. Trials of one
//! (length, depth) cell use seeds `seed + trial`, the same for every policy, so policies see
//! identical prompts.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lowbit_model::llama::Logits;
use serde_json::json;

/// Arguments of `cargo xtask needle`.
#[derive(clap::Args)]
pub struct Args {
    /// Model: a .gguf file or HF folder (default: SHARED/models/smollm2-135m-instruct-q4_1.gguf).
    #[arg(long)]
    pub model: Option<String>,
    /// KV-cache policies separated by commas (e.g. `f32,fp8,kivi2,k=fp8,v=int4g32,sink=4`: the
    /// items of a mixed policy stay together; `;` also separates; see docs/kv-cache.md). `f32`
    /// is added first when missing, as the baseline.
    #[arg(long, default_value = "f32,fp8,kivi2")]
    pub kv: String,
    /// Prompt lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096,8192")]
    pub lengths: Vec<usize>,
    /// Needle depths in percent of the filler (0 = start, 100 = just before the question).
    #[arg(long, value_delimiter = ',', default_value = "0,25,50,75,100")]
    pub depths: Vec<u32>,
    /// Trials (different random pass keys and filler offsets) per (length, depth) cell.
    #[arg(long, default_value_t = 1)]
    pub trials: usize,
    /// Base seed of the pass keys.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Emit one JSON object per cell (policy, length, depth, trials, accuracy) per line.
    #[arg(long)]
    pub json: bool,
}

/// Tokens decoded after the question.
const GEN: usize = 8;

const FILLER: [&str; 5] = [
    "The grass is green. ",
    "The sky is blue. ",
    "The sun is yellow. ",
    "Here we go. ",
    "There and back again. ",
];

fn lcg(s: &mut u64) -> u64 {
    *s = s
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *s >> 33
}

/// Pieces of one trial's prompt, already tokenized.
struct Trial {
    tokens: Vec<u32>,
    key: String,
}

fn make_trial(
    tok: &lowbit_model::tokenizer::Tokenizer,
    fill: &[Vec<u32>],
    length: usize,
    depth: u32,
    seed: u64,
) -> Result<Trial> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5555;
    lcg(&mut s);
    let key = format!("{}", 10000 + lcg(&mut s) % 90000);
    let intro = "There is an important piece of information hidden inside a lot of irrelevant \
                 text. Find it and memorize it. I will quiz you about it.\n";
    let needle = format!(" The pass key is {key}. Remember it. {key} is the pass key. ");
    let question = "\nWhat is the pass key? The pass key is";
    let mut head = Vec::new();
    if tok.add_bos() {
        head.extend(tok.bos_id());
    }
    head.extend(tok.encode(intro)?);
    let needle_t = tok.encode(&needle)?;
    let question_t = tok.encode(question)?;
    let fixed = head.len() + needle_t.len() + question_t.len();
    if length < fixed + 16 {
        bail!("--lengths {length} is too short for the passkey prompt ({fixed} fixed tokens)");
    }
    let budget = length - fixed;
    // Filler sentences (starting at a seed-dependent one) until the budget is filled; the last
    // sentence is cut to land exactly on `length`.
    let mut sentences: Vec<&[u32]> = Vec::new();
    let mut n = 0;
    let mut i = lcg(&mut s) as usize;
    while n < budget {
        let f = &fill[i % fill.len()];
        let take = f.len().min(budget - n);
        sentences.push(&f[..take]);
        n += take;
        i += 1;
    }
    let at = (sentences.len() as u64 * depth as u64 / 100) as usize;
    let mut tokens = head;
    for (j, f) in sentences.iter().enumerate() {
        if j == at {
            tokens.extend(&needle_t);
        }
        tokens.extend_from_slice(f);
    }
    if at >= sentences.len() {
        tokens.extend(&needle_t);
    }
    tokens.extend(&question_t);
    debug_assert_eq!(tokens.len(), length);
    Ok(Trial { tokens, key })
}

/// Run the command.
pub fn run(args: Args) -> Result<()> {
    let spec = match &args.model {
        Some(m) => m.clone(),
        None => crate::shared::shared_dir()?
            .join("models/smollm2-135m-instruct-q4_1.gguf")
            .to_string_lossy()
            .into_owned(),
    };
    let (model, tok) = lowbit_model::load::load(&spec, true)
        .with_context(|| format!("loading {spec} (pass --model FILE.gguf or an HF folder)"))?;
    let tok = tok.context("the model has no tokenizer; needle needs one")?;
    let mut policies = lowbit_kv_cache::split_policies(&args.kv);
    if !policies.iter().any(|p| p == "f32") {
        policies.insert(0, "f32".into());
    }
    let max_ctx = model.config.max_ctx;
    for p in &policies {
        lowbit_kv_cache::build_with_context(p, model.config.kv_shape(), Some(max_ctx))
            .with_context(|| format!("--kv {p}: fix the policy string (see docs/kv-cache.md)"))?;
    }
    for &l in &args.lengths {
        if l > max_ctx || max_ctx <= GEN {
            bail!("--lengths {l}: longer than the model context {max_ctx}");
        }
    }
    // A length at the model's context (8192 for SmolLM2) leaves no room for the generated
    // tokens: its prompt is shortened to `max_ctx - GEN` so that prompt + answer fill exactly
    // the context (`prompt_tokens` in the output says so).
    let prompt_len = |l: usize| l.min(max_ctx - GEN);
    if args.depths.iter().any(|&d| d > 100) {
        bail!("--depths are percentages in 0..=100");
    }
    if args.trials == 0 {
        bail!("--trials must be at least 1");
    }
    let fill: Vec<Vec<u32>> = FILLER
        .iter()
        .map(|f| tok.encode(f))
        .collect::<Result<_, _>>()?;

    let total_tokens: usize =
        args.lengths.iter().sum::<usize>() * args.depths.len() * args.trials * policies.len();
    let pb = ProgressBar::new(total_tokens as u64);
    pb.set_style(ProgressStyle::with_template(
        "needle [{bar:30}] {percent}% {elapsed}/{eta} eta {msg}",
    )?);
    if !args.json {
        println!(
            "model: {spec}   trials per cell: {}   seed: {}",
            args.trials, args.seed
        );
        println!("| policy | length | depth % | trials | accuracy |");
        println!("|---|---|---|---|---|");
    }
    let t0 = std::time::Instant::now();
    for policy in &policies {
        for &length in &args.lengths {
            for &depth in &args.depths {
                let mut hits = 0usize;
                for trial in 0..args.trials {
                    pb.set_message(format!("{policy} len {length} depth {depth} trial {trial}"));
                    let t = make_trial(
                        &tok,
                        &fill,
                        prompt_len(length),
                        depth,
                        args.seed + trial as u64,
                    )?;
                    let mut cache = model.new_cache(policy)?;
                    let mut logits = model.forward(&t.tokens, cache.as_mut(), Logits::Last)?;
                    let mut out = Vec::new();
                    for _ in 0..GEN {
                        let next = lowbit_model::sampling::argmax(&logits) as u32;
                        out.push(next);
                        if Some(next) == tok.eos_id() {
                            break;
                        }
                        logits = model.forward(&[next], cache.as_mut(), Logits::Last)?;
                    }
                    let text = tok.decode(&out)?;
                    if text.contains(&t.key) {
                        hits += 1;
                    }
                    pb.inc(length as u64);
                }
                let acc = hits as f64 / args.trials as f64;
                pb.suspend(|| {
                    if args.json {
                        println!(
                            "{}",
                            json!({"policy": policy, "length": length, "depth": depth,
                                   "trials": args.trials, "accuracy": acc,
                                   "prompt_tokens": prompt_len(length), "seed": args.seed})
                        );
                    } else {
                        println!(
                            "| {policy} | {length} | {depth} | {} | {acc:.2} |",
                            args.trials
                        );
                    }
                });
            }
        }
    }
    pb.finish_and_clear();
    eprintln!("needle: {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}
