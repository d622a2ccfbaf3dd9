//! The kernels on a real GPU through `ksa::attention` (feature `cuda`): the
//! forward equal to the reference, gradients equal to the CPU backward's, the
//! typed errors of the CUDA path, and the decode cache's chunked prefill on
//! the prefill kernel equal to the model's forward. Without a GPU every test
//! here prints why it skips and passes; the kernels themselves are proven
//! under the emulator by tests/cuda_emu_fwd.rs, tests/cuda_emu_step.rs and
//! tests/cuda_emu_bwd.rs.
#![cfg(feature = "cuda")]

mod model_common;

use candle_core::{DType, Device, Tensor};
use ksa::mask::Mask;
use ksa::{CacheStorage, KsaCache, KsaConfig, KsaLayout, LogitRows, Qwen3Ksa, Qwen3KsaConfig};
use model_common::{max_abs, max_abs_diff, random_weights, reference_tensors, tiny_config, with};
use serde_json::json;

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!(
                "SKIP: no CUDA device ({e}); the kernel is tested under the emulator instead"
            );
            None
        }
    }
}

/// Standard-normal CPU tensor of `shape` rounded to `dtype`.
fn randn(shape: (usize, usize, usize, usize), dtype: DType) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn ksa_and_causal_match_reference_on_gpu() {
    let Some(dev) = gpu() else { return };
    for (c, s, w, n, d, dtype, tol) in [
        (8, 1, 16, 2000, 64, DType::BF16, 2e-2),
        (4, 2, 3, 777, 128, DType::F16, 4e-3),
        (64, 4, 0, 300, 128, DType::BF16, 2e-2),
    ] {
        let layout = KsaLayout::new(KsaConfig::new(c, s, w).unwrap(), n).unwrap();
        let big = layout.len();
        let mk = |h| randn((2, h, big, d), dtype);
        let (q, k, v) = (mk(8), mk(2), mk(2));
        let want = ksa::reference::attention(&q, &k, &v, &layout).unwrap();
        let on = |t: &Tensor| t.to_device(&dev).unwrap();
        let got = ksa::attention(&on(&q), &on(&k), &on(&v), &layout)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap();
        let err = max_diff(&got, &want);
        assert!(err <= tol, "KSA C={c} S={s} W={w} n={n} d={d}: {err}");
        let want = ksa::reference::causal_attention(&q, &k, &v).unwrap();
        let (got, _lse) =
            ksa::cuda::op::forward(&on(&q), &on(&k), &on(&v), Mask::Causal { len: big }, None)
                .unwrap();
        let err = max_diff(&got.to_device(&Device::Cpu).unwrap(), &want);
        assert!(err <= tol, "causal n={big} d={d}: {err}");
    }
}

#[test]
fn typed_errors_before_launch() {
    let Some(dev) = gpu() else { return };
    let layout = KsaLayout::new(KsaConfig::new(8, 1, 2).unwrap(), 64).unwrap();
    let n = layout.len();
    let t = |d: usize, dt: DType| Tensor::zeros((1, 2, n, d), dt, &dev).unwrap();
    let e = ksa::attention(
        &t(64, DType::F32),
        &t(64, DType::F32),
        &t(64, DType::F32),
        &layout,
    );
    assert!(
        matches!(e, Err(ksa::Error::UnsupportedDType { .. })),
        "{e:?}"
    );
    let e = ksa::attention(
        &t(96, DType::BF16),
        &t(96, DType::BF16),
        &t(96, DType::BF16),
        &layout,
    );
    assert!(
        matches!(e, Err(ksa::Error::UnsupportedHeadDim { .. })),
        "{e:?}"
    );
    let wide = Tensor::zeros((1, 2, 64, n), DType::BF16, &dev)
        .unwrap()
        .t()
        .unwrap();
    let e = ksa::attention(&wide, &t(64, DType::BF16), &t(64, DType::BF16), &layout);
    assert!(matches!(e, Err(ksa::Error::NonContiguous { .. })), "{e:?}");
}

/// `loss.backward()` through `ksa::attention` on the GPU (the CUDA backward
/// kernels) equals the same graph on the CPU (the CPU backward), which
/// tests/grad.rs checks against f64 autograd through the reference.
#[test]
fn gradients_match_cpu_on_gpu() {
    let Some(dev) = gpu() else { return };
    for (c, s, w, n, d, dtype, tol) in [
        (8, 1, 4, 500, 64, DType::BF16, 2e-2),
        (4, 2, 0, 301, 128, DType::F16, 3e-3),
    ] {
        let layout = KsaLayout::new(KsaConfig::new(c, s, w).unwrap(), n).unwrap();
        let big = layout.len();
        let mk = |h| randn((2, h, big, d), dtype);
        let (q, k, v, w_out) = (mk(8), mk(2), mk(2), mk(8));
        let grads = |device: &Device| -> Vec<Tensor> {
            let vars: Vec<candle_core::Var> = [&q, &k, &v]
                .iter()
                .map(|t| candle_core::Var::from_tensor(&t.to_device(device).unwrap()).unwrap())
                .collect();
            let out = ksa::attention(&vars[0], &vars[1], &vars[2], &layout).unwrap();
            // A weighted sum, so dO is not uniform.
            let loss = (out * w_out.to_device(device).unwrap())
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .sum_all()
                .unwrap();
            let g = loss.backward().unwrap();
            vars.iter()
                .map(|x| g.get(x).unwrap().to_device(&Device::Cpu).unwrap())
                .collect()
        };
        let (cpu, gpu_g) = (grads(&Device::Cpu), grads(&dev));
        for (name, (want, got)) in ["dq", "dk", "dv"].iter().zip(cpu.iter().zip(&gpu_g)) {
            let scale = max_diff(want, &want.zeros_like().unwrap()).max(1e-3);
            let err = max_diff(got, want) / scale;
            assert!(err <= tol, "{name} C={c} S={s} W={w} n={n} d={d}: {err}");
        }
    }
}

/// `KsaCache` on CUDA (tensor storage) prefills a prompt, then a continued
/// prompt, in chunks: steps with 16 or more query rows run the prefill kernel
/// with a query offset over the held keys (`cuda::op::forward_steps`), shorter
/// ones and the decode steps after them the decode kernels; every logit
/// equals `Qwen3Ksa::forward` on the same device within half-precision
/// rounding (relative to the logits' scale, as tests/cache_prefill.rs).
/// C = 4, S = 2, windows 1, 0 and 3 chunks and a bypass layer.
#[test]
fn cache_chunked_prefill_equals_the_forward_on_gpu() {
    let Some(dev) = gpu() else { return };
    const TOL: f64 = 2e-2;
    for (dtype, d) in [(DType::BF16, 64), (DType::F16, 128)] {
        let config = with(
            &tiny_config(),
            json!({
                "head_dim": d,
                "num_hidden_layers": 4,
                "summary_chunk_size": 4,
                "summary_token_num": 2,
                "summary_sliding_chunk_num": [1, 0, 3, 2],
                "summary_layer_freq": [1, 1, 1, 0],
            }),
        );
        let weights = random_weights(&reference_tensors(&config), 5);
        let cfg = Qwen3KsaConfig::from_json_str(&config.to_string()).unwrap();
        let vb = candle_nn::VarBuilder::from_tensors(weights, dtype, &dev);
        let model = Qwen3Ksa::new(&cfg, vb).unwrap();
        assert_eq!(
            KsaCache::default_storage(&model).unwrap(),
            CacheStorage::Tensors
        );
        let n = 150 + 3;
        let tokens: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % 50).collect();
        let ids = Tensor::from_slice(&tokens, (1, n), &dev).unwrap();
        let want = model
            .forward(&ids)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap();
        let check = |got: &Tensor, start: usize, what: &str| {
            let got = got.to_device(&Device::Cpu).unwrap();
            let want = want.narrow(0, start, got.dim(0).unwrap()).unwrap();
            let diff = max_abs_diff(&got, &want) / max_abs(&want).max(1.0);
            assert!(diff <= TOL, "{what}: tokens from {start}: {diff:.2e}");
        };
        for chunk in [5, 16, 64, 1000] {
            let what = format!("{dtype:?} d={d} chunk {chunk}");
            let mut cache = KsaCache::new(&model, 1)
                .unwrap()
                .with_prefill_chunk(chunk)
                .unwrap();
            let mut at = 0;
            for m in [131, 19] {
                let logits = cache
                    .append(&model, &[(0, &tokens[at..at + m])], LogitRows::All)
                    .unwrap();
                check(&logits[0], at, &what);
                at += m;
            }
            for _ in 0..3 {
                let logits = cache.step(&model, &tokens[at..at + 1]).unwrap();
                check(&logits, at, &format!("{what} decode"));
                at += 1;
            }
        }
    }
}
