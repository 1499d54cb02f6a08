//! The peer-to-peer layer: a libp2p swarm with Kademlia, gossipsub heartbeats and the
//! `/mesh/session/1` request-response protocol.
//!
//! Shaped like rust-libp2p's file-sharing example: [`new`] returns a cloneable [`Client`]
//! (a handle over a bounded command queue, each command with a oneshot reply), a bounded
//! receiver of [`Event`]s, and the [`EventLoop`], the only owner of the swarm. [`spawn`]
//! does all of that, starts listening and dials the bootstrap peers.
//!
//! | file | idea |
//! |---|---|
//! | `behaviour.rs` | the composed behaviour: limits, identify, ping, Kademlia, gossipsub, session |
//! | `codec.rs` | [`SESSION_PROTOCOL`]: length-prefixed opaque frames, bounded before allocating |
//! | `dht.rs` | DHT keys, signed server records, validation of everything stored |
//! | `heartbeat.rs` | heartbeat messages, their validation, the live-server table |
//! | `known.rs` | servers named by verified DHT records, routable before their first heartbeat |
//! | `client.rs` | [`Client`]: the handle every other part of mesh talks to |
//! | `event_loop.rs` | [`EventLoop`]: its state, the `select!`, routing of swarm events |
//! | `event_loop/commands.rs` | answering client commands: dials, addresses, stats |
//! | `event_loop/announce.rs` | our own announcement: provider records, signed server record |
//! | `event_loop/gossip.rs` | heartbeats: subscribe, publish ours, validate others' |
//! | `event_loop/kademlia.rs` | Kademlia: identify addresses, inbound records, query results |
//! | `event_loop/lookup.rs` | the lookup state machine: providers, then signed server records |
//! | `event_loop/session.rs` | `/mesh/session/1` request-response events |
//! | `event_loop/dialback.rs` | asking a peer to dial our public address, and doing it for others |
//! | `event_loop/timers.rs` | the tick: rejoin, expiry, re-publishing, discovery, deadlines |
//! | `listen.rs` | one port, one process: "port in use" before libp2p shares it |
//! | `nat.rs` | behind home routers: reachability, relay limits, relay mode, UPnP state |
//! | `event_loop/nat.rs` | AutoNAT, relay reservations and server, DCUtR, moving to direct |
//! | `reachability.rs` | address scopes, the unreachable-node warning, the dial-back probe |
//! | `run.rs` | [`run_bootstrap`] and [`serve`]: whole peers for the binaries |
//!
//! ```no_run
//! # async fn demo() -> Result<(), mesh_core::p2p::P2pError> {
//! use mesh_core::{identity::Identity, p2p, ModelId};
//!
//! let mut cfg = p2p::P2pConfig::new(Identity::generate(), p2p::Role::Client);
//! cfg.bootstrap = vec!["/ip4/127.0.0.1/tcp/31337/p2p/12D3KooW...".parse().unwrap()];
//! let peer = p2p::spawn(cfg).await?;
//! let model = ModelId::new("tiny-llama-mesh");
//! let servers = peer.client.discover(&model, 8).await?; // DHT: who serves which blocks
//! let live = peer.client.live_servers(&model).await?; // gossip: who is alive right now
//! # Ok(()) }
//! ```

mod behaviour;
mod client;
pub mod codec;
pub mod dht;
mod event_loop;
pub mod heartbeat;
mod ip_limit;
mod known;
mod listen;
pub mod nat;
mod nudge;
pub mod reachability;
mod run;
pub mod stream;

use std::time::Duration;

use tokio::sync::mpsc;

pub use behaviour::{KAD_PROTOCOL, MAX_GOSSIP_BYTES};
pub use client::{Announcement, Client, P2pStats, ResponseChannel};
pub use codec::{MAX_FRAME_BYTES, SESSION_PROTOCOL};
pub use event_loop::EventLoop;
pub use ip_limit::{IpLimitExceeded, PendingLimitExceeded};
pub use libp2p::multiaddr::Protocol;
pub use libp2p::{Multiaddr, PeerId};
pub use nat::{NatConfig, NatReport, Reach, RelayLimits, RelayMode, RelayStats, UpnpState};
pub use run::{run_bootstrap, serve};
pub use stream::{StreamStats, STREAM_PROTOCOL};

use crate::identity::Identity;
use crate::types::{ModelId, ServerInfo};

/// Capacity of the command queue from [`Client`]s to the [`EventLoop`].
pub const COMMAND_QUEUE: usize = 64;
/// Capacity of the [`Event`] queue; when full, events are dropped and counted.
pub const EVENT_QUEUE: usize = 256;
/// Default TCP (and UDP/QUIC) port of a bootstrap peer.
pub const DEFAULT_BOOTSTRAP_PORT: u16 = 31337;
/// Default of [`P2pConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: u32 = 256;
/// Default of [`P2pConfig::max_connections_per_ip`].
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: u32 = 32;
/// Default of [`P2pConfig::max_pending_connections_per_ip`].
pub const DEFAULT_MAX_PENDING_CONNECTIONS_PER_IP: u32 = 8;

/// What a peer is for; decides the Kademlia mode and whether it serves sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A DHT server that relays heartbeats; serves no model.
    Bootstrap,
    /// Serves a span of blocks: DHT server, announces, heartbeats, answers sessions.
    Server,
    /// Uses the mesh: DHT client mode, sends session requests only.
    Client,
}

/// Everything a peer needs to start.
#[derive(Debug, Clone)]
pub struct P2pConfig {
    pub identity: Identity,
    pub role: Role,
    /// Addresses to listen on, e.g. `/ip4/0.0.0.0/tcp/31337`, `/ip4/0.0.0.0/udp/31337/quic-v1`.
    pub listen: Vec<Multiaddr>,
    /// Peers to join through (`.../p2p/<peer id>`): bootstraps or any other mesh peer.
    pub bootstrap: Vec<Multiaddr>,
    /// This peer's public addresses, announced instead of the listen addresses.
    pub public_addrs: Vec<Multiaddr>,
    /// Heartbeat period (±10 % jitter). Default 15 s.
    pub heartbeat_interval: Duration,
    /// DHT re-announcement, neighbour discovery and bootstrap re-dial period. Default 120 s.
    pub announce_interval: Duration,
    /// Lifetime of DHT records this peer stores. Default 360 s (3 announce periods).
    pub record_ttl: Duration,
    /// Heartbeats older or newer than this (by their timestamp) are rejected. Default 60 s.
    pub max_clock_skew: Duration,
    /// Timeout of one `/mesh/session/1` request. Default 60 s.
    pub request_timeout: Duration,
    /// Timeout of one Kademlia query. Default 5 s.
    pub query_timeout: Duration,
    /// Overall limit of [`Client::lookup`]. Default 8 s.
    pub lookup_timeout: Duration,
    /// Largest session frame accepted or sent; at most [`MAX_FRAME_BYTES`].
    pub max_frame_bytes: usize,
    /// Most established inbound connections.
    pub max_connections: u32,
    /// Most established inbound connections from one IP address (an IPv6 /64 counts as
    /// one), so that peers on one host (however many peer ids it makes up) cannot take
    /// all of `max_connections`. Default 32: room for a household or a small lab behind
    /// one NAT.
    pub max_connections_per_ip: u32,
    /// Most inbound connections from one IP address (IPv6 /64) in their handshake at once.
    /// All hosts share 64 such slots, so without this one host holding half-open TCP
    /// connections would keep every new peer out. Default 8: a handshake takes
    /// milliseconds, so an honest host rarely has more than one or two at a time.
    pub max_pending_connections_per_ip: u32,
    /// Connections idle this long are closed. Default 60 s.
    pub idle_timeout: Duration,
    /// How often each connection is pinged. Default 1 s.
    pub ping_interval: Duration,
    /// A connection whose peer answers two pings in a row not within this is closed (libp2p
    /// lets the first failure pass silently), so the requests on it fail, and a client
    /// fails over, about 2 × (interval + timeout) after a peer vanishes rather than at the
    /// request timeout. It measures the peer's liveness, not its compute: pings are
    /// answered by the connection, beside any work. 3 s leaves room for a home uplink
    /// whose queue fills during a large prefill. Default 3 s.
    pub ping_timeout: Duration,
    /// AutoNAT, relays, hole punching, UPnP. Default: a relay server on bootstraps only.
    pub nat: NatConfig,
    /// Send small session requests to directly connected peers on one long-lived stream
    /// each ([`stream`]) rather than a request-response exchange per request. Servers
    /// accept such streams either way. Default on.
    pub session_streams: bool,
}

impl P2pConfig {
    /// Defaults for `role`, listening nowhere and joining through no one.
    pub fn new(identity: Identity, role: Role) -> Self {
        Self {
            identity,
            role,
            listen: Vec::new(),
            bootstrap: Vec::new(),
            public_addrs: Vec::new(),
            heartbeat_interval: Duration::from_secs(15),
            announce_interval: Duration::from_secs(120),
            record_ttl: Duration::from_secs(360),
            max_clock_skew: Duration::from_secs(60),
            request_timeout: Duration::from_secs(60),
            query_timeout: Duration::from_secs(5),
            lookup_timeout: Duration::from_secs(8),
            max_frame_bytes: MAX_FRAME_BYTES,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            max_pending_connections_per_ip: DEFAULT_MAX_PENDING_CONNECTIONS_PER_IP,
            idle_timeout: Duration::from_secs(60),
            ping_interval: Duration::from_secs(1),
            ping_timeout: Duration::from_secs(3),
            nat: NatConfig {
                relay_server: (role == Role::Bootstrap).then(RelayLimits::default),
                ..NatConfig::default()
            },
            session_streams: true,
        }
    }
}

/// Errors of the peer-to-peer layer.
#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    /// The transport or a behaviour could not be built.
    #[error("building the swarm: {0}")]
    Transport(String),
    /// Listening on an address failed.
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    /// Another socket (another mesh-node or mesh-bootstrap, most likely) holds the port.
    #[error(
        "cannot listen on {addr}: port in use (another mesh-node or mesh-bootstrap? stop it, \
         or give this one another port)"
    )]
    PortInUse { addr: Multiaddr },
    /// Dialing a peer failed.
    #[error("dial failed: {0}")]
    Dial(String),
    /// The event loop has stopped; the client is no longer usable.
    #[error("the p2p event loop has stopped")]
    Closed,
    /// An operation did not finish in time.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// A session request failed (unreachable peer, timeout, protocol error).
    #[error("request to {peer} failed: {reason}")]
    Request { peer: PeerId, reason: String },
    /// Sending a response failed (the requester went away, or the channel was dropped).
    #[error("response could not be sent")]
    Respond,
    /// An argument is invalid (model name, span).
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// A DHT store operation failed.
    #[error("DHT: {0}")]
    Dht(String),
    /// Signing a record failed.
    #[error("signing: {0}")]
    Signing(String),
    /// No connected peer could do what was asked (e.g. a reachability check).
    #[error("no connected peer to ask")]
    NoPeers,
    /// Encoding failed.
    #[error(transparent)]
    Wire(#[from] crate::wire::WireError),
}

/// What the event loop tells the rest of the program.
#[derive(Debug)]
pub enum Event {
    /// A peer sent a `/mesh/session/1` request; answer with [`Client::respond`]. Dropping the
    /// channel makes the request fail on the other side.
    InboundRequest {
        peer: PeerId,
        request: Vec<u8>,
        channel: ResponseChannel,
    },
    /// A server was heard for the first time (or again after being dropped).
    ServerUp(ServerInfo),
    /// A server left cleanly or was unheard for 3 of its heartbeat intervals.
    ServerDown { peer: PeerId, model: ModelId },
}

/// A running peer: its handle, its events and where it listens.
pub struct Peer {
    pub client: Client,
    pub events: mpsc::Receiver<Event>,
    /// Listen addresses with the `/p2p/<peer id>` suffix.
    pub listen_addrs: Vec<Multiaddr>,
    /// The bootstrap addresses that could not be dialed at start (each logged with its
    /// reason). All of them: the peer is alone, which a client should say at once rather
    /// than wait for servers that cannot be found.
    pub unreachable_bootstraps: Vec<Multiaddr>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Builds the swarm and starts listening. Nothing runs until [`EventLoop::run`] is polled.
pub fn new(cfg: P2pConfig) -> Result<(Client, mpsc::Receiver<Event>, EventLoop), P2pError> {
    // Every port is checked before any is bound, so one listener never blocks the check
    // of its own process's next one.
    for addr in &cfg.listen {
        listen::ensure_port_free(addr)?;
    }
    let mut swarm = behaviour::build_swarm(&cfg)?;
    for addr in &cfg.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| P2pError::Listen {
                addr: addr.clone(),
                reason: listen::cause_chain(&e),
            })?;
    }
    for addr in &cfg.public_addrs {
        swarm.add_external_address(addr.clone());
    }
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
    let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
    let mut control = swarm.behaviour().stream.new_control();
    // Only servers answer sessions; to anyone else the protocol is unsupported, and a
    // requester then asks by request-response (and is refused there, as before).
    let incoming = match cfg.role {
        Role::Server => Some(
            control
                .accept(STREAM_PROTOCOL)
                .map_err(|e| P2pError::Transport(e.to_string()))?,
        ),
        Role::Bootstrap | Role::Client => None,
    };
    let streams = std::sync::Arc::new(stream::Streams::new(
        cfg.session_streams,
        control,
        cfg.request_timeout,
        cfg.max_frame_bytes.min(MAX_FRAME_BYTES),
    ));
    let client = Client::new(cmd_tx, cfg.identity.peer_id(), streams.clone());
    let event_loop = EventLoop::new(swarm, cmd_rx, ev_tx, &cfg, streams, incoming);
    Ok((client, ev_rx, event_loop))
}

/// Builds the swarm, runs its event loop on the tokio runtime, waits until every listener
/// has an address (up to 10 s) and dials `cfg.bootstrap` (failures are logged, not fatal:
/// the other bootstraps may answer).
pub async fn spawn(cfg: P2pConfig) -> Result<Peer, P2pError> {
    let bootstrap = cfg.bootstrap.clone();
    let wanted = cfg.listen.len();
    let (client, events, event_loop) = new(cfg)?;
    let task = tokio::spawn(event_loop.run());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let listen_addrs = loop {
        let addrs = client.listen_addrs().await?;
        if addrs.len() >= wanted {
            break addrs;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(P2pError::Timeout("waiting for listen addresses"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let dials = bootstrap.into_iter().map(|addr| {
        let client = client.clone();
        async move {
            let result = client.dial(addr.clone()).await;
            if let Err(e) = &result {
                tracing::warn!(%addr, "bootstrap peer unreachable: {e}");
            }
            result.is_err().then_some(addr)
        }
    });
    let unreachable_bootstraps = futures::future::join_all(dials)
        .await
        .into_iter()
        .flatten()
        .collect();
    Ok(Peer {
        client,
        events,
        listen_addrs,
        unreachable_bootstraps,
        task,
    })
}
