//! A throwaway network of Linux network namespaces for fault tests: one hub namespace
//! holding a bridge, one namespace per host joined to it by a veth pair, addresses
//! 10.77.0.0/24. Faults are made with what this kernel has: links taken down
//! (partitions), `tbf` (rate limits), `htb` + a classic-BPF random classifier feeding a
//! zero-length FIFO (packet loss) and a userspace TAP relay (latency; no `netem` here).
//! Everything is deleted on drop, also when a test panics.

#![allow(dead_code)]

pub mod client;
mod delay;

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use delay::DelayLine;

/// The gate: these tests need root and iproute2, so they run only when asked to.
pub const ENV_GATE: &str = "MESH_NETNS_TESTS";
/// Every namespace this harness makes starts with this, then the test process id.
const PREFIX: &str = "meshlab-";
const BRIDGE: &str = "br0";
/// The host side of each veth, in its own namespace.
const HOST_IF: &str = "eth0";

/// Labs made by this process: keeps names unique when several exist at once.
static LABS: AtomicU32 = AtomicU32::new(0);
/// Delay lines made by this process: their TAP devices need unique names.
static DELAYS: AtomicU32 = AtomicU32::new(0);

/// Whether the gate is set; prints why not otherwise.
pub fn enabled() -> bool {
    if std::env::var(ENV_GATE).as_deref() == Ok("1") {
        return true;
    }
    eprintln!("skipped: set {ENV_GATE}=1 (needs root + iproute2)");
    false
}

/// Runs a command, panicking with its stderr if it fails.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (is iproute2 installed?)"));
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) -> String {
    sh("ip", args)
}

/// One machine of the lab: a namespace with `eth0` on the hub's bridge.
#[derive(Clone, Debug)]
pub struct Host {
    pub label: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    /// The peer end of its veth, inside the hub namespace.
    hub_if: String,
}

/// The namespaces and links of one test; deleted on drop.
pub struct Lab {
    id: String,
    hub: String,
    hosts: Vec<Host>,
    /// Delayed links: the host's hub port, the side bridge it was moved to, the relay.
    delays: Vec<(String, String, DelayLine)>,
}

impl Lab {
    /// Creates the hub namespace and its bridge. Namespaces left by earlier test
    /// processes that were killed before cleaning up are removed first.
    pub fn new() -> Lab {
        assert!(
            is_root(),
            "{ENV_GATE}=1 but not running as root: network namespaces need root"
        );
        remove_stale();
        let id = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::SeqCst)
        );
        let hub = format!("{id}-hub");
        let lab = Lab {
            id,
            hub,
            hosts: Vec::new(),
            delays: Vec::new(),
        };
        ip(&["netns", "add", &lab.hub]);
        ip(&["-n", &lab.hub, "link", "add", BRIDGE, "type", "bridge"]);
        ip(&["-n", &lab.hub, "link", "set", BRIDGE, "up"]);
        lab
    }

    /// Adds a host namespace with address 10.77.0.N, N = 1, 2, ... in order of adding.
    pub fn add_host(&mut self, label: &str) -> Host {
        let n = self.hosts.len() + 1;
        assert!(n < 250, "too many hosts");
        let host = Host {
            label: label.into(),
            ns: format!("{}-{label}", self.id),
            ip: Ipv4Addr::new(10, 77, 0, n as u8),
            hub_if: format!("h{n}"),
        };
        ip(&["netns", "add", &host.ns]);
        // Push it first, so that drop deletes it even if a step below fails.
        self.hosts.push(host.clone());
        ip(&[
            "link",
            "add",
            HOST_IF,
            "netns",
            &host.ns,
            "type",
            "veth",
            "peer",
            "name",
            &host.hub_if,
            "netns",
            &self.hub,
        ]);
        ip(&[
            "-n",
            &self.hub,
            "link",
            "set",
            &host.hub_if,
            "master",
            BRIDGE,
        ]);
        ip(&["-n", &self.hub, "link", "set", &host.hub_if, "up"]);
        let cidr = format!("{}/24", host.ip);
        ip(&["-n", &host.ns, "addr", "add", &cidr, "dev", HOST_IF]);
        ip(&["-n", &host.ns, "link", "set", HOST_IF, "up"]);
        ip(&["-n", &host.ns, "link", "set", "lo", "up"]);
        host
    }

    /// Cuts `host` off: its port on the hub goes down, so frames to and from it vanish
    /// (no reset, no ICMP: what a pulled cable or a dead router looks like).
    pub fn partition(&self, host: &Host) {
        ip(&["-n", &self.hub, "link", "set", &host.hub_if, "down"]);
    }

    /// Undoes [`Lab::partition`].
    pub fn heal(&self, host: &Host) {
        ip(&["-n", &self.hub, "link", "set", &host.hub_if, "up"]);
    }

    /// Limits what `host` sends to `rate` (tc syntax, e.g. `2mbit`) with a token bucket
    /// filter on its `eth0`.
    pub fn rate_limit(&self, host: &Host, rate: &str) {
        sh(
            "tc",
            &[
                "-n", &host.ns, "qdisc", "replace", "dev", HOST_IF, "root", "tbf", "rate", rate,
                "burst", "16kb", "latency", "2s",
            ],
        );
    }

    /// Drops each frame the hub sends to `host` with probability `percent`/100.
    ///
    /// The kernel here has no netem and no `gact` action, so: an HTB root whose default
    /// class passes everything, a second class whose leaf is a FIFO of length 0 (every
    /// packet queued there is dropped), and a classic-BPF filter that loads a random
    /// 32-bit number (`SKF_AD_RANDOM`) and picks the dropping class when it is above
    /// the threshold.
    pub fn drop_randomly(&self, host: &Host, percent: f64) {
        assert!((0.0..100.0).contains(&percent));
        let threshold = ((1.0 - percent / 100.0) * u32::MAX as f64) as u32;
        // ld rand; jgt threshold ? ret -1 (the filter's classid, 1:2) : ret 0 (no match).
        let program = format!("4,32 0 0 4294963256,37 0 1 {threshold},6 0 0 4294967295,6 0 0 0");
        self.drop_matching(host, &program);
    }

    /// Makes `host` a machine behind NAT as seen from outside: the hub drops every TCP
    /// SYN (without ACK) it would hand to `host`, so no connection can be opened *to* it
    /// while its own outbound connections (whose SYN-ACKs pass) work. What a home router
    /// does to TCP; the kernel here has no netfilter tools to build a real NAT. Undo with
    /// [`Lab::clear`].
    pub fn refuse_inbound_connections(&self, host: &Host) {
        // Classic BPF on the Ethernet frame: IPv4, TCP, not a fragment, flags & (SYN|ACK)
        // == SYN: return -1 (the filter's classid, 1:2, a zero-length FIFO), else 0.
        let program = "12,40 0 0 12,21 0 9 2048,48 0 0 23,21 0 7 6,40 0 0 20,69 5 0 8191,\
                       177 0 0 14,80 0 0 27,84 0 0 18,21 0 1 2,6 0 0 4294967295,6 0 0 0";
        self.drop_matching(host, program);
    }

    /// Cuts the route between `a` and `b` (each gets a blackhole route to the other),
    /// leaving both reachable by everyone else. Undo with [`Lab::restore_route`].
    pub fn block_route(&self, a: &Host, b: &Host) {
        for (from, to) in [(a, b), (b, a)] {
            ip(&[
                "-n",
                &from.ns,
                "route",
                "add",
                "blackhole",
                &format!("{}/32", to.ip),
            ]);
        }
    }

    /// Undoes [`Lab::block_route`].
    pub fn restore_route(&self, a: &Host, b: &Host) {
        for (from, to) in [(a, b), (b, a)] {
            ip(&[
                "-n",
                &from.ns,
                "route",
                "del",
                "blackhole",
                &format!("{}/32", to.ip),
            ]);
        }
    }

    /// An HTB root on the hub's side of `host`'s link whose default class passes
    /// everything, a second class whose leaf is a zero-length FIFO (every packet queued
    /// there is dropped), and the classic-BPF `program` choosing the dropping class.
    fn drop_matching(&self, host: &Host, program: &str) {
        let dev = host.hub_if.as_str();
        let tc = |args: &[&str]| {
            let mut all = vec!["-n", self.hub.as_str()];
            all.extend_from_slice(args);
            sh("tc", &all)
        };
        tc(&[
            "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "1",
        ]);
        for class in ["1:1", "1:2"] {
            tc(&[
                "class", "add", "dev", dev, "parent", "1:", "classid", class, "htb", "rate",
                "10gbit", "quantum", "60000",
            ]);
        }
        tc(&[
            "qdisc", "add", "dev", dev, "parent", "1:2", "pfifo", "limit", "0",
        ]);
        tc(&[
            "filter", "add", "dev", dev, "parent", "1:", "protocol", "all", "prio", "1", "bpf",
            "bytecode", program, "classid", "1:2",
        ]);
    }

    /// Packets dropped so far by the queueing disciplines on the hub's side of `host`'s
    /// link (what [`Lab::drop_randomly`] threw away).
    pub fn hub_drops(&self, host: &Host) -> u64 {
        let out = sh(
            "tc",
            &["-n", &self.hub, "-s", "qdisc", "show", "dev", &host.hub_if],
        );
        // "qdisc htb 1: root ... Sent B bytes P pkt (dropped D, ...": the root's counter.
        out.split("(dropped ")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .and_then(|d| d.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Delays every frame on `host`'s link by `one_way` in each direction.
    ///
    /// The host's hub port moves from the main bridge to a bridge of its own with one
    /// TAP device; a second TAP device sits on the main bridge, and a relay in this test
    /// process carries frames between the two TAPs `one_way` late.
    pub fn delay(&mut self, host: &Host, one_way: Duration) {
        let n = DELAYS.fetch_add(1, Ordering::SeqCst);
        let tag = format!("md{}x{n}", std::process::id());
        let (near, far) = (format!("{tag}a"), format!("{tag}b"));
        let line = DelayLine::open(&near, &far, one_way)
            .unwrap_or_else(|e| panic!("TAP devices for the delay line: {e}"));
        let side = format!("d{n}");
        self.delays.push((host.hub_if.clone(), side.clone(), line));
        let hub = self.hub.as_str();
        for tap in [&near, &far] {
            ip(&["link", "set", tap, "netns", hub]);
        }
        ip(&["-n", hub, "link", "add", &side, "type", "bridge"]);
        ip(&["-n", hub, "link", "set", &side, "up"]);
        ip(&["-n", hub, "link", "set", &host.hub_if, "master", &side]);
        ip(&["-n", hub, "link", "set", &near, "master", &side]);
        ip(&["-n", hub, "link", "set", &far, "master", BRIDGE]);
        ip(&["-n", hub, "link", "set", &near, "up"]);
        ip(&["-n", hub, "link", "set", &far, "up"]);
    }
}

impl Lab {
    /// Takes every rate limit, loss and delay off `host`'s link.
    pub fn clear(&mut self, host: &Host) {
        // "No such qdisc" when there is none: nothing to undo.
        let _ = Command::new("tc")
            .args(["-n", &host.ns, "qdisc", "del", "dev", HOST_IF, "root"])
            .output();
        let _ = Command::new("tc")
            .args(["-n", &self.hub, "qdisc", "del", "dev", &host.hub_if, "root"])
            .output();
        if let Some(at) = self
            .delays
            .iter()
            .position(|(port, ..)| *port == host.hub_if)
        {
            let (port, side, line) = self.delays.remove(at);
            ip(&["-n", &self.hub, "link", "set", &port, "master", BRIDGE]);
            ip(&["-n", &self.hub, "link", "del", &side]);
            // Closing the TAP devices' files removes them.
            drop(line);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Relays first: their TAP devices go with them.
        self.delays.clear();
        for ns in self
            .hosts
            .iter()
            .map(|h| h.ns.as_str())
            .chain([self.hub.as_str()])
        {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|ids| ids.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

/// Deletes `meshlab-<pid>-*` namespaces whose process is gone (a test killed mid-way).
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}
