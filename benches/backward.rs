//! Criterion benchmarks of the CPU backward against the forward: KSA
//! (C = 8, S = 1, W = 128) and the crate's full causal attention at 4K and
//! 16K text tokens, batch 1, 8 query / 2 KV heads, head_dim 128, f32.
//!
//! `forward` is `ksa::attention` on tensors that track no gradient;
//! `forward_backward` runs it on `Var`s and calls `backward()` on the output
//! (candle seeds `dO` with ones), so the backward's cost is the difference.
//! FlashAttention-2's backward costs about 2.5x its forward.
//!
//! `cargo bench --bench backward`; set `KSA_BENCH_BACKWARD_4K_ONLY=1` to skip
//! 16K (full causal's forward + backward takes about 10 s per call on 2
//! cores, so 16K runs about 3 minutes in all). Figures: `docs/training.md`.

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ksa::{KsaConfig, KsaLayout};
use std::time::Duration;

const Q_HEADS: usize = 8;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 128;

fn inputs(len: usize) -> (Var, Var, Var) {
    let r = |h| Var::randn(0f32, 1.0, (1, h, len, HEAD_DIM), &Device::Cpu).unwrap();
    (r(Q_HEADS), r(KV_HEADS), r(KV_HEADS))
}

fn bench(c: &mut Criterion) {
    let sizes: &[usize] = if std::env::var_os("KSA_BENCH_BACKWARD_4K_ONLY").is_some() {
        &[4 << 10]
    } else {
        &[4 << 10, 16 << 10]
    };
    let mut group = c.benchmark_group("backward_vs_forward_f32_8q2kv_d128");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));
    for &n in sizes {
        let layout = KsaLayout::new(KsaConfig::new(8, 1, 128).unwrap(), n).unwrap();
        for (name, len) in [("ksa", layout.len()), ("full_causal", n)] {
            let (q, k, v) = inputs(len);
            let attend = |q: &Tensor, k: &Tensor, v: &Tensor| -> Tensor {
                match name {
                    "ksa" => ksa::attention(q, k, v, &layout).unwrap(),
                    _ => ksa::causal_attention(q, k, v).unwrap(),
                }
            };
            // Detached copies: the forward alone records no graph.
            let (qd, kd, vd) = (
                q.as_detached_tensor(),
                k.as_detached_tensor(),
                v.as_detached_tensor(),
            );
            group.bench_function(BenchmarkId::new(format!("{name}/forward"), n), |b| {
                b.iter(|| attend(&qd, &kd, &vd))
            });
            group.bench_function(
                BenchmarkId::new(format!("{name}/forward_backward"), n),
                |b| b.iter(|| attend(&q, &k, &v).backward().unwrap()),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
