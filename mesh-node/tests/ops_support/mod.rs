//! Running `mesh-node` (and the other binaries) as a provider would, for the operations
//! tests: bounded commands, clear-failure checks, configs, stopping a daemon at the end.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use mesh_core::daemon;
use mesh_core::http;

use crate::common::binary;

/// Limit for one command (a `start --daemon` includes loading the tiny model).
pub const COMMAND_LIMIT: Duration = Duration::from_secs(120);

/// Runs `mesh-node ARGS` with `MESH_HOME=home`, killing it after [`COMMAND_LIMIT`].
pub fn mesh_node(home: &Path, args: &[&str]) -> Output {
    run_bin("mesh-node", home, args, "info,libp2p=warn")
}

/// Runs `BIN ARGS` with `MESH_HOME=home` and `RUST_LOG=rust_log` (a daemon it starts
/// inherits both), killing it after [`COMMAND_LIMIT`].
pub fn run_bin(bin: &str, home: &Path, args: &[&str], rust_log: &str) -> Output {
    let mut child = Command::new(binary(bin))
        .args(args)
        .env("MESH_HOME", home)
        .env("RUST_LOG", rust_log)
        .env_remove("MESH_NODE_CONFIG")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
    let deadline = Instant::now() + COMMAND_LIMIT;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{bin} {args:?} still running after {COMMAND_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts failure with a message containing every one of `needles` on stderr.
pub fn assert_fails_with(o: &Output, needles: &[&str]) {
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
pub struct StopOnDrop(pub PathBuf);

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

pub fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http::get(addr, path, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"))
}

pub fn write_config(home: &Path, text: &str) -> PathBuf {
    std::fs::create_dir_all(home).unwrap();
    let path = home.join("node.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A valid config for a node on 127.0.0.1 with ephemeral ports; `extra` is appended
/// before the tables.
pub fn config_text(extra: &str, bootstrap: Option<&str>) -> String {
    let boot = bootstrap.map_or(String::new(), |b| format!("bootstrap = [\"{b}\"]\n"));
    format!(
        "{extra}\n[network]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\n{boot}heartbeat_secs = 1.0\n\
         announce_secs = 2.0\n\n[limits]\ncache_budget_mib = 64\n\n[http]\nlisten = \"127.0.0.1:0\"\n"
    )
}
