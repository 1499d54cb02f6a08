//! A real mesh of OS processes on 127.0.0.1: one `mesh-bootstrap`, several `mesh-node`s, and
//! a client peer (a real swarm in this process) that knows only the bootstrap.
//!
//! Needs the binaries: `cargo build --workspace --bins && cargo test --workspace`.
//! Timeouts here are limits for a slow 2-core CI box, not performance targets.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use common::*;
use mesh_core::p2p::{self, PeerId};
use mesh_core::{BlockRange, ModelId};

/// Every server of every block, via the DHT.
async fn lookup_all(client: &p2p::Client) -> BTreeSet<(PeerId, BlockRange)> {
    let model = ModelId::new(MODEL);
    let mut found = BTreeSet::new();
    for block in 0..NUM_BLOCKS {
        if let Ok(spans) = client.lookup(&model, block).await {
            found.extend(spans.into_iter().map(|s| (s.peer_id, s.span)));
        }
    }
    found
}

async fn live(client: &p2p::Client) -> BTreeSet<PeerId> {
    client
        .live_servers(&ModelId::new(MODEL))
        .await
        .expect("live servers")
        .into_iter()
        .map(|s| s.peer_id)
        .collect()
}

/// The five spans of the test mesh: every block covered, block 2..4 twice.
fn spans() -> Vec<BlockRange> {
    vec![
        BlockRange::new(0, 2),
        BlockRange::new(2, 4),
        BlockRange::new(4, 6),
        BlockRange::new(6, 8),
        BlockRange::new(2, 4),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_are_found_through_the_bootstrap_and_dropped_when_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (_bootstrap, boot_addr) = start_bootstrap(dir.path()).await;

    let mut nodes = Vec::new();
    for (i, span) in spans().into_iter().enumerate() {
        let name = format!("node{i}");
        let args = node_args(dir.path(), &name, span, &[&boot_addr]);
        nodes.push(Proc::spawn(&name, "mesh-node", &args, dir.path()));
    }
    let mut expected = BTreeSet::new();
    for (node, span) in nodes.iter().zip(spans()) {
        expected.insert((Proc::peer_id(&node.listen_addr().await), span));
    }
    let ids: Vec<PeerId> = expected.iter().map(|(p, _)| *p).collect();

    // A client that knows only the bootstrap finds every span's servers within 10 s.
    let client = test_client(&boot_addr).await;
    let started = Instant::now();
    let c = client.client.clone();
    wait_for(DISCOVERY_LIMIT, "every span's servers in the DHT", || {
        let c = c.clone();
        let expected = expected.clone();
        async move { (lookup_all(&c).await == expected).then_some(()) }
    })
    .await;
    eprintln!(
        "all 5 servers found through the DHT in {:?}",
        started.elapsed()
    );

    // ... connects to them and hears all their heartbeats.
    let found = c.discover(&ModelId::new(MODEL), NUM_BLOCKS).await.unwrap();
    assert_eq!(found.len(), 5, "{found:?}");
    let all: BTreeSet<PeerId> = ids.iter().copied().collect();
    wait_for(DROP_LIMIT, "heartbeats from all 5 servers", || {
        let c = c.clone();
        let all = all.clone();
        async move { (live(&c).await == all).then_some(()) }
    })
    .await;
    let info = c.live_servers(&ModelId::new(MODEL)).await.unwrap();
    for s in &info {
        assert_eq!(s.num_blocks, NUM_BLOCKS);
        assert_eq!(s.interval, HEARTBEAT);
        assert!(expected.contains(&(s.peer_id, s.span)));
        assert!(!s.addrs.is_empty());
    }

    // Crash node 3 (SIGKILL): within 3 intervals the client and every other node drop it.
    let killed = ids_of(&nodes, 3).await;
    let others: Vec<usize> = vec![0, 1, 2, 4];
    wait_for(DROP_LIMIT, "every node to hear node 3", || {
        let ok = others
            .iter()
            .all(|&i| nodes[i].has_line(|l| l.starts_with(&format!("server up {killed}"))));
        async move { ok.then_some(()) }
    })
    .await;
    nodes[3].kill();
    let killed_at = Instant::now();
    wait_for(DROP_LIMIT, "the client to drop the killed node", || {
        let c = c.clone();
        async move { (!live(&c).await.contains(&killed)).then_some(()) }
    })
    .await;
    eprintln!(
        "client dropped the crashed node after {:?}",
        killed_at.elapsed()
    );
    wait_for(
        DROP_LIMIT,
        "every other node to drop the killed node",
        || {
            let ok = others
                .iter()
                .all(|&i| nodes[i].has_line(|l| l == format!("server down {killed} {MODEL}")));
            async move { ok.then_some(()) }
        },
    )
    .await;
    // The survivors stay in the table.
    let mut alive = all.clone();
    alive.remove(&killed);
    assert_eq!(live(&c).await, alive);

    // Stop node 4 cleanly (SIGTERM): it says goodbye, exits 0, and lookups skip it.
    let leaving = ids_of(&nodes, 4).await;
    assert!(nodes[4].terminate(), "node 4 did not exit cleanly");
    assert!(nodes[4].has_line(|l| l == "stopped"));
    alive.remove(&leaving);
    wait_for(DROP_LIMIT, "the client to drop the node that left", || {
        let c = c.clone();
        async move { (!live(&c).await.contains(&leaving)).then_some(()) }
    })
    .await;
    wait_for(DROP_LIMIT, "the DHT to forget the node that left", || {
        let c = c.clone();
        async move {
            let spans = c.lookup(&ModelId::new(MODEL), 2).await.ok()?;
            (!spans.iter().any(|s| s.peer_id == leaving)).then_some(())
        }
    })
    .await;

    let stats = c.stats().await.unwrap();
    assert_eq!(stats.gossip.rejected(), 0, "{stats:?}");
    assert!(stats.gossip.accepted > 0);
    client.client.shutdown().await.unwrap();
}

async fn ids_of(nodes: &[Proc], i: usize) -> PeerId {
    Proc::peer_id(&nodes[i].listen_addr().await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_survives_the_bootstrap_and_new_nodes_join_through_any_peer() {
    let dir = tempfile::tempdir().unwrap();
    let (mut bootstrap, boot_addr) = start_bootstrap(dir.path()).await;
    let boot_id = Proc::peer_id(&boot_addr);
    let boot_port = boot_addr
        .iter()
        .find_map(|p| match p {
            mesh_core::p2p::Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .expect("tcp port");

    let first = [
        BlockRange::new(0, 3),
        BlockRange::new(3, 6),
        BlockRange::new(6, 8),
    ];
    let mut nodes: Vec<Proc> = Vec::new();
    let mut addrs = Vec::new();
    for (i, span) in first.iter().enumerate() {
        let name = format!("node{i}");
        let args = node_args(dir.path(), &name, *span, &[&boot_addr]);
        nodes.push(Proc::spawn(&name, "mesh-node", &args, dir.path()));
    }
    for node in &nodes {
        addrs.push(node.listen_addr().await);
    }
    let ids: BTreeSet<PeerId> = addrs.iter().map(Proc::peer_id).collect();

    let client = test_client(&boot_addr).await;
    let c = client.client.clone();
    let model = ModelId::new(MODEL);
    wait_for(
        DISCOVERY_LIMIT * 2,
        "the client to discover and hear 3 servers",
        || {
            let c = c.clone();
            let (model, ids) = (model.clone(), ids.clone());
            async move {
                c.discover(&model, NUM_BLOCKS).await.ok()?;
                (live(&c).await == ids).then_some(())
            }
        },
    )
    .await;

    // Kill the bootstrap. For more than 3 intervals, everyone still hears everyone.
    bootstrap.kill();
    tokio::time::sleep(HEARTBEAT * 5).await;
    assert_eq!(
        live(&c).await,
        ids,
        "servers dropped after the bootstrap died"
    );
    for node in &nodes {
        assert!(
            !node.has_line(|l| l.starts_with("server down")),
            "{} dropped a peer after the bootstrap died: {:?}",
            node.name,
            node.lines()
        );
    }

    // A new node joins through node 1 (no bootstrap): the client finds it in the DHT and hears it.
    let args = node_args(dir.path(), "late1", BlockRange::new(0, 4), &[&addrs[1]]);
    nodes.push(Proc::spawn("late1", "mesh-node", &args, dir.path()));
    let late1 = Proc::peer_id(&nodes[3].listen_addr().await);
    wait_for(
        DISCOVERY_LIMIT * 2,
        "the node that joined through node 1",
        || {
            let c = c.clone();
            let model = model.clone();
            async move {
                let in_dht = c
                    .lookup(&model, 0)
                    .await
                    .ok()?
                    .iter()
                    .any(|s| s.peer_id == late1 && s.span == BlockRange::new(0, 4));
                let _ = c.discover(&model, NUM_BLOCKS).await;
                (in_dht && live(&c).await.contains(&late1)).then_some(())
            }
        },
    )
    .await;
    // The old nodes hear the newcomer too.
    wait_for(DROP_LIMIT, "old nodes to hear the newcomer", || {
        let ok = nodes[..3]
            .iter()
            .all(|n| n.has_line(|l| l.starts_with(&format!("server up {late1}"))));
        async move { ok.then_some(()) }
    })
    .await;

    // Restart the bootstrap (same key, same port); another node joins through it alone.
    let bootstrap2 = Proc::spawn(
        "bootstrap2",
        "mesh-bootstrap",
        &bootstrap_args(dir.path(), boot_port),
        dir.path(),
    );
    let boot2 = bootstrap2.listen_addr().await;
    assert_eq!(
        Proc::peer_id(&boot2),
        boot_id,
        "the key file keeps the identity"
    );
    let args = node_args(dir.path(), "late2", BlockRange::new(4, 8), &[&boot2]);
    nodes.push(Proc::spawn("late2", "mesh-node", &args, dir.path()));
    let late2 = Proc::peer_id(&nodes[4].listen_addr().await);
    wait_for(
        DISCOVERY_LIMIT * 3,
        "the node that joined through the restarted bootstrap",
        || {
            let c = c.clone();
            let model = model.clone();
            async move {
                let in_dht = c
                    .lookup(&model, 7)
                    .await
                    .ok()?
                    .iter()
                    .any(|s| s.peer_id == late2);
                let _ = c.discover(&model, NUM_BLOCKS).await;
                (in_dht && live(&c).await.contains(&late2)).then_some(())
            }
        },
    )
    .await;

    let by_span: HashMap<BlockRange, Vec<PeerId>> =
        p2p::Client::by_span(&c.discover(&model, NUM_BLOCKS).await.unwrap());
    assert!(by_span.contains_key(&BlockRange::new(4, 8)), "{by_span:?}");
    client.client.shutdown().await.unwrap();
}
