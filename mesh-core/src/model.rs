//! The model engine: a Llama-family decoder that runs as block spans.
//!
//! A server loads only blocks `[start, end)` ([`SpanModel`]) and keeps a KV cache per
//! client session ([`SpanCache`]). The client owns the [`ClientHead`] (token embeddings,
//! final norm, LM head), as in Petals: see `docs/architecture.md` for why.
//!
//! ```no_run
//! # fn main() -> mesh_core::Result<()> {
//! use mesh_core::model::{LocalModel, SamplingParams};
//! let dir = mesh_core::model::tiny::ensure(std::path::Path::new("/tmp/mesh-tiny"))?;
//! let mut model = LocalModel::load_split(&dir, 3, &candle_core::Device::Cpu)?;
//! let out = model.generate("Hello", &SamplingParams::greedy(16), |_| {})?;
//! println!("{}", out.text);
//! # Ok(()) }
//! ```

pub mod builtin;
mod cache;
pub mod chat;
mod config;
pub mod device;
mod error;
mod generate;
mod gguf;
mod gguf_export;
mod gguf_tokenizer;
mod head;
pub mod hub;
pub mod kernels;
mod layers;
mod linear;
mod local;
pub mod matvec;
mod quant;
pub mod rope;
mod sampling;
mod span;
pub mod tiny;
mod tokenizer;
mod weights;

pub use cache::SpanCache;
pub use chat::{ChatMessage, ChatTemplate};
pub use config::{LlamaConfig, RopeScaling};
pub use device::{DeviceSpec, SelectedDevice};
pub use error::ModelError;
pub use generate::{FinishReason, Generation};
pub use gguf_export::write_gguf;
pub use head::ClientHead;
pub use local::{GenerationOutput, LocalModel};
pub use quant::Quantization;
pub use sampling::{Sampler, SamplingParams, TokenDistribution};
pub use span::SpanModel;
pub use tokenizer::{MeshTokenizer, TextStream};
pub use weights::{parse_dtype, ModelFiles, WeightFormat, Weights};
