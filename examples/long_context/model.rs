//! Model mode of the long-context example: a forward pass of a whole
//! Qwen3-KSA model over a long context, with a progress bar over layers,
//! tokens/s, peak memory and each layer's KV-cache bytes under KSA against
//! full attention.
//!
//! Without `--model` it builds a small random-weight model (every 4th layer
//! with a whole-context window, like the released hybrids); with `--model
//! DIR` it loads a reference checkpoint folder unchanged.

use crate::random_model::{model_from, proc_status_bytes, tokens, weights, windows, Shape};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use ksa::model_config::LayerKind;
use ksa::Qwen3Ksa;
use std::path::PathBuf;
use std::time::Instant;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Options of the model mode.
#[derive(Debug, Clone)]
pub struct ModelArgs {
    /// A checkpoint folder (`config.json` + safetensors); `None`: a random model.
    pub model: Option<PathBuf>,
    /// Text tokens in the context.
    pub len: usize,
    /// Sequences in the batch.
    pub batch: usize,
    /// Model dtype.
    pub dtype: DType,
    /// Decoder layers of the random model.
    pub layers: usize,
    /// Seed of the random weights and tokens.
    pub seed: u64,
}

impl Default for ModelArgs {
    fn default() -> Self {
        Self {
            model: None,
            len: 32_768,
            batch: 1,
            dtype: DType::F32,
            layers: 4,
            seed: 0,
        }
    }
}

/// The flags [`ModelArgs::parse`] understands, for `--help`.
pub const USAGE: &str = "\
  --model DIR     load a Qwen3-KSA checkpoint folder (default: a small random model)
  --len N         text tokens in the context (default 32768)
  --batch B       sequences in the batch (default 1)
  --dtype D       f32, bf16 or f16 (default f32)
  --layers L      decoder layers of the random model (default 4)
  --seed S        seed of the random weights and tokens (default 0)";

impl ModelArgs {
    /// Parses the model-mode flags (see [`USAGE`]); an unknown flag is an error.
    pub fn parse(args: &[String]) -> std::result::Result<Self, String> {
        let mut out = Self::default();
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let mut value = || {
                it.next()
                    .cloned()
                    .ok_or_else(|| format!("{flag} needs a value"))
            };
            let number = |v: String| {
                v.replace('_', "")
                    .parse::<usize>()
                    .map_err(|e| format!("{flag} {v}: {e}"))
            };
            match flag.as_str() {
                "--model" => out.model = Some(PathBuf::from(value()?)),
                "--len" => out.len = number(value()?)?,
                "--batch" => out.batch = number(value()?)?,
                "--layers" => out.layers = number(value()?)?,
                "--seed" => out.seed = number(value()?)? as u64,
                "--dtype" => {
                    out.dtype = match value()?.as_str() {
                        "f32" => DType::F32,
                        "bf16" => DType::BF16,
                        "f16" => DType::F16,
                        other => return Err(format!("--dtype {other}: expected f32, bf16 or f16")),
                    }
                }
                other => return Err(format!("unknown flag {other}\n{USAGE}")),
            }
        }
        if out.len == 0 || out.batch == 0 || out.layers == 0 {
            return Err("--len, --batch and --layers must be positive".into());
        }
        Ok(out)
    }
}

/// `bytes` in the largest binary unit that keeps the number at least 1.
fn binary_size(bytes: u64) -> String {
    let mut value = bytes as f64;
    for unit in ["B", "KiB", "MiB"] {
        if value < 1024.0 {
            return format!("{value:.1} {unit}");
        }
        value /= 1024.0;
    }
    format!("{value:.2} GiB")
}

/// Runs the model mode: builds or loads the model, runs one forward pass
/// over `args.len` random tokens layer by layer, and prints the figures.
pub fn run(args: &ModelArgs) -> Result<()> {
    let device = Device::Cpu;
    let start = Instant::now();
    let model = match &args.model {
        Some(dir) => Qwen3Ksa::from_folder(dir, args.dtype, &device)?,
        None => {
            // Every 4th layer whole-context, like the released hybrids.
            let config = Shape {
                layers: args.layers,
                ..Shape::LONG_CONTEXT
            }
            .config(&windows(args.layers, false))?;
            model_from(&config, &weights(&config, args.dtype, args.seed)?)?
        }
    };
    let config = model.config().clone();
    println!(
        "model: {} ({} layers, hidden {}, {} q / {} kv heads of {}, C = {}, S = {}), built in {:.2?}",
        args.model.as_ref().map_or("random weights".into(), |p| p.display().to_string()),
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.summary_chunk_size,
        config.summary_token_num,
        start.elapsed()
    );

    let ids = tokens(&model, args.batch * args.len, args.seed);
    let ids = Tensor::from_vec(ids, (args.batch, args.len), &device)?;

    let start = Instant::now();
    let (mut h, layout) = model.embed(&ids)?;
    println!(
        "context: batch {} x {} text tokens -> {} slots ({} summaries)",
        args.batch,
        layout.text_len(),
        layout.len(),
        layout.summary_len()
    );
    let bar = ProgressBar::new(model.layers().len() as u64).with_style(
        ProgressStyle::with_template("{bar:40} layer {pos}/{len} [{elapsed_precise}] {msg}")?,
    );
    let mut layer_times = Vec::new();
    for layer in model.layers() {
        let t = Instant::now();
        h = layer.forward(&h, &layout)?;
        layer_times.push(t.elapsed());
        bar.inc(1);
    }
    bar.finish_and_clear();
    // Logits of the last position only: `n x vocab` would not fit for a real vocabulary.
    let last = layout.take_text(&h, 1)?.narrow(1, args.len - 1, 1)?;
    let next: Vec<u32> = model
        .head(&last)?
        .squeeze(1)?
        .argmax(candle_core::D::Minus1)?
        .to_vec1()?;
    let elapsed = start.elapsed();
    let tokens = (args.batch * args.len) as f64;
    println!(
        "forward: {elapsed:.2?}, {:.1} tokens/s; next-token argmax {next:?}",
        tokens / elapsed.as_secs_f64()
    );
    match proc_status_bytes("VmHWM:") {
        Some(b) => println!("peak memory (VmHWM): {}", binary_size(b)),
        None => println!("peak memory: not reported on this platform"),
    }

    // KV bytes a decode cache needs for the next token: the keys that token
    // may attend to (its mask row, itself excluded), against all `n` for full
    // attention.
    let per_slot = (2
        * args.batch
        * config.num_key_value_heads
        * config.head_dim
        * args.dtype.size_in_bytes()) as u64;
    let next_layout = model.layout(args.len + 1)?;
    let next_slot = next_layout.text_slot(args.len).expect("token n exists");
    println!("layer  kind    W        time       KV (KSA)      KV (full)   ratio");
    let (mut total_ksa, mut total_full) = (0u64, 0u64);
    for (i, (layer, time)) in model.layers().iter().zip(&layer_times).enumerate() {
        let window = layer.attention().window();
        let keys = match layer.kind() {
            LayerKind::Summary => {
                next_layout
                    .with_window(window)
                    .key_ranges(next_slot)
                    .expect("slot in layout")
                    .len()
                    - 1
            }
            LayerKind::Bypass => args.len,
        };
        let (ksa, full) = (keys as u64 * per_slot, args.len as u64 * per_slot);
        total_ksa += ksa;
        total_full += full;
        let (kind, window) = match layer.kind() {
            LayerKind::Summary => ("ksa", window.to_string()),
            LayerKind::Bypass => ("bypass", "-".to_string()),
        };
        println!(
            "{i:>5}  {kind:<6}  {window:<7}  {time:>9.2?}  {:>12}  {:>12}  {:>5.2}x",
            binary_size(ksa),
            binary_size(full),
            full as f64 / ksa.max(1) as f64
        );
    }
    println!(
        "total KV: {} with KSA vs {} full attention ({:.2}x smaller)",
        binary_size(total_ksa),
        binary_size(total_full),
        total_full as f64 / total_ksa.max(1) as f64
    );
    Ok(())
}
