//! Performance proxies of the CUDA kernel without a GPU.
//!
//! 1. From the Rust schedule alone: key tiles visited by KSA vs full causal
//!    attention at n = 8K, 32K, 128K text tokens (C = 8, S = 1, W = 128), next
//!    to the allowed-pair ratio.
//! 2. With `--features ptx` (nvcc) : the kernel under the PTX emulator, KSA vs
//!    full causal at the same n: mma count (and its ratio next to the
//!    allowed-pair ratio), shared-memory bank conflicts, global bytes read per
//!    query tile against the minimum (Q tile + the K/V rows its queries may see).
//!
//! `cargo run --release --example gpu_report [--features ptx] [-- n W]`

use ksa::cuda::schedule::QueryMajorSchedule;
use ksa::{KsaConfig, KsaLayout};

#[cfg(feature = "ptx")]
#[path = "../tests/common/emu.rs"]
mod emu;

fn schedule_table() {
    use ksa::mask::Mask;
    println!("## Key tiles visited (Rust schedule alone; C=8 S=1 W=128; key tiles of 64)");
    println!();
    println!("Query tiles of 64 rows (1 query head per CTA) and of 16 rows (4 query heads of a");
    println!("GQA group per CTA, e.g. 32 query / 8 KV heads). Full causal = plain causal");
    println!("attention over the n text tokens with the same tiles.");
    println!();
    println!("| n (text) | N (slots) | query rows/tile | KSA tiles | full causal tiles | tile ratio | allowed-pair ratio | tiles/pairs | KSA edge tiles |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for n in [8 * 1024, 32 * 1024, 128 * 1024] {
        let layout = KsaLayout::new(KsaConfig::new(8, 1, 128).unwrap(), n).unwrap();
        for bq in [64, 16] {
            let ksa = QueryMajorSchedule::with_block_q(Mask::Ksa(layout), bq).unwrap();
            let full = QueryMajorSchedule::with_block_q(Mask::Causal { len: n }, bq).unwrap();
            let tile_ratio = full.tiles_visited() as f64 / ksa.tiles_visited() as f64;
            let pair_ratio =
                layout.causal_text_pairs() as f64 / layout.pair_counts().total() as f64;
            println!(
                "| {}K | {} | {bq} | {} | {} | {:.2}x | {:.2}x | {:.3} | {} ({:.1}%) |",
                n / 1024,
                layout.len(),
                ksa.tiles_visited(),
                full.tiles_visited(),
                tile_ratio,
                pair_ratio,
                tile_ratio / pair_ratio,
                ksa.edge_tiles(),
                100.0 * ksa.edge_tiles() as f64 / ksa.tiles_visited() as f64
            );
        }
    }
    println!();
}

#[cfg(feature = "ptx")]
fn emulator_table(n: usize, w: usize) {
    use emu::{run, Case};
    use ksa::mask::Mask;
    let d = 128;
    let layout = KsaLayout::new(KsaConfig::new(8, 1, w).unwrap(), n).unwrap();
    let (hq, hkv) = (4, 1);
    let ksa_case = Case::ksa(8, 1, w, n).dim(d).heads(1, hq, hkv);
    let full_case = Case::causal(n).dim(d).heads(1, hq, hkv);
    println!(
        "## Emulator counters (ptx-emu; bf16, d={d}, {hq} query heads on {hkv} KV head, C=8 S=1 W={w}, n={n})"
    );
    println!();
    println!("A CTA serves the 4 query heads of the KV group (16-row query tiles). Minimum");
    println!("bytes per CTA: its Q rows (all heads) plus the distinct K and V rows its");
    println!("queries may see, read once. Bank conflicts: all shared accesses of the kernel.");
    println!();
    println!("| kernel | rows | CTAs | tile visits per head group | mma | ldmatrix | bank conflicts | shared wavefronts | global bytes read / CTA | minimum / CTA | read/min | emulator s |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut mmas = Vec::new();
    for case in [ksa_case, full_case] {
        let (q, k, v) = emu::inputs(&case);
        let r = run(&case, &q, &k, &v);
        let sched = &r.launch.schedule;
        // Minimum bytes: each query tile's Q rows plus the distinct K and V rows
        // its queries may attend to (2 bytes per element), plus its output is not
        // counted (written, not read).
        let mut min = 0u64;
        for t in sched.query_tiles() {
            let mut keys: Vec<std::ops::Range<usize>> = t
                .rows
                .clone()
                .flat_map(|g| case.mask.gathered().keys(g))
                .filter(|r| !r.is_empty())
                .collect();
            keys.sort_by_key(|r| r.start);
            let mut distinct = 0usize;
            let mut end = 0usize;
            for r in keys {
                let a = r.start.max(end);
                if r.end > a {
                    distinct += r.end - a;
                }
                end = end.max(r.end);
            }
            min += ((t.rows.len() * r.launch.heads_per_cta + 2 * distinct) * d * 2) as u64;
        }
        let groups = (hq / r.launch.heads_per_cta) as u64;
        min *= groups;
        let ctas = r.report.ctas as f64;
        let name = match case.mask {
            Mask::Ksa(_) => "KSA",
            Mask::Causal { .. } => "full causal",
        };
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.2} | {:.1} |",
            case.mask.len(),
            r.report.ctas,
            sched.tiles_visited(),
            r.report.mma,
            r.report.ldmatrix,
            r.report.bank_conflicts,
            r.report.shared_wavefronts,
            r.report.global_bytes_read as f64 / ctas,
            min as f64 / ctas,
            r.report.global_bytes_read as f64 / min as f64,
            r.report.wall.as_secs_f64()
        );
        mmas.push(r.report.mma);
    }
    let pair_ratio = layout.causal_text_pairs() as f64 / layout.pair_counts().total() as f64;
    println!();
    println!(
        "mma full/KSA = {:.2}x; allowed pairs full/KSA = {:.2}x",
        mmas[1] as f64 / mmas[0] as f64,
        pair_ratio
    );
    println!();
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    schedule_table();
    #[cfg(feature = "ptx")]
    emulator_table(
        args.first().copied().unwrap_or(4096),
        args.get(1).copied().unwrap_or(32),
    );
    #[cfg(not(feature = "ptx"))]
    {
        let _ = args;
        println!("(emulator counters need `--features ptx`: nvcc compiles the kernel to PTX)");
    }
}
