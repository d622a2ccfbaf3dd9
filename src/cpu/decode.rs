//! CPU attention of new query rows over a decode cache: the keys of one row
//! are a few contiguous slices of cached (and freshly computed) K/V rows, the
//! query heads of one KV head are processed together so every K and V row is
//! read once per KV head, and [`crate::KsaCache`] spreads (sequence, KV head)
//! pairs over rayon's pool.
//!
//! [`attend`] is also the reference of the CUDA decode kernels
//! (`crate::cuda::decode`, `kernels/ksa_decode.cu`), which take the same kind
//! of slice lists as device addresses: per query row a list of [`KvRows`]
//! over cached tensors. [`attend_rows`] is the CPU implementation of exactly
//! that interface, which a tensor-backed [`crate::KsaCache`] uses off CUDA.

use super::isa::{process_isa, CpuIsa};
use super::simd::{axpy_wide, dispatch, dot_wide, Arith};
use super::Element;
use crate::attention::KvRows;
use crate::{AttentionOptions, Error, Result};
use candle_core::{DType, Tensor};
use rayon::prelude::*;
use std::ops::Range;

/// Contiguous K and V rows (`rows * head_dim` values each, row-major) of one
/// KV head: one run of keys a query may attend to, in f32 or, as a
/// half-precision host cache stores them, in bf16 or f16.
#[derive(Debug, Clone, Copy)]
pub struct KvSlice<'a, T = f32> {
    /// Keys, `[rows, head_dim]`.
    pub k: &'a [T],
    /// Values, `[rows, head_dim]`.
    pub v: &'a [T],
}

impl<T> KvSlice<'_, T> {
    /// Number of rows, given the head width.
    pub fn rows(&self, head_dim: usize) -> usize {
        self.k.len() / head_dim
    }
}

/// Attention of one query row per entry, `q: [n, q_heads, head_dim]`, over
/// the keys `seqs[i]` of entry `i` (at least one key each), on the CPU in f32
/// with [`attend`]: the inputs and output `o: [n, q_heads, head_dim]` (q's
/// dtype and device) of `crate::cuda::decode::decode_attention`, for any
/// device and float dtype, with the scale of `options`.
pub fn attend_rows(
    q: &Tensor,
    seqs: &[Vec<KvRows<'_>>],
    options: &AttentionOptions,
) -> Result<Tensor> {
    process_isa()?;
    let (n, hq, d) = q.dims3().map_err(|_| Error::Rank {
        name: "q",
        expected: 3,
        layout: "[n, q_heads, head_dim]",
        got: q.dims().to_vec(),
    })?;
    if seqs.len() != n {
        return Err(Error::DimMismatch {
            what: "query rows",
            a: "q",
            a_val: n,
            b: "seqs",
            b_val: seqs.len(),
        });
    }
    // Every distinct tensor once on the host as f32 (a cache's window and
    // summaries are shared by all query rows of a sequence).
    let mut ids = vec![];
    let mut host: Vec<(Vec<f32>, usize)> = vec![];
    let mut kv_heads = None;
    let mut runs: Vec<Vec<(usize, usize, Range<usize>)>> = Vec::with_capacity(n);
    for (i, entry) in seqs.iter().enumerate() {
        let mut mine = Vec::with_capacity(entry.len());
        for r in entry {
            let mut index = [0; 2];
            for (slot, (name, t)) in index.iter_mut().zip([("k", r.k), ("v", r.v)]) {
                let cap = r.check_tensor(name, t, d, &mut kv_heads)?;
                *slot = match ids.iter().position(|&id| id == t.id()) {
                    Some(j) => j,
                    None => {
                        let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                        ids.push(t.id());
                        host.push((data, cap));
                        host.len() - 1
                    }
                };
            }
            mine.push((index[0], index[1], r.rows.clone()));
        }
        if mine.iter().all(|(_, _, rows)| rows.is_empty()) {
            return Err(Error::DecodeSlices {
                sequence: i,
                reason: "no keys (a decode query always sees itself)".into(),
            });
        }
        runs.push(mine);
    }
    let hkv = kv_heads.unwrap_or(1);
    if hq % hkv != 0 {
        return Err(Error::HeadsNotDivisible {
            q_heads: hq,
            kv_heads: hkv,
        });
    }
    let group = hq / hkv;
    let scale = options.scale.map_or(1.0 / (d as f32).sqrt(), |s| s as f32);
    let qd = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0.0f32; n * hq * d];
    out.par_chunks_mut(hq * d)
        .zip(&runs)
        .enumerate()
        .for_each(|(i, (o, entry))| {
            let mut scores = Vec::new();
            for (g, o) in o.chunks_exact_mut(group * d).enumerate() {
                let slices: Vec<KvSlice<'_>> = entry
                    .iter()
                    .map(|(ki, vi, rows)| {
                        let at = |cap: usize| (g * cap + rows.start) * d..(g * cap + rows.end) * d;
                        KvSlice {
                            k: &host[*ki].0[at(host[*ki].1)],
                            v: &host[*vi].0[at(host[*vi].1)],
                        }
                    })
                    .collect();
                let at = (i * hq + g * group) * d;
                attend(&qd[at..at + group * d], d, &slices, scale, o, &mut scores);
            }
        });
    Ok(Tensor::from_vec(out, (n, hq, d), q.device())?.to_dtype(q.dtype())?)
}

/// Softmax attention of the `group` query heads sharing one KV head over the
/// keys in `slices` (in any order: softmax does not care), scale `scale`.
///
/// `q` is `[group, head_dim]`, `out` receives `[group, head_dim]`; `scores`
/// is scratch space reused across calls. The slices must hold at least one
/// row in total (a KSA query always sees itself).
pub fn attend<T: Element>(
    q: &[f32],
    head_dim: usize,
    slices: &[KvSlice<'_, T>],
    scale: f32,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    // The entry points (`attend_rows`, `KsaCache::append`) report an unusable
    // forced variant as a typed error before they get here.
    let isa = process_isa().unwrap_or(CpuIsa::Portable);
    attend_on(isa, q, head_dim, slices, scale, out, scores)
}

dispatch! {
    /// [`attend`] compiled for `isa`.
    attend_on<T: Element> => attend_impl(
        q: &[f32],
        head_dim: usize,
        slices: &[KvSlice<'_, T>],
        scale: f32,
        out: &mut [f32],
        scores: &mut Vec<f32>,
    )
}

/// The body of [`attend`], inlined into each target-feature variant.
#[inline(always)]
fn attend_impl<A: Arith, T: Element>(
    q: &[f32],
    head_dim: usize,
    slices: &[KvSlice<'_, T>],
    scale: f32,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let d = head_dim;
    // Rows whose widening is a few vector instructions (f32, bf16) are read
    // in place; f16 runs are widened a block of rows at a time (F16C) into a
    // scratch buffer that stays in cache.
    const BLOCK_ROWS: usize = 256;
    let mut wide = Vec::new();
    let group = q.len() / d;
    let keys: usize = slices.iter().map(|s| s.rows(d)).sum();
    debug_assert!(keys > 0, "a query row with no keys");
    scores.clear();
    scores.resize(group * keys, 0.0);
    // Scores, key-major: each K row is loaded once for all heads of the group.
    let mut col = 0;
    for s in slices {
        if T::CHEAP_WIDEN {
            for k_row in s.k.chunks_exact(d) {
                for (h, q_row) in q.chunks_exact(d).enumerate() {
                    scores[h * keys + col] = dot_wide::<A, T>(q_row, k_row) * scale;
                }
                col += 1;
            }
            continue;
        }
        for block in s.k.chunks(BLOCK_ROWS * d) {
            for k_row in T::row_f32(block, &mut wide).chunks_exact(d) {
                for (h, q_row) in q.chunks_exact(d).enumerate() {
                    scores[h * keys + col] = dot_wide::<A, f32>(q_row, k_row) * scale;
                }
                col += 1;
            }
        }
    }
    for row in scores.chunks_exact_mut(keys) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|x| *x *= inv);
    }
    out.fill(0.0);
    let mut col = 0;
    for s in slices {
        if T::CHEAP_WIDEN {
            for v_row in s.v.chunks_exact(d) {
                for (h, o) in out.chunks_exact_mut(d).enumerate() {
                    axpy_wide::<A, T>(scores[h * keys + col], v_row, o);
                }
                col += 1;
            }
            continue;
        }
        for block in s.v.chunks(BLOCK_ROWS * d) {
            for v_row in T::row_f32(block, &mut wide).chunks_exact(d) {
                for (h, o) in out.chunks_exact_mut(d).enumerate() {
                    axpy_wide::<A, f32>(scores[h * keys + col], v_row, o);
                }
                col += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `attend_rows` over runs of two tensors equals `attend` over the same
    /// rows as slices; bad inputs are typed errors.
    #[test]
    fn attend_rows_matches_attend_and_checks_input() {
        let (hq, hkv, d, cap) = (4, 2, 8, 5);
        let val = |n: usize, f: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * f).sin()).collect() };
        let (qv, kv, vv) = (
            val(hq * d, 0.37),
            val(hkv * cap * d, 0.11),
            val(hkv * cap * d, 0.23),
        );
        let dev = Device::Cpu;
        let q = Tensor::from_slice(&qv, (1, hq, d), &dev).unwrap();
        let k = Tensor::from_slice(&kv, (hkv, cap, d), &dev).unwrap();
        let v = Tensor::from_slice(&vv, (hkv, cap, d), &dev).unwrap();
        let runs = |a: Range<usize>, b: Range<usize>| {
            vec![vec![
                KvRows {
                    k: &k,
                    v: &v,
                    rows: a,
                },
                KvRows {
                    k: &k,
                    v: &v,
                    rows: b,
                },
            ]]
        };
        let got: Vec<f32> = attend_rows(&q, &runs(0..2, 3..5), &AttentionOptions::default())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let group = hq / hkv;
        for g in 0..hkv {
            let at = |r: Range<usize>| (g * cap + r.start) * d..(g * cap + r.end) * d;
            let slices = [
                KvSlice {
                    k: &kv[at(0..2)],
                    v: &vv[at(0..2)],
                },
                KvSlice {
                    k: &kv[at(3..5)],
                    v: &vv[at(3..5)],
                },
            ];
            let mut out = vec![0.0; group * d];
            let qg = &qv[g * group * d..(g + 1) * group * d];
            attend(
                qg,
                d,
                &slices,
                1.0 / (d as f32).sqrt(),
                &mut out,
                &mut Vec::new(),
            );
            assert_eq!(&got[g * group * d..(g + 1) * group * d], &out[..]);
        }
        let err = |seqs: &[Vec<KvRows<'_>>], q: &Tensor| {
            attend_rows(q, seqs, &AttentionOptions::default()).unwrap_err()
        };
        assert!(matches!(
            err(&runs(0..0, 2..2), &q),
            Error::DecodeSlices { sequence: 0, .. }
        ));
        assert!(matches!(
            err(&runs(0..2, 4..6), &q),
            Error::DimMismatch {
                what: "cached rows",
                ..
            }
        ));
        assert!(matches!(
            err(&runs(0..2, 3..5), &q.squeeze(0).unwrap()),
            Error::Rank { .. }
        ));
        assert!(matches!(
            err(&[], &q),
            Error::DimMismatch {
                what: "query rows",
                ..
            }
        ));
        let q3 = Tensor::zeros((1, 3, d), DType::F32, &dev).unwrap();
        assert!(matches!(
            err(&runs(0..2, 3..5), &q3),
            Error::HeadsNotDivisible { .. }
        ));
    }

    #[test]
    fn matches_naive_softmax_across_slices() {
        let d = 4;
        let q: Vec<f32> = (0..2 * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let k: Vec<f32> = (0..5 * d).map(|i| (i as f32 * 0.11).cos()).collect();
        let v: Vec<f32> = (0..5 * d).map(|i| i as f32 * 0.1).collect();
        let split = [
            KvSlice {
                k: &k[..2 * d],
                v: &v[..2 * d],
            },
            KvSlice {
                k: &k[2 * d..],
                v: &v[2 * d..],
            },
        ];
        let mut out = vec![0.0; 2 * d];
        attend(&q, d, &split, 0.5, &mut out, &mut Vec::new());
        for h in 0..2 {
            let s: Vec<f32> = (0..5)
                .map(|r| (0..d).map(|i| q[h * d + i] * k[r * d + i]).sum::<f32>() * 0.5)
                .collect();
            let m = s.iter().copied().fold(f32::MIN, f32::max);
            let z: f32 = s.iter().map(|x| (x - m).exp()).sum();
            for i in 0..d {
                let want: f32 = (0..5).map(|r| (s[r] - m).exp() / z * v[r * d + i]).sum();
                assert!((out[h * d + i] - want).abs() < 1e-5);
            }
        }
    }
}
