//! The local ledger: a sled database of receipts that each peer keeps. The only module that
//! touches sled.
//!
//! One sled tree holds every record under a one-byte prefix (`pk` is the 16-byte session id
//! followed by the server's peer id bytes; one hop of one session):
//!
//! | key                                | value                                         |
//! |------------------------------------|-----------------------------------------------|
//! | `r` pk                             | newest receipt (highest seq), signed by server |
//! | `c` pk                             | newest countersigned receipt                  |
//! | `p` len peer pk                    | index by peer, for both client and server     |
//! | `t` start_ms (u64 BE) pk           | index by session start time                   |
//! | `s` peer                           | [`PeerTotals`] of that peer                   |
//! | `d` pk                             | [`Settled`]: what a batch already paid        |
//! | `o` pk                             | [`Terms`] of a session this client opened     |
//!
//! Every change is one sled transaction (all or nothing, also across a crash) followed by
//! `flush()`, which fsyncs; a method returns `Ok` only after that, so a receipt reported as
//! committed survives `kill -9` whole. Values are [`crate::wire`] frames, checked against
//! [`MAX_RECORD_BYTES`] before decoding. Reputation and evidence live in trees of their
//! own (`store/peers.rs`).

mod check;
mod mark;
mod peers;

pub use mark::MARK_FILE;

use std::path::{Path, PathBuf};

use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};

use super::receipt::{ClientTally, SignedReceipt, Terms};
use super::{hex, LedgerError};
use crate::types::SessionId;
use crate::wire;
use ed25519_dalek::SigningKey;

/// Longest stored value; a receipt is a few hundred bytes.
pub const MAX_RECORD_BYTES: usize = 4096;

const LATEST: u8 = b'r';
const COUNTERSIGNED: u8 = b'c';
const BY_PEER: u8 = b'p';
const BY_TIME: u8 = b't';
const TOTALS: u8 = b's';
const SETTLED: u8 = b'd';
const OPENED: u8 = b'o';

/// The store failed, or holds something it should not.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled itself failed (I/O, corruption it detected).
    #[error("ledger database: {0}")]
    Sled(#[from] sled::Error),
    /// Another live process (a running node) holds the store open: sled allows one.
    #[error("ledger {path} is held open by a running process (a node using it: `mesh-node stop` first, or leave out --ledger-dir to ask the running node)")]
    Locked { path: PathBuf },
    /// The store fails its check: sled cannot open it, or its records disagree.
    #[error("ledger {path} fails its check: {detail}. Move it aside (`mv {path} {path}.damaged`) and restore it from a backup; a node started without it begins an empty ledger")]
    Damaged { path: PathBuf, detail: String },
    /// The high-water mark ([`MARK_FILE`]) could not be written: the receipts are stored,
    /// but the directory no longer takes writes.
    #[error("ledger high-water mark {path}: cannot write it: {source}")]
    Mark {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Copying the store for reading failed.
    #[error("ledger {path}: cannot copy it for reading: {source}")]
    Copy {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The store at `path` could not be opened (I/O, permissions, corruption): named.
    #[error("ledger {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    /// A stored value does not decode.
    #[error("ledger record {key} is corrupt: {detail}")]
    Corrupt { key: String, detail: String },
    /// Records disagree with each other (found by [`Store::audit`]).
    #[error("ledger is inconsistent: {0}")]
    Inconsistent(String),
}

/// Running totals for one peer, over every receipt it is party to (as client or server).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerTotals {
    /// Session hops with at least one receipt.
    pub sessions: u64,
    pub prefill_tokens: u64,
    pub decode_tokens: u64,
    /// Sum of the newest receipts' amounts (signed by the server).
    pub amount: u64,
    /// Sum of the newest countersigned receipts' amounts (what the client agreed to).
    pub confirmed_amount: u64,
    /// Sum of what settlement batches covered.
    pub settled_amount: u64,
}

/// What a settlement batch already covered for one hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settled {
    /// Sequence number of the receipt the batch carried.
    pub seq: u64,
    /// Its amount: everything up to that receipt is paid.
    pub amount: u64,
    /// When the batch was made, ms since the Unix epoch.
    pub at_ms: u64,
}

/// What [`Store::put`] changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Put {
    /// The receipt is now the newest one for its hop.
    pub latest: bool,
    /// The receipt is now the newest countersigned one for its hop.
    pub countersigned: bool,
}

/// Everything the store knows about one hop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The newest receipt (possibly not countersigned).
    pub latest: SignedReceipt,
    /// The newest countersigned receipt, if any.
    pub countersigned: Option<SignedReceipt>,
    /// What settlement already covered.
    pub settled: Option<Settled>,
}

/// What [`Store::audit`] found: all records decode, verify and agree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Audit {
    pub hops: u64,
    pub countersigned: u64,
    pub settled: u64,
}

/// One peer's ledger on disk.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    path: PathBuf,
    /// How many receipts the store has held ([`mark`]).
    mark: std::sync::Arc<mark::Mark>,
    /// For [`Store::open_read_only`]: the private copy opened, removed when the last
    /// clone of the store is dropped.
    _copy: Option<std::sync::Arc<check::ScratchCopy>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

type TxResult<T> = Result<T, ConflictableTransactionError<LedgerError>>;

fn pk(session: &SessionId, server: &PeerId) -> Vec<u8> {
    let mut k = session.0.to_vec();
    k.extend(server.to_bytes());
    k
}

fn key(prefix: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + rest.len());
    k.push(prefix);
    k.extend_from_slice(rest);
    k
}

fn peer_key(peer: &PeerId) -> Vec<u8> {
    let bytes = peer.to_bytes();
    let mut k = vec![BY_PEER, u8::try_from(bytes.len()).unwrap_or(u8::MAX)];
    k.extend(bytes);
    k
}

fn decode<T: serde::de::DeserializeOwned>(k: &[u8], v: &[u8]) -> Result<T, LedgerError> {
    decode_bounded(k, v, MAX_RECORD_BYTES)
}

fn decode_bounded<T: serde::de::DeserializeOwned>(
    k: &[u8],
    v: &[u8],
    max: usize,
) -> Result<T, LedgerError> {
    wire::decode(v, max).map_err(|e| {
        StoreError::Corrupt {
            key: hex::encode(k),
            detail: e.to_string(),
        }
        .into()
    })
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, LedgerError> {
    encode_bounded(value, MAX_RECORD_BYTES, "ledger record")
}

fn encode_bounded<T: Serialize>(
    value: &T,
    max: usize,
    what: &'static str,
) -> Result<Vec<u8>, LedgerError> {
    let bytes = wire::encode(value)?;
    if bytes.len() > max {
        return Err(LedgerError::TooLarge {
            what,
            len: bytes.len() as u64,
            max: max as u64,
        });
    }
    Ok(bytes)
}

fn tx_get<T: serde::de::DeserializeOwned>(tx: &TransactionalTree, k: &[u8]) -> TxResult<Option<T>> {
    match tx.get(k)? {
        Some(v) => decode(k, &v)
            .map(Some)
            .map_err(ConflictableTransactionError::Abort),
        None => Ok(None),
    }
}

fn tx_put<T: Serialize>(tx: &TransactionalTree, k: Vec<u8>, value: &T) -> TxResult<()> {
    let bytes = encode(value).map_err(ConflictableTransactionError::Abort)?;
    tx.insert(k, bytes)?;
    Ok(())
}

fn from_tx(e: TransactionError<LedgerError>) -> LedgerError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Sled(e).into(),
    }
}

/// What one hop adds to its parties' totals.
fn contribution(
    latest: Option<&SignedReceipt>,
    countersigned: Option<&SignedReceipt>,
) -> PeerTotals {
    let mut t = PeerTotals::default();
    if let Some(r) = latest {
        t.sessions = 1;
        t.prefill_tokens = r.receipt.prefill_tokens;
        t.decode_tokens = r.receipt.decode_tokens;
        t.amount = r.receipt.amount;
    }
    if let Some(c) = countersigned {
        t.confirmed_amount = c.receipt.amount;
    }
    t
}

impl PeerTotals {
    fn apply(&mut self, old: &PeerTotals, new: &PeerTotals) {
        fn step(v: &mut u64, old: u64, new: u64) {
            *v = v.saturating_sub(old).saturating_add(new);
        }
        step(&mut self.sessions, old.sessions, new.sessions);
        step(
            &mut self.prefill_tokens,
            old.prefill_tokens,
            new.prefill_tokens,
        );
        step(
            &mut self.decode_tokens,
            old.decode_tokens,
            new.decode_tokens,
        );
        step(&mut self.amount, old.amount, new.amount);
        step(
            &mut self.confirmed_amount,
            old.confirmed_amount,
            new.confirmed_amount,
        );
        step(
            &mut self.settled_amount,
            old.settled_amount,
            new.settled_amount,
        );
    }
}

/// Is `new` a valid successor of `old` in the same slot? (`Ok(false)`: not newer.)
fn newer(old: &SignedReceipt, new: &SignedReceipt) -> Result<bool, LedgerError> {
    let (o, n) = (&old.receipt, &new.receipt);
    let session = n.terms.session;
    if o.terms != n.terms {
        return Err(LedgerError::NotMonotonic {
            session,
            detail: "terms changed",
        });
    }
    if o.start_ms != n.start_ms {
        return Err(LedgerError::NotMonotonic {
            session,
            detail: "start time changed",
        });
    }
    if n.seq <= o.seq {
        return Ok(false);
    }
    if n.prefill_tokens < o.prefill_tokens || n.decode_tokens < o.decode_tokens {
        return Err(LedgerError::NotMonotonic {
            session,
            detail: "fewer tokens than an earlier receipt",
        });
    }
    if n.end_ms < o.end_ms {
        return Err(LedgerError::NotMonotonic {
            session,
            detail: "end time earlier than an earlier receipt",
        });
    }
    Ok(true)
}

impl Store {
    /// The directory the store was opened at (a running node keeps its batches beside it).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// fsync everything written so far.
    fn flush(&self) -> Result<(), LedgerError> {
        self.tree.flush().map_err(StoreError::from)?;
        Ok(())
    }

    fn get_decoded<T: serde::de::DeserializeOwned>(
        &self,
        k: &[u8],
    ) -> Result<Option<T>, LedgerError> {
        match self.tree.get(k).map_err(StoreError::from)? {
            Some(v) => decode(k, &v).map(Some),
            None => Ok(None),
        }
    }

    /// Client side: remember that this client opened `terms.session` on `terms.server`, so
    /// receipts for sessions it never opened are refused. Flushed before returning.
    pub fn record_opened(&self, terms: &Terms) -> Result<(), LedgerError> {
        let k = key(OPENED, &pk(&terms.session, &terms.server));
        self.tree
            .insert(k, encode(terms)?)
            .map_err(StoreError::from)?;
        self.flush()
    }

    /// The terms of a session this client opened with `server`, if it did.
    pub fn opened(
        &self,
        session: &SessionId,
        server: &PeerId,
    ) -> Result<Option<Terms>, LedgerError> {
        self.get_decoded(&key(OPENED, &pk(session, server)))
    }

    /// Stores a receipt after verifying its signatures, and returns once it is on disk.
    ///
    /// Each hop keeps two slots: the newest receipt and the newest countersigned one. A
    /// receipt is taken into a slot only with a higher sequence number than the slot holds
    /// (or, for the newest slot, the same receipt now countersigned); a receipt that no
    /// slot takes is a [`LedgerError::Replay`]. An update must keep the terms and start
    /// time and may not lower token counts ([`LedgerError::NotMonotonic`]).
    pub fn put(&self, signed: &SignedReceipt) -> Result<Put, LedgerError> {
        signed.verify()?;
        let r = &signed.receipt;
        let id = pk(&r.terms.session, &r.terms.server);
        // Bound the record before the transaction.
        encode(signed)?;
        let put = self
            .tree
            .transaction(|tx| {
                let latest_k = key(LATEST, &id);
                let cs_k = key(COUNTERSIGNED, &id);
                let old: Option<SignedReceipt> = tx_get(tx, &latest_k)?;
                let old_cs: Option<SignedReceipt> = tx_get(tx, &cs_k)?;
                let abort = ConflictableTransactionError::Abort;
                let take_latest = match &old {
                    None => true,
                    Some(o) => {
                        newer(o, signed).map_err(abort)?
                            || (o.receipt == signed.receipt
                                && o.client_sig.is_none()
                                && signed.client_sig.is_some())
                    }
                };
                let take_cs = signed.client_sig.is_some()
                    && match &old_cs {
                        None => true,
                        Some(o) => newer(o, signed).map_err(abort)?,
                    };
                if !take_latest && !take_cs {
                    let highest = old.as_ref().map_or(0, |o| o.receipt.seq);
                    return Err(abort(LedgerError::Replay {
                        session: r.terms.session,
                        seq: r.seq,
                        highest,
                    }));
                }
                let new_latest = if take_latest {
                    Some(signed)
                } else {
                    old.as_ref()
                };
                let new_cs = if take_cs {
                    Some(signed)
                } else {
                    old_cs.as_ref()
                };
                if take_latest {
                    tx_put(tx, latest_k, signed)?;
                }
                if take_cs {
                    tx_put(tx, cs_k, signed)?;
                }
                if old.is_none() {
                    for peer in [&r.terms.client, &r.terms.server] {
                        let mut k = peer_key(peer);
                        k.extend_from_slice(&id);
                        tx.insert(k, &[][..])?;
                    }
                    let mut k = vec![BY_TIME];
                    k.extend_from_slice(&r.start_ms.to_be_bytes());
                    k.extend_from_slice(&id);
                    tx.insert(k, &[][..])?;
                }
                let before = contribution(old.as_ref(), old_cs.as_ref());
                let after = contribution(new_latest, new_cs);
                for peer in [&r.terms.client, &r.terms.server] {
                    let k = key(TOTALS, &peer.to_bytes());
                    let mut totals: PeerTotals = tx_get(tx, &k)?.unwrap_or_default();
                    totals.apply(&before, &after);
                    tx_put(tx, k, &totals)?;
                }
                let put = Put {
                    latest: take_latest,
                    countersigned: take_cs,
                };
                Ok((put, old.is_none(), take_cs && old_cs.is_none()))
            })
            .map_err(from_tx)?;
        self.flush()?;
        let (put, new_hop, new_countersigned) = put;
        self.mark.raise(new_hop, new_countersigned)?;
        Ok(put)
    }

    /// Client side: check a server-signed receipt against what this client opened and
    /// sent, countersign it, store it (flushed), and return it to send back to the server.
    ///
    /// Refuses a session this client never opened ([`LedgerError::UnknownSession`]), terms
    /// other than the ones recorded at open, more tokens than `tally` counted, a bad server
    /// signature, and a replay of a sequence number already countersigned.
    pub fn accept_as_client(
        &self,
        mut signed: SignedReceipt,
        tally: &ClientTally,
        key: &SigningKey,
    ) -> Result<SignedReceipt, LedgerError> {
        let terms = &signed.receipt.terms;
        let opened = self
            .opened(&terms.session, &terms.server)?
            .ok_or(LedgerError::UnknownSession(terms.session))?;
        if &opened != tally.terms() {
            return Err(LedgerError::TermsMismatch {
                field: "tally terms",
            });
        }
        signed.client_sig = None;
        signed.countersign(key, tally)?;
        let put = self.put(&signed)?;
        debug_assert!(put.countersigned);
        Ok(signed)
    }

    /// The newest receipt of one hop.
    pub fn get(
        &self,
        session: &SessionId,
        server: &PeerId,
    ) -> Result<Option<SignedReceipt>, LedgerError> {
        self.get_decoded(&key(LATEST, &pk(session, server)))
    }

    /// Everything stored about one hop.
    pub fn entry(
        &self,
        session: &SessionId,
        server: &PeerId,
    ) -> Result<Option<Entry>, LedgerError> {
        self.entry_by_pk(&pk(session, server))
    }

    fn entry_by_pk(&self, id: &[u8]) -> Result<Option<Entry>, LedgerError> {
        let Some(latest) = self.get_decoded(&key(LATEST, id))? else {
            return Ok(None);
        };
        Ok(Some(Entry {
            latest,
            countersigned: self.get_decoded(&key(COUNTERSIGNED, id))?,
            settled: self.get_decoded(&key(SETTLED, id))?,
        }))
    }

    /// The newest receipts of a session's hops (at most `limit`).
    pub fn by_session(
        &self,
        session: &SessionId,
        limit: usize,
    ) -> Result<Vec<SignedReceipt>, LedgerError> {
        self.tree
            .scan_prefix(key(LATEST, &session.0))
            .take(limit)
            .map(|kv| {
                let (k, v) = kv.map_err(StoreError::from)?;
                decode(&k, &v)
            })
            .collect()
    }

    /// Hops that `peer` took part in, as client or server (at most `limit`).
    pub fn by_peer(&self, peer: &PeerId, limit: usize) -> Result<Vec<Entry>, LedgerError> {
        let prefix = peer_key(peer);
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(&prefix).take(limit) {
            let (k, _) = kv.map_err(StoreError::from)?;
            if let Some(e) = self.entry_by_pk(&k[prefix.len()..])? {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Hops whose session started in `[from_ms, to_ms)`, oldest first (at most `limit`).
    pub fn by_time(
        &self,
        from_ms: u64,
        to_ms: u64,
        limit: usize,
    ) -> Result<Vec<Entry>, LedgerError> {
        let mut out = Vec::new();
        let start = key(BY_TIME, &from_ms.to_be_bytes());
        let end = key(BY_TIME, &to_ms.to_be_bytes());
        for kv in self.tree.range(start..end).take(limit) {
            let (k, _) = kv.map_err(StoreError::from)?;
            if let Some(e) = self.entry_by_pk(&k[9..])? {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// The `limit` hops whose sessions started last, newest first: what a listing shows
    /// (walking [`Store::by_time`] from the start would show the oldest).
    pub fn newest(&self, limit: usize) -> Result<Vec<Entry>, LedgerError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix([BY_TIME]).rev().take(limit) {
            let (k, _) = kv.map_err(StoreError::from)?;
            if let Some(e) = self.entry_by_pk(&k[9..])? {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Every hop, in key order, one at a time (memory stays bounded however big the
    /// ledger is).
    pub fn entries(&self) -> impl Iterator<Item = Result<Entry, LedgerError>> + '_ {
        self.tree.scan_prefix([LATEST]).filter_map(move |kv| {
            let id = match kv {
                Ok((k, _)) => k.subslice(1, k.len() - 1),
                Err(e) => return Some(Err(StoreError::from(e).into())),
            };
            self.entry_by_pk(&id).transpose()
        })
    }

    /// Totals of one peer over every stored receipt it is party to.
    pub fn totals(&self, peer: &PeerId) -> Result<PeerTotals, LedgerError> {
        Ok(self
            .get_decoded(&key(TOTALS, &peer.to_bytes()))?
            .unwrap_or_default())
    }

    /// Records that a settlement batch covered these receipts (each countersigned, each a
    /// later seq than what was settled before), in one transaction, flushed.
    pub fn mark_settled(&self, receipts: &[&SignedReceipt], at_ms: u64) -> Result<(), LedgerError> {
        self.tree
            .transaction(|tx| {
                let abort = ConflictableTransactionError::Abort;
                for signed in receipts {
                    let r = &signed.receipt;
                    if !signed.is_countersigned() {
                        return Err(abort(LedgerError::NotCountersigned));
                    }
                    let id = pk(&r.terms.session, &r.terms.server);
                    let k = key(SETTLED, &id);
                    let old: Option<Settled> = tx_get(tx, &k)?;
                    if let Some(old) = old {
                        if old.seq >= r.seq {
                            return Err(abort(LedgerError::Replay {
                                session: r.terms.session,
                                seq: r.seq,
                                highest: old.seq,
                            }));
                        }
                    }
                    let old_amount = old.map_or(0, |o| o.amount);
                    tx_put(
                        tx,
                        k,
                        &Settled {
                            seq: r.seq,
                            amount: r.amount,
                            at_ms,
                        },
                    )?;
                    for peer in [&r.terms.client, &r.terms.server] {
                        let k = key(TOTALS, &peer.to_bytes());
                        let mut totals: PeerTotals = tx_get(tx, &k)?.unwrap_or_default();
                        totals.settled_amount = totals
                            .settled_amount
                            .saturating_sub(old_amount)
                            .saturating_add(r.amount);
                        tx_put(tx, k, &totals)?;
                    }
                }
                Ok(())
            })
            .map_err(from_tx)?;
        self.flush()
    }

    /// Size of the database on disk, in bytes.
    pub fn size_on_disk(&self) -> Result<u64, LedgerError> {
        Ok(self.db.size_on_disk().map_err(StoreError::from)?)
    }
}
