//! Receipts end to end: metered by real span servers, countersigned by the client, stored,
//! tampered with, replayed, settled and verified offline.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use libp2p::PeerId;
use mesh_core::identity::Identity;
use mesh_core::ledger::{
    self, ClientTally, ConfigHash, LedgerError, Meter, Receipt, Role, SettleOptions, SignedReceipt,
    Store, Terms,
};
use mesh_core::model::{tiny, ModelFiles, SpanModel};
use mesh_core::pipeline::{ServerLimits, SessionRequest, SessionResponse, SpanServer};
use mesh_core::wire::WireTensor;
use mesh_core::{BlockRange, ModelId, SessionId};

const DAY_MS: u64 = 86_400_000;

fn terms(server: &Identity, client: &Identity, span: BlockRange, price: u64) -> Terms {
    Terms {
        session: SessionId::random(),
        client: client.peer_id(),
        server: server.peer_id(),
        model: ModelId::new(tiny::TINY_MODEL_ID),
        config_hash: ConfigHash::of(&tiny::config()).unwrap(),
        span,
        price_per_token: price,
    }
}

fn store(dir: &Path, name: &str) -> Store {
    Store::open(&dir.join(name)).unwrap()
}

/// One server's side of a hop: its span server, its meter and its ledger.
struct ServerSide {
    id: Identity,
    srv: SpanServer,
    store: Store,
    meter: Option<Meter>,
}

/// A client's side of a hop.
struct Hop {
    terms: Terms,
    tally: ClientTally,
}

#[test]
fn three_node_generation_yields_three_countersigned_receipts_matching_the_work() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write(&dir.path().join("model")).unwrap();
    let files = ModelFiles::open(&dir.path().join("model")).unwrap();
    let client = Identity::generate();
    let client_store = store(dir.path(), "client.db");
    let spans = BlockRange::even_split(8, 3);
    let now = Instant::now();
    let (price, every) = (3, 4);

    let mut servers: Vec<ServerSide> = spans
        .iter()
        .enumerate()
        .map(|(i, &span)| ServerSide {
            id: Identity::generate(),
            srv: SpanServer::new(
                ModelId::new(tiny::TINY_MODEL_ID),
                SpanModel::load(&files, span, DType::F32, &Device::Cpu).unwrap(),
                ServerLimits::default(),
            ),
            store: store(dir.path(), &format!("server{i}.db")),
            meter: None,
        })
        .collect();

    // The client opens a session on each hop and records it.
    let mut hops: Vec<Hop> = Vec::new();
    for s in servers.iter_mut() {
        let span = s.srv.span().range();
        let t = terms(&s.id, &client, span, price);
        client_store.record_opened(&t).unwrap();
        let open = SessionRequest::Open {
            session: t.session,
            model: t.model.clone(),
            span,
            max_len: 64,
            attest: true,
        };
        assert!(matches!(
            s.srv.handle(client.peer_id(), open, now),
            SessionResponse::Opened { .. }
        ));
        s.meter = Some(Meter::new(t.clone(), 1_000, every).unwrap());
        hops.push(Hop {
            tally: ClientTally::new(t.clone()),
            terms: t,
        });
    }

    // A 5-token prompt, then 6 decode steps, through the chain.
    let steps: Vec<usize> = std::iter::once(5)
        .chain(std::iter::repeat_n(1, 6))
        .collect();
    let mut pos = 0u32;
    let mut t_ms = 1_000;
    for &seq in &steps {
        let mut x = Tensor::ones((1, seq, 128), DType::F32, &Device::Cpu).unwrap();
        for (s, hop) in servers.iter_mut().zip(hops.iter_mut()) {
            hop.tally.record_positions(seq as u64);
            let fwd = SessionRequest::Forward {
                session: hop.terms.session,
                start_pos: pos,
                hidden: WireTensor::from_tensor(&x).unwrap(),
            };
            x = match s.srv.handle(client.peer_id(), fwd, now) {
                SessionResponse::Hidden { hidden, .. } => hidden.to_tensor(&Device::Cpu).unwrap(),
                other => panic!("{other:?}"),
            };
            // The server meters the usage it counted itself.
            t_ms += 10;
            let usage = s.srv.usage()[0];
            let meter = s.meter.as_mut().unwrap();
            if let Some(r) = meter
                .observe(usage.prefill_tokens, usage.decode_tokens, t_ms)
                .unwrap()
            {
                let signed = r.sign(&s.id.signing_key()).unwrap();
                s.store.put(&signed).unwrap();
                let cs = client_store
                    .accept_as_client(signed, &hop.tally, &client.signing_key())
                    .unwrap();
                s.store.put(&cs).unwrap();
            }
        }
        pos += seq as u32;
    }
    // Session ends: the last receipt covers the rest.
    for (s, hop) in servers.iter_mut().zip(hops.iter()) {
        let usage = s.srv.usage()[0];
        let meter = s.meter.as_mut().unwrap();
        if let Some(r) = meter
            .finish(usage.prefill_tokens, usage.decode_tokens, t_ms + 5)
            .unwrap()
        {
            let signed = r.sign(&s.id.signing_key()).unwrap();
            let cs = client_store
                .accept_as_client(signed, &hop.tally, &client.signing_key())
                .unwrap();
            s.store.put(&cs).unwrap();
        }
    }

    let mut total = 0;
    for (s, hop) in servers.iter().zip(hops.iter()) {
        let e = s
            .store
            .entry(&hop.terms.session, &s.id.peer_id())
            .unwrap()
            .unwrap();
        let cs = e.countersigned.unwrap();
        cs.verify_countersigned().unwrap();
        assert_eq!(cs, e.latest);
        let r = &cs.receipt;
        assert_eq!((r.prefill_tokens, r.decode_tokens), (5, 6));
        assert_eq!(
            (r.prefill_tokens, r.decode_tokens),
            (hop.tally.prefill_tokens(), hop.tally.decode_tokens())
        );
        assert_eq!(r.amount, 11 * u64::from(r.terms.span.len()) * price);
        // 5 + 4 + 2 tokens: receipts at 5 and 9 tokens, the last at 11.
        assert_eq!(r.seq, 3);
        total += r.amount;
        s.store.audit().unwrap();
    }
    // 11 tokens through all 8 blocks at 3 each.
    assert_eq!(total, 11 * 8 * price);
    assert_eq!(
        client_store
            .totals(&client.peer_id())
            .unwrap()
            .confirmed_amount,
        total
    );
    let audit = client_store.audit().unwrap();
    assert_eq!((audit.hops, audit.countersigned), (3, 3));
}

fn signed_receipt(server: &Identity, client: &Identity) -> SignedReceipt {
    let t = terms(server, client, BlockRange::new(2, 5), 7);
    Receipt::new(t, 6, 3, 1_000, 2_000, 1)
        .unwrap()
        .sign(&server.signing_key())
        .unwrap()
}

#[test]
fn any_changed_field_or_swapped_key_is_rejected() {
    let (server, client, other) = (
        Identity::generate(),
        Identity::generate(),
        Identity::generate(),
    );
    let good = signed_receipt(&server, &client);
    good.verify_server().unwrap();

    type Tamper = fn(&mut SignedReceipt, &Identity);
    let tampers: Vec<(&str, Tamper)> = vec![
        ("session", |s, _| s.receipt.terms.session.0[0] ^= 1),
        ("client", |s, o| s.receipt.terms.client = o.peer_id()),
        ("server", |s, o| s.receipt.terms.server = o.peer_id()),
        ("model", |s, _| {
            s.receipt.terms.model = ModelId::new("other")
        }),
        ("config", |s, _| s.receipt.terms.config_hash.0[31] ^= 1),
        ("span", |s, _| {
            s.receipt.terms.span = BlockRange::new(2, 6);
            s.receipt.amount = 9 * 4 * 7;
        }),
        ("price", |s, _| {
            s.receipt.terms.price_per_token = 8;
            s.receipt.amount = 9 * 3 * 8;
        }),
        ("prefill", |s, _| {
            s.receipt.prefill_tokens = 7;
            s.receipt.amount = 10 * 3 * 7;
        }),
        ("decode", |s, _| {
            s.receipt.decode_tokens = 2;
            s.receipt.amount = 8 * 3 * 7;
        }),
        ("start", |s, _| s.receipt.start_ms -= 1),
        ("end", |s, _| s.receipt.end_ms += 1),
        ("seq", |s, _| s.receipt.seq = 2),
        ("signature", |s, _| s.server_sig.0[5] ^= 1),
    ];
    for (field, tamper) in tampers {
        let mut bad = good.clone();
        tamper(&mut bad, &other);
        let err = bad.verify_server().unwrap_err();
        assert!(
            matches!(err, LedgerError::BadSignature { role: Role::Server }),
            "{field}: {err}"
        );
    }
    // An amount that is not tokens x blocks x price is caught before the signature.
    let mut bad = good.clone();
    bad.receipt.amount += 1;
    assert!(matches!(
        bad.verify_server(),
        Err(LedgerError::AmountMismatch { .. })
    ));
    // Re-signed by another key: the key does not match the server named in the receipt.
    let forged = Receipt {
        ..good.receipt.clone()
    };
    assert!(matches!(
        forged.clone().sign(&other.signing_key()),
        Err(LedgerError::WrongKey { .. })
    ));
    // ...and a signature made by another key over the same bytes does not verify.
    let sig = ed25519_dalek::Signer::sign(
        &other.signing_key(),
        &forged.server_signing_bytes().unwrap(),
    );
    let mut swapped = good.clone();
    swapped.server_sig = ledger::Sig(sig.to_bytes());
    assert!(swapped.verify_server().is_err());

    // Countersigned, then tampered: the client signature fails.
    let mut cs = good.clone();
    let mut tally = ClientTally::new(cs.receipt.terms.clone());
    tally.record_positions(6);
    for _ in 0..3 {
        tally.record_positions(1);
    }
    cs.countersign(&client.signing_key(), &tally).unwrap();
    cs.verify_countersigned().unwrap();
    let mut bad = cs.clone();
    bad.client_sig.as_mut().unwrap().0[0] ^= 1;
    assert!(matches!(
        bad.verify_countersigned(),
        Err(LedgerError::BadSignature { role: Role::Client })
    ));
}

#[test]
fn client_refuses_unopened_sessions_overclaims_and_replays() {
    let dir = tempfile::tempdir().unwrap();
    let (server, client) = (Identity::generate(), Identity::generate());
    let cstore = store(dir.path(), "client.db");
    let t = terms(&server, &client, BlockRange::new(0, 4), 2);
    let mut tally = ClientTally::new(t.clone());
    tally.record_positions(5);
    let mut meter = Meter::new(t.clone(), 100, 1).unwrap();
    let r1 = meter.observe(5, 0, 200).unwrap().unwrap();
    let s1 = r1.sign(&server.signing_key()).unwrap();

    // Never opened.
    assert!(matches!(
        cstore.accept_as_client(s1.clone(), &tally, &client.signing_key()),
        Err(LedgerError::UnknownSession(_))
    ));
    cstore.record_opened(&t).unwrap();
    let cs1 = cstore
        .accept_as_client(s1.clone(), &tally, &client.signing_key())
        .unwrap();
    // The same receipt again, or an older one, is a replay.
    assert!(matches!(
        cstore.accept_as_client(s1.clone(), &tally, &client.signing_key()),
        Err(LedgerError::Replay {
            seq: 1,
            highest: 1,
            ..
        })
    ));
    assert!(matches!(cstore.put(&cs1), Err(LedgerError::Replay { .. })));

    // The server claims a decode token the client never sent.
    let r2 = meter.observe(5, 1, 300).unwrap().unwrap();
    let s2 = r2.sign(&server.signing_key()).unwrap();
    assert!(matches!(
        cstore.accept_as_client(s2.clone(), &tally, &client.signing_key()),
        Err(LedgerError::MoreThanSent {
            kind: "decode",
            claimed: 1,
            sent: 0
        })
    ));
    tally.record_positions(1);
    let cs2 = cstore
        .accept_as_client(s2, &tally, &client.signing_key())
        .unwrap();
    assert_eq!(cs2.receipt.seq, 2);
    assert!(matches!(
        cstore.put(&cs1),
        Err(LedgerError::Replay {
            seq: 1,
            highest: 2,
            ..
        })
    ));

    // Terms other than the ones opened (a higher price, signed properly by the server).
    let mut pricier = t.clone();
    pricier.price_per_token = 3;
    let s3 = Receipt::new(pricier, 5, 1, 100, 400, 3)
        .unwrap()
        .sign(&server.signing_key())
        .unwrap();
    assert!(matches!(
        cstore.accept_as_client(s3, &tally, &client.signing_key()),
        Err(LedgerError::TermsMismatch { field: "price" })
    ));
    // A later receipt with fewer tokens than an earlier one.
    let s4 = Receipt::new(t.clone(), 5, 0, 100, 500, 4)
        .unwrap()
        .sign(&server.signing_key())
        .unwrap();
    assert!(matches!(
        cstore.accept_as_client(s4, &tally, &client.signing_key()),
        Err(LedgerError::NotMonotonic { .. })
    ));
    assert_eq!(
        cstore.get(&t.session, &server.peer_id()).unwrap(),
        Some(cs2)
    );
    cstore.audit().unwrap();
}

#[test]
fn server_cut_off_mid_session_keeps_a_valid_receipt_for_what_it_served() {
    let dir = tempfile::tempdir().unwrap();
    let (server, client) = (Identity::generate(), Identity::generate());
    let t = terms(&server, &client, BlockRange::new(0, 2), 5);
    let cstore = store(dir.path(), "client.db");
    cstore.record_opened(&t).unwrap();
    let path = dir.path().join("server.db");
    {
        let sstore = Store::open(&path).unwrap();
        let mut meter = Meter::new(t.clone(), 10, 4).unwrap();
        let mut tally = ClientTally::new(t.clone());
        tally.record_positions(3);
        let (prefill, mut decode) = (3, 0);
        for step in 0..10 {
            if step > 0 {
                tally.record_positions(1);
                decode += 1;
            }
            if let Some(r) = meter.observe(prefill, decode, 20 + step).unwrap() {
                let s = r.sign(&server.signing_key()).unwrap();
                sstore.put(&s).unwrap();
                let cs = cstore
                    .accept_as_client(s, &tally, &client.signing_key())
                    .unwrap();
                sstore.put(&cs).unwrap();
            }
        }
        // Two more tokens served, their receipt signed and stored, and then the server dies
        // before the client countersigns it.
        decode += 2;
        let last = meter.finish(prefill, decode, 40).unwrap().unwrap();
        sstore
            .put(&last.sign(&server.signing_key()).unwrap())
            .unwrap();
        // Dropped without closing anything.
    }
    let sstore = Store::open(&path).unwrap();
    let e = sstore
        .entry(&t.session, &server.peer_id())
        .unwrap()
        .unwrap();
    // The newest receipt covers all 14 tokens, signed by the server only...
    e.latest.verify_server().unwrap();
    assert!(!e.latest.is_countersigned());
    assert_eq!(e.latest.receipt.tokens(), 14);
    // ...and the countersigned one the 12 the client confirmed: it is paid for those.
    let cs = e.countersigned.unwrap();
    cs.verify_countersigned().unwrap();
    assert_eq!(
        (cs.receipt.prefill_tokens, cs.receipt.decode_tokens),
        (3, 9)
    );
    let unpaid = ledger::unpaid_by_client(&sstore, &server.peer_id()).unwrap();
    assert_eq!(unpaid.len(), 1);
    assert_eq!(unpaid[0].client, client.peer_id());
    assert_eq!(unpaid[0].amount, 2 * 2 * 5);
    let one = ledger::unpaid_of(&sstore, &server.peer_id(), &client.peer_id(), 100).unwrap();
    assert_eq!(one.amount, 20);
    sstore.audit().unwrap();
}

/// A server store with countersigned receipts from two clients over two days, plus one
/// receipt never countersigned.
fn ledger_with_history(dir: &Path) -> (Identity, Identity, Identity, Store) {
    let server = Identity::generate();
    let (alice, bob) = (Identity::generate(), Identity::generate());
    let st = store(dir, "server.db");
    let day0 = 20_000 * DAY_MS;
    let add = |client: &Identity, start: u64, tokens: (u64, u64), sign: bool| {
        let t = terms(&server, client, BlockRange::new(0, 4), 10);
        let r = Receipt::new(t.clone(), tokens.0, tokens.1, start, start + 500, 1).unwrap();
        let mut s = r.sign(&server.signing_key()).unwrap();
        if sign {
            let mut tally = ClientTally::new(t);
            tally.record_positions(tokens.0);
            (0..tokens.1).for_each(|_| tally.record_positions(1));
            s.countersign(&client.signing_key(), &tally).unwrap();
        }
        st.put(&s).unwrap();
        s
    };
    add(&alice, day0 + 1_000, (10, 5), true); // 600
    add(&alice, day0 + DAY_MS + 7, (2, 3), true); // 200
    add(&bob, day0 + 5_000, (2, 0), true); // 80
    add(&bob, day0 + 6_000, (4, 0), false); // 160, unconfirmed
    (server, alice, bob, st)
}

#[test]
fn earnings_by_day_and_model_and_totals() {
    let dir = tempfile::tempdir().unwrap();
    let (server, alice, bob, st) = ledger_with_history(dir.path());
    let rows = ledger::earnings(&st, &server.peer_id(), 0).unwrap();
    let got: Vec<(String, u64, u64, u64)> = rows
        .iter()
        .map(|r| (r.day.clone(), r.sessions, r.amount, r.confirmed))
        .collect();
    assert_eq!(
        got,
        vec![
            ("2024-10-04".to_string(), 3, 840, 680),
            ("2024-10-05".to_string(), 1, 200, 200),
        ]
    );
    assert!(rows.iter().all(|r| r.model.as_str() == tiny::TINY_MODEL_ID));
    let t = st.totals(&alice.peer_id()).unwrap();
    assert_eq!((t.sessions, t.amount, t.confirmed_amount), (2, 800, 800));
    let t = st.totals(&server.peer_id()).unwrap();
    assert_eq!((t.sessions, t.amount, t.confirmed_amount), (4, 1040, 880));
    assert_eq!(st.by_peer(&bob.peer_id(), 10).unwrap().len(), 2);
    assert_eq!(st.by_peer(&PeerId::random(), 10).unwrap().len(), 0);
    let day0 = 20_000 * DAY_MS;
    assert_eq!(st.by_time(day0, day0 + DAY_MS, 10).unwrap().len(), 3);
    assert_eq!(st.by_time(day0, day0 + DAY_MS, 2).unwrap().len(), 2);
    assert_eq!(st.by_time(day0 + DAY_MS, u64::MAX, 10).unwrap().len(), 1);
}

#[test]
fn settle_dry_run_then_for_real_and_verify_batch_offline() {
    let dir = tempfile::tempdir().unwrap();
    let (server, alice, bob, st) = ledger_with_history(dir.path());
    let opts = SettleOptions {
        payee: server.peer_id(),
        since_ms: 0,
        min_amount: 100,
        dry_run: true,
        now_ms: 1,
    };
    let file = dir.path().join("batch.json");
    let batch = ledger::settle(&st, &opts, &file).unwrap();
    // Bob owes only 80 countersigned: under min_amount, left for later.
    assert_eq!(batch.lines.len(), 2);
    assert_eq!(batch.total_due, 800);
    assert_eq!(batch.payers.len(), 1);
    assert_eq!(batch.payers[0].client, alice.peer_id());
    let summary = ledger::verify_batch(&file).unwrap();
    assert_eq!((summary.lines, summary.total_due), (2, 800));
    assert!(summary.to_string().contains("800 due"));
    // A dry run marks nothing.
    assert_eq!(ledger::plan(&st, &opts).unwrap().lines, batch.lines);
    assert_eq!(st.totals(&server.peer_id()).unwrap().settled_amount, 0);

    // For real, with bob included now.
    let opts = SettleOptions {
        dry_run: false,
        min_amount: 10,
        ..opts
    };
    let batch = ledger::settle(&st, &opts, &file).unwrap();
    assert_eq!((batch.lines.len(), batch.total_due), (3, 880));
    ledger::verify_batch(&file).unwrap();
    assert!(ledger::plan(&st, &opts).unwrap().lines.is_empty());
    assert_eq!(st.totals(&server.peer_id()).unwrap().settled_amount, 880);
    assert_eq!(st.totals(&bob.peer_id()).unwrap().settled_amount, 80);

    // A later countersigned receipt for a settled hop: only the difference is due.
    let first = batch.lines[0].receipt.clone();
    let t = first.receipt.terms.clone();
    let r = Receipt::new(
        t.clone(),
        first.receipt.prefill_tokens,
        first.receipt.decode_tokens + 2,
        first.receipt.start_ms,
        first.receipt.end_ms + 10,
        2,
    )
    .unwrap();
    let mut s = r.sign(&server.signing_key()).unwrap();
    let mut tally = ClientTally::new(t.clone());
    tally.record_positions(first.receipt.prefill_tokens);
    (0..first.receipt.decode_tokens + 2).for_each(|_| tally.record_positions(1));
    let payer = if t.client == alice.peer_id() {
        &alice
    } else {
        &bob
    };
    s.countersign(&payer.signing_key(), &tally).unwrap();
    st.put(&s).unwrap();
    let next = ledger::plan(&st, &opts).unwrap();
    assert_eq!(next.lines.len(), 1);
    assert_eq!(next.lines[0].already_settled, first.receipt.amount);
    assert_eq!(next.lines[0].due, 2 * 4 * 10);
    next.verify().unwrap();
    st.audit().unwrap();
}

fn edit(file: &Path, out: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(out, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

#[test]
fn forged_batch_lines_fail_with_a_message_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let (server, ..) = ledger_with_history(dir.path());
    let st = Store::open(&dir.path().join("server.db")).unwrap();
    let file = dir.path().join("batch.json");
    let opts = SettleOptions {
        payee: server.peer_id(),
        since_ms: 0,
        min_amount: 0,
        dry_run: true,
        now_ms: 1,
    };
    let batch = ledger::settle(&st, &opts, &file).unwrap();
    assert_eq!(batch.lines.len(), 3);
    let forged = dir.path().join("forged.json");

    // More tokens, amount and totals adjusted to match: the signatures catch it.
    edit(&file, &forged, |v| {
        let r = &mut v["lines"][1]["receipt"]["receipt"];
        let decode = r["decode_tokens"].as_u64().unwrap();
        r["decode_tokens"] = (decode + 100).into();
        let amount = r["amount"].as_u64().unwrap() + 100 * 4 * 10;
        r["amount"] = amount.into();
        v["lines"][1]["due"] = amount.into();
    });
    let err = ledger::verify_batch(&forged).unwrap_err().to_string();
    let session = batch.lines[1].receipt.receipt.terms.session.to_string();
    assert!(err.starts_with("batch line 1 (session "), "{err}");
    assert!(err.contains(&session), "{err}");
    assert!(err.contains("server signature does not verify"), "{err}");

    // A due that is not amount - already_settled.
    edit(&file, &forged, |v| {
        v["lines"][2]["due"] = 1.into();
    });
    let err = ledger::verify_batch(&forged).unwrap_err().to_string();
    assert!(err.starts_with("batch line 2 "), "{err}");
    assert!(err.contains("due 1"), "{err}");

    // The client signature replaced by another one.
    edit(&file, &forged, |v| {
        let sig = v["lines"][0]["receipt"]["server_sig"].clone();
        v["lines"][0]["receipt"]["client_sig"] = sig;
    });
    let err = ledger::verify_batch(&forged).unwrap_err().to_string();
    assert!(err.starts_with("batch line 0 "), "{err}");
    assert!(err.contains("client signature"), "{err}");

    // A line removed: the totals no longer add up.
    edit(&file, &forged, |v| {
        v["lines"].as_array_mut().unwrap().remove(0);
    });
    let err = ledger::verify_batch(&forged).unwrap_err().to_string();
    assert!(err.contains("payer totals"), "{err}");

    // Not a batch at all.
    std::fs::write(&forged, b"{\"format\": 1}").unwrap();
    assert!(matches!(
        ledger::verify_batch(&forged),
        Err(LedgerError::Json { .. })
    ));
    // The original still verifies.
    ledger::verify_batch(&file).unwrap();
}
