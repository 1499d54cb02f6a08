//! The `/mesh/session/1` request-response events: inbound requests go to the node as
//! [`Event::InboundRequest`], responses and failures answer the waiting
//! [`Command::Request`](crate::p2p::client::Command). Apart because the session protocol is
//! opaque bytes to the loop: it only routes them.

use libp2p::request_response;

use super::EventLoop;
use crate::p2p::client::ResponseChannel;
use crate::p2p::{Event, P2pError};

impl EventLoop {
    pub(super) fn on_session(&mut self, event: request_response::Event<Vec<u8>, Vec<u8>>) {
        match event {
            request_response::Event::Message {
                peer,
                connection_id,
                message,
            } => {
                let relayed = self.is_relayed_connection(&peer, connection_id);
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        if relayed {
                            self.stats.relay.relayed_bytes_received += request.len() as u64;
                        }
                        self.emit(Event::InboundRequest {
                            peer,
                            request,
                            channel: ResponseChannel::exchange(channel, relayed),
                        })
                    }
                    request_response::Message::Response {
                        request_id,
                        response,
                    } => {
                        if let Some((_, sent, reply)) = self.pending_requests.remove(&request_id) {
                            if relayed {
                                let r = &mut self.stats.relay;
                                r.relayed_bytes_sent += sent;
                                r.relayed_bytes_received += response.len() as u64;
                            }
                            let _ = reply.send(Ok(response));
                        }
                    }
                }
            }
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some((_, _, reply)) = self.pending_requests.remove(&request_id) {
                    let _ = reply.send(Err(P2pError::Request {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, "inbound session request failed: {error}");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }
}
