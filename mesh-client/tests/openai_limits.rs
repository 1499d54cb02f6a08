//! The gateway bounds a request's body and prompt before it tokenizes: a 1.9 MB prompt
//! (tokenizing it once took the gateway from 30 to 394 MB) is refused with 413 before its
//! body is read, and memory does not jump.

mod common;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Peak resident memory of this process, in bytes (`VmHWM`).
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// Read one response head (through the blank line) and return its status line.
async fn read_head(socket: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if socket.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    head.lines().next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_prompt_is_refused_before_it_is_tokenized() {
    let common::Running {
        dir: _dir,
        mesh,
        client,
    } = common::three_node_mesh().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(mesh_client::openai::serve(client, listener, async {
        let _ = stopped.await;
    }));

    let prompt = "mesh ".repeat(1_900_000 / 5);
    let body = serde_json::json!({"model": "tiny-llama-mesh", "prompt": prompt, "max_tokens": 1})
        .to_string();
    // Forget the peak so far (Linux: writing 5 to clear_refs resets VmHWM).
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = peak_rss();
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let mut status = read_head(&mut socket).await;
    if status.contains(" 100 ") {
        // The gateway asked for the body: send it and read the final answer.
        socket.write_all(body.as_bytes()).await.unwrap();
        status = read_head(&mut socket).await;
    }
    let mut rest = String::new();
    let _ = socket.read_to_string(&mut rest).await;
    let grew = peak_rss().saturating_sub(before);
    assert!(
        status.contains(" 413 ") && grew < 64 << 20,
        "status {status:?} (want 413), peak memory grew {} MiB; body {rest}",
        grew >> 20
    );
    let error: serde_json::Value = serde_json::from_str(rest.trim()).unwrap();
    assert!(error["error"]["message"].is_string(), "{error}");

    // A prompt far past the context but within the body limit: read, and refused as too
    // long for the context before it is tokenized, with OpenAI's code for it.
    let prompt = "mesh ".repeat(30_000 / 5);
    let body = serde_json::json!({"model": "tiny-llama-mesh", "prompt": prompt, "max_tokens": 1})
        .to_string();
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let status = read_head(&mut socket).await;
    let mut rest = String::new();
    socket.read_to_string(&mut rest).await.unwrap();
    assert!(status.contains(" 400 "), "{status} {rest}");
    let error: serde_json::Value = serde_json::from_str(rest.trim()).unwrap();
    assert_eq!(error["error"]["code"], "context_length_exceeded", "{error}");

    let _ = stop.send(());
    server.await.unwrap().unwrap();
    mesh.stop().await.unwrap();
}
