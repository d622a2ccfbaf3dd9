//! The candle op behind [`crate::attention`] and [`crate::causal_attention`]:
//! the forward runs the device's fast path, and the backward makes the op
//! differentiable with candle's autograd (`loss.backward()`).
//!
//! The forward's per-row log-sum-exp is kept inside the op (which the graph
//! holds) so the backward recomputes probabilities instead of storing them,
//! as FlashAttention does. On CUDA tensors (feature `cuda`) both directions
//! run the fused kernels (`crate::cuda::op`) and the log-sum-exp stays on the
//! device.

use crate::check::QkvDims;
use crate::cpu::backward::attention_backward;
use crate::cpu::{self, Element};
use crate::mask::Mask;
use crate::schedule::{Schedule, TileSizes};
use crate::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use half::{bf16, f16};
use std::sync::{Arc, Mutex};

/// Attention of `q, k, v` (already validated) under `mask`, recorded in
/// candle's graph when any input tracks gradients. CPU inputs are made
/// contiguous; CUDA kernels take row-contiguous inputs with any batch/head
/// strides as they are.
pub(crate) fn apply(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Mask,
    scale: Option<f64>,
) -> Result<Tensor> {
    let d = q.dim(3)?;
    let op = AttentionOp {
        mask,
        scale: scale.unwrap_or(1.0 / (d as f64).sqrt()) as f32,
        lse: Mutex::new(None),
    };
    let op = Arc::new(Box::new(op) as Box<dyn CustomOp3 + Send + Sync>);
    if q.device().is_cpu() {
        let contiguous = crate::check::contiguous;
        let (q, k, v) = (contiguous(q)?, contiguous(k)?, contiguous(v)?);
        Ok(q.apply_op3_arc(&k, &v, op)?)
    } else {
        Ok(q.apply_op3_arc(k, v, op)?)
    }
}

/// What a forward keeps for the backward: the per-row log-sum-exp `[b, hq, N]`.
#[derive(Clone)]
enum Saved {
    /// From the CPU forward.
    Cpu(Vec<f32>),
    /// From the CUDA forward: an f32 tensor on the device.
    #[cfg(feature = "cuda")]
    Cuda(Tensor),
}

struct AttentionOp {
    mask: Mask,
    scale: f32,
    /// The log-sum-exp of the last forward, for the backward.
    lse: Mutex<Option<Saved>>,
}

fn dims(q: &Layout, k: &Layout) -> candle_core::Result<QkvDims> {
    let (batch, q_heads, len, head_dim) = q.shape().dims4()?;
    Ok(QkvDims {
        batch,
        q_heads,
        kv_heads: k.shape().dim(1)?,
        len,
        head_dim,
    })
}

fn contiguous<'a, T: Element>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    if l.shape().elem_count() == 0 {
        // An empty view's offset may lie past its storage (a `narrow` of an
        // empty tensor): there is nothing to slice.
        return Ok(&[]);
    }
    let (start, end) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("ksa attention op expects contiguous inputs".into())
    })?;
    Ok(&s.as_slice::<T>()?[start..end])
}

impl AttentionOp {
    fn schedule(&self) -> Result<Schedule> {
        Schedule::new(self.mask, TileSizes::default())
    }

    fn cpu_typed<T: Element>(
        &self,
        dims: QkvDims,
        (q, k, v): (&[T], &[T], &[T]),
    ) -> candle_core::Result<Vec<T>> {
        let schedule = self.schedule().map_err(candle_core::Error::wrap)?;
        let isa = cpu::isa::process_isa().map_err(candle_core::Error::wrap)?;
        let (out, lse) = cpu::forward_vecs(q, k, v, dims, &schedule, self.scale, isa, None);
        *self.lse.lock().expect("lse lock") = Some(Saved::Cpu(lse));
        Ok(out)
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "ksa-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = dims(l1, l2)?;
        macro_rules! run {
            ($t:ty, $variant:ident) => {{
                let inputs = (
                    contiguous::<$t>(s1, l1)?,
                    contiguous::<$t>(s2, l2)?,
                    contiguous::<$t>(s3, l3)?,
                );
                CpuStorage::$variant(self.cpu_typed::<$t>(dims, inputs)?)
            }};
        }
        let out = match s1.dtype() {
            DType::F32 => run!(f32, F32),
            DType::F16 => run!(f16, F16),
            DType::BF16 => run!(bf16, BF16),
            DType::F64 => run!(f64, F64),
            dtype => {
                return Err(candle_core::Error::UnsupportedDTypeForOp(
                    dtype,
                    "ksa-attention",
                ))
            }
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (b, hq, n, _) = l1.shape().dims4()?;
        let (out, lse) = crate::cuda::op::forward_storage(
            (s1, l1),
            (s2, l2),
            (s3, l3),
            self.mask,
            Some(f64::from(self.scale)),
        )
        .map_err(candle_core::Error::wrap)?;
        let lse = Tensor::from_storage(
            candle_core::Storage::Cuda(lse),
            (b, hq, n),
            candle_core::op::BackpropOp::none(),
            false,
        );
        *self.lse.lock().expect("lse lock") = Some(Saved::Cuda(lse));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.lse.lock().expect("lse lock").clone().ok_or_else(|| {
            candle_core::Error::Msg("ksa-attention backward ran without its forward".into())
        })?;
        let lse = match saved {
            Saved::Cpu(lse) if q.device().is_cpu() => lse,
            #[cfg(feature = "cuda")]
            Saved::Cuda(lse) if q.device().is_cuda() => {
                // Autograd's output gradient may be any view; the kernels need rows.
                let dout = dout.contiguous()?;
                let (dq, dk, dv) =
                    crate::cuda::op::backward(q, k, v, out, &dout, &lse, self.mask, self.scale)
                        .map_err(candle_core::Error::wrap)?;
                return Ok((Some(dq), Some(dk), Some(dv)));
            }
            _ => {
                return Err(candle_core::Error::BackwardNotSupported {
                    op: "ksa-attention on this device",
                })
            }
        };
        let f32s = |x: &Tensor| x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        let (b, hq, n, d) = q.dims4()?;
        let dims = QkvDims {
            batch: b,
            q_heads: hq,
            kv_heads: k.dim(1)?,
            len: n,
            head_dim: d,
        };
        let isa = crate::cpu::isa::process_isa().map_err(candle_core::Error::wrap)?;
        let (dq, dk, dv) = attention_backward(
            &f32s(q)?,
            &f32s(k)?,
            &f32s(v)?,
            &f32s(out)?,
            &f32s(dout)?,
            &lse,
            dims,
            self.scale,
            self.mask,
            isa,
        );
        let back = |g: Vec<f32>, like: &Tensor| {
            Tensor::from_vec(g, like.shape(), like.device())?.to_dtype(like.dtype())
        };
        Ok((Some(back(dq, q)?), Some(back(dk, k)?), Some(back(dv, v)?)))
    }
}
