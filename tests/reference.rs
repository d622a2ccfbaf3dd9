//! The oracle against an independent naive computation, GQA against repeated
//! KV heads, KSA with a window covering every chunk against causal attention
//! over the text alone, dtype handling, and the public entry point.

use candle_core::{DType, Device, Tensor};
use ksa::{reference, AttentionOptions, KsaConfig, KsaLayout};
use proptest::prelude::*;

#[path = "common/tensors.rs"]
mod tensors;
use tensors::flat;

fn rand(shape: &[usize], seed: u64) -> Tensor {
    tensors::uniform(shape, seed, 2.0)
}

/// Softmax attention as plain loops over `allowed(query, key)`, in f64, with
/// query head `h` reading KV head `h / (hq / hkv)`.
fn naive(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    allowed: impl Fn(usize, usize) -> bool,
) -> Vec<f64> {
    let (b, hq, n, d) = q.dims4().unwrap();
    let hkv = k.dim(1).unwrap();
    let (qf, kf, vf) = (flat(q), flat(k), flat(v));
    let mut out = vec![0.0; b * hq * n * d];
    for bi in 0..b {
        for h in 0..hq {
            let kh = h / (hq / hkv);
            let qo = |i: usize| ((bi * hq + h) * n + i) * d;
            let ko = |j: usize| ((bi * hkv + kh) * n + j) * d;
            for i in 0..n {
                let keys: Vec<usize> = (0..n).filter(|&j| allowed(i, j)).collect();
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|&j| (0..d).map(|x| qf[qo(i) + x] * kf[ko(j) + x]).sum::<f64>() * scale)
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = w.iter().sum();
                for (&j, wj) in keys.iter().zip(&w) {
                    for x in 0..d {
                        out[qo(i) + x] += wj / z * vf[ko(j) + x];
                    }
                }
            }
        }
    }
    out
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn case() -> impl Strategy<Value = (usize, usize, usize, usize, usize, usize, usize, u64)> {
    (
        1usize..=8,                                   // C
        1usize..=4,                                   // S
        prop_oneof![0usize..=4, Just(1_000)],         // W
        0usize..=40,                                  // n
        1usize..=3,                                   // batch
        prop_oneof![Just(1usize), Just(2), Just(4)],  // GQA ratio
        prop_oneof![Just(4usize), Just(7), Just(16)], // head dim
        any::<u64>(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn oracle_equals_naive_loops((c, s, w, n, b, g, d, seed) in case()) {
        let l = KsaLayout::new(KsaConfig::new(c, s, w).unwrap(), n).unwrap();
        let hkv = 2;
        let q = rand(&[b, hkv * g, l.len(), d], seed);
        let k = rand(&[b, hkv, l.len(), d], seed + 1);
        let v = rand(&[b, hkv, l.len(), d], seed + 2);
        let got = reference::attention(&q, &k, &v, &l).unwrap();
        prop_assert_eq!(got.dims(), q.dims());
        let want = naive(&q, &k, &v, 1.0 / (d as f64).sqrt(), |i, j| l.can_attend(i, j));
        prop_assert!(max_abs_diff(&flat(&got), &want) < 1e-12);
        // The public entry point (whatever path serves CPU tensors, computing
        // in at least f32) agrees with the oracle.
        let entry = ksa::attention(&q, &k, &v, &l).unwrap();
        prop_assert!(max_abs_diff(&flat(&entry), &want) < 1e-5);
    }

    #[test]
    fn gqa_equals_repeated_kv_heads((c, s, w, n, b, g, d, seed) in case()) {
        let l = KsaLayout::new(KsaConfig::new(c, s, w).unwrap(), n).unwrap();
        let hkv = 2;
        let q = rand(&[b, hkv * g, l.len(), d], seed);
        let k = rand(&[b, hkv, l.len(), d], seed + 1);
        let v = rand(&[b, hkv, l.len(), d], seed + 2);
        // Repeat each KV head g times, consecutively (head h reads h / g).
        let rep = |x: &Tensor| {
            let heads: Vec<Tensor> = (0..hkv * g).map(|h| x.narrow(1, h / g, 1).unwrap()).collect();
            Tensor::cat(&heads, 1).unwrap()
        };
        let gqa = reference::attention(&q, &k, &v, &l).unwrap();
        let mha = reference::attention(&q, &rep(&k), &rep(&v), &l).unwrap();
        prop_assert!(max_abs_diff(&flat(&gqa), &flat(&mha)) == 0.0);
    }

    #[test]
    fn whole_context_window_equals_causal_text_attention((c, s, _w, n, b, g, d, seed) in case()) {
        // With W >= chunks, text slots see exactly the earlier text: the KSA
        // output on text slots is causal attention over the text alone.
        let l = KsaLayout::new(KsaConfig::new(c, s, n / c + 1).unwrap(), n).unwrap();
        let q = rand(&[b, 2 * g, l.len(), d], seed);
        let k = rand(&[b, 2, l.len(), d], seed + 1);
        let v = rand(&[b, 2, l.len(), d], seed + 2);
        let ksa_text = l.take_text(&reference::attention(&q, &k, &v, &l).unwrap(), 2).unwrap();
        let text = |x: &Tensor| l.take_text(x, 2).unwrap();
        let causal = reference::causal_attention(&text(&q), &text(&k), &text(&v)).unwrap();
        prop_assert!(max_abs_diff(&flat(&ksa_text), &flat(&causal)) < 1e-12);
    }
}

#[test]
fn causal_attention_equals_naive_loops() {
    let q = rand(&[2, 4, 23, 8], 1);
    let k = rand(&[2, 2, 23, 8], 2);
    let v = rand(&[2, 2, 23, 8], 3);
    let got = reference::causal_attention_with(&q, &k, &v, &AttentionOptions { scale: Some(0.7) })
        .unwrap();
    let want = naive(&q, &k, &v, 0.7, |i, j| j <= i);
    assert!(max_abs_diff(&flat(&got), &want) < 1e-12);
}

#[test]
fn explicit_scale() {
    let l = KsaLayout::new(KsaConfig::new(3, 2, 1).unwrap(), 17).unwrap();
    let q = rand(&[1, 2, l.len(), 8], 4);
    let k = rand(&[1, 1, l.len(), 8], 5);
    let v = rand(&[1, 1, l.len(), 8], 6);
    let want = naive(&q, &k, &v, 0.3, |i, j| l.can_attend(i, j));
    let got =
        reference::attention_with(&q, &k, &v, &l, &AttentionOptions { scale: Some(0.3) }).unwrap();
    assert!(max_abs_diff(&flat(&got), &want) < 1e-12);
    let opts = AttentionOptions { scale: Some(0.3) };
    let got = ksa::attention_with(&q, &k, &v, &l, &opts).unwrap();
    assert!(max_abs_diff(&flat(&got), &want) < 1e-5);
    let default = ksa::attention(&q, &k, &v, &l).unwrap();
    assert!(
        max_abs_diff(&flat(&got), &flat(&default)) > 1e-3,
        "the scale must matter"
    );
}

#[test]
fn every_oracle_dtype_is_the_f64_result_rounded_once() {
    // The oracle computes in f64 for every dtype, so an f32/f16/bf16 output is
    // the f64 output of the same (rounded) inputs, rounded once: relative error
    // at most half an ulp of the dtype (2^-24, 2^-11, 2^-8), or half the
    // subnormal spacing in absolute terms (f16: 2^-25).
    let l = KsaLayout::new(KsaConfig::new(4, 2, 1).unwrap(), 30).unwrap();
    let cases = [
        (DType::F32, 6e-8, 1e-45),
        (DType::F16, 4.9e-4, 3e-8),
        (DType::BF16, 3.9e-3, 1e-38),
    ];
    for (dtype, rel, abs) in cases {
        let q = rand(&[2, 4, l.len(), 16], 7).to_dtype(dtype).unwrap();
        let k = rand(&[2, 2, l.len(), 16], 8).to_dtype(dtype).unwrap();
        let v = rand(&[2, 2, l.len(), 16], 9).to_dtype(dtype).unwrap();
        let out = reference::attention(&q, &k, &v, &l).unwrap();
        assert_eq!(out.dtype(), dtype);
        let want = naive(&q, &k, &v, 0.25, |i, j| l.can_attend(i, j));
        for (x, y) in flat(&out).iter().zip(&want) {
            assert!(
                (x - y).abs() <= rel * y.abs() + abs,
                "{dtype:?}: {x} vs {y}"
            );
        }
    }
}

#[test]
fn empty_layout_gives_empty_output() {
    let l = KsaLayout::new(KsaConfig::new(8, 1, 2).unwrap(), 0).unwrap();
    let z = Tensor::zeros((2, 4, 0, 16), DType::F32, &Device::Cpu).unwrap();
    let zk = Tensor::zeros((2, 2, 0, 16), DType::F32, &Device::Cpu).unwrap();
    let out = ksa::attention(&z, &zk, &zk, &l).unwrap();
    assert_eq!(out.dims(), &[2, 4, 0, 16]);
}

#[test]
fn interleave_and_take_text_round_trip() {
    let l = KsaLayout::new(KsaConfig::new(3, 2, 1).unwrap(), 8).unwrap();
    let hidden = rand(&[2, 8, 5], 10);
    let summaries = rand(&[2, 5], 11);
    let x = l.interleave(&hidden, &summaries).unwrap();
    assert_eq!(x.dims(), &[2, l.len(), 5]);
    assert_eq!(flat(&l.take_text(&x, 1).unwrap()), flat(&hidden));
    // Every summary slot holds the summary embedding of its index.
    let xs = flat(&x);
    for slot in 0..l.len() {
        if let ksa::SlotKind::Summary { index, .. } = l.slot_kind(slot).unwrap() {
            for bi in 0..2 {
                let row = &xs[(bi * l.len() + slot) * 5..][..5];
                assert_eq!(row, &flat(&summaries)[index * 5..][..5]);
            }
        }
    }
    let s = l.take_summaries(&x, 1).unwrap();
    assert_eq!(s.dims(), &[2, l.summary_len(), 5]);
}
