//! Session streams between real swarms on 127.0.0.1: small requests share one long-lived
//! stream and their answers come back by id in any order; a request the server drops fails
//! at once; large requests, and requesters that turned streams off, go by request-response;
//! a raw peer that opens too many streams or sends a frame that is not a request is cut
//! off, and the server goes on answering.

mod common;

use common::wait_stats;

use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::{noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder};
use mesh_core::identity::Identity;
use mesh_core::p2p::codec::{read_tagged, write_tagged, FrameKind};
use mesh_core::p2p::stream::{MAX_STREAMED_REQUEST, MAX_STREAMS_PER_PEER};
use mesh_core::p2p::{self, Event, P2pConfig, Role, STREAM_PROTOCOL};

const LIMIT: Duration = Duration::from_secs(20);

fn local() -> Multiaddr {
    "/ip4/127.0.0.1/tcp/0".parse().unwrap()
}

/// A server that answers each request with its bytes reversed; a request starting with
/// `slow` after 400 ms, and one that is `drop` never.
async fn echo_server() -> (p2p::Peer, tokio::task::JoinHandle<()>) {
    let mut cfg = P2pConfig::new(Identity::generate(), Role::Server);
    cfg.listen = vec![local()];
    let mut server = p2p::spawn(cfg).await.unwrap();
    let client = server.client.clone();
    let events = std::mem::replace(&mut server.events, tokio::sync::mpsc::channel(1).1);
    let task = tokio::spawn(answer_all(client, events));
    (server, task)
}

async fn answer_all(client: p2p::Client, mut events: tokio::sync::mpsc::Receiver<Event>) {
    while let Some(event) = events.recv().await {
        let Event::InboundRequest {
            request, channel, ..
        } = event
        else {
            continue;
        };
        if request == b"drop" {
            continue;
        }
        let client = client.clone();
        tokio::spawn(async move {
            if request.starts_with(b"slow") {
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            let reply: Vec<u8> = request.iter().rev().copied().collect();
            let _ = client.respond(channel, reply).await;
        });
    }
}

async fn requester(server: &p2p::Peer, streams: bool) -> p2p::Peer {
    let mut cfg = P2pConfig::new(Identity::generate(), Role::Client);
    cfg.bootstrap = server.listen_addrs.clone();
    cfg.request_timeout = Duration::from_secs(30);
    cfg.session_streams = streams;
    p2p::spawn(cfg).await.unwrap()
}

fn reversed(bytes: &[u8]) -> Vec<u8> {
    bytes.iter().rev().copied().collect()
}

#[tokio::test]
async fn small_requests_share_one_stream_and_answers_come_back_by_id() {
    let (server, echo) = echo_server().await;
    let server_id = server.client.local_peer_id();
    let client = requester(&server, true).await;

    for i in 0..20u8 {
        let got = client
            .client
            .request(server_id, vec![i, 1, 2])
            .await
            .unwrap();
        assert_eq!(got, vec![2, 1, i]);
    }
    let stats = client.client.stats().await.unwrap().streams;
    assert_eq!((stats.opened, stats.requests), (1, 20), "{stats:?}");
    assert_eq!(server.client.stats().await.unwrap().streams.accepted, 1);

    // A slow answer does not hold up a later request's: the stream matches answers to
    // requests by id, not by order.
    let slow = tokio::spawn({
        let client = client.client.clone();
        async move { client.request(server_id, b"slow one".to_vec()).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let fast = client.client.request(server_id, b"fast".to_vec()).await;
    assert_eq!(fast.unwrap(), b"tsaf");
    assert!(!slow.is_finished(), "the slow answer came first");
    assert_eq!(slow.await.unwrap().unwrap(), reversed(b"slow one"));

    // A request the server drops fails at once, not after the 30 s request timeout.
    let asked = Instant::now();
    let dropped = client.client.request(server_id, b"drop".to_vec()).await;
    assert!(dropped.is_err(), "{dropped:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );

    // Over the streamed size: request-response, on its own substream.
    let big = vec![3u8; MAX_STREAMED_REQUEST + 1];
    assert_eq!(
        client.client.request(server_id, big.clone()).await.unwrap(),
        big
    );
    let stats = client.client.stats().await.unwrap().streams;
    assert_eq!((stats.opened, stats.requests), (1, 22), "{stats:?}");
    echo.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_first_requests_at_once_open_one_stream_and_all_are_answered() {
    let (server, echo) = echo_server().await;
    let server_id = server.client.local_peer_id();
    let client = requester(&server, true).await;
    // More at once than a server lets one peer open streams: each must still be answered.
    let asks = (0..3 * MAX_STREAMS_PER_PEER as u8).map(|i| {
        let client = client.client.clone();
        tokio::spawn(async move { client.request(server_id, vec![i, 7]).await })
    });
    for (i, answer) in futures::future::join_all(asks)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(answer.unwrap().unwrap(), vec![7, i as u8]);
    }
    let stats = client.client.stats().await.unwrap().streams;
    assert_eq!(stats.opened, 1, "{stats:?}");
    let served = server.client.stats().await.unwrap().streams;
    assert_eq!((served.accepted, served.refused), (1, 0), "{served:?}");
    echo.abort();
}

#[tokio::test]
async fn a_requester_with_streams_off_asks_by_request_response() {
    let (server, echo) = echo_server().await;
    let server_id = server.client.local_peer_id();
    let client = requester(&server, false).await;
    for i in 0..5u8 {
        let got = client.client.request(server_id, vec![i, 9]).await.unwrap();
        assert_eq!(got, vec![9, i]);
    }
    let stats = client.client.stats().await.unwrap().streams;
    assert_eq!((stats.opened, stats.requests), (0, 0), "{stats:?}");
    assert_eq!(server.client.stats().await.unwrap().streams.accepted, 0);
    echo.abort();
}

#[tokio::test]
async fn a_notice_reaches_the_server_unanswered_and_without_a_stream_comes_back() {
    let mut cfg = P2pConfig::new(Identity::generate(), Role::Server);
    cfg.listen = vec![local()];
    let mut server = p2p::spawn(cfg).await.unwrap();
    let server_id = server.client.local_peer_id();
    let (seen_tx, mut seen) = tokio::sync::mpsc::channel(16);
    let responder = server.client.clone();
    let mut events = std::mem::replace(&mut server.events, tokio::sync::mpsc::channel(1).1);
    let serving = tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if let Event::InboundRequest {
                request, channel, ..
            } = event
            {
                let _ = seen_tx
                    .send((request.clone(), channel.wants_answer()))
                    .await;
                if request != b"drop" {
                    // Answering a notice writes nothing.
                    let _ = responder.respond(channel, reversed(&request)).await;
                }
            }
        }
    });
    let client = requester(&server, true).await;

    // The first request opens the stream; notices then go on it.
    assert_eq!(
        client
            .client
            .request(server_id, b"ab".to_vec())
            .await
            .unwrap(),
        b"ba"
    );
    assert_eq!(seen.recv().await.unwrap(), (b"ab".to_vec(), true));
    for notice in [&b"push 1"[..], b"drop", b"push 2"] {
        client
            .client
            .notify(server_id, notice.to_vec())
            .await
            .unwrap();
        let got = tokio::time::timeout(LIMIT, seen.recv()).await.unwrap();
        assert_eq!(got.unwrap(), (notice.to_vec(), false));
    }
    // Nothing came back for them: a request after them gets its own answer, not theirs
    // (a stray answer or "unanswered" frame would be read as this request's).
    assert_eq!(
        client
            .client
            .request(server_id, b"cd".to_vec())
            .await
            .unwrap(),
        b"dc"
    );
    assert_eq!(seen.recv().await.unwrap(), (b"cd".to_vec(), true));
    let stats = client.client.stats().await.unwrap().streams;
    assert_eq!(
        (stats.opened, stats.requests, stats.notices),
        (1, 2, 3),
        "{stats:?}"
    );

    // A requester with streams off gets its notice back, to send as a request.
    let off = requester(&server, false).await;
    let back = off.client.notify(server_id, b"push 3".to_vec()).await;
    assert_eq!(back, Err(b"push 3".to_vec()));
    serving.abort();
}

/// Two servers that dial each other at once hold two connections, which gossipsub keeps
/// alive for good, and no session stream opens between peers with two connections: their
/// steps and pushes went by request-response for the life of the pair. One of the two
/// is closed once it lasted, and a stream opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_that_dial_each_other_at_once_keep_one_connection_and_stream() {
    let (a, echo_a) = echo_server().await;
    let (b, echo_b) = echo_server().await;
    // What a dial at once from each side leaves (at once, one of the two handshakes may
    // fail instead): a connection each peer dialed. Without its `/p2p` part the second
    // dial is made though the peer is connected.
    a.client.dial(b.listen_addrs[0].clone()).await.unwrap();
    let mut a_addr = a.listen_addrs[0].clone();
    a_addr.pop();
    b.client.dial(a_addr).await.unwrap();
    for peer in [&a, &b] {
        wait_stats(&peer.client, "two connections to one peer", |s| {
            s.connected_peers == 1 && s.connections == 2
        })
        .await;
    }
    for peer in [&a, &b] {
        wait_stats(&peer.client, "one connection left", |s| {
            s.connected_peers == 1 && s.connections == 1
        })
        .await;
    }
    let b_id = b.client.local_peer_id();
    assert_eq!(
        a.client.request(b_id, vec![1, 2]).await.unwrap(),
        vec![2, 1]
    );
    let stats = a.client.stats().await.unwrap().streams;
    assert_eq!((stats.opened, stats.requests), (1, 1), "{stats:?}");
    echo_a.abort();
    echo_b.abort();
}

#[derive(libp2p::swarm::NetworkBehaviour)]
struct Raw {
    stream: libp2p_stream::Behaviour,
}

fn raw_swarm() -> Swarm<Raw> {
    SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| Raw {
            stream: libp2p_stream::Behaviour::new(),
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// Dials `server` from a raw swarm driven in the background; its stream control.
async fn raw_peer_of(server: &p2p::Peer) -> (libp2p_stream::Control, PeerId) {
    let mut swarm = raw_swarm();
    let control = swarm.behaviour().stream.new_control();
    let server_id = server.client.local_peer_id();
    swarm.dial(server.listen_addrs[0].clone()).unwrap();
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    (control, server_id)
}

#[tokio::test]
async fn a_raw_peer_over_the_stream_limits_or_sending_garbage_is_cut_off() {
    let (server, echo) = echo_server().await;
    let (mut control, server_id) = raw_peer_of(&server).await;
    let protocol: StreamProtocol = STREAM_PROTOCOL;
    let mut open = Vec::new();
    for _ in 0..MAX_STREAMS_PER_PEER + 2 {
        let stream = tokio::time::timeout(LIMIT, control.open_stream(server_id, protocol.clone()))
            .await
            .expect("open in time")
            .expect("stream");
        open.push(stream);
    }
    let stats = wait_stats(&server.client, "streams over the limit refused", |s| {
        s.streams.refused >= 2
    })
    .await;
    assert_eq!(
        stats.streams.accepted as usize, MAX_STREAMS_PER_PEER,
        "{stats:?}"
    );

    // A well-formed request on an admitted stream is answered under its id...
    let mut first = open.remove(0);
    write_tagged(&mut first, 41, FrameKind::Request, b"xyz", 1024)
        .await
        .unwrap();
    let answer = tokio::time::timeout(LIMIT, read_tagged(&mut first, 1024))
        .await
        .expect("answer in time")
        .unwrap();
    assert_eq!(answer, (41, FrameKind::Answer, b"zyx".to_vec()));

    // ...an answer sent as if it were a request closes the stream...
    write_tagged(&mut first, 42, FrameKind::Answer, b"nope", 1024)
        .await
        .unwrap();
    let closed = tokio::time::timeout(LIMIT, read_tagged(&mut first, 1024))
        .await
        .expect("closed in time");
    assert!(closed.is_err(), "{closed:?}");

    // ...and so does a length over the server's frame limit, before any body is read.
    let mut second = open.remove(0);
    futures::AsyncWriteExt::write_all(&mut second, &u32::MAX.to_be_bytes())
        .await
        .unwrap();
    let closed = tokio::time::timeout(LIMIT, read_tagged(&mut second, 1024))
        .await
        .expect("closed in time");
    assert!(closed.is_err(), "{closed:?}");

    // The server goes on answering others.
    let client = requester(&server, true).await;
    let got = client
        .client
        .request(server_id, b"ok".to_vec())
        .await
        .unwrap();
    assert_eq!(got, b"ko");
    assert_eq!(client.client.stats().await.unwrap().streams.requests, 1);
    echo.abort();
}
