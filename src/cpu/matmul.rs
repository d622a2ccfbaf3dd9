//! The tile products of attention: `S = Q K^T` and `O += A B`, where `A` is
//! read with any strides, so `O += P V` (forward, backward `dQ += dS K`) and
//! `O += P^T X` (backward `dV += P^T dO`, `dK += dS^T Q`) are one product.
//!
//! They run on register-blocked microkernels written for exactly these shapes,
//! one per [`CpuIsa`]: AVX-512F (14 rows x 32 columns of accumulators, 28 of
//! the 32 zmm registers; masked loads and stores take any head dim) and
//! AVX2 + FMA (6 rows x 16 columns; head dims that are multiples of 16, the
//! `gemm` crate otherwise). `A` is read in place (`P^T` is `P` with swapped
//! strides; the kernels broadcast single elements, so they need no contiguous
//! rows), `B` rows already are the panel layout the kernels want, and only
//! the key tile of `S = Q K^T` is packed (transposed, once per tile product,
//! `keys x d` floats against `rows x keys x d` FMAs). This avoids the general
//! `gemm` crate's per-call packing of both operands, which the tile loop
//! would pay once per key tile. [`CpuIsa::Portable`] computes the same
//! products with the `gemm` crate.
//!
//! Callers pass an `isa` the CPU supports ([`CpuIsa::check`] at the API
//! entry points); the kernels' pointer offsets carry debug assertions.

use super::isa::CpuIsa;
use super::Element;
use gemm::{gemm, Parallelism};

/// Per-thread scratch of the tile products: the packed key panels, and the
/// f32 rows of a half-precision K or V tile.
#[derive(Default)]
pub(crate) struct Pack {
    panels: Vec<f32>,
    rows: Vec<f32>,
}

/// Score rows are padded to a multiple of every kernel's panel width.
const PAD: usize = 32;

/// Row stride of a score buffer for `keys` keys: padded to whole panels so
/// the microkernels may write full panels.
pub(crate) fn score_stride(keys: usize) -> usize {
    keys.div_ceil(PAD) * PAD
}

/// Row stride of a key-major score buffer ([`scores_key_major`]) for `rows`
/// query rows: whole panels plus 16 floats, so that the value product, which
/// reads a few adjacent columns from every key row, does not find every row
/// in the same few L1 sets (a stride of 256 floats maps 128 rows to 4 of the
/// 64 sets).
pub(crate) fn key_major_stride(rows: usize) -> usize {
    score_stride(rows) + 16
}

/// The `A` operand of a product: element `(r, i)` is `data[r * rs + i * cs]`.
#[derive(Clone, Copy)]
struct Strided<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

/// The `B` operand of a product as column panels: panel `p` starts at
/// `b[p * b_step]`, its rows `b_rs` apart; `cols` output columns in all.
#[derive(Clone, Copy)]
struct Panels<'a> {
    b: &'a [f32],
    b_rs: usize,
    b_step: usize,
    cols: usize,
}

/// Memory the tile loop reads next, fetched while a product runs: its cache
/// lines are spread over the product's register blocks, a few after each,
/// so their misses overlap with arithmetic instead of stalling the first
/// pass of the next product over its operand. The forward fetches its value
/// tile during the scores and the next key tile during the value product:
/// K and V stream from L3, and the key-major products walk a tile's rows at
/// a stride the hardware prefetchers do not run far enough ahead of (+13% on
/// a loop of 128 x 256 tiles over L3-resident K/V, Zen 5). A hint: a
/// prefetch never faults, and the portable variant issues none.
#[derive(Clone, Copy)]
pub(crate) struct Prefetch {
    next: *const u8,
    end: *const u8,
    per_block: usize,
}

impl Prefetch {
    /// Nothing to fetch.
    pub(crate) const NONE: Prefetch = Prefetch {
        next: std::ptr::null(),
        end: std::ptr::null(),
        per_block: 0,
    };

    /// The cache lines of `x`.
    pub(crate) fn of<T>(x: &[T]) -> Self {
        let next = x.as_ptr().cast::<u8>();
        Prefetch {
            next,
            end: next.wrapping_add(std::mem::size_of_val(x)),
            per_block: 0,
        }
    }

    /// The same lines, spread evenly over `blocks` register blocks.
    #[cfg(target_arch = "x86_64")]
    fn over(self, blocks: usize) -> Self {
        let lines = (self.end as usize - self.next as usize).div_ceil(LINE);
        Prefetch {
            per_block: lines.div_ceil(blocks.max(1)),
            ..self
        }
    }

    /// After a register block: fetches the next share of lines.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn step(&mut self) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        for _ in 0..self.per_block {
            if self.next >= self.end {
                return;
            }
            // SAFETY: a prefetch is a hint; it reads nothing the program
            // sees and never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(self.next.cast()) };
            self.next = self.next.wrapping_add(LINE);
        }
    }
}

/// Bytes per cache line (every x86-64 CPU this crate dispatches for).
const LINE: usize = 64;

/// Transposes key rows (`keys x d`) into panels of `width` keys, `d x width`
/// each, zero-padded to whole panels. With AVX-512 (`isa`), whole 16 x 16
/// blocks go through registers (the element-wise transpose cost about a
/// tenth of the full causal forward); the rest element by element.
fn pack_keys(isa: CpuIsa, k: &[f32], keys: usize, d: usize, width: usize, pack: &mut Vec<f32>) {
    let panels = keys.div_ceil(width);
    pack.clear();
    pack.resize(panels * d * width, 0.0);
    let (mut keys_done, mut dims_done) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if isa.avx512() && width % 16 == 0 {
        (keys_done, dims_done) = (keys / 16 * 16, d / 16 * 16);
        for j in (0..keys_done).step_by(16) {
            let (p, jj) = (j / width, j % width);
            let panel = &mut pack[p * d * width..(p + 1) * d * width];
            for c in (0..dims_done).step_by(16) {
                // SAFETY: AVX-512F checked by the caller; rows j..j + 16,
                // columns c..c + 16 of `k` and rows c..c + 16, columns
                // jj..jj + 16 of the panel exist (debug-asserted inside).
                unsafe {
                    avx512::transpose16(&k[j * d + c..], d, &mut panel[c * width + jj..], width)
                };
            }
        }
    }
    let _ = isa;
    for (j, row) in k[..keys * d].chunks_exact(d).enumerate() {
        let (p, jj) = (j / width, j % width);
        let panel = &mut pack[p * d * width..(p + 1) * d * width];
        let first = if j < keys_done { dims_done } else { 0 };
        for (c, &x) in row.iter().enumerate().skip(first) {
            panel[c * width + jj] = x;
        }
    }
}

/// `s[r * stride + j] = sum_c q[r * d + c] * k[j * d + c]` for `r < rows`,
/// `j < keys` (columns up to the next multiple of 32 may be overwritten).
/// Half-precision keys become f32 here, once per tile.
#[allow(clippy::too_many_arguments)]
pub(crate) fn scores<T: Element>(
    isa: CpuIsa,
    rows: usize,
    keys: usize,
    d: usize,
    q: &[f32],
    k: &[T],
    s: &mut [f32],
    stride: usize,
    pack: &mut Pack,
    prefetch: Prefetch,
) {
    assert!(k.len() >= keys * d);
    let Pack {
        panels: pack,
        rows: conv,
    } = pack;
    let k = T::row_f32(&k[..keys * d], conv);
    match panel_width(isa) {
        Some(width) if d > 0 => pack_keys(isa, k, keys, d, width, pack),
        _ => pack.clear(),
    }
    row_dots(isa, d, (q, rows), (k, pack, keys), s, stride, prefetch);
}

/// `out[i * stride + j] = sum_c a[i * d + c] * r[j * d + c]` for `i < m`,
/// `j < n` (columns up to the next multiple of 32 may be overwritten):
/// every row of `a` against every row of `r`, whose panels ([`pack_keys`]
/// at the variant's [`panel_width`]) the microkernels read; the portable
/// path reads `r` itself.
fn row_dots(
    isa: CpuIsa,
    d: usize,
    (a, m): (&[f32], usize),
    (r, r_panels, n): (&[f32], &[f32], usize),
    out: &mut [f32],
    stride: usize,
    prefetch: Prefetch,
) {
    assert!(a.len() >= m * d && r.len() >= n * d && stride >= score_stride(n));
    assert!(out.len() >= m * stride);
    if m == 0 || n == 0 {
        return;
    }
    let a = Strided {
        data: &a[..m * d],
        rs: d,
        cs: 1,
    };
    #[cfg(target_arch = "x86_64")]
    if let Some(width) = panel_width(isa).filter(|_| d > 0) {
        assert!(r_panels.len() >= n.div_ceil(width) * d * width);
        if isa.avx512() {
            let panels = Panels {
                b: r_panels,
                b_rs: width,
                b_step: d * width,
                cols: n.div_ceil(width) * width,
            };
            // SAFETY: AVX-512F checked by the caller; every m x 32 block
            // is inside `out` because the stride is padded to whole panels
            // (asserted), offsets are debug-asserted.
            unsafe { avx512::panels(m, d, a, panels, out, stride, false, prefetch) };
        } else {
            let mut prefetch = prefetch.over(m.div_ceil(avx2::MR) * n.div_ceil(width));
            for p in 0..n.div_ceil(width) {
                let panel = &r_panels[p * d * width..(p + 1) * d * width];
                let out = &mut out[p * width..];
                let args = (panel, width, out, stride, false, &mut prefetch);
                // SAFETY: AVX2/FMA checked by the caller; as above.
                unsafe { avx2::panel(m, d, a, args) };
            }
        }
        return;
    }
    let _ = (isa, r_panels, a, prefetch);
    // SAFETY: OUT (m x n, row stride `stride`) and A (m x d) are inside
    // their buffers (asserted); R^T reads `r` with swapped strides.
    unsafe {
        gemm(
            m,
            n,
            d,
            out.as_mut_ptr(),
            1,
            stride as isize,
            false,
            a.data.as_ptr(),
            1,
            d as isize,
            r.as_ptr(),
            d as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// The microkernels' `B` panel width for `isa` (`None`: the `gemm` crate).
fn panel_width(isa: CpuIsa) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    match isa {
        CpuIsa::Avx512 | CpuIsa::Avx512Bf16 => return Some(avx512::NR),
        CpuIsa::Avx2 => return Some(avx2::NR),
        CpuIsa::Portable => {}
    }
    let _ = isa;
    None
}

/// Packs a query tile's rows (`rows x d`, f32) as the column panels
/// [`scores_key_major`] reads. Once per query tile, then reused by every key
/// tile it visits, so the tile loop transposes nothing.
pub(crate) fn pack_queries(isa: CpuIsa, q: &[f32], rows: usize, d: usize, pack: &mut Vec<f32>) {
    match panel_width(isa) {
        Some(width) if d > 0 => pack_keys(isa, q, rows, d, width, pack),
        _ => pack.clear(),
    }
}

/// `s[j * stride + r] = sum_c k[j * d + c] * q[r * d + c]` for `j < keys`,
/// `r < rows`: the scores of a key tile against a query tile, key-major (one
/// row per key, one column per query; columns up to the next multiple of 32
/// may be overwritten). `q` holds the query rows and `q_panels` the same rows
/// packed by [`pack_queries`]. The keys are read in place (half-precision
/// keys become f32 here, once per tile).
#[allow(clippy::too_many_arguments)]
pub(crate) fn scores_key_major<T: Element>(
    isa: CpuIsa,
    keys: usize,
    rows: usize,
    d: usize,
    k: &[T],
    (q, q_panels): (&[f32], &[f32]),
    s: &mut [f32],
    stride: usize,
    pack: &mut Pack,
    prefetch: Prefetch,
) {
    assert!(k.len() >= keys * d);
    let k = T::row_f32(&k[..keys * d], &mut pack.rows);
    row_dots(isa, d, (k, keys), (q, q_panels, rows), s, stride, prefetch);
}

/// Whether [`scores_key_major_bf16`] runs for head dim `d` on `isa`: the
/// AVX512_BF16 variant and whole pairs of dims.
pub(crate) fn bf16_scores(isa: CpuIsa, d: usize) -> bool {
    cfg!(target_arch = "x86_64") && isa == CpuIsa::Avx512Bf16 && d > 0 && d % 2 == 0
}

/// Packs a query tile's bf16 rows (`rows x d` bit patterns, `d` even) as
/// the panels [`scores_key_major_bf16`] reads: per panel of 32 rows and per
/// pair of dims `(2i, 2i + 1)`, 32 words holding that pair of each row
/// (lower half the even dim), zero-padded to whole panels.
pub(crate) fn pack_queries_bf16(q: &[u16], rows: usize, d: usize, pack: &mut Vec<u32>) {
    const W: usize = 32;
    assert!(d % 2 == 0 && q.len() >= rows * d);
    let (panels, pairs) = (rows.div_ceil(W), d / 2);
    pack.clear();
    pack.resize(panels * pairs * W, 0);
    for (r, row) in q[..rows * d].chunks_exact(d).enumerate() {
        let panel = &mut pack[r / W * pairs * W..];
        for (i, pair) in row.chunks_exact(2).enumerate() {
            panel[i * W + r % W] = u32::from(pair[0]) | (u32::from(pair[1]) << 16);
        }
    }
}

/// [`scores_key_major`] for bf16 keys and queries on
/// [`CpuIsa::Avx512Bf16`] ([`bf16_scores`]): `s[j * stride + r] = sum_c
/// k[j * d + c] * q[r * d + c]` with `vdpbf16ps` (bf16 products are exact in
/// f32; the two products of a pair are added to the f32 accumulator in one
/// step, denormals flushed), the keys read in place as bit patterns and the
/// queries from [`pack_queries_bf16`]. Columns up to the next multiple of 32
/// may be overwritten.
#[allow(clippy::too_many_arguments)]
pub(crate) fn scores_key_major_bf16(
    isa: CpuIsa,
    keys: usize,
    rows: usize,
    d: usize,
    k: &[u16],
    q_panels: &[u32],
    s: &mut [f32],
    stride: usize,
    prefetch: Prefetch,
) {
    assert!(
        bf16_scores(isa, d),
        "bf16 scores need avx512bf16 and an even head dim"
    );
    assert!(k.len() >= keys * d && stride >= score_stride(rows) && s.len() >= keys * stride);
    assert!(q_panels.len() >= rows.div_ceil(32) * d / 2 * 32);
    if rows == 0 || keys == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F and AVX512_BF16 checked by the caller (`isa`);
    // sizes asserted above, offsets debug-asserted inside.
    unsafe {
        avx512bf16::scores(keys, rows.div_ceil(32), d, k, q_panels, s, stride, prefetch)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = prefetch;
}

/// `o[r * d + c] += sum_j p[r * rs + j * cs] * v[j * d + c]` for `r < rows`,
/// `j < keys`: `O += P V`, with `P` row-major (`rs = stride, cs = 1`: the
/// backward's `dQ += dS K`) or key-major (`rs = 1, cs = stride`: the
/// forward's probabilities as [`scores_key_major`] lays them out).
/// Half-precision values become f32 here, once per tile.
#[allow(clippy::too_many_arguments)]
pub(crate) fn accumulate<T: Element>(
    isa: CpuIsa,
    rows: usize,
    keys: usize,
    d: usize,
    p: (&[f32], usize, usize),
    v: &[T],
    o: &mut [f32],
    pack: &mut Pack,
    prefetch: Prefetch,
) {
    assert!(v.len() >= keys * d);
    let v = T::row_f32(&v[..keys * d], &mut pack.rows);
    product(isa, rows, keys, d, p, v, o, prefetch);
}

/// `o[j * d + c] += sum_r p[r * stride + j] * x[r * d + c]` for `j < keys`,
/// `r < rows`: `O += P^T X`, with `P` (rows x keys) read in place.
#[allow(clippy::too_many_arguments)]
pub(crate) fn accumulate_transposed(
    isa: CpuIsa,
    rows: usize,
    keys: usize,
    d: usize,
    p: &[f32],
    stride: usize,
    x: &[f32],
    o: &mut [f32],
    prefetch: Prefetch,
) {
    product(isa, keys, rows, d, (p, 1, stride), x, o, prefetch);
}

/// `o[r * d + c] += sum_i a[r * rs + i * cs] * b[i * d + c]` for `r < m`,
/// `i < depth`, `c < d`; `a` is `(data, rs, cs)`.
#[allow(clippy::too_many_arguments)]
fn product(
    isa: CpuIsa,
    m: usize,
    depth: usize,
    d: usize,
    (a, rs, cs): (&[f32], usize, usize),
    b: &[f32],
    o: &mut [f32],
    prefetch: Prefetch,
) {
    if m == 0 || depth == 0 || d == 0 {
        return;
    }
    assert!(a.len() > (m - 1) * rs + (depth - 1) * cs);
    assert!(b.len() >= depth * d && o.len() >= m * d);
    let (b, o) = (&b[..depth * d], &mut o[..m * d]);
    let strided = Strided { data: a, rs, cs };
    #[cfg(target_arch = "x86_64")]
    match isa {
        CpuIsa::Avx512 | CpuIsa::Avx512Bf16 => {
            let panels = Panels {
                b,
                b_rs: d,
                b_step: avx512::NR,
                cols: d,
            };
            // SAFETY: AVX-512F checked by the caller; the `d` columns of
            // every row are inside `b` and `o` (asserted sizes), the rest of
            // the last panel is masked off.
            unsafe { avx512::panels(m, depth, strided, panels, o, d, true, prefetch) };
            return;
        }
        CpuIsa::Avx2 if d % avx2::NR == 0 => {
            let mut prefetch = prefetch.over(m.div_ceil(avx2::MR) * d / avx2::NR);
            for c in (0..d).step_by(avx2::NR) {
                let args = (&b[c..], d, &mut o[c..], d, true, &mut prefetch);
                // SAFETY: AVX2/FMA checked by the caller, d % 16 == 0 so
                // columns c..c + 16 exist; sizes asserted above.
                unsafe { avx2::panel(m, depth, strided, args) };
            }
            return;
        }
        _ => {}
    }
    let _ = (isa, strided, prefetch);
    // SAFETY: O (m x d) += A (m x depth, strides rs, cs) * B (depth x d), all
    // inside their buffers (asserted).
    unsafe {
        gemm(
            m,
            d,
            depth,
            o.as_mut_ptr(),
            1,
            d as isize,
            true,
            a.as_ptr(),
            cs as isize,
            rs as isize,
            b.as_ptr(),
            1,
            d as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// Rows of the next register block when `left` rows remain and blocks hold
/// up to `mr`: a short last block (few accumulators for the FMA latency to
/// hide, and a whole pass over `B` for a few rows) is avoided by splitting
/// the last two blocks evenly (128 rows: 8 blocks of 14, then 8 and 8).
#[cfg(target_arch = "x86_64")]
fn block_rows(left: usize, mr: usize) -> usize {
    if left > mr && left < mr + mr / 2 {
        left.div_ceil(2)
    } else {
        left.min(mr)
    }
}

/// Calls `$f::<R, $v, $u>($args)` for a runtime row count `R` in `1..=14`.
#[cfg(target_arch = "x86_64")]
macro_rules! by_rows {
    ($rows:expr, $f:ident, $v:literal, $u:expr, ($($arg:expr),*)) => {
        match $rows {
            1 => $f::<1, $v, $u>($($arg),*),
            2 => $f::<2, $v, $u>($($arg),*),
            3 => $f::<3, $v, $u>($($arg),*),
            4 => $f::<4, $v, $u>($($arg),*),
            5 => $f::<5, $v, $u>($($arg),*),
            6 => $f::<6, $v, $u>($($arg),*),
            7 => $f::<7, $v, $u>($($arg),*),
            8 => $f::<8, $v, $u>($($arg),*),
            9 => $f::<9, $v, $u>($($arg),*),
            10 => $f::<10, $v, $u>($($arg),*),
            11 => $f::<11, $v, $u>($($arg),*),
            12 => $f::<12, $v, $u>($($arg),*),
            13 => $f::<13, $v, $u>($($arg),*),
            _ => $f::<14, $v, $u>($($arg),*),
        }
    };
}

/// Calls `by_rows!` with `UNIT` = whether `A`'s rows are adjacent elements
/// (`rs == 1`: key-major probabilities). Known at compile time, the row
/// offsets become constant displacements from one pointer per depth step
/// instead of a chain of additions.
#[cfg(target_arch = "x86_64")]
macro_rules! by_rows_unit {
    ($unit:expr, $rows:expr, $f:ident, $v:literal, ($($arg:expr),*)) => {
        if $unit {
            by_rows!($rows, $f, $v, true, ($($arg),*))
        } else {
            by_rows!($rows, $f, $v, false, ($($arg),*))
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Panels, Prefetch, Strided};
    use std::arch::x86_64::*;

    /// Output columns per panel: two 16-lane zmm vectors.
    pub(super) const NR: usize = 32;
    /// Rows per block: 14 x 2 accumulators + 2 `B` vectors + 1 broadcast
    /// leave one of the 32 zmm registers free.
    const MR: usize = 14;

    /// `dst[i * dst_rs + j] = src[j * src_rs + i]` for `i, j < 16`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose16(src: &[f32], src_rs: usize, dst: &mut [f32], dst_rs: usize) {
        debug_assert!(src.len() >= 15 * src_rs + 16 && dst.len() >= 15 * dst_rs + 16);
        let mut r = [_mm512_setzero_ps(); 16];
        for (i, r) in r.iter_mut().enumerate() {
            *r = _mm512_loadu_ps(src.as_ptr().add(i * src_rs));
        }
        // Interleave pairs of rows, then pairs of pairs, then 128-bit lanes
        // twice: the 16 x 16 transpose in 64 shuffles.
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        for i in 0..4 {
            let (a, b, c, d) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
            r[4 * i] = _mm512_shuffle_ps::<0x44>(a, c);
            r[4 * i + 1] = _mm512_shuffle_ps::<0xee>(a, c);
            r[4 * i + 2] = _mm512_shuffle_ps::<0x44>(b, d);
            r[4 * i + 3] = _mm512_shuffle_ps::<0xee>(b, d);
        }
        for h in [0, 8] {
            for i in 0..4 {
                t[h + i] = _mm512_shuffle_f32x4::<0x88>(r[h + i], r[h + i + 4]);
                t[h + i + 4] = _mm512_shuffle_f32x4::<0xdd>(r[h + i], r[h + i + 4]);
            }
        }
        for i in 0..8 {
            r[i] = _mm512_shuffle_f32x4::<0x88>(t[i], t[i + 8]);
            r[i + 8] = _mm512_shuffle_f32x4::<0xdd>(t[i], t[i + 8]);
        }
        for (i, r) in r.iter().enumerate() {
            _mm512_storeu_ps(dst.as_mut_ptr().add(i * dst_rs), *r);
        }
    }

    /// The lane mask of the first `n` of 16 lanes.
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }

    /// `out (+)= A B` over `m` rows and `panels.cols` columns (`out` rows
    /// at stride `out_rs`), in blocks of 14 rows (the last two split
    /// evenly) by 32-column panels. Panels are the outer loop: one panel of
    /// `B` (`depth x 32`, 16 KB for depth 128) stays in L1 while the row
    /// blocks of `A` stream past, so a 256 x 128 tile product reads about
    /// half the bytes from L2 that row-block-outer order did (which streamed
    /// all of `B` once per 14 rows).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn panels(
        m: usize,
        depth: usize,
        a: Strided<'_>,
        panels: Panels<'_>,
        out: &mut [f32],
        out_rs: usize,
        accumulate: bool,
        prefetch: Prefetch,
    ) {
        let mut prefetch = prefetch.over(m.div_ceil(MR) * panels.cols.div_ceil(NR));
        for (p, c) in (0..panels.cols).step_by(NR).enumerate() {
            let cols = (panels.cols - c).min(NR);
            let masks = [lanes(cols), lanes(cols.saturating_sub(16))];
            let b = &panels.b[p * panels.b_step..];
            let mut r = 0;
            while r < m {
                let rows = super::block_rows(m - r, MR);
                let ar = Strided {
                    data: &a.data[r * a.rs..],
                    ..a
                };
                let or = &mut out[r * out_rs + c..];
                let args = (ar, b, panels.b_rs, depth, or, out_rs, masks, accumulate);
                if cols > 16 {
                    by_rows_unit!(a.rs == 1, rows, block, 2, (args));
                } else {
                    by_rows_unit!(a.rs == 1, rows, block, 1, (args));
                }
                prefetch.step();
                r += rows;
            }
        }
    }

    type BlockArgs<'a, 'b> = (
        Strided<'a>,
        &'a [f32],
        usize,
        usize,
        &'b mut [f32],
        usize,
        [__mmask16; 2],
        bool,
    );

    /// One `R x 16V` output block: `out[r][..] (+)= sum_i a(r, i) *
    /// b[i * b_rs + ..]` for `i < depth`, accumulators in registers, lanes
    /// outside `masks` neither read nor written.
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const R: usize, const V: usize, const UNIT: bool>(
        (a, b, b_rs, depth, out, out_rs, masks, accumulate): BlockArgs<'_, '_>,
    ) {
        let rs = if UNIT { 1 } else { a.rs };
        let live = |v: usize| masks[v].count_ones() as usize;
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        if accumulate {
            for (r, acc) in acc.iter_mut().enumerate() {
                for (v, acc) in acc.iter_mut().enumerate() {
                    let at = r * out_rs + 16 * v;
                    debug_assert!(at + live(v) <= out.len());
                    *acc = _mm512_maskz_loadu_ps(masks[v], out.as_ptr().add(at));
                }
            }
        }
        let (ap, bp) = (a.data.as_ptr(), b.as_ptr());
        for i in 0..depth {
            let mut bv = [_mm512_setzero_ps(); V];
            for (v, bv) in bv.iter_mut().enumerate() {
                let at = i * b_rs + 16 * v;
                debug_assert!(at + live(v) <= b.len());
                *bv = _mm512_maskz_loadu_ps(masks[v], bp.add(at));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let at = r * rs + i * a.cs;
                debug_assert!(at < a.data.len());
                let x = _mm512_set1_ps(*ap.add(at));
                for (acc, &bv) in acc.iter_mut().zip(&bv) {
                    *acc = _mm512_fmadd_ps(x, bv, *acc);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, &acc) in acc.iter().enumerate() {
                let at = r * out_rs + 16 * v;
                debug_assert!(at + live(v) <= out.len());
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(at), masks[v], acc);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512bf16 {
    use super::Prefetch;
    use std::arch::x86_64::*;

    /// Key rows per register block, as [`super::avx512`]: 14 x 2
    /// accumulators, two query vectors and one broadcast.
    const MR: usize = 14;

    /// `s (keys x 32 * panels, row stride `stride`) = K Q^T` over `d / 2`
    /// dim pairs: blocks of up to 14 key rows by 32-column query panels.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn scores(
        keys: usize,
        panels: usize,
        d: usize,
        k: &[u16],
        q: &[u32],
        s: &mut [f32],
        stride: usize,
        prefetch: Prefetch,
    ) {
        let mut prefetch = prefetch.over(keys.div_ceil(MR) * panels);
        let mut j = 0;
        while j < keys {
            let rows = super::block_rows(keys - j, MR);
            for p in 0..panels {
                let args = (
                    &k[j * d..],
                    d,
                    &q[p * d / 2 * 32..],
                    &mut s[j * stride + p * 32..],
                    stride,
                );
                by_rows!(rows, block, 2, false, (args));
                prefetch.step();
            }
            j += rows;
        }
    }

    type BlockArgs<'a, 'b> = (&'a [u16], usize, &'a [u32], &'b mut [f32], usize);

    /// One `R x 32` block of scores: accumulators in registers, one
    /// `vdpbf16ps` per (row, query vector, dim pair).
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn block<const R: usize, const V: usize, const UNIT: bool>(
        (k, d, q, out, out_rs): BlockArgs<'_, '_>,
    ) {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        let (kp, qp) = (k.as_ptr(), q.as_ptr());
        for i in 0..d / 2 {
            let mut qv = [_mm512_setzero_si512(); V];
            for (v, qv) in qv.iter_mut().enumerate() {
                let at = i * 32 + 16 * v;
                debug_assert!(at + 16 <= q.len());
                *qv = _mm512_loadu_si512(qp.add(at).cast());
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let at = r * d + 2 * i;
                debug_assert!(at + 2 <= k.len());
                let pair = kp.add(at).cast::<u32>().read_unaligned();
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair as i32));
                for (acc, &qv) in acc.iter_mut().zip(&qv) {
                    *acc = _mm512_dpbf16_ps(*acc, x, std::mem::transmute::<__m512i, __m512bh>(qv));
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, &acc) in acc.iter().enumerate() {
                let at = r * out_rs + 16 * v;
                debug_assert!(at + 16 <= out.len());
                _mm512_storeu_ps(out.as_mut_ptr().add(at), acc);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Prefetch, Strided};
    use std::arch::x86_64::*;

    /// Output columns per panel: two 8-lane ymm vectors.
    pub(super) const NR: usize = 16;
    /// Rows per block: 6 x 2 accumulators + 2 `B` vectors + 1 broadcast of
    /// the 16 ymm registers.
    pub(super) const MR: usize = 6;

    /// One 16-column panel of `out (+)= A B` over `m` rows: `B` rows at
    /// stride `b_rs`, `out` rows at stride `out_rs`, both starting at the
    /// panel's first column. Blocks of 6 rows, then one block for the
    /// remainder; `prefetch` steps after each.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn panel(
        m: usize,
        depth: usize,
        a: Strided<'_>,
        (b, b_rs, out, out_rs, accumulate, prefetch): PanelArgs<'_, '_>,
    ) {
        let mut r = 0;
        while r < m {
            let rows = super::block_rows(m - r, MR);
            let ar = Strided {
                data: &a.data[r * a.rs..],
                ..a
            };
            let or = &mut out[r * out_rs..];
            let args = (ar, b, b_rs, depth, or, out_rs, accumulate);
            by_rows_unit!(a.rs == 1, rows, block, 2, (args));
            prefetch.step();
            r += rows;
        }
    }

    type PanelArgs<'a, 'b> = (
        &'a [f32],
        usize,
        &'b mut [f32],
        usize,
        bool,
        &'b mut Prefetch,
    );

    type BlockArgs<'a, 'b> = (
        Strided<'a>,
        &'a [f32],
        usize,
        usize,
        &'b mut [f32],
        usize,
        bool,
    );

    /// One `R x 16` output block: `out[r][0..16] (+)= sum_i a(r, i) *
    /// b[i * b_rs + 0..16]` for `i < depth`, accumulators in registers.
    /// (`V` is always 2: the shared row dispatch passes it.)
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block<const R: usize, const V: usize, const UNIT: bool>(
        (a, b, b_rs, depth, out, out_rs, accumulate): BlockArgs<'_, '_>,
    ) {
        let rs = if UNIT { 1 } else { a.rs };
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        if accumulate {
            for (r, acc) in acc.iter_mut().enumerate() {
                for (v, acc) in acc.iter_mut().enumerate() {
                    let at = r * out_rs + 8 * v;
                    debug_assert!(at + 8 <= out.len());
                    *acc = _mm256_loadu_ps(out.as_ptr().add(at));
                }
            }
        }
        let (ap, bp) = (a.data.as_ptr(), b.as_ptr());
        for i in 0..depth {
            let mut bv = [_mm256_setzero_ps(); V];
            for (v, bv) in bv.iter_mut().enumerate() {
                let at = i * b_rs + 8 * v;
                debug_assert!(at + 8 <= b.len());
                *bv = _mm256_loadu_ps(bp.add(at));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let at = r * rs + i * a.cs;
                debug_assert!(at < a.data.len());
                let x = _mm256_broadcast_ss(&*ap.add(at));
                for (acc, &bv) in acc.iter_mut().zip(&bv) {
                    *acc = _mm256_fmadd_ps(x, bv, *acc);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, &acc) in acc.iter().enumerate() {
                let at = r * out_rs + 8 * v;
                debug_assert!(at + 8 <= out.len());
                _mm256_storeu_ps(out.as_mut_ptr().add(at), acc);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104729) % 211) as f32 / 105.0 - 1.0)
            .collect()
    }

    /// Every product on every variant this CPU has, with row counts that
    /// leave every remainder of the row blocks, key counts that are not
    /// whole panels and head dims that are not whole vectors, against plain
    /// sums (f32 rounding of up to 256-term dot products: 1e-4 absolute on
    /// terms in [-1, 1]).
    #[test]
    fn products_match_naive_sums() {
        for isa in CpuIsa::available() {
            for d in [1, 7, 16, 32, 48, 131] {
                for rows in [1, 5, 6, 13, 14, 16, 20, 29] {
                    for keys in [1, 7, 16, 37] {
                        check(isa, d, rows, keys);
                    }
                }
            }
        }
    }

    /// The bf16 dot-product scores on every variant that has them, head
    /// dims even (their condition), against f64 sums of the same bf16
    /// values (the products are exact; f32 accumulation of up to 128 pairs:
    /// 1e-4 absolute on terms in [-1, 1]).
    #[test]
    fn bf16_scores_match_naive_sums() {
        for isa in CpuIsa::available() {
            for d in [2, 16, 64, 130] {
                if !bf16_scores(isa, d) {
                    continue;
                }
                for (rows, keys) in [(1, 1), (5, 16), (33, 29), (64, 128)] {
                    let bits = |len, seed| -> Vec<u16> {
                        data(len, seed)
                            .iter()
                            .map(|&x| half::bf16::from_f32(x).to_bits())
                            .collect()
                    };
                    let (q, k) = (bits(rows * d, 6), bits(keys * d, 7));
                    let stride = key_major_stride(rows);
                    let (mut s, mut panels) = (vec![f32::NAN; keys * stride], Vec::new());
                    pack_queries_bf16(&q, rows, d, &mut panels);
                    scores_key_major_bf16(
                        isa,
                        keys,
                        rows,
                        d,
                        &k,
                        &panels,
                        &mut s,
                        stride,
                        Prefetch::NONE,
                    );
                    let f = |x: u16| half::bf16::from_bits(x).to_f64();
                    for j in 0..keys {
                        for r in 0..rows {
                            let want: f64 = (0..d).map(|c| f(q[r * d + c]) * f(k[j * d + c])).sum();
                            let got = s[j * stride + r] as f64;
                            assert!(
                                (got - want).abs() < 1e-4,
                                "{isa} d={d} rows={rows} keys={keys} s[{j}, {r}]: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    fn check(isa: CpuIsa, d: usize, rows: usize, keys: usize) {
        let stride = score_stride(keys);
        let (q, k) = (data(rows * d, 1), data(keys * d, 2));
        let mut s = vec![0.0; rows * stride];
        let mut pack = Pack::default();
        scores(
            isa,
            rows,
            keys,
            d,
            &q,
            &k,
            &mut s,
            stride,
            &mut pack,
            Prefetch::of(&k),
        );
        let p = data(rows * stride, 3);
        let (mut o, mut ot) = (data(rows * d, 4), data(keys * d, 5));
        let (o0, ot0) = (o.clone(), ot.clone());
        accumulate(
            isa,
            rows,
            keys,
            d,
            (&p, stride, 1),
            &k,
            &mut o,
            &mut pack,
            Prefetch::of(&q),
        );
        accumulate_transposed(isa, rows, keys, d, &p, stride, &q, &mut ot, Prefetch::NONE);
        let tag = format!("{isa} d={d} rows={rows} keys={keys}");
        // Key-major: S^T from packed query panels, then O += P V with P
        // key-major (the transpose of the row-major `p`).
        let km = key_major_stride(rows);
        let (mut st, mut panels) = (vec![0.0; keys * km], Vec::new());
        pack_queries(isa, &q, rows, d, &mut panels);
        scores_key_major(
            isa,
            keys,
            rows,
            d,
            &k,
            (&q, &panels),
            &mut st,
            km,
            &mut pack,
            Prefetch::of(&q),
        );
        let mut pt = vec![0.0; keys * km];
        for r in 0..rows {
            for j in 0..keys {
                pt[j * km + r] = p[r * stride + j];
            }
        }
        let mut okm = o0.clone();
        accumulate(
            isa,
            rows,
            keys,
            d,
            (&pt, 1, km),
            &k,
            &mut okm,
            &mut pack,
            Prefetch::NONE,
        );
        for r in 0..rows {
            for j in 0..keys {
                assert!(
                    (st[j * km + r] - s[r * stride + j]).abs() < 1e-4,
                    "{tag} s^T"
                );
            }
            for c in 0..d {
                assert!(
                    (okm[r * d + c] - o[r * d + c]).abs() < 1e-4,
                    "{tag} key-major pv"
                );
            }
        }
        for r in 0..rows {
            for j in 0..keys {
                let want: f32 = (0..d).map(|c| q[r * d + c] * k[j * d + c]).sum();
                assert!((s[r * stride + j] - want).abs() < 1e-4, "{tag} s");
            }
            for c in 0..d {
                let want: f32 = o0[r * d + c]
                    + (0..keys)
                        .map(|j| p[r * stride + j] * k[j * d + c])
                        .sum::<f32>();
                assert!((o[r * d + c] - want).abs() < 1e-4, "{tag} pv");
            }
        }
        for j in 0..keys {
            for c in 0..d {
                let want: f32 = ot0[j * d + c]
                    + (0..rows)
                        .map(|r| p[r * stride + j] * q[r * d + c])
                        .sum::<f32>();
                assert!((ot[j * d + c] - want).abs() < 1e-4, "{tag} ptx");
            }
        }
    }
}
