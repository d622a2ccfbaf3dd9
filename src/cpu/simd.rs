//! Row-wise softmax work of a score tile (forward and backward) and the
//! vector helpers of the direct summary-query paths, vectorized by the
//! compiler under the process's [`CpuIsa`] (the crate is built for baseline
//! x86-64, so without this the exponentials would run 4 lanes wide at best).

use super::isa::CpuIsa;
use super::Element;

/// How a body multiplies and adds: [`Fused`] (one FMA instruction) in the
/// variants that have FMA, [`Unfused`] in the baseline one, where `mul_add`
/// would be a call into libm. Rust never contracts `a * b + c` on its own.
pub(crate) trait Arith {
    /// `a * b + c`.
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// `a * b + c` in one rounding (the AVX-512 and AVX2 + FMA variants).
pub(crate) struct Fused;

impl Arith for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// `a * b + c` as two instructions (baseline x86-64 and other targets).
pub(crate) struct Unfused;

impl Arith for Unfused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// Defines `pub(crate) fn $name(isa, args)` (or `$name<T: Bound>`) that runs
/// `$body::<A>` (an `#[inline(always)]` function generic over its [`Arith`]
/// `A`, then optionally `T`) compiled for AVX-512, for AVX2 + FMA (both with
/// `A` = [`Fused`]) or for baseline x86-64 ([`Unfused`]), as `isa` (checked
/// supported by the caller) says. Also used by `decode.rs` (`pub(crate) use`).
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
                use $crate::cpu::simd::Fused;
                #[target_feature(enable = "avx512f,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512$(<$t: $bound>)?($($arg: $ty),*) {
                    $body::<Fused $(, $t)?>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2$(<$t: $bound>)?($($arg: $ty),*) {
                    $body::<Fused $(, $t)?>($($arg),*)
                }
                match isa {
                    // SAFETY: the caller checked that the CPU supports `isa`
                    // (`CpuIsa::supported`).
                    CpuIsa::Avx512 | CpuIsa::Avx512Bf16 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    CpuIsa::Avx2 => return unsafe { avx2($($arg),*) },
                    CpuIsa::Portable => {}
                }
            }
            let _ = isa;
            $body::<$crate::cpu::simd::Unfused $(, $t)?>($($arg),*)
        }
    };
}

pub(crate) use dispatch;

dispatch! {
    /// Online-softmax update of one key-major score tile, in place (the
    /// forward's text tiles: no lane reductions, every operation runs down
    /// the columns).
    ///
    /// `s` holds `keys` rows of `stride` scores, column `r` for query row `r`
    /// (`m.len()` of them; columns up to the next multiple of 16 may be
    /// written), in log2 units once multiplied by `factor` (1 when the
    /// queries carry the scale already). Row `r` may see keys
    /// `bounds[r].0..bounds[r].1`: all of them when `full`, and then `bounds`
    /// is not read. On return column `r` holds `2^(s - m_new)` for the keys
    /// the row may see and 0 for the others (a select: a masked key's score
    /// never reaches the row), `m` and `l` are the running max and sum, and
    /// row `r` of `o` (`d` wide) is rescaled to the new max.
    softmax_update_key_major => softmax_key_major_impl(
        s: &mut [f32],
        stride: usize,
        keys: usize,
        bounds: &[(usize, usize)],
        full: bool,
        factor: f32,
        m: &mut [f32],
        l: &mut [f32],
        o: &mut [f32],
        d: usize,
    )
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn softmax_key_major_impl<A: Arith>(
    s: &mut [f32],
    stride: usize,
    keys: usize,
    bounds: &[(usize, usize)],
    full: bool,
    factor: f32,
    m: &mut [f32],
    l: &mut [f32],
    o: &mut [f32],
    d: usize,
) {
    let rows = m.len();
    debug_assert!(stride >= rows.div_ceil(LANES) * LANES && s.len() >= keys * stride);
    let tile = KeyMajorTile {
        stride,
        keys,
        bounds,
        factor,
    };
    // Columns in groups of four vectors: each pass over a group reads 256
    // contiguous bytes of every key row (one vector of columns per pass
    // walked 128 rows for 64 bytes each, a miss per row), and the group's
    // maxima and sums stay in registers. The stride is padded to whole
    // vectors, not groups: the last columns go one vector at a time.
    let mut r0 = 0;
    while r0 < rows {
        let (out, args) = (&mut *s, (&mut *m, &mut *l, &mut *o, d));
        r0 += match (rows - r0 >= 4 * LANES, full) {
            (true, true) => tile.columns::<A, { 4 * LANES }, true>(out, r0, args),
            (true, false) => tile.columns::<A, { 4 * LANES }, false>(out, r0, args),
            (false, true) => tile.columns::<A, LANES, true>(out, r0, args),
            (false, false) => tile.columns::<A, LANES, false>(out, r0, args),
        };
    }
}

/// The shared arguments of [`softmax_update_key_major`].
struct KeyMajorTile<'a> {
    stride: usize,
    keys: usize,
    bounds: &'a [(usize, usize)],
    factor: f32,
}

impl KeyMajorTile<'_> {
    /// The update of columns `r0..r0 + W` (those of them below `m.len()`
    /// live), with every key visible when `FULL`; returns `W`. One pass
    /// finds the maxima (scores scaled in registers, masked keys skipped),
    /// the next writes the probabilities and sums them.
    #[inline(always)]
    fn columns<A: Arith, const W: usize, const FULL: bool>(
        &self,
        s: &mut [f32],
        r0: usize,
        (m, l, o, d): (&mut [f32], &mut [f32], &mut [f32], usize),
    ) -> usize {
        let (factor, stride) = (self.factor, self.stride);
        let live = (m.len() - r0).min(W);
        let (mut lo, mut hi) = ([0i32; W], [0i32; W]);
        if !FULL {
            for (i, &(a, b)) in self.bounds[r0..r0 + live].iter().enumerate() {
                // Tile-relative, so at most the key tile size.
                (lo[i], hi[i]) = (a as i32, b as i32);
            }
        }
        let visible = |i: usize, key: i32| FULL || (lo[i] <= key && key < hi[i]);
        let mut mx = [f32::NEG_INFINITY; W];
        for j in 0..self.keys {
            let row: &[f32; W] = s[j * stride + r0..][..W].try_into().expect("W floats");
            for i in 0..W {
                let x = if visible(i, j as i32) {
                    row[i] * factor
                } else {
                    f32::NEG_INFINITY
                };
                mx[i] = max_of(x, mx[i]);
            }
        }
        let (mut m_new, mut neg, mut sum) = ([0f32; W], [0f32; W], [0f32; W]);
        let mut m_old = [f32::NEG_INFINITY; W];
        m_old[..live].copy_from_slice(&m[r0..r0 + live]);
        for i in 0..W {
            m_new[i] = max_of(mx[i], m_old[i]);
            neg[i] = -m_new[i];
        }
        for j in 0..self.keys {
            let row: &mut [f32; W] = (&mut s[j * stride + r0..][..W])
                .try_into()
                .expect("W floats");
            for i in 0..W {
                // A column that sees nothing yet has m_new = -inf: the
                // exponent is NaN (or +inf), and the select makes it 0; a
                // masked key's score never reaches the row.
                let p = exp2_with::<A>(A::mul_add(row[i], factor, neg[i]));
                row[i] = if visible(i, j as i32) { p } else { 0.0 };
                sum[i] += row[i];
            }
        }
        for i in 0..live {
            let r = r0 + i;
            // The first visit has m = -inf and alpha = 0: nothing to rescale.
            let alpha = exp2_with::<A>(m_old[i] - m_new[i]);
            l[r] = A::mul_add(l[r], alpha, sum[i]);
            m[r] = m_new[i];
            if alpha != 1.0 {
                for x in &mut o[r * d..(r + 1) * d] {
                    *x *= alpha;
                }
            }
        }
        W
    }
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
fn softmax_grad_impl<A: Arith>(
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
            *x = exp2_with::<A>(A::mul_add(*x, factor, -shift));
            *y = *x * (*y - dr);
        }
    }
}

const LANES: usize = 16;

/// The lanes of `v` folded pairwise with `f` (a tree: four dependent steps
/// instead of a chain of fifteen).
#[inline(always)]
fn fold_lanes(mut v: [f32; LANES], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            v[i] = f(v[i], v[i + width]);
        }
        width /= 2;
    }
    v[0]
}

/// A compare-select (not `f32::max`) so it compiles to one `vmaxps`.
#[inline(always)]
fn max_of(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// Whether every element of `x` is finite (no NaN, no infinity). One OR
/// over the exponent fields, which vectorizes at any instruction-set level
/// (a short-circuiting `all(is_finite)` does not): an all-ones exponent plus
/// one carries into the sign bit.
pub(crate) fn all_finite(x: &[f32]) -> bool {
    let carry = x.iter().fold(0u32, |acc, v| {
        acc | (v.to_bits() & 0x7f80_0000).wrapping_add(0x0080_0000)
    });
    carry & 0x8000_0000 == 0
}

/// [`all_finite`] for 16-bit floats given as bit patterns, with `exponent`
/// the mask of their exponent field (f16 `0x7c00`, bf16 `0x7f80`).
pub(crate) fn all_finite_bits(x: &[u16], exponent: u16) -> bool {
    let one = exponent & exponent.wrapping_neg();
    let carry = x
        .iter()
        .fold(0u16, |acc, b| acc | (b & exponent).wrapping_add(one));
    carry & 0x8000 == 0
}

/// `2^x` for `x <= 0` (relative error about 2e-7; 0 below `2^-126`), in
/// branch-free arithmetic the compiler vectorizes.
#[inline(always)]
pub(crate) fn exp2(x: f32) -> f32 {
    exp2_with::<Unfused>(x)
}

/// [`exp2`] with the polynomial's multiply-adds as `A` does them.
#[inline(always)]
fn exp2_with<A: Arith>(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer kept in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = if x > -127.0 { x } else { -127.0 };
    let shifted = x + MAGIC;
    let f = x - (shifted - MAGIC); // in [-0.5, 0.5]
    let n = shifted.to_bits() as i32 - MAGIC.to_bits() as i32; // round(x) in [-127, 0]
                                                               // 2^f on [-0.5, 0.5]: 1 + f q(f), q of degree 4 fitted for relative
                                                               // error (reweighted least squares, near minimax): 1.9e-7 in f32 Horner,
                                                               // as accurate as the degree-6 Taylor series it replaced and one FMA
                                                               // shorter; exactly 1 at f = 0.
    let mut q = 0.001_326_472_7;
    for c in [
        0.009_671_513,
        0.055_507_336,
        0.240_222_42,
        std::f32::consts::LN_2,
    ] {
        q = A::mul_add(q, f, c);
    }
    let p = A::mul_add(q, f, 1.0);
    // n = -127 gives a zero exponent field: exactly 0.
    f32::from_bits(((n + 127) << 23) as u32) * p
}

/// `a . b` (inlined, so it vectorizes for the caller's target features).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_wide::<Unfused, f32>(a, b)
}

/// `a . b` with `b` widened to f32 element by element ([`Element::to_f32`]:
/// nothing for f32, a shift for bf16 inside the same loop).
#[inline(always)]
pub(crate) fn dot_wide<A: Arith, T: Element>(a: &[f32], b: &[T]) -> f32 {
    // Two vectors of independent sums (four with AVX2) so consecutive
    // multiply-adds do not wait for each other.
    const WIDE: usize = 2 * LANES;
    let mut acc = [0f32; WIDE];
    let (ca, cb) = (a.chunks_exact(WIDE), b.chunks_exact(WIDE));
    let tail = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .fold(0.0, |s, (x, y)| A::mul_add(*x, y.to_f32(), s));
    for (x, y) in ca.zip(cb) {
        for i in 0..WIDE {
            acc[i] = A::mul_add(x[i], y[i].to_f32(), acc[i]);
        }
    }
    let mut half = [0f32; LANES];
    for i in 0..LANES {
        half[i] = acc[i] + acc[i + LANES];
    }
    fold_lanes(half, |a, b| a + b) + tail
}

/// `y += a * x` with `x` widened element by element, like [`dot_wide`].
#[inline(always)]
pub(crate) fn axpy_wide<A: Arith, T: Element>(a: f32, x: &[T], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = A::mul_add(a, x.to_f32(), *y);
    }
}

/// `y += a * x` (inlined, so it vectorizes for the caller's target features).
#[inline(always)]
pub(crate) fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    axpy_wide::<Unfused, f32>(a, x, y)
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

    /// Two key-major updates (an edge tile, then a full one) on every
    /// variant, against a plain f64 softmax of the union: the running max
    /// and sum, the probabilities (0 at masked keys, even where the score is
    /// NaN), and the output rows rescaled by the second tile.
    #[test]
    fn key_major_update_matches_scalar_softmax() {
        let (rows, keys, d) = (19, 37, 5);
        let stride = 32 + 16;
        let score =
            |t: usize, j: usize, r: usize| ((t * 31 + j * 7919 + r * 104729) % 97) as f32 / 13.0;
        let mut bounds: Vec<(usize, usize)> =
            (0..rows).map(|r| (r % 5, (3 * r + 2).min(keys))).collect();
        bounds[7] = (4, 4); // sees nothing of the first tile
        for isa in CpuIsa::available() {
            let (mut m, mut l) = (vec![f32::NEG_INFINITY; rows], vec![0.0; rows]);
            let mut o = vec![0.0; rows * d];
            let mut want_o = vec![0.0f64; rows * d];
            for (t, full) in [(0, false), (1, true)] {
                let mut s = vec![0.0f32; keys * stride];
                for j in 0..keys {
                    for r in 0..rows {
                        s[j * stride + r] = score(t, j, r);
                    }
                }
                if !full {
                    s[(keys - 1) * stride + 2] = f32::NAN; // masked for row 2
                }
                let m_old = m.clone();
                softmax_update_key_major(
                    isa, &mut s, stride, keys, &bounds, full, 1.0, &mut m, &mut l, &mut o, d,
                );
                for r in 0..rows {
                    let (a, b) = if full { (0, keys) } else { bounds[r] };
                    let mx = (a..b).map(|j| score(t, j, r)).fold(m_old[r], f32::max);
                    assert_eq!(m[r], mx, "{isa} tile {t} row {r}");
                    for j in 0..keys {
                        let p = s[j * stride + r] as f64;
                        if (a..b).contains(&j) {
                            let want = ((score(t, j, r) - mx) as f64).exp2();
                            assert!((p - want).abs() < 1e-6, "{isa} tile {t} p[{j}, {r}]");
                        } else {
                            assert_eq!(p, 0.0, "{isa} tile {t} masked p[{j}, {r}]");
                        }
                    }
                    let alpha = ((m_old[r] - mx) as f64).exp2();
                    for c in 0..d {
                        // Stand-in for the value product between the updates.
                        want_o[r * d + c] = if t == 0 {
                            (r + c) as f64
                        } else {
                            want_o[r * d + c] * alpha
                        };
                    }
                }
                if t == 0 {
                    for (i, x) in o.iter_mut().enumerate() {
                        *x = want_o[i] as f32;
                    }
                }
            }
            for r in 0..rows {
                let m0 = if bounds[r].0 < bounds[r].1 {
                    (bounds[r].0..bounds[r].1)
                        .map(|j| score(0, j, r))
                        .fold(f32::NEG_INFINITY, f32::max)
                } else {
                    f32::NEG_INFINITY
                };
                let mx = (0..keys).map(|j| score(1, j, r)).fold(m0, f32::max) as f64;
                let sum: f64 = (bounds[r].0..bounds[r].1)
                    .map(|j| (score(0, j, r) as f64 - mx).exp2())
                    .chain((0..keys).map(|j| (score(1, j, r) as f64 - mx).exp2()))
                    .sum();
                assert!((l[r] as f64 - sum).abs() < 1e-5 * sum, "{isa} l[{r}]");
                for c in 0..d {
                    assert!(
                        (o[r * d + c] as f64 - want_o[r * d + c]).abs()
                            < 1e-5 * (1.0 + want_o[r * d + c].abs()),
                        "{isa} o[{r}, {c}]"
                    );
                }
            }
        }
    }
}
