//! The fast CPU path: block-sparse KSA attention and tiled causal attention.
//!
//! Per (batch, key/value head) the keys and values are gathered once, in
//! their dtype, into gathered order ([`crate::mask::Gathered`]: the summaries
//! chunk-major, then the `n` text rows in text order), so that every query's
//! keys are two dense ranges. Text queries
//! are processed in tiles of consecutive tokens, all query heads of a GQA
//! group together (one K/V tile serves `hq / hkv` heads), over the key tiles
//! [`Schedule`] lists; scores and the value product are register-blocked
//! GEMM microkernels (AVX-512F or AVX2/FMA as [`CpuIsa`] says, `matmul.rs`;
//! `vdpbf16ps` for bf16 scores on AVX512_BF16; the `gemm` crate on the
//! portable variant). Scores are key-major (`S^T = K Q^T`: the query tile is
//! packed once, key tiles are read in place), the softmax is online
//! (streaming) in f32 and runs down the score columns, and only edge tiles
//! are masked, per row, by a select. While one tile product runs, the
//! operand of the next is prefetched (`matmul::Prefetch`: K and V stream
//! from L3). Summary queries (`C + j + 1` keys each)
//! take a separate, direct pass. Work is spread over rayon's pool by query
//! tile. Memory beyond inputs and outputs: the gathered K/V of one head in
//! the input dtype (KSA only: causal attention reads K/V in place) plus
//! per-thread tiles; nothing of size `N x N`.
//!
//! Precision: f32, f16 and bf16 are computed in f32 and rounded once to the
//! input dtype: half-precision Q, K and V are converted while a tile is
//! loaded or packed (F16C for f16, shifts for bf16), never copied whole as
//! f32. f64 is computed in f32 as well (use [`crate::reference`] when f64
//! accuracy matters). Non-contiguous inputs are copied to contiguous ones.

pub(crate) mod backward;
pub mod decode;
pub mod isa;
pub(crate) mod matmul;
pub(crate) mod simd;
pub(crate) mod tile;

use crate::check::{check_qkv, QkvDims};
use crate::layout::KsaLayout;
use crate::schedule::{Schedule, TileSizes};
use crate::{AttentionOptions, Error, Result};
use candle_core::{DType, Storage, Tensor};
use half::{bf16, f16};
pub use isa::CpuIsa;
use rayon::prelude::*;
use std::borrow::Cow;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

/// KSA attention on CPU tensors with each row's log-sum-exp: `(out, lse)`,
/// `out: [b, hq, N, d]` in the input dtype, `lse: [b, hq, N]` f32, the
/// natural log of the sum of `exp(scale * q.k)` over the row's allowed keys
/// (what a backward pass needs to recompute probabilities).
pub fn attention_with_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: &KsaLayout,
    options: &AttentionOptions,
) -> Result<(Tensor, Tensor)> {
    CpuKernel::default().attention(q, k, v, layout, options)
}

/// Plain causal attention over all positions on CPU tensors, with each row's
/// log-sum-exp; shapes and dtypes as [`attention_with_lse`].
pub fn causal_attention_with_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    options: &AttentionOptions,
) -> Result<(Tensor, Tensor)> {
    CpuKernel::default().causal_attention(q, k, v, options)
}

/// The CPU kernel with explicit tile sizes and kernel variant (the free
/// functions use the tuned defaults and the process's variant; others exist
/// for tests, tuning and A/B measurement).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuKernel {
    /// Text queries per query tile and keys per key tile.
    pub tiles: TileSizes,
    /// The kernel variant; `None`: the process's ([`isa::process_isa`]). A
    /// variant this CPU lacks makes every call return [`Error::CpuIsa`].
    pub isa: Option<CpuIsa>,
}

impl CpuKernel {
    /// KSA attention with log-sum-exp; see [`attention_with_lse`].
    pub fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        layout: &KsaLayout,
        options: &AttentionOptions,
    ) -> Result<(Tensor, Tensor)> {
        self.attention_with_progress(q, k, v, layout, options, &|_, _| {})
    }

    /// [`CpuKernel::attention`] that reports progress: `progress(done, total)`
    /// is called (from worker threads) after each unit of work, with `done`
    /// counting up to `total`. For progress bars over long contexts.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_with_progress(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        layout: &KsaLayout,
        options: &AttentionOptions,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<(Tensor, Tensor)> {
        let dims = check_qkv(q, k, v, "ksa::cpu::attention")?;
        layout.check_len("q", dims.len)?;
        let schedule = Schedule::ksa(layout, self.tiles)?;
        self.run(q, k, v, dims, &schedule, options, Some(progress))
    }

    /// Causal attention with log-sum-exp; see [`causal_attention_with_lse`].
    pub fn causal_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        options: &AttentionOptions,
    ) -> Result<(Tensor, Tensor)> {
        let dims = check_qkv(q, k, v, "ksa::cpu::causal_attention")?;
        let schedule = Schedule::causal(dims.len, self.tiles)?;
        self.run(q, k, v, dims, &schedule, options, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        dims: QkvDims,
        schedule: &Schedule,
        options: &AttentionOptions,
        progress: Option<&(dyn Fn(usize, usize) + Sync)>,
    ) -> Result<(Tensor, Tensor)> {
        if !q.device().is_cpu() {
            return Err(Error::UnsupportedDevice {
                op: "ksa::cpu",
                device: format!("{:?}", q.device().location()),
                reason: "the CPU path takes CPU tensors",
            });
        }
        let isa = match self.isa {
            Some(isa) => isa.check()?,
            None => isa::process_isa()?,
        };
        let scale = options.scale.unwrap_or(1.0 / (dims.head_dim as f64).sqrt()) as f32;
        let contiguous = crate::check::contiguous;
        let (q, k, v) = (contiguous(q)?, contiguous(k)?, contiguous(v)?);
        let (out, lse) = match q.dtype() {
            DType::F32 => run_typed::<f32>(&q, &k, &v, dims, schedule, scale, isa, progress)?,
            DType::F16 => run_typed::<f16>(&q, &k, &v, dims, schedule, scale, isa, progress)?,
            DType::BF16 => run_typed::<bf16>(&q, &k, &v, dims, schedule, scale, isa, progress)?,
            DType::F64 => run_typed::<f64>(&q, &k, &v, dims, schedule, scale, isa, progress)?,
            got => {
                return Err(Error::UnsupportedDType {
                    op: "ksa::cpu",
                    got,
                    supported: "f32, f16, bf16, f64",
                })
            }
        };
        Ok((out, lse))
    }
}

/// The floating-point dtypes of the CPU path, converted to and from f32.
pub trait Element: candle_core::WithDType + Copy + Send + Sync {
    /// Whether [`Element::to_f32`] is a few vector instructions (f32: none,
    /// bf16: a shift), so products may widen elements inside their loops
    /// instead of through a converted copy.
    const CHEAP_WIDEN: bool = false;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
    /// The slice itself when it already is f32 (no conversion copy needed).
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    /// The slice's bf16 bit patterns when it is bf16 (the scores' bf16 dot
    /// products read them as they are).
    fn as_bf16_bits(_: &[Self]) -> Option<&[u16]> {
        None
    }
    /// `dst[i] = src[i] as f32` (equal lengths), vectorized where the dtype
    /// allows: F16C for f16 (runtime-detected by `half`), shifts for bf16.
    fn convert(src: &[Self], dst: &mut [f32]) {
        for (y, x) in dst.iter_mut().zip(src) {
            *y = x.to_f32();
        }
    }
    /// Whether every element is finite (no NaN, no infinity), scanned
    /// without an early exit so that it vectorizes (the forward's edge tiles
    /// check their values with it).
    fn all_finite(x: &[Self]) -> bool {
        x.iter().all(|v| v.to_f32().is_finite())
    }
    /// `src` as f32: itself for f32, else converted into `buf` (resized).
    #[inline(always)]
    fn row_f32<'a>(src: &'a [Self], buf: &'a mut Vec<f32>) -> &'a [f32] {
        match Self::as_f32(src) {
            Some(x) => x,
            None => {
                buf.resize(src.len(), 0.0);
                let buf = &mut buf[..src.len()];
                Self::convert(src, buf);
                buf
            }
        }
    }
}

impl Element for f32 {
    const CHEAP_WIDEN: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
    fn as_f32(x: &[Self]) -> Option<&[f32]> {
        Some(x)
    }
    fn all_finite(x: &[Self]) -> bool {
        simd::all_finite(x)
    }
}

impl Element for f64 {
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn from_f32(x: f32) -> Self {
        x as f64
    }
}

impl Element for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn convert(src: &[Self], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst);
    }
    fn all_finite(x: &[Self]) -> bool {
        use half::slice::HalfFloatSliceExt;
        simd::all_finite_bits(x.reinterpret_cast(), 0x7c00)
    }
}

impl Element for bf16 {
    const CHEAP_WIDEN: bool = true;
    fn as_bf16_bits(src: &[Self]) -> Option<&[u16]> {
        use half::slice::HalfFloatSliceExt;
        Some(src.reinterpret_cast())
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // The high half of an f32 (what `convert` does for whole rows).
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn all_finite(x: &[Self]) -> bool {
        use half::slice::HalfFloatSliceExt;
        simd::all_finite_bits(x.reinterpret_cast(), 0x7f80)
    }
    #[inline(always)]
    fn convert(src: &[Self], dst: &mut [f32]) {
        // bf16 is the high half of an f32: a shift the compiler vectorizes.
        for (y, x) in dst.iter_mut().zip(src) {
            *y = f32::from_bits(u32::from(x.to_bits()) << 16);
        }
    }
}

/// Runs `f` on the data of a contiguous CPU tensor.
fn with_slice<T: Element, R>(x: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (storage, layout) = x.storage_and_layout();
    if layout.shape().elem_count() == 0 {
        // An empty view's offset may lie past its storage (a `narrow` of an
        // empty tensor): there is nothing to slice.
        return f(&[]);
    }
    let Storage::Cpu(cpu) = &*storage else {
        unreachable!("checked to be a CPU tensor")
    };
    let (start, end) = layout
        .contiguous_offsets()
        .expect("made contiguous by the caller");
    f(&cpu.as_slice::<T>()?[start..end])
}

#[allow(clippy::too_many_arguments)]
fn run_typed<T: Element>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dims: QkvDims,
    schedule: &Schedule,
    scale: f32,
    isa: CpuIsa,
    progress: Option<&(dyn Fn(usize, usize) + Sync)>,
) -> Result<(Tensor, Tensor)> {
    let (out, lse) = with_slice::<T, _>(q, |q| {
        with_slice::<T, _>(k, |k| {
            with_slice::<T, _>(v, |v| {
                Ok(forward_vecs(q, k, v, dims, schedule, scale, isa, progress))
            })
        })
    })?;
    let (b, hq, n, d) = (dims.batch, dims.q_heads, dims.len, dims.head_dim);
    let device = q.device();
    Ok((
        Tensor::from_vec(out, (b, hq, n, d), device)?,
        Tensor::from_vec(lse, (b, hq, n), device)?,
    ))
}

/// The forward on contiguous `[b, h, N, d]` slices: `(out, lse)` as vectors.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_vecs<T: Element>(
    q: &[T],
    k: &[T],
    v: &[T],
    dims: QkvDims,
    schedule: &Schedule,
    scale: f32,
    isa: CpuIsa,
    progress: Option<&(dyn Fn(usize, usize) + Sync)>,
) -> (Vec<T>, Vec<f32>) {
    let QkvDims {
        batch: b,
        q_heads: hq,
        len: n,
        head_dim: d,
        ..
    } = dims;
    let mut out = vec![T::from_f32(0.0); b * hq * n * d];
    let mut lse = vec![0f32; b * hq * n];
    forward(
        q, k, v, dims, schedule, scale, isa, progress, &mut out, &mut lse,
    );
    (out, lse)
}

/// One head's K or V (`[N, d]`, slot order) in gathered order, in its own
/// dtype (half-precision rows become f32 only when the tile products pack
/// them), borrowed when no reordering is needed.
pub(crate) fn gather<'a, T: Element>(
    src: &'a [T],
    slots: &[u32],
    d: usize,
    identity: bool,
) -> Cow<'a, [T]> {
    if identity {
        return Cow::Borrowed(src);
    }
    let mut dst = vec![T::from_f32(0.0); slots.len() * d];
    dst.par_chunks_mut(d * 256)
        .enumerate()
        .for_each(|(block, rows)| {
            for (i, row) in rows.chunks_mut(d).enumerate() {
                let slot = slots[block * 256 + i] as usize;
                row.copy_from_slice(&src[slot * d..(slot + 1) * d]);
            }
        });
    Cow::Owned(dst)
}

/// A pointer to the output buffers that parallel tasks write through, each
/// to its own rows.
#[derive(Clone, Copy)]
pub(crate) struct Out<T> {
    pub(crate) out: *mut T,
    pub(crate) lse: *mut f32,
}
// SAFETY: tasks write disjoint rows (each (head, slot) row belongs to exactly
// one query tile or summary task), and the buffers outlive the parallel loop.
unsafe impl<T: Send> Send for Out<T> {}
unsafe impl<T: Send> Sync for Out<T> {}

/// A work item of one (batch, key/value head): a text query tile, or the
/// summary queries of a range of chunks.
#[derive(Clone, Copy)]
pub(crate) enum Task {
    Text(usize),
    Summaries(usize, usize),
}

const SUMMARY_CHUNKS_PER_TASK: usize = 256;

/// The work items of one head (forward and backward): text query tiles,
/// heaviest (last) first so the pool ends balanced, then groups of summary
/// chunks.
pub(crate) fn tasks(schedule: &Schedule) -> Vec<Task> {
    let chunks = schedule.summary_query_chunks();
    let mut tasks: Vec<Task> = (0..schedule.query_tiles()).rev().map(Task::Text).collect();
    tasks.extend(
        chunks
            .clone()
            .step_by(SUMMARY_CHUNKS_PER_TASK)
            .map(|c| Task::Summaries(c, (c + SUMMARY_CHUNKS_PER_TASK).min(chunks.end))),
    );
    tasks
}

/// The query heads `first_head..first_head + group` of one KV head attending
/// over K/V the caller already gathered (f32, `[rows, d]` in the gathered
/// order of `schedule`, a cache step's summaries then its window text from
/// [`QueryOffset::first_key`](crate::schedule::QueryOffset::first_key)): the
/// tiled kernel of the forward, for the queries `schedule` runs. `q` is
/// `[q_heads, q_rows, d]` f32; the rows the schedule names are written to
/// `out` (same shape) and `lse` (`[q_heads, q_rows]`), the others left alone.
/// Runs the process's kernel variant ([`CpuIsa`]); an unusable
/// `KSA_CPU_ISA` is its error.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_gathered(
    q: &[f32],
    (q_heads, q_rows, d): (usize, usize, usize),
    heads: Range<usize>,
    k: &[f32],
    v: &[f32],
    schedule: &Schedule,
    scale: f32,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    assert!(
        q.len() == q_heads * q_rows * d && out.len() == q.len() && lse.len() == q_heads * q_rows,
        "attend_gathered: buffer sizes"
    );
    // The tile kernels write the rows the schedule names through a raw
    // pointer: every one must lie inside `out`.
    assert!(
        heads.end <= q_heads && schedule.step_rows().end <= q_rows,
        "attend_gathered: heads or rows out of range"
    );
    let ctx = tile::Context {
        q,
        k,
        v,
        schedule,
        scale,
        len: q_rows,
        d,
        q_heads,
        batch: 0,
        first_head: heads.start,
        group: heads.len(),
        isa: isa::process_isa()?,
        out: Out {
            out: out.as_mut_ptr(),
            lse: lse.as_mut_ptr(),
        },
    };
    tasks(schedule).par_iter().for_each_init(
        || tile::Scratch::new(&ctx),
        |scratch, task| match *task {
            Task::Text(t) => tile::text_tile(&ctx, scratch, t),
            Task::Summaries(c0, c1) => tile::summary_chunks(&ctx, scratch, c0..c1),
        },
    );
    Ok(())
}

/// Largest per-head gathered K/V (bytes) for which heads run in parallel.
const PARALLEL_HEADS_MAX_BYTES: usize = 4 << 20;

#[allow(clippy::too_many_arguments)]
fn forward<T: Element>(
    q: &[T],
    k: &[T],
    v: &[T],
    dims: QkvDims,
    schedule: &Schedule,
    scale: f32,
    isa: CpuIsa,
    progress: Option<&(dyn Fn(usize, usize) + Sync)>,
    out: &mut [T],
    lse: &mut [f32],
) {
    let QkvDims {
        batch,
        q_heads: hq,
        kv_heads: hkv,
        len: n,
        head_dim: d,
    } = dims;
    if n == 0 || d == 0 || hq == 0 {
        // Empty outputs; with d = 0 there are no scores, and lse stays 0.
        return;
    }
    let slots = schedule.mask().gathered().slots();
    let identity = schedule.layout().is_none();
    let tasks = tasks(schedule);
    let ptr = Out {
        out: out.as_mut_ptr(),
        lse: lse.as_mut_ptr(),
    };
    let group = hq / hkv;
    let (done, total) = (AtomicUsize::new(0), batch * hkv * tasks.len());
    let run_head = |&(bi, kvh): &(usize, usize)| {
        let head = (bi * hkv + kvh) * n * d;
        let kg = gather(&k[head..head + n * d], &slots, d, identity);
        let vg = gather(&v[head..head + n * d], &slots, d, identity);
        let ctx = tile::Context {
            q,
            k: &kg,
            v: &vg,
            schedule,
            scale,
            len: n,
            d,
            q_heads: hq,
            batch: bi,
            first_head: kvh * group,
            group,
            isa,
            out: ptr,
        };
        tasks.par_iter().for_each_init(
            || tile::Scratch::new(&ctx),
            |scratch, task| {
                match *task {
                    Task::Text(t) => tile::text_tile(&ctx, scratch, t),
                    Task::Summaries(c0, c1) => tile::summary_chunks(&ctx, scratch, c0..c1),
                }
                if let Some(report) = progress {
                    report(done.fetch_add(1, Ordering::Relaxed) + 1, total);
                }
            },
        );
    };
    let heads: Vec<(usize, usize)> = (0..batch)
        .flat_map(|bi| (0..hkv).map(move |kvh| (bi, kvh)))
        .collect();
    // Short sequences have too few query tiles per head to keep every core
    // busy, so heads run in parallel too; long ones run one head at a time,
    // which bounds the gathered K/V in memory to a single head's.
    if 2 * n * d * std::mem::size_of::<f32>() <= PARALLEL_HEADS_MAX_BYTES {
        heads.par_iter().for_each(run_head);
    } else {
        heads.iter().for_each(run_head);
    }
}

#[cfg(test)]
mod tests {
    use super::Element;
    use half::{bf16, f16};

    /// The finiteness scans of the half types agree with `is_finite` on
    /// every bit pattern, alone and after finite elements.
    #[test]
    fn all_finite_matches_is_finite_for_every_half_value() {
        for bits in 0..=u16::MAX {
            let (h, b) = (f16::from_bits(bits), bf16::from_bits(bits));
            assert_eq!(Element::all_finite(&[h]), h.is_finite(), "f16 {bits:#06x}");
            assert_eq!(Element::all_finite(&[b]), b.is_finite(), "bf16 {bits:#06x}");
            let ones = [f16::ONE; 19];
            let mut run = ones.to_vec();
            run.push(h);
            assert_eq!(
                Element::all_finite(&run[..]),
                h.is_finite(),
                "f16 run {bits:#06x}"
            );
        }
        assert!(Element::all_finite(&[bf16::MAX, bf16::MIN, bf16::ZERO]));
        assert!(!Element::all_finite(&[f32::NAN]));
    }

    /// The widenings equal `half`'s on every bit pattern (NaNs stay NaN).
    #[test]
    fn widening_is_exact_for_every_half_value() {
        for bits in 0..=u16::MAX {
            let (h, b) = (f16::from_bits(bits), bf16::from_bits(bits));
            for (got, want) in [
                (Element::to_f32(h), f16::to_f32(h)),
                (Element::to_f32(b), bf16::to_f32(b)),
            ] {
                assert!(
                    got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                    "{bits:#06x}: {got} vs {want}"
                );
            }
        }
    }
}
