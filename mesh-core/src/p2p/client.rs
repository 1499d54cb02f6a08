//! [`Client`]: the cloneable handle to a peer's event loop.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use libp2p::{request_response, Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

use super::heartbeat::GossipStats;
use super::reachability::Reachability;
use super::stream::{StreamResponder, StreamStats, Streamed, Streams};
use super::P2pError;
use crate::types::{BlockRange, Capability, GpuLive, ModelId, RemoteSpan, ServerInfo, ServerLoad};

/// What a server announces: the span it serves and what it charges.
#[derive(Debug, Clone, PartialEq)]
pub struct Announcement {
    pub model: ModelId,
    pub span: BlockRange,
    /// How many blocks the whole model has.
    pub num_blocks: u32,
    /// Micro-units per token; 0 = free.
    pub price_per_token: u64,
    /// Initial load figures; update them with [`Client::set_load`].
    pub load: ServerLoad,
    /// This server's hardware, sent in every heartbeat.
    pub capability: Capability,
    /// How the span's weights are stored; empty = full precision.
    pub quantization: String,
}

impl Announcement {
    /// Checks the model name and that the span fits the model.
    pub fn validate(&self) -> Result<(), P2pError> {
        if !self.model.is_valid() {
            return Err(P2pError::Invalid("model name"));
        }
        if !self.capability.is_valid() {
            return Err(P2pError::Invalid("capability over its bounds"));
        }
        if self.num_blocks > super::dht::MAX_BLOCKS || !self.span.fits(self.num_blocks) {
            return Err(P2pError::Invalid("span does not fit the model"));
        }
        Ok(())
    }
}

/// The channel to answer one inbound session request on ([`Client::respond`]).
#[derive(Debug)]
pub struct ResponseChannel {
    pub(crate) inner: Responder,
}

#[derive(Debug)]
pub(crate) enum Responder {
    /// A request-response exchange, answered through the event loop.
    Exchange {
        channel: request_response::ResponseChannel<Vec<u8>>,
        /// The request came over a relayed connection (its bytes are counted as relayed).
        relayed: bool,
    },
    /// A request on a session stream, answered straight onto it.
    Stream(StreamResponder),
}

impl ResponseChannel {
    pub(crate) fn exchange(
        channel: request_response::ResponseChannel<Vec<u8>>,
        relayed: bool,
    ) -> Self {
        Self {
            inner: Responder::Exchange { channel, relayed },
        }
    }

    pub(crate) fn streamed(responder: StreamResponder) -> Self {
        Self {
            inner: Responder::Stream(responder),
        }
    }

    /// False for a notice ([`Client::notify`]): its sender reads no answer, so a refusal
    /// reaches nobody.
    pub fn wants_answer(&self) -> bool {
        match &self.inner {
            Responder::Exchange { .. } => true,
            Responder::Stream(responder) => responder.wants_answer(),
        }
    }
}

/// Counters of what this peer accepted, rejected and dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct P2pStats {
    /// Heartbeat validation outcomes.
    pub gossip: GossipStats,
    pub heartbeats_published: u64,
    pub heartbeat_publish_failures: u64,
    /// Inbound DHT values (server records) stored / refused; refused also counts invalid
    /// records met in lookups.
    pub dht_records_accepted: u64,
    pub dht_records_rejected: u64,
    /// Inbound provider records stored / refused.
    pub dht_providers_accepted: u64,
    pub dht_providers_rejected: u64,
    /// Events dropped because the event queue was full.
    pub events_dropped: u64,
    /// Session streams: opened, let in, requests sent on them.
    pub streams: StreamStats,
    /// Connections closed because their peer stopped answering pings.
    pub unresponsive_closed: u64,
    /// Inbound connections refused because their IP address already held
    /// [`crate::p2p::P2pConfig::max_connections_per_ip`] of them.
    pub ip_limited: u64,
    /// Inbound connections refused before their handshake because their IP address had
    /// [`crate::p2p::P2pConfig::max_pending_connections_per_ip`] in handshakes already.
    pub pending_ip_limited: u64,
    pub connected_peers: usize,
    /// Established connections: about one per peer; more while a relayed one gives way
    /// to a direct one, or both sides dialed at once.
    pub connections: usize,
    /// Relay server, relay reservations and hole punching.
    pub relay: super::nat::RelayStats,
}

pub(crate) type Reply<T> = oneshot::Sender<Result<T, P2pError>>;

pub(crate) enum Command {
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    AnnounceAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Dial(Multiaddr, Reply<()>),
    DialPeer(PeerId, Vec<Multiaddr>),
    Announce(Announcement, Reply<()>),
    Unannounce(Reply<()>),
    SetLoad(ServerLoad),
    SetGpuLive(Vec<GpuLive>),
    Subscribe(ModelId, Reply<()>),
    Lookup(ModelId, u32, Reply<Vec<RemoteSpan>>),
    LiveServers(ModelId, oneshot::Sender<Vec<ServerInfo>>),
    KnownServers(ModelId, oneshot::Sender<Vec<RemoteSpan>>),
    Request(PeerId, Vec<u8>, Reply<Vec<u8>>),
    Respond {
        channel: request_response::ResponseChannel<Vec<u8>>,
        relayed: bool,
        response: Vec<u8>,
        reply: Reply<()>,
    },
    Stats(oneshot::Sender<P2pStats>),
    CheckReachability(Reply<Vec<Reachability>>),
    NatReport(oneshot::Sender<super::nat::NatReport>),
    ConnectedPeers(oneshot::Sender<Vec<PeerId>>),
    Shutdown(oneshot::Sender<()>),
}

/// A handle to a running peer. Cheap to clone; every call is a command to the event loop.
#[derive(Clone, Debug)]
pub struct Client {
    tx: mpsc::Sender<Command>,
    peer_id: PeerId,
    streams: Arc<Streams>,
}

impl Client {
    pub(crate) fn new(tx: mpsc::Sender<Command>, peer_id: PeerId, streams: Arc<Streams>) -> Self {
        Self {
            tx,
            peer_id,
            streams,
        }
    }

    async fn send(&self, cmd: Command) -> Result<(), P2pError> {
        self.tx.send(cmd).await.map_err(|_| P2pError::Closed)
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, P2pError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await?;
        rx.await.map_err(|_| P2pError::Closed)
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, P2pError> {
        self.ask(make).await?
    }

    /// This peer's id.
    pub fn local_peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Where this peer listens, each with its `/p2p/<peer id>` suffix.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, P2pError> {
        self.ask(Command::ListenAddrs).await
    }

    /// The addresses this peer puts in its records and heartbeats (public addresses if
    /// configured, else its concrete listen addresses).
    pub async fn announce_addrs(&self) -> Result<Vec<Multiaddr>, P2pError> {
        self.ask(Command::AnnounceAddrs).await
    }

    /// Connects to `addr`. With a `/p2p/<peer id>` suffix the peer is also added to the DHT
    /// routing table. Resolves once the connection is up (or failed).
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), P2pError> {
        self.call(|r| Command::Dial(addr, r)).await
    }

    /// Starts announcing `ann` in the DHT and heartbeating it on its model's topic, until
    /// [`Client::unannounce`]. Replaces a previous announcement.
    pub async fn announce(&self, ann: Announcement) -> Result<(), P2pError> {
        ann.validate()?;
        self.call(|r| Command::Announce(ann, r)).await
    }

    /// Withdraws the announcement: stops providing, stores an offline record, sends a last
    /// "leaving" heartbeat. Resolves once the offline record is stored (or the query ends).
    pub async fn unannounce(&self) -> Result<(), P2pError> {
        self.call(Command::Unannounce).await
    }

    /// Updates the load figures sent in the next heartbeats.
    pub async fn set_load(&self, load: ServerLoad) -> Result<(), P2pError> {
        self.send(Command::SetLoad(load)).await
    }

    /// Updates the GPU readings sent in the next heartbeats (kept across announcements).
    /// Refused when over their bounds ([`GpuLive::list_is_valid`]).
    pub async fn set_gpu_live(&self, gpus: Vec<GpuLive>) -> Result<(), P2pError> {
        if !GpuLive::list_is_valid(&gpus) {
            return Err(P2pError::Invalid("GPU readings over their bounds"));
        }
        self.send(Command::SetGpuLive(gpus)).await
    }

    /// Listens to heartbeats of `model` (a server is subscribed to its own model already).
    pub async fn subscribe(&self, model: &ModelId) -> Result<(), P2pError> {
        let model = model.clone();
        self.call(|r| Command::Subscribe(model, r)).await
    }

    /// The servers of `block` of `model` announced in the DHT, with their addresses and spans.
    /// Servers that left cleanly are skipped; for liveness, see [`Client::live_servers`].
    pub async fn lookup(&self, model: &ModelId, block: u32) -> Result<Vec<RemoteSpan>, P2pError> {
        let model = model.clone();
        self.call(|r| Command::Lookup(model, block, r)).await
    }

    /// Subscribes to `model`'s heartbeats, looks up the servers of every block and connects
    /// to them (so their heartbeats arrive directly). Returns each server once.
    pub async fn discover(
        &self,
        model: &ModelId,
        num_blocks: u32,
    ) -> Result<Vec<RemoteSpan>, P2pError> {
        if num_blocks == 0 || num_blocks > super::dht::MAX_BLOCKS {
            return Err(P2pError::Invalid("num_blocks"));
        }
        self.subscribe(model).await?;
        let lookups = (0..num_blocks).map(|b| self.lookup(model, b));
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for found in futures::future::join_all(lookups).await {
            for span in found? {
                if seen.insert(span.peer_id) {
                    out.push(span);
                }
            }
        }
        let connected: HashSet<PeerId> = self.connected_peers().await?.into_iter().collect();
        for span in &out {
            if span.peer_id != self.peer_id && !connected.contains(&span.peer_id) {
                self.send(Command::DialPeer(span.peer_id, span.addrs.clone()))
                    .await?;
            }
        }
        out.sort_by_key(|a| (a.span, a.peer_id));
        Ok(out)
    }

    /// Groups `spans` by the block range they serve.
    pub fn by_span(spans: &[RemoteSpan]) -> HashMap<BlockRange, Vec<PeerId>> {
        let mut map: HashMap<BlockRange, Vec<PeerId>> = HashMap::new();
        for s in spans {
            map.entry(s.span).or_default().push(s.peer_id);
        }
        map
    }

    /// The live servers of `model` this peer has heard heartbeats from.
    pub async fn live_servers(&self, model: &ModelId) -> Result<Vec<ServerInfo>, P2pError> {
        let model = model.clone();
        self.ask(|r| Command::LiveServers(model, r)).await
    }

    /// The servers of `model` named by the signed, unexpired DHT records this peer's
    /// lookups found ([`Client::lookup`], [`Client::discover`]): usable for routing before
    /// their first heartbeat. A server that left or fell silent since is not among them.
    pub async fn known_servers(&self, model: &ModelId) -> Result<Vec<RemoteSpan>, P2pError> {
        let model = model.clone();
        self.ask(|r| Command::KnownServers(model, r)).await
    }

    /// Sends a session request to `peer` and waits for its response: on the session
    /// stream to `peer` when it may go there ([`super::stream`]), else as a
    /// `/mesh/session/1` request-response exchange.
    pub async fn request(&self, peer: PeerId, request: Vec<u8>) -> Result<Vec<u8>, P2pError> {
        let request = match self.streams.request(peer, request).await {
            Streamed::Done(answer) => return answer,
            Streamed::NotTaken(request) => request,
        };
        self.call(|r| Command::Request(peer, request, r)).await
    }

    /// Sends `request` to `peer` as a notice on the session stream to it: the server
    /// answers nothing, so this costs one message instead of two. It comes back when no
    /// stream may carry it; send it with [`Client::request`] then.
    pub async fn notify(&self, peer: PeerId, request: Vec<u8>) -> Result<(), Vec<u8>> {
        self.streams.notify(peer, request).await
    }

    /// Answers an [`super::Event::InboundRequest`].
    pub async fn respond(
        &self,
        channel: ResponseChannel,
        response: Vec<u8>,
    ) -> Result<(), P2pError> {
        match channel.inner {
            Responder::Stream(responder) => responder.answer(response).await,
            Responder::Exchange { channel, relayed } => {
                self.call(|reply| Command::Respond {
                    channel,
                    relayed,
                    response,
                    reply,
                })
                .await
            }
        }
    }

    /// Asks a connected peer (a bootstrap if possible) to open a TCP connection to each of
    /// this peer's public addresses (`P2pConfig::public_addrs`) from the outside. Empty when
    /// no public address is configured.
    pub async fn check_reachability(&self) -> Result<Vec<Reachability>, P2pError> {
        self.call(Command::CheckReachability).await
    }

    /// Whether peers can dial this node (AutoNAT), its relay addresses, what UPnP did.
    pub async fn nat_report(&self) -> Result<super::nat::NatReport, P2pError> {
        self.ask(Command::NatReport).await
    }

    /// Counters of accepted, rejected and dropped messages.
    pub async fn stats(&self) -> Result<P2pStats, P2pError> {
        let mut stats = self.ask(Command::Stats).await?;
        stats.streams = self.streams.stats();
        Ok(stats)
    }

    /// Peers with at least one open connection.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, P2pError> {
        self.ask(Command::ConnectedPeers).await
    }

    /// Stops the event loop (connections close). Other clones then get [`P2pError::Closed`].
    pub async fn shutdown(&self) -> Result<(), P2pError> {
        self.ask(Command::Shutdown).await
    }
}
