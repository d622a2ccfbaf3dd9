//! Sanitizer checks on hand-written PTX: bounds, alignment, shared-memory races,
//! uninitialized shared reads, asynchronous `cp.async` semantics.

#![allow(clippy::needless_range_loop)]

mod common;

use common::{dev_with, kernel_src, run_words};
use ptx_emu::{Fault, LaunchOptions, Module, Param};

const SM: &str = "\t.shared .align 16 .b8 sm[256];";

fn fault(decls: &str, body: &str, block: u32) -> ptx_emu::Error {
    run_words(decls, body, block, &[0; 64], 64).expect_err("the sanitizer should report this")
}

#[test]
fn shared_out_of_bounds() {
    let e = fault(SM, "mov.u32 %r1, sm; st.shared.u32 [%r1+256], %r0;", 1);
    assert_eq!(e.fault(), Some(Fault::SharedOutOfBounds), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("st.shared.u32")
            && msg.contains("256 bytes of shared memory")
            && msg.contains("0x100"),
        "{msg}"
    );
}

#[test]
fn global_out_of_bounds_names_the_allocation() {
    let e = fault("", "st.global.u32 [%rd2+256], %r0;", 1);
    assert_eq!(e.fault(), Some(Fault::GlobalOutOfBounds), "{e}");
    assert!(e.to_string().contains("past its end"), "{e}");
}

#[test]
fn misaligned_access() {
    let e = fault("", "ld.global.u32 %r1, [%rd1+2];", 1);
    assert_eq!(e.fault(), Some(Fault::Misaligned), "{e}");
    let e = fault(
        SM,
        "mov.u32 %r1, sm; st.shared.v4.u32 [%r1+8], {%r0,%r0,%r0,%r0};",
        1,
    );
    assert_eq!(e.fault(), Some(Fault::Misaligned), "{e}");
}

#[test]
fn uninitialized_shared_read() {
    let e = fault(
        SM,
        "mov.u32 %r1, sm; ld.shared.u32 %r2, [%r1+16]; st.global.u32 [%rd5], %r2;",
        32,
    );
    assert_eq!(e.fault(), Some(Fault::UninitializedSharedRead), "{e}");
    assert!(e.to_string().contains("address 0x10"), "{e}");
}

/// Warp 0 writes sm[tid], then every thread reads sm[63 - tid] (another warp's slot).
fn exchange(sync: bool) -> Result<Vec<u32>, ptx_emu::Error> {
    let body = format!(
        "mov.u32 %r1, sm; shl.b32 %r2, %r0, 2; add.s32 %r3, %r1, %r2;
         st.shared.u32 [%r3], %r0;
         {}
         sub.s32 %r4, 63, %r0; shl.b32 %r5, %r4, 2; add.s32 %r6, %r1, %r5;
         ld.shared.u32 %r7, [%r6];
         st.global.u32 [%rd5], %r7;",
        if sync { "bar.sync 0;" } else { "" }
    );
    run_words(SM, &body, 64, &[], 64).map(|x| x.0)
}

#[test]
fn shared_race_without_barrier_and_none_with_it() {
    let o = exchange(true).unwrap();
    assert_eq!(o, (0..64).rev().collect::<Vec<u32>>());
    let e = exchange(false).unwrap_err();
    assert_eq!(e.fault(), Some(Fault::SharedRace), "{e}");
}

#[test]
fn write_write_race_between_warps_but_not_within_a_warp() {
    // All 64 threads store to sm[0]: lanes of one warp are fine, the second warp races.
    let e = fault(SM, "mov.u32 %r1, sm; st.shared.u32 [%r1], %r0;", 64);
    assert_eq!(e.fault(), Some(Fault::SharedRace), "{e}");
    assert!(e.to_string().contains("write-after-write"), "{e}");
    run_words(SM, "mov.u32 %r1, sm; st.shared.u32 [%r1], %r0;", 32, &[], 1).unwrap();
    // Separated by a barrier it is fine.
    run_words(SM, "mov.u32 %r1, sm; setp.lt.u32 %p1, %r0, 32; @%p1 st.shared.u32 [%r1], %r0; bar.sync 0; @!%p1 st.shared.u32 [%r1], %r0;", 64, &[], 1).unwrap();
}

#[test]
fn write_after_read_race() {
    // Warp 0 reads sm[0] (written before the barrier) while warp 1 overwrites it.
    let body = "mov.u32 %r1, sm; st.shared.u32 [%r1], 7; bar.sync 0;
        setp.lt.u32 %p1, %r0, 32;
        @%p1 ld.shared.u32 %r2, [%r1];
        @!%p1 st.shared.u32 [%r1], %r0;";
    let e = fault(SM, body, 64);
    assert_eq!(e.fault(), Some(Fault::SharedRace), "{e}");
}

#[test]
fn sanitizer_can_be_turned_off() {
    let src = kernel_src(
        SM,
        "mov.u32 %r1, sm; st.shared.u32 [%r1], %r0; ld.shared.u32 %r2, [%r1+4];",
    );
    let m = Module::parse(&src).unwrap();
    let (dev, p) = dev_with(4);
    let opts = LaunchOptions {
        sanitize: false,
        ..Default::default()
    };
    dev.launch_with(
        m.kernel("t").unwrap(),
        (1, 1, 1),
        (64, 1, 1),
        0,
        &[Param::Ptr(p), Param::Ptr(p)],
        &opts,
    )
    .unwrap();
    // Bounds are always checked.
    let src = kernel_src(SM, "mov.u32 %r1, sm; st.shared.u32 [%r1+1024], %r0;");
    let m = Module::parse(&src).unwrap();
    let e = dev
        .launch_with(
            m.kernel("t").unwrap(),
            (1, 1, 1),
            (1, 1, 1),
            0,
            &[Param::Ptr(p), Param::Ptr(p)],
            &opts,
        )
        .unwrap_err();
    assert_eq!(e.fault(), Some(Fault::SharedOutOfBounds));
}

#[test]
fn cp_async_groups_complete_in_order() {
    // Group 0 copies in[0..4] to sm[0..16], group 1 copies in[4..8] to sm[16..32].
    // After wait_group 1 the first group has landed and the second has not.
    let prologue = "mov.u32 %r1, sm;
        cp.async.ca.shared.global [%r1], [%rd1], 16;
        cp.async.commit_group;
        cp.async.cg.shared.global [%r1+16], [%rd1+16], 16;
        cp.async.commit_group;
        cp.async.wait_group 1;
        ld.shared.v4.u32 {%r2, %r3, %r4, %r5}, [%r1];";
    let input: Vec<u32> = (10..20).collect();
    let ok = format!("{prologue} cp.async.wait_group 0; ld.shared.v4.u32 {{%r6, %r7, %r8, %r9}}, [%r1+16];
        st.global.v4.u32 [%rd2], {{%r2, %r3, %r4, %r5}}; st.global.v4.u32 [%rd2+16], {{%r6, %r7, %r8, %r9}};");
    let o = run_words(SM, &ok, 1, &input, 8).unwrap().0;
    assert_eq!(o, (10..18).collect::<Vec<u32>>());
    let early = format!("{prologue} ld.shared.u32 %r6, [%r1+20];");
    let e = run_words(SM, &early, 1, &input, 8).unwrap_err();
    assert_eq!(e.fault(), Some(Fault::AsyncCopyPending), "{e}");
    assert!(e.to_string().contains("address 0x14"), "{e}");
    // Writing the destination early is an error too.
    let w = format!("{prologue} st.shared.u32 [%r1+16], %r0;");
    assert_eq!(
        run_words(SM, &w, 1, &input, 8).unwrap_err().fault(),
        Some(Fault::AsyncCopyPending)
    );
    // wait_all commits the open group and completes it.
    let all = "mov.u32 %r1, sm; cp.async.ca.shared.global [%r1], [%rd1], 8; cp.async.wait_all;
        ld.shared.v2.u32 {%r2, %r3}, [%r1]; st.global.v2.u32 [%rd2], {%r2, %r3};";
    assert_eq!(run_words(SM, all, 1, &input, 2).unwrap().0, vec![10, 11]);
}

#[test]
fn cp_async_src_size_zero_fills() {
    let body = "mov.u32 %r1, sm; mov.u32 %r9, 6;
        cp.async.cg.shared.global [%r1], [%rd1], 16, %r9;
        cp.async.cg.shared.global [%r1+16], [%rd1+4096], 16, 0;   // src-size 0: source never read
        cp.async.wait_all;
        ld.shared.v4.u32 {%r2, %r3, %r4, %r5}, [%r1];  st.global.v4.u32 [%rd2], {%r2, %r3, %r4, %r5};
        ld.shared.v4.u32 {%r2, %r3, %r4, %r5}, [%r1+16]; st.global.v4.u32 [%rd2+16], {%r2, %r3, %r4, %r5};";
    let o = run_words(
        SM,
        body,
        1,
        &[0x1111_1111, 0x2222_2222, 0x3333_3333, 0x4444_4444],
        8,
    )
    .unwrap()
    .0;
    assert_eq!(o, vec![0x1111_1111, 0x2222, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn cp_async_overlapping_in_flight_copies() {
    let body = "mov.u32 %r1, sm;
        cp.async.ca.shared.global [%r1], [%rd1], 8;
        cp.async.ca.shared.global [%r1+4], [%rd1], 4;";
    assert_eq!(fault(SM, body, 1).fault(), Some(Fault::AsyncCopyPending));
}

#[test]
fn dynamic_shared_memory_follows_static() {
    let decls = "\t.shared .align 4 .b8 st_[12];\n\t.extern .shared .align 16 .b8 dyn[];";
    let src = kernel_src(
        decls,
        "mov.u32 %r1, dyn; mov.u32 %r2, st_; sub.s32 %r3, %r1, %r2;
        st.shared.u32 [%r1+60], %r3; ld.shared.u32 %r4, [%r1+60]; st.global.u32 [%rd2], %r4;
        st.shared.u32 [%r1+64], %r3;",
    );
    let m = Module::parse(&src).unwrap();
    let k = m.kernel("t").unwrap();
    assert_eq!(k.static_shared_bytes(), 12);
    let (dev, p) = dev_with(4);
    let e = dev
        .launch(k, (1, 1, 1), (1, 1, 1), 64, &[Param::Ptr(p), Param::Ptr(p)])
        .unwrap_err();
    assert_eq!(e.fault(), Some(Fault::SharedOutOfBounds), "{e}");
    assert!(e.to_string().contains("16 static + 64 dynamic"), "{e}");
    assert_eq!(
        dev.read_u32(p, 1).unwrap(),
        vec![16],
        "dynamic shared memory starts 16-byte aligned after static"
    );
}

#[test]
fn cp_async_cache_hint_operand_is_ignored() {
    let body = "mov.u32 %r1, sm; mov.u64 %rd9, 0;
        cp.async.cg.shared.global.L2::cache_hint [%r1], [%rd1], 16, %rd9;
        cp.async.cg.shared.global.L2::cache_hint.L2::128B [%r1+16], [%rd1], 16, 4, %rd9;
        cp.async.wait_all;
        ld.shared.v4.u32 {%r2, %r3, %r4, %r5}, [%r1];  st.global.v4.u32 [%rd2], {%r2, %r3, %r4, %r5};
        ld.shared.v4.u32 {%r2, %r3, %r4, %r5}, [%r1+16]; st.global.v4.u32 [%rd2+16], {%r2, %r3, %r4, %r5};";
    let o = run_words(SM, body, 1, &[1, 2, 3, 4], 8).unwrap().0;
    assert_eq!(o, vec![1, 2, 3, 4, 1, 0, 0, 0]);
}

#[test]
fn cp_async_ignore_src_predicate() {
    // The fourth operand may be an ignore-src predicate: when true the source is not read
    // and the destination is zero-filled.
    let body = "mov.u32 %r1, sm; setp.eq.u32 %p1, %r0, 0; setp.ne.u32 %p2, %r0, 0;
        cp.async.ca.shared.global [%r1], [%rd1], 8, %p1;
        cp.async.ca.shared.global [%r1+8], [%rd1], 8, %p2;
        cp.async.wait_all;
        ld.shared.v4.u32 {%r2, %r3, %r4, %r5}, [%r1]; st.global.v4.u32 [%rd2], {%r2, %r3, %r4, %r5};";
    let o = run_words(SM, body, 1, &[5, 6], 4).unwrap().0;
    assert_eq!(o, vec![0, 0, 5, 6]);
}
