//! Model folders from the Hugging Face Hub (cargo feature `hub`):
//! [`fetch_model`] downloads a model id's config, tokenizer and safetensors
//! into the local Hugging Face cache (or finds them there) and returns the
//! folder, which [`crate::Qwen3Ksa::from_folder`] and
//! [`crate::text::TextTokenizer::from_folder`] read like any other.

use crate::text::TOKENIZER_FILES;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Where and how [`fetch_model`] looks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubOptions {
    /// The Hub's address (`None`: `huggingface.co`).
    pub endpoint: Option<String>,
    /// The cache folder (`None`: `$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
    pub cache_dir: Option<PathBuf>,
    /// Never contact the Hub: use only what the cache holds.
    pub offline: bool,
    /// A branch, tag or commit (`None`: `main`).
    pub revision: Option<String>,
}

impl HubOptions {
    /// The options the Hugging Face tools read from the environment:
    /// `HF_ENDPOINT`, `HF_HUB_CACHE` (else `HF_HOME`/hub) and
    /// `HF_HUB_OFFLINE` (`1`, `true`, `yes` or `on`).
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self {
            endpoint: var("HF_ENDPOINT"),
            cache_dir: var("HF_HUB_CACHE")
                .map(PathBuf::from)
                .or_else(|| var("HF_HOME").map(|h| Path::new(&h).join("hub"))),
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| {
                matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
            }),
            revision: None,
        }
    }
}

fn hub_error(model_id: &str, reason: impl Into<String>) -> Error {
    Error::Hub {
        model_id: model_id.to_string(),
        reason: reason.into(),
    }
}

/// The safetensors files named by an index's `weight_map`.
fn shards(index: &Path, model_id: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|source| Error::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| hub_error(model_id, format!("model.safetensors.index.json: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| hub_error(model_id, "model.safetensors.index.json has no weight_map"))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// Gets one file of the model folder (from the cache or the Hub), or says why not.
type Getter<'a> = dyn FnMut(&str) -> std::result::Result<PathBuf, String> + 'a;

/// The model folder of `model_id` (`config.json`, `tokenizer.json`, the
/// other tokenizer files the repository has, `model.safetensors` or the
/// index and its shards), downloaded into the cache unless already there.
///
/// Offline (`options.offline`, e.g. `HF_HUB_OFFLINE=1`), or when the Hub
/// cannot be reached, a model not (completely) in the cache is
/// [`Error::Hub`], naming the id and the local-folder alternative.
pub fn fetch_model(model_id: &str, options: &HubOptions) -> Result<PathBuf> {
    let cache = match &options.cache_dir {
        Some(dir) => hf_hub::Cache::new(dir.clone()),
        None => hf_hub::Cache::from_env(),
    };
    let revision = options.revision.clone().unwrap_or_else(|| "main".into());
    let repo = hf_hub::Repo::with_revision(model_id.to_string(), hf_hub::RepoType::Model, revision);
    if options.offline {
        let cached = cache.repo(repo);
        let mut get = |file: &str| {
            cached.get(file).ok_or_else(|| {
                format!(
                    "offline (HF_HUB_OFFLINE) and {file} is not in the cache {}",
                    cache.path().display()
                )
            })
        };
        return collect(model_id, &mut get);
    }
    let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(cache).with_progress(false);
    if let Some(endpoint) = &options.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    let api = builder
        .build()
        .map_err(|e| hub_error(model_id, e.to_string()))?
        .repo(repo);
    let mut get = |file: &str| api.get(file).map_err(|e| format!("{file}: {e}"));
    collect(model_id, &mut get)
}

/// Gets the files of a model folder with `get`; returns the folder.
fn collect(model_id: &str, get: &mut Getter<'_>) -> Result<PathBuf> {
    let config = get("config.json").map_err(|e| hub_error(model_id, e))?;
    get("tokenizer.json").map_err(|e| hub_error(model_id, e))?;
    for file in &TOKENIZER_FILES[1..] {
        // Optional files: a repository without one is fine.
        let _ = get(file);
    }
    match get("model.safetensors.index.json") {
        Ok(index) => {
            for shard in shards(&index, model_id)? {
                get(&shard).map_err(|e| hub_error(model_id, e))?;
            }
        }
        Err(_) => {
            get("model.safetensors").map_err(|e| hub_error(model_id, e))?;
        }
    }
    Ok(config
        .parent()
        .expect("a cached file lies in its snapshot folder")
        .to_path_buf())
}
