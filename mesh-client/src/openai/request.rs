//! Requests as OpenAI's API defines them, checked as strictly as OpenAI checks them before
//! any work, and refusals in OpenAI's error form.

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use crate::{ChatMessage, ClientError, SamplingParams};
use mesh_core::ModelId;

/// Tokens generated at most per request, whatever it asks for.
const MAX_NEW_TOKENS: usize = 4096;
/// The roles OpenAI's chat API takes.
const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// A refusal in OpenAI's form, `{"error": {"message", "type", "param", "code"}}`, so the
/// SDKs raise their typed errors (`NotFoundError`, `BadRequestError`) with the message.
#[derive(Debug)]
pub(super) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(param: &'static str, message: String) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message,
            param: Some(param),
            code: None,
        }
    }

    /// OpenAI's `type`: a rate limit, the caller's mistake, or ours.
    fn kind(&self) -> &'static str {
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            "requests"
        } else if self.status.is_client_error() {
            "invalid_request_error"
        } else {
            "server_error"
        }
    }

    /// The error object alone, as a stream's last event carries it.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message, "type": self.kind(), "param": self.param, "code": self.code,
        }})
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        let (status, code) = match &e {
            ClientError::NoRoute(_) | ClientError::OverPrice { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, None)
            }
            ClientError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, None),
            ClientError::ModelUnknown(_) => (StatusCode::NOT_FOUND, Some("model_not_found")),
            ClientError::ContextTooLong { .. } => {
                (StatusCode::BAD_REQUEST, Some("context_length_exceeded"))
            }
            ClientError::Model(_) => (StatusCode::BAD_REQUEST, None),
            _ => (StatusCode::BAD_GATEWAY, None),
        };
        Self {
            status,
            message: e.to_string(),
            param: None,
            code,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// `Json`, with a body that is not valid JSON for the request (or too large) refused in
/// OpenAI's form (400, or 413) instead of axum's plain text.
pub(super) struct OpenAiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OpenAiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError {
                status: match rejection.status() {
                    StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
                    _ => StatusCode::BAD_REQUEST,
                },
                message: rejection.body_text(),
                param: None,
                code: None,
            }),
        }
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct StreamOptions {
    /// Send a last chunk with the usage and no choices, before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub(super) struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: String,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    pub sampling: OpenAiSampling,
}

#[derive(Debug, Deserialize)]
pub(super) struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    pub sampling: OpenAiSampling,
}

/// OpenAI's sampling fields, with its defaults and ranges.
#[derive(Debug, Deserialize)]
pub(super) struct OpenAiSampling {
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    /// f64, so that an out-of-range number such as 1e39 is seen as such, not as infinity.
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<u64>,
}

impl OpenAiSampling {
    /// OpenAI's ranges: temperature in [0, 2], top_p in (0, 1], at least one token.
    pub fn check(&self) -> Result<(), ApiError> {
        if let Some(t) = self.temperature.filter(|t| !(0.0..=2.0).contains(t)) {
            return Err(ApiError::bad_request(
                "temperature",
                format!("{t} is not a valid temperature: it must be between 0 and 2"),
            ));
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return Err(ApiError::bad_request(
                "top_p",
                format!("{p} is not a valid top_p: it must be above 0 and at most 1"),
            ));
        }
        if self.max_completion_tokens.or(self.max_tokens) == Some(0) {
            return Err(ApiError::bad_request(
                "max_tokens",
                "max_tokens must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The sampler's parameters. Without a seed each request draws a fresh one, as the API
    /// samples afresh; a seed repeats its text.
    pub fn params(&self, default_max: usize) -> SamplingParams {
        SamplingParams {
            max_new_tokens: self
                .max_completion_tokens
                .or(self.max_tokens)
                .unwrap_or(default_max)
                .min(MAX_NEW_TOKENS),
            temperature: self.temperature.unwrap_or(1.0) as f32,
            top_k: None,
            top_p: self.top_p.map(|p| p as f32),
            repetition_penalty: 1.0,
            seed: self.seed.unwrap_or_else(rand::random),
            stop_tokens: Vec::new(),
        }
    }
}

/// The model a request names must be the one served (404 `model_not_found` otherwise, as
/// OpenAI answers); a request that names none gets it.
pub(super) fn check_model(requested: Option<&str>, served: &ModelId) -> Result<String, ApiError> {
    match requested {
        None => Ok(served.to_string()),
        Some(m) if m == served.as_str() => Ok(m.to_string()),
        Some(m) => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{m}` does not exist or you do not have access to it."),
            param: Some("model"),
            code: Some("model_not_found"),
        }),
    }
}

/// At least one message, each with one of OpenAI's roles.
pub(super) fn check_messages(messages: &[ChatMessage]) -> Result<(), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request(
            "messages",
            "messages must hold at least one message".into(),
        ));
    }
    if let Some((i, m)) = messages
        .iter()
        .enumerate()
        .find(|(_, m)| !ROLES.contains(&m.role.as_str()))
    {
        return Err(ApiError::bad_request(
            "messages",
            format!(
                "messages[{i}].role is {:?}; it must be one of {}",
                m.role,
                ROLES.join(", ")
            ),
        ));
    }
    Ok(())
}
