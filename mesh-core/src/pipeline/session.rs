//! The client end of inference: a chain of remote spans, fed one step at a time, that
//! survives servers dying (Petals' fault tolerance).
//!
//! Every hop keeps the inputs it was sent. When a server fails (drops, times out, errs)
//! the client bans it, routes the failed hop's blocks through other servers, replays the
//! kept inputs to rebuild their caches, and goes on; the output is what it would have been.
//!
//! With checking on ([`VerifyConfig`]), a sampled fraction of steps get a second opinion
//! (`session/audit.rs`); a server shown wrong is banned, the evidence kept, and its receipts for
//! the session are never countersigned (they are held until the hop ends for that reason).
//!
//! With local blocks ([`LocalBlocks`]), blocks no server covers run on the client itself
//! until servers of them appear (`session/fallback.rs`).

mod audit;
mod billing;
mod checks;
mod coverage;
mod exchange;
mod fallback;
mod hop;
mod push;
mod report;

pub use billing::ClientLedger;
pub use coverage::{wait_for_coverage, wait_for_heard_coverage};
pub use fallback::LocalBlocks;
use hop::HopState;
pub use report::{HopChecks, SessionReport};

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::Tensor;
use libp2p::PeerId;
use rand::SeedableRng;

use super::protocol::Refusal;
use super::route::{plan, Candidate, Hop, RoutePolicy};
use super::verify::{LocalReference, VerifyConfig};
use super::PipelineError;
use crate::ledger::{Outcome, Reputation};
use crate::p2p;
use crate::types::{BlockRange, ModelId, SessionId};
/// How often to look for fresh heartbeats while no route exists.
const REDISCOVER_POLL: Duration = Duration::from_millis(200);

/// How a client runs its sessions.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Positions (prompt + generated) to reserve cache for on each server. A server that
    /// takes fewer refuses, which is no failure of it: the session routes around it.
    /// `MeshClient` sets this per generation to the prompt plus the max tokens.
    pub max_len: u32,
    /// One request may take this long before its server is declared failed.
    pub step_timeout: Duration,
    /// Server failures tolerated in one session before giving up.
    pub max_failovers: usize,
    pub policy: RoutePolicy,
    /// How much of the servers' work to re-check.
    pub verify: VerifyConfig,
    /// When no known server covers some blocks, how long to look again (DHT lookups,
    /// then fresh heartbeats) before giving up: a server that joined after the session
    /// opened, or whose heartbeat has not reached us yet, can still take over.
    pub rediscover_for: Duration,
    /// Servers send each step's output straight on to the next server of the route
    /// (`session/push.rs`) instead of back through the client: four trips a token over a
    /// three-server route instead of six. A server that cannot push says so and the client
    /// relays that hop as before.
    pub push: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            max_len: 512,
            step_timeout: Duration::from_secs(20),
            max_failovers: 4,
            policy: RoutePolicy::default(),
            verify: VerifyConfig::default(),
            rediscover_for: Duration::from_secs(3),
            push: true,
        }
    }
}

/// What a session keeps beside the route: the ledger to countersign into, the opinion of
/// peers to route by, and the client's own weights to check servers against.
#[derive(Clone, Default)]
pub struct SessionContext {
    pub ledger: Option<ClientLedger>,
    pub reputation: Reputation,
    /// Spans re-run locally for checks instead of asking another server.
    pub reference: Option<Arc<Mutex<LocalReference>>>,
    /// Blocks this client runs itself when no server covers them (`--fallback local`).
    pub fallback: Option<Arc<LocalBlocks>>,
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
    reputation: Reputation,
    reference: Option<Arc<Mutex<LocalReference>>>,
    fallback: Option<Arc<LocalBlocks>>,
    /// Picks the steps to check; seeded per session so nothing outside can predict it.
    sampler: rand_chacha::ChaCha8Rng,
    /// Servers this session caught returning wrong hidden states.
    caught: Vec<PeerId>,
    /// Servers that take shorter sessions than `cfg.max_len`, with the length they take:
    /// left out of routes but not banned, since they did nothing wrong.
    too_short: HashMap<PeerId, u32>,
    /// Amount of the newest receipt countersigned for each (hop session, server).
    countersigned: HashMap<(SessionId, PeerId), u64>,
    /// Countersigned receipts on their way back to their servers, off the steps' path
    /// ([`RemoteSession::countersign_in_background`]); closing waits for them.
    deliveries: tokio::task::JoinSet<()>,
    /// While checking: every hop the session routed through, with its checks.
    checks: Vec<HopChecks>,
    push_stats: PushStats,
    /// Pushed steps in a row whose push never came ([`SessionConfig::push`]).
    push_misses: u32,
    /// Pushes between servers kept not coming: this session relays through the client.
    push_off: bool,
}

/// How a session's steps went server to server ([`SessionConfig::push`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PushStats {
    /// Hop answers whose input the server before pushed.
    pub pushed: u64,
    /// Steps where a push fell through and the client relayed from that hop on.
    pub relayed: u64,
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
        let ctx = SessionContext {
            ledger,
            ..SessionContext::default()
        };
        Self::open_with(p2p, model, num_blocks, cfg, ctx).await
    }

    /// Like [`RemoteSession::open`], with a ledger, a reputation and a local reference.
    pub async fn open_with(
        p2p: p2p::Client,
        model: ModelId,
        num_blocks: u32,
        cfg: SessionConfig,
        ctx: SessionContext,
    ) -> Result<Self, PipelineError> {
        let mut cfg = cfg;
        if ctx.reference.is_some() && cfg.verify.rate > 0.0 && cfg.policy.allow_quantized {
            // The local weights are full precision: a quantized server's honest answers
            // would differ from them by more than the tolerance.
            tracing::info!(
                "checking against local weights: routing through full-precision servers only"
            );
            cfg.policy.allow_quantized = false;
        }
        let mut this = Self {
            ledger: ctx.ledger,
            reputation: ctx.reputation,
            reference: ctx.reference,
            fallback: ctx.fallback,
            sampler: rand_chacha::ChaCha8Rng::from_os_rng(),
            caught: Vec::new(),
            too_short: HashMap::new(),
            countersigned: HashMap::new(),
            deliveries: tokio::task::JoinSet::new(),
            checks: Vec::new(),
            push_stats: PushStats::default(),
            push_misses: 0,
            push_off: false,
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
        this.hops = this.route_and_replay(full, None).await?.0;
        Ok(this)
    }

    /// The servers and blocks of the current route.
    pub fn route(&self) -> Vec<Hop> {
        self.hops.iter().map(|h| h.hop).collect()
    }

    pub fn model(&self) -> &ModelId {
        &self.model
    }

    /// How many hops' inputs came server to server.
    pub fn push_stats(&self) -> PushStats {
        self.push_stats
    }

    /// Servers this session stopped using after they failed it.
    pub fn banned(&self) -> &HashSet<PeerId> {
        &self.banned
    }

    /// Servers this session caught returning wrong hidden states (evidence is in the
    /// reputation's store).
    pub fn caught(&self) -> &[PeerId] {
        &self.caught
    }

    /// Run hidden states `[1, seq, hidden]` at positions `start_pos..` through every hop.
    pub async fn step(&mut self, hidden: Tensor, start_pos: u32) -> Result<Tensor, PipelineError> {
        self.step_at(hidden, start_pos, false).await
    }

    /// [`RemoteSession::step`] at a position before the end of what was sent: every hop
    /// first forgets the positions from `start_pos` on (draft tokens a check rejected),
    /// the servers in the same message as the step ([`SessionRequest::Rewind`]).
    pub async fn step_rewinding(
        &mut self,
        hidden: Tensor,
        start_pos: u32,
    ) -> Result<Tensor, PipelineError> {
        self.step_at(hidden, start_pos, true).await
    }

    async fn step_at(
        &mut self,
        hidden: Tensor,
        start_pos: u32,
        rewind: bool,
    ) -> Result<Tensor, PipelineError> {
        let seq = hidden.dim(1)?;
        // Every server would refuse it, and the client would take that for their failure.
        let requested = u64::from(start_pos) + seq as u64;
        if requested > u64::from(self.cfg.max_len) {
            return Err(PipelineError::SessionFull {
                max_len: self.cfg.max_len,
                requested,
            });
        }
        let mut x = hidden;
        let mut i = 0;
        // Hops from this one on are sent the step by the client after a push fell through:
        // as a rewind, since the server may have run it already.
        let mut relayed_from = usize::MAX;
        if self.pushes(seq) {
            let pushed = self.step_pushed(&x, start_pos, rewind).await?;
            (i, x, relayed_from) = (pushed.answered, pushed.next_input, pushed.answered);
            if let Some(e) = pushed.failed {
                (x, i) = self.recover(i, e, seq).await?;
            }
        }
        while i < self.hops.len() {
            if rewind {
                self.hops[i].truncate_history(start_pos as usize)?;
            }
            self.hops[i].history.push(x.clone());
            if self.hops[i].hop.local {
                // Back to the mesh as soon as servers cover these blocks again: the hop is
                // replaced as a failed one is, its inputs replayed into the servers.
                let (out, added) = if self.mesh_covers(i).await {
                    tracing::info!(blocks = %self.hops[i].hop.span, "servers are back: leaving the local fallback");
                    self.replace_hop(i).await?
                } else {
                    (self.run_local(i, &x)?, 1)
                };
                x = out.narrow(1, out.dim(1)? - seq, seq)?;
                i += added;
                continue;
            }
            let hop = &self.hops[i];
            let (peer, session) = (hop.hop.peer, hop.session);
            let rewinding = rewind || i >= relayed_from;
            let stepped = match self.forward(peer, session, &x, start_pos, rewinding).await {
                Ok((out, receipt, attestation)) => self
                    .accept(i, seq, &out, receipt, attestation)
                    .await
                    .map(|()| out),
                Err(e) => Err(e),
            };
            match stepped {
                Ok(out) => {
                    x = out;
                    i += 1;
                }
                Err(e) => (x, i) = self.recover(i, e, seq).await?,
            }
        }
        Ok(x)
    }

    /// Take hop `i`'s answer to its newest input: count it, countersign its receipt (off
    /// the steps' path), and check it when the sampler says so.
    async fn accept(
        &mut self,
        i: usize,
        seq: usize,
        out: &Tensor,
        receipt: Option<Box<crate::ledger::SignedReceipt>>,
        attestation: Option<crate::ledger::Attestation>,
    ) -> Result<(), PipelineError> {
        let verifying = self.cfg.verify.enabled();
        let h = &mut self.hops[i];
        let now = h.take_answer(seq, out, receipt, attestation, verifying);
        let (peer, tally) = (h.hop.peer, h.tally.clone());
        self.countersign_in_background(peer, tally, now).await;
        self.audit(i, false).await
    }

    /// Hop `i` failed this step with `e`: a server caught lying rebuilds the route and
    /// rewinds the caller ([`PipelineError::Rewind`]); any other failure replaces the hop
    /// and replays its inputs. Returns the step's output after the hop and the next hop.
    async fn recover(
        &mut self,
        i: usize,
        e: PipelineError,
        seq: usize,
    ) -> Result<(Tensor, usize), PipelineError> {
        if let PipelineError::Mismatch { .. } = e {
            return Err(self.caught_at(i, e).await);
        }
        self.note_failure(e)?;
        let (out, added) = self.replace_hop(i).await?;
        Ok((out.narrow(1, out.dim(1)? - seq, seq)?, i + added))
    }

    /// Whether a fraction of steps is re-checked ([`VerifyConfig`]).
    pub fn verifying(&self) -> bool {
        self.cfg.verify.enabled()
    }

    /// Positions whose output every hop had confirmed by a second opinion (all of them when
    /// not checking): tokens sampled from these can be shown.
    pub fn checked_positions(&self) -> usize {
        if !self.verifying() {
            return usize::MAX;
        }
        // The client's own blocks need no second opinion.
        self.hops
            .iter()
            .filter(|h| !h.hop.local)
            .map(|h| h.positions(h.checked))
            .min()
            .unwrap_or(usize::MAX)
    }

    /// Check every hop's unchecked steps now (at the end of a generation, so nothing is
    /// shown unchecked). Errors like [`RemoteSession::step`], including
    /// [`PipelineError::Rewind`].
    pub async fn check_all(&mut self) -> Result<(), PipelineError> {
        let mut i = 0;
        while i < self.hops.len() {
            match self.audit(i, true).await {
                Ok(()) => i += 1,
                Err(e @ PipelineError::Mismatch { .. }) => return Err(self.caught_at(i, e).await),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Hop `i`'s server was caught returning wrong hidden states (`e`): ban it, rebuild
    /// the route on the positions checked, and return what the caller is told
    /// ([`PipelineError::Rewind`] to them, or why that failed).
    async fn caught_at(&mut self, i: usize, e: PipelineError) -> PipelineError {
        let to = self.hops[i].positions(self.hops[i].checked);
        if let Err(e) = self.note_failure(e) {
            return e;
        }
        match self.rebuild(to).await {
            Ok(()) => PipelineError::Rewind { position: to },
            Err(e) => e,
        }
    }

    /// After a server was caught: drop the whole route, and replay the first `to`
    /// positions (those every caught server had been checked on) through a new one. What
    /// came after may rest on wrong hidden states, so the caller rewinds to `to`.
    async fn rebuild(&mut self, to: usize) -> Result<(), PipelineError> {
        let inputs = match self.hops.first() {
            Some(h) if to > 0 => Some(Tensor::cat(&h.history, 1)?.narrow(1, 0, to)?),
            _ => None,
        };
        for mut h in std::mem::take(&mut self.hops) {
            self.end_witness(&mut h).await;
            if !self.banned.contains(&h.hop.peer) {
                self.end_hop(h).await;
            } else if !self.caught.contains(&h.hop.peer) {
                self.countersign(h.hop.peer, h.tally, h.pending).await;
            }
        }
        let full = BlockRange::new(0, self.num_blocks);
        let (hops, _) = self.route_and_replay(full, inputs).await?;
        self.hops = hops;
        tracing::info!(rewound_to = to, "route rebuilt without the caught server");
        Ok(())
    }

    /// Close every hop's session (best effort: servers also expire idle sessions) and
    /// report what the session countersigned in all, final receipts included.
    pub async fn close(mut self) -> SessionReport {
        self.flush_deliveries().await;
        let hops = std::mem::take(&mut self.hops);
        for h in hops {
            self.end_hop(h).await;
        }
        SessionReport {
            countersigned: self.countersigned_amount(),
            checks: std::mem::take(&mut self.checks),
            speculation: None,
        }
    }

    /// Close an honest hop's session (and its witness's) and countersign its work.
    async fn end_hop(&mut self, mut h: HopState) {
        if h.hop.local {
            return;
        }
        self.end_witness(&mut h).await;
        self.close_session(h.hop.peer, h.session, h.tally, h.pending)
            .await;
    }

    /// No route over `range` through `candidates` (those known): which blocks none of
    /// them covers, and who they are.
    fn no_route(&self, range: BlockRange, candidates: &[Candidate]) -> PipelineError {
        let (missing, seen) = Self::explain_gap(candidates, range, &self.banned);
        PipelineError::NoRoute {
            model: self.model.clone(),
            range,
            excluded: self.banned.len(),
            missing,
            seen,
        }
    }

    /// Ban the failed server, or give up when too many failed.
    fn note_failure(&mut self, e: PipelineError) -> Result<(), PipelineError> {
        tracing::warn!("server failed: {e}");
        if let Some(peer) = e.peer() {
            self.banned.insert(peer);
            if let Some(outcome) = failure_outcome(&e) {
                self.reputation.note(&peer, outcome);
            }
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
        let (new_hops, out) = self.route_and_replay(range, Some(replay)).await?;
        let out = out.ok_or_else(|| self.no_route(range, &[]))?;
        tracing::info!(
            blocks = %range,
            replacement = ?new_hops.iter().map(|h| h.hop.peer.to_string()).collect::<Vec<_>>(),
            replayed = out.dim(1)?,
            "replaced failed server"
        );
        let added = new_hops.len();
        let replaced: Vec<HopState> = self.hops.splice(i..=i, new_hops).collect();
        for mut old in replaced {
            self.end_witness(&mut old).await;
            // Failed, not caught lying: it is owed what it did before failing.
            if !self.caught.contains(&old.hop.peer) {
                self.countersign(old.hop.peer, old.tally, old.pending).await;
            }
        }
        Ok((out, added))
    }

    /// Open a route over `range` and run `replay` (positions from 0) through it, trying
    /// other servers while some fail; returns the hops and the last one's output.
    async fn route_and_replay(
        &mut self,
        range: BlockRange,
        replay: Option<Tensor>,
    ) -> Result<(Vec<HopState>, Option<Tensor>), PipelineError> {
        let verifying = self.cfg.verify.enabled();
        loop {
            let mut new_hops = match self.open_route(range).await {
                Ok(h) => h,
                Err(
                    e @ (PipelineError::NoRoute { .. }
                    | PipelineError::ContextTooLong { .. }
                    | PipelineError::OverPrice { .. }),
                ) => return Err(e),
                Err(PipelineError::Refused {
                    peer,
                    reason: Refusal::MaxLenTooLarge { limit, .. },
                }) => {
                    self.too_short.insert(peer, limit);
                    continue;
                }
                Err(e) => {
                    self.note_failure(e)?;
                    continue;
                }
            };
            let Some(mut x) = replay.clone() else {
                self.enlist(&mut new_hops).await;
                return Ok((new_hops, None));
            };
            let mut failed = None;
            for h in new_hops.iter_mut() {
                h.history.push(x.clone());
                if h.hop.local {
                    let local = self.fallback.as_deref();
                    x = fallback::run_local(local, self.cfg.max_len, h, &x)?;
                    continue;
                }
                match self.forward(h.hop.peer, h.session, &x, 0, false).await {
                    Ok((out, receipt, attestation)) => {
                        let now = h.take_answer(x.dim(1)?, &out, receipt, attestation, verifying);
                        self.countersign(h.hop.peer, h.tally.clone(), now).await;
                        x = out;
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            match failed {
                Some(e) => self.note_failure(e)?,
                None => {
                    self.enlist(&mut new_hops).await;
                    return Ok((new_hops, Some(x)));
                }
            }
        }
    }

    async fn candidates(&self) -> Result<Vec<Candidate>, PipelineError> {
        let known = coverage::known_candidates(&self.p2p, &self.model, self.num_blocks).await?;
        let mut usable = Vec::with_capacity(known.len());
        for mut c in known {
            // A server caught lying (by this or an earlier session) is not used.
            let Some(penalty) = self.reputation.route_penalty_ms(&c.peer) else {
                continue;
            };
            c.penalty_ms += penalty;
            c.rtt = self.rtt.get(&c.peer).copied();
            usable.push(c);
        }
        Ok(usable)
    }

    /// Plan a route over `range` and open a session on each hop.
    async fn open_route(&mut self, range: BlockRange) -> Result<Vec<HopState>, PipelineError> {
        let hops = match self.plan_route(range).await? {
            Some(hops) => hops,
            // Servers are there but take shorter sessions: looking again will not help.
            None if !self.too_short.is_empty() => {
                return Err(PipelineError::ContextTooLong {
                    model: self.model.clone(),
                    requested: self.cfg.max_len,
                    longest: self.too_short.values().copied().max().unwrap_or(0),
                })
            }
            None => match self.rediscover(range).await {
                Ok(hops) => hops,
                // Within the discovery window no server covered some blocks: run them
                // here if this client holds their weights.
                Err(e @ PipelineError::NoRoute { .. }) => match self.plan_fallback(range).await? {
                    Some(hops) => hops,
                    None => return Err(e),
                },
                Err(e) => return Err(e),
            },
        };
        let mut opened = Vec::with_capacity(hops.len());
        for hop in hops {
            opened.push(if hop.local {
                Self::open_local(hop)
            } else {
                self.open_hop(hop).await?
            });
        }
        Ok(opened)
    }

    async fn plan_route(&self, range: BlockRange) -> Result<Option<Vec<Hop>>, PipelineError> {
        let candidates = self.candidates().await?;
        let mut excluded = self.banned.clone();
        excluded.extend(self.too_short.keys());
        Ok(plan(
            &candidates,
            range,
            &excluded,
            &self.cfg.policy,
            self.tie_break,
        ))
    }

    /// Look the model's servers up in the DHT again (which also dials them, so their
    /// heartbeats reach us) and wait for a route over `range`, up to `rediscover_for`.
    async fn rediscover(&self, range: BlockRange) -> Result<Vec<Hop>, PipelineError> {
        let deadline = tokio::time::Instant::now() + self.cfg.rediscover_for;
        tracing::info!(blocks = %range, "no known server left for these blocks; looking again");
        let lookup = self.p2p.discover(&self.model, self.num_blocks);
        match tokio::time::timeout_at(deadline, lookup).await {
            Ok(Err(e)) => tracing::debug!("discovery: {e}"),
            Err(_) => tracing::debug!("discovery ran out of time"),
            Ok(Ok(_)) => {}
        }
        loop {
            if let Some(hops) = self.plan_route(range).await? {
                return Ok(hops);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(self.no_route_explained(range).await);
            }
            tokio::time::sleep(REDISCOVER_POLL).await;
        }
    }
}

/// What a server's failure says of it, for its reputation (`None`: nothing to hold against
/// it, or recorded elsewhere).
fn failure_outcome(e: &PipelineError) -> Option<Outcome> {
    match e {
        PipelineError::Timeout { .. } => Some(Outcome::TimedOut),
        // Recorded with its evidence when it was caught.
        PipelineError::Mismatch { .. } => None,
        PipelineError::Refused { reason, .. } if reason.is_transient() => None,
        _ => Some(Outcome::Failed),
    }
}
