//! One-run benchmark report: KSA (C = 8, S = 1) against the crate's full
//! causal attention on the same inputs, with allowed-pair ratios, useful
//! GFLOP/s, and the machine's f32 speed for scale: candle's matmul and the
//! FMA peak of one core (a register-only FMA loop per instruction set; the
//! side-by-side table's percentage uses the loop run again right after each
//! size's full causal runs).
//!
//! `cargo run --profile bench --example bench_report -- [--sizes 1024,4096,...]
//! [--window 128] [--reps 3] [--bf16] [--peers FILE] [--plot docs/bench_time.svg]`
//!
//! Shapes: batch 1, 8 query heads, 2 key/value heads, head_dim 128, f32
//! (`--bf16`: KSA with bf16 inputs as well). KSA runs over the expanded
//! layout (`N = n + n/8` slots); full causal over the `n` text tokens. Times
//! are the best of `--reps` runs. `--peers` reads PyTorch's times
//! (`benches/peers_cpu.py --tsv`) and prints the side-by-side table;
//! `benches/compare_cpu.sh` runs both.

use candle_core::{Device, Tensor};
use ksa::schedule::{Schedule, TileSizes};
use ksa::{KsaConfig, KsaLayout};
use std::time::Instant;

const Q_HEADS: usize = 8;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 128;

struct Args {
    sizes: Vec<usize>,
    window: usize,
    reps: usize,
    bf16: bool,
    peers: Option<String>,
    plot: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        sizes: vec![1 << 10, 4 << 10, 16 << 10, 32 << 10, 64 << 10],
        window: 128,
        reps: 3,
        bf16: false,
        peers: None,
        plot: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--sizes" => {
                args.sizes = value()?
                    .split(',')
                    .map(|s| s.trim().parse().map_err(|e| format!("--sizes: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--window" => args.window = value()?.parse().map_err(|e| format!("--window: {e}"))?,
            "--reps" => args.reps = value()?.parse().map_err(|e| format!("--reps: {e}"))?,
            "--plot" => args.plot = Some(value()?),
            "--peers" => args.peers = Some(value()?),
            "--bf16" => args.bf16 = true,
            "-h" | "--help" => {
                return Err(
                    "usage: bench_report [--sizes N,N,...] [--window W] [--reps R] [--bf16] \
                            [--peers FILE.tsv] [--plot FILE.svg]"
                        .into(),
                )
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if args.reps == 0 {
        return Err("--reps must be at least 1".into());
    }
    Ok(args)
}

/// CPU seconds used so far by `clock` (all threads of the process, or the
/// calling thread).
fn clock_seconds(clock: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// CPU seconds used by all threads of the process so far.
fn cpu_time() -> f64 {
    clock_seconds(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// The f32 FMA peak of one core: register-only FMA chains, enough of them
/// in flight to cover latency times units on any current x86 core.
#[cfg(target_arch = "x86_64")]
mod peak {
    use std::arch::x86_64::*;

    /// 16 independent chains of 16-lane FMAs; returns a value that depends
    /// on all of them (so none is optimized away).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512(iters: usize) -> f32 {
        let (x, y) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        let mut acc = [_mm512_set1_ps(1.0); 16];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, x, y);
            }
        }
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }

    /// 12 independent chains of 8-lane FMAs (of the 16 ymm registers).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2(iters: usize) -> f32 {
        let (x, y) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        let mut acc = [_mm256_set1_ps(1.0); 12];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, x, y);
            }
        }
        let mut lanes = [0f32; 8];
        acc.iter()
            .map(|&a| {
                _mm256_storeu_ps(lanes.as_mut_ptr(), a);
                lanes.iter().sum::<f32>()
            })
            .sum()
    }
}

/// GFLOP per CPU second (this thread) of the register-only FMA loop of
/// `isa`, best of 5; `None` where this CPU lacks it or it has no loop.
fn fma_peak(isa: ksa::cpu::CpuIsa) -> Option<f64> {
    use ksa::cpu::CpuIsa;
    if !isa.supported() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let iters = std::hint::black_box(20_000_000usize);
        let (flops_per_iter, run): (f64, unsafe fn(usize) -> f32) = match isa {
            CpuIsa::Avx512 => (16.0 * 16.0 * 2.0, peak::avx512),
            CpuIsa::Avx2 => (12.0 * 8.0 * 2.0, peak::avx2),
            // Its f32 products are the AVX-512 variant's: one peak.
            CpuIsa::Avx512Bf16 | CpuIsa::Portable => return None,
        };
        let best = (0..5)
            .map(|_| {
                let c = clock_seconds(libc::CLOCK_THREAD_CPUTIME_ID);
                // SAFETY: the CPU supports `isa` (checked above).
                std::hint::black_box(unsafe { run(iters) });
                clock_seconds(libc::CLOCK_THREAD_CPUTIME_ID) - c
            })
            .fold(f64::INFINITY, f64::min);
        Some(flops_per_iter * iters as f64 / best / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Best wall time of `reps` runs, and the CPU time (all threads) of that run:
/// on a shared machine CPU time is the steadier of the two.
fn best_of(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    (0..reps)
        .map(|_| {
            let (t, c) = (Instant::now(), cpu_time());
            f();
            (t.elapsed().as_secs_f64(), cpu_time() - c)
        })
        .fold((f64::INFINITY, 0.0), |a, b| if b.0 < a.0 { b } else { a })
}

fn randn(shape: (usize, usize, usize, usize)) -> candle_core::Result<Tensor> {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
}

/// f32 GFLOP/s of candle's own 2048^3 matmul on this machine.
fn matmul_gflops() -> candle_core::Result<f64> {
    let n = 2048;
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    a.matmul(&b)?; // warm-up
    let (t, _) = best_of(3, || {
        a.matmul(&b).expect("matmul");
    });
    Ok(2.0 * (n as f64).powi(3) / t / 1e9)
}

struct Row {
    n: usize,
    /// Wall seconds.
    ksa: f64,
    full: f64,
    /// CPU seconds (all threads) of the same runs.
    ksa_cpu: f64,
    full_cpu: f64,
    /// KSA with bf16 inputs (wall, CPU seconds), with `--bf16`.
    ksa_bf16: Option<(f64, f64)>,
    ratio: f64,
    ksa_gflop: f64,
    full_gflop: f64,
    /// The FMA peak of one core (the variant in use's loop), measured right
    /// after the full causal runs.
    peak: Option<f64>,
}

/// PyTorch's SDPA causal times of one size (`benches/peers_cpu.py --tsv`):
/// (wall, CPU seconds) in f32 and bf16.
struct Peer {
    f32: (f64, f64),
    bf16: (f64, f64),
}

/// Reads `peers_cpu.py --tsv` output: `#` lines are the peer's description,
/// rows are `n f32_s f32_cpu_s bf16_s bf16_cpu_s`.
/// The peer's description lines and its rows by size.
type Peers = (Vec<String>, Vec<(usize, Peer)>);

fn read_peers(path: &str) -> Result<Peers, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let (mut notes, mut rows) = (Vec::new(), Vec::new());
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(note) = line.strip_prefix('#') {
            notes.push(note.trim().to_string());
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        let num = |i: usize| -> Result<f64, String> {
            f.get(i)
                .ok_or(format!("{path}: short row {line:?}"))?
                .parse()
                .map_err(|e| format!("{path}: {e} in {line:?}"))
        };
        let n = f[0]
            .parse()
            .map_err(|e| format!("{path}: {e} in {line:?}"))?;
        rows.push((
            n,
            Peer {
                f32: (num(1)?, num(2)?),
                bf16: (num(3)?, num(4)?),
            },
        ));
    }
    Ok((notes, rows))
}

/// The CPU's model name from `/proc/cpuinfo` (what `lscpu` prints).
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            let field = |key: &str| {
                info.lines()
                    .find(|l| l.starts_with(key))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|v| v.trim().to_string())
            };
            let model = field("model name")?;
            Some(match (field("cpu family"), field("model\t")) {
                (Some(family), Some(number)) => {
                    format!("{model} (family {family}, model {number})")
                }
                _ => model,
            })
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    use ksa::cpu::CpuIsa;
    let args = parse_args()?;
    let peers = args.peers.as_deref().map(read_peers).transpose()?;
    let threads = rayon::current_num_threads();
    let isa = ksa::cpu::isa::process_isa()?;
    let peaks: Vec<(CpuIsa, f64)> = CpuIsa::ALL
        .into_iter()
        .filter_map(|i| fma_peak(i).map(|p| (i, p)))
        .collect();
    let matmul = matmul_gflops()?;
    println!(
        "CPU: {}; kernel variant in use: {isa} ({} to force)",
        cpu_model(),
        ksa::cpu::isa::ISA_ENV
    );
    println!(
        "KSA C=8 S=1 W={} vs full causal; batch 1, {Q_HEADS} query / {KV_HEADS} KV heads, \
         d={HEAD_DIM}, f32, {threads} threads, best of {}",
        args.window, args.reps
    );
    println!("machine f32 matmul (candle, 2048^3): {matmul:.1} GFLOP/s");
    for (i, p) in &peaks {
        println!("f32 FMA peak of one core, {i} register-only loop: {p:.1} GFLOP per CPU second");
    }
    // The peak the path in use can reach: its own loop's, else the widest.
    // Measured again right after each size's full causal runs, for the
    // percentage: this host's state drifts within a run (docs/benchmarks.md).
    let peak_isa = peaks
        .iter()
        .find(|(i, _)| *i == isa || (isa.avx512() && i.avx512()))
        .or(peaks.first())
        .map(|&(i, _)| i);
    println!();
    println!(
        "| n | KSA (s) | full causal (s) | speedup | allowed-pair ratio | KSA GFLOP/s | full GFLOP/s \
         | KSA cpu-s | full cpu-s | cpu-time speedup | KSA GFLOP/cpu-s | full GFLOP/cpu-s |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for &n in &args.sizes {
        let layout = KsaLayout::new(KsaConfig::new(8, 1, args.window)?, n)?;
        let big = layout.len();
        let (q, k, v) = (
            randn((1, Q_HEADS, big, HEAD_DIM))?,
            randn((1, KV_HEADS, big, HEAD_DIM))?,
            randn((1, KV_HEADS, big, HEAD_DIM))?,
        );
        // Full causal attention over the text tokens of the same inputs.
        let take = |x: &Tensor| layout.take_text(x, 2).and_then(|x| Ok(x.contiguous()?));
        let (qt, kt, vt) = (take(&q)?, take(&k)?, take(&v)?);
        let reps = if n >= 32 << 10 { 1 } else { args.reps };
        let (ksa, ksa_cpu) = best_of(reps, || {
            ksa::attention(&q, &k, &v, &layout).expect("ksa");
        });
        let (full, full_cpu) = best_of(reps, || {
            ksa::causal_attention(&qt, &kt, &vt).expect("causal");
        });
        let peak = peak_isa.and_then(fma_peak);
        let ksa_bf16 = if args.bf16 {
            let half = |x: &Tensor| x.to_dtype(candle_core::DType::BF16);
            let (qh, kh, vh) = (half(&q)?, half(&k)?, half(&v)?);
            Some(best_of(reps, || {
                ksa::attention(&qh, &kh, &vh, &layout).expect("ksa bf16");
            }))
        } else {
            None
        };
        let (pairs, full_pairs) = (layout.pair_counts().total(), layout.causal_text_pairs());
        let gflop = |p: u64| 4.0 * HEAD_DIM as f64 * p as f64 * Q_HEADS as f64 / 1e9;
        let row = Row {
            n,
            ksa,
            full,
            ksa_cpu,
            full_cpu,
            ksa_bf16,
            ratio: full_pairs as f64 / pairs as f64,
            ksa_gflop: gflop(pairs),
            full_gflop: gflop(full_pairs),
            peak,
        };
        println!(
            "| {} | {:.4} | {:.4} | {:.2}x | {:.2}x | {:.1} | {:.1} | {:.3} | {:.3} | {:.2}x | {:.1} | {:.1} |",
            row.n,
            row.ksa,
            row.full,
            row.full / row.ksa,
            row.ratio,
            row.ksa_gflop / row.ksa,
            row.full_gflop / row.full,
            row.ksa_cpu,
            row.full_cpu,
            row.full_cpu / row.ksa_cpu,
            row.ksa_gflop / row.ksa_cpu,
            row.full_gflop / row.full_cpu,
        );
        rows.push(row);
    }
    if let Some((notes, peer_rows)) = &peers {
        print_comparison(&rows, notes, peer_rows);
    }
    print_tile_counts(args.window)?;
    if let Some(path) = &args.plot {
        plot(path, &rows, args.window)?;
        println!("\nplot written to {path}");
    }
    Ok(())
}

/// The side-by-side table against PyTorch's SDPA causal (ratios above 1:
/// the crate is faster), wall time and CPU time.
fn print_comparison(rows: &[Row], notes: &[String], peers: &[(usize, Peer)]) {
    println!("\nagainst PyTorch CPU SDPA causal (is_causal=True, GQA), same shapes, same session:");
    for note in notes {
        println!("peer: {note}");
    }
    println!(
        "% of core peak: against the register-only FMA loop of the variant in use, \
         measured right after that size's full causal runs (GFLOP per CPU second in brackets)"
    );
    println!(
        "\n| n | SDPA f32 (s) | SDPA bf16 (s) | crate full (s) | crate KSA (s) | crate KSA bf16 (s) \
         | full vs SDPA f32 | KSA vs SDPA f32 | allowed-pair ratio | SDPA f32 GFLOP/s | full GFLOP/s \
         | KSA GFLOP/s | full vs SDPA, cpu-s | KSA vs SDPA, cpu-s | full GFLOP/cpu-s, % of core peak \
         | KSA bf16 / f32 speed |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let Some((_, peer)) = peers.iter().find(|(n, _)| *n == row.n) else {
            continue;
        };
        let full_rate = row.full_gflop / row.full_cpu;
        let of_peak = row
            .peak
            .map(|p| format!("{full_rate:.1}, {:.0}% ({p:.1})", 100.0 * full_rate / p))
            .unwrap_or_else(|| format!("{full_rate:.1}"));
        let bf16 = row
            .ksa_bf16
            .map(|(t, _)| (format!("{t:.4}"), format!("{:.2}x", row.ksa / t)))
            .unwrap_or_else(|| ("-".into(), "-".into()));
        println!(
            "| {} | {:.4} | {:.4} | {:.4} | {:.4} | {} | {:.2}x | {:.2}x | {:.2}x | {:.1} | {:.1} | {:.1} | {:.2}x | {:.2}x | {} | {} |",
            row.n,
            peer.f32.0,
            peer.bf16.0,
            row.full,
            row.ksa,
            bf16.0,
            peer.f32.0 / row.full,
            peer.f32.0 / row.ksa,
            row.ratio,
            row.full_gflop / peer.f32.0,
            row.full_gflop / row.full,
            row.ksa_gflop / row.ksa,
            peer.f32.1 / row.full_cpu,
            peer.f32.1 / row.ksa_cpu,
            of_peak,
            bf16.1,
        );
    }
}

fn plot(path: &str, rows: &[Row], window: usize) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let (lo, hi) = rows.iter().fold((f64::INFINITY, 0f64), |(lo, hi), r| {
        (lo.min(r.ksa).min(r.full), hi.max(r.ksa).max(r.full))
    });
    let (n0, n1) = (
        rows.iter().map(|r| r.n).min().unwrap_or(1) as f64,
        rows.iter().map(|r| r.n).max().unwrap_or(2) as f64,
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Attention forward time, 8/2 heads, d=128, f32 (KSA C=8 S=1 W={window})"),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (n0 / 1.3..n1 * 1.3).log_scale(),
            (lo / 2.0..hi * 2.0).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("text tokens n")
        .y_desc("seconds")
        .x_label_formatter(&|x| format!("{}K", (*x / 1024.0).round()))
        .y_label_formatter(&|y| {
            if *y >= 1.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.2}")
            }
        })
        .draw()?;
    for (name, color, pick) in [
        (
            "full causal (ksa::causal_attention)",
            RED,
            (|r: &Row| r.full) as fn(&Row) -> f64,
        ),
        ("KSA (ksa::attention)", BLUE, |r: &Row| r.ksa),
    ] {
        let points: Vec<(f64, f64)> = rows.iter().map(|r| (r.n as f64, pick(r))).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Key tiles the schedule visits, KSA against full causal over the text, at
/// the CPU path's tile sizes: the block-sparsity the kernels exploit.
fn print_tile_counts(window: usize) -> ksa::Result<()> {
    let tiles = TileSizes::default();
    println!(
        "\nkey tiles visited ({} queries x {} keys; summary queries excluded), C=8 S=1 W={window}:\n",
        tiles.query, tiles.key
    );
    println!("| n | KSA tiles (full + edge) | full causal tiles (full + edge) | ratio |");
    println!("|---:|---:|---:|---:|");
    for n in [8 << 10, 32 << 10, 128 << 10] {
        let layout = KsaLayout::new(KsaConfig::new(8, 1, window)?, n)?;
        let ksa = Schedule::ksa(&layout, tiles)?.visited_tiles();
        let full = Schedule::causal(n, tiles)?.visited_tiles();
        println!(
            "| {n} | {} ({} + {}) | {} ({} + {}) | {:.2}x |",
            ksa.total(),
            ksa.full,
            ksa.edge,
            full.total(),
            full.full,
            full.edge,
            full.total() as f64 / ksa.total() as f64
        );
    }
    Ok(())
}
