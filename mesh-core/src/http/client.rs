//! A tiny blocking HTTP/1.0 client for the node's own port: `mesh-node status`,
//! `earnings` and `settle` talk to a running node with it, and tests check the routes.
//!
//! No async runtime and no HTTP crate on the command-line side: one request, one
//! `Connection: close` answer. Every exchange is bounded in time (one deadline for the
//! connect, the request and the whole answer) and in size (an answer over the cap is an
//! error, never silently cut).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Largest answer [`get`] reads.
pub const MAX_GET_BYTES: u64 = 4 << 20;

/// A blocking `GET path`: the status code and body. The answer is capped at
/// [`MAX_GET_BYTES`] and the whole exchange at `timeout`.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    request(addr, "GET", path, None, timeout, MAX_GET_BYTES)
}

/// A blocking `POST path` with a JSON body: the status code and body. The answer is capped
/// at `max_bytes` (a settlement batch can be far bigger than a status page) and the whole
/// exchange at `timeout`.
pub fn post(
    addr: SocketAddr,
    path: &str,
    json: &str,
    timeout: Duration,
    max_bytes: u64,
) -> std::io::Result<(u16, String)> {
    request(addr, "POST", path, Some(json), timeout, max_bytes)
}

fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    json: Option<&str>,
    timeout: Duration,
    max_bytes: u64,
) -> std::io::Result<(u16, String)> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_write_timeout(Some(left(deadline)?))?;
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(body) = json {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(json.unwrap_or("").as_bytes())?;
    stream.flush()?;
    let raw = read_capped(&mut stream, deadline, max_bytes)?;
    let text = String::from_utf8_lossy(&raw);
    let bad = || std::io::Error::new(ErrorKind::InvalidData, "not an HTTP response");
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    Ok((code, body.to_owned()))
}

/// Time left before `deadline`, or a timeout error.
fn left(deadline: Instant) -> std::io::Result<Duration> {
    let d = deadline.saturating_duration_since(Instant::now());
    if d.is_zero() {
        return Err(timed_out());
    }
    Ok(d)
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(ErrorKind::TimedOut, "no complete answer in time")
}

/// Reads to the end of the stream: at most `max_bytes` (plus the head) and by `deadline`.
fn read_capped(
    stream: &mut TcpStream,
    deadline: Instant,
    max_bytes: u64,
) -> std::io::Result<Vec<u8>> {
    // Room for the status line and headers on top of the body.
    let cap = max_bytes.saturating_add(16 << 10);
    let mut raw = Vec::new();
    let mut chunk = [0u8; 64 << 10];
    loop {
        stream.set_read_timeout(Some(left(deadline)?))?;
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Ok(raw),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(timed_out());
            }
            Err(e) => return Err(e),
        };
        if raw.len() as u64 + n as u64 > cap {
            return Err(std::io::Error::new(
                ErrorKind::InvalidData,
                format!("answer larger than {max_bytes} bytes"),
            ));
        }
        raw.extend_from_slice(&chunk[..n]);
    }
}
