//! Tensor-core semantics: `mma.m16n8k16` and the `ldmatrix` fragment layout, as pure
//! functions of per-lane register values. Layouts follow the PTX ISA sections "Matrix
//! Fragments for mma.m16n8k16 with floating point type" and "Warp-level matrix load
//! instruction: ldmatrix" (checked in `tests/mma_isa.rs` against tables built from those
//! formulas and against a published numeric example).
//!
//! From the ISA (PTX ISA 8.x/9.0, "Matrix Fragments for mma.m16n8k16 with floating point
//! type"): `groupID = %laneid >> 2`, `threadID_in_group = %laneid % 4`; for A,
//! "row = groupID for ai where 0 <= i < 2 || 4 <= i < 6, groupID + 8 otherwise;
//! col = (threadID_in_group * 2) + (i & 0x1) for ai where i < 4, + 8 for i >= 4"; for B,
//! "row = (threadID_in_group * 2) + (i & 0x1) for bi where i < 2, + 8 for i >= 2;
//! col = groupID"; for C/D, "row = groupID for ci where i < 2, groupID + 8 for i >= 2;
//! col = (threadID_in_group * 2) + (i & 0x1)". For `ldmatrix`: "Each address corresponds
//! to the start of a matrix row. Addresses addr0–addr7 correspond to the rows of the first
//! matrix, addresses addr8–addr15 correspond to the rows of the second matrix, and so on",
//! "a group of four consecutive threads loads 16 bytes", "thread 0 receiving the first
//! fragment", and with `.x2`/`.x4` the further matrices go to the subsequent destination
//! registers.

use crate::ops::f32_of;

/// Warp-wide `mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32`, with the
/// fragment layouts of the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating
/// point type"), groupID = lane/4, threadID_in_group = lane%4:
/// - A (16x16, 4 x .b32 = a0..a7, a_{2r} in the low half of register r):
///   row = groupID for a0,a1,a4,a5 and groupID+8 for a2,a3,a6,a7;
///   col = threadID_in_group*2 + (i&1) for a0..a3, +8 for a4..a7.
/// - B (16x8, 2 x .b32 = b0..b3): row (k) = threadID_in_group*2 + (i&1) for b0,b1, +8 for
///   b2,b3; col (n) = groupID.
/// - C/D (16x8 f32, c0..c3): row = groupID for c0,c1 and groupID+8 for c2,c3;
///   col = threadID_in_group*2 + (i&1).
///
/// Arithmetic: every product of two f16/bf16 values is exact in f32; the products are
/// added to C in f32 with round-to-nearest, sequentially in order of k (the GPU's
/// internal accumulation order and precision are unspecified, so results can differ
/// from hardware in the last bits).
///
/// `m16n8k8` (`k == 8`) uses the first half of these layouts: A registers a0..a3 (rows
/// groupID / groupID+8, cols 2*threadID_in_group + (i&1)) and B register b0,b1. With f16
/// accumulators (`f16acc`) C and D are two `.f16x2` registers: (c0, c1) at row groupID and
/// (c2, c3) at row groupID+8, cols 2*threadID_in_group + (i&1); the sum is formed in f32 as
/// above and rounded to f16 (nearest even) once.
///
/// Operands are given as rows of per-lane register values (`ar[r][lane]` is register r of
/// the A fragment in that lane); returns the D registers of every lane.
pub(crate) fn mma_m16n8(
    bf16: bool,
    k: usize,
    f16acc: bool,
    ar: &[[u64; 32]],
    br: &[[u64; 32]],
    cr: &[[u64; 32]],
) -> Vec<[u64; 32]> {
    // Both conversions are exact: bf16 is the top half of an f32.
    let cv = |x: u64| -> f32 {
        if bf16 {
            f32::from_bits(((x & 0xFFFF) as u32) << 16)
        } else {
            half::f16::from_bits(x as u16).to_f32()
        }
    };
    let mut am = [[0f32; 16]; 16];
    let mut bm = [[0f32; 8]; 16];
    let mut dm = [[0f32; 8]; 16];
    for l in 0..32 {
        let (g, t) = (l / 4, l % 4);
        for (r, regs) in ar.iter().enumerate() {
            let v = regs[l];
            // Register r holds a_{2r} (low half) and a_{2r+1} (high half).
            let row = if r % 2 == 0 { g } else { g + 8 };
            let col = t * 2 + if r >= 2 { 8 } else { 0 };
            am[row][col] = cv(v);
            am[row][col + 1] = cv(v >> 16);
        }
        for (r, regs) in br.iter().enumerate() {
            let v = regs[l];
            let row = t * 2 + if r == 1 { 8 } else { 0 };
            bm[row][g] = cv(v);
            bm[row + 1][g] = cv(v >> 16);
        }
        if f16acc {
            for (r, regs) in cr.iter().enumerate() {
                let row = if r == 0 { g } else { g + 8 };
                dm[row][t * 2] = half::f16::from_bits(regs[l] as u16).to_f32();
                dm[row][t * 2 + 1] = half::f16::from_bits((regs[l] >> 16) as u16).to_f32();
            }
        } else {
            for (i, regs) in cr.iter().enumerate() {
                let row = if i < 2 { g } else { g + 8 };
                dm[row][t * 2 + (i & 1)] = f32_of(regs[l]);
            }
        }
    }
    // D = C + A.B: for each element, products added in order of k, each sum rounded to
    // f32 (mul and add are separate: no fused rounding). The j loop vectorizes.
    for i in 0..16 {
        let acc = &mut dm[i];
        for kk in 0..k {
            let x = am[i][kk];
            let brow = &bm[kk];
            for j in 0..8 {
                acc[j] += x * brow[j];
            }
        }
    }
    let mut out = vec![[0u64; 32]; if f16acc { 2 } else { 4 }];
    for l in 0..32 {
        let (g, t) = (l / 4, l % 4);
        if f16acc {
            for (r, o) in out.iter_mut().enumerate() {
                let row = if r == 0 { g } else { g + 8 };
                let h = |x: f32| half::f16::from_f32(x).to_bits() as u64;
                o[l] = h(dm[row][t * 2]) | h(dm[row][t * 2 + 1]) << 16;
            }
        } else {
            for (i, o) in out.iter_mut().enumerate() {
                let row = if i < 2 { g } else { g + 8 };
                o[l] = dm[row][t * 2 + (i & 1)].to_bits() as u64;
            }
        }
    }
    out
}

/// Distributes 8x8 b16 matrices (`m[i][row][col]`, as loaded from the row addresses) to
/// the destination registers of `ldmatrix` (`.x1/.x2/.x4` = `num` matrices). Without
/// `.trans`, lane `l` receives in register `d[i]` row `l/4`, elements `2*(l%4)` (low half)
/// and `2*(l%4)+1` (high half) of matrix `i`; with `.trans` it receives elements
/// `[2*(l%4)][l/4]` and `[2*(l%4)+1][l/4]`, i.e. the transposed matrix in the same
/// fragment layout (the layout `mma` expects for A rows and B columns).
pub(crate) fn ldmatrix_fragments(
    m: &[[[u16; 8]; 8]; 4],
    num: usize,
    trans: bool,
) -> [[u64; 32]; 4] {
    let mut out = [[0u64; 32]; 4];
    for (i, o) in out.iter_mut().enumerate().take(num) {
        for (l, x) in o.iter_mut().enumerate() {
            let (g, t) = (l / 4, l % 4);
            let (lo, hi) = if trans {
                (m[i][2 * t][g], m[i][2 * t + 1][g])
            } else {
                (m[i][g][2 * t], m[i][g][2 * t + 1])
            };
            *x = lo as u64 | (hi as u64) << 16;
        }
    }
    out
}
