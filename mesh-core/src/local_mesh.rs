//! A whole mesh inside one process: a bootstrap peer and span servers on loopback, with
//! real swarms, real TCP, noise and yamux. For examples, benchmarks and tests; a real
//! deployment runs each peer as its own process (`mesh-bootstrap`, `mesh-node`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), mesh_core::node::NodeError> {
//! use mesh_core::{local_mesh::LocalMesh, BlockRange};
//! let dir = mesh_core::model::tiny::ensure(&mesh_core::model::tiny::default_dir())?;
//! let mesh = LocalMesh::start(&dir, &BlockRange::even_split(8, 3)).await?;
//! let client = mesh.client().await?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{DType, Device};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::identity::Identity;
use crate::model::builtin::{self, Builtin};
use crate::model::ModelFiles;
use crate::node::{Node, NodeConfig, NodeError, NodeHandle};
use crate::p2p::{self, P2pConfig, Role};
use crate::pipeline::{self, ServerLimits};
use crate::types::{BlockRange, ModelId};

/// Heartbeats in a local mesh come fast so tests and demos need not wait.
const LOCAL_HEARTBEAT: Duration = Duration::from_millis(500);

struct RunningNode {
    peer: PeerId,
    span: BlockRange,
    handle: NodeHandle,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), NodeError>>,
}

/// A bootstrap and span servers of one model, running on this process's runtime.
pub struct LocalMesh {
    model_dir: PathBuf,
    model: ModelId,
    num_blocks: u32,
    boot_addr: Multiaddr,
    boot_stop: Option<oneshot::Sender<()>>,
    nodes: Vec<RunningNode>,
    /// When set, nodes added from now on keep receipts under this folder (one store per
    /// node) and bill at this price.
    pub billing: Option<(PathBuf, u64)>,
    /// What nodes added from now on compute in and on.
    pub dtype: DType,
    pub device: Device,
    /// Whether nodes added from now on, and clients, use session streams.
    pub session_streams: bool,
}

/// A peer config listening on an ephemeral loopback port. Every peer of a loopback mesh
/// shares one address, so the per-address connection limit is the total one: a lab with
/// dozens of clients must not look like one host flooding.
pub fn loopback_config(role: Role, bootstrap: Vec<Multiaddr>) -> P2pConfig {
    let mut cfg = P2pConfig::new(Identity::generate(), role);
    cfg.listen = vec![Multiaddr::from(std::net::Ipv4Addr::LOCALHOST).with(p2p::Protocol::Tcp(0))];
    cfg.bootstrap = bootstrap;
    cfg.heartbeat_interval = LOCAL_HEARTBEAT;
    cfg.max_connections_per_ip = cfg.max_connections;
    cfg.max_pending_connections_per_ip = cfg.max_connections;
    cfg
}

impl LocalMesh {
    /// Start a bootstrap and one server per span of the model in `model_dir`.
    pub async fn start(model_dir: &Path, spans: &[BlockRange]) -> Result<Self, NodeError> {
        Self::start_on(model_dir, spans, DType::F32, &Device::Cpu).await
    }

    /// [`LocalMesh::start`] with nodes computing in `dtype` on `device` (a GPU check).
    pub async fn start_on(
        model_dir: &Path,
        spans: &[BlockRange],
        dtype: DType,
        device: &Device,
    ) -> Result<Self, NodeError> {
        Self::start_inner(model_dir, spans, dtype, device, true).await
    }

    /// [`LocalMesh::start`] with every peer (servers and [`LocalMesh::client`]) asking by
    /// request-response rather than on session streams, to measure one against the other.
    pub async fn start_without_streams(
        model_dir: &Path,
        spans: &[BlockRange],
    ) -> Result<Self, NodeError> {
        Self::start_inner(model_dir, spans, DType::F32, &Device::Cpu, false).await
    }

    async fn start_inner(
        model_dir: &Path,
        spans: &[BlockRange],
        dtype: DType,
        device: &Device,
        session_streams: bool,
    ) -> Result<Self, NodeError> {
        let files = ModelFiles::open(model_dir)?;
        let boot = p2p::spawn(loopback_config(Role::Bootstrap, vec![])).await?;
        let boot_addr =
            boot.listen_addrs
                .first()
                .cloned()
                .ok_or(NodeError::P2p(p2p::P2pError::Invalid(
                    "bootstrap has no address",
                )))?;
        let (boot_stop, rx) = oneshot::channel::<()>();
        tokio::spawn(p2p::run_bootstrap(boot, async {
            let _ = rx.await;
        }));
        let mut mesh = LocalMesh {
            model_dir: model_dir.to_path_buf(),
            model: ModelId::new(Builtin::of_dir(model_dir).unwrap_or(builtin::DEFAULT).id()),
            num_blocks: files.config.num_blocks(),
            boot_addr,
            boot_stop: Some(boot_stop),
            nodes: Vec::new(),
            billing: None,
            dtype,
            device: device.clone(),
            session_streams,
        };
        for span in spans {
            mesh.add_node(*span).await?;
        }
        Ok(mesh)
    }

    pub fn model(&self) -> &ModelId {
        &self.model
    }

    pub fn model_dir(&self) -> &Path {
        &self.model_dir
    }

    pub fn num_blocks(&self) -> u32 {
        self.num_blocks
    }

    pub fn bootstrap_addr(&self) -> &Multiaddr {
        &self.boot_addr
    }

    /// The servers running now, with their spans.
    pub fn servers(&self) -> Vec<(PeerId, BlockRange)> {
        self.nodes
            .iter()
            .filter(|n| !n.task.is_finished())
            .map(|n| (n.peer, n.span))
            .collect()
    }

    /// The status view of server `peer` ([`NodeHandle::snapshot`] for its counters).
    pub fn node(&self, peer: PeerId) -> Option<NodeHandle> {
        self.nodes
            .iter()
            .find(|n| n.peer == peer)
            .map(|n| n.handle.clone())
    }

    /// Start one more server of `span`.
    pub async fn add_node(&mut self, span: BlockRange) -> Result<PeerId, NodeError> {
        self.add_node_with(span, ServerLimits::default()).await
    }

    /// Start one more server of `span` under `limits` (a shorter `max_len`, say).
    pub async fn add_node_with(
        &mut self,
        span: BlockRange,
        limits: ServerLimits,
    ) -> Result<PeerId, NodeError> {
        let cfg = NodeConfig {
            model_id: self.model.clone(),
            model_dir: self.model_dir.clone(),
            span: Some(span),
            span_len: None,
            dtype: self.dtype,
            quantize: None,
            device: self.device.clone(),
            limits,
            price_per_token: self.billing.as_ref().map_or(0, |(_, price)| *price),
            ledger_dir: self
                .billing
                .as_ref()
                .map(|(root, _)| root.join(format!("node{}", self.nodes.len()))),
            p2p: P2pConfig {
                session_streams: self.session_streams,
                ..loopback_config(Role::Server, vec![self.boot_addr.clone()])
            },
            capability: crate::probe::capability(),
        };
        let node = Node::start(cfg).await?;
        let peer = node.peer_id();
        let handle = node.handle();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(node.run(
            async {
                let _ = rx.await;
            },
            |_| {},
        ));
        self.nodes.push(RunningNode {
            peer,
            span,
            handle,
            stop: Some(tx),
            task,
        });
        Ok(peer)
    }

    /// Drop a server without a goodbye: its swarm and connections vanish, as with kill -9.
    pub fn crash(&mut self, peer: PeerId) {
        if let Some(node) = self.nodes.iter().find(|n| n.peer == peer) {
            node.task.abort();
        }
    }

    /// A client peer that knows only the bootstrap, once the servers cover every block.
    pub async fn client(&self) -> Result<p2p::Peer, NodeError> {
        let client = p2p::spawn(P2pConfig {
            session_streams: self.session_streams,
            ..loopback_config(Role::Client, vec![self.boot_addr.clone()])
        })
        .await?;
        pipeline::wait_for_coverage(
            &client.client,
            &self.model,
            self.num_blocks,
            Duration::from_secs(30),
        )
        .await?;
        Ok(client)
    }

    /// Waits (up to `within`) until every server is connected to the servers of the spans
    /// next to its own over one connection each, and says whether that came. Servers
    /// started together find each other at the same instant and may dial each other at
    /// once; while a pair holds both connections its pushes go by request-response rather
    /// than on a session stream, until one connection has lasted long enough to be closed
    /// (`p2p/event_loop/nat/duplicates.rs`): some seconds. A benchmark of the steady
    /// state waits for this first.
    pub async fn settle(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while !self.settled().await {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        true
    }

    async fn settled(&self) -> bool {
        let running: Vec<&RunningNode> = self
            .nodes
            .iter()
            .filter(|n| !n.task.is_finished())
            .collect();
        for n in &running {
            let p2p = n.handle.client();
            let (Ok(stats), Ok(connected)) = (p2p.stats().await, p2p.connected_peers().await)
            else {
                return false;
            };
            let reached = running
                .iter()
                .filter(|m| m.span.end == n.span.start || m.span.start == n.span.end)
                .all(|m| connected.contains(&m.peer));
            if stats.connections > stats.connected_peers || !reached {
                return false;
            }
        }
        true
    }

    /// Stop every server cleanly, then the bootstrap.
    pub async fn stop(mut self) -> Result<(), NodeError> {
        for n in &mut self.nodes {
            if let Some(s) = n.stop.take() {
                let _ = s.send(());
            }
        }
        for n in self.nodes.drain(..) {
            // A crashed node's task was aborted; that is not an error of the shutdown.
            if let Ok(result) = n.task.await {
                result?;
            }
        }
        if let Some(s) = self.boot_stop.take() {
            let _ = s.send(());
        }
        Ok(())
    }
}
