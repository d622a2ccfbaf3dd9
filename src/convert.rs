//! Qwen3 to Qwen3-KSA: [`qwen3_to_ksa`] turns a Qwen3 checkpoint folder (the
//! layout candle-transformers' `qwen3` loads: `config.json`, safetensors,
//! tokenizer) into a KSA checkpoint folder that [`Qwen3Ksa::from_folder`]
//! loads.
//!
//! What it adds, and why each initial value:
//!
//! * `S` summary rows appended to `embed_tokens` (ids `V .. V+S`, `V` the
//!   source vocabulary), each the mean of the embeddings of the tokens the
//!   tokenizer can produce: an input of typical direction and scale for the
//!   first RMSNorm that stands for no token in particular. Summaries of one
//!   chunk start equal and differ by their position ids; training moves them.
//!   `truncate_predict_nums = V` keeps the summary rows out of the logits,
//!   and an untied `lm_head` gets `S` zero rows (never read).
//! * With independent parameters, `q/k/v_proj_summary` are copies of the
//!   layer's `q/k/v_proj` (and `input_layernorm_summary` a copy of
//!   `input_layernorm`): the blend `mix*summary + (1-mix)*text` then equals
//!   the text projection for any `mix_coeff`, so the converted model starts
//!   exactly as the shared-parameter model and fine-tuning is what makes the
//!   summary path differ, instead of starting from noise that would scramble
//!   every summary key the text reads.
//! * The KSA config fields (`C`, `S`, the per-layer windows, position
//!   schemes, `mix_coeff`, `summary_token_begin`, `truncate_predict_nums`).
//!
//! Where every layer's window covers the whole context no text token reads
//! a summary, and the converted model's logits equal the source model's.
//! With smaller windows it is a KSA model to fine-tune (text beyond the
//! window is seen only through summaries, which start untrained).
//!
//! Memory: one source shard at a time is read (memory-mapped) and its output
//! written, so the peak is about one shard plus the copies derived from it.

use crate::config::{SummaryPositions, TextPositions};
use crate::model::{safetensors_files, Qwen3Ksa};
use crate::model_config::Qwen3KsaConfig;
use crate::text::{TextTokenizer, TOKENIZER_FILES};
use crate::{Error, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The window `W` (in chunks) of every layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Windows {
    /// The same `W` on every layer.
    Uniform(usize),
    /// `window` on every layer except every `whole_every`-th (layers
    /// `whole_every - 1`, `2*whole_every - 1`, ...), whose window covers
    /// the source's `max_position_embeddings`: KSA-4B-base's
    /// `([128]*3+[16768]*1)*9` is `Hybrid { window: 128, whole_every: 4 }`.
    Hybrid {
        /// `W` of the small-window layers.
        window: usize,
        /// Period of the whole-context layers (> 0).
        whole_every: usize,
    },
    /// A `summary_sliding_chunk_num` value as the reference writes it: a
    /// pattern string such as `([128]*3+[16768]*1)*9`, written verbatim.
    Pattern(String),
}

/// Options of [`qwen3_to_ksa`].
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertOptions {
    /// `C`: text tokens per chunk.
    pub chunk_size: usize,
    /// `S`: summary tokens per chunk.
    pub summary_tokens: usize,
    /// Per-layer windows.
    pub windows: Windows,
    /// `summary_chunk_position_ids_type`.
    pub text_positions: TextPositions,
    /// `summary_token_position_ids_type`.
    pub summary_positions: SummaryPositions,
    /// `summary_independent_parameters`: add `q/k/v_proj_summary`.
    pub independent_parameters: bool,
    /// `summary_independent_attention_layernorm`: add `input_layernorm_summary`.
    pub independent_layernorm: bool,
    /// `mix_coeff`: weight of the summary projections in the blend.
    pub mix_coeff: f64,
}

impl Default for ConvertOptions {
    /// The shipped KSA-4B-base choices where they are published (C = 8,
    /// S = 1, W = 128 with a whole-context layer every 4th, original text
    /// positions, summaries at the chunk's last position); `mix_coeff`
    /// (unpublished) 0.5 with independent projections, so fine-tuning can
    /// move the summary path apart from the text path.
    fn default() -> Self {
        Self {
            chunk_size: 8,
            summary_tokens: 1,
            windows: Windows::Hybrid {
                window: 128,
                whole_every: 4,
            },
            text_positions: TextPositions::Origin,
            summary_positions: SummaryPositions::LastChunkSliceRight,
            independent_parameters: true,
            independent_layernorm: false,
            mix_coeff: 0.5,
        }
    }
}

fn not_qwen3(src: &Path, why: impl std::fmt::Display) -> Error {
    Error::Convert(format!(
        "{} is not a Qwen3 checkpoint: {why}",
        src.display()
    ))
}

/// The KSA `config.json` for source config `src` (a JSON object) and `options`.
fn ksa_config_json(
    src: &Path,
    source: &Map<String, Value>,
    options: &ConvertOptions,
) -> Result<(Value, Qwen3KsaConfig)> {
    let model_type = source.get("model_type").and_then(Value::as_str);
    let qwen3_arch = source
        .get("architectures")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|x| x.as_str() == Some("Qwen3ForCausalLM")));
    if model_type != Some("qwen3") && !qwen3_arch {
        return Err(not_qwen3(
            src,
            format!("`model_type` is {model_type:?} and `architectures` has no Qwen3ForCausalLM"),
        ));
    }
    if source.contains_key("summary_chunk_size") {
        return Err(Error::Convert(format!(
            "{} is already a KSA checkpoint (`summary_chunk_size` is set)",
            src.display()
        )));
    }
    let field = |name: &str| {
        source
            .get(name)
            .and_then(Value::as_u64)
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| not_qwen3(src, format!("`{name}` is missing or not an integer")))
    };
    let vocab = field("vocab_size")?;
    let layers = field("num_hidden_layers")?;
    let c = options.chunk_size.max(1);
    let windows = match &options.windows {
        Windows::Uniform(w) => json!(w),
        Windows::Hybrid {
            window,
            whole_every,
        } => {
            if *whole_every == 0 {
                return Err(Error::Convert("`whole_every` must be positive".into()));
            }
            let whole = field("max_position_embeddings")?.div_ceil(c).max(*window);
            json!((0..layers)
                .map(|l| if l % whole_every == whole_every - 1 {
                    whole
                } else {
                    *window
                })
                .collect::<Vec<_>>())
        }
        Windows::Pattern(p) => json!(p),
    };
    let total = vocab
        .checked_add(options.summary_tokens)
        .ok_or_else(|| Error::Convert("`vocab_size` plus the summary rows overflows".into()))?;
    let mut out = source.clone();
    for (k, v) in [
        ("vocab_size", json!(total)),
        ("truncate_predict_nums", json!(vocab)),
        ("summary_token_begin", json!(vocab)),
        ("summary_chunk_size", json!(options.chunk_size)),
        ("summary_token_num", json!(options.summary_tokens)),
        ("summary_sliding_chunk_num", windows),
        (
            "summary_chunk_position_ids_type",
            json!(options.text_positions.to_string()),
        ),
        (
            "summary_token_position_ids_type",
            json!(options.summary_positions.to_string()),
        ),
        (
            "summary_independent_parameters",
            json!(options.independent_parameters),
        ),
        (
            "summary_independent_attention_layernorm",
            json!(options.independent_layernorm),
        ),
        ("mix_coeff", json!(options.mix_coeff)),
        ("use_summary_attention", json!(true)),
    ] {
        out.insert(k.to_string(), v);
    }
    let out = Value::Object(out);
    let config = Qwen3KsaConfig::from_json_str(&out.to_string())?;
    Ok((out, config))
}

/// What a target tensor is made of.
enum Source {
    /// The source tensor of the same name, unchanged.
    Copy,
    /// The embedding table (or untied head) with rows appended.
    Extended,
    /// A copy of another source tensor (a summary projection or norm).
    CopyOf(String),
}

/// Every target tensor with its origin, and the source names and shapes required.
/// Tensor names with their shapes.
type Shapes = HashMap<String, Vec<usize>>;

fn plan(config: &Qwen3KsaConfig) -> Result<(Vec<(String, Source)>, Shapes)> {
    let text_vocab = config.summary_token_begin;
    let mut targets = Vec::new();
    let mut required = HashMap::new();
    for (name, mut shape) in Qwen3Ksa::expected_tensors(config)? {
        let derived = ["q_proj", "k_proj", "v_proj"]
            .iter()
            .map(|p| {
                (
                    format!("self_attn.{p}_summary.weight"),
                    format!("self_attn.{p}.weight"),
                )
            })
            .chain([(
                "input_layernorm_summary.weight".to_string(),
                "input_layernorm.weight".to_string(),
            )])
            .find_map(|(suffix, from)| {
                name.strip_suffix(&suffix)
                    .map(|prefix| format!("{prefix}{from}"))
            });
        let source = if let Some(from) = derived {
            Source::CopyOf(from)
        } else if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
            shape[0] = text_vocab;
            required.insert(name.clone(), shape);
            Source::Extended
        } else {
            required.insert(name.clone(), shape);
            Source::Copy
        };
        targets.push((name, source));
    }
    Ok((targets, required))
}

/// Converts the Qwen3 checkpoint folder `src` into a KSA checkpoint folder
/// `dst` (which must not exist yet, or be empty): `config.json` with the KSA
/// fields, the weights (single file or the source's shards, with an index),
/// and the tokenizer files. See the [module docs](self) for the
/// initialisation. Returns the KSA config written.
///
/// Errors: a source that is not a Qwen3 checkpoint or lacks a tensor
/// ([`Error::Convert`], [`Error::MissingTensor`], [`Error::TensorShape`]),
/// a missing or malformed `tokenizer.json` ([`Error::Tokenizer`]), options
/// that make an invalid KSA config. On error `dst` is left as it was: the
/// output is written to a sibling folder and renamed at the end.
pub fn qwen3_to_ksa(
    src: impl AsRef<Path>,
    dst: impl AsRef<Path>,
    options: &ConvertOptions,
) -> Result<Qwen3KsaConfig> {
    let (src, dst) = (src.as_ref(), dst.as_ref());
    let config_path = src.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| not_qwen3(src, format!("cannot read config.json: {e}")))?;
    let source: Value = serde_json::from_str(&text)
        .map_err(|e| not_qwen3(src, format!("config.json is not valid JSON: {e}")))?;
    let Value::Object(source) = source else {
        return Err(not_qwen3(src, "config.json is not a JSON object"));
    };
    let (config_json, config) = ksa_config_json(src, &source, options)?;
    let tokenizer = TextTokenizer::from_folder(src)?;
    let tokens = tokenizer.inner().get_vocab_size(true);
    if tokens > config.summary_token_begin {
        return Err(Error::Convert(format!(
            "the tokenizer has {tokens} tokens but the model only {} embedding rows",
            config.summary_token_begin
        )));
    }
    let files = safetensors_files(src)?;
    // SAFETY: read-only maps of the source files, which must not change
    // during the conversion (as for any candle loader).
    let all = unsafe { MmapedSafetensors::multi(&files)? };
    let shapes: HashMap<String, Vec<usize>> = all
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect();
    let (targets, required) = plan(&config)?;
    for (name, expected) in &required {
        match shapes.get(name) {
            None => return Err(Error::MissingTensor { name: name.clone() }),
            Some(got) if got != expected => {
                return Err(Error::TensorShape {
                    name: name.clone(),
                    expected: expected.clone(),
                    got: got.clone(),
                })
            }
            Some(_) => {}
        }
    }
    drop(all);

    if std::fs::read_dir(dst).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(Error::Convert(format!(
            "{} exists and is not empty",
            dst.display()
        )));
    }
    let name = dst
        .file_name()
        .ok_or_else(|| Error::Convert(format!("{} names no folder", dst.display())))?;
    let staging = dst.with_file_name(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    let written = write_folder(
        &staging,
        src,
        &files,
        &targets,
        &config,
        &config_json,
        tokens,
    )
    .and_then(|()| {
        // An empty `dst` is replaced; rename cannot replace a directory.
        if dst.exists() {
            std::fs::remove_dir(dst).map_err(io(dst))?;
        }
        std::fs::rename(&staging, dst).map_err(io(dst))
    });
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    written.map(|()| config)
}

/// Writes the converted checkpoint into `out`: one output file per source
/// shard (derived tensors beside the tensor they copy), the index when the
/// source is sharded, `config.json`, the tokenizer files.
fn write_folder(
    out: &Path,
    src: &Path,
    files: &[PathBuf],
    targets: &[(String, Source)],
    config: &Qwen3KsaConfig,
    config_json: &Value,
    tokens: usize,
) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let mut weight_map = BTreeMap::new();
    for file in files {
        // SAFETY: as above, a read-only map of an unchanging source file.
        let shard = unsafe { MmapedSafetensors::new(file)? };
        let held: std::collections::HashSet<String> =
            shard.tensors().into_iter().map(|(n, _)| n).collect();
        let mut tensors = HashMap::new();
        for (name, source) in targets {
            let origin = match source {
                Source::CopyOf(from) => from,
                _ => name,
            };
            if !held.contains(origin) {
                continue;
            }
            let t = shard.load(origin, &Device::Cpu)?;
            let t = match source {
                Source::Extended => extend_rows(&t, name, config, tokens)?,
                _ => t,
            };
            tensors.insert(name.clone(), t);
        }
        let file_name = file
            .file_name()
            .expect("safetensors_files returns file paths")
            .to_string_lossy()
            .into_owned();
        for name in tensors.keys() {
            weight_map.insert(name.clone(), file_name.clone());
        }
        if !tensors.is_empty() {
            candle_core::safetensors::save(&tensors, out.join(&file_name))?;
        }
    }
    if files.len() > 1 || src.join("model.safetensors.index.json").exists() {
        let index = json!({ "metadata": {}, "weight_map": weight_map });
        let path = out.join("model.safetensors.index.json");
        std::fs::write(&path, serde_json::to_string_pretty(&index).expect("JSON"))
            .map_err(io(&path))?;
    }
    let path = out.join("config.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(config_json).expect("JSON"),
    )
    .map_err(io(&path))?;
    for name in TOKENIZER_FILES {
        let from = src.join(name);
        if from.is_file() {
            std::fs::copy(&from, out.join(name)).map_err(io(&from))?;
        }
    }
    Ok(())
}

/// The embedding table (or untied head) `t: [V, h]` with the `S` summary
/// rows appended: for the embeddings the mean of the rows the tokenizer can
/// produce (`tokens`), for the head zeros. Computed in f32, stored in `t`'s dtype.
fn extend_rows(t: &Tensor, name: &str, config: &Qwen3KsaConfig, tokens: usize) -> Result<Tensor> {
    let s = config.summary_token_num;
    let h = config.hidden_size;
    let rows = if name == "lm_head.weight" {
        Tensor::zeros((s, h), t.dtype(), t.device())?
    } else {
        let mean = t
            .narrow(0, 0, tokens.max(1).min(t.dim(0)?))?
            .to_dtype(DType::F32)?
            .mean_keepdim(0)?;
        mean.repeat((s, 1))?.to_dtype(t.dtype())?
    };
    Ok(Tensor::cat(&[t, &rows], 0)?)
}
