//! Property tests of layout, positions and mask against the spec's rules
//! written a second time, independently, as per-slot predicates.

use candle_core::Device;
use ksa::{KsaConfig, KsaLayout, SlotKind, SummaryPositions, TextPositions};
use proptest::prelude::*;

/// One slot as the test sees it, built by walking the text chunk by chunk.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    Text { t: usize, chunk: usize },
    Summary { chunk: usize, j: usize },
}

/// The expanded sequence, written directly from docs/spec.md section 1.
fn slots(c: usize, s: usize, n: usize) -> Vec<Slot> {
    let mut out = Vec::new();
    for t in 0..n {
        out.push(Slot::Text { t, chunk: t / c });
        if (t + 1) % c == 0 {
            out.extend((0..s).map(|j| Slot::Summary { chunk: t / c, j }));
        }
    }
    out
}

/// Spec section 2, rule by rule.
fn allowed(q: Slot, k: Slot, w: usize) -> bool {
    match q {
        Slot::Text { t, chunk: c } => {
            let w0 = c.saturating_sub(w);
            match k {
                Slot::Summary { chunk: kc, .. } => kc < w0,
                Slot::Text { t: kt, chunk: kc } => (kc >= w0 && kc < c) || (kc == c && kt <= t),
            }
        }
        Slot::Summary { chunk: c, j } => match k {
            Slot::Text { chunk: kc, .. } => kc == c,
            Slot::Summary { chunk: kc, j: kj } => kc == c && kj <= j,
        },
    }
}

/// Spec section 3.
fn position(slot: Slot, c: usize, s: usize, text: TextPositions, summary: SummaryPositions) -> i64 {
    match slot {
        Slot::Text { t, .. } => match text {
            TextPositions::Origin => t as i64,
            TextPositions::InnerChunk => (t % c) as i64,
        },
        Slot::Summary { chunk, j } => {
            let (start, l) = ((chunk * c) as i64, c as i64);
            let (j, s) = (j as i64, s as i64);
            match summary {
                SummaryPositions::LastChunkSliceRight => (start + ((j + 1) * l) / s - 1).max(start),
                SummaryPositions::LastChunkSliceLeft => (start + (j * l) / s - 1).max(start),
                SummaryPositions::Zeros => 0,
            }
        }
    }
}

fn config() -> impl Strategy<Value = (usize, usize, usize, usize)> {
    // W in 0..=8 plus windows beyond every chunk; n includes n < C and tails.
    (
        1usize..=16,
        1usize..=4,
        prop_oneof![0usize..=8, Just(1_000)],
        0usize..=90,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn layout_matches_spec((c, s, w, n) in config()) {
        let l = KsaLayout::new(KsaConfig::new(c, s, w).unwrap(), n).unwrap();
        let want = slots(c, s, n);
        prop_assert_eq!(l.len(), n + s * (n / c));
        prop_assert_eq!(l.len(), want.len());
        for (i, slot) in want.iter().enumerate() {
            let got = l.slot_kind(i).unwrap();
            match *slot {
                Slot::Text { t, chunk } => {
                    prop_assert_eq!(got, SlotKind::Text { token: t });
                    prop_assert_eq!(l.text_slot(t), Some(i));
                    prop_assert_eq!(l.chunk_of(i), Some(chunk));
                }
                Slot::Summary { chunk, j } => {
                    prop_assert_eq!(got, SlotKind::Summary { chunk, index: j });
                    prop_assert_eq!(l.summary_slot(chunk, j), Some(i));
                    prop_assert_eq!(l.chunk_of(i), Some(chunk));
                }
            }
        }
        prop_assert_eq!(l.slot_kind(l.len()), None);
        let text: Vec<u32> = (0..want.len()).filter(|&i| matches!(want[i], Slot::Text { .. })).map(|i| i as u32).collect();
        let summ: Vec<u32> = (0..want.len()).filter(|&i| matches!(want[i], Slot::Summary { .. })).map(|i| i as u32).collect();
        prop_assert_eq!(l.text_slots(), text);
        prop_assert_eq!(l.summary_slots(), summ);
    }

    #[test]
    fn positions_match_spec((c, s, w, n) in config(), ti in 0usize..2, si in 0usize..3) {
        let text = [TextPositions::Origin, TextPositions::InnerChunk][ti];
        let summary = [SummaryPositions::LastChunkSliceRight, SummaryPositions::LastChunkSliceLeft, SummaryPositions::Zeros][si];
        let cfg = KsaConfig::new(c, s, w).unwrap().with_text_positions(text).with_summary_positions(summary);
        let l = KsaLayout::new(cfg, n).unwrap();
        let want: Vec<i64> = slots(c, s, n).into_iter().map(|x| position(x, c, s, text, summary)).collect();
        let got: Vec<i64> = l.position_ids().into_iter().map(i64::from).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn mask_matches_spec((c, s, w, n) in config()) {
        let l = KsaLayout::new(KsaConfig::new(c, s, w).unwrap(), n).unwrap();
        let want = slots(c, s, n);
        let big = l.len();
        let dense = l.dense_mask(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let mut pairs = 0u64;
        for (qi, &q) in want.iter().enumerate() {
            let expected: Vec<usize> = (0..big).filter(|&ki| allowed(q, want[ki], w)).collect();
            for ki in 0..big {
                prop_assert_eq!(l.can_attend(qi, ki), allowed(q, want[ki], w), "q {} k {}", qi, ki);
                prop_assert_eq!(dense[qi * big + ki] == 1, allowed(q, want[ki], w));
            }
            // The closed-form ranges enumerate exactly the allowed keys.
            prop_assert_eq!(l.allowed_keys(qi), expected.clone());
            prop_assert_eq!(l.key_ranges(qi).unwrap().len(), expected.len());
            // Every row allows itself.
            prop_assert!(expected.contains(&qi));
            // A summary row sees nothing outside its own chunk.
            if let Slot::Summary { chunk, .. } = q {
                prop_assert!(expected.iter().all(|&k| l.chunk_of(k) == Some(chunk)));
            }
            pairs += expected.len() as u64;
        }
        let counts = l.pair_counts();
        prop_assert_eq!(counts.total(), pairs);
        prop_assert_eq!(counts.total(), dense.iter().map(|&x| x as u64).sum::<u64>());
        prop_assert_eq!(l.can_attend(big, 0), false);
        prop_assert_eq!(l.key_ranges(big), None);
    }
}

#[test]
fn window_covering_every_chunk_is_causal_text_attention() {
    // W >= c for every chunk: text sees all earlier text and no summary.
    let l = KsaLayout::new(KsaConfig::new(4, 2, 100).unwrap(), 37).unwrap();
    for t in 0..37 {
        let q = l.text_slot(t).unwrap();
        let want: Vec<usize> = (0..=t).map(|k| l.text_slot(k).unwrap()).collect();
        assert_eq!(l.allowed_keys(q), want);
    }
    assert_eq!(l.pair_counts().text_queries, l.causal_text_pairs());
}

#[test]
fn empty_layout() {
    let l = KsaLayout::new(KsaConfig::new(8, 1, 2).unwrap(), 0).unwrap();
    assert!(l.is_empty());
    assert_eq!(l.len(), 0);
    assert!(l.text_slots().is_empty() && l.summary_slots().is_empty());
    assert_eq!(l.pair_counts().total(), 0);
    assert_eq!(l.dense_mask(&Device::Cpu).unwrap().dims(), &[0, 0]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn key_runs_cover_exactly_the_allowed_keys((c, s, w, n) in config()) {
        let l = KsaLayout::new(KsaConfig::new(c, s, w).unwrap(), n).unwrap();
        for q in 0..l.len() {
            let mut keys = Vec::new();
            let mut runs = 0;
            l.for_each_key_run(q, |r| {
                runs += 1;
                assert!(!r.is_empty());
                keys.extend(r);
            });
            keys.sort_unstable();
            prop_assert_eq!(keys, l.allowed_keys(q));
            // One run per chunk touched, at most.
            prop_assert!(runs <= 2 * l.chunks().max(1));
        }
    }
}
