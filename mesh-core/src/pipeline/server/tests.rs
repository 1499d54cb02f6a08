//! `SpanServer` without a network: sessions, limits, refusals and billing.

use super::*;
use crate::model::{tiny, ModelFiles};
use crate::pipeline::protocol::{PushTarget, StepInput};
use candle_core::{DType, Tensor};

mod signing;

fn server(limits: ServerLimits) -> (tempfile::TempDir, SpanServer) {
    let dir = tempfile::tempdir().unwrap();
    tiny::write(dir.path()).unwrap();
    let files = ModelFiles::open(dir.path()).unwrap();
    let span = SpanModel::load(&files, BlockRange::new(2, 6), DType::F32, &Device::Cpu).unwrap();
    (
        dir,
        SpanServer::new(ModelId::new(tiny::TINY_MODEL_ID), span, limits),
    )
}

fn open(session: SessionId, span: BlockRange, max_len: u32) -> SessionRequest {
    SessionRequest::Open {
        session,
        model: ModelId::new(tiny::TINY_MODEL_ID),
        span,
        max_len,
        attest: true,
    }
}

fn hidden(seq: usize) -> WireTensor {
    let t = Tensor::ones((1, seq, 128), DType::F32, &Device::Cpu).unwrap();
    WireTensor::from_tensor(&t).unwrap()
}

#[test]
fn open_forward_close_counts_tokens_and_frees_memory() {
    let (_d, mut srv) = server(ServerLimits::default());
    let (peer, s, now) = (PeerId::random(), SessionId::random(), Instant::now());
    let r = srv.handle(peer, open(s, BlockRange::new(3, 5), 64), now);
    assert_eq!(
        r,
        SessionResponse::Opened {
            session: s,
            span: BlockRange::new(3, 5),
            terms: None,
        }
    );
    assert!(srv.reserved_bytes() > 0);
    let fwd = |start_pos, seq| SessionRequest::Forward {
        session: s,
        start_pos,
        hidden: hidden(seq),
    };
    match srv.handle(peer, fwd(0, 5), now) {
        SessionResponse::Hidden { hidden, .. } => assert_eq!(hidden.shape, vec![1, 5, 128]),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        srv.handle(peer, fwd(5, 1), now),
        SessionResponse::Hidden { .. }
    ));
    // Wrong position: refused, state untouched.
    assert!(matches!(
        srv.handle(peer, fwd(9, 1), now),
        SessionResponse::Refused(Refusal::BadRequest(_))
    ));
    let usage = srv.usage()[0];
    assert_eq!((usage.prefill_tokens, usage.decode_tokens), (5, 1));
    // Another peer cannot use or close it.
    let stranger = PeerId::random();
    assert_eq!(
        srv.handle(stranger, fwd(6, 1), now),
        SessionResponse::Refused(Refusal::UnknownSession)
    );
    assert_eq!(
        srv.handle(stranger, SessionRequest::Close { session: s }, now),
        SessionResponse::Refused(Refusal::UnknownSession)
    );
    assert_eq!(
        srv.handle(peer, SessionRequest::Close { session: s }, now),
        SessionResponse::Closed {
            session: s,
            receipt: None
        }
    );
    assert_eq!(srv.reserved_bytes(), 0);
}

#[test]
fn refuses_with_reasons() {
    let limits = ServerLimits {
        max_sessions: 2,
        max_sessions_per_client: 1,
        ..ServerLimits::default()
    };
    let (_d, mut srv) = server(limits);
    let now = Instant::now();
    let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
    let span = BlockRange::new(2, 6);
    assert!(matches!(
        srv.handle(a, open(SessionId::random(), BlockRange::new(0, 3), 8), now),
        SessionResponse::Refused(Refusal::SpanNotServed { .. })
    ));
    assert!(matches!(
        srv.handle(a, open(SessionId::random(), span, 1 << 20), now),
        SessionResponse::Refused(Refusal::MaxLenTooLarge { .. })
    ));
    let wrong_model = SessionRequest::Open {
        session: SessionId::random(),
        model: ModelId::new("other"),
        span,
        max_len: 8,
        attest: true,
    };
    assert!(matches!(
        srv.handle(a, wrong_model, now),
        SessionResponse::Refused(Refusal::UnknownModel(_))
    ));
    assert!(matches!(
        srv.handle(a, open(SessionId::random(), span, 8), now),
        SessionResponse::Opened { .. }
    ));
    assert!(matches!(
        srv.handle(a, open(SessionId::random(), span, 8), now),
        SessionResponse::Refused(Refusal::TooManyClientSessions { .. })
    ));
    assert!(matches!(
        srv.handle(b, open(SessionId::random(), span, 8), now),
        SessionResponse::Opened { .. }
    ));
    assert!(matches!(
        srv.handle(c, open(SessionId::random(), span, 8), now),
        SessionResponse::Refused(Refusal::TooManySessions { open: 2, limit: 2 })
    ));
    assert_eq!(srv.stats().refusals, 5);
}

#[test]
fn a_client_that_never_countersigns_is_refused_new_sessions() {
    let (dir, srv) = server(ServerLimits::default());
    let identity = crate::identity::Identity::generate();
    let billing = Billing {
        key: identity.signing_key(),
        server: identity.peer_id(),
        store: Store::open(&dir.path().join("ledger")).unwrap(),
        price_per_token: 1,
        every_tokens: 4,
        max_unpaid_tokens: 8,
    };
    let mut srv = srv.with_billing(billing).unwrap();
    let (deadbeat, honest, now) = (PeerId::random(), PeerId::random(), Instant::now());
    let span = BlockRange::new(2, 6);
    let s = SessionId::random();
    assert!(matches!(
        srv.handle(deadbeat, open(s, span, 64), now),
        SessionResponse::Opened { terms: Some(_), .. }
    ));
    let fwd = SessionRequest::Forward {
        session: s,
        start_pos: 0,
        hidden: hidden(12),
    };
    match srv.handle(deadbeat, fwd, now) {
        SessionResponse::Hidden {
            receipt: Some(r), ..
        } => {
            r.verify_server().unwrap();
            assert_eq!(r.receipt.prefill_tokens, 12);
        }
        other => panic!("{other:?}"),
    }
    // 12 tokens x 4 blocks owed, over the limit of 8 x 4: refused; others are not.
    match srv.handle(deadbeat, open(SessionId::random(), span, 64), now) {
        SessionResponse::Refused(Refusal::Unpaid {
            owed: 48,
            limit: 32,
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        srv.handle(honest, open(SessionId::random(), span, 64), now),
        SessionResponse::Opened { .. }
    ));
    // The server remembers who did not pay.
    let store = srv.billing.as_ref().map(|(b, _)| b.store.clone()).unwrap();
    let rep = crate::ledger::Reputation::persistent(store);
    assert_eq!((rep.get(&deadbeat).unpaid, rep.get(&honest).unpaid), (1, 0));
}

#[test]
fn cache_budget_is_a_hard_limit() {
    // Room for exactly one 64-token cache over 4 blocks.
    let per_session = SpanCache::bytes_for(&tiny::config(), 4, 64, DType::F32);
    let limits = ServerLimits {
        cache_budget_bytes: per_session + per_session / 2,
        ..ServerLimits::default()
    };
    let (_d, mut srv) = server(limits);
    let now = Instant::now();
    let span = BlockRange::new(2, 6);
    assert!(matches!(
        srv.handle(PeerId::random(), open(SessionId::random(), span, 64), now),
        SessionResponse::Opened { .. }
    ));
    match srv.handle(PeerId::random(), open(SessionId::random(), span, 64), now) {
        SessionResponse::Refused(Refusal::OverBudget { needed, free, .. }) => {
            assert_eq!(needed, per_session);
            assert!(free < needed);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn idle_sessions_expire_and_free_their_cache() {
    let limits = ServerLimits {
        idle_timeout: Duration::from_secs(5),
        ..ServerLimits::default()
    };
    let (_d, mut srv) = server(limits);
    let now = Instant::now();
    let s = SessionId::random();
    srv.handle(PeerId::random(), open(s, BlockRange::new(2, 6), 16), now);
    assert!(srv.expire_idle(now + Duration::from_secs(1)).is_empty());
    let expired = srv.expire_idle(now + Duration::from_secs(6));
    assert_eq!(expired.len(), 1);
    assert_eq!((srv.active_sessions(), srv.reserved_bytes()), (0, 0));
}

/// Distinct hidden states per position, so a rewound step that ran against the wrong
/// cached positions would give different numbers.
fn varied(seq: usize, offset: usize) -> WireTensor {
    let values: Vec<f32> = (0..seq * 128)
        .map(|i| (((i + offset * 128) % 97) as f32) / 97.0 - 0.5)
        .collect();
    let t = Tensor::from_vec(values, (1, seq, 128), &Device::Cpu).unwrap();
    WireTensor::from_tensor(&t).unwrap()
}

/// Speculative decoding's rewind: positions from `to` on are dropped and the step runs
/// there, giving what a session that never saw the dropped positions gives. A rewind past
/// the cache, or into another peer's session, is refused and changes nothing.
#[test]
fn rewind_drops_positions_then_runs_as_if_they_never_were() {
    let (_d, mut srv) = server(ServerLimits::default());
    let (peer, now) = (PeerId::random(), Instant::now());
    let (spec, plain) = (SessionId::random(), SessionId::random());
    let span = BlockRange::new(2, 6);
    for s in [spec, plain] {
        assert!(matches!(
            srv.handle(peer, open(s, span, 64), now),
            SessionResponse::Opened { .. }
        ));
    }
    let run = |srv: &mut SpanServer, req| match srv.handle(peer, req, now) {
        SessionResponse::Hidden { hidden, .. } => hidden,
        other => panic!("{other:?}"),
    };
    let forward = |session, start_pos, hidden| SessionRequest::Forward {
        session,
        start_pos,
        hidden,
    };
    // Five positions, three of them "draft tokens" that get rejected.
    run(&mut srv, forward(spec, 0, varied(5, 0)));
    // Past the cache: refused, and the next rewind still finds all five.
    let past = SessionRequest::Rewind {
        session: spec,
        to: 6,
        hidden: varied(1, 9),
    };
    assert!(matches!(
        srv.handle(peer, past, now),
        SessionResponse::Refused(Refusal::BadRequest(_))
    ));
    let stranger = SessionRequest::Rewind {
        session: spec,
        to: 2,
        hidden: varied(2, 7),
    };
    assert_eq!(
        srv.handle(PeerId::random(), stranger, now),
        SessionResponse::Refused(Refusal::UnknownSession)
    );
    let rewound = SessionRequest::Rewind {
        session: spec,
        to: 2,
        hidden: varied(2, 7),
    };
    let got = run(&mut srv, rewound);
    // The same two positions after only the first two of the original five.
    run(&mut srv, forward(plain, 0, varied(2, 0)));
    let want = run(&mut srv, forward(plain, 2, varied(2, 7)));
    let (got, want) = (
        got.to_tensor(&Device::Cpu).unwrap(),
        want.to_tensor(&Device::Cpu).unwrap(),
    );
    let diff = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-4, "rewound step differs by {diff}");
    // The rejected positions were computed: billed, 5 + 2 positions in all.
    let usage = srv
        .usage()
        .into_iter()
        .find(|u| u.session == spec)
        .expect("usage");
    assert_eq!(usage.prefill_tokens + usage.decode_tokens, 7);
}

/// The hidden states of a served answer, or what it was instead.
fn output_of(answer: &Answer) -> &WireTensor {
    match &answer.response {
        SessionResponse::Hidden { hidden, .. } => hidden,
        other => panic!("not a step's output: {other:?}"),
    }
}

fn answered(served: Served) -> Answer {
    match served.reply {
        Reply::Now(answer) => *answer,
        Reply::Waits(s) => panic!("session {s} waits"),
    }
}

#[test]
fn a_push_runs_only_the_step_its_client_asked_for_from_the_peer_it_named() {
    let (_d, mut srv) = server(ServerLimits::default());
    let (_d2, mut relayed) = server(ServerLimits::default());
    let (client, upstream, stranger) = (PeerId::random(), PeerId::random(), PeerId::random());
    let (s, now) = (SessionId::random(), Instant::now());
    let prefill = SessionRequest::Forward {
        session: s,
        start_pos: 0,
        hidden: varied(4, 0),
    };
    for srv in [&mut srv, &mut relayed] {
        srv.handle(client, open(s, BlockRange::new(2, 6), 64), now);
        assert!(matches!(
            srv.handle(client, prefill.clone(), now),
            SessionResponse::Hidden { .. }
        ));
    }
    let push = |start_pos| SessionRequest::Push {
        session: s,
        start_pos,
        hidden: varied(1, 9),
    };
    let decoded = |srv: &SpanServer| srv.usage()[0].decode_tokens;

    // A push before the client's step is only held; held from the wrong peer, it is not
    // used when the step names another.
    let held = answered(srv.serve(stranger, push(4), now));
    assert_eq!(held.response, SessionResponse::Acknowledged);
    // The client's step at `pos`, its input to come from `upstream`.
    let waiting = |pos| SessionRequest::Step {
        session: s,
        start_pos: pos,
        rewind: false,
        input: StepInput::PushedBy(upstream),
        push_to: None,
    };
    let step = waiting(4);
    assert!(matches!(srv.serve(client, step.clone(), now).reply, Reply::Waits(w) if w == s));
    // Nobody but the named peer, at the named position, feeds the waiting step.
    for (peer, pos) in [(stranger, 4), (upstream, 5), (client, 4)] {
        let refused = answered(srv.serve(peer, push(pos), now));
        assert!(
            matches!(
                refused.response,
                SessionResponse::Refused(Refusal::BadRequest(_))
            ),
            "{:?}",
            refused.response
        );
    }
    assert_eq!(decoded(&srv), 0, "nothing ran, nothing is billed");
    // A push for a session this server does not hold.
    let unknown = SessionRequest::Push {
        session: SessionId::random(),
        start_pos: 4,
        hidden: varied(1, 9),
    };
    let refused = answered(srv.serve(upstream, unknown, now));
    assert_eq!(
        refused.response,
        SessionResponse::Refused(Refusal::UnknownSession)
    );

    // The named peer's push runs the step: the same output as the client relaying it.
    let Served { reply, released } = srv.serve(upstream, push(4), now);
    let (session, released) = released.expect("the waiting step runs");
    assert_eq!(session, s);
    assert!(matches!(reply, Reply::Now(a) if a.response == SessionResponse::Acknowledged));
    let want = relayed.handle(
        client,
        SessionRequest::Forward {
            session: s,
            start_pos: 4,
            hidden: varied(1, 9),
        },
        now,
    );
    match want {
        SessionResponse::Hidden { hidden, .. } => assert_eq!(output_of(&released), &hidden),
        other => panic!("{other:?}"),
    }
    assert_eq!(decoded(&srv), 1);

    // A push that comes first runs as soon as the step naming its sender does, and the
    // output is ordered on to the next server's session.
    srv.serve(upstream, push(5), now);
    let next = PushTarget {
        peer: stranger,
        session: SessionId::random(),
    };
    let step = SessionRequest::Step {
        session: s,
        start_pos: 5,
        rewind: false,
        input: StepInput::PushedBy(upstream),
        push_to: Some(next),
    };
    let ran = answered(srv.serve(client, step, now));
    let order = ran.push.as_ref().expect("the output goes on");
    assert_eq!(order.peer, next.peer);
    match &order.request {
        SessionRequest::Push {
            session,
            start_pos,
            hidden,
        } => {
            assert_eq!((*session, *start_pos), (next.session, 5));
            assert_eq!(hidden, output_of(&ran));
        }
        other => panic!("{other:?}"),
    }

    // A newer step ends the one still waiting: its client relayed the input itself.
    assert!(matches!(
        srv.serve(client, waiting(6), now).reply,
        Reply::Waits(_)
    ));
    let relay = SessionRequest::Step {
        session: s,
        start_pos: 6,
        rewind: true,
        input: StepInput::Hidden(varied(1, 3)),
        push_to: None,
    };
    let Served { reply, released } = srv.serve(client, relay, now);
    let (_, ended) = released.expect("the waiting step is ended");
    assert!(matches!(
        ended.response,
        SessionResponse::Refused(Refusal::NoPushedInput(_))
    ));
    assert!(matches!(reply, Reply::Now(a) if matches!(a.response, SessionResponse::Hidden { .. })));
    assert_eq!(decoded(&srv), 3);

    // So does the client sending the input itself as a rewind (its relay after a push
    // that did not come), and closing the session.
    for then in [
        SessionRequest::Rewind {
            session: s,
            to: 7,
            hidden: varied(1, 4),
        },
        SessionRequest::Close { session: s },
    ] {
        assert!(matches!(
            srv.serve(client, waiting(7), now).reply,
            Reply::Waits(_)
        ));
        let Served { released, .. } = srv.serve(client, then, now);
        let (_, ended) = released.expect("the waiting step is ended");
        assert!(matches!(
            ended.response,
            SessionResponse::Refused(Refusal::NoPushedInput(_))
        ));
    }
    assert_eq!(srv.active_sessions(), 0);
}

/// Requests that arrive together: decode steps of different clients run as one pass and
/// answer what each would alone; a session's later request runs after its step.
#[test]
fn decode_steps_served_together_answer_what_each_would_alone() {
    let (_d, mut srv) = server(ServerLimits::default());
    let (_d2, mut alone) = server(ServerLimits::default());
    let now = Instant::now();
    let clients: Vec<(PeerId, SessionId)> = (0..4)
        .map(|_| (PeerId::random(), SessionId::random()))
        .collect();
    for (c, (peer, s)) in clients.iter().enumerate() {
        for srv in [&mut srv, &mut alone] {
            srv.handle(*peer, open(*s, BlockRange::new(2, 6), 64), now);
            let prefill = SessionRequest::Forward {
                session: *s,
                start_pos: 0,
                hidden: varied(2 + c, c),
            };
            assert!(matches!(
                srv.handle(*peer, prefill, now),
                SessionResponse::Hidden { .. }
            ));
        }
    }
    let step = |c: usize, s: SessionId| SessionRequest::Forward {
        session: s,
        start_pos: 2 + c as u32,
        hidden: varied(1, 7 * c),
    };
    let mut requests: Vec<(PeerId, SessionRequest)> = clients
        .iter()
        .enumerate()
        .map(|(c, (peer, s))| (*peer, step(c, *s)))
        .collect();
    // The first client closes its session in the same breath: after its step.
    let (first, s0) = clients[0];
    requests.push((first, SessionRequest::Close { session: s0 }));
    let served = srv.serve_many(requests, now);
    assert_eq!(served.len(), clients.len() + 1);
    for (c, ((peer, s), served)) in clients.iter().zip(&served).enumerate() {
        let got = match &served.reply {
            Reply::Now(a) => output_of(a).clone(),
            Reply::Waits(_) => panic!("waits"),
        };
        let want = match alone.handle(*peer, step(c, *s), now) {
            SessionResponse::Hidden { hidden, .. } => hidden,
            other => panic!("{other:?}"),
        };
        assert_eq!(got, want, "client {c}");
    }
    assert!(matches!(
        &served[clients.len()].reply,
        Reply::Now(a) if matches!(a.response, SessionResponse::Closed { .. })
    ));
    assert_eq!(srv.active_sessions(), clients.len() - 1);
    assert_eq!(srv.stats().decode_tokens, clients.len() as u64);
}

/// Pushes that come together for steps waiting on them run as one pass too: each pusher
/// is acknowledged, each waiting step released with what it would get alone.
#[test]
fn pushes_served_together_release_what_each_step_would_get_alone() {
    let (_d, mut srv) = server(ServerLimits::default());
    let (_d2, mut alone) = server(ServerLimits::default());
    let now = Instant::now();
    let sessions: Vec<(PeerId, PeerId, SessionId)> = (0..3)
        .map(|_| (PeerId::random(), PeerId::random(), SessionId::random()))
        .collect();
    for (client, upstream, s) in &sessions {
        for srv in [&mut srv, &mut alone] {
            srv.handle(*client, open(*s, BlockRange::new(2, 6), 64), now);
        }
        let step = SessionRequest::Step {
            session: *s,
            start_pos: 0,
            rewind: false,
            input: StepInput::PushedBy(*upstream),
            push_to: None,
        };
        assert!(matches!(
            srv.serve(*client, step, now).reply,
            Reply::Waits(_)
        ));
    }
    let pushes: Vec<(PeerId, SessionRequest)> = sessions
        .iter()
        .enumerate()
        .map(|(c, (_, upstream, s))| {
            let push = SessionRequest::Push {
                session: *s,
                start_pos: 0,
                hidden: varied(1, 5 * c),
            };
            (*upstream, push)
        })
        .collect();
    let served = srv.serve_many(pushes, now);
    for (c, ((client, _, s), served)) in sessions.iter().zip(served).enumerate() {
        assert!(
            matches!(served.reply, Reply::Now(a) if a.response == SessionResponse::Acknowledged)
        );
        let (released, answer) = served.released.expect("the waiting step runs");
        assert_eq!(released, *s);
        let fwd = SessionRequest::Forward {
            session: *s,
            start_pos: 0,
            hidden: varied(1, 5 * c),
        };
        match alone.handle(*client, fwd, now) {
            SessionResponse::Hidden { hidden, .. } => assert_eq!(output_of(&answer), &hidden),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(srv.stats().decode_tokens, 3);
}
