//! Generation as a state machine that does not care where the blocks run.
//!
//! The same [`Generation`] drives a local split and a chain of remote servers: the
//! driver asks for the next input, runs it through the blocks however it likes, and
//! hands back the last position's logits.

use super::{ModelError, Sampler, SamplingParams, TokenDistribution};

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FinishReason {
    /// A stop token was produced (it is not part of the output).
    Stop,
    /// `max_new_tokens` were produced, or the context is full.
    Length,
}

/// Progress of one generation: prompt, tokens so far, sampler, stop rules.
#[derive(Clone, Debug)]
pub struct Generation {
    tokens: Vec<u32>,
    prompt_len: usize,
    fed: usize,
    max_context: usize,
    sampler: Sampler,
    finished: Option<FinishReason>,
}

impl Generation {
    /// Start generating after `prompt`, in a context of at most `max_context` tokens.
    pub fn new(
        prompt: Vec<u32>,
        params: SamplingParams,
        max_context: usize,
    ) -> Result<Self, ModelError> {
        if prompt.is_empty() {
            return Err(ModelError::EmptyPrompt);
        }
        if prompt.len() >= max_context {
            return Err(ModelError::ContextOverflow {
                requested: prompt.len() + 1,
                max: max_context,
            });
        }
        let finished = (params.max_new_tokens == 0).then_some(FinishReason::Length);
        Ok(Self {
            prompt_len: prompt.len(),
            tokens: prompt,
            fed: 0,
            max_context,
            sampler: Sampler::new(params),
            finished,
        })
    }

    /// Tokens the blocks have not seen yet and the position of the first; `None` once
    /// finished. The first call returns the whole prompt (prefill), later ones one token.
    pub fn next_input(&self) -> Option<(&[u32], usize)> {
        if self.finished.is_some() {
            return None;
        }
        Some((&self.tokens[self.fed..], self.fed))
    }

    /// Take the logits of the last position of the input just run; returns the new token,
    /// or `None` when it was a stop token.
    pub fn accept_logits(&mut self, logits: &[f32]) -> Option<u32> {
        if self.finished.is_some() {
            return None;
        }
        let token = self.sampler.sample(logits, &self.tokens);
        self.accept(token)
    }

    /// The distribution the next token would be drawn from after `logits`, were the
    /// tokens so far followed by `pending` (a draft's proposals not yet checked).
    pub fn distribution(&self, logits: &[f32], pending: &[u32]) -> TokenDistribution {
        if pending.is_empty() {
            return self.sampler.distribution(logits, &self.tokens);
        }
        let history = [&self.tokens[..], pending].concat();
        self.sampler.distribution(logits, &history)
    }

    /// A draft's proposal drawn from `distribution` with this generation's random
    /// stream, so that a seeded speculative run is reproducible.
    pub fn draw(&mut self, distribution: &TokenDistribution) -> u32 {
        self.sampler.draw(distribution)
    }

    /// Like [`Generation::accept_logits`], for a position where a draft proposed
    /// `proposed` from `draft`: the token is the proposal or its replacement under the
    /// speculative-sampling rule ([`super::Sampler::verify_proposal`]), and the flag says
    /// which. `None` when it was a stop token.
    pub fn accept_proposal(
        &mut self,
        logits: &[f32],
        proposed: u32,
        draft: &TokenDistribution,
    ) -> Option<(u32, bool)> {
        if self.finished.is_some() {
            return None;
        }
        let target = self.distribution(logits, &[]);
        let (token, kept) = self.sampler.verify_proposal(proposed, draft, &target);
        self.accept(token).map(|token| (token, kept))
    }

    fn accept(&mut self, token: u32) -> Option<u32> {
        self.fed = self.tokens.len();
        if self.sampler.params().stop_tokens.contains(&token) {
            self.finished = Some(FinishReason::Stop);
            return None;
        }
        self.tokens.push(token);
        if self.generated().len() >= self.sampler.params().max_new_tokens
            || self.tokens.len() >= self.max_context
        {
            self.finished = Some(FinishReason::Length);
        }
        Some(token)
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finished
    }

    /// The prompt and every token generated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Tokens still to generate before `max_new_tokens` ends the generation.
    pub fn remaining(&self) -> usize {
        if self.finished.is_some() {
            return 0;
        }
        let cap = self.sampler.params().max_new_tokens;
        let room = self.max_context.saturating_sub(self.tokens.len());
        cap.saturating_sub(self.generated().len()).min(room)
    }

    pub fn prompt(&self) -> &[u32] {
        &self.tokens[..self.prompt_len]
    }

    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_then_one_token_at_a_time() {
        let mut g = Generation::new(vec![5, 6, 7], SamplingParams::greedy(3), 100).unwrap();
        assert_eq!(g.next_input(), Some((&[5u32, 6, 7][..], 0)));
        assert_eq!(g.accept_logits(&[0.0, 1.0, 0.0]), Some(1));
        assert_eq!(g.next_input(), Some((&[1u32][..], 3)));
        g.accept_logits(&[0.0, 0.0, 1.0]);
        g.accept_logits(&[1.0, 0.0, 0.0]);
        assert_eq!(g.generated(), &[1, 2, 0]);
        assert_eq!(g.finish_reason(), Some(FinishReason::Length));
        assert_eq!(g.next_input(), None);
    }

    #[test]
    fn stop_token_ends_without_being_emitted() {
        let mut params = SamplingParams::greedy(10);
        params.stop_tokens = vec![2];
        let mut g = Generation::new(vec![1], params, 100).unwrap();
        assert_eq!(g.accept_logits(&[0.0, 0.0, 1.0]), None);
        assert_eq!(g.finish_reason(), Some(FinishReason::Stop));
        assert!(g.generated().is_empty());
    }

    #[test]
    fn prompt_longer_than_context_is_an_error() {
        let err = Generation::new(vec![1; 8], SamplingParams::greedy(1), 8).unwrap_err();
        assert!(matches!(err, ModelError::ContextOverflow { max: 8, .. }));
        assert!(matches!(
            Generation::new(vec![], SamplingParams::greedy(1), 8),
            Err(ModelError::EmptyPrompt)
        ));
    }

    #[test]
    fn context_limit_ends_generation() {
        let mut g = Generation::new(vec![1, 1], SamplingParams::greedy(100), 4).unwrap();
        g.accept_logits(&[1.0]);
        g.accept_logits(&[1.0]);
        assert_eq!(g.finish_reason(), Some(FinishReason::Length));
    }
}
