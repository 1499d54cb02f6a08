//! The session length the client asks servers for follows the request (prompt + max
//! tokens, within the model's context), not a fixed 512; a request no server can take is
//! a clear error.

use futures::StreamExt;
use mesh_client::{ClientError, MeshClient, SamplingParams};
use mesh_core::local_mesh::LocalMesh;
use mesh_core::model::{tiny, LocalModel};
use mesh_core::pipeline::ServerLimits;
use mesh_core::BlockRange;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_length_follows_prompt_and_max_tokens() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write(dir.path()).unwrap();
    let mut mesh = LocalMesh::start(dir.path(), &[]).await.unwrap();
    // Servers that take sessions of 64 positions at most.
    let limits = ServerLimits {
        max_len: 64,
        ..ServerLimits::default()
    };
    for span in BlockRange::even_split(8, 2) {
        mesh.add_node_with(span, limits.clone()).await.unwrap();
    }
    let client = MeshClient::builder()
        .bootstrap([mesh.bootstrap_addr().clone()])
        .model_dir(dir.path())
        .build()
        .await
        .unwrap();

    // "Hello mesh" is 11 ids: 11 + 40 fits in 64.
    let want = LocalModel::load_split(dir.path(), 1, &candle_core::Device::Cpu)
        .unwrap()
        .generate("Hello mesh", &SamplingParams::greedy(40), |_| {})
        .unwrap();
    let got: Vec<u32> = client
        .generate("Hello mesh", SamplingParams::greedy(40))
        .await
        .unwrap()
        .map(|t| t.unwrap().id)
        .collect()
        .await;
    assert_eq!(got, want.tokens);

    // 11 + 100 does not: a clear error, at once, and the servers still serve.
    let started = std::time::Instant::now();
    let err = client
        .generate("Hello mesh", SamplingParams::greedy(100))
        .await
        .err()
        .expect("no server takes 111 positions");
    assert!(
        matches!(
            err,
            ClientError::ContextTooLong {
                requested: 111,
                longest: 64
            }
        ),
        "{err}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    let again = client
        .generate("Hello mesh", SamplingParams::greedy(40))
        .await
        .unwrap()
        .count()
        .await;
    assert_eq!(again, 40);
    mesh.stop().await.unwrap();
}
