//! The gateway is as strict as the API it serves, as OpenAI's Python SDK sees it: an
//! unknown model is 404, out-of-range sampling, unknown roles and empty messages are 400,
//! all with OpenAI's error object; a stream ends with the same finish reason as the
//! whole answer, and with an error (no `stop`, no `[DONE]`) when the mesh fails mid-way;
//! no seed samples afresh; `stream_options.include_usage` adds a usage chunk.
//!
//! Needs `python3` with the `openai` package; `MESH_SKIP_OPENAI_SDK=1` skips the SDK part.

mod common;

use std::process::Command;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn gateway(
    client: mesh_client::MeshClient,
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(mesh_client::openai::serve(client, listener, async {
        let _ = stopped.await;
    }));
    (addr, stop, server)
}

fn refused(seen: &Value, check: &str, status: u64) {
    let e = &seen[check];
    assert_eq!(e["status"], status, "{check}: {e}");
    assert_eq!(e["type"], "invalid_request_error", "{check}: {e}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{check}: {e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_sees_openais_behaviour() {
    if std::env::var_os("MESH_SKIP_OPENAI_SDK").is_some() {
        eprintln!("skipped: MESH_SKIP_OPENAI_SDK is set");
        return;
    }
    let common::Running {
        dir: _dir,
        mesh,
        client,
    } = common::three_node_mesh().await;
    let (addr, stop, server) = gateway(client).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_strict.py");
    let base = format!("http://{addr}/v1");
    let out =
        tokio::task::spawn_blocking(move || Command::new("python3").arg(script).arg(base).output())
            .await
            .unwrap()
            .expect("python3 must be installed (or set MESH_SKIP_OPENAI_SDK=1)");
    assert!(
        out.status.success(),
        "the SDK script failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{seen:#}");

    refused(&seen, "unknown_model", 404);
    assert_eq!(seen["unknown_model"]["code"], "model_not_found");
    for check in [
        "temperature_negative",
        "temperature_huge",
        "top_p_negative",
        "top_p_zero",
        "unknown_role",
        "empty_messages",
    ] {
        refused(&seen, check, 400);
    }
    assert_eq!(
        seen["valid"],
        Value::Null,
        "temperature 2, top_p 1 are valid"
    );

    assert_eq!(seen["whole_finish"], "length");
    assert_eq!(seen["stream_finish"], "length", "streamed like the whole");

    let unseeded: Vec<&str> = seen["unseeded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        unseeded[0] != unseeded[1] || unseeded[1] != unseeded[2],
        "three unseeded samples were the same: {unseeded:?}"
    );
    assert_eq!(seen["seeded"][0], seen["seeded"][1]);

    let usage = &seen["usage_chunk"];
    assert_eq!(usage["choices"], 0, "{usage}");
    assert_eq!(usage["usage"]["completion_tokens"], 8, "{usage}");
    assert!(
        usage["usage"]["prompt_tokens"].as_u64().unwrap() > 0,
        "{usage}"
    );
    assert_eq!(usage["usage_before_last"], false, "{usage}");

    let _ = stop.send(());
    server.await.unwrap().unwrap();
    mesh.stop().await.unwrap();
}

/// The mesh fails mid-stream: the stream ends with OpenAI's error event, and nothing
/// after it pretends success (no `finish_reason: "stop"`, no `[DONE]`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mid_stream_failure_ends_the_stream_with_an_error() {
    let common::Running {
        dir: _dir,
        mut mesh,
        client,
    } = common::three_node_mesh().await;
    let (addr, stop, server) = gateway(client).await;
    let body = serde_json::json!({
        "model": "tiny-llama-mesh", "stream": true, "max_tokens": 450, "temperature": 0,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
    })
    .to_string();
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    // Wait for the first token's chunk, then take every server down.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("data: {") {
        let n = socket.read(&mut buf).await.unwrap();
        assert!(n > 0, "the stream ended before its first chunk");
        seen.extend_from_slice(&buf[..n]);
    }
    for (peer, _) in mesh.servers() {
        mesh.crash(peer);
    }
    let read_rest = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        socket.read_to_end(&mut seen),
    );
    read_rest.await.expect("the stream ends").unwrap();
    let text = String::from_utf8_lossy(&seen);
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    let last = events.last().copied().unwrap_or_default();
    assert!(
        last.contains("\"error\"") && !text.contains("[DONE]") && !text.contains("\"stop\""),
        "want the stream to end with an error and nothing after it; the last events: {:?}",
        &events[events.len().saturating_sub(3)..]
    );
    let error: Value = serde_json::from_str(last).unwrap();
    assert!(error["error"]["message"].is_string(), "{error}");

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// A body that is not the request's JSON gets OpenAI's error object too, not plain text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_body_gets_openais_error_object() {
    let common::Running {
        dir: _dir,
        mesh,
        client,
    } = common::three_node_mesh().await;
    let (addr, stop, server) = gateway(client).await;
    for body in ["{not json", r#"{"messages": "hello"}"#] {
        let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        socket.read_to_string(&mut response).await.unwrap();
        let (head, rest) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 "), "{body}: {head}");
        let error: Value = serde_json::from_str(rest)
            .unwrap_or_else(|e| panic!("{body}: not JSON ({e}): {rest:?}"));
        assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
    }
    let _ = stop.send(());
    server.await.unwrap().unwrap();
    mesh.stop().await.unwrap();
}
