//! The Qwen3-KSA model configuration, read from the reference's HF
//! `config.json` (Qwen3 fields plus the KSA fields of docs/spec.md section 4), and the
//! safe parser of its pattern strings such as `([128]*3+[16768]*1)*9`.
//!
//! The reference evaluates those strings with Python's `eval`; here they go
//! through a small grammar (integers, lists, `*`, `+`, parentheses) and
//! anything else is an [`Error::Pattern`] naming the byte position.

use crate::config::{KsaConfig, SummaryPositions, TextPositions};
use crate::{Error, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// The most integers a pattern may expand to; guards against
/// `[1]*1000000000`-style inputs before anything is allocated.
pub const MAX_PATTERN_ENTRIES: usize = 1 << 16;

/// The deepest nesting of parentheses and brackets a pattern may use (keeps
/// the recursive-descent parser's stack bounded).
const MAX_PATTERN_DEPTH: usize = 64;

/// The most decoder layers a config may declare (real models have under
/// 200); checked before any per-layer list is built.
pub const MAX_LAYERS: usize = 1 << 12;

/// The largest single size a config may give (`vocab_size`, `hidden_size`,
/// `intermediate_size`, head counts, `head_dim`, and the projection widths
/// `num_attention_heads * head_dim`): checked, with the products, before
/// any shape is computed or anything allocated.
pub const MAX_DIM: usize = 1 << 24;

/// The most elements one weight tensor the config implies may have
/// (`vocab_size * hidden_size`, `intermediate_size * hidden_size`, ...), and
/// the most an attention input view may describe when the crate makes it
/// contiguous (a stride-0 broadcast materialised).
pub const MAX_TENSOR_ELEMENTS: usize = 1 << 40;

/// The logits width the reference keeps when `truncate_predict_nums` is absent
/// (Qwen3's text vocabulary, 151936).
pub const DEFAULT_TRUNCATE_PREDICT_NUMS: usize = 151_936;

/// The value of a pattern: one integer or a flat list of integers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatternValue {
    /// A bare integer (for a per-layer field: the same value on every layer).
    Int(u64),
    /// A list of integers (for a per-layer field: one per layer).
    List(Vec<u64>),
}

/// Parses a pattern string: integers, lists `[a, b, ...]`, `*` repetition
/// (list times integer, either order; or integer product), `+` (list
/// concatenation or integer sum) and parentheses, with the usual precedence.
/// Nothing is evaluated; any other input (`2**8`, `[1,`, names, calls,
/// nested lists, negative numbers) is an [`Error::Pattern`] with the byte
/// position of the offending character, and so is a result longer than
/// [`MAX_PATTERN_ENTRIES`].
pub fn parse_pattern(pattern: &str) -> Result<PatternValue> {
    let mut p = PatternParser {
        src: pattern,
        pos: 0,
        depth: 0,
    };
    let value = p.expr()?;
    p.skip_ws();
    if p.pos < pattern.len() {
        return Err(p.unexpected("an operator `+` or `*`, or the end"));
    }
    Ok(value)
}

struct PatternParser<'a> {
    src: &'a str,
    pos: usize,
    depth: usize,
}

impl PatternParser<'_> {
    fn error(&self, position: usize, message: impl Into<String>) -> Error {
        Error::Pattern {
            pattern: self.src.to_string(),
            position,
            message: message.into(),
        }
    }

    fn unexpected(&self, expected: &str) -> Error {
        match self.src[self.pos..].chars().next() {
            Some(c) => self.error(self.pos, format!("unexpected {c:?}, expected {expected}")),
            None => self.error(self.pos, format!("unexpected end, expected {expected}")),
        }
    }

    fn skip_ws(&mut self) {
        let rest = &self.src[self.pos..];
        self.pos += rest.len() - rest.trim_start().len();
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.src.as_bytes().get(self.pos).copied()
    }

    fn expr(&mut self) -> Result<PatternValue> {
        let mut acc = self.term()?;
        while self.peek() == Some(b'+') {
            let at = self.pos;
            self.pos += 1;
            let rhs = self.term()?;
            acc = match (acc, rhs) {
                (PatternValue::Int(a), PatternValue::Int(b)) => PatternValue::Int(
                    a.checked_add(b)
                        .ok_or_else(|| self.error(at, "integer overflow"))?,
                ),
                (PatternValue::List(mut a), PatternValue::List(b)) => {
                    if a.len() + b.len() > MAX_PATTERN_ENTRIES {
                        return Err(self.too_long(at));
                    }
                    a.extend(b);
                    PatternValue::List(a)
                }
                _ => return Err(self.error(at, "`+` needs two lists or two integers")),
            };
        }
        Ok(acc)
    }

    fn term(&mut self) -> Result<PatternValue> {
        let mut acc = self.factor()?;
        while self.peek() == Some(b'*') {
            let at = self.pos;
            self.pos += 1;
            let rhs = self.factor()?;
            acc = match (acc, rhs) {
                (PatternValue::Int(a), PatternValue::Int(b)) => PatternValue::Int(
                    a.checked_mul(b)
                        .ok_or_else(|| self.error(at, "integer overflow"))?,
                ),
                (PatternValue::List(l), PatternValue::Int(n))
                | (PatternValue::Int(n), PatternValue::List(l)) => {
                    let n = usize::try_from(n).map_err(|_| self.too_long(at))?;
                    match l.len().checked_mul(n) {
                        Some(len) if len <= MAX_PATTERN_ENTRIES => PatternValue::List(l.repeat(n)),
                        _ => return Err(self.too_long(at)),
                    }
                }
                _ => return Err(self.error(at, "`*` needs a list and an integer")),
            };
        }
        Ok(acc)
    }

    fn too_long(&self, at: usize) -> Error {
        self.error(
            at,
            format!("the pattern expands to more than {MAX_PATTERN_ENTRIES} entries"),
        )
    }

    fn enter(&mut self) -> Result<()> {
        self.depth += 1;
        if self.depth > MAX_PATTERN_DEPTH {
            return Err(self.error(
                self.pos,
                format!("nested deeper than {MAX_PATTERN_DEPTH} levels"),
            ));
        }
        self.pos += 1;
        Ok(())
    }

    fn factor(&mut self) -> Result<PatternValue> {
        match self.peek() {
            Some(b'0'..=b'9') => {
                let start = self.pos;
                let digits = self.src[start..]
                    .bytes()
                    .take_while(u8::is_ascii_digit)
                    .count();
                self.pos += digits;
                let n = self.src[start..self.pos]
                    .parse::<u64>()
                    .map_err(|_| self.error(start, "integer too large"))?;
                Ok(PatternValue::Int(n))
            }
            Some(b'(') => {
                self.enter()?;
                let v = self.expr()?;
                if self.peek() != Some(b')') {
                    return Err(self.unexpected("`)`"));
                }
                self.pos += 1;
                self.depth -= 1;
                Ok(v)
            }
            Some(b'[') => {
                self.enter()?;
                let mut items = Vec::new();
                loop {
                    if self.peek() == Some(b']') {
                        break;
                    }
                    let at = self.pos;
                    match self.expr()? {
                        PatternValue::Int(n) => items.push(n),
                        PatternValue::List(_) => {
                            return Err(self.error(at, "list elements must be integers"))
                        }
                    }
                    if items.len() > MAX_PATTERN_ENTRIES {
                        return Err(self.too_long(at));
                    }
                    match self.peek() {
                        Some(b',') => self.pos += 1,
                        Some(b']') => break,
                        _ => return Err(self.unexpected("`,` or `]`")),
                    }
                }
                self.pos += 1;
                self.depth -= 1;
                Ok(PatternValue::List(items))
            }
            _ => Err(self.unexpected("an integer, `[` or `(`")),
        }
    }
}

/// Whether a decoder layer uses summary attention or is a bypass layer
/// (`summary_layer_freq`): plain causal attention over text, summary slots
/// passing the layer unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerKind {
    /// KSA attention with the layer's window; every slot goes through the MLP.
    Summary,
    /// Plain causal attention over text; summary slots skip attention and MLP.
    Bypass,
}

/// Hyper-parameters of a Qwen3-KSA model, as read from `config.json`.
///
/// Fields are public so a model can be described in code (examples, tests);
/// [`Qwen3KsaConfig::validate`] (run by every constructor of the model)
/// checks that they are consistent.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen3KsaConfig {
    /// Rows of `embed_tokens` (and of an untied `lm_head`), summary rows included.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA).
    pub num_key_value_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Whether the LM head reuses `embed_tokens`.
    pub tie_word_embeddings: bool,
    /// Logits keep the first this many vocabulary entries (0: all).
    pub truncate_predict_nums: usize,
    /// `C`: text tokens per chunk.
    pub summary_chunk_size: usize,
    /// `S`: summary tokens after each complete chunk.
    pub summary_token_num: usize,
    /// Embedding row of summary 0 (summary `j` uses row `summary_token_begin + j`).
    pub summary_token_begin: usize,
    /// `W` of every layer (`summary_sliding_chunk_num`, expanded).
    pub windows: Vec<usize>,
    /// Kind of every layer (`summary_layer_freq`, expanded; all
    /// [`LayerKind::Summary`] when the field is absent).
    pub layer_kinds: Vec<LayerKind>,
    /// `summary_chunk_position_ids_type`.
    pub text_positions: TextPositions,
    /// `summary_token_position_ids_type`.
    pub summary_positions: SummaryPositions,
    /// Whether summary slots have their own `q/k/v_proj_summary`.
    pub summary_independent_parameters: bool,
    /// Whether summary slots have their own pre-attention `input_layernorm_summary`.
    pub summary_independent_attention_layernorm: bool,
    /// Weight of the summary projections in the blend (0: unused).
    pub mix_coeff: f64,
    /// Whether text reads old chunks' summaries: always `true` when parsed
    /// (not a `config.json` field). `false` is the
    /// [`KsaConfig::with_summary_reads`] ablation (pure sliding-chunk
    /// attention over text), for measuring what summaries add in training.
    pub summary_reads: bool,
}

impl Qwen3KsaConfig {
    /// Reads and parses `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text)
    }

    /// Parses the text of a `config.json`. Every KSA field except
    /// `summary_layer_freq` must be present (the reference's code defaults
    /// differ from its shipped configs, so nothing is guessed); Qwen3 fields
    /// with a well-known HF default (`rms_norm_eps` 1e-6,
    /// `tie_word_embeddings` false) may be absent, and `truncate_predict_nums`
    /// defaults to the reference's 151936.
    pub fn from_json_str(json: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(json)
            .map_err(|e| Error::ModelConfig(format!("config.json is not valid JSON: {e}")))?;
        let Value::Object(m) = value else {
            return Err(Error::ModelConfig(
                "config.json is not a JSON object".into(),
            ));
        };
        let f = Fields(&m);
        f.reject_unsupported()?;
        let num_hidden_layers = f.usize("num_hidden_layers")?;
        // Bounded before the per-layer lists below are built from it.
        bound("num_hidden_layers", num_hidden_layers, MAX_LAYERS)?;
        let windows = match f.required("summary_sliding_chunk_num")? {
            Value::String(s) => parse_pattern(s)?,
            v => json_pattern("summary_sliding_chunk_num", v)?,
        };
        let windows = per_layer("summary_sliding_chunk_num", windows, num_hidden_layers)?;
        let layer_kinds = f.layer_kinds(num_hidden_layers)?;
        let config = Self {
            vocab_size: f.usize("vocab_size")?,
            hidden_size: f.usize("hidden_size")?,
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads: f.usize("num_attention_heads")?,
            num_key_value_heads: f.usize("num_key_value_heads")?,
            head_dim: f.usize("head_dim")?,
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: f.f64("rope_theta")?,
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            truncate_predict_nums: match f.0.get("truncate_predict_nums") {
                None | Some(Value::Null) => DEFAULT_TRUNCATE_PREDICT_NUMS,
                // The reference truncates only when the value is positive.
                Some(v) => v.as_i64().map(|t| t.max(0) as usize).ok_or_else(|| {
                    Error::ModelConfig(format!(
                        "`truncate_predict_nums` must be an integer, got {v}"
                    ))
                })?,
            },
            summary_chunk_size: f.usize("summary_chunk_size")?,
            summary_token_num: f.usize("summary_token_num")?,
            summary_token_begin: f.usize("summary_token_begin")?,
            windows,
            layer_kinds,
            text_positions: f.str("summary_chunk_position_ids_type")?.parse()?,
            summary_positions: f.str("summary_token_position_ids_type")?.parse()?,
            summary_independent_parameters: f.bool("summary_independent_parameters")?,
            summary_independent_attention_layernorm: f
                .bool("summary_independent_attention_layernorm")?,
            mix_coeff: f.f64("mix_coeff")?,
            summary_reads: true,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks that the fields are consistent: positive sizes within their
    /// documented maxima (products included), heads divisible (GQA), one
    /// window and one kind per layer, summary rows inside the embedding
    /// table, the float fields in their domains (`rms_norm_eps` finite and
    /// positive, `rope_theta` finite and `>= 1`, `mix_coeff` in `[0, 1]`), a valid
    /// KSA config.
    pub fn validate(&self) -> Result<()> {
        self.check_sizes()?;
        for (name, v) in self.dims() {
            if v == 0 {
                return Err(Error::ModelConfig(format!("`{name}` must be positive")));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(Error::HeadsNotDivisible {
                q_heads: self.num_attention_heads,
                kv_heads: self.num_key_value_heads,
            });
        }
        if self.head_dim % 2 != 0 {
            return Err(Error::ModelConfig(format!(
                "`head_dim` must be even for rotary embeddings, got {}",
                self.head_dim
            )));
        }
        for (name, len) in [
            ("summary_sliding_chunk_num", self.windows.len()),
            ("summary_layer_freq", self.layer_kinds.len()),
        ] {
            if len != self.num_hidden_layers {
                return Err(Error::ModelConfig(format!(
                    "`{name}` gives {len} layers, but `num_hidden_layers` is {}",
                    self.num_hidden_layers
                )));
            }
        }
        self.ksa_config()?;
        if self
            .summary_token_begin
            .checked_add(self.summary_token_num)
            .is_none_or(|end| end > self.vocab_size)
        {
            return Err(Error::ModelConfig(format!(
                "summary rows {}..{}+{} lie outside the embedding table of {} rows (`vocab_size`)",
                self.summary_token_begin,
                self.summary_token_begin,
                self.summary_token_num,
                self.vocab_size
            )));
        }
        check_floats(self.rms_norm_eps, self.rope_theta, self.mix_coeff)
    }

    /// The per-layer sizes and the vocabulary, by their `config.json` names.
    fn dims(&self) -> [(&'static str, usize); 6] {
        [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ]
    }

    /// Every size within its documented maximum ([`MAX_LAYERS`], [`MAX_DIM`],
    /// [`MAX_TENSOR_ELEMENTS`]), products computed with checked arithmetic,
    /// so nothing later computes a shape that overflows or allocates for it.
    fn check_sizes(&self) -> Result<()> {
        bound("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS)?;
        for (name, v) in self.dims() {
            bound(name, v, MAX_DIM)?;
        }
        let width = |heads: usize| heads.saturating_mul(self.head_dim);
        let (q, kv) = (
            width(self.num_attention_heads),
            width(self.num_key_value_heads),
        );
        bound("num_attention_heads * head_dim", q, MAX_DIM)?;
        bound("num_key_value_heads * head_dim", kv, MAX_DIM)?;
        let h = self.hidden_size;
        for (name, rows) in [
            ("vocab_size * hidden_size", self.vocab_size),
            ("intermediate_size * hidden_size", self.intermediate_size),
            ("num_attention_heads * head_dim * hidden_size", q),
        ] {
            bound(name, rows.saturating_mul(h), MAX_TENSOR_ELEMENTS)?;
        }
        Ok(())
    }

    /// The KSA config shared by all layers (`C`, `S`, position schemes, the
    /// summary-reads ablation), with window 0; each layer applies its own `W`
    /// with [`crate::KsaLayout::with_window`].
    pub fn ksa_config(&self) -> Result<KsaConfig> {
        Ok(
            KsaConfig::new(self.summary_chunk_size, self.summary_token_num, 0)?
                .with_text_positions(self.text_positions)
                .with_summary_positions(self.summary_positions)
                .with_summary_reads(self.summary_reads),
        )
    }

    /// Whether the checkpoint holds `q/k/v_proj_summary`: only with
    /// independent parameters, and they may be absent when `mix_coeff = 0`.
    pub fn uses_summary_projections(&self) -> bool {
        self.summary_independent_parameters && self.mix_coeff != 0.0
    }

    /// The embedding rows of the summary tokens, `summary_token_begin..+S`.
    pub fn summary_rows(&self) -> std::ops::Range<usize> {
        self.summary_token_begin..self.summary_token_begin + self.summary_token_num
    }

    /// [`Error::TokenOutOfRange`] unless `token` is a text id: in
    /// `0..vocab_size` and not a summary row. The one id check of every
    /// entry point (forward, embed, cache steps, generation).
    pub fn check_text_token(&self, token: i64) -> Result<()> {
        let rows = self.summary_rows();
        match usize::try_from(token) {
            Ok(t) if t < self.vocab_size && !rows.contains(&t) => Ok(()),
            _ => Err(Error::TokenOutOfRange {
                token,
                vocab: self.vocab_size,
                summary_rows: rows,
            }),
        }
    }

    /// Width of the logits the model returns: `truncate_predict_nums` when
    /// set and smaller than the vocabulary, else `vocab_size`.
    pub fn logits_size(&self) -> usize {
        match self.truncate_predict_nums {
            0 => self.vocab_size,
            t => t.min(self.vocab_size),
        }
    }
}

/// Typed access to the fields of a `config.json` object, with errors naming the field.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn required(&self, name: &str) -> Result<&Value> {
        match self.0.get(name) {
            None | Some(Value::Null) => Err(Error::ModelConfig(format!(
                "missing field `{name}` (it has no default)"
            ))),
            Some(v) => Ok(v),
        }
    }

    fn usize(&self, name: &str) -> Result<usize> {
        let v = self.required(name)?;
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                Error::ModelConfig(format!("`{name}` must be a non-negative integer, got {v}"))
            })
    }

    fn f64(&self, name: &str) -> Result<f64> {
        let v = self.required(name)?;
        v.as_f64()
            .ok_or_else(|| Error::ModelConfig(format!("`{name}` must be a number, got {v}")))
    }

    fn opt_f64(&self, name: &str) -> Result<Option<f64>> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.f64(name).map(Some),
        }
    }

    fn bool(&self, name: &str) -> Result<bool> {
        let v = self.required(name)?;
        v.as_bool()
            .ok_or_else(|| Error::ModelConfig(format!("`{name}` must be true or false, got {v}")))
    }

    fn opt_bool(&self, name: &str) -> Result<Option<bool>> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.bool(name).map(Some),
        }
    }

    fn str(&self, name: &str) -> Result<&str> {
        let v = self.required(name)?;
        v.as_str()
            .ok_or_else(|| Error::ModelConfig(format!("`{name}` must be a string, got {v}")))
    }

    /// Rejects Qwen3 options this model does not implement, instead of
    /// silently computing something else.
    fn reject_unsupported(&self) -> Result<()> {
        let m = self.0;
        if m.get("attention_bias").and_then(Value::as_bool) == Some(true) {
            return Err(Error::ModelConfig(
                "`attention_bias = true` is not supported (Qwen3-KSA has no projection bias)"
                    .into(),
            ));
        }
        if let Some(act) = m.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(Error::ModelConfig(format!(
                    "`hidden_act = {act:?}` is not supported (Qwen3 uses \"silu\")"
                )));
            }
        }
        if m.get("rope_scaling").is_some_and(|v| !v.is_null()) {
            return Err(Error::ModelConfig(
                "`rope_scaling` is not supported (the reference's KSA models use plain RoPE)"
                    .into(),
            ));
        }
        if m.get("use_summary_attention").and_then(Value::as_bool) == Some(false) {
            return Err(Error::ModelConfig(
                "`use_summary_attention = false`: not a KSA model (load it as plain Qwen3)".into(),
            ));
        }
        Ok(())
    }

    /// `summary_layer_freq`: absent or falsy (null, 0, false, empty) means
    /// every layer is KSA, as in the reference; an int `N` makes layer `i` KSA
    /// iff `i % N == 0`; a list or pattern holds 1 (KSA) or 0 (bypass) per layer.
    fn layer_kinds(&self, layers: usize) -> Result<Vec<LayerKind>> {
        const NAME: &str = "summary_layer_freq";
        let value = match self.0.get(NAME) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => None,
            Some(Value::String(s)) if s.trim().is_empty() => None,
            Some(Value::String(s)) => Some(parse_pattern(s)?),
            Some(v) => Some(json_pattern(NAME, v)?),
        };
        Ok(match value {
            None | Some(PatternValue::Int(0)) => vec![LayerKind::Summary; layers],
            Some(PatternValue::List(l)) if l.is_empty() => vec![LayerKind::Summary; layers],
            Some(PatternValue::Int(n)) => (0..layers)
                .map(|i| {
                    if i as u64 % n == 0 {
                        LayerKind::Summary
                    } else {
                        LayerKind::Bypass
                    }
                })
                .collect(),
            Some(PatternValue::List(l)) => {
                check_layers(NAME, l.len(), layers)?;
                l.into_iter()
                    .map(|x| match x {
                        1 => Ok(LayerKind::Summary),
                        0 => Ok(LayerKind::Bypass),
                        x => Err(Error::ModelConfig(format!(
                            "`{NAME}` entries must be 0 or 1, got {x}"
                        ))),
                    })
                    .collect::<Result<_>>()?
            }
        })
    }
}

/// [`Error::TooLarge`] when `got > limit`.
fn bound(what: &'static str, got: usize, limit: usize) -> Result<()> {
    if got > limit {
        return Err(Error::TooLarge { what, got, limit });
    }
    Ok(())
}

/// The domains of the float fields, shared by the model config and
/// [`crate::SummaryAttentionConfig`]: a value outside them gives NaN or
/// infinite activations, never a usable model. `rope_theta` below 1 would
/// make the rotary frequencies grow past `1 / rope_theta` instead of falling
/// from 1, overflowing f32 for small bases; no model uses such a base.
pub(crate) fn check_floats(rms_norm_eps: f64, rope_theta: f64, mix_coeff: f64) -> Result<()> {
    // 0 would make a zero hidden state 0 / 0 = NaN.
    if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
        return Err(Error::ModelConfig(format!(
            "`rms_norm_eps` must be finite and positive, got {rms_norm_eps}"
        )));
    }
    if !(rope_theta.is_finite() && rope_theta >= 1.0) {
        return Err(Error::ModelConfig(format!(
            "`rope_theta` must be finite and at least 1, got {rope_theta}"
        )));
    }
    // A blend weight: `mix * summary + (1 - mix) * text` stays a convex
    // combination (a huge weight overflows the activations).
    if !(0.0..=1.0).contains(&mix_coeff) {
        return Err(Error::ModelConfig(format!(
            "`mix_coeff` must be in [0, 1], got {mix_coeff}"
        )));
    }
    Ok(())
}

fn check_layers(name: &str, got: usize, layers: usize) -> Result<()> {
    if got == layers {
        Ok(())
    } else {
        Err(Error::ModelConfig(format!(
            "`{name}` gives {got} layers, but `num_hidden_layers` is {layers}"
        )))
    }
}

/// An int or a list of ints given as JSON (not as a pattern string).
fn json_pattern(name: &str, v: &Value) -> Result<PatternValue> {
    let bad = || {
        Error::ModelConfig(format!(
            "`{name}` must be a non-negative integer, a list of them or a pattern string, got {v}"
        ))
    };
    match v {
        Value::Number(n) => n.as_u64().map(PatternValue::Int).ok_or_else(bad),
        Value::Array(items) => items
            .iter()
            .map(|x| x.as_u64().ok_or_else(bad))
            .collect::<Result<_>>()
            .map(PatternValue::List),
        _ => Err(bad()),
    }
}

/// Expands a per-layer field: an int applies to every layer, a list must
/// have exactly one entry per layer.
fn per_layer(name: &str, value: PatternValue, layers: usize) -> Result<Vec<usize>> {
    let to_usize = |x: u64| {
        usize::try_from(x)
            .map_err(|_| Error::ModelConfig(format!("`{name}` value {x} is too large")))
    };
    match value {
        PatternValue::Int(x) => Ok(vec![to_usize(x)?; layers]),
        PatternValue::List(l) => {
            check_layers(name, l.len(), layers)?;
            l.into_iter().map(to_usize).collect()
        }
    }
}
