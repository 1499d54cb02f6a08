//! Second opinions on a hop's answer ([`crate::pipeline::verify`]): who to ask, how to
//! compare, and what to do with a server shown wrong.

use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use libp2p::PeerId;
use rand::Rng;

use super::{HopState, RemoteSession};
use crate::ledger::{now_ms, Attestation, ClientTally, Evidence, Reference, SignedReceipt};
use crate::model::ModelError;
use crate::pipeline::route::Hop;
use crate::pipeline::verify::{relative_difference, LocalReference};
use crate::pipeline::PipelineError;
use crate::types::SessionId;
use crate::wire::WireTensor;

/// One opinion on a span's output over a hop's history from position `from` on, and who
/// gave it.
struct Opinion {
    output: Tensor,
    from: usize,
    reference: Reference,
}

/// Another server of a hop's span, in a session of its own that has run the hop's inputs
/// up to `positions`. Kept between checks, so each check sends it only the steps since
/// the last one instead of the whole history again.
pub(super) struct Witness {
    hop: Hop,
    session: SessionId,
    tally: Option<ClientTally>,
    /// Its newest receipt, held until the session ends (it is countersigned then).
    pending: Option<Box<SignedReceipt>>,
    positions: usize,
}

impl Witness {
    fn new(state: HopState) -> Self {
        Self {
            hop: state.hop,
            session: state.session,
            tally: state.tally,
            pending: state.pending,
            positions: 0,
        }
    }

    /// Count an answer over `positions` more positions and hold its receipt.
    fn took(&mut self, positions: usize, receipt: Option<Box<SignedReceipt>>) {
        if let Some(tally) = self.tally.as_mut() {
            tally.record_positions(positions as u64);
        }
        super::billing::hold_back(true, &mut self.pending, receipt);
        self.positions += positions;
    }
}

impl RemoteSession {
    /// Check hop `i`'s answers since its last check against a second opinion: on a sampled
    /// step, or always when `forced`. Returns [`PipelineError::Mismatch`] when the hop is
    /// shown wrong (its evidence kept, its held receipt dropped) or when two servers
    /// disagree and nobody can tell which is right.
    pub(super) async fn audit(&mut self, i: usize, forced: bool) -> Result<(), PipelineError> {
        let rate = self.cfg.verify.rate.clamp(0.0, 1.0);
        let h = &self.hops[i];
        if rate == 0.0 || h.checked >= h.claims.len() || h.claims.len() != h.history.len() {
            return Ok(());
        }
        if !forced && !self.sampler.random_bool(rate) {
            return Ok(());
        }
        let hop = h.hop;
        let first = match self.reference.clone() {
            Some(reference) => Some(self.local_opinion(i, reference).await?),
            None => self.witness_opinion(i).await?,
        };
        let Some(first) = first else {
            tracing::debug!(peer = %hop.peer, "no second opinion available for this step");
            return Ok(());
        };
        self.count_check(i);
        let Some((step, difference)) = self.first_wrong(i, &first)? else {
            let h = &mut self.hops[i];
            h.checked = h.claims.len();
            return Ok(());
        };
        let mismatch = PipelineError::Mismatch {
            peer: hop.peer,
            difference,
        };
        if let Some((witness, _, _)) = first.reference.witness() {
            // Two servers disagree: a third opinion decides, over the whole history.
            let history = Tensor::cat(&self.hops[i].history, 1)?;
            let third = match self.fresh_witness(hop, &history, &[witness]).await? {
                Some((opinion, w)) => {
                    self.close_session(w.hop.peer, w.session, w.tally, w.pending)
                        .await;
                    Some(opinion)
                }
                None => None,
            };
            let (hop_right, witness_right) = match &third {
                Some(t) => {
                    let from = self.hops[i].positions(self.hops[i].checked);
                    let len = history.dim(1)? - from;
                    let agree = relative_difference(
                        &first.output.narrow(1, from - first.from, len)?,
                        &t.output.narrow(1, from - t.from, len)?,
                    )? <= self.cfg.verify.tolerance;
                    (self.first_wrong(i, t)?.is_none(), agree)
                }
                None => (false, false),
            };
            if hop_right {
                tracing::warn!(%witness, "a witness returned wrong hidden states");
                self.caught.push(witness);
                self.banned.insert(witness);
                let h = &mut self.hops[i];
                h.witness = None;
                h.checked = h.claims.len();
                return Ok(());
            }
            if !witness_right {
                tracing::warn!(peer = %hop.peer, %witness, "two servers disagree and no third opinion settles it; dropping both");
                self.banned.insert(witness);
                self.hops[i].witness = None;
                self.hops[i].pending = None;
                return Err(mismatch);
            }
        }
        tracing::warn!(peer = %hop.peer, span = %hop.span, difference, "server caught returning wrong hidden states");
        let h = &mut self.hops[i];
        h.pending = None;
        let start_pos = h.positions(step);
        let (claimed, attestation) = &h.claims[step];
        let evidence = Evidence {
            session: h.session,
            server: hop.peer,
            span: hop.span,
            start_pos: start_pos as u32,
            claimed: *attestation,
            claimed_output: WireTensor::from_tensor(claimed)?,
            // The rows compared; the claim is whole, as the server signed it.
            reference_output: WireTensor::from_tensor(&first.output.narrow(
                1,
                start_pos - first.from,
                h.history[step].dim(1)?,
            )?)?,
            reference: first.reference,
            difference,
            at_ms: now_ms(),
        };
        self.caught.push(hop.peer);
        if let Err(e) = self.reputation.record_mismatch(&evidence) {
            tracing::warn!("evidence not stored: {e}");
        }
        Err(mismatch)
    }

    /// The first of hop `i`'s unchecked steps whose answer differs from `reference` beyond
    /// the tolerance, and by how much.
    fn first_wrong(
        &self,
        i: usize,
        reference: &Opinion,
    ) -> Result<Option<(usize, f32)>, PipelineError> {
        let h = &self.hops[i];
        let mut at = h.positions(h.checked);
        for (step, (claimed, _)) in h.claims.iter().enumerate().skip(h.checked) {
            // A step a draft's rejection cut short is compared on the rows that stand.
            let seq = h.history[step].dim(1)?;
            let expected = reference.output.narrow(1, at - reference.from, seq)?;
            let difference = relative_difference(&claimed.narrow(1, 0, seq)?, &expected)?;
            if difference > self.cfg.verify.tolerance {
                return Ok(Some((step, difference)));
            }
            at += seq;
        }
        Ok(None)
    }

    /// Hop `i`'s unchecked steps run through the client's own copy of its blocks,
    /// continuing from the KV state of the steps confirmed before.
    async fn local_opinion(
        &mut self,
        i: usize,
        reference: Arc<Mutex<LocalReference>>,
    ) -> Result<Opinion, PipelineError> {
        let h = &mut self.hops[i];
        let from = h.positions(h.checked);
        // The state must end exactly where the unchecked steps begin (cut back past a
        // draft's rejected positions); else start over.
        let mut shadow = h.shadow.take().and_then(|mut c| {
            if c.len() > from {
                c.truncate(from);
            }
            (c.len() == from).then_some(c)
        });
        let (start, first_step) = match shadow {
            Some(_) => (from, h.checked),
            None => (0, 0),
        };
        let input = Tensor::cat(&h.history[first_step..], 1)?;
        let (span, max_len) = (h.hop.span, self.cfg.max_len as usize);
        let (output, shadow) = tokio::task::spawn_blocking(move || {
            let mut r = reference
                .lock()
                .map_err(|_| ModelError::Unsupported("local reference poisoned".into()))?;
            let output = r.run_from(span, &mut shadow, &input, max_len)?;
            Ok::<_, ModelError>((output, shadow))
        })
        .await
        .map_err(|_| ModelError::Unsupported("local check did not finish".into()))??;
        self.hops[i].shadow = shadow;
        Ok(Opinion {
            output,
            from: start,
            reference: Reference::Local,
        })
    }

    /// Hop `i`'s unchecked steps run by another server of its span: the witness kept
    /// from the last check when it is still there (only the new steps are sent), else a
    /// fresh one over the whole history. `None` when nobody is available.
    async fn witness_opinion(&mut self, i: usize) -> Result<Option<Opinion>, PipelineError> {
        let h = &mut self.hops[i];
        let (hop, from, kept) = (h.hop, h.positions(h.checked), h.witness.take());
        if let Some(mut w) = kept {
            if w.positions < from || self.banned.contains(&w.hop.peer) {
                // Behind the hop: close it; a fresh witness starts over.
                self.close_session(w.hop.peer, w.session, w.tally, w.pending)
                    .await;
            } else {
                let input = Tensor::cat(&self.hops[i].history[self.hops[i].checked..], 1)?;
                // Ahead when a draft's rejected positions were checked: the witness drops
                // them in the same message, as the hop did.
                let rewind = w.positions > from;
                match self
                    .forward(w.hop.peer, w.session, &input, from as u32, rewind)
                    .await
                {
                    Ok((output, receipt, attestation)) => {
                        w.positions = from;
                        w.took(input.dim(1)?, receipt);
                        let reference = witnessed(&w, from, attestation);
                        self.hops[i].witness = Some(w);
                        return Ok(Some(Opinion {
                            output,
                            from,
                            reference,
                        }));
                    }
                    Err(e) => {
                        // Gone or failed: it is owed what it did; a fresh witness takes over.
                        self.witness_failed(w.hop.peer, &e);
                        self.countersign(w.hop.peer, w.tally, w.pending).await;
                    }
                }
            }
        }
        let history = Tensor::cat(&self.hops[i].history, 1)?;
        Ok(match self.fresh_witness(hop, &history, &[]).await? {
            Some((opinion, w)) => {
                self.hops[i].witness = Some(w);
                Some(opinion)
            }
            None => None,
        })
    }

    /// Blocks `hop.span` over the whole `history` by another server of the span than
    /// `hop.peer` and `exclude`, in a session of its own left open for later checks;
    /// `None` when nobody is available.
    async fn fresh_witness(
        &mut self,
        hop: Hop,
        history: &Tensor,
        exclude: &[PeerId],
    ) -> Result<Option<(Opinion, Witness)>, PipelineError> {
        let candidates = self.candidates().await?;
        let mut witnesses = self.witnesses(hop, &candidates, exclude);
        while !witnesses.is_empty() {
            let (peer, price_per_token) =
                witnesses.swap_remove(self.sampler.random_range(0..witnesses.len()));
            let span = hop.span;
            let witness_hop = Hop {
                peer,
                span,
                price_per_token,
                local: false,
            };
            let mut w = match self.open_hop(witness_hop).await {
                Ok(state) => Witness::new(state),
                Err(e) => {
                    self.witness_failed(peer, &e);
                    continue;
                }
            };
            match self.forward(peer, w.session, history, 0, false).await {
                Ok((output, receipt, attestation)) => {
                    w.took(history.dim(1)?, receipt);
                    let reference = witnessed(&w, 0, attestation);
                    let opinion = Opinion {
                        output,
                        from: 0,
                        reference,
                    };
                    return Ok(Some((opinion, w)));
                }
                Err(e) => self.witness_failed(peer, &e),
            }
        }
        Ok(None)
    }

    /// A witness that failed is not asked again in this session: a hung one would cost a
    /// step timeout at every check. Its reputation records it like a failed hop, but
    /// unlike a hop it does not count toward the session's failovers. One that refused
    /// (full, busy) failed nothing: it may serve this session later, as a witness or a hop.
    fn witness_failed(&mut self, peer: PeerId, e: &PipelineError) {
        if let PipelineError::Refused { .. } = e {
            tracing::debug!(%peer, "witness refused: {e}");
            return;
        }
        tracing::info!(%peer, "witness failed, not asked again this session: {e}");
        self.banned.insert(peer);
        if let Some(outcome) = super::failure_outcome(e) {
            self.reputation.note(&peer, outcome);
        }
    }

    /// Close hop `h`'s witness session, if it kept one, and countersign its work.
    pub(super) async fn end_witness(&mut self, h: &mut HopState) {
        if let Some(w) = h.witness.take() {
            self.close_session(w.hop.peer, w.session, w.tally, w.pending)
                .await;
        }
    }
}

/// Who answered, as evidence: `w`'s signed answer over positions `from..`.
fn witnessed(w: &Witness, from: usize, attestation: Option<Attestation>) -> Reference {
    Reference::Witness {
        peer: w.hop.peer,
        session: w.session,
        start_pos: from as u32,
        attestation: attestation.map(Box::new),
    }
}
