//! Settlement: what a node earned, what clients owe, and batches anyone can check offline.
//!
//! A [`Batch`] is a JSON file of countersigned receipts a payee (the server) asks to be paid
//! for. Each line carries the whole receipt with both signatures, what earlier batches
//! already covered for that hop, and what is due now; [`verify_batch`] checks every
//! signature and recomputes every amount and total with nothing but the file, and names the
//! first line that is wrong.
//!
//! Receipts are running totals, so a hop settled once can be settled again when a later
//! countersigned receipt covers more tokens: the new line is due
//! `amount − already_settled`, where `already_settled` is the amount of the receipt the
//! previous batch carried for that hop.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use super::receipt::SignedReceipt;
use super::store::Store;
use super::{hex, utc_day, LedgerError};
use crate::types::{ModelId, SessionId};

/// The `format` field of every batch this version writes and reads.
pub const BATCH_FORMAT: &str = "mesh-settlement-v1";

/// Most lines one batch holds; the rest wait for the next batch.
pub const MAX_BATCH_LINES: usize = 100_000;

/// Largest batch file [`verify_batch`] reads.
pub const MAX_BATCH_BYTES: u64 = 64 << 20;

/// What to settle.
#[derive(Clone, Debug)]
pub struct SettleOptions {
    /// The node settling: only receipts where it is the server.
    pub payee: PeerId,
    /// Only sessions that started at or after this time (ms since the Unix epoch).
    pub since_ms: u64,
    /// A client is included only when it owes at least this much (micro-units) in total.
    pub min_amount: u64,
    /// Write the batch but leave the receipts unsettled.
    pub dry_run: bool,
    /// The batch's creation time (ms since the Unix epoch).
    pub now_ms: u64,
}

/// One receipt in a batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchLine {
    /// The newest countersigned receipt of the hop.
    pub receipt: SignedReceipt,
    /// What earlier batches covered for this hop (0 if none).
    pub already_settled: u64,
    /// `receipt.amount − already_settled`.
    pub due: u64,
}

/// What one client owes in a batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayerTotal {
    #[serde(with = "hex::peer")]
    pub client: PeerId,
    pub lines: u64,
    pub due: u64,
}

/// A settlement batch, as written to and read from its JSON file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    /// [`BATCH_FORMAT`].
    pub format: String,
    /// The server to be paid; every line's receipt names it as server.
    #[serde(with = "hex::peer")]
    pub payee: PeerId,
    pub created_ms: u64,
    pub since_ms: u64,
    pub min_amount: u64,
    /// Sorted by client, then session start, then session id.
    pub lines: Vec<BatchLine>,
    /// One per client with lines, sorted by client.
    pub payers: Vec<PayerTotal>,
    /// Sum of every line's `due`.
    pub total_due: u64,
}

/// What a verified batch adds up to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchSummary {
    pub payee: PeerId,
    pub lines: usize,
    pub payers: Vec<PayerTotal>,
    pub total_due: u64,
}

impl std::fmt::Display for BatchSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "batch OK: {} receipts for {}, {} due from {} clients",
            self.lines,
            self.payee,
            self.total_due,
            self.payers.len()
        )?;
        for p in &self.payers {
            writeln!(
                f,
                "  {}  {:>6} receipts  {:>12} due",
                p.client, p.lines, p.due
            )?;
        }
        Ok(())
    }
}

/// Earnings of one day (UTC, by session start) and model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarningsRow {
    /// `YYYY-MM-DD`.
    pub day: String,
    pub model: ModelId,
    pub sessions: u64,
    pub prefill_tokens: u64,
    pub decode_tokens: u64,
    /// Newest receipts, server-signed.
    pub amount: u64,
    /// Newest countersigned receipts.
    pub confirmed: u64,
    /// Covered by settlement batches.
    pub settled: u64,
}

/// Work a client has not countersigned: signed by the server, never agreed to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Unpaid {
    #[serde(serialize_with = "hex::peer::serialize")]
    pub client: PeerId,
    /// Hops with unconfirmed work.
    pub sessions: u64,
    /// Newest amount minus countersigned amount, summed over those hops.
    pub amount: u64,
}

fn line_err(index: usize, r: &SignedReceipt, source: LedgerError) -> LedgerError {
    LedgerError::BatchLine {
        index,
        session: r.receipt.terms.session,
        client: r.receipt.terms.client,
        source: Box::new(source),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LedgerError + '_ {
    move |source| LedgerError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Batch {
    /// Checks everything in the batch with nothing but the batch: format, every line's
    /// signatures (server and client), amounts, dues and the totals.
    pub fn verify(&self) -> Result<BatchSummary, LedgerError> {
        if self.format != BATCH_FORMAT {
            return Err(LedgerError::Batch(format!(
                "format {:?}, expected {BATCH_FORMAT:?}",
                self.format
            )));
        }
        if self.lines.len() > MAX_BATCH_LINES {
            return Err(LedgerError::TooLarge {
                what: "batch lines",
                len: self.lines.len() as u64,
                max: MAX_BATCH_LINES as u64,
            });
        }
        let mut seen: BTreeSet<(SessionId, Vec<u8>)> = BTreeSet::new();
        let mut payers: BTreeMap<Vec<u8>, PayerTotal> = BTreeMap::new();
        let mut total: u64 = 0;
        for (i, line) in self.lines.iter().enumerate() {
            let r = &line.receipt.receipt;
            let fail = |e: LedgerError| line_err(i, &line.receipt, e);
            line.receipt.verify_countersigned().map_err(fail)?;
            if r.terms.server != self.payee {
                return Err(fail(LedgerError::Batch(format!(
                    "receipt is for server {}, not the payee",
                    r.terms.server
                ))));
            }
            if r.start_ms < self.since_ms {
                return Err(fail(LedgerError::Batch(
                    "session started before the batch's since time".into(),
                )));
            }
            let due = r.amount.checked_sub(line.already_settled).ok_or_else(|| {
                fail(LedgerError::Batch(format!(
                    "already_settled {} exceeds the receipt's amount {}",
                    line.already_settled, r.amount
                )))
            })?;
            if due != line.due {
                return Err(fail(LedgerError::Batch(format!(
                    "due {} but amount − already_settled = {due}",
                    line.due
                ))));
            }
            if !seen.insert((r.terms.session, r.terms.server.to_bytes())) {
                return Err(fail(LedgerError::Batch("hop appears twice".into())));
            }
            let p = payers
                .entry(r.terms.client.to_bytes())
                .or_insert(PayerTotal {
                    client: r.terms.client,
                    lines: 0,
                    due: 0,
                });
            p.lines += 1;
            p.due = p.due.checked_add(due).ok_or(LedgerError::Overflow)?;
            total = total.checked_add(due).ok_or(LedgerError::Overflow)?;
        }
        let payers: Vec<PayerTotal> = payers.into_values().collect();
        if payers != self.payers {
            let stated = self
                .payers
                .iter()
                .map(|p| (p.client.to_string(), p.lines, p.due));
            let computed = payers
                .iter()
                .map(|p| (p.client.to_string(), p.lines, p.due));
            return Err(LedgerError::Batch(format!(
                "payer totals {:?} do not match the lines, which add up to {:?}",
                stated.collect::<Vec<_>>(),
                computed.collect::<Vec<_>>()
            )));
        }
        if let Some(p) = payers.iter().find(|p| p.due < self.min_amount) {
            return Err(LedgerError::Batch(format!(
                "client {} owes {}, under the batch's min_amount {}",
                p.client, p.due, self.min_amount
            )));
        }
        if total != self.total_due {
            return Err(LedgerError::Batch(format!(
                "total_due {} but the lines add up to {total}",
                self.total_due
            )));
        }
        Ok(BatchSummary {
            payee: self.payee,
            lines: self.lines.len(),
            payers,
            total_due: total,
        })
    }

    /// Reads a batch file (at most [`MAX_BATCH_BYTES`]) without verifying it.
    pub fn read(path: &Path) -> Result<Self, LedgerError> {
        let len = std::fs::metadata(path).map_err(io_err(path))?.len();
        if len > MAX_BATCH_BYTES {
            return Err(LedgerError::TooLarge {
                what: "batch file",
                len,
                max: MAX_BATCH_BYTES,
            });
        }
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        serde_json::from_slice(&bytes).map_err(|source| LedgerError::Json {
            path: path.to_owned(),
            source,
        })
    }

    /// Writes the batch as pretty JSON, atomically: a temporary file beside `path`,
    /// fsynced, then renamed over it.
    pub fn write(&self, path: &Path) -> Result<(), LedgerError> {
        let json = serde_json::to_vec_pretty(self)?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut file = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        file.write_all(&json).map_err(io_err(&tmp))?;
        file.write_all(b"\n").map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(io_err(path))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Make the rename itself durable; not every platform can open a directory.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

/// Reads and verifies a batch file: `mesh-client verify-batch FILE`.
///
/// The error names the first wrong line (index from 0, session, client) and what is wrong
/// with it: a signature that does not verify, an amount that is not tokens × blocks ×
/// price, a due that does not add up.
pub fn verify_batch(path: &Path) -> Result<BatchSummary, LedgerError> {
    Batch::read(path)?.verify()
}

/// The batch [`settle`] would write now, without writing or marking anything.
///
/// Takes, for each hop where `opts.payee` is the server, the newest countersigned receipt
/// if its session started at or after `opts.since_ms` and it covers more than earlier
/// batches did; keeps the clients that owe at least `opts.min_amount` in total.
pub fn plan(store: &Store, opts: &SettleOptions) -> Result<Batch, LedgerError> {
    let mut by_client: BTreeMap<Vec<u8>, Vec<BatchLine>> = BTreeMap::new();
    let mut count = 0usize;
    for entry in store.entries() {
        let e = entry?;
        let Some(cs) = e.countersigned else {
            continue;
        };
        let r = &cs.receipt;
        if r.terms.server != opts.payee || r.start_ms < opts.since_ms {
            continue;
        }
        let already_settled = match e.settled {
            Some(s) if s.seq >= r.seq => continue,
            Some(s) => s.amount,
            None => 0,
        };
        let due = r.amount.saturating_sub(already_settled);
        if due == 0 {
            continue;
        }
        if count >= MAX_BATCH_LINES {
            break;
        }
        count += 1;
        by_client
            .entry(r.terms.client.to_bytes())
            .or_default()
            .push(BatchLine {
                receipt: cs,
                already_settled,
                due,
            });
    }
    let mut lines = Vec::new();
    let mut payers = Vec::new();
    let mut total_due: u64 = 0;
    for (_, mut group) in by_client {
        let due = group
            .iter()
            .try_fold(0u64, |acc, l| acc.checked_add(l.due))
            .ok_or(LedgerError::Overflow)?;
        if due < opts.min_amount {
            continue;
        }
        let Some(first) = group.first() else {
            continue;
        };
        payers.push(PayerTotal {
            client: first.receipt.receipt.terms.client,
            lines: group.len() as u64,
            due,
        });
        total_due = total_due.checked_add(due).ok_or(LedgerError::Overflow)?;
        group.sort_by_key(|l| (l.receipt.receipt.start_ms, l.receipt.receipt.terms.session));
        lines.extend(group);
    }
    Ok(Batch {
        format: BATCH_FORMAT.to_owned(),
        payee: opts.payee,
        created_ms: opts.now_ms,
        since_ms: opts.since_ms,
        min_amount: opts.min_amount,
        lines,
        payers,
        total_due,
    })
}

/// `mesh-node settle`: plans a batch, verifies it, writes it to `out`, and, unless
/// `opts.dry_run`, then marks its receipts settled (in one flushed transaction).
///
/// The file is written before anything is marked, so a crash in between leaves receipts
/// unsettled (they go into the next batch) rather than settled without a batch.
pub fn settle(store: &Store, opts: &SettleOptions, out: &Path) -> Result<Batch, LedgerError> {
    let batch = plan(store, opts)?;
    batch.verify()?;
    batch.write(out)?;
    if !opts.dry_run && !batch.lines.is_empty() {
        let receipts: Vec<&SignedReceipt> = batch.lines.iter().map(|l| &l.receipt).collect();
        store.mark_settled(&receipts, opts.now_ms)?;
    }
    Ok(batch)
}

/// `mesh-node earnings`: what `payee` earned, by UTC day of session start and by model,
/// for sessions started at or after `since_ms`; sorted by day, then model.
pub fn earnings(
    store: &Store,
    payee: &PeerId,
    since_ms: u64,
) -> Result<Vec<EarningsRow>, LedgerError> {
    let mut rows: BTreeMap<(String, ModelId), EarningsRow> = BTreeMap::new();
    for entry in store.entries() {
        let e = entry?;
        let r = &e.latest.receipt;
        if r.terms.server != *payee || r.start_ms < since_ms {
            continue;
        }
        let day = utc_day(r.start_ms);
        let row = rows
            .entry((day.clone(), r.terms.model.clone()))
            .or_insert_with(|| EarningsRow {
                day,
                model: r.terms.model.clone(),
                sessions: 0,
                prefill_tokens: 0,
                decode_tokens: 0,
                amount: 0,
                confirmed: 0,
                settled: 0,
            });
        row.sessions += 1;
        row.prefill_tokens = row.prefill_tokens.saturating_add(r.prefill_tokens);
        row.decode_tokens = row.decode_tokens.saturating_add(r.decode_tokens);
        row.amount = row.amount.saturating_add(r.amount);
        if let Some(c) = &e.countersigned {
            row.confirmed = row.confirmed.saturating_add(c.receipt.amount);
        }
        if let Some(s) = e.settled {
            row.settled = row.settled.saturating_add(s.amount);
        }
    }
    Ok(rows.into_values().collect())
}

/// Per client, the work `payee` did that the client never countersigned (newest amount
/// minus newest countersigned amount), for clients that owe anything; sorted by amount,
/// largest first.
pub fn unpaid_by_client(store: &Store, payee: &PeerId) -> Result<Vec<Unpaid>, LedgerError> {
    let mut by_client: BTreeMap<Vec<u8>, Unpaid> = BTreeMap::new();
    for entry in store.entries() {
        let e = entry?;
        let r = &e.latest.receipt;
        if r.terms.server != *payee {
            continue;
        }
        let confirmed = e.countersigned.as_ref().map_or(0, |c| c.receipt.amount);
        let owed = r.amount.saturating_sub(confirmed);
        if owed == 0 {
            continue;
        }
        let u = by_client
            .entry(r.terms.client.to_bytes())
            .or_insert(Unpaid {
                client: r.terms.client,
                sessions: 0,
                amount: 0,
            });
        u.sessions += 1;
        u.amount = u.amount.saturating_add(owed);
    }
    let mut out: Vec<Unpaid> = by_client.into_values().collect();
    out.sort_by_key(|u| std::cmp::Reverse(u.amount));
    Ok(out)
}

/// What one client leaves unconfirmed with `payee`, looked up through the by-peer index
/// (cheap enough to call when the client opens a session; scans at most `limit` hops).
/// A node may refuse a client whose unpaid amount is over its threshold.
pub fn unpaid_of(
    store: &Store,
    payee: &PeerId,
    client: &PeerId,
    limit: usize,
) -> Result<Unpaid, LedgerError> {
    let mut u = Unpaid {
        client: *client,
        sessions: 0,
        amount: 0,
    };
    for e in store.by_peer(client, limit)? {
        let r = &e.latest.receipt;
        if r.terms.server != *payee || r.terms.client != *client {
            continue;
        }
        let confirmed = e.countersigned.as_ref().map_or(0, |c| c.receipt.amount);
        let owed = r.amount.saturating_sub(confirmed);
        if owed > 0 {
            u.sessions += 1;
            u.amount = u.amount.saturating_add(owed);
        }
    }
    Ok(u)
}
