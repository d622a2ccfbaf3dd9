//! The gradient side of docs/robustness.md's non-finite policy as test code:
//! which gradient rows may read a non-finite input, and the independent f64
//! gradients every other row is compared with.
//!
//! Buffers are contiguous `[b, h, n, d]` (`h` = `hq` for q, dO, dQ and `hkv`
//! for k, v, dK, dV); `allowed(i, j)` is the mask (query slot `i` may read
//! key slot `j`).

/// `(b, hq, hkv, n, d)`.
pub type Dims = (usize, usize, usize, usize, usize);

/// Per gradient row: whether it may read a non-finite input (then its value
/// is unspecified). `dq` is `[b, hq, n]`, `dk` and `dv` are `[b, hkv, n]`.
pub struct Reach {
    pub dq: Vec<bool>,
    pub dk: Vec<bool>,
    pub dv: Vec<bool>,
}

fn bad_row(x: &[f32], row: usize, d: usize) -> bool {
    x[row * d..(row + 1) * d].iter().any(|v| !v.is_finite())
}

/// The dependency sets of the policy, written from the formulas:
/// `dQ_i` reads q_i, dO_i and k_j, v_j of every key j row i may see (through
/// `O_i`, the log-sum-exp and `dS_i`); `dK_j` reads what the dQ rows of the
/// queries that see j read; `dV_j = sum_i P_ij dO_i` reads the same but no
/// value (`P` does not depend on v).
pub fn reach(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    (b, hq, hkv, n, d): Dims,
    allowed: &dyn Fn(usize, usize) -> bool,
) -> Reach {
    let group = hq / hkv;
    let mut dq = vec![false; b * hq * n];
    let mut dk = vec![false; b * hkv * n];
    let mut dv = vec![false; b * hkv * n];
    for bi in 0..b {
        for h in 0..hq {
            let kh = bi * hkv + h / group;
            for i in 0..n {
                let row = (bi * hq + h) * n + i;
                let own = bad_row(q, row, d) || bad_row(dout, row, d);
                let keys = (0..n).filter(|&j| allowed(i, j));
                let bad_k = keys.clone().any(|j| bad_row(k, kh * n + j, d));
                let bad_v = keys.clone().any(|j| bad_row(v, kh * n + j, d));
                dq[row] = own || bad_k || bad_v;
                for j in keys {
                    dk[kh * n + j] |= dq[row];
                    dv[kh * n + j] |= own || bad_k;
                }
            }
        }
    }
    Reach { dq, dk, dv }
}

/// `x` with every non-finite entry replaced by 0, as f64.
pub fn cleaned(x: &[f32]) -> Vec<f64> {
    x.iter()
        .map(|&v| if v.is_finite() { v as f64 } else { 0.0 })
        .collect()
}

/// Gradients `(dq, dk, dv)` of `sum(dout * softmax(scale q k^T | allowed) v)`
/// in f64, each row's softmax over exactly its allowed keys. Rows with no
/// allowed key output 0 and have zero gradients.
#[allow(clippy::too_many_arguments)]
pub fn grads(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    (b, hq, hkv, n, d): Dims,
    scale: f64,
    allowed: &dyn Fn(usize, usize) -> bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let group = hq / hkv;
    let mut dq = vec![0f64; b * hq * n * d];
    let mut dk = vec![0f64; b * hkv * n * d];
    let mut dv = vec![0f64; b * hkv * n * d];
    let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>();
    for bi in 0..b {
        for h in 0..hq {
            let kh = bi * hkv + h / group;
            for i in 0..n {
                let row = (bi * hq + h) * n + i;
                let qi = &q[row * d..(row + 1) * d];
                let gi = &dout[row * d..(row + 1) * d];
                let keys: Vec<usize> = (0..n).filter(|&j| allowed(i, j)).collect();
                if keys.is_empty() {
                    continue;
                }
                let kr = |j: usize| (kh * n + j) * d..(kh * n + j + 1) * d;
                let s: Vec<f64> = keys.iter().map(|&j| scale * dot(qi, &k[kr(j)])).collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let l: f64 = e.iter().sum();
                let p: Vec<f64> = e.iter().map(|x| x / l).collect();
                // dP_j = dO_i . v_j; D = sum_j P_j dP_j; dS_j = P_j (dP_j - D).
                let dp: Vec<f64> = keys.iter().map(|&j| dot(gi, &v[kr(j)])).collect();
                let delta: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for (x, &j) in keys.iter().enumerate() {
                    let ds = p[x] * (dp[x] - delta);
                    for c in 0..d {
                        dq[row * d + c] += scale * ds * k[kr(j)][c];
                        dk[kr(j)][c] += scale * ds * qi[c];
                        dv[kr(j)][c] += p[x] * gi[c];
                    }
                }
            }
        }
    }
    (dq, dk, dv)
}

/// Every row not in `reach` equals `want` within `tol` times the largest
/// `|want|` of the tensor (at least 1); returns how many rows were compared,
/// or the first mismatch.
pub fn compare(
    name: &str,
    got: &[f64],
    want: &[f64],
    reach: &[bool],
    d: usize,
    tol: f64,
) -> Result<usize, String> {
    let top = want.iter().fold(1f64, |m, x| m.max(x.abs()));
    let mut compared = 0;
    for (row, _) in reach.iter().enumerate().filter(|(_, r)| !**r) {
        compared += 1;
        for c in 0..d {
            let (g, w) = (got[row * d + c], want[row * d + c]);
            // Bound first: a NaN comparison is false, so NaN fails.
            let close = (g - w).abs() <= tol * top;
            if !close {
                return Err(format!("{name} row {row} col {c}: got {g}, want {w}"));
            }
        }
    }
    Ok(compared)
}
