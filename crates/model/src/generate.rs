//! Text generation: batched prefill of the prompt, then one token at a time with the KV cache;
//! and a minimal chat-template renderer.
//!
//! # Chat templates
//! Models ship a Jinja template (`tokenizer.chat_template`). lowbit does not embed a Jinja
//! engine; [`render_chat`] recognises the ChatML family (templates that emit `<|im_start|>`,
//! e.g. SmolLM2, Qwen2) and renders `<|im_start|>{role}\n{content}<|im_end|>\n` per message,
//! then `<|im_start|>assistant\n`. When the template inserts a default system message for
//! conversations without one (SmolLM2 does), that literal message is extracted from the template
//! and inserted too. Other template families are reported as unsupported.

use crate::llama::{Logits, Model};
use crate::sampling::Sampler;
use crate::{Error, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// The default system message a ChatML template inserts when the conversation has none.
fn default_system(template: &str) -> Option<String> {
    let start = "<|im_start|>system\n";
    let i = template.find(start)? + start.len();
    let rest = &template[i..];
    let j = rest.find("<|im_end|>")?;
    let text = &rest[..j];
    // Only a literal message (no Jinja expression inside) counts.
    (!text.contains("{{") && !text.contains("{%") && !text.contains('\'')).then(|| text.to_string())
}

/// Render `messages` with the model's chat template (ChatML family only, see module docs),
/// ending with the assistant generation prompt.
pub fn render_chat(template: Option<&str>, messages: &[Message]) -> Result<String> {
    let t = template.ok_or_else(|| {
        Error::Tokenizer("the model has no chat template (tokenizer.chat_template)".into())
    })?;
    if !t.contains("<|im_start|>") {
        return Err(Error::Tokenizer(
            "unsupported chat template: only ChatML templates (<|im_start|>) are rendered".into(),
        ));
    }
    let mut out = String::new();
    if messages.first().is_none_or(|m| m.role != "system") {
        if let Some(sys) = default_system(t) {
            out.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
        }
    }
    for m in messages {
        out.push_str(&format!(
            "<|im_start|>{}\n{}<|im_end|>\n",
            m.role, m.content
        ));
    }
    out.push_str("<|im_start|>assistant\n");
    Ok(out)
}

/// Counters of one [`generate`] call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerateStats {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub generated: usize,
    /// Seconds spent in the prompt prefill.
    pub prefill_s: f64,
    /// Seconds spent decoding.
    pub decode_s: f64,
    /// Generation stopped at a stop token.
    pub stopped: bool,
}

/// Generate up to `max_new` tokens after `prompt`, calling `on_token` with each new token
/// (return `false` to stop). Stops at any token of `stop`, which is not passed to `on_token`.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    stop: &[u32],
    kv_policy: &str,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<GenerateStats> {
    if prompt.is_empty() {
        return Err(Error::Shape("empty prompt".into()));
    }
    if prompt.len() + max_new > model.config.max_ctx {
        return Err(Error::Shape(format!(
            "prompt ({}) + max tokens ({max_new}) exceeds the model context {}",
            prompt.len(),
            model.config.max_ctx
        )));
    }
    let mut cache = model.new_cache(kv_policy)?;
    let t0 = std::time::Instant::now();
    let mut logits = model.forward(prompt, cache.as_mut(), Logits::Last)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let mut st = GenerateStats {
        prompt_tokens: prompt.len(),
        generated: 0,
        prefill_s,
        decode_s: 0.0,
        stopped: false,
    };
    for _ in 0..max_new {
        let t = sampler.sample(&logits);
        if stop.contains(&t) {
            st.stopped = true;
            break;
        }
        st.generated += 1;
        if !on_token(t) {
            break;
        }
        logits = model.forward(&[t], cache.as_mut(), Logits::Last)?;
    }
    st.decode_s = t1.elapsed().as_secs_f64();
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_smollm2_chatml_with_default_system() {
        let m = [Message {
            role: "user".into(),
            content: "Hi".into(),
        }];
        let s = render_chat(Some(SMOL), &m).unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let with_sys = [
            Message {
                role: "system".into(),
                content: "Be brief.".into(),
            },
            Message {
                role: "user".into(),
                content: "Hi".into(),
            },
        ];
        let s = render_chat(Some(SMOL), &with_sys).unwrap();
        assert!(
            s.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n") && !s.contains("SmolLM")
        );
    }

    #[test]
    fn non_chatml_template_is_an_error() {
        assert!(render_chat(Some("{{ bos_token }}[INST] x [/INST]"), &[]).is_err());
        assert!(render_chat(None, &[]).is_err());
    }
}
