//! Answering [`Command`]s from [`crate::p2p::Client`]s: the dispatch itself, plus the small
//! commands that need nothing but the swarm (addresses, dials). Kept apart so the loop's
//! public surface reads as one table; the bigger commands live with their own idea.

use std::time::Instant;

use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId};

use super::{now_ms, EventLoop, LookupOwner, DIAL_TIMEOUT};
use crate::p2p::client::{Command, Reply};
use crate::p2p::reachability::{self, Scope};
use crate::p2p::P2pError;
use crate::p2p::{dht, nat};

impl EventLoop {
    pub(super) fn on_command(&mut self, command: Command) {
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
            Command::SetGpuLive(gpus) => self.gpu_live = gpus,
            Command::Subscribe(model, reply) => {
                let _ = reply.send(self.subscribe(&model));
            }
            Command::Lookup(model, block, reply) => {
                self.start_lookup(model, block, LookupOwner::Client(reply))
            }
            Command::LiveServers(model, reply) => {
                let _ = reply.send(self.table.servers(&model));
            }
            Command::KnownServers(model, reply) => {
                let _ = reply.send(self.known.servers(&model, now_ms()));
            }
            Command::Request(peer, data, reply) => {
                let len = data.len() as u64;
                let id = self.swarm.behaviour_mut().session.send_request(&peer, data);
                self.pending_requests.insert(id, (peer, len, reply));
            }
            Command::Respond {
                channel,
                relayed,
                response,
                reply,
            } => {
                if relayed {
                    self.stats.relay.relayed_bytes_sent += response.len() as u64;
                }
                let result = self
                    .swarm
                    .behaviour_mut()
                    .session
                    .send_response(channel, response)
                    .map_err(|_| P2pError::Respond);
                let _ = reply.send(result);
            }
            Command::Stats(reply) => {
                let mut stats = self.stats;
                stats.connected_peers = self.swarm.connected_peers().count();
                stats.connections = self
                    .swarm
                    .network_info()
                    .connection_counters()
                    .num_established() as usize;
                let _ = reply.send(stats);
            }
            Command::CheckReachability(reply) => self.check_reachability(reply),
            Command::NatReport(reply) => {
                let _ = reply.send(self.nat_report());
            }
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

    /// Public addresses if any were configured or confirmed, else concrete listen
    /// addresses. A peer reachable only through relays announces its `/p2p-circuit`
    /// addresses first, then its direct ones (for peers on its LAN, and for a direct dial
    /// once its router lets connections in).
    pub(super) fn announce_addrs(&self) -> Vec<Multiaddr> {
        let external: Vec<Multiaddr> = self.swarm.external_addresses().cloned().collect();
        let direct = || {
            self.swarm
                .listeners()
                .filter(|a| reachability::scope(a) != Scope::Unspecified && !nat::is_relayed(a))
                .cloned()
        };
        let addrs: Vec<Multiaddr> = if external.is_empty() {
            direct().collect()
        } else if external.iter().all(nat::is_relayed) {
            external.into_iter().chain(direct()).collect()
        } else {
            external
        };
        addrs.into_iter().take(dht::MAX_ADDRS).collect()
    }

    /// Put `peer`'s address (without its trailing `/p2p/` part; a relay's stays) in the
    /// routing table; returns it.
    pub(super) fn remember_address(&mut self, peer: PeerId, addr: &Multiaddr) -> Multiaddr {
        let without_p2p = nat::without_target(addr);
        self.swarm
            .behaviour_mut()
            .kad
            .add_address(&peer, without_p2p.clone());
        without_p2p
    }

    fn dial(&mut self, addr: Multiaddr, reply: Reply<()>) {
        // The peer behind a relay, not the relay, for a `/p2p-circuit` address.
        let peer = nat::target_peer(&addr);
        if let Some(peer) = peer {
            if peer == self.local {
                let _ = reply.send(Err(P2pError::Dial("cannot dial self".into())));
                return;
            }
            self.remember_address(peer, &addr);
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

    pub(super) fn dial_peer(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
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
}
