//! Whole peers for the binaries: a bootstrap, and a server announcing a span.

use std::future::Future;
use std::time::Duration;

use super::{reachability, Announcement, Client, Event, P2pError, Peer};

/// How long a clean shutdown may spend withdrawing the announcement.
const UNANNOUNCE_TIMEOUT: Duration = Duration::from_secs(8);

/// Runs a bootstrap peer until `shutdown` resolves: it answers DHT queries, stores and
/// validates records, and relays heartbeats. Session requests are refused (it serves no model).
pub async fn run_bootstrap(peer: Peer, shutdown: impl Future<Output = ()>) -> Result<(), P2pError> {
    drive(peer, shutdown, |_, event| {
        if let Event::InboundRequest { peer, .. } = event {
            tracing::debug!(%peer, "bootstrap peers serve no sessions: request dropped");
        }
    })
    .await
}

/// Announces `ann` (DHT + heartbeats), hands every [`Event`] to `on_event` until `shutdown`
/// resolves, then withdraws the announcement and stops the peer.
///
/// `on_event` must not block for long: to serve a request, spawn a task with the
/// [`Client`] clone it receives and answer through [`Client::respond`].
pub async fn serve(
    peer: Peer,
    ann: Announcement,
    shutdown: impl Future<Output = ()>,
    on_event: impl FnMut(&Client, Event),
) -> Result<(), P2pError> {
    peer.client.announce(ann).await?;
    let checker = tokio::spawn(report_reachability(peer.client.clone()));
    let result = drive(peer, shutdown, on_event).await;
    checker.abort();
    result
}

/// With a declared public address, asks a peer to dial it back and logs the verdict loudly.
async fn report_reachability(client: Client) {
    // Give the bootstrap connections a moment to come up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    match client.check_reachability().await {
        Ok(reports) => {
            for r in reports {
                if r.reachable {
                    tracing::info!(addr = %r.addr, by = %r.checked_by, "public address reachable");
                } else {
                    tracing::warn!(
                        "!!! public address {} is NOT reachable from peer {} ({}): this node \
                         will not be reachable by real clients !!!\n{}",
                        r.addr,
                        r.checked_by,
                        r.detail,
                        reachability::troubleshooting(&r.addr)
                    );
                }
            }
        }
        Err(e) => tracing::warn!("could not check the public address: {e}"),
    }
}

async fn drive(
    mut peer: Peer,
    shutdown: impl Future<Output = ()>,
    mut on_event: impl FnMut(&Client, Event),
) -> Result<(), P2pError> {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            event = peer.events.recv() => match event {
                Some(event) => {
                    on_event(&peer.client, event);
                    // A handler may work a while (a node serves small steps inline): give
                    // the thread back between events, or a queue that never empties keeps
                    // this task from being stopped and from sharing its worker.
                    tokio::task::yield_now().await;
                }
                None => return Err(P2pError::Closed),
            },
        }
    }
    tracing::info!("shutting down");
    match tokio::time::timeout(UNANNOUNCE_TIMEOUT, peer.client.unannounce()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("withdrawing the announcement: {e}"),
        Err(_) => tracing::warn!("withdrawing the announcement timed out"),
    }
    peer.client.shutdown().await?;
    let _ = peer.task.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use tokio::sync::mpsc;

    use super::super::{spawn, Event, Role};
    use super::drive;
    use crate::local_mesh::loopback_config;
    use crate::types::ModelId;

    /// A handler that works a while per event (a node serving small steps inline) must
    /// not keep its task from being stopped while events keep coming: a crashed node in
    /// the tests (an aborted task) served five more steps before this held.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_handler_is_stopped_at_its_next_event() {
        let mut peer = spawn(loopback_config(Role::Client, Vec::new()))
            .await
            .unwrap();
        let (tx, events) = mpsc::channel(256);
        peer.events = events;
        let who = peer.client.local_peer_id();
        let feeder = tokio::spawn(async move {
            while tx
                .send(Event::ServerDown {
                    peer: who,
                    model: ModelId::new("m"),
                })
                .await
                .is_ok()
            {}
        });
        let handled = Arc::new(AtomicU64::new(0));
        let counter = handled.clone();
        let task = tokio::spawn(drive(peer, std::future::pending(), move |_, _| {
            let until = Instant::now() + Duration::from_millis(1);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        tokio::time::sleep(Duration::from_millis(30)).await;
        task.abort();
        let at_abort = handled.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(60)).await;
        let after = handled.load(Ordering::SeqCst) - at_abort;
        feeder.abort();
        assert!(at_abort > 0, "the handler never ran");
        assert!(
            after <= 2,
            "{after} events handled after the task was stopped"
        );
    }
}
