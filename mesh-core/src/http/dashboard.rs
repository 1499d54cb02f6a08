//! The dashboard page at `/`: one self-contained HTML document (inline CSS and SVG, no
//! scripts, no external assets) built from figures the handlers already hold.

use super::earnings::EarningsView;
use super::Health;
use crate::probe::Probe;
use crate::types::Capability;

/// What the earnings part of the page can show.
pub(super) enum Earnings<'a> {
    /// The node is still loading its span.
    Starting,
    /// The node keeps no ledger (billing off).
    NoLedger,
    /// Reading the ledger failed.
    Failed(&'a str),
    View(&'a EarningsView),
}

/// Everything the page shows.
pub(super) struct Page<'a> {
    pub health: &'a Health,
    pub probe: &'a Probe,
    /// What the heartbeats carry, once the node is up.
    pub capability: Option<&'a Capability>,
    /// `(ms since the Unix epoch, tokens served)`, oldest first.
    pub tokens: &'a [(u64, u64)],
    pub earnings: Earnings<'a>,
}

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn human_bytes(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of ms since the Unix epoch.
fn utc_time(ms: u64) -> String {
    let secs = (ms / 1000) % 86_400;
    format!(
        "{} {:02}:{:02}:{:02}",
        crate::ledger::utc_day(ms),
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60
    )
}

/// The last `n` characters of an id, for narrow table cells (the full id is the title).
fn short(id: &str, n: usize) -> String {
    let skip = id.chars().count().saturating_sub(n);
    format!("…{}", id.chars().skip(skip).collect::<String>())
}

/// `HH:MM:SS` (UTC) of ms since the Unix epoch.
fn clock(ms: u64) -> String {
    utc_time(ms).split_off(11)
}

/// A line chart of `(ms since the Unix epoch, value)` points as inline SVG; always draws
/// the axes, and a line once there are two points. The time axis is labelled with its
/// first and last times (UTC).
fn svg_chart(id: &str, what: &str, points: &[(u64, u64)]) -> String {
    const W: f64 = 640.0;
    const H: f64 = 170.0;
    const PAD: f64 = 30.0;
    let (t0, t1) = match (points.first(), points.last()) {
        (Some(a), Some(b)) => (a.0, b.0.max(a.0 + 1)),
        _ => (0, 1),
    };
    let vmax = points.iter().map(|p| p.1).max().unwrap_or(0).max(1);
    let xy = |&(t, v): &(u64, u64)| {
        let x = PAD + (t.saturating_sub(t0)) as f64 / (t1 - t0) as f64 * (W - 2.0 * PAD);
        let y = H - PAD - v as f64 / vmax as f64 * (H - 2.0 * PAD);
        (x, y)
    };
    let line: Vec<String> = points
        .iter()
        .map(|p| {
            let (x, y) = xy(p);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    let dots: String = points
        .iter()
        .map(|p| {
            let (x, y) = xy(p);
            format!(r##"<circle cx="{x:.1}" cy="{y:.1}" r="2.5" fill="#36c"/>"##)
        })
        .collect();
    let (from, to) = match points {
        [] => (String::new(), String::new()),
        _ => (clock(t0), format!("{} UTC", clock(t1))),
    };
    format!(
        r##"<svg id="{id}" width="{W}" height="{H}" viewBox="0 0 {W} {H}" xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{what} over time">
<line x1="{PAD}" y1="{yb}" x2="{xr}" y2="{yb}" stroke="#999"/>
<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{yb}" stroke="#999"/>
<text x="{PAD}" y="{ty}" font-size="11" fill="#666">{vmax} {what}</text>
<text x="{PAD}" y="{tb}" font-size="11" fill="#666">{from}</text>
<text x="{xr}" y="{tb}" font-size="11" fill="#666" text-anchor="end">{to}</text>
<polyline fill="none" stroke="#36c" stroke-width="2" points="{line}"/>
{dots}
</svg>"##,
        yb = H - PAD,
        xr = W - PAD,
        ty = PAD - 8.0,
        tb = H - 10.0,
        line = line.join(" "),
    )
}

/// The earnings summary line, the chart and the receipts table.
fn earnings_html(e: &Earnings<'_>) -> (String, String) {
    let view = match e {
        Earnings::Starting => return ("-".into(), "<p>starting…</p>".into()),
        Earnings::NoLedger => {
            return (
                "billing is off".into(),
                "<p>this node keeps no ledger</p>".into(),
            )
        }
        Earnings::Failed(why) => {
            let msg = format!("<p class=\"warn\">ledger unreadable: {}</p>", esc(why));
            return ("?".into(), msg);
        }
        Earnings::View(v) => v,
    };
    let t = &view.total;
    let summary = format!(
        "<span id=\"earned\">{}</span> ({} confirmed by clients, {} settled) for {} tokens in {} session{}",
        t.amount,
        t.confirmed,
        t.settled,
        t.tokens,
        t.sessions,
        if t.sessions == 1 { "" } else { "s" }
    );
    // The line runs on, flat, to now: the chart's right edge is the present.
    let mut series = view.series.clone();
    if let Some(&(last, total)) = series.last() {
        let now = crate::ledger::now_ms();
        if now > last {
            series.push((now, total));
        }
    }
    let mut rows = String::new();
    for r in &view.recent {
        let state = match (r.settled, r.countersigned) {
            (true, _) => "settled",
            (false, true) => "countersigned",
            (false, false) => "signed",
        };
        rows.push_str(&format!(
            "<tr><td>{}</td><td><code title=\"{}\">{}</code></td><td><code title=\"{}\">{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            utc_time(r.end_ms),
            esc(&r.session),
            esc(&r.session),
            esc(&r.client),
            esc(&short(&r.client, 8)),
            esc(&r.span),
            r.prefill_tokens + r.decode_tokens,
            r.amount,
            r.seq,
            state,
        ));
    }
    if rows.is_empty() {
        rows.push_str("<tr><td colspan=\"8\">no receipts yet</td></tr>\n");
    }
    let body = format!(
        "{chart}\n<h2>Recent receipts</h2>\n<table id=\"receipts\" class=\"grid\">\n<tr><th>time (UTC)</th><th>session</th><th>client</th><th>blocks</th><th>tokens</th><th>amount</th><th>seq</th><th>state</th></tr>\n{rows}</table>",
        chart = svg_chart("earnings-chart", "earned", &series),
    );
    (summary, body)
}

/// One line per GPU: its name from the start-up probe, memory and utilisation from the
/// latest reading (the probe's figures where there is none); the probe's note without GPUs.
fn gpus_html(h: &Health, note: &str) -> String {
    if h.vram.is_empty() && h.gpu_live.is_empty() {
        return esc(note);
    }
    let gib = |b: Option<u64>| b.map_or("?".into(), human_bytes);
    let live = |index: u32| h.gpu_live.iter().find(|l| l.index == index);
    let mut lines: Vec<String> = h
        .vram
        .iter()
        .map(|g| match live(g.index) {
            Some(l) => format!(
                "<span id=\"gpu-{}\">{}: {}</span>",
                g.index,
                esc(&g.name),
                esc(&l.usage())
            ),
            None => format!(
                "<span id=\"gpu-{}\">{} ({} free of {})</span>",
                g.index,
                esc(&g.name),
                gib(g.vram_free_bytes),
                gib(g.vram_total_bytes)
            ),
        })
        .collect();
    for l in &h.gpu_live {
        if !h.vram.iter().any(|g| g.index == l.index) {
            let index = l.index;
            lines.push(format!(
                "<span id=\"gpu-{index}\">GPU {index}: {}</span>",
                esc(&l.usage())
            ));
        }
    }
    lines.join("<br>")
}

/// `load 0.52 / 1.04 / 2.50 (1, 5, 15 min) on 16 cores; node 35.0% of a core`.
fn cpu_live(c: &super::HealthCpu) -> String {
    let load = match (c.load_1m, c.load_5m, c.load_15m) {
        (Some(a), Some(b), Some(d)) => {
            format!(
                "load {a:.2} / {b:.2} / {d:.2} (1, 5, 15 min) on {} cores",
                c.cores
            )
        }
        _ => "load unknown".into(),
    };
    match c.process_percent {
        Some(p) => format!("{load}; node {p:.1}% of a core"),
        None => load,
    }
}

/// The settlement schedule: its period and minimum, what it did last, when it runs next.
fn settle_html(s: Option<&super::schedule::ScheduleStatus>) -> String {
    let Some(s) = s else {
        return "by hand (<code>mesh-node settle</code>; <code>[settle] every</code> in node.toml \
                schedules it)"
            .into();
    };
    let last = s
        .last
        .as_ref()
        .map_or("not yet".into(), |r| match r.outcome.as_str() {
            "settled" => format!("settled {} due in {} lines", r.due, r.lines),
            "waiting" => format!("waited: {} due, below the minimum", r.due),
            _ => format!("failed: {}", esc(r.error.as_deref().unwrap_or("?"))),
        });
    format!(
        "every {}, minimum {}; last {last}; next in {}",
        human_duration(s.every_secs),
        s.minimum,
        human_duration(s.next_ms.saturating_sub(crate::ledger::now_ms()) / 1000)
    )
}

/// The whole page.
pub(super) fn render(p: &Page<'_>) -> String {
    let h = p.health;
    let gib = |b: Option<u64>| b.map_or("?".into(), human_bytes);
    let gpus = gpus_html(h, &p.probe.gpu_note);
    let dash = |o: &Option<String>| o.as_deref().map_or("-".into(), esc);
    let (earned, earnings) = earnings_html(&p.earnings);
    let cpu = if p.probe.cpu.model.is_empty() {
        "unknown CPU"
    } else {
        &p.probe.cpu.model
    };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="10">
<title>mesh-node {peer_short}</title>
<style>
body{{font:14px system-ui,sans-serif;margin:2em;color:#222;max-width:60em}}
h1{{font-size:1.3em}} h2{{font-size:1.1em;margin-top:1.4em}} table{{border-collapse:collapse}}
td,th{{padding:.2em 1em .2em 0;vertical-align:top;text-align:left}}
td:first-child{{color:#666}} .grid td:first-child{{color:inherit}} .grid th{{color:#666;font-weight:normal;border-bottom:1px solid #ddd}}
code{{font-size:.95em}} .ok{{color:#080}} .warn{{color:#a60}}
svg{{border:1px solid #ddd;background:#fafafa}}
</style></head><body>
<h1>mesh-node <span class="{status_class}">{status}</span></h1>
<table>
<tr><td>peer id</td><td><code id="peer-id">{peer}</code></td></tr>
<tr><td>model</td><td>{model}</td></tr>
<tr><td>blocks</td><td>{span} of {num_blocks}</td></tr>
<tr><td>uptime</td><td>{uptime}</td></tr>
<tr><td>sessions</td><td>{sessions} open, {opened} opened, {queue} queued</td></tr>
<tr><td>tokens served</td><td>{tokens} ({prefill} prefill, {decode} decode)</td></tr>
<tr><td>peers</td><td>{peers}</td></tr>
<tr><td>reachability</td><td id="reach">{reach}</td></tr>
<tr><td>price</td><td>{price} per token per block</td></tr>
<tr><td>earned</td><td>{earned}</td></tr>
<tr><td>settles</td><td id="settle">{settle}</td></tr>
</table>
<h2>Earnings over time</h2>
{earnings}
<h2>Hardware</h2>
<table>
<tr><td>host</td><td>{host} ({os}/{arch})</td></tr>
<tr><td>CPU</td><td>{cpu} &times; {cores}</td></tr>
<tr><td>CPU now</td><td id="cpu-live">{cpu_live}</td></tr>
<tr><td>memory</td><td>{mem_avail} available of {mem_total}; node uses {rss}</td></tr>
<tr><td>disk</td><td>{disk}</td></tr>
<tr><td>GPUs</td><td>{gpus}</td></tr>
<tr><td>heartbeats say</td><td id="capability">{capability}</td></tr>
</table>
<h2>Tokens served</h2>
{tokens_chart}
<p><a href="/healthz">/healthz</a> &middot; <a href="/metrics">/metrics</a> &middot; <a href="/api/earnings">/api/earnings</a> &middot; mesh {version}, pid {pid}</p>
</body></html>
"#,
        peer_short = h.peer_id.as_deref().map_or(String::new(), |p| short(p, 8)),
        status_class = if h.status == "serving" { "ok" } else { "warn" },
        status = esc(&h.status),
        peer = dash(&h.peer_id),
        model = dash(&h.model),
        span = dash(&h.span),
        num_blocks = h.num_blocks.map_or("-".into(), |n| n.to_string()),
        uptime = human_duration(h.uptime_secs),
        sessions = h.sessions,
        opened = h.sessions_opened,
        queue = h.queue,
        tokens = h.tokens_served,
        prefill = h.prefill_tokens,
        decode = h.decode_tokens,
        peers = h.peers,
        reach = h.reach.as_ref().map_or("-".into(), |r| esc(&r.summary())),
        price = h.price_per_token.unwrap_or(0),
        tokens_chart = svg_chart("tokens-chart", "tokens", p.tokens),
        host = esc(&p.probe.hostname),
        os = esc(&p.probe.os),
        arch = esc(&p.probe.arch),
        cpu = esc(cpu),
        cores = p.probe.cpu.cores,
        cpu_live = cpu_live(&h.cpu),
        settle = settle_html(h.settle.as_ref()),
        mem_avail = gib(h.memory.available_bytes),
        mem_total = gib(h.memory.total_bytes),
        rss = gib(h.memory.process_rss_bytes),
        disk = p.probe.disk.as_ref().map_or("?".into(), |d| format!(
            "{} free of {} at {}",
            gib(Some(d.free_bytes)),
            gib(Some(d.total_bytes)),
            esc(&d.path.display().to_string())
        )),
        capability = p.capability.map_or("-".into(), |c| esc(&c.to_string())),
        version = env!("CARGO_PKG_VERSION"),
        pid = h.pid,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::earnings::{RecentReceipt, Totals};
    use crate::types::GpuLive;

    #[test]
    fn chart_escaping_and_times() {
        let svg = svg_chart("c", "tokens", &[(100_000, 0), (110_000, 50), (120_000, 80)]);
        assert_eq!(svg.matches("<circle").count(), 3);
        assert!(svg.contains("80 tokens"), "{svg}");
        assert!(
            svg.contains(">00:01:40<") && svg.contains(">00:02:00 UTC<"),
            "{svg}"
        );
        assert!(svg_chart("c", "x", &[]).contains("<polyline"));
        assert_eq!(esc("<a href=\"x\">&"), "&lt;a href=&quot;x&quot;&gt;&amp;");
        assert_eq!(human_duration(3725), "1h 2m");
        assert_eq!(utc_time(951_782_400_000 + 3_723_000), "2000-02-29 01:02:03");
        assert_eq!(short("12D3KooWabcdefgh", 4), "…efgh");
    }

    #[test]
    fn gpus_show_live_memory_and_utilisation() {
        let live = GpuLive {
            index: 0,
            memory_used_bytes: 3 << 30,
            memory_free_bytes: 21 << 30,
            memory_total_bytes: 24 << 30,
            utilization_percent: Some(42),
        };
        let h = Health {
            vram: vec![
                crate::probe::Gpu {
                    index: 0,
                    name: "NVIDIA <A10>".into(),
                    ..Default::default()
                },
                crate::probe::Gpu {
                    index: 1,
                    name: "NVIDIA A10".into(),
                    vram_free_bytes: Some(1 << 30),
                    vram_total_bytes: Some(24 << 30),
                    ..Default::default()
                },
            ],
            gpu_live: vec![
                live,
                GpuLive {
                    index: 2,
                    utilization_percent: None,
                    ..live
                },
            ],
            ..Health::default()
        };
        let html = gpus_html(&h, "unused");
        assert!(
            html.contains(
                "<span id=\"gpu-0\">NVIDIA &lt;A10&gt;: 3.0 GiB used of 24.0 GiB (21.0 GiB free), 42% utilisation</span>"
            ),
            "{html}"
        );
        // No reading for GPU 1: the probe's figures; a reading without a name: its index.
        assert!(
            html.contains("NVIDIA A10 (1.0 GiB free of 24.0 GiB)"),
            "{html}"
        );
        assert!(
            html.contains("GPU 2: 3.0 GiB used of 24.0 GiB (21.0 GiB free), utilisation n/a"),
            "{html}"
        );
        // No GPU: the probe's note, nothing else.
        assert_eq!(
            gpus_html(&Health::default(), "no GPU: <none>"),
            "no GPU: &lt;none&gt;"
        );
    }

    #[test]
    fn receipts_are_listed_and_escaped() {
        let view = EarningsView {
            total: Totals {
                sessions: 1,
                tokens: 13,
                amount: 208,
                confirmed: 208,
                settled: 0,
            },
            series: vec![(1_000, 0), (2_000, 208)],
            recent: vec![RecentReceipt {
                session: "00112233<b>".into(),
                client: "12D3KooWclient".into(),
                model: "tiny".into(),
                span: "0..8".into(),
                prefill_tokens: 4,
                decode_tokens: 9,
                amount: 208,
                seq: 1,
                start_ms: 1_000,
                end_ms: 2_000,
                countersigned: true,
                settled: false,
            }],
            ..EarningsView::default()
        };
        let (summary, body) = earnings_html(&Earnings::View(&view));
        assert!(
            summary.contains("<span id=\"earned\">208</span>"),
            "{summary}"
        );
        assert!(summary.ends_with("for 13 tokens in 1 session"), "{summary}");
        // The recorded points, then a flat line to now.
        assert_eq!(body.matches("<circle").count(), 3, "{body}");
        assert!(body.contains("<svg id=\"earnings-chart\""));
        assert!(body.contains("00112233&lt;b&gt;") && !body.contains("<b>"));
        assert!(body.contains("<td>13</td><td>208</td><td>1</td><td>countersigned</td>"));
        let (_, empty) = earnings_html(&Earnings::View(&EarningsView::default()));
        assert!(empty.contains("no receipts yet"));
    }

    #[test]
    fn cpu_now_shows_the_load_and_the_nodes_share() {
        let c = super::super::HealthCpu {
            cores: 16,
            load_1m: Some(0.52),
            load_5m: Some(1.04),
            load_15m: Some(2.5),
            process_percent: Some(35.0),
        };
        assert_eq!(
            cpu_live(&c),
            "load 0.52 / 1.04 / 2.50 (1, 5, 15 min) on 16 cores; node 35.0% of a core"
        );
        assert_eq!(
            cpu_live(&super::super::HealthCpu::default()),
            "load unknown"
        );
    }
}
