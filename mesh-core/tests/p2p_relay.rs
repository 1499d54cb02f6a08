//! Circuit relay v2 between real swarms in one process on 127.0.0.1: a server reserves
//! on a bootstrap's relay and answers sessions over a circuit, and the relay holds its
//! limits (reservations, bytes per circuit), refusing and counting what is beyond them
//! while it keeps serving the rest; a relayed session moves to a direct connection;
//! `--upnp` without a router says so; and public peers probing each other with AutoNAT
//! stay public without piling up dial-back connections. (Network namespaces, where the
//! client has no route to the server at all, are in `mesh-node/tests/nat.rs`.)

mod common;

use common::wait_stats;

use std::time::{Duration, Instant};

use mesh_core::identity::Identity;
use mesh_core::p2p::{
    self, Event, Multiaddr, NatReport, P2pConfig, PeerId, Reach, RelayLimits, RelayMode, Role,
};

const LIMIT: Duration = Duration::from_secs(30);

/// A free loopback TCP port (bound and released: the relay must know its address before
/// it starts, to announce it).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A bootstrap whose relay has `limits`.
async fn relay(limits: RelayLimits) -> p2p::Peer {
    let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{}", free_port())
        .parse()
        .unwrap();
    let mut cfg = P2pConfig::new(Identity::generate(), Role::Bootstrap);
    cfg.listen = vec![addr.clone()];
    // A relay serves only once it has an address it is reachable at.
    cfg.public_addrs = vec![addr];
    cfg.nat.relay_server = Some(limits);
    p2p::spawn(cfg).await.unwrap()
}

/// A server that reserves on `relay` from the start and echoes session requests reversed.
/// Without `listen` it has no address of its own: like a machine behind NAT, it can be
/// reached only through the relay.
async fn relayed_server(
    relay: &p2p::Peer,
    listen: bool,
) -> (p2p::Client, PeerId, tokio::task::JoinHandle<()>) {
    let mut cfg = P2pConfig::new(Identity::generate(), Role::Server);
    if listen {
        cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    }
    cfg.bootstrap = relay.listen_addrs.clone();
    cfg.nat.relay_mode = RelayMode::Always;
    let mut peer = p2p::spawn(cfg).await.unwrap();
    let client = peer.client.clone();
    let id = client.local_peer_id();
    let echo = tokio::spawn(async move {
        while let Some(event) = peer.events.recv().await {
            if let Event::InboundRequest {
                request, channel, ..
            } = event
            {
                let reply: Vec<u8> = request.iter().rev().copied().collect();
                let _ = peer.client.respond(channel, reply).await;
            }
        }
    });
    (client, id, echo)
}

/// A client that knows nobody: it reaches the server only at the circuit address.
async fn lone_client() -> p2p::Peer {
    let mut cfg = P2pConfig::new(Identity::generate(), Role::Client);
    cfg.request_timeout = Duration::from_secs(10);
    p2p::spawn(cfg).await.unwrap()
}

async fn wait_nat(
    client: &p2p::Client,
    what: &str,
    pred: impl Fn(&NatReport) -> bool,
) -> NatReport {
    common::wait_until(
        what,
        LIMIT,
        || async { client.nat_report().await.unwrap() },
        pred,
    )
    .await
}

#[tokio::test]
async fn a_server_answers_sessions_through_a_relay_circuit() {
    let relay = relay(RelayLimits::default()).await;
    let (server, server_id, echo) = relayed_server(&relay, false).await;
    let report = wait_nat(&server, "a reservation", |r| !r.relay_addrs.is_empty()).await;
    assert_eq!(report.reach, Reach::Relayed, "{report:?}");
    let circuit: Multiaddr = report.relay_addrs[0].parse().unwrap();
    assert!(p2p::nat::is_relayed(&circuit));
    assert_eq!(p2p::nat::target_peer(&circuit), Some(server_id));
    // The circuit address goes out in the server's announcement.
    let announced = server.announce_addrs().await.unwrap();
    assert!(announced.iter().any(p2p::nat::is_relayed), "{announced:?}");

    let client = lone_client().await;
    client.client.dial(circuit).await.unwrap();
    let got = client
        .client
        .request(server_id, b"through the relay".to_vec())
        .await
        .unwrap();
    assert_eq!(got, b"yaler eht hguorht");
    let stats = wait_stats(&relay.client, "a relayed circuit", |s| {
        s.relay.circuits_accepted >= 1
    })
    .await;
    assert_eq!(stats.relay.reservations_accepted, 1, "{stats:?}");
    // Both ends count the session bytes that went through the relay.
    let sent = client.client.stats().await.unwrap().relay;
    assert_eq!(sent.relayed_bytes_sent, 17, "{sent:?}");
    assert_eq!(sent.relayed_bytes_received, 17, "{sent:?}");
    let served = server.stats().await.unwrap().relay;
    assert_eq!(served.relayed_bytes_received, 17, "{served:?}");
    client.client.shutdown().await.unwrap();
    echo.abort();
}

#[tokio::test]
async fn a_relay_refuses_and_counts_what_is_beyond_its_limits_and_serves_the_rest() {
    let relay = relay(RelayLimits {
        max_reservations: 1,
        max_circuit_bytes: 64 * 1024,
        ..RelayLimits::default()
    })
    .await;
    let (first, first_id, echo1) = relayed_server(&relay, false).await;
    let report = wait_nat(&first, "a reservation", |r| !r.relay_addrs.is_empty()).await;
    // A second server asks for a reservation beyond max_reservations: refused, counted
    // on both sides, and it does not get a relay address.
    let (second, _, echo2) = relayed_server(&relay, false).await;
    let refused = wait_stats(&second, "the refusal", |s| {
        s.relay.own_reservations_refused >= 1
    })
    .await;
    assert_eq!(refused.relay.own_reservations, 0);
    assert!(second.nat_report().await.unwrap().relay_addrs.is_empty());
    let counted = wait_stats(&relay.client, "the relay's count", |s| {
        s.relay.reservations_refused >= 1
    })
    .await;
    assert_eq!(counted.relay.reservations_accepted, 1, "{counted:?}");

    // The first keeps being served through the relay...
    let circuit: Multiaddr = report.relay_addrs[0].parse().unwrap();
    let client = lone_client().await;
    client.client.dial(circuit.clone()).await.unwrap();
    let got = client
        .client
        .request(first_id, vec![1, 2, 3])
        .await
        .unwrap();
    assert_eq!(got, vec![3, 2, 1]);
    // ...until a circuit carries more than max_circuit_bytes: the relay cuts it and
    // counts it, and the requests on it fail rather than hang.
    let mut failed = false;
    for _ in 0..16 {
        if client
            .client
            .request(first_id, vec![7u8; 16 * 1024])
            .await
            .is_err()
        {
            failed = true;
            break;
        }
    }
    assert!(failed, "the relay carried more than its byte limit");
    let cut = wait_stats(&relay.client, "the cut circuit", |s| {
        s.relay.circuits_cut_bytes >= 1
    })
    .await;
    println!("relay counters: {:?}", cut.relay);
    // A new circuit gets a new budget: the server is still reachable.
    let deadline = Instant::now() + LIMIT;
    while client
        .client
        .connected_peers()
        .await
        .unwrap()
        .contains(&first_id)
    {
        assert!(Instant::now() < deadline, "the cut circuit stays connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.client.dial(circuit).await.unwrap();
    let again = client.client.request(first_id, vec![4, 5]).await.unwrap();
    assert_eq!(again, vec![5, 4]);
    client.client.shutdown().await.unwrap();
    echo1.abort();
    echo2.abort();
}

#[tokio::test]
async fn a_relayed_session_moves_to_a_direct_connection_when_one_can_be_made() {
    let relay = relay(RelayLimits::default()).await;
    // This server has a direct address too (loopback): DCUtR, or the periodic direct
    // dial, can reach it.
    let (server, server_id, echo) = relayed_server(&relay, true).await;
    let report = wait_nat(&server, "a reservation", |r| !r.relay_addrs.is_empty()).await;
    let mut cfg = P2pConfig::new(Identity::generate(), Role::Client);
    cfg.request_timeout = Duration::from_secs(10);
    // A lab on one machine: the periodic direct dial may use the server's loopback
    // address when the hole punch (timing-sensitive under load) fails.
    cfg.nat.autonat_private_ips = true;
    let client = p2p::spawn(cfg).await.unwrap();
    // The client knows only the circuit address.
    client
        .client
        .dial(report.relay_addrs[0].parse().unwrap())
        .await
        .unwrap();
    let got = client.client.request(server_id, vec![1, 2]).await.unwrap();
    assert_eq!(got, vec![2, 1]);
    let moved = wait_stats(&client.client, "the move to a direct connection", |s| {
        s.relay.moved_to_direct >= 1
    })
    .await;
    println!("client counters: {:?}", moved.relay);
    // The relayed connection is gone and the session continues directly.
    let relayed_closed = wait_stats(&relay.client, "the circuit to close", |s| {
        s.relay.circuits_closed >= 1 && s.relay.circuits_open == 0
    })
    .await;
    assert_eq!(relayed_closed.relay.circuits_accepted, 1);
    let got = client.client.request(server_id, vec![3, 4]).await.unwrap();
    assert_eq!(got, vec![4, 3]);
    let after = relay.client.stats().await.unwrap();
    assert_eq!(
        after.relay.circuits_accepted, 1,
        "a new circuit was opened: {after:?}"
    );
    client.client.shutdown().await.unwrap();
    echo.abort();
}

/// `--upnp` on a machine with no UPnP router (this one has no LAN gateway): the node
/// says so instead of staying silent, and keeps working.
#[tokio::test]
async fn upnp_without_a_router_says_so() {
    let mut cfg = P2pConfig::new(Identity::generate(), Role::Server);
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    cfg.nat.upnp = true;
    let peer = p2p::spawn(cfg).await.unwrap();
    let first = peer.client.nat_report().await.unwrap();
    assert!(
        matches!(
            first.upnp,
            p2p::UpnpState::Searching | p2p::UpnpState::NoGateway
        ),
        "{first:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let report = loop {
        let r = peer.client.nat_report().await.unwrap();
        if r.upnp != p2p::UpnpState::Searching {
            break r;
        }
        assert!(Instant::now() < deadline, "UPnP never answered: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(report.upnp, p2p::UpnpState::NoGateway, "{report:?}");
    assert!(report.summary().contains("UPnP: no router answered"));
    peer.client.shutdown().await.unwrap();
}

/// A peer with AutoNAT probes every 50 ms until sure (a production peer waits 5 s), on
/// loopback (private addresses allowed), knowing `bootstrap`.
async fn probing_peer(role: Role, bootstrap: &[Multiaddr]) -> p2p::Peer {
    let mut cfg = P2pConfig::new(Identity::generate(), role);
    let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{}", free_port())
        .parse()
        .unwrap();
    cfg.listen = vec![addr.clone()];
    cfg.public_addrs = vec![addr];
    cfg.bootstrap = bootstrap.to_vec();
    cfg.nat.autonat_private_ips = true;
    cfg.nat.autonat_boot_delay = Duration::from_millis(50);
    cfg.nat.direct_retry = Duration::from_millis(50);
    p2p::spawn(cfg).await.unwrap()
}

/// Regression (CI, `nat.rs`: a provider never became public again): every AutoNAT
/// dial-back opened a connection that stayed open (gossipsub keeps a mesh peer's
/// connections alive) until the per-peer connection limit denied the next dial-back, and
/// public peers were then told they were behind NAT. Public peers that keep probing each
/// other stay public and hold about one connection per peer.
#[tokio::test]
async fn public_peers_probing_each_other_stay_public_with_one_connection_each() {
    let boot = probing_peer(Role::Bootstrap, &[]).await;
    let mut peers = vec![boot];
    for _ in 0..2 {
        let p = probing_peer(Role::Server, &peers[0].listen_addrs).await;
        peers.push(p);
    }
    for p in &peers {
        wait_nat(&p.client, "AutoNAT to say public", |r| {
            r.reach == Reach::Public
        })
        .await;
    }
    // Probes go on (every 1.5-3 s once sure, 50 ms while a verdict is doubted): more
    // dial-backs than the per-peer limit of 4 connections over the window.
    // A dial-back lives from its connection to its answer, so a sample may catch one;
    // what must not happen is that they stay. Each peer's fewest extra connections over
    // the last second of the window must be at most one.
    let until = Instant::now() + Duration::from_secs(12);
    let mut extra: Vec<Vec<usize>> = vec![Vec::new(); peers.len()];
    while Instant::now() < until {
        for (i, p) in peers.iter().enumerate() {
            let r = p.client.nat_report().await.unwrap();
            assert_eq!(
                r.reach,
                Reach::Public,
                "peer {i} lost its public verdict: {r:?}"
            );
            let s = p.client.stats().await.unwrap();
            extra[i].push(s.connections.saturating_sub(s.connected_peers));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (i, seen) in extra.iter().enumerate() {
        let last_second = &seen[seen.len().saturating_sub(10)..];
        let fewest = last_second.iter().copied().min().unwrap_or(0);
        let most = seen.iter().copied().max().unwrap_or(0);
        println!("peer {i}: extra connections over the last second {last_second:?}, most {most}");
        assert!(
            fewest <= 1,
            "peer {i}: dial-back connections pile up: {last_second:?} extra over the last second"
        );
    }
    for p in peers {
        p.client.shutdown().await.unwrap();
    }
}
