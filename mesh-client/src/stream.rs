//! The token stream a generation returns, and its account once it ended.
//!
//! Tokens are handed on the moment they are made; what the generation cost is known only
//! after every hop closed with its final receipt, so it is not carried by any token but
//! kept by the stream: [`TokenStream::report`] once the stream ended, or
//! [`TokenStream::finish`] to stop early and wait for it.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures::Stream;
use mesh_core::model::TextStream;
use mesh_core::pipeline::{self, Hop, PipelineError, SessionReport};
use tokio::sync::{mpsc, oneshot};

use crate::ClientError;

/// One streamed token with how it was made.
#[derive(Clone, Debug)]
pub struct Token {
    pub id: u32,
    /// Text this token completes (empty while a multi-byte character is unfinished).
    pub text: String,
    pub latency: Duration,
    /// Servers and blocks of the step that made it.
    pub route: Vec<Hop>,
    /// What this generation had countersigned when the token was shown, in micro-units.
    /// Receipts are the one record of cost, and they come in behind the work (every few
    /// positions, and while checking only when a hop ends), so this lags; the whole cost
    /// is [`SessionReport::countersigned`] in [`TokenStream::report`]. 0 without a ledger.
    pub cost_so_far: u64,
}

/// How the generation task ends: its error, if any, and the closed session's account.
pub(crate) type Outcome = (Result<(), PipelineError>, SessionReport);

/// Tokens as they are generated (a [`Stream`] of `Result<Token, ClientError>`); dropping
/// it cancels the generation. Once it has ended, [`TokenStream::report`] tells what the
/// generation countersigned.
pub struct TokenStream {
    /// `None` once the generation task has let go of its end.
    tokens: Option<mpsc::Receiver<pipeline::TokenEvent>>,
    /// `None` once the generation's end was taken.
    outcome: Option<oneshot::Receiver<Outcome>>,
    text: TextStream,
    report: Option<SessionReport>,
}

impl TokenStream {
    pub(crate) fn new(
        tokens: mpsc::Receiver<pipeline::TokenEvent>,
        outcome: oneshot::Receiver<Outcome>,
        text: TextStream,
    ) -> Self {
        Self {
            tokens: Some(tokens),
            outcome: Some(outcome),
            text,
            report: None,
        }
    }

    /// The generation's account, once the stream has ended (`next()` gave `None`, or an
    /// error): every hop is closed then, so its countersigned total is final. `None` while
    /// tokens may still come.
    pub fn report(&self) -> Option<&SessionReport> {
        self.report.as_ref()
    }

    /// Stop the generation if it still runs (tokens not read yet are dropped), wait until
    /// every hop closed with its final receipt, and return the account. An error the
    /// stream had not handed on yet is dropped too: read the stream to its end to see it.
    pub async fn finish(mut self) -> SessionReport {
        // The generation stops at its next token when nobody can receive it.
        self.tokens = None;
        if let Some(outcome) = self.outcome.take() {
            if let Ok((_, report)) = outcome.await {
                self.report = Some(report);
            }
        }
        self.report.unwrap_or_default()
    }

    fn token(&mut self, event: pipeline::TokenEvent) -> Token {
        Token {
            id: event.token,
            text: self
                .text
                .push(event.token)
                .ok()
                .flatten()
                .unwrap_or_default(),
            latency: event.latency,
            route: event.route,
            cost_so_far: event.cost_so_far,
        }
    }
}

impl Stream for TokenStream {
    type Item = Result<Token, ClientError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        // Each token is handed on as soon as it arrives: nothing waits for the next one.
        if let Some(tokens) = this.tokens.as_mut() {
            match ready!(tokens.poll_recv(cx)) {
                Some(event) => return Poll::Ready(Some(Ok(this.token(event)))),
                None => this.tokens = None,
            }
        }
        // The generation ended; its task sends its end after closing every hop.
        let Some(outcome) = this.outcome.as_mut() else {
            return Poll::Ready(None);
        };
        let ended = ready!(Pin::new(outcome).poll(cx));
        this.outcome = None;
        match ended {
            Ok((result, report)) => {
                this.report = Some(report);
                Poll::Ready(result.err().map(|e| Err(e.into())))
            }
            // The task is gone without an end (it panicked): nothing more to say.
            Err(_) => Poll::Ready(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use mesh_core::model::{tiny, MeshTokenizer};

    fn event(token: u32, cost_so_far: u64) -> pipeline::TokenEvent {
        pipeline::TokenEvent {
            token,
            index: 0,
            latency: Duration::ZERO,
            route: Vec::new(),
            cost_so_far,
        }
    }

    /// A token is handed on while the generation is still running (not held for the next
    /// one), and the account comes after the last token, from the generation's end.
    #[tokio::test]
    async fn tokens_are_not_held_back_and_the_report_comes_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        tiny::write(dir.path()).unwrap();
        let tokenizer = MeshTokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
        let (tx, rx) = mpsc::channel(4);
        let (end_tx, end_rx) = oneshot::channel();
        let mut stream = TokenStream::new(rx, end_rx, TextStream::new(tokenizer, &[1]));
        tx.send(event(72, 0)).await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("the first token waited for the next one")
            .unwrap()
            .unwrap();
        assert_eq!(first.id, 72);
        assert!(stream.report().is_none());
        tx.send(event(105, 6)).await.unwrap();
        drop(tx);
        let mut report = SessionReport::default();
        report.countersigned = 42;
        end_tx.send((Ok(()), report.clone())).unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap().cost_so_far, 6);
        assert!(stream.next().await.is_none());
        assert_eq!(stream.report(), Some(&report));
    }
}
