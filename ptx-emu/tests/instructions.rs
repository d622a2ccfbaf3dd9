//! Instruction families against values worked out by hand from the PTX ISA.

#![allow(clippy::needless_range_loop)]

mod common;

use common::{alu, fb, run_words};

#[test]
fn integer_arithmetic() {
    let body = "
    ld.global.u32 %r1, [%rd1];      // -7
    ld.global.u32 %r2, [%rd1+4];    // 2
    ld.global.u32 %r3, [%rd1+8];    // 0x40000000
    add.s32 %r10, %r1, %r2;         st.global.u32 [%rd2], %r10;
    sub.s32 %r10, %r2, %r1;         st.global.u32 [%rd2+4], %r10;
    div.s32 %r10, %r1, %r2;         st.global.u32 [%rd2+8], %r10;
    rem.s32 %r10, %r1, %r2;         st.global.u32 [%rd2+12], %r10;
    div.u32 %r10, %r1, %r2;         st.global.u32 [%rd2+16], %r10;
    mul.hi.s32 %r10, %r1, %r3;      st.global.u32 [%rd2+20], %r10;
    mul.hi.u32 %r10, %r1, %r3;      st.global.u32 [%rd2+24], %r10;
    mul.wide.s32 %rd10, %r1, %r2;   st.global.u64 [%rd2+32], %rd10;
    mul.wide.u32 %rd10, %r1, %r2;   st.global.u64 [%rd2+40], %rd10;
    mad.lo.s32 %r10, %r1, %r2, 100; st.global.u32 [%rd2+48], %r10;
    min.s32 %r10, %r1, %r2;         st.global.u32 [%rd2+52], %r10;
    min.u32 %r10, %r1, %r2;         st.global.u32 [%rd2+56], %r10;
    max.s32 %r10, %r1, %r2;         st.global.u32 [%rd2+60], %r10;
    abs.s32 %r10, %r1;              st.global.u32 [%rd2+64], %r10;
    neg.s32 %r10, %r2;              st.global.u32 [%rd2+68], %r10;
    mad.wide.u32 %rd10, %r3, 8, %rd1; sub.s64 %rd10, %rd10, %rd1; st.global.u64 [%rd2+72], %rd10;
    mul.lo.s64 %rd11, %rd10, 3;     st.global.u64 [%rd2+80], %rd11;
    ";
    let o = alu(body, &[-7i32 as u32, 2, 0x4000_0000], 22);
    assert_eq!(o[0] as i32, -5);
    assert_eq!(o[1] as i32, 9);
    assert_eq!(o[2] as i32, -3, "div.s32 truncates toward zero");
    assert_eq!(o[3] as i32, -1, "rem.s32 has the dividend's sign");
    assert_eq!(o[4], (-7i32 as u32) / 2);
    assert_eq!(o[5] as i32, ((-7i64 * 0x4000_0000) >> 32) as i32);
    assert_eq!(o[6], ((0xFFFF_FFF9u64 * 0x4000_0000) >> 32) as u32);
    assert_eq!(o[8] as u64 | (o[9] as u64) << 32, -14i64 as u64);
    assert_eq!(o[10] as u64 | (o[11] as u64) << 32, 0xFFFF_FFF9u64 * 2);
    assert_eq!(o[12] as i32, 86);
    assert_eq!(o[13] as i32, -7);
    assert_eq!(o[14], 2);
    assert_eq!(o[15], 2);
    assert_eq!(o[16], 7);
    assert_eq!(o[17] as i32, -2);
    assert_eq!(o[18] as u64 | (o[19] as u64) << 32, 0x4000_0000u64 * 8);
    assert_eq!(o[20] as u64 | (o[21] as u64) << 32, 0x4000_0000u64 * 24);
}

#[test]
fn logic_and_shifts() {
    let body = "
    ld.global.u32 %r1, [%rd1];      // 0xF0F0_0001
    ld.global.u32 %r2, [%rd1+4];    // 0x0FF0_1234
    and.b32 %r10, %r1, %r2;   st.global.u32 [%rd2], %r10;
    or.b32 %r10, %r1, %r2;    st.global.u32 [%rd2+4], %r10;
    xor.b32 %r10, %r1, %r2;   st.global.u32 [%rd2+8], %r10;
    not.b32 %r10, %r1;        st.global.u32 [%rd2+12], %r10;
    shl.b32 %r10, %r1, 4;     st.global.u32 [%rd2+16], %r10;
    shr.u32 %r10, %r1, 4;     st.global.u32 [%rd2+20], %r10;
    shr.s32 %r10, %r1, 4;     st.global.u32 [%rd2+24], %r10;
    shl.b32 %r10, %r1, 40;    st.global.u32 [%rd2+28], %r10;   // clamped: 0
    shr.s32 %r10, %r1, 40;    st.global.u32 [%rd2+32], %r10;   // clamped: sign fill
    shr.u32 %r10, %r1, 32;    st.global.u32 [%rd2+36], %r10;   // clamped: 0
    popc.b32 %r10, %r1;       st.global.u32 [%rd2+40], %r10;
    clz.b32 %r10, %r2;        st.global.u32 [%rd2+44], %r10;
    brev.b32 %r10, %r1;       st.global.u32 [%rd2+48], %r10;
    bfe.u32 %r10, %r2, 4, 8;  st.global.u32 [%rd2+52], %r10;
    bfe.s32 %r10, %r1, 28, 4; st.global.u32 [%rd2+56], %r10;
    prmt.b32 %r10, %r1, %r2, 0x3210; st.global.u32 [%rd2+60], %r10;
    prmt.b32 %r10, %r1, %r2, 0x7654; st.global.u32 [%rd2+64], %r10;
    prmt.b32 %r10, %r1, %r2, 0x0B0A; st.global.u32 [%rd2+68], %r10;
    setp.ne.s32 %p1, %r1, 0;  setp.eq.s32 %p2, %r1, 0;
    and.pred %p3, %p1, %p2;   or.pred %p4, %p1, %p2;  not.pred %p5, %p2;  xor.pred %p6, %p1, %p5;
    selp.u32 %r10, 1, 0, %p3; st.global.u32 [%rd2+72], %r10;
    selp.u32 %r10, 1, 0, %p4; st.global.u32 [%rd2+76], %r10;
    selp.u32 %r10, 1, 0, %p5; st.global.u32 [%rd2+80], %r10;
    selp.u32 %r10, 1, 0, %p6; st.global.u32 [%rd2+84], %r10;
    ";
    let (a, b) = (0xF0F0_0001u32, 0x0FF0_1234u32);
    let o = alu(body, &[a, b], 22);
    assert_eq!(o[0], a & b);
    assert_eq!(o[1], a | b);
    assert_eq!(o[2], a ^ b);
    assert_eq!(o[3], !a);
    assert_eq!(o[4], a << 4);
    assert_eq!(o[5], a >> 4);
    assert_eq!(o[6], ((a as i32) >> 4) as u32);
    assert_eq!(o[7], 0);
    assert_eq!(o[8], 0xFFFF_FFFF);
    assert_eq!(o[9], 0);
    assert_eq!(o[10], a.count_ones());
    assert_eq!(o[11], b.leading_zeros());
    assert_eq!(o[12], a.reverse_bits());
    assert_eq!(o[13], (b >> 4) & 0xFF);
    assert_eq!(o[14], 0xFFFF_FFFF, "bfe.s32 sign-extends the field 0xF");
    assert_eq!(o[15], a, "prmt 0x3210 selects a");
    assert_eq!(o[16], b, "prmt 0x7654 selects b");
    // Bytes of {b, a} = [01, 00, F0, F0, 34, 12, F0, 0F]; selector nibbles (low first)
    // A, 0, B, 0: 0xA = byte 2 with sign replication -> FF, 0 -> 01, 0xB = byte 3 signed -> FF.
    assert_eq!(o[17], 0x01FF_01FF);
    assert_eq!(&o[18..22], &[0, 1, 1, 0]);
}

#[test]
fn bit_field_insert() {
    // bfi.b32 d, a, b, pos, len: b with bits pos..pos+len replaced by a's low bits;
    // fields running past bit 31 are clipped, pos >= 32 or len = 0 leave b as is.
    let body = "
    ld.global.u32 %r1, [%rd1];
    ld.global.u32 %r2, [%rd1+4];
    bfi.b32 %r10, %r1, %r2, 8, 4;    st.global.u32 [%rd2], %r10;
    bfi.b32 %r10, %r1, %r2, 0, 32;   st.global.u32 [%rd2+4], %r10;
    bfi.b32 %r10, %r1, %r2, 28, 8;   st.global.u32 [%rd2+8], %r10;
    bfi.b32 %r10, %r1, %r2, 32, 8;   st.global.u32 [%rd2+12], %r10;
    bfi.b32 %r10, %r1, %r2, 4, 0;    st.global.u32 [%rd2+16], %r10;
    bfi.b32 %r10, %r1, %r2, 0x104, 0x208; st.global.u32 [%rd2+20], %r10;
    ";
    let (a, b) = (0xF0F0_00A5u32, 0x0FF0_1234u32);
    let o = alu(body, &[a, b], 6);
    assert_eq!(o[0], 0x0FF0_1534, "a's low nibble 5 into bits 8..12");
    assert_eq!(o[1], a, "a whole-word field is a");
    assert_eq!(
        o[2], 0x5FF0_1234,
        "clipped at bit 31: only a's low nibble fits"
    );
    assert_eq!(o[3], b);
    assert_eq!(o[4], b);
    assert_eq!(
        o[5], 0x0FF0_1A54,
        "only the low 8 bits of pos (4) and len (8) count"
    );
}

#[test]
fn float_arithmetic_and_nan_rules() {
    let body = "
    ld.global.f32 %f1, [%rd1];        // 1 + 2^-12
    ld.global.f32 %f2, [%rd1+4];      // -(1 + 2^-11)
    ld.global.f32 %f3, [%rd1+8];      // NaN
    ld.global.f32 %f4, [%rd1+12];     // 1e-40 (subnormal)
    fma.rn.f32 %f10, %f1, %f1, %f2;   st.global.f32 [%rd2], %f10;     // exact: 2^-24
    mul.f32 %f11, %f1, %f1; add.f32 %f10, %f11, %f2; st.global.f32 [%rd2+4], %f10; // 0
    min.f32 %f10, %f3, %f1;           st.global.f32 [%rd2+8], %f10;   // NaN ignored
    max.f32 %f10, %f1, %f3;           st.global.f32 [%rd2+12], %f10;
    min.f32 %f10, 0f00000000, 0f80000000; st.global.f32 [%rd2+16], %f10; // -0
    max.f32 %f10, 0f80000000, 0f00000000; st.global.f32 [%rd2+20], %f10; // +0
    min.NaN.f32 %f10, %f3, %f1;       st.global.f32 [%rd2+24], %f10;  // NaN
    add.f32 %f10, %f4, 0f00000000;    st.global.f32 [%rd2+28], %f10;  // subnormal kept
    add.ftz.f32 %f10, %f4, 0f00000000; st.global.f32 [%rd2+32], %f10; // flushed
    ex2.approx.ftz.f32 %f10, 0f40000000; st.global.f32 [%rd2+36], %f10; // 4
    ex2.approx.f32 %f10, 0fBF800000;  st.global.f32 [%rd2+40], %f10;  // 0.5
    ex2.approx.ftz.f32 %f10, 0fFF800000; st.global.f32 [%rd2+44], %f10; // 2^-inf = 0
    rcp.rn.f32 %f10, 0f40800000;      st.global.f32 [%rd2+48], %f10;  // 0.25
    div.rn.f32 %f10, 0f3F800000, 0f40400000; st.global.f32 [%rd2+52], %f10; // 1/3
    sqrt.rn.f32 %f10, 0f40000000;     st.global.f32 [%rd2+56], %f10;
    neg.f32 %f10, %f1;                st.global.f32 [%rd2+60], %f10;
    abs.f32 %f10, %f2;                st.global.f32 [%rd2+64], %f10;
    add.sat.f32 %f10, %f1, %f1;       st.global.f32 [%rd2+68], %f10;  // 1
    mul.rn.f32 %f10, %f3, 0f00000000; add.sat.f32 %f10, %f10, %f10; st.global.f32 [%rd2+72], %f10; // sat(NaN)=0
    div.full.f32 %f10, 0f40E00000, 0f40000000; st.global.f32 [%rd2+76], %f10; // 3.5
    rcp.approx.ftz.f32 %f10, 0f40000000; st.global.f32 [%rd2+80], %f10; // 0.5
    lg2.approx.f32 %f10, 0f41000000;  st.global.f32 [%rd2+84], %f10;  // 3
    rsqrt.approx.f32 %f10, 0f40800000; st.global.f32 [%rd2+88], %f10; // 0.5
    sub.f32 %f10, %f1, %f1;           st.global.f32 [%rd2+92], %f10;  // +0
    ";
    let a = 1.0 + 2f32.powi(-12);
    let b = -(1.0 + 2f32.powi(-11));
    let o = alu(body, &[fb(a), fb(b), 0x7FC0_0000, fb(1e-40)], 24);
    let f = |i: usize| f32::from_bits(o[i]);
    assert_eq!(f(0), 2f32.powi(-24), "fma is fused");
    assert_eq!(f(1), 0.0, "mul then add rounds the product");
    assert_eq!(f(2), a);
    assert_eq!(f(3), a);
    assert_eq!(o[4], 0x8000_0000);
    assert_eq!(o[5], 0);
    assert!(f(6).is_nan());
    assert_eq!(f(7), 1e-40);
    assert_eq!(o[8], 0);
    assert_eq!(f(9), 4.0);
    assert_eq!(f(10), 0.5);
    assert_eq!(f(11), 0.0);
    assert_eq!(f(12), 0.25);
    assert_eq!(f(13), 1.0 / 3.0);
    assert_eq!(f(14), 2f32.sqrt());
    assert_eq!(f(15), -a);
    assert_eq!(f(16), -b);
    assert_eq!(f(17), 1.0);
    assert_eq!(o[18], 0);
    assert_eq!(f(19), 3.5);
    assert_eq!(f(20), 0.5);
    assert_eq!(f(21), 3.0);
    assert_eq!(f(22), 0.5);
    assert_eq!(o[23], 0);
}

#[test]
fn setp_all_comparisons() {
    // For (a, b) in {(1, 2), (2, 2), (NaN, 2)} write one bit per comparison.
    let cmps = [
        "eq", "ne", "lt", "le", "gt", "ge", "equ", "neu", "ltu", "leu", "gtu", "geu", "num", "nan",
    ];
    let mut body =
        String::from("ld.global.f32 %f1, [%rd1]; ld.global.f32 %f2, [%rd1+4]; mov.u32 %r20, 0;\n");
    for (i, c) in cmps.iter().enumerate() {
        body += &format!(
            "setp.{c}.f32 %p1, %f1, %f2; selp.u32 %r21, {}, 0, %p1; or.b32 %r20, %r20, %r21;\n",
            1 << i
        );
    }
    body += "st.global.u32 [%rd2], %r20;\n";
    // Integer comparisons: signed vs unsigned on (-1, 1).
    body += "ld.global.u32 %r1, [%rd1+8];
        setp.lt.s32 %p2, %r1, 1; selp.u32 %r22, 1, 0, %p2; st.global.u32 [%rd2+4], %r22;
        setp.lo.u32 %p2, %r1, 1; selp.u32 %r22, 1, 0, %p2; st.global.u32 [%rd2+8], %r22;
        setp.hi.u32 %p2|%p3, %r1, 1; selp.u32 %r22, 1, 0, %p3; st.global.u32 [%rd2+12], %r22;
        setp.gt.and.s32 %p4, %r1, -5, %p2; selp.u32 %r22, 1, 0, %p4; st.global.u32 [%rd2+16], %r22;
        setp.gt.or.s32 %p4, %r1, 5, !%p3; selp.u32 %r22, 1, 0, %p4; st.global.u32 [%rd2+20], %r22;\n";
    let bits = |v: u32| -> Vec<&str> {
        cmps.iter()
            .enumerate()
            .filter(|(i, _)| v & (1 << i) != 0)
            .map(|x| *x.1)
            .collect()
    };
    let o = alu(&body, &[fb(1.0), fb(2.0), u32::MAX], 6);
    assert_eq!(bits(o[0]), ["ne", "lt", "le", "neu", "ltu", "leu", "num"]);
    assert_eq!(&o[1..6], &[1, 0, 0, 1, 1]);
    let o = alu(&body, &[fb(2.0), fb(2.0), u32::MAX], 6);
    assert_eq!(bits(o[0]), ["eq", "le", "ge", "equ", "leu", "geu", "num"]);
    let o = alu(&body, &[0x7FC0_0000, fb(2.0), u32::MAX], 6);
    assert_eq!(
        bits(o[0]),
        ["equ", "neu", "ltu", "leu", "gtu", "geu", "nan"],
        "ordered comparisons are false on NaN"
    );
}

#[test]
fn conversions_and_rounding() {
    let body = "
    ld.global.f32 %f1, [%rd1];      // 1/3
    ld.global.f32 %f2, [%rd1+4];    // -2.5
    ld.global.f32 %f3, [%rd1+8];    // 3.5
    ld.global.f32 %f4, [%rd1+12];   // 3e9
    ld.global.f32 %f5, [%rd1+16];   // NaN
    ld.global.f32 %f6, [%rd1+20];   // bf16 tie to even (down): 0x3F808000
    ld.global.f32 %f7, [%rd1+24];   // bf16 tie to even (up):   0x3F818000
    cvt.rn.f16.f32 %h1, %f1;      cvt.u32.u16 %r10, %h1;  st.global.u32 [%rd2], %r10;
    cvt.rn.bf16.f32 %h1, %f1;     cvt.u32.u16 %r10, %h1;  st.global.u32 [%rd2+4], %r10;
    cvt.rn.bf16.f32 %h1, %f6;     cvt.u32.u16 %r10, %h1;  st.global.u32 [%rd2+8], %r10;
    cvt.rn.bf16.f32 %h1, %f7;     cvt.u32.u16 %r10, %h1;  st.global.u32 [%rd2+12], %r10;
    cvt.rn.bf16x2.f32 %r10, %f3, %f2;                     st.global.u32 [%rd2+16], %r10;
    cvt.rn.f16x2.f32 %r10, %f3, %f2;                      st.global.u32 [%rd2+20], %r10;
    mov.b16 %h2, 0x3C00; cvt.f32.f16 %f10, %h2;           st.global.f32 [%rd2+24], %f10;
    mov.b16 %h2, 0xC040; cvt.f32.bf16 %f10, %h2;          st.global.f32 [%rd2+28], %f10;
    cvt.rzi.s32.f32 %r10, %f2;    st.global.u32 [%rd2+32], %r10;   // -2
    cvt.rni.s32.f32 %r10, %f2;    st.global.u32 [%rd2+36], %r10;   // -2 (ties to even)
    cvt.rni.s32.f32 %r10, %f3;    st.global.u32 [%rd2+40], %r10;   // 4
    cvt.rmi.s32.f32 %r10, %f2;    st.global.u32 [%rd2+44], %r10;   // -3
    cvt.rpi.s32.f32 %r10, %f2;    st.global.u32 [%rd2+48], %r10;   // -2
    cvt.rzi.s32.f32 %r10, %f4;    st.global.u32 [%rd2+52], %r10;   // saturates
    cvt.rzi.s32.f32 %r10, %f5;    st.global.u32 [%rd2+56], %r10;   // NaN -> 0
    cvt.rzi.u32.f32 %r10, %f2;    st.global.u32 [%rd2+60], %r10;   // saturates to 0
    cvt.rn.f32.s32 %f10, %r10;    mov.u32 %r11, -7; cvt.rn.f32.s32 %f10, %r11; st.global.f32 [%rd2+64], %f10;
    cvt.rni.f32.f32 %f10, %f2;    st.global.f32 [%rd2+68], %f10;   // -2.0
    cvt.s64.s32 %rd10, %r11;      st.global.u64 [%rd2+72], %rd10;
    cvt.u64.u32 %rd10, %r11;      st.global.u64 [%rd2+80], %rd10;
    cvt.u16.u32 %h3, %r11;        cvt.u32.u16 %r12, %h3; st.global.u32 [%rd2+88], %r12;
    cvt.s32.s16 %r12, %h3;        st.global.u32 [%rd2+92], %r12;
    cvt.sat.u8.s32 %r12, %r11;    st.global.u32 [%rd2+96], %r12;
    cvt.rn.f32.u64 %f10, %rd10;   st.global.f32 [%rd2+100], %f10;
    cvt.f64.f32 %fd1, %f1; cvt.rn.f32.f64 %f10, %fd1; st.global.f32 [%rd2+104], %f10;
    cvt.rn.sat.f32.f32 %f10, %f3; st.global.f32 [%rd2+108], %f10;  // 1.0
    ";
    let third = 1.0f32 / 3.0;
    let o = alu(
        body,
        &[
            fb(third),
            fb(-2.5),
            fb(3.5),
            fb(3e9),
            0x7FC0_0000,
            0x3F80_8000,
            0x3F81_8000,
        ],
        28,
    );
    assert_eq!(o[0], 0x3555, "f16(1/3)");
    assert_eq!(o[1], 0x3EAB, "bf16(1/3) = 0x3EAAAAAB rounded up");
    assert_eq!(o[2], 0x3F80, "bf16 tie rounds to even (down)");
    assert_eq!(o[3], 0x3F82, "bf16 tie rounds to even (up)");
    assert_eq!(
        o[4], 0x4060_C020,
        "cvt.rn.bf16x2.f32 d, a, b puts a in the upper half"
    );
    assert_eq!(o[5], 0x4300_C100);
    assert_eq!(f32::from_bits(o[6]), 1.0);
    assert_eq!(f32::from_bits(o[7]), -3.0);
    assert_eq!(o[8] as i32, -2);
    assert_eq!(o[9] as i32, -2);
    assert_eq!(o[10] as i32, 4);
    assert_eq!(o[11] as i32, -3);
    assert_eq!(o[12] as i32, -2);
    assert_eq!(o[13] as i32, i32::MAX);
    assert_eq!(o[14], 0);
    assert_eq!(o[15], 0);
    assert_eq!(f32::from_bits(o[16]), -7.0);
    assert_eq!(f32::from_bits(o[17]), -2.0);
    assert_eq!(o[18] as u64 | (o[19] as u64) << 32, -7i64 as u64);
    assert_eq!(o[20] as u64 | (o[21] as u64) << 32, (-7i32) as u32 as u64);
    assert_eq!(o[22], 0xFFF9);
    assert_eq!(o[23] as i32, -7);
    assert_eq!(o[24], 0, "cvt.sat.u8 clamps -7 to 0");
    assert_eq!(f32::from_bits(o[25]), 4294967289.0);
    assert_eq!(f32::from_bits(o[26]), third);
    assert_eq!(f32::from_bits(o[27]), 1.0);
}

#[test]
fn packed_half_arithmetic_and_mov_pack() {
    let body = "
    ld.global.u32 %r1, [%rd1];     // f16x2 {lo 1.5, hi -2.0}
    ld.global.u32 %r2, [%rd1+4];   // f16x2 {lo 0.25, hi 3.0}
    ld.global.u32 %r3, [%rd1+8];   // bf16x2 {lo 1.5, hi -2.0}
    ld.global.u32 %r4, [%rd1+12];  // bf16x2 {lo 0.25, hi 3.0}
    add.rn.f16x2 %r10, %r1, %r2;   st.global.u32 [%rd2], %r10;
    mul.rn.f16x2 %r10, %r1, %r2;   st.global.u32 [%rd2+4], %r10;
    fma.rn.f16x2 %r10, %r1, %r2, %r2; st.global.u32 [%rd2+8], %r10;
    add.rn.bf16x2 %r10, %r3, %r4;  st.global.u32 [%rd2+12], %r10;
    fma.rn.bf16x2 %r10, %r3, %r4, %r4; st.global.u32 [%rd2+16], %r10;
    mov.b32 {%h1, %h2}, %r1;       mov.b32 %r10, {%h2, %h1}; st.global.u32 [%rd2+20], %r10;
    neg.f16x2 %r10, %r1;           st.global.u32 [%rd2+24], %r10;
    max.f16x2 %r10, %r1, %r2;      st.global.u32 [%rd2+28], %r10;
    mov.b64 %rd10, {%r1, %r2};     st.global.u64 [%rd2+32], %rd10;
    mov.b64 {%r11, %r12}, %rd10;   st.global.u32 [%rd2+40], %r12;
    add.rn.f16 %h3, %h1, %h2;      cvt.u32.u16 %r13, %h3; st.global.u32 [%rd2+44], %r13;
    ";
    use half::{bf16, f16};
    let h2 = |lo: f32, hi: f32| {
        f16::from_f32(lo).to_bits() as u32 | (f16::from_f32(hi).to_bits() as u32) << 16
    };
    let b2 = |lo: f32, hi: f32| {
        bf16::from_f32(lo).to_bits() as u32 | (bf16::from_f32(hi).to_bits() as u32) << 16
    };
    let (x, y) = (h2(1.5, -2.0), h2(0.25, 3.0));
    let o = alu(body, &[x, y, b2(1.5, -2.0), b2(0.25, 3.0)], 12);
    assert_eq!(o[0], h2(1.75, 1.0));
    assert_eq!(o[1], h2(0.375, -6.0));
    assert_eq!(o[2], h2(0.625, -3.0));
    assert_eq!(o[3], b2(1.75, 1.0));
    assert_eq!(o[4], b2(0.625, -3.0));
    assert_eq!(o[5], x.rotate_left(16), "unpack then pack swapped halves");
    assert_eq!(o[6], h2(-1.5, 2.0));
    assert_eq!(o[7], h2(1.5, 3.0));
    assert_eq!((o[8], o[9]), (x, y), "mov.b64 {{lo, hi}}");
    assert_eq!(o[10], y);
    assert_eq!(o[11], f16::from_f32(-0.5).to_bits() as u32);
}

#[test]
fn loads_stores_widths_and_spaces() {
    let decls = "\t.shared .align 16 .b8 sm[64];\n\t.local .align 8 .b8 __local_depot0[16];";
    let body = "
    ld.global.v4.u32 {%r1, %r2, %r3, %r4}, [%rd1];
    mov.u32 %r20, sm;
    st.shared.v4.u32 [%r20], {%r4, %r3, %r2, %r1};
    ld.shared.v2.u32 {%r5, %r6}, [%r20+8];
    st.global.v2.u32 [%rd2], {%r5, %r6};
    ld.global.s8 %r7, [%rd1+3];     st.global.u32 [%rd2+8], %r7;   // sign-extended 0x80
    ld.global.u8 %r7, [%rd1+3];     st.global.u32 [%rd2+12], %r7;
    ld.global.s16 %r7, [%rd1+2];    st.global.u32 [%rd2+16], %r7;
    ld.global.nc.u16 %h1, [%rd1];   st.global.u16 [%rd2+20], %h1; st.global.u16 [%rd2+22], %h1;
    mov.u64 %rd10, __local_depot0;  cvta.local.u64 %rd11, %rd10;
    st.local.u32 [%rd10+4], %r2;    ld.u32 %r8, [%rd11+4];       st.global.u32 [%rd2+24], %r8;   // generic load of local
    mov.u64 %rd12, sm;              cvta.shared.u64 %rd13, %rd12;
    ld.u32 %r9, [%rd13+12];         st.global.u32 [%rd2+28], %r9;  // generic load of shared
    cvta.to.shared.u64 %rd14, %rd13; cvt.u32.u64 %r21, %rd14; st.global.u32 [%rd2+32], %r21;
    st.u32 [%rd2+36], %r3;          // generic store to global
    ld.param.u64 %rd15, [t_out];    sub.s64 %rd16, %rd15, %rd2;   st.global.u64 [%rd2+40], %rd16;
    ";
    let o = run_words(
        decls,
        body,
        1,
        &[0x8001_7F02, 0xBBBB_BBBB, 0xCCCC_CCCC, 0xDDDD_DDDD],
        12,
    )
    .unwrap()
    .0;
    assert_eq!(&o[0..2], &[0xBBBB_BBBB, 0x8001_7F02]);
    assert_eq!(o[2], 0xFFFF_FF80);
    assert_eq!(o[3], 0x80);
    assert_eq!(o[4], 0xFFFF_8001);
    assert_eq!(o[5], 0x7F02_7F02);
    assert_eq!(o[6], 0xBBBB_BBBB);
    assert_eq!(o[7], 0x8001_7F02);
    assert_eq!(o[8], 0);
    assert_eq!(o[9], 0xCCCC_CCCC);
    assert_eq!((o[10], o[11]), (0, 0));
}

#[test]
fn special_registers() {
    let src = common::kernel_src(
        "",
        "
    mov.u32 %r1, %tid.y;    mov.u32 %r2, %ntid.x;  mov.u32 %r3, %ctaid.z; mov.u32 %r4, %nctaid.y;
    mov.u32 %r5, %laneid;   mov.u32 %r6, %warpid;  mov.u32 %r7, %tid.x;
    mov.u32 %r8, %ctaid.x;  mov.u32 %r9, %ctaid.y; mov.u32 %r10, %nctaid.x;
    mad.lo.s32 %r11, %r9, %r10, %r8;     // linear CTA (z = 0)
    mad.lo.s32 %r12, %r1, %r2, %r7;      // linear thread
    mad.lo.s32 %r13, %r11, 64, %r12;
    mul.wide.u32 %rd10, %r13, 16;  add.s64 %rd11, %rd2, %rd10;
    st.global.v4.u32 [%rd11], {%r5, %r6, %r3, %r4};
    ",
    );
    let m = ptx_emu::Module::parse(&src).unwrap();
    let mut dev = ptx_emu::Device::new();
    let pin = dev.alloc(4);
    let pout = dev.alloc(6 * 64 * 16);
    dev.launch(
        m.kernel("t").unwrap(),
        (3, 2, 1),
        (16, 4, 1),
        0,
        &[ptx_emu::Param::Ptr(pin), ptx_emu::Param::Ptr(pout)],
    )
    .unwrap();
    let o = dev.read_u32(pout, 6 * 64 * 4).unwrap();
    for cta in 0..6 {
        for t in 0..64 {
            let e = &o[(cta * 64 + t) * 4..][..4];
            assert_eq!(
                e,
                &[t as u32 % 32, t as u32 / 32, 0, 2],
                "cta {cta} thread {t}"
            );
        }
    }
}

#[test]
fn directed_rounding_of_f32_arithmetic() {
    // libdevice's expf uses fma.rm; nvcc emits .rz/.rm/.rp for the __f*_r{z,d,u} intrinsics.
    let body = "
    ld.global.f32 %f1, [%rd1];        // 1.0
    ld.global.f32 %f2, [%rd1+4];      // 2^-30
    ld.global.f32 %f3, [%rd1+8];      // 1 + 2^-23
    ld.global.f32 %f4, [%rd1+12];     // 2^-80
    add.rp.f32 %f10, %f1, %f2;   st.global.f32 [%rd2], %f10;
    add.rm.f32 %f10, %f1, %f2;   st.global.f32 [%rd2+4], %f10;
    neg.f32 %f5, %f1; sub.rz.f32 %f10, %f5, %f2; st.global.f32 [%rd2+8], %f10;
    sub.rm.f32 %f10, %f5, %f2;   st.global.f32 [%rd2+12], %f10;
    mul.rz.f32 %f10, %f3, %f3;   st.global.f32 [%rd2+16], %f10;
    mul.rp.f32 %f10, %f3, %f3;   st.global.f32 [%rd2+20], %f10;
    neg.f32 %f6, %f4; fma.rm.f32 %f10, %f1, %f1, %f6; st.global.f32 [%rd2+24], %f10;
    fma.rn.f32 %f10, %f1, %f1, %f6; st.global.f32 [%rd2+28], %f10;
    fma.rp.f32 %f10, %f1, %f1, %f4; st.global.f32 [%rd2+32], %f10;
    fma.rz.f32 %f10, %f5, %f1, %f6; st.global.f32 [%rd2+36], %f10;
    ";
    let p = |e: i32| 2f32.powi(e);
    let o = alu(
        body,
        &[fb(1.0), fb(p(-30)), fb(1.0 + p(-23)), fb(p(-80))],
        10,
    );
    let f = |i: usize| f32::from_bits(o[i]);
    assert_eq!(f(0), 1.0 + p(-23));
    assert_eq!(f(1), 1.0);
    assert_eq!(f(2), -1.0);
    assert_eq!(f(3), -(1.0 + p(-23)));
    assert_eq!(f(4), 1.0 + p(-22));
    assert_eq!(f(5), 1.0 + p(-22) + p(-23));
    assert_eq!(
        f(6),
        1.0 - p(-24),
        "fma.rm sees the 2^-80 below the f64 rounding"
    );
    assert_eq!(f(7), 1.0);
    assert_eq!(f(8), 1.0 + p(-23));
    assert_eq!(f(9), -1.0);
}
