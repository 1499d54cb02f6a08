//! A step's attestation, digested as the step is answered and signed after its output
//! was pushed on ([`SpanServer::serve_many`]): the signature (tens of microseconds) is
//! then off the token's path.

use super::{Answer, Served, SpanServer};
use crate::ledger::attestation::Unsigned;
use crate::pipeline::protocol::SessionResponse;

/// A step's response, and its attestation still to sign ([`SpanServer::seal`]).
#[derive(Debug)]
pub(super) struct Stepped {
    pub(super) response: SessionResponse,
    pub(super) unsigned: Option<Unsigned>,
}

impl From<SessionResponse> for Stepped {
    fn from(response: SessionResponse) -> Self {
        Self {
            response,
            unsigned: None,
        }
    }
}

impl SpanServer {
    /// Sign the step `answer` carries, if it ran one and this server signs: after its
    /// output was pushed on ([`SpanServer::serve_many`]), so the signature is off the
    /// token's path.
    pub fn seal(&self, answer: &mut Answer) {
        if let (Some(unsigned), Some(key), SessionResponse::Hidden { attestation, .. }) =
            (answer.unsigned.take(), &self.signer, &mut answer.response)
        {
            *attestation = Some(unsigned.sign(key));
        }
    }

    /// [`Self::seal`] every answer `served` holds.
    pub(super) fn seal_served(&self, served: &mut Served) {
        served.answers_mut().for_each(|answer| self.seal(answer));
    }
}
