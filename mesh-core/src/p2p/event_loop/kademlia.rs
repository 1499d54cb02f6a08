//! Kademlia events: feeding the routing table from identify, validating every record and
//! provider others store with us, and routing query results to lookups and announcements.
//! Apart because it is the DHT's inbound side; [`super::lookup`] is the outbound one.

use libp2p::identify;
use libp2p::kad::{self, store::RecordStore, QueryId};

use super::{now_ms, EventLoop, INITIAL_BACKOFF};
use crate::p2p::behaviour::KAD_PROTOCOL;
use crate::p2p::dht;
use crate::p2p::reachability::{self, Scope};
use crate::p2p::P2pError;

impl EventLoop {
    pub(super) fn on_identify(&mut self, event: identify::Event) {
        let identify::Event::Received { peer_id, info, .. } = event else {
            return;
        };
        self.nat_peer_addrs(peer_id, &info.listen_addrs);
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

    pub(super) fn on_kad(&mut self, event: kad::Event) {
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
}
