//! Receipts from a real node process, end to end: the client countersigns while it
//! generates, then the provider's `mesh-node settle` writes a batch that
//! `mesh-client verify-batch` accepts, and settled receipts are not settled twice. And a
//! node settling by itself (`[settle] every`): below the minimum it waits, at or above it
//! settles, and what it settled is not settled again.

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
    // A payout with a minimum over what is due waits, writing nothing.
    let (ok, text) = run(
        "mesh-node",
        &[
            "settle",
            "--ledger-dir",
            &ledger_dir,
            "--min-total",
            "1000",
            "--out",
            &batch,
        ],
        home,
    );
    assert!(
        ok && text.contains("waiting: 208 due, below the minimum total of 1000"),
        "{text}"
    );
    assert!(!home.join("batch.json").exists(), "no batch while waiting");
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

/// Generate 10 tokens through the node at `boot_addr` with a billed client: 4 prompt
/// positions + 9 decode steps through 8 blocks at 2 per token per block, 208 due.
async fn earn(
    home: &std::path::Path,
    boot_addr: &mesh_core::p2p::Multiaddr,
    model_dir: &std::path::Path,
) -> u64 {
    let identity = Identity::generate();
    let key = identity.signing_key();
    let mut cfg = P2pConfig::new(identity, Role::Client);
    cfg.bootstrap = vec![boot_addr.clone()];
    let client = p2p::spawn(cfg).await.unwrap();
    let model = ModelId::new(MODEL);
    pipeline::wait_for_coverage(&client.client, &model, NUM_BLOCKS, DISCOVERY_LIMIT)
        .await
        .unwrap();
    let files = ModelFiles::open(model_dir).unwrap();
    let head = ClientHead::load(&files, DType::F32, &Device::Cpu).unwrap();
    let ledger = ClientLedger {
        store: Store::open(&home.join("client-ledger")).unwrap(),
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
    session.close().await.countersigned
}

/// The node's `/healthz` settlement schedule, once `done` says it reached the state wanted.
async fn schedule_when(
    pid_file: &std::path::Path,
    what: &str,
    done: impl Fn(&mesh_core::http::schedule::ScheduleStatus) -> bool,
) -> mesh_core::http::schedule::ScheduleStatus {
    wait_for(std::time::Duration::from_secs(60), what, || {
        let status = mesh_core::daemon::read_http_addr(pid_file).and_then(|addr| {
            let (code, body) =
                mesh_core::http::get(addr, "/healthz", std::time::Duration::from_secs(5)).ok()?;
            let h: mesh_core::http::Health = serde_json::from_str(&body).ok()?;
            (code == 200).then_some(h.settle?)
        });
        let status = status.filter(|s| done(s));
        async move { status }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_settles_on_its_schedule_and_waits_below_the_minimum() {
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
    let config = home.join("node.toml");
    let mut args = node_args(home, "node", BlockRange::new(0, NUM_BLOCKS), &[&boot_addr]);
    args.extend(["--model-dir".into(), model_dir.display().to_string()]);
    args.extend(["--price-per-token".into(), "2".into()]);
    args.extend(["--config".into(), config.display().to_string()]);
    let pid_file = home.join("node.pid");
    let batches = home.join("node.ledger").join("settlements");

    // A short period and a minimum above what will be due: the node waits.
    std::fs::write(&config, "[settle]\nevery = \"1s\"\nminimum = 100000\n").unwrap();
    let mut node = Proc::spawn("node", "mesh-node", &args, home);
    node.listen_addr().await;
    assert_eq!(earn(home, &boot_addr, &model_dir).await, 208);
    let waited = schedule_when(&pid_file, "a scheduled run to see 208 due", |s| {
        s.last.as_ref().is_some_and(|r| r.due == 208)
    })
    .await;
    let last = waited.last.as_ref().unwrap();
    assert_eq!(last.outcome, "waiting", "{waited:?}");
    assert_eq!(
        (waited.settled, waited.every_secs, waited.minimum),
        (0, 1, 100000)
    );
    assert!(
        std::fs::read_dir(&batches).map_or(true, |d| d.count() == 0),
        "no batch below the minimum"
    );
    assert!(node.terminate(), "node stops cleanly");

    // The minimum lowered under what is due: the schedule settles it, once.
    std::fs::write(&config, "[settle]\nevery = \"1s\"\nminimum = 100\n").unwrap();
    let mut node = Proc::spawn("node", "mesh-node", &args, home);
    node.listen_addr().await;
    let settled = schedule_when(&pid_file, "a settlement by the schedule", |s| {
        s.settled >= 1
    })
    .await;
    let last = settled.last.clone().unwrap();
    assert_eq!(
        (last.outcome.as_str(), last.due, last.lines),
        ("settled", 208, 1),
        "{settled:?}"
    );
    let batch = last.path.expect("the batch file");
    assert!(batch.starts_with(&batches), "{}", batch.display());
    let (ok, text) = run(
        "mesh-client",
        &["verify-batch", &batch.display().to_string()],
        home,
    );
    assert!(
        ok && text.contains("verifies") && text.contains("208"),
        "{text}"
    );
    // The next period finds nothing due: settled receipts are not settled again.
    let after = schedule_when(&pid_file, "the next scheduled run", |s| {
        s.last.as_ref().is_some_and(|r| r.outcome == "waiting")
    })
    .await;
    assert_eq!(after.settled, 1, "{after:?}");
    assert_eq!(after.last.unwrap().due, 0);
    assert_eq!(std::fs::read_dir(&batches).unwrap().count(), 1);
    assert!(node.terminate(), "node stops cleanly");
}
