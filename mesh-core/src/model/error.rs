//! Errors from loading and running a model span.

use std::path::PathBuf;

use crate::types::BlockRange;

/// Why a model could not be loaded or run. Bad input is always one of these, never a panic.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file of the model directory could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written (the built-in tiny model): a read-only or missing
    /// directory, a full disk. Told apart from [`ModelError::Io`] so the operator looks at
    /// the right thing.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `config.json` claims more (or fewer) blocks than the weight files hold.
    #[error(
        "{path} says num_hidden_layers = {claimed}, but the weights hold {found} blocks \
         (model.layers.0 to model.layers.{last}): fix config.json or the weight files",
        last = found.saturating_sub(1)
    )]
    BlockCount {
        path: PathBuf,
        claimed: usize,
        found: u32,
    },
    /// `config.json` (the safetensors index, `tokenizer_config.json`) is missing fields, is
    /// not valid JSON, or is too large.
    #[error("malformed {path}: {reason}")]
    MalformedConfig { path: PathBuf, reason: String },
    /// The config is well-formed but describes something this engine does not run.
    #[error("unsupported model config: {0}")]
    Unsupported(String),
    /// No `*.safetensors` file was found in the model directory.
    #[error("no safetensors weights in {0}")]
    NoWeights(PathBuf),
    /// A safetensors file is corrupt or its header cannot be parsed.
    #[error("bad safetensors file {path}: {reason}")]
    BadSafetensors { path: PathBuf, reason: String },
    /// A tensor the span needs is not in any weight file.
    #[error("weight {name} is missing from the model files")]
    MissingWeight { name: String },
    /// A tensor has a different shape than the config implies.
    #[error("weight {name} has shape {actual:?}, config expects {expected:?}")]
    WeightShape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    /// A tensor is stored in a dtype that is not a float type (f32, f16, bf16).
    #[error("weight {name} has dtype {dtype}, expected one of f32, f16, bf16")]
    WeightDtype { name: String, dtype: String },
    /// The requested span does not lie inside the model.
    #[error("block span {span} is out of range for a model with {num_blocks} blocks")]
    SpanOutOfRange { span: BlockRange, num_blocks: u32 },
    /// A sequence would exceed the model's (or the session's) maximum length.
    #[error("sequence of {requested} tokens exceeds the context length of {max}")]
    ContextOverflow { requested: usize, max: usize },
    /// Hidden states arrived for positions that do not continue the session's cache.
    #[error("positions start at {got}, but the session cache holds {expected} tokens")]
    PositionMismatch { expected: usize, got: usize },
    /// Hidden states have the wrong shape for this model.
    #[error("hidden states have shape {actual:?}, expected [batch, seq, {hidden_size}]")]
    HiddenShape {
        actual: Vec<usize>,
        hidden_size: usize,
    },
    /// A prompt encoded to no tokens at all.
    #[error("empty prompt")]
    EmptyPrompt,
    /// `tokenizer.json` could not be loaded or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The model's chat template does not compile.
    #[error("chat template in {path} does not compile: {reason}")]
    BadChatTemplate { path: PathBuf, reason: String },
    /// The chat template failed while rendering a chat.
    #[error("chat template: {0}")]
    ChatRender(String),
    /// The chat template refused the messages (its `raise_exception`), e.g. roles that do
    /// not alternate as the model requires.
    #[error("the chat template rejected the messages: {0}")]
    ChatRejected(String),
    /// A hub id was given for the model but the local Hugging Face cache lacks it.
    #[error(
        "model {id} is not in the Hugging Face cache at {cache} ({why}); mesh never \
         downloads: fetch it first (`huggingface-cli download {id}`), set HF_HOME or \
         HF_HUB_CACHE, or give the model's directory"
    )]
    NotInHubCache {
        id: String,
        cache: PathBuf,
        why: String,
    },
    /// A GGUF file could not be read or describes something mesh does not run.
    #[error("GGUF file {path}: {reason}")]
    Gguf { path: PathBuf, reason: String },
    /// A tensor operation failed.
    #[error("tensor op: {0}")]
    Tensor(#[from] candle_core::Error),
}
