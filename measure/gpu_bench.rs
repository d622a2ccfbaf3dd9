//! Times the crate's attention for `benches/peers.py` and `scripts/gpu-kit.sh`:
//! KSA and full causal prefill on one device, one JSON object per line.
//!
//! `cargo run --release [--features cuda] --example gpu_bench -- [--n 1024]
//!  [--c 8 --s 1 --w 128] [--hq 32 --hkv 8 --d 128] [--reps 5] [--budget-s 4]
//!  [--backward] [--cuda]`
//!
//! On CUDA (feature `cuda` and a GPU): bf16, the fused kernels
//! (`ksa::attention`, `ksa::causal_attention`); `--backward` also times the
//! backward kernels alone (`ksa::cuda::op::backward` on the forward's O and
//! LSE) and prints their time over the forward's. Otherwise the same calls run
//! the CPU path in f32, unless `--cuda` is given: then a missing GPU prints
//! `SKIP (no device: ...)` and one `{"skipped": ...}` line per
//! implementation. Times are medians over `reps` calls, each followed by a
//! device synchronize, after one warm-up call (module load, PTX JIT); fewer
//! calls when one takes more than `budget-s / reps` seconds (at least one).
//! Useful TFLOP/s counts allowed pairs only: `4 * d * pairs * q_heads / time`.

use candle_core::{DType, Device, Tensor};
use ksa::{KsaConfig, KsaLayout};
use std::time::Instant;

const IMPLS: [&str; 2] = ["ksa-crate", "full-causal-crate"];

fn main() -> ksa::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().any(|a| a == name);
    let num = |name: &str, default: f64| -> f64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{name} takes a number, got {v}"))
            })
            .unwrap_or(default)
    };
    let int = |name: &str, default: usize| num(name, default as f64) as usize;
    let n = int("--n", 1024);
    let (c, s, w) = (int("--c", 8), int("--s", 1), int("--w", 128));
    let (hq, hkv, d) = (int("--hq", 32), int("--hkv", 8), int("--d", 128));
    let (reps, budget) = (int("--reps", 5).max(1), num("--budget-s", 4.0));
    let layout = KsaLayout::new(KsaConfig::new(c, s, w)?, n)?;
    let device = match pick_device(flag("--cuda")) {
        Ok(d) => d,
        Err(reason) => {
            eprintln!("SKIP ({reason})");
            for name in IMPLS {
                println!("{{\"impl\": \"{name}\", \"n\": {n}, \"skipped\": \"{reason}\"}}");
            }
            return Ok(());
        }
    };
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
    let time = |f: &dyn Fn() -> ksa::Result<Tensor>| -> ksa::Result<(f64, usize)> {
        let start = Instant::now();
        f()?; // warm-up (module load, JIT)
        device.synchronize()?;
        let first = start.elapsed().as_secs_f64();
        let reps = reps.min(((budget / first.max(1e-9)) as usize).max(1));
        let mut times: Vec<f64> = (0..reps)
            .map(|_| {
                let start = Instant::now();
                f()?;
                device.synchronize()?;
                Ok(start.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<ksa::Result<_>>()?;
        times.sort_by(f64::total_cmp);
        Ok((times[reps / 2], reps))
    };
    let dev = if device.is_cuda() { "cuda" } else { "cpu" };
    let flops = |pairs: u64| 4.0 * d as f64 * pairs as f64 * hq as f64;
    let ksa_mask = ksa::mask::Mask::Ksa(layout);
    let causal_mask = ksa::mask::Mask::Causal { len: n };
    for (name, (q, k, v), pairs, mask) in [
        (
            IMPLS[0],
            (&q, &k, &v),
            layout.pair_counts().total(),
            ksa_mask,
        ),
        (
            IMPLS[1],
            (&qc, &kc, &vc),
            layout.causal_text_pairs(),
            causal_mask,
        ),
    ] {
        let (ms, used) = match mask {
            ksa::mask::Mask::Ksa(_) => time(&|| ksa::attention(q, k, v, &layout))?,
            ksa::mask::Mask::Causal { .. } => time(&|| ksa::causal_attention(q, k, v))?,
        };
        let bwd = if flag("--backward") {
            backward_ms(q, k, v, mask, &time)?
        } else {
            None
        };
        let bwd_fields = bwd.map_or(String::new(), |(b, r)| {
            format!(
                ", \"bwd_ms\": {b:.4}, \"bwd_reps\": {r}, \"bwd_over_fwd\": {:.3}",
                b / ms
            )
        });
        println!(
            "{{\"impl\": \"{name}\", \"device\": \"{dev}\", \"n\": {n}, \"slots\": {}, \"C\": {c}, \"S\": {s}, \"W\": {w}, \"q_heads\": {hq}, \"kv_heads\": {hkv}, \"d\": {d}, \"dtype\": \"{dtype:?}\", \"ms\": {ms:.4}, \"reps\": {used}, \"pairs\": {pairs}, \"tflops\": {:.3}{bwd_fields}}}",
            q.dim(2)?,
            flops(pairs) / (ms * 1e-3) / 1e12
        );
    }
    Ok(())
}

/// The device to time on: the GPU when there is one (feature `cuda`), else the
/// CPU, or the reason there is none when `need_gpu`.
fn pick_device(need_gpu: bool) -> Result<Device, String> {
    #[cfg(feature = "cuda")]
    let gpu = Device::new_cuda(0).map_err(|e| {
        // The first line (candle appends a backtrace when RUST_BACKTRACE is
        // set), without quotes: it goes into a JSON string.
        let e = e.to_string();
        format!(
            "no device: {}",
            e.lines().next().unwrap_or_default().replace('"', "'")
        )
    });
    #[cfg(not(feature = "cuda"))]
    let gpu: Result<Device, String> = Err("no device: built without the cuda feature".into());
    match gpu {
        Ok(d) => Ok(d),
        Err(reason) if need_gpu => Err(reason),
        Err(_) => Ok(Device::Cpu),
    }
}

type Timer<'a> = dyn Fn(&dyn Fn() -> ksa::Result<Tensor>) -> ksa::Result<(f64, usize)> + 'a;

/// The backward kernels alone (median ms, calls), on the forward's O and LSE
/// with a random output gradient; `None` off CUDA.
#[cfg(feature = "cuda")]
fn backward_ms(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: ksa::mask::Mask,
    time: &Timer,
) -> ksa::Result<Option<(f64, usize)>> {
    if !q.device().is_cuda() {
        return Ok(None);
    }
    let (o, lse) = ksa::cuda::op::forward(q, k, v, mask, None)?;
    let dout = Tensor::randn(0f32, 1.0, o.shape(), o.device())?.to_dtype(o.dtype())?;
    let scale = 1.0 / (q.dim(3)? as f32).sqrt();
    let r = time(&|| Ok(ksa::cuda::op::backward(q, k, v, &o, &dout, &lse, mask, scale)?.0))?;
    Ok(Some(r))
}

#[cfg(not(feature = "cuda"))]
fn backward_ms(
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: ksa::mask::Mask,
    _: &Timer,
) -> ksa::Result<Option<(f64, usize)>> {
    Ok(None)
}
