//! Waiting, before any session opens, until the servers heard of cover every block.

use std::collections::HashSet;
use std::time::Duration;

use crate::p2p;
use crate::pipeline::route::{plan, Candidate, RoutePolicy};
use crate::pipeline::PipelineError;
use crate::types::{BlockRange, ModelId};

/// Find `model`'s servers through the DHT, connect to them, and wait until their
/// heartbeats cover every block (or `timeout` passes). Returns the live servers.
pub async fn wait_for_coverage(
    p2p: &p2p::Client,
    model: &ModelId,
    num_blocks: u32,
    timeout: Duration,
) -> Result<Vec<crate::types::ServerInfo>, PipelineError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let full = BlockRange::new(0, num_blocks);
    loop {
        // Lookups also dial the servers found, so their heartbeats reach us directly.
        if let Err(e) = p2p.discover(model, num_blocks).await {
            tracing::debug!("discovery: {e}");
        }
        let live = p2p.live_servers(model).await?;
        let candidates: Vec<Candidate> = live
            .iter()
            .filter(|s| s.num_blocks == num_blocks)
            .map(Candidate::from_heartbeat)
            .collect();
        // Coverage is about blocks; prices are judged when a session opens.
        let policy = RoutePolicy {
            max_price_ratio: None,
            ..RoutePolicy::default()
        };
        if plan(&candidates, full, &HashSet::new(), &policy, 0).is_some() {
            return Ok(live);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(PipelineError::NoRoute {
                model: model.clone(),
                range: full,
                excluded: 0,
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
