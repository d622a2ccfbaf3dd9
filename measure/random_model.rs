//! The random model of `examples/long_context` (4 layers, hidden 512, 8 query
//! / 2 KV heads of 64, C = 8, S = 1) with chosen windows, random models of
//! other shapes (KSA-4B-base's layers), and the process figures the reports
//! print (peak resident memory, the CPU's name, the load). The example
//! includes this file too (`#[path]`), so the reports measure its model.

#![allow(dead_code)] // each report uses its own subset

/// Errors of the measurement programs.
pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ksa::{Qwen3Ksa, Qwen3KsaConfig};
use std::collections::HashMap;

/// The whole-context window of the example's 4th layer: 16,768 chunks of 8
/// tokens, 134,144 tokens, past every context measured here.
pub const WHOLE: usize = 16_768;

/// The example's windows (`[128, 128, 128, 16768]` for 4 layers), or every
/// layer whole-context (`full`): full attention with the same weights.
pub fn windows(layers: usize, full: bool) -> Vec<usize> {
    (0..layers)
        .map(|i| if full || i % 4 == 3 { WHOLE } else { 128 })
        .collect()
}

/// Deterministic uniform numbers in `[-1, 1)` (xorshift).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
}

/// Per-layer shapes and depth of a random model (C = 8, S = 1, tied
/// embeddings, a text vocabulary of 4,096 plus the summary row).
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub layers: usize,
}

impl Shape {
    /// The random model of `examples/long_context`.
    pub const LONG_CONTEXT: Shape = Shape {
        hidden: 512,
        intermediate: 1536,
        heads: 8,
        kv_heads: 2,
        head_dim: 64,
        layers: 4,
    };

    /// KSA-4B-base's per-layer shapes (hidden 2560, intermediate 9728, 32
    /// query / 8 KV heads of 128) with `layers` of its 36 layers; the
    /// vocabulary stays 4,096 (its 151,936-row embedding and lm head would
    /// only add a constant per token).
    pub fn ksa_4b(layers: usize) -> Shape {
        Shape {
            hidden: 2560,
            intermediate: 9728,
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
            layers,
        }
    }

    /// The configuration of this shape with per-layer `windows` (one per layer).
    pub fn config(&self, windows: &[usize]) -> Result<Qwen3KsaConfig> {
        if windows.len() != self.layers {
            return Err(format!("{} windows for {} layers", windows.len(), self.layers).into());
        }
        let json = format!(
            r#"{{
        "vocab_size": 4097, "hidden_size": {}, "intermediate_size": {},
        "num_hidden_layers": {}, "num_attention_heads": {}, "num_key_value_heads": {},
        "head_dim": {}, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": true, "hidden_act": "silu", "attention_bias": false,
        "truncate_predict_nums": 4096, "summary_token_begin": 4096,
        "summary_chunk_size": 8, "summary_token_num": 1,
        "summary_sliding_chunk_num": {windows:?},
        "summary_chunk_position_ids_type": "origin",
        "summary_token_position_ids_type": "last_chunk_slice_right",
        "summary_independent_parameters": true,
        "summary_independent_attention_layernorm": false, "mix_coeff": 0.5
    }}"#,
            self.hidden, self.intermediate, self.layers, self.heads, self.kv_heads, self.head_dim
        );
        Ok(Qwen3KsaConfig::from_json_str(&json)?)
    }
}

/// Deterministic random weights of `config` in `dtype` (uniform, scaled by
/// fan-in; norms 1). Windows do not change the tensors, so models of one
/// shape with different windows can share them (tensors are reference
/// counted: [`model_from`] does not copy them).
pub fn weights(
    config: &Qwen3KsaConfig,
    dtype: DType,
    seed: u64,
) -> Result<HashMap<String, Tensor>> {
    let device = Device::Cpu;
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut tensors = HashMap::new();
    for (name, dims) in Qwen3Ksa::expected_tensors(config)? {
        let count: usize = dims.iter().product();
        let scale = match dims.as_slice() {
            [_] => 0.0,
            _ if name.contains("embed_tokens") => 1.0,
            [_, fan_in] => 3f32.sqrt() / (*fan_in as f32).sqrt(),
            _ => unreachable!("weights are vectors or matrices"),
        };
        let center = if dims.len() == 1 { 1.0 } else { 0.0 };
        let data: Vec<f32> = (0..count).map(|_| center + scale * rng.next()).collect();
        let t = Tensor::from_vec(data, dims, &device)?.to_dtype(dtype)?;
        tensors.insert(name, t);
    }
    Ok(tensors)
}

/// A model of `config` over shared `weights` (their dtype is the model's).
pub fn model_from(config: &Qwen3KsaConfig, weights: &HashMap<String, Tensor>) -> Result<Qwen3Ksa> {
    let dtype = weights.values().next().map_or(DType::F32, |t| t.dtype());
    Ok(Qwen3Ksa::new(
        config,
        VarBuilder::from_tensors(weights.clone(), dtype, &Device::Cpu),
    )?)
}

/// The example's random f32 model with the given windows.
pub fn model(windows: &[usize], seed: u64) -> Result<Qwen3Ksa> {
    let shape = Shape {
        layers: windows.len(),
        ..Shape::LONG_CONTEXT
    };
    let config = shape.config(windows)?;
    model_from(&config, &weights(&config, DType::F32, seed)?)
}

/// `n` random text ids of `model`.
pub fn tokens(model: &Qwen3Ksa, n: usize, seed: u64) -> Vec<u32> {
    let vocab = model.config().logits_size() as u32;
    let mut rng = Rng(seed.wrapping_add(17) | 1);
    (0..n)
        .map(|_| ((rng.next() + 1.0) / 2.0 * vocab as f32) as u32 % vocab)
        .collect()
}

/// A field of `/proc/self/status` in bytes (Linux; `None` elsewhere).
pub fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets the peak resident size (VmHWM) to the current one, so the next
/// peak read is that of what runs in between. Linux only; best effort.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Hands freed heap memory back to the system (glibc), so that a
/// measurement's "before" is what the process holds, not what an earlier one
/// left cached in the allocator.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the heap to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The CPU's model name (`/proc/cpuinfo`, as `lscpu` prints it) and the
/// number of threads rayon uses.
pub fn cpu_name() -> String {
    let name = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|n| n.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{name}, {} threads", rayon::current_num_threads())
}

/// CPU seconds used by all threads of the process so far: on a shared
/// machine the steadier figure next to wall time.
pub fn cpu_time() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// The load averages of `/proc/loadavg` (1, 5, 15 minutes), as `uptime`
/// prints them: how busy the shared machine was around a measurement.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(", "))
        .unwrap_or_else(|| "unknown".into())
}

/// A comma-separated list of sizes given to `flag`.
pub fn usize_list(flag: &str, s: &str) -> std::result::Result<Vec<usize>, String> {
    s.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.trim().parse().map_err(|e| format!("{flag}: {e}")))
        .collect()
}

/// `bytes` in MiB, one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}
