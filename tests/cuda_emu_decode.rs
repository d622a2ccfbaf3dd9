//! The split-KV decode kernels (`kernels/ksa_decode.cu`) under the PTX
//! emulator, driven by the crate's own [`DecodeLaunch`], equal the CPU decode
//! path [`ksa::cpu::decode::attend`] on the same bf16/f16-rounded inputs (output and
//! log-sum-exp), with the sanitizer on. Needs the `ptx` feature (nvcc).
#![cfg(feature = "ptx")]

mod common;
use common::emu::Rng;
use half::{bf16, f16};
use ksa::cpu::decode::{attend, KvSlice};
use ksa::cuda::decode::{DecodeLaunch, DecodePointers, DecodeProblem, DecodeSlice};
use ksa::cuda::launch::{Arg, Elem};
use ptx_emu::{Class, DevPtr, Device, LaunchReport, Module, Param};
use std::sync::OnceLock;

fn module() -> &'static Module {
    static M: OnceLock<Module> = OnceLock::new();
    M.get_or_init(|| Module::parse(ksa::cuda::ptx::DECODE).expect("emulator parses the PTX"))
}

/// Rows of one K/V buffer `[kv_heads, cap + PAD, d]` that a sequence's keys use.
#[derive(Debug, Clone)]
enum Piece {
    /// `rows` rows at the start of their own buffer.
    Plain(usize),
    /// A ring of `cap` rows holding `rows` live rows that start at `start`
    /// and wrap past the end: two slices (`[start, cap)` and the rest).
    Ring {
        cap: usize,
        start: usize,
        rows: usize,
    },
    /// A slice with no rows.
    Empty,
}

/// Unused rows after every KV head of a buffer (NaN: reading one shows).
const PAD: usize = 3;

#[derive(Debug, Clone)]
struct Case {
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    elem: Elem,
    seqs: Vec<Vec<Piece>>,
    split_keys: Option<usize>,
    seed: u64,
}

impl Case {
    fn new(q_heads: usize, kv_heads: usize, head_dim: usize, elem: Elem) -> Self {
        Self {
            q_heads,
            kv_heads,
            head_dim,
            elem,
            seqs: vec![],
            split_keys: None,
            seed: (q_heads * 1000 + kv_heads * 100 + head_dim) as u64,
        }
    }
    /// A KSA-shaped sequence: `sums` cached summaries, a window of `window`
    /// text rows in a ring (wrapped when `wrap`), and the current chunk plus
    /// the new token (`tail` rows), with an empty slice in between.
    fn ksa_seq(mut self, sums: usize, window: usize, tail: usize, wrap: bool) -> Self {
        let mut pieces = vec![Piece::Plain(sums)];
        if window > 0 {
            pieces.push(if wrap {
                Piece::Ring {
                    cap: window + 5,
                    start: window / 2 + 3,
                    rows: window,
                }
            } else {
                Piece::Plain(window)
            });
        }
        pieces.push(Piece::Empty);
        pieces.push(Piece::Plain(tail));
        self.seqs.push(pieces);
        self
    }
    fn seq(mut self, pieces: Vec<Piece>) -> Self {
        self.seqs.push(pieces);
        self
    }
    fn split(mut self, keys: usize) -> Self {
        self.split_keys = Some(keys);
        self
    }
}

fn round(elem: Elem, x: f32) -> f32 {
    match elem {
        Elem::Bf16 => bf16::from_f32(x).to_f32(),
        Elem::F16 => f16::from_f32(x).to_f32(),
    }
}

fn upload(dev: &mut Device, elem: Elem, x: &[f32]) -> DevPtr {
    match elem {
        Elem::Bf16 => dev.alloc_bf16(&x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()),
        Elem::F16 => dev.alloc_f16(&x.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>()),
    }
}

/// One K/V buffer on the host (f32 copies of the rounded values; NaN where
/// no key lives) and its slices as (first row, rows).
struct Buffer {
    k: Vec<f32>,
    v: Vec<f32>,
    head_stride: usize,
    parts: Vec<(usize, usize)>,
}

fn buffer(piece: &Piece, case: &Case, rng: &mut Rng) -> Buffer {
    let (cap, parts) = match *piece {
        Piece::Plain(rows) => (rows, vec![(0, rows)]),
        Piece::Ring { cap, start, rows } => {
            assert!(start + rows > cap && rows <= cap, "a ring that wraps");
            (cap, vec![(start, cap - start), (0, rows - (cap - start))])
        }
        Piece::Empty => (1, vec![(0, 0)]),
    };
    let d = case.head_dim;
    let head_stride = (cap + PAD) * d;
    let mut k = vec![f32::NAN; case.kv_heads * head_stride];
    let mut v = k.clone();
    for h in 0..case.kv_heads {
        for &(r0, rows) in &parts {
            for i in (h * head_stride + r0 * d)..(h * head_stride + (r0 + rows) * d) {
                k[i] = round(case.elem, rng.normal());
                v[i] = round(case.elem, rng.normal());
            }
        }
    }
    Buffer {
        k,
        v,
        head_stride,
        parts,
    }
}

struct Run {
    out: Vec<f32>,
    lse: Vec<f32>,
    split: LaunchReport,
    combine: LaunchReport,
    launch: DecodeLaunch,
}

fn params(args: Vec<Arg>) -> Vec<Param> {
    args.into_iter()
        .map(|a| match a {
            Arg::U64(x) => Param::U64(x),
            Arg::U32(x) => Param::U32(x),
            Arg::F32(x) => Param::F32(x),
        })
        .collect()
}

/// Runs `case` under the emulator and checks it against the CPU path.
fn check(case: &Case) -> Run {
    let (hq, hkv, d, elem) = (case.q_heads, case.kv_heads, case.head_dim, case.elem);
    let group = hq / hkv;
    let n_seq = case.seqs.len();
    let mut rng = Rng::new(case.seed);
    let q: Vec<f32> = (0..n_seq * hq * d)
        .map(|_| round(elem, rng.normal()))
        .collect();
    let buffers: Vec<Vec<Buffer>> = case
        .seqs
        .iter()
        .map(|s| s.iter().map(|p| buffer(p, case, &mut rng)).collect())
        .collect();

    let mut dev = Device::new();
    let qp = upload(&mut dev, elem, &q);
    let slices: Vec<Vec<DecodeSlice>> = buffers
        .iter()
        .map(|bufs| {
            bufs.iter()
                .flat_map(|b| {
                    let (kp, vp) = (upload(&mut dev, elem, &b.k), upload(&mut dev, elem, &b.v));
                    b.parts
                        .iter()
                        .map(|&(r0, rows)| DecodeSlice {
                            k: kp.0 + (r0 * d * 2) as u64,
                            v: vp.0 + (r0 * d * 2) as u64,
                            k_head_stride: b.head_stride as u64,
                            v_head_stride: b.head_stride as u64,
                            rows,
                        })
                        .collect::<Vec<_>>()
                })
                .collect()
        })
        .collect();
    let mut problem = DecodeProblem::new(hq, hkv, d, elem);
    problem.split_keys = case.split_keys;
    let launch = DecodeLaunch::new(&problem, &slices).expect("valid launch");
    let u64_bytes = |x: &[u64]| x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let ptrs = DecodePointers {
        q: qp.0,
        o: dev.alloc_bytes(&vec![0xff; n_seq * hq * d * 2]).0,
        lse: dev.alloc_bytes(&vec![0xff; n_seq * hq * 4]).0,
        // NaN scratch: every partial must be written before it is read.
        o_part: dev.alloc_bytes(&vec![0xff; launch.o_part_len() * 4]).0,
        lse_part: dev.alloc_bytes(&vec![0xff; launch.lse_part_len() * 4]).0,
        work: dev.alloc_u32(&launch.work).0,
        slices: dev.alloc_bytes(&u64_bytes(&launch.slices)).0,
        seq_work: dev.alloc_u32(&launch.seq_work).0,
    };
    let go = |dev: &mut Device, k: &ksa::cuda::decode::Kernel, args| {
        let kernel = module().kernel(&k.name).unwrap();
        dev.launch(kernel, k.grid, k.block, 0, &params(args))
            .unwrap_or_else(|e| panic!("{}: {e}", k.name))
    };
    let split = go(&mut dev, &launch.split, launch.split_args(&ptrs));
    let combine = go(&mut dev, &launch.combine, launch.combine_args(&ptrs));
    let out: Vec<f32> = match elem {
        Elem::Bf16 => dev
            .read_bf16(DevPtr(ptrs.o), n_seq * hq * d)
            .unwrap()
            .into_iter()
            .map(f32::from)
            .collect(),
        Elem::F16 => dev
            .read_f16(DevPtr(ptrs.o), n_seq * hq * d)
            .unwrap()
            .into_iter()
            .map(f32::from)
            .collect(),
    };
    let lse = dev.read_f32(DevPtr(ptrs.lse), n_seq * hq).unwrap();

    // The CPU decode path on the same rounded values, and the LSE in f64.
    let scale = 1.0 / (d as f32).sqrt();
    let (mut worst, mut worst_ratio, mut worst_lse) = (0f32, 0f32, 0f64);
    let half_ulp = match elem {
        Elem::Bf16 => 2f32.powi(-8),
        Elem::F16 => 2f32.powi(-11),
    };
    for (s, bufs) in buffers.iter().enumerate() {
        for g in 0..hkv {
            let rows: Vec<(Vec<f32>, Vec<f32>)> = bufs
                .iter()
                .flat_map(|b| {
                    b.parts.iter().map(move |&(r0, n)| {
                        let at = g * b.head_stride + r0 * d;
                        (b.k[at..at + n * d].to_vec(), b.v[at..at + n * d].to_vec())
                    })
                })
                .collect();
            let kv: Vec<KvSlice> = rows.iter().map(|(k, v)| KvSlice { k, v }).collect();
            let q0 = (s * hq + g * group) * d;
            let qg = &q[q0..q0 + group * d];
            let mut want = vec![0f32; group * d];
            attend(qg, d, &kv, scale, &mut want, &mut Vec::new());
            for (i, (&w, &got)) in want.iter().zip(&out[q0..q0 + group * d]).enumerate() {
                let err = (got - w).abs();
                // Correct rounding of the exact result is within half an ulp;
                // the rest covers f32 summation-order differences.
                let tol = half_ulp * w.abs() + 2e-4;
                assert!(
                    err <= tol,
                    "{case:?}\nseq {s} kv head {g}: out[{i}] = {got}, want {w} (|err| {err:.3e} > {tol:.3e})"
                );
                worst = worst.max(err);
                worst_ratio = worst_ratio.max(err / tol);
            }
            for j in 0..group {
                let qr = &qg[j * d..(j + 1) * d];
                let scores: Vec<f64> = kv
                    .iter()
                    .flat_map(|sl| sl.k.chunks_exact(d))
                    .map(|kr| {
                        scale as f64
                            * qr.iter()
                                .zip(kr)
                                .map(|(&a, &b)| a as f64 * b as f64)
                                .sum::<f64>()
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let want = m + scores.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                let got = lse[s * hq + g * group + j] as f64;
                let err = (got - want).abs();
                assert!(
                    err <= LSE_TOL,
                    "seq {s} head {}: lse {got}, want {want}",
                    g * group + j
                );
                worst_lse = worst_lse.max(err);
            }
        }
    }
    eprintln!(
        "ok {:?} d={d} hq={hq} hkv={hkv} keys {:?}: {} work items ({} keys/split), max |err| out {worst:.2e} ({:.0}% of its tolerance), lse {worst_lse:.2e}; global read {} B, {:.2}s + {:.2}s",
        elem,
        launch.keys,
        launch.work_items(),
        launch.split_keys,
        worst_ratio * 100.0,
        split.global_bytes_read + combine.global_bytes_read,
        split.wall.as_secs_f64(),
        combine.wall.as_secs_f64(),
    );
    Run {
        out,
        lse,
        split,
        combine,
        launch,
    }
}

/// Absolute LSE tolerance: f32 scores and sums over a few thousand keys with
/// `ex2/lg2.approx` (|LSE| < 20 here, so 1e-4 is ~1e3 f32 ulps).
const LSE_TOL: f64 = 1e-4;

#[test]
fn ragged_batch_gqa4_bf16_d64() {
    // Lengths 1, 44 and 700; the long one splits into 6 CTAs per KV head; a
    // wrapped ring and empty slices.
    let run = check(
        &Case::new(4, 1, 64, Elem::Bf16)
            .seq(vec![Piece::Empty, Piece::Plain(1)])
            .ksa_seq(3, 33, 8, true)
            .ksa_seq(180, 512, 8, true)
            .split(128),
    );
    assert_eq!(run.launch.seq_work, vec![0, 1, 2, 8]);
    assert!(run.out.iter().chain(&run.lse).all(|x| x.is_finite()));
}

#[test]
fn gqa1_f16_d128() {
    check(
        &Case::new(2, 2, 128, Elem::F16)
            .ksa_seq(40, 64, 3, true)
            .ksa_seq(0, 0, 1, false)
            .split(64),
    );
}

#[test]
fn gqa8_2_bf16_d128() {
    // Group 4 on each of 2 KV heads.
    check(
        &Case::new(8, 2, 128, Elem::Bf16)
            .ksa_seq(17, 96, 6, true)
            .ksa_seq(2, 10, 2, false),
    );
}

#[test]
fn group8_f16_d64_and_group16_chunks() {
    check(
        &Case::new(8, 1, 64, Elem::F16)
            .ksa_seq(30, 40, 5, true)
            .seq(vec![Piece::Plain(1)])
            .split(32),
    );
    // A group of 16: two head chunks of 8 per KV head; group 3 runs masked
    // on the 4-head kernel.
    check(&Case::new(16, 1, 128, Elem::Bf16).ksa_seq(9, 20, 4, true));
    check(&Case::new(6, 2, 64, Elem::F16).ksa_seq(9, 20, 4, false));
}

#[test]
fn long_sequence_auto_split() {
    // 2,031 keys on 2 KV heads: the automatic split spreads them over several
    // CTAs per head (MIN_SPLIT_KEYS each); the short one stays one item.
    let run = check(
        &Case::new(8, 2, 64, Elem::Bf16)
            .ksa_seq(1000, 1024, 7, true)
            .ksa_seq(1, 5, 2, false),
    );
    assert!(run.launch.seq_work[1] > 4, "{:?}", run.launch.seq_work);
    assert_eq!(run.launch.seq_work[2] - run.launch.seq_work[1], 1);
    // Each K/V byte is read once per KV head, plus q and the tables.
    let min = (run.launch.keys.iter().sum::<usize>() * 2 * 2 * 64 * 2 + 2 * 8 * 64 * 2) as u64;
    let read = run.split.global_bytes_read;
    assert!(read >= min && read < min + min / 20, "{read} vs {min}");
    assert!(run.combine.global_bytes_read < min / 10);
}

#[test]
fn random_batches() {
    let mut rng = Rng::new(13);
    for i in 0..3 {
        let (hkv, group) = ([1, 2][rng.below(2)], [1, 2, 4, 8][rng.below(4)]);
        let elem = [Elem::Bf16, Elem::F16][rng.below(2)];
        let mut case = Case::new(hkv * group, hkv, [64, 128][rng.below(2)], elem);
        case.seed = 100 + i;
        for _ in 0..1 + rng.below(3) {
            let window = rng.below(200);
            case = case.ksa_seq(rng.below(150), window, 1 + rng.below(8), window > 8);
        }
        check(&case.split([32, 100, 4096][rng.below(3)]));
    }
}

/// Emulator counters of one decode step with KSA-4B-base attention shapes
/// (32 query / 8 KV heads of 128, bf16, C = 8, S = 1, W = 128) for
/// docs/decode.md: KSA vs full attention at 16K context, batch 1, and a
/// ragged batch of four. Run with `--ignored --nocapture`.
#[test]
#[ignore]
fn counters_16k() {
    // KSA keys per KV head for the token after n cached ones (n % C == 0):
    // summaries of the chunks before the window, the window, the new token.
    let ksa = |case: Case, n: usize| {
        let (c, w) = (8, 128);
        let sums = (n / c).saturating_sub(w);
        let window = n.min(w * c);
        case.ksa_seq(sums, window, 1 + n % c, window > 8)
    };
    let full = |case: Case, n: usize| case.seq(vec![Piece::Plain(n + 1)]);
    let base = || Case::new(32, 8, 128, Elem::Bf16);
    let cases = [
        ("KSA 16K, batch 1", ksa(base(), 16384)),
        ("full 16K, batch 1", full(base(), 16384)),
        (
            "KSA 16K+4K+1K+100, batch 4",
            ksa(ksa(ksa(ksa(base(), 16384), 4096), 1024), 100),
        ),
        (
            "full 16K+4K+1K+100, batch 4",
            full(full(full(full(base(), 16384), 4096), 1024), 100),
        ),
    ];
    println!("| step | keys per KV head | work items | split CTAs | global bytes read (split + combine) | minimum | read/min | bytes written | bank conflicts | emulator s |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, case) in cases {
        let run = check(&case);
        let keys: usize = run.launch.keys.iter().sum();
        // Every K and V byte once per KV head, plus q.
        let min = (keys * 8 * 128 * 2 * 2 + run.launch.keys.len() * 32 * 128 * 2) as u64;
        let read = run.split.global_bytes_read + run.combine.global_bytes_read;
        println!(
            "| {name} | {:?} | {} | {} | {} + {} | {min} | {:.3} | {} | {} | {:.1} |",
            run.launch.keys,
            run.launch.work_items(),
            run.split.ctas,
            run.split.global_bytes_read,
            run.combine.global_bytes_read,
            read as f64 / min as f64,
            run.split.global_bytes_written + run.combine.global_bytes_written,
            run.split.bank_conflicts + run.combine.bank_conflicts,
            (run.split.wall + run.combine.wall).as_secs_f64(),
        );
        // Compute side: split-kernel instructions per (key, KV head), and how
        // many of them are shuffles, f32 math and conversions.
        let rows = (keys * 8) as f64;
        let r = &run.split;
        eprintln!(
            "{name}: {:.0} thread instructions per key and KV head: {:.0} shfl, {:.0} f32, {:.0} cvt/mov, {:.0} int",
            r.thread_instructions as f64 / rows,
            r.class(Class::Warp) as f64 / rows,
            r.class(Class::Float) as f64 / rows,
            (r.class(Class::Convert) + r.class(Class::Move)) as f64 / rows,
            r.class(Class::Int) as f64 / rows,
        );
    }
}

/// `ptxas -v` on the decode PTX for sm_80 and sm_90: prints registers per
/// kernel and fails on any spill.
#[test]
fn decode_kernels_do_not_spill() {
    let ptxas = std::path::PathBuf::from(ksa::cuda::ptx::NVCC).with_file_name("ptxas");
    let ptx = std::env::temp_dir().join(format!("ksa-decode-{}.ptx", std::process::id()));
    std::fs::write(&ptx, ksa::cuda::ptx::DECODE).unwrap();
    for arch in ["sm_80", "sm_90"] {
        let out = std::process::Command::new(&ptxas)
            .args(["-v", &format!("-arch={arch}"), "-o", "/dev/null"])
            .arg(&ptx)
            .output()
            .expect("run ptxas");
        assert!(out.status.success(), "ptxas failed: {out:?}");
        let text = String::from_utf8_lossy(&out.stderr);
        let mut kernel = "";
        let mut seen = 0;
        for line in text.lines() {
            if let Some(i) = line.find("Compiling entry function '") {
                kernel = line[i + 26..].split('\'').next().unwrap_or("");
            }
            if line.contains("spill stores") {
                assert!(
                    line.contains(" 0 bytes spill stores, 0 bytes spill loads"),
                    "{kernel} spills on {arch}: {line}"
                );
            }
            if let Some(i) = line.find("Used ") {
                println!("{arch} {kernel}: {}", &line[i..]);
                seen += 1;
            }
        }
        assert_eq!(seen, 18, "16 split + 2 combine kernels in:\n{text}");
    }
    let _ = std::fs::remove_file(&ptx);
}

/// `ksa::cuda::decode::decode_attention` (feature `cuda`): typed errors, and
/// on a real GPU the same comparison with the CPU path (prints `SKIP` and
/// passes without one).
#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use candle_core::{DType, Device as Dev, Tensor};
    use ksa::cuda::decode::decode_attention;
    use ksa::Error;
    use ksa::KvRows;

    #[test]
    fn typed_errors_without_a_gpu() {
        let cpu = Dev::Cpu;
        let q = Tensor::zeros((2, 4, 64), DType::F32, &cpu).unwrap();
        assert!(matches!(
            decode_attention(&q, &[], &ksa::AttentionOptions::default()),
            Err(Error::UnsupportedDType { .. })
        ));
        let q = q.to_dtype(DType::BF16).unwrap();
        assert!(matches!(
            decode_attention(&q, &[], &ksa::AttentionOptions::default()),
            Err(Error::UnsupportedDevice { .. })
        ));
        let q4 = q.unsqueeze(0).unwrap();
        assert!(matches!(
            decode_attention(&q4, &[], &ksa::AttentionOptions::default()),
            Err(Error::Rank { name: "q", .. })
        ));
    }

    #[test]
    fn equals_cpu_on_gpu() {
        let dev = match Dev::new_cuda(0) {
            Ok(d) => d,
            Err(e) => {
                println!("SKIP: no CUDA device ({e})");
                return;
            }
        };
        // 3 sequences, 8 query / 2 KV heads of 128, bf16; sequence 1's window
        // is a ring wrapping in a 40-row buffer.
        let (hq, hkv, d) = (8, 2, 128);
        let mut rng = Rng::new(5);
        let mut t = |shape: &[usize]| {
            let n = shape.iter().product::<usize>();
            let x: Vec<f32> = (0..n).map(|_| round(Elem::Bf16, rng.normal())).collect();
            Tensor::from_vec(x, shape, &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        let q = t(&[3, hq, d]);
        let (k0, v0) = (t(&[hkv, 300, d]), t(&[hkv, 300, d]));
        let (k1, v1) = (t(&[hkv, 40, d]), t(&[hkv, 40, d]));
        let rows = |k, v, r| KvRows { k, v, rows: r };
        let seqs = vec![
            vec![rows(&k0, &v0, 0..300)],
            vec![
                rows(&k1, &v1, 25..40),
                rows(&k1, &v1, 0..10),
                rows(&k0, &v0, 3..3),
            ],
            vec![rows(&k0, &v0, 7..8)],
        ];
        let (o, lse) = decode_attention(&q, &seqs, &ksa::AttentionOptions::default()).unwrap();
        assert_eq!(lse.dims(), &[3, hq]);
        let host = |x: &Tensor| -> Vec<f32> {
            x.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (o, qh) = (host(&o), host(&q));
        let group = hq / hkv;
        for (s, rs) in seqs.iter().enumerate() {
            for g in 0..hkv {
                let kv: Vec<(Vec<f32>, Vec<f32>)> = rs
                    .iter()
                    .map(|r| {
                        let pick = |x: &Tensor| {
                            host(
                                &x.get(g)
                                    .unwrap()
                                    .narrow(0, r.rows.start, r.rows.len())
                                    .unwrap(),
                            )
                        };
                        (pick(r.k), pick(r.v))
                    })
                    .collect();
                let slices: Vec<KvSlice> = kv.iter().map(|(k, v)| KvSlice { k, v }).collect();
                let at = (s * hq + g * group) * d;
                let mut want = vec![0f32; group * d];
                let scale = 1.0 / (d as f32).sqrt();
                attend(
                    &qh[at..at + group * d],
                    d,
                    &slices,
                    scale,
                    &mut want,
                    &mut Vec::new(),
                );
                for (w, got) in want.iter().zip(&o[at..at + group * d]) {
                    assert!(
                        (w - got).abs() <= 2f32.powi(-8) * w.abs() + 2e-3,
                        "{got} vs {w}"
                    );
                }
            }
        }
    }
}
