//! The candle side of the CUDA path: checks, then launches on candle's stream
//! built from the same [`FwdLaunch`] / [`BwdLaunch`] the emulator tests drive:
//! the forward `ksa_fwd_{bf16,f16}_d{64,128}` ([`forward`], and
//! [`forward_storage`] for the autograd op in `crate::op`; [`forward_steps`]
//! for a cache's chunked prefill) and the three backward kernels
//! ([`backward`]).

use super::backward::{BwdLaunch, BwdPointers, BwdProblem};
use super::launch::{
    check_scale, kernel_elem, Arg, Elem, FwdLaunch, FwdPointers, FwdProblem, Strides,
};
use crate::check::{check_eq, check_qkv, check_same_device, check_same_dtype};
use crate::mask::Mask;
use crate::schedule::QueryOffset;
use crate::{Error, Result};
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Layout, Shape, Storage, Tensor};

const MODULE: &str = "ksa_fwd";
const MODULE_BWD: &str = "ksa_bwd";

fn row_strides(name: &'static str, layout: &Layout) -> Result<Strides> {
    let st = layout.stride();
    let dims = layout.dims();
    // Rows must be contiguous, and every row 16-byte aligned (cp.async moves
    // 16-byte chunks): start offset and batch/head strides multiples of 8 elements.
    let ok = st.len() == 4
        && st[3] == 1
        && (st[2] == dims[3] || dims[2] <= 1)
        && layout.start_offset() % 8 == 0
        && st[0] % 8 == 0
        && st[1] % 8 == 0;
    if !ok {
        return Err(Error::NonContiguous {
            name,
            shape: dims.to_vec(),
            strides: st.to_vec(),
        });
    }
    Ok(Strides {
        batch: st[0] as u64,
        head: st[1] as u64,
    })
}

fn cuda_device(t: &Tensor, op: &'static str) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        other => Err(Error::UnsupportedDevice {
            op,
            device: format!("{:?}", other.location()),
            reason: "the CUDA kernel needs CUDA tensors",
        }),
    }
}

/// The typed checks of the CUDA path on `q, k, v` (shapes already checked by
/// `check_qkv`) and the scale: element type, head dim, CUDA device, row
/// strides, [`check_scale`]. The autograd op (`crate::op`) runs them before
/// recording itself, so its errors stay typed instead of arriving wrapped in
/// a candle error.
pub(crate) fn check_inputs(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: Option<f64>,
    op: &'static str,
) -> Result<()> {
    check_scale(op, scale)?;
    kernel_elem(op, q.dtype(), q.dim(3)?)?;
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        cuda_device(t, op)?;
        row_strides(name, t.layout())?;
    }
    Ok(())
}

/// One launch of `kernel` from `ptx` (loaded once per device as `module`):
/// the one launcher of every kernel of the crate (forward, backward, decode).
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch(
    dev: &CudaDevice,
    module: &str,
    ptx: &str,
    kernel: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared_bytes: u32,
    args: &[Arg],
) -> Result<()> {
    let func = dev.get_or_load_custom_func(kernel, module, ptx)?;
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        shared_bytes as i32,
    )
    .w()?;
    let cfg = LaunchConfig {
        grid_dim: grid,
        block_dim: block,
        shared_mem_bytes: shared_bytes,
    };
    let mut builder = func.builder();
    for a in args {
        match a {
            Arg::U64(x) => builder.arg(x),
            Arg::U32(x) => builder.arg(x),
            Arg::F32(x) => builder.arg(x),
        };
    }
    // SAFETY: the argument list is the kernel's (built by FwdLaunch, BwdLaunch
    // or DecodeLaunch for exactly this entry point), the callers keep every
    // buffer alive and guarded until the launch is enqueued, and the launch
    // descriptions keep every access inside those buffers.
    unsafe { builder.launch(cfg) }.w()?;
    Ok(())
}

/// Runs the forward kernel on CUDA tensors `q: [b, hq, N, d]`, `k, v: [b, hkv,
/// N, d]` (bf16 or f16, d = 64 or 128, rows contiguous) under `mask`; returns
/// the output `[b, hq, N, d]` and the log-sum-exp `[b, hq, N]` (f32, natural
/// log of the scaled scores). Records no backward op: `ksa::attention` does
/// (through `crate::op`).
pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Mask,
    scale: Option<f64>,
) -> Result<(Tensor, Tensor)> {
    let dims = check_qkv(q, k, v, "ksa CUDA attention")?;
    mask.check_len("q", dims.len)?;
    cuda_device(q, "ksa CUDA attention")?;
    let (b, hq, n, d) = (dims.batch, dims.q_heads, dims.len, dims.head_dim);
    let (o, lse) = {
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (Storage::Cuda(qs), Storage::Cuda(ks), Storage::Cuda(vs)) = (&*qs, &*ks, &*vs) else {
            return Err(Error::UnsupportedDevice {
                op: "ksa CUDA attention",
                device: "non-CUDA storage".into(),
                reason: "q, k and v must all live on the CUDA device",
            });
        };
        forward_storage((qs, ql), (ks, kl), (vs, vl), mask, scale)?
    };
    let o = Tensor::from_storage(Storage::Cuda(o), (b, hq, n, d), BackpropOp::none(), false);
    let lse = Tensor::from_storage(Storage::Cuda(lse), (b, hq, n), BackpropOp::none(), false);
    Ok((o, lse))
}

/// [`forward`] on candle storages (as `CustomOp3::cuda_fwd` receives them;
/// shapes already checked by the caller): the output `[b, hq, N, d]` and the
/// log-sum-exp `[b, hq, N]` f32 storages, both contiguous.
pub fn forward_storage(
    (qs, ql): (&CudaStorage, &Layout),
    (ks, kl): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
    mask: Mask,
    scale: Option<f64>,
) -> Result<(CudaStorage, CudaStorage)> {
    use candle_core::backend::BackendStorage;
    let (b, hq, n, d) = ql.shape().dims4()?;
    mask.check_len("q", n)?;
    let hkv = kl.shape().dims4()?.1;
    let elem = kernel_elem("ksa CUDA attention", qs.dtype(), ql.dim(3)?)?;
    let dev = qs.device.clone();
    let mut lse = dev.alloc_zeros::<f32>((b * hq * n).max(1))?;
    macro_rules! empty {
        ($t:ty) => {
            CudaStorage::wrap_cuda_slice(
                dev.alloc_zeros::<$t>((b * hq * n * d).max(1))?,
                dev.clone(),
            )
        };
    }
    if b == 0 || hq == 0 || n == 0 {
        let o = match elem {
            Elem::Bf16 => empty!(half::bf16),
            Elem::F16 => empty!(half::f16),
        };
        return Ok((o, CudaStorage::wrap_cuda_slice(lse, dev.clone())));
    }
    let mut problem = FwdProblem::contiguous(b, hq, hkv, n, d, elem);
    problem.q = row_strides("q", ql)?;
    problem.k = row_strides("k", kl)?;
    problem.v = row_strides("v", vl)?;
    if let Some(s) = scale {
        problem.scale = s as f32;
    }
    let plan = FwdLaunch::new(mask, &problem)?;
    macro_rules! run {
        ($t:ty) => {{
            let mut o = dev.alloc_zeros::<$t>(b * hq * n * d)?;
            let qkv = (&view(qs, ql)?, &view(ks, kl)?, &view(vs, vl)?);
            launch_fwd(&dev, &plan, qkv, &mut o, &mut lse)?;
            CudaStorage::wrap_cuda_slice(o, dev.clone())
        }};
    }
    let o = match elem {
        Elem::Bf16 => run!(half::bf16),
        Elem::F16 => run!(half::f16),
    };
    Ok((o, CudaStorage::wrap_cuda_slice(lse, dev.clone())))
}

/// The elements of `s` from `l`'s first on.
fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
}

/// Uploads `plan`'s tables and launches it on `q, k, v` (views from their
/// tensors' first elements) into `o` and `lse`, on `dev`'s stream. Every
/// pointer's stream guard lives until the launch is enqueued.
fn launch_fwd<T: DeviceRepr>(
    dev: &CudaDevice,
    plan: &FwdLaunch,
    (q, k, v): (&CudaView<'_, T>, &CudaView<'_, T>, &CudaView<'_, T>),
    o: &mut CudaSlice<T>,
    lse: &mut CudaSlice<f32>,
) -> Result<()> {
    if plan.is_empty() {
        return Ok(());
    }
    let stream = dev.cuda_stream();
    let tiles = dev.clone_htod(&plan.tiles)?;
    let entries = dev.clone_htod(&plan.entries)?;
    let (qp, _g1) = q.device_ptr(&stream);
    let (kp, _g2) = k.device_ptr(&stream);
    let (vp, _g3) = v.device_ptr(&stream);
    let (op, _g4) = o.device_ptr_mut(&stream);
    let (lp, _g5) = lse.device_ptr_mut(&stream);
    let (tp, _g6) = tiles.device_ptr(&stream);
    let (ep, _g7) = entries.device_ptr(&stream);
    let args = plan.args(&FwdPointers {
        q: qp,
        k: kp,
        v: vp,
        o: op,
        lse: lp,
        tiles: tp,
        entries: ep,
    });
    launch(
        dev,
        MODULE,
        super::ptx::FWD,
        &plan.kernel,
        plan.grid,
        plan.block,
        plan.shared_bytes,
        &args,
    )
}

/// One cache step of [`forward_steps`].
#[derive(Debug, Clone, Copy)]
pub struct Step<'a> {
    /// The mask of the sequence's whole text after the step.
    pub mask: Mask,
    /// The step's queries and where its rows sit ([`FwdLaunch::step`]): its
    /// query rows in `q` from [`QueryOffset::first_row`], its keys held from
    /// text token [`QueryOffset::first_key`].
    pub offset: QueryOffset,
    /// The held keys `[b, hkv, held, d]` in the gathered order: every
    /// summary of `mask`, then its text from `first_key`.
    pub k: &'a Tensor,
    /// The held values, as `k`.
    pub v: &'a Tensor,
}

/// The forward kernel over cache steps that share one query tensor `q: [b,
/// hq, R, d]` (each step's query rows at its own `first_row`, in slot
/// order), one launch per step ([`FwdLaunch::step`]); returns the output
/// `[b, hq, R, d]` and the log-sum-exp `[b, hq, R]` (f32), both zero on rows
/// no step names. CUDA tensors, bf16 or f16, d = 64 or 128, rows contiguous;
/// every step's `k` and `v` hold exactly the keys its launch reads (else
/// [`Error::DimMismatch`]), so no launch reads past them.
pub fn forward_steps(
    q: &Tensor,
    steps: &[Step<'_>],
    scale: Option<f64>,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "ksa CUDA attention (cache steps)";
    let (b, hq, rows, d) = q.dims4()?;
    let elem = kernel_elem(OP, q.dtype(), d)?;
    let dev = cuda_device(q, OP)?;
    let mut problems = Vec::with_capacity(steps.len());
    for st in steps {
        let ((kb, hkv, held, kd), vdims) = (st.k.dims4()?, st.v.dims4()?);
        check_eq("batch", "q", b, "k", kb)?;
        check_eq("head dim", "q", d, "k", kd)?;
        for (axis, (want, got)) in ["batch", "heads", "held keys", "head dim"].into_iter().zip(
            [kb, hkv, held, kd]
                .into_iter()
                .zip(<[usize; 4]>::from(vdims)),
        ) {
            check_eq(axis, "k", want, "v", got)?;
        }
        let text = st.mask.text_len().checked_sub(st.offset.first_key);
        let want = text.map_or(usize::MAX, |t| st.mask.summary_len() + t);
        check_eq("held keys", "the step's mask", want, "k", held)?;
        for (name, t) in [("k", st.k), ("v", st.v)] {
            check_same_dtype("q", q, name, t)?;
            check_same_device("q", q, name, t)?;
        }
        let mut p = FwdProblem::contiguous(b, hq, hkv, rows, d, elem);
        p.q = row_strides("q", q.layout())?;
        p.k = row_strides("k", st.k.layout())?;
        p.v = row_strides("v", st.v.layout())?;
        if let Some(s) = scale {
            p.scale = s as f32;
        }
        problems.push(FwdLaunch::step(st.mask, &p, st.offset)?);
    }
    macro_rules! run {
        ($t:ty) => {
            run_steps::<$t>(&dev, q, steps, &problems, (b, hq, rows, d))?
        };
    }
    let (o, lse) = match elem {
        Elem::Bf16 => run!(half::bf16),
        Elem::F16 => run!(half::f16),
    };
    let wrap = |s: CudaStorage, shape: Shape| {
        Tensor::from_storage(Storage::Cuda(s), shape, BackpropOp::none(), false)
    };
    Ok((
        wrap(o, (b, hq, rows, d).into()),
        wrap(lse, (b, hq, rows).into()),
    ))
}

/// [`forward_steps`]' launches, for element type `T`: every storage stays
/// read-locked until its step's launch is enqueued.
fn run_steps<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    q: &Tensor,
    steps: &[Step<'_>],
    launches: &[FwdLaunch],
    (b, hq, rows, d): (usize, usize, usize, usize),
) -> Result<(CudaStorage, CudaStorage)> {
    let mut o = dev.alloc_zeros::<T>((b * hq * rows * d).max(1))?;
    let mut lse = dev.alloc_zeros::<f32>((b * hq * rows).max(1))?;
    let (qs, ql) = q.storage_and_layout();
    let Storage::Cuda(qs) = &*qs else {
        unreachable!("q was checked to be on the CUDA device")
    };
    let qv = view::<T>(qs, ql)?;
    for (st, plan) in steps.iter().zip(launches) {
        let (ks, kl) = st.k.storage_and_layout();
        let (vs, vl) = st.v.storage_and_layout();
        let (Storage::Cuda(ks), Storage::Cuda(vs)) = (&*ks, &*vs) else {
            unreachable!("k and v were checked to be on q's device")
        };
        let (kv, vv) = (view::<T>(ks, kl)?, view::<T>(vs, vl)?);
        launch_fwd(dev, plan, (&qv, &kv, &vv), &mut o, &mut lse)?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(o, dev.clone()),
        CudaStorage::wrap_cuda_slice(lse, dev.clone()),
    ))
}

/// Gradients `(dq, dk, dv)` of `o = softmax(scale q k^T + mask) v` under
/// `mask`, given the forward's inputs, its output `o`, the output gradient
/// `dout` and its log-sum-exp `lse: [b, hq, N]` f32 (as [`forward`] returns
/// it). CUDA tensors, bf16 or f16, d = 64 or 128, rows contiguous; the
/// gradients are contiguous and in the input dtype.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    dout: &Tensor,
    lse: &Tensor,
    mask: Mask,
    scale: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "ksa CUDA attention backward";
    let dims = check_qkv(q, k, v, OP)?;
    mask.check_len("q", dims.len)?;
    let (b, hq, hkv, n, d) = (
        dims.batch,
        dims.q_heads,
        dims.kv_heads,
        dims.len,
        dims.head_dim,
    );
    // o and dout: q's shape, dtype and device; lse: f32 [b, hq, N], contiguous.
    for (name, t) in [("o", o), ("dout", dout)] {
        check_eq("rank", "q", 4, name, t.rank())?;
        for (axis, (&want, &got)) in ["batch", "heads", "slots", "head dim"]
            .into_iter()
            .zip(q.dims().iter().zip(t.dims()))
        {
            check_eq(axis, "q", want, name, got)?;
        }
        check_same_dtype("q", q, name, t)?;
    }
    check_eq("rank", "q without head dim", 3, "lse", lse.rank())?;
    for (axis, (want, &got)) in ["batch", "heads", "slots"]
        .into_iter()
        .zip([b, hq, n].into_iter().zip(lse.dims()))
    {
        check_eq(axis, "q", want, "lse", got)?;
    }
    if lse.dtype() != DType::F32 {
        return Err(Error::UnsupportedDType {
            op: "ksa CUDA attention backward (lse)",
            got: lse.dtype(),
            supported: "f32",
        });
    }
    if !lse.is_contiguous() {
        return Err(Error::NonContiguous {
            name: "lse",
            shape: lse.dims().to_vec(),
            strides: lse.stride().to_vec(),
        });
    }
    let elem = kernel_elem(OP, q.dtype(), q.dim(3)?)?;
    let dev = cuda_device(q, OP)?;
    for (name, t) in [("o", o), ("dout", dout), ("lse", lse)] {
        check_same_device("q", q, name, t)?;
    }
    if b * hq * n == 0 {
        let zeros = |h| Tensor::zeros((b, h, n, d), q.dtype(), q.device());
        return Ok((zeros(hq)?, zeros(hkv)?, zeros(hkv)?));
    }
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (os, ol) = o.storage_and_layout();
    let (dos, dol) = dout.storage_and_layout();
    let (ls, ll) = lse.storage_and_layout();
    let mut problem = BwdProblem::contiguous(b, hq, hkv, n, d, elem);
    problem.scale = scale;
    problem.q = row_strides("q", ql)?;
    problem.k = row_strides("k", kl)?;
    problem.v = row_strides("v", vl)?;
    problem.o = row_strides("o", ol)?;
    problem.dout = row_strides("dout", dol)?;
    let plan = BwdLaunch::new(mask, &problem)?;
    let stream = dev.cuda_stream();
    let (
        Storage::Cuda(qs),
        Storage::Cuda(ks),
        Storage::Cuda(vs),
        Storage::Cuda(os),
        Storage::Cuda(dos),
        Storage::Cuda(ls),
    ) = (&*qs, &*ks, &*vs, &*os, &*dos, &*ls)
    else {
        return Err(Error::UnsupportedDevice {
            op: OP,
            device: "non-CUDA storage".into(),
            reason: "q, k, v, o, dout and lse must all live on the CUDA device",
        });
    };
    let dsum = dev.alloc_zeros::<f32>(plan.dsum_len())?;
    let dq_acc = dev.alloc_zeros::<f32>(plan.dq_acc_len())?;
    let tiles = dev.clone_htod(&plan.tiles)?;
    let entries = dev.clone_htod(&plan.entries)?;
    let lsev = ls.as_cuda_slice::<f32>()?.slice(ll.start_offset()..);

    macro_rules! run {
        ($t:ty) => {{
            let dq = dev.alloc_zeros::<$t>(b * hq * n * d)?;
            let dk = dev.alloc_zeros::<$t>(b * hkv * n * d)?;
            let dv = dev.alloc_zeros::<$t>(b * hkv * n * d)?;
            {
                let qv = qs.as_cuda_slice::<$t>()?.slice(ql.start_offset()..);
                let kv = ks.as_cuda_slice::<$t>()?.slice(kl.start_offset()..);
                let vv = vs.as_cuda_slice::<$t>()?.slice(vl.start_offset()..);
                let ov = os.as_cuda_slice::<$t>()?.slice(ol.start_offset()..);
                let dov = dos.as_cuda_slice::<$t>()?.slice(dol.start_offset()..);
                let (qp, _g1) = qv.device_ptr(&stream);
                let (kp, _g2) = kv.device_ptr(&stream);
                let (vp, _g3) = vv.device_ptr(&stream);
                let (op, _g4) = ov.device_ptr(&stream);
                let (dop, _g5) = dov.device_ptr(&stream);
                let (lp, _g6) = lsev.device_ptr(&stream);
                let (sp, _g7) = dsum.device_ptr(&stream);
                let (ap, _g8) = dq_acc.device_ptr(&stream);
                let (dqp, _g9) = dq.device_ptr(&stream);
                let (dkp, _g10) = dk.device_ptr(&stream);
                let (dvp, _g11) = dv.device_ptr(&stream);
                let (tp, _g12) = tiles.device_ptr(&stream);
                let (ep, _g13) = entries.device_ptr(&stream);
                let ptrs = BwdPointers {
                    q: qp,
                    k: kp,
                    v: vp,
                    o: op,
                    dout: dop,
                    lse: lp,
                    dsum: sp,
                    dq_acc: ap,
                    dq: dqp,
                    dk: dkp,
                    dv: dvp,
                    tiles: tp,
                    entries: ep,
                };
                for s in plan.steps(&ptrs) {
                    launch(
                        &dev,
                        MODULE_BWD,
                        super::ptx::BWD,
                        &s.kernel,
                        s.grid,
                        s.block,
                        s.shared_bytes,
                        &s.args,
                    )?;
                }
            }
            (
                CudaStorage::wrap_cuda_slice(dq, dev.clone()),
                CudaStorage::wrap_cuda_slice(dk, dev.clone()),
                CudaStorage::wrap_cuda_slice(dv, dev.clone()),
            )
        }};
    }
    let (dq, dk, dv) = match elem {
        Elem::Bf16 => run!(half::bf16),
        Elem::F16 => run!(half::f16),
    };
    let wrap = |s: CudaStorage, shape: Shape| {
        Tensor::from_storage(Storage::Cuda(s), shape, BackpropOp::none(), false)
    };
    Ok((
        wrap(dq, (b, hq, n, d).into()),
        wrap(dk, (b, hkv, n, d).into()),
        wrap(dv, (b, hkv, n, d).into()),
    ))
}
