//! The `/metrics` body: Prometheus text exposition format 0.0.4, from the figures the
//! state already holds (the sampler's peer counts, the worker's snapshot, the latest GPU
//! reading). Apart from `http.rs` because it is one long list of metric definitions.

use std::fmt::Write as _;

use super::{label, HttpState};
use crate::metrics::LATENCY_BUCKETS_SECS;
use crate::p2p::Reach;
use crate::probe;
use crate::types::GpuLive;

impl HttpState {
    /// The `/metrics` body, Prometheus text exposition format 0.0.4.
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        let mut m = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let one = |v: String| vec![(String::new(), v)];
        let p2p = self.sampled().p2p;
        m(
            "mesh_up",
            "gauge",
            "1 once the span is loaded and announced, 0 while starting.",
            &one(u8::from(self.0.node.get().is_some()).to_string()),
        );
        let ledger_failed = self
            .0
            .node
            .get()
            .is_some_and(|n| n.snapshot().ledger_failure.is_some());
        m(
            "mesh_ledger_failed",
            "gauge",
            "1 once the ledger failed to keep a receipt: the node is degraded and opens no billed sessions.",
            &one(u8::from(ledger_failed).to_string()),
        );
        m(
            "mesh_uptime_seconds",
            "gauge",
            "Seconds since the node process started.",
            &one(self.0.started.elapsed().as_secs_f64().to_string()),
        );
        m(
            "mesh_peers_connected",
            "gauge",
            "Peers with an open connection.",
            &one(p2p.connected_peers.to_string()),
        );
        m(
            "mesh_connections_open",
            "gauge",
            "Established connections (about one per peer).",
            &one(p2p.connections.to_string()),
        );
        m(
            "mesh_heartbeats_published_total",
            "counter",
            "Heartbeats this node has published.",
            &one(p2p.heartbeats_published.to_string()),
        );
        m(
            "mesh_connections_closed_unresponsive_total",
            "counter",
            "Connections closed because the peer stopped answering pings.",
            &one(p2p.unresponsive_closed.to_string()),
        );
        m(
            "mesh_connections_refused_per_ip_total",
            "counter",
            "Inbound connections refused because their IP held max_connections_per_ip already.",
            &one(p2p.ip_limited.to_string()),
        );
        m(
            "mesh_pending_connections_refused_per_ip_total",
            "counter",
            "Inbound connections refused before their handshake because their IP had \
             max_pending_connections_per_ip in handshakes already.",
            &one(p2p.pending_ip_limited.to_string()),
        );
        let r = p2p.relay;
        let reach = self.sampled().nat.as_ref().map(|n| n.reach);
        let reach_samples: Vec<(String, String)> = reach
            .map(|now| {
                [
                    Reach::Public,
                    Reach::Relayed,
                    Reach::BehindNat,
                    Reach::Unknown,
                ]
                .into_iter()
                .map(|r| {
                    let name = serde_json::to_value(r)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default();
                    (
                        format!("{{reach=\"{name}\"}}"),
                        u8::from(r == now).to_string(),
                    )
                })
                .collect()
            })
            .unwrap_or_default();
        m(
            "mesh_reachability",
            "gauge",
            "1 for what AutoNAT (or a relay reservation) says of this node: public, relayed, behind_nat or unknown.",
            &reach_samples,
        );
        let counters: [(&str, &str, u64); 11] = [
            (
                "mesh_relay_reservations_accepted_total",
                "Reservations this node's relay server accepted.",
                r.reservations_accepted,
            ),
            (
                "mesh_relay_reservations_refused_total",
                "Reservations this node's relay server refused (over its limits or rate).",
                r.reservations_refused,
            ),
            (
                "mesh_relay_circuits_accepted_total",
                "Circuits this node's relay server opened.",
                r.circuits_accepted,
            ),
            (
                "mesh_relay_circuits_refused_total",
                "Circuits this node's relay server refused (limits, rate, no reservation).",
                r.circuits_refused,
            ),
            (
                "mesh_relay_circuits_closed_total",
                "Relayed circuits that ended.",
                r.circuits_closed,
            ),
            (
                "mesh_relay_circuits_cut_bytes_total",
                "Relayed circuits cut at the per-circuit byte limit.",
                r.circuits_cut_bytes,
            ),
            (
                "mesh_relay_circuits_cut_time_total",
                "Relayed circuits cut at the per-circuit duration limit.",
                r.circuits_cut_time,
            ),
            (
                "mesh_relay_own_reservations_refused_total",
                "Reservations on relays this node asked for and did not get.",
                r.own_reservations_refused,
            ),
            (
                "mesh_holepunch_succeeded_total",
                "Hole punches (DCUtR) that gave a direct connection.",
                r.holepunch_succeeded,
            ),
            (
                "mesh_holepunch_failed_total",
                "Hole punches (DCUtR) that failed.",
                r.holepunch_failed,
            ),
            (
                "mesh_relayed_moved_to_direct_total",
                "Relayed connections closed because a direct one to the peer came up.",
                r.moved_to_direct,
            ),
        ];
        for (name, help, value) in counters {
            m(name, "counter", help, &one(value.to_string()));
        }
        m(
            "mesh_relayed_session_bytes_total",
            "counter",
            "Session bytes this node sent (out) and received (in) over relayed connections.",
            &[
                (
                    "{direction=\"out\"}".to_string(),
                    r.relayed_bytes_sent.to_string(),
                ),
                (
                    "{direction=\"in\"}".to_string(),
                    r.relayed_bytes_received.to_string(),
                ),
            ],
        );
        m(
            "mesh_relay_circuits_open",
            "gauge",
            "Circuits this node's relay server carries now.",
            &one(r.circuits_open.to_string()),
        );
        m(
            "mesh_relay_own_reservations",
            "gauge",
            "Relay reservations this node holds now (its /p2p-circuit addresses).",
            &one(r.own_reservations.to_string()),
        );
        if let Some(rss) = probe::process_rss_bytes() {
            m(
                "mesh_process_resident_memory_bytes",
                "gauge",
                "Resident memory of the node process.",
                &one(rss.to_string()),
            );
        }
        if let Some(s) = self.schedule_status() {
            m(
                "mesh_settlements_scheduled_total",
                "counter",
                "Scheduled settlements, by outcome: settled, or waiting below the minimum.",
                &[
                    ("{outcome=\"settled\"}".into(), s.settled.to_string()),
                    ("{outcome=\"waiting\"}".into(), s.waited.to_string()),
                ],
            );
            m(
                "mesh_settlement_next_timestamp_seconds",
                "gauge",
                "When the schedule settles next.",
                &one((s.next_ms / 1000).to_string()),
            );
        }
        let cpu = self.cpu();
        for (name, help, value) in [
            (
                "mesh_cpu_load1",
                "The machine's load average over 1 minute.",
                cpu.load_1m,
            ),
            (
                "mesh_cpu_load5",
                "The machine's load average over 5 minutes.",
                cpu.load_5m,
            ),
            (
                "mesh_cpu_load15",
                "The machine's load average over 15 minutes.",
                cpu.load_15m,
            ),
            (
                "mesh_process_cpu_percent",
                "Percent of one core the node process used over the last sample interval.",
                cpu.process_percent,
            ),
        ] {
            if let Some(v) = value {
                m(name, "gauge", help, &one(v.to_string()));
            }
        }
        m(
            "mesh_cpu_cores",
            "gauge",
            "Logical cores the node process may use.",
            &one(cpu.cores.to_string()),
        );
        let memory = probe::probe_memory();
        for (name, help, value) in [
            (
                "mesh_memory_available_bytes",
                "Memory the machine has available now.",
                memory.available_bytes,
            ),
            (
                "mesh_memory_total_bytes",
                "The machine's memory.",
                memory.total_bytes,
            ),
        ] {
            if let Some(v) = value {
                m(name, "gauge", help, &one(v.to_string()));
            }
        }
        // Live per GPU (the latest reading); none at all on a machine without GPUs.
        let gpus = self.gpu_live();
        let per_gpu = |value: &dyn Fn(&GpuLive) -> Option<u64>| -> Vec<(String, String)> {
            gpus.iter()
                .filter_map(|g| Some((format!("{{gpu=\"{}\"}}", g.index), value(g)?.to_string())))
                .collect()
        };
        if !gpus.is_empty() {
            m(
                "mesh_gpu_memory_used_bytes",
                "gauge",
                "GPU memory in use by every process, as the driver reports it now.",
                &per_gpu(&|g| Some(g.memory_used_bytes)),
            );
            m(
                "mesh_gpu_memory_free_bytes",
                "gauge",
                "GPU memory free, as the driver reports it now.",
                &per_gpu(&|g| Some(g.memory_free_bytes)),
            );
            m(
                "mesh_gpu_memory_total_bytes",
                "gauge",
                "GPU memory in all.",
                &per_gpu(&|g| Some(g.memory_total_bytes)),
            );
        }
        let utilization = per_gpu(&|g| g.utilization_percent.map(u64::from));
        if !utilization.is_empty() {
            m(
                "mesh_gpu_utilization_percent",
                "gauge",
                "Percent of the driver's last sample period a kernel ran on the GPU.",
                &utilization,
            );
        }
        let Some(node) = self.0.node.get() else {
            return out;
        };
        let snap = node.snapshot();
        let ann = node.announcement();
        m(
            "mesh_node_info",
            "gauge",
            "The node's identity and span, as labels.",
            &[(
                format!(
                    "{{peer_id=\"{}\",model=\"{}\",span=\"{}..{}\",version=\"{}\"}}",
                    label(&node.peer_id().to_string()),
                    label(ann.model.as_str()),
                    ann.span.start,
                    ann.span.end,
                    env!("CARGO_PKG_VERSION")
                ),
                "1".into(),
            )],
        );
        m(
            "mesh_tokens_served_total",
            "counter",
            "Token positions run through this node's span.",
            &[
                (
                    "{phase=\"prefill\"}".into(),
                    snap.stats.prefill_tokens.to_string(),
                ),
                (
                    "{phase=\"decode\"}".into(),
                    snap.stats.decode_tokens.to_string(),
                ),
            ],
        );
        m(
            "mesh_sessions_active",
            "gauge",
            "Sessions holding a KV cache now.",
            &one(snap.active_sessions.to_string()),
        );
        m(
            "mesh_sessions_opened_total",
            "counter",
            "Sessions opened since start.",
            &one(snap.stats.sessions_opened.to_string()),
        );
        m(
            "mesh_sessions_expired_total",
            "counter",
            "Sessions closed for sitting idle.",
            &one(snap.stats.sessions_expired.to_string()),
        );
        m(
            "mesh_request_queue_depth",
            "gauge",
            "Requests waiting for the span worker.",
            &one(snap.queued.to_string()),
        );
        m(
            "mesh_requests_total",
            "counter",
            "Session requests received.",
            &one(snap.metrics.requests.to_string()),
        );
        m(
            "mesh_requests_inline_total",
            "counter",
            "Session requests served on the network task, without the span worker's thread.",
            &one(snap.metrics.inline_requests.to_string()),
        );
        m(
            "mesh_bytes_total",
            "counter",
            "Session protocol payload bytes.",
            &[
                (
                    "{direction=\"in\"}".into(),
                    snap.metrics.bytes_in.to_string(),
                ),
                (
                    "{direction=\"out\"}".into(),
                    snap.metrics.bytes_out.to_string(),
                ),
            ],
        );
        let errors: Vec<(String, String)> = snap
            .metrics
            .refusals
            .iter()
            .map(|(kind, n)| (format!("{{kind=\"{}\"}}", label(kind)), n.to_string()))
            .collect();
        m(
            "mesh_errors_total",
            "counter",
            "Requests refused, by kind.",
            &errors,
        );
        m(
            "mesh_kv_cache_bytes",
            "gauge",
            "KV-cache budget reserved by sessions and still free.",
            &[
                (
                    "{state=\"reserved\"}".into(),
                    snap.reserved_bytes.to_string(),
                ),
                ("{state=\"free\"}".into(), snap.free_cache_bytes.to_string()),
            ],
        );
        m(
            "mesh_throughput_tokens_per_second",
            "gauge",
            "Recent decode throughput of the span.",
            &one(snap.throughput_tps.to_string()),
        );
        let h = &snap.metrics.block_latency;
        let mut samples: Vec<(String, String)> = h
            .cumulative()
            .into_iter()
            .map(|(le, n)| {
                let le = if le.is_infinite() {
                    "+Inf".to_owned()
                } else {
                    le.to_string()
                };
                (format!("_bucket{{le=\"{le}\"}}"), n.to_string())
            })
            .collect();
        samples.push(("_sum".into(), h.sum_secs.to_string()));
        samples.push(("_count".into(), h.count.to_string()));
        debug_assert_eq!(samples.len(), LATENCY_BUCKETS_SECS.len() + 3);
        m(
            "mesh_block_latency_seconds",
            "histogram",
            "Compute time of one forward pass per block of the span.",
            &samples,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{GpuReadings, Probe};

    fn state(gpus: Vec<GpuLive>) -> HttpState {
        HttpState::with_gpu(
            Probe::default(),
            GpuReadings::with_reader(move || gpus.clone()),
        )
    }

    #[tokio::test]
    async fn gpu_metrics_show_the_latest_reading() {
        let gpus = vec![
            GpuLive {
                index: 0,
                memory_used_bytes: 3 << 30,
                memory_free_bytes: 21 << 30,
                memory_total_bytes: 24 << 30,
                utilization_percent: Some(42),
            },
            GpuLive {
                index: 1,
                memory_used_bytes: 0,
                memory_free_bytes: 8 << 30,
                memory_total_bytes: 8 << 30,
                utilization_percent: None,
            },
        ];
        let s = state(gpus);
        // Nothing read yet: no GPU lines.
        assert!(!s.metrics_text().contains("mesh_gpu_"));
        // What the sampler does while the node starts.
        s.0.gpu.refresh().await;
        let text = s.metrics_text();
        for needle in [
            "# TYPE mesh_gpu_memory_used_bytes gauge\n",
            &format!("mesh_gpu_memory_used_bytes{{gpu=\"0\"}} {}\n", 3u64 << 30),
            "mesh_gpu_memory_used_bytes{gpu=\"1\"} 0\n",
            &format!("mesh_gpu_memory_free_bytes{{gpu=\"0\"}} {}\n", 21u64 << 30),
            &format!("mesh_gpu_memory_total_bytes{{gpu=\"1\"}} {}\n", 8u64 << 30),
            "# TYPE mesh_gpu_utilization_percent gauge\n",
            "mesh_gpu_utilization_percent{gpu=\"0\"} 42\n",
        ] {
            assert!(text.contains(needle), "no {needle:?} in\n{text}");
        }
        // A GPU whose driver gives no utilisation has no utilisation sample.
        assert!(!text.contains("mesh_gpu_utilization_percent{gpu=\"1\"}"));
        assert_eq!(s.health().gpu_live.len(), 2);
    }

    #[tokio::test]
    async fn no_gpu_means_no_gpu_metrics_and_no_error() {
        let s = state(Vec::new());
        s.0.gpu.refresh().await;
        let text = s.metrics_text();
        assert!(text.contains("mesh_up 0"), "{text}");
        assert!(!text.contains("mesh_gpu_"), "{text}");
        assert!(s.health().gpu_live.is_empty());
    }
}
