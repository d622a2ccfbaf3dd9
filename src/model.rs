//! [`Qwen3Ksa`]: the decoder-only Qwen3-KSA model (docs/spec.md section 4), loading
//! the reference's checkpoints (HF safetensors, single file or sharded)
//! unchanged.
//!
//! Text ids `[b, n]` go in; the model interleaves the `S` summary embeddings
//! after every complete chunk ([`KsaLayout`]), runs every slot through the
//! decoder layers, and returns logits for the text slots only, `[b, n, V']`.

use crate::layer::{load_linear, load_rms_norm, load_tensor, replace_slots, rms_norm};
use crate::layer::{SummaryAttention, SummaryAttentionConfig};
use crate::layout::KsaLayout;
use crate::model_config::{LayerKind, Qwen3KsaConfig};
use crate::weights::MappedWeights;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, Linear, Module, RmsNorm, VarBuilder};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    /// Builds the block from `vb` (the `mlp` prefix): `gate_proj`, `up_proj`, `down_proj`.
    pub(crate) fn new(
        hidden_size: usize,
        intermediate_size: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            gate_proj: load_linear(&vb, "gate_proj", hidden_size, intermediate_size)?,
            up_proj: load_linear(&vb, "up_proj", hidden_size, intermediate_size)?,
            down_proj: load_linear(&vb, "down_proj", intermediate_size, hidden_size)?,
        })
    }

    /// Applies the block to `[..., hidden]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
        Ok((gate * self.up_proj.forward(x)?)?.apply(&self.down_proj)?)
    }
}

/// The slots a [`DecoderLayer`] step runs over, as rows of its input: every
/// row's RoPE position, and which rows are summaries and which are text
/// (ascending; together, all rows).
pub(crate) struct StepRows<'a> {
    pub(crate) positions: &'a [u32],
    pub(crate) summaries: &'a [u32],
    pub(crate) text: &'a [u32],
}

/// One decoder layer: pre-attention RMSNorm (`input_layernorm_summary` for
/// summary slots when the config asks for it), [`SummaryAttention`] with the
/// layer's own `W`, residual, post-attention RMSNorm, SwiGLU MLP, residual.
/// A `summary_layer_freq` bypass layer runs plain causal attention and the
/// MLP over the text slots only; summary slots pass it unchanged.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    kind: LayerKind,
    self_attn: SummaryAttention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    input_layernorm_summary: Option<RmsNorm>,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    /// Builds layer `layer` of `config` from `vb` (the `model.layers.{layer}` prefix).
    pub fn new(config: &Qwen3KsaConfig, layer: usize, vb: VarBuilder) -> Result<Self> {
        let kind = *config.layer_kinds.get(layer).ok_or_else(|| {
            Error::ModelConfig(format!(
                "layer {layer} does not exist ({} layers)",
                config.layer_kinds.len()
            ))
        })?;
        let (h, eps) = (config.hidden_size, config.rms_norm_eps);
        let input_layernorm_summary = (config.summary_independent_attention_layernorm
            && kind == LayerKind::Summary)
            .then(|| load_rms_norm(&vb, "input_layernorm_summary", h, eps))
            .transpose()?;
        Ok(Self {
            kind,
            self_attn: SummaryAttention::new(
                &SummaryAttentionConfig::from_model(config, layer),
                vb.pp("self_attn"),
            )?,
            mlp: Mlp::new(h, config.intermediate_size, vb.pp("mlp"))?,
            input_layernorm: load_rms_norm(&vb, "input_layernorm", h, eps)?,
            input_layernorm_summary,
            post_attention_layernorm: load_rms_norm(&vb, "post_attention_layernorm", h, eps)?,
        })
    }

    /// Whether this is a KSA layer or a bypass layer.
    pub fn kind(&self) -> LayerKind {
        self.kind
    }

    /// The layer's attention (its window, projections for a decode cache).
    pub fn attention(&self) -> &SummaryAttention {
        &self.self_attn
    }

    /// Runs the layer on expanded hidden states `h: [b, N, hidden]` in slot
    /// order of `layout`; returns `[b, N, hidden]`.
    pub fn forward(&self, h: &Tensor, layout: &KsaLayout) -> Result<Tensor> {
        if layout.is_empty() {
            return Ok(h.clone());
        }
        // Slot gathers (index_select) need a contiguous source.
        let h = &h.contiguous()?;
        let rows = StepRows {
            positions: &layout.position_ids(),
            summaries: &layout.summary_slots(),
            text: &layout.text_slots(),
        };
        let layout = layout.with_window(self.self_attn.window());
        self.step(h, &rows, |q, k, v| match self.kind {
            LayerKind::Summary => crate::attention(q, k, v, &layout),
            LayerKind::Bypass => crate::causal_attention(q, k, v),
        })
    }

    /// The layer on any run of slots `h: [b, L, hidden]` (a whole sequence,
    /// or a decode step's new slots), written once for the forward and the
    /// cache: pre-attention norm, projections, `attend(q, k, v)`, `o_proj`,
    /// residual, feed-forward. A KSA layer attends with all `L` rows; a bypass
    /// layer with the text rows only (summary rows pass it unchanged).
    /// `attend` gets `q: [b, hq, R, d]` and the new `k, v: [b, hkv, R, d]`
    /// (after RoPE: what a cache stores) and returns `[b, hq, R, d]`.
    pub(crate) fn step(
        &self,
        h: &Tensor,
        rows: &StepRows<'_>,
        attend: impl FnOnce(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let attn = &self.self_attn;
        match self.kind {
            LayerKind::Summary => {
                let normed = self.attention_input(h, rows.summaries)?;
                let (q, k, v) = attn.project(&normed, rows.positions, rows.summaries)?;
                let h = (h + attn.output(&attend(&q, &k, &v)?)?)?;
                self.feed_forward(&h)
            }
            LayerKind::Bypass => {
                let idx = Tensor::from_slice(rows.text, rows.text.len(), h.device())?;
                let text = h.index_select(&idx, 1)?;
                let positions: Vec<u32> = rows
                    .text
                    .iter()
                    .map(|&r| rows.positions[r as usize])
                    .collect();
                let normed = self.attention_input(&text, &[])?;
                let (q, k, v) = attn.project(&normed, &positions, &[])?;
                let text = (&text + attn.output(&attend(&q, &k, &v)?)?)?;
                let text = self.feed_forward(&text)?;
                replace_slots(h, &text, rows.text)
            }
        }
    }

    /// The pre-attention RMSNorm of `h: [b, L, hidden]`: `input_layernorm`,
    /// or `input_layernorm_summary` on the slots listed (ascending) in
    /// `summary_slots` when the config has one. Works on any run of slots,
    /// so a decode step can reuse it.
    pub(crate) fn attention_input(&self, h: &Tensor, summary_slots: &[u32]) -> Result<Tensor> {
        let normed = rms_norm(&self.input_layernorm, h)?;
        match &self.input_layernorm_summary {
            Some(norm) if !summary_slots.is_empty() => {
                let idx = Tensor::from_slice(summary_slots, summary_slots.len(), h.device())?;
                let summaries = rms_norm(norm, &h.contiguous()?.index_select(&idx, 1)?)?;
                replace_slots(&normed, &summaries, summary_slots)
            }
            _ => Ok(normed),
        }
    }

    /// The second half of the layer on `h: [b, L, hidden]` (after the
    /// attention residual): `h + mlp(post_attention_layernorm(h))`, per slot.
    pub(crate) fn feed_forward(&self, h: &Tensor) -> Result<Tensor> {
        let normed = rms_norm(&self.post_attention_layernorm, h)?;
        Ok((h + self.mlp.forward(&normed)?)?)
    }
}

/// The Qwen3-KSA decoder-only language model.
///
/// [`Qwen3Ksa::forward`] maps text ids `[b, n]` to logits `[b, n, V']`
/// (`V'` = [`Qwen3KsaConfig::logits_size`]). The steps are public too
/// ([`Qwen3Ksa::embed`], [`Qwen3Ksa::layers`], [`Qwen3Ksa::logits`]) for
/// per-layer progress, inspection, and a decode cache.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use ksa::{Qwen3Ksa, Qwen3KsaConfig};
/// # fn main() -> ksa::Result<()> {
/// let config = Qwen3KsaConfig::from_json_str(r#"{
///     "vocab_size": 65, "hidden_size": 32, "intermediate_size": 64,
///     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
///     "head_dim": 8, "rope_theta": 10000.0, "tie_word_embeddings": true,
///     "truncate_predict_nums": 64, "summary_token_begin": 64,
///     "summary_chunk_size": 4, "summary_token_num": 1,
///     "summary_sliding_chunk_num": "([1]*1+[1000]*1)*1",
///     "summary_chunk_position_ids_type": "origin",
///     "summary_token_position_ids_type": "last_chunk_slice_right",
///     "summary_independent_parameters": false,
///     "summary_independent_attention_layernorm": false, "mix_coeff": 0.0
/// }"#)?;
/// // Real weights: `Qwen3Ksa::from_folder("KSA-4B-base", DType::BF16, &Device::Cpu)`.
/// let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
/// let model = Qwen3Ksa::new(&config, vb)?;
/// let ids = Tensor::new(&[[1u32, 2, 3, 4, 5, 6, 7, 8, 9, 10]], &Device::Cpu)?;
/// assert_eq!(model.forward(&ids)?.dims(), &[1, 10, 64]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Qwen3Ksa {
    config: Qwen3KsaConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
}

impl Qwen3Ksa {
    /// Builds the model from `vb` with the reference's tensor names
    /// ([`Qwen3Ksa::expected_tensors`]); a missing or mis-shaped tensor is
    /// [`Error::MissingTensor`] or [`Error::TensorShape`].
    /// The weights' dtype must be a float one ([`Error::UnsupportedDType`]).
    pub fn new(config: &Qwen3KsaConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        check_model_dtype(vb.dtype())?;
        let (v, h) = (config.vocab_size, config.hidden_size);
        let embeddings = load_tensor(&vb.pp("model.embed_tokens"), "weight", &[v, h])?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::new(config, i, vb.pp(format!("model.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let norm = load_rms_norm(&vb, "model.norm", h, config.rms_norm_eps)?;
        let head = if config.tie_word_embeddings {
            embeddings.clone()
        } else {
            load_tensor(&vb.pp("lm_head"), "weight", &[v, h])?
        };
        // Rows past the truncation are never returned: drop them before the matmul.
        let head = head.narrow(0, 0, config.logits_size())?;
        Ok(Self {
            config: config.clone(),
            embed_tokens: Embedding::new(embeddings, h),
            layers,
            norm,
            lm_head: Linear::new(head, None),
        })
    }

    /// Loads a model folder: `config.json` plus `model.safetensors` or the
    /// shards listed in `model.safetensors.index.json`. Every tensor's name
    /// and shape is checked against the config from the file headers before
    /// any weight is read. The files are memory-mapped and each tensor's
    /// pages are released once it is copied (converted to `dtype`), so peak
    /// resident memory stays near one copy of the weights in `dtype`.
    pub fn from_folder(path: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        check_model_dtype(dtype)?;
        let config = Qwen3KsaConfig::from_file(path.join("config.json"))?;
        let files = safetensors_files(path)?;
        // SAFETY: the files are memory-mapped read-only, as candle's own
        // loaders do; they must not be modified while the model is loading.
        let tensors = unsafe { MappedWeights::open(&files)? };
        let shapes = tensors.shapes();
        // One expected tensor at a time: a config claiming far more layers
        // than the checkpoint holds stops at the first missing name.
        for_each_expected(&config, |name, expected| match shapes.get(&name) {
            None => Err(Error::MissingTensor { name }),
            Some(got) if *got != expected => Err(Error::TensorShape {
                name,
                expected,
                got: got.clone(),
            }),
            Some(_) => Ok(()),
        })?;
        Self::new(
            &config,
            VarBuilder::from_backend(Box::new(tensors), dtype, device.clone()),
        )
    }

    /// Names and shapes of every tensor the model reads, in the reference's
    /// naming (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`,
    /// ..., `model.norm.weight`, and `lm_head.weight` when untied).
    pub fn expected_tensors(config: &Qwen3KsaConfig) -> Result<Vec<(String, Vec<usize>)>> {
        let mut out = Vec::new();
        for_each_expected(config, |name, shape| {
            out.push((name, shape));
            Ok(())
        })?;
        Ok(out)
    }

    /// The model's configuration.
    pub fn config(&self) -> &Qwen3KsaConfig {
        &self.config
    }

    /// The decoder layers, in order.
    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// The expanded layout of `n` text tokens (window 0; each layer applies its own `W`).
    pub fn layout(&self, text_len: usize) -> Result<KsaLayout> {
        KsaLayout::new(self.config.ksa_config()?, text_len)
    }

    /// The `[S, hidden]` summary embeddings (rows `summary_token_begin + j`).
    pub fn summary_embeddings(&self) -> Result<Tensor> {
        Ok(self.embed_tokens.embeddings().narrow(
            0,
            self.config.summary_token_begin,
            self.config.summary_token_num,
        )?)
    }

    /// Embeds text ids `[b, n]` (u8, u32 or i64) and interleaves the summary
    /// embeddings: returns the expanded hidden states `[b, N, hidden]` and their layout.
    /// Every id must be a text token ([`Qwen3KsaConfig::check_text_token`]):
    /// candle's embedding would read an id at the dtype's maximum as
    /// padding (a zero row) and a summary row as text.
    pub fn embed(&self, ids: &Tensor) -> Result<(Tensor, KsaLayout)> {
        let (b, n) = ids.dims2()?;
        let layout = self.layout(n)?;
        self.check_ids(ids)?;
        if n == 0 || b == 0 {
            let h = self.embed_tokens.hidden_size();
            let dtype = self.embed_tokens.embeddings().dtype();
            let zeros = Tensor::zeros((b, layout.len(), h), dtype, ids.device())?;
            return Ok((zeros, layout));
        }
        let text = self.embed_tokens.forward(ids)?;
        let hidden = layout.interleave(&text, &self.summary_embeddings()?)?;
        Ok((hidden, layout))
    }

    /// [`Error::UnsupportedDType`] for ids that are not u8, u32 or i64, and
    /// [`Error::TokenOutOfRange`] for the first id that is not a text token.
    fn check_ids(&self, ids: &Tensor) -> Result<()> {
        if !matches!(ids.dtype(), DType::U8 | DType::U32 | DType::I64) {
            return Err(Error::UnsupportedDType {
                op: "Qwen3Ksa token ids",
                got: ids.dtype(),
                supported: "u8, u32, i64",
            });
        }
        // Ids are a small host copy next to the activations they select.
        let all = ids.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
        all.into_iter()
            .try_for_each(|id| self.config.check_text_token(id))
    }

    /// Embedding rows of `ids: [b, m]` as they are, text ids or summary rows
    /// (`summary_token_begin + j`), without interleaving: `[b, m, hidden]`.
    /// A decode step embeds its new slots with it.
    pub(crate) fn embed_rows(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.embed_tokens.forward(ids)?)
    }

    /// Final norm and LM head on the text slots of `h: [b, N, hidden]`:
    /// logits `[b, n, V']` in text order.
    pub fn logits(&self, h: &Tensor, layout: &KsaLayout) -> Result<Tensor> {
        let text = layout.take_text(h, 1)?;
        if layout.is_empty() {
            let (b, _, _) = text.dims3()?;
            let v = self.config.logits_size();
            return Ok(Tensor::zeros((b, 0, v), text.dtype(), text.device())?);
        }
        self.head(&text)
    }

    /// Final norm and LM head on text hidden states `[b, m, hidden]` (any
    /// selection of text slots, e.g. only the last one when `n x vocab`
    /// logits would not fit): logits `[b, m, V']`.
    pub fn head(&self, text_hidden: &Tensor) -> Result<Tensor> {
        Ok(rms_norm(&self.norm, text_hidden)?.apply(&self.lm_head)?)
    }

    /// Logits `[b, n, V']` for text ids `[b, n]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (mut h, layout) = self.embed(ids)?;
        if h.dim(0)? == 0 {
            // A batch of none: nothing to run (the layers' reshapes cannot
            // infer a dimension from zero elements).
            let dtype = h.dtype();
            let shape = (0, layout.text_len(), self.config.logits_size());
            return Ok(Tensor::zeros(shape, dtype, h.device())?);
        }
        for layer in &self.layers {
            h = layer.forward(&h, &layout)?;
        }
        self.logits(&h, &layout)
    }
}

/// Calls `visit(name, shape)` for every tensor [`Qwen3Ksa::expected_tensors`]
/// lists, in that order, stopping at the first error; nothing is collected.
fn for_each_expected(
    config: &Qwen3KsaConfig,
    mut visit: impl FnMut(String, Vec<usize>) -> Result<()>,
) -> Result<()> {
    // Validation bounds every size and product below (`MAX_DIM`, `MAX_LAYERS`).
    config.validate()?;
    let c = config;
    let (v, h, i) = (c.vocab_size, c.hidden_size, c.intermediate_size);
    let (q, kv) = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    visit("model.embed_tokens.weight".to_string(), vec![v, h])?;
    for layer in 0..c.num_hidden_layers {
        let p = format!("model.layers.{layer}");
        let ksa = c.layer_kinds[layer] == LayerKind::Summary;
        let mut add = |name: &str, shape: Vec<usize>| visit(format!("{p}.{name}.weight"), shape);
        add("input_layernorm", vec![h])?;
        if ksa && c.summary_independent_attention_layernorm {
            add("input_layernorm_summary", vec![h])?;
        }
        add("post_attention_layernorm", vec![h])?;
        add("self_attn.q_proj", vec![q, h])?;
        add("self_attn.k_proj", vec![kv, h])?;
        add("self_attn.v_proj", vec![kv, h])?;
        add("self_attn.o_proj", vec![h, q])?;
        add("self_attn.q_norm", vec![c.head_dim])?;
        add("self_attn.k_norm", vec![c.head_dim])?;
        if ksa && c.uses_summary_projections() {
            add("self_attn.q_proj_summary", vec![q, h])?;
            add("self_attn.k_proj_summary", vec![kv, h])?;
            add("self_attn.v_proj_summary", vec![kv, h])?;
        }
        add("mlp.gate_proj", vec![i, h])?;
        add("mlp.up_proj", vec![i, h])?;
        add("mlp.down_proj", vec![h, i])?;
    }
    visit("model.norm.weight".to_string(), vec![h])?;
    if !c.tie_word_embeddings {
        visit("lm_head.weight".to_string(), vec![v, h])?;
    }
    Ok(())
}

/// Model weights must be floats: candle's integer matmuls and norms would
/// fail (or panic) inside the first forward instead.
fn check_model_dtype(dtype: DType) -> Result<()> {
    if crate::check::is_float(dtype) {
        Ok(())
    } else {
        Err(Error::UnsupportedDType {
            op: "Qwen3Ksa",
            got: dtype,
            supported: "f32, f16, bf16, f64",
        })
    }
}

/// The safetensors files of a model folder: the shards named by
/// `model.safetensors.index.json`, or `model.safetensors`.
pub(crate) fn safetensors_files(folder: &Path) -> Result<Vec<PathBuf>> {
    let index = folder.join("model.safetensors.index.json");
    if !index.exists() {
        let single = folder.join("model.safetensors");
        if !single.exists() {
            return Err(Error::Io {
                path: single,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "neither model.safetensors nor model.safetensors.index.json exists",
                ),
            });
        }
        return Ok(vec![single]);
    }
    let text = std::fs::read_to_string(&index).map_err(|source| Error::Io {
        path: index.clone(),
        source,
    })?;
    let bad = |what: &str| Error::ModelConfig(format!("{}: {what}", index.display()));
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(&format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object"))?;
    let files = map
        .values()
        .map(|f| {
            f.as_str()
                .ok_or_else(|| bad("a `weight_map` value is not a string"))
        })
        .collect::<Result<BTreeSet<_>>>()?;
    files
        .into_iter()
        .map(|f| {
            // Shard names are file names inside the folder, never paths.
            if f.contains('/') || f.contains('\\') || f == ".." {
                return Err(bad(&format!("shard name {f:?} is not a plain file name")));
            }
            let path = folder.join(f);
            if !path.is_file() {
                return Err(Error::Io {
                    path,
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "shard listed in model.safetensors.index.json is missing",
                    ),
                });
            }
            Ok(path)
        })
        .collect()
}
