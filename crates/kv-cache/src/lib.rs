//! # lowbit-kv-cache
//!
//! The KV cache behind lowbit's forward pass. [`KvCache`] is the trait the model calls: it
//! stores keys/values per layer and computes attention over what it stores, so a quantized
//! cache can dequantize blocks inside its own attention loop instead of materialising f32.
//! [`F32Cache`] is the plain reference implementation.
#![warn(missing_docs)]

mod attn;
pub mod codec;
mod error;
mod f32_cache;
pub mod kivi;
pub mod policy;
mod quant;
#[cfg(test)]
mod tests;

pub use error::{Error, Result};
pub use f32_cache::{check_attend_args, F32Cache};
pub use policy::Policy;
pub use quant::QuantCache;

/// Shape of the cache of one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    /// Decoder layers.
    pub n_layers: usize,
    /// Key/value heads (GQA: fewer than query heads).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// A per-layer key/value store that can also attend over its contents.
///
/// Keys arrive already rotated (RoPE applied). Layout of every `k`, `v` and `q` slice:
/// token-major, then head, then `head_dim` (`[n_tokens][n_heads][head_dim]`).
pub trait KvCache: Send {
    /// Shape this cache was built for.
    fn shape(&self) -> KvShape;

    /// Tokens currently stored for `layer`.
    fn len(&self, layer: usize) -> usize;

    /// True when no layer holds tokens.
    fn is_empty(&self) -> bool {
        (0..self.shape().n_layers).all(|l| self.len(l) == 0)
    }

    /// Append `n_tokens` keys and values to `layer`.
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], n_tokens: usize) -> Result<()>;

    /// Causal attention of `n_q` query tokens (`q`: `[n_q][n_heads][head_dim]`) against the
    /// stored tokens of `layer`. Query `i` sits at absolute position `len - n_q + i` and sees
    /// stored tokens `0..=len - n_q + i`. Scores are scaled by `scale` before the softmax.
    /// `n_heads` must be a multiple of `n_kv_heads` (query head `h` uses KV head
    /// `h / (n_heads / n_kv_heads)`). Writes `[n_q][n_heads][head_dim]` into `out`.
    fn attend(
        &self,
        layer: usize,
        q: &[f32],
        n_q: usize,
        n_heads: usize,
        scale: f32,
        out: &mut [f32],
    ) -> Result<()>;

    /// [`Self::attend`] with a sliding window (Gemma-3's local layers): query `i`, at position
    /// `p = len - n_q + i`, sees only stored tokens `p + 1 - window ..= p` (`window >= 1`).
    /// The default runs [`Self::attend`] when no query can have more than `window` tokens in
    /// view (`len <= window`, where both are the same) and refuses otherwise; caches that
    /// implement the window override it.
    #[allow(clippy::too_many_arguments)]
    fn attend_window(
        &self,
        layer: usize,
        q: &[f32],
        n_q: usize,
        n_heads: usize,
        scale: f32,
        window: usize,
        out: &mut [f32],
    ) -> Result<()> {
        if window == 0 {
            return Err(Error::Shape("sliding window of 0 tokens".into()));
        }
        if self.len(layer) <= window {
            return self.attend(layer, q, n_q, n_heads, scale, out);
        }
        Err(Error::Policy {
            policy: self.policy_name(),
            reason: format!(
                "sliding-window attention (window {window}, {} tokens cached) is not \
                 implemented for this cache",
                self.len(layer)
            ),
        })
    }

    /// Bytes held for stored tokens, all metadata (scales, zero points) counted.
    fn bytes(&self) -> usize;

    /// Forget every token (keeps allocations).
    fn clear(&mut self);

    /// Short name of the policy (e.g. `f32`, `fp8`, `kivi2`).
    fn policy_name(&self) -> String;

    /// Give the cache the model's RoPE inverse frequencies (`head_dim / 2` values; "rotate half"
    /// layout: channel `i < head_dim/2` is paired with `i + head_dim/2` and rotated by
    /// `pos * inv_freq[i]`, the position of a token being the number of tokens before it in
    /// the layer). Only policies that quantize keys before RoPE (`rope=pre`) use them; they
    /// refuse to append until they have them. The default ignores them.
    fn set_rope(&mut self, inv_freq: &[f64]) -> Result<()> {
        let _ = inv_freq;
        Ok(())
    }
}

/// Build a cache from a policy string such as `f32`, `fp8`, `kivi2` or
/// `k=fp8,v=int4g32,sink=4` (see `docs/kv-cache.md`).
///
/// ```
/// use lowbit_kv_cache::{build, KvShape};
/// let c = build("f32", KvShape { n_layers: 2, n_kv_heads: 3, head_dim: 64 }).unwrap();
/// assert_eq!(c.policy_name(), "f32");
/// assert!(build("nonsense", KvShape { n_layers: 1, n_kv_heads: 1, head_dim: 8 }).is_err());
/// ```
pub fn build(policy: &str, shape: KvShape) -> Result<Box<dyn KvCache>> {
    build_with_context(policy, shape, None)
}

/// Split a list of policies separated by commas or semicolons, keeping the items of a mixed
/// policy together: `v=`, `sink=`, `r=`, `g=`, `rot=`, `rope=` items (and `s=`, `residual=`, `group=`) belong to
/// the policy before them, and a `v=` right after a `k=` too.
///
/// ```
/// use lowbit_kv_cache::split_policies;
/// assert_eq!(
///     split_policies("f32,fp8,k=fp8,v=int4g32,sink=4;kivi2,sink=4"),
///     ["f32", "fp8", "k=fp8,v=int4g32,sink=4", "kivi2,sink=4"]
/// );
/// ```
pub fn split_policies(list: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for group in list.split(';') {
        let mut first = true;
        for item in group.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let key = item.split_once('=').map(|(k, _)| k.trim());
            let attaches = matches!(
                key,
                Some("v" | "sink" | "s" | "r" | "residual" | "g" | "group" | "rot" | "rope")
            );
            match out.last_mut() {
                Some(last) if attaches && !first => {
                    last.push(',');
                    last.push_str(item);
                }
                _ => out.push(item.to_string()),
            }
            first = false;
        }
    }
    out
}

/// [`build`], also checking the full-precision windows (sink + residual) against the model
/// context `max_ctx` when it is given.
///
/// ```
/// use lowbit_kv_cache::{build_with_context, KvShape};
/// let s = KvShape { n_layers: 1, n_kv_heads: 1, head_dim: 64 };
/// assert!(build_with_context("kivi2", s, Some(8192)).is_ok());
/// let e = build_with_context("kivi2", s, Some(64)).err().unwrap();
/// assert!(e.to_string().contains("larger than the context"));
/// ```
pub fn build_with_context(
    policy: &str,
    shape: KvShape,
    max_ctx: Option<usize>,
) -> Result<Box<dyn KvCache>> {
    if policy.trim() == "f32" {
        return Ok(Box::new(F32Cache::new(shape)));
    }
    let p = Policy::parse(policy, shape, max_ctx)?;
    Ok(Box::new(QuantCache::new(shape, p)))
}
