//! Counting the checks each hop gets, and saying when a hop can get none: with checking
//! on but neither the client's own weights nor another server of its blocks, a hop's
//! answers go unchecked, which must not pass in silence.

use libp2p::PeerId;

use super::report::HopChecks;
use super::{HopState, RemoteSession};
use crate::pipeline::route::{Candidate, Hop};

impl RemoteSession {
    /// While checking: every hop routed through so far, with the checks it got and
    /// whether a second opinion could reach it (empty when not checking). Known from the
    /// start: a hop without one is unchecked from the moment it joins.
    pub fn checks(&self) -> &[HopChecks] {
        &self.checks
    }

    /// Enter hops that just joined the route in the session's account of checks, and
    /// warn about any that no second opinion can reach.
    pub(super) async fn enlist(&mut self, hops: &mut [HopState]) {
        if !self.verifying() {
            return;
        }
        let candidates = match (&self.reference, self.candidates().await) {
            (Some(_), _) => Vec::new(),
            (None, Ok(c)) => c,
            (None, Err(e)) => {
                tracing::debug!("no candidates to witness: {e}");
                Vec::new()
            }
        };
        // The client's own blocks are not checked.
        for h in hops.iter_mut().filter(|h| !h.hop.local) {
            let second_opinion =
                self.reference.is_some() || !self.witnesses(h.hop, &candidates, &[]).is_empty();
            if !second_opinion {
                tracing::warn!(
                    "checking is on, but blocks {} have no second opinion: no other server \
                     serves them and no local weights are given (--verify-locally), so the \
                     answers of {} will not be checked",
                    h.hop.span,
                    h.hop.peer
                );
            }
            h.record = Some(self.checks.len());
            self.checks.push(HopChecks {
                hop: h.hop,
                checks: 0,
                second_opinion,
            });
        }
    }

    /// Servers of `candidates` that could witness `hop`: another server whose span holds
    /// its blocks in the same weight format (servers of different quantizations differ
    /// honestly by more than the tolerance), not banned, not priced out of routing (a
    /// witness is paid like a hop), not in `exclude`; with their prices.
    pub(super) fn witnesses(
        &self,
        hop: Hop,
        candidates: &[Candidate],
        exclude: &[PeerId],
    ) -> Vec<(PeerId, u64)> {
        let priced_out = self.cfg.policy.priced_out(candidates);
        let format = candidates
            .iter()
            .find(|c| c.peer == hop.peer)
            .map_or("", |c| c.quantization.as_str());
        candidates
            .iter()
            .filter(|c| c.span.start <= hop.span.start && hop.span.end <= c.span.end)
            .filter(|c| c.quantization == format)
            .filter(|c| !priced_out.iter().any(|o| o.peer == c.peer))
            .map(|c| (c.peer, c.price_per_token))
            .filter(|(p, _)| *p != hop.peer && !self.banned.contains(p) && !exclude.contains(p))
            .collect()
    }

    /// Count a second opinion taken on hop `i`'s answers.
    pub(super) fn count_check(&mut self, i: usize) {
        if let Some(record) = self.hops[i].record.and_then(|r| self.checks.get_mut(r)) {
            record.checks += 1;
        }
    }
}
