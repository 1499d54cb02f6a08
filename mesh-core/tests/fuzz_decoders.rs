//! CI-sized fuzzing of every decoder of untrusted bytes: session frames, gossip heartbeats,
//! DHT records, receipts and settlement batches. Arbitrary bytes and mutations of valid
//! encodings (bit flips, truncation, extension, length prefixes and counts overwritten with
//! huge values) must give typed errors, never a panic, never an allocation far beyond the
//! input's size; valid encodings round-trip; and nothing a mutation produces passes a
//! signature check unless it is the signed original.
//!
//! The oracles and samples live in `fuzz_support`, which the cargo-fuzz targets in `fuzz/`
//! include too (see docs/fuzzing.md). Set `MESH_FUZZ_SEEDS=DIR` to write their seed corpora.

mod fuzz_support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use fuzz_support as s;
use mesh_core::ledger::{self, Batch, LedgerError, Sig, SignedReceipt};
use mesh_core::p2p::codec::read_frame;
use mesh_core::p2p::dht;
use mesh_core::pipeline::{SessionRequest, SessionResponse};
use mesh_core::wire::{self, WireError};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------
// The largest single allocation made by this thread while a closure runs, and the largest
// zeroed one (bincode zeroes a byte vector's buffer before reading into it).
// ---------------------------------------------------------------------------------------

struct Largest;

thread_local! {
    static LARGEST: Cell<[usize; 2]> = const { Cell::new([0; 2]) };
}

fn note(size: usize, zeroed: bool) {
    let _ = LARGEST.try_with(|c| {
        let [any, z] = c.get();
        c.set([any.max(size), if zeroed { z.max(size) } else { z }]);
    });
}

// SAFETY: every call is passed straight to the system allocator; `note` does not allocate.
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size(), false);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size(), true);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size, false);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Largest = Largest;

/// `f`'s result, its largest allocation and its largest zeroed allocation.
fn largest_allocs<R>(f: impl FnOnce() -> R) -> (R, usize, usize) {
    LARGEST.with(|c| c.set([0; 2]));
    let r = f();
    let [any, zeroed] = LARGEST.with(Cell::get);
    (r, any, zeroed)
}

fn largest_alloc<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let (r, any, _) = largest_allocs(f);
    (r, any)
}

/// Working space any decoder may use whatever its input.
const SLACK: usize = 64 << 10;

/// The most one decode may allocate at once for `len` input bytes: 128 bytes per input
/// byte for strings and byte vectors (see `wire::decode`), or the 1 MiB serde preallocates
/// at most for a sequence of claimed length.
fn alloc_budget(len: usize) -> (usize, usize) {
    ((128 * len).max(1 << 20) + SLACK, 128 * len + SLACK)
}

/// Runs the oracle and checks the allocation bounds; returns whether `data` was accepted.
fn check(target: &str, data: &[u8]) -> bool {
    let (accepted, any, zeroed) = largest_allocs(|| s::run(target, data));
    let (max_any, max_zeroed) = alloc_budget(data.len());
    assert!(
        any <= max_any && zeroed <= max_zeroed,
        "{target}: one allocation of {any} bytes ({zeroed} zeroed) for a {}-byte input",
        data.len()
    );
    accepted
}

// ---------------------------------------------------------------------------------------
// Mutations of valid encodings.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Mutation {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    Truncate(Index),
    Extend(Vec<u8>),
    Insert(Index, Vec<u8>),
    Remove(Index, u8),
    /// Overwrite with a huge length or count (see [`huge_count`]).
    HugeCount(Index, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        any::<Index>().prop_map(Mutation::Truncate),
        vec(any::<u8>(), 1..64).prop_map(Mutation::Extend),
        (any::<Index>(), vec(any::<u8>(), 1..16)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<Index>(), 1u8..32).prop_map(|(i, n)| Mutation::Remove(i, n)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, w)| Mutation::HugeCount(i, w)),
    ]
}

/// The encodings of huge lengths: bincode varints (`251` u16, `252` u32, `253` u64 follow)
/// claiming up to `u64::MAX`, 4 GiB, or half a decode limit, and a frame's big-endian `u32`
/// prefix.
fn huge_count(which: u8) -> Vec<u8> {
    let mut out = Vec::new();
    match which % 7 {
        0 => out.extend([253].into_iter().chain(u64::MAX.to_le_bytes())),
        1 => out.extend([253].into_iter().chain((4u64 << 30).to_le_bytes())),
        2 => out.extend([252].into_iter().chain(u32::MAX.to_le_bytes())),
        3 => out.extend(
            [252]
                .into_iter()
                .chain((wire::FRAME_LIMIT as u32 / 2).to_le_bytes()),
        ),
        4 => out.extend(
            [252]
                .into_iter()
                .chain((wire::SMALL_LIMIT as u32 / 2).to_le_bytes()),
        ),
        5 => out.extend([251].into_iter().chain(u16::MAX.to_le_bytes())),
        _ => out.extend(u32::MAX.to_be_bytes()),
    }
    out
}

fn overwrite(bytes: &mut Vec<u8>, at: usize, with: &[u8]) {
    let end = (at + with.len()).min(bytes.len());
    bytes.splice(at..end, with.iter().copied());
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let pos = |i: &Index, len: usize| if len == 0 { 0 } else { i.index(len) };
    let len = bytes.len();
    match m {
        Mutation::FlipBit(i, b) if len > 0 => bytes[pos(i, len)] ^= 1 << b,
        Mutation::SetByte(i, v) if len > 0 => bytes[pos(i, len)] = *v,
        Mutation::Truncate(i) => bytes.truncate(pos(i, len)),
        Mutation::Extend(more) => bytes.extend_from_slice(more),
        Mutation::Insert(i, more) => {
            let at = pos(i, len + 1);
            bytes.splice(at..at, more.iter().copied());
        }
        Mutation::Remove(i, n) if len > 0 => {
            let at = pos(i, len);
            bytes.drain(at..(at + usize::from(*n)).min(len));
        }
        Mutation::HugeCount(i, w) => overwrite(bytes, pos(i, len + 1), &huge_count(*w)),
        _ => {}
    }
}

/// Targets whose first byte picks a decoder: mutations leave it alone.
fn has_selector(target: &str) -> bool {
    matches!(target, "session_frames" | "dht_record" | "receipt")
}

fn mutate(target: &str, seed: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let skip = usize::from(has_selector(target));
    let mut body = seed[skip..].to_vec();
    for m in muts {
        apply(&mut body, m);
    }
    let mut out = seed[..skip].to_vec();
    out.extend(body);
    out
}

/// Extreme values a JSON edit puts in place of one leaf.
fn extreme(which: u8) -> Value {
    match which % 11 {
        0 => json!(u64::MAX),
        1 => json!(-1),
        2 => json!(1e300),
        3 => json!(0),
        4 => json!(""),
        5 => json!("0".repeat(128)),
        6 => Value::Null,
        7 => json!(true),
        8 => json!([]),
        9 => json!({}),
        _ => json!("x".repeat(10_000)),
    }
}

fn leaves(v: &Value, path: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => m
            .iter()
            .for_each(|(k, v)| leaves(v, format!("{path}/{k}"), out)),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, v)| leaves(v, format!("{path}/{i}"), out)),
        _ => out.push(path),
    }
}

/// The batch with one leaf replaced by an extreme value, one line duplicated, or one
/// dropped.
fn edit_batch(batch: &Batch, at: usize, which: u8) -> Vec<u8> {
    let mut v = serde_json::to_value(batch).expect("json");
    let lines = v["lines"].as_array_mut().expect("lines");
    match which % 13 {
        11 => lines.push(lines[at % lines.len()].clone()),
        12 => drop(lines.remove(at % lines.len())),
        _ => {
            let mut paths = Vec::new();
            leaves(&v, String::new(), &mut paths);
            *v.pointer_mut(&paths[at % paths.len()]).expect("leaf") = extreme(which);
        }
    }
    serde_json::to_vec(&v).expect("json")
}

// ---------------------------------------------------------------------------------------
// Nothing but the signed originals passes a signature check.
// ---------------------------------------------------------------------------------------

fn genuine() -> Vec<(ledger::Receipt, Sig)> {
    let mut out: Vec<SignedReceipt> = s::batch().lines.into_iter().map(|l| l.receipt).collect();
    for r in s::requests() {
        if let SessionRequest::Countersigned { receipt } = r {
            out.push(*receipt);
        }
    }
    for r in s::responses() {
        if let SessionResponse::Hidden {
            receipt: Some(r), ..
        }
        | SessionResponse::Closed {
            receipt: Some(r), ..
        } = r
        {
            out.push(*r);
        }
    }
    out.push(s::signed_receipt(s::client(), 7, 5, 3, false));
    out.into_iter().map(|r| (r.receipt, r.server_sig)).collect()
}

fn assert_genuine(r: &SignedReceipt, genuine: &[(ledger::Receipt, Sig)]) {
    if r.verify().is_ok() {
        assert!(
            genuine
                .iter()
                .any(|(g, sig)| *g == r.receipt && *sig == r.server_sig),
            "a mutated receipt verified: {r:?}"
        );
    }
}

/// Decodes what a mutated input holds again and checks every receipt or record that still
/// verifies is one the samples signed.
fn assert_authentic(target: &str, data: &[u8], genuine: &[(ledger::Receipt, Sig)]) {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    match (target, sel) {
        ("receipt", 0) => {
            if let Ok(r) = wire::decode::<SignedReceipt>(body, wire::SMALL_LIMIT) {
                assert_genuine(&r, genuine);
            }
        }
        ("receipt", 1) => {
            if let Ok(r) = serde_json::from_slice::<SignedReceipt>(body) {
                assert_genuine(&r, genuine);
            }
        }
        ("session_frames", 0) => {
            if let Ok(SessionRequest::Countersigned { receipt }) =
                wire::decode(body, wire::FRAME_LIMIT)
            {
                assert_genuine(&receipt, genuine);
            }
        }
        ("session_frames", 1) => match wire::decode(body, wire::FRAME_LIMIT) {
            Ok(SessionResponse::Hidden {
                receipt: Some(r), ..
            })
            | Ok(SessionResponse::Closed {
                receipt: Some(r), ..
            }) => assert_genuine(&r, genuine),
            _ => {}
        },
        ("dht_record", 0) => {
            if let Ok(rec) = dht::verify_server_record(&s::record_key(), body, s::NOW_MS) {
                assert_eq!(rec, s::server_record(), "a mutated server record verified");
            }
        }
        ("settlement_batch", _) => {
            if let Ok(batch) = serde_json::from_slice::<Batch>(data) {
                if batch.verify().is_ok() {
                    batch
                        .lines
                        .iter()
                        .for_each(|l| assert_genuine(&l.receipt, genuine));
                }
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------
// Properties.
// ---------------------------------------------------------------------------------------

/// Cases per property: 512 for CI, `PROPTEST_CASES` for a longer run.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// Arbitrary bytes: typed errors, no panic, bounded allocation, for every decoder.
    #[test]
    fn arbitrary_bytes_are_refused_cleanly(
        target in 0..s::TARGETS.len(),
        selector in any::<u8>(),
        body in vec(any::<u8>(), 0..2048),
    ) {
        let mut data = vec![selector];
        data.extend(body);
        check(s::TARGETS[target], &data);
    }

    /// One to four mutations of a valid encoding: refused cleanly, or still authentic.
    #[test]
    fn mutated_valid_encodings_are_refused_or_authentic(
        target in 0..s::TARGETS.len(),
        seed in any::<Index>(),
        muts in vec(mutation(), 1..5),
    ) {
        let target = s::TARGETS[target];
        let seeds = s::seeds(target);
        let data = mutate(target, seed.get::<Vec<u8>>(&seeds), &muts);
        check(target, &data);
        assert_authentic(target, &data, &genuine());
    }

    /// A batch with an extreme value in any field, or a line duplicated or dropped.
    #[test]
    fn edited_batches_are_refused_or_authentic(at in any::<usize>(), which in any::<u8>()) {
        let data = edit_batch(&s::batch(), at, which);
        check("settlement_batch", &data);
        assert_authentic("settlement_batch", &data, &genuine());
    }
}

#[test]
fn valid_encodings_round_trip_and_seed_the_fuzzers() {
    for r in s::requests() {
        let back: SessionRequest = wire::decode(&s::enc(&r), wire::FRAME_LIMIT).unwrap();
        assert_eq!(back, r);
    }
    for r in s::responses() {
        let back: SessionResponse = wire::decode(&s::enc(&r), wire::FRAME_LIMIT).unwrap();
        assert_eq!(back, r);
    }
    let batch = s::batch();
    let back: Batch = serde_json::from_slice(&s::batch_json(&batch)).unwrap();
    assert_eq!(back, batch);
    let dir = std::env::var_os("MESH_FUZZ_SEEDS").map(std::path::PathBuf::from);
    for target in s::TARGETS {
        for (i, seed) in s::seeds(target).iter().enumerate() {
            assert!(check(target, seed), "{target} seed {i} refused");
            if let Some(dir) = &dir {
                let dir = dir.join(target);
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join(format!("seed-{i}")), seed).unwrap();
            }
        }
    }
}

/// Every prefix of a valid encoding is refused (JSON may lose trailing whitespace). DHT keys
/// are left out: a prefix of a peer's key can name another, shorter, peer id. A heartbeat
/// cut exactly after `capability` is what a sender from before `gpu_live` sends, and one
/// cut exactly after `gpu_live` what a sender from before `quantization` sends: accepted.
#[test]
fn truncations_at_every_length_are_refused() {
    let older = [
        s::older_heartbeat(false),
        s::older_heartbeat(true),
        s::pre_quantization_heartbeat(false),
        s::pre_quantization_heartbeat(true),
    ];
    for target in s::TARGETS {
        for seed in s::seeds(target) {
            if target == "dht_record" && seed[0] == 1 {
                continue;
            }
            let full = seed.trim_ascii_end().len();
            for len in 0..full {
                if target == "heartbeat" && older.iter().any(|o| o[..] == seed[..len]) {
                    assert!(check(target, &seed[..len]), "an older heartbeat refused");
                    continue;
                }
                assert!(
                    !check(target, &seed[..len]),
                    "{target}: prefix of {len} accepted"
                );
            }
        }
    }
}

/// A huge length or count written over every offset of every valid encoding is refused
/// without a matching allocation.
#[test]
fn huge_counts_at_every_offset_are_refused_before_allocating() {
    let genuine = genuine();
    for target in ["session_frames", "heartbeat", "dht_record", "receipt"] {
        for seed in s::seeds(target) {
            for at in 1..seed.len() {
                for which in 0..7 {
                    let mut data = seed.clone();
                    overwrite(&mut data, at, &huge_count(which));
                    check(target, &data);
                    assert_authentic(target, &data, &genuine);
                }
            }
        }
    }
    let batch = s::batch();
    let mut paths = Vec::new();
    leaves(
        &serde_json::to_value(&batch).unwrap(),
        String::new(),
        &mut paths,
    );
    for at in 0..paths.len() {
        for which in 0..13 {
            let data = edit_batch(&batch, at, which);
            check("settlement_batch", &data);
            assert_authentic("settlement_batch", &data, &genuine);
        }
    }
}

#[test]
fn frames_claiming_gigabytes_are_refused_before_allocating() {
    // A stream claiming a 4 GiB frame, then one claiming 60 MiB and sending 100 bytes.
    let mut stream = u32::MAX.to_be_bytes().to_vec();
    stream.extend([0u8; 16]);
    let (got, peak) = largest_alloc(|| {
        futures::executor::block_on(read_frame(
            &mut futures::io::Cursor::new(stream),
            s::FRAME_MAX,
        ))
    });
    assert_eq!(got.unwrap_err().kind(), std::io::ErrorKind::InvalidData);
    assert!(peak < 1024, "{peak}");
    let mut stream = (60u32 << 20).to_be_bytes().to_vec();
    stream.extend([0u8; 100]);
    let (got, peak) = largest_alloc(|| {
        futures::executor::block_on(read_frame(&mut futures::io::Cursor::new(stream), 64 << 20))
    });
    assert_eq!(got.unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
    assert!(peak <= 64 << 10, "{peak}");

    // A Forward request whose tensor claims 4 GiB, then 60 MiB (under the frame limit),
    // of data in a frame of a few dozen bytes.
    let forward = s::enc(&s::requests()[1]);
    let data_len_at = forward.len() - s::tensor(wire::WireDType::F32, 4).data.len() - 1;
    for claim in [4u64 << 30, 60 << 20] {
        let mut frame = forward[..data_len_at].to_vec();
        frame.push(253);
        frame.extend(claim.to_le_bytes());
        frame.extend([0u8; 16]);
        let (got, peak) =
            largest_alloc(|| wire::decode::<SessionRequest>(&frame, wire::FRAME_LIMIT));
        assert!(matches!(got, Err(WireError::Decode(_))), "{got:?}");
        assert!(
            peak <= 8 << 10,
            "{claim}-byte claim allocated {peak} bytes at once"
        );
    }

    // A heartbeat whose version string claims just under 1 MiB.
    let good = s::enc(&s::heartbeat(false));
    let version_at = good.windows(6).position(|w| w == b"\x050.1.0").unwrap();
    let mut hb = good[..version_at].to_vec();
    hb.push(252);
    hb.extend((wire::SMALL_LIMIT as u32 - 1).to_le_bytes());
    hb.extend(&good[version_at + 1..]);
    let (accepted, peak) = largest_alloc(|| s::heartbeat_message(&hb));
    assert!(!accepted);
    assert!(
        peak <= 8 << 10,
        "a 1 MiB claim allocated {peak} bytes at once"
    );
}

#[test]
fn batch_files_are_read_and_verified_like_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("batch.json");
    let batch = s::batch();
    batch.write(&path).unwrap();
    let summary = ledger::verify_batch(&path).unwrap();
    assert_eq!((summary.lines, summary.total_due), (3, 240 + 80 + 90));

    // One line's due off by one: the error names that line.
    let mut bad = batch.clone();
    bad.lines[1].due += 1;
    bad.write(&path).unwrap();
    let err = ledger::verify_batch(&path).unwrap_err();
    assert!(
        matches!(err, LedgerError::BatchLine { index: 1, .. }),
        "{err}"
    );

    // Garbage is a JSON error naming the file; a file over the limit is refused unread.
    std::fs::write(&path, b"{\"format\": [[[[").unwrap();
    assert!(matches!(
        ledger::verify_batch(&path),
        Err(LedgerError::Json { .. })
    ));
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(ledger::settle::MAX_BATCH_BYTES + 1).unwrap();
    let (got, peak) = largest_alloc(|| ledger::verify_batch(&path));
    assert!(matches!(got, Err(LedgerError::TooLarge { .. })), "{got:?}");
    assert!(peak < 64 << 10, "{peak}");
}
