//! The fast CPU path against the f64 reference: KSA and full causal
//! attention, all dtypes, tails, windows, GQA, tile sizes, stability, thread
//! counts and input errors.
//!
//! Tolerances (max |fast - reference| per element, values ~ N(0, 1)):
//! f32 `2e-4 + 2e-4 |ref|` (f32 accumulation against f64); f16 and bf16 are
//! compared with the reference run on the *same rounded inputs*, with the
//! output rounding on top: f16 `2e-3 + 2e-3 |ref|`, bf16 `1.6e-2 + 1.6e-2 |ref|`.

use candle_core::{DType, Device, Tensor};
use ksa::cpu::CpuKernel;
use ksa::schedule::TileSizes;
use ksa::{reference, AttentionOptions, Error, KsaConfig, KsaLayout};
use proptest::prelude::*;

#[path = "common/tensors.rs"]
mod tensors;

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 2e-3,
        DType::BF16 => 1.6e-2,
        _ => 2e-4,
    }
}

/// Max of `|a - b| / (1 + |b|)`, in f64.
fn max_rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let a: Vec<f64> = a.to_vec1().unwrap();
    let b: Vec<f64> = b.to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| {
            assert!(x.is_finite(), "non-finite output {x}");
            (x - y).abs() / (1.0 + y.abs())
        })
        .fold(0.0, f64::max)
}

fn qkv(
    b: usize,
    hq: usize,
    hkv: usize,
    n: usize,
    d: usize,
    dtype: DType,
    seed: u64,
) -> (Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    // Deterministic inputs from the seed (candle's randn is not seedable on CPU).
    let gen = |count: usize, salt: u64| -> Tensor {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt;
        let data: Vec<f32> = (0..count)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 3.4 - 1.7
            })
            .collect();
        Tensor::from_vec(data, count, &dev).unwrap()
    };
    let q = gen(b * hq * n * d, 1).reshape((b, hq, n, d)).unwrap();
    let k = gen(b * hkv * n * d, 2).reshape((b, hkv, n, d)).unwrap();
    let v = gen(b * hkv * n * d, 3).reshape((b, hkv, n, d)).unwrap();
    let cast = |x: Tensor| x.to_dtype(dtype).unwrap();
    (cast(q), cast(k), cast(v))
}

#[derive(Debug, Clone)]
struct Case {
    c: usize,
    s: usize,
    w: usize,
    n: usize,
    b: usize,
    hkv: usize,
    group: usize,
    d: usize,
    tiles: TileSizes,
    dtype: DType,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        (1usize..=16, 1usize..=4, 0usize..=12, 0usize..=160),
        (
            1usize..=3,
            1usize..=2,
            prop_oneof![Just(1usize), Just(2), Just(4)],
        ),
        prop_oneof![
            Just(1usize),
            Just(3),
            Just(8),
            Just(24),
            Just(40),
            Just(128)
        ],
        (1usize..=40, 1usize..=80),
        prop_oneof![
            Just(DType::F32),
            Just(DType::F16),
            Just(DType::BF16),
            Just(DType::F64)
        ],
        any::<u64>(),
    )
        .prop_map(
            |((c, s, w, n), (b, hkv, group), d, (tq, tk), dtype, seed)| Case {
                c,
                s,
                w,
                n,
                b,
                hkv,
                group,
                d,
                tiles: TileSizes { query: tq, key: tk },
                dtype,
                seed,
            },
        )
}

fn check_case(case: &Case) {
    let layout = KsaLayout::new(KsaConfig::new(case.c, case.s, case.w).unwrap(), case.n).unwrap();
    let hq = case.hkv * case.group;
    let (q, k, v) = qkv(
        case.b,
        hq,
        case.hkv,
        layout.len(),
        case.d,
        case.dtype,
        case.seed,
    );
    let want = reference::attention(&q, &k, &v, &layout).unwrap();
    let opts = AttentionOptions::default();
    for kernel in [
        CpuKernel::default(),
        CpuKernel {
            tiles: case.tiles,
            ..Default::default()
        },
    ] {
        let (out, lse) = kernel.attention(&q, &k, &v, &layout, &opts).unwrap();
        assert_eq!(out.dtype(), case.dtype);
        let err = max_rel_err(&out, &want);
        assert!(
            err <= tolerance(case.dtype),
            "{case:?} {:?}: err {err}",
            kernel.tiles
        );
        if case.n > 0 && case.dtype == DType::F32 {
            let want_lse = tensors::reference_lse(&q, &k, |a, b| layout.can_attend(a, b));
            let err = max_rel_err(&lse, &want_lse);
            assert!(err <= 1e-4, "{case:?}: lse err {err}");
        }
    }
    let routed = ksa::attention(&q, &k, &v, &layout).unwrap();
    assert!(max_rel_err(&routed, &want) <= tolerance(case.dtype));

    let (out, lse) = CpuKernel {
        tiles: case.tiles,
        ..Default::default()
    }
    .causal_attention(&q, &k, &v, &opts)
    .unwrap();
    let want = reference::causal_attention(&q, &k, &v).unwrap();
    let err = max_rel_err(&out, &want);
    assert!(err <= tolerance(case.dtype), "{case:?} causal: err {err}");
    if case.n > 0 && case.dtype == DType::F32 {
        let err = max_rel_err(&lse, &tensors::reference_lse(&q, &k, |a, b| b <= a));
        assert!(err <= 1e-4, "{case:?}: causal lse err {err}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn fast_paths_match_the_reference(case in case()) {
        check_case(&case);
    }
}

#[test]
fn edge_configs_match_the_reference() {
    let tiles = TileSizes { query: 5, key: 7 };
    for (c, s, w, n) in [
        (8, 1, 128, 300), // window beyond every chunk: plain causal text
        (8, 1, 0, 97),    // summaries only, partial tail
        (16, 4, 2, 9),    // n < C: no summaries at all
        (3, 2, 1, 0),     // empty
        (1, 1, 0, 40),    // every token a chunk
        (4, 3, 3, 61),
    ] {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            check_case(&Case {
                c,
                s,
                w,
                n,
                b: 2,
                hkv: 2,
                group: 2,
                d: 24,
                tiles,
                dtype,
                seed: n as u64,
            });
        }
    }
}

#[test]
fn large_logits_stay_finite_and_accurate() {
    let layout = KsaLayout::new(KsaConfig::new(4, 1, 2).unwrap(), 90).unwrap();
    let (q, k, v) = qkv(1, 4, 2, layout.len(), 32, DType::F32, 7);
    // |q.k| / sqrt(32) reaches about 1e4.
    let q = (q * 150.0).unwrap();
    let k = (k * 20.0).unwrap();
    let want = reference::attention(&q, &k, &v, &layout).unwrap();
    let got = ksa::attention(&q, &k, &v, &layout).unwrap();
    // One-hot-like rows: an f32 logit error of ~1e-3 moves weights by ~0.1%.
    assert!(max_rel_err(&got, &want) < 5e-3);
    let want = reference::causal_attention(&q, &k, &v).unwrap();
    let got = ksa::causal_attention(&q, &k, &v).unwrap();
    assert!(max_rel_err(&got, &want) < 5e-3);
}

#[test]
fn explicit_scale_is_used() {
    let layout = KsaLayout::new(KsaConfig::new(4, 2, 1).unwrap(), 50).unwrap();
    let (q, k, v) = qkv(1, 2, 1, layout.len(), 16, DType::F32, 3);
    let opts = AttentionOptions { scale: Some(0.7) };
    let want =
        reference::attention_with(&q, &k, &v, &layout, &AttentionOptions { scale: Some(0.7) })
            .unwrap();
    let got = ksa::attention_with(&q, &k, &v, &layout, &opts).unwrap();
    assert!(max_rel_err(&got, &want) <= 2e-4);
    let want = reference::causal_attention_with(&q, &k, &v, &AttentionOptions { scale: Some(0.7) })
        .unwrap();
    let got = ksa::causal_attention_with(&q, &k, &v, &opts).unwrap();
    assert!(max_rel_err(&got, &want) <= 2e-4);
}

#[test]
fn thread_count_does_not_change_results() {
    let layout = KsaLayout::new(KsaConfig::new(8, 1, 4).unwrap(), 1000).unwrap();
    let (q, k, v) = qkv(2, 4, 2, layout.len(), 64, DType::F32, 11);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            (
                ksa::attention(&q, &k, &v, &layout).unwrap(),
                ksa::causal_attention(&q, &k, &v).unwrap(),
            )
        })
    };
    let (one, two) = (run(1), run(2));
    // Each row is reduced in a fixed order whatever thread runs it, so the
    // results are in fact bitwise equal; the tolerance is the f32 one.
    assert!(max_rel_err(&one.0, &two.0) <= 2e-4);
    assert!(max_rel_err(&one.1, &two.1) <= 2e-4);
}

#[test]
fn non_contiguous_inputs_are_copied() {
    let layout = KsaLayout::new(KsaConfig::new(4, 1, 1).unwrap(), 30).unwrap();
    let (q, k, v) = qkv(1, 2, 2, layout.len(), 8, DType::F32, 5);
    // A transposed-and-back view with the same values, not contiguous.
    let qt = q
        .transpose(2, 3)
        .unwrap()
        .contiguous()
        .unwrap()
        .transpose(2, 3)
        .unwrap();
    assert!(!qt.is_contiguous());
    let a = ksa::attention(&q, &k, &v, &layout).unwrap();
    let b = ksa::attention(&qt, &k, &v, &layout).unwrap();
    assert_eq!(max_rel_err(&a, &b), 0.0);
}

#[test]
fn bad_inputs_are_typed_errors() {
    let layout = KsaLayout::new(KsaConfig::new(4, 1, 1).unwrap(), 8).unwrap();
    let n = layout.len();
    let (q, k, v) = qkv(1, 3, 2, n, 8, DType::F32, 1);
    assert!(matches!(
        ksa::attention(&q, &k, &v, &layout),
        Err(Error::HeadsNotDivisible { .. })
    ));
    let (q, k, v) = qkv(1, 2, 2, n + 1, 8, DType::F32, 1);
    assert!(matches!(
        ksa::attention(&q, &k, &v, &layout),
        Err(Error::LayoutLength { .. })
    ));
    let (q, k, v) = qkv(1, 2, 2, n, 8, DType::F32, 1);
    let k16 = k.to_dtype(DType::F16).unwrap();
    assert!(matches!(
        ksa::causal_attention(&q, &k16, &v),
        Err(Error::DTypeMismatch { .. })
    ));
    let qi = q.to_dtype(DType::U32).unwrap();
    let (ki, vi) = (
        k.to_dtype(DType::U32).unwrap(),
        v.to_dtype(DType::U32).unwrap(),
    );
    assert!(matches!(
        ksa::attention(&qi, &ki, &vi, &layout),
        Err(Error::UnsupportedDType { .. })
    ));
    let q3 = q.squeeze(0).unwrap();
    assert!(matches!(
        ksa::cpu::causal_attention_with_lse(&q3, &k, &v, &AttentionOptions::default()),
        Err(Error::Rank { .. })
    ));
    let zero = TileSizes { query: 0, key: 1 };
    assert!(matches!(
        CpuKernel {
            tiles: zero,
            ..Default::default()
        }
        .causal_attention(&q, &k, &v, &AttentionOptions::default()),
        Err(Error::InvalidConfig(_))
    ));
}

#[test]
fn progress_counts_up_to_its_total() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let layout = KsaLayout::new(KsaConfig::new(4, 1, 2).unwrap(), 700).unwrap();
    let (q, k, v) = qkv(2, 4, 2, layout.len(), 16, DType::F32, 9);
    let (calls, last, total) = (
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    let (out, _) = CpuKernel::default()
        .attention_with_progress(
            &q,
            &k,
            &v,
            &layout,
            &AttentionOptions::default(),
            &|d, t| {
                calls.fetch_add(1, Ordering::Relaxed);
                last.fetch_max(d, Ordering::Relaxed);
                total.store(t, Ordering::Relaxed);
            },
        )
        .unwrap();
    let (calls, last, total) = (calls.into_inner(), last.into_inner(), total.into_inner());
    assert!(total > 0 && calls == total && last == total);
    let want = ksa::attention(&q, &k, &v, &layout).unwrap();
    assert_eq!(max_rel_err(&out, &want), 0.0);
}

/// Long enough (2 * n * d * 4 bytes above 4 MiB) that heads run one at a
/// time, the path long contexts take.
#[test]
fn long_sequences_match_the_reference() {
    let n = 4104;
    let (q, k, v) = qkv(1, 2, 2, n, 128, DType::F32, 13);
    let want = reference::causal_attention(&q, &k, &v).unwrap();
    let got = ksa::causal_attention(&q, &k, &v).unwrap();
    assert!(max_rel_err(&got, &want) <= 2e-4);
    let layout = KsaLayout::new(KsaConfig::new(8, 1, 16).unwrap(), 3648).unwrap();
    assert_eq!(layout.len(), n);
    let want = reference::attention(&q, &k, &v, &layout).unwrap();
    let got = ksa::attention(&q, &k, &v, &layout).unwrap();
    assert!(max_rel_err(&got, &want) <= 2e-4);
}
