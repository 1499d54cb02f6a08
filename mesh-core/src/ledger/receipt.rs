//! Receipts: what a server did for a client, signed by the server and countersigned by the
//! client.
//!
//! # Signing bytes
//! The server signs `b"mesh-receipt-v1\0" ‖ RECEIPT_VERSION (u16 LE) ‖ canonical(receipt)`;
//! the client signs `b"mesh-receipt-client-v1\0" ‖ RECEIPT_VERSION (u16 LE) ‖
//! canonical(receipt) ‖ server signature (64 bytes)`, where `canonical` is
//! [`crate::wire::canonical`] (bincode, fixed-width little-endian integers). The two roles
//! use different prefixes so a signature made in one role never passes for the other, and
//! the countersignature covers the server's signature as well as every field.
//!
//! # Incremental receipts
//! A session's hop gets a new receipt every N tokens (and one when it ends), each with the
//! next sequence number and the running totals since the session opened. The newest one
//! supersedes the others, so a server cut off mid-session holds a receipt for all but at
//! most N tokens of its work, and a client never signs for tokens it did not send.

use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{hex, verifying_key_of, LedgerError};
use crate::types::{BlockRange, ModelId, SessionId};
use crate::wire;

/// Version of the receipt format and of its signing bytes.
pub const RECEIPT_VERSION: u16 = 1;

/// Prefix of the bytes a server signs.
pub const SERVER_DOMAIN: &[u8] = b"mesh-receipt-v1\0";

/// Prefix of the bytes a client countersigns.
pub const CLIENT_DOMAIN: &[u8] = b"mesh-receipt-client-v1\0";

/// Longest JSON config [`ConfigHash::of_json`] reads.
pub const MAX_CONFIG_JSON: usize = 1 << 20;

/// Who signs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Server => "server",
            Role::Client => "client",
        })
    }
}

/// SHA-256 of a model's `config.json` in canonical form (keys sorted, no whitespace), so a
/// receipt names exactly which architecture ran, whatever the file's formatting.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConfigHash(#[serde(with = "hex")] pub [u8; 32]);

impl ConfigHash {
    /// Hash of a config given as JSON bytes (at most [`MAX_CONFIG_JSON`]).
    pub fn of_json(json: &[u8]) -> Result<Self, LedgerError> {
        if json.len() > MAX_CONFIG_JSON {
            return Err(LedgerError::TooLarge {
                what: "config json",
                len: json.len() as u64,
                max: MAX_CONFIG_JSON as u64,
            });
        }
        let value: serde_json::Value = serde_json::from_slice(json)?;
        Ok(Self::of_value(&value))
    }

    /// Hash of a config value (e.g. `model::LlamaConfig`), through its JSON form.
    pub fn of<T: Serialize>(config: &T) -> Result<Self, LedgerError> {
        Ok(Self::of_value(&serde_json::to_value(config)?))
    }

    fn of_value(value: &serde_json::Value) -> Self {
        let mut canonical = String::new();
        write_canonical_json(value, &mut canonical);
        Self(Sha256::digest(canonical.as_bytes()).into())
    }
}

impl fmt::Debug for ConfigHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConfigHash({})", hex::encode(&self.0))
    }
}

impl fmt::Display for ConfigHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0))
    }
}

/// Compact JSON with object keys in byte order, recursively. (serde_json already bounds the
/// nesting depth when parsing.)
fn write_canonical_json(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                if let Some(v) = map.get(k) {
                    write_canonical_json(v, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical_json(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// An ed25519 signature, written as 128 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sig(#[serde(with = "hex")] pub [u8; 64]);

impl fmt::Debug for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sig({}…)", hex::encode(&self.0[..8]))
    }
}

/// What client and server agreed when the client opened a session on the server's span.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Terms {
    /// The hop's session id (each hop of a client's chain has its own).
    #[serde(with = "hex::session")]
    pub session: SessionId,
    /// Who pays.
    #[serde(with = "hex::peer")]
    pub client: PeerId,
    /// Who did the work and signs the receipt.
    #[serde(with = "hex::peer")]
    pub server: PeerId,
    pub model: ModelId,
    /// [`ConfigHash`] of the model's config.
    pub config_hash: ConfigHash,
    /// Blocks `[start, end)` the server ran for this session.
    pub span: BlockRange,
    /// Micro-units per token per block, as the server announced it.
    pub price_per_token: u64,
}

impl Terms {
    /// The amount owed for `tokens` positions through every block of the span:
    /// `tokens × span.len() × price_per_token`, or [`LedgerError::Overflow`].
    pub fn amount_for(&self, tokens: u64) -> Result<u64, LedgerError> {
        tokens
            .checked_mul(u64::from(self.span.len()))
            .and_then(|t| t.checked_mul(self.price_per_token))
            .ok_or(LedgerError::Overflow)
    }

    fn check(&self) -> Result<(), LedgerError> {
        if self.span.is_empty() {
            return Err(LedgerError::Invalid("empty block span"));
        }
        if !self.model.is_valid() {
            return Err(LedgerError::Invalid("model id"));
        }
        if self.client == self.server {
            return Err(LedgerError::Invalid("client and server are the same peer"));
        }
        Ok(())
    }
}

/// Work done under [`Terms`] so far: the part both sides sign.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// [`RECEIPT_VERSION`].
    pub version: u16,
    pub terms: Terms,
    /// Positions run in multi-position (prompt) steps since the session opened.
    pub prefill_tokens: u64,
    /// Positions run one at a time since the session opened.
    pub decode_tokens: u64,
    /// When the session opened, ms since the Unix epoch (server clock).
    pub start_ms: u64,
    /// When the last counted token ran, ms since the Unix epoch (server clock).
    pub end_ms: u64,
    /// `(prefill_tokens + decode_tokens) × span.len() × price_per_token` micro-units.
    pub amount: u64,
    /// 1 for the first receipt of a session's hop, then +1 for each update.
    pub seq: u64,
}

impl Receipt {
    /// A receipt for the given running totals, its amount computed from the terms.
    pub fn new(
        terms: Terms,
        prefill_tokens: u64,
        decode_tokens: u64,
        start_ms: u64,
        end_ms: u64,
        seq: u64,
    ) -> Result<Self, LedgerError> {
        let tokens = prefill_tokens
            .checked_add(decode_tokens)
            .ok_or(LedgerError::Overflow)?;
        let amount = terms.amount_for(tokens)?;
        let r = Self {
            version: RECEIPT_VERSION,
            terms,
            prefill_tokens,
            decode_tokens,
            start_ms,
            end_ms,
            amount,
            seq,
        };
        r.check()?;
        Ok(r)
    }

    /// Prefill plus decode tokens (saturating; [`Receipt::check`] rejects an overflow).
    pub fn tokens(&self) -> u64 {
        self.prefill_tokens.saturating_add(self.decode_tokens)
    }

    /// Checks the fields against each other: version, span, times, sequence number, and
    /// the amount recomputed from tokens, blocks and price.
    pub fn check(&self) -> Result<(), LedgerError> {
        if self.version != RECEIPT_VERSION {
            return Err(LedgerError::Version {
                found: self.version,
                expected: RECEIPT_VERSION,
            });
        }
        self.terms.check()?;
        if self.end_ms < self.start_ms {
            return Err(LedgerError::Invalid("end time before start time"));
        }
        if self.seq == 0 {
            return Err(LedgerError::Invalid("sequence numbers start at 1"));
        }
        let tokens = self
            .prefill_tokens
            .checked_add(self.decode_tokens)
            .ok_or(LedgerError::Overflow)?;
        let computed = self.terms.amount_for(tokens)?;
        if computed != self.amount {
            return Err(LedgerError::AmountMismatch {
                stated: self.amount,
                computed,
            });
        }
        Ok(())
    }

    /// The bytes the server signs (see the module docs).
    pub fn server_signing_bytes(&self) -> Result<Vec<u8>, LedgerError> {
        let mut out = SERVER_DOMAIN.to_vec();
        out.extend_from_slice(&RECEIPT_VERSION.to_le_bytes());
        out.extend(wire::canonical(self)?);
        Ok(out)
    }

    /// The bytes the client countersigns: its own domain, every field, and the server's
    /// signature.
    pub fn client_signing_bytes(&self, server_sig: &Sig) -> Result<Vec<u8>, LedgerError> {
        let mut out = CLIENT_DOMAIN.to_vec();
        out.extend_from_slice(&RECEIPT_VERSION.to_le_bytes());
        out.extend(wire::canonical(self)?);
        out.extend_from_slice(&server_sig.0);
        Ok(out)
    }

    /// Signs as the server; `key` must be the key of `terms.server`.
    pub fn sign(self, key: &SigningKey) -> Result<SignedReceipt, LedgerError> {
        self.check()?;
        if key.verifying_key() != verifying_key_of(&self.terms.server)? {
            return Err(LedgerError::WrongKey {
                role: Role::Server,
                expected: self.terms.server,
            });
        }
        let sig = key.sign(&self.server_signing_bytes()?);
        Ok(SignedReceipt {
            receipt: self,
            server_sig: Sig(sig.to_bytes()),
            client_sig: None,
        })
    }
}

/// A receipt with the server's signature and, once the client agreed, its countersignature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedReceipt {
    pub receipt: Receipt,
    pub server_sig: Sig,
    pub client_sig: Option<Sig>,
}

impl SignedReceipt {
    /// Checks the fields and the server's signature against `terms.server`'s key.
    pub fn verify_server(&self) -> Result<(), LedgerError> {
        self.receipt.check()?;
        let key = verifying_key_of(&self.receipt.terms.server)?;
        let sig = Signature::from_bytes(&self.server_sig.0);
        key.verify_strict(&self.receipt.server_signing_bytes()?, &sig)
            .map_err(|_| LedgerError::BadSignature { role: Role::Server })
    }

    /// Checks the fields and both signatures; fails on a receipt not yet countersigned.
    pub fn verify_countersigned(&self) -> Result<(), LedgerError> {
        self.verify_server()?;
        let client_sig = self.client_sig.ok_or(LedgerError::NotCountersigned)?;
        let key = verifying_key_of(&self.receipt.terms.client)?;
        let sig = Signature::from_bytes(&client_sig.0);
        key.verify_strict(&self.receipt.client_signing_bytes(&self.server_sig)?, &sig)
            .map_err(|_| LedgerError::BadSignature { role: Role::Client })
    }

    /// [`verify_countersigned`](Self::verify_countersigned) if countersigned, else
    /// [`verify_server`](Self::verify_server).
    pub fn verify(&self) -> Result<(), LedgerError> {
        if self.client_sig.is_some() {
            self.verify_countersigned()
        } else {
            self.verify_server()
        }
    }

    pub fn is_countersigned(&self) -> bool {
        self.client_sig.is_some()
    }

    /// The client's side: verify the server's signature, check the receipt against the
    /// client's own tally of the work, and countersign with `key` (the key of
    /// `terms.client`).
    ///
    /// This does not know which sessions the client opened or which sequence numbers it
    /// already signed; [`Store::accept_as_client`](super::Store::accept_as_client) adds
    /// those checks and keeps the result.
    pub fn countersign(
        &mut self,
        key: &SigningKey,
        tally: &ClientTally,
    ) -> Result<(), LedgerError> {
        self.verify_server()?;
        tally.check(&self.receipt)?;
        if key.verifying_key() != verifying_key_of(&self.receipt.terms.client)? {
            return Err(LedgerError::WrongKey {
                role: Role::Client,
                expected: self.receipt.terms.client,
            });
        }
        let sig = key.sign(&self.receipt.client_signing_bytes(&self.server_sig)?);
        self.client_sig = Some(Sig(sig.to_bytes()));
        Ok(())
    }
}

/// The client's count of the work one hop did for it, to check that hop's receipts against.
///
/// Call [`record_positions`](Self::record_positions) once per forward step the server
/// answered with hidden states (not for a step that failed or timed out: the client did
/// not get that work). Counts positions with the server's rule
/// ([`crate::pipeline::SpanServer`]): a step of more than one position is prefill, a step
/// of one position is decode. Replays into a replacement server are real work for that
/// server's hop and count like any step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientTally {
    terms: Terms,
    prefill_tokens: u64,
    decode_tokens: u64,
}

impl ClientTally {
    pub fn new(terms: Terms) -> Self {
        Self {
            terms,
            prefill_tokens: 0,
            decode_tokens: 0,
        }
    }

    pub fn terms(&self) -> &Terms {
        &self.terms
    }

    /// Count one answered forward step of `positions` positions on this hop.
    pub fn record_positions(&mut self, positions: u64) {
        if positions > 1 {
            self.prefill_tokens = self.prefill_tokens.saturating_add(positions);
        } else {
            self.decode_tokens = self.decode_tokens.saturating_add(positions);
        }
    }

    pub fn prefill_tokens(&self) -> u64 {
        self.prefill_tokens
    }

    pub fn decode_tokens(&self) -> u64 {
        self.decode_tokens
    }

    /// Accepts a receipt under the same terms that claims no more tokens of either kind
    /// than were sent (a running receipt may lag behind the tally, never lead it).
    pub fn check(&self, receipt: &Receipt) -> Result<(), LedgerError> {
        let (t, r) = (&self.terms, &receipt.terms);
        let field = if t.session != r.session {
            Some("session")
        } else if t.client != r.client {
            Some("client")
        } else if t.server != r.server {
            Some("server")
        } else if t.model != r.model {
            Some("model")
        } else if t.config_hash != r.config_hash {
            Some("config hash")
        } else if t.span != r.span {
            Some("block span")
        } else if t.price_per_token != r.price_per_token {
            Some("price")
        } else {
            None
        };
        if let Some(field) = field {
            return Err(LedgerError::TermsMismatch { field });
        }
        for (kind, claimed, sent) in [
            ("prefill", receipt.prefill_tokens, self.prefill_tokens),
            ("decode", receipt.decode_tokens, self.decode_tokens),
        ] {
            if claimed > sent {
                return Err(LedgerError::MoreThanSent {
                    kind,
                    claimed,
                    sent,
                });
            }
        }
        Ok(())
    }
}

/// The server's side: turns a session's running token counts into receipts, a new one each
/// time at least `every_tokens` tokens went unbilled, and a last one at the end.
#[derive(Clone, Debug)]
pub struct Meter {
    terms: Terms,
    start_ms: u64,
    every_tokens: u64,
    seq: u64,
    billed_tokens: u64,
}

impl Meter {
    /// `every_tokens` must be at least 1.
    pub fn new(terms: Terms, start_ms: u64, every_tokens: u64) -> Result<Self, LedgerError> {
        if every_tokens == 0 {
            return Err(LedgerError::Invalid("meter interval of 0 tokens"));
        }
        terms.check()?;
        Ok(Self {
            terms,
            start_ms,
            every_tokens,
            seq: 0,
            billed_tokens: 0,
        })
    }

    pub fn terms(&self) -> &Terms {
        &self.terms
    }

    /// Sequence number of the last receipt issued (0 before the first).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Given the session's running totals, a receipt when `every_tokens` or more are
    /// unbilled; `None` otherwise.
    pub fn observe(
        &mut self,
        prefill_tokens: u64,
        decode_tokens: u64,
        now_ms: u64,
    ) -> Result<Option<Receipt>, LedgerError> {
        let tokens = prefill_tokens.saturating_add(decode_tokens);
        if tokens.saturating_sub(self.billed_tokens) < self.every_tokens {
            return Ok(None);
        }
        self.issue(prefill_tokens, decode_tokens, now_ms).map(Some)
    }

    /// At the end of a session (closed, expired, shutting down): a receipt for whatever is
    /// unbilled, `None` when nothing is.
    pub fn finish(
        &mut self,
        prefill_tokens: u64,
        decode_tokens: u64,
        now_ms: u64,
    ) -> Result<Option<Receipt>, LedgerError> {
        if prefill_tokens.saturating_add(decode_tokens) <= self.billed_tokens {
            return Ok(None);
        }
        self.issue(prefill_tokens, decode_tokens, now_ms).map(Some)
    }

    fn issue(&mut self, prefill: u64, decode: u64, now_ms: u64) -> Result<Receipt, LedgerError> {
        let seq = self.seq.checked_add(1).ok_or(LedgerError::Overflow)?;
        let end_ms = now_ms.max(self.start_ms);
        let r = Receipt::new(
            self.terms.clone(),
            prefill,
            decode,
            self.start_ms,
            end_ms,
            seq,
        )?;
        self.seq = seq;
        self.billed_tokens = r.tokens();
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn terms(server: &Identity, client: &Identity) -> Terms {
        Terms {
            session: SessionId([7; 16]),
            client: client.peer_id(),
            server: server.peer_id(),
            model: ModelId::new("tiny"),
            config_hash: ConfigHash([1; 32]),
            span: BlockRange::new(2, 5),
            price_per_token: 10,
        }
    }

    #[test]
    fn config_hash_ignores_formatting_and_key_order() {
        let a = ConfigHash::of_json(br#"{"a": 1, "b": {"y": [1, 2], "x": "s"}}"#).unwrap();
        let b = ConfigHash::of_json(br#"{"b":{"x":"s","y":[1,2]},"a":1}"#).unwrap();
        let c = ConfigHash::of_json(br#"{"b":{"x":"s","y":[2,1]},"a":1}"#).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(ConfigHash::of_json(b"{").is_err());
    }

    #[test]
    fn meter_issues_every_n_tokens_and_at_the_end() {
        let (s, c) = (Identity::generate(), Identity::generate());
        let mut m = Meter::new(terms(&s, &c), 100, 4).unwrap();
        assert!(m.observe(3, 0, 110).unwrap().is_none());
        let r = m.observe(3, 1, 120).unwrap().unwrap();
        assert_eq!((r.seq, r.amount, r.end_ms), (1, 4 * 3 * 10, 120));
        assert!(m.observe(3, 4, 130).unwrap().is_none());
        let r = m.finish(3, 5, 140).unwrap().unwrap();
        assert_eq!((r.seq, r.tokens()), (2, 8));
        assert!(m.finish(3, 5, 150).unwrap().is_none());
        assert!(Meter::new(terms(&s, &c), 0, 0).is_err());
    }

    #[test]
    fn roles_do_not_mix() {
        let (s, c) = (Identity::generate(), Identity::generate());
        let r = Receipt::new(terms(&s, &c), 5, 0, 1, 2, 1).unwrap();
        // The client cannot sign as the server.
        assert!(matches!(
            r.clone().sign(&c.signing_key()),
            Err(LedgerError::WrongKey {
                role: Role::Server,
                ..
            })
        ));
        let mut signed = r.sign(&s.signing_key()).unwrap();
        let mut tally = ClientTally::new(signed.receipt.terms.clone());
        tally.record_positions(5);
        // The server cannot countersign for the client.
        assert!(matches!(
            signed.clone().countersign(&s.signing_key(), &tally),
            Err(LedgerError::WrongKey {
                role: Role::Client,
                ..
            })
        ));
        // A server signature copied into the client slot does not pass.
        let mut fake = signed.clone();
        fake.client_sig = Some(fake.server_sig);
        assert!(matches!(
            fake.verify_countersigned(),
            Err(LedgerError::BadSignature { role: Role::Client })
        ));
        signed.countersign(&c.signing_key(), &tally).unwrap();
        signed.verify_countersigned().unwrap();
    }
}
