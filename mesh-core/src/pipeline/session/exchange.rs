//! The messages of one hop: opening its session, a step (`Forward`, or `Rewind` after
//! rejected draft tokens) with its attestation checked, and a request with its timeout,
//! round-trip time and the retries a transient refusal earns.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use libp2p::PeerId;
use rand::Rng;

use super::{HopState, RemoteSession};
use crate::ledger::{Attestation, SignedReceipt};
use crate::p2p;
use crate::pipeline::protocol::{Refusal, SessionRequest, SessionResponse};
use crate::pipeline::route::Hop;
use crate::pipeline::PipelineError;
use crate::types::SessionId;
use crate::wire::{self, WireTensor};

/// Times a request refused as busy or rate-limited is sent again before the server
/// counts as failed.
pub(super) const TRANSIENT_RETRIES: usize = 5;

/// A step's output, its receipt (if one fell due) and its signature (if signed).
pub(super) type TakenStep = (Tensor, Option<Box<SignedReceipt>>, Option<Attestation>);

impl RemoteSession {
    /// Open a session for one hop and agree its terms.
    pub(super) async fn open_hop(&mut self, hop: Hop) -> Result<HopState, PipelineError> {
        let session = SessionId::random();
        let req = SessionRequest::Open {
            session,
            model: self.model.clone(),
            span: hop.span,
            max_len: self.cfg.max_len,
            attest: self.cfg.verify.enabled(),
        };
        match self.request(hop.peer, &req).await? {
            SessionResponse::Opened { terms, .. } => {
                let tally = self.agree(hop, session, terms.map(|t| *t))?;
                Ok(HopState::new(hop, session, tally))
            }
            other => Err(unexpected(hop.peer, other)),
        }
    }

    pub(super) async fn forward(
        &mut self,
        peer: PeerId,
        session: SessionId,
        x: &Tensor,
        start_pos: u32,
        rewind: bool,
    ) -> Result<TakenStep, PipelineError> {
        let sent = WireTensor::from_tensor(x)?;
        let hidden = sent.clone();
        let req = if rewind {
            SessionRequest::Rewind {
                session,
                to: start_pos,
                hidden,
            }
        } else {
            SessionRequest::Forward {
                session,
                start_pos,
                hidden,
            }
        };
        let response = self.request(peer, &req).await?;
        checked_output(peer, session, start_pos, &sent, x.dims(), response).map(|(taken, _)| taken)
    }

    /// Send `req` to `peer`; a transient refusal (busy, rate-limited) is retried after a
    /// pause, since a refused request changed nothing on the server.
    pub(super) async fn request(
        &mut self,
        peer: PeerId,
        req: &SessionRequest,
    ) -> Result<SessionResponse, PipelineError> {
        let mut retries = 0;
        loop {
            let response = self.request_once(peer, req).await?;
            let wait = match &response {
                SessionResponse::Refused(Refusal::RateLimited { retry_after_ms }) => {
                    Duration::from_millis((*retry_after_ms).min(1000))
                }
                SessionResponse::Refused(Refusal::Busy) => {
                    Duration::from_millis(20 + self.sampler.random_range(0..60))
                }
                _ => return Ok(response),
            };
            if retries == TRANSIENT_RETRIES {
                return Ok(response);
            }
            retries += 1;
            tokio::time::sleep(wait).await;
        }
    }

    async fn request_once(
        &mut self,
        peer: PeerId,
        req: &SessionRequest,
    ) -> Result<SessionResponse, PipelineError> {
        let bytes = wire::encode(req)?;
        let started = Instant::now();
        let response = send_once(&self.p2p, peer, bytes, self.cfg.step_timeout).await?;
        let rtt = started.elapsed();
        let smoothed = self.rtt.get(&peer).map_or(rtt, |old| (*old * 7 + rtt) / 8);
        self.rtt.insert(peer, smoothed);
        Ok(response)
    }
}

/// One encoded request to `peer` and its decoded answer, within `timeout`.
pub(super) async fn send_once(
    p2p: &p2p::Client,
    peer: PeerId,
    bytes: Vec<u8>,
    timeout: Duration,
) -> Result<SessionResponse, PipelineError> {
    let reply = tokio::time::timeout(timeout, p2p.request(peer, bytes))
        .await
        .map_err(|_| PipelineError::Timeout {
            peer,
            after: timeout,
        })?
        .map_err(|e| PipelineError::Unreachable {
            peer,
            reason: e.to_string(),
        })?;
    wire::decode(&reply, wire::FRAME_LIMIT).map_err(|e| PipelineError::Protocol {
        peer,
        detail: e.to_string(),
    })
}

/// A step's output as the client keeps it (and as it came, to check the next hop's
/// input against), once its shape matches the input's (`dims`) and its attestation (if
/// signed) covers `session`, `sent` and the output.
pub(super) fn checked_output(
    peer: PeerId,
    session: SessionId,
    start_pos: u32,
    sent: &WireTensor,
    dims: &[usize],
    response: SessionResponse,
) -> Result<(TakenStep, WireTensor), PipelineError> {
    let SessionResponse::Hidden {
        hidden,
        receipt,
        attestation,
        ..
    } = response
    else {
        return Err(unexpected(peer, response));
    };
    let protocol = |detail: String| PipelineError::Protocol { peer, detail };
    let out = hidden.to_tensor(&Device::Cpu)?;
    if out.dims() != dims {
        let got = format!("sent {dims:?}, got back {:?}", out.dims());
        return Err(protocol(got));
    }
    if let Some(a) = &attestation {
        a.verify(&peer, &session, start_pos, sent, &hidden)
            .map_err(|e| protocol(format!("step attestation: {e}")))?;
    }
    Ok(((out, receipt, attestation), hidden))
}

pub(super) fn unexpected(peer: PeerId, response: SessionResponse) -> PipelineError {
    match response {
        SessionResponse::Refused(reason) => PipelineError::Refused { peer, reason },
        other => PipelineError::Protocol {
            peer,
            detail: format!("unexpected response {other:?}"),
        },
    }
}
