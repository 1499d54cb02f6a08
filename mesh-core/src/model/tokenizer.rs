//! `tokenizer.json` through the tokenizers crate, and decoding a token stream to text.

use std::path::Path;

use super::ModelError;

/// A Hugging Face tokenizer loaded from `tokenizer.json`.
#[derive(Clone)]
pub struct MeshTokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for MeshTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .finish()
    }
}

impl MeshTokenizer {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        if !path.exists() {
            return Err(ModelError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json"),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self { inner })
    }

    pub fn from_json(json: &str) -> Result<Self, ModelError> {
        let inner: tokenizers::Tokenizer = json
            .parse()
            .map_err(|e| ModelError::Tokenizer(format!("{e}")))?;
        Ok(Self { inner })
    }

    /// Token ids of `text`, with the tokenizer's special tokens (BOS) added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.encode_with(text, true)
    }

    /// Token ids of `text` with no special tokens added; special tokens written in the text
    /// (a chat template's `<s>`) still become their ids. For text that already carries its
    /// BOS, as a rendered chat template does.
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.encode_with(text, false)
    }

    fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// Turns tokens into text as they arrive, holding back bytes of an unfinished
/// UTF-8 character so the stream never shows a replacement character mid-way.
#[derive(Debug)]
pub struct TextStream {
    tokenizer: MeshTokenizer,
    ids: Vec<u32>,
    emitted: usize,
}

impl TextStream {
    pub fn new(tokenizer: MeshTokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Add a token; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, ModelError> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') || text.len() <= self.emitted {
            return Ok(None);
        }
        let Some(chunk) = text.get(self.emitted..).map(str::to_string) else {
            return Ok(None);
        };
        self.emitted = text.len();
        Ok(Some(chunk))
    }

    /// All text so far, including a trailing partial character.
    pub fn text(&self) -> Result<String, ModelError> {
        self.tokenizer.decode(&self.ids)
    }
}
