//! A span server on a real swarm whose answers a test may alter or hold back, as a
//! cheating or slow provider would: every request is decoded and handed to `answer`, and
//! what it returns goes back to the peer.

use std::future::Future;

use mesh_core::p2p::{self, Announcement, Event, PeerId};
use mesh_core::pipeline::{SessionRequest, SessionResponse};
use mesh_core::wire;
use tokio::sync::oneshot;

/// Serve `peer` under `ann` until the returned sender is used (or dropped).
pub fn serve<F, Fut>(peer: p2p::Peer, ann: Announcement, answer: F) -> oneshot::Sender<()>
where
    F: Fn(PeerId, SessionRequest) -> Fut + Send + 'static,
    Fut: Future<Output = SessionResponse> + Send + 'static,
{
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(p2p::serve(
        peer,
        ann,
        async {
            let _ = stopped.await;
        },
        move |client, event| {
            let Event::InboundRequest {
                peer,
                request,
                channel,
            } = event
            else {
                return;
            };
            let request: SessionRequest = wire::decode(&request, wire::FRAME_LIMIT).unwrap();
            let (client, answered) = (client.clone(), answer(peer, request));
            tokio::spawn(async move {
                let response = answered.await;
                let _ = client
                    .respond(channel, wire::encode(&response).unwrap())
                    .await;
            });
        },
    ));
    stop
}
