//! The composed libp2p behaviour and the swarm built from it.

use libp2p::identity::Keypair;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig};
use libp2p::request_response::ProtocolSupport;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    autonat, connection_limits, dcutr, gossipsub, identify, kad, noise, ping, relay,
    request_response, tcp, upnp, yamux, StreamProtocol, Swarm, SwarmBuilder,
};

use super::codec::{FrameCodec, SESSION_PROTOCOL};
use super::dht::MAX_RECORD_BYTES;
use super::ip_limit;
use super::reachability::{
    DIALBACK_CONNECT_TIMEOUT, DIALBACK_PROTOCOL, MAX_DIALBACK_ADDRS, MAX_DIALBACK_BYTES,
};
use super::{P2pConfig, P2pError, Role};

/// Kademlia protocol name: a mesh-only DHT, separate from the public IPFS one.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/mesh/kad/1.0.0");
/// Identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/mesh/id/1.0.0";
/// Largest gossip message the transport accepts (heartbeats are far smaller).
pub const MAX_GOSSIP_BYTES: usize = 64 * 1024;
/// Largest Kademlia message.
pub const MAX_KAD_PACKET_BYTES: usize = 16 * 1024;
/// How long an AutoNAT probe waits for the answer (the prober dials back within
/// [`DIAL_CONNECT_TIMEOUT`]).
const AUTONAT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
/// A dial (connect plus handshake) that has not finished in this long fails: a router
/// that drops packets would otherwise hold it for the OS's SYN retries (about 2 minutes).
const DIAL_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub limits: connection_limits::Behaviour,
    pub ip_limit: ip_limit::Behaviour,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub kad: kad::Behaviour<MemoryStore>,
    pub gossipsub: gossipsub::Behaviour,
    pub session: request_response::Behaviour<FrameCodec>,
    /// Long-lived session streams ([`super::stream`]).
    pub stream: libp2p_stream::Behaviour,
    pub dialback: request_response::Behaviour<FrameCodec>,
    /// Dials `/p2p-circuit` addresses and holds reservations on relays.
    pub relay_client: relay::client::Behaviour,
    /// The relay server: bootstraps, and public nodes that opt in.
    pub relay: Toggle<relay::Behaviour>,
    /// Hole punching over relayed connections.
    pub dcutr: dcutr::Behaviour,
    /// Reachability probes (servers and bootstraps; a client is never dialed).
    pub autonat: Toggle<autonat::Behaviour>,
    /// Port mapping on the home router (`--upnp`).
    pub upnp: Toggle<upnp::tokio::Behaviour>,
}

fn behaviour(
    key: &Keypair,
    cfg: &P2pConfig,
    relay_client: relay::client::Behaviour,
) -> Result<Behaviour, P2pError> {
    let peer_id = key.public().to_peer_id();

    let limits = connection_limits::ConnectionLimits::default()
        .with_max_pending_incoming(Some(64))
        .with_max_pending_outgoing(Some(64))
        .with_max_established_incoming(Some(cfg.max_connections))
        .with_max_established(Some(cfg.max_connections.saturating_mul(2)))
        .with_max_established_per_peer(Some(4));

    let identify = identify::Behaviour::new(
        identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
            .with_agent_version(format!("mesh/{}", env!("CARGO_PKG_VERSION"))),
    );

    let mut kad_cfg = kad::Config::new(KAD_PROTOCOL);
    kad_cfg
        .set_query_timeout(cfg.query_timeout)
        .set_record_ttl(Some(cfg.record_ttl))
        .set_provider_record_ttl(Some(cfg.record_ttl))
        // Servers re-announce on their own timer with fresh, signed records.
        .set_publication_interval(None)
        .set_provider_publication_interval(None)
        .set_record_filtering(kad::StoreInserts::FilterBoth)
        .set_max_packet_size(MAX_KAD_PACKET_BYTES);
    let store = MemoryStore::with_config(
        peer_id,
        MemoryStoreConfig {
            max_records: 4096,
            max_value_bytes: MAX_RECORD_BYTES,
            max_providers_per_key: 128,
            max_provided_keys: 4096,
        },
    );
    let mut kad = kad::Behaviour::with_config(peer_id, store, kad_cfg);
    kad.set_mode(Some(match cfg.role {
        Role::Client => kad::Mode::Client,
        Role::Server | Role::Bootstrap => kad::Mode::Server,
    }));

    let gossip_cfg = gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(MAX_GOSSIP_BYTES)
        .heartbeat_interval(std::time::Duration::from_secs(1))
        .build()
        .map_err(|e| P2pError::Transport(format!("gossipsub config: {e}")))?;
    let gossipsub = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(key.clone()),
        gossip_cfg,
    )
    .map_err(|e| P2pError::Transport(format!("gossipsub: {e}")))?;

    let support = match cfg.role {
        Role::Server => ProtocolSupport::Full,
        Role::Client | Role::Bootstrap => ProtocolSupport::Outbound,
    };
    let session = request_response::Behaviour::with_codec(
        FrameCodec::new(cfg.max_frame_bytes),
        [(SESSION_PROTOCOL, support)],
        request_response::Config::default()
            .with_request_timeout(cfg.request_timeout)
            .with_max_concurrent_streams(256),
    );

    let dialback_support = match cfg.role {
        Role::Server | Role::Bootstrap => ProtocolSupport::Full,
        Role::Client => ProtocolSupport::Outbound,
    };
    let dialback = request_response::Behaviour::with_codec(
        FrameCodec::new(MAX_DIALBACK_BYTES),
        [(DIALBACK_PROTOCOL, dialback_support)],
        request_response::Config::default()
            .with_request_timeout(DIALBACK_CONNECT_TIMEOUT * (MAX_DIALBACK_ADDRS as u32 + 1))
            .with_max_concurrent_streams(8),
    );

    let nat = &cfg.nat;
    let relay = nat
        .relay_server
        .map(|limits| relay::Behaviour::new(peer_id, limits.to_libp2p()));
    let autonat = (cfg.role != Role::Client).then(|| {
        autonat::Behaviour::new(
            peer_id,
            autonat::Config {
                boot_delay: nat.autonat_boot_delay,
                retry_interval: nat.direct_retry,
                refresh_interval: nat.direct_retry * 30,
                throttle_server_period: nat.direct_retry,
                only_global_ips: !nat.autonat_private_ips,
                timeout: AUTONAT_TIMEOUT,
                ..Default::default()
            },
        )
    });
    let upnp = nat.upnp.then(upnp::tokio::Behaviour::default);

    Ok(Behaviour {
        limits: connection_limits::Behaviour::new(limits),
        ip_limit: ip_limit::Behaviour::new(
            cfg.max_connections_per_ip,
            cfg.max_pending_connections_per_ip,
        ),
        identify,
        ping: ping::Behaviour::new(
            ping::Config::new()
                .with_interval(cfg.ping_interval)
                .with_timeout(cfg.ping_timeout),
        ),
        kad,
        gossipsub,
        session,
        stream: libp2p_stream::Behaviour::new(),
        dialback,
        relay_client,
        relay: relay.into(),
        dcutr: dcutr::Behaviour::new(peer_id),
        autonat: autonat.into(),
        upnp: upnp.into(),
    })
}

/// Builds the swarm: TCP (noise, yamux) and QUIC, with DNS resolution.
pub(crate) fn build_swarm(cfg: &P2pConfig) -> Result<Swarm<Behaviour>, P2pError> {
    let keypair = cfg.identity.keypair();
    let transport = |e: &dyn std::fmt::Display| P2pError::Transport(e.to_string());
    Ok(SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| transport(&e))?
        .with_quic()
        .with_dns()
        .map_err(|e| transport(&e))?
        // Noise and yamux over each circuit too: a relay forwards ciphertext only.
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| transport(&e))?
        .with_behaviour(|key, relay_client| {
            behaviour(key, cfg, relay_client)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
        .map_err(|e| transport(&e))?
        .with_swarm_config(|c| {
            // Send a stream's first request with its protocol proposal instead of waiting a
            // round trip for the agreement: every protocol here has one version, so the
            // answer is known, and a decode step through each hop costs one round trip.
            c.with_idle_connection_timeout(cfg.idle_timeout)
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .with_connection_timeout(DIAL_CONNECT_TIMEOUT)
        .build())
}
