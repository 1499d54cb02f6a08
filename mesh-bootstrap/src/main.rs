//! `mesh-bootstrap`: a DHT server peer that others join the mesh through.
//!
//! ```text
//! mesh-bootstrap                                   # TCP and QUIC on port 31337, ~/.mesh/bootstrap.key
//! mesh-bootstrap --listen /ip4/127.0.0.1/tcp/0     # a local test bootstrap
//! mesh-bootstrap --bootstrap /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW...   # join other bootstraps
//! ```

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use mesh_core::identity::Identity;
use mesh_core::p2p::{self, Multiaddr, P2pConfig, RelayLimits, Role};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Run a mesh bootstrap peer (Kademlia DHT server and heartbeat relay)"
)]
struct Args {
    /// Port for the default listen addresses (TCP and UDP/QUIC on all interfaces).
    #[arg(long, default_value_t = p2p::DEFAULT_BOOTSTRAP_PORT)]
    port: u16,
    /// Listen addresses (repeatable); replaces the defaults built from --port.
    #[arg(long)]
    listen: Vec<Multiaddr>,
    /// Other bootstraps (or any mesh peer) to join, as /ip4/HOST/tcp/PORT/p2p/PEER_ID.
    #[arg(long)]
    bootstrap: Vec<Multiaddr>,
    /// This machine's public address, announced to peers (repeatable).
    #[arg(long)]
    public_addr: Vec<Multiaddr>,
    /// The identity key file; created with mode 0600 on first run.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Most inbound connections at once (every peer joining through this bootstrap holds
    /// one while it looks the mesh up).
    #[arg(long, default_value_t = p2p::DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Most inbound connections from one IP address (an IPv6 /64 counts as one), so one
    /// host cannot take every slot.
    #[arg(long, default_value_t = p2p::DEFAULT_MAX_CONNECTIONS_PER_IP,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections_per_ip: u32,
    /// Run no relay: peers behind NAT cannot reserve here (by default a bootstrap relays
    /// for them, within the limits below).
    #[arg(long)]
    no_relay: bool,
    /// Relay: most reservations held at once.
    #[arg(long, default_value_t = RelayLimits::default().max_reservations)]
    relay_max_reservations: usize,
    /// Relay: most circuits at once.
    #[arg(long, default_value_t = RelayLimits::default().max_circuits)]
    relay_max_circuits: usize,
    /// Relay: seconds before a circuit is cut.
    #[arg(long, default_value_t = RelayLimits::default().max_circuit_duration.as_secs())]
    relay_max_circuit_secs: u64,
    /// Relay: KiB (both ways) before a circuit is cut (256 MiB by default).
    #[arg(long, default_value_t = RelayLimits::default().max_circuit_bytes >> 10)]
    relay_max_circuit_kib: u64,
    /// Let AutoNAT use and answer peers at private addresses (a LAN-only mesh, a lab).
    #[arg(long)]
    autonat_private_ips: bool,
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
    let args = Args::parse();
    let key = args
        .key
        .unwrap_or_else(|| Identity::default_path("bootstrap"));
    let identity =
        Identity::load_or_create(&key).with_context(|| format!("key {}", key.display()))?;
    let mut cfg = P2pConfig::new(identity, Role::Bootstrap);
    cfg.listen = if args.listen.is_empty() {
        vec![
            format!("/ip4/0.0.0.0/tcp/{}", args.port).parse()?,
            format!("/ip4/0.0.0.0/udp/{}/quic-v1", args.port).parse()?,
        ]
    } else {
        args.listen
    };
    cfg.bootstrap = args.bootstrap;
    cfg.public_addrs = args.public_addr;
    cfg.max_connections = args.max_connections;
    cfg.max_connections_per_ip = args.max_connections_per_ip;
    cfg.nat.relay_server = (!args.no_relay).then(|| RelayLimits {
        max_reservations: args.relay_max_reservations.max(1),
        max_circuits: args.relay_max_circuits.max(1),
        max_circuit_duration: std::time::Duration::from_secs(args.relay_max_circuit_secs.max(1)),
        max_circuit_bytes: args.relay_max_circuit_kib.max(1) << 10,
        ..RelayLimits::default()
    });
    cfg.nat.autonat_private_ips = args.autonat_private_ips;
    let peer = p2p::spawn(cfg).await?;
    println!("peer id {}", peer.client.local_peer_id());
    for addr in &peer.listen_addrs {
        println!("listening on {addr}");
    }
    println!("give peers one of these addresses: --bootstrap <address>");
    p2p::run_bootstrap(peer, shutdown_signal()).await?;
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
