//! The `[nat]` section: providers behind home routers (AutoNAT, relays, UPnP).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{addrs, invalid, toml_list, toml_str, ConfigError};
use crate::p2p::{NatConfig, RelayLimits, RelayMode};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Nat {
    /// `auto`, `always` or `never`.
    pub relay: String,
    /// Relays to reserve on; empty: the bootstraps.
    pub relay_via: Vec<String>,
    pub upnp: bool,
    pub autonat_private_ips: bool,
    /// Run a relay server (a public node helping others behind NAT).
    pub relay_server: bool,
    pub relay_max_reservations: usize,
    pub relay_max_circuits: usize,
    pub relay_max_circuits_per_peer: usize,
    pub relay_max_circuit_secs: u64,
    pub relay_max_circuit_kib: u64,
}

impl Default for Nat {
    fn default() -> Self {
        let l = RelayLimits::default();
        Self {
            relay: "auto".into(),
            relay_via: Vec::new(),
            upnp: false,
            autonat_private_ips: false,
            relay_server: false,
            relay_max_reservations: l.max_reservations,
            relay_max_circuits: l.max_circuits,
            relay_max_circuits_per_peer: l.max_circuits_per_peer,
            relay_max_circuit_secs: l.max_circuit_duration.as_secs(),
            relay_max_circuit_kib: l.max_circuit_bytes >> 10,
        }
    }
}

impl Nat {
    pub(super) fn resolve(&self) -> Result<NatConfig, ConfigError> {
        let relay_mode: RelayMode = self.relay.parse().map_err(|m| invalid("nat.relay", m))?;
        if self.relay_max_reservations == 0
            || self.relay_max_circuits == 0
            || self.relay_max_circuits_per_peer == 0
            || self.relay_max_circuit_secs == 0
            || self.relay_max_circuit_kib == 0
        {
            return Err(invalid("nat", "relay limits must be at least 1"));
        }
        let limits = RelayLimits {
            max_reservations: self.relay_max_reservations,
            max_circuits: self.relay_max_circuits,
            max_circuits_per_peer: self.relay_max_circuits_per_peer,
            max_circuit_duration: Duration::from_secs(self.relay_max_circuit_secs),
            max_circuit_bytes: self.relay_max_circuit_kib.saturating_mul(1 << 10),
            ..RelayLimits::default()
        };
        Ok(NatConfig {
            relay_server: self.relay_server.then_some(limits),
            relay_mode,
            relays: addrs(&self.relay_via, "nat.relay_via")?,
            upnp: self.upnp,
            autonat_private_ips: self.autonat_private_ips,
            ..NatConfig::default()
        })
    }

    /// The section as `mesh-node init` writes it, every key commented.
    pub(super) fn template(&self) -> String {
        format!(
            r#"[nat]
# Behind a home router there is nothing to do: AutoNAT finds out whether peers can dial
# this node, and if not it reserves a slot on a relay (the bootstraps) and is reached
# through it; hole punching then tries a direct connection.
# When to use relays: "auto" (when AutoNAT says behind NAT), "always" or "never".
relay = {relay}
# Relays to reserve on (".../p2p/<peer id>"); empty: the bootstraps.
relay_via = {relay_via}
# Ask the home router to forward the listen port (UPnP); the log says whether it did.
upnp = {upnp}
# Let AutoNAT use peers at private addresses (a LAN-only mesh or a test lab).
autonat_private_ips = {private}
# Relay for others (a public node): the limits below bound what it carries.
relay_server = {relay_server}
relay_max_reservations = {max_res}
relay_max_circuits = {max_circ}
relay_max_circuits_per_peer = {max_circ_peer}
relay_max_circuit_secs = {max_secs}
relay_max_circuit_kib = {max_kib}
"#,
            relay = toml_str(&self.relay),
            relay_via = toml_list(&self.relay_via),
            upnp = self.upnp,
            private = self.autonat_private_ips,
            relay_server = self.relay_server,
            max_res = self.relay_max_reservations,
            max_circ = self.relay_max_circuits,
            max_circ_peer = self.relay_max_circuits_per_peer,
            max_secs = self.relay_max_circuit_secs,
            max_kib = self.relay_max_circuit_kib,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_and_rejects_bad_values() {
        let n = Nat::default().resolve().unwrap();
        assert_eq!(n.relay_mode, RelayMode::Auto);
        assert!(n.relay_server.is_none() && !n.upnp);
        let on = Nat {
            relay_server: true,
            relay_max_circuit_kib: 4,
            ..Nat::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(on.relay_server.unwrap().max_circuit_bytes, 4 << 10);
        let bad = Nat {
            relay: "sometimes".into(),
            ..Nat::default()
        };
        assert!(bad.resolve().unwrap_err().to_string().contains("nat.relay"));
        let zero = Nat {
            relay_max_circuits: 0,
            ..Nat::default()
        };
        assert!(zero.resolve().is_err());
    }
}
