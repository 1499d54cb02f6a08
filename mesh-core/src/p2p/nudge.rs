//! A stream whose pending writes are polled again every [`NUDGE`], whether or not the
//! stream wakes its writer.
//!
//! Under CPU load, a yamux stream's write (or flush) on a session stream was seen to
//! return `Pending` once and never wake its task again: the request behind it, and every
//! request queued on the stream's write lock after it, waited out their whole 20 s
//! timeout (`pipeline_in_process::ten_concurrent_sessions_all_complete_correctly`, about
//! one run in five under a CPU hog; never by request-response). Polled again, the write
//! sees the stream's real state and goes on. A write that is truly blocked (the peer reads
//! nothing) stays pending and is bounded by its caller's timeout, as before; the nudge
//! costs a timer only while a write waits.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite};

/// How long a pending write waits for its stream's wake-up before it is polled again.
pub const NUDGE: Duration = Duration::from_millis(20);

/// `S` with its pending writes, flushes and closes polled again every [`NUDGE`].
pub struct Nudged<S> {
    inner: S,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Nudged<S> {
    pub fn new(inner: S) -> Self {
        Self { inner, timer: None }
    }

    /// After the inner stream answered `poll`: while it is pending, make sure this task
    /// is woken within [`NUDGE`]; once it is ready, drop the timer.
    fn nudge_while_pending<T>(&mut self, cx: &mut Context<'_>, poll: Poll<T>) -> Poll<T> {
        if poll.is_ready() {
            self.timer = None;
            return poll;
        }
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(NUDGE)));
        if timer.as_mut().poll(cx).is_ready() {
            // This poll is the nudge: re-arm for the next one.
            timer.as_mut().reset(tokio::time::Instant::now() + NUDGE);
            let _ = timer.as_mut().poll(cx);
        }
        poll
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Nudged<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Nudged<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.nudge_while_pending(cx, poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.nudge_while_pending(cx, poll)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_close(cx);
        self.nudge_while_pending(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use futures::AsyncWriteExt as _;

    use super::*;

    /// A writer that answers its first `lost` polls `Pending` without ever waking the
    /// task (a lost wake-up), then takes everything; it counts its polls.
    struct LosesWakeups {
        lost: usize,
        polls: Arc<AtomicUsize>,
        written: Vec<u8>,
    }

    impl AsyncWrite for LosesWakeups {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.polls.fetch_add(1, Ordering::Relaxed) < self.lost {
                return Poll::Pending;
            }
            self.written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn writer(lost: usize) -> (LosesWakeups, Arc<AtomicUsize>) {
        let polls = Arc::new(AtomicUsize::new(0));
        let w = LosesWakeups {
            lost,
            polls: polls.clone(),
            written: Vec::new(),
        };
        (w, polls)
    }

    /// Counts the times its task is woken.
    struct Wakes(AtomicUsize);

    impl futures::task::ArcWake for Wakes {
        fn wake_by_ref(me: &Arc<Self>) {
            me.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Polls a write once, waits well past a nudge without polling it, and says how often
    /// its task was woken meanwhile and what a second poll gives.
    async fn poll_wait_poll(w: &mut (impl AsyncWrite + Unpin)) -> (usize, Poll<io::Result<usize>>) {
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = futures::task::waker(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut *w).poll_write(&mut cx, b"frame").is_pending());
        tokio::time::sleep(NUDGE * 5).await;
        let woken = wakes.0.load(Ordering::Relaxed);
        (woken, Pin::new(&mut *w).poll_write(&mut cx, b"frame"))
    }

    #[tokio::test]
    async fn a_write_whose_wakeup_is_lost_is_woken_by_the_nudge() {
        // As the stream was: nothing wakes the task, which waits on forever.
        let (mut bare, _) = writer(1);
        let (woken, _) = poll_wait_poll(&mut bare).await;
        assert_eq!(woken, 0, "a lost wake-up leaves a bare write unwoken");

        // Nudged, the task is woken within a nudge and the write goes on.
        let (w, polls) = writer(1);
        let mut nudged = Nudged::new(w);
        let (woken, second) = poll_wait_poll(&mut nudged).await;
        assert!(woken >= 1, "the nudge wakes the writer");
        assert!(matches!(second, Poll::Ready(Ok(5))), "{second:?}");
        assert_eq!(nudged.inner.written, b"frame");
        assert_eq!(polls.load(Ordering::Relaxed), 2);
        assert!(nudged.timer.is_none(), "no timer once the write is done");
    }

    #[tokio::test]
    async fn a_write_that_stays_blocked_is_polled_every_nudge_not_in_a_loop() {
        let (w, polls) = writer(usize::MAX);
        let mut nudged = Nudged::new(w);
        let waited = NUDGE * 10;
        let blocked = tokio::time::timeout(waited, nudged.write_all(b"frame")).await;
        assert!(
            blocked.is_err(),
            "still pending: the caller's timeout bounds it"
        );
        let n = polls.load(Ordering::Relaxed);
        assert!((2..=12).contains(&n), "{n} polls in {waited:?}");
    }
}
