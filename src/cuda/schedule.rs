//! The GPU launch schedule: which key tiles each query tile of the kernel
//! visits, and which of them need the element mask (edge tiles).
//!
//! Built on the crate's shared tile schedule ([`crate::schedule`], also used
//! by the CPU path) for the text queries (all queries in causal mode), and
//! extended with what the GPU needs on top: tiles of summary queries (the
//! shared schedule lists their few keys per chunk), one row space for queries
//! and keys, heaviest-first ordering and the two tables the kernel reads.
//! The backward kernel walks the same pairs key-major: [`KeyMajorSchedule`]
//! inverts a forward [`QueryMajorSchedule`].
//!
//! Rows are in *gathered* coordinates: under [`Mask::Ksa`] row `g <
//! n_sum` is summary `g` in chunk-major order (`g = chunk*S + j`) and row `g >=
//! n_sum` is text token `g - n_sum`; under [`Mask::Causal`] `g` is the slot.
//! Queries and keys use the same coordinates. Every query's keys are then two
//! dense ranges of `g` ([`crate::mask::Gathered::keys`], the closed form of
//! [`KsaLayout::key_ranges`] that the kernel's edge mask mirrors).

use crate::layout::KsaLayout;
use crate::mask::{KeySpace, Mask};
use crate::schedule::{QueryOffset, Schedule as TextSchedule, TileSizes};
use crate::{Error, Result};
use std::ops::Range;

/// Query rows per tile by default (one CTA: 4 warps x 16 rows). With GQA
/// packing a CTA serves 2 or 4 query heads of 32 or 16 rows each
/// ([`QueryMajorSchedule::with_block_q`]).
pub const BLOCK_Q: usize = 64;
/// Key rows per tile.
pub const BLOCK_K: usize = 64;

/// `rows` cut into tiles of `block` rows from its start, appended to `out`.
fn tiles_of(rows: Range<usize>, block: usize, out: &mut Vec<Range<usize>>) {
    let mut a = rows.start;
    while a < rows.end {
        let b = (a + block).min(rows.end);
        out.push(a..b);
        a = b;
    }
}

/// The tiles (of `block` rows) of a mask's gathered rows: the summary and
/// text regions each start a new tile.
fn region_tiles(mask: &Mask, block: usize) -> Vec<Range<usize>> {
    let (n, ns) = (mask.len(), mask.summary_len());
    let mut out = Vec::with_capacity(n.div_ceil(block) + 1);
    for region in [0..ns, ns..n] {
        tiles_of(region, block, &mut out);
    }
    out
}

/// Index in [`region_tiles`]`(mask, BLOCK_K)` of the key tile holding row `g`.
fn key_tile_of(mask: &Mask, g: usize) -> usize {
    let ns = mask.summary_len();
    if g < ns {
        g / BLOCK_K
    } else {
        ns.div_ceil(BLOCK_K) + (g - ns) / BLOCK_K
    }
}

/// Whether a key tile needs no element mask for query rows with these allowed
/// ranges: it has [`BLOCK_K`] keys (the kernels zero-fill shorter tiles) and
/// lies inside one range of every row.
fn full_tile(row_ranges: &[[Range<usize>; 2]], keys: &Range<usize>) -> bool {
    keys.len() == BLOCK_K
        && row_ranges.iter().all(|rr| {
            rr.iter()
                .any(|r| r.start <= keys.start && keys.end <= r.end)
        })
}

/// One key tile visited by a query tile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyVisit {
    /// Gathered key rows of the tile (at most [`BLOCK_K`]).
    pub keys: Range<usize>,
    /// Whether some (valid query, key) pair of the tile is masked, so the
    /// element mask must run. `false`: every pair is allowed.
    pub edge: bool,
}

/// One query tile and the key tiles it visits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryTile {
    /// Gathered query rows of the tile (at most [`BLOCK_Q`]).
    pub rows: Range<usize>,
    /// Its visits, as a range of [`QueryMajorSchedule::visits`].
    pub visits: Range<usize>,
}

/// The block-sparse schedule of one mask: query tiles (heaviest first, so a
/// GPU starts the long tiles early) and, per tile, the key tiles it visits in
/// ascending key order. Either all queries of the mask, or only those of a
/// cache step ([`QueryMajorSchedule::step`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryMajorSchedule {
    mask: Mask,
    block_q: usize,
    offset: QueryOffset,
    first_slot: usize,
    step_rows: Range<usize>,
    query_tiles: Vec<QueryTile>,
    visits: Vec<KeyVisit>,
}

impl QueryMajorSchedule {
    /// Builds the schedule of `mask` with [`BLOCK_Q`]-row query tiles. Fails
    /// if the rows do not fit the kernels' 31-bit row indices.
    pub fn new(mask: Mask) -> Result<Self> {
        Self::with_block_q(mask, BLOCK_Q)
    }

    /// [`QueryMajorSchedule::new`] with `block_q` query rows per tile (16, 32 or 64).
    pub fn with_block_q(mask: Mask, block_q: usize) -> Result<Self> {
        Self::step(mask, block_q, QueryOffset::default())
    }

    /// The schedule of one cache step over `mask` (the mask of the whole text
    /// after the step), `block_q` query rows per tile: only the queries
    /// `offset` names, as the shared [`TextSchedule::step`] (which checks the
    /// offset) runs them: text tokens `old..n` and the summaries of the
    /// chunks they complete. Rows stay absolute gathered rows; no visit holds
    /// a text key before [`QueryOffset::first_key`] (summary tiles of the
    /// fixed key grid are clipped there), so a launch may hold only the keys
    /// from there on. The default offset is [`QueryMajorSchedule::with_block_q`].
    pub fn step(mask: Mask, block_q: usize, offset: QueryOffset) -> Result<Self> {
        if !matches!(block_q, 16 | 32 | 64) {
            return Err(Error::InvalidConfig(format!(
                "query tile of {block_q} rows (supported: 16, 32, 64)"
            )));
        }
        let n = mask.len();
        if n >= 1 << 31 {
            return Err(Error::TooLarge {
                what: "rows of a GPU attention schedule",
                got: n,
                limit: (1 << 31) - 1,
            });
        }
        let ns = mask.summary_len();
        let mut tiles: Vec<(Range<usize>, Vec<KeyVisit>)> = Vec::new();

        // Text queries (all queries when causal): the crate's shared schedule
        // (`crate::schedule`), mapped to gathered rows. A key tile shorter than
        // BLOCK_K is an edge tile here: the kernel zero-fills the rest of its
        // shared tile and only the element mask keeps those rows out.
        let sizes = TileSizes {
            query: block_q,
            key: BLOCK_K,
        };
        let text = TextSchedule::step(mask, sizes, offset)?;
        let mut buf = Vec::new();
        for t in 0..text.query_tiles() {
            let q = text.query_tile(t);
            text.key_tiles(t, &mut buf);
            let visits = buf
                .iter()
                .map(|k| {
                    let base = match k.space {
                        KeySpace::Summary => 0,
                        KeySpace::Text => ns,
                    };
                    KeyVisit {
                        keys: base + k.start..base + k.end,
                        edge: !k.full || k.len() < BLOCK_K,
                    }
                })
                .collect();
            tiles.push((ns + q.start..ns + q.end, visits));
        }

        // Summary queries (KSA): the shared schedule lists their keys per
        // chunk; the GPU tiles them too, `block_q` summaries per tile (from
        // the step's first), each visiting the key tiles of a fixed grid its
        // rows can see, clipped to the held text.
        let s = mask.layout().map_or(1, |l| l.config().summaries());
        let chunks = text.summary_query_chunks();
        let summary_rows = chunks.start * s..chunks.end * s;
        if !summary_rows.is_empty() {
            let gathered = mask.gathered();
            let ktiles = region_tiles(&mask, BLOCK_K);
            let held = ns + offset.first_key;
            let mut spans: Vec<Range<usize>> = Vec::with_capacity(2 * block_q);
            let mut row_ranges: Vec<[Range<usize>; 2]> = Vec::with_capacity(block_q);
            let mut summary_tiles = Vec::new();
            tiles_of(summary_rows, block_q, &mut summary_tiles);
            for rows in summary_tiles {
                row_ranges.clear();
                row_ranges.extend(rows.clone().map(|g| gathered.keys(g)));
                spans.clear();
                spans.extend(
                    row_ranges
                        .iter()
                        .flatten()
                        .filter(|r| !r.is_empty())
                        .cloned(),
                );
                spans.sort_unstable_by_key(|r| r.start);
                let mut visits = Vec::new();
                let mut next_tile = 0usize; // first key tile not yet visited
                let mut i = 0;
                while i < spans.len() {
                    // Merge overlapping or adjacent spans.
                    let (a, mut b) = (spans[i].start, spans[i].end);
                    i += 1;
                    while i < spans.len() && spans[i].start <= b {
                        b = b.max(spans[i].end);
                        i += 1;
                    }
                    let (first, last) = (
                        key_tile_of(&mask, a).max(next_tile),
                        key_tile_of(&mask, b - 1),
                    );
                    for (t, keys) in ktiles.iter().enumerate().take(last + 1).skip(first) {
                        // Text before `first_key` is not held (and no row of
                        // a step sees it: `TextSchedule::step` checked).
                        let keys = if keys.start >= ns {
                            keys.start.max(held)..keys.end
                        } else {
                            keys.clone()
                        };
                        let edge = !full_tile(&row_ranges, &keys);
                        visits.push(KeyVisit { keys, edge });
                        next_tile = t + 1;
                    }
                }
                tiles.push((rows, visits));
            }
        }
        // Heaviest first (stable: equal tiles keep their order).
        tiles.sort_by_key(|(_, v)| std::cmp::Reverse(v.len()));
        let mut query_tiles = Vec::with_capacity(tiles.len());
        let mut visits = Vec::new();
        for (rows, v) in tiles {
            let start = visits.len();
            visits.extend(v);
            query_tiles.push(QueryTile {
                rows,
                visits: start..visits.len(),
            });
        }
        Ok(Self {
            mask,
            block_q,
            offset,
            first_slot: text.first_slot(),
            step_rows: text.step_rows(),
            query_tiles,
            visits,
        })
    }

    /// The KSA schedule of `layout`.
    pub fn ksa(layout: &KsaLayout) -> Result<Self> {
        Self::new(Mask::Ksa(*layout))
    }

    /// The full causal schedule over `len` positions.
    pub fn causal(len: usize) -> Result<Self> {
        Self::new(Mask::Causal { len })
    }

    /// The mask this schedule serves.
    pub fn mask(&self) -> &Mask {
        &self.mask
    }
    /// Query rows per tile.
    pub fn block_q(&self) -> usize {
        self.block_q
    }
    /// The step this schedule runs (all zero for the whole mask).
    pub fn offset(&self) -> QueryOffset {
        self.offset
    }
    /// The mask slot of the first query row ([`TextSchedule::first_slot`]).
    pub fn first_slot(&self) -> usize {
        self.first_slot
    }
    /// The query (and output) buffer rows written, the mask's slots from
    /// [`QueryMajorSchedule::first_slot`] on ([`TextSchedule::step_rows`]).
    pub fn step_rows(&self) -> Range<usize> {
        self.step_rows.clone()
    }
    /// Query tiles, heaviest first.
    pub fn query_tiles(&self) -> &[QueryTile] {
        &self.query_tiles
    }
    /// All visits; each query tile owns a range of them.
    pub fn visits(&self) -> &[KeyVisit] {
        &self.visits
    }
    /// The visits of one query tile, in ascending key order.
    pub fn visits_of(&self, tile: &QueryTile) -> &[KeyVisit] {
        &self.visits[tile.visits.clone()]
    }
    /// Number of (query tile, key tile) visits.
    pub fn tiles_visited(&self) -> usize {
        self.visits.len()
    }
    /// Number of visits that run the element mask.
    pub fn edge_tiles(&self) -> usize {
        self.visits.iter().filter(|v| v.edge).count()
    }
    /// Query-key pairs the visited tiles compute (`block_q x BLOCK_K` each).
    pub fn computed_pairs(&self) -> u64 {
        self.visits.len() as u64 * (self.block_q * BLOCK_K) as u64
    }

    /// The two tables the GPU kernel reads: `tiles` (4 `u32` per query tile:
    /// `q_begin, q_end, visit_begin, visit_end`) and `entries` (2 `u32` per
    /// visit: `k_begin, k_end | edge << 31`).
    pub fn gpu_tables(&self) -> (Vec<u32>, Vec<u32>) {
        let mut tiles = Vec::with_capacity(4 * self.query_tiles.len());
        for t in &self.query_tiles {
            tiles.extend([
                t.rows.start as u32,
                t.rows.end as u32,
                t.visits.start as u32,
                t.visits.end as u32,
            ]);
        }
        let mut entries = Vec::with_capacity(2 * self.visits.len());
        for v in &self.visits {
            entries.extend([
                v.keys.start as u32,
                v.keys.end as u32 | (u32::from(v.edge) << 31),
            ]);
        }
        (tiles, entries)
    }
}

/// One query tile that sees a key tile (an entry of the [`KeyMajorSchedule`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryVisit {
    /// Gathered query rows of the tile (a query tile of the forward schedule).
    pub rows: Range<usize>,
    /// Whether some (valid query, key) pair of the tile is masked, so the
    /// element mask must run. `false`: every pair is allowed.
    pub edge: bool,
}

/// One key tile of the fixed grid and the query tiles that see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMajorTile {
    /// Gathered key rows (at most [`BLOCK_K`]; the summary and text regions
    /// start new tiles).
    pub keys: Range<usize>,
    /// Its visits, as a range of [`KeyMajorSchedule::visits`].
    pub visits: Range<usize>,
}

/// The forward [`QueryMajorSchedule`] inverted for the backward kernel: per key tile of a
/// fixed [`BLOCK_K`]-row grid, the forward's query tiles that visit any of its
/// keys (ascending). A (query tile, key tile) pair is listed exactly when the
/// forward visits some key of the tile, so no statement of the mask beyond the
/// forward's is made here; the edge flags are recomputed per pair from
/// [`crate::mask::Gathered::keys`] because the forward's text tiles start wherever a
/// query tile's key run starts, not on the grid. Key tiles are heaviest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMajorSchedule {
    mask: Mask,
    block_q: usize,
    key_tiles: Vec<KeyMajorTile>,
    visits: Vec<QueryVisit>,
}

impl KeyMajorSchedule {
    /// Inverts `forward` (any query tile size).
    pub fn from_forward(forward: &QueryMajorSchedule) -> Self {
        let mask = *forward.mask();
        let gathered = mask.gathered();
        let grid = region_tiles(&mask, BLOCK_K);
        let queries = forward.query_tiles();
        // Query tiles per key tile; a query tile's visits ascend, so a repeat
        // of the same key tile is always the last one pushed.
        let mut seen_by: Vec<Vec<usize>> = vec![Vec::new(); grid.len()];
        for (qi, t) in queries.iter().enumerate() {
            for v in forward.visits_of(t) {
                let (first, last) = (
                    key_tile_of(&mask, v.keys.start),
                    key_tile_of(&mask, v.keys.end - 1),
                );
                for qs in &mut seen_by[first..=last] {
                    if qs.last() != Some(&qi) {
                        qs.push(qi);
                    }
                }
            }
        }
        let mut tiles: Vec<(Range<usize>, Vec<QueryVisit>)> = Vec::with_capacity(grid.len());
        let mut row_ranges = Vec::with_capacity(forward.block_q());
        for (keys, qs) in grid.into_iter().zip(seen_by) {
            let mut visits: Vec<QueryVisit> = qs
                .into_iter()
                .map(|qi| {
                    let rows = queries[qi].rows.clone();
                    row_ranges.clear();
                    row_ranges.extend(rows.clone().map(|g| gathered.keys(g)));
                    QueryVisit {
                        edge: !full_tile(&row_ranges, &keys),
                        rows,
                    }
                })
                .collect();
            visits.sort_unstable_by_key(|v| v.rows.start);
            tiles.push((keys, visits));
        }
        tiles.sort_by_key(|(_, v)| std::cmp::Reverse(v.len()));
        let mut key_tiles = Vec::with_capacity(tiles.len());
        let mut visits = Vec::new();
        for (keys, v) in tiles {
            let start = visits.len();
            visits.extend(v);
            key_tiles.push(KeyMajorTile {
                keys,
                visits: start..visits.len(),
            });
        }
        Self {
            mask,
            block_q: forward.block_q(),
            key_tiles,
            visits,
        }
    }

    /// The mask this schedule serves.
    pub fn mask(&self) -> &Mask {
        &self.mask
    }
    /// Query rows per query tile (the forward schedule's).
    pub fn block_q(&self) -> usize {
        self.block_q
    }
    /// Key tiles, heaviest first (every key row is in exactly one).
    pub fn key_tiles(&self) -> &[KeyMajorTile] {
        &self.key_tiles
    }
    /// All visits; each key tile owns a range of them.
    pub fn visits(&self) -> &[QueryVisit] {
        &self.visits
    }
    /// The visits of one key tile, in ascending query order.
    pub fn visits_of(&self, tile: &KeyMajorTile) -> &[QueryVisit] {
        &self.visits[tile.visits.clone()]
    }
    /// Number of (key tile, query tile) visits.
    pub fn tiles_visited(&self) -> usize {
        self.visits.len()
    }
    /// Number of visits that run the element mask.
    pub fn edge_tiles(&self) -> usize {
        self.visits.iter().filter(|v| v.edge).count()
    }

    /// The two tables the backward kernel reads: `tiles` (4 `u32` per key
    /// tile: `k_begin, k_end, visit_begin, visit_end`) and `entries` (2 `u32`
    /// per visit: `q_begin, q_end | edge << 31`).
    pub fn gpu_tables(&self) -> (Vec<u32>, Vec<u32>) {
        let mut tiles = Vec::with_capacity(4 * self.key_tiles.len());
        for t in &self.key_tiles {
            tiles.extend([
                t.keys.start as u32,
                t.keys.end as u32,
                t.visits.start as u32,
                t.visits.end as u32,
            ]);
        }
        let mut entries = Vec::with_capacity(2 * self.visits.len());
        for v in &self.visits {
            entries.extend([
                v.rows.start as u32,
                v.rows.end as u32 | (u32::from(v.edge) << 31),
            ]);
        }
        (tiles, entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::SlotKind;
    use crate::KsaConfig;

    fn layouts() -> Vec<KsaLayout> {
        let mut out = Vec::new();
        for (c, s, w, n) in [
            (2, 1, 1, 7),
            (4, 1, 0, 300),
            (4, 2, 3, 301),
            (8, 1, 16, 700),
            (16, 4, 1, 333),
            (64, 2, 1000, 200),
            (8, 1, 3, 5),
            (3, 2, 2, 500),
        ] {
            out.push(KsaLayout::new(KsaConfig::new(c, s, w).unwrap(), n).unwrap());
        }
        out
    }

    /// The kernels' closed form of the gathered row order and the KSA mask
    /// (`Geo::slot` and `Geo::ranges` in `kernels/ksa_common.cuh`), the one statement
    /// of the mask outside `KsaLayout::key_ranges`: `(slot, [summaries, text])`.
    fn kernel_closed_form(l: &KsaLayout, g: usize) -> (usize, [Range<usize>; 2]) {
        let (c, s, w, ns) = (
            l.config().chunk_size(),
            l.config().summaries(),
            l.config().window(),
            l.summary_len(),
        );
        if g < ns {
            let chunk = g / s;
            let slot = g + (g / s + 1) * c;
            (slot, [chunk * s..g + 1, ns + chunk * c..ns + chunk * c + c])
        } else {
            let t = g - ns;
            let w0 = (t / c).saturating_sub(w);
            (t + (t / c) * s, [0..w0 * s, ns + w0 * c..g + 1])
        }
    }

    #[test]
    fn the_kernels_closed_form_is_key_ranges_in_gathered_coordinates() {
        for l in layouts() {
            let gathered = Mask::Ksa(l).gathered();
            let ns = l.summary_len();
            let mut seen = vec![false; l.len()];
            for g in 0..l.len() {
                let (slot, keys) = kernel_closed_form(&l, g);
                assert_eq!(gathered.slot(g), Some(slot));
                assert!(!seen[slot], "slot {slot} twice");
                seen[slot] = true;
                match l.slot_kind(slot).unwrap() {
                    SlotKind::Summary { chunk, index } => {
                        assert_eq!(chunk * l.config().summaries() + index, g)
                    }
                    SlotKind::Text { token } => assert_eq!(token + ns, g),
                }
                let kr = l.key_ranges(slot).unwrap();
                assert_eq!(keys[0], kr.summaries);
                assert_eq!(keys[1], kr.text.start + ns..kr.text.end + ns);
                assert_eq!(gathered.keys(g), keys);
            }
        }
    }

    /// Every query of the schedule (a step's: those whose slot is the step's)
    /// visits each of its allowed keys exactly once, edge flags are exact,
    /// and no visit holds text before the step's `first_key`.
    fn check(s: &QueryMajorSchedule) {
        let mask = s.mask();
        let n = mask.len();
        let held = mask.summary_len() + s.offset().first_key;
        let mut covered = vec![0u8; 0];
        let mut rows_seen = vec![false; n];
        for t in s.query_tiles() {
            assert!(t.rows.len() <= s.block_q() && !t.rows.is_empty());
            let mut last_end = 0;
            for v in s.visits_of(t) {
                assert!(v.keys.len() <= BLOCK_K && !v.keys.is_empty());
                assert!(v.keys.start >= last_end, "visits ascending, disjoint");
                assert!(
                    v.keys.end <= mask.summary_len() || v.keys.start >= held,
                    "text key {:?} before the held {held}",
                    v.keys
                );
                last_end = v.keys.end;
                let mut any = false;
                let mut all = v.keys.len() == BLOCK_K;
                for q in t.rows.clone() {
                    for k in v.keys.clone() {
                        let ok = mask.gathered().allowed(q, k);
                        any |= ok;
                        all &= ok;
                    }
                }
                assert!(any, "a visit with no allowed pair");
                assert_eq!(v.edge, !all);
            }
            for q in t.rows.clone() {
                assert!(!rows_seen[q]);
                rows_seen[q] = true;
                covered.clear();
                covered.resize(n, 0);
                for v in s.visits_of(t) {
                    for k in v.keys.clone() {
                        covered[k] += 1;
                    }
                }
                for r in mask.gathered().keys(q) {
                    for k in r {
                        assert_eq!(covered[k], 1, "query {q} key {k}");
                    }
                }
            }
        }
        // Exactly the step's queries: the slots from `first_slot` on.
        for (g, seen) in rows_seen.iter().enumerate() {
            let slot = mask.gathered().slot(g).unwrap();
            assert_eq!(*seen, slot >= s.first_slot(), "row {g} (slot {slot})");
        }
        assert_eq!(s.step_rows().len(), n - s.first_slot());
        let (tiles, entries) = s.gpu_tables();
        assert_eq!(tiles.len(), 4 * s.query_tiles().len());
        assert_eq!(entries.len(), 2 * s.tiles_visited());
    }

    #[test]
    fn every_allowed_pair_is_visited_once_and_edges_are_exact() {
        for l in layouts() {
            for bq in [16, 32, 64] {
                check(&QueryMajorSchedule::with_block_q(Mask::Ksa(l), bq).unwrap());
                check(
                    &QueryMajorSchedule::with_block_q(Mask::Causal { len: l.len() }, bq).unwrap(),
                );
            }
        }
        assert!(QueryMajorSchedule::with_block_q(Mask::Causal { len: 5 }, 48).is_err());
        check(&QueryMajorSchedule::causal(0).unwrap());
    }

    #[test]
    fn a_step_visits_its_queries_keys_within_the_held_text() {
        for l in layouts() {
            let n = l.text_len();
            for mask in [Mask::Ksa(l), Mask::Causal { len: n }] {
                for old in [0, 1, n / 3, n.saturating_sub(1), n] {
                    // The least text a step may hold, and more of it.
                    let need = if old < n {
                        TextSchedule::new(mask, TileSizes::default())
                            .unwrap()
                            .row_keys(old)
                            .text
                            .start
                    } else {
                        0
                    };
                    for first_key in [need, need / 2] {
                        let offset = QueryOffset {
                            old,
                            first_key,
                            first_row: 7,
                        };
                        for bq in [16, 64] {
                            let s = QueryMajorSchedule::step(mask, bq, offset).unwrap();
                            assert_eq!(s.step_rows().start, 7);
                            check(&s);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn tiles_are_heaviest_first() {
        let l = KsaLayout::new(KsaConfig::new(8, 1, 2).unwrap(), 2000).unwrap();
        let s = QueryMajorSchedule::ksa(&l).unwrap();
        let lens: Vec<usize> = s.query_tiles().iter().map(|t| t.visits.len()).collect();
        assert!(lens.windows(2).all(|w| w[0] >= w[1]));
    }

    #[test]
    fn ksa_visits_track_allowed_pairs_at_long_context() {
        // C = 8, S = 1, W = 128 at 32K text: tiles visited vs full causal is
        // within 10% of the allowed-pair ratio.
        let l = KsaLayout::new(KsaConfig::new(8, 1, 128).unwrap(), 32 * 1024).unwrap();
        let ksa = QueryMajorSchedule::ksa(&l).unwrap();
        let full = QueryMajorSchedule::causal(l.text_len()).unwrap();
        let tile_ratio = full.tiles_visited() as f64 / ksa.tiles_visited() as f64;
        let pair_ratio = l.causal_text_pairs() as f64 / l.pair_counts().total() as f64;
        assert!(
            (tile_ratio / pair_ratio - 1.0).abs() < 0.10,
            "tiles {tile_ratio:.3} vs pairs {pair_ratio:.3}"
        );
    }

    #[test]
    fn key_major_visits_exactly_the_forward_pairs() {
        use std::collections::BTreeSet;
        for l in layouts() {
            for mask in [Mask::Ksa(l), Mask::Causal { len: l.len() }] {
                for bq in [32, 64] {
                    let fwd = QueryMajorSchedule::with_block_q(mask, bq).unwrap();
                    let km = KeyMajorSchedule::from_forward(&fwd);
                    let grid = region_tiles(&mask, BLOCK_K);
                    let tile_of = |k: usize| grid.iter().position(|t| t.contains(&k)).unwrap();
                    // (query rows start, key tile start) of the forward: every key visited.
                    let mut want = BTreeSet::new();
                    for t in fwd.query_tiles() {
                        for v in fwd.visits_of(t) {
                            for k in v.keys.clone() {
                                want.insert((t.rows.start, grid[tile_of(k)].start));
                            }
                        }
                    }
                    let mut got = BTreeSet::new();
                    let mut keys_seen = vec![false; mask.len()];
                    let mut pairs = 0usize;
                    for kt in km.key_tiles() {
                        assert!(grid.contains(&kt.keys));
                        for k in kt.keys.clone() {
                            assert!(!keys_seen[k]);
                            keys_seen[k] = true;
                        }
                        let mut last = 0;
                        for v in km.visits_of(kt) {
                            assert!(v.rows.start >= last, "ascending, disjoint");
                            last = v.rows.end;
                            assert!(got.insert((v.rows.start, kt.keys.start)), "listed twice");
                            let mut all = kt.keys.len() == BLOCK_K;
                            for q in v.rows.clone() {
                                for k in kt.keys.clone() {
                                    let ok = mask.gathered().allowed(q, k);
                                    all &= ok;
                                    pairs += usize::from(ok);
                                }
                            }
                            assert_eq!(v.edge, !all, "edge flag exact");
                        }
                    }
                    assert!(keys_seen.iter().all(|&x| x), "the grid covers every key");
                    assert_eq!(got, want);
                    // Hence every allowed pair exactly once (the forward's property).
                    let allowed: usize = (0..mask.len())
                        .map(|q| {
                            mask.gathered()
                                .keys(q)
                                .iter()
                                .map(|r| r.len())
                                .sum::<usize>()
                        })
                        .sum();
                    assert_eq!(pairs, allowed);
                    let (tiles, entries) = km.gpu_tables();
                    assert_eq!(tiles.len(), 4 * km.key_tiles().len());
                    assert_eq!(entries.len(), 2 * km.tiles_visited());
                }
            }
        }
    }
}
