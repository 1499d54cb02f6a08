//! The timer tick: re-dialing lost bootstrap peers, expiring the live table, re-publishing
//! heartbeats and DHT records, neighbour discovery, and the deadlines of pending operations.
//! Apart because it is all the work that happens on time rather than on an event.

use std::collections::HashMap;
use std::time::Instant;

use libp2p::{Multiaddr, PeerId};

use super::{jitter, now_ms, EventLoop, LookupOwner};
use crate::p2p::client::Reply;
use crate::p2p::{Event, P2pError};

impl EventLoop {
    pub(super) fn on_tick(&mut self, now: Instant) {
        if now >= self.next_rejoin {
            self.next_rejoin = now + jitter(self.settings.announce_interval);
            self.rejoin();
        }
        self.known.expire(now_ms());
        for (peer, model) in self.table.expire(now) {
            tracing::info!(%peer, %model, "server unheard for 3 intervals: dropped");
            self.known.forget(peer, &model, now_ms());
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
        self.nat_tick(now);
        time_out(&mut self.pending_dials, now, "dial");
        time_out(&mut self.withdrawals, now, "storing the offline record");
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
            let without_p2p = self.remember_address(peer, &addr);
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
