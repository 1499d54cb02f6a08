//! The inference path across peers.
//!
//! - [`protocol`]: the `/mesh/session/1` messages (open, forward, close, refusals).
//! - [`server`]: [`SpanServer`], a span's sessions and their KV caches under hard limits.
//! - [`route`]: choosing a chain of servers that covers every block.
//! - [`session`]: [`RemoteSession`], the client's chain with fail-over and replay.
//! - [`generate`](mod@generate): token-by-token generation over a [`RemoteSession`].
//! - [`admission`]: per-peer request rate and in-flight limits on a server.
//! - [`verify`]: clients re-checking a sampled fraction of servers' steps.

pub mod admission;
pub mod balance;
pub mod generate;
pub mod protocol;
pub mod route;
pub mod server;
pub mod session;
pub mod speculative;
pub mod verify;

use std::time::Duration;

use libp2p::PeerId;

pub use generate::{generate, generate_into, TokenEvent};
pub use protocol::{PushTarget, Refusal, SessionRequest, SessionResponse, StepInput};
pub use route::{Candidate, Hop, PricedOut, RoutePolicy, DEFAULT_MAX_PRICE_RATIO};
pub use server::{Billing, ServerLimits, ServerStats, SessionUsage, SpanServer};
pub use session::{
    wait_for_coverage, wait_for_heard_coverage, ClientLedger, HopChecks, LocalBlocks, PushStats,
    RemoteSession, SessionConfig, SessionReport,
};
pub use speculative::{generate_speculative, DraftModel, SpeculationStats};
pub use verify::{LocalReference, VerifyConfig};

use crate::types::{BlockRange, ModelId};

/// Why a remote inference step or session failed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// No live servers cover these blocks (after excluding the ones that failed): `missing`
    /// are the blocks none covers, `seen` the servers known, with their blocks.
    #[error(
        "no route for blocks {range} of {model}: no server covers blocks {}; servers seen: {} \
         ({excluded} failed servers excluded)",
        range_list(.missing), seen_list(.seen)
    )]
    NoRoute {
        model: ModelId,
        range: BlockRange,
        excluded: usize,
        missing: Vec<BlockRange>,
        seen: Vec<(PeerId, BlockRange)>,
    },
    /// Every server that could serve these blocks takes shorter sessions than asked for.
    /// Not the servers' fault: none is banned or marked down for it.
    #[error(
        "no server of {model} takes a session of {requested} positions (prompt + max tokens); \
         the longest any offers is {longest}: shorten the prompt or the max tokens"
    )]
    ContextTooLong {
        model: ModelId,
        requested: u32,
        longest: u32,
    },
    /// A step would run past the positions the session was opened for
    /// ([`SessionConfig::max_len`]): refused before anything is sent; the session is as it
    /// was. Open a longer session for longer text.
    #[error(
        "the session holds {max_len} positions and this step would end at {requested}: \
         open the session with a larger max_len"
    )]
    SessionFull { max_len: u32, requested: u64 },
    /// Servers cover these blocks, but only at prices over the client's ceiling
    /// ([`RoutePolicy::max_price`], [`RoutePolicy::max_price_ratio`]).
    #[error("no route for blocks {range} of {model} within the price ceiling: {}", priced_out_list(.servers))]
    OverPrice {
        model: ModelId,
        range: BlockRange,
        servers: Vec<PricedOut>,
    },
    /// A server offered terms at a higher price than it announced (DHT record or
    /// heartbeat): the client never agrees to them.
    #[error("{peer} offered terms at {offered} per token, above the {announced} it announced")]
    AboveAnnouncedPrice {
        peer: PeerId,
        offered: u64,
        announced: u64,
    },
    /// A server answered with a refusal.
    #[error("{peer} refused: {reason}")]
    Refused { peer: PeerId, reason: Refusal },
    /// A server did not answer in time.
    #[error("{peer} did not answer within {after:?}")]
    Timeout { peer: PeerId, after: Duration },
    /// A server could not be reached or the connection dropped.
    #[error("{peer} unreachable: {reason}")]
    Unreachable { peer: PeerId, reason: String },
    /// A server sent something that is not a valid answer.
    #[error("{peer} broke the protocol: {detail}")]
    Protocol { peer: PeerId, detail: String },
    /// Servers kept failing; the last failure is attached.
    #[error("gave up after {failures} server failures; last: {last}")]
    TooManyFailures {
        failures: usize,
        last: Box<PipelineError>,
    },
    /// A server's output disagreed with a second opinion by more than the tolerance.
    #[error("{peer} returned wrong hidden states (off by {difference:.3e} relative)")]
    Mismatch { peer: PeerId, difference: f32 },
    /// A server was caught after the client had used its unchecked answers: the route was
    /// rebuilt, and the generation must go back to `position` (every position before it
    /// was checked) and continue from there. [`generate()`] does this itself.
    #[error("a server was caught lying; generation rewinds to position {position}")]
    Rewind { position: usize },
    /// The local ledger refused or failed (a receipt is kept apart from the inference).
    #[error("ledger: {0}")]
    Ledger(String),
    #[error(transparent)]
    P2p(#[from] crate::p2p::P2pError),
    #[error(transparent)]
    Wire(#[from] crate::wire::WireError),
    #[error(transparent)]
    TensorFrame(#[from] crate::wire::TensorFrameError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
}

impl From<candle_core::Error> for PipelineError {
    fn from(e: candle_core::Error) -> Self {
        PipelineError::Model(e.into())
    }
}

impl PipelineError {
    /// The server to blame, when one is.
    pub fn peer(&self) -> Option<PeerId> {
        match self {
            PipelineError::Refused { peer, .. }
            | PipelineError::Timeout { peer, .. }
            | PipelineError::Unreachable { peer, .. }
            | PipelineError::Protocol { peer, .. }
            | PipelineError::Mismatch { peer, .. }
            | PipelineError::AboveAnnouncedPrice { peer, .. } => Some(*peer),
            _ => None,
        }
    }
}

/// "peer asks P (ceiling C), ..." for [`PipelineError::OverPrice`].
fn range_list(ranges: &[BlockRange]) -> String {
    let list: Vec<String> = ranges.iter().map(ToString::to_string).collect();
    if list.is_empty() {
        "(none: the servers that cover them failed)".into()
    } else {
        list.join(", ")
    }
}

/// Servers seen, at most 8 named.
fn seen_list(seen: &[(PeerId, BlockRange)]) -> String {
    if seen.is_empty() {
        return "none".into();
    }
    let mut list: Vec<String> = seen
        .iter()
        .take(8)
        .map(|(peer, span)| format!("{peer} (blocks {span})"))
        .collect();
    if seen.len() > 8 {
        list.push(format!("and {} more", seen.len() - 8));
    }
    list.join(", ")
}

fn priced_out_list(servers: &[PricedOut]) -> String {
    servers
        .iter()
        .map(|o| {
            format!(
                "{} asks {} (ceiling {})",
                o.peer, o.price_per_token, o.ceiling
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}
