//! Numerics of the whole model: equivalence with candle-transformers' Qwen3
//! (an implementation nobody here wrote) when every window covers every
//! chunk, and f32 against f64, bf16 against f32 on the same weights.

mod model_common;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::qwen3;
use ksa::Qwen3Ksa;
use model_common::*;
use serde_json::json;

/// The peer's logits at every position (`qwen3_peer_logits`) and its
/// `ModelForCausalLM`'s, which returns the last position only.
fn peer_logits(
    dir: &std::path::Path,
    config: &serde_json::Value,
    ids: &Tensor,
) -> (Tensor, Tensor) {
    let logits = qwen3_peer_logits(dir, config, ids);
    let (cfg, vb) = qwen3_peer(dir, config);
    let mut lm = qwen3::ModelForCausalLM::new(&cfg, vb).unwrap();
    let last = lm.forward(ids, 0).unwrap();
    (logits, last)
}

#[test]
fn full_window_model_equals_candle_transformers_qwen3() {
    // n = 23 with C = 4 gives 5 complete chunks (10 summary slots) and a tail;
    // W = 6 covers every chunk, so summaries cannot reach any text token.
    for (tied, mix) in [(true, 0.25), (false, 0.0)] {
        let c = with(
            &tiny_config(),
            json!({
                "tie_word_embeddings": tied,
                "mix_coeff": mix,
                "summary_sliding_chunk_num": 6,
                "summary_independent_attention_layernorm": true,
            }),
        );
        let (dir, _) = random_checkpoint("peer", &c, 11);
        let model = Qwen3Ksa::from_folder(&dir, DType::F32, &Device::Cpu).unwrap();
        let ids = token_ids(2, 23, 50, 5);
        let ours = model.forward(&ids).unwrap();
        let (theirs, last) = peer_logits(&dir, &c, &ids);
        let theirs = theirs.narrow(2, 0, 50).unwrap();
        let scale = max_abs(&theirs);
        let diff = max_abs_diff(&ours, &theirs);
        eprintln!(
            "tied={tied}: max |ours - candle-transformers| = {diff:.2e} (max |logit| {scale:.2})"
        );
        // f32 everywhere except our f64 reference attention and norm/rotary
        // kernels that round differently: measured ~4e-7 relative, allowed 1e-5.
        assert!(
            diff <= 1e-5 * scale.max(1.0),
            "tied={tied}: max diff {diff} (scale {scale})"
        );
        let ours_last = ours.narrow(1, 22, 1).unwrap();
        let diff_last = max_abs_diff(&ours_last, &last.narrow(2, 0, 50).unwrap());
        assert!(
            diff_last <= 1e-5 * scale.max(1.0),
            "last position: {diff_last}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn f32_matches_f64_and_bf16_matches_f32() {
    // Small windows so summaries matter: W = 0 on layer 0, W = 1 on layer 1.
    let c = with(&tiny_config(), json!({"summary_sliding_chunk_num": [0, 1]}));
    let (dir, _) = random_checkpoint("dtypes", &c, 21);
    let ids = token_ids(1, 30, 50, 9);
    let run = |dtype| {
        Qwen3Ksa::from_folder(&dir, dtype, &Device::Cpu)
            .unwrap()
            .forward(&ids)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    let (f64_, f32_, bf16) = (run(DType::F64), run(DType::F32), run(DType::BF16));
    let scale = max_abs(&f64_).max(1.0);
    let d32 = max_abs_diff(&f32_, &f64_) / scale;
    let d16 = max_abs_diff(&bf16, &f32_) / scale;
    eprintln!("relative max diff: f32 vs f64 {d32:.2e}, bf16 vs f32 {d16:.2e}");
    // f32 rounding (~6e-8) grown through 2 layers; cos/sin are f32 in both.
    assert!(d32 <= 1e-5, "f32 vs f64: {d32}");
    // bf16 keeps 8 mantissa bits (~4e-3 per rounding) through 2 layers.
    assert!(d16 <= 6e-2, "bf16 vs f32: {d16}");
    let _ = std::fs::remove_dir_all(dir);
}
