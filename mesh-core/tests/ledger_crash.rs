//! kill -9 during heavy receipt writes loses no committed receipt and leaves nothing
//! half-written.
//!
//! The test re-runs its own binary as a child (`crash_child`, selected with `--exact` and
//! given the store path in [`CHILD_ENV`]). The child writes receipts as fast as it can,
//! printing `COMMITTED <session> <seq> <countersigned>` after each `Store::put` returned
//! (flushed). The parent kills it with SIGKILL at some point, reopens the store, and checks
//! that every reported receipt is there (or superseded by the next one, which may have
//! reached the disk before the kill but not the report) and that the whole store audits
//! clean: every record decodes and verifies, indexes and totals agree.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use mesh_core::identity::Identity;
use mesh_core::ledger::{ClientTally, ConfigHash, Meter, Store, Terms};
use mesh_core::{BlockRange, ModelId, SessionId};

const CHILD_ENV: &str = "MESH_LEDGER_CRASH_CHILD";
/// Upper bound on what one child writes, so it ends even if nobody kills it.
const CHILD_MAX_WRITES: usize = 20_000;

fn server() -> Identity {
    Identity::from_secret([11; 32]).unwrap()
}

fn client() -> Identity {
    Identity::from_secret([22; 32]).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The child: write receipts until killed. Does nothing in a normal test run.
#[test]
fn crash_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (server, client) = (server(), client());
    let store = Store::open(Path::new(&path)).unwrap();
    let mut out = std::io::stdout().lock();
    let mut writes = 0;
    let mut round: u64 = 0;
    while writes < CHILD_MAX_WRITES {
        round += 1;
        let terms = Terms {
            session: SessionId::random(),
            client: client.peer_id(),
            server: server.peer_id(),
            model: ModelId::new("crash-model"),
            config_hash: ConfigHash([round as u8; 32]),
            span: BlockRange::new(0, 3),
            price_per_token: 2,
        };
        store.record_opened(&terms).unwrap();
        let mut meter = Meter::new(terms.clone(), round, 2).unwrap();
        let mut tally = ClientTally::new(terms.clone());
        tally.record_positions(4);
        let mut decode = 0;
        // Each session: a prompt, then updates every 2 tokens; every other update is
        // countersigned as a second write.
        for step in 0..8u64 {
            tally.record_positions(1);
            tally.record_positions(1);
            decode += 2;
            let Some(r) = meter.observe(4, decode, round + step).unwrap() else {
                continue;
            };
            let signed = r.sign(&server.signing_key()).unwrap();
            let seq = signed.receipt.seq;
            store.put(&signed).unwrap();
            writeln!(out, "COMMITTED {} {seq} 0", hex(&terms.session.0)).unwrap();
            out.flush().unwrap();
            writes += 1;
            if step % 2 == 1 {
                store
                    .accept_as_client(signed, &tally, &client.signing_key())
                    .unwrap();
                writeln!(out, "COMMITTED {} {seq} 1", hex(&terms.session.0)).unwrap();
                out.flush().unwrap();
                writes += 1;
            }
        }
    }
}

/// Highest committed seq per session, for the latest and the countersigned slot.
#[derive(Default)]
struct Committed {
    latest: u64,
    countersigned: u64,
}

fn run_child_and_kill(path: &Path, kill_after: usize, seen: &mut HashMap<String, Committed>) {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut count = 0;
    let mut record = |line: &str, count: &mut usize| {
        let parts: Vec<&str> = line.split(' ').collect();
        if let ["COMMITTED", session, seq, cs] = parts[..] {
            let seq: u64 = seq.parse().unwrap();
            let e = seen.entry(session.to_string()).or_default();
            e.latest = e.latest.max(seq);
            if cs == "1" {
                e.countersigned = e.countersigned.max(seq);
            }
            *count += 1;
        }
    };
    for line in lines.by_ref() {
        record(&line.unwrap(), &mut count);
        if count >= kill_after {
            break;
        }
    }
    assert!(count >= kill_after, "child ended before it was killed");
    // SIGKILL: no destructors, no flush, no chance to finish a write.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "child was not killed: {status}");
    }
    // Lines already in the pipe were committed too; a partial last line is ignored.
    for line in lines {
        match line {
            Ok(l) => record(&l, &mut count),
            Err(_) => break,
        }
    }
}

#[test]
fn kill_9_during_receipt_writes_loses_no_committed_receipt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let (server, client) = (server(), client());
    let mut seen: HashMap<String, Committed> = HashMap::new();
    // Three children on the same store, killed at different points.
    for kill_after in [97, 211, 150] {
        run_child_and_kill(&path, kill_after, &mut seen);

        let store = Store::open(&path).unwrap();
        let audit = store.audit().unwrap();
        assert!(audit.hops as usize >= seen.len());
        for (session_hex, c) in &seen {
            let mut id = [0u8; 16];
            for (i, b) in id.iter_mut().enumerate() {
                *b = u8::from_str_radix(&session_hex[2 * i..2 * i + 2], 16).unwrap();
            }
            let e = store
                .entry(&SessionId(id), &server.peer_id())
                .unwrap()
                .unwrap_or_else(|| panic!("committed session {session_hex} lost"));
            e.latest.verify().unwrap();
            // The reported receipt, or the next one if it hit the disk before the kill.
            let seq = e.latest.receipt.seq;
            assert!(
                seq == c.latest || seq == c.latest + 1,
                "session {session_hex}: stored seq {seq}, committed {}",
                c.latest
            );
            if c.countersigned > 0 {
                let cs = e
                    .countersigned
                    .expect("committed countersigned receipt lost");
                cs.verify_countersigned().unwrap();
                assert!(cs.receipt.seq >= c.countersigned);
                assert_eq!(cs.receipt.terms.client, client.peer_id());
            }
        }
        drop(store);
    }
    assert!(seen.len() > 10);
}
