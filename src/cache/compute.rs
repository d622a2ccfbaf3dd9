//! A step's compute: the new slots through every layer (the decoder layer's
//! own step), each layer attending over the cache and the step's new K/V,
//! while only reading the cache.

use super::plan::Plan;
use super::storage::{host_dtype, HostBufs, HostElem, Kv, LayerStore, Staged};
use super::{CacheStorage, KsaCache, LogitRows};
use crate::cpu::decode::{attend, KvSlice};
use crate::layout::{KsaLayout, SlotKind};
use crate::mask::Mask;
use crate::model::{Qwen3Ksa, StepRows};
use crate::model_config::LayerKind;
use crate::schedule::{QueryOffset, Schedule, TileSizes};
use crate::{AttentionOptions, Result};
use candle_core::{DType, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;
use std::ops::Range;

/// Query rows of one input from which a step attends on the tiled kernel:
/// one CPU query tile's worth, below which the per-row path, reading the
/// cache in place, costs less than gathering a head's keys.
const TILED_MIN_ROWS: usize = 16;

impl KsaCache {
    /// Runs the new slots through every layer; returns the final hidden
    /// states of the text rows `[1, T, hidden]` and, per input, the new K/V
    /// of every layer. Reads the cache only.
    pub(super) fn compute(
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
        let step_rows = StepRows {
            positions: &positions,
            summaries: &summary_rows,
            text: &text_rows,
        };
        for (l, layer) in model.layers().iter().enumerate() {
            // A KSA layer attends with every new slot, a bypass layer with the
            // new text only; `query(plan, r)` names an input's r-th query row.
            let ksa = layer.kind() == LayerKind::Summary;
            let query = |p: &Plan, r: usize| {
                if ksa {
                    kinds[p.rows.start + r]
                } else {
                    let token = p.old + r;
                    let slot = p.layout.text_slot(token).expect("new token");
                    (SlotKind::Text { token }, slot)
                }
            };
            let mut layer_staged = Vec::new();
            h = layer.step(&h, &step_rows, |q, k, v| {
                layer_staged = if ksa {
                    self.stage(k, v, plans, |p| p.rows.clone(), |r| !kinds[r].0.is_text())?
                } else {
                    self.stage(k, v, plans, |p| p.text_rows.clone(), |_| false)?
                };
                self.attend_layer(l, q, plans, &layer_staged, ksa, query)
            })?;
            for (s, st) in staged.iter_mut().zip(layer_staged) {
                s.push(st);
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
        let split = |p: &Plan| -> (Vec<u32>, Vec<u32>) {
            rows_of(p)
                .map(|r| r as u32)
                .partition(|&r| !is_summary(r as usize))
        };
        match self.storage {
            CacheStorage::Host => match host_dtype(self.place.0) {
                DType::BF16 => stage_host::<bf16>(k, v, plans, split),
                DType::F16 => stage_host::<f16>(k, v, plans, split),
                _ => stage_host::<f32>(k, v, plans, split),
            },
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
        // A step with a long input runs all its inputs on a tiled kernel;
        // decode steps keep the per-row path, which reads the cache in place.
        // The CPU's takes host f32 K/V: host storage, or tensors on the CPU
        // (gathered per head and step); tensor storage on CUDA runs the
        // prefill kernel on K/V gathered on the device.
        let tiled = (0..plans.len()).any(|i| rows_of(i).1 >= TILED_MIN_ROWS);
        if tiled && (self.storage == CacheStorage::Host || q.device().is_cpu()) {
            return self.attend_tiled(layer, q, plans, staged, ksa, rows_of);
        }
        #[cfg(feature = "cuda")]
        if tiled && q.device().is_cuda() {
            return self.attend_cuda(layer, q, plans, staged, ksa, rows_of);
        }
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
        let query: &(dyn Fn(&Plan, usize) -> (SlotKind, usize) + Sync) = &query;
        let rows_of: &(dyn Fn(usize) -> (usize, usize) + Sync) = &rows_of;
        let run = (layer, q, plans, staged, ksa, query, rows_of);
        match host_dtype(self.place.0) {
            DType::BF16 => self.attend_host::<bf16>(run),
            DType::F16 => self.attend_host::<f16>(run),
            _ => self.attend_host::<f32>(run),
        }
    }

    /// The host-storage branch of [`KsaCache::attend_layer`], for host
    /// buffers of element type `T`: (sequence, KV head) pairs on rayon, each
    /// query row through `ksa::cpu::decode::attend` over its key runs.
    fn attend_host<T: HostElem>(&self, run: HostAttend<'_>) -> Result<Tensor> {
        let (layer, q, plans, staged, ksa, query, rows_of) = run;
        // An unusable forced CPU variant (`KSA_CPU_ISA`) is a typed error here.
        crate::cpu::isa::process_isa()?;
        let window = self.spec.layers[layer].1;
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
                    let slices: Vec<KvSlice<'_, T>> = self
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

    /// [`KsaCache::attend_layer`] on the tiled block-sparse CPU kernel: per
    /// input and KV head, the cached summaries, the new summaries, the cached
    /// window text and the new text gathered as f32 in that (the gathered)
    /// order, and the input's new queries run by a [`Schedule::step`] over
    /// the mask of its whole text. `rows_of(i)` is input `i`'s first query
    /// row and count.
    fn attend_tiled(
        &self,
        layer: usize,
        q: &Tensor,
        plans: &[Plan],
        staged: &[Staged],
        ksa: bool,
        rows_of: impl Fn(usize) -> (usize, usize),
    ) -> Result<Tensor> {
        let (_, hq, total, d) = q.dims4()?;
        let hkv = self.spec.kv_heads;
        let group = hq / hkv;
        let window = self.spec.layers[layer].1;
        let qd = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; hq * total * d];
        let mut lse = vec![0f32; hq * total];
        let scale = 1.0 / (d as f32).sqrt();
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for (i, p) in plans.iter().enumerate() {
            let (first_row, n_rows) = rows_of(i);
            if n_rows == 0 {
                continue;
            }
            let (store, st) = (&self.seqs[p.seq].layers[layer], &staged[i]);
            let (mask, offset) = step_of(p, store, window, ksa, first_row);
            let schedule = Schedule::step(mask, TileSizes::default(), offset)?;
            debug_assert_eq!(schedule.step_rows(), first_row..first_row + n_rows);
            let runs = held_runs(store, st);
            for g in 0..hkv {
                k.clear();
                v.clear();
                for (kv, rows) in &runs {
                    kv.push_f32(g, rows.clone(), d, &mut k, &mut v)?;
                }
                crate::cpu::attend_gathered(
                    &qd,
                    (hq, total, d),
                    g * group..(g + 1) * group,
                    &k,
                    &v,
                    &schedule,
                    scale,
                    &mut out,
                    &mut lse,
                )?;
            }
        }
        Ok(Tensor::from_vec(out, (1, hq, total, d), q.device())?.to_dtype(q.dtype())?)
    }

    /// [`KsaCache::attend_layer`] on the CUDA prefill kernel (tensor storage
    /// on a CUDA device): per input, its four held key runs concatenated on
    /// the device in the gathered order, and one [`crate::cuda::op::forward_steps`]
    /// launch per input over the mask of its whole text, exactly as
    /// [`KsaCache::attend_tiled`] runs the CPU kernel. `rows_of(i)` is input
    /// `i`'s first query row and count.
    #[cfg(feature = "cuda")]
    fn attend_cuda(
        &self,
        layer: usize,
        q: &Tensor,
        plans: &[Plan],
        staged: &[Staged],
        ksa: bool,
        rows_of: impl Fn(usize) -> (usize, usize),
    ) -> Result<Tensor> {
        let window = self.spec.layers[layer].1;
        let mut held = Vec::with_capacity(plans.len());
        for (i, p) in plans.iter().enumerate() {
            let (first_row, n_rows) = rows_of(i);
            if n_rows == 0 {
                continue;
            }
            let (store, st) = (&self.seqs[p.seq].layers[layer], &staged[i]);
            let (mask, offset) = step_of(p, store, window, ksa, first_row);
            let (mut ks, mut vs) = (Vec::with_capacity(4), Vec::with_capacity(4));
            for (kv, rows) in held_runs(store, st) {
                if !rows.is_empty() {
                    let run = kv.rows(rows.clone());
                    ks.push(run.k.narrow(1, rows.start, rows.len())?);
                    vs.push(run.v.narrow(1, rows.start, rows.len())?);
                }
            }
            // `[1, kv_heads, held, d]`, contiguous (a query always sees
            // itself, so no step holds nothing).
            let k = Tensor::cat(&ks, 1)?.unsqueeze(0)?;
            let v = Tensor::cat(&vs, 1)?.unsqueeze(0)?;
            held.push((mask, offset, k, v));
        }
        let steps: Vec<crate::cuda::op::Step<'_>> = held
            .iter()
            .map(|(mask, offset, k, v)| crate::cuda::op::Step {
                mask: *mask,
                offset: *offset,
                k,
                v,
            })
            .collect();
        let (o, _lse) = crate::cuda::op::forward_steps(&q.contiguous()?, &steps, None)?;
        Ok(o)
    }

    /// LogitRows of the text rows `[1, T, hidden]`, split per input.
    pub(super) fn logits(
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
}

/// The mask and [`QueryOffset`] of input `p`'s step on a layer of `window`
/// chunks (a KSA layer, else a bypass layer's causal mask over the text),
/// its query rows from `first_row`: the tiled kernels, CPU and CUDA, run
/// exactly this over the keys [`held_runs`] gathers.
fn step_of(
    p: &Plan,
    store: &LayerStore,
    window: usize,
    ksa: bool,
    first_row: usize,
) -> (Mask, QueryOffset) {
    let mask = if ksa {
        Mask::Ksa(p.layout.with_window(window))
    } else {
        Mask::Causal { len: p.new }
    };
    let offset = QueryOffset {
        old: p.old,
        first_key: p.old - store.text.live(),
        first_row,
    };
    (mask, offset)
}

/// The keys a step holds, as four runs of storage rows in the gathered order
/// ([`crate::mask::Gathered`]): cached summaries, the step's new summaries,
/// cached window text, the step's new text.
fn held_runs<'a>(store: &'a LayerStore, st: &'a Staged) -> [(&'a Kv, Range<usize>); 4] {
    [
        (
            &store.summaries.kv,
            store.summaries.at(0..store.summaries.live()),
        ),
        (&st.sums, 0..st.sum_rows),
        (&store.text.kv, store.text.at(0..store.text.live())),
        (&st.text, 0..st.text_rows),
    ]
}

/// The arguments of [`KsaCache::attend_host`]: layer, queries, plans, staged
/// K/V, whether the layer is a KSA layer, the query rows' (kind, slot), and
/// each input's (first packed row, query rows).
type HostAttend<'a> = (
    usize,
    &'a Tensor,
    &'a [Plan],
    &'a [Staged],
    bool,
    &'a (dyn Fn(&Plan, usize) -> (SlotKind, usize) + Sync),
    &'a (dyn Fn(usize) -> (usize, usize) + Sync),
);

/// Host staging of a layer's new K/V (`[1, kv_heads, R, d]`) in element type
/// `T`: each input's text and summary rows, `split(plan)` naming them.
fn stage_host<T: HostElem>(
    k: &Tensor,
    v: &Tensor,
    plans: &[Plan],
    split: impl Fn(&Plan) -> (Vec<u32>, Vec<u32>),
) -> Result<Vec<Staged>> {
    let (_, hkv, total, d) = k.dims4()?;
    let k = k.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1::<T>()?;
    let v = v.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1::<T>()?;
    let gather = |rows: &[u32]| {
        let pick = |x: &[T]| -> Vec<Vec<T>> {
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
        T::wrap(HostBufs::new(pick(&k), pick(&v)))
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
