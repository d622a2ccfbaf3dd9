//! The fuzz suite: structured random inputs over the public API (pattern
//! strings, config JSON mutations, checkpoint corruptions, attention on any
//! shape, dtype, view and value, layout ops, the model's forward, cache
//! steps, generation options), each case under `catch_unwind`. Every case
//! must end in a typed [`ksa::Error`] or in a result equal to an
//! independent computation, and a cache must be unchanged after any error.
//! Cases that could exhaust memory run in a child process (this test binary
//! re-executed) under an address-space limit, so an abort there is counted
//! instead of killing the suite.
//!
//! The CI budget is the default; a long run is
//! `KSA_FUZZ_CASES=200000 KSA_FUZZ_SEED=7 cargo test --release --test fuzz -- --nocapture`.
//! The counts per family and outcome are printed.

#[path = "fuzz/gen.rs"]
mod gen;
mod model_common;
mod non_finite;

use candle_core::{DType, Device, Tensor};
use gen::{Rng, VIEWS};
use ksa::cpu::CpuKernel;
use ksa::schedule::TileSizes;
use ksa::{
    AttentionOptions, GenerateOptions, KsaCache, KsaConfig, KsaLayout, LogitRows, Qwen3Ksa,
    Qwen3KsaConfig, Sampling,
};
use model_common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

/// Cases of the CI budget (the child's memory-hungry cases come on top).
const CI_CASES: usize = 20_000;
/// Memory-hungry cases run in the child, per 100 cases of the main run.
const CHILD_PER_100: usize = 2;
/// The child's address-space limit.
const CHILD_MEMORY: u64 = 3 << 30;
const CHILD_ENV: &str = "KSA_FUZZ_CHILD";

/// What a case found wrong (a result that differs from the independent
/// computation, a valid input refused, a cache changed by a failed step).
static WRONG: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn wrong(msg: String) {
    WRONG.lock().unwrap().push(msg);
}

/// Asserts a condition of a case without panicking (a panic is the crate's).
macro_rules! check {
    ($cond:expr, $($msg:tt)*) => {
        // Bound first: a NaN comparison is false, so a NaN fails the check.
        let ok: bool = $cond;
        if !ok {
            wrong(format!($($msg)*));
        }
    };
}

#[derive(Default, Clone, Copy)]
struct Tally {
    cases: u64,
    ok: u64,
    errors: u64,
    panics: u64,
    aborts: u64,
}

type Counts = BTreeMap<&'static str, Tally>;

/// Runs one case under `catch_unwind` and counts its outcome.
fn run_case(counts: &mut Counts, family: &'static str, case: impl FnOnce() -> ksa::Result<()>) {
    let t = counts.entry(family).or_default();
    t.cases += 1;
    match catch_unwind(AssertUnwindSafe(case)) {
        Ok(Ok(())) => t.ok += 1,
        Ok(Err(_)) => t.errors += 1,
        Err(p) => {
            t.panics += 1;
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            wrong(format!("{family}: panic: {msg}"));
        }
    }
}

fn env_usize(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn fuzz_public_api() {
    if let Some(seed) = env_usize(CHILD_ENV) {
        return child(seed);
    }
    let cases = env_usize("KSA_FUZZ_CASES").unwrap_or(CI_CASES as u64) as usize;
    let seed = env_usize("KSA_FUZZ_SEED").unwrap_or(0x004B_5341);
    // A panic is a counted outcome, not noise on stderr.
    std::panic::set_hook(Box::new(|_| {}));
    let fx = Fixtures::new();
    let mut counts = Counts::new();
    let bar = indicatif::ProgressBar::new(cases as u64);
    let mut rng = Rng::new(seed);
    for i in 0..cases {
        let mut r = Rng::new(rng.u64());
        // Weights per 100 cases: cheap families dominate, the model-sized
        // ones get enough to cover their branches.
        match i % 100 {
            0..=14 => run_case(&mut counts, "pattern", || pattern_case(&mut r)),
            15..=34 => run_case(&mut counts, "config", || config_case(&mut r, &fx)),
            35..=69 => run_case(&mut counts, "attention", || attention_case(&mut r)),
            70..=79 => run_case(&mut counts, "layout", || layout_case(&mut r)),
            80..=86 => run_case(&mut counts, "model", || model_case(&mut r, &fx)),
            87..=94 => run_case(&mut counts, "cache", || cache_case(&mut r, &fx)),
            95..=98 => run_case(&mut counts, "generate", || generate_case(&mut r, &fx)),
            _ => run_case(&mut counts, "checkpoint", || checkpoint_case(&mut r, &fx)),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let _ = std::panic::take_hook();
    // Memory-hungry cases in a child under an address-space limit.
    let child_cases = (cases * CHILD_PER_100 / 100).max(50);
    let child_seed = rng.u64() % (1 << 52);
    let tally = run_child(child_seed, child_cases);
    counts.insert("memory (child)", tally);

    let mut total = Tally::default();
    println!("fuzz seed {seed}: family, cases, typed errors, ok, panics, aborts");
    for (family, t) in &counts {
        println!(
            "  {family:<16} {:>7} {:>7} {:>7} {:>3} {:>3}",
            t.cases, t.errors, t.ok, t.panics, t.aborts
        );
        total.cases += t.cases;
        total.errors += t.errors;
        total.ok += t.ok;
        total.panics += t.panics;
        total.aborts += t.aborts;
    }
    println!(
        "  {:<16} {:>7} {:>7} {:>7} {:>3} {:>3}",
        "total", total.cases, total.errors, total.ok, total.panics, total.aborts
    );
    let wrongs = WRONG.lock().unwrap();
    for w in wrongs.iter().take(40) {
        println!("WRONG {w}");
    }
    assert_eq!(total.panics, 0, "panics (see WRONG lines)");
    assert_eq!(total.aborts, 0, "the child aborted");
    assert!(wrongs.is_empty(), "{} wrong results", wrongs.len());
    assert!(total.ok > total.cases / 10 && total.errors > total.cases / 10);
}

// ---------------------------------------------------------------- fixtures

/// The tiny models every model-sized case shares (built once).
struct Fixtures {
    config: Value,
    /// Truncated logits (`truncate_predict_nums` = 50 text ids).
    model: Qwen3Ksa,
    /// `truncate_predict_nums: 0`: the logits cover the summary rows too.
    full: Qwen3Ksa,
    /// A valid checkpoint of `config` written to disk, and its weights.
    weights: std::collections::HashMap<String, Tensor>,
}

impl Fixtures {
    fn new() -> Self {
        let config = tiny_config();
        let build = |c: &Value| {
            let weights = random_weights(&reference_tensors(c), 5);
            let cfg = Qwen3KsaConfig::from_json_str(&c.to_string()).unwrap();
            let vb = candle_nn::VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
            (Qwen3Ksa::new(&cfg, vb).unwrap(), weights)
        };
        let (model, weights) = build(&config);
        let (full, _) = build(&with(&config, json!({ "truncate_predict_nums": 0 })));
        Self {
            config,
            model,
            full,
            weights,
        }
    }
}

// ---------------------------------------------------------------- patterns

fn pattern_case(r: &mut Rng) -> ksa::Result<()> {
    let atoms = [
        "1",
        "0",
        "128",
        "[1]",
        "[1,2]",
        "[]",
        "(",
        ")",
        "[",
        "]",
        "*",
        "+",
        ",",
        " ",
        "3",
        "1000000000",
        "18446744073709551615",
        "99999999999999999999",
        "-1",
        "**",
        "x",
        "[[1]]",
    ];
    let mut s = String::new();
    match r.below(4) {
        // Deep nesting.
        0 => {
            let depth = r.range(1, 200);
            s.push_str(&"(".repeat(depth));
            s.push_str("[1]");
            s.push_str(&")".repeat(depth));
        }
        // Huge repetition.
        1 => s = format!("[1]*{}*{}", r.hostile_usize(), r.range(0, 100)),
        _ => {
            for _ in 0..r.range(1, 12) {
                s.push_str(atoms[r.below(atoms.len())]);
            }
        }
    }
    let value = ksa::model_config::parse_pattern(&s)?;
    if let ksa::model_config::PatternValue::List(l) = value {
        check!(
            l.len() <= ksa::model_config::MAX_PATTERN_ENTRIES,
            "pattern {s:?} expanded to {}",
            l.len()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- configs

/// A hostile JSON value for a config field.
fn hostile_json(r: &mut Rng) -> Value {
    match r.below(12) {
        0 => json!(null),
        1 => json!(-1),
        2 => json!(0),
        3 => json!(r.hostile_usize() as u64),
        4 => json!(1u64 << r.range(20, 63)),
        5 => json!(r.pick(&[1e308, -1e-6, 0.0, 1e-300, -10000.0, 0.5, 1.0])),
        6 => json!("([1]*3+[2]*1)*1"),
        7 => json!(r.pick(&["origin", "nonsense", "", "[1,2]", "1"])),
        8 => json!([1, 0]),
        9 => json!(true),
        10 => json!({}),
        _ => json!(r.range(1, 8)),
    }
}

const FIELDS: [&str; 22] = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "tie_word_embeddings",
    "truncate_predict_nums",
    "summary_chunk_size",
    "summary_token_num",
    "summary_token_begin",
    "summary_sliding_chunk_num",
    "summary_layer_freq",
    "summary_chunk_position_ids_type",
    "summary_token_position_ids_type",
    "summary_independent_parameters",
    "summary_independent_attention_layernorm",
    "mix_coeff",
    "rope_scaling",
];

fn mutated_config(r: &mut Rng, base: &Value) -> Value {
    let mut c = base.clone();
    for _ in 0..r.range(1, 3) {
        let field = r.pick(&FIELDS);
        let v = hostile_json(r);
        c.as_object_mut().unwrap().insert(field.to_string(), v);
    }
    c
}

fn config_case(r: &mut Rng, fx: &Fixtures) -> ksa::Result<()> {
    let text = if r.chance(0.05) {
        // Not even JSON, or JSON of another shape.
        r.pick(&["", "[", "[]", "1", "{\"vocab_size\": NaN}", "null"])
            .to_string()
    } else {
        mutated_config(r, &fx.config).to_string()
    };
    let config = Qwen3KsaConfig::from_json_str(&text)?;
    config.validate()?;
    let expected = Qwen3Ksa::expected_tensors(&config)?;
    check!(
        expected.len() <= 4 + 16 * ksa::model_config::MAX_LAYERS,
        "expected list of {}",
        expected.len()
    );
    // Small enough to build: every accepted config gives a model whose
    // logits are finite for finite weights and inputs.
    let elements: usize = expected
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    if elements > 200_000 {
        return Ok(());
    }
    let weights = random_weights(&expected, r.u64());
    let vb = candle_nn::VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let model = Qwen3Ksa::new(&config, vb)?;
    let text_ids: Vec<u32> = (0..config.vocab_size as u32)
        .filter(|&t| config.check_text_token(t.into()).is_ok())
        .take(64)
        .collect();
    if text_ids.is_empty() {
        return Ok(());
    }
    let n = r.range(1, 10);
    let ids: Vec<u32> = (0..n).map(|_| r.pick(&text_ids)).collect();
    let logits = model.forward(&Tensor::new(&ids[..], &Device::Cpu)?.unsqueeze(0)?)?;
    let flat = logits.flatten_all()?.to_vec1::<f32>()?;
    check!(
        flat.iter().all(|x| x.is_finite()),
        "accepted config gives non-finite logits: {text}"
    );
    Ok(())
}

// ---------------------------------------------------------------- attention

/// The independent computation: per row, softmax over exactly the allowed
/// keys in f64, `allowed(query, key)`. `None` for a row that reads a
/// non-finite query, key or value (docs/robustness.md: unspecified there).
#[allow(clippy::too_many_arguments)]
fn naive(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (b, hq, hkv, n, d): (usize, usize, usize, usize, usize),
    scale: f64,
    allowed: &dyn Fn(usize, usize) -> bool,
) -> Vec<Option<Vec<f64>>> {
    let mut out = Vec::with_capacity(b * hq * n);
    for bi in 0..b {
        for h in 0..hq {
            let kh = h / (hq / hkv);
            for i in 0..n {
                let qrow = &q[((bi * hq + h) * n + i) * d..][..d];
                let keys: Vec<usize> = (0..n).filter(|&j| allowed(i, j)).collect();
                let row = |x: &[f32], j: usize| x[((bi * hkv + kh) * n + j) * d..][..d].to_vec();
                let finite = qrow.iter().all(|x| x.is_finite())
                    && keys.iter().all(|&j| {
                        row(k, j).iter().all(|x| x.is_finite())
                            && row(v, j).iter().all(|x| x.is_finite())
                    });
                if !finite || keys.is_empty() {
                    out.push(None);
                    continue;
                }
                let s: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        let kr = row(k, j);
                        scale * (0..d).map(|c| qrow[c] as f64 * kr[c] as f64).sum::<f64>()
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let l: f64 = p.iter().sum();
                let mut o = vec![0f64; d];
                for (pj, &j) in p.iter().zip(&keys) {
                    let vr = row(v, j);
                    for c in 0..d {
                        o[c] += pj / l * vr[c] as f64;
                    }
                }
                out.push(Some(o));
            }
        }
    }
    out
}

#[derive(Clone, Copy, Debug)]
enum Api {
    Ksa,
    Causal,
    RefKsa,
    RefCausal,
    KernelKsa,
    KernelCausal,
}

fn attention_case(r: &mut Rng) -> ksa::Result<()> {
    let api = r.pick(&[
        Api::Ksa,
        Api::Causal,
        Api::RefKsa,
        Api::RefCausal,
        Api::KernelKsa,
        Api::KernelCausal,
    ]);
    let mut valid = true;
    let config = KsaConfig::new(r.range(1, 6), r.range(0, 3), r.range(0, 4));
    let layout = match config {
        Ok(c) => Some(KsaLayout::new(c, r.range(0, 22))?),
        Err(_) => None,
    };
    let ksa_api = matches!(api, Api::Ksa | Api::RefKsa | Api::KernelKsa);
    let n = match (&layout, ksa_api) {
        (Some(l), true) => l.len(),
        (None, true) => return config.map(|_| ()),
        _ => r.range(0, 30),
    };
    let hkv = r.range(1, 2);
    let mut hq = hkv * r.range(1, 3);
    if r.chance(0.05) {
        hq += 1; // GQA mismatch
        valid &= hq % hkv == 0;
    }
    let b = r.pick(&[0, 1, 1, 2]);
    let d = r.pick(&[1, 2, 3, 4, 8, 8, 16, 0]);
    let dtype = if r.chance(0.05) {
        valid = false;
        r.pick(&[DType::U8, DType::U32, DType::I64])
    } else {
        r.pick(&[DType::F32, DType::F32, DType::F16, DType::BF16, DType::F64])
    };
    let mut kn = n;
    if r.chance(0.04) {
        kn = n + 1; // length mismatch
        valid = false;
    }
    let qd = [b, hq, n, d];
    let kd = [b, hkv, kn, d];
    let scale = r.pick(&[None, Some(0.5), Some(0.0), Some(-1.0)]);
    let make = |dims: &[usize], r: &mut Rng, poison: bool| {
        let mut data = gen::values(r, dims, 1.5);
        if poison && !data.is_empty() && r.chance(0.3) {
            let at = r.below(data.len());
            data[at] = gen::non_finite(r);
        }
        let view = r.pick(&VIEWS);
        if dims.contains(&0) && r.chance(0.5) {
            return (gen::empty_with_offset(dims, dtype), data);
        }
        gen::tensor(dims, data, dtype, view)
    };
    let (q, qv) = make(&qd, r, true);
    let (k, kv) = make(&kd, r, true);
    let (v, vv) = make(&kd, r, true);
    let options = AttentionOptions { scale };
    let hostile = [r.hostile_usize(), r.hostile_usize()];
    let tiles = if r.chance(0.3) {
        let t = TileSizes {
            query: r.pick(&[1, 3, 16, 64, 0, hostile[0]]),
            key: r.pick(&[1, 5, 32, 128, 0, hostile[1]]),
        };
        // Only the kernel takes tile sizes.
        valid &= !matches!(api, Api::KernelKsa | Api::KernelCausal)
            || (1..=ksa::schedule::MAX_TILE).contains(&t.query)
                && (1..=ksa::schedule::MAX_TILE).contains(&t.key);
        t
    } else {
        TileSizes::default()
    };
    let kernel = CpuKernel {
        tiles,
        ..Default::default()
    };
    let out = match (api, &layout) {
        (Api::Ksa, Some(l)) => ksa::attention_with(&q, &k, &v, l, &options),
        (Api::RefKsa, Some(l)) => ksa::reference::attention_with(&q, &k, &v, l, &options),
        (Api::KernelKsa, Some(l)) => kernel.attention(&q, &k, &v, l, &options).map(|x| x.0),
        (Api::Causal, _) => ksa::causal_attention_with(&q, &k, &v, &options),
        (Api::RefCausal, _) => ksa::reference::causal_attention_with(&q, &k, &v, &options),
        (Api::KernelCausal, _) => kernel.causal_attention(&q, &k, &v, &options).map(|x| x.0),
        _ => unreachable!("KSA apis have a layout"),
    };
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            check!(
                !valid,
                "{api:?} refused a valid input ({qd:?} {kd:?} {dtype:?} {tiles:?}): {e}"
            );
            return Err(e);
        }
    };
    check!(
        valid,
        "{api:?} accepted an invalid input {qd:?} {kd:?} {dtype:?} {tiles:?}"
    );
    check!(
        out.dims() == qd,
        "{api:?} output {:?}, want {qd:?}",
        out.dims()
    );
    check!(
        out.dtype() == dtype,
        "{api:?} output dtype {:?}",
        out.dtype()
    );
    let got = out.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let sc = scale.unwrap_or(1.0 / (d.max(1) as f64).sqrt());
    let allowed = |i: usize, j: usize| match (ksa_api, &layout) {
        (true, Some(l)) => l.can_attend(i, j),
        _ => j <= i,
    };
    let want = naive(&qv, &kv, &vv, (b, hq, hkv, n, d), sc, &allowed);
    // The fast paths compute in f32 and round once to the dtype; the
    // reference computes in f64.
    let reference = matches!(api, Api::RefKsa | Api::RefCausal);
    let tol = match dtype {
        DType::F16 => 4e-3,
        DType::BF16 => 3e-2,
        DType::F64 if reference => 1e-10,
        _ => 2e-5,
    };
    for (row, w) in want.iter().enumerate() {
        let Some(w) = w else { continue };
        for c in 0..d {
            let g = got[row * d + c];
            // |v| <= 1.5 and the output is a convex combination.
            check!(
                (g - w[c]).abs() <= tol * 2.0,
                "{api:?} {qd:?} {dtype:?} {tiles:?} row {row} col {c}: got {g}, want {}",
                w[c]
            );
        }
    }
    // The op's backward (candle autograd) on the same inputs, with a dO that
    // may hold a non-finite value too: every gradient row that does not
    // depend on a planted value equals the f64 gradients of the cleaned
    // input. f32 and f64 only (the half dtypes round the gradients).
    if matches!(api, Api::Ksa | Api::Causal)
        && matches!(dtype, DType::F32 | DType::F64)
        && q.elem_count() > 0
    {
        let mut dout = gen::values(r, &qd, 1.5);
        if r.chance(0.3) {
            let at = r.below(dout.len());
            dout[at] = gen::non_finite(r);
        }
        let attend = |q: &Tensor, k: &Tensor, v: &Tensor| match &layout {
            Some(l) if ksa_api => ksa::attention_with(q, k, v, l, &options),
            _ => ksa::causal_attention_with(q, k, v, &options),
        };
        let inputs = Inputs {
            q: &qv,
            k: &kv,
            v: &vv,
            dout: &dout,
            dims: (b, hq, hkv, n, d),
        };
        if let Err(e) = backward_case([&q, &k, &v], &attend, &inputs, sc, &allowed) {
            check!(false, "{api:?} backward {qd:?} {kd:?} {dtype:?}: {e}");
        }
    }
    Ok(())
}

/// What the tensors of a backward case read as, f32 row-major.
struct Inputs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    dout: &'a [f32],
    dims: non_finite::Dims,
}

/// Runs `attend` on `Var` copies of `qkv` and candle autograd on
/// `sum(out * dout)`; every gradient row that does not depend on a
/// non-finite input must equal the f64 gradients of the cleaned input.
fn backward_case(
    qkv: [&Tensor; 3],
    attend: &dyn Fn(&Tensor, &Tensor, &Tensor) -> ksa::Result<Tensor>,
    x: &Inputs<'_>,
    scale: f64,
    allowed: &dyn Fn(usize, usize) -> bool,
) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let vars = qkv
        .map(candle_core::Var::from_tensor)
        .into_iter()
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(|e| err(&e))?;
    let out = attend(&vars[0], &vars[1], &vars[2]).map_err(|e| err(&e))?;
    let dout = Tensor::from_vec(x.dout.to_vec(), out.dims(), &Device::Cpu)
        .and_then(|t| t.to_dtype(out.dtype()))
        .map_err(|e| err(&e))?;
    let grads = (out * dout)
        .and_then(|l| l.sum_all())
        .and_then(|l| l.backward())
        .map_err(|e| err(&e))?;
    let reach = non_finite::reach(x.q, x.k, x.v, x.dout, x.dims, allowed);
    let want = non_finite::grads(
        &non_finite::cleaned(x.q),
        &non_finite::cleaned(x.k),
        &non_finite::cleaned(x.v),
        &non_finite::cleaned(x.dout),
        x.dims,
        scale,
        allowed,
    );
    for (((var, want), reach), name) in vars
        .iter()
        .zip([&want.0, &want.1, &want.2])
        .zip([&reach.dq, &reach.dk, &reach.dv])
        .zip(["dq", "dk", "dv"])
    {
        let got = grads
            .get(var)
            .ok_or(format!("no gradient for {name}"))?
            .to_dtype(DType::F64)
            .and_then(|g| g.flatten_all())
            .and_then(|g| g.to_vec1::<f64>())
            .map_err(|e| err(&e))?;
        non_finite::compare(name, &got, want, reach, x.dims.4, 1e-4)?;
    }
    Ok(())
}

// ---------------------------------------------------------------- layout ops

fn layout_case(r: &mut Rng) -> ksa::Result<()> {
    let layout = KsaLayout::new(
        KsaConfig::new(r.range(1, 5), r.range(1, 3), 1)?,
        r.range(0, 20),
    )?;
    let (a, c) = (r.range(0, 2), r.range(1, 4));
    let big = layout.len();
    let view = r.pick(&VIEWS);
    match r.below(3) {
        0 | 1 => {
            let dims = [a, big, c];
            let data = gen::values(r, &dims, 1.0);
            let (x, data) = gen::tensor(&dims, data, DType::F32, view);
            let text = r.below(2) == 0;
            let got = if text {
                layout.take_text(&x, 1)?
            } else {
                layout.take_summaries(&x, 1)?
            };
            let slots = if text {
                layout.text_slots()
            } else {
                layout.summary_slots()
            };
            check!(
                got.dims() == [a, slots.len(), c],
                "take dims {:?}",
                got.dims()
            );
            let got = got.flatten_all()?.to_vec1::<f32>()?;
            let mut want = vec![];
            for ai in 0..a {
                for &s in &slots {
                    want.extend_from_slice(&data[(ai * big + s as usize) * c..][..c]);
                }
            }
            check!(
                got == want,
                "take {view:?} text={text}: {got:?} vs {want:?}"
            );
        }
        _ => {
            let n = layout.text_len();
            let s = layout.config().summaries();
            let hd = [a, n, c];
            let (hidden, hdata) = gen::tensor(&hd, gen::values(r, &hd, 1.0), DType::F32, view);
            let sview = r.pick(&VIEWS);
            let (sums, sdata) =
                gen::tensor(&[s, c], gen::values(r, &[s, c], 1.0), DType::F32, sview);
            let got = layout.interleave(&hidden, &sums)?;
            check!(
                got.dims() == [a, big, c],
                "interleave dims {:?}",
                got.dims()
            );
            let got = got.flatten_all()?.to_vec1::<f32>()?;
            let mut want = vec![];
            for ai in 0..a {
                for slot in 0..big {
                    match layout.slot_kind(slot).unwrap() {
                        ksa::SlotKind::Text { token } => {
                            want.extend_from_slice(&hdata[(ai * n + token) * c..][..c])
                        }
                        ksa::SlotKind::Summary { index, .. } => {
                            want.extend_from_slice(&sdata[index * c..][..c])
                        }
                    }
                }
            }
            check!(got == want, "interleave {view:?}/{sview:?}");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- model

/// A token id: mostly text ids, sometimes summary rows, the vocabulary's
/// end, or the id dtype's extremes.
fn token(r: &mut Rng) -> i64 {
    match r.below(20) {
        0 => r.pick(&[50, 51]),      // summary rows
        1 => r.pick(&[52, 53, 255]), // past the vocabulary (u8 max)
        2 => u32::MAX as i64,
        3 => r.pick(&[i64::MAX, -1, i64::MIN]),
        _ => r.range(0, 49) as i64,
    }
}

fn is_text(t: i64) -> bool {
    (0..50).contains(&t)
}

fn model_case(r: &mut Rng, fx: &Fixtures) -> ksa::Result<()> {
    let (b, n) = (r.pick(&[0, 1, 1, 2]), r.range(0, 12));
    let ids: Vec<i64> = (0..b * n).map(|_| token(r)).collect();
    let dtype = r.pick(&[DType::U32, DType::U8, DType::I64, DType::F32]);
    // Ids the dtype cannot hold are not this dtype's case.
    let fits = |t: i64| match dtype {
        DType::U8 => (0..=255).contains(&t),
        DType::U32 => (0..=u32::MAX as i64).contains(&t),
        _ => true,
    };
    let ids: Vec<i64> = ids
        .into_iter()
        .map(|t| if fits(t) { t } else { 7 })
        .collect();
    let t = Tensor::from_vec(ids.clone(), (b, n), &Device::Cpu)?;
    let t = if dtype == DType::F32 {
        t.to_dtype(DType::F64)?.to_dtype(DType::F32)?
    } else {
        t.to_dtype(dtype)?
    };
    let valid = dtype != DType::F32 && ids.iter().all(|&t| is_text(t));
    let out = match fx.model.forward(&t) {
        Ok(o) => o,
        Err(e) => {
            check!(!valid, "forward refused valid ids {ids:?} ({dtype:?}): {e}");
            return Err(e);
        }
    };
    check!(valid, "forward accepted ids {ids:?} ({dtype:?})");
    check!(out.dims() == [b, n, 50], "forward dims {:?}", out.dims());
    if b > 0 && n > 0 {
        // Independent computation: the decode cache, prompt by prompt.
        let mut cache = KsaCache::new(&fx.model, b)?;
        let rows: Vec<Vec<u32>> = ids
            .chunks(n)
            .map(|c| c.iter().map(|&t| t as u32).collect())
            .collect();
        let inputs: Vec<(usize, &[u32])> =
            rows.iter().enumerate().map(|(i, r)| (i, &r[..])).collect();
        let want = Tensor::stack(&cache.append(&fx.model, &inputs, LogitRows::All)?, 0)?;
        let diff = (out - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        check!(diff <= 1e-4, "forward vs cache: max diff {diff}");
    }
    Ok(())
}

// ---------------------------------------------------------------- cache

/// Lengths of every sequence: what a failed step must not change.
fn lens(cache: &KsaCache) -> Vec<usize> {
    (0..cache.batch_size())
        .map(|s| cache.seq_len(s).unwrap())
        .collect()
}

fn cache_case(r: &mut Rng, fx: &Fixtures) -> ksa::Result<()> {
    let m = &fx.model;
    let batch = r.range(1, 3);
    let mut cache = if r.chance(0.5) {
        KsaCache::with_capacity(m, batch, r.range(0, 14))?
    } else {
        KsaCache::new(m, batch)?
    };
    let mut history: Vec<Vec<u32>> = vec![vec![]; batch];
    // The first rejected step's error: the case's outcome once every check ran.
    let mut rejected = None;
    for _ in 0..r.range(1, 4) {
        let mut inputs: Vec<(usize, Vec<u32>)> = vec![];
        for _ in 0..r.range(0, batch + 1) {
            let seq = if r.chance(0.05) {
                batch + r.below(3)
            } else {
                r.below(batch)
            };
            let len = r.pick(&[0, 1, 1, 2, 5]);
            let toks = (0..len)
                .map(|_| {
                    let t = token(r);
                    if (0..=u32::MAX as i64).contains(&t) {
                        t as u32
                    } else {
                        3
                    }
                })
                .collect();
            inputs.push((seq, toks));
        }
        let view: Vec<(usize, &[u32])> = inputs.iter().map(|(s, t)| (*s, &t[..])).collect();
        let before = cache.clone();
        let before_lens = lens(&cache);
        match cache.append(m, &view, r.pick(&[LogitRows::Last, LogitRows::All])) {
            Ok(logits) => {
                check!(logits.len() == inputs.len(), "one logits tensor per input");
                for (s, t) in &inputs {
                    history[*s].extend_from_slice(t);
                }
            }
            Err(e) => {
                check!(
                    lens(&cache) == before_lens,
                    "a failed step changed lengths: {e}"
                );
                // The next valid step from the failed cache and from the
                // clone taken before it agree exactly.
                let probe: Vec<(usize, [u32; 1])> =
                    (0..batch).map(|s| (s, [(s as u32 * 7) % 50])).collect();
                let probe: Vec<(usize, &[u32])> = probe.iter().map(|(s, t)| (*s, &t[..])).collect();
                let (mut a, mut b) = (cache.clone(), before);
                match (
                    a.append(m, &probe, LogitRows::Last),
                    b.append(m, &probe, LogitRows::Last),
                ) {
                    (Ok(x), Ok(y)) => {
                        for (x, y) in x.iter().zip(&y) {
                            let d = (x - y)?.abs()?.max_all()?.to_scalar::<f32>()?;
                            check!(d == 0.0, "a failed step changed the cache ({e}): diff {d}");
                        }
                    }
                    (Err(_), Err(_)) => {} // e.g. both at capacity
                    _ => wrong(format!("a failed step changed the cache ({e})")),
                }
                rejected.get_or_insert(e);
            }
        }
    }
    // Independent computation: a full forward over each sequence's history.
    for (s, h) in history.iter().enumerate() {
        if h.is_empty() || cache.capacity().is_some_and(|c| h.len() >= c) {
            continue;
        }
        let next = [(s as u32 * 11) % 50];
        let got = cache.append(m, &[(s, &next[..])], LogitRows::Last)?;
        let mut all = h.clone();
        all.push(next[0]);
        let want = m.forward(&Tensor::new(&all[..], &Device::Cpu)?.unsqueeze(0)?)?;
        let want = want.narrow(1, all.len() - 1, 1)?.squeeze(0)?;
        let d = (&got[0] - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        check!(d <= 1e-4, "cache vs forward after errors: diff {d}");
    }
    rejected.map_or(Ok(()), Err)
}

// ---------------------------------------------------------------- generate

fn generate_case(r: &mut Rng, fx: &Fixtures) -> ksa::Result<()> {
    let model = if r.chance(0.5) { &fx.full } else { &fx.model };
    let prompts: Vec<Vec<u32>> = (0..r.range(0, 2))
        .map(|_| {
            (0..r.pick(&[0, 1, 3, 6]))
                .map(|_| {
                    let t = token(r);
                    if (0..=u32::MAX as i64).contains(&t) {
                        t as u32
                    } else {
                        1
                    }
                })
                .collect()
        })
        .collect();
    let sampling = if r.chance(0.5) {
        Sampling::Greedy
    } else {
        Sampling::TopP {
            temperature: r.pick(&[1.0, 0.7, 0.0, -1.0, f64::NAN, f64::INFINITY, 1e-30, 1e30]),
            top_p: r.pick(&[0.9, 1.0, 0.0, 1.5, f64::NAN, 1e-9]),
            seed: r.u64(),
        }
    };
    let options = GenerateOptions {
        max_new_tokens: r.range(0, 4),
        sampling,
        stop_tokens: if r.chance(0.3) {
            vec![r.range(0, 51) as u32]
        } else {
            vec![]
        },
    };
    let refs: Vec<&[u32]> = prompts.iter().map(|p| &p[..]).collect();
    let mut streamed = vec![vec![]; prompts.len()];
    let out = model.generate(&refs, &options, |s, t| streamed[s].push(t))?;
    check!(out == streamed, "streamed tokens differ from the result");
    for (p, toks) in prompts.iter().zip(&out) {
        check!(
            toks.iter().all(|&t| is_text(t as i64)),
            "generated a non-text id: {toks:?}"
        );
        if sampling == Sampling::Greedy && !toks.is_empty() {
            // Independent computation: argmax of the forward's last row
            // over text ids.
            let logits = model.forward(&Tensor::new(&p[..], &Device::Cpu)?.unsqueeze(0)?)?;
            let last = logits
                .narrow(1, p.len() - 1, 1)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let best = (0..50).fold(0, |b, i| if last[i] > last[b] { i } else { b });
            check!(
                toks[0] as usize == best,
                "greedy picked {} not {best}",
                toks[0]
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- checkpoints

fn checkpoint_case(r: &mut Rng, fx: &Fixtures) -> ksa::Result<()> {
    let dir = temp_dir("fuzz");
    let result = checkpoint_in(r, fx, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn checkpoint_in(r: &mut Rng, fx: &Fixtures, dir: &Path) -> ksa::Result<()> {
    let mut config = fx.config.clone();
    let mut weights = fx.weights.clone();
    let mut names: Vec<String> = weights.keys().cloned().collect();
    names.sort(); // the seed alone picks the tensor
    match r.below(7) {
        0 => config = mutated_config(r, &config),
        1 => {
            weights.remove(&r.pick(&names));
        }
        2 => {
            weights.insert(
                r.pick(&names),
                Tensor::zeros((3, 5), DType::F32, &Device::Cpu)?,
            );
        }
        3 => {
            // More layers than the checkpoint holds: the first missing
            // tensor, whatever the claim (beyond MAX_LAYERS: TooLarge).
            let layers = r.pick(&[3u64, 4000, 20_000_000, 1 << 31]);
            config["num_hidden_layers"] = json!(layers);
            config["summary_sliding_chunk_num"] = json!(2);
        }
        _ => {}
    }
    write_checkpoint(dir, &config, &weights);
    let file = dir.join("model.safetensors");
    match r.below(6) {
        0 => {
            // Truncated file.
            let bytes = std::fs::read(&file).unwrap();
            let cut = r.below(bytes.len());
            std::fs::write(&file, &bytes[..cut]).unwrap();
        }
        1 => {
            // A flipped byte in the header (or its length prefix).
            let mut bytes = std::fs::read(&file).unwrap();
            let at = r.below(bytes.len().min(400));
            bytes[at] ^= 1 << r.below(8);
            std::fs::write(&file, &bytes).unwrap();
        }
        2 => {
            // A shard index naming odd files.
            let shard = r.pick(&[
                "../model.safetensors",
                "missing.safetensors",
                "model.safetensors",
                "..",
            ]);
            let index = json!({ "weight_map": { "model.norm.weight": shard } });
            std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        }
        _ => {}
    }
    let dtype = r.pick(&[DType::F32, DType::F32, DType::BF16, DType::U8, DType::I64]);
    let model = Qwen3Ksa::from_folder(dir, dtype, &Device::Cpu)?;
    check!(
        gen::is_float(dtype),
        "an integer model dtype {dtype:?} loaded"
    );
    let ids = Tensor::new(&[[1u32, 2, 3, 4, 5, 6]], &Device::Cpu)?;
    model.forward(&ids)?;
    Ok(())
}

// ---------------------------------------------------------------- memory child

/// Runs the child and reads its counts; a child killed by a signal (an
/// abort) counts one abort for the cases it did not report.
fn run_child(seed: u64, cases: usize) -> Tally {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args([
            "--exact",
            "fuzz_public_api",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, seed.to_string())
        .env("KSA_FUZZ_CASES", cases.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut tally = Tally::default();
    for line in stdout.lines() {
        // The harness prints the test's name on the same line.
        if let Some((_, rest)) = line.split_once("CHILD ") {
            let n: Vec<u64> = rest.split(' ').filter_map(|x| x.parse().ok()).collect();
            if let [cases, errors, ok, panics] = n[..] {
                tally = Tally {
                    cases,
                    errors,
                    ok,
                    panics,
                    aborts: 0,
                };
            }
        } else if let Some(w) = line.strip_prefix("WRONG ") {
            wrong(format!("child: {w}"));
        }
    }
    if !out.status.success() || tally.cases == 0 {
        tally.aborts += 1;
        println!(
            "child (seed {seed}) failed: {:?}\n{}\n{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    tally
}

/// The child: memory-hungry cases under an address-space limit.
fn child(seed: u64) {
    let limit = libc::rlimit {
        rlim_cur: CHILD_MEMORY,
        rlim_max: CHILD_MEMORY,
    };
    // SAFETY: setrlimit only reads the struct.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) }, 0);
    std::panic::set_hook(Box::new(|_| {}));
    let cases = env_usize("KSA_FUZZ_CASES").unwrap_or(50) as usize;
    let fx = Fixtures::new();
    let mut counts = Counts::new();
    let mut r = Rng::new(seed);
    for i in 0..cases {
        let mut c = Rng::new(r.u64());
        run_case(&mut counts, "memory", || hungry_case(&mut c, &fx, i));
    }
    let t = counts["memory"];
    for w in WRONG.lock().unwrap().iter() {
        println!("WRONG {w}");
    }
    println!("CHILD {} {} {} {}", t.cases, t.errors, t.ok, t.panics);
}

fn hungry_case(r: &mut Rng, fx: &Fixtures, i: usize) -> ksa::Result<()> {
    let m = &fx.model;
    match i % 6 {
        0 => {
            // Sizes whose lists or products would not fit.
            let mut c = fx.config.clone();
            let field = r.pick(&[
                "num_hidden_layers",
                "head_dim",
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_attention_heads",
            ]);
            c[field] = json!(r.pick(&[1u64 << 31, 1 << 62, 20_000_000, u64::MAX, 1 << 40, 4096]));
            if r.chance(0.5) {
                c["summary_sliding_chunk_num"] = json!(1);
            }
            Qwen3KsaConfig::from_json_str(&c.to_string()).map(|_| ())
        }
        1 => {
            let batch = r.pick(&[1, 2, 1 << 20, 1 << 40, usize::MAX]);
            let tokens = r.pick(&[usize::MAX, 1 << 40, 1 << 33, 1 << 30, 1 << 28]);
            let storage = r.pick(&[ksa::CacheStorage::Host, ksa::CacheStorage::Tensors]);
            let cache = KsaCache::with_storage(m, batch, Some(tokens), storage)?;
            // It fits: it works.
            let mut cache = cache;
            cache.append(m, &[(0, &[1, 2, 3][..])], LogitRows::Last)?;
            Ok(())
        }
        2 => KsaCache::new(m, r.pick(&[1 << 17, 1 << 40, usize::MAX])).map(|_| ()),
        3 => {
            // Tiles that would overflow or allocate terabytes.
            let tiles = TileSizes {
                query: r.hostile_usize(),
                key: r.hostile_usize(),
            };
            let layout = KsaLayout::new(KsaConfig::new(4, 1, 2)?, 40)?;
            let x = Tensor::ones((1, 2, layout.len(), 8), DType::F32, &Device::Cpu)?;
            let out = CpuKernel {
                tiles,
                ..Default::default()
            }
            .attention(&x, &x, &x, &layout, &AttentionOptions::default());
            let ok_tiles = (1..=ksa::schedule::MAX_TILE).contains(&tiles.query)
                && (1..=ksa::schedule::MAX_TILE).contains(&tiles.key);
            check!(
                out.is_ok() == ok_tiles,
                "tiles {tiles:?}: {:?}",
                out.as_ref().err()
            );
            out.map(|_| ())
        }
        4 => {
            // A stride-0 broadcast whose dense scores would not fit.
            let n = r.pick(&[20_000usize, 1 << 20, 3000]);
            let x =
                Tensor::ones((1, 1, 1, 1), DType::F32, &Device::Cpu)?.broadcast_as((1, 1, n, 1))?;
            ksa::reference::causal_attention(&x, &x, &x).map(|_| ())
        }
        _ => {
            // A config claiming many layers beside the 2-layer checkpoint.
            let dir = temp_dir("fuzz-child");
            let mut c = fx.config.clone();
            c["num_hidden_layers"] = json!(r.pick(&[4000u64, 20_000_000, 1 << 31]));
            c["summary_sliding_chunk_num"] = json!(2);
            write_checkpoint(&dir, &c, &fx.weights);
            let out = Qwen3Ksa::from_folder(&dir, DType::F32, &Device::Cpu).map(|_| ());
            let _ = std::fs::remove_dir_all(&dir);
            out
        }
    }
}
