//! The node's local HTTP port: `/healthz` (JSON), `/metrics` (Prometheus text) and `/`
//! (a small dashboard page with an inline SVG chart and no external assets).
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
//! Every handler only reads figures already at hand: the worker's latest snapshot (a
//! `watch` channel), and peer counts and the chart's history that a sampler task
//! ([`HttpState::sample`]) refreshes on a timer. No handler waits on the span worker or
//! the swarm. The port is meant for 127.0.0.1 (or a firewalled network): it shows
//! operational figures and has no authentication.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::metrics::LATENCY_BUCKETS_SECS;
use crate::node::NodeHandle;
use crate::probe::{self, Gpu, Probe};

/// Points kept for the dashboard's chart (an hour at the default 10 s sampling).
pub const HISTORY_POINTS: usize = 360;

/// What `/healthz` answers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// `starting` (loading the span) or `serving`.
    pub status: String,
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
    pub vram: Vec<Gpu>,
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
    peers: usize,
    heartbeats_published: u64,
    /// `(unix seconds, tokens served)`.
    history: VecDeque<(u64, u64)>,
}

struct Inner {
    started: Instant,
    probe: Probe,
    node: OnceLock<NodeHandle>,
    sampled: Mutex<Sampled>,
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
        Self(Arc::new(Inner {
            started: Instant::now(),
            probe,
            node: OnceLock::new(),
            sampled: Mutex::new(Sampled::default()),
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

    /// Refreshes the peer figures and adds a chart point every `every`; runs until dropped
    /// (spawn it, abort it at shutdown).
    pub async fn sample(self, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(node) = self.0.node.get() else {
                continue;
            };
            let stats = tokio::time::timeout(Duration::from_secs(2), node.client().stats()).await;
            if let Ok(Ok(stats)) = stats {
                let mut s = self.sampled();
                s.peers = stats.connected_peers;
                s.heartbeats_published = stats.heartbeats_published;
            }
            self.push_point(tokens(node));
        }
    }

    /// The `/healthz` body.
    pub fn health(&self) -> Health {
        let meminfo = probe::probe_memory();
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
            peers: self.sampled().peers,
            ..Health::default()
        };
        if let Some(node) = self.0.node.get() {
            let snap = node.snapshot();
            let ann = node.announcement();
            h.status = "serving".into();
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

    /// The `/metrics` body, Prometheus text exposition format 0.0.4.
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        let mut m = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let one = |v: String| vec![(String::new(), v)];
        let sampled = {
            let s = self.sampled();
            (s.peers, s.heartbeats_published)
        };
        m(
            "mesh_up",
            "gauge",
            "1 once the span is loaded and announced, 0 while starting.",
            &one(u8::from(self.0.node.get().is_some()).to_string()),
        );
        m(
            "mesh_uptime_seconds",
            "gauge",
            "Seconds since the node process started.",
            &one(self.0.started.elapsed().as_secs_f64().to_string()),
        );
        m(
            "mesh_peers_connected",
            "gauge",
            "Peers with an open connection.",
            &one(sampled.0.to_string()),
        );
        m(
            "mesh_heartbeats_published_total",
            "counter",
            "Heartbeats this node has published.",
            &one(sampled.1.to_string()),
        );
        if let Some(rss) = probe::process_rss_bytes() {
            m(
                "mesh_process_resident_memory_bytes",
                "gauge",
                "Resident memory of the node process.",
                &one(rss.to_string()),
            );
        }
        let Some(node) = self.0.node.get() else {
            return out;
        };
        let snap = node.snapshot();
        let ann = node.announcement();
        m(
            "mesh_node_info",
            "gauge",
            "The node's identity and span, as labels.",
            &[(
                format!(
                    "{{peer_id=\"{}\",model=\"{}\",span=\"{}..{}\",version=\"{}\"}}",
                    label(&node.peer_id().to_string()),
                    label(ann.model.as_str()),
                    ann.span.start,
                    ann.span.end,
                    env!("CARGO_PKG_VERSION")
                ),
                "1".into(),
            )],
        );
        m(
            "mesh_tokens_served_total",
            "counter",
            "Token positions run through this node's span.",
            &[
                (
                    "{phase=\"prefill\"}".into(),
                    snap.stats.prefill_tokens.to_string(),
                ),
                (
                    "{phase=\"decode\"}".into(),
                    snap.stats.decode_tokens.to_string(),
                ),
            ],
        );
        m(
            "mesh_sessions_active",
            "gauge",
            "Sessions holding a KV cache now.",
            &one(snap.active_sessions.to_string()),
        );
        m(
            "mesh_sessions_opened_total",
            "counter",
            "Sessions opened since start.",
            &one(snap.stats.sessions_opened.to_string()),
        );
        m(
            "mesh_sessions_expired_total",
            "counter",
            "Sessions closed for sitting idle.",
            &one(snap.stats.sessions_expired.to_string()),
        );
        m(
            "mesh_request_queue_depth",
            "gauge",
            "Requests waiting for the span worker.",
            &one(snap.queued.to_string()),
        );
        m(
            "mesh_requests_total",
            "counter",
            "Session requests received.",
            &one(snap.metrics.requests.to_string()),
        );
        m(
            "mesh_bytes_total",
            "counter",
            "Session protocol payload bytes.",
            &[
                (
                    "{direction=\"in\"}".into(),
                    snap.metrics.bytes_in.to_string(),
                ),
                (
                    "{direction=\"out\"}".into(),
                    snap.metrics.bytes_out.to_string(),
                ),
            ],
        );
        let errors: Vec<(String, String)> = snap
            .metrics
            .refusals
            .iter()
            .map(|(kind, n)| (format!("{{kind=\"{}\"}}", label(kind)), n.to_string()))
            .collect();
        m(
            "mesh_errors_total",
            "counter",
            "Requests refused, by kind.",
            &errors,
        );
        m(
            "mesh_kv_cache_bytes",
            "gauge",
            "KV-cache budget reserved by sessions and still free.",
            &[
                (
                    "{state=\"reserved\"}".into(),
                    snap.reserved_bytes.to_string(),
                ),
                ("{state=\"free\"}".into(), snap.free_cache_bytes.to_string()),
            ],
        );
        m(
            "mesh_throughput_tokens_per_second",
            "gauge",
            "Recent decode throughput of the span.",
            &one(snap.throughput_tps.to_string()),
        );
        let h = &snap.metrics.block_latency;
        let mut samples: Vec<(String, String)> = h
            .cumulative()
            .into_iter()
            .map(|(le, n)| {
                let le = if le.is_infinite() {
                    "+Inf".to_owned()
                } else {
                    le.to_string()
                };
                (format!("_bucket{{le=\"{le}\"}}"), n.to_string())
            })
            .collect();
        samples.push(("_sum".into(), h.sum_secs.to_string()));
        samples.push(("_count".into(), h.count.to_string()));
        debug_assert_eq!(samples.len(), LATENCY_BUCKETS_SECS.len() + 3);
        m(
            "mesh_block_latency_seconds",
            "histogram",
            "Compute time of one forward pass per block of the span.",
            &samples,
        );
        out
    }

    /// The dashboard page.
    pub fn dashboard(&self) -> String {
        let h = self.health();
        let p = &self.0.probe;
        let mut points: Vec<(u64, u64)> = self.sampled().history.iter().copied().collect();
        points.push((unix_now(), h.tokens_served));
        let chart = svg_chart(&points);
        let gib = |b: Option<u64>| b.map_or("?".into(), human_bytes);
        let gpus = if p.gpus.is_empty() {
            esc(&p.gpu_note)
        } else {
            p.gpus
                .iter()
                .map(|g| {
                    format!(
                        "{} ({} free of {})",
                        esc(&g.name),
                        gib(g.vram_free_bytes),
                        gib(g.vram_total_bytes)
                    )
                })
                .collect::<Vec<_>>()
                .join("<br>")
        };
        let dash = |o: &Option<String>| o.as_deref().map_or("-".into(), esc);
        format!(
            r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="10">
<title>mesh-node {peer_short}</title>
<style>
body{{font:14px system-ui,sans-serif;margin:2em;color:#222;max-width:60em}}
h1{{font-size:1.3em}} table{{border-collapse:collapse}} td{{padding:.2em 1em .2em 0;vertical-align:top}}
td:first-child{{color:#666}} code{{font-size:.95em}} .ok{{color:#080}} .warn{{color:#a60}}
svg{{border:1px solid #ddd;background:#fafafa}}
</style></head><body>
<h1>mesh-node <span class="{status_class}">{status}</span></h1>
<table>
<tr><td>peer id</td><td><code id="peer-id">{peer}</code></td></tr>
<tr><td>model</td><td>{model}</td></tr>
<tr><td>blocks</td><td>{span} of {num_blocks}</td></tr>
<tr><td>uptime</td><td>{uptime}</td></tr>
<tr><td>sessions</td><td>{sessions} open, {opened} opened, {queue} queued</td></tr>
<tr><td>tokens served</td><td>{tokens} ({prefill} prefill, {decode} decode)</td></tr>
<tr><td>peers</td><td>{peers}</td></tr>
<tr><td>price</td><td>{price} per token</td></tr>
<tr><td>earnings</td><td>from signed receipts: <code>mesh-node earnings</code></td></tr>
</table>
<h2>Tokens served</h2>
{chart}
<h2>Hardware</h2>
<table>
<tr><td>host</td><td>{host} ({os}/{arch})</td></tr>
<tr><td>CPU</td><td>{cpu} &times; {cores}</td></tr>
<tr><td>memory</td><td>{mem_avail} available of {mem_total}; node uses {rss}</td></tr>
<tr><td>disk</td><td>{disk}</td></tr>
<tr><td>GPUs</td><td>{gpus}</td></tr>
</table>
<p><a href="/healthz">/healthz</a> &middot; <a href="/metrics">/metrics</a> &middot; mesh {version}, pid {pid}</p>
</body></html>
"#,
            peer_short = h
                .peer_id
                .as_deref()
                .map_or("", |p| &p[p.len().saturating_sub(8)..]),
            status_class = if h.status == "serving" { "ok" } else { "warn" },
            status = esc(&h.status),
            peer = dash(&h.peer_id),
            model = dash(&h.model),
            span = dash(&h.span),
            num_blocks = h.num_blocks.map_or("-".into(), |n| n.to_string()),
            uptime = human_duration(h.uptime_secs),
            sessions = h.sessions,
            opened = h.sessions_opened,
            queue = h.queue,
            tokens = h.tokens_served,
            prefill = h.prefill_tokens,
            decode = h.decode_tokens,
            peers = h.peers,
            price = h.price_per_token.unwrap_or(0),
            host = esc(&p.hostname),
            os = esc(&p.os),
            arch = esc(&p.arch),
            cpu = esc(if p.cpu.model.is_empty() {
                "unknown CPU"
            } else {
                &p.cpu.model
            }),
            cores = p.cpu.cores,
            mem_avail = gib(h.memory.available_bytes),
            mem_total = gib(h.memory.total_bytes),
            rss = gib(h.memory.process_rss_bytes),
            disk = p.disk.as_ref().map_or("?".into(), |d| format!(
                "{} free of {} at {}",
                gib(Some(d.free_bytes)),
                gib(Some(d.total_bytes)),
                esc(&d.path.display().to_string())
            )),
            version = env!("CARGO_PKG_VERSION"),
            pid = h.pid,
        )
    }
}

fn tokens(node: &NodeHandle) -> u64 {
    let s = node.snapshot().stats;
    s.prefill_tokens + s.decode_tokens
}

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes a Prometheus label value.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn human_bytes(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

/// A line chart of `(unix seconds, value)` points as inline SVG; always draws the axes,
/// and a line once there are two points.
fn svg_chart(points: &[(u64, u64)]) -> String {
    const W: f64 = 640.0;
    const H: f64 = 200.0;
    const PAD: f64 = 30.0;
    let (t0, t1) = match (points.first(), points.last()) {
        (Some(a), Some(b)) => (a.0, b.0.max(a.0 + 1)),
        _ => (0, 1),
    };
    let vmax = points.iter().map(|p| p.1).max().unwrap_or(0).max(1);
    let xy = |&(t, v): &(u64, u64)| {
        let x = PAD + (t.saturating_sub(t0)) as f64 / (t1 - t0) as f64 * (W - 2.0 * PAD);
        let y = H - PAD - v as f64 / vmax as f64 * (H - 2.0 * PAD);
        (x, y)
    };
    let line: Vec<String> = points
        .iter()
        .map(|p| {
            let (x, y) = xy(p);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    let dots: String = points
        .iter()
        .map(|p| {
            let (x, y) = xy(p);
            format!(r##"<circle cx="{x:.1}" cy="{y:.1}" r="2.5" fill="#36c"/>"##)
        })
        .collect();
    let span = human_duration(t1 - t0);
    format!(
        r##"<svg id="tokens-chart" width="{W}" height="{H}" viewBox="0 0 {W} {H}" xmlns="http://www.w3.org/2000/svg" role="img" aria-label="tokens served over time">
<line x1="{PAD}" y1="{yb}" x2="{xr}" y2="{yb}" stroke="#999"/>
<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{yb}" stroke="#999"/>
<text x="{PAD}" y="{ty}" font-size="11" fill="#666">{vmax} tokens</text>
<text x="{xr}" y="{tb}" font-size="11" fill="#666" text-anchor="end">last {span}</text>
<polyline fill="none" stroke="#36c" stroke-width="2" points="{line}"/>
{dots}
</svg>"##,
        yb = H - PAD,
        xr = W - PAD,
        ty = PAD - 8.0,
        tb = H - 10.0,
        line = line.join(" "),
    )
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
    Html(s.dashboard())
}

async fn not_found() -> (StatusCode, &'static str) {
    (
        StatusCode::NOT_FOUND,
        "not found: try /, /healthz or /metrics\n",
    )
}

/// The routes, for tests that drive them without a socket.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/", routing::get(dashboard))
        .route("/healthz", routing::get(healthz))
        .route("/metrics", routing::get(metrics))
        .fallback(not_found)
        .with_state(state)
}

/// Serves the routes on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// A blocking `GET path` over HTTP/1.0, for `mesh-node status` and tests: the status code
/// and body. Bodies are capped at 4 MiB.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.take(4 << 20).read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response");
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    Ok((code, body.to_owned()))
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
            let missing = get(addr, "/nope", t).unwrap();
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

    #[test]
    fn chart_and_escaping() {
        let svg = svg_chart(&[(100, 0), (110, 50), (120, 80)]);
        assert_eq!(svg.matches("<circle").count(), 3);
        assert!(svg.contains("80 tokens"));
        assert!(svg_chart(&[]).contains("<polyline"));
        assert_eq!(esc("<a href=\"x\">&"), "&lt;a href=&quot;x&quot;&gt;&amp;");
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(human_duration(3725), "1h 2m");
    }
}
