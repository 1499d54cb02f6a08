//! Serving HTTP so that slow clients cannot hold a port.
//!
//! `axum::serve` sets no header timeout, no body timeout and no connection cap: a host
//! that opens hundreds of connections and sends half a header (slowloris), or headers and
//! then a trickle of body, holds each of them for ever, and with them file descriptors and
//! tasks. [`serve`] is the same server with bounds, used by the node's HTTP port and the
//! OpenAI gateway:
//! - a connection must send its whole request head within [`HttpLimits::header_timeout`]
//!   (hyper's header read timeout, which also ends idle keep-alive connections);
//! - a request body must arrive within [`HttpLimits::body_timeout`] (answered `408`) and
//!   be at most [`HttpLimits::max_body_bytes`] (`413`), read before any handler runs;
//! - at most [`HttpLimits::max_connections`] connections at once, and at most
//!   [`HttpLimits::max_connections_per_ip`] from one host (an IPv4 address, or an IPv6
//!   /64), so one host can lock only itself out. A connection over either cap is closed at
//!   once, before anything is read from it.
//!
//! Handlers see the peer address as `ConnectInfo<SocketAddr>`, as with
//! `into_make_service_with_connect_info`.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// The bounds [`serve`] holds every connection to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections open at once, from everyone.
    pub max_connections: usize,
    /// Connections open at once from one host.
    pub max_connections_per_ip: usize,
    /// Time to send a whole request head (also the keep-alive idle limit).
    pub header_timeout: Duration,
    /// Time to send a whole request body, once the head is in.
    pub body_timeout: Duration,
    /// Largest request body.
    pub max_body_bytes: usize,
}

impl Default for HttpLimits {
    /// Generous for people and scripts (a request head in 10 s, a body in 15 s, 32
    /// connections from one host), tight enough that holding connections costs an
    /// attacker as much as it costs us.
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_connections_per_ip: 32,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(15),
            max_body_bytes: 2 << 20,
        }
    }
}

/// How long a shutdown waits for open connections to finish their current request.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` within `limits` until `shutdown` resolves; then stops
/// accepting, lets each connection finish its current request (up to 5 s) and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = app.layer(middleware::from_fn_with_state(limits, read_body_in_time));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let hosts = Hosts::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        // Finished connections leave the set as they go, so it holds only open ones.
        while conns.try_join_next().is_some() {}
        let (stream, remote) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!("http accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(host_slot) = hosts.admit(remote.ip(), limits.max_connections_per_ip) else {
            tracing::debug!(%remote, "http connection refused: per-host cap");
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%remote, "http connection refused: connection cap");
            continue;
        };
        let svc = TowerToHyperService::new(app.clone().layer(Extension(ConnectInfo(remote))));
        let mut stop = stop_rx.clone();
        conns.spawn(async move {
            let _held = (slot, host_slot);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                // The guard `wait_for` returns is not Send: drop it inside.
                () = async { drop(stop.wait_for(|&s| s).await) } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
                }
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while conns.join_next().await.is_some() {}
    Ok(())
}

/// Reads the whole body, bounded in time and size, before the handler runs: a handler's
/// extractor would otherwise wait on a trickling client for as long as it trickles.
async fn read_body_in_time(State(limits): State<HttpLimits>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let read = axum::body::to_bytes(body, limits.max_body_bytes);
    match tokio::time::timeout(limits.body_timeout, read).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(_)) => (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body unreadable or over {} bytes",
                limits.max_body_bytes
            ),
        )
            .into_response(),
        Err(_) => (
            StatusCode::REQUEST_TIMEOUT,
            format!("request body not received within {:?}", limits.body_timeout),
        )
            .into_response(),
    }
}

/// Open connections per host.
#[derive(Clone, Default)]
struct Hosts(Arc<Mutex<HashMap<IpAddr, usize>>>);

impl Hosts {
    /// A slot for one more connection from `ip`, or None when its host holds `cap`.
    fn admit(&self, ip: IpAddr, cap: usize) -> Option<HostSlot> {
        let host = host_of(ip);
        let mut map = self.0.lock().ok()?;
        let n = map.entry(host).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(HostSlot {
            hosts: self.clone(),
            host,
        })
    }
}

/// One counted connection; uncounted when dropped.
struct HostSlot {
    hosts: Hosts,
    host: IpAddr,
}

impl Drop for HostSlot {
    fn drop(&mut self) {
        if let Ok(mut map) = self.hosts.0.lock() {
            if let Some(n) = map.get_mut(&self.host) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&self.host);
                }
            }
        }
    }
}

/// The host an address belongs to: the IPv4 address (also written IPv4-mapped), or the
/// IPv6 /64, since one home or machine is handed a whole /64.
fn host_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_host_has_its_own_cap_and_slots_come_back() {
        let hosts = Hosts::default();
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        let held: Vec<_> = (0..2).map(|_| hosts.admit(a, 2).unwrap()).collect();
        assert!(hosts.admit(a, 2).is_none());
        assert!(hosts
            .admit("::ffff:192.0.2.7".parse().unwrap(), 2)
            .is_none());
        assert!(hosts.admit("198.51.100.1".parse().unwrap(), 2).is_some());
        let v6 = hosts.admit("2001:db8::1".parse().unwrap(), 1).unwrap();
        assert!(hosts.admit("2001:db8::2".parse().unwrap(), 1).is_none());
        drop(v6);
        drop(held);
        assert!(hosts.admit(a, 2).is_some());
        assert!(hosts.0.lock().unwrap().len() <= 1);
    }
}
