//! The client side of a mesh in namespaces: `mesh-client` arguments, a generation run in
//! the client's namespace, and what it printed. Shared by the fault tests (`netns.rs`)
//! and the NAT tests (`nat.rs`).

use std::path::Path;
use std::time::{Duration, Instant};

use mesh_core::p2p::Multiaddr;

use crate::common::{wait_for, Proc};

/// Where a client in the lab finds the mesh and keeps its files.
pub struct Client<'a> {
    pub boot_addr: &'a Multiaddr,
    /// The model's name on the mesh (its files are under `dir/model`).
    pub model: &'a str,
    /// The test's directory: the model under `model/`, each client's ledger beside it.
    pub dir: &'a Path,
    /// The client's namespace.
    pub ns: &'a str,
}

impl Client<'_> {
    /// `SUBCOMMAND --bootstrap .. --model .. --model-dir .. --ledger-dir ..`.
    pub fn args(&self, subcommand: &str, ledger: &str) -> Vec<String> {
        vec![
            subcommand.into(),
            "--bootstrap".into(),
            self.boot_addr.to_string(),
            "--model".into(),
            self.model.into(),
            "--model-dir".into(),
            self.dir.join("model").display().to_string(),
            "--ledger-dir".into(),
            self.dir.join(ledger).display().to_string(),
        ]
    }

    /// Starts a seeded `mesh-client generate` of `prompt` in the client's namespace.
    pub fn spawn_generate(&self, label: &str, max_tokens: usize, seed: &str, prompt: &str) -> Proc {
        self.spawn_generate_with(label, max_tokens, seed, prompt, &[])
    }

    /// [`Client::spawn_generate`] with `extra` arguments.
    pub fn spawn_generate_with(
        &self,
        label: &str,
        max_tokens: usize,
        seed: &str,
        prompt: &str,
        extra: &[String],
    ) -> Proc {
        let mut args = self.args("generate", &format!("client-{label}"));
        args.extend_from_slice(extra);
        args.extend([
            "--max-tokens".into(),
            max_tokens.to_string(),
            "--seed".into(),
            seed.into(),
            "--prompt".into(),
            prompt.into(),
        ]);
        Proc::spawn_in_netns(self.ns, label, "mesh-client", &args, self.dir)
    }
}

/// What one `mesh-client generate` printed, and how long it ran.
pub struct Run {
    pub text: String,
    /// `N tokens; prefill .. ms, per-token median .. ms, mean .. ms, max .. ms; cost ..`
    pub stats: String,
    /// With a draft model: the `speculation: ..` line.
    pub speculation: Option<String>,
    /// The route print's hops (`blocks [a, b) on <peer> (<weights>)`).
    pub route: Vec<String>,
    pub wall: Duration,
    /// Its stderr (log lines).
    pub log: String,
}

impl Run {
    /// A figure from the stats line, e.g. `stat("median")` for the per-token median in ms.
    pub fn stat(&self, name: &str) -> f64 {
        let after = self
            .stats
            .split(&format!("{name} "))
            .nth(1)
            .unwrap_or_else(|| panic!("no {name} in {:?}", self.stats));
        after
            .split(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bad {name} in {:?}", self.stats))
    }

    pub fn summary(&self) -> String {
        format!("{:.2} s wall; {}", self.wall.as_secs_f64(), self.stats)
    }
}

/// Waits (up to `limit`) for a `mesh-client generate` started at `started` to exit
/// successfully, and splits what it printed; its text must start with `prompt`.
pub async fn finish(mut proc: Proc, started: Instant, prompt: &str, limit: Duration) -> Run {
    let status = wait_for(limit, &format!("{} to finish", proc.name), || {
        let status = proc.exited();
        async move { status }
    })
    .await;
    let wall = started.elapsed();
    assert!(
        status.success(),
        "{} exited with {status}:\n{}",
        proc.name,
        proc.stderr()
    );
    if std::env::var("MESH_NETNS_VERBOSE").is_ok() {
        eprintln!("---- {} stderr ----\n{}", proc.name, proc.stderr());
    }
    // The reader thread may still be draining the pipe.
    let stats = wait_for(Duration::from_secs(5), "the stats line", || {
        let line = proc
            .lines()
            .into_iter()
            .find(|l| l.contains(" tokens; prefill "));
        async move { line }
    })
    .await;
    let all = proc.lines().join("\n");
    let (text, route) = all.split_once("\n\nroute:\n").expect("a route print");
    assert!(text.starts_with(prompt), "{all}");
    Run {
        text: text.to_owned(),
        stats,
        speculation: route
            .lines()
            .find(|l| l.starts_with("speculation:"))
            .map(str::to_owned),
        route: route
            .lines()
            .filter(|l| l.trim_start().starts_with("blocks "))
            .map(str::to_owned)
            .collect(),
        wall,
        log: proc.stderr(),
    }
}

/// `s` without terminal colour codes (`ESC [ ... m`).
pub fn plain(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}
