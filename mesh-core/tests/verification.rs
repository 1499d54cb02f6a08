//! Catching a server that lies: one of two servers of the middle span returns corrupted
//! (but well-formed and signed) hidden states. The client re-checks a sampled fraction of
//! steps, catches it, finishes on the honest server with the right output, keeps the
//! evidence, and never countersigns a receipt of the liar.
//!
//! The liar is built from the real parts (a real swarm, the real [`SpanServer`], real
//! signatures); only its answers are altered, as a cheating provider would alter them.

mod test_server;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use mesh_core::ledger::{self, Attestation, ConfigHash, Reference, Reputation, Store};
use mesh_core::local_mesh::{loopback_config, LocalMesh};
use mesh_core::model::{
    tiny, ClientHead, Generation, LocalModel, ModelFiles, SamplingParams, SpanModel,
};
use mesh_core::p2p::{self, Announcement, Role};
use mesh_core::pipeline::session::SessionContext;
use mesh_core::pipeline::{
    self, Billing, ClientLedger, LocalReference, Refusal, RemoteSession, ServerLimits,
    SessionConfig, SessionRequest, SessionResponse, SpanServer, StepInput, VerifyConfig,
};
use mesh_core::types::ServerLoad;
use mesh_core::{wire, BlockRange, ModelId};
use tokio::sync::oneshot;

const PROMPT: &[u32] = &[1, 72, 105, 32, 109, 101, 115, 104];
const PRICE: u64 = 2;
const MIDDLE: BlockRange = BlockRange { start: 3, end: 6 };

fn params() -> SamplingParams {
    SamplingParams {
        max_new_tokens: 24,
        temperature: 0.7,
        seed: 5,
        ..SamplingParams::default()
    }
}

/// Serve `span` like a node, but add 5% of noise to every step's output after the prefill
/// (and sign
/// the altered output, as a cheater must: the client checks signatures on every step).
async fn start_liar(
    model_dir: &std::path::Path,
    boot: p2p::Multiaddr,
    ledger_dir: &std::path::Path,
) -> (p2p::PeerId, oneshot::Sender<()>) {
    let cfg = loopback_config(Role::Server, vec![boot]);
    let key = cfg.identity.signing_key();
    let id = cfg.identity.peer_id();
    let files = ModelFiles::open(model_dir).unwrap();
    let model = SpanModel::load(&files, MIDDLE, DType::F32, &Device::Cpu).unwrap();
    let server = SpanServer::new(
        ModelId::new(tiny::TINY_MODEL_ID),
        model,
        ServerLimits::default(),
    )
    .with_signer(key.clone())
    .with_billing(Billing {
        key: key.clone(),
        server: id,
        store: Store::open(ledger_dir).unwrap(),
        price_per_token: PRICE,
        every_tokens: 4,
        max_unpaid_tokens: 4096,
    })
    .unwrap();
    let server = Arc::new(Mutex::new(server));
    let peer = p2p::spawn(cfg).await.unwrap();
    let ann = Announcement {
        model: ModelId::new(tiny::TINY_MODEL_ID),
        span: MIDDLE,
        num_blocks: 8,
        price_per_token: PRICE,
        load: ServerLoad::default(),
        capability: Default::default(),
        quantization: String::new(),
    };
    let stop = test_server::serve(peer, ann, move |peer, request| {
        // It takes no pushes, so every input it answers is one the client sent.
        let sent = match &request {
            SessionRequest::Forward {
                session,
                start_pos,
                hidden,
            }
            | SessionRequest::Rewind {
                session,
                to: start_pos,
                hidden,
            }
            | SessionRequest::Step {
                session,
                start_pos,
                input: StepInput::Hidden(hidden),
                ..
            } => Some((*session, *start_pos, hidden.clone())),
            SessionRequest::Push { .. } => {
                let refusal = Refusal::BadRequest("this server takes no pushes".into());
                return std::future::ready(SessionResponse::Refused(refusal));
            }
            _ => None,
        };
        let mut response = server.lock().unwrap().handle(peer, request, Instant::now());
        if let (
            Some((session, start_pos, input)),
            SessionResponse::Hidden {
                hidden,
                attestation,
                ..
            },
        ) = (sent, &mut response)
        {
            if start_pos > 0 {
                let t = hidden.to_tensor(&Device::Cpu).unwrap();
                let bent = (&t + (t.abs().unwrap() * 0.05).unwrap()).unwrap();
                *hidden = wire::WireTensor::from_tensor(&bent).unwrap();
                *attestation = Some(Attestation::sign(&key, &session, start_pos, &input, hidden));
            }
        }
        std::future::ready(response)
    });
    (id, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_liar_checked_against_local_weights_is_caught_banned_and_never_paid() {
    let ev = catch_the_liar(true, 1, false).await;
    assert_eq!(ev.reference, Reference::Local);
}

/// Checking covers a draft's multi-position steps: the liar bends them, is caught, and
/// the greedy output is the single process's, rejected positions rewound on the hop and
/// on the check's own state alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_liar_is_caught_under_speculation_checked_against_local_weights() {
    let ev = catch_the_liar(true, 1, true).await;
    assert_eq!(ev.reference, Reference::Local);
}

/// The same against other servers: the witness drops rejected positions as the hop does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_liar_is_caught_under_speculation_checked_against_other_servers() {
    let ev = catch_the_liar(false, 2, true).await;
    assert!(matches!(ev.reference, Reference::Witness { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_liar_checked_against_other_servers_is_outvoted_and_caught() {
    let ev = catch_the_liar(false, 2, false).await;
    let Reference::Witness {
        peer,
        session,
        start_pos,
        attestation,
    } = ev.reference
    else {
        panic!("no local weights were given: {:?}", ev.reference);
    };
    assert_ne!(peer, ev.server);
    // The witness's signed answer covers the positions since its last check.
    assert!(start_pos <= ev.start_pos);
    let att = attestation.expect("witnesses sign");
    att.verify_digests(&peer, &session, start_pos).unwrap();
    assert!(att.verify_digests(&ev.server, &session, start_pos).is_err());
}

/// Session settings that re-check `rate` of each hop's steps.
fn checking(rate: f64) -> SessionConfig {
    SessionConfig {
        verify: VerifyConfig {
            rate,
            ..VerifyConfig::default()
        },
        ..SessionConfig::default()
    }
}

/// The tiny model written under `root`: its directory, files, the client's head, and what
/// one process generates from [`PROMPT`].
fn tiny_model(root: &std::path::Path) -> (std::path::PathBuf, ModelFiles, ClientHead, Vec<u32>) {
    tiny_model_with(root, &params())
}

/// [`tiny_model`], generating with `params`.
fn tiny_model_with(
    root: &std::path::Path,
    params: &SamplingParams,
) -> (std::path::PathBuf, ModelFiles, ClientHead, Vec<u32>) {
    let model_dir = root.join("model");
    tiny::write(&model_dir).unwrap();
    let files = ModelFiles::open(&model_dir).unwrap();
    let head = ClientHead::load(&files, DType::F32, &Device::Cpu).unwrap();
    let want = LocalModel::load_split(&model_dir, 1, &Device::Cpu)
        .unwrap()
        .generate_ids(PROMPT.to_vec(), params, |_| {})
        .unwrap()
        .generated()
        .to_vec();
    (model_dir, files, head, want)
}

/// A mesh whose middle span is served by the liar (alone when the session opens, so the
/// route goes through it) and then by `honest_middles` honest servers; a generation with
/// half the steps checked, locally or against other servers, and with a draft model when
/// `speculate` (greedy then, so the output is the single process's whatever the draft).
/// Returns the evidence kept.
async fn catch_the_liar(
    check_locally: bool,
    honest_middles: usize,
    speculate: bool,
) -> ledger::Evidence {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn,mesh_core=info")
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let params = if speculate {
        SamplingParams::greedy(24)
    } else {
        params()
    };
    let (model_dir, files, head, want) = tiny_model_with(dir.path(), &params);

    // The liar is the only server of the middle span when the session opens, so the
    // route goes through it; the honest server joins right after.
    let mut mesh = LocalMesh::start(&model_dir, &[]).await.unwrap();
    mesh.billing = Some((dir.path().join("ledgers"), PRICE));
    mesh.add_node(BlockRange::new(0, 3)).await.unwrap();
    mesh.add_node(BlockRange::new(6, 8)).await.unwrap();
    let (liar, stop_liar) = start_liar(
        &model_dir,
        mesh.bootstrap_addr().clone(),
        &dir.path().join("liar-ledger"),
    )
    .await;

    let (client, ledger) = billed_client(&mesh, &files, dir.path()).await;
    let store = ledger.store.clone();
    pipeline::wait_for_coverage(&client.client, mesh.model(), 8, Duration::from_secs(30))
        .await
        .unwrap();
    let ctx = SessionContext {
        ledger: Some(ledger),
        reputation: Reputation::persistent(store.clone()),
        reference: check_locally
            .then(|| Arc::new(Mutex::new(LocalReference::new(model_dir.clone())))),
        fallback: None,
    };
    let cfg = checking(0.5);
    let mut session =
        RemoteSession::open_with(client.client.clone(), mesh.model().clone(), 8, cfg, ctx)
            .await
            .unwrap();
    assert!(
        session.route().iter().any(|h| h.peer == liar),
        "route {:?}",
        session.route()
    );
    let mut honest = Vec::new();
    for _ in 0..honest_middles {
        honest.push(mesh.add_node(MIDDLE).await.unwrap());
    }
    // Find them through the DHT (which also dials them), as a client does when it starts.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = client
            .client
            .discover(mesh.model(), 8)
            .await
            .unwrap_or_default();
        let live = client.client.live_servers(mesh.model()).await.unwrap();
        let known = |h: &p2p::PeerId| {
            found.iter().any(|s| s.peer_id == *h) && live.iter().any(|s| s.peer_id == *h)
        };
        if honest.iter().all(known) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the honest servers were never found"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut generation = Generation::new(PROMPT.to_vec(), params, 512).unwrap();
    if speculate {
        // A draft that often disagrees (two random blocks, the same byte vocabulary), so
        // checked positions get rewound.
        let draft_dir = dir.path().join("draft");
        let mut cfg = tiny::config();
        cfg.num_hidden_layers = 2;
        tiny::write_random(&draft_dir, &cfg).unwrap();
        let draft = pipeline::DraftModel::load(&draft_dir, cfg.vocab_size).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let stats = pipeline::generate_speculative(
            &head,
            &mut session,
            &mut generation,
            &draft,
            4,
            512,
            &tx,
        )
        .await
        .unwrap();
        drop(tx);
        drain.await.unwrap();
        println!("{stats:?}");
        assert!(
            stats.proposed > stats.accepted,
            "nothing rewound: {stats:?}"
        );
    } else {
        pipeline::generate(&head, &mut session, &mut generation, |_| {})
            .await
            .unwrap();
    }
    assert_eq!(
        generation.generated(),
        want.as_slice(),
        "output differs from one process"
    );
    assert_eq!(session.caught(), &[liar]);
    assert!(session.banned().contains(&liar));
    assert!(session.route().iter().any(|h| honest.contains(&h.peer)));
    session.close().await;

    // Evidence: the liar's own signature over its wrong output, and what it should have been.
    let evidence = store.evidence(10).unwrap();
    assert_eq!(evidence.len(), 1);
    let ev = evidence[0].clone();
    assert_eq!((ev.server, ev.span), (liar, MIDDLE));
    assert!(ev.difference > 0.01, "difference {}", ev.difference);
    println!(
        "caught at position {} of the session, off by {:.3} relative",
        ev.start_pos, ev.difference
    );
    ev.claimed
        .expect("the liar signed its step")
        .verify_digests(&liar, &ev.session, ev.start_pos)
        .unwrap();
    assert_eq!(
        ledger::attestation::digest(&ev.claimed_output),
        ev.claimed.unwrap().output
    );
    // Reputation keeps the liar out of later routes.
    let rep = Reputation::persistent(store.clone());
    assert_eq!(rep.get(&liar).mismatches, 1);
    assert_eq!(rep.route_penalty_ms(&liar), None);

    // The client countersigned the honest servers' work and none of the liar's.
    let countersigned: Vec<_> = store
        .entries()
        .map(|e| e.unwrap())
        .filter_map(|e| e.countersigned)
        .collect();
    assert!(countersigned.iter().all(|r| r.receipt.terms.server != liar));
    assert!(countersigned
        .iter()
        .any(|r| honest.contains(&r.receipt.terms.server)));

    let _ = stop_liar.send(());
    mesh.stop().await.unwrap();
    ev
}

/// Checking every step against the client's own weights costs each hop its history once,
/// not once per check: the client keeps each hop's KV state between checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_checks_run_each_position_once() {
    let dir = tempfile::tempdir().unwrap();
    let (model_dir, _, head, want) = tiny_model(dir.path());
    let mesh = LocalMesh::start(&model_dir, &BlockRange::even_split(8, 3))
        .await
        .unwrap();
    let client = mesh.client().await.unwrap();
    let reference = Arc::new(Mutex::new(LocalReference::new(model_dir.clone())));
    let ctx = SessionContext {
        reference: Some(reference.clone()),
        ..SessionContext::default()
    };
    let hops = generate_checking_every_step(&client, &mesh, &head, &want, ctx).await;
    // Every position the servers ran was checked exactly once: the prompt, then every
    // generated token but the last (which is sampled, never sent).
    let sent = (PROMPT.len() + want.len() - 1) as u64;
    let run = reference.lock().unwrap().positions_run();
    println!("{hops} hops, {sent} positions each, {run} run locally");
    assert_eq!(run, hops * sent);
    mesh.stop().await.unwrap();
}

/// Checking every step against another server costs each hop's history once more, not
/// once per check: the witness keeps its session (and KV state) between checks. Counted
/// from the receipts the servers billed and the client countersigned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn witness_checks_run_each_position_once() {
    let dir = tempfile::tempdir().unwrap();
    let (model_dir, files, head, want) = tiny_model(dir.path());
    let spans = BlockRange::even_split(8, 3);
    let mut mesh = LocalMesh::start(&model_dir, &[]).await.unwrap();
    mesh.billing = Some((dir.path().join("ledgers"), PRICE));
    for span in spans.iter().chain(&spans) {
        mesh.add_node(*span).await.unwrap();
    }
    let (client, ledger) = billed_client(&mesh, &files, dir.path()).await;
    let store = ledger.store.clone();
    // Every server known, so each hop has a witness from the first check on.
    hear_from(&client, &mesh, 2 * spans.len()).await;
    let ctx = SessionContext {
        ledger: Some(ledger),
        ..SessionContext::default()
    };
    let hops = generate_checking_every_step(&client, &mesh, &head, &want, ctx).await;

    let billed: u64 = store
        .entries()
        .map(|e| {
            e.unwrap()
                .countersigned
                .expect("every session was countersigned")
        })
        .map(|r| r.receipt.prefill_tokens + r.receipt.decode_tokens)
        .sum();
    let sent = (PROMPT.len() + want.len() - 1) as u64;
    println!("{hops} hops, {sent} positions each, {billed} positions billed in all");
    // Each position once by the hop's server and once by its witness.
    assert_eq!(billed, 2 * hops * sent);
    mesh.stop().await.unwrap();
}

/// A witness that fails is not asked again this session: with the only other server of
/// the span gone, the first check finds it dead, bans it and notes one failure, and the
/// generation still finishes with the right output (unchecked, as with no witness).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_witness_is_dropped_and_not_asked_again() {
    let dir = tempfile::tempdir().unwrap();
    let (model_dir, _, head, want) = tiny_model(dir.path());
    let whole = BlockRange::new(0, 8);
    let mut mesh = LocalMesh::start(&model_dir, &[whole, whole]).await.unwrap();
    let client = mesh.client().await.unwrap();
    hear_from(&client, &mesh, 2).await;
    let reputation = Reputation::in_memory();
    let ctx = SessionContext {
        reputation: reputation.clone(),
        ..SessionContext::default()
    };
    let model = mesh.model().clone();
    let mut session = RemoteSession::open_with(client.client.clone(), model, 8, checking(1.0), ctx)
        .await
        .unwrap();
    let serving = session.route()[0].peer;
    let (witness, _) = mesh
        .servers()
        .into_iter()
        .find(|(p, _)| *p != serving)
        .unwrap();
    mesh.crash(witness);

    let mut generation = Generation::new(PROMPT.to_vec(), params(), 512).unwrap();
    pipeline::generate(&head, &mut session, &mut generation, |_| {})
        .await
        .unwrap();
    assert_eq!(generation.generated(), want.as_slice());
    assert!(session.banned().contains(&witness));
    assert!(!session.banned().contains(&serving));
    let record = reputation.get(&witness);
    assert_eq!(record.failures + record.timeouts, 1, "{record:?}");
    session.close().await;
    mesh.stop().await.unwrap();
}

/// One generation from [`PROMPT`] with every step checked, on honest servers: the output
/// is `want` and nobody is caught. Returns the route's hop count.
async fn generate_checking_every_step(
    client: &p2p::Peer,
    mesh: &LocalMesh,
    head: &ClientHead,
    want: &[u32],
    ctx: SessionContext,
) -> u64 {
    let model = mesh.model().clone();
    let mut session = RemoteSession::open_with(client.client.clone(), model, 8, checking(1.0), ctx)
        .await
        .unwrap();
    let hops = session.route().len() as u64;
    let mut generation = Generation::new(PROMPT.to_vec(), params(), 512).unwrap();
    pipeline::generate(head, &mut session, &mut generation, |_| {})
        .await
        .unwrap();
    assert_eq!(generation.generated(), want);
    assert!(session.caught().is_empty() && session.banned().is_empty());
    session.close().await;
    hops
}

/// A client peer of `mesh` with its own ledger under `root`, countersigning receipts.
async fn billed_client(
    mesh: &LocalMesh,
    files: &ModelFiles,
    root: &std::path::Path,
) -> (p2p::Peer, ClientLedger) {
    let cfg = loopback_config(Role::Client, vec![mesh.bootstrap_addr().clone()]);
    let ledger = ClientLedger {
        store: Store::open(&root.join("client-ledger")).unwrap(),
        key: cfg.identity.signing_key(),
        config_hash: ConfigHash::of(&files.config).unwrap(),
    };
    (p2p::spawn(cfg).await.unwrap(), ledger)
}

/// Wait until `client` has heard the heartbeats of `servers` servers of `mesh`.
async fn hear_from(client: &p2p::Peer, mesh: &LocalMesh, servers: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .client
        .live_servers(mesh.model())
        .await
        .unwrap()
        .len()
        < servers
    {
        assert!(Instant::now() < deadline, "servers never all heard from");
        let _ = client.client.discover(mesh.model(), 8).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
