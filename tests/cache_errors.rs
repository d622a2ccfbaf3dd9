//! Cache memory accounting and bad input: typed errors that leave the cache
//! exactly as it was, for both storages (host buffers and, here, CPU tensors).

mod model_common;

use candle_core::{DType, Device};
use ksa::cache::CacheStorage;
use ksa::{Error, KsaCache, LogitRows, Qwen3Ksa, Qwen3KsaConfig};
use model_common::*;
use serde_json::json;

/// C = 4, S = 2; layer 0 has W = 1, layer 1 W = 1000 (whole context).
fn model(windows: &str, seed: u64) -> Qwen3Ksa {
    model_in(windows, seed, DType::F32)
}

fn model_in(windows: &str, seed: u64, dtype: DType) -> Qwen3Ksa {
    let c = with(
        &tiny_config(),
        json!({ "summary_sliding_chunk_num": windows }),
    );
    let weights = random_weights(&reference_tensors(&c), seed);
    let cfg = Qwen3KsaConfig::from_json_str(&c.to_string()).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(weights, dtype, &Device::Cpu);
    Qwen3Ksa::new(&cfg, vb).unwrap()
}

#[test]
fn memory_follows_window_and_summaries_whatever_the_batch() {
    for storage in [CacheStorage::Host, CacheStorage::Tensors] {
        memory_follows_window_and_summaries_whatever_the_batch_in(storage);
    }
}

fn memory_follows_window_and_summaries_whatever_the_batch_in(storage: CacheStorage) {
    let model = model("[1, 1000]", 1);
    let (c, s, w, kv_row) = (4, 2, 1, 2 * 2 * 8 * 4); // K+V, 2 KV heads of 8, f32
    let long = text_ids(40, 1);
    let short = text_ids(9, 2);
    // Batched: two sequences, one long, one short, stepped together.
    let mut batched = KsaCache::with_storage(&model, 2, None, storage).unwrap();
    batched
        .append(
            &model,
            &[(0, &long[..1]), (1, &short[..1])],
            LogitRows::Last,
        )
        .unwrap();
    for i in 1..40 {
        let mut inputs = vec![(0, &long[i..i + 1])];
        if i < 9 {
            inputs.push((1, &short[i..i + 1]));
        }
        batched.append(&model, &inputs, LogitRows::Last).unwrap();
        let n = i + 1;
        assert_eq!(
            batched.live_rows(0, 0),
            Some((n.min(w * c + n % c), s * (n / c)))
        );
        assert_eq!(batched.live_rows(1, 0), Some((n, s * (n / c))));
    }
    // Allocation (growth by doubling, compaction of text that left the
    // window) stays within twice the largest live rows.
    let live = (w * c + c) + s * (40 / c);
    let alone = |t: &[u32]| {
        let mut cache = KsaCache::with_storage(&model, 1, None, storage).unwrap();
        for i in 0..t.len() {
            cache
                .append(&model, &[(0, &t[i..i + 1])], LogitRows::Last)
                .unwrap();
        }
        cache
    };
    let (a, b) = (alone(&long), alone(&short));
    // Independent of batch composition: each sequence costs what it costs alone.
    assert_eq!(batched.bytes(), a.bytes() + b.bytes());
    assert!(a.layer_bytes(0) <= 2 * live.next_power_of_two() * kv_row);
    eprintln!(
        "n = 40: layer 0 (W = 1) {} B, layer 1 (whole context) {} B",
        a.layer_bytes(0),
        a.layer_bytes(1)
    );
}

#[test]
fn fixed_capacity_never_reallocates_and_refuses_overflow() {
    for storage in [CacheStorage::Host, CacheStorage::Tensors] {
        fixed_capacity_never_reallocates_and_refuses_overflow_in(storage);
    }
}

fn fixed_capacity_never_reallocates_and_refuses_overflow_in(storage: CacheStorage) {
    let model = model("[1, 1000]", 2);
    let t = text_ids(21, 3);
    // Window store W*C + C = 8 rows and 10 summaries on layer 0; 20 text rows and 10 summaries on layer 1.
    let bytes = (8 + 10 + 20 + 10) * 2 * 2 * 8 * 4;
    let full = || {
        let mut cache = KsaCache::with_storage(&model, 1, Some(20), storage).unwrap();
        assert_eq!(cache.bytes(), bytes);
        cache
            .append(&model, &[(0, &t[..7])], LogitRows::Last)
            .unwrap();
        for i in 7..20 {
            cache.step(&model, &t[i..i + 1]).unwrap();
            assert_eq!(cache.bytes(), bytes, "reallocated at n = {}", i + 1);
        }
        cache
    };
    // Built twice rather than cloned: a clone of tensor storage shares the
    // tensors, so it could not show a write.
    let (mut cache, before) = (full(), full());
    let err = cache.step(&model, &t[20..21]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::CacheCapacity {
                sequence: 0,
                len: 20,
                adding: 1,
                capacity: 20
            }
        ),
        "{err}"
    );
    assert_eq!(cache, before);
}

#[test]
fn bad_input_is_a_typed_error_and_changes_nothing() {
    for storage in [CacheStorage::Host, CacheStorage::Tensors] {
        bad_input_is_a_typed_error_and_changes_nothing_in(storage);
    }
}

fn bad_input_is_a_typed_error_and_changes_nothing_in(storage: CacheStorage) {
    let model = model("[1, 2]", 4);
    let t = text_ids(11, 5);
    let started = || {
        let mut cache = KsaCache::with_storage(&model, 2, Some(12), storage).unwrap();
        cache
            .append(&model, &[(0, &t[..7]), (1, &t[..3])], LogitRows::Last)
            .unwrap();
        cache
    };
    // Built twice rather than cloned: a clone of tensor storage shares the
    // tensors, so it could not show a write.
    let (mut cache, before) = (started(), started());
    let expect = |result: ksa::Result<Vec<candle_core::Tensor>>, check: &dyn Fn(&Error) -> bool| {
        let err = result.unwrap_err();
        assert!(check(&err), "unexpected error: {err}");
    };
    expect(
        cache.append(&model, &[(0, &t[..1]), (2, &t[..1])], LogitRows::Last),
        &|e| matches!(e, Error::UnknownSequence { index: 2, batch: 2 }),
    );
    expect(
        cache.append(&model, &[(1, &t[..1]), (1, &t[..1])], LogitRows::Last),
        &|e| matches!(e, Error::DuplicateSequence { index: 1 }),
    );
    // Valid first input, bad token in the second: nothing of the first is kept.
    expect(
        cache.append(&model, &[(0, &t[..2]), (1, &[3, 50])], LogitRows::Last),
        &|e| matches!(e, Error::TokenOutOfRange { token: 50, .. }),
    );
    expect(cache.append(&model, &[(1, &[52])], LogitRows::Last), &|e| {
        matches!(e, Error::TokenOutOfRange { token: 52, .. })
    });
    expect(
        cache.append(&model, &[(1, &t[..2]), (0, &t[..6])], LogitRows::Last),
        &|e| {
            matches!(
                e,
                Error::CacheCapacity {
                    sequence: 0,
                    len: 7,
                    adding: 6,
                    capacity: 12
                }
            )
        },
    );
    let other = self::model("[2, 2]", 4);
    expect(
        cache.append(&other, &[(0, &t[..1])], LogitRows::Last),
        &|e| matches!(e, Error::CacheModelMismatch(_)),
    );
    let err = cache.step(&model, &t[..3]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DimMismatch {
                what: "batch size",
                a_val: 3,
                b_val: 2,
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(
        cache.seq_len(5),
        Err(Error::UnknownSequence { index: 5, batch: 2 })
    ));
    assert_eq!(cache, before);
    // Empty inputs are no-ops with empty logits.
    let empty = cache.append(&model, &[(1, &[])], LogitRows::All).unwrap();
    assert_eq!(empty[0].dims(), &[0, 50]);
    assert_eq!(cache, before);
    // And the cache still works after the refusals.
    cache.step(&model, &t[..2]).unwrap();
    assert_eq!(cache.seq_len(0).unwrap(), 8);
}

/// Both storages count the bytes of the model's dtype (a bf16 host cache is
/// half an f32 one); tensor storage keeps to the model's dtype and device,
/// and clones share their tensors until one writes.
#[test]
fn tensor_storage_bytes_dtype_and_clones() {
    let t = text_ids(12, 7);
    let f32_model = model("[1, 1000]", 3);
    let bf16_model = model_in("[1, 1000]", 3, DType::BF16);
    assert_eq!(
        KsaCache::default_storage(&bf16_model).unwrap(),
        CacheStorage::Host
    );
    let host = KsaCache::with_capacity(&bf16_model, 1, 20).unwrap();
    let host_f32 = KsaCache::with_capacity(&f32_model, 1, 20).unwrap();
    let mut cache =
        KsaCache::with_storage(&bf16_model, 1, Some(20), CacheStorage::Tensors).unwrap();
    // Host storage keeps a bf16 model's dtype: the bytes of the bf16 tensors,
    // half those of an f32 model's host buffers.
    assert_eq!(
        cache.bytes(),
        host.bytes(),
        "bf16 tensors vs bf16 host buffers"
    );
    assert_eq!(
        host.bytes() * 2,
        host_f32.bytes(),
        "bf16 vs f32 host buffers"
    );
    assert_eq!(cache.layer_bytes(0), host.layer_bytes(0));
    assert_eq!(host.layer_bytes(0) * 2, host_f32.layer_bytes(0));
    cache
        .append(&bf16_model, &[(0, &t[..5])], LogitRows::Last)
        .unwrap();
    let before = cache.clone();
    let err = cache
        .append(&f32_model, &[(0, &t[5..6])], LogitRows::Last)
        .unwrap_err();
    assert!(matches!(err, Error::CacheModelMismatch(_)), "{err}");
    assert_eq!(cache, before);
    // A clone shares the tensors until one side writes: stepping the clone
    // (past the window: compaction moves rows) must not change what the
    // original reads, so both then give the same logits for the same tokens.
    let mut clone = cache.clone();
    let logits = |c: &mut KsaCache| -> Vec<f32> {
        let l = c
            .append(&bf16_model, &[(0, &t[5..12])], LogitRows::All)
            .unwrap();
        l[0].to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let from_clone = logits(&mut clone);
    assert_eq!(logits(&mut cache), from_clone);
    assert_eq!(cache, clone);
}
