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
//! - a new stream is opened only while the peer has one connection and it is direct: a
//!   stream stays on the connection it was opened on (libp2p-stream picks one at random),
//!   a relayed connection is counted apart and given up once a direct one exists, and a
//!   second connection is most often an AutoNAT dial-back about to close. An open stream
//!   goes on serving while other connections come and go;
//! - the peer speaks the protocol: one that does not is asked by request-response from
//!   then on.
//!
//! Bounds: a frame is at most the codec's size limit; a server waits at most
//! [`SERVER_IDLE`] for a frame and holds at most [`MAX_IN_FLIGHT_PER_STREAM`] unanswered
//! requests per stream, [`MAX_STREAMS_PER_PEER`] streams per peer and
//! [`MAX_INBOUND_STREAMS`] in all; every write and every answer waited for is bounded by
//! the request timeout.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::io::{ReadHalf, WriteHalf};
use futures::{AsyncReadExt as _, AsyncWriteExt as _, StreamExt as _};
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::codec::{read_tagged, write_tagged, FrameKind};
use super::nudge::Nudged;
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
    /// Notices this peer sent on a stream: requests that want no answer (pushes).
    pub notices: u64,
    /// Small requests sent by request-response instead: no stream was open to the peer
    /// and none could be opened (the peer is not reached over one direct connection, or
    /// opening failed), or it was closing when the request came.
    pub fell_back: u64,
}

/// A session stream as both sides use it: pending writes polled again every
/// [`super::nudge::NUDGE`], since a stream was seen to leave one unwoken.
type SessionStream = Nudged<Stream>;

/// The answer a request on a stream gets.
enum Outcome {
    Answer(Vec<u8>),
    Unanswered,
}

/// One open stream to a server, shared by every request to it: callers write their own
/// frames (under the lock) and its reader task hands each answer to its caller, so a
/// request crosses no task of its own.
struct Channel {
    id: u64,
    /// `None` once the stream is closing: a request that finds it so goes another way.
    write: tokio::sync::Mutex<Option<WriteHalf<SessionStream>>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Outcome>>>,
    next_request: AtomicU64,
    /// When a request last went out, for closing it unused ([`CLIENT_IDLE`]).
    last_used: Mutex<Instant>,
    /// Cancelled when the peer's last connection closes.
    gone: CancellationToken,
}

impl Channel {
    /// Takes the write half (so no request writes any more) and closes it.
    async fn close(&self) {
        let write = self.write.lock().await.take();
        if let Some(mut write) = write {
            let _ = tokio::time::timeout(Duration::from_secs(1), write.close()).await;
        }
    }
}

/// What became of a frame written on a stream ([`Streams::write_on`]).
enum Written {
    Sent,
    /// The stream had closed: nothing was written.
    Closed,
    /// The write failed or timed out, and the stream is closed.
    Failed(String),
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
    /// Peers a new stream may be opened to: their one connection is direct.
    direct: Mutex<HashSet<PeerId>>,
    /// Peers that refused the protocol.
    unsupported: Mutex<HashSet<PeerId>>,
    channels: Mutex<HashMap<PeerId, Arc<Channel>>>,
    /// Streams each peer has open to this server.
    inbound: Mutex<HashMap<PeerId, Inbound>>,
    next_channel: AtomicU64,
    request_timeout: Duration,
    max_frame: usize,
    opened: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    requests: AtomicU64,
    notices: AtomicU64,
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
            inbound: Mutex::default(),
            next_channel: AtomicU64::new(0),
            request_timeout,
            max_frame,
            opened: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            notices: AtomicU64::new(0),
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
            notices: get(&self.notices),
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

    /// Called by the event loop when `peer`'s last connection closed: a stream does not
    /// always learn that by itself as soon (a connection closed for failed pings closes
    /// gracefully, and over a cut link that takes long), so the requests waiting on it fail
    /// now, as request-response's do, and the server stops serving its streams.
    pub(crate) fn peer_gone(&self, peer: PeerId) {
        if let Some(channel) = lock(&self.channels).remove(&peer) {
            channel.gone.cancel();
            lock(&channel.pending).clear();
        }
        if let Some(inbound) = lock(&self.inbound).get_mut(&peer) {
            inbound.gone.cancel();
            inbound.gone = CancellationToken::new();
        }
    }

    /// Sends `request` to `peer` on its stream when it may go there.
    pub(crate) async fn request(self: &Arc<Self>, peer: PeerId, request: Vec<u8>) -> Streamed {
        let Some(channel) = self.stream_for(peer, request.len()).await else {
            return Streamed::NotTaken(request);
        };
        let id = channel.next_request.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        lock(&channel.pending).insert(id, reply);
        let failed = |reason: String| Streamed::Done(Err(P2pError::Request { peer, reason }));
        match self
            .write_on(peer, &channel, id, FrameKind::Request, &request)
            .await
        {
            Written::Sent => {}
            Written::Closed => {
                // The stream closed before this request was written.
                lock(&channel.pending).remove(&id);
                self.fell_back.fetch_add(1, Ordering::Relaxed);
                return Streamed::NotTaken(request);
            }
            Written::Failed(why) => {
                lock(&channel.pending).remove(&id);
                return failed(why);
            }
        }
        match tokio::time::timeout(self.request_timeout, answer).await {
            Err(_) => {
                lock(&channel.pending).remove(&id);
                failed(format!(
                    "no answer within {} s",
                    self.request_timeout.as_secs()
                ))
            }
            Ok(Err(_)) => failed("the stream closed before the answer".into()),
            Ok(Ok(Outcome::Answer(answer))) => {
                self.requests.fetch_add(1, Ordering::Relaxed);
                Streamed::Done(Ok(answer))
            }
            Ok(Ok(Outcome::Unanswered)) => failed("the peer dropped the request".into()),
        }
    }

    /// Sends `request` to `peer` on its stream as a notice, which the server does not
    /// answer; the request comes back when it may not go there (the caller sends it by
    /// request-response and takes the answer). A notice that cannot be written is given
    /// up with the stream, and comes back too.
    pub(crate) async fn notify(
        self: &Arc<Self>,
        peer: PeerId,
        request: Vec<u8>,
    ) -> Result<(), Vec<u8>> {
        let Some(channel) = self.stream_for(peer, request.len()).await else {
            return Err(request);
        };
        let id = channel.next_request.fetch_add(1, Ordering::Relaxed);
        match self
            .write_on(peer, &channel, id, FrameKind::Notice, &request)
            .await
        {
            Written::Sent => {
                self.notices.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Written::Closed | Written::Failed(_) => {
                self.fell_back.fetch_add(1, Ordering::Relaxed);
                Err(request)
            }
        }
    }

    /// The stream a request of `len` bytes to `peer` may go on, if any: streams are on,
    /// the peer speaks the protocol, the request is small, and a stream is open or may
    /// be opened (counted as fallen back when it may not).
    async fn stream_for(self: &Arc<Self>, peer: PeerId, len: usize) -> Option<Arc<Channel>> {
        if !self.enabled || len > MAX_STREAMED_REQUEST || lock(&self.unsupported).contains(&peer) {
            return None;
        }
        let channel = self.channel(peer).await;
        if channel.is_none() {
            self.fell_back.fetch_add(1, Ordering::Relaxed);
        }
        channel
    }

    /// Writes one frame on `channel` within the request timeout. A frame that failed or
    /// timed out may be partly out, so nothing more can go on that stream: it is closed.
    async fn write_on(
        &self,
        peer: PeerId,
        channel: &Channel,
        id: u64,
        kind: FrameKind,
        payload: &[u8],
    ) -> Written {
        let written = tokio::time::timeout(self.request_timeout, async {
            let mut write = channel.write.lock().await;
            let Some(write) = write.as_mut() else {
                return Ok(false);
            };
            *lock(&channel.last_used) = Instant::now();
            write_tagged(write, id, kind, payload, self.max_frame)
                .await
                .map(|()| true)
        })
        .await;
        let why = match written {
            Ok(Ok(true)) => return Written::Sent,
            Ok(Ok(false)) => return Written::Closed,
            Ok(Err(e)) => format!("writing to the stream: {e}"),
            Err(_) => "writing to the stream timed out".to_string(),
        };
        self.forget(peer, channel.id);
        channel.close().await;
        Written::Failed(why)
    }

    /// The open stream to `peer`, or a new one.
    async fn channel(self: &Arc<Self>, peer: PeerId) -> Option<Arc<Channel>> {
        if let Some(c) = lock(&self.channels).get(&peer) {
            return Some(c.clone());
        }
        if !lock(&self.direct).contains(&peer) {
            return None;
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
        let (read, write) = Nudged::new(stream).split();
        let channel = Arc::new(Channel {
            id: self.next_channel.fetch_add(1, Ordering::Relaxed),
            write: tokio::sync::Mutex::new(Some(write)),
            pending: Mutex::default(),
            next_request: AtomicU64::new(0),
            last_used: Mutex::new(Instant::now()),
            gone: CancellationToken::new(),
        });
        {
            let mut channels = lock(&self.channels);
            if let Some(c) = channels.get(&peer) {
                // Another request opened one meanwhile: use it; ours closes unused.
                return Some(c.clone());
            }
            channels.insert(peer, channel.clone());
        }
        self.opened.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(read_answers(self.clone(), peer, channel.clone(), read));
        tokio::spawn(close_when_unused(self.clone(), peer, channel.clone()));
        Some(channel)
    }

    fn forget(&self, peer: PeerId, id: u64) {
        let mut channels = lock(&self.channels);
        if channels.get(&peer).is_some_and(|c| c.id == id) {
            channels.remove(&peer);
        }
    }
}

/// Hands each answer on `channel` to its caller until the stream closes or breaks; then
/// its callers learn so at once.
async fn read_answers(
    streams: Arc<Streams>,
    peer: PeerId,
    channel: Arc<Channel>,
    mut read: ReadHalf<SessionStream>,
) {
    loop {
        let frame = tokio::select! {
            frame = read_tagged(&mut read, streams.max_frame) => frame,
            () = channel.gone.cancelled() => break,
        };
        match frame {
            Ok((id, kind, payload)) => {
                if let Some(reply) = lock(&channel.pending).remove(&id) {
                    let _ = reply.send(match kind {
                        FrameKind::Answer => Outcome::Answer(payload),
                        _ => Outcome::Unanswered,
                    });
                }
            }
            Err(e) => {
                tracing::trace!(%peer, "session stream closed: {e}");
                break;
            }
        }
    }
    streams.forget(peer, channel.id);
    channel.close().await;
    // Requests written but unanswered: their callers see the stream closed.
    lock(&channel.pending).clear();
}

/// Closes `channel` once no request went out for [`CLIENT_IDLE`] and none waits.
async fn close_when_unused(streams: Arc<Streams>, peer: PeerId, channel: Arc<Channel>) {
    loop {
        tokio::time::sleep(CLIENT_IDLE / 4).await;
        let mut write = channel.write.lock().await;
        if write.is_none() {
            return; // Closed already.
        }
        if lock(&channel.last_used).elapsed() >= CLIENT_IDLE && lock(&channel.pending).is_empty() {
            streams.forget(peer, channel.id);
            let taken = write.take();
            drop(write);
            if let Some(mut taken) = taken {
                let _ = tokio::time::timeout(Duration::from_secs(1), taken.close()).await;
            }
            return;
        }
    }
}

/// A server's write half of one stream, shared by the responders of its requests;
/// `None` once a write failed.
type SharedWrite = Arc<tokio::sync::Mutex<Option<WriteHalf<SessionStream>>>>;

/// Answers one request that came on a stream, writing straight onto it; dropped
/// unanswered, it tells the requester so at once.
pub(crate) struct StreamResponder {
    id: u64,
    /// False for a notice: nothing is written back, answered or not.
    wants_answer: bool,
    write: SharedWrite,
    /// The request's place among the stream's unanswered ones, freed once answered.
    slot: Option<OwnedSemaphorePermit>,
    timeout: Duration,
    max_frame: usize,
}

impl std::fmt::Debug for StreamResponder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamResponder")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl StreamResponder {
    pub(crate) fn wants_answer(&self) -> bool {
        self.wants_answer
    }

    pub(crate) async fn answer(mut self, payload: Vec<u8>) -> Result<(), P2pError> {
        let slot = self.slot.take();
        if !self.wants_answer {
            return Ok(());
        }
        let written = send(
            &self.write,
            self.id,
            FrameKind::Answer,
            &payload,
            self.timeout,
            self.max_frame,
        )
        .await;
        drop(slot);
        written
    }
}

impl Drop for StreamResponder {
    fn drop(&mut self) {
        if !self.wants_answer {
            return;
        }
        let Some(slot) = self.slot.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (write, id, timeout, max) = (self.write.clone(), self.id, self.timeout, self.max_frame);
        runtime.spawn(async move {
            let _ = send(&write, id, FrameKind::Unanswered, &[], timeout, max).await;
            drop(slot);
        });
    }
}

/// Writes one frame under the stream's lock, within `timeout`; a failed or late write
/// gives the stream up.
async fn send(
    write: &SharedWrite,
    id: u64,
    kind: FrameKind,
    payload: &[u8],
    timeout: Duration,
    max: usize,
) -> Result<(), P2pError> {
    let written = tokio::time::timeout(timeout, async {
        let mut guard = write.lock().await;
        let half = guard.as_mut().ok_or(P2pError::Respond)?;
        let result = write_tagged(half, id, kind, payload, max).await;
        if result.is_err() {
            *guard = None;
        }
        result.map_err(|_| P2pError::Respond)
    })
    .await;
    match written {
        Ok(result) => result,
        Err(_) => {
            // Part of a frame may be out: nothing more can go on this stream.
            write.lock().await.take();
            Err(P2pError::Respond)
        }
    }
}

/// A peer's streams open to this server.
#[derive(Default)]
struct Inbound {
    open: usize,
    /// Cancelled (and replaced) when the peer's last connection closes.
    gone: CancellationToken,
}

/// A server's side: lets in streams under the caps and serves each.
pub(crate) async fn accept(
    mut incoming: libp2p_stream::IncomingStreams,
    streams: Arc<Streams>,
    events: mpsc::Sender<Event>,
) {
    while let Some((peer, stream)) = incoming.next().await {
        let gone = {
            let mut inbound = lock(&streams.inbound);
            let total: usize = inbound.values().map(|i| i.open).sum();
            let mine = inbound.entry(peer).or_default();
            (mine.open < MAX_STREAMS_PER_PEER && total < MAX_INBOUND_STREAMS).then(|| {
                mine.open += 1;
                mine.gone.clone()
            })
        };
        let Some(gone) = gone else {
            streams.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "session stream refused: over the stream limits");
            continue;
        };
        streams.accepted.fetch_add(1, Ordering::Relaxed);
        let (events, streams) = (events.clone(), streams.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = serve(peer, stream, &streams, events) => {}
                () = gone.cancelled() => {}
            }
            let mut inbound = lock(&streams.inbound);
            if let Some(i) = inbound.get_mut(&peer) {
                i.open = i.open.saturating_sub(1);
                if i.open == 0 {
                    inbound.remove(&peer);
                }
            }
        });
    }
}

/// Reads `peer`'s requests off one stream into the event queue until it closes, falls
/// silent for [`SERVER_IDLE`] or sends a malformed frame.
async fn serve(peer: PeerId, stream: Stream, streams: &Streams, events: mpsc::Sender<Event>) {
    let (mut read, write) = Nudged::new(stream).split();
    let write: SharedWrite = Arc::new(tokio::sync::Mutex::new(Some(write)));
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_STREAM));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let frame = tokio::time::timeout(SERVER_IDLE, read_tagged(&mut read, streams.max_frame));
        let (id, kind, request) = match frame.await {
            Ok(Ok((id, kind @ (FrameKind::Request | FrameKind::Notice), request))) => {
                (id, kind, request)
            }
            Ok(Ok((_, kind, _))) => {
                tracing::debug!(%peer, ?kind, "session stream: not a request; closing it");
                break;
            }
            Ok(Err(e)) => {
                tracing::debug!(%peer, "session stream: {e}");
                break;
            }
            Err(_) => break,
        };
        let channel = super::ResponseChannel::streamed(StreamResponder {
            id,
            wants_answer: kind == FrameKind::Request,
            write: write.clone(),
            slot: Some(slot),
            timeout: streams.request_timeout,
            max_frame: streams.max_frame,
        });
        let event = Event::InboundRequest {
            peer,
            request,
            channel,
        };
        if events.send(event).await.is_err() {
            break;
        }
    }
    // Answers still owed go out as they come; the stream closes when the last is written
    // (every responder holds the write half) or now, if none is owed.
    if Arc::strong_count(&write) == 1 {
        if let Some(mut half) = write.lock().await.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), half.close()).await;
        }
    }
}
