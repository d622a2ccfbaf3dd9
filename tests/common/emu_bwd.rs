//! Runs the embedded backward PTX under `ptx-emu` through the crate's own
//! [`BwdLaunch`], after the forward kernel (`common::emu::run`) produced O and
//! the log-sum-exp, and compares dq, dk, dv with candle's f64 autograd
//! through `ksa::reference` and with the crate's CPU backward.
#![allow(dead_code)]

use crate::common::emu::{self, Case, Rng};
use candle_core::{DType, Device as Cpu, Tensor, Var};
use half::{bf16, f16};
use ksa::cuda::backward::{BwdLaunch, BwdPointers, BwdProblem};
use ksa::cuda::launch::{Arg, Elem, Strides};
use ksa::mask::Mask;
use ptx_emu::{Device, LaunchReport, Module, Param};
use std::sync::OnceLock;

pub fn module() -> &'static Module {
    static M: OnceLock<Module> = OnceLock::new();
    M.get_or_init(|| Module::parse(ksa::cuda::ptx::BWD).expect("emulator parses the PTX"))
}

pub struct BwdRun {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
    /// Per launched kernel: its name and counters.
    pub reports: Vec<(String, LaunchReport)>,
    pub launch: BwdLaunch,
    /// The forward launch on the same problem (set by [`check`]).
    pub forward: LaunchReport,
}

impl BwdRun {
    /// The main kernel's counters.
    pub fn main(&self) -> &LaunchReport {
        &self
            .reports
            .iter()
            .find(|(k, _)| !k.contains("prep") && !k.contains("_dq_"))
            .expect("main kernel ran")
            .1
    }
}

fn upload(dev: &mut Device, elem: Elem, x: &[f32]) -> ptx_emu::DevPtr {
    match elem {
        Elem::Bf16 => dev.alloc_bf16(&x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()),
        Elem::F16 => dev.alloc_f16(&x.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>()),
    }
}

fn read(dev: &Device, elem: Elem, p: ptx_emu::DevPtr, len: usize) -> Vec<f32> {
    match elem {
        Elem::Bf16 => dev
            .read_bf16(p, len)
            .unwrap()
            .into_iter()
            .map(f32::from)
            .collect(),
        Elem::F16 => dev
            .read_f16(p, len)
            .unwrap()
            .into_iter()
            .map(f32::from)
            .collect(),
    }
}

/// A buffer of `bytes` filled with NaN (0xff bytes): every element the
/// kernels should write or zero must be.
fn nan_buffer(dev: &mut Device, bytes: usize) -> ptx_emu::DevPtr {
    let p = dev.alloc(bytes.max(4));
    dev.write(p, &vec![0xff; bytes.max(4)]).unwrap();
    p
}

/// Runs the three backward kernels (sanitizer on; any finding is an error).
#[allow(clippy::too_many_arguments)]
pub fn run(
    case: &Case,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    dout: &[f32],
    lse: &[f32],
) -> BwdRun {
    let n = case.mask.len();
    let mut problem = BwdProblem::contiguous(
        case.batch,
        case.q_heads,
        case.kv_heads,
        n,
        case.head_dim,
        case.elem,
    );
    // Optionally lay k and v out with `pad_rows` unused (NaN) rows after every
    // head: non-contiguous head strides the kernel must follow.
    let (k, v) = if case.pad_rows > 0 {
        let d = case.head_dim;
        let hs = (n + case.pad_rows) * d;
        let pad = |x: &[f32]| -> Vec<f32> {
            let mut out = vec![f32::NAN; case.batch * case.kv_heads * hs];
            for (bh, rows) in x.chunks(n * d).enumerate() {
                out[bh * hs..bh * hs + n * d].copy_from_slice(rows);
            }
            out
        };
        problem.k = Strides {
            batch: (case.kv_heads * hs) as u64,
            head: hs as u64,
        };
        problem.v = problem.k;
        (pad(k), pad(v))
    } else {
        (k.to_vec(), v.to_vec())
    };
    let (k, v) = (&k[..], &v[..]);
    let launch = BwdLaunch::new(case.mask, &problem).unwrap();
    let mut dev = Device::new();
    let (qp, kp, vp, op, dop) = (
        upload(&mut dev, case.elem, q),
        upload(&mut dev, case.elem, k),
        upload(&mut dev, case.elem, v),
        upload(&mut dev, case.elem, o),
        upload(&mut dev, case.elem, dout),
    );
    let lp = dev.alloc_f32(lse);
    let q_len = case.batch * case.q_heads * n * case.head_dim;
    let kv_len = case.batch * case.kv_heads * n * case.head_dim; // dk, dv: contiguous
    let dsum = nan_buffer(&mut dev, launch.dsum_len() * 4);
    let dq_acc = nan_buffer(&mut dev, launch.dq_acc_len() * 4);
    let dq = nan_buffer(&mut dev, q_len * 2);
    let dk = nan_buffer(&mut dev, kv_len * 2);
    let dv = nan_buffer(&mut dev, kv_len * 2);
    let tp = dev.alloc_u32(&launch.tiles);
    let ep = dev.alloc_u32(&launch.entries);
    let ptrs = BwdPointers {
        q: qp.0,
        k: kp.0,
        v: vp.0,
        o: op.0,
        dout: dop.0,
        lse: lp.0,
        dsum: dsum.0,
        dq_acc: dq_acc.0,
        dq: dq.0,
        dk: dk.0,
        dv: dv.0,
        tiles: tp.0,
        entries: ep.0,
    };
    let mut reports = Vec::new();
    for step in launch.steps(&ptrs) {
        let args: Vec<Param> = step
            .args
            .iter()
            .map(|a| match *a {
                Arg::U64(x) => Param::U64(x),
                Arg::U32(x) => Param::U32(x),
                Arg::F32(x) => Param::F32(x),
            })
            .collect();
        let kernel = module().kernel(&step.kernel).unwrap();
        let report = dev
            .launch(kernel, step.grid, step.block, step.shared_bytes, &args)
            .unwrap_or_else(|e| panic!("{case:?} {}: {e}", step.kernel));
        reports.push((step.kernel.clone(), report));
    }
    BwdRun {
        dq: read(&dev, case.elem, dq, q_len),
        dk: read(&dev, case.elem, dk, kv_len),
        dv: read(&dev, case.elem, dv, kv_len),
        reports,
        launch,
        forward: LaunchReport::default(),
    }
}

/// Gradients of `sum(reference(q, k, v) * dout)` by candle's autograd in f64.
pub fn reference_grads(
    case: &Case,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
) -> [Vec<f64>; 3] {
    autograd_grads(case, q, k, v, dout, DType::F64, |q, k, v| match case.mask {
        Mask::Ksa(layout) => ksa::reference::attention(q, k, v, &layout),
        Mask::Causal { .. } => ksa::reference::causal_attention(q, k, v),
    })
}

/// The same gradients from the crate's CPU op (`ksa::attention` /
/// `ksa::causal_attention` in f32, i.e. the CPU backward of `src/backward.rs`).
pub fn cpu_grads(case: &Case, q: &[f32], k: &[f32], v: &[f32], dout: &[f32]) -> [Vec<f64>; 3] {
    autograd_grads(case, q, k, v, dout, DType::F32, |q, k, v| match case.mask {
        Mask::Ksa(layout) => ksa::attention(q, k, v, &layout),
        Mask::Causal { .. } => ksa::causal_attention(q, k, v),
    })
}

/// Gradients of `sum(attend(q, k, v) * dout)` by candle's autograd, computed in
/// `dtype`.
fn autograd_grads(
    case: &Case,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    dtype: DType,
    attend: impl Fn(&Tensor, &Tensor, &Tensor) -> ksa::Result<Tensor>,
) -> [Vec<f64>; 3] {
    let (b, hq, hkv, d, n) = (
        case.batch,
        case.q_heads,
        case.kv_heads,
        case.head_dim,
        case.mask.len(),
    );
    let var = |x: &[f32], h: usize| {
        let t = Tensor::from_slice(x, (b, h, n, d), &Cpu::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        Var::from_tensor(&t).unwrap()
    };
    let (qv, kv, vv) = (var(q, hq), var(k, hkv), var(v, hkv));
    let out = attend(qv.as_tensor(), kv.as_tensor(), vv.as_tensor()).unwrap();
    let w = Tensor::from_slice(dout, (b, hq, n, d), &Cpu::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let grads = (out * w).unwrap().sum_all().unwrap().backward().unwrap();
    [&qv, &kv, &vv].map(|x| {
        grads
            .get(x.as_tensor())
            .expect("gradient tracked")
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    })
}

/// Tolerance on `max |got - want|`, relative to `max |want|` of the same
/// gradient. The kernel rounds P and dS to the element type before the
/// tensor-core products (as FlashAttention does), gets D from the forward's
/// rounded O, and rounds the gradients themselves: bf16 keeps 8 significant
/// bits (a rounding costs up to 2^-9 = 2.0e-3 relative), f16 11 (2.4e-4).
/// Measured worst cases, default tests and the ignored 30-configuration
/// sweep together: bf16 5.3e-3, f16 7.5e-4 (2.7 and 3.1 roundings); the
/// bounds leave about 2x headroom. Dropping the `- D` term of dS gives errors of 0.9 to 3.5,
/// skipping the edge mask 25 to 1200.
pub fn grad_tol(elem: Elem) -> f64 {
    match elem {
        Elem::Bf16 => 1e-2,
        Elem::F16 => 1.5e-3,
    }
}

/// The worst relative error `max |got - want| / max |want|` of one gradient;
/// fails on any non-finite element. `max |want|` is floored at 1e-3 (as in
/// `tests/grad.rs`): a gradient that vanishes analytically (one key per row:
/// P = 1, dS = 0) is compared absolutely (the kernel gives ~1e-7 there).
fn worst(case: &Case, name: &str, got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let top = want.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-3);
    let mut worst = 0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{case:?}: {name}[{i}] = {g}, want {w}");
        worst = worst.max((g as f64 - w).abs() / top);
    }
    worst
}

/// Runs the forward then the backward of `case` under the emulator and checks
/// dq, dk, dv against the reference gradients and against the CPU backward's.
pub fn check(case: &Case) -> BwdRun {
    let (q, k, v) = emu::inputs(case);
    let fwd = emu::run(case, &q, &k, &v);
    let mut rng = Rng::new(case.seed ^ 0xd0d0);
    let dout: Vec<f32> = (0..fwd.out.len())
        .map(|_| match case.elem {
            Elem::Bf16 => bf16::from_f32(rng.normal()).to_f32(),
            Elem::F16 => f16::from_f32(rng.normal()).to_f32(),
        })
        .collect();
    let mut run = run(case, &q, &k, &v, &fwd.out, &dout, &fwd.lse);
    run.forward = fwd.report;
    let [wq, wk, wv] = reference_grads(case, &q, &k, &v, &dout);
    let tol = grad_tol(case.elem);
    let errs = [
        worst(case, "dq", &run.dq, &wq),
        worst(case, "dk", &run.dk, &wk),
        worst(case, "dv", &run.dv, &wv),
    ];
    let main = run.main();
    eprintln!(
        "ok {} N={} {:?} d={} b={} hq={} hkv={}: rel err dq {:.2e} dk {:.2e} dv {:.2e}; {} key tiles, {} visits ({} edge); mma bwd {} / fwd {}; bank conflicts {}; {:.2}s",
        case.rule_kind(),
        case.mask.len(),
        case.elem,
        case.head_dim,
        case.batch,
        case.q_heads,
        case.kv_heads,
        errs[0],
        errs[1],
        errs[2],
        run.launch.schedule.key_tiles().len(),
        run.launch.schedule.tiles_visited(),
        run.launch.schedule.edge_tiles(),
        main.mma,
        run.forward.mma,
        main.bank_conflicts,
        run.reports.iter().map(|(_, r)| r.wall.as_secs_f64()).sum::<f64>(),
    );
    for (name, e) in ["dq", "dk", "dv"].iter().zip(errs) {
        assert!(
            e <= tol,
            "{case:?}: {name} relative error {e:.3e} > {tol:.1e}"
        );
    }
    // The CPU backward agrees with the reference to f32 rounding (tests/grad.rs),
    // so the same tolerance holds against it.
    let [cq, ck, cv] = cpu_grads(case, &q, &k, &v, &dout);
    for (name, got, want) in [
        ("dq", &run.dq, &cq),
        ("dk", &run.dk, &ck),
        ("dv", &run.dv, &cv),
    ] {
        let e = worst(case, name, got, want);
        assert!(
            e <= tol,
            "{case:?}: {name} vs the CPU backward: relative error {e:.3e} > {tol:.1e}"
        );
    }
    assert_eq!(
        main.bank_conflicts, 0,
        "{case:?}: shared-memory bank conflicts"
    );
    run
}
