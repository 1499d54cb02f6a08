//! What a running node earned, read from its own ledger: the rows `mesh-node earnings`
//! prints, a cumulative series for the dashboard's chart, and the newest receipts.
//!
//! Served at `/api/earnings` because sled lets one process open a store: while the node
//! runs, this is how anyone else reads its ledger. Memory stays bounded however big the
//! ledger is: the series is kept in at most [`SERIES_POINTS`] time buckets (their width
//! doubles as needed) and at most [`RECENT_RECEIPTS`] receipts are kept.

use std::collections::BTreeMap;

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::ledger::{self, EarningsRow, Entry, LedgerError, Store};

/// Most points of [`EarningsView::series`].
pub const SERIES_POINTS: usize = 360;
/// Most receipts in [`EarningsView::recent`].
pub const RECENT_RECEIPTS: usize = 20;

/// What `/api/earnings` answers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EarningsView {
    /// The node's peer id: whose earnings these are.
    pub payee: String,
    /// Sessions started before this (ms since the Unix epoch) are left out.
    pub since_ms: u64,
    /// By UTC day of session start and model, oldest first (as `mesh-node earnings`).
    pub rows: Vec<EarningsRow>,
    pub total: Totals,
    /// `(ms since the Unix epoch, amount earned up to then)`, oldest first: every hop's
    /// newest server-signed receipt counted when it was signed. Starts at 0.
    pub series: Vec<(u64, u64)>,
    /// The newest receipts (by when they were signed), newest first.
    pub recent: Vec<RecentReceipt>,
}

/// Sums over [`EarningsView::rows`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub sessions: u64,
    pub tokens: u64,
    pub amount: u64,
    pub confirmed: u64,
    pub settled: u64,
}

/// One hop's newest receipt, as the dashboard lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentReceipt {
    /// First 8 bytes of the session id, in hex.
    pub session: String,
    pub client: String,
    pub model: String,
    /// `START..END`.
    pub span: String,
    pub prefill_tokens: u64,
    pub decode_tokens: u64,
    pub amount: u64,
    pub seq: u64,
    pub start_ms: u64,
    /// When the last counted token ran (the receipt's time).
    pub end_ms: u64,
    /// The client countersigned this very receipt (not an older one).
    pub countersigned: bool,
    /// A settlement batch covered it.
    pub settled: bool,
}

impl Totals {
    fn of(rows: &[EarningsRow]) -> Self {
        rows.iter().fold(Self::default(), |t, r| Self {
            sessions: t.sessions.saturating_add(r.sessions),
            tokens: t
                .tokens
                .saturating_add(r.prefill_tokens.saturating_add(r.decode_tokens)),
            amount: t.amount.saturating_add(r.amount),
            confirmed: t.confirmed.saturating_add(r.confirmed),
            settled: t.settled.saturating_add(r.settled),
        })
    }
}

/// Amounts summed into time buckets of `width_ms`; when there would be more than
/// [`SERIES_POINTS`] buckets, the width doubles and neighbours merge.
struct Buckets {
    width_ms: u64,
    sums: BTreeMap<u64, u64>,
    first_ms: u64,
    last_ms: u64,
}

impl Buckets {
    fn new() -> Self {
        Self {
            width_ms: 1000,
            sums: BTreeMap::new(),
            first_ms: u64::MAX,
            last_ms: 0,
        }
    }

    fn add(&mut self, start_ms: u64, at_ms: u64, amount: u64) {
        self.first_ms = self.first_ms.min(start_ms.min(at_ms));
        self.last_ms = self.last_ms.max(at_ms);
        let sum = self.sums.entry(at_ms / self.width_ms).or_default();
        *sum = sum.saturating_add(amount);
        while self.sums.len() > SERIES_POINTS {
            self.width_ms = self.width_ms.saturating_mul(2);
            let mut merged = BTreeMap::new();
            for (bucket, sum) in std::mem::take(&mut self.sums) {
                let s: &mut u64 = merged.entry(bucket / 2).or_default();
                *s = s.saturating_add(sum);
            }
            self.sums = merged;
        }
    }

    /// The cumulative series: a 0 at the first session's start, then one point per bucket
    /// at the bucket's end (the last one at the newest receipt).
    fn cumulative(&self) -> Vec<(u64, u64)> {
        if self.sums.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(self.sums.len() + 1);
        out.push((self.first_ms, 0));
        let mut total = 0u64;
        for (&bucket, &sum) in &self.sums {
            total = total.saturating_add(sum);
            let end = bucket
                .saturating_add(1)
                .saturating_mul(self.width_ms)
                .min(self.last_ms);
            out.push((end.max(self.first_ms), total));
        }
        out
    }
}

fn recent(e: &Entry) -> RecentReceipt {
    let r = &e.latest.receipt;
    RecentReceipt {
        session: r.terms.session.to_string(),
        client: r.terms.client.to_base58(),
        model: r.terms.model.to_string(),
        span: format!("{}..{}", r.terms.span.start, r.terms.span.end),
        prefill_tokens: r.prefill_tokens,
        decode_tokens: r.decode_tokens,
        amount: r.amount,
        seq: r.seq,
        start_ms: r.start_ms,
        end_ms: r.end_ms,
        countersigned: e
            .countersigned
            .as_ref()
            .is_some_and(|c| c.receipt.seq == r.seq),
        settled: e.settled.is_some(),
    }
}

/// What `payee` earned for sessions started at or after `since_ms`: two passes over the
/// store (one for the rows, one for the series and the newest receipts).
pub fn earnings_view(
    store: &Store,
    payee: &PeerId,
    since_ms: u64,
) -> Result<EarningsView, LedgerError> {
    let rows = ledger::earnings(store, payee, since_ms)?;
    let mut buckets = Buckets::new();
    let mut newest: Vec<RecentReceipt> = Vec::with_capacity(RECENT_RECEIPTS + 1);
    for entry in store.entries() {
        let e = entry?;
        let r = &e.latest.receipt;
        if r.terms.server != *payee || r.start_ms < since_ms {
            continue;
        }
        buckets.add(r.start_ms, r.end_ms, r.amount);
        let full = newest.len() >= RECENT_RECEIPTS;
        if !full || newest.last().is_some_and(|n| n.end_ms < r.end_ms) {
            let at = newest.partition_point(|n| n.end_ms >= r.end_ms);
            newest.insert(at, recent(&e));
            newest.truncate(RECENT_RECEIPTS);
        }
    }
    Ok(EarningsView {
        payee: payee.to_base58(),
        since_ms,
        total: Totals::of(&rows),
        rows,
        series: buckets.cumulative(),
        recent: newest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_stay_bounded_and_add_up() {
        let mut b = Buckets::new();
        assert!(b.cumulative().is_empty());
        // 10 000 receipts of 3, one a second: far more seconds than points.
        for i in 0..10_000u64 {
            b.add(1_000_000 + i * 1000 - 500, 1_000_000 + i * 1000, 3);
        }
        let series = b.cumulative();
        assert!(series.len() <= SERIES_POINTS + 1, "{}", series.len());
        assert_eq!(series.first(), Some(&(999_500, 0)));
        assert_eq!(series.last(), Some(&(1_000_000 + 9_999_000, 30_000)));
        assert!(series
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    }
}
