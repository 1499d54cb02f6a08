//! Checking a store: [`Store::audit`] reads every record back, and
//! [`Store::open_read_only`] opens a ledger for reading without writing a byte of it.
//!
//! sled writes on every open (it recovers its log and may rewrite its files), so a command
//! that only reads, such as `mesh-node earnings`, must not open the ledger itself: on a
//! damaged file that recovery would change what is there before anyone looked at it. It
//! opens a private copy instead, after checking sled's lock so that a store a live process
//! holds is told apart from a damaged one.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::*;

/// The directory a read-only store was copied into; removed on drop.
#[derive(Debug)]
pub(super) struct ScratchCopy(PathBuf);

impl Drop for ScratchCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether a live process holds sled's lock on `path/db`; the probe takes a shared lock
/// and releases it at once, which writes nothing.
fn held_by_a_live_process(path: &Path) -> Result<bool, StoreError> {
    let file = match File::open(path.join("db")) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(StoreError::Copy {
                path: path.to_owned(),
                source,
            })
        }
    };
    // The same advisory lock (flock) sled takes with `try_lock_exclusive`.
    match file.try_lock_shared() {
        Ok(()) => {
            let _ = file.unlock();
            Ok(false)
        }
        Err(std::fs::TryLockError::WouldBlock) => Ok(true),
        Err(std::fs::TryLockError::Error(source)) => Err(StoreError::Copy {
            path: path.to_owned(),
            source,
        }),
    }
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

impl Store {
    /// Opens the ledger at `path` for reading and leaves `path` untouched: refused with
    /// [`StoreError::Locked`] while a live process holds it, with [`StoreError::Damaged`]
    /// when sled cannot open it or it fails [`Store::audit`]. Reads a private copy, so
    /// what it shows is the ledger as it was when opened.
    pub fn open_read_only(path: &Path) -> Result<Self, LedgerError> {
        if held_by_a_live_process(path)? {
            return Err(StoreError::Locked {
                path: path.to_owned(),
            }
            .into());
        }
        let scratch = std::env::temp_dir().join(format!(
            "mesh-ledger-read-{}-{}",
            std::process::id(),
            now_nanos()
        ));
        let copy = Arc::new(ScratchCopy(scratch.clone()));
        copy_dir(path, &scratch).map_err(|source| StoreError::Copy {
            path: path.to_owned(),
            source,
        })?;
        let damaged = |detail: String| StoreError::Damaged {
            path: path.to_owned(),
            detail,
        };
        let mut store = Store::open_as(&scratch, path).map_err(|e| match e {
            LedgerError::Store(StoreError::Damaged { .. }) => e,
            e => damaged(e.to_string()).into(),
        })?;
        store.audit().map_err(|e| damaged(e.to_string()))?;
        store._copy = Some(copy);
        Ok(store)
    }

    /// Reads every record back and checks it: each value decodes, each receipt verifies
    /// (countersigned slots with both signatures), the slots and indexes agree, and the
    /// stored per-peer totals equal the totals recomputed from the receipts.
    pub fn audit(&self) -> Result<Audit, LedgerError> {
        use std::collections::{BTreeMap, BTreeSet};
        let bad = |s: String| LedgerError::Store(StoreError::Inconsistent(s));
        let mut audit = Audit::default();
        let mut totals: BTreeMap<Vec<u8>, PeerTotals> = BTreeMap::new();
        let mut expected_index: BTreeSet<Vec<u8>> = BTreeSet::new();
        for entry in self.entries() {
            let e = entry?;
            let r = &e.latest.receipt;
            let id = pk(&r.terms.session, &r.terms.server);
            e.latest.verify()?;
            audit.hops += 1;
            if let Some(c) = &e.countersigned {
                c.verify_countersigned()?;
                if c.receipt.terms != r.terms || c.receipt.seq > r.seq {
                    return Err(bad(format!(
                        "session {}: countersigned slot ahead of newest",
                        r.terms.session
                    )));
                }
                audit.countersigned += 1;
            }
            let mut add = contribution(Some(&e.latest), e.countersigned.as_ref());
            if let Some(s) = e.settled {
                audit.settled += 1;
                add.settled_amount = s.amount;
            }
            for peer in [&r.terms.client, &r.terms.server] {
                let t = totals.entry(peer.to_bytes()).or_default();
                t.apply(&PeerTotals::default(), &add);
                let mut k = peer_key(peer);
                k.extend_from_slice(&id);
                expected_index.insert(k);
            }
            let mut k = vec![BY_TIME];
            k.extend_from_slice(&r.start_ms.to_be_bytes());
            k.extend_from_slice(&id);
            expected_index.insert(k);
        }
        let mut found_index = BTreeSet::new();
        for prefix in [BY_PEER, BY_TIME] {
            for kv in self.tree.scan_prefix([prefix]) {
                let (k, _) = kv.map_err(StoreError::from)?;
                found_index.insert(k.to_vec());
            }
        }
        if found_index != expected_index {
            return Err(bad(format!(
                "{} index entries, {} expected from the receipts",
                found_index.len(),
                expected_index.len()
            )));
        }
        for kv in self.tree.scan_prefix([TOTALS]) {
            let (k, v) = kv.map_err(StoreError::from)?;
            let stored: PeerTotals = decode(&k, &v)?;
            let computed = totals.remove(&k[1..]).unwrap_or_default();
            if stored != computed {
                return Err(bad(format!(
                    "totals of {} are {stored:?}, receipts add up to {computed:?}",
                    hex::encode(&k[1..])
                )));
            }
        }
        if let Some((peer, _)) = totals.into_iter().next() {
            return Err(bad(format!("no stored totals for {}", hex::encode(&peer))));
        }
        Ok(audit)
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}
