//! The client's side of billing: agreeing a hop's terms at open (never above the price
//! the server announced), countersigning the receipts that match what was sent, holding
//! them back while checking, and taking the final one at close.

use std::time::Duration;

use libp2p::PeerId;

use super::exchange::TRANSIENT_RETRIES;
use super::RemoteSession;
use crate::ledger::{ClientTally, ConfigHash, Outcome, SignedReceipt, Store, Terms};
use crate::pipeline::protocol::Refusal;
use crate::pipeline::route::{plan, Hop, RoutePolicy};
use crate::pipeline::{PipelineError, SessionRequest, SessionResponse};
use crate::types::{BlockRange, SessionId};
use crate::{p2p, wire};

/// A client's ledger: it checks what servers bill against what it sent, countersigns,
/// and keeps both signatures.
#[derive(Clone)]
pub struct ClientLedger {
    pub store: Store,
    /// The key of this client's peer id.
    pub key: ed25519_dalek::SigningKey,
    /// [`ConfigHash`] of the local model config: servers must bill for the same model.
    pub config_hash: ConfigHash,
}

impl RemoteSession {
    /// Check the terms a server offers at open and start counting what it is sent.
    pub(super) fn agree(
        &self,
        hop: Hop,
        session: SessionId,
        terms: Option<Terms>,
    ) -> Result<Option<ClientTally>, PipelineError> {
        let (Some(ledger), Some(terms)) = (&self.ledger, terms) else {
            return Ok(None);
        };
        let expected = Terms {
            session,
            client: self.p2p.local_peer_id(),
            server: hop.peer,
            model: self.model.clone(),
            config_hash: ledger.config_hash,
            span: hop.span,
            price_per_token: terms.price_per_token,
        };
        if terms != expected {
            return Err(PipelineError::Protocol {
                peer: hop.peer,
                detail: format!("unacceptable terms {terms:?}"),
            });
        }
        // The route was chosen at the announced price (which is also within the client's
        // ceiling): any price above it is a server changing its terms after being chosen.
        if terms.price_per_token > hop.price_per_token {
            return Err(PipelineError::AboveAnnouncedPrice {
                peer: hop.peer,
                offered: terms.price_per_token,
                announced: hop.price_per_token,
            });
        }
        ledger
            .store
            .record_opened(&terms)
            .map_err(|e| PipelineError::Ledger(e.to_string()))?;
        Ok(Some(ClientTally::new(terms)))
    }

    /// Why no route covers `range`: [`PipelineError::OverPrice`] when servers priced out
    /// would have made one, so the user learns to raise the ceiling rather than wait.
    pub(super) async fn no_route_explained(&self, range: BlockRange) -> PipelineError {
        let Ok(candidates) = self.candidates().await else {
            return self.no_route(range, &[]);
        };
        let servers = self.cfg.policy.priced_out(&candidates);
        let unlimited = RoutePolicy {
            max_price: None,
            max_price_ratio: None,
            ..self.cfg.policy.clone()
        };
        if servers.is_empty() || plan(&candidates, range, &self.banned, &unlimited, 0).is_none() {
            return self.no_route(range, &candidates);
        }
        PipelineError::OverPrice {
            model: self.model.clone(),
            range,
            servers,
        }
    }

    /// What this session countersigned so far, in micro-units: the newest countersigned
    /// receipt of every hop, replacement and witness it paid. While checking, receipts
    /// wait until their hop ends, so they count only then; [`RemoteSession::close`]
    /// reports the whole cost.
    pub fn countersigned_amount(&self) -> u64 {
        self.countersigned.values().sum()
    }

    /// Close an honest server's session and countersign its last receipt (the close
    /// receipt, or the one held back if the server is gone).
    pub(super) async fn close_session(
        &mut self,
        peer: PeerId,
        session: SessionId,
        tally: Option<ClientTally>,
        pending: Option<Box<SignedReceipt>>,
    ) {
        let req = SessionRequest::Close { session };
        let receipt = match self.request(peer, &req).await {
            Ok(SessionResponse::Closed { receipt, .. }) => {
                self.reputation.note(&peer, Outcome::Served);
                receipt.or(pending)
            }
            _ => pending,
        };
        self.countersign(peer, tally, receipt).await;
    }

    /// Countersign a receipt that matches what was sent, keep it, and hand it back to the
    /// server. A receipt that claims more than was sent is kept unsigned: never paid.
    pub(super) async fn countersign(
        &mut self,
        peer: PeerId,
        tally: Option<ClientTally>,
        receipt: Option<Box<SignedReceipt>>,
    ) {
        let Some(req) = self.countersign_locally(peer, tally, receipt) else {
            return;
        };
        if let Err(e) = self.request(peer, &req).await {
            tracing::debug!(%peer, "countersigned receipt not delivered: {e}");
        }
    }

    /// [`RemoteSession::countersign`] for a receipt that came with a step: the signed
    /// copy goes back in the background, so the step does not wait a round trip for the
    /// server's acknowledgement. At most [`MAX_DELIVERIES`] are on their way at once.
    pub(super) async fn countersign_in_background(
        &mut self,
        peer: PeerId,
        tally: Option<ClientTally>,
        receipt: Option<Box<SignedReceipt>>,
    ) {
        let Some(req) = self.countersign_locally(peer, tally, receipt) else {
            return;
        };
        let bytes = match wire::encode(&req) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(%peer, "countersigned receipt not encoded: {e}");
                return;
            }
        };
        while self.deliveries.len() >= MAX_DELIVERIES {
            self.deliveries.join_next().await;
        }
        let (p2p, timeout) = (self.p2p.clone(), self.cfg.step_timeout);
        self.deliveries.spawn(deliver(p2p, peer, bytes, timeout));
    }

    /// Wait until every receipt sent back in the background has arrived (or failed).
    pub(super) async fn flush_deliveries(&mut self) {
        while self.deliveries.join_next().await.is_some() {}
    }

    /// Check, countersign and keep a receipt; the message that hands it back, if it was
    /// accepted.
    fn countersign_locally(
        &mut self,
        peer: PeerId,
        tally: Option<ClientTally>,
        receipt: Option<Box<SignedReceipt>>,
    ) -> Option<SessionRequest> {
        let (Some(ledger), Some(tally), Some(receipt)) = (self.ledger.clone(), tally, receipt)
        else {
            return None;
        };
        match ledger.store.accept_as_client(*receipt, &tally, &ledger.key) {
            Ok(signed) => {
                // Receipts of a session are cumulative: the newest one is its amount.
                let r = &signed.receipt;
                let amount = self
                    .countersigned
                    .entry((r.terms.session, peer))
                    .or_default();
                *amount = (*amount).max(r.amount);
                Some(SessionRequest::Countersigned {
                    receipt: Box::new(signed),
                })
            }
            Err(e) => {
                tracing::warn!(%peer, "receipt refused: {e}");
                None
            }
        }
    }
}

/// Receipts on their way back to servers at once, per session.
const MAX_DELIVERIES: usize = 16;

/// Hand a countersigned receipt back to `peer`, again after a pause while it is busy; a
/// receipt that never arrives is still in both ledgers' reach (the next one supersedes
/// it, and the close receipt is delivered before the session ends).
async fn deliver(p2p: p2p::Client, peer: PeerId, bytes: Vec<u8>, timeout: Duration) {
    for _ in 0..=TRANSIENT_RETRIES {
        let answer = match tokio::time::timeout(timeout, p2p.request(peer, bytes.clone())).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                tracing::debug!(%peer, "countersigned receipt not delivered: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "countersigned receipt not acknowledged in {timeout:?}");
                return;
            }
        };
        match wire::decode::<SessionResponse>(&answer, wire::FRAME_LIMIT) {
            Ok(SessionResponse::Refused(Refusal::Busy | Refusal::RateLimited { .. })) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(SessionResponse::Acknowledged) => return,
            other => {
                tracing::debug!(%peer, "countersigned receipt answered {other:?}");
                return;
            }
        }
    }
}

/// While checking, keep the newest receipt for when the hop ends (a server caught lying
/// later in the session must not have been paid); otherwise hand it on to countersign now.
pub(super) fn hold_back(
    verifying: bool,
    pending: &mut Option<Box<SignedReceipt>>,
    receipt: Option<Box<SignedReceipt>>,
) -> Option<Box<SignedReceipt>> {
    if !verifying {
        return receipt;
    }
    if receipt.is_some() {
        *pending = receipt;
    }
    None
}
