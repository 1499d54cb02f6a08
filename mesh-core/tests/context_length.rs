//! A session longer than a server takes: the server's refusal is not a failure of the
//! server. The client routes around it, and when no server takes the length it gets a
//! clear error naming the longest offered, with nobody banned or marked down.

use std::time::Duration;

use mesh_core::ledger::Reputation;
use mesh_core::local_mesh::LocalMesh;
use mesh_core::model::tiny;
use mesh_core::pipeline::session::SessionContext;
use mesh_core::pipeline::{PipelineError, RemoteSession, ServerLimits, SessionConfig};
use mesh_core::BlockRange;

fn limited(max_len: u32) -> ServerLimits {
    ServerLimits {
        max_len,
        ..ServerLimits::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_long_a_session_is_a_clear_error_and_bans_nobody() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write(dir.path()).unwrap();
    let mut mesh = LocalMesh::start(dir.path(), &[]).await.unwrap();
    let short = mesh
        .add_node_with(BlockRange::new(0, 8), limited(64))
        .await
        .unwrap();
    let shorter = mesh
        .add_node_with(BlockRange::new(0, 8), limited(32))
        .await
        .unwrap();
    let client = mesh.client().await.unwrap();
    // Both heartbeats heard, so both are tried.
    while client
        .client
        .live_servers(mesh.model())
        .await
        .unwrap()
        .len()
        < 2
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reputation = Reputation::in_memory();
    let ctx = SessionContext {
        reputation: reputation.clone(),
        ..SessionContext::default()
    };
    let cfg = |max_len| SessionConfig {
        max_len,
        rediscover_for: Duration::from_millis(200),
        ..SessionConfig::default()
    };

    // 100 positions: both refuse. A clear error, and neither is held to have failed.
    let err = RemoteSession::open_with(
        client.client.clone(),
        mesh.model().clone(),
        8,
        cfg(100),
        ctx.clone(),
    )
    .await
    .err()
    .expect("no server takes 100 positions");
    assert!(
        matches!(
            err,
            PipelineError::ContextTooLong {
                requested: 100,
                longest: 64,
                ..
            }
        ),
        "{err}"
    );
    for peer in [short, shorter] {
        assert_eq!(reputation.get(&peer).failures, 0, "{peer} marked as failed");
    }

    // 48 positions: the 32-position server refuses, the other takes it, and that
    // refusal bans nobody for the session either.
    for _ in 0..4 {
        let session = RemoteSession::open_with(
            client.client.clone(),
            mesh.model().clone(),
            8,
            cfg(48),
            ctx.clone(),
        )
        .await
        .unwrap();
        assert_eq!(session.route()[0].peer, short);
        assert!(session.banned().is_empty());
        session.close().await;
    }
    assert_eq!(reputation.get(&shorter).failures, 0);
    mesh.stop().await.unwrap();
}
