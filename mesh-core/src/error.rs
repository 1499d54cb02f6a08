//! The crate's error type: one enum per area, wrapped here so callers can match on the area.

use crate::model::ModelError;

/// Every error mesh-core returns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Loading or running a model span failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A receipt, the ledger store or a settlement batch failed.
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    /// Remote inference failed.
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
    /// The peer-to-peer layer failed (swarm, DHT, gossip, requests).
    #[error(transparent)]
    P2p(#[from] crate::p2p::P2pError),
    /// The peer identity could not be loaded or created.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// Bytes could not be encoded or decoded.
    #[error(transparent)]
    Wire(#[from] crate::wire::WireError),
    /// `node.toml` could not be read, parsed or used.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The PID file could not be claimed, or the node it names not stopped.
    #[error(transparent)]
    Daemon(#[from] crate::daemon::DaemonError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
