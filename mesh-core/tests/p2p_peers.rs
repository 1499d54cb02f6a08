//! Real swarms in one process on 127.0.0.1: the session protocol, and a hostile raw libp2p
//! peer that sends malformed, oversized, spoofed and stale gossip and DHT records.
//! Every bad input must be rejected and counted, none may crash the peer, and good input
//! sent afterwards must still be accepted.

mod common;

use common::wait_stats;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore, Quorum, Record, RecordKey};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{gossipsub, identify, noise, tcp, yamux, Multiaddr, PeerId, Swarm, SwarmBuilder};
use mesh_core::identity::Identity;
use mesh_core::p2p::dht::{self, ServerRecord};
use mesh_core::p2p::heartbeat::{self, Heartbeat};
use mesh_core::p2p::{self, Announcement, Event, P2pConfig, Role};
use mesh_core::types::{Capability, GpuLive, GpuSummary};
use mesh_core::{wire, BlockRange, ModelId, ServerLoad};

const LIMIT: Duration = Duration::from_secs(20);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn local() -> Multiaddr {
    "/ip4/127.0.0.1/tcp/0".parse().unwrap()
}

async fn server_peer(max_frame: usize) -> p2p::Peer {
    let mut cfg = P2pConfig::new(Identity::generate(), Role::Server);
    cfg.listen = vec![local()];
    cfg.max_frame_bytes = max_frame;
    cfg.heartbeat_interval = Duration::from_secs(1);
    p2p::spawn(cfg).await.unwrap()
}

fn tiny() -> ModelId {
    ModelId::new("tiny")
}

async fn announce_tiny(client: &p2p::Client) {
    client
        .announce(Announcement {
            model: tiny(),
            span: BlockRange::new(0, 4),
            num_blocks: 8,
            price_per_token: 0,
            load: ServerLoad::default(),
            capability: Capability::default(),
            quantization: String::new(),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn session_requests_roundtrip_and_oversized_frames_fail() {
    let mut server = server_peer(1024).await;
    let server_id = server.client.local_peer_id();
    let mut cfg = P2pConfig::new(Identity::generate(), Role::Client);
    cfg.bootstrap = server.listen_addrs.clone();
    cfg.request_timeout = Duration::from_secs(10);
    let client = p2p::spawn(cfg).await.unwrap();

    // Echo server: reverses the bytes.
    let echo = tokio::spawn(async move {
        while let Some(event) = server.events.recv().await {
            if let Event::InboundRequest {
                request, channel, ..
            } = event
            {
                let reply: Vec<u8> = request.iter().rev().copied().collect();
                let _ = server.client.respond(channel, reply).await;
            }
        }
    });
    let got = client
        .client
        .request(server_id, b"abc".to_vec())
        .await
        .unwrap();
    assert_eq!(got, b"cba");
    let empty = client.client.request(server_id, Vec::new()).await.unwrap();
    assert!(empty.is_empty());

    // 2 KiB: fine for the client's codec (64 MiB), over the server's 1 KiB: the server
    // refuses to read it and the request fails instead of hanging or crashing anything.
    let err = client.client.request(server_id, vec![7u8; 2048]).await;
    assert!(err.is_err(), "{err:?}");
    // The server still works afterwards.
    let got = client.client.request(server_id, vec![1, 2]).await.unwrap();
    assert_eq!(got, vec![2, 1]);
    client.client.shutdown().await.unwrap();
    echo.abort();
}

// ---------------------------------------------------------------- the hostile peer

#[derive(NetworkBehaviour)]
struct Hostile {
    identify: identify::Behaviour,
    kad: kad::Behaviour<MemoryStore>,
    gossipsub: gossipsub::Behaviour,
}

fn hostile_swarm(key: Keypair) -> Swarm<Hostile> {
    SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|key| {
            let peer = key.public().to_peer_id();
            let mut kad = kad::Behaviour::with_config(
                peer,
                MemoryStore::new(peer),
                kad::Config::new(p2p::KAD_PROTOCOL),
            );
            kad.set_mode(Some(kad::Mode::Server));
            let gossip_cfg = gossipsub::ConfigBuilder::default()
                // Big enough to send what mesh peers must refuse.
                .max_transmit_size(256 * 1024)
                .build()
                .unwrap();
            Hostile {
                identify: identify::Behaviour::new(identify::Config::new(
                    "/mesh/id/1.0.0".into(),
                    key.public(),
                )),
                kad,
                gossipsub: gossipsub::Behaviour::new(
                    gossipsub::MessageAuthenticity::Signed(key.clone()),
                    gossip_cfg,
                )
                .unwrap(),
            }
        })
        .unwrap()
        .build()
}

/// Drives the hostile swarm until `done` returns true for an event (or the limit passes).
async fn drive_until(
    swarm: &mut Swarm<Hostile>,
    what: &str,
    mut done: impl FnMut(&SwarmEvent<HostileEvent>) -> bool,
) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let event = tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
        if done(&event) {
            return;
        }
    }
}

/// Keeps the hostile swarm polled in the background while the test awaits the target.
async fn drive_while<T>(
    swarm: &mut Swarm<Hostile>,
    fut: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            out = &mut fut => return out,
            _ = swarm.select_next_some() => {}
        }
    }
}

fn heartbeat_from(peer: PeerId) -> Heartbeat {
    Heartbeat {
        peer_id: peer.to_bytes(),
        addrs: vec![local().to_vec()],
        model: "tiny".into(),
        span_start: 4,
        span_end: 8,
        num_blocks: 8,
        free_memory_bytes: 1 << 30,
        throughput_tps: 10.0,
        active_sessions: 0,
        load: 0.0,
        price_per_token: 0,
        version: "evil".into(),
        interval_ms: 1000,
        timestamp_ms: now_ms(),
        leaving: false,
        capability: Capability {
            cpu_cores: 4,
            ram_bytes: 16 << 30,
            gpus: vec![GpuSummary {
                name: "NVIDIA L4".into(),
                vram_bytes: 24 << 30,
            }],
        },
        gpu_live: vec![GpuLive {
            index: 0,
            memory_used_bytes: 6 << 30,
            memory_free_bytes: 18 << 30,
            memory_total_bytes: 24 << 30,
            utilization_percent: Some(55),
        }],
        quantization: String::new(),
    }
}

async fn connected_hostile(target: &p2p::Peer) -> (Swarm<Hostile>, Keypair, PeerId) {
    let key = Keypair::generate_ed25519();
    let mut swarm = hostile_swarm(key.clone());
    let target_addr = target.listen_addrs[0].clone();
    let target_id = target.client.local_peer_id();
    let plain: Multiaddr = target_addr
        .iter()
        .filter(|p| !matches!(p, p2p::Protocol::P2p(_)))
        .collect();
    swarm.behaviour_mut().kad.add_address(&target_id, plain);
    swarm.dial(target_addr).unwrap();
    drive_until(
        &mut swarm,
        "connection to the target",
        |e| matches!(e, SwarmEvent::ConnectionEstablished { peer_id, .. } if *peer_id == target_id),
    )
    .await;
    (swarm, key, target_id)
}

#[tokio::test]
async fn malformed_gossip_is_rejected_counted_and_harmless() {
    let target = server_peer(p2p::MAX_FRAME_BYTES).await;
    announce_tiny(&target.client).await;
    let (mut swarm, key, target_id) = connected_hostile(&target).await;
    let me = key.public().to_peer_id();
    let topic = heartbeat::topic(&tiny());
    drive_until(&mut swarm, "the target's subscription", |e| {
        matches!(e, SwarmEvent::Behaviour(HostileEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, .. })) if *peer_id == target_id)
    })
    .await;

    let enc = |h: &Heartbeat| wire::encode(h).unwrap();
    let mut wrong_model = heartbeat_from(me);
    wrong_model.model = "other".into();
    let mut bad_span = heartbeat_from(me);
    bad_span.span_end = 99;
    let mut stale = heartbeat_from(me);
    stale.timestamp_ms -= 3_600_000;
    let mut future = heartbeat_from(me);
    future.timestamp_ms += 3_600_000;
    let spoofed = heartbeat_from(PeerId::random());
    let mut nan = heartbeat_from(me);
    nan.load = f32::NAN;
    let mut gpus = heartbeat_from(me);
    gpus.capability.gpus = vec![gpus.capability.gpus[0].clone(); Capability::MAX_GPUS + 1];
    let mut busy = heartbeat_from(me);
    busy.gpu_live[0].utilization_percent = Some(101);
    let bad: Vec<Vec<u8>> = vec![
        b"definitely not a heartbeat".to_vec(), // undecodable
        vec![],                                 // empty
        vec![0x01; 10 * 1024],                  // oversized (over 4 KiB)
        enc(&wrong_model),
        enc(&bad_span),
        enc(&stale),
        enc(&future),
        enc(&spoofed),
        enc(&nan),
        enc(&gpus),
        enc(&busy),
    ];
    let n_bad = bad.len() as u64;
    for data in bad {
        swarm
            .behaviour_mut()
            .gossipsub
            .publish(topic.clone(), data)
            .unwrap();
    }
    let stats = drive_while(
        &mut swarm,
        wait_stats(&target.client, "all bad heartbeats rejected", |s| {
            s.gossip.rejected() >= n_bad
        }),
    )
    .await;
    assert_eq!(stats.gossip.accepted, 0, "{stats:?}");
    assert_eq!(stats.gossip.undecodable, 2, "{stats:?}");
    assert_eq!(stats.gossip.oversized, 1, "{stats:?}");
    assert_eq!(stats.gossip.wrong_model, 1, "{stats:?}");
    assert_eq!(stats.gossip.bad_span, 1, "{stats:?}");
    assert_eq!(stats.gossip.stale, 1, "{stats:?}");
    assert_eq!(stats.gossip.future, 1, "{stats:?}");
    assert_eq!(stats.gossip.spoofed, 1, "{stats:?}");
    assert_eq!(stats.gossip.malformed, 3, "{stats:?}");
    let live = drive_while(&mut swarm, target.client.live_servers(&tiny())).await;
    assert!(live.unwrap().is_empty());

    // A good heartbeat afterwards is accepted: the target is alive and still listening.
    swarm
        .behaviour_mut()
        .gossipsub
        .publish(topic.clone(), enc(&heartbeat_from(me)))
        .unwrap();
    drive_while(
        &mut swarm,
        wait_stats(&target.client, "the good heartbeat", |s| {
            s.gossip.accepted >= 1
        }),
    )
    .await;
    let live = drive_while(&mut swarm, target.client.live_servers(&tiny()))
        .await
        .unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].peer_id, me);
    assert_eq!(live[0].span, BlockRange::new(4, 8));
    assert_eq!(live[0].capability, heartbeat_from(me).capability);
    assert_eq!(live[0].gpu_live, heartbeat_from(me).gpu_live);

    // Far over the transport limit (64 KiB): gossipsub refuses the frame before our
    // validator runs. The target survives and keeps serving.
    let _ = swarm
        .behaviour_mut()
        .gossipsub
        .publish(topic.clone(), vec![0u8; 200 * 1024]);
    drive_while(&mut swarm, tokio::time::sleep(Duration::from_millis(500))).await;
    let stats = target.client.stats().await.unwrap();
    assert_eq!(stats.gossip.accepted, 1, "{stats:?}");
    assert_eq!(stats.gossip.rejected(), n_bad, "{stats:?}");
    target.client.shutdown().await.unwrap();
}

#[tokio::test]
async fn malformed_dht_records_are_rejected_counted_and_harmless() {
    let target = server_peer(p2p::MAX_FRAME_BYTES).await;
    let (mut swarm, key, target_id) = connected_hostile(&target).await;
    let me = key.public().to_peer_id();
    let now = now_ms();
    let record_of = |span_end: u32| ServerRecord {
        peer_id: me.to_bytes(),
        addrs: vec![local().to_vec()],
        model: "tiny".into(),
        span_start: 0,
        span_end,
        num_blocks: 8,
        price_per_token: 0,
        online: true,
        issued_ms: now,
        expires_ms: now + 60_000,
        quantization: String::new(),
    };
    let good = dht::sign_server_record(&key, &record_of(2)).unwrap();
    let impossible = dht::sign_server_record(&key, &record_of(9)).unwrap();
    let victim = PeerId::random();
    let bad: Vec<(RecordKey, Vec<u8>)> = vec![
        (dht::server_key(&me), b"\x01garbage".to_vec()), // undecodable
        (dht::server_key(&me), vec![0x01; 8 * 1024]),    // oversized
        (dht::server_key(&victim), good.clone()),        // someone else's slot
        (RecordKey::new(&"not/a/mesh/key"), good.clone()), // unknown key
        (dht::server_key(&me), impossible),              // signed, impossible span
    ];
    let n_bad = bad.len() as u64;
    for (key, value) in bad {
        swarm.behaviour_mut().kad.put_record_to(
            Record::new(key, value),
            std::iter::once(target_id),
            Quorum::One,
        );
    }
    // Provider records under junk keys: refused. Under a real block key: stored.
    for junk in ["junk", "mesh/blk/1/tiny/99999", "mesh/blk/1/bad model/0"] {
        swarm
            .behaviour_mut()
            .kad
            .start_providing(RecordKey::new(&junk))
            .unwrap();
    }
    swarm
        .behaviour_mut()
        .kad
        .start_providing(dht::block_key(&tiny(), 1))
        .unwrap();
    let stats = drive_while(
        &mut swarm,
        wait_stats(&target.client, "bad records and providers rejected", |s| {
            s.dht_records_rejected >= n_bad && s.dht_providers_rejected >= 3
        }),
    )
    .await;
    assert_eq!(stats.dht_records_accepted, 0, "{stats:?}");
    assert_eq!(stats.dht_providers_accepted, 1, "{stats:?}");

    // Nothing bad was stored: the target's lookup finds the provider but no valid record.
    let found = drive_while(&mut swarm, target.client.lookup(&tiny(), 1))
        .await
        .unwrap();
    assert!(found.is_empty(), "{found:?}");

    // A good record is then stored and the lookup returns the attacker as a real server.
    swarm.behaviour_mut().kad.put_record_to(
        Record::new(dht::server_key(&me), good),
        std::iter::once(target_id),
        Quorum::One,
    );
    drive_while(
        &mut swarm,
        wait_stats(&target.client, "the good record", |s| {
            s.dht_records_accepted >= 1
        }),
    )
    .await;
    let found = drive_while(&mut swarm, target.client.lookup(&tiny(), 1))
        .await
        .unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].peer_id, me);
    assert_eq!(found[0].span, BlockRange::new(0, 2));
    target.client.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_declared_public_address_is_dialed_back_by_a_peer() {
    let boot = {
        let mut cfg = P2pConfig::new(Identity::generate(), Role::Bootstrap);
        cfg.listen = vec![local()];
        p2p::spawn(cfg).await.unwrap()
    };
    // Bind a port first so the "public" address (loopback here) is really ours.
    let mut cfg = P2pConfig::new(Identity::generate(), Role::Server);
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let listen: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
    cfg.listen = vec![listen.clone()];
    cfg.bootstrap = boot.listen_addrs.clone();
    // One address that works, one closed port.
    cfg.public_addrs = vec![listen.clone(), "/ip4/127.0.0.1/tcp/1".parse().unwrap()];
    let node = p2p::spawn(cfg).await.unwrap();
    let reports = node.client.check_reachability().await.unwrap();
    assert_eq!(reports.len(), 2, "{reports:?}");
    let by_addr = |a: &Multiaddr| reports.iter().find(|r| &r.addr == a).unwrap();
    assert!(by_addr(&listen).reachable, "{reports:?}");
    assert_eq!(by_addr(&listen).checked_by, boot.client.local_peer_id());
    assert!(!by_addr(&"/ip4/127.0.0.1/tcp/1".parse().unwrap()).reachable);

    // A client with no public address has nothing to check.
    let mut cfg = P2pConfig::new(Identity::generate(), Role::Client);
    cfg.bootstrap = boot.listen_addrs.clone();
    let client = p2p::spawn(cfg).await.unwrap();
    assert!(client.client.check_reachability().await.unwrap().is_empty());
}

/// A new client peer dialing `to` from this host (127.0.0.1).
async fn dial_from_here(to: &Multiaddr) -> (p2p::Peer, Result<(), p2p::P2pError>) {
    let cfg = P2pConfig::new(Identity::generate(), Role::Client);
    let peer = p2p::spawn(cfg).await.unwrap();
    let dialed = tokio::time::timeout(LIMIT, peer.client.dial(to.clone()))
        .await
        .expect("dial answered");
    (peer, dialed)
}

/// Peer ids are free, so one host could take every connection slot; past
/// `max_connections_per_ip` its inbound connections are refused before the handshake (and
/// counted), and a slot one of them frees opens again. (That other addresses still get
/// in is a unit test of `p2p/ip_limit.rs`: loopback dials all leave from 127.0.0.1.)
#[tokio::test]
async fn one_address_holds_at_most_its_share_of_connections() {
    let mut cfg = P2pConfig::new(Identity::generate(), Role::Server);
    cfg.listen = vec![local()];
    cfg.max_connections_per_ip = 3;
    let server = p2p::spawn(cfg).await.unwrap();
    let addr = server.listen_addrs[0].clone();

    let mut admitted = Vec::new();
    for _ in 0..3 {
        let (peer, dialed) = dial_from_here(&addr).await;
        dialed.unwrap();
        admitted.push(peer);
        // Counted on the server's side too, so the next refusal comes before the handshake.
        let n = admitted.len();
        wait_stats(&server.client, "admitted", |s| s.connected_peers == n).await;
    }
    for _ in 0..2 {
        let (_, dialed) = dial_from_here(&addr).await;
        assert!(dialed.is_err(), "a 4th connection from one address got in");
    }
    let stats = server.client.stats().await.unwrap();
    assert_eq!(
        (stats.connected_peers, stats.ip_limited),
        (3, 2),
        "{stats:?}"
    );

    // One leaves: its slot is free again.
    admitted.pop().unwrap().client.shutdown().await.unwrap();
    wait_stats(&server.client, "the peer gone", |s| s.connected_peers == 2).await;
    let (_again, dialed) = dial_from_here(&addr).await;
    dialed.expect("a freed slot is open again");
}
