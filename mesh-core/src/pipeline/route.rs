//! Choosing a chain of servers that covers blocks `[a, b)`: a shortest path over block
//! boundaries, where a hop costs its round trip, its compute, a fixed penalty (fewer hops
//! win), its current load (equivalent servers share the work) and its price.
//!
//! Price is weighed against the other servers of the same blocks, because a price means
//! nothing on its own: a server asking far more than the median of its span
//! ([`RoutePolicy::max_price_ratio`]) is not used at all, so one greedy server cannot take
//! a share of the sessions just by announcing a price nobody would agree to.

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
    /// How its weights are stored, as announced; empty = full precision.
    pub quantization: String,
    /// Extra cost from this client's memory of the server's failures, in ms
    /// ([`crate::ledger::Reputation`]).
    pub penalty_ms: f64,
    /// Reachable only through a relay (every address it announces is `/p2p-circuit`).
    pub relayed: bool,
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
            quantization: info.quantization.clone(),
            penalty_ms: 0.0,
            relayed: only_relayed(&info.addrs),
        }
    }

    /// A server named by its signed DHT record but not heard in a heartbeat yet: its
    /// span and price are its own word, its load unknown. It gets conservative figures
    /// (no throughput, so [`RoutePolicy::default_block_ms`] per block, and
    /// [`UNHEARD_PENALTY_MS`]), so a server already heard of the same span wins; the
    /// first heartbeat replaces them with measured ones.
    pub fn from_dht(span: &RemoteSpan) -> Self {
        Self {
            peer: span.peer_id,
            span: span.span,
            rtt: None,
            throughput_tps: 0.0,
            active_sessions: 0,
            price_per_token: span.price_per_token,
            quantization: span.quantization.clone(),
            penalty_ms: UNHEARD_PENALTY_MS,
            relayed: only_relayed(&span.addrs),
        }
    }
}

/// A server whose every announced address goes through a relay.
fn only_relayed(addrs: &[libp2p::Multiaddr]) -> bool {
    !addrs.is_empty() && addrs.iter().all(crate::p2p::nat::is_relayed)
}

/// What a server known only from its DHT record adds to a hop's cost, in ms, until its
/// first heartbeat says how loaded it is.
pub const UNHEARD_PENALTY_MS: f64 = 10.0;

/// One hop of a route: run blocks `span` on `peer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hop {
    pub peer: PeerId,
    pub span: BlockRange,
    /// The price `peer` announced (DHT record or heartbeat) when the hop was planned: the
    /// most the client agrees to pay it, whatever terms it offers at open.
    pub price_per_token: u64,
    /// Run by the client itself from its own weights, because no server covered these
    /// blocks (`--fallback local`); `peer` is then the client's own id.
    pub local: bool,
}

/// What a block run by the client itself costs a route, in ms (through a throughput of
/// one token per [`LOCAL_BLOCK_MS`] ms): far more than any server, so the client runs
/// only the blocks no server covers, and in as few hops as it can.
const LOCAL_BLOCK_MS: f64 = 1e6;

/// How routes are weighed.
#[derive(Clone, Debug)]
pub struct RoutePolicy {
    /// Servers above this price (micro-units per token) are never used.
    pub max_price: Option<u64>,
    /// Servers asking more than this many times the (lower) median price of the servers
    /// of their blocks are never used; `None` turns the relative ceiling off.
    pub max_price_ratio: Option<f64>,
    /// What a block run at its span's median price adds to a hop's cost, in ms: cheaper
    /// servers win among otherwise equal ones, dearer ones lose.
    pub price_weight_ms: f64,
    /// Cost of one extra hop beyond its round trip, in ms.
    pub hop_penalty_ms: f64,
    /// Round trip assumed for a server not measured yet, in ms.
    pub default_rtt_ms: f64,
    /// Compute time per block assumed when a server announces no throughput, in ms.
    pub default_block_ms: f64,
    /// Cost of each session a server already has open, in ms.
    pub per_session_ms: f64,
    /// Whether servers with quantized weights may serve (so a route may mix them with
    /// full-precision ones); off, only full-precision servers are used.
    pub allow_quantized: bool,
    /// What a relayed hop adds beyond its round trip, in ms: its measured round trip
    /// already holds the detour through the relay, this makes a direct server win when
    /// the two are otherwise equal. Before the first measurement a relayed hop also
    /// counts `default_rtt_ms` twice (there and through the relay).
    pub relayed_hop_ms: f64,
}

impl Default for RoutePolicy {
    fn default() -> Self {
        Self {
            max_price: None,
            max_price_ratio: Some(DEFAULT_MAX_PRICE_RATIO),
            price_weight_ms: 5.0,
            hop_penalty_ms: 20.0,
            default_rtt_ms: 20.0,
            default_block_ms: 5.0,
            per_session_ms: 2.0,
            allow_quantized: true,
            relayed_hop_ms: 5.0,
        }
    }
}

/// Default [`RoutePolicy::max_price_ratio`]: four times the median of a span's servers.
pub const DEFAULT_MAX_PRICE_RATIO: f64 = 4.0;

/// A server left out of routing for its price, and the ceiling it was over.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PricedOut {
    pub peer: PeerId,
    pub price_per_token: u64,
    pub ceiling: u64,
}

/// A candidate with the median price of the servers of its blocks.
struct Priced<'a> {
    candidate: &'a Candidate,
    span_median: u64,
}

/// The lower median of the prices of the candidates overlapping `c` (itself included):
/// with two servers, the cheaper one sets the bar, so a greedy newcomer cannot raise it.
fn span_median(candidates: &[Candidate], c: &Candidate) -> u64 {
    let mut prices: Vec<u64> = candidates
        .iter()
        .filter(|o| !o.span.is_empty() && o.span.start < c.span.end && c.span.start < o.span.end)
        .map(|o| o.price_per_token)
        .collect();
    prices.sort_unstable();
    prices
        .get(prices.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or(c.price_per_token)
}

impl RoutePolicy {
    /// The ceiling for a server whose span's median price is `median`.
    fn ceiling(&self, median: u64) -> u64 {
        let relative = self.max_price_ratio.map_or(u64::MAX, |r| {
            (median as f64 * r.max(1.0)).min(u64::MAX as f64) as u64
        });
        self.max_price.map_or(relative, |max| max.min(relative))
    }

    /// Split `candidates` into those whose price is acceptable (with their span's median)
    /// and those over the ceiling. The medians count every candidate, so servers excluded
    /// for other reasons still speak for what a span's blocks cost.
    fn by_price<'a>(&self, candidates: &'a [Candidate]) -> (Vec<Priced<'a>>, Vec<PricedOut>) {
        let mut kept = Vec::new();
        let mut out = Vec::new();
        for c in candidates.iter().filter(|c| !c.span.is_empty()) {
            let median = span_median(candidates, c);
            let ceiling = self.ceiling(median);
            if c.price_per_token > ceiling {
                out.push(PricedOut {
                    peer: c.peer,
                    price_per_token: c.price_per_token,
                    ceiling,
                });
            } else {
                kept.push(Priced {
                    candidate: c,
                    span_median: median,
                });
            }
        }
        (kept, out)
    }

    /// The servers among `candidates` that routing leaves out for their price.
    pub fn priced_out(&self, candidates: &[Candidate]) -> Vec<PricedOut> {
        self.by_price(candidates).1
    }

    fn hop_cost(&self, p: &Priced, blocks: u32) -> f64 {
        let c = p.candidate;
        // Free spans cost nothing; otherwise a hop at its span's median adds
        // `price_weight_ms` per block, twice the median twice as much.
        let relative_price = c.price_per_token as f64 / p.span_median.max(1) as f64;
        let unmeasured = if c.relayed {
            2.0 * self.default_rtt_ms
        } else {
            self.default_rtt_ms
        };
        let rtt = c.rtt.map_or(unmeasured, |d| d.as_secs_f64() * 1e3);
        let relay = if c.relayed { self.relayed_hop_ms } else { 0.0 };
        let per_block = if c.throughput_tps > 0.0 {
            1e3 / f64::from(c.throughput_tps)
        } else {
            self.default_block_ms
        };
        rtt + relay
            + per_block * f64::from(blocks)
            + self.hop_penalty_ms
            + self.per_session_ms * f64::from(c.active_sessions)
            + c.penalty_ms
            + self.price_weight_ms * relative_price * f64::from(blocks)
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
    let (priced, _) = policy.by_price(candidates);
    let usable: Vec<Priced> = priced
        .into_iter()
        .filter(|p| !exclude.contains(&p.candidate.peer))
        .filter(|p| policy.allow_quantized || p.candidate.quantization.is_empty())
        .collect();
    shortest(usable, range, policy, tie_break)
}

/// Like [`plan`], with the client itself (as `me`) able to run the blocks of `local`
/// from its own weights: the route uses servers wherever they cover blocks and the client
/// only for the blocks none covers. Its hops are marked [`Hop::local`]. `None` when even
/// with the local blocks a gap is left.
pub fn plan_with_local(
    candidates: &[Candidate],
    range: BlockRange,
    exclude: &HashSet<PeerId>,
    policy: &RoutePolicy,
    tie_break: u64,
    me: PeerId,
    local: &[BlockRange],
) -> Option<Vec<Hop>> {
    // Priced apart from the servers, so the client's own free blocks do not pull the
    // median of a span's prices down and price its servers out.
    let (priced, _) = policy.by_price(candidates);
    let own: Vec<Candidate> = local
        .iter()
        .map(|span| Candidate {
            peer: me,
            span: *span,
            rtt: Some(Duration::ZERO),
            throughput_tps: (1e3 / LOCAL_BLOCK_MS) as f32,
            active_sessions: 0,
            price_per_token: 0,
            // The client runs its blocks from its own (full-precision) weights.
            quantization: String::new(),
            relayed: false,
            penalty_ms: 0.0,
        })
        .collect();
    let usable: Vec<Priced> = priced
        .into_iter()
        .filter(|p| !exclude.contains(&p.candidate.peer) && p.candidate.peer != me)
        .chain(own.iter().map(|candidate| Priced {
            candidate,
            span_median: 0,
        }))
        .collect();
    let mut hops = shortest(usable, range, policy, tie_break)?;
    for h in &mut hops {
        h.local = h.peer == me;
    }
    Some(hops)
}

/// The blocks of `range` no candidate outside `exclude` covers, as maximal ranges.
pub fn uncovered(
    candidates: &[Candidate],
    range: BlockRange,
    exclude: &HashSet<PeerId>,
) -> Vec<BlockRange> {
    let covered = |b: u32| {
        candidates
            .iter()
            .any(|c| c.span.contains(b) && !exclude.contains(&c.peer))
    };
    let mut gaps: Vec<BlockRange> = Vec::new();
    for b in range.start..range.end {
        if covered(b) {
            continue;
        }
        match gaps.last_mut() {
            Some(g) if g.end == b => g.end = b + 1,
            _ => gaps.push(BlockRange::new(b, b + 1)),
        }
    }
    gaps
}

/// The cheapest chain over `range` through `usable`.
fn shortest(
    usable: Vec<Priced>,
    range: BlockRange,
    policy: &RoutePolicy,
    tie_break: u64,
) -> Option<Vec<Hop>> {
    if range.is_empty() {
        return None;
    }
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
        for p in &usable {
            let c = p.candidate;
            if !c.span.contains(block) {
                continue;
            }
            let last = c.span.end.min(range.end);
            for end in block + 1..=last {
                let jitter = tie_jitter(&c.peer, tie_break);
                let next = cost + policy.hop_cost(p, end - block) + jitter;
                let to = (end - range.start) as usize;
                if next < best[to] {
                    best[to] = next;
                    via[to] = Some((
                        at,
                        Hop {
                            peer: c.peer,
                            span: BlockRange::new(block, end),
                            price_per_token: c.price_per_token,
                            local: false,
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
            quantization: String::new(),
            penalty_ms: 0.0,
            relayed: false,
        }
    }

    #[test]
    fn quantized_servers_serve_unless_the_client_wants_full_precision() {
        let mut q = cand((0, 8));
        q.quantization = "q4k".into();
        q.throughput_tps = 10_000.0;
        let (a, b) = (cand((0, 4)), cand((4, 8)));
        let cs = [q.clone(), a.clone(), b.clone()];
        // Allowed (the default): the faster, single-hop quantized server wins.
        let route = plan_default(&cs, BlockRange::new(0, 8), 1).unwrap();
        assert_eq!(route.len(), 1);
        assert_eq!(route[0].peer, q.peer);
        let strict = RoutePolicy {
            allow_quantized: false,
            ..RoutePolicy::default()
        };
        let route = plan(&cs, BlockRange::new(0, 8), &HashSet::new(), &strict, 1).unwrap();
        assert_eq!(
            route.iter().map(|h| h.peer).collect::<Vec<_>>(),
            vec![a.peer, b.peer]
        );
        // Only quantized servers of a block: no full-precision route.
        assert!(plan(&[q], BlockRange::new(0, 8), &HashSet::new(), &strict, 1).is_none());
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
    fn price_weighs_in_and_a_server_far_above_its_spans_median_is_never_used() {
        let priced = |price| Candidate {
            price_per_token: price,
            ..cand((0, 8))
        };
        let (fair, dear, greedy) = (priced(10), priced(20), priced(1_000_000));
        let cs = [fair.clone(), greedy.clone()];
        for session in 0..64 {
            let route = plan_default(&cs, BlockRange::new(0, 8), session).unwrap();
            assert_eq!(route[0].peer, fair.peer);
            assert_eq!(
                route[0].price_per_token, 10,
                "the hop carries the announced price"
            );
        }
        let out = RoutePolicy::default().priced_out(&cs);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].peer, out[0].ceiling), (greedy.peer, 40));
        // Within the ceiling, the cheaper of two equal servers wins.
        let route = plan_default(&[dear, fair.clone()], BlockRange::new(0, 8), 3).unwrap();
        assert_eq!(route[0].peer, fair.peer);
        // Alone on its blocks, a server sets its span's median: only max_price limits it.
        assert!(plan_default(std::slice::from_ref(&greedy), BlockRange::new(0, 8), 0).is_some());
        // The ratio can be lifted.
        let lifted = RoutePolicy {
            max_price_ratio: None,
            ..RoutePolicy::default()
        };
        assert!(lifted.priced_out(&cs).is_empty());
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

    /// The client runs only the blocks no server covers, in one hop, and a gap its own
    /// weights do not fill either leaves no route.
    #[test]
    fn local_blocks_fill_only_the_gap() {
        let (head, tail) = (cand((0, 3)), cand((5, 8)));
        let me = PeerId::random();
        let all = [BlockRange::new(0, 8)];
        let route = |cs: &[Candidate], local: &[BlockRange], exclude: &HashSet<PeerId>| {
            let policy = RoutePolicy::default();
            plan_with_local(cs, BlockRange::new(0, 8), exclude, &policy, 0, me, local)
        };
        let none = HashSet::new();
        let hops = route(&[head.clone(), tail.clone()], &all, &none).unwrap();
        let shape: Vec<(PeerId, BlockRange, bool)> =
            hops.iter().map(|h| (h.peer, h.span, h.local)).collect();
        assert_eq!(
            shape,
            [
                (head.peer, BlockRange::new(0, 3), false),
                (me, BlockRange::new(3, 5), true),
                (tail.peer, BlockRange::new(5, 8), false),
            ]
        );
        // Holding only blocks 0..4 leaves block 4 uncovered.
        let partial = [BlockRange::new(0, 4)];
        assert!(route(&[head.clone(), tail.clone()], &partial, &none).is_none());
        // A banned server's blocks go local too.
        let banned = HashSet::from([tail.peer]);
        let hops = route(&[head.clone(), tail], &all, &banned).unwrap();
        assert_eq!(hops.len(), 2);
        assert!(hops[1].local && hops[1].span == BlockRange::new(3, 8));
        // Whole coverage by servers never runs anything locally.
        let whole = cand((0, 8));
        let hops = route(&[whole], &all, &none).unwrap();
        assert!(hops.iter().all(|h| !h.local));
    }

    #[test]
    fn a_direct_server_wins_over_an_equal_relayed_one_and_rtt_still_counts() {
        let direct = cand((0, 8));
        let relayed = Candidate {
            relayed: true,
            ..cand((0, 8))
        };
        let both = [direct.clone(), relayed.clone()];
        for session in 0..64 {
            let route = plan_default(&both, BlockRange::new(0, 8), session).unwrap();
            assert_eq!(route[0].peer, direct.peer, "equal otherwise: direct wins");
        }
        // A relayed server measured much closer than a far direct one still wins.
        let near_relayed = Candidate {
            rtt: Some(Duration::from_millis(10)),
            ..relayed.clone()
        };
        let far_direct = Candidate {
            rtt: Some(Duration::from_millis(200)),
            ..direct
        };
        let route = plan_default(
            &[far_direct, near_relayed.clone()],
            BlockRange::new(0, 8),
            3,
        );
        assert_eq!(route.unwrap()[0].peer, near_relayed.peer);
        // Announced addresses decide what counts as relayed.
        let circuit: libp2p::Multiaddr = "/ip4/10.0.0.1/tcp/1/p2p-circuit".parse().unwrap();
        let plain: libp2p::Multiaddr = "/ip4/10.0.0.2/tcp/1".parse().unwrap();
        assert!(only_relayed(std::slice::from_ref(&circuit)));
        assert!(!only_relayed(&[circuit, plain]));
        assert!(!only_relayed(&[]));
    }
}
