//! [`SummaryAttention`]: the attention layer of Qwen3-KSA (docs/spec.md section 4),
//! with the reference's parameter names so checkpoints load unchanged.
//!
//! Per slot of the expanded sequence: `q = q_norm(q_proj(x))`,
//! `k = k_norm(k_proj(x))`, `v = v_proj(x)`; summary slots blend in their own
//! projections (`mix*norm(q_proj_summary(x)) + (1-mix)*norm(q_proj(x))`, the
//! same for k, and v unnormed) before RoPE; then NeoX RoPE at the layout's
//! position ids, KSA attention with the layer's window, and `o_proj`.

use crate::layout::KsaLayout;
use crate::model_config::{LayerKind, Qwen3KsaConfig};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, Module, RmsNorm, VarBuilder};

/// Hyper-parameters of one [`SummaryAttention`] layer.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryAttentionConfig {
    /// Width of the input and output hidden states.
    pub hidden_size: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (`num_attention_heads` must be a multiple).
    pub num_key_value_heads: usize,
    /// Per-head width (even).
    pub head_dim: usize,
    /// Epsilon of the per-head `q_norm` / `k_norm`.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// This layer's `W`: chunks of raw text a text token still sees.
    pub window: usize,
    /// Weight of the summary projections in the blend.
    pub mix_coeff: f64,
    /// Whether `q/k/v_proj_summary` are loaded and blended into summary slots
    /// (false: summary slots use the text projections only).
    pub summary_projections: bool,
}

impl SummaryAttentionConfig {
    /// The attention of layer `layer` of a Qwen3-KSA model. Summary
    /// projections are used only with independent parameters and a nonzero
    /// `mix_coeff`; `summary_layer_freq` bypass layers never use them.
    pub fn from_model(config: &Qwen3KsaConfig, layer: usize) -> Self {
        let bypass = config.layer_kinds.get(layer) == Some(&LayerKind::Bypass);
        Self {
            hidden_size: config.hidden_size,
            num_attention_heads: config.num_attention_heads,
            num_key_value_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            rms_norm_eps: config.rms_norm_eps,
            rope_theta: config.rope_theta,
            window: config.windows.get(layer).copied().unwrap_or(0),
            mix_coeff: config.mix_coeff,
            summary_projections: config.uses_summary_projections() && !bypass,
        }
    }
}

/// Loads `vb.prefix + name` with the expected `shape`. A missing tensor is
/// [`Error::MissingTensor`] and a mis-shaped one [`Error::TensorShape`], both
/// naming the full tensor name, whatever the backend's own message says.
/// Backends that create tensors on demand (a `VarMap` for training) just work.
pub(crate) fn load_tensor(vb: &VarBuilder, name: &str, shape: &[usize]) -> Result<Tensor> {
    match vb.get(shape, name) {
        Ok(t) => Ok(t),
        Err(e) => {
            let full = match vb.prefix() {
                p if p.is_empty() => name.to_string(),
                p => format!("{p}.{name}"),
            };
            if !vb.contains_tensor(name) {
                return Err(Error::MissingTensor { name: full });
            }
            match vb.get_unchecked(name) {
                Ok(t) if t.dims() != shape => Err(Error::TensorShape {
                    name: full,
                    expected: shape.to_vec(),
                    got: t.dims().to_vec(),
                }),
                _ => Err(e.into()),
            }
        }
    }
}

/// A bias-free `Linear` whose `[out, in]` weight is `vb.prefix + name.weight`.
pub(crate) fn load_linear(
    vb: &VarBuilder,
    name: &str,
    in_dim: usize,
    out_dim: usize,
) -> Result<Linear> {
    Ok(Linear::new(
        load_tensor(&vb.pp(name), "weight", &[out_dim, in_dim])?,
        None,
    ))
}

/// An RMSNorm whose weight is `vb.prefix + name.weight`.
pub(crate) fn load_rms_norm(vb: &VarBuilder, name: &str, size: usize, eps: f64) -> Result<RmsNorm> {
    Ok(RmsNorm::new(
        load_tensor(&vb.pp(name), "weight", &[size])?,
        eps,
    ))
}

/// RMSNorm as the reference computes it: in f32 (f64 stays f64), cast back
/// to the input dtype, then times the weight. candle-nn's `forward_diff` is
/// exactly that and, unlike its fused kernel, has a backward pass.
pub(crate) fn rms_norm(norm: &RmsNorm, x: &Tensor) -> Result<Tensor> {
    Ok(norm.forward_diff(x)?)
}

/// Rows `slots` (ascending, along dim 1) of `base` replaced by `rows`
/// (`rows.dim(1) == slots.len()`), with differentiable ops (cat + gather).
pub(crate) fn replace_slots(base: &Tensor, rows: &Tensor, slots: &[u32]) -> Result<Tensor> {
    if slots.is_empty() {
        return Ok(base.clone());
    }
    let len = base.dim(1)?;
    let mut idx: Vec<u32> = (0..len as u32).collect();
    for (r, &s) in slots.iter().enumerate() {
        idx[s as usize] = (len + r) as u32;
    }
    let idx = Tensor::from_vec(idx, len, base.device())?;
    Ok(Tensor::cat(&[base, rows], 1)?.index_select(&idx, 1)?)
}

/// NeoX (`rotate_half`) rotary embedding with HF's numerics: inverse
/// frequencies and angles in f32, cos/sin in f32, cast to the model dtype.
#[derive(Debug, Clone)]
struct Rotary {
    inv_freq: Vec<f32>,
}

impl Rotary {
    fn new(head_dim: usize, theta: f64) -> Self {
        let inv_freq = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / (theta as f32).powf(i as f32 / head_dim as f32))
            .collect();
        Self { inv_freq }
    }

    /// `cos, sin` of shape `[len, head_dim / 2]` for `positions`.
    fn cos_sin(
        &self,
        positions: &[u32],
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let angles: Vec<f32> = positions
            .iter()
            .flat_map(|&p| self.inv_freq.iter().map(move |&f| p as f32 * f))
            .collect();
        let (cos, sin): (Vec<f32>, Vec<f32>) = angles.iter().map(|a| (a.cos(), a.sin())).unzip();
        let shape = (positions.len(), half);
        Ok((
            Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        ))
    }

    /// Rotates `x: [b, h, len, d]` (contiguous).
    fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        // candle-nn's fused kernel has no backward pass; the composed form is
        // differentiable and rounds identically (the same two products and one
        // sum per element in the model dtype), so training takes it.
        Ok(if x.track_op() {
            candle_nn::rotary_emb::rope_slow(x, cos, sin)?
        } else {
            candle_nn::rotary_emb::rope(x, cos, sin)?
        })
    }
}

/// The summary-slot projections of a layer (`q/k/v_proj_summary`).
#[derive(Debug, Clone)]
struct SummaryProjections {
    q: Linear,
    k: Linear,
    v: Linear,
}

/// The KSA attention layer of Qwen3-KSA.
///
/// [`SummaryAttention::forward`] takes expanded hidden states `[b, N, hidden]`
/// in slot order with their [`KsaLayout`] and returns `[b, N, hidden]`. For a
/// decode cache, [`SummaryAttention::project`] gives the per-slot q, k (after
/// RoPE: what a cache stores) and v of any run of slots, and
/// [`SummaryAttention::output`] applies `o_proj` to attention outputs.
#[derive(Debug, Clone)]
pub struct SummaryAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    summary: Option<SummaryProjections>,
    rotary: Rotary,
    config: SummaryAttentionConfig,
}

impl SummaryAttention {
    /// Builds the layer from `vb` (the `self_attn` prefix of a decoder layer):
    /// `q_proj`, `k_proj`, `v_proj`, `o_proj`, `q_norm`, `k_norm`, and
    /// `q/k/v_proj_summary` when `config.summary_projections`.
    pub fn new(config: &SummaryAttentionConfig, vb: VarBuilder) -> Result<Self> {
        let c = config;
        if c.num_key_value_heads == 0 || c.num_attention_heads % c.num_key_value_heads != 0 {
            return Err(Error::HeadsNotDivisible {
                q_heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
            });
        }
        if c.head_dim % 2 != 0 {
            return Err(Error::InvalidConfig(format!(
                "head_dim must be even for rotary embeddings, got {}",
                c.head_dim
            )));
        }
        crate::model_config::check_floats(c.rms_norm_eps, c.rope_theta, c.mix_coeff)?;
        let width = |heads: usize| {
            heads
                .checked_mul(c.head_dim)
                .filter(|&w| w <= crate::model_config::MAX_DIM)
                .ok_or(Error::TooLarge {
                    what: "heads * head_dim",
                    got: heads.saturating_mul(c.head_dim),
                    limit: crate::model_config::MAX_DIM,
                })
        };
        let (h, q_out, kv_out) = (
            c.hidden_size,
            width(c.num_attention_heads)?,
            width(c.num_key_value_heads)?,
        );
        let summary = if c.summary_projections {
            Some(SummaryProjections {
                q: load_linear(&vb, "q_proj_summary", h, q_out)?,
                k: load_linear(&vb, "k_proj_summary", h, kv_out)?,
                v: load_linear(&vb, "v_proj_summary", h, kv_out)?,
            })
        } else {
            None
        };
        Ok(Self {
            q_proj: load_linear(&vb, "q_proj", h, q_out)?,
            k_proj: load_linear(&vb, "k_proj", h, kv_out)?,
            v_proj: load_linear(&vb, "v_proj", h, kv_out)?,
            o_proj: load_linear(&vb, "o_proj", q_out, h)?,
            q_norm: load_rms_norm(&vb, "q_norm", c.head_dim, c.rms_norm_eps)?,
            k_norm: load_rms_norm(&vb, "k_norm", c.head_dim, c.rms_norm_eps)?,
            summary,
            rotary: Rotary::new(c.head_dim, c.rope_theta),
            config: config.clone(),
        })
    }

    /// The layer's hyper-parameters.
    pub fn config(&self) -> &SummaryAttentionConfig {
        &self.config
    }

    /// This layer's window `W`.
    pub fn window(&self) -> usize {
        self.config.window
    }

    /// KSA attention over expanded hidden states `x: [b, N, hidden]` in slot
    /// order of `layout` (its window is replaced by this layer's `W`).
    /// Returns `[b, N, hidden]`.
    pub fn forward(&self, x: &Tensor, layout: &KsaLayout) -> Result<Tensor> {
        let (_, n, _) = self.check_input(x)?;
        layout.check_len("x", n)?;
        let (q, k, v) = self.project(x, &layout.position_ids(), &layout.summary_slots())?;
        let out = crate::attention(&q, &k, &v, &layout.with_window(self.config.window))?;
        self.output(&out)
    }

    /// Plain causal attention over `x: [b, n, hidden]` (text only, no
    /// summaries) at RoPE positions `positions`: the attention of a
    /// `summary_layer_freq` bypass layer. Returns `[b, n, hidden]`.
    pub fn forward_causal(&self, x: &Tensor, positions: &[u32]) -> Result<Tensor> {
        let (q, k, v) = self.project(x, positions, &[])?;
        self.output(&crate::causal_attention(&q, &k, &v)?)
    }

    /// Queries, keys and values of a run of slots `x: [b, L, hidden]`:
    /// `positions[i]` is slot `i`'s RoPE position and `summary_slots` lists
    /// (ascending) which of the `L` slots are summaries. Returns
    /// `q: [b, hq, L, d]` and `k: [b, hkv, L, d]` after norm, blend and RoPE,
    /// and `v: [b, hkv, L, d]`, all contiguous: k and v are what a KV cache stores.
    pub fn project(
        &self,
        x: &Tensor,
        positions: &[u32],
        summary_slots: &[u32],
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, l, _) = self.check_input(x)?;
        if positions.len() != l {
            return Err(Error::DimMismatch {
                what: "slots",
                a: "x",
                a_val: l,
                b: "positions",
                b_val: positions.len(),
            });
        }
        if let Some(&s) = summary_slots.iter().find(|&&s| s as usize >= l) {
            return Err(Error::DimMismatch {
                what: "summary slot out of range",
                a: "summary_slots",
                a_val: s as usize,
                b: "x",
                b_val: l,
            });
        }
        let c = &self.config;
        let (hq, hkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let heads = |t: Tensor, h: usize, rows: usize| t.reshape((b, rows, h, d));
        let mut q = rms_norm(&self.q_norm, &heads(self.q_proj.forward(x)?, hq, l)?)?;
        let mut k = rms_norm(&self.k_norm, &heads(self.k_proj.forward(x)?, hkv, l)?)?;
        let mut v = heads(self.v_proj.forward(x)?, hkv, l)?;
        if let (Some(sp), false) = (&self.summary, summary_slots.is_empty()) {
            let ns = summary_slots.len();
            let idx = Tensor::from_slice(summary_slots, ns, x.device())?;
            // index_select needs a contiguous source; a run cut from a longer
            // sequence with `narrow` is not.
            let xs = x.contiguous()?.index_select(&idx, 1)?;
            let qs = rms_norm(&self.q_norm, &heads(sp.q.forward(&xs)?, hq, ns)?)?;
            let ks = rms_norm(&self.k_norm, &heads(sp.k.forward(&xs)?, hkv, ns)?)?;
            let vs = heads(sp.v.forward(&xs)?, hkv, ns)?;
            let mix = c.mix_coeff;
            let blend = |base: &Tensor, own: &Tensor| -> Result<Tensor> {
                let base_s = base.index_select(&idx, 1)?;
                let mixed = ((own * mix)? + (base_s * (1.0 - mix))?)?;
                replace_slots(base, &mixed, summary_slots)
            };
            q = blend(&q, &qs)?;
            k = blend(&k, &ks)?;
            v = blend(&v, &vs)?;
        }
        let (cos, sin) = self.rotary.cos_sin(positions, x.dtype(), x.device())?;
        let q = Rotary::apply(&q.transpose(1, 2)?.contiguous()?, &cos, &sin)?;
        let k = Rotary::apply(&k.transpose(1, 2)?.contiguous()?, &cos, &sin)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        Ok((q, k, v))
    }

    /// `o_proj` of attention outputs `[b, hq, L, d]`; returns `[b, L, hidden]`.
    pub fn output(&self, attn: &Tensor) -> Result<Tensor> {
        let (b, h, l, d) = attn.dims4()?;
        Ok(attn
            .transpose(1, 2)?
            .reshape((b, l, h * d))?
            .apply(&self.o_proj)?)
    }

    fn check_input(&self, x: &Tensor) -> Result<(usize, usize, usize)> {
        let dims = crate::check::dims3(x, "x", "[batch, slots, hidden]")?;
        crate::check::check_eq(
            "hidden size",
            "x",
            dims.2,
            "config",
            self.config.hidden_size,
        )?;
        Ok(dims)
    }
}
