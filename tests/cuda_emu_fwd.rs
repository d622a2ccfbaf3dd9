//! The forward kernel under the PTX emulator equals `ksa::reference` (output
//! and log-sum-exp), with the sanitizer on. Needs the `ptx` feature (nvcc).
#![cfg(feature = "ptx")]

mod common;
use common::emu::{check, Case, Rng};

#[test]
fn smallest_layouts() {
    // n < C, one chunk, exactly one chunk, W larger than the chunks.
    check(&Case::ksa(8, 1, 1, 5));
    check(&Case::ksa(4, 2, 0, 4));
    check(&Case::ksa(16, 4, 3, 37).f16());
}

#[test]
fn ksa_bf16_d64() {
    check(&Case::ksa(4, 1, 0, 301));
    check(&Case::ksa(8, 2, 3, 517));
}

#[test]
fn ksa_f16_d64() {
    check(&Case::ksa(4, 4, 3, 1001).f16());
    check(&Case::ksa(64, 1, 1, 450).f16());
}

#[test]
fn ksa_bf16_d128() {
    check(&Case::ksa(16, 4, 1, 333).dim(128));
    check(&Case::ksa(64, 2, 1000, 700).dim(128));
}

#[test]
fn ksa_f16_d128() {
    check(&Case::ksa(8, 1, 16, 613).dim(128).f16());
}

#[test]
fn ksa_batch2_gqa4() {
    // A few thousand slots: N = 2250.
    check(&Case::ksa(8, 1, 16, 2000).heads(2, 4, 1));
    check(&Case::ksa(4, 2, 3, 300).heads(2, 4, 1).dim(128).f16());
}

#[test]
fn causal_baseline() {
    check(&Case::causal(700));
    check(&Case::causal(333).dim(128).f16());
    check(&Case::causal(200).heads(2, 4, 1).f16());
}

#[test]
fn random_configurations() {
    let mut rng = Rng::new(2026);
    for _ in 0..6 {
        let c = [4, 8, 16, 64][rng.below(4)];
        let s = [1, 2, 4][rng.below(3)];
        let w = [0, 1, 3, 16, 100_000][rng.below(5)];
        let n = 1 + rng.below(400);
        let mut case = Case::ksa(c, s, w, n).dim([64, 128][rng.below(2)]);
        if rng.below(2) == 1 {
            case = case.f16();
        }
        check(&case);
    }
}

#[test]
fn gqa_heads_per_cta() {
    // 8 query heads on 2 KV heads (group 4): 4, 2 and 1 heads per CTA
    // (16-, 32- and 64-row query tiles) give the same result.
    for hp in [4, 2, 1] {
        check(&Case::ksa(8, 2, 3, 350).heads(1, 8, 2).heads_per_cta(hp));
    }
    check(&Case::ksa(16, 1, 1, 500).heads(2, 4, 2).dim(128).f16());
    check(&Case::causal(300).heads(1, 8, 4).dim(128));
}

#[test]
fn strided_kv_heads() {
    // K/V heads 37 rows apart from the next (NaN in between): the kernel
    // follows the batch/head strides and never reads the padding.
    check(&Case::ksa(8, 1, 2, 200).heads(2, 4, 2).pad_rows(37));
}

/// Non-finite keys and values (docs/robustness.md): NaN and infinities planted
/// in K or V rows of one KV head, at slots that some rows of their edge tiles
/// may not see (mid-tile text, a summary). Every row that may not see a
/// planted row equals the reference on the clean input; every row that sees
/// a NaN, or an infinite value, has a non-finite output (an infinite key may
/// legitimately give a score of -inf, so no claim there).
#[test]
fn non_finite_keys_and_values_stay_in_their_rows() {
    for case in [
        Case::ksa(8, 1, 1, 300),
        Case::ksa(4, 2, 0, 150).heads(1, 4, 2).dim(128).f16(),
        Case::causal(200).heads(1, 2, 1),
    ] {
        let (n, d) = (case.mask.len(), case.head_dim);
        let slots = match case.mask {
            ksa::mask::Mask::Ksa(layout) => vec![
                layout.text_slot(37).unwrap(),
                layout.summary_slot(2, 0).unwrap(),
            ],
            ksa::mask::Mask::Causal { .. } => vec![40, 130],
        };
        let (q, k, v) = common::emu::inputs(&case);
        let (clean, _) = common::emu::reference(&case, &q, &k, &v);
        // The last KV head of batch 0; its query heads are the last group.
        let hk = case.kv_heads - 1;
        let group = case.q_heads / case.kv_heads;
        for (in_v, bad) in [
            (false, f32::NAN),
            (false, f32::INFINITY),
            (true, f32::NAN),
            (true, f32::INFINITY),
            (true, f32::NEG_INFINITY),
        ] {
            let (mut k, mut v) = (k.clone(), v.clone());
            let target = if in_v { &mut v } else { &mut k };
            for &slot in &slots {
                target[(hk * n + slot) * d + 3] = bad;
            }
            let run = common::emu::run(&case, &q, &k, &v);
            let (mut unaffected, mut affected) = (0, 0);
            for h in 0..case.q_heads {
                for i in 0..n {
                    let row = &run.out[(h * n + i) * d..][..d];
                    let want = &clean[(h * n + i) * d..][..d];
                    let sees = h / group == hk && slots.iter().any(|&j| case.can_attend(i, j));
                    if !sees {
                        unaffected += 1;
                        for (c, (&g, &w)) in row.iter().zip(want).enumerate() {
                            let tol = common::emu::out_tol(case.elem);
                            assert!(
                                (g - w).abs() <= tol,
                                "{case:?} {bad} in {}: head {h} row {i} col {c}: {g} vs {w}",
                                if in_v { "v" } else { "k" }
                            );
                        }
                    } else if in_v || bad.is_nan() {
                        affected += 1;
                        assert!(
                            row.iter().any(|x| !x.is_finite()),
                            "{case:?} {bad}: head {h} row {i} sees it but is finite"
                        );
                    }
                }
            }
            assert!(
                unaffected > 0 && (affected > 0 || !(in_v || bad.is_nan())),
                "{case:?} {bad}: {unaffected} rows unaffected, {affected} non-finite"
            );
        }
    }
}

/// A longer seeded sweep (run with `--ignored`): random C, S, W, n, head dim,
/// dtype, batch, GQA group and heads per CTA.
#[test]
#[ignore]
fn random_sweep_long() {
    let mut rng = Rng::new(7);
    for _ in 0..60 {
        let c = [4, 8, 16, 64][rng.below(4)];
        let s = [1, 2, 4][rng.below(3)];
        let w = [0, 1, 3, 16, 100_000][rng.below(5)];
        let n = 1 + rng.below(900);
        let (hkv, group) = ([1, 2][rng.below(2)], [1, 2, 4][rng.below(3)]);
        let mut case = Case::ksa(c, s, w, n).dim([64, 128][rng.below(2)]).heads(
            1 + rng.below(2),
            hkv * group,
            hkv,
        );
        if rng.below(2) == 1 {
            case = case.f16();
        }
        if rng.below(3) == 0 {
            case = case.heads_per_cta(1);
        }
        check(&case);
        if rng.below(4) == 0 {
            check(&Case::causal(1 + rng.below(500)).heads(1, 2, 1));
        }
    }
}
