//! A server that announces one price and asks another at open (issue 14, item 1): the
//! client refuses the terms, says why, routes around the server, and countersigns
//! nothing above what was announced.
//!
//! The bait-and-switch server is built from the real parts (a real swarm, the real
//! [`SpanServer`] and billing); only its billed price differs from its announcement.

mod test_server;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use mesh_core::ledger::{ConfigHash, Store};
use mesh_core::local_mesh::{loopback_config, LocalMesh};
use mesh_core::model::{tiny, ClientHead, Generation, ModelFiles, SamplingParams, SpanModel};
use mesh_core::p2p::{self, Announcement, Role};
use mesh_core::pipeline::{
    self, Billing, ClientLedger, RemoteSession, ServerLimits, SessionConfig, SpanServer,
};
use mesh_core::types::ServerLoad;
use mesh_core::{BlockRange, ModelId};
use tokio::sync::oneshot;

const ANNOUNCED: u64 = 2;
const BILLED: u64 = 2_000;
const ALL: BlockRange = BlockRange { start: 0, end: 8 };

/// Serve every block announcing [`ANNOUNCED`] and a throughput that makes it every
/// route's first choice, but offer terms at [`BILLED`] when a session opens.
async fn start_bait_and_switch(
    model_dir: &std::path::Path,
    boot: p2p::Multiaddr,
    ledger_dir: &std::path::Path,
) -> (p2p::PeerId, oneshot::Sender<()>) {
    let cfg = loopback_config(Role::Server, vec![boot]);
    let key = cfg.identity.signing_key();
    let id = cfg.identity.peer_id();
    let files = ModelFiles::open(model_dir).unwrap();
    let model = SpanModel::load(&files, ALL, DType::F32, &Device::Cpu).unwrap();
    let server = SpanServer::new(
        ModelId::new(tiny::TINY_MODEL_ID),
        model,
        ServerLimits::default(),
    )
    .with_signer(key.clone())
    .with_billing(Billing {
        key,
        server: id,
        store: Store::open(ledger_dir).unwrap(),
        price_per_token: BILLED,
        every_tokens: 4,
        max_unpaid_tokens: 4096,
    })
    .unwrap();
    let server = Arc::new(Mutex::new(server));
    let peer = p2p::spawn(cfg).await.unwrap();
    let ann = Announcement {
        model: ModelId::new(tiny::TINY_MODEL_ID),
        span: ALL,
        num_blocks: 8,
        price_per_token: ANNOUNCED,
        load: ServerLoad {
            throughput_tps: 1e6,
            ..ServerLoad::default()
        },
        capability: Default::default(),
        quantization: String::new(),
    };
    let stop = test_server::serve(peer, ann, move |peer, request| {
        std::future::ready(server.lock().unwrap().handle(peer, request, Instant::now()))
    });
    (id, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terms_above_the_announced_price_are_refused_and_never_countersigned() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    tiny::write(&model_dir).unwrap();
    let files = ModelFiles::open(&model_dir).unwrap();
    let head = ClientHead::load(&files, DType::F32, &Device::Cpu).unwrap();
    let mut mesh = LocalMesh::start(&model_dir, &[]).await.unwrap();
    mesh.billing = Some((dir.path().join("ledgers"), ANNOUNCED));
    let honest = mesh.add_node(ALL).await.unwrap();
    let (switcher, stop) = start_bait_and_switch(
        &model_dir,
        mesh.bootstrap_addr().clone(),
        &dir.path().join("switcher-ledger"),
    )
    .await;

    let cfg = loopback_config(Role::Client, vec![mesh.bootstrap_addr().clone()]);
    let key = cfg.identity.signing_key();
    let client = p2p::spawn(cfg).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .client
        .live_servers(mesh.model())
        .await
        .unwrap()
        .len()
        < 2
    {
        assert!(Instant::now() < deadline, "both servers were never heard");
        let _ = client.client.discover(mesh.model(), 8).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let store = Store::open(&dir.path().join("client-ledger")).unwrap();
    let ledger = ClientLedger {
        store: store.clone(),
        key,
        config_hash: ConfigHash::of(&files.config).unwrap(),
    };
    let mut session = RemoteSession::open_billed(
        client.client.clone(),
        mesh.model().clone(),
        8,
        SessionConfig::default(),
        Some(ledger),
    )
    .await
    .unwrap();
    let route: Vec<_> = session.route().iter().map(|h| h.peer).collect();
    let mut generation =
        Generation::new(vec![1, 80, 97, 121], SamplingParams::greedy(6), 512).unwrap();
    pipeline::generate(&head, &mut session, &mut generation, |_| {})
        .await
        .unwrap();
    session.close().await;

    let agreed: Vec<(p2p::PeerId, u64)> = store
        .entries()
        .map(|e| e.unwrap().latest.receipt.terms)
        .map(|t| (t.server, t.price_per_token))
        .collect();
    assert!(
        route == vec![honest] && agreed == vec![(honest, ANNOUNCED)],
        "route {route:?} (honest {honest}, switcher {switcher}); terms agreed: {agreed:?}"
    );
    let _ = stop.send(());
    mesh.stop().await.unwrap();
}
