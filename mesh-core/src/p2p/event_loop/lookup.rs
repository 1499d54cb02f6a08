//! DHT lookups: providers of a block, then each provider's signed server record.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use libp2p::kad::{QueryId, Record};
use libp2p::PeerId;

use super::{now_ms, EventLoop, Lookup, LookupOwner, MAX_DISCOVERY_DIALS};
use crate::p2p::dht::{self, ServerRecord};
use crate::p2p::P2pError;
use crate::types::{ModelId, RemoteSpan};

impl EventLoop {
    pub(super) fn start_lookup(&mut self, model: ModelId, block: u32, owner: LookupOwner) {
        if !model.is_valid() || block >= dht::MAX_BLOCKS {
            if let LookupOwner::Client(reply) = owner {
                let _ = reply.send(Err(P2pError::Invalid("model or block")));
            }
            return;
        }
        let id = self.next_lookup;
        self.next_lookup += 1;
        let qid = self
            .swarm
            .behaviour_mut()
            .kad
            .get_providers(dht::block_key(&model, block));
        self.provider_queries.insert(qid, id);
        let mut lookup = Lookup {
            model,
            block,
            owner,
            deadline: Instant::now() + self.settings.lookup_timeout,
            providers_done: false,
            asked: HashSet::new(),
            pending_records: 0,
            found: HashMap::new(),
        };
        // Our own announcement answers for us.
        if let Some(a) = &self.announced {
            if a.ann.model == lookup.model && a.ann.span.contains(block) {
                lookup.asked.insert(self.local);
                lookup.found.insert(
                    self.local,
                    ServerRecord {
                        peer_id: self.local.to_bytes(),
                        addrs: self.announce_addrs().iter().map(|a| a.to_vec()).collect(),
                        model: a.ann.model.as_str().to_owned(),
                        span_start: a.ann.span.start,
                        span_end: a.ann.span.end,
                        num_blocks: a.ann.num_blocks,
                        price_per_token: a.ann.price_per_token,
                        online: true,
                        issued_ms: now_ms(),
                        expires_ms: u64::MAX,
                        quantization: a.ann.quantization.clone(),
                    },
                );
            }
        }
        self.lookups.insert(id, lookup);
    }

    pub(super) fn on_providers(
        &mut self,
        lookup_id: u64,
        providers: impl IntoIterator<Item = PeerId>,
    ) {
        let Some(lookup) = self.lookups.get_mut(&lookup_id) else {
            return;
        };
        let new: Vec<PeerId> = providers
            .into_iter()
            .filter(|p| lookup.asked.insert(*p))
            .collect();
        for peer in new {
            let qid = self
                .swarm
                .behaviour_mut()
                .kad
                .get_record(dht::server_key(&peer));
            self.record_queries.insert(qid, (lookup_id, peer));
            if let Some(lookup) = self.lookups.get_mut(&lookup_id) {
                lookup.pending_records += 1;
            }
        }
    }

    pub(super) fn on_server_record(&mut self, qid: QueryId, record: &Record) {
        let Some(&(lookup_id, peer)) = self.record_queries.get(&qid) else {
            return;
        };
        match dht::verify_server_record(&record.key, &record.value, now_ms()) {
            Ok(rec) => {
                if let Some(lookup) = self.lookups.get_mut(&lookup_id) {
                    let newer = lookup
                        .found
                        .get(&peer)
                        .is_none_or(|old| rec.issued_ms > old.issued_ms);
                    if newer {
                        lookup.found.insert(peer, rec);
                    }
                }
                // One valid record is enough: end the query early.
                if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&qid) {
                    q.finish();
                }
            }
            Err(e) => {
                self.stats.dht_records_rejected += 1;
                tracing::debug!(%peer, "invalid server record in lookup: {e}");
            }
        }
    }

    pub(super) fn record_query_done(&mut self, qid: QueryId) {
        if let Some((lookup_id, _)) = self.record_queries.remove(&qid) {
            if let Some(lookup) = self.lookups.get_mut(&lookup_id) {
                lookup.pending_records = lookup.pending_records.saturating_sub(1);
            }
            self.try_finish_lookup(lookup_id, false);
        }
    }

    pub(super) fn try_finish_lookup(&mut self, id: u64, timed_out: bool) {
        let ready = self
            .lookups
            .get(&id)
            .is_some_and(|l| timed_out || (l.providers_done && l.pending_records == 0));
        if !ready {
            return;
        }
        let Some(lookup) = self.lookups.remove(&id) else {
            return;
        };
        // Abandon this lookup's remaining queries.
        let stale: Vec<QueryId> = self
            .provider_queries
            .iter()
            .filter(|(_, l)| **l == id)
            .map(|(q, _)| *q)
            .chain(
                self.record_queries
                    .iter()
                    .filter(|(_, (l, _))| *l == id)
                    .map(|(q, _)| *q),
            )
            .collect();
        for q in stale {
            self.provider_queries.remove(&q);
            self.record_queries.remove(&q);
            if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&q) {
                query.finish();
            }
        }
        // Verified records name servers a client can route to before their first
        // heartbeat; their addresses are their signer's own word, as a heartbeat's.
        let now = now_ms();
        for (peer, rec) in &lookup.found {
            if *peer == self.local {
                continue;
            }
            self.known.insert(rec, now);
        }
        let mut spans: Vec<RemoteSpan> = lookup
            .found
            .values()
            .filter(|r| r.model == lookup.model.as_str())
            .filter_map(ServerRecord::to_remote_span)
            .filter(|s| s.span.contains(lookup.block))
            .collect();
        spans.sort_by_key(|a| (a.span, a.peer_id));
        for s in &spans {
            if s.peer_id != self.local {
                for addr in &s.addrs {
                    self.remember_address(s.peer_id, addr);
                }
            }
        }
        match lookup.owner {
            LookupOwner::Client(reply) => {
                let _ = reply.send(Ok(spans));
            }
            LookupOwner::Discovery => {
                for s in spans.into_iter().take(MAX_DISCOVERY_DIALS) {
                    self.dial_peer(s.peer_id, s.addrs);
                }
            }
        }
    }
}
