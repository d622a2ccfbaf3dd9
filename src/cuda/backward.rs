//! The launch of the backward kernels (`kernels/ksa_bwd.cu`) as one piece of
//! data: three kernel launches in order, each with its name, grid, block,
//! dynamic shared memory and arguments in the kernel's order, plus the
//! key-major schedule's tables and the sizes of the two f32 scratch buffers.
//! The candle/cudarc path and the emulator tests both drive exactly this.
//!
//! dQ is accumulated with f32 `red.global.add` into a scratch buffer by the
//! main kernel (one CTA per key tile) and converted by a third kernel, as in
//! FlashAttention-2: a separate query-major dQ pass would recompute `Q K^T`
//! and `dO V^T` (3 more matmuls per tile visit on top of 5, i.e. 4x the
//! forward's tensor work instead of 2.5x; `docs/cuda.md` has the counters).

use super::launch::geometry;
use super::launch::{check_heads, within, Arg, Elem, Strides, THREADS};
use super::schedule::{KeyMajorSchedule, QueryMajorSchedule, BLOCK_K};
use crate::mask::Mask;
use crate::Result;

/// Everything about one backward call except the device pointers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BwdProblem {
    /// Batch size.
    pub batch: usize,
    /// Query heads (`o`, `dout`, `lse` and `dq` have as many).
    pub q_heads: usize,
    /// Key/value heads (`q_heads % kv_heads == 0`).
    pub kv_heads: usize,
    /// Head dimension: 64 or 128.
    pub head_dim: usize,
    /// Element type of q, k, v, o, dout and the gradients.
    pub elem: Elem,
    /// Softmax scale of the forward.
    pub scale: f32,
    /// Strides of q.
    pub q: Strides,
    /// Strides of k.
    pub k: Strides,
    /// Strides of v.
    pub v: Strides,
    /// Strides of the forward's output o.
    pub o: Strides,
    /// Strides of the output gradient dout.
    pub dout: Strides,
}

impl BwdProblem {
    /// A problem whose five tensors are contiguous `[b, h, len, d]`, with the
    /// default scale `1/sqrt(head_dim)`.
    pub fn contiguous(
        batch: usize,
        q_heads: usize,
        kv_heads: usize,
        len: usize,
        head_dim: usize,
        elem: Elem,
    ) -> Self {
        let qs = Strides::contiguous(q_heads, len, head_dim);
        let ks = Strides::contiguous(kv_heads, len, head_dim);
        Self {
            batch,
            q_heads,
            kv_heads,
            head_dim,
            elem,
            scale: 1.0 / (head_dim as f32).sqrt(),
            q: qs,
            k: ks,
            v: ks,
            o: qs,
            dout: qs,
        }
    }
}

/// Device addresses of the buffers of a backward call. `dq`, `dk`, `dv` are
/// written contiguous `[b, h, N, d]`; `dsum` and `dq_acc` are scratch of
/// [`BwdLaunch::dsum_len`] and [`BwdLaunch::dq_acc_len`] f32 each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BwdPointers {
    /// `q: [b, hq, N, d]`.
    pub q: u64,
    /// `k: [b, hkv, N, d]`.
    pub k: u64,
    /// `v: [b, hkv, N, d]`.
    pub v: u64,
    /// The forward's output `o: [b, hq, N, d]`.
    pub o: u64,
    /// The output gradient `dout: [b, hq, N, d]`.
    pub dout: u64,
    /// The forward's log-sum-exp `[b, hq, N]` f32 (contiguous).
    pub lse: u64,
    /// Scratch: `D = rowsum(dout * o)`, `[b, hq, N]` f32.
    pub dsum: u64,
    /// Scratch: the f32 dQ accumulator, `[b, hq, N, d]`.
    pub dq_acc: u64,
    /// `dq: [b, hq, N, d]` (written).
    pub dq: u64,
    /// `dk: [b, hkv, N, d]` (written).
    pub dk: u64,
    /// `dv: [b, hkv, N, d]` (written).
    pub dv: u64,
    /// The key-major schedule's `tiles` table (u32).
    pub tiles: u64,
    /// The key-major schedule's `entries` table (u32).
    pub entries: u64,
}

/// One kernel launch of the backward.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Entry point in `ksa::cuda::ptx::BWD`.
    pub kernel: String,
    /// Grid.
    pub grid: (u32, u32, u32),
    /// Block: (128, 1, 1).
    pub block: (u32, u32, u32),
    /// Dynamic shared memory in bytes.
    pub shared_bytes: u32,
    /// Arguments in the kernel's order.
    pub args: Vec<Arg>,
}

/// A complete description of the backward's three launches.
#[derive(Debug, Clone, PartialEq)]
pub struct BwdLaunch {
    problem: BwdProblem,
    mask: Mask,
    /// The kernels' layout scalars ([`geometry`]).
    geometry: [u32; 6],
    /// The key-major schedule the tables come from.
    pub schedule: KeyMajorSchedule,
    /// The `tiles` table to upload.
    pub tiles: Vec<u32>,
    /// The `entries` table to upload.
    pub entries: Vec<u32>,
}

/// Query rows per tile of the main kernel for a head dim: 64 for d = 64, 32
/// for d = 128, so the dK/dV accumulators and `S^T`, `dP^T` fit the registers
/// without spills (`tests/cuda_ptxas.rs`).
pub fn block_q(head_dim: usize) -> usize {
    if head_dim == 128 {
        32
    } else {
        64
    }
}

impl BwdLaunch {
    /// The launches of `problem` under the mask `mask` (builds the forward
    /// schedule with the backward's query tiles and inverts it).
    pub fn new(mask: Mask, problem: &BwdProblem) -> Result<Self> {
        let p = problem;
        check_heads(
            "ksa CUDA attention backward",
            p.head_dim,
            p.q_heads,
            p.kv_heads,
        )?;
        // Grid y/z limits, and the dQ conversion's 1-D grid of 4 elements per thread.
        within("query heads of a CUDA launch", p.q_heads, 65_535)?;
        within("batch of a CUDA launch", p.batch, 65_535)?;
        within(
            "elements of a CUDA backward's dq",
            p.batch * p.q_heads * mask.len() * p.head_dim,
            (u32::MAX as usize >> 1) * 4 * THREADS as usize,
        )?;
        let geometry = geometry(&mask);
        let forward = QueryMajorSchedule::with_block_q(mask, block_q(p.head_dim))?;
        let schedule = KeyMajorSchedule::from_forward(&forward);
        let (tiles, entries) = schedule.gpu_tables();
        Ok(Self {
            problem: *p,
            mask,
            geometry,
            schedule,
            tiles,
            entries,
        })
    }

    /// f32 elements of the `dsum` scratch buffer (`[b, hq, N]`).
    pub fn dsum_len(&self) -> usize {
        self.problem.batch * self.problem.q_heads * self.mask.len()
    }

    /// f32 elements of the `dq_acc` scratch buffer (`[b, hq, N, d]`).
    pub fn dq_acc_len(&self) -> usize {
        self.dsum_len() * self.problem.head_dim
    }

    /// Dynamic shared memory of the main kernel: the K and V tiles, two
    /// pipeline stages (Q and dO tiles, and per query row its key ranges, lse
    /// and D: 24 bytes) and the dS^T tile.
    pub fn main_shared_bytes(&self) -> u32 {
        let (d, bq) = (self.problem.head_dim, self.schedule.block_q());
        (2 * BLOCK_K * d * 2 + 2 * (2 * bq * d * 2 + bq * 24) + BLOCK_K * bq * 2) as u32
    }

    /// The three launches in order (prep, main, dQ conversion), without those
    /// whose grid is empty.
    pub fn steps(&self, ptrs: &BwdPointers) -> Vec<Step> {
        let p = &self.problem;
        let n = self.mask.len();
        let ty = match p.elem {
            Elem::Bf16 => "bf16",
            Elem::F16 => "f16",
        };
        let block = (THREADS, 1, 1);
        let prep = Step {
            kernel: format!("ksa_bwd_prep_{ty}_d{}", p.head_dim),
            grid: (n.div_ceil(4) as u32, p.q_heads as u32, p.batch as u32),
            block,
            shared_bytes: 0,
            args: vec![
                Arg::U64(ptrs.o),
                Arg::U64(ptrs.dout),
                Arg::U64(ptrs.dsum),
                Arg::U64(ptrs.dq_acc),
                Arg::U64(p.o.batch),
                Arg::U64(p.o.head),
                Arg::U64(p.dout.batch),
                Arg::U64(p.dout.head),
                Arg::U32(n as u32),
            ],
        };
        let mut args = vec![
            Arg::U64(ptrs.q),
            Arg::U64(ptrs.k),
            Arg::U64(ptrs.v),
            Arg::U64(ptrs.dout),
            Arg::U64(ptrs.lse),
            Arg::U64(ptrs.dsum),
            Arg::U64(ptrs.dq_acc),
            Arg::U64(ptrs.dk),
            Arg::U64(ptrs.dv),
            Arg::U64(ptrs.tiles),
            Arg::U64(ptrs.entries),
        ];
        for s in [p.q, p.k, p.v, p.dout] {
            args.extend([Arg::U64(s.batch), Arg::U64(s.head)]);
        }
        args.extend(self.geometry.map(Arg::U32));
        args.extend([
            Arg::U32(p.q_heads as u32),
            Arg::U32((p.q_heads / p.kv_heads) as u32),
            Arg::F32(p.scale * std::f32::consts::LOG2_E),
            Arg::F32(p.scale),
        ]);
        let main = Step {
            kernel: format!("ksa_bwd_{ty}_d{}", p.head_dim),
            grid: (
                self.schedule.key_tiles().len() as u32,
                p.kv_heads as u32,
                p.batch as u32,
            ),
            block,
            shared_bytes: self.main_shared_bytes(),
            args,
        };
        let quads = self.dq_acc_len() / 4;
        let dq = Step {
            kernel: format!("ksa_bwd_dq_{ty}"),
            grid: (quads.div_ceil(THREADS as usize) as u32, 1, 1),
            block,
            shared_bytes: 0,
            args: vec![
                Arg::U64(ptrs.dq_acc),
                Arg::U64(ptrs.dq),
                Arg::U64(quads as u64),
                Arg::F32(p.scale),
            ],
        };
        [prep, main, dq]
            .into_iter()
            .filter(|s| s.grid.0 > 0 && s.grid.1 > 0 && s.grid.2 > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use crate::{KsaConfig, KsaLayout};

    fn mask() -> Mask {
        Mask::Ksa(KsaLayout::new(KsaConfig::new(8, 1, 2).unwrap(), 100).unwrap())
    }

    #[test]
    fn steps_grids_and_args() {
        let n = mask().len();
        let p = BwdProblem::contiguous(2, 8, 2, n, 128, Elem::Bf16);
        let l = BwdLaunch::new(mask(), &p).unwrap();
        assert_eq!(l.schedule.block_q(), 32);
        let ptrs = BwdPointers {
            q: 1,
            k: 2,
            v: 3,
            o: 4,
            dout: 5,
            lse: 6,
            dsum: 7,
            dq_acc: 8,
            dq: 9,
            dk: 10,
            dv: 11,
            tiles: 12,
            entries: 13,
        };
        let steps = l.steps(&ptrs);
        let names: Vec<&str> = steps.iter().map(|s| s.kernel.as_str()).collect();
        assert_eq!(
            names,
            [
                "ksa_bwd_prep_bf16_d128",
                "ksa_bwd_bf16_d128",
                "ksa_bwd_dq_bf16"
            ]
        );
        assert_eq!(steps[0].grid, (n.div_ceil(4) as u32, 8, 2));
        assert_eq!(steps[1].grid, (l.schedule.key_tiles().len() as u32, 2, 2));
        assert_eq!(steps[1].args.len(), 11 + 8 + 6 + 4);
        assert_eq!(steps[1].args[26], Arg::U32(4)); // group
                                                    // K, V + 2 x (Q, dO, 24 B per row) + dS^T: 69.5 KiB at d = 128, 59 KiB at 64.
        assert_eq!(steps[1].shared_bytes, 71_168);
        let p64 = BwdProblem::contiguous(1, 1, 1, n, 64, Elem::F16);
        assert_eq!(
            BwdLaunch::new(mask(), &p64).unwrap().main_shared_bytes(),
            60_416
        );
        assert_eq!(steps[2].args[2], Arg::U64((2 * 8 * n * 128 / 4) as u64));
        assert_eq!(l.dq_acc_len(), 2 * 8 * n * 128);
        let empty = BwdLaunch::new(
            Mask::Causal { len: 0 },
            &BwdProblem::contiguous(1, 1, 1, 0, 64, Elem::F16),
        )
        .unwrap();
        assert!(empty.steps(&ptrs).is_empty());
    }

    #[test]
    fn typed_errors() {
        let n = mask().len();
        let p = BwdProblem::contiguous(1, 2, 1, n, 96, Elem::Bf16);
        assert!(matches!(
            BwdLaunch::new(mask(), &p),
            Err(Error::UnsupportedHeadDim { got: 96, .. })
        ));
        let p = BwdProblem::contiguous(1, 3, 2, n, 64, Elem::Bf16);
        assert!(matches!(
            BwdLaunch::new(mask(), &p),
            Err(Error::HeadsNotDivisible { .. })
        ));
    }
}
