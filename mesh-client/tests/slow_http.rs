//! Slow HTTP clients against the node's HTTP port and the OpenAI gateway, over real
//! sockets: a host at 127.0.0.2 opens hundreds of connections that send half a header
//! (slowloris), and one that sends its headers but trickles the body. The servers must
//! close them (header and body timeouts), hold no more than their cap from that host, and
//! keep answering an honest request from 127.0.0.1 all along.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Connections the attacker opens.
const SLOW: usize = 300;
/// The most the servers keep open from one host (`HttpLimits::default()`).
const PER_HOST: usize = 32;
/// Longest the servers may leave a half-sent header (or body) open: the default header
/// timeout (10 s) or body timeout (15 s), plus slack for a loaded 2-core machine.
const HEADER_LIMIT: Duration = Duration::from_secs(14);
const BODY_LIMIT: Duration = Duration::from_secs(20);

/// A connection to `addr` from the attacker's address, 127.0.0.2.
async fn from_attacker(addr: SocketAddr) -> std::io::Result<TcpStream> {
    from(addr, "127.0.0.2").await
}

/// A connection to `addr` from the loopback address `ip`.
async fn from(addr: SocketAddr, ip: &str) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(ip.parse().unwrap(), 0))?;
    socket.connect(addr).await
}

/// True once the server closed `s` (EOF, reset, or an answer such as 408 then EOF).
async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// An honest `GET path` from 127.0.0.1 answers with a status line, within 5 s.
async fn honest_get(addr: SocketAddr, path: &str) {
    let req = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&out).into_owned())
    };
    let answer = tokio::time::timeout(Duration::from_secs(5), req)
        .await
        .unwrap_or_else(|_| panic!("honest GET {path} unanswered within 5 s"))
        .unwrap_or_else(|e| panic!("honest GET {path}: {e}"));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// The attack on `addr`, with an honest request to `get` while it holds.
async fn slow_clients_are_cut_off(addr: SocketAddr, get: &str, post: &str) {
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..SLOW {
        let mut s = from_attacker(addr).await.expect("connect from 127.0.0.2");
        // Half a request line and header: never finished.
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ").await;
        slow.push(s);
    }
    // From other hosts (the first one's are over its cap by now): headers complete and a
    // body promised and never sent in full; and a connection that sends nothing at all.
    let mut silent = from(addr, "127.0.0.4").await.unwrap();
    let mut body = from(addr, "127.0.0.3").await.unwrap();
    let _ = body
        .write_all(
            format!(
                "POST {post} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                 Content-Length: 1000\r\n\r\n{{\"a\":"
            )
            .as_bytes(),
        )
        .await;

    honest_get(addr, get).await;

    // Over the per-host cap, connections are closed at once.
    let mut held = 0;
    for s in &mut slow {
        if !closed_within(s, Duration::from_millis(20)).await {
            held += 1;
        }
    }
    assert!(
        held <= PER_HOST,
        "{held} of {SLOW} connections from 127.0.0.2 held (cap {PER_HOST})"
    );

    let mut open = 0;
    for s in &mut slow {
        let left = HEADER_LIMIT.saturating_sub(started.elapsed());
        if !closed_within(s, left).await {
            open += 1;
        }
    }
    assert_eq!(
        open,
        0,
        "{open} of {SLOW} half-header connections from 127.0.0.2 still open after {:?}",
        started.elapsed()
    );
    let left = HEADER_LIMIT.saturating_sub(started.elapsed());
    assert!(
        closed_within(&mut silent, left).await,
        "a connection that sent nothing still open after {:?}",
        started.elapsed()
    );
    // The body's sender hears why: 408.
    let mut answer = Vec::new();
    let left = BODY_LIMIT.saturating_sub(started.elapsed());
    let read = tokio::time::timeout(left, body.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        read.is_ok() && answer.starts_with("HTTP/1.1 408"),
        "a trickled body after {:?}: {read:?} {answer}",
        started.elapsed()
    );
    honest_get(addr, get).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_cannot_hold_the_node_http_port() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = mesh_core::http::HttpState::new(mesh_core::probe::probe(dir.path()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(mesh_core::http::serve(listener, state, async {
        let _ = stopped.await;
    }));
    slow_clients_are_cut_off(addr, "/healthz", "/api/settle").await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_cannot_hold_the_openai_gateway() {
    let common::Running {
        dir: _dir,
        mesh,
        client,
    } = common::three_node_mesh().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(mesh_client::openai::serve(client, listener, async {
        let _ = stopped.await;
    }));
    slow_clients_are_cut_off(addr, "/v1/models", "/v1/completions").await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    mesh.stop().await.unwrap();
}
