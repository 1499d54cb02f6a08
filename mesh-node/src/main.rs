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
use mesh_core::p2p::{self, Announcement, Event, Multiaddr, P2pConfig, Role};
use mesh_core::{BlockRange, ModelId, ServerLoad};

#[derive(Parser, Debug)]
#[command(version, about = "Run a mesh provider node")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Join the mesh and announce a span of a model's blocks until Ctrl-C / SIGTERM.
    Start(StartArgs),
}

#[derive(clap::Args, Debug)]
struct StartArgs {
    /// Model name, e.g. tiny-llama-mesh.
    #[arg(long)]
    model: String,
    /// Blocks served, as START..END (end exclusive), e.g. 0..4.
    #[arg(long, value_parser = parse_span)]
    blocks: BlockRange,
    /// Number of blocks of the whole model.
    #[arg(long)]
    num_blocks: u32,
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
    let key = args.key.unwrap_or_else(|| Identity::default_path("node"));
    let identity =
        Identity::load_or_create(&key).with_context(|| format!("key {}", key.display()))?;
    let mut cfg = P2pConfig::new(identity, Role::Server);
    cfg.listen = args.listen;
    cfg.bootstrap = args.bootstrap;
    cfg.public_addrs = args.public_addr;
    cfg.heartbeat_interval = secs(args.heartbeat_secs, "heartbeat-secs")?;
    cfg.announce_interval = secs(args.announce_secs, "announce-secs")?;
    cfg.record_ttl = cfg.announce_interval * 3;
    let ann = Announcement {
        model,
        span: args.blocks,
        num_blocks: args.num_blocks,
        price_per_token: args.price_per_token,
        load: ServerLoad::default(),
    };
    ann.validate()?;

    let peer = p2p::spawn(cfg).await?;
    println!("peer id {}", peer.client.local_peer_id());
    for addr in &peer.listen_addrs {
        println!("listening on {addr}");
    }
    p2p::serve(peer, ann, shutdown_signal(), |_client, event| match event {
        Event::ServerUp(info) => println!(
            "server up {} {} {} price {}",
            info.peer_id, info.model, info.span, info.price_per_token
        ),
        Event::ServerDown { peer, model } => println!("server down {peer} {model}"),
        Event::InboundRequest { peer, .. } => {
            // Model serving comes with the pipeline; dropping the channel fails the request.
            tracing::debug!(%peer, "session request refused: not serving a model yet");
        }
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
