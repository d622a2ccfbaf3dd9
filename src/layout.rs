//! The expanded (interleaved) sequence of text and summary slots (spec
//! sections 1 and 3): where every token sits, what kind it is, its RoPE
//! position, and the helpers that move tensors between text order and slot
//! order.
//!
//! A block is `C` text slots followed by `S` summary slots; the trailing
//! partial chunk (if `n % C != 0`) has text slots only. Everything is computed
//! in closed form from `(config, n)`, so a `KsaLayout` is small and cheap to copy.

use crate::check::{check_eq, check_same_device, check_same_dtype, dims3};
use crate::config::{KsaConfig, SummaryPositions, TextPositions};
use crate::{Error, Result};
use candle_core::{Device, Tensor};

/// What occupies a slot of the expanded sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SlotKind {
    /// Text token number `token` (0-based index into the original text).
    Text { token: usize },
    /// Summary `index` (`0..S`) of chunk `chunk`.
    Summary { chunk: usize, index: usize },
}

impl SlotKind {
    /// Whether this is a text slot.
    pub fn is_text(self) -> bool {
        matches!(self, SlotKind::Text { .. })
    }
}

/// The expanded layout of `n` text tokens under one [`KsaConfig`].
///
/// `n = 0` gives a valid, empty layout (no slots); attention over it returns
/// empty outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KsaLayout {
    config: KsaConfig,
    text_len: usize,
    len: usize,
}

impl KsaLayout {
    /// The layout of `text_len` text tokens. Fails only if the expanded length
    /// `N = n + S*floor(n/C)` would not fit in `u32` (the kernels' index type).
    pub fn new(config: KsaConfig, text_len: usize) -> Result<Self> {
        let len = (text_len / config.chunk_size())
            .checked_mul(config.summaries())
            .and_then(|s| s.checked_add(text_len))
            .filter(|&len| len <= u32::MAX as usize)
            .ok_or_else(|| {
                Error::LayoutTooLarge(format!(
                    "{text_len} text tokens with C = {}, S = {} give more than {} slots",
                    config.chunk_size(),
                    config.summaries(),
                    u32::MAX
                ))
            })?;
        Ok(Self {
            config,
            text_len,
            len,
        })
    }

    /// The same layout with another window `W` (hybrid models give each layer its own).
    pub fn with_window(&self, window: usize) -> Self {
        Self {
            config: self.config.with_window(window),
            ..*self
        }
    }

    /// The configuration this layout was built from.
    pub fn config(&self) -> &KsaConfig {
        &self.config
    }
    /// `n`: number of text tokens.
    pub fn text_len(&self) -> usize {
        self.text_len
    }
    /// `N = n + S*floor(n/C)`: number of slots in the expanded sequence.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the layout has no slots (`n = 0`).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Number of complete chunks, `floor(n/C)`: the chunks that have summaries.
    pub fn full_chunks(&self) -> usize {
        self.text_len / self.config.chunk_size()
    }
    /// Number of chunks including a partial tail, `ceil(n/C)`.
    pub fn chunks(&self) -> usize {
        self.text_len.div_ceil(self.config.chunk_size())
    }
    /// Number of summary slots, `S*floor(n/C)`.
    pub fn summary_len(&self) -> usize {
        self.len - self.text_len
    }

    /// [`Error::LayoutLength`] unless `got` (the slot dimension of the input
    /// `name`) is `N`.
    pub(crate) fn check_len(&self, name: &'static str, got: usize) -> Result<()> {
        crate::mask::Mask::Ksa(*self).check_len(name, got)
    }

    /// Slot of text token `t`, or `None` if `t >= n`.
    pub fn text_slot(&self, t: usize) -> Option<usize> {
        let c = self.config.chunk_size();
        (t < self.text_len).then(|| (t / c) * self.config.block_size() + t % c)
    }

    /// Slot of summary `j` of chunk `chunk`, or `None` if that summary does not
    /// exist (`j >= S` or the chunk is not complete).
    pub fn summary_slot(&self, chunk: usize, j: usize) -> Option<usize> {
        (j < self.config.summaries() && chunk < self.full_chunks())
            .then(|| chunk * self.config.block_size() + self.config.chunk_size() + j)
    }

    /// Slot of the `s`-th summary in chunk-major order (`s = chunk*S + j`), the
    /// order of [`KsaLayout::summary_slots`] and of gathered summary K/V.
    pub fn summary_slot_by_index(&self, s: usize) -> Option<usize> {
        let sn = self.config.summaries();
        self.summary_slot(s / sn, s % sn)
    }

    /// What occupies `slot`, or `None` if `slot >= N`.
    pub fn slot_kind(&self, slot: usize) -> Option<SlotKind> {
        if slot >= self.len {
            return None;
        }
        let (c, b) = (self.config.chunk_size(), self.config.block_size());
        let (chunk, r) = (slot / b, slot % b);
        Some(if r < c {
            SlotKind::Text {
                token: chunk * c + r,
            }
        } else {
            SlotKind::Summary {
                chunk,
                index: r - c,
            }
        })
    }

    /// The chunk a slot belongs to (its text chunk, or the chunk it summarizes).
    pub fn chunk_of(&self, slot: usize) -> Option<usize> {
        (slot < self.len).then(|| slot / self.config.block_size())
    }

    /// RoPE position id of `slot` under the config's schemes (docs/spec.md section 3),
    /// or `None` if `slot >= N`.
    pub fn position_id(&self, slot: usize) -> Option<u32> {
        let c = self.config.chunk_size();
        let pos = match self.slot_kind(slot)? {
            SlotKind::Text { token } => match self.config.text_positions() {
                TextPositions::Origin => token,
                TextPositions::InnerChunk => token % c,
            },
            SlotKind::Summary { chunk, index } => {
                // Summaries exist only after complete chunks, so the chunk's text
                // length L is always C and its start is chunk*C.
                let (start, s) = (chunk * c, self.config.summaries());
                match self.config.summary_positions() {
                    SummaryPositions::LastChunkSliceRight => {
                        start + (((index + 1) * c) / s).max(1) - 1
                    }
                    SummaryPositions::LastChunkSliceLeft => start + ((index * c) / s).max(1) - 1,
                    SummaryPositions::Zeros => 0,
                }
            }
        };
        // Every position is below n <= N <= u32::MAX (checked in `new`).
        Some(pos as u32)
    }

    /// Position ids of all `N` slots, in slot order.
    pub fn position_ids(&self) -> Vec<u32> {
        (0..self.len)
            .map(|s| self.position_id(s).expect("slot < N"))
            .collect()
    }

    /// Slots of the text tokens, in text order (length `n`).
    pub fn text_slots(&self) -> Vec<u32> {
        (0..self.text_len)
            .map(|t| self.text_slot(t).expect("t < n") as u32)
            .collect()
    }

    /// Slots of the summaries in chunk-major order (length `S*floor(n/C)`):
    /// gathering K/V with it makes every chunk's summaries one contiguous run.
    pub fn summary_slots(&self) -> Vec<u32> {
        (0..self.summary_len())
            .map(|s| self.summary_slot_by_index(s).expect("s < summary_len") as u32)
            .collect()
    }

    /// Position ids as a `u32` tensor of shape `[N]`.
    pub fn position_ids_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(self.position_ids(), self.len, device)?)
    }

    /// Interleaves text hidden states `[b, n, d]` with the summary embeddings
    /// `[S, d]` (the same `S` rows after every complete chunk) into `[b, N, d]`.
    pub fn interleave(&self, hidden: &Tensor, summaries: &Tensor) -> Result<Tensor> {
        let (b, n, d) = dims3(hidden, "hidden", "[batch, text_len, dim]")?;
        let (s, ds) = match summaries.dims() {
            &[s, ds] => (s, ds),
            got => {
                return Err(Error::Rank {
                    name: "summaries",
                    expected: 2,
                    layout: "[S, dim]",
                    got: got.to_vec(),
                })
            }
        };
        check_eq("text length", "hidden", n, "layout", self.text_len)?;
        check_eq(
            "summaries per chunk",
            "summaries",
            s,
            "layout",
            self.config.summaries(),
        )?;
        check_eq("hidden size", "hidden", d, "summaries", ds)?;
        check_same_dtype("hidden", hidden, "summaries", summaries)?;
        check_same_device("hidden", hidden, "summaries", summaries)?;
        if self.is_empty() {
            return Ok(Tensor::zeros((b, 0, d), hidden.dtype(), hidden.device())?);
        }
        // Slot i takes row idx[i] of [hidden ; summaries]: text t -> t, summary j -> n + j.
        let idx: Vec<u32> = (0..self.len)
            .map(|slot| match self.slot_kind(slot).expect("slot < N") {
                SlotKind::Text { token } => token as u32,
                SlotKind::Summary { index, .. } => (n + index) as u32,
            })
            .collect();
        let idx = Tensor::from_vec(idx, self.len, hidden.device())?;
        // Any strided view is valid input; candle's cat and index_select want rows.
        let summaries = summaries.unsqueeze(0)?.broadcast_as((b, s, d))?;
        let contiguous = crate::check::contiguous;
        let rows = Tensor::cat(&[&contiguous(hidden)?, &contiguous(&summaries)?], 1)?;
        Ok(rows.index_select(&idx, 1)?)
    }

    /// The text slots of `x` along `dim` (which must have size `N`), in text order.
    pub fn take_text(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        self.take_slots(x, dim, self.text_slots(), "x")
    }

    /// The summary slots of `x` along `dim` (size `N`), in chunk-major order.
    pub fn take_summaries(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        self.take_slots(x, dim, self.summary_slots(), "x")
    }

    fn take_slots(
        &self,
        x: &Tensor,
        dim: usize,
        slots: Vec<u32>,
        name: &'static str,
    ) -> Result<Tensor> {
        let dims = x.dims();
        if dim >= dims.len() {
            return Err(Error::Rank {
                name,
                expected: dim + 1,
                layout: "at least dim + 1 dimensions",
                got: dims.to_vec(),
            });
        }
        self.check_len(name, dims[dim])?;
        let count = slots.len();
        if count == 0 {
            let mut shape = dims.to_vec();
            shape[dim] = 0;
            return Ok(Tensor::zeros(shape, x.dtype(), x.device())?);
        }
        let idx = Tensor::from_vec(slots, count, x.device())?;
        // Any strided view is valid input; candle's index_select wants rows.
        Ok(crate::check::contiguous(x)?.index_select(&idx, dim)?)
    }
}
