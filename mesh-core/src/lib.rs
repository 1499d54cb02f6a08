//! # mesh-core
//!
//! Everything mesh does, as a library the binaries call into:
//!
//! - [`model`]: a Llama-family decoder that loads and runs only a span of blocks
//!   `[start, end)`, a per-session KV cache, the client-side head (embeddings, final norm,
//!   LM head), sampling and generation, and the embedded tiny model.
//! - [`types`]: the shared vocabulary (`ModelId`, `BlockRange`, `SessionId`).
//! - [`error`]: the crate's typed errors.

pub mod error;
pub mod model;
pub mod paths;
pub mod types;

pub use error::{Error, Result};
pub use types::{BlockRange, ModelId, SessionId};
