//! A step's checks and plan: the model shape a cache serves, and where each
//! input's new slots go in the step's packed rows.

use super::{CacheStorage, KsaCache};
use crate::layout::KsaLayout;
use crate::model::Qwen3Ksa;
use crate::model_config::LayerKind;
use crate::{Error, KsaConfig, Result};
use std::ops::Range;

/// The model shape a cache is built for; a step with another model is an error.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct CacheSpec {
    pub(super) ksa: KsaConfig,
    /// Kind and window of every layer.
    pub(super) layers: Vec<(LayerKind, usize)>,
    pub(super) q_heads: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
}

impl CacheSpec {
    pub(super) fn of(model: &Qwen3Ksa) -> Result<Self> {
        let c = model.config();
        Ok(Self {
            ksa: c.ksa_config()?,
            layers: c
                .layer_kinds
                .iter()
                .copied()
                .zip(c.windows.iter().copied())
                .collect(),
            q_heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        })
    }

    /// First text token layer `layer` still needs once a sequence holds `n`
    /// tokens: the start of the window of the current chunk (0 for bypass).
    pub(super) fn window_first(&self, layer: usize, n: usize) -> usize {
        match self.layers[layer] {
            (LayerKind::Summary, w) => {
                let c = self.ksa.chunk_size();
                (n / c).saturating_sub(w) * c
            }
            (LayerKind::Bypass, _) => 0,
        }
    }
}

/// The new slots of one sequence in a step.
pub(super) struct Plan {
    pub(super) seq: usize,
    pub(super) old: usize,
    pub(super) new: usize,
    /// KsaLayout of the sequence after the step (window 0).
    pub(super) layout: KsaLayout,
    /// Its rows in the packed step (all slots).
    pub(super) rows: Range<usize>,
    /// Its rows among the packed text slots.
    pub(super) text_rows: Range<usize>,
}

impl KsaCache {
    /// Checks every input and lays out the step's packed rows.
    pub(super) fn validate(
        &self,
        model: &Qwen3Ksa,
        inputs: &[(usize, &[u32])],
    ) -> Result<Vec<Plan>> {
        let spec = CacheSpec::of(model)?;
        if spec != self.spec {
            return Err(Error::CacheModelMismatch(format!(
                "the cache was built for {:?}, the model is {:?}",
                self.spec, spec
            )));
        }
        let table = model.summary_embeddings()?;
        let place = (table.dtype(), table.device().location());
        if self.storage == CacheStorage::Tensors && place != self.place {
            return Err(Error::CacheModelMismatch(format!(
                "the cache holds {:?} tensors on {:?}, the model is {:?} on {:?}",
                self.place.0, self.place.1, place.0, place.1
            )));
        }
        let config = model.config();
        let mut seen = vec![false; self.seqs.len()];
        let (mut rows, mut text_rows) = (0, 0);
        let mut plans = Vec::with_capacity(inputs.len());
        for &(seq, tokens) in inputs {
            let state = self.seqs.get(seq).ok_or(Error::UnknownSequence {
                index: seq,
                batch: self.seqs.len(),
            })?;
            if std::mem::replace(&mut seen[seq], true) {
                return Err(Error::DuplicateSequence { index: seq });
            }
            for &token in tokens {
                config.check_text_token(token.into())?;
            }
            let old = state.len;
            let new = old.checked_add(tokens.len()).ok_or(Error::CacheCapacity {
                sequence: seq,
                len: old,
                adding: tokens.len(),
                capacity: usize::MAX,
            })?;
            if let Some(capacity) = self.capacity.filter(|&c| new > c) {
                return Err(Error::CacheCapacity {
                    sequence: seq,
                    len: old,
                    adding: tokens.len(),
                    capacity,
                });
            }
            let layout = KsaLayout::new(spec.ksa, new)?;
            let slots = layout.len() - KsaLayout::new(spec.ksa, old)?.len();
            plans.push(Plan {
                seq,
                old,
                new,
                layout,
                rows: rows..rows + slots,
                text_rows: text_rows..text_rows + tokens.len(),
            });
            rows += slots;
            text_rows += tokens.len();
        }
        Ok(plans)
    }
}
