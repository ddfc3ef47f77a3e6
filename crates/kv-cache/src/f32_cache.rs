//! The f32 cache: plain vectors, attention through the shared tiled kernel ([`crate::attn`]).

use crate::attn::{self, Boundary, Job, Region, Store, Vis};
use crate::{Error, KvCache, KvShape, Result};

/// Keys and values in f32; the reference every quantized cache is compared with.
#[derive(Debug, Clone)]
pub struct F32Cache {
    shape: KvShape,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl F32Cache {
    /// An empty cache for `shape`.
    pub fn new(shape: KvShape) -> Self {
        Self {
            shape,
            k: vec![Vec::new(); shape.n_layers],
            v: vec![Vec::new(); shape.n_layers],
        }
    }

    fn row(&self) -> usize {
        self.shape.n_kv_heads * self.shape.head_dim
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.shape.n_layers {
            return Err(Error::Layer {
                layer,
                n_layers: self.shape.n_layers,
            });
        }
        Ok(())
    }
}

/// Validate the arguments of [`KvCache::attend`] against a cache shape; shared by all caches.
pub fn check_attend_args(
    shape: &KvShape,
    len: usize,
    q: &[f32],
    n_q: usize,
    n_heads: usize,
    out: &[f32],
) -> Result<()> {
    if n_heads == 0 || shape.n_kv_heads == 0 || n_heads % shape.n_kv_heads != 0 {
        return Err(Error::Shape(format!(
            "{n_heads} query heads is not a multiple of {} KV heads",
            shape.n_kv_heads
        )));
    }
    let want = n_q * n_heads * shape.head_dim;
    if q.len() != want || out.len() != want {
        return Err(Error::Shape(format!(
            "q/out have {}/{} values, expected {want} ({n_q} tokens x {n_heads} heads x {})",
            q.len(),
            out.len(),
            shape.head_dim
        )));
    }
    if n_q > len {
        return Err(Error::Shape(format!(
            "{n_q} queries but only {len} cached tokens"
        )));
    }
    Ok(())
}

impl KvCache for F32Cache {
    fn shape(&self) -> KvShape {
        self.shape
    }

    fn len(&self, layer: usize) -> usize {
        self.k.get(layer).map_or(0, |k| k.len() / self.row().max(1))
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], n_tokens: usize) -> Result<()> {
        self.check_layer(layer)?;
        let want = n_tokens * self.row();
        if k.len() != want || v.len() != want {
            return Err(Error::Shape(format!(
                "append of {n_tokens} tokens needs {want} values, got k={} v={}",
                k.len(),
                v.len()
            )));
        }
        self.k[layer].extend_from_slice(k);
        self.v[layer].extend_from_slice(v);
        Ok(())
    }

    fn attend(
        &self,
        layer: usize,
        q: &[f32],
        n_q: usize,
        n_heads: usize,
        scale: f32,
        out: &mut [f32],
    ) -> Result<()> {
        self.attend_window(layer, q, n_q, n_heads, scale, usize::MAX, out)
    }

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
        self.check_layer(layer)?;
        let len = self.len(layer);
        check_attend_args(&self.shape, len, q, n_q, n_heads, out)?;
        if n_q == 0 {
            return Ok(());
        }
        let job = Job {
            regions: vec![Region {
                start: 0,
                n: len,
                store: Store::F32 {
                    k: &self.k[layer],
                    v: &self.v[layer],
                },
                vis: Vis::All,
            }],
            bound: Boundary {
                sink: 0,
                residual: 0,
                flush: 1,
            },
            recent_start: len,
            d: self.shape.head_dim,
            nh_kv: self.shape.n_kv_heads,
            n_heads,
            len,
            n_q,
            q,
            scale,
        };
        attn::attend_window(&job, window, out, false);
        Ok(())
    }

    fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|x| x.len() * 4).sum()
    }

    fn clear(&mut self) {
        self.k
            .iter_mut()
            .chain(self.v.iter_mut())
            .for_each(Vec::clear);
    }

    fn policy_name(&self) -> String {
        "f32".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_token_attends_to_itself() {
        let shape = KvShape {
            n_layers: 1,
            n_kv_heads: 1,
            head_dim: 2,
        };
        let mut c = F32Cache::new(shape);
        c.append(0, &[1.0, 0.0], &[3.0, -4.0], 1).unwrap();
        let mut out = [0f32; 4];
        // two query heads share the single KV head (GQA).
        c.attend(0, &[0.5, 0.5, -1.0, 2.0], 1, 2, 1.0, &mut out)
            .unwrap();
        assert_eq!(out, [3.0, -4.0, 3.0, -4.0]);
    }

    #[test]
    fn causal_mask_and_softmax_weights() {
        let shape = KvShape {
            n_layers: 2,
            n_kv_heads: 1,
            head_dim: 1,
        };
        let mut c = F32Cache::new(shape);
        c.append(1, &[1.0, 2.0], &[10.0, 20.0], 2).unwrap();
        let mut out = [0f32; 2];
        c.attend(1, &[1.0, 1.0], 2, 1, 1.0, &mut out).unwrap();
        assert_eq!(out[0], 10.0, "first query must only see the first token");
        let w1 = 1.0 / (1.0 + (1.0f64).exp()); // softmax([1, 2]) weight of token 0
        let want = w1 * 10.0 + (1.0 - w1) * 20.0;
        assert!((out[1] as f64 - want).abs() < 1e-5, "{} vs {want}", out[1]);
        assert_eq!(c.bytes(), 16);
        assert!(c.attend(2, &[1.0], 1, 1, 1.0, &mut [0.0]).is_err());
        assert!(c.attend(1, &[1.0; 3], 3, 1, 1.0, &mut [0.0; 3]).is_err());
    }
}
