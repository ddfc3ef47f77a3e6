//! Dense f32 weights in one huge-page arena, for decode.
//!
//! Decode streams every weight once per token, so it runs at memory bandwidth. On 4 KiB pages
//! every 4 KiB of weights is a new TLB entry and a new page for the hardware prefetchers to
//! train on (they stop at page boundaries); on 2 MiB transparent huge pages the same stream reads
//! faster (docs/benchmarks.md, "f32 decode GEMV"). Separate `Vec`s of 0.4-3.5 MB, as the
//! loaders return them, sit in separate malloc mappings at 4 KiB alignment, so even with a
//! huge-page hint few whole 2 MiB pages fit inside them. [`pack`] copies the dense weights of
//! many linear layers into one anonymous mapping, 2 MiB-aligned and advised `MADV_HUGEPAGE`
//! before its first touch, in the order the forward pass reads them, so the kernel backs it
//! with huge pages as it is filled and decode reads one sequential stream.
//!
//! Everything here is safe code: the mapping is created and advised through `memmap2`, filled
//! as bytes and read back through `bytemuck` (which checks the f32 alignment).

use memmap2::MmapMut;
use std::ops::Deref;
use std::sync::Arc;

use crate::llama::Layer;

/// Transparent huge page size on x86-64 / aarch64 (4 KiB base pages).
const HUGE: usize = 2 << 20;
/// Each matrix starts on a cache line.
const ALIGN: usize = 64;
/// Bytes per value.
const F32: usize = std::mem::size_of::<f32>();

/// A dense f32 buffer: an owned `Vec` or a read-only slice of a shared arena (see [`pack`]).
/// Dereferences to `[f32]`; cloning copies the values into a `Vec`.
pub enum DenseF32 {
    /// Owned values.
    Heap(Vec<f32>),
    /// `len` values at byte offset `off` of a read-only arena shared with other buffers.
    Arena {
        /// The arena (kept alive while any of its slices lives).
        map: Arc<MmapMut>,
        /// Byte offset of the first value (a multiple of 64).
        off: usize,
        /// Number of values.
        len: usize,
    },
}

impl DenseF32 {
    /// True when the values live in an arena.
    pub fn in_arena(&self) -> bool {
        matches!(self, DenseF32::Arena { .. })
    }
}

impl Deref for DenseF32 {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            DenseF32::Heap(v) => v,
            DenseF32::Arena { map, off, len } => {
                bytemuck::cast_slice(&map[*off..*off + *len * F32])
            }
        }
    }
}

impl Clone for DenseF32 {
    fn clone(&self) -> Self {
        DenseF32::Heap(self.to_vec())
    }
}

impl std::fmt::Debug for DenseF32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.in_arena() { "arena" } else { "heap" };
        write!(f, "DenseF32({kind}, {} values)", self.len())
    }
}

impl From<Vec<f32>> for DenseF32 {
    fn from(v: Vec<f32>) -> Self {
        DenseF32::Heap(v)
    }
}

/// Copy every buffer of `bufs` that is still on the heap into one new arena, in the order
/// given, and point it there; each `Vec` is freed as soon as it is copied, so the resident
/// memory grows by at most one buffer. Buffers already in an arena are left alone. Returns the
/// arena's bytes in use (the values, each buffer padded to 64 bytes; 0 when nothing moved).
/// The values are bit-identical afterwards.
///
/// The arena is an anonymous mapping rounded up to whole 2 MiB pages, its start aligned to
/// 2 MiB and advised `MADV_HUGEPAGE` before it is written, so that (with transparent huge
/// pages in `madvise` or `always` mode) the kernel backs it with huge pages as it is filled.
/// The advice is a hint: where it fails the arena stays on 4 KiB pages. Fails only when the
/// mapping cannot be created; then nothing has moved.
pub fn pack<'a>(bufs: impl IntoIterator<Item = &'a mut DenseF32>) -> std::io::Result<usize> {
    let mut bufs: Vec<&mut DenseF32> = bufs.into_iter().filter(|b| !b.in_arena()).collect();
    // (byte offset from the arena start, values) of each buffer.
    let mut place = Vec::with_capacity(bufs.len());
    let mut total = 0usize;
    for b in &bufs {
        place.push((total, b.len()));
        total = (total + b.len() * F32).next_multiple_of(ALIGN);
    }
    if total == 0 {
        return Ok(0);
    }
    let size = total.next_multiple_of(HUGE);
    // One spare huge page so that the start can be moved to a 2 MiB boundary.
    let mut map = MmapMut::map_anon(size + HUGE)?;
    let base = map.as_ptr() as usize;
    let start = base.next_multiple_of(HUGE) - base;
    // A hint (THP may be disabled or `never`, or the OS may have no such advice): failure only
    // leaves the arena on 4 KiB pages.
    #[cfg(target_os = "linux")]
    let _ = map.advise_range(memmap2::Advice::HugePage, start, size);
    for (b, &(off, len)) in bufs.iter_mut().zip(&place) {
        let dst = &mut map[start + off..start + off + len * F32];
        dst.copy_from_slice(bytemuck::cast_slice(&b[..]));
        // Free the heap copy now (the slice is installed below, once the arena is shared).
        **b = DenseF32::Heap(Vec::new());
    }
    let map = Arc::new(map);
    for (b, &(off, len)) in bufs.iter_mut().zip(&place) {
        **b = DenseF32::Arena {
            map: Arc::clone(&map),
            off: start + off,
            len,
        };
    }
    Ok(total)
}

/// `v` moved to a fresh allocation that is advised onto huge pages before it is written (see
/// [`lowbit_kernels::gemv_f32::advise_huge_pages_before_write`]), then given the usual
/// `MADV_HUGEPAGE` + `MADV_COLLAPSE` hint: for a large buffer that stays a `Vec` (the tied
/// embedding / head), so that its huge-page backing does not depend on a collapse that can fail
/// under memory pressure. Buffers under 4 MiB are returned as they are. Values unchanged.
pub fn huge_page_vec(v: Vec<f32>) -> Vec<f32> {
    if v.len() * F32 < 2 * HUGE {
        return v;
    }
    let mut out: Vec<f32> = Vec::with_capacity(v.len());
    lowbit_kernels::gemv_f32::advise_huge_pages_before_write(out.spare_capacity_mut());
    out.extend_from_slice(&v);
    drop(v);
    lowbit_kernels::gemv_f32::advise_huge_pages(&out);
    out
}

impl crate::Model {
    /// Move the dense f32 weights of every linear layer (and an untied `lm_head`) into one
    /// huge-page arena, in the order decode reads them (layer by layer: q, k, v, o, gate, up,
    /// down; then the head), so that a decoded token streams them as one sequential,
    /// huge-page-backed run (see [`pack`]). Values are unchanged; quantized layers, and layers
    /// already in an arena, are left alone. The loaders call this; a layer replaced later
    /// (quantized, or [`crate::Linear::set_dense`]) leaves its slice unused until the whole
    /// arena is dropped with its last slice. Returns the arena's bytes (0 when nothing moved).
    pub fn pack_dense_weights(&mut self) -> std::io::Result<usize> {
        let mut bufs: Vec<&mut DenseF32> = Vec::new();
        for layer in &mut self.layers {
            let Layer {
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                gate_proj,
                up_proj,
                down_proj,
                ..
            } = layer;
            for l in [
                q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj,
            ] {
                bufs.extend(l.dense_storage_mut());
            }
        }
        if let Some(h) = &mut self.lm_head {
            bufs.extend(h.dense_storage_mut());
        }
        pack(bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        crate::test_util::lcg_values(n, seed)
    }

    /// Buffers of ragged lengths (not multiples of 16 values) keep their values bit for bit,
    /// start 64-byte aligned, share one arena whose first buffer starts on a 2 MiB boundary,
    /// and a second pack moves nothing.
    #[test]
    fn pack_keeps_values_and_layout() {
        let lens = [1usize, 17, 0, 300_001, 5, 1 << 20];
        let orig: Vec<Vec<f32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| data(n, i as u64))
            .collect();
        let mut bufs: Vec<DenseF32> = orig.iter().cloned().map(DenseF32::from).collect();
        let bytes = pack(bufs.iter_mut()).unwrap();
        let values: usize = lens.iter().sum();
        assert!(bytes >= values * 4 && bytes < values * 4 + 64 * lens.len());
        for (b, o) in bufs.iter().zip(&orig) {
            assert!(b.in_arena());
            assert_eq!(b.len(), o.len());
            assert!(b.iter().zip(o).all(|(x, y)| x.to_bits() == y.to_bits()));
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        }
        assert_eq!(bufs[0].as_ptr() as usize % HUGE, 0);
        assert_eq!(bufs[1].as_ptr() as usize - bufs[0].as_ptr() as usize, 64);
        assert_eq!(pack(bufs.iter_mut()).unwrap(), 0);
        let c = bufs[3].clone();
        assert!(!c.in_arena());
        assert_eq!(&c[..], &orig[3][..]);
        // The arena outlives the buffers it was packed with, as long as one slice remains.
        let last = bufs.pop().unwrap();
        drop(bufs);
        assert_eq!(&last[..], &orig[5][..]);
        let mut none: Vec<DenseF32> = Vec::new();
        assert_eq!(pack(none.iter_mut()).unwrap(), 0);
    }

    #[test]
    fn huge_page_vec_keeps_values() {
        for n in [0usize, 1000, (5 << 20) / 4 + 3] {
            let v = data(n, 9);
            let w = huge_page_vec(v.clone());
            assert!(
                v.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits()) && v.len() == w.len()
            );
        }
    }

    /// A loaded model's dense layers are in the arena, and packing changes no logit: the
    /// same model with its layers copied back to the heap gives bit-identical logits.
    #[test]
    fn packed_model_logits_are_unchanged() {
        use lowbit_kv_cache::F32Cache;
        let c = crate::test_util::tiny_llama(false, true);
        let packed = crate::weights::random_model(c.clone(), 7).unwrap();
        let mut heap = crate::weights::random_model(c.clone(), 7).unwrap();
        for name in heap.linear_names() {
            let l = heap.linear_mut(&name).unwrap();
            let w = l.weight_f32().to_vec();
            l.set_dense(w).unwrap();
            assert!(!l.dense_storage_mut().unwrap().in_arena());
            let p = packed.linear(&name).unwrap();
            assert!(matches!(p.weight(), crate::linear::Weight::Dense(d) if d.in_arena()));
        }
        let toks = [3u32, 1, 4, 1, 5];
        let mut ca = F32Cache::new(c.kv_shape());
        let mut cb = F32Cache::new(c.kv_shape());
        let a = packed.forward(&toks, &mut ca, crate::Logits::All).unwrap();
        let b = heap.forward(&toks, &mut cb, crate::Logits::All).unwrap();
        assert_eq!(a, b);
        let a = packed.forward(&[9], &mut ca, crate::Logits::Last).unwrap();
        let b = heap.forward(&[9], &mut cb, crate::Logits::Last).unwrap();
        assert_eq!(a, b);
    }
}
