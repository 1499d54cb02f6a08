//! The span's worker: the [`SpanServer`] and its sessions, serving queued requests one per
//! peer in turn on its own thread, and holding the steps that wait for a pushed input. A
//! step's output goes on to the next server before its answer is signed and encoded: the
//! push is on the token's path, the signature is not.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tokio::sync::{mpsc, oneshot, watch};

use super::{NodeSnapshot, REQUEST_QUEUE};
use crate::metrics::NodeMetrics;
use crate::pipeline::admission::FairQueue;
use crate::pipeline::server::{Answer, Reply, Served, MAX_BATCH};
use crate::pipeline::{Refusal, SessionRequest, SessionResponse, SpanServer};
use crate::types::SessionId;
use crate::wire;

/// A step waiting for its pushed input longer than this is refused (checked once per
/// heartbeat): its client gave up on it long before.
const PARK_LIMIT: Duration = Duration::from_secs(30);

pub(super) enum Job {
    Request {
        peer: PeerId,
        bytes: Vec<u8>,
        reply: oneshot::Sender<Outgoing>,
    },
    Snapshot(oneshot::Sender<NodeSnapshot>),
    StopAccepting,
}

/// What the worker hands back for one request: the encoded answer.
pub(super) struct Outgoing {
    pub bytes: Vec<u8>,
}

impl Outgoing {
    /// Encode `answer`; one that cannot be encoded becomes a refusal saying why.
    fn of(answer: Answer) -> Self {
        let bytes = wire::encode(&answer.response).unwrap_or_else(|e| {
            let refusal = SessionResponse::Refused(Refusal::BadRequest(e.to_string()));
            wire::encode(&refusal).unwrap_or_default()
        });
        Self { bytes }
    }
}

/// Send the push `answer` orders (its output, on to the next server) to the node's
/// network side. A push not sent is only logged: the client, not hearing from the next
/// server in time, sends it the input itself.
fn push_on(answer: &mut Answer, pushes: &mpsc::Sender<(PeerId, Vec<u8>)>) {
    let Some(order) = answer.push.take() else {
        return;
    };
    let sent = wire::encode(&order.request)
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            pushes
                .try_send((order.peer, bytes))
                .map_err(|e| e.to_string())
        });
    if let Err(e) = sent {
        tracing::warn!(next = %order.peer, "push not sent: {e}");
    }
}

/// A request waiting its peer's turn: its bytes and where its answer goes.
type Waiting = (Vec<u8>, oneshot::Sender<Outgoing>);

/// The span's serving state: its server and sessions, the requests waiting their turn and
/// the steps waiting for a push. The worker thread drives it; a small step that finds it
/// idle is run on the network task instead ([`SpanWorker::serve_now`]), sparing the two
/// thread hand-offs a hop otherwise costs.
pub(super) struct SpanWorker {
    server: SpanServer,
    metrics: NodeMetrics,
    /// Blocks of the span, to count each answer's compute time per block.
    blocks: f64,
    fair: FairQueue<Waiting>,
    parked: HashMap<SessionId, (Instant, oneshot::Sender<Outgoing>)>,
    pushes: mpsc::Sender<(PeerId, Vec<u8>)>,
    /// A fresh snapshot after every batch and snapshot job, for status pages.
    published: watch::Sender<NodeSnapshot>,
}

impl SpanWorker {
    pub(super) fn new(
        server: SpanServer,
        pushes: mpsc::Sender<(PeerId, Vec<u8>)>,
        published: watch::Sender<NodeSnapshot>,
    ) -> Self {
        Self {
            blocks: f64::from(server.span().range().len().max(1)),
            server,
            metrics: NodeMetrics::default(),
            fair: FairQueue::new(REQUEST_QUEUE),
            parked: HashMap::new(),
            pushes,
            published,
        }
    }

    fn snapshot(&self, queued: usize) -> NodeSnapshot {
        let server = &self.server;
        NodeSnapshot {
            stats: server.stats(),
            active_sessions: server.active_sessions(),
            reserved_bytes: server.reserved_bytes(),
            free_cache_bytes: server.free_cache_bytes(),
            throughput_tps: server.throughput(),
            queued: queued + self.fair.len(),
            metrics: self.metrics.clone(),
            ledger_failure: server.ledger_failure().map(str::to_owned),
        }
    }

    /// Take in one job (`queued` more wait behind it): control jobs are done at once,
    /// requests wait their peer's turn. Never called while the fair queue is full.
    fn take(&mut self, job: Job, queued: usize) {
        match job {
            Job::Request { peer, bytes, reply } => {
                // Never full here: callers stop taking jobs when it is.
                let _ = self.fair.push(peer, (bytes, reply));
            }
            Job::Snapshot(reply) => {
                self.server.expire_idle(Instant::now());
                unpark_stale(&mut self.server, &mut self.parked, Instant::now());
                let now = self.snapshot(queued);
                let _ = reply.send(now.clone());
                self.published.send_replace(now);
            }
            Job::StopAccepting => self.server.stop_accepting(),
        }
    }

    /// Serve one request at once, on the caller's thread: for a small step arriving while
    /// nothing waits (the caller checked the queue to the thread is empty), so nothing
    /// else's turn comes first.
    pub(super) fn serve_now(
        &mut self,
        peer: PeerId,
        bytes: Vec<u8>,
        reply: oneshot::Sender<Outgoing>,
    ) {
        self.metrics.inline_requests += 1;
        self.take(Job::Request { peer, bytes, reply }, 0);
        while !self.fair.is_empty() {
            self.serve_batch(0);
        }
    }

    /// Whatever waits, up to a batch: decode steps of different sessions among it run as
    /// one pass (`pipeline/server/batch.rs`).
    fn serve_batch(&mut self, queued: usize) {
        let mut requests = Vec::new();
        let mut replies = Vec::new();
        let most = self.server.limits().max_batch.clamp(1, MAX_BATCH);
        while requests.len() < most {
            let Some((peer, (bytes, reply))) = self.fair.pop() else {
                break;
            };
            self.metrics.requests += 1;
            self.metrics.bytes_in += bytes.len() as u64;
            match wire::decode::<SessionRequest>(&bytes, wire::FRAME_LIMIT) {
                Ok(request) => {
                    if let SessionRequest::Push { session, .. } = &request {
                        // A push for a step whose client stopped waiting runs nothing.
                        if self
                            .parked
                            .get(session)
                            .is_some_and(|(_, tx)| tx.is_closed())
                        {
                            self.parked.remove(session);
                            self.server.cancel_waiting(*session);
                        }
                    }
                    requests.push((peer, request));
                    replies.push(reply);
                }
                Err(e) => {
                    let refusal = SessionResponse::Refused(Refusal::BadRequest(e.to_string()));
                    let out = observe(&mut self.metrics, self.blocks, Answer::plain(refusal));
                    let _ = reply.send(out);
                }
            }
        }
        if requests.is_empty() {
            return;
        }
        let mut served = self.server.serve_many(requests, Instant::now());
        // Every output on to its next server first, then the signatures and answers.
        for answer in served.iter_mut().flat_map(Served::answers_mut) {
            push_on(answer, &self.pushes);
        }
        for (mut served, reply) in served.into_iter().zip(replies) {
            if let Some((session, mut answer)) = served.released.take() {
                self.server.seal(&mut answer);
                let out = observe(&mut self.metrics, self.blocks, answer);
                if let Some((_, waiting)) = self.parked.remove(&session) {
                    let _ = waiting.send(out);
                }
            }
            match served.reply {
                Reply::Now(mut answer) => {
                    self.server.seal(&mut answer);
                    let _ = reply.send(observe(&mut self.metrics, self.blocks, *answer));
                }
                Reply::Waits(session) => {
                    self.parked.insert(session, (Instant::now(), reply));
                }
            }
        }
        self.published.send_replace(self.snapshot(queued));
    }
}

/// The worker thread: waits for jobs, then takes in whatever has arrived and serves it a
/// batch at a time until nothing waits. It holds the state only while it works, so a
/// small step arriving while it sleeps runs on the network task.
pub(super) fn work(worker: Arc<Mutex<SpanWorker>>, mut jobs: mpsc::Receiver<Job>) {
    while let Some(first) = jobs.blocking_recv() {
        // A poisoned state (a step panicked on the network task) stops the worker: its
        // requests are then answered as if the node were shutting down.
        let Ok(mut state) = worker.lock() else {
            return;
        };
        state.take(first, jobs.len());
        loop {
            while !state.fair.is_full() {
                match jobs.try_recv() {
                    Ok(job) => state.take(job, jobs.len()),
                    Err(_) => break,
                }
            }
            if state.fair.is_empty() {
                break;
            }
            state.serve_batch(jobs.len());
        }
    }
}

/// Count an answer in the metrics and encode it.
fn observe(metrics: &mut NodeMetrics, blocks: f64, answer: Answer) -> Outgoing {
    match &answer.response {
        SessionResponse::Hidden { compute_micros, .. } => metrics
            .block_latency
            .observe(*compute_micros as f64 / 1e6 / blocks),
        SessionResponse::Refused(r) => metrics.refused(r),
        _ => {}
    }
    let out = Outgoing::of(answer);
    metrics.bytes_out += out.bytes.len() as u64;
    out
}

/// Refuse the steps that waited for a push too long, or whose client stopped waiting.
fn unpark_stale(
    server: &mut SpanServer,
    parked: &mut HashMap<SessionId, (Instant, oneshot::Sender<Outgoing>)>,
    now: Instant,
) {
    let stale: Vec<SessionId> = parked
        .iter()
        .filter(|(_, (since, tx))| tx.is_closed() || now.duration_since(*since) > PARK_LIMIT)
        .map(|(s, _)| *s)
        .collect();
    for session in stale {
        server.cancel_waiting(session);
        if let Some((_, tx)) = parked.remove(&session) {
            let refusal =
                Refusal::NoPushedInput(format!("no push came within {} s", PARK_LIMIT.as_secs()));
            let _ = tx.send(Outgoing::of(Answer::plain(SessionResponse::Refused(
                refusal,
            ))));
        }
    }
}
