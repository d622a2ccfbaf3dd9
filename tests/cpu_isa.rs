//! Every CPU kernel variant this machine supports (`CpuIsa::available()`:
//! AVX-512F, AVX2 + FMA where present, always the portable one), forced in
//! turn, against the f64 reference: head dims 1-256 (odd ones included),
//! tail tiles, GQA, batch > 1, non-contiguous inputs, f32/f16/bf16, KSA and
//! causal, forward and backward; and the typed error of a variant the CPU
//! lacks, through `CpuKernel::isa` and through `KSA_CPU_ISA`.
//!
//! The backward takes the process's variant, so `variants_in_subprocesses`
//! reruns the `probe_` tests of this binary once per variant with
//! `KSA_CPU_ISA` set, and once with an unknown name. Run the kernels' debug
//! assertions with a debug build: `cargo test --test cpu_isa`.
//!
//! Tolerances (max `|fast - reference| / (1 + |reference|)`, inputs uniform
//! in [-1.7, 1.7)): f32 2e-4, f16 2e-3, bf16 1.6e-2 (the reference runs on
//! the same rounded inputs, so only the output rounding and f32 compute
//! remain); gradients 2e-4 of the largest gradient (f32 inputs).

use candle_core::{DType, Tensor, Var};
use ksa::cpu::isa::{process_isa, ISA_ENV};
use ksa::cpu::{CpuIsa, CpuKernel};
use ksa::schedule::TileSizes;
use ksa::{reference, AttentionOptions, Error, KsaConfig, KsaLayout};
use proptest::prelude::*;

#[path = "common/tensors.rs"]
mod tensors;
use tensors::flat;

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 2e-3,
        DType::BF16 => 1.6e-2,
        _ => 2e-4,
    }
}

fn max_rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let (a, b) = (flat(got), flat(want));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| {
            assert!(x.is_finite(), "non-finite output {x}");
            (x - y).abs() / (1.0 + y.abs())
        })
        .fold(0.0, f64::max)
}

/// `[b, h, n, d]` in `dtype`; `strided`: a transposed view of a `[b, n, h,
/// d]` buffer (not contiguous).
fn input(shape: [usize; 4], dtype: DType, seed: u64, strided: bool) -> Tensor {
    let [b, h, n, d] = shape;
    let t = if strided {
        tensors::uniform(&[b, n, h, d], seed, 1.7)
            .to_dtype(dtype)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
    } else {
        tensors::uniform(&[b, h, n, d], seed, 1.7)
            .to_dtype(dtype)
            .unwrap()
    };
    assert_eq!(t.is_contiguous(), !strided || h == 1 || n == 1);
    t
}

#[derive(Debug, Clone)]
struct Case {
    c: usize,
    s: usize,
    w: usize,
    n: usize,
    b: usize,
    hkv: usize,
    group: usize,
    d: usize,
    tiles: TileSizes,
    dtype: DType,
    strided: bool,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        (1usize..=9, 1usize..=3, 0usize..=6, 1usize..=72),
        (1usize..=2, 1usize..=2, prop_oneof![Just(1usize), Just(3)]),
        prop_oneof![1usize..=40, 41usize..=256],
        (1usize..=24, 1usize..=48),
        prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)],
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |((c, s, w, n), (b, hkv, group), d, (tq, tk), dtype, strided, seed)| Case {
                c,
                s,
                w,
                n,
                b,
                hkv,
                group,
                d,
                tiles: TileSizes { query: tq, key: tk },
                dtype,
                strided,
                seed,
            },
        )
}

/// KSA and causal attention of `case` on every available variant against
/// the reference.
fn check(case: &Case) {
    let layout = KsaLayout::new(KsaConfig::new(case.c, case.s, case.w).unwrap(), case.n).unwrap();
    let (b, hq, hkv, len, d) = (
        case.b,
        case.hkv * case.group,
        case.hkv,
        layout.len(),
        case.d,
    );
    let q = input([b, hq, len, d], case.dtype, case.seed, case.strided);
    let k = input([b, hkv, len, d], case.dtype, case.seed + 1, case.strided);
    let v = input([b, hkv, len, d], case.dtype, case.seed + 2, case.strided);
    let want = reference::attention(&q, &k, &v, &layout).unwrap();
    let want_causal = reference::causal_attention(&q, &k, &v).unwrap();
    let want_lse = tensors::reference_lse(&q, &k, |a, b| layout.can_attend(a, b));
    let opts = AttentionOptions::default();
    for isa in CpuIsa::available() {
        let kernel = CpuKernel {
            tiles: case.tiles,
            isa: Some(isa),
        };
        let (out, lse) = kernel.attention(&q, &k, &v, &layout, &opts).unwrap();
        assert_eq!(out.dtype(), case.dtype);
        let err = max_rel_err(&out, &want);
        assert!(err <= tolerance(case.dtype), "{isa} {case:?}: err {err}");
        // The log-sum-exp is f32 from the same (rounded) inputs in every
        // dtype: it sees a scale or score error the rounded output hides.
        let err = max_rel_err(&lse, &want_lse);
        assert!(err <= 2e-4, "{isa} {case:?}: lse err {err}");
        let (out, _) = kernel.causal_attention(&q, &k, &v, &opts).unwrap();
        let err = max_rel_err(&out, &want_causal);
        assert!(
            err <= tolerance(case.dtype),
            "{isa} {case:?}: causal err {err}"
        );
    }
}

proptest! {
    // Each case runs every variant and the f64 reference twice; the debug
    // build (for the kernels' assertions) runs fewer.
    #![proptest_config(ProptestConfig::with_cases(if cfg!(debug_assertions) { 12 } else { 40 }))]

    #[test]
    fn every_variant_matches_the_reference(case in case()) {
        check(&case);
    }
}

/// Head dims at and around every vector and panel width, at the default
/// tiles (full 64-query / 128-key tiles and their tails).
#[test]
fn every_variant_on_panel_edges() {
    for d in [1, 15, 16, 17, 31, 32, 33, 48, 64, 80, 127, 128, 129, 256] {
        check(&Case {
            c: 8,
            s: 1,
            w: 4,
            n: 150,
            b: 1,
            hkv: 1,
            group: 2,
            d,
            tiles: TileSizes::default(),
            dtype: DType::F32,
            strided: d % 2 == 1,
            seed: d as u64,
        });
    }
}

/// A variant the CPU lacks is a typed error at the call, never a crash.
#[test]
fn missing_variant_is_a_typed_error() {
    let layout = KsaLayout::new(KsaConfig::new(4, 1, 2).unwrap(), 12).unwrap();
    let q = input([1, 2, layout.len(), 8], DType::F32, 1, false);
    for isa in CpuIsa::ALL {
        let kernel = CpuKernel {
            isa: Some(isa),
            ..Default::default()
        };
        let got = kernel.attention(&q, &q, &q, &layout, &AttentionOptions::default());
        match (isa.supported(), got) {
            (true, Ok(_)) => {}
            (false, Err(Error::CpuIsa { requested, .. })) => assert_eq!(requested, isa.name()),
            (supported, got) => panic!("{isa} (supported: {supported}): {got:?}"),
        }
    }
}

/// Under an unusable `KSA_CPU_ISA` every CPU entry point is `Error::CpuIsa`;
/// returns whether that was the case (the probe then has nothing to compare).
fn refused_under_env() -> bool {
    let Err(err) = process_isa() else {
        return false;
    };
    assert!(matches!(err, Error::CpuIsa { .. }), "{err}");
    let layout = KsaLayout::new(KsaConfig::new(4, 1, 2).unwrap(), 12).unwrap();
    let q = input([1, 2, layout.len(), 8], DType::F32, 1, false);
    let fwd = ksa::attention(&q, &q, &q, &layout);
    assert!(matches!(fwd, Err(Error::CpuIsa { .. })), "{fwd:?}");
    let causal = ksa::causal_attention(&q, &q, &q);
    assert!(matches!(causal, Err(Error::CpuIsa { .. })), "{causal:?}");
    true
}

/// `sum(attention(q, k, v) * w)` and its gradients for q, k, v.
fn grads(
    attn: impl Fn(&Tensor, &Tensor, &Tensor) -> ksa::Result<Tensor>,
    qkv: [&Tensor; 3],
    w: &Tensor,
) -> [Vec<f64>; 3] {
    let vars = qkv.map(|x| Var::from_tensor(x).unwrap());
    let out = attn(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
    )
    .unwrap();
    let loss = (out.to_dtype(DType::F64).unwrap() * w)
        .unwrap()
        .sum_all()
        .unwrap();
    let g = loss.backward().unwrap();
    vars.each_ref()
        .map(|x| flat(g.get(x.as_tensor()).expect("gradient tracked")))
}

/// The process's variant (forced by `KSA_CPU_ISA` in the subprocesses):
/// forward through `ksa::attention` and its backward against the
/// reference's autograd, head dims off and on every panel width.
#[test]
fn probe_process_variant_forward_and_backward() {
    if refused_under_env() {
        return;
    }
    let layout = KsaLayout::new(KsaConfig::new(5, 2, 1).unwrap(), 70).unwrap();
    let len = layout.len();
    for (d, b, group) in [(1, 1, 1), (13, 2, 2), (32, 1, 3), (67, 1, 2), (144, 1, 1)] {
        let seed = d as u64;
        let u = |h: usize, s: u64| tensors::uniform(&[b, h, len, d], seed + s, 1.0);
        let (q, k, v, w) = (u(2 * group, 0), u(2, 1), u(2, 2), u(2 * group, 3));
        let want = grads(
            |a, b, c| reference::attention(a, b, c, &layout),
            [&q, &k, &v],
            &w,
        );
        let f32s = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
        let (qf, kf, vf) = (f32s(&q), f32s(&k), f32s(&v));
        let out = ksa::attention(&qf, &kf, &vf, &layout).unwrap();
        let err = max_rel_err(&out, &reference::attention(&q, &k, &v, &layout).unwrap());
        assert!(err <= 2e-4, "d={d}: forward err {err}");
        let got = grads(
            |a, b, c| ksa::attention(a, b, c, &layout),
            [&qf, &kf, &vf],
            &w,
        );
        for ((got, want), name) in got.iter().zip(&want).zip(["dq", "dk", "dv"]) {
            let top = want.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-3);
            for (i, (g, x)) in got.iter().zip(want).enumerate() {
                assert!((g - x).abs() <= 2e-4 * top, "d={d} {name}[{i}]: {g} vs {x}");
            }
        }
    }
}

/// Reruns the `probe_` tests under `KSA_CPU_ISA` = every available variant,
/// then an unknown name (where every call must be `Error::CpuIsa`).
#[test]
fn variants_in_subprocesses() {
    let exe = std::env::current_exe().unwrap();
    let names = CpuIsa::available()
        .into_iter()
        .map(|isa| isa.name())
        .chain(["sse9"]);
    for name in names {
        let out = std::process::Command::new(&exe)
            .args(["probe_", "--test-threads=1"])
            .env(ISA_ENV, name)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "{ISA_ENV}={name}:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The variant the process runs is reported and supported, and is the
/// widest available unless `KSA_CPU_ISA` says otherwise.
#[test]
fn process_variant_is_reported() {
    let Ok(isa) = process_isa() else { return };
    assert!(isa.supported());
    match std::env::var(ISA_ENV) {
        Ok(name) if !name.trim().is_empty() => assert_eq!(Some(isa), CpuIsa::from_name(&name)),
        _ => assert_eq!(Some(&isa), CpuIsa::available().first()),
    }
}
