//! One-run report of chunked prefill through `KsaCache` against the model's
//! forward on the random model of `examples/long_context` (4 layers, hidden
//! 512, 8 q / 2 kv heads of 64, C = 8, S = 1), with the example's windows
//! `[128, 128, 128, 16768]` ("KSA") and with every window whole-context
//! ("full"), f32 on the CPU.
//!
//! `cargo run --profile bench --example prefill_report -- [--lens 16384,32768]
//! [--memory-lens 131072] [--chunk 4096] [--skip-full]`
//!
//! For each `--lens` prompt and window set: the time of the forward (embed,
//! every layer, the last row's logits: what `long_context model` runs) and of
//! `KsaCache::append` of the same prompt (`LogitRows::Last`) in chunks of
//! `--chunk`, and each one's peak resident memory beyond what the process
//! held before it (for the cache: beyond its own K/V buffers too). For
//! `--memory-lens` (KSA windows only) the cache prefill alone.

#[path = "random_model.rs"]
mod random_model;

use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use ksa::{KsaCache, LogitRows, Qwen3Ksa};
use random_model::*;
use std::time::Instant;

struct Args {
    lens: Vec<usize>,
    memory_lens: Vec<usize>,
    chunk: usize,
    full: bool,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut args = Args {
        lens: vec![16 << 10, 32 << 10],
        memory_lens: vec![128 << 10],
        chunk: ksa::cache::DEFAULT_PREFILL_CHUNK,
        full: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--lens" => args.lens = usize_list(&flag, &value()?)?,
            "--memory-lens" => args.memory_lens = usize_list(&flag, &value()?)?,
            "--chunk" => args.chunk = value()?.parse().map_err(|e| format!("--chunk: {e}"))?,
            "--skip-full" => args.full = false,
            "-h" | "--help" => {
                return Err("usage: prefill_report [--lens N,..] [--memory-lens N,..] \
                            [--chunk T] [--skip-full]"
                    .into())
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if args.lens.iter().chain(&args.memory_lens).any(|&n| n == 0) {
        return Err("prompt lengths must be at least 1".into());
    }
    Ok(args)
}

/// Seconds of one run: wall, and CPU (all threads; steadier on a shared
/// machine).
#[derive(Clone, Copy)]
struct Secs {
    wall: f64,
    cpu: f64,
}

/// The time of `f` and the peak resident memory it added to what the
/// process held before (0 where Linux does not report it).
fn measured<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Secs, u64)> {
    release_free_memory();
    let before = proc_status_bytes("VmRSS:").unwrap_or(0);
    reset_peak_rss();
    let (start, cpu) = (Instant::now(), cpu_time());
    let out = f()?;
    let secs = Secs {
        wall: start.elapsed().as_secs_f64(),
        cpu: cpu_time() - cpu,
    };
    let peak = proc_status_bytes("VmHWM:").unwrap_or(0);
    Ok((out, secs, peak.saturating_sub(before)))
}

/// The forward of `long_context model`: every layer over the whole prompt,
/// then the last row's logits.
fn forward(model: &Qwen3Ksa, tokens: &[u32]) -> Result<Tensor> {
    let ids = Tensor::from_slice(tokens, (1, tokens.len()), &Device::Cpu)?;
    let (mut h, layout) = model.embed(&ids)?;
    for layer in model.layers() {
        h = layer.forward(&h, &layout)?;
    }
    let last = layout.take_text(&h, 1)?.narrow(1, tokens.len() - 1, 1)?;
    Ok(model.head(&last)?)
}

/// Cache prefill of `tokens`: the last logits and the cache's K/V bytes.
fn prefill(model: &Qwen3Ksa, tokens: &[u32], chunk: usize) -> Result<(Tensor, usize)> {
    let mut cache = KsaCache::new(model, 1)?.with_prefill_chunk(chunk)?;
    let logits = cache.append(model, &[(0, tokens)], LogitRows::Last)?;
    Ok((logits[0].clone(), cache.bytes()))
}

fn main() -> Result<()> {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    println!("CPU: {}", cpu_name());
    println!(
        "random model of long_context, f32; cache prefill in chunks of {} tokens\n",
        args.chunk
    );
    let kinds: Vec<(&str, bool)> = if args.full {
        vec![("KSA", false), ("full", true)]
    } else {
        vec![("KSA", false)]
    };
    let steps = args.lens.len() * kinds.len() * 2 + args.memory_lens.len();
    let bar = ProgressBar::new(steps as u64).with_style(ProgressStyle::with_template(
        "{bar:30} {pos}/{len} [{elapsed_precise}] {msg}",
    )?);
    println!(
        "| prompt | windows | forward s (wall / cpu) | cache prefill s (wall / cpu) \
         | prefill / forward (wall / cpu) | forward peak | cache K/V | prefill peak beyond cache | max |logit diff| |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    // Rows print as they are measured: a long run shows its figures early.
    for &n in &args.lens {
        for &(kind, full) in &kinds {
            let model = model(&windows(4, full), 1)?;
            let tokens = tokens(&model, n, 2);
            bar.set_message(format!("{kind} {n}: forward"));
            let (want, fwd_s, fwd_mem) = measured(|| forward(&model, &tokens))?;
            bar.inc(1);
            bar.set_message(format!("{kind} {n}: cache prefill"));
            let ((got, cache_bytes), pre_s, pre_mem) =
                measured(|| prefill(&model, &tokens, args.chunk))?;
            bar.inc(1);
            // The two paths agree: the same model and prompt, last logits.
            let diff = (got - want.squeeze(0)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            let row = format!(
                "| {n} | {kind} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2}x / {:.2}x | {} | {} | {} | {diff:.1e} |",
                fwd_s.wall,
                fwd_s.cpu,
                pre_s.wall,
                pre_s.cpu,
                pre_s.wall / fwd_s.wall,
                pre_s.cpu / fwd_s.cpu,
                mib(fwd_mem),
                mib(cache_bytes as u64),
                mib(pre_mem.saturating_sub(cache_bytes as u64)),
            );
            bar.suspend(|| println!("{row}"));
        }
    }
    for &n in &args.memory_lens {
        let model = model(&windows(4, false), 1)?;
        let tokens = tokens(&model, n, 2);
        bar.set_message(format!("KSA {n}: cache prefill"));
        let ((_, cache_bytes), pre_s, pre_mem) = measured(|| prefill(&model, &tokens, args.chunk))?;
        bar.inc(1);
        let row = format!(
            "| {n} | KSA | - | {:.2} / {:.2} | - | - | {} | {} | - |",
            pre_s.wall,
            pre_s.cpu,
            mib(cache_bytes as u64),
            mib(pre_mem.saturating_sub(cache_bytes as u64)),
        );
        bar.suspend(|| println!("{row}"));
    }
    bar.finish_and_clear();
    Ok(())
}
