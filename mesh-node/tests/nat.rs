//! Providers behind NAT across a real network: each process in a network namespace of its
//! own on 10.77.0.0/24 (see `netlab`). A provider "behind NAT" is one the hub hands no
//! TCP SYN to (nobody can open a connection to it, its own connections work: what a home
//! router does to TCP), and whose route to the client is cut, so the client can reach it
//! only through a relay (the bootstrap). The kernel here has no netfilter tools, so there
//! is no real NAT (address rewriting): a hole punch through one cannot be exercised, see
//! the first test's notes.
//!
//! Needs root and iproute2: runs only with `MESH_NETNS_TESTS=1`, and says it skipped
//! otherwise.

mod common;
mod netlab;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use mesh_core::http::Health;
use mesh_core::identity::Identity;
use mesh_core::model::tiny;
use mesh_core::p2p::{Multiaddr, PeerId, Reach};
use mesh_core::BlockRange;
use netlab::client::{self, plain, Client, Run};
use netlab::{Host, Lab};

const PROMPT: &str = "Relays carry ciphertext. ";
const SEED: &str = "11";
const SHORT: usize = 48;
/// Long enough that the provider's route appears while tokens are still streaming.
const LONG: usize = 600;
const BOOT_PORT: u16 = 31337;
const NODE_PORT: u16 = 31338;
/// AutoNAT's first verdict, a reservation, and the record that announces it.
const REACH_LIMIT: Duration = Duration::from_secs(90);
const RUN_LIMIT: Duration = Duration::from_secs(180);
/// Delay on the client's link during the run that moves to a direct connection: with
/// servers pushing to each other a token crosses that link once each way, so 486 tokens
/// take about 10 s, two of the client's direct dials (every 5 s). At 3 ms the run took
/// 4.7-5.6 s and could end before the first.
const CLIENT_ONE_WAY: Duration = Duration::from_millis(8);
/// Delay added each way on the relay's link, to see what a distant relay costs.
const RELAY_ONE_WAY: Duration = Duration::from_millis(10);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Node {
    host: Host,
    /// Held so the process lives as long as the node (killed on drop).
    _proc: Proc,
    peer: PeerId,
    name: String,
}

impl Node {
    /// `/healthz`, read with `mesh-node status --json` in the node's namespace.
    fn health(&self, dir: &Path) -> Option<Health> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.host.ns])
            .arg(binary("mesh-node"))
            .args(["status", "--json", "--pid-file"])
            .arg(dir.join(format!("{}.pid", self.name)))
            .env("MESH_HOME", dir)
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until the node's `/healthz` says `want`; returns that health.
    async fn wait_reach(&self, dir: &Path, want: Reach) -> Health {
        let deadline = Instant::now() + REACH_LIMIT;
        loop {
            let h = self.health(dir);
            if let Some(h) = h.filter(|h| h.reach.as_ref().is_some_and(|r| r.reach == want)) {
                return h;
            }
            assert!(
                Instant::now() < deadline,
                "{} never became {want:?}: {:?}",
                self.name,
                self.health(dir).and_then(|h| h.reach)
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

struct Mesh {
    _boot: Proc,
    boot_addr: Multiaddr,
    boot_host: Host,
    nodes: Vec<Node>,
    client: Host,
    dir: tempfile::TempDir,
    lab: Lab,
}

impl Mesh {
    /// A bootstrap (relay) and nodes with `spans`; `setup` runs on the lab before any
    /// process starts, with the hosts `[boot, node0.., client]`.
    async fn start(
        spans: &[BlockRange],
        node_extra: &dyn Fn(usize, &Path) -> Vec<String>,
        setup: impl FnOnce(&Lab, &[Host]),
    ) -> Mesh {
        let mut lab = Lab::new();
        let dir = tempfile::tempdir().unwrap();
        tiny::write(&dir.path().join("model")).unwrap();
        let boot_host = lab.add_host("boot");
        let hosts: Vec<Host> = (0..spans.len())
            .map(|i| lab.add_host(&format!("node{i}")))
            .collect();
        let client = lab.add_host("client");
        let mut all = vec![boot_host.clone()];
        all.extend(hosts.iter().cloned());
        all.push(client.clone());
        setup(&lab, &all);

        let mut args = bootstrap_args(dir.path(), 0);
        args[1] = format!("/ip4/{}/tcp/{BOOT_PORT}", boot_host.ip);
        // A relay needs an address it is known to be reachable at.
        args.extend([
            "--public-addr".into(),
            format!("/ip4/{}/tcp/{BOOT_PORT}", boot_host.ip),
            "--autonat-private-ips".into(),
        ]);
        let boot = Proc::spawn_in_netns(
            &boot_host.ns,
            "bootstrap",
            "mesh-bootstrap",
            &args,
            dir.path(),
        );
        let boot_addr = boot.listen_addr().await;
        let mut procs = Vec::new();
        for (i, (host, span)) in hosts.into_iter().zip(spans).enumerate() {
            let name = format!("node{i}");
            let mut args = node_args(dir.path(), &name, *span, &[&boot_addr]);
            let at = args.iter().position(|a| a == "--listen").unwrap() + 1;
            args[at] = format!("/ip4/{}/tcp/{NODE_PORT}", host.ip);
            args.extend([
                "--model-dir".into(),
                dir.path().join("model").display().to_string(),
                "--autonat-private-ips".into(),
            ]);
            args.extend(node_extra(i, dir.path()));
            let proc = Proc::spawn_in_netns(&host.ns, &name, "mesh-node", &args, dir.path());
            procs.push((host, proc, name));
        }
        let mut nodes = Vec::new();
        for (host, proc, name) in procs {
            let addr = proc.listen_addr().await;
            nodes.push(Node {
                peer: Proc::peer_id(&addr),
                host,
                _proc: proc,
                name,
            });
        }
        Mesh {
            _boot: boot,
            boot_addr,
            boot_host,
            nodes,
            client,
            dir,
            lab,
        }
    }

    /// The client's view of the mesh (arguments, generations) in its namespace.
    fn client_side(&self) -> Client<'_> {
        Client {
            model: MODEL,
            boot_addr: &self.boot_addr,
            dir: self.dir.path(),
            ns: &self.client.ns,
        }
    }

    fn spawn_generate(&self, label: &str, max_tokens: usize) -> Proc {
        self.client_side()
            .spawn_generate(label, max_tokens, SEED, PROMPT)
    }

    async fn generate(&self, label: &str, max_tokens: usize) -> Run {
        finish(self.spawn_generate(label, max_tokens), Instant::now()).await
    }

    /// Waits until a fresh client in the client's namespace lists every node.
    async fn wait_until_all_listed(&self) {
        let want: Vec<String> = self.nodes.iter().map(|n| n.peer.to_string()).collect();
        let deadline = Instant::now() + REACH_LIMIT;
        loop {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.client.ns])
                .arg(binary("mesh-client"))
                .args(self.client_side().args("nodes", "client-nodes"))
                .env("MESH_HOME", self.dir.path())
                .output()
                .expect("mesh-client nodes");
            let listed = String::from_utf8_lossy(&out.stdout).into_owned();
            if want.iter().all(|p| listed.contains(p.as_str())) {
                return;
            }
            assert!(Instant::now() < deadline, "client lists only:\n{listed}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Waits for a `mesh-client generate` to succeed and splits what it printed.
async fn finish(proc: Proc, started: Instant) -> Run {
    client::finish(proc, started, PROMPT, RUN_LIMIT).await
}

/// Whether a hop of the printed route (`blocks [a, b) on <peer> (<weights>)`) is `peer`.
fn uses(run: &Run, peer: &PeerId) -> bool {
    let on = format!(" on {peer}");
    run.route
        .iter()
        .any(|l| l.ends_with(&on) || l.contains(&format!("{on} (")))
}

/// The scenario: the middle of three providers sits behind NAT. AutoNAT finds
/// it out, it reserves a slot on the bootstrap's relay and announces `/p2p-circuit`
/// addresses; the client, which has no route to it, generates through the relay and
/// gets the tokens it gets once every node is directly reachable.
///
/// Exercised: AutoNAT's verdict (public for the others, behind NAT for it), the
/// reservation, relayed sessions, and the move to a direct connection mid-session when
/// the route appears and the router lets connections in (the client's periodic direct
/// dial). Not exercised: a DCUtR hole punch *succeeding*. DCUtR runs on every relayed
/// connection here, but the client does not listen (it is never dialed) and the provider
/// drops inbound SYNs, so it cannot succeed; a real hole punch needs address-rewriting
/// NAT on both sides, which this kernel's lab cannot build (no netfilter tools).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_behind_nat_serves_through_a_relay_and_moves_to_direct_once_reachable() {
    if !netlab::enabled() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let spans = BlockRange::even_split(NUM_BLOCKS, 3);
    let mut mesh = Mesh::start(&spans, &|_, _| Vec::new(), |lab, hosts| {
        // hosts: boot, node0, node1, node2, client.
        lab.refuse_inbound_connections(&hosts[2]);
        lab.block_route(&hosts[2], &hosts[4]);
    })
    .await;
    let dir = mesh.dir.path();
    let natted = &mesh.nodes[1];
    let behind = natted.wait_reach(dir, Reach::Relayed).await;
    let report = behind.reach.unwrap();
    println!("node1 (behind NAT): {}", report.summary());
    assert!(
        report
            .relay_addrs
            .iter()
            .all(|a| a.contains("/p2p-circuit"))
            && !report.relay_addrs.is_empty(),
        "{report:?}"
    );
    let public = mesh.nodes[0].wait_reach(dir, Reach::Public).await;
    println!("node0 (public):     {}", public.reach.unwrap().summary());
    mesh.wait_until_all_listed().await;

    let relayed = mesh.generate("relayed", SHORT).await;
    assert!(uses(&relayed, &natted.peer), "route: {:?}", relayed.route);
    // The same with the relay 10 ms away (each way): what a relay across a real
    // network costs each token.
    mesh.lab.delay(&mesh.boot_host.clone(), RELAY_ONE_WAY);
    let relayed_far = mesh.generate("relayed-far", SHORT).await;
    mesh.lab.clear(&mesh.boot_host.clone());
    assert_eq!(relayed_far.text, relayed.text);
    if let Some(r) = natted.health(dir).and_then(|h| h.reach) {
        println!("node1 counters while relayed: {:?}", r.relay);
    }
    // The health figures are sampled every 10 s: wait for the relayed session's bytes.
    let deadline = Instant::now() + REACH_LIMIT;
    let relayed_bytes = loop {
        let r = natted.health(dir).and_then(|h| h.reach).map(|r| r.relay);
        if let Some(r) = r.filter(|r| r.relayed_bytes_received > 0) {
            break r;
        }
        assert!(Instant::now() < deadline, "node1 counted no relayed bytes");
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    println!(
        "node1 session bytes over the relay: {} in, {} out",
        relayed_bytes.relayed_bytes_received, relayed_bytes.relayed_bytes_sent
    );
    let punches: Vec<&str> = relayed
        .log
        .lines()
        .filter(|l| l.contains("hole punch"))
        .collect();
    println!("client's hole punches while node1 is cut off: {punches:?}");

    // Mid-session, the route to node1 appears and its router lets connections in. A few
    // ms on the client's link keep the run going well past the client's next direct dial
    // of node1 (every 5 s).
    mesh.lab.delay(&mesh.client.clone(), CLIENT_ONE_WAY);
    let moving_since = Instant::now();
    let moving = mesh.spawn_generate("moving", LONG);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        moving.lines().len() < 3,
        "the long run ended before the route appeared"
    );
    mesh.lab.restore_route(&natted.host, &mesh.client);
    mesh.lab.clear(&natted.host);
    let moving = finish(moving, moving_since).await;
    mesh.lab.clear(&mesh.client.clone());
    let moved = moving
        .log
        .lines()
        .find(|l| l.contains("relayed connection closed"))
        .map(plain);
    println!("moved mid-session ({}): {moved:?}", moving.stats);
    assert!(
        moving.log.contains("relayed connection closed"),
        "the session never moved to a direct connection:\n{}",
        moving.log
    );

    // AutoNAT finds node1 public now: it drops the reservation; clients dial it directly.
    let direct_h = natted.wait_reach(dir, Reach::Public).await;
    println!("node1 (reachable):  {}", direct_h.reach.unwrap().summary());
    let direct = mesh.generate("direct", SHORT).await;
    mesh.lab.delay(&mesh.boot_host.clone(), RELAY_ONE_WAY);
    let direct_far = mesh.generate("direct-far", SHORT).await;
    mesh.lab.clear(&mesh.boot_host.clone());
    let direct_long = mesh.generate("direct-long", LONG).await;
    assert!(uses(&direct, &natted.peer));
    assert_eq!(
        relayed.text, direct.text,
        "the relayed hop changed the tokens"
    );
    assert_eq!(
        moving.text, direct_long.text,
        "moving to direct changed the tokens"
    );
    let ms = RELAY_ONE_WAY.as_millis();
    println!("per-token median, {SHORT} tokens, node1 of 3 behind NAT:");
    println!(
        "  relayed, relay on the LAN:        {:>7.2} ms",
        relayed.stat("median")
    );
    println!(
        "  direct,  relay on the LAN:        {:>7.2} ms",
        direct.stat("median")
    );
    println!(
        "  relayed, relay {ms} ms away each way: {:>7.2} ms",
        relayed_far.stat("median")
    );
    println!(
        "  direct,  relay {ms} ms away each way: {:>7.2} ms",
        direct_far.stat("median")
    );
    for (what, run) in [
        ("relayed", &relayed),
        ("direct", &direct),
        ("relayed-far", &relayed_far),
        ("direct-far", &direct_far),
    ] {
        println!("  {what:<12} {}", run.stats);
    }
}

/// A public node relays for others with room for one reservation; two providers of the
/// same blocks sit behind NAT and ask it. The relay accepts one, refuses the other with
/// its reason and counts it (the refused one backs off and keeps asking), and the client
/// is served through the one that holds the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_at_its_limit_refuses_and_counts_the_next_provider_and_serves_the_first() {
    if !netlab::enabled() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let spans = [
        BlockRange::new(0, 4),
        BlockRange::new(4, 8),
        BlockRange::new(4, 8),
    ];
    // node0 (10.77.0.2) is the relay: its key, and so its address, is made up front.
    let relay_extra = |i: usize, dir: &Path| -> Vec<String> {
        if i == 0 {
            return ["--relay-server", "--relay-max-reservations", "1"]
                .map(String::from)
                .to_vec();
        }
        let relay = Identity::load_or_create(&dir.join("node0.key"))
            .unwrap()
            .peer_id();
        vec![
            "--relay-via".into(),
            format!("/ip4/10.77.0.2/tcp/{NODE_PORT}/p2p/{relay}"),
        ]
    };
    let mesh = Mesh::start(&spans, &relay_extra, |lab, hosts| {
        // hosts: boot, node0, node1, node2, client.
        for natted in [&hosts[2], &hosts[3]] {
            lab.refuse_inbound_connections(natted);
            lab.block_route(natted, &hosts[4]);
        }
    })
    .await;
    let dir = mesh.dir.path();
    let relay = &mesh.nodes[0];
    assert_eq!(relay.host.ip.to_string(), "10.77.0.2");

    // One of the two gets the slot; the relay refuses the other and counts it.
    let deadline = Instant::now() + REACH_LIMIT;
    let (held, refused) = loop {
        let reach: Vec<Option<Reach>> = mesh.nodes[1..]
            .iter()
            .map(|n| n.health(dir).and_then(|h| h.reach).map(|r| r.reach))
            .collect();
        let counters = relay.health(dir).and_then(|h| h.reach).map(|r| r.relay);
        let refused_counted = counters.is_some_and(|c| c.reservations_refused >= 1);
        match reach.as_slice() {
            [Some(Reach::Relayed), Some(Reach::BehindNat)] if refused_counted => break (1, 2),
            [Some(Reach::BehindNat), Some(Reach::Relayed)] if refused_counted => break (2, 1),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "expected one relayed and one refused: {reach:?}, relay counters {counters:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let relay_counts = relay.health(dir).unwrap().reach.unwrap().relay;
    println!("relay counters: {relay_counts:?}");
    assert_eq!(relay_counts.reservations_accepted, 1, "{relay_counts:?}");
    let refused_node = &mesh.nodes[refused];
    let refused_counts = refused_node.health(dir).unwrap().reach.unwrap();
    println!("node{refused} (refused): {}", refused_counts.summary());
    assert!(refused_counts.relay_addrs.is_empty());
    let log = std::fs::read_to_string(dir.join(format!("node{refused}.stderr"))).unwrap();
    assert!(
        log.contains("relay reservation failed") && log.contains("resource limit exceeded"),
        "the refused node does not say why:\n{log}"
    );
    assert!(refused_counts.relay.own_reservations_refused >= 1);

    // The client is served, through the relay, by the node that holds the slot.
    mesh.wait_until_all_listed().await;
    let run = mesh.generate("served", SHORT).await;
    assert!(
        uses(&run, &mesh.nodes[held].peer),
        "route {:?} does not use node{held}, the relayed one",
        run.route
    );
    println!("served through the relay: {}", run.stats);
}
