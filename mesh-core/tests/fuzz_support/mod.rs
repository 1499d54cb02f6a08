//! Oracles (and, in `samples`, valid inputs) shared by the proptest harness
//! (`tests/fuzz_decoders.rs`) and the cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`, which
//! include this file by path), so both harnesses check the same properties.
//!
//! An oracle takes one input in its target's format, runs it through the same decoding and
//! checks a peer runs on untrusted bytes, and panics only when a property is broken: an
//! accepted value that should have been refused, an error of the wrong kind, a value that
//! does not survive re-encoding. It returns whether the input was accepted all the way.
//!
//! Input formats (the first byte picks the decoder where a family has several):
//! - `session_frames`: `0` `SessionRequest` frame body, `1` `SessionResponse` frame body,
//!   `2` a length-prefixed stream for `read_frame` holding a request, `3` a `WireTensor`.
//! - `heartbeat`: the gossip message bytes.
//! - `dht_record`: `0` a signed server record value, `1` a DHT key, `2` a `ServerRecord`
//!   that the oracle signs with the right key, so the field checks behind the signature
//!   are reachable.
//! - `receipt`: `0` wire `SignedReceipt`, `1` JSON `SignedReceipt`, `2` wire `Receipt` that
//!   the oracle signs and countersigns.
//! - `settlement_batch`: a batch file's JSON.
#![allow(dead_code)]

mod samples;

pub use samples::*;

use candle_core::Device;
use futures::io::Cursor;
use libp2p::kad::{ProviderRecord, RecordKey};
use mesh_core::ledger::{Batch, ClientTally, LedgerError, Receipt, SignedReceipt};
use mesh_core::p2p::codec::read_frame;
use mesh_core::p2p::dht::{self, RecordReject, ServerRecord};
use mesh_core::p2p::heartbeat::{self, Heartbeat};
use mesh_core::pipeline::{SessionRequest, SessionResponse, StepInput};
use mesh_core::wire::{self, TensorFrameError, WireDType, WireError, WireTensor};
use mesh_core::{BlockRange, ModelId};

/// Runs `data` through the oracle of `target`.
pub fn run(target: &str, data: &[u8]) -> bool {
    match target {
        "session_frames" => session_frames(data),
        "heartbeat" => heartbeat_message(data),
        "dht_record" => dht_record(data),
        "receipt" => receipt(data),
        "settlement_batch" => settlement_batch(data),
        other => panic!("no fuzz target {other}"),
    }
}

/// A decoded value must re-encode to bytes that decode to the same bytes again.
fn assert_stable<T: serde::Serialize + serde::de::DeserializeOwned>(value: &T, max: usize) {
    let once = wire::encode(value).expect("a decoded value re-encodes");
    let back: T = wire::decode(&once, max.max(once.len())).expect("re-encoded value decodes");
    assert_eq!(
        wire::encode(&back).expect("re-encodes"),
        once,
        "unstable encoding"
    );
}

/// A decode error must be one a decoder can give (never an encode error), and printable.
fn assert_decode_error(e: &WireError) {
    assert!(!matches!(e, WireError::Encode(_)), "decode gave {e:?}");
    assert!(!e.to_string().is_empty());
}

// ---------------------------------------------------------------------------------------
// session_frames
// ---------------------------------------------------------------------------------------

pub fn session_frames(data: &[u8]) -> bool {
    let Some((&selector, body)) = data.split_first() else {
        return false;
    };
    match selector % 4 {
        0 => request_frame(body),
        1 => response_frame(body),
        2 => length_prefixed(body),
        _ => match wire::decode::<WireTensor>(body, wire::FRAME_LIMIT) {
            Ok(t) => {
                assert_stable(&t, wire::FRAME_LIMIT);
                tensor_ok(&t)
            }
            Err(e) => {
                assert_decode_error(&e);
                false
            }
        },
    }
}

fn request_frame(body: &[u8]) -> bool {
    let req = match wire::decode::<SessionRequest>(body, wire::FRAME_LIMIT) {
        Ok(req) => req,
        Err(e) => {
            assert_decode_error(&e);
            return false;
        }
    };
    assert_stable(&req, wire::FRAME_LIMIT);
    match &req {
        SessionRequest::Forward { hidden, .. }
        | SessionRequest::Rewind { hidden, .. }
        | SessionRequest::Push { hidden, .. }
        | SessionRequest::Step {
            input: StepInput::Hidden(hidden),
            ..
        } => tensor_ok(hidden),
        SessionRequest::Step {
            input: StepInput::PushedBy(_),
            ..
        } => true,
        SessionRequest::Countersigned { receipt } => signed_receipt_ok(receipt, true),
        SessionRequest::Open { .. } | SessionRequest::Close { .. } => true,
    }
}

fn response_frame(body: &[u8]) -> bool {
    let resp = match wire::decode::<SessionResponse>(body, wire::FRAME_LIMIT) {
        Ok(resp) => resp,
        Err(e) => {
            assert_decode_error(&e);
            return false;
        }
    };
    assert_stable(&resp, wire::FRAME_LIMIT);
    match &resp {
        SessionResponse::Hidden {
            session,
            hidden,
            receipt,
            attestation,
            ..
        } => {
            let tensor = tensor_ok(hidden);
            let receipt = receipt.as_ref().is_none_or(|r| signed_receipt_ok(r, false));
            // Without the step's input only the signature over the digests can be checked.
            let attested = attestation
                .as_ref()
                .is_none_or(|a| a.verify_digests(&server().peer_id(), session, 3).is_ok());
            tensor && receipt && attested
        }
        SessionResponse::Closed { receipt, .. } => {
            receipt.as_ref().is_none_or(|r| signed_receipt_ok(r, false))
        }
        SessionResponse::Opened { .. }
        | SessionResponse::Acknowledged
        | SessionResponse::Refused(_) => true,
    }
}

fn length_prefixed(stream: &[u8]) -> bool {
    let got = futures::executor::block_on(read_frame(&mut Cursor::new(stream), FRAME_MAX));
    let claimed = stream
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
    match got {
        Ok(frame) => {
            let claimed = claimed.expect("a frame has a length prefix");
            assert!(claimed <= FRAME_MAX, "frame over the limit accepted");
            assert_eq!(
                frame,
                stream[4..4 + claimed],
                "frame is not the claimed bytes"
            );
            request_frame(&frame)
        }
        Err(e) => {
            use std::io::ErrorKind;
            match claimed {
                Some(n) if n > FRAME_MAX => assert_eq!(e.kind(), ErrorKind::InvalidData),
                _ => assert_eq!(e.kind(), ErrorKind::UnexpectedEof, "{e}"),
            }
            false
        }
    }
}

/// `to_tensor` accepts exactly the frames whose header matches their bytes, and what it
/// accepts converts back to the same frame.
fn tensor_ok(t: &WireTensor) -> bool {
    let size = match t.dtype {
        WireDType::F32 => 4,
        WireDType::F16 | WireDType::BF16 => 2,
    };
    let shape_ok =
        !t.shape.is_empty() && t.shape.len() <= wire::MAX_TENSOR_RANK && !t.shape.contains(&0);
    let expected = t
        .shape
        .iter()
        .try_fold(size, |acc: usize, &d| acc.checked_mul(d as usize));
    match t.to_tensor(&Device::Cpu) {
        Ok(tensor) => {
            assert!(shape_ok && expected == Some(t.data.len()), "{t:?} accepted");
            let back = WireTensor::from_tensor(&tensor).expect("a float tensor converts back");
            assert_eq!(&back, t, "tensor did not round-trip");
            true
        }
        Err(TensorFrameError::BadShape(_)) => {
            assert!(!shape_ok || expected.is_none());
            false
        }
        Err(TensorFrameError::LengthMismatch { .. }) => {
            assert!(shape_ok && expected != Some(t.data.len()));
            false
        }
        Err(other) => panic!("to_tensor gave {other:?} for {:?}", t.shape),
    }
}

// ---------------------------------------------------------------------------------------
// receipts
// ---------------------------------------------------------------------------------------

/// Verifies a received receipt; what verifies is consistent and printable errors otherwise.
fn signed_receipt_ok(r: &SignedReceipt, need_countersigned: bool) -> bool {
    let result = if need_countersigned {
        r.verify_countersigned()
    } else {
        r.verify()
    };
    match result {
        Ok(()) => {
            r.receipt
                .check()
                .expect("a verified receipt passes its own checks");
            assert!(r.receipt.terms.amount_for(r.receipt.tokens()).ok() == Some(r.receipt.amount));
            true
        }
        Err(e) => {
            assert_ledger_error(&e);
            false
        }
    }
}

fn assert_ledger_error(e: &LedgerError) {
    assert!(
        !matches!(e, LedgerError::Io { .. } | LedgerError::Store(_)),
        "decoding gave {e:?}"
    );
    assert!(!e.to_string().is_empty());
}

pub fn receipt(data: &[u8]) -> bool {
    let Some((&selector, body)) = data.split_first() else {
        return false;
    };
    match selector % 3 {
        0 => match wire::decode::<SignedReceipt>(body, wire::SMALL_LIMIT) {
            Ok(r) => {
                assert_stable(&r, wire::SMALL_LIMIT);
                signed_receipt_ok(&r, false)
            }
            Err(e) => {
                assert_decode_error(&e);
                false
            }
        },
        1 => match serde_json::from_slice::<SignedReceipt>(body) {
            Ok(r) => {
                let json = serde_json::to_vec(&r).expect("re-encodes");
                let back: SignedReceipt = serde_json::from_slice(&json).expect("re-decodes");
                assert_eq!(back, r, "JSON receipt did not round-trip");
                signed_receipt_ok(&r, false)
            }
            Err(_) => false,
        },
        _ => match wire::decode::<Receipt>(body, wire::SMALL_LIMIT) {
            Ok(r) => sign_and_countersign(r),
            Err(e) => {
                assert_decode_error(&e);
                false
            }
        },
    }
}

/// Any receipt that passes `check` can be signed by its server and verifies; any other is
/// refused by `sign`. Small ones are countersigned by a tally of exactly their tokens.
fn sign_and_countersign(r: Receipt) -> bool {
    let checked = r.check();
    let ours = r.terms.server == server().peer_id();
    match r.clone().sign(&server().signing_key()) {
        Ok(mut signed) => {
            assert!(checked.is_ok() && ours, "sign accepted {r:?}");
            signed.verify_server().expect("a fresh signature verifies");
            if r.terms.client != client().peer_id() || r.prefill_tokens == 1 || r.decode_tokens > 64
            {
                return true;
            }
            let mut tally = ClientTally::new(r.terms.clone());
            tally.record_positions(r.prefill_tokens);
            for _ in 0..r.decode_tokens {
                tally.record_positions(1);
            }
            signed
                .countersign(&client().signing_key(), &tally)
                .expect("the tally covers the receipt");
            signed
                .verify_countersigned()
                .expect("countersigned verifies");
            true
        }
        Err(e) => {
            assert!(
                checked.is_err() || !ours,
                "sign refused a valid receipt: {e}"
            );
            assert_ledger_error(&e);
            false
        }
    }
}

// ---------------------------------------------------------------------------------------
// gossip heartbeats
// ---------------------------------------------------------------------------------------

pub fn heartbeat_message(data: &[u8]) -> bool {
    let topic = heartbeat::topic(&model()).hash();
    let source = server().peer_id();
    if let Ok(hb) = wire::decode::<Heartbeat>(data, heartbeat::MAX_HEARTBEAT_BYTES) {
        assert_stable(&hb, heartbeat::MAX_HEARTBEAT_BYTES);
    }
    match heartbeat::validate(data, &topic, Some(source), NOW_MS, SKEW) {
        Ok(v) => {
            let info = &v.info;
            assert_eq!(info.peer_id, source);
            assert_eq!(info.model, model());
            assert!(info.span.fits(info.num_blocks) && info.num_blocks <= dht::MAX_BLOCKS);
            assert!(info.addrs.len() <= dht::MAX_ADDRS);
            assert!(info.version.len() <= heartbeat::MAX_VERSION_LEN);
            assert!((heartbeat::MIN_INTERVAL..=heartbeat::MAX_INTERVAL).contains(&info.interval));
            assert!(info.capability.is_valid());
            assert!(mesh_core::types::GpuLive::list_is_valid(&info.gpu_live));
            let skew = SKEW.as_millis() as u64;
            assert!(info.timestamp_ms.abs_diff(NOW_MS) <= skew);
            for x in [info.load.throughput_tps, info.load.load] {
                assert!(x.is_finite() && x >= 0.0);
            }
            true
        }
        Err(heartbeat::Reject::Oversized) => {
            assert!(data.len() > heartbeat::MAX_HEARTBEAT_BYTES);
            false
        }
        Err(_) => {
            assert!(data.len() <= heartbeat::MAX_HEARTBEAT_BYTES);
            false
        }
    }
}

// ---------------------------------------------------------------------------------------
// DHT records
// ---------------------------------------------------------------------------------------

pub fn dht_record(data: &[u8]) -> bool {
    let Some((&selector, body)) = data.split_first() else {
        return false;
    };
    match selector % 3 {
        0 => match dht::verify_server_record(&record_key(), body, NOW_MS) {
            Ok(rec) => {
                record_ok(&rec);
                true
            }
            Err(RecordReject::Oversized(n)) => {
                assert!(n > dht::MAX_RECORD_BYTES && n == body.len());
                false
            }
            Err(RecordReject::BadKey) => panic!("a valid key refused"),
            Err(_) => false,
        },
        1 => key_ok(body),
        _ => {
            let Ok(rec) = wire::decode::<ServerRecord>(body, dht::MAX_RECORD_BYTES) else {
                return false;
            };
            let Ok(value) = dht::sign_server_record(&server().keypair(), &rec) else {
                return false;
            };
            match dht::verify_server_record(&record_key(), &value, NOW_MS) {
                Ok(back) => {
                    assert_eq!(back, rec);
                    record_ok(&back);
                    true
                }
                Err(
                    RecordReject::BadKey | RecordReject::BadSignature | RecordReject::Undecodable,
                ) => panic!("a record signed by its own key was refused as forged"),
                Err(_) => false,
            }
        }
    }
}

/// What `verify_server_record` accepts is the key's peer's, in range and not expired.
fn record_ok(rec: &ServerRecord) {
    assert_eq!(rec.peer_id, server().peer_id().to_bytes());
    assert!(ModelId::new(rec.model.clone()).is_valid());
    let span = BlockRange::new(rec.span_start, rec.span_end);
    assert!(span.fits(rec.num_blocks) && rec.num_blocks <= dht::MAX_BLOCKS);
    assert!(rec.addrs.len() <= dht::MAX_ADDRS);
    assert!(rec.expires_ms > NOW_MS);
    assert!(rec.expires_ms - NOW_MS <= dht::MAX_RECORD_LIFETIME.as_millis() as u64);
    assert!(rec.issued_ms <= rec.expires_ms);
    assert_eq!(rec.to_remote_span().is_some(), rec.online);
}

/// A key parses only in its canonical spelling: one block or peer has exactly one key.
fn key_ok(bytes: &[u8]) -> bool {
    let key = RecordKey::new(&bytes);
    let block = dht::parse_block_key(&key);
    if let Some((model, b)) = &block {
        assert!(model.is_valid() && *b < dht::MAX_BLOCKS);
        assert_eq!(
            dht::block_key(model, *b),
            key,
            "non-canonical block key accepted"
        );
    }
    let peer = dht::parse_server_key(&key);
    if let Some(p) = &peer {
        assert_eq!(dht::server_key(p), key, "non-canonical server key accepted");
    }
    let provider = ProviderRecord::new(key, server().peer_id(), vec![]);
    assert_eq!(dht::validate_provider(&provider).is_ok(), block.is_some());
    block.is_some() || peer.is_some()
}

// ---------------------------------------------------------------------------------------
// settlement batches
// ---------------------------------------------------------------------------------------

/// Parses a batch file's bytes as `Batch::read` does and verifies it; what verifies adds up.
pub fn settlement_batch(data: &[u8]) -> bool {
    let Ok(batch) = serde_json::from_slice::<Batch>(data) else {
        return false;
    };
    let back: Batch =
        serde_json::from_slice(&batch_json(&batch)).expect("a parsed batch re-parses");
    assert_eq!(back, batch, "batch did not round-trip");
    match batch.verify() {
        Ok(summary) => {
            assert_eq!(summary.payee, batch.payee);
            assert_eq!(summary.lines, batch.lines.len());
            assert_eq!(summary.total_due, batch.total_due);
            assert_eq!(summary.payers, batch.payers);
            let mut sum = 0u64;
            for line in &batch.lines {
                line.receipt
                    .verify_countersigned()
                    .expect("every line verifies");
                assert_eq!(line.receipt.receipt.amount - line.already_settled, line.due);
                sum += line.due;
            }
            assert_eq!(sum, batch.total_due);
            true
        }
        Err(e) => {
            assert_ledger_error(&e);
            false
        }
    }
}
