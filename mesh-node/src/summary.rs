//! `mesh-node status`'s first line: the node in one line, as a provider's console shows it
//! (what it serves, tokens, earned, sessions, VRAM, CPU, uptime).

use mesh_core::http::{EarningsView, Health};

/// `serving tiny-llama-mesh blocks 0..8 | tokens 1234 | earned 208 (0 settled) | sessions
/// 2 open | VRAM 5.0 of 24.0 GiB | CPU load 0.52 on 16 cores | up 3h 2m`. `earned` is
/// `None` when the node keeps no ledger or its earnings could not be read.
pub fn line(h: &Health, earned: Option<&EarningsView>) -> String {
    let what = match (&h.model, &h.span) {
        (Some(m), Some(s)) => format!("{} {m} blocks {s}", h.status),
        _ => h.status.clone(),
    };
    let earned = earned.map_or("earned -".into(), |e| {
        format!("earned {} ({} settled)", e.total.amount, e.total.settled)
    });
    let (used, total) = h.gpu_live.iter().fold((0u64, 0u64), |(u, t), g| {
        (u + g.memory_used_bytes, t + g.memory_total_bytes)
    });
    let vram = if total == 0 {
        "VRAM none".into()
    } else {
        format!("VRAM {} of {} GiB", gib(used), gib(total))
    };
    let cpu = h.cpu.load_1m.map_or("CPU load -".into(), |l| {
        format!("CPU load {l:.2} on {} cores", h.cpu.cores)
    });
    [
        what,
        format!("tokens {}", h.tokens_served),
        earned,
        format!("sessions {} open", h.sessions),
        vram,
        cpu,
        format!("up {}", uptime(h.uptime_secs)),
    ]
    .join(" | ")
}

fn gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 30) as f64)
}

/// `3h 2m`, `2d 4h`, `45s`.
fn uptime(secs: u64) -> String {
    let (d, h, m) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{secs}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, m) => format!("{h}h {m}m"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::http::HealthCpu;
    use mesh_core::types::GpuLive;

    #[test]
    fn one_line_says_what_a_provider_watches() {
        let mut h = Health {
            status: "serving".into(),
            model: Some("tiny-llama-mesh".into()),
            span: Some("0..8".into()),
            tokens_served: 1234,
            sessions: 2,
            uptime_secs: 3 * 3600 + 2 * 60 + 5,
            cpu: HealthCpu {
                cores: 16,
                load_1m: Some(0.52),
                ..HealthCpu::default()
            },
            gpu_live: vec![GpuLive {
                index: 0,
                memory_used_bytes: 5 << 30,
                memory_free_bytes: 19 << 30,
                memory_total_bytes: 24 << 30,
                utilization_percent: Some(10),
            }],
            ..Health::default()
        };
        let mut view: EarningsView = serde_json::from_value(serde_json::json!({
            "payee": "x", "since_ms": 0, "rows": [], "series": [], "recent": [],
            "total": {"sessions": 3, "tokens": 1234, "amount": 208, "confirmed": 208, "settled": 0},
        }))
        .unwrap();
        assert_eq!(
            line(&h, Some(&view)),
            "serving tiny-llama-mesh blocks 0..8 | tokens 1234 | earned 208 (0 settled) | \
             sessions 2 open | VRAM 5.0 of 24.0 GiB | CPU load 0.52 on 16 cores | up 3h 2m"
        );
        h.gpu_live.clear();
        h.cpu = HealthCpu::default();
        h.model = None;
        h.status = "starting".into();
        h.uptime_secs = 42;
        view.total.settled = 208;
        assert_eq!(
            line(&h, None),
            "starting | tokens 1234 | earned - | sessions 2 open | VRAM none | CPU load - | up 42s"
        );
    }
}
