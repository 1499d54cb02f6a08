//! When the mesh is thin (issue 17): a client that holds the weights of blocks no server
//! covers runs them itself (`--fallback local`), its tokens say so in their route, the text
//! is the all-mesh text for the same seed, and it goes back to the mesh when a server of
//! those blocks appears. Without the weights, the error names the missing blocks and the
//! servers seen.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mesh_client::{ClientError, MeshClient, SamplingParams, Token};
use mesh_core::local_mesh::LocalMesh;
use mesh_core::model::tiny;
use mesh_core::BlockRange;

/// The middle span of the three is the one left out.
fn spans() -> Vec<BlockRange> {
    BlockRange::even_split(8, 3)
}

fn missing() -> BlockRange {
    spans()[1]
}

/// A sampled generation (not greedy), so equal text means equal logits and equal draws.
fn sampled(max: usize) -> SamplingParams {
    SamplingParams {
        max_new_tokens: max,
        temperature: 0.8,
        top_k: Some(40),
        top_p: Some(0.95),
        repetition_penalty: 1.0,
        seed: 42,
        // The whole length, whatever the tiny model samples.
        stop_tokens: Vec::new(),
    }
}

async fn client(mesh: &LocalMesh, dir: &Path, fallback: bool) -> Result<MeshClient, ClientError> {
    MeshClient::builder()
        .bootstrap([mesh.bootstrap_addr().clone()])
        .model_dir(dir)
        .discovery_timeout(Duration::from_secs(3))
        .fallback_local(fallback)
        .build()
        .await
}

async fn tokens(client: &MeshClient, params: SamplingParams) -> Vec<Token> {
    let stream = client.generate("Hello mesh", params).await.unwrap();
    stream.map(|t| t.unwrap()).collect().await
}

fn ids(tokens: &[Token]) -> Vec<u32> {
    tokens.iter().map(|t| t.id).collect()
}

/// Blocks of a route run on the client itself.
fn local_blocks(t: &Token) -> Vec<BlockRange> {
    t.route.iter().filter(|h| h.local).map(|h| h.span).collect()
}

/// The all-mesh text for `params`, from a mesh of every span.
async fn all_mesh(dir: &Path, params: SamplingParams) -> Vec<u32> {
    let mesh = LocalMesh::start(dir, &spans()).await.unwrap();
    let client = client(&mesh, dir, false).await.unwrap();
    let out = tokens(&client, params).await;
    assert!(out.iter().all(|t| local_blocks(t).is_empty()));
    mesh.stop().await.unwrap();
    ids(&out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_span_runs_on_the_client_and_the_text_equals_the_all_mesh_text() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write(dir.path()).unwrap();
    let expected = all_mesh(dir.path(), sampled(24)).await;

    let two = [spans()[0], spans()[2]];
    let mesh = LocalMesh::start(dir.path(), &two).await.unwrap();
    let client = client(&mesh, dir.path(), true).await.unwrap();
    let out = tokens(&client, sampled(24)).await;
    assert_eq!(ids(&out), expected, "the fallback changed the text");
    for t in &out {
        assert_eq!(local_blocks(t), [missing()], "route {:?}", t.route);
        assert_eq!(
            t.route.len(),
            3,
            "two servers and the client: {:?}",
            t.route
        );
    }
    mesh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_goes_back_to_the_mesh_when_a_server_of_the_blocks_appears() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write(dir.path()).unwrap();
    let two = [spans()[0], spans()[2]];
    let mut mesh = LocalMesh::start(dir.path(), &two).await.unwrap();
    let client = client(&mesh, dir.path(), true).await.unwrap();
    let mut stream = client.generate("Hello mesh", sampled(80)).await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(local_blocks(&first), [missing()]);
    // The generation runs ahead until the token queue (32) is full, then waits for us
    // while the missing server joins and is heard.
    mesh.add_node(missing()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.nodes().await.unwrap().len() < 3 {
        assert!(Instant::now() < deadline, "the new server was never heard");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut out = vec![first];
    while let Some(t) = stream.next().await {
        out.push(t.unwrap());
    }
    assert_eq!(out.len(), 80);
    let last = out.last().unwrap();
    assert!(
        local_blocks(last).is_empty(),
        "still running blocks locally at the end: {:?}",
        last.route
    );
    // The server took the blocks over from their history: the text is unchanged.
    let again = tokens(&client, sampled(80)).await;
    assert!(again.iter().all(|t| local_blocks(t).is_empty()));
    assert_eq!(
        ids(&out),
        ids(&again),
        "going back to the mesh changed the text"
    );
    mesh.stop().await.unwrap();
}

/// The tiny model's directory without any block's weights: embeddings, norm and head.
fn head_only(dir: &Path) {
    tiny::write(dir).unwrap();
    let path = dir.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let head: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .filter(|(name, _)| !name.starts_with("model.layers."))
        .collect();
    candle_core::safetensors::save(&head, &path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_local_weights_the_error_names_the_missing_blocks_and_the_servers_seen() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write(dir.path()).unwrap();
    let two = [spans()[0], spans()[2]];
    let mesh = LocalMesh::start(dir.path(), &two).await.unwrap();
    let servers: Vec<String> = mesh.servers().iter().map(|(p, _)| p.to_string()).collect();
    let check = |e: ClientError, why: &str| {
        let message = e.to_string();
        assert!(matches!(e, ClientError::NoRoute(_)), "{message}");
        assert!(message.contains("blocks [3, 6)"), "{message}");
        assert!(message.contains("2 servers seen"), "{message}");
        for s in &servers {
            assert!(message.contains(s.as_str()), "{message} does not name {s}");
        }
        assert!(message.contains(why), "{message}");
    };
    // No fallback asked for.
    let e = client(&mesh, dir.path(), false).await.err().unwrap();
    check(e, "--fallback local");
    // Fallback asked for, but the directory holds no block's weights.
    let head = tempfile::tempdir().unwrap();
    head_only(head.path());
    let e = client(&mesh, head.path(), true).await.err().unwrap();
    check(e, "holds no weights");
    mesh.stop().await.unwrap();
}
