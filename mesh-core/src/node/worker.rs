//! The span's worker thread: owns the [`SpanServer`] and its sessions, serves queued
//! requests one per peer in turn, and holds the steps that wait for a pushed input. A
//! step's output goes on to the next server before its answer is signed and encoded: the
//! push is on the token's path, the signature is not.

use std::collections::HashMap;
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

/// The worker thread. After every request and snapshot it publishes a fresh snapshot for
/// status pages.
pub(super) fn work(
    mut server: SpanServer,
    mut jobs: mpsc::Receiver<Job>,
    pushes: mpsc::Sender<(PeerId, Vec<u8>)>,
    published: watch::Sender<NodeSnapshot>,
) {
    let mut metrics = NodeMetrics::default();
    let blocks = f64::from(server.span().range().len().max(1));
    let snapshot = |server: &SpanServer, metrics: &NodeMetrics, queued| NodeSnapshot {
        stats: server.stats(),
        active_sessions: server.active_sessions(),
        reserved_bytes: server.reserved_bytes(),
        free_cache_bytes: server.free_cache_bytes(),
        throughput_tps: server.throughput(),
        queued,
        metrics: metrics.clone(),
        ledger_failure: server.ledger_failure().map(str::to_owned),
    };
    let mut fair = FairQueue::new(REQUEST_QUEUE);
    let mut parked: HashMap<SessionId, (Instant, oneshot::Sender<Outgoing>)> = HashMap::new();
    loop {
        // Take in what has arrived (waiting only when there is nothing to do); control jobs
        // are done at once, requests wait their peer's turn.
        while !fair.is_full() {
            let job = if fair.is_empty() {
                match jobs.blocking_recv() {
                    Some(job) => job,
                    None => return,
                }
            } else {
                match jobs.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            };
            match job {
                Job::Request { peer, bytes, reply } => {
                    // Never full here: the loop stops taking jobs when it is.
                    let _ = fair.push(peer, (bytes, reply));
                }
                Job::Snapshot(reply) => {
                    server.expire_idle(Instant::now());
                    unpark_stale(&mut server, &mut parked, Instant::now());
                    let now = snapshot(&server, &metrics, jobs.len() + fair.len());
                    let _ = reply.send(now.clone());
                    published.send_replace(now);
                }
                Job::StopAccepting => server.stop_accepting(),
            }
        }
        // Whatever queued while the worker was busy, up to a batch: decode steps of
        // different sessions among it run as one pass (`pipeline/server/batch.rs`).
        let mut requests = Vec::new();
        let mut replies = Vec::new();
        let most = server.limits().max_batch.clamp(1, MAX_BATCH);
        while requests.len() < most {
            let Some((peer, (bytes, reply))) = fair.pop() else {
                break;
            };
            metrics.requests += 1;
            metrics.bytes_in += bytes.len() as u64;
            match wire::decode::<SessionRequest>(&bytes, wire::FRAME_LIMIT) {
                Ok(request) => {
                    if let SessionRequest::Push { session, .. } = &request {
                        // A push for a step whose client stopped waiting runs nothing.
                        if parked.get(session).is_some_and(|(_, tx)| tx.is_closed()) {
                            parked.remove(session);
                            server.cancel_waiting(*session);
                        }
                    }
                    requests.push((peer, request));
                    replies.push(reply);
                }
                Err(e) => {
                    let refusal = SessionResponse::Refused(Refusal::BadRequest(e.to_string()));
                    let _ = reply.send(observe(&mut metrics, blocks, Answer::plain(refusal)));
                }
            }
        }
        if requests.is_empty() {
            continue;
        }
        let mut served = server.serve_many(requests, Instant::now());
        // Every output on to its next server first, then the signatures and answers.
        for answer in served.iter_mut().flat_map(Served::answers_mut) {
            push_on(answer, &pushes);
        }
        for (mut served, reply) in served.into_iter().zip(replies) {
            if let Some((session, mut answer)) = served.released.take() {
                server.seal(&mut answer);
                let out = observe(&mut metrics, blocks, answer);
                if let Some((_, waiting)) = parked.remove(&session) {
                    let _ = waiting.send(out);
                }
            }
            match served.reply {
                Reply::Now(mut answer) => {
                    server.seal(&mut answer);
                    let _ = reply.send(observe(&mut metrics, blocks, *answer));
                }
                Reply::Waits(session) => {
                    parked.insert(session, (Instant::now(), reply));
                }
            }
        }
        published.send_replace(snapshot(&server, &metrics, jobs.len() + fair.len()));
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
