//! What a session did, as the client reports it once it closed: what it countersigned.
//! The receipts are the one record of cost: an estimate from the route's prices misses
//! what fail-overs replay and what witness checks run, so none is made.

/// A closed session's account ([`super::RemoteSession::close`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionReport {
    /// What the session countersigned in all, in micro-units: the final receipt of every
    /// hop, replacement and witness it paid (0 without a ledger or billing servers).
    pub countersigned: u64,
}
