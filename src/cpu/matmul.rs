//! The tile products of attention: `S = Q K^T` and `O += A B`, where `A` is
//! read with any strides, so `O += P V` (forward, backward `dQ += dS K`) and
//! `O += P^T X` (backward `dV += P^T dO`, `dK += dS^T Q`) are one product.
//!
//! On x86-64 with AVX2 and FMA and a head dim that is a multiple of 16 they
//! run on a register-blocked microkernel written for exactly these shapes
//! (6 rows x 16 columns of accumulators): `A` is read in place (`P^T` is `P`
//! with swapped strides; the kernel broadcasts single elements, so it needs
//! no contiguous rows), `B` rows already are the panel layout the kernel
//! wants, and only the key tile of `S = Q K^T` is packed (transposed, once
//! per tile product, `keys x d` floats against `rows x keys x d` FMAs). This
//! avoids the general `gemm` crate's per-call packing of both operands, which
//! the tile loop would pay once per key tile. Everywhere else the `gemm`
//! crate computes the same products.

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
        for p in 0..panels {
            // SAFETY: AVX2/FMA checked by `fast_path`; panel `p` (d x 16) is
            // inside `pack`, and the rows x 16 block at column 16p inside `s`
            // because the stride is padded to whole panels (asserted).
            unsafe {
                avx2::rows(
                    rows,
                    d,
                    (q.as_ptr(), d, 1),
                    (pack.as_ptr().add(p * d * NR), NR),
                    (s.as_mut_ptr().add(p * NR), stride),
                    false,
                )
            };
        }
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
/// `j < keys`: `O += P V`.
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
    product(fast, rows, keys, d, (p, stride, 1), v, o);
}

/// `o[j * d + c] += sum_r p[r * stride + j] * x[r * d + c]` for `j < keys`,
/// `r < rows`: `O += P^T X`, with `P` (rows x keys) read in place.
#[allow(clippy::too_many_arguments)]
pub(crate) fn accumulate_transposed(
    fast: bool,
    rows: usize,
    keys: usize,
    d: usize,
    p: &[f32],
    stride: usize,
    x: &[f32],
    o: &mut [f32],
) {
    product(fast, keys, rows, d, (p, 1, stride), x, o);
}

/// `o[r * d + c] += sum_i a[r * rs + i * cs] * b[i * d + c]` for `r < m`,
/// `i < depth`, `c < d`; `a` is `(data, rs, cs)`.
fn product(
    fast: bool,
    m: usize,
    depth: usize,
    d: usize,
    (a, rs, cs): (&[f32], usize, usize),
    b: &[f32],
    o: &mut [f32],
) {
    if m == 0 || depth == 0 || d == 0 {
        return;
    }
    assert!(a.len() > (m - 1) * rs + (depth - 1) * cs);
    assert!(b.len() >= depth * d && o.len() >= m * d);
    #[cfg(target_arch = "x86_64")]
    if fast {
        for c in (0..d).step_by(NR) {
            // SAFETY: AVX2/FMA checked by `fast_path` (which also guarantees
            // d % 16 == 0, so columns c..c + 16 exist); bounds asserted above.
            unsafe {
                avx2::rows(
                    m,
                    depth,
                    (a.as_ptr(), rs, cs),
                    (b.as_ptr().add(c), d),
                    (o.as_mut_ptr().add(c), d),
                    true,
                )
            };
        }
        return;
    }
    let _ = fast;
    // SAFETY: O (m x d) += A (m x depth, strides rs, cs) * B (depth x d), all
    // inside their buffers (asserted).
    unsafe {
        gemm(
            m,
            d,
            depth,
            o.as_mut_ptr(),
            1,
            d as isize,
            true,
            a.as_ptr(),
            cs as isize,
            rs as isize,
            b.as_ptr(),
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
    use super::MR;
    use std::arch::x86_64::*;

    /// One 16-column panel of `out (+)= A B` over `m` rows: `A` is `(ptr,
    /// rs, cs)`, the panel of `B` is `(ptr, row stride)`, `out` is `(ptr, row
    /// stride)`. Blocks of 6 rows, then one block for the remainder.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows(
        m: usize,
        depth: usize,
        (a, a_rs, a_cs): (*const f32, usize, usize),
        (b, b_rs): (*const f32, usize),
        (out, out_rs): (*mut f32, usize),
        accumulate: bool,
    ) {
        let mut r = 0;
        while r + MR <= m {
            let (ap, op) = (a.add(r * a_rs), out.add(r * out_rs));
            block::<MR>(ap, a_rs, a_cs, b, b_rs, depth, op, out_rs, accumulate);
            r += MR;
        }
        let (ap, op) = (a.add(r * a_rs), out.add(r * out_rs));
        match m - r {
            0 => {}
            1 => block::<1>(ap, a_rs, a_cs, b, b_rs, depth, op, out_rs, accumulate),
            2 => block::<2>(ap, a_rs, a_cs, b, b_rs, depth, op, out_rs, accumulate),
            3 => block::<3>(ap, a_rs, a_cs, b, b_rs, depth, op, out_rs, accumulate),
            4 => block::<4>(ap, a_rs, a_cs, b, b_rs, depth, op, out_rs, accumulate),
            _ => block::<5>(ap, a_rs, a_cs, b, b_rs, depth, op, out_rs, accumulate),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104729) % 211) as f32 / 105.0 - 1.0)
            .collect()
    }

    /// Every product on both paths (microkernel where the CPU has it, `gemm`
    /// otherwise), with row counts that leave every remainder of the 6-row
    /// blocks and key counts that are not whole panels, against plain sums.
    #[test]
    fn products_match_naive_sums() {
        let d = 32;
        for fast in [false, fast_path(d)] {
            for rows in [1, 5, 6, 13, 20] {
                for keys in [1, 7, 16, 37] {
                    let stride = score_stride(keys);
                    let (q, k) = (data(rows * d, 1), data(keys * d, 2));
                    let mut s = vec![0.0; rows * stride];
                    scores(fast, rows, keys, d, &q, &k, &mut s, stride, &mut Vec::new());
                    let p = data(rows * stride, 3);
                    let (mut o, mut ot) = (data(rows * d, 4), data(keys * d, 5));
                    let (o0, ot0) = (o.clone(), ot.clone());
                    accumulate(fast, rows, keys, d, &p, stride, &k, &mut o);
                    accumulate_transposed(fast, rows, keys, d, &p, stride, &q, &mut ot);
                    for r in 0..rows {
                        for j in 0..keys {
                            let want: f32 = (0..d).map(|c| q[r * d + c] * k[j * d + c]).sum();
                            assert!((s[r * stride + j] - want).abs() < 1e-4, "{fast} s");
                        }
                        for c in 0..d {
                            let want: f32 = o0[r * d + c]
                                + (0..keys)
                                    .map(|j| p[r * stride + j] * k[j * d + c])
                                    .sum::<f32>();
                            assert!((o[r * d + c] - want).abs() < 1e-4, "{fast} pv");
                        }
                    }
                    for j in 0..keys {
                        for c in 0..d {
                            let want: f32 = ot0[j * d + c]
                                + (0..rows)
                                    .map(|r| p[r * stride + j] * q[r * d + c])
                                    .sum::<f32>();
                            assert!((ot[j * d + c] - want).abs() < 1e-4, "{fast} ptx");
                        }
                    }
                }
            }
        }
    }
}
