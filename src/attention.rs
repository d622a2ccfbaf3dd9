//! The public entry points, each routed by device: KSA attention and full
//! causal attention (prefill and training), and decode attention of new query
//! rows over cached key runs.

use crate::check::check_qkv;
use crate::layout::KsaLayout;
use crate::mask::Mask;
use crate::op;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::ops::Range;

/// Options of [`attention_with`] and [`causal_attention_with`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AttentionOptions {
    /// Softmax scale; `None` means `1/sqrt(head_dim)`.
    pub scale: Option<f64>,
}

/// KSA attention: `q: [b, hq, N, d]`, `k, v: [b, hkv, N, d]` in slot order of
/// `layout` (`N = layout.len()`), `hq % hkv == 0`; f32, f16, bf16 or f64.
/// Returns `[b, hq, N, d]` in the input dtype. Scale `1/sqrt(d)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, layout: &KsaLayout) -> Result<Tensor> {
    attention_with(q, k, v, layout, &AttentionOptions::default())
}

/// [`attention`] with options. Runs where the tensors live (CPU tensors: the
/// block-sparse CPU path (`src/cpu`), computed in f32; CUDA tensors, feature
/// `cuda`: the fused kernels, bf16/f16, head dim 64/128) and is
/// differentiable with candle's autograd on both; a device this build has no
/// implementation for is an error, never a silent fallback.
pub fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: &KsaLayout,
    options: &AttentionOptions,
) -> Result<Tensor> {
    let dims = check_qkv(q, k, v, "ksa::attention")?;
    layout.check_len("q", dims.len)?;
    match q.device() {
        Device::Cpu => {
            // A refused KSA_CPU_ISA is this call's typed error (inside the
            // op it would come back wrapped in a candle error).
            crate::cpu::isa::process_isa()?;
            op::apply(q, k, v, Mask::Ksa(*layout), options.scale)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            crate::cuda::op::check_inputs(q, k, v, options.scale, "ksa::attention")?;
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
    let mask = Mask::Causal {
        len: check_qkv(q, k, v, "ksa::causal_attention")?.len,
    };
    match q.device() {
        Device::Cpu => {
            crate::cpu::isa::process_isa()?;
            op::apply(q, k, v, mask, options.scale)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            crate::cuda::op::check_inputs(q, k, v, options.scale, "ksa::causal_attention")?;
            op::apply(q, k, v, mask, options.scale)
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

/// Rows `rows` of cached K and V, `[kv_heads, capacity, head_dim]` tensors:
/// one run of a query row's keys. A ring that wraps is two `KvRows` of the
/// same tensors. For the CUDA kernels (`crate::cuda::decode::decode_attention`)
/// the tensors live on the query's CUDA device in its dtype with contiguous
/// rows (the head stride may be anything that keeps heads 16-byte aligned);
/// the CPU path takes any device, dtype and layout.
#[derive(Debug, Clone)]
pub struct KvRows<'a> {
    /// Keys.
    pub k: &'a Tensor,
    /// Values.
    pub v: &'a Tensor,
    /// Rows of dimension 1 to attend to (may be empty).
    pub rows: Range<usize>,
}

impl KvRows<'_> {
    /// Checks `t` (this run's `k` or `v`, named `name`) against the head dim
    /// and the KV head count seen so far (set by the first tensor checked):
    /// shape `[kv_heads, capacity, head_dim]` and `rows` inside the capacity.
    /// Returns the capacity.
    pub(crate) fn check_tensor(
        &self,
        name: &'static str,
        t: &Tensor,
        head_dim: usize,
        kv_heads: &mut Option<usize>,
    ) -> Result<usize> {
        let (h, cap, td) = t.dims3().map_err(|_| Error::Rank {
            name,
            expected: 3,
            layout: "[kv_heads, capacity, head_dim]",
            got: t.dims().to_vec(),
        })?;
        let h0 = *kv_heads.get_or_insert(h);
        for (what, got, want, b) in [("kv heads", h, h0, "k"), ("head_dim", td, head_dim, "q")] {
            if got != want {
                return Err(Error::DimMismatch {
                    what,
                    a: name,
                    a_val: got,
                    b,
                    b_val: want,
                });
            }
        }
        if self.rows.start > self.rows.end || self.rows.end > cap {
            return Err(Error::DimMismatch {
                what: "cached rows",
                a: "rows.end",
                a_val: self.rows.end,
                b: name,
                b_val: cap,
            });
        }
        Ok(cap)
    }
}

/// Decode attention: one query row per entry, `q: [n, q_heads, head_dim]`,
/// over the key runs `seqs[i]` of entry `i` (at least one key each). Returns
/// `[n, q_heads, head_dim]` in q's dtype. CUDA tensors (feature `cuda`) run
/// the split-KV decode kernels in one launch for all rows (bf16/f16, head dim
/// 64/128); other devices the CPU implementation of the same interface
/// (`ksa::cpu::decode::attend_rows`, any float dtype).
pub fn decode_attention(
    q: &Tensor,
    seqs: &[Vec<KvRows<'_>>],
    options: &AttentionOptions,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return Ok(crate::cuda::decode::decode_attention(q, seqs, options)?.0);
    }
    crate::cpu::decode::attend_rows(q, seqs, options)
}
