//! Attestations: which answers a server signs, and when.

use super::*;

/// A server with default limits that signs with a fresh identity.
fn signing_server() -> (crate::identity::Identity, tempfile::TempDir, SpanServer) {
    let id = crate::identity::Identity::generate();
    let (dir, srv) = server(ServerLimits::default());
    let srv = srv.with_signer(id.signing_key());
    (id, dir, srv)
}

/// A batch's steps come back with their pushes ordered and their signatures left to
/// `seal` (so the worker sends the push first); `serve` signs at once. Either way the
/// attestation covers the step's input and output.
#[test]
fn steps_served_together_are_signed_by_seal_after_their_push() {
    let (id, _d, mut srv) = signing_server();
    let (client, next) = (PeerId::random(), PeerId::random());
    let (s, now) = (SessionId::random(), Instant::now());
    srv.handle(client, open(s, BlockRange::new(2, 6), 64), now);
    let prefill = SessionRequest::Forward {
        session: s,
        start_pos: 0,
        hidden: varied(4, 0),
    };
    let signed = answered(srv.serve(client, prefill, now));
    let SessionResponse::Hidden { attestation, .. } = &signed.response else {
        panic!("{:?}", signed.response);
    };
    let attestation = attestation.expect("serve signs");
    attestation
        .verify(&id.peer_id(), &s, 0, &varied(4, 0), output_of(&signed))
        .expect("a valid attestation");

    let input = varied(1, 5);
    let step = SessionRequest::Step {
        session: s,
        start_pos: 4,
        rewind: false,
        input: StepInput::Hidden(input.clone()),
        push_to: Some(PushTarget {
            peer: next,
            session: SessionId::random(),
        }),
    };
    let mut answer = answered(srv.serve_many(vec![(client, step)], now).remove(0));
    assert!(matches!(
        &answer.response,
        SessionResponse::Hidden {
            attestation: None,
            ..
        }
    ));
    assert!(matches!(&answer.push, Some(order) if order.peer == next));
    srv.seal(&mut answer);
    let SessionResponse::Hidden { attestation, .. } = &answer.response else {
        panic!("{:?}", answer.response);
    };
    let attestation = attestation.expect("sealed");
    attestation
        .verify(&id.peer_id(), &s, 4, &input, output_of(&answer))
        .expect("a valid attestation");
    // Sealing twice signs nothing again.
    srv.seal(&mut answer);
    assert!(matches!(
        &answer.response,
        SessionResponse::Hidden { attestation: Some(a), .. } if *a == attestation
    ));
}

/// A client that does not check servers keeps no signatures, so a session opened without
/// `attest` gets its steps unsigned (by `serve` and by `seal` alike) while another
/// session on the same signing server gets every step signed.
#[test]
fn only_sessions_that_ask_for_attestations_get_them() {
    let (id, _d, mut srv) = signing_server();
    let (client, now) = (PeerId::random(), Instant::now());
    let (unchecked, checked) = (SessionId::random(), SessionId::random());
    for (session, attest) in [(unchecked, false), (checked, true)] {
        let open = SessionRequest::Open {
            session,
            model: ModelId::new(tiny::TINY_MODEL_ID),
            span: BlockRange::new(2, 6),
            max_len: 64,
            attest,
        };
        assert!(matches!(
            srv.handle(client, open, now),
            SessionResponse::Opened { .. }
        ));
    }
    let forward = |session| SessionRequest::Forward {
        session,
        start_pos: 0,
        hidden: varied(2, 0),
    };
    let step = |session| SessionRequest::Step {
        session,
        start_pos: 2,
        rewind: false,
        input: StepInput::Hidden(varied(1, 3)),
        push_to: None,
    };
    let attestation_of = |answer: &Answer| match &answer.response {
        SessionResponse::Hidden { attestation, .. } => *attestation,
        other => panic!("{other:?}"),
    };

    let plain = answered(srv.serve(client, forward(unchecked), now));
    assert_eq!(attestation_of(&plain), None);
    let mut stepped = answered(
        srv.serve_many(vec![(client, step(unchecked))], now)
            .remove(0),
    );
    srv.seal(&mut stepped);
    assert_eq!(attestation_of(&stepped), None);

    let signed = answered(srv.serve(client, forward(checked), now));
    attestation_of(&signed)
        .expect("signed for a session that asked")
        .verify(
            &id.peer_id(),
            &checked,
            0,
            &varied(2, 0),
            output_of(&signed),
        )
        .expect("a valid attestation");
    let mut stepped = answered(srv.serve_many(vec![(client, step(checked))], now).remove(0));
    srv.seal(&mut stepped);
    attestation_of(&stepped)
        .expect("sealed for a session that asked")
        .verify(
            &id.peer_id(),
            &checked,
            2,
            &varied(1, 3),
            output_of(&stepped),
        )
        .expect("a valid attestation");
}
