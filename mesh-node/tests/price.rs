//! A server cannot charge what it likes (issue 14, item 1), against real node processes:
//! a second node on the same blocks announcing a huge price gets no session under the
//! default client settings, and nothing is countersigned above a server's announced price.

mod common;

use candle_core::{DType, Device};
use common::*;
use mesh_core::identity::Identity;
use mesh_core::ledger::{ConfigHash, Store};
use mesh_core::model::{tiny, ClientHead, Generation, ModelFiles, SamplingParams};
use mesh_core::p2p::{self, P2pConfig, PeerId, Role};
use mesh_core::pipeline::session::SessionContext;
use mesh_core::pipeline::{self, ClientLedger, RemoteSession, SessionConfig};
use mesh_core::{BlockRange, ModelId};

const FAIR_PRICE: u64 = 10;
const GREEDY_PRICE: u64 = 1_000_000;
/// Sessions opened: with price ignored, the greedy node would get about half of them.
const SESSIONS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_announcing_a_huge_price_gets_no_session_and_is_never_paid_it() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let model_dir = home.join("model");
    tiny::write(&model_dir).unwrap();
    let (_boot, boot_addr) = start_bootstrap(home).await;
    let mut nodes = Vec::new();
    let mut announced = std::collections::HashMap::<PeerId, u64>::new();
    for (name, price) in [("fair", FAIR_PRICE), ("greedy", GREEDY_PRICE)] {
        let mut args = node_args(home, name, BlockRange::new(0, NUM_BLOCKS), &[&boot_addr]);
        args.extend(["--model-dir".into(), model_dir.display().to_string()]);
        args.extend(["--price-per-token".into(), price.to_string()]);
        let node = Proc::spawn(name, "mesh-node", &args, home);
        announced.insert(Proc::peer_id(&node.listen_addr().await), price);
        nodes.push(node);
    }
    let greedy = *announced
        .iter()
        .find(|(_, p)| **p == GREEDY_PRICE)
        .unwrap()
        .0;

    let identity = Identity::generate();
    let key = identity.signing_key();
    let mut cfg = P2pConfig::new(identity, Role::Client);
    cfg.bootstrap = vec![boot_addr.clone()];
    let client = p2p::spawn(cfg).await.unwrap();
    let model = ModelId::new(MODEL);
    // Wait until both nodes are heard, so the client has the choice.
    wait_for(DISCOVERY_LIMIT, "both nodes' heartbeats", || {
        let client = client.client.clone();
        let model = model.clone();
        async move {
            let _ = client.discover(&model, NUM_BLOCKS).await;
            let live = client.live_servers(&model).await.ok()?;
            (live.len() == 2).then_some(())
        }
    })
    .await;
    let files = ModelFiles::open(&model_dir).unwrap();
    let head = ClientHead::load(&files, DType::F32, &Device::Cpu).unwrap();
    let client_store = Store::open(&home.join("client-ledger")).unwrap();
    let context = SessionContext {
        ledger: Some(ClientLedger {
            store: client_store.clone(),
            key,
            config_hash: ConfigHash::of(&files.config).unwrap(),
        }),
        ..SessionContext::default()
    };

    let mut routed_to_greedy = 0;
    for _ in 0..SESSIONS {
        let mut session = RemoteSession::open_with(
            client.client.clone(),
            model.clone(),
            NUM_BLOCKS,
            SessionConfig::default(),
            context.clone(),
        )
        .await
        .unwrap();
        if session.route().iter().any(|h| h.peer == greedy) {
            routed_to_greedy += 1;
        }
        let mut generation =
            Generation::new(vec![1, 80, 97, 121], SamplingParams::greedy(4), 512).unwrap();
        pipeline::generate(&head, &mut session, &mut generation, |_| {})
            .await
            .unwrap();
        session.close().await;
    }

    let countersigned: Vec<_> = client_store
        .entries()
        .filter_map(|e| e.unwrap().countersigned)
        .collect();
    let over_announced: Vec<String> = countersigned
        .iter()
        .map(|r| &r.receipt.terms)
        .filter(|t| {
            announced
                .get(&t.server)
                .is_none_or(|p| t.price_per_token > *p)
        })
        .map(|t| format!("{} at {}", t.server, t.price_per_token))
        .collect();
    let paid_to_greedy: u64 = countersigned
        .iter()
        .filter(|r| r.receipt.terms.server == greedy)
        .map(|r| r.receipt.amount)
        .sum();
    assert!(
        routed_to_greedy == 0 && paid_to_greedy == 0 && over_announced.is_empty(),
        "the node announcing {GREEDY_PRICE} got {routed_to_greedy} of {SESSIONS} sessions \
         and was countersigned {paid_to_greedy}; above the announced price: {over_announced:?}"
    );
    assert_eq!(
        countersigned.len(),
        SESSIONS,
        "every session paid the fair node"
    );
}
