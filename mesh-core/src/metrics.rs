//! Counters a provider node keeps about its own work: requests, bytes, refusals by kind and
//! a per-block latency histogram. The span worker updates them; `/metrics` and `/healthz`
//! read a copy ([`crate::node::NodeSnapshot`]).
//!
//! ```
//! let mut h = mesh_core::metrics::Histogram::default();
//! h.observe(0.003);
//! assert_eq!(h.count, 1);
//! assert_eq!(h.cumulative().last().map(|&(_, n)| n), Some(1));
//! ```

use std::collections::BTreeMap;

use serde::Serialize;

use crate::pipeline::Refusal;

/// Upper bounds (seconds) of the per-block latency buckets; `+Inf` is implied.
pub const LATENCY_BUCKETS_SECS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// A fixed-bucket histogram, as Prometheus shows one.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); one more than the bounds, for `+Inf`.
    pub counts: Vec<u64>,
    pub sum_secs: f64,
    pub count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; LATENCY_BUCKETS_SECS.len() + 1],
            sum_secs: 0.0,
            count: 0,
        }
    }
}

impl Histogram {
    pub fn observe(&mut self, secs: f64) {
        let i = LATENCY_BUCKETS_SECS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(LATENCY_BUCKETS_SECS.len());
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum_secs += secs;
        self.count += 1;
    }

    /// `(upper bound, observations at or below it)`, ending with `(+Inf, count)`.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut total = 0;
        LATENCY_BUCKETS_SECS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(&self.counts)
            .map(|(le, &n)| {
                total += n;
                (le, total)
            })
            .collect()
    }
}

/// What the span worker counts.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct NodeMetrics {
    /// Session requests handled (any kind, refused or not).
    pub requests: u64,
    /// Of those, the ones served on the network task instead of the worker thread (small
    /// steps of a small CPU span arriving while it was idle).
    pub inline_requests: u64,
    /// Request bytes received, response bytes sent.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Refusals by kind (`busy`, `over_budget`, ...).
    pub refusals: BTreeMap<String, u64>,
    /// Compute time of one forward pass divided by the blocks it ran.
    pub block_latency: Histogram,
}

impl NodeMetrics {
    pub fn refused(&mut self, refusal: &Refusal) {
        *self
            .refusals
            .entry(refusal_kind(refusal).to_owned())
            .or_default() += 1;
    }

    /// Refusals of every kind.
    pub fn refusals_total(&self) -> u64 {
        self.refusals.values().sum()
    }
}

/// A stable snake_case name for a refusal's kind (a metrics label).
pub fn refusal_kind(r: &Refusal) -> &'static str {
    match r {
        Refusal::UnknownModel(_) => "unknown_model",
        Refusal::SpanNotServed { .. } => "span_not_served",
        Refusal::TooManySessions { .. } => "too_many_sessions",
        Refusal::TooManyClientSessions { .. } => "too_many_client_sessions",
        Refusal::OverBudget { .. } => "over_budget",
        Refusal::MaxLenTooLarge { .. } => "max_len_too_large",
        Refusal::UnknownSession => "unknown_session",
        Refusal::SessionExists => "session_exists",
        Refusal::Unpaid { .. } => "unpaid",
        Refusal::Busy => "busy",
        Refusal::RateLimited { .. } => "rate_limited",
        Refusal::ShuttingDown => "shutting_down",
        Refusal::BadRequest(_) => "bad_request",
        Refusal::LedgerFailed => "ledger_failed",
        Refusal::NoPushedInput(_) => "no_pushed_input",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_inf() {
        let mut h = Histogram::default();
        for s in [0.00005, 0.0004, 0.0004, 0.02, 5.0] {
            h.observe(s);
        }
        let c = h.cumulative();
        assert_eq!(c.len(), LATENCY_BUCKETS_SECS.len() + 1);
        assert_eq!(c[0], (0.0001, 1));
        assert_eq!(c[2], (0.0005, 3));
        assert_eq!(c[c.len() - 2].1, 4);
        assert_eq!(c[c.len() - 1], (f64::INFINITY, 5));
        assert_eq!(h.count, 5);
    }

    #[test]
    fn refusals_are_counted_by_kind() {
        let mut m = NodeMetrics::default();
        m.refused(&Refusal::Busy);
        m.refused(&Refusal::Busy);
        m.refused(&Refusal::UnknownSession);
        assert_eq!(m.refusals["busy"], 2);
        assert_eq!(m.refusals_total(), 3);
    }
}
