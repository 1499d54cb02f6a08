//! Process harness shared by the integration tests: spawn the real binaries, read
//! their stdout, kill them on drop.
#![allow(dead_code)]

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_core::identity::Identity;
use mesh_core::p2p::{self, Multiaddr, P2pConfig, PeerId, Role};
use mesh_core::BlockRange;

pub const MODEL: &str = "tiny-llama-mesh";
pub const NUM_BLOCKS: u32 = 8;
/// Heartbeat interval of the test nodes.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Limit for finding every span through the DHT (the requirement).
pub const DISCOVERY_LIMIT: Duration = Duration::from_secs(10);
/// Limit for things that should happen "within 3 heartbeat intervals", with CI slack.
pub const DROP_LIMIT: Duration = Duration::from_secs(12);
/// Limit for a process to start and print its address.
pub const START_LIMIT: Duration = Duration::from_secs(30);

/// `target/<profile>/<name>`, found from this test binary's path (`target/<profile>/deps/`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let path = profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} not found: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// A child process whose stdout lines are collected; killed on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    stderr_path: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, bin: &str, args: &[String], dir: &Path) -> Proc {
        let mut cmd = Command::new(binary(bin));
        cmd.args(args);
        Self::spawn_command(name, bin, cmd, dir)
    }

    /// [`Proc::spawn`] inside the network namespace `ns`: `ip netns exec NS BINARY ARGS`
    /// (which execs the binary, so killing this child kills the binary).
    pub fn spawn_in_netns(ns: &str, name: &str, bin: &str, args: &[String], dir: &Path) -> Proc {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(binary(bin)).args(args);
        Self::spawn_command(name, bin, cmd, dir)
    }

    fn spawn_command(name: &str, bin: &str, mut cmd: Command, dir: &Path) -> Proc {
        let stderr_path = dir.join(format!("{name}.stderr"));
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        // MESH_TEST_LOG: the processes' log filter, e.g. `info,libp2p_autonat=debug`.
        let mut child = cmd
            .env(
                "RUST_LOG",
                std::env::var("MESH_TEST_LOG").unwrap_or_else(|_| "info,libp2p=warn".into()),
            )
            .env("MESH_HOME", dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Proc {
            name: name.into(),
            child,
            lines,
            stderr_path,
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn has_line(&self, pred: impl Fn(&str) -> bool) -> bool {
        self.lines.lock().unwrap().iter().any(|l| pred(l))
    }

    /// Waits for `listening on <addr>` and returns the address (with /p2p/).
    pub async fn listen_addr(&self) -> Multiaddr {
        let line = wait_for(START_LIMIT, &format!("{} to listen", self.name), || {
            let found = self
                .lines()
                .into_iter()
                .find_map(|l| l.strip_prefix("listening on ").map(str::to_owned));
            async move { found }
        })
        .await;
        line.parse().expect("listen address")
    }

    pub fn peer_id(addr: &Multiaddr) -> PeerId {
        addr.iter()
            .find_map(|p| match p {
                mesh_core::p2p::Protocol::P2p(id) => Some(id),
                _ => None,
            })
            .expect("/p2p/ in address")
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The exit status, once the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL: a crash, no goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait (bounded) for a clean exit.
    pub fn terminate(&mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let err = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
            let tail: Vec<&str> = err.lines().rev().take(30).collect();
            eprintln!(
                "---- {} stdout ----\n{}",
                self.name,
                self.lines().join("\n")
            );
            eprintln!(
                "---- {} stderr (last 30 lines) ----\n{}",
                self.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

/// Polls `check` every 100 ms until it yields `Some`, panicking after `limit`.
pub async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `mesh-bootstrap` on an ephemeral loopback port, keyed under `dir`, and its address.
pub async fn start_bootstrap(dir: &Path) -> (Proc, Multiaddr) {
    let boot = Proc::spawn("bootstrap", "mesh-bootstrap", &bootstrap_args(dir, 0), dir);
    let addr = boot.listen_addr().await;
    (boot, addr)
}

pub fn bootstrap_args(dir: &Path, port: u16) -> Vec<String> {
    vec![
        "--listen".into(),
        format!("/ip4/127.0.0.1/tcp/{port}"),
        "--key".into(),
        dir.join("bootstrap.key").display().to_string(),
    ]
}

pub fn node_args(dir: &Path, name: &str, span: BlockRange, join: &[&Multiaddr]) -> Vec<String> {
    let mut args = vec![
        "start".into(),
        "--model".into(),
        MODEL.into(),
        "--blocks".into(),
        format!("{}..{}", span.start, span.end),
        "--num-blocks".into(),
        NUM_BLOCKS.to_string(),
        "--listen".into(),
        "/ip4/127.0.0.1/tcp/0".into(),
        "--key".into(),
        dir.join(format!("{name}.key")).display().to_string(),
        "--heartbeat-secs".into(),
        format!("{}", HEARTBEAT.as_secs_f64()),
        "--announce-secs".into(),
        "2".into(),
        // Several nodes share one $MESH_HOME here: each its own PID file and status port.
        "--http".into(),
        "127.0.0.1:0".into(),
        "--pid-file".into(),
        dir.join(format!("{name}.pid")).display().to_string(),
        "--ledger-dir".into(),
        dir.join(format!("{name}.ledger")).display().to_string(),
    ];
    for addr in join {
        args.push("--bootstrap".into());
        args.push(addr.to_string());
    }
    args
}

pub async fn test_client(bootstrap: &Multiaddr) -> p2p::Peer {
    let mut cfg = P2pConfig::new(Identity::generate(), Role::Client);
    cfg.bootstrap = vec![bootstrap.clone()];
    // Re-dial a lost bootstrap quickly (the nodes use --announce-secs 2 too).
    cfg.announce_interval = Duration::from_secs(2);
    p2p::spawn(cfg).await.expect("client peer")
}
