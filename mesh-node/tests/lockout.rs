//! One host cannot lock everyone out by holding connections half-open: 127.0.0.2 keeps
//! 120 plain TCP connections open to the bootstrap and to the node (sending nothing,
//! reconnecting whenever one is closed), while a `mesh-client` from 127.0.0.1 joins and
//! generates. Pending (not yet handshaken) inbound connections are capped per host, the
//! rest refused before the handshake and counted in the node's `/metrics`.
//!
//! Needs the binaries: `cargo build --workspace --bins && cargo test --workspace`.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use mesh_core::p2p::{Multiaddr, Protocol};
use mesh_core::BlockRange;
use tokio::io::AsyncReadExt;
use tokio::net::TcpSocket;

/// Connections the attacker holds against each target.
const HELD: usize = 120;
/// Longest the honest generation may take, joining included.
const CLIENT_LIMIT: Duration = Duration::from_secs(60);

fn tcp_addr(addr: &Multiaddr) -> SocketAddr {
    let mut ip = None;
    let mut port = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(v) => ip = Some(v.into()),
            Protocol::Tcp(v) => port = Some(v),
            _ => {}
        }
    }
    SocketAddr::new(ip.expect("ip4"), port.expect("tcp"))
}

/// `HELD` connections from 127.0.0.2 to `target`, each re-opened 5 ms after the other
/// side closes it (at once, near enough, to take every slot that frees), until `stop`.
/// Counts the connections opened.
fn attack(target: SocketAddr, stop: Arc<AtomicBool>, opened: Arc<AtomicU64>) {
    for _ in 0..HELD {
        let (stop, opened) = (stop.clone(), opened.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let socket = TcpSocket::new_v4().unwrap();
                socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
                if let Ok(mut s) = socket.connect(target).await {
                    opened.fetch_add(1, Ordering::Relaxed);
                    let mut buf = [0u8; 256];
                    // Send nothing; wait until the other side gives up (or the test ends).
                    loop {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let read =
                            tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf));
                        if let Ok(Ok(0) | Err(_)) = read.await {
                            break;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_holding_pending_connections_locks_only_itself_out() {
    let dir = tempfile::tempdir().unwrap();
    let (_boot, boot_addr) = start_bootstrap(dir.path()).await;
    let args = node_args(
        dir.path(),
        "node",
        BlockRange::new(0, NUM_BLOCKS),
        &[&boot_addr],
    );
    let node = Proc::spawn("node", "mesh-node", &args, dir.path());
    let node_addr = node.listen_addr().await;
    wait_for(START_LIMIT, "the node to serve", || {
        let serving = node.has_line(|l| l.starts_with("serving "));
        async move { serving.then_some(()) }
    })
    .await;
    let http: SocketAddr = node
        .lines()
        .iter()
        .find_map(|l| l.strip_prefix("http on ").map(|a| a.parse().unwrap()))
        .expect("http on");

    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicU64::new(0));
    attack(tcp_addr(&boot_addr), stop.clone(), opened.clone());
    attack(tcp_addr(&node_addr), stop.clone(), opened.clone());
    // Let the attacker fill what it can.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(opened.load(Ordering::Relaxed) >= 2 * HELD as u64);

    let client_home = dir.path().join("client");
    let started = Instant::now();
    let mut child = Command::new(binary("mesh-client"))
        .args([
            "generate",
            "--model",
            MODEL,
            "--bootstrap",
            &boot_addr.to_string(),
            "--max-tokens",
            "8",
            "--prompt",
            "Hello mesh",
        ])
        .env("MESH_HOME", &client_home)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mesh-client");
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > CLIENT_LIMIT {
            let _ = child.kill();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "the honest client failed under the attack ({status:?} after {:?}, {} attacker \
         connections opened):\nstdout: {stdout}\nstderr: {stderr}",
        started.elapsed(),
        opened.load(Ordering::Relaxed)
    );
    assert!(stdout.contains("route:"), "{stdout}");

    // The node counted what it refused.
    let (code, metrics) = mesh_core::http::get(http, "/metrics", Duration::from_secs(10)).unwrap();
    assert_eq!(code, 200);
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("mesh_pending_connections_refused_per_ip_total "))
        .unwrap_or_else(|| panic!("no pending refusals in /metrics:\n{metrics}"))
        .trim()
        .parse()
        .unwrap();
    assert!(refused > 0, "{metrics}");
    stop.store(true, Ordering::Relaxed);
}
