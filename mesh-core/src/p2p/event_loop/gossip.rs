//! Heartbeats over gossipsub: subscribing to a model's topic, publishing ours with backoff,
//! relaying topics on a bootstrap, and validating others' into the live table. Apart because
//! gossip is the liveness path, separate from the DHT's slower, signed records.

use std::time::Instant;

use libp2p::gossipsub::{self, MessageAcceptance};
use libp2p::PeerId;

use super::{jitter, now_ms, EventLoop, INITIAL_BACKOFF, MAX_RELAY_TOPICS, MAX_SUBSCRIPTIONS};
use crate::p2p::client::Announcement;
use crate::p2p::heartbeat::{self, Change, Heartbeat};
use crate::p2p::{Event, P2pError, Role};
use crate::types::{ModelId, ServerLoad};
use crate::wire;

impl EventLoop {
    pub(super) fn subscribe(&mut self, model: &ModelId) -> Result<(), P2pError> {
        if !model.is_valid() {
            return Err(P2pError::Invalid("model name"));
        }
        if self.subscribed.contains(model) {
            return Ok(());
        }
        if self.subscribed.len() >= MAX_SUBSCRIPTIONS {
            return Err(P2pError::Invalid("too many subscribed models"));
        }
        self.swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&heartbeat::topic(model))
            .map_err(|e| P2pError::Dht(format!("subscribe: {e}")))?;
        self.subscribed.insert(model.clone());
        Ok(())
    }

    pub(super) fn publish(&mut self, ann: &Announcement, leaving: bool) -> Result<(), P2pError> {
        let ServerLoad {
            free_memory_bytes,
            throughput_tps,
            active_sessions,
            load,
        } = ann.load;
        let hb = Heartbeat {
            peer_id: self.local.to_bytes(),
            addrs: self.announce_addrs().iter().map(|a| a.to_vec()).collect(),
            model: ann.model.as_str().to_owned(),
            span_start: ann.span.start,
            span_end: ann.span.end,
            num_blocks: ann.num_blocks,
            free_memory_bytes,
            throughput_tps,
            active_sessions,
            load,
            price_per_token: ann.price_per_token,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            interval_ms: u32::try_from(self.settings.heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX),
            timestamp_ms: now_ms(),
            leaving,
            capability: ann.capability.clone(),
            gpu_live: self.gpu_live.clone(),
            quantization: ann.quantization.clone(),
        };
        let bytes = wire::encode(&hb)?;
        self.swarm
            .behaviour_mut()
            .gossipsub
            .publish(heartbeat::topic(&ann.model), bytes)
            .map(|_| ())
            .map_err(|e| P2pError::Dht(format!("publish: {e}")))
    }

    pub(super) fn publish_heartbeat(&mut self, now: Instant) {
        let Some(a) = &self.announced else { return };
        let ann = a.ann.clone();
        let result = self.publish(&ann, false);
        let interval = self.settings.heartbeat_interval;
        let Some(a) = &mut self.announced else { return };
        match result {
            Ok(()) => {
                self.stats.heartbeats_published += 1;
                a.heartbeat_backoff = INITIAL_BACKOFF;
                a.next_heartbeat = now + jitter(interval);
            }
            Err(e) => {
                // Typically no subscribed peer yet: retry sooner, backing off up to the interval.
                self.stats.heartbeat_publish_failures += 1;
                tracing::debug!(retry_in = ?a.heartbeat_backoff, "heartbeat not published: {e}");
                a.next_heartbeat = now + a.heartbeat_backoff;
                a.heartbeat_backoff = (a.heartbeat_backoff * 2).min(interval);
            }
        }
    }

    pub(super) fn on_gossipsub(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => self.on_gossip(propagation_source, message_id, message),
            gossipsub::Event::Subscribed { topic, .. } if self.settings.role == Role::Bootstrap => {
                // Bootstraps relay every model's heartbeats so new peers hear them at once.
                let Some(model) = heartbeat::model_of_topic(&topic) else {
                    return;
                };
                if self.relayed.len() < MAX_RELAY_TOPICS && self.relayed.insert(model.clone()) {
                    if let Err(e) = self
                        .swarm
                        .behaviour_mut()
                        .gossipsub
                        .subscribe(&heartbeat::topic(&model))
                    {
                        tracing::debug!(%model, "relay subscribe: {e}");
                    }
                }
            }
            _ => {}
        }
    }

    fn on_gossip(&mut self, source: PeerId, id: gossipsub::MessageId, msg: gossipsub::Message) {
        let result = heartbeat::validate(
            &msg.data,
            &msg.topic,
            msg.source,
            now_ms(),
            self.settings.max_clock_skew,
        );
        self.stats
            .gossip
            .record(result.as_ref().map(|_| ()).map_err(|r| *r));
        let acceptance = match &result {
            Ok(_) => MessageAcceptance::Accept,
            Err(reason) => {
                tracing::debug!(%source, ?reason, topic = %msg.topic, "heartbeat rejected");
                MessageAcceptance::Reject
            }
        };
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&id, &source, acceptance);
        let Ok(valid) = result else { return };
        if valid.info.peer_id == self.local {
            return;
        }
        match self.table.apply(valid, Instant::now()) {
            Change::Up(info) => {
                tracing::info!(peer = %info.peer_id, model = %info.model, span = %info.span, "server up");
                // A heartbeat is signed by its sender, so these addresses are the server's
                // own word; keeping them makes a server heard of only by gossip (one that
                // joined after our last DHT lookup) dialable at once.
                for addr in &info.addrs {
                    self.remember_address(info.peer_id, addr);
                }
                self.emit(Event::ServerUp(*info));
            }
            Change::Down(peer, model) => {
                tracing::info!(%peer, %model, "server left");
                self.known.forget(peer, &model, now_ms());
                self.emit(Event::ServerDown { peer, model });
            }
            Change::Refreshed | Change::None => {}
        }
    }
}
