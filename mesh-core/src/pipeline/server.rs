//! The server end of inference sessions: one span, many clients' KV caches, hard limits.
//!
//! [`SpanServer`] is plain synchronous state so it can be tested without a network; the
//! node runs it on a worker thread and feeds it decoded requests.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use candle_core::Device;
use libp2p::PeerId;

use super::protocol::{Refusal, SessionRequest, SessionResponse};
use crate::ledger::attestation::Unsigned;
use crate::ledger::{
    now_ms, unpaid_of, ConfigHash, LedgerError, Meter, Outcome, Receipt, Reputation, SignedReceipt,
    Store, Terms,
};
use crate::model::{SpanCache, SpanModel};
use crate::types::{BlockRange, ModelId, SessionId};
use crate::wire::WireTensor;
pub use batch::MAX_BATCH;
pub use push::{Answer, PushOrder, Reply, Served};
use seal::Stepped;

/// What one server lets its clients spend.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// Sessions open at once, all clients together.
    pub max_sessions: usize,
    /// Sessions open at once for one client peer.
    pub max_sessions_per_client: usize,
    /// Bytes of KV cache all sessions may reserve together.
    pub cache_budget_bytes: usize,
    /// A session unused this long is closed and its cache freed.
    pub idle_timeout: Duration,
    /// Longest session (prompt + generated tokens) a client may open.
    pub max_len: u32,
    /// Requests one peer may send per second, sustained ([`super::admission`]).
    pub requests_per_second: u32,
    /// Requests one peer may send at once after a quiet spell.
    pub request_burst: u32,
    /// Requests of one peer waiting or running at once; more are answered `Busy`.
    pub in_flight_per_peer: usize,
    /// Most requests the worker takes at once; their decode steps of different sessions
    /// run as one pass over the weights (`server/batch.rs`). 1 runs every step alone.
    pub max_batch: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_sessions: 64,
            max_sessions_per_client: 16,
            cache_budget_bytes: 1 << 30,
            idle_timeout: Duration::from_secs(120),
            max_len: 2048,
            // Every decode step of every session is a request: 16 sessions of one peer
            // (a gateway) at a few hundred tokens/s each. 200/s capped one client's
            // decoding through a server at 200 tokens/s, 5 ms a token on loopback.
            // Floods are held by the in-flight cap and the fair queue as well.
            requests_per_second: 5000,
            request_burst: 10000,
            // A session has one request in flight per hop: as many as a client may open.
            in_flight_per_peer: 16,
            max_batch: MAX_BATCH,
        }
    }
}

/// Work done, by kind, for metrics, heartbeats and receipts.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ServerStats {
    pub sessions_opened: u64,
    pub sessions_expired: u64,
    pub refusals: u64,
    /// Positions run in prefill steps (more than one position per request).
    pub prefill_tokens: u64,
    /// Positions run one at a time.
    pub decode_tokens: u64,
    pub compute_micros: u64,
}

/// Work done for one session; the ledger turns this into receipts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionUsage {
    pub session: SessionId,
    pub client: PeerId,
    pub span: BlockRange,
    pub prefill_tokens: u64,
    pub decode_tokens: u64,
}

/// What a server needs to bill: its key, its ledger, its price.
#[derive(Clone)]
pub struct Billing {
    pub key: ed25519_dalek::SigningKey,
    pub server: PeerId,
    pub store: Store,
    /// Micro-units per token per block, as announced.
    pub price_per_token: u64,
    /// A running receipt every this many tokens, so a server cut off is still paid.
    pub every_tokens: u64,
    /// Refuse new sessions from a client that owes (has not countersigned) more than this
    /// many tokens' worth of work on this span.
    pub max_unpaid_tokens: u64,
}

struct Session {
    usage: SessionUsage,
    meter: Option<Meter>,
    cache: SpanCache,
    reserved: usize,
    last_used: Instant,
    /// A step of this session waiting for its pushed input ([`push`]).
    waiting: Option<push::Waiting>,
    /// A pushed input that came before the client's step naming it.
    early: Option<push::EarlyPush>,
    /// The client asked for every step's answer signed (`SessionRequest::Open`).
    attest: bool,
}

/// Sessions on one loaded span.
pub struct SpanServer {
    model_id: ModelId,
    span: SpanModel,
    limits: ServerLimits,
    sessions: HashMap<SessionId, Session>,
    reserved: usize,
    stats: ServerStats,
    /// Exponentially weighted decode throughput, tokens per second per block.
    throughput: f32,
    accepting: bool,
    billing: Option<(Billing, ConfigHash)>,
    /// Signs the steps of sessions whose client asked for it ([`Attestation`]).
    signer: Option<ed25519_dalek::SigningKey>,
    /// Why the ledger failed, once it did: from then on no billed session is opened.
    ledger_failure: std::cell::OnceCell<String>,
}

impl SpanServer {
    pub fn new(model_id: ModelId, span: SpanModel, limits: ServerLimits) -> Self {
        Self {
            model_id,
            span,
            limits,
            sessions: HashMap::new(),
            reserved: 0,
            stats: ServerStats::default(),
            throughput: 0.0,
            accepting: true,
            billing: None,
            signer: None,
            ledger_failure: std::cell::OnceCell::new(),
        }
    }

    /// Sign every step's input and output with `key` (the server's peer key), so clients
    /// can hold a wrong answer against it.
    pub fn with_signer(mut self, key: ed25519_dalek::SigningKey) -> Self {
        self.signer = Some(key);
        self
    }

    /// Sign a receipt for the work of every session and keep it in `billing.store`.
    pub fn with_billing(mut self, billing: Billing) -> Result<Self, LedgerError> {
        let hash = ConfigHash::of(self.span.config())?;
        self.billing = Some((billing, hash));
        Ok(self)
    }

    /// Sign and store a receipt the meter issued; a failure is logged, never fatal to the
    /// session (the next receipt covers the same tokens again).
    fn bill(&self, receipt: Option<Receipt>) -> Option<Box<SignedReceipt>> {
        let (billing, _) = self.billing.as_ref()?;
        let signed = receipt?.sign(&billing.key);
        match signed.and_then(|s| billing.store.put(&s).map(|_| s)) {
            Ok(s) => Some(Box::new(s)),
            Err(e) => {
                tracing::warn!("receipt not recorded: {e}");
                self.note_ledger_error(&e);
                None
            }
        }
    }

    /// A storage failure (not a refused receipt) means the ledger cannot keep receipts:
    /// remembered, so no new billed session is opened and the node reports itself degraded.
    fn note_ledger_error(&self, e: &LedgerError) {
        if matches!(e, LedgerError::Store(_)) && self.ledger_failure.set(e.to_string()).is_ok() {
            tracing::error!(
                "the ledger failed ({e}): no new billed sessions until the node restarts on a \
                 sound ledger"
            );
        }
    }

    /// Why the ledger failed, if it did (the node is then degraded: it opens no billed
    /// sessions).
    pub fn ledger_failure(&self) -> Option<&str> {
        self.ledger_failure.get().map(String::as_str)
    }

    /// A client that left too much work uncountersigned is refused new sessions.
    fn unpaid_refusal(&self, client: &PeerId, span: BlockRange) -> Option<Refusal> {
        let (billing, _) = self.billing.as_ref()?;
        let limit = billing
            .max_unpaid_tokens
            .saturating_mul(u64::from(span.len()))
            .saturating_mul(billing.price_per_token);
        let owed = unpaid_of(&billing.store, &billing.server, client, 10_000)
            .map_err(|e| tracing::warn!("reading unpaid work: {e}"))
            .ok()?
            .amount;
        (billing.price_per_token > 0 && owed > limit).then_some(Refusal::Unpaid { owed, limit })
    }

    fn finish_meter(&self, state: &mut Session) -> Option<Box<SignedReceipt>> {
        let meter = state.meter.as_mut()?;
        let u = state.usage;
        let receipt = meter
            .finish(u.prefill_tokens, u.decode_tokens, now_ms())
            .map_err(|e| tracing::warn!("receipt: {e}"))
            .ok()
            .flatten();
        self.bill(receipt)
    }

    pub fn model_id(&self) -> &ModelId {
        &self.model_id
    }

    pub fn span(&self) -> &SpanModel {
        &self.span
    }

    pub fn limits(&self) -> &ServerLimits {
        &self.limits
    }

    pub fn stats(&self) -> ServerStats {
        self.stats
    }

    pub fn active_sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Bytes of KV cache reserved by open sessions.
    pub fn reserved_bytes(&self) -> usize {
        self.reserved
    }

    pub fn free_cache_bytes(&self) -> usize {
        self.limits.cache_budget_bytes.saturating_sub(self.reserved)
    }

    /// Measured decode throughput in tokens/s per block (0 before the first decode).
    pub fn throughput(&self) -> f32 {
        self.throughput
    }

    /// Usage of every open session.
    pub fn usage(&self) -> Vec<SessionUsage> {
        self.sessions.values().map(|s| s.usage).collect()
    }

    /// Stop opening sessions (open ones keep running) before a graceful shutdown.
    pub fn stop_accepting(&mut self) {
        self.accepting = false;
    }

    /// Serve one request from `client` that is answered at once: a step waiting for a
    /// pushed input is refused here ([`SpanServer::serve`] parks it instead).
    pub fn handle(
        &mut self,
        client: PeerId,
        request: SessionRequest,
        now: Instant,
    ) -> SessionResponse {
        match self.serve(client, request, now).reply {
            Reply::Now(answer) => answer.response,
            Reply::Waits(session) => {
                self.cancel_waiting(session);
                SessionResponse::Refused(Refusal::NoPushedInput("the step waits for a push".into()))
            }
        }
    }

    /// Serve one request from `peer`: a client's, or a push from the server before; a
    /// step's answer comes signed.
    pub fn serve(&mut self, peer: PeerId, request: SessionRequest, now: Instant) -> Served {
        let mut served = self.serve_unsealed(peer, request, now);
        self.seal_served(&mut served);
        served
    }

    /// [`Self::serve`], its answers left for [`Self::seal`].
    fn serve_unsealed(&mut self, peer: PeerId, request: SessionRequest, now: Instant) -> Served {
        let client = peer;
        // The session's client moved on: a step still waiting for its push is ended.
        let ended = match &request {
            SessionRequest::Forward { session, .. }
            | SessionRequest::Rewind { session, .. }
            | SessionRequest::Close { session } => self.end_waiting(client, *session),
            _ => None,
        };
        let stepped: Stepped = match request {
            SessionRequest::Step {
                session,
                start_pos,
                rewind,
                input,
                push_to,
            } => return self.step(client, session, start_pos, rewind, input, push_to, now),
            SessionRequest::Push {
                session,
                start_pos,
                hidden,
            } => return self.pushed(peer, session, start_pos, hidden, now),
            SessionRequest::Open {
                session,
                model,
                span,
                max_len,
                attest,
            } => self
                .open(client, session, model, span, max_len, attest, now)
                .into(),
            SessionRequest::Forward {
                session,
                start_pos,
                hidden,
            } => self.forward(client, session, start_pos, &hidden, now),
            SessionRequest::Close { session } => self.close(client, session).into(),
            SessionRequest::Countersigned { receipt } => {
                self.countersigned(client, &receipt).into()
            }
            SessionRequest::Rewind {
                session,
                to,
                hidden,
            } => self.rewind(client, session, to, &hidden, now),
        };
        let mut served = self.answered(stepped.response);
        if let Reply::Now(answer) = &mut served.reply {
            answer.unsigned = stepped.unsigned;
        }
        Served {
            released: ended,
            ..served
        }
    }

    /// A request's answer, counted if it is a refusal.
    fn answered(&mut self, response: SessionResponse) -> Served {
        if matches!(response, SessionResponse::Refused(_)) {
            self.stats.refusals += 1;
        }
        Served::now(Answer::plain(response))
    }

    #[allow(clippy::too_many_arguments)]
    fn open(
        &mut self,
        client: PeerId,
        session: SessionId,
        model: ModelId,
        span: BlockRange,
        max_len: u32,
        attest: bool,
        now: Instant,
    ) -> SessionResponse {
        let refuse = SessionResponse::Refused;
        if !self.accepting {
            return refuse(Refusal::ShuttingDown);
        }
        if self.billing.is_some() && self.ledger_failure.get().is_some() {
            return refuse(Refusal::LedgerFailed);
        }
        if model != self.model_id {
            return refuse(Refusal::UnknownModel(model));
        }
        let served = self.span.range();
        if span.is_empty() || span.start < served.start || span.end > served.end {
            return refuse(Refusal::SpanNotServed {
                served,
                requested: span,
            });
        }
        if max_len == 0 || max_len > self.limits.max_len {
            return refuse(Refusal::MaxLenTooLarge {
                requested: max_len,
                limit: self.limits.max_len,
            });
        }
        if self.sessions.contains_key(&session) {
            return refuse(Refusal::SessionExists);
        }
        if let Some(refusal) = self.unpaid_refusal(&client, span) {
            if let Some((billing, _)) = &self.billing {
                Reputation::persistent(billing.store.clone()).note(&client, Outcome::Unpaid);
            }
            return refuse(refusal);
        }
        self.expire_idle(now);
        if self.sessions.len() >= self.limits.max_sessions {
            return refuse(Refusal::TooManySessions {
                open: self.sessions.len(),
                limit: self.limits.max_sessions,
            });
        }
        let of_client = self
            .sessions
            .values()
            .filter(|s| s.usage.client == client)
            .count();
        if of_client >= self.limits.max_sessions_per_client {
            return refuse(Refusal::TooManyClientSessions {
                open: of_client,
                limit: self.limits.max_sessions_per_client,
            });
        }
        let needed = SpanCache::bytes_for(
            self.span.config(),
            span.len() as usize,
            max_len as usize,
            self.span.dtype(),
        );
        if needed > self.free_cache_bytes() {
            return refuse(Refusal::OverBudget {
                needed,
                free: self.free_cache_bytes(),
                budget: self.limits.cache_budget_bytes,
            });
        }
        let cache = match self.span.new_sub_cache(span, max_len as usize) {
            Ok(cache) => cache,
            Err(e) => return refuse(Refusal::BadRequest(e.to_string())),
        };
        let terms = self.billing.as_ref().map(|(b, hash)| Terms {
            session,
            client,
            server: b.server,
            model: self.model_id.clone(),
            config_hash: *hash,
            span,
            price_per_token: b.price_per_token,
        });
        let meter = match (&terms, &self.billing) {
            (Some(t), Some((b, _))) => match Meter::new(t.clone(), now_ms(), b.every_tokens) {
                Ok(m) => Some(m),
                Err(e) => return refuse(Refusal::BadRequest(e.to_string())),
            },
            _ => None,
        };
        self.reserved += needed;
        self.stats.sessions_opened += 1;
        self.sessions.insert(
            session,
            Session {
                usage: SessionUsage {
                    session,
                    client,
                    span,
                    prefill_tokens: 0,
                    decode_tokens: 0,
                },
                meter,
                cache,
                reserved: needed,
                last_used: now,
                waiting: None,
                early: None,
                attest,
            },
        );
        tracing::info!(%session, %client, %span, max_len, attest, "session opened");
        SessionResponse::Opened {
            session,
            span,
            terms: terms.map(Box::new),
        }
    }

    fn forward(
        &mut self,
        client: PeerId,
        session: SessionId,
        start_pos: u32,
        hidden: &WireTensor,
        now: Instant,
    ) -> Stepped {
        let Some(state) = owned(&mut self.sessions, client, session) else {
            return SessionResponse::Refused(Refusal::UnknownSession).into();
        };
        let input = match hidden.to_tensor(&Device::Cpu) {
            Ok(t) => t,
            Err(e) => return SessionResponse::Refused(Refusal::BadRequest(e.to_string())).into(),
        };
        let started = Instant::now();
        // The answer travels in the span's dtype: a bf16 span sends half the bytes of f32.
        // Copying it out waits for the device, so the time counts the whole computation.
        let output = self
            .span
            .forward(&mut state.cache, &input, start_pos as usize)
            .map_err(|e| e.to_string())
            .and_then(|out| WireTensor::from_tensor(&out).map_err(|e| e.to_string()));
        let output = match output {
            Ok(t) => t,
            Err(e) => return SessionResponse::Refused(Refusal::BadRequest(e)).into(),
        };
        let micros = started.elapsed().as_micros() as u64;
        let positions = input.dim(1).unwrap_or(0) as u64;
        self.finish_step(session, start_pos, hidden, output, positions, micros, now)
    }

    /// A step of `session` ran (`positions` positions of `input` into `output`, in
    /// `micros` of compute): count it, bill it, and answer it, its attestation digested
    /// but not yet signed ([`SpanServer::seal`]).
    #[allow(clippy::too_many_arguments)]
    fn finish_step(
        &mut self,
        session: SessionId,
        start_pos: u32,
        input: &WireTensor,
        output: WireTensor,
        positions: u64,
        micros: u64,
        now: Instant,
    ) -> Stepped {
        let Some(state) = self.sessions.get_mut(&session) else {
            return SessionResponse::Refused(Refusal::UnknownSession).into();
        };
        state.last_used = now;
        let attest = state.attest;
        if positions > 1 {
            state.usage.prefill_tokens += positions;
            self.stats.prefill_tokens += positions;
        } else {
            state.usage.decode_tokens += positions;
            self.stats.decode_tokens += positions;
            let blocks = state.usage.span.len() as f32;
            let tps = blocks * 1e6 / (micros.max(1) as f32);
            self.throughput = if self.throughput == 0.0 {
                tps
            } else {
                0.9 * self.throughput + 0.1 * tps
            };
        }
        self.stats.compute_micros += micros;
        let u = state.usage;
        let issued = state.meter.as_mut().and_then(|m| {
            m.observe(u.prefill_tokens, u.decode_tokens, now_ms())
                .map_err(|e| tracing::warn!("receipt: {e}"))
                .ok()
                .flatten()
        });
        let receipt = self.bill(issued);
        let unsigned = self
            .signer
            .as_ref()
            .filter(|_| attest)
            .map(|_| Unsigned::of(&session, start_pos, input, &output));
        Stepped {
            response: SessionResponse::Hidden {
                attestation: None,
                session,
                hidden: output,
                compute_micros: micros,
                receipt,
            },
            unsigned,
        }
    }

    /// [`SessionRequest::Rewind`]: truncate, then forward; a refused step leaves the cache
    /// as it was.
    fn rewind(
        &mut self,
        client: PeerId,
        session: SessionId,
        to: u32,
        hidden: &WireTensor,
        now: Instant,
    ) -> Stepped {
        let Some(state) = owned(&mut self.sessions, client, session) else {
            return SessionResponse::Refused(Refusal::UnknownSession).into();
        };
        let cached = state.cache.len();
        let to = to as usize;
        if to > cached {
            return SessionResponse::Refused(Refusal::BadRequest(format!(
                "rewind to position {to}, past the {cached} positions cached"
            )))
            .into();
        }
        state.cache.truncate(to);
        let stepped = self.forward(client, session, to as u32, hidden, now);
        if matches!(stepped.response, SessionResponse::Refused(_)) {
            if let Some(state) = self.sessions.get_mut(&session) {
                state.cache.restore_len(cached);
            }
        }
        stepped
    }

    fn close(&mut self, client: PeerId, session: SessionId) -> SessionResponse {
        match self.sessions.get(&session) {
            Some(s) if s.usage.client == client => {
                let receipt = self.remove(session).and_then(|(_, r)| r);
                SessionResponse::Closed { session, receipt }
            }
            _ => SessionResponse::Refused(Refusal::UnknownSession),
        }
    }

    /// Keep a receipt the client countersigned; only that client may deliver it.
    fn countersigned(&mut self, client: PeerId, receipt: &SignedReceipt) -> SessionResponse {
        let Some((billing, _)) = &self.billing else {
            return SessionResponse::Refused(Refusal::BadRequest(
                "this server keeps no ledger".into(),
            ));
        };
        let terms = &receipt.receipt.terms;
        if terms.client != client || terms.server != billing.server || !receipt.is_countersigned() {
            return SessionResponse::Refused(Refusal::BadRequest(
                "not a countersigned receipt of ours".into(),
            ));
        }
        match billing.store.put(receipt) {
            Ok(_) => SessionResponse::Acknowledged,
            Err(e) => {
                self.note_ledger_error(&e);
                SessionResponse::Refused(Refusal::BadRequest(e.to_string()))
            }
        }
    }

    /// Drop a session, billing whatever it has not been billed for yet.
    fn remove(&mut self, session: SessionId) -> Option<(SessionUsage, Option<Box<SignedReceipt>>)> {
        let mut s = self.sessions.remove(&session)?;
        self.reserved = self.reserved.saturating_sub(s.reserved);
        let receipt = self.finish_meter(&mut s);
        Some((s.usage, receipt))
    }

    /// Close sessions idle longer than the limit; returns their usage.
    pub fn expire_idle(&mut self, now: Instant) -> Vec<SessionUsage> {
        let idle: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.last_used) > self.limits.idle_timeout)
            .map(|(id, _)| *id)
            .collect();
        let expired: Vec<SessionUsage> = idle
            .into_iter()
            .filter_map(|id| self.remove(id).map(|(usage, _)| usage))
            .collect();
        self.stats.sessions_expired += expired.len() as u64;
        expired
    }
}

/// `session` if `client` opened it: another peer's session is as good as unknown.
fn owned(
    sessions: &mut HashMap<SessionId, Session>,
    client: PeerId,
    session: SessionId,
) -> Option<&mut Session> {
    sessions
        .get_mut(&session)
        .filter(|s| s.usage.client == client)
}

mod batch;
mod push;
mod seal;

#[cfg(test)]
mod tests;
