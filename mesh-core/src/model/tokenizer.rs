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

    /// Text that `generated` adds after `prompt`, as decoding the whole sequence shows it
    /// (what [`TextStream`] streams, once every character is complete).
    pub fn decode_after(&self, prompt: &[u32], generated: &[u32]) -> Result<String, ModelError> {
        let whole: Vec<u32> = prompt.iter().chain(generated).copied().collect();
        let whole = self.decode(&whole)?;
        let before = self.decode(prompt)?;
        Ok(whole.get(before.len()..).unwrap_or_default().to_string())
    }

    /// Bytes of the longest token as the vocabulary spells it (special tokens included):
    /// with it, a text's length bounds how many tokens it can at least take, before it is
    /// tokenized.
    pub fn longest_token_bytes(&self) -> usize {
        self.inner
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// Turns tokens into text as they arrive, holding back bytes of an unfinished
/// UTF-8 character so the stream never shows a replacement character mid-way.
///
/// Each new token is decoded after the tokens of the text shown last (at first the
/// prompt), and the text it adds is the difference: decoders treat the start of a text
/// specially (sentencepiece's strips its leading space), so decoding the continuation on
/// its own would glue its first word to the prompt's last. What is streamed is what
/// decoding the whole sequence shows after the prompt, and each step decodes only the
/// last shown text's tokens plus the new ones.
#[derive(Debug)]
pub struct TextStream {
    tokenizer: MeshTokenizer,
    /// The tokens of the text shown last (the context), then those not shown yet.
    ids: Vec<u32>,
    /// How many of `ids` are context.
    shown: usize,
}

impl TextStream {
    /// A stream of the text generated after `prompt` (empty for text from the start).
    pub fn new(tokenizer: MeshTokenizer, prompt: &[u32]) -> Self {
        Self {
            tokenizer,
            ids: prompt.to_vec(),
            shown: prompt.len(),
        }
    }

    /// Add a token; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, ModelError> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let before = self.tokenizer.decode(&self.ids[..self.shown])?;
        let Some(chunk) = text.get(before.len()..).filter(|c| !c.is_empty()) else {
            return Ok(None);
        };
        let chunk = chunk.to_string();
        // What was just shown is the next token's context.
        self.ids.drain(..self.shown);
        self.shown = self.ids.len();
        Ok(Some(chunk))
    }
}
