//! Peak resident memory of `Qwen3Ksa::from_folder` on a generated bf16
//! checkpoint of more than 1 GB, loaded as bf16 and as f32, against candle's
//! `VarBuilder::from_mmaped_safetensors` (the peer) on the same file, each
//! load in a fresh child process (so one load's pages do not count for another).
//!
//! ```text
//! cargo run --release --example load_rss -- [--dir DIR] [--layers 12]
//! ```
//!
//! Prints, per compute dtype: the weights' bytes in that dtype, the peak
//! resident set (`VmHWM`, file-backed pages of the mapped safetensors
//! included) and the resident anonymous memory after loading (`RssAnon`:
//! the model's own copy), as ratios to the weights' bytes.

use candle_core::{DType, Device, Tensor};
use ksa::{Qwen3Ksa, Qwen3KsaConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

/// The `config.json` of a KSA model of `layers` layers of hidden 2048 (about
/// 57M parameters per layer with the summary projections, 66M in the
/// embeddings).
fn config_json(layers: usize) -> String {
    format!(
        r#"{{
        "vocab_size": 32001, "hidden_size": 2048, "intermediate_size": 5632,
        "num_hidden_layers": {layers}, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "rope_theta": 1000000.0, "tie_word_embeddings": true,
        "truncate_predict_nums": 32000, "summary_token_begin": 32000,
        "summary_chunk_size": 8, "summary_token_num": 1, "summary_sliding_chunk_num": 128,
        "summary_chunk_position_ids_type": "origin",
        "summary_token_position_ids_type": "last_chunk_slice_right",
        "summary_independent_parameters": true,
        "summary_independent_attention_layernorm": false, "mix_coeff": 0.5
    }}"#
    )
}

/// Writes `config.json` and a bf16 `model.safetensors` (small random-ish
/// values; the content does not matter for memory) unless present.
fn make(dir: &Path, layers: usize) -> AnyResult<()> {
    if dir.join("model.safetensors").is_file() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    let cfg = Qwen3KsaConfig::from_json_str(&config_json(layers))?;
    let mut tensors = HashMap::new();
    for (i, (name, dims)) in Qwen3Ksa::expected_tensors(&cfg)?.into_iter().enumerate() {
        let t = (Tensor::ones(dims, DType::BF16, &Device::Cpu)? * (1.0 / (i + 2) as f64))?;
        tensors.insert(name, t);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    std::fs::write(dir.join("config.json"), config_json(layers))?;
    Ok(())
}

/// A `/proc/self/status` field in bytes.
fn status(field: &str) -> AnyResult<u64> {
    let text = std::fs::read_to_string("/proc/self/status")?;
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .ok_or(format!("no {field} in /proc/self/status"))?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .ok_or("malformed status line")?
        .parse()?;
    Ok(kb * 1024)
}

/// The child: loads the folder with `from_folder` (`ours`) or with
/// candle's `VarBuilder::from_mmaped_safetensors` (`candle`, the peer) and
/// prints `weights_bytes peak anon`.
fn child(dir: &Path, dtype: DType, loader: &str) -> AnyResult<()> {
    let model = if loader == "candle" {
        let config = Qwen3KsaConfig::from_file(dir.join("config.json"))?;
        // SAFETY: the program's own file, not modified while mapped.
        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(
                &[dir.join("model.safetensors")],
                dtype,
                &Device::Cpu,
            )?
        };
        Qwen3Ksa::new(&config, vb)?
    } else {
        Qwen3Ksa::from_folder(dir, dtype, &Device::Cpu)?
    };
    let params: usize = Qwen3Ksa::expected_tensors(model.config())?
        .iter()
        .map(|(_, d)| d.iter().product::<usize>())
        .sum();
    println!(
        "{} {} {}",
        params * dtype.size_in_bytes(),
        status("VmHWM:")?,
        status("RssAnon:")?
    );
    Ok(())
}

fn main() -> AnyResult<()> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, dir, dtype, loader] = &args[..] {
        if flag == "--child" {
            let dtype = if dtype == "bf16" {
                DType::BF16
            } else {
                DType::F32
            };
            return child(Path::new(dir), dtype, loader);
        }
    }
    let mut dir = std::env::temp_dir().join("ksa-load-rss");
    let mut layers = 12;
    let mut it = args.iter().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--dir" => dir = PathBuf::from(value),
            "--layers" => layers = value.parse()?,
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    make(&dir, layers)?;
    let file = std::fs::metadata(dir.join("model.safetensors"))?.len();
    println!(
        "checkpoint: {} ({:.2} GB bf16 safetensors)",
        dir.display(),
        file as f64 / 1e9
    );
    println!("dtype  loader                             weights    peak RSS (VmHWM)   RssAnon after load");
    for (dtype, loader) in [
        ("bf16", "ours"),
        ("bf16", "candle"),
        ("f32", "ours"),
        ("f32", "candle"),
    ] {
        let out = Command::new(std::env::current_exe()?)
            .args(["--child", &dir.to_string_lossy(), dtype, loader])
            .output()?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned().into());
        }
        let text = String::from_utf8(out.stdout)?;
        let v: Vec<f64> = text
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        let [weights, peak, anon] = v[..] else {
            return Err(format!("child printed {text:?}").into());
        };
        let name = if loader == "candle" {
            "candle from_mmaped_safetensors"
        } else {
            "Qwen3Ksa::from_folder"
        };
        println!(
            "{dtype:<5}  {name:<33}  {:.2} GB    {:.2} GB ({:.2}x)    {:.2} GB ({:.2}x)",
            weights / 1e9,
            peak / 1e9,
            peak / weights,
            anon / 1e9,
            anon / weights
        );
    }
    Ok(())
}
