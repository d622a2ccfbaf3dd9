//! [`Qwen3Ksa::generate`]: batched text generation over a [`KsaCache`],
//! greedy or sampled (temperature, top-p, seeded), streaming every token.

use crate::cache::{KsaCache, LogitRows};
use crate::model::Qwen3Ksa;
use crate::{Error, Result};
use candle_core::DType;
use std::ops::Range;

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token (ties: the lowest id).
    Greedy,
    /// A draw from `softmax(logits / temperature)` restricted to the smallest
    /// set of most likely tokens whose probability reaches `top_p`.
    /// Sequence `i` draws from its own stream seeded with `(seed, i)`, so a
    /// run is reproducible whatever the batch holds.
    TopP {
        /// Softmax temperature (> 0).
        temperature: f64,
        /// Nucleus mass in `(0, 1]`.
        top_p: f64,
        /// Seed of the random streams.
        seed: u64,
    },
}

/// Options of [`Qwen3Ksa::generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens generated per sequence.
    pub max_new_tokens: usize,
    /// Token choice.
    pub sampling: Sampling,
    /// A sequence stops after emitting any of these (the stop token is kept).
    pub stop_tokens: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 32,
            sampling: Sampling::Greedy,
            stop_tokens: Vec::new(),
        }
    }
}

/// SplitMix64: tiny, seedable, and good enough to draw tokens.
#[derive(Debug, Clone)]
struct SplitMix(u64);

impl SplitMix {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks a token from one row of logits, never one of `excluded` (the
/// summary rows, present in the logits when `truncate_predict_nums` keeps
/// the whole table): they are not text and no step accepts them.
fn choose(logits: &[f32], excluded: Range<usize>, sampling: Sampling, rng: &mut SplitMix) -> u32 {
    let candidates = || {
        logits
            .iter()
            .enumerate()
            .filter(|(i, _)| !excluded.contains(i))
    };
    let argmax = || {
        // NaN logits never win; an all-NaN row picks its first candidate.
        let mut best: Option<(usize, f32)> = None;
        for (i, &x) in candidates() {
            if best.is_none_or(|(_, b)| x > b || b.is_nan()) {
                best = Some((i, x));
            }
        }
        best.map_or(0, |(i, _)| i as u32)
    };
    let Sampling::TopP {
        temperature, top_p, ..
    } = sampling
    else {
        return argmax();
    };
    let max = candidates()
        .map(|(_, &x)| x)
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(u32, f64)> = candidates()
        .map(|(i, &x)| (i as u32, ((x as f64 - max) / temperature).exp()))
        .collect();
    if !probs.iter().any(|p| p.1 > 0.0) {
        // No usable mass (every logit NaN or -inf): fall back to greedy.
        return argmax();
    }
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut keep = 0;
    let mut mass = 0.0;
    while keep < probs.len() && (keep == 0 || mass < top_p * total) {
        mass += probs[keep].1;
        keep += 1;
    }
    let mut u = rng.next_f64() * mass;
    for &(id, p) in &probs[..keep] {
        if u < p {
            return id;
        }
        u -= p;
    }
    probs[keep - 1].0
}

impl Qwen3Ksa {
    /// Continues every prompt of `prompts` (ragged lengths, none empty) by up
    /// to `options.max_new_tokens` tokens, over one [`KsaCache`]: the prompts
    /// are prefilled in one step, then every unfinished sequence decodes one
    /// token per step. `on_token(sequence, token)` is called for every token
    /// as soon as it is chosen. Returns the generated tokens per sequence.
    pub fn generate(
        &self,
        prompts: &[&[u32]],
        options: &GenerateOptions,
        on_token: impl FnMut(usize, u32),
    ) -> Result<Vec<Vec<u32>>> {
        let mut cache = KsaCache::new(self, prompts.len())?;
        self.generate_in(&mut cache, prompts, options, on_token)
    }

    /// [`Qwen3Ksa::generate`] over a cache the caller made (e.g.
    /// [`KsaCache::with_capacity`], or another storage) and can inspect
    /// afterwards: prompt `i` continues sequence `i` of `cache`.
    pub fn generate_in(
        &self,
        cache: &mut KsaCache,
        prompts: &[&[u32]],
        options: &GenerateOptions,
        mut on_token: impl FnMut(usize, u32),
    ) -> Result<Vec<Vec<u32>>> {
        if let Sampling::TopP {
            temperature, top_p, ..
        } = options.sampling
        {
            if !(temperature > 0.0 && temperature.is_finite() && top_p > 0.0 && top_p <= 1.0) {
                return Err(Error::InvalidConfig(format!(
                    "sampling needs temperature > 0 and top_p in (0, 1], got {temperature} and {top_p}"
                )));
            }
        }
        if let Some(seq) = prompts.iter().position(|p| p.is_empty()) {
            return Err(Error::InvalidConfig(format!(
                "prompt {seq} is empty: generation needs at least one token"
            )));
        }
        let (width, summaries) = (self.config().logits_size(), self.config().summary_rows());
        if (0..width).all(|i| summaries.contains(&i)) {
            return Err(Error::InvalidConfig(format!(
                "the {width} logits are all summary rows {summaries:?}: no text token to generate"
            )));
        }
        let seed = match options.sampling {
            Sampling::TopP { seed, .. } => seed,
            Sampling::Greedy => 0,
        };
        let mut rngs: Vec<SplitMix> = (0..prompts.len() as u64)
            .map(|i| SplitMix(seed ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03)))
            .collect();
        let mut out = vec![Vec::new(); prompts.len()];
        if options.max_new_tokens == 0 {
            return Ok(out);
        }
        let inputs: Vec<(usize, &[u32])> = prompts.iter().copied().enumerate().collect();
        let mut logits = cache.append(self, &inputs, LogitRows::Last)?;
        let mut active: Vec<usize> = (0..prompts.len()).collect();
        loop {
            let mut next = Vec::with_capacity(active.len());
            for (&seq, row) in active.iter().zip(&logits) {
                let row: Vec<f32> = row.squeeze(0)?.to_dtype(DType::F32)?.to_vec1()?;
                let excluded = self.config().summary_rows();
                let token = choose(&row, excluded, options.sampling, &mut rngs[seq]);
                out[seq].push(token);
                on_token(seq, token);
                let done = out[seq].len() >= options.max_new_tokens
                    || options.stop_tokens.contains(&token);
                if !done {
                    next.push((seq, token));
                }
            }
            if next.is_empty() {
                return Ok(out);
            }
            let tokens: Vec<[u32; 1]> = next.iter().map(|&(_, t)| [t]).collect();
            let inputs: Vec<(usize, &[u32])> = next
                .iter()
                .zip(&tokens)
                .map(|(&(seq, _), t)| (seq, &t[..]))
                .collect();
            logits = cache.append(self, &inputs, LogitRows::Last)?;
            active = next.into_iter().map(|(seq, _)| seq).collect();
        }
    }
}
