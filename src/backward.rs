//! Backward pass of KSA (and causal) attention on the CPU, FlashAttention-2
//! style: probabilities are recomputed from the forward's saved log-sum-exp,
//! only the key ranges the mask allows are visited, and nothing of size
//! `N x N` is allocated. Compute is f32 whatever the input dtype.
//!
//! Work is split by (batch, key/value head): such a task owns the dK/dV rows
//! of its KV head (every query head of the GQA group adds into them, so GQA
//! gradients are summed without copies or atomics) and the dQ rows of its
//! query heads.

use crate::check::QkvDims;
use crate::op::Mask;
use rayon::prelude::*;

/// Buffers are contiguous `[b, h, len, d]` (`lse`: `[b, hq, len]`).
/// Gradients `(dq, dk, dv)` of `out = softmax(scale * q k^T + mask) v` given
/// `dout`, the forward's `out` and its per-row log-sum-exp `lse`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    dout: &[f32],
    lse: &[f32],
    dims: QkvDims,
    scale: f32,
    mask: Mask,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let QkvDims {
        batch,
        q_heads: hq,
        kv_heads: hkv,
        len: n,
        head_dim: d,
    } = dims;
    let g = hq / hkv;
    let head = n * d;
    // One task per (batch, KV head): its dK, dV and the dQ of its g query heads.
    let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..batch * hkv)
        .into_par_iter()
        .map(|task| {
            let (bi, kh) = (task / hkv, task % hkv);
            let kv_off = (bi * hkv + kh) * head;
            let (kh_k, kh_v) = (&k[kv_off..kv_off + head], &v[kv_off..kv_off + head]);
            let mut dk = vec![0f32; head];
            let mut dv = vec![0f32; head];
            let mut dq = vec![0f32; g * head];
            for hg in 0..g {
                let h = kh * g + hg;
                let q_off = (bi * hq + h) * head;
                let lse_off = (bi * hq + h) * n;
                for i in 0..n {
                    let row = q_off + i * d;
                    let (qi, oi, doi) = (&q[row..row + d], &out[row..row + d], &dout[row..row + d]);
                    let lse_i = lse[lse_off + i];
                    // D_i = dO_i . O_i = sum_j P_ij dP_ij: the softmax Jacobian's shift.
                    let di = dot(doi, oi);
                    let dqi = &mut dq[hg * head + i * d..hg * head + (i + 1) * d];
                    let mut visit = |run: std::ops::Range<usize>| {
                        for j in run {
                            let (kj, vj) = (&kh_k[j * d..(j + 1) * d], &kh_v[j * d..(j + 1) * d]);
                            let p = (scale * dot(qi, kj) - lse_i).exp();
                            let ds = p * (dot(doi, vj) - di);
                            axpy(p, doi, &mut dv[j * d..(j + 1) * d]);
                            axpy(ds, kj, dqi);
                            axpy(ds, qi, &mut dk[j * d..(j + 1) * d]);
                        }
                    };
                    match mask {
                        Mask::Ksa(layout) => layout.for_each_key_run(i, visit),
                        Mask::Causal => visit(0..i + 1),
                    }
                }
            }
            // d(scale * q.k) brings the scale into dQ and dK once, at the end.
            dq.iter_mut().chain(dk.iter_mut()).for_each(|x| *x *= scale);
            (dq, dk, dv)
        })
        .collect();
    let mut dq = vec![0f32; batch * hq * head];
    let mut dk = Vec::with_capacity(batch * hkv * head);
    let mut dv = Vec::with_capacity(batch * hkv * head);
    for (task, (pq, pk, pv)) in parts.into_iter().enumerate() {
        let (bi, kh) = (task / hkv, task % hkv);
        let start = (bi * hq + kh * g) * head;
        dq[start..start + g * head].copy_from_slice(&pq);
        dk.extend_from_slice(&pk);
        dv.extend_from_slice(&pv);
    }
    (dq, dk, dv)
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums let the compiler vectorize.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[inline]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{reference, KsaConfig, Layout};
    use candle_core::{DType, Device, Tensor, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let mut state = seed;
        let len: usize = shape.iter().product();
        let data: Vec<f32> = (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn vec(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Row log-sum-exp of the scaled, masked scores, straight from the definition.
    fn lse(q: &Tensor, k: &Tensor, allowed: impl Fn(usize, usize) -> bool, scale: f64) -> Vec<f32> {
        let (b, hq, n, d) = q.dims4().unwrap();
        let hkv = k.dim(1).unwrap();
        let (qf, kf) = (vec(q), vec(k));
        let mut out = Vec::new();
        for bi in 0..b {
            for h in 0..hq {
                let kh = h / (hq / hkv);
                for i in 0..n {
                    let s: Vec<f64> = (0..n)
                        .filter(|&j| allowed(i, j))
                        .map(|j| {
                            let (qo, ko) =
                                (((bi * hq + h) * n + i) * d, ((bi * hkv + kh) * n + j) * d);
                            scale
                                * (0..d)
                                    .map(|x| qf[qo + x] as f64 * kf[ko + x] as f64)
                                    .sum::<f64>()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    out.push((m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln()) as f32);
                }
            }
        }
        out
    }

    fn check(mask: Mask, dims: QkvDims) {
        let QkvDims {
            batch: b,
            q_heads: hq,
            kv_heads: hkv,
            len: n,
            head_dim: d,
        } = dims;
        let (q, k, v) = (
            rand(&[b, hq, n, d], 1),
            rand(&[b, hkv, n, d], 2),
            rand(&[b, hkv, n, d], 3),
        );
        let dout = rand(&[b, hq, n, d], 4);
        let f64s = |x: &Tensor| Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
        let (qv, kv, vv) = (f64s(&q), f64s(&k), f64s(&v));
        let out = match mask {
            Mask::Ksa(l) => reference::attention(&qv, &kv, &vv, &l),
            Mask::Causal => reference::causal_attention(&qv, &kv, &vv, None),
        }
        .unwrap();
        let loss = (&out * dout.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let lse = match mask {
            Mask::Ksa(l) => lse(&q, &k, |i, j| l.can_attend(i, j), scale),
            Mask::Causal => lse(&q, &k, |i, j| j <= i, scale),
        };
        let (dq, dk, dv) = attention_backward(
            &vec(&q),
            &vec(&k),
            &vec(&v),
            &vec(&out),
            &vec(&dout),
            &lse,
            dims,
            scale as f32,
            mask,
        );
        for (got, var, name) in [(dq, &qv, "dq"), (dk, &kv, "dk"), (dv, &vv, "dv")] {
            let want = vec(grads.get(var.as_tensor()).unwrap());
            let top = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-4 * top.max(1.0),
                    "{name}[{i}]: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn equals_reference_autograd() {
        for (c, s, w, n) in [(3, 2, 1, 17), (4, 1, 0, 13), (2, 3, 9, 9), (5, 1, 2, 4)] {
            let layout = Layout::new(KsaConfig::new(c, s, w).unwrap(), n).unwrap();
            let dims = QkvDims {
                batch: 2,
                q_heads: 4,
                kv_heads: 2,
                len: layout.len(),
                head_dim: 12,
            };
            check(Mask::Ksa(layout), dims);
        }
        check(
            Mask::Causal,
            QkvDims {
                batch: 1,
                q_heads: 3,
                kv_heads: 1,
                len: 21,
                head_dim: 8,
            },
        );
    }
}
