//! The test vectors of `docs/spec.md` (section 2's worked example and section
//! 7, taken from the reference's own code), verbatim.

use ksa::{KsaConfig, KsaLayout, SummaryPositions, TextPositions};

fn layout(c: usize, s: usize, w: usize, n: usize) -> KsaLayout {
    KsaLayout::new(KsaConfig::new(c, s, w).unwrap(), n).unwrap()
}

fn kinds(l: &KsaLayout) -> String {
    (0..l.len())
        .map(|i| {
            if l.slot_kind(i).unwrap().is_text() {
                "t"
            } else {
                "s"
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn rows(l: &KsaLayout) -> Vec<Vec<usize>> {
    (0..l.len()).map(|q| l.allowed_keys(q)).collect()
}

/// Every row of the dense mask must agree with `allowed_keys` too.
fn assert_dense_agrees(l: &KsaLayout) {
    let m = l
        .dense_mask(&candle_core::Device::Cpu)
        .unwrap()
        .to_vec2::<u8>()
        .unwrap();
    for (q, row) in m.iter().enumerate() {
        let keys: Vec<usize> = (0..l.len()).filter(|&k| row[k] == 1).collect();
        assert_eq!(keys, l.allowed_keys(q), "dense row {q}");
    }
}

#[test]
fn worked_example_c2_s1_w1_n7() {
    let l = layout(2, 1, 1, 7);
    assert_eq!(kinds(&l), "t t s t t s t t s t");
    let expected: Vec<Vec<usize>> = vec![
        vec![0],
        vec![0, 1],
        vec![0, 1, 2],
        vec![0, 1, 3],
        vec![0, 1, 3, 4],
        vec![3, 4, 5],
        vec![2, 3, 4, 6],
        vec![2, 3, 4, 6, 7],
        vec![6, 7, 8],
        vec![2, 5, 6, 7, 9],
    ];
    assert_eq!(rows(&l), expected);
    assert_dense_agrees(&l);
}

#[test]
fn vector_c2_s2_w0_n5() {
    let l = layout(2, 2, 0, 5);
    assert_eq!(kinds(&l), "t t s s t t s s t");
    assert_eq!(l.position_ids(), vec![0, 1, 0, 1, 2, 3, 2, 3, 4]);
    let expected: Vec<Vec<usize>> = vec![
        vec![0],
        vec![0, 1],
        vec![0, 1, 2],
        vec![0, 1, 2, 3],
        vec![2, 3, 4],
        vec![2, 3, 4, 5],
        vec![4, 5, 6],
        vec![4, 5, 6, 7],
        vec![2, 3, 6, 7, 8],
    ];
    assert_eq!(rows(&l), expected);
    assert_dense_agrees(&l);
}

#[test]
fn vector_c2_s1_w0_n6() {
    let l = layout(2, 1, 0, 6);
    let expected: Vec<Vec<usize>> = vec![
        vec![0],
        vec![0, 1],
        vec![0, 1, 2],
        vec![2, 3],
        vec![2, 3, 4],
        vec![3, 4, 5],
        vec![2, 5, 6],
        vec![2, 5, 6, 7],
        vec![6, 7, 8],
    ];
    assert_eq!(rows(&l), expected);
    assert_dense_agrees(&l);
}

#[test]
fn vector_c2_s2_w1_n6() {
    let l = layout(2, 2, 1, 6);
    let expected: Vec<Vec<usize>> = vec![
        vec![0],
        vec![0, 1],
        vec![0, 1, 2],
        vec![0, 1, 2, 3],
        vec![0, 1, 4],
        vec![0, 1, 4, 5],
        vec![4, 5, 6],
        vec![4, 5, 6, 7],
        vec![2, 3, 4, 5, 8],
        vec![2, 3, 4, 5, 8, 9],
        vec![8, 9, 10],
        vec![8, 9, 10, 11],
    ];
    assert_eq!(rows(&l), expected);
    assert_dense_agrees(&l);
}

#[test]
fn vector_c3_s1_w2_n13() {
    let l = layout(3, 1, 2, 13);
    assert_eq!(
        l.position_ids(),
        vec![0, 1, 2, 2, 3, 4, 5, 5, 6, 7, 8, 8, 9, 10, 11, 11, 12]
    );
    assert_eq!(l.allowed_keys(16), vec![3, 7, 8, 9, 10, 12, 13, 14, 16]);
    assert_eq!(l.allowed_keys(15), vec![12, 13, 14, 15]);
    assert_dense_agrees(&l);
}

fn positions(
    c: usize,
    s: usize,
    n: usize,
    text: TextPositions,
    summary: SummaryPositions,
) -> Vec<u32> {
    let cfg = KsaConfig::new(c, s, 0)
        .unwrap()
        .with_text_positions(text)
        .with_summary_positions(summary);
    KsaLayout::new(cfg, n).unwrap().position_ids()
}

#[test]
fn positions_right_s2_s3_and_left() {
    use SummaryPositions::*;
    use TextPositions::*;
    let mut expected: Vec<u32> = (0..8).collect();
    expected.extend([3, 7]);
    expected.extend(8..16);
    expected.extend([11, 15]);
    expected.extend(16..20);
    assert_eq!(positions(8, 2, 20, Origin, LastChunkSliceRight), expected);

    let p = positions(8, 3, 20, Origin, LastChunkSliceRight);
    assert_eq!(&p[8..11], &[1, 4, 7]);
    assert_eq!(&p[19..22], &[9, 12, 15]);

    let p = positions(8, 2, 20, Origin, LastChunkSliceLeft);
    assert_eq!(&p[8..10], &[0, 3]);
    assert_eq!(&p[18..20], &[8, 11]);
}

#[test]
fn positions_zeros() {
    assert_eq!(
        positions(4, 2, 9, TextPositions::Origin, SummaryPositions::Zeros),
        vec![0, 1, 2, 3, 0, 0, 4, 5, 6, 7, 0, 0, 8]
    );
}

#[test]
fn positions_inner_chunk_text_with_global_summaries() {
    assert_eq!(
        positions(
            4,
            1,
            11,
            TextPositions::InnerChunk,
            SummaryPositions::LastChunkSliceRight
        ),
        vec![0, 1, 2, 3, 3, 0, 1, 2, 3, 7, 0, 1, 2]
    );
}

#[test]
fn cost_at_128k_matches_the_spec() {
    // Spec section 2: at n = 128K, C = 8, S = 1, W = 128 a text query averages
    // 9,088 keys against 65,536 for full causal attention.
    let l = layout(8, 1, 128, 131_072);
    let avg = l.pair_counts().text_queries as f64 / l.text_len() as f64;
    assert!(
        (avg - 9088.0).abs() < 10.0,
        "average keys per text query {avg}"
    );
    let full = l.causal_text_pairs() as f64 / l.text_len() as f64;
    assert!((full - 65_536.5).abs() < 1e-9);
}
