//! Choosing the next token from logits: greedy, or seeded sampling with temperature,
//! top-k, top-p and a repetition penalty.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// How to generate: the knobs every LLM API exposes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Tokens to generate at most (the prompt does not count).
    pub max_new_tokens: usize,
    /// 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p`.
    pub top_p: Option<f32>,
    /// CTRL-style penalty (>1 discourages tokens already in the sequence); 1 disables it.
    pub repetition_penalty: f32,
    /// Seed of the sampler; the same seed and inputs give the same tokens.
    pub seed: u64,
    /// Token ids that end generation (in addition to none: the model's EOS is added
    /// by callers that know it).
    pub stop_tokens: Vec<u32>,
}

/// No repetition penalty by default (as transformers' `generate`, the OpenAI gateway and
/// the CLI): a penalty is a choice, and with it temperature 0 would not be plain greedy.
impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.8,
            top_k: Some(40),
            top_p: Some(0.95),
            repetition_penalty: 1.0,
            seed: 0,
            stop_tokens: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Deterministic argmax decoding of `max_new_tokens` tokens.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 0,
            stop_tokens: Vec::new(),
        }
    }
}

/// A next-token distribution: the tokens that may come, most likely first, with their
/// weights (probabilities up to a common factor; tokens not listed have none).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenDistribution {
    weights: Vec<(u32, f32)>,
    total: f32,
    /// Chosen without a draw (greedy): drawing from it leaves the random stream as it is.
    fixed: bool,
}

impl TokenDistribution {
    fn new(weights: Vec<(u32, f32)>) -> Self {
        let total = weights.iter().map(|(_, w)| w).sum();
        Self {
            weights,
            total,
            fixed: false,
        }
    }

    /// All the mass on `token`, chosen without a draw.
    pub fn certain(token: u32) -> Self {
        Self {
            fixed: true,
            ..Self::new(vec![(token, 1.0)])
        }
    }

    /// The probability of `token`.
    pub fn probability(&self, token: u32) -> f32 {
        if self.total <= 0.0 {
            return 0.0;
        }
        self.weights
            .iter()
            .find(|(id, _)| *id == token)
            .map_or(0.0, |(_, w)| w / self.total)
    }

    /// Every token that may come, most likely first, with its probability.
    pub fn probabilities(&self) -> impl Iterator<Item = (u32, f32)> + '_ {
        let total = self.total;
        self.weights.iter().map(move |&(id, w)| (id, w / total))
    }

    /// max(0, self − other), to be normalised by the draw; `self` again when nothing is
    /// left (the two are equal up to rounding).
    fn residual(&self, other: &TokenDistribution) -> TokenDistribution {
        if self.fixed {
            // A rejected proposal is not this token, so the residual is all of it.
            return self.clone();
        }
        // One pass over each: with wide sampling the support is the whole vocabulary,
        // and a lookup per token into the other would be quadratic in it.
        let theirs: std::collections::HashMap<u32, f32> = other.probabilities().collect();
        let weights: Vec<(u32, f32)> = self
            .probabilities()
            .map(|(id, p)| (id, p - theirs.get(&id).copied().unwrap_or(0.0)))
            .filter(|(_, w)| *w > 0.0)
            .collect();
        if weights.is_empty() {
            return self.clone();
        }
        Self::new(weights)
    }
}

/// A seeded sampler; one per generation so results are reproducible.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Pick the next token given the logits of the last position and the sequence so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let distribution = self.distribution(logits, history);
        self.draw(&distribution)
    }

    /// The distribution [`Sampler::sample`] draws from: the logits after the repetition
    /// penalty, temperature, top-k and top-p. Greedy decoding gives all the mass to the
    /// argmax.
    pub fn distribution(&self, logits: &[f32], history: &[u32]) -> TokenDistribution {
        let mut logits = logits.to_vec();
        self.apply_repetition_penalty(&mut logits, history);
        if self.params.temperature <= 0.0 {
            return TokenDistribution::certain(argmax(&logits));
        }
        let t = self.params.temperature;
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l / t))
            .collect();
        if candidates.is_empty() {
            return TokenDistribution::certain(argmax(&logits));
        }
        // Most likely first; ties broken by token id so the order is total and stable.
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = self.params.top_k.filter(|&k| k > 0) {
            candidates.truncate(k);
        }
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates.iter().map(|(_, l)| (l - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if let Some(top_p) = self.params.top_p.filter(|&p| p > 0.0 && p < 1.0) {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|&p| {
                    cumulative += p;
                    cumulative >= top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            candidates.truncate(keep);
        }
        TokenDistribution::new(candidates.iter().map(|(id, _)| *id).zip(probs).collect())
    }

    /// One token drawn from `distribution`. Greedy choices take no draw; a sampled one
    /// takes exactly one, even when a single token is left, so a seed gives the text it
    /// always gave.
    pub fn draw(&mut self, distribution: &TokenDistribution) -> u32 {
        let weights = &distribution.weights;
        if distribution.fixed {
            return weights[0].0;
        }
        let mut r = self.rng.random::<f32>() * distribution.total;
        for (id, p) in weights {
            if r < *p {
                return *id;
            }
            r -= p;
        }
        weights[weights.len() - 1].0
    }

    /// Speculative sampling's check of a draft token `proposed`, drawn from the draft's
    /// distribution `draft`, against the target's `target`: keep it with probability
    /// min(1, p/q), else draw a replacement from the normalised residual max(0, p − q).
    /// The token that comes out is distributed exactly as `target` (Leviathan et al.,
    /// 2023); greedy on both sides, it is the target's argmax, kept when the draft's.
    /// Returns the token and whether it is the proposal.
    pub fn verify_proposal(
        &mut self,
        proposed: u32,
        draft: &TokenDistribution,
        target: &TokenDistribution,
    ) -> (u32, bool) {
        let (p, q) = (target.probability(proposed), draft.probability(proposed));
        let keep = p >= q || (p > 0.0 && self.rng.random::<f32>() * q < p);
        if keep {
            return (proposed, true);
        }
        (self.draw(&target.residual(draft)), false)
    }

    fn apply_repetition_penalty(&self, logits: &mut [f32], history: &[u32]) {
        let penalty = self.params.repetition_penalty;
        if penalty == 1.0 || penalty <= 0.0 {
            return;
        }
        let mut seen = std::collections::HashSet::new();
        for &id in history {
            if !seen.insert(id) {
                continue;
            }
            if let Some(l) = logits.get_mut(id as usize) {
                *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
            }
        }
    }
}

/// Index of the largest logit; the first one on ties, like torch.argmax.
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::greedy(1));
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_changes_the_argmax() {
        let mut params = SamplingParams::greedy(1);
        params.repetition_penalty = 2.0;
        let mut s = Sampler::new(params);
        // Token 0 would win, but it was already said.
        assert_eq!(s.sample(&[3.0, 2.0, 0.0], &[0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let params = SamplingParams {
            top_k: Some(1),
            temperature: 1.5,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(params);
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.0, 0.5, 0.4, 0.1], &[]), 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let params = SamplingParams {
            top_k: None,
            top_p: Some(0.5),
            temperature: 1.0,
            repetition_penalty: 1.0,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(params);
        // Token 2 alone holds far more than half the mass.
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.0, 0.0, 10.0, 0.0], &[]), 2);
        }
    }

    /// Pearson's chi-square of `counts` against `probabilities` over `n` draws.
    fn chi_square(counts: &[usize], probabilities: &[f64], n: usize) -> f64 {
        counts
            .iter()
            .zip(probabilities)
            .map(|(&c, &p)| {
                let expected = p * n as f64;
                (c as f64 - expected).powi(2) / expected
            })
            .sum()
    }

    #[test]
    fn speculative_sampling_draws_from_the_target_whatever_the_draft() {
        // Target p over five tokens; drafts that overweight, underweight, miss tokens the
        // target has and propose tokens it never takes.
        let target = [0.4f64, 0.25, 0.2, 0.1, 0.05];
        let drafts: [[f64; 6]; 3] = [
            [0.1, 0.1, 0.1, 0.1, 0.1, 0.5],
            [0.9, 0.05, 0.05, 0.0, 0.0, 0.0],
            [0.4, 0.25, 0.2, 0.1, 0.05, 0.0],
        ];
        let params = SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            seed: 11,
            ..SamplingParams::default()
        };
        let logits = |p: &[f64]| -> Vec<f32> {
            p.iter()
                .map(|&p| {
                    if p > 0.0 {
                        p.ln() as f32
                    } else {
                        f32::NEG_INFINITY
                    }
                })
                .collect()
        };
        let mut s = Sampler::new(params);
        let mut target_logits = logits(&target);
        target_logits.push(f32::NEG_INFINITY);
        let p = s.distribution(&target_logits, &[]);
        const DRAWS: usize = 20_000;
        // 5 categories, 4 degrees of freedom: P(chi2 > 18.47) = 0.001 for a right rule.
        const BOUND: f64 = 18.47;
        for draft in drafts {
            let q = s.distribution(&logits(&draft), &[]);
            let mut counts = [0usize; 5];
            let mut kept = 0;
            for _ in 0..DRAWS {
                let proposed = s.draw(&q);
                let (token, was_kept) = s.verify_proposal(proposed, &q, &p);
                counts[token as usize] += 1;
                kept += usize::from(was_kept);
            }
            let chi2 = chi_square(&counts, &target, DRAWS);
            assert!(
                chi2 < BOUND,
                "draft {draft:?}: counts {counts:?}, chi2 {chi2:.1}"
            );
            // Acceptance is sum(min(p, q)), the overlap of the two.
            let overlap: f64 = target.iter().zip(draft).map(|(a, b)| a.min(b)).sum();
            let rate = kept as f64 / DRAWS as f64;
            assert!(
                (rate - overlap).abs() < 0.02,
                "kept {rate}, overlap {overlap}"
            );
        }
        // A rule that kept every proposal would fail the bound: the first draft's own
        // draws are far from the target.
        let q = s.distribution(&logits(&drafts[0]), &[]);
        let mut counts = [0usize; 5];
        let mut n = 0;
        for _ in 0..DRAWS {
            let token = s.draw(&q) as usize;
            if token < 5 {
                counts[token] += 1;
                n += 1;
            }
        }
        assert!(chi_square(&counts, &target, n) > BOUND);
    }

    #[test]
    fn the_residual_is_what_the_target_has_beyond_the_draft() {
        let s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            ..SamplingParams::default()
        });
        let ln = |p: f32| p.ln();
        let p = s.distribution(&[ln(0.5), ln(0.3), ln(0.2)], &[]);
        let q = s.distribution(&[ln(0.2), ln(0.6), ln(0.2)], &[]);
        let r = p.residual(&q);
        let got: Vec<(u32, f32)> = r.probabilities().collect();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, 0);
        assert!((got[0].1 - 1.0).abs() < 1e-6);
    }

    #[test]
    fn greedy_speculation_keeps_only_the_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy(1));
        let p = s.distribution(&[0.0, 2.0, 1.0], &[]);
        let q = s.distribution(&[3.0, 2.0, 1.0], &[]);
        assert_eq!(s.verify_proposal(0, &q, &p), (1, false));
        assert_eq!(s.verify_proposal(1, &p, &p), (1, true));
    }

    #[test]
    fn same_seed_same_tokens_and_distribution_is_respected() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 7,
            ..SamplingParams::default()
        };
        let logits = [0.0f32, (3.0f32).ln()]; // p = [0.25, 0.75]
        let draw = |seed_params: SamplingParams| {
            let mut s = Sampler::new(seed_params);
            (0..4000)
                .map(|_| s.sample(&logits, &[]))
                .collect::<Vec<_>>()
        };
        let a = draw(params.clone());
        assert_eq!(a, draw(params));
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!(
            (ones - 0.75).abs() < 0.03,
            "frequency of token 1 was {ones}"
        );
    }
}
