//! `mesh-node register`: the config and flags → `mesh_core::register` → a report, and the
//! chosen span written into the config file.

use std::time::Duration;

use anyhow::{bail, Context};
use mesh_core::config;
use mesh_core::daemon;
use mesh_core::identity::Identity;
use mesh_core::probe;
use mesh_core::register::{self, RegisterConfig, Registration};
use mesh_core::ModelId;

use crate::cli::RegisterArgs;
use crate::logging;
use crate::start::{apply_node_flags, config_path, load_config, model_dir, p2p_config};

fn mib(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
    } else {
        format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
    }
}

pub fn register(a: RegisterArgs) -> anyhow::Result<()> {
    let (path, _) = config_path(&a.config);
    let (mut file, base) = load_config(&a.config)?;
    apply_node_flags(&mut file, &a.node);
    let r = file
        .resolve(&base)
        .map_err(|e| anyhow::anyhow!("config: {e}"))?;
    if let Some(pid) = daemon::running_pid(&r.pid_file)? {
        bail!(
            "a node is running (pid {pid}): stop it first (`mesh-node stop`); register \
             joins the mesh with the node's own identity and ports"
        );
    }
    // The report says everything the event loop's loud address warning says.
    logging::init(
        r.json_logs,
        "warn,libp2p=error,mesh_core::p2p::event_loop=error",
    );
    let model_dir = model_dir(&r)?;
    let identity = Identity::load_or_create(&r.key)
        .with_context(|| format!("identity key {}", r.key.display()))?;
    logging::set_peer_id(&identity.peer_id().to_string());
    let cfg = RegisterConfig {
        model_id: ModelId::new(r.model.clone()),
        model_dir,
        num_blocks: a.node.num_blocks,
        span: r.blocks,
        span_len: r.span_len,
        dtype: r.dtype,
        quantize: r.quantize,
        device: r.device,
        cache_budget_bytes: r.limits.cache_budget_bytes as u64,
        price_per_token: r.price_per_token,
        p2p: p2p_config(&r, identity),
        check_timeout: Duration::from_secs(a.check_secs.max(1)),
    };
    let reg = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(async {
            let data_dir = mesh_core::paths::mesh_home();
            let machine = tokio::task::spawn_blocking(move || probe::probe(&data_dir)).await?;
            anyhow::Ok(register::register(cfg, machine).await?)
        })?;
    report(&reg);

    let span = format!("{}..{}", reg.span.start, reg.span.end);
    if a.dry_run {
        println!(
            "dry run: {} left as it is (it would get blocks = \"{span}\")",
            path.display()
        );
        return Ok(());
    }
    if path.exists() {
        config::set_blocks(&path, reg.span)?;
    } else {
        // No file yet: write the whole effective configuration, so `start` uses what
        // register checked (bootstrap, addresses, limits), with the span.
        file.blocks = Some(span.clone());
        file.write_new(&path, false)?;
    }
    println!("wrote blocks = \"{span}\" to {}", path.display());
    println!("next: mesh-node start --daemon");
    Ok(())
}

fn report(reg: &Registration) {
    println!(
        "model {}: {} blocks, config.json and {} weight file(s) read",
        reg.model, reg.num_blocks, reg.weight_files
    );
    println!("machine: {}", reg.probe.capability());
    let s = &reg.sizing;
    let room = match (s.available_bytes, s.max_blocks) {
        (Some(avail), Some(max)) => format!(
            "{} of {} available: room for {} of {} blocks",
            mib(avail),
            s.where_,
            max.min(reg.num_blocks),
            reg.num_blocks
        ),
        _ => format!("{} available: unknown, not checked", s.where_),
    };
    let weights = if reg.quantization.is_empty() {
        String::new()
    } else {
        format!(" ({})", reg.quantization)
    };
    println!(
        "sizing: {} blocks{weights} need {} of weights + {} of KV cache; {room}",
        s.blocks,
        mib(s.weights_bytes),
        mib(s.cache_bytes)
    );
    println!(
        "joined the mesh as {} ({} peer(s) connected)",
        reg.peer_id, reg.peers
    );
    println!(
        "span: blocks {}..{} of {} ({})",
        reg.span.start,
        reg.span.end,
        reg.num_blocks,
        if reg.picked {
            "picked: the blocks the mesh serves worst"
        } else {
            "as asked"
        }
    );
    println!(
        "announced: a fresh client found it in the DHT after {} ms; heartbeat {}",
        reg.found_after.as_millis(),
        if reg.heartbeat_heard {
            "heard"
        } else {
            "not heard yet (gossip can take a heartbeat interval)"
        }
    );
    for r in &reg.reachability {
        println!(
            "public address {} reachable (dialled back by {})",
            r.addr, r.checked_by
        );
    }
    if let Some(nat) = &reg.nat {
        println!("reachability: {}", nat.summary());
    }
    if let Some(w) = &reg.address_warning {
        println!("{w}");
    }
    println!("withdrawn again: `mesh-node start` announces it for real");
}
