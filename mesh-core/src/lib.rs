//! # mesh-core
//!
//! Everything mesh does, as a library the binaries call into:
//!
//! - [`model`]: a Llama-family decoder that loads and runs only a span of blocks
//!   `[start, end)`, a per-session KV cache, the client-side head (embeddings, final norm,
//!   LM head), sampling and generation, and the embedded tiny model.
//! - [`types`]: the shared vocabulary (`ModelId`, `BlockRange`, `SessionId`, `ServerInfo`).
//! - [`identity`]: the peer's persistent ed25519 key on disk (`PeerId`, receipt signing key).
//! - [`wire`]: the only place values become bytes; every decode is bounded before allocating.
//! - [`ledger`]: signed contribution receipts, the sled ledger each peer keeps, settlement
//!   batches anyone can verify offline.
//! - [`p2p`]: the libp2p swarm: Kademlia announcements and lookups, gossip heartbeats and the
//!   live-server table, the `/mesh/session/1` request-response protocol, the bootstrap peer.
//! - [`node`]: a provider: load a span, announce it, serve sessions on a worker thread.
//! - Operating a node: [`config`] (`node.toml`), [`probe`] (CPU, memory, disk, GPUs, span
//!   sizing), [`register`] (the checks before serving: files, sizing, joining, being
//!   found, reachability), [`daemon`] (PID file, stop), [`metrics`] (counters, latency
//!   histogram), [`http`] (the local `/healthz`, `/metrics`, earnings and dashboard).
//! - [`error`]: the crate's typed errors.

pub mod config;
pub mod daemon;
pub mod error;
pub mod http;
pub mod identity;
pub mod ledger;
pub mod local_mesh;
pub mod metrics;
pub mod model;
pub mod node;
pub mod p2p;
pub mod paths;
pub mod pipeline;
pub mod probe;
pub mod register;
pub mod types;
pub mod wire;

pub use error::{Error, Result};
pub use types::{BlockRange, ModelId, RemoteSpan, ServerInfo, ServerLoad, SessionId};
