//! A quantized output head for runtime speed.
//!
//! In a weight-quantized small model the output head dominates the bytes read per decoded token
//! (SmolLM2-135M: a tied f32 head of 49152 x 576 is 113 MB, the INT4 body about 60 MB).
//! Serving stacks therefore store the head in 8 bits (llama.cpp's Q8_0/Q6_K output tensor).
//! [`Model::quantize_head`] does the same at load time: the head is RTN-quantized to the given
//! scheme and runs on the packed kernels; the embedding table (read one row per token) stays
//! f32. The logits change by the head's rounding error, so report it (`cargo xtask eval
//! --head int8-pc --reference ...`).

use crate::{Error, Linear, Model, Result};
use lowbit_numerics::{quantize, QuantOptions, Scheme};

impl Model {
    /// Replace the output head (the tied embedding or `lm_head`) by an RTN-quantized copy in
    /// `scheme` (e.g. `int8-pc`), unties it from the embedding, and returns the head's weight
    /// bytes before and after. Fails when the scheme cannot hold the head's shape.
    ///
    pub fn quantize_head(&mut self, scheme: &Scheme) -> Result<(usize, usize)> {
        let (vocab, h) = (self.config.vocab_size, self.config.hidden_size);
        let w: &[f32] = match &self.lm_head {
            Some(l) => l.weight_f32(),
            None => &self.embed,
        };
        let before = w.len() * 4;
        let q = quantize(w, vocab, h, scheme, &QuantOptions::default()).map_err(|e| {
            Error::Shape(format!(
                "quantizing the output head ({vocab}x{h}) to {}: {e}",
                scheme.name()
            ))
        })?;
        let after = q.storage_bytes();
        let bias = self.lm_head.as_mut().and_then(|l| l.bias.take());
        let mut head = Linear::quantized_with(q, |q| Ok(q.dequantize()?))?;
        if let Some(b) = bias {
            head = head.with_bias(b)?;
        }
        self.lm_head = Some(head);
        self.config.tie_embeddings = false;
        Ok((before, after))
    }

    /// Bytes of weights one decoded token streams: every linear layer as stored for its
    /// product ([`Linear::streamed_bytes`]) plus the output head (the f32 embedding when tied).
    /// Embedding lookups, norms and the KV cache are not counted.
    pub fn streamed_weight_bytes(&self) -> usize {
        let layers: usize = self
            .linear_names()
            .iter()
            .filter(|n| n.as_str() != "lm_head")
            .filter_map(|n| self.linear(n))
            .map(Linear::streamed_bytes)
            .sum();
        let head = match &self.lm_head {
            Some(l) => l.streamed_bytes(),
            None => self.embed.len() * 4,
        };
        layers + head
    }
}

#[cfg(test)]
mod tests {
    use crate::config::ModelConfig;
    use crate::weights::random_model;
    use crate::Logits;
    use lowbit_kv_cache::F32Cache;
    use lowbit_numerics::Scheme;

    fn cfg() -> ModelConfig {
        crate::test_util::tiny_llama(true, false)
    }

    /// The int8-head model's logits stay within the head's rounding error of the f32 model's:
    /// per-channel INT8 changes each head weight by at most half a step (absmax/127/2), so each
    /// logit moves by at most Σ|x|·step/2 over the normed hidden state.
    #[test]
    fn int8_head_tracks_f32_logits() {
        let c = cfg();
        let m0 = random_model(c.clone(), 3).unwrap();
        let mut m1 = random_model(c.clone(), 3).unwrap();
        let (b, a) = m1
            .quantize_head(&Scheme::from_name("int8-pc").unwrap())
            .unwrap();
        assert!(a * 3 < b, "{a} bytes vs {b}");
        assert!(!m1.config.tie_embeddings && m1.lm_head.is_some());
        let head_f32 = c.vocab_size * c.hidden_size * 4;
        assert_eq!(
            m0.streamed_weight_bytes() - head_f32,
            m1.streamed_weight_bytes() - m1.lm_head.as_ref().unwrap().streamed_bytes()
        );
        let toks = [1u32, 5, 9, 2];
        let mut c0 = F32Cache::new(c.kv_shape());
        let mut c1 = F32Cache::new(c.kv_shape());
        let l0 = m0.forward(&toks, &mut c0, Logits::All).unwrap();
        let l1 = m1.forward(&toks, &mut c1, Logits::All).unwrap();
        let max_abs = l0.iter().fold(0f32, |a, v| a.max(v.abs()));
        let max_diff = l0
            .iter()
            .zip(&l1)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(max_diff > 0.0, "the head really is quantized");
        assert!(
            max_diff < 0.05 * max_abs,
            "diff {max_diff} vs logits up to {max_abs}"
        );
        // Decode (one token) goes through the same head.
        let d1 = m1.forward(&[7], &mut c1, Logits::Last).unwrap();
        assert_eq!(d1.len(), c.vocab_size);
    }
}
