//! Receipts from a real node process, end to end: the client countersigns while it
//! generates, then the provider's `mesh-node settle` writes a batch that
//! `mesh-client verify-batch` accepts, and settled receipts are not settled twice.

mod common;

use std::process::Command;

use candle_core::{DType, Device};
use common::*;
use mesh_core::identity::Identity;
use mesh_core::ledger::{ConfigHash, Store};
use mesh_core::model::{tiny, ClientHead, Generation, ModelFiles, SamplingParams};
use mesh_core::p2p::{self, P2pConfig, Role};
use mesh_core::pipeline::{self, ClientLedger, RemoteSession, SessionConfig};
use mesh_core::{BlockRange, ModelId};

fn run(bin: &str, args: &[&str], home: &std::path::Path) -> (bool, String) {
    let out = Command::new(binary(bin))
        .args(args)
        .env("MESH_HOME", home)
        .output()
        .expect("run binary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_receipts_settle_into_a_batch_anyone_can_verify() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let model_dir = home.join("model");
    tiny::write(&model_dir).unwrap();
    let boot = Proc::spawn(
        "bootstrap",
        "mesh-bootstrap",
        &bootstrap_args(home, 0),
        home,
    );
    let boot_addr = boot.listen_addr().await;
    // Named "node" so its key is $MESH_HOME/node.key, the default `settle` reads.
    let mut args = node_args(home, "node", BlockRange::new(0, NUM_BLOCKS), &[&boot_addr]);
    args.extend(["--model-dir".into(), model_dir.display().to_string()]);
    args.extend(["--price-per-token".into(), "2".into()]);
    let mut node = Proc::spawn("node", "mesh-node", &args, home);
    node.listen_addr().await;

    let identity = Identity::generate();
    let key = identity.signing_key();
    let mut cfg = P2pConfig::new(identity, Role::Client);
    cfg.bootstrap = vec![boot_addr.clone()];
    let client = p2p::spawn(cfg).await.unwrap();
    let model = ModelId::new(MODEL);
    pipeline::wait_for_coverage(&client.client, &model, NUM_BLOCKS, DISCOVERY_LIMIT)
        .await
        .unwrap();
    let files = ModelFiles::open(&model_dir).unwrap();
    let head = ClientHead::load(&files, DType::F32, &Device::Cpu).unwrap();
    let client_store = Store::open(&home.join("client-ledger")).unwrap();
    let ledger = ClientLedger {
        store: client_store.clone(),
        key,
        config_hash: ConfigHash::of(&files.config).unwrap(),
    };
    let mut session = RemoteSession::open_billed(
        client.client.clone(),
        model,
        NUM_BLOCKS,
        SessionConfig::default(),
        Some(ledger),
    )
    .await
    .unwrap();
    let mut generation =
        Generation::new(vec![1, 80, 97, 121], SamplingParams::greedy(10), 512).unwrap();
    pipeline::generate(&head, &mut session, &mut generation, |_| {})
        .await
        .unwrap();
    session.close().await;
    // 4 prompt positions + 9 decode steps, through 8 blocks, at 2 per token per block.
    let countersigned: Vec<_> = client_store
        .entries()
        .filter_map(|e| e.unwrap().countersigned)
        .collect();
    assert_eq!(countersigned.len(), 1);
    assert_eq!(countersigned[0].receipt.amount, 13 * 8 * 2);

    assert!(node.terminate(), "node stops cleanly");
    let ledger_dir = home.join("node.ledger").display().to_string();
    let batch = home.join("batch.json").display().to_string();
    let settle = |dry: bool| {
        let mut a = vec![
            "settle",
            "--ledger-dir",
            &ledger_dir,
            "--min-amount",
            "1",
            "--out",
            &batch,
        ];
        if dry {
            a.push("--dry-run");
        }
        run("mesh-node", &a, home)
    };
    let (ok, text) = settle(true);
    assert!(
        ok && text.contains("dry run: 1 lines") && text.contains("208 due"),
        "{text}"
    );
    let (ok, text) = run("mesh-client", &["verify-batch", &batch], home);
    assert!(ok && text.contains("verifies"), "{text}");
    let written = std::fs::read_to_string(home.join("batch.json")).unwrap();
    let (ok, text) = settle(false);
    assert!(ok && text.contains("settled: 1 lines"), "{text}");
    let (ok, text) = settle(false);
    assert!(
        ok && text.contains("settled: 0 lines"),
        "nothing is settled twice: {text}"
    );

    // A forged batch is refused.
    let forged = written.replace("208", "999");
    assert_ne!(forged, written);
    std::fs::write(home.join("forged.json"), forged).unwrap();
    let (ok, text) = run(
        "mesh-client",
        &[
            "verify-batch",
            &home.join("forged.json").display().to_string(),
        ],
        home,
    );
    assert!(!ok, "{text}");
}
