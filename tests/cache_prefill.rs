//! Chunked prefill: `KsaCache::append` of a long input runs in steps of
//! `prefill_chunk` text tokens on the tiled block-sparse CPU kernel, and must
//! compute what the full forward computes at every token, whatever the chunk
//! (1, C-1, C, C+1, a multiple of the CPU query tile, larger than the prompt),
//! for both storages, for fresh and continued prompts and ragged batches; the
//! cache then decodes on as the forward says (which reads every cached row).
//! Bad input (chunk 0, over capacity, an overflow some chunks in, a bad token
//! in the last chunk) is a typed error that leaves the cache unchanged.

mod model_common;

use candle_core::{DType, Device, Tensor};
use ksa::model_config::LayerKind;
use ksa::{CacheStorage, Error, KsaCache, LogitRows, Qwen3Ksa, Qwen3KsaConfig};
use model_common::*;
use serde_json::{json, Value};

/// C = 4, S = 2; windows 1, 0 and 3 chunks and a bypass layer, so that
/// queries see summaries, a window starting mid-prompt and all text.
const C: usize = 4;

fn config() -> Value {
    with(
        &tiny_config(),
        json!({
            "num_hidden_layers": 4,
            "summary_chunk_size": C,
            "summary_token_num": 2,
            "summary_sliding_chunk_num": [1, 0, 3, 2],
            "summary_layer_freq": [1, 1, 1, 0],
        }),
    )
}

fn model(dtype: DType) -> Qwen3Ksa {
    let config = config();
    let weights = random_weights(&reference_tensors(&config), 5);
    let cfg = Qwen3KsaConfig::from_json_str(&config.to_string()).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(weights, dtype, &Device::Cpu);
    Qwen3Ksa::new(&cfg, vb).unwrap()
}

/// f32: the tiled step sums in another order than the tiled full forward
/// (different tile boundaries); allowed as in tests/cache_decode.rs.
const F32_TOL: f64 = 2e-5;
/// bf16/f16: one rounding of the attention output and of every activation.
const HALF_TOL: f64 = 2e-2;

fn forward(model: &Qwen3Ksa, tokens: &[u32]) -> Tensor {
    let ids = Tensor::from_slice(tokens, (1, tokens.len()), &Device::Cpu).unwrap();
    model.forward(&ids).unwrap().squeeze(0).unwrap()
}

/// `got: [m, V]` against rows `start..start+m` of `want: [n, V]`, relative to
/// the logits' scale.
fn check(got: &Tensor, want: &Tensor, start: usize, what: &str, tol: f64) {
    let m = got.dim(0).unwrap();
    let want = want.narrow(0, start, m).unwrap();
    let diff = max_abs_diff(got, &want) / max_abs(&want).max(1.0);
    assert!(
        diff <= tol,
        "{what}: tokens {start}..{}: relative diff {diff:.2e} > {tol:.0e}",
        start + m
    );
}

/// Every layer holds `min(n, W*C + n%C)` text and `S*floor(n/C)` summary rows
/// (all text on the bypass layer).
fn check_rows(cache: &KsaCache, model: &Qwen3Ksa, seq: usize) {
    let cfg = model.config();
    let n = cache.seq_len(seq).unwrap();
    for (l, kind) in cfg.layer_kinds.iter().enumerate() {
        let want = match kind {
            LayerKind::Summary => (n.min(cfg.windows[l] * C + n % C), 2 * (n / C)),
            LayerKind::Bypass => (n, 0),
        };
        assert_eq!(cache.live_rows(l, seq), Some(want), "layer {l}, n {n}");
    }
}

/// Prefills `pieces` (consecutive parts of one text: a prompt, then
/// continued prompts) with chunk `chunk`, checking every logit, then decodes
/// `decode` tokens, checking each.
fn run(dtype: DType, storage: CacheStorage, chunk: usize, pieces: &[usize], decode: usize) {
    let tol = if dtype == DType::F32 {
        F32_TOL
    } else {
        HALF_TOL
    };
    let model = model(dtype);
    let n: usize = pieces.iter().sum::<usize>() + decode;
    let tokens = text_ids(n, chunk as u64);
    let want = forward(&model, &tokens);
    let mut cache = KsaCache::with_storage(&model, 1, None, storage)
        .unwrap()
        .with_prefill_chunk(chunk)
        .unwrap();
    assert_eq!(cache.prefill_chunk(), chunk);
    let what = format!("{dtype:?} {storage:?} chunk {chunk}");
    let mut at = 0;
    for &m in pieces {
        let logits = cache
            .append(&model, &[(0, &tokens[at..at + m])], LogitRows::All)
            .unwrap();
        assert_eq!(logits[0].dims(), &[m, model.config().logits_size()]);
        check(&logits[0], &want, at, &what, tol);
        at += m;
        assert_eq!(cache.seq_len(0).unwrap(), at);
        check_rows(&cache, &model, 0);
    }
    for _ in 0..decode {
        let logits = cache.step(&model, &tokens[at..at + 1]).unwrap();
        check(&logits, &want, at, &format!("{what} decode"), tol);
        at += 1;
    }
    check_rows(&cache, &model, 0);
}

#[test]
fn chunked_prefill_equals_the_forward_for_every_chunk_size() {
    // 150 tokens: several CPU query tiles (64) and key tiles (128), a
    // partial last chunk; the prompt then a continued prompt.
    for chunk in [1, C - 1, C, C + 1, 64, 1000] {
        run(DType::F32, CacheStorage::Host, chunk, &[131, 19], 6);
    }
}

#[test]
fn chunked_prefill_equals_the_forward_on_tensor_storage_and_half_dtypes() {
    for chunk in [C + 1, 64] {
        run(DType::F32, CacheStorage::Tensors, chunk, &[97, 40], 3);
    }
    for dtype in [DType::BF16, DType::F16] {
        for storage in [CacheStorage::Host, CacheStorage::Tensors] {
            run(dtype, storage, 33, &[120], 3);
        }
    }
}

#[test]
fn the_last_logits_of_a_chunked_prompt_are_the_forwards() {
    let model = model(DType::F32);
    let tokens = text_ids(90, 9);
    let want = forward(&model, &tokens);
    let mut cache = KsaCache::new(&model, 1)
        .unwrap()
        .with_prefill_chunk(16)
        .unwrap();
    let logits = cache
        .append(&model, &[(0, &tokens)], LogitRows::Last)
        .unwrap();
    assert_eq!(logits[0].dim(0).unwrap(), 1);
    check(&logits[0], &want, 89, "last", F32_TOL);
}

#[test]
fn a_ragged_batch_prefills_in_chunks() {
    // Sequence 0 continues a prompt, sequence 1 starts one, sequence 2 gets
    // one token and sequence 3 nothing, in one append with chunk 7: rounds
    // feed the sequences that still have tokens.
    let model = model(DType::F32);
    let texts: Vec<Vec<u32>> = (0..4).map(|b| text_ids(120, 20 + b)).collect();
    let want: Vec<Tensor> = texts.iter().map(|t| forward(&model, t)).collect();
    let mut cache = KsaCache::new(&model, 4)
        .unwrap()
        .with_prefill_chunk(7)
        .unwrap();
    cache
        .append(&model, &[(0, &texts[0][..30])], LogitRows::Last)
        .unwrap();
    let inputs: [(usize, &[u32]); 4] = [
        (0, &texts[0][30..101]),
        (1, &texts[1][..58]),
        (2, &texts[2][..1]),
        (3, &texts[3][..0]),
    ];
    let logits = cache.append(&model, &inputs, LogitRows::All).unwrap();
    for (b, (start, m)) in [(30, 71), (0, 58), (0, 1), (0, 0)].into_iter().enumerate() {
        assert_eq!(logits[b].dim(0).unwrap(), m);
        if m > 0 {
            check(&logits[b], &want[b], start, &format!("seq {b}"), F32_TOL);
        }
        assert_eq!(cache.seq_len(b).unwrap(), start + m);
        check_rows(&cache, &model, b);
    }
    // The batch decodes on from its ragged lengths.
    let at = [101, 58, 1, 0];
    let tokens: Vec<u32> = (0..4).map(|b| texts[b][at[b]]).collect();
    let next = cache.step(&model, &tokens).unwrap();
    for b in 0..4 {
        check(
            &next.narrow(0, b, 1).unwrap(),
            &want[b],
            at[b],
            &format!("seq {b} decode"),
            F32_TOL,
        );
    }
}

#[test]
fn bad_prefill_input_is_a_typed_error_and_leaves_the_cache_unchanged() {
    let model = model(DType::F32);
    let tokens = text_ids(100, 3);
    let cache = KsaCache::new(&model, 2).unwrap();
    assert_eq!(cache.prefill_chunk(), ksa::cache::DEFAULT_PREFILL_CHUNK);
    assert!(matches!(
        cache.with_prefill_chunk(0),
        Err(Error::InvalidConfig(_))
    ));

    for storage in [CacheStorage::Host, CacheStorage::Tensors] {
        let mut cache = KsaCache::with_storage(&model, 2, Some(60), storage)
            .unwrap()
            .with_prefill_chunk(8)
            .unwrap();
        // A prompt over the capacity.
        let before = cache.clone();
        let err = cache.append(&model, &[(0, &tokens[..61])], LogitRows::Last);
        assert!(matches!(
            err,
            Err(Error::CacheCapacity { capacity: 60, .. })
        ));
        assert_eq!(cache, before);

        // A continued prompt whose first chunks fit and a later one overflows.
        cache
            .append(&model, &[(0, &tokens[..30])], LogitRows::Last)
            .unwrap();
        let before = cache.clone();
        let err = cache.append(
            &model,
            &[(1, &tokens[..20]), (0, &tokens[30..70])],
            LogitRows::All,
        );
        assert!(matches!(
            err,
            Err(Error::CacheCapacity {
                sequence: 0,
                len: 30,
                adding: 40,
                capacity: 60
            })
        ));
        assert_eq!(cache, before);

        // A bad token in the last chunk of a long input.
        let mut bad = tokens[30..60].to_vec();
        bad[29] = 50; // the first summary row's id
        let err = cache.append(&model, &[(0, &bad)], LogitRows::Last);
        assert!(matches!(err, Err(Error::TokenOutOfRange { token: 50, .. })));
        assert_eq!(cache, before);
        assert_eq!(cache.seq_len(0).unwrap(), 30);
        assert_eq!(cache.seq_len(1).unwrap(), 0);
    }
}
