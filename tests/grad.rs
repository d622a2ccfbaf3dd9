//! Gradients of `ksa::attention` against candle's autograd through the f64
//! reference (itself spot-checked with central finite differences).

use candle_core::{DType, Device, Tensor, Var};
use ksa::schedule::{Schedule, TileSizes};
use ksa::{reference, KsaConfig, KsaLayout};
use proptest::prelude::*;

#[path = "common/tensors.rs"]
mod tensors;
use tensors::flat;

fn rand(shape: &[usize], seed: u64) -> Tensor {
    tensors::uniform(shape, seed, 1.0)
}

/// `loss = sum(attention(q, k, v) * w)` and its gradients for q, k, v.
fn grads(
    attn: impl Fn(&Tensor, &Tensor, &Tensor) -> ksa::Result<Tensor>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    w: &Tensor,
) -> [Vec<f64>; 3] {
    let (qv, kv, vv) = (
        Var::from_tensor(q).unwrap(),
        Var::from_tensor(k).unwrap(),
        Var::from_tensor(v).unwrap(),
    );
    let out = attn(qv.as_tensor(), kv.as_tensor(), vv.as_tensor()).unwrap();
    let loss = (out.to_dtype(DType::F64).unwrap() * w)
        .unwrap()
        .sum_all()
        .unwrap();
    let g = loss.backward().unwrap();
    [&qv, &kv, &vv].map(|x| flat(g.get(x.as_tensor()).expect("gradient tracked")))
}

fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-3);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * scale,
            "{what}[{i}]: {g} vs {w} (tol {tol} x {scale})"
        );
    }
}

#[test]
fn reference_gradients_match_finite_differences() {
    let l = KsaLayout::new(KsaConfig::new(3, 2, 1).unwrap(), 10).unwrap();
    let (q, k, v) = (
        rand(&[1, 2, l.len(), 4], 1),
        rand(&[1, 1, l.len(), 4], 2),
        rand(&[1, 1, l.len(), 4], 3),
    );
    let w = rand(&[1, 2, l.len(), 4], 4);
    let loss = |q: &Tensor, k: &Tensor, v: &Tensor| -> f64 {
        let o = reference::attention(q, k, v, &l).unwrap();
        (o * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let [gq, gk, gv] = grads(|a, b, c| reference::attention(a, b, c, &l), &q, &k, &v, &w);
    let eps = 1e-6;
    let bump = |x: &Tensor, i: usize, h: f64| {
        let mut d = flat(x);
        d[i] += h;
        Tensor::from_vec(d, x.dims(), &Device::Cpu).unwrap()
    };
    // Every tenth element of each input, central differences.
    for i in (0..flat(&q).len()).step_by(10) {
        let fd = (loss(&bump(&q, i, eps), &k, &v) - loss(&bump(&q, i, -eps), &k, &v)) / (2.0 * eps);
        assert!((fd - gq[i]).abs() < 1e-7, "dq[{i}] {fd} vs {}", gq[i]);
    }
    for i in (0..flat(&k).len()).step_by(10) {
        let fd = (loss(&q, &bump(&k, i, eps), &v) - loss(&q, &bump(&k, i, -eps), &v)) / (2.0 * eps);
        assert!((fd - gk[i]).abs() < 1e-7, "dk[{i}] {fd} vs {}", gk[i]);
        let fd = (loss(&q, &k, &bump(&v, i, eps)) - loss(&q, &k, &bump(&v, i, -eps))) / (2.0 * eps);
        assert!((fd - gv[i]).abs() < 1e-7, "dv[{i}] {fd} vs {}", gv[i]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// `ksa::attention` (whatever path serves CPU tensors) has the reference's
    /// gradients: f32 inputs, tolerance 2e-4 of the largest gradient.
    #[test]
    fn attention_gradients_equal_reference(
        c in 1usize..=6, s in 1usize..=3, w in prop_oneof![0usize..=3, Just(100)],
        n in 1usize..=30, b in 1usize..=2, g in prop_oneof![Just(1usize), Just(2)], seed in any::<u64>(),
    ) {
        let l = KsaLayout::new(KsaConfig::new(c, s, w).unwrap(), n).unwrap();
        let d = 8;
        let q = rand(&[b, 2 * g, l.len(), d], seed);
        let k = rand(&[b, 2, l.len(), d], seed + 1);
        let v = rand(&[b, 2, l.len(), d], seed + 2);
        let wt = rand(&[b, 2 * g, l.len(), d], seed + 3);
        let want = grads(|a, b, c| reference::attention(a, b, c, &l), &q, &k, &v, &wt);
        let got = grads(|a, b, c| ksa::attention(a, b, c, &l), &f32s(&q), &f32s(&k), &f32s(&v), &wt);
        for (i, name) in ["dq", "dk", "dv"].iter().enumerate() {
            assert_close(&got[i], &want[i], 2e-4, name);
        }
    }
}

/// The fast backward against the f64 reference's autograd on shapes that
/// reach every part of its tiling (64-query, 128-key tiles): lengths that are
/// no multiple of either (partial last query tile, partial key tiles), full
/// and edge key tiles, several key tiles per query tile, GQA 4:1, batch 2,
/// `W = 0`, a window beyond every chunk, `S > 1`, causal attention, and head
/// dims on the microkernel (multiples of 16) and off it. f32 inputs;
/// tolerance 2e-4 of the largest gradient.
#[test]
fn tiled_backward_equals_reference_on_tile_edges() {
    // (C, S, W) or None for causal; text tokens; batch; query, KV heads; d.
    type Case = (
        Option<(usize, usize, usize)>,
        usize,
        usize,
        usize,
        usize,
        usize,
    );
    let cases: [Case; 6] = [
        (Some((8, 1, 40)), 700, 2, 4, 1, 32), // 3 text + 1 summary key tiles per query tile
        (Some((8, 2, 16)), 390, 1, 8, 2, 16), // S > 1, GQA 4:1 with 2 KV heads
        (None, 300, 1, 4, 1, 16),             // causal: 3 key tiles, diagonal edges
        (Some((4, 2, 0)), 150, 2, 2, 2, 32),  // W = 0: own chunk plus summaries
        (Some((5, 3, 100)), 203, 1, 4, 2, 16), // window beyond every chunk
        (Some((8, 1, 16)), 260, 2, 4, 2, 24), // d off the microkernel (gemm)
    ];
    // The first case really has more than two key tiles per query tile.
    let l = KsaLayout::new(KsaConfig::new(8, 1, 40).unwrap(), 700).unwrap();
    let schedule = Schedule::ksa(&l, TileSizes::default()).unwrap();
    let mut tiles = Vec::new();
    schedule.key_tiles(schedule.query_tiles() - 1, &mut tiles);
    assert_eq!(tiles.len(), 4);
    for (i, (ksa, n, b, hq, hkv, d)) in cases.into_iter().enumerate() {
        let layout =
            ksa.map(|(c, s, w)| KsaLayout::new(KsaConfig::new(c, s, w).unwrap(), n).unwrap());
        let len = layout.map_or(n, |l| l.len());
        let seed = 100 * i as u64;
        let q = rand(&[b, hq, len, d], seed);
        let k = rand(&[b, hkv, len, d], seed + 1);
        let v = rand(&[b, hkv, len, d], seed + 2);
        let w = rand(&[b, hq, len, d], seed + 3);
        let (want, got) = match layout {
            Some(l) => (
                grads(|a, b, c| reference::attention(a, b, c, &l), &q, &k, &v, &w),
                grads(
                    |a, b, c| ksa::attention(a, b, c, &l),
                    &f32s(&q),
                    &f32s(&k),
                    &f32s(&v),
                    &w,
                ),
            ),
            None => (
                grads(reference::causal_attention, &q, &k, &v, &w),
                grads(ksa::causal_attention, &f32s(&q), &f32s(&k), &f32s(&v), &w),
            ),
        };
        for (j, name) in ["dq", "dk", "dv"].iter().enumerate() {
            assert_close(&got[j], &want[j], 2e-4, &format!("case {i} {name}"));
        }
    }
}

fn f32s(x: &Tensor) -> Tensor {
    x.to_dtype(DType::F32).unwrap()
}
