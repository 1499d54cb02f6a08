//! Speculative decoding: a small draft model on the client proposes `k` tokens, one step
//! through the mesh runs them all (as a prefill runs a prompt), and the client keeps the
//! longest prefix the target model agrees with, plus the target's own next token.
//!
//! Over real networks a mesh token costs round trips, not compute; each accepted draft
//! token is a round trip through every hop saved.
//!
//! The check samples the target's token at each position with the generation's own
//! sampler, in order, and accepts a draft token only when it is that token: what comes out
//! is token for token what the generation gives without a draft, for greedy decoding and
//! for a seeded sampled one alike (the sampler draws once per token either way). The
//! positions of rejected tokens are dropped on the servers by the next step
//! ([`SessionRequest::Rewind`](super::SessionRequest::Rewind)); they were computed, so
//! the servers bill them and the client's tally counts them.

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, IndexOp};
use tokio::sync::mpsc;

use super::{PipelineError, RemoteSession, TokenEvent};
use crate::model::{ClientHead, Generation, LocalModel, ModelError, SpanCache};

/// Fewest and most tokens proposed per step.
const MIN_DRAFT: usize = 1;
const MAX_DRAFT: usize = 12;

/// A draft model: small, same tokenizer as the target, run whole on the client.
pub struct DraftModel {
    model: LocalModel,
}

impl DraftModel {
    /// Load the model in `dir` (one span, on the CPU) as a draft for a target whose
    /// vocabulary has `target_vocab` tokens.
    pub fn load(dir: &Path, target_vocab: usize) -> Result<Self, ModelError> {
        let model = LocalModel::load_split(dir, 1, &Device::Cpu)?;
        let vocab = model.files().config.vocab_size;
        if vocab != target_vocab {
            return Err(ModelError::Unsupported(format!(
                "draft model {} has {vocab} tokens, the target {target_vocab}: a draft \
                 needs the target's tokenizer",
                dir.display()
            )));
        }
        Ok(Self { model })
    }

    fn max_context(&self) -> usize {
        self.model.files().config.max_position_embeddings
    }
}

/// How speculation went in one generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpeculationStats {
    /// Steps through the mesh after the prefill.
    pub steps: usize,
    /// Draft tokens proposed, and those the target agreed with.
    pub proposed: usize,
    pub accepted: usize,
    /// Tokens generated after the first.
    pub tokens: usize,
}

impl SpeculationStats {
    /// Accepted draft tokens per proposed one.
    pub fn acceptance(&self) -> f64 {
        self.accepted as f64 / self.proposed.max(1) as f64
    }

    /// Tokens per step through the mesh (1 without a draft).
    pub fn tokens_per_step(&self) -> f64 {
        self.tokens as f64 / self.steps.max(1) as f64
    }
}

/// One generation's draft: its own KV cache, kept in step with the accepted tokens.
struct DraftState<'a> {
    draft: &'a DraftModel,
    cache: SpanCache,
    /// The tokens the cache holds, in order.
    fed: Vec<u32>,
    /// Tokens proposed per step, adapted to how many get accepted.
    k: usize,
}

impl<'a> DraftState<'a> {
    fn new(draft: &'a DraftModel, k: usize) -> Result<Self, ModelError> {
        let span = &draft.model.spans()[0];
        Ok(Self {
            draft,
            cache: span.new_cache(draft.max_context())?,
            fed: Vec::new(),
            k: k.clamp(MIN_DRAFT, MAX_DRAFT),
        })
    }

    /// Drop what the cache holds past its common prefix with `tokens`.
    fn sync(&mut self, tokens: &[u32]) {
        let common = self
            .fed
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count();
        self.fed.truncate(common);
        self.cache.truncate(common);
    }

    /// Greedy proposals for the `n` tokens after `tokens`.
    fn propose(&mut self, tokens: &[u32], n: usize) -> Result<Vec<u32>, ModelError> {
        self.sync(tokens);
        let room = self.draft.max_context().saturating_sub(tokens.len());
        let n = n.min(room);
        let (span, head) = (&self.draft.model.spans()[0], self.draft.model.head());
        let mut input = tokens[self.fed.len()..].to_vec();
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            if input.is_empty() {
                break;
            }
            let hidden = head.embed(&input)?;
            let start = self.cache.len();
            let hidden = span.forward(&mut self.cache, &hidden, start)?;
            self.fed.extend_from_slice(&input);
            let logits = head.last_logits(&hidden)?;
            let token = argmax(&logits);
            out.push(token);
            input = vec![token];
        }
        Ok(out)
    }

    /// Raise `k` while every proposal is taken, lower it when fewer than half are.
    fn adapt(&mut self, proposed: usize, accepted: usize) {
        if proposed == 0 {
            return;
        }
        if accepted == proposed {
            self.k = (self.k + 1).min(MAX_DRAFT);
        } else if accepted * 2 < proposed {
            self.k = self.k.saturating_sub(1).max(MIN_DRAFT);
        }
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// [`super::generate_into`] with `draft` proposing up to `k` tokens a step (adapted as
/// it goes). Not with checking on (`--verify`): a checked step and a rewound one do not
/// mix yet.
pub async fn generate_speculative(
    head: &ClientHead,
    session: &mut RemoteSession,
    generation: &mut Generation,
    draft: &DraftModel,
    k: usize,
    max_len: usize,
    tokens: &mpsc::Sender<TokenEvent>,
) -> Result<SpeculationStats, PipelineError> {
    if session.verifying() {
        return Err(ModelError::Unsupported(
            "speculative decoding (a draft model) with checking (--verify) on".into(),
        )
        .into());
    }
    let mut state = DraftState::new(draft, k)?;
    let mut stats = SpeculationStats::default();
    // Positions the servers hold: a step starting before it rewinds them.
    let mut sent = 0usize;
    while let Some((input, start)) = generation.next_input() {
        let started = Instant::now();
        let mut ids = input.to_vec();
        let decoding = ids.len() == 1;
        let proposals = if decoding {
            // Room for the proposals and the target's own token after them.
            let n = state
                .k
                .min(generation.remaining().saturating_sub(1))
                .min(max_len.saturating_sub(start + 1));
            state.propose(generation.tokens(), n)?
        } else {
            Vec::new()
        };
        ids.extend_from_slice(&proposals);
        let hidden = head.embed(&ids)?;
        let out = if start < sent {
            session.step_rewinding(hidden, start as u32).await?
        } else {
            session.step(hidden, start as u32).await?
        };
        sent = start + ids.len();
        let logits = head.logits(&out)?;
        // The target's token after the input, then after each proposal the target agreed
        // with, until it disagrees.
        let first = ids.len() - 1 - proposals.len();
        let mut made = Vec::new();
        let mut accepted = 0;
        for (i, at) in (first..ids.len()).enumerate() {
            let row = logits.i((0, at))?.to_vec1::<f32>()?;
            let Some(token) = generation.accept_logits(&row) else {
                break;
            };
            made.push(token);
            if proposals.get(i) != Some(&token) {
                break;
            }
            accepted += 1;
        }
        if decoding {
            stats.steps += 1;
            stats.proposed += proposals.len();
            stats.accepted += accepted;
            stats.tokens += made.len();
            state.adapt(proposals.len(), accepted);
        }
        // The step's time, shared by the tokens it made.
        let latency = started.elapsed() / made.len().max(1) as u32;
        let route = session.route();
        let first_index = generation.generated().len().saturating_sub(made.len());
        for (j, token) in made.into_iter().enumerate() {
            let event = TokenEvent {
                token,
                index: first_index + j,
                latency,
                route: route.clone(),
                cost_so_far: session.countersigned_amount(),
            };
            if tokens.send(event).await.is_err() {
                return Ok(stats);
            }
        }
    }
    tracing::debug!(
        steps = stats.steps,
        acceptance = stats.acceptance(),
        tokens_per_step = stats.tokens_per_step(),
        "speculative decoding"
    );
    Ok(stats)
}
