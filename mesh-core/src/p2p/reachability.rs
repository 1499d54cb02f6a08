//! Can real clients reach this node? Address classification, the operator's warning, and
//! the dial-back check of a declared public address.
//!
//! A node that announces only loopback or private addresses works in a local test mesh but
//! not for anyone on the internet; [`unreachable_warning`] builds the loud message, with the
//! firewall and port-check commands to run, that nodes log when they announce such addresses.
//!
//! A node given `--public-addr` asks a connected peer over [`DIALBACK_PROTOCOL`] to open a
//! TCP connection to that address from the outside (like `nc -zv host port`). To keep the
//! service from being used to make peers connect anywhere, a peer dials back only the IP
//! address the request came from, at most [`MAX_DIALBACK_ADDRS`] ports, a few at a time.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};

/// The dial-back protocol's name; listed in docs/protocol.md.
pub const DIALBACK_PROTOCOL: StreamProtocol = StreamProtocol::new("/mesh/dialback/1");
/// Largest dial-back request or response frame.
pub const MAX_DIALBACK_BYTES: usize = 4096;
/// Most addresses one dial-back request may ask for.
pub const MAX_DIALBACK_ADDRS: usize = 4;
/// Time allowed for one TCP connection attempt of a dial-back.
pub const DIALBACK_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// "Please try to connect to these addresses of mine."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DialBackRequest {
    /// Multiaddr bytes, at most [`MAX_DIALBACK_ADDRS`].
    pub addrs: Vec<Vec<u8>>,
}

/// The answer: one result per requested address, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DialBackResponse {
    pub results: Vec<DialBackResult>,
}

/// The outcome for one address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DialBackResult {
    pub addr: Vec<u8>,
    pub reachable: bool,
    /// Why not (refused, timed out, not allowed), empty on success.
    pub detail: String,
}

/// What a node learns about one of its public addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reachability {
    pub addr: Multiaddr,
    /// The peer that tried to connect.
    pub checked_by: PeerId,
    pub reachable: bool,
    pub detail: String,
}

/// The IP and TCP port of `addr`, if it is `/ip4|ip6/<ip>/tcp/<port>[/...]`.
pub fn tcp_target(addr: &Multiaddr) -> Option<(IpAddr, u16)> {
    let mut it = addr.iter();
    let ip = match it.next()? {
        Protocol::Ip4(ip) => IpAddr::V4(ip),
        Protocol::Ip6(ip) => IpAddr::V6(ip),
        _ => return None,
    };
    match it.next()? {
        Protocol::Tcp(port) => Some((ip, port)),
        _ => None,
    }
}

/// Serves one dial-back address: refuses anything but a TCP address on `requester_ip`,
/// then tries a TCP connection with a timeout.
pub async fn dial_back(addr_bytes: &[u8], requester_ip: Option<IpAddr>) -> DialBackResult {
    let fail = |detail: &str| DialBackResult {
        addr: addr_bytes.to_vec(),
        reachable: false,
        detail: detail.to_owned(),
    };
    let Ok(addr) = Multiaddr::try_from(addr_bytes.to_vec()) else {
        return fail("not a multiaddr");
    };
    let Some((ip, port)) = tcp_target(&addr) else {
        return fail("only /ip4|ip6/.../tcp/... addresses can be checked");
    };
    if Some(ip) != requester_ip {
        return fail("only the IP address the request came from is dialed back");
    }
    match tokio::time::timeout(
        DIALBACK_CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((ip, port)),
    )
    .await
    {
        Ok(Ok(_stream)) => DialBackResult {
            addr: addr_bytes.to_vec(),
            reachable: true,
            detail: String::new(),
        },
        Ok(Err(e)) => fail(&format!("connection failed: {e}")),
        Err(_) => fail("connection timed out (a firewall drops the packets?)"),
    }
}

/// How far an address can be reached from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// 127.0.0.0/8, ::1: this machine only.
    Loopback,
    /// RFC 1918, CGNAT 100.64/10, link-local, IPv6 ULA: this network only.
    Private,
    /// 0.0.0.0 or ::: a wildcard, not an address anyone can dial.
    Unspecified,
    /// A globally routable IP address.
    Public,
    /// A DNS name or something else mesh cannot classify.
    Unknown,
}

/// Classifies the IP address (or `localhost` name) at the start of `addr`.
pub fn scope(addr: &Multiaddr) -> Scope {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => ip_scope(IpAddr::V4(ip)),
        Some(Protocol::Ip6(ip)) => ip_scope(IpAddr::V6(ip)),
        Some(Protocol::Dns(h) | Protocol::Dns4(h) | Protocol::Dns6(h)) if is_localhost(&h) => {
            Scope::Loopback
        }
        _ => Scope::Unknown,
    }
}

/// `localhost` and names under it always resolve to loopback (RFC 6761 section 6.3), so a
/// node announcing one is as unreachable as one announcing 127.0.0.1. Other names are
/// not resolved here: what they point at depends on who asks.
fn is_localhost(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "localhost" || host.ends_with(".localhost")
}

fn ip_scope(ip: IpAddr) -> Scope {
    match ip {
        IpAddr::V4(ip) if ip.is_unspecified() => Scope::Unspecified,
        IpAddr::V4(ip) if ip.is_loopback() => Scope::Loopback,
        IpAddr::V4(ip) if ip.is_private() || ip.is_link_local() || is_cgnat(ip) => Scope::Private,
        IpAddr::V6(ip) if ip.is_unspecified() => Scope::Unspecified,
        IpAddr::V6(ip) if ip.is_loopback() => Scope::Loopback,
        IpAddr::V6(ip) if is_ula_or_link_local(ip) => Scope::Private,
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => ip_scope(IpAddr::V4(v4)),
            None => Scope::Public,
        },
        IpAddr::V4(_) => Scope::Public,
    }
}

fn is_cgnat(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    a == 100 && (64..128).contains(&b)
}

fn is_ula_or_link_local(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80
}

/// True when at least one of `addrs` could be dialed from the internet (public IP or DNS).
pub fn any_public(addrs: &[Multiaddr]) -> bool {
    addrs
        .iter()
        .any(|a| matches!(scope(a), Scope::Public | Scope::Unknown))
}

/// The TCP or UDP port of `addr`, with its transport name.
fn port_of(addr: &Multiaddr) -> Option<(&'static str, u16)> {
    addr.iter().find_map(|p| match p {
        Protocol::Tcp(port) => Some(("tcp", port)),
        Protocol::Udp(port) => Some(("udp", port)),
        _ => None,
    })
}

/// Concrete steps to make `addr` reachable: firewall rules and an outside port check.
pub fn troubleshooting(addr: &Multiaddr) -> String {
    let (proto, port) = port_of(addr).unwrap_or(("tcp", 31337));
    let host = match (scope(addr), addr.iter().next()) {
        (Scope::Public, Some(Protocol::Ip4(ip))) => ip.to_string(),
        (Scope::Public, Some(Protocol::Ip6(ip))) => ip.to_string(),
        (_, Some(Protocol::Dns(h) | Protocol::Dns4(h) | Protocol::Dns6(h))) => h.to_string(),
        _ => "YOUR_PUBLIC_IP".into(),
    };
    let nc_flag = if proto == "udp" { "-zvu" } else { "-zv" };
    format!(
        "  1. listen on all interfaces: --listen /ip4/0.0.0.0/{proto}/{port}\n\
         \x20 2. open the port in the firewall:\n\
         \x20      sudo ufw allow {port}/{proto}\n\
         \x20      # or: sudo iptables -A INPUT -p {proto} --dport {port} -j ACCEPT\n\
         \x20 3. behind a home router, forward {proto} port {port} to this machine (NAT/port forwarding)\n\
         \x20 4. tell mesh your public address: --public-addr /ip4/<public ip>/{proto}/{port}\n\
         \x20 5. check from ANOTHER machine: nc {nc_flag} {host} {port}"
    )
}

/// The loud warning for a node whose announced addresses are all loopback/private, or
/// `None` when one of them is public.
pub fn unreachable_warning(addrs: &[Multiaddr]) -> Option<String> {
    if any_public(addrs) {
        return None;
    }
    let example = addrs
        .iter()
        .find(|a| port_of(a).is_some())
        .cloned()
        .unwrap_or_else(|| Multiaddr::empty().with(Protocol::Tcp(31337)));
    let list = addrs
        .iter()
        .map(|a| format!("    {a} ({:?})", scope(a)))
        .collect::<Vec<_>>()
        .join("\n");
    Some(format!(
        "!!! this node announces only loopback/private addresses: this node will not be \
         reachable by real clients !!!\n  announced:\n{list}\n  to fix it:\n{}\n  \
         (an AutoNAT probe follows: if peers cannot dial in, the node reserves on a relay \
         and is reachable through it; `mesh-node status` shows which)",
        troubleshooting(&example)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dial_back_connects_only_to_the_requesters_ip() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = a(&format!("/ip4/127.0.0.1/tcp/{port}")).to_vec();
        let lo = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let ok = dial_back(&open, lo).await;
        assert!(ok.reachable, "{ok:?}");
        // Another IP than the requester's: refused without dialing.
        let other = dial_back(&open, Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)))).await;
        assert!(!other.reachable && other.detail.contains("only the IP"));
        // A closed port fails; junk and non-TCP addresses are refused.
        drop(listener);
        assert!(!dial_back(&open, lo).await.reachable);
        assert!(!dial_back(b"junk", lo).await.reachable);
        let quic = a("/ip4/127.0.0.1/udp/1/quic-v1").to_vec();
        assert!(!dial_back(&quic, lo).await.reachable);
    }

    fn a(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn classifies_addresses() {
        assert_eq!(scope(&a("/ip4/127.0.0.1/tcp/1")), Scope::Loopback);
        assert_eq!(scope(&a("/ip4/10.1.2.3/tcp/1")), Scope::Private);
        assert_eq!(scope(&a("/ip4/192.168.1.1/tcp/1")), Scope::Private);
        assert_eq!(scope(&a("/ip4/100.100.1.1/tcp/1")), Scope::Private);
        assert_eq!(scope(&a("/ip4/0.0.0.0/tcp/1")), Scope::Unspecified);
        assert_eq!(scope(&a("/ip4/8.8.8.8/tcp/1")), Scope::Public);
        assert_eq!(scope(&a("/ip6/::1/tcp/1")), Scope::Loopback);
        assert_eq!(scope(&a("/ip6/fd00::1/tcp/1")), Scope::Private);
        assert_eq!(scope(&a("/ip6/2001:db8::1/tcp/1")), Scope::Public);
        assert_eq!(scope(&a("/dns4/example.org/tcp/1")), Scope::Unknown);
        // localhost is this machine whatever the resolver says (RFC 6761).
        for name in ["localhost", "LocalHost.", "node.localhost"] {
            for proto in ["dns", "dns4", "dns6"] {
                let addr = a(&format!("/{proto}/{name}/tcp/1"));
                assert_eq!(scope(&addr), Scope::Loopback, "{addr}");
                assert!(unreachable_warning(&[addr]).is_some());
            }
        }
        assert_eq!(scope(&a("/dns4/notlocalhost.org/tcp/1")), Scope::Unknown);
    }

    #[test]
    fn warns_only_without_a_public_address() {
        let local = [a("/ip4/127.0.0.1/tcp/4001"), a("/ip4/10.0.0.2/tcp/4001")];
        let w = unreachable_warning(&local).unwrap();
        assert!(w.contains("will not be reachable by real clients"));
        assert!(w.contains("ufw allow 4001/tcp"));
        assert!(w.contains("nc -zv"));
        assert!(unreachable_warning(&[a("/ip4/8.8.8.8/tcp/4001")]).is_none());
    }
}
