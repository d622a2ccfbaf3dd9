//! Generation over the cache: greedy equals the argmax of a full recompute at
//! every step, sampling is reproducible from its seed, tokens stream in order.

mod model_common;

use candle_core::{DType, Device, Tensor};
use ksa::{GenerateOptions, Qwen3Ksa, Qwen3KsaConfig, Sampling};
use model_common::*;
use serde_json::json;

fn model() -> Qwen3Ksa {
    let c = with(
        &tiny_config(),
        json!({ "summary_sliding_chunk_num": "[0, 1]" }),
    );
    let weights = random_weights(&reference_tensors(&c), 9);
    let cfg = Qwen3KsaConfig::from_json_str(&c.to_string()).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    Qwen3Ksa::new(&cfg, vb).unwrap()
}

fn argmax_by_recompute(model: &Qwen3Ksa, text: &[u32]) -> u32 {
    let ids = Tensor::from_slice(text, (1, text.len()), &Device::Cpu).unwrap();
    let logits = model.forward(&ids).unwrap();
    logits
        .narrow(1, text.len() - 1, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .argmax(0)
        .unwrap()
        .to_scalar::<u32>()
        .unwrap()
}

#[test]
fn greedy_equals_recompute_and_streams() {
    let model = model();
    let prompts: [&[u32]; 2] = [&[1, 2, 3], &[7, 8, 9, 10, 11, 12, 13]];
    let mut streamed = vec![vec![]; 2];
    let options = GenerateOptions {
        max_new_tokens: 14,
        ..GenerateOptions::default()
    };
    let out = model
        .generate(&prompts, &options, |seq, t| streamed[seq].push(t))
        .unwrap();
    assert_eq!(out, streamed);
    for (prompt, generated) in prompts.iter().zip(&out) {
        assert_eq!(generated.len(), 14);
        let mut text = prompt.to_vec();
        for &t in generated {
            assert_eq!(
                t,
                argmax_by_recompute(&model, &text),
                "after {} tokens",
                text.len()
            );
            text.push(t);
        }
    }
}

#[test]
fn sampling_is_seeded_and_stops() {
    let model = model();
    let prompts: [&[u32]; 2] = [&[4, 5], &[6]];
    let sample = |seed| {
        let options = GenerateOptions {
            max_new_tokens: 10,
            sampling: Sampling::TopP {
                temperature: 1.5,
                top_p: 0.9,
                seed,
            },
            stop_tokens: vec![],
        };
        model.generate(&prompts, &options, |_, _| {}).unwrap()
    };
    let (a, b, c) = (sample(1), sample(1), sample(2));
    assert_eq!(a, b);
    assert_ne!(a, c);
    // Stopping at a token the first run emitted ends that sequence there.
    let stop = a[0][3];
    let options = GenerateOptions {
        max_new_tokens: 10,
        sampling: Sampling::TopP {
            temperature: 1.5,
            top_p: 0.9,
            seed: 1,
        },
        stop_tokens: vec![stop],
    };
    let stopped = model.generate(&prompts, &options, |_, _| {}).unwrap();
    let first = a[0].iter().position(|&t| t == stop).unwrap();
    assert_eq!(stopped[0], a[0][..=first]);
    assert!(model.generate(&[&[]], &options, |_, _| {}).is_err());
}
