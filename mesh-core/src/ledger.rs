//! Signed contribution receipts, the local ledger, and settlement batches.
//!
//! Every piece of work a server does for a client is paid for by a receipt both sides sign
//! and keep; there is no coordinator.
//!
//! - [`receipt`]: [`Terms`] (what was agreed when a hop opened), [`Receipt`] (work done so far
//!   under those terms), [`SignedReceipt`] (server signature, then the client's countersign),
//!   the server's [`Meter`] that issues a running receipt every N tokens, and the client's
//!   [`ClientTally`] that checks a receipt against the work it actually got.
//! - [`store`]: [`Store`], the sled database each peer keeps: receipts by session, peer and
//!   time, totals per peer, what was settled. Every write is flushed before it returns.
//! - [`settle`](mod@settle): earnings by day and model, unpaid amounts per client, and settlement
//!   [`Batch`]es: JSON files anyone can verify offline with [`verify_batch`].
//!
//! # Money
//! Amounts are `u64` micro-units (millionths of the ledger's unit). A server announces a
//! `price_per_token`, meaning *per token per block*: one position run through one block.
//! A receipt's amount is exactly
//! `(prefill_tokens + decode_tokens) × span.len() × price_per_token`, with checked
//! arithmetic (an overflow is an error, never a wrap), and every verifier recomputes it.
//!
//! # Flow
//! ```
//! use mesh_core::identity::Identity;
//! use mesh_core::ledger::{self, ClientTally, ConfigHash, Meter, SettleOptions, Store, Terms};
//! use mesh_core::{BlockRange, ModelId, SessionId};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (server, client) = (Identity::generate(), Identity::generate());
//! let terms = Terms {
//!     session: SessionId::random(),
//!     client: client.peer_id(),
//!     server: server.peer_id(),
//!     model: ModelId::new("tiny-llama-mesh"),
//!     config_hash: ConfigHash::of_json(br#"{"hidden_size":128}"#)?,
//!     span: BlockRange::new(0, 4),
//!     price_per_token: 5,
//! };
//! // The client opens the hop, remembers it, and counts what it sends.
//! let dir = tempfile::tempdir()?;
//! let client_store = Store::open(&dir.path().join("client.db"))?;
//! client_store.record_opened(&terms)?;
//! let mut tally = ClientTally::new(terms.clone());
//! tally.record_positions(7); // the prompt, one prefill step
//!
//! // The server meters the same work and signs a running receipt.
//! let mut meter = Meter::new(terms, 1_000, 4)?;
//! let receipt = meter.observe(7, 0, 2_000)?.expect("7 tokens >= every 4");
//! let signed = receipt.sign(&server.signing_key())?;
//!
//! // The client checks it against its tally, countersigns and keeps it.
//! let countersigned = client_store.accept_as_client(signed, &tally, &client.signing_key())?;
//! assert_eq!(countersigned.receipt.amount, 7 * 4 * 5);
//! countersigned.verify_countersigned()?;
//!
//! // The server keeps it (sending it back is the pipeline's job), settles, and anyone can
//! // check the batch file offline.
//! let server_store = Store::open(&dir.path().join("server.db"))?;
//! server_store.put(&countersigned)?;
//! let opts = SettleOptions {
//!     payee: server.peer_id(),
//!     since_ms: 0,
//!     min_amount: 10,
//!     dry_run: false,
//!     now_ms: ledger::now_ms(),
//! };
//! let file = dir.path().join("batch.json");
//! ledger::settle(&server_store, &opts, &file)?;
//! assert_eq!(ledger::verify_batch(&file)?.total_due, 140);
//! # Ok(()) }
//! ```

pub mod attestation;
pub mod receipt;
pub mod reputation;
pub mod settle;
pub mod store;

use std::path::PathBuf;

use ed25519_dalek::VerifyingKey;
use libp2p::PeerId;

use crate::types::SessionId;

pub use attestation::Attestation;
pub use receipt::{
    ClientTally, ConfigHash, Meter, Receipt, Role, Sig, SignedReceipt, Terms, RECEIPT_VERSION,
};
pub use reputation::{Evidence, Outcome, PeerRecord, Reference, Reputation};
pub use settle::{
    earnings, plan, settle, unpaid_by_client, unpaid_of, verify_batch, Batch, BatchLine,
    BatchSummary, EarningsRow, PayerTotal, SettleOptions, Unpaid,
};
pub use store::{Audit, Entry, PeerTotals, Put, Settled, Store, StoreError, MARK_FILE};

/// Why a receipt, the ledger or a settlement batch was refused.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The peer id does not embed an ed25519 public key (e.g. a hashed RSA key).
    #[error("peer {0} has no inline ed25519 key")]
    NotEd25519(PeerId),
    /// The signing key is not the key of the peer that must sign.
    #[error("the {role} key given is not {expected}'s key")]
    WrongKey { role: Role, expected: PeerId },
    /// A signature does not verify: a field changed, or another key signed.
    #[error("{role} signature does not verify (a field was changed or another key signed)")]
    BadSignature { role: Role },
    /// The receipt has no client countersignature where one is needed.
    #[error("receipt is not countersigned by the client")]
    NotCountersigned,
    /// The receipt's format version is not [`RECEIPT_VERSION`].
    #[error("receipt version {found}, expected {expected}")]
    Version { found: u16, expected: u16 },
    /// A field is out of range (empty span, end before start, invalid model name, ...).
    #[error("invalid receipt: {0}")]
    Invalid(&'static str),
    /// The stated amount is not tokens × blocks × price.
    #[error("amount {stated} does not match tokens x blocks x price = {computed}")]
    AmountMismatch { stated: u64, computed: u64 },
    /// tokens × blocks × price does not fit in a `u64`.
    #[error("amount overflows u64")]
    Overflow,
    /// A receipt's terms differ from what the client agreed to when it opened the hop.
    #[error("receipt's {field} differs from the session's terms")]
    TermsMismatch { field: &'static str },
    /// A receipt claims more tokens than the client sent.
    #[error("receipt claims {claimed} {kind} tokens, the client sent {sent}")]
    MoreThanSent {
        kind: &'static str,
        claimed: u64,
        sent: u64,
    },
    /// A receipt with this sequence number (or a later one) is already stored.
    #[error("replay: session {session} already has seq {highest}, got {seq}")]
    Replay {
        session: SessionId,
        seq: u64,
        highest: u64,
    },
    /// An update goes backwards (fewer tokens, another start time) from the stored one.
    #[error("update of session {session} is not monotonic: {detail}")]
    NotMonotonic {
        session: SessionId,
        detail: &'static str,
    },
    /// The client never opened this session with this server.
    #[error("session {0} was never opened by this client")]
    UnknownSession(SessionId),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A batch file is not valid JSON of a batch.
    #[error("{path}: not a settlement batch: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A JSON document (model config, batch) could not be parsed or written.
    #[error("json: {0}")]
    BadJson(#[from] serde_json::Error),
    /// A file or collection is over its bound.
    #[error("{what} is {len}, over the limit of {max}")]
    TooLarge {
        what: &'static str,
        len: u64,
        max: u64,
    },
    /// One line of a settlement batch is wrong; `index` counts from 0.
    #[error("batch line {index} (session {session}, client {client}): {source}")]
    BatchLine {
        index: usize,
        session: SessionId,
        client: PeerId,
        #[source]
        source: Box<LedgerError>,
    },
    /// A batch's header or totals are wrong.
    #[error("batch: {0}")]
    Batch(String),
    /// The sled store failed or holds something it should not.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Canonical bytes could not be produced.
    #[error(transparent)]
    Wire(#[from] crate::wire::WireError),
}

/// The ed25519 key that signs for `peer`, read from the peer id itself.
///
/// libp2p peer ids of ed25519 keys are an identity multihash of the protobuf-encoded public
/// key, so a receipt names its signers and verification needs nothing else.
pub fn verifying_key_of(peer: &PeerId) -> Result<VerifyingKey, LedgerError> {
    let not_ed = || LedgerError::NotEd25519(*peer);
    let mh = peer.as_ref();
    // 0x00 is the identity multihash: the digest is the key itself.
    if mh.code() != 0x00 {
        return Err(not_ed());
    }
    let key = libp2p::identity::PublicKey::try_decode_protobuf(mh.digest())
        .map_err(|_| not_ed())?
        .try_into_ed25519()
        .map_err(|_| not_ed())?;
    VerifyingKey::from_bytes(&key.to_bytes()).map_err(|_| not_ed())
}

/// Milliseconds since the Unix epoch now (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `YYYY-MM-DD` (UTC) of a time in ms since the Unix epoch.
pub fn utc_day(ms: u64) -> String {
    // Howard Hinnant's days-to-civil algorithm.
    let days = (ms / 86_400_000) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Lower-case hex, and serde helpers that write byte arrays and ids as hex strings.
pub(crate) mod hex {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn encode(bytes: &[u8]) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            s.push(char::from(DIGITS[usize::from(b >> 4)]));
            s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
        }
        s
    }

    pub fn decode<const N: usize>(s: &str) -> Option<[u8; N]> {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let bytes = s.as_bytes();
        if bytes.len() != N * 2 {
            return None;
        }
        let mut out = [0u8; N];
        for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            *o = (digit(pair[0])? << 4) | digit(pair[1])?;
        }
        Some(out)
    }

    pub fn serialize<S: Serializer, const N: usize>(
        bytes: &[u8; N],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<[u8; N], D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        decode(&s).ok_or_else(|| {
            serde::de::Error::custom(format!("expected {} lower-case hex digits", N * 2))
        })
    }

    /// A [`crate::types::SessionId`] as 32 hex digits.
    pub mod session {
        use super::*;
        use crate::types::SessionId;

        pub fn serialize<S: Serializer>(id: &SessionId, s: S) -> Result<S::Ok, S::Error> {
            super::serialize(&id.0, s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SessionId, D::Error> {
            super::deserialize(d).map(SessionId)
        }
    }

    /// A libp2p `PeerId` as its base58 string.
    pub mod peer {
        use super::*;
        use libp2p::PeerId;

        pub fn serialize<S: Serializer>(id: &PeerId, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&id.to_base58())
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PeerId, D::Error> {
            let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
            if s.len() > 128 {
                return Err(serde::de::Error::custom("peer id too long"));
            }
            s.parse()
                .map_err(|e| serde::de::Error::custom(format!("bad peer id {s:?}: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_hex() {
        assert_eq!(utc_day(0), "1970-01-01");
        assert_eq!(utc_day(951_782_400_000), "2000-02-29");
        assert_eq!(utc_day(1_735_689_599_999), "2024-12-31");
        let h = hex::encode(&[0x00, 0xab, 0xff]);
        assert_eq!(h, "00abff");
        assert_eq!(hex::decode::<3>(&h), Some([0x00, 0xab, 0xff]));
        assert_eq!(hex::decode::<3>("00ABff"), None);
        assert_eq!(hex::decode::<2>(&h), None);
    }

    #[test]
    fn verifying_key_comes_from_the_peer_id() {
        let id = crate::identity::Identity::generate();
        let vk = verifying_key_of(&id.peer_id()).unwrap();
        assert_eq!(vk, id.signing_key().verifying_key());
        assert!(matches!(
            verifying_key_of(&PeerId::random()),
            Err(LedgerError::NotEd25519(_))
        ));
    }
}
