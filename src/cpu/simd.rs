//! Row-wise softmax work of a score tile (forward and backward) and the
//! vector helpers of the direct summary-query paths, vectorized by the
//! compiler under the process's [`CpuIsa`] (the crate is built for baseline
//! x86-64, so without this the exponentials would run 4 lanes wide at best).

use super::isa::CpuIsa;
use super::Element;

/// Defines `pub(crate) fn $name(isa, args)` (or `$name<T: Bound>`) that runs
/// `$body` (an `#[inline(always)]` function) compiled for AVX-512, for AVX2 +
/// FMA or for baseline x86-64, as `isa` (checked supported by the caller) says.
/// Also used by `decode.rs` (`pub(crate) use`).
macro_rules! dispatch {
    ($(#[$doc:meta])* $name:ident => $body:ident($($arg:ident: $ty:ty),* $(,)?)) => {
        dispatch! { $(#[$doc])* $name<> => $body($($arg: $ty),*) }
    };
    ($(#[$doc:meta])* $name:ident<$($t:ident: $bound:path)?> => $body:ident($($arg:ident: $ty:ty),* $(,)?)) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn $name$(<$t: $bound>)?(isa: CpuIsa, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512$(<$t: $bound>)?($($arg: $ty),*) {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2$(<$t: $bound>)?($($arg: $ty),*) {
                    $body($($arg),*)
                }
                match isa {
                    // SAFETY: the caller checked that the CPU supports `isa`
                    // (`CpuIsa::supported`).
                    CpuIsa::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    CpuIsa::Avx2 => return unsafe { avx2($($arg),*) },
                    CpuIsa::Portable => {}
                }
            }
            let _ = isa;
            $body($($arg),*)
        }
    };
}

pub(crate) use dispatch;

dispatch! {
    /// Online-softmax update of one score tile, in place.
    ///
    /// `s` holds `m.len()` rows of `stride` scores each, already in log2 units
    /// (scale times `log2(e)` folded into the queries); only the first `len`
    /// columns are live. Row `r` may see columns `bounds[r].0..bounds[r].1`.
    /// On return the row holds `2^(s - m_new)` inside its bounds and 0 outside
    /// (the weights the P*V product needs), `m` and `l` are the running max and
    /// sum, and the row of `o` (`d` wide) is rescaled to the new max.
    softmax_update => softmax_update_impl(
        s: &mut [f32],
        stride: usize,
        len: usize,
        bounds: &[(usize, usize)],
        m: &mut [f32],
        l: &mut [f32],
        o: &mut [f32],
        d: usize,
    )
}

dispatch! {
    /// The backward's softmax step of one tile, in place: `s` holds raw
    /// scores `q.k` and `dp` holds `dO.v` (rows of `stride`, `len` live
    /// columns). Inside row `r`'s bounds, `s` becomes the probability
    /// `P = 2^(factor * s - lse2[r])` (`factor` = scale * log2(e), `lse2` the
    /// forward's log-sum-exp in log2 units) and `dp` becomes
    /// `dS = P * (dp - delta[r])`; outside both are 0, so the tile products
    /// that follow need no mask.
    softmax_grad => softmax_grad_impl(
        s: &mut [f32],
        dp: &mut [f32],
        stride: usize,
        len: usize,
        bounds: &[(usize, usize)],
        lse2: &[f32],
        delta: &[f32],
        factor: f32,
    )
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn softmax_grad_impl(
    s: &mut [f32],
    dp: &mut [f32],
    stride: usize,
    len: usize,
    bounds: &[(usize, usize)],
    lse2: &[f32],
    delta: &[f32],
    factor: f32,
) {
    for (r, &(a, b)) in bounds.iter().enumerate() {
        let p = &mut s[r * stride..r * stride + len];
        let g = &mut dp[r * stride..r * stride + len];
        let b = b.max(a);
        for row in [&mut *p, &mut *g] {
            row[..a].fill(0.0);
            row[b..].fill(0.0);
        }
        let (shift, dr) = (lse2[r], delta[r]);
        for (x, y) in p[a..b].iter_mut().zip(&mut g[a..b]) {
            *x = exp2(*x * factor - shift);
            *y = *x * (*y - dr);
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn softmax_update_impl(
    s: &mut [f32],
    stride: usize,
    len: usize,
    bounds: &[(usize, usize)],
    m: &mut [f32],
    l: &mut [f32],
    o: &mut [f32],
    d: usize,
) {
    for (r, &(a, b)) in bounds.iter().enumerate() {
        let row = &mut s[r * stride..r * stride + len];
        if a >= b {
            // No key of this tile is visible to the row: it adds nothing.
            row.fill(0.0);
            continue;
        }
        row[..a].fill(0.0);
        row[b..].fill(0.0);
        let seg = &mut row[a..b];
        let m_new = m[r].max(row_max(seg));
        let sum = exp2_shift_sum(seg, m_new);
        // The first visit has m = -inf and alpha = 0: nothing to rescale.
        let alpha = exp2(m[r] - m_new);
        l[r] = l[r] * alpha + sum;
        if alpha != 1.0 {
            for x in &mut o[r * d..(r + 1) * d] {
                *x *= alpha;
            }
        }
        m[r] = m_new;
    }
}

const LANES: usize = 16;

#[inline(always)]
fn row_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            // A compare-select (not f32::max) so it compiles to one vmaxps.
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut best = f32::NEG_INFINITY;
    for &v in acc.iter().chain(rest) {
        best = if v > best { v } else { best };
    }
    best
}

/// `x = 2^(x - shift)` elementwise; returns the sum.
#[inline(always)]
fn exp2_shift_sum(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] = exp2(c[i] - shift);
            acc[i] += c[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp2(*v - shift);
        sum += *v;
    }
    sum
}

/// `2^x` for `x <= 0` (relative error about 2e-7; 0 below `2^-126`), in
/// branch-free arithmetic the compiler vectorizes.
#[inline(always)]
pub(crate) fn exp2(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer kept in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = if x > -127.0 { x } else { -127.0 };
    let shifted = x + MAGIC;
    let f = x - (shifted - MAGIC); // in [-0.5, 0.5]
    let n = shifted.to_bits() as i32 - MAGIC.to_bits() as i32; // round(x) in [-127, 0]
                                                               // 2^f = e^(f ln 2), Taylor to degree 6: error below 2e-7 on [-0.5, 0.5].
    let p = 1.0
        + f * (std::f32::consts::LN_2
            + f * (0.240_226_5
                + f * (0.055_504_11
                    + f * (0.009_618_129 + f * (0.001_333_355_8 + f * 0.000_154_035_3)))));
    // n = -127 gives a zero exponent field: exactly 0.
    f32::from_bits(((n + 127) << 23) as u32) * p
}

/// `a . b` (inlined, so it vectorizes for the caller's target features).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_wide(a, b)
}

/// `a . b` with `b` widened to f32 element by element ([`Element::to_f32`]:
/// nothing for f32, a shift for bf16 inside the same loop).
#[inline(always)]
pub(crate) fn dot_wide<T: Element>(a: &[f32], b: &[T]) -> f32 {
    // Eight independent sums so the compiler can vectorize the reduction.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y.to_f32())
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i].to_f32();
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += a * x` with `x` widened element by element, like [`dot_wide`].
#[inline(always)]
pub(crate) fn axpy_wide<T: Element>(a: f32, x: &[T], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x.to_f32();
    }
}

/// `y += a * x` (inlined, so it vectorizes for the caller's target features).
#[inline(always)]
pub(crate) fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    axpy_wide(a, x, y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp2_is_accurate() {
        let mut x = 0.0f32;
        while x > -130.0 {
            let want = (x as f64).exp2();
            let got = exp2(x) as f64;
            if x > -126.0 {
                assert!(
                    ((got - want) / want).abs() < 5e-7,
                    "x={x} got={got} want={want}"
                );
            } else {
                assert!(got <= 2.0 * want + 1e-38, "x={x}");
            }
            x -= 0.013;
        }
        assert_eq!(exp2(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp2(0.0), 1.0);
    }

    #[test]
    fn update_matches_scalar_softmax() {
        let (rows, stride, len, d) = (3, 40, 37, 5);
        let mut s: Vec<f32> = (0..rows * stride)
            .map(|i| ((i * 7919) % 97) as f32 / 13.0)
            .collect();
        let orig = s.clone();
        let bounds = [(0, 37), (3, 20), (5, 5)];
        let (mut m, mut l) = (vec![f32::NEG_INFINITY; rows], vec![0.0; rows]);
        let mut o = vec![1.0; rows * d];
        let isa = *CpuIsa::available().first().unwrap();
        softmax_update(isa, &mut s, stride, len, &bounds, &mut m, &mut l, &mut o, d);
        for (r, &(a, b)) in bounds.iter().enumerate() {
            let seg = &orig[r * stride + a..r * stride + b];
            let mx = seg.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = seg.iter().map(|&v| ((v - mx) as f64).exp2()).sum();
            assert_eq!(m[r], mx);
            assert!((l[r] as f64 - sum).abs() < 1e-5 * sum.max(1.0));
            for c in 0..len {
                let p = s[r * stride + c];
                if (a..b).contains(&c) {
                    let want = ((orig[r * stride + c] - mx) as f64).exp2();
                    assert!((p as f64 - want).abs() < 1e-6);
                } else {
                    assert_eq!(p, 0.0);
                }
            }
        }
    }
}
