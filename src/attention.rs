//! The public entry point: KSA attention on candle tensors, routed by device.

use crate::check::check_qkv;
use crate::layout::Layout;
use crate::{reference, Error, Result};
use candle_core::{Device, Tensor};

/// Options of [`attention_with`].
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

/// [`attention`] with options. Runs where the tensors live; a device this
/// build has no implementation for is an error, never a silent fallback.
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
        Device::Cpu => reference::attention_with_scale(q, k, v, layout, options.scale),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => crate::cuda::op::forward(
            q,
            k,
            v,
            crate::cuda::schedule::MaskRule::Ksa(*layout),
            options.scale,
        )
        .map(|(out, _lse)| out),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(Error::UnsupportedDevice {
            op: "ksa::attention",
            device: "CUDA".into(),
            reason: "ksa was built without the `cuda` feature",
        }),
        Device::Metal(_) => Err(Error::UnsupportedDevice {
            op: "ksa::attention",
            device: "Metal".into(),
            reason: "ksa has no Metal implementation",
        }),
    }
}
