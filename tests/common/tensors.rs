//! Deterministic test tensors shared by the CPU tests (included with
//! `#[path]`, so that tests without the `ptx` feature need not build the
//! emulator helpers of `common/mod.rs`).

// Each including test uses a part.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor, D};

/// Uniform values in `[-half_width, half_width)`, f64, from a small LCG so
/// proptest cases are reproducible from their seed.
pub fn uniform(shape: &[usize], seed: u64, half_width: f64) -> Tensor {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let len: usize = shape.iter().product();
    let data: Vec<f64> = (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * half_width
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// All values of `t` as f64, flattened.
pub fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Natural log-sum-exp of the scaled scores over the allowed keys, in f64.
pub fn reference_lse(q: &Tensor, k: &Tensor, allowed: impl Fn(usize, usize) -> bool) -> Tensor {
    let (b, hq, n, d) = q.dims4().unwrap();
    let hkv = k.dim(1).unwrap();
    let q = q.to_dtype(DType::F64).unwrap();
    let k = k
        .to_dtype(DType::F64)
        .unwrap()
        .unsqueeze(2)
        .unwrap()
        .broadcast_as((b, hkv, hq / hkv, n, d))
        .unwrap()
        .reshape((b, hq, n, d))
        .unwrap();
    let scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
    let bias: Vec<f64> = (0..n * n)
        .map(|i| {
            if allowed(i / n, i % n) {
                0.0
            } else {
                f64::NEG_INFINITY
            }
        })
        .collect();
    let bias = Tensor::from_vec(bias, (n, n), &Device::Cpu).unwrap();
    let scores = scores.broadcast_add(&bias).unwrap();
    let max = scores.max_keepdim(D::Minus1).unwrap();
    let sum = scores
        .broadcast_sub(&max)
        .unwrap()
        .exp()
        .unwrap()
        .sum_keepdim(D::Minus1)
        .unwrap();
    (sum.log().unwrap() + max)
        .unwrap()
        .squeeze(D::Minus1)
        .unwrap()
}
