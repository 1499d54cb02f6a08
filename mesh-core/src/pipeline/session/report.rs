//! What a session did, as the client reports it once it closed: what it countersigned,
//! and how its hops were checked. The receipts are the one record of cost: an estimate
//! from the route's prices misses what fail-overs replay and what witness checks run, so
//! none is made.

use crate::pipeline::route::Hop;

/// A closed session's account ([`super::RemoteSession::close`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionReport {
    /// What the session countersigned in all, in micro-units: the final receipt of every
    /// hop, replacement and witness it paid (0 without a ledger or billing servers).
    pub countersigned: u64,
    /// While checking ([`crate::pipeline::VerifyConfig`]): every hop the session routed
    /// through, in the order they joined, with the checks each got. Empty when not
    /// checking.
    pub checks: Vec<HopChecks>,
    /// With a draft model: how speculative decoding went.
    pub speculation: Option<crate::pipeline::SpeculationStats>,
}

/// How one hop of a session was checked: a rate above 0 does not by itself mean every
/// hop was, so the count is kept per hop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HopChecks {
    pub hop: Hop,
    /// Second opinions its answers were compared with.
    pub checks: u32,
    /// Whether a second opinion could be had when it joined the route: the client's own
    /// weights, or another server of its blocks. Without one its answers go unchecked
    /// (the session warns when the hop joins).
    pub second_opinion: bool,
}
