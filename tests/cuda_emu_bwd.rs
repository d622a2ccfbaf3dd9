//! The backward kernels under the PTX emulator (after the forward kernel made
//! O and the log-sum-exp) equal candle's f64 autograd through
//! `ksa::reference`: dq, dk, dv, with the sanitizer on and no shared-memory
//! bank conflicts in the main kernel. Needs the `ptx` feature (nvcc).
#![cfg(feature = "ptx")]

mod common;
#[path = "common/emu_bwd.rs"]
mod emu_bwd;
#[allow(dead_code)] // the f64 gradients are the CPU fuzz suite's; the reach sets are shared
mod non_finite;

use common::emu::{Case, Rng};
use emu_bwd::check;

#[test]
fn tails_and_tiny_layouts() {
    // n < C; a single slot (dq, dk vanish); a partial tail chunk with W = 0;
    // exactly one chunk.
    check(&Case::ksa(8, 1, 1, 5));
    check(&Case::causal(1).heads(1, 2, 1));
    check(&Case::ksa(4, 2, 0, 37));
    check(&Case::ksa(16, 4, 3, 16).f16());
}

#[test]
fn ksa_bf16_d64() {
    check(&Case::ksa(4, 1, 0, 301));
    check(&Case::ksa(8, 2, 3, 257));
}

#[test]
fn ksa_f16_d64_window_beyond_chunks() {
    check(&Case::ksa(16, 1, 100_000, 300).f16());
    check(&Case::ksa(4, 4, 3, 203).f16());
}

#[test]
fn ksa_d128() {
    check(&Case::ksa(16, 4, 1, 333).dim(128));
    check(&Case::ksa(8, 2, 0, 250).dim(128).f16());
}

#[test]
fn gqa_and_batch() {
    // 4:1 with batch 2 at ~1000 slots; 2:1 at d = 128.
    check(&Case::ksa(8, 1, 16, 900).heads(2, 4, 1));
    check(&Case::ksa(4, 2, 3, 200).heads(1, 4, 2).dim(128).f16());
}

#[test]
fn strided_kv_heads() {
    // K/V heads 37 (NaN) rows apart: the kernel follows the strides and
    // never reads the padding.
    check(&Case::ksa(8, 1, 2, 200).heads(2, 4, 2).pad_rows(37));
}

#[test]
fn summary_reads_ablation() {
    // Text never reads old summaries: the forward schedule has no such
    // visits, so neither has the key-major one inverted from it.
    let config = ksa::KsaConfig::new(4, 2, 1)
        .unwrap()
        .with_summary_reads(false);
    let layout = ksa::KsaLayout::new(config, 150).unwrap();
    let mut case = Case::ksa(4, 2, 1, 150);
    case.mask = ksa::mask::Mask::Ksa(layout);
    check(&case);
}

#[test]
fn causal() {
    check(&Case::causal(300));
    check(&Case::causal(150).heads(2, 4, 2).dim(128).f16());
}

#[test]
fn random_configurations() {
    let mut rng = Rng::new(14);
    for _ in 0..3 {
        let c = [4, 8, 16][rng.below(3)];
        let s = [1, 2, 4][rng.below(3)];
        let w = [0, 1, 3, 100_000][rng.below(4)];
        let n = 1 + rng.below(250);
        let mut case = Case::ksa(c, s, w, n).dim([64, 128][rng.below(2)]);
        if rng.below(2) == 1 {
            case = case.f16();
        }
        check(&case);
    }
}

/// Non-finite inputs (docs/robustness.md): a NaN or infinity planted in q, k,
/// v or dO rows (at slots that some rows of their edge tiles may not see)
/// leaves every gradient row outside `non_finite::reach` equal to the CPU
/// backward on the clean input (within the kernel's tolerance); after a NaN,
/// every row inside it has a non-finite entry (after an infinity the policy
/// claims nothing there: a key of -inf may give probability 0).
#[test]
fn non_finite_inputs_stay_in_their_gradient_rows() {
    for case in [
        Case::ksa(8, 1, 1, 300),
        Case::ksa(4, 2, 0, 150).heads(1, 4, 2).dim(128).f16(),
        Case::causal(200).heads(1, 2, 1),
    ] {
        let (n, d) = (case.mask.len(), case.head_dim);
        let slot = match case.mask {
            ksa::mask::Mask::Ksa(layout) => layout.text_slot(37).unwrap(),
            ksa::mask::Mask::Causal { .. } => 40,
        };
        let (q, k, v) = common::emu::inputs(&case);
        let mut rng = Rng::new(case.seed ^ 0xbad);
        let dout: Vec<f32> = q.iter().map(|_| rng.normal()).collect();
        let dout = common::emu::rounded(case.elem, &dout);
        let clean = emu_bwd::cpu_grads(&case, &q, &k, &v, &dout);
        let tol = emu_bwd::grad_tol(case.elem);
        let dims = (case.batch, case.q_heads, case.kv_heads, n, d);
        let allowed = |i, j| case.can_attend(i, j);
        for (which, bad) in [
            (0, f32::NAN),
            (1, f32::NAN),
            (1, f32::INFINITY),
            (2, f32::NAN),
            (2, f32::NEG_INFINITY),
            (3, f32::NAN),
            (3, f32::INFINITY),
            (0, f32::INFINITY),
        ] {
            let mut x = [q.clone(), k.clone(), v.clone(), dout.clone()];
            // The last head of q / dO (or of k / v) of batch 0.
            let heads = if which == 0 || which == 3 {
                case.q_heads
            } else {
                case.kv_heads
            };
            x[which][((heads - 1) * n + slot) * d + 3] = bad;
            let [q, k, v, dout] = &x;
            let fwd = common::emu::run(&case, q, k, v);
            let run = emu_bwd::run(&case, q, k, v, &fwd.out, dout, &fwd.lse);
            let reach = non_finite::reach(q, k, v, dout, dims, &allowed);
            let what = format!("{case:?}: {bad} in input {which}");
            let mut compared = 0;
            for (name, got, want, reach) in [
                ("dq", &run.dq, &clean[0], &reach.dq),
                ("dk", &run.dk, &clean[1], &reach.dk),
                ("dv", &run.dv, &clean[2], &reach.dv),
            ] {
                let got: Vec<f64> = got.iter().map(|&x| x as f64).collect();
                compared += non_finite::compare(name, &got, want, reach, d, tol)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                if bad.is_nan() {
                    for (row, _) in reach.iter().enumerate().filter(|(_, r)| **r) {
                        assert!(
                            got[row * d..(row + 1) * d].iter().any(|x| !x.is_finite()),
                            "{what}: {name} row {row} reads the NaN but is finite"
                        );
                    }
                }
            }
            // Causal: every key is read by the last row, so a bad key or value
            // reaches all of dK; dQ's earlier rows stay clean.
            assert!(compared > 0, "{what}: every gradient row reads it");
        }
    }
}

/// A longer seeded sweep (run with `--ignored`): random C, S, W, n, head dim,
/// dtype, batch and GQA group, and some causal cases.
#[test]
#[ignore]
fn random_sweep_long() {
    let mut rng = Rng::new(41);
    for _ in 0..30 {
        let c = [4, 8, 16, 64][rng.below(4)];
        let s = [1, 2, 4][rng.below(3)];
        let w = [0, 1, 3, 16, 100_000][rng.below(5)];
        let n = 1 + rng.below(600);
        let (hkv, group) = ([1, 2][rng.below(2)], [1, 2, 4][rng.below(3)]);
        let mut case = Case::ksa(c, s, w, n).dim([64, 128][rng.below(2)]).heads(
            1 + rng.below(2),
            hkv * group,
            hkv,
        );
        if rng.below(2) == 1 {
            case = case.f16();
        }
        check(&case);
        if rng.below(4) == 0 {
            check(&Case::causal(1 + rng.below(400)).heads(1, 2, 1));
        }
    }
}

/// The counters of `docs/cuda.md` (run with `--ignored --nocapture`): forward
/// and backward on the forward's documented problem (bf16, d = 128, 4 query
/// heads on 1 KV head, C=8 S=1 W=32, n=4096), KSA and full causal, without the
/// (slow, dense) reference; O stands in for dO (only the counters matter).
#[test]
#[ignore]
fn counters() {
    for case in [
        Case::ksa(8, 1, 32, 4096).heads(1, 4, 1).dim(128),
        Case::causal(4096).heads(1, 4, 1).dim(128),
    ] {
        let (q, k, v) = common::emu::inputs(&case);
        let fwd = common::emu::run(&case, &q, &k, &v);
        let run = emu_bwd::run(&case, &q, &k, &v, &fwd.out, &fwd.out, &fwd.lse);
        let s = &run.launch.schedule;
        println!(
            "{}: forward {} visits (heads/CTA {}), mma {}; backward {} key tiles x {} heads, {} visits ({} edge)",
            case.rule_kind(),
            fwd.launch.schedule.tiles_visited(),
            fwd.launch.heads_per_cta,
            fwd.report.mma,
            s.key_tiles().len(),
            case.q_heads,
            s.tiles_visited(),
            s.edge_tiles(),
        );
        println!("  forward: {}", fwd.report);
        for (name, r) in &run.reports {
            println!("  {name}: {r}");
        }
        println!(
            "  mma backward / forward = {:.2}",
            run.main().mma as f64 / fwd.report.mma as f64
        );
    }
}
