//! The oracle: dense masked softmax attention in f64, deliberately simple.
//!
//! Scores for every (query, key) pair, masked by selection (a masked score
//! is replaced by `-inf`, never offset by a bias, so a NaN or infinite key
//! cannot leak through `0 * inf`), softmax, weighted sum; all in f64 with
//! candle tensor ops (so it is also differentiable with candle's autograd),
//! output in the input dtype. Memory is `O(N^2)` per head, and `O(N^2 d)`
//! when a value is NaN or infinite (each row then sums only its allowed
//! keys' products): use it on small sizes, as the truth that every fast path
//! is tested against. Non-finite inputs follow docs/robustness.md.

use crate::check::{check_qkv, QkvDims};
use crate::layout::KsaLayout;
use crate::mask::DENSE_MASK_MAX_LEN;
use crate::{AttentionOptions, Error, Result};
use candle_core::{DType, Device, Tensor, D};

/// The most `b * hq * N * N` score elements the oracle takes on (times `d`
/// when a value is not finite; `N` is also at most [`DENSE_MASK_MAX_LEN`]);
/// larger inputs are [`Error::TooLarge`].
pub const REFERENCE_MAX_ELEMENTS: usize = 1 << 28;

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
    check_size(dims)?;
    let n = dims.len;
    let allowed = mask(n, q.device(), |qi, ki| layout.can_attend(qi, ki))?;
    masked_attention(q, k, v, dims, &allowed, options.scale)
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
    check_size(dims)?;
    let allowed = mask(dims.len, q.device(), |qi, ki| ki <= qi)?;
    masked_attention(q, k, v, dims, &allowed, options.scale)
}

/// The oracle materialises an `[N, N]` mask and `[b, hq, N, N]` scores:
/// bounded before anything is allocated (`d` multiplies the count only on
/// the non-finite path, checked there).
fn check_size(dims: QkvDims) -> Result<()> {
    let QkvDims {
        batch: b,
        q_heads: hq,
        len: n,
        ..
    } = dims;
    let scores = elements(&[b, hq, n, n]);
    match scores {
        Some(e) if n <= DENSE_MASK_MAX_LEN && e <= REFERENCE_MAX_ELEMENTS => Ok(()),
        _ => Err(too_large(scores)),
    }
}

fn elements(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &x| acc.checked_mul(x))
}

fn too_large(got: Option<usize>) -> Error {
    Error::TooLarge {
        what: "reference attention elements (b * hq * N * N, times d for non-finite values; N at most DENSE_MASK_MAX_LEN)",
        got: got.unwrap_or(usize::MAX),
        limit: REFERENCE_MAX_ELEMENTS,
    }
}

/// `[n, n]` u8 mask: 1 where `allowed(query, key)`, 0 elsewhere.
fn mask(n: usize, device: &Device, allowed: impl Fn(usize, usize) -> bool) -> Result<Tensor> {
    let mask: Vec<u8> = (0..n * n)
        .map(|i| u8::from(allowed(i / n, i % n)))
        .collect();
    Ok(Tensor::from_vec(mask, (n, n), device)?)
}

fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dims: QkvDims,
    allowed: &Tensor,
    scale: Option<f64>,
) -> Result<Tensor> {
    let QkvDims {
        batch: b,
        q_heads: hq,
        kv_heads: hkv,
        len: n,
        head_dim: d,
    } = dims;
    if n == 0 || b == 0 || hq == 0 || d == 0 {
        return Ok(Tensor::zeros((b, hq, n, d), q.dtype(), q.device())?);
    }

    let scale = scale.unwrap_or(1.0 / (d as f64).sqrt());
    let out_dtype = q.dtype();
    // `contiguous` after the cast: any strided view (stride-0 broadcasts
    // included) is valid input, and candle's matmul wants rows.
    let q = q.to_dtype(DType::F64)?.contiguous()?;
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
    let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
    let shape = scores.shape().clone();
    let allowed = allowed.broadcast_as(&shape)?;
    let neg_inf = Tensor::new(f64::NEG_INFINITY, scores.device())?.broadcast_as(&shape)?;
    let probs = candle_nn::ops::softmax(&allowed.where_cond(&scores, &neg_inf)?, D::Minus1)?;
    let out = if all_finite(&v)? {
        // A masked probability is exactly 0 and its value finite: the
        // product adds nothing, so the matmul is the masked sum.
        probs.matmul(&v)?
    } else {
        // 0 * inf would be NaN: sum each row's allowed products only.
        let count = elements(&[b, hq, n, n, d]);
        if count.is_none_or(|e| e > REFERENCE_MAX_ELEMENTS) {
            return Err(too_large(count));
        }
        let wide = (b, hq, n, n, d);
        let terms = probs
            .unsqueeze(4)?
            .broadcast_as(wide)?
            .mul(&v.unsqueeze(2)?.broadcast_as(wide)?)?;
        let keep = allowed.unsqueeze(4)?.broadcast_as(wide)?;
        keep.where_cond(&terms, &terms.zeros_like()?)?.sum(3)?
    };
    Ok(out.to_dtype(out_dtype)?)
}

/// Whether every element of the f64 tensor `x` is finite (`|x| <= MAX` is
/// false for infinities and NaN).
fn all_finite(x: &Tensor) -> Result<bool> {
    let finite = x.abs()?.le(f64::MAX)?.to_dtype(DType::F64)?.sum_all()?;
    Ok(finite.to_scalar::<f64>()? == x.elem_count() as f64)
}
