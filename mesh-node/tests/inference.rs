//! Inference across OS processes on loopback: `mesh-bootstrap`, `mesh-node`s serving
//! spans of the tiny model, and a client (a real swarm in this process) that knows only
//! the bootstrap. Output must equal the single-process generation, with and without a
//! server dying mid-way.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use common::*;
use mesh_core::model::{tiny, ClientHead, Generation, LocalModel, ModelFiles, SamplingParams};
use mesh_core::p2p::{self, Multiaddr, PeerId};
use mesh_core::pipeline::{self, PipelineError, RemoteSession, SessionConfig};
use mesh_core::{BlockRange, ModelId};

const PROMPT: &[u32] = &[1, 84, 104, 101, 32, 109, 101, 115, 104, 32];

fn params() -> SamplingParams {
    SamplingParams {
        max_new_tokens: 16,
        temperature: 0.8,
        seed: 1234,
        ..SamplingParams::default()
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    _boot: Proc,
    boot_addr: Multiaddr,
    nodes: Vec<(PeerId, Proc)>,
}

impl Cluster {
    async fn start(spans: &[BlockRange]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        tiny::write(&dir.path().join("model")).unwrap();
        let (boot, boot_addr) = start_bootstrap(dir.path()).await;
        let mut cluster = Cluster {
            dir,
            _boot: boot,
            boot_addr,
            nodes: Vec::new(),
        };
        for span in spans {
            cluster.add_node(*span).await;
        }
        cluster
    }

    async fn add_node(&mut self, span: BlockRange) {
        let name = format!("node{}", self.nodes.len());
        let mut args = node_args(self.dir.path(), &name, span, &[&self.boot_addr]);
        args.push("--model-dir".into());
        args.push(self.dir.path().join("model").display().to_string());
        let node = Proc::spawn(&name, "mesh-node", &args, self.dir.path());
        let addr = node.listen_addr().await;
        self.nodes.push((Proc::peer_id(&addr), node));
    }

    fn kill(&mut self, peer: PeerId) {
        let (_, node) = self.nodes.iter_mut().find(|(p, _)| *p == peer).unwrap();
        node.kill();
    }

    fn model_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("model")
    }

    async fn client(&self) -> (p2p::Peer, ClientHead) {
        let client = test_client(&self.boot_addr).await;
        pipeline::wait_for_coverage(
            &client.client,
            &ModelId::new(MODEL),
            NUM_BLOCKS,
            DISCOVERY_LIMIT,
        )
        .await
        .unwrap();
        let files = ModelFiles::open(&self.model_dir()).unwrap();
        (
            client,
            ClientHead::load(&files, DType::F32, &Device::Cpu).unwrap(),
        )
    }
}

fn reference(dir: &Path) -> Vec<u32> {
    let local = LocalModel::load_split(dir, 1, &Device::Cpu).unwrap();
    let g = local
        .generate_ids(PROMPT.to_vec(), &params(), |_| {})
        .unwrap();
    g.generated().to_vec()
}

async fn generate(
    p2p: p2p::Client,
    head: ClientHead,
    cfg: SessionConfig,
) -> Result<Vec<u32>, PipelineError> {
    let mut session = RemoteSession::open(p2p, ModelId::new(MODEL), NUM_BLOCKS, cfg).await?;
    let mut generation = Generation::new(PROMPT.to_vec(), params(), 512)?;
    pipeline::generate(&head, &mut session, &mut generation, |_| {}).await?;
    session.close().await;
    Ok(generation.generated().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_processes_stream_the_single_process_tokens_even_ten_at_once() {
    let cluster = Cluster::start(&BlockRange::even_split(NUM_BLOCKS, 3)).await;
    let want = reference(&cluster.model_dir());
    let (client, head) = cluster.client().await;

    let got = generate(
        client.client.clone(),
        head.clone(),
        SessionConfig::default(),
    )
    .await
    .unwrap();
    assert_eq!(got, want);

    let runs = (0..10).map(|_| {
        tokio::spawn(generate(
            client.client.clone(),
            head.clone(),
            SessionConfig::default(),
        ))
    });
    for result in futures::future::join_all(runs).await {
        assert_eq!(result.unwrap().unwrap(), want);
    }
}

/// Generate, SIGKILLing the process of the route's middle server after 5 tokens.
async fn generate_killing_middle(
    cluster: &mut Cluster,
    client: &p2p::Client,
    head: &ClientHead,
    cfg: SessionConfig,
) -> Result<Vec<u32>, PipelineError> {
    let mut session =
        RemoteSession::open(client.clone(), ModelId::new(MODEL), NUM_BLOCKS, cfg).await?;
    let middle = session.route()[1].peer;
    let mut generation = Generation::new(PROMPT.to_vec(), params(), 512)?;
    while let Some((input, start)) = generation.next_input() {
        if generation.generated().len() == 5 {
            cluster.kill(middle);
        }
        let out = session.step(head.embed(input)?, start as u32).await?;
        generation.accept_logits(&head.last_logits(&out)?);
    }
    assert!(session.route().iter().all(|h| h.peer != middle));
    Ok(generation.generated().to_vec())
}

/// Three servers and a fourth of the middle span, both middle ones live; the single
/// process's tokens, and a client of the cluster.
async fn two_servers_of_the_middle() -> (Cluster, Vec<u32>, p2p::Peer, ClientHead) {
    let spans = BlockRange::even_split(NUM_BLOCKS, 3);
    let mut cluster = Cluster::start(&spans).await;
    cluster.add_node(spans[1]).await;
    let want = reference(&cluster.model_dir());
    let (client, head) = cluster.client().await;
    let middle = spans[1];
    // Both servers of the middle span must be live before the session starts.
    wait_for(DROP_LIMIT, "both middle servers' heartbeats", || {
        let c = client.client.clone();
        async move {
            let live = c.live_servers(&ModelId::new(MODEL)).await.ok()?;
            (live.iter().filter(|s| s.span == middle).count() == 2).then_some(())
        }
    })
    .await;
    (cluster, want, client, head)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_middle_node_changes_nothing_when_a_fourth_serves_its_span() {
    let (mut cluster, want, client, head) = two_servers_of_the_middle().await;
    let got = generate_killing_middle(
        &mut cluster,
        &client.client,
        &head,
        SessionConfig::default(),
    )
    .await
    .unwrap();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_replacement_the_client_fails_clearly_within_its_timeout() {
    let mut cluster = Cluster::start(&BlockRange::even_split(NUM_BLOCKS, 3)).await;
    let (client, head) = cluster.client().await;
    let cfg = SessionConfig {
        step_timeout: Duration::from_secs(5),
        ..SessionConfig::default()
    };
    let started = Instant::now();
    let err = generate_killing_middle(&mut cluster, &client.client, &head, cfg)
        .await
        .unwrap_err();
    assert!(matches!(err, PipelineError::NoRoute { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_told_no_span_takes_the_blocks_nobody_serves() {
    let r = BlockRange::new;
    let mut cluster = Cluster::start(&[r(0, 3), r(6, 8)]).await;
    // Let the bootstrap learn of both servers before the newcomer looks.
    let scout = test_client(&cluster.boot_addr).await;
    wait_for(DISCOVERY_LIMIT, "both servers in the DHT", || {
        let c = scout.client.clone();
        async move {
            let found = c.discover(&ModelId::new(MODEL), NUM_BLOCKS).await.ok()?;
            (found.len() == 2).then_some(())
        }
    })
    .await;
    let mut args = node_args(cluster.dir.path(), "auto", r(0, 1), &[&cluster.boot_addr]);
    let at = args.iter().position(|a| a == "--blocks").unwrap();
    args.drain(at..at + 2);
    args.extend(["--span-len".into(), "3".into(), "--model-dir".into()]);
    args.push(cluster.model_dir().display().to_string());
    let node = Proc::spawn("auto", "mesh-node", &args, cluster.dir.path());
    wait_for(START_LIMIT, "the auto node to pick its span", || {
        let done = node.has_line(|l| l.starts_with("serving "));
        async move { done.then_some(()) }
    })
    .await;
    assert!(
        node.has_line(|l| l == "serving tiny-llama-mesh blocks [3, 6) of 8"),
        "{:?}",
        node.lines()
    );
    cluster
        .nodes
        .push((Proc::peer_id(&node.listen_addr().await), node));
    // The gap is filled: the mesh now covers every block.
    let (_client, _head) = cluster.client().await;
}

/// Speculative decoding through server processes, SIGKILLing the middle one after 5
/// tokens: the replacement is replayed only the positions that stand (rejected draft
/// positions were rewound away), and the sampled tokens are those of the same seeded
/// speculative generation left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_middle_node_mid_speculation_changes_nothing() {
    let (mut cluster, _, client, head) = two_servers_of_the_middle().await;
    // A draft that often disagrees (two random blocks, the same byte vocabulary), so
    // steps get rewound.
    let draft_dir = cluster.dir.path().join("draft");
    let mut cfg = tiny::config();
    cfg.num_hidden_layers = 2;
    tiny::write_random(&draft_dir, &cfg).unwrap();
    let draft = pipeline::DraftModel::load(&draft_dir, cfg.vocab_size).unwrap();
    let open = || {
        RemoteSession::open(
            client.client.clone(),
            ModelId::new(MODEL),
            NUM_BLOCKS,
            SessionConfig::default(),
        )
    };

    let mut undisturbed = open().await.unwrap();
    let mut want = Generation::new(PROMPT.to_vec(), params(), 512).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    pipeline::generate_speculative(&head, &mut undisturbed, &mut want, &draft, 4, 512, &tx)
        .await
        .unwrap();
    drop(tx);
    drain.await.unwrap();
    undisturbed.close().await;

    let mut session = open().await.unwrap();
    let middle = session.route()[1].peer;
    let mut generation = Generation::new(PROMPT.to_vec(), params(), 512).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let speculate = async {
        let r = pipeline::generate_speculative(
            &head,
            &mut session,
            &mut generation,
            &draft,
            4,
            512,
            &tx,
        )
        .await;
        drop(tx);
        r
    };
    let killer = async {
        let mut seen = 0;
        while rx.recv().await.is_some() {
            seen += 1;
            if seen == 5 {
                cluster.kill(middle);
            }
        }
    };
    let (stats, ()) = tokio::join!(speculate, killer);
    let stats = stats.unwrap();
    println!("{stats:?}");
    assert!(session.route().iter().all(|h| h.peer != middle));
    assert!(
        stats.proposed > stats.accepted,
        "nothing was rewound: {stats:?}"
    );
    assert_eq!(generation.generated(), want.generated());
}
