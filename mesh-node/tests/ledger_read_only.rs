//! Reading commands never write the ledger (issue 14, item 3): `mesh-node earnings` on a
//! damaged ledger with no node running leaves every byte as it was, and does not blame a
//! running node; a ledger held open by a live process is told apart.

mod common;
mod ops_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mesh_core::identity::Identity;
use mesh_core::ledger::{ConfigHash, Meter, Store, Terms};
use mesh_core::{BlockRange, ModelId, SessionId};
use ops_support::*;

/// A node ledger at `path` with `sessions` receipts signed by `server`.
fn write_ledger(path: &Path, server: &Identity, sessions: u64) {
    let client = Identity::generate();
    let store = Store::open(path).unwrap();
    for round in 1..=sessions {
        let terms = Terms {
            session: SessionId::random(),
            client: client.peer_id(),
            server: server.peer_id(),
            model: ModelId::new("tiny-llama-mesh"),
            config_hash: ConfigHash([1; 32]),
            span: BlockRange::new(0, 8),
            price_per_token: 2,
        };
        let mut meter = Meter::new(terms, round, 2).unwrap();
        let receipt = meter.observe(4, 2, round).unwrap().unwrap();
        store
            .put(&receipt.sign(&server.signing_key()).unwrap())
            .unwrap();
    }
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn changed_bytes(a: &BTreeMap<PathBuf, Vec<u8>>, b: &BTreeMap<PathBuf, Vec<u8>>) -> usize {
    let files: std::collections::BTreeSet<_> = a.keys().chain(b.keys()).collect();
    files
        .into_iter()
        .map(|f| {
            let (x, y) = (
                a.get(f).cloned().unwrap_or_default(),
                b.get(f).cloned().unwrap_or_default(),
            );
            let common = x.iter().zip(&y).filter(|(p, q)| p != q).count();
            common + x.len().abs_diff(y.len())
        })
        .sum()
}

#[test]
fn earnings_on_a_damaged_ledger_writes_nothing_and_tells_a_lock_from_damage() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    std::fs::create_dir_all(home).unwrap();
    let server = Identity::create(&home.join("node.key")).unwrap();
    let ledger = home.join("ledger");
    write_ledger(&ledger, &server, 400);
    let ledger_arg = ledger.display().to_string();

    // Cut the database file in half, as a bad disk or a careless copy would.
    let db = ledger.join("db");
    let bytes = std::fs::read(&db).unwrap();
    std::fs::write(&db, &bytes[..bytes.len() / 2]).unwrap();
    let before = snapshot(&ledger);
    let o = mesh_node(home, &["earnings", "--ledger-dir", &ledger_arg]);
    let after = snapshot(&ledger);
    let changed = changed_bytes(&before, &after);
    let said = format!("{}{}", stdout(&o), stderr(&o));
    assert!(
        changed == 0 && !said.contains("running node holds it"),
        "earnings changed {changed} bytes of the ledger and said: {said}"
    );

    // Held open by a live process (this one, with sled's lock: opening the damaged store
    // itself is refused now): said so, and still nothing written.
    let held = std::fs::File::open(&db).unwrap();
    held.lock().unwrap();
    let before = snapshot(&ledger);
    let o = mesh_node(home, &["earnings", "--ledger-dir", &ledger_arg]);
    assert_fails_with(&o, &["held open by a running process", &ledger_arg]);
    assert_eq!(changed_bytes(&before, &snapshot(&ledger)), 0);
    drop(held);
}
