//! A step whose servers push to each other: the client sends every server of the route
//! its part at once (the first one the hidden states, each later one the peer that will
//! push them, and where its own output goes on to), each server runs its blocks as soon
//! as its input comes and pushes on, and every server answers the client with its signed
//! output as before. Over three servers a token takes four one-way trips instead of six.
//!
//! The answers are taken in route order, exactly as relayed ones are (history for replay,
//! receipts, checks). Servers answer without waiting for their push to be taken, so the
//! client learns of a push that failed by its next server's answer not coming in time.
//! The first hop that does not answer well, or in time, ends it: the client relays from
//! there as before, as a rewind, since the server may have run the step already; a
//! failed server is replaced then as always. A session whose pushes keep not coming (the
//! servers cannot reach each other) relays from then on.

use std::time::Duration;

use candle_core::Tensor;
use tokio::task::JoinHandle;

use super::exchange::{checked_output, send_once};
use super::RemoteSession;
use crate::pipeline::protocol::{PushTarget, Refusal, SessionRequest, SessionResponse, StepInput};
use crate::pipeline::PipelineError;
use crate::wire::{self, WireTensor};

/// Steps of more positions (a prompt) go through the client: how long a server takes on
/// them is not known beforehand, so a push that never came could not be told from a slow
/// step. Decode steps and a draft's proposals are far fewer.
const MAX_PUSHED_POSITIONS: usize = 16;

/// How much longer than twice the first server's answer (and four round trips to the
/// server) a pushed server's answer may take before the client relays its step itself.
const PUSH_GRACE: Duration = Duration::from_millis(250);

/// Steps in a row whose push never came before a session stops pushing (the first push
/// to a server also opens a connection to it, which may take longer than the grace).
const MAX_PUSH_MISSES: u32 = 3;

/// Whether `e`, from a server whose input was to be pushed, says the push never came
/// (rather than that the server failed).
fn push_never_came(e: &PipelineError) -> bool {
    matches!(
        e,
        PipelineError::Timeout { .. }
            | PipelineError::Refused {
                reason: Refusal::NoPushedInput(_),
                ..
            }
    )
}

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
struct InFlight(Vec<JoinHandle<Result<SessionResponse, PipelineError>>>);

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
    pub(super) fn pushes(&self, positions: usize) -> bool {
        self.cfg.push
            && !self.push_off
            && positions <= MAX_PUSHED_POSITIONS
            && self.hops.len() > 1
            && self.hops.iter().all(|h| !h.hop.local)
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
        let started = std::time::Instant::now();
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
        // From the first answer on, each next one is late once it takes much longer than
        // a server's step and a trip to it: its push never came, and the client relays.
        let mut grace = self.cfg.step_timeout;
        for i in 0..self.hops.len() {
            let (peer, session) = (self.hops[i].hop.peer, self.hops[i].session);
            let answer = match tokio::time::timeout(grace, &mut in_flight.0[i]).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(e)) => Err(PipelineError::Protocol {
                    peer,
                    detail: format!("the step's task ended: {e}"),
                }),
                Err(_) => Err(PipelineError::Timeout { peer, after: grace }),
            };
            let taken = answer.and_then(|response| {
                checked_output(peer, session, start_pos, &sent, x.dims(), response)
            });
            let ((out, receipt, attestation), next) = match taken {
                Ok(taken) => taken,
                Err(e) => {
                    self.push_stats.relayed += 1;
                    self.count_unanswered(i, seq);
                    if i > 0 && push_never_came(&e) {
                        self.push_misses += 1;
                        if self.push_misses >= MAX_PUSH_MISSES {
                            // Most likely the servers cannot reach each other (NAT): relay
                            // for the rest of the session rather than wait every step.
                            tracing::info!(%peer, "pushes between servers keep not coming ({e}); relaying through the client from now on");
                            self.push_off = true;
                        }
                    } else {
                        tracing::debug!(%peer, "pushed step fell through: {e}; relaying");
                    }
                    return Ok(PushedStep {
                        answered: i,
                        next_input: input,
                        failed: None,
                    });
                }
            };
            if i == 0 {
                let first_answer = started.elapsed();
                grace = PUSH_GRACE + first_answer * 2;
            }
            self.hops[i].history.push(input);
            if i > 0 {
                self.push_stats.pushed += 1;
            }
            if let Err(e) = self.accept(i, seq, &out, receipt, attestation).await {
                self.count_unanswered(i + 1, seq);
                return Ok(PushedStep {
                    answered: i,
                    next_input: out,
                    failed: Some(e),
                });
            }
            if let Some(next) = self.hops.get(i + 1) {
                let rtt = self.rtt.get(&next.hop.peer).copied().unwrap_or_default();
                grace = grace.max(PUSH_GRACE + rtt * 4);
            }
            (sent, input) = (next, out);
        }
        self.push_misses = 0;
        Ok(PushedStep {
            answered: self.hops.len(),
            next_input: input,
            failed: None,
        })
    }

    /// Hops from `from` on were asked for a step of `positions` whose answer the client
    /// did not take, and may have run it (a push that came late): their receipts may
    /// count it as well as the step the client sends them again, so their tallies do.
    fn count_unanswered(&mut self, from: usize, positions: usize) {
        for h in self.hops.iter_mut().skip(from) {
            if let Some(tally) = h.tally.as_mut() {
                tally.record_positions(positions as u64);
            }
        }
    }
}
