//! Which servers a route can use, and waiting, before any session opens, until they cover
//! every block.
//!
//! A client routes as soon as the DHT names a server of every span: the server records
//! are signed by their servers and carry addresses, span and price, so nothing is gained
//! by waiting up to a heartbeat interval (15 s by default) to hear each server first.
//! Heartbeats then refine what the records say (load, throughput, a changed price) and
//! retire servers that left or fell silent; a named server that does not answer is
//! routed around like any failed one.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use libp2p::PeerId;

use crate::p2p;
use crate::pipeline::route::{plan, uncovered, Candidate, RoutePolicy};
use crate::pipeline::PipelineError;
use crate::types::{BlockRange, ModelId};

/// The servers of `model` (with `num_blocks` blocks) a route can use now: each server
/// heard in a heartbeat, with its load and price as heard, and each server named only by
/// a verified DHT record, with the conservative figures of [`Candidate::from_dht`].
pub(crate) async fn known_candidates(
    p2p: &p2p::Client,
    model: &ModelId,
    num_blocks: u32,
) -> Result<Vec<Candidate>, PipelineError> {
    let mut by_peer: HashMap<PeerId, Candidate> = HashMap::new();
    for span in p2p.known_servers(model).await? {
        if span.num_blocks == num_blocks && span.model == *model {
            by_peer.insert(span.peer_id, Candidate::from_dht(&span));
        }
    }
    // A heartbeat is newer than the record and measured: it replaces it.
    for info in p2p.live_servers(model).await? {
        if info.num_blocks == num_blocks {
            by_peer.insert(info.peer_id, Candidate::from_heartbeat(&info));
        }
    }
    let mut out: Vec<Candidate> = by_peer.into_values().collect();
    out.sort_by_key(|c| (c.span, c.peer));
    Ok(out)
}

/// Find `model`'s servers through the DHT, connect to them, and wait until the servers
/// known (by their signed DHT records or their heartbeats) cover every block, or `timeout`
/// passes. Returns the servers heard in heartbeats so far (possibly none yet).
pub async fn wait_for_coverage(
    p2p: &p2p::Client,
    model: &ModelId,
    num_blocks: u32,
    timeout: Duration,
) -> Result<Vec<crate::types::ServerInfo>, PipelineError> {
    wait_until_covered(p2p, model, num_blocks, timeout, false).await
}

/// [`wait_for_coverage`] counting only servers heard in heartbeats: what a list of live
/// servers (`mesh-client nodes`) waits for, since a DHT record says a server was there,
/// not that it is.
pub async fn wait_for_heard_coverage(
    p2p: &p2p::Client,
    model: &ModelId,
    num_blocks: u32,
    timeout: Duration,
) -> Result<Vec<crate::types::ServerInfo>, PipelineError> {
    wait_until_covered(p2p, model, num_blocks, timeout, true).await
}

async fn wait_until_covered(
    p2p: &p2p::Client,
    model: &ModelId,
    num_blocks: u32,
    timeout: Duration,
    heard_only: bool,
) -> Result<Vec<crate::types::ServerInfo>, PipelineError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let full = BlockRange::new(0, num_blocks);
    loop {
        // Lookups also dial the servers found, so their heartbeats reach us directly.
        if let Err(e) = p2p.discover(model, num_blocks).await {
            tracing::debug!("discovery: {e}");
        }
        let candidates = if heard_only {
            (p2p.live_servers(model).await?)
                .iter()
                .filter(|s| s.num_blocks == num_blocks)
                .map(Candidate::from_heartbeat)
                .collect()
        } else {
            known_candidates(p2p, model, num_blocks).await?
        };
        // Coverage is about blocks; prices are judged when a session opens.
        let policy = RoutePolicy {
            max_price_ratio: None,
            ..RoutePolicy::default()
        };
        if plan(&candidates, full, &HashSet::new(), &policy, 0).is_some() {
            return Ok(p2p.live_servers(model).await?);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(PipelineError::NoRoute {
                model: model.clone(),
                range: full,
                excluded: 0,
                missing: uncovered(&candidates, full, &HashSet::new()),
                seen: candidates.iter().map(|c| (c.peer, c.span)).collect(),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
