//! The summary-reads ablation (`KsaConfig::with_summary_reads(false)`, pure
//! sliding-chunk attention over text, used by `examples/train_recall.rs`):
//! its mask is exactly the KSA mask minus the text -> summary pairs, and the
//! fast CPU path and its backward follow it (against `reference::attention`).

use candle_core::{DType, Device, Tensor, Var};
use ksa::{reference, KsaConfig, KsaLayout, SlotKind};
use proptest::prelude::*;

/// Deterministic values in [-1.5, 1.5), f32.
fn rand(shape: &[usize], seed: u64) -> Tensor {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let len: usize = shape.iter().product();
    let data: Vec<f32> = (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 3.0 - 1.5
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn max_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let err = ((&a - &b).unwrap().abs().unwrap() / (b.abs().unwrap() + 1.0).unwrap()).unwrap();
    err.flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn ablation_mask_is_ksa_minus_text_to_summary(
        c in 1usize..6, s in 1usize..4, w in 0usize..5, n in 0usize..40,
    ) {
        let ksa = KsaLayout::new(KsaConfig::new(c, s, w).unwrap(), n).unwrap();
        let ablated = KsaLayout::new(KsaConfig::new(c, s, w).unwrap().with_summary_reads(false), n).unwrap();
        let mut dropped = 0u64;
        for q in 0..ksa.len() {
            let text_query = ksa.slot_kind(q).unwrap().is_text();
            for k in 0..ksa.len() {
                let summary_key = matches!(ksa.slot_kind(k), Some(SlotKind::Summary { .. }));
                let expected = ksa.can_attend(q, k) && !(text_query && summary_key);
                prop_assert_eq!(ablated.can_attend(q, k), expected, "q {} k {}", q, k);
                dropped += u64::from(ksa.can_attend(q, k) && !expected);
            }
            let keys: Vec<usize> = (0..ksa.len()).filter(|&k| ablated.can_attend(q, k)).collect();
            prop_assert_eq!(ablated.allowed_keys(q), keys);
        }
        let (full, cut) = (ksa.pair_counts(), ablated.pair_counts());
        prop_assert_eq!(cut.summary_queries, full.summary_queries);
        prop_assert_eq!(cut.text_queries + dropped, full.text_queries);
    }

    #[test]
    fn fast_path_and_backward_follow_the_ablation(
        c in 1usize..5, s in 1usize..3, w in 0usize..4, n in 1usize..30,
        b in 1usize..3, g in 1usize..3, seed in 0u64..1000,
    ) {
        let config = KsaConfig::new(c, s, w).unwrap().with_summary_reads(false);
        let layout = KsaLayout::new(config, n).unwrap();
        let (hkv, d, len) = (2, 8, layout.len());
        let q = Var::from_tensor(&rand(&[b, hkv * g, len, d], seed)).unwrap();
        let k = Var::from_tensor(&rand(&[b, hkv, len, d], seed + 1)).unwrap();
        let v = Var::from_tensor(&rand(&[b, hkv, len, d], seed + 2)).unwrap();
        let weights = rand(&[b, hkv * g, len, d], seed + 3);
        let fast = ksa::attention(&q, &k, &v, &layout).unwrap();
        let f64s = |x: &Var| Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
        let (q64, k64, v64) = (f64s(&q), f64s(&k), f64s(&v));
        let slow = reference::attention(&q64, &k64, &v64, &layout).unwrap();
        prop_assert!(max_err(&fast, &slow) < 2e-4);
        let loss = |out: &Tensor| (out * weights.to_dtype(out.dtype()).unwrap()).unwrap().sum_all().unwrap();
        let (gf, gs) = (loss(&fast).backward().unwrap(), loss(&slow).backward().unwrap());
        for (x, x64) in [(&q, &q64), (&k, &k64), (&v, &v64)] {
            let err = max_err(gf.get(x).unwrap(), gs.get(x64).unwrap());
            prop_assert!(err < 5e-4, "gradient error {}", err);
        }
    }
}
