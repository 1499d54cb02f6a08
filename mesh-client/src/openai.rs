//! An OpenAI-compatible HTTP gateway to the mesh: `/v1/models`, `/v1/completions` and
//! `/v1/chat/completions`, streaming (SSE) and not, in OpenAI's wire format, so the
//! official SDKs work against the mesh unchanged.

use std::convert::Infallible;
use std::future::Future;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{ChatMessage, ClientError, MeshClient, SamplingParams};

/// Serve the gateway on `listener` until `shutdown` resolves.
pub async fn serve(
    client: MeshClient,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .with_state(client);
    // Header and body timeouts, connection caps: slow clients cannot hold the gateway.
    mesh_core::http::bounded::serve(
        listener,
        app,
        mesh_core::http::HttpLimits::default(),
        shutdown,
    )
    .await
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
        ClientError::Model(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::BAD_GATEWAY,
    }
}

async fn models(State(client): State<MeshClient>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": client.model().as_str(), "object": "model", "created": 0, "owned_by": "mesh"}]
    }))
}

async fn completions(
    State(client): State<MeshClient>,
    Json(req): Json<CompletionRequest>,
) -> Response {
    let params = req.sampling.params(16);
    let model = req.model.unwrap_or_else(|| client.model().to_string());
    let ids = client.prompt_ids(&req.prompt);
    run(client, ids, params, model, req.stream, Kind::Text).await
}

async fn chat_completions(
    State(client): State<MeshClient>,
    Json(req): Json<ChatRequest>,
) -> Response {
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
