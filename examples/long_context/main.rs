//! KSA over a long context on the CPU.
//!
//! `cargo run --release --example long_context -- [MODE] [options]`
//!
//! Modes:
//! * `attention` (default): one KSA attention forward over random q/k/v in
//!   the interleaved layout of `--len` text tokens; prints time, tokens/s,
//!   peak memory beyond inputs and outputs, and the per-layer decode KV cache
//!   of KSA against full attention for the same shapes.
//! * `model`: a forward pass of a random-weight Qwen3-KSA model (or the
//!   checkpoint folder given with `--model DIR`) over a long context, with a
//!   progress bar over layers; see `model.rs` for its options.
//!
//! Options (attention mode): `--len N` (text tokens, default 32768; `32K`,
//! `128K` work), `--chunk C` (8), `--summaries S` (1), `--window W` (128),
//! `--heads H` (8), `--kv-heads H` (2), `--head-dim D` (128),
//! `--dtype f32|f16|bf16` (f32).

use candle_core::{DType, Device, Tensor};
use ksa::cpu::CpuKernel;
use ksa::{AttentionOptions, KsaConfig, KsaLayout};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

mod model;
// The random model and the process figures, shared with the measurement
// programs (`measure/`), which report on this same model.
#[path = "../../measure/random_model.rs"]
mod random_model;

use random_model::{mib, proc_status_bytes, reset_peak_rss};

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

const USAGE: &str = "usage: long_context [attention] [--len N] [--chunk C] [--summaries S] \
                     [--window W] [--heads H] [--kv-heads H] [--head-dim D] [--dtype f32|f16|bf16]";

/// Options of the attention mode.
struct AttentionArgs {
    len: usize,
    chunk: usize,
    summaries: usize,
    window: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
}

impl Default for AttentionArgs {
    fn default() -> Self {
        Self {
            len: 32 << 10,
            chunk: 8,
            summaries: 1,
            window: 128,
            heads: 8,
            kv_heads: 2,
            head_dim: 128,
            dtype: DType::F32,
        }
    }
}

/// A count with an optional `K` (x1024) or `M` (x1024^2) suffix.
fn parse_count(flag: &str, s: &str) -> Result<usize, String> {
    let (digits, mult) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 1 << 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    digits
        .parse::<usize>()
        .map(|v| v * mult)
        .map_err(|e| format!("{flag} {s:?}: {e}"))
}

fn parse_attention(args: &[String]) -> Result<AttentionArgs, String> {
    let mut out = AttentionArgs::default();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value\n{USAGE}"))?;
        let count = || parse_count(flag, value);
        match flag.as_str() {
            "--len" => out.len = count()?,
            "--chunk" => out.chunk = count()?,
            "--summaries" => out.summaries = count()?,
            "--window" => out.window = count()?,
            "--heads" => out.heads = count()?,
            "--kv-heads" => out.kv_heads = count()?,
            "--head-dim" => out.head_dim = count()?,
            "--dtype" => {
                out.dtype = match value.as_str() {
                    "f32" => DType::F32,
                    "f16" => DType::F16,
                    "bf16" => DType::BF16,
                    other => return Err(format!("--dtype {other:?}: expected f32, f16 or bf16")),
                }
            }
            other => return Err(format!("unknown option {other:?}\n{USAGE}")),
        }
    }
    Ok(out)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}\n\n{}", model::USAGE);
        return;
    }
    // The first argument names the mode unless it is an option.
    // `--model DIR` alone selects the model mode too.
    let (mode, rest) = match args.first() {
        Some(m) if !m.starts_with("--") => (m.as_str(), &args[1..]),
        _ if args.iter().any(|a| a == "--model") => ("model", &args[..]),
        _ => ("attention", &args[..]),
    };
    let result = match mode {
        "attention" => parse_attention(rest)
            .map_err(Into::into)
            .and_then(|a| attention_mode(&a)),
        "model" => model::ModelArgs::parse(rest)
            .map_err(Into::into)
            .and_then(|a| model::run(&a)),
        other => Err(format!("unknown mode {other:?} (modes: attention, model)\n{USAGE}").into()),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Progress bar on stderr, redrawn when the percentage changes.
struct Progress {
    start: Instant,
    shown: AtomicUsize,
}

impl Progress {
    fn update(&self, done: usize, total: usize) {
        let pct = done * 100 / total.max(1);
        if self.shown.fetch_max(pct + 1, Ordering::Relaxed) > pct {
            return;
        }
        let width = 40;
        let filled = pct * width / 100;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r[{}{}] {pct:3}%  {:.1}s",
            "#".repeat(filled),
            "-".repeat(width - filled),
            self.start.elapsed().as_secs_f64()
        );
        if done == total {
            let _ = writeln!(err);
        }
    }
}

fn attention_mode(a: &AttentionArgs) -> AnyResult<()> {
    let layout = KsaLayout::new(KsaConfig::new(a.chunk, a.summaries, a.window)?, a.len)?;
    let big = layout.len();
    let elem = a.dtype.size_in_bytes() as u64;
    println!(
        "KSA attention forward: n = {} text tokens ({} slots), C={} S={} W={}, {} query / {} KV \
         heads, d={}, {:?}, {} threads",
        a.len,
        big,
        a.chunk,
        a.summaries,
        a.window,
        a.heads,
        a.kv_heads,
        a.head_dim,
        a.dtype,
        rayon::current_num_threads()
    );
    let randn = |heads: usize| -> AnyResult<Tensor> {
        Ok(
            Tensor::randn(0f32, 1.0, (1, heads, big, a.head_dim), &Device::Cpu)?
                .to_dtype(a.dtype)?,
        )
    };
    let (q, k, v) = (randn(a.heads)?, randn(a.kv_heads)?, randn(a.kv_heads)?);
    let input_bytes = (a.heads + 2 * a.kv_heads) as u64 * big as u64 * a.head_dim as u64 * elem;
    let output_bytes = a.heads as u64 * big as u64 * (a.head_dim as u64 * elem + 4); // out + lse
    let rss_before = proc_status_bytes("VmRSS:");
    let reset = reset_peak_rss();

    let progress = Progress {
        start: Instant::now(),
        shown: AtomicUsize::new(0),
    };
    let t = Instant::now();
    let (out, _lse) = CpuKernel::default().attention_with_progress(
        &q,
        &k,
        &v,
        &layout,
        &AttentionOptions::default(),
        &|done, total| progress.update(done, total),
    )?;
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(out.dims(), q.dims());

    let pairs = layout.pair_counts().total();
    let full_pairs = layout.causal_text_pairs();
    let gflop = 4.0 * a.head_dim as f64 * pairs as f64 * a.heads as f64 / 1e9;
    println!(
        "time {secs:.3} s, {:.0} text tokens/s, {:.1} useful GFLOP/s ({:.2}x fewer pairs than \
         full causal)",
        a.len as f64 / secs,
        gflop / secs,
        full_pairs as f64 / pairs.max(1) as f64
    );
    match (proc_status_bytes("VmHWM:"), rss_before) {
        (Some(peak), Some(before)) if reset => println!(
            "peak RSS {} (inputs {}, outputs {}); beyond inputs and outputs: {}",
            mib(peak),
            mib(input_bytes),
            mib(output_bytes),
            mib(peak.saturating_sub(before).saturating_sub(output_bytes))
        ),
        (Some(peak), _) => println!(
            "peak RSS of the process {} (peak reset unavailable; inputs {}, outputs {})",
            mib(peak),
            mib(input_bytes),
            mib(output_bytes)
        ),
        _ => println!("peak RSS unavailable on this platform"),
    }
    // Decode cache per layer (docs/spec.md section 5): KSA keeps the current chunk,
    // a ring of W chunks of text and every older chunk's summaries; full
    // attention keeps every token. K and V, all KV heads.
    let per_token = 2 * a.kv_heads as u64 * a.head_dim as u64 * elem;
    let ksa_tokens = (a.chunk + a.window * a.chunk).min(a.len)
        + a.summaries * layout.full_chunks().saturating_sub(a.window);
    println!(
        "KV cache per layer at n = {}: KSA {} ({ksa_tokens} tokens) vs full attention {} ({} \
         tokens): {:.1}x smaller",
        a.len,
        mib(per_token * ksa_tokens as u64),
        mib(per_token * a.len as u64),
        a.len,
        a.len as f64 / ksa_tokens.max(1) as f64
    );
    Ok(())
}
