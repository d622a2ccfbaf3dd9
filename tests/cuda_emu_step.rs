//! The forward kernel run as a cache's chunked prefill runs it
//! (`FwdLaunch::step`: only a step's query rows in q, o and the log-sum-exp,
//! only the held keys in k and v, the mask the absolute layout's) under the
//! PTX emulator with the sanitizer on, against `ksa::reference` over the
//! whole layout, compared on each step's rows. Every buffer row a step does
//! not own must stay unwritten, and the sanitizer faults any read outside the
//! held keys. Needs the `ptx` feature (nvcc).
#![cfg(feature = "ptx")]

mod common;
use common::emu::{execute, inputs, out_tol, reference, Case, Run, LSE_TOL};
use ksa::cuda::launch::{FwdLaunch, FwdProblem, Strides};
use ksa::mask::Mask;
use ksa::schedule::{QueryOffset, Schedule, TileSizes};
use ksa::KsaLayout;
use ptx_emu::LaunchReport;

/// How much text a step holds before its first query.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Hold {
    /// Exactly what its queries need (what `KsaCache` keeps: the window).
    Needed,
    /// Half the text before that as well (a cache may hold more).
    More,
}

/// The mask of the first `n` text tokens of `mask` (a prefix of its slots).
fn prefix(mask: Mask, n: usize) -> Mask {
    match mask {
        Mask::Ksa(l) => Mask::Ksa(KsaLayout::new(*l.config(), n).unwrap()),
        Mask::Causal { .. } => Mask::Causal { len: n },
    }
}

/// Query rows before the step's in its buffers, and after them: both must
/// stay unwritten.
const LEAD: usize = 2;
const TAIL: usize = 3;

/// One step, text tokens `old..new` of `case`'s prompt, on the emulator;
/// checks its rows against the whole layout's reference `want`.
fn step(
    case: &Case,
    (q, k, v): (&[f32], &[f32], &[f32]),
    want: &(Vec<f32>, Vec<f64>),
    (old, new): (usize, usize),
    hold: Hold,
) -> Run {
    let (b, hq, hkv, d) = (case.batch, case.q_heads, case.kv_heads, case.head_dim);
    let n_full = case.mask.len();
    let mask = prefix(case.mask, new);
    let gathered = mask.gathered();
    let need = if old < new {
        Schedule::new(mask, TileSizes::default())
            .unwrap()
            .row_keys(old)
            .text
            .start
    } else {
        0
    };
    let first_key = match hold {
        Hold::Needed => need,
        Hold::More => need / 2,
    };
    let offset = QueryOffset {
        old,
        first_key,
        first_row: LEAD,
    };
    // The step's query rows, and the held keys in gathered order.
    let ns = mask.summary_len();
    let held: Vec<usize> = (0..ns).chain(ns + first_key..mask.len()).collect();
    // The step's slots: from text token `old`'s on (summaries of earlier
    // chunks precede it).
    let first_slot = match mask {
        _ if old == new => mask.len(),
        Mask::Ksa(l) => l.text_slot(old).unwrap(),
        Mask::Causal { .. } => old,
    };
    let rows = mask.len() - first_slot;
    let r_all = LEAD + rows + TAIL;
    // Buffers `[b, heads, slots.len(), d]` of the rows at `slots`; the rows
    // before and after the step's in q are other rows of the layout.
    let copy_rows = |x: &[f32], heads: usize, slots: &[usize]| {
        let len = slots.len();
        let mut out = vec![f32::NAN; b * heads * len * d];
        for bh in 0..b * heads {
            for (r, &slot) in slots.iter().enumerate() {
                let src = &x[(bh * n_full + slot) * d..][..d];
                out[(bh * len + r) * d..][..d].copy_from_slice(src);
            }
        }
        out
    };
    let q_slots: Vec<usize> = (0..LEAD)
        .chain(first_slot..mask.len())
        .chain(0..TAIL)
        .collect();
    let kv_slots: Vec<usize> = held.iter().map(|&g| gathered.slot(g).unwrap()).collect();
    let (qb, kb, vb) = (
        copy_rows(q, hq, &q_slots),
        copy_rows(k, hkv, &kv_slots),
        copy_rows(v, hkv, &kv_slots),
    );

    let mut problem = FwdProblem::contiguous(b, hq, hkv, r_all, d, case.elem);
    problem.k = Strides::contiguous(hkv, held.len(), d);
    problem.v = problem.k;
    problem.heads_per_cta = case.heads_per_cta;
    let launch = FwdLaunch::step(mask, &problem, offset).unwrap();
    assert_eq!(launch.schedule.first_slot(), first_slot);
    assert_eq!(launch.schedule.step_rows(), LEAD..LEAD + rows);
    let (out, lse, report) = execute(
        case,
        &launch,
        (&qb, &kb, &vb),
        b * hq * r_all * d,
        b * hq * r_all,
    );

    let what = format!("{case:?} step {old}..{new} {hold:?} (first_key {first_key})");
    let (want_out, want_lse) = want;
    let tol = out_tol(case.elem);
    let mut worst = 0f32;
    for bh in 0..b * hq {
        for r in 0..r_all {
            let got = &out[(bh * r_all + r) * d..][..d];
            let got_lse = lse[bh * r_all + r];
            if !(LEAD..LEAD + rows).contains(&r) {
                assert!(
                    got.iter().all(|x| x.is_nan()) && got_lse.is_nan(),
                    "{what}: row {r} is not the step's but was written"
                );
                continue;
            }
            let slot = first_slot + r - LEAD;
            let w = &want_out[(bh * n_full + slot) * d..][..d];
            for (i, (&g, &w)) in got.iter().zip(w).enumerate() {
                let err = (g - w).abs();
                assert!(
                    err <= tol,
                    "{what}: head {bh} slot {slot} [{i}] = {g}, want {w}"
                );
                worst = worst.max(err);
            }
            let w = want_lse[bh * n_full + slot];
            assert!(
                (got_lse as f64 - w).abs() <= LSE_TOL,
                "{what}: lse head {bh} slot {slot} = {got_lse}, want {w}"
            );
        }
    }
    assert!(worst.is_finite());
    Run {
        out,
        lse,
        report,
        launch,
    }
}

/// `case`'s prompt (its text) from token `start` in steps of `chunk` text
/// tokens, every step checked; returns the steps' runs.
fn steps(case: &Case, start: usize, chunk: usize, hold: Hold) -> Vec<Run> {
    let (q, k, v) = inputs(case);
    let want = reference(case, &q, &k, &v);
    let n = case.mask.text_len();
    let mut runs = Vec::new();
    let mut old = start;
    loop {
        let new = (old + chunk).min(n);
        runs.push(step(case, (&q, &k, &v), &want, (old, new), hold));
        if new == n {
            break;
        }
        old = new;
    }
    let visits: usize = runs.iter().map(|r| r.launch.schedule.tiles_visited()).sum();
    let conflicts: u64 = runs.iter().map(|r| r.report.bank_conflicts).sum();
    eprintln!(
        "ok {} n={n} {:?} d={} b={} hq={} hkv={} from {start} in steps of {chunk} ({hold:?}): {} launches, {visits} visits, bank conflicts {conflicts}",
        case.rule_kind(),
        case.elem,
        case.head_dim,
        case.batch,
        case.q_heads,
        case.kv_heads,
        runs.len(),
    );
    runs
}

/// C = 4 and the step sizes the cache's chunk may take: 1, C-1, C, C+1, a
/// multiple of the kernel's 64-row query tile, larger than the prompt.
const C: usize = 4;
const CHUNKS: [usize; 6] = [1, C - 1, C, C + 1, 128, 1000];

#[test]
fn every_step_size_on_windows_0_1_and_several_chunks() {
    for w in [0, 1, 3] {
        for chunk in CHUNKS {
            // Step size 1 is a launch per token: a shorter prompt.
            let n = if chunk == 1 { 45 } else { 150 };
            steps(&Case::ksa(C, 2, w, n), 0, chunk, Hold::Needed);
        }
    }
}

#[test]
fn causal_steps() {
    // The cache's bypass layers (and a window covering everything).
    for chunk in CHUNKS {
        let n = if chunk == 1 { 45 } else { 200 };
        steps(&Case::causal(n), 0, chunk, Hold::Needed);
    }
    steps(&Case::ksa(C, 1, 100_000, 150), 0, 17, Hold::Needed);
}

#[test]
fn a_continued_prompt_with_evicted_text() {
    // 37 tokens already cached (text before the window evicted), then
    // chunks of 16 and of 5; and a cache holding more text than needed.
    steps(&Case::ksa(C, 2, 2, 230), 37, 16, Hold::Needed);
    steps(&Case::ksa(8, 1, 1, 300).f16(), 37, 5, Hold::Needed);
    steps(&Case::ksa(C, 2, 2, 230), 37, 70, Hold::More);
    steps(&Case::causal(180), 37, 64, Hold::More);
}

#[test]
fn gqa_dtypes_and_head_dims() {
    // 8 query heads on 2 KV heads: 4, 2 and 1 query heads per CTA; batch 2.
    for hp in [4, 2, 1] {
        let case = Case::ksa(C, 2, 1, 140).heads(2, 8, 2).heads_per_cta(hp);
        steps(&case, 0, 48, Hold::Needed);
    }
    steps(&Case::ksa(8, 2, 3, 260).dim(128), 21, 64, Hold::Needed);
    steps(&Case::ksa(8, 2, 3, 260).dim(128).f16(), 0, 99, Hold::Needed);
    steps(
        &Case::ksa(16, 4, 1, 200).heads(1, 4, 1).f16(),
        0,
        33,
        Hold::Needed,
    );
    steps(
        &Case::causal(150).heads(1, 4, 2).dim(128).f16(),
        0,
        40,
        Hold::Needed,
    );
}

fn counters(r: &LaunchReport) -> [u64; 5] {
    [
        r.ctas,
        r.mma,
        r.warp_instructions,
        r.global_bytes_read,
        r.global_bytes_written,
    ]
}

/// What a step launch costs next to the full forward's launch over the same
/// layout (which computes the step's rows and all before them), and what a
/// whole chunked prefill costs next to one full forward, in the emulator's
/// counters. Printed (run with `--nocapture`); asserts only that a step never
/// does more work than the full forward over its layout.
#[test]
fn emulator_counters_of_a_step_and_of_a_chunked_prefill() {
    let case = Case::ksa(8, 1, 2, 2048).heads(1, 4, 1).dim(128);
    let runs = steps(&case, 0, 512, Hold::Needed);
    let full = common::emu::check(&case);
    let last = runs.last().unwrap();
    let names = [
        "CTAs",
        "mma",
        "warp instructions",
        "global bytes read",
        "global bytes written",
    ];
    let (step, whole) = (counters(&last.report), counters(&full.report));
    let mut sum = [0u64; 5];
    for r in &runs {
        for (s, x) in sum.iter_mut().zip(counters(&r.report)) {
            *s += x;
        }
    }
    eprintln!(
        "{} n=2048 bf16 d=128 hq=4 hkv=1: the last step (tokens 1536..2048) vs the full forward; all 4 steps vs the full forward",
        case.rule_kind()
    );
    eprintln!("| counter | last step | full forward | ratio | 4 steps | ratio |");
    eprintln!("|---|---|---|---|---|---|");
    for (i, name) in names.iter().enumerate() {
        eprintln!(
            "| {name} | {} | {} | {:.3} | {} | {:.3} |",
            step[i],
            whole[i],
            step[i] as f64 / whole[i] as f64,
            sum[i],
            sum[i] as f64 / whole[i] as f64
        );
    }
    eprintln!(
        "| visits | {} | {} | {:.3} | {} | {:.3} |",
        last.launch.schedule.tiles_visited(),
        full.launch.schedule.tiles_visited(),
        last.launch.schedule.tiles_visited() as f64 / full.launch.schedule.tiles_visited() as f64,
        runs.iter()
            .map(|r| r.launch.schedule.tiles_visited())
            .sum::<usize>(),
        runs.iter()
            .map(|r| r.launch.schedule.tiles_visited())
            .sum::<usize>() as f64
            / full.launch.schedule.tiles_visited() as f64
    );
    assert!(
        step[1] <= whole[1],
        "a step computes no more than the whole"
    );
}
