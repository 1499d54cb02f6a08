//! The embeddable client against a real (in-process, loopback) mesh.

mod common;

use std::time::Duration;

use futures::StreamExt;
use mesh_client::{ClientError, MeshClient, SamplingParams};
use mesh_core::local_mesh::LocalMesh;
use mesh_core::model::{tiny, LocalModel};

fn params() -> SamplingParams {
    SamplingParams {
        max_new_tokens: 20,
        seed: 5,
        ..SamplingParams::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_text_equals_local_generation_and_drop_cancels() {
    let common::Running { dir, mesh, client } = common::three_node_mesh().await;
    let want = LocalModel::load_split(dir.path(), 1, &candle_core::Device::Cpu)
        .unwrap()
        .generate("Hello mesh", &params(), |_| {})
        .unwrap();
    // The client routes from the DHT records at once; the heartbeats follow.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while client.nodes().await.unwrap().len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "heartbeats of 3 nodes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let stream = client.generate("Hello mesh", params()).await.unwrap();
    let tokens: Vec<_> = stream.map(|t| t.unwrap()).collect().await;
    assert_eq!(tokens.iter().map(|t| t.id).collect::<Vec<_>>(), want.tokens);
    assert_eq!(
        tokens.iter().map(|t| t.text.as_str()).collect::<String>(),
        want.text
    );
    assert!(tokens.iter().all(|t| t.route.len() == 3));

    // Dropping the stream after two tokens stops the generation (no hang, no error).
    let mut stream = client.generate("Hello mesh", params()).await.unwrap();
    assert!(stream.next().await.is_some());
    assert!(stream.next().await.is_some());
    mesh.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_servers_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write(dir.path()).unwrap();
    let mesh = LocalMesh::start(dir.path(), &[]).await.unwrap();
    let err = MeshClient::builder()
        .bootstrap([mesh.bootstrap_addr().clone()])
        .model_dir(dir.path())
        .discovery_timeout(Duration::from_secs(2))
        .build()
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ClientError::ModelUnknown(_)), "{err}");
}

/// A bootstrap address that refuses connections: a loopback port that was free a moment
/// ago, with a peer id.
fn dead_bootstrap() -> mesh_core::p2p::Multiaddr {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let peer = mesh_core::identity::Identity::generate().peer_id();
    format!("/ip4/127.0.0.1/tcp/{port}/p2p/{peer}")
        .parse()
        .unwrap()
}

/// No bootstrap answers: said at once, naming the addresses, instead of "model unknown"
/// after the 30 s discovery wait. Through the library and through the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_bootstrap_is_said_at_once() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write(dir.path()).unwrap();
    let dead = dead_bootstrap();
    let started = std::time::Instant::now();
    let err = MeshClient::builder()
        .bootstrap([dead.clone()])
        .model_dir(dir.path())
        .build()
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, ClientError::NoBootstrap(_)),
        "{err} after {:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains(&dead.to_string()), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    let started = std::time::Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-client"))
        .args([
            "generate",
            "--bootstrap",
            &dead.to_string(),
            "--max-tokens",
            "2",
            "--prompt",
            "hi",
        ])
        .env("MESH_HOME", dir.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let line = stderr
        .lines()
        .find(|l| l.contains("no bootstrap reachable"))
        .unwrap_or_else(|| panic!("after {:?}:\n{stderr}", started.elapsed()));
    assert!(line.contains(&dead.to_string()), "{line}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}
