//! Requests in, pushes out: each inbound request is admitted ([`Admission`]) and queued
//! for the worker (or served at once, [`InlineSteps`]), and each step's output the worker
//! pushes on goes to the next server.
//!
//! A push travels as a notice on the session stream to the next server when one is open:
//! nothing is answered, so a pushed hop costs one message, not two. A notice's sender
//! hears no refusal, so a notice that finds this server busy waits here for a moment
//! and tries again (as the pusher would have on a `Busy` answer), holding its place on
//! its stream meanwhile: the stream's cap on unanswered requests bounds how many wait.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

use super::worker::{Job, Outgoing};
use super::InlineSteps;
use crate::p2p;
use crate::pipeline::admission::Admission;
use crate::pipeline::{Refusal, SessionResponse};
use crate::wire;

/// How long a push may take to be taken by the next server (it answers once it ran the
/// step) before it counts as failed in the log.
const PUSH_TIMEOUT: Duration = Duration::from_secs(20);

/// Tries of a push (or a notice) the next server is too busy for, a few milliseconds
/// apart.
const PUSH_ATTEMPTS: u32 = 4;

/// A wait before another try that is longer than this is not worth it: the client, not
/// hearing from the next server in time, sends it the input itself.
const MAX_RETRY_WAIT_MS: u64 = 50;

/// What a request needs to be queued.
pub(super) struct Queue<'a> {
    pub jobs: &'a mpsc::Sender<Job>,
    pub inline: Option<&'a InlineSteps>,
    pub busy: &'a Arc<AtomicU64>,
    pub admission: &'a Arc<Mutex<Admission>>,
}

/// A request not queued, with what it was.
struct NotQueued {
    refusal: Refusal,
    bytes: Vec<u8>,
    reply: oneshot::Sender<Outgoing>,
}

/// Admit one request, queue it for the worker (or serve it now) and answer when it is
/// done; a request over its peer's limits or a full queue is answered at once (a notice
/// tries again, see the module's doc). Whether it was queued or served now.
pub(super) fn dispatch(
    client: &p2p::Client,
    queue: Queue<'_>,
    peer: PeerId,
    bytes: Vec<u8>,
    channel: p2p::ResponseChannel,
) -> bool {
    let client = client.clone();
    let (reply, answer) = oneshot::channel();
    let queued = admit(&queue, peer, bytes, reply, true);
    let was_queued = queued.is_ok();
    // Only a refused notice is tried again; the queue's sender it needs for that is
    // dropped before the answer is awaited, or a step waiting for its push would keep the
    // worker from ever seeing its queue close at shutdown.
    let retry_on = match &queued {
        Err(not) if !channel.wants_answer() && retry_wait(&not.refusal, 1).is_some() => {
            Some(queue.jobs.clone())
        }
        _ => None,
    };
    let (busy, admission) = (queue.busy.clone(), queue.admission.clone());
    tokio::spawn(async move {
        let queued = match (queued, retry_on) {
            (Err(not), Some(jobs)) => {
                let queue = Queue {
                    jobs: &jobs,
                    inline: None,
                    busy: &busy,
                    admission: &admission,
                };
                retry(queue, peer, not).await
            }
            (queued, _) => queued,
        };
        let response = match queued {
            Ok(()) => {
                let answer = answer.await;
                finish(&admission, &peer);
                match answer {
                    Ok(Outgoing { bytes }) => Some(bytes),
                    // The worker dropped a waiting step (it stopped).
                    Err(_) => wire::encode(&SessionResponse::Refused(Refusal::ShuttingDown)).ok(),
                }
            }
            Err(not) => {
                busy.fetch_add(1, Ordering::Relaxed);
                if !channel.wants_answer() {
                    tracing::debug!(%peer, "notice dropped: {}", not.refusal);
                }
                wire::encode(&SessionResponse::Refused(not.refusal)).ok()
            }
        };
        if let Some(bytes) = response {
            if let Err(e) = client.respond(channel, bytes).await {
                tracing::debug!(%peer, "response not delivered: {e}");
            }
        }
    });
    was_queued
}

/// A notice refused for a moment: tried again a few times, as its sender would have.
async fn retry(queue: Queue<'_>, peer: PeerId, mut not: NotQueued) -> Result<(), NotQueued> {
    for attempt in 1..PUSH_ATTEMPTS {
        let Some(wait) = retry_wait(&not.refusal, attempt) else {
            break;
        };
        tokio::time::sleep(wait).await;
        not = match admit(&queue, peer, not.bytes, not.reply, false) {
            Ok(()) => return Ok(()),
            Err(again) => again,
        };
    }
    Err(not)
}

/// How long to wait before try `attempt + 1` after `refusal`, if it is worth another.
fn retry_wait(refusal: &Refusal, attempt: u32) -> Option<Duration> {
    match refusal {
        Refusal::Busy => Some(Duration::from_millis(2 * u64::from(attempt))),
        Refusal::RateLimited { retry_after_ms } if *retry_after_ms <= MAX_RETRY_WAIT_MS => {
            Some(Duration::from_millis(*retry_after_ms))
        }
        _ => None,
    }
}

/// Admit and queue one request, or serve it now when `inline` may and the worker idles.
fn admit(
    queue: &Queue<'_>,
    peer: PeerId,
    bytes: Vec<u8>,
    reply: oneshot::Sender<Outgoing>,
    may_inline: bool,
) -> Result<(), NotQueued> {
    let admitted = match queue.admission.lock() {
        Ok(mut a) => a.admit(peer, Instant::now()),
        Err(_) => Err(Refusal::ShuttingDown),
    };
    if let Err(refusal) = admitted {
        return Err(NotQueued {
            refusal,
            bytes,
            reply,
        });
    }
    let jobs = queue.jobs;
    // Nothing waits for the worker and it is not working: this step's turn is now.
    let idle = queue
        .inline
        .filter(|i| {
            may_inline && bytes.len() <= i.max_bytes && jobs.capacity() == jobs.max_capacity()
        })
        .and_then(|i| i.state.try_lock().ok());
    if let Some(mut state) = idle {
        state.serve_now(peer, bytes, reply);
        return Ok(());
    }
    match jobs.try_reserve() {
        Ok(place) => {
            place.send(Job::Request { peer, bytes, reply });
            Ok(())
        }
        Err(full) => {
            finish(queue.admission, &peer);
            let refusal = match full {
                TrySendError::Full(()) => Refusal::Busy,
                TrySendError::Closed(()) => Refusal::ShuttingDown,
            };
            Err(NotQueued {
                refusal,
                bytes,
                reply,
            })
        }
    }
}

/// Send each step's output the worker pushes on to its next server ([`push_on`]).
pub(super) async fn send_pushes(
    client: p2p::Client,
    mut pushes: mpsc::Receiver<(PeerId, Vec<u8>)>,
) {
    while let Some((next, push)) = pushes.recv().await {
        tokio::spawn(push_on(client.clone(), next, push));
    }
}

/// Send a step's output on to the next server: as a notice on the stream to it, or as a
/// request, again after a moment while it is busy (its in-flight cap counts this server
/// as one peer, whatever clients the pushes are for). A push not taken is only logged:
/// the client, not hearing from the next server in time, sends it the input itself.
async fn push_on(client: p2p::Client, next: PeerId, push: Vec<u8>) {
    let Err(push) = client.notify(next, push).await else {
        return;
    };
    for attempt in 1..=PUSH_ATTEMPTS {
        let answer =
            match tokio::time::timeout(PUSH_TIMEOUT, client.request(next, push.clone())).await {
                Err(_) => Err(format!("no answer within {} s", PUSH_TIMEOUT.as_secs())),
                Ok(Err(e)) => Err(e.to_string()),
                Ok(Ok(reply)) => wire::decode::<SessionResponse>(&reply, wire::SMALL_LIMIT)
                    .map_err(|e| e.to_string()),
            };
        let why = match answer {
            Ok(SessionResponse::Acknowledged) => return,
            Ok(SessionResponse::Refused(refusal)) if attempt < PUSH_ATTEMPTS => {
                match retry_wait(&refusal, attempt) {
                    Some(wait) => {
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    None => refusal.to_string(),
                }
            }
            Ok(SessionResponse::Refused(r)) => r.to_string(),
            Ok(other) => format!("unexpected answer {other:?}"),
            Err(why) => why,
        };
        tracing::info!(%next, "push not taken: {why}");
        return;
    }
}

fn finish(admission: &Mutex<Admission>, peer: &PeerId) {
    if let Ok(mut a) = admission.lock() {
        a.finish(peer);
    }
}
