//! Behind home routers: AutoNAT's verdict, reservations on relays while this peer is not
//! publicly reachable, the relay server's counters, hole punching, UPnP, and moving a
//! session from a relayed connection to a direct one once both exist.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::ConnectionId;
use libp2p::{autonat, dcutr, relay, upnp, Multiaddr, PeerId};

use super::EventLoop;
use crate::p2p::nat::{self, NatConfig, NatReport, Reach, RelayMode, UpnpState};
use crate::p2p::reachability::{self, Scope};
use crate::p2p::Role;

/// Most direct addresses remembered per relayed peer.
const MAX_DIRECT_ADDRS: usize = 8;
/// Longest wait before asking a relay that refused (or failed) again; the wait doubles
/// from [`NatConfig::direct_retry`] with each failure in a row.
const MAX_RESERVE_BACKOFF: Duration = Duration::from_secs(300);

/// What the loop tracks for NAT traversal.
pub(super) struct NatState {
    mode: RelayMode,
    /// Relays to reserve on: configured ones, else the bootstraps.
    relays: Vec<(PeerId, Multiaddr)>,
    direct_retry: Duration,
    /// A LAN-only mesh or a test lab ([`NatConfig::autonat_private_ips`]): a relayed
    /// peer's loopback addresses are worth a direct dial too (it shares this machine).
    private_ips: bool,
    autonat: autonat::NatStatus,
    /// Circuit listeners asked for, by relay.
    listeners: HashMap<ListenerId, PeerId>,
    /// Circuit addresses the relays confirmed, by listener.
    relay_addrs: HashMap<ListenerId, Multiaddr>,
    next_reserve: Instant,
    /// Relays that refused or failed: not asked again before the instant, and the wait
    /// after the next failure.
    backoff: HashMap<PeerId, (Instant, Duration)>,
    next_direct: Instant,
    upnp: UpnpState,
    /// Each peer's connections.
    conns: HashMap<PeerId, HashMap<ConnectionId, Conn>>,
    /// Connections this peer dialed only to answer a peer's AutoNAT probe. They are
    /// closed once answered: kept, they pile up (gossipsub keeps every connection to a
    /// mesh peer alive) until the per-peer connection limit denies the next dial-back,
    /// and a public peer is then told it is behind NAT.
    dialbacks: HashSet<(PeerId, ConnectionId)>,
    /// Non-relayed addresses peers told us of (identify), to dial them directly again.
    direct_addrs: HashMap<PeerId, Vec<Multiaddr>>,
}

/// One connection as NAT traversal sees it.
struct Conn {
    /// It goes through a relay.
    relayed: bool,
    /// The address this peer dialed it at (`None`: the peer dialed us); a dial-back is
    /// found by it.
    dialed: Option<Multiaddr>,
    /// When it was established: a second connection is pruned only once it lasted.
    since: Instant,
}

impl NatState {
    pub(super) fn new(cfg: &NatConfig, bootstrap: &[(PeerId, Multiaddr)], now: Instant) -> Self {
        let relays = if cfg.relays.is_empty() {
            bootstrap.to_vec()
        } else {
            cfg.relays
                .iter()
                .filter_map(|a| {
                    let peer = a.iter().find_map(|p| match p {
                        Protocol::P2p(peer) => Some(peer),
                        _ => None,
                    })?;
                    Some((peer, a.clone()))
                })
                .collect()
        };
        Self {
            mode: cfg.relay_mode,
            relays,
            direct_retry: cfg.direct_retry,
            private_ips: cfg.autonat_private_ips,
            autonat: autonat::NatStatus::Unknown,
            listeners: HashMap::new(),
            relay_addrs: HashMap::new(),
            next_reserve: now + Duration::from_secs(1),
            backoff: HashMap::new(),
            next_direct: now + cfg.direct_retry,
            upnp: if cfg.upnp {
                UpnpState::Searching
            } else {
                UpnpState::Off
            },
            conns: HashMap::new(),
            dialbacks: HashSet::new(),
            direct_addrs: HashMap::new(),
        }
    }

    fn reach(&self) -> (Reach, &'static str) {
        let relayed = !self.relay_addrs.is_empty();
        match &self.autonat {
            autonat::NatStatus::Public(_) => (Reach::Public, "autonat"),
            autonat::NatStatus::Private if relayed => (Reach::Relayed, "autonat"),
            autonat::NatStatus::Private => (Reach::BehindNat, "autonat"),
            autonat::NatStatus::Unknown if relayed => (Reach::Relayed, "relay"),
            autonat::NatStatus::Unknown => (Reach::Unknown, "none"),
        }
    }

    /// Whether this peer should hold relay reservations now.
    fn wants_relays(&self, role: Role) -> bool {
        role == Role::Server
            && match self.mode {
                RelayMode::Always => true,
                RelayMode::Never => false,
                RelayMode::Auto => matches!(self.autonat, autonat::NatStatus::Private),
            }
    }

    /// The addresses among a peer's own (identify) that a direct dial could reach.
    fn dialable(&self, addrs: &[Multiaddr]) -> Vec<Multiaddr> {
        addrs
            .iter()
            .filter(|a| !nat::is_relayed(a))
            .filter(|a| match reachability::scope(a) {
                Scope::Public | Scope::Private | Scope::Unknown => true,
                Scope::Loopback => self.private_ips,
                Scope::Unspecified => false,
            })
            .take(MAX_DIRECT_ADDRS)
            .cloned()
            .collect()
    }

    /// A peer whose every connection goes through a relay.
    fn only_relayed(&self, peer: &PeerId) -> bool {
        self.conns
            .get(peer)
            .is_some_and(|c| !c.is_empty() && c.values().all(|c| c.relayed))
    }
}

impl EventLoop {
    pub(super) fn nat_report(&self) -> NatReport {
        let n = &self.nat;
        let (reach, source) = n.reach();
        NatReport {
            reach,
            source: source.into(),
            public_addr: match &n.autonat {
                autonat::NatStatus::Public(a) => Some(a.to_string()),
                _ => None,
            },
            relay_addrs: n
                .relay_addrs
                .values()
                .map(|a| self.with_own_id(a).to_string())
                .collect(),
            upnp: n.upnp.clone(),
            relay: self.stats.relay,
        }
    }

    /// `addr` ending in `/p2p/<this peer>` (once).
    fn with_own_id(&self, addr: &Multiaddr) -> Multiaddr {
        nat::without_target(addr).with(Protocol::P2p(self.local))
    }

    pub(super) fn on_autonat(&mut self, event: autonat::Event) {
        match event {
            autonat::Event::StatusChanged { old, new } => {
                tracing::info!(
                    "reachability (AutoNAT): {} (was {})",
                    status_word(&new),
                    status_word(&old)
                );
                self.nat.autonat = new;
                // Reserve (or release) at once rather than on the next retry.
                self.nat.next_reserve = Instant::now();
            }
            autonat::Event::OutboundProbe(e) => tracing::debug!("AutoNAT probe: {e:?}"),
            autonat::Event::InboundProbe(autonat::InboundProbeEvent::Response {
                peer,
                address,
                ..
            }) => {
                // The newest connection dialed to that address is the dial-back.
                let dialback = self.nat.conns.get(&peer).and_then(|c| {
                    c.iter()
                        .filter(|(_, c)| !c.relayed && c.dialed.as_ref() == Some(&address))
                        .map(|(id, _)| *id)
                        .max()
                });
                if let Some(id) = dialback {
                    self.nat.dialbacks.insert((peer, id));
                    // At once where it can be; else on a later tick.
                    self.close_answered_dialbacks();
                }
            }
            autonat::Event::InboundProbe(e) => tracing::debug!("AutoNAT probe for a peer: {e:?}"),
        }
    }

    pub(super) fn on_relay_server(&mut self, event: relay::Event) {
        let s = &mut self.stats.relay;
        match event {
            relay::Event::ReservationReqAccepted { src_peer_id, .. } => {
                s.reservations_accepted += 1;
                tracing::debug!(peer = %src_peer_id, "relay: reservation accepted");
            }
            relay::Event::ReservationReqDenied {
                src_peer_id,
                status,
            } => {
                s.reservations_refused += 1;
                tracing::info!(peer = %src_peer_id, "relay: reservation refused ({status:?}: over the relay's limits)");
            }
            relay::Event::CircuitReqAccepted {
                src_peer_id,
                dst_peer_id,
            } => {
                s.circuits_accepted += 1;
                s.circuits_open += 1;
                tracing::debug!(src = %src_peer_id, dst = %dst_peer_id, "relay: circuit opened");
            }
            relay::Event::CircuitReqDenied {
                src_peer_id,
                dst_peer_id,
                status,
            } => {
                s.circuits_refused += 1;
                tracing::info!(src = %src_peer_id, dst = %dst_peer_id, "relay: circuit refused ({status:?})");
            }
            relay::Event::CircuitClosed {
                src_peer_id,
                dst_peer_id,
                error,
            } => {
                s.circuits_closed += 1;
                s.circuits_open = s.circuits_open.saturating_sub(1);
                match &error {
                    Some(e) if e.to_string().contains("Max circuit bytes") => {
                        s.circuits_cut_bytes += 1;
                        tracing::info!(src = %src_peer_id, dst = %dst_peer_id, "relay: circuit cut at its byte limit");
                    }
                    Some(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                        s.circuits_cut_time += 1;
                        tracing::info!(src = %src_peer_id, dst = %dst_peer_id, "relay: circuit cut at its duration limit");
                    }
                    _ => {
                        tracing::debug!(src = %src_peer_id, dst = %dst_peer_id, "relay: circuit closed ({error:?})")
                    }
                }
            }
            relay::Event::StatusChanged { status } => {
                tracing::info!("relay server: {status:?}");
            }
            _ => {}
        }
    }

    pub(super) fn on_relay_client(&mut self, event: relay::client::Event) {
        match event {
            relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal: false,
                limit,
            } => tracing::info!(relay = %relay_peer_id, ?limit, "relay reservation accepted"),
            other => tracing::debug!("relay client: {other:?}"),
        }
    }

    pub(super) fn on_dcutr(&mut self, event: dcutr::Event) {
        match event.result {
            Ok(_) => {
                self.stats.relay.holepunch_succeeded += 1;
                tracing::info!(peer = %event.remote_peer_id, "hole punch succeeded: direct connection");
            }
            Err(e) => {
                self.stats.relay.holepunch_failed += 1;
                tracing::info!(peer = %event.remote_peer_id, "hole punch failed ({e}): staying relayed");
            }
        }
    }

    pub(super) fn on_upnp(&mut self, event: upnp::Event) {
        self.nat.upnp = match event {
            upnp::Event::NewExternalAddr { external_addr, .. } => {
                tracing::info!("UPnP: the router mapped the port: {external_addr}");
                UpnpState::Mapped(external_addr.to_string())
            }
            upnp::Event::ExpiredExternalAddr { external_addr, .. } => {
                tracing::warn!("UPnP: the mapping {external_addr} could not be renewed");
                UpnpState::Expired(external_addr.to_string())
            }
            upnp::Event::GatewayNotFound => {
                tracing::warn!("UPnP: no router answered; relays will be used if needed");
                UpnpState::NoGateway
            }
            upnp::Event::NonRoutableGateway => {
                tracing::warn!(
                    "UPnP: the router is itself behind NAT (double or carrier-grade NAT): a \
                     mapping would not make this node reachable; relays will be used"
                );
                UpnpState::NonRoutableGateway
            }
        };
    }

    /// A circuit listener got its address: the relay accepted the reservation.
    pub(super) fn on_circuit_addr(&mut self, listener: ListenerId, address: Multiaddr) -> bool {
        if !self.nat.listeners.contains_key(&listener) {
            return false;
        }
        tracing::info!(
            "reachable through a relay at {}",
            self.with_own_id(&address)
        );
        if let Some(relay) = self.nat.listeners.get(&listener) {
            self.nat.backoff.remove(relay);
        }
        self.nat.relay_addrs.insert(listener, address);
        self.stats.relay.own_reservations = self.nat.relay_addrs.len() as u64;
        self.nat_addresses_changed();
        true
    }

    /// A circuit listener ended: the reservation was refused, expired or the relay left.
    pub(super) fn on_listener_closed(&mut self, listener: ListenerId, reason: Option<String>) {
        let Some(relay) = self.nat.listeners.remove(&listener) else {
            return;
        };
        let had_addr = self.nat.relay_addrs.remove(&listener).is_some();
        self.stats.relay.own_reservations = self.nat.relay_addrs.len() as u64;
        match reason {
            Some(why) if !had_addr => {
                self.stats.relay.own_reservations_refused += 1;
                let now = Instant::now();
                let wait = self
                    .nat
                    .backoff
                    .get(&relay)
                    .map_or(self.nat.direct_retry, |(_, w)| *w);
                self.nat
                    .backoff
                    .insert(relay, (now + wait, (wait * 2).min(MAX_RESERVE_BACKOFF)));
                tracing::warn!(%relay, "relay reservation failed: {why} (asking again in {wait:?})");
            }
            _ => tracing::info!(%relay, "relay reservation ended"),
        }
        if had_addr {
            self.nat_addresses_changed();
        }
        self.nat.next_reserve = Instant::now() + self.nat.direct_retry;
    }

    /// New relay addresses go out in the next heartbeat and DHT record at once.
    fn nat_addresses_changed(&mut self) {
        let now = Instant::now();
        if let Some(a) = &mut self.announced {
            a.next_heartbeat = now;
            a.next_announce = now;
        }
    }

    /// Remembers a connection, whether it is relayed, and the address it was dialed at
    /// (`None`: the peer dialed us).
    pub(super) fn nat_connection(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        relayed: bool,
        dialed: Option<&Multiaddr>,
    ) {
        self.nat.conns.entry(peer).or_default().insert(
            id,
            Conn {
                relayed,
                dialed: dialed.cloned(),
                since: Instant::now(),
            },
        );
    }

    pub(super) fn nat_connection_closed(&mut self, peer: PeerId, id: ConnectionId) {
        self.nat.dialbacks.remove(&(peer, id));
        if let Some(c) = self.nat.conns.get_mut(&peer) {
            c.remove(&id);
            if c.is_empty() {
                self.nat.conns.remove(&peer);
                self.nat.direct_addrs.remove(&peer);
            }
        }
    }

    /// Whether `peer` has exactly one connection and it is direct.
    pub(super) fn one_direct_connection(&self, peer: &PeerId) -> bool {
        self.nat
            .conns
            .get(peer)
            .is_some_and(|c| c.len() == 1 && c.values().all(|c| !c.relayed))
    }

    /// Whether `id` (a connection to `peer`) goes through a relay.
    pub(super) fn is_relayed_connection(&self, peer: &PeerId, id: ConnectionId) -> bool {
        self.nat
            .conns
            .get(peer)
            .and_then(|c| c.get(&id))
            .is_some_and(|c| c.relayed)
    }

    /// A peer's own listen addresses (identify): the direct ones are kept to dial it
    /// directly while it is connected through a relay only.
    pub(super) fn nat_peer_addrs(&mut self, peer: PeerId, addrs: &[Multiaddr]) {
        let direct = self.nat.dialable(addrs);
        if direct.is_empty() {
            self.nat.direct_addrs.remove(&peer);
        } else {
            self.nat.direct_addrs.insert(peer, direct);
        }
    }

    /// The tick's NAT work: reservations to make or drop, direct dials to relayed peers,
    /// relayed connections to close once a direct one is up.
    pub(super) fn nat_tick(&mut self, now: Instant) {
        if now >= self.nat.next_reserve {
            self.nat.next_reserve = now + self.nat.direct_retry;
            self.reserve_or_release();
        }
        if now >= self.nat.next_direct {
            self.nat.next_direct = now + self.nat.direct_retry;
            self.dial_relayed_peers_directly();
        }
        self.close_superseded_relayed();
        self.close_answered_dialbacks();
        self.close_duplicate_connections(now);
    }

    fn reserve_or_release(&mut self) {
        if self.nat.wants_relays(self.settings.role) {
            let asked: HashSet<PeerId> = self.nat.listeners.values().copied().collect();
            let now = Instant::now();
            let waiting = |peer: &PeerId| {
                self.nat
                    .backoff
                    .get(peer)
                    .is_some_and(|(until, _)| *until > now)
            };
            let relays: Vec<(PeerId, Multiaddr)> = self
                .nat
                .relays
                .iter()
                .filter(|(peer, _)| !asked.contains(peer) && *peer != self.local && !waiting(peer))
                .cloned()
                .collect();
            for (relay, addr) in relays {
                let circuit = addr.with(Protocol::P2pCircuit);
                match self.swarm.listen_on(circuit.clone()) {
                    Ok(id) => {
                        tracing::info!(%relay, "not publicly reachable: asking {circuit} for a reservation");
                        self.nat.listeners.insert(id, relay);
                    }
                    Err(e) => tracing::warn!(%relay, "cannot listen through the relay: {e}"),
                }
            }
        } else if self.nat.mode == RelayMode::Auto
            && matches!(self.nat.autonat, autonat::NatStatus::Public(_))
        {
            let ids: Vec<ListenerId> = self.nat.listeners.keys().copied().collect();
            for id in ids {
                tracing::info!("publicly reachable: dropping the relay reservation");
                self.swarm.remove_listener(id);
            }
        }
    }

    /// Every [`NatConfig::direct_retry`]: a peer reached only through a relay is dialed
    /// at its direct addresses, in case its router now lets connections in (a forwarded
    /// port, a UPnP mapping, a route that came back).
    fn dial_relayed_peers_directly(&mut self) {
        let peers: Vec<(PeerId, Vec<Multiaddr>)> = self
            .nat
            .direct_addrs
            .iter()
            .filter(|(peer, _)| self.nat.only_relayed(peer))
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        for (peer, addrs) in peers {
            tracing::debug!(%peer, "relayed peer: trying a direct connection");
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs)
                .condition(PeerCondition::Always)
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::debug!(%peer, "direct dial: {e}");
            }
        }
    }

    /// Closes a relayed connection this peer dialed once a direct one to the same peer is
    /// up and no request of ours waits on that peer, so that sessions continue directly
    /// (request-response spreads requests over all of a peer's connections).
    fn close_superseded_relayed(&mut self) {
        let busy = self.busy_peers();
        let mut to_close = Vec::new();
        for (peer, conns) in &self.nat.conns {
            let has_direct = conns.values().any(|c| !c.relayed);
            if !has_direct || busy.contains(peer) {
                continue;
            }
            to_close.extend(
                conns
                    .iter()
                    .filter(|(_, c)| c.relayed && c.dialed.is_some())
                    .map(|(id, _)| (*peer, *id)),
            );
        }
        for (peer, id) in to_close {
            if self.swarm.close_connection(id) {
                self.stats.relay.moved_to_direct += 1;
                tracing::info!(%peer, "direct connection up: relayed connection closed");
            }
            if let Some(c) = self.nat.conns.get_mut(&peer) {
                c.remove(&id);
            }
        }
    }

    /// Peers a request of ours waits on: none of their connections is closed under it.
    fn busy_peers(&self) -> HashSet<PeerId> {
        self.pending_requests.values().map(|(p, _, _)| *p).collect()
    }

    /// Closes the connections dialed to answer AutoNAT probes, each once its peer has
    /// another connection and no request of ours waits on that peer (request-response
    /// may have put one on it). A dial-back that became a peer's only connection stays.
    fn close_answered_dialbacks(&mut self) {
        if self.nat.dialbacks.is_empty() {
            return;
        }
        let busy = self.busy_peers();
        let answered: Vec<(PeerId, ConnectionId)> = self.nat.dialbacks.iter().copied().collect();
        for (peer, id) in answered {
            let others = self
                .nat
                .conns
                .get(&peer)
                .map_or(0, |c| c.len().saturating_sub(1));
            if others == 0 {
                self.nat.dialbacks.remove(&(peer, id));
            } else if !busy.contains(&peer) {
                self.nat.dialbacks.remove(&(peer, id));
                if self.swarm.close_connection(id) {
                    tracing::debug!(%peer, "AutoNAT dial-back answered: connection closed");
                }
            }
        }
    }
}

fn status_word(s: &autonat::NatStatus) -> String {
    match s {
        autonat::NatStatus::Public(a) => format!("public at {a}"),
        autonat::NatStatus::Private => "behind NAT (no peer could dial in)".into(),
        autonat::NatStatus::Unknown => "unknown".into(),
    }
}

mod duplicates;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reach_follows_autonat_and_reservations_and_mode_decides_relaying() {
        let mut n = NatState::new(&NatConfig::default(), &[], Instant::now());
        assert_eq!(n.reach(), (Reach::Unknown, "none"));
        assert!(!n.wants_relays(Role::Server), "auto waits for AutoNAT");
        n.autonat = autonat::NatStatus::Private;
        assert_eq!(n.reach(), (Reach::BehindNat, "autonat"));
        assert!(n.wants_relays(Role::Server));
        assert!(!n.wants_relays(Role::Client), "clients are never dialed");
        assert!(!n.wants_relays(Role::Bootstrap));
        let circuit: Multiaddr = "/ip4/203.0.113.1/tcp/1/p2p-circuit".parse().unwrap();
        n.relay_addrs.insert(ListenerId::next(), circuit);
        assert_eq!(n.reach(), (Reach::Relayed, "autonat"));
        n.autonat = autonat::NatStatus::Unknown;
        assert_eq!(n.reach(), (Reach::Relayed, "relay"));
        n.autonat = autonat::NatStatus::Public("/ip4/203.0.113.2/tcp/1".parse().unwrap());
        assert_eq!(n.reach().0, Reach::Public);
        assert!(!n.wants_relays(Role::Server));
        n.mode = RelayMode::Always;
        assert!(n.wants_relays(Role::Server));
        n.mode = RelayMode::Never;
        n.autonat = autonat::NatStatus::Private;
        assert!(!n.wants_relays(Role::Server));
    }

    /// Loopback addresses reach a relayed peer only on this machine: dialled in a lab or
    /// LAN-only mesh, never otherwise (they would reach this machine, not the peer).
    #[test]
    fn a_relayed_peers_loopback_addresses_are_dialled_only_in_a_lab() {
        let addrs: Vec<Multiaddr> = [
            "/ip4/127.0.0.1/tcp/4001",
            "/ip4/192.168.1.5/tcp/4001",
            "/ip4/203.0.113.9/tcp/4001",
            "/ip4/0.0.0.0/tcp/4001",
            "/ip4/203.0.113.1/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let internet = NatState::new(&NatConfig::default(), &[], Instant::now());
        assert_eq!(internet.dialable(&addrs), addrs[1..3].to_vec());
        let lab = NatConfig {
            autonat_private_ips: true,
            ..NatConfig::default()
        };
        let lab = NatState::new(&lab, &[], Instant::now());
        assert_eq!(lab.dialable(&addrs), addrs[..3].to_vec());
    }

    #[test]
    fn configured_relays_replace_the_bootstraps() {
        let boot: Multiaddr =
            "/ip4/203.0.113.1/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
                .parse()
                .unwrap();
        let boot_peer = crate::p2p::nat::target_peer(&boot).unwrap();
        let by_default = NatState::new(&NatConfig::default(), &[(boot_peer, boot)], Instant::now());
        assert_eq!(by_default.relays.len(), 1);
        let relay: Multiaddr =
            "/ip4/203.0.113.9/tcp/1/p2p/12D3KooWHEjRaFThDdTZ8CsRzgZ1mCQZ5Dz5t1jA6sWfTTtKjbvg"
                .parse()
                .unwrap();
        let cfg = NatConfig {
            relays: vec![relay.clone(), "/ip4/203.0.113.9/tcp/2".parse().unwrap()],
            ..NatConfig::default()
        };
        let chosen = NatState::new(
            &cfg,
            &[(boot_peer, "/ip4/1.1.1.1/tcp/1".parse().unwrap())],
            Instant::now(),
        );
        // Only addresses naming their peer count; the bootstrap is not used.
        assert_eq!(
            chosen.relays,
            vec![(crate::p2p::nat::target_peer(&relay).unwrap(), relay)]
        );
    }
}
