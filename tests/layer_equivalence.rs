//! `SummaryAttention` and the decoder layer against hand-composed f64
//! computations (projections, norms, blend, RoPE, `reference::attention`,
//! `o_proj`), and the reach of a summary slot through the model exactly as
//! `KsaLayout::can_attend` allows, layer by layer.

mod model_common;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use ksa::model_config::LayerKind;
use ksa::{
    KsaConfig, KsaLayout, Qwen3Ksa, Qwen3KsaConfig, SlotKind, SummaryAttention,
    SummaryAttentionConfig,
};
use model_common::*;
use serde_json::json;
use std::collections::{BTreeSet, HashMap};

const EPS: f64 = 1e-6;

fn f64t(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F64).unwrap()
}

/// `x @ w^T` in f64.
fn proj(x: &Tensor, w: &Tensor) -> Tensor {
    f64t(x).broadcast_matmul(&f64t(w).t().unwrap()).unwrap()
}

/// RMSNorm over the last dim in f64.
fn norm(x: &Tensor, w: &Tensor) -> Tensor {
    let x = f64t(x);
    let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    x.broadcast_div(&(ms + EPS).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(&f64t(w))
        .unwrap()
}

/// NeoX rotary embedding of `x: [b, h, L, d]` at `positions`, all in f64.
fn rope(x: &Tensor, positions: &[u32], theta: f64) -> Tensor {
    let d = x.dim(3).unwrap();
    let mut cos = Vec::new();
    let mut sin = Vec::new();
    for &p in positions {
        for i in 0..d / 2 {
            let a = p as f64 * theta.powf(-(2.0 * i as f64) / d as f64);
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let l = positions.len();
    let cos = Tensor::from_vec(cos, (l, d / 2), &Device::Cpu).unwrap();
    let sin = Tensor::from_vec(sin, (l, d / 2), &Device::Cpu).unwrap();
    let x1 = x.narrow(3, 0, d / 2).unwrap();
    let x2 = x.narrow(3, d / 2, d / 2).unwrap();
    let r1 = (x1.broadcast_mul(&cos).unwrap() - x2.broadcast_mul(&sin).unwrap()).unwrap();
    let r2 = (x2.broadcast_mul(&cos).unwrap() + x1.broadcast_mul(&sin).unwrap()).unwrap();
    Tensor::cat(&[r1, r2], 3).unwrap()
}

/// Per-slot blend `mix*own + (1-mix)*text` on summary slots (dim 1), text elsewhere.
fn blend(text: &Tensor, own: &Tensor, is_summary: &[bool], mix: f64) -> Tensor {
    let m: Vec<f64> = is_summary
        .iter()
        .map(|&s| if s { mix } else { 0.0 })
        .collect();
    let mut shape = vec![1; text.rank()];
    shape[1] = m.len();
    let m = Tensor::from_vec(m, shape, &Device::Cpu).unwrap();
    (text + (own - text).unwrap().broadcast_mul(&m).unwrap()).unwrap()
}

struct Dims {
    hidden: usize,
    hq: usize,
    hkv: usize,
    d: usize,
}

/// The attention layer composed by hand in f64: `w` holds `{prefix}q_proj.weight`, ...
fn hand_attention(
    x: &Tensor,
    (w, prefix): (&HashMap<String, Tensor>, &str),
    dims: &Dims,
    positions: &[u32],
    is_summary: &[bool],
    mix: Option<f64>,
    attend: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
) -> Tensor {
    let g = |n: &str| &w[&format!("{prefix}{n}.weight")];
    let (b, l, _) = x.dims3().unwrap();
    let heads = |t: Tensor, h: usize| t.reshape((b, l, h, dims.d)).unwrap();
    let mut q = norm(&heads(proj(x, g("q_proj")), dims.hq), g("q_norm"));
    let mut k = norm(&heads(proj(x, g("k_proj")), dims.hkv), g("k_norm"));
    let mut v = heads(proj(x, g("v_proj")), dims.hkv);
    if let Some(mix) = mix {
        let qs = norm(&heads(proj(x, g("q_proj_summary")), dims.hq), g("q_norm"));
        let ks = norm(&heads(proj(x, g("k_proj_summary")), dims.hkv), g("k_norm"));
        let vs = heads(proj(x, g("v_proj_summary")), dims.hkv);
        q = blend(&q, &qs, is_summary, mix);
        k = blend(&k, &ks, is_summary, mix);
        v = blend(&v, &vs, is_summary, mix);
    }
    let t = |x: Tensor| x.transpose(1, 2).unwrap().contiguous().unwrap();
    let q = rope(&t(q), positions, 10000.0);
    let k = rope(&t(k), positions, 10000.0);
    let out = attend(&q, &k, &t(v));
    let out = out
        .transpose(1, 2)
        .unwrap()
        .reshape((b, l, dims.hq * dims.d))
        .unwrap();
    proj(&out, g("o_proj"))
}

/// The layer config of `dims` with the given window and mixing (`Some`:
/// summary projections with that mixing coefficient; `None`: none).
fn layer_config(dims: &Dims, window: usize, mix: Option<f64>) -> SummaryAttentionConfig {
    SummaryAttentionConfig {
        hidden_size: dims.hidden,
        num_attention_heads: dims.hq,
        num_key_value_heads: dims.hkv,
        head_dim: dims.d,
        rms_norm_eps: EPS,
        rope_theta: 10000.0,
        window,
        mix_coeff: mix.unwrap_or(0.0),
        summary_projections: mix.is_some(),
    }
}

fn attention_weights(dims: &Dims, summary: bool, seed: u64) -> HashMap<String, Tensor> {
    let (h, q, kv) = (dims.hidden, dims.hq * dims.d, dims.hkv * dims.d);
    let mut names = vec![
        ("q_proj.weight".to_string(), vec![q, h]),
        ("k_proj.weight".to_string(), vec![kv, h]),
        ("v_proj.weight".to_string(), vec![kv, h]),
        ("o_proj.weight".to_string(), vec![h, q]),
        ("q_norm.weight".to_string(), vec![dims.d]),
        ("k_norm.weight".to_string(), vec![dims.d]),
    ];
    if summary {
        names.push(("q_proj_summary.weight".to_string(), vec![q, h]));
        names.push(("k_proj_summary.weight".to_string(), vec![kv, h]));
        names.push(("v_proj_summary.weight".to_string(), vec![kv, h]));
    }
    random_weights(&names, seed)
}

#[test]
fn summary_attention_equals_hand_composition() {
    let dims = Dims {
        hidden: 24,
        hq: 4,
        hkv: 2,
        d: 8,
    };
    let n = 14; // C = 3, S = 2: 4 complete chunks and a tail of 2
    for (window, mix) in [
        (1, Some(0.3)),
        (0, Some(0.7)),
        (5, Some(0.5)),
        (1, None),
        (0, None),
    ] {
        let config = layer_config(&dims, window, mix);
        // Without summary projections the checkpoint does not hold them.
        let weights = attention_weights(&dims, mix.is_some(), 7 + window as u64);
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
        let layer = SummaryAttention::new(&config, vb).unwrap();
        let layout = KsaLayout::new(KsaConfig::new(3, 2, 999).unwrap(), n).unwrap();
        let x = Rng::new(3).tensor(&[2, layout.len(), dims.hidden], 0.0, 1.0);
        let ours = layer.forward(&x, &layout).unwrap();

        let is_summary: Vec<bool> = (0..layout.len())
            .map(|s| !layout.slot_kind(s).unwrap().is_text())
            .collect();
        let lay_w = layout.with_window(window);
        let hand = hand_attention(
            &x,
            (&weights, ""),
            &dims,
            &layout.position_ids(),
            &is_summary,
            mix,
            |q, k, v| ksa::reference::attention(q, k, v, &lay_w).unwrap(),
        );
        let diff = max_abs_diff(&ours, &hand);
        let scale = max_abs(&hand);
        // f32 layer (f32 cos/sin) against f64 throughout.
        assert!(
            diff <= 1e-5 * scale,
            "W={window} mix={mix:?}: diff {diff}, scale {scale}"
        );
    }
}

fn model_from(c: &serde_json::Value, seed: u64) -> (Qwen3Ksa, HashMap<String, Tensor>) {
    let cfg = Qwen3KsaConfig::from_json_str(&c.to_string()).unwrap();
    let weights = random_weights(&reference_tensors(c), seed);
    let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
    (Qwen3Ksa::new(&cfg, vb).unwrap(), weights)
}

fn mlp(x: &Tensor, w: &HashMap<String, Tensor>, p: &str) -> Tensor {
    let g = proj(x, &w[&format!("{p}mlp.gate_proj.weight")]);
    let silu = (&g * candle_nn::ops::sigmoid(&g).unwrap()).unwrap();
    let u = proj(x, &w[&format!("{p}mlp.up_proj.weight")]);
    proj(
        &(silu * u).unwrap(),
        &w[&format!("{p}mlp.down_proj.weight")],
    )
}

#[test]
fn decoder_layers_equal_hand_composition() {
    // Layer 0: KSA with an independent summary layernorm; layer 1: bypass.
    let c = with(
        &tiny_config(),
        json!({
            "summary_independent_attention_layernorm": true,
            "summary_layer_freq": [1, 0],
            "summary_sliding_chunk_num": [1, 1],
        }),
    );
    let (model, w) = model_from(&c, 5);
    let dims = Dims {
        hidden: 32,
        hq: 4,
        hkv: 2,
        d: 8,
    };
    let (h, layout) = model.embed(&token_ids(2, 19, 50, 4)).unwrap();
    let is_summary: Vec<bool> = (0..layout.len())
        .map(|s| !layout.slot_kind(s).unwrap().is_text())
        .collect();

    // KSA layer.
    let p = "model.layers.0.";
    let normed = blend(
        &norm(&h, &w[&format!("{p}input_layernorm.weight")]),
        &norm(&h, &w[&format!("{p}input_layernorm_summary.weight")]),
        &is_summary,
        1.0,
    );
    let lay_w = layout.with_window(1);
    let attn = hand_attention(
        &normed,
        (&w, &format!("{p}self_attn.")),
        &dims,
        &layout.position_ids(),
        &is_summary,
        Some(0.25),
        |q, k, v| ksa::reference::attention(q, k, v, &lay_w).unwrap(),
    );
    let h1 = (f64t(&h) + attn).unwrap();
    let hand = (&h1
        + mlp(
            &norm(&h1, &w[&format!("{p}post_attention_layernorm.weight")]),
            &w,
            p,
        ))
    .unwrap();
    let ours = model.layers()[0].forward(&h, &layout).unwrap();
    let d0 = max_abs_diff(&ours, &hand);
    assert!(d0 <= 1e-5 * max_abs(&hand), "KSA layer: {d0}");

    // Bypass layer: causal attention + MLP over text; summaries untouched.
    assert_eq!(model.layers()[1].kind(), LayerKind::Bypass);
    let p = "model.layers.1.";
    let text = layout.take_text(&ours, 1).unwrap();
    let text_pos: Vec<u32> = layout
        .text_slots()
        .iter()
        .map(|&s| layout.position_id(s as usize).unwrap())
        .collect();
    let attn = hand_attention(
        &norm(&text, &w[&format!("{p}input_layernorm.weight")]),
        (&w, &format!("{p}self_attn.")),
        &dims,
        &text_pos,
        &vec![false; text_pos.len()],
        None,
        |q, k, v| ksa::reference::causal_attention(q, k, v).unwrap(),
    );
    let t1 = (f64t(&text) + attn).unwrap();
    let hand_text = (&t1
        + mlp(
            &norm(&t1, &w[&format!("{p}post_attention_layernorm.weight")]),
            &w,
            p,
        ))
    .unwrap();
    let out = model.layers()[1].forward(&ours, &layout).unwrap();
    let d1 = max_abs_diff(&layout.take_text(&out, 1).unwrap(), &hand_text);
    assert!(d1 <= 1e-5 * max_abs(&hand_text), "bypass layer: {d1}");
    assert_eq!(
        max_abs_diff(
            &layout.take_summaries(&out, 1).unwrap(),
            &layout.take_summaries(&ours, 1).unwrap()
        ),
        0.0
    );
}

#[test]
fn summary_attention_config_follows_the_model_config() {
    let c = with(&tiny_config(), json!({"summary_layer_freq": [1, 0]}));
    let cfg = Qwen3KsaConfig::from_json_str(&c.to_string()).unwrap();
    let a0 = SummaryAttentionConfig::from_model(&cfg, 0);
    assert!(a0.summary_projections && a0.window == 1 && a0.mix_coeff == 0.25);
    assert!(!SummaryAttentionConfig::from_model(&cfg, 1).summary_projections);
    for o in [
        json!({"mix_coeff": 0.0}),
        json!({"summary_independent_parameters": false}),
    ] {
        let cfg = Qwen3KsaConfig::from_json_str(&with(&c, o).to_string()).unwrap();
        assert!(!SummaryAttentionConfig::from_model(&cfg, 0).summary_projections);
    }
}

/// Slots whose rows differ between `a` and `b` (`[b, N, ...]`), and those
/// that are bit-identical.
fn changed_slots(a: &Tensor, b: &Tensor) -> BTreeSet<usize> {
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .transpose(0, 1)
        .unwrap()
        .flatten_from(1)
        .unwrap();
    let per_slot: Vec<f32> = diff.max(1).unwrap().to_vec1().unwrap();
    per_slot
        .iter()
        .enumerate()
        .filter(|(_, &d)| d > 0.0)
        .map(|(s, _)| s)
        .collect()
}

/// Checks that perturbing summary slot `s` of the embeddings changes exactly
/// the slots the masks of the model's layers let it reach, after every layer,
/// and exactly the text logits of reached text slots.
fn check_reach(model: &Qwen3Ksa, ids: &Tensor) {
    let (h, layout) = model.embed(ids).unwrap();
    for s in layout.summary_slots() {
        let s = s as usize;
        let bump = Tensor::zeros(h.dims(), DType::F32, &Device::Cpu).unwrap();
        let row = Tensor::ones(
            (h.dim(0).unwrap(), 1, h.dim(2).unwrap()),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let bump = bump
            .slice_assign(
                &[0..h.dim(0).unwrap(), s..s + 1, 0..h.dim(2).unwrap()],
                &(row * 0.5).unwrap(),
            )
            .unwrap();
        let (mut a, mut b) = (h.clone(), (&h + bump).unwrap());
        let mut reached = BTreeSet::from([s]);
        for (i, layer) in model.layers().iter().enumerate() {
            a = layer.forward(&a, &layout).unwrap();
            b = layer.forward(&b, &layout).unwrap();
            let lay = layout.with_window(layer.attention().window());
            let token = |q: usize| match layout.slot_kind(q).unwrap() {
                SlotKind::Text { token } => Some(token),
                SlotKind::Summary { .. } => None,
            };
            reached = (0..layout.len())
                .filter(|&q| {
                    reached.contains(&q)
                        || reached.iter().any(|&k| match layer.kind() {
                            LayerKind::Summary => lay.can_attend(q, k),
                            LayerKind::Bypass => {
                                matches!((token(q), token(k)), (Some(tq), Some(tk)) if tk <= tq)
                            }
                        })
                })
                .collect();
            assert_eq!(
                changed_slots(&a, &b),
                reached,
                "summary slot {s}, after layer {i}"
            );
        }
        let la = model.logits(&a, &layout).unwrap();
        let lb = model.logits(&b, &layout).unwrap();
        let text_reached: BTreeSet<usize> = reached
            .iter()
            .filter_map(|&q| match layout.slot_kind(q).unwrap() {
                SlotKind::Text { token } => Some(token),
                SlotKind::Summary { .. } => None,
            })
            .collect();
        assert_eq!(
            changed_slots(&la, &lb),
            text_reached,
            "summary slot {s}, logits"
        );
    }
}

#[test]
fn a_summary_reaches_exactly_what_the_mask_allows() {
    // One layer, W = 1: the text logits that move are exactly the text slots
    // that may attend to the perturbed summary.
    let one = with(
        &tiny_config(),
        json!({"num_hidden_layers": 1, "summary_sliding_chunk_num": 1, "summary_chunk_size": 3}),
    );
    let (model, _) = model_from(&one, 8);
    check_reach(&model, &token_ids(2, 17, 50, 2));

    // Three layers with W = 1, 0, 2, the middle one a bypass layer.
    let deep = with(
        &tiny_config(),
        json!({
            "num_hidden_layers": 3,
            "summary_sliding_chunk_num": [1, 0, 2],
            "summary_layer_freq": [1, 0, 1],
            "summary_chunk_size": 3,
            "summary_independent_attention_layernorm": true,
        }),
    );
    let (model, _) = model_from(&deep, 9);
    check_reach(&model, &token_ids(1, 20, 50, 6));
}

#[test]
fn gradients_flow_through_the_layer() {
    // Training needs a backward pass: every parameter, summary projections
    // included, gets a nonzero gradient through norms, blend, RoPE and attention.
    let dims = Dims {
        hidden: 16,
        hq: 2,
        hkv: 1,
        d: 8,
    };
    let config = layer_config(&dims, 1, Some(0.3));
    let vars: HashMap<String, candle_core::Var> = attention_weights(&dims, true, 4)
        .into_iter()
        .map(|(k, t)| (k, candle_core::Var::from_tensor(&t).unwrap()))
        .collect();
    let tensors = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let layer = SummaryAttention::new(
        &config,
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let layout = KsaLayout::new(KsaConfig::new(3, 2, 0).unwrap(), 10).unwrap();
    let x = Rng::new(1).tensor(&[1, layout.len(), dims.hidden], 0.0, 1.0);
    let loss = layer
        .forward(&x, &layout)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert!(max_abs(g) > 0.0, "zero gradient for {name}");
    }
}

#[test]
fn projecting_a_run_of_slots_matches_the_full_sequence() {
    // What a decode cache relies on: q/k/v of a run of slots (here the last
    // chunk's text and summaries plus the tail) equal the same rows of the
    // whole sequence's projections.
    let dims = Dims {
        hidden: 24,
        hq: 4,
        hkv: 2,
        d: 8,
    };
    let config = layer_config(&dims, 1, Some(0.4));
    let weights = attention_weights(&dims, true, 12);
    let layer = SummaryAttention::new(
        &config,
        VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let layout = KsaLayout::new(KsaConfig::new(3, 2, 1).unwrap(), 13).unwrap();
    let x = Rng::new(8).tensor(&[2, layout.len(), dims.hidden], 0.0, 1.0);
    let positions = layout.position_ids();
    let full = layer
        .project(&x, &positions, &layout.summary_slots())
        .unwrap();
    let start = layout.text_slot(9).unwrap(); // chunk 3's first text slot
    let len = layout.len() - start;
    let run_summaries: Vec<u32> = layout
        .summary_slots()
        .into_iter()
        .filter(|&s| s as usize >= start)
        .map(|s| s - start as u32)
        .collect();
    assert_eq!(run_summaries.len(), 2);
    let part = layer
        .project(
            &x.narrow(1, start, len).unwrap(),
            &positions[start..],
            &run_summaries,
        )
        .unwrap();
    for (f, p) in [(&full.0, &part.0), (&full.1, &part.1), (&full.2, &part.2)] {
        let diff = max_abs_diff(&f.narrow(2, start, len).unwrap(), p);
        assert!(diff <= 1e-6 * max_abs(p), "diff {diff}");
    }
}
