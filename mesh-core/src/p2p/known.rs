//! Servers named by the DHT: the signed server records this peer's lookups verified, kept
//! until they expire so a client can route at once instead of waiting for a heartbeat of
//! every span (heartbeats come every 15 s by default).
//!
//! Only what [`super::dht::verify_server_record`] accepted goes in (the signature verifies,
//! the signer is the record's peer, the fields are in range, it has not expired), with
//! only addresses of the record's own peer. Heartbeats refine these entries (the live
//! table wins where both know a server) and retire them: a server that left or fell
//! silent ([`KnownTable::forget`]) is not brought back by a record it signed before that.

use std::collections::HashMap;

use libp2p::multiaddr::Protocol;
use libp2p::PeerId;

use super::dht::ServerRecord;
use crate::types::{ModelId, RemoteSpan};

/// Most servers kept per model (as the live table).
pub const MAX_KNOWN_PER_MODEL: usize = 4096;
/// Most servers remembered as gone.
const MAX_GONE: usize = 4096;

struct Known {
    span: RemoteSpan,
    issued_ms: u64,
    expires_ms: u64,
}

/// The servers of each model named by verified, unexpired DHT records.
#[derive(Default)]
pub struct KnownTable {
    models: HashMap<ModelId, HashMap<PeerId, Known>>,
    /// When each server was last seen to go (our clock, Unix ms).
    gone: HashMap<PeerId, u64>,
}

impl KnownTable {
    /// Takes a record that has passed [`super::dht::verify_server_record`]. An offline
    /// record removes its server; an older record than the one held is ignored.
    pub fn insert(&mut self, rec: &ServerRecord, now_ms: u64) {
        let Ok(peer) = PeerId::from_bytes(&rec.peer_id) else {
            return;
        };
        if rec.expires_ms <= now_ms || self.gone.get(&peer).is_some_and(|&t| rec.issued_ms <= t) {
            return;
        }
        let model = ModelId::new(rec.model.clone());
        let servers = self.models.entry(model).or_default();
        if servers
            .get(&peer)
            .is_some_and(|k| k.issued_ms >= rec.issued_ms)
        {
            return;
        }
        let Some(mut span) = rec.to_remote_span() else {
            // Offline: the server left cleanly.
            servers.remove(&peer);
            return;
        };
        // A record speaks for its own peer only.
        span.addrs.retain(|a| {
            a.iter()
                .all(|p| !matches!(p, Protocol::P2p(other) if other != peer))
        });
        if servers.len() >= MAX_KNOWN_PER_MODEL && !servers.contains_key(&peer) {
            return;
        }
        servers.insert(
            peer,
            Known {
                span,
                issued_ms: rec.issued_ms,
                expires_ms: rec.expires_ms,
            },
        );
    }

    /// `peer` left or fell silent: drop it, and ignore its records signed before now.
    pub fn forget(&mut self, peer: PeerId, model: &ModelId, now_ms: u64) {
        if let Some(servers) = self.models.get_mut(model) {
            servers.remove(&peer);
        }
        if self.gone.len() < MAX_GONE || self.gone.contains_key(&peer) {
            self.gone.insert(peer, now_ms);
        }
    }

    /// Drops expired records.
    pub fn expire(&mut self, now_ms: u64) {
        for servers in self.models.values_mut() {
            servers.retain(|_, k| k.expires_ms > now_ms);
        }
        self.models.retain(|_, s| !s.is_empty());
        // A record lives at most a day: older departures can no longer be contradicted.
        let day = super::dht::MAX_RECORD_LIFETIME.as_millis() as u64;
        self.gone.retain(|_, t| t.saturating_add(day) > now_ms);
    }

    /// The unexpired servers of `model`, ordered by span then peer id.
    pub fn servers(&self, model: &ModelId, now_ms: u64) -> Vec<RemoteSpan> {
        let mut out: Vec<RemoteSpan> = self
            .models
            .get(model)
            .map(|s| {
                s.values()
                    .filter(|k| k.expires_ms > now_ms)
                    .map(|k| k.span.clone())
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by_key(|a| (a.span, a.peer_id));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::identity::Keypair;
    use libp2p::Multiaddr;

    const NOW: u64 = 1_700_000_000_000;

    fn record(peer: PeerId, issued: u64, online: bool) -> ServerRecord {
        let own: Multiaddr = format!("/ip4/127.0.0.1/tcp/4001/p2p/{peer}")
            .parse()
            .unwrap();
        let other = Keypair::generate_ed25519().public().to_peer_id();
        let foreign: Multiaddr = format!("/ip4/127.0.0.2/tcp/4001/p2p/{other}")
            .parse()
            .unwrap();
        ServerRecord {
            peer_id: peer.to_bytes(),
            addrs: vec![own.to_vec(), foreign.to_vec()],
            model: "m".into(),
            span_start: 0,
            span_end: 4,
            num_blocks: 8,
            price_per_token: 7,
            online,
            issued_ms: issued,
            expires_ms: issued + 60_000,
            quantization: String::new(),
        }
    }

    #[test]
    fn keeps_own_addresses_until_expiry() {
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        let mut t = KnownTable::default();
        t.insert(&record(peer, NOW, true), NOW);
        let m = ModelId::new("m");
        let found = t.servers(&m, NOW + 1);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].addrs.len(), 1, "another peer's address is dropped");
        assert_eq!(found[0].price_per_token, 7);
        assert!(t.servers(&m, NOW + 60_000).is_empty(), "expired");
        t.expire(NOW + 60_000);
        assert!(t.models.is_empty());
    }

    #[test]
    fn offline_or_gone_servers_are_not_routed_to() {
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        let m = ModelId::new("m");
        let mut t = KnownTable::default();
        t.insert(&record(peer, NOW, true), NOW);
        t.insert(&record(peer, NOW - 1, false), NOW);
        assert_eq!(
            t.servers(&m, NOW).len(),
            1,
            "an older offline record is ignored"
        );
        t.insert(&record(peer, NOW + 1, false), NOW);
        assert!(
            t.servers(&m, NOW).is_empty(),
            "a newer offline record removes"
        );

        t.insert(&record(peer, NOW + 2, true), NOW);
        t.forget(peer, &m, NOW + 10);
        t.insert(&record(peer, NOW + 5, true), NOW + 10);
        assert!(t.servers(&m, NOW + 10).is_empty(), "signed before it went");
        t.insert(&record(peer, NOW + 20, true), NOW + 20);
        assert_eq!(t.servers(&m, NOW + 20).len(), 1, "announced again");
    }
}
