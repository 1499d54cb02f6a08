//! What a provider earned, seen from outside the ledger while the node runs: a billed
//! generation by a `mesh-client` process, then `/api/earnings`, `mesh-node earnings`, the
//! dashboard (also in headless Chromium, ignored by default), `mesh-node settle` on the
//! running node and the JSON log lines.
//!
//! Needs the binaries: `cargo build --workspace --bins && cargo test --workspace`.

mod common;
mod ops_support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use mesh_core::daemon;
use mesh_core::http::EarningsView;
use mesh_core::ledger::Batch;
use ops_support::*;

/// `RUST_LOG` that shows session events (a session opening is a debug event).
const LOG_WITH_SESSIONS: &str = "info,libp2p=warn,mesh_core::pipeline::server=debug";

/// A node serving the whole built-in demo model (6 blocks) at 3 per token per block, logging JSON lines with
/// session events, after one billed generation by a `mesh-client generate` process.
struct Billed {
    home: PathBuf,
    http: SocketAddr,
    peer_id: String,
    pid: u32,
    /// What the client said the generation cost.
    cost: u64,
    _bootstrap: Proc,
    _stop: StopOnDrop,
}

async fn billed_node(dir: &Path) -> Billed {
    let bootstrap = Proc::spawn("bootstrap", "mesh-bootstrap", &bootstrap_args(dir, 0), dir);
    let boot = bootstrap.listen_addr().await.to_string();
    let home = dir.join("home");
    write_config(
        &home,
        &config_text("price_per_token = 3\nlog_format = \"json\"", Some(&boot)),
    );
    let pid_file = home.join("mesh-node.pid");
    let stop = StopOnDrop(pid_file.clone());
    let o = run_bin(
        "mesh-node",
        &home,
        &["start", "--daemon"],
        LOG_WITH_SESSIONS,
    );
    assert!(o.status.success(), "start --daemon: {}", stderr(&o));
    let pid = daemon::running_pid(&pid_file).unwrap().expect("running");
    let http = daemon::read_http_addr(&pid_file).expect("HTTP address");
    let peer_id = stdout(&o)
        .lines()
        .find_map(|l| l.strip_prefix("peer id "))
        .expect("peer id line")
        .to_owned();
    let client_ledger = dir.join("client-ledger").display().to_string();
    let o = run_bin(
        "mesh-client",
        &home,
        &[
            "generate",
            "--bootstrap",
            &boot,
            "--max-tokens",
            "8",
            "--max-price",
            "3",
            "--ledger-dir",
            &client_ledger,
        ],
        "warn,libp2p=error",
    );
    assert!(o.status.success(), "mesh-client generate: {}", stderr(&o));
    let out = stdout(&o);
    let cost = out
        .rsplit_once("cost ")
        .and_then(|(_, c)| c.trim().parse().ok())
        .unwrap_or_else(|| panic!("no cost in the client's output:\n{out}"));
    Billed {
        home,
        http,
        peer_id,
        pid,
        cost,
        _bootstrap: bootstrap,
        _stop: stop,
    }
}

/// The `points` of the polyline inside the SVG element with id `chart`.
fn chart_points(page: &str, chart: &str) -> Vec<(f64, f64)> {
    let svg = page
        .split(&format!("<svg id=\"{chart}\""))
        .nth(1)
        .and_then(|rest| rest.split("</svg>").next())
        .unwrap_or_else(|| panic!("no chart {chart} on the page:\n{page}"));
    let points = svg
        .split("points=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a polyline with points");
    points
        .split_whitespace()
        .map(|p| {
            let (x, y) = p.split_once(',').expect("x,y");
            (x.parse().unwrap(), y.parse().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_billed_generation_shows_in_earnings_the_dashboard_and_json_logs() {
    let dir = tempfile::tempdir().unwrap();
    let b = billed_node(dir.path()).await;

    // /api/earnings: the running node reads its own ledger.
    let (code, body) = get(b.http, "/api/earnings");
    assert_eq!(code, 200, "{body}");
    let view: EarningsView = serde_json::from_str(&body).expect("earnings JSON");
    assert_eq!(view.payee, b.peer_id);
    let t = view.total;
    assert_eq!(t.sessions, 1, "{view:?}");
    assert!(t.tokens > 8, "prompt + generated positions: {view:?}");
    assert_eq!(t.amount, t.tokens * 6 * 3, "tokens x blocks x price");
    assert_eq!(t.amount, b.cost, "what the client was charged");
    assert_eq!(t.confirmed, t.amount, "countersigned by the client");
    assert_eq!(view.recent.len(), 1);
    let receipt = &view.recent[0];
    assert!(receipt.countersigned && !receipt.settled, "{receipt:?}");
    assert_eq!(receipt.span, "0..6");
    assert_eq!(receipt.amount, t.amount);
    assert_eq!(view.series.first().map(|p| p.1), Some(0));
    assert_eq!(view.series.last().map(|p| p.1), Some(t.amount));
    let later = mesh_core::ledger::now_ms() + 3_600_000;
    let (code, body) = get(b.http, &format!("/api/earnings?since_ms={later}"));
    assert_eq!(code, 200, "{body}");
    let none: EarningsView = serde_json::from_str(&body).unwrap();
    assert!(none.rows.is_empty() && none.total.amount == 0, "{none:?}");

    // `mesh-node earnings` on the running node asks it (the store is locked).
    let o = mesh_node(&b.home, &["earnings"]);
    assert!(o.status.success(), "earnings: {}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains(&format!("from the running node (pid {})", b.pid)),
        "{out}"
    );
    assert!(out.contains(&format!("total {}", t.amount)), "{out}");
    let o = mesh_node(&b.home, &["earnings", "--json"]);
    assert!(o.status.success(), "earnings --json: {}", stderr(&o));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["amount"], t.amount);

    // The dashboard: the total, a rising earnings line, the receipt.
    let (code, page) = get(b.http, "/");
    assert_eq!(code, 200);
    assert!(page.contains(&format!("<code id=\"peer-id\">{}</code>", b.peer_id)));
    assert!(page.contains(&format!("<span id=\"earned\">{}</span>", t.amount)));
    let line = chart_points(&page, "earnings-chart");
    assert!(line.len() >= 2, "{line:?}");
    assert!(
        line[0].1 > line[line.len() - 1].1,
        "the line rises: {line:?}"
    );
    let table = page
        .split("<table id=\"receipts\"")
        .nth(1)
        .expect("receipts table");
    assert!(table.contains(&receipt.session) && table.contains("countersigned"));
    assert!(
        page.contains("<td id=\"capability\">"),
        "hardware from the probe"
    );

    // `mesh-node settle` on the running node: the node settles (POST /api/settle) and
    // keeps its own copy; a dry run marks nothing.
    let settle = |name: &str, dry: bool| {
        let out = dir.path().join(name);
        let mut args = vec!["settle", "--out", out.to_str().unwrap()];
        if dry {
            args.push("--dry-run");
        }
        let o = mesh_node(&b.home, &args);
        assert!(o.status.success(), "settle {args:?}: {}", stderr(&o));
        let text = stdout(&o);
        let kept = text
            .lines()
            .find_map(|l| l.split_once("which keeps its copy at ").map(|(_, p)| p))
            .unwrap_or_else(|| panic!("the node's copy in the output:\n{text}"));
        assert!(
            text.contains(&format!("by the running node (pid {})", b.pid)),
            "{text}"
        );
        assert_eq!(
            Batch::read(Path::new(kept)).unwrap(),
            Batch::read(&out).unwrap(),
            "the node's copy is the batch"
        );
        (Batch::read(&out).unwrap(), out, text)
    };
    let settled_now = || {
        let o = mesh_node(&b.home, &["earnings", "--json"]);
        assert!(o.status.success(), "earnings --json: {}", stderr(&o));
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
        rows[0]["settled"].as_u64().unwrap()
    };
    let (dry, _, text) = settle("dry.json", true);
    assert!(
        text.contains(&format!("dry run: 1 lines, 1 payers, {} due", t.amount)),
        "{text}"
    );
    assert_eq!(dry.total_due, t.amount, "the batch is what was earned");
    assert_eq!(settled_now(), 0, "a dry run marks nothing settled");

    let (batch, file, text) = settle("batch.json", false);
    assert!(
        text.contains(&format!("settled: 1 lines, 1 payers, {} due", t.amount)),
        "{text}"
    );
    assert_eq!(batch.total_due, t.amount);
    let o = run_bin(
        "mesh-client",
        &b.home,
        &["verify-batch", file.to_str().unwrap()],
        "warn",
    );
    assert!(
        o.status.success() && stdout(&o).contains("verifies"),
        "verify-batch: {}{}",
        stdout(&o),
        stderr(&o)
    );
    assert_eq!(
        settled_now(),
        t.amount,
        "earnings show the receipts settled"
    );
    let (code, body) = get(b.http, "/api/earnings");
    assert_eq!(code, 200, "{body}");
    let view: EarningsView = serde_json::from_str(&body).unwrap();
    assert!(view.recent[0].settled, "{view:?}");
    let (again, _, text) = settle("again.json", false);
    assert!(
        text.contains("settled: 0 lines"),
        "nothing settled twice: {text}"
    );
    assert!(again.lines.is_empty() && again.total_due == 0);

    // Stopped, `earnings` reads the store itself and finds the same; `settle` settles the
    // store directly (nothing is left).
    let o = mesh_node(&b.home, &["stop"]);
    assert!(o.status.success(), "stop: {}", stderr(&o));
    let o = mesh_node(&b.home, &["earnings"]);
    let out = stdout(&o);
    assert!(o.status.success() && !out.contains("running node"), "{out}");
    assert!(out.contains(&format!("total {}", t.amount)), "{out}");
    assert_eq!(settled_now(), t.amount);
    let stopped = dir.path().join("stopped.json");
    let o = mesh_node(
        &b.home,
        &["settle", "--dry-run", "--out", stopped.to_str().unwrap()],
    );
    let out = stdout(&o);
    assert!(o.status.success(), "settle when stopped: {}", stderr(&o));
    assert!(
        out.contains("dry run: 0 lines") && !out.contains("running node"),
        "{out}"
    );

    // JSON log lines: ts, level, peer_id, session_id, event first, on every line; the
    // session's own events name it.
    let log = std::fs::read_to_string(b.home.join("mesh-node.log")).unwrap();
    let json: Vec<(&str, serde_json::Value)> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| (l, serde_json::from_str(l).expect("a JSON log line")))
        .collect();
    assert!(json.len() >= 3, "JSON lines in the log:\n{log}");
    for (line, v) in &json {
        assert!(line.starts_with("{\"ts\":\""), "{line}");
        let ts = v["ts"].as_str().unwrap();
        assert!(
            ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
            "{ts}"
        );
        assert!(v["level"].is_string(), "{line}");
        assert_eq!(v["peer_id"].as_str(), Some(b.peer_id.as_str()), "{line}");
        assert!(v.get("session_id").is_some(), "{line}");
        assert!(!v["event"].as_str().unwrap_or("").is_empty(), "{line}");
    }
    assert!(
        json.iter()
            .any(|(_, v)| v["session_id"].as_str() == Some(receipt.session.as_str())),
        "a log line about session {}:\n{log}",
        receipt.session
    );
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

/// The dashboard in a real browser, after a billed generation: it loads, shows the peer id,
/// a rising earnings line and the receipt. Needs Chromium (`apt-get install chromium`):
/// `cargo test -p mesh-node --test dashboard -- --ignored`. Leaves the screenshot at
/// `target/<profile>/dashboard.png`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium installed"]
async fn dashboard_renders_in_headless_chromium() {
    let browser = chromium().expect("no chromium on the PATH: apt-get install chromium");
    let dir = tempfile::tempdir().unwrap();
    let b = billed_node(dir.path()).await;
    let url = format!("http://{}/", b.http);
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
    assert!(
        dom.contains(&format!("<code id=\"peer-id\">{}</code>", b.peer_id)),
        "peer id not on the page:\n{dom}"
    );
    let line = chart_points(&dom, "earnings-chart");
    assert!(line.len() >= 2, "a line, not a dot: {line:?}");
    assert!(
        line[0].1 > line[line.len() - 1].1,
        "the line rises: {line:?}"
    );
    assert!(dom.contains("<table id=\"receipts\""), "{dom}");
    assert!(
        dom.contains("countersigned"),
        "the receipt is listed:\n{dom}"
    );

    let status = Command::new(browser)
        .args(&common)
        .args([
            "--hide-scrollbars",
            "--window-size=1280,1000",
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
