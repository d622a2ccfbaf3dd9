//! One-run report of batched decode throughput through `KsaCache` on the
//! random model of `examples/long_context` (4 layers, hidden 512, 8 q / 2 kv
//! heads of 64, C = 8, S = 1, f32, host storage): tokens per second for each
//! batch size and context, with the example's windows `[128, 128, 128,
//! 16768]` ("KSA") against every window whole-context ("full": full
//! attention with the same weights), for uniform batches (every sequence at
//! the context) and ragged ones (every other sequence at an eighth of it).
//!
//! `cargo run --profile bench --example decode_report -- [--contexts 4096,32768]
//! [--batches 1,8,32] [--steps 4] [--max-cache-gib 6] [--skip-full]
//! [--plot docs/decode_throughput.svg]`
//!
//! Each context is prefilled once per window set (the context and its eighth
//! as one ragged chunked append); batches are assembled from those two
//! sequences with `KsaCache::select`. Batches whose K/V would pass
//! `--max-cache-gib` are skipped and listed.

#[path = "random_model.rs"]
mod random_model;

use indicatif::{ProgressBar, ProgressStyle};
use ksa::{KsaCache, LogitRows};
use plotters::prelude::*;
use random_model::*;
use std::time::Instant;

struct Args {
    contexts: Vec<usize>,
    batches: Vec<usize>,
    steps: usize,
    max_cache: f64,
    full: bool,
    plot: Option<String>,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut args = Args {
        contexts: vec![4 << 10, 32 << 10],
        batches: vec![1, 8, 32],
        steps: 4,
        max_cache: 6.0,
        full: true,
        plot: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--contexts" => args.contexts = usize_list(&flag, &value()?)?,
            "--batches" => args.batches = usize_list(&flag, &value()?)?,
            "--steps" => args.steps = value()?.parse().map_err(|e| format!("--steps: {e}"))?,
            "--max-cache-gib" => {
                args.max_cache = value()?
                    .parse()
                    .map_err(|e| format!("--max-cache-gib: {e}"))?
            }
            "--skip-full" => args.full = false,
            "--plot" => args.plot = Some(value()?),
            "-h" | "--help" => {
                return Err("usage: decode_report [--contexts N,..] [--batches B,..] \
                            [--steps S] [--max-cache-gib G] [--skip-full] [--plot FILE.svg]"
                    .into())
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if args.steps == 0 || args.batches.contains(&0) {
        return Err("--steps and every batch must be at least 1".into());
    }
    if args.contexts.iter().any(|&n| n < 8) {
        return Err("contexts must be at least 8 tokens (one ragged eighth)".into());
    }
    Ok(args)
}

/// One measured configuration.
struct Row {
    kind: &'static str,
    context: usize,
    batch: usize,
    ragged: bool,
    tokens_per_s: f64,
    /// Tokens per CPU second (all threads): steadier on a shared machine.
    tokens_per_cpu_s: f64,
    cache_mib: f64,
}

fn main() -> Result<()> {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    println!("CPU: {}", cpu_name());
    println!(
        "random model of long_context, f32, host storage; {} timed decode steps per batch\n",
        args.steps
    );
    let kinds: Vec<(&'static str, bool)> = if args.full {
        vec![("KSA", false), ("full", true)]
    } else {
        vec![("KSA", false)]
    };
    let bar = ProgressBar::new((kinds.len() * args.contexts.len()) as u64).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}] {msg}")?,
    );
    let (mut rows, mut skipped) = (Vec::new(), Vec::new());
    for &(kind, full) in &kinds {
        let model = model(&windows(4, full), 1)?;
        for &n in &args.contexts {
            bar.set_message(format!("{kind} {n}: prefill"));
            let (long, short) = (tokens(&model, n, 3), tokens(&model, n / 8, 4));
            let mut base = KsaCache::new(&model, 2)?;
            base.append(&model, &[(0, &long), (1, &short)], LogitRows::Last)?;
            // K/V bytes of one sequence at the context (a host copy holds
            // its live rows).
            let per_seq = base.select(&[0])?.bytes() as f64;
            for &b in &args.batches {
                for ragged in [false, true] {
                    if ragged && b == 1 {
                        continue;
                    }
                    let picks: Vec<usize> =
                        (0..b).map(|i| usize::from(ragged && i % 2 == 1)).collect();
                    if per_seq * b as f64 > args.max_cache * (1u64 << 30) as f64 {
                        skipped.push(format!(
                            "{kind} {n} batch {b}{}",
                            if ragged { " ragged" } else { "" }
                        ));
                        continue;
                    }
                    bar.set_message(format!(
                        "{kind} {n}: batch {b}{}",
                        if ragged { " ragged" } else { "" }
                    ));
                    let mut cache = base.select(&picks)?;
                    let next: Vec<u32> = (0..b as u32).map(|i| 1 + i % 100).collect();
                    // One untimed step: the first write copies and grows the buffers.
                    cache.step(&model, &next)?;
                    let (start, cpu) = (Instant::now(), cpu_time());
                    for _ in 0..args.steps {
                        cache.step(&model, &next)?;
                    }
                    let (secs, cpu) = (start.elapsed().as_secs_f64(), cpu_time() - cpu);
                    rows.push(Row {
                        kind,
                        context: n,
                        batch: b,
                        ragged,
                        tokens_per_s: (b * args.steps) as f64 / secs,
                        tokens_per_cpu_s: (b * args.steps) as f64 / cpu,
                        cache_mib: cache.bytes() as f64 / (1u64 << 20) as f64,
                    });
                }
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    println!(
        "| context | batch | batch kind | KSA tokens/s | full tokens/s | KSA / full \
         | KSA / full (CPU time) | KSA cache MiB | full cache MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let find = |kind: &str, r: &Row| {
        rows.iter().find(|o| {
            o.kind == kind && o.context == r.context && o.batch == r.batch && o.ragged == r.ragged
        })
    };
    for r in rows.iter().filter(|r| r.kind == "KSA") {
        let full = find("full", r);
        println!(
            "| {} | {} | {} | {:.1} | {} | {} | {} | {:.0} | {} |",
            r.context,
            r.batch,
            if r.ragged {
                "ragged (n, n/8)"
            } else {
                "uniform"
            },
            r.tokens_per_s,
            full.map_or("-".into(), |f| format!("{:.1}", f.tokens_per_s)),
            full.map_or("-".into(), |f| format!(
                "{:.2}x",
                r.tokens_per_s / f.tokens_per_s
            )),
            full.map_or("-".into(), |f| format!(
                "{:.2}x",
                r.tokens_per_cpu_s / f.tokens_per_cpu_s
            )),
            r.cache_mib,
            full.map_or("-".into(), |f| format!("{:.0}", f.cache_mib)),
        );
    }
    if !skipped.is_empty() {
        println!(
            "\nskipped (K/V over --max-cache-gib {}): {}",
            args.max_cache,
            skipped.join(", ")
        );
    }
    if let Some(path) = &args.plot {
        plot(path, &rows, &args.contexts)?;
        println!("\nplot: {path}");
    }
    Ok(())
}

/// Tokens/s against batch size, one line per (window set, context), uniform
/// batches; log-log axes.
fn plot(path: &str, rows: &[Row], contexts: &[usize]) -> Result<()> {
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let uniform: Vec<&Row> = rows.iter().filter(|r| !r.ragged).collect();
    let max_b = uniform.iter().map(|r| r.batch).max().unwrap_or(1) as f64;
    let (lo, hi) = uniform.iter().fold((f64::MAX, 0f64), |(lo, hi), r| {
        (lo.min(r.tokens_per_s), hi.max(r.tokens_per_s))
    });
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Batched decode throughput (random model, CPU)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(
            (0.8f64..max_b * 1.25).log_scale(),
            (lo.max(1e-3) / 1.5..hi * 1.5).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("batch size")
        .y_desc("tokens / s")
        .draw()?;
    let palette = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (ci, &n) in contexts.iter().enumerate() {
        for (kind, dashed) in [("KSA", false), ("full", true)] {
            let mut pts: Vec<(f64, f64)> = uniform
                .iter()
                .filter(|r| r.kind == kind && r.context == n)
                .map(|r| (r.batch as f64, r.tokens_per_s))
                .collect();
            if pts.is_empty() {
                continue;
            }
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let color = palette[ci % palette.len()];
            let style = if dashed {
                color.mix(0.5).stroke_width(2)
            } else {
                color.stroke_width(2)
            };
            chart
                .draw_series(LineSeries::new(pts.clone(), style))?
                .label(format!("{kind} {}K", n / 1024))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], style));
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
