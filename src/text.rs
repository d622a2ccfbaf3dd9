//! Text in and out of a model folder: the `tokenizer.json` tokenizer, the
//! chat template of `tokenizer_config.json`, the end-of-sequence ids of
//! `generation_config.json` / `config.json`, and a streaming decoder that
//! turns generated ids into text without ever splitting a UTF-8 character.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use ksa::text::{ChatMessage, TextTokenizer};
//! use ksa::{GenerateOptions, Qwen3Ksa};
//! # fn main() -> ksa::Result<()> {
//! let dir = "KSA-4B-base";
//! let model = Qwen3Ksa::from_folder(dir, DType::BF16, &Device::Cpu)?;
//! let tokenizer = TextTokenizer::from_folder(dir)?;
//! let prompt = tokenizer.encode_chat(&[ChatMessage::user("Hello!")], true)?;
//! let options = GenerateOptions { stop_tokens: tokenizer.eos_ids().to_vec(), ..Default::default() };
//! let mut stream = tokenizer.stream();
//! let mut failed = None;
//! model.generate(&[&prompt], &options, |_, id| match stream.push(id) {
//!     Ok(Some(text)) => print!("{text}"),
//!     Ok(None) => {}
//!     Err(e) => failed = Some(e),
//! })?;
//! print!("{}", stream.finish()?);
//! # Ok(()) }
//! ```

use crate::cache::KsaCache;
use crate::generate::GenerateOptions;
use crate::model::Qwen3Ksa;
use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;
use std::time::Instant;

/// Tokens a [`TextStream`] holds back while they decode to an incomplete
/// character; past this the bytes cannot be the start of one UTF-8
/// character (at most 4 bytes), so they are emitted as decoded (with
/// U+FFFD), which also bounds the work of each step.
const MAX_PENDING_TOKENS: usize = 16;

/// Instruction budget of one chat template rendering (minijinja "fuel"):
/// far above any real template over a conversation, and a bound on a
/// template that loops without end.
const TEMPLATE_FUEL: u64 = 50_000_000;

/// One message of a conversation, as chat templates expect it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: "system".into(),
            content: content.into(),
        }
    }
}

/// The tokenizer of a model folder with its chat template and EOS ids.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    tokenizer: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_ids: Vec<u32>,
}

fn tokenizer_error(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// Reads a JSON file of a model folder; `Ok(None)` when it does not exist.
fn read_json(path: &Path) -> Result<Option<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::ModelConfig(format!("{} is not valid JSON: {e}", path.display())))
}

/// A special token of `tokenizer_config.json`: a string, or an object with
/// a `content` string (the `AddedToken` form).
fn special_token(config: &Value, name: &str) -> Option<String> {
    match config.get(name)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `eos_token_id` of a config: an id or a list of ids (`Ok(None)`: absent).
fn eos_field(config: &Value, file: &str) -> Result<Option<Vec<u32>>> {
    let bad = |v: &Value| {
        Error::ModelConfig(format!(
            "{file}: `eos_token_id` must be a token id or a list of them, got {v}"
        ))
    };
    let id = |v: &Value| {
        v.as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| bad(v))
    };
    match config.get("eos_token_id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items.iter().map(id).collect::<Result<_>>().map(Some),
        Some(v) => Ok(Some(vec![id(v)?])),
    }
}

/// The chat template of `tokenizer_config.json` (a string, or a list of
/// named templates of which `default` is used), or of `chat_template.jinja`.
fn chat_template(folder: &Path, config: Option<&Value>) -> Result<Option<String>> {
    match config.and_then(|c| c.get("chat_template")) {
        Some(Value::String(s)) => return Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let default = list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str());
            return match default {
                Some(t) => Ok(Some(t.to_string())),
                None => Err(Error::ChatTemplate(
                    "tokenizer_config.json lists chat templates but none is named `default`".into(),
                )),
            };
        }
        Some(Value::Null) | None => {}
        Some(v) => {
            return Err(Error::ChatTemplate(format!(
                "tokenizer_config.json: `chat_template` must be a string, got {v}"
            )))
        }
    }
    let file = folder.join("chat_template.jinja");
    match std::fs::read_to_string(&file) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io { path: file, source }),
    }
}

impl TextTokenizer {
    /// Loads the tokenizer of a model folder: `tokenizer.json` (required; a
    /// missing or malformed one is [`Error::Tokenizer`]), the chat template
    /// and special tokens of `tokenizer_config.json` (optional), and the EOS
    /// ids of `generation_config.json`, else `config.json`, else the
    /// tokenizer config's `eos_token`.
    pub fn from_folder(folder: impl AsRef<Path>) -> Result<Self> {
        let folder = folder.as_ref();
        let file = folder.join("tokenizer.json");
        if !file.is_file() {
            return Err(Error::Tokenizer(format!(
                "{} does not exist (the model folder needs its tokenizer)",
                file.display()
            )));
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| Error::Tokenizer(format!("{} is malformed: {e}", file.display())))?;
        let config = read_json(&folder.join("tokenizer_config.json"))?;
        let template = chat_template(folder, config.as_ref())?;
        let mut out = Self::new(tokenizer, template);
        if let Some(c) = &config {
            out.bos_token = special_token(c, "bos_token");
            out.eos_token = special_token(c, "eos_token");
        }
        let mut eos = None;
        for name in ["generation_config.json", "config.json"] {
            if let Some(c) = read_json(&folder.join(name))? {
                eos = eos_field(&c, name)?;
                if eos.is_some() {
                    break;
                }
            }
        }
        out.eos_ids = match eos {
            Some(ids) => ids,
            None => out.eos_from_token(),
        };
        Ok(out)
    }

    /// Wraps a tokenizer built in code, with an optional chat template; the
    /// EOS ids are those of [`TextTokenizer::with_eos_token`] (none until then).
    pub fn new(tokenizer: tokenizers::Tokenizer, chat_template: Option<String>) -> Self {
        Self {
            tokenizer,
            chat_template,
            bos_token: None,
            eos_token: None,
            eos_ids: Vec::new(),
        }
    }

    /// Trains a byte-level BPE tokenizer (the kind Qwen uses: every byte
    /// has a token, so any UTF-8 text encodes, and multi-byte characters may
    /// span several ids) on `texts`, with `special_tokens` first (ids 0, 1,
    /// ...), up to `vocab_size` tokens in all. The first special token is
    /// the EOS token. For tests and small demonstrations: real models come
    /// with their `tokenizer.json`.
    pub fn train_byte_level(
        texts: &[&str],
        vocab_size: usize,
        special_tokens: &[&str],
    ) -> Result<Self> {
        use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        let specials = special_tokens
            .iter()
            .map(|t| tokenizers::AddedToken::from(t.to_string(), true))
            .collect();
        let mut trainer: tokenizers::models::TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .special_tokens(specials)
            .build()
            .into();
        let mut tokenizer = tokenizers::Tokenizer::new(BPE::default());
        let byte_level = ByteLevel::default().add_prefix_space(false);
        tokenizer.with_pre_tokenizer(Some(byte_level));
        tokenizer.with_decoder(Some(byte_level));
        tokenizer
            .train(&mut trainer, texts.iter())
            .map_err(tokenizer_error)?;
        let out = Self::new(tokenizer, None);
        Ok(match special_tokens.first() {
            Some(eos) => out.with_eos_token(*eos),
            None => out,
        })
    }

    /// Sets the EOS token by its text (also the template's `eos_token`); its
    /// id, when the vocabulary has it, becomes the one EOS id.
    pub fn with_eos_token(mut self, token: impl Into<String>) -> Self {
        self.eos_token = Some(token.into());
        self.eos_ids = self.eos_from_token();
        self
    }

    fn eos_from_token(&self) -> Vec<u32> {
        self.eos_token
            .as_deref()
            .and_then(|t| self.tokenizer.token_to_id(t))
            .into_iter()
            .collect()
    }

    /// Writes `tokenizer.json` and, when there is a chat template or an EOS
    /// token, `tokenizer_config.json` into `folder`, so
    /// [`TextTokenizer::from_folder`] reads the same tokenizer back.
    pub fn save(&self, folder: impl AsRef<Path>) -> Result<()> {
        let folder = folder.as_ref();
        let file = folder.join("tokenizer.json");
        self.tokenizer
            .save(&file, false)
            .map_err(|e| Error::Tokenizer(format!("cannot write {}: {e}", file.display())))?;
        let mut config = serde_json::Map::new();
        for (key, value) in [
            ("chat_template", &self.chat_template),
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
        ] {
            if let Some(v) = value {
                config.insert(key.into(), Value::String(v.clone()));
            }
        }
        if !config.is_empty() {
            let path = folder.join("tokenizer_config.json");
            let text = serde_json::to_string_pretty(&config).expect("a JSON map serializes");
            std::fs::write(&path, text).map_err(|source| Error::Io { path, source })?;
        }
        Ok(())
    }

    /// Replaces the chat template.
    pub fn with_chat_template(mut self, template: impl Into<String>) -> Self {
        self.chat_template = Some(template.into());
        self
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// The ids that end a generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The chat template, if the folder has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Token ids of `text` (with the tokenizer's post-processing, e.g. a BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    fn encode_with(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, special)
            .map_err(tokenizer_error)?
            .get_ids()
            .to_vec())
    }

    /// The text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(tokenizer_error)
    }

    /// Renders `messages` with the chat template (variables `messages`,
    /// `add_generation_prompt`, `bos_token`, `eos_token`; Python string
    /// methods such as `startswith` and `split` and `raise_exception` are
    /// available, as in `transformers`). No template, a template that does
    /// not parse, or one that fails to render is [`Error::ChatTemplate`].
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let source = self.chat_template.as_deref().ok_or_else(|| {
            Error::ChatTemplate(
                "the model folder has no chat template (tokenizer_config.json `chat_template` or chat_template.jinja)"
                    .into(),
            )
        })?;
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        // minijinja's error Display names the line; its source chain adds
        // the nested cause, so both go into the message.
        let describe = |e: minijinja::Error| {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            Error::ChatTemplate(text)
        };
        let template = env.template_from_str(source).map_err(describe)?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
            .collect();
        template
            .render(minijinja::context! {
                messages => minijinja::Value::from_serialize(&messages),
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.clone().unwrap_or_default(),
                eos_token => self.eos_token.clone().unwrap_or_default(),
            })
            .map_err(describe)
    }

    /// Token ids of a conversation rendered with the chat template. The
    /// template writes the special tokens itself, so nothing is added.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        self.encode_with(&self.render_chat(messages, add_generation_prompt)?, false)
    }

    /// A streaming decoder for one generated sequence.
    pub fn stream(&self) -> TextStream<'_> {
        TextStream {
            tokenizer: &self.tokenizer,
            ids: Vec::new(),
            prefix: String::new(),
            prefix_ids: 0,
        }
    }
}

/// Decodes a sequence one id at a time into text pieces that always end on
/// a character boundary: byte-level tokenizers split a character such as
/// `é` or an emoji over several ids, and a piece is emitted only once the
/// text decodes to complete characters. The concatenated pieces (plus
/// [`TextStream::finish`]) equal decoding all ids at once.
///
/// It decodes a short window of recent ids, not the whole sequence, so each
/// step costs the same however long the generation runs; the ids before the
/// last emitted piece stay in the window as context, because decoders such
/// as SentencePiece's drop a leading space at the start of a decode.
#[derive(Debug)]
pub struct TextStream<'a> {
    tokenizer: &'a tokenizers::Tokenizer,
    /// Ids of the window: context ids, then ids not yet emitted.
    ids: Vec<u32>,
    /// The text of `ids[..prefix_ids]`, already emitted.
    prefix: String,
    prefix_ids: usize,
}

impl TextStream<'_> {
    /// Adds one generated id; returns the new text once it ends on a
    /// complete character (`None` while a character is still incomplete).
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self
            .tokenizer
            .decode(&self.ids, true)
            .map_err(tokenizer_error)?;
        let pending = self.ids.len() - self.prefix_ids;
        if text.len() <= self.prefix.len()
            || (text.ends_with('\u{FFFD}') && pending < MAX_PENDING_TOKENS)
        {
            return Ok(None);
        }
        self.emit(text).map(Some)
    }

    /// The text of the ids still held back (an incomplete character at the
    /// end of the generation comes out as U+FFFD); empty when none are.
    pub fn finish(&mut self) -> Result<String> {
        let text = self
            .tokenizer
            .decode(&self.ids, true)
            .map_err(tokenizer_error)?;
        if text.len() <= self.prefix.len() {
            return Ok(String::new());
        }
        self.emit(text)
    }

    fn emit(&mut self, text: String) -> Result<String> {
        let new = text.strip_prefix(self.prefix.as_str()).ok_or_else(|| {
            Error::Tokenizer(format!(
                "streaming decode: the text so far {:?} is not a prefix of {text:?} (the decoder rewrites earlier text)",
                self.prefix
            ))
        })?;
        let new = new.to_string();
        // The ids just emitted become the context of the next window.
        self.ids.drain(..self.prefix_ids);
        self.prefix_ids = self.ids.len();
        self.prefix = self
            .tokenizer
            .decode(&self.ids, true)
            .map_err(tokenizer_error)?;
        Ok(new)
    }
}

/// The files of a model folder the conversion carries over and the Hub
/// download fetches besides the weights (all optional but `tokenizer.json`).
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
];

/// What [`generate_text`] produced, with its timings.
#[derive(Debug, Clone)]
pub struct TextGeneration {
    /// The generated text (special tokens skipped), as streamed.
    pub text: String,
    /// The generated ids, the stop token included.
    pub tokens: Vec<u32>,
    /// Whether generation ended at an EOS id (else at the token limit).
    pub stopped_at_eos: bool,
    /// Seconds from the start to the first generated token (the prefill).
    pub prefill_seconds: f64,
    /// Seconds from the first generated token to the last.
    pub decode_seconds: f64,
}

/// Generates a continuation of `prompt` and streams its text: `on_text` gets
/// every piece as soon as it ends on a complete character. Stops at the
/// tokenizer's EOS ids (added to `options.stop_tokens`) or after
/// `options.max_new_tokens`. `cache` (sequence 0) holds the context; one
/// with a capacity ([`KsaCache::with_capacity`]) must fit the prompt and
/// the new tokens, else [`Error::PromptTooLong`] before any work.
pub fn generate_text(
    model: &Qwen3Ksa,
    tokenizer: &TextTokenizer,
    cache: &mut KsaCache,
    prompt: &[u32],
    options: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<TextGeneration> {
    if let Some(capacity) = cache.capacity() {
        let held = cache.seq_len(0)?;
        let need = held
            .checked_add(prompt.len())
            .and_then(|n| n.checked_add(options.max_new_tokens));
        if need.is_none_or(|n| n > capacity) {
            return Err(Error::PromptTooLong {
                tokens: held.saturating_add(prompt.len()),
                new_tokens: options.max_new_tokens,
                capacity,
            });
        }
    }
    let mut options = options.clone();
    options.stop_tokens.extend_from_slice(tokenizer.eos_ids());
    let mut stream = tokenizer.stream();
    let mut text = String::new();
    let mut failed = None;
    let start = Instant::now();
    let mut first = None;
    let tokens = model
        .generate_in(cache, &[prompt], &options, |_, id| {
            first.get_or_insert_with(Instant::now);
            if failed.is_none() {
                match stream.push(id) {
                    Ok(Some(piece)) => {
                        on_text(&piece);
                        text.push_str(&piece);
                    }
                    Ok(None) => {}
                    Err(e) => failed = Some(e),
                }
            }
        })?
        .remove(0);
    let end = Instant::now();
    if let Some(e) = failed {
        return Err(e);
    }
    let rest = stream.finish()?;
    if !rest.is_empty() {
        on_text(&rest);
    }
    text.push_str(&rest);
    let first = first.unwrap_or(end);
    Ok(TextGeneration {
        text,
        stopped_at_eos: tokens
            .last()
            .is_some_and(|t| tokenizer.eos_ids().contains(t)),
        tokens,
        prefill_seconds: (first - start).as_secs_f64(),
        decode_seconds: (end - first).as_secs_f64(),
    })
}
