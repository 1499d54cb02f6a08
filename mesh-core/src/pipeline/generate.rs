//! Generation over a chain of servers: the client embeds, the servers run the blocks,
//! the client applies the LM head and samples.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

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
}

/// Drive `generation` to the end through `session`; `on_token` sees each token as it is
/// chosen.
pub async fn generate(
    head: &ClientHead,
    session: &mut RemoteSession,
    generation: &mut Generation,
    mut on_token: impl FnMut(TokenEvent),
) -> Result<(), PipelineError> {
    run(head, session, generation, |event| {
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
    run(head, session, generation, |event| {
        let tokens = tokens.clone();
        async move { tokens.send(event).await.is_ok() }
    })
    .await
}

async fn run<F: Future<Output = bool>>(
    head: &ClientHead,
    session: &mut RemoteSession,
    generation: &mut Generation,
    mut on_token: impl FnMut(TokenEvent) -> F,
) -> Result<(), PipelineError> {
    while let Some((input, start)) = generation.next_input() {
        let started = Instant::now();
        let hidden = head.embed(input)?;
        let out = session.step(hidden, start as u32).await?;
        let logits = head.last_logits(&out)?;
        if let Some(token) = generation.accept_logits(&logits) {
            let event = TokenEvent {
                token,
                index: generation.generated().len() - 1,
                latency: started.elapsed(),
                route: session.route(),
            };
            if !on_token(event).await {
                break;
            }
        }
    }
    Ok(())
}
