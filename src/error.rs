//! The crate's one error type.

/// Everything that can go wrong in `ksa`. Messages say what was expected and
/// what came in; user input never panics.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A KSA configuration value is impossible (`C = 0`, `S = 0`, ...).
    #[error("invalid KSA config: {0}")]
    InvalidConfig(String),

    /// A layout would not fit the index types the kernels use.
    #[error("layout too large: {0}")]
    LayoutTooLarge(String),

    /// A tensor has the wrong number of dimensions.
    #[error("`{name}` must have rank {expected} ({layout}), got shape {got:?}")]
    Rank {
        name: &'static str,
        expected: usize,
        layout: &'static str,
        got: Vec<usize>,
    },

    /// Two tensors disagree on a dimension they must share.
    #[error("{what}: `{a}` has {a_val}, `{b}` has {b_val}")]
    DimMismatch {
        what: &'static str,
        a: &'static str,
        a_val: usize,
        b: &'static str,
        b_val: usize,
    },

    /// Query heads are not a multiple of key/value heads (GQA needs `hq % hkv == 0`).
    #[error("{q_heads} query heads are not a multiple of {kv_heads} key/value heads")]
    HeadsNotDivisible { q_heads: usize, kv_heads: usize },

    /// The sequence length of a tensor does not equal the layout's expanded length.
    #[error(
        "`{name}` has {got} slots, but the layout of {text_tokens} text tokens has {expected}"
    )]
    LayoutLength {
        name: &'static str,
        expected: usize,
        got: usize,
        text_tokens: usize,
    },

    /// A tensor's dtype is not supported by an operation.
    #[error("{op} does not support dtype {got:?} (supported: {supported})")]
    UnsupportedDType {
        op: &'static str,
        got: candle_core::DType,
        supported: &'static str,
    },

    /// Tensors that must share a dtype do not.
    #[error("dtype mismatch: `{a}` is {a_dtype:?}, `{b}` is {b_dtype:?}")]
    DTypeMismatch {
        a: &'static str,
        a_dtype: candle_core::DType,
        b: &'static str,
        b_dtype: candle_core::DType,
    },

    /// Tensors that must live on one device do not.
    #[error("device mismatch: `{a}` is on {a_device}, `{b}` is on {b_device}")]
    DeviceMismatch {
        a: &'static str,
        a_device: String,
        b: &'static str,
        b_device: String,
    },

    /// The operation has no implementation for this device in this build.
    #[error("{op} is not available on {device}: {reason}")]
    UnsupportedDevice {
        op: &'static str,
        device: String,
        reason: &'static str,
    },

    /// An input must be contiguous in memory (row-major) and is not.
    #[error("`{name}` must be contiguous (call `.contiguous()` first); got strides {strides:?} for shape {shape:?}")]
    NonContiguous {
        name: &'static str,
        shape: Vec<usize>,
        strides: Vec<usize>,
    },

    /// A size-limited helper was asked for more than it allows.
    #[error("{what} of {got} exceeds the limit of {limit}")]
    TooLarge {
        what: &'static str,
        got: usize,
        limit: usize,
    },

    /// A pattern string (such as `summary_sliding_chunk_num`'s
    /// `([128]*3+[1024]*1)*6`) is not in the accepted grammar.
    #[error("invalid pattern {pattern:?} at position {position}: {message}")]
    Pattern {
        pattern: String,
        /// Byte offset into `pattern` where parsing failed.
        position: usize,
        message: String,
    },

    /// A model config (`config.json`) field is missing, mistyped or impossible.
    #[error("model config: {0}")]
    ModelConfig(String),

    /// A checkpoint lacks a tensor the model needs.
    #[error("checkpoint has no tensor `{name}`")]
    MissingTensor { name: String },

    /// A checkpoint tensor has another shape than the config implies.
    #[error("checkpoint tensor `{name}` has shape {got:?}, the config implies {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    /// A file of a model folder could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },

    /// A tokenizer (`tokenizer.json`) is missing or malformed, or encoding
    /// or decoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A chat template is missing, does not parse, or fails to render.
    #[error("chat template: {0}")]
    ChatTemplate(String),

    /// A prompt does not fit the context the generation may use.
    #[error("the prompt has {tokens} tokens; with {new_tokens} new tokens it exceeds the context capacity of {capacity}")]
    PromptTooLong {
        tokens: usize,
        new_tokens: usize,
        capacity: usize,
    },

    /// A checkpoint conversion cannot proceed (the source is not a plain
    /// Qwen3 checkpoint, or the options are inconsistent with it).
    #[error("conversion: {0}")]
    Convert(String),

    /// A model could not be fetched from the Hugging Face Hub.
    #[error("cannot fetch `{model_id}` from the Hugging Face Hub: {reason}; download it elsewhere and pass the folder instead (`--model DIR`, `Qwen3Ksa::from_folder`)")]
    Hub { model_id: String, reason: String },

    /// The head dimension is not one the operation has a kernel for.
    #[error("{op} supports head_dim {supported}, got {got}")]
    UnsupportedHeadDim {
        op: &'static str,
        got: usize,
        supported: &'static str,
    },

    /// A cache step names a sequence the cache does not hold.
    #[error("sequence {index} does not exist (the cache holds {batch})")]
    UnknownSequence { index: usize, batch: usize },

    /// A cache step names the same sequence twice.
    #[error("sequence {index} appears more than once in one step")]
    DuplicateSequence { index: usize },

    /// A token id is not a text token of the model (out of the embedding
    /// table, or one of the summary rows).
    #[error("token id {token} is not a text token (text ids are below {vocab}, summary rows {summary_rows:?} excluded)")]
    TokenOutOfRange {
        /// The id as given (any id dtype fits an `i64`).
        token: i64,
        vocab: usize,
        summary_rows: std::ops::Range<usize>,
    },

    /// A step would grow a sequence past the cache's fixed capacity.
    #[error("sequence {sequence} holds {len} tokens; {adding} more exceed the cache capacity of {capacity}")]
    CacheCapacity {
        sequence: usize,
        len: usize,
        adding: usize,
        capacity: usize,
    },

    /// A cache was used with a model of another shape than it was built for.
    #[error("cache and model disagree: {0}")]
    CacheModelMismatch(String),

    /// The CPU kernel variant asked for (`KSA_CPU_ISA` or
    /// `CpuKernel::isa`) is unknown or this CPU lacks its instructions.
    #[error(
        "CPU kernel variant {requested:?} is not available on this CPU (available: {available})"
    )]
    CpuIsa {
        requested: String,
        available: String,
    },

    /// A host buffer could not be allocated (the size was within the
    /// documented limits, but the memory is not there).
    #[error("cannot allocate {bytes} bytes for {what}")]
    OutOfMemory { what: &'static str, bytes: usize },

    /// An error from candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A CUDA decode step's key/value slice table is unusable (misaligned,
    /// or a sequence without keys).
    #[error("decode slices of sequence {sequence}: {reason}")]
    DecodeSlices { sequence: usize, reason: String },
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
