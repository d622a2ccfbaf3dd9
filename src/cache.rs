//! [`KsaCache`]: the batched KV cache of incremental decoding (spec section 5),
//! and [`KsaCache::append`], which feeds new tokens (a prompt, a continued
//! prompt, or one decode token) for any subset of the batch and computes
//! exactly what a full forward over the whole text computes.
//!
//! Per sequence and KSA layer (window `W`) the cache holds:
//! * the text K/V of the window: tokens `[max(0, c - W)*C, n)` where
//!   `c = floor(n/C)` is the current chunk, i.e. the last `W` complete chunks
//!   plus the current partial one (at most `W*C + C - 1` rows, bounded by `n`);
//! * every summary's K/V (after RoPE), append-only, `S*floor(n/C)` rows.
//!
//! Bypass layers (`summary_layer_freq`) hold all text K/V and no summaries.
//! Each store keeps one contiguous run of rows per KV head ([`CacheStorage`]: f32
//! host buffers, or `[kv_heads, capacity, d]` tensors on the model's device),
//! so the keys of any new query are at most four contiguous runs per KV head:
//! old summaries and window text from the cache, and the step's own new
//! summaries and text.
//! Text leaving the window is dropped logically at once and reclaimed by
//! moving the live rows to the front when the buffer is full or half dead
//! (amortized O(1) per row), which keeps the window contiguous.
//!
//! A step validates everything, computes all layers while only reading the
//! cache, and commits the new K/V at the very end: a failed step leaves the
//! cache exactly as it was.

use crate::attention::KvRows;
use crate::cpu::decode::{attend, KvSlice};
use crate::layer::replace_slots;
use crate::layout::{KsaLayout, SlotKind};
use crate::model::Qwen3Ksa;
use crate::model_config::LayerKind;
use crate::{AttentionOptions, Error, KsaConfig, Result};
use candle_core::{DType, Device, DeviceLocation, Tensor};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::Arc;

/// The model shape a cache is built for; a step with another model is an error.
#[derive(Debug, Clone, PartialEq)]
struct CacheSpec {
    ksa: KsaConfig,
    /// Kind and window of every layer.
    layers: Vec<(LayerKind, usize)>,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl CacheSpec {
    fn of(model: &Qwen3Ksa) -> Result<Self> {
        let c = model.config();
        Ok(Self {
            ksa: c.ksa_config()?,
            layers: c
                .layer_kinds
                .iter()
                .copied()
                .zip(c.windows.iter().copied())
                .collect(),
            q_heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        })
    }

    /// First text token layer `layer` still needs once a sequence holds `n`
    /// tokens: the start of the window of the current chunk (0 for bypass).
    fn window_first(&self, layer: usize, n: usize) -> usize {
        match self.layers[layer] {
            (LayerKind::Summary, w) => {
                let c = self.ksa.chunk_size();
                (n / c).saturating_sub(w) * c
            }
            (LayerKind::Bypass, _) => 0,
        }
    }
}

/// Where a [`KsaCache`] keeps its K/V, and so how it attends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStorage {
    /// f32 host buffers, one per KV head, attended on the CPU by
    /// [`crate::cpu::decode::attend`] on rayon. The default on the CPU, and for
    /// CUDA models the decode kernels cannot take (f32, head_dim other than
    /// 64 or 128): those copy every layer's new K/V to the host.
    Host,
    /// `[kv_heads, capacity, head_dim]` tensors on the model's device in the
    /// model's dtype, attended per query row over [`KvRows`] lists: by the
    /// CUDA decode kernels on CUDA (`crate::cuda::decode::decode_attention`,
    /// one launch per layer for the whole batch), by
    /// [`crate::cpu::decode::attend_rows`] elsewhere. The default for bf16/f16 CUDA
    /// models with head_dim 64 or 128.
    Tensors,
}

/// K and V of one store, `[kv_heads, rows, head_dim]`; the allocation holds
/// `capacity` rows. Which rows mean what is [`Rows`]' business: `Kv` only
/// allocates, copies and hands out row runs, so both storages share every
/// index computation.
#[derive(Debug, Clone)]
enum Kv {
    /// One f32 buffer per KV head (its `Vec` length is the rows written,
    /// its capacity the allocation).
    Host { k: Vec<Vec<f32>>, v: Vec<Vec<f32>> },
    /// `[kv_heads, capacity, d]` tensors, written in place. Clones of a cache
    /// share them (cloning is cheap and cannot fail) and hold the same
    /// `owner`; a shared buffer is copied before its first write.
    Tensor {
        k: Tensor,
        v: Tensor,
        owner: Arc<()>,
    },
}

impl Kv {
    fn host(heads: usize, d: usize, rows: usize) -> Self {
        let buf = || (0..heads).map(|_| Vec::with_capacity(rows * d)).collect();
        Kv::Host { k: buf(), v: buf() }
    }

    fn tensor(k: Tensor, v: Tensor) -> Self {
        Kv::Tensor {
            k,
            v,
            owner: Arc::new(()),
        }
    }

    /// Zeroed `[heads, rows, d]` tensors of `dtype` on `device`, at least one
    /// row: a zero-byte device allocation is not portable (`cuMemAlloc`
    /// rejects it).
    fn zeros(heads: usize, d: usize, rows: usize, dtype: DType, device: &Device) -> Result<Self> {
        let z = || Tensor::zeros((heads, rows.max(1), d), dtype, device);
        Ok(Kv::tensor(z()?, z()?))
    }

    /// Rows the allocation holds.
    fn capacity(&self, d: usize) -> usize {
        match self {
            Kv::Host { k, .. } => k.first().map_or(0, |b| b.capacity() / d.max(1)),
            Kv::Tensor { k, .. } => k.dims()[1],
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Kv::Host { k, v } => k
                .iter()
                .chain(v)
                .map(|b| b.capacity() * std::mem::size_of::<f32>())
                .sum(),
            Kv::Tensor { k, v, .. } => {
                (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()
            }
        }
    }

    /// Rows `rows` of KV head `head` (host storage).
    fn slice(&self, head: usize, rows: Range<usize>, d: usize) -> KvSlice<'_> {
        let Kv::Host { k, v } = self else {
            unreachable!("a cache's stores all have the cache's storage")
        };
        let r = rows.start * d..rows.end * d;
        KvSlice {
            k: &k[head][r.clone()],
            v: &v[head][r],
        }
    }

    /// Rows `rows` of every KV head (tensor storage).
    fn rows(&self, rows: Range<usize>) -> KvRows<'_> {
        let Kv::Tensor { k, v, .. } = self else {
            unreachable!("a cache's stores all have the cache's storage")
        };
        KvRows { k, v, rows }
    }

    /// Whether the first `len` rows (all rows written) are equal.
    fn same_rows(&self, other: &Self, len: usize) -> bool {
        match (self, other) {
            (Kv::Host { k, v }, Kv::Host { k: k2, v: v2 }) => k == k2 && v == v2,
            (Kv::Tensor { k, v, .. }, Kv::Tensor { k: k2, v: v2, .. }) => {
                let host = |t: &Tensor| -> Result<Vec<f32>> {
                    Ok(t.narrow(1, 0, len)?
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1()?)
                };
                [(k, k2), (v, v2)]
                    .iter()
                    .all(|(a, b)| matches!((host(a), host(b)), (Ok(a), Ok(b)) if a == b))
            }
            _ => false,
        }
    }

    /// Copies tensors shared with a clone of the cache before a write.
    fn own(&mut self) -> Result<()> {
        if let Kv::Tensor { k, v, owner } = self {
            if Arc::strong_count(owner) > 1 {
                *self = Kv::tensor(k.copy()?, v.copy()?);
            }
        }
        Ok(())
    }

    /// Writes rows `rows` of `src` (same storage) at row `at`, which is the
    /// number of rows written so far.
    fn write(&mut self, at: usize, src: &Kv, rows: Range<usize>, d: usize) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        self.own()?;
        match (self, src) {
            (Kv::Host { k, v }, Kv::Host { k: sk, v: sv }) => {
                for (dst, s) in k.iter_mut().zip(sk).chain(v.iter_mut().zip(sv)) {
                    debug_assert_eq!(dst.len(), at * d);
                    dst.extend_from_slice(&s[rows.start * d..rows.end * d]);
                }
            }
            (Kv::Tensor { k, v, .. }, Kv::Tensor { k: sk, v: sv, .. }) => {
                for (dst, s) in [(k, sk), (v, sv)] {
                    dst.slice_set(&s.narrow(1, rows.start, rows.len())?.contiguous()?, 1, at)?;
                }
            }
            _ => unreachable!("a cache's stores all have the cache's storage"),
        }
        Ok(())
    }

    /// Moves rows `dead..len` to the front.
    fn compact(&mut self, dead: usize, len: usize, d: usize) -> Result<()> {
        self.own()?;
        match self {
            Kv::Host { k, v } => {
                for b in k.iter_mut().chain(v.iter_mut()) {
                    b.drain(..dead * d);
                }
            }
            Kv::Tensor { k, v, .. } => {
                // Through a copy: source and destination overlap.
                for t in [k, v] {
                    t.slice_set(&t.narrow(1, dead, len - dead)?.force_contiguous()?, 1, 0)?;
                }
            }
        }
        Ok(())
    }

    /// Reallocates to `rows` rows, keeping the first `len`.
    fn grow(&mut self, len: usize, rows: usize, d: usize) -> Result<()> {
        match self {
            Kv::Host { k, v } => {
                for b in k.iter_mut().chain(v.iter_mut()) {
                    b.reserve_exact(rows * d - b.len());
                }
            }
            Kv::Tensor { k, .. } => {
                let (heads, dtype, device) = (k.dims()[0], k.dtype(), k.device().clone());
                let mut grown = Kv::zeros(heads, d, rows, dtype, &device)?;
                grown.write(0, self, 0..len, d)?;
                *self = grown;
            }
        }
        Ok(())
    }
}

/// K and V rows of one kind for one (layer, sequence). The first `dead` rows
/// are no longer visible and wait to be reclaimed; rows `dead..len` are live.
#[derive(Debug, Clone)]
struct Rows {
    kv: Kv,
    dead: usize,
    len: usize,
}

impl PartialEq for Rows {
    fn eq(&self, other: &Self) -> bool {
        self.dead == other.dead && self.len == other.len && self.kv.same_rows(&other.kv, self.len)
    }
}

impl Rows {
    fn new(kv: Kv) -> Self {
        Self {
            kv,
            dead: 0,
            len: 0,
        }
    }

    fn live(&self) -> usize {
        self.len - self.dead
    }

    /// Storage rows of live rows `rows` (0 = first live row).
    fn at(&self, rows: Range<usize>) -> Range<usize> {
        self.dead + rows.start..self.dead + rows.end
    }

    /// Makes room for `rows` live rows in all: drops dead rows first, then
    /// grows to exactly that (a prompt's rows are known before they come).
    fn reserve(&mut self, rows: usize, d: usize) -> Result<()> {
        if self.kv.capacity(d) < rows {
            self.compact(d)?;
            self.kv.grow(self.len, rows, d)?;
        }
        Ok(())
    }

    fn compact(&mut self, d: usize) -> Result<()> {
        if self.dead > 0 {
            self.kv.compact(self.dead, self.len, d)?;
        }
        self.len -= self.dead;
        self.dead = 0;
        Ok(())
    }

    /// Appends rows `rows` of `src` one by one; after each, `evict(row,
    /// live)` says how many of the oldest live rows leave. Dead rows are
    /// reclaimed when the buffer is full or half dead; a full buffer without
    /// dead rows grows by a quarter (amortized O(1), little slack). Rows
    /// between two such events are copied in one run.
    fn extend(
        &mut self,
        src: &Kv,
        rows: Range<usize>,
        d: usize,
        mut evict: impl FnMut(usize, usize) -> usize,
    ) -> Result<()> {
        // Source rows counted in `len` but not yet written.
        let mut run = rows.start..rows.start;
        for r in rows {
            let full = self.len + 1 > self.kv.capacity(d);
            let reclaim = self.dead > 0 && (full || self.dead >= self.live());
            if full || reclaim {
                self.kv.write(self.len - run.len(), src, run.clone(), d)?;
                run = r..r;
            }
            if reclaim {
                self.compact(d)?;
            }
            if self.len + 1 > self.kv.capacity(d) {
                let grow = (self.len / 4).max(16);
                self.kv.grow(self.len, self.len + grow, d)?;
            }
            run.end = r + 1;
            self.len += 1;
            self.dead += evict(r, self.live());
            debug_assert!(self.dead <= self.len);
        }
        self.kv.write(self.len - run.len(), src, run, d)
    }
}

/// One layer's stores for one sequence.
#[derive(Debug, Clone, PartialEq)]
struct LayerStore {
    text: Rows,
    summaries: Rows,
}

/// One sequence of the batch.
#[derive(Debug, Clone, PartialEq)]
struct Sequence {
    len: usize,
    layers: Vec<LayerStore>,
}

/// Which logits [`KsaCache::append`] returns for each sequence it fed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// Only the last new token's logits, `[1, V']` (what decoding needs; a
    /// long prompt's full `n x V'` logits would not fit).
    Last,
    /// Every new token's logits, `[m, V']`.
    All,
}

/// The batched KSA decode cache: per sequence (each with its own length) and
/// per layer, the window text K/V and the summary K/V; see the module docs.
///
/// K/V live in f32 host memory or in tensors on the model's device
/// ([`CacheStorage`]). Two caches compare equal when they hold the same rows in
/// the same buffers. Cloning is cheap for tensor storage: a clone shares the
/// tensors until either side writes.
#[derive(Debug, Clone, PartialEq)]
pub struct KsaCache {
    spec: CacheSpec,
    capacity: Option<usize>,
    storage: CacheStorage,
    /// Dtype and device of the model, which tensor storage must keep.
    place: (DType, DeviceLocation),
    seqs: Vec<Sequence>,
}

/// The new slots of one sequence in a step.
struct Plan {
    seq: usize,
    old: usize,
    new: usize,
    /// KsaLayout of the sequence after the step (window 0).
    layout: KsaLayout,
    /// Its rows in the packed step (all slots).
    rows: Range<usize>,
    /// Its rows among the packed text slots.
    text_rows: Range<usize>,
}

/// One sequence's new K/V of one layer, `[kv_heads, rows, d]` per kind, in
/// the cache's storage.
struct Staged {
    text: Kv,
    text_rows: usize,
    sums: Kv,
    sum_rows: usize,
}

/// Whether the CUDA decode kernels take this model (dtype and head_dim).
fn kernels_take(model: &Qwen3Ksa, dtype: DType) -> Result<()> {
    let op = "KsaCache tensor storage on CUDA (the decode kernels)";
    crate::cuda::launch::kernel_elem(op, dtype, model.config().head_dim).map(|_| ())
}

impl KsaCache {
    /// An empty cache for `batch` sequences of `model` that grows as needed
    /// (the window stores stop growing at `W*C + C` rows per layer).
    pub fn new(model: &Qwen3Ksa, batch: usize) -> Result<Self> {
        Self::with_storage(model, batch, None, Self::default_storage(model)?)
    }

    /// An empty cache for `batch` sequences of at most `max_tokens` text
    /// tokens each, with every buffer allocated up front: no step
    /// reallocates, and a step that would pass `max_tokens` is
    /// [`Error::CacheCapacity`].
    pub fn with_capacity(model: &Qwen3Ksa, batch: usize, max_tokens: usize) -> Result<Self> {
        Self::with_storage(
            model,
            batch,
            Some(max_tokens),
            Self::default_storage(model)?,
        )
    }

    /// The storage [`KsaCache::new`] and [`KsaCache::with_capacity`] pick:
    /// [`CacheStorage::Tensors`] for a CUDA model the decode kernels take (bf16 or
    /// f16, head_dim 64 or 128), else [`CacheStorage::Host`].
    pub fn default_storage(model: &Qwen3Ksa) -> Result<CacheStorage> {
        let table = model.summary_embeddings()?;
        Ok(
            if table.device().is_cuda() && kernels_take(model, table.dtype()).is_ok() {
                CacheStorage::Tensors
            } else {
                CacheStorage::Host
            },
        )
    }

    /// A cache with the given storage; `max_tokens` as in
    /// [`KsaCache::with_capacity`] (`None`: grow as needed). Tensor storage on
    /// CUDA needs what the decode kernels take: a bf16 or f16 model
    /// ([`Error::UnsupportedDType`]) with head_dim 64 or 128
    /// ([`Error::UnsupportedHeadDim`]); on other devices it takes any float
    /// dtype, which is how the tests run it without a GPU.
    pub fn with_storage(
        model: &Qwen3Ksa,
        batch: usize,
        max_tokens: Option<usize>,
        storage: CacheStorage,
    ) -> Result<Self> {
        let spec = CacheSpec::of(model)?;
        let table = model.summary_embeddings()?;
        let (dtype, device) = (table.dtype(), table.device().clone());
        if storage == CacheStorage::Tensors && device.is_cuda() {
            kernels_take(model, dtype)?;
        }
        let (c, s) = (spec.ksa.chunk_size(), spec.ksa.summaries());
        let (hkv, d) = (spec.kv_heads, spec.head_dim);
        let store = |rows: usize| -> Result<Rows> {
            Ok(Rows::new(match storage {
                CacheStorage::Host => Kv::host(hkv, d, rows),
                CacheStorage::Tensors => Kv::zeros(hkv, d, rows, dtype, &device)?,
            }))
        };
        let seqs = (0..batch)
            .map(|_| {
                let layers = spec
                    .layers
                    .iter()
                    .map(|&(kind, w)| {
                        let (text, sums) = match (max_tokens, kind) {
                            (None, _) => (0, 0),
                            (Some(n), LayerKind::Bypass) => (n, 0),
                            (Some(n), LayerKind::Summary) => {
                                (n.min(w.saturating_mul(c).saturating_add(c)), (n / c) * s)
                            }
                        };
                        Ok(LayerStore {
                            text: store(text)?,
                            summaries: store(sums)?,
                        })
                    })
                    .collect::<Result<_>>()?;
                Ok(Sequence { len: 0, layers })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            spec,
            capacity: max_tokens,
            storage,
            place: (dtype, device.location()),
            seqs,
        })
    }

    /// Where the K/V live.
    pub fn storage(&self) -> CacheStorage {
        self.storage
    }

    /// Number of sequences.
    pub fn batch_size(&self) -> usize {
        self.seqs.len()
    }

    /// Text tokens held for sequence `seq`.
    pub fn seq_len(&self, seq: usize) -> Result<usize> {
        self.seqs
            .get(seq)
            .map(|s| s.len)
            .ok_or(Error::UnknownSequence {
                index: seq,
                batch: self.seqs.len(),
            })
    }

    /// The fixed capacity in text tokens per sequence, if any.
    pub fn capacity(&self) -> Option<usize> {
        self.capacity
    }

    /// Bytes of K/V memory allocated (buffer capacities, live or not; f32 on
    /// the host, the model's dtype for tensor storage).
    pub fn bytes(&self) -> usize {
        self.seqs
            .iter()
            .flat_map(|s| &s.layers)
            .map(|l| l.text.kv.bytes() + l.summaries.kv.bytes())
            .sum()
    }

    /// Bytes allocated for layer `layer` over all sequences.
    pub fn layer_bytes(&self, layer: usize) -> usize {
        self.seqs
            .iter()
            .filter_map(|s| s.layers.get(layer))
            .map(|l| l.text.kv.bytes() + l.summaries.kv.bytes())
            .sum()
    }

    /// Visible (text, summary) K/V rows layer `layer` holds for sequence
    /// `seq`: `(min(n, W*C + n % C), S*floor(n/C))` on a KSA layer, `(n, 0)`
    /// on a bypass layer.
    pub fn live_rows(&self, layer: usize, seq: usize) -> Option<(usize, usize)> {
        let l = self.seqs.get(seq)?.layers.get(layer)?;
        Some((l.text.live(), l.summaries.live()))
    }

    /// One decode step: token `tokens[i]` for every sequence `i` of the
    /// batch. Returns the next-token logits `[batch, V']`.
    pub fn step(&mut self, model: &Qwen3Ksa, tokens: &[u32]) -> Result<Tensor> {
        if tokens.len() != self.seqs.len() {
            return Err(Error::DimMismatch {
                what: "batch size",
                a: "tokens",
                a_val: tokens.len(),
                b: "cache",
                b_val: self.seqs.len(),
            });
        }
        let inputs: Vec<(usize, &[u32])> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (i, std::slice::from_ref(t)))
            .collect();
        let logits = self.append(model, &inputs, LogitRows::Last)?;
        Ok(Tensor::cat(&logits, 0)?)
    }

    /// Feeds `tokens` to sequence `seq` for every `(seq, tokens)` of
    /// `inputs` (a prompt, a continuation, or one decode token; sequences
    /// not named are left alone, an empty token list is a no-op). When a
    /// sequence completes a chunk, the chunk's `S` summaries run in the same
    /// step through every layer and their K/V join the cache.
    ///
    /// Returns, per input, the logits selected by `which` (`[m, V']` or
    /// `[1, V']`; `[0, V']` for an empty input). Nothing changes on error:
    /// unknown or repeated sequence, token id out of range, capacity
    /// exceeded, a model of another shape, dtype or device (tensor storage),
    /// or any failure while computing. The one exception is a device failure
    /// (out of memory while a growing buffer is reallocated, a failed copy)
    /// during the final writes of tensor storage, which may leave the step
    /// partly written: drop the cache then.
    pub fn append(
        &mut self,
        model: &Qwen3Ksa,
        inputs: &[(usize, &[u32])],
        which: LogitRows,
    ) -> Result<Vec<Tensor>> {
        let plans = self.validate(model, inputs)?;
        if plans.iter().all(|p| p.rows.is_empty()) {
            let table = model.summary_embeddings()?;
            let v = model.config().logits_size();
            return plans
                .iter()
                .map(|_| Ok(Tensor::zeros((0, v), table.dtype(), table.device())?))
                .collect();
        }
        let (hidden, staged) = self.compute(model, inputs, &plans)?;
        let logits = self.logits(model, &hidden, &plans, which)?;
        for (plan, staged) in plans.iter().zip(staged) {
            self.commit(plan, staged)?;
        }
        Ok(logits)
    }

    /// Checks every input and lays out the step's packed rows.
    fn validate(&self, model: &Qwen3Ksa, inputs: &[(usize, &[u32])]) -> Result<Vec<Plan>> {
        let spec = CacheSpec::of(model)?;
        if spec != self.spec {
            return Err(Error::CacheModelMismatch(format!(
                "the cache was built for {:?}, the model is {:?}",
                self.spec, spec
            )));
        }
        let table = model.summary_embeddings()?;
        let place = (table.dtype(), table.device().location());
        if self.storage == CacheStorage::Tensors && place != self.place {
            return Err(Error::CacheModelMismatch(format!(
                "the cache holds {:?} tensors on {:?}, the model is {:?} on {:?}",
                self.place.0, self.place.1, place.0, place.1
            )));
        }
        let config = model.config();
        let summary_rows =
            config.summary_token_begin..config.summary_token_begin + config.summary_token_num;
        let mut seen = vec![false; self.seqs.len()];
        let (mut rows, mut text_rows) = (0, 0);
        let mut plans = Vec::with_capacity(inputs.len());
        for &(seq, tokens) in inputs {
            let state = self.seqs.get(seq).ok_or(Error::UnknownSequence {
                index: seq,
                batch: self.seqs.len(),
            })?;
            if std::mem::replace(&mut seen[seq], true) {
                return Err(Error::DuplicateSequence { index: seq });
            }
            if let Some(&token) = tokens
                .iter()
                .find(|&&t| t as usize >= config.vocab_size || summary_rows.contains(&(t as usize)))
            {
                return Err(Error::TokenOutOfRange {
                    token,
                    vocab: config.vocab_size,
                    summary_rows: summary_rows.clone(),
                });
            }
            let old = state.len;
            let new = old.checked_add(tokens.len()).ok_or(Error::CacheCapacity {
                sequence: seq,
                len: old,
                adding: tokens.len(),
                capacity: usize::MAX,
            })?;
            if let Some(capacity) = self.capacity.filter(|&c| new > c) {
                return Err(Error::CacheCapacity {
                    sequence: seq,
                    len: old,
                    adding: tokens.len(),
                    capacity,
                });
            }
            let layout = KsaLayout::new(spec.ksa, new)?;
            let slots = layout.len() - KsaLayout::new(spec.ksa, old)?.len();
            plans.push(Plan {
                seq,
                old,
                new,
                layout,
                rows: rows..rows + slots,
                text_rows: text_rows..text_rows + tokens.len(),
            });
            rows += slots;
            text_rows += tokens.len();
        }
        Ok(plans)
    }

    /// Runs the new slots through every layer; returns the final hidden
    /// states of the text rows `[1, T, hidden]` and, per input, the new K/V
    /// of every layer. Reads the cache only.
    fn compute(
        &self,
        model: &Qwen3Ksa,
        inputs: &[(usize, &[u32])],
        plans: &[Plan],
    ) -> Result<(Tensor, Vec<Vec<Staged>>)> {
        let config = model.config();
        let device = model.summary_embeddings()?.device().clone();
        // Packed rows: every input's new slots in slot order.
        let (mut ids, mut positions, mut summary_rows, mut text_rows) =
            (vec![], vec![], vec![], vec![]);
        let mut kinds = vec![];
        for (plan, &(_, tokens)) in plans.iter().zip(inputs) {
            let first = plan.rows.start;
            let base = plan.layout.len() - plan.rows.len();
            for slot in base..plan.layout.len() {
                let kind = plan.layout.slot_kind(slot).expect("slot < N");
                let row = (first + slot - base) as u32;
                match kind {
                    SlotKind::Text { token } => {
                        ids.push(tokens[token - plan.old]);
                        text_rows.push(row);
                    }
                    SlotKind::Summary { index, .. } => {
                        ids.push((config.summary_token_begin + index) as u32);
                        summary_rows.push(row);
                    }
                }
                positions.push(plan.layout.position_id(slot).expect("slot < N"));
                kinds.push((kind, slot));
            }
        }
        let rows = ids.len();
        let mut staged: Vec<Vec<Staged>> = plans.iter().map(|_| Vec::new()).collect();
        let text_idx = Tensor::from_slice(&text_rows, text_rows.len(), &device)?;
        let mut h = model.embed_rows(&Tensor::from_vec(ids, (1, rows), &device)?)?;
        let text_positions: Vec<u32> = text_rows.iter().map(|&r| positions[r as usize]).collect();
        for (l, layer) in model.layers().iter().enumerate() {
            let attn = layer.attention();
            match layer.kind() {
                LayerKind::Summary => {
                    let normed = layer.attention_input(&h, &summary_rows)?;
                    let (q, k, v) = attn.project(&normed, &positions, &summary_rows)?;
                    let layer_staged =
                        self.stage(&k, &v, plans, |p| p.rows.clone(), |r| !kinds[r].0.is_text())?;
                    let out = self.attend_layer(l, &q, plans, &layer_staged, true, |p, r| {
                        kinds[p.rows.start + r]
                    })?;
                    h = (&h + attn.output(&out)?)?;
                    h = layer.feed_forward(&h)?;
                    for (s, st) in staged.iter_mut().zip(layer_staged) {
                        s.push(st);
                    }
                }
                LayerKind::Bypass => {
                    let text = h.index_select(&text_idx, 1)?;
                    let normed = layer.attention_input(&text, &[])?;
                    let (q, k, v) = attn.project(&normed, &text_positions, &[])?;
                    let layer_staged =
                        self.stage(&k, &v, plans, |p| p.text_rows.clone(), |_| false)?;
                    let out = self.attend_layer(l, &q, plans, &layer_staged, false, |p, r| {
                        let token = p.old + r;
                        (
                            SlotKind::Text { token },
                            p.layout.text_slot(token).expect("new token"),
                        )
                    })?;
                    let text = (&text + attn.output(&out)?)?;
                    let text = layer.feed_forward(&text)?;
                    h = replace_slots(&h, &text, &text_rows)?;
                    for (s, st) in staged.iter_mut().zip(layer_staged) {
                        s.push(st);
                    }
                }
            }
        }
        Ok((h.index_select(&text_idx, 1)?, staged))
    }

    /// Splits a layer's new K/V (`[1, kv_heads, R, d]`, R packed rows) into
    /// each input's text and summary rows, `[kv_heads, rows, d]` each, in the
    /// cache's storage.
    fn stage(
        &self,
        k: &Tensor,
        v: &Tensor,
        plans: &[Plan],
        rows_of: impl Fn(&Plan) -> Range<usize>,
        is_summary: impl Fn(usize) -> bool,
    ) -> Result<Vec<Staged>> {
        let (hkv, d) = (self.spec.kv_heads, self.spec.head_dim);
        let split = |p: &Plan| -> (Vec<u32>, Vec<u32>) {
            rows_of(p)
                .map(|r| r as u32)
                .partition(|&r| !is_summary(r as usize))
        };
        match self.storage {
            CacheStorage::Host => {
                let total = k.dim(2)?;
                let k = k.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let v = v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let gather = |rows: &[u32]| {
                    let pick = |x: &[f32]| -> Vec<Vec<f32>> {
                        (0..hkv)
                            .map(|h| {
                                rows.iter()
                                    .flat_map(|&r| {
                                        let at = (h * total + r as usize) * d;
                                        &x[at..at + d]
                                    })
                                    .copied()
                                    .collect()
                            })
                            .collect()
                    };
                    Kv::Host {
                        k: pick(&k),
                        v: pick(&v),
                    }
                };
                Ok(plans
                    .iter()
                    .map(|p| {
                        let (text, sums) = split(p);
                        Staged {
                            text: gather(&text),
                            text_rows: text.len(),
                            sums: gather(&sums),
                            sum_rows: sums.len(),
                        }
                    })
                    .collect())
            }
            CacheStorage::Tensors => {
                let (k, v) = (k.squeeze(0)?, v.squeeze(0)?);
                let gather = |rows: Vec<u32>| -> Result<Kv> {
                    let n = rows.len();
                    if n == 0 {
                        // A view: no zero-size device allocation or launch.
                        return Ok(Kv::tensor(k.narrow(1, 0, 0)?, v.narrow(1, 0, 0)?));
                    }
                    let idx = Tensor::from_vec(rows, n, k.device())?;
                    Ok(Kv::tensor(
                        k.index_select(&idx, 1)?,
                        v.index_select(&idx, 1)?,
                    ))
                };
                plans
                    .iter()
                    .map(|p| {
                        let (text, sums) = split(p);
                        let (text_rows, sum_rows) = (text.len(), sums.len());
                        Ok(Staged {
                            text: gather(text)?,
                            text_rows,
                            sums: gather(sums)?,
                            sum_rows,
                        })
                    })
                    .collect()
            }
        }
    }

    /// The keys of query row `r` of input `p` on layer `layer` as at most four
    /// runs of storage rows: cached summaries, the step's new summaries,
    /// cached window text, the step's new text. Both storages attend over
    /// exactly these runs.
    fn key_runs<'a>(
        &self,
        store: &'a LayerStore,
        st: &'a Staged,
        p: &Plan,
        layout: &KsaLayout,
        ksa: bool,
        (kind, slot): (SlotKind, usize),
    ) -> Vec<(&'a Kv, Range<usize>)> {
        let ranges = if ksa {
            layout.key_ranges(slot).expect("slot in layout")
        } else {
            let SlotKind::Text { token } = kind else {
                unreachable!("bypass layers query text only")
            };
            crate::KeyRanges {
                summaries: 0..0,
                text: 0..token + 1,
            }
        };
        let (cached_sums, first) = (store.summaries.live(), p.old - store.text.live());
        debug_assert!(ranges.text.start >= first || ranges.text.is_empty());
        debug_assert!(ranges.summaries.len() <= cached_sums + st.sum_rows);
        let mut runs = Vec::with_capacity(4);
        let sums = ranges.summaries;
        if sums.start < cached_sums.min(sums.end) {
            let rows = store.summaries.at(sums.start..sums.end.min(cached_sums));
            runs.push((&store.summaries.kv, rows));
        }
        let (a, b) = (sums.start.max(cached_sums), sums.end);
        if a < b {
            runs.push((&st.sums, a - cached_sums..b - cached_sums));
        }
        let text = ranges.text;
        if text.start < text.end.min(p.old) {
            let rows = store
                .text
                .at(text.start - first..text.end.min(p.old) - first);
            runs.push((&store.text.kv, rows));
        }
        let (a, b) = (text.start.max(p.old), text.end);
        if a < b {
            runs.push((&st.text, a - p.old..b - p.old));
        }
        runs
    }

    /// Attention of one layer's new queries `q: [1, hq, R, d]` over the cache
    /// plus the step's new K/V; `query(plan, r)` names the `r`-th query row of
    /// an input (its slot kind and slot). Returns `[1, hq, R, d]`.
    fn attend_layer(
        &self,
        layer: usize,
        q: &Tensor,
        plans: &[Plan],
        staged: &[Staged],
        ksa: bool,
        query: impl Fn(&Plan, usize) -> (SlotKind, usize) + Sync,
    ) -> Result<Tensor> {
        let window = self.spec.layers[layer].1;
        // Query rows of input `i`: its first packed row and how many.
        let rows_of = |i: usize| {
            let (p, st) = (&plans[i], &staged[i]);
            let row0 = if ksa { p.rows.start } else { p.text_rows.start };
            (row0, st.text_rows + if ksa { st.sum_rows } else { 0 })
        };
        if self.storage == CacheStorage::Tensors {
            // One entry per query row, in packed order (the plans' rows are).
            let mut entries = Vec::with_capacity(q.dim(2)?);
            for (i, p) in plans.iter().enumerate() {
                let store = &self.seqs[p.seq].layers[layer];
                let layout = p.layout.with_window(window);
                for r in 0..rows_of(i).1 {
                    let runs = self.key_runs(store, &staged[i], p, &layout, ksa, query(p, r));
                    entries.push(runs.into_iter().map(|(kv, rows)| kv.rows(rows)).collect());
                }
            }
            let q = q.squeeze(0)?.transpose(0, 1)?.contiguous()?;
            return Ok(crate::attention::decode_attention(
                &q,
                &entries,
                &AttentionOptions::default(),
            )?
            .transpose(0, 1)?
            .unsqueeze(0)?
            .contiguous()?);
        }
        let (_, hq, total, d) = q.dims4()?;
        let hkv = self.spec.kv_heads;
        let group = hq / hkv;
        let dtype = q.dtype();
        let device = q.device().clone();
        let qd = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let scale = 1.0 / (d as f32).sqrt();
        let tasks: Vec<(usize, usize)> = (0..plans.len())
            .flat_map(|i| (0..hkv).map(move |g| (i, g)))
            .collect();
        let results: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&(i, g)| {
                let p = &plans[i];
                let store = &self.seqs[p.seq].layers[layer];
                let (row0, n_rows) = rows_of(i);
                let layout = p.layout.with_window(window);
                let mut out = vec![0.0f32; group * n_rows * d];
                let (mut qbuf, mut obuf, mut scores) =
                    (vec![0.0f32; group * d], vec![0.0f32; group * d], Vec::new());
                for r in 0..n_rows {
                    let slices: Vec<KvSlice<'_>> = self
                        .key_runs(store, &staged[i], p, &layout, ksa, query(p, r))
                        .into_iter()
                        .map(|(kv, rows)| kv.slice(g, rows, d))
                        .collect();
                    for j in 0..group {
                        let at = ((g * group + j) * total + row0 + r) * d;
                        qbuf[j * d..(j + 1) * d].copy_from_slice(&qd[at..at + d]);
                    }
                    attend(&qbuf, d, &slices, scale, &mut obuf, &mut scores);
                    for j in 0..group {
                        let at = (j * n_rows + r) * d;
                        out[at..at + d].copy_from_slice(&obuf[j * d..(j + 1) * d]);
                    }
                }
                out
            })
            .collect();
        let mut out = vec![0.0f32; hq * total * d];
        for (&(i, g), res) in tasks.iter().zip(&results) {
            let (row0, n_rows) = rows_of(i);
            for j in 0..group {
                let at = ((g * group + j) * total + row0) * d;
                out[at..at + n_rows * d]
                    .copy_from_slice(&res[j * n_rows * d..(j + 1) * n_rows * d]);
            }
        }
        Ok(Tensor::from_vec(out, (1, hq, total, d), &device)?.to_dtype(dtype)?)
    }

    /// LogitRows of the text rows `[1, T, hidden]`, split per input.
    fn logits(
        &self,
        model: &Qwen3Ksa,
        hidden: &Tensor,
        plans: &[Plan],
        which: LogitRows,
    ) -> Result<Vec<Tensor>> {
        let v = model.config().logits_size();
        let device = hidden.device();
        let select: Vec<u32> = plans
            .iter()
            .flat_map(|p| match which {
                LogitRows::All => p.text_rows.clone(),
                LogitRows::Last if p.text_rows.is_empty() => 0..0,
                LogitRows::Last => p.text_rows.end - 1..p.text_rows.end,
            })
            .map(|r| r as u32)
            .collect();
        let logits = if select.is_empty() {
            Tensor::zeros((0, v), hidden.dtype(), device)?
        } else {
            let len = select.len();
            let idx = Tensor::from_vec(select, len, device)?;
            model.head(&hidden.index_select(&idx, 1)?)?.squeeze(0)?
        };
        let mut at = 0;
        plans
            .iter()
            .map(|p| {
                let m = match which {
                    LogitRows::All => p.text_rows.len(),
                    LogitRows::Last => p.text_rows.len().min(1),
                };
                let t = logits.narrow(0, at, m)?;
                at += m;
                Ok(t)
            })
            .collect()
    }

    /// Appends one input's new K/V to every layer and drops text that left
    /// the window. Everything was checked and computed before; only a device
    /// failure of tensor storage can make it fail.
    fn commit(&mut self, plan: &Plan, staged: Vec<Staged>) -> Result<()> {
        let (spec, d) = (&self.spec, self.spec.head_dim);
        let seq = &mut self.seqs[plan.seq];
        let c = spec.ksa.chunk_size();
        for (l, (store, st)) in seq.layers.iter_mut().zip(staged).enumerate() {
            // The most text rows live at once during this commit: the window
            // plus a full current chunk, or everything on a bypass layer.
            let peak = match spec.layers[l] {
                (LayerKind::Summary, w) => plan.new.min(w.saturating_mul(c).saturating_add(c)),
                (LayerKind::Bypass, _) => plan.new,
            };
            store.text.reserve(peak, d)?;
            store
                .summaries
                .reserve(store.summaries.live() + st.sum_rows, d)?;
            store
                .summaries
                .extend(&st.sums, 0..st.sum_rows, d, |_, _| 0)?;
            store.text.extend(&st.text, 0..st.text_rows, d, |r, live| {
                let n = plan.old + r + 1;
                spec.window_first(l, n).saturating_sub(n - live)
            })?;
        }
        seq.len = plan.new;
        Ok(())
    }
}
