//! Fine-tunes a Qwen3-KSA model on a UTF-8 text file: next-token
//! cross-entropy over random fixed-length windows of the text, AdamW, all
//! parameters or only the summary ones; a progress bar, a loss plot (SVG),
//! and a checkpoint folder that `Qwen3Ksa::from_folder` and the `generate`
//! example read back.
//!
//! ```text
//! cargo run --release --example finetune -- --text FILE --out DIR
//!     (--model KSA_DIR | --scratch WORK_DIR) [--steps 300] [--len 64] [--batch 8]
//!     [--lr 2e-3] [--only-summary] [--seed 1] [--threads 2] [--plot docs/finetune_loss.svg]
//! ```
//!
//! `--model` starts from a KSA checkpoint folder (e.g. one made by the
//! `convert` example). `--scratch` shows the whole path on a small model
//! instead: it trains a byte-level BPE tokenizer (2048 tokens) on the text,
//! writes a random Qwen3 checkpoint of about 4M parameters with it to
//! `WORK_DIR/qwen3`, converts that with `ksa::convert::qwen3_to_ksa` (C = 8,
//! S = 1, W = 2 chunks with a whole-context layer every 4th) to
//! `WORK_DIR/ksa`, and fine-tunes the result.
//!
//! The last tenth of the text is held out: the loss on it is measured
//! before and after, and greedy continuations of its first words are
//! printed before and after training.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder};
use indicatif::{ProgressBar, ProgressStyle};
use ksa::convert::{qwen3_to_ksa, ConvertOptions, Windows};
use ksa::text::{generate_text, TextTokenizer, TOKENIZER_FILES};
use ksa::{GenerateOptions, KsaCache, Qwen3Ksa};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

struct Args {
    text: PathBuf,
    out: PathBuf,
    model: Option<PathBuf>,
    scratch: Option<PathBuf>,
    steps: usize,
    len: usize,
    batch: usize,
    lr: f64,
    only_summary: bool,
    seed: u64,
    threads: usize,
    plot: String,
}

fn parse() -> AnyResult<Args> {
    let mut a = Args {
        text: PathBuf::new(),
        out: PathBuf::new(),
        model: None,
        scratch: None,
        steps: 300,
        len: 64,
        batch: 8,
        lr: 2e-3,
        only_summary: false,
        seed: 1,
        threads: 2,
        plot: "docs/finetune_loss.svg".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--only-summary" {
            a.only_summary = true;
            continue;
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--text" => a.text = value.into(),
            "--out" => a.out = value.into(),
            "--model" => a.model = Some(value.into()),
            "--scratch" => a.scratch = Some(value.into()),
            "--steps" => a.steps = value.parse()?,
            "--len" => a.len = value.parse()?,
            "--batch" => a.batch = value.parse()?,
            "--lr" => a.lr = value.parse()?,
            "--seed" => a.seed = value.parse()?,
            "--threads" => a.threads = value.parse()?,
            "--plot" => a.plot = value,
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    if a.text.as_os_str().is_empty() || a.out.as_os_str().is_empty() {
        return Err("--text FILE and --out DIR are required".into());
    }
    if a.model.is_some() == a.scratch.is_some() {
        return Err("give one of --model KSA_DIR or --scratch WORK_DIR".into());
    }
    if a.len == 0 || a.batch == 0 || a.steps == 0 {
        return Err("--len, --batch and --steps must be positive".into());
    }
    Ok(a)
}

/// xorshift64*: seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// The `--scratch` path: tokenizer trained on the text, a random small
/// Qwen3 checkpoint, converted to KSA. Returns the KSA folder.
fn scratch(work: &Path, text: &str, seed: u64) -> AnyResult<PathBuf> {
    let qwen3 = work.join("qwen3");
    let ksa_dir = work.join("ksa");
    std::fs::create_dir_all(&qwen3)?;
    let lines: Vec<&str> = text.lines().collect();
    let tokenizer = TextTokenizer::train_byte_level(
        &lines,
        2048,
        &["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    )?;
    tokenizer.save(&qwen3)?;
    let vocab = 2048;
    let (hidden, inter, layers, heads, kv, d) = (256, 768, 4, 8, 4, 32);
    let config = serde_json::json!({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": d, "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": true, "attention_bias": false, "eos_token_id": 0,
        "bos_token_id": 0, "sliding_window": null, "use_sliding_window": false,
        "max_window_layers": layers,
    });
    std::fs::write(
        qwen3.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    let mut rng = Rng(seed | 1);
    let mut tensors = HashMap::new();
    let mut add = |name: String, dims: Vec<usize>| -> candle_core::Result<()> {
        let n: usize = dims.iter().product();
        let data: Vec<f32> = if dims.len() == 1 {
            vec![1.0; n]
        } else {
            // Small tied embeddings (near-uniform first logits); matrices
            // scaled by 1/sqrt(fan_in).
            let scale = if name.contains("embed") {
                0.1
            } else {
                1.0 / (dims[1] as f32).sqrt()
            };
            (0..n).map(|_| scale * rng.uniform()).collect()
        };
        tensors.insert(name, Tensor::from_vec(data, dims, &Device::Cpu)?);
        Ok(())
    };
    add("model.embed_tokens.weight".into(), vec![vocab, hidden])?;
    add("model.norm.weight".into(), vec![hidden])?;
    for l in 0..layers {
        let p = |n: &str| format!("model.layers.{l}.{n}.weight");
        for (name, dims) in [
            ("input_layernorm", vec![hidden]),
            ("post_attention_layernorm", vec![hidden]),
            ("self_attn.q_proj", vec![heads * d, hidden]),
            ("self_attn.k_proj", vec![kv * d, hidden]),
            ("self_attn.v_proj", vec![kv * d, hidden]),
            ("self_attn.o_proj", vec![hidden, heads * d]),
            ("self_attn.q_norm", vec![d]),
            ("self_attn.k_norm", vec![d]),
            ("mlp.gate_proj", vec![inter, hidden]),
            ("mlp.up_proj", vec![inter, hidden]),
            ("mlp.down_proj", vec![hidden, inter]),
        ] {
            add(p(name), dims)?;
        }
    }
    candle_core::safetensors::save(&tensors, qwen3.join("model.safetensors"))?;
    let _ = std::fs::remove_dir_all(&ksa_dir);
    let options = ConvertOptions {
        windows: Windows::Hybrid {
            window: 2,
            whole_every: 4,
        },
        ..ConvertOptions::default()
    };
    qwen3_to_ksa(&qwen3, &ksa_dir, &options)?;
    Ok(ksa_dir)
}

/// The model of `dir` with every weight a trainable `Var` (f32).
fn load_trainable(dir: &Path) -> AnyResult<(Qwen3Ksa, Vec<(String, Var)>)> {
    let model = Qwen3Ksa::from_folder(dir, DType::F32, &Device::Cpu)?;
    let config = model.config().clone();
    let mut files = vec![];
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            files.push(path);
        }
    }
    let mut stored = HashMap::new();
    for f in files {
        stored.extend(candle_core::safetensors::load(f, &Device::Cpu)?);
    }
    let mut vars = Vec::new();
    let mut tensors = HashMap::new();
    for (name, _) in Qwen3Ksa::expected_tensors(&config)? {
        let t = stored
            .remove(&name)
            .ok_or(format!("{name} missing"))?
            .to_dtype(DType::F32)?;
        let var = Var::from_tensor(&t)?;
        tensors.insert(name.clone(), var.as_tensor().clone());
        vars.push((name, var));
    }
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    Ok((Qwen3Ksa::new(&config, vb)?, vars))
}

/// `batch` random windows of `len + 1` tokens: inputs `[b, len]`, targets `[b*len]`.
fn batch(
    tokens: &[u32],
    rng: &mut Rng,
    b: usize,
    len: usize,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (mut ids, mut targets) = (Vec::with_capacity(b * len), Vec::with_capacity(b * len));
    for _ in 0..b {
        let start = rng.below(tokens.len() - len);
        ids.extend_from_slice(&tokens[start..start + len]);
        targets.extend_from_slice(&tokens[start + 1..start + len + 1]);
    }
    Ok((
        Tensor::from_vec(ids, (b, len), &Device::Cpu)?,
        Tensor::from_vec(targets, b * len, &Device::Cpu)?,
    ))
}

fn loss(model: &Qwen3Ksa, ids: &Tensor, targets: &Tensor) -> ksa::Result<Tensor> {
    let logits = model.forward(ids)?;
    let (b, n, v) = logits.dims3()?;
    Ok(candle_nn::loss::cross_entropy(
        &logits.reshape((b * n, v))?,
        targets,
    )?)
}

/// Mean loss over consecutive windows of the held-out tokens.
fn eval_loss(model: &Qwen3Ksa, tokens: &[u32], len: usize) -> ksa::Result<f64> {
    let (mut sum, mut count) = (0.0, 0);
    for start in (0..tokens.len().saturating_sub(len + 1))
        .step_by(len)
        .take(16)
    {
        let ids = Tensor::new(&tokens[start..start + len], &Device::Cpu)?.unsqueeze(0)?;
        let targets = Tensor::new(&tokens[start + 1..start + len + 1], &Device::Cpu)?;
        sum += loss(model, &ids, &targets)?.to_scalar::<f32>()? as f64;
        count += 1;
    }
    Ok(sum / count.max(1) as f64)
}

/// A greedy continuation of `prompt` (48 tokens).
fn sample(model: &Qwen3Ksa, tokenizer: &TextTokenizer, prompt: &str) -> ksa::Result<String> {
    let ids = tokenizer.encode(prompt)?;
    let mut cache = KsaCache::new(model, 1)?;
    let options = GenerateOptions {
        max_new_tokens: 48,
        ..Default::default()
    };
    Ok(generate_text(model, tokenizer, &mut cache, &ids, &options, |_| {})?.text)
}

/// Writes the trained weights with the folder's config and tokenizer files.
fn save(vars: &[(String, Var)], from: &Path, out: &Path) -> AnyResult<()> {
    std::fs::create_dir_all(out)?;
    let tensors: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&tensors, out.join("model.safetensors"))?;
    for name in TOKENIZER_FILES.iter().chain(&["config.json"]) {
        if from.join(name).is_file() {
            std::fs::copy(from.join(name), out.join(name))?;
        }
    }
    Ok(())
}

fn plot(path: &str, losses: &[f32], evals: &[(usize, f64)], title: &str) -> AnyResult<()> {
    use plotters::prelude::*;
    if let Some(dir) = Path::new(path).parent() {
        std::fs::create_dir_all(dir)?;
    }
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let k = (losses.len() / 30).max(1);
    let smooth: Vec<(f64, f64)> = (0..losses.len())
        .map(|i| {
            let w = &losses[i.saturating_sub(k - 1)..=i];
            (i as f64, w.iter().sum::<f32>() as f64 / w.len() as f64)
        })
        .collect();
    let hi = losses.iter().copied().fold(0f32, f32::max) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..losses.len() as f64, 0f64..hi * 1.05)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("next-token cross-entropy (nats)")
        .draw()?;
    chart
        .draw_series(LineSeries::new(smooth, BLUE.stroke_width(2)))?
        .label(format!("training batches (mean of last {k} steps)"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(
            evals
                .iter()
                .map(|&(s, l)| Circle::new((s as f64, l), 5, RED.filled())),
        )?
        .label("held-out tenth of the text")
        .legend(|(x, y)| Circle::new((x + 10, y), 5, RED.filled()));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() -> AnyResult<()> {
    let args = parse()?;
    // Before any candle op: candle's matmuls and rayon size their pools from it.
    std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    let text = std::fs::read_to_string(&args.text)
        .map_err(|e| format!("{}: {e} (a UTF-8 text file is needed)", args.text.display()))?;
    let dir = match (&args.model, &args.scratch) {
        (Some(dir), _) => dir.clone(),
        (None, Some(work)) => scratch(work, &text, args.seed)?,
        (None, None) => unreachable!("checked in parse"),
    };
    let tokenizer = TextTokenizer::from_folder(&dir)?;
    let tokens = tokenizer.encode(&text)?;
    let split = tokens.len() * 9 / 10;
    let (train, held_out) = tokens.split_at(split);
    if train.len() <= args.len + 1 || held_out.len() <= args.len + 1 {
        return Err(format!(
            "the text has {} tokens: too short for windows of {}",
            tokens.len(),
            args.len
        )
        .into());
    }
    let (model, vars) = load_trainable(&dir)?;
    let cfg = model.config().clone();
    let params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    println!(
        "{}: {} bytes, {} tokens ({} train, {} held out); model {:.2}M parameters, C = {}, S = {}, windows {:?}",
        args.text.display(),
        text.len(),
        tokens.len(),
        train.len(),
        held_out.len(),
        params as f64 / 1e6,
        cfg.summary_chunk_size,
        cfg.summary_token_num,
        cfg.windows
    );
    // The summary parameters: projections, their norm, and the summary rows
    // of the embedding table (the text rows' gradient is masked out).
    let is_summary = |n: &str| n.contains("_summary.") || n == "model.embed_tokens.weight";
    let trained: Vec<Var> = vars
        .iter()
        .filter(|(n, _)| !args.only_summary || is_summary(n))
        .map(|(_, v)| v.clone())
        .collect();
    let embed = vars
        .iter()
        .find(|(n, _)| n == "model.embed_tokens.weight")
        .map(|(_, v)| v.clone())
        .ok_or("no embedding table")?;
    let row_mask = {
        let rows = cfg.vocab_size;
        let mask: Vec<f32> = (0..rows)
            .map(|r| {
                if r >= cfg.summary_token_begin {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(mask, (rows, 1), &Device::Cpu)?
    };
    println!(
        "training {} parameter tensors ({}), AdamW lr {}, {} steps of {} x {} tokens",
        trained.len(),
        if args.only_summary {
            "summary only"
        } else {
            "all"
        },
        args.lr,
        args.steps,
        args.batch,
        args.len
    );
    // The first words of the held-out tokens: text no training window saw.
    let prompt: String = tokenizer
        .decode(&held_out[..held_out.len().min(40)])?
        .split_whitespace()
        .skip(1) // the first word may be cut by the split
        .take(6)
        .collect::<Vec<_>>()
        .join(" ");
    let before = sample(&model, &tokenizer, &prompt)?;
    let eval_before = eval_loss(&model, held_out, args.len)?;
    println!("held-out loss before: {eval_before:.3}");

    let mut opt = AdamW::new(
        trained,
        ParamsAdamW {
            lr: args.lr,
            // No decay when only summaries train: decay would shrink the
            // (frozen, zero-gradient) text rows of the embedding table too.
            weight_decay: if args.only_summary { 0.0 } else { 0.01 },
            ..Default::default()
        },
    )?;
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(ProgressStyle::with_template(
        "{elapsed_precise} [{bar:40}] {pos}/{len} {msg} (eta {eta})",
    )?);
    let mut rng = Rng(args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut losses = Vec::with_capacity(args.steps);
    let start = Instant::now();
    let warmup = (args.steps / 10).max(1);
    for step in 0..args.steps {
        // Linear warmup, then cosine decay to a tenth of the peak.
        let lr = if step < warmup {
            args.lr * (step + 1) as f64 / warmup as f64
        } else {
            let t = (step - warmup) as f64 / (args.steps - warmup).max(1) as f64;
            args.lr * (0.1 + 0.45 * (1.0 + (std::f64::consts::PI * t).cos()))
        };
        opt.set_learning_rate(lr);
        let (ids, targets) = batch(train, &mut rng, args.batch, args.len)?;
        let l = loss(&model, &ids, &targets)?;
        let mut grads = l.backward()?;
        if args.only_summary {
            if let Some(g) = grads.remove(embed.as_tensor()) {
                grads.insert(embed.as_tensor(), g.broadcast_mul(&row_mask)?);
            }
        }
        opt.step(&grads)?;
        let l = l.to_scalar::<f32>()?;
        losses.push(l);
        bar.set_message(format!("loss {l:.3}"));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let eval_after = eval_loss(&model, held_out, args.len)?;
    let after = sample(&model, &tokenizer, &prompt)?;
    let head = |xs: &[f32]| xs.iter().take(10).sum::<f32>() / xs.len().min(10) as f32;
    let tail = &losses[losses.len().saturating_sub(10)..];
    println!(
        "{} steps in {seconds:.0} s ({:.2} s/step); training loss first {:.3} (mean of 10: {:.3}), last {:.3} (mean of 10: {:.3})",
        args.steps,
        seconds / args.steps as f64,
        losses[0],
        head(&losses),
        losses[losses.len() - 1],
        tail.iter().sum::<f32>() / tail.len() as f32
    );
    println!("held-out loss: {eval_before:.3} -> {eval_after:.3}");

    save(&vars, &dir, &args.out)?;
    // What was saved is what was trained: reload and compare logits.
    let (ids, _) = batch(held_out, &mut rng, 1, args.len)?;
    let reloaded = Qwen3Ksa::from_folder(&args.out, DType::F32, &Device::Cpu)?;
    let diff = (reloaded.forward(&ids)? - model.forward(&ids)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    println!(
        "saved to {} (reloaded logits differ by {diff:.1e})",
        args.out.display()
    );
    println!("prompt (held out): {prompt:?}");
    println!("before: {before:?}");
    println!("after:  {after:?}");
    let title = format!(
        "Fine-tuning on {} ({} steps, {} x {} tokens, {})",
        args.text
            .file_name()
            .map(|f| f.to_string_lossy())
            .unwrap_or_default(),
        args.steps,
        args.batch,
        args.len,
        if args.only_summary {
            "summary parameters"
        } else {
            "all parameters"
        }
    );
    plot(
        &args.plot,
        &losses,
        &[(0, eval_before), (args.steps, eval_after)],
        &title,
    )?;
    println!("loss plot written to {}", args.plot);
    Ok(())
}
