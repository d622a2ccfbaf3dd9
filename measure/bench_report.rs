//! One-run benchmark report: KSA (C = 8, S = 1) against the crate's full
//! causal attention on the same inputs, with allowed-pair ratios, useful
//! GFLOP/s, and the machine's own f32 matmul speed for scale.
//!
//! `cargo run --release --example bench_report -- [--sizes 1024,4096,...]
//! [--window 128] [--reps 3] [--plot docs/bench_time.svg]`
//!
//! Shapes: batch 1, 8 query heads, 2 key/value heads, head_dim 128, f32.
//! KSA runs over the expanded layout (`N = n + n/8` slots); full causal over
//! the `n` text tokens. Times are the best of `--reps` runs.

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
    plot: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        sizes: vec![1 << 10, 4 << 10, 16 << 10, 32 << 10, 64 << 10],
        window: 128,
        reps: 3,
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
            "-h" | "--help" => {
                return Err(
                    "usage: bench_report [--sizes N,N,...] [--window W] [--reps R] \
                            [--plot FILE.svg]"
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

/// CPU seconds used by all threads of the process so far.
fn cpu_time() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
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
    ratio: f64,
    ksa_gflop: f64,
    full_gflop: f64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let threads = rayon::current_num_threads();
    let matmul = matmul_gflops()?;
    println!(
        "KSA C=8 S=1 W={} vs full causal; batch 1, {Q_HEADS} query / {KV_HEADS} KV heads, \
         d={HEAD_DIM}, f32, {threads} threads, best of {}",
        args.window, args.reps
    );
    println!("machine f32 matmul (candle, 2048^3): {matmul:.1} GFLOP/s\n");
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
        let (pairs, full_pairs) = (layout.pair_counts().total(), layout.causal_text_pairs());
        let gflop = |p: u64| 4.0 * HEAD_DIM as f64 * p as f64 * Q_HEADS as f64 / 1e9;
        let row = Row {
            n,
            ksa,
            full,
            ksa_cpu,
            full_cpu,
            ratio: full_pairs as f64 / pairs as f64,
            ksa_gflop: gflop(pairs),
            full_gflop: gflop(full_pairs),
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
    print_tile_counts(args.window)?;
    if let Some(path) = &args.plot {
        plot(path, &rows, args.window)?;
        println!("\nplot written to {path}");
    }
    Ok(())
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
