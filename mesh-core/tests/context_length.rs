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

/// A step past the session's own length (`SessionConfig::max_len`) is the caller's
/// mistake, not the servers': it is refused before anything is sent, with an error that
/// says so, no server is marked as failed, and the session goes on from where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_past_the_sessions_length_is_a_clear_error_and_fails_nobody() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write(dir.path()).unwrap();
    let mesh = LocalMesh::start(dir.path(), &BlockRange::even_split(8, 2))
        .await
        .unwrap();
    let client = mesh.client().await.unwrap();
    let reputation = Reputation::in_memory();
    let ctx = SessionContext {
        reputation: reputation.clone(),
        ..SessionContext::default()
    };
    let cfg = SessionConfig {
        max_len: 8,
        rediscover_for: Duration::from_millis(200),
        ..SessionConfig::default()
    };
    let mut session =
        RemoteSession::open_with(client.client.clone(), mesh.model().clone(), 8, cfg, ctx)
            .await
            .unwrap();
    let route: Vec<_> = session.route().iter().map(|h| h.peer).collect();
    let hidden = |n: usize| {
        candle_core::Tensor::ones(
            (1, n, tiny::config().hidden_size),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let full = |err: PipelineError| {
        assert!(
            matches!(
                err,
                PipelineError::SessionFull {
                    max_len: 8,
                    requested: 9
                }
            ),
            "{err}"
        )
    };
    session.step(hidden(6), 0).await.unwrap();
    session.step(hidden(1), 6).await.unwrap();
    // Two positions at 7 would end at 9.
    full(
        session
            .step(hidden(2), 7)
            .await
            .expect_err("past 8 positions"),
    );
    session.step(hidden(1), 7).await.unwrap();
    full(
        session
            .step(hidden(1), 8)
            .await
            .expect_err("past 8 positions"),
    );
    // Nothing changed: the same route, nobody failed or banned, and the last position
    // still runs again.
    assert_eq!(
        session.route().iter().map(|h| h.peer).collect::<Vec<_>>(),
        route
    );
    assert!(session.banned().is_empty());
    for peer in &route {
        assert_eq!(reputation.get(peer).failures, 0, "{peer} marked as failed");
    }
    let last = session.step_rewinding(hidden(1), 7).await.unwrap();
    assert_eq!(last.dims(), [1, 1, tiny::config().hidden_size]);
    session.close().await;
    mesh.stop().await.unwrap();
}
