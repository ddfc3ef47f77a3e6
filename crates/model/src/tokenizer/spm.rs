//! SentencePiece-style BPE over token scores (`tokenizer.ggml.model = "llama"`): spaces become
//! `▁`, adjacent pieces merge best-score-first while the concatenation is a token, and pieces
//! that are not tokens fall back to `<0xXX>` byte tokens.

use super::Vocab;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// The SentencePiece word-boundary character.
pub(crate) const SPACE: char = '\u{2581}';

#[derive(Clone, Copy)]
struct Sym {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// Max-heap order: higher score first, then the leftmost pair.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

/// The SentencePiece BPE model state.
pub(crate) struct Spm {
    /// Token id of `<0xXX>` for each byte.
    byte_token: [Option<u32>; 256],
    /// Prepend a space to the text (and to text following a special token).
    pub(crate) add_space_prefix: bool,
}

impl Spm {
    pub(crate) fn new(vocab: &Vocab, add_space_prefix: bool) -> Self {
        let mut byte_token = [None; 256];
        for (b, slot) in byte_token.iter_mut().enumerate() {
            *slot = vocab.id(&format!("<0x{b:02X}>"));
        }
        Spm {
            byte_token,
            add_space_prefix,
        }
    }

    /// Encode one fragment of plain text (spaces already escaped to `▁`).
    pub(crate) fn encode(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let mut syms: Vec<Sym> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            syms.push(Sym {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: Some(i + 1),
            });
        }
        if let Some(last) = syms.last_mut() {
            last.next = None;
        }
        let mut heap = BinaryHeap::new();
        let try_add =
            |l: Option<usize>, r: Option<usize>, syms: &[Sym], heap: &mut BinaryHeap<Bigram>| {
                let (Some(l), Some(r)) = (l, r) else { return };
                let s = &text[syms[l].start..syms[l].start + syms[l].len + syms[r].len];
                if let Some(id) = vocab.id(s) {
                    heap.push(Bigram {
                        score: vocab.scores[id as usize],
                        left: l,
                        right: r,
                        size: s.len(),
                    });
                }
            };
        for i in 1..syms.len() {
            try_add(Some(i - 1), Some(i), &syms, &mut heap);
        }
        while let Some(bg) = heap.pop() {
            let (l, r) = (syms[bg.left], syms[bg.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != bg.size {
                continue;
            }
            syms[bg.left].len += r.len;
            syms[bg.right].len = 0;
            syms[bg.left].next = r.next;
            if let Some(n) = r.next {
                syms[n].prev = Some(bg.left);
            }
            try_add(l.prev, Some(bg.left), &syms, &mut heap);
            try_add(Some(bg.left), r.next, &syms, &mut heap);
        }
        let mut i = Some(0);
        while let Some(k) = i {
            self.emit(
                vocab,
                &text[syms[k].start..syms[k].start + syms[k].len],
                out,
            );
            i = syms[k].next;
        }
    }

    /// Emit a final piece: its token, or its bytes as `<0xXX>` tokens. (Pieces longer than one
    /// character only exist when they are tokens, since merges require that.)
    fn emit(&self, vocab: &Vocab, s: &str, out: &mut Vec<u32>) {
        if let Some(id) = vocab.id(s) {
            out.push(id);
            return;
        }
        for b in s.bytes() {
            if let Some(id) = self.byte_token[b as usize].or(vocab.unk) {
                out.push(id);
            }
        }
    }

    /// The byte a `<0xXX>` token stands for.
    pub(crate) fn byte_of(text: &str) -> Option<u8> {
        let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
        if hex.len() != 2 {
            return None;
        }
        u8::from_str_radix(hex, 16).ok()
    }
}
