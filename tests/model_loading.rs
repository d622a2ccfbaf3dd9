//! Config parsing (the safe pattern parser included) and checkpoint loading
//! with the reference's tensor names: single file, sharded, `mix_coeff = 0`
//! without summary projections, and typed errors for missing or mis-shaped
//! tensors.

mod model_common;

use candle_core::{DType, Device, Tensor};
use ksa::model_config::{parse_pattern, LayerKind, PatternValue};
use ksa::{Error, Qwen3Ksa, Qwen3KsaConfig};
use model_common::*;
use serde_json::json;
use std::collections::HashMap;

fn pattern_error(p: &str) -> usize {
    match parse_pattern(p) {
        Err(Error::Pattern { position, .. }) => position,
        other => panic!("{p:?} should be rejected, got {other:?}"),
    }
}

#[test]
fn pattern_accepts_the_reference_forms() {
    assert_eq!(parse_pattern("128").unwrap(), PatternValue::Int(128));
    assert_eq!(
        parse_pattern(" [1, 2,3 ,] ").unwrap(),
        PatternValue::List(vec![1, 2, 3])
    );
    let mut want = Vec::new();
    for _ in 0..6 {
        want.extend([128, 128, 128, 1024]);
    }
    assert_eq!(
        parse_pattern("([128]*3+[1024]*1)*6").unwrap(),
        PatternValue::List(want)
    );
    assert_eq!(
        parse_pattern("2*[4096]+[128]*(1+1)").unwrap(),
        PatternValue::List(vec![4096, 4096, 128, 128])
    );
    assert_eq!(parse_pattern("[]").unwrap(), PatternValue::List(vec![]));
}

#[test]
fn pattern_rejects_everything_else_naming_the_position() {
    assert_eq!(pattern_error("__import__('os')"), 0);
    assert_eq!(pattern_error("[1,"), 3);
    assert_eq!(pattern_error("2**8"), 2);
    assert_eq!(pattern_error(""), 0);
    assert_eq!(pattern_error("[1] 2"), 4);
    assert_eq!(pattern_error("[[1]]"), 1);
    assert_eq!(pattern_error("-1"), 0);
    assert_eq!(pattern_error("[1.5]"), 2);
    assert_eq!(pattern_error("[1]+2"), 3);
    assert_eq!(pattern_error("[1]*[2]"), 3);
    assert_eq!(pattern_error("(1"), 2);
    // Absurd sizes fail before anything is allocated.
    assert_eq!(pattern_error("[1]*100000000000"), 3);
    assert_eq!(pattern_error("[1,2]*40000"), 5);
    assert_eq!(pattern_error("99999999999999999999999"), 0);
    let deep = format!("{}1{}", "(".repeat(100), ")".repeat(100));
    assert!(matches!(parse_pattern(&deep), Err(Error::Pattern { .. })));
    let message = parse_pattern("2**8").unwrap_err().to_string();
    assert!(message.contains("position 2"), "{message}");
}

#[test]
fn config_reads_the_reference_fields() {
    let c = tiny_config();
    let cfg = Qwen3KsaConfig::from_json_str(&c.to_string()).unwrap();
    assert_eq!(cfg.windows, vec![1, 2]);
    assert_eq!(cfg.layer_kinds, vec![LayerKind::Summary; 2]);
    assert_eq!((cfg.summary_chunk_size, cfg.summary_token_num), (4, 2));
    assert_eq!(cfg.logits_size(), 50);
    assert!(cfg.uses_summary_projections());

    let c24 = with(
        &c,
        json!({"num_hidden_layers": 24, "summary_sliding_chunk_num": "([128]*3+[1024]*1)*6"}),
    );
    let cfg = Qwen3KsaConfig::from_json_str(&c24.to_string()).unwrap();
    assert_eq!(cfg.windows.len(), 24);
    assert_eq!(&cfg.windows[..5], &[128, 128, 128, 1024, 128]);

    let as_int = with(&c, json!({"summary_sliding_chunk_num": 7}));
    assert_eq!(
        Qwen3KsaConfig::from_json_str(&as_int.to_string())
            .unwrap()
            .windows,
        vec![7, 7]
    );
    let as_list = with(&c, json!({"summary_sliding_chunk_num": [3, 0]}));
    assert_eq!(
        Qwen3KsaConfig::from_json_str(&as_list.to_string())
            .unwrap()
            .windows,
        vec![3, 0]
    );

    let freq = with(&c24, json!({"summary_layer_freq": 4}));
    let kinds = Qwen3KsaConfig::from_json_str(&freq.to_string())
        .unwrap()
        .layer_kinds;
    assert_eq!(kinds[0], LayerKind::Summary);
    assert_eq!(kinds[1..4], [LayerKind::Bypass; 3]);
    assert_eq!(kinds[4], LayerKind::Summary);
    let freq = with(&c, json!({"summary_layer_freq": [0, 1]}));
    let kinds = Qwen3KsaConfig::from_json_str(&freq.to_string())
        .unwrap()
        .layer_kinds;
    assert_eq!(kinds, vec![LayerKind::Bypass, LayerKind::Summary]);
}

fn config_error(c: serde_json::Value) -> String {
    match Qwen3KsaConfig::from_json_str(&c.to_string()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("config should be rejected: {c}"),
    }
}

#[test]
fn config_rejects_missing_or_inconsistent_fields() {
    let c = tiny_config();
    for field in [
        "summary_chunk_size",
        "summary_token_num",
        "summary_sliding_chunk_num",
        "summary_chunk_position_ids_type",
        "summary_token_position_ids_type",
        "summary_independent_parameters",
        "summary_independent_attention_layernorm",
        "mix_coeff",
        "summary_token_begin",
    ] {
        let e = config_error(with(&c, json!({ field: null })));
        assert!(e.contains(field), "{e}");
    }
    let e = config_error(with(&c, json!({"summary_sliding_chunk_num": [1, 2, 3]})));
    assert!(e.contains("3 layers"), "{e}");
    let e = config_error(with(
        &c,
        json!({"summary_sliding_chunk_num": "([1]*3+[2]*1)*6"}),
    ));
    assert!(e.contains("24 layers"), "{e}");
    let e = config_error(with(
        &c,
        json!({"summary_sliding_chunk_num": "__import__('os')"}),
    ));
    assert!(e.contains("position 0"), "{e}");
    let e = config_error(with(&c, json!({"summary_layer_freq": [1, 2]})));
    assert!(e.contains("0 or 1"), "{e}");
    let e = config_error(with(
        &c,
        json!({"summary_token_position_ids_type": "middle"}),
    ));
    assert!(e.contains("middle"), "{e}");
    let e = config_error(with(&c, json!({"summary_token_begin": 51})));
    assert!(e.contains("outside the embedding table"), "{e}");
    let e = config_error(with(&c, json!({"attention_bias": true})));
    assert!(e.contains("attention_bias"), "{e}");
    assert!(matches!(
        Qwen3KsaConfig::from_json_str(&with(&c, json!({"num_key_value_heads": 3})).to_string()),
        Err(Error::HeadsNotDivisible { .. })
    ));
}

#[test]
fn reference_checkpoint_loads_single_file_and_sharded() {
    let c = with(
        &tiny_config(),
        json!({"summary_independent_attention_layernorm": true, "tie_word_embeddings": false}),
    );
    let (dir, weights) = random_checkpoint("load", &c, 1);
    let cfg = Qwen3KsaConfig::from_json_str(&c.to_string()).unwrap();
    // The crate's own list of names agrees with the reference names written here.
    let mut ours: Vec<_> = Qwen3Ksa::expected_tensors(&cfg).unwrap();
    let mut theirs = reference_tensors(&c);
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs);

    let model = Qwen3Ksa::from_folder(&dir, DType::F32, &Device::Cpu).unwrap();
    let ids = token_ids(2, 11, 50, 3);
    let logits = model.forward(&ids).unwrap();
    assert_eq!(logits.dims(), &[2, 11, 50]);

    // The same weights split over two shards with an index.
    let sharded = temp_dir("sharded");
    std::fs::write(sharded.join("config.json"), c.to_string()).unwrap();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut map = serde_json::Map::new();
    for (i, (name, t)) in weights.iter().enumerate() {
        let file = if i % 2 == 0 {
            "model-00001-of-00002.safetensors"
        } else {
            "model-00002-of-00002.safetensors"
        };
        map.insert(name.clone(), json!(file));
        if i % 2 == 0 {
            a.insert(name.clone(), t.clone());
        } else {
            b.insert(name.clone(), t.clone());
        }
    }
    candle_core::safetensors::save(&a, sharded.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, sharded.join("model-00002-of-00002.safetensors")).unwrap();
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        json!({"metadata": {"total_size": 0}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let sharded_model = Qwen3Ksa::from_folder(&sharded, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        max_abs_diff(&sharded_model.forward(&ids).unwrap(), &logits),
        0.0
    );
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(sharded);
}

#[test]
fn mix_coeff_zero_loads_without_summary_projections() {
    let c = with(&tiny_config(), json!({"mix_coeff": 0.0}));
    let names: Vec<_> = reference_tensors(&c)
        .into_iter()
        .filter(|(n, _)| !n.contains("_summary"))
        .collect();
    assert!(names.len() < reference_tensors(&c).len());
    let dir = temp_dir("mix0");
    write_checkpoint(&dir, &c, &random_weights(&names, 2));
    let model = Qwen3Ksa::from_folder(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        model.forward(&token_ids(1, 9, 50, 1)).unwrap().dims(),
        &[1, 9, 50]
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn missing_or_misshaped_tensors_are_typed_errors() {
    let c = tiny_config();
    let names = reference_tensors(&c);
    let victim = "model.layers.1.self_attn.k_proj_summary.weight";

    let dir = temp_dir("missing");
    let mut weights = random_weights(&names, 4);
    weights.remove(victim);
    write_checkpoint(&dir, &c, &weights);
    match Qwen3Ksa::from_folder(&dir, DType::F32, &Device::Cpu) {
        Err(Error::MissingTensor { name }) => assert_eq!(name, victim),
        other => panic!("expected MissingTensor, got {other:?}"),
    }

    let mut weights = random_weights(&names, 4);
    weights.insert(
        victim.to_string(),
        Tensor::zeros((16, 31), DType::F32, &Device::Cpu).unwrap(),
    );
    write_checkpoint(&dir, &c, &weights);
    let err = Qwen3Ksa::from_folder(&dir, DType::F32, &Device::Cpu).unwrap_err();
    match &err {
        Error::TensorShape {
            name,
            expected,
            got,
        } => {
            assert_eq!(name, victim);
            assert_eq!(
                (expected.as_slice(), got.as_slice()),
                (&[16, 32][..], &[16, 31][..])
            );
        }
        other => panic!("expected TensorShape, got {other:?}"),
    }
    assert!(err.to_string().contains(victim));

    // `Qwen3Ksa::new` on any VarBuilder reports the same typed errors.
    let cfg = Qwen3KsaConfig::from_json_str(&c.to_string()).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
    assert!(matches!(
        Qwen3Ksa::new(&cfg, vb),
        Err(Error::TensorShape { name, .. }) if name == victim
    ));
    weights.remove("model.norm.weight");
    weights.insert(
        victim.to_string(),
        Tensor::zeros((16, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    let vb = candle_nn::VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    assert!(matches!(
        Qwen3Ksa::new(&cfg, vb),
        Err(Error::MissingTensor { name }) if name == "model.norm.weight"
    ));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn short_inputs_have_no_summaries_and_empty_inputs_work() {
    let c = tiny_config();
    let (dir, _) = random_checkpoint("short", &c, 6);
    let model = Qwen3Ksa::from_folder(&dir, DType::F32, &Device::Cpu).unwrap();
    for n in [0, 1, 3, 4] {
        let logits = model.forward(&token_ids(2, n, 50, 1)).unwrap();
        assert_eq!(logits.dims(), &[2, n, 50]);
    }
    // A prefix shorter than a chunk sees no summary: its logits equal those
    // of the same tokens at the start of a longer input.
    let ids = token_ids(1, 9, 50, 2);
    let long = model.forward(&ids).unwrap().narrow(1, 0, 3).unwrap();
    let short = model.forward(&ids.narrow(1, 0, 3).unwrap()).unwrap();
    assert!(max_abs_diff(&long, &short) < 1e-5);
    let _ = std::fs::remove_dir_all(dir);
}
