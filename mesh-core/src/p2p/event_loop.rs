//! [`EventLoop`]: the only owner of the swarm. It `select!`s over swarm events, client
//! commands and a timer tick that drives heartbeats, re-announcements, table expiry and
//! the deadlines of pending operations.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::gossipsub::{self, MessageAcceptance};
use libp2p::kad::{self, store::RecordStore, QueryId, Quorum, Record};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{identify, Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};

use super::behaviour::{Behaviour, BehaviourEvent, KAD_PROTOCOL};
use super::client::{Announcement, Command, P2pStats, Reply, ResponseChannel};
use super::dht::{self, ServerRecord};
use super::heartbeat::{self, Change, Heartbeat, LiveTable};
use super::reachability::{self, Reachability, Scope};
use super::{Event, P2pConfig, P2pError, Role};
use crate::types::{ModelId, RemoteSpan, ServerLoad};
use crate::wire;

mod dialback;
mod lookup;

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
    table: LiveTable,
    subscribed: HashSet<ModelId>,
    relayed: HashSet<ModelId>,
    stats: P2pStats,
    pending_dials: HashMap<ConnectionId, (Reply<()>, Instant)>,
    pending_requests: HashMap<OutboundRequestId, Reply<Vec<u8>>>,
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
    stopping: Option<oneshot::Sender<()>>,
}

impl EventLoop {
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<Event>,
        cfg: &P2pConfig,
    ) -> Self {
        let (dialback_done_tx, dialback_done_rx) = mpsc::channel(MAX_DIALBACKS_IN_FLIGHT);
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
            table: LiveTable::default(),
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
            bootstrap: cfg
                .bootstrap
                .iter()
                .filter_map(|a| {
                    let peer = a.iter().find_map(|p| match p {
                        Protocol::P2p(peer) => Some(peer),
                        _ => None,
                    })?;
                    Some((peer, a.clone()))
                })
                .collect(),
            next_rejoin: Instant::now() + cfg.announce_interval,
            stopping: None,
        }
    }

    /// Runs until [`super::Client::shutdown`] or until every client is dropped.
    pub async fn run(mut self) {
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
        if let Some(done) = self.stopping.take() {
            let _ = done.send(());
        }
    }

    // ---------------------------------------------------------------- commands

    fn on_command(&mut self, command: Command) {
        match command {
            Command::ListenAddrs(reply) => {
                let _ = reply.send(self.listen_addrs());
            }
            Command::AnnounceAddrs(reply) => {
                let _ = reply.send(self.announce_addrs());
            }
            Command::Dial(addr, reply) => self.dial(addr, reply),
            Command::DialPeer(peer, addrs) => self.dial_peer(peer, addrs),
            Command::Announce(ann, reply) => {
                let _ = reply.send(self.announce(ann));
            }
            Command::Unannounce(reply) => self.unannounce(reply),
            Command::SetLoad(load) => {
                if let Some(a) = &mut self.announced {
                    a.ann.load = load;
                }
            }
            Command::Subscribe(model, reply) => {
                let _ = reply.send(self.subscribe(&model));
            }
            Command::Lookup(model, block, reply) => {
                self.start_lookup(model, block, LookupOwner::Client(reply))
            }
            Command::LiveServers(model, reply) => {
                let _ = reply.send(self.table.servers(&model));
            }
            Command::Request(peer, data, reply) => {
                let id = self.swarm.behaviour_mut().session.send_request(&peer, data);
                self.pending_requests.insert(id, reply);
            }
            Command::Respond(channel, data, reply) => {
                let result = self
                    .swarm
                    .behaviour_mut()
                    .session
                    .send_response(channel.0, data)
                    .map_err(|_| P2pError::Respond);
                let _ = reply.send(result);
            }
            Command::Stats(reply) => {
                let mut stats = self.stats;
                stats.connected_peers = self.swarm.connected_peers().count();
                let _ = reply.send(stats);
            }
            Command::CheckReachability(reply) => self.check_reachability(reply),
            Command::ConnectedPeers(reply) => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::Shutdown(done) => self.stopping = Some(done),
        }
    }

    fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.swarm
            .listeners()
            .map(|a| a.clone().with(Protocol::P2p(self.local)))
            .collect()
    }

    /// Public addresses if any were configured, else concrete listen addresses.
    fn announce_addrs(&self) -> Vec<Multiaddr> {
        let external: Vec<Multiaddr> = self.swarm.external_addresses().cloned().collect();
        let addrs = if external.is_empty() {
            self.swarm
                .listeners()
                .filter(|a| reachability::scope(a) != Scope::Unspecified)
                .cloned()
                .collect()
        } else {
            external
        };
        addrs.into_iter().take(dht::MAX_ADDRS).collect()
    }

    fn dial(&mut self, addr: Multiaddr, reply: Reply<()>) {
        let peer = addr.iter().find_map(|p| match p {
            Protocol::P2p(peer) => Some(peer),
            _ => None,
        });
        if let Some(peer) = peer {
            if peer == self.local {
                let _ = reply.send(Err(P2pError::Dial("cannot dial self".into())));
                return;
            }
            let without_p2p: Multiaddr = addr
                .iter()
                .filter(|p| !matches!(p, Protocol::P2p(_)))
                .collect();
            self.swarm
                .behaviour_mut()
                .kad
                .add_address(&peer, without_p2p);
            if self.swarm.is_connected(&peer) {
                let _ = reply.send(Ok(()));
                return;
            }
        }
        let opts = DialOpts::from(addr);
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.pending_dials
                    .insert(id, (reply, Instant::now() + DIAL_TIMEOUT));
            }
            Err(e) => {
                let _ = reply.send(Err(P2pError::Dial(e.to_string())));
            }
        }
    }

    fn dial_peer(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if peer == self.local || self.swarm.is_connected(&peer) {
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, "dial: {e}");
        }
    }

    fn subscribe(&mut self, model: &ModelId) -> Result<(), P2pError> {
        if !model.is_valid() {
            return Err(P2pError::Invalid("model name"));
        }
        if self.subscribed.contains(model) {
            return Ok(());
        }
        if self.subscribed.len() >= MAX_SUBSCRIPTIONS {
            return Err(P2pError::Invalid("too many subscribed models"));
        }
        self.swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&heartbeat::topic(model))
            .map_err(|e| P2pError::Dht(format!("subscribe: {e}")))?;
        self.subscribed.insert(model.clone());
        Ok(())
    }

    fn announce(&mut self, ann: Announcement) -> Result<(), P2pError> {
        ann.validate()?;
        if let Some(old) = self.announced.take() {
            for block in old.ann.span.start..old.ann.span.end {
                if !ann.span.contains(block) || old.ann.model != ann.model {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .stop_providing(&dht::block_key(&old.ann.model, block));
                }
            }
        }
        self.subscribe(&ann.model)?;
        if let Some(warning) = reachability::unreachable_warning(&self.announce_addrs()) {
            tracing::warn!("{warning}");
        }
        let now = Instant::now();
        self.announced = Some(Announced {
            ann,
            next_heartbeat: now,
            heartbeat_backoff: INITIAL_BACKOFF,
            next_announce: now,
            announce_backoff: INITIAL_BACKOFF,
            next_discovery: now + Duration::from_secs(1),
        });
        self.announce_dht(now);
        self.publish_heartbeat(now);
        Ok(())
    }

    /// Puts provider records for every block and the signed server record.
    fn announce_dht(&mut self, now: Instant) {
        let Some(a) = &self.announced else { return };
        let ann = a.ann.clone();
        let kad = &mut self.swarm.behaviour_mut().kad;
        for block in ann.span.start..ann.span.end {
            if let Err(e) = kad.start_providing(dht::block_key(&ann.model, block)) {
                tracing::warn!(block, "start providing: {e}");
            }
        }
        match self.put_server_record(&ann, true) {
            Ok(id) => self.own_record_query = Some(id),
            Err(e) => tracing::warn!("server record: {e}"),
        }
        if let Some(a) = &mut self.announced {
            a.next_announce = now + jitter(self.settings.announce_interval);
        }
    }

    fn put_server_record(&mut self, ann: &Announcement, online: bool) -> Result<QueryId, P2pError> {
        let issued = now_ms();
        let ttl_ms = u64::try_from(self.settings.record_ttl.as_millis()).unwrap_or(u64::MAX);
        let record = ServerRecord {
            peer_id: self.local.to_bytes(),
            addrs: self.announce_addrs().iter().map(|a| a.to_vec()).collect(),
            model: ann.model.as_str().to_owned(),
            span_start: ann.span.start,
            span_end: ann.span.end,
            num_blocks: ann.num_blocks,
            price_per_token: ann.price_per_token,
            online,
            issued_ms: issued,
            expires_ms: issued.saturating_add(ttl_ms),
        };
        let value = dht::sign_server_record(&self.keypair, &record)?;
        let mut rec = Record::new(dht::server_key(&self.local), value);
        rec.publisher = Some(self.local);
        rec.expires = Some(Instant::now() + self.settings.record_ttl);
        self.swarm
            .behaviour_mut()
            .kad
            .put_record(rec, Quorum::One)
            .map_err(|e| P2pError::Dht(e.to_string()))
    }

    fn unannounce(&mut self, reply: Reply<()>) {
        let Some(a) = self.announced.take() else {
            let _ = reply.send(Ok(()));
            return;
        };
        for block in a.ann.span.start..a.ann.span.end {
            self.swarm
                .behaviour_mut()
                .kad
                .stop_providing(&dht::block_key(&a.ann.model, block));
        }
        // Last heartbeat: "leaving", so tables drop this server at once.
        if let Err(e) = self.publish(&a.ann, true) {
            tracing::debug!("leaving heartbeat: {e}");
        }
        match self.put_server_record(&a.ann, false) {
            Ok(id) => {
                self.withdrawals
                    .insert(id, (reply, Instant::now() + WITHDRAW_TIMEOUT));
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    // ---------------------------------------------------------------- heartbeats

    fn publish(&mut self, ann: &Announcement, leaving: bool) -> Result<(), P2pError> {
        let ServerLoad {
            free_memory_bytes,
            throughput_tps,
            active_sessions,
            load,
        } = ann.load;
        let hb = Heartbeat {
            peer_id: self.local.to_bytes(),
            addrs: self.announce_addrs().iter().map(|a| a.to_vec()).collect(),
            model: ann.model.as_str().to_owned(),
            span_start: ann.span.start,
            span_end: ann.span.end,
            num_blocks: ann.num_blocks,
            free_memory_bytes,
            throughput_tps,
            active_sessions,
            load,
            price_per_token: ann.price_per_token,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            interval_ms: u32::try_from(self.settings.heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX),
            timestamp_ms: now_ms(),
            leaving,
            capability: ann.capability.clone(),
        };
        let bytes = wire::encode(&hb)?;
        self.swarm
            .behaviour_mut()
            .gossipsub
            .publish(heartbeat::topic(&ann.model), bytes)
            .map(|_| ())
            .map_err(|e| P2pError::Dht(format!("publish: {e}")))
    }

    fn publish_heartbeat(&mut self, now: Instant) {
        let Some(a) = &self.announced else { return };
        let ann = a.ann.clone();
        let result = self.publish(&ann, false);
        let interval = self.settings.heartbeat_interval;
        let Some(a) = &mut self.announced else { return };
        match result {
            Ok(()) => {
                self.stats.heartbeats_published += 1;
                a.heartbeat_backoff = INITIAL_BACKOFF;
                a.next_heartbeat = now + jitter(interval);
            }
            Err(e) => {
                // Typically no subscribed peer yet: retry sooner, backing off up to the interval.
                self.stats.heartbeat_publish_failures += 1;
                tracing::debug!(retry_in = ?a.heartbeat_backoff, "heartbeat not published: {e}");
                a.next_heartbeat = now + a.heartbeat_backoff;
                a.heartbeat_backoff = (a.heartbeat_backoff * 2).min(interval);
            }
        }
    }

    fn on_gossip(&mut self, source: PeerId, id: gossipsub::MessageId, msg: gossipsub::Message) {
        let result = heartbeat::validate(
            &msg.data,
            &msg.topic,
            msg.source,
            now_ms(),
            self.settings.max_clock_skew,
        );
        self.stats
            .gossip
            .record(result.as_ref().map(|_| ()).map_err(|r| *r));
        let acceptance = match &result {
            Ok(_) => MessageAcceptance::Accept,
            Err(reason) => {
                tracing::debug!(%source, ?reason, topic = %msg.topic, "heartbeat rejected");
                MessageAcceptance::Reject
            }
        };
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&id, &source, acceptance);
        let Ok(valid) = result else { return };
        if valid.info.peer_id == self.local {
            return;
        }
        match self.table.apply(valid, Instant::now()) {
            Change::Up(info) => {
                tracing::info!(peer = %info.peer_id, model = %info.model, span = %info.span, "server up");
                self.emit(Event::ServerUp(info));
            }
            Change::Down(peer, model) => {
                tracing::info!(%peer, %model, "server left");
                self.emit(Event::ServerDown { peer, model });
            }
            Change::Refreshed | Change::None => {}
        }
    }

    fn emit(&mut self, event: Event) {
        if self.events.try_send(event).is_err() {
            self.stats.events_dropped += 1;
        }
    }

    /// Re-dials configured bootstrap peers we lost (e.g. a restarted bootstrap), so a peer
    /// that comes back rejoins the DHT instead of staying an island.
    fn rejoin(&mut self) {
        let lost: Vec<(PeerId, Multiaddr)> = self
            .bootstrap
            .iter()
            .filter(|(peer, _)| !self.swarm.is_connected(peer))
            .cloned()
            .collect();
        for (peer, addr) in lost {
            tracing::debug!(%addr, "re-dialing bootstrap peer");
            let without_p2p: Multiaddr = addr
                .iter()
                .filter(|p| !matches!(p, Protocol::P2p(_)))
                .collect();
            self.swarm
                .behaviour_mut()
                .kad
                .add_address(&peer, without_p2p.clone());
            self.bootstrapped = false;
            self.dial_peer(peer, vec![without_p2p]);
        }
    }

    /// Looks up the neighbours of our span (and our own span's other servers) and dials them,
    /// so heartbeats flow between servers even without a bootstrap.
    fn discover_neighbours(&mut self) {
        let Some(a) = &self.announced else { return };
        let (model, span, n) = (a.ann.model.clone(), a.ann.span, a.ann.num_blocks);
        let mut blocks = vec![span.start];
        if span.start > 0 {
            blocks.push(span.start - 1);
        }
        if span.end < n {
            blocks.push(span.end);
        }
        blocks.push(rand::random_range(0..n));
        blocks.sort_unstable();
        blocks.dedup();
        for b in blocks {
            self.start_lookup(model.clone(), b, LookupOwner::Discovery);
        }
    }

    // ---------------------------------------------------------------- timers

    fn on_tick(&mut self, now: Instant) {
        if now >= self.next_rejoin {
            self.next_rejoin = now + jitter(self.settings.announce_interval);
            self.rejoin();
        }
        for (peer, model) in self.table.expire(now) {
            tracing::info!(%peer, %model, "server unheard for 3 intervals: dropped");
            self.emit(Event::ServerDown { peer, model });
        }
        if let Some(a) = &self.announced {
            let (hb, ann, disc) = (a.next_heartbeat, a.next_announce, a.next_discovery);
            if now >= hb {
                self.publish_heartbeat(now);
            }
            if now >= ann {
                self.announce_dht(now);
            }
            if now >= disc {
                if let Some(a) = &mut self.announced {
                    a.next_discovery = now + jitter(self.settings.announce_interval);
                }
                self.discover_neighbours();
            }
        }
        let expired: Vec<u64> = self
            .lookups
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.try_finish_lookup(id, true);
        }
        time_out(&mut self.pending_dials, now, "dial");
        time_out(&mut self.withdrawals, now, "storing the offline record");
    }

    // ---------------------------------------------------------------- swarm events

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => self.on_kad(e),
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(e)) => self.on_gossipsub(e),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => self.on_identify(e),
            SwarmEvent::Behaviour(BehaviourEvent::Session(e)) => self.on_session(e),
            SwarmEvent::Behaviour(BehaviourEvent::Dialback(e)) => self.on_dialback(e),
            SwarmEvent::Behaviour(_) => {}
            SwarmEvent::NewListenAddr { address, .. } => {
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
                tracing::debug!(%peer_id, %remote, "connected");
                if let Some((reply, _)) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Ok(()));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.remote_ips.remove(&peer_id);
                tracing::debug!(%peer_id, "disconnected");
            }
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
            _ => {}
        }
    }

    fn on_identify(&mut self, event: identify::Event) {
        let identify::Event::Received { peer_id, info, .. } = event else {
            return;
        };
        if !info.protocols.contains(&KAD_PROTOCOL) {
            return;
        }
        let remote_is_loopback = self
            .remote_ips
            .get(&peer_id)
            .is_some_and(|ip| ip.is_loopback());
        for addr in info.listen_addrs.into_iter().take(dht::MAX_ADDRS) {
            // A remote peer's loopback address means nothing unless it is on this machine.
            let usable = match reachability::scope(&addr) {
                Scope::Unspecified => false,
                Scope::Loopback => remote_is_loopback,
                _ => true,
            };
            if usable {
                self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
            }
        }
        if !self.bootstrapped {
            self.bootstrapped = self.swarm.behaviour_mut().kad.bootstrap().is_ok();
        }
    }

    fn on_gossipsub(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => self.on_gossip(propagation_source, message_id, message),
            gossipsub::Event::Subscribed { topic, .. } if self.settings.role == Role::Bootstrap => {
                // Bootstraps relay every model's heartbeats so new peers hear them at once.
                let Some(model) = heartbeat::model_of_topic(&topic) else {
                    return;
                };
                if self.relayed.len() < MAX_RELAY_TOPICS && self.relayed.insert(model.clone()) {
                    if let Err(e) = self
                        .swarm
                        .behaviour_mut()
                        .gossipsub
                        .subscribe(&heartbeat::topic(&model))
                    {
                        tracing::debug!(%model, "relay subscribe: {e}");
                    }
                }
            }
            _ => {}
        }
    }

    fn on_session(&mut self, event: request_response::Event<Vec<u8>, Vec<u8>>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => self.emit(Event::InboundRequest {
                    peer,
                    request,
                    channel: ResponseChannel(channel),
                }),
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(reply) = self.pending_requests.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(reply) = self.pending_requests.remove(&request_id) {
                    let _ = reply.send(Err(P2pError::Request {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, "inbound session request failed: {error}");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn on_kad(&mut self, event: kad::Event) {
        match event {
            kad::Event::InboundRequest { request } => self.on_kad_inbound(request),
            kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            } => self.on_query(id, result, step.last),
            _ => {}
        }
    }

    fn on_kad_inbound(&mut self, request: kad::InboundRequest) {
        match request {
            kad::InboundRequest::PutRecord {
                source,
                record: Some(record),
                ..
            } => {
                let now = now_ms();
                match dht::verify_server_record(&record.key, &record.value, now) {
                    Ok(rec) => {
                        let store = self.swarm.behaviour_mut().kad.store_mut();
                        // Never let an older record replace a newer one.
                        let older = store.get(&record.key).is_some_and(|old| {
                            dht::verify_server_record(&old.key, &old.value, now)
                                .is_ok_and(|o| o.issued_ms > rec.issued_ms)
                        });
                        if !older {
                            if let Err(e) = store.put(record) {
                                tracing::debug!("record not stored: {e}");
                            }
                        }
                        self.stats.dht_records_accepted += 1;
                    }
                    Err(e) => {
                        self.stats.dht_records_rejected += 1;
                        tracing::warn!(%source, "DHT record rejected: {e}");
                    }
                }
            }
            kad::InboundRequest::AddProvider {
                record: Some(record),
            } => match dht::validate_provider(&record) {
                Ok(()) => {
                    let provider = record.provider;
                    if let Err(e) = self
                        .swarm
                        .behaviour_mut()
                        .kad
                        .store_mut()
                        .add_provider(record)
                    {
                        tracing::debug!(%provider, "provider not stored: {e}");
                    }
                    self.stats.dht_providers_accepted += 1;
                }
                Err(e) => {
                    self.stats.dht_providers_rejected += 1;
                    tracing::warn!(provider = %record.provider, "DHT provider record rejected: {e}");
                }
            },
            _ => {}
        }
    }

    fn on_query(&mut self, id: QueryId, result: kad::QueryResult, last: bool) {
        match result {
            kad::QueryResult::GetProviders(res) => {
                let Some(&lookup_id) = self.provider_queries.get(&id) else {
                    return;
                };
                let failed = res.is_err();
                if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = res {
                    self.on_providers(lookup_id, providers);
                }
                if last || failed || self.is_query_over(id) {
                    self.provider_queries.remove(&id);
                    if let Some(l) = self.lookups.get_mut(&lookup_id) {
                        l.providers_done = true;
                    }
                    self.try_finish_lookup(lookup_id, false);
                }
            }
            kad::QueryResult::GetRecord(res) => {
                if let Ok(kad::GetRecordOk::FoundRecord(peer_record)) = &res {
                    self.on_server_record(id, &peer_record.record);
                }
                if last || res.is_err() || self.is_query_over(id) {
                    self.record_query_done(id);
                }
            }
            kad::QueryResult::PutRecord(res) => {
                if let Some((reply, _)) = self.withdrawals.remove(&id) {
                    let _ = reply.send(res.map(|_| ()).map_err(|e| P2pError::Dht(e.to_string())));
                } else if self.own_record_query == Some(id) {
                    self.own_record_query = None;
                    match res {
                        Ok(_) => {
                            if let Some(a) = &mut self.announced {
                                a.announce_backoff = INITIAL_BACKOFF;
                            }
                        }
                        Err(e) => self.retry_announce(e.to_string()),
                    }
                }
            }
            kad::QueryResult::StartProviding(Err(e)) => {
                tracing::debug!("providing failed: {e}");
            }
            kad::QueryResult::Bootstrap(Err(e)) => {
                tracing::debug!("DHT bootstrap: {e}");
            }
            _ => {}
        }
    }

    /// True when kad no longer knows the query (it finished without a `last` step for us).
    fn is_query_over(&mut self, id: QueryId) -> bool {
        self.swarm.behaviour_mut().kad.query(&id).is_none()
    }

    /// The announcement reached no peer (e.g. no peer known yet): try again soon.
    fn retry_announce(&mut self, why: String) {
        let now = Instant::now();
        let interval = self.settings.announce_interval;
        if let Some(a) = &mut self.announced {
            tracing::debug!(retry_in = ?a.announce_backoff, "DHT announcement failed: {why}");
            a.next_announce = now + a.announce_backoff;
            a.announce_backoff = (a.announce_backoff * 2)
                .min(interval)
                .min(Duration::from_secs(30));
        }
    }
}

/// Answer every waiting command whose deadline has passed with a timeout, and forget it.
fn time_out<K: Copy + Eq + std::hash::Hash>(
    pending: &mut HashMap<K, (Reply<()>, Instant)>,
    now: Instant,
    what: &'static str,
) {
    let late: Vec<K> = pending
        .iter()
        .filter(|(_, (_, deadline))| *deadline <= now)
        .map(|(id, _)| *id)
        .collect();
    for id in late {
        if let Some((reply, _)) = pending.remove(&id) {
            let _ = reply.send(Err(P2pError::Timeout(what)));
        }
    }
}
