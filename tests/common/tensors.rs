//! Deterministic test tensors shared by the CPU tests (included with
//! `#[path]`, so that tests without the `ptx` feature need not build the
//! emulator helpers of `common/mod.rs`).

use candle_core::{DType, Device, Tensor};

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
