//! The `/mesh/session/1` messages between a client and the server of one span.
//!
//! A session is opened on a sub-span of what the server serves, fed hidden states
//! (prefill: many positions at once; decode: one), and closed. Every message is one
//! bounded frame encoded by [`crate::wire`].

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::ledger::{Attestation, SignedReceipt, Terms};
use crate::types::{BlockRange, ModelId, SessionId};
use crate::wire::WireTensor;

/// What a client asks of a server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SessionRequest {
    /// Reserve a KV cache of `max_len` positions for blocks `span` of `model`.
    Open {
        session: SessionId,
        model: ModelId,
        span: BlockRange,
        max_len: u32,
        /// Sign every step's answer ([`Attestation`]): a client that checks servers keeps
        /// the signatures as evidence; one that does not would only pay for them.
        attest: bool,
    },
    /// Run `hidden` (`[1, seq, hidden_size]`) at positions `start_pos..start_pos+seq`.
    Forward {
        session: SessionId,
        start_pos: u32,
        hidden: WireTensor,
    },
    /// Free the session's cache.
    Close { session: SessionId },
    /// A receipt this server signed, now countersigned by the client: the server stores it.
    Countersigned { receipt: Box<SignedReceipt> },
    /// Drop the session's cached positions from `to` on (draft tokens the client's check
    /// rejected, in speculative decoding), then run `hidden` at positions `to..` as
    /// `Forward` does: a rewind rides on the next step instead of costing a round trip.
    /// `to` may not be past the positions cached. Last, so older variants keep their
    /// numbers on the wire.
    Rewind {
        session: SessionId,
        to: u32,
        hidden: WireTensor,
    },
    /// A step of a route whose servers push to each other ([`StepInput`], [`PushTarget`]):
    /// run the input at `start_pos..` (after forgetting the positions from `start_pos` on
    /// when `rewind`), send the output on to `push_to` if set, and answer `Hidden` as
    /// `Forward` does without waiting for the push to be taken.
    Step {
        session: SessionId,
        start_pos: u32,
        rewind: bool,
        input: StepInput,
        push_to: Option<PushTarget>,
    },
    /// Server to server: the output of the step before, the input of the step `session`'s
    /// client sent this server with [`StepInput::PushedBy`] the sender. It is run only when
    /// the client's step names the sender and the same `start_pos`; until then it is held
    /// (one per session).
    Push {
        session: SessionId,
        start_pos: u32,
        hidden: WireTensor,
    },
}

/// Where a [`SessionRequest::Step`]'s hidden states come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StepInput {
    /// In the request, as `Forward` sends them.
    Hidden(WireTensor),
    /// Pushed by this peer, the server of the hop before ([`SessionRequest::Push`]).
    PushedBy(#[serde(with = "crate::ledger::hex::peer")] PeerId),
}

/// The next server of a route and its session, where a step's output goes on to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushTarget {
    #[serde(with = "crate::ledger::hex::peer")]
    pub peer: PeerId,
    pub session: SessionId,
}

/// What a server answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SessionResponse {
    Opened {
        session: SessionId,
        span: BlockRange,
        /// What the server will bill by (`None`: it keeps no ledger).
        terms: Option<Box<Terms>>,
    },
    /// The span's output for the positions just run, and the time the server spent on it.
    Hidden {
        session: SessionId,
        hidden: WireTensor,
        compute_micros: u64,
        /// A running receipt, every so many tokens, for the client to countersign.
        receipt: Option<Box<SignedReceipt>>,
        /// The server's signature over this step's input and output: what a client keeps
        /// as evidence if a second opinion shows the output wrong (`None`: unsigned server).
        attestation: Option<Attestation>,
    },
    /// The session is gone; the receipt covers whatever was not billed yet.
    Closed {
        session: SessionId,
        receipt: Option<Box<SignedReceipt>>,
    },
    /// A countersigned receipt was stored.
    Acknowledged,
    /// The request was not served; nothing changed on the server.
    Refused(Refusal),
}

/// Why a server refused: a clear reason instead of falling over.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("server does not serve model {0}")]
    UnknownModel(ModelId),
    #[error("server serves {served}, not {requested}")]
    SpanNotServed {
        served: BlockRange,
        requested: BlockRange,
    },
    #[error("{open} sessions open, the limit is {limit}")]
    TooManySessions { open: usize, limit: usize },
    #[error("{open} sessions open for this client, the limit is {limit}")]
    TooManyClientSessions { open: usize, limit: usize },
    #[error("cache of {needed} bytes does not fit: {free} of {budget} bytes free")]
    OverBudget {
        needed: usize,
        free: usize,
        budget: usize,
    },
    #[error("max_len {requested} is over the server's limit of {limit}")]
    MaxLenTooLarge { requested: u32, limit: u32 },
    #[error("no such session (expired, closed, or opened by someone else)")]
    UnknownSession,
    #[error("session already exists")]
    SessionExists,
    #[error("{owed} owed for work this client never countersigned; the limit is {limit}")]
    Unpaid { owed: u64, limit: u64 },
    #[error("server is busy; try another")]
    Busy,
    /// This peer sent more requests than the server takes from one peer per second.
    #[error("too many requests from this peer; retry after {retry_after_ms} ms")]
    RateLimited { retry_after_ms: u64 },
    #[error("server is shutting down")]
    ShuttingDown,
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The server's ledger failed: it cannot keep receipts, so it opens no billed sessions
    /// (it would work unpaid). Last, so older peers' variant numbers stay as they were.
    #[error("this server's ledger failed: it cannot keep receipts and opens no billed sessions; try another server")]
    LedgerFailed,
    /// A step waiting for a pushed input ended without it: the client sent the input
    /// itself, or it never came in time. Says nothing bad about this server.
    #[error("the pushed input never came: {0}")]
    NoPushedInput(String),
}

impl Refusal {
    /// A refusal that says nothing bad about the server: it is full or leaving, or this
    /// client is sending too fast.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Refusal::Busy
                | Refusal::RateLimited { .. }
                | Refusal::ShuttingDown
                | Refusal::NoPushedInput(_)
        )
    }
}
