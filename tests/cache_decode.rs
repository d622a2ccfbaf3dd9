//! The decode cache computes what a full forward computes: random C, S, per-layer
//! windows (0 included) and a bypass layer, ragged batches fed as one prompt
//! plus decode steps or as several continued pieces; logits at every token equal
//! `Qwen3Ksa::forward` over the whole text, and the cache holds exactly
//! `min(n, W*C + n % C)` text and `S*floor(n/C)` summary rows per KSA layer.
//!
//! Both storages: host f32 buffers and tensors (here CPU tensors in f32, bf16
//! and f16, attended by `ksa::cpu::decode::attend_rows` over the same per-row
//! `KvRows` lists the CUDA kernels take), which must give the host's logits
//! exactly. With feature `cuda` and a GPU, the same check runs with the model
//! on CUDA in bf16, through the decode kernels.

mod model_common;

use candle_core::{DType, Device, Tensor};
use ksa::cache::CacheStorage;
use ksa::model_config::LayerKind;
use ksa::{KsaCache, LogitRows, Qwen3Ksa, Qwen3KsaConfig};
use model_common::*;
use proptest::prelude::*;
use serde_json::{json, Value};

#[derive(Debug, Clone)]
struct Case {
    c: usize,
    s: usize,
    windows: Vec<usize>,
    bypass: Option<usize>,
    mix: bool,
    summary_norm: bool,
    positions: (&'static str, &'static str),
    prompts: Vec<usize>,
    totals: Vec<usize>,
    pieces: Vec<usize>,
    /// The tiny config's head_dim unless given (the CUDA kernels take 64 and 128).
    head_dim: Option<usize>,
    seed: u64,
}

fn config(case: &Case) -> Value {
    let layers = case.windows.len();
    let mut c = with(
        &tiny_config(),
        json!({
            "num_hidden_layers": layers,
            "summary_chunk_size": case.c,
            "summary_token_num": case.s,
            "vocab_size": 50 + case.s,
            "summary_sliding_chunk_num": case.windows,
            "mix_coeff": if case.mix { 0.25 } else { 0.0 },
            "summary_independent_parameters": case.mix,
            "summary_independent_attention_layernorm": case.summary_norm,
            "summary_chunk_position_ids_type": case.positions.0,
            "summary_token_position_ids_type": case.positions.1,
        }),
    );
    if let Some(b) = case.bypass {
        let freq: Vec<u64> = (0..layers).map(|i| (i != b) as u64).collect();
        c = with(&c, json!({ "summary_layer_freq": freq }));
    }
    if let Some(d) = case.head_dim {
        c = with(&c, json!({ "head_dim": d }));
    }
    c
}

fn model(config: &Value, seed: u64, dtype: DType, device: &Device) -> Qwen3Ksa {
    let weights = random_weights(&reference_tensors(config), seed);
    let cfg = Qwen3KsaConfig::from_json_str(&config.to_string()).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(weights, dtype, device);
    Qwen3Ksa::new(&cfg, vb).unwrap()
}

/// Where and how a run keeps its model and cache.
struct Setup {
    dtype: DType,
    device: Device,
    storage: CacheStorage,
    /// Largest allowed difference from the full forward, relative to the
    /// logits' scale.
    tol: f64,
}

impl Setup {
    fn cpu(dtype: DType, storage: CacheStorage, tol: f64) -> Self {
        Self {
            dtype,
            device: Device::Cpu,
            storage,
            tol,
        }
    }
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Checks `got: [m, V]` against rows `start..start+m` of `want: [1, n, V]`;
/// returns the largest difference relative to the logits' scale.
fn check(got: &Tensor, want: &Tensor, start: usize, what: &str, tol: f64) -> f64 {
    let m = got.dim(0).unwrap();
    if m == 0 {
        return 0.0;
    }
    let want = want.squeeze(0).unwrap().narrow(0, start, m).unwrap();
    let diff = max_abs_diff(got, &want) / max_abs(&want).max(1.0);
    assert!(
        diff <= tol,
        "{what}: tokens {start}..{}: relative diff {diff:.2e}",
        start + m
    );
    diff
}

fn check_rows(cache: &KsaCache, model: &Qwen3Ksa) {
    let cfg = model.config();
    let (c, s) = (cfg.summary_chunk_size, cfg.summary_token_num);
    for seq in 0..cache.batch_size() {
        let n = cache.seq_len(seq).unwrap();
        for (l, kind) in cfg.layer_kinds.iter().enumerate() {
            let want = match kind {
                LayerKind::Summary => (n.min(cfg.windows[l] * c + n % c), s * (n / c)),
                LayerKind::Bypass => (n, 0),
            };
            assert_eq!(
                cache.live_rows(l, seq),
                Some(want),
                "layer {l}, seq {seq}, n {n}"
            );
        }
    }
}

/// f32: the cache's attention sums in another order than the tiled full
/// forward; measured ~1e-6 relative, allowed 2e-5.
const F32_TOL: f64 = 2e-5;

/// Runs `case`; returns the largest relative difference from the full
/// forward and every logit the cache returned, in order (f32).
fn run(case: &Case, setup: &Setup) -> (f64, Vec<f32>) {
    let (tol, storage) = (setup.tol, setup.storage);
    let cfg = config(case);
    let model = model(&cfg, case.seed, setup.dtype, &setup.device);
    let batch = case.prompts.len();
    let texts: Vec<Vec<u32>> = (0..batch)
        .map(|b| ids(&token_ids(1, case.totals[b], 50, case.seed * 7 + b as u64)))
        .collect();
    let want: Vec<Tensor> = texts
        .iter()
        .map(|t| {
            model
                .forward(&Tensor::from_slice(t, (1, t.len()), &setup.device).unwrap())
                .unwrap()
        })
        .collect();
    let mut worst = 0f64;
    let mut all = vec![];
    let mut keep = |l: &Tensor| {
        all.extend(ids_f32(l));
    };

    // Prompts in one ragged append, then decode steps (sequences drop out as
    // they reach their length).
    let mut cache = KsaCache::with_storage(&model, batch, None, storage).unwrap();
    assert_eq!(cache.storage(), storage);
    let inputs: Vec<(usize, &[u32])> = (0..batch)
        .map(|b| (b, &texts[b][..case.prompts[b]]))
        .collect();
    let logits = cache.append(&model, &inputs, LogitRows::All).unwrap();
    for b in 0..batch {
        worst = worst.max(check(&logits[b], &want[b], 0, "prompt", tol));
        keep(&logits[b]);
    }
    check_rows(&cache, &model);
    loop {
        let active: Vec<usize> = (0..batch)
            .filter(|&b| cache.seq_len(b).unwrap() < case.totals[b])
            .collect();
        if active.is_empty() {
            break;
        }
        let pos: Vec<usize> = active.iter().map(|&b| cache.seq_len(b).unwrap()).collect();
        let logits: Vec<Tensor> = if active.len() == batch {
            let tokens: Vec<u32> = (0..batch).map(|b| texts[b][pos[b]]).collect();
            let l = cache.step(&model, &tokens).unwrap();
            (0..batch).map(|b| l.narrow(0, b, 1).unwrap()).collect()
        } else {
            let inputs: Vec<(usize, &[u32])> = active
                .iter()
                .zip(&pos)
                .map(|(&b, &p)| (b, &texts[b][p..p + 1]))
                .collect();
            cache.append(&model, &inputs, LogitRows::Last).unwrap()
        };
        for ((&b, &p), l) in active.iter().zip(&pos).zip(&logits) {
            worst = worst.max(check(l, &want[b], p, "decode", tol));
            keep(l);
        }
        check_rows(&cache, &model);
    }

    // The same texts fed in pieces (continued prompts), sequences interleaved,
    // into a cache of fixed capacity (window buffers of exactly W*C + C rows,
    // compacted in place): it must never reallocate.
    let longest = *case.totals.iter().max().unwrap();
    let mut cache = KsaCache::with_storage(&model, batch, Some(longest), storage).unwrap();
    let bytes = cache.bytes();
    let mut k = 0;
    while (0..batch).any(|b| cache.seq_len(b).unwrap() < case.totals[b]) {
        let mut inputs: Vec<(usize, &[u32])> = vec![];
        for b in (0..batch).rev() {
            let p = cache.seq_len(b).unwrap();
            let m = case.pieces[k % case.pieces.len()].min(case.totals[b] - p);
            k += 1;
            inputs.push((b, &texts[b][p..p + m]));
        }
        let starts: Vec<usize> = inputs
            .iter()
            .map(|&(b, _)| cache.seq_len(b).unwrap())
            .collect();
        let logits = cache.append(&model, &inputs, LogitRows::All).unwrap();
        for ((&(b, _), &p), l) in inputs.iter().zip(&starts).zip(&logits) {
            worst = worst.max(check(l, &want[b], p, "pieces", tol));
            keep(l);
        }
        check_rows(&cache, &model);
        assert_eq!(cache.bytes(), bytes, "a fixed-capacity cache reallocated");
    }
    (worst, all)
}

fn ids_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// bf16 and f16: both paths attend in f32 over the same rounded K/V but
/// round their outputs after different summation orders, and one-ulp
/// differences travel through the layers: measured ~3e-3 relative for bf16
/// (2^-8 ulp), allowed 2e-2 for both.
const HALF_TOL: f64 = 2e-2;

fn tol(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        F32_TOL
    } else {
        HALF_TOL
    }
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..=4, 1usize..=3, 2usize..=3, 0u64..1000).prop_flat_map(|(c, s, layers, seed)| {
        let max_w = 3;
        (
            proptest::collection::vec(0..=max_w, layers),
            proptest::option::of(0..layers),
            any::<bool>(),
            any::<bool>(),
            prop_oneof![
                Just(("origin", "last_chunk_slice_right")),
                Just(("origin", "last_chunk_slice_left")),
                Just(("inner_chunk", "zeros")),
            ],
            proptest::collection::vec(1usize..=9, 2..=3),
            proptest::collection::vec(1usize..=5, 1..=4),
        )
            .prop_map(
                move |(windows, bypass, mix, summary_norm, positions, prompts, pieces)| {
                    // Past the point where the last chunk index exceeds every window.
                    let end = (max_w + 2) * c;
                    let totals = prompts
                        .iter()
                        .enumerate()
                        .map(|(i, &p)| p.max(end + i * c / 2 + i))
                        .collect();
                    Case {
                        c,
                        s,
                        windows,
                        bypass,
                        mix,
                        summary_norm,
                        positions,
                        prompts,
                        totals,
                        pieces,
                        head_dim: None,
                        seed,
                    }
                },
            )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn decode_equals_full_forward(case in case()) {
        let (worst, _) = run(&case, &Setup::cpu(DType::F32, CacheStorage::Host, F32_TOL));
        eprintln!("C={} S={} W={:?} bypass={:?}: max relative diff {worst:.2e}", case.c, case.s, case.windows, case.bypass);
    }

    /// Tensor storage (CPU tensors, any float dtype) equals the full forward
    /// and gives exactly the host storage's logits: the same key runs, read
    /// from tensors through `attend_rows`.
    #[test]
    fn tensor_storage_equals_host_storage(
        case in case(),
        dtype in prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)],
    ) {
        let (worst, tensors) = run(&case, &Setup::cpu(dtype, CacheStorage::Tensors, tol(dtype)));
        let (_, host) = run(&case, &Setup::cpu(dtype, CacheStorage::Host, tol(dtype)));
        prop_assert_eq!(tensors.len(), host.len());
        let same = tensors.iter().zip(&host).all(|(a, b)| a.to_bits() == b.to_bits());
        prop_assert!(same, "tensor storage and host storage disagree");
        eprintln!("{dtype:?} C={} S={} W={:?}: max relative diff {worst:.2e}", case.c, case.s, case.windows);
    }
}

/// The shipped shape (C = 8, S = 1 here S = 2) with a window of 1 and a
/// whole-context layer, one sequence long past the window.
#[test]
fn long_sequence_small_window() {
    let case = Case {
        c: 4,
        s: 2,
        windows: vec![1, 1000],
        bypass: None,
        mix: true,
        summary_norm: true,
        positions: ("origin", "last_chunk_slice_right"),
        prompts: vec![5, 13],
        totals: vec![41, 30],
        pieces: vec![3, 1, 7],
        head_dim: None,
        seed: 3,
    };
    let (worst, _) = run(&case, &Setup::cpu(DType::F32, CacheStorage::Host, F32_TOL));
    eprintln!("long sequence: max relative diff {worst:.2e}");
    for storage in [CacheStorage::Host, CacheStorage::Tensors] {
        let (worst, _) = run(&case, &Setup::cpu(DType::BF16, storage, HALF_TOL));
        eprintln!("long sequence, bf16, {storage:?}: max relative diff {worst:.2e}");
    }
}

/// The model on CUDA in bf16 (head_dim 64): the default storage is tensors on
/// the device, attended by the CUDA decode kernels; the logits equal the full
/// forward's, and the host storage's on the same model within bf16 rounding.
/// Prints `SKIP` and passes without a GPU.
#[cfg(feature = "cuda")]
#[test]
fn cuda_bf16_cache_equals_full_forward() {
    let device = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            println!("SKIP: no CUDA device ({e})");
            return;
        }
    };
    let case = Case {
        c: 4,
        s: 2,
        windows: vec![1, 0, 1000],
        bypass: Some(1),
        mix: true,
        summary_norm: true,
        positions: ("origin", "last_chunk_slice_right"),
        prompts: vec![5, 13, 1],
        totals: vec![41, 30, 23],
        pieces: vec![3, 1, 7],
        head_dim: Some(64),
        seed: 3,
    };
    let cfg = config(&case);
    let m = model(&cfg, case.seed, DType::BF16, &device);
    assert_eq!(
        KsaCache::default_storage(&m).unwrap(),
        CacheStorage::Tensors
    );
    let setup = |storage| Setup {
        dtype: DType::BF16,
        device: device.clone(),
        storage,
        tol: HALF_TOL,
    };
    let (worst, tensors) = run(&case, &setup(CacheStorage::Tensors));
    let (_, host) = run(&case, &setup(CacheStorage::Host));
    let scale = host.iter().fold(1f32, |m, x| m.max(x.abs()));
    let diff = tensors
        .iter()
        .zip(&host)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff <= HALF_TOL as f32 * scale,
        "CUDA kernels vs host storage: {diff:.2e}"
    );
    eprintln!("CUDA bf16: max relative diff {worst:.2e}, vs host storage {diff:.2e}");
}
