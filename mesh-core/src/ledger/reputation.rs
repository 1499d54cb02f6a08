//! What this peer has seen of others: failures, timeouts, wrong answers, unpaid work. Kept
//! beside the receipts (same store, its own tree) so it survives restarts, and read by the
//! route planner so bad peers cost more or are avoided.
//!
//! The rules are simple and local; nothing here is gossiped (a peer's opinion of another
//! is only evidence for itself):
//! - a server caught returning wrong hidden states is avoided for [`MISMATCH_BAN_MS`];
//! - failures and timeouts add [`FAILURE_PENALTY_MS`] each to the route cost, halving every
//!   [`PENALTY_HALF_LIFE_MS`] since the last one, so a flaky peer is tried last and a peer
//!   that recovered is forgiven.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use super::attestation::Attestation;
use super::{hex, now_ms, LedgerError, Store};
use crate::types::{BlockRange, SessionId};
use crate::wire::WireTensor;

/// A server caught lying is avoided this long (a week).
pub const MISMATCH_BAN_MS: u64 = 7 * 24 * 3600 * 1000;
/// Route cost added per recent failure (a timeout counts twice).
pub const FAILURE_PENALTY_MS: f64 = 200.0;
/// The failure penalty halves every hour without a new failure.
pub const PENALTY_HALF_LIFE_MS: u64 = 3600 * 1000;
/// Ceiling of the failure penalty, so a peer stays usable as a last resort.
pub const MAX_PENALTY_MS: f64 = 10_000.0;

/// How one dealing with a peer ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A session hop that served every step it was sent.
    Served,
    /// A refusal other than "busy", a broken protocol, a dropped connection.
    Failed,
    TimedOut,
    /// Hidden states that a second opinion showed to be wrong.
    Mismatch,
    /// A client that left work uncountersigned (recorded by servers).
    Unpaid,
}

/// Counts per peer, and when the last bad thing happened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    pub served: u64,
    pub failures: u64,
    pub timeouts: u64,
    pub mismatches: u64,
    pub unpaid: u64,
    pub last_failure_ms: u64,
    pub last_mismatch_ms: u64,
}

impl PeerRecord {
    pub fn note(&mut self, outcome: Outcome, now_ms: u64) {
        match outcome {
            Outcome::Served => self.served += 1,
            Outcome::Failed => {
                self.failures += 1;
                self.last_failure_ms = now_ms;
            }
            Outcome::TimedOut => {
                self.timeouts += 1;
                self.last_failure_ms = now_ms;
            }
            Outcome::Mismatch => {
                self.mismatches += 1;
                self.last_mismatch_ms = now_ms;
            }
            Outcome::Unpaid => self.unpaid += 1,
        }
    }

    /// Extra cost of routing through this peer, in ms; `None` when it must be avoided.
    pub fn route_penalty_ms(&self, now_ms: u64) -> Option<f64> {
        if self.mismatches > 0 && now_ms.saturating_sub(self.last_mismatch_ms) < MISMATCH_BAN_MS {
            return None;
        }
        let bad = (self.failures + 2 * self.timeouts) as f64;
        if bad == 0.0 {
            return Some(0.0);
        }
        let age = now_ms.saturating_sub(self.last_failure_ms) as f64;
        let decay = 0.5f64.powf(age / PENALTY_HALF_LIFE_MS as f64);
        Some((bad * FAILURE_PENALTY_MS * decay).min(MAX_PENALTY_MS))
    }
}

/// Who disagreed with the accused server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Reference {
    /// The client re-ran the blocks itself from the same weights.
    Local,
    /// Another server of the span, with its own signed answer: the whole history run
    /// from position 0 in a session of its own. (Written before witnesses were kept
    /// between checks; read as [`Reference::Witness`] from position 0.)
    Server {
        #[serde(with = "hex::peer")]
        peer: PeerId,
        #[serde(with = "hex::session")]
        session: SessionId,
        attestation: Option<Box<Attestation>>,
    },
    /// Another server of the span, in a session of its own that had already run the
    /// hop's history before `start_pos`; its signed answer covers the positions from
    /// `start_pos` on (check its attestation at that position). Appended after
    /// `Server`, so records stored before it still decode.
    Witness {
        #[serde(with = "hex::peer")]
        peer: PeerId,
        #[serde(with = "hex::session")]
        session: SessionId,
        start_pos: u32,
        attestation: Option<Box<Attestation>>,
    },
}

impl Reference {
    /// The server that gave the reference answer, its session, and the first position
    /// its signed answer covers (`None` for a local check).
    pub fn witness(&self) -> Option<(PeerId, SessionId, u32)> {
        match self {
            Reference::Local => None,
            Reference::Server { peer, session, .. } => Some((*peer, *session, 0)),
            Reference::Witness {
                peer,
                session,
                start_pos,
                ..
            } => Some((*peer, *session, *start_pos)),
        }
    }
}

/// Proof that `server` answered a step wrongly: its signed claim, what the reference
/// computed, and how far apart they were.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    #[serde(with = "hex::session")]
    pub session: SessionId,
    #[serde(with = "hex::peer")]
    pub server: PeerId,
    pub span: BlockRange,
    pub start_pos: u32,
    /// The accused server's signature over the step's input and its (wrong) output
    /// (`None` from a server that does not sign).
    pub claimed: Option<Attestation>,
    /// The accused server's output for the step.
    pub claimed_output: WireTensor,
    /// The reference's output for the same positions.
    pub reference_output: WireTensor,
    pub reference: Reference,
    /// Largest difference relative to the reference's largest magnitude.
    pub difference: f32,
    pub at_ms: u64,
}

/// This peer's opinion of others: in memory, and in the store when there is one.
#[derive(Clone, Default)]
pub struct Reputation {
    store: Option<Store>,
    memory: Arc<Mutex<HashMap<PeerId, PeerRecord>>>,
}

impl std::fmt::Debug for Reputation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reputation")
            .field("persistent", &self.store.is_some())
            .finish_non_exhaustive()
    }
}

impl Reputation {
    /// Forgotten when the process exits.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Kept in `store` across restarts.
    pub fn persistent(store: Store) -> Self {
        Self {
            store: Some(store),
            memory: Arc::default(),
        }
    }

    pub fn get(&self, peer: &PeerId) -> PeerRecord {
        if let Some(rec) = self.memory.lock().ok().and_then(|m| m.get(peer).copied()) {
            return rec;
        }
        let stored = self.store.as_ref().and_then(|s| {
            s.peer_record(peer)
                .map_err(|e| tracing::warn!(%peer, "reading reputation: {e}"))
                .ok()
                .flatten()
        });
        let rec = stored.unwrap_or_default();
        if let Ok(mut m) = self.memory.lock() {
            m.insert(*peer, rec);
        }
        rec
    }

    /// Count one outcome (written through to the store; a store failure is logged, the
    /// in-memory record still counts).
    pub fn note(&self, peer: &PeerId, outcome: Outcome) {
        let mut rec = self.get(peer);
        rec.note(outcome, now_ms());
        if let Ok(mut m) = self.memory.lock() {
            m.insert(*peer, rec);
        }
        if let Some(store) = &self.store {
            if let Err(e) = store.put_peer_record(peer, &rec) {
                tracing::warn!(%peer, "recording reputation: {e}");
            }
        }
    }

    /// See [`PeerRecord::route_penalty_ms`].
    pub fn route_penalty_ms(&self, peer: &PeerId) -> Option<f64> {
        self.get(peer).route_penalty_ms(now_ms())
    }

    /// Keep proof of a wrong answer (and count the mismatch).
    pub fn record_mismatch(&self, evidence: &Evidence) -> Result<(), LedgerError> {
        self.note(&evidence.server, Outcome::Mismatch);
        match &self.store {
            Some(store) => store.add_evidence(evidence),
            None => Ok(()),
        }
    }

    /// Evidence kept so far, oldest first (empty without a store).
    pub fn evidence(&self, limit: usize) -> Result<Vec<Evidence>, LedgerError> {
        match &self.store {
            Some(store) => store.evidence(limit),
            None => Ok(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_cost_more_then_fade_and_a_mismatch_bans() {
        let mut r = PeerRecord::default();
        assert_eq!(r.route_penalty_ms(1_000), Some(0.0));
        r.note(Outcome::Failed, 1_000);
        r.note(Outcome::TimedOut, 1_000);
        assert_eq!(r.route_penalty_ms(1_000), Some(3.0 * FAILURE_PENALTY_MS));
        let hour_later = 1_000 + PENALTY_HALF_LIFE_MS;
        assert_eq!(
            r.route_penalty_ms(hour_later),
            Some(1.5 * FAILURE_PENALTY_MS)
        );
        r.note(Outcome::Mismatch, hour_later);
        assert_eq!(r.route_penalty_ms(hour_later + 1), None);
        assert!(r.route_penalty_ms(hour_later + MISMATCH_BAN_MS).is_some());
    }

    #[test]
    fn the_store_keeps_records_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let peer = crate::identity::Identity::generate().peer_id();
        {
            let rep = Reputation::persistent(Store::open(dir.path()).unwrap());
            rep.note(&peer, Outcome::TimedOut);
            rep.note(&peer, Outcome::Served);
        }
        let rep = Reputation::persistent(Store::open(dir.path()).unwrap());
        let rec = rep.get(&peer);
        assert_eq!((rec.timeouts, rec.served), (1, 1));
        assert!(rep.route_penalty_ms(&peer).unwrap() > 0.0);
    }
}
