//! Times the crate's attention for `benches/peers.py`: KSA and full causal on
//! one device, printing one JSON object per line.
//!
//! `cargo run --release [--features cuda] --example gpu_bench -- N_TEXT [C S W HQ HKV D REPS]`
//!
//! On CUDA (feature `cuda` and a GPU): bf16, the fused kernel in both modes
//! (`ksa::attention`, `ksa::causal_attention`). Otherwise the same calls run
//! the CPU path in f32.

use candle_core::{DType, Device, Tensor};
use ksa::{KsaConfig, KsaLayout};
use std::time::Instant;

fn main() -> ksa::Result<()> {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("integer argument"))
        .collect();
    let get = |i: usize, d: usize| a.get(i).copied().unwrap_or(d);
    let (n, c, s, w) = (get(0, 1024), get(1, 8), get(2, 1), get(3, 128));
    let (hq, hkv, d, reps) = (get(4, 32), get(5, 8), get(6, 128), get(7, 5));
    let layout = KsaLayout::new(KsaConfig::new(c, s, w)?, n)?;
    #[cfg(feature = "cuda")]
    let device = Device::new_cuda(0).unwrap_or(Device::Cpu);
    #[cfg(not(feature = "cuda"))]
    let device = Device::Cpu;
    let dtype = if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    };
    let big = layout.len();
    let q = Tensor::randn(0f32, 1.0, (1, hq, big, d), &device)?.to_dtype(dtype)?;
    let k = Tensor::randn(0f32, 1.0, (1, hkv, big, d), &device)?.to_dtype(dtype)?;
    let v = Tensor::randn(0f32, 1.0, (1, hkv, big, d), &device)?.to_dtype(dtype)?;
    let (qc, kc, vc) = (
        q.narrow(2, 0, n)?.contiguous()?,
        k.narrow(2, 0, n)?.contiguous()?,
        v.narrow(2, 0, n)?.contiguous()?,
    );
    let sync = |_: &Tensor| -> ksa::Result<()> { Ok(device.synchronize()?) };
    let time = |f: &dyn Fn() -> ksa::Result<Tensor>| -> ksa::Result<f64> {
        let out = f()?; // warm-up (module load, JIT)
        sync(&out)?;
        let start = Instant::now();
        for _ in 0..reps {
            let out = f()?;
            sync(&out)?;
        }
        Ok(start.elapsed().as_secs_f64() * 1e3 / reps as f64)
    };
    let ksa_ms = time(&|| ksa::attention(&q, &k, &v, &layout))?;
    let causal_ms = time(&|| ksa::causal_attention(&qc, &kc, &vc))?;
    let dev = if device.is_cuda() { "cuda" } else { "cpu" };
    let flops = |pairs: u64| 4.0 * d as f64 * pairs as f64 * hq as f64;
    let pairs_ksa = layout.pair_counts().total();
    let pairs_full = layout.causal_text_pairs();
    for (name, ms, pairs) in [
        ("ksa-crate", ksa_ms, pairs_ksa),
        ("full-causal-crate", causal_ms, pairs_full),
    ] {
        println!(
            "{{\"impl\": \"{name}\", \"device\": \"{dev}\", \"n\": {n}, \"slots\": {big}, \"ms\": {ms:.4}, \"pairs\": {pairs}, \"tflops\": {:.3}}}",
            flops(pairs) / (ms * 1e-3) / 1e12
        );
    }
    Ok(())
}
