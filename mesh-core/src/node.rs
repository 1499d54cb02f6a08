//! A provider node: one span of one model, served to the mesh.
//!
//! ```no_run
//! # async fn demo(cfg: mesh_core::node::NodeConfig) -> Result<(), mesh_core::node::NodeError> {
//! let node = mesh_core::node::Node::start(cfg).await?;
//! println!("serving as {}", node.peer_id());
//! node.run(async { let _ = tokio::signal::ctrl_c().await; }, |_| {}).await?;
//! # Ok(()) }
//! ```
//!
//! The span's sessions live on one worker thread (tensor work is CPU- or GPU-bound and
//! must not stall the network); requests reach it through a bounded queue, and a full
//! queue is answered with [`Refusal::Busy`] at once.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{DType, Device};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::NodeMetrics;

use crate::model::{ModelError, ModelFiles, Quantization, SpanModel};
use crate::p2p::{self, Announcement, Event, P2pConfig, P2pError};
use crate::pipeline::admission::Admission;
use crate::pipeline::balance::{block_coverage, choose_span};
use crate::pipeline::{Billing, ServerLimits, ServerStats, SpanServer};
use crate::probe::GpuReadings;
use crate::types::{BlockRange, Capability, GpuLive, ModelId, ServerLoad};

/// A running receipt every this many tokens per session.
const RECEIPT_EVERY_TOKENS: u64 = 16;

/// A client owing more than this many tokens' worth of uncountersigned work gets no new
/// sessions. Generous: concurrent sessions each have up to one receipt in flight.
const MAX_UNPAID_TOKENS: u64 = 4096;

/// Requests waiting for the worker; beyond this a client is told the server is busy.
const REQUEST_QUEUE: usize = 64;

/// Everything a provider node needs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub model_id: ModelId,
    pub model_dir: PathBuf,
    /// The blocks to serve; `None` lets the node pick the least-served blocks of the mesh.
    pub span: Option<BlockRange>,
    /// How many blocks to take when picking automatically; `None` = the whole model.
    pub span_len: Option<u32>,
    pub dtype: DType,
    /// Quantize the span's projections on load (ignored for GGUF, which is stored so).
    pub quantize: Option<Quantization>,
    pub device: Device,
    pub limits: ServerLimits,
    pub price_per_token: u64,
    /// Where this node keeps its receipts (a sled store); `None` keeps no ledger and
    /// bills nothing.
    pub ledger_dir: Option<PathBuf>,
    pub p2p: P2pConfig,
    /// The hardware summary heartbeats carry ([`crate::probe::capability`]).
    pub capability: Capability,
}

/// Why a node could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    P2p(#[from] P2pError),
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    #[error("the span worker stopped unexpectedly")]
    WorkerGone,
}

/// What the node reports about itself (status, heartbeats, metrics).
#[derive(Clone, Debug, Default)]
pub struct NodeSnapshot {
    pub stats: ServerStats,
    pub active_sessions: usize,
    pub reserved_bytes: usize,
    pub free_cache_bytes: usize,
    pub throughput_tps: f32,
    /// Requests waiting for the worker when this was taken.
    pub queued: usize,
    pub metrics: NodeMetrics,
    /// Why the ledger failed, once it did: the node is degraded (no billed sessions).
    pub ledger_failure: Option<String>,
}

/// A cheap, cloneable view of a started node for status pages: its identity, what it
/// announces, and the worker's latest [`NodeSnapshot`] (refreshed after every request,
/// read without waiting for the worker).
#[derive(Clone)]
pub struct NodeHandle {
    client: p2p::Client,
    ann: Announcement,
    listen_addrs: Vec<Multiaddr>,
    snapshot: watch::Receiver<NodeSnapshot>,
    busy: Arc<AtomicU64>,
    ledger: Option<crate::ledger::Store>,
    gpu: GpuReadings,
}

impl NodeHandle {
    pub fn peer_id(&self) -> PeerId {
        self.client.local_peer_id()
    }

    pub fn announcement(&self) -> &Announcement {
        &self.ann
    }

    pub fn listen_addrs(&self) -> &[Multiaddr] {
        &self.listen_addrs
    }

    /// The p2p handle (for `stats()`, `connected_peers()`): each call is one bounded
    /// round trip to the event loop.
    pub fn client(&self) -> &p2p::Client {
        &self.client
    }

    /// The node's ledger of receipts, shared with the span worker (sled lets one process
    /// open a store, so the status pages read it through this). `None` without billing.
    pub fn ledger(&self) -> Option<&crate::ledger::Store> {
        self.ledger.as_ref()
    }

    /// This machine's GPUs as last read for a heartbeat (once per heartbeat interval);
    /// empty without GPUs. Never waits on the driver.
    pub fn gpu_live(&self) -> Vec<GpuLive> {
        self.gpu.latest()
    }

    /// The latest snapshot, with requests refused as busy (never queued) counted in.
    pub fn snapshot(&self) -> NodeSnapshot {
        let mut s = self.snapshot.borrow().clone();
        let busy = self.busy.load(Ordering::Relaxed);
        if busy > 0 {
            *s.metrics.refusals.entry("busy".into()).or_default() += busy;
            s.metrics.requests += busy;
        }
        s
    }
}

mod dispatch;
mod worker;
use dispatch::{dispatch, send_pushes, Queue};
use worker::{work, Job, SpanWorker};

/// Positions a step may carry and still run on the network task when the worker is idle
/// ([`InlineSteps`]): decode steps, and the few positions of a speculative draft.
const INLINE_POSITIONS: usize = 4;

/// Weights a span may read per step and still run its small steps on the network task:
/// the tiny model's 8 blocks (5.5 MB) take about 0.4 ms a token on the 2-core machine we
/// measure on, short enough not to hold up the other tasks of a runtime for long.
const INLINE_MAX_WEIGHT_BYTES: usize = 8 << 20;

/// Small steps of a span whose compute is small (a CPU span of at most
/// [`INLINE_MAX_WEIGHT_BYTES`] whose products all run on the caller's thread,
/// [`SpanModel::decodes_on_pool`] false) run on the network task when nothing waits for
/// the worker: a hop then skips the hand-off to the worker thread and back, two wake-ups
/// of a sleeping thread. Larger steps, and every step while others wait (where batching
/// them pays), go to the worker thread as before.
struct InlineSteps {
    state: Arc<Mutex<SpanWorker>>,
    /// Largest request taken inline: [`INLINE_POSITIONS`] positions of f32, plus the
    /// message around them.
    max_bytes: usize,
}

/// A started node: listening, span loaded, not yet announced.
pub struct Node {
    peer: p2p::Peer,
    ann: Announcement,
    jobs: mpsc::Sender<Job>,
    worker: std::thread::JoinHandle<()>,
    /// `None` where every step goes to the worker thread.
    inline: Option<InlineSteps>,
    heartbeat_interval: Duration,
    snapshot: watch::Receiver<NodeSnapshot>,
    busy: Arc<AtomicU64>,
    admission: Arc<Mutex<Admission>>,
    ledger: Option<crate::ledger::Store>,
    /// Live GPU figures, read again every heartbeat and sent with it.
    gpu: GpuReadings,
    /// Whether the span's decode steps run on the CPU's worker pool, woken as each
    /// request is queued so that its wake-up overlaps the hand-off to the worker thread.
    wakes_pool: bool,
    /// Steps' outputs the worker pushes on to the next server (peer, encoded request),
    /// sent as soon as each step ran, before its answer is signed.
    pushes: mpsc::Receiver<(PeerId, Vec<u8>)>,
}

/// Bytes of the largest session frame: `max_len` positions of f32 hidden states, plus room
/// for the message around them (ids, receipt, attestation).
fn largest_frame(hidden_size: usize, max_len: u32) -> usize {
    (max_len as usize)
        .saturating_mul(hidden_size)
        .saturating_mul(4)
        .saturating_add(64 << 10)
}

impl Node {
    /// Start the peer, pick the span if not given, load it. Not yet announced.
    pub async fn start(mut cfg: NodeConfig) -> Result<Self, NodeError> {
        let files = ModelFiles::open(&cfg.model_dir)?;
        let num_blocks = files.config.num_blocks();
        let hidden_size = files.config.hidden_size;
        // No request can legitimately be larger than a full-length f32 prefill, so no peer
        // gets to make this node buffer more than that per stream.
        cfg.p2p.max_frame_bytes = cfg
            .p2p
            .max_frame_bytes
            .min(largest_frame(files.config.hidden_size, cfg.limits.max_len));
        let heartbeat_interval = cfg.p2p.heartbeat_interval;
        let signing_key = cfg.p2p.identity.signing_key();
        let server_id = cfg.p2p.identity.peer_id();
        let peer = p2p::spawn(cfg.p2p).await?;
        let span = match cfg.span {
            Some(span) => span,
            None => {
                let len = cfg.span_len.unwrap_or(num_blocks).clamp(1, num_blocks);
                pick_span(
                    &peer.client,
                    &cfg.model_id,
                    num_blocks,
                    len,
                    heartbeat_interval,
                )
                .await?
            }
        };
        let (dtype, quantize, device) = (cfg.dtype, cfg.quantize, cfg.device.clone());
        let model = tokio::task::spawn_blocking(move || {
            SpanModel::load_quantized(&files, span, dtype, quantize, &device)
        })
        .await
        .map_err(|_| NodeError::WorkerGone)??;
        let quantization = model.quantization().unwrap_or_default().to_string();
        let wakes_pool = model.decodes_on_pool();
        let runs_inline = model.device().is_cpu()
            && !wakes_pool
            && model.weight_bytes() <= INLINE_MAX_WEIGHT_BYTES;
        tracing::info!(model = %cfg.model_id, %span, weight_bytes = model.weight_bytes(), quantization, "span loaded");

        let admission = Arc::new(Mutex::new(Admission::new(&cfg.limits)));
        let mut server = SpanServer::new(cfg.model_id.clone(), model, cfg.limits.clone())
            .with_signer(signing_key.clone());
        let mut ledger = None;
        if let Some(dir) = &cfg.ledger_dir {
            let store = crate::ledger::Store::open(dir)?;
            ledger = Some(store.clone());
            server = server.with_billing(Billing {
                key: signing_key,
                server: server_id,
                store,
                price_per_token: cfg.price_per_token,
                every_tokens: RECEIPT_EVERY_TOKENS,
                max_unpaid_tokens: MAX_UNPAID_TOKENS,
            })?;
        }
        let free = server.free_cache_bytes() as u64;
        let (jobs, rx) = mpsc::channel(REQUEST_QUEUE);
        let (push_tx, pushes) = mpsc::channel(REQUEST_QUEUE);
        let (snap_tx, snapshot) = watch::channel(NodeSnapshot::default());
        let state = Arc::new(Mutex::new(SpanWorker::new(server, push_tx, snap_tx)));
        let inline = runs_inline.then(|| InlineSteps {
            state: state.clone(),
            max_bytes: hidden_size * 4 * INLINE_POSITIONS + (2 << 10),
        });
        let worker = std::thread::Builder::new()
            .name("mesh-span".into())
            .spawn(move || work(state, rx))
            .map_err(|_| NodeError::WorkerGone)?;
        let ann = Announcement {
            model: cfg.model_id,
            span,
            num_blocks,
            price_per_token: cfg.price_per_token,
            load: ServerLoad {
                free_memory_bytes: free,
                ..ServerLoad::default()
            },
            capability: cfg.capability,
            quantization,
        };
        ann.validate()?;
        // A first reading with the span loaded, so the first heartbeat carries it.
        let gpu = GpuReadings::new();
        peer.client.set_gpu_live(gpu.refresh().await).await?;
        Ok(Self {
            peer,
            ann,
            jobs,
            worker,
            inline,
            heartbeat_interval,
            snapshot,
            busy: Arc::new(AtomicU64::new(0)),
            admission,
            ledger,
            gpu,
            wakes_pool,
            pushes,
        })
    }

    /// A handle for status pages; it stays valid (showing the last figures) after `run`.
    pub fn handle(&self) -> NodeHandle {
        NodeHandle {
            client: self.peer.client.clone(),
            ann: self.ann.clone(),
            listen_addrs: self.peer.listen_addrs.clone(),
            snapshot: self.snapshot.clone(),
            busy: self.busy.clone(),
            ledger: self.ledger.clone(),
            gpu: self.gpu.clone(),
        }
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer.client.local_peer_id()
    }

    /// Listen addresses with `/p2p/<peer id>`.
    pub fn listen_addrs(&self) -> &[Multiaddr] {
        &self.peer.listen_addrs
    }

    pub fn announcement(&self) -> &Announcement {
        &self.ann
    }

    /// Announce and serve until `shutdown`; other events go to `on_event`. On shutdown the
    /// node stops taking sessions, withdraws its announcement and stops.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()>,
        mut on_event: impl FnMut(&Event),
    ) -> Result<(), NodeError> {
        let Node {
            peer,
            ann,
            jobs,
            worker,
            inline,
            heartbeat_interval,
            snapshot: _,
            busy,
            admission,
            ledger: _,
            gpu,
            wakes_pool,
            pushes,
        } = self;
        let load_task = tokio::spawn(report_load(
            peer.client.clone(),
            jobs.clone(),
            gpu,
            heartbeat_interval,
        ));
        let push_task = tokio::spawn(send_pushes(peer.client.clone(), pushes));
        let request_jobs = jobs.clone();
        let result = p2p::serve(peer, ann, shutdown, move |client, event| match event {
            Event::InboundRequest {
                peer,
                request,
                channel,
            } => {
                let queue = Queue {
                    jobs: &request_jobs,
                    inline: inline.as_ref(),
                    busy: &busy,
                    admission: &admission,
                };
                let queued = dispatch(client, queue, peer, request, channel);
                if queued && wakes_pool {
                    crate::model::matvec::pool().expect_work();
                }
            }
            other => on_event(&other),
        })
        .await;
        load_task.abort();
        push_task.abort();
        let _ = jobs.send(Job::StopAccepting).await;
        drop(jobs);
        let _ = tokio::task::spawn_blocking(move || worker.join()).await;
        result.map_err(NodeError::from)
    }
}

/// Look at who serves what (DHT and a couple of heartbeats), then take the `len` blocks
/// the mesh serves worst.
pub(crate) async fn pick_span(
    client: &p2p::Client,
    model: &ModelId,
    num_blocks: u32,
    len: u32,
    heartbeat: Duration,
) -> Result<BlockRange, NodeError> {
    let mut known: HashMap<PeerId, (BlockRange, f32)> = HashMap::new();
    match client.discover(model, num_blocks).await {
        Ok(found) => {
            for s in found {
                known.insert(s.peer_id, (s.span, 0.0));
            }
        }
        Err(e) => tracing::debug!("discovery before picking a span: {e}"),
    }
    if !known.is_empty() {
        // Let heartbeats (with throughput) arrive from the servers just found.
        tokio::time::sleep((heartbeat * 2).min(Duration::from_secs(30))).await;
    }
    for s in client.live_servers(model).await? {
        if s.num_blocks == num_blocks {
            known.insert(s.peer_id, (s.span, s.load.throughput_tps));
        }
    }
    let servers: Vec<(BlockRange, f32)> = known.into_values().collect();
    let coverage = block_coverage(&servers, num_blocks);
    let span =
        choose_span(&coverage, len).ok_or(NodeError::P2p(P2pError::Invalid("span length")))?;
    tracing::info!(%span, known_servers = servers.len(), ?coverage, "picked the least-served blocks");
    Ok(span)
}

/// Refresh the heartbeat's load figures and GPU readings and expire idle sessions, once
/// per heartbeat.
async fn report_load(
    client: p2p::Client,
    jobs: mpsc::Sender<Job>,
    gpu: GpuReadings,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let (tx, rx) = oneshot::channel();
        if jobs.send(Job::Snapshot(tx)).await.is_err() {
            return;
        }
        let Ok(s) = rx.await else { return };
        let load = ServerLoad {
            free_memory_bytes: s.free_cache_bytes as u64,
            throughput_tps: s.throughput_tps,
            active_sessions: s.active_sessions as u32,
            load: s.active_sessions as f32 / REQUEST_QUEUE as f32,
        };
        if client.set_load(load).await.is_err() {
            return;
        }
        // Read off the runtime and bounded in time ([`crate::probe::gpu_live`]).
        match client.set_gpu_live(gpu.refresh().await).await {
            Ok(()) => {}
            Err(P2pError::Closed) => return,
            Err(e) => tracing::debug!("GPU readings not sent: {e}"),
        }
    }
}
