//! Qwen3 to KSA conversion: a random Qwen3 checkpoint (candle-transformers'
//! layout) with a tokenizer trained here becomes a KSA checkpoint. With every
//! window covering the context its logits equal candle-transformers' Qwen3
//! on the source; with KSA windows its cached decode equals a full
//! recompute; bad sources are typed errors that leave the destination alone.

mod model_common;
mod text_common;

use candle_core::{DType, Device, Tensor};
use ksa::convert::{qwen3_to_ksa, ConvertOptions, Windows};
use ksa::text::TextTokenizer;
use ksa::{Error, KsaCache, LogitRows, Qwen3Ksa, SummaryPositions, TextPositions};
use model_common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use text_common::{corpus, tokenizer};

/// Text vocabulary of the source model: the tokenizer's 300 ids.
const V: usize = 300;

/// A plain Qwen3 `config.json` (no KSA field): what candle-transformers loads.
fn qwen3_config(tied: bool) -> Value {
    let mut c = tiny_config();
    let m = c.as_object_mut().unwrap();
    m.retain(|k, _| {
        !k.starts_with("summary_")
            && k != "mix_coeff"
            && k != "truncate_predict_nums"
            && k != "use_summary_attention"
    });
    m.insert("vocab_size".into(), json!(V));
    m.insert("tie_word_embeddings".into(), json!(tied));
    c
}

/// A source folder: random Qwen3 weights plus the test tokenizer.
fn source(tag: &str, tied: bool, seed: u64) -> (PathBuf, Value, HashMap<String, Tensor>) {
    let c = qwen3_config(tied);
    let (dir, weights) = random_checkpoint(tag, &c, seed);
    tokenizer(V).save(&dir).unwrap();
    (dir, c, weights)
}

fn options(windows: Windows) -> ConvertOptions {
    ConvertOptions {
        chunk_size: 4,
        summary_tokens: 2,
        windows,
        text_positions: TextPositions::Origin,
        summary_positions: SummaryPositions::LastChunkSliceRight,
        independent_parameters: true,
        independent_layernorm: true,
        mix_coeff: 0.3,
    }
}

fn ids(n: usize) -> Tensor {
    let tok = tokenizer(V);
    let text = corpus().join(" ");
    let ids = tok.encode(&text).unwrap();
    assert!(ids.len() >= n, "corpus too short: {}", ids.len());
    Tensor::new(&ids[..n], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

fn load(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn full_window_conversion_equals_candle_transformers_qwen3() {
    for tied in [true, false] {
        let (src, config, weights) = source("conv-src", tied, 3 + tied as u64);
        let dst = temp_dir("conv-dst");
        let ksa_config = qwen3_to_ksa(&src, &dst, &options(Windows::Uniform(1000))).unwrap();
        assert_eq!(
            (
                ksa_config.vocab_size,
                ksa_config.summary_token_begin,
                ksa_config.logits_size()
            ),
            (V + 2, V, V)
        );
        for file in ["tokenizer.json", "tokenizer_config.json"] {
            assert_eq!(
                std::fs::read(src.join(file)).unwrap(),
                std::fs::read(dst.join(file)).unwrap(),
                "{file} carried over"
            );
        }

        // The initialisation the docs promise: summary rows = mean text
        // embedding, summary projections and norm = copies of the text ones.
        let out = load(&dst);
        let emb = &weights["model.embed_tokens.weight"];
        let mean = emb.mean_keepdim(0).unwrap();
        let rows = out["model.embed_tokens.weight"].narrow(0, V, 2).unwrap();
        assert!(max_abs_diff(&rows, &mean.repeat((2, 1)).unwrap()) < 1e-6);
        assert_eq!(
            max_abs_diff(
                &out["model.embed_tokens.weight"].narrow(0, 0, V).unwrap(),
                emb
            ),
            0.0
        );
        for l in 0..2 {
            let p = format!("model.layers.{l}");
            for (a, b) in [
                ("self_attn.q_proj_summary", "self_attn.q_proj"),
                ("self_attn.k_proj_summary", "self_attn.k_proj"),
                ("self_attn.v_proj_summary", "self_attn.v_proj"),
                ("input_layernorm_summary", "input_layernorm"),
            ] {
                let (a, b) = (
                    &out[&format!("{p}.{a}.weight")],
                    &weights[&format!("{p}.{b}.weight")],
                );
                assert_eq!(max_abs_diff(a, b), 0.0, "{p}.{a}");
            }
        }
        if !tied {
            let pad = out["lm_head.weight"].narrow(0, V, 2).unwrap();
            assert_eq!(max_abs(&pad), 0.0);
        }

        // n = 45 with C = 4: 11 complete chunks (22 summary slots) and a tail.
        let ids = ids(45);
        let model = Qwen3Ksa::from_folder(&dst, DType::F32, &Device::Cpu).unwrap();
        let ours = model.forward(&ids).unwrap();
        let theirs = qwen3_peer_logits(&src, &config, &ids);
        let scale = max_abs(&theirs);
        let diff = max_abs_diff(&ours, &theirs);
        eprintln!("tied={tied}: max |converted - candle-transformers| = {diff:.2e} (max |logit| {scale:.2})");
        // f32 on both sides, different kernels (attention, norms, rotary):
        // measured ~1e-7 relative, allowed 1e-5.
        assert!(
            diff <= 1e-5 * scale.max(1.0),
            "tied={tied}: {diff} (scale {scale})"
        );
        for dir in [src, dst] {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[test]
fn ksa_windows_run_and_cached_decode_equals_full_recompute() {
    let (src, _, _) = source("conv-ksa-src", true, 9);
    let dst = temp_dir("conv-ksa-dst");
    let windows = Windows::Hybrid {
        window: 1,
        whole_every: 2,
    };
    let config = qwen3_to_ksa(&src, &dst, &options(windows)).unwrap();
    // Layer 1 covers max_position_embeddings (4096) / C (4).
    assert_eq!(config.windows, vec![1, 1024]);
    let model = Qwen3Ksa::from_folder(&dst, DType::F32, &Device::Cpu).unwrap();
    let ids = ids(40);
    let full = model.forward(&ids).unwrap().squeeze(0).unwrap();
    let all: Vec<u32> = ids.squeeze(0).unwrap().to_vec1().unwrap();
    let scale = max_abs(&full).max(1.0);

    // Prefill 13 tokens, then one token per step: every step's logits equal
    // the full forward's row at that position.
    let mut cache = KsaCache::new(&model, 1).unwrap();
    let prefill = cache
        .append(&model, &[(0, &all[..13])], LogitRows::All)
        .unwrap();
    let mut worst = max_abs_diff(&prefill[0], &full.narrow(0, 0, 13).unwrap());
    for p in 13..all.len() {
        let step = cache.step(&model, &all[p..=p]).unwrap();
        worst = worst.max(max_abs_diff(&step, &full.narrow(0, p, 1).unwrap()));
    }
    eprintln!("cached decode vs full recompute: max diff {worst:.2e} (scale {scale:.2})");
    // Same f32 arithmetic in another order: measured ~1e-6 relative.
    assert!(worst <= 2e-5 * scale, "{worst}");

    // Summaries matter here: with other summary rows (a text token's row;
    // a rescaled row would not do, RMSNorm removes the scale), the logits
    // past the window change, so the equality above covers the summary path.
    let mut weights = load(&dst);
    let emb = &weights["model.embed_tokens.weight"];
    let other_rows = emb.narrow(0, 5, 1).unwrap().repeat((2, 1)).unwrap();
    let bumped = Tensor::cat(&[emb.narrow(0, 0, V).unwrap(), other_rows], 0).unwrap();
    weights.insert("model.embed_tokens.weight".into(), bumped);
    candle_core::safetensors::save(&weights, dst.join("model.safetensors")).unwrap();
    let other = Qwen3Ksa::from_folder(&dst, DType::F32, &Device::Cpu).unwrap();
    let moved = max_abs_diff(&other.forward(&ids).unwrap().squeeze(0).unwrap(), &full);
    assert!(moved > 1e-3 * scale, "summaries had no effect: {moved}");
    for dir in [src, dst] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn sharded_source_converts_to_the_same_model() {
    let (src, config, weights) = source("conv-shard-src", false, 5);
    let single = temp_dir("conv-shard-single");
    qwen3_to_ksa(&src, &single, &options(Windows::Uniform(2))).unwrap();
    // The same weights in two shards with an index.
    let sharded = temp_dir("conv-shard-src2");
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let t: HashMap<String, Tensor> = part
            .iter()
            .map(|&n| (n.clone(), weights[n].clone()))
            .collect();
        candle_core::safetensors::save(&t, sharded.join(file)).unwrap();
        for n in part {
            map.insert((*n).clone(), json!(file));
        }
    }
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        json!({"weight_map": map}).to_string(),
    )
    .unwrap();
    std::fs::write(sharded.join("config.json"), config.to_string()).unwrap();
    tokenizer(V).save(&sharded).unwrap();
    let dst = temp_dir("conv-shard-dst");
    qwen3_to_ksa(&sharded, &dst, &options(Windows::Uniform(2))).unwrap();
    assert!(dst.join("model.safetensors.index.json").is_file());
    assert!(!dst.join("model.safetensors").exists());
    let ids = ids(30);
    let one = Qwen3Ksa::from_folder(&single, DType::F32, &Device::Cpu)
        .unwrap()
        .forward(&ids)
        .unwrap();
    let two = Qwen3Ksa::from_folder(&dst, DType::F32, &Device::Cpu)
        .unwrap()
        .forward(&ids)
        .unwrap();
    assert_eq!(max_abs_diff(&one, &two), 0.0);
    for dir in [src, single, sharded, dst] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Converting `src` fails with an error `check` accepts, and `dst` is not created.
fn fails(src: &Path, check: impl Fn(&Error) -> bool) {
    let dst = std::env::temp_dir().join(format!("ksa-conv-never-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    let err = qwen3_to_ksa(src, &dst, &ConvertOptions::default()).unwrap_err();
    assert!(check(&err), "unexpected error: {err}");
    assert!(
        !dst.exists(),
        "a failed conversion created {}",
        dst.display()
    );
}

#[test]
fn bad_sources_are_typed_errors() {
    let (src, config, weights) = source("conv-bad", true, 1);
    let write_config = |c: &Value| std::fs::write(src.join("config.json"), c.to_string()).unwrap();

    write_config(&with(
        &config,
        json!({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}),
    ));
    fails(
        &src,
        |e| matches!(e, Error::Convert(m) if m.contains("not a Qwen3 checkpoint")),
    );
    write_config(&with(&config, json!({"summary_chunk_size": 8})));
    fails(
        &src,
        |e| matches!(e, Error::Convert(m) if m.contains("already a KSA checkpoint")),
    );
    std::fs::remove_file(src.join("config.json")).unwrap();
    fails(
        &src,
        |e| matches!(e, Error::Convert(m) if m.contains("config.json")),
    );
    write_config(&config);

    // Tokenizer: missing, malformed, larger than the embedding table.
    let tok = std::fs::read(src.join("tokenizer.json")).unwrap();
    std::fs::remove_file(src.join("tokenizer.json")).unwrap();
    fails(&src, |e| matches!(e, Error::Tokenizer(_)));
    std::fs::write(src.join("tokenizer.json"), "{ not json").unwrap();
    fails(&src, |e| matches!(e, Error::Tokenizer(_)));
    std::fs::write(src.join("tokenizer.json"), &tok).unwrap();
    write_config(&with(&config, json!({"vocab_size": 200})));
    fails(
        &src,
        |e| matches!(e, Error::Convert(m) if m.contains("tokenizer has 300 tokens")),
    );
    write_config(&config);

    // Weights: a tensor missing, a tensor of the wrong shape.
    let mut w = weights.clone();
    w.remove("model.layers.1.mlp.up_proj.weight");
    candle_core::safetensors::save(&w, src.join("model.safetensors")).unwrap();
    fails(
        &src,
        |e| matches!(e, Error::MissingTensor { name } if name == "model.layers.1.mlp.up_proj.weight"),
    );
    let mut w = weights.clone();
    w.insert(
        "model.norm.weight".into(),
        Tensor::ones(7, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&w, src.join("model.safetensors")).unwrap();
    fails(
        &src,
        |e| matches!(e, Error::TensorShape { name, .. } if name == "model.norm.weight"),
    );
    candle_core::safetensors::save(&weights, src.join("model.safetensors")).unwrap();

    // Options that make no valid KSA model (C = 0).
    let dst = temp_dir("conv-bad-dst");
    std::fs::remove_dir(&dst).unwrap();
    let bad = ConvertOptions {
        chunk_size: 0,
        ..ConvertOptions::default()
    };
    assert!(matches!(
        qwen3_to_ksa(&src, &dst, &bad),
        Err(Error::InvalidConfig(_))
    ));
    assert!(!dst.exists());

    // A destination that already holds files is refused and left as it was.
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::write(dst.join("keep.txt"), "mine").unwrap();
    assert!(matches!(
        qwen3_to_ksa(&src, &dst, &ConvertOptions::default()),
        Err(Error::Convert(m)) if m.contains("not empty")
    ));
    assert_eq!(
        std::fs::read_to_string(dst.join("keep.txt")).unwrap(),
        "mine"
    );
    assert_eq!(std::fs::read_dir(&dst).unwrap().count(), 1);

    // And the source is still a good one.
    std::fs::remove_dir_all(&dst).unwrap();
    qwen3_to_ksa(&src, &dst, &ConvertOptions::default()).unwrap();
    assert!(TextTokenizer::from_folder(&dst).is_ok());
    for dir in [src, dst] {
        let _ = std::fs::remove_dir_all(dir);
    }
}
