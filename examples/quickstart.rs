//! A first look at KSA: the interleaved layout, who sees whom, attention on
//! random tensors checked against the oracle, and the cost saving at 128K.
//!
//! `cargo run --release --example quickstart`

use candle_core::{DType, Device, Tensor};
use ksa::{reference, KsaConfig, KsaLayout, SlotKind};

fn main() -> ksa::Result<()> {
    // C = 4 text tokens per chunk, S = 1 summary after each, window W = 1 chunk.
    let layout = KsaLayout::new(KsaConfig::new(4, 1, 1)?, 18)?;
    println!(
        "C = 4, S = 1, W = 1, n = {} text tokens -> N = {} slots",
        layout.text_len(),
        layout.len()
    );
    print_mask(&layout);

    // Attention over the expanded sequence: 8 query heads sharing 2 KV heads.
    let (b, hq, hkv, d) = (2, 8, 2, 64);
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1.0, (b, hq, layout.len(), d), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (b, hkv, layout.len(), d), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (b, hkv, layout.len(), d), &dev)?;
    let out = ksa::attention(&q, &k, &v, &layout)?;
    let oracle = reference::attention(&q, &k, &v, &layout)?;
    let diff = (out - oracle)?
        .abs()?
        .max_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    println!(
        "\nksa::attention on {:?}: max |out - reference| = {diff:.2e}",
        q.dims()
    );

    // The cost at 128K text tokens with the shipped settings.
    let n = 128 * 1024;
    let big = KsaLayout::new(KsaConfig::new(8, 1, 128)?, n)?;
    let pairs = big.pair_counts();
    let full = big.causal_text_pairs();
    println!("\nAt n = {n} text tokens, C = 8, S = 1, W = 128:");
    println!(
        "  keys per text query: KSA {:.0}, full causal {:.0}",
        pairs.text_queries as f64 / n as f64,
        full as f64 / n as f64
    );
    println!(
        "  allowed pairs: KSA {} (text {} + summary {}), full causal {}: {:.2}x fewer",
        pairs.total(),
        pairs.text_queries,
        pairs.summary_queries,
        full,
        full as f64 / pairs.total() as f64
    );
    Ok(())
}

/// One row per query slot: `#` allowed key, `.` masked; `t`/`s` label kinds.
fn print_mask(layout: &KsaLayout) {
    let label = |slot: usize| match layout.slot_kind(slot).expect("slot in layout") {
        SlotKind::Text { .. } => 't',
        SlotKind::Summary { .. } => 's',
    };
    let header: String = (0..layout.len()).map(label).collect();
    println!("\n      keys: {header}");
    for q in 0..layout.len() {
        let row: String = (0..layout.len())
            .map(|k| if layout.can_attend(q, k) { '#' } else { '.' })
            .collect();
        println!("query {q:>2} {}: {row}", label(q));
    }
}
