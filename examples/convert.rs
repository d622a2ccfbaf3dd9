//! Converts a Qwen3 checkpoint folder (config.json, safetensors, tokenizer)
//! into a Qwen3-KSA checkpoint folder with `ksa::convert::qwen3_to_ksa`.
//!
//! ```text
//! cargo run --release --example convert -- SRC_DIR DST_DIR [--chunk 8] [--summaries 1]
//!     [--window 128] [--whole-every 4] [--windows PATTERN] [--mix 0.5]
//!     [--shared-projections] [--summary-norm]
//! ```
//!
//! Defaults follow KSA-4B-base: C = 8, S = 1, W = 128 chunks with a
//! whole-context layer every 4th (`--windows '([128]*3+[16768]*1)*9'` gives
//! a pattern verbatim), independent summary projections initialised from the
//! text ones, `mix_coeff` 0.5. The result loads with `Qwen3Ksa::from_folder`
//! and generates text with `cargo run --release --example generate --
//! --model DST_DIR --prompt "..."`.

use ksa::convert::{qwen3_to_ksa, ConvertOptions, Windows};

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> AnyResult<()> {
    let mut options = ConvertOptions::default();
    let (mut window, mut whole_every, mut pattern) = (128, 4, None);
    let mut dirs = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        if !arg.starts_with("--") {
            dirs.push(arg);
            continue;
        }
        match arg.as_str() {
            "--shared-projections" => {
                options.independent_parameters = false;
                continue;
            }
            "--summary-norm" => {
                options.independent_layernorm = true;
                continue;
            }
            _ => {}
        }
        let value = it.next().ok_or(format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--chunk" => options.chunk_size = value.parse()?,
            "--summaries" => options.summary_tokens = value.parse()?,
            "--window" => window = value.parse()?,
            "--whole-every" => whole_every = value.parse()?,
            "--windows" => pattern = Some(value),
            "--mix" => options.mix_coeff = value.parse()?,
            _ => return Err(format!("unknown flag {arg}").into()),
        }
    }
    let [src, dst] = &dirs[..] else {
        return Err("usage: convert SRC_DIR DST_DIR [options]".into());
    };
    options.windows = match pattern {
        Some(p) => Windows::Pattern(p),
        None if whole_every == 0 => Windows::Uniform(window),
        None => Windows::Hybrid {
            window,
            whole_every,
        },
    };
    let config = qwen3_to_ksa(src, dst, &options)?;
    println!(
        "{dst}: {} layers, C = {}, S = {} (embedding rows {}..{}), windows {:?}, mix_coeff {}",
        config.num_hidden_layers,
        config.summary_chunk_size,
        config.summary_token_num,
        config.summary_token_begin,
        config.summary_token_begin + config.summary_token_num,
        config.windows,
        config.mix_coeff
    );
    Ok(())
}
