//! Shared helpers of the layer and model tests: tiny configs in the
//! reference's `config.json` format and random checkpoints written with the
//! reference's tensor names (listed here independently of the crate's own list).

#![allow(dead_code)] // each test binary uses its own subset

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A tiny Qwen3-KSA `config.json`: 2 layers, hidden 32, 4 query / 2 KV
/// heads of 8, C = 4, S = 2, vocab 50 text ids + 2 summary rows.
pub fn tiny_config() -> Value {
    json!({
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "head_dim": 8,
        "hidden_act": "silu",
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 48,
        "max_position_embeddings": 4096,
        "max_window_layers": 2,
        "mix_coeff": 0.25,
        "model_type": "qwen3",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_scaling": null,
        "rope_theta": 10000.0,
        "sliding_window": null,
        "tie_word_embeddings": true,
        "torch_dtype": "float32",
        "use_cache": true,
        "use_sliding_window": false,
        "vocab_size": 52,
        "truncate_predict_nums": 50,
        "summary_token_begin": 50,
        "summary_chunk_size": 4,
        "summary_token_num": 2,
        "use_summary_attention": true,
        "summary_sliding_chunk_num": "([1]*1+[2]*1)*1",
        "summary_chunk_position_ids_type": "origin",
        "summary_token_position_ids_type": "last_chunk_slice_right",
        "summary_independent_parameters": true,
        "summary_independent_attention_layernorm": false,
        "summary_attention_mode": "kernel"
    })
}

/// `base` with the fields of `overrides` (an object) replaced; `null` removes a field.
pub fn with(base: &Value, overrides: Value) -> Value {
    let mut out = base.clone();
    for (k, v) in overrides.as_object().expect("overrides object") {
        let map = out.as_object_mut().unwrap();
        if v.is_null() {
            map.remove(k);
        } else {
            map.insert(k.clone(), v.clone());
        }
    }
    out
}

fn u(c: &Value, k: &str) -> usize {
    c[k].as_u64().unwrap_or_else(|| panic!("config field {k}")) as usize
}

/// Whether layer `i` is a KSA layer for the simple forms the tests use
/// (absent, or a JSON list of 0/1).
fn is_ksa(c: &Value, i: usize) -> bool {
    match c.get("summary_layer_freq") {
        Some(Value::Array(l)) => l[i].as_u64() == Some(1),
        _ => true,
    }
}

/// The reference's tensor names and shapes for config `c`.
pub fn reference_tensors(c: &Value) -> Vec<(String, Vec<usize>)> {
    let (v, h, i) = (
        u(c, "vocab_size"),
        u(c, "hidden_size"),
        u(c, "intermediate_size"),
    );
    let d = u(c, "head_dim");
    let (q, kv) = (
        u(c, "num_attention_heads") * d,
        u(c, "num_key_value_heads") * d,
    );
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..u(c, "num_hidden_layers") {
        let p = |n: &str| format!("model.layers.{l}.{n}.weight");
        t.push((p("input_layernorm"), vec![h]));
        t.push((p("post_attention_layernorm"), vec![h]));
        t.push((p("self_attn.q_proj"), vec![q, h]));
        t.push((p("self_attn.k_proj"), vec![kv, h]));
        t.push((p("self_attn.v_proj"), vec![kv, h]));
        t.push((p("self_attn.o_proj"), vec![h, q]));
        t.push((p("self_attn.q_norm"), vec![d]));
        t.push((p("self_attn.k_norm"), vec![d]));
        if c["summary_independent_parameters"] == json!(true) && is_ksa(c, l) {
            t.push((p("self_attn.q_proj_summary"), vec![q, h]));
            t.push((p("self_attn.k_proj_summary"), vec![kv, h]));
            t.push((p("self_attn.v_proj_summary"), vec![kv, h]));
        }
        if c["summary_independent_attention_layernorm"] == json!(true) && is_ksa(c, l) {
            t.push((p("input_layernorm_summary"), vec![h]));
        }
        t.push((p("mlp.gate_proj"), vec![i, h]));
        t.push((p("mlp.up_proj"), vec![i, h]));
        t.push((p("mlp.down_proj"), vec![h, i]));
    }
    t.push(("model.norm.weight".to_string(), vec![h]));
    if c["tie_word_embeddings"] != json!(true) {
        t.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    t
}

/// Deterministic uniform numbers in `[-1, 1)` (xorshift), so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
    /// A `[dims]` f32 tensor with entries `center + scale * U[-1, 1)`.
    pub fn tensor(&mut self, dims: &[usize], center: f32, scale: f32) -> Tensor {
        let n: usize = dims.iter().product();
        let data: Vec<f32> = (0..n).map(|_| center + scale * self.next()).collect();
        Tensor::from_vec(data, dims, &Device::Cpu).unwrap()
    }
}

/// Random weights for `names`: norms near 1, matrices scaled by `1/sqrt(fan_in)`,
/// embeddings in `[-1, 1)`.
pub fn random_weights(names: &[(String, Vec<usize>)], seed: u64) -> HashMap<String, Tensor> {
    let mut rng = Rng::new(seed);
    names
        .iter()
        .map(|(name, dims)| {
            let t = if dims.len() == 1 {
                rng.tensor(dims, 1.0, 0.2)
            } else if name.contains("embed_tokens") {
                rng.tensor(dims, 0.0, 1.0)
            } else {
                rng.tensor(dims, 0.0, 1.7 / (dims[1] as f32).sqrt())
            };
            (name.clone(), t)
        })
        .collect()
}

/// A fresh empty directory under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ksa-test-{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `config.json` and `model.safetensors` for `config` and `weights`.
pub fn write_checkpoint(dir: &Path, config: &Value, weights: &HashMap<String, Tensor>) {
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
    candle_core::safetensors::save(weights, dir.join("model.safetensors")).unwrap();
}

/// A folder holding a random checkpoint for `config`; returns it and the weights.
pub fn random_checkpoint(
    tag: &str,
    config: &Value,
    seed: u64,
) -> (PathBuf, HashMap<String, Tensor>) {
    let dir = temp_dir(tag);
    let weights = random_weights(&reference_tensors(config), seed);
    write_checkpoint(&dir, config, &weights);
    (dir, weights)
}

/// Deterministic token ids `[b, n]` below `vocab`.
pub fn token_ids(b: usize, n: usize, vocab: usize, seed: u64) -> Tensor {
    let mut s = seed.wrapping_mul(2654435761) + 12345;
    let ids: Vec<u32> = (0..b * n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % vocab as u64) as u32
        })
        .collect();
    Tensor::from_vec(ids, (b, n), &Device::Cpu).unwrap()
}

/// One sequence of `n` ids of the tiny vocabulary (50), as `token_ids`.
pub fn text_ids(n: usize, seed: u64) -> Vec<u32> {
    token_ids(1, n, 50, seed)
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Largest absolute difference between two tensors (compared in f64).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Largest absolute value of a tensor.
pub fn max_abs(a: &Tensor) -> f64 {
    a.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// candle-transformers' Qwen3 (an implementation nobody here wrote) over the
/// checkpoint in `dir`: its config and weights.
pub fn qwen3_peer(
    dir: &Path,
    config: &Value,
) -> (
    candle_transformers::models::qwen3::Config,
    candle_nn::VarBuilder<'static>,
) {
    let cfg = serde_json::from_value(config.clone()).unwrap();
    let file = dir.join("model.safetensors");
    // SAFETY: the test's own file, not modified while mapped.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[&file], DType::F32, &Device::Cpu).unwrap()
    };
    (cfg, vb)
}

/// The peer's logits at every position of `ids`: its base model's final
/// hidden states times the LM head weight (its `ModelForCausalLM` returns
/// only the last position).
pub fn qwen3_peer_logits(dir: &Path, config: &Value, ids: &Tensor) -> Tensor {
    use candle_transformers::models::qwen3;
    let (cfg, vb) = qwen3_peer(dir, config);
    let mut base = qwen3::Model::new(&cfg, vb.clone()).unwrap();
    let hidden = base.forward(ids, 0).unwrap();
    let head = if cfg.tie_word_embeddings {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    let w = vb.get((cfg.vocab_size, cfg.hidden_size), head).unwrap();
    hidden.broadcast_matmul(&w.t().unwrap()).unwrap()
}
