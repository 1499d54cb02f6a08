//! The command line: every subcommand and flag, with the help text `--help` shows.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use mesh_core::p2p::Multiaddr;
use mesh_core::BlockRange;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Run a mesh provider node: serve a span of a model's blocks to the mesh",
    after_help = "First run: `mesh-node init --bootstrap <ADDR>`, `mesh-node register`, then\n\
                  `mesh-node start --daemon`, `mesh-node status`, `mesh-node stop`.\n\
                  Files live in $MESH_HOME (default ~/.mesh)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Write a commented config file (default $MESH_HOME/node.toml) and the identity key.
    Init(InitArgs),
    /// Check this node can serve, then save the span it will serve in the config.
    ///
    /// Checks the model files, the machine, the span's size against free memory, joining
    /// the mesh, being found in it, and (with a public address) being reachable from
    /// outside; announces only for the check, then withdraws. Run it before `start`.
    Register(Box<RegisterArgs>),
    /// Serve a span until Ctrl-C / SIGTERM (or, with --daemon, in the background).
    Start(Box<StartArgs>),
    /// Stop a running node: SIGTERM, wait for it to withdraw and exit, tidy the PID file.
    Stop(StopArgs),
    /// Is the node running? Peer id, span, sessions and tokens served, from its /healthz.
    Status(StatusArgs),
    /// What this machine offers: CPU, memory, free disk, GPUs.
    Probe(ProbeArgs),
    /// What this node earned, by day and model, from its ledger of signed receipts.
    ///
    /// While the node runs it holds the ledger open, so it is asked instead (its
    /// /api/earnings); stopped, the ledger is read directly.
    Earnings(EarningsArgs),
    /// Group unsettled, countersigned receipts into a batch file anyone can verify.
    ///
    /// `mesh-client verify-batch FILE` checks the file; the receipts are marked settled
    /// unless --dry-run. A running node settles itself (POST /api/settle, from this
    /// machine only) and keeps a copy under settlements/ in its ledger directory.
    Settle(SettleArgs),
}

#[derive(clap::Args, Debug)]
pub struct ConfigArg {
    /// The config file [default: $MESH_HOME/node.toml; built-in defaults if it is absent].
    #[arg(long, short = 'c', env = "MESH_NODE_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct InitArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Replace an existing config file (the identity key is kept, never replaced).
    #[arg(long)]
    pub force: bool,
    /// Model name on the mesh [default: the built-in tiny model].
    #[arg(long)]
    pub model: Option<String>,
    /// Hugging Face model directory (config.json, *.safetensors).
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// Bootstrap peers to join through (repeatable).
    #[arg(long)]
    pub bootstrap: Vec<Multiaddr>,
    /// Listen addresses (repeatable) [default: /ip4/0.0.0.0/tcp/31338].
    #[arg(long)]
    pub listen: Vec<Multiaddr>,
    /// This node's public address (repeatable).
    #[arg(long)]
    pub public_addr: Vec<Multiaddr>,
    /// Local status port (HOST:PORT) [default: 127.0.0.1:9090].
    #[arg(long)]
    pub http: Option<SocketAddr>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// What `start` and `register` share: the node's model, span, limits and peer settings.
/// Each flag overrides the config file's value.
#[derive(clap::Args, Debug)]
pub struct NodeFlags {
    /// Model name on the mesh.
    #[arg(long)]
    pub model: Option<String>,
    /// Hugging Face model directory (config.json, *.safetensors), a .gguf file, or a hub
    /// id (Org/Name) found offline in the local Hugging Face cache. Defaults to the
    /// embedded tiny model, written under $MESH_HOME when absent.
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// Blocks served, as START..END (end exclusive), e.g. 0..4. Without it the node takes
    /// the blocks the mesh serves worst.
    #[arg(long, value_parser = parse_span)]
    pub blocks: Option<BlockRange>,
    /// How many blocks to take when --blocks is not given [default: as many as fit].
    #[arg(long)]
    pub span_len: Option<u32>,
    /// Number of blocks of the whole model; checked against the model's config.
    #[arg(long)]
    pub num_blocks: Option<u32>,
    /// Weights and compute dtype: f32, f16 or bf16 [default: f32].
    #[arg(long)]
    pub dtype: Option<String>,
    /// Quantize the span's weights on load: q8_0 or q4k (GGUF files keep their own)
    /// [default: none, full precision].
    #[arg(long)]
    pub quantize: Option<String>,
    /// Where the span computes: cpu, cuda or cuda:N (needs a build with --features cuda)
    /// [default: cpu].
    #[arg(long)]
    pub device: Option<String>,
    /// Sessions open at once [default: 64].
    #[arg(long)]
    pub max_sessions: Option<usize>,
    /// Sessions open at once for one client peer [default: 16].
    #[arg(long)]
    pub max_sessions_per_client: Option<usize>,
    /// Memory for all sessions' KV caches, in MiB [default: 1024].
    #[arg(long)]
    pub cache_budget_mib: Option<usize>,
    /// Seconds a session may sit idle before its cache is freed [default: 120].
    #[arg(long)]
    pub idle_timeout_secs: Option<u64>,
    /// Longest session (prompt + generated tokens) a client may open [default: 2048].
    #[arg(long)]
    pub max_len: Option<u32>,
    /// Decode steps of different sessions run together as one pass over the weights, at
    /// most this many (1 to 16; 1 runs each alone) [default: 16].
    #[arg(long)]
    pub max_batch: Option<usize>,
    /// Listen addresses (repeatable) [default: /ip4/0.0.0.0/tcp/0].
    #[arg(long)]
    pub listen: Vec<Multiaddr>,
    /// Peers to join through: bootstraps or any mesh peer (repeatable).
    #[arg(long)]
    pub bootstrap: Vec<Multiaddr>,
    /// This node's public address, announced instead of its listen addresses (repeatable).
    #[arg(long)]
    pub public_addr: Vec<Multiaddr>,
    /// The identity key file; created with mode 0600 on first run [default: node.key
    /// beside the config file].
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Seconds between heartbeats (±10 % jitter) [default: 15].
    #[arg(long)]
    pub heartbeat_secs: Option<f64>,
    /// Seconds between DHT re-announcements; records live 3 times as long [default: 120].
    #[arg(long)]
    pub announce_secs: Option<f64>,
    /// Price per token in micro-units [default: 0].
    #[arg(long)]
    pub price_per_token: Option<u64>,
    /// The ledger of signed receipts [default: ledger beside the config file].
    #[arg(long)]
    pub ledger_dir: Option<PathBuf>,
    #[command(flatten)]
    pub nat: NatFlags,
}

/// Behind a home router: nothing to set (AutoNAT and the bootstraps' relays do it); these
/// flags override the config's `[nat]` section.
#[derive(clap::Args, Debug)]
pub struct NatFlags {
    /// When to reserve a slot on relays: auto (when AutoNAT finds this node behind NAT),
    /// always, never [default: auto].
    #[arg(long, value_parser = ["auto", "always", "never"])]
    pub relay: Option<String>,
    /// A relay to reserve on, .../p2p/PEER_ID (repeatable) [default: the bootstraps].
    #[arg(long)]
    pub relay_via: Vec<Multiaddr>,
    /// Ask the home router to forward the listen port (UPnP); the log says whether it did.
    #[arg(long)]
    pub upnp: bool,
    /// Let AutoNAT use peers at private addresses (a LAN-only mesh or a test lab).
    #[arg(long)]
    pub autonat_private_ips: bool,
    /// Relay for peers behind NAT (a public node), within the limits below.
    #[arg(long)]
    pub relay_server: bool,
    /// Relay server: most reservations held at once [default: 128].
    #[arg(long)]
    pub relay_max_reservations: Option<usize>,
    /// Relay server: most circuits at once [default: 64].
    #[arg(long)]
    pub relay_max_circuits: Option<usize>,
    /// Relay server: seconds before a circuit is cut [default: 3600].
    #[arg(long)]
    pub relay_max_circuit_secs: Option<u64>,
    /// Relay server: KiB (both ways) before a circuit is cut [default: 262144, 256 MiB].
    #[arg(long)]
    pub relay_max_circuit_kib: Option<u64>,
}

/// `start`'s flags override the config file's values.
#[derive(clap::Args, Debug)]
pub struct StartArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Run in the background: returns once the node serves; output goes to the log file.
    #[arg(long, short = 'd')]
    pub daemon: bool,
    /// Serve without joining a mesh (no bootstrap peer): a local test node that nobody
    /// else can find. Without it, a node with no bootstrap refuses to start.
    #[arg(long)]
    pub standalone: bool,
    #[command(flatten)]
    pub node: NodeFlags,
    /// Local status port, HOST:PORT; port 0 picks a free one [default: 127.0.0.1:9090].
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// PID file [default: mesh-node.pid beside the config file].
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Output file of --daemon [default: mesh-node.log beside the config file].
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// Log lines: text for people, json (one object a line: ts, level, peer_id,
    /// session_id, event, then the event's fields) for log collectors.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

/// `register`: the checks before serving, then the span written into the config.
#[derive(clap::Args, Debug)]
pub struct RegisterArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    #[command(flatten)]
    pub node: NodeFlags,
    /// Run every check but leave the config file as it is.
    #[arg(long)]
    pub dry_run: bool,
    /// Seconds to wait for the mesh to find this node, and for the dial-back.
    #[arg(long, default_value_t = 20)]
    pub check_secs: u64,
}

#[derive(clap::Args, Debug)]
pub struct StopArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// PID file [default: from the config].
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Seconds to wait for the node to exit after SIGTERM.
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// PID file [default: from the config].
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Print the node's /healthz JSON instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// Print only the one-line summary (tokens, earned, sessions, VRAM, CPU, uptime).
    #[arg(long)]
    pub short: bool,
}

#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    /// Print JSON instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// Also say how many blocks of this model (directory, .gguf file or cached hub id)
    /// fit in RAM and in each GPU's free VRAM.
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// With --model-dir: the weights' dtype, f32 or f16 [default: f32].
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// With --model-dir: size the blocks quantized on load, q8_0 or q4k.
    #[arg(long)]
    pub quantize: Option<mesh_core::model::Quantization>,
    /// With --model-dir: the KV-cache budget kept beside the weights, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub cache_budget_mib: u64,
}

#[derive(clap::Args, Debug)]
pub struct SettleArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The ledger of signed receipts [default: from the config].
    #[arg(long)]
    pub ledger_dir: Option<PathBuf>,
    /// Only sessions started on or after this UTC day, YYYY-MM-DD [default: all].
    #[arg(long, value_parser = parse_day)]
    pub since: Option<u64>,
    /// Leave out clients who owe less than this in total (micro-units).
    #[arg(long, default_value_t = 10)]
    pub min_amount: u64,
    /// Write the batch but mark nothing settled.
    #[arg(long)]
    pub dry_run: bool,
    /// Settle nothing (and write no batch) unless the total due reaches this (micro-units):
    /// for a payout with a minimum run from a timer (deploy/mesh-settle.timer).
    #[arg(long, default_value_t = 0)]
    pub min_total: u64,
    /// Where to write the batch [default: settlement-<time>.json here].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `YYYY-MM-DD` as ms since the Unix epoch at 00:00 UTC.
fn parse_day(s: &str) -> Result<u64, String> {
    let bad = || format!("expected YYYY-MM-DD, got {s:?}");
    let mut parts = s.split('-').map(|p| p.parse::<i64>().map_err(|_| bad()));
    let (y, m, d) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(y), Some(m), Some(d), None) => (y?, m?, d?),
        _ => return Err(bad()),
    };
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || y < 1970 {
        return Err(bad());
    }
    // Days from civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(days as u64 * 86_400_000)
}

#[derive(clap::Args, Debug)]
pub struct EarningsArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The ledger of signed receipts [default: from the config].
    #[arg(long)]
    pub ledger_dir: Option<PathBuf>,
    /// Only sessions started in the last N days [default: all].
    #[arg(long)]
    pub days: Option<u64>,
    /// Print JSON rows instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn parse_span(s: &str) -> Result<BlockRange, String> {
    mesh_core::config::parse_span(s)
}
