//! One hop of a client's route as the session keeps it: what it was sent, what it
//! answered, what it is owed, and how far its answers were checked.

use candle_core::Tensor;

use super::audit::Witness;
use super::billing::hold_back;
use crate::ledger::{Attestation, ClientTally, SignedReceipt};
use crate::model::SpanCache;
use crate::pipeline::route::Hop;
use crate::types::SessionId;

pub(super) struct HopState {
    pub(super) hop: Hop,
    pub(super) session: SessionId,
    /// What this client sent the hop, when the server bills.
    pub(super) tally: Option<ClientTally>,
    /// Inputs sent so far, in order; replayed into a replacement server.
    pub(super) history: Vec<Tensor>,
    /// The newest receipt, held back while checking until the hop ends honestly.
    pub(super) pending: Option<Box<SignedReceipt>>,
    /// While checking: the server's answer to each input of `history`, with its signature.
    pub(super) claims: Vec<(Tensor, Option<Attestation>)>,
    /// While checking: how many steps of `history` a second opinion confirmed.
    pub(super) checked: usize,
    /// While checking against the client's own weights: the KV state of the confirmed
    /// steps, so the next check runs only the steps after them.
    pub(super) shadow: Option<SpanCache>,
    /// While checking against other servers: a witness that ran the confirmed steps, so
    /// the next check sends it only the steps after them.
    pub(super) witness: Option<Witness>,
    /// While checking: its entry in the session's account of checks, once on the route.
    pub(super) record: Option<usize>,
    /// A local hop's KV state ([`super::fallback`]).
    pub(super) own_cache: Option<SpanCache>,
}

impl HopState {
    /// A hop just opened on `session`, nothing sent yet.
    pub(super) fn new(hop: Hop, session: SessionId, tally: Option<ClientTally>) -> Self {
        Self {
            hop,
            session,
            tally,
            history: Vec::new(),
            pending: None,
            claims: Vec::new(),
            checked: 0,
            shadow: None,
            witness: None,
            record: None,
            own_cache: None,
        }
    }

    /// Positions in the first `steps` inputs.
    pub(super) fn positions(&self, steps: usize) -> usize {
        self.history[..steps]
            .iter()
            .map(|t| t.dim(1).unwrap_or(0))
            .sum()
    }

    /// Forget the inputs from position `positions` on (a draft's rejected tokens): a
    /// replacement server is replayed only what stands, and checks compare only the
    /// answers to it. A step cut short keeps its whole signed answer, as evidence must,
    /// and checks compare its first rows; the KV states of checks past the cut are cut
    /// back when the next check runs ([`super::audit`]).
    pub(super) fn truncate_history(&mut self, positions: usize) -> Result<(), candle_core::Error> {
        let mut kept = 0;
        let mut steps = 0;
        for t in &self.history {
            let n = t.dim(1)?;
            if kept + n > positions {
                break;
            }
            kept += n;
            steps += 1;
        }
        let cut = positions.saturating_sub(kept);
        let partial = match self.history.get(steps) {
            Some(t) if cut > 0 => Some(t.narrow(1, 0, cut)?),
            _ => None,
        };
        self.history.truncate(steps);
        self.history.extend(partial);
        self.claims.truncate(self.history.len());
        self.checked = self.checked.min(self.history.len());
        if let Some(cache) = self.own_cache.as_mut() {
            cache.truncate(positions);
        }
        Ok(())
    }

    /// Take a server's answer to the input last pushed: count its positions, keep it for
    /// checking, and return the receipt to countersign now (`None` while checking holds it
    /// back until the hop ends).
    pub(super) fn take_answer(
        &mut self,
        positions: usize,
        out: &Tensor,
        receipt: Option<Box<SignedReceipt>>,
        attestation: Option<Attestation>,
        verifying: bool,
    ) -> Option<Box<SignedReceipt>> {
        if let Some(tally) = self.tally.as_mut() {
            tally.record_positions(positions as u64);
        }
        if verifying {
            self.claims.push((out.clone(), attestation));
        }
        hold_back(verifying, &mut self.pending, receipt)
    }
}
