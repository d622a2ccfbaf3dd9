//! Who may attend to whom (docs/spec.md section 2), as a predicate, as closed-form
//! key ranges for fast paths, as a dense tensor for small sizes, and as exact
//! pair counts for honest FLOP figures.
//!
//! For a text token of chunk `c`, with `w0 = max(0, c - W)`: the summaries of
//! chunks `[0, w0)`, the text of chunks `[w0, c)`, and its own chunk's text
//! causally. For summary `j` of chunk `c`: the `C` text tokens of chunk `c`
//! and summaries `0..=j` of chunk `c`.
//!
//! The [`KsaConfig::with_summary_reads`](crate::KsaConfig::with_summary_reads)
//! ablation drops the text -> summary pairs and nothing else; every rule here
//! honours it, so the fast paths, the backward and the pair counts follow.

use crate::layout::{KsaLayout, SlotKind};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::ops::Range;

/// The keys one query may attend to, as two dense ranges in *gathered*
/// coordinates: summaries in chunk-major order (`s = chunk*S + j`, the order
/// of [`KsaLayout::summary_slots`]) and text tokens in text order. Gathering K/V
/// this way turns the interleaved KSA mask into a prefix of the summary list
/// plus one causal run of text, which is what every fast path iterates over.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyRanges {
    /// Allowed summaries, as indices into the chunk-major summary list.
    pub summaries: Range<usize>,
    /// Allowed text tokens, as text indices.
    pub text: Range<usize>,
}

impl KeyRanges {
    /// Number of allowed keys.
    pub fn len(&self) -> usize {
        self.summaries.len() + self.text.len()
    }
    /// Whether no key is allowed (never true for a query inside a layout).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Exact number of allowed (query, key) pairs, split by query kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PairCounts {
    /// Pairs whose query is a text slot.
    pub text_queries: u64,
    /// Pairs whose query is a summary slot.
    pub summary_queries: u64,
}

impl PairCounts {
    /// All allowed pairs: the `N x N` dense mask's sum.
    pub fn total(&self) -> u64 {
        self.text_queries + self.summary_queries
    }
}

/// Which keys each query row may see: the one mask kind of every path (the
/// op, the CPU tile schedule, the CUDA launches). Kernel plumbing: users
/// call [`crate::attention`] or [`crate::causal_attention`].
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mask {
    /// The KSA mask of a layout; rows are its slots.
    Ksa(KsaLayout),
    /// Plain causal attention over `len` positions: row `i` sees `0..=i`.
    Causal {
        /// Number of positions.
        len: usize,
    },
}

impl Mask {
    /// Number of rows (queries = keys).
    pub fn len(&self) -> usize {
        match self {
            Mask::Ksa(layout) => layout.len(),
            Mask::Causal { len } => *len,
        }
    }
    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The KSA layout, or `None` for causal attention.
    pub fn layout(&self) -> Option<&KsaLayout> {
        match self {
            Mask::Ksa(layout) => Some(layout),
            Mask::Causal { .. } => None,
        }
    }
    /// Number of text rows (KSA: `n`; causal: every row).
    pub fn text_len(&self) -> usize {
        match self {
            Mask::Ksa(layout) => layout.text_len(),
            Mask::Causal { len } => *len,
        }
    }
    /// Number of summary rows (`S*floor(n/C)` under KSA, 0 when causal).
    pub fn summary_len(&self) -> usize {
        self.len() - self.text_len()
    }
    /// [`Error::LayoutLength`] unless `got` (the row dimension of the input
    /// `name`) is [`Mask::len`].
    pub(crate) fn check_len(&self, name: &'static str, got: usize) -> Result<()> {
        if got != self.len() {
            return Err(Error::LayoutLength {
                name,
                expected: self.len(),
                got,
                text_tokens: self.text_len(),
            });
        }
        Ok(())
    }
    /// The gathered coordinates of this mask's rows.
    pub fn gathered(&self) -> Gathered {
        Gathered { mask: *self }
    }
}

/// Which of the two gathered key lists a key index belongs to.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeySpace {
    /// The chunk-major summary list (`s = chunk*S + j`).
    Summary,
    /// Text tokens in text order (for causal attention: all positions).
    Text,
}

/// The gathered row order of a [`Mask`], the one order in which every fast
/// path (CPU and CUDA) stores a head's K/V: the summaries chunk-major first
/// (row `g < summary_len` is summary `g = chunk*S + j`), then the text in text
/// order (row `summary_len + t` is text token `t`). Under causal attention
/// there are no summaries and row `g` is position `g`. In these coordinates
/// every query's keys are two dense ranges ([`KeyRanges`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Gathered {
    mask: Mask,
}

impl Gathered {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.mask.len()
    }
    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.mask.is_empty()
    }
    /// The row of key `key` of `space`.
    pub fn row(&self, space: KeySpace, key: usize) -> usize {
        match space {
            KeySpace::Summary => key,
            KeySpace::Text => self.mask.summary_len() + key,
        }
    }
    /// The slot of gathered row `g` (`None` if `g >= len`).
    pub fn slot(&self, g: usize) -> Option<usize> {
        match &self.mask {
            Mask::Ksa(layout) => {
                let ns = layout.summary_len();
                if g < ns {
                    layout.summary_slot_by_index(g)
                } else {
                    layout.text_slot(g - ns)
                }
            }
            Mask::Causal { len } => (g < *len).then_some(g),
        }
    }
    /// The slot of every gathered row, in gathered order.
    pub fn slots(&self) -> Vec<u32> {
        match &self.mask {
            Mask::Ksa(layout) => {
                let mut slots = layout.summary_slots();
                slots.extend(layout.text_slots());
                slots
            }
            Mask::Causal { len } => (0..*len as u32).collect(),
        }
    }
    /// The allowed keys of query row `g` as gathered rows: `[summaries,
    /// text]`, either possibly empty (both empty for `g >= len`). The mask
    /// rules themselves live in [`KsaLayout::key_ranges`] alone.
    pub fn keys(&self, g: usize) -> [Range<usize>; 2] {
        let ns = self.mask.summary_len();
        let ranges = match &self.mask {
            Mask::Ksa(layout) => self.slot(g).and_then(|slot| layout.key_ranges(slot)),
            Mask::Causal { len } => (g < *len).then(|| KeyRanges {
                summaries: 0..0,
                text: 0..g + 1,
            }),
        };
        match ranges {
            Some(r) => [r.summaries, ns + r.text.start..ns + r.text.end],
            None => [0..0, 0..0],
        }
    }
    /// Whether query row `qg` may attend to key row `kg` (both gathered).
    pub fn allowed(&self, qg: usize, kg: usize) -> bool {
        self.keys(qg).iter().any(|r| r.contains(&kg))
    }
}

/// The largest `N` for which [`KsaLayout::dense_mask`] builds an `N x N` tensor.
pub const DENSE_MASK_MAX_LEN: usize = 16_384;

impl KsaLayout {
    /// First chunk whose raw text a text token of chunk `chunk` still sees:
    /// `max(0, chunk - W)`. Older chunks are visible through summaries only.
    pub fn window_start(&self, chunk: usize) -> usize {
        chunk.saturating_sub(self.config().window())
    }

    /// Whether the query in `query_slot` may attend to the key in `key_slot`.
    /// Slots outside the layout attend to nothing and are seen by nothing.
    pub fn can_attend(&self, query_slot: usize, key_slot: usize) -> bool {
        let (Some(q), Some(k)) = (self.slot_kind(query_slot), self.slot_kind(key_slot)) else {
            return false;
        };
        let c = self.config().chunk_size();
        match q {
            SlotKind::Text { token } => {
                let chunk = token / c;
                let w0 = self.window_start(chunk);
                match k {
                    SlotKind::Summary { chunk: kc, .. } => self.config().summary_reads() && kc < w0,
                    SlotKind::Text { token: kt } => kt / c >= w0 && kt <= token,
                }
            }
            SlotKind::Summary { chunk, index } => match k {
                SlotKind::Text { token: kt } => kt / c == chunk,
                SlotKind::Summary {
                    chunk: kc,
                    index: kj,
                } => kc == chunk && kj <= index,
            },
        }
    }

    /// The keys of `query_slot` in closed form, or `None` if the slot is
    /// outside the layout. See [`KeyRanges`] for the coordinates.
    pub fn key_ranges(&self, query_slot: usize) -> Option<KeyRanges> {
        let (c, s) = (self.config().chunk_size(), self.config().summaries());
        Some(match self.slot_kind(query_slot)? {
            SlotKind::Text { token } => {
                let w0 = self.window_start(token / c);
                let old_summaries = if self.config().summary_reads() {
                    w0 * s
                } else {
                    0
                };
                KeyRanges {
                    summaries: 0..old_summaries,
                    text: w0 * c..token + 1,
                }
            }
            SlotKind::Summary { chunk, index } => KeyRanges {
                summaries: chunk * s..chunk * s + index + 1,
                text: chunk * c..chunk * c + c,
            },
        })
    }

    /// Calls `f` with the allowed key slots of `query_slot` as maximal runs of
    /// consecutive slots: one run per chunk touched (old summaries first,
    /// then window and own-chunk text). Nothing for a slot outside the layout.
    /// This is the mask in slot coordinates, for code that reads K/V in slot
    /// order without gathering.
    pub fn for_each_key_run(&self, query_slot: usize, mut f: impl FnMut(Range<usize>)) {
        let Some(r) = self.key_ranges(query_slot) else {
            return;
        };
        let (c, s, b) = (
            self.config().chunk_size(),
            self.config().summaries(),
            self.config().block_size(),
        );
        // Split a gathered range into per-chunk pieces, each contiguous in slots.
        let mut runs = |range: Range<usize>, per_chunk: usize, offset: usize| {
            let mut i = range.start;
            while i < range.end {
                let chunk = i / per_chunk;
                let end = range.end.min((chunk + 1) * per_chunk);
                let first = chunk * b + offset + (i - chunk * per_chunk);
                f(first..first + (end - i));
                i = end;
            }
        };
        runs(r.summaries, s, c);
        runs(r.text, c, 0);
    }

    /// The allowed key slots of `query_slot`, ascending (empty outside the layout).
    pub fn allowed_keys(&self, query_slot: usize) -> Vec<usize> {
        let Some(r) = self.key_ranges(query_slot) else {
            return Vec::new();
        };
        let mut keys: Vec<usize> = r
            .summaries
            .map(|i| {
                self.summary_slot_by_index(i)
                    .expect("summary index in layout")
            })
            .chain(
                r.text
                    .map(|t| self.text_slot(t).expect("text index in layout")),
            )
            .collect();
        keys.sort_unstable();
        keys
    }

    /// The mask as a dense `u8` tensor `[N, N]` (1 = allowed), for tests and
    /// for comparing with other frameworks. Refuses `N > DENSE_MASK_MAX_LEN`.
    pub fn dense_mask(&self, device: &Device) -> Result<Tensor> {
        let n = self.len();
        if n > DENSE_MASK_MAX_LEN {
            return Err(Error::TooLarge {
                what: "dense mask length",
                got: n,
                limit: DENSE_MASK_MAX_LEN,
            });
        }
        let mut mask = vec![0u8; n * n];
        for q in 0..n {
            for k in self.allowed_keys(q) {
                mask[q * n + k] = 1;
            }
        }
        Ok(Tensor::from_vec(mask, (n, n), device)?)
    }

    /// Exact number of allowed (query, key) pairs; attention FLOPs are
    /// `4 * head_dim * pairs` per head.
    pub fn pair_counts(&self) -> PairCounts {
        let mut counts = PairCounts::default();
        for slot in 0..self.len() {
            let keys = self.key_ranges(slot).expect("slot < N").len() as u64;
            match self.slot_kind(slot).expect("slot < N") {
                SlotKind::Text { .. } => counts.text_queries += keys,
                SlotKind::Summary { .. } => counts.summary_queries += keys,
            }
        }
        counts
    }

    /// Pairs of plain causal attention over the `n` text tokens alone,
    /// `n(n+1)/2`: the full-attention baseline of every comparison.
    pub fn causal_text_pairs(&self) -> u64 {
        let n = self.text_len() as u64;
        n * (n + 1) / 2
    }
}
