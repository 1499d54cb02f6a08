//! A shared gateway through both official SDKs, Python's `openai` and npm's `openai`,
//! against a real billing mesh: keys accepted and refused (401 in OpenAI's shape), 429
//! with `Retry-After` under a burst, `X-Request-Id` echoed, and every answer's cost (in
//! its `usage`, and in a stream's final chunk) adding up, per key in `/v1/usage` and over
//! all keys, to exactly what the gateway's client countersigned; a caller that hangs up
//! mid-stream included.
//!
//! Needs `python3` with the `openai` package (`MESH_SKIP_OPENAI_SDK=1` skips the test),
//! and `node` with `npm`: the npm package is installed under the target directory, and
//! the npm half is skipped, saying why, only if it cannot be installed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mesh_client::openai::{ApiKeys, GatewayConfig, RateLimit};
use mesh_client::MeshClient;
use mesh_core::local_mesh::LocalMesh;
use mesh_core::model::tiny;
use mesh_core::BlockRange;
use serde_json::Value;

const PRICE: u64 = 3;
/// The longest `npm install openai` may take before the npm half is skipped.
const NPM_LIMIT: Duration = Duration::from_secs(180);
/// Requests a key may make at once: each script's main key makes at most this many.
const BURST: u32 = 4;
const KEYS: &str = "\
# the keys of this test's gateway
sk-mesh-python-0000000001 alice
sk-mesh-python-0000000002 bob
sk-mesh-npm-000000000003 carol
sk-mesh-npm-000000000004 dave
sk-mesh-raw-000000000005 erin
";
const ERIN: &str = "sk-mesh-raw-000000000005";

/// One HTTP/1.1 request with erin's key on a fresh connection; the whole answer, or only
/// up to its first SSE event when `hang_up` (then the connection is dropped).
async fn raw(addr: &str, method: &str, path: &str, body: &str, hang_up: bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ERIN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = socket.read(&mut buf).await.unwrap();
        seen.extend_from_slice(&buf[..n]);
        if n == 0 || (hang_up && String::from_utf8_lossy(&seen).contains("data: {")) {
            return String::from_utf8_lossy(&seen).into_owned();
        }
    }
}

/// Three billing servers, one per span, and a client with its own ledger.
async fn billing_mesh(dir: &Path) -> (LocalMesh, MeshClient) {
    let model_dir = dir.join("model");
    tiny::write(&model_dir).unwrap();
    let mut mesh = LocalMesh::start(&model_dir, &[]).await.unwrap();
    mesh.billing = Some((dir.join("ledgers"), PRICE));
    for span in BlockRange::even_split(8, 3) {
        mesh.add_node(span).await.unwrap();
    }
    let client = MeshClient::builder()
        .bootstrap([mesh.bootstrap_addr().clone()])
        .model_dir(&model_dir)
        .ledger_dir(dir.join("client"))
        .build()
        .await
        .unwrap();
    (mesh, client)
}

/// The npm package's folder under the target directory, installed if it is not there;
/// `Err` says why it could not be.
fn npm_openai() -> Result<PathBuf, String> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("npm-openai");
    if dir.join("node_modules/openai/package.json").exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut npm = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--prefix"])
        .arg(&dir)
        .arg("openai")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("running npm: {e}"))?;
    // A registry that does not answer must not hold the test.
    let deadline = Instant::now() + NPM_LIMIT;
    let status = loop {
        match npm.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Ok(None) => {
                let _ = npm.kill();
                let _ = npm.wait();
                return Err(format!("npm install openai took over {NPM_LIMIT:?}"));
            }
            Err(e) => return Err(format!("waiting for npm: {e}")),
        }
    };
    if !status.success() {
        return Err(format!("npm install openai failed ({status})"));
    }
    Ok(dir)
}

/// Run one SDK script; its stdout is one JSON object.
async fn script(program: &str, args: Vec<String>) -> Value {
    let name = format!("{program} {}", args[0]);
    let out = tokio::task::spawn_blocking({
        let program = program.to_string();
        move || Command::new(program).args(args).output()
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        out.status.success(),
        "{name} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{name}: {seen:#}");
    seen
}

/// What both SDKs must have seen; `answers` is how many the main key asked for. Returns
/// the sum of every answer's cost.
fn check(sdk: &str, seen: &Value, answers: u64) -> u64 {
    assert_eq!(seen["no_key"]["status"], 401, "{sdk}: {seen}");
    assert!(
        seen["no_key"]["message"]
            .as_str()
            .unwrap()
            .contains("didn't provide an API key"),
        "{sdk}: {seen}"
    );
    assert_eq!(seen["bad_key"]["status"], 401, "{sdk}: {seen}");
    assert_eq!(seen["bad_key"]["code"], "invalid_api_key", "{sdk}: {seen}");
    assert_eq!(seen["bad_key"]["class"], "AuthenticationError", "{sdk}");

    let final_usage = &seen["stream_final_usage"];
    assert_eq!(final_usage["completion_tokens"], 8, "{sdk}: {final_usage}");
    assert!(final_usage["cost"].as_u64().unwrap() > 0, "{sdk}");
    assert_eq!(seen["stream_usage_before_final"], false, "{sdk}");
    assert_eq!(seen["whole_usage"]["completion_tokens"], 8, "{sdk}: {seen}");

    // The key's usage is its answers, cost included.
    let costs: Vec<u64> = seen["costs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .collect();
    assert!(
        costs.iter().all(|c| *c > 0),
        "{sdk}: every answer costs: {costs:?}"
    );
    let usage = &seen["usage"];
    assert_eq!(usage["requests"], answers, "{sdk}: {usage}");
    let own: u64 = costs[..answers as usize].iter().sum();
    assert_eq!(
        usage["cost"], own,
        "{sdk}: /v1/usage against answers' costs"
    );

    // The burst: BURST answers, then 429 with Retry-After, none over the bucket.
    let burst = seen["burst"].as_array().unwrap();
    let passed: Vec<&Value> = burst.iter().filter(|b| b["status"] == 200).collect();
    assert_eq!(passed.len(), BURST as usize, "{sdk}: {burst:?}");
    let limited = &burst[BURST as usize..];
    assert!(!limited.is_empty());
    for b in limited {
        assert_eq!(b["status"], 429, "{sdk}: {b}");
        assert_eq!(b["code"], "rate_limit_exceeded", "{sdk}: {b}");
        let retry: u64 = b["retry_after"].as_str().unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry), "{sdk}: Retry-After {retry}");
    }
    let burst_cost: u64 = costs[answers as usize..].iter().sum();
    assert_eq!(seen["burst_usage"]["requests"], u64::from(BURST), "{sdk}");
    assert_eq!(seen["burst_usage"]["cost"], burst_cost, "{sdk}");
    costs.iter().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_official_sdks_see_keys_limits_and_costs_equal_to_the_receipts() {
    if std::env::var_os("MESH_SKIP_OPENAI_SDK").is_some() {
        eprintln!("skipped: MESH_SKIP_OPENAI_SDK is set");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mesh, client) = billing_mesh(dir.path()).await;
    let keys_file = dir.path().join("keys");
    std::fs::write(&keys_file, KEYS).unwrap();
    let config = GatewayConfig {
        keys: Some(ApiKeys::load(&keys_file).unwrap()),
        // One request a minute after the burst: no refill while the test runs.
        rate_limit: Some(RateLimit {
            per_minute: 1.0,
            burst: BURST,
        }),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(mesh_client::openai::serve_with(
        client.clone(),
        listener,
        config,
        async {
            let _ = stopped.await;
        },
    ));

    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_keys.py");
    let py = script(
        "python3",
        vec![
            python.into(),
            base.clone(),
            "sk-mesh-python-0000000001".into(),
            "sk-mesh-python-0000000002".into(),
        ],
    )
    .await;
    let mut total = check("python", &py, 4);
    assert_eq!(py["echoed_request_id"], "sdk-request-7");
    assert!(
        py["made_request_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("req_")),
        "{py}"
    );
    let with_usage = &py["include_usage_final"];
    assert!(with_usage["cost"].as_u64().unwrap() > 0, "{with_usage}");

    match npm_openai() {
        Ok(modules) => {
            let node = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_keys.cjs");
            let js = script(
                "node",
                vec![
                    node.into(),
                    modules.display().to_string(),
                    base.clone(),
                    "sk-mesh-npm-000000000003".into(),
                    "sk-mesh-npm-000000000004".into(),
                ],
            )
            .await;
            total += check("npm", &js, 2);
            assert_eq!(js["echoed_request_id"], "npm-request-9");
        }
        Err(why) => eprintln!("npm half skipped: {why}"),
    }

    // A caller that hangs up mid-stream is billed what was countersigned for its answer.
    let addr = base
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_string();
    let body = serde_json::json!({
        "stream": true, "max_tokens": 200, "temperature": 0,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
    })
    .to_string();
    let first = raw(&addr, "POST", "/v1/chat/completions", &body, true).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let erin = loop {
        let answer = raw(&addr, "GET", "/v1/usage", "", false).await;
        let json = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let usage: Value = serde_json::from_str(json).unwrap_or(Value::Null);
        if usage["requests"] == 1 {
            break usage;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the hung-up answer was never billed: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(erin["key"], "erin");
    let erin_cost = erin["cost"].as_u64().unwrap();
    assert!(erin_cost > 0, "{erin}");
    total += erin_cost;

    // Every answer's cost, over every key, is what the client countersigned. A receipt
    // is final once its hop closed, which is before its answer's last chunk is sent (or,
    // for a caller that hung up, before its usage is recorded).
    let countersigned: u64 = client
        .receipts(100_000)
        .unwrap()
        .iter()
        .map(|r| r.receipt.amount)
        .sum();
    assert!(countersigned > 0);
    assert_eq!(
        total, countersigned,
        "the answers' costs add up to {total}; the client countersigned {countersigned}"
    );

    let _ = stop.send(());
    server.await.unwrap().unwrap();
    mesh.stop().await.unwrap();
}
