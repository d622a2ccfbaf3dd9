//! Input checks shared by every public operation, each returning a typed [`Error`].

use crate::{Error, Result};
use candle_core::{DType, Tensor};

pub(crate) fn dims3(
    x: &Tensor,
    name: &'static str,
    layout: &'static str,
) -> Result<(usize, usize, usize)> {
    match x.dims() {
        &[a, b, c] => Ok((a, b, c)),
        got => Err(Error::Rank {
            name,
            expected: 3,
            layout,
            got: got.to_vec(),
        }),
    }
}

pub(crate) fn check_eq(
    what: &'static str,
    a: &'static str,
    a_val: usize,
    b: &'static str,
    b_val: usize,
) -> Result<()> {
    if a_val == b_val {
        Ok(())
    } else {
        Err(Error::DimMismatch {
            what,
            a,
            a_val,
            b,
            b_val,
        })
    }
}

pub(crate) fn check_same_dtype(
    a: &'static str,
    x: &Tensor,
    b: &'static str,
    y: &Tensor,
) -> Result<()> {
    if x.dtype() == y.dtype() {
        Ok(())
    } else {
        Err(Error::DTypeMismatch {
            a,
            a_dtype: x.dtype(),
            b,
            b_dtype: y.dtype(),
        })
    }
}

pub(crate) fn check_same_device(
    a: &'static str,
    x: &Tensor,
    b: &'static str,
    y: &Tensor,
) -> Result<()> {
    if x.device().same_device(y.device()) {
        Ok(())
    } else {
        Err(Error::DeviceMismatch {
            a,
            a_device: format!("{:?}", x.device().location()),
            b,
            b_device: format!("{:?}", y.device().location()),
        })
    }
}

/// The dtypes every attention path accepts.
pub(crate) fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
}

/// Sizes of a validated `(q, k, v)` triple: `q: [b, hq, len, d]`,
/// `k, v: [b, hkv, len, d]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QkvDims {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub len: usize,
    pub head_dim: usize,
}

fn dims4(x: &Tensor, name: &'static str) -> Result<[usize; 4]> {
    match x.dims() {
        &[a, b, c, d] => Ok([a, b, c, d]),
        got => Err(Error::Rank {
            name,
            expected: 4,
            layout: "[batch, heads, len, head_dim]",
            got: got.to_vec(),
        }),
    }
}

/// Checks ranks, shared sizes, GQA divisibility, dtypes (f32/f16/bf16/f64,
/// one for all three) and devices of an attention call.
pub(crate) fn check_qkv(q: &Tensor, k: &Tensor, v: &Tensor, op: &'static str) -> Result<QkvDims> {
    let [b, hq, len, d] = dims4(q, "q")?;
    let [kb, hkv, klen, kd] = dims4(k, "k")?;
    let [vb, vh, vlen, vd] = dims4(v, "v")?;
    check_eq("batch size", "q", b, "k", kb)?;
    check_eq("batch size", "k", kb, "v", vb)?;
    check_eq("key/value heads", "k", hkv, "v", vh)?;
    check_eq("sequence length", "q", len, "k", klen)?;
    check_eq("sequence length", "k", klen, "v", vlen)?;
    check_eq("head dim", "q", d, "k", kd)?;
    check_eq("head dim", "k", kd, "v", vd)?;
    if hkv == 0 || hq % hkv != 0 {
        return Err(Error::HeadsNotDivisible {
            q_heads: hq,
            kv_heads: hkv,
        });
    }
    if !is_float(q.dtype()) {
        return Err(Error::UnsupportedDType {
            op,
            got: q.dtype(),
            supported: "f32, f16, bf16, f64",
        });
    }
    check_same_dtype("q", q, "k", k)?;
    check_same_dtype("q", q, "v", v)?;
    check_same_device("q", q, "k", k)?;
    check_same_device("q", q, "v", v)?;
    Ok(QkvDims {
        batch: b,
        q_heads: hq,
        kv_heads: hkv,
        len,
        head_dim: d,
    })
}

/// `x` made contiguous. An empty view is replaced by fresh zeros of its
/// shape: candle's strided copy indexes an empty view's storage at its
/// offset, which may lie past the storage's end (a `narrow` of an empty
/// tensor) and panics.
///
/// A view (a stride-0 broadcast above all) may describe far more elements
/// than its storage holds, so the count is computed with checked arithmetic
/// (candle's `elem_count` wraps) and bounded by
/// [`MAX_TENSOR_ELEMENTS`](crate::model_config::MAX_TENSOR_ELEMENTS) before
/// the copy; on the CPU the copy's bytes are reserved fallibly first, so a
/// count within the limit that memory cannot hold is
/// [`Error::OutOfMemory`], not an abort inside candle's allocation.
pub(crate) fn contiguous(x: &Tensor) -> Result<Tensor> {
    let limit = crate::model_config::MAX_TENSOR_ELEMENTS;
    let dims = x.dims();
    let count = if dims.contains(&0) {
        Some(0)
    } else {
        dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    };
    let count = count
        .filter(|&n| n <= limit)
        .ok_or_else(|| Error::TooLarge {
            what: "elements of an input view made contiguous",
            got: dims.iter().fold(1usize, |n, &d| n.saturating_mul(d)),
            limit,
        })?;
    if count == 0 {
        return Ok(Tensor::zeros(x.shape(), x.dtype(), x.device())?);
    }
    if x.is_contiguous() {
        return Ok(x.clone());
    }
    if x.device().is_cpu() {
        let bytes = count.saturating_mul(x.dtype().size_in_bytes());
        // The probe is freed at once; candle's copy then allocates the same.
        Vec::<u8>::new()
            .try_reserve_exact(bytes)
            .map_err(|_| Error::OutOfMemory {
                what: "an input view made contiguous",
                bytes,
            })?;
    }
    Ok(x.contiguous()?)
}
