//! Chat templates: an instruct model's Jinja `chat_template` rendered the way Hugging Face's
//! `apply_chat_template(messages, add_generation_prompt=True)` renders it.
//!
//! Instruct models are trained on one exact prompt layout; any other layout makes them
//! answer nonsense, so the template shipped in the model directory is the only safe one.
//! Rendering uses minijinja (as HF text-generation-inference and mistral.rs do) with Jinja's
//! settings as HF sets them: `trim_blocks`, `lstrip_blocks`, loop controls, Python's string
//! methods, and a `raise_exception` function.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind, Value};

use super::{MeshTokenizer, ModelError};

/// Largest `tokenizer_config.json` or `chat_template.jinja` read. Real ones are a few hundred
/// KiB at most; the bound keeps a stray huge file from being loaded whole.
pub const MAX_TEMPLATE_FILE_BYTES: u64 = 4 * 1024 * 1024;

const TEMPLATE_NAME: &str = "chat_template";

/// One message of a chat, as OpenAI's API and HF's templates spell it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A compiled chat template with the special tokens it may write.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    origin: PathBuf,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

/// The message `raise_exception` was called with, carried through minijinja's error so
/// a template's refusal stays distinguishable from a broken template.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

impl ChatTemplate {
    /// The template of the model in `dir`: `chat_template.jinja` if present (newer HF
    /// exports), else `chat_template` of `tokenizer_config.json`. `Ok(None)` when the model
    /// has none; a malformed file or a template that does not compile is an error.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>, ModelError> {
        let config_path = dir.join("tokenizer_config.json");
        let config = match read_bounded(&config_path)? {
            Some(text) => Some(TokenizerConfig::parse(&text, &config_path)?),
            None => None,
        };
        let jinja_path = dir.join("chat_template.jinja");
        let (bos, eos) = config
            .as_ref()
            .map(|c| (c.bos_token.clone(), c.eos_token.clone()))
            .unwrap_or_default();
        if let Some(source) = read_bounded(&jinja_path)? {
            return Self::compile(source, jinja_path, bos, eos).map(Some);
        }
        match config.and_then(|c| c.chat_template) {
            Some(source) => Self::compile(source, config_path, bos, eos).map(Some),
            None => Ok(None),
        }
    }

    /// A template from its source text (errors name it `chat_template`).
    pub fn new(
        source: impl Into<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, ModelError> {
        Self::compile(
            source.into(),
            PathBuf::from(TEMPLATE_NAME),
            bos_token,
            eos_token,
        )
    }

    fn compile(
        source: String,
        origin: PathBuf,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, ModelError> {
        let mut env = Environment::new();
        // HF renders with these settings; without them whitespace differs from training.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build();
        let bad = |e: minijinja::Error| ModelError::BadChatTemplate {
            path: origin.clone(),
            reason: e.to_string(),
        };
        env.set_syntax(syntax.map_err(bad)?);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source).map_err(bad)?;
        Ok(Self {
            env,
            origin,
            bos_token,
            eos_token,
        })
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The prompt text of `messages`; with `add_generation_prompt` it ends where the
    /// assistant's answer begins. A template's `raise_exception` is
    /// [`ModelError::ChatRejected`]; any other failure is [`ModelError::ChatRender`].
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ModelError::ChatRender(e.to_string()))?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from(BTreeMap::from([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ]))
            })
            .collect();
        let mut ctx = BTreeMap::from([
            ("messages", Value::from(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ]);
        // Absent tokens stay undefined (render as ""), as in HF, rather than `none`.
        if let Some(bos) = &self.bos_token {
            ctx.insert("bos_token", Value::from(bos.as_str()));
        }
        if let Some(eos) = &self.eos_token {
            ctx.insert("eos_token", Value::from(eos.as_str()));
        }
        template
            .render(Value::from(ctx))
            .map_err(|e| match raised(&e) {
                Some(msg) => ModelError::ChatRejected(msg),
                None => ModelError::ChatRender(e.to_string()),
            })
    }

    /// Token ids of the chat's prompt. Special tokens are not added: the template writes
    /// BOS itself, and HF's `apply_chat_template(tokenize=True)` encodes the same way, so
    /// the model never sees a doubled BOS.
    pub fn encode(
        &self,
        tokenizer: &MeshTokenizer,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, ModelError> {
        tokenizer.encode_raw(&self.render(messages, add_generation_prompt)?)
    }
}

/// The prompt for a model without a chat template: a role-tagged transcript ending with
/// the assistant's turn (what the tiny model is used with).
pub fn transcript(messages: &[ChatMessage]) -> String {
    let mut prompt = String::new();
    for m in messages {
        prompt.push_str(&format!("<|{}|>\n{}\n", m.role, m.content));
    }
    prompt.push_str("<|assistant|>\n");
    prompt
}

fn raise_exception(msg: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg.clone()).with_source(Raised(msg)))
}

/// The `raise_exception` message somewhere in `e`'s source chain, if any.
fn raised(e: &minijinja::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<Raised>() {
            return Some(r.0.clone());
        }
        source = s.source();
    }
    None
}

/// The fields of `tokenizer_config.json` a chat needs.
struct TokenizerConfig {
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl TokenizerConfig {
    fn parse(text: &str, path: &Path) -> Result<Self, ModelError> {
        let malformed = |reason: String| ModelError::MalformedConfig {
            path: path.to_path_buf(),
            reason,
        };
        let json: serde_json::Value =
            serde_json::from_str(text).map_err(|e| malformed(e.to_string()))?;
        let obj = json
            .as_object()
            .ok_or_else(|| malformed("not a JSON object".into()))?;
        let chat_template = match obj.get("chat_template") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // Several named templates: HF uses "default" unless told otherwise.
            Some(serde_json::Value::Array(list)) => Some(
                list.iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_string)
                    .ok_or_else(|| {
                        malformed("chat_template list has no \"default\" template".into())
                    })?,
            ),
            Some(_) => return Err(malformed("chat_template is not a string or a list".into())),
        };
        let token = |key: &str| -> Result<Option<String>, ModelError> {
            match obj.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                // An AddedToken object: {"content": "<s>", "lstrip": false, ...}.
                Some(v) => v
                    .get("content")
                    .and_then(|c| c.as_str())
                    .map(|c| Some(c.to_string()))
                    .ok_or_else(|| malformed(format!("{key} is not a string or a token object"))),
            }
        };
        Ok(Self {
            chat_template,
            bos_token: token("bos_token")?,
            eos_token: token("eos_token")?,
        })
    }
}

/// The file's text, `None` if it does not exist; at most [`MAX_TEMPLATE_FILE_BYTES`].
fn read_bounded(path: &Path) -> Result<Option<String>, ModelError> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_TEMPLATE_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    let malformed = |reason: String| ModelError::MalformedConfig {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() as u64 > MAX_TEMPLATE_FILE_BYTES {
        return Err(malformed(format!(
            "larger than {MAX_TEMPLATE_FILE_BYTES} bytes"
        )));
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| malformed("not UTF-8".into()))
}
