//! `node.toml`: a provider's configuration file.
//!
//! ```
//! let text = mesh_core::config::NodeFile::default().commented_toml();
//! let back = mesh_core::config::NodeFile::parse(&text).unwrap();
//! assert_eq!(back, mesh_core::config::NodeFile::default());
//! assert!(mesh_core::config::NodeFile::parse("modle = \"x\"").unwrap_err().contains("modle"));
//! ```
//!
//! Every key is optional (the defaults are those of `mesh-node start`), and an unknown key is
//! an error that names it, so a typo never silently falls back to a default. Relative paths
//! are taken from the directory holding the file. `mesh-node init` writes the file with
//! every key present and commented ([`NodeFile::commented_toml`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};

use crate::model::builtin::{self, Builtin};
use crate::p2p;
use crate::pipeline::ServerLimits;
use crate::types::BlockRange;

mod edit;
mod nat;
mod operate;
pub use edit::set_blocks;
pub use nat::Nat;
pub use operate::{Daemon, Settle};

/// The file's name in the mesh home: `~/.mesh/node.toml`.
pub const FILE_NAME: &str = "node.toml";
/// The node's local HTTP address unless configured.
pub const DEFAULT_HTTP: &str = "127.0.0.1:9090";
/// The listen address `init` writes: the port after the bootstrap's 31337.
pub const DEFAULT_LISTEN: &str = "/ip4/0.0.0.0/tcp/31338";

/// Why a configuration could not be read, parsed or used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, a wrong type, or an unknown key (the message names it).
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A key has a value mesh cannot use.
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    /// `init` found a file and was not told to overwrite it.
    #[error(
        "{0} already exists; pass --force to overwrite it (the identity key is never overwritten)"
    )]
    Exists(PathBuf),
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The whole `node.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeFile {
    /// Model name on the mesh.
    pub model: String,
    /// Hugging Face model directory; the embedded tiny model when absent.
    pub model_dir: Option<PathBuf>,
    /// Blocks served, `"START..END"`; absent = take the least-served blocks.
    pub blocks: Option<String>,
    /// Blocks to take when `blocks` is absent; absent = as many as fit (at most all).
    pub span_len: Option<u32>,
    /// `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// Quantize the span's projections on load: `q8_0` or `q4k`; absent = full precision.
    pub quantize: Option<String>,
    /// `cpu`, `cuda` or `cuda:N`; a GPU that cannot be used falls back to the CPU.
    pub device: String,
    /// Price per token in micro-units.
    pub price_per_token: u64,
    /// The identity key file; default `node.key` beside this file.
    pub key: Option<PathBuf>,
    /// `text` or `json`.
    pub log_format: String,
    /// The ledger of signed receipts (a sled store); default `ledger` beside this file.
    pub ledger_dir: Option<PathBuf>,
    pub network: Network,
    pub nat: Nat,
    pub limits: Limits,
    pub http: Http,
    pub daemon: Daemon,
    pub settle: Settle,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Network {
    pub listen: Vec<String>,
    pub bootstrap: Vec<String>,
    pub public_addr: Vec<String>,
    pub heartbeat_secs: f64,
    pub announce_secs: f64,
    pub max_connections: u32,
    pub max_connections_per_ip: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_sessions: usize,
    pub max_sessions_per_client: usize,
    pub cache_budget_mib: usize,
    pub idle_timeout_secs: u64,
    pub max_len: u32,
    pub max_batch: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http {
    /// `host:port`; port 0 picks a free one (printed at start, kept beside the PID file).
    pub listen: String,
}

impl Default for NodeFile {
    fn default() -> Self {
        Self {
            model: builtin::DEFAULT_ID.to_owned(),
            model_dir: None,
            blocks: None,
            span_len: None,
            dtype: "f32".into(),
            quantize: None,
            device: "cpu".into(),
            price_per_token: 0,
            key: None,
            log_format: "text".into(),
            ledger_dir: None,
            network: Network::default(),
            nat: Nat::default(),
            limits: Limits::default(),
            http: Http::default(),
            daemon: Daemon::default(),
            settle: Settle::default(),
        }
    }
}

impl Default for Network {
    fn default() -> Self {
        Self {
            listen: vec!["/ip4/0.0.0.0/tcp/0".into()],
            bootstrap: Vec::new(),
            public_addr: Vec::new(),
            heartbeat_secs: 15.0,
            announce_secs: 120.0,
            max_connections: p2p::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: p2p::DEFAULT_MAX_CONNECTIONS_PER_IP,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_sessions: 64,
            max_sessions_per_client: 16,
            cache_budget_mib: 1024,
            idle_timeout_secs: 120,
            max_len: 2048,
            max_batch: crate::pipeline::server::MAX_BATCH,
        }
    }
}

impl Default for Http {
    fn default() -> Self {
        Self {
            listen: DEFAULT_HTTP.into(),
        }
    }
}

/// A checked, absolute-path view of a [`NodeFile`]: what `start` runs from.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub model: String,
    /// `None` = the embedded tiny model in its default place.
    pub model_dir: Option<PathBuf>,
    pub blocks: Option<BlockRange>,
    pub span_len: Option<u32>,
    pub dtype: candle_core::DType,
    pub quantize: Option<crate::model::Quantization>,
    pub device: crate::model::DeviceSpec,
    pub price_per_token: u64,
    pub key: PathBuf,
    pub ledger_dir: PathBuf,
    pub json_logs: bool,
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub public_addrs: Vec<Multiaddr>,
    pub heartbeat_interval: Duration,
    pub announce_interval: Duration,
    pub max_connections: u32,
    pub max_connections_per_ip: u32,
    pub nat: p2p::NatConfig,
    pub limits: ServerLimits,
    pub http: SocketAddr,
    pub pid_file: PathBuf,
    pub log_file: PathBuf,
    /// `None`: the daemon's log grows without bound.
    pub log_rotation: Option<crate::daemon::LogRotation>,
    /// `None`: the node settles only by hand.
    pub settle: Option<crate::http::schedule::SettleSchedule>,
}

/// The default config path: `<mesh home>/node.toml`.
pub fn default_path() -> PathBuf {
    crate::paths::mesh_home().join(FILE_NAME)
}

/// Parses `"START..END"` (end exclusive).
pub fn parse_span(s: &str) -> Result<BlockRange, String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("expected START..END, got {s:?}"))?;
    let start: u32 = a.trim().parse().map_err(|e| format!("start: {e}"))?;
    let end: u32 = b.trim().parse().map_err(|e| format!("end: {e}"))?;
    if start >= end {
        return Err(format!("{s:?} is empty: START must be below END"));
    }
    Ok(BlockRange::new(start, end))
}

fn secs(s: f64, key: &str) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| invalid(key, "must be a positive number of seconds"))
}

fn addrs(list: &[String], key: &str) -> Result<Vec<Multiaddr>, ConfigError> {
    list.iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse()
                .map_err(|e| invalid(format!("{key}[{i}]"), format!("{s:?}: {e}")))
        })
        .collect()
}

fn toml_str(s: &str) -> String {
    // TOML basic strings escape like JSON strings.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| toml_str(s)).collect();
    format!("[{}]", quoted.join(", "))
}

fn opt_line(key: &str, value: Option<String>, example: &str) -> String {
    match value {
        Some(v) => format!("{key} = {v}"),
        None => format!("# {key} = {example}"),
    }
}

impl NodeFile {
    /// Parses TOML text; the error names the line and, for a typo, the unknown key.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Reads `path` if it exists, else the defaults (so `start` works without `init`).
    pub fn load_or_default(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::metadata(path) {
            Ok(_) => Self::load(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ConfigError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Writes [`Self::commented_toml`] to `path` (mode 0600 directory 0700 not needed: no
    /// secrets here), refusing to replace an existing file unless `force`.
    pub fn write_new(&self, path: &Path, force: bool) -> Result<(), ConfigError> {
        let io = |source| ConfigError::Io {
            path: path.to_owned(),
            source,
        };
        if !force && path.exists() {
            return Err(ConfigError::Exists(path.to_owned()));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        // Write beside, then rename: a crash never leaves half a config.
        let tmp = path.with_extension(format!("toml.tmp{}", std::process::id()));
        std::fs::write(&tmp, self.commented_toml()).map_err(io)?;
        if !force {
            // Claim the name atomically: a file created meanwhile is not replaced.
            let linked = std::fs::hard_link(&tmp, path);
            let _ = std::fs::remove_file(&tmp);
            return linked.map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => ConfigError::Exists(path.to_owned()),
                _ => io(e),
            });
        }
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// The file with every key, each with a comment; unset optional keys are commented out.
    pub fn commented_toml(&self) -> String {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| toml_str(&p.display().to_string()));
        format!(
            r#"# mesh-node configuration. Every key is optional; a misspelt key is an error.
# Relative paths are taken from this file's directory. Flags given to
# `mesh-node start` override the values here.

# Model name on the mesh.
model = {model}
# Hugging Face model directory (config.json, *.safetensors), a .gguf file, or a hub id
# ("Qwen/Qwen2.5-0.5B-Instruct") found in the local Hugging Face cache. Without it the
# node serves the built-in model named above (mesh-demo, mesh-demo-draft, tiny-llama-mesh).
{model_dir}
# Blocks served, "START..END" (end exclusive). Without it the node takes the blocks the
# mesh serves worst: span_len of them, or as many as fit in memory.
{blocks}
{span_len}
# Weights and compute dtype: f32, f16 or bf16.
dtype = {dtype}
# Quantize the span's weights on load: "q8_0" (half of f16) or "q4k" (about 3.5 times
# more blocks than f16). GGUF files keep their own quantization.
{quantize}
# Where the span computes: "cpu", "cuda" or "cuda:N" (a build with --features cuda).
# A GPU that cannot be used is reported at start and the CPU serves instead.
device = {device}
# Price per token, in micro-units.
price_per_token = {price}
# The identity key (ed25519, mode 0600). Back it up: it is this node's identity and
# the key its receipts are signed with.
{key}
# Log lines: "text" for people, "json" for log collectors.
log_format = {log_format}
# The ledger of signed receipts (what `mesh-node earnings` reads). Back it up.
{ledger_dir}

[network]
# Where peers reach this node. Open this TCP port in the firewall.
listen = {listen}
# Bootstrap peers (or any mesh peer) to join through, e.g.
# "/ip4/203.0.113.7/tcp/31337/p2p/12D3KooW...".
bootstrap = {bootstrap}
# This node's public address, announced instead of its listen addresses; checked by a
# peer dialling back at start. e.g. "/ip4/203.0.113.8/tcp/31338".
public_addr = {public_addr}
# Seconds between heartbeats, and between DHT re-announcements.
heartbeat_secs = {heartbeat:?}
announce_secs = {announce:?}
# Inbound connections at once: in all, and from one IP address (an IPv6 /64 counts as
# one), so one host cannot take every slot. Raise the second for many peers behind one NAT.
max_connections = {max_connections}
max_connections_per_ip = {max_per_ip}

{nat}
[limits]
# Sessions open at once, in all and per client peer.
max_sessions = {max_sessions}
max_sessions_per_client = {max_per_client}
# Memory for all sessions' KV caches, in MiB: the margin kept beside the weights.
cache_budget_mib = {cache}
# Seconds a session may sit idle before its cache is freed.
idle_timeout_secs = {idle}
# Longest session (prompt + generated tokens) a client may open.
max_len = {max_len}
# Decode steps of different sessions run together as one pass over the weights, at
# most this many (1 to 16; 1 runs each alone).
max_batch = {max_batch}

[http]
# Local status port: /healthz, /metrics (Prometheus), / (dashboard). Keep it on
# 127.0.0.1 unless a firewall guards it; port 0 picks a free port.
listen = {http}

{daemon}
{settle}"#,
            model = toml_str(&self.model),
            model_dir = opt_line(
                "model_dir",
                path(&self.model_dir),
                "\"/models/Llama-3.2-1B\""
            ),
            blocks = opt_line("blocks", self.blocks.as_deref().map(toml_str), "\"0..8\""),
            span_len = opt_line("span_len", self.span_len.map(|n| n.to_string()), "8"),
            dtype = toml_str(&self.dtype),
            quantize = opt_line(
                "quantize",
                self.quantize.as_deref().map(toml_str),
                "\"q8_0\""
            ),
            device = toml_str(&self.device),
            price = self.price_per_token,
            key = opt_line("key", path(&self.key), "\"node.key\""),
            log_format = toml_str(&self.log_format),
            ledger_dir = opt_line("ledger_dir", path(&self.ledger_dir), "\"ledger\""),
            listen = toml_list(&self.network.listen),
            bootstrap = toml_list(&self.network.bootstrap),
            public_addr = toml_list(&self.network.public_addr),
            heartbeat = self.network.heartbeat_secs,
            announce = self.network.announce_secs,
            max_connections = self.network.max_connections,
            max_per_ip = self.network.max_connections_per_ip,
            nat = self.nat.template(),
            max_sessions = self.limits.max_sessions,
            max_per_client = self.limits.max_sessions_per_client,
            cache = self.limits.cache_budget_mib,
            idle = self.limits.idle_timeout_secs,
            max_len = self.limits.max_len,
            max_batch = self.limits.max_batch,
            http = toml_str(&self.http.listen),
            daemon = self.daemon.toml(),
            settle = self.settle.toml(),
        )
    }

    /// Checks every value and makes paths absolute against `base` (the file's directory).
    pub fn resolve(&self, base: &Path) -> Result<Resolved, ConfigError> {
        let abs = |p: &Path| {
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };
        let model_id = crate::types::ModelId::new(self.model.clone());
        if !model_id.is_valid() {
            return Err(invalid(
                "model",
                format!("{:?} is not a valid model name", self.model),
            ));
        }
        if self.model_dir.is_none() && Builtin::named(&self.model).is_none() {
            return Err(invalid(
                "model_dir",
                format!(
                    "required for model {:?} (built in: {})",
                    self.model,
                    Builtin::names()
                ),
            ));
        }
        let blocks = self
            .blocks
            .as_deref()
            .map(parse_span)
            .transpose()
            .map_err(|m| invalid("blocks", m))?;
        if self.span_len == Some(0) {
            return Err(invalid("span_len", "must be at least 1"));
        }
        let dtype = crate::model::parse_dtype(&self.dtype).ok_or_else(|| {
            invalid(
                "dtype",
                format!("{:?}: expected f32, f16 or bf16", self.dtype),
            )
        })?;
        let device = self
            .device
            .parse::<crate::model::DeviceSpec>()
            .map_err(|m| invalid("device", m))?;
        let json_logs = match self.log_format.as_str() {
            "text" => false,
            "json" => true,
            other => {
                return Err(invalid(
                    "log_format",
                    format!("{other:?}: expected text or json"),
                ))
            }
        };
        let http: SocketAddr = self.http.listen.parse().map_err(|e| {
            invalid(
                "http.listen",
                format!("{:?}: {e} (expected HOST:PORT)", self.http.listen),
            )
        })?;
        let l = &self.limits;
        if l.max_sessions == 0 || l.max_sessions_per_client == 0 || l.max_len == 0 {
            return Err(invalid(
                "limits",
                "max_sessions, max_sessions_per_client and max_len must be at least 1",
            ));
        }
        if !(1..=crate::pipeline::server::MAX_BATCH).contains(&l.max_batch) {
            return Err(invalid(
                "limits.max_batch (--max-batch)",
                format!(
                    "{} is not between 1 and {}",
                    l.max_batch,
                    crate::pipeline::server::MAX_BATCH
                ),
            ));
        }
        let n = &self.network;
        if n.max_connections == 0 || n.max_connections_per_ip == 0 {
            return Err(invalid(
                "network",
                "max_connections and max_connections_per_ip must be at least 1",
            ));
        }
        let heartbeat_interval = secs(self.network.heartbeat_secs, "network.heartbeat_secs")?;
        let announce_interval = secs(self.network.announce_secs, "network.announce_secs")?;
        if l.cache_budget_mib == 0 {
            return Err(invalid(
                "limits.cache_budget_mib (--cache-budget-mib)",
                "must be at least 1 (MiB): every session keeps its KV cache in it",
            ));
        }
        let listen = addrs(&self.network.listen, "network.listen")?;
        if listen.is_empty() {
            return Err(invalid("network.listen", "needs at least one address"));
        }
        let quantize = (self.quantize.as_deref())
            .map(|q| q.parse().map_err(|m: String| invalid("quantize", m)))
            .transpose()?;
        Ok(Resolved {
            model: self.model.clone(),
            quantize,
            model_dir: self
                .model_dir
                .as_deref()
                .map(|p| crate::model::hub::absolute_or_id(p, abs)),
            blocks,
            span_len: self.span_len,
            dtype,
            device,
            price_per_token: self.price_per_token,
            key: abs(self.key.as_deref().unwrap_or(Path::new("node.key"))),
            ledger_dir: abs(self.ledger_dir.as_deref().unwrap_or(Path::new("ledger"))),
            json_logs,
            listen,
            bootstrap: addrs(&self.network.bootstrap, "network.bootstrap")?,
            public_addrs: addrs(&self.network.public_addr, "network.public_addr")?,
            heartbeat_interval,
            announce_interval,
            max_connections: n.max_connections,
            max_connections_per_ip: n.max_connections_per_ip,
            nat: self.nat.resolve()?,
            limits: ServerLimits {
                max_sessions: l.max_sessions,
                max_sessions_per_client: l.max_sessions_per_client,
                cache_budget_bytes: l.cache_budget_mib.saturating_mul(1 << 20),
                idle_timeout: Duration::from_secs(l.idle_timeout_secs),
                max_len: l.max_len,
                max_batch: l.max_batch,
                ..ServerLimits::default()
            },
            http,
            pid_file: abs(self
                .daemon
                .pid_file
                .as_deref()
                .unwrap_or(Path::new("mesh-node.pid"))),
            log_file: abs(self
                .daemon
                .log_file
                .as_deref()
                .unwrap_or(Path::new("mesh-node.log"))),
            log_rotation: self.daemon.rotation()?,
            settle: self.settle.schedule()?,
        })
    }
}

/// The directory relative paths in the file at `path` are taken from.
pub fn base_dir(path: &Path) -> PathBuf {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => dir.to_owned(),
        None => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests;
