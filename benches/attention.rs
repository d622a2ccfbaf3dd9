//! Criterion benchmarks: KSA (C = 8, S = 1, W = 128 and W = 16) against the
//! crate's full causal attention and candle's plain matmul-softmax-matmul,
//! batch 1, 8 query / 2 KV heads, head_dim 128, f32.
//!
//! `cargo bench --bench attention` runs n in {1K, 4K, 16K, 64K} for KSA, full
//! causal up to 16K and candle's dense path up to 4K (its `8 x n x n` f32
//! scores stop fitting comfortably in memory beyond). Full causal at 64K
//! takes about a minute per call on 2 cores; set `KSA_BENCH_FULL_64K=1` to
//! include it. `measure/bench_report.rs` is the one-run table.

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ksa::{KsaConfig, KsaLayout};
use std::time::Duration;

const Q_HEADS: usize = 8;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 128;
const SIZES: [usize; 4] = [1 << 10, 4 << 10, 16 << 10, 64 << 10];

fn inputs(len: usize) -> (Tensor, Tensor, Tensor) {
    let r = |h| Tensor::randn(0f32, 1.0, (1, h, len, HEAD_DIM), &Device::Cpu).unwrap();
    (r(Q_HEADS), r(KV_HEADS), r(KV_HEADS))
}

/// Causal attention the way a plain candle user writes it: repeat the KV
/// heads, full scores, additive mask, softmax, matmul.
fn candle_dense(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    let (_, _, n, d) = q.dims4()?;
    let rep = |x: &Tensor| {
        x.unsqueeze(2)?
            .broadcast_as((1, KV_HEADS, Q_HEADS / KV_HEADS, n, d))?
            .reshape((1, Q_HEADS, n, d))
    };
    let (k, v) = (rep(k)?, rep(v)?);
    let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(bias)?;
    candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)
}

fn causal_bias(n: usize) -> Tensor {
    let bias: Vec<f32> = (0..n * n)
        .map(|i| {
            if i % n <= i / n {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    Tensor::from_vec(bias, (n, n), &Device::Cpu).unwrap()
}

fn bench(c: &mut Criterion) {
    let full_64k = std::env::var_os("KSA_BENCH_FULL_64K").is_some();
    let mut group = c.benchmark_group("attention_f32_8q2kv_d128");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for n in SIZES {
        for window in [128, 16] {
            let layout = KsaLayout::new(KsaConfig::new(8, 1, window).unwrap(), n).unwrap();
            let (q, k, v) = inputs(layout.len());
            group.throughput(Throughput::Elements(n as u64));
            group.bench_function(BenchmarkId::new(format!("ksa_w{window}"), n), |b| {
                b.iter(|| ksa::attention(&q, &k, &v, &layout).unwrap())
            });
        }
        let (q, k, v) = inputs(n);
        if n <= 16 << 10 || full_64k {
            group.bench_function(BenchmarkId::new("full_causal", n), |b| {
                b.iter(|| ksa::causal_attention(&q, &k, &v).unwrap())
            });
        }
        if n <= 4 << 10 {
            let bias = causal_bias(n);
            group.bench_function(BenchmarkId::new("candle_dense_causal", n), |b| {
                b.iter(|| candle_dense(&q, &k, &v, &bias).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
