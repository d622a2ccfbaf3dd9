//! Small CUDA kernels from `tests/kernels/*.cu`, compiled by nvcc at test time, run under
//! the emulator and compared with CPU computations. Skipped (with a message) without nvcc.

#![allow(clippy::needless_range_loop)]

mod common;

use common::{compile, compile_with, Rng};
use half::{bf16, f16};
use ptx_emu::{Device, Fault, LaunchOptions, Module, Param};

#[test]
fn vector_add() {
    let Some(ptx) = compile("vector_add") else {
        return;
    };
    let m = Module::parse(&ptx).unwrap();
    assert_eq!(m.version(), Some("9.0"));
    let k = m.kernel("vector_add").unwrap();
    let n = 1000;
    let mut r = Rng(1);
    let a: Vec<f32> = (0..n).map(|_| r.f32()).collect();
    let b: Vec<f32> = (0..n).map(|_| r.f32()).collect();
    let mut dev = Device::new();
    let (pa, pb, pc) = (dev.alloc_f32(&a), dev.alloc_f32(&b), dev.alloc(n * 4));
    let rep = dev
        .launch(
            k,
            (8, 1, 1),
            (128, 1, 1),
            0,
            &[
                Param::Ptr(pa),
                Param::Ptr(pb),
                Param::Ptr(pc),
                Param::I32(n as i32),
            ],
        )
        .unwrap();
    let c = dev.read_f32(pc, n).unwrap();
    for i in 0..n {
        assert_eq!(c[i], a[i] + b[i]);
    }
    assert_eq!(rep.global_bytes_written, n as u64 * 4);
    assert_eq!(rep.global_bytes_read, 2 * n as u64 * 4);
    assert_eq!(rep.ctas, 8);

    // One element too many: the sanitizer names the out-of-bounds global access.
    let e = dev
        .launch(
            k,
            (8, 1, 1),
            (128, 1, 1),
            0,
            &[
                Param::Ptr(pa),
                Param::Ptr(pb),
                Param::Ptr(pc),
                Param::I32(n as i32 + 1),
            ],
        )
        .unwrap_err();
    assert_eq!(e.fault(), Some(Fault::GlobalOutOfBounds), "{e}");
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains("vector_add")
            && msg.contains("ld.global")
            && msg.contains("tid (104, 0, 0)")
            && msg.contains("ctaid (7, 0, 0)"),
        "{msg}"
    );
}

#[test]
fn warp_shuffle_reduction() {
    let Some(ptx) = compile("warp_reduce") else {
        return;
    };
    let m = Module::parse(&ptx).unwrap();
    let k = m.kernel("warp_reduce").unwrap();
    let n = 256;
    let mut r = Rng(7);
    let x: Vec<f32> = (0..n).map(|_| (r.next_u32() % 1000) as f32 / 8.0).collect();
    let mut dev = Device::new();
    let px = dev.alloc_f32(&x);
    let (ps, pm) = (dev.alloc(n / 32 * 4), dev.alloc(n / 32 * 4));
    dev.launch(
        k,
        (2, 1, 1),
        (128, 1, 1),
        0,
        &[Param::Ptr(px), Param::Ptr(ps), Param::Ptr(pm)],
    )
    .unwrap();
    let sums = dev.read_f32(ps, n / 32).unwrap();
    let maxs = dev.read_f32(pm, n / 32).unwrap();
    for w in 0..n / 32 {
        let s: f32 = x[w * 32..w * 32 + 32].iter().sum(); // exact: multiples of 1/8 below 2^17
        let mx = x[w * 32..w * 32 + 32]
            .iter()
            .cloned()
            .fold(f32::MIN, f32::max);
        assert_eq!(sums[w], s, "warp {w}");
        assert_eq!(maxs[w], mx, "warp {w}");
    }
}

fn mma_case(bf: bool) {
    let Some(ptx) = compile("mma_ldmatrix") else {
        return;
    };
    let m = Module::parse(&ptx).unwrap();
    let k = m.kernel(if bf { "mma_bf16" } else { "mma_f16" }).unwrap();
    let mut r = Rng(if bf { 3 } else { 5 });
    let round = |x: f32| -> (u16, f32) {
        if bf {
            let h = bf16::from_f32(x);
            (h.to_bits(), h.to_f32())
        } else {
            let h = f16::from_f32(x);
            (h.to_bits(), h.to_f32())
        }
    };
    let a: Vec<(u16, f32)> = (0..256).map(|_| round(r.f32() * 2.0)).collect();
    let b: Vec<(u16, f32)> = (0..128).map(|_| round(r.f32() * 2.0)).collect(); // B[k][n], 16x8
    let bt: Vec<u16> = (0..128).map(|i| b[(i % 16) * 8 + i / 16].0).collect(); // Bt[n][k]
    let bk: Vec<u16> = b.iter().map(|x| x.0).collect();
    let mut dev = Device::new();
    let pa = dev.alloc_bytes(&a.iter().flat_map(|x| x.0.to_le_bytes()).collect::<Vec<_>>());
    let pbt = dev.alloc_bytes(&bt.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>());
    let pbk = dev.alloc_bytes(&bk.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>());
    let (pd, pd2) = (dev.alloc(128 * 4), dev.alloc(128 * 4));
    let rep = dev
        .launch(
            k,
            (1, 1, 1),
            (32, 1, 1),
            0,
            &[
                Param::Ptr(pa),
                Param::Ptr(pbt),
                Param::Ptr(pbk),
                Param::Ptr(pd),
                Param::Ptr(pd2),
            ],
        )
        .unwrap();
    assert_eq!(rep.mma, 2);
    assert_eq!(rep.ldmatrix, 3);
    let d = dev.read_f32(pd, 128).unwrap();
    let d2 = dev.read_f32(pd2, 128).unwrap();
    for i in 0..16 {
        for j in 0..8 {
            let want: f64 = (0..16)
                .map(|kk| a[i * 16 + kk].1 as f64 * b[kk * 8 + j].1 as f64)
                .sum();
            assert!(
                (d[i * 8 + j] as f64 - want).abs() < 1e-5,
                "({i},{j}): {} vs {want}",
                d[i * 8 + j]
            );
            assert_eq!(
                d[i * 8 + j],
                d2[i * 8 + j],
                "ldmatrix.trans path differs at ({i},{j})"
            );
        }
    }
}

#[test]
fn mma_fed_by_ldmatrix_bf16() {
    mma_case(true);
}

#[test]
fn mma_fed_by_ldmatrix_f16() {
    mma_case(false);
}

#[test]
fn cp_async_double_buffered_copy() {
    let Some(ptx) = compile("cp_async") else {
        return;
    };
    let m = Module::parse(&ptx).unwrap();
    let k = m.kernel("cp_async_copy").unwrap();
    let (blocks, tiles, valid_last) = (3usize, 5usize, 100usize);
    let n = blocks * tiles * 128 * 4;
    let src: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
    let mut dev = Device::new();
    let ps = dev.alloc_f32(&src);
    let pd = dev.alloc(n * 4);
    let rep = dev
        .launch(
            k,
            (blocks as u32, 1, 1),
            (128, 1, 1),
            0,
            &[
                Param::Ptr(ps),
                Param::Ptr(pd),
                Param::I32(tiles as i32),
                Param::I32(valid_last as i32),
            ],
        )
        .unwrap();
    let out = dev.read_f32(pd, n).unwrap();
    for blk in 0..blocks {
        for t in 0..tiles {
            for e in 0..128 {
                for c in 0..4 {
                    let i = ((blk * tiles + t) * 128 + e) * 4 + c;
                    // The last tile's float4s from valid_last on were zero-filled (src-size 0).
                    let x = if t == tiles - 1 && e >= valid_last {
                        0.0
                    } else {
                        src[i]
                    };
                    assert_eq!(out[i], x * 2.0 + 1.0, "block {blk} tile {t} elem {e}");
                }
            }
        }
    }
    assert!(rep.barriers >= (blocks * tiles * 2) as u64);
}

#[test]
fn cp_async_early_read_is_reported() {
    let Some(ptx) = compile("cp_async") else {
        return;
    };
    let m = Module::parse(&ptx).unwrap();
    let k = m.kernel("cp_async_early_read").unwrap();
    let mut dev = Device::new();
    let ps = dev.alloc_f32(&[1.0; 32]);
    let pd = dev.alloc(32 * 4);
    let e = dev
        .launch(
            k,
            (1, 1, 1),
            (32, 1, 1),
            0,
            &[Param::Ptr(ps), Param::Ptr(pd)],
        )
        .unwrap_err();
    assert_eq!(e.fault(), Some(Fault::AsyncCopyPending), "{e}");
    assert!(e.to_string().contains("ld.shared"), "{e}");
    // With the sanitizer off the read returns stale data instead of failing.
    let opts = LaunchOptions {
        sanitize: false,
        ..Default::default()
    };
    dev.launch_with(
        k,
        (1, 1, 1),
        (32, 1, 1),
        0,
        &[Param::Ptr(ps), Param::Ptr(pd)],
        &opts,
    )
    .unwrap();
    assert_eq!(dev.read_f32(pd, 32).unwrap(), vec![1.0; 32]);
}

#[test]
fn shared_memory_transpose_and_missing_barrier() {
    let Some(ptx) = compile("transpose") else {
        return;
    };
    let m = Module::parse(&ptx).unwrap();
    let n = 64usize;
    let x: Vec<f32> = (0..n * n).map(|i| i as f32).collect();
    let mut dev = Device::new();
    let pi = dev.alloc_f32(&x);
    let po = dev.alloc(n * n * 4);
    let params = [Param::Ptr(pi), Param::Ptr(po), Param::I32(n as i32)];
    let rep = dev
        .launch(
            m.kernel("transpose").unwrap(),
            (2, 2, 1),
            (32, 8, 1),
            0,
            &params,
        )
        .unwrap();
    let out = dev.read_f32(po, n * n).unwrap();
    for i in 0..n {
        for j in 0..n {
            assert_eq!(out[j * n + i], x[i * n + j]);
        }
    }
    // The padded tile (33 floats per row) is conflict-free.
    assert_eq!(rep.bank_conflicts, 0, "{rep}");
    let e = dev
        .launch(
            m.kernel("transpose_racy").unwrap(),
            (2, 2, 1),
            (32, 8, 1),
            0,
            &params,
        )
        .unwrap_err();
    assert_eq!(e.fault(), Some(Fault::SharedRace), "{e}");
    assert!(e.to_string().contains("transpose_racy"), "{e}");
}

/// CPU reference attention in f64 from the bf16-rounded inputs.
#[allow(clippy::too_many_arguments)]
fn attention_ref(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    heads: usize,
    n_q: usize,
    n_k: usize,
    d: usize,
    scale: f64,
) -> Vec<f32> {
    let mut o = vec![0f32; heads * n_q * d];
    for h in 0..heads {
        for i in 0..n_q {
            let qi = &q[(h * n_q + i) * d..][..d];
            let s: Vec<f64> = (0..n_k)
                .map(|j| {
                    let kj = &k[(h * n_k + j) * d..][..d];
                    qi.iter()
                        .zip(kj)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let mx = s.iter().cloned().fold(f64::MIN, f64::max);
            let p: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
            let l: f64 = p.iter().sum();
            for c in 0..d {
                let acc: f64 = (0..n_k)
                    .map(|j| p[j] * v[(h * n_k + j) * d + c] as f64)
                    .sum();
                o[(h * n_q + i) * d + c] = (acc / l) as f32;
            }
        }
    }
    o
}

#[test]
fn flash_attention_forward() {
    let Some(ptx) = compile("flash_attn") else {
        return;
    };
    let m = Module::parse(&ptx).unwrap();
    let kern = m.kernel("flash_attn_fwd").unwrap();
    // 2 heads, 100 queries (a partial query tile), 2000 keys (a partial key tile, zero-filled
    // by cp.async and masked), head_dim 64.
    let (heads, n_q, n_k, d) = (2usize, 100usize, 2000usize, 64usize);
    let mut r = Rng(11);
    let mut gen = |n: usize, s: f32| -> (Vec<bf16>, Vec<f32>) {
        let v: Vec<bf16> = (0..n).map(|_| bf16::from_f32(r.f32() * s)).collect();
        let f = v.iter().map(|x| x.to_f32()).collect();
        (v, f)
    };
    let (qb, qf) = gen(heads * n_q * d, 1.0);
    let (kb, kf) = gen(heads * n_k * d, 1.0);
    let (vb, vf) = gen(heads * n_k * d, 1.0);
    let scale = 1.0 / (d as f64).sqrt();
    let mut dev = Device::new();
    let (pq, pk, pv) = (
        dev.alloc_bf16(&qb),
        dev.alloc_bf16(&kb),
        dev.alloc_bf16(&vb),
    );
    let po = dev.alloc(heads * n_q * d * 4);
    let params = [
        Param::Ptr(pq),
        Param::Ptr(pk),
        Param::Ptr(pv),
        Param::Ptr(po),
        Param::I32(n_q as i32),
        Param::I32(n_k as i32),
        Param::F32((scale * std::f64::consts::LOG2_E) as f32),
    ];
    let grid = (n_q.div_ceil(64) as u32, heads as u32, 1);
    let rep = dev.launch(kern, grid, (128, 1, 1), 0, &params).unwrap();
    eprintln!("flash_attn_fwd: {rep}");
    let out = dev.read_f32(po, heads * n_q * d).unwrap();
    let want = attention_ref(&qf, &kf, &vf, heads, n_q, n_k, d, scale);
    let mut max_err = 0f32;
    for (a, b) in out.iter().zip(&want) {
        max_err = max_err.max((a - b).abs());
    }
    // P is rounded to bf16 before the P.V product (as on the GPU): ~2^-9 relative per term.
    assert!(max_err < 2e-3, "max abs error {max_err}");
    let tiles = n_k.div_ceil(64) as u64;
    assert_eq!(rep.mma, grid.0 as u64 * grid.1 as u64 * 4 * tiles * 64);
    assert_eq!(
        rep.bank_conflicts, 0,
        "padded rows keep ldmatrix conflict-free: {rep}"
    );
}

#[test]
fn misc_cuda_operations() {
    let Some(ptx) = compile("misc_ops") else {
        return;
    };
    let m = Module::parse(&ptx).unwrap();
    let k = m.kernel("misc_ops").unwrap();
    const NOUT: usize = 24;
    let n = 256usize;
    let mut r = Rng(5);
    let xs: Vec<f32> = (0..n).map(|_| r.f32() * 3.0).collect();
    let ys: Vec<f32> = (0..n).map(|_| 0.5 + (r.f32() + 1.0) * 0.75).collect();
    let mut dev = Device::new();
    let (px, py) = (dev.alloc_f32(&xs), dev.alloc_f32(&ys));
    let po = dev.alloc(n * NOUT * 4);
    let pc = dev.alloc_u32(&[0, 0]);
    let pf = dev.alloc_f32(&[0.0]);
    dev.launch(
        k,
        (2, 1, 1),
        (128, 1, 1),
        0,
        &[
            Param::Ptr(px),
            Param::Ptr(py),
            Param::Ptr(po),
            Param::Ptr(pc),
            Param::Ptr(pf),
            Param::I32(n as i32),
        ],
    )
    .unwrap();
    let o = dev.read_f32(po, n * NOUT).unwrap();
    let close = |got: f32, want: f64, rel: f64, what: &str, i: usize| {
        assert!(
            (got as f64 - want).abs() <= rel * want.abs().max(1e-3),
            "{what} [{i}]: {got} vs {want}"
        );
    };
    for i in 0..n {
        let (x, y) = (xs[i], ys[i]);
        let g = &o[i * NOUT..][..NOUT];
        let lane = i % 32;
        close(g[0], (x as f64).exp(), 1e-6, "expf", i);
        assert_eq!(g[1], x / y, "div.rn [{i}]");
        assert_eq!(g[2], x.abs().sqrt(), "sqrt.rn [{i}]");
        close(
            g[3],
            1.0 / ((x.abs() + 1.0) as f64).sqrt(),
            1e-6,
            "rsqrtf",
            i,
        );
        assert_eq!(g[4], bf16::from_f32(x).to_f32(), "bf16 round trip [{i}]");
        assert_eq!(g[5], f16::from_f32(x).to_f32(), "f16 round trip [{i}]");
        let (x16, y16) = (f16::from_f32(x).to_f64(), f16::from_f32(y).to_f64());
        let hf = f16::from_f64(x16 * y16 + 1.0).to_f32();
        assert_eq!((g[6], g[7]), (hf, hf), "hfma2 [{i}]");
        let (xb, yb) = (bf16::from_f32(x).to_f32(), bf16::from_f32(y).to_f32());
        assert_eq!(
            (g[8], g[9]),
            (
                bf16::from_f32(xb * yb).to_f32(),
                bf16::from_f32(yb * 2.0).to_f32()
            ),
            "hmul2 bf16 [{i}]"
        );
        let kk = i as i32 * 31 - 200;
        assert_eq!(g[10], (kk / (i as i32 % 5 + 1)) as f32, "div.s32 [{i}]");
        assert_eq!(g[11], (kk % 7) as f32, "rem [{i}]");
        let j = (i * 3 + (y > 0.0) as usize) & 7;
        close(
            g[12],
            x as f64 * j as f64 + y as f64,
            1e-6,
            "local array",
            i,
        );
        close(g[13], (x as f64).tanh(), 2e-6, "tanhf", i);
        close(g[14], (x as f64).exp(), 2e-6, "__expf", i);
        close(g[15], ((x.abs() + 0.5) as f64).ln(), 1e-6, "logf", i);
        assert_eq!(
            g[16],
            (x * 3.0).round_ties_even() + (y * 3.0).trunc() * 100.0,
            "rounding [{i}]"
        );
        let u = (i as u32).wrapping_mul(2654435761);
        assert_eq!(
            g[17],
            (u.count_ones() + 100 * (u | 1).leading_zeros()) as f32,
            "popc/clz [{i}]"
        );
        assert_eq!(
            g[18],
            f32::from_bits((u.reverse_bits() & 0x7f_ffff) | 0x3f80_0000),
            "brev [{i}]"
        );
        let perm = (u & 0xFFFF) | ((!u & 0xFFFF) << 16);
        assert_eq!(
            g[19],
            f32::from_bits((perm & 0x7f_ffff) | 0x3f80_0000),
            "byte_perm [{i}]"
        );
        assert_eq!(g[20], xs[i - lane + (lane + 5) % 32], "shfl idx [{i}]");
        let warp = i - lane;
        let pos = xs[warp..warp + 32].iter().filter(|v| **v > 0.0).count() as f32;
        let any = ys[warp..warp + 32].iter().any(|v| *v > 0.9);
        assert_eq!(
            g[21],
            pos + if any { 1000.0 } else { 0.0 },
            "ballot/any [{i}]"
        );
        assert_eq!(g[22], x + y.max(x), "fminf NaN / fmaxf [{i}]");
        assert_eq!(
            g[23],
            [0.5, 1.5, 2.5, 3.5][i & 3],
            "__constant__ table [{i}]"
        );
    }
    assert_eq!(dev.read_u32(pc, 2).unwrap(), vec![n as u32, n as u32 - 1]);
    assert_eq!(dev.read_f32(pf, 1).unwrap(), vec![n as f32]);
}

#[test]
fn flash_attention_without_the_tail_barrier_is_reported() {
    // Without the __syncthreads() at the end of the key loop, a warp's cp.async for the
    // next-but-one tile overwrites a K/V buffer other warps may still be reading.
    let Some(ptx) = compile_with("flash_attn", &["-DFA_BUG_NO_TAIL_SYNC"]) else {
        return;
    };
    let m = Module::parse(&ptx).unwrap();
    let kern = m.kernel("flash_attn_fwd").unwrap();
    let (n_q, n_k, d) = (64usize, 256usize, 64usize);
    let mut dev = Device::new();
    let q = dev.alloc_bf16(&vec![bf16::from_f32(0.5); n_q * d]);
    let k = dev.alloc_bf16(&vec![bf16::from_f32(0.25); n_k * d]);
    let v = dev.alloc_bf16(&vec![bf16::from_f32(1.0); n_k * d]);
    let o = dev.alloc(n_q * d * 4);
    let params = [
        Param::Ptr(q),
        Param::Ptr(k),
        Param::Ptr(v),
        Param::Ptr(o),
        Param::I32(n_q as i32),
        Param::I32(n_k as i32),
        Param::F32(0.18),
    ];
    let e = dev
        .launch(kern, (1, 1, 1), (128, 1, 1), 0, &params)
        .unwrap_err();
    eprintln!("{e}");
    assert!(
        matches!(
            e.fault(),
            Some(Fault::SharedRace) | Some(Fault::AsyncCopyPending)
        ),
        "{e}"
    );
    // The unchecked run still produces the right numbers here (the emulator runs warps in
    // order): only the sanitizer sees the bug.
    let opts = LaunchOptions {
        sanitize: false,
        ..Default::default()
    };
    dev.launch_with(kern, (1, 1, 1), (128, 1, 1), 0, &params, &opts)
        .unwrap();
    assert!(dev
        .read_f32(o, n_q * d)
        .unwrap()
        .iter()
        .all(|x| (x - 1.0).abs() < 1e-6));
}
