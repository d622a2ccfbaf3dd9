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
