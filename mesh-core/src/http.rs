//! The node's local HTTP port: `/healthz` (JSON), `/metrics` (Prometheus text, built in
//! `http/prometheus.rs`), `/api/earnings` (JSON, from the node's own ledger,
//! [`earnings`]), `POST /api/settle` (`mesh-node settle` on the running node, this machine
//! only, [`settle`]) and `/` (a dashboard page with inline SVG charts and no external
//! assets, built in `http/dashboard.rs`). [`get`] and [`post`] are the blocking client the
//! commands use. [`bounded::serve`] serves it (and the OpenAI gateway) with header and
//! body timeouts and connection caps, so slow clients cannot hold the port.
//!
//! ```no_run
//! # async fn demo(node: &mesh_core::node::Node) -> std::io::Result<()> {
//! use mesh_core::http::{serve, HttpState};
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9090").await?;
//! let state = HttpState::new(mesh_core::probe::probe(std::path::Path::new(".")));
//! state.set_node(node.handle());
//! tokio::spawn(state.clone().sample(std::time::Duration::from_secs(10)));
//! serve(listener, state, std::future::pending()).await
//! # }
//! ```
//!
//! Every status handler only reads figures already at hand: the worker's latest snapshot
//! (a `watch` channel), peer counts and the chart's history that a sampler task
//! ([`HttpState::sample`]) refreshes on a timer, and the latest GPU reading (the node's,
//! read for every heartbeat; the sampler's while the node starts). No handler waits on the
//! span worker, the swarm or the GPU driver. Earnings and settlements use the ledger the
//! node holds open (sled allows one opener, so this is how `mesh-node earnings` and
//! `settle` reach a running node's), on a blocking thread.
//! The port is meant for 127.0.0.1 (or a firewalled network): it shows operational
//! figures and has no authentication; the one route that changes state, `/api/settle`,
//! answers only requests from this machine.

pub mod bounded;
mod client;
mod dashboard;
pub mod earnings;
mod prometheus;
pub mod schedule;
pub mod settle;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

pub use bounded::HttpLimits;
pub use client::{get, post, MAX_GET_BYTES};
pub use earnings::EarningsView;
pub use settle::{SettleAnswer, SettleError, SettleRequest};

use crate::node::NodeHandle;
use crate::p2p::P2pStats;
use crate::probe::{self, Gpu, GpuReadings, Probe};
use crate::types::GpuLive;

/// Points kept for the dashboard's chart (an hour at the default 10 s sampling).
pub const HISTORY_POINTS: usize = 360;
/// How often [`HttpState::sample`] reads the GPUs while the node starts, at most.
pub const STARTING_SAMPLE: Duration = Duration::from_secs(2);
/// How long the dashboard reuses an earnings view before reading the ledger again.
pub const EARNINGS_CACHE: Duration = Duration::from_secs(5);

/// Why [`HttpState::earnings`] has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EarningsError {
    #[error("the node is still starting")]
    Starting,
    #[error("this node keeps no ledger (billing is off)")]
    NoLedger,
    #[error("reading the ledger: {0}")]
    Ledger(String),
}

/// What `/healthz` answers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// `starting` (loading the span), `serving`, or `degraded` (serving, but its ledger
    /// failed, so it opens no billed sessions: see `degraded`).
    pub status: String,
    /// Why the node is degraded; `None` when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
    pub running: bool,
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    pub peer_id: Option<String>,
    pub model: Option<String>,
    /// `START..END`.
    pub span: Option<String>,
    pub num_blocks: Option<u32>,
    pub price_per_token: Option<u64>,
    pub listen_addrs: Vec<String>,
    pub sessions: usize,
    pub sessions_opened: u64,
    /// Requests waiting for the span worker.
    pub queue: usize,
    /// Token positions run through the span (prefill + decode).
    pub tokens_served: u64,
    pub prefill_tokens: u64,
    pub decode_tokens: u64,
    pub peers: usize,
    pub memory: HealthMemory,
    /// The GPUs found at start-up, their VRAM figures updated from `gpu_live`.
    pub vram: Vec<Gpu>,
    /// Each GPU's memory and utilisation as last read (about once per heartbeat); empty
    /// without GPUs (or from a node that predates the field).
    #[serde(default)]
    pub gpu_live: Vec<GpuLive>,
    /// The CPU now (absent from a node that predates the field).
    #[serde(default)]
    pub cpu: HealthCpu,
    /// Settlement on a schedule (`[settle] every`); absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settle: Option<schedule::ScheduleStatus>,
    /// Whether peers can dial this node (AutoNAT), its relay addresses, UPnP; `None`
    /// before the first sample (or from a node that predates the field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reach: Option<crate::p2p::NatReport>,
}

/// The CPU now: the machine's load averages (runnable tasks: compare them with `cores`)
/// and the share of a core this process used over the last sample interval.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthCpu {
    pub cores: usize,
    pub load_1m: Option<f64>,
    pub load_5m: Option<f64>,
    pub load_15m: Option<f64>,
    /// Percent of one core (200 is two cores busy); `None` until two samples were taken.
    pub process_percent: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthMemory {
    pub process_rss_bytes: Option<u64>,
    pub available_bytes: Option<u64>,
    pub total_bytes: Option<u64>,
    pub kv_reserved_bytes: usize,
    pub kv_free_bytes: usize,
}

#[derive(Default)]
struct Sampled {
    /// The swarm's counters at the last sample.
    p2p: P2pStats,
    /// Reachability at the last sample.
    nat: Option<crate::p2p::NatReport>,
    /// `(unix seconds, tokens served)`.
    history: VecDeque<(u64, u64)>,
    /// This process's CPU seconds at the last sample, and when.
    cpu_at: Option<(Instant, f64)>,
    /// Percent of a core this process used between the last two samples.
    cpu_percent: Option<f64>,
}

struct Inner {
    started: Instant,
    probe: Probe,
    /// GPU readings while the node starts; once it is up, the node's are used.
    gpu: GpuReadings,
    node: OnceLock<NodeHandle>,
    sampled: Mutex<Sampled>,
    earnings: Mutex<Option<(Instant, Arc<EarningsView>)>>,
    /// Held while a settlement runs: one at a time.
    settling: Arc<tokio::sync::Mutex<()>>,
    /// Settlements so far: an earnings scan that overlapped one is not cached.
    settlements: AtomicU64,
    /// The settlement schedule's status, once it runs.
    schedule: Mutex<Option<schedule::ScheduleStatus>>,
}

/// Shared by the handlers: the machine probe, the node once it is up, sampled figures.
#[derive(Clone)]
pub struct HttpState(Arc<Inner>);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl HttpState {
    /// State for a node still starting: `/healthz` says `starting` until [`Self::set_node`].
    pub fn new(probe: Probe) -> Self {
        Self::with_gpu(probe, GpuReadings::new())
    }

    /// Like [`Self::new`], with GPU readings from `gpu` until the node is up (tests supply
    /// their own with [`GpuReadings::with_reader`] or [`GpuReadings::set`]).
    pub fn with_gpu(probe: Probe, gpu: GpuReadings) -> Self {
        Self(Arc::new(Inner {
            started: Instant::now(),
            probe,
            gpu,
            node: OnceLock::new(),
            sampled: Mutex::new(Sampled::default()),
            earnings: Mutex::new(None),
            settling: Arc::new(tokio::sync::Mutex::new(())),
            settlements: AtomicU64::new(0),
            schedule: Mutex::new(None),
        }))
    }

    /// The node is up; the first call wins.
    pub fn set_node(&self, node: NodeHandle) {
        let tokens = tokens(&node);
        if self.0.node.set(node).is_ok() {
            self.push_point(tokens);
        }
    }

    fn sampled(&self) -> std::sync::MutexGuard<'_, Sampled> {
        // A panic elsewhere cannot leave these counters inconsistent: keep serving.
        self.0.sampled.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push_point(&self, tokens: u64) {
        let mut s = self.sampled();
        if s.history.len() == HISTORY_POINTS {
            s.history.pop_front();
        }
        s.history.push_back((unix_now(), tokens));
    }

    /// The GPUs now, as last read: by the node for its heartbeats once it is up, by
    /// [`Self::sample`] before. Never waits on the driver; empty without GPUs.
    pub fn gpu_live(&self) -> Vec<GpuLive> {
        match self.0.node.get() {
            Some(node) => node.gpu_live(),
            None => self.0.gpu.latest(),
        }
    }

    /// Refreshes the peer figures and adds a chart point once the node is up and then
    /// every `every`; before, reads the GPUs every `every` (at most [`STARTING_SAMPLE`]:
    /// loading a span fills VRAM, worth watching). Runs until dropped (spawn it, abort it
    /// at shutdown).
    pub async fn sample(self, every: Duration) {
        while self.0.node.get().is_none() {
            self.sample_cpu();
            self.0.gpu.refresh().await;
            tokio::time::sleep(every.min(STARTING_SAMPLE)).await;
        }
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            self.sample_cpu();
            let Some(node) = self.0.node.get() else {
                continue;
            };
            let stats = tokio::time::timeout(Duration::from_secs(2), node.client().stats()).await;
            if let Ok(Ok(stats)) = stats {
                self.sampled().p2p = stats;
            }
            let nat =
                tokio::time::timeout(Duration::from_secs(2), node.client().nat_report()).await;
            if let Ok(Ok(nat)) = nat {
                self.sampled().nat = Some(nat);
            }
            self.push_point(tokens(node));
        }
    }

    /// Reads this process's CPU time; with the last reading, the share of a core used.
    fn sample_cpu(&self) {
        let Some(secs) = probe::process_cpu_seconds() else {
            return;
        };
        let now = Instant::now();
        let mut s = self.sampled();
        if let Some((at, before)) = s.cpu_at {
            let wall = now.duration_since(at).as_secs_f64();
            if wall > 0.0 {
                s.cpu_percent =
                    Some(((secs - before).max(0.0) / wall * 100.0 * 10.0).round() / 10.0);
            }
        }
        s.cpu_at = Some((now, secs));
    }

    /// The CPU now ([`HealthCpu`]).
    pub fn cpu(&self) -> HealthCpu {
        let load = probe::load_average();
        HealthCpu {
            cores: self.0.probe.cpu.cores,
            load_1m: load.map(|l| l[0]),
            load_5m: load.map(|l| l[1]),
            load_15m: load.map(|l| l[2]),
            process_percent: self.sampled().cpu_percent,
        }
    }

    /// The `/healthz` body.
    pub fn health(&self) -> Health {
        let meminfo = probe::probe_memory();
        // One lock at a time: a guard taken inside the literal below would live to its end.
        let (peers, reach) = {
            let sampled = self.sampled();
            (sampled.p2p.connected_peers, sampled.nat.clone())
        };
        let mut h = Health {
            status: "starting".into(),
            running: true,
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_secs: self.0.started.elapsed().as_secs(),
            memory: HealthMemory {
                process_rss_bytes: probe::process_rss_bytes(),
                available_bytes: meminfo.available_bytes,
                total_bytes: meminfo.total_bytes,
                ..HealthMemory::default()
            },
            vram: self.0.probe.gpus.clone(),
            gpu_live: self.gpu_live(),
            cpu: self.cpu(),
            settle: self.schedule_status(),
            peers,
            reach,
            ..Health::default()
        };
        for g in &mut h.vram {
            if let Some(live) = h.gpu_live.iter().find(|l| l.index == g.index) {
                g.vram_free_bytes = Some(live.memory_free_bytes);
                g.vram_total_bytes = Some(live.memory_total_bytes);
            }
        }
        if let Some(node) = self.0.node.get() {
            let snap = node.snapshot();
            let ann = node.announcement();
            h.status = "serving".into();
            if let Some(why) = &snap.ledger_failure {
                h.status = "degraded".into();
                h.degraded = Some(format!("ledger failed: {why}"));
            }
            h.peer_id = Some(node.peer_id().to_string());
            h.model = Some(ann.model.to_string());
            h.span = Some(format!("{}..{}", ann.span.start, ann.span.end));
            h.num_blocks = Some(ann.num_blocks);
            h.price_per_token = Some(ann.price_per_token);
            h.listen_addrs = node.listen_addrs().iter().map(|a| a.to_string()).collect();
            h.sessions = snap.active_sessions;
            h.sessions_opened = snap.stats.sessions_opened;
            h.queue = snap.queued;
            h.prefill_tokens = snap.stats.prefill_tokens;
            h.decode_tokens = snap.stats.decode_tokens;
            h.tokens_served = snap.stats.prefill_tokens + snap.stats.decode_tokens;
            h.memory.kv_reserved_bytes = snap.reserved_bytes;
            h.memory.kv_free_bytes = snap.free_cache_bytes;
        }
        h
    }

    /// The dashboard page. The earnings part reads the ledger (see [`Self::earnings`]).
    pub async fn dashboard(&self) -> String {
        let h = self.health();
        let mut tokens: Vec<(u64, u64)> = self
            .sampled()
            .history
            .iter()
            .map(|&(t, v)| (t.saturating_mul(1000), v))
            .collect();
        tokens.push((unix_now().saturating_mul(1000), h.tokens_served));
        let earnings = self.earnings(0).await;
        let capability = self.0.node.get().map(|n| &n.announcement().capability);
        dashboard::render(&dashboard::Page {
            health: &h,
            probe: &self.0.probe,
            capability,
            tokens: &tokens,
            earnings: match &earnings {
                Err(EarningsError::Starting) => dashboard::Earnings::Starting,
                Err(EarningsError::NoLedger) => dashboard::Earnings::NoLedger,
                Err(EarningsError::Ledger(why)) => dashboard::Earnings::Failed(why),
                Ok(view) => dashboard::Earnings::View(view),
            },
        })
    }

    /// What the node earned for sessions started at or after `since_ms`, from its running
    /// ledger. Read on a blocking thread; the full view (`since_ms` 0, what the dashboard
    /// shows) is reused for [`EARNINGS_CACHE`] so reloading pages never scans repeatedly.
    pub async fn earnings(&self, since_ms: u64) -> Result<Arc<EarningsView>, EarningsError> {
        let node = self.0.node.get().ok_or(EarningsError::Starting)?;
        let store = node.ledger().ok_or(EarningsError::NoLedger)?.clone();
        if since_ms == 0 {
            let cached = self.0.earnings.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, view)) = cached.as_ref() {
                if at.elapsed() < EARNINGS_CACHE {
                    return Ok(view.clone());
                }
            }
        }
        let payee = node.peer_id();
        let settlements = self.0.settlements.load(Ordering::SeqCst);
        let view =
            tokio::task::spawn_blocking(move || earnings::earnings_view(&store, &payee, since_ms))
                .await
                .map_err(|e| EarningsError::Ledger(e.to_string()))?
                .map_err(|e| EarningsError::Ledger(e.to_string()))?;
        let view = Arc::new(view);
        if since_ms == 0 && settlements == self.0.settlements.load(Ordering::SeqCst) {
            *self.0.earnings.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((Instant::now(), view.clone()));
        }
        Ok(view)
    }
}

fn tokens(node: &NodeHandle) -> u64 {
    let s = node.snapshot().stats;
    s.prefill_tokens + s.decode_tokens
}

/// Escapes a Prometheus label value.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

async fn healthz(State(s): State<HttpState>) -> Json<Health> {
    Json(s.health())
}

async fn metrics(State(s): State<HttpState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics_text(),
    )
        .into_response()
}

async fn dashboard(State(s): State<HttpState>) -> Html<String> {
    Html(s.dashboard().await)
}

#[derive(Deserialize)]
struct EarningsQuery {
    since_ms: Option<u64>,
}

async fn api_earnings(State(s): State<HttpState>, Query(q): Query<EarningsQuery>) -> Response {
    match s.earnings(q.since_ms.unwrap_or(0)).await {
        Ok(view) => Json(view.as_ref().clone()).into_response(),
        Err(e) => {
            let code = match e {
                EarningsError::Starting => StatusCode::SERVICE_UNAVAILABLE,
                EarningsError::NoLedger => StatusCode::NOT_FOUND,
                EarningsError::Ledger(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            (code, Json(serde_json::json!({ "error": e.to_string() }))).into_response()
        }
    }
}

async fn not_found() -> (StatusCode, &'static str) {
    (
        StatusCode::NOT_FOUND,
        "not found: try /, /healthz, /metrics, /api/earnings or POST /api/settle\n",
    )
}

/// The routes, for tests that drive them without a socket.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/", routing::get(dashboard))
        .route("/healthz", routing::get(healthz))
        .route("/metrics", routing::get(metrics))
        .route("/api/earnings", routing::get(api_earnings))
        .route(
            "/api/settle",
            routing::post(settle::api_settle)
                .layer(DefaultBodyLimit::max(settle::MAX_SETTLE_REQUEST_BYTES)),
        )
        .fallback(not_found)
        .with_state(state)
}

/// Serves the routes on `listener` until `shutdown` resolves. Handlers see each
/// connection's peer address (`/api/settle` answers loopback peers only).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Bounded: slow clients are cut off and capped per host (http/bounded.rs).
    bounded::serve(listener, router(state), HttpLimits::default(), shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_starting_node_answers_every_route() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = HttpState::new(probe::probe(&std::env::temp_dir()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, state, async {
            let _ = stopped.await;
        }));
        let t = Duration::from_secs(5);
        let (code, body) = tokio::task::spawn_blocking(move || {
            let health = get(addr, "/healthz", t).unwrap();
            let metrics = get(addr, "/metrics", t).unwrap();
            let page = get(addr, "/", t).unwrap();
            let earnings = get(addr, "/api/earnings", t).unwrap();
            let missing = get(addr, "/nope", t).unwrap();
            assert_eq!(earnings.0, 503, "{}", earnings.1);
            assert!(earnings.1.contains("starting"), "{}", earnings.1);
            assert_eq!(metrics.0, 200);
            assert!(
                metrics.1.contains("# TYPE mesh_up gauge\nmesh_up 0\n"),
                "{}",
                metrics.1
            );
            assert_eq!(page.0, 200);
            assert!(page.1.contains("<svg id=\"tokens-chart\""));
            assert_eq!(missing.0, 404);
            health
        })
        .await
        .unwrap();
        assert_eq!(code, 200);
        let h: Health = serde_json::from_str(&body).unwrap();
        assert_eq!(h.status, "starting");
        assert!(h.running && h.peer_id.is_none());
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn live_gpu_readings_reach_healthz_metrics_and_the_page() {
        let reading = GpuLive {
            index: 0,
            memory_used_bytes: 5 << 30,
            memory_free_bytes: 19 << 30,
            memory_total_bytes: 24 << 30,
            utilization_percent: Some(63),
        };
        // The start-up probe saw GPU 0 nearly empty; the reading is what counts now.
        let probe = Probe {
            gpus: vec![Gpu {
                index: 0,
                name: "NVIDIA A10".into(),
                vram_free_bytes: Some(23 << 30),
                vram_total_bytes: Some(24 << 30),
                ..Gpu::default()
            }],
            ..Probe::default()
        };
        let state = HttpState::with_gpu(probe, GpuReadings::with_reader(move || vec![reading]));
        let sampler = tokio::spawn(state.clone().sample(Duration::from_millis(20)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, state, async {
            let _ = stopped.await;
        }));
        let t = Duration::from_secs(5);
        let (health, metrics, page) = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + t;
            loop {
                let metrics = get(addr, "/metrics", t).unwrap().1;
                if metrics.contains("mesh_gpu_") || Instant::now() > deadline {
                    let health = get(addr, "/healthz", t).unwrap().1;
                    break (health, metrics, get(addr, "/", t).unwrap().1);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .await
        .unwrap();
        for name in [
            "mesh_gpu_memory_used_bytes{gpu=\"0\"} 5368709120\n",
            "mesh_gpu_memory_total_bytes{gpu=\"0\"} 25769803776\n",
            "mesh_gpu_utilization_percent{gpu=\"0\"} 63\n",
        ] {
            assert!(metrics.contains(name), "no {name:?} in\n{metrics}");
        }
        let h: Health = serde_json::from_str(&health).unwrap();
        assert_eq!(h.gpu_live, vec![reading]);
        assert_eq!(h.vram[0].vram_free_bytes, Some(19 << 30));
        assert!(
            page.contains("NVIDIA A10: 5.0 GiB used of 24.0 GiB (19.0 GiB free), 63% utilisation"),
            "{page}"
        );
        sampler.abort();
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[test]
    fn label_escaping() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
