//! A whole mesh on this machine as child processes: one `mesh-bootstrap` and several
//! `mesh-node`s on loopback, found next to the running executable. Used by
//! `mesh-client demo`; every process is stopped (SIGTERM, then kill) when dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mesh_core::model::DeviceSpec;
use mesh_core::p2p::Multiaddr;
use mesh_core::BlockRange;

/// Why the local processes could not be started.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0} not found next to this executable; run `cargo build --release --workspace --bins` first")]
    MissingBinary(PathBuf),
    #[error("starting {name}: {source}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} exited or printed no address within {limit:?}")]
    NoAddress { name: String, limit: Duration },
}

struct ManagedChild {
    name: String,
    child: Child,
}

/// Child processes of a local mesh.
pub struct ProcessMesh {
    children: Vec<ManagedChild>,
    bootstrap: Multiaddr,
    pub servers: Vec<(String, BlockRange)>,
}

fn sibling(name: &str) -> Result<PathBuf, DemoError> {
    let exe = std::env::current_exe().map_err(|source| DemoError::Spawn {
        name: name.into(),
        source,
    })?;
    let path = exe
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if path.exists() {
        Ok(path)
    } else {
        Err(DemoError::MissingBinary(path))
    }
}

/// Start `bin` and wait for its first `listening on <addr>` line.
fn spawn(
    name: &str,
    bin: &str,
    args: &[String],
    home: &Path,
) -> Result<(ManagedChild, Multiaddr), DemoError> {
    let limit = Duration::from_secs(60);
    let mut child = Command::new(sibling(bin)?)
        .args(args)
        .env("MESH_HOME", home)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| DemoError::Spawn {
            name: name.into(),
            source,
        })?;
    let stdout = child.stdout.take();
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let Some(out) = stdout else { return };
        let mut sent = false;
        // Keep draining so the child never blocks on a full pipe.
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if !sent {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    sent = tx.send(addr.to_string()).is_ok();
                }
            }
        }
    });
    let child = ManagedChild {
        name: name.into(),
        child,
    };
    let addr = rx
        .recv_timeout(limit)
        .ok()
        .and_then(|a| a.parse().ok())
        .ok_or(DemoError::NoAddress {
            name: name.into(),
            limit,
        })?;
    Ok((child, addr))
}

impl ProcessMesh {
    /// A bootstrap and one `mesh-node` per span of the embedded tiny model, computing on
    /// `device`; `home` holds their keys and the model.
    pub fn start(home: &Path, spans: &[BlockRange], device: DeviceSpec) -> Result<Self, DemoError> {
        let key = |n: &str| home.join(format!("{n}.key")).display().to_string();
        let (boot, bootstrap) = spawn(
            "bootstrap",
            "mesh-bootstrap",
            &[
                "--listen".into(),
                "/ip4/127.0.0.1/tcp/0".into(),
                "--key".into(),
                key("bootstrap"),
            ],
            home,
        )?;
        let mut mesh = ProcessMesh {
            children: vec![boot],
            bootstrap,
            servers: Vec::new(),
        };
        for (i, span) in spans.iter().enumerate() {
            let name = format!("node{i}");
            let args = vec![
                "start".into(),
                "--blocks".into(),
                format!("{}..{}", span.start, span.end),
                "--listen".into(),
                "/ip4/127.0.0.1/tcp/0".into(),
                "--bootstrap".into(),
                mesh.bootstrap.to_string(),
                "--key".into(),
                key(&name),
                "--heartbeat-secs".into(),
                "1".into(),
                // Each node its own status port, PID file and ledger.
                "--http".into(),
                "127.0.0.1:0".into(),
                "--pid-file".into(),
                home.join(format!("{name}.pid")).display().to_string(),
                "--ledger-dir".into(),
                home.join(format!("{name}-ledger")).display().to_string(),
                "--price-per-token".into(),
                "1".into(),
                "--device".into(),
                device.to_string(),
            ];
            let (child, addr) = spawn(&name, "mesh-node", &args, home)?;
            mesh.children.push(child);
            mesh.servers.push((addr.to_string(), *span));
        }
        Ok(mesh)
    }

    pub fn bootstrap(&self) -> &Multiaddr {
        &self.bootstrap
    }

    /// SIGTERM every process (nodes first), wait up to 10 s each, then kill.
    pub fn stop(&mut self) {
        for c in self.children.iter().rev() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.child.id().to_string()])
                .status();
        }
        for c in self.children.iter_mut().rev() {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match c.child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        tracing::warn!(name = %c.name, "did not stop in time; killing");
                        let _ = c.child.kill();
                        let _ = c.child.wait();
                        break;
                    }
                }
            }
        }
        self.children.clear();
    }
}

impl Drop for ProcessMesh {
    fn drop(&mut self) {
        self.stop();
    }
}
