//! The two tile products of attention, `S = Q K^T` and `O += P V`.
//!
//! On x86-64 with AVX2 and FMA and a head dim that is a multiple of 16 they
//! run on a register-blocked microkernel written for exactly these shapes
//! (6 rows x 16 columns of accumulators): `Q` and `P` are read in place, `V`
//! rows already are the panel layout the kernel wants, and only the key tile
//! is packed (transposed, once per tile product, `keys x d` floats against
//! `rows x keys x d` FMAs). This avoids the general `gemm` crate's per-call
//! packing of both operands, which the tile loop would pay once per key
//! tile. Everywhere else the `gemm` crate computes the same products.

use gemm::{gemm, Parallelism};

/// Output columns per microkernel panel (two 8-lane vectors).
const NR: usize = 16;
/// Rows per microkernel call.
const MR: usize = 6;

/// Whether the microkernel path is available for head dim `d`.
pub(crate) fn fast_path(d: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        d % NR == 0
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = d;
        false
    }
}

/// Row stride of a score buffer for `keys` keys: padded to whole panels so
/// the microkernel may write full panels.
pub(crate) fn score_stride(keys: usize) -> usize {
    keys.div_ceil(NR) * NR
}

/// `s[r * stride + j] = sum_c q[r * d + c] * k[j * d + c]` for `r < rows`,
/// `j < keys` (columns up to the next multiple of 16 may be overwritten).
/// `pack` is scratch for the transposed key tile.
#[allow(clippy::too_many_arguments)]
pub(crate) fn scores(
    fast: bool,
    rows: usize,
    keys: usize,
    d: usize,
    q: &[f32],
    k: &[f32],
    s: &mut [f32],
    stride: usize,
    pack: &mut Vec<f32>,
) {
    assert!(q.len() >= rows * d && k.len() >= keys * d && stride >= score_stride(keys));
    assert!(s.len() >= rows * stride);
    #[cfg(target_arch = "x86_64")]
    if fast {
        let panels = keys.div_ceil(NR);
        pack.clear();
        pack.resize(panels * d * NR, 0.0);
        for (j, row) in k[..keys * d].chunks_exact(d).enumerate() {
            let (p, jj) = (j / NR, j % NR);
            let panel = &mut pack[p * d * NR..(p + 1) * d * NR];
            for (c, &x) in row.iter().enumerate() {
                panel[c * NR + jj] = x;
            }
        }
        // SAFETY: AVX2/FMA checked by `fast_path`; bounds asserted above.
        unsafe { avx2::scores(rows, panels, d, q, pack, s, stride) };
        return;
    }
    let _ = (fast, pack);
    // SAFETY: S (rows x keys, row stride `stride`) and Q (rows x d) are
    // inside their buffers (asserted); K^T reads `k` with swapped strides.
    unsafe {
        gemm(
            rows,
            keys,
            d,
            s.as_mut_ptr(),
            1,
            stride as isize,
            false,
            q.as_ptr(),
            1,
            d as isize,
            k.as_ptr(),
            d as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// `o[r * d + c] += sum_j p[r * stride + j] * v[j * d + c]` for `r < rows`,
/// `j < keys`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn accumulate(
    fast: bool,
    rows: usize,
    keys: usize,
    d: usize,
    p: &[f32],
    stride: usize,
    v: &[f32],
    o: &mut [f32],
) {
    assert!(p.len() >= (rows.max(1) - 1) * stride + keys && v.len() >= keys * d);
    assert!(o.len() >= rows * d);
    #[cfg(target_arch = "x86_64")]
    if fast {
        // SAFETY: AVX2/FMA checked by `fast_path` (which also guarantees
        // d % 16 == 0); bounds asserted above.
        unsafe { avx2::accumulate(rows, keys, d, p, stride, v, o) };
        return;
    }
    let _ = fast;
    // SAFETY: O (rows x d) += P (rows x keys, stride `stride`) * V (keys x d),
    // all inside their buffers (asserted).
    unsafe {
        gemm(
            rows,
            d,
            keys,
            o.as_mut_ptr(),
            1,
            d as isize,
            true,
            p.as_ptr(),
            1,
            stride as isize,
            v.as_ptr(),
            1,
            d as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// `S = Q K^T` over packed key panels (`panels` of `d x 16`).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores(
        rows: usize,
        panels: usize,
        d: usize,
        q: &[f32],
        pack: &[f32],
        s: &mut [f32],
        stride: usize,
    ) {
        for p in 0..panels {
            let panel = pack.as_ptr().add(p * d * NR);
            let mut r = 0;
            while r + MR <= rows {
                block::<MR>(
                    q.as_ptr().add(r * d),
                    d,
                    1,
                    panel,
                    NR,
                    d,
                    s.as_mut_ptr().add(r * stride + p * NR),
                    stride,
                    false,
                );
                r += MR;
            }
            let left = rows - r;
            let (qp, sp) = (
                q.as_ptr().add(r * d),
                s.as_mut_ptr().add(r * stride + p * NR),
            );
            match left {
                0 => {}
                1 => block::<1>(qp, d, 1, panel, NR, d, sp, stride, false),
                2 => block::<2>(qp, d, 1, panel, NR, d, sp, stride, false),
                3 => block::<3>(qp, d, 1, panel, NR, d, sp, stride, false),
                4 => block::<4>(qp, d, 1, panel, NR, d, sp, stride, false),
                _ => block::<5>(qp, d, 1, panel, NR, d, sp, stride, false),
            }
        }
    }

    /// `O += P V`, V read in place (its rows are 16-column panels at stride d).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn accumulate(
        rows: usize,
        keys: usize,
        d: usize,
        p: &[f32],
        stride: usize,
        v: &[f32],
        o: &mut [f32],
    ) {
        for c in (0..d).step_by(NR) {
            let vp = v.as_ptr().add(c);
            let mut r = 0;
            while r + MR <= rows {
                block::<MR>(
                    p.as_ptr().add(r * stride),
                    stride,
                    1,
                    vp,
                    d,
                    keys,
                    o.as_mut_ptr().add(r * d + c),
                    d,
                    true,
                );
                r += MR;
            }
            let left = rows - r;
            let (pp, op) = (p.as_ptr().add(r * stride), o.as_mut_ptr().add(r * d + c));
            match left {
                0 => {}
                1 => block::<1>(pp, stride, 1, vp, d, keys, op, d, true),
                2 => block::<2>(pp, stride, 1, vp, d, keys, op, d, true),
                3 => block::<3>(pp, stride, 1, vp, d, keys, op, d, true),
                4 => block::<4>(pp, stride, 1, vp, d, keys, op, d, true),
                _ => block::<5>(pp, stride, 1, vp, d, keys, op, d, true),
            }
        }
    }

    /// One `R x 16` output block: `out[r][0..16] (+)= sum_i a[r*a_rs + i*a_cs]
    /// * b[i*b_rs + 0..16]` for `i < depth`, accumulators in registers.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const R: usize>(
        a: *const f32,
        a_rs: usize,
        a_cs: usize,
        b: *const f32,
        b_rs: usize,
        depth: usize,
        out: *mut f32,
        out_rs: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        if accumulate {
            for (r, acc) in acc.iter_mut().enumerate() {
                acc[0] = _mm256_loadu_ps(out.add(r * out_rs));
                acc[1] = _mm256_loadu_ps(out.add(r * out_rs + 8));
            }
        }
        for i in 0..depth {
            let b0 = _mm256_loadu_ps(b.add(i * b_rs));
            let b1 = _mm256_loadu_ps(b.add(i * b_rs + 8));
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*a.add(r * a_rs + i * a_cs));
                acc[0] = _mm256_fmadd_ps(x, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(x, b1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.add(r * out_rs), acc[0]);
            _mm256_storeu_ps(out.add(r * out_rs + 8), acc[1]);
        }
    }
}
