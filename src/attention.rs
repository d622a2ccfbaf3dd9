//! The public entry points: KSA attention and full causal attention on
//! candle tensors, routed by device.

use crate::check::check_qkv;
use crate::layout::Layout;
use crate::op::{self, Mask};
use crate::{Error, Result};
use candle_core::{Device, Tensor};

/// Options of [`attention_with`] and [`causal_attention_with`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AttentionOptions {
    /// Softmax scale; `None` means `1/sqrt(head_dim)`.
    pub scale: Option<f64>,
}

/// KSA attention: `q: [b, hq, N, d]`, `k, v: [b, hkv, N, d]` in slot order of
/// `layout` (`N = layout.len()`), `hq % hkv == 0`; f32, f16, bf16 or f64.
/// Returns `[b, hq, N, d]` in the input dtype. Scale `1/sqrt(d)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, layout: &Layout) -> Result<Tensor> {
    attention_with(q, k, v, layout, &AttentionOptions::default())
}

/// [`attention`] with options. Runs where the tensors live (CPU tensors: the
/// block-sparse [`crate::cpu`] path, computed in f32; CUDA tensors, feature
/// `cuda`: the fused kernels, bf16/f16, head dim 64/128) and is
/// differentiable with candle's autograd on both; a device this build has no
/// implementation for is an error, never a silent fallback.
pub fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: &Layout,
    options: &AttentionOptions,
) -> Result<Tensor> {
    let dims = check_qkv(q, k, v, "ksa::attention")?;
    if dims.len != layout.len() {
        return Err(Error::LayoutLength {
            name: "q",
            expected: layout.len(),
            got: dims.len,
            text_tokens: layout.text_len(),
        });
    }
    match q.device() {
        Device::Cpu => op::apply(q, k, v, Mask::Ksa(*layout), options.scale),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            crate::cuda::op::check_inputs(q, k, v, "ksa::attention")?;
            op::apply(q, k, v, Mask::Ksa(*layout), options.scale)
        }
        device => Err(unsupported("ksa::attention", device)),
    }
}

/// Plain causal attention over all positions (the full-attention baseline,
/// and what bypass layers use): same shapes and dtypes as [`attention`],
/// without a layout. Scale `1/sqrt(d)`.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    causal_attention_with(q, k, v, &AttentionOptions::default())
}

/// [`causal_attention`] with options, routed by device like [`attention_with`].
pub fn causal_attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    options: &AttentionOptions,
) -> Result<Tensor> {
    check_qkv(q, k, v, "ksa::causal_attention")?;
    match q.device() {
        Device::Cpu => op::apply(q, k, v, Mask::Causal, options.scale),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            crate::cuda::op::check_inputs(q, k, v, "ksa::causal_attention")?;
            op::apply(q, k, v, Mask::Causal, options.scale)
        }
        device => Err(unsupported("ksa::causal_attention", device)),
    }
}

fn unsupported(op: &'static str, device: &Device) -> Error {
    match device {
        Device::Metal(_) => Error::UnsupportedDevice {
            op,
            device: "Metal".into(),
            reason: "ksa has no Metal implementation",
        },
        _ => Error::UnsupportedDevice {
            op,
            device: "CUDA".into(),
            reason: "ksa was built without the `cuda` feature",
        },
    }
}
