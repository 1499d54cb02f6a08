//! One direct connection per peer. Two peers that dial each other at once end up with two
//! connections, and gossipsub keeps both alive for good; while a peer has two, no session
//! stream is opened to it (libp2p-stream would pick either, `p2p/stream.rs`), so its
//! steps and pushes go by request-response for the life of the pair. Once a second
//! direct connection has lasted a few seconds (an AutoNAT dial-back is closed sooner),
//! one is closed. Both sides pick the same one without a word between them, and either
//! may close it: a side with a request in flight to the peer waits (request-response may
//! have put it on either connection), and while a pair's pushes go by request-response
//! the pusher has one in flight at many ticks, so a pair left to the pusher alone could
//! stay unsettled while the pushes kept coming.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::swarm::ConnectionId;
use libp2p::PeerId;

use super::Conn;
use crate::p2p::event_loop::EventLoop;

/// How long two direct connections to one peer may both stand before one is closed.
const SETTLE: Duration = Duration::from_secs(5);

/// The connections to `peer` this side closes so that one direct connection remains.
/// When both sides dialed, the smaller id's connections stay: the larger closes every
/// one it dialed, the smaller every one the peer dialed (the same ones, so either side
/// alone settles the pair) and its own but the oldest. When only one side dialed, it
/// closes every one but the oldest. Connections younger than [`SETTLE`], relayed ones and
/// `dialbacks` count for nothing (they close on their own; a dial-back the peer made to
/// answer our AutoNAT probe is closed by it sooner than [`SETTLE`]).
fn surplus(
    local: &PeerId,
    peer: &PeerId,
    conns: &HashMap<ConnectionId, Conn>,
    dialbacks: &HashSet<(PeerId, ConnectionId)>,
    now: Instant,
) -> Vec<ConnectionId> {
    let settled: Vec<(&ConnectionId, &Conn)> = conns
        .iter()
        .filter(|(id, c)| {
            !c.relayed
                && now.saturating_duration_since(c.since) >= SETTLE
                && !dialbacks.contains(&(*peer, **id))
        })
        .collect();
    if settled.len() < 2 {
        return Vec::new();
    }
    let mut ours: Vec<(Instant, ConnectionId)> = settled
        .iter()
        .filter(|(_, c)| c.dialed.is_some())
        .map(|(id, c)| (c.since, **id))
        .collect();
    ours.sort();
    let theirs = settled
        .iter()
        .filter(|(_, c)| c.dialed.is_none())
        .map(|(id, _)| **id);
    let all_but_oldest =
        |ours: Vec<(Instant, ConnectionId)>| ours.into_iter().skip(1).map(|(_, id)| id);
    match (ours.is_empty(), ours.len() == settled.len()) {
        // Only the peer dialed: it closes.
        (true, _) => Vec::new(),
        (false, true) => all_but_oldest(ours).collect(),
        (false, false) if local > peer => ours.into_iter().map(|(_, id)| id).collect(),
        (false, false) => all_but_oldest(ours).chain(theirs).collect(),
    }
}

impl EventLoop {
    /// Closes a peer's surplus direct connections ([`surplus`]), except while a request
    /// of ours waits on that peer (request-response may have put it on either).
    pub(in crate::p2p::event_loop) fn close_duplicate_connections(&mut self, now: Instant) {
        // Every tick, and almost always nothing to do: no set of busy peers built then.
        if self.nat.conns.values().all(|c| c.len() < 2) {
            return;
        }
        let busy = self.busy_peers();
        let mut to_close = Vec::new();
        for (peer, conns) in &self.nat.conns {
            if conns.len() < 2 || busy.contains(peer) {
                continue;
            }
            let ids = surplus(&self.local, peer, conns, &self.nat.dialbacks, now);
            to_close.extend(ids.into_iter().map(|id| (*peer, id)));
        }
        for (peer, id) in to_close {
            if self.swarm.close_connection(id) {
                tracing::debug!(%peer, "a second direct connection to the peer: closed");
            }
            if let Some(c) = self.nat.conns.get_mut(&peer) {
                c.remove(&id);
            }
            self.update_direct(peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(dialed: bool, age_s: u64, now: Instant) -> Conn {
        Conn {
            relayed: false,
            dialed: dialed.then(|| "/ip4/127.0.0.1/tcp/1".parse().expect("address")),
            since: now - Duration::from_secs(age_s),
        }
    }

    fn smaller_and_larger() -> (PeerId, PeerId) {
        let (x, y) = (PeerId::random(), PeerId::random());
        (x.min(y), x.max(y))
    }

    /// Two peers, each with one connection it dialed to the other: both pick the one the
    /// larger dialed, so exactly one connection stays whichever side closes first (the
    /// other may be waiting on a request in flight).
    #[test]
    fn of_two_crossed_dials_both_sides_close_the_larger_peers() {
        let now = Instant::now() + Duration::from_secs(60);
        let (a, b) = smaller_and_larger();
        let (first, second) = (
            ConnectionId::new_unchecked(1),
            ConnectionId::new_unchecked(2),
        );
        let none = HashSet::new();
        // On `a`: `first` is the one it dialed, `second` the one `b` dialed.
        let at_a = HashMap::from([(first, conn(true, 10, now)), (second, conn(false, 10, now))]);
        assert_eq!(surplus(&a, &b, &at_a, &none, now), vec![second]);
        // On `b` the same two: `second` is its own.
        let at_b = HashMap::from([(first, conn(false, 10, now)), (second, conn(true, 10, now))]);
        assert_eq!(surplus(&b, &a, &at_b, &none, now), vec![second]);
    }

    /// The smaller peer dialed twice and the larger once: the smaller's older one stays,
    /// and the smaller alone closes the other two.
    #[test]
    fn the_smaller_peer_keeps_only_its_oldest() {
        let now = Instant::now() + Duration::from_secs(60);
        let (a, b) = smaller_and_larger();
        let ids: Vec<ConnectionId> = (1..=3).map(ConnectionId::new_unchecked).collect();
        let none = HashSet::new();
        let at_a = HashMap::from([
            (ids[0], conn(true, 30, now)),
            (ids[1], conn(true, 10, now)),
            (ids[2], conn(false, 20, now)),
        ]);
        let mut closed = surplus(&a, &b, &at_a, &none, now);
        closed.sort();
        assert_eq!(closed, vec![ids[1], ids[2]]);
        let at_b = HashMap::from([
            (ids[0], conn(false, 30, now)),
            (ids[1], conn(false, 10, now)),
            (ids[2], conn(true, 20, now)),
        ]);
        assert_eq!(surplus(&b, &a, &at_b, &none, now), vec![ids[2]]);
    }

    #[test]
    fn the_dialer_of_two_keeps_the_older() {
        let now = Instant::now() + Duration::from_secs(60);
        let (local, peer) = (PeerId::random(), PeerId::random());
        let (old, new) = (
            ConnectionId::new_unchecked(1),
            ConnectionId::new_unchecked(2),
        );
        let none = HashSet::new();
        let conns = HashMap::from([(old, conn(true, 30, now)), (new, conn(true, 10, now))]);
        assert_eq!(surplus(&local, &peer, &conns, &none, now), vec![new]);
        // The side that only listened closes nothing.
        let listened = HashMap::from([(old, conn(false, 30, now)), (new, conn(false, 10, now))]);
        assert!(surplus(&local, &peer, &listened, &none, now).is_empty());
    }

    #[test]
    fn young_relayed_and_dialback_connections_are_left_alone() {
        let now = Instant::now() + Duration::from_secs(60);
        let (local, peer) = (PeerId::random(), PeerId::random());
        let (old, young) = (
            ConnectionId::new_unchecked(1),
            ConnectionId::new_unchecked(2),
        );
        let none = HashSet::new();
        let conns = HashMap::from([(old, conn(true, 30, now)), (young, conn(true, 1, now))]);
        assert!(surplus(&local, &peer, &conns, &none, now).is_empty());
        let mut relayed = conn(true, 10, now);
        relayed.relayed = true;
        let conns = HashMap::from([(old, conn(true, 30, now)), (young, relayed)]);
        assert!(surplus(&local, &peer, &conns, &none, now).is_empty());
        let conns = HashMap::from([(old, conn(true, 30, now)), (young, conn(true, 10, now))]);
        let dialbacks = HashSet::from([(peer, young)]);
        assert!(surplus(&local, &peer, &conns, &dialbacks, now).is_empty());
    }
}
