//! One-run report: decode attention over a host KV cache held in f32 against
//! the same cache held in bf16 and f16 (what `KsaCache` host storage keeps
//! for a bf16/f16 model), read directly by `ksa::cpu::decode::attend`.
//! KSA-4B-base attention shapes (32 query / 8 KV heads of 128, C = 8, S = 1,
//! W = 128), one layer, one new token, all threads.
//!
//! `cargo run --profile bench --example host_cache_report -- [--contexts 4096,32768,131072] [--reps 50]`

use half::{bf16, f16};
use ksa::cpu::decode::{attend, KvSlice};
use ksa::cpu::Element;
use rayon::prelude::*;
use std::hint::black_box;
use std::time::Instant;

const HQ: usize = 32;
const HKV: usize = 8;
const D: usize = 128;
const C: usize = 8;
const S: usize = 1;
const W: usize = 128;

/// Per KV head, `rows` K and V rows in element type `T`.
struct Store<T> {
    k: Vec<Vec<T>>,
    v: Vec<Vec<T>>,
    rows: usize,
}

fn store<T: Element>(rows: usize, seed: usize) -> Store<T> {
    let buf = |s: usize| -> Vec<T> {
        (0..rows * D)
            .map(|i| T::from_f32((((i * 2_654_435_761 + s) >> 7) % 1000) as f32 / 1000.0 - 0.5))
            .collect()
    };
    Store {
        k: (0..HKV).map(|h| buf(seed + h)).collect(),
        v: (0..HKV).map(|h| buf(seed + h + 100)).collect(),
        rows,
    }
}

/// One decode step of one layer: every KV head's query group over the
/// cached summaries and window text.
fn step<T: Element>(q: &[f32], stores: &[Store<T>]) -> Vec<f32> {
    let group = HQ / HKV;
    let scale = 1.0 / (D as f32).sqrt();
    (0..HKV)
        .into_par_iter()
        .flat_map_iter(|g| {
            let slices: Vec<KvSlice<'_, T>> = stores
                .iter()
                .map(|s| KvSlice {
                    k: &s.k[g][..s.rows * D],
                    v: &s.v[g][..s.rows * D],
                })
                .collect();
            let mut out = vec![0.0; group * D];
            let q = &q[g * group * D..(g + 1) * group * D];
            attend(q, D, &slices, scale, &mut out, &mut Vec::new());
            out
        })
        .collect()
}

/// Seconds per step (best of `reps`) and bytes of K/V read per step.
fn time<T: Element>(q: &[f32], n: usize, reps: usize) -> (f64, usize) {
    let text = n.min(W * C + n % C) + 1;
    let sums = S * (n / C).saturating_sub(W);
    let stores = [store::<T>(sums.max(1), 1), store::<T>(text, 2)];
    let bytes = (sums + text) * HKV * D * 2 * std::mem::size_of::<T>();
    black_box(step(q, &stores));
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        black_box(step(q, &stores));
        best = best.min(t.elapsed().as_secs_f64());
    }
    (best, bytes)
}

fn main() {
    let mut contexts = vec![4096usize, 32768, 131072];
    let mut reps = 50usize;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_default();
        match flag.as_str() {
            "--contexts" => {
                contexts = value
                    .split(',')
                    .map(|s| s.trim().parse().expect("--contexts: integers"))
                    .collect()
            }
            "--reps" => reps = value.parse().expect("--reps: an integer"),
            other => {
                eprintln!("unknown argument {other:?}; usage: host_cache_report [--contexts N,N] [--reps R]");
                std::process::exit(2);
            }
        }
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    println!(
        "host KV cache dtype, decode attention of one token, one layer; {cpu}, {} threads, best of {reps}",
        rayon::current_num_threads()
    );
    println!("| context | f32 ms | bf16 ms | f16 ms | f32 MB/step | bf16 MB/step | bf16 vs f32 tokens/s | f16 vs f32 tokens/s |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let q: Vec<f32> = (0..HQ * D).map(|i| (i % 17) as f32 / 17.0 - 0.5).collect();
    for n in contexts {
        let (t32, b32) = time::<f32>(&q, n, reps);
        let (tb, bb) = time::<bf16>(&q, n, reps);
        let (th, _) = time::<f16>(&q, n, reps);
        println!(
            "| {n} | {:.3} | {:.3} | {:.3} | {:.2} | {:.2} | {:.2}x | {:.2}x |",
            t32 * 1e3,
            tb * 1e3,
            th * 1e3,
            b32 as f64 / 1e6,
            bb as f64 / 1e6,
            t32 / tb,
            t32 / th
        );
    }
}
