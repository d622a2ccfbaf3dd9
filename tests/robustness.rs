//! One regression test per class of bad input of docs/robustness.md: each
//! used to panic, abort or return a wrong answer, and must now be a typed
//! error or the right result.

mod model_common;
mod non_finite;

use candle_core::{DType, Device, Tensor};
use ksa::cpu::CpuKernel;
use ksa::schedule::TileSizes;
use ksa::{
    AttentionOptions, Error, GenerateOptions, KsaCache, KsaConfig, KsaLayout, LogitRows, Qwen3Ksa,
    Qwen3KsaConfig,
};
use model_common::*;
use serde_json::{json, Value};

fn model_of(c: &Value, dtype: DType) -> ksa::Result<Qwen3Ksa> {
    let weights = random_weights(&reference_tensors(c), 3);
    let cfg = Qwen3KsaConfig::from_json_str(&c.to_string())?;
    Qwen3Ksa::new(
        &cfg,
        candle_nn::VarBuilder::from_tensors(weights, dtype, &Device::Cpu),
    )
}

fn model() -> Qwen3Ksa {
    model_of(&tiny_config(), DType::F32).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Class 1: empty tensors with a storage offset (a `narrow` of an empty tensor).
#[test]
fn empty_views_with_an_offset() {
    let layout = KsaLayout::new(KsaConfig::new(4, 1, 2).unwrap(), 8).unwrap();
    let n = layout.len();
    let x = Tensor::zeros((0, 2, n + 3, 8), DType::F32, &Device::Cpu)
        .unwrap()
        .narrow(2, 3, n)
        .unwrap();
    assert_eq!(
        ksa::attention(&x, &x, &x, &layout).unwrap().dims(),
        [0, 2, n, 8]
    );
    assert_eq!(
        ksa::causal_attention(&x, &x, &x).unwrap().dims(),
        [0, 2, n, 8]
    );
}

/// Class 2: an id equal to the id dtype's maximum is not padding.
#[test]
fn forward_checks_ids_like_the_cache() {
    let m = model();
    for ids in [
        Tensor::new(&[[1u32, u32::MAX]], &Device::Cpu).unwrap(),
        Tensor::new(&[[1u8, 255]], &Device::Cpu).unwrap(),
        Tensor::new(&[[1i64, i64::MAX]], &Device::Cpu).unwrap(),
        Tensor::new(&[[1i64, -1]], &Device::Cpu).unwrap(),
        Tensor::new(&[[1u32, 50]], &Device::Cpu).unwrap(), // a summary row
    ] {
        let e = m.forward(&ids).unwrap_err();
        assert!(matches!(e, Error::TokenOutOfRange { .. }), "{ids}: {e}");
        assert!(matches!(m.embed(&ids), Err(Error::TokenOutOfRange { .. })));
    }
    let f = Tensor::new(&[[1f32, 2.0]], &Device::Cpu).unwrap();
    assert!(matches!(m.forward(&f), Err(Error::UnsupportedDType { .. })));
    let mut cache = KsaCache::new(&m, 1).unwrap();
    let e = cache
        .append(&m, &[(0, &[u32::MAX][..])], LogitRows::Last)
        .unwrap_err();
    assert!(matches!(e, Error::TokenOutOfRange { token, .. } if token == u32::MAX as i64));
}

/// Class 3: sizes bounded before any per-layer list or shape is computed.
#[test]
fn config_sizes_are_bounded() {
    for (field, value) in [
        ("num_hidden_layers", 1u64 << 31),
        ("num_hidden_layers", 1 << 62),
        ("head_dim", 1 << 62),
        ("vocab_size", 1 << 40),
    ] {
        let c = with(
            &tiny_config(),
            json!({ field: value, "summary_sliding_chunk_num": 1 }),
        );
        let e = Qwen3KsaConfig::from_json_str(&c.to_string()).unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{field}: {e}");
    }
    // Each size within MAX_DIM, the product not.
    let c = with(
        &tiny_config(),
        json!({ "num_attention_heads": 1 << 12, "num_key_value_heads": 1, "head_dim": 1 << 14 }),
    );
    let e = Qwen3KsaConfig::from_json_str(&c.to_string()).unwrap_err();
    assert!(
        matches!(e, Error::TooLarge { what, .. } if what.contains("head_dim")),
        "{e}"
    );
}

/// Class 4: a config claiming many layers beside a 2-layer checkpoint.
#[test]
fn from_folder_stops_at_the_first_missing_tensor() {
    let (dir, _) = random_checkpoint("robust-layers", &tiny_config(), 1);
    let c = with(
        &tiny_config(),
        json!({ "num_hidden_layers": 4000, "summary_sliding_chunk_num": 2 }),
    );
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    match Qwen3Ksa::from_folder(&dir, DType::F32, &Device::Cpu) {
        Err(Error::MissingTensor { name }) => {
            assert!(name.starts_with("model.layers.2."), "{name}")
        }
        other => panic!("{other:?}"),
    }
    let c = with(&c, json!({ "num_hidden_layers": 20_000_000 }));
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    let e = Qwen3Ksa::from_folder(&dir, DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Class 5: integer model dtypes are refused when the model is built.
#[test]
fn integer_model_dtypes_are_refused() {
    for dtype in [DType::U8, DType::U32, DType::I64] {
        let e = model_of(&tiny_config(), dtype).unwrap_err();
        assert!(
            matches!(e, Error::UnsupportedDType { .. }),
            "{dtype:?}: {e}"
        );
    }
    let (dir, _) = random_checkpoint("robust-dtype", &tiny_config(), 1);
    let e = Qwen3Ksa::from_folder(&dir, DType::U8, &Device::Cpu).unwrap_err();
    assert!(matches!(e, Error::UnsupportedDType { .. }), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Class 6: cache capacities and batches bounded before allocating.
#[test]
fn cache_sizes_are_bounded() {
    let m = model();
    let e = KsaCache::with_capacity(&m, 1, usize::MAX).unwrap_err();
    assert!(matches!(e, Error::LayoutTooLarge(_)), "{e}");
    let e = KsaCache::new(&m, 1 << 40).unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    let e = KsaCache::with_capacity(&m, 1 << 16, 1 << 31).unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
}

/// Class 7: tile sizes that would overflow or allocate terabytes.
#[test]
fn tile_sizes_are_bounded() {
    let layout = KsaLayout::new(KsaConfig::new(4, 1, 2).unwrap(), 40).unwrap();
    let x = Tensor::ones((1, 2, layout.len(), 8), DType::F32, &Device::Cpu).unwrap();
    let opts = AttentionOptions::default();
    for (query, key) in [
        (64, usize::MAX),
        (usize::MAX, 64),
        (1 << 20, 1 << 20),
        (0, 8),
    ] {
        let kernel = CpuKernel {
            tiles: TileSizes { query, key },
            ..Default::default()
        };
        assert!(kernel.attention(&x, &x, &x, &layout, &opts).is_err());
        assert!(kernel.causal_attention(&x, &x, &x, &opts).is_err());
    }
    let max = ksa::schedule::MAX_TILE;
    let kernel = CpuKernel {
        tiles: TileSizes {
            query: max,
            key: max,
        },
        ..Default::default()
    };
    let (got, _) = kernel.attention(&x, &x, &x, &layout, &opts).unwrap();
    let want = ksa::reference::attention(&x, &x, &x, &layout).unwrap();
    assert!(max_abs_diff(&got, &want) < 1e-6);
}

/// Class 8: with `truncate_predict_nums: 0` the logits hold the summary
/// rows, and generation never picks one.
#[test]
fn generate_never_samples_summary_rows() {
    // Summary rows' logits made the largest: the tied head reads the
    // embedding table, so scale those rows up.
    let c = with(&tiny_config(), json!({ "truncate_predict_nums": 0 }));
    let mut weights = random_weights(&reference_tensors(&c), 3);
    let e = weights["model.embed_tokens.weight"].clone();
    let boost = Tensor::from_vec(
        (0..52)
            .map(|i| if i >= 50 { 50f32 } else { 1.0 })
            .collect::<Vec<_>>(),
        (52, 1),
        &Device::Cpu,
    )
    .unwrap();
    weights.insert(
        "model.embed_tokens.weight".into(),
        e.broadcast_mul(&boost).unwrap(),
    );
    let cfg = Qwen3KsaConfig::from_json_str(&c.to_string()).unwrap();
    let m = Qwen3Ksa::new(
        &cfg,
        candle_nn::VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let logits = m
        .forward(&Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(logits.dim(2).unwrap(), 52);
    let mut seen = vec![];
    let out = m
        .generate(
            &[&[1, 2, 3]],
            &GenerateOptions {
                max_new_tokens: 6,
                ..Default::default()
            },
            |_, t| seen.push(t),
        )
        .unwrap();
    assert_eq!(out[0], seen);
    assert_eq!(out[0].len(), 6);
    assert!(out[0].iter().all(|&t| t < 50), "{out:?}");
}

/// Class 9: valid inputs that used to be refused.
#[test]
fn strided_and_empty_valid_inputs() {
    let layout = KsaLayout::new(KsaConfig::new(2, 1, 1).unwrap(), 5).unwrap(); // N = 7
    let x = Tensor::arange(0f32, 7.0 * 3.0, &Device::Cpu)
        .unwrap()
        .reshape((3, 7))
        .unwrap()
        .t()
        .unwrap()
        .unsqueeze(0)
        .unwrap(); // [1, 7, 3], not contiguous
    let text = layout.take_text(&x, 1).unwrap();
    let want = layout.take_text(&x.contiguous().unwrap(), 1).unwrap();
    assert_eq!(max_abs_diff(&text, &want), 0.0);
    let sums = layout.take_summaries(&x, 1).unwrap();
    assert_eq!(sums.dims(), [1, 2, 3]);
    let hidden = Tensor::ones((1, 3, 5), DType::F32, &Device::Cpu)
        .unwrap()
        .t()
        .unwrap();
    let s = Tensor::ones((3, 1), DType::F32, &Device::Cpu)
        .unwrap()
        .t()
        .unwrap();
    assert_eq!(layout.interleave(&hidden, &s).unwrap().dims(), [1, 7, 3]);
    // Stride-0 broadcast inputs to the oracle.
    let q = Tensor::randn(0f32, 1.0, (1, 1, 7, 4), &Device::Cpu)
        .unwrap()
        .broadcast_as((2, 2, 7, 4))
        .unwrap();
    let got = ksa::reference::attention(&q, &q, &q, &layout).unwrap();
    let qc = q.contiguous().unwrap();
    let want = ksa::attention(&qc, &qc, &qc, &layout).unwrap();
    assert!(max_abs_diff(&got, &want) < 1e-5);
    // A batch of 0.
    let m = model();
    let ids = Tensor::zeros((0, 5), DType::U32, &Device::Cpu).unwrap();
    assert_eq!(m.forward(&ids).unwrap().dims(), [0, 5, 50]);
}

/// Class 9b: a stride-0 broadcast describing more elements than the crate
/// materialises (or more than `usize` counts) is `TooLarge` before any copy,
/// on every entry point that makes inputs contiguous; one within the limit
/// still works.
#[test]
fn huge_broadcast_inputs_are_bounded() {
    let limit = ksa::model_config::MAX_TENSOR_ELEMENTS;
    let one = Tensor::ones((1, 1, 1, 8), DType::F32, &Device::Cpu).unwrap();
    // 2^41 elements (over the limit), and 2^64 (wraps to 0 in candle's count).
    for (b, h) in [(1 << 20, 1 << 18), (1 << 32, 1 << 29)] {
        let big = one.broadcast_as((b, h, 1, 8)).unwrap();
        let kernel = CpuKernel::default();
        let options = AttentionOptions::default();
        for result in [
            ksa::causal_attention(&big, &big, &big),
            kernel
                .causal_attention(&big, &big, &big, &options)
                .map(|x| x.0),
        ] {
            match result {
                Err(Error::TooLarge { got, limit: l, .. }) => {
                    assert!(got > limit && l == limit, "{got} {l}")
                }
                other => panic!("{b}x{h} broadcast: {other:?}"),
            }
        }
    }
    let small = one.broadcast_as((2, 3, 5, 8)).unwrap();
    let out = ksa::causal_attention(&small, &small, &small).unwrap();
    assert_eq!(max_abs_diff(&out, &small.contiguous().unwrap()), 0.0);
}

/// Class 10a: a non-finite key or value reaches only the rows that may see it.
#[test]
fn non_finite_keys_and_values_stay_in_their_rows() {
    let layout = KsaLayout::new(KsaConfig::new(4, 1, 1).unwrap(), 40).unwrap();
    let n = layout.len();
    let q = Tensor::randn(0f32, 1.0, (1, 2, n, 8), &Device::Cpu).unwrap();
    let k = Tensor::randn(0f32, 1.0, (1, 1, n, 8), &Device::Cpu).unwrap();
    let v = Tensor::randn(0f32, 1.0, (1, 1, n, 8), &Device::Cpu).unwrap();
    let slot = layout.text_slot(3).unwrap(); // in chunk 0: later chunks lose it
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let poison = |x: &Tensor| {
            let mut d = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            d[slot * 8 + 5] = bad;
            Tensor::from_vec(d, x.dims(), &Device::Cpu).unwrap()
        };
        let clean = ksa::reference::attention(&q, &k, &v, &layout).unwrap();
        for (kk, vv) in [(poison(&k), v.clone()), (k.clone(), poison(&v))] {
            let outs = [
                ksa::attention(&q, &kk, &vv, &layout).unwrap(),
                ksa::reference::attention(&q, &kk, &vv, &layout).unwrap(),
            ];
            for out in outs {
                let out = out.squeeze(0).unwrap().to_vec3::<f32>().unwrap();
                let want = clean.squeeze(0).unwrap().to_vec3::<f32>().unwrap();
                let mut unaffected = 0;
                for h in 0..2 {
                    for i in 0..n {
                        if layout.can_attend(i, slot) {
                            continue;
                        }
                        unaffected += 1;
                        for c in 0..8 {
                            let (g, w) = (out[h][i][c], want[h][i][c]);
                            assert!((g - w).abs() < 1e-5, "{bad} row {i}: {g} vs {w}");
                        }
                    }
                }
                assert!(unaffected > n, "most rows cannot see chunk 0's text");
            }
        }
    }
}

/// Class 10a, gradients: a NaN or infinity planted in a query, key, value or
/// `dO` row reaches only the gradient rows that depend on it through allowed
/// pairs (`non_finite::reach`); every other row equals the f64 gradients of
/// the input with the planted entries replaced by 0. The sequence spans
/// several query and key tiles, so the plants sit in full and edge tiles.
#[test]
fn non_finite_inputs_stay_in_their_gradient_rows() {
    let layout = KsaLayout::new(KsaConfig::new(4, 1, 1).unwrap(), 240).unwrap();
    let (n, d, hq, hkv) = (layout.len(), 8, 2, 1);
    let dims = (1, hq, hkv, n, d);
    let values = |h, seed| {
        let t = Tensor::randn(0f32, 1.0, (1, h, n, d), &Device::Cpu).unwrap();
        let t = (t + seed as f64 * 1e-3).unwrap();
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let clean = [values(hq, 0), values(hkv, 1), values(hkv, 2), values(hq, 3)];
    let allowed = |i, j| layout.can_attend(i, j);
    let scale = 1.0 / (d as f64).sqrt();
    let as64 = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
    // Text in chunk 0 (later chunks lose it), a summary, late text (read by
    // few rows): on query head 1 for q and dO.
    let slots = [
        layout.text_slot(3).unwrap(),
        layout.summary_slot(5, 0).unwrap(),
        layout.text_slot(200).unwrap(),
    ];
    let bads = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
    for case in 0..4 * bads.len() {
        // Input `which` of q, k, v, dO.
        let (which, bad, slot) = (case / 3, bads[case % 3], slots[case % slots.len()]);
        let mut data = clean.clone();
        let head = if which == 0 || which == 3 { 1 } else { 0 };
        data[which][(head * n + slot) * d + 5] = bad;
        let [q, k, v, dout] = [hq, hkv, hkv, hq]
            .iter()
            .zip(&data)
            .map(|(&h, x)| Tensor::from_vec(x.clone(), (1, h, n, d), &Device::Cpu).unwrap())
            .collect::<Vec<_>>()
            .try_into()
            .unwrap();
        let vars = [&q, &k, &v].map(|t| candle_core::Var::from_tensor(t).unwrap());
        let out = ksa::attention(&vars[0], &vars[1], &vars[2], &layout).unwrap();
        let grads = (out * dout).unwrap().sum_all().unwrap().backward().unwrap();
        let reach = non_finite::reach(&data[0], &data[1], &data[2], &data[3], dims, &allowed);
        // The planted entry replaced by 0: any finite value gives the same
        // rows outside `reach`.
        let want = non_finite::grads(
            &non_finite::cleaned(&data[0]),
            &non_finite::cleaned(&data[1]),
            &non_finite::cleaned(&data[2]),
            &non_finite::cleaned(&data[3]),
            dims,
            scale,
            &allowed,
        );
        let compared: usize = [
            (&reach.dq, &want.0),
            (&reach.dk, &want.1),
            (&reach.dv, &want.2),
        ]
        .into_iter()
        .zip(&vars)
        .zip(["dq", "dk", "dv"])
        .map(|(((reach, want), var), name)| {
            let got = grads.get(var).unwrap().flatten_all().unwrap();
            let got = as64(&got.to_vec1::<f32>().unwrap());
            non_finite::compare(name, &got, want, reach, d, 1e-4)
                .unwrap_or_else(|e| panic!("{bad} in input {which} at slot {slot}: {e}"))
        })
        .sum();
        let rows = reach.dq.len() + reach.dk.len() + reach.dv.len();
        assert!(
            compared > rows / 10 && compared < rows,
            "{bad} in input {which}: {compared} of {rows} rows unaffected"
        );
    }
}

/// Class 10b: config floats outside their domain.
#[test]
fn config_floats_outside_their_domain() {
    for (field, value) in [
        ("rms_norm_eps", json!(-1e-6)),
        ("rms_norm_eps", json!(0.0)),
        ("rope_theta", json!(0.0)),
        ("rope_theta", json!(-10000.0)),
        ("rope_theta", json!(1e-300)),
        ("mix_coeff", json!(1e308)),
        ("mix_coeff", json!(-0.5)),
    ] {
        let c = with(&tiny_config(), json!({ field: value }));
        match Qwen3KsaConfig::from_json_str(&c.to_string()) {
            Err(Error::ModelConfig(msg)) => assert!(msg.contains(field), "{msg}"),
            other => panic!("{field} = {value}: {other:?}"),
        }
    }
    // JSON has no infinities or NaN; a config built in code does.
    let good = Qwen3KsaConfig::from_json_str(&tiny_config().to_string()).unwrap();
    for bad in [f64::NAN, f64::INFINITY] {
        for set in [
            |c: &mut Qwen3KsaConfig, x| c.mix_coeff = x,
            |c: &mut Qwen3KsaConfig, x| c.rope_theta = x,
            |c: &mut Qwen3KsaConfig, x| c.rms_norm_eps = x,
        ] {
            let mut c = good.clone();
            set(&mut c, bad);
            assert!(matches!(c.validate(), Err(Error::ModelConfig(_))));
        }
    }
}
