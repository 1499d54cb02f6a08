//! What mesh stores in the Kademlia DHT, and how every stored thing is validated.
//!
//! Two kinds of entries (see docs/protocol.md):
//!
//! - **Provider records** under a block key `mesh/blk/1/<model>/<block>`: "this peer serves
//!   block `block` of `model`". The key is readable so a storing peer can check it.
//! - **Server records** (Kademlia values) under `mesh/srv/1/<peer id>`: the server's signed
//!   [`ServerRecord`] with its addresses, whole span and price, or `online: false` once it has
//!   left. A lookup reads the providers of a block, then each provider's server record.
//!
//! Inbound puts are filtered ([`libp2p::kad::StoreInserts::FilterBoth`]): a peer stores only
//! records that pass [`validate_provider`] / [`verify_server_record`]; readers verify again.

use std::time::Duration;

use libp2p::identity::{Keypair, PublicKey};
use libp2p::kad::{ProviderRecord, RecordKey};
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

use crate::types::{BlockRange, ModelId, RemoteSpan};
use crate::wire;

/// Prefix of provider keys: `mesh/blk/1/<model>/<block>`.
pub const BLOCK_KEY_PREFIX: &str = "mesh/blk/1/";
/// Prefix of server-record keys: `mesh/srv/1/<peer id, base58>`.
pub const SERVER_KEY_PREFIX: &str = "mesh/srv/1/";
/// Largest accepted server record value (the signed envelope), in bytes.
pub const MAX_RECORD_BYTES: usize = 4096;
/// Most addresses a record or heartbeat may carry.
pub const MAX_ADDRS: usize = 16;
/// Longest accepted address, in bytes.
pub const MAX_ADDR_BYTES: usize = 256;
/// Largest model (in blocks) mesh accepts in announcements.
pub const MAX_BLOCKS: u32 = 4096;
/// How far in the future a record's expiry may lie (guards against "forever" records).
pub const MAX_RECORD_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Domain separation for server record signatures.
const SIGNING_CONTEXT: &[u8] = b"mesh/srv/1 signed record\n";

/// Why a DHT entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordReject {
    /// The key is not one of mesh's key formats, or names an invalid model/block/peer.
    #[error("unknown or invalid key")]
    BadKey,
    /// The value is larger than [`MAX_RECORD_BYTES`].
    #[error("record of {0} bytes is oversized")]
    Oversized(usize),
    /// The value does not decode.
    #[error("undecodable record")]
    Undecodable,
    /// The signer is not the peer named by the key, or the signature is wrong.
    #[error("bad signature or signer")]
    BadSignature,
    /// A field is out of range (span, model, addresses, times).
    #[error("invalid field: {0}")]
    Invalid(&'static str),
    /// The record has expired.
    #[error("expired")]
    Expired,
}

/// The key under which providers of `block` of `model` are stored.
pub fn block_key(model: &ModelId, block: u32) -> RecordKey {
    RecordKey::new(&format!("{BLOCK_KEY_PREFIX}{model}/{block}"))
}

/// Parses a block key back into its model and block.
pub fn parse_block_key(key: &RecordKey) -> Option<(ModelId, u32)> {
    let s = std::str::from_utf8(key.as_ref()).ok()?;
    let rest = s.strip_prefix(BLOCK_KEY_PREFIX)?;
    let (model, block_str) = rest.rsplit_once('/')?;
    let model = ModelId::new(model);
    let block: u32 = block_str.parse().ok()?;
    // Only the canonical spelling: "+1" or "01" would be a second key for the same block.
    let canonical = block.to_string() == block_str;
    (canonical && model.is_valid() && block < MAX_BLOCKS).then_some((model, block))
}

/// The key of `peer`'s server record.
pub fn server_key(peer: &PeerId) -> RecordKey {
    RecordKey::new(&format!("{SERVER_KEY_PREFIX}{peer}"))
}

/// Parses a server-record key back into its peer id.
pub fn parse_server_key(key: &RecordKey) -> Option<PeerId> {
    let s = std::str::from_utf8(key.as_ref()).ok()?;
    s.strip_prefix(SERVER_KEY_PREFIX)?.parse().ok()
}

/// A server's announcement, stored signed under [`server_key`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRecord {
    /// The server's peer id (bytes); must match the key and the signer.
    pub peer_id: Vec<u8>,
    /// Its addresses as multiaddr bytes, at most [`MAX_ADDRS`].
    pub addrs: Vec<Vec<u8>>,
    pub model: String,
    pub span_start: u32,
    pub span_end: u32,
    pub num_blocks: u32,
    /// Price per token in micro-units.
    pub price_per_token: u64,
    /// False once the server has left cleanly: lookups skip it.
    pub online: bool,
    /// When it was signed, ms since the Unix epoch; newer records win.
    pub issued_ms: u64,
    /// When it stops being valid, ms since the Unix epoch.
    pub expires_ms: u64,
    /// How the span's weights are stored, empty for full precision. Appended: a record
    /// with it empty is encoded without it, byte for byte an older server's record, so
    /// older peers keep reading full-precision servers (and refuse quantized ones, which
    /// they could not tell apart).
    pub quantization: String,
}

#[derive(Serialize, Deserialize)]
struct SignedEnvelope {
    /// The signer's protobuf-encoded libp2p public key.
    public_key: Vec<u8>,
    /// The wire-encoded [`ServerRecord`].
    payload: Vec<u8>,
    signature: Vec<u8>,
}

fn signed_message(payload: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(SIGNING_CONTEXT.len() + payload.len());
    msg.extend_from_slice(SIGNING_CONTEXT);
    msg.extend_from_slice(payload);
    msg
}

/// Encodes and signs `record` with `keypair`.
pub fn sign_server_record(
    keypair: &Keypair,
    record: &ServerRecord,
) -> Result<Vec<u8>, super::P2pError> {
    let payload = wire::encode_trimmed(record, record.quantization.is_empty())?;
    let signature = keypair
        .sign(&signed_message(&payload))
        .map_err(|e| super::P2pError::Signing(e.to_string()))?;
    let envelope = SignedEnvelope {
        public_key: keypair.public().encode_protobuf(),
        payload,
        signature,
    };
    Ok(wire::encode(&envelope)?)
}

/// Checks a server record value found under `key`: size, envelope, signer = key's peer,
/// signature, then every field. Returns the record (which may be `online: false`).
pub fn verify_server_record(
    key: &RecordKey,
    value: &[u8],
    now_ms: u64,
) -> Result<ServerRecord, RecordReject> {
    let peer = parse_server_key(key).ok_or(RecordReject::BadKey)?;
    if value.len() > MAX_RECORD_BYTES {
        return Err(RecordReject::Oversized(value.len()));
    }
    let env: SignedEnvelope =
        wire::decode(value, MAX_RECORD_BYTES).map_err(|_| RecordReject::Undecodable)?;
    let public =
        PublicKey::try_decode_protobuf(&env.public_key).map_err(|_| RecordReject::BadSignature)?;
    if public.to_peer_id() != peer || !public.verify(&signed_message(&env.payload), &env.signature)
    {
        return Err(RecordReject::BadSignature);
    }
    let rec: ServerRecord =
        wire::decode_trimmed(&env.payload, MAX_RECORD_BYTES, |r: &ServerRecord| {
            r.quantization.is_empty()
        })
        .map_err(|_| RecordReject::Undecodable)?;
    if !crate::types::quantization_is_valid(&rec.quantization) {
        return Err(RecordReject::Invalid("quantization"));
    }
    if rec.peer_id != peer.to_bytes() {
        return Err(RecordReject::Invalid("peer id"));
    }
    check_model_span(&rec.model, rec.span_start, rec.span_end, rec.num_blocks)?;
    check_addrs(&rec.addrs)?;
    if rec.expires_ms <= now_ms {
        return Err(RecordReject::Expired);
    }
    if rec.expires_ms > now_ms.saturating_add(MAX_RECORD_LIFETIME.as_millis() as u64) {
        return Err(RecordReject::Invalid("expiry too far in the future"));
    }
    if rec.issued_ms > rec.expires_ms {
        return Err(RecordReject::Invalid("issued after expiry"));
    }
    Ok(rec)
}

/// Checks an inbound provider record: a valid block key and a bounded address list.
pub fn validate_provider(record: &ProviderRecord) -> Result<(), RecordReject> {
    parse_block_key(&record.key).ok_or(RecordReject::BadKey)?;
    if record.addresses.len() > MAX_ADDRS {
        return Err(RecordReject::Invalid("too many addresses"));
    }
    if record
        .addresses
        .iter()
        .any(|a| a.as_ref().len() > MAX_ADDR_BYTES)
    {
        return Err(RecordReject::Invalid("address too long"));
    }
    Ok(())
}

/// Shared range checks for records and heartbeats.
pub(crate) fn check_model_span(
    model: &str,
    start: u32,
    end: u32,
    num_blocks: u32,
) -> Result<(), RecordReject> {
    if !ModelId::new(model).is_valid() {
        return Err(RecordReject::Invalid("model name"));
    }
    if num_blocks == 0 || num_blocks > MAX_BLOCKS || !BlockRange::new(start, end).fits(num_blocks) {
        return Err(RecordReject::Invalid("span"));
    }
    Ok(())
}

/// Shared address checks: bounded count and length, each a parseable multiaddr.
pub(crate) fn check_addrs(addrs: &[Vec<u8>]) -> Result<Vec<Multiaddr>, RecordReject> {
    if addrs.len() > MAX_ADDRS {
        return Err(RecordReject::Invalid("too many addresses"));
    }
    addrs
        .iter()
        .map(|a| {
            if a.len() > MAX_ADDR_BYTES {
                return Err(RecordReject::Invalid("address too long"));
            }
            Multiaddr::try_from(a.clone()).map_err(|_| RecordReject::Invalid("address"))
        })
        .collect()
}

impl ServerRecord {
    /// What a lookup returns for this record (`None` when it is offline or malformed).
    pub fn to_remote_span(&self) -> Option<RemoteSpan> {
        if !self.online {
            return None;
        }
        Some(RemoteSpan {
            peer_id: PeerId::from_bytes(&self.peer_id).ok()?,
            addrs: check_addrs(&self.addrs).ok()?,
            model: ModelId::new(self.model.clone()),
            span: BlockRange::new(self.span_start, self.span_end),
            num_blocks: self.num_blocks,
            price_per_token: self.price_per_token,
            quantization: self.quantization.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kp: &Keypair, now: u64) -> ServerRecord {
        ServerRecord {
            peer_id: kp.public().to_peer_id().to_bytes(),
            addrs: vec!["/ip4/127.0.0.1/tcp/4001"
                .parse::<Multiaddr>()
                .unwrap()
                .to_vec()],
            model: "tiny".into(),
            span_start: 2,
            span_end: 5,
            num_blocks: 8,
            price_per_token: 0,
            online: true,
            issued_ms: now,
            expires_ms: now + 60_000,
            quantization: String::new(),
        }
    }

    /// Today's record without the appended field, as servers before it sign it.
    #[derive(Serialize)]
    struct OlderRecord {
        peer_id: Vec<u8>,
        addrs: Vec<Vec<u8>>,
        model: String,
        span_start: u32,
        span_end: u32,
        num_blocks: u32,
        price_per_token: u64,
        online: bool,
        issued_ms: u64,
        expires_ms: u64,
    }

    #[test]
    fn quantization_is_carried_and_older_records_still_verify() {
        let kp = Keypair::generate_ed25519();
        let now = 1_700_000_000_000;
        let key = server_key(&kp.public().to_peer_id());
        let mut rec = record(&kp, now);
        rec.quantization = "q4k".into();
        let value = sign_server_record(&kp, &rec).unwrap();
        let back = verify_server_record(&key, &value, now).unwrap();
        assert_eq!(back.to_remote_span().unwrap().quantization, "q4k");

        // A full-precision record is byte for byte what an older server signs, and an
        // older server's record reads as full precision.
        let r = record(&kp, now);
        let older = OlderRecord {
            peer_id: r.peer_id.clone(),
            addrs: r.addrs.clone(),
            model: r.model.clone(),
            span_start: r.span_start,
            span_end: r.span_end,
            num_blocks: r.num_blocks,
            price_per_token: r.price_per_token,
            online: r.online,
            issued_ms: r.issued_ms,
            expires_ms: r.expires_ms,
        };
        assert_eq!(
            wire::encode(&older).unwrap(),
            wire::encode_trimmed(&r, true).unwrap()
        );
        let value = sign_server_record(&kp, &r).unwrap();
        assert_eq!(verify_server_record(&key, &value, now).unwrap(), r);

        rec.quantization = "x".repeat(crate::types::MAX_QUANTIZATION_LEN + 1);
        let value = sign_server_record(&kp, &rec).unwrap();
        assert_eq!(
            verify_server_record(&key, &value, now),
            Err(RecordReject::Invalid("quantization"))
        );
    }

    #[test]
    fn keys_roundtrip_and_reject_junk() {
        let m = ModelId::new("org/model-7b");
        assert_eq!(parse_block_key(&block_key(&m, 7)), Some((m.clone(), 7)));
        let p = PeerId::random();
        assert_eq!(parse_server_key(&server_key(&p)), Some(p));
        for junk in [
            "mesh/blk/1/",
            "mesh/blk/1/m/",
            "mesh/blk/1/m/x",
            "mesh/blk/1/m/+1",
            "mesh/blk/1/m/99999",
            "mesh/blk/1//1",
            "other/1",
        ] {
            assert_eq!(parse_block_key(&RecordKey::new(&junk)), None, "{junk}");
        }
        assert_eq!(parse_server_key(&RecordKey::new(&"mesh/srv/1/xyz")), None);
    }

    #[test]
    fn signed_record_verifies_and_tampering_is_rejected() {
        let kp = Keypair::generate_ed25519();
        let now = 1_700_000_000_000;
        let rec = record(&kp, now);
        let key = server_key(&kp.public().to_peer_id());
        let value = sign_server_record(&kp, &rec).unwrap();
        assert_eq!(verify_server_record(&key, &value, now).unwrap(), rec);

        // Wrong key (another peer's slot).
        let other = server_key(&PeerId::random());
        assert_eq!(
            verify_server_record(&other, &value, now),
            Err(RecordReject::BadSignature)
        );
        // Flipped byte anywhere: never accepted, never panics.
        for i in 0..value.len() {
            let mut v = value.clone();
            v[i] ^= 0x55;
            assert!(verify_server_record(&key, &v, now).is_err());
        }
        // Oversized and garbage.
        assert_eq!(
            verify_server_record(&key, &vec![1u8; MAX_RECORD_BYTES + 1], now),
            Err(RecordReject::Oversized(MAX_RECORD_BYTES + 1))
        );
        assert_eq!(
            verify_server_record(&key, b"\x01garbage", now),
            Err(RecordReject::Undecodable)
        );
        // Expired.
        assert_eq!(
            verify_server_record(&key, &value, now + 61_000),
            Err(RecordReject::Expired)
        );
        // Properly signed but impossible span.
        let mut bad = rec.clone();
        bad.span_end = 9;
        let v = sign_server_record(&kp, &bad).unwrap();
        assert_eq!(
            verify_server_record(&key, &v, now),
            Err(RecordReject::Invalid("span"))
        );
    }
}
