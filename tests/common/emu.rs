//! Runs the embedded forward PTX under `ptx-emu` through the crate's own
//! [`FwdLaunch`] and compares it with `ksa::reference`.
#![allow(dead_code)]

use candle_core::{Device as Cpu, Tensor};
use half::{bf16, f16};
use ksa::cuda::launch::{Arg, Elem, FwdLaunch, FwdPointers, FwdProblem, Strides};
use ksa::mask::Mask;
use ksa::KsaLayout;
use ptx_emu::{Device, LaunchReport, Module, Param};
use std::sync::OnceLock;

pub fn module() -> &'static Module {
    static M: OnceLock<Module> = OnceLock::new();
    M.get_or_init(|| Module::parse(ksa::cuda::ptx::FWD).expect("emulator parses the PTX"))
}

/// Deterministic normal-ish values (xorshift + sum of uniforms).
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn normal(&mut self) -> f32 {
        let u: f32 = (0..4)
            .map(|_| (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
            .sum();
        (u - 2.0) * 1.7
    }
}

/// One problem: sizes, dtype and the mask.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub mask: Mask,
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub elem: Elem,
    pub seed: u64,
    /// `None`: the launch's choice (the largest of 4, 2, 1 dividing the group).
    pub heads_per_cta: Option<usize>,
    /// Unused (NaN) rows after every K/V head: non-contiguous head strides.
    pub pad_rows: usize,
}

pub struct Run {
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
    pub report: LaunchReport,
    pub launch: FwdLaunch,
}

/// `x` rounded to the element type, as f32.
pub fn rounded(elem: Elem, x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| round(elem, v)).collect()
}

fn round(elem: Elem, x: f32) -> f32 {
    match elem {
        Elem::Bf16 => bf16::from_f32(x).to_f32(),
        Elem::F16 => f16::from_f32(x).to_f32(),
    }
}

fn upload(dev: &mut Device, elem: Elem, x: &[f32]) -> ptx_emu::DevPtr {
    match elem {
        Elem::Bf16 => dev.alloc_bf16(&x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()),
        Elem::F16 => dev.alloc_f16(&x.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>()),
    }
}

/// Random q, k, v (already rounded to the element type), `[b, h, N, d]` each.
pub fn inputs(case: &Case) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = case.mask.len();
    let mut rng = Rng::new(case.seed);
    let mut gen = |heads: usize| -> Vec<f32> {
        (0..case.batch * heads * n * case.head_dim)
            .map(|_| round(case.elem, rng.normal()))
            .collect()
    };
    let q = gen(case.q_heads);
    let k = gen(case.kv_heads);
    let v = gen(case.kv_heads);
    (q, k, v)
}

/// Runs the kernel under the emulator (sanitizer on; any finding is an error).
pub fn run(case: &Case, q: &[f32], k: &[f32], v: &[f32]) -> Run {
    let n = case.mask.len();
    let mut problem = FwdProblem::contiguous(
        case.batch,
        case.q_heads,
        case.kv_heads,
        n,
        case.head_dim,
        case.elem,
    );
    problem.heads_per_cta = case.heads_per_cta;
    // Optionally lay k and v out with `pad_rows` unused rows after every head
    // (and q as [b, N, hq, d]-like interleaved heads are not supported: rows must
    // be contiguous), exercising the batch/head strides of the launch.
    let (k, v) = if case.pad_rows > 0 {
        let d = case.head_dim;
        let hs = (n + case.pad_rows) * d;
        let pad = |x: &[f32]| -> Vec<f32> {
            let mut out = vec![f32::NAN; case.batch * case.kv_heads * hs];
            for bh in 0..case.batch * case.kv_heads {
                out[bh * hs..bh * hs + n * d].copy_from_slice(&x[bh * n * d..(bh + 1) * n * d]);
            }
            out
        };
        let st = Strides {
            batch: (case.kv_heads * hs) as u64,
            head: hs as u64,
        };
        problem.k = st;
        problem.v = st;
        (pad(k), pad(v))
    } else {
        (k.to_vec(), v.to_vec())
    };
    let launch = FwdLaunch::new(case.mask, &problem).unwrap();
    let o_len = case.batch * case.q_heads * n * case.head_dim;
    let lse_len = case.batch * case.q_heads * n;
    let (out, lse, report) = execute(case, &launch, (q, &k, &v), o_len, lse_len);
    Run {
        out,
        lse,
        report,
        launch,
    }
}

/// Runs `launch` on q, k, v (laid out as it expects) under the emulator
/// (sanitizer on; any finding is an error) into an output of `o_len`
/// elements and a log-sum-exp of `lse_len`, both all-ones bits (NaN) before,
/// so every element the launch does not write reads back NaN.
pub fn execute(
    case: &Case,
    launch: &FwdLaunch,
    (q, k, v): (&[f32], &[f32], &[f32]),
    o_len: usize,
    lse_len: usize,
) -> (Vec<f32>, Vec<f32>, LaunchReport) {
    let mut dev = Device::new();
    let qp = upload(&mut dev, case.elem, q);
    let kp = upload(&mut dev, case.elem, k);
    let vp = upload(&mut dev, case.elem, v);
    let op = dev.alloc(o_len * 2);
    let lp = dev.alloc(lse_len * 4);
    dev.write(op, &vec![0xff; o_len * 2]).unwrap();
    dev.write(lp, &vec![0xff; lse_len * 4]).unwrap();
    let tp = dev.alloc_u32(&launch.tiles);
    let ep = dev.alloc_u32(&launch.entries);
    let args: Vec<Param> = launch
        .args(&FwdPointers {
            q: qp.0,
            k: kp.0,
            v: vp.0,
            o: op.0,
            lse: lp.0,
            tiles: tp.0,
            entries: ep.0,
        })
        .into_iter()
        .map(|a| match a {
            Arg::U64(x) => Param::U64(x),
            Arg::U32(x) => Param::U32(x),
            Arg::F32(x) => Param::F32(x),
        })
        .collect();
    let kernel = module().kernel(&launch.kernel).unwrap();
    let report = dev
        .launch(
            kernel,
            launch.grid,
            launch.block,
            launch.shared_bytes,
            &args,
        )
        .unwrap_or_else(|e| panic!("{case:?}: {e}"));
    let out = match case.elem {
        Elem::Bf16 => dev
            .read_bf16(op, o_len)
            .unwrap()
            .into_iter()
            .map(f32::from)
            .collect(),
        Elem::F16 => dev
            .read_f16(op, o_len)
            .unwrap()
            .into_iter()
            .map(f32::from)
            .collect(),
    };
    let lse = dev.read_f32(lp, lse_len).unwrap();
    (out, lse, report)
}

/// `ksa::reference` output (f64 math on the rounded inputs, returned as f32)
/// and the log-sum-exp of every row, computed here in f64 from the mask.
pub fn reference(case: &Case, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f64>) {
    let (b, hq, hkv, d, n) = (
        case.batch,
        case.q_heads,
        case.kv_heads,
        case.head_dim,
        case.mask.len(),
    );
    let t = |x: &[f32], h: usize| Tensor::from_slice(x, (b, h, n, d), &Cpu::Cpu).unwrap();
    let (qt, kt, vt) = (t(q, hq), t(k, hkv), t(v, hkv));
    let out = match case.mask {
        Mask::Ksa(layout) => ksa::reference::attention(&qt, &kt, &vt, &layout).unwrap(),
        Mask::Causal { .. } => ksa::reference::causal_attention(&qt, &kt, &vt).unwrap(),
    };
    let out: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
    let scale = 1.0 / (d as f64).sqrt();
    let mut lse = vec![0f64; b * hq * n];
    let keys_of = |slot: usize| -> Vec<usize> {
        match case.mask {
            Mask::Ksa(layout) => layout.allowed_keys(slot),
            Mask::Causal { .. } => (0..=slot).collect(),
        }
    };
    let keys: Vec<Vec<usize>> = (0..n).map(keys_of).collect();
    for bi in 0..b {
        for h in 0..hq {
            let hk = h / (hq / hkv);
            for (i, ks) in keys.iter().enumerate() {
                let qrow = &q[((bi * hq + h) * n + i) * d..][..d];
                let s: Vec<f64> = ks
                    .iter()
                    .map(|&j| {
                        let krow = &k[((bi * hkv + hk) * n + j) * d..][..d];
                        scale
                            * qrow
                                .iter()
                                .zip(krow)
                                .map(|(&a, &b)| a as f64 * b as f64)
                                .sum::<f64>()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                lse[(bi * hq + h) * n + i] = m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            }
        }
    }
    (out, lse)
}

/// Absolute output tolerance per dtype (inputs ~N(0,1)-like, outputs are
/// convex combinations of V rows): bf16 rounds P and O to 8 mantissa bits,
/// f16 to 11.
pub fn out_tol(elem: Elem) -> f32 {
    match elem {
        Elem::Bf16 => 2e-2,
        Elem::F16 => 4e-3,
    }
}
/// Absolute log-sum-exp tolerance (f32 accumulation, `ex2/lg2.approx`).
pub const LSE_TOL: f64 = 2e-3;

/// Runs `case` and checks output and log-sum-exp against the reference.
pub fn check(case: &Case) -> Run {
    let (q, k, v) = inputs(case);
    let run = run(case, &q, &k, &v);
    let (want, want_lse) = reference(case, &q, &k, &v);
    let tol = out_tol(case.elem);
    let mut worst = (0f32, 0usize);
    for (i, (&g, &w)) in run.out.iter().zip(&want).enumerate() {
        let err = (g - w).abs();
        assert!(
            err.is_finite() || g == w,
            "{case:?}: out[{i}] = {g}, want {w}"
        );
        if err > worst.0 {
            worst = (err, i);
        }
    }
    assert!(
        worst.0 <= tol,
        "{case:?}: out[{}] = {}, want {} (|err| {} > {tol})",
        worst.1,
        run.out[worst.1],
        want[worst.1],
        worst.0
    );
    let mut worst_lse = 0f64;
    for (i, (&g, &w)) in run.lse.iter().zip(&want_lse).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(err <= LSE_TOL, "{case:?}: lse[{i}] = {g}, want {w}");
        worst_lse = worst_lse.max(err);
    }
    eprintln!(
        "ok {:?} N={} {:?} d={} b={} hq={} hkv={} heads/CTA={}: max |err| out {:.2e}, lse {:.2e}; {} visits, mma {}, bank conflicts {}, {:.2}s",
        case.rule_kind(),
        case.mask.len(),
        case.elem,
        case.head_dim,
        case.batch,
        case.q_heads,
        case.kv_heads,
        run.launch.heads_per_cta,
        worst.0,
        worst_lse,
        run.launch.schedule.tiles_visited(),
        run.report.mma,
        run.report.bank_conflicts,
        run.report.wall.as_secs_f64()
    );
    run
}

impl Case {
    pub fn ksa(c: usize, s: usize, w: usize, n: usize) -> Self {
        let layout = KsaLayout::new(ksa::KsaConfig::new(c, s, w).unwrap(), n).unwrap();
        Self {
            mask: Mask::Ksa(layout),
            batch: 1,
            q_heads: 1,
            kv_heads: 1,
            head_dim: 64,
            elem: Elem::Bf16,
            seed: (c * 1_000_003 + s * 1009 + w * 31 + n) as u64,
            heads_per_cta: None,
            pad_rows: 0,
        }
    }
    pub fn causal(n: usize) -> Self {
        Self {
            mask: Mask::Causal { len: n },
            batch: 1,
            q_heads: 1,
            kv_heads: 1,
            head_dim: 64,
            elem: Elem::Bf16,
            seed: n as u64,
            heads_per_cta: None,
            pad_rows: 0,
        }
    }
    pub fn dim(mut self, d: usize) -> Self {
        self.head_dim = d;
        self
    }
    pub fn f16(mut self) -> Self {
        self.elem = Elem::F16;
        self
    }
    pub fn heads(mut self, b: usize, hq: usize, hkv: usize) -> Self {
        self.batch = b;
        self.q_heads = hq;
        self.kv_heads = hkv;
        self
    }
    pub fn pad_rows(mut self, rows: usize) -> Self {
        self.pad_rows = rows;
        self
    }
    pub fn heads_per_cta(mut self, h: usize) -> Self {
        self.heads_per_cta = Some(h);
        self
    }
    /// Whether query slot `i` may read key slot `j` under the case's mask.
    pub fn can_attend(&self, i: usize, j: usize) -> bool {
        match self.mask {
            Mask::Ksa(layout) => layout.can_attend(i, j),
            Mask::Causal { .. } => j <= i,
        }
    }

    pub fn rule_kind(&self) -> String {
        match self.mask {
            Mask::Ksa(l) => format!(
                "KSA C={} S={} W={}",
                l.config().chunk_size(),
                l.config().summaries(),
                l.config().window()
            ),
            Mask::Causal { .. } => "causal".into(),
        }
    }
}
