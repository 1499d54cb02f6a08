//! # mesh-client
//!
//! Use the mesh from Rust: join through a bootstrap, find the servers of a model, and
//! stream generated tokens. The client holds the model's embeddings and LM head (a local
//! model directory) and the servers run the blocks.
//!
//! ```no_run
//! # async fn demo() -> Result<(), mesh_client::ClientError> {
//! use futures::StreamExt;
//! use mesh_client::{MeshClient, SamplingParams};
//!
//! let client = MeshClient::builder()
//!     .bootstrap(["/ip4/127.0.0.1/tcp/31337/p2p/12D3KooW...".parse().unwrap()])
//!     .model("tiny-llama-mesh")
//!     .build()
//!     .await?;
//! let mut tokens = client.generate("Once upon a time", SamplingParams::greedy(32)).await?;
//! while let Some(token) = tokens.next().await {
//!     print!("{}", token?.text);
//! }
//! // The stream ended, so every hop closed with its final receipt: the cost is the sum of
//! // what this client countersigned.
//! if let Some(report) = tokens.report() {
//!     println!("\ncost: {}", report.countersigned);
//! }
//! # Ok(()) }
//! ```

pub mod demo;
pub mod openai;
mod stream;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::identity::Identity;
use mesh_core::ledger::{ConfigHash, Evidence, Reputation, SignedReceipt, Store};
use mesh_core::model::{
    builtin::{self, Builtin},
    chat, ChatTemplate, ClientHead, DeviceSpec, Generation, MeshTokenizer, ModelError, ModelFiles,
    TextStream,
};
use mesh_core::p2p::{self, Multiaddr, P2pConfig, Role};
use mesh_core::pipeline::session::SessionContext;
use mesh_core::pipeline::{
    self, ClientLedger, DraftModel, LocalBlocks, LocalReference, PipelineError, RemoteSession,
    SessionConfig, VerifyConfig,
};
use mesh_core::{BlockRange, ModelId, ServerInfo};
use tokio::sync::mpsc;

pub use mesh_core::model::{ChatMessage, FinishReason, SamplingParams};
pub use mesh_core::pipeline::{HopChecks, SessionReport, SpeculationStats};
pub use stream::{Token, TokenStream};

/// Attempts to open a route before giving up (the first try plus retries).
const OPEN_ATTEMPTS: u32 = 3;
/// Tokens buffered between the generation task and a slow reader.
const TOKEN_QUEUE: usize = 32;

/// What can go wrong for a caller.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No live servers cover every block of the model (within the price limit).
    #[error("no route: {0}")]
    NoRoute(String),
    /// Servers cover the model, but only at prices over the ceiling (`max_price`, or
    /// `max_price_ratio` times the median of a span's servers); the message names them.
    #[error("over price: {0}")]
    OverPrice(String),
    /// No server of the model takes a session as long as the prompt plus the max tokens;
    /// `longest` is the most any offered. Shorten the request: no server is to blame.
    #[error("no server takes {requested} positions (prompt + max tokens); the longest offered is {longest}: shorten the prompt or the max tokens")]
    ContextTooLong { requested: u32, longest: u32 },
    /// A server or the discovery did not answer in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// None of the bootstrap peers answered (or none was given): the client is alone and
    /// would only wait for servers it cannot find.
    #[error(
        "no bootstrap reachable: {0} (is mesh-bootstrap running there, with this peer id, \
         and the port open?)"
    )]
    NoBootstrap(String),
    /// The model is not known locally (no directory) or not served on the mesh.
    #[error("model unknown: {0}")]
    ModelUnknown(String),
    /// The mesh failed mid-generation in a way fail-over could not fix.
    #[error(transparent)]
    Pipeline(PipelineError),
    /// The local receipt ledger could not be opened or used.
    #[error("ledger: {0}")]
    Ledger(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    P2p(#[from] p2p::P2pError),
}

impl From<PipelineError> for ClientError {
    fn from(e: PipelineError) -> Self {
        match e {
            PipelineError::NoRoute { .. } => ClientError::NoRoute(e.to_string()),
            PipelineError::OverPrice { .. } => ClientError::OverPrice(e.to_string()),
            PipelineError::Timeout { .. } => ClientError::Timeout(e.to_string()),
            PipelineError::ContextTooLong {
                requested, longest, ..
            } => ClientError::ContextTooLong { requested, longest },
            other => ClientError::Pipeline(other),
        }
    }
}

/// Builds a [`MeshClient`].
#[derive(Debug, Default)]
pub struct MeshClientBuilder {
    bootstrap: Vec<Multiaddr>,
    model: Option<String>,
    model_dir: Option<PathBuf>,
    max_price: Option<u64>,
    discovery_timeout: Option<Duration>,
    session: SessionConfig,
    ledger_dir: Option<PathBuf>,
    verify_locally: bool,
    fallback_local: bool,
    device: DeviceSpec,
    draft_model_dir: Option<PathBuf>,
    draft_tokens: Option<usize>,
}

/// Draft tokens proposed per step at first ([`MeshClientBuilder::draft_tokens`]).
pub const DEFAULT_DRAFT_TOKENS: usize = 4;

impl MeshClientBuilder {
    /// Peers to join through (bootstraps or any mesh peer), with `/p2p/<id>`.
    pub fn bootstrap(mut self, addrs: impl IntoIterator<Item = Multiaddr>) -> Self {
        self.bootstrap.extend(addrs);
        self
    }

    /// The model to use (default: the built-in model `model_dir` holds, else mesh-demo).
    pub fn model(mut self, id: impl Into<String>) -> Self {
        self.model = Some(id.into());
        self
    }

    /// Local directory with the model's config, weights (for the head) and tokenizer.
    pub fn model_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.model_dir = Some(dir.into());
        self
    }

    /// Never use servers that charge more than this (micro-units per token per block).
    pub fn max_price(mut self, price: u64) -> Self {
        self.max_price = Some(price);
        self
    }

    /// Never use a server that asks more than `ratio` times the median price of the
    /// servers of its blocks (default [`pipeline::DEFAULT_MAX_PRICE_RATIO`]); `None` lifts
    /// this ceiling, leaving only [`MeshClientBuilder::max_price`].
    pub fn max_price_ratio(mut self, ratio: Option<f64>) -> Self {
        self.session.policy.max_price_ratio = ratio;
        self
    }

    /// Whether servers with quantized weights (q8_0, q4k, GGUF) may serve this client's
    /// routes, mixed with full-precision ones (default: yes). Off, only full-precision
    /// servers are used, so results are those of the unquantized model.
    pub fn allow_quantized(mut self, allow: bool) -> Self {
        self.session.policy.allow_quantized = allow;
        self
    }

    /// How long to wait for servers covering every block (default 30 s).
    pub fn discovery_timeout(mut self, timeout: Duration) -> Self {
        self.discovery_timeout = Some(timeout);
        self
    }

    /// Keep a ledger here: the client's identity key (`client.key`) and a receipt store;
    /// servers' receipts are then checked against what was sent and countersigned.
    pub fn ledger_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.ledger_dir = Some(dir.into());
        self
    }

    /// Per-step timeout, fail-over budget, session length.
    pub fn session_config(mut self, cfg: SessionConfig) -> Self {
        self.session = cfg;
        self
    }

    /// Whether servers push each step's output straight on to the next server (default
    /// on); off, every output comes back through this client ([`SessionConfig::push`]).
    pub fn push(mut self, on: bool) -> Self {
        self.session.push = on;
        self
    }

    /// Re-check this fraction of every hop's steps against a second opinion (default 0:
    /// off). See [`mesh_core::pipeline::verify`] for what it costs.
    pub fn verify(mut self, cfg: VerifyConfig) -> Self {
        self.session.verify = cfg;
        self
    }

    /// Give second opinions from this client's own copy of the blocks (the model
    /// directory must hold every block's weights) instead of from other servers.
    pub fn verify_locally(mut self, yes: bool) -> Self {
        self.verify_locally = yes;
        self
    }

    /// When no server covers some blocks within the discovery window, run them on this
    /// client from the model directory's weights (default: off; `--fallback local`), and
    /// go back to servers of them as soon as they appear. Tokens made so show the local
    /// hop in their route ([`mesh_core::pipeline::Hop::local`]).
    pub fn fallback_local(mut self, yes: bool) -> Self {
        self.fallback_local = yes;
        self
    }

    /// Speculative decoding: the small model in `dir` (same tokenizer) runs here and
    /// proposes tokens; one step through the mesh checks several of them. The output is
    /// the same as without it; only the round trips per token change.
    pub fn draft_model_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.draft_model_dir = Some(dir.into());
        self
    }

    /// Draft tokens proposed per step at first (default [`DEFAULT_DRAFT_TOKENS`]); raised
    /// while the target takes them all, lowered when it takes fewer than half.
    pub fn draft_tokens(mut self, k: usize) -> Self {
        self.draft_tokens = Some(k);
        self
    }

    /// Where the embeddings and LM head compute (default: the CPU). A GPU that cannot be
    /// used falls back to the CPU with a warning.
    pub fn device(mut self, device: DeviceSpec) -> Self {
        self.device = device;
        self
    }

    /// Join the mesh and load the model's head and tokenizer.
    pub async fn build(mut self) -> Result<MeshClient, ClientError> {
        // Unnamed: the built-in model the directory holds, else the default one.
        let model = ModelId::new(self.model.unwrap_or_else(|| {
            let of_dir = self.model_dir.as_deref().and_then(Builtin::of_dir);
            of_dir.unwrap_or(builtin::DEFAULT).id().into()
        }));
        let dir = match (self.model_dir, Builtin::named(model.as_str())) {
            (Some(dir), _) => dir,
            (None, Some(b)) => b.ensure()?,
            (None, None) => {
                return Err(ClientError::ModelUnknown(format!(
                    "{model}: give the model directory (its embeddings, LM head and tokenizer run here)"
                )))
            }
        };
        let files = ModelFiles::open(&dir)?;
        let device = mesh_core::model::device::select(self.device);
        if device.fell_back {
            tracing::warn!("client head: {}", device.description);
        }
        let head = ClientHead::load(&files, candle_core::DType::F32, &device.device)?;
        let tokenizer = match files.tokenizer()? {
            Some(t) => t,
            // No tokenizer at all: the error names the tokenizer.json that was looked for.
            None => MeshTokenizer::from_file(&files.tokenizer_path())?,
        };
        let chat_template = files.chat_template()?;
        let draft = match &self.draft_model_dir {
            Some(d) => Some(Arc::new(DraftModel::load(d, files.config.vocab_size)?)),
            None => None,
        };
        let mut eos = files.config.eos_tokens();
        // Instruct models end a turn with the tokenizer's EOS (Llama 3's <|eot_id|>), which
        // config.json does not always list.
        if let Some(id) = chat_template
            .as_ref()
            .and_then(|t| t.eos_token())
            .and_then(|t| tokenizer.token_id(t))
        {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        self.session.policy.max_price = self.max_price;
        let (identity, ledger) = match &self.ledger_dir {
            Some(dir) => {
                let identity = Identity::load_or_create(&dir.join("client.key"))
                    .map_err(|e| ClientError::Ledger(e.to_string()))?;
                let store = Store::open(&dir.join("receipts"))
                    .map_err(|e| ClientError::Ledger(e.to_string()))?;
                let ledger = ClientLedger {
                    store,
                    key: identity.signing_key(),
                    config_hash: ConfigHash::of(&files.config)
                        .map_err(|e| ClientError::Ledger(e.to_string()))?,
                };
                (identity, Some(ledger))
            }
            None => (Identity::generate(), None),
        };
        let fallback = if self.fallback_local {
            let local = LocalBlocks::open(&dir)?;
            if local.held().is_empty() {
                tracing::warn!(
                    "--fallback local: {} holds no block weights, so no blocks can run here",
                    dir.display()
                );
            }
            Some(Arc::new(local))
        } else {
            None
        };
        let context = SessionContext {
            fallback,
            reputation: match &ledger {
                Some(l) => Reputation::persistent(l.store.clone()),
                None => Reputation::in_memory(),
            },
            ledger,
            reference: self
                .verify_locally
                .then(|| Arc::new(std::sync::Mutex::new(LocalReference::new(dir.clone())))),
        };
        if self.bootstrap.is_empty() {
            return Err(ClientError::NoBootstrap("none given (--bootstrap)".into()));
        }
        let mut cfg = P2pConfig::new(identity, Role::Client);
        cfg.bootstrap = self.bootstrap;
        let all_bootstraps = cfg.bootstrap.len();
        let peer = p2p::spawn(cfg).await?;
        if peer.unreachable_bootstraps.len() == all_bootstraps {
            let addrs = peer.unreachable_bootstraps.iter().map(ToString::to_string);
            let addrs = addrs.collect::<Vec<_>>().join(", ");
            let _ = peer.client.shutdown().await;
            return Err(ClientError::NoBootstrap(addrs));
        }
        let client = MeshClient {
            inner: Arc::new(Inner {
                p2p: peer.client,
                model,
                num_blocks: files.config.num_blocks(),
                max_context: files.config.max_position_embeddings,
                eos,
                head,
                tokenizer,
                chat_template,
                session: self.session,
                context,
                draft,
                draft_tokens: self.draft_tokens.unwrap_or(DEFAULT_DRAFT_TOKENS),
            }),
        };
        client
            .wait_for_servers(self.discovery_timeout.unwrap_or(Duration::from_secs(30)))
            .await?;
        Ok(client)
    }
}

struct Inner {
    p2p: p2p::Client,
    model: ModelId,
    num_blocks: u32,
    max_context: usize,
    eos: Vec<u32>,
    head: ClientHead,
    tokenizer: MeshTokenizer,
    /// The model's chat template (`tokenizer_config.json`), if it has one.
    chat_template: Option<ChatTemplate>,
    session: SessionConfig,
    /// Ledger, reputation and local reference shared by every session.
    context: SessionContext,
    /// Speculative decoding's draft model, and the tokens it proposes per step at first.
    draft: Option<Arc<DraftModel>>,
    draft_tokens: usize,
}

/// Why the mesh cannot serve the model: the blocks no server covers, the servers seen, and
/// what would fix it.
fn gap_message(
    model: &ModelId,
    missing: &[BlockRange],
    seen: &[(p2p::PeerId, BlockRange)],
    fallback: bool,
) -> String {
    let blocks: Vec<String> = missing.iter().map(ToString::to_string).collect();
    let servers: Vec<String> = seen
        .iter()
        .map(|(peer, span)| format!("{peer} (blocks {span})"))
        .collect();
    let fix = if fallback {
        "the local model directory holds no weights for them either"
    } else {
        "hold their weights in the model directory and use --fallback local, or wait for servers of them"
    };
    format!(
        "no server of {model} covers blocks {}; {} servers seen: {}; {fix}",
        blocks.join(", "),
        seen.len(),
        servers.join(", ")
    )
}

/// A handle to the mesh for one model; cheap to clone.
#[derive(Clone)]
pub struct MeshClient {
    inner: Arc<Inner>,
}

impl MeshClient {
    pub fn builder() -> MeshClientBuilder {
        MeshClientBuilder::default()
    }

    pub fn model(&self) -> &ModelId {
        &self.inner.model
    }

    /// The live servers of the model, as heard in heartbeats.
    pub async fn nodes(&self) -> Result<Vec<ServerInfo>, ClientError> {
        Ok(self.inner.p2p.live_servers(&self.inner.model).await?)
    }

    /// The servers heard in heartbeats once they cover every block, or after `timeout`
    /// with those heard by then: a list of who is serving now, for people (`mesh-client
    /// nodes`). Joining routes from DHT records at once and does not wait for this.
    pub async fn nodes_when_heard(
        &self,
        timeout: Duration,
    ) -> Result<Vec<ServerInfo>, ClientError> {
        let i = &self.inner;
        match pipeline::wait_for_heard_coverage(&i.p2p, &i.model, i.num_blocks, timeout).await {
            Ok(heard) => Ok(heard),
            Err(PipelineError::NoRoute { .. }) => self.nodes().await,
            Err(e) => Err(e.into()),
        }
    }

    /// Wait until the servers known cover every block (or, with the local fallback, every
    /// block this client does not hold), for up to `timeout`; otherwise an error naming
    /// the blocks no server covers and the servers seen.
    async fn wait_for_servers(&self, timeout: Duration) -> Result<(), ClientError> {
        let i = &self.inner;
        match pipeline::wait_for_coverage(&i.p2p, &i.model, i.num_blocks, timeout).await {
            Ok(_) => Ok(()),
            Err(PipelineError::NoRoute { missing, seen, .. }) => {
                let held = i.context.fallback.as_ref().map_or(&[][..], |f| f.held());
                let held_all =
                    |r: &BlockRange| held.iter().any(|h| h.start <= r.start && r.end <= h.end);
                if i.context.fallback.is_some() && missing.iter().all(held_all) {
                    let blocks: Vec<String> = missing.iter().map(ToString::to_string).collect();
                    tracing::warn!(
                        "no server of {} covers blocks {}: this client runs them (--fallback local)",
                        i.model,
                        blocks.join(", ")
                    );
                    return Ok(());
                }
                if seen.is_empty() {
                    return Err(ClientError::ModelUnknown(format!(
                        "no server of {} answered within {timeout:?}",
                        i.model
                    )));
                }
                Err(ClientError::NoRoute(gap_message(
                    &i.model,
                    &missing,
                    &seen,
                    i.context.fallback.is_some(),
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Open a route for sessions of `max_len` positions, retrying with exponential backoff
    /// (3 attempts).
    async fn open_session(&self, max_len: u32) -> Result<RemoteSession, ClientError> {
        let i = &self.inner;
        let cfg = SessionConfig {
            max_len,
            ..i.session.clone()
        };
        let mut delay = Duration::from_millis(250);
        let mut attempt = 1;
        loop {
            let opened = RemoteSession::open_with(
                i.p2p.clone(),
                i.model.clone(),
                i.num_blocks,
                cfg.clone(),
                i.context.clone(),
            )
            .await;
            match opened {
                Ok(s) => return Ok(s),
                // Prices do not change by waiting a second.
                Err(e @ PipelineError::OverPrice { .. }) => return Err(e.into()),
                // Trying again will not make servers take longer sessions.
                Err(e @ PipelineError::ContextTooLong { .. }) => return Err(e.into()),
                Err(e) if attempt >= OPEN_ATTEMPTS => return Err(e.into()),
                Err(e) => {
                    tracing::info!(
                        attempt,
                        "opening a route failed, retrying in {delay:?}: {e}"
                    );
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
            }
        }
    }

    /// Generate after `prompt`; tokens arrive on the stream as they are made. The model's
    /// EOS ends generation. Dropping the stream cancels the generation.
    pub async fn generate(
        &self,
        prompt: &str,
        params: SamplingParams,
    ) -> Result<TokenStream, ClientError> {
        let ids = self.prompt_ids(prompt)?;
        self.generate_ids(ids, params).await
    }

    /// Token ids of a plain prompt, with the tokenizer's BOS added.
    pub fn prompt_ids(&self, prompt: &str) -> Result<Vec<u32>, ClientError> {
        Ok(self.inner.tokenizer.encode(prompt)?)
    }

    /// [`MeshClient::generate`] after prompt token ids as given (from
    /// [`MeshClient::prompt_ids`] or [`MeshClient::chat_ids`]).
    pub async fn generate_ids(
        &self,
        ids: Vec<u32>,
        mut params: SamplingParams,
    ) -> Result<TokenStream, ClientError> {
        let i = self.inner.clone();
        params.stop_tokens.extend(i.eos.iter().copied());
        // The text stream decodes each token after the prompt, as a whole decode does.
        let text = TextStream::new(i.tokenizer.clone(), &ids);
        // Reserve what this request can use on each server: the prompt and every token
        // it may generate, within the model's context (not a fixed length that servers
        // would refuse, or that would cut a long request short).
        let positions = (ids.len().saturating_add(params.max_new_tokens)).min(i.max_context);
        let max_len = u32::try_from(positions).unwrap_or(u32::MAX);
        let mut generation = Generation::new(ids, params, i.max_context)?;
        let mut session = self.open_session(max_len).await?;
        let (tx, rx) = mpsc::channel(TOKEN_QUEUE);
        let (end_tx, end_rx) = tokio::sync::oneshot::channel();
        let task_inner = i.clone();
        tokio::spawn(async move {
            let i = task_inner;
            let (result, speculation) = match &i.draft {
                Some(draft) => {
                    let k = i.draft_tokens;
                    let max_len = max_len as usize;
                    let g = &mut generation;
                    match pipeline::generate_speculative(
                        &i.head,
                        &mut session,
                        g,
                        draft,
                        k,
                        max_len,
                        &tx,
                    )
                    .await
                    {
                        Ok(stats) => (Ok(()), Some(stats)),
                        Err(e) => (Err(e), None),
                    }
                }
                None => (
                    pipeline::generate_into(&i.head, &mut session, &mut generation, &tx).await,
                    None,
                ),
            };
            drop(tx);
            // The cost is what the receipts say, known once every hop closed.
            let mut report = session.close().await;
            report.speculation = speculation;
            let _ = end_tx.send((result, report));
        });
        Ok(TokenStream::new(rx, end_rx, text))
    }

    /// The prompt a chat becomes: the model's chat template with the assistant's turn
    /// opened, as HF's `apply_chat_template(add_generation_prompt=True)`. Models without a
    /// template (the tiny model) get a plain role-tagged transcript. A template that refuses
    /// the messages (roles that do not alternate) is [`ModelError::ChatRejected`].
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<String, ClientError> {
        Ok(match &self.inner.chat_template {
            Some(t) => t.render(messages, true)?,
            None => chat::transcript(messages),
        })
    }

    /// Token ids of [`MeshClient::chat_prompt`]. A template writes its own BOS, so its
    /// text is encoded without special tokens (as HF does); the transcript gets BOS added.
    pub fn chat_ids(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, ClientError> {
        let i = &self.inner;
        Ok(match &i.chat_template {
            Some(t) => t.encode(&i.tokenizer, messages, true)?,
            None => i.tokenizer.encode(&chat::transcript(messages))?,
        })
    }

    /// The model's context: prompt and generated tokens together, at most.
    pub fn max_context(&self) -> usize {
        self.inner.max_context
    }

    /// Bytes of the longest token of the model's tokenizer ([`MeshTokenizer::longest_token_bytes`]).
    pub fn longest_token_bytes(&self) -> usize {
        self.inner.tokenizer.longest_token_bytes()
    }

    /// Tokens of `text` under the model's tokenizer (0 if it cannot be encoded).
    pub fn count_tokens(&self, text: &str) -> usize {
        self.inner.tokenizer.encode(text).map_or(0, |ids| ids.len())
    }

    /// Answer a chat: [`MeshClient::generate_ids`] on [`MeshClient::chat_ids`].
    pub async fn chat(
        &self,
        messages: &[ChatMessage],
        params: SamplingParams,
    ) -> Result<TokenStream, ClientError> {
        let ids = self.chat_ids(messages)?;
        self.generate_ids(ids, params).await
    }

    /// Receipts this client countersigned, newest hops first (empty without a ledger).
    pub fn receipts(&self, limit: usize) -> Result<Vec<SignedReceipt>, ClientError> {
        let Some(ledger) = &self.inner.context.ledger else {
            return Ok(Vec::new());
        };
        let mut out: Vec<SignedReceipt> = ledger
            .store
            .entries()
            .filter_map(|e| e.ok().and_then(|e| e.countersigned))
            .collect();
        out.sort_by_key(|r| std::cmp::Reverse(r.receipt.end_ms));
        out.truncate(limit);
        Ok(out)
    }

    /// Proof kept against servers caught returning wrong hidden states, oldest first
    /// (empty without a ledger).
    pub fn evidence(&self, limit: usize) -> Result<Vec<Evidence>, ClientError> {
        self.inner
            .context
            .reputation
            .evidence(limit)
            .map_err(|e| ClientError::Ledger(e.to_string()))
    }

    /// Generate and collect the whole text.
    pub async fn complete(
        &self,
        prompt: &str,
        params: SamplingParams,
    ) -> Result<String, ClientError> {
        use futures::StreamExt;
        let mut stream = self.generate(prompt, params).await?;
        let mut out = String::new();
        while let Some(t) = stream.next().await {
            out.push_str(&t?.text);
        }
        Ok(out)
    }
}
