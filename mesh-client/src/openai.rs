//! An OpenAI-compatible HTTP gateway to the mesh: `/v1/models`, `/v1/completions` and
//! `/v1/chat/completions`, streaming (SSE) and not, in OpenAI's wire format, so the
//! official SDKs work against the mesh unchanged.
//!
//! Shared, it takes API keys ([`ApiKeys`]: 401 without a known one), limits each key's
//! requests ([`RateLimit`]: 429 with `Retry-After`), and keeps each key's tokens and cost
//! (`/v1/usage`). Every answer's `usage` carries its `cost`: the micro-units the gateway's
//! client countersigned for it. Every response echoes `X-Request-Id` (made when absent).

mod account;
mod keys;
mod request;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::{MeshClient, SamplingParams, TokenStream};
use account::{Accounts, Answer};
pub use account::{RateLimit, Usage};
pub use keys::{ApiKeys, KeyFileError};
use request::{check_messages, check_model, ApiError, ChatRequest, CompletionRequest, OpenAiJson};

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

/// Who may use a gateway and how much.
#[derive(Clone, Debug, Default)]
pub struct GatewayConfig {
    /// Keys accepted; `None` serves everyone (a gateway kept on loopback).
    pub keys: Option<ApiKeys>,
    /// Requests each key may make; `None` for no limit. Applies to keys only.
    pub rate_limit: Option<RateLimit>,
}

#[derive(Clone)]
struct Gateway {
    client: MeshClient,
    limits: Limits,
    keys: Option<Arc<ApiKeys>>,
    accounts: Arc<Accounts>,
}

/// The key name a request is billed to, set by [`authorize`].
#[derive(Clone)]
struct Caller(String);

/// The request's `X-Request-Id`, set by [`request_id`], for the log line of its answer.
#[derive(Clone)]
struct RequestId(String);

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Serve an open gateway (no keys, no limits) on `listener` until `shutdown` resolves.
pub async fn serve(
    client: MeshClient,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(client, listener, GatewayConfig::default(), shutdown).await
}

/// Serve the gateway on `listener` until `shutdown` resolves, with `config`'s keys and
/// rate limit.
///
/// Sizes are checked before any work: a body over the limit is refused (413) on its
/// `Content-Length` before it is read, or once the limit is read when it has none, and
/// a prompt over the limit (400) before it is tokenized. Keys are checked before sizes.
pub async fn serve_with(
    client: MeshClient,
    listener: tokio::net::TcpListener,
    config: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = Limits::of(&client);
    let accounts = match &config.keys {
        Some(keys) => Accounts::new(keys.names(), config.rate_limit),
        None => Accounts::new([keys::ANONYMOUS], None),
    };
    let gateway = Gateway {
        client,
        limits,
        keys: config.keys.map(Arc::new),
        accounts: Arc::new(accounts),
    };
    // Layers run outside in: the request id, then the key and rate limit, then sizes.
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/usage", get(usage_of))
        .layer(middleware::from_fn_with_state(limits, refuse_large_bodies))
        .layer(DefaultBodyLimit::max(limits.body_bytes))
        .layer(middleware::from_fn_with_state(gateway.clone(), authorize))
        .layer(middleware::from_fn(request_id))
        .with_state(gateway);
    // Header and body timeouts, connection caps: slow clients cannot hold the gateway.
    mesh_core::http::bounded::serve(
        listener,
        app,
        mesh_core::http::HttpLimits::default(),
        shutdown,
    )
    .await
}

/// Echo the caller's `X-Request-Id` (visible ASCII, at most 128 bytes), or make one, on
/// every response, errors included, so a caller and the operator can name one request.
async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(
            || format!("req_{:032x}", rand::random::<u128>()),
            str::to_string,
        );
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(req).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// Who is calling (401 for a missing or unknown key when the gateway has keys), and, for
/// requests that run the mesh, one request from their bucket (429 with `Retry-After`).
async fn authorize(State(gw): State<Gateway>, mut req: Request, next: Next) -> Response {
    let caller = match &gw.keys {
        Some(keys) => match keys.caller(req.headers()) {
            Ok(name) => name,
            Err(e) => return e.into_response(),
        },
        None => keys::ANONYMOUS.to_string(),
    };
    let generates = req.uri().path().ends_with("completions");
    if generates {
        if let Err((e, retry_after)) = gw.accounts.admit(&caller, Instant::now()) {
            let mut response = e.into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            return response;
        }
    }
    req.extensions_mut().insert(Caller(caller));
    next.run(req).await
}

/// The calling key's usage so far: requests, tokens, and the cost in micro-units.
async fn usage_of(
    State(gw): State<Gateway>,
    Extension(Caller(caller)): Extension<Caller>,
) -> Json<Value> {
    let u = gw.accounts.usage(&caller);
    Json(json!({
        "object": "usage",
        "key": caller,
        "requests": u.requests,
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "cost": u.cost,
        "cost_unit": "micro-units",
    }))
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

async fn models(State(gw): State<Gateway>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": gw.client.model().as_str(), "object": "model", "created": 0, "owned_by": "mesh"}]
    }))
}

async fn completions(
    State(gw): State<Gateway>,
    Extension(Caller(caller)): Extension<Caller>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    OpenAiJson(req): OpenAiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let (client, limits) = (&gw.client, gw.limits);
    let model = check_model(req.model.as_deref(), client.model())?;
    req.sampling.check()?;
    check_prompt_bytes(limits, req.prompt.len(), "prompt")?;
    let ids = client.prompt_ids(&req.prompt)?;
    let reply = Reply {
        kind: Kind::Text,
        model,
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
    };
    let account = Account {
        accounts: gw.accounts.clone(),
        caller,
        request_id,
    };
    run(client, ids, req.sampling.params(16), reply, account).await
}

async fn chat_completions(
    State(gw): State<Gateway>,
    Extension(Caller(caller)): Extension<Caller>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    OpenAiJson(req): OpenAiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let (client, limits) = (&gw.client, gw.limits);
    let model = check_model(req.model.as_deref(), client.model())?;
    req.sampling.check()?;
    check_messages(&req.messages)?;
    let bytes = req
        .messages
        .iter()
        .map(|m| m.content.len() + m.role.len())
        .sum();
    check_prompt_bytes(limits, bytes, "messages")?;
    // The same ids as `MeshClient::chat`: the model's chat template, with no doubled BOS.
    let ids = client.chat_ids(&req.messages)?;
    let reply = Reply {
        kind: Kind::Chat,
        model,
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
    };
    let account = Account {
        accounts: gw.accounts.clone(),
        caller,
        request_id,
    };
    run(client, ids, req.sampling.params(256), reply, account).await
}

#[derive(Clone, Copy)]
enum Kind {
    Text,
    Chat,
}

/// How to answer: which API's shapes, for which model name, streamed or not.
struct Reply {
    kind: Kind,
    model: String,
    stream: bool,
    include_usage: bool,
}

/// Why generation ended, in OpenAI's words, the same streamed or not: `length` when it
/// made every token asked for or filled the model's context, `stop` on a stop token.
fn finish_reason(
    count: usize,
    max: usize,
    prompt_tokens: usize,
    max_context: usize,
) -> &'static str {
    if count >= max || prompt_tokens + count >= max_context {
        "length"
    } else {
        "stop"
    }
}

/// OpenAI's usage object, with the answer's `cost` in micro-units.
fn usage(answer: &Answer) -> Value {
    let (p, c) = (answer.prompt_tokens, answer.completion_tokens);
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c, "cost": answer.cost})
}

/// Where an answer's usage is kept: the caller's account.
struct Account {
    accounts: Arc<Accounts>,
    caller: String,
    request_id: String,
}

impl Account {
    /// The answer's tokens and cost (what was countersigned for it, once `tokens` ended),
    /// added to the caller's usage.
    fn record(&self, tokens: &TokenStream, prompt_tokens: usize, count: usize) -> Answer {
        let answer = Answer {
            prompt_tokens,
            completion_tokens: count,
            cost: tokens.report().map_or(0, |r| r.countersigned),
        };
        self.accounts.record(&self.caller, answer);
        tracing::info!(
            request_id = %self.request_id,
            caller = %self.caller,
            prompt_tokens,
            completion_tokens = count,
            cost = answer.cost,
            "answered"
        );
        answer
    }
}

async fn run(
    client: &MeshClient,
    ids: Vec<u32>,
    params: SamplingParams,
    reply: Reply,
    account: Account,
) -> Result<Response, ApiError> {
    let max = params.max_new_tokens;
    let prompt_tokens = ids.len();
    let max_context = client.max_context();
    let mut tokens = client.generate_ids(ids, params).await?;
    let meta = Meta {
        kind: reply.kind,
        id: format!("mesh-{:x}", rand::random::<u64>()),
        model: reply.model,
        created: now(),
    };
    let finish = move |count| finish_reason(count, max, prompt_tokens, max_context);
    if reply.stream {
        let state = Streaming {
            tokens: Some(tokens),
            count: 0,
            phase: Phase::Tokens,
            meta,
            include_usage: reply.include_usage,
            prompt_tokens,
            account,
            answer: None,
        };
        let events = futures::stream::unfold(state, move |st| next_event(st, finish));
        return Ok(Sse::new(events).into_response());
    }
    let mut text = String::new();
    let mut count = 0;
    while let Some(t) = tokens.next().await {
        match t {
            Ok(t) => text.push_str(&t.text),
            Err(e) => {
                // Paid for all the same.
                account.record(&tokens, prompt_tokens, count);
                return Err(e.into());
            }
        }
        count += 1;
    }
    let answer = account.record(&tokens, prompt_tokens, count);
    let (finish, usage) = (finish(count), usage(&answer));
    let Meta {
        id, model, created, ..
    } = meta;
    let body = match meta.kind {
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
    Ok(Json(body).into_response())
}

/// What every chunk of one answer repeats.
struct Meta {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
}

/// Where a stream is: tokens, then the finish chunk, the usage chunk if asked for, and
/// `[DONE]`; or, after an error, nothing more.
enum Phase {
    Tokens,
    Usage,
    Done,
    End,
}

struct Streaming {
    /// `None` once the stream ended and its answer was recorded.
    tokens: Option<TokenStream>,
    count: usize,
    phase: Phase,
    meta: Meta,
    include_usage: bool,
    prompt_tokens: usize,
    account: Account,
    /// The answer's usage, once the tokens ended.
    answer: Option<Answer>,
}

impl Streaming {
    /// Record the answer once its tokens ended (every hop closed, its cost final).
    fn ended(&mut self) -> Answer {
        let answer = match self.tokens.take() {
            Some(tokens) => self.account.record(&tokens, self.prompt_tokens, self.count),
            None => Answer {
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.count,
                cost: 0,
            },
        };
        self.answer = Some(answer);
        answer
    }
}

impl Drop for Streaming {
    /// A caller that hung up mid-stream is billed too: the generation is stopped, and its
    /// cost recorded once every hop closed.
    fn drop(&mut self) {
        let (Some(tokens), Ok(runtime)) =
            (self.tokens.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let (accounts, caller) = (self.account.accounts.clone(), self.account.caller.clone());
        let request_id = self.account.request_id.clone();
        let (prompt_tokens, completion_tokens) = (self.prompt_tokens, self.count);
        runtime.spawn(async move {
            let report = tokens.finish().await;
            let answer = Answer {
                prompt_tokens,
                completion_tokens,
                cost: report.countersigned,
            };
            accounts.record(&caller, answer);
            tracing::info!(request_id = %request_id, caller = %caller, completion_tokens, cost = answer.cost, "caller hung up mid-stream; billed what was countersigned");
        });
    }
}

async fn next_event(
    mut st: Streaming,
    finish: impl Fn(usize) -> &'static str,
) -> Option<(Result<Event, Infallible>, Streaming)> {
    let data = match st.phase {
        Phase::Tokens => match st.tokens.as_mut()?.next().await {
            Some(Ok(t)) => {
                st.count += 1;
                chunk(&st.meta, Some(&t.text), None).to_string()
            }
            // As OpenAI does: the error as the last event. No finish reason and no [DONE]
            // follow, so no client takes a cut-short answer for a whole one.
            Some(Err(e)) => {
                st.phase = Phase::End;
                st.ended();
                ApiError::from(e).body().to_string()
            }
            None => {
                let answer = st.ended();
                let mut last = chunk(&st.meta, None, Some(finish(st.count)));
                if st.include_usage {
                    st.phase = Phase::Usage;
                } else {
                    // The final chunk carries the answer's usage and cost.
                    st.phase = Phase::Done;
                    last["usage"] = usage(&answer);
                }
                last.to_string()
            }
        },
        Phase::Usage => {
            st.phase = Phase::Done;
            let mut last = chunk(&st.meta, None, None);
            last["choices"] = json!([]);
            if let Some(answer) = &st.answer {
                last["usage"] = usage(answer);
            }
            last.to_string()
        }
        Phase::Done => {
            st.phase = Phase::End;
            "[DONE]".to_string()
        }
        Phase::End => return None,
    };
    Some((Ok(Event::default().data(data)), st))
}

fn chunk(meta: &Meta, text: Option<&str>, finish: Option<&str>) -> Value {
    let Meta {
        kind,
        id,
        model,
        created,
    } = meta;
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

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
