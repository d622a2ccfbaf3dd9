//! The candle side of the CUDA path: checks, then one launch of
//! `ksa_fwd_{bf16,f16}_d{64,128}` on candle's stream, built from the same
//! [`FwdLaunch`] the emulator tests drive.

use super::launch::{Arg, Elem, FwdLaunch, FwdPointers, FwdProblem, Strides};
use super::schedule::MaskRule;
use crate::check::check_qkv;
use crate::{Error, Result};
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Storage, Tensor};

const MODULE: &str = "ksa_fwd";

fn row_strides(name: &'static str, t: &Tensor, layout: &candle_core::Layout) -> Result<Strides> {
    let st = layout.stride();
    let d = t.dims()[3];
    // Rows must be contiguous, and every row 16-byte aligned (cp.async moves
    // 16-byte chunks): start offset and batch/head strides multiples of 8 elements.
    let aligned =
        layout.start_offset() % 8 == 0 && st.len() == 4 && st[0] % 8 == 0 && st[1] % 8 == 0;
    if st.len() != 4 || st[3] != 1 || (st[2] != d && t.dims()[2] > 1) || !aligned {
        return Err(Error::NonContiguous {
            name,
            shape: t.dims().to_vec(),
            strides: st.to_vec(),
        });
    }
    Ok(Strides {
        batch: st[0] as u64,
        head: st[1] as u64,
    })
}

/// Runs the forward kernel on CUDA tensors `q: [b, hq, N, d]`, `k, v: [b, hkv,
/// N, d]` (bf16 or f16, d = 64 or 128, rows contiguous) under `rule`; returns
/// the output `[b, hq, N, d]` and the log-sum-exp `[b, hq, N]` (f32, natural
/// log of the scaled scores).
pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rule: MaskRule,
    scale: Option<f64>,
) -> Result<(Tensor, Tensor)> {
    let dims = check_qkv(q, k, v, "ksa CUDA attention")?;
    if dims.len != rule.len() {
        return Err(Error::LayoutLength {
            name: "q",
            expected: rule.len(),
            got: dims.len,
            text_tokens: match rule {
                MaskRule::Ksa(l) => l.text_len(),
                MaskRule::Causal { len } => len,
            },
        });
    }
    let elem = match q.dtype() {
        DType::BF16 => Elem::Bf16,
        DType::F16 => Elem::F16,
        got => {
            return Err(Error::UnsupportedDType {
                op: "ksa CUDA attention",
                got,
                supported: "bf16, f16",
            })
        }
    };
    let dev = match q.device() {
        candle_core::Device::Cuda(d) => d.clone(),
        other => {
            return Err(Error::UnsupportedDevice {
                op: "ksa CUDA attention",
                device: format!("{:?}", other.location()),
                reason: "the CUDA kernel needs CUDA tensors",
            })
        }
    };
    let (b, hq, n, d) = (dims.batch, dims.q_heads, dims.len, dims.head_dim);
    if b == 0 || hq == 0 || n == 0 {
        let o = Tensor::zeros((b, hq, n, d), q.dtype(), q.device())?;
        let lse = Tensor::zeros((b, hq, n), DType::F32, q.device())?;
        return Ok((o, lse));
    }
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let mut problem = FwdProblem::contiguous(b, hq, dims.kv_heads, n, d, elem);
    problem.q = row_strides("q", q, ql)?;
    problem.k = row_strides("k", k, kl)?;
    problem.v = row_strides("v", v, vl)?;
    if let Some(s) = scale {
        problem.scale = s as f32;
    }
    let launch = FwdLaunch::new(rule, &problem)?;

    let (Storage::Cuda(qs), Storage::Cuda(ks), Storage::Cuda(vs)) = (&*qs, &*ks, &*vs) else {
        return Err(Error::UnsupportedDevice {
            op: "ksa CUDA attention",
            device: "non-CUDA storage".into(),
            reason: "q, k and v must all live on the CUDA device",
        });
    };
    let stream = dev.cuda_stream();
    let o_elems = b * hq * n * d;
    let lse_elems = b * hq * n;
    let lse = dev.alloc_zeros::<f32>(lse_elems.max(1))?;
    let tiles = dev.clone_htod(&launch.tiles)?;
    let entries = dev.clone_htod(&launch.entries)?;
    let func = dev.get_or_load_custom_func(&launch.kernel, MODULE, super::ptx::FWD)?;
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        launch.shared_bytes as i32,
    )
    .w()?;
    let cfg = LaunchConfig {
        grid_dim: launch.grid,
        block_dim: launch.block,
        shared_mem_bytes: launch.shared_bytes,
    };

    macro_rules! run {
        ($t:ty) => {{
            let o = dev.alloc_zeros::<$t>(o_elems.max(1))?;
            {
                let qv = qs.as_cuda_slice::<$t>()?.slice(ql.start_offset()..);
                let kv = ks.as_cuda_slice::<$t>()?.slice(kl.start_offset()..);
                let vv = vs.as_cuda_slice::<$t>()?.slice(vl.start_offset()..);
                let (qp, _g1) = qv.device_ptr(&stream);
                let (kp, _g2) = kv.device_ptr(&stream);
                let (vp, _g3) = vv.device_ptr(&stream);
                let (op, _g4) = o.device_ptr(&stream);
                let (lp, _g5) = lse.device_ptr(&stream);
                let (tp, _g6) = tiles.device_ptr(&stream);
                let (ep, _g7) = entries.device_ptr(&stream);
                let args = launch.args(&FwdPointers {
                    q: qp,
                    k: kp,
                    v: vp,
                    o: op,
                    lse: lp,
                    tiles: tp,
                    entries: ep,
                });
                if !launch.is_empty() {
                    let mut builder = func.builder();
                    for a in &args {
                        match a {
                            Arg::U64(x) => builder.arg(x),
                            Arg::U32(x) => builder.arg(x),
                            Arg::F32(x) => builder.arg(x),
                        };
                    }
                    // SAFETY: the argument list is the kernel's (FwdLaunch::args), the
                    // buffers outlive the launch (guards above), and the schedule keeps
                    // every access inside q/k/v/o/lse.
                    unsafe { builder.launch(cfg) }.w()?;
                }
            }
            CudaStorage::wrap_cuda_slice(o, dev.clone())
        }};
    }
    let o = match elem {
        Elem::Bf16 => run!(half::bf16),
        Elem::F16 => run!(half::f16),
    };
    let lse = CudaStorage::wrap_cuda_slice(lse, dev.clone());
    let o = Tensor::from_storage(Storage::Cuda(o), (b, hq, n, d), BackpropOp::none(), false);
    let lse = Tensor::from_storage(Storage::Cuda(lse), (b, hq, n), BackpropOp::none(), false);
    Ok((o, lse))
}
