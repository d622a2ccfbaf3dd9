//! Training through `Qwen3Ksa` on CPU: gradients reach the summary
//! embeddings and summary projections where the mask lets summaries matter,
//! are exactly zero where it does not, and one AdamW step lowers the loss.

mod model_common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder};
use ksa::{Qwen3Ksa, Qwen3KsaConfig, SlotKind};
use model_common::*;
use serde_json::{json, Value};
use std::collections::HashMap;

/// The model of config `c` with random weights held in `Var`s (by name).
fn trainable(c: &Value, seed: u64) -> (Qwen3Ksa, HashMap<String, Var>) {
    let config = Qwen3KsaConfig::from_json_str(&c.to_string()).unwrap();
    let vars: HashMap<String, Var> = random_weights(&reference_tensors(c), seed)
        .into_iter()
        .map(|(k, t)| (k, Var::from_tensor(&t).unwrap()))
        .collect();
    let tensors = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    (Qwen3Ksa::new(&config, vb).unwrap(), vars)
}

/// Next-token cross-entropy over every text position.
fn lm_loss(logits: &Tensor, ids: &Tensor) -> Tensor {
    let (b, n, v) = logits.dims3().unwrap();
    let logits = logits
        .narrow(1, 0, n - 1)
        .unwrap()
        .reshape((b * (n - 1), v));
    let targets = ids.narrow(1, 1, n - 1).unwrap().flatten_all().unwrap();
    candle_nn::loss::cross_entropy(&logits.unwrap(), &targets).unwrap()
}

fn is_zero(t: &Tensor) -> bool {
    max_abs(t) == 0.0
}

/// Gradient of the `rows` rows of `embed_tokens` (the summary embeddings).
fn summary_rows(grad: &Tensor, rows: std::ops::Range<usize>) -> Tensor {
    grad.narrow(0, rows.start, rows.len()).unwrap()
}

#[test]
fn gradients_reach_summary_embeddings_and_projections() {
    // Two layers, W = 1 then 2, 6 chunks of 4: the last chunks' text reads old
    // summaries in both layers. tiny_config: S = 2 (rows 50, 51), mix 0.25.
    let c = tiny_config();
    let (model, vars) = trainable(&c, 3);
    let ids = token_ids(2, 24, 50, 1);
    let grads = lm_loss(&model.forward(&ids).unwrap(), &ids)
        .backward()
        .unwrap();
    let g = |name: &str| grads.get(vars[name].as_tensor()).unwrap().clone();
    let embed = g("model.embed_tokens.weight");
    for row in 50..52 {
        assert!(
            !is_zero(&summary_rows(&embed, row..row + 1)),
            "summary row {row}"
        );
    }
    for p in ["q", "k", "v"] {
        let name = format!("model.layers.0.self_attn.{p}_proj_summary.weight");
        assert!(!is_zero(&g(&name)), "{name}");
    }
    // In the last layer text reads the summaries' keys and values, but a
    // summary's own attention output only feeds its own slot, which no
    // later layer and not the LM head reads: its query gets exactly nothing.
    for p in ["k", "v"] {
        let name = format!("model.layers.1.self_attn.{p}_proj_summary.weight");
        assert!(!is_zero(&g(&name)), "{name}");
    }
    assert!(is_zero(&g(
        "model.layers.1.self_attn.q_proj_summary.weight"
    )));
}

#[test]
fn summary_only_parameters_get_exactly_zero_gradient_when_no_text_reads_summaries() {
    // One layer whose window covers every chunk: no text query reads any
    // summary, so nothing summary-only (summary embedding rows, summary
    // projections, the summary input norm) can change the text logits.
    // The same model with W = 1 is the control: every one of them matters,
    // except the summary query projection, exactly zero in the last layer
    // whatever the window (see the test above).
    let summary_only = [
        "model.layers.0.self_attn.k_proj_summary.weight",
        "model.layers.0.self_attn.v_proj_summary.weight",
        "model.layers.0.input_layernorm_summary.weight",
    ];
    for (window, zero) in [(100, true), (6, true), (1, false)] {
        let c = with(
            &tiny_config(),
            json!({
                "num_hidden_layers": 1,
                "summary_sliding_chunk_num": window,
                "summary_independent_attention_layernorm": true,
            }),
        );
        let (model, vars) = trainable(&c, 5);
        let ids = token_ids(2, 23, 50, 2); // 5 complete chunks and a tail
        let grads = lm_loss(&model.forward(&ids).unwrap(), &ids)
            .backward()
            .unwrap();
        let g = |name: &str| grads.get(vars[name].as_tensor()).unwrap().clone();
        let embed = g("model.embed_tokens.weight");
        assert_eq!(is_zero(&summary_rows(&embed, 50..52)), zero, "W = {window}");
        assert!(!is_zero(&embed.narrow(0, 0, 50).unwrap()));
        for name in summary_only {
            assert_eq!(is_zero(&g(name)), zero, "{name}, W = {window}");
        }
        assert!(is_zero(&g(
            "model.layers.0.self_attn.q_proj_summary.weight"
        )));
    }
}

#[test]
fn a_summary_inside_every_window_has_exactly_zero_gradient() {
    // One layer, W = 1, per slot: the input of a summary slot gets a
    // gradient iff some text query may attend to it. 22 tokens, C = 4: the
    // summaries of the last complete chunk (4) lie inside the window of every
    // later query (the tail, chunk 5), so theirs is exactly zero; chunks
    // 0 to 3 are old for the tail and get nonzero ones.
    let c = with(
        &tiny_config(),
        json!({"num_hidden_layers": 1, "summary_sliding_chunk_num": 1}),
    );
    let (model, _) = trainable(&c, 7);
    let ids = token_ids(1, 22, 50, 3);
    let (h, layout) = model.embed(&ids).unwrap();
    let h = Var::from_tensor(&h).unwrap();
    let out = model.layers()[0].forward(h.as_tensor(), &layout).unwrap();
    let loss = lm_loss(&model.logits(&out, &layout).unwrap(), &ids);
    let grad = loss.backward().unwrap().get(h.as_tensor()).unwrap().clone();
    let window = layout.with_window(1);
    let (mut zeros, mut nonzeros) = (0, 0);
    for slot in 0..layout.len() {
        if !matches!(layout.slot_kind(slot), Some(SlotKind::Summary { .. })) {
            continue;
        }
        let read = (0..layout.len())
            .any(|q| layout.slot_kind(q).unwrap().is_text() && window.can_attend(q, slot));
        let row = grad.narrow(1, slot, 1).unwrap();
        assert_eq!(is_zero(&row), !read, "summary slot {slot}");
        if read {
            nonzeros += 1;
        } else {
            zeros += 1;
        }
    }
    assert_eq!((zeros, nonzeros), (2, 8), "5 chunks of S = 2 summaries");
}

#[test]
fn one_adamw_step_lowers_the_loss_on_a_fixed_batch() {
    let c = tiny_config();
    let (model, vars) = trainable(&c, 11);
    let ids = token_ids(4, 30, 50, 4);
    let mut opt = AdamW::new(
        vars.into_values().collect(),
        ParamsAdamW {
            lr: 1e-3,
            ..Default::default()
        },
    )
    .unwrap();
    let loss = |m: &Qwen3Ksa| lm_loss(&m.forward(&ids).unwrap(), &ids);
    let before = loss(&model);
    opt.backward_step(&before).unwrap();
    let (before, after) = (
        before.to_scalar::<f32>().unwrap(),
        loss(&model).to_scalar::<f32>().unwrap(),
    );
    assert!(after < before, "loss {before} -> {after}");
}
