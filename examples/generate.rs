//! Incremental decoding with the KSA cache.
//!
//! `cargo run --release --example generate -- [--model DIR] [--prompt N]
//! [--new N] [--batch B] [--window W] [--storage host|tensors]`
//!
//! Without `--model`, a small random Qwen3-KSA (C = 8, S = 1, window `W` on
//! three of four layers, whole context on every 4th) and the same weights
//! with every window covering the whole context (full attention's cache and
//! reads) are both run: prefill of `--prompt` random tokens (default 2048),
//! then `--new` greedy decode steps (default 32) for `--batch` sequences.
//! Prints tokens/s, cache bytes per layer and the KSA/full ratio, then the
//! KV-cache table of the `KSA-4B-base` shapes at 16K-128K against full
//! attention, computed from the shapes.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ksa::cache::CacheStorage;
use ksa::model_config::LayerKind;
use ksa::{KsaCache, LogitRows, Qwen3Ksa, Qwen3KsaConfig};
use std::collections::HashMap;
use std::time::Instant;

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

struct Args {
    model: Option<String>,
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
        prompt: 2048,
        new: 32,
        batch: 1,
        window: 16,
        storage: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--model" => a.model = Some(value),
            "--prompt" => a.prompt = value.parse()?,
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

/// A small random config in the reference's `config.json` format.
fn random_config(windows: &[usize]) -> AnyResult<Qwen3KsaConfig> {
    let json = format!(
        r#"{{
        "vocab_size": 4097, "hidden_size": 512, "intermediate_size": 1536,
        "num_hidden_layers": {}, "num_attention_heads": 8, "num_key_value_heads": 2,
        "head_dim": 64, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": true, "truncate_predict_nums": 4096, "summary_token_begin": 4096,
        "summary_chunk_size": 8, "summary_token_num": 1,
        "summary_sliding_chunk_num": {windows:?},
        "summary_chunk_position_ids_type": "origin",
        "summary_token_position_ids_type": "last_chunk_slice_right",
        "summary_independent_parameters": true,
        "summary_independent_attention_layernorm": false, "mix_coeff": 0.5
    }}"#,
        windows.len()
    );
    Ok(Qwen3KsaConfig::from_json_str(&json)?)
}

/// Random weights (norms 1, matrices with variance `1/fan_in`), seeded.
fn random_model(config: &Qwen3KsaConfig) -> AnyResult<Qwen3Ksa> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    };
    let mut tensors = HashMap::new();
    for (name, dims) in Qwen3Ksa::expected_tensors(config)? {
        let count: usize = dims.iter().product();
        let data: Vec<f32> = match dims.as_slice() {
            [_] => vec![1.0; count],
            [_, fan_in] => {
                let scale = if name.contains("embed_tokens") {
                    1.0
                } else {
                    3f32.sqrt() / (*fan_in as f32).sqrt()
                };
                (0..count).map(|_| scale * next()).collect()
            }
            _ => unreachable!("weights are vectors or matrices"),
        };
        tensors.insert(name, Tensor::from_vec(data, dims, &Device::Cpu)?);
    }
    Ok(Qwen3Ksa::new(
        config,
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
    )?)
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

fn main() -> AnyResult<()> {
    let args = parse()?;
    let model = match &args.model {
        Some(dir) => Qwen3Ksa::from_folder(dir, DType::F32, &Device::Cpu)?,
        None => {
            let w = args.window;
            random_model(&random_config(&[w, w, w, 16_768])?)?
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
    let full_rate = if args.model.is_none() {
        // Same weights, every window covering the whole context.
        let mut full_cfg = cfg.clone();
        full_cfg.windows = vec![1 << 24; cfg.num_hidden_layers];
        let full = random_model(&full_cfg)?;
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
