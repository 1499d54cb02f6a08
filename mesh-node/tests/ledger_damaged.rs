//! A node whose ledger is damaged does not serve unpaid (issue 14, item 2): with its
//! database file cut short, `mesh-node start` refuses to start, naming the ledger and the
//! recovery step, where it used to serve and lose every receipt; and a ledger that fails
//! while the node runs makes it refuse billed sessions and say `degraded` in `/healthz`,
//! `/metrics` and `mesh-node status`, where it used to say `serving`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use common::*;
use mesh_core::identity::Identity;
use mesh_core::ledger::{ConfigHash, Store, MARK_FILE};
use mesh_core::model::{tiny, ClientHead, Generation, ModelFiles, SamplingParams};
use mesh_core::p2p::{self, Multiaddr, P2pConfig, Role};
use mesh_core::pipeline::{self, ClientLedger, RemoteSession, SessionConfig};
use mesh_core::{BlockRange, ModelId};

/// A client pays for one short generation through the mesh at `boot`.
async fn billed_generation(boot: &Multiaddr, model_dir: &Path, client_ledger: &Path) {
    try_billed_generation(boot, model_dir, client_ledger)
        .await
        .unwrap();
}

async fn try_billed_generation(
    boot: &Multiaddr,
    model_dir: &Path,
    client_ledger: &Path,
) -> Result<(), String> {
    let identity = Identity::generate();
    let key = identity.signing_key();
    let mut cfg = P2pConfig::new(identity, Role::Client);
    cfg.bootstrap = vec![boot.clone()];
    let client = p2p::spawn(cfg).await.unwrap();
    let model = ModelId::new(MODEL);
    pipeline::wait_for_coverage(&client.client, &model, NUM_BLOCKS, DISCOVERY_LIMIT)
        .await
        .unwrap();
    let files = ModelFiles::open(model_dir).unwrap();
    let head = ClientHead::load(&files, DType::F32, &Device::Cpu).unwrap();
    let ledger = ClientLedger {
        store: Store::open(client_ledger).unwrap(),
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
    .map_err(|e| e.to_string())?;
    let mut generation =
        Generation::new(vec![1, 80, 97, 121], SamplingParams::greedy(40), 512).unwrap();
    pipeline::generate(&head, &mut session, &mut generation, |_| {})
        .await
        .map_err(|e| e.to_string())?;
    session.close().await;
    Ok(())
}

/// A bootstrap in `home`, the tiny model written there, and the arguments of a node that
/// serves all of it at price 2 through that bootstrap (not started).
async fn billing_mesh(home: &Path) -> (Proc, Multiaddr, std::path::PathBuf, Vec<String>) {
    let model_dir = home.join("model");
    tiny::write(&model_dir).unwrap();
    let boot = Proc::spawn(
        "bootstrap",
        "mesh-bootstrap",
        &bootstrap_args(home, 0),
        home,
    );
    let boot_addr = boot.listen_addr().await;
    let mut args = node_args(home, "node", BlockRange::new(0, NUM_BLOCKS), &[&boot_addr]);
    args.extend(["--model-dir".into(), model_dir.display().to_string()]);
    args.extend(["--price-per-token".into(), "2".into()]);
    (boot, boot_addr, model_dir, args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_to_start_on_a_ledger_cut_short() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let (_boot, boot_addr, model_dir, args) = billing_mesh(home).await;
    let mut node = Proc::spawn("node", "mesh-node", &args, home);
    node.listen_addr().await;
    for i in 0..3 {
        billed_generation(&boot_addr, &model_dir, &home.join(format!("client{i}"))).await;
    }
    assert!(node.terminate(), "node stops cleanly");
    drop(node);

    let ledger = home.join("node.ledger");
    let db = ledger.join("db");
    // Cut short, as a copy that ran out of disk leaves it. (sled is log-structured: the
    // newest records are at the end, so the cut loses some. Cut in half, a ledger this
    // small can keep every record, and then it is not damaged.)
    let bytes = std::fs::read(&db).unwrap();
    assert!(bytes.len() > 8192, "{} bytes", bytes.len());
    std::fs::write(&db, &bytes[..4096]).unwrap();

    let mut node = Proc::spawn("node-again", "mesh-node", &args, home);
    let deadline = Instant::now() + START_LIMIT;
    let status = loop {
        if let Some(status) = node.exited() {
            break status;
        }
        assert!(
            !node.has_line(|l| l.starts_with("serving ") || l.starts_with("http on ")),
            "the node started on a damaged ledger: {:?}\n{}",
            node.lines(),
            node.stderr()
        );
        assert!(
            Instant::now() < deadline,
            "the node neither served nor exited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let said = node.stderr();
    assert!(!status.success(), "exit status {status}: {said}");
    let shown = ledger.display().to_string();
    for want in ["fails its check", &shown, "mv ", "restore it from a backup"] {
        assert!(said.contains(want), "`{want}` missing from: {said}");
    }
}

/// The node's HTTP address, from its `http on ADDR` line.
fn http_addr(node: &Proc) -> std::net::SocketAddr {
    node.lines()
        .iter()
        .find_map(|l| l.strip_prefix("http on ")?.trim().parse().ok())
        .expect("an `http on` line")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_ledger_fails_while_serving_refuses_billed_sessions_and_says_degraded() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let (_boot, boot_addr, model_dir, args) = billing_mesh(home).await;
    let node = Proc::spawn("node", "mesh-node", &args, home);
    node.listen_addr().await;
    billed_generation(&boot_addr, &model_dir, &home.join("client0")).await;
    let http = http_addr(&node);
    let get = |path: &str| {
        mesh_core::http::get(http, path, Duration::from_secs(5))
            .unwrap()
            .1
    };
    assert!(get("/healthz").contains("\"status\":\"serving\""));

    // The ledger directory stops taking the store's writes (as root, a read-only mode
    // would not stop them): the high-water mark written after each new receipt cannot be
    // replaced. The next session's first receipt fails to be kept.
    let mark = home.join("node.ledger").join(MARK_FILE);
    let _ = std::fs::remove_file(&mark);
    std::fs::create_dir(&mark).unwrap();
    std::fs::write(mark.join("in-the-way"), b"").unwrap();
    let _ = try_billed_generation(&boot_addr, &model_dir, &home.join("client1")).await;

    let health = get("/healthz");
    assert!(
        health.contains("\"status\":\"degraded\"") && health.contains("ledger failed"),
        "{health}"
    );
    let metrics = get("/metrics");
    assert!(metrics.contains("mesh_ledger_failed 1"), "{metrics}");
    let status = std::process::Command::new(binary("mesh-node"))
        .args(["status", "--pid-file"])
        .arg(home.join("node.pid"))
        .env("MESH_HOME", home)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&status.stdout);
    assert!(
        said.contains("degraded for") && said.contains("degraded: ledger failed"),
        "{said}"
    );

    // No billed session is opened any more; the refusal says why.
    let refused = try_billed_generation(&boot_addr, &model_dir, &home.join("client2")).await;
    assert!(refused.is_err(), "a billed session ran on a failed ledger");
    let metrics = get("/metrics");
    assert!(
        metrics.contains("mesh_errors_total{kind=\"ledger_failed\"}"),
        "{metrics}"
    );
}
