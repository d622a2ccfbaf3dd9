//! [`KsaCache`]: the batched KV cache of incremental decoding (docs/spec.md section 5),
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
//!
//! A long input runs in steps of at most [`KsaCache::prefill_chunk`] text
//! tokens (chunked prefill), each attending on the tiled block-sparse CPU
//! kernel over the cached summaries and window text plus its own keys, so a
//! prompt's memory beyond the cache is bounded by the chunk, not the prompt.
//! The steps run on a copy of the sequences they feed, which replaces them
//! only when every step succeeded.

//!
//! The module by concern: the API here, `storage` (row buffers on the host
//! or on the device, and the final commit), `plan` (checks and the packed
//! layout of a step's new rows) and `compute` (the new rows through every
//! layer, attending over the cache and the step's own K/V).

mod compute;
mod plan;
mod storage;

use crate::model::Qwen3Ksa;
use crate::model_config::LayerKind;
use crate::{Error, Result};
use candle_core::{DType, DeviceLocation, Tensor};
use plan::CacheSpec;
use storage::{Kv, LayerStore, Rows, Sequence};

/// Where a [`KsaCache`] keeps its K/V, and so how it attends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStorage {
    /// Host buffers, one per KV head, in the model's dtype when it is bf16 or
    /// f16 (half the bytes of f32) and f32 otherwise, attended on the CPU by
    /// `ksa::cpu::decode::attend` on rayon (decode steps; it reads
    /// half-precision rows directly) or by the tiled block-sparse kernel
    /// (steps of 16 or more query rows: prompts). The default on the CPU, and
    /// for CUDA models the decode kernels cannot take (f32, head_dim other
    /// than 64 or 128): those copy every layer's new K/V to the host.
    Host,
    /// `[kv_heads, capacity, head_dim]` tensors on the model's device in the
    /// model's dtype, attended per query row over [`crate::KvRows`] lists by
    /// [`crate::decode_attention`]: the CUDA decode kernels on CUDA (one launch
    /// per layer for the whole batch, prompts included), its CPU
    /// implementation elsewhere (decode steps; prompts run on the tiled
    /// kernel as with host storage). The default for bf16/f16 CUDA models
    /// with head_dim 64 or 128.
    Tensors,
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

/// The most sequences one [`KsaCache`] holds.
pub const MAX_BATCH: usize = 1 << 16;

/// The most K/V elements a [`KsaCache::with_capacity`] cache preallocates,
/// all layers and sequences together (checked before allocating; host
/// buffers that do not fit in memory below it are [`Error::OutOfMemory`]).
pub const MAX_CACHE_ELEMENTS: usize = 1 << 40;

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
    /// Most text tokens of one sequence per step.
    prefill_chunk: usize,
    seqs: Vec<Sequence>,
}

/// The default [`KsaCache::prefill_chunk`]: 4,096 text tokens, the chunk
/// serving engines prefill KSA models with.
pub const DEFAULT_PREFILL_CHUNK: usize = 4096;

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
        if batch > MAX_BATCH {
            return Err(Error::TooLarge {
                what: "cache batch",
                got: batch,
                limit: MAX_BATCH,
            });
        }
        if let Some(n) = max_tokens {
            // The capacity's layout must fit the kernels' u32 slot indices.
            model.layout(n)?;
        }
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
                CacheStorage::Host => Kv::host(hkv, d, rows, dtype)?,
                CacheStorage::Tensors => Kv::zeros(hkv, d, rows, dtype, &device)?,
            }))
        };
        // Rows preallocated per layer (text, summaries), and their total
        // over the batch, checked before anything is allocated.
        let rows: Vec<(usize, usize)> = spec
            .layers
            .iter()
            .map(|&(kind, w)| match (max_tokens, kind) {
                (None, _) => (0, 0),
                (Some(n), LayerKind::Bypass) => (n, 0),
                (Some(n), LayerKind::Summary) => {
                    (n.min(w.saturating_mul(c).saturating_add(c)), (n / c) * s)
                }
            })
            .collect();
        let total = rows
            .iter()
            .try_fold(0usize, |acc, &(t, u)| acc.checked_add(t.checked_add(u)?))
            .and_then(|r| r.checked_mul(2 * hkv)?.checked_mul(d)?.checked_mul(batch));
        match total {
            Some(t) if t <= MAX_CACHE_ELEMENTS => {}
            _ => {
                return Err(Error::TooLarge {
                    what: "decode cache elements",
                    got: total.unwrap_or(usize::MAX),
                    limit: MAX_CACHE_ELEMENTS,
                })
            }
        }
        let seqs = (0..batch)
            .map(|_| {
                let layers = rows
                    .iter()
                    .map(|&(text, sums)| {
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
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            seqs,
        })
    }

    /// The cache with appends run in steps of at most `tokens` text tokens
    /// per sequence (see [`KsaCache::prefill_chunk`]); 0 is
    /// [`Error::InvalidConfig`].
    pub fn with_prefill_chunk(mut self, tokens: usize) -> Result<Self> {
        if tokens == 0 {
            return Err(Error::InvalidConfig(
                "the prefill chunk must be at least 1 text token".into(),
            ));
        }
        self.prefill_chunk = tokens;
        Ok(self)
    }

    /// Most text tokens of one sequence that one step of [`KsaCache::append`]
    /// computes ([`DEFAULT_PREFILL_CHUNK`] unless set): a longer input runs
    /// as consecutive steps, which gives the same logits and cache (up to
    /// f32 summation order) with memory beyond the cache bounded by the
    /// chunk times the attended keys of one KV head.
    pub fn prefill_chunk(&self) -> usize {
        self.prefill_chunk
    }

    /// A cache of the sequences `seqs` of this one, in that order (an index
    /// may repeat): parallel sampling from one prompt, a beam search's
    /// reordering, or a batch assembled from prompts prefilled once. Tensor
    /// storage shares the buffers until a write; host buffers are copied
    /// (their live rows; they grow again as needed). An index past the batch
    /// is [`Error::UnknownSequence`].
    pub fn select(&self, seqs: &[usize]) -> Result<Self> {
        let picked = seqs
            .iter()
            .map(|&index| {
                self.seqs.get(index).cloned().ok_or(Error::UnknownSequence {
                    index,
                    batch: self.seqs.len(),
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            seqs: picked,
            ..self.clone_empty()
        })
    }

    /// This cache's settings with no sequences.
    fn clone_empty(&self) -> Self {
        Self {
            spec: self.spec.clone(),
            capacity: self.capacity,
            storage: self.storage,
            place: self.place,
            prefill_chunk: self.prefill_chunk,
            seqs: Vec::new(),
        }
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
    /// An input longer than [`KsaCache::prefill_chunk`] runs as consecutive
    /// steps of that many tokens (all inputs advancing together), on a copy
    /// of the sequences fed that replaces them once the last step is done.
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
        // Every check of the whole input first: a bad input fails before any
        // step, whatever the chunk.
        let plans = self.validate(model, inputs)?;
        let chunk = self.prefill_chunk;
        if inputs.iter().all(|(_, tokens)| tokens.len() <= chunk) {
            return self.append_step(model, inputs, &plans, which);
        }
        // Chunked: the steps run on a copy of the sequences fed (input `i`
        // becomes sequence `i` of the copy), which replaces them at the end.
        let mut work = self.clone_empty();
        for plan in &plans {
            let keep = &self.seqs[plan.seq];
            let mut seq = keep.clone();
            seq.reserve_for(&self.spec, plan.new, keep)?;
            work.seqs.push(seq);
        }
        let mut pieces: Vec<Vec<Tensor>> = inputs.iter().map(|_| Vec::new()).collect();
        for start in (0..).step_by(chunk) {
            let (fed, step): (Vec<usize>, Vec<(usize, &[u32])>) = inputs
                .iter()
                .enumerate()
                .filter(|(_, (_, tokens))| start < tokens.len())
                .map(|(i, (_, tokens))| (i, (i, &tokens[start..tokens.len().min(start + chunk)])))
                .unzip();
            if step.is_empty() {
                break;
            }
            let plans = work.validate(model, &step)?;
            for (i, logits) in fed
                .into_iter()
                .zip(work.append_step(model, &step, &plans, which)?)
            {
                if which == LogitRows::Last {
                    pieces[i].clear();
                }
                pieces[i].push(logits);
            }
        }
        let table = model.summary_embeddings()?;
        let v = model.config().logits_size();
        let logits = pieces
            .into_iter()
            .map(|p| match p.len() {
                0 => Ok(Tensor::zeros((0, v), table.dtype(), table.device())?),
                _ => Ok(Tensor::cat(&p, 0)?),
            })
            .collect::<Result<Vec<_>>>()?;
        for (plan, seq) in plans.iter().zip(work.seqs) {
            self.seqs[plan.seq] = seq;
        }
        Ok(logits)
    }

    /// One step of [`KsaCache::append`] with its inputs' `plans`: every
    /// layer computed, then the new K/V committed.
    fn append_step(
        &mut self,
        model: &Qwen3Ksa,
        inputs: &[(usize, &[u32])],
        plans: &[plan::Plan],
        which: LogitRows,
    ) -> Result<Vec<Tensor>> {
        if plans.iter().all(|p| p.rows.is_empty()) {
            let table = model.summary_embeddings()?;
            let v = model.config().logits_size();
            return plans
                .iter()
                .map(|_| Ok(Tensor::zeros((0, v), table.dtype(), table.device())?))
                .collect();
        }
        let (hidden, staged) = self.compute(model, inputs, plans)?;
        let logits = self.logits(model, &hidden, plans, which)?;
        for (plan, staged) in plans.iter().zip(staged) {
            self.commit(plan, staged)?;
        }
        Ok(logits)
    }
}
