//! Trains a tiny Qwen3-KSA on CPU (candle-nn's AdamW) on a synthetic
//! associative-recall task whose answer lies beyond every layer's window,
//! and compares three variants with the same budget, seed and data:
//!
//! * `ksa`: KSA (C = 8, W = 2), text reads old chunks' summaries;
//! * `sliding`: the same model with old summaries masked out
//!   (`summary_reads = false`: pure sliding-chunk attention over text);
//! * `full`: every layer's window covers every chunk (full causal attention).
//!
//! A sequence holds `pairs` key/value pairs, one per chunk at the start (a
//! key token and its value token at a random offset inside the chunk, filler
//! around them), then filler, then every key asked once in random order as
//! `key value` in the last `2 * pairs` tokens: at each asked key the model
//! must output its value. Loss and accuracy are on those predictions only.
//! The pairs lie more than `W` chunks before every query, so only summaries
//! (or full attention) can carry them.
//!
//! ```text
//! cargo run --release --example train_recall -- [--steps 600] [--seed 1] [--len 192]
//!     [--batch 16] [--lr 3e-3] [--pairs 4] [--summaries 1] [--eval 512]
//!     [--threads 1] [--plot docs/train_recall_loss.svg]
//! ```
//!
//! One thread by default: the tensors are so small that more threads mostly
//! add synchronisation (and on a shared machine, spinning against other jobs).

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder};
use indicatif::{ProgressBar, ProgressStyle};
use ksa::model_config::LayerKind;
use ksa::{Qwen3Ksa, Qwen3KsaConfig, SummaryPositions, TextPositions};
use std::collections::HashMap;
use std::time::Instant;

const CHUNK: usize = 8;
const WINDOW: usize = 2;
const KEYS: usize = 16;
const VALUES: usize = 16;
const FILLER: usize = 16;
/// Text vocabulary: keys, then values, then filler tokens.
const TEXT_VOCAB: usize = KEYS + VALUES + FILLER;

#[derive(Debug, Clone)]
struct Args {
    steps: usize,
    seed: u64,
    len: usize,
    batch: usize,
    lr: f64,
    pairs: usize,
    summaries: usize,
    eval: usize,
    threads: usize,
    plot: String,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        steps: 600,
        seed: 1,
        len: 192,
        batch: 16,
        lr: 3e-3,
        pairs: 4,
        summaries: 1,
        eval: 512,
        threads: 1,
        plot: "docs/train_recall_loss.svg".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--steps" => a.steps = value.parse().map_err(|e| bad(&e))?,
            "--seed" => a.seed = value.parse().map_err(|e| bad(&e))?,
            "--len" => a.len = value.parse().map_err(|e| bad(&e))?,
            "--batch" => a.batch = value.parse().map_err(|e| bad(&e))?,
            "--lr" => a.lr = value.parse().map_err(|e| bad(&e))?,
            "--pairs" => a.pairs = value.parse().map_err(|e| bad(&e))?,
            "--summaries" => a.summaries = value.parse().map_err(|e| bad(&e))?,
            "--eval" => a.eval = value.parse().map_err(|e| bad(&e))?,
            "--threads" => a.threads = value.parse().map_err(|e| bad(&e))?,
            "--plot" => a.plot = value,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    // The first query's chunk and the W chunks before it must not hold any
    // pair, or the task would not test reach beyond the window.
    let first_query_chunk = a.len.saturating_sub(2 * a.pairs) / CHUNK;
    if a.pairs == 0 || a.pairs > KEYS || first_query_chunk < a.pairs + WINDOW {
        return Err(format!(
            "need 1 <= pairs <= {KEYS} and len >= {} for {} pairs (C = {CHUNK}, W = {WINDOW})",
            (a.pairs + WINDOW) * CHUNK + 2 * a.pairs,
            a.pairs
        ));
    }
    Ok(a)
}

/// SplitMix64: deterministic data and weights from the seed.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Uniform in `[-1, 1)`.
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// A batch of sequences `[b, len]` and, for each sequence, the value each
/// query must recall `[b * pairs]` (query-major within a sequence).
fn batch(
    rng: &mut Rng,
    b: usize,
    len: usize,
    pairs: usize,
) -> candle_core::Result<(Tensor, Tensor)> {
    let mut ids = Vec::with_capacity(b * len);
    let mut targets = Vec::with_capacity(b * pairs);
    for _ in 0..b {
        let mut seq: Vec<u32> = (0..len)
            .map(|_| (KEYS + VALUES + rng.below(FILLER)) as u32)
            .collect();
        // Distinct keys (a partial Fisher-Yates shuffle), any values.
        let mut keys: Vec<usize> = (0..KEYS).collect();
        let mut values = Vec::with_capacity(pairs);
        for p in 0..pairs {
            keys.swap(p, p + rng.below(KEYS - p));
            let value = rng.below(VALUES);
            values.push(value);
            let at = p * CHUNK + rng.below(CHUNK - 1);
            seq[at] = keys[p] as u32;
            seq[at + 1] = (KEYS + value) as u32;
        }
        // Every key is asked once, in random order, as `key value` at the end.
        let mut order: Vec<usize> = (0..pairs).collect();
        for i in (1..pairs).rev() {
            order.swap(i, rng.below(i + 1));
        }
        for (i, &p) in order.iter().enumerate() {
            let at = len - 2 * pairs + 2 * i;
            seq[at] = keys[p] as u32;
            seq[at + 1] = (KEYS + values[p]) as u32;
            targets.push((KEYS + values[p]) as u32);
        }
        ids.extend(seq);
    }
    Ok((
        Tensor::from_vec(ids, (b, len), &Device::Cpu)?,
        Tensor::from_vec(targets, b * pairs, &Device::Cpu)?,
    ))
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Variant {
    Ksa,
    Sliding,
    Full,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Ksa => "KSA (summaries, W = 2)",
            Variant::Sliding => "sliding chunks (summaries masked, W = 2)",
            Variant::Full => "full causal (W covers every chunk)",
        }
    }
}

fn model_config(variant: Variant, args: &Args) -> Qwen3KsaConfig {
    let layers = 2;
    let window = match variant {
        Variant::Full => args.len.div_ceil(CHUNK),
        _ => WINDOW,
    };
    Qwen3KsaConfig {
        vocab_size: TEXT_VOCAB + args.summaries,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: layers,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        tie_word_embeddings: true,
        truncate_predict_nums: TEXT_VOCAB,
        summary_chunk_size: CHUNK,
        summary_token_num: args.summaries,
        summary_token_begin: TEXT_VOCAB,
        windows: vec![window; layers],
        layer_kinds: vec![LayerKind::Summary; layers],
        text_positions: TextPositions::Origin,
        summary_positions: SummaryPositions::LastChunkSliceRight,
        summary_independent_parameters: true,
        summary_independent_attention_layernorm: false,
        mix_coeff: 0.5,
        summary_reads: variant != Variant::Sliding,
    }
}

/// The model with fresh weights (same seed, so every variant starts from the
/// same numbers) and its trainable variables.
fn init_model(config: &Qwen3KsaConfig, seed: u64) -> ksa::Result<(Qwen3Ksa, Vec<Var>)> {
    let mut rng = Rng(seed ^ 0x5EED);
    let mut tensors = HashMap::new();
    let mut vars = Vec::new();
    for (name, dims) in Qwen3Ksa::expected_tensors(config)? {
        let n: usize = dims.iter().product();
        let data: Vec<f32> = if dims.len() == 1 {
            vec![1.0; n] // RMSNorm weights
        } else {
            // Tied embeddings small (they are also the LM head: initial
            // logits near uniform); matrices scaled by 1/sqrt(fan_in).
            let scale = if name.contains("embed_tokens") {
                0.1
            } else {
                1.0 / (dims[1] as f32).sqrt()
            };
            (0..n).map(|_| scale * rng.uniform()).collect()
        };
        let var = Var::from_tensor(&Tensor::from_vec(data, dims, &Device::Cpu)?)?;
        tensors.insert(name, var.as_tensor().clone());
        vars.push(var);
    }
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    Ok((Qwen3Ksa::new(config, vb)?, vars))
}

/// Logits at the query keys `[b * pairs, V']` (each predicts its value).
fn query_logits(model: &Qwen3Ksa, ids: &Tensor, pairs: usize) -> ksa::Result<Tensor> {
    let (mut h, layout) = model.embed(ids)?;
    for layer in model.layers() {
        h = layer.forward(&h, &layout)?;
    }
    let n = layout.text_len();
    let slots: Vec<u32> = (0..pairs)
        .map(|i| {
            layout
                .text_slot(n - 2 * pairs + 2 * i)
                .expect("query inside the sequence") as u32
        })
        .collect();
    let slots = Tensor::from_vec(slots, pairs, ids.device())?;
    let logits = model.head(&h.index_select(&slots, 1)?)?;
    let (b, _, v) = logits.dims3()?;
    Ok(logits.reshape((b * pairs, v))?)
}

fn accuracy(model: &Qwen3Ksa, data: &[(Tensor, Tensor)], pairs: usize) -> ksa::Result<f64> {
    let (mut right, mut total) = (0usize, 0usize);
    for (ids, targets) in data {
        let predicted = query_logits(model, ids, pairs)?.argmax(D::Minus1)?;
        right += predicted
            .eq(targets)?
            .to_dtype(DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()? as usize;
        total += targets.dim(0)?;
    }
    Ok(right as f64 / total as f64)
}

struct Run {
    variant: Variant,
    losses: Vec<f32>,
    accuracy: f64,
    seconds: f64,
}

fn train(
    variant: Variant,
    args: &Args,
    eval: &[(Tensor, Tensor)],
    bar: &ProgressBar,
) -> ksa::Result<Run> {
    let start = Instant::now();
    let config = model_config(variant, args);
    let (model, vars) = init_model(&config, args.seed)?;
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: args.lr,
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;
    // The same training batches for every variant.
    let mut rng = Rng(args.seed);
    let mut losses = Vec::with_capacity(args.steps);
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
        let (ids, targets) = batch(&mut rng, args.batch, args.len, args.pairs)?;
        let logits = query_logits(&model, &ids, args.pairs)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &targets)?;
        opt.backward_step(&loss)?;
        let loss = loss.to_scalar::<f32>()?;
        losses.push(loss);
        bar.set_message(format!("{:<8} loss {loss:.3}", short(variant)));
        bar.inc(1);
    }
    Ok(Run {
        variant,
        losses,
        accuracy: accuracy(&model, eval, args.pairs)?,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn short(v: Variant) -> &'static str {
    match v {
        Variant::Ksa => "ksa",
        Variant::Sliding => "sliding",
        Variant::Full => "full",
    }
}

/// Mean over a trailing window of `k` steps, so the plot shows the trend of
/// noisy single-batch losses.
fn smooth(xs: &[f32], k: usize) -> Vec<(f64, f64)> {
    (0..xs.len())
        .map(|i| {
            let w = &xs[i.saturating_sub(k - 1)..=i];
            (i as f64, w.iter().sum::<f32>() as f64 / w.len() as f64)
        })
        .collect()
}

fn plot(path: &str, runs: &[Run], args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    if let Some(dir) = std::path::Path::new(path).parent() {
        std::fs::create_dir_all(dir)?;
    }
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let k = (args.steps / 30).max(1);
    let curves: Vec<Vec<(f64, f64)>> = runs.iter().map(|r| smooth(&r.losses, k)).collect();
    let hi = curves
        .iter()
        .flatten()
        .map(|p| p.1)
        .fold(0f64, f64::max)
        .max(1.0);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Associative recall beyond the window: training loss ({} pairs, n = {}, C = {CHUNK}, W = {WINDOW})",
                args.pairs, args.len
            ),
            ("sans-serif", 16),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..args.steps as f64, 0f64..hi * 1.05)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(format!("cross-entropy (mean of last {k} steps)"))
        .draw()?;
    for ((run, points), color) in runs.iter().zip(curves).zip([BLUE, RED, BLACK]) {
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(format!(
                "{}: held-out accuracy {:.1}%",
                run.variant.name(),
                100.0 * run.accuracy
            ))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    // A model that knows the answer is a value but not which one.
    let chance = (VALUES as f64).ln();
    let grey = RGBColor(128, 128, 128);
    chart
        .draw_series(LineSeries::new(
            [(0.0, chance), (args.steps as f64, chance)],
            grey.stroke_width(1),
        ))?
        .label(format!("ln {VALUES}: a uniform guess among the values"))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    // Before any candle op: candle's matmuls and rayon's global pool (ksa's
    // attention) both size themselves from this variable.
    std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    println!(
        "associative recall: {} pairs, n = {}, C = {CHUNK}, W = {WINDOW}, S = {}, \
         batch {}, {} steps, lr {}, seed {}",
        args.pairs, args.len, args.summaries, args.batch, args.steps, args.lr, args.seed
    );
    // Held-out data from another stream than any training batch.
    let mut eval_rng = Rng(args.seed ^ 0xE7A1_0000_0000_0000);
    let eval = (0..args.eval.div_ceil(64))
        .map(|i| {
            batch(
                &mut eval_rng,
                64.min(args.eval - 64 * i),
                args.len,
                args.pairs,
            )
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let variants = [Variant::Ksa, Variant::Sliding, Variant::Full];
    let bar = ProgressBar::new((args.steps * variants.len()) as u64);
    bar.set_style(ProgressStyle::with_template(
        "{elapsed_precise} [{bar:40}] {pos}/{len} {msg} (eta {eta})",
    )?);
    let start = Instant::now();
    let runs = variants
        .into_iter()
        .map(|v| train(v, &args, &eval, &bar))
        .collect::<ksa::Result<Vec<_>>>()?;
    bar.finish_and_clear();
    println!(
        "chance: {:.1}% (1 of {VALUES} values)",
        100.0 / VALUES as f64
    );
    for run in &runs {
        let tail = &run.losses[run.losses.len().saturating_sub(20)..];
        println!(
            "{:<42} held-out accuracy {:5.1}%  final loss {:.3}  ({:.0} s)",
            run.variant.name(),
            100.0 * run.accuracy,
            tail.iter().sum::<f32>() / tail.len() as f32,
            run.seconds
        );
    }
    println!("total {:.0} s", start.elapsed().as_secs_f64());
    plot(&args.plot, &runs, &args)?;
    println!("loss curves written to {}", args.plot);
    Ok(())
}
