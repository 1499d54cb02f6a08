//! Generation over a chain of servers: the client embeds, the servers run the blocks,
//! the client applies the LM head and samples.

use std::collections::VecDeque;
use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::speculative::DraftState;
use super::{Hop, PipelineError, RemoteSession};
use crate::model::{ClientHead, Generation};

/// One generated token and how it was made.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenEvent {
    pub token: u32,
    /// Index of the token among the generated ones.
    pub index: usize,
    /// Wall time of the step that produced it (the prefill for the first token).
    pub latency: Duration,
    /// The servers the step went through.
    pub route: Vec<Hop>,
    /// What the session had countersigned when the token was released, in micro-units
    /// ([`RemoteSession::countersigned_amount`]): receipts are the one record of cost.
    /// It lags the work (receipts come every few positions, and while checking only when
    /// a hop ends); the whole cost is in [`RemoteSession::close`]'s report.
    pub cost_so_far: u64,
}

/// Drive `generation` to the end through `session`; `on_token` sees each token as it is
/// chosen.
pub async fn generate(
    head: &ClientHead,
    session: &mut RemoteSession,
    generation: &mut Generation,
    mut on_token: impl FnMut(TokenEvent),
) -> Result<(), PipelineError> {
    run(head, session, generation, None, |event| {
        on_token(event);
        std::future::ready(true)
    })
    .await
}

/// Like [`generate`], but tokens go into a bounded channel: a slow reader slows the
/// generation down, and a reader that went away (receiver dropped) stops it.
pub async fn generate_into(
    head: &ClientHead,
    session: &mut RemoteSession,
    generation: &mut Generation,
    tokens: &mpsc::Sender<TokenEvent>,
) -> Result<(), PipelineError> {
    run(head, session, generation, None, |event| {
        let tokens = tokens.clone();
        async move { tokens.send(event).await.is_ok() }
    })
    .await
}

/// The generation loop, with a draft proposing tokens when there is one. With checking
/// on, a token is shown only once every hop's answer behind it was confirmed
/// ([`RemoteSession::checked_positions`]), and the generation rewinds to a saved state
/// when a server is caught, so what is shown is always what honest servers give.
pub(super) async fn run<F: Future<Output = bool>>(
    head: &ClientHead,
    session: &mut RemoteSession,
    generation: &mut Generation,
    mut draft: Option<&mut DraftState<'_>>,
    mut on_token: impl FnMut(TokenEvent) -> F,
) -> Result<(), PipelineError> {
    // (positions fed before the step, state then) and (positions behind a token, token).
    let mut saved: Vec<(usize, Generation)> = Vec::new();
    let mut held: VecDeque<(usize, TokenEvent)> = VecDeque::new();
    loop {
        let stepped = match generation.next_input() {
            Some((_, start)) => {
                if session.verifying() {
                    saved.push((start, generation.clone()));
                }
                let started = Instant::now();
                let made = match draft.as_deref_mut() {
                    Some(draft) => draft.step(head, session, generation).await,
                    None => step(head, session, generation)
                        .await
                        .map(|made| made.into_iter().collect()),
                };
                made.map(|made| {
                    // The step's time, shared by the tokens it made.
                    let latency = started.elapsed() / made.len().max(1) as u32;
                    let first = generation.generated().len() - made.len();
                    for (j, (behind, token)) in made.into_iter().enumerate() {
                        let event = TokenEvent {
                            token,
                            index: first + j,
                            latency,
                            route: session.route(),
                            cost_so_far: 0,
                        };
                        held.push_back((behind, event));
                    }
                    false
                })
            }
            None => session.check_all().await.map(|()| true),
        };
        let done = match stepped {
            Ok(done) => done,
            Err(PipelineError::Rewind { position }) => {
                let at = saved
                    .iter()
                    .rposition(|(start, _)| *start == position)
                    .ok_or(PipelineError::Rewind { position })?;
                *generation = saved[at].1.clone();
                saved.truncate(at);
                held.retain(|(behind, _)| *behind <= position);
                if let Some(draft) = draft.as_deref_mut() {
                    draft.rewound(position);
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        let checked = if done {
            usize::MAX
        } else {
            session.checked_positions()
        };
        while held.front().is_some_and(|(behind, _)| *behind <= checked) {
            if let Some((_, mut event)) = held.pop_front() {
                event.cost_so_far = session.countersigned_amount();
                if !on_token(event).await {
                    return Ok(());
                }
            }
        }
        // States before the checked positions are never rewound to again.
        let stale = saved.partition_point(|(start, _)| *start < checked);
        saved.drain(..stale);
        if done {
            return Ok(());
        }
    }
}

/// One step without a draft: the generation's next input through the mesh, one token
/// out, with the number of positions its logits rest on.
async fn step(
    head: &ClientHead,
    session: &mut RemoteSession,
    generation: &mut Generation,
) -> Result<Option<(usize, u32)>, PipelineError> {
    let Some((input, start)) = generation.next_input() else {
        return Ok(None);
    };
    let behind = start + input.len();
    let out = session.step(head.embed(input)?, start as u32).await?;
    let logits = head.last_logits(&out)?;
    Ok(generation
        .accept_logits(&logits)
        .map(|token| (behind, token)))
}
