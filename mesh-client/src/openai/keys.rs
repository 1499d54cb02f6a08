//! API keys of a shared gateway: a file of one key per line with an optional name, and
//! the `Authorization: Bearer` check that turns a request into the caller it bills.
//!
//! ```text
//! # who may use this gateway
//! sk-mesh-4f9a0c2e7d alice
//! sk-mesh-81b3e6d0aa          (named key-2: its line number)
//! ```

use std::path::Path;

use axum::http::{header, HeaderMap, StatusCode};

use super::request::ApiError;

/// Bytes of a key file read at most: thousands of keys, never a runaway file.
const MAX_FILE_BYTES: u64 = 1 << 20;
/// The shortest key accepted: shorter ones are guessable.
const MIN_KEY_CHARS: usize = 16;
/// The name usage is kept under when the gateway has no keys.
pub const ANONYMOUS: &str = "anonymous";

/// Why a key file was refused; each names the line at fault.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is {size} bytes, over the {MAX_FILE_BYTES}-byte limit for a key file")]
    TooLarge { path: String, size: u64 },
    #[error("{path} holds no keys (one key per line, then an optional name)")]
    Empty { path: String },
    #[error("{path}:{line}: a key must be at least {MIN_KEY_CHARS} characters of visible ASCII")]
    BadKey { path: String, line: usize },
    #[error("{path}:{line}: expected `KEY [NAME]`, found more words")]
    ExtraWords { path: String, line: usize },
    #[error("{path}:{line}: the key or the name `{name}` is already on line {first}")]
    Duplicate {
        path: String,
        line: usize,
        first: usize,
        name: String,
    },
}

/// One key and the name its usage is kept under.
#[derive(Clone, Debug)]
struct Key {
    secret: Vec<u8>,
    name: String,
}

/// The keys a gateway accepts.
#[derive(Clone, Debug)]
pub struct ApiKeys {
    keys: Vec<Key>,
}

impl ApiKeys {
    /// Read a key file: `KEY [NAME]` per line; blank lines and `#` comments are skipped;
    /// a key without a name is named `key-LINE`.
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let shown = path.display().to_string();
        let read = |source| KeyFileError::Read {
            path: shown.clone(),
            source,
        };
        let size = std::fs::metadata(path).map_err(read)?.len();
        if size > MAX_FILE_BYTES {
            return Err(KeyFileError::TooLarge { path: shown, size });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Self::parse(&text, &shown)
    }

    /// [`ApiKeys::load`] on text already read; `path` names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<Self, KeyFileError> {
        let mut keys: Vec<(usize, Key)> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let secret = words.next().unwrap_or_default();
            let name = words
                .next()
                .map_or_else(|| format!("key-{line_no}"), str::to_string);
            if words.next().is_some() {
                return Err(KeyFileError::ExtraWords {
                    path: path.into(),
                    line: line_no,
                });
            }
            if secret.len() < MIN_KEY_CHARS || !secret.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(KeyFileError::BadKey {
                    path: path.into(),
                    line: line_no,
                });
            }
            if let Some((first, _)) = keys
                .iter()
                .find(|(_, k)| k.secret == secret.as_bytes() || k.name == name)
            {
                return Err(KeyFileError::Duplicate {
                    path: path.into(),
                    line: line_no,
                    first: *first,
                    name,
                });
            }
            keys.push((
                line_no,
                Key {
                    secret: secret.as_bytes().to_vec(),
                    name,
                },
            ));
        }
        if keys.is_empty() {
            return Err(KeyFileError::Empty { path: path.into() });
        }
        Ok(Self {
            keys: keys.into_iter().map(|(_, k)| k).collect(),
        })
    }

    /// The names of the keys, in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.name.as_str())
    }

    /// The name of the key a request's `Authorization: Bearer` header carries, or the 401
    /// OpenAI answers: no key, or a key it does not know.
    pub(super) fn caller(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        let value = headers.get(header::AUTHORIZATION);
        let blank = value.is_some_and(|v| v.as_bytes().trim_ascii() == b"Bearer");
        let Some(value) = value.filter(|_| !blank) else {
            return Err(unauthorized(
                "You didn't provide an API key. You need to provide your API key in an \
                 Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                None,
            ));
        };
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or_default();
        // Every key is compared in full, whichever matches: the time taken says nothing
        // about how much of a guess was right.
        let mut found = None;
        for key in &self.keys {
            if same(&key.secret, presented.as_bytes()) {
                found = Some(key.name.clone());
            }
        }
        found.ok_or_else(|| {
            unauthorized(
                &format!(
                    "Incorrect API key provided: {}. Ask this gateway's operator for a key.",
                    redact(presented)
                ),
                Some("invalid_api_key"),
            )
        })
    }
}

/// Equal bytes, compared in time that depends on the lengths only.
fn same(a: &[u8], b: &[u8]) -> bool {
    let diff = a
        .iter()
        .zip(b)
        .fold(a.len() ^ b.len(), |acc, (x, y)| acc | usize::from(x ^ y));
    diff == 0
}

/// A key as OpenAI shows a wrong one: its start and its last four characters.
fn redact(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 8 {
        return "*".repeat(chars.len());
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}***{tail}")
}

fn unauthorized(message: &str, code: Option<&'static str>) -> ApiError {
    ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: message.to_string(),
        param: None,
        code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const FILE: &str = "# keys\n\nsk-mesh-0123456789abcdef alice\nsk-mesh-fedcba9876543210\n";

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    #[test]
    fn names_come_from_the_file_or_the_line() {
        let keys = ApiKeys::parse(FILE, "keys").unwrap();
        assert_eq!(keys.names().collect::<Vec<_>>(), ["alice", "key-4"]);
        let alice = keys.caller(&headers("Bearer sk-mesh-0123456789abcdef"));
        assert_eq!(alice.unwrap(), "alice");
        let other = keys.caller(&headers("Bearer sk-mesh-fedcba9876543210"));
        assert_eq!(other.unwrap(), "key-4");
    }

    #[test]
    fn missing_and_wrong_keys_are_401_in_openais_words() {
        let keys = ApiKeys::parse(FILE, "keys").unwrap();
        for none in [HeaderMap::new(), headers("Bearer ")] {
            let none = keys.caller(&none).unwrap_err();
            assert_eq!(none.status, StatusCode::UNAUTHORIZED);
            assert!(none.message.contains("didn't provide an API key"));
        }
        for bad in [
            "Bearer sk-mesh-0123456789abcdeX",
            "Bearer sk-mesh-0123456789abcde",
            "Basic sk-mesh-0123456789abcdef",
        ] {
            let e = keys.caller(&headers(bad)).unwrap_err();
            assert_eq!(e.status, StatusCode::UNAUTHORIZED, "{bad}");
            assert_eq!(e.code, Some("invalid_api_key"), "{bad}");
            assert!(!e.message.contains("0123456789abcde"), "{}", e.message);
        }
    }

    #[test]
    fn bad_files_are_refused_with_the_line() {
        let err = |text| ApiKeys::parse(text, "k").unwrap_err().to_string();
        assert!(err("# nothing\n").contains("holds no keys"));
        assert!(err("short alice\n").contains("k:1"));
        assert!(err("sk-mesh-0123456789abcdef a b\n").contains("more words"));
        let dup = err("sk-mesh-0123456789abcdef a\nsk-mesh-0123456789abcdeg a\n");
        assert!(dup.contains("k:2") && dup.contains("line 1"), "{dup}");
    }
}
