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
//! Each store keeps one contiguous buffer per KV head, so the keys of any new
//! query are at most four contiguous slices per KV head: old summaries and
//! window text from the cache, and the step's own new summaries and text.
//! Text leaving the window is dropped logically at once and reclaimed by
//! moving the live rows to the front when the buffer is full or half dead
//! (amortized O(1) per row), which keeps the window contiguous.
//!
//! A step validates everything, computes all layers while only reading the
//! cache, and commits the new K/V at the very end: a failed step leaves the
//! cache exactly as it was.

use crate::decode::{attend, KvSlice};
use crate::layer::replace_slots;
use crate::layout::{Layout, SlotKind};
use crate::model::Qwen3Ksa;
use crate::model_config::LayerKind;
use crate::{Error, KsaConfig, Result};
use candle_core::{DType, Tensor};
use rayon::prelude::*;
use std::ops::Range;

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

/// K and V rows of one kind for one (layer, sequence): one contiguous buffer
/// per KV head, `[rows, head_dim]` each. The first `dead` rows are no longer
/// visible and wait to be reclaimed.
#[derive(Debug, Clone, PartialEq)]
struct Rows {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    dead: usize,
    len: usize,
}

impl Rows {
    fn new(heads: usize, head_dim: usize, reserve: usize) -> Self {
        let buf = || {
            (0..heads)
                .map(|_| Vec::with_capacity(reserve * head_dim))
                .collect()
        };
        Self {
            k: buf(),
            v: buf(),
            dead: 0,
            len: 0,
        }
    }

    fn live(&self) -> usize {
        self.len - self.dead
    }

    fn bytes(&self) -> usize {
        self.k
            .iter()
            .chain(&self.v)
            .map(|b| b.capacity() * std::mem::size_of::<f32>())
            .sum()
    }

    /// Live rows `rows` (0 = first live row) of KV head `head`.
    fn slice(&self, head: usize, rows: Range<usize>, d: usize) -> KvSlice<'_> {
        let r = (self.dead + rows.start) * d..(self.dead + rows.end) * d;
        KvSlice {
            k: &self.k[head][r.clone()],
            v: &self.v[head][r],
        }
    }

    /// Makes room for `rows` live rows in all: drops dead rows first, then
    /// grows to exactly that (a prompt's rows are known before they come).
    fn reserve(&mut self, rows: usize, d: usize) {
        if self.k[0].capacity() < rows * d {
            self.compact(d);
            for b in self.k.iter_mut().chain(self.v.iter_mut()) {
                b.reserve_exact(rows * d - b.len());
            }
        }
    }

    fn compact(&mut self, d: usize) {
        for b in self.k.iter_mut().chain(self.v.iter_mut()) {
            b.drain(..self.dead * d);
        }
        self.len -= self.dead;
        self.dead = 0;
    }

    /// Appends row `row` of `staged` (`[heads, rows, d]` K and V). Dead rows
    /// are reclaimed when the buffer is full or half dead; a full buffer
    /// without dead rows grows by a quarter (amortized O(1), little slack).
    fn push(&mut self, k: &[f32], v: &[f32], rows: usize, row: usize, d: usize) {
        let full = self.k[0].len() + d > self.k[0].capacity();
        if self.dead > 0 && (full || self.dead >= self.live()) {
            self.compact(d);
        }
        if self.k[0].len() + d > self.k[0].capacity() {
            let grow = (self.len / 4).max(16) * d;
            for b in self.k.iter_mut().chain(self.v.iter_mut()) {
                b.reserve_exact(grow);
            }
        }
        for (h, (kb, vb)) in self.k.iter_mut().zip(self.v.iter_mut()).enumerate() {
            let at = (h * rows + row) * d;
            kb.extend_from_slice(&k[at..at + d]);
            vb.extend_from_slice(&v[at..at + d]);
        }
        self.len += 1;
    }

    fn evict(&mut self, rows: usize) {
        self.dead += rows;
        debug_assert!(self.dead <= self.len);
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
pub enum Logits {
    /// Only the last new token's logits, `[1, V']` (what decoding needs; a
    /// long prompt's full `n x V'` logits would not fit).
    Last,
    /// Every new token's logits, `[m, V']`.
    All,
}

/// The batched KSA decode cache: per sequence (each with its own length) and
/// per layer, the window text K/V and the summary K/V; see the module docs.
///
/// K/V are kept in f32 host memory whatever the model's dtype (the CPU
/// attention computes in f32 too). Two caches compare equal when they hold
/// the same rows in the same buffers.
#[derive(Debug, Clone, PartialEq)]
pub struct KsaCache {
    spec: CacheSpec,
    capacity: Option<usize>,
    seqs: Vec<Sequence>,
}

/// The new slots of one sequence in a step.
struct Plan {
    seq: usize,
    old: usize,
    new: usize,
    /// Layout of the sequence after the step (window 0).
    layout: Layout,
    /// Its rows in the packed step (all slots).
    rows: Range<usize>,
    /// Its rows among the packed text slots.
    text_rows: Range<usize>,
}

/// One sequence's new K/V of one layer, `[kv_heads, rows, d]` per kind.
struct Staged {
    text_k: Vec<f32>,
    text_v: Vec<f32>,
    text_rows: usize,
    sum_k: Vec<f32>,
    sum_v: Vec<f32>,
    sum_rows: usize,
}

impl KsaCache {
    /// An empty cache for `batch` sequences of `model` that grows as needed
    /// (the window stores stop growing at `W*C + C` rows per layer).
    pub fn new(model: &Qwen3Ksa, batch: usize) -> Result<Self> {
        Self::build(model, batch, None)
    }

    /// An empty cache for `batch` sequences of at most `max_tokens` text
    /// tokens each, with every buffer allocated up front: no step
    /// reallocates, and a step that would pass `max_tokens` is
    /// [`Error::CacheCapacity`].
    pub fn with_capacity(model: &Qwen3Ksa, batch: usize, max_tokens: usize) -> Result<Self> {
        Self::build(model, batch, Some(max_tokens))
    }

    fn build(model: &Qwen3Ksa, batch: usize, capacity: Option<usize>) -> Result<Self> {
        let spec = CacheSpec::of(model)?;
        let (c, s) = (spec.ksa.chunk_size(), spec.ksa.summaries());
        let seqs = (0..batch)
            .map(|_| Sequence {
                len: 0,
                layers: spec
                    .layers
                    .iter()
                    .map(|&(kind, w)| {
                        let (text, sums) = match (capacity, kind) {
                            (None, _) => (0, 0),
                            (Some(n), LayerKind::Bypass) => (n, 0),
                            (Some(n), LayerKind::Summary) => {
                                (n.min(w.saturating_mul(c).saturating_add(c)), (n / c) * s)
                            }
                        };
                        LayerStore {
                            text: Rows::new(spec.kv_heads, spec.head_dim, text),
                            summaries: Rows::new(spec.kv_heads, spec.head_dim, sums),
                        }
                    })
                    .collect(),
            })
            .collect();
        Ok(Self {
            spec,
            capacity,
            seqs,
        })
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

    /// Bytes of K/V memory allocated (buffer capacities, live or not).
    pub fn bytes(&self) -> usize {
        self.seqs
            .iter()
            .flat_map(|s| &s.layers)
            .map(|l| l.text.bytes() + l.summaries.bytes())
            .sum()
    }

    /// Bytes allocated for layer `layer` over all sequences.
    pub fn layer_bytes(&self, layer: usize) -> usize {
        self.seqs
            .iter()
            .filter_map(|s| s.layers.get(layer))
            .map(|l| l.text.bytes() + l.summaries.bytes())
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
        let logits = self.append(model, &inputs, Logits::Last)?;
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
    /// exceeded, a model of another shape.
    pub fn append(
        &mut self,
        model: &Qwen3Ksa,
        inputs: &[(usize, &[u32])],
        which: Logits,
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
            self.commit(plan, staged);
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
            let layout = Layout::new(spec.ksa, new)?;
            let slots = layout.len() - Layout::new(spec.ksa, old)?.len();
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
    /// each input's text and summary rows, `[kv_heads, rows, d]` each.
    fn stage(
        &self,
        k: &Tensor,
        v: &Tensor,
        plans: &[Plan],
        rows_of: impl Fn(&Plan) -> Range<usize>,
        is_summary: impl Fn(usize) -> bool,
    ) -> Result<Vec<Staged>> {
        let (hkv, d) = (self.spec.kv_heads, self.spec.head_dim);
        let total = k.dim(2)?;
        let k = k.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let v = v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(plans
            .iter()
            .map(|p| {
                let rows = rows_of(p);
                let mut s = Staged {
                    text_k: vec![],
                    text_v: vec![],
                    text_rows: 0,
                    sum_k: vec![],
                    sum_v: vec![],
                    sum_rows: 0,
                };
                for h in 0..hkv {
                    for r in rows.clone() {
                        let at = (h * total + r) * d;
                        let (dk, dv) = if is_summary(r) {
                            (&mut s.sum_k, &mut s.sum_v)
                        } else {
                            (&mut s.text_k, &mut s.text_v)
                        };
                        dk.extend_from_slice(&k[at..at + d]);
                        dv.extend_from_slice(&v[at..at + d]);
                    }
                }
                s.text_rows = s.text_k.len() / (hkv * d).max(1);
                s.sum_rows = s.sum_k.len() / (hkv * d).max(1);
                s
            })
            .collect())
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
        let (_, hq, total, d) = q.dims4()?;
        let hkv = self.spec.kv_heads;
        let group = hq / hkv;
        let dtype = q.dtype();
        let device = q.device().clone();
        let qd = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let window = self.spec.layers[layer].1;
        let scale = 1.0 / (d as f32).sqrt();
        let tasks: Vec<(usize, usize)> = (0..plans.len())
            .flat_map(|i| (0..hkv).map(move |g| (i, g)))
            .collect();
        let results: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&(i, g)| {
                let (p, st) = (&plans[i], &staged[i]);
                let store = &self.seqs[p.seq].layers[layer];
                let (cached_sums, first) = (store.summaries.live(), p.old - store.text.live());
                let n_rows = st.text_rows + if ksa { st.sum_rows } else { 0 };
                let layout = p.layout.with_window(window);
                let mut out = vec![0.0f32; group * n_rows * d];
                let (mut qbuf, mut obuf, mut scores) =
                    (vec![0.0f32; group * d], vec![0.0f32; group * d], Vec::new());
                let row0 = if ksa { p.rows.start } else { p.text_rows.start };
                for r in 0..n_rows {
                    let (kind, slot) = query(p, r);
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
                    debug_assert!(ranges.text.start >= first || ranges.text.is_empty());
                    debug_assert!(ranges.summaries.len() <= cached_sums + st.sum_rows);
                    let mut slices = Vec::with_capacity(4);
                    let sums = ranges.summaries;
                    if sums.start < cached_sums.min(sums.end) {
                        slices.push(store.summaries.slice(
                            g,
                            sums.start..sums.end.min(cached_sums),
                            d,
                        ));
                    }
                    let (a, b) = (sums.start.max(cached_sums), sums.end);
                    if a < b {
                        slices.push(staged_slice(
                            &st.sum_k,
                            &st.sum_v,
                            st.sum_rows,
                            g,
                            a - cached_sums..b - cached_sums,
                            d,
                        ));
                    }
                    let text = ranges.text;
                    if text.start < text.end.min(p.old) {
                        slices.push(store.text.slice(
                            g,
                            text.start - first..text.end.min(p.old) - first,
                            d,
                        ));
                    }
                    let (a, b) = (text.start.max(p.old), text.end);
                    if a < b {
                        slices.push(staged_slice(
                            &st.text_k,
                            &st.text_v,
                            st.text_rows,
                            g,
                            a - p.old..b - p.old,
                            d,
                        ));
                    }
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
            let p = &plans[i];
            let row0 = if ksa { p.rows.start } else { p.text_rows.start };
            let n_rows = res.len() / (group * d);
            for j in 0..group {
                let at = ((g * group + j) * total + row0) * d;
                out[at..at + n_rows * d]
                    .copy_from_slice(&res[j * n_rows * d..(j + 1) * n_rows * d]);
            }
        }
        Ok(Tensor::from_vec(out, (1, hq, total, d), &device)?.to_dtype(dtype)?)
    }

    /// Logits of the text rows `[1, T, hidden]`, split per input.
    fn logits(
        &self,
        model: &Qwen3Ksa,
        hidden: &Tensor,
        plans: &[Plan],
        which: Logits,
    ) -> Result<Vec<Tensor>> {
        let v = model.config().logits_size();
        let device = hidden.device();
        let select: Vec<u32> = plans
            .iter()
            .flat_map(|p| match which {
                Logits::All => p.text_rows.clone(),
                Logits::Last if p.text_rows.is_empty() => 0..0,
                Logits::Last => p.text_rows.end - 1..p.text_rows.end,
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
                    Logits::All => p.text_rows.len(),
                    Logits::Last => p.text_rows.len().min(1),
                };
                let t = logits.narrow(0, at, m)?;
                at += m;
                Ok(t)
            })
            .collect()
    }

    /// Appends one input's new K/V to every layer and drops text that left
    /// the window. Cannot fail: everything was checked and computed before.
    fn commit(&mut self, plan: &Plan, staged: Vec<Staged>) {
        let d = self.spec.head_dim;
        let seq = &mut self.seqs[plan.seq];
        let c = self.spec.ksa.chunk_size();
        for (l, (store, st)) in seq.layers.iter_mut().zip(staged).enumerate() {
            // The most text rows live at once during this commit: the window
            // plus a full current chunk, or everything on a bypass layer.
            let peak = match self.spec.layers[l] {
                (LayerKind::Summary, w) => plan.new.min(w.saturating_mul(c).saturating_add(c)),
                (LayerKind::Bypass, _) => plan.new,
            };
            store.text.reserve(peak, d);
            store
                .summaries
                .reserve(store.summaries.live() + st.sum_rows, d);
            for r in 0..st.sum_rows {
                store
                    .summaries
                    .push(&st.sum_k, &st.sum_v, st.sum_rows, r, d);
            }
            for r in 0..st.text_rows {
                store.text.push(&st.text_k, &st.text_v, st.text_rows, r, d);
                let n = plan.old + r + 1;
                let first = n - store.text.live();
                let keep = self.spec.window_first(l, n);
                if keep > first {
                    store.text.evict(keep - first);
                }
            }
        }
        seq.len = plan.new;
    }
}

/// Rows `rows` of KV head `head` of staged `[heads, total, d]` K and V.
fn staged_slice<'a>(
    k: &'a [f32],
    v: &'a [f32],
    total: usize,
    head: usize,
    rows: Range<usize>,
    d: usize,
) -> KvSlice<'a> {
    let r = (head * total + rows.start) * d..(head * total + rows.end) * d;
    KvSlice {
        k: &k[r.clone()],
        v: &v[r],
    }
}
