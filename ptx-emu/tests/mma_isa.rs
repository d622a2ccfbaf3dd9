//! `mma.m16n8k16` and `ldmatrix` anchored outside this project:
//! - fragments built on the host from the PTX ISA's lane -> (row, col) tables
//!   ("Matrix Fragments for mma.m16n8k16 with floating point type"), checked against a
//!   CPU matmul, exactly (small integers make every f32 sum exact);
//! - `ldmatrix` register contents checked against the ISA's description of the
//!   instruction ("Warp-level matrix load instruction: ldmatrix"), with and without `.trans`;
//! - a worked example published with numpy (A = arange(256)*0.01, B = arange(128)*0.01
//!   in f16; https://blog.csdn.net/m0_61864577/article/details/141065245) reproduced to
//!   the printed digits through `ldmatrix` + `mma`.

#![allow(clippy::needless_range_loop)]

mod common;

use common::{kernel_src, Rng};
use half::{bf16, f16};
use ptx_emu::{Device, Module, Param};

/// groupID and threadID_in_group of a lane.
fn gt(lane: usize) -> (usize, usize) {
    (lane >> 2, lane % 4)
}
/// ISA: A element a_i (i in 0..8) of a lane.
fn a_pos(lane: usize, i: usize) -> (usize, usize) {
    let (g, t) = gt(lane);
    let row = if i < 2 || (4..6).contains(&i) {
        g
    } else {
        g + 8
    };
    let col = t * 2 + (i & 1) + if i >= 4 { 8 } else { 0 };
    (row, col)
}
/// ISA: B element b_i (i in 0..4) of a lane, as (k, n).
fn b_pos(lane: usize, i: usize) -> (usize, usize) {
    let (g, t) = gt(lane);
    (t * 2 + (i & 1) + if i >= 2 { 8 } else { 0 }, g)
}
/// ISA: C/D element c_i (i in 0..4) of a lane.
fn c_pos(lane: usize, i: usize) -> (usize, usize) {
    let (g, t) = gt(lane);
    (if i < 2 { g } else { g + 8 }, t * 2 + (i & 1))
}

fn to16(x: f32, bf: bool) -> u16 {
    if bf {
        bf16::from_f32(x).to_bits()
    } else {
        f16::from_f32(x).to_bits()
    }
}

fn mma_registers_only(bf: bool) {
    let ty = if bf { "bf16" } else { "f16" };
    let body = format!(
        "mul.wide.u32 %rd10, %r0, 48; add.s64 %rd11, %rd1, %rd10;
         ld.global.v4.u32 {{%r1, %r2, %r3, %r4}}, [%rd11];
         ld.global.v2.u32 {{%r5, %r6}}, [%rd11+16];
         ld.global.v4.f32 {{%f1, %f2, %f3, %f4}}, [%rd11+32];
         mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {{%f5, %f6, %f7, %f8}}, {{%r1, %r2, %r3, %r4}}, {{%r5, %r6}}, {{%f1, %f2, %f3, %f4}};
         mul.wide.u32 %rd12, %r0, 16; add.s64 %rd13, %rd2, %rd12;
         st.global.v4.f32 [%rd13], {{%f5, %f6, %f7, %f8}};"
    );
    let mut r = Rng(if bf { 21 } else { 22 });
    let mut small = || (r.next_u32() % 9) as f32 - 4.0;
    let a: Vec<Vec<f32>> = (0..16)
        .map(|_| (0..16).map(|_| small()).collect())
        .collect();
    let b: Vec<Vec<f32>> = (0..16).map(|_| (0..8).map(|_| small()).collect()).collect();
    let c: Vec<Vec<f32>> = (0..16)
        .map(|_| (0..8).map(|_| small() * 0.5).collect())
        .collect();
    let mut words = vec![0u32; 32 * 12]; // per lane: a (4 words), b (2), pad (2), c (4)
    for lane in 0..32 {
        let w = &mut words[lane * 12..][..12];
        for reg in 0..4 {
            let (lo, hi) = (a_pos(lane, 2 * reg), a_pos(lane, 2 * reg + 1));
            w[reg] = to16(a[lo.0][lo.1], bf) as u32 | (to16(a[hi.0][hi.1], bf) as u32) << 16;
        }
        for reg in 0..2 {
            let (lo, hi) = (b_pos(lane, 2 * reg), b_pos(lane, 2 * reg + 1));
            w[4 + reg] = to16(b[lo.0][lo.1], bf) as u32 | (to16(b[hi.0][hi.1], bf) as u32) << 16;
        }
        for i in 0..4 {
            let (row, col) = c_pos(lane, i);
            w[8 + i] = c[row][col].to_bits();
        }
    }
    let (o, rep) = common::run_words("", &body, 32, &words, 128).unwrap();
    assert_eq!(rep.mma, 1);
    for lane in 0..32 {
        for i in 0..4 {
            let (row, col) = c_pos(lane, i);
            let want = c[row][col] + (0..16).map(|k| a[row][k] * b[k][col]).sum::<f32>();
            assert_eq!(
                f32::from_bits(o[lane * 4 + i]),
                want,
                "{ty} D[{row}][{col}] (lane {lane}, d{i})"
            );
        }
    }
}

#[test]
fn mma_fragment_layouts_bf16() {
    mma_registers_only(true);
}

#[test]
fn mma_fragment_layouts_f16() {
    mma_registers_only(false);
}

/// Element (matrix, row, col) of the ldmatrix test data.
fn elem(m: usize, row: usize, col: usize) -> u16 {
    (m << 8 | row << 4 | col) as u16
}

#[test]
fn ldmatrix_layouts_per_the_isa() {
    for num in [1usize, 2, 4] {
        for trans in [false, true] {
            // Rows of matrix m live in reverse order at sm + (m*8 + 7 - row)*16, so the
            // per-lane row addresses matter. Lane l supplies row l%8 of matrix l/8.
            let regs: Vec<String> = (0..num).map(|i| format!("%r{}", 10 + i)).collect();
            let body = format!(
                "mov.u32 %r1, sm;
                 shl.b32 %r2, %r0, 4; add.s32 %r3, %r1, %r2;
                 mul.wide.u32 %rd10, %r0, 16; add.s64 %rd11, %rd1, %rd10;
                 ld.global.v4.u32 {{%r4, %r5, %r6, %r7}}, [%rd11];
                 st.shared.v4.u32 [%r3], {{%r4, %r5, %r6, %r7}};
                 bar.sync 0;
                 and.b32 %r8, %r0, 7; shr.u32 %r9, %r0, 3; shl.b32 %r9, %r9, 3; add.s32 %r9, %r9, 7; sub.s32 %r9, %r9, %r8;
                 shl.b32 %r9, %r9, 4; add.s32 %r9, %r1, %r9;
                 ldmatrix.sync.aligned.m8n8.x{num}{}.shared.b16 {{{}}}, [%r9];
                 mul.wide.u32 %rd12, %r0, 16; add.s64 %rd13, %rd2, %rd12;
                 {}",
                if trans { ".trans" } else { "" },
                regs.join(", "),
                regs.iter().enumerate().map(|(i, r)| format!("st.global.u32 [%rd13+{}], {r};", 4 * i)).collect::<Vec<_>>().join(" ")
            );
            let mut mem = vec![0u16; 4 * 64];
            for m in 0..4 {
                for row in 0..8 {
                    for col in 0..8 {
                        mem[(m * 8 + 7 - row) * 8 + col] = elem(m, row, col);
                    }
                }
            }
            let words: Vec<u32> = mem
                .chunks(2)
                .map(|p| p[0] as u32 | (p[1] as u32) << 16)
                .collect();
            let (o, rep) =
                common::run_words("\t.shared .align 16 .b8 sm[512];", &body, 32, &words, 128)
                    .unwrap();
            assert_eq!(rep.ldmatrix, 1);
            for lane in 0..32 {
                let (g, t) = gt(lane);
                for i in 0..num {
                    let (lo, hi) = if trans {
                        (elem(i, 2 * t, g), elem(i, 2 * t + 1, g))
                    } else {
                        (elem(i, g, 2 * t), elem(i, g, 2 * t + 1))
                    };
                    let got = o[lane * 4 + i];
                    assert_eq!(
                        got,
                        lo as u32 | (hi as u32) << 16,
                        "x{num} trans={trans} lane {lane} d{i}"
                    );
                }
            }
        }
    }
}

const LDMATRIX_MMA: &str = "
    mov.u32 %r1, sa; mov.u32 %r2, sb;
    mul.wide.u32 %rd10, %r0, 16; add.s64 %rd11, %rd1, %rd10;
    ld.global.v4.u32 {%r3, %r4, %r5, %r6}, [%rd11];
    shl.b32 %r7, %r0, 4; add.s32 %r8, %r1, %r7; st.shared.v4.u32 [%r8], {%r3, %r4, %r5, %r6};
    mul.wide.u32 %rd12, %r0, 8; add.s64 %rd13, %rd1, %rd12; ld.global.v2.u32 {%r3, %r4}, [%rd13+512];
    shl.b32 %r9, %r0, 3; add.s32 %r10, %r2, %r9; st.shared.v2.u32 [%r10], {%r3, %r4};
    bar.sync 0;
    and.b32 %r11, %r0, 15; shl.b32 %r12, %r11, 5; shr.u32 %r13, %r0, 4; shl.b32 %r14, %r13, 4;
    add.s32 %r15, %r12, %r14; add.s32 %r16, %r1, %r15;
    ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r20, %r21, %r22, %r23}, [%r16];
    shl.b32 %r17, %r11, 4; add.s32 %r18, %r2, %r17;
    ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%r24, %r25}, [%r18];
    mov.f32 %f1, 0f00000000;
    mma.sync.aligned.m16n8k16.row.col.f32.TY.TY.f32 {%f5, %f6, %f7, %f8}, {%r20, %r21, %r22, %r23}, {%r24, %r25}, {%f1, %f1, %f1, %f1};
    mul.wide.u32 %rd14, %r0, 16; add.s64 %rd15, %rd2, %rd14;
    st.global.v4.f32 [%rd15], {%f5, %f6, %f7, %f8};";

/// A (16x16 row-major) and B (16x8, k-major) as 16-bit bits -> D (16x8) through
/// ldmatrix.x4 (A), ldmatrix.x2.trans (B) and mma.
fn ldmatrix_mma(a: &[u16], b: &[u16], bf: bool) -> Vec<Vec<f32>> {
    let body = LDMATRIX_MMA.replace("TY", if bf { "bf16" } else { "f16" });
    let src = kernel_src(
        "\t.shared .align 16 .b8 sa[512];\n\t.shared .align 16 .b8 sb[256];",
        &body,
    );
    let m = Module::parse(&src).unwrap();
    let mut bytes: Vec<u8> = a.iter().flat_map(|x| x.to_le_bytes()).collect();
    bytes.extend(b.iter().flat_map(|x| x.to_le_bytes()));
    let mut dev = Device::new();
    let pin = dev.alloc_bytes(&bytes);
    let pout = dev.alloc(512);
    let rep = dev
        .launch(
            m.kernel("t").unwrap(),
            (1, 1, 1),
            (32, 1, 1),
            0,
            &[Param::Ptr(pin), Param::Ptr(pout)],
        )
        .unwrap();
    assert_eq!((rep.mma, rep.ldmatrix), (1, 2));
    let o = dev.read_f32(pout, 128).unwrap();
    let mut d = vec![vec![0f32; 8]; 16];
    for lane in 0..32 {
        for i in 0..4 {
            let (row, col) = c_pos(lane, i);
            d[row][col] = o[lane * 4 + i];
        }
    }
    d
}

#[test]
fn ldmatrix_mma_matches_cpu_matmul() {
    for bf in [false, true] {
        let mut r = Rng(99);
        let a: Vec<u16> = (0..256).map(|_| to16(r.f32() * 3.0, bf)).collect();
        let b: Vec<u16> = (0..128).map(|_| to16(r.f32() * 3.0, bf)).collect();
        let val = |x: u16| if bf { bf16::from_bits(x).to_f32() } else { f16::from_bits(x).to_f32() } as f64;
        let d = ldmatrix_mma(&a, &b, bf);
        for i in 0..16 {
            for j in 0..8 {
                let want: f64 = (0..16)
                    .map(|k| val(a[i * 16 + k]) * val(b[k * 8 + j]))
                    .sum();
                assert!(
                    (d[i][j] as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "bf16={bf} D[{i}][{j}] = {} vs {want}",
                    d[i][j]
                );
            }
        }
    }
}

#[test]
fn published_numpy_example_reproduced() {
    // input_a = (arange(16*16)*0.01).astype(f16).reshape(16,16); input_b likewise (16x8);
    // the post prints np.dot(input_a, input_b) (f16) with "%8.3f".
    let a: Vec<u16> = (0..256)
        .map(|i| f16::from_f32(i as f32 * 0.01).to_bits())
        .collect();
    let b: Vec<u16> = (0..128)
        .map(|i| f16::from_f32(i as f32 * 0.01).to_bits())
        .collect();
    let d = ldmatrix_mma(&a, &b, false);
    let published = [
        "0.992, 1.004, 1.016, 1.028, 1.040, 1.052, 1.063, 1.076",
        "2.527, 2.566, 2.604, 2.641, 2.678, 2.717, 2.754, 2.791",
        "4.062, 4.125, 4.191, 4.254, 4.316, 4.379, 4.441, 4.508",
        "5.602, 5.688, 5.777, 5.867, 5.953, 6.043, 6.133, 6.223",
        "7.137, 7.250, 7.363, 7.480, 7.594, 7.707, 7.820, 7.938",
    ];
    for (i, want) in published.iter().enumerate() {
        let got: Vec<String> = d[i]
            .iter()
            .map(|x| format!("{:.3}", f16::from_f32(*x).to_f32()))
            .collect();
        assert_eq!(got.join(", "), *want, "row {i}");
    }
}

/// The other supported shapes/accumulators with register-level fragments: m16n8k8 (A: 2
/// registers = a0..a3, B: 1 register = b0, b1) and f16 accumulators (C/D: 2 `.f16x2`
/// registers, (c0, c1) and (c2, c3)), built from the same ISA formulas.
fn mma_variant(bf: bool, k: usize, f16acc: bool) {
    let ty = if bf { "bf16" } else { "f16" };
    let acc = if f16acc { "f16" } else { "f32" };
    let (na, nb, nc) = (k / 4, k / 8, if f16acc { 2 } else { 4 });
    let regs = |p: &str, n: usize, base: usize| -> String {
        (0..n)
            .map(|i| format!("%{p}{}", base + i))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut body = String::from("mul.wide.u32 %rd10, %r0, 48; add.s64 %rd11, %rd1, %rd10;\n");
    for i in 0..na {
        body += &format!("ld.global.u32 %r{}, [%rd11+{}];\n", 10 + i, 4 * i);
    }
    for i in 0..nb {
        body += &format!("ld.global.u32 %r{}, [%rd11+{}];\n", 20 + i, 16 + 4 * i);
    }
    for i in 0..nc {
        body += &format!("ld.global.u32 %r{}, [%rd11+{}];\n", 30 + i, 32 + 4 * i);
    }
    body += &format!(
        "mma.sync.aligned.m16n8k{k}.row.col.{acc}.{ty}.{ty}.{acc} {{{}}}, {{{}}}, {{{}}}, {{{}}};\n",
        regs("r", nc, 40),
        regs("r", na, 10),
        regs("r", nb, 20),
        regs("r", nc, 30)
    );
    body += "mul.wide.u32 %rd12, %r0, 16; add.s64 %rd13, %rd2, %rd12;\n";
    for i in 0..nc {
        body += &format!("st.global.u32 [%rd13+{}], %r{};\n", 4 * i, 40 + i);
    }
    let mut r = Rng(k as u64 * 7 + bf as u64 + 2 * f16acc as u64);
    let mut small = || (r.next_u32() % 9) as f32 - 4.0;
    let a: Vec<Vec<f32>> = (0..16)
        .map(|_| (0..16).map(|_| small()).collect())
        .collect();
    let b: Vec<Vec<f32>> = (0..16).map(|_| (0..8).map(|_| small()).collect()).collect();
    let c: Vec<Vec<f32>> = (0..16)
        .map(|_| (0..8).map(|_| small() * 0.5).collect())
        .collect();
    let h = |x: f32| f16::from_f32(x).to_bits() as u32;
    let mut words = vec![0u32; 32 * 12];
    for lane in 0..32 {
        let w = &mut words[lane * 12..][..12];
        for reg in 0..na {
            let (lo, hi) = (a_pos(lane, 2 * reg), a_pos(lane, 2 * reg + 1));
            w[reg] = to16(a[lo.0][lo.1], bf) as u32 | (to16(a[hi.0][hi.1], bf) as u32) << 16;
        }
        for reg in 0..nb {
            let (lo, hi) = (b_pos(lane, 2 * reg), b_pos(lane, 2 * reg + 1));
            w[4 + reg] = to16(b[lo.0][lo.1], bf) as u32 | (to16(b[hi.0][hi.1], bf) as u32) << 16;
        }
        for i in 0..4 {
            let (row, col) = c_pos(lane, i);
            if f16acc {
                w[8 + i / 2] |= h(c[row][col]) << (16 * (i % 2));
            } else {
                w[8 + i] = c[row][col].to_bits();
            }
        }
    }
    let (o, _) =
        common::run_words("", &body, 32, &words, 128).unwrap_or_else(|e| panic!("{e}\n{body}"));
    for lane in 0..32 {
        for i in 0..4 {
            let (row, col) = c_pos(lane, i);
            let want = c[row][col] + (0..k).map(|kk| a[row][kk] * b[kk][col]).sum::<f32>();
            let got = if f16acc {
                f16::from_bits((o[lane * 4 + i / 2] >> (16 * (i % 2))) as u16).to_f32()
            } else {
                f32::from_bits(o[lane * 4 + i])
            };
            assert_eq!(
                got, want,
                "m16n8k{k} {ty} acc {acc}: D[{row}][{col}] (lane {lane}, d{i})"
            );
        }
    }
}

#[test]
fn mma_m16n8k8_and_f16_accumulators() {
    mma_variant(true, 8, false);
    mma_variant(false, 8, false);
    mma_variant(false, 16, true);
    mma_variant(false, 8, true);
}
