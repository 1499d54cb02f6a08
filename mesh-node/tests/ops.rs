//! Operating a node as a provider does, over real processes: `init` → `register` →
//! `start --daemon` → `status` → `/healthz`, `/metrics`, `/` → `stop`; what `register`
//! checks and refuses; and the bad configurations that must fail clearly without
//! overwriting anything. (Earnings, the dashboard in a browser and JSON logs:
//! `dashboard.rs`.)
//!
//! Needs the binaries: `cargo build --workspace --bins && cargo test --workspace`.

mod common;
mod ops_support;

use std::path::Path;
use std::process::Output;

use common::*;
use mesh_core::daemon;
use mesh_core::http::Health;
use mesh_core::ModelId;
use ops_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_register_start_daemon_status_health_metrics_dashboard_stop() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let (_bootstrap, boot_addr) = start_bootstrap(dir.path()).await;
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

    // register: checks the model, the machine and the sizing, joins through the bootstrap,
    // announces, is found by a fresh client, withdraws, and writes the span it picked (the
    // mesh is empty: the whole model fits) into the config, changing nothing else.
    let o = mesh_node(&home, &["register"]);
    assert!(o.status.success(), "register: {}", stderr(&o));
    let out = stdout(&o);
    for needle in [
        "model mesh-demo: 6 blocks, config.json and 1 weight file(s) read",
        "machine: ",
        "sizing: 6 blocks need ",
        "joined the mesh as ",
        "span: blocks 0..6 of 6 (picked: the blocks the mesh serves worst)",
        "a fresh client found it in the DHT after ",
        // Loopback only: the loud warning with the steps to fix it.
        "will not be reachable by real clients",
        "sudo ufw allow",
        "withdrawn again",
        "wrote blocks = \"0..6\"",
    ] {
        assert!(
            out.contains(needle),
            "register output lacks {needle:?}:\n{out}"
        );
    }
    let registered = std::fs::read_to_string(&config).unwrap();
    let changed: Vec<(&str, &str)> = written
        .lines()
        .zip(registered.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(changed, vec![("# blocks = \"0..8\"", "blocks = \"0..6\"")]);
    let written = registered;

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

    // A second start refuses and leaves the PID file alone; so does register (it would
    // join with the running node's identity).
    let o = mesh_node(&home, &["start", "--daemon"]);
    assert_fails_with(&o, &["already running", &pid.to_string()]);
    assert_eq!(daemon::read_pid(&pid_file).unwrap(), Some(pid));
    let o = mesh_node(&home, &["register"]);
    assert_fails_with(
        &o,
        &["a node is running", &pid.to_string(), "mesh-node stop"],
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), written);

    // status says running, with the peer id and span.
    let o = mesh_node(&home, &["status"]);
    assert!(o.status.success(), "status: {}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains(&format!("running (pid {pid})")), "{out}");
    assert!(out.contains(&format!("peer id {peer_id}")), "{out}");
    assert!(out.contains("blocks 0..6 of 6"), "{out}");
    assert!(out.contains("tokens served 0"), "{out}");
    // The first line sums the node up, as a provider's console does.
    let summary = out.lines().next().unwrap_or_default();
    for needle in [
        "serving mesh-demo blocks 0..6",
        "| tokens 0 |",
        "| earned 0 (0 settled) |",
        "| sessions 0 open |",
        "| CPU load ",
        "| up ",
    ] {
        assert!(
            summary.contains(needle),
            "summary lacks {needle:?}: {summary}"
        );
    }
    let no_gpu = mesh_core::probe::gpu_live().is_empty();
    assert_eq!(summary.contains("VRAM none"), no_gpu, "{summary}");
    let o = mesh_node(&home, &["status", "--short"]);
    assert!(o.status.success(), "status --short: {}", stderr(&o));
    // The two calls read the machine at different moments: compare all but the live
    // readings (load, free VRAM, uptime), which may move between them.
    let steady = |line: &str| -> Vec<String> {
        line.split(" | ")
            .filter(|f| {
                !["CPU load ", "VRAM ", "up "]
                    .iter()
                    .any(|l| f.starts_with(l))
            })
            .map(str::to_owned)
            .collect()
    };
    let short = stdout(&o);
    assert_eq!(
        short.trim_end().lines().count(),
        1,
        "--short is one line: {short}"
    );
    assert_eq!(
        steady(short.trim_end()),
        steady(summary),
        "--short is the summary alone"
    );
    // Live GPU lines when the machine has GPUs, none (and no error) when it has none.
    let has_gpu = !mesh_core::probe::gpu_live().is_empty();
    assert_eq!(out.lines().any(|l| l.starts_with("gpu ")), has_gpu, "{out}");

    // /healthz, /metrics, /.
    let (code, body) = get(http_addr, "/healthz");
    assert_eq!(code, 200);
    let health: Health = serde_json::from_str(&body).expect("healthz JSON");
    assert!(health.running);
    assert_eq!(health.status, "serving");
    assert_eq!(health.pid, pid);
    assert_eq!(health.peer_id.as_deref(), Some(peer_id.as_str()));
    assert_eq!(health.span.as_deref(), Some("0..6"));
    assert!(health.memory.total_bytes.is_some());
    // Live CPU beside the memory: the load averages on Linux, the cores always.
    assert!(health.cpu.cores >= 1, "{body}");
    assert!(health.cpu.load_1m.is_some(), "{body}");
    assert_eq!(!health.gpu_live.is_empty(), has_gpu, "{body}");

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
        "# TYPE mesh_connections_closed_unresponsive_total counter",
        "# TYPE mesh_cpu_load1 gauge",
        "mesh_cpu_cores",
        "# TYPE mesh_memory_available_bytes gauge",
    ] {
        assert!(
            metrics.contains(needle),
            "/metrics lacks {needle:?}:\n{metrics}"
        );
    }
    assert!(metrics.contains(&format!("peer_id=\"{peer_id}\"")));
    assert_eq!(
        metrics.contains("mesh_gpu_memory_used_bytes{gpu=\"0\"}"),
        has_gpu,
        "{metrics}"
    );

    let (code, page) = get(http_addr, "/");
    assert_eq!(code, 200);
    assert!(page.contains(&format!("<code id=\"peer-id\">{peer_id}</code>")));
    assert!(page.contains("<svg id=\"tokens-chart\""));
    assert!(
        page.contains("<td id=\"cpu-live\">load "),
        "live CPU on the dashboard"
    );
    assert!(page.contains("<polyline"));
    assert!(
        !page.contains("http://") || !page.contains("src=\"http"),
        "no external assets"
    );

    // Other peers see the node's hardware in its heartbeats: `mesh-client nodes`.
    let o = run_bin(
        "mesh-client",
        &home,
        &["nodes", "--bootstrap", &boot],
        "warn,libp2p=error",
    );
    assert!(o.status.success(), "mesh-client nodes: {}", stderr(&o));
    let nodes = stdout(&o);
    let line = nodes
        .lines()
        .find(|l| l.starts_with(&peer_id))
        .unwrap_or_else(|| panic!("the node in `mesh-client nodes`:\n{nodes}"));
    assert!(line.contains("blocks [0, 6) of 6"), "{line}");
    let machine = mesh_core::probe::probe(&home).capability().to_string();
    assert!(
        line.ends_with(&format!("[{machine}]")),
        "{line} vs {machine}"
    );
    assert!(
        machine.contains(" cores, ") && machine.contains(" RAM, "),
        "{machine}"
    );

    // The mesh sees the node.
    let client = test_client(&boot_addr).await;
    let model = ModelId::new(mesh_core::model::builtin::DEFAULT_ID);
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

/// A loopback port that was free a moment ago, for addresses that must name their port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `mesh-node register ARGS`, logging only errors (the report is on stdout).
fn register(home: &Path, args: &[&str]) -> Output {
    let mut all = vec!["register"];
    all.extend_from_slice(args);
    run_bin("mesh-node", home, &all, "error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_checks_reachability_and_refuses_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (_bootstrap, boot_addr) = start_bootstrap(dir.path()).await;
    let boot = boot_addr.to_string();
    let boot_peer = Proc::peer_id(&boot_addr).to_string();
    let home = dir.path().join("home");
    let text = config_text("", Some(&boot));
    let config = write_config(&home, &text);

    // A declared public address that accepts connections: the bootstrap dials it back.
    let port = free_port();
    let public = format!("/ip4/127.0.0.1/tcp/{port}");
    let o = register(
        &home,
        &[
            "--dry-run",
            "--blocks",
            "2..5",
            "--listen",
            &public,
            "--public-addr",
            &public,
        ],
    );
    assert!(o.status.success(), "register: {}", stderr(&o));
    let out = stdout(&o);
    for needle in [
        "span: blocks 2..5 of 6 (as asked)".to_owned(),
        "sizing: 3 blocks need ".to_owned(),
        format!("public address {public} reachable (dialled back by {boot_peer})"),
        "dry run:".to_owned(),
    ] {
        assert!(
            out.contains(&needle),
            "register output lacks {needle:?}:\n{out}"
        );
    }
    assert_eq!(std::fs::read_to_string(&config).unwrap(), text);

    // A public address nobody listens on: refused, with the steps to fix it.
    let closed = loop {
        let p = free_port();
        if p != port {
            break p;
        }
    };
    let o = register(
        &home,
        &[
            "--listen",
            &public,
            "--public-addr",
            &format!("/ip4/127.0.0.1/tcp/{closed}"),
        ],
    );
    assert_fails_with(
        &o,
        &[
            &format!("public address /ip4/127.0.0.1/tcp/{closed} is NOT reachable"),
            "will not be reachable by real clients",
            &format!("sudo ufw allow {closed}/tcp"),
            "nc -zv",
        ],
    );
    // Both trials withdrew their announcement, the failed one too: every "server up" the
    // bootstrap logged has its "server left" (a leaving heartbeat), none merely expired.
    let log = dir.path().join("bootstrap.stderr");
    wait_for(
        DROP_LIMIT,
        "the bootstrap to hear both trials leave",
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let (up, left) = (
                text.matches("server up").count(),
                text.matches("server left").count(),
            );
            async move { (up >= 2 && up == left).then_some(()) }
        },
    )
    .await;

    // Each of these fails before joining anything, with what to fix.
    let o = register(&home, &["--cache-budget-mib", "100000000"]);
    assert_fails_with(&o, &["blocks need", "MiB of KV cache", "available"]);
    let o = register(&home, &["--num-blocks", "32"]);
    assert_fails_with(&o, &["the model has 6 blocks, not the 32 expected"]);
    let o = register(&home, &["--blocks", "6..9"]);
    assert_fails_with(&o, &["blocks 6..9 are outside the model's 6 blocks"]);
    let o = register(&home, &["--model-dir", "/nonexistent/mesh-model"]);
    assert_fails_with(&o, &["model directory /nonexistent/mesh-model"]);
    let bad_boot = format!("/ip4/127.0.0.1/tcp/{closed}/p2p/{boot_peer}");
    let o = register(&home, &["--bootstrap", &bad_boot]);
    assert_fails_with(&o, &["could not connect to any bootstrap peer", &bad_boot]);
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        text,
        "nothing written by a failed register"
    );
    let lonely = dir.path().join("lonely");
    write_config(&lonely, &config_text("", None));
    let o = register(&lonely, &[]);
    assert_fails_with(&o, &["no bootstrap peer", "--bootstrap"]);
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
    // (--standalone: this config names no bootstrap, which is refused before the port.)
    let o = mesh_node(&home, &["start", "--daemon", "--standalone"]);
    assert_fails_with(&o, &["HTTP port", &port.to_string(), "exited during start"]);
    assert!(
        !home.join("mesh-node.pid").exists(),
        "no PID file for a node that never ran"
    );
    // In the foreground, the same message directly.
    let o = mesh_node(&home, &["start", "--standalone"]);
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

/// `start --daemon` keeps its log to `[daemon] log_max_size`, rotating into `.1` … `.N`
/// (`log_keep`), every line whole, and still writes what it prints after a rotation
/// (`stopped`) into the current file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemons_log_rotates_by_size_and_keeps_log_keep_files() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let text = config_text("", None) + "\n[daemon]\nlog_max_size = \"4KiB\"\nlog_keep = 2\n";
    write_config(&home, &text);
    let pid_file = home.join("mesh-node.pid");
    let _guard = StopOnDrop(pid_file.clone());
    // Debug logs, so the node writes several KiB soon.
    let o = run_bin(
        "mesh-node",
        &home,
        &["start", "--daemon", "--standalone"],
        "debug",
    );
    assert!(o.status.success(), "start --daemon: {}", stderr(&o));
    assert!(
        stdout(&o).contains("started in the background"),
        "{}",
        stdout(&o)
    );
    let log = home.join("mesh-node.log");
    let rotated = |n: u32| home.join(format!("mesh-node.log.{n}"));
    wait_for(DROP_LIMIT, "the log to rotate twice", || {
        let done = rotated(2).exists();
        async move { done.then_some(()) }
    })
    .await;
    let o = mesh_node(&home, &["stop"]);
    assert!(o.status.success(), "stop: {}", stderr(&o));
    assert!(
        !rotated(3).exists(),
        "only log_keep = 2 rotated files are kept"
    );
    for path in [&log, &rotated(1), &rotated(2)] {
        let text = std::fs::read_to_string(path).unwrap();
        // Rotation happens between log lines; a line printed outside the log writer may
        // land after it, so allow one more line's worth. The start-up lines stay in one
        // file until the node serves (docs/operations.md: `start --daemon` reads them
        // back), so the file that holds them ("serving from", the device line) may be
        // longer: how much depends on what start-up logs at debug level.
        let holds_start_up = text.contains("serving from");
        assert!(
            holds_start_up || text.len() <= 4096 + 1024,
            "{}: {} bytes",
            path.display(),
            text.len()
        );
        assert!(text.ends_with('\n'), "{} ends mid-line", path.display());
    }
    let current = std::fs::read_to_string(&log).unwrap();
    assert!(
        current.lines().any(|l| l == "stopped"),
        "what the node prints after a rotation goes to the current file:\n{current}"
    );
}

/// `register` with a hub id found in a local Hugging Face cache ($HF_HOME), sized at f32
/// and quantized: the quantized span's weights are the fewer bytes, and a hub id not in
/// the cache is refused with where it was looked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_finds_hub_ids_in_the_hf_cache_and_sizes_quantized_spans() {
    let dir = tempfile::tempdir().unwrap();
    let (_bootstrap, boot_addr) = start_bootstrap(dir.path()).await;
    let home = dir.path().join("home");
    write_config(&home, &config_text("", Some(&boot_addr.to_string())));
    let hf = dir.path().join("hf");
    let repo = hf.join("hub/models--mesh--tiny");
    mesh_core::model::tiny::write(&repo.join("snapshots/0123abcd")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();

    let run = |args: &[&str]| {
        let mut all = vec!["register", "--dry-run", "--blocks", "0..8"];
        all.extend_from_slice(args);
        let o = std::process::Command::new(binary("mesh-node"))
            .args(&all)
            .env("MESH_HOME", &home)
            .env("HF_HOME", &hf)
            .env("RUST_LOG", "error")
            .env_remove("MESH_NODE_CONFIG")
            .env_remove("HF_HUB_CACHE")
            .output()
            .unwrap();
        (o.status.success(), stdout(&o), stderr(&o))
    };
    let weights = |out: &str| -> f64 {
        let line = out.lines().find(|l| l.starts_with("sizing: ")).unwrap();
        let need = line.split(" need ").nth(1).unwrap();
        need.split(" MiB").next().unwrap().parse().unwrap()
    };
    let (ok, f32_out, err) = run(&["--model-dir", "mesh/tiny"]);
    assert!(ok, "register: {err}");
    assert!(f32_out.contains("sizing: 8 blocks need "), "{f32_out}");
    let (ok, q_out, err) = run(&["--model-dir", "mesh/tiny", "--quantize", "q8_0"]);
    assert!(ok, "register: {err}");
    assert!(q_out.contains("sizing: 8 blocks (q8_0) need "), "{q_out}");
    // The tiny model's down projection (344 wide) is not a whole number of Q8_0 blocks and
    // stays f32; the rest takes 34 bytes per 32 weights instead of 128.
    let (full, quantized) = (weights(&f32_out), weights(&q_out));
    assert!(quantized < full * 0.5, "{quantized} vs {full}");

    // `probe` sizes the same way, per block.
    let probe = |args: &[&str]| {
        let mut all = vec!["probe", "--model-dir", "mesh/tiny"];
        all.extend_from_slice(args);
        let o = std::process::Command::new(binary("mesh-node"))
            .args(&all)
            .env("MESH_HOME", &home)
            .env("HF_HOME", &hf)
            .output()
            .unwrap();
        assert!(o.status.success(), "probe: {}", stderr(&o));
        let out = stdout(&o);
        let line = out
            .lines()
            .find(|l| l.starts_with("model  "))
            .unwrap()
            .to_owned();
        assert!(out.contains("RAM: room for "), "{out}");
        let per_block: f64 = line
            .split(", ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        (line, per_block)
    };
    let (line, f32_block) = probe(&[]);
    assert!(
        line.contains("8 blocks") && line.ends_with("(f32)"),
        "{line}"
    );
    let (line, q8_block) = probe(&["--quantize", "q8_0"]);
    assert!(line.ends_with("(q8_0)"), "{line}");
    // Per-block figures are printed to 0.1 MiB.
    assert!(
        (q8_block * 8.0 - quantized).abs() < 0.45,
        "{q8_block} x 8 vs {quantized}"
    );
    assert!(
        (f32_block * 8.0 - full).abs() < 0.45,
        "{f32_block} x 8 vs {full}"
    );

    let (ok, _, err) = run(&["--model-dir", "mesh/absent"]);
    assert!(!ok);
    assert!(
        err.contains("mesh/absent") && err.contains(&hf.join("hub").display().to_string()),
        "{err}"
    );
}
