//! Kwai Summary Attention (KSA) for candle.
//!
//! KSA cuts the text into chunks of `C` tokens and appends `S` learnable
//! summary tokens after each complete chunk. A text token sees raw text only
//! within a window of `W` chunks (and its own chunk, causally) and older
//! history only through summaries, so attention cost and the KV cache grow
//! like `W*C + S*n/C` instead of `n`.
//!
//! * [`KsaConfig`] and [`KsaLayout`]: the interleaved sequence, slot kinds, RoPE
//!   position ids, and the mask ([`KsaLayout::can_attend`], [`KsaLayout::key_ranges`]).
//! * [`attention`]: KSA attention on candle tensors, differentiable, routed by
//!   device (the block-sparse CPU path, or the fused CUDA kernels with feature
//!   `cuda`); [`causal_attention`]: the full causal baseline on the same
//!   paths; [`decode_attention`]: new query rows over cached key runs
//!   ([`KvRows`]). The softmax scale is passed as [`AttentionOptions`].
//! * [`reference`](mod@reference): the dense f64 oracle every fast path is tested against.
//! * [`SummaryAttention`] and [`Qwen3Ksa`]: the KSA layer and the Qwen3-KSA
//!   model, loading the reference's checkpoints ([`Qwen3KsaConfig`]).
//! * [`KsaCache`]: the batched decode cache (window text and summary K/V per
//!   layer, `O(W*C + S*n/C)` per sequence), equal to a full forward at every
//!   step; [`Qwen3Ksa::generate`] decodes over it, greedy or sampled.
//!
//! The semantics are stated in `docs/spec.md`, the module map and data flow
//! in `docs/ARCHITECTURE.md`. Kernel plumbing (`cpu`, `cuda`, `schedule`,
//! `mask::Mask`) is public for the tests, benchmarks and reports but hidden
//! from these docs.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use ksa::{KsaConfig, KsaLayout};
//! # fn main() -> ksa::Result<()> {
//! let layout = KsaLayout::new(KsaConfig::new(8, 1, 2)?, 100)?; // C = 8, S = 1, W = 2
//! let (b, hq, hkv, d) = (1, 4, 2, 32);
//! let q = Tensor::randn(0f32, 1.0, (b, hq, layout.len(), d), &Device::Cpu)?;
//! let k = Tensor::randn(0f32, 1.0, (b, hkv, layout.len(), d), &Device::Cpu)?;
//! let v = Tensor::randn(0f32, 1.0, (b, hkv, layout.len(), d), &Device::Cpu)?;
//! let out = ksa::attention(&q, &k, &v, &layout)?;
//! assert_eq!(out.dims(), &[b, hq, layout.len(), d]);
//! # Ok(()) }
//! ```

mod attention;
pub mod cache;
mod check;
pub mod config;
pub mod convert;
#[doc(hidden)]
pub mod cpu;
#[doc(hidden)]
pub mod cuda;
mod error;
pub mod generate;
#[cfg(feature = "hub")]
pub mod hub;
pub mod layer;
pub mod layout;
pub mod mask;
pub mod model;
pub mod model_config;
mod op;
pub mod reference;
#[doc(hidden)]
pub mod schedule;
pub mod text;
mod weights;

pub use attention::{
    attention, attention_with, causal_attention, causal_attention_with, decode_attention,
    AttentionOptions, KvRows,
};
pub use cache::{CacheStorage, KsaCache, LogitRows};
pub use config::{KsaConfig, SummaryPositions, TextPositions};
pub use error::{Error, Result};
pub use generate::{GenerateOptions, Sampling};
pub use layer::{SummaryAttention, SummaryAttentionConfig};
pub use layout::{KsaLayout, SlotKind};
pub use mask::{KeyRanges, PairCounts};
pub use model::Qwen3Ksa;
pub use model_config::Qwen3KsaConfig;
