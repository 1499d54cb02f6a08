//! `init`, `stop`, `status`, `probe`, `earnings` and `settle`: the commands around a
//! running node.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use mesh_core::config::{self, NodeFile};
use mesh_core::daemon::{self, Stopped};
use mesh_core::http::{self, EarningsView, Health, SettleAnswer, SettleRequest};
use mesh_core::identity::Identity;
use mesh_core::{ledger, probe};

use crate::cli::{ConfigArg, EarningsArgs, InitArgs, ProbeArgs, SettleArgs, StatusArgs, StopArgs};
use crate::start::{config_path, load_config};

/// `status`'s exit code when no node runs (as LSB init scripts and `systemctl` use).
pub const EXIT_NOT_RUNNING: i32 = 3;

pub fn init(a: InitArgs) -> anyhow::Result<()> {
    let (path, _) = config_path(&a.config);
    if path.exists() && !a.force {
        return Err(config::ConfigError::Exists(path).into());
    }
    let mut file = NodeFile::default();
    if let Some(m) = a.model {
        file.model = m;
    }
    file.model_dir = a.model_dir.map(|d| {
        mesh_core::model::hub::absolute_or_id(&d, |p| {
            std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
        })
    });
    file.network.listen = if a.listen.is_empty() {
        vec![config::DEFAULT_LISTEN.into()]
    } else {
        a.listen.iter().map(ToString::to_string).collect()
    };
    file.network.bootstrap = a.bootstrap.iter().map(ToString::to_string).collect();
    file.network.public_addr = a.public_addr.iter().map(ToString::to_string).collect();
    if let Some(h) = a.http {
        file.http.listen = h.to_string();
    }
    let base =
        std::path::absolute(config::base_dir(&path)).unwrap_or_else(|_| config::base_dir(&path));
    // Check the values before writing anything, and make the key before the file that
    // names it: a failure leaves no half-initialised node behind.
    let resolved = file.resolve(&base).map_err(|e| anyhow::anyhow!("{e}"))?;
    let existed = resolved.key.exists();
    let identity = Identity::load_or_create(&resolved.key)
        .with_context(|| format!("identity key {}", resolved.key.display()))?;
    file.write_new(&path, a.force)?;
    println!("wrote {}", path.display());
    println!(
        "{} identity key {} (peer id {})",
        if existed { "kept" } else { "created" },
        resolved.key.display(),
        identity.peer_id()
    );
    if file.network.bootstrap.is_empty() {
        println!("no bootstrap peer set: add one under [network] before joining a mesh");
    }
    println!("next: mesh-node register, then mesh-node start --daemon and mesh-node status");
    Ok(())
}

pub fn stop(a: StopArgs) -> anyhow::Result<()> {
    let pid_file = match a.pid_file {
        Some(p) => p,
        None => resolved_pid_file(&a.config)?,
    };
    match daemon::stop(&pid_file, Duration::from_secs(a.timeout_secs))? {
        Stopped::Stopped { pid } => println!("stopped (pid {pid})"),
        Stopped::NotRunning => println!("not running (no live process in {})", pid_file.display()),
    }
    Ok(())
}

fn resolved_pid_file(arg: &crate::cli::ConfigArg) -> anyhow::Result<std::path::PathBuf> {
    let (file, base) = load_config(arg)?;
    Ok(file
        .resolve(&base)
        .map_err(|e| anyhow::anyhow!("config: {e}"))?
        .pid_file)
}

/// Prints the status; returns the process exit code.
pub fn status(a: StatusArgs) -> anyhow::Result<i32> {
    let (file, base) = load_config(&a.config)?;
    let resolved = file
        .resolve(&base)
        .map_err(|e| anyhow::anyhow!("config: {e}"))?;
    let pid_file = a.pid_file.unwrap_or(resolved.pid_file);
    let Some(pid) = daemon::running_pid(&pid_file)? else {
        if a.json {
            println!("{}", serde_json::json!({ "running": false }));
        } else {
            println!("not running");
        }
        return Ok(EXIT_NOT_RUNNING);
    };
    let addr = daemon::read_http_addr(&pid_file).unwrap_or(resolved.http);
    let (code, body) = http::get(addr, "/healthz", Duration::from_secs(5)).with_context(|| {
        format!("running (pid {pid}), but its HTTP port {addr} does not answer")
    })?;
    if code != 200 {
        bail!("running (pid {pid}), but {addr}/healthz answered {code}: {body}");
    }
    if a.json {
        println!("{}", body.trim_end());
        return Ok(0);
    }
    let h: Health = serde_json::from_str(&body).context("parsing /healthz")?;
    // Earnings come from the node's ledger; a node without one (or still starting) has none.
    let earned = match http::get(addr, "/api/earnings", Duration::from_secs(10)) {
        Ok((200, body)) => serde_json::from_str::<EarningsView>(&body).ok(),
        _ => None,
    };
    println!("{}", crate::summary::line(&h, earned.as_ref()));
    if a.short {
        return Ok(0);
    }
    let or_dash = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    println!("running (pid {pid}), {} for {}s", h.status, h.uptime_secs);
    if let Some(why) = &h.degraded {
        println!("degraded: {why}");
    }
    println!("peer id {}", or_dash(&h.peer_id));
    for addr in &h.listen_addrs {
        println!("listening on {addr}");
    }
    println!(
        "model {} blocks {} of {}",
        or_dash(&h.model),
        or_dash(&h.span),
        h.num_blocks.map_or("-".into(), |n| n.to_string())
    );
    println!(
        "sessions {} open, {} opened, {} queued",
        h.sessions, h.sessions_opened, h.queue
    );
    println!(
        "tokens served {} ({} prefill, {} decode)",
        h.tokens_served, h.prefill_tokens, h.decode_tokens
    );
    println!("peers {}", h.peers);
    if let Some(reach) = &h.reach {
        println!("reachability {}", reach.summary());
        for addr in &reach.relay_addrs {
            println!("relayed at {addr}");
        }
    }
    for line in gpu_lines(&h) {
        println!("{line}");
    }
    println!("http on {addr}");
    Ok(0)
}

/// One line per GPU the node last read (`gpu 0 NVIDIA A10: 5.0 GiB used of ...`); none
/// without GPUs.
fn gpu_lines(h: &Health) -> Vec<String> {
    h.gpu_live
        .iter()
        .map(|g| {
            let name = h
                .vram
                .iter()
                .find(|v| v.index == g.index)
                .map_or(String::new(), |v| format!(" {}", v.name));
            format!("gpu {}{name}: {}", g.index, g.usage())
        })
        .collect()
}

pub fn probe(a: ProbeArgs) -> anyhow::Result<()> {
    let p = probe::probe(&mesh_core::paths::mesh_home());
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
        return Ok(());
    }
    let gib = |b: Option<u64>| {
        b.map_or("?".into(), |b| {
            format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
        })
    };
    println!("host   {} ({}/{})", p.hostname, p.os, p.arch);
    println!(
        "cpu    {} x {}",
        if p.cpu.model.is_empty() {
            "unknown"
        } else {
            &p.cpu.model
        },
        p.cpu.cores
    );
    println!(
        "memory {} available of {}",
        gib(p.memory.available_bytes),
        gib(p.memory.total_bytes)
    );
    if let Some(d) = &p.disk {
        println!(
            "disk   {} free of {} at {}",
            gib(Some(d.free_bytes)),
            gib(Some(d.total_bytes)),
            d.path.display()
        );
    }
    if p.gpus.is_empty() {
        println!("gpus   {}", p.gpu_note);
    }
    for g in &p.gpus {
        println!(
            "gpu {}  {}: {} free of {}, driver {}, CUDA {}",
            g.index,
            g.name,
            gib(g.vram_free_bytes),
            gib(g.vram_total_bytes),
            g.driver_version.as_deref().unwrap_or("?"),
            g.cuda_version.as_deref().unwrap_or("?")
        );
    }
    if let Some(dir) = &a.model_dir {
        probe_model(&a, dir, &p)?;
    }
    Ok(())
}

/// How many blocks of the model in `dir` fit in RAM and in each GPU's free VRAM, at the
/// format asked for (the sizing `register` and `start` apply).
fn probe_model(a: &ProbeArgs, dir: &std::path::Path, p: &probe::Probe) -> anyhow::Result<()> {
    let files = mesh_core::model::ModelFiles::open(dir)
        .with_context(|| format!("model {}", dir.display()))?;
    let dtype = mesh_core::model::parse_dtype(&a.dtype)
        .with_context(|| format!("dtype {:?}: expected f32, f16 or bf16", a.dtype))?;
    let format = probe::SpanFormat::of(&files, dtype, a.quantize);
    let cfg = &files.config;
    let label = files.announced_quantization(a.quantize);
    let label = if label.is_empty() {
        a.dtype.clone()
    } else {
        label
    };
    println!(
        "model  {}: {} blocks, {:.1} MiB per block ({label})",
        dir.display(),
        cfg.num_blocks(),
        format.block_bytes(cfg) as f64 / f64::from(1u32 << 20)
    );
    let budget = a.cache_budget_mib << 20;
    let room = |free: Option<u64>| {
        free.map_or("unknown".into(), |f| {
            let n = probe::max_blocks_that_fit(cfg, format, budget, f);
            format!("room for {n} of {} blocks", cfg.num_blocks())
        })
    };
    println!(
        "       RAM: {} (beside a {} MiB KV-cache budget)",
        room(p.memory.available_bytes),
        a.cache_budget_mib
    );
    for g in &p.gpus {
        println!("       gpu {}: {}", g.index, room(g.vram_free_bytes));
    }
    Ok(())
}

/// How a command uses the ledger it opens.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LedgerUse {
    /// Only reads: the ledger on disk is never written (`Store::open_read_only`).
    Read,
    /// Records something (settling marks receipts paid).
    Write,
}

/// The node's identity and its ledger, or `None` when it has no ledger yet.
fn open_ledger(
    config: &ConfigArg,
    ledger_dir: Option<PathBuf>,
    usage: LedgerUse,
) -> anyhow::Result<Option<(Identity, ledger::Store)>> {
    let (file, base) = load_config(config)?;
    let resolved = file
        .resolve(&base)
        .map_err(|e| anyhow::anyhow!("config: {e}"))?;
    let path = ledger_dir.unwrap_or(resolved.ledger_dir);
    if !path.exists() {
        return Ok(None);
    }
    let identity = Identity::load(&resolved.key)
        .with_context(|| format!("identity key {}", resolved.key.display()))?;
    // The typed errors name the path and tell a running node's lock from a damaged store.
    let store = match usage {
        LedgerUse::Read => ledger::Store::open_read_only(&path)?,
        LedgerUse::Write => ledger::Store::open(&path)?,
    };
    Ok(Some((identity, store)))
}

/// How long `settle` waits for a running node: it scans the ledger and checks every
/// line's signatures before it answers.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(300);

pub fn settle(a: SettleArgs) -> anyhow::Result<()> {
    let now = ledger::now_ms();
    let out = a
        .out
        .unwrap_or_else(|| PathBuf::from(format!("settlement-{now}.json")));
    let req = SettleRequest {
        since_ms: a.since.unwrap_or(0),
        min_amount: a.min_amount,
        dry_run: a.dry_run,
        min_total: a.min_total,
    };
    let waiting = |due: u64| {
        println!(
            "waiting: {due} due, below the minimum total of {}: nothing settled",
            a.min_total
        );
    };
    // A running node holds its ledger open (sled allows one opener): the node settles and
    // keeps a copy. An explicit --ledger-dir means that store, settled directly.
    let from_node = match a.ledger_dir {
        None => running_node(&a.config)?,
        Some(_) => None,
    };
    let (batch, kept) = match from_node {
        Some((pid, addr)) => {
            let answer = settle_on_node(pid, addr, &req)?;
            if answer.waited {
                waiting(answer.batch.total_due);
                return Ok(());
            }
            answer.batch.write(&out).with_context(|| {
                format!(
                    "the node settled, but writing {} failed: its copy is {}",
                    out.display(),
                    answer.path.display()
                )
            })?;
            (answer.batch, Some((pid, answer.path)))
        }
        None => {
            let usage = if req.dry_run {
                LedgerUse::Read
            } else {
                LedgerUse::Write
            };
            let Some((identity, store)) = open_ledger(&a.config, a.ledger_dir, usage)? else {
                println!("no receipts yet: nothing to settle");
                return Ok(());
            };
            let opts = ledger::SettleOptions {
                payee: identity.peer_id(),
                since_ms: req.since_ms,
                min_amount: req.min_amount,
                dry_run: req.dry_run,
                now_ms: now,
            };
            if let Some(planned) = http::settle::below_minimum(&store, &opts, a.min_total)? {
                waiting(planned.total_due);
                return Ok(());
            }
            (ledger::settle(&store, &opts, &out)?, None)
        }
    };
    println!(
        "{} {} lines, {} payers, {} due -> {}",
        if a.dry_run { "dry run:" } else { "settled:" },
        batch.lines.len(),
        batch.payers.len(),
        batch.total_due,
        out.display()
    );
    if let Some((pid, path)) = kept {
        println!(
            "by the running node (pid {pid}), which keeps its copy at {}",
            path.display()
        );
    }
    Ok(())
}

/// `POST /api/settle` to a running node: the batch and where the node keeps its copy.
fn settle_on_node(
    pid: u32,
    addr: std::net::SocketAddr,
    req: &SettleRequest,
) -> anyhow::Result<SettleAnswer> {
    let body = serde_json::to_string(req)?;
    // The answer is a batch: capped as a batch file is.
    let max = ledger::settle::MAX_BATCH_BYTES;
    let (code, body) =
        http::post(addr, "/api/settle", &body, SETTLE_TIMEOUT, max).with_context(|| {
            format!(
                "the node runs (pid {pid}), but no answer from its HTTP port {addr} (if it \
                 settled anyway, the batch is under settlements/ in its ledger directory)"
            )
        })?;
    if code != 200 {
        bail!(
            "the node (pid {pid}) answered {code} on {addr}/api/settle: {}",
            body.trim()
        );
    }
    serde_json::from_str(&body).context("parsing the answer of /api/settle")
}

/// The running node's PID and HTTP address, if one runs for this config.
fn running_node(config: &ConfigArg) -> anyhow::Result<Option<(u32, std::net::SocketAddr)>> {
    let (file, base) = load_config(config)?;
    let resolved = file
        .resolve(&base)
        .map_err(|e| anyhow::anyhow!("config: {e}"))?;
    let Some(pid) = daemon::running_pid(&resolved.pid_file)? else {
        return Ok(None);
    };
    let addr = daemon::read_http_addr(&resolved.pid_file).unwrap_or(resolved.http);
    Ok(Some((pid, addr)))
}

/// Earnings rows from a running node's `/api/earnings` (it holds the ledger open).
fn earnings_from_node(
    pid: u32,
    addr: std::net::SocketAddr,
    since_ms: u64,
) -> anyhow::Result<Vec<ledger::EarningsRow>> {
    let path = format!("/api/earnings?since_ms={since_ms}");
    let (code, body) = http::get(addr, &path, Duration::from_secs(30)).with_context(|| {
        format!("the node runs (pid {pid}), but its HTTP port {addr} does not answer")
    })?;
    if code != 200 {
        bail!(
            "the node (pid {pid}) answered {code} on {addr}{path}: {}",
            body.trim()
        );
    }
    let view: EarningsView = serde_json::from_str(&body).context("parsing /api/earnings")?;
    Ok(view.rows)
}

pub fn earnings(a: EarningsArgs) -> anyhow::Result<()> {
    let since_ms = a.days.map_or(0, |d| {
        ledger::now_ms().saturating_sub(d.saturating_mul(86_400_000))
    });
    // A running node holds its ledger open (sled allows one opener): ask the node. An
    // explicit --ledger-dir means that store, read directly.
    let from_node = match a.ledger_dir {
        None => running_node(&a.config)?,
        Some(_) => None,
    };
    let rows = match from_node {
        Some((pid, addr)) => earnings_from_node(pid, addr, since_ms)?,
        None => {
            let Some((identity, store)) = open_ledger(&a.config, a.ledger_dir, LedgerUse::Read)?
            else {
                if a.json {
                    println!("[]");
                } else {
                    println!("no receipts yet");
                }
                return Ok(());
            };
            ledger::earnings(&store, &identity.peer_id(), since_ms)?
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if let Some((pid, _)) = from_node {
        println!("from the running node (pid {pid})");
    }
    if rows.is_empty() {
        println!("no receipts yet");
        return Ok(());
    }
    println!(
        "{:<10}  {:<24}  {:>8}  {:>12}  {:>12}  {:>12}  {:>12}",
        "day", "model", "sessions", "tokens", "amount", "confirmed", "settled"
    );
    for r in &rows {
        println!(
            "{:<10}  {:<24}  {:>8}  {:>12}  {:>12}  {:>12}  {:>12}",
            r.day,
            r.model.as_str(),
            r.sessions,
            r.prefill_tokens + r.decode_tokens,
            r.amount,
            r.confirmed,
            r.settled
        );
    }
    let total: u64 = rows.iter().map(|r| r.amount).sum();
    println!("total {total}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::probe::Gpu;
    use mesh_core::types::GpuLive;

    #[test]
    fn status_has_a_line_per_gpu_and_none_without() {
        assert!(gpu_lines(&Health::default()).is_empty());
        let live = GpuLive {
            index: 0,
            memory_used_bytes: 5 << 30,
            memory_free_bytes: 19 << 30,
            memory_total_bytes: 24 << 30,
            utilization_percent: Some(63),
        };
        let h = Health {
            vram: vec![Gpu {
                index: 0,
                name: "NVIDIA A10".into(),
                ..Gpu::default()
            }],
            gpu_live: vec![
                live,
                GpuLive {
                    index: 1,
                    utilization_percent: None,
                    ..live
                },
            ],
            ..Health::default()
        };
        assert_eq!(
            gpu_lines(&h),
            vec![
                "gpu 0 NVIDIA A10: 5.0 GiB used of 24.0 GiB (19.0 GiB free), 63% utilisation",
                "gpu 1: 5.0 GiB used of 24.0 GiB (19.0 GiB free), utilisation n/a",
            ]
        );
        // A node from before the readings answers /healthz without them: still parsed.
        let old = r#"{"status":"serving","running":true,"version":"0.1.0","pid":1,
            "uptime_secs":1,"peer_id":null,"model":null,"span":null,"num_blocks":null,
            "price_per_token":null,"listen_addrs":[],"sessions":0,"sessions_opened":0,
            "queue":0,"tokens_served":0,"prefill_tokens":0,"decode_tokens":0,"peers":0,
            "memory":{"process_rss_bytes":null,"available_bytes":null,"total_bytes":null,
            "kv_reserved_bytes":0,"kv_free_bytes":0},"vram":[]}"#;
        let h: Health = serde_json::from_str(old).unwrap();
        assert!(gpu_lines(&h).is_empty());
    }
}
