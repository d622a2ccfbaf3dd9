//! Decode attention of one new token over a KSA cache against full
//! attention, at 4K/16K/64K context with `KSA-4B-base` attention shapes (32
//! query / 8 KV heads of 128, C = 8, S = 1, W = 128), one layer, f32, CPU.
//! Prints the K/V bytes each step reads and the bandwidth that implies,
//! against this machine's measured read bandwidth.
//!
//! `cargo bench --bench decode`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ksa::cpu::decode::{attend, KvSlice};
use rayon::prelude::*;
use std::hint::black_box;
use std::time::Instant;

const HQ: usize = 32;
const HKV: usize = 8;
const D: usize = 128;
const C: usize = 8;
const S: usize = 1;
const W: usize = 128;

/// Per KV head: `rows` K and V rows (one contiguous buffer each).
struct Heads {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

fn heads(rows: usize) -> Heads {
    let buf = |seed: usize| -> Vec<f32> {
        (0..rows * D)
            .map(|i| (((i * 2_654_435_761 + seed) >> 7) % 1000) as f32 / 1000.0 - 0.5)
            .collect()
    };
    Heads {
        k: (0..HKV).map(buf).collect(),
        v: (0..HKV).map(|h| buf(h + 100)).collect(),
    }
}

/// One decode step's attention: every KV head's query group over its slices.
fn step(q: &[f32], stores: &[(&Heads, usize)]) -> Vec<f32> {
    let group = HQ / HKV;
    let scale = 1.0 / (D as f32).sqrt();
    (0..HKV)
        .into_par_iter()
        .flat_map_iter(|g| {
            let slices: Vec<KvSlice> = stores
                .iter()
                .map(|(h, rows)| KvSlice {
                    k: &h.k[g][..rows * D],
                    v: &h.v[g][..rows * D],
                })
                .collect();
            let mut out = vec![0.0; group * D];
            attend(
                &q[g * group * D..(g + 1) * group * D],
                D,
                &slices,
                scale,
                &mut out,
                &mut Vec::new(),
            );
            out
        })
        .collect()
}

/// Read bandwidth of this machine: summing a buffer far larger than cache
/// on all threads (best of five).
fn read_bandwidth() -> f64 {
    let buf = vec![1.0f32; 64 << 20];
    let mut best = 0.0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let s: f32 = buf.par_chunks(1 << 16).map(|c| c.iter().sum::<f32>()).sum();
        black_box(s);
        best = best.max((buf.len() * 4) as f64 / t.elapsed().as_secs_f64());
    }
    best
}

fn bench(c: &mut Criterion) {
    let bandwidth = read_bandwidth();
    eprintln!("measured read bandwidth: {:.1} GB/s", bandwidth / 1e9);
    let q: Vec<f32> = (0..HQ * D).map(|i| (i % 17) as f32 / 17.0).collect();
    let mut group = c.benchmark_group("decode_step_one_layer");
    group.sample_size(10);
    group.measurement_time(std::time::Duration::from_secs(2));
    group.warm_up_time(std::time::Duration::from_millis(300));
    for n in [4usize << 10, 16 << 10, 64 << 10] {
        // The token at position n (chunk n/C): window text, own chunk, old summaries.
        let text_rows = n.min(W * C + n % C) + 1;
        let sum_rows = S * (n / C).saturating_sub(W);
        let (text, sums, full) = (heads(text_rows), heads(sum_rows.max(1)), heads(n + 1));
        for (name, stores, rows) in [
            (
                "ksa",
                vec![(&sums, sum_rows), (&text, text_rows)],
                sum_rows + text_rows,
            ),
            ("full", vec![(&full, n + 1)], n + 1),
        ] {
            let bytes = (rows * HKV * D * 2 * 4) as u64;
            group.throughput(Throughput::Bytes(bytes));
            let t = Instant::now();
            let reps = 20;
            for _ in 0..reps {
                black_box(step(&q, &stores));
            }
            let per = t.elapsed().as_secs_f64() / reps as f64;
            eprintln!(
                "{name} n={n}: {rows} keys, {:.2} MB read/step, {:.3} ms/step, {:.1} GB/s ({:.0}% of measured)",
                bytes as f64 / 1e6,
                per * 1e3,
                bytes as f64 / per / 1e9,
                100.0 * bytes as f64 / per / bandwidth
            );
            group.bench_function(format!("{name}/{}K", n >> 10), |b| {
                b.iter(|| black_box(step(&q, &stores)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
