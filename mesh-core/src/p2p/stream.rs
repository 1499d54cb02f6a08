//! `/mesh/session-stream/1`: session requests on one long-lived stream per peer pair.
//!
//! A request-response exchange opens, negotiates and closes a substream for every step,
//! and crosses the swarm's event loop on both sides. Here a peer opens one stream to each
//! server it asks, at its first request, and keeps it until [`CLIENT_IDLE`] passes unused.
//! Requests and answers are frames tagged with a request id ([`super::codec::write_tagged`]),
//! so one stream carries every session between the two peers and an answer may come back
//! before an earlier one (a step waiting for its push holds nothing up). The requester's
//! task writes and reads the stream itself; the server's stream task hands requests
//! straight to the [`Event`] queue and writes answers straight back.
//!
//! Requests take the stream only when:
//! - they are small ([`MAX_STREAMED_REQUEST`]): a long prefill would hold every decode
//!   step queued behind it, so it goes by request-response on its own substream;
//! - the peer is reached directly: a stream stays on the connection it was opened on, and
//!   a relayed connection is counted apart and given up once a direct one exists;
//! - the peer speaks the protocol: one that does not is asked by request-response from
//!   then on.
//!
//! Bounds: a frame is at most the codec's size limit; a server waits at most
//! [`SERVER_IDLE`] for a frame and holds at most [`MAX_IN_FLIGHT_PER_STREAM`] unanswered
//! requests per stream, [`MAX_STREAMS_PER_PEER`] streams per peer and
//! [`MAX_INBOUND_STREAMS`] in all; every write and every answer waited for is bounded by
//! the request timeout.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::io::{ReadHalf, WriteHalf};
use futures::{AsyncReadExt as _, AsyncWriteExt as _, StreamExt as _};
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::codec::{read_tagged, write_tagged, FrameKind};
use super::{Event, P2pError};

/// The protocol's name; listed in docs/protocol.md.
pub const STREAM_PROTOCOL: StreamProtocol = StreamProtocol::new("/mesh/session-stream/1");
/// Larger requests go by request-response.
pub const MAX_STREAMED_REQUEST: usize = 1 << 20;
/// A requester closes a stream unused this long (before the server's [`SERVER_IDLE`], so
/// a request is never written to a stream the server is closing).
pub const CLIENT_IDLE: Duration = Duration::from_secs(30);
/// A server closes a stream that sends no frame for this long.
pub const SERVER_IDLE: Duration = Duration::from_secs(120);
/// Unanswered requests a server takes on one stream before it stops reading it.
pub const MAX_IN_FLIGHT_PER_STREAM: usize = 64;
/// Streams a server keeps open from one peer; more are reset.
pub const MAX_STREAMS_PER_PEER: usize = 4;
/// Streams a server keeps open from all peers.
pub const MAX_INBOUND_STREAMS: usize = 1024;
/// How long opening a stream may take before the request goes by request-response.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests queued for a stream's task before callers wait.
const OUTGOING_QUEUE: usize = 32;
/// A requester prunes answers nobody waits for any more past this many.
const PRUNE_PENDING_AT: usize = 256;

/// What went over session streams, this peer's side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Streams this peer opened to others.
    pub opened: u64,
    /// Streams others opened to this peer and were let in.
    pub accepted: u64,
    /// Inbound streams reset over [`MAX_STREAMS_PER_PEER`] or [`MAX_INBOUND_STREAMS`].
    pub refused: u64,
    /// Requests this peer sent on a stream.
    pub requests: u64,
    /// Small requests to a direct peer sent by request-response instead: the stream
    /// could not be opened, or closed before the request was written.
    pub fell_back: u64,
}

/// The answer a stream's task gives one request.
enum Outcome {
    Answer(Vec<u8>),
    Unanswered,
    /// The stream closed before the request was written: it may go another way.
    Unsent(Vec<u8>),
    Failed(String),
}

struct Outgoing {
    request: Vec<u8>,
    reply: oneshot::Sender<Outcome>,
}

#[derive(Clone)]
struct Channel {
    id: u64,
    tx: mpsc::Sender<Outgoing>,
}

/// Where a request went.
pub(crate) enum Streamed {
    /// Sent on a stream: its answer or why there is none.
    Done(Result<Vec<u8>, P2pError>),
    /// Not sent: the caller sends it by request-response.
    NotTaken(Vec<u8>),
}

/// A peer's session streams: the ones it opened, the peers it may open them to, and the
/// counters of both sides.
pub(crate) struct Streams {
    enabled: bool,
    control: Mutex<libp2p_stream::Control>,
    /// Peers whose every connection is direct.
    direct: Mutex<HashSet<PeerId>>,
    /// Peers that refused the protocol.
    unsupported: Mutex<HashSet<PeerId>>,
    channels: Mutex<HashMap<PeerId, Channel>>,
    next_channel: AtomicU64,
    request_timeout: Duration,
    max_frame: usize,
    opened: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    requests: AtomicU64,
    fell_back: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams")
            .field("enabled", &self.enabled)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Streams {
    pub(crate) fn new(
        enabled: bool,
        control: libp2p_stream::Control,
        request_timeout: Duration,
        max_frame: usize,
    ) -> Self {
        Self {
            enabled,
            control: Mutex::new(control),
            direct: Mutex::default(),
            unsupported: Mutex::default(),
            channels: Mutex::default(),
            next_channel: AtomicU64::new(0),
            request_timeout,
            max_frame,
            opened: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            fell_back: AtomicU64::new(0),
        }
    }

    pub(crate) fn stats(&self) -> StreamStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StreamStats {
            opened: get(&self.opened),
            accepted: get(&self.accepted),
            refused: get(&self.refused),
            requests: get(&self.requests),
            fell_back: get(&self.fell_back),
        }
    }

    /// Called by the event loop whenever `peer`'s connections change.
    pub(crate) fn set_direct(&self, peer: PeerId, direct: bool) {
        let mut set = lock(&self.direct);
        if direct {
            set.insert(peer);
        } else {
            set.remove(&peer);
        }
    }

    /// Sends `request` to `peer` on its stream when it may go there.
    pub(crate) async fn request(self: &Arc<Self>, peer: PeerId, request: Vec<u8>) -> Streamed {
        if !self.enabled
            || request.len() > MAX_STREAMED_REQUEST
            || !lock(&self.direct).contains(&peer)
            || lock(&self.unsupported).contains(&peer)
        {
            return Streamed::NotTaken(request);
        }
        let Some(channel) = self.channel(peer).await else {
            self.fell_back.fetch_add(1, Ordering::Relaxed);
            return Streamed::NotTaken(request);
        };
        let (reply, answer) = oneshot::channel();
        if let Err(mpsc::error::SendError(o)) = channel.tx.send(Outgoing { request, reply }).await {
            self.forget(peer, channel.id);
            self.fell_back.fetch_add(1, Ordering::Relaxed);
            return Streamed::NotTaken(o.request);
        }
        let failed = |reason: String| Streamed::Done(Err(P2pError::Request { peer, reason }));
        match tokio::time::timeout(self.request_timeout, answer).await {
            Err(_) => failed(format!(
                "no answer within {} s",
                self.request_timeout.as_secs()
            )),
            Ok(Err(_)) => failed("the stream closed before the answer".into()),
            Ok(Ok(Outcome::Answer(answer))) => {
                self.requests.fetch_add(1, Ordering::Relaxed);
                Streamed::Done(Ok(answer))
            }
            Ok(Ok(Outcome::Unanswered)) => failed("the peer dropped the request".into()),
            Ok(Ok(Outcome::Unsent(request))) => {
                self.fell_back.fetch_add(1, Ordering::Relaxed);
                Streamed::NotTaken(request)
            }
            Ok(Ok(Outcome::Failed(reason))) => failed(reason),
        }
    }

    /// The open stream to `peer`, or a new one.
    async fn channel(self: &Arc<Self>, peer: PeerId) -> Option<Channel> {
        if let Some(c) = lock(&self.channels).get(&peer) {
            if !c.tx.is_closed() {
                return Some(c.clone());
            }
        }
        let mut control = lock(&self.control).clone();
        let stream =
            match tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, STREAM_PROTOCOL))
                .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(_))) => {
                    tracing::debug!(%peer, "no session streams: asking by request-response");
                    lock(&self.unsupported).insert(peer);
                    return None;
                }
                Ok(Err(e)) => {
                    tracing::debug!(%peer, "opening a session stream: {e}");
                    return None;
                }
                Err(_) => {
                    tracing::debug!(%peer, "opening a session stream timed out");
                    return None;
                }
            };
        let (tx, rx) = mpsc::channel(OUTGOING_QUEUE);
        let channel = Channel {
            id: self.next_channel.fetch_add(1, Ordering::Relaxed),
            tx,
        };
        {
            let mut channels = lock(&self.channels);
            if let Some(c) = channels.get(&peer) {
                // Another request opened one meanwhile: use it, close ours.
                if !c.tx.is_closed() {
                    return Some(c.clone());
                }
            }
            channels.insert(peer, channel.clone());
        }
        self.opened.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(run_channel(Arc::clone(self), peer, channel.id, stream, rx));
        Some(channel)
    }

    fn forget(&self, peer: PeerId, id: u64) {
        let mut channels = lock(&self.channels);
        if channels.get(&peer).is_some_and(|c| c.id == id) {
            channels.remove(&peer);
        }
    }
}

/// A requester's stream: writes the queued requests, hands each answer to its caller,
/// closes when unused for [`CLIENT_IDLE`] or broken.
async fn run_channel(
    streams: Arc<Streams>,
    peer: PeerId,
    id: u64,
    stream: Stream,
    mut requests: mpsc::Receiver<Outgoing>,
) {
    let (read, mut write) = stream.split();
    let (frames_tx, mut frames) = mpsc::channel(OUTGOING_QUEUE);
    let reader = tokio::spawn(read_frames(read, frames_tx, streams.max_frame));
    let mut pending: HashMap<u64, oneshot::Sender<Outcome>> = HashMap::new();
    let mut next = 0u64;
    let why = loop {
        tokio::select! {
            outgoing = requests.recv() => {
                let Some(Outgoing { request, reply }) = outgoing else { break "unused" };
                next += 1;
                let written = tokio::time::timeout(
                    streams.request_timeout,
                    write_tagged(&mut write, next, FrameKind::Request, &request, streams.max_frame),
                )
                .await
                .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")));
                if let Err(e) = written {
                    let _ = reply.send(Outcome::Failed(format!("writing to the stream: {e}")));
                    break "write failed";
                }
                if pending.len() >= PRUNE_PENDING_AT {
                    pending.retain(|_, r| !r.is_closed());
                }
                pending.insert(next, reply);
            }
            frame = frames.recv() => match frame {
                Some(Ok((rid, kind, payload))) => {
                    if let Some(reply) = pending.remove(&rid) {
                        let _ = reply.send(match kind {
                            FrameKind::Answer => Outcome::Answer(payload),
                            _ => Outcome::Unanswered,
                        });
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(%peer, "session stream: {e}");
                    break "read failed";
                }
                None => break "closed",
            },
            () = tokio::time::sleep(CLIENT_IDLE), if pending.is_empty() => break "idle",
        }
    };
    tracing::trace!(%peer, why, "session stream closed");
    reader.abort();
    streams.forget(peer, id);
    requests.close();
    while let Ok(o) = requests.try_recv() {
        let _ = o.reply.send(Outcome::Unsent(o.request));
    }
    // Requests written but unanswered are dropped: their callers see the stream closed.
    drop(pending);
    let _ = tokio::time::timeout(Duration::from_secs(1), write.close()).await;
}

type Frame = io::Result<(u64, FrameKind, Vec<u8>)>;

async fn read_frames(mut read: ReadHalf<Stream>, tx: mpsc::Sender<Frame>, max: usize) {
    loop {
        let frame = read_tagged(&mut read, max).await;
        let last = frame.is_err();
        if tx.send(frame).await.is_err() || last {
            return;
        }
    }
}

/// An answer queued for a server's stream; its permit frees the request's slot once
/// written.
#[derive(Debug)]
struct Answer {
    id: u64,
    kind: FrameKind,
    payload: Vec<u8>,
    _slot: OwnedSemaphorePermit,
}

/// Answers one request that came on a stream; dropped unanswered, it tells the requester
/// so at once.
#[derive(Debug)]
pub(crate) struct StreamResponder {
    id: u64,
    answers: mpsc::Sender<Answer>,
    slot: Option<OwnedSemaphorePermit>,
}

impl StreamResponder {
    /// Queues the answer; the queue has room for every slot, so this never waits.
    pub(crate) fn answer(mut self, payload: Vec<u8>) -> Result<(), P2pError> {
        self.send(FrameKind::Answer, payload)
    }

    fn send(&mut self, kind: FrameKind, payload: Vec<u8>) -> Result<(), P2pError> {
        let slot = self.slot.take().ok_or(P2pError::Respond)?;
        self.answers
            .try_send(Answer {
                id: self.id,
                kind,
                payload,
                _slot: slot,
            })
            .map_err(|_| P2pError::Respond)
    }
}

impl Drop for StreamResponder {
    fn drop(&mut self) {
        if self.slot.is_some() {
            let _ = self.send(FrameKind::Unanswered, Vec::new());
        }
    }
}

/// A server's side: lets in streams under the caps and serves each.
pub(crate) async fn accept(
    mut incoming: libp2p_stream::IncomingStreams,
    streams: Arc<Streams>,
    events: mpsc::Sender<Event>,
) {
    let open: Arc<Mutex<HashMap<PeerId, usize>>> = Arc::default();
    while let Some((peer, stream)) = incoming.next().await {
        let admitted = {
            let mut open = lock(&open);
            let total: usize = open.values().sum();
            let mine = open.entry(peer).or_default();
            let admitted = *mine < MAX_STREAMS_PER_PEER && total < MAX_INBOUND_STREAMS;
            if admitted {
                *mine += 1;
            }
            admitted
        };
        if !admitted {
            streams.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "session stream refused: over the stream limits");
            continue;
        }
        streams.accepted.fetch_add(1, Ordering::Relaxed);
        let (open, events, streams) = (open.clone(), events.clone(), streams.clone());
        tokio::spawn(async move {
            serve(peer, stream, &streams, events).await;
            let mut open = lock(&open);
            if let Some(n) = open.get_mut(&peer) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.remove(&peer);
                }
            }
        });
    }
}

/// Reads `peer`'s requests off one stream into the event queue until it closes, falls
/// silent for [`SERVER_IDLE`] or sends a malformed frame.
async fn serve(peer: PeerId, stream: Stream, streams: &Streams, events: mpsc::Sender<Event>) {
    let (mut read, write) = stream.split();
    let (answers, answers_rx) = mpsc::channel(MAX_IN_FLIGHT_PER_STREAM);
    tokio::spawn(write_answers(
        write,
        answers_rx,
        streams.request_timeout,
        streams.max_frame,
    ));
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_STREAM));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let frame = tokio::time::timeout(SERVER_IDLE, read_tagged(&mut read, streams.max_frame));
        let (id, request) = match frame.await {
            Ok(Ok((id, FrameKind::Request, request))) => (id, request),
            Ok(Ok((_, kind, _))) => {
                tracing::debug!(%peer, ?kind, "session stream: not a request; closing it");
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(%peer, "session stream: {e}");
                return;
            }
            Err(_) => return,
        };
        let channel = super::ResponseChannel::streamed(StreamResponder {
            id,
            answers: answers.clone(),
            slot: Some(slot),
        });
        let event = Event::InboundRequest {
            peer,
            request,
            channel,
        };
        if events.send(event).await.is_err() {
            return;
        }
    }
}

/// Writes a stream's answers in the order they are ready, until every responder is gone
/// or a write fails or takes longer than `timeout`.
async fn write_answers(
    mut write: WriteHalf<Stream>,
    mut answers: mpsc::Receiver<Answer>,
    timeout: Duration,
    max: usize,
) {
    while let Some(a) = answers.recv().await {
        let written = tokio::time::timeout(
            timeout,
            write_tagged(&mut write, a.id, a.kind, &a.payload, max),
        )
        .await;
        if !matches!(written, Ok(Ok(()))) {
            return;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), write.close()).await;
}
