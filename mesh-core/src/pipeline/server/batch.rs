//! Decode steps of several sessions as one pass over the span's weights.
//!
//! A decode step reads every weight of the span for one row: its time is the weights'
//! bytes over the memory's bandwidth. Steps of different sessions that are waiting
//! together share that read ([`SpanModel::forward_decode_batch`](crate::model::SpanModel::forward_decode_batch)),
//! each with its own positions, cache and attention, so each client's output is exactly
//! what it would be alone. Nothing waits for a batch to fill: the worker takes whatever
//! queued while it was busy, so one client alone runs as before, and under load the
//! batches grow by themselves.

use std::collections::HashSet;
use std::time::Instant;

use candle_core::{Device, Tensor};
use libp2p::PeerId;

use super::push::{Answer, Served};
use super::{Session, SpanServer};
use crate::pipeline::protocol::{Refusal, SessionRequest, SessionResponse, StepInput};
use crate::types::SessionId;
use crate::wire::WireTensor;

/// Most requests a worker takes at once, and so most steps in one pass
/// ([`super::ServerLimits::max_batch`] may set fewer).
pub const MAX_BATCH: usize = 16;

/// A one-position step taken out for a pass: its session, out of the map meanwhile.
struct Decode {
    index: usize,
    /// A push feeding a waiting step, not a client's step.
    pushed: bool,
    peer: PeerId,
    request: SessionRequest,
    id: SessionId,
    session: Session,
    input: Tensor,
}

impl SpanServer {
    /// Serve requests that arrived together, each as [`SpanServer::serve`] would, in order
    /// for each session: the one-position steps of different sessions (`Forward`, a
    /// `Step` carrying its input, or the `Push` a waiting step waits for) that come first
    /// for their session run as one pass, and the other requests after it, in the order
    /// they came. One answer per request, in that order.
    ///
    /// The steps' answers come unsigned: send their pushes on first, then sign each with
    /// [`SpanServer::seal`], so the next server's input does not wait for a signature.
    pub fn serve_many(
        &mut self,
        requests: Vec<(PeerId, SessionRequest)>,
        now: Instant,
    ) -> Vec<Served> {
        let mut served: Vec<Option<Served>> = requests.iter().map(|_| None).collect();
        let mut seen = HashSet::new();
        let mut decodes = Vec::new();
        let mut rest = Vec::new();
        for (index, (peer, request)) in requests.into_iter().enumerate() {
            let first = session_of(&request).is_none_or(|s| seen.insert(s));
            if !first {
                rest.push((index, peer, request));
                continue;
            }
            match self.decodable(peer, &request) {
                Some((id, input)) => match self.sessions.remove(&id) {
                    Some(session) => decodes.push(Decode {
                        index,
                        pushed: matches!(request, SessionRequest::Push { .. }),
                        peer,
                        request,
                        id,
                        session,
                        input,
                    }),
                    None => rest.push((index, peer, request)),
                },
                None => rest.push((index, peer, request)),
            }
        }
        if decodes.len() == 1 {
            // Alone, it runs as any other step.
            for d in decodes.drain(..) {
                self.sessions.insert(d.id, d.session);
                rest.push((d.index, d.peer, d.request));
            }
            rest.sort_by_key(|(index, ..)| *index);
        }
        self.run_decodes(decodes, now, &mut served);
        for (index, peer, request) in rest {
            served[index] = Some(self.serve_unsealed(peer, request, now));
        }
        served
            .into_iter()
            .map(|s| {
                s.unwrap_or_else(|| {
                    let refusal = Refusal::BadRequest("not served".into());
                    Served::now(Answer::plain(SessionResponse::Refused(refusal)))
                })
            })
            .collect()
    }

    /// `request`'s session and input if it can share a pass: a one-position step of
    /// `peer`'s session at the position its cache is at with nothing waiting on the
    /// session, or the push a session's waiting one-position step waits for from `peer`.
    fn decodable(&self, peer: PeerId, request: &SessionRequest) -> Option<(SessionId, Tensor)> {
        let (id, start_pos, hidden, pushed) = match request {
            SessionRequest::Forward {
                session,
                start_pos,
                hidden,
            }
            | SessionRequest::Step {
                session,
                start_pos,
                rewind: false,
                input: StepInput::Hidden(hidden),
                ..
            } => (*session, *start_pos, hidden, false),
            SessionRequest::Push {
                session,
                start_pos,
                hidden,
            } => (*session, *start_pos, hidden, true),
            _ => return None,
        };
        let s = self.sessions.get(&id)?;
        let asked = match (&s.waiting, pushed) {
            (None, false) => s.usage.client == peer,
            (Some(w), true) => w.from == peer && w.start_pos == start_pos && !w.rewind,
            _ => false,
        };
        if !asked || s.cache.len() != start_pos as usize || s.cache.len() >= s.cache.max_len() {
            return None;
        }
        let input = hidden.to_tensor(&Device::Cpu).ok()?;
        (input.dims() == [1, 1, self.span.config().hidden_size]).then_some((id, input))
    }

    /// Run the taken steps as one pass, put their sessions back, and answer each as a
    /// step run alone is answered; each is charged its share of the pass's time.
    fn run_decodes(
        &mut self,
        mut decodes: Vec<Decode>,
        now: Instant,
        served: &mut [Option<Served>],
    ) {
        if decodes.is_empty() {
            return;
        }
        let started = Instant::now();
        let outs = {
            let mut steps: Vec<_> = decodes
                .iter_mut()
                .map(|d| (&mut d.session.cache, &d.input))
                .collect();
            self.span.forward_decode_batch(&mut steps)
        };
        let micros = started.elapsed().as_micros() as u64 / decodes.len() as u64;
        for (mut d, out) in decodes.into_iter().zip(outs) {
            // A push answers its sender at once; the step that waited for it is released.
            let waited = d.session.waiting.take();
            self.sessions.insert(d.id, d.session);
            let (start_pos, hidden, push_to) = match (d.request, waited) {
                (
                    SessionRequest::Step {
                        start_pos,
                        input: StepInput::Hidden(hidden),
                        push_to,
                        ..
                    },
                    None,
                ) => (start_pos, hidden, push_to),
                (
                    SessionRequest::Forward {
                        start_pos, hidden, ..
                    },
                    None,
                ) => (start_pos, hidden, None),
                (
                    SessionRequest::Push {
                        start_pos, hidden, ..
                    },
                    Some(waiting),
                ) => (start_pos, hidden, waiting.push_to),
                _ => continue,
            };
            // The answer travels in the span's dtype, as a step's alone does.
            let output = out
                .map_err(|e| e.to_string())
                .and_then(|t| WireTensor::from_tensor(&t).map_err(|e| e.to_string()));
            let stepped = match output {
                Ok(output) => self.finish_step(d.id, start_pos, &hidden, output, 1, micros, now),
                Err(e) => {
                    self.stats.refusals += 1;
                    SessionResponse::Refused(Refusal::BadRequest(e)).into()
                }
            };
            let answer = Answer::pushing(stepped, start_pos, push_to);
            let result = match d.pushed {
                false => Served::now(answer),
                true => Served {
                    reply: super::Reply::Now(Box::new(Answer::plain(
                        SessionResponse::Acknowledged,
                    ))),
                    released: Some((d.id, answer)),
                },
            };
            if let Some(slot) = served.get_mut(d.index) {
                *slot = Some(result);
            }
        }
    }
}

/// The session a request is about (`None`: a countersigned receipt).
fn session_of(request: &SessionRequest) -> Option<SessionId> {
    match request {
        SessionRequest::Open { session, .. }
        | SessionRequest::Forward { session, .. }
        | SessionRequest::Close { session }
        | SessionRequest::Rewind { session, .. }
        | SessionRequest::Step { session, .. }
        | SessionRequest::Push { session, .. } => Some(*session),
        SessionRequest::Countersigned { .. } => None,
    }
}
