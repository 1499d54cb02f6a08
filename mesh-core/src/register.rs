//! `mesh-node register`: check, before a provider commits to serving, everything that
//! would otherwise fail later or silently: the model files, the machine, the span's size,
//! joining the mesh, being found in it, and being reachable from outside.
//!
//! [`register`] runs the checks in that order and stops at the first that fails, with a
//! typed error that says what to fix. On success the node has briefly announced its span
//! (a fresh client looked it up in the DHT and listened for its heartbeat), then withdrew
//! the announcement: a node that is not serving yet must not attract sessions. The caller
//! writes the chosen span into `node.toml` ([`crate::config::set_blocks`]) so that
//! `mesh-node start` serves exactly what was checked.
//!
//! ```no_run
//! # async fn demo(cfg: mesh_core::register::RegisterConfig) -> Result<(), mesh_core::register::RegisterError> {
//! let probe = mesh_core::probe::probe(std::path::Path::new("."));
//! let reg = mesh_core::register::register(cfg, probe).await?;
//! println!("serve blocks {}..{}", reg.span.start, reg.span.end);
//! # Ok(()) }
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::DType;
use libp2p::{Multiaddr, PeerId};

use crate::identity::Identity;
use crate::model::{ModelError, ModelFiles, Quantization, Weights};
use crate::p2p::reachability::{self, Reachability};
use crate::p2p::{self, Announcement, P2pConfig, P2pError, Role};
use crate::probe::{self, DoesNotFit, Probe, Sizing};
use crate::types::{BlockRange, ModelId, ServerLoad};

/// How long withdrawing the trial announcement may take.
const WITHDRAW_TIMEOUT: Duration = Duration::from_secs(8);

/// What to register: the node's model, its wishes for a span, and its peer settings.
#[derive(Clone, Debug)]
pub struct RegisterConfig {
    pub model_id: ModelId,
    pub model_dir: PathBuf,
    /// The model's block count the operator expects (`--num-blocks`); checked if given.
    pub num_blocks: Option<u32>,
    /// The blocks asked for; `None` picks the least-served blocks of the mesh.
    pub span: Option<BlockRange>,
    /// How many blocks to pick when `span` is `None`; `None` = as many as fit.
    pub span_len: Option<u32>,
    pub dtype: DType,
    /// Quantize the span's projections on load; sizing counts the quantized bytes.
    pub quantize: Option<Quantization>,
    /// Where the span would compute; its free memory sizes the span.
    pub device: crate::model::DeviceSpec,
    /// The KV-cache budget: the margin kept beside the weights.
    pub cache_budget_bytes: u64,
    pub price_per_token: u64,
    /// The node's own identity, listen, bootstrap and public addresses (`role` is Server).
    pub p2p: P2pConfig,
    /// The most to wait for a fresh client to find the node, and for the dial-back.
    pub check_timeout: Duration,
}

/// What [`register`] found.
#[derive(Clone, Debug)]
pub struct Registration {
    pub peer_id: PeerId,
    pub model: ModelId,
    pub num_blocks: u32,
    /// Weight files whose headers were read.
    pub weight_files: usize,
    pub probe: Probe,
    pub sizing: Sizing,
    /// How the span's weights will be stored (empty: full precision at the dtype).
    pub quantization: String,
    /// The span to serve.
    pub span: BlockRange,
    /// True when the span was picked from the mesh's coverage, false when it was asked for.
    pub picked: bool,
    /// Peers connected after joining.
    pub peers: usize,
    /// The addresses the node announced.
    pub announce_addrs: Vec<Multiaddr>,
    /// The loud warning when every announced address is loopback or private.
    pub address_warning: Option<String>,
    /// How long a fresh client took to find the announcement in the DHT.
    pub found_after: Duration,
    /// Whether that client also heard the node's heartbeat (gossip) before the timeout.
    pub heartbeat_heard: bool,
    /// The dial-back of each declared public address (empty: none declared).
    pub reachability: Vec<Reachability>,
    /// What AutoNAT and the relays said.
    pub nat: Option<p2p::NatReport>,
}

/// Why registering failed; each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("model directory {dir}: {source}")]
    Model {
        dir: PathBuf,
        #[source]
        source: ModelError,
    },
    #[error("the model has {found} blocks, not the {expected} expected (--num-blocks)")]
    NumBlocks { expected: u32, found: u32 },
    #[error("blocks {start}..{end} are outside the model's {num_blocks} blocks")]
    SpanOutside {
        start: u32,
        end: u32,
        num_blocks: u32,
    },
    #[error(transparent)]
    DoesNotFit(#[from] DoesNotFit),
    #[error(
        "no bootstrap peer: register joins the mesh through one (set [network] bootstrap in \
         the config or pass --bootstrap /ip4/.../tcp/31337/p2p/12D3KooW...)"
    )]
    NoBootstrap,
    #[error(
        "could not connect to any bootstrap peer ({0}): check the addresses (with their \
         /p2p/ part), that the bootstrap runs, and that this machine can reach it"
    )]
    Unjoinable(String),
    #[error(
        "a fresh client did not find this node in the DHT within {0:?}: the bootstrap may \
         not store records (is it a mesh-bootstrap of this version?)"
    )]
    NotFound(Duration),
    #[error(
        "public address {addr} is NOT reachable from peer {by} ({detail}): this node will \
         not be reachable by real clients\n{steps}"
    )]
    Unreachable {
        addr: Multiaddr,
        by: PeerId,
        detail: String,
        steps: String,
    },
    #[error(transparent)]
    P2p(#[from] P2pError),
}

/// Runs every check (see the module docs); `probe` is this machine's probe.
pub async fn register(cfg: RegisterConfig, probe: Probe) -> Result<Registration, RegisterError> {
    let model_err = |source| RegisterError::Model {
        dir: cfg.model_dir.clone(),
        source,
    };
    let files = ModelFiles::open(&cfg.model_dir)
        .and_then(|files| files.check_weights().map(|()| files))
        .map_err(model_err)?;
    // The headers of every weight file, and the dtype against the device.
    let device = crate::model::device::select(cfg.device);
    if device.fell_back {
        tracing::warn!("device: {}", device.description);
    }
    Weights::open(&files, cfg.dtype, &device.device).map_err(model_err)?;
    let (free, memory) = probe::free_memory_for(&device.device, probe.memory.available_bytes);
    let num_blocks = files.config.num_blocks();
    if let Some(expected) = cfg.num_blocks.filter(|&n| n != num_blocks) {
        return Err(RegisterError::NumBlocks {
            expected,
            found: num_blocks,
        });
    }
    if let Some(span) = cfg.span.filter(|s| !s.fits(num_blocks)) {
        return Err(RegisterError::SpanOutside {
            start: span.start,
            end: span.end,
            num_blocks,
        });
    }
    let sizing = probe::size_span(
        &files.config,
        cfg.span,
        cfg.span_len,
        probe::SpanFormat::of(&files, cfg.dtype, cfg.quantize),
        cfg.cache_budget_bytes,
        free,
        memory,
    )?;
    if cfg.p2p.bootstrap.is_empty() {
        return Err(RegisterError::NoBootstrap);
    }

    let mut p2p_cfg = cfg.p2p.clone();
    p2p_cfg.role = Role::Server;
    let heartbeat = p2p_cfg.heartbeat_interval;
    let peer = p2p::spawn(p2p_cfg).await?;
    let client = peer.client.clone();
    // Nothing is served yet: a session request that arrives anyway is dropped, which the
    // client sees as a failed server and routes around.
    let mut events = peer.events;
    let drain = tokio::spawn(async move { while events.recv().await.is_some() {} });
    let trial = Trial {
        cfg: &cfg,
        client: &client,
        num_blocks,
        blocks: sizing.blocks,
        heartbeat,
        capability: probe.capability(),
        quantization: files.announced_quantization(cfg.quantize),
        announced: std::sync::atomic::AtomicBool::new(false),
    };
    let result = trial.run().await;
    // Withdrawn whether or not a later check failed: nobody may route to this node yet.
    if trial.announced.load(std::sync::atomic::Ordering::Relaxed) {
        match tokio::time::timeout(WITHDRAW_TIMEOUT, client.unannounce()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("withdrawing the trial announcement: {e}"),
            Err(_) => tracing::warn!("withdrawing the trial announcement timed out"),
        }
    }
    let _ = client.shutdown().await;
    let _ = peer.task.await;
    drain.abort();
    let checked = result?;
    Ok(Registration {
        peer_id: client.local_peer_id(),
        model: cfg.model_id,
        num_blocks,
        weight_files: files.weight_files.len(),
        probe,
        sizing,
        quantization: files.announced_quantization(cfg.quantize),
        span: checked.span,
        picked: cfg.span.is_none(),
        peers: checked.peers,
        // A probe's answer replaces the guess from address classes.
        address_warning: match checked.nat.as_ref().map(|n| n.reach) {
            Some(p2p::Reach::Public | p2p::Reach::Relayed) => None,
            _ => reachability::unreachable_warning(&checked.announce_addrs),
        },
        nat: checked.nat,
        announce_addrs: checked.announce_addrs,
        found_after: checked.found_after,
        heartbeat_heard: checked.heartbeat_heard,
        reachability: checked.reachability,
    })
}

/// The network part: join, pick, announce, be found, be dialled back.
struct Trial<'a> {
    cfg: &'a RegisterConfig,
    client: &'a p2p::Client,
    num_blocks: u32,
    blocks: u32,
    heartbeat: Duration,
    capability: crate::types::Capability,
    quantization: String,
    /// Set once the trial announcement is out, so it is withdrawn on every path.
    announced: std::sync::atomic::AtomicBool,
}

struct Checked {
    span: BlockRange,
    peers: usize,
    announce_addrs: Vec<Multiaddr>,
    found_after: Duration,
    heartbeat_heard: bool,
    reachability: Vec<Reachability>,
    nat: Option<p2p::NatReport>,
}

/// How long `register` waits for AutoNAT's first verdict.
const NAT_WAIT: Duration = Duration::from_secs(8);

impl Trial<'_> {
    async fn run(&self) -> Result<Checked, RegisterError> {
        let cfg = self.cfg;
        // `p2p::spawn` has dialled every bootstrap and waited for the outcome.
        let peers = self.client.connected_peers().await?.len();
        if peers == 0 {
            let list: Vec<String> = cfg.p2p.bootstrap.iter().map(|a| a.to_string()).collect();
            return Err(RegisterError::Unjoinable(list.join(", ")));
        }
        // The outsider: a fresh client that knows only the bootstrap peers, listening for
        // heartbeats before the node announces so it can hear the very first one.
        let mut outsider_cfg = P2pConfig::new(Identity::generate(), Role::Client);
        outsider_cfg.bootstrap = cfg.p2p.bootstrap.clone();
        let outsider = p2p::spawn(outsider_cfg).await?;
        let result = self.announce_and_check(&outsider.client).await;
        let _ = outsider.client.shutdown().await;
        let _ = outsider.task.await;
        result
    }

    async fn announce_and_check(&self, outsider: &p2p::Client) -> Result<Checked, RegisterError> {
        let cfg = self.cfg;
        outsider.subscribe(&cfg.model_id).await?;
        let span = match cfg.span {
            Some(span) => span,
            None => crate::node::pick_span(
                self.client,
                &cfg.model_id,
                self.num_blocks,
                self.blocks,
                self.heartbeat,
            )
            .await
            .map_err(|e| match e {
                crate::node::NodeError::P2p(e) => RegisterError::P2p(e),
                other => RegisterError::P2p(P2pError::Dht(other.to_string())),
            })?,
        };
        self.client
            .announce(Announcement {
                model: cfg.model_id.clone(),
                span,
                num_blocks: self.num_blocks,
                price_per_token: cfg.price_per_token,
                load: ServerLoad {
                    free_memory_bytes: cfg.cache_budget_bytes,
                    ..ServerLoad::default()
                },
                capability: self.capability.clone(),
                quantization: self.quantization.clone(),
            })
            .await?;
        self.announced
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let (found_after, heartbeat_heard) = self.seen_by(outsider, span).await?;
        let mut checked = Checked {
            span,
            peers: self.client.connected_peers().await?.len(),
            announce_addrs: self.client.announce_addrs().await?,
            found_after,
            heartbeat_heard,
            reachability: Vec::new(),
            nat: self.nat_verdict().await,
        };
        if !cfg.p2p.public_addrs.is_empty() {
            let reports = tokio::time::timeout(cfg.check_timeout, self.client.check_reachability())
                .await
                .map_err(|_| P2pError::Timeout("the dial-back check"))??;
            if let Some(r) = reports.iter().find(|r| !r.reachable) {
                return Err(RegisterError::Unreachable {
                    addr: r.addr.clone(),
                    by: r.checked_by,
                    detail: r.detail.clone(),
                    steps: reachability::troubleshooting(&r.addr),
                });
            }
            checked.reachability = reports;
        }
        Ok(checked)
    }

    /// AutoNAT's verdict (or the last report if none came within [`NAT_WAIT`]).
    async fn nat_verdict(&self) -> Option<p2p::NatReport> {
        let deadline = tokio::time::Instant::now() + NAT_WAIT.min(self.cfg.check_timeout);
        loop {
            let report = self.client.nat_report().await.ok()?;
            if report.reach != p2p::Reach::Unknown || tokio::time::Instant::now() >= deadline {
                return Some(report);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The outsider looks the span's first block up in the DHT until it finds this node,
    /// then waits (within the same deadline) to hear its heartbeat.
    async fn seen_by(
        &self,
        outsider: &p2p::Client,
        span: BlockRange,
    ) -> Result<(Duration, bool), RegisterError> {
        let cfg = self.cfg;
        let me = self.client.local_peer_id();
        let started = Instant::now();
        let deadline = started + cfg.check_timeout;
        let found_after = loop {
            let found = outsider.lookup(&cfg.model_id, span.start).await?;
            if found.iter().any(|s| s.peer_id == me && s.span == span) {
                break started.elapsed();
            }
            if Instant::now() >= deadline {
                return Err(RegisterError::NotFound(cfg.check_timeout));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        loop {
            let live = outsider.live_servers(&cfg.model_id).await?;
            if live.iter().any(|s| s.peer_id == me) {
                return Ok((found_after, true));
            }
            if Instant::now() >= deadline {
                return Ok((found_after, false));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}
