//! Every bad input returns the right typed error, with a message that says
//! what was expected and what came in; nothing panics.

use candle_core::{DType, Device, Tensor};
use ksa::{reference, Error, KsaConfig, KsaLayout, SummaryPositions, TextPositions};

fn t(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
}

fn layout(n: usize) -> KsaLayout {
    KsaLayout::new(KsaConfig::new(4, 1, 2).unwrap(), n).unwrap() // N = n + n/4
}

/// Runs both the entry point and the oracle; they must fail the same way.
fn attn_err(q: &Tensor, k: &Tensor, v: &Tensor, l: &KsaLayout) -> Error {
    let a = ksa::attention(q, k, v, l).unwrap_err();
    let b = reference::attention(q, k, v, l).unwrap_err();
    assert_eq!(
        a.to_string().replace("ksa::attention", "OP"),
        b.to_string().replace("reference::attention", "OP")
    );
    a
}

#[test]
fn impossible_configs() {
    for (c, s) in [(0, 1), (1, 0), (0, 0), (1 << 21, 1), (8, 1 << 21)] {
        let e = KsaConfig::new(c, s, 1).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig(_)), "{c} {s}: {e}");
    }
    let msg = KsaConfig::new(0, 1, 1).unwrap_err().to_string();
    assert!(msg.contains("chunk size") && msg.contains("got 0"), "{msg}");
    assert!(matches!(
        "rope".parse::<TextPositions>(),
        Err(Error::InvalidConfig(_))
    ));
    assert!(matches!(
        "left".parse::<SummaryPositions>(),
        Err(Error::InvalidConfig(_))
    ));
    assert_eq!(
        "inner_chunk".parse::<TextPositions>().unwrap(),
        TextPositions::InnerChunk
    );
    assert_eq!(
        "zeros".parse::<SummaryPositions>().unwrap(),
        SummaryPositions::Zeros
    );
}

#[test]
fn layout_that_overflows_u32() {
    let cfg = KsaConfig::new(1, 1 << 20, 0).unwrap();
    let e = KsaLayout::new(cfg, 1 << 20).unwrap_err();
    assert!(matches!(e, Error::LayoutTooLarge(_)), "{e}");
    let e = KsaLayout::new(KsaConfig::new(1, 1, 0).unwrap(), usize::MAX).unwrap_err();
    assert!(matches!(e, Error::LayoutTooLarge(_)), "{e}");
}

#[test]
fn wrong_rank() {
    let l = layout(8); // N = 10
    let e = attn_err(
        &t(&[2, 10, 16]),
        &t(&[1, 2, 10, 16]),
        &t(&[1, 2, 10, 16]),
        &l,
    );
    assert!(
        matches!(
            e,
            Error::Rank {
                name: "q",
                expected: 4,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("[2, 10, 16]"), "{e}");
    let e = attn_err(
        &t(&[1, 2, 10, 16]),
        &t(&[1, 2, 10, 16]),
        &t(&[2, 10, 16, 1, 1]),
        &l,
    );
    assert!(matches!(e, Error::Rank { name: "v", .. }), "{e}");
}

#[test]
fn mismatched_sizes() {
    let l = layout(8);
    let cases = [
        ([2, 4, 10, 16], [1, 2, 10, 16], [1, 2, 10, 16], "batch size"),
        ([1, 4, 10, 16], [1, 2, 10, 8], [1, 2, 10, 8], "head dim"),
        ([1, 4, 10, 16], [1, 2, 10, 16], [1, 2, 10, 8], "head dim"),
        (
            [1, 4, 10, 16],
            [1, 2, 9, 16],
            [1, 2, 9, 16],
            "sequence length",
        ),
        (
            [1, 4, 10, 16],
            [1, 2, 10, 16],
            [1, 1, 10, 16],
            "key/value heads",
        ),
    ];
    for (q, k, v, what) in cases {
        let e = attn_err(&t(&q), &t(&k), &t(&v), &l);
        match &e {
            Error::DimMismatch { what: w, .. } => assert_eq!(*w, what, "{e}"),
            _ => panic!("expected DimMismatch for {what}, got {e}"),
        }
    }
}

#[test]
fn heads_that_do_not_divide() {
    let l = layout(8);
    let e = attn_err(
        &t(&[1, 3, 10, 16]),
        &t(&[1, 2, 10, 16]),
        &t(&[1, 2, 10, 16]),
        &l,
    );
    assert!(
        matches!(
            e,
            Error::HeadsNotDivisible {
                q_heads: 3,
                kv_heads: 2
            }
        ),
        "{e}"
    );
    let e = attn_err(
        &t(&[1, 3, 10, 16]),
        &t(&[1, 0, 10, 16]),
        &t(&[1, 0, 10, 16]),
        &l,
    );
    assert!(
        matches!(e, Error::HeadsNotDivisible { kv_heads: 0, .. }),
        "{e}"
    );
}

#[test]
fn length_that_does_not_match_the_layout() {
    // 8 text tokens with C = 4, S = 1 need 10 slots, not 8.
    let e = attn_err(
        &t(&[1, 2, 8, 16]),
        &t(&[1, 2, 8, 16]),
        &t(&[1, 2, 8, 16]),
        &layout(8),
    );
    assert!(
        matches!(
            e,
            Error::LayoutLength {
                expected: 10,
                got: 8,
                text_tokens: 8,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn unsupported_and_mismatched_dtypes() {
    let l = layout(8);
    let u = Tensor::zeros((1, 2, 10, 16), DType::U32, &Device::Cpu).unwrap();
    let e = attn_err(&u, &u, &u, &l);
    assert!(
        matches!(
            e,
            Error::UnsupportedDType {
                got: DType::U32,
                ..
            }
        ),
        "{e}"
    );
    let h = Tensor::zeros((1, 2, 10, 16), DType::F16, &Device::Cpu).unwrap();
    let f = t(&[1, 2, 10, 16]);
    let e = attn_err(&f, &h, &f, &l);
    assert!(
        matches!(e, Error::DTypeMismatch { a: "q", b: "k", .. }),
        "{e}"
    );
}

#[test]
fn interleave_errors() {
    let l = layout(8);
    let e = l.interleave(&t(&[1, 7, 5]), &t(&[1, 5])).unwrap_err();
    assert!(
        matches!(
            e,
            Error::DimMismatch {
                what: "text length",
                a_val: 7,
                b_val: 8,
                ..
            }
        ),
        "{e}"
    );
    let e = l.interleave(&t(&[1, 8, 5]), &t(&[2, 5])).unwrap_err();
    assert!(
        matches!(
            e,
            Error::DimMismatch {
                what: "summaries per chunk",
                ..
            }
        ),
        "{e}"
    );
    let e = l.interleave(&t(&[1, 8, 5]), &t(&[1, 6])).unwrap_err();
    assert!(
        matches!(
            e,
            Error::DimMismatch {
                what: "hidden size",
                ..
            }
        ),
        "{e}"
    );
    let e = l.interleave(&t(&[8, 5]), &t(&[1, 5])).unwrap_err();
    assert!(matches!(e, Error::Rank { name: "hidden", .. }), "{e}");
    let e = l.interleave(&t(&[1, 8, 5]), &t(&[5])).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Rank {
                name: "summaries",
                ..
            }
        ),
        "{e}"
    );
    let h = Tensor::zeros((1, 5), DType::F16, &Device::Cpu).unwrap();
    let e = l.interleave(&t(&[1, 8, 5]), &h).unwrap_err();
    assert!(matches!(e, Error::DTypeMismatch { .. }), "{e}");
    let e = l.take_text(&t(&[1, 9, 5]), 1).unwrap_err();
    assert!(
        matches!(
            e,
            Error::LayoutLength {
                expected: 10,
                got: 9,
                ..
            }
        ),
        "{e}"
    );
    let e = l.take_text(&t(&[1, 10]), 2).unwrap_err();
    assert!(matches!(e, Error::Rank { .. }), "{e}");
}

#[test]
fn dense_mask_refuses_huge_layouts() {
    let l = KsaLayout::new(KsaConfig::new(8, 1, 2).unwrap(), 100_000).unwrap();
    let e = l.dense_mask(&Device::Cpu).unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
}

#[test]
fn slots_outside_the_layout() {
    let l = layout(8);
    assert_eq!(l.slot_kind(10), None);
    assert_eq!(l.position_id(10), None);
    assert_eq!(l.text_slot(8), None);
    assert_eq!(l.summary_slot(2, 0), None); // only 2 complete chunks
    assert_eq!(l.summary_slot(0, 1), None); // S = 1
    assert!(!l.can_attend(0, 10) && !l.can_attend(10, 0));
    assert!(l.allowed_keys(10).is_empty());
}
