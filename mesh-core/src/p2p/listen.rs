//! Listening: one port, one process; and listen errors that say their cause.
//!
//! libp2p's TCP transport sets `SO_REUSEPORT` on every listening socket, so a second
//! process on the same port binds without an error and the kernel splits incoming
//! connections between the two: clients then meet the wrong peer id (`Unexpected peer
//! ID`) and join slowly. Before listening, each fixed port is bound once without
//! `SO_REUSEPORT`; the kernel refuses that bind while anyone listens there, which is the
//! "port in use" an operator expects. Port 0 (any free port) needs no check.
//!
//! The check and the real bind are two steps, so two processes started at the very same
//! instant can still both pass; a process started after another listens cannot.

use std::error::Error as StdError;
use std::io;
use std::net::{IpAddr, SocketAddr};

use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;
use socket2::{Domain, Socket, Type};

use super::P2pError;

/// Fails with [`P2pError::PortInUse`] when another socket already holds `addr`'s fixed
/// TCP or UDP (QUIC) port. Other addresses (DNS names, port 0, other transports) pass:
/// libp2p reports their errors itself.
pub(crate) fn ensure_port_free(addr: &Multiaddr) -> Result<(), P2pError> {
    let Some((socket_addr, ty)) = fixed_port(addr) else {
        return Ok(());
    };
    match probe(socket_addr, ty) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            Err(P2pError::PortInUse { addr: addr.clone() })
        }
        // Anything else (no such local address, permissions) is libp2p's to report.
        Err(_) => Ok(()),
    }
}

/// The socket address and kind of an `/ip4|ip6/.../tcp|udp/PORT` multiaddr with PORT > 0.
fn fixed_port(addr: &Multiaddr) -> Option<(SocketAddr, Type)> {
    let mut it = addr.iter();
    let ip: IpAddr = match it.next()? {
        Protocol::Ip4(ip) => ip.into(),
        Protocol::Ip6(ip) => ip.into(),
        _ => return None,
    };
    let (port, ty) = match it.next()? {
        Protocol::Tcp(port) => (port, Type::STREAM),
        Protocol::Udp(port) => (port, Type::DGRAM),
        _ => return None,
    };
    (port != 0).then_some((SocketAddr::new(ip, port), ty))
}

/// Binds (and drops) a socket on `addr` the way a lone listener would: `SO_REUSEADDR` on
/// TCP, so the TIME_WAIT connections of a node that just restarted do not count as "in
/// use", but never `SO_REUSEPORT`; IPv6 only on an IPv6 address, as libp2p does.
fn probe(addr: SocketAddr, ty: Type) -> io::Result<()> {
    let socket = Socket::new(Domain::for_address(addr), ty, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if ty == Type::STREAM {
        socket.set_reuse_address(true)?;
    }
    socket.bind(&addr.into())
}

/// `err` and its sources, joined by ": ", leaving out empty messages: libp2p's
/// `TransportError::Other` displays as nothing and keeps its cause in `source()`.
pub(crate) fn cause_chain(err: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && parts.last() != Some(&text) {
            parts.push(text);
        }
        next = e.source();
    }
    if parts.is_empty() {
        "unknown cause".into()
    } else {
        parts.join(": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_port_is_in_use_and_port_zero_is_not_checked() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
        let err = ensure_port_free(&addr).unwrap_err();
        assert!(err.to_string().contains("port in use"), "{err}");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        let quic: Multiaddr = format!("/ip4/127.0.0.1/udp/{port}/quic-v1")
            .parse()
            .unwrap();
        assert!(matches!(
            ensure_port_free(&quic),
            Err(P2pError::PortInUse { .. })
        ));
        ensure_port_free(&"/ip4/127.0.0.1/tcp/0".parse().unwrap()).unwrap();
        ensure_port_free(&"/dns4/localhost/tcp/1".parse().unwrap()).unwrap();
    }

    #[test]
    fn an_empty_message_does_not_hide_its_cause() {
        #[derive(Debug)]
        struct Empty(io::Error);
        impl std::fmt::Display for Empty {
            fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                Ok(())
            }
        }
        impl StdError for Empty {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let e = Empty(io::Error::new(io::ErrorKind::AddrInUse, "Address in use"));
        assert_eq!(cause_chain(&e), "Address in use");
    }
}
