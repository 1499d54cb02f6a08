//! Speculative decoding: a small draft model on the client proposes `k` tokens, one step
//! through the mesh runs them all (as a prefill runs a prompt), and the client keeps the
//! longest prefix the target model agrees with, plus one token of the target's own.
//!
//! Over real networks a mesh token costs round trips, not compute; each accepted draft
//! token is a round trip through every hop saved.
//!
//! The draft draws its proposals from its own distribution under the generation's sampling
//! knobs, and the check is the speculative-sampling rule (keep a proposal with probability
//! min(1, p/q), else draw from the residual): the tokens that come out are distributed
//! exactly as without a draft, and a seeded run is reproducible. Greedy, that is the
//! target's argmax, token for token the output without a draft. The positions of rejected
//! tokens are dropped on the servers by the next step
//! ([`SessionRequest::Rewind`](super::SessionRequest::Rewind)); they were computed, so
//! the servers bill them and the client's tally counts them. With checking on
//! (`--verify`), multi-position steps are checked like any other, and tokens are shown
//! only once checked ([`super::generate`]).

use std::path::Path;

use candle_core::{Device, IndexOp};
use tokio::sync::mpsc;

use super::{PipelineError, RemoteSession, TokenEvent};
use crate::model::{ClientHead, Generation, LocalModel, ModelError, SpanCache, TokenDistribution};

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
pub(super) struct DraftState<'a> {
    draft: &'a DraftModel,
    cache: SpanCache,
    /// The tokens the cache holds, in order.
    fed: Vec<u32>,
    /// Tokens proposed per step, adapted to how many get accepted.
    k: usize,
    /// Most positions a session may hold.
    max_len: usize,
    /// Positions the servers hold: a step starting before it rewinds them.
    sent: usize,
    pub(super) stats: SpeculationStats,
}

impl<'a> DraftState<'a> {
    fn new(draft: &'a DraftModel, k: usize, max_len: usize) -> Result<Self, ModelError> {
        let span = &draft.model.spans()[0];
        Ok(Self {
            draft,
            cache: span.new_cache(draft.max_context())?,
            fed: Vec::new(),
            k: k.clamp(MIN_DRAFT, MAX_DRAFT),
            max_len,
            sent: 0,
            stats: SpeculationStats::default(),
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

    /// Up to `n` proposals after the generation's tokens, each drawn from the draft's
    /// distribution under the generation's sampling knobs, with that distribution.
    fn propose(
        &mut self,
        generation: &mut Generation,
        n: usize,
    ) -> Result<Vec<(u32, TokenDistribution)>, ModelError> {
        let tokens = generation.tokens().to_vec();
        self.sync(&tokens);
        let room = self.draft.max_context().saturating_sub(tokens.len());
        let n = n.min(room);
        let (span, head) = (&self.draft.model.spans()[0], self.draft.model.head());
        let mut input = tokens[self.fed.len()..].to_vec();
        let mut proposed: Vec<u32> = Vec::with_capacity(n);
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
            let distribution = generation.distribution(&logits, &proposed);
            let token = generation.draw(&distribution);
            proposed.push(token);
            out.push((token, distribution));
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

    /// A caught server's session was rebuilt with its first `position` positions.
    pub(super) fn rewound(&mut self, position: usize) {
        self.sent = self.sent.min(position);
    }

    /// One step through the mesh: the generation's next input and, when decoding, the
    /// draft's proposals after it. Returns the tokens made, each with the number of
    /// positions its logits rest on.
    pub(super) async fn step(
        &mut self,
        head: &ClientHead,
        session: &mut RemoteSession,
        generation: &mut Generation,
    ) -> Result<Vec<(usize, u32)>, PipelineError> {
        let Some((input, start)) = generation.next_input() else {
            return Ok(Vec::new());
        };
        let mut ids = input.to_vec();
        let decoding = ids.len() == 1;
        let proposals = if decoding {
            // Room for the proposals and the target's own token after them.
            let n = self
                .k
                .min(generation.remaining().saturating_sub(1))
                .min(self.max_len.saturating_sub(start + 1));
            self.propose(generation, n)?
        } else {
            Vec::new()
        };
        ids.extend(proposals.iter().map(|(token, _)| *token));
        let hidden = head.embed(&ids)?;
        let out = if start < self.sent {
            session.step_rewinding(hidden, start as u32).await?
        } else {
            session.step(hidden, start as u32).await?
        };
        self.sent = start + ids.len();
        // The LM head runs only where a token is chosen: after the input's last token and
        // after each proposal.
        let first = ids.len() - 1 - proposals.len();
        let logits = head.logits(&out.narrow(1, first, proposals.len() + 1)?)?;
        let mut made = Vec::new();
        let mut accepted = 0;
        for i in 0..=proposals.len() {
            let row = logits.i((0, i))?.to_vec1::<f32>()?;
            let behind = start + first + i + 1;
            let Some((proposed, draft)) = proposals.get(i) else {
                made.extend(generation.accept_logits(&row).map(|t| (behind, t)));
                break;
            };
            let Some((token, kept)) = generation.accept_proposal(&row, *proposed, draft) else {
                break;
            };
            made.push((behind, token));
            if !kept {
                break;
            }
            accepted += 1;
        }
        if decoding {
            self.stats.steps += 1;
            self.stats.proposed += proposals.len();
            self.stats.accepted += accepted;
            self.stats.tokens += made.len();
            self.adapt(proposals.len(), accepted);
        }
        Ok(made)
    }
}

/// [`super::generate_into`] with `draft` proposing up to `k` tokens a step (adapted as
/// it goes).
pub async fn generate_speculative(
    head: &ClientHead,
    session: &mut RemoteSession,
    generation: &mut Generation,
    draft: &DraftModel,
    k: usize,
    max_len: usize,
    tokens: &mpsc::Sender<TokenEvent>,
) -> Result<SpeculationStats, PipelineError> {
    let mut state = DraftState::new(draft, k, max_len)?;
    super::generate::run(head, session, generation, Some(&mut state), |event| {
        let tokens = tokens.clone();
        async move { tokens.send(event).await.is_ok() }
    })
    .await?;
    let stats = state.stats;
    tracing::debug!(
        steps = stats.steps,
        acceptance = stats.acceptance(),
        tokens_per_step = stats.tokens_per_step(),
        "speculative decoding"
    );
    Ok(stats)
}
