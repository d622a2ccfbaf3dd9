//! The launch of the split-KV decode kernels (`kernels/ksa_decode.cu`) as one
//! piece of data: the per-sequence key slice table, the split of every
//! sequence's keys into work items, both kernels' names, grids, blocks and
//! argument lists in their order. The candle/cudarc path and the emulator
//! tests drive exactly this.
//!
//! One decode step attends one query token per sequence (`q: [n_seq, hq, d]`)
//! over that sequence's cached K/V, given per sequence as a list of
//! [`DecodeSlice`]s (contiguous rows of every KV head, in any order: softmax
//! does not care). The split kernel runs one CTA per (work item, KV head, head
//! chunk) and writes f32 partial outputs and log-sum-exps; the combine kernel
//! merges them per (sequence, query head) into `o: [n_seq, hq, d]` (element
//! type) and `lse: [n_seq, hq]` (f32, natural log of the scaled scores).
//!
//! A "sequence" is really one query row with its own key list: the `S`
//! summary queries of a chunk a step completes (whose keys are the chunk's
//! text and summaries `0..=j`) can be entries of their own beside the text
//! query, each reading its keys once per KV head.

use super::launch::{check_heads, within, Arg, Elem};
use crate::{Error, Result};

/// Threads of a split CTA.
pub const SPLIT_THREADS: u32 = 128;
/// Threads of a combine CTA (one warp per sequence and query head).
pub const COMBINE_THREADS: u32 = 32;
/// Most query heads one split CTA serves (its register budget); larger GQA
/// groups use several head chunks, each reading the KV head once.
pub const MAX_HEADS_PER_CTA: usize = 8;
/// Fewest keys worth a split of their own when the work is spread to fill
/// the GPU: below this the partial output a split writes and the combine
/// reads back costs more than a few percent of its K/V bytes.
pub const MIN_SPLIT_KEYS: usize = 256;
/// CTAs the automatic split aims for: two per SM of an H100 (132 SMs).
pub const TARGET_CTAS: usize = 264;

/// Contiguous K and V rows of every KV head: row `r` of KV head `h` is
/// `head_dim` elements at element offset `h * head_stride + r * head_dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeSlice {
    /// Device address of row 0 of KV head 0 of K (16-byte aligned).
    pub k: u64,
    /// Device address of row 0 of KV head 0 of V (16-byte aligned).
    pub v: u64,
    /// Elements between KV heads of K (a multiple of 8).
    pub k_head_stride: u64,
    /// Elements between KV heads of V (a multiple of 8).
    pub v_head_stride: u64,
    /// Rows (keys); may be 0.
    pub rows: usize,
}

/// Everything about one decode step except device addresses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeProblem {
    /// Query heads (`q`, `o` and `lse` have as many).
    pub q_heads: usize,
    /// Key/value heads (`q_heads % kv_heads == 0`).
    pub kv_heads: usize,
    /// Head dimension: 64 or 128.
    pub head_dim: usize,
    /// Element type of q, K, V and o.
    pub elem: Elem,
    /// Softmax scale (usually `1/sqrt(head_dim)`).
    pub scale: f32,
    /// Keys per split. `None`: one split per sequence when the sequences
    /// alone give [`TARGET_CTAS`] CTAs, else splits of at least
    /// [`MIN_SPLIT_KEYS`] keys sized to reach it.
    pub split_keys: Option<usize>,
}

impl DecodeProblem {
    /// A problem with scale `1/sqrt(head_dim)` and automatic splits.
    pub fn new(q_heads: usize, kv_heads: usize, head_dim: usize, elem: Elem) -> Self {
        Self {
            q_heads,
            kv_heads,
            head_dim,
            elem,
            scale: 1.0 / (head_dim as f32).sqrt(),
            split_keys: None,
        }
    }
}

/// Device addresses of the buffers of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodePointers {
    /// `q: [n_seq, hq, d]`, element type.
    pub q: u64,
    /// `o: [n_seq, hq, d]`, element type (written).
    pub o: u64,
    /// `lse: [n_seq, hq]`, f32 (written).
    pub lse: u64,
    /// Scratch `[work_items, hq, d]` f32 ([`DecodeLaunch::o_part_len`]).
    pub o_part: u64,
    /// Scratch `[work_items, hq]` f32 ([`DecodeLaunch::lse_part_len`]).
    pub lse_part: u64,
    /// The uploaded [`DecodeLaunch::work`] table (u32).
    pub work: u64,
    /// The uploaded [`DecodeLaunch::slices`] table (u64).
    pub slices: u64,
    /// The uploaded [`DecodeLaunch::seq_work`] table (u32).
    pub seq_work: u64,
}

/// One kernel launch: entry point, grid, block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// Entry point in `ksa::cuda::ptx::DECODE` (feature `ptx`).
    pub name: String,
    /// Grid dimensions.
    pub grid: (u32, u32, u32),
    /// Block dimensions (no dynamic shared memory: both kernels use static).
    pub block: (u32, u32, u32),
}

/// A complete decode step: both kernels and the tables to upload.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeLaunch {
    /// `ksa_decode_{bf16,f16}_d{64,128}_g{1,2,4,8}`, grid (work items, KV
    /// heads x head chunks, 1).
    pub split: Kernel,
    /// `ksa_decode_combine_{bf16,f16}`, grid (query heads, sequences, 1).
    pub combine: Kernel,
    /// Keys per split used.
    pub split_keys: usize,
    /// Work items: `{seq, k_begin, k_end, slice_begin, slice_end}` (5 x u32).
    pub work: Vec<u32>,
    /// Slice records: `{k, v, k_head_stride, v_head_stride, key_start, rows}`.
    pub slices: Vec<u64>,
    /// Work items of sequence `i`: `seq_work[i]..seq_work[i + 1]`.
    pub seq_work: Vec<u32>,
    /// Keys of every sequence (per KV head).
    pub keys: Vec<usize>,
    q_heads: usize,
    head_dim: usize,
    split_scalars: Vec<Arg>,
}

impl DecodeLaunch {
    /// The launch of one step for sequences whose keys are `seqs[i]` (every
    /// sequence needs at least one key; at most 65,535 sequences).
    pub fn new(problem: &DecodeProblem, seqs: &[Vec<DecodeSlice>]) -> Result<Self> {
        let p = problem;
        check_heads("ksa CUDA decode", p.head_dim, p.q_heads, p.kv_heads)?;
        within("sequences of a CUDA decode step", seqs.len(), 65_535)?;
        within("query heads of a CUDA decode step", p.q_heads, 65_535)?;
        let group = p.q_heads / p.kv_heads;
        let head_chunks = group.div_ceil(MAX_HEADS_PER_CTA);
        within(
            "KV heads x head chunks of a CUDA decode step",
            p.kv_heads * head_chunks,
            65_535,
        )?;
        let heads_per_cta = group.min(MAX_HEADS_PER_CTA).next_power_of_two();

        let mut keys = Vec::with_capacity(seqs.len());
        for (i, slices) in seqs.iter().enumerate() {
            let bad = |reason: String| Error::DecodeSlices {
                sequence: i,
                reason,
            };
            for s in slices {
                // The kernel moves 16-byte chunks: rows and heads start aligned.
                if s.k % 16 != 0 || s.v % 16 != 0 {
                    return Err(bad(format!(
                        "K/V addresses {:#x}/{:#x} are not 16-byte aligned",
                        s.k, s.v
                    )));
                }
                if s.k_head_stride % 8 != 0 || s.v_head_stride % 8 != 0 {
                    return Err(bad(format!(
                        "head strides {}/{} are not multiples of 8 elements",
                        s.k_head_stride, s.v_head_stride
                    )));
                }
            }
            let n: usize = slices.iter().map(|s| s.rows).sum();
            if n == 0 {
                return Err(bad("no keys (a decode query always sees itself)".into()));
            }
            within("keys of a CUDA decode sequence", n, u32::MAX as usize)?;
            keys.push(n);
        }
        let split_keys = match p.split_keys {
            Some(0) => return Err(Error::InvalidConfig("0 keys per decode split".into())),
            Some(k) => k,
            None => auto_split(&keys, p.kv_heads * head_chunks),
        };

        let (mut work, mut table, mut seq_work) = (vec![], vec![], vec![0u32]);
        for (i, slices) in seqs.iter().enumerate() {
            let first = table.len() / 6;
            let mut start = 0u64;
            for s in slices.iter().filter(|s| s.rows > 0) {
                table.extend_from_slice(&[
                    s.k,
                    s.v,
                    s.k_head_stride,
                    s.v_head_stride,
                    start,
                    s.rows as u64,
                ]);
                start += s.rows as u64;
            }
            let last = table.len() / 6;
            for k0 in (0..keys[i]).step_by(split_keys) {
                let k1 = (k0 + split_keys).min(keys[i]);
                work.extend_from_slice(&[
                    i as u32,
                    k0 as u32,
                    k1 as u32,
                    first as u32,
                    last as u32,
                ]);
            }
            seq_work.push((work.len() / 5) as u32);
        }
        let n_work = work.len() / 5;
        within(
            "work items of a CUDA decode step",
            n_work,
            i32::MAX as usize,
        )?;
        // Work items name their slices with 32-bit indices, and the combine
        // kernel indexes the partial LSEs with 32-bit integers.
        within(
            "key slices of a CUDA decode step",
            table.len() / 6,
            u32::MAX as usize,
        )?;
        within(
            "work items x query heads of a CUDA decode step",
            n_work * p.q_heads,
            u32::MAX as usize,
        )?;
        let elem = match p.elem {
            Elem::Bf16 => "bf16",
            Elem::F16 => "f16",
        };
        Ok(Self {
            split: Kernel {
                name: format!("ksa_decode_{elem}_d{}_g{heads_per_cta}", p.head_dim),
                grid: (n_work as u32, (p.kv_heads * head_chunks) as u32, 1),
                block: (SPLIT_THREADS, 1, 1),
            },
            combine: Kernel {
                name: format!("ksa_decode_combine_{elem}"),
                grid: (p.q_heads as u32, seqs.len() as u32, 1),
                block: (COMBINE_THREADS, 1, 1),
            },
            split_keys,
            work,
            slices: table,
            seq_work,
            keys,
            q_heads: p.q_heads,
            head_dim: p.head_dim,
            split_scalars: vec![
                Arg::U32(p.q_heads as u32),
                Arg::U32(group as u32),
                Arg::U32(head_chunks as u32),
                Arg::F32(p.scale * std::f32::consts::LOG2_E),
            ],
        })
    }

    /// Whether there is nothing to launch (no sequences).
    pub fn is_empty(&self) -> bool {
        self.seq_work.len() == 1
    }

    /// Work items (splits over all sequences).
    pub fn work_items(&self) -> usize {
        self.work.len() / 5
    }

    /// f32 elements of the `o_part` scratch buffer.
    pub fn o_part_len(&self) -> usize {
        self.work_items() * self.q_heads * self.head_dim
    }

    /// f32 elements of the `lse_part` scratch buffer.
    pub fn lse_part_len(&self) -> usize {
        self.work_items() * self.q_heads
    }

    /// The split kernel's arguments, in its order.
    pub fn split_args(&self, ptrs: &DecodePointers) -> Vec<Arg> {
        let mut args = vec![
            Arg::U64(ptrs.q),
            Arg::U64(ptrs.o_part),
            Arg::U64(ptrs.lse_part),
            Arg::U64(ptrs.work),
            Arg::U64(ptrs.slices),
        ];
        args.extend_from_slice(&self.split_scalars);
        args
    }

    /// The combine kernel's arguments, in its order.
    pub fn combine_args(&self, ptrs: &DecodePointers) -> Vec<Arg> {
        vec![
            Arg::U64(ptrs.o_part),
            Arg::U64(ptrs.lse_part),
            Arg::U64(ptrs.seq_work),
            Arg::U64(ptrs.o),
            Arg::U64(ptrs.lse),
            Arg::U32(self.q_heads as u32),
            Arg::U32(self.head_dim as u32),
        ]
    }
}

#[cfg(feature = "cuda")]
pub use self::gpu::decode_attention;

#[cfg(feature = "cuda")]
mod gpu {
    //! The candle side: checks, then both kernels on candle's stream, built
    //! from the same [`DecodeLaunch`] the emulator tests drive.

    use super::{DecodeLaunch, DecodePointers, DecodeProblem, DecodeSlice, Kernel};
    use crate::attention::KvRows;
    use crate::cuda::launch::{kernel_elem, Arg, Elem};
    use crate::cuda::op::launch;
    use crate::AttentionOptions;
    use crate::{Error, Result};
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr, ValidAsZeroBits};
    use candle_core::cuda_backend::{CudaDType, CudaDevice};
    use candle_core::op::BackpropOp;
    use candle_core::{CudaStorage, DType, Storage, Tensor};

    const MODULE: &str = "ksa_decode";
    const OP: &str = "ksa CUDA decode";

    /// Attention of one query token per sequence, `q: [n_seq, q_heads,
    /// head_dim]` (bf16 or f16, contiguous, CUDA), over the keys `seqs[i]` of
    /// sequence `i` (at least one key each), with the scale of `options`. Returns `o: [n_seq, q_heads, head_dim]` (q's dtype) and the
    /// log-sum-exp `[n_seq, q_heads]` (f32, natural log of the scaled scores).
    pub fn decode_attention(
        q: &Tensor,
        seqs: &[Vec<KvRows<'_>>],
        options: &AttentionOptions,
    ) -> Result<(Tensor, Tensor)> {
        let (n_seq, hq, d) = q.dims3().map_err(|_| Error::Rank {
            name: "q",
            expected: 3,
            layout: "[n_seq, q_heads, head_dim]",
            got: q.dims().to_vec(),
        })?;
        let elem = kernel_elem(OP, q.dtype(), d)?;
        let dev = match q.device() {
            candle_core::Device::Cuda(d) => d.clone(),
            other => {
                return Err(Error::UnsupportedDevice {
                    op: OP,
                    device: format!("{:?}", other.location()),
                    reason: "the CUDA decode kernels need CUDA tensors",
                })
            }
        };
        // q is read in 16-byte chunks from its start.
        if !q.is_contiguous() || q.layout().start_offset() % 8 != 0 {
            return Err(Error::NonContiguous {
                name: "q",
                shape: q.dims().to_vec(),
                strides: q.stride().to_vec(),
            });
        }
        let mut kv_heads = None;
        for rows in seqs.iter().flatten() {
            for (name, t) in [("k", rows.k), ("v", rows.v)] {
                let cap = rows.check_tensor(name, t, d, &mut kv_heads)?;
                if t.dtype() != q.dtype() {
                    return Err(Error::DTypeMismatch {
                        a: name,
                        a_dtype: t.dtype(),
                        b: "q",
                        b_dtype: q.dtype(),
                    });
                }
                if !t.device().same_device(q.device()) {
                    return Err(Error::DeviceMismatch {
                        a: name,
                        a_device: format!("{:?}", t.device().location()),
                        b: "q",
                        b_device: format!("{:?}", q.device().location()),
                    });
                }
                let st = t.stride();
                if st[2] != 1 || (st[1] != d && cap > 1) {
                    return Err(Error::NonContiguous {
                        name,
                        shape: t.dims().to_vec(),
                        strides: st.to_vec(),
                    });
                }
            }
        }
        if seqs.len() != n_seq {
            return Err(Error::DimMismatch {
                what: "sequences",
                a: "q",
                a_val: n_seq,
                b: "seqs",
                b_val: seqs.len(),
            });
        }
        let mut problem = DecodeProblem::new(hq, kv_heads.unwrap_or(1), d, elem);
        crate::cuda::launch::check_scale(OP, options.scale)?;
        if let Some(s) = options.scale {
            problem.scale = s as f32;
        }
        if n_seq == 0 {
            let o = Tensor::zeros((0, hq, d), q.dtype(), q.device())?;
            return Ok((o, Tensor::zeros((0, hq), DType::F32, q.device())?));
        }
        match elem {
            Elem::Bf16 => run::<half::bf16>(&dev, q, seqs, &problem),
            Elem::F16 => run::<half::f16>(&dev, q, seqs, &problem),
        }
    }

    /// Index of `t` in `tensors`, added if new.
    fn intern<'a>(tensors: &mut Vec<&'a Tensor>, t: &'a Tensor) -> usize {
        tensors
            .iter()
            .position(|u| u.id() == t.id())
            .unwrap_or_else(|| {
                tensors.push(t);
                tensors.len() - 1
            })
    }

    /// Uploads the tables, launches both kernels, wraps the outputs. Every
    /// tensor's storage stays read-locked, and its device pointer's stream
    /// guard alive, until both launches are enqueued.
    fn run<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
        dev: &CudaDevice,
        q: &Tensor,
        seqs: &[Vec<KvRows<'_>>],
        problem: &DecodeProblem,
    ) -> Result<(Tensor, Tensor)> {
        let (n_seq, hq, d) = q.dims3()?;
        let stream = dev.cuda_stream();
        // Distinct tensors (a ring's two runs share one): one lock each.
        let mut tensors: Vec<&Tensor> = vec![q];
        let slots: Vec<Vec<(usize, usize)>> = seqs
            .iter()
            .map(|rows| {
                rows.iter()
                    .map(|r| (intern(&mut tensors, r.k), intern(&mut tensors, r.v)))
                    .collect()
            })
            .collect();
        let locked: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let cuda: Vec<&candle_core::cuda_backend::cudarc::driver::CudaSlice<T>> = locked
            .iter()
            .map(|(s, _)| match &**s {
                Storage::Cuda(c) => Ok(c.as_cuda_slice::<T>()?),
                _ => Err(Error::UnsupportedDevice {
                    op: OP,
                    device: "non-CUDA storage".into(),
                    reason: "q and the cached K/V must all live on the CUDA device",
                }),
            })
            .collect::<Result<_>>()?;
        let ptrs: Vec<_> = cuda.iter().map(|s| s.device_ptr(&stream)).collect();
        // Address of element `offset` of tensor `i` (past its layout's start).
        let addr = |i: usize, offset: usize| {
            ptrs[i].0 + ((locked[i].1.start_offset() + offset) * std::mem::size_of::<T>()) as u64
        };
        let slices: Vec<Vec<DecodeSlice>> = seqs
            .iter()
            .zip(&slots)
            .map(|(rows, slots)| {
                rows.iter()
                    .zip(slots)
                    .map(|(r, &(ki, vi))| DecodeSlice {
                        k: addr(ki, r.rows.start * d),
                        v: addr(vi, r.rows.start * d),
                        k_head_stride: r.k.stride()[0] as u64,
                        v_head_stride: r.v.stride()[0] as u64,
                        rows: r.rows.len(),
                    })
                    .collect()
            })
            .collect();
        let launch = DecodeLaunch::new(problem, &slices)?;
        let o = dev.alloc_zeros::<T>(n_seq * hq * d)?;
        let lse = dev.alloc_zeros::<f32>(n_seq * hq)?;
        let o_part = dev.alloc_zeros::<f32>(launch.o_part_len())?;
        let lse_part = dev.alloc_zeros::<f32>(launch.lse_part_len())?;
        let work = dev.clone_htod(&launch.work)?;
        let table = dev.clone_htod(&launch.slices)?;
        let seq_work = dev.clone_htod(&launch.seq_work)?;
        {
            let g = [
                o.device_ptr(&stream),
                lse.device_ptr(&stream),
                o_part.device_ptr(&stream),
                lse_part.device_ptr(&stream),
            ];
            let t = [
                work.device_ptr(&stream),
                table.device_ptr(&stream),
                seq_work.device_ptr(&stream),
            ];
            let p = DecodePointers {
                q: addr(0, 0),
                o: g[0].0,
                lse: g[1].0,
                o_part: g[2].0,
                lse_part: g[3].0,
                work: t[0].0,
                slices: t[1].0,
                seq_work: t[2].0,
            };
            go(dev, &launch.split, &launch.split_args(&p))?;
            go(dev, &launch.combine, &launch.combine_args(&p))?;
        }
        drop(ptrs);
        let o = CudaStorage::wrap_cuda_slice(o, dev.clone());
        let lse = CudaStorage::wrap_cuda_slice(lse, dev.clone());
        Ok((
            Tensor::from_storage(Storage::Cuda(o), (n_seq, hq, d), BackpropOp::none(), false),
            Tensor::from_storage(Storage::Cuda(lse), (n_seq, hq), BackpropOp::none(), false),
        ))
    }

    /// Both decode kernels go through the one launcher of the CUDA path.
    /// The argument list is the kernel's (DecodeLaunch), the buffers and their
    /// stream guards outlive the enqueue, every slice lies inside its tensor
    /// (rows <= capacity, checked) and DecodeLaunch checked the alignment of
    /// every address and head stride.
    fn go(dev: &CudaDevice, kernel: &Kernel, args: &[Arg]) -> Result<()> {
        let ptx = crate::cuda::ptx::DECODE;
        launch(
            dev,
            MODULE,
            ptx,
            &kernel.name,
            kernel.grid,
            kernel.block,
            0,
            args,
        )
    }
}

/// Keys per split: none when one CTA per (sequence, KV head chunk) already
/// reaches [`TARGET_CTAS`], else the size that spreads all keys over about
/// that many CTAs, but never below [`MIN_SPLIT_KEYS`]. A sequence no longer
/// than the split stays one work item, so short sequences are never split.
fn auto_split(keys: &[usize], ctas_per_item: usize) -> usize {
    let longest = keys.iter().copied().max().unwrap_or(1).max(1);
    if keys.len() * ctas_per_item >= TARGET_CTAS {
        return longest;
    }
    let total: usize = keys.iter().sum();
    (total * ctas_per_item)
        .div_ceil(TARGET_CTAS)
        .max(MIN_SPLIT_KEYS)
        .min(longest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(rows: usize) -> DecodeSlice {
        DecodeSlice {
            k: 0x1000,
            v: 0x2000,
            k_head_stride: 64 * 128,
            v_head_stride: 64 * 128,
            rows,
        }
    }

    #[test]
    fn tables_and_splits() {
        let mut p = DecodeProblem::new(32, 8, 128, Elem::Bf16);
        p.split_keys = Some(100);
        let seqs = vec![vec![slice(250), slice(0), slice(10)], vec![slice(1)]];
        let l = DecodeLaunch::new(&p, &seqs).unwrap();
        assert_eq!(l.split.name, "ksa_decode_bf16_d128_g4");
        assert_eq!(l.combine.name, "ksa_decode_combine_bf16");
        assert_eq!(l.keys, vec![260, 1]);
        // 260 keys: 3 splits; 1 key: 1 split. The empty slice is dropped.
        assert_eq!(l.split.grid, (4, 8, 1));
        assert_eq!(l.combine.grid, (32, 2, 1));
        assert_eq!(l.seq_work, vec![0, 3, 4]);
        assert_eq!(&l.work[10..15], &[0, 200, 260, 0, 2]);
        assert_eq!(&l.work[15..20], &[1, 0, 1, 2, 3]);
        assert_eq!(l.slices.len(), 3 * 6);
        assert_eq!(&l.slices[6 + 4..12], &[250, 10]);
        assert_eq!(l.o_part_len(), 4 * 32 * 128);
        let ptrs = DecodePointers {
            q: 1,
            o: 2,
            lse: 3,
            o_part: 4,
            lse_part: 5,
            work: 6,
            slices: 7,
            seq_work: 8,
        };
        assert_eq!(l.split_args(&ptrs).len(), 9);
        assert_eq!(l.split_args(&ptrs)[6], Arg::U32(4));
        assert_eq!(l.combine_args(&ptrs)[2], Arg::U64(8));
    }

    #[test]
    fn automatic_split() {
        let p = DecodeProblem::new(32, 8, 128, Elem::F16);
        // One short sequence: never split.
        let l = DecodeLaunch::new(&p, &[vec![slice(200)]]).unwrap();
        assert_eq!(l.work_items(), 1);
        // One long sequence: spread over about TARGET_CTAS CTAs.
        let l = DecodeLaunch::new(&p, &[vec![slice(100_000)]]).unwrap();
        assert_eq!(l.split_keys, (100_000 * 8usize).div_ceil(TARGET_CTAS));
        assert!(l.work_items() * 8 <= TARGET_CTAS + 8);
        // Many sequences fill the GPU alone: one work item each.
        let seqs = vec![vec![slice(5000)]; 40];
        assert_eq!(DecodeLaunch::new(&p, &seqs).unwrap().work_items(), 40);
        // Group 16: two head chunks of 8.
        let l = DecodeLaunch::new(&DecodeProblem::new(32, 2, 64, Elem::F16), &seqs).unwrap();
        assert_eq!(l.split.name, "ksa_decode_f16_d64_g8");
        assert_eq!(l.split.grid.1, 4);
        // Group 3 runs on the 4-head kernel.
        let l = DecodeLaunch::new(&DecodeProblem::new(6, 2, 64, Elem::F16), &seqs).unwrap();
        assert_eq!(l.split.name, "ksa_decode_f16_d64_g4");
    }

    #[test]
    fn typed_errors() {
        let p = DecodeProblem::new(4, 1, 96, Elem::Bf16);
        assert!(matches!(
            DecodeLaunch::new(&p, &[vec![slice(1)]]),
            Err(Error::UnsupportedHeadDim { got: 96, .. })
        ));
        let p = DecodeProblem::new(3, 2, 64, Elem::Bf16);
        assert!(matches!(
            DecodeLaunch::new(&p, &[vec![slice(1)]]),
            Err(Error::HeadsNotDivisible { .. })
        ));
        let p = DecodeProblem::new(4, 2, 64, Elem::Bf16);
        assert!(matches!(
            DecodeLaunch::new(&p, &[vec![slice(1)], vec![slice(0)]]),
            Err(Error::DecodeSlices { sequence: 1, .. })
        ));
        let mut bad = slice(3);
        bad.k += 2;
        assert!(matches!(
            DecodeLaunch::new(&p, &[vec![bad]]),
            Err(Error::DecodeSlices { sequence: 0, .. })
        ));
        let mut bad = slice(3);
        bad.v_head_stride = 100;
        assert!(DecodeLaunch::new(&p, &[vec![bad]]).is_err());
        let mut p0 = p;
        p0.split_keys = Some(0);
        assert!(DecodeLaunch::new(&p0, &[vec![slice(1)]]).is_err());
        assert!(DecodeLaunch::new(&p, &[]).unwrap().is_empty());
    }
}
