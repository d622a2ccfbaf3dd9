//! The tile schedule of block-sparse KSA attention: which key tiles each query
//! tile visits, which of them need an element mask, and every row's exact key
//! bounds. Plain Rust over [`KsaLayout`] and tile sizes, independent of any
//! device, so the CPU path and the CUDA kernel share one statement of the KSA
//! key ranges.
//!
//! Coordinates are the *gathered* ones of [`KsaLayout::key_ranges`]: keys live in
//! two spaces, the chunk-major summary list and the text in text order. Every
//! text query's keys are one prefix of the summary list plus one causal run of
//! text, so for a tile of consecutive text queries the union of their keys is
//! one run per space, the intersection is a run as well, and keys in the
//! intersection need no mask ("full" tiles) while the rest are "edge" tiles
//! clipped per row to [`Schedule::row_keys`].
//!
//! Summary queries (a chunk's `S` summaries see that chunk's `C` text tokens
//! and its summaries causally, `C + j + 1` keys) are cheap and scheduled per
//! chunk by [`Schedule::summary_query_keys`].
//!
//! The same schedule also describes plain causal attention over `len`
//! positions ([`Schedule::causal`]): one text space, no summaries.
//!
//! A schedule may also run only the queries a cache step adds
//! ([`Schedule::step`] with a [`QueryOffset`]): text tokens `old..n` and the
//! summaries of the chunks they complete, against K/V gathered from text
//! token `first_key` on. Key indices stay absolute (so the rules stay those
//! of [`KsaLayout::key_ranges`]); only where query rows and gathered key rows
//! sit in the buffers moves.

use crate::layout::KsaLayout;
use crate::mask::{KeyRanges, KeySpace, Mask};
use crate::{Error, Result};
use std::ops::Range;

/// The largest query or key tile, in rows: keeps tile arithmetic far from
/// overflow and a worker's score tile (`group * query * key` f32) bounded.
pub const MAX_TILE: usize = 4096;

/// Query and key tile sizes, in rows (each `1..=MAX_TILE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TileSizes {
    /// Consecutive text queries per query tile.
    pub query: usize,
    /// Keys per key tile.
    pub key: usize,
}

impl Default for TileSizes {
    /// The CPU path's tuned sizes.
    fn default() -> Self {
        Self {
            query: 64,
            key: 128,
        }
    }
}

/// One key tile a query tile visits: keys `start..end` of `space`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyTile {
    /// The key list the range indexes.
    pub space: KeySpace,
    /// First key of the tile.
    pub start: usize,
    /// One past the last key of the tile.
    pub end: usize,
    /// Every row of the query tile may attend to every key of this tile: no
    /// element mask needed. Otherwise clip each row to [`Schedule::row_keys`].
    pub full: bool,
}

impl KeyTile {
    /// Number of keys in the tile.
    pub fn len(&self) -> usize {
        self.end - self.start
    }
    /// Whether the tile has no keys (never produced by the schedule).
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// Counts of (query tile, key tile) visits over a whole schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TileCounts {
    /// Tiles computed without a mask.
    pub full: u64,
    /// Tiles that need an element mask.
    pub edge: u64,
}

impl TileCounts {
    /// All visited tiles.
    pub fn total(&self) -> u64 {
        self.full + self.edge
    }
}

/// Which queries a schedule runs and where its rows sit, for a step of a
/// cache that already holds `old` text tokens. The default (all zero) is the
/// whole mask in slot order: the full forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct QueryOffset {
    /// Text tokens before the step: the queries are text tokens `old..n` and
    /// the summaries of chunks `floor(old/C)..floor(n/C)`.
    pub old: usize,
    /// First text token whose K/V the gathered buffers hold: text key `t` is
    /// gathered row `summary_len + t - first_key` (every summary is held).
    pub first_key: usize,
    /// Query (and output) row of the step's first new slot; the step's
    /// slots follow in slot order.
    pub first_row: usize,
}

/// The tile schedule of KSA attention over a [`KsaLayout`], or of plain causal
/// attention, for given [`TileSizes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Schedule {
    mask: Mask,
    tiles: TileSizes,
    offset: QueryOffset,
    /// Mask slot of the step's first new slot (that of text token `old`).
    slot_base: usize,
}

impl Schedule {
    /// KSA attention over `layout`. Fails if a tile size is 0.
    pub fn ksa(layout: &KsaLayout, tiles: TileSizes) -> Result<Self> {
        Self::new(Mask::Ksa(*layout), tiles)
    }

    /// Plain causal attention over `len` positions (query `i` sees keys
    /// `0..=i`). Fails if a tile size is 0.
    pub fn causal(len: usize, tiles: TileSizes) -> Result<Self> {
        Self::new(Mask::Causal { len }, tiles)
    }

    /// The schedule of `mask`. Fails if a tile size is 0 or above
    /// [`MAX_TILE`].
    pub fn new(mask: Mask, tiles: TileSizes) -> Result<Self> {
        if tiles.query == 0 || tiles.key == 0 {
            return Err(Error::InvalidConfig(format!(
                "tile sizes must be at least 1, got {tiles:?}"
            )));
        }
        for (what, got) in [("query tile", tiles.query), ("key tile", tiles.key)] {
            if got > MAX_TILE {
                return Err(Error::TooLarge {
                    what,
                    got,
                    limit: MAX_TILE,
                });
            }
        }
        Ok(Self {
            mask,
            tiles,
            offset: QueryOffset::default(),
            slot_base: 0,
        })
    }

    /// The schedule of one cache step over `mask` (the mask of the whole
    /// text after the step): only the queries `offset` names, against K/V
    /// gathered from text token `offset.first_key` on. Fails if a tile size
    /// is 0, `old` is past the text, or some query needs a text key before
    /// `first_key`.
    pub fn step(mask: Mask, tiles: TileSizes, offset: QueryOffset) -> Result<Self> {
        let mut schedule = Self::new(mask, tiles)?;
        let n = mask.text_len();
        if offset.old > n {
            return Err(Error::InvalidConfig(format!(
                "a step from {} text tokens of a mask of {n}",
                offset.old
            )));
        }
        schedule.offset = offset;
        if offset.old < n {
            // Text key starts never decrease with the query, so the first
            // query's start bounds every text query's and every new summary's.
            let need = schedule.row_keys(offset.old).text.start;
            if offset.first_key > need {
                return Err(Error::InvalidConfig(format!(
                    "a step holding text from token {} needs it from {need}",
                    offset.first_key
                )));
            }
            schedule.slot_base = schedule.mask_slot(offset.old);
        } else {
            schedule.slot_base = mask.len();
        }
        Ok(schedule)
    }

    /// The tile sizes.
    pub fn tile_sizes(&self) -> TileSizes {
        self.tiles
    }

    /// The mask this schedule serves.
    pub fn mask(&self) -> &Mask {
        &self.mask
    }

    /// The KSA layout, or `None` for a causal schedule.
    pub fn layout(&self) -> Option<&KsaLayout> {
        self.mask.layout()
    }

    /// The step this schedule runs (all zero for the whole mask).
    pub fn offset(&self) -> QueryOffset {
        self.offset
    }

    /// The mask slot of the step's first query row (that of text token
    /// `old`; `N` for an empty step, 0 for the whole mask): the step's rows
    /// are the mask's slots from here on.
    pub fn first_slot(&self) -> usize {
        self.slot_base
    }

    /// The query (and output) rows the schedule writes: `0..N` for the
    /// whole mask, one per new slot after `first_row` for a step.
    pub fn step_rows(&self) -> Range<usize> {
        self.offset.first_row..self.offset.first_row + self.mask.len() - self.slot_base
    }

    /// Number of text queries (KSA: `n`; causal: `len`; a step: `n - old`),
    /// tiled in order.
    pub fn text_queries(&self) -> usize {
        self.mask.text_len() - self.offset.old
    }

    /// Number of text query tiles.
    pub fn query_tiles(&self) -> usize {
        self.text_queries().div_ceil(self.tiles.query)
    }

    /// The text queries of query tile `tile` (text indices, from `old`).
    pub fn query_tile(&self, tile: usize) -> Range<usize> {
        let (old, n) = (self.offset.old, self.mask.text_len());
        let start = (old + tile * self.tiles.query).min(n);
        start..(start + self.tiles.query).min(n)
    }

    /// The mask slot of text token `token`: KSA interleaves summaries,
    /// causal does not.
    fn mask_slot(&self, token: usize) -> usize {
        match self.mask {
            Mask::Ksa(layout) => layout
                .text_slot(token)
                .expect("token is a text index below n"),
            Mask::Causal { .. } => token,
        }
    }

    /// The query (and output) row of text query `token`, a text index in
    /// `old..n` (else it panics): its slot for the whole mask, its place
    /// among the step's slots after [`QueryOffset::first_row`] for a step.
    pub fn text_slot(&self, token: usize) -> usize {
        self.offset.first_row + self.mask_slot(token) - self.slot_base
    }

    /// The row of key `key` of `space` in the mask's [`Gathered`] order,
    /// less the text before [`QueryOffset::first_key`] for a step.
    ///
    /// [`Gathered`]: crate::mask::Gathered
    pub fn gathered_row(&self, space: KeySpace, key: usize) -> usize {
        let row = self.mask.gathered().row(space, key);
        match space {
            KeySpace::Summary => row,
            KeySpace::Text => row - self.offset.first_key,
        }
    }

    /// The gathered rows of key tile `tile` (its keys are adjacent there).
    pub(crate) fn gathered_rows(&self, tile: &KeyTile) -> Range<usize> {
        let start = self.gathered_row(tile.space, tile.start);
        start..start + tile.len()
    }

    /// The exact keys of text query `query` (a text index below
    /// [`Schedule::text_queries`]), in gathered coordinates.
    pub fn row_keys(&self, query: usize) -> KeyRanges {
        match self.mask {
            // The mask rules live in `KsaLayout::key_ranges` alone, so the fast
            // paths and the backward follow every variant of them.
            Mask::Ksa(layout) => layout
                .text_slot(query)
                .and_then(|slot| layout.key_ranges(slot))
                .expect("query is a text index below n"),
            Mask::Causal { .. } => KeyRanges {
                summaries: 0..0,
                text: 0..query + 1,
            },
        }
    }

    /// Appends the key tiles query tile `tile` visits to `out` (cleared
    /// first): summary tiles, then text tiles, each in ascending key order,
    /// at most [`TileSizes::key`] keys each. Every key some row of the tile
    /// may see is in exactly one tile; no tile holds a key no row sees.
    pub fn key_tiles(&self, tile: usize, out: &mut Vec<KeyTile>) {
        out.clear();
        let rows = self.query_tile(tile);
        if rows.is_empty() {
            return;
        }
        let (first, last) = (self.row_keys(rows.start), self.row_keys(rows.end - 1));
        // Ranges move monotonically with the row: summary prefixes and text
        // run starts never shrink, text run ends grow by one per row. So the
        // union is first.start..last.end and the intersection last.start..first.end.
        // Tiles start at the union's first key; a tile is full when it lies
        // inside the intersection. Splitting at the intersection's borders
        // instead would add up to three short tiles per query tile, which
        // cost more in GEMM efficiency than masking a few keys saves.
        for (space, a, b) in [
            (KeySpace::Summary, first.summaries, last.summaries),
            (KeySpace::Text, first.text, last.text),
        ] {
            let (union, inter) = (a.start..b.end, b.start..a.end);
            let mut start = union.start;
            while start < union.end {
                let end = (start + self.tiles.key).min(union.end);
                out.push(KeyTile {
                    space,
                    start,
                    end,
                    full: inter.start <= start && end <= inter.end,
                });
                start = end;
            }
        }
    }

    /// The complete chunks whose summaries are queries: all of them for the
    /// whole mask, those the step completes for a step (none for causal).
    pub fn summary_query_chunks(&self) -> Range<usize> {
        self.layout().map_or(0..0, |layout| {
            let first = self.offset.old / layout.config().chunk_size();
            first.min(layout.full_chunks())..layout.full_chunks()
        })
    }

    /// The query (and output) row of summary `j` of chunk `chunk`, one of
    /// [`Schedule::summary_query_chunks`]; `None` if there is no such summary.
    pub fn summary_query_row(&self, chunk: usize, j: usize) -> Option<usize> {
        let slot = self.layout()?.summary_slot(chunk, j)?;
        (slot >= self.slot_base).then(|| self.offset.first_row + slot - self.slot_base)
    }

    /// The keys of summary `j` of chunk `chunk` (gathered coordinates): the
    /// chunk's `C` text tokens and its summaries `0..=j`. `None` for a causal
    /// schedule or a summary that does not exist.
    pub fn summary_query_keys(&self, chunk: usize, j: usize) -> Option<KeyRanges> {
        let layout = self.layout()?;
        let slot = layout.summary_slot(chunk, j)?;
        layout.key_ranges(slot)
    }

    /// Key tiles visited by all text query tiles (summary queries excluded:
    /// they are `C + S` keys per chunk, far below one tile).
    pub fn visited_tiles(&self) -> TileCounts {
        let mut counts = TileCounts::default();
        let mut tiles = Vec::new();
        for t in 0..self.query_tiles() {
            self.key_tiles(t, &mut tiles);
            for tile in &tiles {
                if tile.full {
                    counts.full += 1;
                } else {
                    counts.edge += 1;
                }
            }
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KsaConfig;

    /// Every key of every row lies in exactly one visited tile, and full
    /// tiles hold only keys every row of the tile may see.
    fn check(schedule: &Schedule) {
        let mut tiles = Vec::new();
        for t in 0..schedule.query_tiles() {
            schedule.key_tiles(t, &mut tiles);
            for row in schedule.query_tile(t) {
                let keys = schedule.row_keys(row);
                for (space, range) in [
                    (KeySpace::Summary, keys.summaries.clone()),
                    (KeySpace::Text, keys.text.clone()),
                ] {
                    for key in range.clone() {
                        let hits = tiles
                            .iter()
                            .filter(|k| k.space == space && (k.start..k.end).contains(&key))
                            .count();
                        assert_eq!(hits, 1, "row {row} key {key} {space:?}");
                    }
                    for tile in tiles.iter().filter(|k| k.space == space && k.full) {
                        assert!(range.start <= tile.start && tile.end <= range.end);
                    }
                }
            }
            for tile in &tiles {
                assert!(!tile.is_empty() && tile.len() <= schedule.tile_sizes().key);
            }
        }
    }

    #[test]
    fn tiles_cover_exactly_the_allowed_keys() {
        for (c, s, w) in [
            (1, 1, 0),
            (2, 1, 1),
            (3, 2, 2),
            (8, 1, 128),
            (4, 3, 0),
            (5, 1, 100),
        ] {
            for (n, reads) in [0, 1, 7, 40, 97]
                .into_iter()
                .flat_map(|n| [(n, true), (n, false)])
            {
                let config = KsaConfig::new(c, s, w).unwrap().with_summary_reads(reads);
                let layout = KsaLayout::new(config, n).unwrap();
                for (q, k) in [(1, 1), (4, 3), (16, 8), (64, 128)] {
                    let tiles = TileSizes { query: q, key: k };
                    let schedule = Schedule::ksa(&layout, tiles).unwrap();
                    for row in 0..n {
                        let slot = layout.text_slot(row).unwrap();
                        assert_eq!(schedule.row_keys(row), layout.key_ranges(slot).unwrap());
                        assert_eq!(schedule.text_slot(row), slot);
                    }
                    check(&schedule);
                    check(&Schedule::causal(n, tiles).unwrap());
                }
            }
        }
    }

    #[test]
    fn a_window_beyond_every_chunk_is_the_causal_schedule() {
        let tiles = TileSizes::default();
        let layout = KsaLayout::new(KsaConfig::new(8, 1, 1 << 20).unwrap(), 5000).unwrap();
        let ksa = Schedule::ksa(&layout, tiles).unwrap();
        let causal = Schedule::causal(5000, tiles).unwrap();
        assert_eq!(ksa.visited_tiles(), causal.visited_tiles());
        // Causal: query tile i sees i full tiles' worth of keys and a diagonal edge.
        assert_eq!(causal.visited_tiles().edge, causal.query_tiles() as u64);
        // KSA with a window prunes tiles.
        let narrow = Schedule::ksa(&layout.with_window(4), tiles).unwrap();
        assert!(narrow.visited_tiles().total() < causal.visited_tiles().total() / 4);
    }

    #[test]
    fn a_step_runs_the_new_queries_at_their_rows_against_held_keys() {
        let config = KsaConfig::new(4, 2, 3).unwrap();
        let tiles = TileSizes { query: 8, key: 16 };
        for n in [1, 9, 40, 97] {
            let layout = KsaLayout::new(config, n).unwrap();
            for old in [0, 1, 3, 4, 8, 37, n] {
                if old > n {
                    continue;
                }
                let base = KsaLayout::new(config, old).unwrap().len();
                let held = if old < n {
                    layout
                        .key_ranges(layout.text_slot(old).unwrap())
                        .unwrap()
                        .text
                        .start
                } else {
                    0
                };
                let offset = QueryOffset {
                    old,
                    first_key: held,
                    first_row: 5,
                };
                let step = Schedule::step(Mask::Ksa(layout), tiles, offset).unwrap();
                check(&step);
                // The text queries are old..n, each at its slot's place among
                // the new slots; the summary queries those of chunks old/C..
                let queries: Vec<usize> = (0..step.query_tiles())
                    .flat_map(|t| step.query_tile(t))
                    .collect();
                assert_eq!(queries, (old..n).collect::<Vec<_>>());
                for t in old..n {
                    assert_eq!(step.text_slot(t), 5 + layout.text_slot(t).unwrap() - base);
                    let whole = Schedule::ksa(&layout, tiles).unwrap();
                    assert_eq!(step.row_keys(t), whole.row_keys(t));
                }
                assert_eq!(step.step_rows(), 5..5 + layout.len() - base);
                assert_eq!(step.summary_query_chunks(), old / 4..n / 4);
                for c in step.summary_query_chunks() {
                    let slot = layout.summary_slot(c, 1).unwrap();
                    assert_eq!(step.summary_query_row(c, 1), Some(5 + slot - base));
                }
                // Held text starts at `first_key`; every summary is held.
                let ns = layout.summary_len();
                assert_eq!(step.gathered_row(KeySpace::Text, held + 2), ns + 2);
                assert_eq!(step.gathered_row(KeySpace::Summary, 3), 3);
                if old < n {
                    let late = QueryOffset {
                        first_key: held + 1,
                        ..offset
                    };
                    assert!(Schedule::step(Mask::Ksa(layout), tiles, late).is_err());
                }
            }
            let past = QueryOffset {
                old: n + 1,
                ..QueryOffset::default()
            };
            assert!(Schedule::step(Mask::Ksa(layout), tiles, past).is_err());
        }
    }

    #[test]
    fn zero_tile_size_is_an_error() {
        let tiles = TileSizes { query: 0, key: 4 };
        assert!(Schedule::causal(4, tiles).is_err());
    }
}
