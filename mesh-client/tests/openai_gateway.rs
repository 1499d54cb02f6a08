//! The official OpenAI Python SDK against `serve-openai` over a 3-node mesh: a streamed
//! chat completion arrives and equals the direct client generation.
//!
//! Needs `python3` with the `openai` package (`.ci/run` installs it). Set
//! `MESH_SKIP_OPENAI_SDK=1` to skip on a machine without them.

mod common;

use std::process::Command;

use futures::StreamExt;
use mesh_client::{ChatMessage, SamplingParams};
use mesh_core::model::tiny;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_streams_what_the_client_generates() {
    if std::env::var_os("MESH_SKIP_OPENAI_SDK").is_some() {
        eprintln!("skipped: MESH_SKIP_OPENAI_SDK is set");
        return;
    }
    let common::Running {
        dir: _dir,
        mesh,
        client,
    } = common::three_node_mesh().await;

    let messages = vec![ChatMessage {
        role: "user".into(),
        content: "Say hello to the mesh.".into(),
    }];
    // What the SDK asks for: temperature 0, no penalty, 16 tokens.
    let params = SamplingParams::greedy(16);
    let direct: String = client
        .chat(&messages, params)
        .await
        .unwrap()
        .map(|t| t.unwrap().text)
        .collect()
        .await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(mesh_client::openai::serve(client, listener, async {
        let _ = stopped.await;
    }));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_sdk.py");
    let out =
        tokio::task::spawn_blocking(move || Command::new("python3").arg(script).arg(base).output())
            .await
            .unwrap()
            .expect("python3 must be installed (or set MESH_SKIP_OPENAI_SDK=1)");
    assert!(
        out.status.success(),
        "the SDK script failed (is `pip install openai` done?):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["models"][0], tiny::TINY_MODEL_ID);
    assert_eq!(
        seen["streamed"].as_str().unwrap(),
        direct,
        "streamed chat equals direct generation"
    );
    assert!(seen["chunks"].as_u64().unwrap() >= 2);
    assert_eq!(
        seen["whole"].as_str().unwrap(),
        direct,
        "non-streamed chat too"
    );
    assert_eq!(seen["finish"], "length");
    assert_eq!(seen["completion_tokens"], 16);

    let _ = stop.send(());
    server.await.unwrap().unwrap();
    mesh.stop().await.unwrap();
}
