//! An OpenAI-compatible HTTP gateway to the mesh: `/v1/models`, `/v1/completions` and
//! `/v1/chat/completions`, streaming (SSE) and not, in OpenAI's wire format, so the
//! official SDKs work against the mesh unchanged.

use std::convert::Infallible;
use std::future::Future;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{ChatMessage, ClientError, MeshClient, SamplingParams};

/// Prompt text accepted at most, whatever the model: tokenizing text takes far more
/// memory than the text (1.9 MB of prompt took the gateway from 30 to 394 MB).
const MAX_PROMPT_BYTES: usize = 1 << 20;
/// Room in a body for JSON around the prompt (fields, quoting, escapes).
const BODY_OVERHEAD: usize = 64 << 10;

/// How large a request may be, fixed at start from the model.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// Prompt text (or all messages' content together) taken at most: what could fit
    /// the model's context if every token were the longest one, twice over for
    /// normalizers that shrink text, and never over [`MAX_PROMPT_BYTES`].
    prompt_bytes: usize,
    /// Request body taken at most: the prompt twice over (escapes) plus the JSON around it.
    body_bytes: usize,
}

impl Limits {
    fn of(client: &MeshClient) -> Self {
        let prompt_bytes = client
            .max_context()
            .saturating_mul(client.longest_token_bytes())
            .saturating_mul(2)
            .min(MAX_PROMPT_BYTES);
        Self {
            prompt_bytes,
            body_bytes: prompt_bytes.saturating_mul(2).saturating_add(BODY_OVERHEAD),
        }
    }
}

#[derive(Clone)]
struct Gateway {
    client: MeshClient,
    limits: Limits,
}

/// Serve the gateway on `listener` until `shutdown` resolves.
///
/// Sizes are checked before any work: a body over the limit is refused (413) on its
/// `Content-Length` before it is read, or once the limit is read when it has none, and
/// a prompt over the limit (400) before it is tokenized.
pub async fn serve(
    client: MeshClient,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = Limits::of(&client);
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .layer(middleware::from_fn_with_state(limits, refuse_large_bodies))
        .layer(DefaultBodyLimit::max(limits.body_bytes))
        .with_state(Gateway { client, limits });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Refuse a body that says it is over the limit before reading any of it (a client that
/// sent `Expect: 100-continue` never sends it).
async fn refuse_large_bodies(State(limits): State<Limits>, req: Request, next: Next) -> Response {
    let length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match length {
        Some(n) if n > limits.body_bytes as u64 => ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "request body of {n} bytes is over this gateway's limit of {} bytes",
                limits.body_bytes
            ),
            param: None,
            code: Some("request_too_large"),
        }
        .into_response(),
        _ => next.run(req).await,
    }
}

/// Refuse prompt text over the limit, before it is tokenized.
fn check_prompt_bytes(limits: Limits, bytes: usize, param: &'static str) -> Result<(), ApiError> {
    if bytes <= limits.prompt_bytes {
        return Ok(());
    }
    Err(ApiError {
        status: StatusCode::BAD_REQUEST,
        message: format!(
            "the prompt is {bytes} bytes, more than the model's context can take (at most {} bytes are accepted)",
            limits.prompt_bytes
        ),
        param: Some(param),
        code: Some("context_length_exceeded"),
    })
}

/// A refusal in OpenAI's form: `{"error": {"message", "type", "param", "code"}}`, so
/// the SDKs raise their typed errors with the message.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => {
                "invalid_request_error"
            }
            _ => "server_error",
        };
        let body = json!({"error": {
            "message": self.message, "type": kind, "param": self.param, "code": self.code,
        }});
        (self.status, Json(body)).into_response()
    }
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: Option<String>,
    prompt: String,
    #[serde(default)]
    stream: bool,
    #[serde(flatten)]
    sampling: OpenAiSampling,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(flatten)]
    sampling: OpenAiSampling,
}

/// OpenAI's sampling fields, with its defaults.
#[derive(Debug, Deserialize)]
struct OpenAiSampling {
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
}

impl OpenAiSampling {
    fn params(&self, default_max: usize) -> SamplingParams {
        SamplingParams {
            max_new_tokens: self
                .max_completion_tokens
                .or(self.max_tokens)
                .unwrap_or(default_max)
                .min(4096),
            temperature: self.temperature.unwrap_or(1.0),
            top_k: None,
            top_p: self.top_p,
            repetition_penalty: 1.0,
            seed: self.seed.unwrap_or(0),
            stop_tokens: Vec::new(),
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn error(status: StatusCode, e: &ClientError) -> Response {
    let body =
        json!({"error": {"message": e.to_string(), "type": "mesh_error", "code": status.as_u16()}});
    (status, Json(body)).into_response()
}

fn status_of(e: &ClientError) -> StatusCode {
    match e {
        ClientError::NoRoute(_) | ClientError::OverPrice { .. } => StatusCode::SERVICE_UNAVAILABLE,
        ClientError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        ClientError::ModelUnknown(_) => StatusCode::NOT_FOUND,
        ClientError::Model(_) | ClientError::ContextTooLong { .. } => StatusCode::BAD_REQUEST,
        _ => StatusCode::BAD_GATEWAY,
    }
}

async fn models(State(gw): State<Gateway>) -> Json<Value> {
    let client = &gw.client;
    Json(json!({
        "object": "list",
        "data": [{"id": client.model().as_str(), "object": "model", "created": 0, "owned_by": "mesh"}]
    }))
}

async fn completions(
    State(Gateway { client, limits }): State<Gateway>,
    Json(req): Json<CompletionRequest>,
) -> Response {
    if let Err(refused) = check_prompt_bytes(limits, req.prompt.len(), "prompt") {
        return refused.into_response();
    }
    let params = req.sampling.params(16);
    let model = req.model.unwrap_or_else(|| client.model().to_string());
    let ids = client.prompt_ids(&req.prompt);
    run(client, ids, params, model, req.stream, Kind::Text).await
}

async fn chat_completions(
    State(Gateway { client, limits }): State<Gateway>,
    Json(req): Json<ChatRequest>,
) -> Response {
    let bytes = req
        .messages
        .iter()
        .map(|m| m.content.len() + m.role.len())
        .sum();
    if let Err(refused) = check_prompt_bytes(limits, bytes, "messages") {
        return refused.into_response();
    }
    let params = req.sampling.params(256);
    let model = req.model.unwrap_or_else(|| client.model().to_string());
    // The same ids as `MeshClient::chat`: the model's chat template, with no doubled BOS.
    let ids = client.chat_ids(&req.messages);
    run(client, ids, params, model, req.stream, Kind::Chat).await
}

#[derive(Clone, Copy)]
enum Kind {
    Text,
    Chat,
}

async fn run(
    client: MeshClient,
    ids: Result<Vec<u32>, ClientError>,
    params: SamplingParams,
    model: String,
    stream: bool,
    kind: Kind,
) -> Response {
    let max = params.max_new_tokens;
    let ids = match ids {
        Ok(ids) => ids,
        Err(e) => return error(status_of(&e), &e),
    };
    let prompt_tokens = ids.len();
    let tokens = match client.generate_ids(ids, params).await {
        Ok(t) => t,
        Err(e) => return error(status_of(&e), &e),
    };
    let id = format!("mesh-{:x}", rand_id());
    let created = now();
    if stream {
        let (id2, model2) = (id.clone(), model.clone());
        let body = tokens
            .map(move |t| match t {
                Ok(t) => Ok::<_, Infallible>(
                    Event::default()
                        .data(chunk(kind, &id, &model, created, Some(&t.text), None).to_string()),
                ),
                Err(e) => {
                    Ok(Event::default()
                        .data(json!({"error": {"message": e.to_string()}}).to_string()))
                }
            })
            .chain(futures::stream::iter([
                // OpenAI ends with a chunk that carries only the finish reason, then [DONE].
                Ok(Event::default()
                    .data(chunk(kind, &id2, &model2, created, None, Some("stop")).to_string())),
                Ok(Event::default().data("[DONE]")),
            ]));
        return Sse::new(body).into_response();
    }
    let mut text = String::new();
    let mut count = 0;
    let mut tokens = tokens;
    while let Some(t) = tokens.next().await {
        match t {
            Ok(t) => {
                text.push_str(&t.text);
                count += 1;
            }
            Err(e) => return error(status_of(&e), &e),
        }
    }
    let finish = if count >= max { "length" } else { "stop" };
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": count, "total_tokens": prompt_tokens + count});
    let body = match kind {
        Kind::Text => json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": null}],
            "usage": usage,
        }),
        Kind::Chat => json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": usage,
        }),
    };
    Json(body).into_response()
}

fn chunk(
    kind: Kind,
    id: &str,
    model: &str,
    created: u64,
    text: Option<&str>,
    finish: Option<&str>,
) -> Value {
    match kind {
        Kind::Text => json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": null}],
        }),
        Kind::Chat => {
            let delta = match text {
                Some(t) => json!({"role": "assistant", "content": t}),
                None => json!({}),
            };
            json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            })
        }
    }
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now());
    h.finish()
}
