//! Opening a store, and noticing that it lost receipts.
//!
//! sled 0.34 does not say when its file is damaged: a database file cut in half opens
//! without an error and holds what it could recover (272 of 500 receipts in one case), and
//! every later write succeeds. Some damaged files make it panic inside `open`. So
//! [`Store::open`] catches that panic, and keeps a high-water mark: a small file of its own
//! ([`MARK_FILE`], inside the store's directory so that it moves, is backed up and is
//! restored with the database) holding how many hops and countersigned receipts the store
//! has held. Receipts are never deleted, so these counts only grow: a store that opens
//! with fewer than its mark lost records, and is refused as [`StoreError::Damaged`].
//!
//! The mark is written (to a temporary file, fsync'd, renamed over the old one, the
//! directory fsync'd) after the receipt it counts is flushed, and only when a put adds a
//! hop or a first countersigned receipt, not on every running receipt. A crash between
//! the two leaves the mark one behind, never ahead: it is a lower bound, and a store found
//! above its mark (that, or a ledger from before marks) raises it at open.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{Store, StoreError, COUNTERSIGNED, LATEST};
use crate::ledger::LedgerError;

/// The high-water mark's file name inside the store's directory.
pub const MARK_FILE: &str = "mesh-ledger.mark";

/// What the store holds (or, in the mark, has held at least).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Counts {
    pub hops: u64,
    pub countersigned: u64,
}

/// The mark of one open store, shared by its clones.
#[derive(Debug)]
pub(super) struct Mark {
    dir: PathBuf,
    counts: Mutex<Counts>,
}

impl Counts {
    fn parse(text: &str) -> Option<Self> {
        let mut c = Counts::default();
        let (mut hops, mut cs) = (false, false);
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("hops", n)) => (c.hops, hops) = (n.trim().parse().ok()?, true),
                Some(("countersigned", n)) => {
                    (c.countersigned, cs) = (n.trim().parse().ok()?, true)
                }
                _ => return None,
            }
        }
        (hops && cs).then_some(c)
    }

    fn render(&self) -> String {
        format!("hops {}\ncountersigned {}\n", self.hops, self.countersigned)
    }
}

fn write_durably(dir: &Path, counts: Counts) -> std::io::Result<()> {
    let tmp = dir.join(format!("{MARK_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(counts.render().as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(MARK_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

impl Mark {
    /// Checks `found` (what the store holds now) against the mark in `dir`, and raises the
    /// mark to it. `shown` is the path errors name.
    pub(super) fn check(dir: &Path, shown: &Path, found: Counts) -> Result<Self, LedgerError> {
        let damaged = |detail: String| StoreError::Damaged {
            path: shown.to_owned(),
            detail,
        };
        let file = dir.join(MARK_FILE);
        let mark = match std::fs::read_to_string(&file) {
            Ok(text) => Some(Counts::parse(&text).ok_or_else(|| {
                damaged(format!("its high-water mark {MARK_FILE} is unreadable"))
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(damaged(format!("reading {MARK_FILE}: {e}")).into()),
        };
        if let Some(m) = mark {
            if found.hops < m.hops || found.countersigned < m.countersigned {
                return Err(damaged(format!(
                    "it holds {} receipts ({} countersigned) but has held {} ({} countersigned, \
                     says {MARK_FILE}): the database lost records",
                    found.hops, found.countersigned, m.hops, m.countersigned
                ))
                .into());
            }
        }
        if mark != Some(found) {
            write_durably(dir, found).map_err(|source| StoreError::Mark {
                path: file.clone(),
                source,
            })?;
        }
        Ok(Self {
            dir: dir.to_owned(),
            counts: Mutex::new(found),
        })
    }

    /// After a flushed put: count what it added and write the mark.
    pub(super) fn raise(&self, new_hop: bool, new_countersigned: bool) -> Result<(), LedgerError> {
        if !new_hop && !new_countersigned {
            return Ok(());
        }
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.hops += u64::from(new_hop);
        counts.countersigned += u64::from(new_countersigned);
        write_durably(&self.dir, *counts).map_err(|source| {
            StoreError::Mark {
                path: self.dir.join(MARK_FILE),
                source,
            }
            .into()
        })
    }
}

/// Text of a panic caught from sled.
pub(super) fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    let text = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("no message");
    format!("the database library gave up reading it ({text})")
}

impl Store {
    /// Opens (or creates) the ledger at `path`, a directory. Refused with
    /// [`StoreError::Damaged`] (naming the path and the way to recover) when sled cannot
    /// read it, panics on it, or it holds fewer receipts than its high-water mark.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        Self::open_as(path, path)
    }

    /// [`Store::open`] of `dir`, with errors naming `shown` (a private copy names the
    /// ledger it copies).
    pub(super) fn open_as(dir: &Path, shown: &Path) -> Result<Self, LedgerError> {
        let damaged = |detail: String| StoreError::Damaged {
            path: shown.to_owned(),
            detail,
        };
        // sled panics on some damaged files instead of answering an error.
        let opened = std::panic::catch_unwind(|| {
            let db = sled::Config::new().path(dir).open()?;
            let tree = db.open_tree("ledger-v1")?;
            Ok::<_, sled::Error>((db, tree))
        });
        let (db, tree) = match opened {
            Err(panic) => return Err(damaged(panic_text(&panic)).into()),
            Ok(Err(e @ (sled::Error::Corruption { .. } | sled::Error::ReportableBug(_)))) => {
                return Err(damaged(e.to_string()).into())
            }
            Ok(Err(source)) => {
                return Err(StoreError::Open {
                    path: shown.to_owned(),
                    source,
                }
                .into())
            }
            Ok(Ok(opened)) => opened,
        };
        let count = |prefix: u8| -> Result<u64, StoreError> {
            let mut n = 0;
            for kv in tree.scan_prefix([prefix]) {
                kv.map_err(|e| damaged(e.to_string()))?;
                n += 1;
            }
            Ok(n)
        };
        let found = Counts {
            hops: count(LATEST)?,
            countersigned: count(COUNTERSIGNED)?,
        };
        let mark = Mark::check(dir, shown, found)?;
        Ok(Self {
            db,
            tree,
            path: shown.to_owned(),
            mark: Arc::new(mark),
            _copy: None,
        })
    }
}
