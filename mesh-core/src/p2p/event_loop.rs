//! [`EventLoop`]: the only owner of the swarm. It `select!`s over swarm events, client
//! commands and a timer tick that drives heartbeats, re-announcements, table expiry and
//! the deadlines of pending operations.
//!
//! This file holds the loop's state, its constants, the `select!` itself and the routing of
//! swarm events; each kind of work lives in its own child module (they share this state):
//!
//! | file | idea |
//! |---|---|
//! | `commands.rs` | answering [`Command`]s from clients: dials, addresses, stats |
//! | `announce.rs` | this peer's own announcement: provider records, signed server record, withdrawal |
//! | `gossip.rs` | heartbeats: subscribing, publishing ours, validating others' into the live table |
//! | `kademlia.rs` | Kademlia: addresses from identify, validating stored records, query results |
//! | `lookup.rs` | the lookup state machine: providers, then signed server records |
//! | `session.rs` | the `/mesh/session/1` request-response events |
//! | `dialback.rs` | asking a peer to dial our public address, and doing it for others |
//! | `timers.rs` | the tick: rejoining, expiry, re-publishing, discovery, deadlines |
//! | `nat.rs` | AutoNAT, relay reservations and server counters, DCUtR, UPnP, moving to direct |

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::kad::QueryId;
use libp2p::multiaddr::Protocol;
use libp2p::ping;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::{ConnectionId, ListenError, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};

use super::behaviour::{Behaviour, BehaviourEvent};
use super::client::{Announcement, Command, P2pStats, Reply};
use super::dht::ServerRecord;
use super::heartbeat::LiveTable;
use super::ip_limit::{IpLimitExceeded, PendingLimitExceeded};
use super::known::KnownTable;
use super::reachability::Reachability;
use super::stream::{self, Streams};
use super::{Event, P2pConfig, P2pError, Role};
use crate::types::{GpuLive, ModelId, RemoteSpan};

mod announce;
mod commands;
mod dialback;
mod gossip;
mod kademlia;
mod lookup;
mod nat;
mod session;
mod timers;

/// How often the loop wakes up for timers when nothing else happens.
const TICK: Duration = Duration::from_millis(100);
/// How long a dial may take before its caller gets a timeout.
const DIAL_TIMEOUT: Duration = Duration::from_secs(15);
/// How long unannounce waits for the offline record to be stored.
const WITHDRAW_TIMEOUT: Duration = Duration::from_secs(5);
/// Most heartbeat topics a bootstrap relays.
const MAX_RELAY_TOPICS: usize = 256;
/// Most models a peer watches.
const MAX_SUBSCRIPTIONS: usize = 64;
/// First retry delay for a failed heartbeat publication or DHT announcement.
const INITIAL_BACKOFF: Duration = Duration::from_millis(250);
/// Most dial-back checks this peer runs for others at once.
const MAX_DIALBACKS_IN_FLIGHT: usize = 4;
/// How many peers one discovery round may dial.
const MAX_DISCOVERY_DIALS: usize = 16;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `base` ±10 %.
fn jitter(base: Duration) -> Duration {
    base.mul_f64(0.9 + 0.2 * rand::random::<f64>())
}

/// Timings copied from the config.
struct Settings {
    role: Role,
    heartbeat_interval: Duration,
    announce_interval: Duration,
    record_ttl: Duration,
    max_clock_skew: Duration,
    lookup_timeout: Duration,
}

/// The state of this peer's own announcement.
struct Announced {
    ann: Announcement,
    next_heartbeat: Instant,
    heartbeat_backoff: Duration,
    next_announce: Instant,
    announce_backoff: Duration,
    next_discovery: Instant,
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Who waits for a lookup.
enum LookupOwner {
    Client(Reply<Vec<RemoteSpan>>),
    /// Internal neighbour discovery: dial what is found.
    Discovery,
}

struct Lookup {
    model: ModelId,
    block: u32,
    owner: LookupOwner,
    deadline: Instant,
    providers_done: bool,
    asked: HashSet<PeerId>,
    pending_records: usize,
    found: HashMap<PeerId, ServerRecord>,
}

/// The swarm's event loop; run it with `tokio::spawn(event_loop.run())`.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    settings: Settings,
    keypair: libp2p::identity::Keypair,
    local: PeerId,
    announced: Option<Announced>,
    /// This peer's GPU readings, sent in its heartbeats ([`crate::p2p::Client::set_gpu_live`]).
    gpu_live: Vec<GpuLive>,
    table: LiveTable,
    /// Servers named by verified DHT records, for routing before their first heartbeat.
    known: KnownTable,
    subscribed: HashSet<ModelId>,
    relayed: HashSet<ModelId>,
    stats: P2pStats,
    pending_dials: HashMap<ConnectionId, (Reply<()>, Instant)>,
    /// Session requests waiting for their answer, with the peer asked and the request's
    /// size.
    pending_requests: HashMap<OutboundRequestId, (PeerId, u64, Reply<Vec<u8>>)>,
    lookups: HashMap<u64, Lookup>,
    next_lookup: u64,
    provider_queries: HashMap<QueryId, u64>,
    record_queries: HashMap<QueryId, (u64, PeerId)>,
    withdrawals: HashMap<QueryId, (Reply<()>, Instant)>,
    own_record_query: Option<QueryId>,
    /// The remote IP of each connected peer (for dial-back and address filtering).
    remote_ips: HashMap<PeerId, std::net::IpAddr>,
    pending_checks: HashMap<OutboundRequestId, (Reply<Vec<Reachability>>, PeerId)>,
    dialbacks_in_flight: usize,
    dialback_done_tx: mpsc::Sender<(request_response::ResponseChannel<Vec<u8>>, Vec<u8>)>,
    dialback_done_rx: mpsc::Receiver<(request_response::ResponseChannel<Vec<u8>>, Vec<u8>)>,
    bootstrapped: bool,
    /// Configured bootstrap peers, re-dialed every announce interval while disconnected.
    bootstrap: Vec<(PeerId, Multiaddr)>,
    next_rejoin: Instant,
    /// AutoNAT verdict, relay reservations, connections by kind.
    nat: nat::NatState,
    stopping: Option<oneshot::Sender<()>>,
    /// Session streams: told which peers are reached directly.
    streams: Arc<Streams>,
    /// Inbound session streams, served from [`EventLoop::run`] on (servers only).
    incoming: Option<libp2p_stream::IncomingStreams>,
}

impl EventLoop {
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<Event>,
        cfg: &P2pConfig,
        streams: Arc<Streams>,
        incoming: Option<libp2p_stream::IncomingStreams>,
    ) -> Self {
        let (dialback_done_tx, dialback_done_rx) = mpsc::channel(MAX_DIALBACKS_IN_FLIGHT);
        let bootstrap: Vec<(PeerId, Multiaddr)> = cfg
            .bootstrap
            .iter()
            .filter_map(|a| {
                let peer = a.iter().find_map(|p| match p {
                    Protocol::P2p(peer) => Some(peer),
                    _ => None,
                })?;
                Some((peer, a.clone()))
            })
            .collect();
        let nat = nat::NatState::new(&cfg.nat, &bootstrap, Instant::now());
        Self {
            local: *swarm.local_peer_id(),
            keypair: cfg.identity.keypair(),
            swarm,
            commands,
            events,
            settings: Settings {
                role: cfg.role,
                heartbeat_interval: cfg.heartbeat_interval,
                announce_interval: cfg.announce_interval,
                record_ttl: cfg.record_ttl,
                max_clock_skew: cfg.max_clock_skew,
                lookup_timeout: cfg.lookup_timeout,
            },
            announced: None,
            gpu_live: Vec::new(),
            table: LiveTable::default(),
            known: KnownTable::default(),
            subscribed: HashSet::new(),
            relayed: HashSet::new(),
            stats: P2pStats::default(),
            pending_dials: HashMap::new(),
            pending_requests: HashMap::new(),
            lookups: HashMap::new(),
            next_lookup: 0,
            provider_queries: HashMap::new(),
            record_queries: HashMap::new(),
            withdrawals: HashMap::new(),
            own_record_query: None,
            remote_ips: HashMap::new(),
            pending_checks: HashMap::new(),
            dialbacks_in_flight: 0,
            dialback_done_tx,
            dialback_done_rx,
            bootstrapped: false,
            bootstrap,
            next_rejoin: Instant::now() + cfg.announce_interval,
            nat,
            stopping: None,
            streams,
            incoming,
        }
    }

    /// Runs until [`super::Client::shutdown`] or until every client is dropped.
    pub async fn run(mut self) {
        // Aborted with the loop: the streams it serves end with their connections.
        let acceptor = self.incoming.take().map(|incoming| {
            let accept = stream::accept(incoming, self.streams.clone(), self.events.clone());
            AbortOnDrop(tokio::spawn(accept))
        });
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                _ = tick.tick() => self.on_tick(Instant::now()),
                Some((channel, response)) = self.dialback_done_rx.recv() => {
                    self.dialbacks_in_flight = self.dialbacks_in_flight.saturating_sub(1);
                    let _ = self.swarm.behaviour_mut().dialback.send_response(channel, response);
                }
            }
            if self.stopping.is_some() {
                break;
            }
        }
        drop(acceptor);
        if let Some(done) = self.stopping.take() {
            let _ = done.send(());
        }
    }

    /// Routes behaviour events to their modules; connection bookkeeping is done here.
    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => self.on_kad(e),
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(e)) => self.on_gossipsub(e),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => self.on_identify(e),
            SwarmEvent::Behaviour(BehaviourEvent::Session(e)) => self.on_session(e),
            SwarmEvent::Behaviour(BehaviourEvent::Dialback(e)) => self.on_dialback(e),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(e)) => self.on_ping(e),
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(e)) => self.on_autonat(e),
            SwarmEvent::Behaviour(BehaviourEvent::Relay(e)) => self.on_relay_server(e),
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(e)) => self.on_relay_client(e),
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(e)) => self.on_dcutr(e),
            SwarmEvent::Behaviour(BehaviourEvent::Upnp(e)) => self.on_upnp(e),
            SwarmEvent::Behaviour(_) => {}
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                if self.on_circuit_addr(listener_id, address.clone()) {
                    return;
                }
                tracing::info!(
                    "listening on {}",
                    address.clone().with(Protocol::P2p(self.local))
                );
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let remote = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => address,
                    ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr,
                };
                if let Some((ip, _)) = remote.iter().find_map(|p| match p {
                    Protocol::Ip4(ip) => Some((std::net::IpAddr::V4(ip), ())),
                    Protocol::Ip6(ip) => Some((std::net::IpAddr::V6(ip), ())),
                    _ => None,
                }) {
                    self.remote_ips.insert(peer_id, ip);
                }
                let dialed = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => Some(address),
                    ConnectedPoint::Listener { .. } => None,
                };
                self.nat_connection(peer_id, connection_id, endpoint.is_relayed(), dialed);
                self.update_direct(peer_id);
                tracing::debug!(%peer_id, %remote, relayed = endpoint.is_relayed(), "connected");
                if let Some((reply, _)) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Ok(()));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                endpoint,
            } => {
                tracing::debug!(%peer_id, relayed = endpoint.is_relayed(), "connection closed: {cause:?}");
                self.nat_connection_closed(peer_id, connection_id);
                self.update_direct(peer_id);
                if num_established == 0 {
                    self.streams.peer_gone(peer_id);
                    self.remote_ips.remove(&peer_id);
                    tracing::debug!(%peer_id, "disconnected");
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => self.on_listener_closed(
                listener_id,
                reason.err().map(|e| super::listen::cause_chain(&e)),
            ),
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                tracing::debug!(?peer_id, "outgoing connection failed: {error}");
                if let Some((reply, _)) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Err(P2pError::Dial(error.to_string())));
                }
            }
            SwarmEvent::ListenerError { error, .. } => {
                tracing::warn!("listener error: {error}");
            }
            SwarmEvent::IncomingConnectionError {
                error: ListenError::Denied { cause },
                send_back_addr,
                ..
            } => {
                if cause.downcast_ref::<IpLimitExceeded>().is_some() {
                    self.stats.ip_limited += 1;
                } else if cause.downcast_ref::<PendingLimitExceeded>().is_some() {
                    self.stats.pending_ip_limited += 1;
                }
                tracing::debug!(%send_back_addr, "inbound connection refused: {cause}");
            }
            _ => {}
        }
    }

    /// Closes a connection whose peer stopped answering pings: a peer cut off by the network
    /// leaves no other trace, and its requests would wait out their timeouts.
    fn on_ping(&mut self, event: ping::Event) {
        match event.result {
            Ok(_) | Err(ping::Failure::Unsupported) => {}
            Err(failure) => {
                tracing::info!(peer = %event.peer, "closing connection: ping failed ({failure})");
                if self.swarm.close_connection(event.connection) {
                    self.stats.unresponsive_closed += 1;
                }
            }
        }
    }

    /// Hands an event to the node; a full queue drops it (counted) rather than block the loop.
    /// Tells the session streams whether a stream to `peer` may be opened now: when its
    /// one connection is direct. libp2p-stream opens a stream on a connection chosen at
    /// random, and a second connection is most often short-lived (an AutoNAT dial-back,
    /// closed once answered) and would take the stream and its requests with it.
    fn update_direct(&self, peer: PeerId) {
        self.streams
            .set_direct(peer, self.one_direct_connection(&peer));
    }

    fn emit(&mut self, event: Event) {
        if self.events.try_send(event).is_err() {
            self.stats.events_dropped += 1;
        }
    }
}
