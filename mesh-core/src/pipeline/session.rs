//! The client end of inference: a chain of remote spans, fed one step at a time, that
//! survives servers dying (Petals' fault tolerance).
//!
//! Every hop keeps the inputs it was sent. When a server fails (drops, times out, errs)
//! the client bans it, routes the failed hop's blocks through other servers, replays the
//! kept inputs to rebuild their caches, and goes on; the output is what it would have been.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use libp2p::PeerId;

use super::protocol::{SessionRequest, SessionResponse};
use super::route::{plan, Candidate, Hop, RoutePolicy};
use super::PipelineError;
use crate::ledger::{ClientTally, ConfigHash, SignedReceipt, Store, Terms};
use crate::p2p;
use crate::types::{BlockRange, ModelId, SessionId};
use crate::wire::{self, WireTensor};

/// How a client runs its sessions.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Longest session (prompt + generated) to reserve cache for on each server.
    pub max_len: u32,
    /// One request may take this long before its server is declared failed.
    pub step_timeout: Duration,
    /// Server failures tolerated in one session before giving up.
    pub max_failovers: usize,
    pub policy: RoutePolicy,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            max_len: 512,
            step_timeout: Duration::from_secs(20),
            max_failovers: 4,
            policy: RoutePolicy::default(),
        }
    }
}

/// A client's ledger: it checks what servers bill against what it sent, countersigns,
/// and keeps both signatures.
#[derive(Clone)]
pub struct ClientLedger {
    pub store: Store,
    /// The key of this client's peer id.
    pub key: ed25519_dalek::SigningKey,
    /// [`ConfigHash`] of the local model config: servers must bill for the same model.
    pub config_hash: ConfigHash,
}

struct HopState {
    hop: Hop,
    session: SessionId,
    /// What this client sent the hop, when the server bills.
    tally: Option<ClientTally>,
    /// Inputs sent so far, in order; replayed into a replacement server.
    history: Vec<Tensor>,
}

/// A client's inference session across a chain of servers.
pub struct RemoteSession {
    p2p: p2p::Client,
    model: ModelId,
    num_blocks: u32,
    cfg: SessionConfig,
    hops: Vec<HopState>,
    banned: HashSet<PeerId>,
    rtt: HashMap<PeerId, Duration>,
    failovers: usize,
    tie_break: u64,
    ledger: Option<ClientLedger>,
}

impl RemoteSession {
    /// Route blocks `[0, num_blocks)` of `model` over the servers this peer knows and open
    /// a session on each hop.
    pub async fn open(
        p2p: p2p::Client,
        model: ModelId,
        num_blocks: u32,
        cfg: SessionConfig,
    ) -> Result<Self, PipelineError> {
        Self::open_billed(p2p, model, num_blocks, cfg, None).await
    }

    /// Like [`RemoteSession::open`], countersigning servers' receipts into `ledger`.
    pub async fn open_billed(
        p2p: p2p::Client,
        model: ModelId,
        num_blocks: u32,
        cfg: SessionConfig,
        ledger: Option<ClientLedger>,
    ) -> Result<Self, PipelineError> {
        let mut this = Self {
            ledger,
            p2p,
            model,
            num_blocks,
            cfg,
            hops: Vec::new(),
            banned: HashSet::new(),
            rtt: HashMap::new(),
            failovers: 0,
            tie_break: rand::random(),
        };
        let full = BlockRange::new(0, num_blocks);
        this.hops = loop {
            match this.open_route(full).await {
                Ok(hops) => break hops,
                Err(e @ PipelineError::NoRoute { .. }) => return Err(e),
                Err(e) => this.note_failure(e)?,
            }
        };
        Ok(this)
    }

    /// The servers and blocks of the current route.
    pub fn route(&self) -> Vec<Hop> {
        self.hops.iter().map(|h| h.hop).collect()
    }

    pub fn model(&self) -> &ModelId {
        &self.model
    }

    /// Servers this session stopped using after they failed it.
    pub fn banned(&self) -> &HashSet<PeerId> {
        &self.banned
    }

    /// Run hidden states `[1, seq, hidden]` at positions `start_pos..` through every hop.
    pub async fn step(&mut self, hidden: Tensor, start_pos: u32) -> Result<Tensor, PipelineError> {
        let seq = hidden.dim(1)?;
        let mut x = hidden;
        let mut i = 0;
        while i < self.hops.len() {
            self.hops[i].history.push(x.clone());
            let hop = &self.hops[i];
            match self.forward(hop.hop.peer, hop.session, &x, start_pos).await {
                Ok((out, receipt)) => {
                    if let Some(tally) = self.hops[i].tally.as_mut() {
                        tally.record_positions(seq as u64);
                    }
                    let (peer, tally) = (self.hops[i].hop.peer, self.hops[i].tally.clone());
                    self.countersign(peer, tally, receipt).await;
                    x = out;
                    i += 1;
                }
                Err(e) => {
                    self.note_failure(e)?;
                    let (out, added) = self.replace_hop(i).await?;
                    x = out.narrow(1, out.dim(1)? - seq, seq)?;
                    i += added;
                }
            }
        }
        Ok(x)
    }

    /// Close every hop's session (best effort: servers also expire idle sessions).
    pub async fn close(mut self) {
        let hops = std::mem::take(&mut self.hops);
        for h in hops {
            let req = SessionRequest::Close { session: h.session };
            if let Ok(SessionResponse::Closed { receipt, .. }) =
                self.request(h.hop.peer, &req).await
            {
                self.countersign(h.hop.peer, h.tally, receipt).await;
            }
        }
    }

    fn no_route(&self, range: BlockRange) -> PipelineError {
        PipelineError::NoRoute {
            model: self.model.clone(),
            range,
            excluded: self.banned.len(),
        }
    }

    /// Ban the failed server, or give up when too many failed.
    fn note_failure(&mut self, e: PipelineError) -> Result<(), PipelineError> {
        tracing::warn!("server failed: {e}");
        if let Some(peer) = e.peer() {
            self.banned.insert(peer);
        }
        self.failovers += 1;
        if self.failovers > self.cfg.max_failovers {
            return Err(PipelineError::TooManyFailures {
                failures: self.failovers,
                last: Box::new(e),
            });
        }
        Ok(())
    }

    /// Replace hop `i` by a fresh route over its blocks, replaying its inputs; returns the
    /// last new hop's output for the whole history and how many hops now stand in its place.
    async fn replace_hop(&mut self, i: usize) -> Result<(Tensor, usize), PipelineError> {
        let range = self.hops[i].hop.span;
        let replay = Tensor::cat(&self.hops[i].history, 1)?;
        loop {
            let mut new_hops = match self.open_route(range).await {
                Ok(h) => h,
                Err(e @ PipelineError::NoRoute { .. }) => return Err(e),
                Err(e) => {
                    self.note_failure(e)?;
                    continue;
                }
            };
            let mut x = replay.clone();
            let mut failed = None;
            for h in new_hops.iter_mut() {
                h.history.push(x.clone());
                match self.forward(h.hop.peer, h.session, &x, 0).await {
                    Ok((out, receipt)) => {
                        if let Some(tally) = h.tally.as_mut() {
                            tally.record_positions(x.dim(1)? as u64);
                        }
                        self.countersign(h.hop.peer, h.tally.clone(), receipt).await;
                        x = out;
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = failed {
                self.note_failure(e)?;
                continue;
            }
            tracing::info!(
                blocks = %range,
                replacement = ?new_hops.iter().map(|h| h.hop.peer.to_string()).collect::<Vec<_>>(),
                replayed = replay.dim(1)?,
                "replaced failed server"
            );
            let added = new_hops.len();
            self.hops.splice(i..=i, new_hops);
            return Ok((x, added));
        }
    }

    async fn candidates(&self) -> Result<Vec<Candidate>, PipelineError> {
        let mut by_peer: HashMap<PeerId, Candidate> = HashMap::new();
        for info in self.p2p.live_servers(&self.model).await? {
            if info.num_blocks == self.num_blocks {
                by_peer.insert(info.peer_id, Candidate::from_heartbeat(&info));
            }
        }
        for c in by_peer.values_mut() {
            c.rtt = self.rtt.get(&c.peer).copied();
        }
        Ok(by_peer.into_values().collect())
    }

    /// Plan a route over `range` and open a session on each hop.
    async fn open_route(&mut self, range: BlockRange) -> Result<Vec<HopState>, PipelineError> {
        let candidates = self.candidates().await?;
        let hops = plan(
            &candidates,
            range,
            &self.banned,
            &self.cfg.policy,
            self.tie_break,
        )
        .ok_or_else(|| self.no_route(range))?;
        let mut opened = Vec::with_capacity(hops.len());
        for hop in hops {
            let session = SessionId::random();
            let req = SessionRequest::Open {
                session,
                model: self.model.clone(),
                span: hop.span,
                max_len: self.cfg.max_len,
            };
            match self.request(hop.peer, &req).await? {
                SessionResponse::Opened { terms, .. } => {
                    let tally = self.agree(hop, session, terms.map(|t| *t))?;
                    opened.push(HopState {
                        hop,
                        session,
                        tally,
                        history: Vec::new(),
                    })
                }
                other => return Err(unexpected(hop.peer, other)),
            }
        }
        Ok(opened)
    }

    async fn forward(
        &mut self,
        peer: PeerId,
        session: SessionId,
        x: &Tensor,
        start_pos: u32,
    ) -> Result<(Tensor, Option<Box<SignedReceipt>>), PipelineError> {
        let req = SessionRequest::Forward {
            session,
            start_pos,
            hidden: WireTensor::from_tensor(x)?,
        };
        match self.request(peer, &req).await? {
            SessionResponse::Hidden {
                hidden, receipt, ..
            } => {
                let out = hidden.to_tensor(&Device::Cpu)?;
                if out.dims() != x.dims() {
                    return Err(PipelineError::Protocol {
                        peer,
                        detail: format!("sent {:?}, got back {:?}", x.dims(), out.dims()),
                    });
                }
                Ok((out, receipt))
            }
            other => Err(unexpected(peer, other)),
        }
    }

    /// Check the terms a server offers at open and start counting what it is sent.
    fn agree(
        &self,
        hop: Hop,
        session: SessionId,
        terms: Option<Terms>,
    ) -> Result<Option<ClientTally>, PipelineError> {
        let (Some(ledger), Some(terms)) = (&self.ledger, terms) else {
            return Ok(None);
        };
        let expected = Terms {
            session,
            client: self.p2p.local_peer_id(),
            server: hop.peer,
            model: self.model.clone(),
            config_hash: ledger.config_hash,
            span: hop.span,
            price_per_token: terms.price_per_token,
        };
        let over_price = self
            .cfg
            .policy
            .max_price
            .is_some_and(|max| terms.price_per_token > max);
        if terms != expected || over_price {
            return Err(PipelineError::Protocol {
                peer: hop.peer,
                detail: format!("unacceptable terms {terms:?}"),
            });
        }
        ledger
            .store
            .record_opened(&terms)
            .map_err(|e| PipelineError::Ledger(e.to_string()))?;
        Ok(Some(ClientTally::new(terms)))
    }

    /// Countersign a receipt that matches what was sent, keep it, and hand it back to the
    /// server. A receipt that claims more than was sent is kept unsigned: never paid.
    async fn countersign(
        &mut self,
        peer: PeerId,
        tally: Option<ClientTally>,
        receipt: Option<Box<SignedReceipt>>,
    ) {
        let (Some(ledger), Some(tally), Some(receipt)) = (self.ledger.clone(), tally, receipt)
        else {
            return;
        };
        let signed = match ledger.store.accept_as_client(*receipt, &tally, &ledger.key) {
            Ok(signed) => signed,
            Err(e) => {
                tracing::warn!(%peer, "receipt refused: {e}");
                return;
            }
        };
        let req = SessionRequest::Countersigned {
            receipt: Box::new(signed),
        };
        if let Err(e) = self.request(peer, &req).await {
            tracing::debug!(%peer, "countersigned receipt not delivered: {e}");
        }
    }

    async fn request(
        &mut self,
        peer: PeerId,
        req: &SessionRequest,
    ) -> Result<SessionResponse, PipelineError> {
        let bytes = wire::encode(req)?;
        let started = Instant::now();
        let reply = tokio::time::timeout(self.cfg.step_timeout, self.p2p.request(peer, bytes))
            .await
            .map_err(|_| PipelineError::Timeout {
                peer,
                after: self.cfg.step_timeout,
            })?
            .map_err(|e| PipelineError::Unreachable {
                peer,
                reason: e.to_string(),
            })?;
        let rtt = started.elapsed();
        let smoothed = self.rtt.get(&peer).map_or(rtt, |old| (*old * 7 + rtt) / 8);
        self.rtt.insert(peer, smoothed);
        wire::decode(&reply, wire::FRAME_LIMIT).map_err(|e| PipelineError::Protocol {
            peer,
            detail: e.to_string(),
        })
    }
}

fn unexpected(peer: PeerId, response: SessionResponse) -> PipelineError {
    match response {
        SessionResponse::Refused(reason) => PipelineError::Refused { peer, reason },
        other => PipelineError::Protocol {
            peer,
            detail: format!("unexpected response {other:?}"),
        },
    }
}

/// Find `model`'s servers through the DHT, connect to them, and wait until their
/// heartbeats cover every block (or `timeout` passes). Returns the live servers.
pub async fn wait_for_coverage(
    p2p: &p2p::Client,
    model: &ModelId,
    num_blocks: u32,
    timeout: Duration,
) -> Result<Vec<crate::types::ServerInfo>, PipelineError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let full = BlockRange::new(0, num_blocks);
    loop {
        // Lookups also dial the servers found, so their heartbeats reach us directly.
        if let Err(e) = p2p.discover(model, num_blocks).await {
            tracing::debug!("discovery: {e}");
        }
        let live = p2p.live_servers(model).await?;
        let candidates: Vec<Candidate> = live
            .iter()
            .filter(|s| s.num_blocks == num_blocks)
            .map(Candidate::from_heartbeat)
            .collect();
        let policy = RoutePolicy::default();
        if plan(&candidates, full, &HashSet::new(), &policy, 0).is_some() {
            return Ok(live);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(PipelineError::NoRoute {
                model: model.clone(),
                range: full,
                excluded: 0,
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
