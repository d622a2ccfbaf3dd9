//! The oracle: dense masked softmax attention in f64, deliberately simple.
//!
//! Scores for every (query, key) pair, a `0 / -inf` bias from the mask,
//! softmax, weighted sum; all in f64 with candle tensor ops (so it is also
//! differentiable with candle's autograd), output in the input dtype. Memory
//! is `O(N^2)` per head: use it on small sizes, as the truth that every fast
//! path is tested against.

use crate::check::{check_qkv, QkvDims};
use crate::layout::KsaLayout;
use crate::{AttentionOptions, Result};
use candle_core::{DType, Device, Tensor, D};

/// KSA attention over `layout` with the default scale `1/sqrt(head_dim)`.
/// `q: [b, hq, N, d]`, `k, v: [b, hkv, N, d]`, `hq % hkv == 0`; f32, f16,
/// bf16 or f64; returns `[b, hq, N, d]` in the input dtype.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, layout: &KsaLayout) -> Result<Tensor> {
    attention_with(q, k, v, layout, &AttentionOptions::default())
}

/// [`attention`] with options (the softmax scale).
pub fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: &KsaLayout,
    options: &AttentionOptions,
) -> Result<Tensor> {
    let dims = check_qkv(q, k, v, "reference::attention")?;
    layout.check_len("q", dims.len)?;
    let n = dims.len;
    let bias = mask_bias(n, q.device(), |qi, ki| layout.can_attend(qi, ki))?;
    masked_attention(q, k, v, dims, &bias, options.scale)
}

/// Plain causal attention over all `len` positions (no summaries, no
/// window): the full-attention baseline. Same shapes and dtypes as [`attention`].
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    causal_attention_with(q, k, v, &AttentionOptions::default())
}

/// [`causal_attention`] with options (the softmax scale).
pub fn causal_attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    options: &AttentionOptions,
) -> Result<Tensor> {
    let dims = check_qkv(q, k, v, "reference::causal_attention")?;
    let bias = mask_bias(dims.len, q.device(), |qi, ki| ki <= qi)?;
    masked_attention(q, k, v, dims, &bias, options.scale)
}

/// `[n, n]` f64 bias: 0 where `allowed(query, key)`, `-inf` elsewhere.
fn mask_bias(n: usize, device: &Device, allowed: impl Fn(usize, usize) -> bool) -> Result<Tensor> {
    let bias: Vec<f64> = (0..n * n)
        .map(|i| {
            if allowed(i / n, i % n) {
                0.0
            } else {
                f64::NEG_INFINITY
            }
        })
        .collect();
    Ok(Tensor::from_vec(bias, (n, n), device)?)
}

fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dims: QkvDims,
    bias: &Tensor,
    scale: Option<f64>,
) -> Result<Tensor> {
    let QkvDims {
        batch: b,
        q_heads: hq,
        kv_heads: hkv,
        len: n,
        head_dim: d,
    } = dims;
    if n == 0 || b == 0 || hq == 0 {
        return Ok(Tensor::zeros((b, hq, n, d), q.dtype(), q.device())?);
    }
    let scale = scale.unwrap_or(1.0 / (d as f64).sqrt());
    let out_dtype = q.dtype();
    let q = q.to_dtype(DType::F64)?;
    // GQA: query head h reads key/value head h / (hq / hkv).
    let expand = |x: &Tensor| -> Result<Tensor> {
        let g = hq / hkv;
        Ok(x.to_dtype(DType::F64)?
            .unsqueeze(2)?
            .broadcast_as((b, hkv, g, n, d))?
            .contiguous()?
            .reshape((b, hq, n, d))?)
    };
    let (k, v) = (expand(k)?, expand(v)?);
    let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(bias)?;
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
    Ok(probs.matmul(&v)?.to_dtype(out_dtype)?)
}
