//! Scalar semantics of the ALU instructions: each decoded ALU instruction holds a plain
//! `fn(u64, u64, u64) -> u64` picked here at decode time, so execution does no string or
//! modifier interpretation. Registers hold their value in the low bits of a `u64`;
//! every function reads only the bits of its type and returns a zero-extended result.

use half::{bf16, f16};

use crate::ir::{AtomOp, AtomTy, CvtSpec, NumTy, Rnd};

/// Operands and results of one ALU instruction for the 32 lanes of a warp.
pub(crate) struct Lanes {
    pub a: [u64; 32],
    pub b: [u64; 32],
    pub c: [u64; 32],
    pub d: [u64; 32],
}

/// A three-source ALU operation applied to all 32 lanes at once (one indirect call per
/// warp instruction; the scalar operation is inlined into the lane loop). Inactive lanes
/// compute garbage that is never written back: every operation is pure and panic-free.
pub(crate) type F3 = fn(&mut Lanes);

/// Lifts a scalar `fn(u64, u64, u64) -> u64` expression (a path or a non-capturing
/// closure) to an [`F3`].
macro_rules! batch {
    ($f:expr) => {{
        fn lanes_(x: &mut $crate::ops::Lanes) {
            let f = $f;
            for l in 0..32 {
                x.d[l] = f(x.a[l], x.b[l], x.c[l]);
            }
        }
        lanes_ as $crate::ops::F3
    }};
}
pub(crate) use batch;
/// A comparison on raw register bits.
pub(crate) type Cmp = fn(u64, u64) -> bool;

/// Low `W` bits of `x`.
#[inline(always)]
pub(crate) fn m<const W: u32>(x: u64) -> u64 {
    if W >= 64 {
        x
    } else {
        x & ((1u64 << W) - 1)
    }
}

/// The low `W` bits of `x`, sign-extended.
#[inline(always)]
pub(crate) fn s<const W: u32>(x: u64) -> i64 {
    if W >= 64 {
        x as i64
    } else {
        ((x << (64 - W)) as i64) >> (64 - W)
    }
}

/// Flushes an f32 subnormal to a zero of the same sign (`.ftz`).
#[inline(always)]
pub(crate) fn flush(x: f32) -> f32 {
    if x.is_subnormal() {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

/// `.sat` for floats: clamps to [0, 1], NaN becomes +0.
#[inline(always)]
pub(crate) fn sat(x: f32) -> f32 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(0.0, 1.0)
    }
}

/// PTX `min.f32`: NaN inputs are ignored unless both are NaN (then canonical NaN);
/// `-0.0` is smaller than `+0.0`.
#[inline(always)]
pub(crate) fn fmin(a: f32, b: f32) -> f32 {
    if a.is_nan() && b.is_nan() {
        f32::from_bits(0x7FFF_FFFF)
    } else if a.is_nan() {
        b
    } else if b.is_nan() {
        a
    } else if a == b {
        if a.is_sign_negative() {
            a
        } else {
            b
        }
    } else if a < b {
        a
    } else {
        b
    }
}

/// PTX `max.f32` (see [`fmin`]); `+0.0` is larger than `-0.0`.
#[inline(always)]
pub(crate) fn fmax(a: f32, b: f32) -> f32 {
    if a.is_nan() && b.is_nan() {
        f32::from_bits(0x7FFF_FFFF)
    } else if a.is_nan() {
        b
    } else if b.is_nan() {
        a
    } else if a == b {
        if a.is_sign_positive() {
            a
        } else {
            b
        }
    } else if a > b {
        a
    } else {
        b
    }
}

/// `.NaN` variants of min/max: any NaN input gives the canonical NaN.
#[inline(always)]
pub(crate) fn fmin_nan(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::from_bits(0x7FFF_FFFF)
    } else {
        fmin(a, b)
    }
}
#[inline(always)]
pub(crate) fn fmax_nan(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::from_bits(0x7FFF_FFFF)
    } else {
        fmax(a, b)
    }
}

#[inline(always)]
pub(crate) fn f32_of(x: u64) -> f32 {
    f32::from_bits(x as u32)
}
#[inline(always)]
pub(crate) fn bits32(x: f32) -> u64 {
    x.to_bits() as u64
}

/// Builds the four `.ftz`/`.sat` variants of an f32 operation and picks one.
macro_rules! f32_fn {
    ($ftz:expr, $sat:expr, |$x:ident, $y:ident, $z:ident| $body:expr) => {{
        #[allow(unused_variables)]
        fn f_plain_(a: u64, b: u64, c: u64) -> u64 {
            let ($x, $y, $z) = (
                $crate::ops::f32_of(a),
                $crate::ops::f32_of(b),
                $crate::ops::f32_of(c),
            );
            $crate::ops::bits32($body)
        }
        #[allow(unused_variables)]
        fn f_ftz_(a: u64, b: u64, c: u64) -> u64 {
            use $crate::ops::flush;
            let ($x, $y, $z) = (
                flush($crate::ops::f32_of(a)),
                flush($crate::ops::f32_of(b)),
                flush($crate::ops::f32_of(c)),
            );
            $crate::ops::bits32(flush($body))
        }
        #[allow(unused_variables)]
        fn f_sat_(a: u64, b: u64, c: u64) -> u64 {
            let ($x, $y, $z) = (
                $crate::ops::f32_of(a),
                $crate::ops::f32_of(b),
                $crate::ops::f32_of(c),
            );
            $crate::ops::bits32($crate::ops::sat($body))
        }
        #[allow(unused_variables)]
        fn f_ftz_sat_(a: u64, b: u64, c: u64) -> u64 {
            use $crate::ops::flush;
            let ($x, $y, $z) = (
                flush($crate::ops::f32_of(a)),
                flush($crate::ops::f32_of(b)),
                flush($crate::ops::f32_of(c)),
            );
            $crate::ops::bits32($crate::ops::sat(flush($body)))
        }
        let f: $crate::ops::F3 = match ($ftz, $sat) {
            (false, false) => $crate::ops::batch!(f_plain_),
            (true, false) => $crate::ops::batch!(f_ftz_),
            (false, true) => $crate::ops::batch!(f_sat_),
            (true, true) => $crate::ops::batch!(f_ftz_sat_),
        };
        f
    }};
}
pub(crate) use f32_fn;

/// An f64 operation.
macro_rules! f64_fn {
    (|$x:ident, $y:ident, $z:ident| $body:expr) => {{
        #[allow(unused_variables)]
        fn f(a: u64, b: u64, c: u64) -> u64 {
            let ($x, $y, $z) = (f64::from_bits(a), f64::from_bits(b), f64::from_bits(c));
            let r: f64 = $body;
            r.to_bits()
        }
        $crate::ops::batch!(f)
    }};
}
pub(crate) use f64_fn;

/// A half-precision operation (scalar `.f16`/`.bf16` or packed `x2`), computed in f64 and
/// rounded once to the 16-bit format (exact for add/sub/mul/fma: the f64 result of one
/// operation on 16-bit inputs is either exact or rounds innocuously).
macro_rules! h_fn {
    ($kind:ident, $packed:expr, |$x:ident, $y:ident, $z:ident| $body:expr) => {{
        #[allow(unused_variables)]
        fn h_one_(a: u64, b: u64, c: u64) -> u64 {
            let ($x, $y, $z) = (
                $crate::ops::$kind::to(a),
                $crate::ops::$kind::to(b),
                $crate::ops::$kind::to(c),
            );
            $crate::ops::$kind::from($body)
        }
        fn h_two_(a: u64, b: u64, c: u64) -> u64 {
            h_one_(a & 0xFFFF, b & 0xFFFF, c & 0xFFFF)
                | (h_one_(a >> 16 & 0xFFFF, b >> 16 & 0xFFFF, c >> 16 & 0xFFFF) << 16)
        }
        let f: $crate::ops::F3 = if $packed {
            $crate::ops::batch!(h_two_)
        } else {
            $crate::ops::batch!(h_one_)
        };
        f
    }};
}
pub(crate) use h_fn;

/// f16 bit conversions.
pub(crate) mod hf {
    use super::f16;
    #[inline(always)]
    pub(crate) fn to(x: u64) -> f64 {
        f16::from_bits(x as u16).to_f64()
    }
    #[inline(always)]
    pub(crate) fn from(x: f64) -> u64 {
        f16::from_f64(x).to_bits() as u64
    }
}
/// bf16 bit conversions.
pub(crate) mod bf {
    use super::bf16;
    #[inline(always)]
    pub(crate) fn to(x: u64) -> f64 {
        bf16::from_bits(x as u16).to_f64()
    }
    #[inline(always)]
    pub(crate) fn from(x: f64) -> u64 {
        bf16::from_f64(x).to_bits() as u64
    }
}

/// f32 -> bf16 with round-to-nearest-even (NaN stays NaN), as `cvt.rn.bf16.f32`.
#[inline(always)]
pub(crate) fn f32_to_bf16(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}
/// f32 -> f16 with round-to-nearest-even, as `cvt.rn.f16.f32`.
#[inline(always)]
pub(crate) fn f32_to_f16(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

/// Integer comparison codes.
pub(crate) const EQ: u8 = 0;
pub(crate) const NE: u8 = 1;
pub(crate) const LT: u8 = 2;
pub(crate) const LE: u8 = 3;
pub(crate) const GT: u8 = 4;
pub(crate) const GE: u8 = 5;
/// Unordered float variants (`equ`...`geu`) are the ordered code + 8; `num`/`nan` are 16/17.
pub(crate) const UNORD: u8 = 8;
pub(crate) const NUM: u8 = 16;
pub(crate) const NAN: u8 = 17;

#[inline(always)]
fn ord_cmp<T: PartialOrd>(c: u8, a: T, b: T) -> bool {
    match c {
        EQ => a == b,
        NE => a != b,
        LT => a < b,
        LE => a <= b,
        GT => a > b,
        _ => a >= b,
    }
}

/// Signed integer compare of width `W`.
pub(crate) fn icmp_s<const C: u8, const W: u32>(a: u64, b: u64) -> bool {
    ord_cmp(C, s::<W>(a), s::<W>(b))
}
/// Unsigned (or bit) compare of width `W`.
pub(crate) fn icmp_u<const C: u8, const W: u32>(a: u64, b: u64) -> bool {
    ord_cmp(C, m::<W>(a), m::<W>(b))
}
/// f32 compare; code per the constants above.
pub(crate) fn fcmp32<const C: u8, const FTZ: bool>(a: u64, b: u64) -> bool {
    let (mut x, mut y) = (f32_of(a), f32_of(b));
    if FTZ {
        x = flush(x);
        y = flush(y);
    }
    fcmp(C, x as f64, y as f64)
}
/// f64 compare.
pub(crate) fn fcmp64<const C: u8>(a: u64, b: u64) -> bool {
    fcmp(C, f64::from_bits(a), f64::from_bits(b))
}
/// f16 / bf16 scalar compares.
pub(crate) fn fcmp16<const C: u8, const BF: bool>(a: u64, b: u64) -> bool {
    if BF {
        fcmp(C, bf::to(a), bf::to(b))
    } else {
        fcmp(C, hf::to(a), hf::to(b))
    }
}

#[inline(always)]
fn fcmp(c: u8, x: f64, y: f64) -> bool {
    let nan = x.is_nan() || y.is_nan();
    match c {
        NUM => !nan,
        NAN => nan,
        c if c >= UNORD => nan || ord_cmp(c - UNORD, x, y),
        // Ordered `ne` is false when either input is NaN.
        c => !nan && ord_cmp(c, x, y),
    }
}

/// `prmt.b32` default mode: selects bytes of {b, a} by the nibbles of c (bit 3 of each
/// nibble replicates the sign of the selected byte).
pub(crate) fn prmt(a: u64, b: u64, c: u64) -> u64 {
    let x = ((b as u32 as u64) << 32) | (a as u32 as u64);
    let mut r = 0u64;
    for i in 0..4 {
        let sel = (c >> (4 * i)) & 0xF;
        let mut byte = (x >> (8 * (sel & 7))) & 0xFF;
        if sel & 8 != 0 {
            byte = if byte & 0x80 != 0 { 0xFF } else { 0 };
        }
        r |= byte << (8 * i);
    }
    r
}

/// `bfe` (bit field extract) of width `W`.
pub(crate) fn bfe<const W: u32, const SIGNED: bool>(a: u64, b: u64, c: u64) -> u64 {
    let pos = (b & 0xFF) as u32;
    let len = (c & 0xFF) as u32;
    let msb = W - 1;
    let sbit = if SIGNED && len > 0 {
        let i = (pos + len - 1).min(msb);
        (a >> i) & 1
    } else {
        0
    };
    let mut r = 0u64;
    for i in 0..W {
        let bit = if i < len && pos + i <= msb {
            (a >> (pos + i)) & 1
        } else {
            sbit
        };
        r |= bit << i;
    }
    m::<W>(r)
}

/// `bfi` (bit field insert) of width `bits`: `b` with bits `pos..pos + len` (both
/// operands' low 8 bits; clipped at the top bit) replaced by the low `len` bits of `a`.
pub(crate) fn bfi(bits: u32, a: u64, b: u64, pos: u64, len: u64) -> u64 {
    let (pos, len) = ((pos & 0xFF) as u32, (len & 0xFF) as u32);
    if pos >= bits || len == 0 {
        return b & ops_mask(bits);
    }
    let len = len.min(bits - pos);
    let field = ops_mask(len) << pos;
    ((b & !field) | ((a << pos) & field)) & ops_mask(bits)
}

/// Error-free sum: `a + b == s + err` exactly (Knuth's TwoSum).
#[inline(always)]
fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let bb = s - a;
    (s, (a - (s - bb)) + (b - bb))
}

#[inline(always)]
fn next_up(x: f32) -> f32 {
    if x.is_nan() || x == f32::INFINITY {
        x
    } else if x == 0.0 {
        f32::from_bits(1)
    } else if x > 0.0 {
        f32::from_bits(x.to_bits() + 1)
    } else {
        f32::from_bits(x.to_bits() - 1)
    }
}

#[inline(always)]
fn next_down(x: f32) -> f32 {
    -next_up(-x)
}

/// Directed rounding modes of f32 arithmetic (`.rz`, `.rm`, `.rp`).
pub(crate) const RZ: u8 = 1;
pub(crate) const RM: u8 = 2;
pub(crate) const RP: u8 = 3;

/// Rounds the exact value `s + err` (|err| ≤ half an f64 ulp of `s`) to f32 in mode `M`.
#[inline(always)]
fn round_dir<const M: u8>(s: f64, err: f64) -> f32 {
    let r = s as f32;
    if s.is_nan() || s.is_infinite() {
        return r;
    }
    let rf = r as f64;
    // Sign of (exact - r).
    let above = if rf < s {
        1
    } else if rf > s {
        -1
    } else if err > 0.0 {
        1
    } else if err < 0.0 {
        -1
    } else {
        0
    };
    match M {
        RP if above > 0 => next_up(r),
        RM if above < 0 => next_down(r),
        RZ if above < 0 && s > 0.0 => next_down(r),
        RZ if above > 0 && s < 0.0 => next_up(r),
        _ => r,
    }
}

#[inline(always)]
fn in32<const FTZ: bool>(x: u64) -> f64 {
    let v = f32_of(x);
    (if FTZ { flush(v) } else { v }) as f64
}

#[inline(always)]
fn out32<const FTZ: bool>(r: f32) -> u64 {
    bits32(if FTZ { flush(r) } else { r })
}

/// `add.{rz,rm,rp}{.ftz}.f32`.
pub(crate) fn fadd_dir<const M: u8, const FTZ: bool>(a: u64, b: u64, _: u64) -> u64 {
    let (s, e) = two_sum(in32::<FTZ>(a), in32::<FTZ>(b));
    out32::<FTZ>(round_dir::<M>(s, e))
}
/// `sub.{rz,rm,rp}{.ftz}.f32`.
pub(crate) fn fsub_dir<const M: u8, const FTZ: bool>(a: u64, b: u64, _: u64) -> u64 {
    let (s, e) = two_sum(in32::<FTZ>(a), -in32::<FTZ>(b));
    out32::<FTZ>(round_dir::<M>(s, e))
}
/// `mul.{rz,rm,rp}{.ftz}.f32` (the f64 product of two f32 values is exact).
pub(crate) fn fmul_dir<const M: u8, const FTZ: bool>(a: u64, b: u64, _: u64) -> u64 {
    out32::<FTZ>(round_dir::<M>(in32::<FTZ>(a) * in32::<FTZ>(b), 0.0))
}
/// `fma.{rz,rm,rp}{.ftz}.f32`: exact product, error-free sum, one directed rounding.
pub(crate) fn ffma_dir<const M: u8, const FTZ: bool>(a: u64, b: u64, c: u64) -> u64 {
    let (s, e) = two_sum(in32::<FTZ>(a) * in32::<FTZ>(b), in32::<FTZ>(c));
    out32::<FTZ>(round_dir::<M>(s, e))
}

#[inline(always)]
pub(crate) fn ops_mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

pub(crate) fn atom_op(op: AtomOp, ty: AtomTy, old: u64, a: u64, b: u64) -> u64 {
    match ty {
        AtomTy::F32 => {
            let (o, x) = (f32_of(old), f32_of(a));
            (match op {
                AtomOp::Add => o + x,
                AtomOp::Min => fmin(o, x),
                AtomOp::Max => fmax(o, x),
                AtomOp::Exch => x,
                AtomOp::Cas => {
                    if old as u32 == a as u32 {
                        f32_of(b)
                    } else {
                        o
                    }
                }
                _ => o,
            })
            .to_bits() as u64
        }
        AtomTy::F64 => {
            let (o, x) = (f64::from_bits(old), f64::from_bits(a));
            (match op {
                AtomOp::Add => o + x,
                AtomOp::Exch => x,
                AtomOp::Min => o.min(x),
                AtomOp::Max => o.max(x),
                AtomOp::Cas => {
                    if old == a {
                        f64::from_bits(b)
                    } else {
                        o
                    }
                }
                _ => o,
            })
            .to_bits()
        }
        _ => {
            let w64 = matches!(ty, AtomTy::U64 | AtomTy::S64);
            let m = if w64 { u64::MAX } else { 0xFFFF_FFFF };
            let signed = matches!(ty, AtomTy::S32 | AtomTy::S64);
            let sx = |v: u64| {
                if w64 {
                    v as i64
                } else {
                    v as u32 as i32 as i64
                }
            };
            let (o, x) = (old & m, a & m);
            (match op {
                AtomOp::Add => o.wrapping_add(x),
                AtomOp::Min => {
                    if signed {
                        sx(o).min(sx(x)) as u64
                    } else {
                        o.min(x)
                    }
                }
                AtomOp::Max => {
                    if signed {
                        sx(o).max(sx(x)) as u64
                    } else {
                        o.max(x)
                    }
                }
                AtomOp::Exch => x,
                AtomOp::Cas => {
                    if o == x {
                        b
                    } else {
                        o
                    }
                }
                AtomOp::And => o & x,
                AtomOp::Or => o | x,
                AtomOp::Xor => o ^ x,
                AtomOp::Inc => {
                    if o >= x {
                        0
                    } else {
                        o + 1
                    }
                }
                AtomOp::Dec => {
                    if o == 0 || o > x {
                        x
                    } else {
                        o - 1
                    }
                }
            }) & m
        }
    }
}

fn round(x: f64, r: Rnd) -> f64 {
    match r {
        Rnd::Near => x.round_ties_even(),
        Rnd::Zero => x.trunc(),
        Rnd::Down => x.floor(),
        Rnd::Up => x.ceil(),
    }
}

/// `cvt` of one value.
pub(crate) fn cvt(s: &CvtSpec, a: u64) -> u64 {
    let int_to = |v: i128| -> u64 {
        match s.dst {
            NumTy::U(w) => {
                let max = if w == 64 {
                    u64::MAX as i128
                } else {
                    (1i128 << w) - 1
                };
                if s.sat {
                    v.clamp(0, max) as u64
                } else {
                    (v as u64) & ops_mask(w)
                }
            }
            NumTy::S(w) => {
                let (lo, hi) = (-(1i128 << (w - 1)), (1i128 << (w - 1)) - 1);
                if s.sat {
                    (v.clamp(lo, hi) as u64) & ops_mask(w)
                } else {
                    (v as u64) & ops_mask(w)
                }
            }
            NumTy::F16 => hf::from(v as f64),
            NumTy::Bf16 => bf::from(v as f64),
            NumTy::F32 => (v as f32).to_bits() as u64,
            NumTy::F64 => (v as f64).to_bits(),
        }
    };
    let float_to = |x: f64, from_f32: Option<f32>| -> u64 {
        match s.dst {
            NumTy::U(_) | NumTy::S(_) => {
                // Float to integer: round per mode, NaN -> 0, saturate to the range.
                if x.is_nan() {
                    return 0;
                }
                let r = round(x, s.rnd);
                let (lo, hi) = match s.dst {
                    NumTy::U(w) => (
                        0f64,
                        if w == 64 {
                            u64::MAX as f64
                        } else {
                            ((1u128 << w) - 1) as f64
                        },
                    ),
                    NumTy::S(w) => (-(2f64.powi(w as i32 - 1)), 2f64.powi(w as i32 - 1) - 1.0),
                    _ => unreachable!(),
                };
                let v = if r <= lo {
                    lo as i128
                } else if r >= hi {
                    hi as i128
                } else {
                    r as i128
                };
                let w = match s.dst {
                    NumTy::U(w) | NumTy::S(w) => w,
                    _ => 64,
                };
                (v as u64) & ops_mask(w)
            }
            NumTy::F16 | NumTy::Bf16 => {
                let mut y = if s.int_round { round(x, s.rnd) } else { x };
                if s.sat {
                    y = if y.is_nan() { 0.0 } else { y.clamp(0.0, 1.0) };
                }
                let bf16 = s.dst == NumTy::Bf16;
                match from_f32 {
                    Some(f) if !s.int_round && !s.sat => {
                        if bf16 {
                            f32_to_bf16(f) as u64
                        } else {
                            f32_to_f16(f) as u64
                        }
                    }
                    _ => {
                        if bf16 {
                            bf::from(y)
                        } else {
                            hf::from(y)
                        }
                    }
                }
            }
            NumTy::F32 => {
                let mut y = if s.int_round {
                    round(x, s.rnd) as f32
                } else {
                    x as f32
                };
                if s.ftz {
                    y = flush(y);
                }
                if s.sat {
                    y = sat(y);
                }
                y.to_bits() as u64
            }
            NumTy::F64 => {
                let mut y = if s.int_round { round(x, s.rnd) } else { x };
                if s.sat {
                    y = if y.is_nan() { 0.0 } else { y.clamp(0.0, 1.0) };
                }
                y.to_bits()
            }
        }
    };
    match s.src {
        NumTy::U(w) => int_to((a & ops_mask(w)) as i128),
        NumTy::S(w) => {
            let sh = 64 - w;
            int_to((((a << sh) as i64) >> sh) as i128)
        }
        NumTy::F16 => float_to(hf::to(a & 0xFFFF), None),
        NumTy::Bf16 => float_to(bf::to(a & 0xFFFF), None),
        NumTy::F32 => {
            let mut x = f32_of(a);
            if s.ftz {
                x = flush(x);
            }
            float_to(x as f64, Some(x))
        }
        NumTy::F64 => float_to(f64::from_bits(a), None),
    }
}
