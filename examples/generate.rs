//! Text generation and incremental decoding with the KSA cache.
//!
//! ```text
//! cargo run --release --example generate -- --model DIR --prompt "Once upon a time"
//!     [--chat] [--prompt-file FILE] [--new 64] [--dtype f32|bf16|f16]
//!     [--sample TEMPERATURE,TOP_P,SEED] [--max-context N] [--storage host|tensors]
//! cargo run --release --features hub --example generate -- --hub OWNER/NAME --prompt ...
//! cargo run --release --example generate -- [--model DIR] [--random-prompt N] [--new N]
//!     [--batch B] [--window W] [--storage host|tensors]
//! ```
//!
//! With `--prompt` or `--prompt-file`, the folder's tokenizer encodes the
//! text (with `--chat`, rendered by its chat template as a user message),
//! the model continues it (greedy, or `--sample`d), and the text streams to
//! stdout as it is produced, never splitting a character, until an EOS id
//! of the folder or `--new` tokens. Then: prefill and decode tokens/s and
//! the cache's bytes against full attention's.
//!
//! Without a text prompt it measures decoding on random ids. Without
//! `--model`, a small random Qwen3-KSA (C = 8, S = 1, window `W` on three
//! of four layers, whole context on every 4th) and the same weights with
//! every window covering the whole context (full attention's cache and
//! reads) are both run: prefill of `--random-prompt` random tokens (default
//! 2048), then `--new` greedy decode steps (default 32) for `--batch`
//! sequences. Prints tokens/s, cache bytes per layer and the KSA/full ratio,
//! then the KV-cache table of the `KSA-4B-base` shapes at 16K-128K against
//! full attention, computed from the shapes.

#[path = "../measure/random_model.rs"]
mod random_model;

use candle_core::{DType, Device};
use ksa::cache::CacheStorage;
use ksa::model_config::LayerKind;
use ksa::text::{generate_text, ChatMessage, TextTokenizer};
use ksa::{GenerateOptions, KsaCache, LogitRows, Qwen3Ksa, Sampling};
use random_model::{model_from, Shape};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

struct Args {
    model: Option<String>,
    hub: Option<String>,
    text: Option<String>,
    chat: bool,
    dtype: DType,
    sampling: Sampling,
    max_context: Option<usize>,
    prompt: usize,
    new: usize,
    batch: usize,
    window: usize,
    /// The cache's storage; default [`KsaCache::default_storage`] (host
    /// buffers on the CPU). `tensors` on the CPU runs the device path's code
    /// through `ksa::cpu::decode::attend_rows`.
    storage: Option<CacheStorage>,
}

fn parse() -> AnyResult<Args> {
    let mut a = Args {
        model: None,
        hub: None,
        text: None,
        chat: false,
        dtype: DType::F32,
        sampling: Sampling::Greedy,
        max_context: None,
        prompt: 2048,
        new: 32,
        batch: 1,
        window: 16,
        storage: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--chat" {
            a.chat = true;
            continue;
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--model" => a.model = Some(value),
            "--hub" => a.hub = Some(value),
            "--prompt" => a.text = Some(value),
            "--prompt-file" => {
                a.text = Some(std::fs::read_to_string(&value).map_err(|e| format!("{value}: {e}"))?)
            }
            "--dtype" => {
                a.dtype = match value.as_str() {
                    "f32" => DType::F32,
                    "bf16" => DType::BF16,
                    "f16" => DType::F16,
                    "f64" => DType::F64,
                    _ => {
                        return Err(format!("--dtype is f32, bf16, f16 or f64, got {value}").into())
                    }
                }
            }
            "--sample" => {
                let parts: Vec<&str> = value.split(',').collect();
                let [t, p, seed] = parts[..] else {
                    return Err(format!("--sample is TEMPERATURE,TOP_P,SEED, got {value}").into());
                };
                a.sampling = Sampling::TopP {
                    temperature: t.parse()?,
                    top_p: p.parse()?,
                    seed: seed.parse()?,
                };
            }
            "--max-context" => a.max_context = Some(value.parse()?),
            "--random-prompt" => a.prompt = value.parse()?,
            "--new" => a.new = value.parse()?,
            "--batch" => a.batch = value.parse()?,
            "--window" => a.window = value.parse()?,
            "--storage" => {
                a.storage = Some(match value.as_str() {
                    "host" => CacheStorage::Host,
                    "tensors" => CacheStorage::Tensors,
                    _ => return Err(format!("--storage is host or tensors, got {value}").into()),
                })
            }
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    Ok(a)
}

fn human(bytes: f64) -> String {
    let mut v = bytes;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if v < 1024.0 {
            return format!("{v:.1} {unit}");
        }
        v /= 1024.0;
    }
    format!("{v:.1} TiB")
}

/// Prefill plus greedy decode; returns (prefill s, decode tokens/s, cache).
fn run(model: &Qwen3Ksa, args: &Args) -> AnyResult<(f64, f64, KsaCache)> {
    let vocab = model.config().logits_size() as u32;
    let prompts: Vec<Vec<u32>> = (0..args.batch)
        .map(|b| {
            (0..args.prompt)
                .map(|i| ((i * 7919 + b * 104_729) as u32) % vocab)
                .collect()
        })
        .collect();
    let storage = match args.storage {
        Some(s) => s,
        None => KsaCache::default_storage(model)?,
    };
    let mut cache = KsaCache::with_storage(model, args.batch, None, storage)?;
    let start = Instant::now();
    let inputs: Vec<(usize, &[u32])> = prompts.iter().map(|p| &p[..]).enumerate().collect();
    let logits = cache.append(model, &inputs, LogitRows::Last)?;
    let prefill = start.elapsed().as_secs_f64();
    let mut next: Vec<u32> = logits
        .iter()
        .map(|l| l.flatten_all()?.argmax(0)?.to_scalar::<u32>())
        .collect::<candle_core::Result<_>>()?;
    let start = Instant::now();
    for _ in 0..args.new {
        let logits = cache.step(model, &next)?;
        next = logits.argmax(1)?.to_vec1()?;
    }
    let rate = (args.new * args.batch) as f64 / start.elapsed().as_secs_f64();
    Ok((prefill, rate, cache))
}

/// KV-cache bytes of `KSA-4B-base` (36 layers, `([128]*3+[16768]*1)*9`,
/// 8 KV heads of 128, bf16, C = 8, S = 1) for one sequence of `n` tokens.
/// `summaries_on_wide` counts the summaries of whole-context layers too
/// (they are read only once `n > W*C`, but a cache cannot know the future).
fn ksa_4b_bytes(n: usize, summaries_on_wide: bool) -> (f64, f64) {
    let row = (2 * 8 * 128 * 2) as f64; // K and V, 8 heads of 128, bf16
    let (c, s) = (8, 1);
    let (mut ksa, mut full) = (0.0, 0.0);
    for layer in 0..36 {
        let w = if layer % 4 == 3 { 16_768 } else { 128 };
        let text = n.min(w * c + n % c);
        let sums = if w * c >= n && !summaries_on_wide {
            0
        } else {
            s * (n / c)
        };
        ksa += (text + sums) as f64 * row;
        full += n as f64 * row;
    }
    (ksa, full)
}

/// The model folder: `--model`, or `--hub` fetched into the local cache.
fn folder(args: &Args) -> AnyResult<Option<PathBuf>> {
    match (&args.model, &args.hub) {
        (Some(_), Some(_)) => Err("give --model or --hub, not both".into()),
        (Some(dir), None) => Ok(Some(PathBuf::from(dir))),
        #[cfg(feature = "hub")]
        (None, Some(id)) => Ok(Some(ksa::hub::fetch_model(
            id,
            &ksa::hub::HubOptions::from_env(),
        )?)),
        #[cfg(not(feature = "hub"))]
        (None, Some(_)) => {
            Err("--hub needs the `hub` feature (cargo run --features hub ...)".into())
        }
        (None, None) => Ok(None),
    }
}

/// Generates from a text prompt, streaming the text, then prints the speeds
/// and the cache's bytes against full attention's.
fn run_text(model: &Qwen3Ksa, dir: &Path, text: &str, args: &Args) -> AnyResult<()> {
    let tokenizer = TextTokenizer::from_folder(dir)?;
    let prompt = if args.chat {
        tokenizer.encode_chat(&[ChatMessage::user(text)], true)?
    } else {
        tokenizer.encode(text)?
    };
    let storage = match args.storage {
        Some(s) => s,
        None => KsaCache::default_storage(model)?,
    };
    let mut cache = KsaCache::with_storage(model, 1, args.max_context, storage)?;
    let options = GenerateOptions {
        max_new_tokens: args.new,
        sampling: args.sampling,
        stop_tokens: Vec::new(),
    };
    let mut stdout = std::io::stdout();
    let out = generate_text(model, &tokenizer, &mut cache, &prompt, &options, |piece| {
        print!("{piece}");
        // Show each piece as it comes, not when the line buffer fills.
        let _ = stdout.flush();
    })?;
    println!();
    let n = out.tokens.len();
    eprintln!(
        "\nprompt {} tokens: prefill {:.1} tokens/s ({:.2} s); {} generated{}: decode {:.1} tokens/s",
        prompt.len(),
        prompt.len() as f64 / out.prefill_seconds,
        out.prefill_seconds,
        n,
        if out.stopped_at_eos { " (stopped at EOS)" } else { "" },
        n.saturating_sub(1) as f64 / out.decode_seconds.max(1e-9),
    );
    let cfg = model.config();
    let held = cache.seq_len(0)?;
    // Full attention's cache in the element type this cache stores: the
    // model's dtype, except host storage keeps f32 for f32/f64 models.
    let elem = match (cache.storage(), args.dtype) {
        (CacheStorage::Host, DType::F32 | DType::F64) => 4,
        _ => args.dtype.size_in_bytes(),
    };
    let full =
        (held * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * elem) as f64;
    eprintln!(
        "cache after {held} tokens: KSA {} vs full attention {} ({:.2}x)",
        human(cache.bytes() as f64),
        human(full),
        full / cache.bytes() as f64
    );
    Ok(())
}

fn main() -> AnyResult<()> {
    let args = parse()?;
    let dir = folder(&args)?;
    if let Some(text) = &args.text {
        let dir =
            dir.ok_or("a text prompt needs a model folder with its tokenizer (--model DIR)")?;
        let model = Qwen3Ksa::from_folder(&dir, args.dtype, &Device::Cpu)?;
        return run_text(&model, &dir, text, &args);
    }
    // Without --model: the random model of examples/long_context (f32),
    // whose weights the full-attention comparison below reuses.
    let (model, random_weights) = match &dir {
        Some(dir) => (Qwen3Ksa::from_folder(dir, args.dtype, &Device::Cpu)?, None),
        None => {
            let w = args.window;
            let config = Shape::LONG_CONTEXT.config(&[w, w, w, random_model::WHOLE])?;
            let weights = random_model::weights(&config, DType::F32, 0)?;
            (model_from(&config, &weights)?, Some(weights))
        }
    };
    let cfg = model.config().clone();
    println!(
        "model: {} layers, hidden {}, {} q / {} kv heads of {}, C = {}, S = {}, windows {:?}",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.summary_chunk_size,
        cfg.summary_token_num,
        cfg.windows
    );
    let (prefill, rate, cache) = run(&model, &args)?;
    println!(
        "KSA:  prefill {} x {} tokens in {prefill:.2} s; decode {rate:.1} tokens/s (batch {})",
        args.batch, args.prompt, args.batch
    );
    let full_rate = if let Some(weights) = &random_weights {
        // Same weights, every window covering the whole context.
        let mut full_cfg = cfg.clone();
        full_cfg.windows = vec![1 << 24; cfg.num_hidden_layers];
        let full = model_from(&full_cfg, weights)?;
        let (p, r, _) = run(&full, &args)?;
        println!(
            "full: prefill in {p:.2} s; decode {r:.1} tokens/s ({:.2}x KSA's time per token)",
            rate / r
        );
        Some(r)
    } else {
        None
    };
    let n = args.prompt + args.new;
    let row = (2 * cfg.num_key_value_heads * cfg.head_dim * 4 * args.batch) as f64;
    println!("\ncache after {n} tokens (f32), per layer:");
    println!("layer  kind    W         KSA allocated   full attention   ratio");
    let (mut total, mut total_full) = (0.0, 0.0);
    for l in 0..cfg.num_hidden_layers {
        let (bytes, full) = (cache.layer_bytes(l) as f64, n as f64 * row);
        total += bytes;
        total_full += full;
        let kind = match cfg.layer_kinds[l] {
            LayerKind::Summary => "ksa",
            LayerKind::Bypass => "bypass",
        };
        println!(
            "{l:>5}  {kind:<6}  {:<8}  {:>14}  {:>15}  {:>5.2}x",
            cfg.windows[l],
            human(bytes),
            human(full),
            full / bytes
        );
    }
    println!(
        "total  {:>34}  {:>15}  {:>5.2}x",
        human(total),
        human(total_full),
        total_full / total
    );
    if let Some(r) = full_rate {
        println!("decode speed KSA / full: {:.2}x", rate / r);
    }

    println!("\nKSA-4B-base KV cache, one sequence, bf16 (36 layers, 8 KV heads of 128, C = 8, S = 1, W = ([128]*3+[16768]*1)*9):");
    println!(
        "context    full attention        KSA                   ratio   KSA w/o unread summaries"
    );
    for n in [16 << 10, 32 << 10, 64 << 10, 128 << 10] {
        let (ksa, full) = ksa_4b_bytes(n, true);
        let (lean, _) = ksa_4b_bytes(n, false);
        println!(
            "{:>4}K  {:>6.2} GB {:>9}  {:>6.2} GB {:>9}  {:>5.2}x  {:>6.2} GB ({:.2}x)",
            n >> 10,
            full / 1e9,
            human(full),
            ksa / 1e9,
            human(ksa),
            full / ksa,
            lean / 1e9,
            full / lean
        );
    }
    Ok(())
}
