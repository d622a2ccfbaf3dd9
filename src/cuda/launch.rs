//! The launch of the forward kernel as one piece of data: kernel name, grid,
//! block, dynamic shared memory and the argument list in the kernel's order.
//! The candle/cudarc path and the emulator tests both drive exactly this,
//! for the full forward ([`FwdLaunch::new`]) and for a cache step's queries
//! against its held keys ([`FwdLaunch::step`]).

use super::schedule::{QueryMajorSchedule, BLOCK_Q};
use crate::mask::Mask;
use crate::schedule::QueryOffset;
use crate::{Error, Result};
use candle_core::DType;

/// Threads per CTA (4 warps).
pub const THREADS: u32 = 128;

/// Element type of q, k, v and the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

impl Elem {
    fn name(self) -> &'static str {
        match self {
            Elem::Bf16 => "bf16",
            Elem::F16 => "f16",
        }
    }
}

/// The one capability check of the CUDA kernels, used by the ops, the decode
/// and the cache's choice of storage: an element type they are compiled for
/// (bf16, f16) and a compiled head dim (64, 128); else a typed error naming `op`.
pub fn kernel_elem(op: &'static str, dtype: DType, head_dim: usize) -> Result<Elem> {
    let elem = match dtype {
        DType::BF16 => Elem::Bf16,
        DType::F16 => Elem::F16,
        got => {
            return Err(Error::UnsupportedDType {
                op,
                got,
                supported: "bf16, f16",
            })
        }
    };
    check_head_dim(op, head_dim)?;
    Ok(elem)
}

/// The head dims the kernels are compiled for; anything else is
/// [`Error::UnsupportedHeadDim`] naming `op`.
pub(crate) fn check_head_dim(op: &'static str, head_dim: usize) -> Result<()> {
    if head_dim == 64 || head_dim == 128 {
        Ok(())
    } else {
        Err(Error::UnsupportedHeadDim {
            op,
            got: head_dim,
            supported: "64, 128",
        })
    }
}

/// The softmax scales the kernels compute correctly: finite and positive.
/// They take the row maximum of the raw scores and mask with `-inf` before
/// scaling, so a negative scale would normalise by the wrong score and turn
/// masked keys into `+inf`, and a zero scale makes `0 * -inf` NaN; the CPU
/// path (which scales first and masks by a select) takes any finite scale.
/// `None` is the default `1/sqrt(head_dim)`.
pub fn check_scale(op: &'static str, scale: Option<f64>) -> Result<()> {
    match scale {
        Some(s) if !(s.is_finite() && s > 0.0 && (s as f32) > 0.0 && (s as f32).is_finite()) => {
            Err(Error::InvalidConfig(format!(
                "{op}: the CUDA kernels take a finite, positive softmax scale, got {s}"
            )))
        }
        _ => Ok(()),
    }
}

/// What every launch checks first: a compiled head dim and query heads that
/// split evenly over the KV heads.
pub(crate) fn check_heads(
    op: &'static str,
    head_dim: usize,
    q_heads: usize,
    kv_heads: usize,
) -> Result<()> {
    check_head_dim(op, head_dim)?;
    if kv_heads == 0 || q_heads % kv_heads != 0 {
        return Err(Error::HeadsNotDivisible { q_heads, kv_heads });
    }
    Ok(())
}

/// [`Error::TooLarge`] when `got > limit`: the grid and index limits of a launch.
pub(crate) fn within(what: &'static str, got: usize, limit: usize) -> Result<()> {
    if got > limit {
        Err(Error::TooLarge { what, got, limit })
    } else {
        Ok(())
    }
}

/// The kernels' layout scalars of `mask`, in their argument order: `[n_slots,
/// n_sum, chunk, summaries, window, mode]` (`Geo` in `kernels/ksa_common.cuh`,
/// whose closed form of the mask the kernels evaluate per element). The window
/// is clamped to the chunks: the kernels only compare it with chunk indices.
/// The closed form has no switch for the ablation of
/// [`crate::KsaConfig::with_summary_reads`], and needs none: the schedules
/// come from [`crate::KsaLayout::key_ranges`], so text query tiles never visit
/// a summary key tile (the regions start new tiles), and the element mask only
/// runs inside visited tiles (`tests/cuda_emu_*.rs`, `summary_reads_ablation`).
pub(crate) fn geometry(mask: &Mask) -> [u32; 6] {
    match mask {
        Mask::Ksa(l) => {
            let c = l.config();
            [
                l.len() as u32,
                l.summary_len() as u32,
                c.chunk_size() as u32,
                c.summaries() as u32,
                c.window().min(l.chunks()) as u32,
                0,
            ]
        }
        Mask::Causal { len } => [*len as u32, 0, 1, 1, 0, 1],
    }
}

/// Strides in elements of the batch and head dimensions of a `[b, h, N, d]`
/// tensor whose rows are contiguous (row stride `d`, element stride 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strides {
    /// Elements between batches.
    pub batch: u64,
    /// Elements between heads.
    pub head: u64,
}

impl Strides {
    /// Strides of a contiguous `[b, heads, len, d]` tensor.
    pub fn contiguous(heads: usize, len: usize, head_dim: usize) -> Self {
        Self {
            batch: (heads * len * head_dim) as u64,
            head: (len * head_dim) as u64,
        }
    }
}

/// Everything about one forward call except the device pointers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FwdProblem {
    /// Batch size.
    pub batch: usize,
    /// Query heads (`o` and `lse` have as many).
    pub q_heads: usize,
    /// Key/value heads (`q_heads % kv_heads == 0`).
    pub kv_heads: usize,
    /// Head dimension: 64 or 128.
    pub head_dim: usize,
    /// Element type.
    pub elem: Elem,
    /// Softmax scale (usually `1/sqrt(head_dim)`).
    pub scale: f32,
    /// Strides of q, k, v and o.
    pub q: Strides,
    /// Strides of k.
    pub k: Strides,
    /// Strides of v.
    pub v: Strides,
    /// Strides of o.
    pub o: Strides,
    /// Rows per (batch, head) of `lse`, a contiguous `[b, q_heads, lse_rows]`
    /// f32: `N` for a full forward, at least the step's last row plus one
    /// for a step.
    pub lse_rows: usize,
    /// Query heads per CTA (1, 2 or 4; must divide `q_heads / kv_heads`).
    /// `None`: the largest that divides the GQA group, so one K/V tile load
    /// feeds that many heads (query tiles then have 64 / heads rows).
    pub heads_per_cta: Option<usize>,
}

impl FwdProblem {
    /// A problem whose four tensors are contiguous `[b, h, len, d]`.
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
            lse_rows: len,
            heads_per_cta: None,
        }
    }
}

/// One kernel argument.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    /// A device pointer or 64-bit integer.
    U64(u64),
    /// A 32-bit integer.
    U32(u32),
    /// A 32-bit float.
    F32(f32),
}

/// Device addresses of the seven buffers of a launch. A full forward's
/// rows are the mask's slots; a step's are its query rows (q, o, lse) and
/// its held keys (k, v), as [`FwdLaunch::step`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FwdPointers {
    /// `q: [b, hq, N, d]`.
    pub q: u64,
    /// `k: [b, hkv, N, d]`.
    pub k: u64,
    /// `v: [b, hkv, N, d]`.
    pub v: u64,
    /// `o: [b, hq, N, d]` (written).
    pub o: u64,
    /// `lse: [b, hq, lse_rows]` f32 (written).
    pub lse: u64,
    /// The schedule's `tiles` table (u32).
    pub tiles: u64,
    /// The schedule's `entries` table (u32).
    pub entries: u64,
}

/// A complete launch description.
#[derive(Debug, Clone, PartialEq)]
pub struct FwdLaunch {
    /// Entry point in `ksa::cuda::ptx::FWD` (`ksa_fwd_{bf16,f16}_d{64,128}`).
    pub kernel: String,
    /// Grid: (query tiles, query heads / heads per CTA, batch).
    pub grid: (u32, u32, u32),
    /// Block: (128, 1, 1).
    pub block: (u32, u32, u32),
    /// Dynamic shared memory in bytes (Q tile + two K and two V stages).
    pub shared_bytes: u32,
    /// Query heads per CTA.
    pub heads_per_cta: usize,
    /// The tile schedule the tables come from.
    pub schedule: QueryMajorSchedule,
    /// The `tiles` table to upload.
    pub tiles: Vec<u32>,
    /// The `entries` table to upload.
    pub entries: Vec<u32>,
    scalars: Vec<Arg>,
}

/// Where the rows of a launch sit in its buffers (`Rows` in
/// `kernels/ksa_fwd.cu`), in its argument order: `[q_slot0, q_row0,
/// lse_rows, k_first, k_gathered]`.
fn row_map(
    schedule: &QueryMajorSchedule,
    lse_rows: usize,
    keys_gathered: bool,
) -> Result<[u32; 5]> {
    let rows = schedule.step_rows();
    if rows.end > lse_rows {
        return Err(Error::InvalidConfig(format!(
            "a launch writing rows {rows:?} into a log-sum-exp of {lse_rows} rows per head"
        )));
    }
    let limit = (1 << 31) - 1;
    within("query rows of a CUDA launch", lse_rows, limit)?;
    let offset = schedule.offset();
    Ok([
        schedule.first_slot() as u32,
        offset.first_row as u32,
        lse_rows as u32,
        offset.first_key as u32,
        u32::from(keys_gathered),
    ])
}

impl FwdLaunch {
    /// The launch of `problem` under `mask` (builds its schedule): every row
    /// of q, k, v, o and lse is the mask's slot.
    pub fn new(mask: Mask, problem: &FwdProblem) -> Result<Self> {
        Self::build(mask, problem, QueryOffset::default(), false)
    }

    /// The launch of one cache step ([`QueryMajorSchedule::step`]): `mask`
    /// is the mask of the whole text after the step, and only the queries
    /// `offset` names run. Their rows in q, o and lse are the step's slots
    /// in slot order from row [`QueryOffset::first_row`]; k and v hold the
    /// step's held keys in the gathered order ([`crate::mask::Gathered`]):
    /// every summary from row 0, then the text from token
    /// [`QueryOffset::first_key`]. The mask stays the absolute layout's.
    /// Fails as the schedule does (an offset past the text, a query needing
    /// text before `first_key`) or if lse has too few rows.
    pub fn step(mask: Mask, problem: &FwdProblem, offset: QueryOffset) -> Result<Self> {
        Self::build(mask, problem, offset, true)
    }

    fn build(
        mask: Mask,
        problem: &FwdProblem,
        offset: QueryOffset,
        keys_gathered: bool,
    ) -> Result<Self> {
        let p = problem;
        check_heads("ksa CUDA attention", p.head_dim, p.q_heads, p.kv_heads)?;
        within("query heads of a CUDA launch", p.q_heads, 65_535)?;
        within("batch of a CUDA launch", p.batch, 65_535)?;
        let group = p.q_heads / p.kv_heads;
        let hp = match p.heads_per_cta {
            None => [4, 2, 1].into_iter().find(|h| group % h == 0).unwrap_or(1),
            Some(h) if matches!(h, 1 | 2 | 4) && group % h == 0 => h,
            Some(h) => {
                return Err(Error::InvalidConfig(format!(
                    "{h} query heads per CTA: must be 1, 2 or 4 and divide the GQA group of {group}"
                )))
            }
        };
        let geometry = geometry(&mask);
        let schedule = QueryMajorSchedule::step(mask, BLOCK_Q / hp, offset)?;
        let rows = row_map(&schedule, p.lse_rows, keys_gathered)?;
        let (tiles, entries) = schedule.gpu_tables();
        let d = p.head_dim as u32;
        let shared_bytes = 5 * BLOCK_Q as u32 * d * 2;
        let mut scalars = vec![
            Arg::U64(p.q.batch),
            Arg::U64(p.q.head),
            Arg::U64(p.k.batch),
            Arg::U64(p.k.head),
            Arg::U64(p.v.batch),
            Arg::U64(p.v.head),
            Arg::U64(p.o.batch),
            Arg::U64(p.o.head),
        ];
        scalars.extend(geometry.map(Arg::U32));
        scalars.extend(rows.map(Arg::U32));
        scalars.extend([
            Arg::U32(p.q_heads as u32),
            Arg::U32(group as u32),
            Arg::U32(hp.trailing_zeros()),
            Arg::F32(p.scale * std::f32::consts::LOG2_E),
        ]);
        Ok(Self {
            kernel: format!("ksa_fwd_{}_d{}", p.elem.name(), p.head_dim),
            grid: (
                schedule.query_tiles().len() as u32,
                (p.q_heads / hp) as u32,
                p.batch as u32,
            ),
            block: (THREADS, 1, 1),
            shared_bytes,
            heads_per_cta: hp,
            schedule,
            tiles,
            entries,
            scalars,
        })
    }

    /// Whether the grid is empty (nothing to launch).
    pub fn is_empty(&self) -> bool {
        self.grid.0 == 0 || self.grid.1 == 0 || self.grid.2 == 0
    }

    /// The kernel's arguments, in its order.
    pub fn args(&self, ptrs: &FwdPointers) -> Vec<Arg> {
        let mut args = vec![
            Arg::U64(ptrs.q),
            Arg::U64(ptrs.k),
            Arg::U64(ptrs.v),
            Arg::U64(ptrs.o),
            Arg::U64(ptrs.lse),
            Arg::U64(ptrs.tiles),
            Arg::U64(ptrs.entries),
        ];
        args.extend_from_slice(&self.scalars);
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KsaConfig, KsaLayout};

    #[test]
    fn scales_the_kernels_cannot_compute_are_refused() {
        for ok in [None, Some(0.125), Some(1e-30), Some(3.0)] {
            assert!(check_scale("op", ok).is_ok(), "{ok:?}");
        }
        for bad in [0.0, -0.0, -1.0, f64::NAN, f64::INFINITY, 1e-50, 1e300] {
            assert!(
                matches!(check_scale("op", Some(bad)), Err(Error::InvalidConfig(_))),
                "{bad}"
            );
        }
    }

    fn rule() -> Mask {
        Mask::Ksa(KsaLayout::new(KsaConfig::new(8, 1, 2).unwrap(), 100).unwrap())
    }

    #[test]
    fn grid_args_and_packing() {
        let n = rule().len();
        let p = FwdProblem::contiguous(2, 32, 8, n, 128, Elem::Bf16);
        let l = FwdLaunch::new(rule(), &p).unwrap();
        assert_eq!(l.kernel, "ksa_fwd_bf16_d128");
        assert_eq!(l.heads_per_cta, 4);
        assert_eq!(l.schedule.block_q(), 16);
        assert_eq!(l.grid, (l.schedule.query_tiles().len() as u32, 8, 2));
        assert_eq!(l.block, (128, 1, 1));
        assert_eq!(l.shared_bytes, 5 * 64 * 128 * 2);
        let ptrs = FwdPointers {
            q: 1,
            k: 2,
            v: 3,
            o: 4,
            lse: 5,
            tiles: 6,
            entries: 7,
        };
        let args = l.args(&ptrs);
        assert_eq!(args.len(), 7 + 8 + 6 + 5 + 3 + 1);
        assert_eq!(args[0], Arg::U64(1));
        assert_eq!(args[6], Arg::U64(7));
        // The full forward's row map: slot order everywhere.
        let map = [0, 0, n as u32, 0, 0].map(Arg::U32);
        assert_eq!(args[21..26], map);
        assert_eq!(args[27], Arg::U32(4)); // group
        assert_eq!(args[28], Arg::U32(2)); // log2(heads per CTA)
        let mut p3 = FwdProblem::contiguous(1, 6, 2, n, 64, Elem::F16);
        assert_eq!(FwdLaunch::new(rule(), &p3).unwrap().heads_per_cta, 1);
        p3.heads_per_cta = Some(2);
        assert!(FwdLaunch::new(rule(), &p3).is_err());
    }

    #[test]
    fn a_step_launch_maps_its_rows() {
        // 100 tokens, C = 8, S = 1, W = 2: a step from token 37 (slot 41)
        // holding text from token 8, written from row 3 of an 80-row buffer.
        let (mask, offset) = (
            rule(),
            QueryOffset {
                old: 37,
                first_key: 8,
                first_row: 3,
            },
        );
        let mut p = FwdProblem::contiguous(1, 4, 2, 80, 64, Elem::F16);
        let l = FwdLaunch::step(mask, &p, offset).unwrap();
        assert_eq!(l.schedule.first_slot(), 41);
        assert_eq!(l.schedule.step_rows(), 3..3 + mask.len() - 41);
        let args = l.args(&FwdPointers {
            q: 0,
            k: 0,
            v: 0,
            o: 0,
            lse: 0,
            tiles: 0,
            entries: 0,
        });
        assert_eq!(args[21..26], [41, 3, 80, 8, 1].map(Arg::U32));
        // Too few log-sum-exp rows, text needed before `first_key`, a step
        // past the text: typed errors.
        p.lse_rows = 3 + mask.len() - 42;
        assert!(matches!(
            FwdLaunch::step(mask, &p, offset),
            Err(Error::InvalidConfig(_))
        ));
        p.lse_rows = 80;
        for bad in [
            QueryOffset {
                first_key: 17,
                ..offset
            },
            QueryOffset { old: 101, ..offset },
        ] {
            assert!(matches!(
                FwdLaunch::step(mask, &p, bad),
                Err(Error::InvalidConfig(_))
            ));
        }
    }

    #[test]
    fn typed_errors() {
        let n = rule().len();
        let p = FwdProblem::contiguous(1, 2, 1, n, 96, Elem::Bf16);
        assert!(matches!(
            FwdLaunch::new(rule(), &p),
            Err(Error::UnsupportedHeadDim { got: 96, .. })
        ));
        let p = FwdProblem::contiguous(1, 3, 2, n, 64, Elem::Bf16);
        assert!(matches!(
            FwdLaunch::new(rule(), &p),
            Err(Error::HeadsNotDivisible { .. })
        ));
    }
}
