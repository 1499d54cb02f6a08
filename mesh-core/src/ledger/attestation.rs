//! Attestations: a server's signature over every step it runs, so a client that catches it
//! returning wrong hidden states holds proof, not just an opinion.
//!
//! The server signs `b"mesh-hidden-v1\0" ‖ session (16 bytes) ‖ start_pos (u32 LE) ‖
//! SHA-256(input frame) ‖ SHA-256(output frame)`, where a frame's digest covers its dtype,
//! shape and raw bytes ([`digest`]). Signing costs one ed25519 signature per step (tens of
//! microseconds), far below the step itself; servers cannot know which steps a client
//! re-checks, so they must sign them all.

use ed25519_dalek::{Signature, Signer, SigningKey};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{hex, verifying_key_of, LedgerError, Role, Sig};
use crate::types::SessionId;
use crate::wire::{WireDType, WireTensor};

/// Prefix of the bytes a server signs for one step.
pub const ATTESTATION_DOMAIN: &[u8] = b"mesh-hidden-v1\0";

/// A server's signed statement: "for this session, at `start_pos`, this input gave this
/// output".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attestation {
    #[serde(with = "hex")]
    pub input: [u8; 32],
    #[serde(with = "hex")]
    pub output: [u8; 32],
    pub signature: Sig,
}

/// SHA-256 of a tensor frame: dtype tag, rank, shape (u32 LE each), then the raw bytes.
pub fn digest(t: &WireTensor) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([match t.dtype {
        WireDType::F32 => 0u8,
        WireDType::F16 => 1,
        WireDType::BF16 => 2,
    }]);
    h.update((t.shape.len() as u32).to_le_bytes());
    for d in &t.shape {
        h.update(d.to_le_bytes());
    }
    h.update(&t.data);
    h.finalize().into()
}

fn signing_bytes(
    session: &SessionId,
    start_pos: u32,
    input: &[u8; 32],
    output: &[u8; 32],
) -> Vec<u8> {
    let mut out = ATTESTATION_DOMAIN.to_vec();
    out.extend_from_slice(&session.0);
    out.extend_from_slice(&start_pos.to_le_bytes());
    out.extend_from_slice(input);
    out.extend_from_slice(output);
    out
}

/// What an attestation states, before it is signed: a server digests a step's frames as
/// it answers, and signs once the step's output is on its way to the next server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unsigned {
    session: SessionId,
    start_pos: u32,
    input: [u8; 32],
    output: [u8; 32],
}

impl Unsigned {
    pub fn of(
        session: &SessionId,
        start_pos: u32,
        input: &WireTensor,
        output: &WireTensor,
    ) -> Self {
        Self {
            session: *session,
            start_pos,
            input: digest(input),
            output: digest(output),
        }
    }

    /// Sign as the server holding `key`.
    pub fn sign(&self, key: &SigningKey) -> Attestation {
        let bytes = signing_bytes(&self.session, self.start_pos, &self.input, &self.output);
        Attestation {
            input: self.input,
            output: self.output,
            signature: Sig(key.sign(&bytes).to_bytes()),
        }
    }
}

impl Attestation {
    /// Sign one step as the server holding `key`.
    pub fn sign(
        key: &SigningKey,
        session: &SessionId,
        start_pos: u32,
        input: &WireTensor,
        output: &WireTensor,
    ) -> Self {
        Unsigned::of(session, start_pos, input, output).sign(key)
    }

    /// Check that `server` signed exactly this input and output for this step.
    pub fn verify(
        &self,
        server: &PeerId,
        session: &SessionId,
        start_pos: u32,
        input: &WireTensor,
        output: &WireTensor,
    ) -> Result<(), LedgerError> {
        if digest(input) != self.input || digest(output) != self.output {
            return Err(LedgerError::BadSignature { role: Role::Server });
        }
        self.verify_digests(server, session, start_pos)
    }

    /// Check the signature over the digests alone (for stored evidence, whose tensors may
    /// be gone).
    pub fn verify_digests(
        &self,
        server: &PeerId,
        session: &SessionId,
        start_pos: u32,
    ) -> Result<(), LedgerError> {
        let key = verifying_key_of(server)?;
        let bytes = signing_bytes(session, start_pos, &self.input, &self.output);
        key.verify_strict(&bytes, &Signature::from_bytes(&self.signature.0))
            .map_err(|_| LedgerError::BadSignature { role: Role::Server })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn frame(x: f32) -> WireTensor {
        WireTensor {
            dtype: WireDType::F32,
            shape: vec![1, 1, 2],
            data: [x, 1.0].iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    #[test]
    fn a_signed_step_verifies_and_any_change_does_not() {
        let id = Identity::generate();
        let session = SessionId::random();
        let (input, output) = (frame(0.5), frame(2.0));
        let a = Attestation::sign(&id.signing_key(), &session, 7, &input, &output);
        a.verify(&id.peer_id(), &session, 7, &input, &output)
            .expect("genuine");
        assert!(a
            .verify(&id.peer_id(), &session, 8, &input, &output)
            .is_err());
        assert!(a
            .verify(&id.peer_id(), &SessionId::random(), 7, &input, &output)
            .is_err());
        assert!(a
            .verify(&id.peer_id(), &session, 7, &input, &frame(2.1))
            .is_err());
        let other = Identity::generate().peer_id();
        assert!(a.verify(&other, &session, 7, &input, &output).is_err());
    }
}
