//! One-run report of batched decode throughput through `KsaCache` on a
//! random model (host storage): tokens per second for each batch size and
//! context, with KSA windows (`[128, 128, 128, 16768]` repeated, the
//! pattern of `examples/long_context` and of KSA-4B-base) against every
//! window whole-context ("full": full attention with the same weights), for
//! uniform batches (every sequence at the context) and ragged ones (every
//! other sequence at an eighth of it).
//!
//! `cargo run --profile bench --example decode_report -- [--shape random|4b]
//! [--layers 4] [--dtype f32|bf16] [--contexts 4096,32768] [--batches 1,8,32]
//! [--steps 4] [--max-cache-gib 6] [--max-prefill-cpu-s S] [--skip-full]
//! [--plot docs/decode_throughput.svg]`
//!
//! Shapes: `random` is the model of `examples/long_context` (4 layers,
//! hidden 512, 8 q / 2 kv heads of 64); `4b` is KSA-4B-base's per-layer
//! shapes (hidden 2560, intermediate 9728, 32 q / 8 kv heads of 128) with
//! `--layers` of its 36 layers and a 4,096-token vocabulary. C = 8, S = 1.
//! The host cache keeps the model's dtype (`--dtype bf16` halves it).
//!
//! Contexts run in increasing order; at each, both window sets are
//! prefilled (the context and its eighth as one ragged chunked append),
//! then each batch is assembled from those two sequences with
//! `KsaCache::select` and the window sets' steps alternate, so both see the
//! same load. Before each prefill the report prints its estimated CPU time,
//! fitted as `a n + b n^2` to that window set's earlier prefills; one over
//! `--max-prefill-cpu-s` is skipped. Batches whose K/V (with the prefilled
//! sequences) would pass `--max-cache-gib` are skipped; when two window
//! sets fit alone but not together they run one after the other. Skips are
//! listed with their reason.

#[path = "random_model.rs"]
mod random_model;

use candle_core::DType;
use indicatif::{ProgressBar, ProgressStyle};
use ksa::{KsaCache, LogitRows, Qwen3Ksa};
use plotters::prelude::*;
use random_model::*;
use std::time::Instant;

struct Args {
    shape: Shape,
    /// `random` or `4b`.
    shape_name: String,
    dtype: DType,
    contexts: Vec<usize>,
    batches: Vec<usize>,
    steps: usize,
    max_cache: f64,
    max_prefill_cpu: f64,
    full: bool,
    plot: Option<String>,
}

const USAGE: &str = "usage: decode_report [--shape random|4b] [--layers N] [--dtype f32|bf16] \
                     [--contexts N,..] [--batches B,..] [--steps S] [--max-cache-gib G] \
                     [--max-prefill-cpu-s S] [--skip-full] [--plot FILE.svg]";

fn parse_args() -> std::result::Result<Args, String> {
    let mut args = Args {
        shape: Shape::LONG_CONTEXT,
        shape_name: "random".into(),
        dtype: DType::F32,
        contexts: vec![4 << 10, 32 << 10],
        batches: vec![1, 8, 32],
        steps: 4,
        max_cache: 6.0,
        max_prefill_cpu: f64::INFINITY,
        full: true,
        plot: None,
    };
    let mut layers = 4usize;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| v.parse::<f64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--shape" => args.shape_name = value()?,
            "--layers" => layers = value()?.parse().map_err(|e| format!("--layers: {e}"))?,
            "--dtype" => {
                args.dtype = match value()?.as_str() {
                    "f32" => DType::F32,
                    "bf16" => DType::BF16,
                    other => return Err(format!("--dtype is f32 or bf16, got {other}")),
                }
            }
            "--contexts" => args.contexts = usize_list(&flag, &value()?)?,
            "--batches" => args.batches = usize_list(&flag, &value()?)?,
            "--steps" => args.steps = value()?.parse().map_err(|e| format!("--steps: {e}"))?,
            "--max-cache-gib" => args.max_cache = number(value()?)?,
            "--max-prefill-cpu-s" => args.max_prefill_cpu = number(value()?)?,
            "--skip-full" => args.full = false,
            "--plot" => args.plot = Some(value()?),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if layers == 0 {
        return Err("--layers must be at least 1".into());
    }
    args.shape = match args.shape_name.as_str() {
        "random" => Shape {
            layers,
            ..Shape::LONG_CONTEXT
        },
        "4b" => Shape::ksa_4b(layers),
        other => return Err(format!("--shape is random or 4b, got {other}")),
    };
    if args.steps == 0 || args.batches.contains(&0) {
        return Err("--steps and every batch must be at least 1".into());
    }
    if args.contexts.iter().any(|&n| n < 8) {
        return Err("contexts must be at least 8 tokens (one ragged eighth)".into());
    }
    args.contexts.sort_unstable();
    args.contexts.dedup();
    Ok(args)
}

/// One window set: its model and the prefills measured so far.
struct Kind {
    name: &'static str,
    model: Qwen3Ksa,
    /// (context, CPU s, wall s) of each prefill done.
    prefills: Vec<(usize, f64, f64)>,
}

impl Kind {
    /// Estimated (CPU s, wall s) of a prefill of `n` (and its eighth):
    /// `a n + b n^2` through the two largest earlier prefills (`b >= 0`: the
    /// whole-context layers' attention), wall scaled by the last prefill's
    /// wall/CPU. `None` before any prefill.
    fn estimate(&self, n: usize) -> Option<(f64, f64)> {
        let &(n2, c2, w2) = self.prefills.last()?;
        let (n2f, nf) = (n2 as f64, n as f64);
        let b = match self.prefills.len() {
            1 => 0.0, // linear from one point: a lower bound
            k => {
                let (n1, c1, _) = self.prefills[k - 2];
                let n1 = n1 as f64;
                ((c2 / n2f - c1 / n1) / (n2f - n1)).max(0.0)
            }
        };
        let a = (c2 / n2f - b * n2f).max(0.0);
        let cpu = a * nf + b * nf * nf;
        Some((cpu, cpu * w2 / c2.max(1e-9)))
    }
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
    /// Whether this window set's steps alternated with the other's.
    interleaved: bool,
}

const GIB: f64 = (1u64 << 30) as f64;

fn main() -> Result<()> {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let s = args.shape;
    let what = match args.shape_name.as_str() {
        "4b" => format!(
            "KSA-4B-base's per-layer shapes with {} of its 36 layers (hidden 2560, \
             intermediate 9728, 32 q / 8 kv heads of 128, vocabulary 4,096)",
            s.layers
        ),
        _ => format!(
            "random model of long_context ({} layers, hidden 512, 8 q / 2 kv heads of 64)",
            s.layers
        ),
    };
    println!("CPU: {}", cpu_name());
    println!("load average at start: {}", load_average());
    println!(
        "{what}, {:?}, host storage; {} timed decode steps per batch\n",
        args.dtype, args.steps
    );
    let ksa_windows = windows(s.layers, false);
    let shared = weights(&s.config(&ksa_windows)?, args.dtype, 1)?;
    let mut kinds = vec![Kind {
        name: "KSA",
        model: model_from(&s.config(&ksa_windows)?, &shared)?,
        prefills: Vec::new(),
    }];
    if args.full {
        kinds.push(Kind {
            name: "full",
            model: model_from(&s.config(&windows(s.layers, true))?, &shared)?,
            prefills: Vec::new(),
        });
    }
    drop(shared);
    let bar = ProgressBar::new((kinds.len() * args.contexts.len()) as u64).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}] {msg}")?,
    );
    let (mut rows, mut skipped, mut prefill_rows) = (Vec::new(), Vec::new(), Vec::new());
    let started = (Instant::now(), cpu_time());
    for &n in &args.contexts {
        // Plan: every remaining prefill's estimate, from what ran so far.
        for k in &kinds {
            let plan: Vec<String> = args
                .contexts
                .iter()
                .filter(|&&m| m >= n)
                .filter_map(|&m| {
                    k.estimate(m)
                        .map(|(c, w)| format!("{m}: ~{c:.0} CPU s (~{w:.0} s wall)"))
                })
                .collect();
            if !plan.is_empty() {
                let line = format!("plan, {} prefills: {}", k.name, plan.join(", "));
                bar.suspend(|| println!("{line}"));
            }
        }
        // Both window sets' prefilled sequences (the context, its eighth).
        let mut bases: Vec<(usize, KsaCache)> = Vec::new();
        for (ki, k) in kinds.iter_mut().enumerate() {
            bar.set_message(format!("{} {n}: prefill", k.name));
            let estimate = k.estimate(n);
            if let Some((cpu, _)) = estimate.filter(|&(cpu, _)| cpu > args.max_prefill_cpu) {
                skipped.push(format!(
                    "{} {n} (prefill estimated at {cpu:.0} CPU s, over --max-prefill-cpu-s {})",
                    k.name, args.max_prefill_cpu
                ));
                bar.inc(1);
                continue;
            }
            let (long, short) = (tokens(&k.model, n, 3), tokens(&k.model, n / 8, 4));
            let (t0, c0) = (Instant::now(), cpu_time());
            let mut base = KsaCache::new(&k.model, 2)?;
            base.append(&k.model, &[(0, &long), (1, &short)], LogitRows::Last)?;
            let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_time() - c0);
            k.prefills.push((n, cpu, wall));
            prefill_rows.push((k.name, n, wall, cpu, estimate, base.bytes()));
            let line = format!(
                "{} {n}: prefill {wall:.1} s wall / {cpu:.1} CPU s{}, load {}",
                k.name,
                estimate.map_or(String::new(), |(c, _)| format!(" (estimated {c:.0})")),
                load_average()
            );
            bar.suspend(|| println!("{line}"));
            bases.push((ki, base));
        }
        let base_bytes: f64 = bases.iter().map(|(_, b)| b.bytes() as f64).sum();
        // K/V bytes of the sequence at the context and of its eighth, per
        // window set (a host copy holds its live rows).
        let per_seq: Vec<[f64; 2]> = bases
            .iter()
            .map(|(_, b)| {
                Ok([
                    b.select(&[0])?.bytes() as f64,
                    b.select(&[1])?.bytes() as f64,
                ])
            })
            .collect::<Result<_>>()?;
        for &b in &args.batches {
            for ragged in [false, true] {
                if ragged && b == 1 {
                    continue;
                }
                let label = format!("{n} batch {b}{}", if ragged { " ragged" } else { "" });
                let budget = args.max_cache * GIB - base_bytes;
                let picks: Vec<usize> = (0..b).map(|i| usize::from(ragged && i % 2 == 1)).collect();
                let need: Vec<f64> = per_seq
                    .iter()
                    .map(|p| picks.iter().map(|&i| p[i]).sum())
                    .collect();
                // Together when all fit, else each that fits alone in turn.
                let groups: Vec<Vec<usize>> = if need.iter().sum::<f64>() <= budget {
                    vec![(0..bases.len()).collect()]
                } else {
                    (0..bases.len())
                        .filter(|&i| {
                            let fits = need[i] <= budget;
                            if !fits {
                                skipped.push(format!(
                                    "{} {label} (K/V {:.1} GiB + prefilled {:.1} GiB over \
                                     --max-cache-gib {})",
                                    kinds[bases[i].0].name,
                                    need[i] / GIB,
                                    base_bytes / GIB,
                                    args.max_cache
                                ));
                            }
                            fits
                        })
                        .map(|i| vec![i])
                        .collect()
                };
                let next: Vec<u32> = (0..b as u32).map(|i| 1 + i % 100).collect();
                for group in groups {
                    bar.set_message(format!("{label}: decode"));
                    let mut caches = Vec::new();
                    for &i in &group {
                        let (ki, base) = &bases[i];
                        let mut cache = base.select(&picks)?;
                        // One untimed step: the first write copies and grows the buffers.
                        cache.step(&kinds[*ki].model, &next)?;
                        caches.push((*ki, cache, 0f64, 0f64));
                    }
                    for _ in 0..args.steps {
                        for (ki, cache, wall, cpu) in caches.iter_mut() {
                            let (t0, c0) = (Instant::now(), cpu_time());
                            cache.step(&kinds[*ki].model, &next)?;
                            *wall += t0.elapsed().as_secs_f64();
                            *cpu += cpu_time() - c0;
                        }
                    }
                    let interleaved = caches.len() > 1;
                    for (ki, cache, wall, cpu) in caches {
                        rows.push(Row {
                            kind: kinds[ki].name,
                            context: n,
                            batch: b,
                            ragged,
                            tokens_per_s: (b * args.steps) as f64 / wall,
                            tokens_per_cpu_s: (b * args.steps) as f64 / cpu,
                            cache_mib: cache.bytes() as f64 / (1u64 << 20) as f64,
                            interleaved,
                        });
                    }
                    // The batches' K/V are freed: hand the pages back, so the
                    // shared machine does not carry them until the next batch.
                    release_free_memory();
                }
            }
        }
        bar.inc(bases.len() as u64);
    }
    bar.finish_and_clear();
    println!(
        "\nload average at end: {}; whole run {:.0} s wall, {:.0} CPU s\n",
        load_average(),
        started.0.elapsed().as_secs_f64(),
        cpu_time() - started.1
    );
    println!(
        "| context | windows | prefill s (wall / CPU) | estimated CPU s | K/V of (n, n/8) MiB |"
    );
    println!("|---|---|---|---|---|");
    for (name, n, wall, cpu, estimate, bytes) in &prefill_rows {
        println!(
            "| {n} | {name} | {wall:.1} / {cpu:.1} | {} | {:.0} |",
            estimate.map_or("-".into(), |(c, _)| format!("{c:.0}")),
            *bytes as f64 / (1u64 << 20) as f64
        );
    }
    println!(
        "\n| context | batch | batch kind | KSA tokens/s | full tokens/s | KSA / full \
         | KSA / full (CPU time) | KSA cache MiB | full cache MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let find = |kind: &str, r: &Row| {
        rows.iter().find(|o| {
            o.kind == kind && o.context == r.context && o.batch == r.batch && o.ragged == r.ragged
        })
    };
    let keys: Vec<&Row> = rows
        .iter()
        .filter(|r| r.kind == "KSA" || find("KSA", r).is_none())
        .collect();
    for r in keys {
        let (ksa, full) = (find("KSA", r), find("full", r));
        let fmt = |x: Option<&Row>, f: &dyn Fn(&Row) -> String| x.map_or("-".into(), f);
        let ratio = |f: &dyn Fn(&Row) -> f64| match (ksa, full) {
            (Some(k), Some(u)) => format!(
                "{:.2}x{}",
                f(k) / f(u),
                if k.interleaved { "" } else { " (in turn)" }
            ),
            _ => "-".into(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.context,
            r.batch,
            if r.ragged {
                "ragged (n, n/8)"
            } else {
                "uniform"
            },
            fmt(ksa, &|k| format!("{:.1}", k.tokens_per_s)),
            fmt(full, &|u| format!("{:.1}", u.tokens_per_s)),
            ratio(&|x| x.tokens_per_s),
            ratio(&|x| x.tokens_per_cpu_s),
            fmt(ksa, &|k| format!("{:.0}", k.cache_mib)),
            fmt(full, &|u| format!("{:.0}", u.cache_mib)),
        );
    }
    if !skipped.is_empty() {
        println!("\nskipped: {}", skipped.join("; "));
    }
    if let Some(path) = &args.plot {
        let caption = match args.shape_name.as_str() {
            "4b" => format!(
                "Batched decode, KSA-4B-base layer shapes x{} ({:?}, CPU)",
                s.layers, args.dtype
            ),
            _ => "Batched decode throughput (random model, CPU)".to_string(),
        };
        plot(path, &caption, &rows, &args.contexts)?;
        println!("\nplot: {path}");
    }
    Ok(())
}

/// Tokens/s against batch size, one line per (window set, context), uniform
/// batches; log-log axes.
fn plot(path: &str, caption: &str, rows: &[Row], contexts: &[usize]) -> Result<()> {
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let uniform: Vec<&Row> = rows.iter().filter(|r| !r.ragged).collect();
    let max_b = uniform.iter().map(|r| r.batch).max().unwrap_or(1) as f64;
    let (lo, hi) = uniform.iter().fold((f64::MAX, 0f64), |(lo, hi), r| {
        (lo.min(r.tokens_per_s), hi.max(r.tokens_per_s))
    });
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 18))
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
