//! Joining is fast (issue 14, item 13): `mesh-client generate` prints its first token
//! within 1.5 s of starting on a loopback mesh with default settings, because it routes
//! from the servers' signed DHT records instead of waiting for a heartbeat (every 15 s)
//! from a server of every span.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use mesh_core::p2p::Multiaddr;
use mesh_core::{BlockRange, ModelId};

/// The target: first token within this long of starting the client.
const FIRST_TOKEN_LIMIT: Duration = Duration::from_millis(1500);

/// `mesh-node start` with the defaults for heartbeats (15 s) and announcements (120 s).
fn default_node_args(
    dir: &std::path::Path,
    name: &str,
    span: BlockRange,
    boot: &Multiaddr,
) -> Vec<String> {
    vec![
        "start".into(),
        "--model".into(),
        MODEL.into(),
        "--blocks".into(),
        format!("{}..{}", span.start, span.end),
        "--num-blocks".into(),
        NUM_BLOCKS.to_string(),
        "--model-dir".into(),
        dir.join("model").display().to_string(),
        "--listen".into(),
        "/ip4/127.0.0.1/tcp/0".into(),
        "--key".into(),
        dir.join(format!("{name}.key")).display().to_string(),
        "--http".into(),
        "127.0.0.1:0".into(),
        "--pid-file".into(),
        dir.join(format!("{name}.pid")).display().to_string(),
        "--ledger-dir".into(),
        dir.join(format!("{name}.ledger")).display().to_string(),
        "--bootstrap".into(),
        boot.to_string(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_client_generate_prints_its_first_token_within_1_5_s_with_default_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    mesh_core::model::tiny::write(&home.join("model")).unwrap();
    let (_boot, boot_addr) = start_bootstrap(home).await;
    let mut nodes = Vec::new();
    for (name, span) in [
        ("first", BlockRange::new(0, 4)),
        ("second", BlockRange::new(4, 8)),
    ] {
        let args = default_node_args(home, name, span, &boot_addr);
        let node = Proc::spawn(name, "mesh-node", &args, home);
        node.listen_addr().await;
        nodes.push(node);
    }
    // Both servers are in the DHT (seen by another peer's lookups, not its heartbeats).
    let probe = test_client(&boot_addr).await;
    let model = ModelId::new(MODEL);
    wait_for(START_LIMIT, "both servers' DHT records", || {
        let (probe, model) = (probe.client.clone(), model.clone());
        async move {
            let first = probe.lookup(&model, 0).await.ok()?;
            let second = probe.lookup(&model, NUM_BLOCKS - 1).await.ok()?;
            (!first.is_empty() && !second.is_empty()).then_some(())
        }
    })
    .await;
    let _ = probe.client.shutdown().await;
    // Past the servers' first heartbeats: the next ones are about 15 s away.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let started = Instant::now();
    // MESH_CLIENT_BIN measures another build of the client (an older one, say).
    let bin = std::env::var_os("MESH_CLIENT_BIN").map_or_else(|| binary("mesh-client"), Into::into);
    let mut client = Command::new(bin)
        .args([
            "generate",
            "--bootstrap",
            &boot_addr.to_string(),
            "--model-dir",
            &home.join("model").display().to_string(),
            "--ledger-dir",
            &home.join("client").display().to_string(),
            "--max-tokens",
            "4",
            "--prompt",
            "Once upon a time",
        ])
        .env("MESH_HOME", home)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mesh-client");
    // The prompt and the first token leave together, at the first flush.
    let mut stdout = client.stdout.take().unwrap();
    let first = tokio::task::spawn_blocking(move || {
        let mut byte = [0u8; 1];
        let n = stdout.read(&mut byte).unwrap_or(0);
        let at = started.elapsed();
        let mut rest = Vec::new();
        let _ = stdout.read_to_end(&mut rest);
        (n, at)
    });
    let (n, first_token) = tokio::time::timeout(Duration::from_secs(60), first)
        .await
        .expect("mesh-client printed nothing within 60 s")
        .unwrap();
    let status = client.wait().unwrap();
    let mut stderr = String::new();
    let _ = client.stderr.take().unwrap().read_to_string(&mut stderr);
    println!("time to first token: {:.3} s", first_token.as_secs_f64());
    assert!(
        n > 0 && status.success(),
        "mesh-client failed: {status}\n{stderr}"
    );
    assert!(
        first_token <= FIRST_TOKEN_LIMIT,
        "first token after {:.3} s, over {:.1} s",
        first_token.as_secs_f64(),
        FIRST_TOKEN_LIMIT.as_secs_f64()
    );
}
