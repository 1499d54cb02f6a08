//! Faults across a real network: each process (`mesh-bootstrap`, the `mesh-node`s, the
//! `mesh-client` CLI) runs in a network namespace of its own, on 10.77.0.0/24 behind a
//! bridge, and the links between them are cut, rate-limited, made lossy and slow.
//!
//! Needs root and iproute2: runs only with `MESH_NETNS_TESTS=1` (`.ci/run` sets it when
//! it can), and says it skipped otherwise.

mod common;
mod netlab;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use mesh_core::http::Health;
use mesh_core::model::builtin::Builtin;
use mesh_core::p2p::{Multiaddr, PeerId};
use mesh_core::BlockRange;
use netlab::client::{self, plain, Client, Run};
use netlab::{Host, Lab};

const PROMPT: &str = "Partitions happen. ";
const SEED: &str = "7";
/// Long enough that the middle node can be cut while tokens are still streaming.
const LONG: usize = 400;
/// Enough tokens to time a degraded link without making the test slow.
const SHORT: usize = 48;
/// The client's per-request timeout (its default): a silent server costs at most this.
/// In practice a failed ping closes the connection first (two in a row, about
/// 2 × (1 s interval + 3 s timeout), the `P2pConfig` defaults).
const STEP_TIMEOUT: Duration = Duration::from_secs(20);
/// One generation, start to exit, including a fail-over.
const RUN_LIMIT: Duration = Duration::from_secs(180);
/// A healed node is heard again within this (it re-dials on its 2 s announce timer).
const REJOIN_LIMIT: Duration = Duration::from_secs(60);
/// The degraded links: every host's uplink rate, every downlink's loss, and the delay
/// added each way on the client's link.
const RATE: &str = "2mbit";
const LOSS_PERCENT: f64 = 5.0;
const ONE_WAY: Duration = Duration::from_millis(25);
const BOOT_PORT: u16 = 31337;
const NODE_PORT: u16 = 31338;

/// Both tests are timed and the machine may have 2 cores: run them one after the other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Node {
    host: Host,
    proc: Proc,
    peer: PeerId,
    span: BlockRange,
    pid_file: PathBuf,
}

/// A bootstrap, nodes and a client host, each in its own namespace. Fields drop in
/// order: processes first, then their files, then the namespaces.
struct Mesh {
    _boot: Proc,
    boot_addr: Multiaddr,
    nodes: Vec<Node>,
    boot_host: Host,
    client: Host,
    dir: tempfile::TempDir,
    lab: Lab,
    /// The model's name on the mesh.
    model: &'static str,
}

/// Points the `--listen` argument at `/ip4/IP/tcp/PORT`: the namespace's own address.
fn listen_on(args: &mut [String], ip: std::net::Ipv4Addr, port: u16) {
    let at = args.iter().position(|a| a == "--listen").expect("--listen") + 1;
    args[at] = format!("/ip4/{ip}/tcp/{port}");
}

impl Mesh {
    /// A mesh of the tiny model.
    async fn start(spans: &[BlockRange]) -> Mesh {
        Mesh::start_with(spans, Builtin::Tiny).await
    }

    /// A mesh of a built-in model, its files under `dir/model`.
    async fn start_with(spans: &[BlockRange], builtin: Builtin) -> Mesh {
        let mut lab = Lab::new();
        let dir = tempfile::tempdir().unwrap();
        let written = builtin.ensure_under(dir.path()).unwrap();
        std::fs::rename(written, dir.path().join("model")).unwrap();
        let model = builtin.id();
        let boot_host = lab.add_host("boot");
        let hosts: Vec<Host> = (0..spans.len())
            .map(|i| lab.add_host(&format!("node{i}")))
            .collect();
        let client = lab.add_host("client");

        let mut args = bootstrap_args(dir.path(), 0);
        listen_on(&mut args, boot_host.ip, BOOT_PORT);
        let boot = Proc::spawn_in_netns(
            &boot_host.ns,
            "bootstrap",
            "mesh-bootstrap",
            &args,
            dir.path(),
        );
        let boot_addr = boot.listen_addr().await;
        assert!(
            boot_addr
                .to_string()
                .starts_with(&format!("/ip4/{}/", boot_host.ip)),
            "bootstrap listens on {boot_addr}"
        );

        let mut procs = Vec::new();
        for (i, (host, span)) in hosts.into_iter().zip(spans).enumerate() {
            let name = format!("node{i}");
            let mut args = node_args(dir.path(), &name, *span, &[&boot_addr]);
            listen_on(&mut args, host.ip, NODE_PORT);
            let at = args.iter().position(|a| a == "--model").expect("--model") + 1;
            args[at] = model.into();
            let at = args
                .iter()
                .position(|a| a == "--num-blocks")
                .expect("--num-blocks");
            args.drain(at..at + 2);
            args.push("--model-dir".into());
            args.push(dir.path().join("model").display().to_string());
            let proc = Proc::spawn_in_netns(&host.ns, &name, "mesh-node", &args, dir.path());
            procs.push((host, proc, *span, dir.path().join(format!("{name}.pid"))));
        }
        let mut nodes = Vec::new();
        for (host, proc, span, pid_file) in procs {
            let addr = proc.listen_addr().await;
            assert!(
                addr.to_string()
                    .starts_with(&format!("/ip4/{}/tcp/{NODE_PORT}/", host.ip)),
                "{} listens on {addr}",
                proc.name
            );
            nodes.push(Node {
                peer: Proc::peer_id(&addr),
                host,
                proc,
                span,
                pid_file,
            });
        }
        Mesh {
            _boot: boot,
            boot_addr,
            nodes,
            boot_host,
            client,
            dir,
            lab,
            model,
        }
    }

    fn hosts(&self) -> Vec<&Host> {
        let mut all = vec![&self.boot_host, &self.client];
        all.extend(self.nodes.iter().map(|n| &n.host));
        all
    }

    /// The client's view of the mesh (arguments, generations) in its namespace.
    fn client_side(&self) -> Client<'_> {
        Client {
            model: self.model,
            boot_addr: &self.boot_addr,
            dir: self.dir.path(),
            ns: &self.client.ns,
        }
    }

    /// Starts `mesh-client generate` in the client's namespace.
    fn spawn_generate(&self, label: &str, max_tokens: usize) -> Proc {
        self.client_side()
            .spawn_generate(label, max_tokens, SEED, PROMPT)
    }

    async fn generate(&self, label: &str, max_tokens: usize) -> Run {
        let started = Instant::now();
        let proc = self.spawn_generate(label, max_tokens);
        finish(proc, started).await
    }

    /// A greedy `mesh-client generate` of `SHORT` tokens from `prompt` with `extra`
    /// arguments, to its end.
    async fn greedy(&self, label: &str, prompt: &str, extra: &[&str]) -> Run {
        let mut args: Vec<String> = ["--temperature", "0"].map(String::from).to_vec();
        args.extend(extra.iter().map(|a| a.to_string()));
        let started = Instant::now();
        let proc = self
            .client_side()
            .spawn_generate_with(label, SHORT, SEED, prompt, &args);
        client::finish(proc, started, prompt, RUN_LIMIT).await
    }

    /// The peers `mesh-client nodes`, run in the client's namespace, lists as live.
    fn listed_peers(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.client.ns])
            .arg(binary("mesh-client"))
            .args(self.client_side().args("nodes", "client-nodes"))
            .env("MESH_HOME", self.dir.path())
            .output()
            .expect("mesh-client nodes");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(" blocks "))
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect()
    }

    /// Waits until a fresh client in the client namespace sees every node.
    async fn wait_until_all_listed(&self) {
        let want: Vec<String> = self.nodes.iter().map(|n| n.peer.to_string()).collect();
        wait_for(REJOIN_LIMIT, "the client to list every node", || {
            let listed = self.listed_peers();
            let all = want.iter().all(|p| listed.contains(p));
            async move { all.then_some(()) }
        })
        .await;
    }
}

impl Node {
    /// The node's `/healthz`, read with `mesh-node status --json` inside its namespace
    /// (the status port is on the namespace's own loopback).
    fn health(&self, dir: &std::path::Path) -> Health {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.host.ns])
            .arg(binary("mesh-node"))
            .args(["status", "--json", "--pid-file"])
            .arg(&self.pid_file)
            .env("MESH_HOME", dir)
            .output()
            .expect("mesh-node status");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{} status: {e}: {}{}",
                self.proc.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }
}

/// Waits for a `mesh-client generate` to exit successfully and splits what it printed.
async fn finish(proc: Proc, started: Instant) -> Run {
    client::finish(proc, started, PROMPT, RUN_LIMIT).await
}

/// Seconds since midnight UTC now: log lines carry UTC times of day.
fn utc_seconds_of_day() -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    now.as_secs_f64() % 86_400.0
}

/// The time of day of a log line that starts `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
fn log_seconds_of_day(line: &str) -> Option<f64> {
    let time = line.get(11..)?.split('Z').next()?;
    let mut parts = time.split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    Some(h.parse::<f64>().ok()? * 3600.0 + m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

/// Seconds from one time of day to a later one, across midnight if need be.
fn since(earlier: f64, later: f64) -> f64 {
    (later - earlier).rem_euclid(86_400.0)
}

/// Index of the last stdout line of `node` that starts with `prefix`.
fn last_line(node: &Proc, prefix: &str) -> Option<usize> {
    node.lines().iter().rposition(|l| l.starts_with(prefix))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_middle_node_is_replaced_mid_generation_and_rejoins_when_healed() {
    if !netlab::enabled() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let r = BlockRange::new;
    let mesh = Mesh::start(&[r(0, 3), r(3, 6), r(3, 6), r(6, 8)]).await;
    let dir = mesh.dir.path();
    mesh.wait_until_all_listed().await;
    let reference = mesh.generate("reference", LONG).await;
    println!("reference run, no fault: {}", reference.summary());

    let first = &mesh.nodes[0];
    let middle: Vec<&Node> = mesh.nodes.iter().filter(|n| n.span == r(3, 6)).collect();
    // (sessions opened, tokens decoded) by each middle server before this run.
    let before: Vec<(u64, u64)> = middle
        .iter()
        .map(|n| n.health(dir))
        .map(|h| (h.sessions_opened, h.decode_tokens))
        .collect();
    let decoded_before = first.health(dir).decode_tokens;
    let started = Instant::now();
    let run = mesh.spawn_generate("partitioned", LONG);
    // Some tokens have streamed: the first span has decoded them.
    wait_for(RUN_LIMIT, "the first tokens", || {
        let decoded = first.health(dir).decode_tokens - decoded_before;
        async move { (decoded >= 10).then_some(()) }
    })
    .await;
    // The middle server of this session is the one that opened a session since.
    let opened: Vec<bool> = middle
        .iter()
        .zip(&before)
        .map(|(n, (opened, _))| n.health(dir).sessions_opened > *opened)
        .collect();
    assert_eq!(
        opened.iter().filter(|o| **o).count(),
        1,
        "exactly one middle server opened the session"
    );
    let (v, w) = if opened[0] { (0, 1) } else { (1, 0) };
    let (victim, replacement) = (middle[v], middle[w]);
    let (victim_before, replacement_before) = (before[v].1, before[w].1);
    let streamed = first.health(dir).decode_tokens - decoded_before;
    mesh.lab.partition(&victim.host);
    let cut = Instant::now();
    let cut_at = utc_seconds_of_day();
    println!(
        "cut {} ({}) off after {streamed} tokens, {:.2} s into the run",
        victim.proc.name,
        victim.host.ip,
        started.elapsed().as_secs_f64()
    );

    let faulted = finish(run, started).await;
    let recovered_after = cut.elapsed();
    println!("partitioned run: {}", faulted.summary());
    assert_eq!(faulted.text, reference.text, "the output changed");
    // Both middle servers did part of the work: the cut one until the cut, the
    // replacement after it.
    let victim_did = victim.health(dir).decode_tokens - victim_before;
    let taken_over = replacement.health(dir).decode_tokens - replacement_before;
    assert!(
        victim_did > 0 && taken_over > 0,
        "{victim_did} then {taken_over} tokens"
    );
    // The stall is one failed ping: the client closes the connection to the silent
    // server, the request on it fails, and the replacement gets the kept inputs replayed.
    let stall = Duration::from_secs_f64(faulted.stat("max") / 1e3);
    assert!(stall < STEP_TIMEOUT, "the longest token took {stall:?}");
    assert!(
        faulted.log.contains("ping failed"),
        "the client closed the connection for a failed ping"
    );
    println!(
        "recovery: longest token {:.2} s; run ended {:.2} s \
         after the cut; decode steps: {victim_did} on {}, then {taken_over} on {}",
        stall.as_secs_f64(),
        recovered_after.as_secs_f64(),
        victim.proc.name,
        replacement.proc.name
    );

    let why = faulted
        .log
        .lines()
        .find(|l| l.contains("server failed"))
        .map(|l| plain(l.split("server failed").nth(1).unwrap_or_default()))
        .expect("the client logged the failure");
    println!("client log: server failed{why}");

    // The rest of the mesh dropped the cut node from its heartbeat table...
    let down = format!("server down {}", victim.peer);
    wait_for(DROP_LIMIT, "the first node to drop the cut one", || {
        let seen = last_line(&first.proc, &down).is_some();
        async move { seen.then_some(()) }
    })
    .await;
    assert!(!mesh.listed_peers().contains(&victim.peer.to_string()));
    let dropped_at = first
        .proc
        .stderr()
        .lines()
        .find(|l| l.contains("dropped") && l.contains(&victim.peer.to_string()))
        .and_then(log_seconds_of_day)
        .expect("the first node logged the drop");
    println!(
        "{} dropped the cut node from its heartbeat table {:.2} s after the cut",
        first.proc.name,
        since(cut_at, dropped_at)
    );

    // ...and takes it back once the link is up again.
    mesh.lab.heal(&victim.host);
    let healed = Instant::now();
    let up = format!("server up {}", victim.peer);
    wait_for(
        REJOIN_LIMIT,
        "the first node to hear the healed one",
        || {
            let back = match (last_line(&first.proc, &down), last_line(&first.proc, &up)) {
                (Some(d), Some(u)) => u > d,
                _ => false,
            };
            async move { back.then_some(()) }
        },
    )
    .await;
    let heard_after = healed.elapsed();
    mesh.wait_until_all_listed().await;
    let listed_after = healed.elapsed();
    println!(
        "heal: {} heard by {} after {:.2} s, listed by a new client after {:.2} s",
        victim.proc.name,
        first.proc.name,
        heard_after.as_secs_f64(),
        listed_after.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_lossy_rate_limited_links_change_the_timing_not_the_tokens() {
    if !netlab::enabled() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut mesh = Mesh::start(&BlockRange::even_split(NUM_BLOCKS, 3)).await;
    mesh.wait_until_all_listed().await;
    let clean = mesh.generate("clean", SHORT).await;
    println!("{:<44} {}", "clean links:", clean.summary());
    let hosts: Vec<Host> = mesh.hosts().into_iter().cloned().collect();
    let client = mesh.client.clone();
    let dropped = |mesh: &Mesh| -> u64 { hosts.iter().map(|h| mesh.lab.hub_drops(h)).sum() };

    for host in &hosts {
        mesh.lab.rate_limit(host, RATE);
    }
    let rated = mesh.generate("rate-limited", SHORT).await;
    report(&format!("tbf {RATE} on every uplink:"), &rated, &clean);

    for host in &hosts {
        mesh.lab.clear(host);
        mesh.lab.drop_randomly(host, LOSS_PERCENT);
    }
    let lossy = mesh.generate("lossy", SHORT).await;
    let lost = dropped(&mesh);
    report(
        &format!("{LOSS_PERCENT}% loss on every downlink:"),
        &lossy,
        &clean,
    );
    println!("  ({lost} packets dropped)");
    assert!(lost > 0, "the loss filter dropped nothing");

    for host in &hosts {
        mesh.lab.clear(host);
    }
    mesh.lab.delay(&client, ONE_WAY);
    let slow = mesh.generate("delayed", SHORT).await;
    let one_way_ms = ONE_WAY.as_millis();
    report(
        &format!("{one_way_ms} ms each way on the client's link:"),
        &slow,
        &clean,
    );

    // Speculative decoding on the same slow link: the target as its own draft (every
    // proposal right, the upper bound), greedy, against greedy without a draft.
    let greedy = ["--temperature".to_owned(), "0".to_owned()];
    let draft = [
        "--draft-model".to_owned(),
        mesh.dir.path().join("model").display().to_string(),
        "--draft-tokens".to_owned(),
        "8".to_owned(),
    ];
    let spawn = |label: &str, extra: &[String]| {
        let started = Instant::now();
        let proc = mesh
            .client_side()
            .spawn_generate_with(label, SHORT, SEED, PROMPT, extra);
        finish(proc, started)
    };
    let plain = spawn("delayed-greedy", &greedy).await;
    let speculated = spawn("delayed-draft", &[&greedy[..], &draft[..]].concat()).await;
    println!("{:<44} {}", "greedy, 25 ms each way:", plain.summary());
    println!(
        "{:<44} {}",
        "greedy with a draft (itself):",
        speculated.summary()
    );
    assert_eq!(speculated.text, plain.text, "the draft changed the output");
    let (with, without) = (speculated.wall.as_secs_f64(), plain.wall.as_secs_f64());
    println!(
        "  wall time with the draft: {:.2}x of without",
        with / without
    );
    assert!(with < without, "speculation made the slow link slower");

    for host in &hosts {
        mesh.lab.rate_limit(host, RATE);
        mesh.lab.drop_randomly(host, LOSS_PERCENT);
    }
    let all = mesh.generate("degraded", SHORT).await;
    report("all three at once:", &all, &clean);
    println!("  ({} packets dropped)", dropped(&mesh));

    // Each token crosses the client's link there and back at least once (servers push
    // to each other; relayed, it would be once per hop).
    let floor = 2.0 * ONE_WAY.as_secs_f64() * 1e3;
    for run in [&slow, &all] {
        assert!(
            run.stat("median") >= floor,
            "per-token median {} ms is below the {floor} ms the delay forces",
            run.stat("median")
        );
    }
}

/// Speculative decoding where it pays: the demo model over 3 servers, 25 ms each way on
/// the client's link, greedy, with its one-block sibling as the draft against no draft
/// (and the target as its own draft, the upper bound). Same text; fewer round trips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draft_model_saves_round_trips_on_a_slow_link() {
    if !netlab::enabled() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let spans = BlockRange::even_split(6, 3);
    let mut mesh = Mesh::start_with(&spans, Builtin::Demo).await;
    mesh.wait_until_all_listed().await;
    let client = mesh.client.clone();
    mesh.lab.delay(&client, ONE_WAY);
    let prompt = "It is a truth universally acknowledged";
    let own = mesh.dir.path().join("model").display().to_string();
    let plain = mesh.greedy("no-draft", prompt, &[]).await;
    println!("{:<36} {}", "no draft:", plain.summary());
    for (label, name, draft, k) in [
        ("draft-k1", "mesh-demo-draft", "mesh-demo-draft", "1"),
        ("draft-k2", "mesh-demo-draft", "mesh-demo-draft", "2"),
        ("draft-k4", "mesh-demo-draft", "mesh-demo-draft", "4"),
        ("draft-k8", "mesh-demo-draft", "mesh-demo-draft", "8"),
        ("self-k2", "mesh-demo (itself)", own.as_str(), "2"),
        ("self-k8", "mesh-demo (itself)", own.as_str(), "8"),
    ] {
        let extra = ["--draft-model", draft, "--draft-tokens", k];
        let fast = mesh.greedy(label, prompt, &extra).await;
        let line = fast.speculation.clone().expect("a speculation line");
        println!("{:<36} {}", format!("{name} from k={k}:"), fast.summary());
        println!("  {line}");
        println!(
            "  per token: median {:.1} ms, {:.2}x of no draft; mean {:.1} ms, {:.2}x",
            fast.stat("median"),
            fast.stat("median") / plain.stat("median"),
            fast.stat("mean"),
            fast.stat("mean") / plain.stat("mean")
        );
        assert_eq!(fast.text, plain.text, "{label} changed the text");
    }
}

/// Servers that push each step's output to the next server: with every pair of hosts
/// (client, bootstrap, servers) `ONE_WAY` apart each way, a token over 3 servers takes
/// four one-way trips instead of the six of relaying every output through the client.
/// Same text either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_pushing_to_each_other_take_four_trips_a_token_not_six() {
    if !netlab::enabled() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut mesh = Mesh::start(&BlockRange::even_split(NUM_BLOCKS, 3)).await;
    mesh.wait_until_all_listed().await;
    let hosts: Vec<Host> = mesh.hosts().into_iter().cloned().collect();
    for host in &hosts {
        mesh.lab.delay(host, ONE_WAY / 2);
    }
    let relayed = mesh.greedy("relayed", PROMPT, &["--no-push"]).await;
    let pushed = mesh.greedy("pushed", PROMPT, &[]).await;
    let one_way = ONE_WAY.as_secs_f64() * 1e3;
    println!(
        "{:<44} {}",
        "relayed through the client:",
        relayed.summary()
    );
    println!("{:<44} {}", "pushed server to server:", pushed.summary());
    println!(
        "  per token: median {:.1} ms against {:.1} ms, {:.2}x ({one_way} ms each way)",
        pushed.stat("median"),
        relayed.stat("median"),
        pushed.stat("median") / relayed.stat("median")
    );
    assert_eq!(pushed.text, relayed.text, "pushing changed the text");
    assert!(
        relayed.stat("median") >= 6.0 * one_way,
        "relayed under six trips"
    );
    assert!(
        pushed.stat("median") >= 4.0 * one_way,
        "pushed under four trips"
    );
    assert!(
        pushed.stat("median") < 5.0 * one_way,
        "pushed steps took more than four trips: {:.1} ms",
        pushed.stat("median")
    );
}

/// Prints a degraded run's figures; its tokens must be the clean run's.
fn report(what: &str, run: &Run, clean: &Run) {
    println!("{what:<44} {}", run.summary());
    assert_eq!(run.text, clean.text, "{what} changed the output");
}
