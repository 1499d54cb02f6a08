//! Real swarms on loopback in one process ([`LocalMesh`]): bootstrap, span servers,
//! clients. The process-level versions (separate OS processes) live in mesh-node/tests.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use mesh_core::local_mesh::LocalMesh;
use mesh_core::model::{tiny, ClientHead, Generation, LocalModel, ModelFiles, SamplingParams};
use mesh_core::pipeline::{self, PipelineError, RemoteSession, SessionConfig};
use mesh_core::BlockRange;

const PROMPT: &[u32] = &[1, 72, 105, 32, 109, 101, 115, 104];

fn params() -> SamplingParams {
    SamplingParams {
        max_new_tokens: 12,
        temperature: 0.7,
        seed: 11,
        ..SamplingParams::default()
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    mesh: LocalMesh,
    head: ClientHead,
    want: Vec<u32>,
}

async fn fixture(spans: &[BlockRange]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    tiny::write(dir.path()).unwrap();
    let local = LocalModel::load_split(dir.path(), 1, &Device::Cpu).unwrap();
    let want = local
        .generate_ids(PROMPT.to_vec(), &params(), |_| {})
        .unwrap()
        .generated()
        .to_vec();
    let files = ModelFiles::open(dir.path()).unwrap();
    let head = ClientHead::load(&files, DType::F32, &Device::Cpu).unwrap();
    let mesh = LocalMesh::start(dir.path(), spans).await.unwrap();
    Fixture {
        _dir: dir,
        mesh,
        head,
        want,
    }
}

/// A session over the whole model through `f`'s mesh, with the default settings.
async fn open_default(f: &Fixture, client: &mesh_core::p2p::Peer) -> RemoteSession {
    RemoteSession::open(
        client.client.clone(),
        f.mesh.model().clone(),
        8,
        SessionConfig::default(),
    )
    .await
    .unwrap()
}

/// Three servers generate what one process does, with servers pushing to each other
/// (every later hop's input pushed, none relayed) and with the client relaying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_generate_what_one_process_does() {
    let f = fixture(&BlockRange::even_split(8, 3)).await;
    let client = f.mesh.client().await.unwrap();
    let model = f.mesh.model().clone();
    // Each server reaches the next over one connection (a second one, while two dial
    // each other at once, keeps a new stream from opening until it closes).
    assert!(f.mesh.settle(Duration::from_secs(30)).await);
    for push in [true, false] {
        let cfg = SessionConfig {
            push,
            ..SessionConfig::default()
        };
        let mut session = RemoteSession::open(client.client.clone(), model.clone(), 8, cfg)
            .await
            .unwrap();
        assert_eq!(session.route().len(), 3);
        let mut generation = Generation::new(PROMPT.to_vec(), params(), 512).unwrap();
        let mut events = Vec::new();
        pipeline::generate(&f.head, &mut session, &mut generation, |e| events.push(e))
            .await
            .unwrap();
        assert_eq!(generation.generated(), f.want.as_slice(), "push {push}");
        assert_eq!(events.len(), 12);
        // 12 steps (the prompt, then 11 tokens), two pushed hops each.
        let pushed = if push { 24 } else { 0 };
        let stats = session.push_stats();
        assert_eq!((stats.pushed, stats.relayed), (pushed, 0), "push {push}");
        // Pushes go as notices on the servers' streams, unanswered: one message a hop.
        let mut notices = 0;
        for (peer, _) in f.mesh.servers() {
            let node = f.mesh.node(peer).unwrap();
            notices += node.client().stats().await.unwrap().streams.notices;
        }
        // Relaying sends none (the count is the pushing run's).
        assert_eq!(notices, 24, "push {push}");
        session.close().await;
    }
    f.mesh.stop().await.unwrap();
}

/// A small CPU span serves the one-position steps that find it idle on its network task
/// (no hand-off to its worker thread and back), and a prompt's many positions on the
/// worker thread; the output is the one process's either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_decode_steps_skip_the_worker_thread_and_prompts_do_not() {
    let f = fixture(&[BlockRange::new(0, 8)]).await;
    let client = f.mesh.client().await.unwrap();
    let (server, _) = f.mesh.servers()[0];
    let node = f.mesh.node(server).unwrap();
    let mut session = open_default(&f, &client).await;
    // A prompt of 24 positions: more than a step taken inline carries.
    let prompt: Vec<u32> = PROMPT.iter().cycle().take(24).copied().collect();
    let local = LocalModel::load_split(f._dir.path(), 1, &Device::Cpu).unwrap();
    let want = local
        .generate_ids(prompt.clone(), &params(), |_| {})
        .unwrap()
        .generated()
        .to_vec();
    let before = node.snapshot().metrics;
    let mut generation = Generation::new(prompt, params(), 512).unwrap();
    pipeline::generate(&f.head, &mut session, &mut generation, |_| {})
        .await
        .unwrap();
    assert_eq!(generation.generated(), want.as_slice());
    // The worker publishes its counters just after it answers the last step.
    let mut after = node.snapshot().metrics;
    for _ in 0..100 {
        if after.requests - before.requests >= 12 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = node.snapshot().metrics;
    }
    let requests = after.requests - before.requests;
    let inline = after.inline_requests - before.inline_requests;
    // The prompt, then 11 one-position steps: each went inline unless a heartbeat's
    // snapshot held the worker just then; the prompt never does.
    assert_eq!(requests, 12, "{after:?}");
    assert!((6..=11).contains(&inline), "{inline} of {requests} inline");
    session.close().await;
    f.mesh.stop().await.unwrap();
}

/// Generate with `session`, crashing the route's middle server after 5 tokens (just
/// after starting a server of `newcomer`, if given).
async fn generate_killing_middle(
    mesh: &mut LocalMesh,
    head: &ClientHead,
    session: &mut RemoteSession,
    newcomer: Option<BlockRange>,
) -> Result<Vec<u32>, PipelineError> {
    let mut generation = Generation::new(PROMPT.to_vec(), params(), 512)?;
    let middle = session.route()[1].peer;
    while let Some((input, start)) = generation.next_input() {
        if generation.generated().len() == 5 {
            if let Some(span) = newcomer {
                mesh.add_node(span).await.expect("start the newcomer");
            }
            mesh.crash(middle);
        }
        let out = session.step(head.embed(input)?, start as u32).await?;
        generation.accept_logits(&head.last_logits(&out)?);
    }
    Ok(generation.generated().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_middle_server_is_replaced_and_the_output_is_unchanged() {
    let r = BlockRange::new;
    let original = [r(0, 3), r(3, 6), r(6, 8)];
    let mut f = fixture(&original).await;
    // A second server over the middle blocks, cut differently so routing must adapt.
    f.mesh.add_node(r(2, 7)).await.unwrap();
    let client = f.mesh.client().await.unwrap();
    // Coverage needs only three servers; wait for the fourth's heartbeat too, so that
    // sessions have a choice of routes.
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .client
        .live_servers(f.mesh.model())
        .await
        .unwrap()
        .len()
        < 4
    {
        assert!(
            Instant::now() < deadline,
            "the fourth server was never heard"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut cfg = SessionConfig::default();
    cfg.policy.hop_penalty_ms = 1000.0;
    // Open sessions until one routes through the original three servers, so that the
    // crash hits a hop that must be replaced.
    let mut session = None;
    for _ in 0..40 {
        let s = RemoteSession::open(
            client.client.clone(),
            f.mesh.model().clone(),
            8,
            cfg.clone(),
        )
        .await
        .unwrap();
        if s.route().iter().map(|h| h.span).eq(original) {
            session = Some(s);
            break;
        }
        s.close().await;
    }
    let mut session = session.expect("a route through the three original servers");
    let middle = session.route()[1].peer;
    let got = generate_killing_middle(&mut f.mesh, &f.head, &mut session, None)
        .await
        .unwrap();
    assert_eq!(got, f.want);
    assert!(session.banned().contains(&middle));
    assert!(session.route().iter().all(|h| h.peer != middle));
    // Steps went server to server before the crash and after the replacement; the step
    // the crash hit fell through to the client.
    let stats = session.push_stats();
    assert!(stats.pushed >= 2 * 5, "{stats:?}");
    assert!(stats.relayed >= 1, "{stats:?}");
    session.close().await;
    f.mesh.stop().await.unwrap();
}

/// The only possible replacement starts as the old server dies: the client has not heard
/// of it, so it must look again before giving up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_joins_mid_session_takes_over() {
    let mut f = fixture(&BlockRange::even_split(8, 3)).await;
    let client = f.mesh.client().await.unwrap();
    let mut session = open_default(&f, &client).await;
    let middle = session.route()[1].span;
    let got = generate_killing_middle(&mut f.mesh, &f.head, &mut session, Some(middle))
        .await
        .unwrap();
    assert_eq!(got, f.want);
    assert_eq!(session.route().len(), 3);
    session.close().await;
    f.mesh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_replacement_fails_with_a_clear_error_not_a_hang() {
    let mut f = fixture(&BlockRange::even_split(8, 3)).await;
    let client = f.mesh.client().await.unwrap();
    let cfg = SessionConfig {
        step_timeout: Duration::from_secs(5),
        ..SessionConfig::default()
    };
    let mut session = RemoteSession::open(client.client.clone(), f.mesh.model().clone(), 8, cfg)
        .await
        .unwrap();
    let started = Instant::now();
    let err = generate_killing_middle(&mut f.mesh, &f.head, &mut session, None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, PipelineError::NoRoute { range, .. } if range == BlockRange::new(3, 6)),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    f.mesh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_sessions_all_complete_correctly() {
    let f = fixture(&BlockRange::even_split(8, 3)).await;
    for generated in ten_sessions_at_once(&f).await {
        assert_eq!(generated.unwrap(), f.want);
    }
    f.mesh.stop().await.unwrap();
}

/// Ten sessions at once on a new mesh, sixteen rounds, while a thread spins on a core.
/// Under such load a session stream left a write unwoken (about one round in forty here,
/// one run in five of the test above beside a CPU hog), and the requests behind it waited
/// out their 20 s step timeout (`p2p/nudge.rs`). A round takes well under a second, so
/// one that takes 10 s has stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_sessions_under_cpu_load_never_stall() {
    let _hogs = CpuHogs::start(1);
    // A fresh mesh each round: the stall came while the sessions' first requests opened
    // the streams.
    for round in 0..16 {
        let f = fixture(&BlockRange::even_split(8, 3)).await;
        let generated = tokio::time::timeout(Duration::from_secs(10), ten_sessions_at_once(&f))
            .await
            .unwrap_or_else(|_| panic!("round {round} stalled"));
        for g in generated {
            assert_eq!(g.unwrap(), f.want, "round {round}");
        }
        f.mesh.stop().await.unwrap();
    }
}

/// What ten sessions opened at once on `f`'s mesh generate.
async fn ten_sessions_at_once(f: &Fixture) -> Vec<Result<Vec<u32>, PipelineError>> {
    let client = f.mesh.client().await.unwrap();
    let runs = (0..10).map(|_| {
        let p2p = client.client.clone();
        let head = f.head.clone();
        let model = f.mesh.model().clone();
        tokio::spawn(async move {
            let mut session = RemoteSession::open(p2p, model, 8, SessionConfig::default()).await?;
            let mut generation = Generation::new(PROMPT.to_vec(), params(), 512)?;
            pipeline::generate(&head, &mut session, &mut generation, |_| {}).await?;
            session.close().await;
            Ok::<_, PipelineError>(generation.generated().to_vec())
        })
    });
    futures::future::join_all(runs)
        .await
        .into_iter()
        .map(|r| r.expect("a session task panicked"))
        .collect()
}

/// Threads spinning on the cores until dropped.
struct CpuHogs {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl CpuHogs {
    fn start(n: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for CpuHogs {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
