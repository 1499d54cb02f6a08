//! Providers behind home routers: what a peer knows of its own reachability, and the
//! settings of the libp2p parts that make a peer behind NAT a full provider.
//!
//! - **AutoNAT** (v1, `/libp2p/autonat/1.0.0`): a peer asks others to dial its addresses
//!   back and learns whether it is public or behind NAT ([`Reach`]).
//! - **Circuit relay v2**: bootstraps (and public nodes that opt in) run a relay server
//!   with the operator's [`RelayLimits`]; a peer behind NAT reserves a slot on relays
//!   ([`RelayMode`]) and announces `/p2p-circuit` addresses through them. Noise runs end to
//!   end over a circuit: the relay forwards ciphertext it can neither read nor alter.
//! - **DCUtR**: over a relayed connection both ends try a direct one (hole punching); the
//!   event loop also re-dials a relayed peer's direct addresses every
//!   [`NatConfig::direct_retry`] and closes the relayed connection once a direct one is up.
//! - **UPnP** (opt-in): asks the home router to map the listen port.

use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};

/// The limits of this peer's relay server. The libp2p defaults (2 minutes and 128 KiB per
/// circuit) would cut an inference session off after a few tokens; these fit one: a
/// session of a few thousand tokens moves some MiB of hidden states per hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayLimits {
    /// Most peers holding a reservation at once.
    pub max_reservations: usize,
    /// Most reservations one peer may hold (one per connection to the relay).
    pub max_reservations_per_peer: usize,
    /// How long a reservation lasts before the peer must renew it.
    pub reservation_duration: Duration,
    /// Most circuits relayed at once.
    pub max_circuits: usize,
    /// Most circuits one source peer may have open at once.
    pub max_circuits_per_peer: usize,
    /// A circuit is cut after this long.
    pub max_circuit_duration: Duration,
    /// A circuit is cut after this many bytes (both directions together).
    pub max_circuit_bytes: u64,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_reservations: 128,
            max_reservations_per_peer: 4,
            reservation_duration: Duration::from_secs(3600),
            max_circuits: 64,
            max_circuits_per_peer: 8,
            max_circuit_duration: Duration::from_secs(3600),
            max_circuit_bytes: 256 * 1024 * 1024,
        }
    }
}

impl RelayLimits {
    /// The libp2p relay config: these limits, libp2p's default rate limiters (a peer may
    /// ask for a reservation or a circuit about once a minute, with bursts).
    pub(crate) fn to_libp2p(self) -> libp2p::relay::Config {
        libp2p::relay::Config {
            max_reservations: self.max_reservations,
            max_reservations_per_peer: self.max_reservations_per_peer,
            reservation_duration: self.reservation_duration,
            max_circuits: self.max_circuits,
            max_circuits_per_peer: self.max_circuits_per_peer,
            max_circuit_duration: self.max_circuit_duration,
            max_circuit_bytes: self.max_circuit_bytes,
            ..Default::default()
        }
    }
}

/// When a peer reserves slots on relays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayMode {
    /// When AutoNAT says this peer is behind NAT (the default).
    #[default]
    Auto,
    /// From the start, whatever AutoNAT says.
    Always,
    /// Never: the peer is reachable directly or not at all.
    Never,
}

impl std::str::FromStr for RelayMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            _ => Err(format!("{s:?}: expected auto, always or never")),
        }
    }
}

/// NAT traversal settings of one peer.
#[derive(Debug, Clone, PartialEq)]
pub struct NatConfig {
    /// Run a relay server with these limits. Default: on for bootstraps only.
    pub relay_server: Option<RelayLimits>,
    /// When to reserve relay slots (servers only; clients never need to be dialed).
    pub relay_mode: RelayMode,
    /// Relays to reserve on (`.../p2p/<peer id>`); empty: the bootstrap peers.
    pub relays: Vec<Multiaddr>,
    /// Ask the router to map the listen port with UPnP.
    pub upnp: bool,
    /// Let AutoNAT ask, and answer, peers at private addresses, and dial a relayed peer at
    /// its loopback addresses too. Off on the internet (a peer on the same LAN would call a
    /// node public that the internet cannot reach); on in a LAN-only mesh or a test lab.
    pub autonat_private_ips: bool,
    /// First AutoNAT probe this long after start (peers need a moment to connect).
    pub autonat_boot_delay: Duration,
    /// How often AutoNAT probes again while unsure, and how often a peer connected only
    /// through a relay is dialed directly again.
    pub direct_retry: Duration,
}

impl Default for NatConfig {
    fn default() -> Self {
        Self {
            relay_server: None,
            relay_mode: RelayMode::Auto,
            relays: Vec::new(),
            upnp: false,
            autonat_private_ips: false,
            autonat_boot_delay: Duration::from_secs(3),
            direct_retry: Duration::from_secs(5),
        }
    }
}

/// Whether peers can dial this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reach {
    /// A peer dialed one of its addresses back.
    Public,
    /// Behind NAT (no peer could dial it) and reachable through at least one relay.
    Relayed,
    /// Behind NAT, with no relay reservation (yet): clients cannot reach it.
    BehindNat,
    /// No probe has answered yet.
    Unknown,
}

impl Reach {
    /// The word `status`, `/healthz` and the dashboard show.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Relayed => "behind NAT, relayed",
            Self::BehindNat => "behind NAT, not reachable",
            Self::Unknown => "unknown",
        }
    }
}

/// What UPnP did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum UpnpState {
    /// `--upnp` not given.
    Off,
    /// Looking for a router.
    Searching,
    /// The router mapped the port: this external address.
    Mapped(String),
    /// No UPnP router answered.
    NoGateway,
    /// The router is itself behind NAT (double NAT, carrier-grade NAT): a mapping on it
    /// does not make this node reachable.
    NonRoutableGateway,
    /// The mapping could not be renewed.
    Expired(String),
}

/// This peer's reachability as it knows it now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatReport {
    pub reach: Reach,
    /// Where `reach` comes from: `autonat` (a probe answered), `relay` (a relay accepted a
    /// reservation), or `addresses` (a guess from address classes, before any probe).
    pub source: String,
    /// The address a probe dialed back, when public.
    pub public_addr: Option<String>,
    /// `/p2p-circuit` addresses through relays that accepted a reservation.
    pub relay_addrs: Vec<String>,
    pub upnp: UpnpState,
    /// Relay-server and hole-punching counters (also in `/metrics`).
    #[serde(default)]
    pub relay: RelayStats,
}

impl NatReport {
    /// One line for `status`, `register` and the dashboard.
    pub fn summary(&self) -> String {
        let mut line = match self.reach {
            Reach::Public => format!(
                "public at {} ({})",
                self.public_addr.as_deref().unwrap_or("?"),
                self.source
            ),
            Reach::Relayed => format!(
                "behind NAT, reachable through {} relay(s) ({})",
                self.relay_addrs.len(),
                self.source
            ),
            Reach::BehindNat => format!(
                "behind NAT and no relay reservation yet: clients cannot reach it ({})",
                self.source
            ),
            Reach::Unknown => "unknown (no AutoNAT probe has answered yet)".into(),
        };
        match &self.upnp {
            UpnpState::Off => {}
            UpnpState::Searching => line.push_str("; UPnP: looking for the router"),
            UpnpState::Mapped(a) => line.push_str(&format!("; UPnP: port mapped at {a}")),
            UpnpState::NoGateway => line.push_str("; UPnP: no router answered"),
            UpnpState::NonRoutableGateway => {
                line.push_str("; UPnP: the router is itself behind NAT, mapping useless")
            }
            UpnpState::Expired(a) => line.push_str(&format!("; UPnP: mapping {a} expired")),
        }
        line
    }
}

/// The peer an address leads to: its last `/p2p/` part (in a relayed address
/// `/ip4/../p2p/RELAY/p2p-circuit/p2p/PEER` that is the peer behind the relay).
pub fn target_peer(addr: &Multiaddr) -> Option<libp2p::PeerId> {
    match addr.iter().last()? {
        Protocol::P2p(peer) => Some(peer),
        _ => None,
    }
}

/// `addr` without its trailing `/p2p/<peer>` (a relay's `/p2p/` inside stays).
pub fn without_target(addr: &Multiaddr) -> Multiaddr {
    let mut a = addr.clone();
    if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
        a.pop();
    }
    a
}

/// True for a `/p2p-circuit` (relayed) address.
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// Relay-server and hole-punching counters (part of [`super::P2pStats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayStats {
    /// Reservations this relay accepted / refused (limits or rate).
    pub reservations_accepted: u64,
    pub reservations_refused: u64,
    /// Circuits this relay opened / refused (limits, rate, or no reservation).
    pub circuits_accepted: u64,
    pub circuits_refused: u64,
    /// Circuits that ended, and those cut at the byte or duration limit.
    pub circuits_closed: u64,
    pub circuits_cut_bytes: u64,
    pub circuits_cut_time: u64,
    /// Circuits open right now.
    pub circuits_open: u64,
    /// Reservations this peer holds on relays now, and refusals it got.
    pub own_reservations: u64,
    pub own_reservations_refused: u64,
    /// Hole punches (DCUtR) that gave a direct connection / that failed.
    pub holepunch_succeeded: u64,
    pub holepunch_failed: u64,
    /// Relayed connections closed because a direct one to the same peer came up.
    pub moved_to_direct: u64,
    /// Session bytes (requests and responses) this node sent / received over relayed
    /// connections: what its relayed sessions cost the relays. (libp2p-relay 0.22 does
    /// not report the bytes a relay server forwards; its per-circuit cap is enforced.)
    #[serde(default)]
    pub relayed_bytes_sent: u64,
    #[serde(default)]
    pub relayed_bytes_received: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relayed_addresses_are_told_apart() {
        let relayed: Multiaddr = "/ip4/10.0.0.1/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit"
            .parse()
            .unwrap();
        assert!(is_relayed(&relayed));
        assert!(!is_relayed(&"/ip4/10.0.0.1/tcp/1".parse().unwrap()));
        let relay = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";
        let peer = "12D3KooWHEjRaFThDdTZ8CsRzgZ1mCQZ5Dz5t1jA6sWfTTtKjbvg";
        let full: Multiaddr = format!("/ip4/10.0.0.1/tcp/1/p2p/{relay}/p2p-circuit/p2p/{peer}")
            .parse()
            .unwrap();
        assert_eq!(target_peer(&full).unwrap().to_string(), peer);
        assert_eq!(
            without_target(&full).to_string(),
            format!("/ip4/10.0.0.1/tcp/1/p2p/{relay}/p2p-circuit")
        );
        assert_eq!(target_peer(&without_target(&full)), None);
    }

    #[test]
    fn relay_limits_fit_a_session_and_reach_libp2p() {
        let limits = RelayLimits::default();
        // libp2p's defaults are 2 min / 128 KiB per circuit.
        assert!(limits.max_circuit_duration >= Duration::from_secs(30 * 60));
        assert!(limits.max_circuit_bytes >= 64 * 1024 * 1024);
        let cfg = limits.to_libp2p();
        assert_eq!(cfg.max_circuit_bytes, limits.max_circuit_bytes);
        assert_eq!(cfg.max_reservations, limits.max_reservations);
        assert_eq!("always".parse::<RelayMode>(), Ok(RelayMode::Always));
        assert!("sometimes".parse::<RelayMode>().is_err());
    }
}
