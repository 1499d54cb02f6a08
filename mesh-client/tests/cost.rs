//! The cost a client reports is what it countersigned (issue 14, item 5): the receipts are
//! the one record of cost. Witness checks (each a paid session on another server) and
//! fail-overs (the replacement is paid for replaying the history) cost more than the
//! route's positions × prices, and the reported total must say so.

use std::time::Duration;

use futures::StreamExt;
use mesh_client::{MeshClient, SamplingParams, Token, TokenStream};
use mesh_core::local_mesh::LocalMesh;
use mesh_core::model::tiny;
use mesh_core::pipeline::VerifyConfig;
use mesh_core::BlockRange;

const PRICE: u64 = 3;

/// A billing mesh with two servers of every block (one serves, the other witnesses or
/// takes over) and a client with its own ledger.
async fn two_servers(dir: &tempfile::TempDir, verify: f64) -> (LocalMesh, MeshClient) {
    let model_dir = dir.path().join("model");
    tiny::write(&model_dir).unwrap();
    let mut mesh = LocalMesh::start(&model_dir, &[]).await.unwrap();
    mesh.billing = Some((dir.path().join("ledgers"), PRICE));
    for _ in 0..2 {
        mesh.add_node(BlockRange::new(0, 8)).await.unwrap();
    }
    let client = MeshClient::builder()
        .bootstrap([mesh.bootstrap_addr().clone()])
        .model_dir(&model_dir)
        .ledger_dir(dir.path().join("client"))
        .verify(VerifyConfig {
            rate: verify,
            ..VerifyConfig::default()
        })
        .build()
        .await
        .unwrap();
    // One server covers the model; wait for the other too, so there is a witness.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while client.nodes().await.unwrap().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "second server unheard"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (mesh, client)
}

/// The sum of every receipt the client's ledger holds countersigned.
fn countersigned(client: &MeshClient) -> u64 {
    let receipts = client.receipts(10_000).unwrap();
    receipts.iter().map(|r| r.receipt.amount).sum()
}

/// The rest of `stream`, and the total it reports once it ended: what `mesh-client
/// generate` prints.
async fn drain(mut stream: TokenStream, mut tokens: Vec<Token>) -> (Vec<Token>, u64) {
    while let Some(t) = stream.next().await {
        tokens.push(t.unwrap());
    }
    let reported = stream.report().expect("a report once the stream ended");
    (tokens, reported.countersigned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_witness_checks_the_reported_cost_is_what_was_countersigned() {
    let dir = tempfile::tempdir().unwrap();
    let (mesh, client) = two_servers(&dir, 1.0).await;
    let stream = client
        .generate("Hello mesh", SamplingParams::greedy(8))
        .await
        .unwrap();
    let (tokens, reported) = drain(stream, Vec::new()).await;
    let countersigned = countersigned(&client);
    assert!(countersigned > 0);
    assert_eq!(
        reported, countersigned,
        "with witness checks, the client reported a cost of {reported} and countersigned {countersigned}"
    );
    // What each token carries is what had been countersigned when it was shown.
    let so_far: Vec<u64> = tokens.iter().map(|t| t.cost_so_far).collect();
    assert!(so_far.windows(2).all(|w| w[0] <= w[1]), "{so_far:?}");
    assert!(so_far.iter().all(|c| *c <= countersigned), "{so_far:?}");
    mesh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_fail_over_the_reported_cost_is_what_was_countersigned() {
    let dir = tempfile::tempdir().unwrap();
    let (mut mesh, client) = two_servers(&dir, 0.0).await;
    let mut params = SamplingParams::greedy(60);
    // The whole length, so the server dies mid-generation.
    params.stop_tokens.clear();
    let mut stream = client.generate("Hello mesh", params).await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    // The generation runs ahead until the token queue (32) is full; then its server dies.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let dead = first.route[0].peer;
    mesh.crash(dead);
    let (tokens, reported) = drain(stream, vec![first]).await;
    assert_eq!(tokens.len(), 60);
    let last = tokens.last().unwrap();
    assert!(
        last.route.iter().all(|h| h.peer != dead),
        "no fail-over happened"
    );
    let countersigned = countersigned(&client);
    assert!(countersigned > 0);
    assert_eq!(
        reported, countersigned,
        "after a fail-over, the client reported a cost of {reported} and countersigned {countersigned}"
    );
    mesh.stop().await.unwrap();
}
