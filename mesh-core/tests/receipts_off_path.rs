//! A receipt's countersigned copy goes back to its server off the critical path: a step
//! that brings a receipt does not wait a round trip for the server to acknowledge it.
//! Over 25 ms links that wait made one step in four cost two round trips per hop.
//!
//! The server is the real [`SpanServer`] with a real ledger behind a real swarm; only
//! its acknowledgements of countersigned receipts are held back, as a slow link would.

mod test_server;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use mesh_core::ledger::{ConfigHash, Reputation, Store};
use mesh_core::local_mesh::{loopback_config, LocalMesh};
use mesh_core::model::{tiny, ClientHead, ModelFiles, SpanModel};
use mesh_core::p2p::{self, Announcement, Role};
use mesh_core::pipeline::session::SessionContext;
use mesh_core::pipeline::{
    Billing, ClientLedger, RemoteSession, ServerLimits, SessionConfig, SessionRequest, SpanServer,
};
use mesh_core::types::ServerLoad;
use mesh_core::{BlockRange, ModelId};

const ALL: BlockRange = BlockRange { start: 0, end: 8 };
/// How long the server sits on a countersigned receipt before acknowledging it.
const ACK_DELAY: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_do_not_wait_for_receipts_to_be_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    tiny::write(&model_dir).unwrap();
    let files = ModelFiles::open(&model_dir).unwrap();
    let mesh = LocalMesh::start(&model_dir, &[]).await.unwrap();

    // The server: every step carries a receipt; acknowledgements come ACK_DELAY late.
    let cfg = loopback_config(Role::Server, vec![mesh.bootstrap_addr().clone()]);
    let (key, server_id) = (cfg.identity.signing_key(), cfg.identity.peer_id());
    let server_store = Store::open(&dir.path().join("server-ledger")).unwrap();
    let model = SpanModel::load(&files, ALL, DType::F32, &Device::Cpu).unwrap();
    let server = SpanServer::new(
        ModelId::new(tiny::TINY_MODEL_ID),
        model,
        ServerLimits::default(),
    )
    .with_billing(Billing {
        key: key.clone(),
        server: server_id,
        store: server_store.clone(),
        price_per_token: 1,
        every_tokens: 1,
        max_unpaid_tokens: 4096,
    })
    .unwrap();
    let server = Arc::new(Mutex::new(server));
    let peer = p2p::spawn(cfg).await.unwrap();
    let ann = Announcement {
        model: ModelId::new(tiny::TINY_MODEL_ID),
        span: ALL,
        num_blocks: 8,
        price_per_token: 1,
        load: ServerLoad::default(),
        capability: Default::default(),
        quantization: String::new(),
    };
    let stop = test_server::serve(peer, ann, move |peer, request| {
        let server = server.clone();
        async move {
            if matches!(request, SessionRequest::Countersigned { .. }) {
                tokio::time::sleep(ACK_DELAY).await;
            }
            let response = server.lock().unwrap().handle(peer, request, Instant::now());
            response
        }
    });

    // A billed client.
    let cfg = loopback_config(Role::Client, vec![mesh.bootstrap_addr().clone()]);
    let ledger = ClientLedger {
        store: Store::open(&dir.path().join("client-ledger")).unwrap(),
        key: cfg.identity.signing_key(),
        config_hash: ConfigHash::of(&files.config).unwrap(),
    };
    let client = p2p::spawn(cfg).await.unwrap();
    mesh_core::pipeline::wait_for_coverage(
        &client.client,
        mesh.model(),
        8,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let ctx = SessionContext {
        ledger: Some(ledger),
        reputation: Reputation::in_memory(),
        ..SessionContext::default()
    };
    let mut session = RemoteSession::open_with(
        client.client.clone(),
        mesh.model().clone(),
        8,
        SessionConfig::default(),
        ctx,
    )
    .await
    .unwrap();
    let head = ClientHead::load(&files, DType::F32, &Device::Cpu).unwrap();

    // Six steps, each with a receipt to countersign: waiting for each acknowledgement
    // would take 6 x ACK_DELAY.
    let started = Instant::now();
    for (pos, token) in [1u32, 72, 105, 32, 109, 101].into_iter().enumerate() {
        let hidden = head.embed(&[token]).unwrap();
        session.step(hidden, pos as u32).await.unwrap();
    }
    let stepping = started.elapsed();
    println!("6 steps with a receipt each in {stepping:?} (acknowledgements take {ACK_DELAY:?})");
    assert!(
        stepping < ACK_DELAY,
        "steps waited for receipts to be acknowledged: {stepping:?}"
    );

    // Closing waits for the deliveries: the server has every countersigned receipt.
    let report = session.close().await;
    assert!(report.countersigned > 0, "{report:?}");
    let stored: Vec<_> = server_store
        .entries()
        .map(|e| e.unwrap())
        .filter_map(|e| e.countersigned)
        .collect();
    assert!(
        stored.iter().any(|r| r.receipt.amount >= 6),
        "the server never got the countersigned receipts: {stored:?}"
    );
    let _ = stop.send(());
    mesh.stop().await.unwrap();
}
