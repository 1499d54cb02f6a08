//! One port, one process: a second `mesh-bootstrap` or `mesh-node` on a port already in
//! use fails at once with "port in use", over TCP and over QUIC, instead of sharing the
//! port (libp2p's TCP listeners set SO_REUSEPORT, so the kernel would let both listen and
//! split the connections between them).
//!
//! Needs the binaries: `cargo build --workspace --bins && cargo test --workspace`.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// How long the second process may take to give up.
const EXIT_LIMIT: Duration = Duration::from_secs(20);

/// A loopback TCP port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (bounded) for `p` to exit and returns its stderr; panics if it is still running.
fn exit_stderr(p: &mut Proc) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + EXIT_LIMIT;
    loop {
        if let Some(status) = p.exited() {
            return (status, p.stderr());
        }
        assert!(
            Instant::now() < deadline,
            "{} still running after {EXIT_LIMIT:?} on a port another process holds; \
             stdout: {:?}",
            p.name,
            p.lines()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assert_port_in_use(p: &mut Proc, addr: &str) {
    let (status, err) = exit_stderr(p);
    assert!(!status.success(), "{} exited with {status}", p.name);
    let line = err
        .lines()
        .find(|l| l.contains("cannot listen on"))
        .unwrap_or_else(|| panic!("no 'cannot listen on' line:\n{err}"));
    assert!(line.contains(addr), "{line}");
    assert!(line.contains("port in use"), "{line}");
    assert!(!line.trim_end().ends_with(':'), "an empty cause: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_a_port_fails_with_port_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let tcp = format!("/ip4/127.0.0.1/tcp/{port}");
    let quic = format!("/ip4/127.0.0.1/udp/{port}/quic-v1");
    let key = |name: &str| dir.path().join(name).display().to_string();
    let args = |listen: &str, name: &str| -> Vec<String> {
        vec![
            "--listen".into(),
            listen.into(),
            "--key".into(),
            key(&format!("{name}.key")),
        ]
    };
    let first = Proc::spawn("first", "mesh-bootstrap", &args(&tcp, "first"), dir.path());
    let boot_addr = first.listen_addr().await;

    // TCP: a second bootstrap, then a node, on the first one's port.
    let mut second = Proc::spawn(
        "second",
        "mesh-bootstrap",
        &args(&tcp, "second"),
        dir.path(),
    );
    assert_port_in_use(&mut second, &tcp);
    let mut node_args = node_args(
        dir.path(),
        "node",
        mesh_core::BlockRange::new(0, NUM_BLOCKS),
        &[&boot_addr],
    );
    let i = node_args.iter().position(|a| a == "--listen").unwrap();
    node_args[i + 1] = tcp.clone();
    let mut node = Proc::spawn("node", "mesh-node", &node_args, dir.path());
    assert_port_in_use(&mut node, &tcp);

    // QUIC: the same, and the cause is said, not left empty.
    let quic_first = Proc::spawn(
        "quic-first",
        "mesh-bootstrap",
        &args(&quic, "q1"),
        dir.path(),
    );
    quic_first.listen_addr().await;
    let mut quic_second = Proc::spawn(
        "quic-second",
        "mesh-bootstrap",
        &args(&quic, "q2"),
        dir.path(),
    );
    assert_port_in_use(&mut quic_second, &quic);
}
