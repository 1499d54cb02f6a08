//! Time from starting a client to its first token: joining through a bootstrap, finding
//! a server of every span, opening the route, prefill and the first decode step.
//!
//! ```text
//! cargo build --release --workspace --bins --examples
//! ./target/release/examples/time_to_first_token              # its own loopback mesh
//! ./target/release/examples/time_to_first_token <bootstrap>  # an existing mesh
//! ```
//!
//! Without an address it starts `mesh-bootstrap` and two `mesh-node`s (blocks 0..3 and
//! 3..6 of the built-in demo model) from the same target directory, with default settings
//! (heartbeats every 15 s), waits until both are in the DHT, then times three clients.
//! The client routes from the servers' signed DHT records, so it need not wait for their
//! heartbeats: expect well under 1.5 s on loopback.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use mesh_client::{MeshClient, SamplingParams};
use mesh_core::model::builtin;
use mesh_core::p2p::Multiaddr;

const RUNS: usize = 3;

/// A child process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `target/<profile>/<name>`: the binaries built beside this example.
fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow::anyhow!("no target directory"))?;
    let path = dir.join(name);
    anyhow::ensure!(
        path.exists(),
        "{} not found: cargo build --workspace --bins",
        path.display()
    );
    Ok(path)
}

/// Spawns `bin args` and waits for its `listening on <addr>` line.
fn spawn(bin: &str, args: &[String], home: &Path) -> anyhow::Result<(Proc, Multiaddr)> {
    let mut child = Command::new(binary(bin)?)
        .args(args)
        .env("MESH_HOME", home)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("stdout"))?;
    let proc = Proc(child);
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        match lines.next() {
            Some(line) => {
                if let Some(a) = line?.strip_prefix("listening on ") {
                    break a.parse()?;
                }
            }
            None => anyhow::bail!("{bin} exited before listening"),
        }
    };
    // Keep draining so the child never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Ok((proc, addr))
}

/// A bootstrap and two nodes with default settings; returns them and the bootstrap address.
async fn loopback_mesh(home: &Path, model_dir: &Path) -> anyhow::Result<(Vec<Proc>, Multiaddr)> {
    let key = |n: &str| home.join(format!("{n}.key")).display().to_string();
    let (boot, addr) = spawn(
        "mesh-bootstrap",
        &[
            "--listen".into(),
            "/ip4/127.0.0.1/tcp/0".into(),
            "--key".into(),
            key("bootstrap"),
        ],
        home,
    )?;
    let mut procs = vec![boot];
    for (name, blocks) in [("node0", "0..3"), ("node1", "3..6")] {
        let args = [
            "start",
            "--blocks",
            blocks,
            "--num-blocks",
            "6",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--http",
            "127.0.0.1:0",
        ]
        .map(String::from)
        .into_iter()
        .chain([
            "--model-dir".into(),
            model_dir.display().to_string(),
            "--key".into(),
            key(name),
            "--pid-file".into(),
            home.join(format!("{name}.pid")).display().to_string(),
            "--ledger-dir".into(),
            home.join(format!("{name}-ledger")).display().to_string(),
            "--bootstrap".into(),
            addr.to_string(),
        ])
        .collect::<Vec<String>>();
        procs.push(spawn("mesh-node", &args, home)?.0);
    }
    // Let both announce into the DHT (the first announcement follows the join).
    tokio::time::sleep(Duration::from_secs(3)).await;
    Ok((procs, addr))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let home = tempfile::tempdir()?;
    let model_dir = builtin::DEFAULT.ensure()?;
    let (_procs, bootstrap) = match std::env::args().nth(1) {
        Some(addr) => (Vec::new(), addr.parse()?),
        None => loopback_mesh(home.path(), &model_dir).await?,
    };
    for run in 1..=RUNS {
        let started = Instant::now();
        let client = MeshClient::builder()
            .bootstrap([bootstrap.clone()])
            .model_dir(&model_dir)
            .build()
            .await?;
        let joined = started.elapsed();
        let mut tokens = client
            .generate("Once upon a time", SamplingParams::greedy(4))
            .await?;
        let first = tokens.next().await.transpose()?;
        let ttft = started.elapsed();
        while tokens.next().await.is_some() {}
        println!(
            "run {run}: time to first token {:.0} ms (joined in {:.0} ms, first token id {:?})",
            ttft.as_secs_f64() * 1e3,
            joined.as_secs_f64() * 1e3,
            first.map(|t| t.id),
        );
    }
    Ok(())
}
