//! Where a cache's K/V rows live: one contiguous run of rows per KV head,
//! in host buffers (the model's dtype when it is bf16 or f16, else f32) or in
//! tensors on the model's device, sharing every index computation; and the
//! commit that appends a step's rows at its end.

use super::plan::{CacheSpec, Plan};
use super::KsaCache;
use crate::attention::KvRows;
use crate::cpu::decode::KvSlice;
use crate::cpu::Element;
use crate::model_config::LayerKind;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use std::mem::size_of;
use std::ops::Range;
use std::sync::Arc;

/// The element type of host storage for a model of `dtype`: bf16 and f16
/// models keep their dtype (half the bytes of f32, read directly by the CPU
/// decode), every other dtype is stored as f32.
pub(super) fn host_dtype(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => dtype,
        _ => DType::F32,
    }
}

/// The error of a host allocation that the memory cannot hold.
fn oom(bytes: usize) -> Error {
    Error::OutOfMemory {
        what: "decode cache rows",
        bytes,
    }
}

/// Host buffers of one element type: one per KV head for K and for V (a
/// `Vec`'s length is the rows written, its capacity the allocation).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct HostBufs<T> {
    k: Vec<Vec<T>>,
    v: Vec<Vec<T>>,
}

impl<T: Copy> HostBufs<T> {
    /// `k[h]` and `v[h]` hold KV head `h`'s rows.
    pub(super) fn new(k: Vec<Vec<T>>, v: Vec<Vec<T>>) -> Self {
        Self { k, v }
    }

    fn empty(heads: usize, d: usize, rows: usize) -> Result<Self> {
        let elements = rows.checked_mul(d);
        let oom = || oom(elements.map_or(usize::MAX, |e| e.saturating_mul(size_of::<T>())));
        let buf = || -> Result<Vec<Vec<T>>> {
            (0..heads)
                .map(|_| {
                    let mut b = Vec::new();
                    b.try_reserve_exact(elements.ok_or_else(oom)?)
                        .map_err(|_| oom())?;
                    Ok(b)
                })
                .collect()
        };
        Ok(Self {
            k: buf()?,
            v: buf()?,
        })
    }

    fn capacity(&self, d: usize) -> usize {
        self.k.first().map_or(0, |b| b.capacity() / d.max(1))
    }

    fn bytes(&self) -> usize {
        let elems: usize = self.k.iter().chain(&self.v).map(Vec::capacity).sum();
        elems * std::mem::size_of::<T>()
    }

    fn slice(&self, head: usize, rows: Range<usize>, d: usize) -> KvSlice<'_, T> {
        let r = rows.start * d..rows.end * d;
        KvSlice {
            k: &self.k[head][r.clone()],
            v: &self.v[head][r],
        }
    }

    fn write(&mut self, at: usize, src: &Self, rows: Range<usize>, d: usize) {
        let pairs = self.k.iter_mut().zip(&src.k);
        for (dst, s) in pairs.chain(self.v.iter_mut().zip(&src.v)) {
            debug_assert_eq!(dst.len(), at * d);
            dst.extend_from_slice(&s[rows.start * d..rows.end * d]);
        }
    }

    fn compact(&mut self, dead: usize, d: usize) {
        for b in self.k.iter_mut().chain(self.v.iter_mut()) {
            b.drain(..dead * d);
        }
    }

    fn grow(&mut self, rows: usize, d: usize) -> Result<()> {
        for b in self.k.iter_mut().chain(self.v.iter_mut()) {
            let more = rows * d - b.len();
            b.try_reserve_exact(more)
                .map_err(|_| oom(more.saturating_mul(size_of::<T>())))?;
        }
        Ok(())
    }
}

/// Host storage in one of its element types ([`host_dtype`]).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum HostKv {
    F32(HostBufs<f32>),
    Bf16(HostBufs<bf16>),
    F16(HostBufs<f16>),
}

/// The same expression on whichever element type a [`HostKv`] holds.
macro_rules! each_host {
    ($host:expr, $bufs:ident => $e:expr) => {
        match $host {
            HostKv::F32($bufs) => $e,
            HostKv::Bf16($bufs) => $e,
            HostKv::F16($bufs) => $e,
        }
    };
}

/// The element types of host storage, with their [`HostKv`] variant.
pub(super) trait HostElem: Element + PartialEq {
    /// The buffers of `kv`, which must be host storage of this type.
    fn bufs(kv: &Kv) -> &HostBufs<Self>;
    /// `bufs` as a store.
    fn wrap(bufs: HostBufs<Self>) -> Kv;
}

macro_rules! host_elem {
    ($t:ty, $variant:ident) => {
        impl HostElem for $t {
            fn bufs(kv: &Kv) -> &HostBufs<Self> {
                match kv {
                    Kv::Host(HostKv::$variant(b)) => b,
                    _ => unreachable!("a cache's stores all have the cache's storage"),
                }
            }
            fn wrap(bufs: HostBufs<Self>) -> Kv {
                Kv::Host(HostKv::$variant(bufs))
            }
        }
    };
}
host_elem!(f32, F32);
host_elem!(bf16, Bf16);
host_elem!(f16, F16);

/// K and V of one store, `[kv_heads, rows, head_dim]`; the allocation holds
/// `capacity` rows. Which rows mean what is [`Rows`]' business: `Kv` only
/// allocates, copies and hands out row runs, so both storages share every
/// index computation.
#[derive(Debug, Clone)]
pub(super) enum Kv {
    /// Host buffers ([`HostKv`]).
    Host(HostKv),
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
    /// Empty host buffers for `rows` rows per head, for a model of `dtype`,
    /// or [`Error::OutOfMemory`] when the memory is not there (instead of
    /// aborting the process).
    pub(super) fn host(heads: usize, d: usize, rows: usize, dtype: DType) -> Result<Self> {
        Ok(Kv::Host(match host_dtype(dtype) {
            DType::BF16 => HostKv::Bf16(HostBufs::empty(heads, d, rows)?),
            DType::F16 => HostKv::F16(HostBufs::empty(heads, d, rows)?),
            _ => HostKv::F32(HostBufs::empty(heads, d, rows)?),
        }))
    }

    pub(super) fn tensor(k: Tensor, v: Tensor) -> Self {
        Kv::Tensor {
            k,
            v,
            owner: Arc::new(()),
        }
    }

    /// Zeroed `[heads, rows, d]` tensors of `dtype` on `device`, at least one
    /// row: a zero-byte device allocation is not portable (`cuMemAlloc`
    /// rejects it).
    pub(super) fn zeros(
        heads: usize,
        d: usize,
        rows: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let z = || zeros((heads, rows.max(1), d), dtype, device);
        Ok(Kv::tensor(z()?, z()?))
    }

    /// Rows the allocation holds.
    pub(super) fn capacity(&self, d: usize) -> usize {
        match self {
            Kv::Host(host) => each_host!(host, b => b.capacity(d)),
            Kv::Tensor { k, .. } => k.dims()[1],
        }
    }

    pub(super) fn bytes(&self) -> usize {
        match self {
            Kv::Host(host) => each_host!(host, b => b.bytes()),
            Kv::Tensor { k, v, .. } => {
                (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()
            }
        }
    }

    /// Rows `rows` of KV head `head` (host storage of element type `T`).
    pub(super) fn slice<T: HostElem>(
        &self,
        head: usize,
        rows: Range<usize>,
        d: usize,
    ) -> KvSlice<'_, T> {
        T::bufs(self).slice(head, rows, d)
    }

    /// Rows `rows` of every KV head (tensor storage).
    pub(super) fn rows(&self, rows: Range<usize>) -> KvRows<'_> {
        let Kv::Tensor { k, v, .. } = self else {
            unreachable!("a cache's stores all have the cache's storage")
        };
        KvRows { k, v, rows }
    }

    /// Appends rows `rows` of KV head `head` as f32 to `k` and `v` (either
    /// storage, any host dtype; the tiled step gathers a head's keys this
    /// way).
    pub(super) fn push_f32(
        &self,
        head: usize,
        rows: Range<usize>,
        d: usize,
        k: &mut Vec<f32>,
        v: &mut Vec<f32>,
    ) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        match self {
            Kv::Host(host) => each_host!(host, bufs => {
                let s = bufs.slice(head, rows, d);
                k.extend(s.k.iter().map(|x| x.to_f32()));
                v.extend(s.v.iter().map(|x| x.to_f32()));
            }),
            Kv::Tensor { k: kt, v: vt, .. } => {
                for (src, dst) in [(kt, k), (vt, v)] {
                    let run = src.get(head)?.narrow(0, rows.start, rows.len())?;
                    dst.extend(run.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
                }
            }
        }
        Ok(())
    }

    /// Whether the first `len` rows (all rows written) are equal.
    pub(super) fn same_rows(&self, other: &Self, len: usize) -> bool {
        match (self, other) {
            (Kv::Host(a), Kv::Host(b)) => a == b,
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
    pub(super) fn own(&mut self) -> Result<()> {
        if let Kv::Tensor { k, v, owner } = self {
            if Arc::strong_count(owner) > 1 {
                *self = Kv::tensor(k.copy()?, v.copy()?);
            }
        }
        Ok(())
    }

    /// Writes rows `rows` of `src` (same storage) at row `at`, which is the
    /// number of rows written so far.
    pub(super) fn write(
        &mut self,
        at: usize,
        src: &Kv,
        rows: Range<usize>,
        d: usize,
    ) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        self.own()?;
        match (self, src) {
            (Kv::Host(HostKv::F32(a)), Kv::Host(HostKv::F32(b))) => a.write(at, b, rows, d),
            (Kv::Host(HostKv::Bf16(a)), Kv::Host(HostKv::Bf16(b))) => a.write(at, b, rows, d),
            (Kv::Host(HostKv::F16(a)), Kv::Host(HostKv::F16(b))) => a.write(at, b, rows, d),
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
    pub(super) fn compact(&mut self, dead: usize, len: usize, d: usize) -> Result<()> {
        self.own()?;
        match self {
            Kv::Host(host) => each_host!(host, b => b.compact(dead, d)),
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
    pub(super) fn grow(&mut self, len: usize, rows: usize, d: usize) -> Result<()> {
        match self {
            Kv::Host(host) => each_host!(host, b => b.grow(rows, d))?,
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

/// A zeroed tensor; on the CPU from a fallibly reserved buffer, so memory
/// that is not there is [`Error::OutOfMemory`] rather than an abort inside
/// candle's allocation (devices report their own allocation errors).
fn zeros(shape: (usize, usize, usize), dtype: DType, device: &Device) -> Result<Tensor> {
    fn host<T: candle_core::WithDType>(shape: (usize, usize, usize)) -> Result<Tensor> {
        let n = shape.0 * shape.1 * shape.2;
        let mut data: Vec<T> = Vec::new();
        data.try_reserve_exact(n).map_err(|_| Error::OutOfMemory {
            what: "decode cache tensors",
            bytes: n.saturating_mul(std::mem::size_of::<T>()),
        })?;
        data.resize(n, T::zero());
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    }
    if !device.is_cpu() {
        return Ok(Tensor::zeros(shape, dtype, device)?);
    }
    match dtype {
        DType::F32 => host::<f32>(shape),
        DType::F16 => host::<half::f16>(shape),
        DType::BF16 => host::<half::bf16>(shape),
        DType::F64 => host::<f64>(shape),
        _ => Ok(Tensor::zeros(shape, dtype, device)?),
    }
}

/// K and V rows of one kind for one (layer, sequence). The first `dead` rows
/// are no longer visible and wait to be reclaimed; rows `dead..len` are live.
#[derive(Debug, Clone)]
pub(super) struct Rows {
    pub(super) kv: Kv,
    pub(super) dead: usize,
    pub(super) len: usize,
}

impl PartialEq for Rows {
    fn eq(&self, other: &Self) -> bool {
        self.dead == other.dead && self.len == other.len && self.kv.same_rows(&other.kv, self.len)
    }
}

impl Rows {
    pub(super) fn new(kv: Kv) -> Self {
        Self {
            kv,
            dead: 0,
            len: 0,
        }
    }

    pub(super) fn live(&self) -> usize {
        self.len - self.dead
    }

    /// Storage rows of live rows `rows` (0 = first live row).
    pub(super) fn at(&self, rows: Range<usize>) -> Range<usize> {
        self.dead + rows.start..self.dead + rows.end
    }

    /// Makes room for `rows` live rows in all: drops dead rows first, then
    /// grows to exactly that (a prompt's rows are known before they come).
    pub(super) fn reserve(&mut self, rows: usize, d: usize) -> Result<()> {
        if self.kv.capacity(d) < rows {
            self.compact(d)?;
            self.kv.grow(self.len, rows, d)?;
        }
        Ok(())
    }

    pub(super) fn compact(&mut self, d: usize) -> Result<()> {
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
    pub(super) fn extend(
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
pub(super) struct LayerStore {
    pub(super) text: Rows,
    pub(super) summaries: Rows,
}

/// One sequence of the batch.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Sequence {
    pub(super) len: usize,
    pub(super) layers: Vec<LayerStore>,
}

impl Sequence {
    /// Makes room in every store for a sequence of `n` text tokens, and at
    /// least the rows each store holds now (a chunked append works on a copy
    /// that then replaces the original, whose allocations it keeps).
    pub(super) fn reserve_for(
        &mut self,
        spec: &CacheSpec,
        n: usize,
        keep: &Sequence,
    ) -> Result<()> {
        let (c, s, d) = (spec.ksa.chunk_size(), spec.ksa.summaries(), spec.head_dim);
        for ((l, store), old) in self.layers.iter_mut().enumerate().zip(&keep.layers) {
            let (text, sums) = match spec.layers[l] {
                (LayerKind::Summary, w) => {
                    (n.min(w.saturating_mul(c).saturating_add(c)), (n / c) * s)
                }
                (LayerKind::Bypass, _) => (n, 0),
            };
            store.text.reserve(text.max(old.text.kv.capacity(d)), d)?;
            store
                .summaries
                .reserve(sums.max(old.summaries.kv.capacity(d)), d)?;
        }
        Ok(())
    }
}

/// One sequence's new K/V of one layer, `[kv_heads, rows, d]` per kind, in
/// the cache's storage.
pub(super) struct Staged {
    pub(super) text: Kv,
    pub(super) text_rows: usize,
    pub(super) sums: Kv,
    pub(super) sum_rows: usize,
}

impl KsaCache {
    /// Appends one input's new K/V to every layer and drops text that left
    /// the window. Everything was checked and computed before; only a device
    /// failure of tensor storage can make it fail.
    pub(super) fn commit(&mut self, plan: &Plan, staged: Vec<Staged>) -> Result<()> {
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
