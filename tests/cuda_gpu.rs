//! The kernels on a real GPU through `ksa::attention` (feature `cuda`): the
//! forward equal to the reference, gradients equal to the CPU backward's, and
//! the typed errors of the CUDA path. Without a GPU every test here prints why
//! it skips and passes; the kernels themselves are proven under the emulator
//! by tests/cuda_emu_fwd.rs and tests/cuda_emu_bwd.rs.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use ksa::mask::Mask;
use ksa::{KsaConfig, KsaLayout};

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
