//! `mesh-node`: a provider peer.
//!
//! ```text
//! mesh-node start --model tiny-llama-mesh --blocks 0..4 --num-blocks 8 \
//!     --listen /ip4/0.0.0.0/tcp/31338 --bootstrap /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW...
//! ```
//! Prints `peer id <id>`, then `listening on <addr>/p2p/<id>` per address, then
//! `server up|down <peer> <model> ...` as other servers of the model come and go.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use mesh_core::identity::Identity;
use mesh_core::model::{parse_dtype, tiny, ModelFiles};
use mesh_core::node::{Node, NodeConfig};
use mesh_core::p2p::{Event, Multiaddr, P2pConfig, Role};
use mesh_core::pipeline::ServerLimits;
use mesh_core::{BlockRange, ModelId};

#[derive(Parser, Debug)]
#[command(version, about = "Run a mesh provider node")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve a span of a model's blocks to the mesh until Ctrl-C / SIGTERM.
    Start(StartArgs),
}

#[derive(clap::Args, Debug)]
struct StartArgs {
    /// Model name on the mesh.
    #[arg(long, default_value = tiny::TINY_MODEL_ID)]
    model: String,
    /// Hugging Face model directory (config.json, *.safetensors). Defaults to the
    /// embedded tiny model, written under $MESH_HOME when absent.
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Blocks served, as START..END (end exclusive), e.g. 0..4. Without it the node takes
    /// the blocks the mesh serves worst.
    #[arg(long, value_parser = parse_span)]
    blocks: Option<BlockRange>,
    /// How many blocks to take when --blocks is not given (default: the whole model).
    #[arg(long)]
    span_len: Option<u32>,
    /// Number of blocks of the whole model; checked against the model's config.
    #[arg(long)]
    num_blocks: Option<u32>,
    /// Weights and compute dtype: f32, f16 (bf16 needs a GPU).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Sessions open at once.
    #[arg(long, default_value_t = 64)]
    max_sessions: usize,
    /// Sessions open at once for one client peer.
    #[arg(long, default_value_t = 16)]
    max_sessions_per_client: usize,
    /// Memory for all sessions' KV caches, in MiB.
    #[arg(long, default_value_t = 1024)]
    cache_budget_mib: usize,
    /// Seconds a session may sit idle before its cache is freed.
    #[arg(long, default_value_t = 120)]
    idle_timeout_secs: u64,
    /// Longest session (prompt + generated tokens) a client may open.
    #[arg(long, default_value_t = 2048)]
    max_len: u32,
    /// Listen addresses (repeatable).
    #[arg(long, default_value = "/ip4/0.0.0.0/tcp/0")]
    listen: Vec<Multiaddr>,
    /// Peers to join through: bootstraps or any mesh peer (repeatable).
    #[arg(long)]
    bootstrap: Vec<Multiaddr>,
    /// This node's public address, announced instead of its listen addresses (repeatable).
    #[arg(long)]
    public_addr: Vec<Multiaddr>,
    /// The identity key file; created with mode 0600 on first run.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Seconds between heartbeats (±10 % jitter).
    #[arg(long, default_value_t = 15.0)]
    heartbeat_secs: f64,
    /// Seconds between DHT re-announcements; records live 3 times as long.
    #[arg(long, default_value_t = 120.0)]
    announce_secs: f64,
    /// Price per token in micro-units.
    #[arg(long, default_value_t = 0)]
    price_per_token: u64,
}

fn parse_span(s: &str) -> Result<BlockRange, String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("expected START..END, got {s:?}"))?;
    let start = a.trim().parse().map_err(|e| format!("start: {e}"))?;
    let end = b.trim().parse().map_err(|e| format!("end: {e}"))?;
    Ok(BlockRange::new(start, end))
}

fn secs(s: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("--{what} must be a positive number of seconds"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,libp2p=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let Command::Start(args) = Cli::parse().command;
    let model = ModelId::new(args.model);
    if !model.is_valid() {
        bail!("invalid model name {model:?}");
    }
    let model_dir = match args.model_dir {
        Some(dir) => dir,
        None if model.as_str() == tiny::TINY_MODEL_ID => tiny::ensure(&tiny::default_dir())?,
        None => bail!("--model-dir is required for model {model}"),
    };
    let files = ModelFiles::open(&model_dir)
        .with_context(|| format!("model directory {}", model_dir.display()))?;
    if let Some(n) = args.num_blocks {
        if n != files.config.num_blocks() {
            bail!(
                "--num-blocks {n} does not match {} ({} blocks)",
                model_dir.display(),
                files.config.num_blocks()
            );
        }
    }
    let dtype = parse_dtype(&args.dtype)
        .with_context(|| format!("--dtype {:?}: expected f32, f16 or bf16", args.dtype))?;
    let key = args.key.unwrap_or_else(|| Identity::default_path("node"));
    let identity =
        Identity::load_or_create(&key).with_context(|| format!("key {}", key.display()))?;
    let mut p2p_cfg = P2pConfig::new(identity, Role::Server);
    p2p_cfg.listen = args.listen;
    p2p_cfg.bootstrap = args.bootstrap;
    p2p_cfg.public_addrs = args.public_addr;
    p2p_cfg.heartbeat_interval = secs(args.heartbeat_secs, "heartbeat-secs")?;
    p2p_cfg.announce_interval = secs(args.announce_secs, "announce-secs")?;
    p2p_cfg.record_ttl = p2p_cfg.announce_interval * 3;
    let cfg = NodeConfig {
        model_id: model,
        model_dir,
        span: args.blocks,
        span_len: args.span_len,
        dtype,
        device: candle_core::Device::Cpu,
        limits: ServerLimits {
            max_sessions: args.max_sessions,
            max_sessions_per_client: args.max_sessions_per_client,
            cache_budget_bytes: args.cache_budget_mib << 20,
            idle_timeout: Duration::from_secs(args.idle_timeout_secs),
            max_len: args.max_len,
        },
        price_per_token: args.price_per_token,
        p2p: p2p_cfg,
    };

    let node = Node::start(cfg).await?;
    println!("peer id {}", node.peer_id());
    for addr in node.listen_addrs() {
        println!("listening on {addr}");
    }
    let ann = node.announcement();
    println!(
        "serving {} blocks {} of {}",
        ann.model, ann.span, ann.num_blocks
    );
    node.run(shutdown_signal(), |event| match event {
        Event::ServerUp(info) => println!(
            "server up {} {} {} price {}",
            info.peer_id, info.model, info.span, info.price_per_token
        ),
        Event::ServerDown { peer, model } => println!("server down {peer} {model}"),
        Event::InboundRequest { .. } => {}
    })
    .await?;
    println!("stopped");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
