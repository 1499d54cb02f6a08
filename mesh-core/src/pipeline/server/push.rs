//! Steps whose input another server pushes ([`SessionRequest::Step`] with
//! [`StepInput::PushedBy`]), and the pushes themselves ([`SessionRequest::Push`]).
//!
//! A client sends every server of its route its step at once; the first gets the hidden
//! states, each later one is told which peer will push them. Whichever comes first, the
//! client's step or the push, waits for the other (one of each per session), so the
//! output goes server to server instead of through the client. Nothing is run or billed
//! until the session's own client asked for it and named the pusher: a push from anyone
//! else, or for another position, is refused or left unused.

use std::time::Instant;

use libp2p::PeerId;

use super::{owned, SpanServer, Stepped};
use crate::ledger::attestation::Unsigned;
use crate::pipeline::protocol::{PushTarget, Refusal, SessionRequest, SessionResponse, StepInput};
use crate::types::SessionId;
use crate::wire::WireTensor;

/// What serving one request produced.
#[derive(Debug)]
pub struct Served {
    /// The answer to the request, or that it waits for a push.
    pub reply: Reply,
    /// A step that waited and is answered now: its push came, or its client sent the
    /// input itself (`session` keyed, as the step was).
    pub released: Option<(SessionId, Answer)>,
}

impl Served {
    pub(super) fn now(answer: Answer) -> Self {
        Self {
            reply: Reply::Now(Box::new(answer)),
            released: None,
        }
    }

    /// Every answer this holds: the reply's, if it is answered now, and the released one.
    pub fn answers_mut(&mut self) -> impl Iterator<Item = &mut Answer> {
        let now = match &mut self.reply {
            Reply::Now(answer) => Some(answer.as_mut()),
            Reply::Waits(_) => None,
        };
        now.into_iter()
            .chain(self.released.as_mut().map(|(_, answer)| answer))
    }
}

#[derive(Debug)]
pub enum Reply {
    Now(Box<Answer>),
    /// The client's step for this session waits for its pushed input.
    Waits(SessionId),
}

/// A response, and the push its output makes on to the next server.
#[derive(Debug)]
pub struct Answer {
    pub response: SessionResponse,
    pub push: Option<PushOrder>,
    /// The step's attestation, until [`SpanServer::seal`] signs it into `response`.
    pub(super) unsigned: Option<Unsigned>,
}

impl Answer {
    pub fn plain(response: SessionResponse) -> Self {
        Self {
            response,
            push: None,
            unsigned: None,
        }
    }

    /// A step's answer, its output ordered on to `push_to` (if set and the step ran).
    pub(super) fn pushing(stepped: Stepped, start_pos: u32, push_to: Option<PushTarget>) -> Self {
        let Stepped { response, unsigned } = stepped;
        let push = match (&response, push_to) {
            (SessionResponse::Hidden { hidden, .. }, Some(target)) => Some(PushOrder {
                peer: target.peer,
                request: SessionRequest::Push {
                    session: target.session,
                    start_pos,
                    hidden: hidden.clone(),
                },
            }),
            _ => None,
        };
        Self {
            response,
            push,
            unsigned,
        }
    }
}

/// A [`SessionRequest::Push`] to send to `peer`.
#[derive(Debug)]
pub struct PushOrder {
    pub peer: PeerId,
    pub request: SessionRequest,
}

/// A client's step waiting for its input from `from`.
#[derive(Debug)]
pub(super) struct Waiting {
    pub(super) from: PeerId,
    pub(super) start_pos: u32,
    pub(super) rewind: bool,
    pub(super) push_to: Option<PushTarget>,
}

/// A pushed input that came before the step naming its sender.
#[derive(Debug)]
pub(super) struct EarlyPush {
    from: PeerId,
    start_pos: u32,
    hidden: WireTensor,
}

impl SpanServer {
    /// [`SessionRequest::Step`] from `client`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn step(
        &mut self,
        client: PeerId,
        session: SessionId,
        start_pos: u32,
        rewind: bool,
        input: StepInput,
        push_to: Option<PushTarget>,
        now: Instant,
    ) -> Served {
        let released = self.end_waiting(client, session);
        let Some(state) = owned(&mut self.sessions, client, session) else {
            return self.answered(SessionResponse::Refused(Refusal::UnknownSession));
        };
        let hidden = match input {
            StepInput::Hidden(hidden) => hidden,
            StepInput::PushedBy(from) => match state.early.take() {
                Some(early) if early.from == from && early.start_pos == start_pos => early.hidden,
                _ => {
                    state.waiting = Some(Waiting {
                        from,
                        start_pos,
                        rewind,
                        push_to,
                    });
                    return Served {
                        reply: Reply::Waits(session),
                        released,
                    };
                }
            },
        };
        let answer = self.run_step(client, session, start_pos, rewind, &hidden, push_to, now);
        Served {
            reply: Reply::Now(Box::new(answer)),
            released,
        }
    }

    /// [`SessionRequest::Push`] from `pusher`: run the step waiting for it, or keep it for
    /// the step to come.
    pub(super) fn pushed(
        &mut self,
        pusher: PeerId,
        session: SessionId,
        start_pos: u32,
        hidden: WireTensor,
        now: Instant,
    ) -> Served {
        let Some(state) = self.sessions.get_mut(&session) else {
            return self.answered(SessionResponse::Refused(Refusal::UnknownSession));
        };
        let client = state.usage.client;
        let Some(waiting) = state.waiting.take() else {
            state.early = Some(EarlyPush {
                from: pusher,
                start_pos,
                hidden,
            });
            return Served::now(Answer::plain(SessionResponse::Acknowledged));
        };
        if waiting.from != pusher || waiting.start_pos != start_pos {
            let detail = format!(
                "session {session} waits for position {} from {}, not {start_pos} from {pusher}",
                waiting.start_pos, waiting.from
            );
            state.waiting = Some(waiting);
            return self.answered(SessionResponse::Refused(Refusal::BadRequest(detail)));
        }
        let answer = self.run_step(
            client,
            session,
            start_pos,
            waiting.rewind,
            &hidden,
            waiting.push_to,
            now,
        );
        Served {
            reply: Reply::Now(Box::new(Answer::plain(SessionResponse::Acknowledged))),
            released: Some((session, answer)),
        }
    }

    /// End a step of `client`'s `session` still waiting for its push: its client sent a
    /// newer request of the session (a step, the input itself, or a close).
    pub(super) fn end_waiting(
        &mut self,
        client: PeerId,
        session: SessionId,
    ) -> Option<(SessionId, Answer)> {
        let state = owned(&mut self.sessions, client, session)?;
        state.waiting.take().map(|_| {
            let refusal = Refusal::NoPushedInput("the client sent a newer request".into());
            (session, Answer::plain(SessionResponse::Refused(refusal)))
        })
    }

    /// Forget a waiting step whose client stopped waiting (its request timed out), so a
    /// late push runs nothing nobody reads.
    pub fn cancel_waiting(&mut self, session: SessionId) {
        if let Some(state) = self.sessions.get_mut(&session) {
            state.waiting = None;
        }
    }

    /// Run a step as `Forward` (or `Rewind`) does, and order its output pushed on.
    #[allow(clippy::too_many_arguments)]
    fn run_step(
        &mut self,
        client: PeerId,
        session: SessionId,
        start_pos: u32,
        rewind: bool,
        hidden: &WireTensor,
        push_to: Option<PushTarget>,
        now: Instant,
    ) -> Answer {
        let stepped = if rewind {
            self.rewind(client, session, start_pos, hidden, now)
        } else {
            self.forward(client, session, start_pos, hidden, now)
        };
        if matches!(stepped.response, SessionResponse::Refused(_)) {
            self.stats.refusals += 1;
        }
        Answer::pushing(stepped, start_pos, push_to)
    }
}
