//! KSA hyper-parameters: chunk size `C`, summaries per chunk `S`, window `W`
//! and the position-id schemes (docs/spec.md sections 1-3).

use crate::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// Position ids of text tokens (config field `summary_chunk_position_ids_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TextPositions {
    /// The token's original index `t` (the shipped setting).
    #[default]
    Origin,
    /// The index inside its chunk, `t % C`.
    InnerChunk,
}

/// Position ids of summary tokens (config field `summary_token_position_ids_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SummaryPositions {
    /// `c*C + ((j+1)*C)/S - 1`, at least `c*C` (the shipped setting; with `S = 1`
    /// the position of the chunk's last text token).
    #[default]
    LastChunkSliceRight,
    /// `c*C + (j*C)/S - 1`, at least `c*C`.
    LastChunkSliceLeft,
    /// Always 0.
    Zeros,
}

impl TextPositions {
    /// The name used in the reference's `config.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Origin => "origin",
            Self::InnerChunk => "inner_chunk",
        }
    }
}

impl SummaryPositions {
    /// The name used in the reference's `config.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LastChunkSliceRight => "last_chunk_slice_right",
            Self::LastChunkSliceLeft => "last_chunk_slice_left",
            Self::Zeros => "zeros",
        }
    }
}

impl FromStr for TextPositions {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "origin" => Ok(Self::Origin),
            "inner_chunk" => Ok(Self::InnerChunk),
            _ => Err(Error::InvalidConfig(format!(
                "unknown text position scheme {s:?} (expected \"origin\" or \"inner_chunk\")"
            ))),
        }
    }
}

impl FromStr for SummaryPositions {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "last_chunk_slice_right" => Ok(Self::LastChunkSliceRight),
            "last_chunk_slice_left" => Ok(Self::LastChunkSliceLeft),
            "zeros" => Ok(Self::Zeros),
            _ => Err(Error::InvalidConfig(format!(
                "unknown summary position scheme {s:?} (expected \"last_chunk_slice_right\", \
                 \"last_chunk_slice_left\" or \"zeros\")"
            ))),
        }
    }
}

impl fmt::Display for TextPositions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for SummaryPositions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The largest chunk size or summary count accepted: keeps every slot index
/// and position id of a layout inside `u32`, the index type of the kernels.
pub const MAX_CHUNK_OR_SUMMARIES: usize = 1 << 20;

/// Validated KSA hyper-parameters of one attention layer.
///
/// Summaries follow every *complete* chunk only; there is deliberately no
/// option to add them after a partial tail chunk (docs/spec.md section 1: no attention
/// path of the reference gives that layout defined semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KsaConfig {
    chunk_size: usize,
    summaries: usize,
    window: usize,
    text_positions: TextPositions,
    summary_positions: SummaryPositions,
    summary_reads: bool,
}

impl KsaConfig {
    /// `C` text tokens per chunk, `S` summaries after each full chunk, a window
    /// of `W` chunks of raw text (`W = 0`: none). Positions default to the
    /// shipped schemes (`origin`, `last_chunk_slice_right`).
    pub fn new(chunk_size: usize, summaries: usize, window: usize) -> Result<Self> {
        if chunk_size == 0 {
            return Err(Error::InvalidConfig(
                "chunk size C must be at least 1, got 0".into(),
            ));
        }
        if summaries == 0 {
            return Err(Error::InvalidConfig(
                "summaries per chunk S must be at least 1, got 0".into(),
            ));
        }
        for (name, v) in [
            ("chunk size C", chunk_size),
            ("summaries per chunk S", summaries),
        ] {
            if v > MAX_CHUNK_OR_SUMMARIES {
                return Err(Error::InvalidConfig(format!(
                    "{name} = {v} exceeds the supported maximum {MAX_CHUNK_OR_SUMMARIES}"
                )));
            }
        }
        Ok(Self {
            chunk_size,
            summaries,
            window,
            text_positions: TextPositions::default(),
            summary_positions: SummaryPositions::default(),
            summary_reads: true,
        })
    }

    /// The same config with another text position scheme.
    pub fn with_text_positions(mut self, p: TextPositions) -> Self {
        self.text_positions = p;
        self
    }

    /// The same config with another summary position scheme.
    pub fn with_summary_positions(mut self, p: SummaryPositions) -> Self {
        self.summary_positions = p;
        self
    }

    /// The same config with another window (hybrid models give each layer its own `W`).
    pub fn with_window(mut self, window: usize) -> Self {
        self.window = window;
        self
    }

    /// The same config with text queries reading old chunks' summaries
    /// (`true`, KSA and the default) or not (`false`). `false` is an
    /// **ablation, not part of KSA**: text then sees only its window of raw
    /// text (pure sliding-chunk attention), while summary slots still exist
    /// and attend as usual. It lets a training run measure what summaries add.
    pub fn with_summary_reads(mut self, reads: bool) -> Self {
        self.summary_reads = reads;
        self
    }

    /// `C`: text tokens per chunk.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }
    /// `S`: summary tokens after each full chunk.
    pub fn summaries(&self) -> usize {
        self.summaries
    }
    /// `W`: chunks of raw text before a token's own chunk that it still sees.
    pub fn window(&self) -> usize {
        self.window
    }
    /// Position scheme of text tokens.
    pub fn text_positions(&self) -> TextPositions {
        self.text_positions
    }
    /// Position scheme of summary tokens.
    pub fn summary_positions(&self) -> SummaryPositions {
        self.summary_positions
    }
    /// Whether text queries read the summaries of chunks older than their
    /// window (always, except in the [`KsaConfig::with_summary_reads`] ablation).
    pub fn summary_reads(&self) -> bool {
        self.summary_reads
    }
    /// `C + S`: slots per complete block.
    pub fn block_size(&self) -> usize {
        self.chunk_size + self.summaries
    }
}
