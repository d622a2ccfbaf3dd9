//! The per-task kernels: one text query tile against its key tiles, and a
//! group of chunks' summary queries.

use super::{matmul, simd, CpuIsa, Element, Out};
use crate::mask::KeySpace;
use crate::schedule::{KeyTile, Schedule};
use std::f32::consts::{LN_2, LOG2_E};
use std::ops::Range;

/// What every task of one (batch, key/value head) shares.
pub(crate) struct Context<'a, T> {
    /// All queries, `[b, hq, N, d]` in slot order.
    pub q: &'a [T],
    /// This head's keys and values in gathered order.
    pub k: &'a [T],
    pub v: &'a [T],
    pub schedule: &'a Schedule,
    pub scale: f32,
    /// `N` and `d`.
    pub len: usize,
    pub d: usize,
    pub q_heads: usize,
    pub batch: usize,
    /// The query heads `first_head..first_head + group` share this K/V head.
    pub first_head: usize,
    pub group: usize,
    /// The kernel variant (checked supported by the caller).
    pub isa: CpuIsa,
    pub out: Out<T>,
}

impl<T: Element> Context<'_, T> {
    /// The query heads of the group.
    fn heads(&self) -> Range<usize> {
        self.first_head..self.first_head + self.group
    }

    /// Offset of the row of query head `head` at `slot` in `[b, hq, N, *]`.
    fn row(&self, head: usize, slot: usize) -> usize {
        (self.batch * self.q_heads + head) * self.len + slot
    }

    /// Loads query row `slot` of `head` as f32, times the scale and `log2(e)`
    /// (the softmax then works with `exp2`).
    fn load_query(&self, head: usize, slot: usize, dst: &mut [f32]) {
        let row = self.row(head, slot) * self.d;
        let factor = self.scale * LOG2_E;
        let src = &self.q[row..row + self.d];
        match T::as_f32(src) {
            Some(src) => {
                for (y, x) in dst.iter_mut().zip(src) {
                    *y = x * factor;
                }
            }
            None => {
                T::convert(src, dst);
                for y in dst.iter_mut() {
                    *y *= factor;
                }
            }
        }
    }

    /// Writes `acc / l` and the natural log-sum-exp of a finished row.
    fn store(&self, head: usize, slot: usize, acc: &[f32], m: f32, l: f32) {
        let row = self.row(head, slot);
        let inv = 1.0 / l;
        // SAFETY: every (head, slot) row is written by exactly one task, and
        // `row` indexes inside the buffers `forward` allocated.
        unsafe {
            let dst = std::slice::from_raw_parts_mut(self.out.out.add(row * self.d), self.d);
            for (y, &x) in dst.iter_mut().zip(acc) {
                *y = T::from_f32(x * inv);
            }
            *self.out.lse.add(row) = (m + l.log2()) * LN_2;
        }
    }
}

/// Per-thread buffers, reused across tasks.
pub(crate) struct Scratch {
    q: Vec<f32>,
    /// The query tile packed as the scores' column panels (f32), or its
    /// bf16 rows and their panels of dim pairs (the bf16 dot products).
    q_panels: Vec<f32>,
    q_bf16: Vec<u16>,
    q_panels_bf16: Vec<u32>,
    o: Vec<f32>,
    s: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    bounds: Vec<(usize, usize)>,
    tiles: Vec<KeyTile>,
    /// The tile products' packed keys and converted rows.
    pack: matmul::Pack,
    /// Gathered key rows and scores of one summary query.
    key_rows: Vec<usize>,
    scores: Vec<f32>,
    /// One key or value row as f32 (half-precision inputs).
    row: Vec<f32>,
}

impl Scratch {
    pub(crate) fn new<T>(ctx: &Context<'_, T>) -> Self {
        let sizes = ctx.schedule.tile_sizes();
        let rows = ctx.group * sizes.query;
        Self {
            q: vec![0.0; rows * ctx.d],
            q_panels: Vec::new(),
            q_bf16: Vec::new(),
            q_panels_bf16: Vec::new(),
            o: vec![0.0; rows * ctx.d],
            s: vec![0.0; sizes.key * matmul::key_major_stride(rows)],
            m: vec![0.0; rows],
            l: vec![0.0; rows],
            bounds: vec![(0, 0); rows],
            tiles: Vec::new(),
            pack: matmul::Pack::default(),
            key_rows: Vec::new(),
            scores: Vec::new(),
            row: Vec::new(),
        }
    }
}

/// Text query tile `tile` for all heads of the group: rows are ordered
/// (head, token), so one GEMM per key tile covers the whole GQA group. Scores
/// are key-major (`S^T = K Q^T`): the query tile is packed once and every key
/// tile is read in place, and the softmax runs down columns.
pub(crate) fn text_tile<T: Element>(ctx: &Context<'_, T>, sc: &mut Scratch, tile: usize) {
    let (d, schedule) = (ctx.d, ctx.schedule);
    let tokens = schedule.query_tile(tile);
    let bq = tokens.len();
    let rows = ctx.group * bq;
    let stride = matmul::key_major_stride(rows);
    // bf16 inputs on AVX512_BF16: scores by bf16 dot products from the raw
    // rows (the softmax applies the scale); otherwise f32 panels of the
    // scaled queries.
    let bf16_keys = T::as_bf16_bits(ctx.k).filter(|_| matmul::bf16_scores(ctx.isa, d));
    let factor = match bf16_keys {
        Some(_) => {
            sc.q_bf16.clear();
            for (_, head, slot) in tile_rows(schedule, tokens.clone(), ctx.heads()) {
                let row = ctx.row(head, slot) * d;
                let bits = T::as_bf16_bits(&ctx.q[row..row + d]).expect("bf16 queries");
                sc.q_bf16.extend_from_slice(bits);
            }
            matmul::pack_queries_bf16(&sc.q_bf16, rows, d, &mut sc.q_panels_bf16);
            ctx.scale * LOG2_E
        }
        None => {
            for (r, head, slot) in tile_rows(schedule, tokens.clone(), ctx.heads()) {
                ctx.load_query(head, slot, &mut sc.q[r * d..(r + 1) * d]);
            }
            matmul::pack_queries(ctx.isa, &sc.q, rows, d, &mut sc.q_panels);
            1.0
        }
    };
    sc.o[..rows * d].fill(0.0);
    sc.m[..rows].fill(f32::NEG_INFINITY);
    sc.l[..rows].fill(0.0);
    schedule.key_tiles(tile, &mut sc.tiles);
    for (t, kt) in sc.tiles.iter().enumerate() {
        let keys = kt.len();
        let span = schedule.gathered_rows(kt);
        let span = span.start * d..span.end * d;
        let (k, v) = (&ctx.k[span.clone()], &ctx.v[span.clone()]);
        // The value tile is fetched during the scores, the next key tile
        // during the value product ([`matmul::Prefetch`]).
        let next_keys = match sc.tiles.get(t + 1).map(|next| schedule.gathered_rows(next)) {
            Some(next) => matmul::Prefetch::of(&ctx.k[next.start * d..next.end * d]),
            None => matmul::Prefetch::NONE,
        };
        match bf16_keys {
            Some(bits) => matmul::scores_key_major_bf16(
                ctx.isa,
                keys,
                rows,
                d,
                &bits[span.clone()],
                &sc.q_panels_bf16,
                &mut sc.s,
                stride,
                matmul::Prefetch::of(v),
            ),
            None => matmul::scores_key_major(
                ctx.isa,
                keys,
                rows,
                d,
                k,
                (&sc.q, &sc.q_panels),
                &mut sc.s,
                stride,
                &mut sc.pack,
                matmul::Prefetch::of(v),
            ),
        }
        if !kt.full {
            tile_bounds(schedule, tokens.clone(), kt, ctx.group, &mut sc.bounds);
        }
        simd::softmax_update_key_major(
            ctx.isa,
            &mut sc.s,
            stride,
            keys,
            &sc.bounds[..rows],
            kt.full,
            factor,
            &mut sc.m[..rows],
            &mut sc.l[..rows],
            &mut sc.o[..rows * d],
            d,
        );
        // A masked key's probability is 0, but 0 * inf is NaN: an edge
        // tile whose values are not all finite sums each row's own keys.
        if kt.full || T::all_finite(v) {
            matmul::accumulate(
                ctx.isa,
                rows,
                keys,
                d,
                (&sc.s, 1, stride),
                v,
                &mut sc.o,
                &mut sc.pack,
                next_keys,
            );
        } else {
            accumulate_visible((&sc.s, 1, stride), &sc.bounds[..rows], v, d, &mut sc.o);
        }
    }
    for (r, head, slot) in tile_rows(schedule, tokens, ctx.heads()) {
        ctx.store(head, slot, &sc.o[r * d..(r + 1) * d], sc.m[r], sc.l[r]);
    }
}

/// The rows of a query tile over `tokens` for the query heads `heads`, in
/// the order the tile kernels keep them (head, then token): `(row, head,
/// slot)`.
pub(crate) fn tile_rows(
    schedule: &Schedule,
    tokens: Range<usize>,
    heads: Range<usize>,
) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    let bq = tokens.len();
    heads.enumerate().flat_map(move |(hh, head)| {
        tokens
            .clone()
            .enumerate()
            .map(move |(i, token)| (hh * bq + i, head, schedule.text_slot(token)))
    })
}

/// `o[r] += sum_{j in bounds[r]} p[r * rs + j * cs] * v[j]`: the value
/// product of an edge tile reading only the keys each row may see; `p` is
/// the forward's key-major P (`rs = 1`, `cs = stride`) or the backward's
/// row-major dS with the keys as `v` (`rs = stride`, `cs = 1`).
/// Only edge tiles with a non-finite operand take it, so it stays scalar.
pub(crate) fn accumulate_visible<T: Element>(
    (p, rs, cs): (&[f32], usize, usize),
    bounds: &[(usize, usize)],
    v: &[T],
    d: usize,
    o: &mut [f32],
) {
    for (r, &(a, b)) in bounds.iter().enumerate() {
        let acc = &mut o[r * d..(r + 1) * d];
        for j in a..b {
            let w = p[r * rs + j * cs];
            for (y, x) in acc.iter_mut().zip(&v[j * d..(j + 1) * d]) {
                *y += w * x.to_f32();
            }
        }
    }
}

/// `o[j] += sum_{r: j in bounds[r]} p[r, j] * x[r]`: the transposed product
/// (the backward's `dV += P^T dO` and `dK += dS^T Q`) over only the pairs
/// each row may see; scalar for the same reason as [`accumulate_visible`].
pub(crate) fn accumulate_visible_transposed(
    p: &[f32],
    stride: usize,
    bounds: &[(usize, usize)],
    x: &[f32],
    d: usize,
    o: &mut [f32],
) {
    for (r, &(a, b)) in bounds.iter().enumerate() {
        let row = &x[r * d..(r + 1) * d];
        for j in a..b {
            simd::axpy(p[r * stride + j], row, &mut o[j * d..(j + 1) * d]);
        }
    }
}

/// The summary queries of `chunks`: each sees `C + j + 1` keys, too few for
/// a GEMM to pay off, so scores and sums are direct.
pub(crate) fn summary_chunks<T: Element>(
    ctx: &Context<'_, T>,
    sc: &mut Scratch,
    chunks: Range<usize>,
) {
    let d = ctx.d;
    let layout = ctx
        .schedule
        .layout()
        .expect("summary tasks exist for KSA only");
    let s_count = layout.config().summaries();
    let qrow = &mut sc.q[..d];
    let acc = &mut sc.o[..d];
    for chunk in chunks {
        for j in 0..s_count {
            let keys = ctx
                .schedule
                .summary_query_keys(chunk, j)
                .expect("complete chunk");
            let slot = ctx
                .schedule
                .summary_query_row(chunk, j)
                .expect("complete chunk");
            let rows = &mut sc.key_rows;
            rows.clear();
            rows.extend(
                keys.text
                    .map(|t| ctx.schedule.gathered_row(KeySpace::Text, t)),
            );
            rows.extend(
                keys.summaries
                    .map(|s| ctx.schedule.gathered_row(KeySpace::Summary, s)),
            );
            sc.scores.resize(rows.len(), 0.0);
            let scores = &mut sc.scores[..];
            for hh in 0..ctx.group {
                let head = ctx.first_head + hh;
                ctx.load_query(head, slot, qrow);
                for (score, &r) in scores.iter_mut().zip(rows.iter()) {
                    let key = T::row_f32(&ctx.k[r * d..(r + 1) * d], &mut sc.row);
                    *score = simd::dot(qrow, key);
                }
                let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                acc.fill(0.0);
                let mut l = 0.0;
                for (&score, &r) in scores.iter().zip(rows.iter()) {
                    let p = simd::exp2(score - m);
                    l += p;
                    let value = T::row_f32(&ctx.v[r * d..(r + 1) * d], &mut sc.row);
                    simd::axpy(p, value, acc);
                }
                ctx.store(head, slot, acc, m, l);
            }
        }
    }
}

/// The columns of key tile `kt` that each row of a query tile over `tokens`
/// may see, `(start, end)` relative to the tile, for rows ordered (head,
/// token) over `group` heads: all of them for a full tile, the row's clipped
/// [`Schedule::row_keys`] for an edge tile.
pub(crate) fn tile_bounds(
    schedule: &Schedule,
    tokens: Range<usize>,
    kt: &KeyTile,
    group: usize,
    bounds: &mut [(usize, usize)],
) {
    let bq = tokens.len();
    for (i, token) in tokens.enumerate() {
        let bound = if kt.full {
            (0, kt.len())
        } else {
            let ranges = schedule.row_keys(token);
            let range = match kt.space {
                KeySpace::Summary => ranges.summaries,
                KeySpace::Text => ranges.text,
            };
            let a = range.start.clamp(kt.start, kt.end) - kt.start;
            let b = range.end.clamp(kt.start, kt.end) - kt.start;
            (a, b.max(a))
        };
        for hh in 0..group {
            bounds[hh * bq + i] = bound;
        }
    }
}
