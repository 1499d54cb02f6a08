//! A cap on inbound connections from one host.
//!
//! Peer ids cost nothing, so a flooder on one machine can open as many connections as the
//! total limit allows (libp2p's connection-limits counts per peer and in total, not per
//! address) and lock every honest peer out. With this cap it holds at most
//! `max_per_ip` of them; the rest of the total stays free for other hosts. A host is an
//! IPv4 address or an IPv6 /64: one host (or home) is handed a whole /64 and can dial
//! from any address in it, so counting IPv6 addresses one by one would cap nothing.
//!
//! Pending connections (accepted, handshake not done) are capped per host too: they share
//! one small global limit (64), and a host that opens ~100 plain TCP connections and sends
//! nothing (reconnecting whenever one times out) would otherwise hold all of it, and no new
//! peer could join. With `max_pending_per_ip` a host holds at most that many; the next
//! is refused before its handshake ([`PendingLimitExceeded`], counted in `/metrics`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv6Addr};
use std::task::{Context, Poll};

use libp2p::core::transport::PortUse;
use libp2p::core::{ConnectedPoint, Endpoint};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::{ConnectionClosed, ConnectionEstablished, ListenFailure};
use libp2p::swarm::{
    dummy, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

/// Why an inbound connection was refused: its host already holds `limit` of them.
#[derive(Debug, thiserror::Error)]
#[error("{host} already holds {limit} inbound connections")]
pub struct IpLimitExceeded {
    /// The IPv4 address, or the IPv6 /64 (its lower 64 bits zero).
    pub host: IpAddr,
    pub limit: u32,
}

/// Why an inbound connection was refused before its handshake: its host already has
/// `limit` connections in their handshakes.
#[derive(Debug, thiserror::Error)]
#[error("{host} already has {limit} inbound connections in their handshake")]
pub struct PendingLimitExceeded {
    /// The IPv4 address, or the IPv6 /64 (its lower 64 bits zero).
    pub host: IpAddr,
    pub limit: u32,
}

/// Counts inbound connections by remote host, pending and established, and refuses the
/// one over either cap.
pub(crate) struct Behaviour {
    max_per_ip: u32,
    max_pending_per_ip: u32,
    /// The host of each established inbound connection counted.
    inbound: HashMap<ConnectionId, IpAddr>,
    per_ip: HashMap<IpAddr, u32>,
    /// The host of each inbound connection in its handshake.
    pending: HashMap<ConnectionId, IpAddr>,
    pending_per_ip: HashMap<IpAddr, u32>,
}

impl Behaviour {
    pub fn new(max_per_ip: u32, max_pending_per_ip: u32) -> Self {
        Self {
            max_per_ip,
            max_pending_per_ip,
            inbound: HashMap::new(),
            per_ip: HashMap::new(),
            pending: HashMap::new(),
            pending_per_ip: HashMap::new(),
        }
    }

    /// Counts a connection entering its handshake, or refuses it when its host has
    /// `max_pending_per_ip` there already.
    fn admit_pending(
        &mut self,
        id: ConnectionId,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        let Some(host) = host_of(remote) else {
            return Ok(());
        };
        let n = self.pending_per_ip.entry(host).or_insert(0);
        if *n >= self.max_pending_per_ip {
            return Err(ConnectionDenied::new(PendingLimitExceeded {
                host,
                limit: self.max_pending_per_ip,
            }));
        }
        *n += 1;
        self.pending.insert(id, host);
        Ok(())
    }

    /// A pending connection is done with its handshake (established, failed or refused).
    fn end_pending(&mut self, id: ConnectionId) {
        if let Some(host) = self.pending.remove(&id) {
            decrement(&mut self.pending_per_ip, host);
        }
    }

    fn check(&self, remote: &Multiaddr) -> Result<(), ConnectionDenied> {
        let Some(host) = host_of(remote) else {
            return Ok(());
        };
        if self.per_ip.get(&host).copied().unwrap_or(0) >= self.max_per_ip {
            return Err(ConnectionDenied::new(IpLimitExceeded {
                host,
                limit: self.max_per_ip,
            }));
        }
        Ok(())
    }
}

/// One fewer for `host`; a host at zero is forgotten, so the maps hold only live hosts.
fn decrement(counts: &mut HashMap<IpAddr, u32>, host: IpAddr) {
    if let Some(n) = counts.get_mut(&host) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(&host);
        }
    }
}

/// The host a multiaddr dials from: its IPv4 address (also when written IPv4-mapped), or
/// its IPv6 /64. None for DNS names, relays and the like: a relayed connection comes
/// from the relay's address, and the relay enforces its own per-peer limits.
fn host_of(addr: &Multiaddr) -> Option<IpAddr> {
    if addr.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
        return None;
    }
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(match ip.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(ip) & (u128::MAX << 64))),
        }),
        _ => None,
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    /// Refused before the handshake, so a flooder does not even cost us a noise session.
    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.check(remote)?;
        self.admit_pending(id, remote)
    }

    /// Checked again at establishment: many handshakes from one address may run at once.
    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(remote)?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(ConnectionEstablished {
                connection_id,
                endpoint: ConnectedPoint::Listener { send_back_addr, .. },
                ..
            }) => {
                self.end_pending(connection_id);
                if let Some(host) = host_of(send_back_addr) {
                    self.inbound.insert(connection_id, host);
                    *self.per_ip.entry(host).or_insert(0) += 1;
                }
            }
            // The handshake failed or timed out, or a behaviour refused the connection
            // (this one included: then it was never counted, and nothing changes).
            FromSwarm::ListenFailure(ListenFailure { connection_id, .. }) => {
                self.end_pending(connection_id);
            }
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. }) => {
                if let Some(host) = self.inbound.remove(&connection_id) {
                    decrement(&mut self.per_ip, host);
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Infallible, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbound(from: &str) -> ConnectedPoint {
        ConnectedPoint::Listener {
            local_addr: "/ip4/10.0.0.1/tcp/31337".parse().unwrap(),
            send_back_addr: format!("{from}/tcp/40000").parse().unwrap(),
        }
    }

    /// What the swarm does with an inbound connection from `from`, up to established.
    fn connect(b: &mut Behaviour, id: usize, from: &str) -> Result<(), ConnectionDenied> {
        let endpoint = inbound(from);
        let ConnectedPoint::Listener {
            local_addr: local,
            send_back_addr: remote,
        } = &endpoint
        else {
            unreachable!("inbound() is a listener endpoint")
        };
        let (connection_id, peer_id) = (ConnectionId::new_unchecked(id), PeerId::random());
        b.handle_pending_inbound_connection(connection_id, local, remote)?;
        b.handle_established_inbound_connection(connection_id, peer_id, local, remote)?;
        b.on_swarm_event(FromSwarm::ConnectionEstablished(ConnectionEstablished {
            peer_id,
            connection_id,
            endpoint: &endpoint,
            failed_addresses: &[],
            other_established: 0,
        }));
        Ok(())
    }

    fn close(b: &mut Behaviour, id: usize, from: &str) {
        b.on_swarm_event(FromSwarm::ConnectionClosed(ConnectionClosed {
            peer_id: PeerId::random(),
            connection_id: ConnectionId::new_unchecked(id),
            endpoint: &inbound(from),
            cause: None,
            remaining_established: 0,
        }));
    }

    #[test]
    fn each_host_gets_its_own_share() {
        let mut b = Behaviour::new(2, 8);
        let (crowd, other, v6) = ("/ip4/192.0.2.7", "/ip4/198.51.100.9", "/ip6/2001:db8::1");
        // Addresses of one /64 are one host; the next /64 is another.
        let (same_64, next_64) = ("/ip6/2001:db8::ffff:2", "/ip6/2001:db8:0:1::1");
        connect(&mut b, 1, crowd).unwrap();
        connect(&mut b, 2, crowd).unwrap();
        let refused = connect(&mut b, 3, crowd).unwrap_err();
        let why = refused.downcast_ref::<IpLimitExceeded>().unwrap();
        assert_eq!(why.limit, 2);
        // Other hosts are not held back by the crowd.
        connect(&mut b, 4, other).unwrap();
        connect(&mut b, 5, v6).unwrap();
        connect(&mut b, 6, same_64).unwrap();
        assert!(connect(&mut b, 7, same_64).is_err());
        connect(&mut b, 10, next_64).unwrap();
        // IPv4-mapped IPv6 is the IPv4 host.
        assert!(connect(&mut b, 11, "/ip6/::ffff:192.0.2.7").is_err());
        // A closed connection frees its slot; closing one never counted changes nothing.
        close(&mut b, 1, crowd);
        close(&mut b, 3, crowd);
        connect(&mut b, 8, crowd).unwrap();
        assert!(connect(&mut b, 9, crowd).is_err());
        assert_eq!(b.per_ip.values().sum::<u32>(), 6);
    }

    #[test]
    fn a_host_holds_at_most_its_share_of_handshakes() {
        let mut b = Behaviour::new(32, 2);
        let (local, crowd): (Multiaddr, Multiaddr) = (
            "/ip4/10.0.0.1/tcp/31337".parse().unwrap(),
            "/ip4/192.0.2.7/tcp/40000".parse().unwrap(),
        );
        let other: Multiaddr = "/ip4/198.51.100.9/tcp/40000".parse().unwrap();
        let pending = |b: &mut Behaviour, id: usize, from: &Multiaddr| {
            b.handle_pending_inbound_connection(ConnectionId::new_unchecked(id), &local, from)
        };
        pending(&mut b, 1, &crowd).unwrap();
        pending(&mut b, 2, &crowd).unwrap();
        let refused = pending(&mut b, 3, &crowd).unwrap_err();
        assert!(refused.downcast_ref::<PendingLimitExceeded>().is_some());
        pending(&mut b, 4, &other).unwrap();
        // The refused one's failure (never counted) frees nothing; a timed-out
        // handshake frees its slot.
        for id in [3, 1] {
            b.on_swarm_event(FromSwarm::ListenFailure(ListenFailure {
                local_addr: &local,
                send_back_addr: &crowd,
                error: &libp2p::swarm::ListenError::Aborted,
                connection_id: ConnectionId::new_unchecked(id),
                peer_id: None,
            }));
        }
        pending(&mut b, 5, &crowd).unwrap();
        assert!(pending(&mut b, 6, &crowd).is_err());
        assert_eq!(b.pending_per_ip.values().sum::<u32>(), 3);
        // Established connections leave the pending count (the freed slot holds the next).
        connect(&mut b, 7, "/ip4/203.0.113.5").unwrap();
        assert_eq!(b.pending.len(), 3);
    }
}
