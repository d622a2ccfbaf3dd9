//! CPU attention of new query rows over a decode cache: the keys of one row
//! are a few contiguous slices of cached (and freshly computed) K/V rows, the
//! query heads of one KV head are processed together so every K and V row is
//! read once per KV head, and [`crate::KsaCache`] spreads (sequence, KV head)
//! pairs over rayon's pool.
//!
//! [`attend`] is also the reference of the CUDA decode kernels
//! (`crate::cuda::decode`, `kernels/ksa_decode.cu`), which take the same kind
//! of slice lists as device addresses.

/// Contiguous K and V rows (`rows * head_dim` values each, row-major) of one
/// KV head: one run of keys a query may attend to.
#[derive(Debug, Clone, Copy)]
pub struct KvSlice<'a> {
    /// Keys, `[rows, head_dim]`.
    pub k: &'a [f32],
    /// Values, `[rows, head_dim]`.
    pub v: &'a [f32],
}

impl KvSlice<'_> {
    /// Number of rows, given the head width.
    pub fn rows(&self, head_dim: usize) -> usize {
        self.k.len() / head_dim
    }
}

/// Softmax attention of the `group` query heads sharing one KV head over the
/// keys in `slices` (in any order: softmax does not care), scale `scale`.
///
/// `q` is `[group, head_dim]`, `out` receives `[group, head_dim]`; `scores`
/// is scratch space reused across calls. The slices must hold at least one
/// row in total (a KSA query always sees itself).
pub fn attend(
    q: &[f32],
    head_dim: usize,
    slices: &[KvSlice<'_>],
    scale: f32,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let d = head_dim;
    let group = q.len() / d;
    let keys: usize = slices.iter().map(|s| s.rows(d)).sum();
    debug_assert!(keys > 0, "a query row with no keys");
    scores.clear();
    scores.resize(group * keys, 0.0);
    // Scores, key-major: each K row is loaded once for all heads of the group.
    let mut col = 0;
    for s in slices {
        for k_row in s.k.chunks_exact(d) {
            for (h, q_row) in q.chunks_exact(d).enumerate() {
                scores[h * keys + col] = dot(q_row, k_row) * scale;
            }
            col += 1;
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
        for v_row in s.v.chunks_exact(d) {
            for (h, o) in out.chunks_exact_mut(d).enumerate() {
                axpy(scores[h * keys + col], v_row, o);
            }
            col += 1;
        }
    }
}

/// Dot product with eight independent accumulators (vectorizes without
/// reassociation flags).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `out += p * v`.
fn axpy(p: f32, v: &[f32], out: &mut [f32]) {
    for (o, x) in out.iter_mut().zip(v) {
        *o += p * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
