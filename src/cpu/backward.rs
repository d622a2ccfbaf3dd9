//! Backward pass of KSA (and causal) attention on the CPU, FlashAttention-2
//! style: probabilities are recomputed from the forward's saved log-sum-exp,
//! only the key tiles the forward's [`Schedule`] visits are touched, and
//! nothing of size `N x N` is allocated. Compute is f32 whatever the input
//! dtype.
//!
//! The work items are the forward's: per (batch, KV head), text query tiles
//! of all `hq / hkv` query heads of the GQA group together, then groups of
//! summary chunks. Per key tile a text tile runs five GEMM-shaped tile
//! products (`matmul.rs`): `S = Q K^T`, `dP = dO V^T`, then, after the
//! element-wise `P = exp(scale S - lse)`, `dS = P (dP - D)`:
//! `dV += P^T dO`, `dK += dS^T Q` and `dQ += dS K`, one pass, nothing
//! recomputed. A query tile owns its dQ rows. dK and dV rows are shared by
//! every query tile that sees them, so each worker thread adds into its own
//! dK/dV partial buffer (the GQA group's heads sum there without copies) and
//! the partials are summed at the end. The alternative, key-major tasks that
//! own dK/dV plus a second query-major pass for dQ, needs seven tile products
//! instead of five (it recomputes `S`, `dP` and `P`) and a key-major
//! schedule; adding just that recomputation to this pass took the backward
//! from 2.6x to 3.6x the forward (median of 9 calls, KSA at 4K,
//! `docs/training.md`). The partials cost `threads * 2 * N * d` floats per
//! head in flight and one read each (under 2% of the backward at 4K).

use crate::check::QkvDims;
use crate::cpu::{self, matmul, simd, tile, CpuIsa, Task};
use crate::mask::KeySpace;
use crate::mask::Mask;
use crate::schedule::{KeyTile, Schedule, TileSizes};
use rayon::prelude::*;
use std::f32::consts::LOG2_E;
use std::ops::Range;
use std::sync::{Mutex, PoisonError};

/// Largest per-thread dK/dV partial (bytes) for which several heads run in
/// one parallel pass; beyond it heads run one at a time, which bounds the
/// partials to `threads * 2 * N * d` floats.
const PASS_MAX_BYTES: usize = 8 << 20;

/// Buffers are contiguous `[b, h, len, d]` (`lse`: `[b, hq, len]`).
/// Gradients `(dq, dk, dv)` of `out = softmax(scale * q k^T + mask) v` given
/// `dout`, the forward's `out` and its per-row log-sum-exp `lse`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    dout: &[f32],
    lse: &[f32],
    dims: QkvDims,
    scale: f32,
    mask: Mask,
    isa: CpuIsa,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let QkvDims {
        batch,
        q_heads: hq,
        kv_heads: hkv,
        len: n,
        head_dim: d,
    } = dims;
    let head = n * d;
    let mut dq = vec![0f32; batch * hq * head];
    let mut dk = vec![0f32; batch * hkv * head];
    let mut dv = vec![0f32; batch * hkv * head];
    if head == 0 || hq == 0 {
        return (dq, dk, dv);
    }
    let tiles = TileSizes::default();
    let schedule = Schedule::new(mask, tiles).expect("the default tile sizes are nonzero");
    let slots = mask.gathered().slots();
    let identity = schedule.layout().is_none();
    // Partials are in gathered order; output row `slot` sums gathered row
    // `gathered[slot]` of each.
    let mut gathered = vec![0usize; n];
    for (row, &slot) in slots.iter().enumerate() {
        gathered[slot as usize] = row;
    }
    let tasks = cpu::tasks(&schedule);
    let threads = rayon::current_num_threads().max(1);
    let heads_per_pass = (PASS_MAX_BYTES / (2 * head * std::mem::size_of::<f32>())).max(1);
    let heads: Vec<usize> = (0..batch * hkv).collect();
    let dq_rows = Rows(dq.as_mut_ptr());
    for pass in heads.chunks(heads_per_pass) {
        let kv: Vec<_> = pass
            .iter()
            .map(|&h| {
                let rows = h * head..(h + 1) * head;
                (
                    cpu::gather(&k[rows.clone()], &slots, d, identity),
                    cpu::gather(&v[rows], &slots, d, identity),
                )
            })
            .collect();
        let ctxs: Vec<Context> = pass
            .iter()
            .zip(&kv)
            .map(|(&h, (kg, vg))| Context {
                q,
                out,
                dout,
                lse,
                k: kg,
                v: vg,
                schedule: &schedule,
                scale,
                len: n,
                d,
                q_heads: hq,
                batch: h / hkv,
                first_head: (h % hkv) * (hq / hkv),
                group: hq / hkv,
                isa,
                dq: dq_rows,
            })
            .collect();
        // One dK|dV partial per worker thread, for all heads of the pass.
        let partials: Vec<Mutex<Vec<f32>>> = (0..threads)
            .map(|_| Mutex::new(vec![0f32; pass.len() * 2 * head]))
            .collect();
        let work: Vec<(usize, Task)> = tasks
            .iter()
            .flat_map(|&task| (0..pass.len()).map(move |h| (h, task)))
            .collect();
        work.par_iter().for_each_init(
            || Scratch::new(&ctxs[0]),
            |sc, &(h, task)| {
                let thread = rayon::current_thread_index().unwrap_or(0) % threads;
                // Indices are unique in the pool that runs this loop, so the
                // lock is uncontended; it keeps any other caller correct.
                let mut part = partials[thread]
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let (dk, dv) = part[h * 2 * head..(h + 1) * 2 * head].split_at_mut(head);
                match task {
                    Task::Text(t) => text_tile(&ctxs[h], sc, t, dk, dv),
                    Task::Summaries(c0, c1) => summary_chunks(&ctxs[h], sc, c0..c1, dk, dv),
                }
            },
        );
        let partials: Vec<Vec<f32>> = partials
            .into_iter()
            .map(|p| p.into_inner().unwrap_or_else(PoisonError::into_inner))
            .collect();
        for (h, &global) in pass.iter().enumerate() {
            let rows = global * head..(global + 1) * head;
            // d(scale * q.k) brings the scale into dK (and dQ) once, here.
            for (dst, offset, factor) in [
                (&mut dk[rows.clone()], h * 2 * head, scale),
                (&mut dv[rows], h * 2 * head + head, 1.0),
            ] {
                dst.par_chunks_mut(d)
                    .with_min_len(64)
                    .enumerate()
                    .for_each(|(slot, row)| {
                        let src = offset + gathered[slot] * d;
                        for part in &partials {
                            simd::axpy(factor, &part[src..src + d], row);
                        }
                    });
            }
        }
    }
    (dq, dk, dv)
}

/// The dQ buffer, written by parallel tasks each to its own rows.
#[derive(Clone, Copy)]
struct Rows(*mut f32);
// SAFETY: every (head, slot) row of dQ belongs to exactly one task (a text
// query tile or a summary chunk group), and the buffer outlives the loop.
unsafe impl Send for Rows {}
unsafe impl Sync for Rows {}

/// What every task of one (batch, KV head) shares.
struct Context<'a> {
    /// Queries, forward outputs and their gradients, `[b, hq, N, d]`.
    q: &'a [f32],
    out: &'a [f32],
    dout: &'a [f32],
    /// The forward's natural log-sum-exp, `[b, hq, N]`.
    lse: &'a [f32],
    /// This head's keys and values in gathered order.
    k: &'a [f32],
    v: &'a [f32],
    schedule: &'a Schedule,
    scale: f32,
    len: usize,
    d: usize,
    q_heads: usize,
    batch: usize,
    /// The query heads `first_head..first_head + group` share this KV head.
    first_head: usize,
    group: usize,
    /// The kernel variant (checked supported by the caller).
    isa: CpuIsa,
    dq: Rows,
}

impl Context<'_> {
    /// Row of query head `head` at `slot` in `[b, hq, N, *]`.
    fn row(&self, head: usize, slot: usize) -> usize {
        (self.batch * self.q_heads + head) * self.len + slot
    }

    /// Loads row `r` of a tile: the query and `dO` rows of (`head`, `slot`),
    /// its log-sum-exp in log2 units and `D = dO . O`, the softmax
    /// Jacobian's shift (`sum_j P_j dP_j`).
    fn load(&self, head: usize, slot: usize, r: usize, sc: &mut Scratch) {
        let (row, d) = (self.row(head, slot), self.d);
        let span = row * d..(row + 1) * d;
        sc.q[r * d..(r + 1) * d].copy_from_slice(&self.q[span.clone()]);
        sc.dout[r * d..(r + 1) * d].copy_from_slice(&self.dout[span.clone()]);
        sc.lse2[r] = self.lse[row] * LOG2_E;
        sc.delta[r] = simd::dot(&self.dout[span.clone()], &self.out[span]);
    }

    /// Writes `scale * dq` as the gradient of (`head`, `slot`).
    fn store(&self, head: usize, slot: usize, dq: &[f32]) {
        let row = self.row(head, slot);
        // SAFETY: every (head, slot) row is written by exactly one task, and
        // `row` indexes inside the buffer `attention_backward` allocated.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.dq.0.add(row * self.d), self.d) };
        for (y, &x) in dst.iter_mut().zip(dq) {
            *y = x * self.scale;
        }
    }
}

/// Per-thread buffers, reused across tasks. Tile rows are ordered (head,
/// token) as in the forward.
struct Scratch {
    q: Vec<f32>,
    dout: Vec<f32>,
    dq: Vec<f32>,
    lse2: Vec<f32>,
    delta: Vec<f32>,
    /// Scores, then probabilities `P`.
    s: Vec<f32>,
    /// `dO V^T`, then `dS`.
    dp: Vec<f32>,
    bounds: Vec<(usize, usize)>,
    tiles: Vec<KeyTile>,
    pack: matmul::Pack,
    /// Gathered key rows of one summary query.
    key_rows: Vec<usize>,
}

impl Scratch {
    fn new(ctx: &Context<'_>) -> Self {
        let sizes = ctx.schedule.tile_sizes();
        let rows = ctx.group * sizes.query;
        let scores = rows * matmul::score_stride(sizes.key);
        Self {
            q: vec![0.0; rows * ctx.d],
            dout: vec![0.0; rows * ctx.d],
            dq: vec![0.0; rows * ctx.d],
            lse2: vec![0.0; rows],
            delta: vec![0.0; rows],
            s: vec![0.0; scores],
            dp: vec![0.0; scores],
            bounds: vec![(0, 0); rows],
            tiles: Vec::new(),
            pack: matmul::Pack::default(),
            key_rows: Vec::new(),
        }
    }
}

/// Text query tile `tile` of all heads of the group against its key tiles:
/// its dQ rows, and its share of `dk`, `dv` (this head's gathered partials).
fn text_tile(ctx: &Context<'_>, sc: &mut Scratch, tile: usize, dk: &mut [f32], dv: &mut [f32]) {
    let (d, schedule, isa) = (ctx.d, ctx.schedule, ctx.isa);
    let tokens = schedule.query_tile(tile);
    let bq = tokens.len();
    let rows = ctx.group * bq;
    let stride = matmul::score_stride(schedule.tile_sizes().key);
    let heads = ctx.first_head..ctx.first_head + ctx.group;
    for (r, head, slot) in tile::tile_rows(schedule, tokens.clone(), heads.clone()) {
        ctx.load(head, slot, r, sc);
    }
    sc.dq[..rows * d].fill(0.0);
    // Whether the tile's query and dO rows are all finite, once needed.
    let mut rows_finite = None;
    schedule.key_tiles(tile, &mut sc.tiles);
    for (t, kt) in sc.tiles.iter().enumerate() {
        let keys = kt.len();
        let span = schedule.gathered_rows(kt);
        let span = span.start * d..span.end * d;
        let (k, v) = (&ctx.k[span.clone()], &ctx.v[span.clone()]);
        // Each product fetches the operand of the one after it
        // ([`matmul::Prefetch`]): V, this tile's dV and dK partials, then
        // the next tile's K and V.
        let next = sc.tiles.get(t + 1).map(|next| {
            let rows = schedule.gathered_rows(next);
            rows.start * d..rows.end * d
        });
        let fetch = |x: &[f32]| match &next {
            Some(span) => matmul::Prefetch::of(&x[span.clone()]),
            None => matmul::Prefetch::NONE,
        };
        matmul::scores(
            isa,
            rows,
            keys,
            d,
            &sc.q,
            k,
            &mut sc.s,
            stride,
            &mut sc.pack,
            matmul::Prefetch::of(v),
        );
        matmul::scores(
            isa,
            rows,
            keys,
            d,
            &sc.dout,
            v,
            &mut sc.dp,
            stride,
            &mut sc.pack,
            matmul::Prefetch::of(&dv[span.clone()]),
        );
        tile::tile_bounds(schedule, tokens.clone(), kt, ctx.group, &mut sc.bounds);
        simd::softmax_grad(
            isa,
            &mut sc.s,
            &mut sc.dp,
            stride,
            keys,
            &sc.bounds[..rows],
            &sc.lse2[..rows],
            &sc.delta[..rows],
            ctx.scale * LOG2_E,
        );
        // Masked pairs have P = dS = 0 (a select in softmax_grad), but
        // 0 * inf is NaN: on an edge tile, a product whose other operand is
        // not all finite sums only the allowed pairs (docs/robustness.md).
        // Full tiles have no masked pair. The query tile's rows are scanned
        // once, at its first edge tile; each edge tile scans its keys.
        let (q_ok, dout_ok, k_ok) = if kt.full {
            (true, true, true)
        } else {
            let (q_ok, dout_ok) = *rows_finite.get_or_insert_with(|| {
                (
                    simd::all_finite(&sc.q[..rows * d]),
                    simd::all_finite(&sc.dout[..rows * d]),
                )
            });
            (q_ok, dout_ok, simd::all_finite(k))
        };
        let bounds = &sc.bounds[..rows];
        if dout_ok {
            matmul::accumulate_transposed(
                isa,
                rows,
                keys,
                d,
                &sc.s,
                stride,
                &sc.dout,
                &mut dv[span.clone()],
                matmul::Prefetch::of(&dk[span.clone()]),
            );
        } else {
            tile::accumulate_visible_transposed(
                &sc.s,
                stride,
                bounds,
                &sc.dout,
                d,
                &mut dv[span.clone()],
            );
        }
        if q_ok {
            matmul::accumulate_transposed(
                isa,
                rows,
                keys,
                d,
                &sc.dp,
                stride,
                &sc.q,
                &mut dk[span],
                fetch(ctx.k),
            );
        } else {
            tile::accumulate_visible_transposed(&sc.dp, stride, bounds, &sc.q, d, &mut dk[span]);
        }
        if k_ok {
            matmul::accumulate(
                isa,
                rows,
                keys,
                d,
                (&sc.dp, stride, 1),
                k,
                &mut sc.dq,
                &mut sc.pack,
                fetch(ctx.v),
            );
        } else {
            tile::accumulate_visible((&sc.dp, stride, 1), bounds, k, d, &mut sc.dq);
        }
    }
    for (r, head, slot) in tile::tile_rows(schedule, tokens, heads) {
        ctx.store(head, slot, &sc.dq[r * d..(r + 1) * d]);
    }
}

/// The summary queries of `chunks`: `C + j + 1` keys each, too few for a
/// GEMM to pay off, so every (query, key) pair is direct.
fn summary_chunks(
    ctx: &Context<'_>,
    sc: &mut Scratch,
    chunks: Range<usize>,
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (d, schedule) = (ctx.d, ctx.schedule);
    let layout = schedule.layout().expect("summary tasks exist for KSA only");
    let factor = ctx.scale * LOG2_E;
    for chunk in chunks {
        for j in 0..layout.config().summaries() {
            let keys = schedule
                .summary_query_keys(chunk, j)
                .expect("complete chunk");
            let slot = layout.summary_slot(chunk, j).expect("complete chunk");
            sc.key_rows.clear();
            sc.key_rows
                .extend(keys.text.map(|t| schedule.gathered_row(KeySpace::Text, t)));
            sc.key_rows.extend(
                keys.summaries
                    .map(|s| schedule.gathered_row(KeySpace::Summary, s)),
            );
            for hh in 0..ctx.group {
                let head = ctx.first_head + hh;
                ctx.load(head, slot, 0, sc);
                let (q, dout, dq) = (&sc.q[..d], &sc.dout[..d], &mut sc.dq[..d]);
                dq.fill(0.0);
                for &r in &sc.key_rows {
                    let row = r * d..(r + 1) * d;
                    let kr = &ctx.k[row.clone()];
                    let p = simd::exp2(simd::dot(q, kr) * factor - sc.lse2[0]);
                    let ds = p * (simd::dot(dout, &ctx.v[row.clone()]) - sc.delta[0]);
                    simd::axpy(p, dout, &mut dv[row.clone()]);
                    simd::axpy(ds, q, &mut dk[row]);
                    simd::axpy(ds, kr, dq);
                }
                ctx.store(head, slot, &sc.dq[..d]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{reference, KsaConfig, KsaLayout};
    use candle_core::{DType, Device, Tensor, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let mut state = seed;
        let len: usize = shape.iter().product();
        let data: Vec<f32> = (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn vec(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Row log-sum-exp of the scaled, masked scores, straight from the definition.
    fn lse(q: &Tensor, k: &Tensor, allowed: impl Fn(usize, usize) -> bool, scale: f64) -> Vec<f32> {
        let (b, hq, n, d) = q.dims4().unwrap();
        let hkv = k.dim(1).unwrap();
        let (qf, kf) = (vec(q), vec(k));
        let mut out = Vec::new();
        for bi in 0..b {
            for h in 0..hq {
                let kh = h / (hq / hkv);
                for i in 0..n {
                    let s: Vec<f64> = (0..n)
                        .filter(|&j| allowed(i, j))
                        .map(|j| {
                            let (qo, ko) =
                                (((bi * hq + h) * n + i) * d, ((bi * hkv + kh) * n + j) * d);
                            scale
                                * (0..d)
                                    .map(|x| qf[qo + x] as f64 * kf[ko + x] as f64)
                                    .sum::<f64>()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    out.push((m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln()) as f32);
                }
            }
        }
        out
    }

    fn check(mask: Mask, dims: QkvDims) {
        let QkvDims {
            batch: b,
            q_heads: hq,
            kv_heads: hkv,
            len: n,
            head_dim: d,
        } = dims;
        let (q, k, v) = (
            rand(&[b, hq, n, d], 1),
            rand(&[b, hkv, n, d], 2),
            rand(&[b, hkv, n, d], 3),
        );
        let dout = rand(&[b, hq, n, d], 4);
        let f64s = |x: &Tensor| Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
        let (qv, kv, vv) = (f64s(&q), f64s(&k), f64s(&v));
        let out = match mask {
            Mask::Ksa(l) => reference::attention(&qv, &kv, &vv, &l),
            Mask::Causal { .. } => reference::causal_attention(&qv, &kv, &vv),
        }
        .unwrap();
        let loss = (&out * dout.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let lse = match mask {
            Mask::Ksa(l) => lse(&q, &k, |i, j| l.can_attend(i, j), scale),
            Mask::Causal { .. } => lse(&q, &k, |i, j| j <= i, scale),
        };
        for isa in CpuIsa::available() {
            let (dq, dk, dv) = attention_backward(
                &vec(&q),
                &vec(&k),
                &vec(&v),
                &vec(&out),
                &vec(&dout),
                &lse,
                dims,
                scale as f32,
                mask,
                isa,
            );
            for (got, var, name) in [(dq, &qv, "dq"), (dk, &kv, "dk"), (dv, &vv, "dv")] {
                let want = vec(grads.get(var.as_tensor()).unwrap());
                let top = want.iter().fold(0f32, |m, x| m.max(x.abs()));
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-4 * top.max(1.0),
                        "{isa} {name}[{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn equals_reference_autograd() {
        for (c, s, w, n) in [(3, 2, 1, 17), (4, 1, 0, 13), (2, 3, 9, 9), (5, 1, 2, 4)] {
            let layout = KsaLayout::new(KsaConfig::new(c, s, w).unwrap(), n).unwrap();
            let dims = QkvDims {
                batch: 2,
                q_heads: 4,
                kv_heads: 2,
                len: layout.len(),
                head_dim: 12,
            };
            check(Mask::Ksa(layout), dims);
        }
        check(
            Mask::Causal { len: 21 },
            QkvDims {
                batch: 1,
                q_heads: 3,
                kv_heads: 1,
                len: 21,
                head_dim: 8,
            },
        );
    }
}
