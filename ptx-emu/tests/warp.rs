//! Hand-written PTX for control flow and warp collectives: predicated branches,
//! divergence and reconvergence, `shfl.sync` modes with out-of-range lanes, clamps and
//! the `|p` output, `vote`, barriers, and the errors for divergent collectives/deadlock.

#![allow(clippy::needless_range_loop)]

mod common;

use common::run_words;
use ptx_emu::Fault;

/// Runs a shfl variant on 32 lanes holding `lane*10 + 1`; returns (value, p) per lane.
fn shfl(mode: &str, b: &str, c: &str) -> Vec<(u32, u32)> {
    let body = format!(
        "ld.global.u32 %r1, [%rd4];
         shfl.sync.{mode}.b32 %r2|%p1, %r1, {b}, {c}, -1;
         selp.u32 %r3, 1, 0, %p1;
         mul.wide.u32 %rd10, %r0, 8; add.s64 %rd11, %rd2, %rd10;
         st.global.v2.u32 [%rd11], {{%r2, %r3}};"
    );
    let input: Vec<u32> = (0..32).map(|l| l * 10 + 1).collect();
    let o = run_words("", &body, 32, &input, 64).unwrap().0;
    o.chunks(2).map(|c| (c[0], c[1])).collect()
}

fn v(l: u32) -> u32 {
    l * 10 + 1
}

#[test]
fn shfl_modes_follow_the_isa_pseudocode() {
    // up by 1, c = 0: lane 0 has no source (p = 0, keeps its own value).
    for (l, (x, p)) in shfl("up", "1", "0").into_iter().enumerate() {
        let l = l as u32;
        assert_eq!(
            (x, p),
            if l == 0 { (v(0), 0) } else { (v(l - 1), 1) },
            "up lane {l}"
        );
    }
    // down by 3 with clamp 31: lanes 29..31 are out of range.
    for (l, (x, p)) in shfl("down", "3", "31").into_iter().enumerate() {
        let l = l as u32;
        assert_eq!(
            (x, p),
            if l + 3 > 31 { (v(l), 0) } else { (v(l + 3), 1) },
            "down lane {l}"
        );
    }
    for (l, (x, p)) in shfl("bfly", "5", "31").into_iter().enumerate() {
        assert_eq!((x, p), (v(l as u32 ^ 5), 1), "bfly lane {l}");
    }
    // idx in segments of 8 (c = ((32-8)<<8)|31, as __shfl_sync(v, 9, 8) emits): the
    // index wraps inside the segment, 9 -> 1.
    for (l, (x, p)) in shfl("idx", "9", "0x181f").into_iter().enumerate() {
        let l = l as u32;
        assert_eq!((x, p), (v((l & !7) | 1), 1), "idx lane {l}");
    }
    // idx with b = 40: only b[4:0] = 8 is used.
    for (l, (x, p)) in shfl("idx", "40", "31").into_iter().enumerate() {
        assert_eq!((x, p), (v(8), 1), "idx lane {l}");
    }
    // down by 3 within segments of 8: lanes 5..7 of each segment are out of range.
    for (l, (x, p)) in shfl("down", "3", "0x181f").into_iter().enumerate() {
        let l = l as u32;
        assert_eq!(
            (x, p),
            if l % 8 + 3 > 7 {
                (v(l), 0)
            } else {
                (v(l + 3), 1)
            },
            "seg down lane {l}"
        );
    }
    // up by 2 within segments of 8 (c = (32-8)<<8).
    for (l, (x, p)) in shfl("up", "2", "0x1800").into_iter().enumerate() {
        let l = l as u32;
        assert_eq!(
            (x, p),
            if l % 8 < 2 { (v(l), 0) } else { (v(l - 2), 1) },
            "seg up lane {l}"
        );
    }
}

#[test]
fn divergent_branches_reconverge_before_a_collective() {
    let body = "
        setp.lt.u32 %p1, %r0, 10;
        @%p1 bra $LA;
        mov.u32 %r2, 200;
        bra.uni $LJ;
    $LA:
        mov.u32 %r2, 100;
    $LJ:
        shfl.sync.idx.b32 %r3, %r2, 0, 31, -1;      // lane 0 took the @p path
        shfl.sync.idx.b32 %r4, %r2, 31, 31, -1;
        add.s32 %r5, %r2, %r3;
        add.s32 %r5, %r5, %r4;
        st.global.u32 [%rd5], %r5;";
    let o = run_words("", body, 32, &[], 32).unwrap().0;
    for (l, x) in o.iter().enumerate() {
        let own = if l < 10 { 100 } else { 200 };
        assert_eq!(*x, own + 100 + 200, "lane {l}");
    }
}

#[test]
fn per_lane_loop_trip_counts_then_shuffle() {
    // Lane l runs the loop l times (sum of 0..l), then all lanes meet at shfl.bfly.
    let body = "
        mov.u32 %r1, 0;          // i
        mov.u32 %r2, 0;          // sum
        setp.eq.u32 %p1, %r0, 0;
        @%p1 bra $DONE;
    $LOOP:
        add.s32 %r2, %r2, %r1;
        add.s32 %r1, %r1, 1;
        setp.lt.u32 %p2, %r1, %r0;
        @%p2 bra $LOOP;
    $DONE:
        shfl.sync.bfly.b32 %r3, %r2, 1, 31, -1;
        @!%p1 add.s32 %r3, %r3, 1000;   // predicated non-branch instruction
        st.global.u32 [%rd5], %r3;";
    let (o, rep) = run_words("", body, 32, &[], 32).unwrap();
    let tri = |l: u32| l * l.saturating_sub(1) / 2;
    for l in 0..32u32 {
        assert_eq!(
            o[l as usize],
            tri(l ^ 1) + if l == 0 { 0 } else { 1000 },
            "lane {l}"
        );
    }
    assert!(rep.class(ptx_emu::Class::Control) > 0);
}

#[test]
fn vote_sync() {
    let body = "
        rem.u32 %r1, %r0, 3;
        setp.eq.u32 %p1, %r1, 0;
        vote.sync.ballot.b32 %r2, %p1, -1;
        vote.sync.any.pred %p2, %p1, -1;
        vote.sync.all.pred %p3, %p1, -1;
        vote.sync.all.pred %p4, !%p1, 0xffffffff;
        vote.sync.uni.pred %p5, %p2, -1;
        selp.u32 %r3, 1, 0, %p2; selp.u32 %r4, 2, 0, %p3; selp.u32 %r5, 4, 0, %p4; selp.u32 %r6, 8, 0, %p5;
        or.b32 %r3, %r3, %r4; or.b32 %r3, %r3, %r5; or.b32 %r3, %r3, %r6;
        mul.wide.u32 %rd10, %r0, 8; add.s64 %rd11, %rd2, %rd10;
        st.global.v2.u32 [%rd11], {%r2, %r3};";
    let o = run_words("", body, 32, &[], 64).unwrap().0;
    let ballot: u32 = (0..32).filter(|l| l % 3 == 0).fold(0, |m, l| m | 1 << l);
    for l in 0..32 {
        assert_eq!((o[2 * l], o[2 * l + 1]), (ballot, 1 | 8), "lane {l}");
    }
}

#[test]
fn shfl_from_two_different_instructions_is_an_error() {
    let body = "
        setp.lt.u32 %p1, %r0, 16;
        @%p1 bra $LA;
        shfl.sync.bfly.b32 %r2, %r0, 1, 31, -1;
        bra.uni $LJ;
    $LA:
        shfl.sync.bfly.b32 %r2, %r0, 1, 31, -1;
    $LJ:
        st.global.u32 [%rd5], %r2;";
    let e = run_words("", body, 32, &[], 32).unwrap_err();
    assert_eq!(e.fault(), Some(Fault::DivergentCollective), "{e}");
    // With a half-warp member mask per branch, each half is a complete collective.
    let ok = body
        .replace(
            "%r0, 1, 31, -1;\n        bra",
            "%r0, 1, 31, 0xffff0000;\n        bra",
        )
        .replace("%r0, 1, 31, -1;\n    $LJ", "%r0, 1, 31, 0xffff;\n    $LJ");
    let o = run_words("", &ok, 32, &[], 32).unwrap().0;
    for (l, x) in o.iter().enumerate() {
        assert_eq!(*x, l as u32 ^ 1);
    }
}

#[test]
fn collective_with_an_exited_member_is_an_error() {
    let body = "
        setp.ge.u32 %p1, %r0, 16;
        @%p1 bra $END;
        shfl.sync.bfly.b32 %r2, %r0, 1, 31, -1;
        st.global.u32 [%rd5], %r2;
    $END:";
    let e = run_words("", body, 32, &[], 32).unwrap_err();
    assert_eq!(e.fault(), Some(Fault::DivergentCollective), "{e}");
    assert!(e.to_string().contains("shfl.sync.bfly.b32"), "{e}");
}

#[test]
fn mma_in_a_partial_warp_is_an_error() {
    let body = "
        mov.b32 %r1, 0;
        mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1,%f2,%f3,%f4}, {%r1,%r1,%r1,%r1}, {%r1,%r1}, {%f1,%f2,%f3,%f4};";
    let e = run_words("", body, 16, &[], 1).unwrap_err();
    assert_eq!(e.fault(), Some(Fault::DivergentCollective), "{e}");
}

#[test]
fn barriers_named_counts_and_deadlock() {
    let decls = "\t.shared .align 4 .b8 sm[512];";
    // Warps 0-1 sync on barrier 1, warps 2-3 on barrier 2 (64 threads each); each pair
    // exchanges values through shared memory.
    let body = "
        mov.u32 %r10, sm;
        shl.b32 %r11, %r0, 2;
        add.s32 %r12, %r10, %r11;
        st.shared.u32 [%r12], %r0;
        setp.lt.u32 %p1, %r0, 64;
        @%p1 bra $A;
        bar.sync 2, 64;
        bra.uni $J;
    $A:
        bar.sync 1, 64;
    $J:
        xor.b32 %r13, %r0, 32;          // the other warp of the pair
        shl.b32 %r14, %r13, 2;
        add.s32 %r15, %r10, %r14;
        ld.shared.u32 %r16, [%r15];
        st.global.u32 [%rd5], %r16;";
    let (o, rep) = run_words(decls, body, 128, &[], 128).unwrap();
    for (t, x) in o.iter().enumerate() {
        assert_eq!(*x, t as u32 ^ 32);
    }
    assert_eq!(rep.barriers, 2);
    // Without counts, the two halves wait on different barriers forever.
    let dead = body
        .replace("bar.sync 2, 64", "bar.sync 2")
        .replace("bar.sync 1, 64", "bar.sync 1");
    let e = run_words(decls, &dead, 128, &[], 128).unwrap_err();
    assert_eq!(e.fault(), Some(Fault::Deadlock), "{e}");
    assert!(e.to_string().contains("wait at barrier"), "{e}");
}

#[test]
fn endless_loop_hits_the_instruction_limit() {
    let src = common::kernel_src("", "$L: add.s32 %r1, %r1, 1; bra.uni $L;");
    let m = ptx_emu::Module::parse(&src).unwrap();
    let (dev, p) = common::dev_with(4);
    let opts = ptx_emu::LaunchOptions {
        max_thread_instructions_per_cta: Some(10_000),
        ..Default::default()
    };
    let e = dev
        .launch_with(
            m.kernel("t").unwrap(),
            (1, 1, 1),
            (32, 1, 1),
            0,
            &[ptx_emu::Param::Ptr(p), ptx_emu::Param::Ptr(p)],
            &opts,
        )
        .unwrap_err();
    assert_eq!(e.fault(), Some(Fault::InstructionLimit));
}

#[test]
fn a_warp_spinning_on_another_warps_flag_makes_progress() {
    // Warp 0 (scheduled first) spins on a volatile shared flag that warp 1 sets: the
    // scheduler must time-slice.
    // (Racy by the sanitizer's barrier-based definition, so it runs with sanitize off.)
    let src = common::kernel_src(
        "\t.shared .align 4 .b8 flag[4];",
        "mov.u32 %r1, flag;
         setp.ge.u32 %p1, %r0, 32;
         @%p1 bra $W0;
     $SPIN:
         ld.volatile.shared.u32 %r2, [%r1];
         setp.eq.u32 %p2, %r2, 0;
         @%p2 bra $SPIN;
         st.global.u32 [%rd5], %r2;
         bra.uni $END;
     $W0:
         mov.u32 %r3, 0;
     $BUSY:
         add.s32 %r3, %r3, 1;
         setp.lt.u32 %p3, %r3, 100000;
         @%p3 bra $BUSY;
         st.volatile.shared.u32 [%r1], 7;
     $END:",
    );
    let m = ptx_emu::Module::parse(&src).unwrap();
    let mut dev = ptx_emu::Device::new();
    let pin = dev.alloc(4);
    let pout = dev.alloc(64 * 4);
    let opts = ptx_emu::LaunchOptions {
        sanitize: false,
        ..Default::default()
    };
    dev.launch_with(
        m.kernel("t").unwrap(),
        (1, 1, 1),
        (64, 1, 1),
        0,
        &[ptx_emu::Param::Ptr(pin), ptx_emu::Param::Ptr(pout)],
        &opts,
    )
    .unwrap();
    assert_eq!(&dev.read_u32(pout, 64).unwrap()[..32], &[7; 32]);
}

#[test]
fn redux_sync() {
    let body = "
        sub.s32 %r1, %r0, 10;              // -10 .. 21
        redux.sync.add.s32 %r2, %r1, -1;
        redux.sync.min.s32 %r3, %r1, -1;
        redux.sync.max.u32 %r4, %r1, -1;   // unsigned: -1 is the largest
        redux.sync.or.b32 %r5, %r0, 0xffffffff;
        redux.sync.xor.b32 %r6, %r0, -1;
        mul.wide.u32 %rd10, %r0, 32; add.s64 %rd11, %rd2, %rd10;
        st.global.v4.u32 [%rd11], {%r2, %r3, %r4, %r5};
        st.global.u32 [%rd11+16], %r6;";
    let o = run_words("", body, 32, &[], 32 * 8).unwrap().0;
    let vals: Vec<i32> = (0..32).map(|l| l - 10).collect();
    for l in 0..32 {
        let g = &o[l * 8..][..5];
        assert_eq!(g[0] as i32, vals.iter().sum::<i32>());
        assert_eq!(g[1] as i32, -10);
        assert_eq!(g[2], u32::MAX);
        assert_eq!(g[3], 31);
        assert_eq!(g[4], (0..32u32).fold(0, |a, b| a ^ b));
    }
}

#[test]
fn bar_sync_from_two_instructions_in_one_warp_is_an_error() {
    // bar.sync is barrier.sync.aligned: all threads of a warp must use the same instruction.
    let body = "
        setp.lt.u32 %p1, %r0, 16;
        @%p1 bra $A;
        bar.sync 0;
        bra.uni $J;
    $A:
        bar.sync 0;
    $J:
        st.global.u32 [%rd5], %r0;";
    let e = run_words("", body, 64, &[], 64).unwrap_err();
    assert_eq!(e.fault(), Some(Fault::DivergentCollective), "{e}");
    // barrier.sync (not .aligned) allows it.
    let ok = body.replace("bar.sync 0;", "barrier.sync 0;");
    run_words("", &ok, 64, &[], 64).unwrap();
}
