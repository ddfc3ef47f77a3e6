//! `cargo xtask generate`: complete a prompt (optionally wrapped in the model's chat template),
//! streaming tokens to stdout.

use anyhow::{Context, Result};
use lowbit_model::generate::{generate, render_chat, Message};
use lowbit_model::sampling::{Sampler, SamplingParams};
use serde_json::json;
use std::io::Write;

/// Arguments of `cargo xtask generate`.
#[derive(clap::Args)]
pub struct Args {
    /// The model: a .gguf file, a Hugging Face folder, or a repo id in the HF cache.
    #[arg(long)]
    pub model: String,
    /// The prompt (a user message with --chat).
    #[arg(long)]
    pub prompt: String,
    /// Maximum new tokens.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Wrap the prompt in the model's chat template (ChatML family) as a user message.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat (default: the template's own default, if any).
    #[arg(long)]
    pub system: Option<String>,
    /// Prepend BOS when the tokenizer asks for it (`add_bos`).
    #[arg(long)]
    pub bos: bool,
    /// KV-cache policy.
    #[arg(long, default_value = "f32")]
    pub kv: String,
    /// Quantize the output head at load time (RTN, e.g. `int8-pc`) for faster decoding.
    #[arg(long)]
    pub head: Option<String>,
    /// INT8 block activations on the quantized linears that have an integer path (INT4..INT8,
    /// MXFP4/NVFP4, NF4; integer dot products, `lowbit_kernels::ActMode::Int8Block`; changes the
    /// numerics slightly).
    #[arg(long)]
    pub act8: bool,
    /// Print one JSON object (text, tokens, speed) instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

/// Run the command.
pub fn run(args: Args) -> Result<()> {
    let (mut model, tok) = lowbit_model::load::load(&args.model, true)
        .with_context(|| format!("loading model `{}`", args.model))?;
    crate::model_opts::apply(&mut model, args.head.as_deref(), args.act8)?;
    let tok = tok.context("the model has no tokenizer")?;
    let text = if args.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &args.system {
            msgs.push(Message {
                role: "system".into(),
                content: s.clone(),
            });
        }
        msgs.push(Message {
            role: "user".into(),
            content: args.prompt.clone(),
        });
        render_chat(tok.chat_template(), &msgs).context("rendering the chat template")?
    } else {
        args.prompt.clone()
    };
    let mut ids = Vec::new();
    if args.bos && tok.add_bos() {
        ids.extend(tok.bos_id());
    }
    ids.extend(tok.encode(&text).context("tokenizing the prompt")?);
    let mut stop: Vec<u32> = tok.eos_id().into_iter().collect();
    if args.chat {
        stop.extend(tok.token_to_id("<|im_end|>"));
    }
    let mut sampler = Sampler::new(SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    });
    let mut out_ids = Vec::new();
    let mut printed = 0usize;
    let mut stdout = std::io::stdout();
    let json_mode = args.json;
    if !json_mode {
        print!("{}", if args.chat { "" } else { &args.prompt });
    }
    let st = generate(
        &model,
        &ids,
        args.max_tokens,
        &mut sampler,
        &stop,
        &args.kv,
        &mut |t| {
            out_ids.push(t);
            if !json_mode {
                // Print the newly completed text (decode the whole tail so multi-byte characters
                // split across tokens come out whole).
                if let Ok(s) = tok.decode(&out_ids) {
                    if !s.ends_with('\u{fffd}') && s.len() >= printed {
                        print!("{}", &s[printed..]);
                        let _ = stdout.flush();
                        printed = s.len();
                    }
                }
            }
            true
        },
    )?;
    let completion = tok.decode(&out_ids)?;
    if json_mode {
        println!(
            "{}",
            json!({"model": args.model, "prompt": args.prompt, "chat": args.chat,
                   "completion": completion, "prompt_tokens": st.prompt_tokens,
                   "generated_tokens": st.generated, "stopped_at_eos": st.stopped,
                   "prefill_tok_s": st.prompt_tokens as f64 / st.prefill_s.max(1e-9),
                   "decode_tok_s": st.generated as f64 / st.decode_s.max(1e-9),
                   "token_ids": out_ids})
        );
    } else {
        if completion.len() > printed {
            print!("{}", &completion[printed..]);
        }
        println!();
        eprintln!(
            "[{} prompt tokens, {:.1} tok/s prefill; {} generated, {:.1} tok/s decode{}]",
            st.prompt_tokens,
            st.prompt_tokens as f64 / st.prefill_s.max(1e-9),
            st.generated,
            st.generated as f64 / st.decode_s.max(1e-9),
            if st.stopped {
                "; stopped at end of turn"
            } else {
                ""
            }
        );
    }
    Ok(())
}
