//! The hardware half of `scripts/gpu-kit.sh` (feature `cuda`): what the PTX
//! emulator cannot show. Prints one JSON object per line on stdout; exits 1
//! when a check fails, 0 when all pass. Without a usable GPU it prints
//! `SKIP (no device: REASON)` on stderr, one `{"skipped": ...}` line, and exits 0.
//!
//! * `gpu_check correct [--quick]`: the forward (KSA through `ksa::attention`,
//!   full causal through `ksa::causal_attention`), the backward (candle
//!   autograd through `ksa::attention`) and the decode kernels
//!   (`ksa::decode_attention`), bf16 and f16, against an f64 computation
//!   written from the mask's definition (`KsaLayout::can_attend`): every row
//!   at the emulator tests' shapes, sampled rows at 32K and 128K slots (the
//!   backward with an output gradient that is zero outside the sampled rows,
//!   so its exact gradients need only those rows); decode of the sampled rows
//!   equal to the forward's rows; the typed errors of the CUDA paths.
//!   `--quick` keeps the short shapes and the 32K ones. `--cpu` runs the
//!   same checks on the CPU path (short shapes and one small sampled case; no
//!   LSE or typed-error checks, which are the CUDA path's): a test of the
//!   check itself, runnable without a GPU.
//! * `gpu_check sanitize`: a small forward + backward + decode, for
//!   compute-sanitizer (memcheck, racecheck).
//! * `gpu_check decode`: decode step time and read bandwidth of one layer's
//!   attention (32 query / 8 KV heads of 128, bf16; KSA C=8 S=1 W=128 and full
//!   attention) at 32K and 128K cached tokens, batch 1 and 8, against the
//!   device's copy bandwidth measured in the same run.
//!
//! `--cpu` runs a command on the CPU path (`decode` at small sizes): a test
//! of the program itself, without a GPU.
//!
//! `cargo run --release --features cuda --example gpu_check -- correct`

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use ksa::mask::Mask;
use ksa::{AttentionOptions, KsaConfig, KsaLayout, KvRows};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::time::Instant;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const USAGE: &str = "usage: gpu_check correct [--quick] | sanitize | decode  [--cpu]";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = args.first().map(String::as_str).unwrap_or("");
    if !["correct", "sanitize", "decode"].contains(&cmd) {
        eprintln!("{USAGE}");
        std::process::exit(2);
    }
    let cpu = args.iter().any(|a| a == "--cpu");
    let dev = match Device::new_cuda(0) {
        _ if cpu => Device::Cpu,
        Ok(d) => d,
        Err(e) => {
            // The first line: candle appends a backtrace when RUST_BACKTRACE is set.
            let e = e.to_string();
            let reason = format!("no device: {}", e.lines().next().unwrap_or_default());
            eprintln!("SKIP ({reason})");
            println!("{}", json!({"step": cmd, "skipped": reason}));
            return;
        }
    };
    let quick = args.iter().any(|a| a == "--quick");
    let result = match cmd {
        "correct" => correct(&dev, quick),
        "sanitize" => sanitize(&dev),
        _ => decode_bench(&dev),
    };
    match result {
        Ok(0) => {}
        Ok(failed) => {
            eprintln!("{failed} check(s) failed");
            std::process::exit(1);
        }
        Err(e) => {
            println!("{}", json!({"step": cmd, "error": e.to_string()}));
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

/// Counts failed checks and prints each check as a JSON line.
#[derive(Default)]
struct Checks {
    failed: usize,
}

impl Checks {
    fn check(&mut self, what: &str, case: &Value, err: f64, tol: f64) {
        let ok = err <= tol; // NaN fails
        if !ok {
            self.failed += 1;
        }
        println!(
            "{}",
            json!({"step": "correct", "check": what, "case": case, "err": err, "tol": tol, "ok": ok})
        );
    }

    fn typed(&mut self, what: &str, ok: bool, got: String) {
        if !ok {
            self.failed += 1;
        }
        println!(
            "{}",
            json!({"step": "correct", "check": "typed-error", "case": what, "ok": ok, "got": got})
        );
    }
}

/// splitmix64: a seeded generator so every run samples the same rows.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f32 {
        let u1 = ((self.next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

fn host(t: &Tensor) -> Res<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

fn randn(shape: (usize, usize, usize, usize), dtype: DType, dev: &Device) -> Res<Tensor> {
    Ok(Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(dtype)?)
}

/// One correctness case: batch 1, `hq` query / `hkv` KV heads of `d`.
struct Case {
    c: usize,
    s: usize,
    w: usize,
    n: usize,
    d: usize,
    hq: usize,
    hkv: usize,
    dtype: DType,
    /// Rows compared: every row (`None`) or this many sampled ones.
    sample: Option<usize>,
}

/// Tolerances of the emulator tests (docs/cuda.md): forward absolute error
/// (inputs ~N(0,1)), LSE absolute, backward relative to the gradient's largest
/// magnitude. P and dS are rounded to the element type before the tensor-core
/// products, so these are a few roundings of the element type.
fn tolerances(dtype: DType) -> (f64, f64, f64) {
    match dtype {
        DType::BF16 => (2e-2, 2e-3, 1e-2),
        _ => (4e-3, 2e-3, 1.5e-3),
    }
}

/// The f64 attention of one query row: its allowed keys (ascending slots),
/// their probabilities, the row's log-sum-exp and output.
struct RowRef {
    keys: Vec<usize>,
    p: Vec<f64>,
    lse: f64,
    o: Vec<f64>,
}

/// Host copies of q, k, v (f32 values of the rounded device tensors) in
/// `[heads, N, d]` order.
struct Qkv {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    big: usize,
    d: usize,
}

impl Qkv {
    fn row<'a>(&self, t: &'a [f32], head: usize, slot: usize) -> &'a [f32] {
        let at = (head * self.big + slot) * self.d;
        &t[at..at + self.d]
    }

    fn attend(&self, head: usize, kv_head: usize, slot: usize, keys: Vec<usize>) -> RowRef {
        let scale = 1.0 / (self.d as f64).sqrt();
        let q = self.row(&self.q, head, slot);
        let s: Vec<f64> = keys
            .iter()
            .map(|&j| {
                let k = self.row(&self.k, kv_head, j);
                scale
                    * q.iter()
                        .zip(k)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        let p: Vec<f64> = s.iter().map(|x| (x - lse).exp()).collect();
        let mut o = vec![0f64; self.d];
        for (&j, &pj) in keys.iter().zip(&p) {
            for (oi, vi) in o.iter_mut().zip(self.row(&self.v, kv_head, j)) {
                *oi += pj * *vi as f64;
            }
        }
        RowRef { keys, p, lse, o }
    }
}

/// Rows to compare: all, or `count` sampled ones that always include the
/// first and last slots and the first and last summaries.
fn pick_rows(layout: &KsaLayout, sample: Option<usize>, rng: &mut Rng) -> Vec<usize> {
    let big = layout.len();
    let Some(count) = sample else {
        return (0..big).collect();
    };
    let sums = layout.summary_slots();
    let mut rows = vec![0, 1.min(big - 1), big / 2, big - 1];
    if let (Some(&first), Some(&last)) = (sums.first(), sums.last()) {
        rows.extend([first as usize, last as usize]);
    }
    while rows.len() < count {
        rows.push(rng.below(big));
    }
    rows.sort_unstable();
    rows.dedup();
    rows
}

fn max_abs_diff(got: &[f32], want: impl Iterator<Item = f64>) -> f64 {
    got.iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0f64, |m, e| if e.is_nan() { f64::NAN } else { m.max(e) })
}

fn correct(dev: &Device, quick: bool) -> Res<usize> {
    let mut checks = Checks::default();
    let (bf, f16) = (DType::BF16, DType::F16);
    let case = |c, s, w, n, d, hq, hkv, dtype, sample| Case {
        c,
        s,
        w,
        n,
        d,
        hq,
        hkv,
        dtype,
        sample,
    };
    // The emulator tests' shapes (docs/cuda.md: partial tail chunks, n < C,
    // one chunk, W = 0, W beyond the chunks, S up to 4, GQA 8:2, 8:1, 6:2,
    // 1:1, d 64 and 128), every row; then 32K and 128K slots, sampled rows.
    let mut cases = vec![
        case(8, 1, 16, 2000, 64, 8, 2, bf, None),
        case(4, 2, 3, 777, 128, 4, 4, f16, None),
        case(64, 4, 0, 300, 128, 8, 1, bf, None),
        case(16, 1, 100_000, 1012, 64, 8, 2, f16, None),
        case(8, 2, 1, 5, 64, 2, 1, bf, None),
        case(4, 4, 1000, 333, 128, 6, 2, bf, None),
        case(8, 1, 128, 29_128, 128, 8, 2, bf, Some(24)),
        case(16, 2, 32, 29_120, 64, 4, 1, f16, Some(24)),
    ];
    if dev.is_cpu() {
        // The check itself, on the CPU path: the long shapes would take
        // minutes there, so one small sampled case stands in for them.
        cases.truncate(6);
        cases.push(case(8, 1, 16, 3000, 128, 4, 2, bf, Some(24)));
    } else if !quick {
        cases.push(case(8, 1, 128, 116_512, 128, 8, 2, bf, Some(24)));
        cases.push(case(8, 1, 16, 116_512, 128, 4, 2, f16, Some(24)));
    }
    for (i, c) in cases.iter().enumerate() {
        let start = Instant::now();
        check_case(dev, &mut checks, c, 1000 + i as u64)?;
        eprintln!(
            "case C={} S={} W={} n={} d={} {:?}: {:.1} s",
            c.c,
            c.s,
            c.w,
            c.n,
            c.d,
            c.dtype,
            start.elapsed().as_secs_f64()
        );
    }
    if dev.is_cuda() {
        typed_errors(dev, &mut checks)?;
    }
    Ok(checks.failed)
}

fn check_case(dev: &Device, checks: &mut Checks, c: &Case, seed: u64) -> Res<()> {
    let layout = KsaLayout::new(KsaConfig::new(c.c, c.s, c.w)?, c.n)?;
    let (big, d, group) = (layout.len(), c.d, c.hq / c.hkv);
    let (tol_o, tol_lse, tol_grad) = tolerances(c.dtype);
    let info = json!({"C": c.c, "S": c.s, "W": c.w, "n": c.n, "slots": big, "d": d,
        "q_heads": c.hq, "kv_heads": c.hkv, "dtype": format!("{:?}", c.dtype),
        "rows": c.sample.map_or("all".to_string(), |s| format!("{s} sampled"))});
    let q = randn((1, c.hq, big, d), c.dtype, dev)?;
    let k = randn((1, c.hkv, big, d), c.dtype, dev)?;
    let v = randn((1, c.hkv, big, d), c.dtype, dev)?;
    let mut rng = Rng(seed);
    let rows = pick_rows(&layout, c.sample, &mut rng);
    let qkv = Qkv {
        q: host(&q)?,
        k: host(&k)?,
        v: host(&v)?,
        big,
        d,
    };
    let heads_rows: Vec<(usize, usize)> = (0..c.hq)
        .flat_map(|h| rows.iter().map(move |&r| (h, r)))
        .collect();
    let ksa_keys =
        |r: usize| -> Vec<usize> { (0..big).filter(|&j| layout.can_attend(r, j)).collect() };
    let want: Vec<RowRef> = heads_rows
        .par_iter()
        .map(|&(h, r)| qkv.attend(h, h / group, r, ksa_keys(r)))
        .collect();

    // Forward through ksa::attention.
    let o = ksa::attention(&q, &k, &v, &layout)?;
    let oh = host(&o)?;
    let row_out = |h: usize, r: usize| (h * big + r) * d..(h * big + r + 1) * d;
    let err_o = heads_rows
        .iter()
        .zip(&want)
        .map(|(&(h, r), w)| max_abs_diff(&oh[row_out(h, r)], w.o.iter().copied()))
        .fold(0f64, f64::max);
    checks.check("ksa forward vs f64", &info, err_o, tol_o);
    if dev.is_cuda() {
        // The LSE from cuda::op::forward: the same kernel, so its O must be
        // bit-identical to ksa::attention's.
        let (o2, lse) = ksa::cuda::op::forward(&q, &k, &v, Mask::Ksa(layout), None)?;
        let lseh = host(&lse)?;
        let err_lse = heads_rows
            .iter()
            .zip(&want)
            .map(|(&(h, r), w)| (lseh[h * big + r] as f64 - w.lse).abs())
            .fold(0f64, f64::max);
        checks.check("ksa forward LSE vs f64", &info, err_lse, tol_lse);
        let same = max_abs_diff(&host(&o2)?, oh.iter().map(|x| *x as f64));
        checks.check("ksa::attention == cuda::op::forward", &info, same, 0.0);
    }

    // Full causal over the same N positions.
    let oc = host(&ksa::causal_attention(&q, &k, &v)?)?;
    let err_c = heads_rows
        .par_iter()
        .map(|&(h, r)| {
            let w = qkv.attend(h, h / group, r, (0..=r).collect());
            max_abs_diff(&oc[row_out(h, r)], w.o.into_iter())
        })
        .reduce(|| 0f64, f64::max);
    checks.check("causal forward vs f64", &info, err_c, tol_o);

    // Decode of the compared rows (text and summary queries alike) over the
    // gathered K/V, as the cache stores them: summaries chunk-major, text in order.
    let dec_rows: Vec<usize> = if rows.len() > 64 {
        let mut r = Rng(seed ^ 7);
        let mut v: Vec<usize> = (0..64).map(|_| rows[r.below(rows.len())]).collect();
        v.sort_unstable();
        v.dedup();
        v
    } else {
        rows.clone()
    };
    let ids = |s: Vec<u32>| {
        let len = s.len();
        Tensor::from_vec(s, len, dev)
    };
    let (k0, v0) = (k.i(0)?, v.i(0)?);
    let gather = |slots: Vec<u32>| -> Res<(Tensor, Tensor)> {
        let at = ids(slots)?;
        Ok((k0.index_select(&at, 1)?, v0.index_select(&at, 1)?))
    };
    // A layout without summaries (n < C) has no summary store.
    let sums = match layout.summary_len() {
        0 => None,
        _ => Some(gather(layout.summary_slots())?),
    };
    let (kt, vt) = gather(layout.text_slots())?;
    let seqs: Vec<Vec<KvRows>> = dec_rows
        .iter()
        .map(|&r| {
            let kr = layout.key_ranges(r).expect("row inside the layout");
            let mut runs = vec![KvRows {
                k: &kt,
                v: &vt,
                rows: kr.text,
            }];
            if let Some((ks, vs)) = &sums {
                runs.push(KvRows {
                    k: ks,
                    v: vs,
                    rows: kr.summaries,
                });
            }
            runs
        })
        .collect();
    let dec_ids = ids(dec_rows.iter().map(|&r| r as u32).collect())?;
    let qd = q
        .i(0)?
        .index_select(&dec_ids, 1)?
        .transpose(0, 1)?
        .contiguous()?;
    let od = host(&ksa::decode_attention(
        &qd,
        &seqs,
        &AttentionOptions::default(),
    )?)?;
    let (mut err_dec, mut err_dec_fwd) = (0f64, 0f64);
    for (e, &r) in dec_rows.iter().enumerate() {
        for h in 0..c.hq {
            let got = &od[(e * c.hq + h) * d..(e * c.hq + h + 1) * d];
            let w = heads_rows
                .iter()
                .position(|&x| x == (h, r))
                .expect("decode rows are compared rows");
            err_dec = err_dec.max(max_abs_diff(got, want[w].o.iter().copied()));
            let fwd = &oh[row_out(h, r)];
            err_dec_fwd = err_dec_fwd.max(max_abs_diff(got, fwd.iter().map(|x| *x as f64)));
        }
    }
    checks.check("decode vs f64", &info, err_dec, tol_o);
    checks.check("decode vs forward", &info, err_dec_fwd, tol_o);

    // Backward through autograd, with dO zero outside the compared rows.
    let grad_rows: Vec<usize> = if c.sample.is_some() {
        rows.clone()
    } else {
        dec_rows.clone()
    };
    let mut w_host = vec![0f32; c.hq * big * d];
    for h in 0..c.hq {
        for &r in &grad_rows {
            for x in &mut w_host[(h * big + r) * d..(h * big + r + 1) * d] {
                *x = rng.normal();
            }
        }
    }
    let w = Tensor::from_vec(w_host, (1, c.hq, big, d), dev)?.to_dtype(c.dtype)?;
    let dout = host(&w)?;
    let vars = [&q, &k, &v].map(|t| Var::from_tensor(t).expect("a device tensor"));
    let out = ksa::attention(&vars[0], &vars[1], &vars[2], &layout)?;
    let loss = (out * &w)?.to_dtype(DType::F32)?.sum_all()?;
    let grads = loss.backward()?;
    let got: Vec<Vec<f32>> = vars
        .iter()
        .map(|x| host(grads.get(x).ok_or("missing gradient")?))
        .collect::<Res<_>>()?;
    let (dq, dk, dv) = grad_ref(&qkv, &layout, c, &grad_rows, &dout, &oh);
    for (name, g, want) in [
        ("dq", &got[0], dq),
        ("dk", &got[1], dk),
        ("dv", &got[2], dv),
    ] {
        let scale = want.iter().fold(1e-3f64, |m, x| m.max(x.abs()));
        let err = max_abs_diff(g, want.into_iter()) / scale;
        checks.check(&format!("ksa backward {name} vs f64"), &info, err, tol_grad);
    }
    Ok(())
}

/// f64 gradients of `sum(O * dout)` when `dout` is zero outside `rows`
/// (every head): only those rows' probabilities are needed.
/// `dS = P (dP - D)`, `dq = scale dS K`, `dk = scale dS^T q`, `dv = P^T dout`,
/// with `D = rowsum(dout * o_fwd)` from the forward's rounded output `o_fwd`.
fn grad_ref(
    qkv: &Qkv,
    layout: &KsaLayout,
    c: &Case,
    rows: &[usize],
    dout: &[f32],
    o_fwd: &[f32],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (big, d, group) = (qkv.big, qkv.d, c.hq / c.hkv);
    let scale = 1.0 / (d as f64).sqrt();
    let pairs: Vec<(usize, usize)> = (0..c.hq)
        .flat_map(|h| rows.iter().map(move |&r| (h, r)))
        .collect();
    // Per (head, row): keys, P and dS.
    let per_row: Vec<(RowRef, Vec<f64>)> = pairs
        .par_iter()
        .map(|&(h, r)| {
            let keys: Vec<usize> = (0..big).filter(|&j| layout.can_attend(r, j)).collect();
            let rr = qkv.attend(h, h / group, r, keys);
            let g = qkv.row(dout, h, r);
            let dp: Vec<f64> = rr
                .keys
                .iter()
                .map(|&j| {
                    let vj = qkv.row(&qkv.v, h / group, j);
                    g.iter().zip(vj).map(|(a, b)| *a as f64 * *b as f64).sum()
                })
                .collect();
            // D = rowsum(dO * O) from the forward's output as the device
            // rounded it: what FlashAttention's backward (and the CPU
            // backward) use. The exact sum(P dP) differs by dO.(O - O_rounded),
            // which with a sparse dO is ~1% of the largest dk in bf16.
            let o = qkv.row(o_fwd, h, r);
            let dd: f64 = g.iter().zip(o).map(|(a, b)| *a as f64 * *b as f64).sum();
            let ds = rr.p.iter().zip(&dp).map(|(p, x)| p * (x - dd)).collect();
            (rr, ds)
        })
        .collect();
    let mut dq = vec![0f64; c.hq * big * d];
    for (&(h, r), (rr, ds)) in pairs.iter().zip(&per_row) {
        let out = &mut dq[(h * big + r) * d..(h * big + r + 1) * d];
        for (&j, &s) in rr.keys.iter().zip(ds) {
            for (o, kj) in out.iter_mut().zip(qkv.row(&qkv.k, h / group, j)) {
                *o += scale * s * *kj as f64;
            }
        }
    }
    // dk, dv: in parallel over key rows; each sums the compared rows of its
    // KV head's query heads that see it.
    let mut dk = vec![0f64; c.hkv * big * d];
    let mut dv = vec![0f64; c.hkv * big * d];
    dk.par_chunks_mut(d)
        .zip(dv.par_chunks_mut(d))
        .enumerate()
        .for_each(|(gj, (dkj, dvj))| {
            let (g, j) = (gj / big, gj % big);
            for (&(h, r), (rr, ds)) in pairs.iter().zip(&per_row) {
                if h / group != g {
                    continue;
                }
                let Ok(at) = rr.keys.binary_search(&j) else {
                    continue;
                };
                let (qr, gr) = (qkv.row(&qkv.q, h, r), qkv.row(dout, h, r));
                for i in 0..d {
                    dkj[i] += scale * ds[at] * qr[i] as f64;
                    dvj[i] += rr.p[at] * gr[i] as f64;
                }
            }
        });
    (dq, dk, dv)
}

/// The typed errors of the CUDA paths (on device tensors, before any launch).
fn typed_errors(dev: &Device, checks: &mut Checks) -> Res<()> {
    let layout = KsaLayout::new(KsaConfig::new(8, 1, 2)?, 64)?;
    let n = layout.len();
    let t = |h: usize, d: usize, dt: DType| Tensor::zeros((1, h, n, d), dt, dev);
    let e = ksa::attention(
        &t(2, 64, DType::F32)?,
        &t(2, 64, DType::F32)?,
        &t(2, 64, DType::F32)?,
        &layout,
    );
    checks.typed(
        "attention f32",
        matches!(e, Err(ksa::Error::UnsupportedDType { .. })),
        format!("{e:?}"),
    );
    let e = ksa::attention(
        &t(2, 96, DType::BF16)?,
        &t(2, 96, DType::BF16)?,
        &t(2, 96, DType::BF16)?,
        &layout,
    );
    checks.typed(
        "attention head dim 96",
        matches!(e, Err(ksa::Error::UnsupportedHeadDim { .. })),
        format!("{e:?}"),
    );
    let cpu_k = Tensor::zeros((1, 2, n, 64), DType::BF16, &Device::Cpu)?;
    let e = ksa::attention(
        &t(2, 64, DType::BF16)?,
        &cpu_k,
        &t(2, 64, DType::BF16)?,
        &layout,
    );
    checks.typed(
        "attention k on the CPU",
        matches!(e, Err(ksa::Error::DeviceMismatch { .. })),
        format!("{e:?}"),
    );
    let short = Tensor::zeros((1, 2, n - 1, 64), DType::BF16, dev)?;
    let e = ksa::attention(&short, &short, &short, &layout);
    checks.typed(
        "attention wrong length",
        matches!(e, Err(ksa::Error::LayoutLength { .. })),
        format!("{e:?}"),
    );
    let kv = Tensor::zeros((2, 16, 64), DType::BF16, dev)?;
    let q = |dt: DType, d: usize| Tensor::zeros((1, 4, d), dt, dev);
    let rows = |r: std::ops::Range<usize>| {
        vec![vec![KvRows {
            k: &kv,
            v: &kv,
            rows: r,
        }]]
    };
    let opts = AttentionOptions::default();
    let e = ksa::decode_attention(&q(DType::F32, 64)?, &rows(0..4), &opts);
    checks.typed(
        "decode f32",
        matches!(e, Err(ksa::Error::UnsupportedDType { .. })),
        format!("{e:?}"),
    );
    let e = ksa::decode_attention(&q(DType::BF16, 64)?, &rows(0..17), &opts);
    checks.typed(
        "decode rows past the capacity",
        matches!(e, Err(ksa::Error::DimMismatch { .. })),
        format!("{e:?}"),
    );
    let e = ksa::decode_attention(&q(DType::F16, 64)?, &rows(0..4), &opts);
    checks.typed(
        "decode k/v dtype differs from q",
        matches!(e, Err(ksa::Error::DTypeMismatch { .. })),
        format!("{e:?}"),
    );
    let e = ksa::decode_attention(&q(DType::BF16, 64)?, &rows(3..3), &opts);
    checks.typed(
        "decode without keys",
        matches!(e, Err(ksa::Error::DecodeSlices { .. })),
        format!("{e:?}"),
    );
    Ok(())
}

/// A small forward + backward + decode for compute-sanitizer: KSA and full
/// causal, bf16 d=128 with GQA 4:2 and f16 d=64 with GQA 4:1.
fn sanitize(dev: &Device) -> Res<usize> {
    for (c, s, w, n, d, hq, hkv, dtype) in [
        (8, 1, 2, 300, 128, 4, 2, DType::BF16),
        (4, 2, 1, 130, 64, 4, 1, DType::F16),
    ] {
        let layout = KsaLayout::new(KsaConfig::new(c, s, w)?, n)?;
        let big = layout.len();
        let vars = [hq, hkv, hkv].map(|h| {
            Var::from_tensor(&randn((1, h, big, d), dtype, dev).expect("randn")).expect("var")
        });
        let o = ksa::attention(&vars[0], &vars[1], &vars[2], &layout)?;
        let oc = ksa::causal_attention(&vars[0], &vars[1], &vars[2])?;
        let loss =
            (o.to_dtype(DType::F32)?.sum_all()? + oc.to_dtype(DType::F32)?.sqr()?.sum_all()?)?;
        let grads = loss.backward()?;
        let (k0, v0) = (vars[1].i(0)?.contiguous()?, vars[2].i(0)?.contiguous()?);
        let last = layout.key_ranges(big - 1).expect("last slot");
        let seqs = vec![
            vec![KvRows {
                k: &k0,
                v: &v0,
                rows: 0..big,
            }],
            vec![KvRows {
                k: &k0,
                v: &v0,
                rows: last.text,
            }],
        ];
        let q2 = vars[0]
            .i(0)?
            .narrow(1, big - 2, 2)?
            .transpose(0, 1)?
            .contiguous()?;
        let od = ksa::decode_attention(&q2, &seqs, &AttentionOptions::default())?;
        dev.synchronize()?;
        let finite = |t: &Tensor| -> Res<bool> { Ok(host(t)?.iter().all(|x| x.is_finite())) };
        let mut ok = finite(&o)? && finite(&oc)? && finite(&od)?;
        for x in &vars {
            ok &= finite(grads.get(x).ok_or("missing gradient")?)?;
        }
        println!(
            "{}",
            json!({"step": "sanitize", "C": c, "S": s, "W": w, "n": n, "d": d,
                "dtype": format!("{dtype:?}"), "ran": ["ksa fwd", "causal fwd", "ksa bwd", "causal bwd", "decode"], "finite": ok})
        );
        if !ok {
            return Ok(1);
        }
    }
    Ok(0)
}

/// Median of `reps` timings of `f` (each `inner` calls, then a device
/// synchronize), in milliseconds per call, after one warm-up call.
fn median_ms(dev: &Device, reps: usize, inner: usize, f: &dyn Fn() -> Res<Tensor>) -> Res<f64> {
    f()?;
    dev.synchronize()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        for _ in 0..inner {
            f()?;
        }
        dev.synchronize()?;
        times.push(start.elapsed().as_secs_f64() * 1e3 / inner as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[reps / 2])
}

fn decode_bench(dev: &Device) -> Res<usize> {
    let (hq, hkv, d, dtype) = (32, 8, 128, DType::BF16);
    let opts = AttentionOptions::default();
    // Copy bandwidth: a 2 GiB device-to-device copy, bytes read + written.
    // `--cpu` (the program's own test) shrinks everything.
    let (elems, lengths) = match dev {
        Device::Cpu => (1usize << 22, [1024, 2048]),
        _ => (1usize << 30, [32 * 1024, 128 * 1024]),
    };
    let src = Tensor::zeros(elems, dtype, dev)?;
    let copy_ms = median_ms(dev, 7, 3, &|| Ok(src.copy()?))?;
    let copy_gbs = 2.0 * (elems * 2) as f64 / (copy_ms * 1e-3) / 1e9;
    drop(src);
    println!(
        "{}",
        json!({"step": "decode", "what": "copy", "bytes": elems * 2, "ms": copy_ms, "gb_s": copy_gbs,
            "note": "device-to-device copy; GB/s counts bytes read + written"})
    );
    let config = KsaConfig::new(8, 1, 128)?;
    for n in lengths {
        // The token after n cached ones: its keys in the cache's stores.
        let layout = KsaLayout::new(config, n + 1)?;
        let kr = layout
            .key_ranges(layout.text_slot(n).expect("token n"))
            .expect("slot");
        for batch in [1usize, 8] {
            for (kind, runs) in [
                ("ksa", vec![kr.summaries.len(), kr.text.len()]),
                ("full", vec![n + 1]),
            ] {
                // One K and V tensor per run and sequence, exactly the keys
                // read (so nothing is shared between sequences through the L2).
                let tensors: Vec<Vec<(Tensor, Tensor)>> = (0..batch)
                    .map(|_| {
                        runs.iter()
                            .filter(|&&r| r > 0)
                            .map(|&r| {
                                let t =
                                    || Tensor::randn(0f32, 1.0, (hkv, r, d), dev)?.to_dtype(dtype);
                                Ok((t()?, t()?))
                            })
                            .collect::<Res<_>>()
                    })
                    .collect::<Res<_>>()?;
                let seqs: Vec<Vec<KvRows>> = tensors
                    .iter()
                    .map(|runs| {
                        runs.iter()
                            .map(|(k, v)| KvRows {
                                k,
                                v,
                                rows: 0..k.dim(1).expect("rank 3"),
                            })
                            .collect()
                    })
                    .collect();
                let q = Tensor::randn(0f32, 1.0, (batch, hq, d), dev)?.to_dtype(dtype)?;
                let keys: usize = runs.iter().sum();
                let bytes = batch * keys * hkv * d * 2 * 2;
                let ms = median_ms(dev, 7, 20, &|| Ok(ksa::decode_attention(&q, &seqs, &opts)?))?;
                let gbs = bytes as f64 / (ms * 1e-3) / 1e9;
                println!(
                    "{}",
                    json!({"step": "decode", "what": kind, "n": n, "batch": batch, "keys_per_kv_head": keys,
                        "bytes": bytes, "ms": ms, "gb_s": gbs, "of_copy": gbs / copy_gbs,
                        "note": "one layer's attention step (split + combine kernels and the host tables); GB/s counts K/V bytes read"})
                );
            }
        }
    }
    Ok(0)
}
