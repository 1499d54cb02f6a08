//! A damaged ledger is refused when it is opened (issue 14, item 2): sled 0.34 opens a
//! database file cut in half without an error and holds part of it, or panics. The store
//! must answer an error naming the path and the way to recover, never a panic, and never a
//! store that quietly lost receipts.

use mesh_core::identity::Identity;
use mesh_core::ledger::{ConfigHash, LedgerError, Meter, Store, StoreError, Terms, MARK_FILE};
use mesh_core::{BlockRange, ModelId, SessionId};

const RECEIPTS: u64 = 500;

/// Puts `n` receipts of fresh sessions signed by `server` into `store`.
fn put_receipts(store: &Store, server: &Identity, n: u64) {
    let client = Identity::generate();
    for round in 1..=n {
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

fn hops(store: &Store) -> usize {
    store.entries().filter(Result::is_ok).count()
}

type Damage = fn(&mut Vec<u8>);

const DAMAGES: [(&str, Damage); 3] = [
    ("cut in half", |b| b.truncate(b.len() / 2)),
    ("second half zeroed", |b| {
        let n = b.len();
        b[n / 2..].fill(0);
    }),
    ("second half garbled", |b| {
        let n = b.len();
        for (i, x) in b[n / 2..].iter_mut().enumerate() {
            *x = (i as u8).wrapping_mul(31).wrapping_add(7);
        }
    }),
];

#[test]
fn a_damaged_ledger_is_refused_at_open_naming_its_path_and_the_recovery_step() {
    for (name, damage) in DAMAGES {
        let dir = tempfile::tempdir().unwrap();
        let ledger = dir.path().join("ledger");
        let server = Identity::generate();
        put_receipts(&Store::open(&ledger).unwrap(), &server, RECEIPTS);
        let db = ledger.join("db");
        let mut bytes = std::fs::read(&db).unwrap();
        damage(&mut bytes);
        std::fs::write(&db, &bytes).unwrap();

        let opened = std::panic::catch_unwind(|| Store::open(&ledger));
        let err = match opened {
            Err(_) => panic!("{name}: Store::open panicked"),
            Ok(Ok(store)) => panic!(
                "{name}: opened without an error, holding {} of {RECEIPTS} receipts",
                hops(&store)
            ),
            Ok(Err(e)) => e,
        };
        assert!(
            matches!(err, LedgerError::Store(StoreError::Damaged { .. })),
            "{name}: {err:?}"
        );
        let text = err.to_string();
        let shown = ledger.display().to_string();
        for want in ["fails its check", &shown, "mv ", "restore it from a backup"] {
            assert!(text.contains(want), "{name}: `{want}` missing from: {text}");
        }
    }
}

#[test]
fn a_sound_ledger_reopens_and_takes_receipts_and_one_from_before_marks_opens_too() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    let server = Identity::generate();
    put_receipts(&Store::open(&ledger).unwrap(), &server, 20);
    let store = Store::open(&ledger).unwrap();
    assert_eq!(hops(&store), 20);
    put_receipts(&store, &server, 5);
    drop(store);
    // A ledger written before marks existed has none: it opens, and gets one.
    std::fs::remove_file(ledger.join(MARK_FILE)).unwrap();
    let store = Store::open(&ledger).unwrap();
    assert_eq!(store.audit().unwrap().hops, 25);
    drop(store);
    let mark = std::fs::read_to_string(ledger.join(MARK_FILE)).unwrap();
    assert!(mark.contains("hops 25"), "{mark}");
}

#[test]
fn a_store_below_its_high_water_mark_lost_receipts_and_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    put_receipts(&Store::open(&ledger).unwrap(), &Identity::generate(), 10);
    // As if the database had lost one receipt the mark counted.
    std::fs::write(ledger.join(MARK_FILE), "hops 11\ncountersigned 0\n").unwrap();
    let err = Store::open(&ledger).map(|_| ()).unwrap_err().to_string();
    assert!(
        err.contains("fails its check") && err.contains("holds 10 receipts"),
        "{err}"
    );
    // A reading command says the same about the ledger itself, not its private copy.
    let err = Store::open_read_only(&ledger)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("ledger {} fails its check", ledger.display())),
        "{err}"
    );
}
