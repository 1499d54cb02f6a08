//! Operating a node as a provider does, over real processes: `init` → `start --daemon` →
//! `status` → `/healthz`, `/metrics`, `/` → `stop`; and the bad configurations that must fail
//! clearly without overwriting anything.
//!
//! Needs the binaries: `cargo build --workspace --bins && cargo test --workspace`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use mesh_core::daemon;
use mesh_core::http::{self, Health};
use mesh_core::ModelId;

/// Limit for one command (a `start --daemon` includes loading the tiny model).
const COMMAND_LIMIT: Duration = Duration::from_secs(120);

/// Runs `mesh-node ARGS` with `MESH_HOME=home`, killing it after [`COMMAND_LIMIT`].
fn mesh_node(home: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(binary("mesh-node"))
        .args(args)
        .env("MESH_HOME", home)
        .env("RUST_LOG", "info,libp2p=warn")
        .env_remove("MESH_NODE_CONFIG")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mesh-node");
    let deadline = Instant::now() + COMMAND_LIMIT;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("mesh-node {args:?} still running after {COMMAND_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts failure with a message containing every one of `needles` on stderr.
fn assert_fails_with(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success\nstdout: {}\nstderr: {err}",
        stdout(o)
    );
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
    assert!(
        err.lines().count() <= 25,
        "a clear message, not a dump:\n{err}"
    );
}

/// Stops whatever node holds `pid_file` when the test ends, pass or fail.
struct StopOnDrop(PathBuf);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Ok(Some(pid)) = daemon::running_pid(&self.0) {
            if daemon::stop(&self.0, Duration::from_secs(15)).is_err() {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http::get(addr, path, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"))
}

fn write_config(home: &Path, text: &str) -> PathBuf {
    std::fs::create_dir_all(home).unwrap();
    let path = home.join("node.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A valid config for a node on 127.0.0.1 with ephemeral ports; `extra` is appended
/// before the tables.
fn config_text(extra: &str, bootstrap: Option<&str>) -> String {
    let boot = bootstrap.map_or(String::new(), |b| format!("bootstrap = [\"{b}\"]\n"));
    format!(
        "{extra}\n[network]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\n{boot}heartbeat_secs = 1.0\n\
         announce_secs = 2.0\n\n[limits]\ncache_budget_mib = 64\n\n[http]\nlisten = \"127.0.0.1:0\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_start_daemon_status_health_metrics_dashboard_stop() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let bootstrap = Proc::spawn(
        "bootstrap",
        "mesh-bootstrap",
        &bootstrap_args(dir.path(), 0),
        dir.path(),
    );
    let boot_addr = bootstrap.listen_addr().await;
    let boot = boot_addr.to_string();

    // init: a commented config and a key; a second init refuses and changes nothing.
    let o = mesh_node(
        &home,
        &[
            "init",
            "--http",
            "127.0.0.1:0",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--bootstrap",
            &boot,
        ],
    );
    assert!(o.status.success(), "init: {}", stderr(&o));
    let config = home.join("node.toml");
    let written = std::fs::read_to_string(&config).unwrap();
    assert!(written.contains("# Model name on the mesh."), "{written}");
    assert!(home.join("node.key").exists());
    // Quick heartbeats so the client below sees the node come and go promptly.
    let written = written
        .replace("heartbeat_secs = 15.0", "heartbeat_secs = 1.0")
        .replace("announce_secs = 120.0", "announce_secs = 2.0")
        .replace("cache_budget_mib = 1024", "cache_budget_mib = 64");
    std::fs::write(&config, &written).unwrap();
    let key = std::fs::read(home.join("node.key")).unwrap();
    let o = mesh_node(&home, &["init"]);
    assert_fails_with(&o, &["already exists", "--force"]);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), written);
    assert_eq!(std::fs::read(home.join("node.key")).unwrap(), key);

    // Not running yet.
    let o = mesh_node(&home, &["status"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stdout(&o).contains("not running"));

    // start --daemon returns once the node serves, leaving it running in the background.
    let pid_file = home.join("mesh-node.pid");
    let _guard = StopOnDrop(pid_file.clone());
    let o = mesh_node(&home, &["start", "--daemon"]);
    assert!(o.status.success(), "start --daemon: {}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("started in the background"), "{out}");
    let pid = daemon::running_pid(&pid_file)
        .unwrap()
        .expect("a live PID in the PID file");
    let http_addr = daemon::read_http_addr(&pid_file).expect("HTTP address beside the PID file");
    assert!(out.contains(&format!("http on {http_addr}")), "{out}");
    let peer_id = out
        .lines()
        .find_map(|l| l.strip_prefix("peer id "))
        .expect("peer id line")
        .to_owned();

    // A second start refuses and leaves the PID file alone.
    let o = mesh_node(&home, &["start", "--daemon"]);
    assert_fails_with(&o, &["already running", &pid.to_string()]);
    assert_eq!(daemon::read_pid(&pid_file).unwrap(), Some(pid));

    // status says running, with the peer id and span.
    let o = mesh_node(&home, &["status"]);
    assert!(o.status.success(), "status: {}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains(&format!("running (pid {pid})")), "{out}");
    assert!(out.contains(&format!("peer id {peer_id}")), "{out}");
    assert!(out.contains("blocks 0..8 of 8"), "{out}");
    assert!(out.contains("tokens served 0"), "{out}");

    // /healthz, /metrics, /.
    let (code, body) = get(http_addr, "/healthz");
    assert_eq!(code, 200);
    let health: Health = serde_json::from_str(&body).expect("healthz JSON");
    assert!(health.running);
    assert_eq!(health.status, "serving");
    assert_eq!(health.pid, pid);
    assert_eq!(health.peer_id.as_deref(), Some(peer_id.as_str()));
    assert_eq!(health.span.as_deref(), Some("0..8"));
    assert!(health.memory.total_bytes.is_some());

    let (code, metrics) = get(http_addr, "/metrics");
    assert_eq!(code, 200);
    for needle in [
        "# TYPE mesh_up gauge\nmesh_up 1\n",
        "# TYPE mesh_tokens_served_total counter",
        "mesh_tokens_served_total{phase=\"decode\"} 0",
        "mesh_sessions_active 0",
        "# TYPE mesh_block_latency_seconds histogram",
        "mesh_block_latency_seconds_bucket{le=\"+Inf\"} 0",
        "mesh_bytes_total{direction=\"in\"}",
        "# TYPE mesh_errors_total counter",
        "mesh_peers_connected",
    ] {
        assert!(
            metrics.contains(needle),
            "/metrics lacks {needle:?}:\n{metrics}"
        );
    }
    assert!(metrics.contains(&format!("peer_id=\"{peer_id}\"")));

    let (code, page) = get(http_addr, "/");
    assert_eq!(code, 200);
    assert!(page.contains(&format!("<code id=\"peer-id\">{peer_id}</code>")));
    assert!(page.contains("<svg id=\"tokens-chart\""));
    assert!(page.contains("<polyline"));
    assert!(
        !page.contains("http://") || !page.contains("src=\"http"),
        "no external assets"
    );

    // The mesh sees the node.
    let client = test_client(&boot_addr).await;
    let model = ModelId::new(MODEL);
    let c = client.client.clone();
    c.subscribe(&model)
        .await
        .expect("subscribe to the model's heartbeats");
    let live = |c: mesh_core::p2p::Client, model: ModelId| async move {
        c.live_servers(&model)
            .await
            .map(|s| s.iter().map(|s| s.peer_id.to_string()).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    wait_for(
        DROP_LIMIT,
        "the client to see the node's heartbeats",
        || {
            let (c, m, p) = (c.clone(), model.clone(), peer_id.clone());
            async move { live(c, m).await.contains(&p).then_some(()) }
        },
    )
    .await;

    // stop: the process goes, the PID file goes, the peers drop it.
    let o = mesh_node(&home, &["stop"]);
    assert!(o.status.success(), "stop: {}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!("stopped (pid {pid})")),
        "{}",
        stdout(&o)
    );
    assert!(!daemon::is_alive(pid), "process {pid} still there");
    assert!(!pid_file.exists(), "PID file left behind");
    assert!(!daemon::http_addr_path(&pid_file).exists());
    wait_for(DROP_LIMIT, "the client to drop the stopped node", || {
        let (c, m, p) = (c.clone(), model.clone(), peer_id.clone());
        async move { (!live(c, m).await.contains(&p)).then_some(()) }
    })
    .await;

    let log = std::fs::read_to_string(home.join("mesh-node.log")).unwrap();
    assert!(
        log.lines().any(|l| l == "stopped"),
        "clean exit in the log:\n{log}"
    );
    let o = mesh_node(&home, &["status"]);
    assert_eq!(o.status.code(), Some(3));
    let o = mesh_node(&home, &["stop"]);
    assert!(o.status.success() && stdout(&o).contains("not running"));

    // The node kept a ledger; nobody used it, so nothing was earned.
    assert!(home.join("ledger").exists(), "the ledger beside the config");
    let o = mesh_node(&home, &["earnings"]);
    assert!(o.status.success(), "earnings: {}", stderr(&o));
    assert!(stdout(&o).contains("no receipts yet"), "{}", stdout(&o));
}

#[test]
fn bad_configs_fail_clearly_and_overwrite_nothing() {
    let dir = tempfile::tempdir().unwrap();

    // A typo in a key: named, with the file.
    let home = dir.path().join("typo");
    let text = config_text("modle = \"tiny-llama-mesh\"", None);
    let config = write_config(&home, &text);
    let o = mesh_node(&home, &["start"]);
    assert_fails_with(&o, &["modle", "node.toml", "unknown field"]);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), text);
    assert!(!home.join("mesh-node.pid").exists());
    assert!(!home.join("node.key").exists(), "nothing created either");
    // The same with --daemon, and a typo inside a table.
    let text = config_text("", None).replace("cache_budget_mib", "cache_budget_mb");
    write_config(&home, &text);
    let o = mesh_node(&home, &["start", "--daemon"]);
    assert_fails_with(&o, &["cache_budget_mb", "unknown field"]);

    // A model directory that is not there.
    let home = dir.path().join("nomodel");
    let text = config_text("model_dir = \"/nonexistent/mesh-model\"", None);
    write_config(&home, &text);
    let o = mesh_node(&home, &["start", "--daemon"]);
    assert_fails_with(&o, &["model directory /nonexistent/mesh-model"]);
    assert!(!home.join("mesh-node.pid").exists());

    // The HTTP port is taken: the daemon's start fails, its log tail is shown.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap();
    let home = dir.path().join("port");
    let text = config_text("", None).replace("127.0.0.1:0\"", &format!("{port}\""));
    write_config(&home, &text);
    let o = mesh_node(&home, &["start", "--daemon"]);
    assert_fails_with(&o, &["HTTP port", &port.to_string(), "exited during start"]);
    assert!(
        !home.join("mesh-node.pid").exists(),
        "no PID file for a node that never ran"
    );
    // In the foreground, the same message directly.
    let o = mesh_node(&home, &["start"]);
    assert_fails_with(&o, &["HTTP port", &port.to_string()]);
    drop(taken);

    // A key others can read, and a key that is not a key: refused, left as they were.
    let home = dir.path().join("key");
    write_config(&home, &config_text("", None));
    let key = home.join("node.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let o = mesh_node(&home, &["start"]);
        assert_fails_with(&o, &["identity key", "chmod 600"]);
        assert_eq!(std::fs::read(&key).unwrap(), [7u8; 32]);
        let o = mesh_node(&home, &["init", "--force"]);
        assert_fails_with(&o, &["identity key", "chmod 600"]);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    std::fs::write(&key, b"hello").unwrap();
    let o = mesh_node(&home, &["start", "--daemon"]);
    assert_fails_with(&o, &["identity key", "holds 5 bytes"]);
    assert_eq!(std::fs::read(&key).unwrap(), b"hello");
    assert!(!home.join("mesh-node.pid").exists());

    // A span bigger than the memory there is: refused with the numbers.
    let home = dir.path().join("fit");
    write_config(
        &home,
        &config_text("", None).replace("cache_budget_mib = 64", "cache_budget_mib = 100000000"),
    );
    let o = mesh_node(&home, &["start"]);
    assert_fails_with(&o, &["blocks need", "MiB of KV cache", "available"]);

    // --config naming a missing file is an error, not the defaults.
    let o = mesh_node(dir.path(), &["start", "--config", "/nonexistent/node.toml"]);
    assert_fails_with(&o, &["/nonexistent/node.toml"]);
}

#[test]
fn probe_json_describes_the_machine() {
    let dir = tempfile::tempdir().unwrap();
    let o = mesh_node(dir.path(), &["probe", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let p: mesh_core::probe::Probe = serde_json::from_slice(&o.stdout).expect("probe JSON");
    assert!(p.cpu.cores >= 1);
    if cfg!(target_os = "linux") {
        assert!(p.memory.total_bytes.unwrap_or(0) > 0);
        assert!(p.disk.is_some());
    }
    assert!(!p.gpus.is_empty() || p.gpu_note.starts_with("no GPU"));
    let o = mesh_node(dir.path(), &["probe"]);
    assert!(stdout(&o).contains("memory"), "{}", stdout(&o));
}

/// The first of the usual headless browser names on the PATH.
fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}

/// The dashboard in a real browser: it loads, shows the peer id and a chart with a line.
/// Needs Chromium (`apt-get install chromium`): `cargo test -p mesh-node --test ops --
/// --ignored`. Leaves the screenshot at `target/<profile>/dashboard.png`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium installed"]
async fn dashboard_renders_in_headless_chromium() {
    let browser = chromium().expect("no chromium on the PATH: apt-get install chromium");
    let dir = tempfile::tempdir().unwrap();
    let mut args = node_args(dir.path(), "node", mesh_core::BlockRange::new(0, 8), &[]);
    args.extend(["--price-per-token".into(), "3".into()]);
    let node = Proc::spawn("node", "mesh-node", &args, dir.path());
    let peer = Proc::peer_id(&node.listen_addr().await).to_string();
    let http_addr: SocketAddr = node
        .lines()
        .iter()
        .find_map(|l| l.strip_prefix("http on ").and_then(|a| a.parse().ok()))
        .expect("http on line");
    let url = format!("http://{http_addr}/");
    let shot = binary("mesh-node").with_file_name("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let profile = dir.path().join("chromium-profile");
    let common = [
        "--headless".to_owned(),
        "--no-sandbox".to_owned(),
        "--disable-gpu".to_owned(),
        "--disable-dev-shm-usage".to_owned(),
        format!("--user-data-dir={}", profile.display()),
    ];
    let dom = Command::new(browser)
        .args(&common)
        .args(["--dump-dom", &url])
        .output()
        .expect("run chromium --dump-dom");
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.contains(&peer), "peer id not on the page:\n{dom}");
    let points = dom
        .split("<polyline")
        .nth(1)
        .and_then(|rest| rest.split("points=\"").nth(1))
        .and_then(|rest| rest.split('"').next())
        .expect("a polyline with points");
    assert!(
        points.split_whitespace().count() >= 2,
        "a line, not a dot: {points}"
    );

    let status = Command::new(browser)
        .args(&common)
        .args([
            "--hide-scrollbars",
            "--window-size=1000,1100",
            &format!("--screenshot={}", shot.display()),
            &url,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run chromium --screenshot");
    assert!(status.success());
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    eprintln!("dashboard screenshot: {}", shot.display());
}
