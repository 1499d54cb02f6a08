//! `SpanServer` without a network: sessions, limits, refusals and billing.

use super::*;
use crate::model::{tiny, ModelFiles};
use candle_core::{DType, Tensor};

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
