//! This peer's own announcement: provider records for its blocks, the signed server record,
//! the retry after a failed put, and the withdrawal on leave. Apart because it is the only
//! state the loop publishes about itself in the DHT.

use std::time::{Duration, Instant};

use libp2p::kad::{QueryId, Quorum, Record};

use super::{jitter, now_ms, Announced, EventLoop, INITIAL_BACKOFF, WITHDRAW_TIMEOUT};
use crate::p2p::client::{Announcement, Reply};
use crate::p2p::dht::{self, ServerRecord};
use crate::p2p::reachability;
use crate::p2p::P2pError;

impl EventLoop {
    pub(super) fn announce(&mut self, ann: Announcement) -> Result<(), P2pError> {
        ann.validate()?;
        if let Some(old) = self.announced.take() {
            for block in old.ann.span.start..old.ann.span.end {
                if !ann.span.contains(block) || old.ann.model != ann.model {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .stop_providing(&dht::block_key(&old.ann.model, block));
                }
            }
        }
        self.subscribe(&ann.model)?;
        if let Some(warning) = reachability::unreachable_warning(&self.announce_addrs()) {
            tracing::warn!("{warning}");
        }
        let now = Instant::now();
        self.announced = Some(Announced {
            ann,
            next_heartbeat: now,
            heartbeat_backoff: INITIAL_BACKOFF,
            next_announce: now,
            announce_backoff: INITIAL_BACKOFF,
            next_discovery: now + Duration::from_secs(1),
        });
        self.announce_dht(now);
        self.publish_heartbeat(now);
        Ok(())
    }

    /// Puts provider records for every block and the signed server record.
    pub(super) fn announce_dht(&mut self, now: Instant) {
        let Some(a) = &self.announced else { return };
        let ann = a.ann.clone();
        let kad = &mut self.swarm.behaviour_mut().kad;
        for block in ann.span.start..ann.span.end {
            if let Err(e) = kad.start_providing(dht::block_key(&ann.model, block)) {
                tracing::warn!(block, "start providing: {e}");
            }
        }
        match self.put_server_record(&ann, true) {
            Ok(id) => self.own_record_query = Some(id),
            Err(e) => tracing::warn!("server record: {e}"),
        }
        if let Some(a) = &mut self.announced {
            a.next_announce = now + jitter(self.settings.announce_interval);
        }
    }

    fn put_server_record(&mut self, ann: &Announcement, online: bool) -> Result<QueryId, P2pError> {
        let issued = now_ms();
        let ttl_ms = u64::try_from(self.settings.record_ttl.as_millis()).unwrap_or(u64::MAX);
        let record = ServerRecord {
            peer_id: self.local.to_bytes(),
            addrs: self.announce_addrs().iter().map(|a| a.to_vec()).collect(),
            model: ann.model.as_str().to_owned(),
            span_start: ann.span.start,
            span_end: ann.span.end,
            num_blocks: ann.num_blocks,
            price_per_token: ann.price_per_token,
            online,
            issued_ms: issued,
            expires_ms: issued.saturating_add(ttl_ms),
            quantization: ann.quantization.clone(),
        };
        let value = dht::sign_server_record(&self.keypair, &record)?;
        let mut rec = Record::new(dht::server_key(&self.local), value);
        rec.publisher = Some(self.local);
        rec.expires = Some(Instant::now() + self.settings.record_ttl);
        self.swarm
            .behaviour_mut()
            .kad
            .put_record(rec, Quorum::One)
            .map_err(|e| P2pError::Dht(e.to_string()))
    }

    pub(super) fn unannounce(&mut self, reply: Reply<()>) {
        let Some(a) = self.announced.take() else {
            let _ = reply.send(Ok(()));
            return;
        };
        for block in a.ann.span.start..a.ann.span.end {
            self.swarm
                .behaviour_mut()
                .kad
                .stop_providing(&dht::block_key(&a.ann.model, block));
        }
        // Last heartbeat: "leaving", so tables drop this server at once.
        if let Err(e) = self.publish(&a.ann, true) {
            tracing::debug!("leaving heartbeat: {e}");
        }
        match self.put_server_record(&a.ann, false) {
            Ok(id) => {
                self.withdrawals
                    .insert(id, (reply, Instant::now() + WITHDRAW_TIMEOUT));
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// The announcement reached no peer (e.g. no peer known yet): try again soon.
    pub(super) fn retry_announce(&mut self, why: String) {
        let now = Instant::now();
        let interval = self.settings.announce_interval;
        if let Some(a) = &mut self.announced {
            tracing::debug!(retry_in = ?a.announce_backoff, "DHT announcement failed: {why}");
            a.next_announce = now + a.announce_backoff;
            a.announce_backoff = (a.announce_backoff * 2)
                .min(interval)
                .min(Duration::from_secs(30));
        }
    }
}
