//! A step whose servers push to each other: the client sends every server of the route
//! its part at once (the first one the hidden states, each later one the peer that will
//! push them, and where its own output goes on to), each server runs its blocks as soon
//! as its input comes and pushes on, and every server answers the client with its signed
//! output as before. Over three servers a token takes four one-way trips instead of six.
//!
//! The answers are taken in route order, exactly as relayed ones are (history for replay,
//! receipts, checks). The first hop that does not answer well, or could not push on, ends
//! it: the client relays from there as before, as a rewind, since the server may have
//! run the step already; a failed server is replaced then as always.

use candle_core::Tensor;
use tokio::task::JoinHandle;

use super::exchange::{checked_output, send_once, unexpected};
use super::RemoteSession;
use crate::pipeline::protocol::{PushTarget, SessionRequest, StepInput};
use crate::pipeline::PipelineError;
use crate::wire::{self, WireTensor};

/// How far a pushed step got.
pub(super) struct PushedStep {
    /// Hops whose answers were taken, in route order.
    pub answered: usize,
    /// The output of the last of them (the step's input when none was).
    pub next_input: Tensor,
    /// Why hop `answered`, whose answer was taken, then failed its check.
    pub failed: Option<PipelineError>,
}

/// The requests still out, abandoned when the step stops waiting for them.
struct InFlight(Vec<JoinHandle<Result<crate::pipeline::SessionResponse, PipelineError>>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

impl RemoteSession {
    /// Whether steps go server to server: asked for, and every hop is a server (the
    /// client's own blocks sit between servers only as a fallback).
    pub(super) fn pushes(&self) -> bool {
        self.cfg.push && self.hops.len() > 1 && self.hops.iter().all(|h| !h.hop.local)
    }

    /// Run `x` at `start_pos..` through the route with pushes; see the module's doc.
    pub(super) async fn step_pushed(
        &mut self,
        x: &Tensor,
        start_pos: u32,
        rewind: bool,
    ) -> Result<PushedStep, PipelineError> {
        let seq = x.dim(1)?;
        if rewind {
            for h in &mut self.hops {
                h.truncate_history(start_pos as usize)?;
            }
        }
        let first = WireTensor::from_tensor(x)?;
        let mut in_flight = InFlight(Vec::with_capacity(self.hops.len()));
        for (i, h) in self.hops.iter().enumerate() {
            let input = match i.checked_sub(1) {
                None => StepInput::Hidden(first.clone()),
                Some(before) => StepInput::PushedBy(self.hops[before].hop.peer),
            };
            let push_to = self.hops.get(i + 1).map(|next| PushTarget {
                peer: next.hop.peer,
                session: next.session,
            });
            let bytes = wire::encode(&SessionRequest::Step {
                session: h.session,
                start_pos,
                rewind,
                input,
                push_to,
            })?;
            let (p2p, peer, timeout) = (self.p2p.clone(), h.hop.peer, self.cfg.step_timeout);
            in_flight.0.push(tokio::spawn(async move {
                send_once(&p2p, peer, bytes, timeout).await
            }));
        }
        let mut sent = first;
        let mut input = x.clone();
        for i in 0..self.hops.len() {
            let (peer, session) = (self.hops[i].hop.peer, self.hops[i].session);
            let answer = match (&mut in_flight.0[i]).await {
                Ok(answer) => answer,
                Err(e) => Err(PipelineError::Protocol {
                    peer,
                    detail: format!("the step's task ended: {e}"),
                }),
            };
            let taken = answer.and_then(|response| {
                let (output, push_error) = response
                    .into_step_output()
                    .map_err(|other| unexpected(peer, *other))?;
                let next = output.hidden.clone();
                let checked = checked_output(peer, session, start_pos, &sent, x.dims(), output)?;
                Ok((checked, next, push_error))
            });
            let ((out, receipt, attestation), next, push_error) = match taken {
                Ok(taken) => taken,
                Err(e) => {
                    tracing::debug!(%peer, "pushed step fell through: {e}; relaying");
                    self.push_stats.relayed += 1;
                    return Ok(PushedStep {
                        answered: i,
                        next_input: input,
                        failed: None,
                    });
                }
            };
            self.hops[i].history.push(input);
            if i > 0 {
                self.push_stats.pushed += 1;
            }
            let accepted = self.accept(i, seq, &out, receipt, attestation).await;
            let last = i + 1 == self.hops.len();
            if let Err(e) = accepted {
                return Ok(PushedStep {
                    answered: i,
                    next_input: out,
                    failed: Some(e),
                });
            }
            if let (Some(why), false) = (push_error, last) {
                tracing::debug!(%peer, "push not taken: {why}; relaying");
                self.push_stats.relayed += 1;
                return Ok(PushedStep {
                    answered: i + 1,
                    next_input: out,
                    failed: None,
                });
            }
            (sent, input) = (next, out);
        }
        Ok(PushedStep {
            answered: self.hops.len(),
            next_input: input,
            failed: None,
        })
    }
}
