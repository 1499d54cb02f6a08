//! The dial-back check: asking a peer to connect to our public address, and doing it for others.

use libp2p::request_response;
use libp2p::Multiaddr;

use super::{EventLoop, MAX_DIALBACKS_IN_FLIGHT};
use crate::p2p::client::Reply;
use crate::p2p::reachability::{
    self, DialBackRequest, DialBackResponse, Reachability, MAX_DIALBACK_ADDRS, MAX_DIALBACK_BYTES,
};
use crate::p2p::{nat, P2pError};
use crate::wire;

impl EventLoop {
    pub(super) fn check_reachability(&mut self, reply: Reply<Vec<Reachability>>) {
        let addrs: Vec<Vec<u8>> = self
            .swarm
            .external_addresses()
            .filter(|a| reachability::tcp_target(a).is_some() && !nat::is_relayed(a))
            .take(MAX_DIALBACK_ADDRS)
            .map(|a| a.to_vec())
            .collect();
        if addrs.is_empty() {
            let _ = reply.send(Ok(Vec::new()));
            return;
        }
        // Prefer a configured bootstrap peer: it is the most likely to be outside our network.
        let peer = self
            .bootstrap
            .iter()
            .map(|(p, _)| *p)
            .find(|p| self.swarm.is_connected(p))
            .or_else(|| self.swarm.connected_peers().next().copied());
        let Some(peer) = peer else {
            let _ = reply.send(Err(P2pError::NoPeers));
            return;
        };
        match wire::encode(&DialBackRequest { addrs }) {
            Ok(bytes) => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .dialback
                    .send_request(&peer, bytes);
                self.pending_checks.insert(id, (reply, peer));
            }
            Err(e) => {
                let _ = reply.send(Err(e.into()));
            }
        }
    }

    pub(super) fn on_dialback(&mut self, event: request_response::Event<Vec<u8>, Vec<u8>>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    let Ok(req) = wire::decode::<DialBackRequest>(&request, MAX_DIALBACK_BYTES)
                    else {
                        tracing::debug!(%peer, "undecodable dial-back request dropped");
                        return;
                    };
                    if req.addrs.len() > MAX_DIALBACK_ADDRS
                        || self.dialbacks_in_flight >= MAX_DIALBACKS_IN_FLIGHT
                    {
                        tracing::debug!(%peer, "dial-back request refused (too many)");
                        return;
                    }
                    self.dialbacks_in_flight += 1;
                    let ip = self.remote_ips.get(&peer).copied();
                    let done = self.dialback_done_tx.clone();
                    tokio::spawn(async move {
                        let mut results = Vec::with_capacity(req.addrs.len());
                        for addr in &req.addrs {
                            results.push(reachability::dial_back(addr, ip).await);
                        }
                        let bytes = wire::encode(&DialBackResponse { results }).unwrap_or_default();
                        let _ = done.send((channel, bytes)).await;
                    });
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    let Some((reply, by)) = self.pending_checks.remove(&request_id) else {
                        return;
                    };
                    let result = wire::decode::<DialBackResponse>(&response, MAX_DIALBACK_BYTES)
                        .map_err(P2pError::from)
                        .map(|r| {
                            r.results
                                .into_iter()
                                .take(MAX_DIALBACK_ADDRS)
                                .filter_map(|r| {
                                    Some(Reachability {
                                        addr: Multiaddr::try_from(r.addr).ok()?,
                                        checked_by: by,
                                        reachable: r.reachable,
                                        detail: r.detail.chars().take(200).collect(),
                                    })
                                })
                                .collect()
                        });
                    let _ = reply.send(result);
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some((reply, _)) = self.pending_checks.remove(&request_id) {
                    let _ = reply.send(Err(P2pError::Request {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            _ => {}
        }
    }
}
