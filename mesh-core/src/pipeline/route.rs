//! Choosing a chain of servers that covers blocks `[a, b)`: a shortest path over block
//! boundaries, where a hop costs its round trip, its compute, a fixed penalty (fewer hops
//! win), and its current load (equivalent servers share the work).

use std::collections::{BinaryHeap, HashSet};
use std::time::Duration;

use libp2p::PeerId;

use crate::types::{BlockRange, RemoteSpan, ServerInfo};

/// A server the client could route through, with what it knows of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub peer: PeerId,
    pub span: BlockRange,
    /// Measured round trip to this server, if any request has completed yet.
    pub rtt: Option<Duration>,
    /// Announced decode throughput, tokens/s per block (0 = unknown).
    pub throughput_tps: f32,
    pub active_sessions: u32,
    pub price_per_token: u64,
    /// Extra cost from this client's memory of the server's failures, in ms
    /// ([`crate::ledger::Reputation`]).
    pub penalty_ms: f64,
}

impl Candidate {
    pub fn from_heartbeat(info: &ServerInfo) -> Self {
        Self {
            peer: info.peer_id,
            span: info.span,
            rtt: None,
            throughput_tps: info.load.throughput_tps,
            active_sessions: info.load.active_sessions,
            price_per_token: info.price_per_token,
            penalty_ms: 0.0,
        }
    }

    pub fn from_dht(span: &RemoteSpan) -> Self {
        Self {
            peer: span.peer_id,
            span: span.span,
            rtt: None,
            throughput_tps: 0.0,
            active_sessions: 0,
            price_per_token: span.price_per_token,
            penalty_ms: 0.0,
        }
    }
}

/// One hop of a route: run blocks `span` on `peer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hop {
    pub peer: PeerId,
    pub span: BlockRange,
}

/// How routes are weighed.
#[derive(Clone, Debug)]
pub struct RoutePolicy {
    /// Servers above this price (micro-units per token) are never used.
    pub max_price: Option<u64>,
    /// Cost of one extra hop beyond its round trip, in ms.
    pub hop_penalty_ms: f64,
    /// Round trip assumed for a server not measured yet, in ms.
    pub default_rtt_ms: f64,
    /// Compute time per block assumed when a server announces no throughput, in ms.
    pub default_block_ms: f64,
    /// Cost of each session a server already has open, in ms.
    pub per_session_ms: f64,
}

impl Default for RoutePolicy {
    fn default() -> Self {
        Self {
            max_price: None,
            hop_penalty_ms: 20.0,
            default_rtt_ms: 20.0,
            default_block_ms: 5.0,
            per_session_ms: 2.0,
        }
    }
}

impl RoutePolicy {
    fn hop_cost(&self, c: &Candidate, blocks: u32) -> f64 {
        let rtt = c.rtt.map_or(self.default_rtt_ms, |d| d.as_secs_f64() * 1e3);
        let per_block = if c.throughput_tps > 0.0 {
            1e3 / f64::from(c.throughput_tps)
        } else {
            self.default_block_ms
        };
        rtt + per_block * f64::from(blocks)
            + self.hop_penalty_ms
            + self.per_session_ms * f64::from(c.active_sessions)
            + c.penalty_ms
    }
}

#[derive(PartialEq)]
struct Frontier {
    cost: f64,
    block: u32,
}

impl Eq for Frontier {}

impl Ord for Frontier {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Min-heap on cost.
        other
            .cost
            .total_cmp(&self.cost)
            .then(other.block.cmp(&self.block))
    }
}

impl PartialOrd for Frontier {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The cheapest chain of hops covering `range` exactly, avoiding `exclude`; `None` when
/// the candidates leave a gap. `tie_break` (e.g. the session id) spreads sessions over
/// servers of equal cost.
pub fn plan(
    candidates: &[Candidate],
    range: BlockRange,
    exclude: &HashSet<PeerId>,
    policy: &RoutePolicy,
    tie_break: u64,
) -> Option<Vec<Hop>> {
    if range.is_empty() {
        return None;
    }
    let usable: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| !exclude.contains(&c.peer))
        .filter(|c| policy.max_price.is_none_or(|max| c.price_per_token <= max))
        .filter(|c| !c.span.is_empty())
        .collect();
    let n = (range.end - range.start) as usize;
    let mut best = vec![f64::INFINITY; n + 1];
    let mut via: Vec<Option<(usize, Hop)>> = vec![None; n + 1];
    best[0] = 0.0;
    let mut heap = BinaryHeap::new();
    heap.push(Frontier {
        cost: 0.0,
        block: range.start,
    });
    while let Some(Frontier { cost, block }) = heap.pop() {
        let at = (block - range.start) as usize;
        if cost > best[at] || block == range.end {
            continue;
        }
        for c in &usable {
            if !c.span.contains(block) {
                continue;
            }
            let last = c.span.end.min(range.end);
            for end in block + 1..=last {
                let jitter = tie_jitter(&c.peer, tie_break);
                let next = cost + policy.hop_cost(c, end - block) + jitter;
                let to = (end - range.start) as usize;
                if next < best[to] {
                    best[to] = next;
                    via[to] = Some((
                        at,
                        Hop {
                            peer: c.peer,
                            span: BlockRange::new(block, end),
                        },
                    ));
                    heap.push(Frontier {
                        cost: next,
                        block: end,
                    });
                }
            }
        }
    }
    let mut hops = Vec::new();
    let mut at = n;
    while at > 0 {
        let (prev, hop) = via[at]?;
        hops.push(hop);
        at = prev;
    }
    hops.reverse();
    Some(hops)
}

/// A sub-millisecond, deterministic per-(peer, session) offset that breaks cost ties.
fn tie_jitter(peer: &PeerId, tie_break: u64) -> f64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    peer.hash(&mut h);
    tie_break.hash(&mut h);
    (h.finish() % 1000) as f64 / 1e4
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(span: (u32, u32)) -> Candidate {
        Candidate {
            peer: PeerId::random(),
            span: BlockRange::new(span.0, span.1),
            rtt: None,
            throughput_tps: 0.0,
            active_sessions: 0,
            price_per_token: 0,
            penalty_ms: 0.0,
        }
    }

    /// `plan` with no exclusions and the default policy.
    fn plan_default(cs: &[Candidate], range: BlockRange, tie_break: u64) -> Option<Vec<Hop>> {
        plan(
            cs,
            range,
            &HashSet::new(),
            &RoutePolicy::default(),
            tie_break,
        )
    }

    fn spans(route: &[Hop]) -> Vec<(u32, u32)> {
        route.iter().map(|h| (h.span.start, h.span.end)).collect()
    }

    #[test]
    fn covers_the_range_with_the_fewest_hops() {
        let cs = vec![cand((0, 3)), cand((3, 6)), cand((6, 8)), cand((0, 8))];
        let route = plan_default(&cs, BlockRange::new(0, 8), 0).unwrap();
        assert_eq!(spans(&route), vec![(0, 8)]);
        let exclude = HashSet::from([cs[3].peer]);
        let route = plan(
            &cs,
            BlockRange::new(0, 8),
            &exclude,
            &RoutePolicy::default(),
            0,
        )
        .unwrap();
        assert_eq!(spans(&route), vec![(0, 3), (3, 6), (6, 8)]);
    }

    #[test]
    fn overlapping_spans_are_cut_to_fit() {
        let cs = vec![cand((0, 5)), cand((3, 8))];
        let route = plan_default(&cs, BlockRange::new(0, 8), 0).unwrap();
        assert_eq!(route.len(), 2);
        assert_eq!(route[0].span.start, 0);
        assert_eq!(route[1].span.end, 8);
        assert_eq!(route[0].span.end, route[1].span.start);
        // A sub-range, as used when replacing one failed hop.
        let route = plan_default(&cs, BlockRange::new(4, 6), 0).unwrap();
        assert_eq!(route.len(), 1);
    }

    #[test]
    fn gaps_and_prices_leave_no_route() {
        let cs = vec![cand((0, 3)), cand((4, 8))];
        assert!(plan_default(&cs, BlockRange::new(0, 8), 0).is_none());
        let mut pricey = cand((0, 8));
        pricey.price_per_token = 50;
        let policy = RoutePolicy {
            max_price: Some(10),
            ..RoutePolicy::default()
        };
        assert!(plan(
            &[pricey],
            BlockRange::new(0, 8),
            &HashSet::new(),
            &policy,
            0
        )
        .is_none());
    }

    #[test]
    fn a_server_with_a_bad_record_is_used_only_as_a_last_resort() {
        let flaky = Candidate {
            penalty_ms: 600.0,
            ..cand((0, 8))
        };
        let steady = cand((0, 8));
        let route = plan_default(&[flaky.clone(), steady.clone()], BlockRange::new(0, 8), 1);
        assert_eq!(route.unwrap()[0].peer, steady.peer);
        let alone = plan_default(std::slice::from_ref(&flaky), BlockRange::new(0, 8), 1);
        assert_eq!(alone.unwrap()[0].peer, flaky.peer);
    }

    #[test]
    fn faster_and_idler_servers_win_and_ties_spread() {
        let mut slow = cand((0, 8));
        slow.throughput_tps = 10.0;
        let mut fast = cand((0, 8));
        fast.throughput_tps = 1000.0;
        let route = plan(
            &[slow.clone(), fast.clone()],
            BlockRange::new(0, 8),
            &HashSet::new(),
            &RoutePolicy::default(),
            0,
        )
        .unwrap();
        assert_eq!(route[0].peer, fast.peer);

        let (a, b) = (cand((0, 8)), cand((0, 8)));
        let picks: HashSet<PeerId> = (0..64)
            .map(|s| {
                plan(
                    &[a.clone(), b.clone()],
                    BlockRange::new(0, 8),
                    &HashSet::new(),
                    &RoutePolicy::default(),
                    s,
                )
                .unwrap()[0]
                    .peer
            })
            .collect();
        assert_eq!(picks.len(), 2, "equal servers share sessions");
        let mut busy = a.clone();
        busy.active_sessions = 50;
        let route = plan(
            &[busy, b.clone()],
            BlockRange::new(0, 8),
            &HashSet::new(),
            &RoutePolicy::default(),
            0,
        )
        .unwrap();
        assert_eq!(route[0].peer, b.peer);
    }
}
