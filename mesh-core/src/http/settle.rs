//! `POST /api/settle`: `mesh-node settle` while the node runs. sled lets one process open
//! a store and the running node holds its ledger, so the node settles on the store it
//! already has and answers with the batch.
//!
//! The node first writes the batch into its own ledger directory
//! (`<ledger>/settlements/settlement-<ms>.json`), then marks receipts settled
//! ([`ledger::settle`] writes before it marks): whatever becomes of the answer on its way
//! to the caller, the batch is not lost.
//!
//! The port has no authentication, and this is its only route that changes state, so it
//! answers only requests from this machine: a loopback peer address (even when the port
//! is bound to 0.0.0.0), no proxy headers (a proxy on this machine would make every peer
//! look local), and a `Host` that is an address or `localhost` (a web page that renamed
//! itself to 127.0.0.1, DNS rebinding, still sends its own name). Browsers cannot send the
//! JSON body cross-origin without a preflight this port does not answer.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::rejection::{ExtensionRejection, JsonRejection};
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::HttpState;
use crate::ledger::{self, Batch, LedgerError, SettleOptions, Store};

/// Largest request body `/api/settle` reads (the body is three small fields).
pub const MAX_SETTLE_REQUEST_BYTES: usize = 4 << 10;
/// Where under its ledger directory the node keeps the batches it wrote.
pub const SETTLEMENTS_DIR: &str = "settlements";

/// The body of `POST /api/settle`: the options of `mesh-node settle`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettleRequest {
    /// Only sessions that started at or after this time (ms since the Unix epoch).
    #[serde(default)]
    pub since_ms: u64,
    /// Leave out clients who owe less than this in total (micro-units).
    #[serde(default)]
    pub min_amount: u64,
    /// Write the batch but mark nothing settled.
    #[serde(default)]
    pub dry_run: bool,
    /// Settle nothing, and write no batch, unless the total due reaches this (micro-units):
    /// a payout with a minimum waits for the next one.
    #[serde(default)]
    pub min_total: u64,
}

/// What `/api/settle` answers: the batch and where the node keeps its copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleAnswer {
    pub batch: Batch,
    /// The node's own copy of the batch, on the node's machine (empty when it waited).
    pub path: PathBuf,
    pub dry_run: bool,
    /// The total due was below `min_total`: nothing was written or settled, and `batch` is
    /// what would have been.
    #[serde(default)]
    pub waited: bool,
}

/// Why `/api/settle` settled nothing.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error(
        "refused: the node settles only for requests from its own machine (a loopback \
         address), not from {0}; run `mesh-node settle` on the node's machine"
    )]
    NotLoopback(IpAddr),
    #[error("refused: the peer address of the request is unknown")]
    UnknownPeer,
    #[error(
        "refused: the request came through a proxy (it has a {0} header); run \
         `mesh-node settle` on the node's machine"
    )]
    Proxied(&'static str),
    #[error("refused: Host {0:?} is neither an address nor localhost")]
    ForeignHost(String),
    #[error("the node is still starting")]
    Starting,
    #[error("this node keeps no ledger (billing is off)")]
    NoLedger,
    #[error("another settlement is running: try again once it is done")]
    Busy,
    #[error("settling: {0}")]
    Ledger(#[from] LedgerError),
    #[error("the settle task failed: {0}")]
    Task(String),
}

impl SettleError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotLoopback(_) | Self::UnknownPeer | Self::Proxied(_) | Self::ForeignHost(_) => {
                StatusCode::FORBIDDEN
            }
            Self::Starting => StatusCode::SERVICE_UNAVAILABLE,
            Self::NoLedger => StatusCode::NOT_FOUND,
            Self::Busy => StatusCode::CONFLICT,
            Self::Ledger(_) | Self::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for SettleError {
    fn into_response(self) -> Response {
        (self.status(), format!("{self}\n")).into_response()
    }
}

/// Why a request from `peer` with `headers` may not settle; `None` when it may.
pub fn refusal(peer: Option<SocketAddr>, headers: &HeaderMap) -> Option<SettleError> {
    let Some(peer) = peer else {
        return Some(SettleError::UnknownPeer);
    };
    // An IPv4 peer on a dual-stack socket shows as ::ffff:127.0.0.1.
    if !peer.ip().to_canonical().is_loopback() {
        return Some(SettleError::NotLoopback(peer.ip()));
    }
    for (name, shown) in [
        (header::FORWARDED, "Forwarded"),
        (
            header::HeaderName::from_static("x-forwarded-for"),
            "X-Forwarded-For",
        ),
        (header::HeaderName::from_static("x-real-ip"), "X-Real-IP"),
    ] {
        if headers.contains_key(name) {
            return Some(SettleError::Proxied(shown));
        }
    }
    let host = headers.get(header::HOST)?;
    let host = String::from_utf8_lossy(host.as_bytes()).into_owned();
    let name = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let is_addr = host.parse::<SocketAddr>().is_ok() || bare.parse::<IpAddr>().is_ok();
    if is_addr || name.eq_ignore_ascii_case("localhost") {
        None
    } else {
        Some(SettleError::ForeignHost(host))
    }
}

/// What settling would do, and whether its total due is below `min_total`, so nothing is
/// to be settled yet.
pub fn below_minimum(
    store: &Store,
    opts: &SettleOptions,
    min_total: u64,
) -> Result<Option<Batch>, LedgerError> {
    if min_total == 0 {
        return Ok(None);
    }
    let planned = ledger::plan(store, opts)?;
    Ok((planned.total_due < min_total).then_some(planned))
}

/// [`ledger::settle`] into a fresh file under `<store>/settlements/`: the batch and the
/// file. Callers serialise settlements (two in one millisecond get distinct names).
pub fn settle_in_place(
    store: &Store,
    opts: &SettleOptions,
) -> Result<(Batch, PathBuf), LedgerError> {
    let dir = store.path().join(SETTLEMENTS_DIR);
    std::fs::create_dir_all(&dir).map_err(|source| LedgerError::Io {
        path: dir.clone(),
        source,
    })?;
    let mut path = dir.join(format!("settlement-{}.json", opts.now_ms));
    let mut n = 1u32;
    while path.exists() {
        path = dir.join(format!("settlement-{}-{n}.json", opts.now_ms));
        n = n.saturating_add(1);
    }
    let batch = ledger::settle(store, opts, &path)?;
    Ok((batch, path))
}

impl HttpState {
    /// Settles on the running node's ledger, on a blocking thread, one settlement at a
    /// time; a real settlement drops the cached earnings view so it shows at once.
    pub async fn settle(&self, req: SettleRequest) -> Result<SettleAnswer, SettleError> {
        let node = self.0.node.get().ok_or(SettleError::Starting)?;
        let store = node.ledger().ok_or(SettleError::NoLedger)?.clone();
        let running = Arc::clone(&self.0.settling)
            .try_lock_owned()
            .map_err(|_| SettleError::Busy)?;
        let opts = SettleOptions {
            payee: node.peer_id(),
            since_ms: req.since_ms,
            min_amount: req.min_amount,
            dry_run: req.dry_run,
            now_ms: ledger::now_ms(),
        };
        // The guard and the bookkeeping go with the work: a caller that hangs up does not
        // stop it, and no second settlement starts until it is done.
        let state = self.clone();
        let min_total = req.min_total;
        let (batch, path) = tokio::task::spawn_blocking(move || {
            let _running = running;
            if let Some(planned) = below_minimum(&store, &opts, min_total)? {
                return Ok((planned, None));
            }
            let (batch, path) = settle_in_place(&store, &opts)?;
            if !opts.dry_run {
                state.0.settlements.fetch_add(1, Ordering::SeqCst);
                *state.0.earnings.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
            Ok::<_, LedgerError>((batch, Some(path)))
        })
        .await
        .map_err(|e| SettleError::Task(e.to_string()))??;
        Ok(SettleAnswer {
            batch,
            waited: path.is_none(),
            path: path.unwrap_or_default(),
            dry_run: req.dry_run,
        })
    }
}

/// The `/api/settle` handler: refuses before it reads the body (a 403 whatever was sent).
pub(super) async fn api_settle(
    State(s): State<HttpState>,
    peer: Result<ConnectInfo<SocketAddr>, ExtensionRejection>,
    headers: HeaderMap,
    body: Result<Json<SettleRequest>, JsonRejection>,
) -> Response {
    if let Some(refused) = refusal(peer.ok().map(|ConnectInfo(a)| a), &headers) {
        return refused.into_response();
    }
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => {
            let text = format!(
                "bad settle request: {}; send JSON {{\"since_ms\": N, \"min_amount\": N, \
                 \"dry_run\": BOOL}}\n",
                e.body_text()
            );
            return (e.status(), text).into_response();
        }
    };
    match s.settle(req).await {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use std::time::Duration;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn only_this_machine_may_settle() {
        let local = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        let host = |h: &str| headers(&[("host", h)]);
        for (peer, h) in [
            ("127.0.0.1:5000", host("127.0.0.1:9090")),
            ("[::1]:5000", host("[::1]:9090")),
            ("[::ffff:127.0.0.1]:5000", host("localhost:9090")),
            ("[::1]:5000", host("[::1]")),
            ("127.0.0.1:5000", host("0.0.0.0:9090")),
            ("127.0.0.1:5000", HeaderMap::new()),
        ] {
            assert!(refusal(local(peer), &h).is_none(), "{peer} {h:?}");
        }
        for (peer, h, needle) in [
            ("10.1.2.3:5000", host("127.0.0.1:9090"), "not from 10.1.2.3"),
            (
                "[2001:db8::1]:5000",
                HeaderMap::new(),
                "not from 2001:db8::1",
            ),
            (
                "127.0.0.1:5000",
                headers(&[("x-forwarded-for", "203.0.113.9")]),
                "X-Forwarded-For",
            ),
            ("127.0.0.1:5000", host("evil.example:9090"), "evil.example"),
        ] {
            let e = refusal(local(peer), &h).expect("refused");
            assert_eq!(e.status(), StatusCode::FORBIDDEN);
            assert!(e.to_string().contains(needle), "{e}");
        }
        assert!(matches!(
            refusal(None, &HeaderMap::new()),
            Some(SettleError::UnknownPeer)
        ));
    }

    /// The real router on a real socket: a peer that is not loopback gets 403 (the peer
    /// address is set the way `into_make_service_with_connect_info` sets it); a loopback
    /// one gets through to the node (here still starting); a bad body gets a clear 4xx.
    #[tokio::test]
    async fn a_remote_peer_gets_403_and_a_local_one_gets_through() {
        let state = HttpState::new(crate::probe::probe(&std::env::temp_dir()));
        let remote = SocketAddr::from(([10, 1, 2, 3], 4321));
        let app = super::super::router(state.clone())
            .layer(axum::extract::connect_info::MockConnectInfo(remote));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let remote_addr = listener.local_addr().unwrap();
        let remote_server = tokio::spawn(async move { axum::serve(listener, app).await });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local_addr = listener.local_addr().unwrap();
        let local_server =
            tokio::spawn(super::super::serve(listener, state, std::future::pending()));
        let t = Duration::from_secs(5);
        let body = r#"{"since_ms":0,"min_amount":0,"dry_run":true}"#;
        let post = move |addr, body: &str| {
            super::super::post(addr, "/api/settle", body, t, 1 << 20).unwrap()
        };
        let (remote, local, garbled, huge) = tokio::task::spawn_blocking(move || {
            let huge = format!("{{\"since_ms\":0{}}}", " ".repeat(MAX_SETTLE_REQUEST_BYTES));
            (
                post(remote_addr, body),
                post(local_addr, body),
                post(local_addr, "{\"since\":0}"),
                post(local_addr, &huge),
            )
        })
        .await
        .unwrap();
        assert_eq!(remote.0, 403, "{}", remote.1);
        assert!(remote.1.contains("not from 10.1.2.3"), "{}", remote.1);
        assert_eq!(local.0, 503, "{}", local.1);
        assert!(local.1.contains("still starting"), "{}", local.1);
        assert_eq!(garbled.0, 422, "{}", garbled.1);
        assert!(garbled.1.contains("bad settle request"), "{}", garbled.1);
        assert_eq!(huge.0, 413, "{}", huge.1);
        remote_server.abort();
        local_server.abort();
    }

    #[test]
    fn batches_go_beside_the_ledger_under_fresh_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("ledger")).unwrap();
        let opts = SettleOptions {
            payee: crate::identity::Identity::generate().peer_id(),
            since_ms: 0,
            min_amount: 0,
            dry_run: false,
            now_ms: 1_700_000_000_000,
        };
        let (batch, first) = settle_in_place(&store, &opts).unwrap();
        let (_, second) = settle_in_place(&store, &opts).unwrap();
        let settlements = dir.path().join("ledger").join(SETTLEMENTS_DIR);
        assert_eq!(first, settlements.join("settlement-1700000000000.json"));
        assert_eq!(second, settlements.join("settlement-1700000000000-1.json"));
        assert_eq!(Batch::read(&first).unwrap(), batch);
        assert!(batch.lines.is_empty());
        assert!(Batch::read(&second).unwrap().verify().is_ok());
    }
}
